//! The Rust client for Hafen, a privacy-first messaging backend.
//!
//! - [`Hafen::connect`] opens TLS channels to the six services (your CA file, or the system's
//!   roots); nothing connects until the first call.
//! - [`Hafen::login`] signs in with tenant, username, password and the device's chat code;
//!   the access token is then refreshed in the background before it expires.
//!   [`Hafen::resume`] continues a session stored earlier ([`Session`] is serde-serialisable;
//!   [`Hafen::on_session_change`] tells you when to store it again).
//! - Typed clients for every public RPC: [`Hafen::auth`], [`Hafen::messaging`],
//!   [`Hafen::tenant`], [`Hafen::retention`], [`Hafen::audit`], [`Hafen::widgets`]. They carry
//!   the session's access token; a few common calls also have shortcuts
//!   ([`Hafen::send_message`], …).
//! - [`Visitor`]: a website visitor's side of the website chat (no account: a visitor token
//!   from `StartVisit`), for widgets and tests.
//! - [`Hafen::subscribe`] follows the live events of all my conversations and reconnects with
//!   back-off, resuming from the last cursor, so no message is missed (BX4).
//! - Remote wipe (OC5): when the server says `DEVICE_WIPED` — in an answer, a stream or a
//!   refresh — the SDK calls your [`Hafen::on_wipe`] handler (delete local data there),
//!   confirms the wipe to the server and refuses every further call with [`Error::Wiped`].
//!
//! Every failure is one [`Error`]; a server's refusal carries its stable `reason` (e.g.
//! `LOGIN_FAILED`, `NOT_FOUND`) and, for bad input, the field.
//!
//! ```no_run
//! use futures::StreamExt;
//! use hafen_sdk::{Config, Hafen, Login};
//!
//! # async fn chat() -> Result<(), hafen_sdk::Error> {
//! let ca = std::fs::read(".dev/certs/ca.pem").map_err(|e| hafen_sdk::Error::Config(e.to_string()))?;
//! let hafen = Hafen::connect(Config::local().with_ca_pem(ca))?;
//! hafen.on_wipe(|| {
//!     // Delete everything this device stored locally.
//! });
//! hafen
//!     .login(Login {
//!         tenant: "demo".into(),
//!         username: "alice".into(),
//!         password: "the password".into(),
//!         chat_code: "ABCD2345EF".into(),
//!         device_label: "laptop".into(),
//!     })
//!     .await?;
//! let conversations = hafen.conversations().await?;
//! if let Some(first) = conversations.first() {
//!     hafen.send_message(&first.conversation_id, "Hello!").await?;
//! }
//! let mut events = hafen.subscribe(None);
//! while let Some(event) = events.next().await {
//!     println!("{:?}", event?.event);
//! }
//! # Ok(())
//! # }
//! ```

/// The README's examples, compiled by `cargo test --doc`.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;

mod error;
mod session;
mod subscribe;
mod visitor;
mod watch;

use std::sync::Arc;
use std::time::Duration;

use hafen_proto::audit::v1::audit_service_client::AuditServiceClient;
use hafen_proto::auth::v1 as auth_pb;
use hafen_proto::auth::v1::auth_service_client::AuthServiceClient;
use hafen_proto::messaging::v1 as pb;
use hafen_proto::messaging::v1::messaging_service_client::MessagingServiceClient;
use hafen_proto::retention::v1::retention_service_client::RetentionServiceClient;
use hafen_proto::tenant::v1::tenant_service_client::TenantServiceClient;
use hafen_proto::webchat::v1::widget_service_client::WidgetServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

pub use error::Error;
pub use hafen_proto as proto;
pub use session::Session;
pub use subscribe::Subscription;
pub use visitor::{Visitor, VisitorAuth, VisitorClient};
pub use watch::Bearer;
use watch::WipeWatch;

use crate::session::State;

/// A channel that carries the session's token and watches for the wipe signal.
pub type Authed = InterceptedService<WipeWatch<Channel>, Bearer>;

/// Where the six services are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    /// `hafen.auth.v1.AuthService`.
    pub auth: String,
    /// `hafen.messaging.v1.MessagingService`.
    pub messaging: String,
    /// `hafen.tenant.v1.TenantService`.
    pub tenant: String,
    /// `hafen.retention.v1.RetentionService`.
    pub retention: String,
    /// `hafen.audit.v1.AuditService`.
    pub audit: String,
    /// `hafen.webchat.v1.WidgetService` and `VisitorService`.
    pub webchat: String,
}

impl Endpoints {
    /// The ports `make run` (`hafen dev`) serves on `host`: 50051 to 50056.
    pub fn dev(host: &str) -> Self {
        let at = |port: u16| format!("https://{host}:{port}");
        Self {
            auth: at(50051),
            messaging: at(50052),
            tenant: at(50053),
            retention: at(50054),
            audit: at(50055),
            webchat: at(50056),
        }
    }
}

/// How to reach Hafen.
#[derive(Debug, Clone)]
pub struct Config {
    /// The services' URLs (`https://…`).
    pub endpoints: Endpoints,
    /// PEM of the CA that signed the servers' certificates; `None`: the system's roots.
    pub ca_pem: Option<Vec<u8>>,
    /// The name the servers' certificates carry; by default each endpoint's host.
    pub server_name: Option<String>,
    /// Longest wait for one unary call.
    pub timeout: Duration,
}

impl Config {
    /// A stack started by `make run` on this machine (certificates for `localhost`).
    pub fn local() -> Self {
        Self {
            endpoints: Endpoints::dev("127.0.0.1"),
            ca_pem: None,
            server_name: Some("localhost".to_owned()),
            timeout: Duration::from_secs(30),
        }
    }

    /// The same, trusting the CA in `pem`.
    pub fn with_ca_pem(mut self, pem: Vec<u8>) -> Self {
        self.ca_pem = Some(pem);
        self
    }
}

/// What a login needs.
#[derive(Clone)]
pub struct Login {
    /// The tenant's slug.
    pub tenant: String,
    /// The username.
    pub username: String,
    /// The password.
    pub password: String,
    /// The chat code this device was given.
    pub chat_code: String,
    /// A label for the device (empty: the chat code's label).
    pub device_label: String,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login")
            .field("tenant", &self.tenant)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// A connection to Hafen, with at most one session. Cheap to clone; clones share the session.
#[derive(Clone, Debug)]
pub struct Hafen {
    channels: Arc<Channels>,
    state: Arc<State>,
}

#[derive(Debug)]
struct Channels {
    auth: Channel,
    messaging: Channel,
    tenant: Channel,
    retention: Channel,
    audit: Channel,
    webchat: Channel,
}

pub(crate) fn channel(url: &str, config: &Config) -> Result<Channel, Error> {
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|err| Error::Config(format!("{url}: {err}")))?;
    let name = config
        .server_name
        .clone()
        .or_else(|| {
            endpoint
                .uri()
                .host()
                .map(|h| h.trim_matches(['[', ']']).to_owned())
        })
        .ok_or_else(|| Error::Config(format!("{url}: no host")))?;
    let tls = match &config.ca_pem {
        Some(pem) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)),
        None => ClientTlsConfig::new().with_native_roots(),
    }
    .domain_name(name);
    Ok(endpoint
        .tls_config(tls)
        .map_err(|err| Error::Config(format!("{url}: {err}")))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(config.timeout)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true)
        .connect_lazy())
}

impl Hafen {
    /// Prepares channels to the services of `config`; nothing connects before the first call.
    pub fn connect(config: Config) -> Result<Self, Error> {
        let streaming = Config {
            // Subscriptions are long: they are not cut by the unary timeout.
            timeout: Duration::from_secs(365 * 24 * 3600),
            ..config.clone()
        };
        let channels = Channels {
            auth: channel(&config.endpoints.auth, &config)?,
            messaging: channel(&config.endpoints.messaging, &streaming)?,
            tenant: channel(&config.endpoints.tenant, &config)?,
            retention: channel(&config.endpoints.retention, &config)?,
            audit: channel(&config.endpoints.audit, &streaming)?,
            webchat: channel(&config.endpoints.webchat, &config)?,
        };
        let state = Arc::new(State::new(channels.auth.clone()));
        Ok(Self {
            channels: Arc::new(channels),
            state,
        })
    }

    /// Calls `handler` once, when the server says this device was wiped (OC5): delete the
    /// device's local data there. The wipe is then confirmed to the server.
    pub fn on_wipe(&self, handler: impl Fn() + Send + Sync + 'static) {
        self.state.set_wipe_handler(Box::new(handler));
    }

    /// Calls `listener` with the session whenever it changes (a login, each refresh) and with
    /// `None` when it ended (logout, wipe, revocation), so an application can keep it stored.
    pub fn on_session_change(&self, listener: impl Fn(Option<&Session>) + Send + Sync + 'static) {
        self.state.set_session_listener(Box::new(listener));
    }

    /// Signs in and keeps the session fresh in the background.
    pub async fn login(&self, login: Login) -> Result<Session, Error> {
        self.state.refuse_if_wiped()?;
        let response = AuthServiceClient::new(self.channels.auth.clone())
            .login(auth_pb::LoginRequest {
                tenant_slug: login.tenant.clone(),
                username: login.username,
                password: login.password,
                chat_code: login.chat_code,
                device_label: login.device_label,
            })
            .await?
            .into_inner();
        let session = Session::from_login(&login.tenant, &response);
        self.state.start(session.clone());
        Ok(session)
    }

    /// Continues a stored session (refreshing it first when its access token has expired).
    pub async fn resume(&self, session: Session) -> Result<Session, Error> {
        self.state.refuse_if_wiped()?;
        self.state.start(session);
        self.state.ensure_fresh().await?;
        self.session().ok_or(Error::NotLoggedIn)
    }

    /// Calls as the platform operator with `platform_token` (operator tools: creating and
    /// listing tenants) instead of a user's session.
    pub fn act_as_operator(&self, platform_token: &str) {
        self.state.set_fixed_token(platform_token.trim().to_owned());
    }

    /// The current session, if any.
    pub fn session(&self) -> Option<Session> {
        self.state.session()
    }

    /// Whether this device was wiped.
    pub fn is_wiped(&self) -> bool {
        self.state.is_wiped()
    }

    /// Ends the session on the server and here.
    pub async fn logout(&self) -> Result<(), Error> {
        self.state.ensure_fresh().await?;
        let result = self.auth().logout(auth_pb::LogoutRequest {}).await;
        self.state.end();
        result.map(drop).map_err(|status| self.state.error(status))
    }

    fn authed(&self, channel: &Channel) -> Authed {
        InterceptedService::new(
            WipeWatch::new(channel.clone(), self.state.clone()),
            Bearer::new(self.state.clone()),
        )
    }

    /// `hafen.auth.v1.AuthService` with this session's token.
    pub fn auth(&self) -> AuthServiceClient<Authed> {
        AuthServiceClient::new(self.authed(&self.channels.auth))
    }

    /// `hafen.messaging.v1.MessagingService` with this session's token.
    pub fn messaging(&self) -> MessagingServiceClient<Authed> {
        MessagingServiceClient::new(self.authed(&self.channels.messaging))
    }

    /// `hafen.tenant.v1.TenantService` with this session's token.
    pub fn tenant(&self) -> TenantServiceClient<Authed> {
        TenantServiceClient::new(self.authed(&self.channels.tenant))
    }

    /// `hafen.retention.v1.RetentionService` with this session's token.
    pub fn retention(&self) -> RetentionServiceClient<Authed> {
        RetentionServiceClient::new(self.authed(&self.channels.retention))
    }

    /// `hafen.audit.v1.AuditService` with this session's token.
    pub fn audit(&self) -> AuditServiceClient<Authed> {
        AuditServiceClient::new(self.authed(&self.channels.audit))
    }

    /// `hafen.webchat.v1.WidgetService` (the website chat's widgets; admins) with this
    /// session's token.
    pub fn widgets(&self) -> WidgetServiceClient<Authed> {
        WidgetServiceClient::new(self.authed(&self.channels.webchat))
    }

    /// Turns a status from a typed client into an [`Error`] (handling a wipe signal).
    pub async fn check<T>(
        &self,
        result: Result<tonic::Response<T>, tonic::Status>,
    ) -> Result<T, Error> {
        match result {
            Ok(response) => Ok(response.into_inner()),
            // Refused here, before it left: the device was wiped.
            Err(_) if self.state.is_wiped() => Err(Error::Wiped),
            Err(status) => Err(self.state.fail(status).await),
        }
    }

    /// Runs `call` and, when it was refused because the access token was replaced meanwhile
    /// (a refresh in flight), once more with the new one.
    async fn retrying<T, F, Fut>(&self, call: F) -> Result<T, Error>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.state.ensure_fresh().await?;
        let token = self.state.access_token();
        let result = call().await;
        if let Err(status) = &result
            && status.code() == tonic::Code::Unauthenticated
            && self.state.access_token() != token
            && !self.state.is_wiped()
        {
            return self.check(call().await).await;
        }
        self.check(result).await
    }

    /// Sends `body` to a conversation (with a fresh request id, so a retry of this call by
    /// the transport cannot duplicate it).
    pub async fn send_message(
        &self,
        conversation_id: &str,
        body: &str,
    ) -> Result<pb::Message, Error> {
        let request = pb::SendMessageRequest {
            request_id: uuid::Uuid::new_v4().to_string(),
            conversation_id: conversation_id.to_owned(),
            body: body.to_owned(),
        };
        // The same request id on a retry: the server answers with the same message.
        self.retrying(|| {
            let mut client = self.messaging();
            let request = request.clone();
            async move { client.send_message(request).await }
        })
        .await
    }

    /// Switches the organisation's website chat (its optional feature `webchat`, off by
    /// default) on or off; widgets serve visitors only while it is on. Admins and the owner.
    pub async fn set_webchat_feature(&self, on: bool) -> Result<(), Error> {
        let request = webchat_feature(on);
        self.retrying(|| {
            let mut client = self.tenant();
            let request = request.clone();
            async move { client.update_tenant_settings(request).await }
        })
        .await
        .map(drop)
    }

    /// My conversations (all pages).
    pub async fn conversations(&self) -> Result<Vec<pb::Conversation>, Error> {
        let mut all = Vec::new();
        let mut page_token = String::new();
        loop {
            let request = pb::ListConversationsRequest {
                page_size: 500,
                page_token: page_token.clone(),
            };
            let page = self
                .retrying(|| {
                    let mut client = self.messaging();
                    let request = request.clone();
                    async move { client.list_conversations(request).await }
                })
                .await?;
            all.extend(page.conversations);
            if page.next_page_token.is_empty() {
                return Ok(all);
            }
            page_token = page.next_page_token;
        }
    }

    /// The newest `limit` messages of a conversation, oldest first.
    pub async fn history(
        &self,
        conversation_id: &str,
        limit: usize,
    ) -> Result<Vec<pb::Message>, Error> {
        self.state.ensure_fresh().await?;
        let mut newest_first = Vec::new();
        let mut page_token = String::new();
        while newest_first.len() < limit {
            let result = self
                .messaging()
                .list_messages(pb::ListMessagesRequest {
                    conversation_id: conversation_id.to_owned(),
                    direction: pb::Direction::Backward as i32,
                    start_sequence: 0,
                    page_size: i32::try_from(limit - newest_first.len())
                        .unwrap_or(500)
                        .min(500),
                    page_token: page_token.clone(),
                })
                .await;
            let page = self.check(result).await?;
            newest_first.extend(page.messages);
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        newest_first.truncate(limit);
        newest_first.reverse();
        Ok(newest_first)
    }

    /// The live events of all my conversations after `cursor` (`None`: from now on), as a
    /// stream that reconnects with back-off and resumes from the last cursor it delivered,
    /// so no event is missed or repeated (BX4). It ends after an error that retrying cannot
    /// fix (e.g. [`Error::Wiped`], which also runs the wipe handler).
    pub fn subscribe(&self, cursor: Option<String>) -> Subscription {
        Subscription::start(self.clone(), cursor)
    }
}

/// The UpdateTenantSettings request that switches the feature `webchat` on or off.
pub fn webchat_feature(on: bool) -> hafen_proto::tenant::v1::UpdateTenantSettingsRequest {
    use hafen_proto::tenant::v1 as tenant_pb;
    tenant_pb::UpdateTenantSettingsRequest {
        settings: Some(tenant_pb::TenantSettings {
            features: Some(tenant_pb::Features { webchat: on }),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["features.webchat".into()],
        }),
        ..Default::default()
    }
}
