//! Services on port 0 with TLS, and clients connected to them.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use hafen_platform::tls::{DEV_SERVER_NAME, DevPki, SERVICES};
use hafen_platform::{ServerArgs, TlsArgs};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::TestDatabase;

/// A test's own secrets, in a temporary directory: a throwaway CA with a certificate for
/// every service (and one for a Redis server), a master key, the key files of the services
/// that get no master key, and the operator's platform token.
#[derive(Debug)]
pub struct TestSecrets {
    dir: tempfile::TempDir,
    ca_pem: String,
    platform_token: String,
    redis: crate::TestRedis,
}

impl TestSecrets {
    /// Generates a new CA, service certificates, master key and platform token.
    pub fn generate() -> Self {
        crate::init_test_logging();
        // Like the development CA, this one also certifies a Redis server: a certificate of
        // the service CA that names no Hafen service.
        let names: Vec<&str> = SERVICES.iter().copied().chain(["redis"]).collect();
        let pki = DevPki::generate("Hafen test CA", &names).expect("generate test PKI");
        let dir = tempfile::tempdir().expect("temporary directory for secrets");
        pki.write_to(&dir.path().join("certs"))
            .expect("write test certificates");
        let master = hafen_crypto::MasterKey::load_or_create(&dir.path().join("master.key"))
            .expect("write test master key");
        for service in ["auth", "audit", "retention"] {
            let purposes = hafen_crypto::subkeys::needed_by(service).expect("a key file service");
            hafen_crypto::SubKeys::derive(&master, purposes)
                .write(&dir.path().join(format!("{service}.keys")))
                .expect("write a service's key file");
        }
        let token_path = dir.path().join("platform-token");
        hafen_authn::PlatformToken::load_or_create(&token_path).expect("write platform token");
        let platform_token = std::fs::read_to_string(&token_path).expect("read platform token");
        Self {
            ca_pem: pki.ca_pem,
            dir,
            platform_token,
            redis: crate::TestRedis::new(),
        }
    }

    /// This test's Redis namespace.
    pub fn redis(&self) -> &crate::TestRedis {
        &self.redis
    }

    /// Redis settings that keep every key and channel in this test's namespace.
    pub fn redis_args(&self) -> hafen_authn::RedisArgs {
        self.redis.args()
    }

    /// Configuration of the auth service on `database` with these secrets (bcrypt cost 4).
    pub fn auth_config(&self, database: &TestDatabase) -> hafen_auth::Config {
        hafen_auth::Config {
            server: self.server_args(hafen_auth::NAME),
            browsers: hafen_platform::web::BrowserArgs::default(),
            databases: database.databases(),
            redis: self.redis_args(),
            audit: self.audit_args(),
            keys_file: self.keys_file(hafen_auth::NAME),
            bcrypt_cost: 4,
            min_password_chars: 10,
            access_ttl: Duration::from_secs(15 * 60),
            refresh_ttl: Duration::from_secs(30 * 24 * 3600),
            login_free_attempts: 5,
            login_max_backoff: Duration::from_secs(15 * 60),
            trusted_proxies: Vec::new(),
            client_address_header: "x-forwarded-for".to_owned(),
            erasure_grace: Duration::ZERO,
        }
    }

    /// The key file of `service` (auth, audit or retention): the sub-keys it needs, derived
    /// from the master key (`hafen-tenant derive-keys`).
    pub fn keys_file(&self, service: &str) -> std::path::PathBuf {
        self.dir.path().join(format!("{service}.keys"))
    }

    /// The master key file.
    pub fn master_key_file(&self) -> std::path::PathBuf {
        self.dir.path().join("master.key")
    }

    /// The master key.
    pub fn master_key(&self) -> hafen_crypto::MasterKey {
        hafen_crypto::MasterKey::load(&self.master_key_file()).expect("read test master key")
    }

    /// The platform token file.
    pub fn platform_token_file(&self) -> std::path::PathBuf {
        self.dir.path().join("platform-token")
    }

    /// The operator's platform token.
    pub fn platform_token(&self) -> &str {
        &self.platform_token
    }

    /// A request carrying the operator's platform token.
    pub fn operator<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        let value = format!("Bearer {}", self.platform_token)
            .parse()
            .expect("token is valid metadata");
        request.metadata_mut().insert("authorization", value);
        request
    }

    /// Configuration of the messaging service on `database` with these secrets; it resolves
    /// tokens through an auth service that the caller points `auth.auth_endpoint` at.
    pub fn messaging_config(&self, database: &TestDatabase) -> hafen_messaging::Config {
        hafen_messaging::Config {
            server: self.server_args(hafen_messaging::NAME),
            browsers: hafen_platform::web::BrowserArgs::default(),
            databases: database.databases(),
            redis: self.redis_args(),
            audit: self.audit_args(),
            auth: self.auth_args(),
            master_key_file: self.master_key_file(),
            max_body_bytes: 16 * 1024,
            max_queued_sends: 10_000,
            stream_poll: Duration::from_millis(500),
            key_cache_size: std::num::NonZeroUsize::new(1000).expect("non-zero"),
        }
    }

    /// Configuration of the webchat service on `database` with these secrets; it resolves
    /// admins' tokens through an auth service that the caller points `auth.auth_endpoint` at.
    pub fn webchat_config(&self, database: &TestDatabase) -> hafen_webchat::Config {
        hafen_webchat::Config {
            server: self.server_args(hafen_webchat::NAME),
            databases: database.databases(),
            redis: self.redis_args(),
            audit: self.audit_args(),
            auth: self.auth_args(),
            master_key_file: self.master_key_file(),
            key_cache_size: std::num::NonZeroUsize::new(1000).expect("non-zero"),
            max_queued_messages: 10_000,
            stream_poll: Duration::from_millis(100),
            widget_dir: None,
            limits: hafen_webchat::limits::LimitArgs {
                visits_per_address: 1000,
                visits_per_widget: 1000,
                calls_per_visitor: 1000,
                lookups_per_address: 1000,
                limit_window: Duration::from_secs(60),
                trusted_proxies: Vec::new(),
                client_address_header: "x-forwarded-for".to_owned(),
            },
        }
    }

    /// Configuration of the tenant service on `database` (and its placements), with further
    /// `placements`, using
    /// these secrets (bcrypt cost 4: tests need not be slow).
    pub fn tenant_config(
        &self,
        database: &TestDatabase,
        placements: &[(&str, &TestDatabase)],
    ) -> hafen_tenant::Config {
        hafen_tenant::Config {
            server: self.server_args(hafen_tenant::NAME),
            redis: self.redis_args(),
            audit: self.audit_args(),
            auth: self.auth_args(),
            databases: {
                let mut databases = database.databases();
                databases.placements.extend(
                    placements
                        .iter()
                        .map(|(name, db)| ((*name).to_owned(), db.url().to_owned())),
                );
                databases
            },
            operator: hafen_authn::OperatorArgs {
                platform_token_file: self.platform_token_file(),
            },
            master_key_file: self.master_key_file(),
            dpa_versions: vec!["2025-01".to_owned()],
            regions: vec!["eu-central".to_owned()],
            bcrypt_cost: 4,
            min_password_chars: 10,
        }
    }

    /// Where the auth service is: nowhere yet; point `auth_endpoint` at a running one.
    pub fn auth_args(&self) -> hafen_authn::remote::AuthEndpointArgs {
        hafen_authn::remote::AuthEndpointArgs {
            auth_endpoint: "https://127.0.0.1:9".to_owned(),
            auth_server_name: Some(DEV_SERVER_NAME.to_owned()),
        }
    }

    /// Where the audit service is: nowhere yet (events wait in the outbox); point
    /// `audit_endpoint` at a running one. The relay looks every 200 ms.
    pub fn audit_args(&self) -> hafen_events::AuditEndpointArgs {
        hafen_events::AuditEndpointArgs {
            audit_endpoint: "https://127.0.0.1:9".to_owned(),
            audit_server_name: Some(DEV_SERVER_NAME.to_owned()),
            audit_relay_interval: Duration::from_millis(200),
        }
    }

    /// Configuration of the audit service on `database`; it resolves tokens through an auth
    /// service that the caller points `auth.auth_endpoint` at.
    pub fn audit_config(&self, database: &TestDatabase) -> hafen_audit::Config {
        hafen_audit::Config {
            server: self.server_args(hafen_audit::NAME),
            databases: database.databases(),
            operator: hafen_authn::OperatorArgs {
                platform_token_file: self.platform_token_file(),
            },
            redis: self.redis_args(),
            auth: self.auth_args(),
            record: hafen_audit::RecordArgs {
                processor_name: "Test Operator".to_owned(),
                processor_contact: "dpo@operator.test".to_owned(),
                backup_policy: "daily, kept 6 weeks".to_owned(),
            },
            keys_file: self.keys_file(hafen_audit::NAME),
        }
    }

    /// Configuration of the retention service on `database`; point `auth.auth_endpoint` and
    /// `audit.audit_endpoint` at running services. The scheduled purge runs hourly (tests
    /// call RunPurge); batches of 100 without pause.
    pub fn retention_config(&self, database: &TestDatabase) -> hafen_retention::Config {
        hafen_retention::Config {
            server: self.server_args(hafen_retention::NAME),
            databases: database.databases(),
            operator: hafen_authn::OperatorArgs {
                platform_token_file: self.platform_token_file(),
            },
            redis: self.redis_args(),
            auth: self.auth_args(),
            audit: self.audit_args(),
            purge: hafen_retention::PurgeArgs {
                purge_interval: Duration::from_secs(3600),
                purge_batch: 100,
                purge_pause: Duration::ZERO,
            },
            keys_file: self.keys_file(hafen_retention::NAME),
        }
    }

    /// Directory holding `ca.pem`, `<service>.pem` and `<service>-key.pem`.
    pub fn dir(&self) -> std::path::PathBuf {
        self.dir.path().join("certs")
    }

    /// PEM of the CA.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Server arguments for `service` with these certificates (mutual TLS) and a short drain.
    pub fn server_args(&self, service: &str) -> ServerArgs {
        let dir = self.dir();
        ServerArgs {
            tls: TlsArgs {
                tls_cert: Some(dir.join(format!("{service}.pem"))),
                tls_key: Some(dir.join(format!("{service}-key.pem"))),
                tls_ca: Some(dir.join("ca.pem")),
                mtls: true,
                dev_certs_dir: dir,
            },
            drain_timeout: Duration::from_secs(5),
            health_listen: None,
            metrics_listen: None,
        }
    }

    /// TLS settings for a client that trusts this CA; with `identity_of`, it presents that
    /// service's certificate (mutual TLS).
    pub fn client_tls(&self, identity_of: Option<&str>) -> ClientTlsConfig {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .domain_name(DEV_SERVER_NAME);
        match identity_of {
            Some(service) => {
                let dir = self.dir();
                tls.identity(Identity::from_pem(
                    read(&dir.join(format!("{service}.pem"))),
                    read(&dir.join(format!("{service}-key.pem"))),
                ))
            }
            None => tls,
        }
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).expect("read test certificate")
}

/// One of Hafen's six services.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// `hafen.auth.v1.AuthService`.
    Auth,
    /// `hafen.messaging.v1.MessagingService`.
    Messaging,
    /// `hafen.tenant.v1.TenantService`.
    Tenant,
    /// `hafen.retention.v1.RetentionService`.
    Retention,
    /// `hafen.audit.v1.AuditService`.
    Audit,
    /// `hafen.webchat.v1.VisitorService` and `WidgetService`.
    Webchat,
}

impl Service {
    /// All six.
    pub const ALL: [Service; 6] = [
        Service::Auth,
        Service::Messaging,
        Service::Tenant,
        Service::Retention,
        Service::Audit,
        Service::Webchat,
    ];

    /// The short name (`auth`, …).
    pub fn name(self) -> &'static str {
        match self {
            Service::Auth => hafen_auth::NAME,
            Service::Messaging => hafen_messaging::NAME,
            Service::Tenant => hafen_tenant::NAME,
            Service::Retention => hafen_retention::NAME,
            Service::Audit => hafen_audit::NAME,
            Service::Webchat => hafen_webchat::NAME,
        }
    }

    /// The fully-qualified gRPC service name (the webchat service's visitor-facing one).
    pub fn grpc_name(self) -> String {
        if self == Service::Webchat {
            return "hafen.webchat.v1.VisitorService".to_owned();
        }
        let name = self.name();
        let pascal = format!("{}{}", name[..1].to_uppercase(), &name[1..]);
        format!("hafen.{name}.v1.{pascal}Service")
    }
}

/// A service running in this process on `127.0.0.1:<random port>` with TLS.
#[derive(Debug)]
pub struct TestServer {
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), String>>>,
}

impl TestServer {
    /// Starts `service` with `secrets`; auth and tenant also need a database.
    pub async fn start(
        service: Service,
        secrets: &TestSecrets,
        database: Option<&TestDatabase>,
    ) -> Self {
        match service {
            Service::Auth => {
                let database = database.expect("the auth service needs a TestDatabase");
                let config = secrets.auth_config(database);
                Self::spawn(|l, s| hafen_auth::serve(config, l, s)).await
            }
            Service::Messaging => {
                let database = database.expect("the messaging service needs a TestDatabase");
                let config = secrets.messaging_config(database);
                Self::spawn(|l, s| hafen_messaging::serve(config, l, s)).await
            }
            Service::Tenant => {
                let database = database.expect("the tenant service needs a TestDatabase");
                let config = secrets.tenant_config(database, &[]);
                Self::spawn(|l, s| hafen_tenant::serve(config, l, s)).await
            }
            Service::Retention => {
                let database = database.expect("the retention service needs a TestDatabase");
                let config = secrets.retention_config(database);
                Self::spawn(|l, s| hafen_retention::serve(config, l, s)).await
            }
            Service::Audit => {
                let database = database.expect("the audit service needs a TestDatabase");
                let config = secrets.audit_config(database);
                Self::spawn(|l, s| hafen_audit::serve(config, l, s)).await
            }
            Service::Webchat => {
                let database = database.expect("the webchat service needs a TestDatabase");
                let config = secrets.webchat_config(database);
                Self::spawn(|l, s| hafen_webchat::serve(config, l, s)).await
            }
        }
    }

    /// Runs `serve` on a fresh loopback listener with a shutdown future this value controls.
    pub async fn spawn<F, Fut, E>(serve: F) -> Self
    where
        F: FnOnce(TcpListener, BoxFuture<'static, ()>) -> Fut,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        Self::spawn_on(listener, serve).await
    }

    /// [`TestServer::spawn`] on a listener the caller bound (to know its address earlier).
    pub async fn spawn_on<F, Fut, E>(listener: TcpListener, serve: F) -> Self
    where
        F: FnOnce(TcpListener, BoxFuture<'static, ()>) -> Fut,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        crate::init_test_logging();
        let addr = listener.local_addr().expect("local address");
        let (tx, rx) = oneshot::channel::<()>();
        let shutdown = async move {
            let _ = rx.await;
        }
        .boxed();
        let future = serve(listener, shutdown);
        let task = tokio::spawn(async move { future.await.map_err(|err| err.to_string()) });
        Self {
            addr,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// The address the service listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://127.0.0.1:<port>`.
    pub fn uri(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// A channel over TLS that trusts `certs`' CA, connected now.
    pub async fn channel(&self, certs: &TestSecrets) -> Channel {
        self.try_channel(certs.client_tls(None))
            .await
            .expect("connect to the test server over TLS")
    }

    /// A channel with the given TLS settings, or the connection error.
    pub async fn try_channel(
        &self,
        tls: ClientTlsConfig,
    ) -> Result<Channel, tonic::transport::Error> {
        Endpoint::from_shared(self.uri())?
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
    }

    /// Starts the drain without waiting for it.
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Starts the drain and waits until the server has stopped; returns how serving ended.
    pub async fn shutdown(mut self) -> Result<(), String> {
        self.stop().await
    }

    /// [`TestServer::shutdown`] in place: the value stays, its server is gone.
    pub async fn stop(&mut self) -> Result<(), String> {
        self.begin_shutdown();
        match self.task.take() {
            Some(task) => task.await.map_err(|err| err.to_string())?,
            None => Ok(()),
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.begin_shutdown();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
