//! Conversations and their members.

use std::collections::HashMap;

use diesel::sql_types::{Array, BigInt, Timestamptz, Uuid as SqlUuid};
use hafen_store::prepared::{Statement, bind};
use hafen_store::schema::{conversations, members, users};

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use hafen_store::AsyncPgConnection;
use uuid::Uuid;

use crate::error::Error;
use crate::rows::{ConversationRow, ConversationView, kind};

/// A new conversation row.
pub struct NewConversationRow<'a> {
    pub id: Uuid,
    pub kind: &'a str,
    pub title: &'a str,
    pub creator: Uuid,
    pub direct_key: Option<&'a str>,
    pub request_id: Option<Uuid>,
    pub at: DateTime<Utc>,
}

pub async fn insert_conversation(
    conn: &mut AsyncPgConnection,
    new: NewConversationRow<'_>,
) -> Result<ConversationRow, Error> {
    Ok(diesel::insert_into(conversations::table)
        .values((
            conversations::id.eq(new.id),
            conversations::kind.eq(new.kind),
            conversations::title.eq(new.title),
            conversations::creator_id.eq(new.creator),
            conversations::direct_key.eq(new.direct_key),
            conversations::create_request_id.eq(new.request_id),
            conversations::created_at.eq(new.at),
            conversations::updated_at.eq(new.at),
        ))
        .returning(ConversationRow::as_returning())
        .get_result(conn)
        .await?)
}

pub async fn conversation(
    conn: &mut AsyncPgConnection,
    id: Uuid,
) -> Result<Option<ConversationRow>, Error> {
    Ok(conversations::table
        .find(id)
        .select(ConversationRow::as_select())
        .first(conn)
        .await
        .optional()?)
}

/// The conversation `creator` made with `request_id`.
pub async fn conversation_by_request(
    conn: &mut AsyncPgConnection,
    creator: Uuid,
    request_id: Uuid,
) -> Result<Option<ConversationRow>, Error> {
    Ok(conversations::table
        .filter(conversations::creator_id.eq(creator))
        .filter(conversations::create_request_id.eq(request_id))
        .select(ConversationRow::as_select())
        .first(conn)
        .await
        .optional()?)
}

/// The direct conversation of a pair (its `direct_key`).
pub async fn direct_conversation(
    conn: &mut AsyncPgConnection,
    direct_key: &str,
) -> Result<Option<ConversationRow>, Error> {
    Ok(conversations::table
        .filter(conversations::direct_key.eq(direct_key))
        .select(ConversationRow::as_select())
        .first(conn)
        .await
        .optional()?)
}

/// A page of the conversations `member` belongs to, and every channel, oldest first, after
/// `after` (creation time and id), at most `limit`.
pub async fn conversations_page(
    conn: &mut AsyncPgConnection,
    member: Uuid,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> Result<Vec<ConversationRow>, Error> {
    let mine = members::table
        .filter(members::user_id.eq(member))
        .select(members::conversation_id);
    let mut query = conversations::table
        .filter(
            conversations::id
                .eq_any(mine)
                .or(conversations::kind.eq(kind::CHANNEL)),
        )
        .order((conversations::created_at.asc(), conversations::id.asc()))
        .select(ConversationRow::as_select())
        .limit(limit)
        .into_boxed();
    if let Some((at, id)) = after {
        query = query.filter(
            conversations::created_at
                .gt(at)
                .or(conversations::created_at
                    .eq(at)
                    .and(conversations::id.gt(id))),
        );
    }
    Ok(query.load(conn).await?)
}

/// The newest message of each conversation: its sequence and time.
const NEWEST_MESSAGES: &str = "\
    SELECT c.id AS conversation_id, m.sequence, m.created_at \
    FROM unnest($1::uuid[]) AS c(id) \
    CROSS JOIN LATERAL ( \
        SELECT m.sequence, m.created_at FROM messages m \
        WHERE m.conversation_id = c.id ORDER BY m.sequence DESC LIMIT 1) m";

#[derive(QueryableByName)]
struct Newest {
    #[diesel(sql_type = SqlUuid)]
    conversation_id: Uuid,
    #[diesel(sql_type = BigInt)]
    sequence: i64,
    #[diesel(sql_type = Timestamptz)]
    created_at: DateTime<Utc>,
}

/// `rows` as `me` sees them, in two queries whatever their number. Sends do not write a
/// conversation's row: its last sequence and update time come from its newest message where
/// that is later.
pub async fn conversation_views(
    conn: &mut AsyncPgConnection,
    rows: Vec<ConversationRow>,
    me: Uuid,
) -> Result<Vec<ConversationView>, Error> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Uuid> = rows.iter().map(|row| row.id).collect();
    let newest: Vec<Newest> = Statement::new(NEWEST_MESSAGES, (bind::<Array<SqlUuid>, _>(&ids),))
        .load(conn)
        .await?;
    let newest: HashMap<Uuid, Newest> = newest
        .into_iter()
        .map(|newest| (newest.conversation_id, newest))
        .collect();
    let memberships: Vec<(Uuid, Uuid)> = members::table
        .filter(members::conversation_id.eq_any(&ids))
        .order((members::conversation_id, members::joined_at.asc()))
        .select((members::conversation_id, members::user_id))
        .load(conn)
        .await?;
    let mut members: HashMap<Uuid, Vec<Uuid>> = HashMap::new();
    for (conversation, user) in memberships {
        members.entry(conversation).or_default().push(user);
    }
    Ok(rows
        .into_iter()
        .map(|mut row| {
            if let Some(newest) = newest.get(&row.id) {
                row.last_sequence = row.last_sequence.max(newest.sequence);
                row.updated_at = row.updated_at.max(newest.created_at);
            }
            let members = members.remove(&row.id).unwrap_or_default();
            let caller_is_member = members.contains(&me);
            ConversationView {
                row,
                members,
                caller_is_member,
            }
        })
        .collect())
}

/// `row` as `me` sees it (see [`conversation_views`]).
pub async fn conversation_view(
    conn: &mut AsyncPgConnection,
    row: ConversationRow,
    me: Uuid,
) -> Result<ConversationView, Error> {
    conversation_views(conn, vec![row], me)
        .await?
        .pop()
        .ok_or(Error::Bug("a conversation's view went missing"))
}

/// Marks `conversation` changed at `at` (membership changes; sends do not).
pub async fn touch(
    conn: &mut AsyncPgConnection,
    conversation: Uuid,
    at: DateTime<Utc>,
) -> Result<(), Error> {
    diesel::update(conversations::table.find(conversation))
        .set(conversations::updated_at.eq(at))
        .execute(conn)
        .await?;
    Ok(())
}

pub async fn is_member(
    conn: &mut AsyncPgConnection,
    conversation: Uuid,
    user: Uuid,
) -> Result<bool, Error> {
    Ok(diesel::select(diesel::dsl::exists(
        members::table
            .filter(members::conversation_id.eq(conversation))
            .filter(members::user_id.eq(user)),
    ))
    .get_result(conn)
    .await?)
}

/// The conversations `user` is a member of.
pub async fn memberships(conn: &mut AsyncPgConnection, user: Uuid) -> Result<Vec<Uuid>, Error> {
    Ok(members::table
        .filter(members::user_id.eq(user))
        .select(members::conversation_id)
        .load(conn)
        .await?)
}

/// How many of `ids` are active users.
pub async fn active_users(conn: &mut AsyncPgConnection, ids: &[Uuid]) -> Result<usize, Error> {
    let found: i64 = users::table
        .filter(users::id.eq_any(ids))
        .filter(users::status.eq("active"))
        .count()
        .get_result(conn)
        .await?;
    Ok(usize::try_from(found).unwrap_or_default())
}

/// Inserts member rows, skipping present ones; returns who was new.
pub async fn add_members(
    conn: &mut AsyncPgConnection,
    conversation: Uuid,
    users: &[Uuid],
    at: DateTime<Utc>,
) -> Result<Vec<Uuid>, Error> {
    let rows: Vec<_> = users
        .iter()
        .map(|user| {
            (
                members::conversation_id.eq(conversation),
                members::user_id.eq(*user),
                members::joined_at.eq(at),
            )
        })
        .collect();
    Ok(diesel::insert_into(members::table)
        .values(rows)
        .on_conflict_do_nothing()
        .returning(members::user_id)
        .get_results(conn)
        .await?)
}

/// Removes `user` from `conversation`; whether they were a member.
pub async fn remove_member(
    conn: &mut AsyncPgConnection,
    conversation: Uuid,
    user: Uuid,
) -> Result<bool, Error> {
    let removed = diesel::delete(
        members::table
            .filter(members::conversation_id.eq(conversation))
            .filter(members::user_id.eq(user)),
    )
    .execute(conn)
    .await?;
    Ok(removed == 1)
}
