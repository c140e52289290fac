"""Tool turns in history: tool messages, and the tool calls of an answer.

- `role` may be 'tool': the result of a tool call, naming the call it answers in `tool_call_id`.
- An assistant message may carry `tool_calls`: a JSON array of `{"id", "name", "arguments"}` (the arguments as
  the text the model wrote).
- `messages_tool_check` holds the two together: a tool message names its call, and only answers call tools.

Cheap on a big table: the columns are nullable with no default (no rewrite), and the constraints are added
NOT VALID (no scan under the lock this migration holds). New rows are checked all the same, and every
existing row passes: the old role check was narrower, and the new columns are NULL. A partition made later
gets them validated. `ALTER TABLE messages VALIDATE CONSTRAINT ...` marks them valid on the existing
partitions whenever an operator likes; it lets reads and writes go on while it scans.

The downgrade validates the old role check, so it fails while tool messages are stored.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-09
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

# The name 0002 got: messages_0001 held "messages_role_check" when the partitioned table was created.
_OLD_ROLE_CHECK = "messages_role_check1"


def upgrade() -> None:
    op.execute("ALTER TABLE messages ADD COLUMN tool_calls jsonb, ADD COLUMN tool_call_id text")
    op.execute(f"ALTER TABLE messages DROP CONSTRAINT {_OLD_ROLE_CHECK}")
    op.execute(
        "ALTER TABLE messages ADD CONSTRAINT messages_role_check "
        "CHECK (role IN ('system', 'user', 'assistant', 'tool')) NOT VALID"
    )
    op.execute(
        "ALTER TABLE messages ADD CONSTRAINT messages_tool_check "
        "CHECK ((role = 'tool') = (tool_call_id IS NOT NULL) AND (tool_calls IS NULL OR role = 'assistant')) "
        "NOT VALID"
    )


def downgrade() -> None:
    op.execute("ALTER TABLE messages DROP CONSTRAINT messages_tool_check")
    op.execute("ALTER TABLE messages DROP CONSTRAINT messages_role_check")
    op.execute(
        f"ALTER TABLE messages ADD CONSTRAINT {_OLD_ROLE_CHECK} CHECK (role IN ('system', 'user', 'assistant'))"
    )
    op.execute("ALTER TABLE messages DROP COLUMN tool_call_id, DROP COLUMN tool_calls")
