//! One promotion job as the daemon tracks it: the request, its progress counters and
//! its outcome, and the progress JSON the control path returns.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::time::Instant;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::fs::{Creds, Ctx};

/// What `labfs promote` sends with `setxattr(PATH, "user.labfs.ctl.promote", JSON)`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Request {
    /// Job id chosen by the client: 8 to 64 characters of `[0-9a-zA-Z_-]`.
    pub id: String,
    /// A single name inside the directory the xattr call is made on; absent when the
    /// call is made on the object itself.
    #[serde(default)]
    pub name: Option<String>,
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
        }
    }

    fn from_u8(v: u8) -> Phase {
        const ALL: [Phase; 13] = [
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
    pub path: String,
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
    pub path: String,
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
    pub fn new(id: String, path: String, ctx: Ctx, creds: Creds, req: &Request) -> Job {
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
            path: self.path.clone(),
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
    pub fn covers(&self, path: &str) -> bool {
        covers(&self.path, path)
    }
}

/// Whether `path` is `top` or below it.
pub fn covers(top: &str, path: &str) -> bool {
    path == top
        || (path.starts_with(top) && (top == "/" || path.as_bytes().get(top.len()) == Some(&b'/')))
}
