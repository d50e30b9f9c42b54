//! The gRPC server every service runs: TLS (HTTP/2, and HTTP/1.1 for gRPC-Web), `grpc.health.v1`, server reflection (v1 and
//! v1alpha, for grpcurl 1.8) and an ordered drain on shutdown.
//!
//! A service builds a [`GrpcServer`], adds its tonic services and calls
//! [`GrpcServer::serve`] with a bound listener and a shutdown future. The server never binds
//! its own port, so tests run it on port 0.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::body::Body;
use tonic::codegen::{Service, http};
use tonic::server::NamedService;
use tonic::service::Routes;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::conn::{CutSignal, CuttableIo};
use crate::error::Result;
use crate::tls::{HANDSHAKE_TIMEOUT, TlsMaterial};

/// Idle connections are probed so half-open peers do not hold resources forever.
const HTTP2_KEEPALIVE: Duration = Duration::from_secs(30);

/// How long cut connections get to close before the server stops waiting for them.
const CUT_GRACE: Duration = Duration::from_secs(5);

/// A gRPC server under construction: TLS material, the health reporter and the services.
pub struct GrpcServer {
    name: &'static str,
    tls: TlsMaterial,
    drain_timeout: Duration,
    health: HealthReporter,
    routes: Routes,
    service_names: Vec<&'static str>,
    browsers: crate::web::BrowserLayer,
    health_listen: Option<std::net::SocketAddr>,
    metrics_listen: Option<std::net::SocketAddr>,
}

impl std::fmt::Debug for GrpcServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcServer")
            .field("name", &self.name)
            .field("services", &self.service_names)
            .finish_non_exhaustive()
    }
}

impl GrpcServer {
    /// Starts a server named `name` (used in logs) that terminates TLS with `tls` and gives
    /// in-flight calls `drain_timeout` to finish after shutdown begins.
    pub fn new(name: &'static str, tls: TlsMaterial, drain_timeout: Duration) -> Self {
        Self {
            name,
            tls,
            drain_timeout,
            health: HealthReporter::new(),
            routes: Routes::default(),
            service_names: Vec::new(),
            browsers: crate::web::BrowserLayer::default(),
            health_listen: None,
            metrics_listen: None,
        }
    }

    /// Serves `grpc.health.v1` on `addr` too, in plaintext and nothing else, for probes
    /// that speak no TLS (Kubernetes' native gRPC probe); it reports what the TLS port does,
    /// NOT_SERVING during the drain included, and stops with the server.
    pub fn health_listen(mut self, addr: Option<std::net::SocketAddr>) -> Self {
        self.health_listen = addr;
        self
    }

    /// Serves the process's Prometheus metrics as `/metrics` on `addr` ([`crate::metrics`]),
    /// until the server stops.
    pub fn metrics_listen(mut self, addr: Option<std::net::SocketAddr>) -> Self {
        self.metrics_listen = addr;
        self
    }

    /// [`GrpcServer::health_listen`] and [`GrpcServer::metrics_listen`] as `args` say.
    pub fn side_ports(self, args: &crate::ServerArgs) -> Self {
        self.health_listen(args.health_listen)
            .metrics_listen(args.metrics_listen)
    }

    /// Serves browsers of the origins `args` names with gRPC-Web ([`crate::web`]).
    pub fn browsers(mut self, args: &crate::web::BrowserArgs) -> Self {
        self.browsers = crate::web::BrowserLayer::new(&args.browser_origins);
        self
    }

    /// Adds a tonic service; health reports it SERVING and reflection lists it. Its requests
    /// are checked against the contract first ([`crate::check`]), up to tonic's default size.
    pub fn add_service<S>(self, service: S) -> Self
    where
        S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.add_service_with_internal(service, &[])
    }

    /// [`GrpcServer::add_service`] for a service with internal methods: only their callers
    /// get past the check, and only they may send larger messages (the service's tonic server
    /// must decode as much).
    pub fn add_service_with_internal<S>(
        mut self,
        service: S,
        internal: &'static [crate::check::InternalMethod],
    ) -> Self
    where
        S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.routes = self.routes.add_service(crate::check::Checked::new(
            service,
            crate::check::DEFAULT_MAX_REQUEST_BYTES,
            internal,
        ));
        self.service_names.push(S::NAME);
        self
    }

    /// The health reporter, for services whose readiness depends on more than the process.
    pub fn health(&self) -> HealthReporter {
        self.health.clone()
    }

    /// Serves on `listener` until `shutdown` resolves, then drains: health turns NOT_SERVING,
    /// the listener closes, and in-flight calls get the drain timeout to finish before the
    /// remaining connections are cut.
    pub async fn serve<F>(self, listener: TcpListener, shutdown: F) -> Result<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let Self {
            name,
            tls,
            drain_timeout,
            health,
            routes,
            service_names,
            browsers,
            health_listen,
            metrics_listen,
        } = self;
        // Installed before the first call, so every call is counted.
        let _ = crate::metrics::handle();

        for service in &service_names {
            health
                .set_service_status(*service, ServingStatus::Serving)
                .await;
        }
        let health_service = tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(health.clone()),
        );

        let mut v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(hafen_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            );
        let mut v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(hafen_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET);
        for listed in service_names.iter().copied().chain(BUILTIN_SERVICES) {
            v1 = v1.with_service_name(listed);
            v1alpha = v1alpha.with_service_name(listed);
        }

        let _plain_health = match health_listen {
            Some(addr) => {
                let listener = crate::bind(addr).await?;
                tracing::info!(server = name, addr = %addr, "serving grpc.health.v1 in plaintext");
                let plain = Server::builder()
                    .add_service(health_service.clone())
                    .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true)));
                Some(AbortOnDrop(tokio::spawn(async move {
                    if let Err(err) = plain.await {
                        tracing::warn!(error = %err, "plaintext health server stopped");
                    }
                })))
            }
            None => None,
        };
        let _metrics = match metrics_listen {
            Some(addr) => {
                let listener = crate::bind(addr).await?;
                tracing::info!(server = name, addr = %addr, "serving /metrics");
                Some(AbortOnDrop(tokio::spawn(crate::metrics::serve(listener))))
            }
            None => None,
        };
        let metered = crate::metrics::GrpcMetricsLayer::new(&service_names);
        let routes = routes
            .add_service(health_service)
            .add_service(v1.build_v1()?)
            .add_service(v1alpha.build_v1alpha()?);

        let local_addr = listener.local_addr().ok();
        let (cut_tx, cut_rx) = tokio::sync::oneshot::channel::<()>();
        let cut: CutSignal = async move {
            let _ = cut_rx.await;
        }
        .boxed()
        .shared();
        let accepted = TcpIncoming::from(listener)
            .with_nodelay(Some(true))
            .with_keepalive(Some(HTTP2_KEEPALIVE))
            .map(move |accepted| accepted.map(|tcp| CuttableIo::new(tcp, cut.clone())));
        let incoming = tls_handshakes(accepted, TlsAcceptor::from(tls.server_config()?));

        let (draining_tx, draining_rx) = tokio::sync::oneshot::channel::<()>();
        let drain_health = health.clone();
        let signal = async move {
            shutdown.await;
            tracing::info!(
                server = name,
                "shutdown requested: draining in-flight calls"
            );
            drain_health
                .set_service_status("", ServingStatus::NotServing)
                .await;
            for service in &service_names {
                drain_health
                    .set_service_status(*service, ServingStatus::NotServing)
                    .await;
            }
            let _ = draining_tx.send(());
        };

        let server = Server::builder()
            .accept_http1(true)
            .http2_keepalive_interval(Some(HTTP2_KEEPALIVE))
            .layer(browsers)
            .layer(metered)
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming, signal);
        tokio::pin!(server);

        tracing::info!(server = name, addr = ?local_addr, "serving gRPC over TLS");
        let deadline = async move {
            // Never fires before shutdown begins (a dropped sender means the server ended).
            if draining_rx.await.is_ok() {
                tokio::time::sleep(drain_timeout).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            result = &mut server => result?,
            () = deadline => {
                tracing::warn!(
                    server = name,
                    timeout = ?drain_timeout,
                    "drain timeout reached: cutting the remaining connections"
                );
                let _ = cut_tx.send(());
                // Cut connections fail on their next read or write; the server then returns.
                if tokio::time::timeout(CUT_GRACE, &mut server).await.is_err() {
                    tracing::warn!(server = name, "connections still open after the cut");
                }
            }
        }
        tracing::info!(server = name, "stopped");
        Ok(())
    }
}

/// Aborts a task when dropped: the plaintext health server ends with the server.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The TLS connections of `accepted`, each as its handshake completes: handshakes run
/// concurrently, each in a task of its own with [`HANDSHAKE_TIMEOUT`], so a slow or silent
/// client holds up nobody. (tonic's own TLS offers only HTTP/2 by ALPN; browsers' gRPC-Web
/// may come over HTTP/1.1.) Accepting stops when the server drops the stream.
fn tls_handshakes<S>(
    mut accepted: S,
    acceptor: TlsAcceptor,
) -> impl futures::Stream<Item = std::io::Result<TlsStream<CuttableIo>>> + Send + 'static
where
    S: futures::Stream<Item = std::io::Result<CuttableIo>> + Send + Unpin + 'static,
{
    let (done, handshaken) = tokio::sync::mpsc::channel(HANDSHAKES_WAITING);
    tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                () = done.closed() => return,
                next = accepted.next() => next,
            };
            let io = match next {
                Some(Ok(io)) => io,
                Some(Err(error)) => {
                    tracing::debug!(%error, "accepting a connection failed");
                    continue;
                }
                None => return,
            };
            let (acceptor, done) = (acceptor.clone(), done.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
                    Ok(Ok(tls)) => {
                        let _ = done.send(Ok(tls)).await;
                    }
                    Ok(Err(error)) => tracing::debug!(%error, "TLS handshake failed"),
                    Err(_) => tracing::debug!("TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(handshaken)
}

/// Completed handshakes waiting for the server to take them.
const HANDSHAKES_WAITING: usize = 64;

/// Services every server exposes besides its own, listed by reflection.
const BUILTIN_SERVICES: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];
