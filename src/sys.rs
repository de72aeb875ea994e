//! The one module that makes raw system calls: per-thread credentials, opening
//! beneath a root (`openat2`), the `*at` calls on names (stat, mkdir, unlink, rename,
//! link, readlink, times, owner and mode), extended attributes, inode flags, file
//! system space, descriptors, signals, the allocator, resource limits and user
//! lookups. Everything else in labfs calls these, not `libc` or `rustix` itself.
//!
//! Most go through `rustix` (safe wrappers, errno as a type). The few rustix lacks
//! are written here once, each with its `unsafe` and a `// SAFETY:` reason beside it:
//! `setfsuid`/`setfsgid`, `FS_IOC_FSGETXATTR`, `fork`, `pthread_sigmask`/`sigwait`,
//! `malloc_trim`/`mallopt`, `getpwnam_r`/`getgrnam_r` (NSS lives in the C library),
//! plus [`with_fd`] (lending a descriptor number to rustix) and [`empty_stat`].
//!
//! Every function returns `io::Result` with the kernel's errno unchanged; mapping it
//! to what the caller sees is [`crate::error`]'s job. Each wraps exactly the one
//! syscall its name says (no retries, no extra calls), so swapping a hand-written
//! `libc` call for one of these changes neither the syscalls made nor their errno.
//! Nothing here knows about namespaces, rules or backends.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, IntoRawFd, OwnedFd, RawFd};

use rustix::fs::{AtFlags, IFlags, Mode, OFlags, ResolveFlags, Timespec, Timestamps};
use rustix::process::{Gid, Resource, Rlimit, Uid};

fn from_rustix(e: rustix::io::Errno) -> io::Error {
    io::Error::from_raw_os_error(e.raw_os_error())
}

// ---------------------------------------------------------------------------
// Descriptor numbers
// ---------------------------------------------------------------------------

/// Lend the descriptor number `fd` to `f` for one call, for the helpers whose
/// signatures take a `RawFd` (`fs::backend`, `promote::util`: their callers pass a
/// descriptor they hold, an `OwnedFd`'s or a backend root's, for the whole call).
/// `-1`, which is never a descriptor, is refused with EBADF as the kernel would.
pub fn with_fd<R>(fd: RawFd, f: impl FnOnce(BorrowedFd<'_>) -> io::Result<R>) -> io::Result<R> {
    if fd == -1 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: `fd` is not -1 (the one value a BorrowedFd cannot hold) and the borrow
    // ends with `f`. That the number is open is the caller's promise, as it was for
    // the libc calls these helpers made before: a closed number makes the syscall
    // fail with EBADF, it cannot make anything read or write memory it should not.
    f(unsafe { BorrowedFd::borrow_raw(fd) })
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

/// `setfsuid(id)`: the fsuid the thread had before the call (the syscall reports
/// nothing else, not even failure).
fn setfsuid_raw(id: u32) -> u32 {
    // SAFETY: setfsuid takes a plain integer and changes only the calling thread's
    // fsuid (rustix has no wrapper); an id it refuses changes nothing.
    unsafe { libc::syscall(libc::SYS_setfsuid, id) as u32 }
}

/// `setfsgid(id)`, as [`setfsuid_raw`].
fn setfsgid_raw(id: u32) -> u32 {
    // SAFETY: as in [`setfsuid_raw`], for the fsgid.
    unsafe { libc::syscall(libc::SYS_setfsgid, id) as u32 }
}

/// The calling thread's fsuid (`setfsuid(-1)` changes nothing and answers it).
pub fn fsuid() -> u32 {
    setfsuid_raw(u32::MAX)
}

/// The calling thread's fsgid.
pub fn fsgid() -> u32 {
    setfsgid_raw(u32::MAX)
}

/// Set the calling thread's fsuid. The syscall never reports failure itself, so the
/// result is read back: EPERM when the thread still has another fsuid.
pub fn set_fsuid(uid: u32) -> io::Result<()> {
    setfsuid_raw(uid);
    if fsuid() == uid {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(libc::EPERM))
    }
}

/// Set the calling thread's fsgid, checked as [`set_fsuid`] is.
pub fn set_fsgid(gid: u32) -> io::Result<()> {
    setfsgid_raw(gid);
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
    open_beneath_mode(dirfd, path, flags, 0)
}

/// [`open_beneath`] with the mode of a file `O_CREAT` makes (ignored without
/// `O_CREAT`: openat2, unlike openat, refuses a mode it would not use).
pub fn open_beneath_mode(
    dirfd: BorrowedFd<'_>,
    path: &CStr,
    flags: i32,
    mode: u32,
) -> io::Result<OwnedFd> {
    let mode = if flags & libc::O_CREAT != 0 { mode } else { 0 };
    let flags = OFlags::from_bits_retain(flags as u32) | OFlags::CLOEXEC | OFlags::NOFOLLOW;
    rustix::fs::openat2(
        dirfd,
        path,
        flags,
        Mode::from_raw_mode(mode),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(from_rustix)
}

// ---------------------------------------------------------------------------
// Status of an object
// ---------------------------------------------------------------------------

/// An all-zero `struct stat` (a valid value of every field), to fill in.
pub fn empty_stat() -> libc::stat {
    // SAFETY: `struct stat` is plain integers; all-zero is a valid value of each.
    unsafe { std::mem::zeroed() }
}

/// rustix's `Stat` as the `libc::stat` the rest of labfs reads (the same kernel
/// `struct stat`, field for field; libc's has private padding, hence the copy).
fn to_libc_stat(s: &rustix::fs::Stat) -> libc::stat {
    let mut st = empty_stat();
    st.st_dev = s.st_dev as _;
    st.st_ino = s.st_ino as _;
    st.st_nlink = s.st_nlink as _;
    st.st_mode = s.st_mode as _;
    st.st_uid = s.st_uid as _;
    st.st_gid = s.st_gid as _;
    st.st_rdev = s.st_rdev as _;
    st.st_size = s.st_size as _;
    st.st_blksize = s.st_blksize as _;
    st.st_blocks = s.st_blocks as _;
    st.st_atime = s.st_atime as _;
    st.st_atime_nsec = s.st_atime_nsec as _;
    st.st_mtime = s.st_mtime as _;
    st.st_mtime_nsec = s.st_mtime_nsec as _;
    st.st_ctime = s.st_ctime as _;
    st.st_ctime_nsec = s.st_ctime_nsec as _;
    st
}

/// `fstat(fd)` (an O_PATH descriptor too).
pub fn fstat(fd: impl AsFd) -> io::Result<libc::stat> {
    rustix::fs::fstat(fd)
        .map(|s| to_libc_stat(&s))
        .map_err(from_rustix)
}

/// `fstatat(dirfd, name, AT_SYMLINK_NOFOLLOW)`: lstat of one name in a directory.
pub fn lstat_at(dirfd: impl AsFd, name: &CStr) -> io::Result<libc::stat> {
    rustix::fs::statat(dirfd, name, AtFlags::SYMLINK_NOFOLLOW)
        .map(|s| to_libc_stat(&s))
        .map_err(from_rustix)
}

/// Space on a filesystem, from `fstatvfs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FsSpace {
    /// Bytes an unprivileged caller may still write (`f_bavail * f_frsize`).
    pub avail: u64,
    /// Size in bytes (`f_blocks * f_frsize`).
    pub total: u64,
    /// Size in blocks (`f_blocks`); 0 when the filesystem does not say (ramfs).
    pub blocks: u64,
}

/// `fstatvfs(fd)`: the space of the filesystem `fd` is on.
pub fn fs_space(fd: impl AsFd) -> io::Result<FsSpace> {
    let sv = rustix::fs::fstatvfs(fd).map_err(from_rustix)?;
    Ok(FsSpace {
        avail: sv.f_bavail.saturating_mul(sv.f_frsize),
        total: sv.f_blocks.saturating_mul(sv.f_frsize),
        blocks: sv.f_blocks,
    })
}

// ---------------------------------------------------------------------------
// File handles (rustix has neither call)
// ---------------------------------------------------------------------------

/// Size of `struct file_handle`'s header: `handle_bytes` (u32), `handle_type` (i32).
pub const FILE_HANDLE_HEADER: usize = 8;

/// `name_to_handle_at(fd, "", AT_EMPTY_PATH)`: the handle of the object behind `fd`
/// as the kernel encodes it (`struct file_handle`: the header, then at most `max`
/// bytes), and the id of the mount it belongs to. EOVERFLOW when it needs more than
/// `max`; EOPNOTSUPP where the filesystem has no handles.
pub fn file_handle(fd: impl AsFd, max: usize) -> io::Result<(Vec<u8>, i32)> {
    let mut buf = vec![0u8; FILE_HANDLE_HEADER + max];
    buf[..4].copy_from_slice(&(max as u32).to_ne_bytes());
    let mut mnt: libc::c_int = 0;
    // SAFETY: `buf` is a header saying `max` bytes follow and has room for them; the
    // kernel reads and writes only inside it. No Rust reference to the struct is
    // made (the header is read back as bytes), so its alignment does not matter.
    let r = unsafe {
        libc::name_to_handle_at(
            fd.as_fd().as_raw_fd(),
            c"".as_ptr(),
            buf.as_mut_ptr().cast(),
            &mut mnt,
            libc::AT_EMPTY_PATH,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    buf.truncate(FILE_HANDLE_HEADER + len.min(max));
    Ok((buf, mnt))
}

/// `open_by_handle_at(mount_fd, handle, flags | O_CLOEXEC)` for a handle from
/// [`file_handle`]; needs CAP_DAC_READ_SEARCH. `mount_fd` (any object on the
/// handle's mount) must not be O_PATH: the kernel answers EBADF for one. A handle
/// shorter than its header says is refused with EINVAL before the kernel would
/// read past it.
pub fn open_by_handle(mount_fd: impl AsFd, handle: &[u8], flags: i32) -> io::Result<OwnedFd> {
    let einval = || io::Error::from_raw_os_error(libc::EINVAL);
    let head: [u8; 4] = handle
        .get(..4)
        .and_then(|h| h.try_into().ok())
        .ok_or_else(einval)?;
    if handle.len() < FILE_HANDLE_HEADER + u32::from_ne_bytes(head) as usize {
        return Err(einval());
    }
    let mut buf = handle.to_vec();
    // SAFETY: `buf` holds a whole `struct file_handle` (checked above); the kernel
    // only reads it.
    let r = unsafe {
        libc::open_by_handle_at(
            mount_fd.as_fd().as_raw_fd(),
            buf.as_mut_ptr().cast(),
            flags | libc::O_CLOEXEC,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor, owned by nothing else.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(r) })
}

// ---------------------------------------------------------------------------
// Names in a directory (never following a final symlink unless said)
// ---------------------------------------------------------------------------

/// `openat(dirfd, name, flags | O_CLOEXEC, mode)`: `flags` says whether a final
/// symlink is followed (`O_NOFOLLOW`); `mode` is for `O_CREAT`.
pub fn open_at_mode(dirfd: impl AsFd, name: &CStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    let flags = OFlags::from_bits_retain(flags as u32) | OFlags::CLOEXEC;
    rustix::fs::openat(dirfd, name, flags, Mode::from_raw_mode(mode)).map_err(from_rustix)
}

/// `mkdirat(dirfd, name, mode)`.
pub fn mkdir_at(dirfd: impl AsFd, name: &CStr, mode: u32) -> io::Result<()> {
    rustix::fs::mkdirat(dirfd, name, Mode::from_raw_mode(mode)).map_err(from_rustix)
}

/// `unlinkat(dirfd, name, dir ? AT_REMOVEDIR : 0)`.
pub fn unlink_at(dirfd: impl AsFd, name: &CStr, dir: bool) -> io::Result<()> {
    let flags = if dir {
        AtFlags::REMOVEDIR
    } else {
        AtFlags::empty()
    };
    rustix::fs::unlinkat(dirfd, name, flags).map_err(from_rustix)
}

/// `renameat2(from_dir, from, to_dir, to, flags)`; with no flags, `renameat`
/// (what the C library's `renameat2` makes of flags 0).
pub fn rename_at(
    from_dir: impl AsFd,
    from: &CStr,
    to_dir: impl AsFd,
    to: &CStr,
    flags: u32,
) -> io::Result<()> {
    if flags == 0 {
        return rustix::fs::renameat(from_dir, from, to_dir, to).map_err(from_rustix);
    }
    let flags = rustix::fs::RenameFlags::from_bits_retain(flags);
    rustix::fs::renameat_with(from_dir, from, to_dir, to, flags).map_err(from_rustix)
}

/// `linkat(from_dir, from, to_dir, to, 0)`: a symlink is linked itself.
pub fn link_at(from_dir: impl AsFd, from: &CStr, to_dir: impl AsFd, to: &CStr) -> io::Result<()> {
    rustix::fs::linkat(from_dir, from, to_dir, to, AtFlags::empty()).map_err(from_rustix)
}

/// `readlinkat(dirfd, name)` into a `PATH_MAX + 1` buffer: the target's bytes.
pub fn readlink_at(dirfd: impl AsFd, name: &CStr) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    let n = rustix::fs::readlinkat_raw(dirfd, name, buf.as_mut_slice()).map_err(from_rustix)?;
    buf.truncate(n);
    Ok(buf)
}

/// A time as `utimensat` takes it.
fn timespec(sec: i64, nsec: i64) -> Timespec {
    Timespec {
        tv_sec: sec,
        tv_nsec: nsec as _,
    }
}

/// `utimensat(dirfd, name, [atime, mtime], AT_SYMLINK_NOFOLLOW)`; times are
/// (seconds, nanoseconds).
pub fn set_times_at(
    dirfd: impl AsFd,
    name: &CStr,
    atime: (i64, i64),
    mtime: (i64, i64),
) -> io::Result<()> {
    let t = Timestamps {
        last_access: timespec(atime.0, atime.1),
        last_modification: timespec(mtime.0, mtime.1),
    };
    rustix::fs::utimensat(dirfd, name, &t, AtFlags::SYMLINK_NOFOLLOW).map_err(from_rustix)
}

/// `futimens(fd, [atime, mtime])`, times as in [`set_times_at`].
pub fn set_times_fd(fd: impl AsFd, atime: (i64, i64), mtime: (i64, i64)) -> io::Result<()> {
    let t = Timestamps {
        last_access: timespec(atime.0, atime.1),
        last_modification: timespec(mtime.0, mtime.1),
    };
    rustix::fs::futimens(fd, &t).map_err(from_rustix)
}

/// `fchownat(dirfd, name, uid, gid, AT_SYMLINK_NOFOLLOW)`.
pub fn chown_at(dirfd: impl AsFd, name: &CStr, uid: u32, gid: u32) -> io::Result<()> {
    rustix::fs::chownat(
        dirfd,
        name,
        Some(Uid::from_raw(uid)),
        Some(Gid::from_raw(gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(from_rustix)
}

/// `fchmodat(dirfd, name, mode, 0)` (follows a final symlink, as fchmodat must).
pub fn chmod_at(dirfd: impl AsFd, name: &CStr, mode: u32) -> io::Result<()> {
    rustix::fs::chmodat(dirfd, name, Mode::from_raw_mode(mode), AtFlags::empty())
        .map_err(from_rustix)
}

/// `fchown(fd, uid, gid)`.
pub fn fchown(fd: impl AsFd, uid: u32, gid: u32) -> io::Result<()> {
    rustix::fs::fchown(fd, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid))).map_err(from_rustix)
}

/// `fchmod(fd, mode)`.
pub fn fchmod(fd: impl AsFd, mode: u32) -> io::Result<()> {
    rustix::fs::fchmod(fd, Mode::from_raw_mode(mode)).map_err(from_rustix)
}

/// `symlinkat(target, dirfd, name)`.
pub fn symlink_at(target: &CStr, dirfd: impl AsFd, name: &CStr) -> io::Result<()> {
    rustix::fs::symlinkat(target, dirfd, name).map_err(from_rustix)
}

/// `mknodat(dirfd, name, mode, rdev)`; `mode` holds the file type (`S_IFIFO`...).
pub fn mknod_at(dirfd: impl AsFd, name: &CStr, mode: u32, rdev: u64) -> io::Result<()> {
    rustix::fs::mknodat(
        dirfd,
        name,
        rustix::fs::FileType::from_raw_mode(mode),
        Mode::from_raw_mode(mode & 0o7777),
        rdev,
    )
    .map_err(from_rustix)
}

/// `faccessat(dirfd, name, mode, flags)`: `mode` of `R_OK`/`W_OK`/`X_OK`/`F_OK`,
/// `flags` of `AT_EACCESS`/`AT_SYMLINK_NOFOLLOW`/`AT_EMPTY_PATH`.
pub fn access_at(dirfd: impl AsFd, name: &CStr, mode: i32, flags: i32) -> io::Result<()> {
    rustix::fs::accessat(
        dirfd,
        name,
        rustix::fs::Access::from_bits_retain(mode as _),
        AtFlags::from_bits_retain(flags as _),
    )
    .map_err(from_rustix)
}

/// `linkat(AT_FDCWD, path, dirfd, name, AT_SYMLINK_FOLLOW)`: a new name for the
/// object `path` leads to (a `/proc/self/fd/N` magic link: the object itself, even
/// one that has no name left).
pub fn link_following(path: &CStr, dirfd: impl AsFd, name: &CStr) -> io::Result<()> {
    rustix::fs::linkat(rustix::fs::CWD, path, dirfd, name, AtFlags::SYMLINK_FOLLOW)
        .map_err(from_rustix)
}

/// `chmod(path, mode)`, following (for `/proc/self/fd/N` of an O_PATH descriptor,
/// which `fchmod` refuses).
pub fn chmod_path(path: &CStr, mode: u32) -> io::Result<()> {
    rustix::fs::chmod(path, Mode::from_raw_mode(mode)).map_err(from_rustix)
}

/// `fchownat(fd, "", uid, gid, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW)`: the owner of
/// the object behind any descriptor of it, O_PATH included; `None` keeps that id.
pub fn chown_object(fd: impl AsFd, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    rustix::fs::chownat(
        fd,
        c"",
        uid.map(Uid::from_raw),
        gid.map(Gid::from_raw),
        AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(from_rustix)
}

/// `utimensat(fd, "", [atime, mtime], AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW)`: the
/// times of the object behind any descriptor of it. A time's nanoseconds may be
/// `UTIME_NOW` or `UTIME_OMIT`.
pub fn set_times_object(fd: impl AsFd, atime: (i64, i64), mtime: (i64, i64)) -> io::Result<()> {
    let t = Timestamps {
        last_access: timespec(atime.0, atime.1),
        last_modification: timespec(mtime.0, mtime.1),
    };
    rustix::fs::utimensat(fd, c"", &t, AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW)
        .map_err(from_rustix)
}

// ---------------------------------------------------------------------------
// Data on a descriptor
// ---------------------------------------------------------------------------

/// `write(fd, buf)`: how much was written (EINTR is the caller's to retry).
pub fn write(fd: impl AsFd, buf: &[u8]) -> io::Result<usize> {
    rustix::io::write(fd, buf).map_err(from_rustix)
}

/// `fsync(fd)`.
pub fn fsync(fd: impl AsFd) -> io::Result<()> {
    rustix::fs::fsync(fd).map_err(from_rustix)
}

/// `syncfs(fd)`: everything written to the filesystem of `fd`, made durable.
pub fn syncfs(fd: impl AsFd) -> io::Result<()> {
    rustix::fs::syncfs(fd).map_err(from_rustix)
}

/// `fdatasync(fd)`.
pub fn fdatasync(fd: impl AsFd) -> io::Result<()> {
    rustix::fs::fdatasync(fd).map_err(from_rustix)
}

/// `sync_file_range(fd, offset, len, flags)` with `SYNC_FILE_RANGE_*` flags.
pub fn sync_file_range(fd: impl AsFd, offset: u64, len: u64, flags: u32) -> io::Result<()> {
    // SAFETY: integers only (rustix has no wrapper); the descriptor is borrowed.
    let r = unsafe {
        libc::sync_file_range(
            fd.as_fd().as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            flags,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `pread(fd, buf, offset)`: how much was read (0 at the end of the file).
pub fn pread(fd: impl AsFd, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    rustix::io::pread(fd, buf, offset).map_err(from_rustix)
}

/// `pwrite(fd, buf, offset)`: how much was written.
pub fn pwrite(fd: impl AsFd, buf: &[u8], offset: u64) -> io::Result<usize> {
    rustix::io::pwrite(fd, buf, offset).map_err(from_rustix)
}

/// `lseek(fd, offset, whence)` for `SEEK_SET`/`SEEK_CUR`/`SEEK_END`/`SEEK_DATA`/
/// `SEEK_HOLE`: the new offset. Another `whence` is EINVAL, as the kernel says.
pub fn seek(fd: impl AsFd, offset: i64, whence: i32) -> io::Result<u64> {
    use rustix::fs::SeekFrom;
    // The kernel takes the offset as a signed loff_t: the casts keep its bits, so a
    // negative SEEK_SET offset is refused by the kernel (EINVAL), not here.
    let pos = match whence {
        libc::SEEK_SET => SeekFrom::Start(offset as u64),
        libc::SEEK_CUR => SeekFrom::Current(offset),
        libc::SEEK_END => SeekFrom::End(offset),
        libc::SEEK_DATA => SeekFrom::Data(offset as u64),
        libc::SEEK_HOLE => SeekFrom::Hole(offset as u64),
        _ => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
    };
    rustix::fs::seek(fd, pos).map_err(from_rustix)
}

/// `fallocate(fd, mode, offset, len)` with the caller's `FALLOC_FL_*` mode.
pub fn fallocate(fd: impl AsFd, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let mode = rustix::fs::FallocateFlags::from_bits_retain(mode as _);
    rustix::fs::fallocate(fd, mode, offset, len).map_err(from_rustix)
}

/// `copy_file_range(fd_in, &off_in, fd_out, &off_out, len, 0)`: how much was
/// copied; both offsets advance by it.
pub fn copy_file_range(
    fd_in: impl AsFd,
    off_in: &mut u64,
    fd_out: impl AsFd,
    off_out: &mut u64,
    len: usize,
) -> io::Result<usize> {
    rustix::fs::copy_file_range(fd_in, Some(off_in), fd_out, Some(off_out), len)
        .map_err(from_rustix)
}

/// `posix_fadvise(fd, offset, len, advice)` (`len` 0: to the end of the file) with
/// a `POSIX_FADV_*` advice; another advice is EINVAL, as the kernel says.
pub fn fadvise(fd: impl AsFd, offset: u64, len: u64, advice: i32) -> io::Result<()> {
    use rustix::fs::Advice;
    let advice = match advice {
        libc::POSIX_FADV_NORMAL => Advice::Normal,
        libc::POSIX_FADV_SEQUENTIAL => Advice::Sequential,
        libc::POSIX_FADV_RANDOM => Advice::Random,
        libc::POSIX_FADV_NOREUSE => Advice::NoReuse,
        libc::POSIX_FADV_WILLNEED => Advice::WillNeed,
        libc::POSIX_FADV_DONTNEED => Advice::DontNeed,
        _ => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
    };
    rustix::fs::fadvise(fd, offset, std::num::NonZeroU64::new(len), advice).map_err(from_rustix)
}

/// `fcntl(fd, F_DUPFD_CLOEXEC, 0)`: another descriptor of the same open file.
pub fn dup_cloexec(fd: impl AsFd) -> io::Result<OwnedFd> {
    rustix::io::fcntl_dupfd_cloexec(fd, 0).map_err(from_rustix)
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

/// `fgetxattr` into `buf` (not empty): the value's length; ERANGE when it is longer.
pub fn fgetxattr(fd: impl AsFd, name: &CStr, buf: &mut [u8]) -> io::Result<usize> {
    rustix::fs::fgetxattr(fd, name, buf).map_err(from_rustix)
}

/// `flistxattr` (size query, then the names, each NUL-terminated; asked again if
/// the list grew in between).
pub fn flistxattr(fd: impl AsFd) -> io::Result<Vec<u8>> {
    let fd = fd.as_fd();
    loop {
        let need = rustix::fs::flistxattr_query(fd).map_err(from_rustix)?;
        if need == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; need + 1024];
        match rustix::fs::flistxattr(fd, buf.as_mut_slice()) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(rustix::io::Errno::RANGE) => continue,
            Err(e) => return Err(from_rustix(e)),
        }
    }
}

/// `fsetxattr` with the caller's `XATTR_CREATE`/`XATTR_REPLACE` flags.
pub fn fsetxattr(fd: impl AsFd, name: &CStr, value: &[u8], flags: i32) -> io::Result<()> {
    let flags = rustix::fs::XattrFlags::from_bits_retain(flags as _);
    rustix::fs::fsetxattr(fd, name, value, flags).map_err(from_rustix)
}

/// `fremovexattr`.
pub fn fremovexattr(fd: impl AsFd, name: &CStr) -> io::Result<()> {
    rustix::fs::fremovexattr(fd, name).map_err(from_rustix)
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
    open_at_mode(dirfd, name, flags, 0)
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

/// What [`fork`] returned in this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forked {
    /// The new process.
    Child,
    /// The process that forked, with the child's pid.
    Parent(i32),
}

/// `fork()`.
///
/// # Safety
/// The process must be single-threaded: the child gets only the calling thread, and
/// a lock another thread held (the allocator's, a logger's) would stay locked in it
/// for ever.
pub unsafe fn fork() -> io::Result<Forked> {
    // SAFETY: the caller promises a single thread (see above); fork takes no pointers.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent(pid)),
    }
}

/// The calling thread's id (`gettid`).
pub fn thread_id() -> i32 {
    rustix::thread::gettid().as_raw_nonzero().get()
}

/// Name the calling thread (`prctl(PR_SET_NAME)`: what ps and top show; the kernel
/// keeps 15 bytes).
pub fn set_thread_name(name: &CStr) -> io::Result<()> {
    rustix::thread::set_name(name).map_err(from_rustix)
}

/// Point stdin and stdout, and stderr with `stderr_too`, at /dev/null.
pub fn stdio_to_dev_null(stderr_too: bool) -> io::Result<()> {
    let null = rustix::fs::open(c"/dev/null", OFlags::RDWR, Mode::empty()).map_err(from_rustix)?;
    let r = (|| {
        rustix::stdio::dup2_stdin(&null)?;
        rustix::stdio::dup2_stdout(&null)?;
        if stderr_too {
            rustix::stdio::dup2_stderr(&null)?;
        }
        Ok(())
    })()
    .map_err(from_rustix);
    if null.as_raw_fd() <= 2 {
        // stdio was closed and /dev/null took its number: it is stdio now, keep it.
        let _ = null.into_raw_fd();
    }
    r
}

// ---------------------------------------------------------------------------
// Signals
// ---------------------------------------------------------------------------

/// A set of signals blocked in every thread, to be taken with [`SignalSet::wait`].
pub struct SignalSet(libc::sigset_t);

/// Block `signals` in the calling thread and every thread it creates afterwards
/// (`pthread_sigmask(SIG_BLOCK)`), so they are delivered only to a [`SignalSet::wait`].
pub fn block_signals(signals: &[i32]) -> io::Result<SignalSet> {
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the set it is given a pointer to.
    unsafe { libc::sigemptyset(set.as_mut_ptr()) };
    // SAFETY: initialised just above.
    let mut set = unsafe { set.assume_init() };
    for &sig in signals {
        // SAFETY: `set` is an initialised sigset_t; an invalid signal is EINVAL.
        if unsafe { libc::sigaddset(&mut set, sig) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: `set` is valid; the old mask is not asked for (null).
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(SignalSet(set))
}

impl SignalSet {
    /// `sigwait`: the next of these signals sent to the process.
    pub fn wait(&self) -> io::Result<i32> {
        let mut sig: libc::c_int = 0;
        // SAFETY: both pointers are valid for the call.
        let rc = unsafe { libc::sigwait(&self.0, &mut sig) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(sig)
    }
}

// ---------------------------------------------------------------------------
// Memory
// ---------------------------------------------------------------------------

/// Return the allocator's free memory to the system (glibc keeps freed chunks).
pub fn release_free_memory() {
    // SAFETY: malloc_trim only consolidates and releases free memory.
    unsafe { libc::malloc_trim(0) };
}

/// `mallopt(M_MMAP_THRESHOLD, bytes)`: allocations of `bytes` or more get their own
/// mapping, returned to the system when freed.
pub fn set_mmap_threshold(bytes: i32) {
    // SAFETY: mallopt only tunes the allocator; an unusable value is refused (0).
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, bytes) };
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

/// `setrlimit(RLIMIT_CORE, 0)`: this process leaves no core dump (one would hold
/// whatever file data it had in memory).
pub fn disable_core_dumps() -> io::Result<()> {
    let none = Rlimit {
        current: Some(0),
        maximum: Some(0),
    };
    rustix::process::setrlimit(Resource::Core, none).map_err(from_rustix)
}

/// The soft RLIMIT_NOFILE in force (`u64::MAX` when unlimited).
pub fn nofile_limit() -> u64 {
    rustix::process::getrlimit(Resource::Nofile)
        .current
        .unwrap_or(u64::MAX)
}

// ---------------------------------------------------------------------------
// Users and groups (NSS: the C library's, as `id` and `ls -l` see them)
// ---------------------------------------------------------------------------

/// The uid of user `name` (`getpwnam_r`), `None` when there is none.
pub fn user_id(name: &str) -> io::Result<Option<u32>> {
    let Ok(cname) = CString::new(name) else {
        return Ok(None);
    };
    let mut buf: Vec<libc::c_char> = vec![0; 1024];
    loop {
        // SAFETY: `struct passwd` is integers and pointers; all-zero is valid.
        let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call, `buf.len()` is its size; the
        // entry's strings point into `buf`, and only the uid is read.
        let rc = unsafe {
            libc::getpwnam_r(
                cname.as_ptr(),
                &raw mut entry,
                buf.as_mut_ptr(),
                buf.len(),
                &raw mut result,
            )
        };
        match nss_answer(rc, result.is_null(), &mut buf) {
            Some(Ok(true)) => return Ok(Some(entry.pw_uid)),
            Some(Ok(false)) => return Ok(None),
            Some(Err(e)) => return Err(e),
            None => continue,
        }
    }
}

/// The gid of group `name` (`getgrnam_r`), `None` when there is none.
pub fn group_id(name: &str) -> io::Result<Option<u32>> {
    let Ok(cname) = CString::new(name) else {
        return Ok(None);
    };
    let mut buf: Vec<libc::c_char> = vec![0; 1024];
    loop {
        // SAFETY: `struct group` is integers and pointers; all-zero is valid.
        let mut entry: libc::group = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::group = std::ptr::null_mut();
        // SAFETY: as in [`user_id`]; only the gid is read.
        let rc = unsafe {
            libc::getgrnam_r(
                cname.as_ptr(),
                &raw mut entry,
                buf.as_mut_ptr(),
                buf.len(),
                &raw mut result,
            )
        };
        match nss_answer(rc, result.is_null(), &mut buf) {
            Some(Ok(true)) => return Ok(Some(entry.gr_gid)),
            Some(Ok(false)) => return Ok(None),
            Some(Err(e)) => return Err(e),
            None => continue,
        }
    }
}

/// What a `get*nam_r` result means: found (true), no such entry (false), an error,
/// or `None` after growing `buf` for another try (ERANGE, up to 1 MiB).
fn nss_answer(rc: i32, null: bool, buf: &mut Vec<libc::c_char>) -> Option<io::Result<bool>> {
    match rc {
        0 => Some(Ok(!null)),
        libc::ERANGE if buf.len() < 1 << 20 => {
            let len = buf.len() * 2;
            buf.resize(len, 0);
            None
        }
        // Some libcs report "no such entry" as an errno.
        libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => Some(Ok(false)),
        rc => Some(Err(io::Error::from_raw_os_error(rc))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn errno<T: std::fmt::Debug>(r: io::Result<T>) -> i32 {
        match r {
            Ok(v) => panic!("expected an error, got {v:?}"),
            Err(e) => e.raw_os_error().unwrap_or(0),
        }
    }

    fn dir_fd(path: &std::path::Path) -> OwnedFd {
        let c = CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
        open_path(&c, libc::O_PATH | libc::O_DIRECTORY).expect("open dir")
    }

    #[test]
    fn the_kernels_errno_reaches_the_caller_unchanged() {
        let t = tempfile::tempdir().expect("tempdir");
        let d = dir_fd(t.path());
        std::fs::create_dir(t.path().join("sub")).expect("mkdir");
        std::fs::write(t.path().join("f"), b"x").expect("write");
        std::os::unix::fs::symlink("sub", t.path().join("link")).expect("symlink");

        assert_eq!(errno(lstat_at(&d, c"missing")), libc::ENOENT);
        assert_eq!(errno(mkdir_at(&d, c"sub", 0o755)), libc::EEXIST);
        assert_eq!(errno(unlink_at(&d, c"sub", false)), libc::EISDIR);
        assert_eq!(errno(unlink_at(&d, c"f", true)), libc::ENOTDIR);
        assert_eq!(
            errno(rename_at(&d, c"f", &d, c"sub", libc::RENAME_NOREPLACE)),
            libc::EEXIST
        );
        assert_eq!(errno(link_at(&d, c"missing", &d, c"new")), libc::ENOENT);
        assert_eq!(
            errno(open_beneath(d.as_fd(), c"../x", libc::O_PATH)),
            libc::EXDEV
        );
        assert_eq!(
            errno(open_beneath(d.as_fd(), c"link/x", libc::O_PATH)),
            libc::ELOOP
        );
        // A final symlink is never followed.
        assert_eq!(
            errno(open_at_mode(
                &d,
                c"link",
                libc::O_RDONLY | libc::O_NOFOLLOW,
                0
            )),
            libc::ELOOP
        );
        assert_eq!(errno(with_fd(-1, |fd| fstat(fd))), libc::EBADF);
        // -1 is refused before rustix sees it; another closed number reaches the kernel.
        assert_eq!(errno(with_fd(i32::MAX, |fd| fstat(fd))), libc::EBADF);
    }

    #[test]
    fn stat_answers_what_std_reads() {
        let t = tempfile::tempdir().expect("tempdir");
        let d = dir_fd(t.path());
        std::fs::write(t.path().join("f"), b"hello").expect("write");
        set_times_at(&d, c"f", (1_600_000_000, 5), (1_700_000_000, 123_456_789))
            .expect("utimensat");
        let m = std::fs::symlink_metadata(t.path().join("f")).expect("metadata");
        for st in [lstat_at(&d, c"f").expect("lstat"), {
            let f = open_at_mode(&d, c"f", libc::O_RDONLY, 0).expect("open");
            fstat(&f).expect("fstat")
        }] {
            assert_eq!(st.st_dev, m.dev());
            assert_eq!(st.st_ino, m.ino());
            assert_eq!(st.st_mode, m.mode());
            assert_eq!(st.st_nlink, m.nlink());
            assert_eq!(st.st_uid, m.uid());
            assert_eq!(st.st_gid, m.gid());
            assert_eq!(st.st_size, 5);
            assert_eq!(st.st_blocks, m.blocks() as i64);
            assert_eq!((st.st_atime, st.st_atime_nsec), (1_600_000_000, 5));
            assert_eq!(
                (st.st_mtime, st.st_mtime_nsec),
                (1_700_000_000, 123_456_789)
            );
            assert_eq!((st.st_ctime, st.st_ctime_nsec), (m.ctime(), m.ctime_nsec()));
        }
        let sp = fs_space(&d).expect("fstatvfs");
        assert!(sp.blocks > 0 && sp.total >= sp.avail);
    }

    #[test]
    fn names_are_bytes() {
        let t = tempfile::tempdir().expect("tempdir");
        let d = dir_fd(t.path());
        let target = <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(b"caf\xe9/x");
        std::os::unix::fs::symlink(target, t.path().join("l")).expect("symlink");
        assert_eq!(readlink_at(&d, c"l").expect("readlink"), b"caf\xe9/x");
        mkdir_at(&d, c"d\xff", 0o700).expect("mkdir");
        rename_at(&d, c"d\xff", &d, c"e\xfe", 0).expect("rename");
        assert!(lstat_at(&d, c"e\xfe").is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR));
        unlink_at(&d, c"e\xfe", true).expect("rmdir");
        assert_eq!(errno(lstat_at(&d, c"e\xfe")), libc::ENOENT);
    }

    #[test]
    fn a_file_handle_reopens_the_object_after_its_name_is_gone() {
        let t = tempfile::tempdir().expect("tempdir");
        let d = dir_fd(t.path());
        std::fs::write(t.path().join("f"), b"x").expect("write");
        let f = open_at_mode(&d, c"f", libc::O_PATH | libc::O_NOFOLLOW, 0).expect("open");
        let (h, mnt) = match file_handle(&f, 128) {
            Ok(v) => v,
            // The filesystem under the temporary directory has no handles: only the
            // refusals can be checked.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                assert_eq!(errno(open_by_handle(&d, &[1, 0, 0, 0], 0)), libc::EINVAL);
                return;
            }
            Err(e) => panic!("name_to_handle_at: {e}"),
        };
        assert!(h.len() > FILE_HANDLE_HEADER);
        assert_eq!(file_handle(&d, 128).expect("dir handle").1, mnt);
        assert_eq!(errno(file_handle(&f, 0)), libc::EOVERFLOW);
        std::fs::hard_link(t.path().join("f"), t.path().join("g")).expect("link");
        std::fs::remove_file(t.path().join("f")).expect("unlink");
        assert_eq!(errno(open_by_handle(&d, &h, libc::O_PATH)), libc::EBADF);
        let rd = open_at_mode(&d, c".", libc::O_RDONLY | libc::O_DIRECTORY, 0).expect("open");
        let again = open_by_handle(&rd, &h, libc::O_PATH).expect("open_by_handle_at");
        assert_eq!(
            fstat(&again).expect("fstat").st_ino,
            fstat(&f).expect("fstat").st_ino
        );
        // A header that claims more bytes than there are never reaches the kernel.
        assert_eq!(
            errno(open_by_handle(&d, &h[..h.len() - 1], 0)),
            libc::EINVAL
        );
        assert_eq!(errno(open_by_handle(&d, &h[..3], 0)), libc::EINVAL);
    }

    #[test]
    fn data_calls_move_the_bytes_they_say() {
        let t = tempfile::tempdir().expect("tempdir");
        let d = dir_fd(t.path());
        let f = open_at_mode(&d, c"f", libc::O_RDWR | libc::O_CREAT | libc::O_EXCL, 0o600)
            .expect("create");
        assert_eq!(pwrite(&f, b"hello world", 3).expect("pwrite"), 11);
        let mut buf = [0u8; 16];
        assert_eq!(pread(&f, &mut buf, 0).expect("pread"), 14);
        assert_eq!(&buf[..14], b"\0\0\0hello world");
        assert_eq!(seek(&f, -5, libc::SEEK_END).expect("lseek"), 9);
        assert_eq!(seek(&f, 2, libc::SEEK_CUR).expect("lseek"), 11);
        assert_eq!(seek(&f, 0, libc::SEEK_DATA).expect("SEEK_DATA"), 0);
        assert_eq!(seek(&f, 0, libc::SEEK_HOLE).expect("SEEK_HOLE"), 14);
        assert_eq!(errno(seek(&f, -1, libc::SEEK_SET)), libc::EINVAL);
        assert_eq!(errno(seek(&f, 0, 99)), libc::EINVAL);
        assert_eq!(errno(seek(&f, 100, libc::SEEK_DATA)), libc::ENXIO);
        fallocate(&f, 0, 0, 8192).expect("fallocate");
        assert_eq!(fstat(&f).expect("fstat").st_size, 8192);
        fdatasync(&f).expect("fdatasync");
        sync_file_range(&f, 0, 0, libc::SYNC_FILE_RANGE_WRITE).expect("sync_file_range");
        fadvise(&f, 0, 0, libc::POSIX_FADV_DONTNEED).expect("fadvise");
        assert_eq!(errno(fadvise(&f, 0, 0, 99)), libc::EINVAL);
        let g = open_at_mode(&d, c"g", libc::O_RDWR | libc::O_CREAT | libc::O_EXCL, 0o600)
            .expect("create");
        let (mut oi, mut oo) = (3u64, 1u64);
        assert_eq!(
            copy_file_range(&f, &mut oi, &g, &mut oo, 5).expect("copy"),
            5
        );
        assert_eq!((oi, oo), (8, 6));
        let mut out = [0u8; 6];
        assert_eq!(pread(&g, &mut out, 0).expect("pread"), 6);
        assert_eq!(&out, b"\0hello");
        let again = dup_cloexec(&g).expect("dup");
        assert_ne!(again.as_raw_fd(), g.as_raw_fd());
        assert_eq!(
            fstat(&again).expect("fstat").st_ino,
            fstat(&g).expect("fstat").st_ino
        );
    }

    #[test]
    fn object_calls_act_on_what_the_descriptor_names() {
        let t = tempfile::tempdir().expect("tempdir");
        let d = dir_fd(t.path());
        symlink_at(c"target", &d, c"l").expect("symlink");
        assert_eq!(readlink_at(&d, c"l").expect("readlink"), b"target");
        mknod_at(&d, c"p", libc::S_IFIFO | 0o640, 0).expect("mkfifo");
        let st = lstat_at(&d, c"p").expect("lstat");
        assert_eq!(st.st_mode & libc::S_IFMT, libc::S_IFIFO);
        assert_eq!(
            errno(mknod_at(&d, c"p", libc::S_IFIFO | 0o640, 0)),
            libc::EEXIST
        );
        access_at(&d, c"p", libc::F_OK, 0).expect("faccessat");
        assert_eq!(
            errno(access_at(&d, c"missing", libc::F_OK, 0)),
            libc::ENOENT
        );
        // Through an O_PATH descriptor, after the name it was opened by is gone.
        std::fs::write(t.path().join("f"), b"x").expect("write");
        let o = open_at_mode(&d, c"f", libc::O_PATH | libc::O_NOFOLLOW, 0).expect("O_PATH");
        let proc = CString::new(format!("/proc/self/fd/{}", o.as_raw_fd())).expect("path");
        link_following(&proc, &d, c"back").expect("linkat");
        std::fs::remove_file(t.path().join("f")).expect("unlink");
        chmod_path(&proc, 0o604).expect("chmod");
        chown_object(&o, None, Some(1)).expect("fchownat");
        set_times_object(&o, (0, libc::UTIME_OMIT), (1_234, 5)).expect("utimensat");
        let st = lstat_at(&d, c"back").expect("lstat");
        assert_eq!(st.st_ino, fstat(&o).expect("fstat").st_ino);
        assert_eq!(st.st_mode & 0o7777, 0o604);
        assert_eq!((st.st_uid, st.st_gid), (0, 1));
        assert_eq!((st.st_mtime, st.st_mtime_nsec), (1_234, 5));
        // The symlink itself is chowned, not its (missing) target.
        chown_object(
            &open_at_mode(&d, c"l", libc::O_PATH | libc::O_NOFOLLOW, 0).expect("O_PATH"),
            Some(2),
            None,
        )
        .expect("lchown");
        assert_eq!(lstat_at(&d, c"l").expect("lstat").st_uid, 2);
    }

    #[test]
    fn users_and_groups_come_from_nss() {
        assert_eq!(user_id("root").expect("getpwnam_r"), Some(0));
        assert_eq!(group_id("root").expect("getgrnam_r"), Some(0));
        assert_eq!(user_id("labfs-no-such-user").expect("getpwnam_r"), None);
        assert_eq!(group_id("labfs-no-such-group").expect("getgrnam_r"), None);
        assert_eq!(user_id("nul\0inside").expect("name"), None);
    }
}
