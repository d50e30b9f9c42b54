//! Abuse limits of the anonymous side: calls counted per subject (a widget, a visit, a client
//! address) in fixed windows, in Redis so every replica counts together. A client address is
//! never kept: it is counted under its keyed hash (HMAC-SHA-256 under a key derived from the
//! master key), which Redis forgets with the window. While Redis is unreachable, this process
//! counts alone: limiting never fails open.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hafen_authn::Redis;
use hafen_crypto::DataKey;

/// Counts the call in the current window and returns the count. KEYS: the counter.
/// ARGV: the window in milliseconds.
const COUNT: &str = r"
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return n
";

/// Most subjects the per-process fallback remembers in a window; beyond, new ones are refused
/// until the window turns.
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
    local: Mutex<(Instant, HashMap<String, u32>)>,
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
            local: Mutex::new((Instant::now(), HashMap::new())),
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
    pub async fn count_lookup<T>(&self, request: &tonic::Request<T>) -> Result<(), Duration> {
        match self.address(request) {
            Some(address) => self.count(Subject::Lookup(address)).await,
            None => Ok(()),
        }
    }

    /// Counts a call of `subject`; `Err` with the time until the window turns once its limit
    /// is passed.
    pub async fn count(&self, subject: Subject) -> Result<(), Duration> {
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
        let window = self.args.limit_window.max(Duration::from_millis(100));
        let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
        let slot = hafen_store::now().timestamp_millis().unsigned_abs() / window_ms;
        let counted = match &self.redis {
            Some(redis) => {
                let key = redis.key(&format!("webchat:limit:{name}:{slot}"));
                let counted: redis::RedisResult<u64> = redis::Script::new(COUNT)
                    .key(key)
                    .arg(window_ms)
                    .invoke_async(&mut redis.conn())
                    .await;
                counted.ok()
            }
            None => None,
        };
        let count = match counted {
            Some(count) => count,
            None => self.count_locally(name, window),
        };
        if count > u64::from(limit) {
            let into = hafen_store::now().timestamp_millis().unsigned_abs() % window_ms;
            return Err(Duration::from_millis(window_ms - into));
        }
        Ok(())
    }

    /// The per-process count, while Redis is unreachable.
    fn count_locally(&self, name: String, window: Duration) -> u64 {
        let Ok(mut local) = self.local.lock() else {
            return u64::MAX;
        };
        let (started, counts) = &mut *local;
        if started.elapsed() >= window {
            *started = Instant::now();
            counts.clear();
        }
        if counts.len() >= MAX_LOCAL_SUBJECTS && !counts.contains_key(&name) {
            return u64::MAX;
        }
        let count = counts.entry(name).or_default();
        *count = count.saturating_add(1);
        u64::from(*count)
    }
}
