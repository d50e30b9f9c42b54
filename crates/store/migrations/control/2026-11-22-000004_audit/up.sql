-- Audit (BX2, BX6). Two parts, both ids and counts only, never content or secrets:
--
-- 1. The outbox: every service writes its audit events here in the same transaction as the
--    change they record; the service's relay delivers them to the audit service and deletes
--    them once acknowledged. Tenant roles may insert (inside a tenant transaction) but not
--    read, through the group role hafen_outbox_writer. Every database that holds tenant
--    schemas has this table (see hafen_store::outbox).
-- 2. The audit service's chains: per tenant (the nil UUID for the platform chain), events
--    numbered 1, 2, 3, ... with hash = SHA-256(prev_hash || canonical encoding).

CREATE TABLE IF NOT EXISTS outbox (
    id         uuid PRIMARY KEY,
    tenant_id  uuid,
    -- The event, encoded as hafen.audit.v1.AuditEvent (protobuf).
    event      bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

DO $$
BEGIN
    CREATE ROLE hafen_outbox_writer NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
END $$;
GRANT USAGE ON SCHEMA hafen TO hafen_outbox_writer;
GRANT INSERT ON outbox TO hafen_outbox_writer;

-- Tenants created before this migration join the writers.
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT 't_' || replace(id::text, '-', '') AS name FROM tenants WHERE status = 'active'
    LOOP
        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r.name) THEN
            EXECUTE format('GRANT hafen_outbox_writer TO %I', r.name);
        END IF;
    END LOOP;
END $$;

CREATE TABLE audit_events (
    -- The tenant id; the nil UUID for the platform chain.
    chain       uuid NOT NULL,
    sequence    bigint NOT NULL CHECK (sequence > 0),
    event_id    uuid NOT NULL UNIQUE,
    occurred_at timestamptz NOT NULL,
    actor_kind  text NOT NULL,
    actor_id    text NOT NULL,
    action      text NOT NULL,
    target_type text NOT NULL,
    target_id   text NOT NULL,
    request_id  text NOT NULL,
    outcome     text NOT NULL,
    attributes  jsonb NOT NULL,
    prev_hash   bytea NOT NULL,
    hash        bytea NOT NULL,
    appended_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (chain, sequence)
);

CREATE INDEX audit_events_time_idx ON audit_events (chain, occurred_at);

-- The newest link of each chain; its row lock serialises appends to one chain.
CREATE TABLE audit_heads (
    chain    uuid PRIMARY KEY,
    sequence bigint NOT NULL,
    hash     bytea NOT NULL
);
