DROP INDEX events_message_idx;
DROP TABLE purge_runs;
DROP TABLE legal_holds;
ALTER TABLE conversations DROP COLUMN retention_updated_at, DROP COLUMN retention_days;
