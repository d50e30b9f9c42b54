-- Sessions (OC2, OC5): PostgreSQL is their truth, Redis their cache. They live in the control
-- plane so that any service can resolve an access token (`<session id>.<secret>`) without
-- knowing its tenant first. Only digests of the token secrets are stored.
CREATE TABLE sessions (
    id                      uuid PRIMARY KEY,
    tenant_id               uuid NOT NULL REFERENCES tenants (id),
    user_id                 uuid NOT NULL,
    chat_code_id            uuid NOT NULL,
    role                    text NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
    -- Free label of the device, from Login (or the chat code's label).
    device_label            text NOT NULL,
    access_digest           bytea NOT NULL,
    access_expires_at       timestamptz NOT NULL,
    refresh_digest          bytea NOT NULL,
    refresh_expires_at      timestamptz NOT NULL,
    -- Digests of refresh tokens already exchanged: presenting one again is reuse, and
    -- revokes the session (its whole token family).
    used_refresh_digests    bytea[] NOT NULL DEFAULT '{}',
    created_at              timestamptz NOT NULL DEFAULT now(),
    refreshed_at            timestamptz,
    revoked_at              timestamptz,
    revoke_reason           text CHECK (revoke_reason IN (
        'logout', 'device_wiped', 'user_deactivated', 'password_changed', 'refresh_reuse',
        'tenant_deleted')),
    CHECK ((revoked_at IS NULL) = (revoke_reason IS NULL))
);

CREATE INDEX sessions_code_idx ON sessions (tenant_id, chat_code_id) WHERE revoked_at IS NULL;
CREATE INDEX sessions_user_idx ON sessions (tenant_id, user_id) WHERE revoked_at IS NULL;
