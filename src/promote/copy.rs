//! Copying one file's content with its digest, and its metadata.
//!
//! Content: the source's data segments (SEEK_DATA/SEEK_HOLE) are copied with
//! `copy_file_range` when the two filesystems allow it (reflink or server-side copy),
//! else with read/write; holes stay holes (the target is sized with ftruncate). The
//! blake3 digest is computed in the same pass over the logical content (holes hash as
//! zeros), so it equals `b3sum FILE`.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use rustix::fs::{Advice, SeekFrom};
use rustix::io::Errno;

use super::job::{JobError, JobResult};
use super::util;
use crate::error::{Error, Result};

/// Bytes copied per read/write (and read back per O_DIRECT read).
pub const CHUNK: usize = 1 << 20;
static ZEROS: [u8; 65536] = [0u8; 65536];

fn rx(e: Errno) -> Error {
    Error::Errno(e.raw_os_error())
}

fn seek(fd: BorrowedFd<'_>, pos: SeekFrom) -> Result<Option<u64>> {
    match rustix::fs::seek(fd, pos) {
        Ok(r) => Ok(Some(r)),
        Err(Errno::NXIO) => Ok(None),
        Err(e) => Err(rx(e)),
    }
}

fn hash_zeros(h: &mut blake3::Hasher, mut n: u64) {
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        h.update(&ZEROS[..k]);
        n -= k as u64;
    }
}

fn pread_full(fd: BorrowedFd<'_>, buf: &mut [u8], off: u64) -> Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match rustix::io::pread(fd, &mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(rx(e)),
        }
    }
    Ok(done)
}

fn pwrite_full(fd: BorrowedFd<'_>, buf: &[u8], off: u64) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match rustix::io::pwrite(fd, &buf[done..], off + done as u64) {
            Ok(0) => return Err(Error::Errno(libc::EIO)),
            Ok(n) => done += n,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(rx(e)),
        }
    }
    Ok(())
}

/// copy_file_range of exactly `len` bytes at `off`; `Ok(false)` when the kernel cannot
/// do it between these two files (the caller then writes the bytes itself).
fn cfr(src: BorrowedFd<'_>, dst: BorrowedFd<'_>, off: u64, len: usize) -> Result<bool> {
    let mut done = 0usize;
    while done < len {
        let mut oi = off + done as u64;
        let mut oo = oi;
        match rustix::fs::copy_file_range(src, Some(&mut oi), dst, Some(&mut oo), len - done) {
            Ok(0) if done == 0 => return Ok(false),
            Ok(0) => return Err(Error::Errno(libc::EIO)),
            Ok(r) => done += r,
            Err(Errno::INTR) => continue,
            Err(Errno::XDEV | Errno::OPNOTSUPP | Errno::INVAL | Errno::NOSYS | Errno::BADF)
                if done == 0 =>
            {
                return Ok(false)
            }
            Err(e) => return Err(rx(e)),
        }
    }
    Ok(true)
}

/// A buffer aligned for O_DIRECT reads and writes (4 KiB, which every filesystem
/// accepts): the aligned part of a slightly larger zeroed vector, whose pages the
/// kernel hands out only when they are first touched (a tiny file's copy costs one).
pub struct AlignedBuf {
    mem: Vec<u8>,
    start: usize,
    len: usize,
}

/// Alignment of O_DIRECT buffers, offsets and lengths.
pub const ALIGN: usize = 4096;

impl AlignedBuf {
    pub fn new(len: usize) -> AlignedBuf {
        let len = len.next_multiple_of(ALIGN).max(ALIGN);
        let mem = vec![0u8; len + ALIGN];
        let start = mem.as_ptr().align_offset(ALIGN).min(ALIGN);
        AlignedBuf { mem, start, len }
    }
    pub fn as_mut(&mut self) -> &mut [u8] {
        &mut self.mem[self.start..self.start + self.len]
    }
}

/// A range of a staged file written through the page cache but not yet read back:
/// the bytes that were written (from the source), checked against what Atlas
/// returns for them.
pub struct Pending {
    /// The staged file, opened for reading (with O_DIRECT where the filesystem has it).
    pub fd: std::sync::Arc<std::os::fd::OwnedFd>,
    pub direct: bool,
    pub off: u64,
    pub data: Vec<u8>,
    /// What to name in a message.
    pub what: std::sync::Arc<str>,
}

/// Read-back verification of what was staged.
///
/// A range written with O_DIRECT (the default on a local Atlas) is on the device when
/// the write returns; it is read back at once, with O_DIRECT (from the device, not
/// the page cache, which O_DIRECT writes do not fill).
///
/// A range written through the page cache (Atlas on NFS, or a filesystem refusing
/// O_DIRECT writes) is queued: its writeback starts at once (`sync_file_range`), and
/// it is read back once a few more ranges were written, so reading one file overlaps
/// writing the next. The read bypasses the client's page cache: O_DIRECT where the
/// filesystem allows it (the kernel writes the range out first, then reads the
/// device, or the NFS server), else fdatasync + POSIX_FADV_DONTNEED + a buffered read.
pub struct ReadBack {
    queue: std::collections::VecDeque<Pending>,
    queued_bytes: usize,
    buf: AlignedBuf,
    /// Buffers of verified ranges, reused for the next ones (no allocation, no page
    /// faults per range); at most [`READBACK_BYTES`] + [`CHUNK`] of them are kept.
    spare: Vec<Vec<u8>>,
    spare_bytes: usize,
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
            spare: Vec::new(),
            spare_bytes: 0,
        }
    }

    /// A buffer holding a copy of `data`, from the spare ones when one is large enough.
    fn copy_of(&mut self, data: &[u8]) -> Vec<u8> {
        let mut v = match self.spare.iter().position(|v| v.capacity() >= data.len()) {
            Some(i) => {
                let v = self.spare.swap_remove(i);
                self.spare_bytes -= v.capacity();
                v
            }
            None => Vec::with_capacity(data.len()),
        };
        v.clear();
        v.extend_from_slice(data);
        v
    }

    fn recycle(&mut self, v: Vec<u8>) {
        if self.spare_bytes + v.capacity() <= READBACK_BYTES + CHUNK {
            self.spare_bytes += v.capacity();
            self.spare.push(v);
        }
    }

    /// Queue a range written through the page cache (its writeback starts now);
    /// verify the oldest ones while the queue is over its bounds.
    fn push(
        &mut self,
        fd: std::sync::Arc<std::os::fd::OwnedFd>,
        direct: bool,
        what: std::sync::Arc<str>,
        off: u64,
        data: &[u8],
        dst: BorrowedFd<'_>,
    ) -> JobResult<()> {
        // A hint only: start writeback, do not wait.
        let flags = libc::SYNC_FILE_RANGE_WRITE;
        let _ = crate::sys::sync_file_range(dst, off, data.len() as u64, flags);
        let p = Pending {
            fd,
            direct,
            off,
            data: self.copy_of(data),
            what,
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
        let r = self.check(p.fd.as_fd(), p.direct, p.off, &p.data, &p.what);
        self.recycle(p.data);
        r
    }

    /// Read `data.len()` bytes at `off` back from Atlas and compare them with `data`.
    fn check(
        &mut self,
        fd: BorrowedFd<'_>,
        direct: bool,
        off: u64,
        data: &[u8],
        what: &str,
    ) -> JobResult<()> {
        let want = data.len();
        let got = if direct {
            // O_DIRECT: length rounded up to the alignment; a short read at EOF.
            let len = want.next_multiple_of(ALIGN);
            let buf = &mut self.buf.as_mut()[..len];
            match pread_full(fd, buf, off) {
                Ok(n) => Ok(n.min(want)),
                Err(e) => Err(e),
            }
        } else {
            // The pages are clean after fdatasync, so the advice drops them and the
            // read goes to the server / device.
            let _ = rustix::fs::fdatasync(fd);
            let len = std::num::NonZeroU64::new(want as u64);
            let _ = rustix::fs::fadvise(fd, off, len, Advice::DontNeed);
            pread_full(fd, &mut self.buf.as_mut()[..want], off)
        }
        .map_err(|e| JobError::Failed(format!("{what}: reading the copy back from Atlas: {e}")))?;
        if got != want || self.buf.as_mut()[..want] != data[..] {
            return Err(JobError::Failed(format!(
                "{what}: the copy on Atlas does not match the local file (bytes {}..{} differ); nothing was changed",
                off,
                off + want as u64
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

/// Where [`copy_data`] reads what it wrote back from.
pub struct ReadBackOf<'a> {
    /// The staged file opened for reading back: O_DIRECT when `direct`, and then
    /// also for writing when `direct_write`.
    pub fd: std::sync::Arc<std::os::fd::OwnedFd>,
    pub direct: bool,
    /// Write through `fd` with O_DIRECT (bypassing the page cache; each range is on
    /// the device when the write returns), where the offset allows it.
    pub direct_write: bool,
    pub what: std::sync::Arc<str>,
    pub queue: &'a mut ReadBack,
}

/// Copy `size` bytes of `src` to the empty file `dst`, keeping holes; returns the
/// blake3 digest of the content. Every range written is read back from Atlas through
/// the read-back descriptor and compared with the source bytes (see [`ReadBack`]).
/// `buf` should be [`ALIGN`]-aligned for O_DIRECT writes (else they are buffered).
/// `use_cfr` is shared by a job's workers: cleared the first time copy_file_range is
/// refused between the two filesystems.
#[allow(clippy::too_many_arguments)]
pub fn copy_data(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    size: u64,
    buf: &mut [u8],
    use_cfr: &AtomicBool,
    progress: &AtomicU64,
    stop: &dyn Fn() -> bool,
    readback: Option<ReadBackOf<'_>>,
) -> JobResult<blake3::Hash> {
    let io = |what: &'static str| move |e: Error| JobError::Failed(format!("{what}: {e}"));
    let mut readback = readback;
    // O_DIRECT writes need an aligned buffer whose length is a multiple of ALIGN (a
    // short last piece is padded with zeros, cut off again by the ftruncate below).
    let mut direct_write = readback
        .as_ref()
        .is_some_and(|r| r.direct && r.direct_write)
        && (buf.as_ptr() as usize) % ALIGN == 0
        && buf.len() % ALIGN == 0;
    let mut h = blake3::Hasher::new();
    let mut pos = 0u64;
    // Where the last write ended, and whether a padded O_DIRECT write went past it:
    // the file is sized at the end unless its last byte was written exactly.
    let (mut end, mut padded) = (0u64, false);
    while pos < size {
        let data = match seek(src, SeekFrom::Data(pos)) {
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
        let hole = match seek(src, SeekFrom::Hole(pos)) {
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
            let mut direct = false;
            if use_cfr.load(Ordering::Relaxed) {
                written = cfr(src, dst, pos, n).map_err(io("copy_file_range to Atlas"))?;
                if !written {
                    use_cfr.store(false, Ordering::Relaxed);
                }
            }
            if !written && direct_write && pos % ALIGN as u64 == 0 {
                let r = readback.as_ref().map_or(dst, |r| r.fd.as_fd());
                // Padding stays inside the hole or past the end: a data segment ends
                // unaligned only where a hole (or the end of the file) begins, and the
                // next segment starts on a block boundary.
                let len = n.next_multiple_of(ALIGN);
                buf[n..len].fill(0);
                match pwrite_full(r, &buf[..len], pos) {
                    Ok(()) => {
                        (written, direct) = (true, true);
                        padded |= len > n;
                    }
                    // Refused (alignment this filesystem does not accept): write the
                    // rest of the file through the page cache.
                    Err(e) if e.errno() == libc::EINVAL => direct_write = false,
                    Err(e) => return Err(io("writing to Atlas")(e)),
                }
            }
            if !written {
                pwrite_full(dst, &buf[..n], pos).map_err(io("writing to Atlas"))?;
            }
            if let Some(r) = readback.as_mut() {
                if direct {
                    r.queue.check(r.fd.as_fd(), true, pos, &buf[..n], &r.what)?;
                } else {
                    let (fd, what) = (r.fd.clone(), r.what.clone());
                    r.queue.push(fd, r.direct, what, pos, &buf[..n], dst)?;
                }
            }
            end = pos + n as u64;
            pos += n as u64;
            progress.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
    if padded || end != size {
        rustix::fs::ftruncate(dst, size).map_err(|e| io("sizing the copy on Atlas")(rx(e)))?;
    }
    Ok(h.finalize())
}

/// Digest of a whole file, read from the start (holes read as zeros). Drops the
/// file's cached pages first, so on NFS the bytes come from the server.
pub fn digest_fd(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    stop: &dyn Fn() -> bool,
) -> JobResult<(blake3::Hash, u64)> {
    let _ = rustix::fs::fadvise(fd, 0, None, Advice::DontNeed);
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
pub fn copy_xattrs(src: BorrowedFd<'_>, dst: BorrowedFd<'_>) -> Result<Vec<String>> {
    let (src, dst) = (src.as_raw_fd(), dst.as_raw_fd());
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
pub fn set_owner_mode(fd: BorrowedFd<'_>, uid: u32, gid: u32, mode: u32) -> Result<()> {
    let (uid, gid) = (
        rustix::fs::Uid::from_raw(uid),
        rustix::fs::Gid::from_raw(gid),
    );
    rustix::fs::fchown(fd, Some(uid), Some(gid)).map_err(rx)?;
    rustix::fs::fchmod(fd, rustix::fs::Mode::from_raw_mode(mode & 0o7777)).map_err(rx)?;
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
            src.as_fd(),
            dst.as_fd(),
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
        let (d2, n) = digest_fd(dst.as_fd(), &mut buf, &|| false)
            .map_err(|e| format!("{e:?}"))
            .expect("digest");
        assert_eq!((d2, n), (d, 8 << 20));
        assert_eq!(prog.load(Ordering::Relaxed), 8 << 20);
    }
}

#[cfg(test)]
mod direct_tests {
    use super::*;
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    use std::sync::Arc;

    /// A source with data, a hole and an unaligned end; the staged file opened as
    /// the engine opens it (a buffered descriptor and an O_DIRECT one for writing and
    /// reading back). The temporary directory is on the disk, not tmpfs.
    fn setup(
        dir: &std::path::Path,
    ) -> (
        std::fs::File,
        std::fs::File,
        Arc<std::os::fd::OwnedFd>,
        u64,
        Vec<u8>,
    ) {
        let sp = dir.join("src");
        let size = 3 * CHUNK as u64 + 1234;
        let f = std::fs::File::create(&sp).expect("create");
        let a: Vec<u8> = (0..CHUNK + 777).map(|i| (i * 31 % 251) as u8).collect();
        f.write_all_at(&a, 0).expect("write");
        let b: Vec<u8> = (0..5000).map(|i| (i * 7 % 253) as u8).collect();
        f.write_all_at(&b, size - b.len() as u64)
            .expect("write tail");
        f.set_len(size).expect("set_len");
        let content = std::fs::read(&sp).expect("read");
        let dp = dir.join("dst");
        let dst = std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&dp)
            .expect("dst");
        let rfd = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&dp)
            .expect("O_DIRECT open of the staged file");
        (
            std::fs::File::open(&sp).expect("open"),
            dst,
            Arc::new(std::os::fd::OwnedFd::from(rfd)),
            size,
            content,
        )
    }

    #[test]
    fn direct_writes_keep_content_holes_and_exact_size() {
        let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
        let (src, dst, rfd, size, content) = setup(dir.path());
        let mut buf = AlignedBuf::new(CHUNK);
        let mut rb = ReadBack::new();
        let d = copy_data(
            src.as_fd(),
            dst.as_fd(),
            size,
            buf.as_mut(),
            &AtomicBool::new(false),
            &AtomicU64::new(0),
            &|| false,
            Some(ReadBackOf {
                fd: rfd,
                direct: true,
                direct_write: true,
                what: "dst".into(),
                queue: &mut rb,
            }),
        )
        .map_err(|e| format!("{e:?}"))
        .expect("copy");
        rb.drain().map_err(|e| format!("{e:?}")).expect("drain");
        assert_eq!(d, blake3::hash(&content));
        let got = std::fs::read(dir.path().join("dst")).expect("read dst");
        assert_eq!(
            got.len() as u64,
            size,
            "the zero padding of the last write was cut off"
        );
        assert!(got == content, "staged content differs");
    }

    #[test]
    fn a_range_that_reads_back_other_bytes_fails_the_copy() {
        let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
        let (_src, dst, rfd, _size, _content) = setup(dir.path());
        dst.write_all_at(&[7u8; 8192], 0).expect("write");
        let mut rb = ReadBack::new();
        let mut other = vec![7u8; 8192];
        rb.check(rfd.as_fd(), true, 0, &other, "dst")
            .map_err(|e| format!("{e:?}"))
            .expect("the same bytes verify");
        other[5000] = 8;
        for direct in [true, false] {
            match rb.check(rfd.as_fd(), direct, 0, &other, "dst") {
                Err(JobError::Failed(m)) => assert!(m.contains("does not match"), "{m}"),
                other => panic!("a differing byte was not seen: {:?}", other.err()),
            }
        }
        // Queued (written through the page cache) ranges too.
        rb.push(rfd.clone(), true, "dst".into(), 0, &other, dst.as_fd())
            .map_err(|e| format!("{e:?}"))
            .expect("queued");
        assert!(rb.drain().is_err(), "a differing queued range was not seen");
    }
}
