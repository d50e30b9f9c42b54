//! A PostgreSQL server of a test's own, for tests that stop the database on purpose or need one
//! set up differently from the development server (which speaks only TLS).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::env::{TestEnv, workspace_root};

/// A throwaway PostgreSQL cluster on a free loopback port, with trust authentication, the
/// application role `hafen_app` and a database `hafen` it owns; stopped and removed on drop.
/// Runs as the `postgres` user when the tests run as root (PostgreSQL refuses root).
#[derive(Debug)]
pub struct PrivatePostgres {
    bindir: PathBuf,
    root: PathBuf,
    data: PathBuf,
    port: u16,
    tls: bool,
    _dir: tempfile::TempDir,
}

impl PrivatePostgres {
    /// A server that speaks only TLS, with the development PostgreSQL certificate (from
    /// `.dev/certs`, made by `scripts/dev-services.sh up`), as the development server does.
    pub fn start() -> Self {
        Self::create(true)
    }

    /// A server that speaks only plaintext (`ssl=off`).
    pub fn start_plaintext() -> Self {
        Self::create(false)
    }

    fn create(tls: bool) -> Self {
        crate::init_test_logging();
        let bindir = bindir();
        let dir = tempfile::tempdir().expect("a directory for PostgreSQL");
        let root = dir.path().to_path_buf();
        let data = root.join("data");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        if tls {
            let certs = workspace_root().join(".dev/certs");
            std::fs::copy(certs.join("postgres.pem"), root.join("server.pem"))
                .expect("the development PostgreSQL certificate (scripts/dev-services.sh up)");
            std::fs::copy(certs.join("postgres-key.pem"), root.join("server-key.pem"))
                .expect("its key");
            std::fs::write(
                root.join("pg_hba.conf"),
                "hostssl all all 127.0.0.1/32 trust\n",
            )
            .expect("pg_hba.conf");
            set_mode(&root.join("server-key.pem"), 0o600);
        }
        if is_root() {
            chown_postgres(&root);
        }
        run(
            Command::new(bindir.join("initdb"))
                .arg("-D")
                .arg(&data)
                .args(["-U", "postgres", "--auth=trust", "-N", "--encoding=UTF8"]),
            "initdb",
        );
        let server = Self {
            bindir,
            root,
            data,
            port,
            tls,
            _dir: dir,
        };
        server.resume();
        for statement in [
            "CREATE ROLE hafen_app LOGIN CREATEROLE NOINHERIT",
            "CREATE DATABASE hafen OWNER hafen_app",
        ] {
            run(
                Command::new("psql").arg(server.admin_url()).args([
                    "-q",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-c",
                    statement,
                ]),
                "creating the application role and database",
            );
        }
        server
    }

    fn ssl_params(&self) -> String {
        if self.tls {
            format!(
                "sslmode=verify-full&sslrootcert={}",
                workspace_root().join(".dev/certs/ca.pem").display()
            )
        } else {
            "sslmode=disable".to_owned()
        }
    }

    /// The superuser's URL of its `postgres` database, asking for `sslmode`.
    pub fn url(&self, sslmode: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?sslmode={sslmode}",
            self.port
        )
    }

    fn admin_url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?{}",
            self.port,
            self.ssl_params()
        )
    }

    /// Where tests find this server, for [`crate::TestDatabase::create_in`] (Redis stays the
    /// development one).
    pub fn env(&self) -> TestEnv {
        let dev = TestEnv::get();
        TestEnv {
            database_url: format!(
                "postgres://hafen_app@127.0.0.1:{}/hafen?{}",
                self.port,
                self.ssl_params()
            ),
            admin_database_url: self.admin_url(),
            redis_url: dev.redis_url.clone(),
            redis_ca: dev.redis_ca.clone(),
            cluster_urls: dev.cluster_urls.clone(),
        }
    }

    /// Stops the server (fast shutdown: open connections are terminated), keeping its data.
    pub fn stop(&self) {
        let _ = self.pg_ctl(&["-m", "fast", "-w", "stop"]);
    }

    /// Starts the server again on its port, with its data.
    pub fn resume(&self) {
        let mut options = format!(
            "-c listen_addresses=127.0.0.1 -c port={} -c unix_socket_directories='' -c fsync=off \
             -c max_prepared_transactions=16",
            self.port
        );
        if self.tls {
            options.push_str(&format!(
                " -c ssl=on -c ssl_cert_file={root}/server.pem -c ssl_key_file={root}/server-key.pem \
                 -c hba_file={root}/pg_hba.conf",
                root = self.root.display()
            ));
        } else {
            options.push_str(" -c ssl=off");
        }
        let log = self.root.join("postgres.log");
        let status = self.pg_ctl(&[
            "-o",
            &options,
            "-w",
            "-t",
            "30",
            "-l",
            &log.display().to_string(),
            "start",
        ]);
        assert!(status, "pg_ctl start failed");
    }

    fn pg_ctl(&self, args: &[&str]) -> bool {
        let mut command = Command::new(self.bindir.join("pg_ctl"));
        command.arg("-D").arg(&self.data).args(args);
        as_cluster_user(&mut command)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self.pg_ctl(&["-m", "immediate", "-w", "stop"]);
    }
}

fn bindir() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server binaries (installed by scripts/dev-services.sh)")
        .flatten()
        .map(|entry| entry.path().join("bin"))
        .filter(|bin| bin.join("pg_ctl").is_file())
        .collect();
    found.sort();
    found.pop().expect("a PostgreSQL installation with pg_ctl")
}

fn is_root() -> bool {
    rustix::process::getuid().is_root()
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn chown_postgres(path: &Path) {
    let status = Command::new("chown")
        .args(["-R", "postgres"])
        .arg(path)
        .status()
        .expect("chown");
    assert!(status.success(), "chown postgres failed");
}

fn as_cluster_user(command: &mut Command) -> Command {
    if is_root() {
        let mut wrapped = Command::new("runuser");
        wrapped
            .args(["-u", "postgres", "--"])
            .arg(command.get_program())
            .args(command.get_args());
        wrapped
    } else {
        let mut copy = Command::new(command.get_program());
        copy.args(command.get_args());
        copy
    }
}

fn run(command: &mut Command, what: &str) {
    let output = as_cluster_user(command)
        .output()
        .unwrap_or_else(|err| panic!("{what}: {err}"));
    assert!(
        output.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}
