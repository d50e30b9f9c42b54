-- Conversations, members, messages and the event log that streams replay (OC7, CB3, CB4,
-- BX4). Message bodies are stored only encrypted (AES-256-GCM under the sender's user key);
-- a deleted message keeps its row, without ciphertext, as a tombstone for ordering.
--
-- The event log. Everything a subscriber must see has an event id from `event_counter`,
-- whose row lock every writer holds until it commits, so ids follow commit order and no event
-- becomes visible after a later one. A message's creation is an event kept in the message row
-- itself (`messages.event_id`): a send writes one row. Edits, deletions and membership changes
-- are rows of `events`. A stream replays the union of both, by id (see the messaging service's
-- `feed_events.sql`).
--
-- References without foreign keys. `messages.conversation_id`, `messages.sender_id` and
-- `events.conversation_id` are not checked row by row (a third of PostgreSQL's time in a batch
-- of sends): every writer already holds what such a check would prove. A message is inserted
-- only after a probe of `members` for its conversation and sender in the same statement, and
-- `members` references both with foreign keys; an event names a conversation its writer has
-- just read or written; and conversations and users are never deleted nor their ids changed
-- (the triggers at the end refuse it; DROP SCHEMA, which deletes a whole tenant, fires none).

CREATE TABLE conversations (
    id                   uuid PRIMARY KEY,
    kind                 text NOT NULL CHECK (kind IN ('direct', 'group', 'channel', 'webchat')),
    title                text NOT NULL,
    creator_id           uuid NOT NULL REFERENCES users (id),
    -- For direct conversations: both user ids, ordered, so a pair has one conversation.
    direct_key           text UNIQUE,
    -- A floor under the next sequence: the retention purge raises it when it removes a
    -- conversation's newest messages, so no sequence is given twice. Sends do not write this
    -- row; the last sequence is the higher of this and the newest message's.
    last_sequence        bigint NOT NULL DEFAULT 0,
    create_request_id    uuid,
    created_at           timestamptz NOT NULL,
    -- The last change other than a send.
    updated_at           timestamptz NOT NULL,
    -- The conversation's own retention period, shorter than the tenant's (CB5).
    retention_days       integer CHECK (retention_days BETWEEN 1 AND 730),
    retention_updated_at timestamptz,
    CHECK ((kind = 'direct') = (direct_key IS NOT NULL))
);

CREATE UNIQUE INDEX conversations_request_key
    ON conversations (creator_id, create_request_id) WHERE create_request_id IS NOT NULL;
CREATE INDEX conversations_channels_idx ON conversations (created_at, id) WHERE kind = 'channel';

CREATE TABLE members (
    conversation_id uuid NOT NULL REFERENCES conversations (id),
    user_id         uuid NOT NULL REFERENCES users (id),
    joined_at       timestamptz NOT NULL,
    PRIMARY KEY (conversation_id, user_id)
);

CREATE INDEX members_user_idx ON members (user_id, conversation_id);

CREATE TABLE messages (
    id              uuid PRIMARY KEY,
    conversation_id uuid NOT NULL,
    sequence        bigint NOT NULL,
    sender_id       uuid NOT NULL,
    -- Sealed body (version, nonce, ciphertext and tag); NULL once deleted.
    ciphertext      bytea,
    masked          boolean NOT NULL DEFAULT false,
    request_id      uuid,
    created_at      timestamptz NOT NULL,
    edited_at       timestamptz,
    deleted_at      timestamptz,
    -- The id of the message's creation event.
    event_id        bigint NOT NULL,
    UNIQUE (conversation_id, sequence),
    CHECK ((deleted_at IS NULL) = (ciphertext IS NOT NULL))
);

CREATE UNIQUE INDEX messages_request_key
    ON messages (sender_id, request_id) WHERE request_id IS NOT NULL;
-- Retention purges by age (CB5).
CREATE INDEX messages_created_idx ON messages (created_at);
CREATE UNIQUE INDEX messages_event_key ON messages (event_id);

CREATE TABLE events (
    id              bigint PRIMARY KEY,
    conversation_id uuid NOT NULL,
    kind            text NOT NULL CHECK (kind IN (
        'message_edited', 'message_deleted', 'membership_changed')),
    message_id      uuid,
    -- Membership changes: who was added or removed, and by whom (ids only).
    detail          jsonb,
    created_at      timestamptz NOT NULL
);

CREATE INDEX events_conversation_idx ON events (conversation_id, id);
-- The purge removes a message's events with it.
CREATE INDEX events_message_idx ON events (message_id) WHERE message_id IS NOT NULL;

CREATE TABLE event_counter (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    last_id   bigint NOT NULL
);

INSERT INTO event_counter (last_id) VALUES (0);

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
