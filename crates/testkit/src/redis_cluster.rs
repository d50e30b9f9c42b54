//! The development Redis Cluster (`scripts/dev-services.sh cluster`: three masters, three
//! replicas, TLS, loopback), for tests that run Hafen on a cluster and fail a master over.

use std::process::Command;
use std::time::Duration;

use crate::env::{TestEnv, workspace_root};

/// A key prefix of this test's own on the development Redis Cluster. Every key Hafen writes
/// expires on its own (sessions within a minute, markers and limits within an hour), so
/// nothing is deleted on drop: a cluster-wide SCAN is not worth it.
#[derive(Debug)]
pub struct TestRedisCluster {
    args: hafen_authn::RedisArgs,
    ports: Vec<u16>,
}

/// A node as `CLUSTER NODES` describes it.
#[derive(Debug, Clone)]
pub struct ClusterNode {
    /// Its TLS port on 127.0.0.1.
    pub port: u16,
    /// Its node id.
    pub id: String,
    /// Whether it is a master (else a replica).
    pub master: bool,
    /// Whether the cluster considers it failed.
    pub failed: bool,
    /// The slot ranges it serves (masters).
    pub slots: Vec<(u16, u16)>,
}

impl TestRedisCluster {
    /// A fresh namespace `test:<uuid>:` on the cluster `.dev/env` names
    /// (`HAFEN_DEV_CLUSTER_URLS`); the six nodes are its first port and the five after it.
    pub fn new() -> Self {
        crate::init_test_logging();
        let env = TestEnv::get();
        let urls = env.cluster_urls.clone().unwrap_or_else(|| {
            panic!(
                "HAFEN_DEV_CLUSTER_URLS is not set: start the development Redis Cluster with \
                 `scripts/dev-services.sh cluster` (or run `make test`)"
            )
        });
        // `rediss://127.0.0.1:<port>/,…`
        let first = urls
            .split(',')
            .next()
            .and_then(|url| url.trim_end_matches('/').rsplit(':').next())
            .and_then(|port| port.parse::<u16>().ok())
            .expect("HAFEN_DEV_CLUSTER_URLS starts with a URL with a port");
        Self {
            args: hafen_authn::RedisArgs {
                redis_url: urls,
                redis_ca: env.redis_ca.clone(),
                redis_prefix: format!("test:{}:", uuid::Uuid::new_v4().simple()),
                redis_cluster: true,
            },
            ports: (first..first + 6).collect(),
        }
    }

    /// Settings for services on the cluster, every key and channel in this namespace.
    pub fn args(&self) -> hafen_authn::RedisArgs {
        self.args.clone()
    }

    /// A cluster connection of the test's own.
    pub fn connection(&self) -> hafen_authn::RedisConnection {
        self.args.connection().expect("a cluster connection")
    }

    /// Runs `cmd` on the node at `port` alone.
    pub async fn on_node<T: redis::FromRedisValue>(
        &self,
        port: u16,
        cmd: &redis::Cmd,
    ) -> redis::RedisResult<T> {
        let node = hafen_authn::RedisArgs {
            redis_url: format!("rediss://127.0.0.1:{port}/"),
            redis_cluster: false,
            ..self.args.clone()
        };
        let mut conn = tokio::time::timeout(
            Duration::from_secs(2),
            node.client()?.get_multiplexed_async_connection(),
        )
        .await
        .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "connect timed out")))??;
        tokio::time::timeout(Duration::from_secs(2), cmd.query_async(&mut conn))
            .await
            .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "timed out")))?
    }

    /// The cluster as the first answering node sees it.
    pub async fn nodes(&self) -> Vec<ClusterNode> {
        for port in &self.ports {
            if let Ok(text) = self
                .on_node::<String>(*port, redis::cmd("CLUSTER").arg("NODES"))
                .await
            {
                return text.lines().filter_map(parse_node).collect();
            }
        }
        panic!("no node of the Redis Cluster answers on {:?}", self.ports);
    }

    /// The port of the master serving `key`'s slot, unless the cluster considers it failed.
    pub async fn master_for(&self, key: &str) -> Option<u16> {
        let slot = self.slot_of(key).await;
        self.nodes()
            .await
            .into_iter()
            .find(|node| node.master && node.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot)))
            .filter(|node| !node.failed)
            .map(|node| node.port)
    }

    /// The hash slot of `key`, as the cluster computes it.
    pub async fn slot_of(&self, key: &str) -> u16 {
        for port in &self.ports {
            if let Ok(slot) = self
                .on_node::<u16>(*port, redis::cmd("CLUSTER").arg("KEYSLOT").arg(key))
                .await
            {
                return slot;
            }
        }
        panic!("no node of the Redis Cluster answers on {:?}", self.ports);
    }

    /// Waits until every node answers and sees the cluster as ok, and three replicas follow
    /// their masters (so a master can fail over); starts nodes that are down first.
    pub async fn wait_healthy(&self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        let mut restarted = false;
        loop {
            let mut ok = true;
            let mut replicas = 0;
            let mut down = false;
            for port in &self.ports {
                match self
                    .on_node::<String>(*port, redis::cmd("CLUSTER").arg("INFO"))
                    .await
                {
                    Ok(info) => ok &= info.contains("cluster_state:ok"),
                    Err(_) => {
                        ok = false;
                        down = true;
                    }
                }
                let replication = self
                    .on_node::<String>(*port, redis::cmd("INFO").arg("replication"))
                    .await
                    .unwrap_or_default();
                if replication.contains("master_link_status:up") {
                    replicas += 1;
                }
            }
            if ok && replicas == 3 {
                return;
            }
            if down && !restarted {
                self.start_missing_nodes();
                restarted = true;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the Redis Cluster is not healthy (state ok: {ok}, replicas following: {replicas})"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Kills the node at `port` (SIGKILL, by the PID it reports); it stays down until
    /// [`TestRedisCluster::start_missing_nodes`].
    pub async fn kill(&self, port: u16) {
        let info: String = self
            .on_node(port, redis::cmd("INFO").arg("server"))
            .await
            .expect("INFO server of the node to kill");
        let pid = info
            .lines()
            .find_map(|line| line.trim().strip_prefix("process_id:"))
            .and_then(|pid| pid.parse::<u32>().ok())
            .expect("the node reports its process id");
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        assert!(
            String::from_utf8_lossy(&cmdline).contains(&port.to_string()),
            "process {pid} is not the redis-server on port {port}"
        );
        let killed = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(killed.success(), "kill -KILL {pid}");
    }

    /// Starts the nodes that are not running (`scripts/dev-services.sh cluster`); they rejoin
    /// the cluster, a failed-over master as a replica.
    pub fn start_missing_nodes(&self) {
        let status = Command::new(workspace_root().join("scripts/dev-services.sh"))
            .arg("cluster")
            .env("HAFEN_DEV_REDIS_CLUSTER_PORT", self.ports[0].to_string())
            .stdout(std::process::Stdio::null())
            .status()
            .expect("run scripts/dev-services.sh cluster");
        assert!(status.success(), "scripts/dev-services.sh cluster failed");
    }
}

impl Default for TestRedisCluster {
    fn default() -> Self {
        Self::new()
    }
}

fn parse_node(line: &str) -> Option<ClusterNode> {
    let mut fields = line.split_whitespace();
    let id = fields.next()?.to_owned();
    let address = fields.next()?;
    let port = address
        .split('@')
        .next()?
        .rsplit(':')
        .next()?
        .parse()
        .ok()?;
    let flags = fields.next()?;
    let slots = fields
        .skip(5)
        .filter(|range| !range.starts_with('['))
        .filter_map(|range| match range.split_once('-') {
            Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
            None => range.parse().ok().map(|slot| (slot, slot)),
        })
        .collect();
    Some(ClusterNode {
        port,
        id,
        master: flags.contains("master"),
        failed: flags.contains("fail") && !flags.contains("fail?"),
        slots,
    })
}
