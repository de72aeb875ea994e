//! Extended attributes: passed through to the backend object, plus labfs's own
//! read-only `user.labfs.*` names (see [`crate::tags`] for the namespace).

use std::ffi::{CString, OsStr};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;

use super::{Ctx, LabFs, Located};
use crate::error::{check_size, Error, Result};
use crate::rules::{BackendKind, Class};
use crate::tags;

/// Computed names, listed on every file and directory.
pub const VIRTUAL: [&str; 4] = [
    "user.labfs.class",
    "user.labfs.backend",
    "user.labfs.rule",
    "user.labfs.state",
];

/// How getxattr answers: the value, or its size when the caller asked for the size.
pub enum XattrOut {
    Data(Vec<u8>),
    Size(u32),
}

fn sized(v: Vec<u8>, size: u32) -> Result<XattrOut> {
    if size == 0 {
        Ok(XattrOut::Size(v.len() as u32))
    } else if v.len() > size as usize {
        Err(Error::Errno(libc::ERANGE))
    } else {
        Ok(XattrOut::Data(v))
    }
}

impl LabFs {
    /// The value of a computed `user.labfs.*` name.
    pub fn virtual_xattr(&self, loc: &Located, name: &str) -> Option<String> {
        let promoted =
            loc.backend == BackendKind::Atlas && loc.placement.class == Class::Transitional;
        let stored_class = if loc.backend == BackendKind::Atlas && loc.path != "/" {
            tags::read_tag(
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
                (BackendKind::Atlas, _) if promoted || stored_class.is_some() => "promoted".into(),
                (BackendKind::Atlas, _) => "atlas".into(),
                (BackendKind::Local, Class::Transitional) => {
                    if crate::promote::in_flight(&loc.path) {
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
        if let Some(v) = crate::control::get(self, ctx, ino, n)? {
            return sized(v, size);
        }
        let creds = self.creds(ctx);
        let loc = self.locate_ino(&creds, ino)?;
        if let Some(v) = self.virtual_xattr(&loc, n) {
            return sized(v.into_bytes(), size);
        }
        if n.starts_with(tags::PREFIX) && loc.backend == BackendKind::Atlas && loc.path != "/" {
            if let Some(v) = tags::read_tag(
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
        let p = self.xattr_path(&loc);
        let cname = CString::new(name.as_bytes()).map_err(|_| Error::Errno(libc::EINVAL))?;
        let _as = creds.assume()?;
        let mut buf = vec![0u8; size as usize];
        // SAFETY: valid C strings; a zero-size buffer asks for the size.
        let r = unsafe {
            libc::lgetxattr(
                p.as_ptr(),
                cname.as_ptr(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
            )
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

    fn xattr_path(&self, loc: &Located) -> CString {
        if loc.path == "/" {
            let fd = self.backend(loc.backend).root_fd();
            CString::new(format!("/proc/self/fd/{fd}")).unwrap_or_default()
        } else {
            tags::proc_path(loc.parent_fd.as_raw_fd(), &loc.name)
        }
    }

    pub fn listxattr(&self, ctx: &Ctx, ino: u64, size: u32) -> Result<XattrOut> {
        let creds = self.creds(ctx);
        let loc = self.locate_ino(&creds, ino)?;
        let p = self.xattr_path(&loc);
        let mut out = {
            let _as = creds.assume()?;
            // SAFETY: a null buffer of size 0 asks for the size.
            let need = unsafe { libc::llistxattr(p.as_ptr(), std::ptr::null_mut(), 0) };
            match check_size(need) {
                Ok(0) => Vec::new(),
                Ok(need) => {
                    let mut buf = vec![0u8; need + 256];
                    // SAFETY: valid buffer.
                    let r = unsafe {
                        libc::llistxattr(
                            p.as_ptr(),
                            buf.as_mut_ptr() as *mut libc::c_char,
                            buf.len(),
                        )
                    };
                    buf.truncate(check_size(r)?);
                    buf
                }
                Err(e) if e.errno() == libc::EOPNOTSUPP || e.errno() == libc::ENOTSUP => Vec::new(),
                Err(e) => return Err(e),
            }
        };
        let present: Vec<Vec<u8>> = out
            .split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| s.to_vec())
            .collect();
        let mut extra: Vec<&str> = VIRTUAL.to_vec();
        if loc.backend == BackendKind::Atlas && loc.path != "/" {
            for t in tags::STORED {
                if tags::read_tag(
                    &self.atlas,
                    loc.parent_fd.as_raw_fd(),
                    &loc.name,
                    &loc.path,
                    t,
                )
                .is_some()
                {
                    extra.push(t);
                }
            }
        }
        for v in extra {
            if !present.iter().any(|p| p == v.as_bytes()) {
                out.extend_from_slice(v.as_bytes());
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
        let n = name.to_str().unwrap_or("");
        if crate::control::set(self, ctx, ino, n, value)? {
            return Ok(());
        }
        if n.starts_with(tags::PREFIX) {
            return Err(Error::ReservedXattr {
                name: n.to_string(),
            });
        }
        let creds = self.creds(ctx);
        let loc = self.locate_ino(&creds, ino)?;
        self.check_writable(ctx, &loc.path, &loc.placement)?;
        let p = self.xattr_path(&loc);
        let cname = CString::new(name.as_bytes()).map_err(|_| Error::Errno(libc::EINVAL))?;
        let _as = creds.assume()?;
        // SAFETY: valid C strings and value buffer.
        crate::error::check(unsafe {
            libc::lsetxattr(
                p.as_ptr(),
                cname.as_ptr(),
                value.as_ptr() as *const libc::c_void,
                value.len(),
                flags,
            )
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
        let loc = self.locate_ino(&creds, ino)?;
        self.check_writable(ctx, &loc.path, &loc.placement)?;
        let p = self.xattr_path(&loc);
        let cname = CString::new(name.as_bytes()).map_err(|_| Error::Errno(libc::EINVAL))?;
        let _as = creds.assume()?;
        // SAFETY: valid C strings.
        crate::error::check(unsafe { libc::lremovexattr(p.as_ptr(), cname.as_ptr()) })?;
        Ok(())
    }
}
