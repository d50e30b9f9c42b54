-- Retention (CB5): legal holds that keep data from being purged or deleted, and the purge
-- runs, counts only. A conversation's own period is a column of `conversations`.

CREATE TABLE legal_holds (
    id              uuid PRIMARY KEY,
    conversation_id uuid REFERENCES conversations (id),
    user_id         uuid REFERENCES users (id),
    -- A short label, no free text (lowercase letters, digits, ".", "_", "-").
    reason_code     text NOT NULL CHECK (reason_code ~ '^[a-z0-9._-]{1,64}$'),
    set_by          uuid NOT NULL,
    set_at          timestamptz NOT NULL,
    lifted_by       uuid,
    lifted_at       timestamptz,
    CHECK ((conversation_id IS NULL) <> (user_id IS NULL)),
    CHECK ((lifted_by IS NULL) = (lifted_at IS NULL))
);

CREATE UNIQUE INDEX legal_holds_conversation_key
    ON legal_holds (conversation_id) WHERE lifted_at IS NULL AND conversation_id IS NOT NULL;
CREATE UNIQUE INDEX legal_holds_user_key
    ON legal_holds (user_id) WHERE lifted_at IS NULL AND user_id IS NOT NULL;

CREATE TABLE purge_runs (
    id                    uuid PRIMARY KEY,
    trigger               text NOT NULL CHECK (trigger IN ('scheduled', 'manual')),
    state                 text NOT NULL CHECK (state IN ('running', 'succeeded', 'failed')),
    started_at            timestamptz NOT NULL,
    ended_at              timestamptz,
    -- Advanced by the running purge after every batch; a run whose heartbeat stopped is
    -- taken over (its process died).
    heartbeat_at          timestamptz NOT NULL,
    messages_deleted      bigint NOT NULL DEFAULT 0,
    conversations_touched bigint NOT NULL DEFAULT 0,
    held_skipped          bigint NOT NULL DEFAULT 0,
    triggered_by          uuid
);

CREATE INDEX purge_runs_started_idx ON purge_runs (started_at DESC, id DESC);
-- At most one run per tenant at a time.
CREATE UNIQUE INDEX purge_runs_running_key ON purge_runs ((true)) WHERE state = 'running';
