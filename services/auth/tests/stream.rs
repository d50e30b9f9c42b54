//! OC5 across services: a server stream that a user holds open on another service ends with
//! DEVICE_WIPED within a second of the device's chat code being revoked.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a failed step must fail the test, with its message"
)]

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::future::BoxFuture;
use hafen_authn::remote::RemoteIntrospect;
use hafen_authn::{Authenticator, AuthnLayer, Redis, Revocations};
use hafen_platform::{GrpcServer, TlsMaterial};
use hafen_proto::auth::v1 as pb;
use hafen_testkit::{TestServer, TestStack, eventually, with_token};
use tonic::body::Body;
use tonic::codegen::http;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::server::NamedService;
use tonic::{Request, Response, Status};
use tonic_prost::ProstCodec;

/// A service with one server-streaming RPC, `Ticks`, that sends a tick every 50 ms to a
/// logged-in user, guarded like every Hafen stream.
#[derive(Clone)]
struct Ticker {
    authenticator: Authenticator,
}

impl NamedService for Ticker {
    const NAME: &'static str = "hafen.test.Ticker";
}

struct Ticks(Authenticator);

impl tonic::server::ServerStreamingService<()> for Ticks {
    type Response = ();
    type ResponseStream = futures::stream::BoxStream<'static, Result<(), Status>>;
    type Future = BoxFuture<'static, Result<Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, request: Request<()>) -> Self::Future {
        let authenticator = self.0.clone();
        Box::pin(async move {
            let session = hafen_authn::user(&request)?.session_id;
            let ticks = futures::stream::unfold((), |()| async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Some((Ok(()), ()))
            });
            Ok(Response::new(hafen_authn::end_on_revocation(
                ticks,
                authenticator,
                session,
            )))
        })
    }
}

impl tonic::codegen::Service<http::Request<Body>> for Ticker {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let ticks = Ticks(self.authenticator.clone());
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(ProstCodec::<(), ()>::default());
            Ok(grpc.server_streaming(ticks, request).await)
        })
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn oc5_an_open_stream_on_another_service_ends_with_device_wiped() {
    let stack = TestStack::start().await;
    let tenant = stack.create_tenant("streams").await;
    let owner = stack.login_owner(&tenant).await;
    let second = stack
        .auth_client()
        .await
        .issue_chat_code(with_token(
            &owner.access_token,
            pb::IssueChatCodeRequest {
                user_id: tenant.owner_id.clone(),
                device_label: "tablet".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let device = stack
        .login(
            &tenant.slug,
            "owner",
            hafen_testkit::OWNER_PASSWORD,
            &second.code,
        )
        .await
        .unwrap();

    // "Another service": its own process-level state, set up as every service sets it up.
    let secrets = &stack.secrets;
    let tls = TlsMaterial::load(&secrets.server_args("messaging").tls, "messaging").unwrap();
    let redis = Redis::new(&secrets.redis_args()).unwrap();
    let revocations = Revocations::new(hafen_authn::MAX_ACCESS_TTL);
    revocations.listen(redis.clone());
    let mut endpoint = secrets.tenant_config(&stack.db, &[]).auth;
    endpoint.auth_endpoint = stack.auth.uri();
    let resolver = RemoteIntrospect::new(&endpoint, &tls).unwrap();
    let authenticator =
        Authenticator::new(None, Some(redis), Arc::new(resolver), revocations.clone());
    let layer = AuthnLayer::new(authenticator.clone(), &[]);
    let ticker = layer.wrap(Ticker { authenticator });
    let server = TestServer::spawn(|listener, shutdown| {
        GrpcServer::new("ticker", tls, Duration::from_secs(1))
            .add_service(ticker)
            .serve(listener, shutdown)
    })
    .await;
    // An announcement made before the subscription would be missed.
    eventually(
        "the revocation channel is followed",
        Duration::from_secs(10),
        || std::future::ready(revocations.following_since()),
    )
    .await;

    let mut grpc = tonic::client::Grpc::new(server.channel(secrets).await);
    grpc.ready().await.unwrap();
    let mut ticks = grpc
        .server_streaming(
            with_token(&device.access_token, ()),
            PathAndQuery::from_static("/hafen.test.Ticker/Ticks"),
            ProstCodec::<(), ()>::default(),
        )
        .await
        .expect("the stream opens for a live session")
        .into_inner();
    ticks.next().await.unwrap().expect("ticks flow");

    let revoked_at = Instant::now();
    stack
        .auth_client()
        .await
        .revoke_chat_code(with_token(
            &owner.access_token,
            pb::RevokeChatCodeRequest {
                chat_code_id: device.chat_code_id.clone(),
            },
        ))
        .await
        .unwrap();
    let ended =
        hafen_testkit::ending_status(&mut ticks, "after the wipe", Duration::from_secs(1)).await;
    assert!(revoked_at.elapsed() < Duration::from_secs(1));
    assert_eq!(ended.code(), tonic::Code::Unauthenticated);
    assert_eq!(
        hafen_platform::status::reason(&ended).as_deref(),
        Some("DEVICE_WIPED")
    );

    // The owner's own stream, on another chat code, is untouched.
    grpc.ready().await.unwrap();
    let mut owner_ticks = grpc
        .server_streaming(
            with_token(&owner.access_token, ()),
            PathAndQuery::from_static("/hafen.test.Ticker/Ticks"),
            ProstCodec::<(), ()>::default(),
        )
        .await
        .unwrap()
        .into_inner();
    owner_ticks
        .next()
        .await
        .unwrap()
        .expect("other sessions keep streaming");
}
