"""Routers of the edge, one per area."""
