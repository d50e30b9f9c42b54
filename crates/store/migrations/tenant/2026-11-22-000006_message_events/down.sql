INSERT INTO events (id, conversation_id, kind, message_id, created_at)
    SELECT event_id, conversation_id, 'message_created', id, created_at
    FROM messages WHERE event_id IS NOT NULL;
DROP INDEX messages_event_key;
ALTER TABLE messages DROP COLUMN event_id;
