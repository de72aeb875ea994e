//! Small syscall helpers of the promotion engine: every call is relative to an open
//! directory descriptor, never a path resolved from `/`.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{check, check_size, Error, Result};

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
    // SAFETY: open_how is plain data; zero is valid for every field.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC | libc::O_NOFOLLOW) as u64;
    if flags & libc::O_CREAT != 0 {
        how.mode = mode as u64;
    }
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2 with a valid dirfd, C string and open_how of the right size.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dirfd,
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(Error::Io(std::io::Error::last_os_error()));
    }
    // SAFETY: the kernel returned a new descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// openat of one name (no symlink following).
pub fn open_at(dirfd: RawFd, name: &CStr, flags: i32, mode: u32) -> Result<OwnedFd> {
    // SAFETY: valid dirfd and C string.
    let fd = check(unsafe {
        libc::openat(
            dirfd,
            name.as_ptr(),
            flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    })?;
    // SAFETY: new descriptor owned here.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn mkdir_at(dirfd: RawFd, name: &CStr, mode: u32) -> Result<()> {
    // SAFETY: valid dirfd and C string.
    check(unsafe { libc::mkdirat(dirfd, name.as_ptr(), mode as libc::mode_t) })?;
    Ok(())
}

/// mkdir that tolerates an existing directory.
pub fn mkdir_p1(dirfd: RawFd, name: &CStr, mode: u32) -> Result<()> {
    match mkdir_at(dirfd, name, mode) {
        Err(e) if e.errno() == libc::EEXIST => Ok(()),
        r => r,
    }
}

pub fn unlink_at(dirfd: RawFd, name: &CStr, dir: bool) -> Result<()> {
    let flags = if dir { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: valid dirfd and C string.
    check(unsafe { libc::unlinkat(dirfd, name.as_ptr(), flags) })?;
    Ok(())
}

pub fn rename_at(
    from_dir: RawFd,
    from: &CStr,
    to_dir: RawFd,
    to: &CStr,
    noreplace: bool,
) -> Result<()> {
    let flags = if noreplace { libc::RENAME_NOREPLACE } else { 0 };
    // SAFETY: valid dirfds and C strings.
    check(unsafe { libc::renameat2(from_dir, from.as_ptr(), to_dir, to.as_ptr(), flags) })?;
    Ok(())
}

pub fn readlink_at(dirfd: RawFd, name: &CStr) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: valid dirfd, C string and buffer.
    let n = unsafe {
        libc::readlinkat(
            dirfd,
            name.as_ptr(),
            buf.as_mut_ptr() as *mut libc::c_char,
            buf.len(),
        )
    };
    let n = check_size(n)?;
    buf.truncate(n);
    Ok(buf)
}

pub fn fsync_fd(fd: RawFd) -> Result<()> {
    // SAFETY: valid descriptor.
    check(unsafe { libc::fsync(fd) })?;
    Ok(())
}

/// fsync a directory reached by an O_PATH descriptor (reopened for reading).
pub fn fsync_dir(dirfd: RawFd) -> Result<()> {
    let fd = open_under(dirfd, ".", libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    fsync_fd(fd.as_raw_fd())
}

pub fn timespecs(st: &libc::stat) -> [libc::timespec; 2] {
    [
        libc::timespec {
            tv_sec: st.st_atime,
            tv_nsec: st.st_atime_nsec,
        },
        libc::timespec {
            tv_sec: st.st_mtime,
            tv_nsec: st.st_mtime_nsec,
        },
    ]
}

/// A descriptor to [`syncfs`] the filesystem of `dirfd` with; open it *before* the
/// writes it must make durable (syncfs reports writeback errors seen since then).
pub fn syncfs_handle(dirfd: RawFd) -> Result<OwnedFd> {
    open_under(dirfd, ".", libc::O_RDONLY | libc::O_DIRECTORY, 0)
}

/// Make everything written to the filesystem of `fd` durable (one call instead of an
/// fsync per file and directory), reporting any writeback error since `fd` was opened.
pub fn syncfs(fd: RawFd) -> Result<()> {
    // SAFETY: valid descriptor.
    check(unsafe { libc::syncfs(fd) })?;
    Ok(())
}

/// Set atime and mtime of `name` in `dirfd` (not following a symlink).
pub fn set_times_at(dirfd: RawFd, name: &CStr, st: &libc::stat) -> Result<()> {
    let t = timespecs(st);
    // SAFETY: valid dirfd, C string and two timespecs.
    check(unsafe { libc::utimensat(dirfd, name.as_ptr(), t.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) })?;
    Ok(())
}

pub fn set_times_fd(fd: RawFd, st: &libc::stat) -> Result<()> {
    let t = timespecs(st);
    // SAFETY: valid descriptor and two timespecs.
    check(unsafe { libc::futimens(fd, t.as_ptr()) })?;
    Ok(())
}

/// Names of the extended attributes of an open file or directory.
pub fn list_xattrs(fd: RawFd) -> Result<Vec<OsString>> {
    // SAFETY: a null buffer of size 0 asks for the size.
    let need = unsafe { libc::flistxattr(fd, std::ptr::null_mut(), 0) };
    let need = match check_size(need) {
        Ok(n) => n,
        Err(e) if e.errno() == libc::EOPNOTSUPP => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    if need == 0 {
        return Ok(Vec::new());
    }
    let mut buf = vec![0u8; need + 1024];
    // SAFETY: valid buffer.
    let n = unsafe { libc::flistxattr(fd, buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    buf.truncate(check_size(n)?);
    Ok(buf
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| OsStr::from_bytes(s).to_os_string())
        .collect())
}

pub fn get_xattr_fd(fd: RawFd, name: &CStr) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: valid descriptor, C string and buffer.
        let n = unsafe {
            libc::fgetxattr(
                fd,
                name.as_ptr(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
            )
        };
        match check_size(n) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(e) if e.errno() == libc::ERANGE && buf.len() < (1 << 20) => {
                let len = buf.len() * 4;
                buf.resize(len, 0);
            }
            Err(e) => return Err(e),
        }
    }
}

pub fn set_xattr_fd(fd: RawFd, name: &CStr, value: &[u8]) -> Result<()> {
    // SAFETY: valid descriptor, C string and value buffer.
    check(unsafe {
        libc::fsetxattr(
            fd,
            name.as_ptr(),
            value.as_ptr() as *const libc::c_void,
            value.len(),
            0,
        )
    })?;
    Ok(())
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
    // SAFETY: zeroed statvfs is a valid out-parameter.
    let mut sv: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor and out pointer.
    if unsafe { libc::fstatvfs(fd, &mut sv) } != 0 || sv.f_blocks == 0 {
        return None;
    }
    Some(sv.f_bavail.saturating_mul(sv.f_frsize))
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
