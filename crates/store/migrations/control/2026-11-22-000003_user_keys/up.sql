-- Users' data keys (BX1), wrapped by their tenant's key; apart from tenant data, so erasing
-- a user (or deleting a tenant) destroys the key and every old backup of its messages turns
-- into unreadable ciphertext.
CREATE TABLE user_keys (
    tenant_id   uuid NOT NULL REFERENCES tenants (id),
    user_id     uuid NOT NULL,
    wrapped_key bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, user_id)
);
