"""API keys, stored as SHA-256 hashes.

Keys are not user data: a key is looked up by its hash before anyone knows whose it is, so `api_keys` is not
sharded by user. store_svc reads and writes it on the control shard (shard 0, the one shard that never moves
when the list grows) only. Migrations run on every shard, so the other shards have an empty copy of the
table; nothing uses it. Under Citus this would be a plain (local) table on the coordinator.

- `key_hash` is the SHA-256 of the key (`chatterbot.api_keys.hash_key`): keys carry 256 random bits, so a
  fast unsalted hash is enough (no dictionary to attack) and lets the lookup be one unique-index probe.
- `prefix` is the key's first characters, shown in lists and accepted by `chatterbot keys revoke`.
- A user key names its one user; service and admin keys name none.

Revision ID: 0003
Revises: 0002
Create Date: 2025-03-01
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE api_keys (
            key_id              text PRIMARY KEY,
            key_hash            bytea NOT NULL UNIQUE CHECK (octet_length(key_hash) = 32),
            prefix              text NOT NULL,
            kind                text NOT NULL CHECK (kind IN ('user', 'service', 'admin')),
            user_id             text,
            name                text NOT NULL DEFAULT '',
            requests_per_minute integer NOT NULL DEFAULT 0 CHECK (requests_per_minute >= 0),
            tokens_per_minute   integer NOT NULL DEFAULT 0 CHECK (tokens_per_minute >= 0),
            created_at          timestamptz NOT NULL DEFAULT now(),
            revoked_at          timestamptz,
            CHECK ((kind = 'user') = (user_id IS NOT NULL))
        )
        """
    )
    op.execute("CREATE INDEX api_keys_prefix_idx ON api_keys (prefix)")
    op.execute("CREATE INDEX api_keys_user_idx ON api_keys (user_id) WHERE user_id IS NOT NULL")


def downgrade() -> None:
    op.execute("DROP TABLE api_keys")
