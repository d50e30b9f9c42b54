//! The gRPC adapter of `hafen.retention.v1.RetentionService`: parse requests into domain
//! types, call [`Policies`], [`Purger`] and [`Replayer`], convert the results.

use hafen_authn::{Caller, caller, user};
use hafen_events::Actor;
use hafen_platform::paging::{self, TimeKey};
use hafen_platform::status::parse_uuid;
use hafen_platform::timestamp;
use hafen_proto::retention::v1 as pb;
use hafen_proto::retention::v1::retention_service_server::RetentionService;
use hafen_store::settings::MAX_RETENTION_DAYS;
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::policy::{HoldTarget, HoldView, Policies, ReasonCode};
use crate::purge::{Purger, Trigger};
use crate::replay::Replayer;
use crate::rows::target_of;

/// The hard maximum, as the API reports it.
const MAX_DAYS: i32 = MAX_RETENTION_DAYS as i32;

/// The services whose certificates may call ReplayDeletions (besides the operator's token):
/// the retention service itself, as a restore's last step.
pub const REPLAYERS: &[&str] = &["retention"];

fn days(value: u32) -> i32 {
    i32::try_from(value).unwrap_or(i32::MAX)
}

/// The RetentionService implementation.
#[derive(Debug, Clone)]
pub struct RetentionApi {
    policies: Policies,
    purger: Purger,
    replayer: Replayer,
}

impl RetentionApi {
    /// The adapter over the domain services.
    pub fn new(policies: Policies, purger: Purger, replayer: Replayer) -> Self {
        Self {
            policies,
            purger,
            replayer,
        }
    }
}

fn hold_to_proto(view: &HoldView) -> pb::LegalHold {
    match &view.row {
        Some(row) => row.to_proto(),
        None => {
            let (conversation, user) = match view.target {
                HoldTarget::Conversation(id) => (Some(id), None),
                HoldTarget::User(id) => (None, Some(id)),
            };
            pb::LegalHold {
                target: target_of(conversation, user),
                ..Default::default()
            }
        }
    }
}

#[tonic::async_trait]
impl RetentionService for RetentionApi {
    async fn get_policy(
        &self,
        request: Request<pb::GetPolicyRequest>,
    ) -> Result<Response<pb::Policy>, Status> {
        let caller = user(&request)?.clone();
        let r = request.into_inner();
        let conversation = if r.conversation_id.is_empty() {
            None
        } else {
            Some(parse_uuid("conversation_id", &r.conversation_id)?)
        };
        let view = self.policies.get(&caller, conversation).await?;
        Ok(Response::new(pb::Policy {
            retention_days: days(view.effective_days()),
            tenant_retention_days: days(view.tenant_days),
            conversation_retention_days: view.conversation_days.map_or(0, days),
            max_retention_days: MAX_DAYS,
            legal_holds: view.holds.iter().map(|row| row.to_proto()).collect(),
        }))
    }

    async fn set_tenant_policy(
        &self,
        request: Request<pb::SetTenantPolicyRequest>,
    ) -> Result<Response<pb::TenantPolicy>, Status> {
        let caller = user(&request)?.clone();
        let r = request.into_inner();
        let view = self.policies.set_tenant(&caller, r.retention_days).await?;
        Ok(Response::new(pb::TenantPolicy {
            retention_days: days(view.days),
            max_retention_days: MAX_DAYS,
            update_time: Some(timestamp(view.updated_at)),
        }))
    }

    async fn set_conversation_policy(
        &self,
        request: Request<pb::SetConversationPolicyRequest>,
    ) -> Result<Response<pb::ConversationPolicy>, Status> {
        let caller = user(&request)?.clone();
        let r = request.into_inner();
        let conversation = parse_uuid("conversation_id", &r.conversation_id)?;
        let view = self
            .policies
            .set_conversation(&caller, conversation, r.retention_days)
            .await?;
        Ok(Response::new(pb::ConversationPolicy {
            conversation_id: view.conversation_id.to_string(),
            retention_days: view.days.map_or(0, days),
            effective_retention_days: days(view.effective_days()),
            update_time: view.updated_at.map(timestamp),
        }))
    }

    async fn set_legal_hold(
        &self,
        request: Request<pb::SetLegalHoldRequest>,
    ) -> Result<Response<pb::LegalHold>, Status> {
        use pb::set_legal_hold_request::Target;
        let caller = user(&request)?.clone();
        let r = request.into_inner();
        let target = match &r.target {
            Some(Target::ConversationId(id)) => {
                HoldTarget::Conversation(parse_uuid("conversation_id", id)?)
            }
            Some(Target::UserId(id)) => HoldTarget::User(parse_uuid("user_id", id)?),
            None => {
                return Err(Error::invalid("target", "set conversation_id or user_id").into());
            }
        };
        let reason = if r.hold {
            Some(ReasonCode::parse(&r.reason_code)?)
        } else {
            None
        };
        let view = self
            .policies
            .set_legal_hold(&caller, target, reason)
            .await?;
        Ok(Response::new(hold_to_proto(&view)))
    }

    async fn run_purge(
        &self,
        request: Request<pb::RunPurgeRequest>,
    ) -> Result<Response<pb::PurgeRun>, Status> {
        let caller = user(&request)?.clone();
        if !caller.role.is_admin() {
            return Err(Error::admins_only("only admins and the owner start a purge").into());
        }
        let run = self
            .purger
            .start(caller.tenant_id, Trigger::Manual(caller.user_id))
            .await?;
        Ok(Response::new(run.to_proto()))
    }

    async fn list_purge_runs(
        &self,
        request: Request<pb::ListPurgeRunsRequest>,
    ) -> Result<Response<pb::ListPurgeRunsResponse>, Status> {
        let caller = user(&request)?.clone();
        if !caller.role.is_admin() {
            return Err(Error::admins_only("only admins and the owner list purge runs").into());
        }
        let r = request.into_inner();
        let limit = paging::page_size(r.page_size)?;
        let filter = paging::filter(r.page_size, &[]);
        let after = TimeKey::decode(&r.page_token, &filter)?.map(|k| (k.at, k.id));
        let (runs, more) = self.purger.list(caller.tenant_id, after, limit).await?;
        let next_page_token = match (more, runs.last()) {
            (true, Some(last)) => TimeKey {
                at: last.started_at,
                id: last.id,
            }
            .encode(&filter),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListPurgeRunsResponse {
            purge_runs: runs.iter().map(|run| run.to_proto()).collect(),
            next_page_token,
        }))
    }

    async fn replay_deletions(
        &self,
        request: Request<pb::ReplayDeletionsRequest>,
    ) -> Result<Response<pb::ReplayDeletionsResponse>, Status> {
        // The operator (platform token), or another Hafen service (client certificate from
        // the service CA) that sends no token.
        let actor = match caller(&request) {
            Ok(Caller::Operator) => Actor::Operator,
            Ok(Caller::User(_)) => {
                return Err(Error::PermissionDenied {
                    message: "internal call: only Hafen services and the operator may make it",
                    required: "internal",
                }
                .into());
            }
            Err(_) => {
                let service = hafen_authn::require_service(&request, REPLAYERS).map_err(|_| {
                    Error::PermissionDenied {
                        message: "internal call: only the retention service and the operator may make it",
                        required: "internal",
                    }
                })?;
                Actor::Service(service)
            }
        };
        let dry_run = request.into_inner().dry_run;
        let report = self.replayer.replay(dry_run, actor).await?;
        Ok(Response::new(pb::ReplayDeletionsResponse {
            entries_checked: report.entries_checked,
            tenants_deleted: report.tenants_deleted,
            users_erased: report.users_erased,
            messages_deleted: report.messages_deleted,
        }))
    }
}
