//! Resolving access tokens through the auth service's `Introspect` (mutual TLS).

use std::time::Duration;

use futures::future::BoxFuture;
use hafen_proto::auth::v1::auth_service_client::AuthServiceClient;
use hafen_proto::auth::v1::{InactiveReason, IntrospectRequest};
use tonic::Status;
use tonic::transport::Channel;
use uuid::Uuid;

use crate::principal::{Principal, Rejection, RevokeReason, Role};
use crate::{Introspection, Resolver};

/// Where the auth service is, for services that resolve tokens through it.
#[derive(clap::Args, Clone, Debug)]
pub struct AuthEndpointArgs {
    /// URL of the auth service, e.g. `https://hafen-auth:50051`. Its certificate must carry
    /// the host name and be signed by --tls-ca; this service presents its own certificate.
    #[arg(
        long,
        env = "HAFEN_AUTH_ENDPOINT",
        default_value = "https://127.0.0.1:50051"
    )]
    pub auth_endpoint: String,

    /// Name the auth service's certificate must carry; by default the endpoint's host.
    #[arg(long, env = "HAFEN_AUTH_SERVER_NAME")]
    pub auth_server_name: Option<String>,
}

/// `Introspect` over a lazily connected, TLS-secured channel.
#[derive(Debug, Clone)]
pub struct RemoteIntrospect {
    client: AuthServiceClient<Channel>,
}

impl RemoteIntrospect {
    /// A resolver calling the auth service at `args`, presenting this service's certificate
    /// from `tls` (Introspect accepts Hafen services only).
    pub fn new(
        args: &AuthEndpointArgs,
        tls: &hafen_platform::TlsMaterial,
    ) -> Result<Self, tonic::transport::Error> {
        let channel = tls.internal_channel(
            &args.auth_endpoint,
            args.auth_server_name.as_deref(),
            Duration::from_secs(5),
        )?;
        Ok(Self {
            client: AuthServiceClient::new(channel),
        })
    }
}

impl Resolver for RemoteIntrospect {
    fn introspect(&self, token: &str) -> BoxFuture<'static, Result<Introspection, Status>> {
        let mut client = self.client.clone();
        let mut request = tonic::Request::new(IntrospectRequest {
            access_token: token.to_owned(),
        });
        let span =
            hafen_platform::telemetry::client_span("hafen.auth.v1.AuthService", "Introspect");
        hafen_platform::telemetry::inject(&span, &mut request);
        Box::pin(tracing::Instrument::instrument(
            async move {
                let response = client.introspect(request).await.map_err(|status| {
                    tracing::warn!(code = ?status.code(), "auth service unavailable for introspection");
                    hafen_platform::status::unavailable("cannot verify the session right now")
                })?;
                Ok(from_response(&response.into_inner()))
            },
            span,
        ))
    }
}

fn from_response(response: &hafen_proto::auth::v1::IntrospectResponse) -> Introspection {
    let parse = |value: &str| Uuid::try_parse(value).ok();
    if response.active {
        let principal = (|| {
            Some(Principal {
                session_id: parse(&response.session_id)?,
                tenant_id: parse(&response.tenant_id)?,
                user_id: parse(&response.user_id)?,
                role: Role::from_proto(response.role)?,
                chat_code_id: parse(&response.chat_code_id)?,
                expires_at: response.expire_time.as_ref().and_then(|t| {
                    chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).ok()?)
                })?,
            })
        })();
        return match principal {
            Some(principal) => Introspection::Active(principal),
            None => Introspection::Inactive(Rejection::Unknown),
        };
    }
    let rejection = match InactiveReason::try_from(response.inactive_reason) {
        Ok(InactiveReason::Expired) => Rejection::Expired,
        Ok(InactiveReason::DeviceWiped) => Rejection::Revoked(RevokeReason::DeviceWiped),
        Ok(InactiveReason::Revoked) => Rejection::Revoked(RevokeReason::Logout),
        _ => Rejection::Unknown,
    };
    Introspection::Inactive(rejection)
}
