-- Conversations, members, messages and the event log that streams replay (OC7, CB3, CB4,
-- BX4). Message bodies are stored only encrypted (AES-256-GCM under the sender's user key);
-- a deleted message keeps its row, without ciphertext, as a tombstone for ordering.

CREATE TABLE conversations (
    id                uuid PRIMARY KEY,
    kind              text NOT NULL CHECK (kind IN ('direct', 'group', 'channel', 'webchat')),
    title             text NOT NULL,
    creator_id        uuid NOT NULL REFERENCES users (id),
    -- For direct conversations: both user ids, ordered, so a pair has one conversation.
    direct_key        text UNIQUE,
    last_sequence     bigint NOT NULL DEFAULT 0,
    create_request_id uuid,
    created_at        timestamptz NOT NULL,
    updated_at        timestamptz NOT NULL,
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
    conversation_id uuid NOT NULL REFERENCES conversations (id),
    sequence        bigint NOT NULL,
    sender_id       uuid NOT NULL REFERENCES users (id),
    -- Sealed body (version, nonce, ciphertext and tag); NULL once deleted.
    ciphertext      bytea,
    masked          boolean NOT NULL DEFAULT false,
    request_id      uuid,
    created_at      timestamptz NOT NULL,
    edited_at       timestamptz,
    deleted_at      timestamptz,
    UNIQUE (conversation_id, sequence),
    CHECK ((deleted_at IS NULL) = (ciphertext IS NOT NULL))
);

CREATE UNIQUE INDEX messages_request_key
    ON messages (sender_id, request_id) WHERE request_id IS NOT NULL;
-- Retention purges by age (CB5).
CREATE INDEX messages_created_idx ON messages (created_at);

-- Everything a subscriber must see, in commit order: ids come from event_counter, whose row
-- lock every writer holds until it commits, so no event becomes visible after a later one.
CREATE TABLE events (
    id              bigint PRIMARY KEY,
    conversation_id uuid NOT NULL REFERENCES conversations (id),
    kind            text NOT NULL CHECK (kind IN (
        'message_created', 'message_edited', 'message_deleted', 'membership_changed')),
    message_id      uuid,
    -- Membership changes: who was added or removed, and by whom (ids only).
    detail          jsonb,
    created_at      timestamptz NOT NULL
);

CREATE INDEX events_conversation_idx ON events (conversation_id, id);

CREATE TABLE event_counter (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    last_id   bigint NOT NULL
);

INSERT INTO event_counter (last_id) VALUES (0);
