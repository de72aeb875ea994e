//! `user.labfs.*` tags: the persistent ones promotion writes on Atlas, and where they
//! live when Atlas has no user xattrs (NFSv3).
//!
//! Namespace (through the mount every `user.labfs.*` name is labfs's and read-only):
//! - stored on Atlas by promote: `user.labfs.class`, `user.labfs.promoted_at`,
//!   `user.labfs.origin`, `user.labfs.digest`;
//! - computed by the mount (never stored): `user.labfs.backend`, `user.labfs.rule`,
//!   `user.labfs.state`; `user.labfs.class` shows the stored class when there is one,
//!   else the rule's class.

use std::ffi::{CStr, CString};
use std::os::fd::RawFd;

use crate::fs::Backend;

pub const PREFIX: &str = "user.labfs.";
pub const CLASS: &str = "user.labfs.class";
pub const PROMOTED_AT: &str = "user.labfs.promoted_at";
pub const ORIGIN: &str = "user.labfs.origin";
pub const DIGEST: &str = "user.labfs.digest";
/// Tags promote stores on Atlas.
pub const STORED: [&str; 4] = [CLASS, PROMOTED_AT, ORIGIN, DIGEST];

/// `/proc/self/fd/DIR/NAME`: reaches NAME in an already opened directory without
/// resolving any path from `/` (the l*xattr calls do not follow a final symlink).
pub fn proc_path(dirfd: RawFd, name: &CStr) -> CString {
    let mut v = format!("/proc/self/fd/{dirfd}/").into_bytes();
    v.extend_from_slice(name.to_bytes());
    CString::new(v).unwrap_or_default()
}

/// Read one xattr of `name` in `dirfd`; `None` when absent or unreadable.
pub fn get_xattr(dirfd: RawFd, name: &CStr, attr: &str) -> Option<Vec<u8>> {
    let p = proc_path(dirfd, name);
    let a = CString::new(attr).ok()?;
    let mut buf = vec![0u8; 256];
    loop {
        // SAFETY: valid C strings and buffer.
        let n = unsafe {
            libc::lgetxattr(p.as_ptr(), a.as_ptr(), buf.as_mut_ptr() as *mut libc::c_void, buf.len())
        };
        if n >= 0 {
            buf.truncate(n as usize);
            return Some(buf);
        }
        if std::io::Error::last_os_error().raw_os_error() == Some(libc::ERANGE) && buf.len() < 65536 {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        return None;
    }
}

/// A stored tag of an Atlas object.
pub fn read_tag(_atlas: &Backend, dirfd: RawFd, name: &CStr, _path: &str, tag: &str) -> Option<Vec<u8>> {
    get_xattr(dirfd, name, tag)
}

/// Whether the Atlas object `name` in `dirfd` (namespace path `path`) was promoted.
pub fn is_promoted(atlas: &Backend, dirfd: RawFd, name: &CStr, path: &str) -> bool {
    read_tag(atlas, dirfd, name, path, CLASS).is_some()
}
