//! Extended attributes: passed through to the backend object, plus labfs's own
//! read-only `user.labfs.*` names (see [`crate::tags`] for the namespace).
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

use super::{Ctx, LabFs, Located};
use crate::error::{check_size, Error, Result};
use crate::rules::{BackendKind, Class};
use crate::tags;

/// Whether an object of this mode can carry `user.*` names (the kernel refuses them
/// on symlinks, fifos, sockets and devices).
pub fn takes_user_xattrs(mode: u32) -> bool {
    matches!(mode & libc::S_IFMT, libc::S_IFREG | libc::S_IFDIR)
}

/// Asks the promotion registry (src/promote, which uses the core: the core cannot call
/// it) whether a job is moving `path` now; set once by promote when a mount starts.
static IN_FLIGHT: OnceLock<fn(&str) -> bool> = OnceLock::new();

/// Register how to tell whether a path is being promoted (`user.labfs.state` =
/// `promoting`).
pub fn set_promotion_probe(probe: fn(&str) -> bool) {
    let _ = IN_FLIGHT.set(probe);
}

fn promotion_in_flight(path: &str) -> bool {
    IN_FLIGHT.get().is_some_and(|f| f(path))
}

/// Computed names, answered on every file and directory.
pub const VIRTUAL: [&str; 4] = [
    "user.labfs.class",
    "user.labfs.backend",
    "user.labfs.rule",
    "user.labfs.state",
];

/// Where the xattr calls for one inode go (see [`LabFs::xattr_target`]).
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
            tags::read_tag(
                &self.atlas,
                loc.parent_fd.as_raw_fd(),
                &loc.name,
                &loc.path.to_string_lossy(),
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
                (BackendKind::Atlas, _) if promoted || stored_class.is_some() => "promoted".into(),
                (BackendKind::Atlas, _) => "atlas".into(),
                (BackendKind::Local, Class::Transitional) => {
                    if promotion_in_flight(&loc.path.to_string_lossy()) {
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

    pub fn getxattr(&self, ctx: &Ctx, ino: u64, name: &OsStr, size: u32) -> Result<XattrOut> {
        let n = name.to_str().unwrap_or("");
        let creds = self.creds(ctx);
        if n.starts_with(tags::PREFIX) {
            let loc = self.locate_ino(&creds, ino)?;
            if !takes_user_xattrs(loc.stat.st_mode) {
                return Err(Error::Errno(libc::ENODATA));
            }
            if let Some(v) = self.virtual_xattr(&loc, n) {
                return sized(v.into_bytes(), size);
            }
            if loc.backend == BackendKind::Atlas && loc.path != "/" {
                if let Some(v) = tags::read_tag(
                    &self.atlas,
                    loc.parent_fd.as_raw_fd(),
                    &loc.name,
                    &loc.path.to_string_lossy(),
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
        // SAFETY: valid C strings; a zero-size buffer asks for the size.
        let r = unsafe {
            let (p, a, v, l) = (
                t.path.as_ptr(),
                cname.as_ptr(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
            );
            if t.follow {
                libc::getxattr(p, a, v, l)
            } else {
                libc::lgetxattr(p, a, v, l)
            }
        };
        let r = match check_size(r) {
            // The kernel enforces ACLs (FUSE_POSIX_ACL); on a backend without xattrs
            // "no ACL" must read as absent, not as an error, or every check fails.
            Err(e)
                if (e.errno() == libc::EOPNOTSUPP || e.errno() == libc::ENOTSUP)
                    && n.starts_with("system.posix_acl_") =>
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
    /// followed; a symlink (whose magic link would lead on to its target) by its name
    /// in its parent, not followed.
    fn xattr_target(&self, creds: &super::Creds, ino: u64) -> Result<XattrTarget> {
        let (_, obj) = self.obj(ino)?;
        let st = super::backend::fstat(obj.as_raw_fd())?;
        if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
            let loc = self.locate_ino(creds, ino)?;
            return Ok(XattrTarget {
                path: tags::proc_path(loc.parent_fd.as_raw_fd(), &loc.name),
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
        let p = &t.path;
        let list = |buf: *mut libc::c_char, len: usize| {
            // SAFETY: valid C string; a null buffer of size 0 asks for the size.
            unsafe {
                if t.follow {
                    libc::listxattr(p.as_ptr(), buf, len)
                } else {
                    libc::llistxattr(p.as_ptr(), buf, len)
                }
            }
        };
        let mut out = {
            let _as = creds.assume()?;
            let need = list(std::ptr::null_mut(), 0);
            match check_size(need) {
                Ok(0) => Vec::new(),
                Ok(need) => {
                    let mut buf = vec![0u8; need + 256];
                    let r = list(buf.as_mut_ptr() as *mut libc::c_char, buf.len());
                    buf.truncate(check_size(r)?);
                    buf
                }
                Err(e) if e.errno() == libc::EOPNOTSUPP || e.errno() == libc::ENOTSUP => Vec::new(),
                Err(e) => return Err(e),
            }
        };
        // labfs's own names (promotion's stored tags) are answered by name, never listed.
        let mut kept = Vec::with_capacity(out.len());
        for name in out.split(|b| *b == 0).filter(|s| !s.is_empty()) {
            if !name.starts_with(tags::PREFIX.as_bytes()) {
                kept.extend_from_slice(name);
                kept.push(0);
            }
        }
        out = kept;
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
        let n = name.to_str().unwrap_or("");
        if n.starts_with(tags::PREFIX) {
            return Err(Error::ReservedXattr {
                name: n.to_string(),
            });
        }
        let creds = self.creds(ctx);
        self.check_writable_ino(ctx, ino)?;
        let t = self.xattr_target(&creds, ino)?;
        let cname = CString::new(name.as_bytes()).map_err(|_| Error::Errno(libc::EINVAL))?;
        let _as = creds.assume()?;
        let (p, a, v, l) = (
            t.path.as_ptr(),
            cname.as_ptr(),
            value.as_ptr() as *const libc::c_void,
            value.len(),
        );
        // SAFETY: valid C strings and value buffer.
        crate::error::check(unsafe {
            if t.follow {
                libc::setxattr(p, a, v, l, flags)
            } else {
                libc::lsetxattr(p, a, v, l, flags)
            }
        })?;
        Ok(())
    }

    pub fn removexattr(&self, ctx: &Ctx, ino: u64, name: &OsStr) -> Result<()> {
        let n = name.to_str().unwrap_or("");
        if n.starts_with(tags::PREFIX) {
            return Err(Error::ReservedXattr {
                name: n.to_string(),
            });
        }
        let creds = self.creds(ctx);
        self.check_writable_ino(ctx, ino)?;
        let t = self.xattr_target(&creds, ino)?;
        let cname = CString::new(name.as_bytes()).map_err(|_| Error::Errno(libc::EINVAL))?;
        let _as = creds.assume()?;
        // SAFETY: valid C strings.
        crate::error::check(unsafe {
            if t.follow {
                libc::removexattr(t.path.as_ptr(), cname.as_ptr())
            } else {
                libc::lremovexattr(t.path.as_ptr(), cname.as_ptr())
            }
        })?;
        Ok(())
    }
}
