-- Target database (pg_end): the inbox tables, as in the seed, and the relay's own
-- bookkeeping. Idempotent: applying it twice changes nothing.

CREATE SCHEMA IF NOT EXISTS main;

CREATE TABLE IF NOT EXISTS main.transactions (
    id         bigint    PRIMARY KEY,
    account_id bigint    NOT NULL,
    amount     numeric   NOT NULL,
    created_at timestamp NOT NULL
);

CREATE TABLE IF NOT EXISTS main.balance (
    account_id      bigint    PRIMARY KEY,
    current_balance numeric   NOT NULL,
    updated_at      timestamp NOT NULL
);

-- The relay's own bookkeeping, from here to the end. `migrate --relay-only` applies
-- this part alone (no ledger tables), for a team that brings its own inbox.
CREATE SCHEMA IF NOT EXISTS outbox_relay;

-- Sink progress: the last Kafka offset applied per (topic, partition), written in the
-- same transaction as the rows it covers. The sink resumes at last_offset + 1.
CREATE TABLE IF NOT EXISTS outbox_relay.sink_offsets (
    topic       text        NOT NULL,
    partition   integer     NOT NULL,
    last_offset bigint      NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition)
);

-- Direct-mode progress: the commit LSN of the last source transaction applied from a
-- slot, written in the same transaction as its rows.
CREATE TABLE IF NOT EXISTS outbox_relay.direct_progress (
    slot_name  text        PRIMARY KEY,
    commit_lsn pg_lsn      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
-- pg_start's system identifier, written by the relays that never confirm the slot past
-- commit_lsn (so that a slot ahead of it, or another server, is detected at start).
ALTER TABLE outbox_relay.direct_progress ADD COLUMN IF NOT EXISTS system_identifier text;
-- While the slot's initial snapshot is delivered (commit_lsn 0/0): how far it got (JSON,
-- kept as the relay wrote it).
ALTER TABLE outbox_relay.direct_progress ADD COLUMN IF NOT EXISTS snapshot text;
-- The on-demand backfills requested in the stream, and how far each got (JSON, kept as
-- the relay wrote it).
ALTER TABLE outbox_relay.direct_progress ADD COLUMN IF NOT EXISTS backfill text;

-- Records that could not be applied: kept whole (raw bytes, origin, error) and written
-- in the same transaction as the batch they came with, so nothing is lost and nothing
-- blocks the pipeline.
CREATE TABLE IF NOT EXISTS outbox_relay.dead_letters (
    id           bigserial   PRIMARY KEY,
    received_at  timestamptz NOT NULL DEFAULT now(),
    kind         text        NOT NULL,  -- invalid_json, missing_field, wrong_type, invalid_value, unknown_format, conflict, ...
    error        text        NOT NULL,
    topic        text,
    partition    integer,
    kafka_offset bigint,
    source_lsn   pg_lsn,
    record_key   bytea,
    record_value bytea,
    headers      jsonb
);

-- A Kafka record is dead-lettered at most once, however often it is replayed: the sink
-- inserts with ON CONFLICT (topic, partition, kafka_offset) DO NOTHING. Rows without a
-- Kafka origin have NULLs here, which never conflict.
CREATE UNIQUE INDEX IF NOT EXISTS dead_letters_kafka_origin
    ON outbox_relay.dead_letters (topic, partition, kafka_offset);
