//! Files, directories and the names in them: openat2 beneath a root, stat, file
//! handles, the `*at` calls, data on a descriptor, extended attributes, inode flags.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use rustix::fs::{AtFlags, IFlags, Mode, OFlags, ResolveFlags, Timespec, Timestamps};
use rustix::process::{Gid, Uid};

use super::from_rustix;

/// What `fstatvfs` answers (rustix's struct: the same fields as `struct statvfs`).
pub use rustix::fs::StatVfs;

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

/// `fstatvfs(fd)` as the kernel answers it (for `statfs(2)` through the mount).
pub fn statvfs(fd: impl AsFd) -> io::Result<StatVfs> {
    rustix::fs::fstatvfs(fd).map_err(from_rustix)
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
// Opening by path, locks, truncation
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

/// `close(fd)` with its result, which std's and rustix's `drop` ignore (NFS reports
/// deferred write errors there). The descriptor is gone either way, as close(2) says.
pub fn close(fd: OwnedFd) -> io::Result<()> {
    use std::os::fd::IntoRawFd;
    let raw = fd.into_raw_fd();
    // SAFETY: `raw` was owned by `fd`, which gave it up above, so it is closed exactly
    // once, here.
    if unsafe { libc::close(raw) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `ftruncate(fd, len)`.
pub fn truncate_fd(fd: impl AsFd, len: u64) -> io::Result<()> {
    rustix::fs::ftruncate(fd, len).map_err(from_rustix)
}
