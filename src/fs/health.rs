//! Atlas health: is Atlas answering, since when not, and how fast.
//!
//! NFS hard mounts hang rather than fail. A probe thread stats the Atlas root every
//! `probe_interval` on a helper thread of its own and waits at most `timeout`; a
//! request on the Atlas lane that outlives `timeout` also marks Atlas down. While
//! Atlas is down, requests for Atlas paths fail at once with ETIMEDOUT (logged once
//! per outage and path) and never fall back to local SSD; local paths are unaffected.
//! When a probe answers again, service resumes without a remount.
//!
//! What counts as "not answering" is the server, not this node: a backend call is
//! timed by a [`CallClock`], which subtracts the time its thread spent running or
//! waiting for a CPU (`/proc/thread-self/schedstat`) from the wall time, so a node
//! whose CPUs are saturated does not declare Atlas down. A request waits for Atlas at
//! most `timeout`; however busy the node, it is answered within `timeout` +
//! [`Health::margin`] (then ETIMEDOUT, counted as `node_busy_timeouts`, Atlas not
//! marked down). A call that answers but took more than [`Health::slow_threshold`]
//! waiting for Atlas marks Atlas *slow* for [`SLOW_FOR`] (shown by `labfs status`),
//! which is not an outage.
//!
//! Between "slow" and "down" there is "stalled": a metadata request that local paths
//! depend on (the attributes of `/`, `/scans`, ... on the way to a local path, or
//! whether a transitional name was promoted) got no answer within [`Health::hedge`].
//! While Atlas is stalled or down, those requests are answered without Atlas: the
//! directories on the way to local paths from their last-known attributes
//! ([`Health::note_dir`]), transitional names from their local part only. The next
//! probe that answers clears it.

use std::ffi::{OsStr, OsString};
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use dashmap::{DashMap, DashSet};
use parking_lot::Mutex;
use tracing::{debug, info, warn};

use super::attr::{Attr, Kind};
use super::backend::{cstring, fstatat};
use super::inode::BackingKey;
use super::LabFs;
use crate::rules::BackendKind;

/// At most this many directories are remembered for outages (cleared beyond).
const MAX_REMEMBERED_DIRS: usize = 100_000;
/// At most this many paths are logged per outage.
const MAX_LOGGED_PATHS: usize = 10_000;

pub struct Health {
    down: AtomicBool,
    stalled: AtomicBool,
    down_since: Mutex<Option<SystemTime>>,
    reason: Mutex<String>,
    logged: DashSet<String>,
    /// Requests refused during the current (or last) outage.
    refused: AtomicU64,
    /// Latency of the last probe, microseconds.
    last_latency_us: AtomicU64,
    last_ok: Mutex<Option<SystemTime>>,
    /// Free and total bytes of Atlas as of the last probe that answered.
    space: Mutex<Option<(u64, u64)>>,
    /// Last-known backing and attributes of the Atlas directories on the way to local
    /// paths, by namespace path (their inode numbers may be forgotten and renewed).
    dirs: DashMap<OsString, (BackingKey, Attr)>,
    /// `[atlas] timeout` and `probe_interval`, milliseconds (changed live by reload).
    timeout_ms: AtomicU64,
    probe_ms: AtomicU64,
    /// Backend calls that waited for Atlas longer than the timeout.
    backend_timeouts: AtomicU64,
    /// Requests answered ETIMEDOUT at timeout + margin without their call waiting
    /// that long for Atlas (the node was too busy to run them).
    busy_timeouts: AtomicU64,
    /// Longest time one Atlas call waited for Atlas / for a CPU, microseconds.
    slowest_call_us: AtomicU64,
    most_cpu_wait_us: AtomicU64,
    /// Until when Atlas counts as slow.
    slow_until: Mutex<Option<Instant>>,
    /// Namespace paths of transitional names this daemon has seen on Atlas (promoted):
    /// while Atlas is down they answer ETIMEDOUT, never "absent".
    atlas_names: DashSet<OsString>,
}

/// How long one slow call keeps Atlas reported slow.
pub const SLOW_FOR: Duration = Duration::from_secs(60);

/// The calling thread's id and its own `schedstat`, opened once per thread: a sample
/// is then one `pread` (opening `/proc/thread-self/schedstat` by path each time cost an
/// openat, a statx, two reads and a close, twice per Atlas request).
struct OwnSchedstat {
    tid: i32,
    file: Option<std::fs::File>,
}

thread_local! {
    static OWN_SCHEDSTAT: OwnSchedstat = OwnSchedstat {
        tid: crate::sys::thread_id(),
        file: std::fs::File::open("/proc/thread-self/schedstat").ok(),
    };
}

/// `(ns on a CPU, ns waiting for a CPU)` from one schedstat text.
fn parse_schedstat(text: &[u8]) -> Option<(u64, u64)> {
    let text = std::str::from_utf8(text).ok()?;
    let mut f = text.split_ascii_whitespace().map(|v| v.parse::<u64>().ok());
    Some((f.next()??, f.next()??))
}

/// (time on a CPU, time waiting for a CPU) of thread `tid` (the calling thread when
/// None) so far, nanoseconds; through the thread's own descriptor when it is the
/// calling thread.
fn schedstat(tid: Option<i32>) -> Option<(u64, u64)> {
    use std::os::unix::fs::FileExt;
    let own = OWN_SCHEDSTAT.with(|o| {
        if tid.is_some_and(|t| t != o.tid) {
            return None;
        }
        let f = o.file.as_ref()?;
        let mut buf = [0u8; 96];
        let n = f.read_at(&mut buf, 0).ok()?;
        Some(parse_schedstat(&buf[..n]))
    });
    if let Some(s) = own {
        return s;
    }
    let path = match tid {
        Some(t) => format!("/proc/self/task/{t}/schedstat"),
        None => "/proc/thread-self/schedstat".to_string(),
    };
    parse_schedstat(&std::fs::read(path).ok()?)
}

/// The clock of one backend call: started on the calling thread right before the
/// call, read from any thread (the watchdog) while it runs.
#[derive(Clone, Copy, Debug)]
pub struct CallClock {
    tid: i32,
    start: Instant,
    sched: Option<(u64, u64)>,
}

impl CallClock {
    /// Start timing a call made by the current thread.
    pub fn start() -> CallClock {
        let tid = OWN_SCHEDSTAT.with(|o| o.tid);
        CallClock {
            tid,
            start: Instant::now(),
            sched: schedstat(None),
        }
    }

    /// Wall time since the start.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// (time the call has waited for the backend, time its thread ran or waited for
    /// a CPU meanwhile). Without schedstat, all of the wall time counts as waiting.
    pub fn split(&self) -> (Duration, Duration) {
        let wall = self.start.elapsed();
        let busy = match (self.sched, schedstat(Some(self.tid))) {
            (Some((c0, w0)), Some((c1, w1))) => {
                Duration::from_nanos(c1.saturating_sub(c0) + w1.saturating_sub(w0))
            }
            _ => Duration::ZERO,
        };
        (wall.saturating_sub(busy), busy.min(wall))
    }
}

/// A snapshot for `labfs status`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct HealthReport {
    pub answering: bool,
    /// Seconds since the epoch when Atlas stopped answering (None while answering).
    pub down_since: Option<u64>,
    /// The same as an RFC 3339 UTC time.
    pub down_since_utc: Option<String>,
    /// How long Atlas has not been answering, in seconds.
    pub down_for_s: Option<f64>,
    pub reason: String,
    /// A metadata request that local paths depend on is waiting for Atlas.
    pub stalled: bool,
    /// Requests refused with ETIMEDOUT during the current (or last) outage.
    pub refused_requests: u64,
    /// The configured bound (`[atlas] timeout`), milliseconds.
    pub timeout_ms: u64,
    /// However busy the node, a request is answered within timeout + this.
    pub margin_ms: u64,
    /// `answering`, `slow` (answering, but a call waited for Atlas longer than
    /// `slow_threshold_ms` within the last minute) or `not answering`.
    pub state: String,
    pub slow: bool,
    pub slow_threshold_ms: u64,
    /// Backend calls that waited for Atlas longer than the timeout (each one is an
    /// ETIMEDOUT the caller saw, or marked Atlas down).
    pub backend_timeouts: u64,
    /// Requests answered ETIMEDOUT at timeout + margin although their backend call had
    /// not waited for Atlas that long: the node was too busy to run them.
    pub node_busy_timeouts: u64,
    /// Longest time one call waited for Atlas, and for a CPU, milliseconds.
    pub slowest_call_ms: f64,
    pub most_cpu_wait_ms: f64,
    pub last_probe_latency_ms: f64,
    pub last_ok: Option<u64>,
}

fn epoch(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `2026-11-23T13:08:23Z` for seconds since the epoch (UTC, no leap seconds).
pub fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

impl Health {
    pub fn new(timeout: Duration) -> Health {
        Health {
            down: AtomicBool::new(false),
            stalled: AtomicBool::new(false),
            down_since: Mutex::new(None),
            reason: Mutex::new(String::new()),
            logged: DashSet::new(),
            refused: AtomicU64::new(0),
            last_latency_us: AtomicU64::new(0),
            last_ok: Mutex::new(None),
            space: Mutex::new(None),
            dirs: DashMap::new(),
            timeout_ms: AtomicU64::new(timeout.as_millis() as u64),
            probe_ms: AtomicU64::new(1000),
            backend_timeouts: AtomicU64::new(0),
            busy_timeouts: AtomicU64::new(0),
            slowest_call_us: AtomicU64::new(0),
            most_cpu_wait_us: AtomicU64::new(0),
            slow_until: Mutex::new(None),
            atlas_names: DashSet::new(),
        }
    }

    /// `[atlas] timeout`: how long a request waits for Atlas.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.load(Ordering::Relaxed))
    }

    /// Apply `[atlas] timeout` and `probe_interval` (mount and reload).
    pub fn set_timing(&self, timeout: Duration, probe_interval: Duration) {
        self.timeout_ms
            .store(timeout.as_millis().max(1) as u64, Ordering::Relaxed);
        self.probe_ms
            .store(probe_interval.as_millis().max(1) as u64, Ordering::Relaxed);
    }

    pub fn probe_interval(&self) -> Duration {
        Duration::from_millis(self.probe_ms.load(Ordering::Relaxed))
    }

    /// However busy the node, a request is answered within timeout + margin: the
    /// margin is the timeout again, at least 1 s.
    pub fn margin(&self) -> Duration {
        self.timeout().max(Duration::from_secs(1))
    }

    /// A call that waited for Atlas longer than this marks Atlas slow: a quarter of
    /// the timeout.
    pub fn slow_threshold(&self) -> Duration {
        self.timeout() / 4
    }

    /// Account for a finished Atlas call: how long it waited for Atlas and for a CPU.
    pub fn note_call(&self, waited: Duration, busy: Duration) {
        self.slowest_call_us
            .fetch_max(waited.as_micros() as u64, Ordering::Relaxed);
        self.most_cpu_wait_us
            .fetch_max(busy.as_micros() as u64, Ordering::Relaxed);
        if waited > self.slow_threshold() {
            let mut s = self.slow_until.lock();
            if s.is_none_or(|t| t < Instant::now()) {
                info!(
                    "Atlas is slow: a call waited {:.1}s for it (slow above {:?}, timeout {:?}); not an outage",
                    waited.as_secs_f64(),
                    self.slow_threshold(),
                    self.timeout()
                );
            }
            *s = Some(Instant::now() + SLOW_FOR);
        }
    }

    /// A backend call waited for Atlas longer than the timeout.
    pub fn note_backend_timeout(&self, waited: Duration) {
        self.backend_timeouts.fetch_add(1, Ordering::Relaxed);
        self.slowest_call_us
            .fetch_max(waited.as_micros() as u64, Ordering::Relaxed);
    }

    /// A request answered at timeout + margin while its call was not shown waiting
    /// for Atlas that long (the node was too busy): counted and logged, Atlas stays up.
    pub fn note_busy_timeout(&self, op: &str, waited: Duration, busy: Duration) {
        let n = self.busy_timeouts.fetch_add(1, Ordering::Relaxed);
        if n.is_power_of_two() || n == 0 {
            warn!(
                "{op}: answered ETIMEDOUT after timeout + margin ({:?}): the node was too busy to run it (waited {:.1}s for Atlas, {:.1}s for a CPU or a lane thread); Atlas not marked down ({} such requests so far)",
                self.timeout() + self.margin(),
                waited.as_secs_f64(),
                busy.as_secs_f64(),
                n + 1
            );
        }
    }

    pub fn is_slow(&self) -> bool {
        self.slow_until.lock().is_some_and(|t| t > Instant::now())
    }

    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Acquire)
    }

    /// Down, or a request that local paths depend on is waiting for Atlas.
    pub fn is_stalled(&self) -> bool {
        self.is_down() || self.stalled.load(Ordering::Acquire)
    }

    /// How long a request that local paths depend on waits for Atlas before it is
    /// answered without it: a quarter of the timeout, at most 500 ms.
    pub fn hedge(&self) -> Duration {
        (self.timeout() / 4).clamp(Duration::from_millis(20), Duration::from_millis(500))
    }

    pub fn mark_down(&self, reason: &str) {
        self.stalled.store(true, Ordering::Release);
        if !self.down.swap(true, Ordering::AcqRel) {
            *self.down_since.lock() = Some(SystemTime::now());
            *self.reason.lock() = reason.to_string();
            self.refused.store(0, Ordering::Relaxed);
            warn!(
                "Atlas is not answering ({reason}): Atlas paths fail with ETIMEDOUT (errno {}) until it does; local paths keep working",
                libc::ETIMEDOUT
            );
        }
    }

    /// A request that local paths depend on got no answer within [`Health::hedge`].
    pub fn mark_stalled(&self) {
        if !self.stalled.swap(true, Ordering::AcqRel) && !self.is_down() {
            info!(
                "Atlas has not answered a request for {:?}: directories on the way to local paths are served from their last-known attributes until it does",
                self.hedge()
            );
        }
    }

    pub fn mark_up(&self) {
        *self.last_ok.lock() = Some(SystemTime::now());
        if self.down.swap(false, Ordering::AcqRel) {
            let since = self.down_since.lock().take();
            let secs = since
                .and_then(|s| s.elapsed().ok())
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            self.logged.clear();
            info!(
                "Atlas is answering again after {secs:.1}s ({} requests were refused); service resumed",
                self.refused.load(Ordering::Relaxed)
            );
        }
        if self.stalled.swap(false, Ordering::AcqRel) {
            debug!("Atlas answers again: no longer stalled");
        }
    }

    /// One log line per outage and path (every refusal is counted).
    pub fn log_outage_once(&self, path: &str, rule: &str) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        if self.logged.len() < MAX_LOGGED_PATHS && self.logged.insert(path.to_string()) {
            warn!("{path}: refused while Atlas is not answering (rule {rule})");
        }
    }

    /// A request on an open Atlas file refused during an outage: one line per outage
    /// and kind of request.
    pub fn refuse_open_file(&self, op: &str) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        if self.logged.len() < MAX_LOGGED_PATHS && self.logged.insert(format!("\0{op}")) {
            warn!("{op} on an open Atlas file refused while Atlas is not answering");
        }
    }

    pub fn report(&self) -> HealthReport {
        let since = *self.down_since.lock();
        HealthReport {
            answering: !self.is_down(),
            down_since: since.map(epoch),
            down_since_utc: since.map(|s| utc(epoch(s))),
            down_for_s: since
                .and_then(|s| s.elapsed().ok())
                .map(|d| d.as_secs_f64()),
            reason: if self.is_down() {
                self.reason.lock().clone()
            } else {
                String::new()
            },
            stalled: self.is_stalled(),
            refused_requests: self.refused.load(Ordering::Relaxed),
            timeout_ms: self.timeout().as_millis() as u64,
            margin_ms: self.margin().as_millis() as u64,
            state: if self.is_down() {
                "not answering"
            } else if self.is_slow() {
                "slow"
            } else {
                "answering"
            }
            .to_string(),
            slow: self.is_slow(),
            slow_threshold_ms: self.slow_threshold().as_millis() as u64,
            backend_timeouts: self.backend_timeouts.load(Ordering::Relaxed),
            node_busy_timeouts: self.busy_timeouts.load(Ordering::Relaxed),
            slowest_call_ms: self.slowest_call_us.load(Ordering::Relaxed) as f64 / 1000.0,
            most_cpu_wait_ms: self.most_cpu_wait_us.load(Ordering::Relaxed) as f64 / 1000.0,
            last_probe_latency_ms: self.last_latency_us.load(Ordering::Relaxed) as f64 / 1000.0,
            last_ok: self.last_ok.lock().map(epoch),
        }
    }

    /// Free and total bytes of Atlas from the last probe that answered: status never
    /// asks Atlas itself.
    pub fn atlas_space(&self) -> (Option<u64>, Option<u64>) {
        match *self.space.lock() {
            Some((free, total)) => (Some(free), Some(total)),
            None => (None, None),
        }
    }

    /// Remember directory `path` (its backing and attributes) for outages.
    fn note_dir(&self, path: OsString, key: BackingKey, attr: &Attr) {
        if self.dirs.len() >= MAX_REMEMBERED_DIRS {
            self.dirs.clear();
        }
        self.dirs.insert(path, (key, *attr));
    }

    /// Start the probe thread for the Atlas root descriptor `root` (kept open by the caller).
    pub fn start_probe(self: &Arc<Self>, root: RawFd, interval: Duration) {
        self.probe_ms
            .store(interval.as_millis().max(1) as u64, Ordering::Relaxed);
        let h = self.clone();
        let _ = thread::Builder::new()
            .name("atlas-probe".into())
            .spawn(move || h.probe_loop(root));
    }

    fn probe_loop(&self, root: RawFd) {
        type Probe = Option<(Duration, u64, u64)>;
        let (tx, rx) = mpsc::channel::<Probe>();
        let clock: Arc<Mutex<Option<CallClock>>> = Arc::new(Mutex::new(None));
        let mut in_flight = false;
        loop {
            if !in_flight {
                let tx = tx.clone();
                let clock = clock.clone();
                *clock.lock() = None;
                in_flight = true;
                // The probe runs on its own thread: if Atlas hangs, only it hangs.
                let spawned = thread::Builder::new()
                    .name("atlas-probe-call".into())
                    .spawn(move || {
                        let c = CallClock::start();
                        *clock.lock() = Some(c);
                        // The Atlas root stays open as long as the mount.
                        let space = crate::sys::with_fd(root, |r| crate::sys::fs_space(r));
                        let _ = tx.send(space.ok().map(|sp| (c.split().0, sp.avail, sp.total)));
                    });
                if spawned.is_err() {
                    in_flight = false;
                }
            }
            match rx.recv_timeout(self.timeout()) {
                Ok(answer) => {
                    in_flight = false;
                    match answer {
                        None => self.mark_down("statfs of the Atlas root failed"),
                        Some((d, free, total)) => {
                            self.last_latency_us
                                .store(d.as_micros() as u64, Ordering::Relaxed);
                            *self.space.lock() = Some((free, total));
                            self.mark_up();
                        }
                    }
                    thread::sleep(self.probe_interval());
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    // Only time the call spent waiting for Atlas counts: a probe
                    // thread that was not even started, or waited for a CPU, does not.
                    let waited = clock.lock().map(|c| c.split().0);
                    if waited.is_some_and(|w| w >= self.timeout()) {
                        self.mark_down("no answer to statfs within the timeout");
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
    }
}

/// What the request dispatcher needs to keep local paths working while Atlas is not
/// answering (used by src/fuse/).
impl LabFs {
    /// Whether `path`, placed on Atlas, is a directory on the way to local paths (the
    /// root, `/scans` and `/scans/x` for a rule `/scans/*/work`, ...).
    pub fn leads_to_local<P: AsRef<OsStr> + ?Sized>(&self, path: &P) -> bool {
        let live = self.live();
        live.rules.resolve(path).backend() == BackendKind::Atlas
            && live.rules.may_place_below(path, BackendKind::Local)
    }

    /// Note a directory entry handed to the kernel: a directory on the way to local
    /// paths (for its last-known attributes), a transitional name found on Atlas.
    pub fn note_entry(&self, parent: u64, name: &OsStr, attr: &Attr) {
        let Ok(path) = self.child_npath(parent, name) else {
            return;
        };
        if self.inodes.get(attr.ino).and_then(|n| n.backend()) == Some(BackendKind::Atlas)
            && self.placement(&path).class == crate::rules::Class::Transitional
        {
            if self.health.atlas_names.len() >= MAX_REMEMBERED_DIRS {
                self.health.atlas_names.clear();
            }
            self.health.atlas_names.insert(path.clone());
        }
        if attr.kind != Kind::Dir {
            return;
        }
        if let Some(key) = self.inodes.get(attr.ino).and_then(|n| n.key) {
            if key.backend == BackendKind::Atlas && self.leads_to_local(&path) {
                self.health.note_dir(path, key, attr);
            }
        }
    }

    /// Note the attributes of directory `ino` handed to the kernel.
    pub fn note_getattr(&self, ino: u64, attr: &Attr) {
        if attr.kind != Kind::Dir {
            return;
        }
        let (Some(path), Some(key)) = (
            self.inodes.npath(ino),
            self.inodes.get(ino).and_then(|n| n.key),
        ) else {
            return;
        };
        if key.backend != BackendKind::Atlas {
            return;
        }
        if let Some(mut known) = self.health.dirs.get_mut(&path) {
            *known = (key, *attr);
        } else if self.leads_to_local(&path) {
            self.health.note_dir(path, key, attr);
        }
    }

    /// Remember the root's attributes at mount (when it is on Atlas): the kernel asks
    /// for them again whenever its copy expires, and a caller without
    /// CAP_DAC_OVERRIDE needs them to reach any local path during an outage.
    pub fn note_root(&self) {
        let root = super::Ctx {
            uid: 0,
            gid: 0,
            pid: 0,
        };
        if let Ok((attr, _)) = self.getattr(&root, super::ROOT_INO, None) {
            self.note_getattr(super::ROOT_INO, &attr);
        }
    }

    /// Whether transitional name `parent/name` was seen on Atlas by this daemon.
    pub fn known_on_atlas(&self, parent: u64, name: &OsStr) -> bool {
        self.child_npath(parent, name)
            .is_ok_and(|p| self.health.atlas_names.contains(&p))
    }

    /// Whether directory `path` has transitional children this daemon saw on Atlas.
    pub fn has_known_atlas_children<P: AsRef<OsStr> + ?Sized>(&self, path: &P) -> bool {
        let path = path.as_ref().as_bytes();
        let mut prefix = path.to_vec();
        if path != b"/" {
            prefix.push(b'/');
        }
        self.health.atlas_names.iter().any(|p| {
            p.as_bytes()
                .strip_prefix(prefix.as_slice())
                .is_some_and(|rest| !rest.contains(&b'/'))
        })
    }

    /// The last-known attributes of directory `ino`, for an outage.
    pub fn last_known_dir(&self, ino: u64) -> Option<Attr> {
        let path = self.inodes.npath(ino)?;
        let (key, attr) = *self.health.dirs.get(&path)?;
        if self.inodes.get(ino)?.key != Some(key) {
            return None;
        }
        Some(Attr { ino, ..attr })
    }

    /// The last-known entry `parent/name` (a directory on the way to local paths), for
    /// an outage: counted as a lookup, under the number it had (or a new one if the
    /// kernel has forgotten it meanwhile, as it does with expired unused entries).
    pub fn last_known_entry(&self, parent: u64, name: &OsStr) -> Option<Attr> {
        let path = self.child_npath(parent, name).ok()?;
        let (key, attr) = *self.health.dirs.get(&path)?;
        if let Some(known) = self.inodes.peek(&key) {
            // Known under another name (renamed): not what this name leads to.
            let n = self.inodes.get(known)?;
            if n.parent != parent || *n.name != *name {
                return None;
            }
        }
        let ino = self
            .inodes
            .remember(key, super::object::Backing::ByPath, parent, name, true);
        Some(Attr { ino, ..attr })
    }

    /// Whether directory `ino` is stored on the local SSD, by the rules too: its listing
    /// has a local part that does not need Atlas.
    pub fn lists_locally(&self, ino: u64) -> bool {
        self.backend_of(ino) == Some(BackendKind::Local)
            && self
                .inodes
                .npath(ino)
                .is_some_and(|p| self.placement(&p).backend() == BackendKind::Local)
    }

    /// Whether `path` is missing on the local SSD (checked as root, local backend only):
    /// a transitional name missing there may have been promoted to Atlas.
    pub fn local_lacks<P: AsRef<OsStr> + ?Sized>(&self, path: &P) -> bool {
        let (dir, name) = super::object::split(path.as_ref());
        let Ok(cname) = cstring(name) else {
            return false;
        };
        let dir_fd = super::object::open_beneath(
            self.local.root_fd(),
            dir,
            libc::O_PATH | libc::O_DIRECTORY,
        );
        match dir_fd {
            Ok(fd) => {
                use std::os::fd::AsRawFd;
                fstatat(fd.as_raw_fd(), &cname).is_err()
            }
            Err(_) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formats_known_times() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn down_up_and_stalled() {
        let h = Health::new(Duration::from_secs(2));
        assert_eq!(h.hedge(), Duration::from_millis(500));
        assert!(!h.is_stalled());
        h.mark_stalled();
        assert!(h.is_stalled() && !h.is_down());
        h.mark_up();
        assert!(!h.is_stalled());
        h.mark_down("test");
        let r = h.report();
        assert!(!r.answering && r.down_since.is_some() && r.down_since_utc.is_some());
        h.log_outage_once("/docs/a", "/docs (line 3)");
        h.log_outage_once("/docs/a", "/docs (line 3)");
        assert_eq!(h.report().refused_requests, 2);
        assert_eq!(h.logged.len(), 1);
        h.mark_up();
        let r = h.report();
        assert!(r.answering && r.down_since.is_none() && !r.stalled);
        assert!(h.logged.is_empty());
    }

    #[test]
    fn hedge_is_bounded() {
        assert_eq!(
            Health::new(Duration::from_millis(40)).hedge(),
            Duration::from_millis(20)
        );
        assert_eq!(
            Health::new(Duration::from_secs(60)).hedge(),
            Duration::from_millis(500)
        );
    }
}
