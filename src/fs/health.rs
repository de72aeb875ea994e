//! Atlas health: is Atlas answering, since when not, and how fast.
//!
//! NFS hard mounts hang rather than fail. A probe thread stats the Atlas root every
//! `probe_interval` on a helper thread of its own and waits at most `timeout`; a
//! request on the Atlas lane that outlives `timeout` also marks Atlas down. While
//! Atlas is down, requests for Atlas paths fail at once with ETIMEDOUT (logged once
//! per outage and path) and never fall back to local SSD; local paths are unaffected.
//! When a probe answers again, service resumes without a remount.
//!
//! Between "slow" and "down" there is "stalled": a metadata request that local paths
//! depend on (the attributes of `/`, `/scans`, ... on the way to a local path, or
//! whether a transitional name was promoted) got no answer within [`Health::hedge`].
//! While Atlas is stalled or down, those requests are answered without Atlas: the
//! directories on the way to local paths from their last-known attributes
//! ([`Health::note_dir`]), transitional names from their local part only. The next
//! probe that answers clears it.

use std::ffi::OsStr;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use dashmap::{DashMap, DashSet};
use parking_lot::Mutex;
use tracing::{debug, info, warn};

use super::attr::{Attr, Kind};
use super::backend::{cstring, fstatat, split};
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
    dirs: DashMap<String, (BackingKey, Attr)>,
    pub timeout: Duration,
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
            timeout,
        }
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
        (self.timeout / 4).clamp(Duration::from_millis(20), Duration::from_millis(500))
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
            timeout_ms: self.timeout.as_millis() as u64,
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
    fn note_dir(&self, path: String, key: BackingKey, attr: &Attr) {
        if self.dirs.len() >= MAX_REMEMBERED_DIRS {
            self.dirs.clear();
        }
        self.dirs.insert(path, (key, *attr));
    }

    /// Start the probe thread for the Atlas root descriptor `root` (kept open by the caller).
    pub fn start_probe(self: &Arc<Self>, root: RawFd, interval: Duration) {
        let h = self.clone();
        let _ = thread::Builder::new()
            .name("atlas-probe".into())
            .spawn(move || h.probe_loop(root, interval));
    }

    fn probe_loop(&self, root: RawFd, interval: Duration) {
        type Probe = Option<(Duration, u64, u64)>;
        let (tx, rx) = mpsc::channel::<Probe>();
        let mut in_flight = false;
        loop {
            if !in_flight {
                let tx = tx.clone();
                in_flight = true;
                // The probe runs on its own thread: if Atlas hangs, only it hangs.
                let spawned = thread::Builder::new()
                    .name("atlas-probe-call".into())
                    .spawn(move || {
                        let t = Instant::now();
                        // SAFETY: zeroed statvfs is a valid out-parameter; root stays open.
                        let mut sv: libc::statvfs = unsafe { std::mem::zeroed() };
                        let ok = unsafe { libc::fstatvfs(root, &mut sv) } == 0;
                        let frsize = sv.f_frsize;
                        let _ =
                            tx.send(ok.then(|| {
                                (t.elapsed(), sv.f_bavail * frsize, sv.f_blocks * frsize)
                            }));
                    });
                if spawned.is_err() {
                    in_flight = false;
                }
            }
            match rx.recv_timeout(self.timeout) {
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
                    thread::sleep(interval);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.mark_down("no answer to statfs within the timeout");
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
    pub fn leads_to_local(&self, path: &str) -> bool {
        let live = self.live();
        live.rules.resolve(path).backend() == BackendKind::Atlas
            && live.rules.may_place_below(path, BackendKind::Local)
    }

    /// Note a directory entry handed to the kernel, if it is on the way to local paths.
    pub fn note_entry(&self, parent: u64, name: &OsStr, attr: &Attr) {
        if attr.kind != Kind::Dir {
            return;
        }
        let Ok(path) = self.child_path(parent, name) else {
            return;
        };
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
            self.inodes.path(ino),
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

    /// The last-known attributes of directory `ino`, for an outage.
    pub fn last_known_dir(&self, ino: u64) -> Option<Attr> {
        let path = self.inodes.path(ino)?;
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
        let path = self.child_path(parent, name).ok()?;
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
                .path(ino)
                .is_some_and(|p| self.placement(&p).backend() == BackendKind::Local)
    }

    /// Whether `path` is missing on the local SSD (checked as root, local backend only):
    /// a transitional name missing there may have been promoted to Atlas.
    pub fn local_lacks(&self, path: &str) -> bool {
        let (dir, name) = split(path);
        let Ok(cname) = cstring(OsStr::new(name)) else {
            return false;
        };
        match self.local.open_dir(dir) {
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
