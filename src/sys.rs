//! The raw system calls labfs makes that the standard library does not offer:
//! per-thread credentials, `openat2`, extended attributes, inode flags, resource
//! limits. Most go through `rustix` (safe wrappers, errno as a type); the few rustix
//! lacks (`setfsuid`, `setfsgid`) are written here, once, with their `unsafe`.
//!
//! Every function returns `io::Result` with the kernel's errno unchanged; mapping it
//! to what the caller sees is [`crate::error`]'s job. Nothing here knows about
//! namespaces, rules or backends.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::{IFlags, Mode, OFlags, ResolveFlags};
use rustix::process::{Gid, Resource, Rlimit};

fn from_rustix(e: rustix::io::Errno) -> io::Error {
    io::Error::from_raw_os_error(e.raw_os_error())
}

// ---------------------------------------------------------------------------
// Per-thread credentials
// ---------------------------------------------------------------------------

/// Give the calling thread a private fs_struct, so its umask is its own.
pub fn unshare_fs() -> io::Result<()> {
    // SAFETY: CLONE_FS only detaches this thread's cwd/root/umask from the other
    // threads; labfs resolves nothing against the cwd, so no thread relies on sharing it.
    unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::FS) }.map_err(from_rustix)
}

/// Set the calling thread's supplementary groups (the raw syscall: glibc's
/// `setgroups` would change every thread of the process).
pub fn set_thread_groups(groups: &[u32]) -> io::Result<()> {
    let gids: Vec<Gid> = groups.iter().map(|g| Gid::from_raw(*g)).collect();
    rustix::thread::set_thread_groups(&gids).map_err(from_rustix)
}

/// The calling thread's supplementary groups.
pub fn thread_groups() -> io::Result<Vec<u32>> {
    rustix::process::getgroups()
        .map(|v| v.into_iter().map(Gid::as_raw).collect())
        .map_err(from_rustix)
}

/// The calling thread's fsuid (`setfsuid(-1)` changes nothing and answers it).
pub fn fsuid() -> u32 {
    // SAFETY: an invalid id changes nothing; the call only reports the current one.
    unsafe { libc::syscall(libc::SYS_setfsuid, u32::MAX) as u32 }
}

/// The calling thread's fsgid.
pub fn fsgid() -> u32 {
    // SAFETY: as in [`fsuid`].
    unsafe { libc::syscall(libc::SYS_setfsgid, u32::MAX) as u32 }
}

/// Set the calling thread's fsuid. The syscall never reports failure itself, so the
/// result is read back: EPERM when the thread still has another fsuid.
pub fn set_fsuid(uid: u32) -> io::Result<()> {
    // SAFETY: changes only the calling thread's fsuid.
    unsafe { libc::syscall(libc::SYS_setfsuid, uid) };
    if fsuid() == uid {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(libc::EPERM))
    }
}

/// Set the calling thread's fsgid, checked as [`set_fsuid`] is.
pub fn set_fsgid(gid: u32) -> io::Result<()> {
    // SAFETY: changes only the calling thread's fsgid.
    unsafe { libc::syscall(libc::SYS_setfsgid, gid) };
    if fsgid() == gid {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(libc::EPERM))
    }
}

/// Set the umask of the calling thread's fs_struct; returns the previous one.
pub fn set_umask(mask: u32) -> u32 {
    rustix::process::umask(Mode::from_raw_mode(mask)).as_raw_mode()
}

/// The effective uid and gid of the process.
pub fn effective_ids() -> (u32, u32) {
    (
        rustix::process::geteuid().as_raw(),
        rustix::process::getegid().as_raw(),
    )
}

// ---------------------------------------------------------------------------
// Opening beneath a root
// ---------------------------------------------------------------------------

/// `openat2(dirfd, path, flags | O_CLOEXEC | O_NOFOLLOW)` with
/// `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`: `path` cannot leave
/// `dirfd`, whatever it contains.
pub fn open_beneath(dirfd: BorrowedFd<'_>, path: &CStr, flags: i32) -> io::Result<OwnedFd> {
    let flags = OFlags::from_bits_retain(flags as u32) | OFlags::CLOEXEC | OFlags::NOFOLLOW;
    rustix::fs::openat2(
        dirfd,
        path,
        flags,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(from_rustix)
}

// ---------------------------------------------------------------------------
// Extended attributes (on a path, without following a final symlink)
// ---------------------------------------------------------------------------

/// `lgetxattr`: the value's length; with an empty `buf`, only the length.
pub fn lgetxattr(path: &CStr, name: &CStr, buf: &mut [u8]) -> io::Result<usize> {
    if buf.is_empty() {
        return rustix::fs::lgetxattr_query(path, name).map_err(from_rustix);
    }
    rustix::fs::lgetxattr(path, name, buf).map_err(from_rustix)
}

/// `llistxattr`: the names, each NUL-terminated.
pub fn llistxattr(path: &CStr) -> io::Result<Vec<u8>> {
    loop {
        let need = rustix::fs::llistxattr_query(path).map_err(from_rustix)?;
        if need == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; need + 256];
        match rustix::fs::llistxattr(path, buf.as_mut_slice()) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            // Grew between the two calls: ask again.
            Err(rustix::io::Errno::RANGE) => continue,
            Err(e) => return Err(from_rustix(e)),
        }
    }
}

/// `lsetxattr` with the caller's `XATTR_CREATE`/`XATTR_REPLACE` flags.
pub fn lsetxattr(path: &CStr, name: &CStr, value: &[u8], flags: i32) -> io::Result<()> {
    let flags = rustix::fs::XattrFlags::from_bits_retain(flags as _);
    rustix::fs::lsetxattr(path, name, value, flags).map_err(from_rustix)
}

/// `lremovexattr`.
pub fn lremovexattr(path: &CStr, name: &CStr) -> io::Result<()> {
    rustix::fs::lremovexattr(path, name).map_err(from_rustix)
}

/// Following variants, for `/proc/self/fd/N` of an inode's O_PATH backing (the
/// magic link leads to the object itself; never used for symlinks, where it would
/// lead on to the target).
pub fn getxattr(path: &CStr, name: &CStr, buf: &mut [u8]) -> io::Result<usize> {
    if buf.is_empty() {
        return rustix::fs::getxattr_query(path, name).map_err(from_rustix);
    }
    rustix::fs::getxattr(path, name, buf).map_err(from_rustix)
}

/// `listxattr` (following): the names, each NUL-terminated.
pub fn listxattr(path: &CStr) -> io::Result<Vec<u8>> {
    loop {
        let need = rustix::fs::listxattr_query(path).map_err(from_rustix)?;
        if need == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; need + 256];
        match rustix::fs::listxattr(path, buf.as_mut_slice()) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(rustix::io::Errno::RANGE) => continue,
            Err(e) => return Err(from_rustix(e)),
        }
    }
}

/// `setxattr` (following).
pub fn setxattr(path: &CStr, name: &CStr, value: &[u8], flags: i32) -> io::Result<()> {
    let flags = rustix::fs::XattrFlags::from_bits_retain(flags as _);
    rustix::fs::setxattr(path, name, value, flags).map_err(from_rustix)
}

/// `removexattr` (following).
pub fn removexattr(path: &CStr, name: &CStr) -> io::Result<()> {
    rustix::fs::removexattr(path, name).map_err(from_rustix)
}

// ---------------------------------------------------------------------------
// Inode flags (chattr/lsattr)
// ---------------------------------------------------------------------------

/// `ioctl(fd, FS_IOC_GETFLAGS)`.
pub fn get_inode_flags(fd: impl AsFd) -> io::Result<u32> {
    rustix::fs::ioctl_getflags(fd)
        .map(|f| f.bits())
        .map_err(from_rustix)
}

/// `ioctl(fd, FS_IOC_SETFLAGS)`.
pub fn set_inode_flags(fd: impl AsFd, flags: u32) -> io::Result<()> {
    rustix::fs::ioctl_setflags(fd, IFlags::from_bits_retain(flags)).map_err(from_rustix)
}

/// This node's host name, as the kernel has it (not sanitized).
pub fn hostname() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

/// `ioctl(fd, FS_IOC_FSGETXATTR)`: the raw 28-byte `struct fsxattr`.
pub fn get_fsxattr(fd: impl AsFd) -> io::Result<[u8; 28]> {
    use std::os::fd::AsRawFd;
    const FS_IOC_FSGETXATTR: libc::c_ulong = 0x801c_581f;
    let mut out = [0u8; 28];
    // SAFETY: the kernel writes at most sizeof(struct fsxattr) = 28 bytes into `out`.
    let r = unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), FS_IOC_FSGETXATTR, out.as_mut_ptr()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Opening by path, locks, pipes, unmounting, sessions
// ---------------------------------------------------------------------------

/// `open(path, flags | O_CLOEXEC)` (e.g. `/proc/self/fd/N` to reopen an object).
pub fn open_path(path: &CStr, flags: i32) -> io::Result<OwnedFd> {
    let flags = OFlags::from_bits_retain(flags as u32) | OFlags::CLOEXEC;
    rustix::fs::open(path, flags, Mode::empty()).map_err(from_rustix)
}

/// `openat(dirfd, name, flags | O_CLOEXEC)`.
pub fn open_at(dirfd: BorrowedFd<'_>, name: &CStr, flags: i32) -> io::Result<OwnedFd> {
    let flags = OFlags::from_bits_retain(flags as u32) | OFlags::CLOEXEC;
    rustix::fs::openat(dirfd, name, flags, Mode::empty()).map_err(from_rustix)
}

/// `flock(fd, LOCK_EX | LOCK_NB)`.
pub fn try_lock_exclusive(fd: impl AsFd) -> io::Result<()> {
    rustix::fs::flock(fd, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(from_rustix)
}

/// `ftruncate(fd, len)`.
pub fn truncate_fd(fd: impl AsFd, len: u64) -> io::Result<()> {
    rustix::fs::ftruncate(fd, len).map_err(from_rustix)
}

/// `pipe2(O_CLOEXEC)`: (read end, write end).
pub fn pipe_cloexec() -> io::Result<(OwnedFd, OwnedFd)> {
    rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(from_rustix)
}

/// `umount2(path, flags)` with `MNT_DETACH` (lazy) and/or `UMOUNT_NOFOLLOW`.
pub fn unmount(path: &CStr, lazy: bool, nofollow: bool) -> io::Result<()> {
    use rustix::mount::UnmountFlags;
    let mut f = UnmountFlags::empty();
    if lazy {
        f |= UnmountFlags::DETACH;
    }
    if nofollow {
        f |= UnmountFlags::NOFOLLOW;
    }
    rustix::mount::unmount(path, f).map_err(from_rustix)
}

/// `setsid()`: a new session, detached from the terminal.
pub fn new_session() -> io::Result<()> {
    rustix::process::setsid().map(|_| ()).map_err(from_rustix)
}

// ---------------------------------------------------------------------------
// Memory
// ---------------------------------------------------------------------------

/// Return the allocator's free memory to the system (glibc keeps freed chunks).
pub fn release_free_memory() {
    // SAFETY: malloc_trim only consolidates and releases free memory.
    unsafe { libc::malloc_trim(0) };
}

// ---------------------------------------------------------------------------
// Resource limits
// ---------------------------------------------------------------------------

/// The daemon's RLIMIT_NOFILE after [`raise_nofile_limit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NofileLimit {
    /// The soft limit now in force (`u64::MAX` when unlimited).
    pub soft: u64,
    /// The hard limit now in force.
    pub hard: u64,
    /// The hard limit could be raised to `fs.nr_open` (root with CAP_SYS_RESOURCE).
    pub raised_hard: bool,
}

/// `/proc/sys/fs/nr_open`: the most descriptors one process may be allowed.
pub fn nr_open() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Raise RLIMIT_NOFILE as far as the process may: soft and hard to `fs.nr_open` when
/// it can raise the hard limit (CAP_SYS_RESOURCE), else the soft limit to the hard
/// one. Every open file of every caller is one of the daemon's descriptors, so a
/// daemon whose limit is no larger than a caller's would run out before the caller.
pub fn raise_nofile_limit() -> io::Result<NofileLimit> {
    let lim = rustix::process::getrlimit(Resource::Nofile);
    let hard = lim.maximum.unwrap_or(u64::MAX);
    if let Some(n) = nr_open().filter(|n| *n > hard) {
        let want = Rlimit {
            current: Some(n),
            maximum: Some(n),
        };
        if rustix::process::setrlimit(Resource::Nofile, want).is_ok() {
            return Ok(NofileLimit {
                soft: n,
                hard: n,
                raised_hard: true,
            });
        }
    }
    if lim.current != lim.maximum {
        rustix::process::setrlimit(
            Resource::Nofile,
            Rlimit {
                current: lim.maximum,
                maximum: lim.maximum,
            },
        )
        .map_err(from_rustix)?;
    }
    Ok(NofileLimit {
        soft: hard,
        hard,
        raised_hard: false,
    })
}

/// The soft RLIMIT_NOFILE in force (`u64::MAX` when unlimited).
pub fn nofile_limit() -> u64 {
    rustix::process::getrlimit(Resource::Nofile)
        .current
        .unwrap_or(u64::MAX)
}
