//! Extended attributes: passed through to the backend object, plus labfs's own
//! read-only `user.labfs.*` names (see `crate::tags` for the namespace).
//!
//! The `user.labfs.*` names are answered when asked for by name, and never listed
//! (docs/semantics.md): a listed name is one that `cp -a`, `mv`, `rsync -X` and
//! `tar --xattrs` copy, and labfs's names are about a path's placement, not part of
//! the file; copying them fails (they are read-only) or plants stale provenance.
//! Like any `user.*` name they exist only on regular files and directories, the only
//! objects where the kernel lets `user.*` be read.

use std::ffi::{CString, OsStr};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::OnceLock;

use super::tag_reader as tags;
use super::{Ctx, LabFs, Located};
use crate::error::{Error, Result};
use crate::rules::{BackendKind, Class};
use crate::sys;

/// Whether an object of this mode can carry `user.*` names (the kernel refuses them
/// on symlinks, fifos, sockets and devices).
pub fn takes_user_xattrs(mode: u32) -> bool {
    matches!(mode & libc::S_IFMT, libc::S_IFREG | libc::S_IFDIR)
}

/// Asks the promotion registry (src/promote, which uses the core: the core cannot call
/// it) whether a job is moving `path` now; set once by promote when a mount starts.
static IN_FLIGHT: OnceLock<fn(&std::ffi::OsStr) -> bool> = OnceLock::new();

/// Register how to tell whether a path is being promoted (`user.labfs.state` =
/// `promoting`).
pub fn set_promotion_probe(probe: fn(&std::ffi::OsStr) -> bool) {
    let _ = IN_FLIGHT.set(probe);
}

fn promotion_in_flight(path: &std::ffi::OsStr) -> bool {
    IN_FLIGHT.get().is_some_and(|f| f(path))
}

/// Computed names, answered on every file and directory.
pub const VIRTUAL: [&str; 4] = [
    "user.labfs.class",
    "user.labfs.backend",
    "user.labfs.rule",
    "user.labfs.state",
];

/// Where the xattr calls for one inode go (see `LabFs::xattr_target`).
struct XattrTarget {
    path: CString,
    follow: bool,
    _keep: Option<std::os::fd::OwnedFd>,
    _obj: super::object::ObjFd,
}

/// How getxattr answers: the value, or its size when the caller asked for the size.
pub enum XattrOut {
    Data(Vec<u8>),
    Size(u32),
}

/// The answer to a getxattr of `size` bytes (0: the size only) with value `v`.
pub fn sized(v: Vec<u8>, size: u32) -> Result<XattrOut> {
    if size == 0 {
        Ok(XattrOut::Size(v.len() as u32))
    } else if v.len() > size as usize {
        Err(Error::Errno(libc::ERANGE))
    } else {
        Ok(XattrOut::Data(v))
    }
}

impl LabFs {
    /// The value of a computed `user.labfs.*` name, for any kind of object (`labfs
    /// explain` shows it for symlinks too; getxattr offers it only where `user.*` is).
    pub fn virtual_xattr(&self, loc: &Located, name: &str) -> Option<String> {
        if !VIRTUAL.contains(&name) {
            return None;
        }
        let promoted =
            loc.backend == BackendKind::Atlas && loc.placement.class == Class::Transitional;
        let stored_class = if loc.backend == BackendKind::Atlas && loc.path != "/" {
            self.tags
                .read_tag(
                    &self.atlas,
                    loc.parent_fd.as_raw_fd(),
                    &loc.name,
                    &loc.path,
                    tags::CLASS,
                )
                .and_then(|v| String::from_utf8(v).ok())
        } else {
            None
        };
        Some(match name {
            "user.labfs.class" => stored_class.unwrap_or_else(|| loc.placement.class.to_string()),
            "user.labfs.backend" => loc.backend.to_string(),
            "user.labfs.rule" => loc.placement.rule_label(),
            "user.labfs.state" => match (loc.backend, loc.placement.class) {
                (BackendKind::Atlas, _) if self.written_since_promotion(loc) => "modified".into(),
                (BackendKind::Atlas, _) if promoted || stored_class.is_some() => "promoted".into(),
                (BackendKind::Atlas, _) => "atlas".into(),
                (BackendKind::Local, Class::Transitional) => {
                    if promotion_in_flight(&loc.path) {
                        "promoting".into()
                    } else {
                        "at-risk".into()
                    }
                }
                (BackendKind::Local, _) => "local-only".into(),
            },
            _ => return None,
        })
    }

    /// A promoted regular file whose content changed after its promotion: its mtime
    /// (kept from the source by promote, moved by any later write on any node) is
    /// past `user.labfs.promoted_at`. Its `user.labfs.digest` is then stale.
    fn written_since_promotion(&self, loc: &Located) -> bool {
        if loc.stat.st_mode & libc::S_IFMT != libc::S_IFREG || loc.path.as_bytes() == b"/" {
            return false;
        }
        let at = self.tags.read_tag(
            &self.atlas,
            loc.parent_fd.as_raw_fd(),
            &loc.name,
            &loc.path,
            tags::PROMOTED_AT,
        );
        at.and_then(|v| parse_rfc3339_utc(&v))
            .is_some_and(|at| loc.stat.st_mtime > at)
    }

    pub fn getxattr(&self, ctx: &Ctx, ino: u64, name: &OsStr, size: u32) -> Result<XattrOut> {
        let creds = self.creds(ctx);
        if name.as_bytes().starts_with(tags::PREFIX.as_bytes()) {
            // labfs's names are UTF-8: a reserved name that is not is no name of labfs's.
            let Some(n) = name.to_str() else {
                return Err(Error::Errno(libc::ENODATA));
            };
            // labfs's names are about the path the object is reached by.
            let loc = self.locate_ino(&creds, ino)?;
            if !takes_user_xattrs(loc.stat.st_mode) {
                return Err(Error::Errno(libc::ENODATA));
            }
            if let Some(v) = self.virtual_xattr(&loc, n) {
                return sized(v.into_bytes(), size);
            }
            if loc.backend == BackendKind::Atlas && loc.path != "/" {
                if let Some(v) = self.tags.read_tag(
                    &self.atlas,
                    loc.parent_fd.as_raw_fd(),
                    &loc.name,
                    &loc.path,
                    n,
                ) {
                    return sized(v, size);
                }
                return Err(Error::Errno(libc::ENODATA));
            }
        }
        let t = self.xattr_target(&creds, ino)?;
        let cname = CString::new(name.as_bytes()).map_err(|_| Error::Errno(libc::EINVAL))?;
        let _as = creds.assume()?;
        let mut buf = vec![0u8; size as usize];
        let r = if t.follow {
            sys::getxattr(&t.path, &cname, &mut buf)
        } else {
            sys::lgetxattr(&t.path, &cname, &mut buf)
        };
        let r = match r.map_err(Error::Io) {
            // The kernel enforces ACLs (FUSE_POSIX_ACL); on a backend without xattrs
            // "no ACL" must read as absent, not as an error, or every check fails.
            Err(e)
                if (e.errno() == libc::EOPNOTSUPP || e.errno() == libc::ENOTSUP)
                    && name.as_bytes().starts_with(b"system.posix_acl_") =>
            {
                return Err(Error::Errno(libc::ENODATA))
            }
            r => r?,
        };
        if size == 0 {
            return Ok(XattrOut::Size(r as u32));
        }
        buf.truncate(r);
        Ok(XattrOut::Data(buf))
    }

    /// Where xattr calls reach inode `ino`'s object: `/proc/self/fd/N` of its backing,
    /// followed (so they work for every name of the object, and for an open file that
    /// has none left); a symlink, whose magic link would lead on to its target, by its
    /// name in its parent, not followed.
    fn xattr_target(&self, creds: &super::Creds, ino: u64) -> Result<XattrTarget> {
        let (_, obj) = self.obj(ino)?;
        let st = super::backend::fstat(obj.as_raw_fd())?;
        if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
            let loc = self.locate_ino(creds, ino)?;
            return Ok(XattrTarget {
                path: super::object::proc_child_path(loc.parent_fd.as_raw_fd(), &loc.name),
                follow: false,
                _keep: Some(loc.parent_fd),
                _obj: obj,
            });
        }
        Ok(XattrTarget {
            path: obj.proc_path(),
            follow: true,
            _keep: None,
            _obj: obj,
        })
    }

    /// The backend's names, minus labfs's own: a `user.labfs.*` name stored on the
    /// Atlas object (promotion's tags) is answered by name, not listed.
    pub fn listxattr(&self, ctx: &Ctx, ino: u64, size: u32) -> Result<XattrOut> {
        let creds = self.creds(ctx);
        let t = self.xattr_target(&creds, ino)?;
        let all = {
            let _as = creds.assume()?;
            let listed = if t.follow {
                sys::listxattr(&t.path)
            } else {
                sys::llistxattr(&t.path)
            };
            match listed {
                Ok(v) => v,
                Err(e)
                    if e.raw_os_error() == Some(libc::EOPNOTSUPP)
                        || e.raw_os_error() == Some(libc::ENOTSUP) =>
                {
                    Vec::new()
                }
                Err(e) => return Err(Error::Io(e)),
            }
        };
        let mut out = Vec::with_capacity(all.len());
        for name in all.split(|b| *b == 0).filter(|s| !s.is_empty()) {
            if !name.starts_with(tags::PREFIX.as_bytes()) {
                out.extend_from_slice(name);
                out.push(0);
            }
        }
        sized(out, size)
    }

    pub fn setxattr(
        &self,
        ctx: &Ctx,
        ino: u64,
        name: &OsStr,
        value: &[u8],
        flags: i32,
    ) -> Result<()> {
        if name.as_bytes().starts_with(tags::PREFIX.as_bytes()) {
            return Err(Error::ReservedXattr {
                name: name.to_string_lossy().into_owned(),
            });
        }
        let creds = self.creds(ctx);
        self.check_writable_ino(ctx, ino)?;
        let t = self.xattr_target(&creds, ino)?;
        let cname = CString::new(name.as_bytes()).map_err(|_| Error::Errno(libc::EINVAL))?;
        let _as = creds.assume()?;
        if t.follow {
            sys::setxattr(&t.path, &cname, value, flags).map_err(Error::Io)
        } else {
            sys::lsetxattr(&t.path, &cname, value, flags).map_err(Error::Io)
        }
    }

    pub fn removexattr(&self, ctx: &Ctx, ino: u64, name: &OsStr) -> Result<()> {
        if name.as_bytes().starts_with(tags::PREFIX.as_bytes()) {
            return Err(Error::ReservedXattr {
                name: name.to_string_lossy().into_owned(),
            });
        }
        let creds = self.creds(ctx);
        self.check_writable_ino(ctx, ino)?;
        let t = self.xattr_target(&creds, ino)?;
        let cname = CString::new(name.as_bytes()).map_err(|_| Error::Errno(libc::EINVAL))?;
        let _as = creds.assume()?;
        if t.follow {
            sys::removexattr(&t.path, &cname).map_err(Error::Io)
        } else {
            sys::lremovexattr(&t.path, &cname).map_err(Error::Io)
        }
    }
}

/// Seconds since the epoch of `YYYY-MM-DDTHH:MM:SSZ` (the form promote writes).
fn parse_rfc3339_utc(v: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(v).ok()?;
    let b = s.as_bytes();
    if b.len() != 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[19] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hh * 3600 + mm * 60 + ss)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn promoted_at_parses_as_utc_seconds() {
        assert_eq!(parse_rfc3339_utc(b"1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339_utc(b"2024-05-06T07:08:09Z"),
            Some(1_714_979_289)
        );
        assert_eq!(
            parse_rfc3339_utc(b"2000-03-01T00:00:00Z"),
            Some(951_868_800)
        );
        assert_eq!(parse_rfc3339_utc(b"2024-05-06 07:08:09"), None);
    }
}
