DROP INDEX visits_identity_idx;
ALTER TABLE visits DROP COLUMN identity_sha256;
ALTER TABLE widgets DROP COLUMN identity_secret_sealed;
