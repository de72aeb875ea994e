//! Copying one file's content with its digest, and its metadata.
//!
//! Content: the source's data segments (SEEK_DATA/SEEK_HOLE) are copied with
//! `copy_file_range` when the two filesystems allow it (reflink or server-side copy),
//! else with read/write; holes stay holes (the target is sized with ftruncate). The
//! blake3 digest is computed in the same pass over the logical content (holes hash as
//! zeros), so it equals `b3sum FILE`.

use std::ffi::CString;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::job::{JobError, JobResult};
use super::util;
use crate::error::{check, check_size, Error, Result};

pub const CHUNK: usize = 1 << 20;
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

/// A buffer aligned for O_DIRECT reads (4 KiB, which every filesystem accepts).
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer is plain memory owned by this value.
unsafe impl Send for AlignedBuf {}

const ALIGN: usize = 4096;

impl AlignedBuf {
    pub fn new(len: usize) -> AlignedBuf {
        let len = len.next_multiple_of(ALIGN).max(ALIGN);
        let layout = std::alloc::Layout::from_size_align(len, ALIGN)
            .unwrap_or(std::alloc::Layout::new::<u8>());
        // SAFETY: non-zero size; a null result is handled below.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr =
            std::ptr::NonNull::new(p).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len }
    }
    pub fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: `len` bytes allocated and exclusively borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if let Ok(layout) = std::alloc::Layout::from_size_align(self.len, ALIGN) {
            // SAFETY: allocated in `new` with this layout.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) };
        }
    }
}

/// A range of a staged file written but not yet read back: the bytes that were
/// written (from the source), checked against what Atlas returns for them.
pub struct Pending {
    /// The staged file, opened for reading (with O_DIRECT where the filesystem has it).
    pub fd: std::sync::Arc<std::os::fd::OwnedFd>,
    pub direct: bool,
    pub off: u64,
    pub data: Vec<u8>,
    /// What to name in a message.
    pub what: std::sync::Arc<str>,
}

/// Read-back verification of what was staged, a little behind the copy: each range
/// written is queued, its writeback started at once (`sync_file_range`), and read
/// back from Atlas once a few more ranges were written, so reading one file overlaps
/// writing the next. The read bypasses the client's page cache: O_DIRECT where the
/// filesystem allows it (the kernel writes the range out first, then reads the
/// device, or the NFS server), else fdatasync + POSIX_FADV_DONTNEED + a buffered read.
pub struct ReadBack {
    queue: std::collections::VecDeque<Pending>,
    queued_bytes: usize,
    buf: AlignedBuf,
}

/// Ranges (and bytes) one worker keeps queued before it reads the oldest back.
const READBACK_RANGES: usize = 64;
const READBACK_BYTES: usize = 4 << 20;

impl ReadBack {
    pub fn new() -> ReadBack {
        ReadBack {
            queue: std::collections::VecDeque::new(),
            queued_bytes: 0,
            buf: AlignedBuf::new(CHUNK),
        }
    }

    /// Queue a written range (its writeback starts now); verify the oldest ones while
    /// the queue is over its bounds.
    pub fn push(&mut self, p: Pending, dst: RawFd) -> JobResult<()> {
        // SAFETY: valid descriptor; a hint only (start writeback, do not wait).
        unsafe {
            libc::sync_file_range(
                dst,
                p.off as libc::off64_t,
                p.data.len() as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
        self.queued_bytes += p.data.len();
        self.queue.push_back(p);
        while self.queue.len() > READBACK_RANGES || self.queued_bytes > READBACK_BYTES {
            self.check_oldest()?;
        }
        Ok(())
    }

    /// Verify everything still queued.
    pub fn drain(&mut self) -> JobResult<()> {
        while !self.queue.is_empty() {
            self.check_oldest()?;
        }
        Ok(())
    }

    fn check_oldest(&mut self) -> JobResult<()> {
        let Some(p) = self.queue.pop_front() else {
            return Ok(());
        };
        self.queued_bytes -= p.data.len();
        let fd = p.fd.as_raw_fd();
        let want = p.data.len();
        let got = if p.direct {
            // O_DIRECT: length rounded up to the alignment; a short read at EOF.
            let len = want.next_multiple_of(ALIGN);
            let buf = &mut self.buf.as_mut()[..len];
            match pread_full(fd, buf, p.off) {
                Ok(n) => Ok(n.min(want)),
                Err(e) => Err(e),
            }
        } else {
            // SAFETY: valid descriptor; the pages are clean after fdatasync, so the
            // advice drops them and the read goes to the server / device.
            unsafe {
                libc::fdatasync(fd);
                libc::posix_fadvise(
                    fd,
                    p.off as libc::off_t,
                    want as libc::off_t,
                    libc::POSIX_FADV_DONTNEED,
                );
            }
            pread_full(fd, &mut self.buf.as_mut()[..want], p.off)
        }
        .map_err(|e| {
            JobError::Failed(format!("{}: reading the copy back from Atlas: {e}", p.what))
        })?;
        if got != want || self.buf.as_mut()[..want] != p.data[..] {
            return Err(JobError::Failed(format!(
                "{}: the copy on Atlas does not match the local file (bytes {}..{} differ); nothing was changed",
                p.what,
                p.off,
                p.off + want as u64
            )));
        }
        Ok(())
    }
}

impl Default for ReadBack {
    fn default() -> Self {
        Self::new()
    }
}

/// Where [`copy_data`] queues what it wrote to be read back.
pub struct ReadBackOf<'a> {
    pub fd: std::sync::Arc<std::os::fd::OwnedFd>,
    pub direct: bool,
    pub what: std::sync::Arc<str>,
    pub queue: &'a mut ReadBack,
}

/// Copy `size` bytes of `src` to the empty file `dst`, keeping holes; returns the
/// blake3 digest of the content. Every range written is queued on `rb` to be read
/// back from Atlas through `check_fd` (see [`ReadBack`]). `use_cfr` is shared by a
/// job's workers: cleared the first time copy_file_range is refused between the two
/// filesystems.
#[allow(clippy::too_many_arguments)]
pub fn copy_data(
    src: RawFd,
    dst: RawFd,
    size: u64,
    buf: &mut [u8],
    use_cfr: &AtomicBool,
    progress: &AtomicU64,
    stop: &dyn Fn() -> bool,
    readback: Option<ReadBackOf<'_>>,
) -> JobResult<blake3::Hash> {
    let io = |what: &'static str| move |e: Error| JobError::Failed(format!("{what}: {e}"));
    let mut readback = readback;
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
            if let Some(r) = readback.as_mut() {
                r.queue.push(
                    Pending {
                        fd: r.fd.clone(),
                        direct: r.direct,
                        off: pos,
                        data: buf[..n].to_vec(),
                        what: r.what.clone(),
                    },
                    dst,
                )?;
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
            None,
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
