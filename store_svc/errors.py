"""Errors the repository raises; the servicer maps them to gRPC status codes."""

from __future__ import annotations


class StoreError(Exception):
    """Base class of the store's own errors."""


class NotFound(StoreError):
    """The row does not exist for this user (another user's row counts as not existing)."""


class InvalidInput(StoreError):
    """A request field is missing, too long or malformed."""
