//! The foundation every service stands on: TLS-only gRPC, health, reflection, contracts, and
//! command lines that parse (DC1, DC5, OC4, TM5).

use hafen_testkit::{Service, TestDatabase, TestSecrets, TestServer};
use std::error::Error as _;

use tokio_stream::StreamExt;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Starts `service` with fresh certificates and a fresh database.
async fn start(service: Service) -> (TestSecrets, Option<TestDatabase>, TestServer) {
    let certs = TestSecrets::generate();
    let database = Some(TestDatabase::create().await);
    let server = TestServer::start(service, &certs, database.as_ref()).await;
    (certs, database, server)
}

async fn assert_serving_and_reflected(service: Service) {
    let (certs, _db, server) = start(service).await;
    let channel = server.channel(&certs).await;

    let mut health = HealthClient::new(channel.clone());
    for name in ["".to_owned(), service.grpc_name()] {
        let status = health
            .check(HealthCheckRequest {
                service: name.clone(),
            })
            .await
            .unwrap_or_else(|err| panic!("health check of {name:?}: {err}"))
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "health of {name:?}");
    }

    let listed = list_services_v1(channel.clone()).await;
    assert!(
        listed.contains(&service.grpc_name()),
        "reflection v1 lists {listed:?}"
    );
    assert!(listed.contains(&"grpc.health.v1.Health".to_owned()));
    let others: Vec<_> = Service::ALL
        .iter()
        .filter(|s| **s != service)
        .map(|s| s.grpc_name())
        .collect();
    assert!(
        listed.iter().all(|name| !others.contains(name)),
        "a server lists only its own Hafen service: {listed:?}"
    );
    let listed_alpha = list_services_v1alpha(channel).await;
    assert!(
        listed_alpha.contains(&service.grpc_name()),
        "reflection v1alpha (grpcurl 1.8) lists {listed_alpha:?}"
    );

    server.shutdown().await.expect("clean shutdown");
}

async fn list_services_v1(channel: tonic::transport::Channel) -> Vec<String> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let mut client = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::once(request))
        .await
        .expect("reflection v1")
        .into_inner();
    let response = responses.next().await.expect("one response").expect("ok");
    match response.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection response {other:?}"),
    }
}

async fn list_services_v1alpha(channel: tonic::transport::Channel) -> Vec<String> {
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;

    let mut client = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::once(request))
        .await
        .expect("reflection v1alpha")
        .into_inner();
    let response = responses.next().await.expect("one response").expect("ok");
    match response.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection response {other:?}"),
    }
}

#[tokio::test]
async fn dc1_auth_serves_health_and_reflection_over_tls() {
    assert_serving_and_reflected(Service::Auth).await;
}

#[tokio::test]
async fn dc1_messaging_serves_health_and_reflection_over_tls() {
    assert_serving_and_reflected(Service::Messaging).await;
}

#[tokio::test]
async fn dc1_tenant_serves_health_and_reflection_over_tls() {
    assert_serving_and_reflected(Service::Tenant).await;
}

#[tokio::test]
async fn dc1_retention_serves_health_and_reflection_over_tls() {
    assert_serving_and_reflected(Service::Retention).await;
}

#[tokio::test]
async fn dc1_audit_serves_health_and_reflection_over_tls() {
    assert_serving_and_reflected(Service::Audit).await;
}

#[tokio::test]
async fn dc1_webchat_serves_health_and_reflection_over_tls() {
    assert_serving_and_reflected(Service::Webchat).await;
}

#[tokio::test]
async fn oc4_plaintext_connection_is_refused() {
    let (certs, _db, server) = start(Service::Auth).await;
    let channel = Endpoint::from_shared(format!("http://{}", server.addr()))
        .unwrap()
        .connect()
        .await
        .expect("TCP connects; the TLS server then rejects the plaintext HTTP/2 preface");
    let err = HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .expect_err("a plaintext call must not be answered");
    // The server answers the plaintext preface with a TLS alert and closes: the client sees
    // a transport or protocol error, never an answer from the service.
    assert!(
        matches!(
            err.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal
        ),
        "{err}"
    );
    assert!(err.source().is_some(), "a transport-level failure: {err:?}");
    assert!(
        err.metadata().get("grpc-status").is_none(),
        "no gRPC response: {err}"
    );

    // The same server answers over TLS.
    HealthClient::new(server.channel(&certs).await)
        .check(HealthCheckRequest::default())
        .await
        .expect("health over TLS");
}

#[tokio::test]
async fn oc4_client_that_does_not_trust_the_ca_is_refused() {
    let (_certs, _db, server) = start(Service::Retention).await;
    let stranger = TestSecrets::generate();
    let result = server.try_channel(stranger.client_tls(None)).await;
    assert!(
        result.is_err(),
        "a client trusting another CA must fail the handshake"
    );
}

#[tokio::test]
async fn oc4_mtls_rejects_a_client_certificate_from_another_ca() {
    let (certs, _db, server) = start(Service::Audit).await;

    // A service certificate from the right CA is accepted…
    let channel = server
        .try_channel(certs.client_tls(Some("auth")))
        .await
        .expect("a peer with a CA-signed certificate connects");
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .expect("health over mTLS");

    // …one from another CA is not, even though the client trusts the server.
    let stranger = TestSecrets::generate();
    let stranger_dir = stranger.dir();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(certs.ca_pem()))
        .domain_name("localhost")
        .identity(tonic::transport::Identity::from_pem(
            std::fs::read(stranger_dir.join("auth.pem")).unwrap(),
            std::fs::read(stranger_dir.join("auth-key.pem")).unwrap(),
        ));
    let refused = match server.try_channel(tls).await {
        Err(_) => true,
        Ok(channel) => HealthClient::new(channel)
            .check(HealthCheckRequest::default())
            .await
            .is_err(),
    };
    assert!(refused, "a certificate from another CA must be rejected");
}

#[tokio::test]
async fn dc5_business_rpcs_refuse_callers_without_credentials() {
    use hafen_proto::audit::v1::VerifyChainRequest;
    use hafen_proto::audit::v1::audit_service_client::AuditServiceClient;

    let (certs, _db, server) = start(Service::Audit).await;
    let mut client = AuditServiceClient::new(server.channel(&certs).await);
    let err = client
        .verify_chain(VerifyChainRequest::default())
        .await
        .expect_err("no token, no answer");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread")]
async fn tenant_service_refuses_an_unmigrated_control_plane() {
    let certs = TestSecrets::generate();
    let db = TestDatabase::create_empty().await;
    let server = TestServer::start(Service::Tenant, &certs, Some(&db)).await;
    let err = server
        .shutdown()
        .await
        .expect_err("serve must refuse to start");
    assert!(err.contains("hafen-tenant migrate"), "names the fix: {err}");
}

/// A service started beside `hafen-tenant migrate` (the Helm chart's migration Job) waits for
/// it (`--migration-wait`) instead of refusing to start, and serves once it is done.
#[tokio::test(flavor = "multi_thread")]
async fn dc5_a_service_waits_for_the_migration_that_runs_beside_its_rollout() {
    let secrets = TestSecrets::generate();
    let db = TestDatabase::create_empty().await;
    let mut config = secrets.tenant_config(&db, &[]);
    config.databases.main.migration_wait = std::time::Duration::from_secs(60);
    let server = TestServer::spawn(|l, s| hafen_tenant::serve(config, l, s)).await;
    let serving = async || {
        let channel = tokio::time::timeout(
            std::time::Duration::from_millis(500),
            server.try_channel(secrets.client_tls(None)),
        )
        .await
        .ok()?
        .ok()?;
        let status = HealthClient::new(channel)
            .check(HealthCheckRequest::default())
            .await
            .ok()?
            .into_inner()
            .status;
        (status == ServingStatus::Serving as i32).then_some(())
    };
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    assert!(
        serving().await.is_none(),
        "not serving before the migration"
    );

    hafen_store::migrate::migrate_keystore(db.keystore().url())
        .await
        .unwrap();
    hafen_store::migrate::migrate_control_plane(db.url())
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while serving().await.is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "serving once the migration is done"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    server.shutdown().await.unwrap();
}

#[test]
fn dc1_every_binary_help_parses() {
    for command in [
        hafen_auth::command(),
        hafen_messaging::command(),
        hafen_tenant::command(),
        hafen_retention::command(),
        hafen_audit::command(),
        hafen_webchat::command(),
        hafen_cli::command(),
    ] {
        let name = command.get_name().to_owned();
        command.debug_assert();
        assert!(name.starts_with("hafen"), "{name}");
    }
}

#[test]
fn dc1_every_flag_has_a_hafen_environment_variable() {
    fn check(command: &clap::Command, path: &str) {
        for arg in command.get_arguments() {
            let id = arg.get_id().as_str();
            if arg.is_positional() || ["help", "version"].contains(&id) {
                continue;
            }
            let env = arg
                .get_env()
                .unwrap_or_else(|| panic!("{path} --{id} has no environment variable"));
            assert!(
                env.to_string_lossy().starts_with("HAFEN_"),
                "{path} --{id} reads {env:?}"
            );
        }
        for sub in command.get_subcommands() {
            check(sub, &format!("{path} {}", sub.get_name()));
        }
    }
    for command in [
        hafen_auth::command(),
        hafen_messaging::command(),
        hafen_tenant::command(),
        hafen_retention::command(),
        hafen_audit::command(),
        hafen_webchat::command(),
        hafen_cli::command(),
    ] {
        check(&command, command.get_name());
    }
}
