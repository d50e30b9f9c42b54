//! A PostgreSQL server of a test's own, for tests of what Hafen does with a server that is
//! set up differently from the development one (which speaks only TLS).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A throwaway PostgreSQL cluster on a free loopback port, plaintext only (`ssl=off`), with
/// trust authentication; stopped and removed on drop. Runs as the `postgres` user when the
/// tests run as root (PostgreSQL refuses root).
#[derive(Debug)]
pub struct PrivatePostgres {
    bindir: PathBuf,
    data: PathBuf,
    port: u16,
    _dir: tempfile::TempDir,
}

impl PrivatePostgres {
    /// Creates the cluster and starts it (a second or two).
    pub fn start_plaintext() -> Self {
        crate::init_test_logging();
        let bindir = bindir();
        let dir = tempfile::tempdir().expect("a directory for PostgreSQL");
        let data = dir.path().join("data");
        let root = is_root();
        if root {
            chown_postgres(dir.path());
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        run(
            root,
            Command::new(bindir.join("initdb"))
                .arg("-D")
                .arg(&data)
                .args(["-U", "postgres", "--auth=trust", "-N", "--encoding=UTF8"]),
            "initdb",
        );
        let options = format!(
            "-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories='' \
             -c ssl=off -c fsync=off"
        );
        run(
            root,
            Command::new(bindir.join("pg_ctl"))
                .arg("-D")
                .arg(&data)
                .args(["-o", &options, "-w", "-t", "30"])
                .arg("-l")
                .arg(dir.path().join("postgres.log"))
                .arg("start"),
            "pg_ctl start",
        );
        Self {
            bindir,
            data,
            port,
            _dir: dir,
        }
    }

    /// The superuser's URL of its `postgres` database, asking for `sslmode`.
    pub fn url(&self, sslmode: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?sslmode={sslmode}",
            self.port
        )
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let mut command = Command::new(self.bindir.join("pg_ctl"));
        command
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"]);
        let _ = as_cluster_user(is_root(), &mut command)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
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

fn chown_postgres(path: &Path) {
    let status = Command::new("chown")
        .arg("postgres")
        .arg(path)
        .status()
        .expect("chown");
    assert!(status.success(), "chown postgres failed");
}

fn as_cluster_user(root: bool, command: &mut Command) -> Command {
    if root {
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

fn run(root: bool, command: &mut Command, what: &str) {
    let output = as_cluster_user(root, command)
        .output()
        .unwrap_or_else(|err| panic!("{what}: {err}"));
    assert!(
        output.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}
