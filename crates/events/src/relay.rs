//! The outbox relay: each service delivers the audit events in `hafen.outbox` (of every
//! database it uses) to the audit service with AppendEvents, oldest first, in batches, and
//! deletes them in the same transaction once the audit service has acknowledged them. Rows
//! are locked with SKIP LOCKED while in flight, so replicas share the work. Delivery is
//! at-least-once (a crash after the append and before the delete sends a batch again); the
//! audit service drops events whose id it already has. While the audit service is down, the
//! relay backs off (100 ms doubling to 5 s) and the events wait in the outbox.

use std::sync::Arc;
use std::time::Duration;

use diesel::prelude::*;
use diesel_async::{AnsiTransactionManager, RunQueryDsl, TransactionManager};
use hafen_proto::audit::v1 as pb;
use hafen_proto::audit::v1::audit_service_client::AuditServiceClient;
use hafen_store::schema::outbox;
use hafen_store::{Databases, Pool};
use prost::Message;
use tokio::sync::Notify;
use tonic::transport::Channel;
use uuid::Uuid;

/// Events sent per AppendEvents call (the audit service accepts up to 500).
const BATCH: i64 = 500;

/// Where the audit service is, for the services that deliver events to it.
#[derive(clap::Args, Clone, Debug)]
pub struct AuditEndpointArgs {
    /// URL of the audit service, e.g. `https://hafen-audit:50055`, which receives this
    /// service's audit events from its outbox. Its certificate must carry the host name and
    /// be signed by --tls-ca; this service presents its own certificate.
    #[arg(
        long,
        env = "HAFEN_AUDIT_ENDPOINT",
        default_value = "https://127.0.0.1:50055"
    )]
    pub audit_endpoint: String,

    /// Name the audit service's certificate must carry; by default the endpoint's host.
    #[arg(long, env = "HAFEN_AUDIT_SERVER_NAME")]
    pub audit_server_name: Option<String>,

    /// How often the relay looks at the outbox when nobody wakes it.
    #[arg(long, env = "HAFEN_AUDIT_RELAY_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub audit_relay_interval: Duration,
}

/// A handle on the relay task.
#[derive(Clone, Debug)]
pub struct Relay {
    wake: Arc<Notify>,
}

/// Why a batch was not delivered.
#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error("database: {0}")]
    Database(#[from] diesel::result::Error),
    #[error("database pool: {0}")]
    Pool(String),
    #[error("audit service: {0}")]
    Audit(#[from] tonic::Status),
}

impl Relay {
    /// Starts relaying the outboxes of `databases` to the audit service at `args`, presenting
    /// this service's certificate from `tls`. `service` names the service in logs.
    pub fn spawn(
        service: &'static str,
        databases: &Databases,
        args: &AuditEndpointArgs,
        tls: &hafen_platform::TlsMaterial,
    ) -> Result<Self, tonic::transport::Error> {
        let channel = tls.internal_channel(
            &args.audit_endpoint,
            args.audit_server_name.as_deref(),
            Duration::from_secs(10),
        )?;
        let client = AuditServiceClient::new(channel);
        let pools: Vec<(String, Pool)> = databases
            .names()
            .into_iter()
            .filter_map(|name| databases.pool(&name).cloned().map(|pool| (name, pool)))
            .collect();
        let relay = Self {
            wake: Arc::new(Notify::new()),
        };
        let wake = relay.wake.clone();
        let interval = args.audit_relay_interval;
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                let mut failed = false;
                for (name, pool) in &pools {
                    // A drained outbox was empty a moment ago: only one that could not be
                    // drained is counted.
                    if let Err(err) = drain(name, pool, client.clone()).await {
                        tracing::warn!(service, database = %name, error = %err, "audit events not delivered yet; retrying");
                        failed = true;
                        report_backlog(name, pool).await;
                    } else {
                        metrics::gauge!("hafen_outbox_backlog", "database" => name.clone())
                            .set(0.0);
                    }
                }
                let pause = if failed {
                    let pause = backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    pause
                } else {
                    backoff = Duration::from_millis(100);
                    interval
                };
                tokio::select! {
                    () = wake.notified(), if !failed => {}
                    () = tokio::time::sleep(pause) => {}
                }
            }
        });
        Ok(relay)
    }

    /// Tells the relay that events were committed (it also looks by itself every interval).
    pub fn wake(&self) {
        self.wake.notify_one();
    }
}

/// Sets `hafen_outbox_backlog` of the database `name`: the events still in its outbox,
/// counted up to [`BACKLOG_COUNTED`].
async fn report_backlog(name: &str, pool: &Pool) {
    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let Ok(mut conn) = pool.get().await else {
        return;
    };
    let counted: Result<Count, _> = diesel::sql_query(format!(
        "SELECT count(*) AS n FROM (SELECT 1 FROM hafen.outbox LIMIT {BACKLOG_COUNTED}) AS o"
    ))
    .get_result(&mut conn)
    .await;
    // A count that failed says nothing: the gauge keeps its last value.
    if let Ok(counted) = counted {
        metrics::gauge!("hafen_outbox_backlog", "database" => name.to_owned())
            .set(counted.n as f64);
    }
}

/// Most outbox rows [`report_backlog`] counts.
const BACKLOG_COUNTED: i64 = 100_000;

/// Delivers one database's outbox until it is empty.
async fn drain(
    name: &str,
    pool: &Pool,
    client: AuditServiceClient<Channel>,
) -> Result<(), RelayError> {
    loop {
        let mut conn = pool
            .get()
            .await
            .map_err(|err| RelayError::Pool(err.to_string()))?;
        let conn: &mut hafen_store::AsyncPgConnection = &mut conn;
        AnsiTransactionManager::begin_transaction(conn).await?;
        let delivered = deliver_batch(name, conn, client.clone()).await;
        match delivered {
            Ok(count) => {
                AnsiTransactionManager::commit_transaction(conn).await?;
                if count < BATCH as usize {
                    return Ok(());
                }
            }
            Err(err) => {
                let _ = AnsiTransactionManager::rollback_transaction(conn).await;
                // A database without an outbox (a placement without tenants yet) has
                // nothing to deliver.
                if let RelayError::Database(diesel::result::Error::DatabaseError(_, info)) = &err
                    && info.message().contains("does not exist")
                {
                    return Ok(());
                }
                return Err(err);
            }
        }
    }
}

async fn deliver_batch(
    name: &str,
    conn: &mut hafen_store::AsyncPgConnection,
    mut client: AuditServiceClient<Channel>,
) -> Result<usize, RelayError> {
    let rows: Vec<(Uuid, Vec<u8>, chrono::DateTime<chrono::Utc>)> = outbox::table
        .select((outbox::id, outbox::event, outbox::created_at))
        .order((outbox::created_at, outbox::id))
        .limit(BATCH)
        .for_update()
        .skip_locked()
        .load(conn)
        .await?;
    if rows.is_empty() {
        metrics::gauge!("hafen_outbox_relay_lag_seconds", "database" => name.to_owned()).set(0.0);
        return Ok(0);
    }
    if let Some(oldest) = rows.iter().map(|(_, _, at)| *at).min() {
        let lag = (chrono::Utc::now() - oldest).num_milliseconds().max(0) as f64 / 1000.0;
        metrics::gauge!("hafen_outbox_relay_lag_seconds", "database" => name.to_owned()).set(lag);
    }
    let mut events = Vec::with_capacity(rows.len());
    let mut ids = Vec::with_capacity(rows.len());
    for (id, bytes, _) in rows {
        ids.push(id);
        match pb::AuditEvent::decode(bytes.as_slice()) {
            Ok(event) => events.push(event),
            // Cannot happen for rows this code wrote; dropping it keeps the rest flowing.
            Err(err) => {
                tracing::error!(event_id = %id, error = %err, "undecodable outbox row dropped")
            }
        }
    }
    if !events.is_empty() {
        let span =
            hafen_platform::telemetry::client_span("hafen.audit.v1.AuditService", "AppendEvents");
        let mut request = tonic::Request::new(pb::AppendEventsRequest { events });
        hafen_platform::telemetry::inject(&span, &mut request);
        tracing::Instrument::instrument(client.append_events(request), span).await?;
    }
    diesel::delete(outbox::table.filter(outbox::id.eq_any(&ids)))
        .execute(conn)
        .await?;
    metrics::counter!("hafen_outbox_relayed_total").increment(ids.len() as u64);
    Ok(ids.len())
}
