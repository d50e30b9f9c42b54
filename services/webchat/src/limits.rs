//! Abuse limits of the anonymous side: calls counted per subject (a widget, a visit, a client
//! address) in fixed windows, in Redis so every replica counts together. A client address is
//! never kept: it is counted under its keyed hash (HMAC-SHA-256 under a key derived from the
//! master key), which Redis forgets with the window.
//!
//! A call is counted in this process at once and decided by what it knows: the subject's
//! count in Redis as of the last sync plus the calls counted here since. The counts go to Redis
//! in the background, every subject counted since the last sync in one pipeline every
//! [`SYNC_EVERY`], and each answer brings back the count of every replica: a call costs no
//! round trip, and a subject's calls spread over several replicas pass its limit by at most
//! what they make within one sync. While Redis is unreachable, this process counts alone:
//! limiting never fails open.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use hafen_authn::Redis;
use hafen_crypto::DataKey;
use tokio::sync::Notify;

/// How often the counts made here go to Redis, at most.
pub const SYNC_EVERY: Duration = Duration::from_millis(20);

/// Most subjects a process counts in a window; beyond, new ones are refused until the window
/// turns.
const MAX_LOCAL_SUBJECTS: usize = 100_000;

/// What the limits allow.
#[derive(Debug, Clone, clap::Args)]
pub struct LimitArgs {
    /// Visits a client address may start per window.
    #[arg(long, env = "HAFEN_WEBCHAT_VISITS_PER_ADDRESS", default_value_t = 20)]
    pub visits_per_address: u32,

    /// Visits a widget may start per window, all visitors together.
    #[arg(long, env = "HAFEN_WEBCHAT_VISITS_PER_WIDGET", default_value_t = 1000)]
    pub visits_per_widget: u32,

    /// Calls a visitor (one visit's token) may make per window.
    #[arg(long, env = "HAFEN_WEBCHAT_CALLS_PER_VISITOR", default_value_t = 120)]
    pub calls_per_visitor: u32,

    /// Unauthenticated lookups a client address may make per window: widget configurations
    /// fetched (GetWidgetConfig) and calls with a visitor token that is not valid.
    #[arg(long, env = "HAFEN_WEBCHAT_LOOKUPS_PER_ADDRESS", default_value_t = 300)]
    pub lookups_per_address: u32,

    /// The window the limits count in.
    #[arg(long, env = "HAFEN_WEBCHAT_LIMIT_WINDOW", default_value = "1m", value_parser = humantime::parse_duration)]
    pub limit_window: Duration,

    /// Proxies (comma-separated addresses or networks, e.g. `10.0.0.0/8`) whose client-address
    /// header is believed; from any other peer the TCP address counts.
    #[arg(long, env = "HAFEN_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<hafen_platform::net::Cidr>,

    /// The header a trusted proxy puts the client's address in; its last address counts.
    #[arg(
        long,
        env = "HAFEN_CLIENT_ADDRESS_HEADER",
        default_value = "x-forwarded-for"
    )]
    pub client_address_header: String,
}

/// A subject of a limit.
#[derive(Debug, Clone, Copy)]
pub enum Subject {
    /// Visits started from a client address.
    Address(IpAddr),
    /// Visits started on a widget.
    Widget(uuid::Uuid),
    /// Calls of a visit.
    Visitor(uuid::Uuid),
    /// Unauthenticated lookups from a client address.
    Lookup(IpAddr),
}

/// The limits.
pub struct Limits {
    args: LimitArgs,
    redis: Option<Redis>,
    address_key: DataKey,
    client_address: hafen_platform::net::ClientAddress,
    counts: Arc<Mutex<Counts>>,
    /// Wakes the task that syncs the counts with Redis (started with the first count).
    sync: OnceLock<Arc<Notify>>,
}

/// The current window's counts.
#[derive(Default)]
struct Counts {
    /// The window they are of (milliseconds since the epoch divided by the window's length).
    slot: u64,
    subjects: HashMap<String, Count>,
    /// The subjects counted here since the last sync.
    dirty: HashSet<String>,
}

/// One subject's count in the current window.
#[derive(Default, Clone, Copy)]
struct Count {
    /// Its count in Redis, all replicas', as of the last sync.
    synced: u64,
    /// Calls counted here and on their way to Redis.
    in_flight: u64,
    /// Calls counted here since.
    pending: u64,
}

impl Count {
    fn total(self) -> u64 {
        self.synced
            .saturating_add(self.in_flight)
            .saturating_add(self.pending)
    }
}

impl Limits {
    /// Limits as `args` set them, counted in `redis`, addresses hashed under `address_key`.
    pub fn new(args: LimitArgs, redis: Option<Redis>, address_key: DataKey) -> Self {
        let client_address = hafen_platform::net::ClientAddress {
            trusted_proxies: args.trusted_proxies.clone(),
            header: args.client_address_header.to_lowercase(),
        };
        Self {
            args,
            redis,
            address_key,
            client_address,
            counts: Arc::default(),
            sync: OnceLock::new(),
        }
    }

    /// The client address of `request`.
    pub fn address<T>(&self, request: &tonic::Request<T>) -> Option<IpAddr> {
        self.client_address.of(request)
    }

    /// The keyed hash of `address` (its /64 for IPv6), in hex: the only form it is counted in.
    fn hashed(&self, address: IpAddr) -> String {
        let subject = hafen_platform::net::limit_subject(address);
        let hash = hafen_crypto::secret::keyed_hash(
            self.address_key.expose(),
            &[b"webchat address", subject.as_bytes()],
        );
        hash.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Counts an unauthenticated lookup from the client of `request` (when its address is
    /// known).
    pub fn count_lookup<T>(&self, request: &tonic::Request<T>) -> Result<(), Duration> {
        match self.address(request) {
            Some(address) => self.count(Subject::Lookup(address)),
            None => Ok(()),
        }
    }

    /// Counts a call of `subject`; `Err` with the time until the window turns once its limit
    /// is passed.
    pub fn count(&self, subject: Subject) -> Result<(), Duration> {
        let (name, limit) = match subject {
            Subject::Address(address) => (
                format!("address:{}", self.hashed(address)),
                self.args.visits_per_address,
            ),
            Subject::Lookup(address) => (
                format!("lookup:{}", self.hashed(address)),
                self.args.lookups_per_address,
            ),
            Subject::Widget(id) => (
                format!("widget:{}", id.simple()),
                self.args.visits_per_widget,
            ),
            Subject::Visitor(id) => (
                format!("visit:{}", id.simple()),
                self.args.calls_per_visitor,
            ),
        };
        let window = self.window();
        let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
        let now_ms = hafen_store::now().timestamp_millis().unsigned_abs();
        let slot = now_ms / window_ms;
        let refused = Err(Duration::from_millis(window_ms - now_ms % window_ms));
        {
            let Ok(mut counts) = self.counts.lock() else {
                return refused;
            };
            if counts.slot != slot {
                counts.slot = slot;
                counts.subjects.clear();
                counts.dirty.clear();
            }
            if counts.subjects.len() >= MAX_LOCAL_SUBJECTS && !counts.subjects.contains_key(&name) {
                return refused;
            }
            let count = counts.subjects.entry(name.clone()).or_default();
            if count.total() >= u64::from(limit) {
                return refused;
            }
            count.pending += 1;
            if count.pending == 1 {
                counts.dirty.insert(name);
            }
        }
        if let Some(redis) = &self.redis {
            self.sync
                .get_or_init(|| {
                    let wake = Arc::new(Notify::new());
                    tokio::spawn(sync(
                        redis.clone(),
                        Arc::downgrade(&self.counts),
                        Arc::clone(&wake),
                        window_ms,
                    ));
                    wake
                })
                .notify_one();
        }
        Ok(())
    }

    fn window(&self) -> Duration {
        self.args.limit_window.max(Duration::from_millis(100))
    }
}

impl Drop for Limits {
    fn drop(&mut self) {
        // The sync task finds the counts gone and ends.
        if let Some(wake) = self.sync.get() {
            wake.notify_one();
        }
    }
}

/// Syncs the counts made here with Redis once woken, [`SYNC_EVERY`] at most: adds each
/// subject's calls counted since the last sync to its count in Redis (which forgets it when
/// its window ends) and learns the count of every replica. When Redis does not answer, the
/// calls stay counted here and go with the next sync. Ends with the limits (their drop wakes
/// it).
async fn sync(redis: Redis, counts: Weak<Mutex<Counts>>, wake: Arc<Notify>, window_ms: u64) {
    loop {
        wake.notified().await;
        tokio::time::sleep(SYNC_EVERY).await;
        let Some(counts) = counts.upgrade() else {
            return;
        };
        let (slot, sent): (u64, Vec<(String, u64)>) = {
            let Ok(mut counts) = counts.lock() else {
                return;
            };
            let Counts {
                slot,
                subjects,
                dirty,
            } = &mut *counts;
            let sent = dirty
                .drain()
                .filter_map(|name| {
                    let count = subjects.get_mut(&name)?;
                    count.in_flight = std::mem::take(&mut count.pending);
                    Some((name, count.in_flight))
                })
                .collect();
            (*slot, sent)
        };
        if sent.is_empty() {
            continue;
        }
        let ends_at = slot.saturating_add(1).saturating_mul(window_ms);
        // A group per subject: on a Redis Cluster each counter is in a slot of its own, and
        // one can fail while the others were counted.
        let totals = redis
            .pipelined(sent.len(), |pipe, i| {
                let (name, calls) = &sent[i];
                let key = redis.key(&format!("webchat:limit:{name}:{slot}"));
                pipe.incr(&key, *calls)
                    .cmd("PEXPIREAT")
                    .arg(&key)
                    .arg(ends_at);
            })
            .await;
        let Ok(mut counts) = counts.lock() else {
            return;
        };
        if counts.slot != slot {
            continue;
        }
        if let Some(Err(err)) = totals.iter().find(|total| total.is_err()) {
            tracing::debug!(error = %err, "limit counts not synced; counting here alone");
        }
        let Counts {
            subjects, dirty, ..
        } = &mut *counts;
        for ((name, _), total) in sent.into_iter().zip(totals) {
            let Some(count) = subjects.get_mut(&name) else {
                continue;
            };
            let total = total.ok().and_then(|replies| {
                replies
                    .first()
                    .and_then(|reply| redis::from_redis_value_ref::<u64>(reply).ok())
            });
            match total {
                Some(total) => count.synced = total.max(count.synced),
                _ => {
                    count.pending += count.in_flight;
                    dirty.insert(name);
                }
            }
            count.in_flight = 0;
        }
    }
}
