-- The control plane: which tenants exist, where they live, their wrapped keys, and the log
-- of deletions that must survive a backup restore. Runs with search_path = hafen.
-- Nothing here is tenant content: names of organisations and ids only.

CREATE TABLE tenants (
    id              uuid PRIMARY KEY,
    -- Cleared when the tenant is deleted: nothing of the organisation stays behind (GR3).
    slug            text,
    display_name    text,
    status          text NOT NULL CHECK (status IN ('active', 'deleted')),
    region          text NOT NULL,
    -- The accepted data-processing agreement (GR2, CB6).
    dpa_version     text NOT NULL,
    dpa_accepted_at timestamptz NOT NULL,
    dpa_accepted_by uuid NOT NULL,
    -- Name of the database the tenant's schema lives on (TM3); 'default' is the main one.
    database_name   text NOT NULL,
    -- The client's request id of CreateTenant, so a retry finds the tenant instead of
    -- provisioning a second one.
    create_request_id uuid UNIQUE,
    settings        jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    deleted_at      timestamptz,
    CHECK ((status = 'deleted') = (slug IS NULL))
);

CREATE UNIQUE INDEX tenants_slug_key ON tenants (slug);
CREATE INDEX tenants_created_idx ON tenants (created_at, id);

-- Tenant keys, wrapped (AES-256-GCM) by the master key, which never enters the database.
CREATE TABLE tenant_keys (
    tenant_id   uuid PRIMARY KEY REFERENCES tenants (id),
    wrapped_key bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Every deleted tenant and erased user, replayed after a restore (GR4). Ids and times only.
CREATE TABLE deletion_log (
    id          uuid PRIMARY KEY,
    kind        text NOT NULL CHECK (kind IN ('tenant', 'user')),
    tenant_id   uuid NOT NULL,
    user_id     uuid,
    deleted_at  timestamptz NOT NULL DEFAULT now(),
    CHECK ((kind = 'user') = (user_id IS NOT NULL))
);

CREATE INDEX deletion_log_time_idx ON deletion_log (deleted_at);
