//! The ordered drain: a signal stops new work, lets in-flight calls finish, and cuts off only
//! what outlives the drain timeout.
//!
//! These tests send SIGTERM to their own process; nextest runs every test in a process of its
//! own, so no other test sees the signal.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a failed step must fail the test, with its message"
)]

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use hafen_platform::GrpcServer;
use hafen_platform::tls::{DEV_SERVER_NAME, DevPki, TlsMaterial};
use tokio::sync::Notify;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::server::NamedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Response, Status};
use tonic_prost::ProstCodec;

/// A test service with one RPC, `Wait`, that takes `delay` and reports when it has started.
#[derive(Clone)]
struct Slow {
    delay: Duration,
    started: Arc<Notify>,
}

impl NamedService for Slow {
    const NAME: &'static str = "hafen.test.Slow";
}

impl tonic::codegen::Service<http::Request<Body>> for Slow {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(ProstCodec::<(), ()>::default());
            Ok(grpc.unary(WaitCall(this), request).await)
        })
    }
}

struct WaitCall(Slow);

impl tonic::server::UnaryService<()> for WaitCall {
    type Response = ();
    type Future = BoxFuture<'static, Result<Response<()>, Status>>;

    fn call(&mut self, _request: Request<()>) -> Self::Future {
        let Slow { delay, started } = self.0.clone();
        Box::pin(async move {
            started.notify_one();
            tokio::time::sleep(delay).await;
            Ok(Response::new(()))
        })
    }
}

fn pki() -> (DevPki, TlsMaterial) {
    hafen_platform::telemetry::install_crypto_provider();
    let pki = DevPki::generate("test CA", &["audit"]).unwrap();
    let (_, cert, key) = pki.services[0].clone();
    let tls = TlsMaterial {
        ca_pem: pki.ca_pem.clone(),
        cert_pem: cert,
        key_pem: key,
        mtls: false,
    };
    (pki, tls)
}

async fn connect(addr: std::net::SocketAddr, ca_pem: &str) -> Channel {
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca_pem))
                .domain_name(DEV_SERVER_NAME),
        )
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn call_wait(channel: Channel) -> Result<Response<()>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    grpc.unary(
        Request::new(()),
        PathAndQuery::from_static("/hafen.test.Slow/Wait"),
        ProstCodec::<(), ()>::default(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_in_flight_call_finish_before_exit() {
    let (pki, tls) = pki();
    let started = Arc::new(Notify::new());
    let slow = Slow {
        delay: Duration::from_millis(1500),
        started: started.clone(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // The handler is installed before any signal is sent: shared_signal() spawns it at once,
    // and the call below cannot start before the server task (spawned after it) runs.
    let shutdown = hafen_platform::shutdown::shared_signal();
    let server = tokio::spawn(
        GrpcServer::new("test", tls, Duration::from_secs(30))
            .add_service(slow)
            .serve(listener, shutdown),
    );
    let channel = connect(addr, &pki.ca_pem).await;
    let call = tokio::spawn(call_wait(channel));
    started.notified().await;

    let status = std::process::Command::new("kill")
        .args(["-TERM", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());

    let response = call.await.unwrap();
    assert!(
        response.is_ok(),
        "the in-flight call completes: {response:?}"
    );
    let served = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("the server exits once the call is done")
        .unwrap();
    assert!(served.is_ok(), "{served:?}");

    // The listener is closed: nobody new gets in.
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the port no longer accepts connections"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_outlives_the_drain_timeout_is_cut_off() {
    let (pki, tls) = pki();
    let started = Arc::new(Notify::new());
    let slow = Slow {
        delay: Duration::from_secs(600),
        started: started.clone(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        GrpcServer::new("test", tls, Duration::from_millis(300))
            .add_service(slow)
            .serve(listener, async move {
                let _ = stop_rx.await;
            }),
    );
    let channel = connect(addr, &pki.ca_pem).await;
    let call = tokio::spawn(call_wait(channel));
    started.notified().await;
    stop_tx.send(()).unwrap();

    let served = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("the drain is bounded")
        .unwrap();
    assert!(served.is_ok(), "{served:?}");
    let response = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("the client learns the call was cut off")
        .unwrap();
    assert!(response.is_err(), "the call did not complete: {response:?}");
}

/// A plaintext health port (for the kubelet's native gRPC probe, which speaks no TLS) says
/// what the TLS port's health says, NOT_SERVING once the drain begins, and serves nothing
/// else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dc5_the_plaintext_health_port_answers_probes_and_nothing_else() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let (pki, tls) = pki();
    let started = Arc::new(Notify::new());
    let slow = Slow {
        delay: Duration::from_secs(2),
        started: started.clone(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let health_addr = {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        free.local_addr().unwrap()
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        GrpcServer::new("test", tls, Duration::from_secs(10))
            .health_listen(Some(health_addr))
            .add_service(slow)
            .serve(listener, async move {
                let _ = stop_rx.await;
            }),
    );
    let plain = loop {
        if let Ok(channel) = Endpoint::from_shared(format!("http://{health_addr}"))
            .unwrap()
            .connect()
            .await
        {
            break channel;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut health = HealthClient::new(plain.clone());
    let check = |service: &str| HealthCheckRequest {
        service: service.to_owned(),
    };
    let status = |response: Result<Response<tonic_health::pb::HealthCheckResponse>, Status>| {
        response.unwrap().into_inner().status
    };
    // The services register as the server starts: wait until it has.
    let serving = ServingStatus::Serving as i32;
    for _ in 0..100 {
        if health
            .check(check("hafen.test.Slow"))
            .await
            .is_ok_and(|r| r.into_inner().status == serving)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status(health.check(check("")).await), serving);
    assert_eq!(
        status(health.check(check("hafen.test.Slow")).await),
        serving
    );

    // Nothing but health: the service itself is not reachable in plaintext.
    let refused = call_wait(plain.clone()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unimplemented, "{refused:?}");

    // While a call drains, both ports say NOT_SERVING; then the health port closes too.
    let channel = connect(addr, &pki.ca_pem).await;
    let call = tokio::spawn(call_wait(channel));
    started.notified().await;
    stop_tx.send(()).unwrap();
    let not_serving = ServingStatus::NotServing as i32;
    let mut seen = None;
    for _ in 0..100 {
        seen = Some(status(health.check(check("")).await));
        if seen == Some(not_serving) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(seen, Some(not_serving));
    assert!(call.await.unwrap().is_ok(), "the in-flight call completes");
    let served = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("the server stops")
        .unwrap();
    assert!(served.is_ok(), "{served:?}");
    let mut closed = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(health_addr).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(closed, "the health port closed with the server");
}
