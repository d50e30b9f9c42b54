-- The key store: every data key, wrapped, and the deletion log. It lives in a database of its
-- own (`--keystore-url`), backed up apart from tenant data and kept for a short time, so no
-- backup of tenant data holds a key, and restoring tenant data cannot bring a destroyed key or
-- an erasure's record back.

-- Tenant keys, wrapped by the master key version `key_version` (the master key never enters a
-- database).
CREATE TABLE tenant_keys (
    tenant_id    uuid PRIMARY KEY,
    key_version  integer NOT NULL CHECK (key_version > 0),
    wrapped_key  bytea NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    rewrapped_at timestamptz
);

CREATE INDEX tenant_keys_version_idx ON tenant_keys (key_version);

-- Users' and visitors' keys, wrapped by their tenant's key (a visitor's under the visit's id).
-- Erasing a user or visitor, or deleting their tenant, deletes the row: what was sealed under
-- the key becomes unreadable everywhere, backups included.
CREATE TABLE user_keys (
    tenant_id   uuid NOT NULL,
    user_id     uuid NOT NULL,
    wrapped_key bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, user_id)
);

-- Every deleted tenant, erased user and visitor who deleted their data, replayed after a
-- restore (GR4). Ids and times only.
CREATE TABLE deletion_log (
    id          uuid PRIMARY KEY,
    kind        text NOT NULL CHECK (kind IN ('tenant', 'user', 'visitor')),
    tenant_id   uuid NOT NULL,
    user_id     uuid,
    deleted_at  timestamptz NOT NULL DEFAULT now(),
    CHECK ((kind IN ('user', 'visitor')) = (user_id IS NOT NULL))
);

CREATE INDEX deletion_log_time_idx ON deletion_log (deleted_at);
CREATE INDEX deletion_log_subject_idx ON deletion_log (tenant_id, user_id);
