DROP INDEX users_created_idx;
ALTER TABLE chat_codes DROP COLUMN issued_by;
ALTER TABLE users
    DROP COLUMN create_request_id,
    DROP COLUMN totp_enabled_at,
    DROP COLUMN totp_pending,
    DROP COLUMN totp_secret,
    DROP COLUMN deactivated_at;
