-- Stores a batch of sends (the messaging service's group commit calls it once per batch, in a
-- transaction of its own; see its `store_messages.sql`). One call is one answer from
-- PostgreSQL, whatever the batch's size: the sends travel as one array per column.
--
-- First the lock on the event counter, which serialises the tenant's writers and keeps event
-- ids in commit order; then one statement, whose snapshot is taken after that lock, so no
-- other writer's sequence or event id can come between. Each stored send becomes a message
-- with the next sequence of its conversation and the next event id (its creation event, kept
-- in the message row), in the order of the arrays; the counter advances with them. A
-- conversation's next sequence follows its newest message, or `conversations.last_sequence`
-- where that is higher (the floor the retention purge leaves). The conversation's row is not
-- written.
--
-- Two ways, chosen by `p_retries`:
--
-- - `false`, the common batch: every send is new and from a member of its conversation, and
--   all are stored or none. The caller numbers them: `p_places` is each send's place among the
--   batch's sends to its conversation (1, 2, …), and its event id follows the counter by its
--   place in the arrays. When a sender is not a member (or the conversation does not exist),
--   nothing is stored and no row is returned; a retry (a sender's request id already stored)
--   fails the call on `messages_request_key`. The caller then calls again with `true`.
--   What the caller knows from its own earlier batches saves probes: `p_counter` is the
--   counter's value its last batch left, `p_floors` each send's conversation's last sequence
--   as of that batch (NULL where it does not know it, or does not know the sender to be a
--   member). Under the counter's lock, `last_id = p_counter` proves that no other writer has
--   committed since: every write that adds a message or changes a membership takes an event
--   id, and an aborted one leaves the counter as it was. Then a known send's sequence follows
--   its floor and its sender is still a member; every other send is probed. The sends of one
--   conversation are all known or all probed (the caller gives them the same floor, or none).
-- - `true`, any batch: a send with the same sender and request id as a stored message (a
--   retry) returns that message instead, a send from a non-member is left out, and the rest
--   are stored, numbered here. `p_places`, `p_counter` and `p_floors` are not used. Here the
--   visitor of a website-chat conversation (`visits.conversation_id`) counts as a member too:
--   the webchat service stores its visitors' messages this way.
--
-- Returns the stored messages and, for retries, the earlier ones (the caller tells them apart
-- by id: a send's new message has the id it was given).
--
-- Every lookup is a `LATERAL … LIMIT 1` subquery, an `ORDER BY` of an index's key `LIMIT 1`,
-- an `EXISTS` on a key or `= ANY`: under the planner settings of `INDEX_PROBES_ONLY`
-- (sequential scans off, generic plans) each is an index probe whatever plan is cached. The
-- caller's session provides those settings and the search path once per connection: as `SET`
-- clauses here they would cost every call.
CREATE FUNCTION store_messages(
    p_ids uuid[],
    p_conversations uuid[],
    p_senders uuid[],
    p_request_ids uuid[],
    p_ciphertexts bytea[],
    p_masked boolean[],
    p_places integer[],
    p_at timestamptz,
    p_counter bigint,
    p_floors bigint[],
    p_retries boolean
) RETURNS SETOF messages
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_known boolean;
BEGIN
    SELECT last_id IS NOT DISTINCT FROM p_counter INTO v_known FROM event_counter FOR UPDATE;
    IF NOT p_retries THEN
        RETURN QUERY
        WITH fresh AS (
            SELECT i.*, CASE WHEN v_known AND i.floor IS NOT NULL THEN i.floor ELSE (
                    SELECT greatest(c.last_sequence, (
                        SELECT m.sequence FROM messages m WHERE m.conversation_id = c.id
                        ORDER BY m.sequence DESC LIMIT 1))
                    FROM conversations c WHERE c.id = i.conversation_id) END + i.place AS sequence
            FROM unnest(p_ids, p_conversations, p_senders, p_request_ids, p_ciphertexts,
                        p_masked, p_places, p_floors) WITH ORDINALITY
                AS i(id, conversation_id, sender_id, request_id, ciphertext, masked, place, floor,
                     position)
            -- A member row means the conversation exists (its foreign key).
            WHERE (v_known AND i.floor IS NOT NULL) OR EXISTS (
                SELECT FROM members b
                WHERE b.conversation_id = i.conversation_id AND b.user_id = i.sender_id)
        ), counted AS (
            UPDATE event_counter SET last_id = last_id + cardinality(p_ids)
            WHERE (SELECT count(*) FROM fresh) = cardinality(p_ids)
            RETURNING last_id - cardinality(p_ids) AS base
        )
        INSERT INTO messages AS n (id, conversation_id, sequence, sender_id, ciphertext, masked,
                                   request_id, created_at, event_id)
        SELECT f.id, f.conversation_id, f.sequence, f.sender_id, f.ciphertext, f.masked,
               f.request_id, p_at, counted.base + f.position
        FROM fresh f, counted
        RETURNING n.*;
        RETURN;
    END IF;

    RETURN QUERY
    WITH input AS (
        SELECT * FROM unnest(p_ids, p_conversations, p_senders, p_request_ids, p_ciphertexts,
                             p_masked) WITH ORDINALITY
            AS i(id, conversation_id, sender_id, request_id, ciphertext, masked, position)
    ), earlier AS (
        SELECT e.m FROM input i CROSS JOIN LATERAL (
            SELECT m FROM messages m
            WHERE m.sender_id = i.sender_id AND m.request_id = i.request_id LIMIT 1) e(m)
    ), fresh AS (
        SELECT i.*,
            c.last_sequence + row_number() OVER (PARTITION BY i.conversation_id ORDER BY i.position)
                AS sequence,
            row_number() OVER (ORDER BY i.position) AS rank
        FROM input i
        CROSS JOIN LATERAL (
            SELECT greatest(c.last_sequence, (
                SELECT m.sequence FROM messages m WHERE m.conversation_id = c.id
                ORDER BY m.sequence DESC LIMIT 1)) AS last_sequence
            FROM conversations c WHERE c.id = i.conversation_id LIMIT 1) c
        WHERE NOT EXISTS (SELECT FROM earlier e
                          WHERE (e.m).sender_id = i.sender_id AND (e.m).request_id = i.request_id)
          AND (EXISTS (SELECT FROM members b
                       WHERE b.conversation_id = i.conversation_id AND b.user_id = i.sender_id)
               OR EXISTS (SELECT FROM visits v
                          WHERE v.id = i.sender_id AND v.conversation_id = i.conversation_id))
    ), counted AS (
        UPDATE event_counter SET last_id = last_id + (SELECT count(*) FROM fresh)
        WHERE EXISTS (SELECT FROM fresh)
        RETURNING last_id - (SELECT count(*) FROM fresh) AS base
    ), inserted AS (
        INSERT INTO messages AS n (id, conversation_id, sequence, sender_id, ciphertext, masked,
                                   request_id, created_at, event_id)
        SELECT f.id, f.conversation_id, f.sequence, f.sender_id, f.ciphertext, f.masked,
               f.request_id, p_at, counted.base + f.rank
        FROM fresh f, counted
        RETURNING n.*
    )
    SELECT * FROM inserted UNION ALL SELECT (e.m).* FROM earlier e;
END
$$;
