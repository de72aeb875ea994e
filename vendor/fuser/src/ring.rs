//! FUSE over io_uring (Linux 6.14+, `CONFIG_FUSE_IO_URING`, the fuse module's
//! `enable_uring` parameter): the kernel hands requests to the daemon through
//! `IORING_OP_URING_CMD` entries instead of `read(2)` on /dev/fuse, one queue per
//! possible CPU, and takes the reply back in the same buffers with the command that
//! also waits for the next request (`FUSE_IO_URING_CMD_COMMIT_AND_FETCH`).
//!
//! Added by labfs to its vendored fuser (see PATCHES.md). FUSE_INIT still arrives on
//! /dev/fuse; only if the INIT reply carried `FUSE_OVER_IO_URING` does
//! [`crate::Session::run`] start the queues (one thread per possible CPU, pinned to
//! it), beside the /dev/fuse threads, which keep serving what never comes over the
//! rings: FORGET, BATCH_FORGET, INTERRUPT, requests sent before every queue had an
//! entry, notification replies; the backing-id ioctls of kernel passthrough and the
//! notifications themselves still go to /dev/fuse.
//!
//! Only the queue's own thread submits to its ring (`IORING_SETUP_SINGLE_ISSUER`): the
//! kernel completes the next request of an entry through task work on the task that
//! submitted the entry's command, so a reply from another thread (a filesystem that
//! answers later, from a pool) writes its bytes into the entry's buffers, queues the
//! entry on [`Queue::ready`] and wakes the ring thread through an eventfd the ring
//! keeps a read armed on. The ring thread alone commits, so a replying thread blocked
//! afterwards in the filesystem never holds another request of its queue hostage.

use std::io;
use std::io::IoSlice;
use std::os::fd::AsFd;
use std::os::fd::AsRawFd;
use std::os::fd::FromRawFd;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::thread::ThreadId;

use io_uring::IoUring;
use io_uring::cqueue;
use io_uring::opcode;
use io_uring::squeue;
use io_uring::types;
use log::debug;
use log::error;
use log::warn;
use parking_lot::Mutex;

use crate::Filesystem;
use crate::channel::Channel;
use crate::channel::ChannelSender;
use crate::ll::Operation;
use crate::ll::fuse_abi as abi;
use crate::request::RequestWithSender;
use crate::session::SessionEventLoop;

const FUSE_IO_URING_CMD_REGISTER: u32 = 1;
const FUSE_IO_URING_CMD_COMMIT_AND_FETCH: u32 = 2;
/// `struct fuse_uring_req_header`: `in_out[128]` (the in header of a request, the out
/// header of its reply), `op_in[128]` (the operation's own header, the kernel's
/// `in_args[0]`), `struct fuse_uring_ent_in_out` (flags, commit_id, payload_sz, ...).
const OP_IN: usize = 128;
const OP_IN_SZ: usize = 128;
const ENT_IN_OUT: usize = 256;
const ENT_COMMIT_ID: usize = ENT_IN_OUT + 8;
const ENT_PAYLOAD_SZ: usize = ENT_IN_OUT + 16;
/// The header buffer: one page (the struct is 288 bytes).
const HEADER_BUF: usize = 4096;
const IN_HEADER_SZ: usize = size_of::<abi::fuse_in_header>();
const OUT_HEADER_SZ: usize = size_of::<abi::fuse_out_header>();
/// The smallest payload buffer the kernel takes (FUSE_MIN_READ_BUFFER).
const MIN_PAYLOAD: usize = 8192;
/// `user_data` of the eventfd read (entries are 0..depth).
const WAKE: u64 = u64::MAX;

/// Requests answered over each transport, for the filesystem's status output.
#[derive(Debug, Default)]
pub struct TransportStats {
    /// Requests read from /dev/fuse (every one, replied to or not: FORGET included).
    pub devfuse_requests: AtomicU64,
    /// Requests that arrived over the io_uring queues.
    pub ring_requests: AtomicU64,
    /// Queues running, their entries handed to the kernel (REGISTER submitted).
    pub ring_queues: AtomicU64,
}

/// A page-aligned buffer shared with the kernel, which copies requests into it and
/// replies out of it while it owns the entry (between a command's submission and its
/// completion); the daemon writes it only in between.
struct Shared {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a plain anonymous mapping; who may touch it when is the entry protocol above
// (one request per entry at a time; the ready queue's lock orders the hand-over).
unsafe impl Send for Shared {}
// SAFETY: as above.
unsafe impl Sync for Shared {}

impl Shared {
    /// An anonymous private mapping: page-aligned, and zero pages the kernel supplies
    /// only when first touched, so a queue's address space (depth x the payload size)
    /// becomes resident only as far as requests use it. (A 4 KiB-aligned
    /// `alloc_zeroed` is malloc + memset, which made every byte of every queue
    /// resident at mount: 265 MiB for 2 CPUs x 128 entries x 1 MiB.)
    fn new(len: usize) -> io::Result<Shared> {
        if len == 0 {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        // SAFETY: a new anonymous mapping at an address of the kernel's choosing; no
        // existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Shared {
            ptr: ptr.cast(),
            len,
        })
    }

    fn len(&self) -> usize {
        self.len
    }

    /// SAFETY (callers): only while the daemon owns the entry, and from one thread at a
    /// time (the ring thread reading a request, or the one replying to it).
    #[allow(clippy::mut_from_ref)]
    unsafe fn bytes(&self) -> &mut [u8] {
        // SAFETY: ptr is a live mapping of len bytes owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // SAFETY: mapped in new() with this length and unmapped only here.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

struct Entry {
    header: Shared,
    payload: Shared,
}

/// What a queue's ring thread and the threads replying to its requests share.
pub(crate) struct Queue {
    entries: Box<[Entry]>,
    /// Entries whose reply is written, for the ring thread to commit.
    ready: Mutex<Vec<usize>>,
    wake: OwnedFd,
    thread: ThreadId,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("entries", &self.entries.len())
            .finish()
    }
}

/// The reply side of one request that came over a ring: writes the reply into the
/// entry's buffers and hands the entry to its ring thread. Answers EIO if dropped
/// without a reply, as fuser's replies do, so an entry is never lost.
#[derive(Debug)]
pub(crate) struct RingSender {
    queue: Arc<Queue>,
    idx: usize,
    unique: u64,
    sent: AtomicBool,
    /// /dev/fuse, for the backing-id ioctls of kernel passthrough.
    pub(crate) ch: ChannelSender,
}

impl RingSender {
    pub(crate) fn send(&self, data: &[IoSlice<'_>]) -> io::Result<()> {
        if self.sent.swap(true, Ordering::AcqRel) {
            return Err(io::Error::other("a second reply to one request"));
        }
        let e = &self.queue.entries[self.idx];
        // SAFETY: the kernel gave this entry to the daemon and `sent` makes this the
        // only writer; the ring thread reads it again only after `ready` hands it over.
        let (hdr, pay) = unsafe { (e.header.bytes(), e.payload.bytes()) };
        let total: usize = data.iter().map(|s| s.len()).sum();
        let mut result = Ok(());
        let n = if total < OUT_HEADER_SZ {
            result = Err(io::Error::other("a reply shorter than its header"));
            write_error(hdr, self.unique, libc::EIO);
            0
        } else if total - OUT_HEADER_SZ > pay.len() {
            result = Err(io::Error::other(format!(
                "a reply of {} bytes does not fit the ring's {}-byte payload",
                total - OUT_HEADER_SZ,
                pay.len()
            )));
            write_error(hdr, self.unique, libc::EIO);
            0
        } else {
            let mut at = 0;
            for s in data {
                let mut s: &[u8] = s;
                if at < OUT_HEADER_SZ {
                    let h = s.len().min(OUT_HEADER_SZ - at);
                    hdr[at..at + h].copy_from_slice(&s[..h]);
                    at += h;
                    s = &s[h..];
                }
                if s.is_empty() {
                    continue;
                }
                let p = at - OUT_HEADER_SZ;
                pay[p..p + s.len()].copy_from_slice(s);
                at += s.len();
            }
            total - OUT_HEADER_SZ
        };
        hdr[ENT_PAYLOAD_SZ..ENT_PAYLOAD_SZ + 4].copy_from_slice(&(n as u32).to_le_bytes());
        self.queue.ready.lock().push(self.idx);
        if std::thread::current().id() != self.queue.thread {
            self.queue.wake_up();
        }
        result
    }
}

impl Queue {
    /// Wakes the ring thread (its eventfd read completes).
    fn wake_up(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: an eventfd write of 8 bytes from a live buffer.
        let rc = unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), 8) };
        if rc != 8 {
            error!(
                "io_uring queue wake-up failed: {}",
                io::Error::last_os_error()
            );
        }
    }
}

impl Drop for RingSender {
    fn drop(&mut self) {
        if !self.sent.load(Ordering::Acquire) {
            warn!("no reply for ring request {}: answering EIO", self.unique);
            let header = abi::fuse_out_header {
                len: OUT_HEADER_SZ as u32,
                error: -libc::EIO,
                unique: self.unique,
            };
            let bytes = zerocopy::IntoBytes::as_bytes(&header);
            let _ = self.send(&[IoSlice::new(bytes)]);
        }
    }
}

fn write_error(hdr: &mut [u8], unique: u64, errno: i32) {
    let header = abi::fuse_out_header {
        len: OUT_HEADER_SZ as u32,
        error: -errno,
        unique,
    };
    hdr[..OUT_HEADER_SZ].copy_from_slice(zerocopy::IntoBytes::as_bytes(&header));
}

/// The CPUs the kernel makes queues for: every possible one, numbered from 0.
pub(crate) fn possible_cpus() -> usize {
    std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| s.trim().rsplit(['-', ',']).next()?.parse::<usize>().ok())
        .map_or(1, |last| last + 1)
}

/// The payload buffer size the kernel requires of every entry:
/// max(FUSE_MIN_READ_BUFFER, max_write, max_pages * page size).
pub(crate) fn payload_size(max_write: u32, max_pages: u16) -> usize {
    let page = page_size::get();
    let want = MIN_PAYLOAD
        .max(max_write as usize)
        .max(usize::from(max_pages) * page);
    want.div_ceil(page) * page
}

fn cmd_req(qid: u16, commit_id: u64) -> [u8; 80] {
    let mut c = [0u8; 80];
    c[8..16].copy_from_slice(&commit_id.to_le_bytes());
    c[16..18].copy_from_slice(&qid.to_le_bytes());
    c
}

fn register_sqe(dev: i32, iov: &[libc::iovec; 2], idx: usize, qid: u16) -> squeue::Entry128 {
    let sqe = opcode::UringCmd80::new(types::Fd(dev), FUSE_IO_URING_CMD_REGISTER)
        .cmd(cmd_req(qid, 0))
        .addr(Some(iov.as_ptr() as u64))
        .build()
        .user_data(idx as u64);
    // io-uring 0.7 has no setter for sqe->len, which REGISTER needs (2 iovecs); the
    // SQE is plain bytes with len at offset 24 (struct io_uring_sqe).
    // SAFETY: Entry128 is repr(C) over the 128-byte SQE; both types are plain data.
    let mut raw: [u8; 128] = unsafe { std::mem::transmute(sqe) };
    raw[24..28].copy_from_slice(&2u32.to_le_bytes());
    // SAFETY: as above; every byte pattern is a valid SQE value.
    unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(raw) }
}

fn commit_sqe(dev: i32, commit_id: u64, idx: usize, qid: u16) -> squeue::Entry128 {
    opcode::UringCmd80::new(types::Fd(dev), FUSE_IO_URING_CMD_COMMIT_AND_FETCH)
        .cmd(cmd_req(qid, commit_id))
        .build()
        .user_data(idx as u64)
}

fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET stays within it for cpu <
    // CPU_SETSIZE, which the check ensures.
    unsafe {
        if cpu >= libc::CPU_SETSIZE as usize {
            return;
        }
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            debug!(
                "pinning io_uring queue {cpu} to its CPU: {}",
                io::Error::last_os_error()
            );
        }
    }
}

type Ring = IoUring<squeue::Entry128, cqueue::Entry>;

/// A ring that only its thread submits to, completing task work when it waits
/// (DEFER_TASKRUN); a plain ring where the kernel refuses those flags.
fn new_ring(entries: u32) -> io::Result<(Ring, &'static str)> {
    if std::env::var_os("FUSER_RING_PLAIN").is_some() {
        return Ok((
            IoUring::builder().setup_cqsize(2 * entries).build(entries)?,
            "plain",
        ));
    }
    match IoUring::builder()
        .setup_cqsize(2 * entries)
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(entries)
    {
        Ok(r) => Ok((r, "single issuer, deferred task work")),
        Err(e) => {
            debug!("io_uring with SINGLE_ISSUER|DEFER_TASKRUN: {e}; a plain ring instead");
            Ok((
                IoUring::builder().setup_cqsize(2 * entries).build(entries)?,
                "plain",
            ))
        }
    }
}

/// One queue: registers `depth` entries, then serves requests until the connection
/// ends. `Ok` when the kernel ends the queue (unmount, abort).
pub(crate) fn run_queue<FS: Filesystem>(
    se: &SessionEventLoop<FS>,
    dev: &Channel,
    qid: u16,
    depth: usize,
    payload: usize,
    stats: &TransportStats,
) -> io::Result<()> {
    pin_to(usize::from(qid));
    let sq = (depth + 1).next_power_of_two() as u32;
    let (mut ring, kind) = new_ring(sq)?;
    // /dev/fuse by descriptor, not as a registered (fixed) file: a fixed file is
    // released only when the ring's context is torn down, asynchronously after the
    // process is gone, and until then the connection is not aborted (programs would
    // see ECONNABORTED/ECANCELED instead of ENOTCONN after the daemon died).
    let devfd = dev.as_fd().as_raw_fd();
    // SAFETY: eventfd(2) returns a new descriptor or -1.
    let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if efd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: efd is a new descriptor owned by nobody else.
    let wake = unsafe { OwnedFd::from_raw_fd(efd) };
    let mut entries = Vec::with_capacity(depth);
    for _ in 0..depth {
        entries.push(Entry {
            header: Shared::new(HEADER_BUF)?,
            payload: Shared::new(payload)?,
        });
    }
    let queue = Arc::new(Queue {
        entries: entries.into_boxed_slice(),
        ready: Mutex::new(Vec::with_capacity(depth)),
        wake,
        thread: std::thread::current().id(),
    });
    let iovs: Vec<[libc::iovec; 2]> = queue
        .entries
        .iter()
        .map(|e| {
            [
                libc::iovec {
                    iov_base: e.header.ptr.cast(),
                    iov_len: e.header.len(),
                },
                libc::iovec {
                    iov_base: e.payload.ptr.cast(),
                    iov_len: e.payload.len(),
                },
            ]
        })
        .collect();
    let mut wake_buf = [0u8; 8];
    let wake_ptr = wake_buf.as_mut_ptr();
    let wake_fd = queue.wake.as_raw_fd();
    let wake_sqe = || {
        squeue::Entry128::from(
            opcode::Read::new(types::Fd(wake_fd), wake_ptr, 8)
                .build()
                .user_data(WAKE),
        )
    };
    {
        let mut sub = ring.submission();
        for (i, iov) in iovs.iter().enumerate() {
            // SAFETY: the iovecs and buffers outlive the ring (dropped after it, below).
            unsafe { sub.push(&register_sqe(devfd, iov, i, qid)) }
                .map_err(|_| io::Error::other("io_uring SQ full at register"))?;
        }
        // SAFETY: wake_buf outlives the ring.
        unsafe { sub.push(&wake_sqe()) }.map_err(|_| io::Error::other("io_uring SQ full"))?;
    }
    ring.submit()?;
    debug!("io_uring queue {qid}: {depth} entries of {payload} bytes, ring {kind}");
    stats.ring_queues.fetch_add(1, Ordering::Relaxed);
    let mut registered = vec![false; depth];
    // Reassembly of a request into fuser's /dev/fuse layout (8-byte aligned).
    let mut buf: Vec<u64> = vec![0; (IN_HEADER_SZ + OP_IN_SZ + payload).div_ceil(8)];
    let mut done: Vec<(u64, i32)> = Vec::with_capacity(depth + 1);
    let mut ready: Vec<usize> = Vec::with_capacity(depth);
    let mut resubmit: Vec<usize> = Vec::new();
    let result = loop {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => break Err(e),
        }
        done.clear();
        done.extend(ring.completion().map(|c| (c.user_data(), c.result())));
        let mut rearm = false;
        resubmit.clear();
        let mut ended = None;
        for &(tag, res) in &done {
            if tag == WAKE {
                rearm = true;
                continue;
            }
            let idx = tag as usize;
            if idx >= depth {
                continue;
            }
            if res == -libc::EAGAIN || res == -libc::EINTR {
                // Not taken (e.g. REGISTER racing the end of FUSE_INIT): again.
                resubmit.push(idx);
                continue;
            }
            if res == -libc::ENOTCONN || res == -libc::ENODEV || res == -libc::ECANCELED {
                ended = Some(Ok(()));
                continue;
            }
            if res < 0 {
                let what = if registered[idx] {
                    "COMMIT_AND_FETCH"
                } else {
                    "REGISTER"
                };
                ended = Some(Err(io::Error::other(format!(
                    "io_uring queue {qid}: {what}: {}",
                    io::Error::from_raw_os_error(-res)
                ))));
                continue;
            }
            registered[idx] = true;
            stats.ring_requests.fetch_add(1, Ordering::Relaxed);
            serve_entry(se, &queue, idx, &mut buf);
        }
        if let Some(r) = ended {
            break r;
        }
        ready.clear();
        ready.append(&mut queue.ready.lock());
        // The SQ holds depth + 1 entries and is empty here: every entry's command (a
        // commit, or a REGISTER again) plus the eventfd read fit.
        let mut sub = ring.submission();
        for (n, &idx) in ready.iter().enumerate() {
            let e = &queue.entries[idx];
            // SAFETY: the reply is written (handed over through `ready`); the kernel
            // does not own the entry until the SQE below.
            let hdr = unsafe { e.header.bytes() };
            let commit_id = u64::from_le_bytes(
                hdr[ENT_COMMIT_ID..ENT_COMMIT_ID + 8]
                    .try_into()
                    .unwrap_or_default(),
            );
            // SAFETY: the buffers outlive the ring.
            if unsafe { sub.push(&commit_sqe(devfd, commit_id, idx, qid)) }.is_err() {
                // Not expected (see above); never drop a reply: commit it next round.
                queue.ready.lock().extend_from_slice(&ready[n..]);
                queue.wake_up();
                break;
            }
        }
        for &idx in &resubmit {
            let sqe = if registered[idx] {
                continue; // a refused commit is not retried: the kernel dropped it
            } else {
                register_sqe(devfd, &iovs[idx], idx, qid)
            };
            // SAFETY: as above.
            let _ = unsafe { sub.push(&sqe) };
        }
        if rearm {
            // SAFETY: wake_buf outlives the ring.
            let _ = unsafe { sub.push(&wake_sqe()) };
        }
    };
    // The ring first: its descriptor's end cancels whatever the kernel still holds,
    // before the buffers (kept alive by `queue` as long as a reply may still be
    // written) can go.
    drop(ring);
    stats.ring_queues.fetch_sub(1, Ordering::Relaxed);
    result
}

/// Reassembles the entry's request into the layout fuser's parser takes (in header,
/// operation header, payload) and dispatches it; the reply comes back through a
/// [`RingSender`], now or later from another thread.
fn serve_entry<FS: Filesystem>(
    se: &SessionEventLoop<FS>,
    queue: &Arc<Queue>,
    idx: usize,
    buf: &mut [u64],
) {
    let e = &queue.entries[idx];
    // SAFETY: the kernel completed the entry's command: the daemon owns the entry.
    let (hdr, pay) = unsafe { (e.header.bytes(), e.payload.bytes()) };
    // SAFETY: u8 has no alignment requirement and every byte is initialised.
    let out: &mut [u8] =
        unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast(), buf.len() * 8) };
    let len = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) as usize;
    let unique = u64::from_le_bytes(hdr[8..16].try_into().unwrap_or_default());
    let payload_sz =
        u32::from_le_bytes(hdr[ENT_PAYLOAD_SZ..ENT_PAYLOAD_SZ + 4].try_into().unwrap_or_default())
            as usize;
    let sender = RingSender {
        queue: queue.clone(),
        idx,
        unique,
        sent: AtomicBool::new(false),
        ch: se.ch.sender(),
    };
    // The kernel put its in_args[0] (the operation's header) in op_in and the rest in
    // the payload; the in header's len counts all of them.
    let op_in = len.saturating_sub(IN_HEADER_SZ + payload_sz);
    if len < IN_HEADER_SZ || op_in > OP_IN_SZ || payload_sz > pay.len() || len > out.len() {
        error!("io_uring queue: malformed request (len {len}, payload {payload_sz})");
        drop(sender); // answers EIO
        return;
    }
    out[..IN_HEADER_SZ].copy_from_slice(&hdr[..IN_HEADER_SZ]);
    out[IN_HEADER_SZ..IN_HEADER_SZ + op_in].copy_from_slice(&hdr[OP_IN..OP_IN + op_in]);
    out[IN_HEADER_SZ + op_in..len].copy_from_slice(&pay[..payload_sz]);
    match RequestWithSender::new_ring(sender, &out[..len]) {
        Some(req) => {
            if let Ok(Operation::Destroy(_)) = req.request.operation() {
                req.reply::<crate::ReplyEmpty>().ok();
            } else {
                req.dispatch(se);
            }
        }
        // RequestWithSender::new_ring logged it; the sender it dropped answered EIO.
        None => {}
    }
}
