//! `labfs promote [--json] [--merge] [--wait] PATH...`: the client side of the control
//! protocol. Everything travels through the mount itself (xattr calls on the path),
//! so it works from the host and from a container that bind-mounts only a subpath.
//!
//! 1. The request goes to the directory that contains PATH (`setxattr(DIR,
//!    "user.labfs.ctl.promote", {"id":ID,"name":NAME,...})`), or to PATH itself when
//!    PATH is the root of what this process sees of the mount (a bind-mount root,
//!    whose parent is outside the mount). ID is chosen here (random).
//! 2. Progress is polled with `getxattr(DIR, "user.labfs.ctl.promote.ID")` (JSON).
//! 3. Ctrl-C sends `setxattr(DIR, "user.labfs.ctl.promote.ID", "cancel")`.

use std::ffi::{CString, OsStr};
use std::io::{self, IsTerminal, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::job::{Progress, Request};
use super::{CTL_JOB_PREFIX, CTL_PROMOTE};
use crate::exit::{EXIT_FAIL, EXIT_OK};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn c_path(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn c_name(name: &str) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn lget(target: &Path, name: &str) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 1 << 16];
    let n = crate::sys::lgetxattr(&c_path(target)?, &c_name(name)?, &mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

fn lset(target: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    crate::sys::lsetxattr(&c_path(target)?, &c_name(name)?, value, 0)
}

/// The mount id of a path (statx), without following a final symlink.
fn mount_id(p: &Path) -> Option<u64> {
    use rustix::fs::{statx, AtFlags, StatxFlags, CWD};
    let sx = statx(CWD, p, AtFlags::SYMLINK_NOFOLLOW, StatxFlags::MNT_ID).ok()?;
    (sx.stx_mask & StatxFlags::MNT_ID.bits() != 0).then_some(sx.stx_mnt_id)
}

/// Where the request goes: `(directory or object, name inside it)`.
fn control_target(path: &Path) -> io::Result<(PathBuf, Option<std::ffi::OsString>)> {
    let name = match path.file_name() {
        Some(n) if n != OsStr::new(".") && n != OsStr::new("..") => n,
        _ => return Ok((std::fs::canonicalize(path)?, None)),
    };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let parent = std::fs::canonicalize(parent)?;
    let me = parent.join(name);
    let pm = std::fs::symlink_metadata(&parent)?;
    let mm = std::fs::symlink_metadata(&me)?;
    let is_mount_root = match (mount_id(&parent), mount_id(&me)) {
        (Some(a), Some(b)) => a != b,
        _ => pm.dev() != mm.dev(),
    };
    if is_mount_root {
        return Ok((me, None));
    }
    Ok((parent, Some(name.to_os_string())))
}

fn human(b: u64) -> String {
    super::engine::human(b)
}

fn explain_errno(e: &io::Error, shown: &str, target: &Path) -> String {
    match e.raw_os_error() {
        Some(libc::ENODATA) | Some(libc::EOPNOTSUPP) => format!("{shown}: not on a labfs mount"),
        Some(libc::EACCES) | Some(libc::EPERM) => format!(
            "{shown}: permission denied: promoting needs write permission on {}",
            super::util::show(target.as_os_str())
        ),
        Some(libc::ENOTCONN) => format!("{shown}: the labfs daemon of this mount is not running"),
        // The daemon died while answering: the kernel aborts the connection (over
        // FUSE-over-io_uring a request the daemon held when it died ends ECANCELED).
        Some(libc::ECONNABORTED) | Some(libc::ECANCELED) => format!(
            "{shown}: the labfs daemon of this mount stopped while answering; if a promotion \
             had started, the next mount completes or rolls it back from its journal"
        ),
        Some(libc::ETIMEDOUT) => format!("{shown}: Atlas is not answering; try again later"),
        Some(libc::ESHUTDOWN) => {
            format!("{shown}: the labfs daemon is stopping; try again after it is mounted again")
        }
        Some(libc::EBUSY) => {
            format!("{shown}: the labfs daemon is busy or still starting; try again")
        }
        _ => format!("{shown}: {e}"),
    }
}

/// Why the daemon answered EBUSY to a new job: the caller's own promotions in flight
/// (its job list says how many), else a daemon still starting or full.
fn explain_busy(shown: &str, target: &Path) -> String {
    let active = lget(target, CTL_PROMOTE)
        .ok()
        .and_then(|raw| serde_json::from_slice::<Vec<Progress>>(&raw).ok())
        .map(|v| v.iter().filter(|p| !p.done).count())
        .unwrap_or(0);
    let limit = super::job::MAX_ACTIVE_PER_UID;
    if active >= limit {
        format!(
            "{shown}: refused (EBUSY): you already have {active} promotions in flight, the most \
             one user may have at once ({limit}); wait for one to finish (`labfs promote` shows \
             them, `labfs status` too) and try again"
        )
    } else {
        format!(
            "{shown}: refused (EBUSY): the labfs daemon cannot take a promotion right now (it is \
             still starting, or its job table is full of running promotions); try again later"
        )
    }
}

/// `labfs promote`: returns the exit code (0 all promoted or already promoted,
/// 1 any refused or failed).
pub fn run(paths: &[PathBuf], json: bool, merge: bool, wait: bool) -> i32 {
    if let Err(e) = crate::sys::raise_flag_on_sigint(&INTERRUPTED) {
        eprintln!("labfs: cannot catch SIGINT ({e}); ^C ends the command at once");
    }
    let mut code = EXIT_OK;
    for p in paths {
        if INTERRUPTED.load(Ordering::Relaxed) {
            code = EXIT_FAIL;
            break;
        }
        if promote_one(p, json, merge, wait) != EXIT_OK {
            code = EXIT_FAIL;
        }
    }
    code
}

fn fail(json: bool, path: &str, msg: String) -> i32 {
    eprintln!("labfs: {msg}");
    if json {
        let v = serde_json::json!({"path": path, "state": "refused", "done": true, "error": msg});
        println!("{v}");
    }
    EXIT_FAIL
}

fn promote_one(path: &Path, json: bool, merge: bool, wait: bool) -> i32 {
    let shown = super::util::show(path.as_os_str());
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) => return fail(json, &shown, format!("{shown}: {e}")),
    };
    let ft = meta.file_type();
    if ft.is_fifo() || ft.is_socket() || ft.is_block_device() || ft.is_char_device() {
        return fail(
            json,
            &shown,
            format!("{shown}: is a special file (fifo, socket or device); promotion does not copy those"),
        );
    }
    let (target, name) = match control_target(path) {
        Ok(t) => t,
        Err(e) => return fail(json, &shown, format!("{shown}: {e}")),
    };
    // Is this a labfs mount at all? (Listing jobs is cheap and changes nothing.)
    match lget(&target, CTL_PROMOTE) {
        Ok(_) => {}
        Err(e) if e.raw_os_error() == Some(libc::ERANGE) => {}
        Err(e) => return fail(json, &shown, explain_errno(&e, &shown, &target)),
    }
    let mut id = super::util::random_hex(8);
    let mut tries = 0;
    loop {
        let req = Request {
            id: id.clone(),
            name: name.clone(),
            merge,
            wait,
            ino: Some(meta.ino()),
        };
        let body = serde_json::to_vec(&req).unwrap_or_default();
        match lset(&target, CTL_PROMOTE, &body) {
            Ok(()) => break,
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) && tries < 3 => {
                tries += 1;
                id = super::util::random_hex(8);
            }
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                return fail(json, &shown, explain_busy(&shown, &target))
            }
            Err(e)
                if e.raw_os_error() == Some(libc::EINVAL)
                    && name.as_deref().is_some_and(|n| n.to_str().is_none())
                    && lget(&target, crate::control::PROTOCOL_NAME).is_err() =>
            {
                return fail(
                    json,
                    &shown,
                    format!(
                        "{shown}: refused (EINVAL): the labfs daemon of this mount speaks control \
                         protocol 1, which may not take a name that is not UTF-8; mount with this \
                         labfs (control protocol {})",
                        crate::control::PROTOCOL
                    ),
                )
            }
            Err(e) => return fail(json, &shown, explain_errno(&e, &shown, &target)),
        }
    }
    let key = format!("{CTL_JOB_PREFIX}{id}");
    let tty = io::stderr().is_terminal();
    let mut cancelled_at: Option<Instant> = None;
    let mut last_len = 0usize;
    let progress = loop {
        let p = match lget(&target, &key) {
            Ok(raw) => match serde_json::from_slice::<Progress>(&raw) {
                Ok(p) => p,
                Err(e) => {
                    return fail(
                        json,
                        &shown,
                        format!("{shown}: unreadable progress from the daemon: {e}"),
                    )
                }
            },
            Err(e) => {
                if tty && last_len > 0 {
                    eprintln!();
                }
                let msg = match e.raw_os_error() {
                    Some(libc::ENOTCONN)
                    | Some(libc::ENODATA)
                    | Some(libc::ECONNABORTED)
                    | Some(libc::ECANCELED) => format!(
                        "{shown}: the labfs daemon stopped during the promotion; the next mount completes \
                         or rolls it back from its journal (check with `labfs status`)"
                    ),
                    _ => explain_errno(&e, &shown, &target),
                };
                return fail(json, &shown, msg);
            }
        };
        if p.done {
            break p;
        }
        if INTERRUPTED.load(Ordering::Relaxed) && cancelled_at.is_none() {
            let _ = lset(&target, &key, b"cancel");
            cancelled_at = Some(Instant::now());
        }
        if tty {
            let line = format!(
                "promoting {shown}: {} {}/{} files, {}/{}{}",
                p.state,
                p.files_done,
                p.files_total,
                human(p.bytes_done),
                human(p.bytes_total),
                if p.rate_bytes_per_sec > 0 {
                    format!(", {}/s", human(p.rate_bytes_per_sec))
                } else {
                    String::new()
                }
            );
            let mut err = io::stderr().lock();
            let _ = write!(err, "\r{line}\x1b[K");
            let _ = err.flush();
            last_len = line.len();
        }
        std::thread::sleep(poll_interval(p.elapsed_secs));
    };
    if tty && last_len > 0 {
        let mut err = io::stderr().lock();
        let _ = write!(err, "\r\x1b[K");
        let _ = err.flush();
    }
    if json {
        println!("{}", serde_json::to_string(&progress).unwrap_or_default());
    }
    for w in &progress.warnings {
        eprintln!("labfs: warning: {w}");
    }
    match progress.state.as_str() {
        "done" => {
            if !json {
                println!(
                    "promoted {shown}: {} file(s), {} in {:.1} s{}",
                    progress.files_total,
                    human(progress.bytes_total),
                    progress.elapsed_secs,
                    if progress.rate_bytes_per_sec > 0 {
                        format!(" ({}/s)", human(progress.rate_bytes_per_sec))
                    } else {
                        String::new()
                    }
                );
            }
            EXIT_OK
        }
        "already-promoted" => {
            if !json {
                println!(
                    "{}",
                    progress.message.as_deref().unwrap_or("already promoted")
                );
            }
            EXIT_OK
        }
        _ => {
            eprintln!(
                "labfs: {}",
                progress
                    .error
                    .as_deref()
                    .unwrap_or("the promotion did not complete")
            );
            EXIT_FAIL
        }
    }
}

/// How long the client waits between two progress polls of a job that has run for
/// `elapsed` seconds: the end of a short job is seen within 10 ms (a poll is one
/// getxattr round trip, ~50 µs of daemon time), a long one's within 200 ms.
fn poll_interval(elapsed: f64) -> Duration {
    Duration::from_millis(if elapsed < 2.0 {
        10
    } else if elapsed < 10.0 {
        20
    } else {
        200
    })
}
