//! Small syscall helpers of the promotion engine: every call is relative to an open
//! directory descriptor, never a path resolved from `/`.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};
use crate::sys;

/// This node's host name (the `user.labfs.origin` tag and the staging directory).
pub fn hostname() -> String {
    let s: String = crate::sys::hostname()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() {
        "unknown-host".to_string()
    } else {
        s
    }
}

/// Seconds since the epoch, now.
pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `2024-05-06T07:08:09Z` for a Unix time (UTC).
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if mo <= 2 { y + 1 } else { y };
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}Z")
}

pub fn cstr(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::Errno(libc::EINVAL))
}

pub fn cos<P: AsRef<OsStr> + ?Sized>(s: &P) -> Result<CString> {
    CString::new(s.as_ref().as_bytes()).map_err(|_| Error::Errno(libc::EINVAL))
}

/// A path or name for messages: UTF-8 as it is, other bytes as `\xNN` (never
/// mangled into U+FFFD, so two different names never read the same).
pub fn show<P: AsRef<OsStr> + ?Sized>(p: &P) -> String {
    let mut out = String::new();
    for chunk in p.as_ref().as_bytes().utf8_chunks() {
        out.push_str(chunk.valid());
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// Open the namespace path `p` beneath a backend's root (no symlinks), any bytes.
pub fn open_ns<P: AsRef<OsStr> + ?Sized>(
    b: &crate::fs::Backend,
    p: &P,
    flags: i32,
) -> Result<OwnedFd> {
    crate::fs::object::open_beneath(b.root_fd(), p.as_ref(), flags)
}

/// The directory at namespace path `p` of a backend, as O_PATH.
pub fn open_ns_dir<P: AsRef<OsStr> + ?Sized>(b: &crate::fs::Backend, p: &P) -> Result<OwnedFd> {
    open_ns(b, p, libc::O_PATH | libc::O_DIRECTORY)
}

/// openat2 beneath `dirfd` (no symlinks, no escaping); `rel` is relative ("." allowed).
pub fn open_under<P: AsRef<OsStr> + ?Sized>(
    dirfd: RawFd,
    rel: &P,
    flags: i32,
    mode: u32,
) -> Result<OwnedFd> {
    let rel = rel.as_ref();
    let c = cos(if rel.is_empty() { OsStr::new(".") } else { rel })?;
    Ok(sys::with_fd(dirfd, |d| {
        sys::open_beneath_mode(d, &c, flags, mode)
    })?)
}

/// openat of one name (no symlink following).
pub fn open_at(dirfd: RawFd, name: &CStr, flags: i32, mode: u32) -> Result<OwnedFd> {
    Ok(sys::with_fd(dirfd, |d| {
        sys::open_at_mode(d, name, flags | libc::O_NOFOLLOW, mode)
    })?)
}

pub fn mkdir_at(dirfd: RawFd, name: &CStr, mode: u32) -> Result<()> {
    Ok(sys::with_fd(dirfd, |d| sys::mkdir_at(d, name, mode))?)
}

/// mkdir that tolerates an existing directory.
pub fn mkdir_p1(dirfd: RawFd, name: &CStr, mode: u32) -> Result<()> {
    match mkdir_at(dirfd, name, mode) {
        Err(e) if e.errno() == libc::EEXIST => Ok(()),
        r => r,
    }
}

pub fn unlink_at(dirfd: RawFd, name: &CStr, dir: bool) -> Result<()> {
    Ok(sys::with_fd(dirfd, |d| sys::unlink_at(d, name, dir))?)
}

pub fn rename_at(
    from_dir: RawFd,
    from: &CStr,
    to_dir: RawFd,
    to: &CStr,
    noreplace: bool,
) -> Result<()> {
    let flags = if noreplace { libc::RENAME_NOREPLACE } else { 0 };
    Ok(sys::with_fd(from_dir, |f| {
        sys::with_fd(to_dir, |t| sys::rename_at(f, from, t, to, flags))
    })?)
}

pub fn readlink_at(dirfd: RawFd, name: &CStr) -> Result<Vec<u8>> {
    Ok(sys::with_fd(dirfd, |d| sys::readlink_at(d, name))?)
}

pub fn fsync_fd(fd: RawFd) -> Result<()> {
    Ok(sys::with_fd(fd, |fd| sys::fsync(fd))?)
}

/// fsync a directory reached by an O_PATH descriptor (reopened for reading).
pub fn fsync_dir(dirfd: RawFd) -> Result<()> {
    let fd = open_under(dirfd, ".", libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    Ok(sys::fsync(&fd)?)
}

/// (atime, mtime) of `st` as (seconds, nanoseconds), for [`sys::set_times_at`].
fn times_of(st: &libc::stat) -> ((i64, i64), (i64, i64)) {
    (
        (st.st_atime, st.st_atime_nsec),
        (st.st_mtime, st.st_mtime_nsec),
    )
}

/// A descriptor to [`syncfs`] the filesystem of `dirfd` with; open it *before* the
/// writes it must make durable (syncfs reports writeback errors seen since then).
pub fn syncfs_handle(dirfd: RawFd) -> Result<OwnedFd> {
    open_under(dirfd, ".", libc::O_RDONLY | libc::O_DIRECTORY, 0)
}

/// Make everything written to the filesystem of `fd` durable (one call instead of an
/// fsync per file and directory), reporting any writeback error since `fd` was opened.
pub fn syncfs(fd: RawFd) -> Result<()> {
    Ok(sys::with_fd(fd, |fd| sys::syncfs(fd))?)
}

/// Set atime and mtime of `name` in `dirfd` (not following a symlink).
pub fn set_times_at(dirfd: RawFd, name: &CStr, st: &libc::stat) -> Result<()> {
    let (a, m) = times_of(st);
    Ok(sys::with_fd(dirfd, |d| sys::set_times_at(d, name, a, m))?)
}

pub fn set_times_fd(fd: RawFd, st: &libc::stat) -> Result<()> {
    let (a, m) = times_of(st);
    Ok(sys::with_fd(fd, |fd| sys::set_times_fd(fd, a, m))?)
}

/// Names of the extended attributes of an open file or directory.
pub fn list_xattrs(fd: RawFd) -> Result<Vec<OsString>> {
    let buf = match sys::with_fd(fd, |fd| sys::flistxattr(fd)) {
        Ok(b) => b,
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(Vec::new()),
        Err(e) => return Err(Error::Io(e)),
    };
    Ok(buf
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| OsStr::from_bytes(s).to_os_string())
        .collect())
}

pub fn get_xattr_fd(fd: RawFd, name: &CStr) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; 4096];
    loop {
        match sys::with_fd(fd, |fd| sys::fgetxattr(fd, name, &mut buf)) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) && buf.len() < (1 << 20) => {
                let len = buf.len() * 4;
                buf.resize(len, 0);
            }
            Err(e) => return Err(Error::Io(e)),
        }
    }
}

pub fn set_xattr_fd(fd: RawFd, name: &CStr, value: &[u8]) -> Result<()> {
    Ok(sys::with_fd(fd, |fd| sys::fsetxattr(fd, name, value, 0))?)
}

/// Whether an errno means "this filesystem (or object type) has no such xattrs".
pub fn xattr_unsupported(e: &Error) -> bool {
    matches!(e.errno(), libc::EOPNOTSUPP | libc::EPERM)
}

/// Remove `name` in `dirfd` and everything below it (as the current identity).
pub fn remove_tree(dirfd: RawFd, name: &CStr) -> Result<()> {
    let st = match crate::fs::backend::fstatat(dirfd, name) {
        Ok(st) => st,
        Err(e) if e.errno() == libc::ENOENT => return Ok(()),
        Err(e) => return Err(e),
    };
    if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
        let fd = open_at(dirfd, name, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
        let pfd = open_at(dirfd, name, libc::O_PATH | libc::O_DIRECTORY, 0)?;
        for (child, _) in crate::fs::handle::list_dir(fd)? {
            if child == "." || child == ".." {
                continue;
            }
            let c = cos(&child)?;
            remove_tree(pfd.as_raw_fd(), &c)?;
        }
        match unlink_at(dirfd, name, true) {
            Err(e) if e.errno() == libc::ENOENT => Ok(()),
            r => r,
        }
    } else {
        match unlink_at(dirfd, name, false) {
            Err(e) if e.errno() == libc::ENOENT => Ok(()),
            r => r,
        }
    }
}

/// Free bytes on the filesystem of `fd`, or `None` when it does not say (ramfs
/// reports no blocks at all).
pub fn free_bytes(fd: RawFd) -> Option<u64> {
    match sys::with_fd(fd, |fd| sys::fs_space(fd)) {
        Ok(sp) if sp.blocks > 0 => Some(sp.avail),
        _ => None,
    }
}

/// `(st_dev, st_ino)` of every regular file this process has open: each handle open
/// through the mount holds a descriptor of its backing file in the daemon.
pub fn open_files() -> std::collections::HashSet<(u64, u64)> {
    let mut out = std::collections::HashSet::new();
    let Ok(rd) = std::fs::read_dir("/proc/self/fd") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(fd) = e.file_name().to_str().and_then(|n| n.parse::<RawFd>().ok()) else {
            continue;
        };
        if let Ok(st) = crate::fs::backend::fstat(fd) {
            if st.st_mode & libc::S_IFMT == libc::S_IFREG {
                out.insert((st.st_dev, st.st_ino));
            }
        }
    }
    out
}

/// A random hex id from /dev/urandom.
pub fn random_hex(bytes: usize) -> String {
    use std::io::Read;
    let mut b = vec![0u8; bytes];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_ok();
    if !ok {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let seed = t ^ ((std::process::id() as u128) << 64);
        for (i, x) in b.iter_mut().enumerate() {
            *x = (seed >> ((i % 16) * 8)) as u8;
        }
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
