//! Hafen's messaging service (`hafen.messaging.v1.MessagingService`): conversations and
//! their members, messages masked (UL1, UL2) and encrypted at rest under the sender's key
//! (CB3, BX1), edits and tombstones (CB4), history for every device (OC7), and resumable
//! live streams (BX4) that end when their session is revoked (OC5).
//!
//! Its modules, each depending only on those below it:
//!
//! - `api`: the gRPC adapter: parses requests into domain types, calls [`Messaging`],
//!   converts the results to the API's forms; `error`: the one mapping of errors to statuses.
//! - [`Messaging`] (`service`), with its operations in `conversations` and `messages`: the
//!   domain, its rules and transactions.
//! - `commit`: the group commit of sends; `feed`: live fan-out and replay of the event log,
//!   as domain events; `settings`: tenants' settings cached; `keys`: message bodies sealed
//!   and opened; masking is `hafen_store::masking`, shared with the webchat service.
//! - `repo`: every SQL statement of the service; `rows`: its rows and their domain forms.
//!
//! SendMessage, for instance: `api::send_message` parses the request, `Messaging::send`
//! (`messages.rs`) masks and seals the body and queues it with the tenant's committer, which
//! stores its batch with `repo::store_messages`: one call of the tenant schema's function
//! `store_messages` (tenant migration `000004_store_messages`).
//!
//! The service is a library: [`serve`] runs it on a bound listener until a shutdown future
//! resolves, so the `hafen-messaging` binary, `hafen dev` and the tests run the same code.

mod api;
mod commit;
mod conversations;
mod error;
mod feed;
mod keys;
mod messages;
mod repo;
mod rows;
mod service;
mod settings;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hafen_authn::remote::{AuthEndpointArgs, RemoteIntrospect};
use hafen_authn::{Authenticator, AuthnLayer, MAX_ACCESS_TTL, Redis, RedisArgs, Revocations};
use hafen_crypto::{MasterKey, Purpose};
use hafen_platform::{GrpcServer, ServerArgs, ServiceSpec, TlsMaterial};
use hafen_proto::messaging::v1::messaging_service_server::MessagingServiceServer;
use hafen_store::{Databases, DatabasesArgs};
use tokio::net::TcpListener;

pub use api::MessagingApi;
pub use error::Error;
pub use service::Messaging;

/// Short name: the development certificate is `<dev certs dir>/messaging.pem`.
pub const NAME: &str = "messaging";

/// How the `hafen-messaging` binary presents itself on the command line.
pub const SPEC: ServiceSpec = ServiceSpec {
    binary: "hafen-messaging",
    about: "Conversations, encrypted messages and live streams",
    default_listen: "127.0.0.1:50052",
};

/// Configuration of the messaging service.
#[derive(clap::Args, Clone, Debug)]
pub struct Config {
    #[command(flatten)]
    pub server: ServerArgs,

    #[command(flatten)]
    pub browsers: hafen_platform::web::BrowserArgs,

    #[command(flatten)]
    pub databases: DatabasesArgs,

    #[command(flatten)]
    pub redis: RedisArgs,

    #[command(flatten)]
    pub audit: hafen_events::AuditEndpointArgs,

    #[command(flatten)]
    pub auth: AuthEndpointArgs,

    /// File with the master key that wraps tenant keys, which wrap the users' keys that
    /// encrypt message bodies: base64 of 32 random bytes, or the versioned form
    /// `hafen-tenant rotate-master-key` writes. Read again when a tenant key names a version
    /// it lacks.
    #[arg(long, env = "HAFEN_MASTER_KEY_FILE")]
    pub master_key_file: PathBuf,

    /// Largest message body, in bytes of UTF-8.
    #[arg(long, env = "HAFEN_MAX_BODY_BYTES", default_value_t = 16 * 1024)]
    pub max_body_bytes: usize,

    /// How often live streams look for new events when no notification arrives (the
    /// fallback while Redis is down).
    #[arg(long, env = "HAFEN_STREAM_POLL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub stream_poll: Duration,

    /// Most sends of one tenant waiting to be stored; beyond, sends are answered
    /// RESOURCE_EXHAUSTED (OVERLOADED, with a retry delay) until the queue drains.
    #[arg(long, env = "HAFEN_MAX_QUEUED_SENDS", default_value_t = 10_000)]
    pub max_queued_sends: usize,

    /// Most tenant keys, and most user keys, held unwrapped in memory; the least recently
    /// used go first. A deleted tenant's keys are dropped at once.
    #[arg(long, env = "HAFEN_KEY_CACHE_SIZE", default_value = "10000")]
    pub key_cache_size: std::num::NonZeroUsize,
}

/// Serves the messaging service on `listener` until `shutdown` resolves, then drains.
pub async fn serve<F>(config: Config, listener: TcpListener, shutdown: F) -> Result<(), Error>
where
    F: Future<Output = ()> + Send + 'static,
{
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
    databases.report_pool_metrics("messaging", "requests");
    revocations.recheck_streams(databases.main().clone());
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
            &[hafen_store::facts::measure::ENCRYPTED_MESSAGES],
        ),
    )
    .await;
    let keys = hafen_store::keyring::KeyRing::reloading(
        databases.clone(),
        master,
        config.master_key_file.clone(),
        config.key_cache_size,
    );
    keys.follow(revocations.tenant_deletions());
    let bodies = keys::Bodies::new(keys);
    let hub = feed::Hub::new(
        Some(redis),
        config.stream_poll,
        databases.clone(),
        bodies.clone(),
    );
    hub.listen();
    let rules = settings::TenantRules::new(databases.clone());
    rules.follow(&revocations, config.stream_poll);
    // The committers get pools of their own: their connections are driven on their thread.
    let committed = Databases::new(&config.databases)?;
    revocations.forget_moved_placements(committed.clone());
    committed.report_pool_metrics("messaging", "commit");
    let committer = commit::Committer::new(committed, hub.clone(), config.max_queued_sends);
    let relay = hafen_events::Relay::spawn(NAME, &databases, &config.audit, &tls)
        .map_err(|err| Error::Config(format!("--audit-endpoint: {err}")))?;
    let messaging = Messaging::new(service::Inner {
        databases,
        bodies,
        rules,
        hub: hub.clone(),
        committer,
        max_body_bytes: config.max_body_bytes,
        relay: Some(relay),
    });
    // Streams end with UNAVAILABLE as soon as shutdown begins, before the drain: a client
    // resubscribes elsewhere with its cursor instead of waiting to be cut off.
    let closing = hub.clone();
    let shutdown = async move {
        shutdown.await;
        closing.close();
    };
    let layer = AuthnLayer::new(authenticator.clone(), &[]);
    GrpcServer::new(SPEC.binary, tls, config.server.drain_timeout)
        .side_ports(&config.server)
        .browsers(&config.browsers)
        .add_service(layer.wrap(MessagingServiceServer::new(MessagingApi::new(
            messaging,
            authenticator,
        ))))
        .serve(listener, shutdown)
        .await?;
    Ok(())
}

/// The `hafen-messaging` command line, for `--help` checks.
pub fn command() -> clap::Command {
    hafen_platform::ServiceCli::<Config>::command_for(&SPEC)
}
