CREATE TABLE tenant_keys (
    tenant_id   uuid PRIMARY KEY REFERENCES tenants (id),
    wrapped_key bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE user_keys (
    tenant_id   uuid NOT NULL REFERENCES tenants (id),
    user_id     uuid NOT NULL,
    wrapped_key bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, user_id)
);

CREATE TABLE deletion_log (
    id          uuid PRIMARY KEY,
    kind        text NOT NULL CHECK (kind IN ('tenant', 'user', 'visitor')),
    tenant_id   uuid NOT NULL,
    user_id     uuid,
    deleted_at  timestamptz NOT NULL DEFAULT now(),
    CHECK ((kind IN ('user', 'visitor')) = (user_id IS NOT NULL))
);

CREATE INDEX deletion_log_time_idx ON deletion_log (deleted_at);
