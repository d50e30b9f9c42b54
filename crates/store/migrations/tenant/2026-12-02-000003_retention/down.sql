DROP TABLE purge_runs;
DROP TABLE legal_holds;
