//! Running all six services over one database, for tests that log in.

use hafen_proto::auth::v1 as auth_pb;
use hafen_proto::auth::v1::auth_service_client::AuthServiceClient;
use hafen_proto::tenant::v1 as tenant_pb;
use hafen_proto::tenant::v1::tenant_service_client::TenantServiceClient;
use tonic::transport::Channel;

use crate::{TestDatabase, TestSecrets, TestServer};

/// The password of every owner [`TestStack::create_tenant`] creates.
pub const OWNER_PASSWORD: &str = "correct horse battery";

/// A tenant created by [`TestStack::create_tenant`].
#[derive(Debug, Clone)]
pub struct TestTenant {
    /// The tenant's id.
    pub id: String,
    /// Its slug.
    pub slug: String,
    /// The owner's user id.
    pub owner_id: String,
    /// The owner's first chat code.
    pub owner_code: String,
    /// Its id.
    pub owner_code_id: String,
}

/// A member created by [`TestStack::create_member`]: who they are and what they log in with.
#[derive(Debug, Clone)]
pub struct TestMember {
    /// The user's id.
    pub user_id: String,
    /// The username.
    pub username: String,
    /// The password.
    pub password: String,
    /// The chat code of the member's one device.
    pub chat_code: String,
    /// Its id.
    pub chat_code_id: String,
}

/// The six services on port 0 with TLS, sharing a fresh database and Redis namespace;
/// every service resolves tokens through `auth` and delivers its audit events to `audit`.
#[derive(Debug)]
pub struct TestStack {
    /// This test's secrets (and Redis namespace).
    pub secrets: TestSecrets,
    /// This test's database.
    pub db: TestDatabase,
    /// The auth service.
    pub auth: TestServer,
    /// The tenant service, resolving tokens through `auth`.
    pub tenant: TestServer,
    /// The messaging service, resolving tokens through `auth`.
    pub messaging: TestServer,
    /// The audit service.
    pub audit: TestServer,
    /// The retention service.
    pub retention: TestServer,
    /// The webchat service, resolving admins' tokens through `auth`.
    pub webchat: TestServer,
    /// How the audit service was configured, to start it again after [`TestStack::stop_audit`].
    audit_config: hafen_audit::Config,
    /// Where each service serves `/metrics`, by service name, when started with
    /// [`TestStack::start_with_metrics`].
    pub metrics: Vec<(&'static str, std::net::SocketAddr)>,
}

impl TestStack {
    /// Starts the services on this test's Redis namespace.
    pub async fn start() -> Self {
        Self::start_with_redis(None).await
    }

    /// Starts the services on `redis` instead (e.g. a [`crate::PrivateRedis`] to stop later).
    pub async fn start_with_redis(redis: Option<hafen_authn::RedisArgs>) -> Self {
        Self::start_on(crate::TestEnv::get(), redis).await
    }

    /// Starts the services with a further, empty database `name` that tenants can be placed
    /// on (TM3), [`TestDatabase::placement`] of [`TestStack::db`].
    pub async fn start_with_placement(name: &str) -> Self {
        let mut db = TestDatabase::create().await;
        db.add_placement(name).await;
        Self::start_with_database(db, None, false).await
    }

    /// Starts the services, each also serving the process's Prometheus metrics on a port of
    /// its own ([`TestStack::metrics`]).
    pub async fn start_with_metrics() -> Self {
        Self::start_with_database(TestDatabase::create().await, None, true).await
    }

    /// Starts the services on a database of the PostgreSQL server `env` names (e.g. a
    /// [`crate::PrivatePostgres`] to stop later), and on `redis` when given.
    pub async fn start_on(env: &crate::TestEnv, redis: Option<hafen_authn::RedisArgs>) -> Self {
        Self::start_with_database(TestDatabase::create_in(env).await, redis, false).await
    }

    async fn start_with_database(
        db: TestDatabase,
        redis: Option<hafen_authn::RedisArgs>,
        with_metrics: bool,
    ) -> Self {
        let secrets = TestSecrets::generate();
        let mut metrics = Vec::new();
        let mut metrics_port = |service: &'static str| {
            with_metrics.then(|| {
                let free = std::net::TcpListener::bind("127.0.0.1:0")
                    .and_then(|l| l.local_addr())
                    .expect("a free loopback port");
                metrics.push((service, free));
                free
            })
        };
        let redis = redis.unwrap_or_else(|| secrets.redis_args());
        // The audit service first, on a listener bound now, so the others know its address.
        let mut audit_config = secrets.audit_config(&db);
        audit_config.redis = redis.clone();
        audit_config.server.metrics_listen = metrics_port("audit");
        let audit_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the audit service");
        let audit_endpoint = format!(
            "https://127.0.0.1:{}",
            audit_listener.local_addr().expect("bound").port()
        );
        let mut auth_config = secrets.auth_config(&db);
        auth_config.redis = redis.clone();
        auth_config.server.metrics_listen = metrics_port("auth");
        auth_config.audit.audit_endpoint = audit_endpoint.clone();
        let auth = TestServer::spawn(|l, s| hafen_auth::serve(auth_config, l, s)).await;
        audit_config.auth.auth_endpoint = auth.uri();
        let audit_again = audit_config.clone();
        let audit = TestServer::spawn_on(audit_listener, |l, s| {
            hafen_audit::serve(audit_config, l, s)
        })
        .await;
        let mut tenant_config = secrets.tenant_config(&db, &[]);
        tenant_config.auth.auth_endpoint = auth.uri();
        tenant_config.audit.audit_endpoint = audit_endpoint.clone();
        tenant_config.redis = redis.clone();
        tenant_config.server.metrics_listen = metrics_port("tenant");
        let tenant = TestServer::spawn(|l, s| hafen_tenant::serve(tenant_config, l, s)).await;
        let mut messaging_config = secrets.messaging_config(&db);
        messaging_config.auth.auth_endpoint = auth.uri();
        messaging_config.audit.audit_endpoint = audit_endpoint.clone();
        messaging_config.redis = redis.clone();
        messaging_config.server.metrics_listen = metrics_port("messaging");
        let messaging =
            TestServer::spawn(|l, s| hafen_messaging::serve(messaging_config, l, s)).await;
        let mut retention_config = secrets.retention_config(&db);
        retention_config.auth.auth_endpoint = auth.uri();
        retention_config.audit.audit_endpoint = audit_endpoint.clone();
        retention_config.redis = redis.clone();
        retention_config.server.metrics_listen = metrics_port("retention");
        let retention =
            TestServer::spawn(|l, s| hafen_retention::serve(retention_config, l, s)).await;
        let mut webchat_config = secrets.webchat_config(&db);
        webchat_config.auth.auth_endpoint = auth.uri();
        webchat_config.audit.audit_endpoint = audit_endpoint;
        webchat_config.redis = redis;
        webchat_config.server.metrics_listen = metrics_port("webchat");
        let webchat = TestServer::spawn(|l, s| hafen_webchat::serve(webchat_config, l, s)).await;
        Self {
            secrets,
            db,
            auth,
            tenant,
            messaging,
            audit,
            retention,
            webchat,
            audit_config: audit_again,
            metrics,
        }
    }

    /// Stops the audit service (the others keep their events in their outboxes meanwhile).
    pub async fn stop_audit(&mut self) {
        self.audit
            .stop()
            .await
            .expect("the audit service stops cleanly");
    }

    /// Starts the audit service again on its old address.
    pub async fn start_audit(&mut self) {
        let listener = tokio::net::TcpListener::bind(self.audit.addr())
            .await
            .expect("bind the audit service's address again");
        let config = self.audit_config.clone();
        self.audit = TestServer::spawn_on(listener, |l, s| hafen_audit::serve(config, l, s)).await;
    }

    /// A client of the messaging service.
    pub async fn messaging_client(
        &self,
    ) -> hafen_proto::messaging::v1::messaging_service_client::MessagingServiceClient<Channel> {
        hafen_proto::messaging::v1::messaging_service_client::MessagingServiceClient::new(
            self.messaging.channel(&self.secrets).await,
        )
    }

    /// A client of the auth service.
    pub async fn auth_client(&self) -> AuthServiceClient<Channel> {
        AuthServiceClient::new(self.auth.channel(&self.secrets).await)
    }

    /// A client of the audit service.
    pub async fn audit_client(
        &self,
    ) -> hafen_proto::audit::v1::audit_service_client::AuditServiceClient<Channel> {
        hafen_proto::audit::v1::audit_service_client::AuditServiceClient::new(
            self.audit.channel(&self.secrets).await,
        )
    }

    /// Switches the tenant's feature `webchat` on or off, as its `owner` (an access token).
    pub async fn set_webchat_feature(&self, owner: &str, on: bool) {
        self.tenant_client()
            .await
            .update_tenant_settings(crate::with_token(
                owner,
                tenant_pb::UpdateTenantSettingsRequest {
                    settings: Some(tenant_pb::TenantSettings {
                        features: Some(tenant_pb::Features { webchat: on }),
                        ..Default::default()
                    }),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec!["features.webchat".into()],
                    }),
                    ..Default::default()
                },
            ))
            .await
            .expect("UpdateTenantSettings features.webchat");
    }

    /// A client of the webchat service's WidgetService (tenants' admins).
    pub async fn widget_client(
        &self,
    ) -> hafen_proto::webchat::v1::widget_service_client::WidgetServiceClient<Channel> {
        hafen_proto::webchat::v1::widget_service_client::WidgetServiceClient::new(
            self.webchat.channel(&self.secrets).await,
        )
    }

    /// A client of the webchat service's VisitorService (visitors).
    pub async fn visitor_client(
        &self,
    ) -> hafen_proto::webchat::v1::visitor_service_client::VisitorServiceClient<Channel> {
        hafen_proto::webchat::v1::visitor_service_client::VisitorServiceClient::new(
            self.webchat.channel(&self.secrets).await,
        )
    }

    /// A client of the retention service.
    pub async fn retention_client(
        &self,
    ) -> hafen_proto::retention::v1::retention_service_client::RetentionServiceClient<Channel> {
        hafen_proto::retention::v1::retention_service_client::RetentionServiceClient::new(
            self.retention.channel(&self.secrets).await,
        )
    }

    /// A client of the tenant service.
    pub async fn tenant_client(&self) -> TenantServiceClient<Channel> {
        TenantServiceClient::new(self.tenant.channel(&self.secrets).await)
    }

    /// Creates a tenant `slug` whose owner is `owner` with [`OWNER_PASSWORD`].
    pub async fn create_tenant(&self, slug: &str) -> TestTenant {
        let request = tenant_pb::CreateTenantRequest {
            slug: slug.to_owned(),
            display_name: format!("Org {slug}"),
            owner_username: "owner".to_owned(),
            owner_display_name: "The Owner".to_owned(),
            owner_password: OWNER_PASSWORD.to_owned(),
            dpa_version: "2025-01".to_owned(),
            region: "eu-central".to_owned(),
            ..Default::default()
        };
        let created = self
            .tenant_client()
            .await
            .create_tenant(self.secrets.operator(request))
            .await
            .expect("CreateTenant")
            .into_inner();
        TestTenant {
            id: created.tenant.map(|t| t.tenant_id).unwrap_or_default(),
            slug: slug.to_owned(),
            owner_id: created.owner_user_id,
            owner_code: created.owner_chat_code,
            owner_code_id: created.owner_chat_code_id,
        }
    }

    /// Logs in.
    pub async fn login(
        &self,
        slug: &str,
        username: &str,
        password: &str,
        chat_code: &str,
    ) -> Result<auth_pb::LoginResponse, tonic::Status> {
        self.auth_client()
            .await
            .login(auth_pb::LoginRequest {
                tenant_slug: slug.to_owned(),
                username: username.to_owned(),
                password: password.to_owned(),
                chat_code: chat_code.to_owned(),
                device_label: String::new(),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// Creates a member `username` with `password` and a chat code for one device, as the
    /// owner (or an admin) holding `admin_token`; logs nobody in.
    pub async fn create_member(
        &self,
        admin_token: &str,
        username: &str,
        password: &str,
    ) -> TestMember {
        let mut auth = self.auth_client().await;
        let user = auth
            .create_user(with_token(
                admin_token,
                auth_pb::CreateUserRequest {
                    username: username.to_owned(),
                    display_name: username.to_owned(),
                    role: hafen_proto::common::v1::Role::Member as i32,
                    credential: Some(auth_pb::create_user_request::Credential::Password(
                        password.to_owned(),
                    )),
                    ..Default::default()
                },
            ))
            .await
            .expect("CreateUser")
            .into_inner();
        let issued = auth
            .issue_chat_code(with_token(
                admin_token,
                auth_pb::IssueChatCodeRequest {
                    user_id: user.user_id.clone(),
                    device_label: format!("{username}'s device"),
                },
            ))
            .await
            .expect("IssueChatCode")
            .into_inner();
        let chat_code_id = issued
            .chat_code
            .map(|code| code.chat_code_id)
            .unwrap_or_default();
        TestMember {
            user_id: user.user_id,
            username: username.to_owned(),
            password: password.to_owned(),
            chat_code: issued.code,
            chat_code_id,
        }
    }

    /// Logs `member` of `tenant` in on its device, opening a session.
    pub async fn login_member(
        &self,
        tenant: &TestTenant,
        member: &TestMember,
    ) -> auth_pb::LoginResponse {
        self.login(
            &tenant.slug,
            &member.username,
            &member.password,
            &member.chat_code,
        )
        .await
        .expect("member login")
    }

    /// [`TestStack::create_member`] in `tenant`, then [`TestStack::login_member`]: a member
    /// with a chat code and a session.
    pub async fn create_logged_in_member(
        &self,
        tenant: &TestTenant,
        admin_token: &str,
        username: &str,
        password: &str,
    ) -> (TestMember, auth_pb::LoginResponse) {
        let member = self.create_member(admin_token, username, password).await;
        let session = self.login_member(tenant, &member).await;
        (member, session)
    }

    /// A channel titled `title`, created by the holder of `token`; its conversation id.
    pub async fn create_channel(&self, token: &str, title: &str) -> String {
        use hafen_proto::messaging::v1 as msg_pb;
        self.messaging_client()
            .await
            .create_conversation(with_token(
                token,
                msg_pb::CreateConversationRequest {
                    kind: msg_pb::ConversationKind::Channel as i32,
                    title: title.into(),
                    ..Default::default()
                },
            ))
            .await
            .expect("CreateConversation of a channel")
            .into_inner()
            .conversation_id
    }

    /// Logs the owner of `tenant` in.
    pub async fn login_owner(&self, tenant: &TestTenant) -> auth_pb::LoginResponse {
        self.login(&tenant.slug, "owner", OWNER_PASSWORD, &tenant.owner_code)
            .await
            .expect("owner login")
    }
}

/// A request carrying `access_token`.
pub fn with_token<T>(access_token: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let value = format!("Bearer {access_token}")
        .parse()
        .expect("token is valid metadata");
    request.metadata_mut().insert("authorization", value);
    request
}
