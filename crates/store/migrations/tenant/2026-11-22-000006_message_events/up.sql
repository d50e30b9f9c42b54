-- A message's creation is an event of its own: the message row carries that event's id (from
-- event_counter, like every event), and no `message_created` row is written to `events`. A
-- send inserted two rows and updated seven indexes; now one row and five. Streams read the
-- log as the union of `events` and the messages' creation events, by id. Messages stored
-- before this migration keep their `message_created` rows in `events` and no event id here.
ALTER TABLE messages ADD COLUMN event_id bigint;
CREATE UNIQUE INDEX messages_event_key ON messages (event_id) WHERE event_id IS NOT NULL;
