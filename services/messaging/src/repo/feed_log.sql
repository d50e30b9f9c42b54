-- The tenant's log after the cursor $1, of the conversations user $2 is a member of (or of
-- all when $2 is NULL), in id order, at most $3 events. The log is the union of `events` and
-- the messages' creation events, which the message rows carry (`messages.event_id`). Each
-- side is read by its own index from the cursor on, at most $3 of it. Under the `OR`, the
-- membership check stays a subquery on the member's key: an index probe of their
-- memberships, whatever plan is cached.
SELECT * FROM (
    (SELECT e.id, e.conversation_id, e.kind, e.message_id, e.detail, e.created_at
     FROM events e
     WHERE e.id > $1
       AND ($2::uuid IS NULL OR EXISTS (
           SELECT FROM members b WHERE b.conversation_id = e.conversation_id AND b.user_id = $2))
     ORDER BY e.id
     LIMIT $3)
    UNION ALL
    (SELECT m.event_id, m.conversation_id, 'message_created', m.id, NULL::jsonb, m.created_at
     FROM messages m
     WHERE m.event_id > $1
       AND ($2::uuid IS NULL OR EXISTS (
           SELECT FROM members b WHERE b.conversation_id = m.conversation_id AND b.user_id = $2))
     ORDER BY m.event_id
     LIMIT $3)
) log
ORDER BY id
LIMIT $3
