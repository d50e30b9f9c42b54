//! `hafen dev` as a user runs it: one process, six services on their ports, TLS with the
//! development CA, an orderly exit on SIGTERM (GR1: the single-binary mode).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a failed step must fail the test, with its message"
)]

use std::process::Stdio;
use std::time::{Duration, Instant};

use hafen_sdk::proto::webchat::v1 as webchat_pb;
use hafen_testkit::TestDatabase;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Kills the child if the test fails before it exits on its own.
struct Guard(Option<Child>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.start_kill();
        }
    }
}

fn free_ports() -> Vec<u16> {
    let listeners: Vec<_> = (0..6)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

async fn serving(port: u16, ca_pem: &str) -> bool {
    let Ok(endpoint) = Endpoint::from_shared(format!("https://127.0.0.1:{port}")) else {
        return false;
    };
    let Ok(endpoint) = endpoint.tls_config(
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca_pem))
            .domain_name("localhost"),
    ) else {
        return false;
    };
    let Ok(channel) = endpoint.connect().await else {
        return false;
    };
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32)
}

#[tokio::test(flavor = "multi_thread")]
async fn gr1_hafen_dev_runs_all_six_services_seeds_the_demo_and_stops_on_sigterm() {
    hafen_testkit::init_test_logging();
    let db = TestDatabase::create_empty().await;
    let redis = hafen_testkit::TestRedis::new();
    let tmp = tempfile::tempdir().unwrap();
    let certs = tmp.path().join("certs");
    let ports = free_ports();

    let mut command = Command::new(env!("CARGO_BIN_EXE_hafen"));
    command
        .arg("dev")
        .args(["--auth-port", &ports[0].to_string()])
        .args(["--messaging-port", &ports[1].to_string()])
        .args(["--tenant-port", &ports[2].to_string()])
        .args(["--retention-port", &ports[3].to_string()])
        .args(["--audit-port", &ports[4].to_string()])
        .args(["--webchat-port", &ports[5].to_string()])
        .arg("--dev-certs-dir")
        .arg(&certs)
        .arg("--master-key-file")
        .arg(tmp.path().join("master.key"))
        .arg("--keys-dir")
        .arg(tmp.path().join("keys"))
        .arg("--platform-token-file")
        .arg(tmp.path().join("platform-token"))
        .args(["--bcrypt-cost", "4"])
        .arg("--demo")
        .arg("--demo-file")
        .arg(tmp.path().join("demo.txt"))
        .env("HAFEN_DATABASE_URL", db.url())
        .env("HAFEN_REDIS_URL", redis.url())
        .envs(
            redis
                .args()
                .redis_ca
                .map(|ca| ("HAFEN_REDIS_CA", ca.into_os_string())),
        )
        .env("HAFEN_REDIS_PREFIX", redis.prefix())
        .env("HAFEN_LOG_FORMAT", "json")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(
            std::fs::File::create(tmp.path().join("stderr")).unwrap(),
        ))
        .kill_on_drop(true);
    let mut guard = Guard(Some(command.spawn().unwrap()));

    // Up within a bounded time (the first start also generates the certificates and migrates).
    let deadline = Instant::now() + Duration::from_secs(60);
    let ca_pem = loop {
        if let Ok(pem) = std::fs::read_to_string(certs.join("ca.pem")) {
            break pem;
        }
        if let Some(status) = guard.0.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            let stderr = std::fs::read_to_string(tmp.path().join("stderr")).unwrap_or_default();
            panic!("hafen dev exited early ({status}): {stderr}");
        }
        assert!(Instant::now() < deadline, "no development CA was generated");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for port in &ports {
        while !serving(*port, &ca_pem).await {
            assert!(
                Instant::now() < deadline,
                "port {port} never became SERVING"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert!(
        hafen_store::migrate::pending_control_plane(db.url())
            .await
            .unwrap()
            .is_empty(),
        "hafen dev migrated the control plane"
    );

    // The demo organisation (`make run`): its website chat serves a visitor, whose first
    // message reaches one of the two agents.
    let demo = loop {
        if let Ok(text) = std::fs::read_to_string(tmp.path().join("demo.txt")) {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "the demo organisation was not seeded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let widget = demo
        .split_whitespace()
        .skip_while(|word| *word != "widget")
        .nth(1)
        .expect("the demo file names the widget");
    let mut config = hafen_sdk::Config::local().with_ca_pem(ca_pem.clone().into_bytes());
    config.endpoints.webchat = format!("https://127.0.0.1:{}", ports[5]);
    let visitor = hafen_sdk::Visitor::connect(&config)
        .unwrap()
        .with_origin("https://localhost:8443")
        .unwrap();
    let mut calls = visitor.client();
    let shown = calls
        .get_widget_config(webchat_pb::GetWidgetConfigRequest {
            widget_id: widget.to_owned(),
        })
        .await
        .expect("the demo widget is enabled")
        .into_inner();
    let consent = shown
        .consent_text
        .expect("the demo widget has a consent text");
    visitor.start(widget).await.unwrap();
    calls
        .give_consent(webchat_pb::GiveConsentRequest {
            version: consent.version,
            granted: true,
        })
        .await
        .unwrap();
    calls
        .send_visitor_message(webchat_pb::SendVisitorMessageRequest {
            request_id: uuid::Uuid::new_v4().to_string(),
            body: "Hello from the demo page".into(),
        })
        .await
        .expect("an agent takes the demo chat");
    let mut child = guard.0.take().unwrap();
    let pid = child.id().unwrap();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("hafen dev exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "exit status {status}");

    let mut banner = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut banner)
        .await
        .unwrap();
    for (port, service) in ports.iter().zip([
        "auth",
        "messaging",
        "tenant",
        "retention",
        "audit",
        "webchat",
    ]) {
        assert!(
            banner.contains(&format!(":{port}")) && banner.contains(service),
            "the banner names {service} on {port}: {banner}"
        );
    }
}
