//! A transport prototype for issue 12: a minimal passthrough FUSE server that speaks the
//! FUSE protocol itself (no fuser) over either transport, with the same request handling:
//!
//! - `--transport devfuse`: the classic loop, `read(2)` a request from /dev/fuse, handle
//!   it, `write(2)` the reply (what fuser and labfs do today);
//! - `--transport uring`: FUSE over io_uring (Linux ≥ 6.14, `CONFIG_FUSE_IO_URING`,
//!   `/sys/module/fuse/parameters/enable_uring` = Y). FUSE_INIT still arrives on
//!   /dev/fuse; its reply sets `FUSE_OVER_IO_URING`; then one ring per possible CPU (the
//!   kernel routes a request to the queue of the CPU its caller runs on, and serves no
//!   request over the rings until every queue has an entry), each with `--depth` entries
//!   that own a header buffer and a payload buffer. Each entry is registered with an
//!   `IORING_OP_URING_CMD` SQE (`FUSE_IO_URING_CMD_REGISTER`, iovec [header, payload]); its
//!   completion carries a request, and the reply goes back in the same buffers with
//!   `FUSE_IO_URING_CMD_COMMIT_AND_FETCH`, which also waits for the next request: one
//!   `io_uring_enter` per request instead of a read and a write. FORGET and INTERRUPT
//!   still come over /dev/fuse, so its loop keeps running beside the rings.
//!
//! It serves the operations of the metadata benchmarks (create/stat/list/unlink, `tar x`)
//! as a passthrough onto a backing directory, with a path per inode (no identity-keyed
//! inodes, no credential switching: it is run as root by the bench). It is a bench target,
//! not part of the product; see docs/benchmarks.md, "FUSE over io_uring: prototype".
//!
//!   fuse_transport --transport devfuse|uring [--threads N] [--pin] [--depth D] [--ttl SECS] BACKING MOUNTPOINT
//!
//! It mounts (as root, with mount(2)), serves until the mount is unmounted, then prints
//! the request counts by opcode to stderr. `cargo bench --bench fuse_transport` (no
//! arguments) prints this usage only.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

// ---- protocol constants (include/uapi/linux/fuse.h, 7.45) ----

const FUSE_KERNEL_MINOR: u32 = 45;
const ROOT_ID: u64 = 1;

mod op {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const SETXATTR: u32 = 21;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const ACCESS: u32 = 34;
    pub const CREATE: u32 = 35;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
    pub const READDIRPLUS: u32 = 44;
    pub const RENAME2: u32 = 45;
    pub const MAX: usize = 64;
}

const FUSE_ASYNC_READ: u64 = 1 << 0;
const FUSE_BIG_WRITES: u64 = 1 << 5;
const FUSE_DO_READDIRPLUS: u64 = 1 << 13;
const FUSE_PARALLEL_DIROPS: u64 = 1 << 18;
const FUSE_INIT_EXT: u64 = 1 << 30;
const FUSE_OVER_IO_URING: u64 = 1 << 41;

const FATTR_MODE: u32 = 1 << 0;
const FATTR_UID: u32 = 1 << 1;
const FATTR_GID: u32 = 1 << 2;
const FATTR_SIZE: u32 = 1 << 3;
const FATTR_ATIME: u32 = 1 << 4;
const FATTR_MTIME: u32 = 1 << 5;
const FATTR_FH: u32 = 1 << 6;
const FATTR_ATIME_NOW: u32 = 1 << 7;
const FATTR_MTIME_NOW: u32 = 1 << 8;
const FUSE_GETATTR_FH: u32 = 1 << 0;

const IN_HEADER: usize = 40;
const OUT_HEADER: usize = 16;
const MAX_WRITE: usize = 128 * 1024;
/// /dev/fuse read buffer: the largest WRITE plus its headers (the kernel wants ≥ 8 KiB).
const DEVFUSE_BUF: usize = MAX_WRITE + 4096;

const FUSE_IO_URING_CMD_REGISTER: u32 = 1;
const FUSE_IO_URING_CMD_COMMIT_AND_FETCH: u32 = 2;
/// struct fuse_uring_req_header: in_out[128], op_in[128], ring_ent_in_out (32 bytes).
const RING_OP_IN: usize = 128;
const RING_ENT_IN_OUT: usize = 256;
const RING_HEADER: usize = 4096; // page-aligned, ≥ sizeof(fuse_uring_req_header)

/// The size of the per-operation header, i.e. the kernel's `in_args[0]`: the io_uring
/// transport puts it in `op_in` and the rest in the payload; /dev/fuse sends both in one
/// buffer, split here at the same place, so the handlers see one shape.
fn op_header_size(opcode: u32) -> usize {
    match opcode {
        op::FORGET | op::MKDIR | op::RENAME | op::LINK | op::OPEN | op::OPENDIR => 8,
        op::GETXATTR | op::LISTXATTR | op::SETXATTR | op::ACCESS | op::INTERRUPT => 8,
        op::BATCH_FORGET => 8,
        op::GETATTR | op::MKNOD | op::FSYNC | op::FSYNCDIR | op::CREATE | op::RENAME2 => 16,
        op::RELEASE | op::RELEASEDIR | op::FLUSH => 24,
        op::READ | op::WRITE | op::READDIR | op::READDIRPLUS => 40,
        op::INIT => 64,
        op::SETATTR => 88,
        _ => 0, // LOOKUP, UNLINK, RMDIR, SYMLINK, READLINK, STATFS, DESTROY, REMOVEXATTR...
    }
}

// ---- little-endian field access ----

fn u32_at(b: &[u8], o: usize) -> u32 {
    b.get(o..o + 4)
        .map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    b.get(o..o + 8).map_or(0, |s| {
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        u64::from_le_bytes(a)
    })
}

struct Out<'a>(&'a mut Vec<u8>);
impl Out<'_> {
    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn zeros(&mut self, n: usize) -> &mut Self {
        self.0.resize(self.0.len() + n, 0);
        self
    }
}

#[derive(Clone, Copy)]
struct InHeader {
    opcode: u32,
    unique: u64,
    nodeid: u64,
    uid: u32,
    gid: u32,
}

impl InHeader {
    fn parse(b: &[u8]) -> Option<InHeader> {
        if b.len() < IN_HEADER {
            return None;
        }
        Some(InHeader {
            opcode: u32_at(b, 4),
            unique: u64_at(b, 8),
            nodeid: u64_at(b, 16),
            uid: u32_at(b, 24),
            gid: u32_at(b, 28),
        })
    }
}

/// The first NUL-terminated name of `b`, and what follows it.
fn name_of(b: &[u8]) -> Result<(&OsStr, &[u8]), i32> {
    let end = b.iter().position(|&c| c == 0).ok_or(libc::EINVAL)?;
    let name = &b[..end];
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
        return Err(libc::EINVAL);
    }
    Ok((OsStr::from_bytes(name), &b[end + 1..]))
}

fn errno(e: io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

// ---- the filesystem: a path per inode over a backing directory ----

struct Node {
    path: PathBuf,
    nlookup: u64,
}

#[derive(Default)]
struct Nodes {
    by_id: HashMap<u64, Node>,
    by_path: HashMap<PathBuf, u64>,
    next: u64,
}

struct DirEntry {
    name: OsString,
    ino: u64,
    kind: u32,
}

struct Fs {
    nodes: Mutex<Nodes>,
    files: Mutex<HashMap<u64, Arc<File>>>,
    dirs: Mutex<HashMap<u64, Vec<DirEntry>>>,
    next_fh: AtomicU64,
    ttl: Duration,
    uring: bool,
    counts: Vec<AtomicU64>,
    /// Requests answered over /dev/fuse and over the rings (proof of which transport ran).
    served_devfuse: AtomicU64,
    served_ring: AtomicU64,
}

enum Reply {
    /// A reply body (possibly empty) follows the out header.
    Body,
    /// FORGET, BATCH_FORGET, INTERRUPT: no reply at all.
    None,
}

impl Fs {
    fn new(root: PathBuf, ttl: Duration, uring: bool) -> Fs {
        let mut nodes = Nodes {
            next: ROOT_ID + 1,
            ..Nodes::default()
        };
        nodes.by_path.insert(root.clone(), ROOT_ID);
        nodes.by_id.insert(
            ROOT_ID,
            Node {
                path: root,
                nlookup: 1,
            },
        );
        Fs {
            nodes: Mutex::new(nodes),
            files: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            ttl,
            uring,
            counts: (0..op::MAX).map(|_| AtomicU64::new(0)).collect(),
            served_devfuse: AtomicU64::new(0),
            served_ring: AtomicU64::new(0),
        }
    }

    fn path(&self, id: u64) -> Result<PathBuf, i32> {
        self.nodes
            .lock()
            .by_id
            .get(&id)
            .map(|n| n.path.clone())
            .ok_or(libc::ESTALE)
    }

    fn child(&self, parent: u64, name: &OsStr) -> Result<PathBuf, i32> {
        Ok(self.path(parent)?.join(name))
    }

    /// The node of `path`, made if new; one more lookup count for the kernel.
    fn remember(&self, path: PathBuf) -> u64 {
        let mut n = self.nodes.lock();
        if let Some(&id) = n.by_path.get(&path) {
            if let Some(node) = n.by_id.get_mut(&id) {
                node.nlookup += 1;
                return id;
            }
        }
        let id = n.next;
        n.next += 1;
        n.by_path.insert(path.clone(), id);
        n.by_id.insert(id, Node { path, nlookup: 1 });
        id
    }

    fn forget(&self, id: u64, count: u64) {
        if id == ROOT_ID {
            return;
        }
        let mut n = self.nodes.lock();
        let gone = match n.by_id.get_mut(&id) {
            Some(node) => {
                node.nlookup = node.nlookup.saturating_sub(count);
                node.nlookup == 0
            }
            None => false,
        };
        if gone {
            if let Some(node) = n.by_id.remove(&id) {
                if n.by_path.get(&node.path) == Some(&id) {
                    n.by_path.remove(&node.path);
                }
            }
        }
    }

    fn unname(&self, path: &Path) {
        self.nodes.lock().by_path.remove(path);
    }

    fn file(&self, fh: u64) -> Result<Arc<File>, i32> {
        self.files.lock().get(&fh).cloned().ok_or(libc::EBADF)
    }

    fn add_file(&self, f: File) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.files.lock().insert(fh, Arc::new(f));
        fh
    }

    fn ttl_parts(&self) -> (u64, u32) {
        (self.ttl.as_secs(), self.ttl.subsec_nanos())
    }

    fn attr(&self, o: &mut Out, m: &fs::Metadata) {
        o.u64(m.ino())
            .u64(m.size())
            .u64(m.blocks())
            .u64(m.atime() as u64)
            .u64(m.mtime() as u64)
            .u64(m.ctime() as u64)
            .u32(m.atime_nsec() as u32)
            .u32(m.mtime_nsec() as u32)
            .u32(m.ctime_nsec() as u32)
            .u32(m.mode())
            .u32(m.nlink() as u32)
            .u32(m.uid())
            .u32(m.gid())
            .u32(m.rdev() as u32)
            .u32(m.blksize() as u32)
            .u32(0);
    }

    fn entry(&self, o: &mut Out, id: u64, m: &fs::Metadata) {
        let (s, ns) = self.ttl_parts();
        o.u64(id).u64(0).u64(s).u64(s).u32(ns).u32(ns);
        self.attr(o, m);
    }

    fn attr_out(&self, o: &mut Out, m: &fs::Metadata) {
        let (s, ns) = self.ttl_parts();
        o.u64(s).u32(ns).u32(0);
        self.attr(o, m);
    }

    /// lstat the new or found `path` and reply with its entry (one lookup count).
    fn reply_entry(&self, out: &mut Vec<u8>, path: PathBuf) -> Result<(), i32> {
        let m = fs::symlink_metadata(&path).map_err(errno)?;
        let id = self.remember(path);
        self.entry(&mut Out(out), id, &m);
        Ok(())
    }

    /// Give what a caller made to the caller (the daemon runs as root).
    fn own(&self, h: &InHeader, path: &Path) -> Result<(), i32> {
        if h.uid != 0 || h.gid != 0 {
            std::os::unix::fs::lchown(path, Some(h.uid), Some(h.gid)).map_err(errno)?;
        }
        Ok(())
    }

    fn handle(
        &self,
        h: &InHeader,
        arg: &[u8],
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Reply, i32> {
        if let Some(c) = self.counts.get(h.opcode as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        match h.opcode {
            op::LOOKUP => {
                let (name, _) = name_of(payload)?;
                self.reply_entry(out, self.child(h.nodeid, name)?)?;
            }
            op::FORGET => {
                self.forget(h.nodeid, u64_at(arg, 0));
                return Ok(Reply::None);
            }
            op::BATCH_FORGET => {
                let count = u32_at(arg, 0) as usize;
                for i in 0..count {
                    self.forget(u64_at(payload, i * 16), u64_at(payload, i * 16 + 8));
                }
                return Ok(Reply::None);
            }
            op::INTERRUPT => return Ok(Reply::None),
            op::GETATTR => {
                let m = if u32_at(arg, 0) & FUSE_GETATTR_FH != 0 {
                    self.file(u64_at(arg, 8))?.metadata().map_err(errno)?
                } else {
                    fs::symlink_metadata(self.path(h.nodeid)?).map_err(errno)?
                };
                self.attr_out(&mut Out(out), &m);
            }
            op::SETATTR => self.setattr(h, arg, out)?,
            op::READLINK => {
                let t = fs::read_link(self.path(h.nodeid)?).map_err(errno)?;
                out.extend_from_slice(t.as_os_str().as_bytes());
            }
            op::SYMLINK => {
                let (name, rest) = name_of(payload)?;
                let end = rest.iter().position(|&c| c == 0).ok_or(libc::EINVAL)?;
                let target = OsStr::from_bytes(&rest[..end]);
                let p = self.child(h.nodeid, name)?;
                std::os::unix::fs::symlink(target, &p).map_err(errno)?;
                self.own(h, &p)?;
                self.reply_entry(out, p)?;
            }
            op::MKDIR => {
                let (name, _) = name_of(payload)?;
                let p = self.child(h.nodeid, name)?;
                fs::DirBuilder::new()
                    .mode(u32_at(arg, 0) & 0o7777)
                    .create(&p)
                    .map_err(errno)?;
                self.own(h, &p)?;
                self.reply_entry(out, p)?;
            }
            op::UNLINK | op::RMDIR => {
                let (name, _) = name_of(payload)?;
                let p = self.child(h.nodeid, name)?;
                if h.opcode == op::UNLINK {
                    fs::remove_file(&p).map_err(errno)?;
                } else {
                    fs::remove_dir(&p).map_err(errno)?;
                }
                self.unname(&p);
            }
            op::RENAME | op::RENAME2 => {
                let (newdir, flags, names) = if h.opcode == op::RENAME {
                    (u64_at(arg, 0), 0, payload)
                } else {
                    (u64_at(arg, 0), u32_at(arg, 8), payload)
                };
                if flags != 0 {
                    return Err(libc::EINVAL);
                }
                let (old, rest) = name_of(names)?;
                let (new, _) = name_of(rest)?;
                let from = self.child(h.nodeid, old)?;
                let to = self.child(newdir, new)?;
                fs::rename(&from, &to).map_err(errno)?;
                let mut n = self.nodes.lock();
                n.by_path.remove(&to);
                if let Some(id) = n.by_path.remove(&from) {
                    if let Some(node) = n.by_id.get_mut(&id) {
                        node.path = to.clone();
                    }
                    n.by_path.insert(to, id);
                }
            }
            op::LINK => {
                let (name, _) = name_of(payload)?;
                let from = self.path(u64_at(arg, 0))?;
                let to = self.child(h.nodeid, name)?;
                fs::hard_link(&from, &to).map_err(errno)?;
                self.reply_entry(out, to)?;
            }
            op::OPEN => {
                let f = open(&self.path(h.nodeid)?, u32_at(arg, 0) as i32, 0)?;
                let fh = self.add_file(f);
                Out(out).u64(fh).u32(0).u32(0);
            }
            op::CREATE => {
                let (name, _) = name_of(payload)?;
                let p = self.child(h.nodeid, name)?;
                let flags = u32_at(arg, 0) as i32 | libc::O_CREAT;
                let f = open(&p, flags, u32_at(arg, 4) & 0o7777)?;
                self.own(h, &p)?;
                let m = f.metadata().map_err(errno)?;
                let id = self.remember(p);
                let fh = self.add_file(f);
                let mut o = Out(out);
                self.entry(&mut o, id, &m);
                o.u64(fh).u32(0).u32(0);
            }
            op::READ => {
                let f = self.file(u64_at(arg, 0))?;
                let size = (u32_at(arg, 16) as usize).min(MAX_WRITE);
                out.resize(size, 0);
                let n = f.read_at(out, u64_at(arg, 8)).map_err(errno)?;
                out.truncate(n);
            }
            op::WRITE => {
                let f = self.file(u64_at(arg, 0))?;
                let size = (u32_at(arg, 16) as usize).min(payload.len());
                f.write_all_at(&payload[..size], u64_at(arg, 8))
                    .map_err(errno)?;
                Out(out).u32(size as u32).u32(0);
            }
            op::STATFS => {
                let root = self.path(ROOT_ID)?;
                let s = rustix::fs::statvfs(&root).map_err(|e| e.raw_os_error())?;
                Out(out)
                    .u64(s.f_blocks)
                    .u64(s.f_bfree)
                    .u64(s.f_bavail)
                    .u64(s.f_files)
                    .u64(s.f_ffree)
                    .u32(s.f_bsize as u32)
                    .u32(s.f_namemax as u32)
                    .u32(s.f_frsize as u32)
                    .u32(0)
                    .zeros(24);
            }
            op::RELEASE => {
                self.files.lock().remove(&u64_at(arg, 0));
            }
            op::FSYNC => {
                let f = self.file(u64_at(arg, 0))?;
                if u32_at(arg, 8) & 1 != 0 {
                    f.sync_data().map_err(errno)?;
                } else {
                    f.sync_all().map_err(errno)?;
                }
            }
            op::FLUSH | op::FSYNCDIR | op::ACCESS | op::DESTROY => {}
            op::GETXATTR => {
                let end = payload.iter().position(|&c| c == 0).ok_or(libc::EINVAL)?;
                let name = OsStr::from_bytes(&payload[..end]);
                let p = self.path(h.nodeid)?;
                let size = u32_at(arg, 0) as usize;
                xattr_reply(out, size, |buf| rustix::fs::lgetxattr(&p, name, buf))?;
            }
            op::LISTXATTR => {
                let p = self.path(h.nodeid)?;
                let size = u32_at(arg, 0) as usize;
                xattr_reply(out, size, |buf| rustix::fs::llistxattr(&p, buf))?;
            }
            op::OPENDIR => {
                let p = self.path(h.nodeid)?;
                fs::metadata(&p).map_err(errno)?;
                let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
                self.dirs.lock().insert(fh, Vec::new());
                Out(out).u64(fh).u32(0).u32(0);
            }
            op::READDIR | op::READDIRPLUS => self.readdir(h, arg, out)?,
            op::RELEASEDIR => {
                self.dirs.lock().remove(&u64_at(arg, 0));
            }
            _ => return Err(libc::ENOSYS), // MKNOD, SETXATTR, REMOVEXATTR, locks, ...
        }
        Ok(Reply::Body)
    }

    fn setattr(&self, h: &InHeader, a: &[u8], out: &mut Vec<u8>) -> Result<(), i32> {
        let valid = u32_at(a, 0);
        let path = self.path(h.nodeid)?;
        let fh = (valid & FATTR_FH != 0).then(|| u64_at(a, 8));
        if valid & FATTR_MODE != 0 {
            let mode = u32_at(a, 68) & 0o7777;
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).map_err(errno)?;
        }
        if valid & (FATTR_UID | FATTR_GID) != 0 {
            let uid = (valid & FATTR_UID != 0).then(|| u32_at(a, 76));
            let gid = (valid & FATTR_GID != 0).then(|| u32_at(a, 80));
            std::os::unix::fs::lchown(&path, uid, gid).map_err(errno)?;
        }
        if valid & FATTR_SIZE != 0 {
            let size = u64_at(a, 16);
            match fh {
                Some(fh) => self.file(fh)?.set_len(size).map_err(errno)?,
                None => OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .and_then(|f| f.set_len(size))
                    .map_err(errno)?,
            }
        }
        if valid & (FATTR_ATIME | FATTR_MTIME) != 0 {
            let t = |set: u32, now: u32, sec_off: usize, nsec_off: usize| {
                if valid & set == 0 {
                    rustix::fs::Timespec {
                        tv_sec: 0,
                        tv_nsec: rustix::fs::UTIME_OMIT,
                    }
                } else if valid & now != 0 {
                    rustix::fs::Timespec {
                        tv_sec: 0,
                        tv_nsec: rustix::fs::UTIME_NOW,
                    }
                } else {
                    rustix::fs::Timespec {
                        tv_sec: u64_at(a, sec_off) as i64,
                        tv_nsec: u32_at(a, nsec_off).into(),
                    }
                }
            };
            let times = rustix::fs::Timestamps {
                last_access: t(FATTR_ATIME, FATTR_ATIME_NOW, 32, 56),
                last_modification: t(FATTR_MTIME, FATTR_MTIME_NOW, 40, 60),
            };
            rustix::fs::utimensat(
                rustix::fs::CWD,
                &path,
                &times,
                rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| e.raw_os_error())?;
        }
        let m = fs::symlink_metadata(&path).map_err(errno)?;
        self.attr_out(&mut Out(out), &m);
        Ok(())
    }

    fn readdir(&self, h: &InHeader, a: &[u8], out: &mut Vec<u8>) -> Result<(), i32> {
        let plus = h.opcode == op::READDIRPLUS;
        let (fh, offset, size) = (u64_at(a, 0), u64_at(a, 8) as usize, u32_at(a, 16) as usize);
        let dir = self.path(h.nodeid)?;
        let mut dirs = self.dirs.lock();
        let list = dirs.get_mut(&fh).ok_or(libc::EBADF)?;
        if offset == 0 {
            *list = list_dir(&dir)?;
        }
        for (i, e) in list.iter().enumerate().skip(offset) {
            let namelen = e.name.len();
            let dirent = (24 + namelen).div_ceil(8) * 8;
            let need = dirent + if plus { 128 } else { 0 };
            if out.len() + need > size {
                break;
            }
            if plus {
                let dots = e.name == "." || e.name == "..";
                let p = dir.join(&e.name);
                match (dots, fs::symlink_metadata(&p)) {
                    (false, Ok(m)) => {
                        let id = self.remember(p);
                        self.entry(&mut Out(out), id, &m);
                    }
                    // "." and "..", or a name gone since the listing: no entry, no count.
                    _ => {
                        Out(out).zeros(128);
                    }
                }
            }
            let mut o = Out(out);
            o.u64(e.ino)
                .u64(i as u64 + 1)
                .u32(namelen as u32)
                .u32(e.kind);
            out.extend_from_slice(e.name.as_bytes());
            out.resize(out.len() + (dirent - 24 - namelen), 0);
        }
        Ok(())
    }
}

fn xattr_reply(
    out: &mut Vec<u8>,
    size: usize,
    get: impl Fn(&mut [u8]) -> rustix::io::Result<usize>,
) -> Result<(), i32> {
    if size == 0 {
        let n = get(&mut []).map_err(|e| e.raw_os_error())?;
        Out(out).u32(n as u32).u32(0);
    } else {
        out.resize(size.min(64 * 1024), 0);
        let n = get(out).map_err(|e| e.raw_os_error())?;
        out.truncate(n);
    }
    Ok(())
}

fn open(path: &Path, flags: i32, mode: u32) -> Result<File, i32> {
    let flags = rustix::fs::OFlags::from_bits_retain(flags as u32) | rustix::fs::OFlags::CLOEXEC;
    let fd: OwnedFd = rustix::fs::openat(
        rustix::fs::CWD,
        path,
        flags,
        rustix::fs::Mode::from_raw_mode(mode),
    )
    .map_err(|e| e.raw_os_error())?;
    Ok(File::from(fd))
}

fn list_dir(dir: &Path) -> Result<Vec<DirEntry>, i32> {
    let me = fs::symlink_metadata(dir).map_err(errno)?.ino();
    // readdir(3) hides entries whose inode number is 0; ".." of the root is itself.
    let parent = fs::symlink_metadata(dir.join("..")).map_or(me, |m| m.ino());
    let mut v = vec![
        DirEntry {
            name: ".".into(),
            ino: me,
            kind: libc::DT_DIR.into(),
        },
        DirEntry {
            name: "..".into(),
            ino: parent,
            kind: libc::DT_DIR.into(),
        },
    ];
    for e in fs::read_dir(dir).map_err(errno)? {
        let e = e.map_err(errno)?;
        let t = e.file_type().map_err(errno)?;
        let kind = if t.is_dir() {
            libc::DT_DIR
        } else if t.is_symlink() {
            libc::DT_LNK
        } else if t.is_file() {
            libc::DT_REG
        } else if t.is_fifo() {
            libc::DT_FIFO
        } else if t.is_socket() {
            libc::DT_SOCK
        } else if t.is_char_device() {
            libc::DT_CHR
        } else {
            libc::DT_BLK
        };
        v.push(DirEntry {
            name: e.file_name(),
            ino: std::os::unix::fs::DirEntryExt::ino(&e),
            kind: kind.into(),
        });
    }
    Ok(v)
}

/// The FUSE_INIT reply: what we want of what the kernel offers, and over io_uring
/// `FUSE_OVER_IO_URING` (without it the kernel refuses the rings' REGISTER commands).
fn init_reply(arg: &[u8], uring: bool, out: &mut Vec<u8>) -> Result<(), String> {
    let (major, minor, readahead) = (u32_at(arg, 0), u32_at(arg, 4), u32_at(arg, 8));
    if major != 7 || minor < 31 {
        return Err(format!("kernel FUSE {major}.{minor}: need 7.31 or later"));
    }
    let mut offered = u32_at(arg, 12) as u64;
    if offered & FUSE_INIT_EXT != 0 {
        offered |= (u32_at(arg, 16) as u64) << 32;
    }
    let mut want = FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_DO_READDIRPLUS | FUSE_PARALLEL_DIROPS;
    want |= FUSE_INIT_EXT;
    if uring {
        if offered & FUSE_OVER_IO_URING == 0 {
            return Err(
                "the kernel does not offer FUSE_OVER_IO_URING (CONFIG_FUSE_IO_URING, \
                 /sys/module/fuse/parameters/enable_uring = Y?)"
                    .into(),
            );
        }
        want |= FUSE_OVER_IO_URING;
    }
    let flags = want & offered;
    Out(out)
        .u32(7)
        .u32(FUSE_KERNEL_MINOR)
        .u32(readahead)
        .u32(flags as u32)
        .u16(16) // max_background
        .u16(12) // congestion_threshold
        .u32(MAX_WRITE as u32)
        .u32(1) // time_gran
        .u16(0) // max_pages (default 32 = MAX_WRITE / 4 KiB)
        .u16(0)
        .u32((flags >> 32) as u32)
        .u32(0)
        .u16(0)
        .zeros(22);
    Ok(())
}

// ---- transport 1: /dev/fuse read/write ----

fn out_header(buf: &mut [u8], len: usize, error: i32, unique: u64) {
    buf[0..4].copy_from_slice(&(len as u32).to_le_bytes());
    buf[4..8].copy_from_slice(&(-error).to_le_bytes());
    buf[8..16].copy_from_slice(&unique.to_le_bytes());
}

/// Serves /dev/fuse until the mount goes away (ENODEV). Sends `()` on `inited` once the
/// FUSE_INIT reply has been written, i.e. once the kernel accepts ring registrations.
fn devfuse_loop(dev: &File, fs: &Fs, inited: Option<mpsc::Sender<()>>) -> Result<(), String> {
    let mut buf = vec![0u8; DEVFUSE_BUF];
    let mut reply = Vec::with_capacity(DEVFUSE_BUF);
    let mut inited = inited;
    loop {
        let n = match (&*dev).read(&mut buf) {
            Ok(n) => n,
            Err(e) => match e.raw_os_error() {
                Some(libc::ENOENT) | Some(libc::EINTR) | Some(libc::EAGAIN) => continue,
                Some(libc::ENODEV) => return Ok(()),
                _ => return Err(format!("read /dev/fuse: {e}")),
            },
        };
        fs.served_devfuse.fetch_add(1, Ordering::Relaxed);
        let req = &buf[..n];
        let Some(h) = InHeader::parse(req) else {
            return Err(format!("short request of {n} bytes"));
        };
        let body = &req[IN_HEADER..];
        let (arg, payload) = body.split_at(op_header_size(h.opcode).min(body.len()));
        reply.clear();
        reply.resize(OUT_HEADER, 0);
        let mut body_out = Vec::new();
        let error = if h.opcode == op::INIT {
            init_reply(arg, fs.uring, &mut body_out)?;
            0
        } else {
            match fs.handle(&h, arg, payload, &mut body_out) {
                Ok(Reply::Body) => 0,
                Ok(Reply::None) => continue,
                Err(e) => e,
            }
        };
        if error == 0 {
            reply.extend_from_slice(&body_out);
        }
        let len = reply.len();
        out_header(&mut reply, len, error, h.unique);
        if let Err(e) = (&*dev).write(&reply) {
            // ENOENT: the request was interrupted and is gone; anything else is fatal.
            if e.raw_os_error() != Some(libc::ENOENT) {
                return Err(format!("write /dev/fuse (opcode {}): {e}", h.opcode));
            }
        }
        if h.opcode == op::INIT {
            if let Some(tx) = inited.take() {
                let _ = tx.send(());
            }
        }
    }
}

// ---- transport 2: FUSE over io_uring ----

/// A page-aligned buffer shared with the kernel (it copies requests in and replies out).
struct Shared {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Shared {
    fn new(len: usize) -> Result<Shared, String> {
        let layout = std::alloc::Layout::from_size_align(len, 4096).map_err(|e| e.to_string())?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err("out of memory for a ring buffer".into());
        }
        Ok(Shared { ptr, layout })
    }

    /// SAFETY (callers): only while the kernel does not own the entry, i.e. between its
    /// completion and the next SQE that hands it back.
    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: ptr is a live allocation of layout.size() bytes owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // SAFETY: allocated in new() with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

struct RingEntry {
    header: Shared,
    payload: Shared,
    iov: Box<[libc::iovec; 2]>,
    commit_id: u64,
    registered: bool,
}

fn cmd_req(qid: u16, commit_id: u64) -> [u8; 80] {
    let mut c = [0u8; 80];
    c[8..16].copy_from_slice(&commit_id.to_le_bytes());
    c[16..18].copy_from_slice(&qid.to_le_bytes());
    c
}

fn ring_sqe(e: &RingEntry, idx: usize, qid: u16) -> io_uring::squeue::Entry128 {
    use io_uring::{opcode, types};
    if e.registered {
        opcode::UringCmd80::new(types::Fixed(0), FUSE_IO_URING_CMD_COMMIT_AND_FETCH)
            .cmd(cmd_req(qid, e.commit_id))
            .build()
            .user_data(idx as u64)
    } else {
        let sqe = opcode::UringCmd80::new(types::Fixed(0), FUSE_IO_URING_CMD_REGISTER)
            .cmd(cmd_req(qid, 0))
            .addr(Some(e.iov.as_ptr() as u64))
            .build()
            .user_data(idx as u64);
        // The crate has no setter for sqe->len, which REGISTER needs (2 iovecs); the
        // SQE is plain bytes with len at offset 24 (struct io_uring_sqe).
        // SAFETY: Entry128 is repr(C) over the 128-byte SQE; both types are plain data.
        let mut raw: [u8; 128] = unsafe { std::mem::transmute(sqe) };
        raw[24..28].copy_from_slice(&2u32.to_le_bytes());
        // SAFETY: as above; every byte pattern is a valid SQE value.
        unsafe { std::mem::transmute::<[u8; 128], io_uring::squeue::Entry128>(raw) }
    }
}

/// One queue: registers `depth` entries, then serves requests until the connection ends.
fn ring_queue(dev: &File, fs: &Fs, qid: u16, depth: usize, payload: usize) -> Result<(), String> {
    pin_to(qid as usize);

    let mut ring: io_uring::IoUring<io_uring::squeue::Entry128, io_uring::cqueue::Entry> =
        io_uring::IoUring::builder()
            .setup_cqsize(2 * depth as u32)
            .build(depth as u32)
            .map_err(|e| format!("qid {qid}: io_uring_setup: {e}"))?;
    ring.submitter()
        .register_files(&[dev.as_raw_fd()])
        .map_err(|e| format!("qid {qid}: register_files: {e}"))?;
    let mut ents = Vec::with_capacity(depth);
    for _ in 0..depth {
        let mut header = Shared::new(RING_HEADER)?;
        let mut payload_buf = Shared::new(payload)?;
        let iov = Box::new([
            libc::iovec {
                iov_base: header.bytes().as_mut_ptr().cast(),
                iov_len: RING_HEADER,
            },
            libc::iovec {
                iov_base: payload_buf.bytes().as_mut_ptr().cast(),
                iov_len: payload,
            },
        ]);
        ents.push(RingEntry {
            header,
            payload: payload_buf,
            iov,
            commit_id: 0,
            registered: false,
        });
    }
    for (i, e) in ents.iter().enumerate() {
        let sqe = ring_sqe(e, i, qid);
        // SAFETY: the iovecs and buffers live in `ents` for the life of the ring.
        unsafe { ring.submission().push(&sqe) }.map_err(|_| "SQ full at register")?;
    }
    let mut body = Vec::with_capacity(payload);
    let mut done = Vec::with_capacity(depth);
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(format!("qid {qid}: io_uring_enter: {e}")),
        }
        done.clear();
        done.extend(
            ring.completion()
                .map(|c| (c.user_data() as usize, c.result())),
        );
        for &(idx, res) in &done {
            let e = ents.get_mut(idx).ok_or("completion for an unknown entry")?;
            if res == -libc::EAGAIN || res == -libc::EINTR {
                // Not taken (e.g. REGISTER before FUSE_INIT was processed): send again.
            } else if res == -libc::ENOTCONN {
                return Ok(()); // unmounted
            } else if res < 0 {
                let what = if e.registered {
                    "COMMIT_AND_FETCH"
                } else {
                    "REGISTER"
                };
                return Err(format!(
                    "qid {qid}: {what} failed: {}",
                    io::Error::from_raw_os_error(-res)
                ));
            } else {
                e.registered = true;
                serve_entry(fs, e, &mut body);
            }
            let sqe = ring_sqe(e, idx, qid);
            // SAFETY: as above.
            unsafe { ring.submission().push(&sqe) }.map_err(|_| "SQ full")?;
        }
    }
}

/// Handles the request in a ring entry and leaves the reply in its buffers.
fn serve_entry(fs: &Fs, e: &mut RingEntry, body: &mut Vec<u8>) {
    let hdr = e.header.bytes();
    let payload_sz = u32_at(hdr, RING_ENT_IN_OUT + 16) as usize;
    e.commit_id = u64_at(hdr, RING_ENT_IN_OUT + 8);
    fs.served_ring.fetch_add(1, Ordering::Relaxed);
    let h = InHeader::parse(&hdr[..IN_HEADER]);
    let pay = e.payload.bytes();
    body.clear();
    let (unique, error) = match h {
        None => (0, libc::EIO),
        Some(h) => {
            let arg = &hdr[RING_OP_IN..RING_OP_IN + op_header_size(h.opcode).min(RING_OP_IN)];
            let input = &pay[..payload_sz.min(pay.len())];
            let error = match fs.handle(&h, arg, input, body) {
                Ok(_) => 0,
                Err(e) => e,
            };
            (h.unique, error)
        }
    };
    let n = if error == 0 {
        body.len().min(pay.len())
    } else {
        0
    };
    pay[..n].copy_from_slice(&body[..n]);
    out_header(&mut hdr[..OUT_HEADER], OUT_HEADER + n, error, unique);
    hdr[RING_ENT_IN_OUT + 16..RING_ENT_IN_OUT + 20].copy_from_slice(&(n as u32).to_le_bytes());
}

/// Best effort: an unpinned thread still serves, only with less locality.
fn pin_to(cpu: usize) {
    let mut cpus = rustix::thread::CpuSet::new();
    cpus.set(cpu);
    if let Err(e) = rustix::thread::sched_setaffinity(None, &cpus) {
        eprintln!("fuse_transport: pinning a thread to CPU {cpu}: {e}");
    }
}

fn possible_cpus() -> usize {
    // "0-1" or "0": the kernel makes one queue per possible CPU and needs them all.
    fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| s.trim().rsplit(['-', ',']).next()?.parse::<usize>().ok())
        .map_or(1, |last| last + 1)
}

// ---- mount and main ----

fn mount(backing: &Path, mnt: &Path) -> Result<File, String> {
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(|e| format!("/dev/fuse: {e}"))?;
    let mode = fs::metadata(backing).map_err(|e| format!("{}: {e}", backing.display()))?;
    let opts = format!(
        "fd={},rootmode={:o},user_id=0,group_id=0,default_permissions,allow_other",
        dev.as_raw_fd(),
        mode.mode() & libc::S_IFMT
    );
    let c = |s: &[u8]| CString::new(s).map_err(|e| e.to_string());
    let (src, target) = (
        c(backing.as_os_str().as_bytes())?,
        c(mnt.as_os_str().as_bytes())?,
    );
    let (fstype, data) = (c(b"fuse.fuse_transport")?, c(opts.as_bytes())?);
    // SAFETY: every pointer is a NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(format!(
            "mount {}: {}",
            mnt.display(),
            io::Error::last_os_error()
        ));
    }
    Ok(dev)
}

struct Args {
    uring: bool,
    threads: usize,
    /// Pin /dev/fuse reader i to CPU i (mod the CPU count), as the rings are pinned.
    pin: bool,
    depth: usize,
    ttl: Duration,
    backing: PathBuf,
    mnt: PathBuf,
}

const USAGE: &str = "usage: fuse_transport --transport devfuse|uring [--threads N] [--pin] \
                     [--depth D] [--ttl SECS] BACKING MOUNTPOINT";

fn parse_args() -> Result<Option<Args>, String> {
    let mut it = std::env::args_os().skip(1);
    let mut transport = None;
    let (mut threads, mut depth, mut ttl) = (1usize, 8usize, 3600.0f64);
    let mut pos = Vec::new();
    let mut pin = false;
    while let Some(a) = it.next() {
        let mut val = |name: &str| {
            it.next()
                .and_then(|v| v.into_string().ok())
                .ok_or(format!("{name} needs a value"))
        };
        match a.to_str() {
            Some("--bench") => return Ok(None), // `cargo bench` with no arguments
            Some("--transport") => transport = Some(val("--transport")?),
            Some("--pin") => pin = true,
            Some("--threads") => {
                threads = val("--threads")?
                    .parse()
                    .map_err(|e| format!("--threads: {e}"))?
            }
            Some("--depth") => {
                depth = val("--depth")?
                    .parse()
                    .map_err(|e| format!("--depth: {e}"))?
            }
            Some("--ttl") => ttl = val("--ttl")?.parse().map_err(|e| format!("--ttl: {e}"))?,
            _ => pos.push(PathBuf::from(a)),
        }
    }
    if transport.is_none() && pos.is_empty() {
        return Ok(None);
    }
    let uring = match transport.as_deref() {
        Some("devfuse") => false,
        Some("uring") => true,
        _ => return Err(USAGE.into()),
    };
    let [backing, mnt]: [PathBuf; 2] = pos.try_into().map_err(|_| USAGE.to_string())?;
    let backing = fs::canonicalize(&backing).map_err(|e| format!("{}: {e}", backing.display()))?;
    Ok(Some(Args {
        uring,
        threads: threads.max(1),
        pin,
        depth: depth.max(1),
        ttl: Duration::from_secs_f64(ttl),
        backing,
        mnt,
    }))
}

fn run(a: Args) -> Result<(), String> {
    rustix::process::umask(rustix::fs::Mode::empty());
    let dev = Arc::new(mount(&a.backing, &a.mnt)?);
    let fs = Arc::new(Fs::new(a.backing.clone(), a.ttl, a.uring));
    let (tx, rx) = mpsc::channel();
    let mut workers = Vec::new();
    for i in 0..a.threads {
        let (dev, fs) = (dev.clone(), fs.clone());
        let inited = (i == 0).then(|| tx.clone());
        let pin = a.pin.then(|| i % possible_cpus());
        workers.push(std::thread::spawn(move || {
            if let Some(cpu) = pin {
                pin_to(cpu);
            }
            devfuse_loop(&dev, &fs, inited)
        }));
    }
    drop(tx);
    let mut rings = Vec::new();
    if a.uring {
        if rx.recv().is_err() {
            return Err("the /dev/fuse loop ended before FUSE_INIT".into());
        }
        let payload = MAX_WRITE.max(8192);
        for qid in 0..possible_cpus() {
            let (dev, fs) = (dev.clone(), fs.clone());
            let depth = a.depth;
            rings.push(std::thread::spawn(move || {
                let r = ring_queue(&dev, &fs, qid as u16, depth, payload);
                if let Err(e) = &r {
                    // The kernel would fall back to /dev/fuse and the measurement would be
                    // of the wrong transport: stop, loudly (the mount then fails ENOTCONN).
                    eprintln!("fuse_transport: {e}");
                    std::process::exit(1);
                }
                r
            }));
        }
    }
    let mut result = Ok(());
    for w in workers {
        match w.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => result = Err(e),
            Err(_) => result = Err("a /dev/fuse thread panicked".into()),
        }
    }
    // Unmounted: the rings end with ENOTCONN; a ring that failed says why.
    for r in rings {
        if r.is_finished() {
            if let Ok(Err(e)) = r.join() {
                eprintln!("fuse_transport: {e}");
                result = result.and(Err(e));
            }
        }
    }
    let names: &[(u32, &str)] = &[
        (op::LOOKUP, "LOOKUP"),
        (op::FORGET, "FORGET"),
        (op::BATCH_FORGET, "BATCH_FORGET"),
        (op::GETATTR, "GETATTR"),
        (op::SETATTR, "SETATTR"),
        (op::CREATE, "CREATE"),
        (op::OPEN, "OPEN"),
        (op::READ, "READ"),
        (op::WRITE, "WRITE"),
        (op::FLUSH, "FLUSH"),
        (op::RELEASE, "RELEASE"),
        (op::UNLINK, "UNLINK"),
        (op::MKDIR, "MKDIR"),
        (op::RMDIR, "RMDIR"),
        (op::OPENDIR, "OPENDIR"),
        (op::READDIR, "READDIR"),
        (op::READDIRPLUS, "READDIRPLUS"),
        (op::RELEASEDIR, "RELEASEDIR"),
        (op::GETXATTR, "GETXATTR"),
        (op::STATFS, "STATFS"),
    ];
    let counts: Vec<String> = names
        .iter()
        .filter_map(|&(o, n)| {
            let c = fs.counts[o as usize].load(Ordering::Relaxed);
            (c > 0).then(|| format!("{n}={c}"))
        })
        .collect();
    eprintln!("fuse_transport: requests: {}", counts.join(" "));
    eprintln!(
        "fuse_transport: answered over /dev/fuse: {}, over io_uring: {}",
        fs.served_devfuse.load(Ordering::Relaxed),
        fs.served_ring.load(Ordering::Relaxed)
    );
    result
}

fn main() -> ExitCode {
    match parse_args() {
        Ok(None) => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Ok(Some(a)) => match run(a) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("fuse_transport: {e}");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("fuse_transport: {e}");
            ExitCode::from(2)
        }
    }
}
