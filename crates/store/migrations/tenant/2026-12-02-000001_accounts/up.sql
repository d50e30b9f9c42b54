-- A tenant's schema. Every tenant migration runs inside the tenant's schema, as the tenant's
-- role (search_path = t_<id>): every object here belongs to the tenant and to nobody else.
-- There is no deployed tenant yet: this set creates the schema as it is, and a change to it
-- from now on is a migration of its own.

-- Accounts: a username and a password inside the tenant; nothing else is asked (OC1).
CREATE TABLE users (
    id                uuid PRIMARY KEY,
    username          text NOT NULL,
    display_name      text NOT NULL,
    -- bcrypt (or an imported argon2id hash until the next login re-hashes it, OC3).
    password_hash     text NOT NULL,
    role              text NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
    status            text NOT NULL CHECK (status IN ('active', 'deactivated', 'erased')),
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    deactivated_at    timestamptz,
    -- The TOTP second factor, wrapped by a key derived from the master key (never in clear):
    -- the enrolled secret, one awaiting confirmation, and since when it is enrolled.
    totp_secret       bytea,
    totp_pending      bytea,
    totp_enabled_at   timestamptz,
    -- CreateUser's request id: a retry returns the account it created.
    create_request_id uuid UNIQUE,
    -- The time step of the last TOTP code accepted: a code confirms one action only, so the
    -- same code (or an older one) is refused within its window of validity.
    totp_last_step    bigint
);

-- Usernames are unique per tenant, compared case-insensitively; ListUsers pages in that order.
CREATE UNIQUE INDEX users_username_key ON users (lower(username));
CREATE INDEX users_created_idx ON users (lower(username), id);

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
    wipe_confirmed_at timestamptz,
    -- Who issued it (only the owner issues the owner's codes).
    issued_by         uuid REFERENCES users (id)
);

CREATE INDEX chat_codes_user_idx ON chat_codes (user_id);
