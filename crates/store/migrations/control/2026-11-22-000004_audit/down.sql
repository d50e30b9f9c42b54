DROP TABLE audit_heads;
DROP TABLE audit_events;
REVOKE ALL ON outbox FROM hafen_outbox_writer;
REVOKE ALL ON SCHEMA hafen FROM hafen_outbox_writer;
DROP TABLE outbox;
