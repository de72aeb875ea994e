//! The control path: requests that travel through the mount itself, so they work
//! from the host and from inside a container that bind-mounts only a subpath.
//!
//! A control request is an xattr call on any path of the mount, with a name under
//! `user.labfs.ctl.` (never listed, never stored):
//! - `getfattr -n user.labfs.ctl.status PATH` -> the mount's status as JSON.
//! - `getfattr -n user.labfs.ctl.explain PATH` -> PATH's placement as JSON.
//! - `setfattr -n user.labfs.ctl.reload -v 1 PATH` -> re-read the rules file (root
//!   only; EINVAL and the old rules stay when the file is invalid). `labfs reload`.
//! - `setfattr -n user.labfs.ctl.promote -v JSON DIR` -> start a promotion job;
//!   `getfattr -n user.labfs.ctl.promote.ID DIR` -> its progress (JSON);
//!   `getfattr -n user.labfs.ctl.promote DIR` -> the caller's jobs. `labfs promote`
//!   (protocol: src/promote/client.rs, docs/promote.md).
//!
//! Control names are answered before anything reaches a backend.

use crate::error::Result;
use crate::fs::{Ctx, LabFs};

pub const PREFIX: &str = "user.labfs.ctl.";
pub const STATUS: &str = "user.labfs.ctl.status";
pub const EXPLAIN: &str = "user.labfs.ctl.explain";
pub const RELOAD: &str = "user.labfs.ctl.reload";

/// Answer a control getxattr; `None` when `name` is not a control name.
pub fn get(fs: &LabFs, ctx: &Ctx, ino: u64, name: &str) -> Result<Option<Vec<u8>>> {
    if !name.starts_with(PREFIX) {
        return Ok(None);
    }
    if let Some(r) = crate::promote::control_get(fs, ctx, ino, name) {
        return r.map(Some);
    }
    match name {
        STATUS => Ok(Some(crate::status::collect(fs).to_json().into_bytes())),
        // What the last reload applied and what needs a remount (for `labfs reload`).
        RELOAD => Ok(Some(crate::daemon::last_reload().into_bytes())),
        EXPLAIN => {
            let loc = fs.locate_ino(&fs.creds(ctx), ino)?;
            let mut e = crate::explain::Explained::from_placement(&loc.path, &loc.placement);
            e.backend = loc.backend.to_string();
            e.state = fs.virtual_xattr(&loc, "user.labfs.state");
            if let Some(c) = fs.virtual_xattr(&loc, "user.labfs.class") {
                e.class = c;
            }
            Ok(Some(serde_json::to_vec(&e).unwrap_or_default()))
        }
        _ => Err(crate::error::Error::Errno(libc::ENODATA)),
    }
}

/// Handle a control setxattr; `false` when `name` is not a control name.
pub fn set(fs: &LabFs, ctx: &Ctx, ino: u64, name: &str, value: &[u8]) -> Result<bool> {
    if !name.starts_with(PREFIX) {
        return Ok(false);
    }
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
    use crate::cli::{EXIT_FAIL, EXIT_OK, EXIT_USAGE};
    let rules_file = xattr::get(mountpoint, STATUS)
        .ok()
        .flatten()
        .and_then(|raw| serde_json::from_slice::<serde_json::Value>(&raw).ok())
        .and_then(|v| v["rules_file"].as_str().map(str::to_string));
    let Some(rules_file) = rules_file else {
        eprintln!(
            "labfs: {}: not a labfs mount (or its daemon is not answering)",
            mountpoint.display()
        );
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
            println!("labfs: {}: {report}", mountpoint.display());
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
                mountpoint.display()
            );
            EXIT_USAGE
        }
        Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EACCES)) => {
            eprintln!(
                "labfs: {}: only root may reload the rules",
                mountpoint.display()
            );
            EXIT_FAIL
        }
        Err(e) => {
            eprintln!("labfs: {}: reload failed: {e}", mountpoint.display());
            EXIT_FAIL
        }
    }
}
