"""Schema migrations: Alembic, configured in code from the package's own `migrations/` folder.

No `alembic.ini` is needed, so the migrations run the same from a checkout and from an installed wheel. For
other Alembic commands (`revision`, `history`, `downgrade`) pass `alembic_config(dsn)` to `alembic.command`.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from alembic import command
from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

# `alembic.context` is a process-wide proxy, so two upgrades in one process must not overlap. Processes (service
# replicas) are kept apart by the advisory lock that `migrations/env.py` takes in the database.
_upgrade_lock = threading.Lock()


def alembic_config(dsn: str) -> Config:
    """An Alembic config for the database at `dsn` (a `postgresql://` URL)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # set_main_option goes through configparser interpolation: a literal % (e.g. in a password) must be doubled.
    config.set_main_option("sqlalchemy.url", dsn.replace("%", "%%"))
    return config


def upgrade(dsn: str) -> None:
    """Bring the database at `dsn` to the newest schema; a no-op when it is there already. Blocking."""
    with _upgrade_lock:
        command.upgrade(alembic_config(dsn), "head")


async def upgrade_async(dsn: str) -> None:
    """`upgrade` in a worker thread, so the event loop keeps running."""
    await asyncio.to_thread(upgrade, dsn)


def upgrade_all(dsns: list[str]) -> None:
    """`upgrade` every shard, one after the other. Blocking."""
    for dsn in dsns:
        upgrade(dsn)


async def upgrade_all_async(dsns: list[str]) -> None:
    """`upgrade_all` in a worker thread."""
    await asyncio.to_thread(upgrade_all, dsns)
