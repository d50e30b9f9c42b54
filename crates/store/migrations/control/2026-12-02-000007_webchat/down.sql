DELETE FROM deletion_log WHERE kind = 'visitor';
ALTER TABLE deletion_log
    DROP CONSTRAINT deletion_log_kind_check,
    DROP CONSTRAINT deletion_log_check,
    ADD CONSTRAINT deletion_log_kind_check CHECK (kind IN ('tenant', 'user')),
    ADD CONSTRAINT deletion_log_check CHECK ((kind = 'user') = (user_id IS NOT NULL));
DROP TABLE widget_routes;
