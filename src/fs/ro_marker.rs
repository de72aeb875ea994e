//! The read-only marker: how a `read_only` rule holds through names labfs does not know.
//!
//! A rule holds through every name of an object (docs/semantics.md), and the inode
//! table knows only the names the kernel reached an object by. Once a writer of a
//! `read_only` rule made `ln /lab/media/song /lab/docs/song` and the kernel forgot the
//! inode (memory pressure), or on another node sharing Atlas, a lookup may reach the
//! object through `/docs/song` alone: the table then knows no read-only name.
//!
//! So a `link(2)` (or a rename of a file with further names) through the mount that
//! involves a path under a `read_only` rule first records those paths on the object
//! itself, as root, in the xattr [`RO_MARKER`] (`user.labfs.ro`: namespace paths, each
//! ended by a NUL, so any bytes a name may hold fit). A write-side check of a regular
//! file with more than one link reads it (one getxattr) and applies the current rule of
//! each recorded path, so the rule's writers keep writing. Learning the link count
//! costs one fstat of the object, only on a backend where some rule is `read_only`;
//! nothing else is added to the common path. The marker is consulted whenever the file
//! has more than one link, not only when the table knows fewer names than `st_nlink`:
//! a known name may be gone (removed on another node) while an unknown one exists, so a
//! count proves nothing. A file with one link is decided by its one name.
//!
//! A backend that cannot store the marker (no user xattrs: NFSv3, ramfs), or an object
//! that cannot carry `user.*` (a symlink, a fifo), gets no such link: it is refused
//! with EROFS ([`Error::ReadOnlyUnrecorded`], logged at warn), never made unprotected;
//! any other error storing it (ENOSPC, E2BIG) refuses the link with that errno.
//! Through the mount `user.labfs.*` names cannot be set or removed (EPERM) and are not
//! listed (src/fs/xattr.rs). A marker only ever narrows: a path recorded for a name
//! since renamed out of the rule keeps the file read-only for non-writers while it has
//! several links (the operator removes it on the backend, `setfattr -x user.labfs.ro`).
//! Hard links made outside labfs, directly on a backend, carry no marker: labfs cannot
//! see them.

use std::ffi::{CString, OsStr, OsString};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};

use super::backend::{fstat, Creds};
use super::object::ObjFd;
use super::{Ctx, LabFs};
use crate::error::{Error, Result};
use crate::rules::{BackendKind, Class, Placement};
use crate::sys;

/// The xattr holding the read-only namespace paths an object was linked from or to.
pub const RO_MARKER: &str = "user.labfs.ro";

/// Longest marker read (the kernel's XATTR_SIZE_MAX).
const MAX_MARKER: usize = 65536;

fn marker_name() -> CString {
    CString::new(RO_MARKER).unwrap_or_default()
}

/// Whether a backend's answer means "this object has no xattrs of that kind at all".
fn unsupported(e: &std::io::Error) -> bool {
    // ENOTSUP is the same number as EOPNOTSUPP on Linux.
    e.raw_os_error() == Some(libc::EOPNOTSUPP)
}

/// The paths in a marker's value (each ended by a NUL; a last one without is kept).
pub fn parse(v: &[u8]) -> Vec<OsString> {
    v.split(|b| *b == 0)
        .filter(|p| !p.is_empty())
        .map(|p| OsString::from_vec(p.to_vec()))
        .collect()
}

/// A marker's value for `paths` (sorted, without duplicates).
pub fn encode(paths: &[OsString]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in paths {
        out.extend_from_slice(p.as_bytes());
        out.push(0);
    }
    out
}

impl LabFs {
    /// Whether any rule is `read_only` now (no marker can matter otherwise).
    fn any_read_only_rule(&self) -> bool {
        self.live().rules.rules().iter().any(|r| r.read_only)
    }

    /// Whether a `read_only` rule places paths on `kind` now: a marker records paths of
    /// the object's own backend (link and rename stay on one), so an object elsewhere
    /// has none that matters (transitional rules place on both).
    fn read_only_rule_on(&self, kind: BackendKind) -> bool {
        self.live()
            .rules
            .rules()
            .iter()
            .any(|r| r.read_only && (r.class.backend() == kind || r.class == Class::Transitional))
    }

    /// Check the rule of every read-only path recorded on object `ino` (see the module
    /// doc): for a multi-link regular file while some rule is `read_only`.
    pub(super) fn check_writable_marked(&self, ctx: &Ctx, ino: u64) -> Result<()> {
        let is_dir = self.inodes.is_dir(ino);
        match (self.inodes.backing(ino), is_dir) {
            (Some((kind, _, _)), Some(false)) if self.read_only_rule_on(kind) => {}
            _ => return Ok(()),
        }
        let (_, obj) = self.obj(ino)?;
        let st = fstat(obj.as_raw_fd())?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG || st.st_nlink <= 1 {
            return Ok(());
        }
        for path in self.marked_paths(&obj)? {
            self.check_writable(ctx, &path, &self.placement(&path))?;
        }
        Ok(())
    }

    /// The paths recorded on `obj` (none when it has no marker, or its backend keeps
    /// no user xattrs: then no marker can have been made). An error reading it is that
    /// error: a write is refused rather than let through unchecked.
    fn marked_paths(&self, obj: &ObjFd) -> Result<Vec<OsString>> {
        let path = obj.proc_path();
        let name = marker_name();
        let _root = Creds::root().assume()?;
        let mut buf = vec![0u8; 1024];
        loop {
            match sys::getxattr(&path, &name, &mut buf) {
                Ok(n) => {
                    buf.truncate(n);
                    return Ok(parse(&buf));
                }
                Err(e) if e.raw_os_error() == Some(libc::ENODATA) || unsupported(&e) => {
                    return Ok(Vec::new())
                }
                Err(e) if e.raw_os_error() == Some(libc::ERANGE) && buf.len() < MAX_MARKER => {
                    buf.resize(MAX_MARKER, 0)
                }
                Err(e) => return Err(Error::Io(e)),
            }
        }
    }

    /// Before object `ino` (reached through `obj`) gets the new name `dst` (placed by
    /// `dst_p`): record on it every read-only path it is known by, `dst` itself if that
    /// is read-only, and what an earlier marker holds while the object has further
    /// links. Nothing is written when no path is read-only; a marker left on an object
    /// down to one name is stale and removed (its one name decides). Fails with EROFS
    /// when the marker cannot be stored: the link is then not made.
    pub(super) fn mark_read_only(
        &self,
        ino: Option<u64>,
        obj: &ObjFd,
        dst: &OsStr,
        dst_p: &Placement,
    ) -> Result<()> {
        if !self.any_read_only_rule() {
            return Ok(());
        }
        let st = fstat(obj.as_raw_fd())?;
        let rules = self.live().rules.clone();
        let mut paths: Vec<OsString> = ino
            .map(|i| self.inodes.npaths(i))
            .unwrap_or_default()
            .into_iter()
            .filter(|p| rules.resolve(p).read_only)
            .collect();
        if dst_p.read_only {
            paths.push(dst.to_os_string());
        }
        let is_file = st.st_mode & libc::S_IFMT == libc::S_IFREG;
        if is_file && st.st_nlink > 1 {
            paths.extend(self.marked_paths(obj)?);
        }
        paths.sort();
        paths.dedup();
        let proc = obj.proc_path();
        let name = marker_name();
        if paths.is_empty() {
            if is_file && st.st_nlink <= 1 {
                let _root = Creds::root().assume()?;
                // Absent (the common case) or not removable: either way nothing widens.
                let _ = sys::removexattr(&proc, &name);
            }
            return Ok(());
        }
        // Logged at warn by the adapter (Error::level): the operator must know.
        let refuse = |why: String| Error::ReadOnlyUnrecorded {
            path: dst.to_string_lossy().into_owned(),
            from: paths[0].to_string_lossy().into_owned(),
            why,
        };
        if !is_file {
            return Err(refuse(
                "only a regular file can carry user.labfs.ro".to_string(),
            ));
        }
        let value = encode(&paths);
        let _root = Creds::root().assume()?;
        match sys::setxattr(&proc, &name, &value, 0) {
            Ok(()) => Ok(()),
            Err(e) if unsupported(&e) => {
                Err(refuse(format!("the backend keeps no user xattrs ({e})")))
            }
            // The backend's own errno (ENOSPC, E2BIG, EIO): the link is not made.
            Err(e) => Err(Error::Io(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_values_round_trip_any_bytes() {
        let paths = vec![
            OsString::from("/media/a"),
            OsString::from_vec(b"/media/b\xffc d".to_vec()),
        ];
        assert_eq!(parse(&encode(&paths)), paths);
        assert_eq!(parse(b"/x"), vec![OsString::from("/x")]);
        assert!(parse(b"").is_empty());
    }
}
