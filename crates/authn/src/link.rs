//! The link to Redis: one server, or a Redis Cluster (`--redis-cluster`).
//!
//! Every caller uses [`RedisConnection`] the same way in both cases. On a cluster, each
//! command goes to the master of its key's hash slot, which the connection learns from the
//! cluster and re-learns after a failover. What one command, script or pipeline uses together
//! shares a hash tag (`{…}` in its keys), so it stays in one slot:
//!
//! - a session's entry and its revocation marker: `session:{<id>}`, `revoked:{<id>}`;
//! - a rate limit's counter and block: `limit:{<subject>}:…`;
//! - a tenant's event channel: `events:{<tenant>}` (sharded pub/sub, SSUBSCRIBE).
//!
//! The revocation channel is classic pub/sub, which a cluster delivers to subscribers on
//! every node. Commands that belong to different slots are sent with [`crate::Redis::pipelined`]:
//! one pipeline on a single server, one per slot group on a cluster.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, PushInfo, RedisFuture, RedisResult, Value};
use tokio::sync::mpsc::UnboundedSender;

use crate::cache::RedisArgs;

/// How long Redis may take before a call gives up and falls back.
pub(crate) const REDIS_TIMEOUT: Duration = Duration::from_millis(500);

/// How long one call to a cluster may take in all, a redirection (MOVED) or a reconnection
/// to a promoted replica included.
const CLUSTER_CALL_TIMEOUT: Duration = Duration::from_millis(1500);

/// A multiplexed connection to Redis or to a Redis Cluster; cheap to clone, reconnects on
/// its own, connects lazily (a Redis that is down is not an error until it is used).
#[derive(Clone)]
pub enum RedisConnection {
    /// One server.
    Single(ConnectionManager),
    /// A cluster: commands routed by hash slot.
    Cluster(ClusterConnection),
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(conn) => conn.req_packed_command(cmd),
            Self::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Self::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(conn) => conn.get_db(),
            Self::Cluster(conn) => conn.get_db(),
        }
    }
}

impl RedisConnection {
    /// Subscribes to the sharded channel `channel` (a connection from
    /// [`RedisArgs::push_connection`]). On a cluster, the subscription goes to the master of the
    /// channel's slot and follows the slot to another master after a failover.
    pub async fn ssubscribe(&mut self, channel: &str) -> RedisResult<()> {
        match self {
            Self::Single(conn) => {
                redis::cmd("SSUBSCRIBE")
                    .arg(channel)
                    .query_async(conn)
                    .await
            }
            Self::Cluster(conn) => conn.ssubscribe(channel).await,
        }
    }

    /// Ends the subscription to the sharded channel `channel`.
    pub async fn sunsubscribe(&mut self, channel: &str) -> RedisResult<()> {
        match self {
            Self::Single(conn) => {
                redis::cmd("SUNSUBSCRIBE")
                    .arg(channel)
                    .query_async(conn)
                    .await
            }
            Self::Cluster(conn) => conn.sunsubscribe(channel).await,
        }
    }

    /// Subscribes to the (classic) channel `channel`.
    pub async fn subscribe(&mut self, channel: &str) -> RedisResult<()> {
        match self {
            Self::Single(conn) => conn.subscribe(channel).await,
            Self::Cluster(conn) => conn.subscribe(channel).await,
        }
    }

    /// Whether this is a cluster connection.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }
}

impl RedisArgs {
    /// The servers `--redis-url` names: the one server, or with --redis-cluster, the seed
    /// nodes separated by commas (a single server's URL is taken whole: a comma may be part
    /// of its password).
    pub fn urls(&self) -> Vec<&str> {
        if !self.redis_cluster {
            return vec![self.redis_url.trim()];
        }
        self.redis_url
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .collect()
    }

    fn certificates(&self) -> RedisResult<Option<redis::TlsCertificates>> {
        if !self.tls() {
            if self.redis_ca.is_some() {
                return Err(redis::RedisError::from((
                    redis::ErrorKind::InvalidClientConfig,
                    "--redis-ca needs a rediss:// URL",
                )));
            }
            return Ok(None);
        }
        let root_cert = match &self.redis_ca {
            Some(path) => Some(std::fs::read(path).map_err(|err| {
                redis::RedisError::from((
                    redis::ErrorKind::InvalidClientConfig,
                    "cannot read --redis-ca",
                    err.kind().to_string(),
                ))
            })?),
            None => None,
        };
        Ok(Some(redis::TlsCertificates {
            client_tls: None,
            root_cert,
        }))
    }

    /// A client of the one server these settings name: TLS for `rediss://` URLs, with the
    /// configured CA. Refused for a cluster ([`RedisArgs::connection`] serves both).
    pub fn client(&self) -> RedisResult<redis::Client> {
        if self.redis_cluster {
            return Err(redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "a Redis Cluster needs a cluster connection",
            )));
        }
        let url = self.redis_url.trim();
        match self.certificates()? {
            None => redis::Client::open(url),
            Some(certificates) => redis::Client::build_with_tls(url, certificates),
        }
    }

    fn cluster_builder(&self) -> RedisResult<ClusterClientBuilder> {
        let urls = self.urls();
        let tls = urls
            .iter()
            .filter(|url| url.starts_with("rediss://"))
            .count();
        if urls.is_empty() || (tls != 0 && tls != urls.len()) {
            return Err(redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "--redis-url must name the cluster's nodes all with rediss:// or all with redis://",
            )));
        }
        let mut builder = ClusterClientBuilder::new(urls)
            .overall_response_timeout(Some(CLUSTER_CALL_TIMEOUT))
            .retries(2)
            .min_retry_wait(50)
            .max_retry_wait(400);
        if let Some(certificates) = self.certificates()? {
            builder = builder.certs(certificates);
        }
        Ok(builder)
    }

    /// A lazily connecting, self-reconnecting connection with short timeouts: to the server,
    /// or to the cluster with `--redis-cluster`.
    pub fn connection(&self) -> RedisResult<RedisConnection> {
        if self.redis_cluster {
            let client = self.cluster_builder()?.build()?;
            return Ok(RedisConnection::Cluster(
                client.get_pending_async_connection_with_config(cluster_config()),
            ));
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(REDIS_TIMEOUT))
            .set_response_timeout(Some(REDIS_TIMEOUT))
            .set_number_of_retries(1);
        Ok(RedisConnection::Single(
            ConnectionManager::new_lazy_with_config(self.client()?, config)?,
        ))
    }

    /// A connection like [`RedisArgs::connection`] that speaks RESP3 and sends what Redis
    /// pushes (messages of subscribed channels; `Disconnection` when a link broke) to
    /// `pushes`. A cluster connection subscribes again on its own after a link came back or a
    /// slot moved, and pushes the confirmation; a single server's is to be subscribed again by
    /// the caller after `Disconnection`.
    pub fn push_connection(
        &self,
        pushes: UnboundedSender<PushInfo>,
    ) -> RedisResult<RedisConnection> {
        if self.redis_cluster {
            let client = self
                .cluster_builder()?
                .use_protocol(redis::ProtocolVersion::RESP3)
                .push_sender(pushes)
                .build()?;
            return Ok(RedisConnection::Cluster(
                client.get_pending_async_connection_with_config(cluster_config()),
            ));
        }
        let info = self.client()?.get_connection_info().clone();
        let settings = info
            .redis_settings()
            .clone()
            .set_protocol(redis::ProtocolVersion::RESP3);
        let client = redis::Client::open(info.set_redis_settings(settings))?;
        let config = ConnectionManagerConfig::new()
            .set_push_sender(pushes)
            .set_connection_timeout(Some(REDIS_TIMEOUT))
            .set_response_timeout(Some(REDIS_TIMEOUT))
            .set_number_of_retries(1);
        Ok(RedisConnection::Single(
            ConnectionManager::new_lazy_with_config(client, config)?,
        ))
    }
}

/// Each node's timeouts: a config passed with the connection replaces the builder's.
fn cluster_config() -> ClusterConfig {
    ClusterConfig::new()
        .set_connection_timeout(REDIS_TIMEOUT)
        .set_response_timeout(REDIS_TIMEOUT)
}

impl crate::Redis {
    /// Runs `groups` groups of commands, `build(pipe, i)` adding group `i`'s commands to
    /// `pipe` (without `ignore`); each group's keys must share one hash slot. On a single
    /// server, all go in one pipeline (one round trip); on a cluster, where a pipeline must
    /// stay in one slot, each group is a pipeline of its own, sent at once over the
    /// multiplexed connection. Returns each group's replies, one per command, or its error:
    /// on a cluster, one group can fail (its master is failing over) while the others went
    /// through.
    pub async fn pipelined(
        &self,
        groups: usize,
        build: impl Fn(&mut Pipeline, usize),
    ) -> Vec<RedisResult<Vec<Value>>> {
        let pipes: Vec<Pipeline> = (0..groups)
            .map(|group| {
                let mut pipe = redis::pipe();
                build(&mut pipe, group);
                pipe
            })
            .collect();
        let conn = self.conn();
        if conn.is_cluster() {
            return futures::future::join_all(pipes.iter().map(|pipe| {
                let mut conn = conn.clone();
                async move {
                    if pipe.is_empty() {
                        return Ok(Vec::new());
                    }
                    pipe.query_async::<Vec<Value>>(&mut conn).await
                }
            }))
            .await;
        }
        let mut all = redis::pipe();
        for cmd in pipes.iter().flat_map(|pipe| pipe.cmd_iter()) {
            all.add_command(cmd.clone());
        }
        if all.is_empty() {
            return pipes.iter().map(|_| Ok(Vec::new())).collect();
        }
        match all.query_async::<Vec<Value>>(&mut conn.clone()).await {
            Ok(replies) => {
                let mut replies = replies.into_iter();
                pipes
                    .iter()
                    .map(|pipe| Ok(replies.by_ref().take(pipe.len()).collect()))
                    .collect()
            }
            Err(err) => pipes
                .iter()
                .map(|_| {
                    Err(redis::RedisError::from((
                        err.kind(),
                        "the pipeline failed",
                        err.to_string(),
                    )))
                })
                .collect(),
        }
    }
}

/// The first error of [`crate::Redis::pipelined`]'s groups, if any.
pub fn all_ok(results: Vec<RedisResult<Vec<Value>>>) -> RedisResult<()> {
    results.into_iter().try_for_each(|result| result.map(drop))
}
