//! The only module that imports fuser: turns kernel requests into calls on the core
//! ([`crate::fs::LabFs`]) and core results into replies.
//!
//! Dispatch lanes: fuser runs several event-loop threads. A request whose object lives
//! on the local SSD runs inline on the event-loop thread. A request that touches Atlas
//! is handed to the Atlas lane (a small pool of threads) and the event loop moves on,
//! so a hung NFS server can never occupy the threads that serve local paths. A
//! watchdog answers ETIMEDOUT for any Atlas request that outlives the configured
//! timeout, marks Atlas down, and the core then refuses Atlas requests at once until
//! the health probe sees Atlas answer again.

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use fuser::{
    AccessFlags, BackingId, Config as FuseConfig, CopyFileRangeFlags, Errno, FileAttr, FileHandle,
    FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags, IoctlFlags, KernelConfig,
    LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyLseek, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, SessionACL, TimeOrNow, WriteFlags,
};
use parking_lot::{Condvar, Mutex};
use tracing::{debug, error, info, trace, warn, Level};

use crate::error::{Error, Result};
use crate::fs::handle::Opened;
use crate::fs::xattr::XattrOut;
use crate::fs::{Attr, Ctx, EntryOut, Invalidate, Kind, LabFs, SetAttr, SetTime};
use crate::rules::{BackendKind, Class};

/// Threads of the Atlas lane: how many Atlas calls may be outstanding at once.
const ATLAS_WORKERS: usize = 16;
/// Bytes of entries prepared per readdir request: the kernel asks for up to the
/// caller's getdents buffer (32 KiB for ls); entries that do not fit are forgotten.
const READDIR_BATCH: usize = 32 * 1024;

mod lane;
mod passthrough;
pub mod ring;

use lane::{log_failure, Answer, AtlasLane, ControlLane, Fallback};
use passthrough::{dir_flags, Passthrough};

fn kind(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDevice => FileType::CharDevice,
        Kind::BlockDevice => FileType::BlockDevice,
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: UNIX_EPOCH,
        kind: kind(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: a.blksize,
        flags: 0,
    }
}

fn ctx(req: &Request) -> Ctx {
    Ctx {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
    }
}

/// The fuser `Filesystem`: adapts kernel requests to the core.
pub struct LabFuse {
    fs: Arc<LabFs>,
    atlas: AtlasLane,
    control: ControlLane,
    pass: Arc<Passthrough>,
    no_caps: Arc<NoCaps>,
}

/// Files this mount created, known to carry no `security.capability`, until when.
///
/// The kernel asks for `security.capability` before the first write to a new file and
/// before every chown (to drop file capabilities, as writes and chowns must): two
/// GETXATTRs per file `tar x` extracts. A file created here has none (capabilities are
/// never inherited) until someone sets an xattr on it: through this mount (which ends
/// the record), or on Atlas from another node, which is why an Atlas record lasts only
/// the Atlas entry TTL and a local one (labfs is the only writer of the SSD) as long as
/// the kernel holds the inode. Answering from the record is safe for the capability
/// itself: labfs writes and chowns through the backend's own kernel, which drops a
/// capability the file has at that write or chown whatever this answer said. A record
/// holds only while the inode stays on the backend it was created on (a promotion
/// rebinds it to an Atlas copy).
#[derive(Default)]
struct NoCaps(DashMap<u64, (Instant, BackendKind)>);

/// Records kept at most; beyond that the set starts again (each record only saves work).
const NO_CAPS_MAX: usize = 1 << 16;

impl NoCaps {
    fn created(&self, ino: u64, ttl: Duration, backend: BackendKind) {
        if self.0.len() >= NO_CAPS_MAX {
            self.0.clear();
        }
        self.0.insert(ino, (Instant::now() + ttl, backend));
    }

    fn known_none(&self, ino: u64, backend: Option<BackendKind>) -> bool {
        let now = Instant::now();
        match self.0.get(&ino).map(|t| *t) {
            Some((until, b)) if now < until && Some(b) == backend => true,
            Some(_) => {
                self.0.remove(&ino);
                false
            }
            None => false,
        }
    }

    fn changed(&self, ino: u64) {
        self.0.remove(&ino);
    }
}

impl LabFuse {
    pub fn new(fs: Arc<LabFs>) -> LabFuse {
        LabFuse {
            atlas: AtlasLane::start(fs.clone()),
            control: ControlLane::start(),
            pass: Arc::new(Passthrough {
                fs: fs.clone(),
                enabled: AtomicBool::new(false),
                backing: DashMap::new(),
                fh_backing: DashMap::new(),
            }),
            no_caps: Arc::default(),
            fs,
        }
    }
}

fn time(t: Option<TimeOrNow>) -> Option<SetTime> {
    t.map(|t| match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(s) => SetTime::At(s),
    })
}

/// Whether `name` is a control request (`user.labfs.ctl.*`).
fn is_control(name: &OsStr) -> bool {
    name.as_encoded_bytes()
        .starts_with(crate::control::PREFIX.as_bytes())
}

fn xattr_reply(reply: ReplyXattr, out: XattrOut) {
    match out {
        XattrOut::Size(n) => reply.size(n),
        XattrOut::Data(d) => reply.data(&d),
    }
}

impl Filesystem for LabFuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let caps = config.capabilities();
        // Every listing batch is READDIRPLUS: it hands the kernel entries and attributes
        // in bulk. FUSE_READDIRPLUS_AUTO (plain READDIR after the first batch unless a
        // lookup happened in the directory) made first listings 3.5x faster but the
        // stat, rm -rf and git rows that follow a listing 2-40x slower, each name then
        // costing a LOOKUP or GETATTR round trip (docs/benchmarks.md, quiet run of
        // 4428c0d), so it stays off.
        let want = InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_DONT_MASK
            | InitFlags::FUSE_PARALLEL_DIROPS
            // Not FUSE_ATOMIC_O_TRUNC: with it the daemon's open does the O_TRUNC, and
            // the kernel checks "being executed" (ETXTBSY) only after the open, so
            // open(O_RDONLY|O_TRUNC) of a running program emptied it. Without it the
            // kernel truncates after that check (a SETATTR, one more round trip for an
            // O_TRUNC open of an existing file).
            | InitFlags::FUSE_CACHE_SYMLINKS
            // The kernel enforces POSIX ACLs (stored on the backend) like mode bits.
            | InitFlags::FUSE_POSIX_ACL
            // labfs clears setuid/setgid itself when the kernel says so; in return the
            // kernel stops asking for security.capability before every write.
            | InitFlags::FUSE_HANDLE_KILLPRIV_V2;
        let _ = config.add_capabilities(want & caps);
        let offered = caps.contains(InitFlags::FUSE_OVER_IO_URING);
        let transport = ring::STATE.get();
        if transport.map(|t| t.at_init(offered)).transpose()? == Some(true) {
            let _ = config.add_capabilities(InitFlags::FUSE_OVER_IO_URING);
            // Every queue entry's payload buffer holds the largest request.
            let _ = config.set_max_write(ring::RING_MAX_WRITE);
        }
        if caps.contains(InitFlags::FUSE_PASSTHROUGH)
            && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(1).is_ok()
        {
            self.pass.enabled.store(true, Ordering::Relaxed);
            info!("kernel FUSE passthrough enabled for open files");
        } else {
            info!("kernel FUSE passthrough not offered: file I/O goes through the daemon");
            self.fs.no_kernel_passthrough();
            info!("open Atlas files: {}", self.fs.atlas_io().why);
        }
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let c = ctx(req);
        let n = name.to_os_string();
        let (lane, fallback) = self.lookup_lane(parent, name);
        self.run_hedged(
            lane,
            "lookup",
            reply,
            move |fs| match fs.lookup(&c, parent.0, &n) {
                Ok(e) => {
                    fs.note_entry(parent.0, &n, &e.attr);
                    Ok(Ok(e))
                }
                Err(e) if e.errno() == libc::ENOENT => Ok(Err(fs.negative_ttl(parent.0, &n))),
                Err(e) => Err(e),
            },
            |reply, r| match r {
                Ok(e) => reply.entry(&e.ttl, &file_attr(&e.attr), Generation(0)),
                Err(Some(ttl)) => {
                    // A negative entry: the kernel caches "no such file" for ttl.
                    let mut a = file_attr(&neg_attr());
                    a.ino = INodeNo(0);
                    reply.entry(&ttl, &a, Generation(0));
                }
                Err(None) => reply.error(Errno::ENOENT),
            },
            fallback,
            |fs, r| {
                if let Ok(e) = r {
                    fs.forget(e.attr.ino, 1); // never handed to the kernel
                }
            },
        );
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.no_caps.changed(ino.0);
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let c = ctx(req);
        let lane = self.lane_ino(ino);
        // A directory on the way to local paths answers from its last-known attributes
        // while Atlas does not answer.
        let fallback = (lane == BackendKind::Atlas && self.fs.last_known_dir(ino.0).is_some())
            .then(|| {
                Box::new(
                    move |fs: &LabFs, reply: ReplyAttr| match fs.last_known_dir(ino.0) {
                        Some(a) => reply.attr(&fs.ttl(BackendKind::Atlas), &file_attr(&a)),
                        None => {
                            debug!(
                                ino = ino.0,
                                "getattr: Atlas not answering and no last-known attributes"
                            );
                            reply.error(Errno::from_i32(libc::ETIMEDOUT))
                        }
                    },
                ) as Fallback<ReplyAttr>
            })
            .map(Answer::hedge);
        self.run_hedged(
            lane,
            "getattr",
            reply,
            move |fs| {
                let r = fs.getattr(&c, ino.0, fh.map(|f| f.0))?;
                if lane == BackendKind::Atlas {
                    fs.note_getattr(ino.0, &r.0);
                }
                Ok(r)
            },
            |reply, (a, ttl)| reply.attr(&ttl, &file_attr(&a)),
            fallback,
            |_, _| {},
        );
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let c = ctx(req);
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: time(atime),
            mtime: time(mtime),
            fh: fh.map(|f| f.0),
        };
        self.run(
            self.lane_ino(ino),
            "setattr",
            reply,
            move |fs| fs.setattr(&c, ino.0, &set),
            |reply, (a, ttl)| reply.attr(&ttl, &file_attr(&a)),
        );
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        let c = ctx(req);
        self.run(
            self.lane_ino(ino),
            "readlink",
            reply,
            move |fs| fs.readlink(&c, ino.0),
            |reply, d| reply.data(&d),
        );
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let c = ctx(req);
        let n = name.to_os_string();
        self.run_entry(self.lane_child(parent, name), "mknod", reply, move |fs| {
            fs.mknod(&c, parent.0, &n, mode, umask, rdev)
        });
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let c = ctx(req);
        let n = name.to_os_string();
        self.run_entry(self.lane_child(parent, name), "mkdir", reply, move |fs| {
            let e = fs.mkdir(&c, parent.0, &n, mode, umask)?;
            fs.note_entry(parent.0, &n, &e.attr);
            Ok(e)
        });
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let c = ctx(req);
        let n = name.to_os_string();
        self.run(
            self.lane_child(parent, name),
            "unlink",
            reply,
            move |fs| fs.unlink(&c, parent.0, &n),
            |r, ()| r.ok(),
        );
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let c = ctx(req);
        let n = name.to_os_string();
        // rmdir may look at both backends' parts of the directory.
        let lane = if self.fs.backend_of_child(parent.0, name) == Some(BackendKind::Local)
            && !self.fs.may_touch_atlas_below(parent.0, name)
        {
            BackendKind::Local
        } else {
            BackendKind::Atlas
        };
        self.run(
            lane,
            "rmdir",
            reply,
            move |fs| fs.rmdir(&c, parent.0, &n),
            |r, ()| r.ok(),
        );
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let c = ctx(req);
        let n = link_name.to_os_string();
        let t = target.as_os_str().to_os_string();
        self.run_entry(
            self.lane_child(parent, link_name),
            "symlink",
            reply,
            move |fs| fs.symlink(&c, parent.0, &n, &t),
        );
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let c = ctx(req);
        let (n, nn) = (name.to_os_string(), newname.to_os_string());
        let lane = if self.lane_child(parent, name) == BackendKind::Local
            && self.lane_child(newparent, newname) == BackendKind::Local
        {
            BackendKind::Local
        } else {
            BackendKind::Atlas
        };
        self.run(
            lane,
            "rename",
            reply,
            move |fs| fs.rename(&c, parent.0, &n, newparent.0, &nn, flags.bits()),
            |r, ()| r.ok(),
        );
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let c = ctx(req);
        let n = newname.to_os_string();
        self.run_entry(self.lane_ino(ino), "link", reply, move |fs| {
            fs.link(&c, ino.0, newparent.0, &n)
        });
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let c = ctx(req);
        let pass = self.pass.clone();
        self.run_hedged(
            self.lane_ino(ino),
            "open",
            reply,
            move |fs| fs.open(&c, ino.0, flags.0),
            move |reply, o| pass.reply_open(ino.0, o, reply),
            None,
            |fs, o| fs.release(o.fh),
        );
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.run(
            self.lane_fh(ino, fh),
            "read",
            reply,
            move |fs| fs.read(fh.0, offset, size),
            |r, d| r.data(&d),
        );
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        // Clearing setuid/setgid (an fstat, maybe an fchmod) touches the backing file:
        // it runs on the handle's lane with the write, never on the event loop.
        let kill = write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID);
        let lane = self.lane_fh(ino, fh);
        if lane == BackendKind::Local {
            match crate::stats::timed(BackendKind::Local, |fs: &LabFs| {
                if kill {
                    fs.kill_suid_sgid(fh.0);
                }
                fs.write(fh.0, offset, data)
            })(&self.fs)
            {
                Ok(n) => reply.written(n),
                Err(e) => {
                    log_failure("write", &e);
                    reply.error(Errno::from_i32(e.errno()));
                }
            }
            return;
        }
        let d = data.to_vec();
        self.run(
            BackendKind::Atlas,
            "write",
            reply,
            move |fs| {
                if kill {
                    fs.kill_suid_sgid(fh.0);
                }
                fs.write(fh.0, offset, &d)
            },
            |r, n| r.written(n),
        );
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.run(
            self.lane_fh(ino, fh),
            "flush",
            reply,
            move |fs| fs.flush(fh.0),
            |r, ()| r.ok(),
        );
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.pass.released(_ino.0, fh.0);
        reply.ok();
        if self.lane_fh(_ino, fh) == BackendKind::Atlas && !self.fs.atlas_inline() {
            // close(2) on NFS flushes dirty pages and may hang with the server.
            let fs = self.fs.clone();
            self.atlas.spawn(Box::new(move || fs.release(fh.0)));
        } else {
            self.fs.release(fh.0);
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.run(
            self.lane_fh(ino, fh),
            "fsync",
            reply,
            move |fs| fs.fsync(fh.0, datasync),
            |r, ()| r.ok(),
        );
    }

    /// chattr/lsattr: FS_IOC_GETFLAGS/SETFLAGS (src/fs/inode_flags.rs).
    fn ioctl(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: IoctlFlags,
        cmd: u32,
        in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        let c = ctx(req);
        let input = in_data.to_vec();
        self.run(
            self.lane_ino(ino),
            "ioctl",
            reply,
            move |fs| fs.ioctl(&c, ino.0, fh.0, cmd, &input),
            |r, data| r.ioctl(0, &data),
        );
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let c = ctx(req);
        let lane = self.lane_dir(ino);
        // A directory stored on the local SSD lists its local part while Atlas does not
        // answer (the core skips Atlas while it is stalled).
        let fallback = (lane == BackendKind::Atlas && self.fs.lists_locally(ino.0))
            .then(|| {
                Box::new(
                    move |fs: &LabFs, reply: ReplyOpen| match fs.opendir(&c, ino.0) {
                        Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
                        Err(e) => {
                            log_failure("opendir", &e);
                            reply.error(Errno::from_i32(e.errno()));
                        }
                    },
                ) as Fallback<ReplyOpen>
            })
            .map(Answer::hedge);
        let local = lane == BackendKind::Local;
        self.run_hedged(
            lane,
            "opendir",
            reply,
            move |fs| {
                let fh = fs.opendir(&c, ino.0)?;
                Ok((fh, local || fs.dir_keeps_cache(fh)))
            },
            move |r, (fh, keep)| r.opened(FileHandle(fh), dir_flags(keep)),
            fallback,
            |fs, (fh, _)| fs.releasedir(fh),
        );
    }

    fn readdir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectory,
    ) {
        let c = ctx(req);
        self.run(
            self.lane_dir(ino),
            "readdir",
            reply,
            move |fs| fs.readdir(&c, fh.0, offset, false, READDIR_BATCH),
            |mut reply, entries| {
                for e in entries {
                    if reply.add(INodeNo(e.ino), e.offset, kind(e.kind), &e.name) {
                        break;
                    }
                }
                reply.ok();
            },
        );
    }

    fn readdirplus(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectoryPlus,
    ) {
        let c = ctx(req);
        let fs = self.fs.clone();
        let lane = self.lane_dir(ino);
        self.run(
            lane,
            "readdirplus",
            reply,
            move |core| {
                let entries = core.readdir(&c, fh.0, offset, true, READDIR_BATCH)?;
                // Entries of Atlas listings are noted (directories on the way to local
                // paths, transitional names found on Atlas) for outages, unless the
                // rules leave nothing of the kind below this directory.
                let note = lane == BackendKind::Atlas && core.listing_notes_entries(ino.0);
                // Every entry with attributes holds a lookup until delivered. Held in
                // reverse, so that each delivery (in order) is found at the end.
                let mut held = lane::Lookups::new(fs);
                for e in entries.iter().rev() {
                    if let Some(en) = &e.entry {
                        held.hold(e.ino);
                        if note {
                            core.note_entry(ino.0, &e.name, &en.attr);
                        }
                    }
                }
                Ok((entries, held))
            },
            move |mut reply, (entries, mut held)| {
                for e in entries {
                    let full = match e.entry {
                        Some(en) => reply.add(
                            INodeNo(e.ino),
                            e.offset,
                            &e.name,
                            &en.ttl,
                            &file_attr(&en.attr),
                            Generation(0),
                        ),
                        // "." and "..", and names whose attributes the caller may
                        // not have (a directory it may read but not search): listed
                        // with node id 0, which the kernel does not link or count.
                        None => {
                            reply.add_name_only(INodeNo(e.ino), e.offset, &e.name, kind(e.kind))
                        }
                    };
                    if full {
                        break;
                    }
                    if e.entry.is_some() {
                        held.delivered(e.ino);
                    }
                }
                reply.ok();
                // `held` drops here: what did not fit is forgotten.
            },
        );
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.fs.releasedir(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let c = ctx(req);
        self.run(
            self.lane_ino(ino),
            "fsyncdir",
            reply,
            move |fs| fs.fsyncdir(&c, ino.0),
            |r, ()| r.ok(),
        );
    }

    fn statfs(&self, req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        let c = ctx(req);
        self.run(
            self.lane_ino(ino),
            "statfs",
            reply,
            move |fs| fs.statfs(&c, ino.0),
            |r, s| {
                r.statfs(
                    s.f_blocks,
                    s.f_bfree,
                    s.f_bavail,
                    s.f_files,
                    s.f_ffree,
                    s.f_bsize as u32,
                    s.f_namemax as u32,
                    s.f_frsize as u32,
                )
            },
        );
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let c = ctx(req);
        let (n, v) = (name.to_os_string(), value.to_vec());
        self.no_caps.changed(ino.0);
        let work = move |fs: &LabFs| crate::control::setxattr(fs, &c, ino.0, &n, &v, flags);
        if is_control(name) {
            self.run_control("setxattr", reply, work, |r, ()| r.ok());
            return;
        }
        self.run(self.lane_ino(ino), "setxattr", reply, work, |r, ()| r.ok());
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if name.as_encoded_bytes() == b"security.capability"
            && self.no_caps.known_none(ino.0, self.fs.backend_of(ino.0))
        {
            // Answered here, on the event loop: no backend call, no Atlas lane.
            reply.error(Errno::from_i32(libc::ENODATA));
            return;
        }
        let c = ctx(req);
        let n = name.to_os_string();
        let work = move |fs: &LabFs| crate::control::getxattr(fs, &c, ino.0, &n, size);
        if is_control(name)
            && !name
                .as_encoded_bytes()
                .starts_with(crate::promote::CTL_PROMOTE.as_bytes())
        {
            // Status pieces and explaining a path may touch Atlas (and time out on
            // their own): the Atlas lane, whose threads grow; never the local one.
            self.run(BackendKind::Atlas, "getxattr", reply, work, xattr_reply);
            return;
        }
        if is_control(name) {
            // Control requests have their own lane with bounded work (see lane.rs).
            self.run_control("getxattr", reply, work, xattr_reply);
            return;
        }
        self.run(self.lane_ino(ino), "getxattr", reply, work, xattr_reply);
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let c = ctx(req);
        self.run(
            self.lane_ino(ino),
            "listxattr",
            reply,
            move |fs| fs.listxattr(&c, ino.0, size),
            xattr_reply,
        );
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let c = ctx(req);
        let n = name.to_os_string();
        self.no_caps.changed(ino.0);
        self.run(
            self.lane_ino(ino),
            "removexattr",
            reply,
            move |fs| fs.removexattr(&c, ino.0, &n),
            |r, ()| r.ok(),
        );
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let c = ctx(req);
        self.run(
            self.lane_ino(ino),
            "access",
            reply,
            move |fs| fs.access(&c, ino.0, mask.bits()),
            |r, ()| r.ok(),
        );
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let c = ctx(req);
        let n = name.to_os_string();
        let pass = self.pass.clone();
        let no_caps = self.no_caps.clone();
        self.run_hedged(
            self.lane_child(parent, name),
            "create",
            reply,
            move |fs| {
                let (e, o) = fs.create(&c, parent.0, &n, mode, umask, flags)?;
                if o.created {
                    no_caps.created(e.attr.ino, e.ttl, o.backend);
                }
                Ok((e, o))
            },
            move |reply, (e, o)| pass.reply_create(e, o, reply),
            None,
            |fs, (e, o)| {
                // Created on Atlas after the caller was told ETIMEDOUT: keep the file, drop
                // the handle and the lookup nobody received.
                fs.release(o.fh);
                fs.forget(e.attr.ino, 1);
            },
        );
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let c = ctx(req);
        self.run(
            self.lane_fh(ino, fh),
            "fallocate",
            reply,
            move |fs| fs.fallocate(&c, fh.0, offset, length, mode),
            |r, ()| r.ok(),
        );
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        self.run(
            self.lane_fh(ino, fh),
            "lseek",
            reply,
            move |fs| fs.lseek(fh.0, offset, whence),
            |r, o| r.offset(o),
        );
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let lane = if self.lane_fh(ino_in, fh_in) == BackendKind::Local
            && self.lane_fh(ino_out, fh_out) == BackendKind::Local
        {
            BackendKind::Local
        } else {
            BackendKind::Atlas
        };
        self.run(
            lane,
            "copy_file_range",
            reply,
            move |fs| fs.copy_file_range(fh_in.0, offset_in, fh_out.0, offset_out, len),
            |r, n| r.written(n),
        );
    }
}

/// An entry made on Atlas after its request was answered ETIMEDOUT: the kernel never
/// got it, so the lookup it counted is dropped.
impl LabFuse {
    /// Run a request that answers with a new entry; if Atlas answers only after the
    /// watchdog did, the entry's lookup count is given back.
    fn run_entry(
        &self,
        backend: BackendKind,
        op: &'static str,
        reply: ReplyEntry,
        work: impl FnOnce(&LabFs) -> Result<EntryOut> + Send + 'static,
    ) {
        self.run_hedged(backend, op, reply, work, entry_ok, None, forget_late);
    }
}

fn forget_late(fs: &LabFs, e: EntryOut) {
    fs.forget(e.attr.ino, 1);
}

fn entry_ok(reply: ReplyEntry, e: EntryOut) {
    reply.entry(&e.ttl, &file_attr(&e.attr), Generation(0));
}

fn neg_attr() -> Attr {
    Attr {
        ino: 0,
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        kind: Kind::File,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
    }
}

/// A mount flag by name (from fstab's `-o`); anything else goes to the kernel as is.
fn mount_option(o: &str) -> MountOption {
    match o {
        "ro" => MountOption::RO,
        "exec" => MountOption::Exec,
        "noexec" => MountOption::NoExec,
        "suid" => MountOption::Suid,
        "nosuid" => MountOption::NoSuid,
        "dev" => MountOption::Dev,
        "nodev" => MountOption::NoDev,
        "atime" => MountOption::Atime,
        "noatime" => MountOption::NoAtime,
        "sync" => MountOption::Sync,
        "async" => MountOption::Async,
        "dirsync" => MountOption::DirSync,
        _ => MountOption::CUSTOM(o.to_string()),
    }
}

/// Mount options and threads of the FUSE session.
pub fn session_config(fsname: &str, extra: &[String]) -> FuseConfig {
    let mut c = FuseConfig::default();
    c.mount_options = vec![
        MountOption::FSName(fsname.to_string()),
        // Passed to the kernel (not to fusermount) so /proc/mounts says fuse.labfs.
        MountOption::CUSTOM("subtype=labfs".to_string()),
        MountOption::DefaultPermissions,
    ];
    for o in extra {
        c.mount_options.push(mount_option(o));
    }
    c.acl = SessionACL::All;
    let cpus = thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    c.n_threads = Some((cpus * 2).clamp(4, 16));
    c.clone_fd = true;
    c
}

/// Mount and serve until the kernel ends the session. `ready` is called once the
/// kernel has the mount, before any request is served.
///
/// fuser would unmount the path when the session ends, whatever is mounted there by
/// then (after `umount /lab` and a new mount, the new daemon's): its mount handle is
/// never dropped, and the daemon unmounts only its own mount (`daemon::OwnMount`).
pub fn serve(
    fs: Arc<LabFs>,
    mountpoint: &Path,
    fsname: &str,
    extra: &[String],
    ready: impl FnOnce(),
) -> std::io::Result<()> {
    let configured =
        ring::configured(ring::configured_transport()).map_err(std::io::Error::other)?;
    let state = Arc::new(ring::TransportState::new(configured).map_err(std::io::Error::other)?);
    let _ = ring::STATE.set(state.clone());
    let mut config = session_config(fsname, extra);
    if state.want {
        config.io_uring_queue_depth = Some(ring::QUEUE_DEPTH);
    }
    let fuse = LabFuse::new(fs.clone());
    let session = fuser::Session::new(fuse, mountpoint, &config)?;
    let _ = state.stats.set(session.transport_stats());
    let r = state.report();
    info!("FUSE transport: {} ({})", r.in_use, r.why);
    let notifier = session.notifier();
    fs.set_invalidator(Box::new(move |what| {
        let r = match what {
            Invalidate::Inode(ino) => notifier.inval_inode(INodeNo(ino), 0, 0),
            Invalidate::Entry { parent, name } => notifier.inval_entry(INodeNo(parent), &name),
        };
        if let Err(e) = r {
            debug!("kernel cache invalidation: {e}");
        }
    }));
    ready();
    let background = std::mem::ManuallyDrop::new(session.spawn()?);
    // SAFETY: `background` is never dropped nor used again, so its join handle is
    // moved out exactly once; the rest (the mount handle that would unmount the path
    // on drop) is deliberately leaked until the process exits.
    let thread = unsafe { std::ptr::read(&background.guard) };
    thread
        .join()
        .map_err(|_| std::io::Error::other("the FUSE session thread panicked"))?
}
