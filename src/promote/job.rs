//! One promotion job as the daemon tracks it: the request, its progress counters and
//! its outcome, and the progress JSON the control path returns.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::time::Instant;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use crate::fs::{Creds, Ctx};

/// The hex of a path's bytes when they are not UTF-8 (for JSON readers that need
/// the exact name), else `None`.
pub fn hex_unless_utf8<P: AsRef<OsStr> + ?Sized>(p: &P) -> Option<String> {
    let b = p.as_ref().as_bytes();
    std::str::from_utf8(b)
        .is_err()
        .then(|| b.iter().map(|x| format!("{x:02x}")).collect())
}

/// What `labfs promote` sends with `setxattr(PATH, "user.labfs.ctl.promote", JSON)`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Request {
    /// Job id chosen by the client: 8 to 64 characters of `[0-9a-zA-Z_-]`.
    pub id: String,
    /// A single name inside the directory the xattr call is made on; absent when the
    /// call is made on the object itself.
    #[serde(default, with = "super::journal::bytes_opt")]
    pub name: Option<std::ffi::OsString>,
    #[serde(default)]
    pub merge: bool,
    #[serde(default)]
    pub wait: bool,
    /// Inode number the client saw for the object (sanity check), if known.
    #[serde(default)]
    pub ino: Option<u64>,
}

impl Request {
    pub fn valid_id(id: &str) -> bool {
        (8..=64).contains(&id.len())
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    }
}

/// Where a job is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Queued = 0,
    Planning,
    Waiting,
    Staging,
    Verifying,
    Committing,
    Cleaning,
    /// Terminal: promoted.
    Done,
    /// Terminal: it was promoted already; nothing done.
    AlreadyPromoted,
    /// Terminal: promoted, except local objects kept because they were open or
    /// changed during the promotion (they still shadow the promoted copies).
    Partial,
    /// Terminal: refused before anything was written to Atlas.
    Refused,
    /// Terminal: failed; rolled back (or, after commit, left for recovery).
    Failed,
    /// Terminal: the daemon is stopping; the journal lets the next mount finish it.
    Interrupted,
    /// Every byte is copied; waiting for Atlas to make it durable (syncfs), which
    /// takes seconds for large outputs (after Interrupted: the numbering stays).
    Flushing,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Queued => "queued",
            Phase::Planning => "planning",
            Phase::Waiting => "waiting",
            Phase::Staging => "staging",
            Phase::Verifying => "verifying",
            Phase::Committing => "committing",
            Phase::Cleaning => "cleaning",
            Phase::Done => "done",
            Phase::AlreadyPromoted => "already-promoted",
            Phase::Partial => "partial",
            Phase::Refused => "refused",
            Phase::Failed => "failed",
            Phase::Interrupted => "interrupted",
            Phase::Flushing => "flushing",
        }
    }

    fn from_u8(v: u8) -> Phase {
        const ALL: [Phase; 14] = [
            Phase::Queued,
            Phase::Planning,
            Phase::Waiting,
            Phase::Staging,
            Phase::Verifying,
            Phase::Committing,
            Phase::Cleaning,
            Phase::Done,
            Phase::AlreadyPromoted,
            Phase::Partial,
            Phase::Refused,
            Phase::Failed,
            Phase::Interrupted,
            Phase::Flushing,
        ];
        ALL.get(v as usize).copied().unwrap_or(Phase::Failed)
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Phase::Done
                | Phase::AlreadyPromoted
                | Phase::Partial
                | Phase::Refused
                | Phase::Failed
                | Phase::Interrupted
        )
    }

    /// Whether the job is moving data (shown as `promoting` on its paths).
    pub fn is_active(self) -> bool {
        !self.is_terminal()
    }
}

/// How a job ended, before it is turned into a terminal phase.
#[derive(Debug)]
pub enum JobError {
    /// Refused by a guard rail; nothing was written.
    Refused(String),
    /// Nothing to do: already promoted.
    Already(String),
    /// Committed, but some local objects were kept (open or changed meanwhile).
    Partial(String),
    /// Something failed.
    Failed(String),
    /// The daemon is stopping or the client cancelled.
    Stopped(String),
}

pub type JobResult<T> = std::result::Result<T, JobError>;

/// `Failed("<what>: <error>")` from a core error.
pub fn failed(what: impl std::fmt::Display) -> impl FnOnce(crate::error::Error) -> JobError {
    move |e| JobError::Failed(format!("{what}: {e}"))
}

pub struct Job {
    pub id: String,
    /// Namespace path of the promoted top (any bytes).
    pub path: std::ffi::OsString,
    pub ctx: Ctx,
    pub creds: Creds,
    pub merge: bool,
    pub wait: bool,
    pub expect_ino: Option<u64>,
    pub created: Instant,
    pub created_unix: i64,
    phase: AtomicU8,
    pub files_total: AtomicU64,
    pub files_done: AtomicU64,
    pub bytes_total: AtomicU64,
    pub bytes_done: AtomicU64,
    pub cancel: AtomicBool,
    /// Not logged: its user exceeded the request log budget ([`REQUEST_LOG_BURST`]);
    /// a refusal or failure of this job is reported to the client only.
    pub quiet: AtomicBool,
    /// Some object's tags could not be set as xattrs while staging (store mode, or
    /// a file the filesystem refused them for): the commit then writes store records
    /// for every object, not only for symlinks (which never carry user xattrs).
    pub tags_in_store: AtomicBool,
    copy_started: Mutex<Option<Instant>>,
    finished: Mutex<Option<Instant>>,
    message: Mutex<Option<String>>,
    error: Mutex<Option<String>>,
    warnings: Mutex<Vec<String>>,
}

/// The progress JSON of `getxattr(PATH, "user.labfs.ctl.promote.<id>")`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Progress {
    pub id: String,
    /// The namespace path, bytes that are not UTF-8 shown as `\\xNN`.
    pub path: String,
    /// The path's bytes in hex, only when it is not UTF-8 (`path` is then for reading).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_hex: Option<String>,
    pub state: String,
    pub done: bool,
    pub files_total: u64,
    pub files_done: u64,
    pub bytes_total: u64,
    pub bytes_done: u64,
    pub rate_bytes_per_sec: u64,
    pub elapsed_secs: f64,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub warnings: Vec<String>,
}

impl Job {
    pub fn new(id: String, path: std::ffi::OsString, ctx: Ctx, creds: Creds, req: &Request) -> Job {
        Job {
            id,
            path,
            ctx,
            creds,
            merge: req.merge,
            wait: req.wait,
            expect_ino: req.ino,
            created: Instant::now(),
            created_unix: super::util::now_secs(),
            phase: AtomicU8::new(Phase::Queued as u8),
            files_total: AtomicU64::new(0),
            files_done: AtomicU64::new(0),
            bytes_total: AtomicU64::new(0),
            bytes_done: AtomicU64::new(0),
            cancel: AtomicBool::new(false),
            quiet: AtomicBool::new(false),
            tags_in_store: AtomicBool::new(false),
            copy_started: Mutex::new(None),
            finished: Mutex::new(None),
            message: Mutex::new(None),
            error: Mutex::new(None),
            warnings: Mutex::new(Vec::new()),
        }
    }

    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Acquire))
    }

    pub fn set_phase(&self, p: Phase) {
        if p == Phase::Staging {
            let mut s = self.copy_started.lock();
            if s.is_none() {
                *s = Some(Instant::now());
            }
        }
        if p.is_terminal() {
            *self.finished.lock() = Some(Instant::now());
        }
        self.phase.store(p as u8, Ordering::Release);
    }

    pub fn set_message(&self, m: impl Into<String>) {
        *self.message.lock() = Some(m.into());
    }

    pub fn set_error(&self, m: impl Into<String>) {
        *self.error.lock() = Some(m.into());
    }

    pub fn warn(&self, m: impl Into<String>) {
        let mut w = self.warnings.lock();
        if w.len() < 100 {
            w.push(m.into());
        }
    }

    pub fn warnings(&self) -> Vec<String> {
        self.warnings.lock().clone()
    }

    /// Seconds since the job ended, if it has.
    pub fn finished_for(&self) -> Option<std::time::Duration> {
        self.finished.lock().map(|t| t.elapsed())
    }

    pub fn progress(&self) -> Progress {
        let phase = self.phase();
        let bytes_done = self.bytes_done.load(Ordering::Relaxed);
        let end = self.finished.lock().unwrap_or_else(Instant::now);
        let copy_secs = self
            .copy_started
            .lock()
            .map(|s| end.saturating_duration_since(s).as_secs_f64())
            .unwrap_or(0.0);
        let rate = if copy_secs > 0.0 {
            (bytes_done as f64 / copy_secs) as u64
        } else {
            0
        };
        Progress {
            id: self.id.clone(),
            path: super::util::show(&self.path),
            path_hex: hex_unless_utf8(&self.path),
            state: phase.as_str().to_string(),
            done: phase.is_terminal(),
            files_total: self.files_total.load(Ordering::Relaxed),
            files_done: self.files_done.load(Ordering::Relaxed),
            bytes_total: self.bytes_total.load(Ordering::Relaxed),
            bytes_done,
            rate_bytes_per_sec: rate,
            elapsed_secs: end.saturating_duration_since(self.created).as_secs_f64(),
            message: self.message.lock().clone(),
            error: self.error.lock().clone(),
            warnings: self.warnings(),
        }
    }

    /// Whether `path` is this job's path or below it.
    pub fn covers<P: AsRef<OsStr> + ?Sized>(&self, path: &P) -> bool {
        covers(&self.path, path)
    }
}

/// Whether `path` is `top` or below it.
pub fn covers<T: AsRef<OsStr> + ?Sized, P: AsRef<OsStr> + ?Sized>(top: &T, path: &P) -> bool {
    let (top, path) = (top.as_ref().as_bytes(), path.as_ref().as_bytes());
    path == top || (path.starts_with(top) && (top == b"/" || path.get(top.len()) == Some(&b'/')))
}

/// Promotions one user may have in flight (queued or running) at once; the next is
/// refused with EBUSY until one ends (not EAGAIN: the kernel hands a FUSE setxattr's
/// EAGAIN to the caller as EOPNOTSUPP, which read as "not on a labfs mount").
pub const MAX_ACTIVE_PER_UID: usize = 8;
/// Finished jobs kept queryable per user: beyond this the user's oldest finished job
/// is forgotten (never another user's, and never a running one).
pub const MAX_KEPT_PER_UID: usize = 64;
/// Jobs (running or finished) of all users; when full, the oldest finished job of the
/// user who keeps the most is forgotten.
pub const MAX_JOBS: usize = 4096;
/// Repeated refusals of one user are logged at most once per this interval.
pub const REFUSAL_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// Why a new job was not admitted.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    /// The user has [`MAX_ACTIVE_PER_UID`] promotions in flight.
    UserBusy { active: usize },
    /// Every remembered job is running (nothing finished to forget).
    TableFull,
}

/// Make room for one more job of `uid` in `jobs`: forget the user's oldest finished
/// jobs beyond [`MAX_KEPT_PER_UID`] and, when the table is full, the oldest finished
/// job of the user keeping the most; refuse when `uid` has too many in flight.
pub fn admit(
    jobs: &mut std::collections::HashMap<String, std::sync::Arc<Job>>,
    uid: u32,
) -> std::result::Result<(), Admission> {
    let active = jobs
        .values()
        .filter(|j| j.ctx.uid == uid && j.phase().is_active())
        .count();
    if active >= MAX_ACTIVE_PER_UID {
        return Err(Admission::UserBusy { active });
    }
    let oldest_finished = |jobs: &std::collections::HashMap<String, std::sync::Arc<Job>>,
                           of: u32|
     -> Option<String> {
        jobs.values()
            .filter(|j| j.ctx.uid == of && !j.phase().is_active())
            .min_by_key(|j| j.created)
            .map(|j| j.id.clone())
    };
    loop {
        let kept = jobs
            .values()
            .filter(|j| j.ctx.uid == uid && !j.phase().is_active())
            .count();
        if kept < MAX_KEPT_PER_UID {
            break;
        }
        match oldest_finished(jobs, uid) {
            Some(id) => jobs.remove(&id),
            None => break,
        };
    }
    while jobs.len() >= MAX_JOBS {
        let mut per_uid: std::collections::HashMap<u32, usize> = std::collections::HashMap::new();
        for j in jobs.values().filter(|j| !j.phase().is_active()) {
            *per_uid.entry(j.ctx.uid).or_default() += 1;
        }
        let Some((&most, _)) = per_uid.iter().max_by_key(|(_, n)| **n) else {
            return Err(Admission::TableFull);
        };
        match oldest_finished(jobs, most) {
            Some(id) => jobs.remove(&id),
            None => return Err(Admission::TableFull),
        };
    }
    Ok(())
}

/// Promotion requests of one user logged per [`REFUSAL_LOG_INTERVAL`]; beyond, they
/// are counted and the count logged with the next line.
pub const REQUEST_LOG_BURST: u64 = 20;

/// Rate limit for log lines one user can cause, by uid: at most `burst` lines per
/// [`REFUSAL_LOG_INTERVAL`]. [`RateLog::allow`] is `Some(n)` when a line may be
/// written now, `n` being how many were suppressed since the last one.
pub struct RateLog {
    burst: u64,
    last: Mutex<std::collections::HashMap<u32, (Instant, u64, u64)>>,
}

impl RateLog {
    pub fn new(burst: u64) -> RateLog {
        RateLog {
            burst: burst.max(1),
            last: Mutex::new(std::collections::HashMap::new()),
        }
    }

    pub fn allow(&self, uid: u32) -> Option<u64> {
        let mut m = self.last.lock();
        if m.len() > 4096 {
            m.retain(|_, (t, _, _)| t.elapsed() < REFUSAL_LOG_INTERVAL);
        }
        let (start, used, suppressed) = m.entry(uid).or_insert((Instant::now(), 0, 0));
        if start.elapsed() >= REFUSAL_LOG_INTERVAL {
            *start = Instant::now();
            *used = 0;
        }
        if *used >= self.burst {
            *suppressed += 1;
            return None;
        }
        *used += 1;
        Some(std::mem::take(suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Arc;

    #[test]
    fn flushing_is_a_state_of_its_own_and_still_promoting() {
        let j = job("f", 0, Phase::Staging);
        j.set_phase(Phase::Flushing);
        assert_eq!(j.phase(), Phase::Flushing);
        assert_eq!(j.phase().as_str(), "flushing");
        assert!(j.phase().is_active());
        assert_eq!(j.progress().state, "flushing");
    }

    fn job(id: &str, uid: u32, phase: Phase) -> Arc<Job> {
        let ctx = Ctx {
            uid,
            gid: uid,
            pid: 1,
        };
        let req = Request {
            id: id.into(),
            name: None,
            merge: false,
            wait: false,
            ino: None,
        };
        let j = Job::new(id.into(), "/x".into(), ctx, Creds::root(), &req);
        j.set_phase(phase);
        Arc::new(j)
    }

    #[test]
    fn one_users_jobs_never_block_another() {
        let mut jobs = HashMap::new();
        for i in 0..MAX_ACTIVE_PER_UID {
            let id = format!("busy-{i:04}");
            jobs.insert(id.clone(), job(&id, 1000, Phase::Staging));
        }
        assert_eq!(
            admit(&mut jobs, 1000),
            Err(Admission::UserBusy {
                active: MAX_ACTIVE_PER_UID
            })
        );
        assert_eq!(admit(&mut jobs, 0), Ok(()));
        // Finished jobs of 1001 beyond its share are forgotten, oldest first.
        for i in 0..MAX_KEPT_PER_UID + 10 {
            let id = format!("done-{i:04}");
            assert_eq!(admit(&mut jobs, 1001), Ok(()));
            jobs.insert(id.clone(), job(&id, 1001, Phase::Failed));
        }
        let kept = jobs.values().filter(|j| j.ctx.uid == 1001).count();
        assert_eq!(kept, MAX_KEPT_PER_UID);
        assert!(!jobs.contains_key("done-0000") && jobs.contains_key("done-0073"));
        assert_eq!(
            jobs.values().filter(|j| j.ctx.uid == 1000).count(),
            MAX_ACTIVE_PER_UID
        );
    }

    #[test]
    fn repeated_refusals_are_logged_once_per_interval() {
        let l = RateLog::new(1);
        assert_eq!(l.allow(7), Some(0));
        assert_eq!(l.allow(7), None);
        assert_eq!(l.allow(7), None);
        assert_eq!(l.allow(8), Some(0));
    }
}
