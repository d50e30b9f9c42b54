//! Retention policies and legal holds (CB5, TM6): the tenant's period (the tenant setting
//! `retention_days` in the control plane, the same value UpdateTenantSettings writes), a
//! conversation's own shorter period, and holds on conversations and users that keep their
//! messages from being purged. Every change is audited in the transaction that makes it.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncConnection as _, RunQueryDsl};
use futures::future::BoxFuture;
use hafen_authn::Principal;
use hafen_events::{Actor, Event, Relay};
use hafen_store::control::{self, status};
use hafen_store::schema::{conversations, legal_holds, members, tenants, users};
use hafen_store::settings::{MAX_RETENTION_DAYS, Settings};
use hafen_store::{AsyncPgConnection, Databases, TenantId, now};
use uuid::Uuid;

use crate::error::Error;
use crate::rows::LegalHoldRow;

/// Kind of the conversations every user of the tenant may see.
const CHANNEL: &str = "channel";
const WEBCHAT: &str = "webchat";

/// A validated tenant retention period: 1 to [`MAX_RETENTION_DAYS`] days.
pub fn tenant_days(days: i32) -> Result<u32, Error> {
    match u32::try_from(days) {
        Ok(days) if days > MAX_RETENTION_DAYS => Err(Error::RetentionTooLong {
            field: "retention_days",
            max_days: MAX_RETENTION_DAYS,
        }),
        Ok(days) if days >= 1 => Ok(days),
        _ => Err(Error::invalid("retention_days", "must be at least 1 day")),
    }
}

/// A validated conversation period: `None` (0, cleared) or 1 to `tenant` days.
pub fn conversation_days(days: i32, tenant: u32) -> Result<Option<u32>, Error> {
    let days = u32::try_from(days)
        .map_err(|_| Error::invalid("retention_days", "must not be negative"))?;
    if days == 0 {
        Ok(None)
    } else if days > tenant {
        Err(Error::RetentionTooLong {
            field: "retention_days",
            max_days: tenant,
        })
    } else {
        Ok(Some(days))
    }
}

/// A legal hold's reason label: 1-64 characters of `a-z`, `0-9`, `.`, `_`, `-` (no free
/// text, so no personal data ends up in it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReasonCode(String);

impl ReasonCode {
    /// Parses a reason label.
    pub fn parse(value: &str) -> Result<Self, Error> {
        let ok = (1..=64).contains(&value.len())
            && value.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
            });
        if ok {
            Ok(Self(value.to_owned()))
        } else {
            Err(Error::invalid(
                "reason_code",
                "1-64 characters of a-z, 0-9, '.', '_' and '-'",
            ))
        }
    }

    /// The label.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What a legal hold applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldTarget {
    /// Every message of a conversation.
    Conversation(Uuid),
    /// Every message a user sent.
    User(Uuid),
}

impl HoldTarget {
    fn columns(self) -> (Option<Uuid>, Option<Uuid>) {
        match self {
            HoldTarget::Conversation(id) => (Some(id), None),
            HoldTarget::User(id) => (None, Some(id)),
        }
    }

    fn kind(self) -> &'static str {
        match self {
            HoldTarget::Conversation(_) => "conversation",
            HoldTarget::User(_) => "user",
        }
    }

    fn id(self) -> Uuid {
        match self {
            HoldTarget::Conversation(id) | HoldTarget::User(id) => id,
        }
    }
}

/// The policy in force for the tenant or one conversation.
#[derive(Debug, Clone)]
pub struct PolicyView {
    /// The tenant's period.
    pub tenant_days: u32,
    /// The conversation's own period, if one was asked for and has one.
    pub conversation_days: Option<u32>,
    /// Holds in force (empty for members).
    pub holds: Vec<LegalHoldRow>,
}

impl PolicyView {
    /// The period that applies: the conversation's, capped to the tenant's.
    pub fn effective_days(&self) -> u32 {
        effective(self.conversation_days, self.tenant_days)
    }
}

/// The tenant's period and when the tenant's settings last changed.
#[derive(Debug, Clone)]
pub struct TenantPolicyView {
    /// The period in days.
    pub days: u32,
    /// When the settings last changed.
    pub updated_at: DateTime<Utc>,
}

/// A conversation's setting.
#[derive(Debug, Clone)]
pub struct ConversationPolicyView {
    /// The conversation.
    pub conversation_id: Uuid,
    /// Its own period; `None` when the tenant's applies.
    pub days: Option<u32>,
    /// The tenant's period.
    pub tenant_days: u32,
    /// When the setting last changed.
    pub updated_at: Option<DateTime<Utc>>,
}

impl ConversationPolicyView {
    /// The period that applies now.
    pub fn effective_days(&self) -> u32 {
        effective(self.days, self.tenant_days)
    }
}

/// A hold target and its current (or latest) hold, if it ever had one.
#[derive(Debug, Clone)]
pub struct HoldView {
    /// What was asked about.
    pub target: HoldTarget,
    /// The active hold, or the latest lifted one.
    pub row: Option<LegalHoldRow>,
}

fn effective(conversation: Option<u32>, tenant: u32) -> u32 {
    conversation.map_or(tenant, |days| days.min(tenant))
}

/// The tenant's retention period as stored in its settings, clamped to the valid range.
pub async fn tenant_period(databases: &Databases, tenant: Uuid) -> Result<u32, Error> {
    let mut conn = databases.main_connection().await?;
    let row = control::find(&mut conn, tenant)
        .await?
        .filter(|row| row.status == status::ACTIVE)
        .ok_or(Error::Store(hafen_store::Error::UnknownTenant))?;
    Ok(period_of(&row.settings))
}

fn period_of(settings: &serde_json::Value) -> u32 {
    Settings::from_json(settings)
        .retention_days
        .clamp(1, MAX_RETENTION_DAYS)
}

/// Policies and holds of every tenant.
#[derive(Clone)]
pub struct Policies {
    databases: Databases,
    relay: Option<Relay>,
}

impl std::fmt::Debug for Policies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policies").finish_non_exhaustive()
    }
}

impl Policies {
    /// Policies over `databases`; `relay` is woken after audited changes.
    pub fn new(databases: Databases, relay: Option<Relay>) -> Self {
        Self { databases, relay }
    }

    fn audited(&self) {
        if let Some(relay) = &self.relay {
            relay.wake();
        }
    }

    /// Runs `f` in `tenant`'s scope.
    async fn scoped<R, F>(&self, tenant: Uuid, f: F) -> Result<R, Error>
    where
        F: for<'c> FnOnce(&'c mut AsyncPgConnection) -> BoxFuture<'c, Result<R, Error>>,
    {
        let tenant = TenantId::from(tenant);
        let pool = self.databases.tenant_pool(&tenant).await?;
        hafen_store::with_tenant(&pool, &tenant, f).await
    }

    /// The policy for the caller's tenant, or for one conversation the caller can see.
    pub async fn get(
        &self,
        caller: &Principal,
        conversation: Option<Uuid>,
    ) -> Result<PolicyView, Error> {
        let tenant_days = tenant_period(&self.databases, caller.tenant_id).await?;
        let me = caller.user_id;
        let admin = caller.role.is_admin();
        self.scoped(caller.tenant_id, move |conn| {
            Box::pin(async move {
                let Some(conversation) = conversation else {
                    let holds = if admin {
                        legal_holds::table
                            .filter(legal_holds::lifted_at.is_null())
                            .order((legal_holds::set_at.asc(), legal_holds::id.asc()))
                            .select(LegalHoldRow::as_select())
                            .load(conn)
                            .await?
                    } else {
                        Vec::new()
                    };
                    return Ok(PolicyView {
                        tenant_days,
                        conversation_days: None,
                        holds,
                    });
                };
                let (days, _) = visible_conversation(conn, conversation, me, admin).await?;
                let holds = if admin {
                    let members_of = members::table
                        .filter(members::conversation_id.eq(conversation))
                        .select(members::user_id);
                    legal_holds::table
                        .filter(legal_holds::lifted_at.is_null())
                        .filter(
                            legal_holds::conversation_id
                                .eq(conversation)
                                .or(legal_holds::user_id
                                    .nullable()
                                    .eq_any(members_of.nullable())),
                        )
                        .order((legal_holds::set_at.asc(), legal_holds::id.asc()))
                        .select(LegalHoldRow::as_select())
                        .load(conn)
                        .await?
                } else {
                    Vec::new()
                };
                Ok(PolicyView {
                    tenant_days,
                    conversation_days: days,
                    holds,
                })
            })
        })
        .await
    }

    /// Sets the tenant's period (the tenant setting `retention_days`), audited in the same
    /// transaction. Setting the current value again changes nothing.
    pub async fn set_tenant(
        &self,
        caller: &Principal,
        days: i32,
    ) -> Result<TenantPolicyView, Error> {
        if !caller.role.is_admin() {
            return Err(Error::admins_only(
                "only admins and the owner set the retention policy",
            ));
        }
        let days = tenant_days(days)?;
        let tenant = caller.tenant_id;
        let actor = caller.user_id;
        let mut conn = self.databases.main_connection().await?;
        let (view, changed) = conn
            .transaction::<_, Error, _>(async move |conn| {
                // The row lock keeps a concurrent settings update from being lost.
                let (settings, updated_at): (serde_json::Value, DateTime<Utc>) = tenants::table
                    .find(tenant)
                    .filter(tenants::status.eq(status::ACTIVE))
                    .select((tenants::settings, tenants::updated_at))
                    .for_update()
                    .first(conn)
                    .await
                    .optional()?
                    .ok_or(Error::Store(hafen_store::Error::UnknownTenant))?;
                let mut next = Settings::from_json(&settings);
                let previous = next.retention_days;
                if previous == days {
                    return Ok((TenantPolicyView { days, updated_at }, false));
                }
                next.retention_days = days;
                let row = control::update_settings(conn, tenant, next.to_json())
                    .await?
                    .ok_or(Error::Store(hafen_store::Error::UnknownTenant))?;
                let event =
                    Event::new(Some(tenant), Actor::User(actor), "retention.policy.updated")
                        .target("tenant", tenant)
                        .attribute("retention_days", days)
                        .attribute("previous_retention_days", previous);
                hafen_events::record(conn, &event).await?;
                Ok((
                    TenantPolicyView {
                        days,
                        updated_at: row.updated_at,
                    },
                    true,
                ))
            })
            .await?;
        if changed {
            self.audited();
            tracing::info!(tenant_id = %tenant, retention_days = days, "tenant retention period set");
        }
        Ok(view)
    }

    /// Sets or clears (0) a conversation's own period, audited in the same transaction.
    pub async fn set_conversation(
        &self,
        caller: &Principal,
        conversation: Uuid,
        days: i32,
    ) -> Result<ConversationPolicyView, Error> {
        if !caller.role.is_admin() {
            return Err(Error::admins_only(
                "only admins and the owner set retention policies",
            ));
        }
        if days < 0 {
            return Err(Error::invalid("retention_days", "must not be negative"));
        }
        let tenant = caller.tenant_id;
        let tenant_days = tenant_period(&self.databases, tenant).await?;
        let days = conversation_days(days, tenant_days)?;
        let me = caller.user_id;
        let view = self
            .scoped(tenant, move |conn| {
                Box::pin(async move {
                    visible_conversation(conn, conversation, me, true).await?;
                    let at = now();
                    let stored = days.map(|d| i32::try_from(d).unwrap_or(i32::MAX));
                    diesel::update(conversations::table.find(conversation))
                        .set((
                            conversations::retention_days.eq(stored),
                            conversations::retention_updated_at.eq(at),
                        ))
                        .execute(conn)
                        .await?;
                    let event = Event::new(
                        Some(tenant),
                        Actor::User(me),
                        "retention.conversation_policy.updated",
                    )
                    .target("conversation", conversation)
                    .attribute("retention_days", days.unwrap_or(0));
                    hafen_events::record(conn, &event).await?;
                    Ok(ConversationPolicyView {
                        conversation_id: conversation,
                        days,
                        tenant_days,
                        updated_at: Some(at),
                    })
                })
            })
            .await?;
        self.audited();
        Ok(view)
    }

    /// Places (with `reason`) or lifts (`None`) a legal hold; idempotent; audited when it
    /// changes something.
    pub async fn set_legal_hold(
        &self,
        caller: &Principal,
        target: HoldTarget,
        reason: Option<ReasonCode>,
    ) -> Result<HoldView, Error> {
        if !caller.role.is_admin() {
            return Err(Error::admins_only(
                "only admins and the owner place and lift legal holds",
            ));
        }
        let tenant = caller.tenant_id;
        let me = caller.user_id;
        let (view, changed) = self
            .scoped(tenant, move |conn| {
                Box::pin(async move {
                    match target {
                        HoldTarget::Conversation(id) => {
                            visible_conversation(conn, id, me, true).await?;
                        }
                        HoldTarget::User(id) => {
                            let exists: bool =
                                diesel::select(diesel::dsl::exists(users::table.find(id)))
                                    .get_result(conn)
                                    .await?;
                            if !exists {
                                return Err(Error::NotFound("user"));
                            }
                        }
                    }
                    let active = active_hold(conn, target).await?;
                    match (reason, active) {
                        (Some(_), Some(row)) => Ok((Some(row), false)),
                        (Some(reason), None) => {
                            let (conversation_id, user_id) = target.columns();
                            let row = LegalHoldRow {
                                id: Uuid::now_v7(),
                                conversation_id,
                                user_id,
                                reason_code: reason.as_str().to_owned(),
                                set_by: me,
                                set_at: now(),
                                lifted_by: None,
                                lifted_at: None,
                            };
                            // A concurrent call placing the same hold wins; this one then
                            // returns that hold, unchanged.
                            let inserted = diesel::insert_into(legal_holds::table)
                                .values(&row)
                                .on_conflict_do_nothing()
                                .returning(LegalHoldRow::as_returning())
                                .get_result(conn)
                                .await
                                .optional()?;
                            let Some(row) = inserted else {
                                return Ok((active_hold(conn, target).await?, false));
                            };
                            let event = Event::new(
                                Some(tenant),
                                Actor::User(me),
                                "retention.legal_hold.set",
                            )
                            .target(target.kind(), target.id())
                            .attribute("legal_hold_id", row.id)
                            .attribute("reason_code", &row.reason_code);
                            hafen_events::record(conn, &event).await?;
                            Ok((Some(row), true))
                        }
                        (None, Some(row)) => {
                            let row: LegalHoldRow = diesel::update(legal_holds::table.find(row.id))
                                .set((
                                    legal_holds::lifted_by.eq(me),
                                    legal_holds::lifted_at.eq(now()),
                                ))
                                .returning(LegalHoldRow::as_returning())
                                .get_result(conn)
                                .await?;
                            let event = Event::new(
                                Some(tenant),
                                Actor::User(me),
                                "retention.legal_hold.lifted",
                            )
                            .target(target.kind(), target.id())
                            .attribute("legal_hold_id", row.id);
                            hafen_events::record(conn, &event).await?;
                            Ok((Some(row), true))
                        }
                        (None, None) => Ok((latest_hold(conn, target).await?, false)),
                    }
                })
            })
            .await?;
        if changed {
            self.audited();
        }
        Ok(HoldView { target, row: view })
    }
}

/// A conversation the caller may know of (a member, any channel, and for an `admin` any
/// website chat): its own period and when it was set. NOT_FOUND otherwise, whether or not it
/// exists.
async fn visible_conversation(
    conn: &mut AsyncPgConnection,
    conversation: Uuid,
    me: Uuid,
    admin: bool,
) -> Result<(Option<u32>, Option<DateTime<Utc>>), Error> {
    let (kind, days, at): (String, Option<i32>, Option<DateTime<Utc>>) = conversations::table
        .find(conversation)
        .select((
            conversations::kind,
            conversations::retention_days,
            conversations::retention_updated_at,
        ))
        .first(conn)
        .await
        .optional()?
        .ok_or(Error::NotFound("conversation"))?;
    // Channels are open to everyone, and a website chat is the organisation's chat with a
    // visitor, which its admins answer for (they configure the widget and see the visitor's
    // released fields); other conversations need the caller as a member.
    let open = kind == CHANNEL || (admin && kind == WEBCHAT);
    if !open {
        let member: bool = diesel::select(diesel::dsl::exists(
            members::table
                .filter(members::conversation_id.eq(conversation))
                .filter(members::user_id.eq(me)),
        ))
        .get_result(conn)
        .await?;
        if !member {
            return Err(Error::NotFound("conversation"));
        }
    }
    Ok((days.and_then(|d| u32::try_from(d).ok()), at))
}

fn hold_filter(target: HoldTarget) -> legal_holds::BoxedQuery<'static, diesel::pg::Pg> {
    match target {
        HoldTarget::Conversation(id) => legal_holds::table
            .filter(legal_holds::conversation_id.eq(id))
            .into_boxed(),
        HoldTarget::User(id) => legal_holds::table
            .filter(legal_holds::user_id.eq(id))
            .into_boxed(),
    }
}

async fn active_hold(
    conn: &mut AsyncPgConnection,
    target: HoldTarget,
) -> Result<Option<LegalHoldRow>, Error> {
    Ok(hold_filter(target)
        .filter(legal_holds::lifted_at.is_null())
        .select(LegalHoldRow::as_select())
        .first(conn)
        .await
        .optional()?)
}

async fn latest_hold(
    conn: &mut AsyncPgConnection,
    target: HoldTarget,
) -> Result<Option<LegalHoldRow>, Error> {
    Ok(hold_filter(target)
        .order((legal_holds::set_at.desc(), legal_holds::id.desc()))
        .select(LegalHoldRow::as_select())
        .first(conn)
        .await
        .optional()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cb5_periods_are_bounded() {
        assert_eq!(tenant_days(1).unwrap(), 1);
        assert_eq!(tenant_days(730).unwrap(), 730);
        assert!(matches!(
            tenant_days(731),
            Err(Error::RetentionTooLong { max_days: 730, .. })
        ));
        assert!(matches!(tenant_days(0), Err(Error::InvalidField { .. })));
        assert!(matches!(tenant_days(-1), Err(Error::InvalidField { .. })));
        assert_eq!(conversation_days(0, 30).unwrap(), None);
        assert_eq!(conversation_days(7, 30).unwrap(), Some(7));
        assert!(matches!(
            conversation_days(31, 30),
            Err(Error::RetentionTooLong { max_days: 30, .. })
        ));
        assert!(matches!(
            conversation_days(-1, 30),
            Err(Error::InvalidField { .. })
        ));
        assert_eq!(effective(Some(100), 30), 30);
        assert_eq!(effective(None, 30), 30);
        assert_eq!(effective(Some(7), 30), 7);
    }

    #[test]
    fn reason_codes_are_labels_not_text() {
        assert!(ReasonCode::parse("litigation-2025-04").is_ok());
        assert!(ReasonCode::parse("tax.audit_1").is_ok());
        for bad in ["", "Litigation", "tax audit", "ä", &"x".repeat(65), "a\n"] {
            assert!(ReasonCode::parse(bad).is_err(), "{bad:?}");
        }
    }
}
