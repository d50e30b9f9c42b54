//! Rows of the tenant's retention tables (`legal_holds`, `purge_runs`) and their API forms.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use hafen_platform::timestamp;
use hafen_proto::retention::v1 as pb;
use hafen_store::schema::{legal_holds, purge_runs};
use uuid::Uuid;

/// Stored values of `purge_runs.trigger`.
pub mod trigger {
    /// The background schedule.
    pub const SCHEDULED: &str = "scheduled";
    /// RunPurge by an admin.
    pub const MANUAL: &str = "manual";
}

/// Stored values of `purge_runs.state`.
pub mod state {
    /// Deleting.
    pub const RUNNING: &str = "running";
    /// Finished.
    pub const SUCCEEDED: &str = "succeeded";
    /// Stopped by an error (or taken over after its heartbeat stopped).
    pub const FAILED: &str = "failed";
}

/// A legal hold as stored.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Insertable)]
#[diesel(table_name = legal_holds)]
#[diesel(check_for_backend(diesel::pg::Pg))]
pub struct LegalHoldRow {
    /// The hold's id.
    pub id: Uuid,
    /// A held conversation.
    pub conversation_id: Option<Uuid>,
    /// A held user.
    pub user_id: Option<Uuid>,
    /// The reason label (no free text).
    pub reason_code: String,
    /// The admin who placed it.
    pub set_by: Uuid,
    /// When it was placed.
    pub set_at: DateTime<Utc>,
    /// The admin who lifted it.
    pub lifted_by: Option<Uuid>,
    /// When it was lifted.
    pub lifted_at: Option<DateTime<Utc>>,
}

impl LegalHoldRow {
    /// The API form.
    pub fn to_proto(&self) -> pb::LegalHold {
        pb::LegalHold {
            target: target_of(self.conversation_id, self.user_id),
            active: self.lifted_at.is_none(),
            reason_code: self.reason_code.clone(),
            set_by_user_id: self.set_by.to_string(),
            set_time: Some(timestamp(self.set_at)),
            lifted_by_user_id: self.lifted_by.map(|id| id.to_string()).unwrap_or_default(),
            lift_time: self.lifted_at.map(timestamp),
        }
    }
}

/// The API form of a hold target.
pub fn target_of(conversation: Option<Uuid>, user: Option<Uuid>) -> Option<pb::legal_hold::Target> {
    match (conversation, user) {
        (Some(id), _) => Some(pb::legal_hold::Target::ConversationId(id.to_string())),
        (None, Some(id)) => Some(pb::legal_hold::Target::UserId(id.to_string())),
        (None, None) => None,
    }
}

/// A purge run as stored. Counts only.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Insertable)]
#[diesel(table_name = purge_runs)]
#[diesel(check_for_backend(diesel::pg::Pg))]
pub struct PurgeRunRow {
    /// The run's id.
    pub id: Uuid,
    /// [`trigger::SCHEDULED`] or [`trigger::MANUAL`].
    pub trigger: String,
    /// [`state::RUNNING`], [`state::SUCCEEDED`] or [`state::FAILED`].
    pub state: String,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it ended.
    pub ended_at: Option<DateTime<Utc>>,
    /// Advanced after every batch while running.
    pub heartbeat_at: DateTime<Utc>,
    /// Messages deleted so far.
    pub messages_deleted: i64,
    /// Conversations with at least one message deleted.
    pub conversations_touched: i64,
    /// Expired messages kept because of a legal hold.
    pub held_skipped: i64,
    /// The admin who started a manual run.
    pub triggered_by: Option<Uuid>,
}

impl PurgeRunRow {
    /// Whether the run is still in progress.
    pub fn is_running(&self) -> bool {
        self.state == state::RUNNING
    }

    /// The API form.
    pub fn to_proto(&self) -> pb::PurgeRun {
        let trigger = match self.trigger.as_str() {
            trigger::SCHEDULED => pb::PurgeTrigger::Scheduled,
            trigger::MANUAL => pb::PurgeTrigger::Manual,
            _ => pb::PurgeTrigger::Unspecified,
        };
        let state = match self.state.as_str() {
            state::RUNNING => pb::PurgeRunState::Running,
            state::SUCCEEDED => pb::PurgeRunState::Succeeded,
            state::FAILED => pb::PurgeRunState::Failed,
            _ => pb::PurgeRunState::Unspecified,
        };
        let count = |value: i64| u64::try_from(value).unwrap_or_default();
        pb::PurgeRun {
            purge_run_id: self.id.to_string(),
            trigger: trigger as i32,
            state: state as i32,
            start_time: Some(timestamp(self.started_at)),
            end_time: self.ended_at.map(timestamp),
            messages_deleted: count(self.messages_deleted),
            conversations_touched: count(self.conversations_touched),
            held_skipped: count(self.held_skipped),
            triggered_by_user_id: self
                .triggered_by
                .map(|id| id.to_string())
                .unwrap_or_default(),
        }
    }
}
