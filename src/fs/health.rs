//! Atlas health: is Atlas answering, since when not, and how fast.
//!
//! NFS hard mounts hang rather than fail. A probe thread stats the Atlas root every
//! `probe_interval` on a helper thread of its own and waits at most `timeout`; a
//! request on the Atlas lane that outlives `timeout` also marks Atlas down. While
//! Atlas is down, requests for Atlas paths fail at once with ETIMEDOUT (logged once
//! per outage and path) and never fall back to local SSD; local paths are unaffected.
//! When a probe answers again, service resumes without a remount.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use dashmap::DashSet;
use parking_lot::Mutex;
use tracing::{info, warn};

pub struct Health {
    down: AtomicBool,
    down_since: Mutex<Option<SystemTime>>,
    reason: Mutex<String>,
    logged: DashSet<String>,
    /// Latency of the last probe, microseconds.
    last_latency_us: AtomicU64,
    last_ok: Mutex<Option<SystemTime>>,
    pub timeout: Duration,
}

/// A snapshot for `labfs status`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct HealthReport {
    pub answering: bool,
    pub down_since: Option<u64>,
    pub reason: String,
    pub last_probe_latency_ms: f64,
    pub last_ok: Option<u64>,
}

fn epoch(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Health {
    pub fn new(timeout: Duration) -> Health {
        Health {
            down: AtomicBool::new(false),
            down_since: Mutex::new(None),
            reason: Mutex::new(String::new()),
            logged: DashSet::new(),
            last_latency_us: AtomicU64::new(0),
            last_ok: Mutex::new(None),
            timeout,
        }
    }

    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Acquire)
    }

    pub fn mark_down(&self, reason: &str) {
        if !self.down.swap(true, Ordering::AcqRel) {
            *self.down_since.lock() = Some(SystemTime::now());
            *self.reason.lock() = reason.to_string();
            warn!("Atlas is not answering ({reason}): Atlas paths fail with ETIMEDOUT until it does; local paths keep working");
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
            info!("Atlas is answering again after {secs:.1}s; service resumed");
        }
    }

    /// One log line per outage and path.
    pub fn log_outage_once(&self, path: &str, rule: &str) {
        if self.logged.len() < 10_000 && self.logged.insert(path.to_string()) {
            warn!("{path}: refused while Atlas is not answering (rule {rule})");
        }
    }

    pub fn report(&self) -> HealthReport {
        HealthReport {
            answering: !self.is_down(),
            down_since: self.down_since.lock().map(epoch),
            reason: self.reason.lock().clone(),
            last_probe_latency_ms: self.last_latency_us.load(Ordering::Relaxed) as f64 / 1000.0,
            last_ok: self.last_ok.lock().map(epoch),
        }
    }

    /// Start the probe thread for the Atlas root descriptor `root` (kept open by the caller).
    pub fn start_probe(self: &Arc<Self>, root: RawFd, interval: Duration) {
        let h = self.clone();
        let _ = thread::Builder::new()
            .name("atlas-probe".into())
            .spawn(move || h.probe_loop(root, interval));
    }

    fn probe_loop(&self, root: RawFd, interval: Duration) {
        let (tx, rx) = mpsc::channel::<Duration>();
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
                        let _ = tx.send(if ok { t.elapsed() } else { Duration::MAX });
                    });
                if spawned.is_err() {
                    in_flight = false;
                }
            }
            match rx.recv_timeout(self.timeout) {
                Ok(d) => {
                    in_flight = false;
                    if d == Duration::MAX {
                        self.mark_down("statfs of the Atlas root failed");
                    } else {
                        self.last_latency_us
                            .store(d.as_micros() as u64, Ordering::Relaxed);
                        self.mark_up();
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
