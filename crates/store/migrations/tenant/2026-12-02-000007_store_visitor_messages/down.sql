DROP FUNCTION store_visitor_messages(uuid[], uuid[], uuid[], bytea[], boolean[], uuid[], text[],
    uuid[], bytea[], boolean[], timestamptz);
