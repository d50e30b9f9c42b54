DROP FUNCTION store_fresh_messages(uuid[], uuid[], uuid[], uuid[], bytea[], boolean[], integer[], timestamptz, bigint, bigint[]);
