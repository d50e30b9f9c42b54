-- The website chat (CB1, CB2, CB7, CB8, UL3): widgets, their consent texts, visits and what
-- visitors chose to give. No IP address, user agent or referrer is stored anywhere.

-- A widget the tenant embeds in its website. `settings` holds what the widget renders (origins,
-- privacy-policy URL, pre-chat fields, texts, business hours), as WidgetSettings describes it.
CREATE TABLE widgets (
    id                  uuid PRIMARY KEY,
    enabled             boolean NOT NULL DEFAULT false,
    settings            jsonb NOT NULL,
    -- How long a visit lives after its last use.
    visit_lifetime_days integer NOT NULL CHECK (visit_lifetime_days BETWEEN 1 AND 730),
    create_request_id   uuid UNIQUE,
    created_by          uuid NOT NULL REFERENCES users (id),
    created_at          timestamptz NOT NULL,
    updated_at          timestamptz NOT NULL
);

-- Consent texts, one row per version: a new text is a new version, and old versions stay so
-- every answer names the text it answered.
CREATE TABLE consent_texts (
    widget_id   uuid NOT NULL REFERENCES widgets (id),
    version     integer NOT NULL CHECK (version > 0),
    text        text NOT NULL,
    text_sha256 bytea NOT NULL CHECK (length(text_sha256) = 32),
    created_at  timestamptz NOT NULL,
    PRIMARY KEY (widget_id, version)
);

-- A visit: an anonymous visitor of one widget. The visitor token is stored only as its
-- SHA-256; the visitor's data key (which encrypts their field values) is kept with the users'
-- keys, under the visit's id.
CREATE TABLE visits (
    id              uuid PRIMARY KEY,
    widget_id       uuid NOT NULL REFERENCES widgets (id),
    token_sha256    bytea NOT NULL UNIQUE CHECK (length(token_sha256) = 32),
    created_at      timestamptz NOT NULL,
    last_seen_at    timestamptz NOT NULL,
    expires_at      timestamptz NOT NULL,
    -- The visit's chat (a conversation of kind webchat, its agent the one member) and the agent
    -- it was routed to; set with the visitor's first message. The visitor sends into it as the
    -- sender `id` (store_messages counts them as a member).
    conversation_id uuid UNIQUE REFERENCES conversations (id),
    agent_id        uuid REFERENCES users (id)
);

CREATE INDEX visits_expires_idx ON visits (expires_at);
-- Routing counts each agent's open chats.
CREATE INDEX visits_agent_idx ON visits (agent_id, expires_at) WHERE agent_id IS NOT NULL;

-- Every answer to a consent text: the version and the hash of the text answered, granted or
-- declined, and when. The latest answer of a visit counts. The answers outlive their visit
-- when the visitor deletes their data (no foreign key): Art. 7(1) GDPR requires showing that
-- consent was asked and given, and they hold nothing personal. They go with the tenant's
-- retention period.
CREATE TABLE consent_records (
    id          uuid PRIMARY KEY,
    visit_id    uuid NOT NULL,
    version     integer NOT NULL,
    text_sha256 bytea NOT NULL CHECK (length(text_sha256) = 32),
    granted     boolean NOT NULL,
    decided_at  timestamptz NOT NULL
);

CREATE INDEX consent_records_visit_idx ON consent_records (visit_id, decided_at);

-- Pre-chat field values a visitor gave, sealed with AES-256-GCM under the visitor's key (the
-- visit and the field's key as associated data). `released_at`: when the visitor released a
-- personal field (UL3); NULL for fields that are not personal.
CREATE TABLE visit_fields (
    visit_id    uuid NOT NULL REFERENCES visits (id),
    key         text NOT NULL,
    sealed      bytea NOT NULL,
    personal    boolean NOT NULL,
    released_at timestamptz,
    updated_at  timestamptz NOT NULL,
    PRIMARY KEY (visit_id, key),
    CHECK (personal = (released_at IS NOT NULL))
);
