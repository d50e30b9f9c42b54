DELETE FROM deletion_log WHERE kind = 'message';
DROP INDEX deletion_log_message_key;
ALTER TABLE deletion_log
    DROP CONSTRAINT deletion_log_message_check,
    DROP CONSTRAINT deletion_log_kind_check,
    ADD CONSTRAINT deletion_log_kind_check CHECK (kind IN ('tenant', 'user', 'visitor')),
    DROP COLUMN message_id;
