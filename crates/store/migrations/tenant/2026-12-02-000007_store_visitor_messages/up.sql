-- Stores a batch of website visitors' messages (the webchat service's group commit calls it
-- once per batch, in a transaction of its own, as the messaging service calls
-- `store_messages`): the checks every visitor message needs, for the whole batch, and the
-- store, in one call.
--
-- First the lock on the event counter, which `store_messages` takes too: whatever changes
-- what the checks read (a visit's consent answers, fields and end: GiveConsent, DeleteMyData)
-- takes that lock before it commits, so the checks, each statement with a snapshot taken
-- after the lock, see every such change committed before the batch, and none can commit
-- until the batch has. No visit's row is locked (a row lock is a write of its page).
-- Then every send is checked: its visit's token hash is the one in `p_hashes` (the token is
-- good) and the visit has not expired; its chat is the conversation the message was sealed
-- for; where `p_consent` says the widget needs it, the visit's latest consent answer grants
-- the widget's current text; and the visit has every required pre-chat field (one pair of
-- `p_required_visits` and `p_required_keys` per required field of a send's widget). When
-- every send passes, all are stored by `store_messages(…, p_retries => true)`, where a
-- visitor counts as a member of their visit's chat and a retry returns the first message.
-- When one does not, nothing is stored and no row is returned: the caller then sends each
-- alone and learns why one was refused.
--
-- Every lookup is an index probe under `INDEX_PROBES_ONLY` (see `store_messages`).
CREATE FUNCTION store_visitor_messages(
    p_ids uuid[],
    p_conversations uuid[],
    p_visits uuid[],
    p_hashes bytea[],
    p_consent boolean[],
    p_required_visits uuid[],
    p_required_keys text[],
    p_request_ids uuid[],
    p_ciphertexts bytea[],
    p_masked boolean[],
    p_at timestamptz
) RETURNS SETOF messages
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    PERFORM FROM event_counter FOR UPDATE;
    IF EXISTS (
        SELECT FROM unnest(p_visits, p_hashes, p_conversations, p_consent)
            AS i(visit, hash, conversation, consent)
        WHERE NOT EXISTS (
            SELECT FROM visits v
            WHERE v.id = i.visit AND v.token_sha256 = i.hash AND v.expires_at > now()
              AND v.conversation_id = i.conversation
              AND (NOT i.consent OR coalesce((
                  SELECT c.granted AND c.version = (
                      SELECT t.version FROM consent_texts t WHERE t.widget_id = v.widget_id
                      ORDER BY t.version DESC LIMIT 1)
                  FROM consent_records c WHERE c.visit_id = v.id
                  ORDER BY c.decided_at DESC, c.id DESC LIMIT 1), false)))
    ) OR EXISTS (
        SELECT FROM unnest(p_required_visits, p_required_keys) AS r(visit, key)
        WHERE NOT EXISTS (
            SELECT FROM visit_fields f WHERE f.visit_id = r.visit AND f.key = r.key)
    ) THEN
        RETURN;
    END IF;
    RETURN QUERY SELECT * FROM store_messages(p_ids, p_conversations, p_visits, p_request_ids,
        p_ciphertexts, p_masked, NULL, p_at, NULL, NULL, true);
END
$$;
