DROP FUNCTION store_messages(uuid[], uuid[], uuid[], uuid[], bytea[], boolean[], timestamptz, boolean);
