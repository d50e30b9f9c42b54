//! CPU time a load phase costs, per operation: this process's (the bench's clients and, in
//! `send`, the whole stack under test, which runs in this process) and the PostgreSQL
//! server's, read from `/proc`, with the machine's idle cores over the phase.
//!
//! A throughput next to a baseline means little without it: on a machine whose cores the load
//! keeps busy, each side's throughput is its cores divided by its CPU time per operation, and
//! the clients share those cores with the server. The PostgreSQL figure needs the server on
//! this machine (it is the postmaster's and its children's time); elsewhere it is left out.
//! Redis's time is not counted (in `send`, about 3 µs per message measured by `perf sched`).

use std::time::{Duration, Instant};

use diesel_async::{AsyncPgConnection, RunQueryDsl};

/// CPU time of this process, of PostgreSQL and idle time of the machine, at one moment.
pub(crate) struct Meter {
    at: Instant,
    process: Option<u64>,
    postgres: Option<u64>,
    idle: Option<u64>,
    postmaster: Option<u32>,
}

/// What a phase cost.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Cost {
    /// CPU time of this process per operation, µs.
    pub process_us: Option<f64>,
    /// CPU time of the PostgreSQL server per operation, µs.
    pub postgres_us: Option<f64>,
    /// Cores the machine left idle, on average.
    pub idle_cores: Option<f64>,
}

impl Meter {
    /// Starts measuring; `postmaster` from [`postmaster`].
    pub(crate) fn start(postmaster: Option<u32>) -> Self {
        Self {
            at: Instant::now(),
            process: process_ticks(std::process::id(), false),
            postgres: postmaster.and_then(postgres_ticks),
            idle: idle_ticks(),
            postmaster,
        }
    }

    /// What the phase cost since [`Meter::start`], for `operations` operations.
    pub(crate) fn finish(&self, operations: u64) -> Cost {
        let elapsed = self.at.elapsed();
        let end = Self::start(self.postmaster);
        let per_operation = |start: Option<u64>, end: Option<u64>| {
            let ticks = end?.checked_sub(start?)?;
            (operations > 0).then(|| seconds(ticks) * 1e6 / operations as f64)
        };
        Cost {
            process_us: per_operation(self.process, end.process),
            postgres_us: per_operation(self.postgres, end.postgres),
            idle_cores: end
                .idle
                .zip(self.idle)
                .and_then(|(end, start)| end.checked_sub(start))
                .map(|ticks| seconds(ticks) / elapsed.max(Duration::from_millis(1)).as_secs_f64()),
        }
    }
}

impl Cost {
    /// The cost of several phases together, each given with its operations and length: CPU
    /// time per operation over all their operations, idle cores over all their time. A figure
    /// unknown for any phase is unknown for all.
    pub(crate) fn pooled(phases: &[(Cost, u64, Duration)]) -> Cost {
        let weighted = |figure: fn(&Cost) -> Option<f64>, weight: fn(u64, Duration) -> f64| {
            let (mut sum, mut weights) = (0.0, 0.0);
            for (cost, operations, elapsed) in phases {
                let w = weight(*operations, *elapsed);
                sum += figure(cost)? * w;
                weights += w;
            }
            (weights > 0.0).then(|| sum / weights)
        };
        let by_operations = |operations: u64, _: Duration| operations as f64;
        let by_time = |_: u64, elapsed: Duration| elapsed.as_secs_f64();
        Cost {
            process_us: weighted(|c| c.process_us, by_operations),
            postgres_us: weighted(|c| c.postgres_us, by_operations),
            idle_cores: weighted(|c| c.idle_cores, by_time),
        }
    }

    /// `process + postgres µs`, as far as known.
    pub(crate) fn split(&self) -> String {
        let us = |v: Option<f64>| v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.0}"));
        format!("{} + {} µs", us(self.process_us), us(self.postgres_us))
    }

    /// The JSON fields of this cost, prefixed.
    pub(crate) fn json(&self, prefix: &str) -> serde_json::Map<String, serde_json::Value> {
        let mut fields = serde_json::Map::new();
        for (name, value) in [
            ("cpu_process_us", self.process_us),
            ("cpu_postgres_us", self.postgres_us),
            ("idle_cores", self.idle_cores),
        ] {
            fields.insert(format!("{prefix}{name}"), serde_json::json!(value));
        }
        fields
    }
}

/// The pid of the PostgreSQL server `conn` is connected to, when it runs on this machine: the
/// parent of the connection's backend.
pub(crate) async fn postmaster(conn: &mut AsyncPgConnection) -> Option<u32> {
    #[derive(diesel::QueryableByName)]
    struct Backend {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        pid: i32,
    }
    let backend = diesel::sql_query("SELECT pg_backend_pid() AS pid")
        .get_result::<Backend>(conn)
        .await
        .ok()?;
    let backend = u32::try_from(backend.pid).ok()?;
    let stat = Stat::read(backend)?;
    // A backend of a server elsewhere can share its pid with a process here: only a process
    // named like PostgreSQL's processes counts.
    (stat.command.starts_with("postgres") || stat.command.starts_with("postmaster"))
        .then_some(stat.parent)
}

/// Clock ticks of CPU time of `pid`; with `children`, of its ended children too.
fn process_ticks(pid: u32, children: bool) -> Option<u64> {
    let stat = Stat::read(pid)?;
    Some(stat.user + stat.system + if children { stat.children } else { 0 })
}

/// Clock ticks of CPU time of the PostgreSQL server: the postmaster, its ended children and
/// those still running.
fn postgres_ticks(postmaster: u32) -> Option<u64> {
    let mut ticks = process_ticks(postmaster, true)?;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        if let Some(stat) = Stat::read(pid)
            && stat.parent == postmaster
        {
            ticks += stat.user + stat.system;
        }
    }
    Some(ticks)
}

/// Clock ticks all cores spent idle since boot (`/proc/stat`).
fn idle_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().next()?.strip_prefix("cpu ")?;
    // user nice system idle iowait …
    let fields: Vec<u64> = cpu
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    Some(fields.get(3)? + fields.get(4)?)
}

fn seconds(ticks: u64) -> f64 {
    ticks as f64 / rustix::param::clock_ticks_per_second().max(1) as f64
}

/// The fields of `/proc/<pid>/stat` this module reads.
struct Stat {
    command: String,
    parent: u32,
    user: u64,
    system: u64,
    /// User and system time of ended, waited-for children.
    children: u64,
}

impl Stat {
    fn read(pid: u32) -> Option<Self> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command is in parentheses and may hold any character: fields follow the last ')'.
        let (head, rest) = text.rsplit_once(')')?;
        let command = head.split_once('(')?.1.to_owned();
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |i: usize| fields.get(i)?.parse::<u64>().ok();
        Some(Self {
            command,
            parent: fields.get(1)?.parse().ok()?,
            user: field(11)?,
            system: field(12)?,
            children: field(13)? + field(14)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A phase that burns CPU in this process costs what the kernel's clock of the
    /// process's CPU time says (to a clock tick or two), in µs per operation; this process's
    /// own stat parses.
    #[test]
    fn a_busy_phase_costs_this_process_cpu_time() {
        let cpu_ns = || {
            let at = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
            i128::from(at.tv_sec) * 1_000_000_000 + i128::from(at.tv_nsec)
        };
        let meter = Meter::start(None);
        let (until, started) = (cpu_ns() + 300_000_000, Instant::now());
        let mut x = 0_u64;
        // 300 ms of CPU time, however long the machine takes to give it.
        while cpu_ns() < until && started.elapsed() < Duration::from_secs(120) {
            x = std::hint::black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1));
        }
        let cost = meter.finish(3);
        let per_operation = cost.process_us.expect("this process's stat is readable");
        assert!(
            (90_000.0..=120_000.0).contains(&per_operation),
            "300 ms of CPU time over 3 operations cost {per_operation} µs each"
        );
        assert!(cost.postgres_us.is_none(), "no server was measured");
        assert!(Stat::read(std::process::id()).is_some_and(|s| s.parent > 0));
    }

    /// Phases pooled cost what their operations cost in all, and leave idle what they left
    /// idle over all their time; a figure one phase lacks is lacking in the pool.
    #[test]
    fn pooled_phases_weigh_by_operations_and_by_time() {
        let cost = |process, postgres, idle| Cost {
            process_us: Some(process),
            postgres_us: postgres,
            idle_cores: Some(idle),
        };
        let pooled = Cost::pooled(&[
            (cost(100.0, Some(10.0), 0.5), 1_000, Duration::from_secs(1)),
            (cost(40.0, Some(70.0), 0.2), 3_000, Duration::from_secs(2)),
        ]);
        assert_eq!(pooled.process_us, Some(55.0));
        assert_eq!(pooled.postgres_us, Some(55.0));
        assert!((pooled.idle_cores.unwrap_or_default() - 0.3).abs() < 1e-9);
        let partial = Cost::pooled(&[
            (cost(100.0, Some(10.0), 0.5), 1_000, Duration::from_secs(1)),
            (cost(40.0, None, 0.2), 3_000, Duration::from_secs(2)),
        ]);
        assert_eq!(partial.postgres_us, None);
        assert_eq!(Cost::pooled(&[]).process_us, None);
    }
}
