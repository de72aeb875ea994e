//! The only module that imports fuser: turns kernel requests into calls on the core
//! ([`crate::fs::LabFs`]) and core results into replies.
//!
//! Dispatch lanes: fuser runs several event-loop threads. A request whose object lives
//! on the local SSD runs inline on the event-loop thread. A request that touches Atlas
//! is handed to the Atlas lane (a small pool of threads) and the event loop moves on,
//! so a hung NFS server can never occupy the threads that serve local paths. A
//! watchdog answers ETIMEDOUT for any Atlas request that outlives the configured
//! timeout, marks Atlas down, and the core then refuses Atlas requests at once until
//! the health probe sees Atlas answer again.

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use fuser::{
    AccessFlags, BackingId, Config as FuseConfig, CopyFileRangeFlags, Errno, FileAttr, FileHandle,
    FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner,
    MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, SessionACL, TimeOrNow, WriteFlags,
};
use parking_lot::{Condvar, Mutex};
use tracing::{debug, error, info, trace, warn, Level};

use crate::error::{Error, Result};
use crate::fs::handle::Opened;
use crate::fs::xattr::XattrOut;
use crate::fs::{Attr, Ctx, EntryOut, Invalidate, Kind, LabFs, SetAttr, SetTime};
use crate::rules::{BackendKind, Class};

/// Threads of the Atlas lane: how many Atlas calls may be outstanding at once.
const ATLAS_WORKERS: usize = 16;
/// Bytes of entries prepared per readdir request: the kernel asks for up to the
/// caller's getdents buffer (32 KiB for ls); entries that do not fit are forgotten.
const READDIR_BATCH: usize = 32 * 1024;

fn kind(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDevice => FileType::CharDevice,
        Kind::BlockDevice => FileType::BlockDevice,
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: UNIX_EPOCH,
        kind: kind(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: a.blksize,
        flags: 0,
    }
}

fn ctx(req: &Request) -> Ctx {
    Ctx {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
    }
}

/// A reply that can carry an error.
trait Fail: Send + 'static {
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
    ReplyLseek,
    ReplyOpen,
    ReplyStatfs,
    ReplyWrite,
    ReplyXattr
);

/// Log a failed request at its errno's level.
fn log_failure(op: &'static str, e: &Error) {
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
type Fallback<R> = Box<dyn FnOnce(&LabFs, R) + Send>;

trait Expire: Send + Sync {
    fn deadline(&self) -> Instant;
    /// Whether the request has an answer without Atlas (and waits only the hedge).
    fn hedged(&self) -> bool;
    /// Answer (the fallback, else ETIMEDOUT) if nobody has answered yet; true when it did.
    fn expire(&self, fs: &LabFs) -> bool;
}

struct Slot<R: Fail> {
    reply: Mutex<Option<R>>,
    fallback: Mutex<Option<Fallback<R>>>,
    deadline: Instant,
    hedged: bool,
}

impl<R: Fail> Slot<R> {
    fn answer_without_atlas(&self, fs: &LabFs, reply: R) {
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

type Job = Box<dyn FnOnce() + Send>;

/// Threads the Atlas lane keeps, and how many it may grow to while Atlas calls hang
/// (each hung NFS call holds a thread until the server answers; requests refused at
/// once while Atlas is down still need a free thread to be refused promptly).
const ATLAS_WORKERS_MAX: usize = 256;
/// Requests on an open file's descriptor: refused at once while Atlas is down (they
/// have no path to check and would only hang).
const OPEN_FILE_OPS: [&str; 7] = [
    "read",
    "write",
    "flush",
    "fsync",
    "fallocate",
    "lseek",
    "copy_file_range",
];
/// A thread beyond [`ATLAS_WORKERS`] that has been idle this long exits.
const ATLAS_IDLE_EXIT: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    idle: usize,
    threads: usize,
}

/// The Atlas lane's threads: a queue that grows a thread whenever no idle one is left.
#[derive(Default)]
struct Pool {
    q: Mutex<Queue>,
    cv: Condvar,
}

impl Pool {
    fn push(self: &Arc<Self>, job: Job) {
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

    fn spawn_worker(self: &Arc<Self>, n: usize) -> std::io::Result<()> {
        let pool = self.clone();
        thread::Builder::new()
            .name(format!("atlas-{n}"))
            .spawn(move || pool.work())
            .map(|_| ())
    }

    fn work(&self) {
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
struct AtlasLane {
    pool: Arc<Pool>,
    inflight: Arc<Mutex<Vec<Weak<dyn Expire>>>>,
    timeout: Duration,
    hedge: Duration,
}

impl AtlasLane {
    /// Run a job with nobody waiting for it.
    fn spawn(&self, job: Job) {
        self.pool.push(job);
    }

    fn start(fs: Arc<LabFs>) -> AtlasLane {
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

pub struct LabFuse {
    fs: Arc<LabFs>,
    atlas: AtlasLane,
    pass: Arc<Passthrough>,
}

/// Kernel passthrough bookkeeping, shared with the lane threads that answer opens.
struct Passthrough {
    fs: Arc<LabFs>,
    enabled: AtomicBool,
    /// One backing id per inode while any handle uses it (the kernel requires it).
    backing: DashMap<u64, (u64, Weak<BackingId>)>,
    fh_backing: DashMap<u64, Arc<BackingId>>,
}

impl LabFuse {
    pub fn new(fs: Arc<LabFs>) -> LabFuse {
        LabFuse {
            atlas: AtlasLane::start(fs.clone()),
            pass: Arc::new(Passthrough {
                fs: fs.clone(),
                enabled: AtomicBool::new(false),
                backing: DashMap::new(),
                fh_backing: DashMap::new(),
            }),
            fs,
        }
    }

    fn lane_ino(&self, ino: INodeNo) -> BackendKind {
        self.fs.backend_of(ino.0).unwrap_or(BackendKind::Local)
    }

    fn lane_dir(&self, ino: INodeNo) -> BackendKind {
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
    fn lookup_lane(
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

    fn lane_child(&self, parent: INodeNo, name: &OsStr) -> BackendKind {
        self.fs
            .backend_of_child(parent.0, name)
            .unwrap_or(BackendKind::Local)
    }

    /// Run `work` on the lane of `backend` and answer with `ok` or the error.
    fn run<R: Fail, T: Send + 'static>(
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
    fn run_hedged<R: Fail, T: Send + 'static>(
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

impl Passthrough {
    fn reply_open(&self, ino: u64, o: Opened, reply: ReplyOpen) {
        match self.backing_for(ino, &o, |fd| reply.open_backing(fd)) {
            Ok(id) => {
                reply.opened_passthrough(FileHandle(o.fh), pass_flags(&o), &id);
                self.fh_backing.insert(o.fh, id);
            }
            Err(direct) => reply.opened(FileHandle(o.fh), open_flags(&o, direct)),
        }
    }

    fn reply_create(&self, e: EntryOut, o: Opened, reply: ReplyCreate) {
        let attr = file_attr(&e.attr);
        match self.backing_for(e.attr.ino, &o, |fd| reply.open_backing(fd)) {
            Ok(id) => {
                reply.created_passthrough(
                    &e.ttl,
                    &attr,
                    Generation(0),
                    FileHandle(o.fh),
                    pass_flags(&o),
                    &id,
                );
                self.fh_backing.insert(o.fh, id);
            }
            Err(direct) => reply.created(
                &e.ttl,
                &attr,
                Generation(0),
                FileHandle(o.fh),
                open_flags(&o, direct),
            ),
        }
    }

    /// The inode's backing id for kernel passthrough, registering it on first open.
    /// `Err(direct)`: no passthrough for this open; `direct` when another handle of the
    /// inode already passes through to a different object. The kernel (6.18) refuses any
    /// other open of an inode in passthrough mode with EIO, which is the honest answer
    /// there: promotion never replaces the backing of a file that is open (it keeps the
    /// local copy and ends `partial`), so this is not expected to happen.
    fn backing_for(
        &self,
        ino: u64,
        o: &Opened,
        register: impl FnOnce(std::os::fd::BorrowedFd<'_>) -> std::io::Result<BackingId>,
    ) -> std::result::Result<Arc<BackingId>, bool> {
        use std::os::fd::AsFd;
        if !self.enabled.load(Ordering::Relaxed) {
            return Err(false);
        }
        let raw = o.passthrough_fd.ok_or(false)?;
        let h = self.fs.handles.file(o.fh).ok_or(false)?;
        let st = crate::fs::backend::fstat(raw).map_err(|_| false)?;
        let key = st.st_ino ^ (st.st_dev << 32);
        let mut slot = self.backing.entry(ino).or_insert((key, Weak::new()));
        if let Some(id) = slot.1.upgrade() {
            // Same object: share the id. Another object: see above.
            return if slot.0 == key { Ok(id) } else { Err(true) };
        }
        match register(h.fd.as_fd()) {
            Ok(id) => {
                let id = Arc::new(id);
                *slot = (key, Arc::downgrade(&id));
                Ok(id)
            }
            Err(e) => {
                debug!(ino, "passthrough not available for this file: {e}");
                Err(false)
            }
        }
    }

    fn released(&self, ino: u64, fh: u64) {
        if self.fh_backing.remove(&fh).is_some() {
            self.backing
                .remove_if(&ino, |_, (_, w)| w.strong_count() == 0);
        }
    }
}

/// Flags of an open served by kernel passthrough.
fn pass_flags(o: &Opened) -> FopenFlags {
    match o.backend {
        // close(2) on the SSD reports nothing a FLUSH could add: skip the round trip.
        BackendKind::Local => FopenFlags::FOPEN_NOFLUSH,
        // NFS reports deferred write errors at close: keep FLUSH.
        BackendKind::Atlas => FopenFlags::empty(),
    }
}

fn open_flags(o: &Opened, direct: bool) -> FopenFlags {
    let base = if direct {
        FopenFlags::FOPEN_DIRECT_IO
    } else {
        match o.backend {
            // labfs is the only writer of the local SSD: keep the page cache across opens.
            BackendKind::Local => FopenFlags::FOPEN_KEEP_CACHE,
            BackendKind::Atlas => FopenFlags::empty(),
        }
    };
    base | pass_flags(o)
}

/// Flags of an opened directory: a directory only labfs writes (local, no Atlas part)
/// may be listed from the kernel's cache, which the kernel drops itself when an entry
/// changes through the mount.
fn dir_flags(local_only: bool) -> FopenFlags {
    if local_only {
        FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE
    } else {
        FopenFlags::empty()
    }
}

fn time(t: Option<TimeOrNow>) -> Option<SetTime> {
    t.map(|t| match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(s) => SetTime::At(s),
    })
}

fn xattr_reply(reply: ReplyXattr, out: XattrOut) {
    match out {
        XattrOut::Size(n) => reply.size(n),
        XattrOut::Data(d) => reply.data(&d),
    }
}

impl Filesystem for LabFuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let caps = config.capabilities();
        let want = InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_DONT_MASK
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_ATOMIC_O_TRUNC
            | InitFlags::FUSE_CACHE_SYMLINKS
            // The kernel enforces POSIX ACLs (stored on the backend) like mode bits.
            | InitFlags::FUSE_POSIX_ACL
            // labfs clears setuid/setgid itself when the kernel says so; in return the
            // kernel stops asking for security.capability before every write.
            | InitFlags::FUSE_HANDLE_KILLPRIV_V2;
        let _ = config.add_capabilities(want & caps);
        if caps.contains(InitFlags::FUSE_PASSTHROUGH)
            && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(1).is_ok()
        {
            self.pass.enabled.store(true, Ordering::Relaxed);
            info!("kernel FUSE passthrough enabled for open files");
        } else {
            info!("kernel FUSE passthrough not offered: file I/O goes through the daemon");
        }
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let c = ctx(req);
        let n = name.to_os_string();
        let (lane, fallback) = self.lookup_lane(parent, name);
        self.run_hedged(
            lane,
            "lookup",
            reply,
            move |fs| match fs.lookup(&c, parent.0, &n) {
                Ok(e) => {
                    fs.note_entry(parent.0, &n, &e.attr);
                    Ok(Ok(e))
                }
                Err(e) if e.errno() == libc::ENOENT => Ok(Err(fs.negative_ttl(parent.0, &n))),
                Err(e) => Err(e),
            },
            |reply, r| match r {
                Ok(e) => reply.entry(&e.ttl, &file_attr(&e.attr), Generation(0)),
                Err(Some(ttl)) => {
                    // A negative entry: the kernel caches "no such file" for ttl.
                    let mut a = file_attr(&neg_attr());
                    a.ino = INodeNo(0);
                    reply.entry(&ttl, &a, Generation(0));
                }
                Err(None) => reply.error(Errno::ENOENT),
            },
            fallback,
            |fs, r| {
                if let Ok(e) = r {
                    fs.forget(e.attr.ino, 1); // never handed to the kernel
                }
            },
        );
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let c = ctx(req);
        let lane = self.lane_ino(ino);
        // A directory on the way to local paths answers from its last-known attributes
        // while Atlas does not answer.
        let fallback = (lane == BackendKind::Atlas && self.fs.last_known_dir(ino.0).is_some())
            .then(|| {
                Box::new(
                    move |fs: &LabFs, reply: ReplyAttr| match fs.last_known_dir(ino.0) {
                        Some(a) => reply.attr(&fs.ttl(BackendKind::Atlas), &file_attr(&a)),
                        None => {
                            debug!(
                                ino = ino.0,
                                "getattr: Atlas not answering and no last-known attributes"
                            );
                            reply.error(Errno::from_i32(libc::ETIMEDOUT))
                        }
                    },
                ) as Fallback<ReplyAttr>
            });
        self.run_hedged(
            lane,
            "getattr",
            reply,
            move |fs| {
                let r = fs.getattr(&c, ino.0, fh.map(|f| f.0))?;
                if lane == BackendKind::Atlas {
                    fs.note_getattr(ino.0, &r.0);
                }
                Ok(r)
            },
            |reply, (a, ttl)| reply.attr(&ttl, &file_attr(&a)),
            fallback,
            |_, _| {},
        );
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let c = ctx(req);
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: time(atime),
            mtime: time(mtime),
            fh: fh.map(|f| f.0),
        };
        self.run(
            self.lane_ino(ino),
            "setattr",
            reply,
            move |fs| fs.setattr(&c, ino.0, &set),
            |reply, (a, ttl)| reply.attr(&ttl, &file_attr(&a)),
        );
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        let c = ctx(req);
        self.run(
            self.lane_ino(ino),
            "readlink",
            reply,
            move |fs| fs.readlink(&c, ino.0),
            |reply, d| reply.data(&d),
        );
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let c = ctx(req);
        let n = name.to_os_string();
        self.run_hedged(
            self.lane_child(parent, name),
            "mknod",
            reply,
            move |fs| fs.mknod(&c, parent.0, &n, mode, umask, rdev),
            entry_ok,
            None,
            forget_late,
        );
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let c = ctx(req);
        let n = name.to_os_string();
        self.run_hedged(
            self.lane_child(parent, name),
            "mkdir",
            reply,
            move |fs| {
                let e = fs.mkdir(&c, parent.0, &n, mode, umask)?;
                fs.note_entry(parent.0, &n, &e.attr);
                Ok(e)
            },
            entry_ok,
            None,
            forget_late,
        );
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let c = ctx(req);
        let n = name.to_os_string();
        self.run(
            self.lane_child(parent, name),
            "unlink",
            reply,
            move |fs| fs.unlink(&c, parent.0, &n),
            |r, ()| r.ok(),
        );
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let c = ctx(req);
        let n = name.to_os_string();
        // rmdir may look at both backends' parts of the directory.
        let lane = if self.fs.backend_of_child(parent.0, name) == Some(BackendKind::Local)
            && !self.fs.may_touch_atlas_below(parent.0, name)
        {
            BackendKind::Local
        } else {
            BackendKind::Atlas
        };
        self.run(
            lane,
            "rmdir",
            reply,
            move |fs| fs.rmdir(&c, parent.0, &n),
            |r, ()| r.ok(),
        );
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let c = ctx(req);
        let n = link_name.to_os_string();
        let t = target.as_os_str().to_os_string();
        self.run_hedged(
            self.lane_child(parent, link_name),
            "symlink",
            reply,
            move |fs| fs.symlink(&c, parent.0, &n, &t),
            entry_ok,
            None,
            forget_late,
        );
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let c = ctx(req);
        let (n, nn) = (name.to_os_string(), newname.to_os_string());
        let lane = if self.lane_child(parent, name) == BackendKind::Local
            && self.lane_child(newparent, newname) == BackendKind::Local
        {
            BackendKind::Local
        } else {
            BackendKind::Atlas
        };
        self.run(
            lane,
            "rename",
            reply,
            move |fs| fs.rename(&c, parent.0, &n, newparent.0, &nn, flags.bits()),
            |r, ()| r.ok(),
        );
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let c = ctx(req);
        let n = newname.to_os_string();
        self.run_hedged(
            self.lane_ino(ino),
            "link",
            reply,
            move |fs| fs.link(&c, ino.0, newparent.0, &n),
            entry_ok,
            None,
            forget_late,
        );
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let c = ctx(req);
        let pass = self.pass.clone();
        self.run_hedged(
            self.lane_ino(ino),
            "open",
            reply,
            move |fs| fs.open(&c, ino.0, flags.0),
            move |reply, o| pass.reply_open(ino.0, o, reply),
            None,
            |fs, o| fs.release(o.fh),
        );
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.run(
            self.lane_ino(ino),
            "read",
            reply,
            move |fs| fs.read(fh.0, offset, size),
            |r, d| r.data(&d),
        );
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
            self.fs.kill_suid_sgid(fh.0);
        }
        if self.lane_ino(ino) == BackendKind::Local {
            match crate::stats::timed(BackendKind::Local, |fs: &LabFs| {
                fs.write(fh.0, offset, data)
            })(&self.fs)
            {
                Ok(n) => reply.written(n),
                Err(e) => {
                    log_failure("write", &e);
                    reply.error(Errno::from_i32(e.errno()));
                }
            }
            return;
        }
        let d = data.to_vec();
        self.run(
            BackendKind::Atlas,
            "write",
            reply,
            move |fs| fs.write(fh.0, offset, &d),
            |r, n| r.written(n),
        );
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.run(
            self.lane_ino(ino),
            "flush",
            reply,
            move |fs| fs.flush(fh.0),
            |r, ()| r.ok(),
        );
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.pass.released(_ino.0, fh.0);
        reply.ok();
        if self.lane_ino(_ino) == BackendKind::Atlas {
            // close(2) on NFS flushes dirty pages and may hang with the server.
            let fs = self.fs.clone();
            self.atlas.spawn(Box::new(move || fs.release(fh.0)));
        } else {
            self.fs.release(fh.0);
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.run(
            self.lane_ino(ino),
            "fsync",
            reply,
            move |fs| fs.fsync(fh.0, datasync),
            |r, ()| r.ok(),
        );
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let c = ctx(req);
        let lane = self.lane_dir(ino);
        // A directory stored on the local SSD lists its local part while Atlas does not
        // answer (the core skips Atlas while it is stalled).
        let fallback = (lane == BackendKind::Atlas && self.fs.lists_locally(ino.0)).then(|| {
            Box::new(
                move |fs: &LabFs, reply: ReplyOpen| match fs.opendir(&c, ino.0) {
                    Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
                    Err(e) => {
                        log_failure("opendir", &e);
                        reply.error(Errno::from_i32(e.errno()));
                    }
                },
            ) as Fallback<ReplyOpen>
        });
        let flags = dir_flags(lane == BackendKind::Local);
        self.run_hedged(
            lane,
            "opendir",
            reply,
            move |fs| fs.opendir(&c, ino.0),
            move |r, fh| r.opened(FileHandle(fh), flags),
            fallback,
            |fs, fh| fs.releasedir(fh),
        );
    }

    fn readdir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectory,
    ) {
        let c = ctx(req);
        self.run(
            self.lane_dir(ino),
            "readdir",
            reply,
            move |fs| fs.readdir(&c, fh.0, offset, false, READDIR_BATCH),
            |mut reply, entries| {
                for e in entries {
                    if reply.add(INodeNo(e.ino), e.offset, kind(e.kind), &e.name) {
                        break;
                    }
                }
                reply.ok();
            },
        );
    }

    fn readdirplus(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectoryPlus,
    ) {
        let c = ctx(req);
        let fs = self.fs.clone();
        let lane = self.lane_dir(ino);
        // Entries of directories on the way to local paths are remembered for outages.
        let note = lane == BackendKind::Atlas
            && self
                .fs
                .path_of(ino.0)
                .is_ok_and(|p| self.fs.leads_to_local(&p));
        self.run(
            lane,
            "readdirplus",
            reply,
            move |fs| {
                let entries = fs.readdir(&c, fh.0, offset, true, READDIR_BATCH)?;
                if note {
                    for e in &entries {
                        if let Some(en) = &e.entry {
                            fs.note_entry(ino.0, &e.name, &en.attr);
                        }
                    }
                }
                Ok(entries)
            },
            move |mut reply, entries| {
                let mut full = false;
                for e in entries {
                    if !full {
                        full = match e.entry {
                            Some(en) => reply.add(
                                INodeNo(e.ino),
                                e.offset,
                                &e.name,
                                &en.ttl,
                                &file_attr(&en.attr),
                                Generation(0),
                            ),
                            None => {
                                let mut a = file_attr(&neg_attr());
                                a.ino = INodeNo(e.ino);
                                a.kind = FileType::Directory;
                                reply.add(
                                    INodeNo(e.ino),
                                    e.offset,
                                    &e.name,
                                    &Duration::ZERO,
                                    &a,
                                    Generation(0),
                                )
                            }
                        };
                    }
                    if full && e.entry.is_some() {
                        // Not handed to the kernel after all.
                        fs.forget(e.ino, 1);
                    }
                }
                reply.ok();
            },
        );
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.fs.releasedir(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let c = ctx(req);
        self.run(
            self.lane_ino(ino),
            "fsyncdir",
            reply,
            move |fs| fs.fsyncdir(&c, ino.0),
            |r, ()| r.ok(),
        );
    }

    fn statfs(&self, req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        let c = ctx(req);
        self.run(
            self.lane_ino(ino),
            "statfs",
            reply,
            move |fs| fs.statfs(&c, ino.0),
            |r, s| {
                r.statfs(
                    s.f_blocks,
                    s.f_bfree,
                    s.f_bavail,
                    s.f_files,
                    s.f_ffree,
                    s.f_bsize as u32,
                    s.f_namemax as u32,
                    s.f_frsize as u32,
                )
            },
        );
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let c = ctx(req);
        let (n, v) = (name.to_os_string(), value.to_vec());
        self.run(
            self.lane_ino(ino),
            "setxattr",
            reply,
            move |fs| fs.setxattr(&c, ino.0, &n, &v, flags),
            |r, ()| r.ok(),
        );
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let c = ctx(req);
        let n = name.to_os_string();
        let lane = if n
            .to_str()
            .is_some_and(|s| s.starts_with(crate::control::PREFIX))
        {
            BackendKind::Local
        } else {
            self.lane_ino(ino)
        };
        self.run(
            lane,
            "getxattr",
            reply,
            move |fs| fs.getxattr(&c, ino.0, &n, size),
            xattr_reply,
        );
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let c = ctx(req);
        self.run(
            self.lane_ino(ino),
            "listxattr",
            reply,
            move |fs| fs.listxattr(&c, ino.0, size),
            xattr_reply,
        );
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let c = ctx(req);
        let n = name.to_os_string();
        self.run(
            self.lane_ino(ino),
            "removexattr",
            reply,
            move |fs| fs.removexattr(&c, ino.0, &n),
            |r, ()| r.ok(),
        );
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let c = ctx(req);
        self.run(
            self.lane_ino(ino),
            "access",
            reply,
            move |fs| fs.access(&c, ino.0, mask.bits()),
            |r, ()| r.ok(),
        );
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let c = ctx(req);
        let n = name.to_os_string();
        let pass = self.pass.clone();
        self.run_hedged(
            self.lane_child(parent, name),
            "create",
            reply,
            move |fs| fs.create(&c, parent.0, &n, mode, umask, flags),
            move |reply, (e, o)| pass.reply_create(e, o, reply),
            None,
            |fs, (e, o)| {
                // Created on Atlas after the caller was told ETIMEDOUT: keep the file, drop
                // the handle and the lookup nobody received.
                fs.release(o.fh);
                fs.forget(e.attr.ino, 1);
            },
        );
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let c = ctx(req);
        self.run(
            self.lane_ino(ino),
            "fallocate",
            reply,
            move |fs| fs.fallocate(&c, fh.0, offset, length, mode),
            |r, ()| r.ok(),
        );
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        self.run(
            self.lane_ino(ino),
            "lseek",
            reply,
            move |fs| fs.lseek(fh.0, offset, whence),
            |r, o| r.offset(o),
        );
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let lane = if self.lane_ino(ino_in) == BackendKind::Local
            && self.lane_ino(ino_out) == BackendKind::Local
        {
            BackendKind::Local
        } else {
            BackendKind::Atlas
        };
        self.run(
            lane,
            "copy_file_range",
            reply,
            move |fs| fs.copy_file_range(fh_in.0, offset_in, fh_out.0, offset_out, len),
            |r, n| r.written(n),
        );
    }
}

/// An entry made on Atlas after its request was answered ETIMEDOUT: the kernel never
/// got it, so the lookup it counted is dropped.
fn forget_late(fs: &LabFs, e: EntryOut) {
    fs.forget(e.attr.ino, 1);
}

fn entry_ok(reply: ReplyEntry, e: EntryOut) {
    reply.entry(&e.ttl, &file_attr(&e.attr), Generation(0));
}

fn neg_attr() -> Attr {
    Attr {
        ino: 0,
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        kind: Kind::File,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
    }
}

/// A mount flag by name (from fstab's `-o`); anything else goes to the kernel as is.
fn mount_option(o: &str) -> MountOption {
    match o {
        "ro" => MountOption::RO,
        "exec" => MountOption::Exec,
        "noexec" => MountOption::NoExec,
        "suid" => MountOption::Suid,
        "nosuid" => MountOption::NoSuid,
        "dev" => MountOption::Dev,
        "nodev" => MountOption::NoDev,
        "atime" => MountOption::Atime,
        "noatime" => MountOption::NoAtime,
        "sync" => MountOption::Sync,
        "async" => MountOption::Async,
        "dirsync" => MountOption::DirSync,
        _ => MountOption::CUSTOM(o.to_string()),
    }
}

/// Mount options and threads of the FUSE session.
pub fn session_config(fsname: &str, extra: &[String]) -> FuseConfig {
    let mut c = FuseConfig::default();
    c.mount_options = vec![
        MountOption::FSName(fsname.to_string()),
        // Passed to the kernel (not to fusermount) so /proc/mounts says fuse.labfs.
        MountOption::CUSTOM("subtype=labfs".to_string()),
        MountOption::DefaultPermissions,
    ];
    for o in extra {
        c.mount_options.push(mount_option(o));
    }
    c.acl = SessionACL::All;
    let cpus = thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    c.n_threads = Some((cpus * 2).clamp(4, 16));
    c.clone_fd = true;
    c
}

/// Mount and serve until unmounted. `ready` is called once the kernel has the mount.
pub fn serve(
    fs: Arc<LabFs>,
    mountpoint: &Path,
    fsname: &str,
    extra: &[String],
    ready: impl FnOnce(fuser::SessionUnmounter),
) -> std::io::Result<()> {
    let config = session_config(fsname, extra);
    let fuse = LabFuse::new(fs.clone());
    let mut session = fuser::Session::new(fuse, mountpoint, &config)?;
    let notifier = session.notifier();
    fs.set_invalidator(Box::new(move |what| {
        let r = match what {
            Invalidate::Inode(ino) => notifier.inval_inode(INodeNo(ino), 0, 0),
            Invalidate::Entry { parent, name } => notifier.inval_entry(INodeNo(parent), &name),
        };
        if let Err(e) = r {
            debug!("kernel cache invalidation: {e}");
        }
    }));
    ready(session.unmount_callable());
    session.run()
}
