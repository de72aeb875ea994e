//! One promotion job, on its own thread (plus a few copy workers), never on a FUSE
//! thread and never holding a lock across I/O:
//!
//! plan -> journal `planned` -> stage (copy + digest + metadata + tags, every range
//! read back from Atlas with O_DIRECT and compared; one syncfs) -> journal `staged` ->
//! verify (size, owner, mode on Atlas; sources unchanged; no writers) ->
//! journal `verified` -> commit (rename into place, fsync the parent, store records) ->
//! journal `committed` -> clean (remove the local copy, re-key inodes, invalidate
//! kernel caches) -> journal removed.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tracing::{error, info, warn};

use super::copy;
use super::dirs::DirFds;
use super::job::{failed, Job, JobError, JobResult, Phase};
use super::journal::{ns_of, Entry, EntryKind, Journal, State};
use super::place;
use super::plan;
use super::util::{self, cos, cstr, open_ns, open_ns_dir, show};
use crate::error::Result;
use crate::fs::backend::{fstat, fstatat};
use crate::fs::inode::BackingKey;
use crate::fs::object::split;
use crate::fs::{Creds, LabFs};
use crate::rules::{BackendKind, Class};
use crate::tags;

/// Copy workers per job. With O_DIRECT writes and read-backs a worker mostly waits
/// for the device (two synchronous round trips per range), so the workers are the
/// device's queue depth more than CPUs: 8 beat 4, and 16 beat 8, on the 2-core bench
/// machine (docs/benchmarks.md, "Promote with O_DIRECT writes" and "Promote at copy
/// speed"). Each costs its buffers only as far as its files touch them.
const WORKERS: usize = 16;

/// Test-only crash hook: `LABFS_PROMOTE_CRASH_AT=planned|staged|verified|committed|cleaning`
/// makes the daemon abort() right after that step (see docs/promote.md).
pub fn crash_point(at: &str) {
    if std::env::var("LABFS_PROMOTE_CRASH_AT").is_ok_and(|v| v == at) {
        error!("LABFS_PROMOTE_CRASH_AT={at}: aborting (test hook)");
        // No core file for a deliberate crash.
        let none = rustix::process::Rlimit {
            current: Some(0),
            maximum: Some(0),
        };
        let _ = rustix::process::setrlimit(rustix::process::Resource::Core, none);
        std::process::abort();
    }
}

/// Test-only: `LABFS_PROMOTE_DELAY_MS=N` sleeps N ms after staging each file, so tests
/// can observe a promotion in flight (see docs/promote.md).
fn test_delay() {
    if let Some(ms) = std::env::var("LABFS_PROMOTE_DELAY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::sleep(Duration::from_millis(ms.min(10_000)));
    }
}

/// Jobs that run at once; later ones wait in state `queued`. A user none of whose jobs
/// runs may start one beyond this, so one user's long (or writer-waiting) jobs never
/// hold every place (docs/promote.md, limits).
const MAX_RUNNING: usize = 2;

/// Running jobs by uid.
static RUNNING: parking_lot::Mutex<Vec<(u32, usize)>> = parking_lot::Mutex::new(Vec::new());
static SLOT_FREED: parking_lot::Condvar = parking_lot::Condvar::new();

/// One of the running places, held while a job runs.
struct Slot(u32);

impl Slot {
    fn take(job: &Job) -> std::result::Result<Slot, String> {
        let uid = job.ctx.uid;
        let mut running = RUNNING.lock();
        loop {
            let total: usize = running.iter().map(|(_, n)| n).sum();
            let mine = running
                .iter()
                .find(|(u, _)| *u == uid)
                .map_or(0, |(_, n)| *n);
            if mine == 0 || (total < MAX_RUNNING && mine < MAX_RUNNING) {
                break;
            }
            if stop_requested(job) {
                return Err("stopped while queued; nothing was changed".into());
            }
            SLOT_FREED.wait_for(&mut running, Duration::from_millis(200));
        }
        match running.iter_mut().find(|(u, _)| *u == uid) {
            Some((_, n)) => *n += 1,
            None => running.push((uid, 1)),
        }
        Ok(Slot(uid))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut running = RUNNING.lock();
        if let Some(i) = running.iter().position(|(u, _)| *u == self.0) {
            running[i].1 -= 1;
            if running[i].1 == 0 {
                running.swap_remove(i);
            }
        }
        drop(running);
        SLOT_FREED.notify_all();
    }
}

/// Run a job to its end and record the outcome.
pub fn run(fs: &Arc<LabFs>, job: &Arc<Job>) {
    let _root = match Creds::root().assume() {
        Ok(g) => g,
        Err(e) => {
            job.set_error(e.to_string());
            job.set_phase(Phase::Failed);
            return;
        }
    };
    let slot = match Slot::take(job) {
        Ok(s) => s,
        Err(e) => {
            job.set_error(e);
            job.set_phase(Phase::Interrupted);
            return;
        }
    };
    job.set_phase(Phase::Planning);
    let outcome = execute(fs, job);
    drop(slot);
    // The job's records (one per object) were freed; hand the pages back to the
    // system now rather than keeping them in the allocator until a later job.
    crate::sys::release_free_memory();
    match outcome {
        Ok(msg) => {
            info!(id = %job.id, "promoted {}: {msg}", show(&job.path));
            job.set_message(msg);
            job.set_phase(Phase::Done);
        }
        Err(JobError::Already(m)) => {
            info!(id = %job.id, "{m}");
            job.set_message(m);
            job.set_phase(Phase::AlreadyPromoted);
        }
        Err(JobError::Partial(m)) => {
            warn!(id = %job.id, "{m}");
            job.set_error(m);
            job.set_phase(Phase::Partial);
        }
        Err(JobError::Refused(m)) => {
            if !job.quiet.load(Ordering::Relaxed) {
                info!(id = %job.id, "promotion refused: {m}");
            }
            job.set_error(m);
            job.set_phase(Phase::Refused);
        }
        Err(JobError::Failed(m)) => {
            if !job.quiet.load(Ordering::Relaxed) {
                warn!(id = %job.id, "promotion of {} failed: {m}", show(&job.path));
            }
            job.set_error(m);
            job.set_phase(Phase::Failed);
        }
        Err(JobError::Stopped(m)) => {
            let m = if job.cancel.load(Ordering::Relaxed) {
                format!("cancelled ({m}); nothing was changed")
            } else {
                format!("{m}: the daemon is stopping; the next mount completes or rolls back this promotion")
            };
            info!(id = %job.id, "promotion of {}: {m}", show(&job.path));
            job.set_error(m);
            job.set_phase(Phase::Interrupted);
        }
    }
}

fn stop_requested(job: &Job) -> bool {
    super::stopping() || job.cancel.load(Ordering::Relaxed)
}

/// lstat of a namespace path on the local backend, `None` when missing.
fn local_lstat(fs: &LabFs, ns: &OsStr) -> Result<Option<libc::stat>> {
    lstat_in(&local_dirs(fs), ns)
}

/// A phase's cache of local directories (by namespace path).
fn local_dirs(fs: &LabFs) -> DirFds<impl Fn(&OsStr) -> Result<OwnedFd> + Sync + '_> {
    DirFds::new(|dir: &OsStr| open_ns_dir(&fs.local, dir))
}

/// A phase's cache of Atlas directories (by namespace path).
fn atlas_dirs(fs: &LabFs) -> DirFds<impl Fn(&OsStr) -> Result<OwnedFd> + Sync + '_> {
    DirFds::new(|dir: &OsStr| open_ns_dir(&fs.atlas, dir))
}

/// lstat of namespace path `ns` in its parent from `dirs`, `None` when missing.
fn lstat_in<F: Fn(&OsStr) -> Result<OwnedFd> + Sync>(
    dirs: &DirFds<F>,
    ns: &OsStr,
) -> Result<Option<libc::stat>> {
    let (dir, name) = split(ns);
    let (dir, name) = (OsStr::new(dir), cos(name)?);
    for retry in [true, false] {
        let pfd = match dirs.get(dir) {
            Ok(fd) => fd,
            Err(e) if e.errno() == libc::ENOENT || e.errno() == libc::ENOTDIR => return Ok(None),
            Err(e) => return Err(e),
        };
        match fstatat(pfd.as_raw_fd(), &name) {
            Ok(st) => return Ok(Some(st)),
            Err(e) if e.errno() == libc::ENOENT => return Ok(None),
            // The directory was replaced on the NFS server since this phase opened
            // it: resolve its path again, once.
            Err(e) if e.errno() == libc::ESTALE && retry => dirs.forget(dir),
            Err(e) => return Err(e),
        }
    }
    Err(crate::error::Error::Errno(libc::ESTALE))
}

/// The caller must be allowed to write the parent directory (checked as the caller).
fn check_caller(fs: &LabFs, job: &Job) -> JobResult<()> {
    let (parent, _) = split(&job.path);
    let refuse = |why: String| {
        JobError::Refused(format!(
            "{}: permission denied: promoting needs write permission on {} ({why})",
            show(&job.path),
            show(parent)
        ))
    };
    let loc = fs
        .locate(&job.creds, parent)
        .map_err(|e| refuse(e.to_string()))?;
    let _as = job.creds.assume().map_err(|e| refuse(e.to_string()))?;
    let (dirfd, name) = if parent.as_bytes() == b"/" {
        (
            fs.backend(loc.backend).root_fd(),
            cstr(".").map_err(failed("."))?,
        )
    } else {
        (loc.parent_fd.as_raw_fd(), loc.name.clone())
    };
    // AT_EACCESS: checked with the assumed fsuid/fsgid.
    crate::sys::with_fd(dirfd, |d| {
        crate::sys::access_at(d, &name, libc::W_OK | libc::X_OK, libc::AT_EACCESS)
    })
    .map_err(|e| refuse(e.to_string()))?;
    drop(_as);
    // A sticky directory (like /tmp) lets only the owner of an entry (or of the
    // directory) move it away, as rename(2) does.
    if loc.stat.st_mode & libc::S_ISVTX != 0
        && job.creds.uid != 0
        && job.creds.uid != loc.stat.st_uid
    {
        let me = fs
            .locate(&job.creds, &job.path)
            .map_err(|e| refuse(e.to_string()))?;
        if me.stat.st_uid != job.creds.uid {
            return Err(refuse(
                "the directory is sticky and you own neither it nor the entry".to_string(),
            ));
        }
    }
    fs.check_writable(&job.ctx, &job.path, &fs.placement(&job.path))
        .map_err(|e| JobError::Refused(e.to_string()))
}

fn tag_text(fs: &LabFs, ns: &OsStr, tag: &str) -> Option<String> {
    let (dir, name) = split(ns);
    let pfd = open_ns_dir(&fs.atlas, dir).ok()?;
    let c = cos(name).ok()?;
    tags::read_tag(&fs.atlas, pfd.as_raw_fd(), &c, ns, tag).and_then(|v| String::from_utf8(v).ok())
}

fn execute(fs: &LabFs, job: &Job) -> JobResult<String> {
    let path = job.path.as_os_str();
    let shown = show(path);
    if path.as_bytes() == b"/" {
        return Err(JobError::Refused(
            "cannot promote the root of the namespace".into(),
        ));
    }
    check_caller(fs, job)?;
    if let crate::atlas_id::Squash::Yes(_) = crate::atlas_id::root_squash() {
        return Err(JobError::Refused(format!(
            "{shown}: not promoted, nothing was changed: {}",
            crate::atlas_id::SQUASH_HELP
        )));
    }
    let p = fs.placement(path);
    if fs.health.is_down() {
        return Err(JobError::Refused(format!(
            "{shown}: Atlas is not answering; promote again once `labfs status` shows it answering"
        )));
    }
    let top = match local_lstat(fs, path).map_err(failed(&shown))? {
        Some(st) => st,
        None => {
            let on_atlas =
                plan::atlas_lstat(fs, path).map_err(failed(format!("{shown} on Atlas")))?;
            return Err(match (on_atlas, tag_text(fs, path, tags::CLASS)) {
                (Some(_), Some(class)) => JobError::Already(format!(
                    "{shown}: already promoted (class {class}{}); nothing to do",
                    tag_text(fs, path, tags::PROMOTED_AT)
                        .map(|t| format!(", promoted {t}"))
                        .unwrap_or_default()
                )),
                (Some(_), None) if p.class == Class::Transitional => JobError::Refused(format!(
                    "{shown}: is on Atlas but carries no promotion tag (written there behind labfs's back?); \
                     see `labfs check`"
                )),
                (Some(_), None) => JobError::Refused(format!(
                    "{shown}: is {} data (rule {}), already stored on Atlas; only transitional data is promoted",
                    p.class,
                    p.rule_label()
                )),
                (None, _) => JobError::Failed(format!("{shown}: no such file or directory")),
            });
        }
    };
    if p.class != Class::Transitional {
        return Err(JobError::Refused(format!(
            "{shown}: is {} data (rule {}), stored on {}; only data under a transitional rule is promoted",
            p.class,
            p.rule_label(),
            p.backend()
        )));
    }
    if let (Some(want), Some(have)) = (job.expect_ino, fs.inodes.peek(&local_key(&top))) {
        if want != have {
            return Err(JobError::Refused(format!(
                "{shown}: changed while the promotion was starting; try again"
            )));
        }
    }
    let plan = plan::walk(fs, job, &top)?;
    wait_for_writers(fs, job, &plan.entries)?;
    let mut entries = plan.entries;
    plan::assign_units(fs, path, &mut entries, job.merge)?;
    check_space(fs, path, plan.need_bytes)?;
    for s in &plan.skipped {
        job.warn(format!(
            "{}: placed by another rule; left where it is",
            show(s)
        ));
    }

    let class = p
        .rule
        .as_ref()
        .and_then(|r| r.promote_class)
        .unwrap_or(Class::Authoritative);
    let host = util::hostname();
    let mut j = Journal {
        version: super::journal::VERSION,
        id: job.id.clone(),
        path: path.to_os_string(),
        host: host.clone(),
        merge: job.merge,
        state: State::Planned,
        staging: format!("/.labfs/staging/{host}/{}", job.id),
        class: class.to_string(),
        promoted_at: util::rfc3339(job.created_unix),
        origin: host,
        entries,
    };
    j.save(&fs.local)
        .map_err(failed("writing the promotion journal"))?;
    crash_point("planned");

    let t0 = std::time::Instant::now();
    let mut t_staged = t0;
    let mut flushed = Duration::ZERO;
    let staged_verified = stage(fs, job, &mut j).and_then(|syncfs| {
        (t_staged, flushed) = (std::time::Instant::now(), syncfs);
        verify(fs, job, &mut j)
    });
    if let Err(e) = staged_verified {
        rollback(fs, &j);
        return Err(e);
    }
    let t_verified = std::time::Instant::now();
    job.set_phase(Phase::Committing);
    let renamed = commit(fs, &j, job.tags_in_store.load(Ordering::Relaxed));
    match renamed {
        Ok(()) => {}
        Err((0, e)) => {
            rollback(fs, &j);
            return Err(e);
        }
        Err((_, JobError::Failed(m))) => {
            return Err(JobError::Failed(format!(
                "{m}; part of the tree is already in place on Atlas and the local copy is kept: \
                 the next mount completes this promotion from its journal"
            )))
        }
        Err((_, e)) => return Err(e),
    }
    j.state = State::Committed;
    j.save(&fs.local)
        .map_err(failed("writing the promotion journal (committed)"))?;
    crash_point("committed");
    let t_committed = std::time::Instant::now();

    job.set_phase(Phase::Cleaning);
    let kept = clean_entries(fs, &j, false, &|m| job.warn(m)).map_err(|e| match e {
        JobError::Failed(m) => JobError::Failed(format!(
            "{m}; the data is safely on Atlas, the next mount finishes removing the local copy"
        )),
        other => other,
    })?;
    finish(fs, &j);
    let t_done = std::time::Instant::now();
    info!(
        id = %job.id,
        "{shown}: planned in {:.3} s, staged in {:.3} s (syncfs {:.3} s), verified in {:.3} s, committed in {:.3} s, cleaned in {:.3} s",
        t0.saturating_duration_since(job.created).as_secs_f64(),
        t_staged.saturating_duration_since(t0).as_secs_f64(),
        flushed.as_secs_f64(),
        t_verified.saturating_duration_since(t_staged).as_secs_f64(),
        t_committed.saturating_duration_since(t_verified).as_secs_f64(),
        t_done.saturating_duration_since(t_committed).as_secs_f64(),
    );
    let files = j.entries.iter().filter(|e| !e.is_dir()).count();
    let bytes: u64 = j
        .entries
        .iter()
        .filter(|e| e.kind == EntryKind::File)
        .map(|e| e.size)
        .sum();
    if kept > 0 {
        return Err(JobError::Partial(format!(
            "{shown}: promoted to Atlas as {}, except {kept} file(s) that were open or changed during \
             the promotion: they stay on local (listed above); close them and run \
             `labfs promote --merge` on {shown} again",
            j.class
        )));
    }
    Ok(format!(
        "{shown}: promoted to Atlas as {} ({files} file(s), {bytes} bytes)",
        j.class
    ))
}

fn local_key(st: &libc::stat) -> BackingKey {
    crate::fs::key_of(BackendKind::Local, st)
}

fn entry_key(e: &Entry) -> BackingKey {
    BackingKey {
        backend: BackendKind::Local,
        dev: e.dev,
        ino: e.ino,
    }
}

/// Files of the plan open for writing through the mount.
fn open_writers(fs: &LabFs, j_path: &OsStr, entries: &[Entry]) -> Vec<OsString> {
    entries
        .iter()
        .filter(|e| matches!(e.kind, EntryKind::File | EntryKind::Link))
        .filter(|e| {
            fs.inodes
                .peek(&entry_key(e))
                .is_some_and(|ino| fs.handles.writers_of(ino) > 0)
        })
        .map(|e| ns_of(j_path, e.rel()))
        .collect()
}

fn wait_for_writers(fs: &LabFs, job: &Job, entries: &[Entry]) -> JobResult<()> {
    loop {
        let busy = open_writers(fs, &job.path, entries);
        if busy.is_empty() {
            return Ok(());
        }
        let shown = busy.iter().take(3).map(show).collect::<Vec<_>>().join(", ");
        let more = if busy.len() > 3 {
            format!(" and {} more", busy.len() - 3)
        } else {
            String::new()
        };
        if !job.wait {
            return Err(JobError::Refused(format!(
                "{}: {shown}{more} {} open for writing; finish writing first (or use --wait)",
                show(&job.path),
                if busy.len() == 1 { "is" } else { "are" }
            )));
        }
        if job.phase() != Phase::Waiting {
            job.set_message(format!("waiting for {shown}{more} to be closed"));
            job.set_phase(Phase::Waiting);
        }
        if stop_requested(job) {
            return Err(JobError::Stopped(
                "stopped while waiting for writers".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn check_space(fs: &LabFs, path: &OsStr, need: u64) -> JobResult<()> {
    if let Some(free) = util::free_bytes(fs.atlas.root_fd()) {
        if need > free {
            return Err(JobError::Refused(format!(
                "{}: needs about {} on Atlas but only {} is free; free space on Atlas first",
                show(path),
                human(need),
                human(free)
            )));
        }
    }
    Ok(())
}

pub fn human(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// The tags of one entry.
pub fn tags_for(j: &Journal, e: &Entry) -> BTreeMap<String, String> {
    tag_map(j, e.digest_tag().as_deref())
}

/// The tags of an object of job `j` with content digest `digest` (files only).
pub fn tag_map(j: &Journal, digest: Option<&str>) -> BTreeMap<String, String> {
    let mut t = BTreeMap::new();
    t.insert(tags::CLASS.to_string(), j.class.clone());
    t.insert(tags::PROMOTED_AT.to_string(), j.promoted_at.clone());
    t.insert(tags::ORIGIN.to_string(), j.origin.clone());
    if let Some(d) = digest {
        t.insert(tags::DIGEST.to_string(), d.to_string());
    }
    t
}

/// Set tags as xattrs on an open file or directory; `false` when the filesystem (or
/// the mode) wants them in the store instead.
pub fn set_tag_xattrs(fd: i32, t: &BTreeMap<String, String>) -> Result<bool> {
    if tags::mode() == tags::Mode::Store {
        return Ok(false);
    }
    for (k, v) in t {
        match util::set_xattr_fd(fd, &cstr(k)?, v.as_bytes()) {
            Ok(()) => {}
            Err(e) if util::xattr_unsupported(&e) => return Ok(false),
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Split "data/a/b" into ("data/a", "b"); "data" into ("", "data").
pub fn split_rel(rel: &OsStr) -> (&OsStr, &OsStr) {
    let b = rel.as_bytes();
    match b.iter().rposition(|c| *c == b'/') {
        Some(i) => (OsStr::from_bytes(&b[..i]), OsStr::from_bytes(&b[i + 1..])),
        None => (OsStr::new(""), rel),
    }
}

fn staging_fd(fs: &LabFs, j: &Journal) -> Result<OwnedFd> {
    fs.atlas.open_dir(&j.staging)
}

/// Whether a local object is no longer what was planned.
pub fn changed(e: &Entry, st: &libc::stat) -> bool {
    st.st_ino != e.ino
        || st.st_dev != e.dev
        || (st.st_ctime, st.st_ctime_nsec) != e.ctime.pair()
        || (e.kind != EntryKind::Dir && st.st_size as u64 != e.size)
}

/// Run `f` over `items` on a few workers (as root); the first error stops the rest.
fn parallel<T: Sync>(
    items: &[T],
    f: impl Fn(&T, &mut Vec<u8>) -> JobResult<()> + Sync,
) -> JobResult<()> {
    parallel_with(
        items,
        || vec![0u8; copy::CHUNK],
        |item, buf| f(item, buf),
        |_| Ok(()),
    )
}

/// [`parallel`] with per-worker state: `init` makes it, `end` runs once a worker has
/// no more items (its result counts like an item's).
fn parallel_with<T: Sync, S>(
    items: &[T],
    init: impl Fn() -> S + Sync,
    f: impl Fn(&T, &mut S) -> JobResult<()> + Sync,
    end: impl Fn(&mut S) -> JobResult<()> + Sync,
) -> JobResult<()> {
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let first_err: Mutex<Option<JobError>> = Mutex::new(None);
    let workers = WORKERS.min(items.len()).max(1);
    let fail = |e: JobError| {
        stop.store(true, Ordering::Relaxed);
        first_err.lock().get_or_insert(e);
    };
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                let _root = match Creds::root().assume() {
                    Ok(g) => g,
                    Err(e) => return fail(JobError::Failed(e.to_string())),
                };
                let mut state = init();
                while !stop.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = items.get(i) else { break };
                    if let Err(e) = f(item, &mut state) {
                        return fail(e);
                    }
                }
                if !stop.load(Ordering::Relaxed) {
                    if let Err(e) = end(&mut state) {
                        fail(e);
                    }
                }
            });
        }
    });
    match first_err.into_inner() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

struct StagedInfo {
    digest: Option<[u8; 32]>,
    ino: u64,
}

/// Digest and staged inode of a hard link's first name.
type StagedFirst = (Option<[u8; 32]>, Option<u64>);

/// A copy worker's buffers: the copy chunk (aligned for O_DIRECT writes) and the
/// queue of ranges to read back.
struct Worker {
    buf: copy::AlignedBuf,
    readback: copy::ReadBack,
}

/// Objects staged per batch: their results are written into the journal's entries
/// between batches, so nothing per object outlives a batch.
const BATCH: usize = 4096;

/// Returns how long the final syncfs took.
fn stage(fs: &LabFs, job: &Job, j: &mut Journal) -> JobResult<Duration> {
    job.set_phase(Phase::Staging);
    // The staging directory: ATLAS/.labfs/staging/<host>/<id>, root only.
    {
        let root = fs.atlas.open_dir("/").map_err(failed("Atlas root"))?;
        let mut at = root;
        for comp in j.staging.trim_start_matches('/').split('/') {
            let c = cstr(comp).map_err(failed(comp))?;
            util::mkdir_p1(at.as_raw_fd(), &c, 0o700)
                .map_err(failed(format!("creating {}", j.staging)))?;
            at = util::open_at(at.as_raw_fd(), &c, libc::O_PATH | libc::O_DIRECTORY, 0)
                .map_err(failed(format!("opening {}", j.staging)))?;
        }
    }
    let sfd = staging_fd(fs, j).map_err(failed("opening the staging directory"))?;
    let sync_fd =
        util::syncfs_handle(sfd.as_raw_fd()).map_err(failed("opening the staging directory"))?;
    // Directories first, parents before children (mode 0700 until they are complete).
    for e in j.entries.iter().filter(|e| e.is_dir()) {
        let sr = Journal::staged_rel(e.rel());
        let (sdir, sname) = split_rel(&sr);
        let dfd = util::open_under(sfd.as_raw_fd(), sdir, libc::O_PATH | libc::O_DIRECTORY, 0)
            .map_err(failed("staging"))?;
        util::mkdir_at(
            dfd.as_raw_fd(),
            &cos(sname).map_err(failed(show(sname)))?,
            0o700,
        )
        .map_err(failed(format!("staging {}", show(&j.ns_path(e.rel())))))?;
    }
    let use_cfr = AtomicBool::new(true);
    let direct_write = direct_writes(&sfd);
    let mut order: Vec<u32> = (0..j.entries.len() as u32)
        .filter(|&i| {
            matches!(
                j.entries[i as usize].kind,
                EntryKind::File | EntryKind::Symlink
            )
        })
        .collect();
    // Largest first, so the workers finish together; within a power of two of size
    // in walk order, so the files the workers take one after the other share their
    // parent directories (one descriptor each in the caches below).
    order.sort_by_key(|&i| {
        let size = j.entries[i as usize].size;
        (std::cmp::Reverse(size.max(1).ilog2()), i)
    });
    // The directories of this phase, each opened once: the local parents (by
    // namespace path) and the staged ones (relative to the staging directory).
    let local = local_dirs(fs);
    let staged = DirFds::new(|dir: &OsStr| {
        util::open_under(sfd.as_raw_fd(), dir, libc::O_PATH | libc::O_DIRECTORY, 0)
    });
    let dirs = StageDirs {
        local: &local,
        staged: &staged,
    };
    for batch in order.chunks(BATCH) {
        let results: Mutex<Vec<(u32, StagedInfo)>> = Mutex::new(Vec::with_capacity(batch.len()));
        {
            let jr: &Journal = j;
            parallel_with(
                batch,
                || Worker {
                    buf: copy::AlignedBuf::new(copy::CHUNK),
                    readback: copy::ReadBack::new(),
                },
                |&i, w| {
                    let e = &jr.entries[i as usize];
                    let info = match e.kind {
                        EntryKind::File => {
                            stage_file(job, jr, e, &dirs, w, &use_cfr, direct_write)?
                        }
                        _ => stage_symlink(jr, e, &dirs)?,
                    };
                    results.lock().push((i, info));
                    job.files_done.fetch_add(1, Ordering::Relaxed);
                    test_delay();
                    Ok(())
                },
                |w| w.readback.drain(),
            )?;
        }
        for (i, info) in results.into_inner() {
            let e = &mut j.entries[i as usize];
            e.digest = info.digest;
            e.set_staged_ino(Some(info.ino));
        }
    }
    drop(order);
    // Other names of hard-linked files: the first names they point to (few).
    let wanted: std::collections::HashSet<&OsStr> =
        j.entries.iter().filter_map(|e| e.link_to()).collect();
    let firsts: HashMap<Box<OsStr>, StagedFirst> = j
        .entries
        .iter()
        .filter(|e| e.kind == EntryKind::File && wanted.contains(e.rel()))
        .map(|e| (Box::<OsStr>::from(e.rel()), (e.digest, e.staged_ino())))
        .collect();
    drop(wanted);
    let top = j.path.clone();
    for e in j.entries.iter_mut().filter(|e| e.kind == EntryKind::Link) {
        let first = Box::<OsStr>::from(e.link_to().unwrap_or(OsStr::new("")));
        let from = Journal::staged_rel(&first);
        let (from_dir, from_name) = split_rel(&from);
        let sr = Journal::staged_rel(e.rel());
        let (sdir, sname) = split_rel(&sr);
        let ffd = util::open_under(
            sfd.as_raw_fd(),
            from_dir,
            libc::O_PATH | libc::O_DIRECTORY,
            0,
        )
        .map_err(failed("staging a hard link"))?;
        let tfd = util::open_under(sfd.as_raw_fd(), sdir, libc::O_PATH | libc::O_DIRECTORY, 0)
            .map_err(failed("staging a hard link"))?;
        let (cf, ct) = (
            cos(from_name).map_err(failed("name"))?,
            cos(sname).map_err(failed("name"))?,
        );
        rustix::fs::linkat(&ffd, &*cf, &tfd, &*ct, rustix::fs::AtFlags::empty())
            .map_err(|e| crate::error::Error::Errno(e.raw_os_error()))
            .map_err(failed(format!(
                "staging the hard link {}",
                show(&ns_of(&top, e.rel()))
            )))?;
        if let Some((d, ino)) = firsts.get(&first) {
            e.digest = *d;
            e.set_staged_ino(*ino);
        }
        job.files_done.fetch_add(1, Ordering::Relaxed);
    }
    drop(firsts);
    // Directories last, children before parents: metadata, tags, times.
    for i in (0..j.entries.len()).rev() {
        if !j.entries[i].is_dir() {
            continue;
        }
        if stop_requested(job) {
            return Err(JobError::Stopped("stopped while staging".into()));
        }
        let ino = stage_dir_meta(fs, job, j, &j.entries[i], &sfd)?;
        j.entries[i].set_staged_ino(Some(ino));
    }
    // Everything staged is durable once syncfs succeeds (one call for the whole tree
    // instead of an fsync per file and directory).
    job.set_phase(Phase::Flushing);
    let t_flush = std::time::Instant::now();
    util::syncfs(sync_fd.as_raw_fd()).map_err(failed("syncfs of Atlas after staging"))?;
    let flushed = t_flush.elapsed();
    j.state = State::Staged;
    j.save(&fs.local)
        .map_err(failed("writing the promotion journal (staged)"))?;
    crash_point("staged");
    Ok(flushed)
}

/// The directory caches of the staging phase.
struct StageDirs<'a, L, S> {
    local: &'a DirFds<L>,
    staged: &'a DirFds<S>,
}

/// Open the local source at namespace path `ns` (by path from the local root).
fn open_src(fs: &LabFs, ns: &OsStr, flags: i32) -> Result<OwnedFd> {
    open_src_in(&local_dirs(fs), ns, flags)
}

/// Open the local source at namespace path `ns` in its parent from `local`.
fn open_src_in<L: Fn(&OsStr) -> Result<OwnedFd> + Sync>(
    local: &DirFds<L>,
    ns: &OsStr,
    flags: i32,
) -> Result<OwnedFd> {
    let (dir, name) = split(ns);
    let pfd = local.get(OsStr::new(dir))?;
    let c = cos(name)?;
    match util::open_at(pfd.as_raw_fd(), &c, flags | libc::O_NOATIME, 0) {
        Err(e) if e.errno() == libc::EPERM => util::open_at(pfd.as_raw_fd(), &c, flags, 0),
        r => r,
    }
}

/// Whether staged files are written with O_DIRECT: on a local Atlas, yes (the bytes
/// go from the copy buffer to the device, with no page-cache copy and no writeback
/// to wait for before the read-back; measured in docs/benchmarks.md, "Promote with
/// O_DIRECT writes"). On NFS, no: an O_DIRECT write there is committed to the
/// server's disk before it returns (a COMMIT per call), where buffered writes are
/// made durable once, by the `syncfs` after staging.
fn direct_writes(staging: &OwnedFd) -> bool {
    match rustix::fs::fstatfs(staging) {
        Ok(st) => st.f_type != rustix::fs::NFS_SUPER_MAGIC,
        Err(_) => false,
    }
}

/// The staged file opened for reading it back: O_DIRECT where the filesystem allows
/// it (`true`), else buffered. With `write`, opened for writing too (the O_DIRECT
/// writes of [`copy::copy_data`]).
fn open_readback(dfd: &OwnedFd, name: &std::ffi::CStr, write: bool) -> Result<(OwnedFd, bool)> {
    let flags = libc::O_RDONLY | libc::O_NOATIME;
    let dflags = if write {
        libc::O_RDWR | libc::O_NOATIME
    } else {
        flags
    };
    match util::open_at(dfd.as_raw_fd(), name, dflags | libc::O_DIRECT, 0) {
        Ok(fd) => Ok((fd, true)),
        Err(e) if e.errno() == libc::EINVAL => {
            Ok((util::open_at(dfd.as_raw_fd(), name, flags, 0)?, false))
        }
        Err(e) if e.errno() == libc::EPERM => Ok((
            util::open_at(dfd.as_raw_fd(), name, libc::O_RDONLY, 0)?,
            false,
        )),
        Err(e) => Err(e),
    }
}

fn stage_file<L, S>(
    job: &Job,
    j: &Journal,
    e: &Entry,
    dirs: &StageDirs<'_, L, S>,
    w: &mut Worker,
    use_cfr: &AtomicBool,
    direct_write: bool,
) -> JobResult<StagedInfo>
where
    L: Fn(&OsStr) -> Result<OwnedFd> + Sync,
    S: Fn(&OsStr) -> Result<OwnedFd> + Sync,
{
    let ns = j.ns_path(e.rel());
    let shown = show(&ns);
    let src = open_src_in(dirs.local, &ns, libc::O_RDONLY).map_err(failed(&shown))?;
    let st = fstat(src.as_raw_fd()).map_err(failed(&shown))?;
    if changed(e, &st) {
        return Err(JobError::Failed(format!(
            "{shown}: changed while it was being promoted; try again"
        )));
    }
    let sr = Journal::staged_rel(e.rel());
    let (sdir, sname) = split_rel(&sr);
    let dfd = dirs.staged.get(sdir).map_err(failed("staging"))?;
    let cname = cos(sname).map_err(failed(show(sname)))?;
    let dst = util::open_at(
        dfd.as_raw_fd(),
        &cname,
        libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
        0o600,
    )
    .map_err(failed(format!("staging {shown}")))?;
    let (rfd, direct) =
        open_readback(&dfd, &cname, direct_write).map_err(failed(format!("staging {shown}")))?;
    let stop = || stop_requested(job);
    let digest = copy::copy_data(
        src.as_fd(),
        dst.as_fd(),
        e.size,
        w.buf.as_mut(),
        use_cfr,
        &job.bytes_done,
        &stop,
        Some(copy::ReadBackOf {
            fd: Arc::new(rfd),
            direct,
            direct_write,
            what: shown.as_str().into(),
            queue: &mut w.readback,
        }),
    )
    .map_err(|err| match err {
        JobError::Failed(m) => JobError::Failed(format!("{shown}: {m}")),
        other => other,
    })?;
    let digest = *digest.as_bytes();
    apply_meta(
        job,
        &shown,
        src.as_fd(),
        dst.as_fd(),
        e,
        &tag_map(j, Some(&super::journal::digest_tag(&digest))),
    )?;
    util::set_times_fd(dst.as_raw_fd(), &st).map_err(failed(format!("{shown}: timestamps")))?;
    let ino = fstat(dst.as_raw_fd()).map_err(failed(&shown))?.st_ino;
    Ok(StagedInfo {
        digest: Some(digest),
        ino,
    })
}

/// Owner, mode, user xattrs and ACLs, then tags (as xattrs where possible).
fn apply_meta(
    job: &Job,
    shown: &str,
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    e: &Entry,
    t: &BTreeMap<String, String>,
) -> JobResult<()> {
    copy::set_owner_mode(dst, e.uid, e.gid, e.mode)
        .map_err(failed(format!("{shown}: owner and mode on Atlas")))?;
    let lost =
        copy::copy_xattrs(src, dst).map_err(failed(format!("{shown}: extended attributes")))?;
    if !lost.is_empty() {
        job.warn(format!(
            "{shown}: Atlas does not support extended attributes; not kept: {}",
            lost.join(", ")
        ));
    }
    if !set_tag_xattrs(dst.as_raw_fd(), t).map_err(failed(format!("{shown}: tags")))? {
        job.tags_in_store.store(true, Ordering::Relaxed);
    }
    Ok(())
}

fn stage_symlink<L, S>(j: &Journal, e: &Entry, dirs: &StageDirs<'_, L, S>) -> JobResult<StagedInfo>
where
    L: Fn(&OsStr) -> Result<OwnedFd> + Sync,
    S: Fn(&OsStr) -> Result<OwnedFd> + Sync,
{
    let ns = j.ns_path(e.rel());
    let shown = show(&ns);
    let (dir, name) = split(&ns);
    let pfd = dirs.local.get(OsStr::new(dir)).map_err(failed(&shown))?;
    let c = cos(name).map_err(failed(&shown))?;
    let target = util::readlink_at(pfd.as_raw_fd(), &c).map_err(failed(&shown))?;
    let st = fstatat(pfd.as_raw_fd(), &c).map_err(failed(&shown))?;
    if changed(e, &st) {
        return Err(JobError::Failed(format!(
            "{shown}: changed while it was being promoted; try again"
        )));
    }
    let sr = Journal::staged_rel(e.rel());
    let (sdir, sname) = split_rel(&sr);
    let dfd = dirs.staged.get(sdir).map_err(failed("staging"))?;
    let cs = cos(sname).map_err(failed(show(sname)))?;
    let ct = std::ffi::CString::new(target)
        .map_err(|_| JobError::Failed(format!("{shown}: bad link target")))?;
    let errno = |e: rustix::io::Errno| crate::error::Error::Errno(e.raw_os_error());
    rustix::fs::symlinkat(&*ct, &dfd, &*cs)
        .map_err(errno)
        .map_err(failed(format!("staging {shown}")))?;
    rustix::fs::chownat(
        &dfd,
        &*cs,
        Some(rustix::fs::Uid::from_raw(e.uid)),
        Some(rustix::fs::Gid::from_raw(e.gid)),
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(errno)
    .map_err(failed(format!("{shown}: owner on Atlas")))?;
    util::set_times_at(dfd.as_raw_fd(), &cs, &st)
        .map_err(failed(format!("{shown}: timestamps")))?;
    let ino = fstatat(dfd.as_raw_fd(), &cs)
        .map_err(failed(&shown))?
        .st_ino;
    Ok(StagedInfo { digest: None, ino })
}

fn stage_dir_meta(fs: &LabFs, job: &Job, j: &Journal, e: &Entry, sfd: &OwnedFd) -> JobResult<u64> {
    let ns = j.ns_path(e.rel());
    let shown = show(&ns);
    let src =
        open_ns(&fs.local, &ns, libc::O_RDONLY | libc::O_DIRECTORY).map_err(failed(&shown))?;
    let st = fstat(src.as_raw_fd()).map_err(failed(&shown))?;
    let sr = Journal::staged_rel(e.rel());
    let dst = util::open_under(sfd.as_raw_fd(), &sr, libc::O_RDONLY | libc::O_DIRECTORY, 0)
        .map_err(failed(format!("staging {shown}")))?;
    apply_meta(job, &shown, src.as_fd(), dst.as_fd(), e, &tags_for(j, e))?;
    // The planned times, not the current ones: creating the staged children does
    // not touch the source, but files created there meanwhile would.
    let mut times = st;
    (times.st_atime, times.st_atime_nsec) = e.atime.pair();
    (times.st_mtime, times.st_mtime_nsec) = e.mtime.pair();
    util::set_times_fd(dst.as_raw_fd(), &times).map_err(failed(format!("{shown}: timestamps")))?;
    Ok(fstat(dst.as_raw_fd()).map_err(failed(&shown))?.st_ino)
}

/// The content was read back from Atlas while staging (every range written, see
/// [`copy::ReadBack`]); here: size, owner, group and mode of every staged object as
/// Atlas keeps them, the sources unchanged, and no writer opened meanwhile.
fn verify(fs: &LabFs, job: &Job, j: &mut Journal) -> JobResult<()> {
    job.set_phase(Phase::Verifying);
    let sfd = staging_fd(fs, j).map_err(failed("opening the staging directory"))?;
    // Owner, group and mode as the server keeps them: an Atlas that squashes root (or
    // maps ids) must not silently hand the tree to someone else.
    for e in &j.entries {
        let ns = j.ns_path(e.rel());
        let sr = cos(&Journal::staged_rel(e.rel())).map_err(failed(show(&ns)))?;
        let st = fstatat(sfd.as_raw_fd(), &sr)
            .map_err(failed(format!("{}: the staged copy on Atlas", show(&ns))))?;
        if matches!(e.kind, EntryKind::File | EntryKind::Link) && st.st_size as u64 != e.size {
            return Err(JobError::Failed(format!(
                "{}: the copy on Atlas has {} bytes, the local file {}; nothing was changed",
                show(&ns),
                st.st_size,
                e.size
            )));
        }
        let want_mode = e.mode & 0o7777;
        let got_mode = st.st_mode & 0o7777;
        let mode_differs = e.kind != EntryKind::Symlink && got_mode != want_mode;
        if st.st_uid != e.uid || st.st_gid != e.gid || mode_differs {
            let squash = match crate::atlas_id::root_squash() {
                crate::atlas_id::Squash::Yes(_) => format!(" {}", crate::atlas_id::SQUASH_HELP),
                _ => " Does the NFS export squash root or map ids (root_squash, all_squash, anonuid)?"
                    .to_string(),
            };
            return Err(JobError::Failed(format!(
                "{}: on Atlas it is owned by {}:{} with mode {got_mode:o}, but the local one by {}:{} with mode {want_mode:o}; nothing was changed.{squash}",
                show(&ns), st.st_uid, st.st_gid, e.uid, e.gid
            )));
        }
    }
    // The sources must still be what was copied, and nobody may have opened them for
    // writing meanwhile.
    let local = local_dirs(fs);
    for e in j.entries.iter().filter(|e| !e.is_dir()) {
        let ns = j.ns_path(e.rel());
        match lstat_in(&local, &ns).map_err(failed(show(&ns)))? {
            Some(st) if !changed(e, &st) => {}
            _ => {
                return Err(JobError::Failed(format!(
                    "{}: changed while it was being promoted; nothing was changed, try again",
                    show(&ns)
                )))
            }
        }
    }
    let busy = open_writers(fs, &j.path, &j.entries);
    if let Some(b) = busy.first() {
        return Err(JobError::Failed(format!(
            "{}: was opened for writing during the promotion; nothing was changed, try again",
            show(b)
        )));
    }
    j.state = State::Verified;
    j.save(&fs.local)
        .map_err(failed("writing the promotion journal (verified)"))?;
    crash_point("verified");
    Ok(())
}

/// Create every missing directory of the namespace directory `dir` on Atlas,
/// copying mode and ownership from the namespace's own directory of that name (as
/// root); any bytes in the names.
fn ensure_atlas_dirs(fs: &LabFs, dir: &OsStr) -> Result<OwnedFd> {
    match open_ns_dir(&fs.atlas, dir) {
        Ok(fd) => return Ok(fd),
        Err(e) if e.errno() == libc::ENOENT => {}
        Err(e) => return Err(e),
    }
    let (parent, name) = split(dir);
    let pfd = ensure_atlas_dirs(fs, parent)?;
    let tmpl = fs.locate(&Creds::root(), dir).ok().map(|l| l.stat);
    let mode = tmpl.map(|s| s.st_mode & 0o7777).unwrap_or(0o755);
    let _root = Creds::root().assume()?;
    crate::fs::backend::mkdir_like(pfd.as_raw_fd(), &cos(name)?, mode, tmpl)?;
    open_ns_dir(&fs.atlas, dir)
}

/// Make the Atlas parent chain of `path` exist (mirroring the namespace's directories)
/// and tag the directories of it that lie under a transitional rule, so the promoted
/// object is reachable through them once the local directories are gone.
pub fn ensure_parent_chain(fs: &LabFs, j: &Journal) -> Result<OwnedFd> {
    let (parent, _) = split(&j.path);
    let fd = ensure_atlas_dirs(fs, parent)?;
    let rules = fs.live().rules.clone();
    let mut cur = parent.to_os_string();
    let mut chain = Vec::new();
    while cur.as_bytes() != b"/" && rules.resolve(&cur).class == Class::Transitional {
        chain.push(cur.clone());
        cur = split(&cur).0.to_os_string();
    }
    for d in chain {
        if tag_text(fs, &d, tags::CLASS).is_none() {
            tag_existing(fs, &d, &tag_map(j, None))?;
        }
    }
    Ok(fd)
}

/// Tag an object already on Atlas (xattrs, else a store record).
fn tag_existing(fs: &LabFs, ns: &OsStr, t: &BTreeMap<String, String>) -> Result<()> {
    let (dir, name) = split(ns);
    let pfd = open_ns_dir(&fs.atlas, dir)?;
    let c = cos(name)?;
    let st = fstatat(pfd.as_raw_fd(), &c)?;
    let in_xattr = if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
        false
    } else {
        let flags = if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            libc::O_RDONLY | libc::O_DIRECTORY
        } else {
            libc::O_RDONLY
        };
        let fd = util::open_at(pfd.as_raw_fd(), &c, flags, 0)?;
        set_tag_xattrs(fd.as_raw_fd(), t)?
    };
    if !in_xattr {
        tags::write_record(&fs.atlas, ns, st.st_ino, t, true)?;
    }
    Ok(())
}

/// Test-only: `LABFS_PROMOTE_FAIL_AT=placing` makes putting the first unit in place
/// fail with EIO, after the parent chain was made (see docs/promote.md).
fn fail_hook() -> Result<()> {
    if std::env::var("LABFS_PROMOTE_FAIL_AT").is_ok_and(|v| v == "placing") {
        error!("LABFS_PROMOTE_FAIL_AT=placing: failing the commit (test hook)");
        return Err(crate::error::Error::Errno(libc::EIO));
    }
    Ok(())
}

/// Rename the commit units into place. On error: how many were renamed already; when
/// none was, what this job added on Atlas for the parent chain is removed again.
/// `all_records`: store records for every object (else for symlinks only: every
/// other object carries its tags as xattrs).
fn commit(
    fs: &LabFs,
    j: &Journal,
    all_records: bool,
) -> std::result::Result<(), (usize, JobError)> {
    let missing = missing_parents(fs, j);
    let undo = |e: (usize, JobError)| {
        if e.0 == 0 {
            undo_parent_chain(fs, &missing);
        }
        e
    };
    commit_units(fs, j, all_records).map_err(undo)
}

/// The directories of `j.path`'s parent chain that are missing on Atlas, deepest first.
fn missing_parents(fs: &LabFs, j: &Journal) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut cur = split(&j.path).0.to_os_string();
    while cur.as_bytes() != b"/" {
        match plan::atlas_lstat(fs, &cur) {
            Ok(None) => out.push(cur.clone()),
            _ => break,
        }
        cur = split(&cur).0.to_os_string();
    }
    out
}

/// Remove the parent directories this job made (deepest first) while they are still
/// empty, with their store records: a failed promotion leaves nothing on Atlas. A
/// directory another node put something into meanwhile stays, tags and all.
fn undo_parent_chain(fs: &LabFs, made: &[OsString]) {
    for d in made {
        let (parent, name) = split(d);
        let (Ok(pfd), Ok(c)) = (open_ns_dir(&fs.atlas, parent), cos(name)) else {
            return;
        };
        if util::unlink_at(pfd.as_raw_fd(), &c, true).is_err() {
            return;
        }
        tags::remove_record(&fs.atlas, d);
    }
}

fn commit_units(
    fs: &LabFs,
    j: &Journal,
    all_records: bool,
) -> std::result::Result<(), (usize, JobError)> {
    ensure_parent_chain(fs, j)
        .map_err(|e| (0, failed("creating the parent directories on Atlas")(e)))?;
    let sfd = staging_fd(fs, j).map_err(|e| (0, failed("opening the staging directory")(e)))?;
    let mut renamed = 0usize;
    let mut touched: BTreeSet<OsString> = BTreeSet::new();
    for e in j.entries.iter() {
        let ns = j.ns_path(e.rel());
        let (dir, name) = split(&ns);
        if !e.unit {
            if e.is_dir() && e.target_exists {
                // Merge into an existing directory: it becomes a promoted directory.
                tag_existing(fs, &ns, &tags_for(j, e))
                    .map_err(|err| (renamed, failed(format!("{}: tags", show(&ns)))(err)))?;
            }
            continue;
        }
        let res = (|| -> Result<()> {
            let sr = Journal::staged_rel(e.rel());
            let (sdir, sname) = split_rel(&sr);
            let from =
                util::open_under(sfd.as_raw_fd(), sdir, libc::O_PATH | libc::O_DIRECTORY, 0)?;
            let to = open_ns_dir(&fs.atlas, dir)?;
            let cname = cos(name)?;
            fail_hook()?;
            if e.target_exists {
                // --merge: replace the existing file (plain rename, atomic on NFS too).
                util::rename_at(
                    from.as_raw_fd(),
                    &cos(sname)?,
                    to.as_raw_fd(),
                    &cname,
                    false,
                )?;
            } else {
                place::place_new(
                    from.as_raw_fd(),
                    &cos(sname)?,
                    to.as_raw_fd(),
                    &cname,
                    e.is_dir(),
                    false,
                )?;
            }
            if e.is_dir() {
                // Renaming a directory may touch its times on some servers.
                let mut st = fstatat(to.as_raw_fd(), &cname)?;
                (st.st_atime, st.st_atime_nsec) = e.atime.pair();
                (st.st_mtime, st.st_mtime_nsec) = e.mtime.pair();
                util::set_times_at(to.as_raw_fd(), &cname, &st)?;
            }
            Ok(())
        })();
        if let Err(err) = res {
            let msg = if err.errno() == libc::EEXIST || err.errno() == libc::ENOTEMPTY {
                format!(
                    "{}: appeared on Atlas during the promotion; nothing was replaced",
                    show(&ns)
                )
            } else {
                format!("{}: renaming into place on Atlas: {err}", show(&ns))
            };
            return Err((renamed, JobError::Failed(msg)));
        }
        renamed += 1;
        touched.insert(dir.to_os_string());
    }
    for d in &touched {
        if let Ok(fd) = open_ns_dir(&fs.atlas, d) {
            util::fsync_dir(fd.as_raw_fd())
                .map_err(|e| (renamed, failed(format!("fsync of {} on Atlas", show(d)))(e)))?;
        }
    }
    write_store_records(fs, j, all_records).map_err(|e| (renamed, e))
}

/// Store records for every promoted object whose tags are not in its xattrs.
fn write_store_records(fs: &LabFs, j: &Journal, all: bool) -> JobResult<()> {
    let entries: Vec<&Entry> = j
        .entries
        .iter()
        .filter(|e| all || e.kind == EntryKind::Symlink)
        .collect();
    if entries.is_empty() {
        return Ok(());
    }
    let root = fs.atlas.open_dir("/").map_err(failed("Atlas root"))?;
    let sync_fd = util::syncfs_handle(root.as_raw_fd()).map_err(failed("Atlas root"))?;
    parallel(&entries, |e, _| {
        let ns = j.ns_path(e.rel());
        let (dir, name) = split(&ns);
        let pfd = open_ns_dir(&fs.atlas, dir).map_err(failed(format!("{} on Atlas", show(&ns))))?;
        let c = cos(name).map_err(failed(show(&ns)))?;
        let st = fstatat(pfd.as_raw_fd(), &c).map_err(failed(format!("{} on Atlas", show(&ns))))?;
        if tags::get_xattr(pfd.as_raw_fd(), &c, tags::CLASS).is_some() {
            return Ok(());
        }
        tags::write_record(&fs.atlas, &ns, st.st_ino, &tags_for(j, e), false).map_err(failed(
            format!("{}: writing its tag record on Atlas", show(&ns)),
        ))
    })?;
    util::syncfs(sync_fd.as_raw_fd()).map_err(failed("syncfs of Atlas after writing tag records"))
}

/// How long cleaning waits for files of the job that are still open through the mount.
/// close(2) returns before the kernel's RELEASE reaches the daemon (FUSE sends it in
/// the background, and over io_uring on another CPU's queue), so a file closed just
/// before `labfs promote` ran may still hold its handle for a moment.
const RELEASE_GRACE: Duration = Duration::from_millis(250);

/// The `(st_dev, st_ino)` of every file open through the mount, after waiting up to
/// [`RELEASE_GRACE`] for the job's own open files to be released (a file that really
/// stays open costs the promotion that wait once).
fn open_after_release_grace(fs: &LabFs, j: &Journal) -> HashSet<(u64, u64)> {
    let deadline = Instant::now() + RELEASE_GRACE;
    loop {
        let open = fs.handles.open_objects();
        let busy = j
            .entries
            .iter()
            .any(|e| !e.is_dir() && open.contains(&(e.dev, e.ino)));
        if !busy || Instant::now() >= deadline {
            return open;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Remove the local copy (only what was promoted, unchanged and not open), re-keying
/// each inode to its Atlas object and invalidating the kernel's caches. Returns how
/// many local objects were kept because they changed or were open. `recovering`: no inode table to
/// update, and every file is compared by content with both journal and Atlas first.
pub fn clean_entries(
    fs: &LabFs,
    j: &Journal,
    recovering: bool,
    warn_fn: &(dyn Fn(String) + Sync),
) -> JobResult<usize> {
    // Pass 1: decide what is kept, before any unlink changes link counts and ctimes.
    let keep: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());
    // Files open through the mount, by their local (dev, ino): the handles know them
    // even where the daemon holds no descriptor (passthrough).
    let open = if recovering {
        Default::default()
    } else {
        open_after_release_grace(fs, j)
    };
    // Digests of the first names of hard links (a link's own entry has its digest too,
    // but recovery checks the first name's, as the journal recorded it).
    let wanted: std::collections::HashSet<&OsStr> =
        j.entries.iter().filter_map(|e| e.link_to()).collect();
    let digests: HashMap<&OsStr, [u8; 32]> = j
        .entries
        .iter()
        .filter(|e| e.kind == EntryKind::File && wanted.contains(e.rel()))
        .filter_map(|e| e.digest.map(|d| (e.rel(), d)))
        .collect();
    drop(wanted);
    let files: Vec<u32> = (0..j.entries.len() as u32)
        .filter(|&i| !j.entries[i as usize].is_dir())
        .collect();
    let (local, atlas) = (local_dirs(fs), atlas_dirs(fs));
    parallel(&files, |&i, buf| {
        let e = &j.entries[i as usize];
        let ns = j.ns_path(e.rel());
        let Some(st) = lstat_in(&local, &ns).map_err(failed(show(&ns)))? else {
            return Ok(());
        };
        let why = if recovering {
            (!same_on_both(fs, e, &ns, &digests, buf)).then_some("changed since it was copied")
        } else if changed(e, &st) {
            Some("changed during the promotion")
        } else if open.contains(&(e.dev, e.ino))
            || fs
                .inodes
                .peek(&entry_key(e))
                .is_some_and(|ino| fs.handles.writers_of(ino) > 0)
        {
            // Removing it would leave the kernel's inode passing through to a
            // deleted file while new opens go to Atlas: keep it until it is closed.
            Some("open through the mount")
        } else {
            None
        };
        if let Some(why) = why {
            warn_fn(format!(
                "{}: {why}; its local copy is kept (and still shadows the promoted copy): \
                 promote again with --merge once it is closed",
                show(&ns)
            ));
            keep.lock().insert(i);
        }
        Ok(())
    })?;
    let keep = keep.into_inner();
    // Pass 2: files (in parallel), then directories, children before parents.
    let files: Vec<u32> = files.into_iter().filter(|i| !keep.contains(i)).collect();
    parallel(&files, |&i, _| {
        let dirs = (&local, &atlas);
        if remove_local(fs, j, &j.entries[i as usize], dirs, recovering, warn_fn)? && !recovering {
            crash_point("cleaning");
        }
        Ok(())
    })?;
    for e in j.entries.iter().rev().filter(|e| e.is_dir()) {
        remove_local(fs, j, e, (&local, &atlas), recovering, warn_fn)?;
    }
    if let Ok(fd) = open_ns_dir(&fs.local, split(&j.path).0) {
        let _ = util::fsync_dir(fd.as_raw_fd());
    }
    Ok(keep.len())
}

/// Remove one promoted object's local copy (re-keying its inode number to the Atlas
/// object first); `Ok(true)` when something was removed.
fn remove_local<L, A>(
    fs: &LabFs,
    j: &Journal,
    e: &Entry,
    (local, atlas): (&DirFds<L>, &DirFds<A>),
    recovering: bool,
    warn_fn: &(dyn Fn(String) + Sync),
) -> JobResult<bool>
where
    L: Fn(&OsStr) -> Result<OwnedFd> + Sync,
    A: Fn(&OsStr) -> Result<OwnedFd> + Sync,
{
    let ns = j.ns_path(e.rel());
    let shown = show(&ns);
    let (dir, name) = split(&ns);
    let pfd = match local.get(OsStr::new(dir)) {
        Ok(fd) => fd,
        Err(err) if err.errno() == libc::ENOENT => return Ok(false),
        Err(err) => return Err(failed(&shown)(err)),
    };
    let c = cos(name).map_err(failed(&shown))?;
    let Some(atlas_st) = lstat_in(atlas, &ns).map_err(failed(format!("{shown} on Atlas")))? else {
        // Never remove a local object whose Atlas copy is not there.
        warn_fn(format!(
            "{shown}: not found on Atlas; the local copy is kept"
        ));
        return Ok(false);
    };
    // The inode the kernel holds for the local object, if any: it follows the object
    // to Atlas, unless the object keeps other local names (hard links from outside the
    // promoted tree), which keep it (and their local data).
    let held = if recovering {
        None
    } else {
        fs.inodes.peek(&entry_key(e))
    };
    let atlas_key = crate::fs::key_of(BackendKind::Atlas, &atlas_st);
    match util::unlink_at(pfd.as_raw_fd(), &c, e.is_dir()) {
        Ok(()) => {
            if let Some(ino) = held {
                if let Err(err) = fs.promote_rebind(ino, &ns, &j.path, atlas_key) {
                    warn_fn(format!("{shown}: {err}; the kernel will look it up again"));
                }
            }
            Ok(true)
        }
        Err(err) if err.errno() == libc::ENOENT => Ok(false),
        Err(err)
            if e.is_dir() && (err.errno() == libc::ENOTEMPTY || err.errno() == libc::EEXIST) =>
        {
            // New files were created in it meanwhile (or kept ones are in it): it
            // stays as a structural local directory next to the promoted one.
            Ok(false)
        }
        Err(err) => Err(failed(format!("removing the local copy of {shown}"))(err)),
    }
}

/// Recovery's check before removing a local file: the local content, the journal's
/// digest and the Atlas copy all agree.
fn same_on_both(
    fs: &LabFs,
    e: &Entry,
    ns: &OsStr,
    digests: &HashMap<&OsStr, [u8; 32]>,
    buf: &mut [u8],
) -> bool {
    let never = || false;
    match e.kind {
        EntryKind::Symlink => {
            let (dir, name) = split(ns);
            let (Ok(l), Ok(a), Ok(c)) = (
                open_ns_dir(&fs.local, dir),
                open_ns_dir(&fs.atlas, dir),
                cos(name),
            ) else {
                return false;
            };
            matches!((util::readlink_at(l.as_raw_fd(), &c), util::readlink_at(a.as_raw_fd(), &c)), (Ok(x), Ok(y)) if x == y)
        }
        _ => {
            let want = if e.kind == EntryKind::Link {
                e.link_to().and_then(|r| digests.get(r).copied())
            } else {
                e.digest
            };
            let Some(want) = want else {
                return false;
            };
            let local = open_src(fs, ns, libc::O_RDONLY).ok();
            let atlas = open_ns(&fs.atlas, ns, libc::O_RDONLY).ok();
            let (Some(l), Some(a)) = (local, atlas) else {
                return false;
            };
            let dl = copy::digest_fd(l.as_fd(), buf, &never).ok();
            let da = copy::digest_fd(a.as_fd(), buf, &never).ok();
            match (dl, da) {
                (Some((x, _)), Some((y, _))) => x == y && *x.as_bytes() == want,
                _ => false,
            }
        }
    }
}

/// Remove what is left of the staging directory, then the journal.
pub fn finish(fs: &LabFs, j: &Journal) {
    remove_staging(fs, &j.staging);
    if let Err(e) = Journal::remove(&fs.local, &j.id) {
        warn!("promotion {}: cannot remove its journal: {e}", j.id);
    }
}

pub fn remove_staging(fs: &LabFs, staging: &str) {
    let (dir, name) = split(OsStr::new(staging));
    let Ok(pfd) = open_ns_dir(&fs.atlas, dir) else {
        return;
    };
    let Ok(c) = cos(name) else { return };
    if let Err(e) = util::remove_tree(pfd.as_raw_fd(), &c) {
        warn!("cannot remove the staging directory {staging} on Atlas: {e}");
    }
    let _ = util::fsync_dir(pfd.as_raw_fd());
}

/// Undo a job that did not reach commit: only the staging copy goes; the local
/// copy was never touched.
fn rollback(fs: &LabFs, j: &Journal) {
    remove_staging(fs, &j.staging);
    if let Err(e) = Journal::remove(&fs.local, &j.id) {
        warn!("promotion {}: cannot remove its journal: {e}", j.id);
    }
}
