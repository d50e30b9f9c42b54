//! A Redis server of a test's own, for tests that stop Redis on purpose.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::env::workspace_root;

/// A `redis-server` child process on a free loopback port, without persistence; killed on
/// drop (or by [`PrivateRedis::stop`]). It speaks TLS only, with the development Redis's
/// certificate (from `.dev/certs`, made by `scripts/dev-services.sh up`), unless started
/// with [`PrivateRedis::start_plaintext`].
#[derive(Debug)]
pub struct PrivateRedis {
    child: Option<Child>,
    port: u16,
    tls: bool,
    dir: tempfile::TempDir,
}

impl PrivateRedis {
    /// Starts a TLS-only server and waits until it accepts connections.
    pub fn start() -> Self {
        Self::spawn(true)
    }

    /// Starts a plaintext-only server (for tests of what a TLS client does with one).
    pub fn start_plaintext() -> Self {
        Self::spawn(false)
    }

    fn spawn(tls: bool) -> Self {
        crate::init_test_logging();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = tempfile::tempdir().expect("a directory for Redis");
        let mut command = Command::new("redis-server");
        command.args(["--bind", "127.0.0.1"]);
        if tls {
            let certs = dev_certs();
            command
                .args(["--port", "0", "--tls-port", &port.to_string()])
                .arg("--tls-cert-file")
                .arg(certs.join("redis.pem"))
                .arg("--tls-key-file")
                .arg(certs.join("redis-key.pem"))
                .arg("--tls-ca-cert-file")
                .arg(certs.join("ca.pem"))
                .args(["--tls-auth-clients", "no"]);
        } else {
            command.args(["--port", &port.to_string()]);
        }
        let child = command
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (installed by scripts/dev-services.sh)");
        let redis = Self {
            child: Some(child),
            port,
            tls,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        redis
    }

    /// Its URL: `rediss://` unless started in plaintext.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}/", self.port)
    }

    /// Settings for a service using this server, with keys under `prefix`.
    pub fn args(&self, prefix: &str) -> hafen_authn::RedisArgs {
        hafen_authn::RedisArgs {
            redis_url: self.url(),
            redis_ca: self.tls.then(|| dev_certs().join("ca.pem")),
            redis_prefix: prefix.to_owned(),
            redis_cluster: false,
        }
    }

    /// Kills the server (Redis goes down mid-test).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = &self.dir;
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The development certificates: the CA, and Redis's certificate and key.
fn dev_certs() -> PathBuf {
    let certs = workspace_root().join(".dev/certs");
    assert!(
        certs.join("redis.pem").is_file(),
        "no development Redis certificate: run `scripts/dev-services.sh up` (or `make test`)"
    );
    certs
}
