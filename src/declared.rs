//! Declared directories (`[[dir]]` in the rules file): created at mount when
//! missing, with the owner, group and mode the rules file gives, on the backend the
//! path's rule places it. A rebuilt node's empty SSD gets its ephemeral top levels
//! back, and a `read_only` tree's root exists for its writers without anyone
//! creating it on Atlas by hand.
//!
//! Runs as root before the mount serves requests. Parents that are missing are
//! created on their own backends (root, 0755), as `mkdir -p` would. An existing
//! directory gets the declared owner, group and mode (the rules file is the
//! truth); anything else at that path is left alone and reported.

use std::ffi::OsStr;
use std::os::fd::AsRawFd;

use tracing::{info, warn};

use crate::config::DeclaredDir;
use crate::error::{Error, Result};
use crate::fs::backend::{cstring, fstatat, split};
use crate::fs::{Creds, LabFs};
use crate::rules::BackendKind;
use crate::sys;

/// Ensure every declared directory; failures are logged, never fatal.
pub fn ensure(fs: &LabFs, dirs: &[DeclaredDir]) {
    for d in dirs {
        match ensure_one(fs, d) {
            Ok(Some(what)) => info!("declared directory {} (line {}): {what}", d.path, d.line),
            Ok(None) => {}
            Err(e) => warn!(
                "declared directory {} (line {}) not ensured: {e}",
                d.path, d.line
            ),
        }
    }
}

fn ensure_one(fs: &LabFs, d: &DeclaredDir) -> Result<Option<String>> {
    let _root = Creds::root().assume()?;
    let placement = fs.placement(&d.path);
    let kind = placement.backend();
    if kind == BackendKind::Atlas && fs.health.is_down() {
        return Err(Error::Errno(libc::ETIMEDOUT));
    }
    // Missing ancestors, each on its own backend.
    let (parent, name) = split(&d.path);
    let mut ancestors = Vec::new();
    let mut a = parent.to_string();
    while a != "/" {
        ancestors.push(a.clone());
        a = split(&a).0.to_string();
    }
    for a in ancestors.iter().rev() {
        let b = fs.backend(fs.placement(a).backend());
        b.ensure_dirs(a, &|_| None)?;
    }
    let b = fs.backend(kind);
    let pfd = b.ensure_dirs(parent, &|_| None)?;
    let cname = cstring(OsStr::new(name)).map_err(Error::Io)?;
    let pf = pfd.as_raw_fd();
    let mut did = Vec::new();
    let st = match fstatat(pf, &cname) {
        Ok(st) => st,
        Err(e) if e.errno() == libc::ENOENT => {
            match sys::mkdir_at(&pfd, &cname, 0o700) {
                Ok(()) => did.push(format!("created on {kind}")),
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(Error::Io(e)),
            }
            fstatat(pf, &cname)?
        }
        Err(e) => return Err(e),
    };
    if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
        return Err(Error::Errno(libc::ENOTDIR));
    }
    // Owner and mode through a descriptor of the directory itself (never a symlink).
    let dfd = sys::open_at_mode(
        &pfd,
        &cname,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        0,
    )?;
    let st = sys::fstat(&dfd)?;
    if st.st_uid != d.uid || st.st_gid != d.gid {
        sys::fchown(&dfd, d.uid, d.gid)?;
        did.push(format!("owner {}:{}", d.uid, d.gid));
    }
    // chown may clear setgid: compare with the mode after it.
    let now = sys::fstat(&dfd)?;
    if now.st_mode & 0o7777 != d.mode {
        sys::fchmod(&dfd, d.mode)?;
        did.push(format!("mode {:04o}", d.mode));
    }
    Ok((!did.is_empty()).then(|| did.join(", ")))
}
