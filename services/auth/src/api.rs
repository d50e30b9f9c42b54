//! The gRPC adapter of `hafen.auth.v1.AuthService`: parse requests into domain types, call
//! [`Auth`], convert the results. No business logic lives here.

use hafen_authn::{Introspection, Rejection, RevokeReason, Role, user};
use hafen_platform::paging::{self, TimeKey};
use hafen_platform::status::parse_uuid;
use hafen_proto::auth::v1 as pb;
use hafen_proto::auth::v1::auth_service_server::AuthService;
use hafen_store::accounts::{DeviceLabel, DisplayName, Username};
use tonic::{Request, Response, Status};
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::auth::Auth;
use crate::error::Error;
use crate::rows::timestamp;
use crate::sessions::LoginInput;
use crate::users::{Credential, NewUserInput};

/// Methods that authenticate themselves: by their fields (Login, Refresh), with a token the
/// authentication layer would refuse (Logout of an ended session, ConfirmWipe of a wiped
/// one), or by client certificate (Introspect).
pub const SELF_AUTHENTICATED: &[&str] =
    &["Login", "Refresh", "Logout", "ConfirmWipe", "Introspect"];

/// The AuthService implementation.
#[derive(Debug, Clone)]
pub struct AuthApi {
    auth: Auth,
}

impl AuthApi {
    /// The adapter over `auth`.
    pub fn new(auth: Auth) -> Self {
        Self { auth }
    }
}

fn required<'a>(field: &str, value: &'a str, max_chars: usize) -> Result<&'a str, Error> {
    if value.is_empty() {
        return Err(Error::invalid(field, "required"));
    }
    if value.chars().count() > max_chars {
        return Err(Error::invalid(
            field,
            format!("at most {max_chars} characters"),
        ));
    }
    Ok(value)
}

fn password(field: &'static str, value: String) -> Result<Zeroizing<String>, Error> {
    let value = Zeroizing::new(value);
    if value.is_empty() {
        return Err(Error::invalid(field, "required"));
    }
    if value.len() > hafen_crypto::password::MAX_PASSWORD_BYTES {
        return Err(Error::PasswordRefused {
            field,
            violation: hafen_crypto::password::PolicyViolation::TooLong,
        });
    }
    Ok(value)
}

fn bearer<T>(request: &Request<T>) -> Result<Zeroizing<String>, Status> {
    hafen_authn::bearer(request.metadata())?
        .map(|token| Zeroizing::new(token.to_owned()))
        .ok_or_else(|| {
            hafen_platform::status::unauthenticated("missing bearer token (authorization metadata)")
        })
}

#[tonic::async_trait]
impl AuthService for AuthApi {
    async fn login(
        &self,
        request: Request<pb::LoginRequest>,
    ) -> Result<Response<pb::LoginResponse>, Status> {
        let client = self.auth.policy().client_address.of(&request);
        let r = request.into_inner();
        required("tenant_slug", &r.tenant_slug, 40)?;
        required("username", &r.username, 64)?;
        required("chat_code", &r.chat_code, 32)?;
        if r.device_label.chars().count() > 64 {
            return Err(Error::invalid("device_label", "at most 64 characters").into());
        }
        let input = LoginInput {
            tenant_slug: r.tenant_slug,
            username: r.username,
            password: password("password", r.password)?,
            chat_code: Zeroizing::new(r.chat_code),
            device_label: r.device_label,
            client,
        };
        let logged_in = self.auth.login(input).await?;
        let issued = logged_in.issued;
        Ok(Response::new(pb::LoginResponse {
            access_token: issued.access_token.to_string(),
            access_expire_time: Some(timestamp(issued.access_expires_at)),
            refresh_token: issued.refresh_token.to_string(),
            refresh_expire_time: Some(timestamp(issued.refresh_expires_at)),
            session_id: issued.session_id.to_string(),
            user: Some(logged_in.user.to_proto()),
            tenant_id: logged_in.tenant_id.to_string(),
            chat_code_id: logged_in.chat_code_id.to_string(),
        }))
    }

    async fn refresh(
        &self,
        request: Request<pb::RefreshRequest>,
    ) -> Result<Response<pb::RefreshResponse>, Status> {
        let token = Zeroizing::new(request.into_inner().refresh_token);
        required("refresh_token", &token, 200)?;
        let issued = self.auth.refresh(&token).await?;
        Ok(Response::new(pb::RefreshResponse {
            access_token: issued.access_token.to_string(),
            access_expire_time: Some(timestamp(issued.access_expires_at)),
            refresh_token: issued.refresh_token.to_string(),
            refresh_expire_time: Some(timestamp(issued.refresh_expires_at)),
        }))
    }

    async fn logout(
        &self,
        request: Request<pb::LogoutRequest>,
    ) -> Result<Response<pb::LogoutResponse>, Status> {
        let token = bearer(&request)?;
        self.auth.logout(&token).await?;
        Ok(Response::new(pb::LogoutResponse {}))
    }

    async fn create_user(
        &self,
        request: Request<pb::CreateUserRequest>,
    ) -> Result<Response<pb::User>, Status> {
        let caller = user(&request)?.clone();
        let r = request.into_inner();
        let request_id = if r.request_id.is_empty() {
            None
        } else {
            Some(parse_uuid("request_id", &r.request_id)?)
        };
        let username =
            Username::parse(&r.username).map_err(|err| Error::invalid("username", err.0))?;
        let display_name = DisplayName::parse(&r.display_name)
            .map_err(|err| Error::invalid("display_name", err.0))?;
        let role = Role::from_proto(r.role)
            .ok_or_else(|| Error::invalid("role", "ROLE_MEMBER or ROLE_ADMIN"))?;
        let credential = match r.credential {
            Some(pb::create_user_request::Credential::Password(p)) => {
                Credential::Password(password("password", p)?)
            }
            Some(pb::create_user_request::Credential::PasswordHash(hash)) => Credential::Hash(hash),
            None => {
                return Err(
                    Error::invalid("password", "a password or password_hash is required").into(),
                );
            }
        };
        let row = self
            .auth
            .create_user(
                &caller,
                NewUserInput {
                    request_id,
                    username,
                    display_name,
                    role,
                    credential,
                },
            )
            .await?;
        Ok(Response::new(row.to_proto()))
    }

    async fn list_users(
        &self,
        request: Request<pb::ListUsersRequest>,
    ) -> Result<Response<pb::ListUsersResponse>, Status> {
        let caller = user(&request)?.clone();
        let r = request.into_inner();
        let limit = paging::page_size(r.page_size)?;
        let filter = paging::filter(r.page_size, &[&u8::from(r.include_deactivated).to_string()]);
        let after = match paging::decode(&r.page_token, 3)? {
            Some(parts) => {
                paging::same_filter(&parts[2], &filter)?;
                let id = Uuid::try_parse(&parts[1]).map_err(|_| {
                    Error::invalid("page_token", "not a token from a previous page")
                })?;
                Some((parts[0].clone(), id))
            }
            None => None,
        };
        let page = self
            .auth
            .list_users(&caller, after, limit, r.include_deactivated)
            .await?;
        let next_page_token = match (page.more, page.users.last()) {
            (true, Some(last)) => {
                paging::encode(&[&last.username.to_lowercase(), &last.id.to_string(), &filter])
            }
            _ => String::new(),
        };
        Ok(Response::new(pb::ListUsersResponse {
            users: self.auth.users_proto(caller.tenant_id, &page.users).await?,
            next_page_token,
        }))
    }

    async fn update_user(
        &self,
        request: Request<pb::UpdateUserRequest>,
    ) -> Result<Response<pb::User>, Status> {
        let caller = user(&request)?.clone();
        let r = request.into_inner();
        let target = r.user.ok_or_else(|| Error::invalid("user", "required"))?;
        let id = parse_uuid("user.user_id", &target.user_id)?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        if paths.is_empty() {
            return Err(Error::invalid("update_mask", "name display_name and/or role").into());
        }
        let mut display_name = None;
        let mut role = None;
        for path in &paths {
            match path.as_str() {
                "display_name" => {
                    display_name = Some(
                        DisplayName::parse(&target.display_name)
                            .map_err(|err| Error::invalid("user.display_name", err.0))?,
                    );
                }
                "role" => {
                    role =
                        Some(Role::from_proto(target.role).ok_or_else(|| {
                            Error::invalid("user.role", "ROLE_MEMBER or ROLE_ADMIN")
                        })?);
                }
                other => {
                    return Err(Error::invalid(
                        "update_mask",
                        format!("unknown path `{}`", hafen_platform::status::excerpt(other)),
                    )
                    .into());
                }
            }
        }
        let row = self
            .auth
            .update_user(&caller, id, display_name, role)
            .await?;
        let mut users = self.auth.users_proto(caller.tenant_id, &[row]).await?;
        Ok(Response::new(users.pop().unwrap_or_default()))
    }

    async fn deactivate_user(
        &self,
        request: Request<pb::DeactivateUserRequest>,
    ) -> Result<Response<pb::User>, Status> {
        let caller = user(&request)?.clone();
        let id = parse_uuid("user_id", &request.into_inner().user_id)?;
        let row = self.auth.deactivate(&caller, id).await?;
        let mut users = self.auth.users_proto(caller.tenant_id, &[row]).await?;
        Ok(Response::new(users.pop().unwrap_or_default()))
    }

    async fn reactivate_user(
        &self,
        request: Request<pb::ReactivateUserRequest>,
    ) -> Result<Response<pb::User>, Status> {
        let caller = user(&request)?.clone();
        let id = parse_uuid("user_id", &request.into_inner().user_id)?;
        Ok(Response::new(
            self.auth.reactivate(&caller, id).await?.to_proto(),
        ))
    }

    async fn erase_user(
        &self,
        request: Request<pb::EraseUserRequest>,
    ) -> Result<Response<pb::User>, Status> {
        let caller = user(&request)?.clone();
        let id = parse_uuid("user_id", &request.into_inner().user_id)?;
        Ok(Response::new(
            self.auth.erase_user(&caller, id).await?.to_proto(),
        ))
    }

    async fn request_erasure(
        &self,
        request: Request<pb::RequestErasureRequest>,
    ) -> Result<Response<pb::User>, Status> {
        let caller = user(&request)?.clone();
        Ok(Response::new(self.auth.request_erasure(&caller).await?))
    }

    async fn change_password(
        &self,
        request: Request<pb::ChangePasswordRequest>,
    ) -> Result<Response<pb::ChangePasswordResponse>, Status> {
        let caller = user(&request)?.clone();
        let r = request.into_inner();
        let old = password("old_password", r.old_password)?;
        let new = password("new_password", r.new_password)?;
        let (changed, revoked) = self.auth.change_password(&caller, old, new).await?;
        Ok(Response::new(pb::ChangePasswordResponse {
            update_time: Some(timestamp(changed)),
            sessions_revoked: i32::try_from(revoked).unwrap_or(i32::MAX),
        }))
    }

    async fn issue_chat_code(
        &self,
        request: Request<pb::IssueChatCodeRequest>,
    ) -> Result<Response<pb::IssueChatCodeResponse>, Status> {
        let caller = user(&request)?.clone();
        let r = request.into_inner();
        let user_id = parse_uuid("user_id", &r.user_id)?;
        let label = DeviceLabel::parse(&r.device_label)
            .map_err(|err| Error::invalid("device_label", err.0))?;
        let issued = self.auth.issue_code(&caller, user_id, label).await?;
        Ok(Response::new(pb::IssueChatCodeResponse {
            chat_code: Some(issued.row.to_proto()),
            code: issued.code.to_string(),
        }))
    }

    async fn list_chat_codes(
        &self,
        request: Request<pb::ListChatCodesRequest>,
    ) -> Result<Response<pb::ListChatCodesResponse>, Status> {
        let caller = user(&request)?.clone();
        let r = request.into_inner();
        let user_id = if r.user_id.is_empty() {
            None
        } else {
            Some(parse_uuid("user_id", &r.user_id)?)
        };
        let limit = paging::page_size(r.page_size)?;
        let filter = paging::filter(r.page_size, &[&r.user_id]);
        let after = TimeKey::decode(&r.page_token, &filter)?.map(|k| (k.at, k.id));
        let (rows, more) = self.auth.list_codes(&caller, user_id, after, limit).await?;
        let next_page_token = match (more, rows.last()) {
            (true, Some(last)) => TimeKey {
                at: last.created_at,
                id: last.id,
            }
            .encode(&filter),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListChatCodesResponse {
            chat_codes: rows.iter().map(|c| c.to_proto()).collect(),
            next_page_token,
        }))
    }

    async fn revoke_chat_code(
        &self,
        request: Request<pb::RevokeChatCodeRequest>,
    ) -> Result<Response<pb::ChatCode>, Status> {
        let caller = user(&request)?.clone();
        let id = parse_uuid("chat_code_id", &request.into_inner().chat_code_id)?;
        Ok(Response::new(
            self.auth.revoke_code(&caller, id).await?.to_proto(),
        ))
    }

    async fn confirm_wipe(
        &self,
        request: Request<pb::ConfirmWipeRequest>,
    ) -> Result<Response<pb::ConfirmWipeResponse>, Status> {
        let token = bearer(&request)?;
        let code = self.auth.confirm_wipe(&token).await?;
        Ok(Response::new(pb::ConfirmWipeResponse {
            chat_code_id: code.id.to_string(),
            wipe_confirm_time: code.wipe_confirmed_at.map(timestamp),
        }))
    }

    async fn enroll_totp(
        &self,
        request: Request<pb::EnrollTotpRequest>,
    ) -> Result<Response<pb::EnrollTotpResponse>, Status> {
        let caller = user(&request)?.clone();
        let pass = password("password", request.into_inner().password)?;
        let (secret_base32, otpauth_uri) = self.auth.enroll_totp(&caller, pass).await?;
        Ok(Response::new(pb::EnrollTotpResponse {
            secret_base32,
            otpauth_uri,
        }))
    }

    async fn confirm_totp(
        &self,
        request: Request<pb::ConfirmTotpRequest>,
    ) -> Result<Response<pb::ConfirmTotpResponse>, Status> {
        let caller = user(&request)?.clone();
        let code = request.into_inner().code;
        required("code", &code, 6)?;
        let row = self.auth.confirm_totp(&caller, &code).await?;
        Ok(Response::new(pb::ConfirmTotpResponse {
            user: Some(row.to_proto()),
        }))
    }

    async fn introspect(
        &self,
        request: Request<pb::IntrospectRequest>,
    ) -> Result<Response<pb::IntrospectResponse>, Status> {
        hafen_authn::require_service(&request, &hafen_platform::tls::SERVICES)?;
        let token = Zeroizing::new(request.into_inner().access_token);
        let response = match self.auth.introspect(&token).await? {
            Introspection::Active(p) => pb::IntrospectResponse {
                active: true,
                session_id: p.session_id.to_string(),
                tenant_id: p.tenant_id.to_string(),
                user_id: p.user_id.to_string(),
                role: p.role.to_proto() as i32,
                chat_code_id: p.chat_code_id.to_string(),
                expire_time: Some(timestamp(p.expires_at)),
                inactive_reason: pb::InactiveReason::Unspecified as i32,
            },
            Introspection::Inactive(rejection) => pb::IntrospectResponse {
                active: false,
                inactive_reason: match rejection {
                    Rejection::Unknown => pb::InactiveReason::UnknownToken,
                    Rejection::Expired => pb::InactiveReason::Expired,
                    Rejection::Revoked(RevokeReason::DeviceWiped) => {
                        pb::InactiveReason::DeviceWiped
                    }
                    Rejection::Revoked(_) => pb::InactiveReason::Revoked,
                } as i32,
                ..Default::default()
            },
        };
        Ok(Response::new(response))
    }
}
