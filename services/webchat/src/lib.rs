//! Hafen's webchat service (`hafen.webchat.v1`): the website chat, the only service that faces
//! anonymous visitors (CB1, CB2, CB7, CB8, UL3, UL5).
//!
//! - `widgets`: widgets as tenants' admins configure them (WidgetService), validated, with
//!   versioned consent texts; `origin`: where a widget may be embedded.
//! - `chat`: a visit's chat with the organisation's agents (a webchat conversation), its
//!   messages into known chats stored in batches by `commit` (group commit);
//!   `wakes` and `watch`: one watcher per tenant, woken through the tenant's event channel,
//!   reads its log and wakes only the streams whose chat changed;
//! - `visits`: visits, visitor tokens, consent records and released fields (VisitorService);
//!   `selfservice`: what a visitor sees, corrects, exports and deletes of their data (CB9).
//! - [`limits`]: abuse limits per widget, visit and (hashed) client address.
//! - `api`: the gRPC adapters; `web`: the visitor service for browsers (gRPC-Web, CORS per
//!   widget); `files`: the built widget for websites to embed; `error`: the one mapping of
//!   errors to statuses.
//!
//! The service is a library: [`serve`] runs it on a bound listener until a shutdown future
//! resolves, so the `hafen-webchat` binary, `hafen dev` and the tests run the same code.

mod api;
mod chat;
mod commit;
mod error;
mod files;
pub mod limits;
mod origin;
mod selfservice;
mod visits;
mod wakes;
mod watch;
mod web;
mod widgets;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use futures::future::BoxFuture;
use hafen_authn::remote::{AuthEndpointArgs, RemoteIntrospect};
use hafen_authn::{Authenticator, AuthnLayer, MAX_ACCESS_TTL, Redis, RedisArgs, Revocations};
use hafen_crypto::{MasterKey, Purpose};
use hafen_platform::{GrpcServer, ServerArgs, ServiceSpec, TlsMaterial};
use hafen_proto::webchat::v1::visitor_service_server::VisitorServiceServer;
use hafen_proto::webchat::v1::widget_service_server::WidgetServiceServer;
use hafen_store::keyring::KeyRing;
use hafen_store::{AsyncPgConnection, Databases, DatabasesArgs, TenantId};
use tokio::net::TcpListener;
use uuid::Uuid;

pub use api::{VisitorApi, WidgetApi};
pub use error::Error;

/// Short name: the development certificate is `<dev certs dir>/webchat.pem`.
pub const NAME: &str = "webchat";

/// How the `hafen-webchat` binary presents itself on the command line.
pub const SPEC: ServiceSpec = ServiceSpec {
    binary: "hafen-webchat",
    about: "The website chat: widgets, anonymous visits, consent records",
    default_listen: "127.0.0.1:50056",
};

/// Configuration of the webchat service.
#[derive(clap::Args, Clone, Debug)]
pub struct Config {
    #[command(flatten)]
    pub server: ServerArgs,

    #[command(flatten)]
    pub databases: DatabasesArgs,

    #[command(flatten)]
    pub redis: RedisArgs,

    #[command(flatten)]
    pub audit: hafen_events::AuditEndpointArgs,

    #[command(flatten)]
    pub auth: AuthEndpointArgs,

    #[command(flatten)]
    pub limits: limits::LimitArgs,

    /// File with the master key that wraps tenant keys, which wrap the visitors' keys that
    /// encrypt what visitors give: base64 of 32 random bytes, or the versioned form
    /// `hafen-tenant rotate-master-key` writes. Read again when a tenant key names a version
    /// it lacks.
    #[arg(long, env = "HAFEN_MASTER_KEY_FILE")]
    pub master_key_file: PathBuf,

    /// How often a tenant's watcher reads its log without a wake-up from its event channel (a
    /// safety net, one query per tenant; while Redis is unreachable, the longest a visitor's
    /// stream waits for a new message).
    #[arg(long, env = "HAFEN_STREAM_POLL", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub stream_poll: std::time::Duration,

    /// Most tenant keys, and most visitor keys, held unwrapped in memory; the least recently
    /// used go first. A deleted tenant's keys are dropped at once.
    #[arg(long, env = "HAFEN_KEY_CACHE_SIZE", default_value = "10000")]
    pub key_cache_size: std::num::NonZeroUsize,

    /// Most visitors' messages of one tenant waiting to be stored; beyond, messages are
    /// answered RESOURCE_EXHAUSTED (OVERLOADED, with a retry delay) until the queue drains.
    #[arg(
        long,
        env = "HAFEN_MAX_QUEUED_VISITOR_MESSAGES",
        default_value_t = 10_000
    )]
    pub max_queued_messages: usize,

    /// Directory of the built widget (`scripts/widget.sh build` writes `target/widget`):
    /// `hafen-widget.js` and `hafen-widget.css` are served at `/widget/`, for websites to
    /// embed. Without it, `/widget/` answers 404.
    #[arg(long, env = "HAFEN_WIDGET_DIR")]
    pub widget_dir: Option<PathBuf>,
}

/// What the handlers share.
pub(crate) struct Service {
    pub databases: Databases,
    pub keys: KeyRing,
    pub limits: Arc<limits::Limits>,
    /// Wakes the messaging service's feeds after a visitor's message.
    pub redis: Option<Redis>,
    /// How often the tenants' watchers read their log without a wake-up.
    pub stream_poll: std::time::Duration,
    /// What wakes the tenants' watchers when their log changed.
    pub wakes: Arc<wakes::Wakes>,
    /// The tenants' watchers, which wake the streams whose chat changed.
    pub watches: watch::Watches,
    /// Widgets as visitors' calls see them, for a few seconds.
    pub widgets: visits::WidgetCache,
    /// Stores visitors' messages into known chats in batches, one committer per tenant.
    pub committer: commit::Committer,
    /// The chats visits were seen sending into, which pick the committer's way.
    pub chats: commit::KnownChats,
    /// Each visit's open streams (see `chat::StreamSlot`).
    pub streams: std::sync::Mutex<std::collections::HashMap<Uuid, usize>>,
    /// Delivers the outbox to the audit service.
    pub relay: Option<hafen_events::Relay>,
    /// Hashes signed visitor identities and derives identified visits' tokens.
    pub identity_key: hafen_crypto::DataKey,
}

impl Service {
    /// Runs `f` in a transaction in `tenant`'s scope.
    pub(crate) async fn scoped<R, F>(&self, tenant: Uuid, f: F) -> Result<R, Error>
    where
        F: for<'c> FnOnce(&'c mut AsyncPgConnection) -> BoxFuture<'c, Result<R, Error>>,
    {
        let tenant = TenantId::from(tenant);
        let pool = self.databases.tenant_pool(&tenant).await?;
        hafen_store::with_tenant(&pool, &tenant, f).await
    }

    /// Wakes the relay after audit events were committed.
    pub(crate) fn audited(&self) {
        if let Some(relay) = &self.relay {
            relay.wake();
        }
    }
}

/// Serves the webchat service on `listener` until `shutdown` resolves, then drains.
pub async fn serve<F>(config: Config, listener: TcpListener, shutdown: F) -> Result<(), Error>
where
    F: Future<Output = ()> + Send + 'static,
{
    let widget_files = match &config.widget_dir {
        Some(dir) => files::WidgetFiles::load(dir)?,
        None => files::WidgetFiles::default(),
    };
    let pending = hafen_store::migrate::wait_until_migrated(&config.databases, true).await?;
    if !pending.is_empty() {
        return Err(Error::NotMigrated(pending));
    }
    let tls = TlsMaterial::load(&config.server.tls, NAME)?;
    let databases = Databases::new(&config.databases)?;
    let master = MasterKey::load(&config.master_key_file)?;
    let redis = Redis::connect(&config.redis)
        .await
        .map_err(Error::Config)?
        .with_session_key(Purpose::SessionCache.derive(&master));
    let revocations = Revocations::new(MAX_ACCESS_TTL);
    revocations.listen(redis.clone());
    revocations.forget_moved_placements(databases.clone());
    databases.report_pool_metrics("webchat", "requests");
    let resolver = RemoteIntrospect::new(&config.auth, &tls)
        .map_err(|err| Error::Config(format!("--auth-endpoint: {err}")))?;
    let authenticator = Authenticator::new(
        None,
        Some(redis.clone()),
        Arc::new(resolver),
        revocations.clone(),
    );
    hafen_store::facts::start_reporting(
        databases.main().clone(),
        hafen_store::facts::ServiceFacts::new(
            NAME,
            config.server.tls.mtls,
            &config.databases,
            Some(config.redis.tls()),
            &[],
        ),
    )
    .await;
    let keys = KeyRing::reloading(
        databases.clone(),
        master.clone(),
        config.master_key_file.clone(),
        config.key_cache_size,
    );
    keys.follow(revocations.tenant_deletions());
    let relay = hafen_events::Relay::spawn(NAME, &databases, &config.audit, &tls)
        .map_err(|err| Error::Config(format!("--audit-endpoint: {err}")))?;
    let limits = Arc::new(limits::Limits::new(
        config.limits.clone(),
        Some(redis.clone()),
        Purpose::AddressHashing.derive(&master),
    ));
    // The committers get pools of their own: their connections are driven on their thread.
    let committed = Databases::new(&config.databases)?;
    revocations.forget_moved_placements(committed.clone());
    committed.report_pool_metrics("webchat", "commit");
    let committer =
        commit::Committer::new(committed, Some(redis.clone()), config.max_queued_messages);
    let wakes = Arc::new(wakes::Wakes::default());
    wakes.listen(redis.clone(), config.stream_poll);
    let service = Arc::new(Service {
        databases,
        keys,
        limits,
        redis: Some(redis),
        stream_poll: config.stream_poll,
        wakes,
        watches: watch::Watches::default(),
        widgets: visits::WidgetCache::default(),
        committer,
        chats: commit::KnownChats::default(),
        streams: std::sync::Mutex::default(),
        relay: Some(relay),
        identity_key: Purpose::VisitorIdentity.derive(&master),
    });
    let layer = AuthnLayer::new(authenticator, &[]);
    GrpcServer::new(SPEC.binary, tls, config.server.drain_timeout)
        .side_ports(&config.server)
        .add_service(layer.wrap(WidgetServiceServer::new(WidgetApi::new(service.clone()))))
        // Visitors carry their own tokens, checked by the handlers.
        .add_service(VisitorServiceServer::new(VisitorApi::new(service.clone())))
        // Browsers: gRPC-Web under each widget's own path (CORS per widget).
        .add_service(web::WidgetPaths::new(service))
        // Websites: the widget's script and stylesheet.
        .add_service(widget_files)
        .serve(listener, shutdown)
        .await?;
    Ok(())
}

/// The `hafen-webchat` command line, for `--help` checks.
pub fn command() -> clap::Command {
    hafen_platform::ServiceCli::<Config>::command_for(&SPEC)
}
