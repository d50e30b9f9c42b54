DROP FUNCTION store_messages(uuid[], uuid[], uuid[], uuid[], bytea[], boolean[], integer[], timestamptz, bigint, bigint[], boolean);
