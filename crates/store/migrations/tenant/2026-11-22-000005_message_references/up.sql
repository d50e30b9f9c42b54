-- Messages and events keep their references to conversations and users without a foreign-key
-- check per row. The three checks (messages.conversation_id, messages.sender_id,
-- events.conversation_id) were a third of PostgreSQL's time in a batch of sends (measured:
-- 46 against 32 µs per message), and every writer already holds what they prove:
--
-- - a message is only inserted after a probe of `members` for (conversation, sender) in the
--   same statement, and `members` references both rows with foreign keys;
-- - an event names a conversation its writer has just read or written;
-- - and neither a conversation nor a user is ever deleted, nor its id changed: the triggers
--   below refuse it, so no reference can come to point nowhere. (DROP SCHEMA, which deletes
--   a whole tenant, fires no trigger.)

ALTER TABLE messages
    DROP CONSTRAINT messages_conversation_id_fkey,
    DROP CONSTRAINT messages_sender_id_fkey;
ALTER TABLE events DROP CONSTRAINT events_conversation_id_fkey;

CREATE FUNCTION referenced_rows_stay() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'rows of % are never deleted and keep their id: messages refer to them',
        TG_TABLE_NAME USING ERRCODE = 'restrict_violation';
END
$$;

CREATE TRIGGER conversations_stay BEFORE DELETE OR TRUNCATE OR UPDATE OF id ON conversations
    FOR EACH STATEMENT EXECUTE FUNCTION referenced_rows_stay();
CREATE TRIGGER users_stay BEFORE DELETE OR TRUNCATE OR UPDATE OF id ON users
    FOR EACH STATEMENT EXECUTE FUNCTION referenced_rows_stay();
