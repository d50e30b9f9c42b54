//! Brute-force protection: attempts counted per subject (a tenant and username, a client
//! address, a device, a user confirming an action), with exponential back-off once a
//! threshold is passed.
//!
//! An attempt is counted before the work it guards (bcrypt, a TOTP check), atomically: a
//! Redis script checks the back-off and counts in one step, so parallel attempts cannot all
//! pass a check made before any of them was counted; at most `free_attempts` of a burst get
//! through, then one per back-off period, doubling up to `max_delay`. A success forgets the
//! subject's count ([`Limiter::succeeded`]), or takes back just its own attempt where others'
//! failures must stay counted ([`Limiter::refund`], e.g. for a client address). While Redis is unreachable a limiter of this process takes over with the
//! same rules: limiting never fails open.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::cache::Redis;

/// How failures turn into waiting.
#[derive(Debug, Clone)]
pub struct LimitPolicy {
    /// Attempts allowed before back-off starts.
    pub free_attempts: u32,
    /// The first back-off; each further attempt doubles it.
    pub base_delay: Duration,
    /// The longest back-off.
    pub max_delay: Duration,
    /// How long attempts are remembered.
    pub window: Duration,
}

impl Default for LimitPolicy {
    fn default() -> Self {
        Self {
            free_attempts: 5,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(15 * 60),
            window: Duration::from_secs(60 * 60),
        }
    }
}

/// Checks the back-off and counts the attempt in one step. KEYS: the count, the back-off
/// deadline. ARGV: now (ms), free attempts, base delay (ms), longest delay (ms), window (s).
/// Returns 0 when the attempt may go ahead (it is counted), else the milliseconds to wait.
const ACQUIRE: &str = r"
local now = tonumber(ARGV[1])
local blocked_until = tonumber(redis.call('GET', KEYS[2]) or '0')
if blocked_until > now then
  return blocked_until - now
end
local count = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
local free = tonumber(ARGV[2])
if count >= free then
  local delay = math.floor(math.min(tonumber(ARGV[3]) * 2 ^ math.min(count - free, 20), tonumber(ARGV[4])))
  redis.call('SET', KEYS[2], string.format('%d', now + delay), 'PX', string.format('%d', delay))
end
return 0
";

/// The limiter.
#[derive(Debug, Clone)]
pub struct Limiter {
    redis: Option<Redis>,
    script: Arc<redis::Script>,
    policy: LimitPolicy,
    local: Arc<Mutex<Local>>,
}

/// The per-process limiter's state: per subject, its count, its back-off deadline and when
/// it may be forgotten.
#[derive(Debug)]
struct Local {
    subjects: HashMap<String, (u32, Instant, Instant)>,
    capacity: usize,
}

/// Most subjects the per-process limiter remembers; beyond, the expired go first, then those
/// not backing off, and then new subjects wait.
const LOCAL_SUBJECTS: usize = 100_000;

impl Limiter {
    /// A limiter over `redis` (none: this process's limiter alone).
    pub fn new(redis: Option<Redis>, policy: LimitPolicy) -> Self {
        Self {
            redis,
            script: Arc::new(redis::Script::new(ACQUIRE)),
            policy,
            local: Arc::new(Mutex::new(Local {
                subjects: HashMap::new(),
                capacity: LOCAL_SUBJECTS,
            })),
        }
    }

    fn keys(redis: &Redis, subject: &str) -> (String, String) {
        // One hash tag per subject keeps both keys on one Redis Cluster node.
        (
            redis.key(&format!("limit:{{{subject}}}:count")),
            redis.key(&format!("limit:{{{subject}}}:until")),
        )
    }

    /// Counts an attempt for `subject` and lets it go ahead, or says how long to wait.
    pub async fn acquire(&self, subject: &str) -> Result<(), Duration> {
        if let Some(redis) = &self.redis {
            let (count, until) = Self::keys(redis, subject);
            let waited: redis::RedisResult<u64> = self
                .script
                .key(count)
                .key(until)
                .arg(now_ms())
                .arg(self.policy.free_attempts)
                .arg(millis(self.policy.base_delay))
                .arg(millis(self.policy.max_delay))
                .arg(self.policy.window.as_secs())
                .invoke_async(&mut redis.conn())
                .await;
            match waited {
                Ok(0) => return Ok(()),
                Ok(wait) => return Err(Duration::from_millis(wait)),
                Err(err) => {
                    tracing::warn!(error = %err, "rate limiter unavailable in redis; this process limits alone");
                }
            }
        }
        self.acquire_locally(subject)
    }

    fn acquire_locally(&self, subject: &str) -> Result<(), Duration> {
        let now = Instant::now();
        let Ok(mut local) = self.local.lock() else {
            return Err(self.policy.base_delay);
        };
        let capacity = local.capacity;
        if local.subjects.len() >= capacity && !local.subjects.contains_key(subject) {
            // Full: forget what has run out, then what is not backing off. A back-off is never
            // forgotten early; with the table full of them, new subjects wait instead.
            local.subjects.retain(|_, (_, _, forget)| *forget > now);
            if local.subjects.len() >= capacity {
                local.subjects.retain(|_, (_, until, _)| *until > now);
            }
            if local.subjects.len() >= capacity {
                return Err(self.policy.base_delay);
            }
        }
        let entry =
            local
                .subjects
                .entry(subject.to_owned())
                .or_insert((0, now, now + self.policy.window));
        if entry.2 <= now {
            *entry = (0, now, now + self.policy.window);
        }
        if entry.1 > now {
            return Err(entry.1 - now);
        }
        entry.0 += 1;
        entry.2 = now + self.policy.window;
        if entry.0 >= self.policy.free_attempts {
            entry.1 = now + self.delay(entry.0);
        }
        Ok(())
    }

    fn delay(&self, count: u32) -> Duration {
        let exponent = count.saturating_sub(self.policy.free_attempts).min(20);
        self.policy
            .base_delay
            .saturating_mul(1 << exponent)
            .min(self.policy.max_delay)
    }

    /// Whether `subject` is backing off now, and for how long; counts nothing.
    pub async fn backing_off(&self, subject: &str) -> Option<Duration> {
        if let Some(redis) = &self.redis {
            let (_, until) = Self::keys(redis, subject);
            let stored: redis::RedisResult<Option<u64>> = redis::cmd("GET")
                .arg(until)
                .query_async(&mut redis.conn())
                .await;
            if let Ok(stored) = stored {
                let now = now_ms();
                return stored
                    .filter(|until| *until > now)
                    .map(|until| Duration::from_millis(until - now));
            }
        }
        let now = Instant::now();
        let local = self.local.lock().ok()?;
        local
            .subjects
            .get(subject)
            .filter(|(_, until, _)| *until > now)
            .map(|(_, until, _)| *until - now)
    }

    /// Takes back one attempt of `subject` that turned out to be a success, leaving the others
    /// (and a back-off already running) as they are.
    pub async fn refund(&self, subject: &str) {
        if let Ok(mut local) = self.local.lock()
            && let Some(entry) = local.subjects.get_mut(subject)
        {
            entry.0 = entry.0.saturating_sub(1);
        }
        let Some(redis) = &self.redis else {
            return;
        };
        let (count, _) = Self::keys(redis, subject);
        let taken: redis::RedisResult<()> = redis::Script::new(
            "if tonumber(redis.call('GET', KEYS[1]) or '0') > 0 then redis.call('DECR', KEYS[1]) end",
        )
        .key(count)
        .invoke_async(&mut redis.conn())
        .await;
        if let Err(err) = taken {
            tracing::warn!(error = %err, "rate limiter unavailable; attempt not taken back");
        }
    }

    /// Forgets the attempts of `subject` after a success.
    pub async fn succeeded(&self, subject: &str) {
        if let Ok(mut local) = self.local.lock() {
            local.subjects.remove(subject);
        }
        let Some(redis) = &self.redis else {
            return;
        };
        let (count, until) = Self::keys(redis, subject);
        let cleared: redis::RedisResult<()> = redis::cmd("DEL")
            .arg(count)
            .arg(until)
            .query_async(&mut redis.conn())
            .await;
        if let Err(err) = cleared {
            tracing::warn!(error = %err, "rate limiter unavailable; attempts not cleared");
        }
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(millis)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_local_limiter_lets_a_burst_through_up_to_the_free_attempts_then_backs_off() {
        let limiter = Limiter::new(None, LimitPolicy::default());
        for _ in 0..5 {
            assert!(limiter.acquire_locally("subject").is_ok());
        }
        let wait = limiter.acquire_locally("subject").unwrap_err();
        assert!(wait <= Duration::from_secs(1) && wait > Duration::ZERO);
        assert!(limiter.acquire_locally("another").is_ok(), "per subject");
    }

    #[test]
    fn the_local_limiter_never_forgets_a_back_off_to_make_room() {
        let limiter = Limiter::new(None, LimitPolicy::default());
        if let Ok(mut local) = limiter.local.lock() {
            local.capacity = 3;
        }
        for _ in 0..6 {
            let _ = limiter.acquire_locally("guesser");
        }
        assert!(limiter.acquire_locally("guesser").is_err(), "backing off");
        assert!(limiter.acquire_locally("a").is_ok());
        assert!(limiter.acquire_locally("b").is_ok());
        // Full: "a" and "b" (not backing off) make room; the guesser's back-off stays.
        assert!(limiter.acquire_locally("c").is_ok());
        assert!(limiter.acquire_locally("guesser").is_err());
        for _ in 0..6 {
            let _ = limiter.acquire_locally("other guesser");
        }
        if let Ok(mut local) = limiter.local.lock() {
            local.capacity = 2;
        }
        // Full of back-offs: a new subject waits rather than wiping them.
        assert!(limiter.acquire_locally("d").is_err());
        assert!(limiter.acquire_locally("guesser").is_err());
    }
}
