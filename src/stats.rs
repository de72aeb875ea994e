//! Request counters for `labfs status`: requests and latency per backend lane, errors
//! by errno, and how often each rule decided a placement, all since the daemon started.
//!
//! Lock-free on the request path: fixed arrays of `AtomicU64` (errno-indexed, and a
//! log2 latency histogram per backend). One daemon serves one mount, so the counters
//! are process-global. Rule hits are counted by the core, which decides placements
//! ([`crate::fs::placements`]); this module only reads them.
//!
//! What is counted: every request the kernel sends to labfs (`src/fuse/` wraps each
//! one in [`timed`]). Reads and writes that the kernel serves by FUSE passthrough
//! never reach labfs and are not counted; that is the point of passthrough.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::fs::LabFs;
use crate::rules::BackendKind;

/// Errnos at or above this are counted together in the last slot.
const ERRNO_SLOTS: usize = 256;
/// Latency buckets: bucket `i` holds requests that took < 2^i microseconds
/// (the last bucket holds everything slower).
const BUCKETS: usize = 32;

struct Lane {
    requests: AtomicU64,
    errors: AtomicU64,
    total_us: AtomicU64,
    max_us: AtomicU64,
    hist: [AtomicU64; BUCKETS],
}

impl Lane {
    const fn new() -> Lane {
        Lane {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            total_us: AtomicU64::new(0),
            max_us: AtomicU64::new(0),
            hist: [const { AtomicU64::new(0) }; BUCKETS],
        }
    }

    fn record(&self, us: u64, failed: bool) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if failed {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.total_us.fetch_add(us, Ordering::Relaxed);
        self.max_us.fetch_max(us, Ordering::Relaxed);
        self.hist[bucket(us)].fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> LaneStats {
        let requests = self.requests.load(Ordering::Relaxed);
        let hist: Vec<u64> = self
            .hist
            .iter()
            .map(|h| h.load(Ordering::Relaxed))
            .collect();
        let total = self.total_us.load(Ordering::Relaxed);
        let max_ms = self.max_us.load(Ordering::Relaxed) as f64 / 1000.0;
        LaneStats {
            requests,
            errors: self.errors.load(Ordering::Relaxed),
            mean_ms: if requests == 0 {
                0.0
            } else {
                total as f64 / requests as f64 / 1000.0
            },
            p50_ms: quantile_ms(&hist, 0.50).min(max_ms),
            p99_ms: quantile_ms(&hist, 0.99).min(max_ms),
            max_ms,
        }
    }
}

struct Stats {
    lanes: [Lane; 2],
    errno: [AtomicU64; ERRNO_SLOTS],
    started: OnceLock<(SystemTime, Instant)>,
}

static STATS: Stats = Stats {
    lanes: [Lane::new(), Lane::new()],
    errno: [const { AtomicU64::new(0) }; ERRNO_SLOTS],
    started: OnceLock::new(),
};

fn lane(b: BackendKind) -> &'static Lane {
    match b {
        BackendKind::Atlas => &STATS.lanes[0],
        BackendKind::Local => &STATS.lanes[1],
    }
}

fn bucket(us: u64) -> usize {
    // < 1 us -> 0, < 2 us -> 1, < 4 us -> 2, ...
    let b = (u64::BITS - us.leading_zeros()) as usize;
    b.min(BUCKETS - 1)
}

/// Upper bound (ms) of the bucket holding quantile `q`; 0 with no samples.
fn quantile_ms(hist: &[u64], q: f64) -> f64 {
    let n: u64 = hist.iter().sum();
    if n == 0 {
        return 0.0;
    }
    let want = ((n as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, c) in hist.iter().enumerate() {
        seen += c;
        if seen >= want {
            return (1u64 << i) as f64 / 1000.0;
        }
    }
    (1u64 << (hist.len() - 1)) as f64 / 1000.0
}

/// Mark the start of the counting period (the mount); later calls do nothing.
pub fn mark_start() {
    let _ = STATS
        .started
        .get_or_init(|| (SystemTime::now(), Instant::now()));
}

/// Count one request on `backend`'s lane that took `us` microseconds and ended with
/// `errno` (None on success).
pub fn record(backend: BackendKind, us: u64, errno: Option<i32>) {
    lane(backend).record(us, errno.is_some());
    if let Some(e) = errno {
        let slot = usize::try_from(e).unwrap_or(0).min(ERRNO_SLOTS - 1);
        STATS.errno[slot].fetch_add(1, Ordering::Relaxed);
    }
}

/// Wrap a request's work so that running it is counted on `backend`'s lane.
pub fn timed<T, F>(backend: BackendKind, work: F) -> impl FnOnce(&LabFs) -> Result<T> + Send
where
    F: FnOnce(&LabFs) -> Result<T> + Send,
{
    move |fs: &LabFs| {
        let t = Instant::now();
        let res = work(fs);
        let us = u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX);
        record(backend, us, res.as_ref().err().map(|e| e.errno()));
        res
    }
}

/// Latency and counts of one backend lane.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct LaneStats {
    pub requests: u64,
    pub errors: u64,
    pub mean_ms: f64,
    /// Upper bound of the log2 bucket holding the median (at most `max_ms`).
    pub p50_ms: f64,
    /// Upper bound of the log2 bucket holding the 99th percentile (at most `max_ms`).
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// One rule's hit count.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RuleHits {
    /// The rule's pattern, or `(no rule)` for unmatched paths.
    pub rule: String,
    pub class: String,
    /// 1-based line of the rule in the rules file in force (0: none or built-in).
    pub line: usize,
    pub hits: u64,
}

/// Everything counted since the mount started.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct StatsSnapshot {
    /// Unix time the counting started (the mount).
    pub since: u64,
    pub uptime_s: u64,
    pub requests: u64,
    pub errors: u64,
    pub atlas: LaneStats,
    pub local: LaneStats,
    /// Failed requests by errno name (`ENOENT`, ...), only those seen.
    pub errors_by_errno: BTreeMap<String, u64>,
    /// Placement decisions per rule of the rules in force, most hits first.
    pub rule_hits: Vec<RuleHits>,
}

/// A snapshot of the counters, with rule hits for the rules in force in `fs`.
pub fn snapshot(fs: &LabFs) -> StatsSnapshot {
    mark_start();
    let (since, uptime_s) = STATS
        .started
        .get()
        .map(|(wall, mono)| {
            let since = wall
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            (since, mono.elapsed().as_secs())
        })
        .unwrap_or((0, 0));
    let atlas = lane(BackendKind::Atlas).snapshot();
    let local = lane(BackendKind::Local).snapshot();
    let mut errors_by_errno = BTreeMap::new();
    for (e, c) in STATS.errno.iter().enumerate() {
        let c = c.load(Ordering::Relaxed);
        if c > 0 {
            errors_by_errno.insert(errno_name(e as i32), c);
        }
    }
    let live = fs.live();
    let mut rule_hits: Vec<RuleHits> = live
        .rules
        .rules()
        .iter()
        .map(|r| RuleHits {
            rule: r.path.clone(),
            class: r.class.to_string(),
            line: r.line,
            hits: fs.placements.hits(&r.path),
        })
        .collect();
    rule_hits.push(RuleHits {
        rule: "(no rule)".into(),
        class: match live.rules.unplaced() {
            crate::rules::Unplaced::Authoritative => "authoritative".into(),
            crate::rules::Unplaced::Deny => "denied".into(),
        },
        line: 0,
        hits: fs.placements.unplaced(),
    });
    rule_hits.sort_by(|a, b| b.hits.cmp(&a.hits).then_with(|| a.line.cmp(&b.line)));
    StatsSnapshot {
        since,
        uptime_s,
        requests: atlas.requests + local.requests,
        errors: atlas.errors + local.errors,
        atlas,
        local,
        errors_by_errno,
        rule_hits,
    }
}

/// The operator's view of a [`StatsSnapshot`] (as JSON, from `labfs status`).
pub fn print_table(v: &serde_json::Value) {
    if v.is_null() {
        return;
    }
    let secs = v["uptime_s"].as_u64().unwrap_or(0);
    println!(
        "requests since the mount ({}h{:02}m ago): {}, failed: {}",
        secs / 3600,
        (secs % 3600) / 60,
        v["requests"],
        v["errors"]
    );
    println!("LANE     REQUESTS   FAILED     MEAN       P50        P99        MAX");
    for b in ["atlas", "local"] {
        let l = &v[b];
        let ms = |k: &str| format!("{:.2} ms", l[k].as_f64().unwrap_or(0.0));
        println!(
            "{:<8} {:<10} {:<10} {:<10} {:<10} {:<10} {}",
            b,
            l["requests"].to_string(),
            l["errors"].to_string(),
            ms("mean_ms"),
            ms("p50_ms"),
            ms("p99_ms"),
            ms("max_ms")
        );
    }
    if let Some(errs) = v["errors_by_errno"].as_object() {
        if !errs.is_empty() {
            let mut list: Vec<(&String, u64)> = errs
                .iter()
                .map(|(k, c)| (k, c.as_u64().unwrap_or(0)))
                .collect();
            list.sort_by_key(|e| std::cmp::Reverse(e.1));
            let text: Vec<String> = list.iter().map(|(k, c)| format!("{k} {c}")).collect();
            println!("failed requests by errno: {}", text.join(", "));
        }
    }
    if let Some(hits) = v["rule_hits"].as_array() {
        println!("RULE                                     CLASS          LINE   PLACEMENTS");
        for h in hits {
            let line = match h["line"].as_u64() {
                Some(0) | None => "-".to_string(),
                Some(n) => n.to_string(),
            };
            println!(
                "{:<40} {:<14} {:<6} {}",
                h["rule"].as_str().unwrap_or("?"),
                h["class"].as_str().unwrap_or("?"),
                line,
                h["hits"]
            );
        }
    }
}

/// The symbolic name of an errno (`ENOENT`), or `errno N` for one not in the table.
pub fn errno_name(e: i32) -> String {
    let name = match e {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::ESRCH => "ESRCH",
        libc::EINTR => "EINTR",
        libc::EIO => "EIO",
        libc::ENXIO => "ENXIO",
        libc::E2BIG => "E2BIG",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::ENODEV => "ENODEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::ENFILE => "ENFILE",
        libc::EMFILE => "EMFILE",
        libc::ENOTTY => "ENOTTY",
        libc::ETXTBSY => "ETXTBSY",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::ESPIPE => "ESPIPE",
        libc::EROFS => "EROFS",
        libc::EMLINK => "EMLINK",
        libc::EPIPE => "EPIPE",
        libc::ERANGE => "ERANGE",
        libc::EDEADLK => "EDEADLK",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENOLCK => "ENOLCK",
        libc::ENOSYS => "ENOSYS",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ELOOP => "ELOOP",
        libc::ENODATA => "ENODATA",
        libc::EOVERFLOW => "EOVERFLOW",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ENOTCONN => "ENOTCONN",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ESTALE => "ESTALE",
        libc::EDQUOT => "EDQUOT",
        libc::ECANCELED => "ECANCELED",
        _ => return format!("errno {e}"),
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_log2_of_microseconds() {
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(1), 1);
        assert_eq!(bucket(3), 2);
        assert_eq!(bucket(1000), 10);
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn quantiles_come_from_the_histogram() {
        let mut h = vec![0u64; BUCKETS];
        h[4] = 98; // < 16 us
        h[20] = 2; // < ~1 s
        assert_eq!(quantile_ms(&h, 0.5), 16.0 / 1000.0);
        assert_eq!(quantile_ms(&h, 0.99), (1u64 << 20) as f64 / 1000.0);
        assert_eq!(quantile_ms(&[0; BUCKETS], 0.5), 0.0);
    }

    #[test]
    fn errno_names() {
        assert_eq!(errno_name(libc::EROFS), "EROFS");
        assert_eq!(errno_name(9999), "errno 9999");
    }
}
