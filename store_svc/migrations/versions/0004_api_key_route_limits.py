"""Per-route limits on API keys.

`route_limits` holds the key's own limits by route as a JSON array of {"route", "limit"} objects (limit in the
`limits` library's notation, e.g. "600/minute" or "20/minute;500/hour"). A key with any limit of its own
(these, requests_per_minute or tokens_per_minute) is not held to the edge's route defaults.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE api_keys
            ADD COLUMN route_limits jsonb NOT NULL DEFAULT '[]'::jsonb
            CHECK (jsonb_typeof(route_limits) = 'array')
        """
    )


def downgrade() -> None:
    op.execute("ALTER TABLE api_keys DROP COLUMN route_limits")
