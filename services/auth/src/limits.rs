//! Brute-force protection: failed attempts counted in Redis per (tenant, username) and per
//! client address, with exponential back-off once a threshold is passed.
//!
//! When Redis is unreachable the limiter lets attempts through (and logs it): logins keep
//! working, protected by the bcrypt cost alone until Redis is back.

use std::time::Duration;

use hafen_authn::Redis;
use redis::AsyncCommands;

/// How failures turn into waiting.
#[derive(Debug, Clone)]
pub struct LimitPolicy {
    /// Failures allowed before back-off starts.
    pub free_attempts: u32,
    /// The first back-off; each further failure doubles it.
    pub base_delay: Duration,
    /// The longest back-off.
    pub max_delay: Duration,
    /// How long failures are remembered.
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

/// The limiter.
#[derive(Debug, Clone)]
pub struct Limiter {
    redis: Option<Redis>,
    policy: LimitPolicy,
}

impl Limiter {
    /// A limiter over `redis` (none: no limiting).
    pub fn new(redis: Option<Redis>, policy: LimitPolicy) -> Self {
        Self { redis, policy }
    }

    fn keys(redis: &Redis, subject: &str) -> (String, String) {
        (
            redis.key(&format!("limit:{subject}:failures")),
            redis.key(&format!("limit:{subject}:until")),
        )
    }

    /// How long to wait before another attempt for any of `subjects`, if at all.
    pub async fn blocked(&self, subjects: &[String]) -> Option<Duration> {
        let redis = self.redis.as_ref()?;
        let now = now_ms();
        let mut conn = redis.conn();
        let mut wait = None;
        for subject in subjects {
            let (_, until) = Self::keys(redis, subject);
            match conn.get::<_, Option<u64>>(&until).await {
                Ok(Some(until)) if until > now => {
                    let left = Duration::from_millis(until - now);
                    wait = Some(wait.map_or(left, |w: Duration| w.max(left)));
                }
                Ok(_) => {}
                Err(err) => {
                    tracing::warn!(error = %err, "rate limiter unavailable; attempt allowed");
                    return None;
                }
            }
        }
        wait
    }

    /// Counts a failure for each subject and sets its back-off.
    pub async fn failed(&self, subjects: &[String]) {
        let Some(redis) = &self.redis else {
            return;
        };
        let mut conn = redis.conn();
        for subject in subjects {
            let (failures, until) = Self::keys(redis, subject);
            let counted: redis::RedisResult<(u32, ())> = redis::pipe()
                .incr(&failures, 1)
                .expire(&failures, self.policy.window.as_secs() as i64)
                .query_async(&mut conn)
                .await;
            let count = match counted {
                Ok((count, ())) => count,
                Err(err) => {
                    tracing::warn!(error = %err, "rate limiter unavailable; failure not counted");
                    return;
                }
            };
            if count > self.policy.free_attempts {
                let exponent = (count - self.policy.free_attempts - 1).min(20);
                let delay = self
                    .policy
                    .base_delay
                    .saturating_mul(1 << exponent)
                    .min(self.policy.max_delay);
                let until_ms = now_ms() + delay.as_millis() as u64;
                let set: redis::RedisResult<()> = conn
                    .pset_ex(&until, until_ms, delay.as_millis() as u64)
                    .await;
                if let Err(err) = set {
                    tracing::warn!(error = %err, "rate limiter unavailable; back-off not set");
                }
            }
        }
    }

    /// Forgets the failures of `subject` after a success.
    pub async fn succeeded(&self, subject: &str) {
        let Some(redis) = &self.redis else {
            return;
        };
        let (failures, until) = Self::keys(redis, subject);
        let cleared: redis::RedisResult<()> = redis.conn().del(&[failures, until]).await;
        if let Err(err) = cleared {
            tracing::warn!(error = %err, "rate limiter unavailable; failures not cleared");
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}
