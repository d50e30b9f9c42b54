//! `hafen dev --demo` started as a user starts it, for the tests that drive the whole stack:
//! its own database, Redis prefix, ports and files; killed if a test fails before it stops.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    dead_code,
    reason = "a failed step must fail the test, with its message; each test uses part of this"
)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use hafen_testkit::{TestDatabase, TestRedis};
use tokio::process::{Child, Command};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// The services' names, in the order of [`DevStack::ports`].
pub const SERVICES: [&str; 6] = [
    "auth",
    "messaging",
    "tenant",
    "retention",
    "audit",
    "webchat",
];

/// A running `hafen dev --demo`.
pub struct DevStack {
    pub child: Option<Child>,
    pub tmp: tempfile::TempDir,
    /// The services' ports, in the order of [`SERVICES`].
    pub ports: Vec<u16>,
    pub ca_pem: String,
    pub certs: PathBuf,
    /// `.dev/demo.txt` of this stack: the demo organisation's credentials and widget.
    pub demo: String,
    /// The port of the demo page (`--demo-page-port`).
    pub page_port: u16,
    /// The port of the process's `/metrics` (`--metrics-port`).
    pub metrics_port: u16,
    db: TestDatabase,
    _redis: TestRedis,
}

impl Drop for DevStack {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
    }
}

/// `count` ports free now.
pub fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<_> = (0..count)
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

/// What a start that lost one of its ports to another process logs.
const PORT_TAKEN: &str = "Address already in use";

impl DevStack {
    /// Starts `hafen dev --demo` with `extra` arguments; returns once every service is
    /// SERVING and the demo organisation is seeded. A port found free is sometimes taken by
    /// another process before the stack binds it: then the stack starts again, on other
    /// ports.
    pub async fn start(extra: &[&std::ffi::OsStr]) -> Self {
        for _ in 0..3 {
            if let Some(stack) = Self::try_start(extra).await {
                return stack;
            }
        }
        panic!("hafen dev lost a port to another process three times");
    }

    /// [`DevStack::start`] once; `None` when a port was taken meanwhile.
    async fn try_start(extra: &[&std::ffi::OsStr]) -> Option<Self> {
        hafen_testkit::init_test_logging();
        let db = TestDatabase::create_empty().await;
        let redis = TestRedis::new();
        let tmp = tempfile::tempdir().unwrap();
        let certs = tmp.path().join("certs");
        let mut ports = free_ports(SERVICES.len() + 2);
        let metrics_port = ports.pop().unwrap();
        let page_port = ports.pop().unwrap();

        let mut command = Command::new(env!("CARGO_BIN_EXE_hafen"));
        command.arg("dev");
        for (service, port) in SERVICES.iter().zip(&ports) {
            command
                .arg(format!("--{service}-port"))
                .arg(port.to_string());
        }
        command
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
            .arg("--demo-page-port")
            .arg(page_port.to_string())
            .arg("--metrics-port")
            .arg(metrics_port.to_string())
            .args(extra)
            .env("HAFEN_DATABASE_URL", db.url())
            .env("HAFEN_KEYSTORE_URL", db.keystore().url())
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
        let mut stack = Self {
            child: Some(command.spawn().unwrap()),
            ports,
            ca_pem: String::new(),
            certs,
            demo: String::new(),
            page_port,
            metrics_port,
            tmp,
            db,
            _redis: redis,
        };

        // Up within a bounded time (the first start also generates the certificates and
        // migrates).
        let deadline = Instant::now() + Duration::from_secs(60);
        stack.ca_pem = loop {
            if let Ok(pem) = std::fs::read_to_string(stack.certs.join("ca.pem")) {
                break pem;
            }
            if stack.lost_a_port() {
                return None;
            }
            assert!(Instant::now() < deadline, "no development CA was generated");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        for port in stack.ports.clone() {
            while !serving(port, &stack.ca_pem).await {
                if stack.lost_a_port() {
                    return None;
                }
                assert!(
                    Instant::now() < deadline,
                    "port {port} never became SERVING"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        stack.demo = loop {
            if let Ok(text) = std::fs::read_to_string(stack.tmp.path().join("demo.txt")) {
                break text;
            }
            if stack.lost_a_port() {
                return None;
            }
            assert!(
                Instant::now() < deadline,
                "the demo organisation was not seeded"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        Some(stack)
    }

    /// The stack's database.
    pub fn db_url(&self) -> &str {
        self.db.url()
    }

    /// Whether the stack exited because a port it was given was taken meanwhile; fails the
    /// test with the stack's log if it exited for another reason.
    fn lost_a_port(&mut self) -> bool {
        let exited = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
            .is_some();
        if exited && self.stderr().contains(PORT_TAKEN) {
            return true;
        }
        self.alive();
        false
    }

    /// Fails the test with the stack's log if it has exited.
    pub fn alive(&mut self) {
        if let Some(status) = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
        {
            panic!("hafen dev exited early ({status}): {}", self.stderr());
        }
    }

    /// What the stack logged so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.tmp.path().join("stderr")).unwrap_or_default()
    }

    /// The port of `service`.
    pub fn port(&self, service: &str) -> u16 {
        let index = SERVICES.iter().position(|s| *s == service).unwrap();
        self.ports[index]
    }

    /// The demo widget's id.
    pub fn widget(&self) -> &str {
        self.demo
            .split_whitespace()
            .skip_while(|word| *word != "widget")
            .nth(1)
            .expect("the demo file names the widget")
    }

    /// The password and chat code of a demo user.
    pub fn credentials(&self, username: &str) -> (String, String) {
        let line = self
            .demo
            .lines()
            .find(|line| line.split_whitespace().next() == Some(username))
            .expect("the demo file names the user");
        let words: Vec<&str> = line.split_whitespace().collect();
        let after = |label: &str| {
            let at = words.iter().position(|w| *w == label).unwrap();
            words[at + 1].to_owned()
        };
        (after("password"), after("code"))
    }

    /// An SDK configuration for this stack.
    pub fn config(&self) -> hafen_sdk::Config {
        let mut config = hafen_sdk::Config::local().with_ca_pem(self.ca_pem.clone().into_bytes());
        let at = |service: &str| format!("https://127.0.0.1:{}", self.port(service));
        config.endpoints = hafen_sdk::Endpoints {
            auth: at("auth"),
            messaging: at("messaging"),
            tenant: at("tenant"),
            retention: at("retention"),
            audit: at("audit"),
            webchat: at("webchat"),
        };
        config
    }

    /// Stops the stack with SIGTERM, as Ctrl-C would; returns what it printed.
    pub async fn stop(&mut self) -> String {
        use tokio::io::AsyncReadExt;
        let mut child = self.child.take().unwrap();
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
        banner
    }
}

/// The repository's root.
pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .and_then(Path::parent)
        .expect("crates/cli is two levels down")
}
