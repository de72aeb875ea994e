//! Dispatch lanes: local requests inline, Atlas requests on a growing pool with a
//! watchdog that answers ETIMEDOUT (see the module documentation of `fuse`).
//!
//! Lanes by construction: the lane is chosen from the backend the request will touch
//! before any backend call: an inode's backend as last seen, a handle's own backend,
//! and Atlas whenever that is unknown (a forgotten inode, an unlinked-but-open Atlas
//! file, a parent not known on the local SSD whose template lives on Atlas). Control
//! requests (`user.labfs.ctl.*`) have a lane of their own ([`ControlLane`]).
//!
//! Outage detection: the watchdog times each Atlas request's backend call with a
//! [`CallClock`]: only time the call spent waiting for Atlas counts (not time queued
//! for a lane thread, running, or waiting for a CPU). A call that waited the timeout
//! marks Atlas down; a request not answered within timeout + margin is answered
//! ETIMEDOUT anyway, counted as the node being busy, and Atlas stays up.

use super::*;
use crate::fs::health::CallClock;

/// A reply that can carry an error.
pub(super) trait Fail: Send + 'static {
    fn fail(self, e: Errno);
}

macro_rules! fail_impl {
    ($($t:ty),*) => { $(impl Fail for $t { fn fail(self, e: Errno) { self.error(e) } })* };
}
fail_impl!(
    ReplyAttr,
    ReplyCreate,
    ReplyData,
    ReplyDirectory,
    ReplyDirectoryPlus,
    ReplyEmpty,
    ReplyEntry,
    ReplyIoctl,
    ReplyLseek,
    ReplyOpen,
    ReplyStatfs,
    ReplyWrite,
    ReplyXattr
);

/// Log a failed request at its errno's level.
pub(super) fn log_failure(op: &'static str, e: &Error) {
    let errno = e.errno();
    if matches!(e, Error::AtlasUnavailable { .. }) {
        // Logged once per outage and path by the core (Health::log_outage_once).
        debug!(op, errno, "{e}");
        return;
    }
    match e.level() {
        Level::ERROR => error!(op, errno, "{e}"),
        Level::WARN => warn!(op, errno, "{e}"),
        Level::INFO if !e.is_refusal() => info!(op, errno, "{e}"),
        Level::INFO => debug!(op, errno, "{e}"), // refusals were logged once by the core
        Level::DEBUG => debug!(op, errno, "{e}"),
        _ => trace!(op, errno, "{e}"),
    }
}

/// What a hedged request answers when Atlas does not (see [`LabFuse::run_hedged`]):
/// called with the core on the thread that stops waiting; must not touch Atlas.
pub(super) type Fallback<R> = Box<dyn FnOnce(&LabFs, R) + Send>;

/// When a fallback answers instead of Atlas.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum When {
    /// After the hedge, or at once while Atlas is stalled: for answers that are true
    /// without Atlas (last-known attributes of the directories on the way to local
    /// paths, the local part of a listing).
    Hedge,
    /// Only while Atlas is known down; until then the request waits for Atlas like
    /// any other (a guess such as "absent" must not be made because Atlas is slow).
    Down,
}

/// A fallback and when it applies.
pub(super) struct Answer<R> {
    pub(super) f: Fallback<R>,
    pub(super) when: When,
}

impl<R> Answer<R> {
    pub(super) fn hedge(f: Fallback<R>) -> Answer<R> {
        Answer {
            f,
            when: When::Hedge,
        }
    }
}

pub(super) trait Expire: Send + Sync {
    /// Answer without Atlas if it is time (and nobody has answered yet); true when the
    /// slot is finished with (answered by anyone).
    fn check(&self, fs: &LabFs, now: Instant) -> bool;
}

pub(super) struct Slot<R: Fail> {
    pub(super) op: &'static str,
    pub(super) reply: Mutex<Option<R>>,
    pub(super) fallback: Mutex<Option<Fallback<R>>>,
    pub(super) queued: Instant,
    /// Set (hedged requests) when the fallback answers after the hedge.
    pub(super) hedge_at: Option<Instant>,
    /// The clock of the backend call, once a lane thread runs it.
    pub(super) call: Mutex<Option<CallClock>>,
}

impl<R: Fail> Slot<R> {
    pub(super) fn answer_without_atlas(&self, fs: &LabFs, reply: R) {
        let fallback = self.fallback.lock().take();
        match fallback {
            Some(f) => {
                // The fallback must not wait for Atlas either (opendir skips its part).
                fs.health.mark_stalled();
                f(fs, reply)
            }
            None => reply.fail(Errno::from_i32(libc::ETIMEDOUT)),
        }
    }
}

impl<R: Fail> Expire for Slot<R> {
    fn check(&self, fs: &LabFs, now: Instant) -> bool {
        let timeout = fs.health.timeout();
        if self.reply.lock().is_none() {
            return true;
        }
        let call = *self.call.lock();
        let (waited, busy) = call
            .map(|c| c.split())
            .unwrap_or((Duration::ZERO, Duration::ZERO));
        let queued_for = now.saturating_duration_since(self.queued);
        let atlas_late = call.is_some() && waited >= timeout;
        let hedge_due = self.hedge_at.is_some_and(|t| now >= t);
        let bound_due = queued_for >= timeout + fs.health.margin();
        if !(atlas_late || hedge_due || bound_due) {
            return false;
        }
        let Some(r) = self.reply.lock().take() else {
            return true;
        };
        if atlas_late {
            fs.health.note_backend_timeout(waited);
            if self.hedge_at.is_none() {
                fs.health.mark_down(&format!(
                    "a {} call waited {:.1}s for Atlas (timeout {timeout:?}; not counting {:.1}s running or waiting for a CPU)",
                    self.op,
                    waited.as_secs_f64(),
                    busy.as_secs_f64()
                ));
            }
        } else if bound_due && !hedge_due {
            fs.health
                .note_busy_timeout(self.op, waited, queued_for.saturating_sub(waited));
        }
        self.answer_without_atlas(fs, r);
        true
    }
}

pub(super) type Job = Box<dyn FnOnce() + Send>;

/// Threads the Atlas lane keeps, and how many it may grow to while Atlas calls hang
/// (each hung NFS call holds a thread until the server answers; requests refused at
/// once while Atlas is down still need a free thread to be refused promptly).
pub(super) const ATLAS_WORKERS_MAX: usize = 256;
/// Requests on an open file's descriptor: refused at once while Atlas is down (they
/// have no path to check and would only hang).
pub(super) const OPEN_FILE_OPS: [&str; 7] = [
    "read",
    "write",
    "flush",
    "fsync",
    "fallocate",
    "lseek",
    "copy_file_range",
];
/// A thread beyond [`ATLAS_WORKERS`] that has been idle this long exits.
pub(super) const ATLAS_IDLE_EXIT: Duration = Duration::from_secs(30);

#[derive(Default)]
pub(super) struct Queue {
    pub(super) jobs: VecDeque<Job>,
    pub(super) idle: usize,
    pub(super) threads: usize,
}

/// The Atlas lane's threads: a queue that grows a thread whenever no idle one is left.
#[derive(Default)]
pub(super) struct Pool {
    pub(super) q: Mutex<Queue>,
    pub(super) cv: Condvar,
}

impl Pool {
    pub(super) fn push(self: &Arc<Self>, job: Job) {
        let mut q = self.q.lock();
        q.jobs.push_back(job);
        let grow = q.jobs.len() > q.idle && q.threads < ATLAS_WORKERS_MAX;
        if grow {
            q.threads += 1;
        }
        let n = q.threads;
        drop(q);
        if grow && self.spawn_worker(n).is_err() {
            self.q.lock().threads -= 1;
        }
        self.cv.notify_one();
    }

    pub(super) fn spawn_worker(self: &Arc<Self>, n: usize) -> std::io::Result<()> {
        let pool = self.clone();
        thread::Builder::new()
            .name(format!("atlas-{n}"))
            .spawn(move || pool.work())
            .map(|_| ())
    }

    pub(super) fn work(&self) {
        loop {
            let job = {
                let mut q = self.q.lock();
                loop {
                    if let Some(job) = q.jobs.pop_front() {
                        break job;
                    }
                    q.idle += 1;
                    let timed_out = self.cv.wait_for(&mut q, ATLAS_IDLE_EXIT).timed_out();
                    q.idle -= 1;
                    if timed_out && q.jobs.is_empty() && q.threads > ATLAS_WORKERS {
                        q.threads -= 1;
                        return;
                    }
                }
            };
            job();
        }
    }
}

/// The Atlas lane: workers plus a watchdog.
pub(super) struct AtlasLane {
    pub(super) pool: Arc<Pool>,
    pub(super) inflight: Arc<Mutex<Vec<Weak<dyn Expire>>>>,
}

impl AtlasLane {
    /// Run a job with nobody waiting for it.
    pub(super) fn spawn(&self, job: Job) {
        self.pool.push(job);
    }

    pub(super) fn start(fs: Arc<LabFs>) -> AtlasLane {
        let pool = Arc::new(Pool::default());
        pool.q.lock().threads = ATLAS_WORKERS;
        for i in 0..ATLAS_WORKERS {
            if pool.spawn_worker(i).is_err() {
                pool.q.lock().threads -= 1;
            }
        }
        let inflight: Arc<Mutex<Vec<Weak<dyn Expire>>>> = Arc::new(Mutex::new(Vec::new()));
        let watch = inflight.clone();
        let weak_fs = Arc::downgrade(&fs);
        let _ = thread::Builder::new()
            .name("atlas-watchdog".into())
            .spawn(move || loop {
                let tick = weak_fs.upgrade().map_or(Duration::from_millis(100), |fs| {
                    (fs.health.hedge() / 5)
                        .clamp(Duration::from_millis(10), Duration::from_millis(100))
                });
                thread::sleep(tick);
                let Some(fs) = weak_fs.upgrade() else {
                    return;
                };
                let now = Instant::now();
                let slots: Vec<Arc<dyn Expire>> = {
                    let mut w = watch.lock();
                    w.retain(|s| s.strong_count() > 0);
                    w.iter().filter_map(Weak::upgrade).collect()
                };
                let done: Vec<*const ()> = slots
                    .iter()
                    .filter(|s| s.check(&fs, now))
                    .map(|s| Arc::as_ptr(s) as *const ())
                    .collect();
                if !done.is_empty() {
                    watch
                        .lock()
                        .retain(|w| !done.contains(&(w.as_ptr() as *const ())));
                }
            });
        AtlasLane { pool, inflight }
    }
}

/// The lane of control requests (`user.labfs.ctl.*`): one thread, so whatever a
/// control request costs (`ctl.status` walks the SSD, `ctl.explain` may stat Atlas),
/// it never runs on the threads that serve local paths and at most one runs at once;
/// requests queue behind it, at most [`CONTROL_QUEUE`] (then EBUSY).
pub(super) struct ControlLane {
    tx: std::sync::mpsc::SyncSender<Job>,
}

/// Control requests waiting for the control lane before new ones are refused.
pub(super) const CONTROL_QUEUE: usize = 64;

impl ControlLane {
    pub(super) fn start() -> ControlLane {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(CONTROL_QUEUE);
        let _ = thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job();
                }
            });
        ControlLane { tx }
    }

    /// Queue `job`; gives it back when the queue is full.
    pub(super) fn push(&self, job: Job) -> std::result::Result<(), Job> {
        self.tx.try_send(job).map_err(|e| match e {
            std::sync::mpsc::TrySendError::Full(j)
            | std::sync::mpsc::TrySendError::Disconnected(j) => j,
        })
    }
}

impl LabFuse {
    /// The lane of a request on inode `ino`: its backend as last seen; Atlas when
    /// unknown (never inline on a guess).
    pub(super) fn lane_ino(&self, ino: INodeNo) -> BackendKind {
        self.fs.backend_of(ino.0).unwrap_or(BackendKind::Atlas)
    }

    /// The lane of a request on open file `fh` (of inode `ino`): the handle's own
    /// backend (an Atlas file unlinked while open, or promoted since it was opened,
    /// keeps the backend its descriptor is on); Atlas when the handle is unknown.
    pub(super) fn lane_fh(&self, ino: INodeNo, fh: FileHandle) -> BackendKind {
        match self.fs.handles.file(fh.0) {
            Some(h) => h.backend,
            None => {
                let _ = ino;
                BackendKind::Atlas
            }
        }
    }

    pub(super) fn lane_dir(&self, ino: INodeNo) -> BackendKind {
        if self.fs.dir_is_local_only(ino.0) {
            BackendKind::Local
        } else {
            BackendKind::Atlas
        }
    }

    /// The lane of a lookup, and its answer for when Atlas does not answer: the
    /// directories on the way to local paths answer from their last-known entry; a
    /// transitional name that is not on the local SSD (it may have been promoted) asks
    /// Atlas on the Atlas lane. If this daemon has seen that name on Atlas it waits
    /// for Atlas (ETIMEDOUT while Atlas is down), never "absent"; a name never seen
    /// there reads as absent once Atlas has not answered within the hedge, so work in
    /// the local transitional directories goes on during an outage.
    pub(super) fn lookup_lane(
        &self,
        parent: INodeNo,
        name: &OsStr,
    ) -> (BackendKind, Option<Answer<ReplyEntry>>) {
        let Ok(path) = self.fs.child_npath(parent.0, name) else {
            return (BackendKind::Atlas, None);
        };
        let p = self.fs.placement(&path);
        let lane = p.backend();
        let rules = self.fs.live().rules.clone();
        if lane == BackendKind::Atlas && rules.may_place_below(&path, BackendKind::Local) {
            let n = name.to_os_string();
            let f: Fallback<ReplyEntry> = Box::new(move |fs: &LabFs, reply: ReplyEntry| {
                match fs.last_known_entry(parent.0, &n) {
                    Some(a) => {
                        reply.entry(&fs.ttl(BackendKind::Atlas), &file_attr(&a), Generation(0))
                    }
                    None => {
                        debug!(parent = parent.0, name = ?n, "lookup: Atlas not answering and no last-known entry");
                        reply.error(Errno::from_i32(libc::ETIMEDOUT))
                    }
                }
            });
            return (lane, Some(Answer::hedge(f)));
        }
        if p.class == Class::Transitional
            && lane == BackendKind::Local
            && self.fs.local_lacks(&path)
        {
            if self.fs.known_on_atlas(parent.0, name) {
                // Seen on Atlas (promoted): waits for Atlas like any Atlas request,
                // ETIMEDOUT at once while Atlas is known down.
                let f: Fallback<ReplyEntry> = Box::new(|_: &LabFs, reply: ReplyEntry| {
                    reply.error(Errno::from_i32(libc::ETIMEDOUT))
                });
                return (
                    BackendKind::Atlas,
                    Some(Answer {
                        f,
                        when: When::Down,
                    }),
                );
            }
            let n = name.to_os_string();
            let f: Fallback<ReplyEntry> = Box::new(move |fs: &LabFs, reply: ReplyEntry| {
                if fs.known_on_atlas(parent.0, &n) {
                    reply.error(Errno::from_i32(libc::ETIMEDOUT))
                } else {
                    reply.error(Errno::ENOENT)
                }
            });
            return (BackendKind::Atlas, Some(Answer::hedge(f)));
        }
        (lane, None)
    }

    /// The lane of a request that creates, removes or renames `parent/name`: local
    /// only when the name is placed on the local SSD and its parent is known there
    /// (else the core may look up the parent, or a template for it, on Atlas).
    pub(super) fn lane_child(&self, parent: INodeNo, name: &OsStr) -> BackendKind {
        match self.fs.backend_of_child(parent.0, name) {
            Some(BackendKind::Local)
                if self.fs.backend_of(parent.0) == Some(BackendKind::Local) =>
            {
                BackendKind::Local
            }
            _ => BackendKind::Atlas,
        }
    }

    /// Run `work` on the lane of `backend` and answer with `ok` or the error.
    pub(super) fn run<R: Fail, T: Send + 'static>(
        &self,
        backend: BackendKind,
        op: &'static str,
        reply: R,
        work: impl FnOnce(&LabFs) -> Result<T> + Send + 'static,
        ok: impl FnOnce(R, T) + Send + 'static,
    ) {
        self.run_hedged(backend, op, reply, work, ok, None, |_, _| {});
    }

    /// Run a control request on the control lane ([`ControlLane`]); EBUSY when its
    /// queue is full.
    pub(super) fn run_control<R: Fail, T: Send + 'static>(
        &self,
        op: &'static str,
        reply: R,
        work: impl FnOnce(&LabFs) -> Result<T> + Send + 'static,
        ok: impl FnOnce(R, T) + Send + 'static,
    ) {
        let fs = self.fs.clone();
        let slot = Arc::new(Mutex::new(Some(reply)));
        let mine = slot.clone();
        let job: Job = Box::new(move || {
            let Some(reply) = mine.lock().take() else {
                return;
            };
            match work(&fs) {
                Ok(t) => ok(reply, t),
                Err(e) => {
                    log_failure(op, &e);
                    reply.fail(Errno::from_i32(e.errno()));
                }
            }
        });
        if self.control.push(job).is_err() {
            if let Some(reply) = slot.lock().take() {
                reply.fail(Errno::from_i32(libc::EBUSY));
            }
        }
    }

    /// As [`LabFuse::run`], with an answer for when Atlas does not answer.
    ///
    /// With a `fallback` of [`When::Hedge`] (a request that local paths depend on:
    /// the attributes of a directory on the way to them), an Atlas request waits for
    /// Atlas at most the hedge, and not at all while Atlas is stalled or down; it is
    /// then answered by the fallback instead of ETIMEDOUT. A [`When::Down`] fallback
    /// answers only while Atlas is known down; otherwise the request waits like any.
    /// `late` undoes what `work` did when it finishes after the request was answered
    /// without it (a lookup count, an open handle): its result is never delivered.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn run_hedged<R: Fail, T: Send + 'static>(
        &self,
        backend: BackendKind,
        op: &'static str,
        reply: R,
        work: impl FnOnce(&LabFs) -> Result<T> + Send + 'static,
        ok: impl FnOnce(R, T) + Send + 'static,
        fallback: Option<Answer<R>>,
        late: impl FnOnce(&LabFs, T) + Send + 'static,
    ) {
        let work = crate::stats::timed(backend, work);
        let mut fallback = fallback;
        if backend == BackendKind::Atlas {
            if OPEN_FILE_OPS.contains(&op) && self.fs.health.is_down() {
                // A call on the descriptor of an open Atlas file would hang with Atlas.
                self.fs.health.refuse_open_file(op);
                reply.fail(Errno::from_i32(libc::ETIMEDOUT));
                return;
            }
            match fallback {
                Some(a) if a.when == When::Hedge && self.fs.health.is_stalled() => {
                    (a.f)(&self.fs, reply);
                    return;
                }
                Some(a) if a.when == When::Down && self.fs.health.is_down() => {
                    (a.f)(&self.fs, reply);
                    return;
                }
                other => fallback = other,
            }
        }
        // Local requests run on the event loop; so do Atlas ones where Atlas is a
        // local filesystem (no server to wait for: no hand-off to a lane thread and no
        // watchdog; AtlasMetadataMode in src/fs/atlas_io.rs).
        if backend == BackendKind::Local || self.fs.atlas_inline() {
            match work(&self.fs) {
                Ok(t) => ok(reply, t),
                Err(e) if e.errno() == libc::ETIMEDOUT && fallback.is_some() => {
                    // Refused because Atlas is down: the fallback answers.
                    if let Some(a) = fallback {
                        (a.f)(&self.fs, reply);
                    }
                }
                Err(e) => {
                    log_failure(op, &e);
                    reply.fail(Errno::from_i32(e.errno()));
                }
            }
            return;
        }
        let (fallback, hedged) = match fallback {
            Some(a) => {
                let hedged = a.when == When::Hedge;
                (Some(a.f), hedged)
            }
            None => (None, false),
        };
        let now = Instant::now();
        let slot = Arc::new(Slot {
            op,
            reply: Mutex::new(Some(reply)),
            fallback: Mutex::new(fallback),
            queued: now,
            hedge_at: hedged.then(|| now + self.fs.health.hedge()),
            call: Mutex::new(None),
        });
        let weak: Weak<dyn Expire> = Arc::downgrade(&slot) as Weak<dyn Expire>;
        self.atlas.inflight.lock().push(weak);
        let fs = self.fs.clone();
        let job: Job = Box::new(move || {
            if slot.reply.lock().is_none() {
                return; // answered while queued: do not act late
            }
            let clock = CallClock::start();
            *slot.call.lock() = Some(clock);
            let res = work(&fs);
            let (waited, busy) = clock.split();
            fs.health.note_call(waited, busy);
            let Some(reply) = slot.reply.lock().take() else {
                if let Ok(t) = res {
                    late(&fs, t);
                }
                return;
            };
            match res {
                Ok(t) => ok(reply, t),
                Err(e)
                    if e.errno() == libc::ETIMEDOUT
                        && slot.fallback.lock().is_some()
                        && (slot.hedge_at.is_some() || fs.health.is_down()) =>
                {
                    // Refused because Atlas is down: the fallback answers.
                    slot.answer_without_atlas(&fs, reply);
                }
                Err(e) => {
                    log_failure(op, &e);
                    reply.fail(Errno::from_i32(e.errno()));
                }
            }
        });
        self.atlas.pool.push(job);
    }
}

/// Lookup counts the core added for entries prepared for the kernel, not yet
/// delivered: whatever is still held when the guard drops is forgotten (an entry that
/// did not fit the reply, or a whole reply that came after the watchdog answered
/// ETIMEDOUT). The model is mountpoint-s3's `DirectoryReplier`.
pub(super) struct Lookups {
    fs: Arc<LabFs>,
    held: Vec<u64>,
}

impl Lookups {
    pub(super) fn new(fs: Arc<LabFs>) -> Lookups {
        Lookups {
            fs,
            held: Vec::new(),
        }
    }

    /// One lookup of `ino` was added for the kernel.
    pub(super) fn hold(&mut self, ino: u64) {
        self.held.push(ino);
    }

    /// The kernel received one lookup of `ino`.
    pub(super) fn delivered(&mut self, ino: u64) {
        if let Some(i) = self.held.iter().rposition(|h| *h == ino) {
            self.held.swap_remove(i);
        }
    }
}

impl Drop for Lookups {
    fn drop(&mut self) {
        for ino in self.held.drain(..) {
            self.fs.forget(ino, 1);
        }
    }
}
