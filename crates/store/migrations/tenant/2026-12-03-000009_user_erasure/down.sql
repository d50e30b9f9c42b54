ALTER TABLE messages DROP COLUMN erased;
