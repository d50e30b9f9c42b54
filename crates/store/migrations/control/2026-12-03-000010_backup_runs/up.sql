-- Each `hafen-tenant backup --all` run, so the Art. 30 record states backups only while they
-- really run. Counts and times only.
CREATE TABLE backup_runs (
    id          uuid PRIMARY KEY,
    finished_at timestamptz NOT NULL,
    tenants     integer NOT NULL CHECK (tenants >= 0),
    failed      integer NOT NULL CHECK (failed >= 0),
    keep_days   integer NOT NULL CHECK (keep_days >= 42)
);

CREATE INDEX backup_runs_time_idx ON backup_runs (finished_at);
