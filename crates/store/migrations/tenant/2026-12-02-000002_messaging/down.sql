DROP TRIGGER users_stay ON users;
DROP TRIGGER conversations_stay ON conversations;
DROP FUNCTION referenced_rows_stay();
DROP TABLE event_counter;
DROP TABLE events;
DROP TABLE messages;
DROP TABLE members;
DROP TABLE conversations;
