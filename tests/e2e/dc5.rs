//! Clients in other languages can be generated from our contracts (DC5): a Python client,
//! generated from `proto/` with grpcio-tools, logs in, creates a group, sends and lists
//! messages against the whole stack over TLS, and reads our error details.
//!
//! The Python packages live in a virtualenv under the target directory, created once and
//! reused: it is built in a temporary directory and renamed into place when complete (an
//! interrupted run leaves no broken venv), under a file lock (test processes run in parallel).
//! Its name carries a hash of the interpreter and the pinned requirements, so changing either
//! builds a new one next to the old.

use std::fs::{File, TryLockError};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use hafen_proto::messaging::v1 as messaging_pb;
use hafen_testkit::{OWNER_PASSWORD, TestStack, with_token};
use tokio::process::Command;

/// The interpreter that creates the virtualenv (scripts/setup.sh installs it on Debian).
const PYTHON: &str = "python3";

/// What the virtualenv holds: versions with wheels for CPython 3.9 to 3.14 on x86-64 and
/// aarch64 Linux (installed with `--only-binary`, so nothing is ever compiled).
const REQUIREMENTS: [&str; 4] = [
    "grpcio==1.85.1",
    "grpcio-tools==1.85.1",
    "protobuf==7.36.2",
    "googleapis-common-protos==1.76.0",
];

/// Written into the virtualenv when it is complete, before it is renamed into place.
const READY_MARKER: &str = "hafen-ready";

/// Creating the bare virtualenv (ensurepip included).
const VENV_TIMEOUT: Duration = Duration::from_secs(120);
/// Downloading and installing the requirements.
const PIP_TIMEOUT: Duration = Duration::from_secs(240);
/// Waiting for another test process that is building the virtualenv.
const LOCK_TIMEOUT: Duration = Duration::from_secs(420);
/// Short Python commands, and the code generation.
const TOOL_TIMEOUT: Duration = Duration::from_secs(60);
/// The client script against the running stack.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);

/// How to get what the test needs when Python is missing.
const SETUP_HINT: &str = "run scripts/setup.sh (it installs the Debian packages python3, \
     python3-venv and python3-pip), or install Python 3 with the venv module yourself";

/// The client: every input comes from the environment, the output is one JSON object on
/// stdout. It never prints the password or a token.
const CLIENT_SCRIPT: &str = r#"
import json
import os
import sys
import uuid

import grpc
from google.rpc import error_details_pb2, status_pb2

from hafen.auth.v1 import auth_pb2, auth_pb2_grpc
from hafen.messaging.v1 import messaging_pb2, messaging_pb2_grpc

env = os.environ
RPC_TIMEOUT = 15


def channel(address):
    with open(env["HAFEN_CA_FILE"], "rb") as f:
        credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
    return grpc.secure_channel(
        address,
        credentials,
        options=[
            # The certificates are for "localhost"; the services listen on 127.0.0.1.
            ("grpc.ssl_target_name_override", "localhost"),
            ("grpc.enable_http_proxy", 0),
        ],
    )


def error_of(err):
    """The status code and the google.rpc.ErrorInfo of a failed call."""
    found = {"code": err.code().name, "reason": None, "domain": None}
    for key, value in err.trailing_metadata() or ():
        if key != "grpc-status-details-bin":
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                found["reason"] = info.reason
                found["domain"] = info.domain
    return found


def message_summary(message):
    return {
        "message_id": message.message_id,
        "conversation_id": message.conversation_id,
        "sequence": message.sequence,
        "sender_user_id": message.sender_user_id,
        "body": message.body,
    }


def main():
    auth = auth_pb2_grpc.AuthServiceStub(channel(env["HAFEN_AUTH_ADDR"]))
    messaging = messaging_pb2_grpc.MessagingServiceStub(channel(env["HAFEN_MESSAGING_ADDR"]))

    def login(password):
        return auth.Login(
            auth_pb2.LoginRequest(
                tenant_slug=env["HAFEN_TENANT_SLUG"],
                username=env["HAFEN_USERNAME"],
                password=password,
                chat_code=env["HAFEN_CHAT_CODE"],
                device_label="Python client (DC5)",
            ),
            timeout=RPC_TIMEOUT,
        )

    session = login(env["HAFEN_PASSWORD"])
    metadata = [("authorization", "Bearer " + session.access_token)]

    conversation = messaging.CreateConversation(
        messaging_pb2.CreateConversationRequest(
            request_id=str(uuid.uuid4()),
            kind=messaging_pb2.CONVERSATION_KIND_GROUP,
            title="Generated from the contracts",
        ),
        metadata=metadata,
        timeout=RPC_TIMEOUT,
    )

    sent = []
    first_request_id = None
    for body in json.loads(env["HAFEN_BODIES"]):
        request_id = str(uuid.uuid4())
        first_request_id = first_request_id or request_id
        sent.append(
            messaging.SendMessage(
                messaging_pb2.SendMessageRequest(
                    request_id=request_id,
                    conversation_id=conversation.conversation_id,
                    body=body,
                ),
                metadata=metadata,
                timeout=RPC_TIMEOUT,
            )
        )
    # A retry with the same request_id returns the first message, never a duplicate.
    retried = messaging.SendMessage(
        messaging_pb2.SendMessageRequest(
            request_id=first_request_id,
            conversation_id=conversation.conversation_id,
            body=sent[0].body,
        ),
        metadata=metadata,
        timeout=RPC_TIMEOUT,
    )

    listed = messaging.ListMessages(
        messaging_pb2.ListMessagesRequest(
            conversation_id=conversation.conversation_id,
            direction=messaging_pb2.DIRECTION_FORWARD,
        ),
        metadata=metadata,
        timeout=RPC_TIMEOUT,
    )

    # Without a token: refused before anything else.
    try:
        messaging.ListMessages(
            messaging_pb2.ListMessagesRequest(conversation_id=conversation.conversation_id),
            timeout=RPC_TIMEOUT,
        )
        without_token = {"code": "OK"}
    except grpc.RpcError as err:
        without_token = error_of(err)

    try:
        login(env["HAFEN_PASSWORD"] + " but wrong")
        wrong_password = {"code": "OK"}
    except grpc.RpcError as err:
        wrong_password = error_of(err)

    json.dump(
        {
            "user_id": session.user.user_id,
            "conversation": {
                "conversation_id": conversation.conversation_id,
                "kind": messaging_pb2.ConversationKind.Name(conversation.kind),
                "title": conversation.title,
            },
            "sent": [message_summary(m) for m in sent],
            "retried": message_summary(retried),
            "listed": [message_summary(m) for m in listed.messages],
            "without_token": without_token,
            "wrong_password": wrong_password,
        },
        sys.stdout,
    )


if __name__ == "__main__":
    main()
"#;

#[tokio::test]
async fn dc5_python_client_logs_in_sends_and_lists() {
    let python = ensure_venv().await;
    let work = tempfile::tempdir().expect("temporary directory for the Python client");
    let generated = work.path().join("generated");
    generate_client(&python, &generated).await;

    let stack = TestStack::start().await;
    let tenant = stack.create_tenant("pyclient").await;
    let ca_file = work.path().join("ca.pem");
    std::fs::write(&ca_file, stack.secrets.ca_pem()).expect("write the CA certificate");
    let script = work.path().join("client.py");
    std::fs::write(&script, CLIENT_SCRIPT).expect("write the client script");

    let bodies = ["Hallo aus Python", "Grüße, zweite Nachricht ✓"];
    let mut command = Command::new(&python);
    command
        .arg(&script)
        .current_dir(work.path())
        .env("PYTHONPATH", &generated)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("GRPC_VERBOSITY", "ERROR")
        .env("HAFEN_CA_FILE", &ca_file)
        .env("HAFEN_AUTH_ADDR", stack.auth.addr().to_string())
        .env("HAFEN_MESSAGING_ADDR", stack.messaging.addr().to_string())
        .env("HAFEN_TENANT_SLUG", &tenant.slug)
        .env("HAFEN_USERNAME", "owner")
        .env("HAFEN_PASSWORD", OWNER_PASSWORD)
        .env("HAFEN_CHAT_CODE", &tenant.owner_code)
        .env(
            "HAFEN_BODIES",
            serde_json::to_string(&bodies).expect("bodies as JSON"),
        );
    for proxy in [
        "grpc_proxy",
        "https_proxy",
        "http_proxy",
        "HTTPS_PROXY",
        "HTTP_PROXY",
    ] {
        command.env_remove(proxy);
    }
    let output = run_ok("the Python client", &mut command, SCRIPT_TIMEOUT).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !stdout.contains(OWNER_PASSWORD) && !stderr.contains(OWNER_PASSWORD),
        "the client must never print the password"
    );
    let summary: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|err| panic!("the client prints JSON ({err}): {stdout}\n{stderr}"));

    // Logged in as the owner; the group is theirs.
    assert_eq!(summary["user_id"], tenant.owner_id.as_str(), "{summary}");
    let conversation_id = summary["conversation"]["conversation_id"]
        .as_str()
        .expect("a conversation id")
        .to_owned();
    assert_eq!(
        summary["conversation"]["kind"], "CONVERSATION_KIND_GROUP",
        "{summary}"
    );

    // What was sent is what is listed, in order, with sequence numbers 1, 2.
    let sent = summary["sent"].as_array().expect("sent messages");
    let listed = summary["listed"].as_array().expect("listed messages");
    assert_eq!(sent.len(), bodies.len(), "{summary}");
    assert_eq!(listed, sent, "ListMessages returns the sent messages");
    for (index, (message, body)) in listed.iter().zip(bodies).enumerate() {
        assert_eq!(message["body"], body, "{summary}");
        assert_eq!(message["sequence"], index + 1, "{summary}");
        assert_eq!(message["conversation_id"], conversation_id.as_str());
        assert_eq!(message["sender_user_id"], tenant.owner_id.as_str());
        assert!(
            message["message_id"].as_str().is_some_and(uuid_like),
            "{summary}"
        );
    }
    assert_eq!(summary["retried"], sent[0], "an idempotent retry");

    // Errors carry the documented status and google.rpc.ErrorInfo.
    assert_eq!(
        summary["wrong_password"]["code"], "UNAUTHENTICATED",
        "{summary}"
    );
    assert_eq!(
        summary["wrong_password"]["reason"], "LOGIN_FAILED",
        "{summary}"
    );
    assert_eq!(summary["wrong_password"]["domain"], "hafen", "{summary}");
    assert_eq!(
        summary["without_token"]["code"], "UNAUTHENTICATED",
        "{summary}"
    );

    // And the Rust client sees the same messages.
    let session = stack.login_owner(&tenant).await;
    let from_rust = stack
        .messaging_client()
        .await
        .list_messages(with_token(
            &session.access_token,
            messaging_pb::ListMessagesRequest {
                conversation_id: conversation_id.clone(),
                ..Default::default()
            },
        ))
        .await
        .expect("ListMessages from Rust")
        .into_inner();
    let ids_from_rust: Vec<&str> = from_rust
        .messages
        .iter()
        .map(|m| m.message_id.as_str())
        .collect();
    let ids_from_python: Vec<&str> = listed
        .iter()
        .map(|m| m["message_id"].as_str().expect("an id"))
        .collect();
    assert_eq!(ids_from_rust, ids_from_python);
}

/// Whether `id` looks like a canonical hyphenated UUID.
fn uuid_like(id: &str) -> bool {
    id.len() == 36
        && id.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// The Python interpreter of the virtualenv with [`REQUIREMENTS`], created when missing.
async fn ensure_venv() -> PathBuf {
    let identity = python_identity().await;
    let key = format!("{identity}\n{}\n", REQUIREMENTS.join("\n"));
    let base = target_dir().join("python-client");
    let venv = base.join(format!("venv-{:016x}", fnv1a(key.as_bytes())));
    let python = venv.join("bin").join("python");
    if venv.join(READY_MARKER).is_file() {
        return python;
    }

    std::fs::create_dir_all(&base).expect("create <target>/python-client");
    let lock = File::options()
        .create(true)
        .write(true)
        .truncate(false)
        .open(base.join("lock"))
        .expect("open <target>/python-client/lock");
    let waiting_since = Instant::now();
    loop {
        match lock.try_lock() {
            Ok(()) => break,
            Err(TryLockError::WouldBlock) => {
                assert!(
                    waiting_since.elapsed() < LOCK_TIMEOUT,
                    "another process has held {} for {LOCK_TIMEOUT:?}",
                    base.join("lock").display()
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(TryLockError::Error(err)) => panic!("lock {}: {err}", base.join("lock").display()),
        }
    }
    // Another process may have finished it while this one waited.
    if venv.join(READY_MARKER).is_file() {
        return python;
    }
    // Leftovers of interrupted runs: only the holder of the lock builds in tmp-*.
    for entry in std::fs::read_dir(&base).expect("list <target>/python-client") {
        let entry = entry.expect("a directory entry");
        let name = entry.file_name();
        let leftover = name.to_string_lossy().starts_with("tmp-") || entry.path() == venv.as_path();
        if leftover && entry.path().is_dir() {
            std::fs::remove_dir_all(entry.path())
                .unwrap_or_else(|err| panic!("remove {}: {err}", entry.path().display()));
        }
    }

    let building = base.join(format!("tmp-{}", std::process::id()));
    let created = run(
        "python3 -m venv",
        Command::new(PYTHON).arg("-m").arg("venv").arg(&building),
        VENV_TIMEOUT,
    )
    .await;
    assert!(
        created.status.success(),
        "python3 cannot create a virtualenv ({}); {SETUP_HINT}\n{}{}",
        created.status,
        String::from_utf8_lossy(&created.stdout),
        String::from_utf8_lossy(&created.stderr)
    );
    let building_python = building.join("bin").join("python");
    run_ok(
        "pip install (from PyPI)",
        Command::new(&building_python)
            .args(["-m", "pip", "install", "--quiet", "--no-input"])
            .args(["--disable-pip-version-check", "--only-binary=:all:"])
            .args(["--timeout", "30", "--retries", "2"])
            .args(REQUIREMENTS),
        PIP_TIMEOUT,
    )
    .await;
    run_ok(
        "the installed packages import",
        Command::new(&building_python).args([
            "-c",
            "import grpc, grpc_tools.protoc, google.rpc.status_pb2, google.rpc.error_details_pb2",
        ]),
        TOOL_TIMEOUT,
    )
    .await;
    std::fs::write(building.join(READY_MARKER), &key).expect("mark the virtualenv complete");
    std::fs::rename(&building, &venv)
        .unwrap_or_else(|err| panic!("rename {} to {}: {err}", building.display(), venv.display()));
    drop(lock);
    python
}

/// The interpreter's version and real path: a virtualenv is bound to both.
async fn python_identity() -> String {
    let mut command = Command::new(PYTHON);
    command.args([
        "-c",
        "import os, sys; print(sys.version.split()[0], os.path.realpath(sys.executable))",
    ]);
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = match command.spawn() {
        Ok(child) => child,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            panic!("{PYTHON} is not installed (not on PATH); {SETUP_HINT}")
        }
        Err(err) => panic!("cannot start {PYTHON}: {err}; {SETUP_HINT}"),
    };
    let output = tokio::time::timeout(TOOL_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{PYTHON} did not answer within {TOOL_TIMEOUT:?}"))
        .unwrap_or_else(|err| panic!("{PYTHON}: {err}"));
    assert!(
        output.status.success(),
        "{PYTHON} fails ({}); {SETUP_HINT}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// Generates the Python client of every `.proto` file under `proto/hafen` into `out`.
async fn generate_client(python: &Path, out: &Path) {
    let proto_root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .join("proto");
    let mut protos = Vec::new();
    collect_protos(&proto_root, &proto_root.join("hafen"), &mut protos);
    protos.sort();
    assert!(
        protos.len() >= 5,
        "the contracts under {}: {protos:?}",
        proto_root.display()
    );

    // grpcio-tools ships google/protobuf/*.proto in its _proto directory.
    let found = run_ok(
        "locate grpc_tools/_proto",
        Command::new(python).args([
            "-c",
            "import os, grpc_tools; print(os.path.join(os.path.dirname(grpc_tools.__file__), '_proto'))",
        ]),
        TOOL_TIMEOUT,
    )
    .await;
    let well_known = PathBuf::from(String::from_utf8_lossy(&found.stdout).trim());
    assert!(
        well_known.join("google/protobuf/timestamp.proto").is_file(),
        "grpcio-tools ships google/protobuf/timestamp.proto in {}",
        well_known.display()
    );

    std::fs::create_dir_all(out).expect("create the output directory");
    run_ok(
        "python -m grpc_tools.protoc",
        Command::new(python)
            .current_dir(&proto_root)
            .args(["-m", "grpc_tools.protoc", "-I."])
            .arg(format!("-I{}", well_known.display()))
            .arg(format!("--python_out={}", out.display()))
            .arg(format!("--grpc_python_out={}", out.display()))
            .args(&protos),
        TOOL_TIMEOUT,
    )
    .await;
    for service in ["auth", "messaging", "tenant", "audit", "retention"] {
        let stub = out.join(format!("hafen/{service}/v1/{service}_pb2_grpc.py"));
        assert!(stub.is_file(), "generated {}", stub.display());
    }
}

/// The `.proto` files under `dir`, relative to `root`.
fn collect_protos(root: &Path, dir: &Path, found: &mut Vec<PathBuf>) {
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|err| panic!("list {}: {err}", dir.display()));
    for entry in entries {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            collect_protos(root, &path, found);
        } else if path.extension().is_some_and(|ext| ext == "proto") {
            found.push(
                path.strip_prefix(root)
                    .expect("under the proto root")
                    .to_path_buf(),
            );
        }
    }
}

/// The Cargo target directory: the test binary is `<target>/<profile>/deps/<name>`.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the path of the test binary");
    let deps = exe.parent().expect("the test binary's directory");
    assert!(
        deps.file_name().is_some_and(|name| name == "deps"),
        "the test binary lives in <target>/<profile>/deps, not {}",
        exe.display()
    );
    deps.parent()
        .and_then(Path::parent)
        .expect("<target>/<profile>/deps has a target directory")
        .to_path_buf()
}

/// 64-bit FNV-1a: a stable name for the virtualenv of one interpreter and requirement set.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Runs `command` with no input, killing it after `limit`.
async fn run(what: &str, command: &mut Command, limit: Duration) -> Output {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = command
        .spawn()
        .unwrap_or_else(|err| panic!("{what}: cannot start: {err}"));
    // On timeout the future, and with it the child, is dropped: kill_on_drop kills it.
    tokio::time::timeout(limit, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{what}: not done within {limit:?}, killed"))
        .unwrap_or_else(|err| panic!("{what}: {err}"))
}

/// Like [`run`], and fails unless the command succeeds.
async fn run_ok(what: &str, command: &mut Command, limit: Duration) -> Output {
    let output = run(what, command, limit).await;
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}
