//! Putting a staged commit unit in place on Atlas, exclusively and atomically, on
//! every backend, the Linux NFS client included (see docs/promote.md, "What is atomic
//! on NFS").
//!
//! The fast path is one `renameat2(RENAME_NOREPLACE)`. The NFS client answers every
//! renameat2 flag with EINVAL (fs/nfs/dir.c), so there the same guarantees come from
//! operations the NFS server performs atomically and exclusively itself:
//!
//! - a file or symlink: `link(2)` of the staged object to the target name (the
//!   server's LINK fails with EEXIST when the name exists), then the staged name is
//!   removed;
//! - a directory: `mkdir(2)` of an empty placeholder with mode 0 at the target name
//!   (the claim: the server's MKDIR fails with EEXIST when the name exists, so of two
//!   nodes exactly one gets it), then a plain `rename(2)` of the staged tree over the
//!   placeholder (the server's RENAME replaces an empty directory atomically). A
//!   reader on any client sees no entry, an empty directory it may not open, or the
//!   complete, durable, verified tree, never a part of it.

use std::ffi::CStr;
use std::os::fd::RawFd;

use crate::error::{Error, Result};
use crate::fs::backend::fstatat;
use crate::sys;

/// Mode of the placeholder directory that claims a name on Atlas before the rename.
pub const PLACEHOLDER_MODE: u32 = 0;

/// Whether `st` looks like a claim placeholder: an empty (nlink 2) root-owned
/// directory with mode 0.
pub fn is_placeholder(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
        && st.st_mode & 0o7777 == PLACEHOLDER_MODE
        && st.st_uid == 0
        && st.st_nlink <= 2
}

fn renameat2(from_dir: RawFd, from: &CStr, to_dir: RawFd, to: &CStr, flags: u32) -> Result<()> {
    Ok(sys::with_fd(from_dir, |f| {
        sys::with_fd(to_dir, |t| sys::rename_at(f, from, t, to, flags))
    })?)
}

/// Put `from_dir/from` (staged) at `to_dir/to`, which must not exist: EEXIST (or
/// ENOTEMPTY) when something is there, and then nothing was changed. `recovering`:
/// a placeholder left at the target by this job before a crash is taken over.
pub fn place_new(
    from_dir: RawFd,
    from: &CStr,
    to_dir: RawFd,
    to: &CStr,
    is_dir: bool,
    recovering: bool,
) -> Result<()> {
    if !no_flags_hook() {
        match renameat2(from_dir, from, to_dir, to, libc::RENAME_NOREPLACE) {
            Err(e) if e.errno() == libc::EINVAL => {
                tracing::debug!("renameat2 flags refused (NFS client): claiming by link/mkdir")
            }
            other => return other,
        }
    }
    if !is_dir {
        // Flags 0: a symlink is linked itself.
        let linked = sys::with_fd(from_dir, |f| {
            sys::with_fd(to_dir, |t| sys::link_at(f, from, t, to))
        })
        .map_err(Error::Io);
        match linked {
            Ok(_) => {}
            Err(e) if e.errno() == libc::EEXIST && recovering => {
                // Linked before the crash, the staged name not yet removed?
                let same = match (fstatat(from_dir, from), fstatat(to_dir, to)) {
                    (Ok(a), Ok(b)) => a.st_ino == b.st_ino && a.st_dev == b.st_dev,
                    _ => false,
                };
                if !same {
                    return Err(e);
                }
            }
            Err(e) => return Err(e),
        }
        // The staged name goes; if that fails the target is in place all the same
        // and the staging directory is removed with the job.
        let _ = sys::with_fd(from_dir, |f| sys::unlink_at(f, from, false));
        return Ok(());
    }
    let claimed =
        sys::with_fd(to_dir, |t| sys::mkdir_at(t, to, PLACEHOLDER_MODE)).map_err(Error::Io);
    match claimed {
        Ok(_) => {}
        Err(e) if e.errno() == libc::EEXIST && recovering => {
            // Ours from before the crash only if it is still an empty placeholder.
            if !fstatat(to_dir, to).is_ok_and(|st| is_placeholder(&st)) {
                return Err(e);
            }
        }
        Err(e) => return Err(e),
    }
    if let Err(e) = renameat2(from_dir, from, to_dir, to, 0) {
        remove_placeholder(to_dir, to);
        return Err(e);
    }
    Ok(())
}

/// Remove a placeholder this job made, if it is still one (empty, mode 0).
pub fn remove_placeholder(dir: RawFd, name: &CStr) {
    if fstatat(dir, name).is_ok_and(|st| is_placeholder(&st)) {
        // rmdir fails on anything not empty.
        let _ = sys::with_fd(dir, |d| sys::unlink_at(d, name, true));
    }
}

/// Test-only: `LABFS_PROMOTE_NO_RENAME_FLAGS=1` takes the NFS path on any backend, so
/// the tests over tmpfs cover it too (see docs/promote.md).
fn no_flags_hook() -> bool {
    std::env::var("LABFS_PROMOTE_NO_RENAME_FLAGS").is_ok_and(|v| v == "1")
}
