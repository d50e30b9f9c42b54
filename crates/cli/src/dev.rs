//! `hafen dev`: all six services in one process.
//!
//! Each service runs the same `serve` function as its own binary, on its own port, with its
//! own certificate from the development CA; they share one shutdown signal and drain together.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use futures::FutureExt;
use futures::future::BoxFuture;
use hafen_platform::{ServerArgs, TlsArgs};
use hafen_store::DatabasesArgs;
use tokio::task::JoinSet;

/// Options of `hafen dev`.
#[derive(Args, Debug, Clone)]
pub struct DevArgs {
    /// Address every service listens on.
    #[arg(long, env = "HAFEN_DEV_HOST", default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    pub host: IpAddr,

    /// Port of the auth service.
    #[arg(long, env = "HAFEN_AUTH_PORT", default_value_t = 50051)]
    pub auth_port: u16,

    /// Port of the messaging service.
    #[arg(long, env = "HAFEN_MESSAGING_PORT", default_value_t = 50052)]
    pub messaging_port: u16,

    /// Port of the tenant service.
    #[arg(long, env = "HAFEN_TENANT_PORT", default_value_t = 50053)]
    pub tenant_port: u16,

    /// Port of the retention service.
    #[arg(long, env = "HAFEN_RETENTION_PORT", default_value_t = 50054)]
    pub retention_port: u16,

    /// Port of the audit service.
    #[arg(long, env = "HAFEN_AUDIT_PORT", default_value_t = 50055)]
    pub audit_port: u16,

    /// Port of the webchat service.
    #[arg(long, env = "HAFEN_WEBCHAT_PORT", default_value_t = 50056)]
    pub webchat_port: u16,

    /// Where the development CA and service certificates are generated (once) and read.
    #[arg(long, env = "HAFEN_DEV_CERTS_DIR", default_value = ".dev/certs")]
    pub dev_certs_dir: PathBuf,

    /// Mutual TLS between the services (internal calls need it).
    #[arg(long, env = "HAFEN_MTLS", default_value_t = true, action = clap::ArgAction::Set)]
    pub mtls: bool,

    /// How long in-flight calls may run after Ctrl-C/SIGTERM.
    #[arg(long, env = "HAFEN_DRAIN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// Master key file; generated (mode 0600) when missing. Only the tenant, messaging and
    /// webchat services read it; the others get key files derived from it, in --keys-dir.
    #[arg(long, env = "HAFEN_MASTER_KEY_FILE", default_value = ".dev/master.key")]
    pub master_key_file: PathBuf,

    /// Where the key files of the auth, audit and retention services are written at each
    /// start (`<service>.keys`, mode 0600), derived from the master key.
    #[arg(long, env = "HAFEN_DEV_KEYS_DIR", default_value = ".dev/keys")]
    pub keys_dir: PathBuf,

    /// The operator's platform token file; generated (mode 0600) when missing. Send it as
    /// `authorization: Bearer <token>` for operator calls.
    #[arg(
        long,
        env = "HAFEN_PLATFORM_TOKEN_FILE",
        default_value = ".dev/platform-token"
    )]
    pub platform_token_file: PathBuf,

    /// bcrypt cost of new password hashes.
    #[arg(long, env = "HAFEN_BCRYPT_COST", default_value_t = hafen_crypto::password::DEFAULT_BCRYPT_COST,
          value_parser = clap::value_parser!(u32).range(4..=31))]
    pub bcrypt_cost: u32,

    /// How long a user's own erasure request waits before it is carried out (e.g. `14days`;
    /// 0: at once).
    #[arg(long, env = "HAFEN_ERASURE_GRACE", default_value = "0s", value_parser = humantime::parse_duration)]
    pub erasure_grace: std::time::Duration,

    /// Once the stack is up, create the demo organisation "demo" (owner, alice and bob with
    /// chat codes, a group "general", a website-chat widget with alice and bob as agents)
    /// unless it exists, and print its throwaway credentials.
    #[arg(long, env = "HAFEN_DEV_DEMO")]
    pub demo: bool,

    /// With --demo and --widget-dir: the port of the demo organisation's website, a page that
    /// embeds the demo widget, at `https://localhost:<port>/` (the widget's allowed origin).
    #[arg(long, env = "HAFEN_DEV_DEMO_PAGE_PORT", default_value_t = 8443)]
    pub demo_page_port: u16,

    /// Directory of the built widget (`scripts/widget.sh build` writes `target/widget`), which
    /// the webchat service serves at `/widget/` for websites to embed.
    #[arg(long, env = "HAFEN_WIDGET_DIR")]
    pub widget_dir: Option<PathBuf>,

    /// Serve the process's Prometheus metrics (all six services') as `/metrics` on this port
    /// of --host. Unset: none.
    #[arg(long, env = "HAFEN_DEV_METRICS_PORT")]
    pub metrics_port: Option<u16>,

    /// Where the demo credentials are kept (mode 0600).
    #[arg(long, env = "HAFEN_DEV_DEMO_FILE", default_value = ".dev/demo.txt")]
    pub demo_file: PathBuf,

    #[command(flatten)]
    pub databases: DatabasesArgs,

    #[command(flatten)]
    pub redis: hafen_authn::RedisArgs,
}

/// The DPA version the development stack accepts.
pub const DEV_DPA_VERSION: &str = "2025-01";

/// The region the development stack records.
pub const DEV_REGION: &str = "eu-central";

type Served = (&'static str, Result<(), String>);

/// Runs the stack until Ctrl-C/SIGTERM or until one service fails (then all stop).
pub async fn run(args: DevArgs) -> ExitCode {
    if let Err(err) = hafen_platform::tls::ensure_dev_certs(&args.dev_certs_dir) {
        tracing::error!(error = %err, "development certificates");
        return ExitCode::FAILURE;
    }
    let master = match hafen_crypto::MasterKey::load_or_create(&args.master_key_file) {
        Ok(master) => master,
        Err(err) => {
            tracing::error!(error = %err, "master key");
            return ExitCode::FAILURE;
        }
    };
    for service in [hafen_auth::NAME, hafen_audit::NAME, hafen_retention::NAME] {
        let purposes = hafen_crypto::subkeys::needed_by(service).unwrap_or_default();
        let path = args.keys_dir.join(format!("{service}.keys"));
        if let Err(err) = hafen_crypto::SubKeys::derive(&master, purposes).write(&path) {
            tracing::error!(error = %err, service, "key file");
            return ExitCode::FAILURE;
        }
    }
    drop(master);
    if let Err(err) = hafen_authn::PlatformToken::load_or_create(&args.platform_token_file) {
        tracing::error!(error = %err, "platform token");
        return ExitCode::FAILURE;
    }
    // One process, one developer: migrating here saves a step; deployments run
    // `hafen-tenant migrate` instead.
    let migrated = hafen_tenant::migrate::migrate_all(
        &args.databases.main.database_url,
        args.databases.keystore_url.as_deref(),
        &args.databases.placements_map(),
        &hafen_tenant::migrate::Options {
            concurrency: 4,
            progress: false,
        },
    )
    .await;
    match migrated {
        Ok(report) if report.failed.is_empty() => {}
        Ok(report) => {
            tracing::error!(
                failed = report.failed.len(),
                "some tenants could not be migrated"
            );
            return ExitCode::FAILURE;
        }
        Err(err) => {
            tracing::error!(error = %err, "migrating failed");
            return ExitCode::FAILURE;
        }
    }

    let ports = [
        (hafen_auth::NAME, args.auth_port),
        (hafen_messaging::NAME, args.messaging_port),
        (hafen_tenant::NAME, args.tenant_port),
        (hafen_retention::NAME, args.retention_port),
        (hafen_audit::NAME, args.audit_port),
        (hafen_webchat::NAME, args.webchat_port),
    ];
    let mut listeners = Vec::with_capacity(ports.len());
    for (name, port) in ports {
        match hafen_platform::bind(SocketAddr::new(args.host, port)).await {
            Ok(listener) => listeners.push(listener),
            Err(err) => {
                tracing::error!(service = name, error = %err, "cannot listen");
                return ExitCode::FAILURE;
            }
        }
    }

    // The demo website's port is taken now, so a busy port fails the start, not the demo.
    let demo_page = if args.demo && args.widget_dir.is_some() {
        match hafen_platform::bind(SocketAddr::new(args.host, args.demo_page_port)).await {
            Ok(listener) => Some(listener),
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for the demo page");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };

    let signal = hafen_platform::shutdown::shared_signal();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(());
    let shutdown = || -> BoxFuture<'static, ()> {
        let signal = signal.clone();
        let mut stop = stop_rx.clone();
        async move {
            tokio::select! {
                () = signal => {}
                _ = stop.changed() => {}
            }
        }
        .boxed()
    };
    let server = |name: &str| ServerArgs {
        tls: TlsArgs {
            tls_cert: Some(args.dev_certs_dir.join(format!("{name}.pem"))),
            tls_key: Some(args.dev_certs_dir.join(format!("{name}-key.pem"))),
            tls_ca: Some(args.dev_certs_dir.join("ca.pem")),
            mtls: args.mtls,
            dev_certs_dir: args.dev_certs_dir.clone(),
        },
        drain_timeout: args.drain_timeout,
        health_listen: None,
        // One registry for the whole process: served once, beside the auth service.
        metrics_listen: args
            .metrics_port
            .filter(|_| name == "auth")
            .map(|port| std::net::SocketAddr::new(args.host, port)),
    };

    let Ok([auth, messaging, tenant, retention, audit, webchat]) = <[_; 6]>::try_from(listeners)
    else {
        return ExitCode::FAILURE;
    };
    // Services call each other on loopback when they listen on every address.
    let internal_host = if args.host.is_unspecified() {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        args.host
    };
    let auth_endpoint = hafen_authn::remote::AuthEndpointArgs {
        auth_endpoint: format!("https://{}", SocketAddr::new(internal_host, args.auth_port)),
        auth_server_name: Some(hafen_platform::tls::DEV_SERVER_NAME.to_owned()),
    };
    let audit_endpoint = hafen_events::AuditEndpointArgs {
        audit_endpoint: format!(
            "https://{}",
            SocketAddr::new(internal_host, args.audit_port)
        ),
        audit_server_name: Some(hafen_platform::tls::DEV_SERVER_NAME.to_owned()),
        audit_relay_interval: std::time::Duration::from_secs(1),
    };
    let operator = hafen_authn::OperatorArgs {
        platform_token_file: args.platform_token_file.clone(),
    };
    let mut tasks: JoinSet<Served> = JoinSet::new();
    spawn(
        &mut tasks,
        hafen_auth::NAME,
        hafen_auth::serve(
            hafen_auth::Config {
                server: server(hafen_auth::NAME),
                browsers: hafen_platform::web::BrowserArgs::default(),
                databases: args.databases.clone(),
                redis: args.redis.clone(),
                audit: audit_endpoint.clone(),
                keys_file: args.keys_dir.join(format!("{}.keys", hafen_auth::NAME)),
                bcrypt_cost: args.bcrypt_cost,
                min_password_chars: hafen_crypto::password::DEFAULT_MIN_PASSWORD_CHARS,
                access_ttl: std::time::Duration::from_secs(15 * 60),
                refresh_ttl: std::time::Duration::from_secs(30 * 24 * 3600),
                login_free_attempts: 5,
                login_max_backoff: std::time::Duration::from_secs(15 * 60),
                trusted_proxies: Vec::new(),
                client_address_header: "x-forwarded-for".to_owned(),
                erasure_grace: args.erasure_grace,
            },
            auth,
            shutdown(),
        ),
    );
    spawn(
        &mut tasks,
        hafen_messaging::NAME,
        hafen_messaging::serve(
            hafen_messaging::Config {
                server: server(hafen_messaging::NAME),
                browsers: hafen_platform::web::BrowserArgs::default(),
                databases: args.databases.clone(),
                redis: args.redis.clone(),
                audit: audit_endpoint.clone(),
                auth: auth_endpoint.clone(),
                master_key_file: args.master_key_file.clone(),
                max_body_bytes: 16 * 1024,
                max_queued_sends: 10_000,
                stream_poll: std::time::Duration::from_secs(1),
                key_cache_size: std::num::NonZeroUsize::MIN.saturating_add(9_999),
            },
            messaging,
            shutdown(),
        ),
    );
    spawn(
        &mut tasks,
        hafen_webchat::NAME,
        hafen_webchat::serve(
            hafen_webchat::Config {
                server: server(hafen_webchat::NAME),
                databases: args.databases.clone(),
                redis: args.redis.clone(),
                audit: audit_endpoint.clone(),
                auth: auth_endpoint.clone(),
                master_key_file: args.master_key_file.clone(),
                key_cache_size: std::num::NonZeroUsize::MIN.saturating_add(9_999),
                max_queued_messages: 10_000,
                stream_poll: std::time::Duration::from_millis(500),
                widget_dir: args.widget_dir.clone(),
                limits: hafen_webchat::limits::LimitArgs {
                    visits_per_address: 20,
                    visits_per_widget: 1000,
                    calls_per_visitor: 120,
                    lookups_per_address: 300,
                    limit_window: std::time::Duration::from_secs(60),
                    trusted_proxies: Vec::new(),
                    client_address_header: "x-forwarded-for".to_owned(),
                },
            },
            webchat,
            shutdown(),
        ),
    );
    spawn(
        &mut tasks,
        hafen_tenant::NAME,
        hafen_tenant::serve(
            hafen_tenant::Config {
                server: server(hafen_tenant::NAME),
                databases: args.databases.clone(),
                operator: operator.clone(),
                redis: args.redis.clone(),
                audit: audit_endpoint.clone(),
                auth: auth_endpoint.clone(),
                master_key_file: args.master_key_file.clone(),
                dpa_versions: vec![DEV_DPA_VERSION.to_owned()],
                regions: vec![DEV_REGION.to_owned()],
                bcrypt_cost: args.bcrypt_cost,
                min_password_chars: hafen_crypto::password::DEFAULT_MIN_PASSWORD_CHARS,
            },
            tenant,
            shutdown(),
        ),
    );
    spawn(
        &mut tasks,
        hafen_retention::NAME,
        hafen_retention::serve(
            hafen_retention::Config {
                server: server(hafen_retention::NAME),
                databases: args.databases.clone(),
                operator: operator.clone(),
                redis: args.redis.clone(),
                auth: auth_endpoint.clone(),
                audit: audit_endpoint.clone(),
                purge: hafen_retention::PurgeArgs {
                    purge_interval: std::time::Duration::from_secs(3600),
                    purge_batch: 1000,
                    purge_pause: std::time::Duration::ZERO,
                },
                keys_file: args
                    .keys_dir
                    .join(format!("{}.keys", hafen_retention::NAME)),
            },
            retention,
            shutdown(),
        ),
    );
    spawn(
        &mut tasks,
        hafen_audit::NAME,
        hafen_audit::serve(
            hafen_audit::Config {
                server: server(hafen_audit::NAME),
                databases: args.databases.clone(),
                operator,
                redis: args.redis.clone(),
                auth: auth_endpoint.clone(),
                record: hafen_audit::RecordArgs {
                    processor_name: "The operator of this Hafen installation (development)"
                        .to_owned(),
                    processor_contact: String::new(),
                    backup_policy: "none: a development stack keeps no backups".to_owned(),
                },
                keys_file: args.keys_dir.join(format!("{}.keys", hafen_audit::NAME)),
            },
            audit,
            shutdown(),
        ),
    );

    print_banner(&args, &ports);
    if args.demo {
        let seed_args = args.clone();
        tokio::spawn(async move {
            match crate::demo::seed(&seed_args, &seed_args.demo_file).await {
                Ok(widget) => {
                    if let (Some(page), Some(dir)) = (demo_page, &seed_args.widget_dir) {
                        serve_demo_page(&seed_args, internal_host, page, dir, widget).await;
                    }
                }
                Err(err) => tracing::error!(error = %err, "the demo organisation was not created"),
            }
        });
    }

    let mut failed = false;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((_, Ok(()))) => {}
            Ok((name, Err(err))) => {
                tracing::error!(service = name, error = %err, "service failed; stopping the others");
                failed = true;
                let _ = stop_tx.send(());
            }
            Err(err) => {
                tracing::error!(error = %err, "service task panicked; stopping the others");
                failed = true;
                let _ = stop_tx.send(());
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Serves the demo organisation's website, which embeds `widget` (runs until the process
/// ends).
#[expect(clippy::print_stdout, reason = "the address is the command's output")]
async fn serve_demo_page(
    args: &DevArgs,
    internal_host: IpAddr,
    listener: tokio::net::TcpListener,
    widget_dir: &std::path::Path,
    widget: String,
) {
    let tls = TlsArgs {
        tls_cert: Some(
            args.dev_certs_dir
                .join(format!("{}.pem", hafen_webchat::NAME)),
        ),
        tls_key: Some(
            args.dev_certs_dir
                .join(format!("{}-key.pem", hafen_webchat::NAME)),
        ),
        tls_ca: Some(args.dev_certs_dir.join("ca.pem")),
        mtls: false,
        dev_certs_dir: args.dev_certs_dir.clone(),
    };
    let tls = match hafen_platform::TlsMaterial::load(&tls, hafen_webchat::NAME)
        .and_then(|material| material.server_config())
    {
        Ok(tls) => tls,
        Err(err) => {
            tracing::error!(error = %err, "the demo page's TLS");
            return;
        }
    };
    let endpoint = format!(
        "https://{}",
        SocketAddr::new(internal_host, args.webchat_port)
    );
    let embed = match crate::demo_page::Embed::new(endpoint, widget, widget_dir) {
        Ok(embed) => embed,
        Err(err) => {
            tracing::error!(error = %err, "the built widget (scripts/widget.sh build)");
            return;
        }
    };
    println!(
        "The demo organisation's website: {}/ (chat there; answer with `hafen chat` as alice \
         or bob)",
        crate::demo::demo_origin(args.demo_page_port)
    );
    crate::demo_page::serve(listener, tls, embed).await;
}

fn spawn<Fut, E>(tasks: &mut JoinSet<Served>, name: &'static str, serve: Fut)
where
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display,
{
    tasks.spawn(async move { (name, serve.await.map_err(|err| err.to_string())) });
}

#[expect(clippy::print_stdout, reason = "the banner is the command's output")]
fn print_banner(args: &DevArgs, ports: &[(&str, u16)]) {
    println!(
        "Hafen dev stack (TLS; CA certificate: {}):",
        args.dev_certs_dir.join("ca.pem").display()
    );
    for (name, port) in ports {
        let grpc = if *name == hafen_webchat::NAME {
            "hafen.webchat.v1.VisitorService, WidgetService".to_owned()
        } else {
            format!(
                "hafen.{name}.v1.{}{}Service",
                name[..1].to_uppercase(),
                &name[1..]
            )
        };
        println!("  {name:<10} {}:{port:<6} {grpc}", args.host);
    }
    println!(
        "Operator token: {} (send as `authorization: Bearer <token>`)",
        args.platform_token_file.display()
    );
    println!("Stop with Ctrl-C.");
}
