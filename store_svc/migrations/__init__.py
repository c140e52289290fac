"""Alembic migrations of the store schema (plain SQL revisions, no SQLAlchemy models)."""
