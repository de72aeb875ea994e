//! Dispatch lanes: local requests inline, Atlas requests on a growing pool with a
//! watchdog that answers ETIMEDOUT (see the module documentation of `fuse`).

use super::*;

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

pub(super) trait Expire: Send + Sync {
    fn deadline(&self) -> Instant;
    /// Whether the request has an answer without Atlas (and waits only the hedge).
    fn hedged(&self) -> bool;
    /// Answer (the fallback, else ETIMEDOUT) if nobody has answered yet; true when it did.
    fn expire(&self, fs: &LabFs) -> bool;
}

pub(super) struct Slot<R: Fail> {
    pub(super) reply: Mutex<Option<R>>,
    pub(super) fallback: Mutex<Option<Fallback<R>>>,
    pub(super) deadline: Instant,
    pub(super) hedged: bool,
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
    fn deadline(&self) -> Instant {
        self.deadline
    }
    fn hedged(&self) -> bool {
        self.hedged
    }
    fn expire(&self, fs: &LabFs) -> bool {
        let Some(r) = self.reply.lock().take() else {
            return false;
        };
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
    pub(super) timeout: Duration,
    pub(super) hedge: Duration,
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
        let timeout = fs.health.timeout;
        let hedge = fs.health.hedge();
        let tick = (hedge / 5).clamp(Duration::from_millis(10), Duration::from_millis(100));
        let weak_fs = Arc::downgrade(&fs);
        let _ = thread::Builder::new()
            .name("atlas-watchdog".into())
            .spawn(move || loop {
                thread::sleep(tick);
                let Some(fs) = weak_fs.upgrade() else {
                    return;
                };
                let now = Instant::now();
                let mut expired = Vec::new();
                watch.lock().retain(|w| match w.upgrade() {
                    Some(s) if s.deadline() <= now => {
                        expired.push(s);
                        false
                    }
                    Some(_) => true,
                    None => false,
                });
                for s in expired {
                    if s.expire(&fs) && !s.hedged() {
                        fs.health
                            .mark_down("a request waited longer than the timeout");
                    }
                }
            });
        AtlasLane {
            pool,
            inflight,
            timeout,
            hedge,
        }
    }
}

impl LabFuse {
    pub(super) fn lane_ino(&self, ino: INodeNo) -> BackendKind {
        self.fs.backend_of(ino.0).unwrap_or(BackendKind::Local)
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
    /// Atlas on the Atlas lane, and is absent while Atlas does not answer.
    pub(super) fn lookup_lane(
        &self,
        parent: INodeNo,
        name: &OsStr,
    ) -> (BackendKind, Option<Fallback<ReplyEntry>>) {
        let Ok(path) = self.fs.child_path(parent.0, name) else {
            return (BackendKind::Local, None);
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
            return (lane, Some(f));
        }
        if p.class == Class::Transitional
            && lane == BackendKind::Local
            && self.fs.local_lacks(&path)
        {
            let f: Fallback<ReplyEntry> =
                Box::new(|_: &LabFs, reply: ReplyEntry| reply.error(Errno::ENOENT));
            return (BackendKind::Atlas, Some(f));
        }
        (lane, None)
    }

    pub(super) fn lane_child(&self, parent: INodeNo, name: &OsStr) -> BackendKind {
        self.fs
            .backend_of_child(parent.0, name)
            .unwrap_or(BackendKind::Local)
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

    /// As [`LabFuse::run`], with an answer for when Atlas does not answer.
    ///
    /// With a `fallback` (a request that local paths depend on: the attributes of a
    /// directory on the way to them, a transitional name that is not on the local SSD),
    /// an Atlas request waits for Atlas at most the hedge, and not at all while Atlas
    /// is stalled or down; it is then answered by `fallback` instead of ETIMEDOUT.
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
        fallback: Option<Fallback<R>>,
        late: impl FnOnce(&LabFs, T) + Send + 'static,
    ) {
        let work = crate::stats::timed(backend, work);
        if backend == BackendKind::Local {
            match work(&self.fs) {
                Ok(t) => ok(reply, t),
                Err(e) => {
                    log_failure(op, &e);
                    reply.fail(Errno::from_i32(e.errno()));
                }
            }
            return;
        }
        if OPEN_FILE_OPS.contains(&op) && self.fs.health.is_down() {
            // A call on the descriptor of an open Atlas file would hang with Atlas.
            self.fs.health.refuse_open_file(op);
            reply.fail(Errno::from_i32(libc::ETIMEDOUT));
            return;
        }
        let hedged = fallback.is_some();
        let fallback = match fallback {
            Some(f) if self.fs.health.is_stalled() => {
                f(&self.fs, reply);
                return;
            }
            f => f,
        };
        let wait = if hedged {
            self.atlas.hedge
        } else {
            self.atlas.timeout
        };
        let slot = Arc::new(Slot {
            reply: Mutex::new(Some(reply)),
            fallback: Mutex::new(fallback),
            deadline: Instant::now() + wait,
            hedged,
        });
        let weak: Weak<dyn Expire> = Arc::downgrade(&slot) as Weak<dyn Expire>;
        self.atlas.inflight.lock().push(weak);
        let fs = self.fs.clone();
        let job: Job = Box::new(move || {
            if slot.reply.lock().is_none() {
                return; // answered while queued: do not act late
            }
            let res = work(&fs);
            let Some(reply) = slot.reply.lock().take() else {
                if let Ok(t) = res {
                    late(&fs, t);
                }
                return;
            };
            match res {
                Ok(t) => ok(reply, t),
                Err(e) if hedged && e.errno() == libc::ETIMEDOUT => {
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
