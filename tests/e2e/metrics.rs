//! Prometheus metrics (DC5, UL6): every service serves `/metrics`; after traffic the counters
//! have moved, the exposition passes `promtool check metrics`, no label carries an id, and a
//! real Prometheus server scrapes every service.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hafen_proto::messaging::v1 as msg;
use hafen_testkit::{TestStack, with_token};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `GET /metrics` of `addr`, the body.
async fn scrape(addr: SocketAddr) -> String {
    // The services bind their metrics ports as they start.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut stream = loop {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(stream) => break stream,
            Err(err) => {
                assert!(Instant::now() < deadline, "{addr}: {err}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: hafen\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    // The body may come chunked: this one is small enough to be read whole; strip chunking.
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let size = usize::from_str_radix(size.trim(), 16).unwrap();
            if size == 0 {
                break;
            }
            out.push_str(&after[..size]);
            rest = &after[size + 2..];
        }
        return out;
    }
    body.to_owned()
}

/// The value of the series `name{labels}` (labels as rendered, in order), or 0.
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            line.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .unwrap_or(0.0)
}

fn handled(service: &str, method: &str, code: &str) -> String {
    format!(
        "grpc_server_handled_total{{grpc_service=\"{service}\",grpc_method=\"{method}\",grpc_type=\"unary\",grpc_code=\"{code}\"}}"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn dc5_metrics_count_calls_pass_promtool_and_a_prometheus_server_scrapes_every_service() {
    let stack = TestStack::start_with_metrics().await;
    let (_, messaging_addr) = *stack
        .metrics
        .iter()
        .find(|(service, _)| *service == "messaging")
        .unwrap();
    let send_ok = handled("hafen.messaging.v1.MessagingService", "SendMessage", "OK");
    let send_bad = handled(
        "hafen.messaging.v1.MessagingService",
        "SendMessage",
        "InvalidArgument",
    );
    let before = scrape(messaging_addr).await;

    let tenant = stack.create_tenant("metered").await;
    let owner = stack.login_owner(&tenant).await.access_token;
    let mut messaging = stack.messaging_client().await;
    let conversation = stack.create_channel(&owner, "numbers").await;
    for n in 0..3 {
        messaging
            .send_message(with_token(
                &owner,
                msg::SendMessageRequest {
                    request_id: uuid::Uuid::now_v7().to_string(),
                    conversation_id: conversation.clone(),
                    body: format!("metered {n}"),
                },
            ))
            .await
            .unwrap();
    }
    let refused = messaging
        .send_message(with_token(
            &owner,
            msg::SendMessageRequest {
                request_id: "not a uuid".into(),
                conversation_id: conversation.clone(),
                body: "refused".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);

    let after = scrape(messaging_addr).await;
    assert_eq!(
        value(&after, &send_ok) - value(&before, &send_ok),
        3.0,
        "{after}"
    );
    assert_eq!(value(&after, &send_bad) - value(&before, &send_bad), 1.0);
    let started = "grpc_server_started_total{grpc_service=\"hafen.messaging.v1.MessagingService\",grpc_method=\"SendMessage\",grpc_type=\"unary\"}";
    assert_eq!(value(&after, started) - value(&before, started), 4.0);
    for series in [
        "grpc_server_handling_seconds_bucket{grpc_service=\"hafen.messaging.v1.MessagingService\",grpc_method=\"SendMessage\",grpc_type=\"unary\",le=\"+Inf\"}",
        "hafen_commit_batch_size_count",
        "hafen_commit_seconds_count",
        "hafen_db_pool_wait_seconds_count",
    ] {
        assert!(value(&after, series) > 0.0, "{series} in {after}");
    }
    for family in [
        "hafen_db_pool_connections{",
        "hafen_db_pool_max_connections{",
        "hafen_outbox_backlog{",
    ] {
        assert!(after.contains(family), "{family} in {after}");
    }
    // Ids are no label values: not the tenant's, not the owner's, not the conversation's.
    for id in [&tenant.id, &conversation] {
        assert!(!after.contains(id.as_str()), "{id} in the metrics");
    }

    // promtool (Prometheus' own linter) accepts the exposition.
    let dir = tempfile::tempdir().unwrap();
    let scraped = dir.path().join("metrics.txt");
    std::fs::write(&scraped, &after).unwrap();
    let checked = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&scraped).unwrap())
        .output()
        .expect("promtool is installed (scripts/setup.sh)");
    assert!(
        checked.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );

    // A real Prometheus server scrapes every service once.
    let targets: Vec<String> = stack
        .metrics
        .iter()
        .map(|(_, addr)| format!("'{addr}'"))
        .collect();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: hafen\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        ),
    )
    .unwrap();
    let web = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap();
    let mut prometheus = tokio::process::Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--web.listen-address={web}"))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("prometheus is installed (scripts/setup.sh)");
    let deadline = Instant::now() + Duration::from_secs(60);
    let up = loop {
        let up = prometheus_targets_up(web).await;
        if up == stack.metrics.len() {
            break up;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus scraped {up} of {} services",
            stack.metrics.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(up, 6);
    prometheus.kill().await.unwrap();
}

/// How many of Prometheus' targets at `web` were scraped successfully (`health` up).
async fn prometheus_targets_up(web: SocketAddr) -> usize {
    let Ok(mut stream) = tokio::net::TcpStream::connect(web).await else {
        return 0;
    };
    if stream
        .write_all(b"GET /api/v1/targets HTTP/1.1\r\nHost: prometheus\r\nConnection: close\r\n\r\n")
        .await
        .is_err()
    {
        return 0;
    }
    let mut answer = String::new();
    if stream.read_to_string(&mut answer).await.is_err() {
        return 0;
    }
    answer.matches("\"health\":\"up\"").count()
}
