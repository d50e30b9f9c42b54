//! Self-service in the chat (CB9): a visitor sees, corrects, exports and deletes what is
//! stored about their visit, each audited with ids only.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use hafen_events::{Actor, Event};
use hafen_proto::webchat::v1 as pb;
use hafen_store::schema::{consent_records, messages, visit_fields, visits};
use hafen_store::{AsyncPgConnection, now};
use uuid::Uuid;

use crate::Service;
use crate::error::Error;
use crate::visits::{ConsentRow, Visitor, field_context};

/// A field as stored.
#[derive(Queryable)]
struct FieldRow {
    key: String,
    sealed: Vec<u8>,
    personal: bool,
    released_at: Option<DateTime<Utc>>,
}

/// What a visit holds, opened.
struct Held {
    created_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
    fields: Vec<(FieldRow, String)>,
    consents: Vec<ConsentRow>,
    messages: Vec<pb::VisitMessage>,
}

fn visitor_event(visitor: &Visitor, action: &'static str) -> Event {
    Event::new(Some(visitor.tenant), Actor::Service(crate::NAME), action)
        .target("visit", visitor.visit.id)
        .attribute("widget_id", visitor.widget.row.id)
}

impl Held {
    fn to_proto(&self, visit: Uuid) -> pb::MyData {
        pb::MyData {
            visit_id: visit.to_string(),
            create_time: Some(hafen_platform::timestamp(self.created_at)),
            expire_time: Some(hafen_platform::timestamp(self.expires_at)),
            fields: self
                .fields
                .iter()
                .map(|(row, value)| pb::FieldValue {
                    key: row.key.clone(),
                    value: value.clone(),
                    released: row.released_at.is_some(),
                })
                .collect(),
            consent_records: self.consents.iter().map(ConsentRow::to_proto).collect(),
            messages: self.messages.clone(),
        }
    }
}

impl Service {
    /// Reads what `visitor`'s visit holds and records `action` in the same transaction.
    async fn held(&self, visitor: &Visitor, action: &'static str) -> Result<Held, Error> {
        let visit = visitor.visit.id;
        let event = visitor_event(visitor, action);
        let (created_at, expires_at, rows, consents) = self
            .scoped(visitor.tenant, move |conn| {
                Box::pin(async move {
                    let (created_at, expires_at): (DateTime<Utc>, DateTime<Utc>) = visits::table
                        .find(visit)
                        .select((visits::created_at, visits::expires_at))
                        .first(conn)
                        .await?;
                    let rows: Vec<FieldRow> = visit_fields::table
                        .filter(visit_fields::visit_id.eq(visit))
                        .order(visit_fields::key.asc())
                        .select((
                            visit_fields::key,
                            visit_fields::sealed,
                            visit_fields::personal,
                            visit_fields::released_at,
                        ))
                        .load(conn)
                        .await?;
                    let consents = consents(conn, visit).await?;
                    hafen_events::record(conn, &event).await?;
                    Ok((created_at, expires_at, rows, consents))
                })
            })
            .await?;
        self.audited();
        let key = self.keys.user_key(visitor.tenant, visit).await?;
        let mut fields = Vec::with_capacity(rows.len());
        for row in rows {
            let value = crate::chat::open_text(&key, &field_context(visit, &row.key), &row.sealed)?;
            fields.push((row, value));
        }
        let messages = self.transcript(visitor).await?;
        Ok(Held {
            created_at,
            expires_at,
            fields,
            consents,
            messages,
        })
    }

    /// GetMyData.
    pub async fn my_data(&self, visitor: &Visitor) -> Result<pb::MyData, Error> {
        let held = self.held(visitor, "webchat.visitor.data_read").await?;
        Ok(held.to_proto(visitor.visit.id))
    }

    /// CorrectMyData: SubmitFields for fields the visit holds already.
    pub async fn correct_my_data(
        &self,
        visitor: &Visitor,
        request: pb::CorrectMyDataRequest,
    ) -> Result<pb::MyData, Error> {
        self.store_fields(visitor, request.fields, true).await?;
        let held = self.held(visitor, "webchat.visitor.data_corrected").await?;
        Ok(held.to_proto(visitor.visit.id))
    }

    /// ExportMyData.
    pub async fn export_my_data(
        &self,
        visitor: &Visitor,
    ) -> Result<pb::ExportMyDataResponse, Error> {
        let held = self.held(visitor, "webchat.visitor.data_exported").await?;
        let visit = visitor.visit.id;
        let document = serde_json::json!({
            "visit_id": visit,
            "created_at": held.created_at.to_rfc3339(),
            "expires_at": held.expires_at.to_rfc3339(),
            "fields": held.fields.iter().map(|(row, value)| serde_json::json!({
                "key": row.key,
                "value": value,
                "personal": row.personal,
                "released_at": row.released_at.map(|at| at.to_rfc3339()),
            })).collect::<Vec<_>>(),
            "consent_records": held.consents.iter().map(|c| serde_json::json!({
                "version": c.version,
                "text_sha256": hex_of(&c.text_sha256),
                "granted": c.granted,
                "decided_at": c.decided_at.to_rfc3339(),
                "language": c.language,
            })).collect::<Vec<_>>(),
            "messages": held.messages.iter().map(|m| serde_json::json!({
                "message_id": m.message_id,
                "from": if m.from_visitor { "visitor" } else { "agent" },
                "body": m.body,
                "masked": m.masked,
                "sent_at": m.create_time.as_ref().map(rfc3339),
                "edited_at": m.edit_time.as_ref().map(rfc3339),
                "deleted_at": m.delete_time.as_ref().map(rfc3339),
            })).collect::<Vec<_>>(),
            "exported_at": now().to_rfc3339(),
        });
        let json = serde_json::to_string_pretty(&document)
            .map_err(|_| Error::Bug("an export does not serialise"))?;
        Ok(pb::ExportMyDataResponse {
            json,
            file_name: format!("hafen-visit-{visit}.json"),
        })
    }

    /// DeleteMyData, in three steps, each leaving nothing a later one needs undone: the
    /// visit ends (its token dies; refused while a legal hold keeps its chat), then the key is
    /// destroyed with its deletion-log entry, then the rows go (the visitor's messages stay as
    /// tombstones in the agent's conversation). Should the last step fail, the visit is
    /// expired: the next purge removes what is left, unreadable meanwhile.
    pub async fn delete_my_data(
        &self,
        visitor: &Visitor,
    ) -> Result<pb::DeleteMyDataResponse, Error> {
        let (tenant, visit) = (visitor.tenant, visitor.visit.id);
        let at = now();
        self.scoped(tenant, move |conn| {
            Box::pin(async move {
                let conversation: Option<Uuid> = visits::table
                    .find(visit)
                    .select(visits::conversation_id)
                    .for_update()
                    .first(conn)
                    .await?;
                if let Some(conversation) = conversation
                    && crate::chat::held(conn, conversation).await?
                {
                    return Err(Error::LegalHold);
                }
                crate::visits::hold_sends(conn).await?;
                diesel::update(visits::table.find(visit))
                    .set(visits::expires_at.eq(at))
                    .execute(conn)
                    .await?;
                Ok(())
            })
        })
        .await?;
        {
            let mut conn = self.databases.keystore_connection().await?;
            hafen_store::erasure::destroy_key(
                &mut conn,
                hafen_store::erasure::Subject::Visitor,
                tenant,
                visit,
                at,
            )
            .await?;
        }
        self.keys.forget_user(tenant, visit);
        let event = visitor_event(visitor, "webchat.visitor.data_deleted");
        self.scoped(tenant, move |conn| {
            Box::pin(async move {
                // The visit first, then (with the tombstones' events) the event counter: the
                // order every change of a visit takes them in.
                crate::visits::lock_visit_if_there(conn, visit).await?;
                diesel::delete(visit_fields::table.filter(visit_fields::visit_id.eq(visit)))
                    .execute(conn)
                    .await?;
                // The visitor's messages become tombstones, each a deletion in the log, so
                // the agent's streams show them gone.
                let gone: Vec<(Uuid, Uuid)> = diesel::update(
                    messages::table
                        .filter(messages::sender_id.eq(visit))
                        .filter(messages::deleted_at.is_null()),
                )
                .set((
                    messages::ciphertext.eq(None::<Vec<u8>>),
                    messages::deleted_at.eq(Some(now())),
                ))
                .returning((messages::id, messages::conversation_id))
                .get_results(conn)
                .await?;
                for (message, conversation) in gone {
                    crate::chat::append_event(
                        conn,
                        conversation,
                        "message_deleted",
                        Some(message),
                        None,
                    )
                    .await?;
                }
                diesel::delete(visits::table.find(visit))
                    .execute(conn)
                    .await?;
                hafen_events::record(conn, &event).await?;
                Ok(())
            })
        })
        .await?;
        self.audited();
        tracing::info!(tenant_id = %tenant, visit_id = %visit, "visitor deleted their data");
        Ok(pb::DeleteMyDataResponse {
            delete_time: Some(hafen_platform::timestamp(at)),
        })
    }
}

/// Every consent answer of `visit`, oldest first.
async fn consents(conn: &mut AsyncPgConnection, visit: Uuid) -> Result<Vec<ConsentRow>, Error> {
    Ok(consent_records::table
        .filter(consent_records::visit_id.eq(visit))
        .order((consent_records::decided_at.asc(), consent_records::id.asc()))
        .select(ConsentRow::as_select())
        .load(conn)
        .await?)
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A protobuf time as RFC 3339, for the export.
fn rfc3339(time: &prost_types::Timestamp) -> String {
    DateTime::<Utc>::from_timestamp(time.seconds, u32::try_from(time.nanos).unwrap_or(0))
        .map(|t| t.to_rfc3339())
        .unwrap_or_default()
}
