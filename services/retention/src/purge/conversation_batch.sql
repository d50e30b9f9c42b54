-- One purge batch in a conversation's scope: examines at most $8 of conversation $7's
-- messages between the tenant's cut-off $6 (everything older was done in the tenant's
-- scope) and the conversation's $5, after sequence $9; deletes the unheld ones and their
-- events, raises the conversation's sequence floor, and reports. $1 is the run, $2-$4 its
-- counts before this batch. See `purge.rs` for why it is shaped so.
WITH claim AS (
    -- The run's heartbeat and counts so far; nothing happens unless it is still running.
    UPDATE purge_runs
    SET heartbeat_at = now(), messages_deleted = $2, conversations_touched = $3,
        held_skipped = $4
    WHERE id = $1 AND state = 'running'
    RETURNING id
), candidates AS MATERIALIZED (
    -- Held: in a conversation under hold, or sent by a user under hold.
    SELECT m.ctid AS tid, m.id, m.conversation_id, m.created_at, m.sequence,
           (m.conversation_id IN (SELECT h.conversation_id FROM legal_holds h
                                  WHERE h.lifted_at IS NULL AND h.conversation_id IS NOT NULL)
            OR m.sender_id IN (SELECT h.user_id FROM legal_holds h
                               WHERE h.lifted_at IS NULL AND h.user_id IS NOT NULL)) AS held
    FROM messages m
    WHERE EXISTS (SELECT FROM claim)
      AND m.conversation_id = $7 AND m.sequence > $9 AND m.created_at < $5 AND m.created_at >= $6
    ORDER BY m.sequence
    LIMIT $8
), gone_events AS (
    DELETE FROM events e
    WHERE e.message_id IS NOT NULL
      AND e.message_id = ANY (ARRAY(SELECT id FROM candidates WHERE NOT held))
), gone AS (
    DELETE FROM messages m
    WHERE m.ctid = ANY (ARRAY(SELECT tid FROM candidates WHERE NOT held))
    RETURNING m.conversation_id, m.sequence
), floors AS (
    UPDATE conversations c SET last_sequence = greatest(c.last_sequence,
        (SELECT max(g.sequence) FROM gone g WHERE g.conversation_id = c.id))
    WHERE c.id = ANY (ARRAY(SELECT DISTINCT conversation_id FROM gone))
)
SELECT c.claimed, c.examined, c.held, g.deleted, g.conversations,
       c.last_at, c.last_id, c.last_sequence
FROM (SELECT (SELECT count(*) FROM claim) AS claimed,
             count(*) AS examined,
             count(*) FILTER (WHERE held) AS held,
             (array_agg(created_at ORDER BY created_at DESC, id DESC))[1] AS last_at,
             (array_agg(id ORDER BY created_at DESC, id DESC))[1] AS last_id,
             max(sequence) AS last_sequence
      FROM candidates) c,
     (SELECT count(*) AS deleted, array_agg(DISTINCT conversation_id) AS conversations
      FROM gone) g
