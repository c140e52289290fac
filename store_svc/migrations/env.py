"""Alembic environment: runs the plain-SQL revisions online with psycopg 3 (sync).

The database URL comes from the config's `sqlalchemy.url`; a libpq-style `postgresql://` DSN (the form asyncpg
and the settings use) is switched to SQLAlchemy's psycopg 3 driver here, so callers pass one DSN everywhere.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool, text
from sqlalchemy.engine import make_url

# Held for the migration transaction: replicas of the service starting together migrate one at a time, and
# the ones that wait then find the schema at head and do nothing. Any fixed 64-bit key; this is "chatstor".
_MIGRATION_LOCK_KEY = 0x63686174_73746F72


def sqlalchemy_url(dsn: str) -> str:
    """`dsn` with the psycopg 3 driver (`postgresql://` and `postgres://` become `postgresql+psycopg://`)."""
    url = make_url(dsn)
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    return url.render_as_string(hide_password=False)


def _configured_url() -> str:
    url = context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("alembic: sqlalchemy.url is not set")
    return sqlalchemy_url(url)


def run_migrations_offline() -> None:
    """Emit the SQL instead of running it (`alembic upgrade --sql`)."""
    context.configure(url=_configured_url(), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Upgrade the database in one transaction, under an advisory lock."""
    engine = create_engine(_configured_url(), poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            context.configure(connection=connection, target_metadata=None, transactional_ddl=True)
            with context.begin_transaction():
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
