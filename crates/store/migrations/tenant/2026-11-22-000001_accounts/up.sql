-- A tenant's accounts and chat codes. Runs inside the tenant's schema, as the tenant's role
-- (search_path = t_<id>): every object here belongs to the tenant and to nobody else.

-- Accounts: a username and a password inside the tenant; nothing else is asked (OC1).
CREATE TABLE users (
    id            uuid PRIMARY KEY,
    username      text NOT NULL,
    display_name  text NOT NULL,
    -- bcrypt (or an imported argon2id hash until the next login re-hashes it, OC3).
    password_hash text NOT NULL,
    role          text NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
    status        text NOT NULL CHECK (status IN ('active', 'deactivated', 'erased')),
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- Usernames are unique per tenant, compared case-insensitively.
CREATE UNIQUE INDEX users_username_key ON users (lower(username));

-- Chat codes: the per-device second factor (OC2), stored only as a keyed hash.
CREATE TABLE chat_codes (
    id                uuid PRIMARY KEY,
    user_id           uuid NOT NULL REFERENCES users (id),
    device_label      text NOT NULL,
    code_hash         bytea NOT NULL UNIQUE,
    state             text NOT NULL CHECK (state IN ('active', 'revoked', 'wiped')),
    created_at        timestamptz NOT NULL DEFAULT now(),
    last_used_at      timestamptz,
    revoked_at        timestamptz,
    wipe_confirmed_at timestamptz
);

CREATE INDEX chat_codes_user_idx ON chat_codes (user_id);
