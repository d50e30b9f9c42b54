-- A message deleted by its sender or an admin (CB4) is in the deletion log too, by id, so a
-- restore of a backup taken before cannot bring its body back.
ALTER TABLE deletion_log
    ADD COLUMN message_id uuid,
    DROP CONSTRAINT deletion_log_kind_check,
    ADD CONSTRAINT deletion_log_kind_check
        CHECK (kind IN ('tenant', 'user', 'visitor', 'message')),
    ADD CONSTRAINT deletion_log_message_check CHECK ((kind = 'message') = (message_id IS NOT NULL));

CREATE UNIQUE INDEX deletion_log_message_key ON deletion_log (message_id) WHERE kind = 'message';
