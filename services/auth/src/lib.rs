//! Hafen's auth service (`hafen.auth.v1.AuthService`): accounts (username + password inside
//! a tenant, OC1), bcrypt with argon2id import (OC3), chat codes as a per-device second
//! factor (OC2), sessions with rotating refresh tokens, remote wipe (OC5), manual
//! deactivation (GR6), the owner's TOTP, and brute-force protection.
//!
//! - [`auth`]: shared state and helpers; [`sessions`]: login, refresh, logout, introspection,
//!   wipe confirmation; [`users`]: accounts; [`codes`]: chat codes, remote wipe and TOTP;
//!   brute-force limits come from `hafen_authn::limits`.
//! - `api`: the thin gRPC adapter; `error`: the one mapping of errors to statuses.
//!
//! PostgreSQL is the truth of sessions; Redis caches them and carries revocations to every
//! service. The service is a library: [`serve`] runs it on a bound listener until a shutdown
//! future resolves, so the `hafen-auth` binary, `hafen dev` and the tests run the same code.

mod api;
pub mod auth;
pub mod codes;
pub mod erase;
mod error;
pub mod rows;
pub mod sessions;
pub mod users;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hafen_authn::{Authenticator, AuthnLayer, MAX_ACCESS_TTL, Redis, RedisArgs, Revocations};
use hafen_crypto::{Purpose, SubKeys};
use hafen_platform::{GrpcServer, ServerArgs, ServiceSpec, TlsMaterial};
use hafen_proto::auth::v1::auth_service_server::AuthServiceServer;
use hafen_store::{Databases, DatabasesArgs};
use tokio::net::TcpListener;

pub use api::{AuthApi, SELF_AUTHENTICATED};
pub use auth::{Auth, Policy};
pub use error::Error;

/// Short name: the development certificate is `<dev certs dir>/auth.pem`.
pub const NAME: &str = "auth";

/// How the `hafen-auth` binary presents itself on the command line.
pub const SPEC: ServiceSpec = ServiceSpec {
    binary: "hafen-auth",
    about: "Accounts, passwords, chat codes, sessions and remote wipe",
    default_listen: "127.0.0.1:50051",
};

/// Configuration of the auth service.
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

    /// File with the keys derived from the master key that this service uses (session-cache,
    /// chat-code-pepper, totp-secrets), written by `hafen-tenant derive-keys --service auth`.
    /// The auth service never holds the master key itself.
    #[arg(long, env = "HAFEN_KEYS_FILE")]
    pub keys_file: PathBuf,

    /// bcrypt cost of new password hashes (4-31; each step doubles the time).
    #[arg(long, env = "HAFEN_BCRYPT_COST", default_value_t = hafen_crypto::password::DEFAULT_BCRYPT_COST,
          value_parser = clap::value_parser!(u32).range(4..=31))]
    pub bcrypt_cost: u32,

    /// Minimum length of new passwords, in characters.
    #[arg(long, env = "HAFEN_MIN_PASSWORD_CHARS", default_value_t = hafen_crypto::password::DEFAULT_MIN_PASSWORD_CHARS)]
    pub min_password_chars: usize,

    /// Lifetime of access tokens (at most 1h).
    #[arg(long, env = "HAFEN_ACCESS_TTL", default_value = "15m", value_parser = humantime::parse_duration)]
    pub access_ttl: Duration,

    /// Lifetime of refresh tokens.
    #[arg(long, env = "HAFEN_REFRESH_TTL", default_value = "30days", value_parser = humantime::parse_duration)]
    pub refresh_ttl: Duration,

    /// Failed logins per user name and per client address before back-off starts.
    #[arg(long, env = "HAFEN_LOGIN_FREE_ATTEMPTS", default_value_t = 5)]
    pub login_free_attempts: u32,

    /// Proxies (comma-separated addresses or networks, e.g. `10.0.0.0/8`) whose client-address
    /// header is believed for rate limiting; from any other peer the TCP address counts.
    #[arg(long, env = "HAFEN_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<hafen_platform::net::Cidr>,

    /// The header a trusted proxy puts the client's address in; its last address counts.
    #[arg(
        long,
        env = "HAFEN_CLIENT_ADDRESS_HEADER",
        default_value = "x-forwarded-for"
    )]
    pub client_address_header: String,

    /// The longest login back-off.
    #[arg(long, env = "HAFEN_LOGIN_MAX_BACKOFF", default_value = "15m", value_parser = humantime::parse_duration)]
    pub login_max_backoff: Duration,

    /// How long a user's own erasure request (RequestErasure) waits before it is carried out,
    /// e.g. `14days`; meanwhile the account is deactivated and an admin can cancel it by
    /// reactivating the account. 0: at once.
    #[arg(long, env = "HAFEN_ERASURE_GRACE", default_value = "0s", value_parser = humantime::parse_duration)]
    pub erasure_grace: Duration,
}

/// Builds the domain service of `config` (also used by tests and `hafen dev`).
pub async fn build(config: &Config) -> Result<(Auth, Authenticator), Error> {
    if config.access_ttl > MAX_ACCESS_TTL || config.access_ttl < Duration::from_secs(10) {
        return Err(Error::Config(
            "--access-ttl must be between 10s and 1h".into(),
        ));
    }
    let pending = hafen_store::migrate::wait_until_migrated(&config.databases, true).await?;
    if !pending.is_empty() {
        return Err(Error::Config(format!(
            "control plane has pending migrations {pending:?}: run `hafen-tenant migrate` first"
        )));
    }
    let databases = Databases::new(&config.databases)?;
    let keys = SubKeys::load(&config.keys_file)?;
    let redis = Redis::connect(&config.redis)
        .await
        .map_err(Error::Config)?
        .with_session_key(keys.get(Purpose::SessionCache)?);
    let revocations = Revocations::new(MAX_ACCESS_TTL);
    revocations.listen(redis.clone());
    revocations.forget_moved_placements(databases.clone());
    databases.report_pool_metrics("auth", "requests");
    let limiter = hafen_authn::limits::Limiter::new(
        Some(redis.clone()),
        hafen_authn::limits::LimitPolicy {
            free_attempts: config.login_free_attempts,
            max_delay: config.login_max_backoff,
            ..hafen_authn::limits::LimitPolicy::default()
        },
    );
    let tls = TlsMaterial::load(&config.server.tls, NAME)?;
    hafen_store::facts::start_reporting(
        databases.main().clone(),
        hafen_store::facts::ServiceFacts::new(
            NAME,
            config.server.tls.mtls,
            &config.databases,
            Some(config.redis.tls()),
            &[
                hafen_store::facts::measure::REMOTE_WIPE,
                hafen_store::facts::measure::USER_ERASURE,
            ],
        ),
    )
    .await;
    let relay = hafen_events::Relay::spawn(NAME, &databases, &config.audit, &tls)
        .map_err(|err| Error::Config(format!("--audit-endpoint: {err}")))?;
    let auth = Auth::new(
        databases,
        Some(redis.clone()),
        revocations.clone(),
        &keys,
        Policy {
            bcrypt_cost: config.bcrypt_cost,
            min_password_chars: config.min_password_chars,
            access_ttl: config.access_ttl,
            refresh_ttl: config.refresh_ttl,
            client_address: hafen_platform::net::ClientAddress {
                trusted_proxies: config.trusted_proxies.clone(),
                header: config.client_address_header.to_lowercase(),
            },
            erasure_grace: config.erasure_grace,
        },
        limiter,
        hafen_platform::cpu::CpuPool::new("hafen-auth-hash"),
    )
    .await?;
    auth.set_relay(relay);
    auth.spawn_erasure_sweep();
    let authenticator = Authenticator::new(None, Some(redis), Arc::new(auth.clone()), revocations);
    Ok((auth, authenticator))
}

/// Serves the auth service on `listener` until `shutdown` resolves, then drains.
pub async fn serve<F>(config: Config, listener: TcpListener, shutdown: F) -> Result<(), Error>
where
    F: Future<Output = ()> + Send + 'static,
{
    let tls = TlsMaterial::load(&config.server.tls, NAME)?;
    let (auth, authenticator) = build(&config).await?;
    let layer = AuthnLayer::new(authenticator, SELF_AUTHENTICATED);
    GrpcServer::new(SPEC.binary, tls, config.server.drain_timeout)
        .side_ports(&config.server)
        .browsers(&config.browsers)
        .add_service(layer.wrap(AuthServiceServer::new(AuthApi::new(auth))))
        .serve(listener, shutdown)
        .await?;
    Ok(())
}

/// The `hafen-auth` command line, for `--help` checks.
pub fn command() -> clap::Command {
    hafen_platform::ServiceCli::<Config>::command_for(&SPEC)
}
