//! Promotion of transitional data to Atlas (see docs/promote.md).
//!
//! - [`client`]: the `labfs promote` command (talks to the daemon through the mount).
//! - control hooks ([`control_get`], [`control_set`]): the daemon side of that protocol.
//! - [`engine`]: one job, on its own threads: plan, stage, verify, commit, clean.
//! - [`journal`]: the per-job journal on the local backend; [`recover`] replays it.
//! - [`atrisk`]: the at-risk report of `labfs status`.

pub mod atrisk;
pub mod client;
mod copy;
mod dirs;
mod engine;
pub mod job;
pub mod journal;
mod place;
mod plan;
pub mod recover;
pub mod util;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Serialize;
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::fs::{Ctx, LabFs};
use job::{Job, Phase, Request};

/// `setxattr(PATH, PROMOTE, request JSON)` starts a job.
pub const CTL_PROMOTE: &str = "user.labfs.ctl.promote";
/// `getxattr(PATH, "user.labfs.ctl.promote.<id>")` -> progress JSON; `setxattr` of
/// the same name with the value `cancel` cancels the job.
pub const CTL_JOB_PREFIX: &str = "user.labfs.ctl.promote.";

/// Finished jobs stay queryable this long.
const KEEP_FINISHED: Duration = Duration::from_secs(15 * 60);

struct Registry {
    jobs: Mutex<HashMap<String, Arc<Job>>>,
    fs: Mutex<Option<Weak<LabFs>>>,
    running: AtomicUsize,
    stopping: AtomicBool,
    refusals: job::RateLog,
    requests: job::RateLog,
    /// Jobs that ended `failed` since the daemon started (for monitoring).
    failed: std::sync::atomic::AtomicU64,
}

fn registry() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(|| Registry {
        jobs: Mutex::new(HashMap::new()),
        fs: Mutex::new(None),
        running: AtomicUsize::new(0),
        stopping: AtomicBool::new(false),
        refusals: job::RateLog::new(1),
        requests: job::RateLog::new(job::REQUEST_LOG_BURST),
        failed: std::sync::atomic::AtomicU64::new(0),
    })
}

/// Whether the daemon is stopping (jobs stop at their next safe point).
pub(crate) fn stopping() -> bool {
    registry().stopping.load(Ordering::Relaxed)
}

/// Whether a promotion of `path` (or a tree containing it) is under way.
pub fn in_flight<P: AsRef<std::ffi::OsStr> + ?Sized>(path: &P) -> bool {
    registry()
        .jobs
        .lock()
        .values()
        .any(|j| j.phase().is_active() && j.covers(path))
}

/// Complete or roll back promotions interrupted by a crash (journal replay); probe
/// whether Atlas takes user xattrs. Runs before the mount serves requests.
pub fn recover_on_mount(fs: &Arc<LabFs>) {
    crate::fs::xattr::set_promotion_probe(|p: &std::ffi::OsStr| in_flight(p));
    *registry().fs.lock() = Some(Arc::downgrade(fs));
    registry().stopping.store(false, Ordering::Relaxed);
    if fs.health.is_down() {
        warn!("Atlas is not answering at mount: promotion recovery and the xattr probe are deferred to the next mount");
        return;
    }
    crate::tags::probe(&fs.atlas);
    if let crate::atlas_id::Squash::Yes(_) = crate::atlas_id::root_squash() {
        warn!("{}", crate::atlas_id::SQUASH_HELP);
    }
    recover::run(fs);
}

/// Stop jobs at a safe point before unmounting: copies stop between chunks, the
/// journal stays, and the next mount completes or rolls back each job.
pub fn shutdown(_fs: &Arc<LabFs>) {
    let r = registry();
    r.stopping.store(true, Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(20);
    while r.running.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let left = r.running.load(Ordering::Relaxed);
    if left > 0 {
        warn!("{left} promotion(s) still running at shutdown; the next mount recovers them from the journal");
    }
}

/// A job as `labfs status` lists it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct InFlight {
    pub id: String,
    /// The namespace path, bytes that are not UTF-8 shown as `\xNN`.
    pub path: String,
    /// The path's bytes in hex, only when it is not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_hex: Option<String>,
    pub state: String,
    pub files_done: u64,
    pub files_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub rate_bytes_per_sec: u64,
    pub elapsed_secs: f64,
}

/// Promotions not finished yet.
pub fn in_flight_list() -> Vec<InFlight> {
    let mut v: Vec<InFlight> = registry()
        .jobs
        .lock()
        .values()
        .filter(|j| j.phase().is_active())
        .map(|j| {
            let p = j.progress();
            InFlight {
                id: p.id,
                path: p.path,
                path_hex: p.path_hex,
                state: p.state,
                files_done: p.files_done,
                files_total: p.files_total,
                bytes_done: p.bytes_done,
                bytes_total: p.bytes_total,
                rate_bytes_per_sec: p.rate_bytes_per_sec,
                elapsed_secs: p.elapsed_secs,
            }
        })
        .collect();
    v.sort_by(|a, b| a.path.cmp(&b.path));
    v
}

/// Answer a promote control getxattr; `None` when `name` is not one of ours.
pub fn control_get(_fs: &LabFs, ctx: &Ctx, _ino: u64, name: &str) -> Option<Result<Vec<u8>>> {
    if name == CTL_PROMOTE {
        // The caller's jobs (all for root), newest first, bounded to fit an xattr.
        let mut jobs: Vec<Arc<Job>> = registry()
            .jobs
            .lock()
            .values()
            .filter(|j| ctx.uid == 0 || j.ctx.uid == ctx.uid)
            .cloned()
            .collect();
        jobs.sort_by_key(|j| std::cmp::Reverse(j.created));
        let list: Vec<job::Progress> = jobs.iter().take(50).map(|j| j.progress()).collect();
        return Some(Ok(serde_json::to_vec(&list).unwrap_or_default()));
    }
    let id = name.strip_prefix(CTL_JOB_PREFIX)?;
    let job = registry().jobs.lock().get(id).cloned();
    Some(match job {
        Some(j) if ctx.uid == 0 || j.ctx.uid == ctx.uid => {
            Ok(serde_json::to_vec(&j.progress()).unwrap_or_default())
        }
        _ => Err(Error::Errno(libc::ENODATA)),
    })
}

/// Handle a promote control setxattr; `None` when `name` is not one of ours.
///
/// Starting a job does no I/O here (this runs on a FUSE thread): the request is
/// parsed, the namespace path computed from the inode, and the job handed to its own
/// thread, which checks everything else and reports through the progress JSON.
pub fn control_set(
    fs: &LabFs,
    ctx: &Ctx,
    ino: u64,
    name: &str,
    value: &[u8],
) -> Option<Result<()>> {
    if let Some(id) = name.strip_prefix(CTL_JOB_PREFIX) {
        let job = registry().jobs.lock().get(id).cloned();
        return Some(match job {
            Some(j)
                if (ctx.uid == 0 || j.ctx.uid == ctx.uid) && value.trim_ascii() == b"cancel" =>
            {
                j.cancel.store(true, Ordering::Relaxed);
                Ok(())
            }
            Some(_) => Err(Error::Errno(libc::EINVAL)),
            None => Err(Error::Errno(libc::ENODATA)),
        });
    }
    if name != CTL_PROMOTE {
        return None;
    }
    Some(start(fs, ctx, ino, value))
}

fn start(fs: &LabFs, ctx: &Ctx, ino: u64, value: &[u8]) -> Result<()> {
    let req: Request = serde_json::from_slice(value).map_err(|_| Error::Errno(libc::EINVAL))?;
    if !Request::valid_id(&req.id) {
        return Err(Error::Errno(libc::EINVAL));
    }
    let base = fs.npath_of(ino)?;
    let path = match &req.name {
        Some(n) => {
            crate::fs::check_name(n)?;
            crate::fs::object::join(&base, n)
        }
        None => base,
    };
    let shown = util::show(&path);
    let r = registry();
    let arc =
        r.fs.lock()
            .as_ref()
            .and_then(Weak::upgrade)
            .filter(|a| std::ptr::eq(Arc::as_ptr(a), fs))
            .ok_or(Error::Errno(libc::EBUSY))?;
    if r.stopping.load(Ordering::Relaxed) {
        return Err(Error::Errno(libc::ESHUTDOWN));
    }
    let job = Arc::new(Job::new(
        req.id.clone(),
        path.clone(),
        *ctx,
        fs.creds(ctx),
        &req,
    ));
    {
        let mut jobs = r.jobs.lock();
        jobs.retain(|_, j| j.finished_for().is_none_or(|d| d < KEEP_FINISHED));
        if jobs.contains_key(&req.id) {
            return Err(Error::Errno(libc::EEXIST));
        }
        if let Err(why) = job::admit(&mut jobs, ctx.uid) {
            // Per-uid limits (docs/promote.md): EBUSY (a FUSE setxattr answered EAGAIN reaches
            // the caller as EOPNOTSUPP), one log line per user and interval.
            if let Some(suppressed) = r.refusals.allow(ctx.uid) {
                let more = if suppressed > 0 {
                    format!(" ({suppressed} more refused since the last line)")
                } else {
                    String::new()
                };
                match why {
                    job::Admission::UserBusy { active } => warn!(
                        uid = ctx.uid,
                        "promotion of {shown} refused: uid {} has {active} promotions in flight (limit {}){more}",
                        ctx.uid,
                        job::MAX_ACTIVE_PER_UID
                    ),
                    job::Admission::TableFull => warn!(
                        uid = ctx.uid,
                        "promotion of {shown} refused: {} promotions are in flight, none finished to forget{more}",
                        job::MAX_JOBS
                    ),
                }
            }
            return Err(Error::Errno(libc::EBUSY));
        }
        let overlapping = jobs
            .values()
            .find(|j| j.phase().is_active() && (j.covers(&path) || job::covers(&path, &j.path)))
            .map(|j| j.path.clone());
        jobs.insert(req.id.clone(), job.clone());
        if let Some(other) = overlapping {
            job.set_error(format!(
                "{shown}: a promotion of {} is already running; wait for it to finish",
                util::show(&other)
            ));
            job.set_phase(Phase::Refused);
            return Ok(());
        }
    }
    match r.requests.allow(ctx.uid) {
        Some(suppressed) => {
            if suppressed > 0 {
                info!(
                    uid = ctx.uid,
                    "{suppressed} promotion requests of uid {} not logged", ctx.uid
                );
            }
            info!(id = %req.id, uid = ctx.uid, "promotion of {shown} requested");
        }
        None => job.quiet.store(true, Ordering::Relaxed),
    }
    r.running.fetch_add(1, Ordering::Relaxed);
    let spawned = std::thread::Builder::new()
        .name(format!("promote-{}", &req.id[..8.min(req.id.len())]))
        .spawn({
            let job = job.clone();
            move || {
                engine::run(&arc, &job);
                if job.phase() == Phase::Failed {
                    registry().failed.fetch_add(1, Ordering::Relaxed);
                }
                registry().running.fetch_sub(1, Ordering::Relaxed);
            }
        });
    if let Err(e) = spawned {
        r.running.fetch_sub(1, Ordering::Relaxed);
        job.set_error(format!("cannot start a promotion thread: {e}"));
        job.set_phase(Phase::Failed);
        r.failed.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// The status fields promotion adds to `labfs status`.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct StatusPart {
    /// `xattr` or `store` (where stored tags live on Atlas).
    pub xattr_mode: String,
    /// `yes` (Atlas squashes root), `no`, or `unknown` (not probed: `--allow-unmarked`).
    #[serde(default)]
    pub root_squash: String,
    pub promotions: Vec<InFlight>,
    /// Promotions that failed since the mount.
    #[serde(default)]
    pub promotions_failed: u64,
    pub at_risk: atrisk::AtRisk,
}

/// Collect promotion's part of `labfs status`; `full`: the complete at-risk walk.
pub fn status_part(fs: &LabFs, full: bool) -> StatusPart {
    StatusPart {
        xattr_mode: crate::tags::mode().as_str().to_string(),
        root_squash: match crate::atlas_id::root_squash() {
            crate::atlas_id::Squash::Yes(_) => "yes",
            crate::atlas_id::Squash::No => "no",
            crate::atlas_id::Squash::Unknown => "unknown",
        }
        .to_string(),
        promotions: in_flight_list(),
        promotions_failed: registry().failed.load(Ordering::Relaxed),
        at_risk: atrisk::report(fs, full),
    }
}

/// The promotion lines of the `labfs status` table: xattr mode, promotions in flight
/// and the at-risk report (oldest first).
pub fn print_status(v: &serde_json::Value) {
    let mode = v["xattr_mode"].as_str().unwrap_or("?");
    let what = match mode {
        "xattr" => "tags are user.labfs.* xattrs on Atlas",
        "store" => "Atlas has no user xattrs; tags are kept in ATLAS/.labfs/tags",
        _ => "not probed",
    };
    println!("xattr mode: {mode} ({what})");
    match v["root_squash"].as_str().unwrap_or("unknown") {
        "yes" => println!("root squash: YES. {}", crate::atlas_id::SQUASH_HELP),
        "no" => println!("root squash: no (root on this node is root on Atlas)"),
        _ => println!("root squash: unknown (not probed)"),
    }
    let jobs: Vec<InFlight> = serde_json::from_value(v["promotions"].clone()).unwrap_or_default();
    if jobs.is_empty() {
        println!("promotions in flight: none");
    } else {
        println!("promotions in flight: {}", jobs.len());
        for j in &jobs {
            println!(
                "  {:<40} {:<10} {}/{} files  {}/{}  {}/s",
                j.path,
                j.state,
                j.files_done,
                j.files_total,
                engine::human(j.bytes_done),
                engine::human(j.bytes_total),
                engine::human(j.rate_bytes_per_sec)
            );
        }
    }
    let r: atrisk::AtRisk = serde_json::from_value(v["at_risk"].clone()).unwrap_or_default();
    let cut = if r.complete {
        String::new()
    } else {
        format!(
            " (walk stopped after {} entries: counts are a lower bound; `labfs status --full` walks everything)",
            r.entries_visited
        )
    };
    if r.subtrees.is_empty() {
        println!("at risk (transitional data not yet promoted): none{cut}");
    } else {
        println!(
            "at risk (transitional data not yet promoted): {} in {} file(s), {} subtree(s){cut}",
            engine::human(r.total_bytes),
            r.total_files,
            r.subtrees.len()
        );
        println!(
            "  {:<40} {:>10} {:>8}  {:<8} OLDEST",
            "SUBTREE", "SIZE", "FILES", "AGE"
        );
        for s in &r.subtrees {
            let mut notes = String::new();
            if s.promoting {
                notes.push_str("  (promoting)");
            }
            if !s.complete {
                notes.push_str("  (not walked to the end: more may exist)");
            }
            if s.overdue {
                let max = s.max_unpromoted_secs.unwrap_or(0) as i64;
                notes.push_str(&format!("  OVERDUE (max_unpromoted {})", atrisk::age(max)));
            }
            println!(
                "  {:<40} {:>10} {:>8}  {:<8} {}{notes}",
                s.path,
                engine::human(s.bytes),
                s.files,
                atrisk::age(s.age_secs),
                s.oldest,
            );
            for f in &s.named {
                println!("      {f}");
            }
            let unnamed = s.files.saturating_sub(s.named.len() as u64);
            if unnamed > 0 {
                println!(
                    "      ... and {unnamed} more file(s) (`labfs status --full` names them all)"
                );
            }
        }
    }
    if !r.not_reached.is_empty() {
        println!(
            "  not reached by the walk ({} director{}; may hold more at-risk data):",
            r.not_reached.len(),
            if r.not_reached.len() == 1 { "y" } else { "ies" }
        );
        for d in &r.not_reached {
            println!("      {d}");
        }
    }
}
