DROP TRIGGER users_stay ON users;
DROP TRIGGER conversations_stay ON conversations;
DROP FUNCTION referenced_rows_stay();
ALTER TABLE events
    ADD CONSTRAINT events_conversation_id_fkey
    FOREIGN KEY (conversation_id) REFERENCES conversations (id);
ALTER TABLE messages
    ADD CONSTRAINT messages_sender_id_fkey FOREIGN KEY (sender_id) REFERENCES users (id),
    ADD CONSTRAINT messages_conversation_id_fkey
    FOREIGN KEY (conversation_id) REFERENCES conversations (id);
