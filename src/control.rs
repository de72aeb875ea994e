//! The control path: requests that travel through the mount itself, so they work
//! from the host and from inside a container that bind-mounts only a subpath.
//!
//! A control request is an xattr call on any path of the mount, with a name under
//! `user.labfs.ctl.` (never listed, never stored):
//! - `getfattr -n user.labfs.ctl.status PATH` -> the mount's status as JSON, or a
//!   summary when the report is larger than one xattr value may be (64 KiB).
//! - `getfattr -n user.labfs.ctl.status.piece.TOKEN.MODE.OFFSET PATH` -> the bytes
//!   [OFFSET, OFFSET + 32 KiB) of the status report generated for TOKEN (a name the
//!   client picks; MODE `quick` or `full`); a piece shorter than 32 KiB is the last.
//!   Every piece of one token comes from one report (kept for two minutes), so the
//!   pieces fit together. `labfs status` reads the report this way.
//! - `getfattr -n user.labfs.ctl.explain PATH` -> PATH's placement as JSON.
//! - `getfattr -n user.labfs.ctl.explain:REST DIR` -> the placement of DIR/REST, which
//!   need not exist (REST: a relative path, any bytes but NUL; `labfs explain` uses it
//!   for paths that do not exist yet and for symlinks, which cannot carry user xattrs).
//!   The kernel caps an xattr name at 255 bytes, so REST at 232.
//! - `getfattr -n user.labfs.ctl.protocol PATH` -> the protocol version, `2`. A daemon
//!   without it speaks version 1, which took control names as UTF-8 only (a name with
//!   other bytes went to the backend as an ordinary xattr).
//! - `setfattr -n user.labfs.ctl.reload -v 1 PATH` -> re-read the rules file (root
//!   only; EINVAL and the old rules stay when the file is invalid). `labfs reload`.
//! - `setfattr -n user.labfs.ctl.promote -v JSON DIR` -> start a promotion job;
//!   `getfattr -n user.labfs.ctl.promote.ID DIR` -> its progress (JSON);
//!   `getfattr -n user.labfs.ctl.promote DIR` -> the caller's jobs. `labfs promote`
//!   (protocol: src/promote/client.rs, docs/promote.md).
//!
//! Paths are bytes (any name a backend can hold): in a request's xattr name as they
//! are, in a request's JSON as a string when they are UTF-8, else `{"hex": ...}` (the
//! promote request's `name`, the journal's form); in a reply as `path`, the form
//! [`crate::check::shown`] prints (`\xNN` for a byte that is not UTF-8, so every
//! client reads it as a string), plus `path_hex`, the exact bytes in hex, when they are
//! not UTF-8.
//!
//! Control names are answered before anything reaches a backend, whatever their bytes.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use crate::error::Result;
use crate::fs::xattr::XattrOut;
use crate::fs::{Ctx, LabFs};

pub const PREFIX: &str = "user.labfs.ctl.";
pub const STATUS: &str = "user.labfs.ctl.status";
pub const EXPLAIN: &str = "user.labfs.ctl.explain";
/// `EXPLAIN_BELOW` + a relative path: the placement of a path below the inode.
pub const EXPLAIN_BELOW: &str = "user.labfs.ctl.explain:";
pub const RELOAD: &str = "user.labfs.ctl.reload";
/// The control protocol version ([`PROTOCOL`]) as ASCII digits.
pub const PROTOCOL_NAME: &str = "user.labfs.ctl.protocol";
/// 2: paths in control names and replies are bytes. A daemon that does not answer
/// [`PROTOCOL_NAME`] speaks 1 (UTF-8 names only).
pub const PROTOCOL: u32 = 2;
/// `STATUS_PIECE` + `TOKEN.MODE.OFFSET`: one piece of a status report.
pub const STATUS_PIECE: &str = "user.labfs.ctl.status.piece.";
/// The size of every status piece but the last.
pub const PIECE_BYTES: usize = 32 * 1024;
/// The largest value returned whole for [`STATUS`].
const WHOLE_MAX: usize = 60 * 1024;
/// How long a report stays available to the pieces of its token.
const REPORT_TTL: std::time::Duration = std::time::Duration::from_secs(120);

/// A request token for [`STATUS_PIECE`]: unique per call on this host.
pub fn status_token() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    format!(
        "{:x}-{:x}-{:x}",
        std::process::id(),
        nanos,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

type Reports =
    std::collections::HashMap<(u32, String), (std::time::Instant, std::sync::Arc<Vec<u8>>)>;

fn reports() -> &'static parking_lot::Mutex<Reports> {
    static R: std::sync::OnceLock<parking_lot::Mutex<Reports>> = std::sync::OnceLock::new();
    R.get_or_init(Default::default)
}

/// The piece `rest` (`TOKEN.MODE.OFFSET`) of a status report.
fn status_piece(fs: &LabFs, ctx: &Ctx, rest: &str) -> Result<Vec<u8>> {
    let einval = crate::error::Error::Errno(libc::EINVAL);
    let mut it = rest.rsplitn(3, '.');
    let (Some(offset), Some(mode), Some(token)) = (it.next(), it.next(), it.next()) else {
        return Err(einval);
    };
    let offset: usize = offset.parse().map_err(|_| einval)?;
    let full = match mode {
        "quick" => false,
        "full" => true,
        _ => return Err(crate::error::Error::Errno(libc::EINVAL)),
    };
    if token.is_empty() || token.len() > 64 {
        return Err(crate::error::Error::Errno(libc::EINVAL));
    }
    let key = (ctx.uid, format!("{token}.{mode}"));
    let now = std::time::Instant::now();
    let cached = {
        let mut r = reports().lock();
        r.retain(|_, (t, _)| now.duration_since(*t) < REPORT_TTL);
        r.get(&key).map(|(_, v)| v.clone())
    };
    let report = match cached {
        Some(v) => v,
        None if offset > 0 => {
            // The report of this token is gone (expired): the client starts over.
            return Err(crate::error::Error::Errno(libc::ESTALE));
        }
        None => {
            let v = std::sync::Arc::new(crate::status::collect(fs, full).to_json().into_bytes());
            let mut r = reports().lock();
            if r.len() >= 64 {
                // Bounded: drop the oldest.
                if let Some(oldest) = r
                    .iter()
                    .min_by_key(|(_, (t, _))| *t)
                    .map(|(k, _)| k.clone())
                {
                    r.remove(&oldest);
                }
            }
            r.insert(key, (now, v.clone()));
            v
        }
    };
    let start = offset.min(report.len());
    let end = (start + PIECE_BYTES).min(report.len());
    Ok(report[start..end].to_vec())
}

/// The whole report for [`STATUS`], or a summary when it is too large for one value.
fn status_whole(fs: &LabFs) -> Vec<u8> {
    let s = crate::status::collect(fs, false);
    let json = s.to_json().into_bytes();
    if json.len() <= WHOLE_MAX {
        return json;
    }
    let summary = serde_json::json!({
        "rules_file": s.rules_file,
        "atlas_health": s.atlas_health,
        "at_risk_total_bytes": s.promote.at_risk.total_bytes,
        "at_risk_total_files": s.promote.at_risk.total_files,
        "at_risk_subtrees": s.promote.at_risk.subtrees.len(),
        "truncated": format!(
            "the report is {} bytes, more than one xattr value holds: `labfs status` reads it in pieces ({STATUS_PIECE}TOKEN.MODE.OFFSET)",
            json.len()
        ),
    });
    serde_json::to_vec(&summary).unwrap_or_default()
}

/// The placement of `path` (a namespace path) as `labfs explain` shows it.
fn explain_path(fs: &LabFs, ctx: &Ctx, path: &OsStr) -> Result<Vec<u8>> {
    let live = fs.live();
    let (mut e, exists) = match fs.locate(&fs.creds(ctx), path) {
        Ok(loc) => {
            let mut e = crate::explain::Explained::from_placement(
                &loc.path,
                &loc.placement,
                live.rules.unplaced(),
            );
            e.backend = loc.backend.to_string();
            e.state = fs.virtual_xattr(&loc, "user.labfs.state");
            if let Some(c) = fs.virtual_xattr(&loc, "user.labfs.class") {
                e.class = c;
            }
            (e, true)
        }
        Err(err) if err.errno() == libc::ENOENT || err.errno() == libc::ENOTDIR => {
            let p = live.rules.resolve(path);
            (
                crate::explain::Explained::from_placement(path, &p, live.rules.unplaced()),
                false,
            )
        }
        Err(err) => return Err(err),
    };
    if !exists {
        e.state = Some("does not exist yet".into());
    }
    Ok(serde_json::to_vec(&e).unwrap_or_default())
}

/// getxattr as the mount answers it: a control name here, anything else by the core.
pub fn getxattr(fs: &LabFs, ctx: &Ctx, ino: u64, name: &OsStr, size: u32) -> Result<XattrOut> {
    if let Some(v) = get(fs, ctx, ino, name)? {
        return crate::fs::xattr::sized(v, size);
    }
    fs.getxattr(ctx, ino, name, size)
}

/// setxattr as the mount answers it: a control name here, anything else by the core.
pub fn setxattr(
    fs: &LabFs,
    ctx: &Ctx,
    ino: u64,
    name: &OsStr,
    value: &[u8],
    flags: i32,
) -> Result<()> {
    if set(fs, ctx, ino, name, value)? {
        return Ok(());
    }
    fs.setxattr(ctx, ino, name, value, flags)
}

/// Answer a control getxattr; `None` when `name` is not a control name.
pub fn get(fs: &LabFs, ctx: &Ctx, ino: u64, name: &OsStr) -> Result<Option<Vec<u8>>> {
    let bytes = name.as_bytes();
    if !bytes.starts_with(PREFIX.as_bytes()) {
        return Ok(None);
    }
    if let Some(rest) = bytes.strip_prefix(EXPLAIN_BELOW.as_bytes()) {
        let mut path = fs.npath_of(ino)?;
        for c in rest
            .split(|b| *b == b'/')
            .filter(|c| !c.is_empty() && *c != b".")
        {
            if c == b".." {
                return Err(crate::error::Error::Errno(libc::EINVAL));
            }
            path = crate::fs::object::join(&path, OsStr::from_bytes(c));
        }
        return explain_path(fs, ctx, &path).map(Some);
    }
    // Every other control name is ASCII: one with other bytes names no request.
    let Ok(name) = std::str::from_utf8(bytes) else {
        return Err(crate::error::Error::Errno(libc::ENODATA));
    };
    if let Some(r) = crate::promote::control_get(fs, ctx, ino, name) {
        return r.map(Some);
    }
    if let Some(rest) = name.strip_prefix(STATUS_PIECE) {
        return status_piece(fs, ctx, rest).map(Some);
    }
    match name {
        STATUS => Ok(Some(status_whole(fs))),
        PROTOCOL_NAME => Ok(Some(PROTOCOL.to_string().into_bytes())),
        // What the last reload applied and what needs a remount (for `labfs reload`).
        RELOAD => Ok(Some(crate::daemon::last_reload().into_bytes())),
        EXPLAIN => {
            let path = fs.npath_of(ino)?;
            explain_path(fs, ctx, &path).map(Some)
        }
        _ => Err(crate::error::Error::Errno(libc::ENODATA)),
    }
}

/// Handle a control setxattr; `false` when `name` is not a control name.
pub fn set(fs: &LabFs, ctx: &Ctx, ino: u64, name: &OsStr, value: &[u8]) -> Result<bool> {
    if !name.as_bytes().starts_with(PREFIX.as_bytes()) {
        return Ok(false);
    }
    // Every control name that takes a value is ASCII.
    let Ok(name) = std::str::from_utf8(name.as_bytes()) else {
        return Err(crate::error::Error::Errno(libc::EINVAL));
    };
    if let Some(r) = crate::promote::control_set(fs, ctx, ino, name, value) {
        return r.map(|()| true);
    }
    match name {
        RELOAD if ctx.uid != 0 => Err(crate::error::Error::Errno(libc::EPERM)),
        RELOAD => {
            let source = fs.live().source.clone();
            let path = (source != "<demo>").then(|| std::path::PathBuf::from(&source));
            tracing::info!("reload requested through {RELOAD} by pid {}", ctx.pid);
            crate::daemon::reload(fs, path.as_deref())
                .map(|()| true)
                .map_err(|_| crate::error::Error::Errno(libc::EINVAL))
        }
        _ => Err(crate::error::Error::Errno(libc::EINVAL)),
    }
}

/// `labfs reload MOUNTPOINT`: ask the daemon behind MOUNTPOINT to re-read its rules.
pub fn reload_cli(mountpoint: &std::path::Path) -> i32 {
    use crate::exit::{EXIT_FAIL, EXIT_OK, EXIT_USAGE};
    let shown = crate::check::shown(mountpoint.as_os_str());
    let rules_file = match xattr::get(mountpoint, STATUS) {
        Ok(Some(raw)) => serde_json::from_slice::<serde_json::Value>(&raw)
            .ok()
            .and_then(|v| v["rules_file"].as_str().map(str::to_string)),
        _ => None,
    };
    let Some(rules_file) = rules_file else {
        let why = match crate::status::fetch(mountpoint, false) {
            Err(e) => e.message(mountpoint),
            Ok(_) => format!("{}: the mount did not name its rules file", shown),
        };
        eprintln!("labfs: {why}");
        return EXIT_FAIL;
    };
    match xattr::set(mountpoint, RELOAD, b"1") {
        Ok(()) => {
            let report = xattr::get(mountpoint, RELOAD)
                .ok()
                .flatten()
                .map(|r| String::from_utf8_lossy(&r).into_owned())
                .filter(|r| !r.is_empty())
                .unwrap_or_else(|| format!("rules reloaded from {rules_file}"));
            println!("labfs: {}: {report}", shown);
            EXIT_OK
        }
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            let why = match crate::config::Config::load(std::path::Path::new(&rules_file)) {
                Err(errors) => errors.to_string(),
                Ok(_) if rules_file == "<demo>" => {
                    "the demo's built-in rules cannot be reloaded".into()
                }
                Ok(_) => "see the daemon's log".into(),
            };
            eprintln!(
                "labfs: {}: rules NOT reloaded, the old rules stay in force:\n{why}",
                shown
            );
            EXIT_USAGE
        }
        Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EACCES)) => {
            eprintln!("labfs: {}: only root may reload the rules", shown);
            EXIT_FAIL
        }
        Err(e) => {
            eprintln!("labfs: {}: reload failed: {e}", shown);
            EXIT_FAIL
        }
    }
}
