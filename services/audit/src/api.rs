//! The gRPC adapter of `hafen.audit.v1.AuditService`: who may read which chain, parsing
//! requests, calling [`AuditLog`], converting results.
//!
//! Users read their own tenant's chain (admins and the owner; members are refused); the
//! operator reads the platform chain, and may verify a tenant's chain or build its record but
//! never list or export its events (TM2). Every operator call and every export is audited
//! here, in the chain it concerns, before the answer leaves: when that event cannot be
//! written, the call fails.

use chrono::{DateTime, Utc};
use hafen_authn::{Authenticator, Caller, Principal, caller};
use hafen_events::{Actor, Event};
use hafen_platform::paging;
use hafen_platform::status::parse_uuid;
use hafen_proto::audit::v1 as pb;
use hafen_proto::audit::v1::audit_service_server::AuditService;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::RecordArgs;
use crate::error::Error;
use crate::event::{self, Chain};
use crate::log::{AuditLog, Verification};
use crate::record;
use crate::repo::{ActionFilter, Filter};

/// Methods that authenticate by client certificate instead of a bearer token.
pub const INTERNAL: &[&str] = &["AppendEvents"];

/// The services whose certificates may call AppendEvents: those that emit audit events (the
/// audit service records its own directly).
pub const EMITTERS: &[&str] = &["auth", "messaging", "tenant", "retention", "webchat"];

/// The AuditService implementation.
#[derive(Debug, Clone)]
pub struct AuditApi {
    log: AuditLog,
    authenticator: Authenticator,
    record: RecordArgs,
}

impl AuditApi {
    /// The adapter over `log`; export streams end through `authenticator`'s revocations;
    /// `record` and what the running services report feed the Art. 30 record.
    pub fn new(log: AuditLog, authenticator: Authenticator, record: RecordArgs) -> Self {
        Self {
            log,
            authenticator,
            record,
        }
    }
}

/// Who reads a chain.
enum Reader {
    /// The operator: the platform chain.
    Operator,
    /// An admin or the owner: their tenant's chain.
    Admin(Principal),
}

impl Reader {
    fn chain(&self) -> Chain {
        match self {
            Reader::Operator => Chain::Platform,
            Reader::Admin(principal) => Chain::Tenant(principal.tenant_id),
        }
    }

    fn actor(&self) -> Actor {
        match self {
            Reader::Operator => Actor::Operator,
            Reader::Admin(principal) => Actor::User(principal.user_id),
        }
    }
}

const MEMBERS_REFUSED: &str = "only admins and the owner may read the audit log";

fn reader<T>(request: &Request<T>) -> Result<Reader, Status> {
    match caller(request)? {
        Caller::Operator => Ok(Reader::Operator),
        Caller::User(principal) if principal.role.is_admin() => {
            Ok(Reader::Admin(principal.clone()))
        }
        Caller::User(_) => Err(Error::PermissionDenied(MEMBERS_REFUSED).into()),
    }
}

/// The tenant a logged-in admin acts on: their own, with `tenant_id` left empty.
fn own_tenant(principal: &Principal, tenant_id: &str) -> Result<Uuid, Error> {
    if !principal.role.is_admin() {
        return Err(Error::PermissionDenied(MEMBERS_REFUSED));
    }
    if !tenant_id.is_empty() {
        return Err(Error::invalid(
            "tenant_id",
            "must be empty: users act on their own tenant",
        ));
    }
    Ok(principal.tenant_id)
}

fn time(
    field: &str,
    value: Option<&prost_types::Timestamp>,
) -> Result<Option<DateTime<Utc>>, Error> {
    value
        .map(|ts| {
            hafen_platform::datetime(ts)
                .ok_or_else(|| Error::invalid(field, "not a valid timestamp"))
        })
        .transpose()
}

/// `[start, end)`, each bound optional.
type TimeRange = (Option<DateTime<Utc>>, Option<DateTime<Utc>>);

fn time_range(
    start: Option<&prost_types::Timestamp>,
    end: Option<&prost_types::Timestamp>,
) -> Result<TimeRange, Error> {
    let start = time("start_time", start)?;
    let end = time("end_time", end)?;
    if let (Some(start), Some(end)) = (start, end)
        && start > end
    {
        return Err(Error::invalid("start_time", "must not be after end_time"));
    }
    Ok((start, end))
}

fn action_filter(action: &str) -> Result<Option<ActionFilter>, Error> {
    if action.is_empty() {
        Ok(None)
    } else if event::is_action_prefix(action) {
        Ok(Some(ActionFilter::Prefix(action.to_owned())))
    } else if event::is_action(action) {
        Ok(Some(ActionFilter::Exact(action.to_owned())))
    } else {
        Err(Error::invalid(
            "action",
            "an action name (`auth.login.failed`) or a prefix ending in '.' (`auth.login.`)",
        ))
    }
}

/// What a page token must repeat: the filters of the request it came from.
fn fingerprint(filter: &Filter, oldest_first: bool) -> String {
    let micros = |t: Option<DateTime<Utc>>| t.map(|t| t.timestamp_micros().to_string());
    let action = match &filter.action {
        Some(ActionFilter::Exact(a) | ActionFilter::Prefix(a)) => a.as_str(),
        None => "",
    };
    format!(
        "{}|{}|{}|{}|{}",
        micros(filter.start).unwrap_or_default(),
        micros(filter.end).unwrap_or_default(),
        u8::from(oldest_first),
        action,
        filter.actor_id.as_deref().unwrap_or_default(),
    )
}

fn verification(v: &Verification) -> pb::VerifyChainResponse {
    pb::VerifyChainResponse {
        intact: v.intact,
        events_checked: v.events_checked,
        first_broken_sequence: v.first_broken_sequence,
        head_sequence: v.head_sequence,
        head_hash: v.head_hash.clone(),
        verify_time: Some(hafen_platform::timestamp(hafen_store::now())),
        signatures_checked: v.signatures_checked,
        head_signed: v.head_signed,
        public_key: v.public_key.clone(),
    }
}

impl AuditApi {
    /// Audits an operator's call that named an unknown tenant, in the platform chain.
    async fn operator_missed(&self, action: &'static str, tenant: Uuid) -> Result<(), Error> {
        let event = Event::new(None, Actor::Operator, action)
            .target("tenant", tenant)
            .failed();
        self.log.record(&event).await
    }

    async fn verify_as_operator(&self, tenant_id: &str) -> Result<(Chain, Verification), Error> {
        let chain = if tenant_id.is_empty() {
            Chain::Platform
        } else {
            let id = parse_uuid("tenant_id", tenant_id)
                .map_err(|_| Error::invalid("tenant_id", "must be a UUID"))?;
            // Deleted tenants keep their chain: it proves the deletion.
            if self.log.tenant(id).await?.is_none() {
                self.operator_missed("audit.chain.verified", id).await?;
                return Err(Error::NotFound("tenant"));
            }
            Chain::Tenant(id)
        };
        let result = self.log.verify(chain).await?;
        let mut event = Event::new(chain.tenant(), Actor::Operator, "audit.chain.verified")
            .attribute("events_checked", result.events_checked)
            .attribute("head_sequence", result.head_sequence)
            .attribute("intact", result.intact);
        if let Some(tenant) = chain.tenant() {
            event = event.target("tenant", tenant);
        }
        if !result.intact {
            event = event.attribute("first_broken_sequence", result.first_broken_sequence);
        }
        self.log.record(&event).await?;
        Ok((chain, result))
    }
}

#[tonic::async_trait]
impl AuditService for AuditApi {
    type ExportAuditLogStream = BoxStream<pb::ExportAuditLogResponse>;

    async fn list_events(
        &self,
        request: Request<pb::ListEventsRequest>,
    ) -> Result<Response<pb::ListEventsResponse>, Status> {
        let reader = reader(&request)?;
        let r = request.into_inner();
        let (start, end) = time_range(r.start_time.as_ref(), r.end_time.as_ref())?;
        if !event::is_plain_id(&r.actor_id) {
            return Err(Error::invalid(
                "actor_id",
                format!(
                    "at most {} characters, no control characters",
                    event::MAX_ID_CHARS
                ),
            )
            .into());
        }
        let filter = Filter {
            start,
            end,
            actor_id: (!r.actor_id.is_empty()).then(|| r.actor_id.clone()),
            action: action_filter(&r.action)?,
        };
        let limit = paging::page_size(r.page_size)?;
        let fingerprint =
            hafen_platform::paging::filter(r.page_size, &[&fingerprint(&filter, r.oldest_first)]);
        let after = match paging::decode(&r.page_token, 2)? {
            None => None,
            Some(parts) => {
                paging::same_filter(&parts[1], &fingerprint)?;
                Some(parts[0].parse::<i64>().map_err(|_| {
                    Error::invalid("page_token", "not a token from a previous page")
                })?)
            }
        };
        let chain = reader.chain();
        let (rows, more) = self
            .log
            .list(chain, &filter, after, limit, r.oldest_first)
            .await?;
        if let Reader::Operator = reader {
            let event = Event::new(None, Actor::Operator, "audit.events.listed")
                .attribute("count", rows.len());
            self.log.record(&event).await?;
        }
        let next_page_token = match (more, rows.last()) {
            (true, Some(last)) => paging::encode(&[&last.sequence.to_string(), &fingerprint]),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListEventsResponse {
            events: rows.iter().map(|row| row.to_proto()).collect(),
            next_page_token,
        }))
    }

    async fn verify_chain(
        &self,
        request: Request<pb::VerifyChainRequest>,
    ) -> Result<Response<pb::VerifyChainResponse>, Status> {
        let caller = caller(&request)?.clone();
        let tenant_id = request.into_inner().tenant_id;
        let (chain, result) = match caller {
            Caller::Operator => self.verify_as_operator(&tenant_id).await?,
            Caller::User(principal) => {
                let chain = Chain::Tenant(own_tenant(&principal, &tenant_id)?);
                (chain, self.log.verify(chain).await?)
            }
        };
        if !result.intact {
            tracing::warn!(
                chain = %chain.key(),
                first_broken_sequence = result.first_broken_sequence,
                broken_links = result.broken_links,
                "audit chain verification found broken links"
            );
        }
        Ok(Response::new(verification(&result)))
    }

    async fn get_processing_record(
        &self,
        request: Request<pb::GetProcessingRecordRequest>,
    ) -> Result<Response<pb::ProcessingRecord>, Status> {
        let caller = caller(&request)?.clone();
        let tenant_id = request.into_inner().tenant_id;
        let (tenant, operator) = match &caller {
            Caller::Operator => (parse_uuid("tenant_id", &tenant_id)?, true),
            Caller::User(principal) => (own_tenant(principal, &tenant_id)?, false),
        };
        let row = self
            .log
            .tenant(tenant)
            .await?
            .filter(|row| row.status == hafen_store::control::status::ACTIVE);
        let Some(row) = row else {
            if operator {
                self.operator_missed("audit.record.generated", tenant)
                    .await?;
            }
            return Err(Error::NotFound("tenant").into());
        };
        let now = hafen_store::now();
        let facts = self.log.service_facts().await?;
        let backups = self.log.last_backup().await?;
        let built = record::build(&row, &self.record, &facts, backups.as_ref());
        if operator {
            let event = Event::new(Some(tenant), Actor::Operator, "audit.record.generated")
                .target("tenant", tenant);
            self.log.record(&event).await?;
        }
        Ok(Response::new(pb::ProcessingRecord {
            json: built.to_json(),
            markdown: built.to_markdown(now),
            generate_time: Some(hafen_platform::timestamp(now)),
        }))
    }

    async fn export_audit_log(
        &self,
        request: Request<pb::ExportAuditLogRequest>,
    ) -> Result<Response<Self::ExportAuditLogStream>, Status> {
        let reader = reader(&request)?;
        let r = request.into_inner();
        let (start, end) = time_range(r.start_time.as_ref(), r.end_time.as_ref())?;
        let chain = reader.chain();
        // The range is fixed before the export's own event joins the chain.
        let range = self.log.export_range(chain, start, end).await?;
        let mut event = Event::new(chain.tenant(), reader.actor(), "audit.log.exported");
        event = match range {
            Some((first, last)) => event
                .attribute("first_sequence", first)
                .attribute("last_sequence", last),
            None => event.attribute("events", 0),
        };
        self.log.record(&event).await?;
        let stream = crate::export::stream(self.log.clone(), chain, range);
        let stream: BoxStream<pb::ExportAuditLogResponse> = match reader {
            Reader::Admin(principal) => hafen_authn::end_on_revocation(
                stream,
                self.authenticator.clone(),
                principal.session_id,
            ),
            Reader::Operator => Box::pin(stream),
        };
        Ok(Response::new(stream))
    }

    async fn append_events(
        &self,
        request: Request<pb::AppendEventsRequest>,
    ) -> Result<Response<pb::AppendEventsResponse>, Status> {
        hafen_authn::require_service(&request, EMITTERS)?;
        let events = event::parse_batch(&request.into_inner().events)?;
        let appended = self.log.append(&events).await?;
        tracing::debug!(
            appended = appended.appended,
            duplicates = appended.duplicates,
            "audit events appended"
        );
        Ok(Response::new(pb::AppendEventsResponse {
            appended: appended.appended,
            duplicates: appended.duplicates,
        }))
    }
}
