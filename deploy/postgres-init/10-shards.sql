-- The history shards of docker-compose.yml (CHATTERBOT_POSTGRES_SHARDS lists them in this order).
-- The postgres image runs this as POSTGRES_USER, once, when it initialises an empty data volume;
-- `chatterbot migrate` (the compose `migrate` one-shot) then applies the schema to every shard.
-- A new shard on an existing volume: CREATE DATABASE it by hand (psql), append its DSN to
-- CHATTERBOT_POSTGRES_SHARDS and follow "Shards" in the top-level README (`chatterbot shards rebalance`).
CREATE DATABASE chatterbot_shard0;
CREATE DATABASE chatterbot_shard1;
