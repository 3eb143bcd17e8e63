-- Least-privilege roles for the relay. Idempotent: run it again after a migration.
--
-- Run it as an administrator (a superuser, or the owner of the tables with
-- CREATEROLE), once in pg_start's database and once in pg_end's, after
-- `outbox-relay migrate`:
--
--   psql "postgres://admin@pg_start/app" -f sql/roles.sql
--   psql "postgres://admin@pg_end/inbox" -f sql/roles.sql
--
-- In each database it grants what is there: the source role where the outbox is,
-- the sink role where the relay's bookkeeping (schema outbox_relay) is. The roles
-- are created without a password; set one out of band, never in a file under version
-- control:
--
--   ALTER ROLE outbox_relay_source PASSWORD '…';   -- psql: \password outbox_relay_source
--   ALTER ROLE outbox_relay_sink PASSWORD '…';
--
-- What stays with the administrator (the relay's roles cannot do it):
--   * creating the schemas, tables and the publication: `outbox-relay migrate`, run
--     once by the administrator (CREATE PUBLICATION needs ownership of the table);
--   * nothing else: the source role creates its replication slot itself (REPLICATION).
--
-- The source role (pg_start):
--   LOGIN, REPLICATION      the replication connection, creating/dropping its slot,
--                           and peeking it (pg_logical_slot_peek_binary_changes) when an
--                           interrupted initial snapshot resumes
--   USAGE on schema outbox  to name the outbox table
--   SELECT on the outbox    the connector's snapshot of the rows already there when
--                           the slot is created, and the column check
--   (DELETE on the outbox   only with `connector --cleanup`: uncomment below)
-- It reads nothing else: not main.transactions, not main.balance.
--
-- The sink role (pg_end), for `sink` and `direct`:
--   USAGE on schemas main and outbox_relay
--   main.transactions       SELECT, INSERT (idempotent apply: INSERT … ON CONFLICT DO
--                           NOTHING, then compares what was already there)
--   main.balance            SELECT, INSERT, UPDATE (INSERT … ON CONFLICT DO UPDATE)
--   outbox_relay.sink_offsets, outbox_relay.direct_progress
--                           SELECT, INSERT, UPDATE (progress, same transaction)
--   outbox_relay.dead_letters
--                           SELECT, INSERT, and USAGE on its id sequence
-- No DELETE, no TRUNCATE, no DDL, and no role at all on pg_start.
--
-- Your own outbox and inbox (`migrate --relay-only`): the roles are made all the same
-- (the source role in any database without the relay's bookkeeping), and the grants on
-- the demo's tables are skipped. Grant the rest yourself:
--   GRANT USAGE ON SCHEMA <s> TO outbox_relay_source;
--   GRANT SELECT ON <s>.<outbox> TO outbox_relay_source;      -- (DELETE with --cleanup)
--   GRANT USAGE ON SCHEMA <s> TO outbox_relay_sink;
--   GRANT SELECT, INSERT ON <s>.<inbox> TO outbox_relay_sink;  -- and what the handler writes

DO $$
BEGIN
    IF to_regclass('outbox.transactions') IS NOT NULL
       OR to_regclass('outbox_relay.sink_offsets') IS NULL THEN
        BEGIN
            CREATE ROLE outbox_relay_source LOGIN REPLICATION;
        EXCEPTION WHEN duplicate_object THEN
            ALTER ROLE outbox_relay_source LOGIN REPLICATION;
        END;
    END IF;
    IF to_regclass('outbox.transactions') IS NOT NULL THEN
        GRANT USAGE ON SCHEMA outbox TO outbox_relay_source;
        GRANT SELECT ON outbox.transactions TO outbox_relay_source;
        -- With `connector --cleanup`:
        -- GRANT DELETE ON outbox.transactions TO outbox_relay_source;
    END IF;

    IF to_regclass('outbox_relay.sink_offsets') IS NOT NULL THEN
        BEGIN
            CREATE ROLE outbox_relay_sink LOGIN;
        EXCEPTION WHEN duplicate_object THEN
            ALTER ROLE outbox_relay_sink LOGIN;
        END;
        GRANT USAGE ON SCHEMA outbox_relay TO outbox_relay_sink;
        IF to_regclass('main.transactions') IS NOT NULL THEN
            GRANT USAGE ON SCHEMA main TO outbox_relay_sink;
            GRANT SELECT, INSERT ON main.transactions TO outbox_relay_sink;
            GRANT SELECT, INSERT, UPDATE ON main.balance TO outbox_relay_sink;
        END IF;
        GRANT SELECT, INSERT, UPDATE
            ON outbox_relay.sink_offsets, outbox_relay.direct_progress TO outbox_relay_sink;
        GRANT SELECT, INSERT ON outbox_relay.dead_letters TO outbox_relay_sink;
        GRANT USAGE ON SEQUENCE outbox_relay.dead_letters_id_seq TO outbox_relay_sink;
    END IF;
END
$$;
