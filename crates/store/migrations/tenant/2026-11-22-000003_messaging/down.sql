DROP TABLE event_counter;
DROP TABLE events;
DROP TABLE messages;
DROP TABLE members;
DROP TABLE conversations;
