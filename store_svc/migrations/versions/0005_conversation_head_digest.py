"""The head digest of a conversation, which a whole-prompt client continues it by.

An OpenAI-style client names no conversation; it resends the conversation so far with every request. chat_svc
digests the user and assistant messages of that prompt, and `AppendExchange` stores the digest of the
conversation after each exchange in `head_digest`. The next request's prompt, less its new user message,
digests the same: the append finds the conversation by (user_id, head_digest). NULL (a /chat turn, or a
conversation named by its id) means there is nothing to continue by digest.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE conversations ADD COLUMN head_digest text")
    # Partial: most conversations (those of /chat) have no head, and they never are looked up by one.
    op.execute(
        "CREATE INDEX conversations_head_idx ON conversations (user_id, head_digest) "
        "WHERE head_digest IS NOT NULL"
    )


def downgrade() -> None:
    op.execute("DROP INDEX conversations_head_idx")
    op.execute("ALTER TABLE conversations DROP COLUMN head_digest")
