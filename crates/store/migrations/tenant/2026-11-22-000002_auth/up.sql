-- What the auth service keeps per account: deactivation time, the TOTP second factor
-- (wrapped by a key derived from the master key, never in clear), idempotent creation, and
-- who issued each chat code.
ALTER TABLE users
    ADD COLUMN deactivated_at timestamptz,
    ADD COLUMN totp_secret bytea,
    ADD COLUMN totp_pending bytea,
    ADD COLUMN totp_enabled_at timestamptz,
    ADD COLUMN create_request_id uuid UNIQUE;

ALTER TABLE chat_codes
    ADD COLUMN issued_by uuid REFERENCES users (id);

CREATE INDEX users_created_idx ON users (lower(username), id);
