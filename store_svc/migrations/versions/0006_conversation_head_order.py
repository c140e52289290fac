"""The head digest index also holds the order a continuation picks by.

`AppendExchange` continues the most recently updated of a user's conversations with a given head. Many of them
can share one head (a server-side app that sends the same templated first message every time), and with only
(user_id, head_digest) indexed the planner's generic plan for that lookup walks every conversation of the user
in `updated_at` order, filtering by head: a cost that grows with the user's history on every append. Ordered
by (user_id, head_digest, updated_at DESC, conversation_id), the lookup is the index's first entry.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "CREATE INDEX conversations_head_recent_idx "
        "ON conversations (user_id, head_digest, updated_at DESC, conversation_id) "
        "WHERE head_digest IS NOT NULL"
    )
    op.execute("DROP INDEX conversations_head_idx")


def downgrade() -> None:
    op.execute(
        "CREATE INDEX conversations_head_idx ON conversations (user_id, head_digest) WHERE head_digest IS NOT NULL"
    )
    op.execute("DROP INDEX conversations_head_recent_idx")
