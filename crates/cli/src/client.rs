//! What every client command shares: where Hafen is, the stored session of a profile, how
//! results are printed (`--output text|json`), and exit codes scripts can rely on.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use hafen_sdk::{Config, Endpoints, Error, Hafen, Session};
use serde_json::Value;

/// Exit codes of the client commands (also listed in `hafen --help`).
pub mod exit {
    /// Done.
    pub const OK: u8 = 0;
    /// Something else went wrong (see the message).
    pub const FAILED: u8 = 1;
    /// The command line is wrong (clap's own code).
    pub const USAGE: u8 = 2;
    /// Not logged in, the login failed, or the session ended.
    pub const UNAUTHENTICATED: u8 = 3;
    /// Not allowed.
    pub const PERMISSION_DENIED: u8 = 4;
    /// No such tenant, user, conversation, message or chat code.
    pub const NOT_FOUND: u8 = 5;
    /// Bad input, or the object is in the wrong state for this.
    pub const INVALID: u8 = 6;
    /// A service is unreachable or busy: try again later.
    pub const UNAVAILABLE: u8 = 7;
    /// This device was wiped: the stored session is deleted.
    pub const WIPED: u8 = 8;
    /// It exists already, or the request id was used for something else.
    pub const CONFLICT: u8 = 9;
    /// An audit chain or export did not verify.
    pub const BROKEN_CHAIN: u8 = 10;
}

/// The exit-code table for `--help`.
pub const EXIT_CODES: &str = "Exit codes: 0 done; 1 failed; 2 usage error; 3 not logged in or \
login failed; 4 permission denied; 5 not found; 6 invalid input or state; 7 service \
unavailable (retry later); 8 this device was wiped; 9 already exists or conflict; 10 audit \
chain broken.";

/// How results are printed.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Output {
    /// For people.
    #[default]
    Text,
    /// One JSON document (or one JSON line per event for `chat tail`), for scripts.
    Json,
}

/// Where Hafen is and as whom to talk to it.
#[derive(clap::Args, Clone, Debug)]
pub struct ClientArgs {
    /// Host of the six services on their default ports (50051-50056), as `make run` starts
    /// them. Override single services with the --*-url options.
    #[arg(long, env = "HAFEN_HOST", default_value = "127.0.0.1", global = true)]
    pub host: String,

    /// URL of the auth service (default: `https://<host>:50051`).
    #[arg(long, env = "HAFEN_AUTH_URL", global = true)]
    pub auth_url: Option<String>,

    /// URL of the messaging service (default: `https://<host>:50052`).
    #[arg(long, env = "HAFEN_MESSAGING_URL", global = true)]
    pub messaging_url: Option<String>,

    /// URL of the tenant service (default: `https://<host>:50053`).
    #[arg(long, env = "HAFEN_TENANT_URL", global = true)]
    pub tenant_url: Option<String>,

    /// URL of the retention service (default: `https://<host>:50054`).
    #[arg(long, env = "HAFEN_RETENTION_URL", global = true)]
    pub retention_url: Option<String>,

    /// URL of the audit service (default: `https://<host>:50055`).
    #[arg(long, env = "HAFEN_AUDIT_URL", global = true)]
    pub audit_url: Option<String>,

    /// URL of the webchat service (default: `https://<host>:50056`).
    #[arg(long, env = "HAFEN_WEBCHAT_URL", global = true)]
    pub webchat_url: Option<String>,

    /// PEM file of the CA that signed the services' certificates. Default: the development
    /// CA `.dev/certs/ca.pem` when it exists here, otherwise the system's roots.
    #[arg(long, env = "HAFEN_CA_FILE", global = true)]
    pub ca_file: Option<PathBuf>,

    /// Name the services' certificates carry (default: `localhost` for a loopback host,
    /// otherwise the host).
    #[arg(long, env = "HAFEN_SERVER_NAME", global = true)]
    pub server_name: Option<String>,

    /// Name of the stored session to use, so several users can work from one machine (e.g.
    /// one terminal per profile).
    #[arg(long, env = "HAFEN_PROFILE", default_value = "default", global = true)]
    pub profile: String,

    /// Where sessions are stored (default: $XDG_CONFIG_HOME/hafen or ~/.config/hafen).
    #[arg(long, env = "HAFEN_CONFIG_DIR", global = true)]
    pub config_dir: Option<PathBuf>,

    /// File with the operator's platform token, for `admin tenant` commands.
    #[arg(
        long,
        env = "HAFEN_PLATFORM_TOKEN_FILE",
        default_value = ".dev/platform-token",
        global = true
    )]
    pub platform_token_file: PathBuf,

    /// How to print results.
    #[arg(long, short = 'o', env = "HAFEN_OUTPUT", value_enum, default_value_t = Output::Text, global = true)]
    pub output: Output,
}

/// A command's failure: what to print and the exit code.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub fn usage(message: impl Into<String>) -> Self {
        Self::new(exit::INVALID, message)
    }
}

impl From<Error> for Failure {
    fn from(err: Error) -> Self {
        use tonic::Code;
        let code = match &err {
            Error::Wiped => exit::WIPED,
            Error::NotLoggedIn => exit::UNAUTHENTICATED,
            Error::Config(_) => exit::USAGE,
            Error::Rpc { code, .. } => match code {
                Code::Unauthenticated => exit::UNAUTHENTICATED,
                Code::PermissionDenied => exit::PERMISSION_DENIED,
                Code::NotFound => exit::NOT_FOUND,
                Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
                    exit::INVALID
                }
                Code::AlreadyExists | Code::Aborted => exit::CONFLICT,
                Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted => {
                    exit::UNAVAILABLE
                }
                _ => exit::FAILED,
            },
        };
        let message = match &err {
            Error::Rpc {
                field: Some(field),
                message,
                reason,
                ..
            } => format!("{message} (field {field}, {reason})"),
            Error::NotLoggedIn => "not logged in: run `hafen login` first".to_owned(),
            other => other.to_string(),
        };
        Self { code, message }
    }
}

impl From<std::io::Error> for Failure {
    fn from(err: std::io::Error) -> Self {
        Self::new(exit::FAILED, err.to_string())
    }
}

/// The result of a client command.
pub type Outcome = Result<(), Failure>;

/// Turns an outcome into the process's exit code, printing a failure on stderr.
pub fn finish(outcome: Outcome, output: Output) -> ExitCode {
    match outcome {
        Ok(()) => ExitCode::from(exit::OK),
        Err(failure) => {
            if output == Output::Json {
                eprintln!(
                    "{}",
                    serde_json::json!({"error": failure.message, "exit_code": failure.code})
                );
            } else {
                eprintln!("hafen: {}", failure.message);
            }
            ExitCode::from(failure.code)
        }
    }
}

impl ClientArgs {
    pub(crate) fn config(&self) -> Result<Config, Failure> {
        let url = |explicit: &Option<String>, port: u16| {
            explicit
                .clone()
                .unwrap_or_else(|| format!("https://{}:{port}", self.host))
        };
        let ca_file = self.ca_file.clone().or_else(|| {
            let dev = PathBuf::from(".dev/certs/ca.pem");
            dev.exists().then_some(dev)
        });
        let ca_pem = match ca_file {
            Some(path) => Some(std::fs::read(&path).map_err(|err| {
                Failure::new(exit::USAGE, format!("--ca-file {}: {err}", path.display()))
            })?),
            None => None,
        };
        let loopback = matches!(
            self.host.as_str(),
            "127.0.0.1" | "localhost" | "::1" | "[::1]"
        );
        let server_name = self
            .server_name
            .clone()
            .or_else(|| loopback.then(|| "localhost".to_owned()));
        Ok(Config {
            endpoints: Endpoints {
                auth: url(&self.auth_url, 50051),
                messaging: url(&self.messaging_url, 50052),
                tenant: url(&self.tenant_url, 50053),
                retention: url(&self.retention_url, 50054),
                audit: url(&self.audit_url, 50055),
                webchat: url(&self.webchat_url, 50056),
            },
            ca_pem,
            server_name,
            timeout: std::time::Duration::from_secs(30),
        })
    }

    /// The directory sessions are stored in.
    pub fn config_dir(&self) -> Result<PathBuf, Failure> {
        if let Some(dir) = &self.config_dir {
            return Ok(dir.clone());
        }
        if let Some(xdg) = std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
            return Ok(PathBuf::from(xdg).join("hafen"));
        }
        std::env::var_os("HOME")
            .map(|home| PathBuf::from(home).join(".config").join("hafen"))
            .ok_or_else(|| Failure::usage("no HOME: set --config-dir"))
    }

    fn session_file(&self) -> Result<PathBuf, Failure> {
        self.profile_file("sessions")
    }

    /// The profile's file in the config directory's `dir` (`sessions`, `visits`).
    pub(crate) fn profile_file(&self, dir: &str) -> Result<PathBuf, Failure> {
        let valid = !self.profile.is_empty()
            && self
                .profile
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid {
            return Err(Failure::usage(
                "--profile: letters, digits, '-' and '_' only",
            ));
        }
        Ok(self
            .config_dir()?
            .join(dir)
            .join(format!("{}.json", self.profile)))
    }

    /// A connection without a session (for `login`).
    pub fn connect(&self) -> Result<Hafen, Failure> {
        Ok(Hafen::connect(self.config()?)?)
    }

    /// A connection that keeps the profile's session file current: rewritten on every
    /// refresh, deleted when the session ends or the device is wiped (OC5).
    pub fn connect_storing(&self) -> Result<Hafen, Failure> {
        let hafen = self.connect()?;
        let file = self.session_file()?;
        let on_change = file.clone();
        hafen.on_session_change(move |session| {
            let stored = match session {
                Some(session) => store_session(&on_change, session),
                None => remove_session(&on_change),
            };
            if let Err(err) = stored {
                eprintln!("hafen: the session file {}: {err}", on_change.display());
            }
        });
        hafen.on_wipe(move || {
            // The only local data this tool keeps is the session itself.
            let _ = remove_session(&file);
            eprintln!("hafen: this device was wiped by an administrator; its session is deleted");
        });
        Ok(hafen)
    }

    /// A connection with the profile's stored session.
    pub async fn logged_in(&self) -> Result<Hafen, Failure> {
        let file = self.session_file()?;
        let text = match std::fs::read_to_string(&file) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Err(Failure::new(
                    exit::UNAUTHENTICATED,
                    format!(
                        "not logged in (profile {}): run `hafen login` first",
                        self.profile
                    ),
                ));
            }
            Err(err) => return Err(err.into()),
        };
        let session: Session = serde_json::from_str(&text).map_err(|err| {
            Failure::new(
                exit::UNAUTHENTICATED,
                format!("the stored session is unreadable ({err}): log in again"),
            )
        })?;
        let hafen = self.connect_storing()?;
        hafen.resume(session).await?;
        Ok(hafen)
    }

    /// A connection as the platform operator.
    pub fn operator(&self) -> Result<Hafen, Failure> {
        let token = std::fs::read_to_string(&self.platform_token_file).map_err(|err| {
            Failure::new(
                exit::UNAUTHENTICATED,
                format!(
                    "--platform-token-file {}: {err}",
                    self.platform_token_file.display()
                ),
            )
        })?;
        let hafen = self.connect()?;
        hafen.act_as_operator(&token);
        Ok(hafen)
    }

    /// Forgets the profile's session here.
    pub fn forget_session(&self) -> Result<(), Failure> {
        Ok(remove_session(&self.session_file()?)?)
    }

    /// Prints `json` or, for people, `text`.
    pub fn print(&self, json: Value, text: impl FnOnce() -> String) {
        let line = match self.output {
            Output::Json => json.to_string(),
            Output::Text => text(),
        };
        if !line.is_empty() {
            let mut out = std::io::stdout().lock();
            // A closed pipe (`hafen … | head`) is not an error worth reporting.
            let _ = writeln!(out, "{line}").and_then(|()| out.flush());
        }
    }
}

/// Writes the session file, readable by its owner only (0600), atomically.
fn store_session(file: &Path, session: &Session) -> std::io::Result<()> {
    store_private_json(file, &serde_json::to_value(session)?)
}

/// Writes `value` as JSON to `file`, readable by its owner only (0600), atomically.
pub(crate) fn store_private_json(file: &Path, value: &Value) -> std::io::Result<()> {
    let dir = file
        .parent()
        .ok_or_else(|| std::io::Error::other("no directory"))?;
    std::fs::create_dir_all(dir)?;
    let temporary = file.with_extension("json.new");
    write_private(&temporary, serde_json::to_string_pretty(value)?.as_bytes())?;
    std::fs::rename(&temporary, file)
}

/// Writes `bytes` to `file`, readable by its owner only (0600), flushed to disk.
pub(crate) fn write_private(file: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(file)?;
    out.write_all(bytes)?;
    out.sync_all()
}

fn remove_session(file: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(file) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(err),
        _ => Ok(()),
    }
}

/// A secret from `file`, else the environment variable `env`, else asked for on the
/// terminal without echo (or read as one line from a pipe).
pub fn secret(file: Option<&Path>, env: &str, prompt: &str) -> Result<String, Failure> {
    if let Some(file) = file {
        let text = std::fs::read_to_string(file)
            .map_err(|err| Failure::usage(format!("{}: {err}", file.display())))?;
        return Ok(text.trim_end_matches(['\r', '\n']).to_owned());
    }
    if let Some(value) = std::env::var(env).ok().filter(|v| !v.is_empty()) {
        return Ok(value);
    }
    let stdin = std::io::stdin();
    let terminal = stdin.is_terminal();
    if terminal {
        eprint!("{prompt}: ");
        let _ = std::io::stderr().flush();
    }
    let echo = terminal.then(|| hide_echo(&stdin)).flatten();
    let mut line = String::new();
    let read = stdin.lock().read_line(&mut line);
    if let Some(saved) = echo {
        let _ = rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &saved);
        eprintln!();
    }
    read?;
    let value = line.trim_end_matches(['\r', '\n']).to_owned();
    if value.is_empty() {
        return Err(Failure::usage(format!("{prompt}: nothing entered")));
    }
    Ok(value)
}

/// Turns the terminal's echo off; returns the settings to restore.
fn hide_echo(stdin: &std::io::Stdin) -> Option<rustix::termios::Termios> {
    let saved = rustix::termios::tcgetattr(stdin).ok()?;
    let mut quiet = saved.clone();
    quiet.local_modes.remove(rustix::termios::LocalModes::ECHO);
    rustix::termios::tcsetattr(stdin, rustix::termios::OptionalActions::Now, &quiet).ok()?;
    Some(saved)
}

/// A protobuf timestamp as RFC 3339 (empty when unset).
pub fn time(timestamp: Option<&prost_types::Timestamp>) -> String {
    timestamp
        .and_then(hafen_platform::datetime)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}
