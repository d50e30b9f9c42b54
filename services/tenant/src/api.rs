//! The gRPC adapter of `hafen.tenant.v1.TenantService`: authenticate, parse the request into
//! domain types, call [`Tenants`], convert the result. No business logic lives here.

use hafen_authn::{Caller, Role, caller, require_operator};
use hafen_events::{Actor, Event};
use hafen_platform::paging::{self, TimeKey};
use hafen_platform::status::parse_uuid;
use hafen_platform::timestamp;
use hafen_proto::tenant::v1 as pb;
use hafen_proto::tenant::v1::tenant_service_server::TenantService;
use hafen_store::accounts::{DisplayName, Username};
use hafen_store::control::{TenantRow, status};
use tonic::{Request, Response, Status};
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::error::Error;
use crate::settings::{Settings, SettingsExt as _};
use crate::tenants::{DEFAULT_DATABASE, NewTenantInput, Slug, Tenants};

/// The TenantService implementation. Callers are authenticated by the [`hafen_authn`]
/// layer in front of it.
#[derive(Debug, Clone)]
pub struct TenantApi {
    tenants: Tenants,
    authenticator: hafen_authn::Authenticator,
}

impl TenantApi {
    /// The adapter over `tenants`; export streams end through `authenticator`'s revocations.
    pub fn new(tenants: Tenants, authenticator: hafen_authn::Authenticator) -> Self {
        Self {
            tenants,
            authenticator,
        }
    }
}

/// The tenant a call acts on: the operator names it in `tenant_id`; a user's is their
/// session's, and `tenant_id` must then be empty.
fn target_tenant(caller: &Caller, tenant_id: &str) -> Result<Uuid, Error> {
    match caller {
        Caller::Operator => Ok(parse_uuid("tenant_id", tenant_id)?),
        Caller::User(principal) if tenant_id.is_empty() => Ok(principal.tenant_id),
        Caller::User(_) => Err(Error::invalid(
            "tenant_id",
            "must be empty: a user acts on their own tenant",
        )),
    }
}

/// The audit actor of `caller`.
fn actor_of(caller: &Caller) -> Actor {
    match caller {
        Caller::Operator => Actor::Operator,
        Caller::User(principal) => Actor::User(principal.user_id),
    }
}

impl TenantApi {
    /// Audits an operator's read of one tenant (TM2), in that tenant's chain.
    async fn operator_read(&self, tenant: Uuid) {
        let event = Event::new(Some(tenant), Actor::Operator, "tenant.tenant.read")
            .target("tenant", tenant);
        self.tenants.record_alone(&event).await;
    }
}

#[tonic::async_trait]
impl TenantService for TenantApi {
    type ExportTenantStream = tonic::codegen::BoxStream<pb::ExportTenantResponse>;

    async fn export_tenant(
        &self,
        request: Request<pb::ExportTenantRequest>,
    ) -> Result<Response<Self::ExportTenantStream>, Status> {
        let principal = match caller(&request)? {
            Caller::User(principal) if principal.role == Role::Owner => principal.clone(),
            Caller::User(_) => {
                return Err(hafen_platform::status::permission_denied(
                    "only the owner exports the organisation",
                ));
            }
            Caller::Operator => {
                return Err(hafen_platform::status::permission_denied(
                    "operators cannot export tenant content (TM2)",
                ));
            }
        };
        let requested = request.get_ref().chunk_size;
        if requested < 0 {
            return Err(Error::invalid("chunk_size", "must not be negative").into());
        }
        let chunks = self
            .tenants
            .export(
                principal.tenant_id,
                principal.user_id,
                crate::export::chunk_size(requested),
            )
            .await?;
        Ok(Response::new(hafen_authn::end_on_revocation(
            tokio_stream::wrappers::ReceiverStream::new(chunks),
            self.authenticator.clone(),
            principal.session_id,
        )))
    }

    type ExportUserDataStream = tonic::codegen::BoxStream<pb::ExportTenantResponse>;

    async fn export_user_data(
        &self,
        request: Request<pb::ExportUserDataRequest>,
    ) -> Result<Response<Self::ExportUserDataStream>, Status> {
        let principal = match caller(&request)? {
            Caller::User(principal) => principal.clone(),
            Caller::Operator => {
                return Err(hafen_platform::status::permission_denied(
                    "operators cannot export tenant content (TM2)",
                ));
            }
        };
        let r = request.get_ref();
        let user = match r.user_id.as_str() {
            "" => principal.user_id,
            id => parse_uuid("user_id", id)?,
        };
        if user != principal.user_id && !principal.role.is_admin() {
            return Err(hafen_platform::status::permission_denied(
                "members export their own data; admins any user's",
            ));
        }
        if r.chunk_size < 0 {
            return Err(Error::invalid("chunk_size", "must not be negative").into());
        }
        let chunks = self
            .tenants
            .export_user(
                principal.tenant_id,
                principal.user_id,
                user,
                crate::export::chunk_size(r.chunk_size),
            )
            .await?;
        Ok(Response::new(hafen_authn::end_on_revocation(
            tokio_stream::wrappers::ReceiverStream::new(chunks),
            self.authenticator.clone(),
            principal.session_id,
        )))
    }

    async fn create_tenant(
        &self,
        request: Request<pb::CreateTenantRequest>,
    ) -> Result<Response<pb::CreateTenantResponse>, Status> {
        require_operator(&request)?;
        let input = parse_create(request.into_inner())?;
        let created = self.tenants.create(input).await?;
        tracing::info!(tenant_id = %created.tenant.id, "operator created tenant");
        Ok(Response::new(pb::CreateTenantResponse {
            tenant: Some(to_proto(&created.tenant)),
            owner_user_id: created.owner_user_id.to_string(),
            owner_chat_code: created.owner_chat_code.to_string(),
            owner_chat_code_id: if created.owner_chat_code.is_empty() {
                String::new()
            } else {
                created.owner_chat_code_id.to_string()
            },
        }))
    }

    async fn get_tenant(
        &self,
        request: Request<pb::GetTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let caller = caller(&request)?.clone();
        let request = request.into_inner();
        let row = match (
            &caller,
            request.tenant_id.is_empty(),
            request.slug.is_empty(),
        ) {
            (Caller::User(principal), true, true) => self.tenants.get(principal.tenant_id).await?,
            (Caller::User(_), tenant_id_empty, _) => {
                let field = if tenant_id_empty { "slug" } else { "tenant_id" };
                return Err(
                    Error::invalid(field, "must be empty: a user reads their own tenant").into(),
                );
            }
            (Caller::Operator, false, true) => {
                let row = self
                    .tenants
                    .get(parse_uuid("tenant_id", &request.tenant_id)?)
                    .await?;
                self.operator_read(row.id).await;
                row
            }
            (Caller::Operator, true, false) => {
                let row = self.tenants.get_by_slug(&request.slug).await?;
                self.operator_read(row.id).await;
                row
            }
            (Caller::Operator, tenant_id_empty, _) => {
                // Both set names the second; neither names the one usually sent.
                let field = if tenant_id_empty { "tenant_id" } else { "slug" };
                return Err(Error::invalid(field, "set exactly one of tenant_id and slug").into());
            }
        };
        Ok(Response::new(to_proto(&row)))
    }

    async fn list_tenants(
        &self,
        request: Request<pb::ListTenantsRequest>,
    ) -> Result<Response<pb::ListTenantsResponse>, Status> {
        require_operator(&request)?;
        let request = request.into_inner();
        let limit = paging::page_size(request.page_size)?;
        let filter = paging::filter(
            request.page_size,
            &[if request.show_deleted { "deleted" } else { "" }],
        );
        let filter = filter.as_str();
        let after = TimeKey::decode(&request.page_token, filter)?;
        let (rows, more) = self
            .tenants
            .list(after.map(|k| (k.at, k.id)), limit, request.show_deleted)
            .await?;
        // Operator calls are audited (TM2); a listing is not bound to a tenant.
        let event = Event::new(None, Actor::Operator, "tenant.tenants.listed")
            .attribute("count", rows.len())
            .attribute("show_deleted", request.show_deleted);
        self.tenants.record_alone(&event).await;
        let next_page_token = match (more, rows.last()) {
            (true, Some(last)) => TimeKey {
                at: last.created_at,
                id: last.id,
            }
            .encode(filter),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListTenantsResponse {
            tenants: rows.iter().map(to_proto).collect(),
            next_page_token,
        }))
    }

    async fn update_tenant_settings(
        &self,
        request: Request<pb::UpdateTenantSettingsRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let caller = caller(&request)?.clone();
        if let Caller::User(principal) = &caller
            && !principal.role.is_admin()
        {
            return Err(hafen_platform::status::permission_denied(
                "only admins and the owner may change settings",
            ));
        }
        let request = request.into_inner();
        let id = target_tenant(&caller, &request.tenant_id)?;
        let settings = request.settings.unwrap_or_default();
        let paths = request
            .update_mask
            .map(|mask| mask.paths)
            .unwrap_or_default();
        let row = self
            .tenants
            .update_settings(id, &settings, &paths, actor_of(&caller))
            .await?;
        tracing::info!(tenant_id = %id, "tenant settings updated");
        Ok(Response::new(to_proto(&row)))
    }

    async fn get_provisioning_options(
        &self,
        request: Request<pb::GetProvisioningOptionsRequest>,
    ) -> Result<Response<pb::ProvisioningOptions>, Status> {
        require_operator(&request)?;
        let policy = self.tenants.policy();
        Ok(Response::new(pb::ProvisioningOptions {
            dpa_versions: policy.dpa_versions.clone(),
            regions: policy.regions.clone(),
            databases: self
                .tenants
                .database_names()
                .into_iter()
                .filter(|name| name != DEFAULT_DATABASE)
                .collect(),
        }))
    }

    async fn recover_owner(
        &self,
        request: Request<pb::RecoverOwnerRequest>,
    ) -> Result<Response<pb::RecoverOwnerResponse>, Status> {
        require_operator(&request)?;
        let tenant = parse_uuid("tenant_id", &request.get_ref().tenant_id)?;
        let (code, code_id) = self.tenants.recover_owner(tenant).await?;
        Ok(Response::new(pb::RecoverOwnerResponse {
            owner_chat_code: code.to_string(),
            owner_chat_code_id: code_id.to_string(),
        }))
    }

    async fn delete_tenant(
        &self,
        request: Request<pb::DeleteTenantRequest>,
    ) -> Result<Response<pb::DeleteTenantResponse>, Status> {
        let caller = caller(&request)?.clone();
        let request = request.into_inner();
        let id = target_tenant(&caller, &request.tenant_id)?;
        if request.confirm_slug.is_empty() {
            return Err(Error::invalid("confirm_slug", "type the tenant's slug to confirm").into());
        }
        match &caller {
            Caller::Operator => {
                if !request.password.is_empty() {
                    return Err(Error::invalid("password", "must be empty for operators").into());
                }
                if !request.totp_code.is_empty() {
                    return Err(Error::invalid("totp_code", "must be empty for operators").into());
                }
            }
            Caller::User(principal) => {
                if principal.role != Role::Owner {
                    return Err(hafen_platform::status::permission_denied(
                        "only the owner may delete the tenant",
                    ));
                }
                if request.password.is_empty() {
                    return Err(
                        Error::invalid("password", "the owner confirms with the password").into(),
                    );
                }
                let code = request.totp_code.trim();
                if !code.is_empty()
                    && (code.len() != 6 || !code.bytes().all(|b| b.is_ascii_digit()))
                {
                    return Err(Error::invalid("totp_code", "six digits, or empty").into());
                }
                self.tenants
                    .check_deletable(id, &request.confirm_slug)
                    .await?;
                self.tenants
                    .verify_owner(
                        id,
                        principal.user_id,
                        Zeroizing::new(request.password.clone()),
                        &request.totp_code,
                    )
                    .await?;
            }
        }
        let deleted_at = self
            .tenants
            .delete(id, &request.confirm_slug, actor_of(&caller))
            .await?;
        tracing::info!(tenant_id = %id, "tenant deleted");
        Ok(Response::new(pb::DeleteTenantResponse {
            tenant_id: id.to_string(),
            delete_time: Some(timestamp(deleted_at)),
        }))
    }
}

/// Parses a CreateTenant request; the first invalid field wins.
fn parse_create(request: pb::CreateTenantRequest) -> Result<NewTenantInput, Error> {
    let name = |field: &'static str| {
        move |err: hafen_store::accounts::NameError| Error::invalid(field, err.0)
    };
    let request_id = if request.request_id.is_empty() {
        None
    } else {
        Some(parse_uuid("request_id", &request.request_id)?)
    };
    let slug = Slug::parse(&request.slug)?;
    let display_name = DisplayName::parse(&request.display_name).map_err(name("display_name"))?;
    let owner_username =
        Username::parse(&request.owner_username).map_err(name("owner_username"))?;
    let owner_display_name =
        DisplayName::parse(&request.owner_display_name).map_err(name("owner_display_name"))?;
    if request.owner_password.is_empty() {
        return Err(Error::invalid("owner_password", "required"));
    }
    if request.dpa_version.is_empty() {
        return Err(Error::invalid(
            "dpa_version",
            "required: the accepted DPA version",
        ));
    }
    if request.region.is_empty() {
        return Err(Error::invalid("region", "required"));
    }
    let database = if request.database.is_empty() {
        DEFAULT_DATABASE.to_owned()
    } else {
        request.database
    };
    Ok(NewTenantInput {
        request_id,
        slug,
        display_name,
        owner_username,
        owner_display_name,
        owner_password: Zeroizing::new(request.owner_password),
        dpa_version: request.dpa_version,
        region: request.region,
        database,
    })
}

/// The API form of a tenant row.
pub fn to_proto(row: &TenantRow) -> pb::Tenant {
    let deleted = row.status == status::DELETED;
    pb::Tenant {
        tenant_id: row.id.to_string(),
        slug: row.slug.clone().unwrap_or_default(),
        display_name: row.display_name.clone().unwrap_or_default(),
        state: if deleted {
            pb::TenantState::Deleted
        } else {
            pb::TenantState::Active
        } as i32,
        region: row.region.clone(),
        dpa: Some(pb::DpaAcceptance {
            version: row.dpa_version.clone(),
            accept_time: Some(timestamp(row.dpa_accepted_at)),
            accepted_by_user_id: row.dpa_accepted_by.to_string(),
        }),
        database: row.database_name.clone(),
        settings: (!deleted).then(|| Settings::from_json(&row.settings).to_proto()),
        create_time: Some(timestamp(row.created_at)),
        update_time: Some(timestamp(row.updated_at)),
        delete_time: row.deleted_at.map(timestamp),
        audit_public_key: row.audit_public_key.clone().unwrap_or_default(),
    }
}
