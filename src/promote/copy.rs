//! Copying one file's content with its digest, and its metadata.
//!
//! Content: the source's data segments (SEEK_DATA/SEEK_HOLE) are copied with
//! `copy_file_range` when the two filesystems allow it (reflink or server-side copy),
//! else with read/write; holes stay holes (the target is sized with ftruncate). The
//! blake3 digest is computed in the same pass over the logical content (holes hash as
//! zeros), so it equals `b3sum FILE`.

use std::ffi::CString;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::job::{JobError, JobResult};
use super::util;
use crate::error::{check, check_size, Error, Result};

pub const CHUNK: usize = 2 << 20;
static ZEROS: [u8; 65536] = [0u8; 65536];

fn seek(fd: RawFd, off: u64, whence: i32) -> Result<Option<u64>> {
    // SAFETY: valid descriptor.
    let r = unsafe { libc::lseek(fd, off as libc::off_t, whence) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(Error::Io(e));
    }
    Ok(Some(r as u64))
}

fn hash_zeros(h: &mut blake3::Hasher, mut n: u64) {
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        h.update(&ZEROS[..k]);
        n -= k as u64;
    }
}

fn pread_full(fd: RawFd, buf: &mut [u8], off: u64) -> Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: valid descriptor and buffer.
        let n = unsafe {
            libc::pread(
                fd,
                buf[done..].as_mut_ptr() as *mut libc::c_void,
                buf.len() - done,
                (off + done as u64) as libc::off_t,
            )
        };
        match check_size(n) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

fn pwrite_full(fd: RawFd, buf: &[u8], off: u64) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: valid descriptor and buffer.
        let n = unsafe {
            libc::pwrite(
                fd,
                buf[done..].as_ptr() as *const libc::c_void,
                buf.len() - done,
                (off + done as u64) as libc::off_t,
            )
        };
        match check_size(n) {
            Ok(0) => return Err(Error::Errno(libc::EIO)),
            Ok(n) => done += n,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// copy_file_range of exactly `len` bytes at `off`; `Ok(false)` when the kernel cannot
/// do it between these two files (the caller then writes the bytes itself).
fn cfr(src: RawFd, dst: RawFd, off: u64, len: usize) -> Result<bool> {
    let mut done = 0usize;
    while done < len {
        let mut oi = (off + done as u64) as libc::off64_t;
        let mut oo = oi;
        // SAFETY: valid descriptors and offset pointers.
        let r = unsafe { libc::copy_file_range(src, &mut oi, dst, &mut oo, len - done, 0) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EXDEV)
                | Some(libc::EOPNOTSUPP)
                | Some(libc::EINVAL)
                | Some(libc::ENOSYS)
                | Some(libc::EBADF)
                    if done == 0 =>
                {
                    Ok(false)
                }
                _ => Err(Error::Io(e)),
            };
        }
        if r == 0 {
            return if done == 0 {
                Ok(false)
            } else {
                Err(Error::Errno(libc::EIO))
            };
        }
        done += r as usize;
    }
    Ok(true)
}

/// Copy `size` bytes of `src` to the empty file `dst`, keeping holes; returns the
/// blake3 digest of the content. `use_cfr` is shared by a job's workers: cleared the
/// first time copy_file_range is refused between the two filesystems.
pub fn copy_data(
    src: RawFd,
    dst: RawFd,
    size: u64,
    buf: &mut [u8],
    use_cfr: &AtomicBool,
    progress: &AtomicU64,
    stop: &dyn Fn() -> bool,
) -> JobResult<blake3::Hash> {
    let io = |what: &'static str| move |e: Error| JobError::Failed(format!("{what}: {e}"));
    let mut h = blake3::Hasher::new();
    let mut pos = 0u64;
    while pos < size {
        let data = match seek(src, pos, libc::SEEK_DATA) {
            Ok(Some(d)) => d.min(size),
            Ok(None) => size,
            Err(_) => pos, // no SEEK_DATA: all data
        };
        if data > pos {
            hash_zeros(&mut h, data - pos);
            progress.fetch_add(data - pos, Ordering::Relaxed);
            pos = data;
        }
        if pos >= size {
            break;
        }
        let hole = match seek(src, pos, libc::SEEK_HOLE) {
            Ok(Some(x)) => x.min(size),
            _ => size,
        };
        let hole = if hole <= pos { size } else { hole };
        while pos < hole {
            if stop() {
                return Err(JobError::Stopped("stopped while copying".into()));
            }
            let want = ((hole - pos) as usize).min(buf.len());
            let n = pread_full(src, &mut buf[..want], pos).map_err(io("reading the local copy"))?;
            if n < want {
                return Err(JobError::Failed(
                    "the file shrank while it was being promoted (is something still writing it?)"
                        .into(),
                ));
            }
            h.update(&buf[..n]);
            let mut written = false;
            if use_cfr.load(Ordering::Relaxed) {
                written = cfr(src, dst, pos, n).map_err(io("copy_file_range to Atlas"))?;
                if !written {
                    use_cfr.store(false, Ordering::Relaxed);
                }
            }
            if !written {
                pwrite_full(dst, &buf[..n], pos).map_err(io("writing to Atlas"))?;
            }
            pos += n as u64;
            progress.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
    // SAFETY: valid descriptor.
    check(unsafe { libc::ftruncate(dst, size as libc::off_t) })
        .map_err(io("sizing the copy on Atlas"))?;
    Ok(h.finalize())
}

/// Digest of a whole file, read from the start (holes read as zeros). Drops the
/// file's cached pages first, so on NFS the bytes come from the server.
pub fn digest_fd(
    fd: RawFd,
    buf: &mut [u8],
    stop: &dyn Fn() -> bool,
) -> JobResult<(blake3::Hash, u64)> {
    // SAFETY: valid descriptor; advice only.
    unsafe { libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_DONTNEED) };
    let mut h = blake3::Hasher::new();
    let mut off = 0u64;
    loop {
        if stop() {
            return Err(JobError::Stopped("stopped while verifying".into()));
        }
        let n =
            pread_full(fd, buf, off).map_err(|e| JobError::Failed(format!("re-reading: {e}")))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        off += n as u64;
        if n < buf.len() {
            break;
        }
    }
    Ok((h.finalize(), off))
}

/// Whether an xattr name is copied by promotion: user xattrs (but labfs's own) and
/// POSIX ACLs.
fn copied_xattr(name: &[u8]) -> bool {
    (name.starts_with(b"user.") && !name.starts_with(crate::tags::PREFIX.as_bytes()))
        || name == b"system.posix_acl_access"
        || name == b"system.posix_acl_default"
}

/// Copy user xattrs and POSIX ACLs from `src` to `dst` (open files or directories).
/// Returns the names the target refused because it has no xattrs.
pub fn copy_xattrs(src: RawFd, dst: RawFd) -> Result<Vec<String>> {
    let mut lost = Vec::new();
    for name in util::list_xattrs(src)? {
        let b = name.as_bytes();
        if !copied_xattr(b) {
            continue;
        }
        let c = CString::new(b).map_err(|_| Error::Errno(libc::EINVAL))?;
        let v = match util::get_xattr_fd(src, &c) {
            Ok(v) => v,
            Err(e) if e.errno() == libc::ENODATA => continue,
            Err(e) => return Err(e),
        };
        match util::set_xattr_fd(dst, &c, &v) {
            Ok(()) => {}
            Err(e) if util::xattr_unsupported(&e) => lost.push(name.to_string_lossy().into_owned()),
            Err(e) => return Err(e),
        }
    }
    Ok(lost)
}

/// Ownership and permission bits of an open file or directory (chown first: it
/// clears setuid/setgid, which chmod then restores).
pub fn set_owner_mode(fd: RawFd, uid: u32, gid: u32, mode: u32) -> Result<()> {
    // SAFETY: valid descriptor.
    check(unsafe { libc::fchown(fd, uid, gid) })?;
    // SAFETY: valid descriptor.
    check(unsafe { libc::fchmod(fd, (mode & 0o7777) as libc::mode_t) })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    #[test]
    fn copy_keeps_holes_and_digest_matches_content() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sp = dir.path().join("src");
        {
            let mut f = std::fs::File::create(&sp).expect("create");
            f.write_all(b"hello").expect("write");
            f.set_len(8 << 20).expect("set_len");
            use std::os::unix::fs::FileExt;
            f.write_at(b"tail", (8 << 20) - 4).expect("write_at");
        }
        let src = std::fs::File::open(&sp).expect("open");
        let dst = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(dir.path().join("dst"))
            .expect("dst");
        let mut buf = vec![0u8; CHUNK];
        let cfr = AtomicBool::new(true);
        let prog = AtomicU64::new(0);
        let d = copy_data(
            src.as_raw_fd(),
            dst.as_raw_fd(),
            8 << 20,
            &mut buf,
            &cfr,
            &prog,
            &|| false,
        )
        .map_err(|e| format!("{e:?}"))
        .expect("copy");
        let content = std::fs::read(&sp).expect("read");
        assert_eq!(d, blake3::hash(&content));
        assert_eq!(
            std::fs::read(dir.path().join("dst")).expect("read dst"),
            content
        );
        let (d2, n) = digest_fd(dst.as_raw_fd(), &mut buf, &|| false)
            .map_err(|e| format!("{e:?}"))
            .expect("digest");
        assert_eq!((d2, n), (d, 8 << 20));
        assert_eq!(prog.load(Ordering::Relaxed), 8 << 20);
    }
}
