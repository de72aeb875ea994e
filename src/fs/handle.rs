//! Open file and directory handles.
//!
//! Handle lifetime: `open`/`create` make a [`FileHandle`] holding the backend file
//! descriptor, `release` drops it; `opendir` (or the first READDIR) snapshots the
//! union listing of the directory into a [`DirHandle`] (so offsets stay valid while
//! entries come and go), a rewind to offset 0 takes it again, `releasedir` drops it. Handles record the backend they were opened on: an open
//! file keeps reading and writing the object it opened even if it is promoted
//! meanwhile. Writers are counted per inode so `promote` can refuse files that are
//! still being written.
//!
//! Descriptors: once the kernel serves an open file by passthrough (the adapter
//! registered its descriptor as a backing file and sent the open reply with it), the
//! kernel holds its own reference to the backing file and the daemon closes its
//! descriptor ([`Handles::drop_descriptor`]): a caller holding many files open costs
//! the daemon's descriptor table nothing. The handle keeps what it needs to reach the
//! object again: the inode, the object's (dev, ino), the open's status flags and who
//! opened it. The few requests the kernel still sends for such a file (fsync,
//! fallocate, lseek SEEK_DATA/SEEK_HOLE, copy_file_range, ioctl, ftruncate, flush)
//! open the object again from the inode's identity for that request only
//! ([`LabFs::handle_fd`]). A handle the kernel does not pass through (Atlas on NFS,
//! `[atlas] file_io = "daemon"`, no kernel passthrough) keeps its descriptor, and
//! only those count against the per-uid budget ([`super::budget`]).

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use parking_lot::Mutex;

use super::attr::{EntryOut, Kind};
use super::backend::{cstring, fstat, fstatat, Creds};
use super::object::{join, proc_fd_path, ObjFd};
use super::{key_of, Ctx, LabFs, ROOT_INO};
use crate::error::{Error, Result};
use crate::rules::{BackendKind, Class};

pub struct FileHandle {
    pub ino: u64,
    pub backend: BackendKind,
    pub writable: bool,
    /// The daemon's descriptor of the opened object; `None` once the kernel serves the
    /// file by passthrough. Shared, so a request using it keeps it open until it is
    /// done even if the handle drops it meanwhile (a closed number could be reused).
    fd: Mutex<Option<Arc<OwnedFd>>>,
    /// `(st_dev, st_ino)` of the opened object: a descriptor opened again must be of it.
    pub object: (u64, u64),
    /// The open's status flags (O_APPEND, O_DIRECT, O_SYNC, ...) for a descriptor
    /// opened again.
    status: i32,
    /// Who opened it: a descriptor is opened again as them.
    opener: Creds,
}

impl FileHandle {
    /// The daemon's own descriptor, while it holds one.
    pub fn held(&self) -> Option<Arc<OwnedFd>> {
        self.fd.lock().clone()
    }
}

/// What a request needs of an open file's descriptor (see [`LabFs::handle_fd`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// The object itself (fstat, chmod through `/proc/self/fd`): an O_PATH descriptor
    /// will do.
    Path,
    /// A descriptor open for reading: fsync, lseek, ioctl, the source of a copy.
    Read,
    /// A descriptor open for writing: fallocate, ftruncate, the target of a copy.
    Write,
}

/// A descriptor of an open file's object for one request: the handle's own, or one
/// opened again from the inode's identity (closed when the request is done).
pub enum HandleFd {
    Held(Arc<OwnedFd>),
    Fresh(OwnedFd),
    Path(ObjFd),
}

impl AsRawFd for HandleFd {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            HandleFd::Held(f) => f.as_raw_fd(),
            HandleFd::Fresh(f) => f.as_raw_fd(),
            HandleFd::Path(f) => f.as_raw_fd(),
        }
    }
}

impl AsFd for HandleFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            HandleFd::Held(f) => f.as_fd(),
            HandleFd::Fresh(f) => f.as_fd(),
            HandleFd::Path(ObjFd::Owned(f)) => f.as_fd(),
            HandleFd::Path(ObjFd::Held(f)) => f.as_fd(),
        }
    }
}

/// Status flags an open keeps for a descriptor opened again.
const STATUS_FLAGS: i32 =
    libc::O_APPEND | libc::O_DIRECT | libc::O_SYNC | libc::O_DSYNC | libc::O_NOATIME;

/// One entry of a directory snapshot.
pub struct DirItem {
    pub name: OsString,
    pub kind: Option<Kind>,
    /// The backend's `d_ino` (0 for `.` and `..`): with the part's device, the inode
    /// number a plain READDIR reports without a stat.
    pub dino: u64,
    /// Which backend listing it came from (None for `.` and `..`).
    pub from: Option<BackendKind>,
}

pub struct DirHandle {
    pub ino: u64,
    pub items: Vec<DirItem>,
    /// O_PATH descriptors of the directory on each backend it was listed from, with
    /// the device the part is on.
    pub dirs: Vec<(BackendKind, ObjFd, u64)>,
    /// False until the first READDIR(PLUS) of a lazily listed handle.
    pub listed: bool,
    /// A READDIR(PLUS) of this handle has handed out entries: one at offset 0 after
    /// that is a rewind (`rewinddir`, `lseek(fd, 0)`), which lists the directory anew.
    pub read: bool,
    /// A directory with an Atlas part whose every part shows the same version as at
    /// the previous opendir (and the rules are the same): the kernel may list it from
    /// its cache (close-to-open, as for files).
    pub keep_cache: bool,
}

/// What a file looked like on Atlas when it was last opened (close-to-open caching):
/// the object and its size and change times. The kernel keeps the page cache of a
/// file across opens only while the next open finds the same version; any change,
/// by this node or another, makes the kernel drop it at that open.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Version {
    dev: u64,
    ino: u64,
    size: i64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Version {
    pub fn of(st: &libc::stat) -> Version {
        Version {
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size,
            mtime: (st.st_mtime, st.st_mtime_nsec),
            ctime: (st.st_ctime, st.st_ctime_nsec),
        }
    }
}

#[derive(Default)]
pub struct Handles {
    files: DashMap<u64, Arc<FileHandle>>,
    dirs: DashMap<u64, Arc<Mutex<DirHandle>>>,
    writers: DashMap<u64, u32>,
    /// Atlas files: the version seen at the last open, by inode (close-to-open).
    versions: DashMap<u64, Version>,
    /// Directories with an Atlas part: the rules and each listed part's version at
    /// the last opendir.
    /// (A `Weak` keeps the `Live` allocation, so its address is not reused.)
    dir_versions: DashMap<u64, (std::sync::Weak<super::Live>, Vec<Version>)>,
    next: AtomicU64,
    /// Open files per uid ([`super::budget`]).
    pub budget: super::budget::OpenBudget,
}

impl Handles {
    pub fn file(&self, fh: u64) -> Option<Arc<FileHandle>> {
        self.files.get(&fh).map(|h| h.clone())
    }

    fn next(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn insert_file(&self, h: FileHandle) -> u64 {
        let fh = self.next();
        if h.writable {
            *self.writers.entry(h.ino).or_insert(0) += 1;
        }
        self.files.insert(fh, Arc::new(h));
        fh
    }

    pub fn remove_file(&self, fh: u64) -> Option<Arc<FileHandle>> {
        self.budget.give_back(fh);
        let (_, h) = self.files.remove(&fh)?;
        if h.writable {
            self.writers.remove_if_mut(&h.ino, |_, n| {
                *n -= 1;
                *n == 0
            });
        }
        Some(h)
    }

    /// The kernel serves handle `fh` by passthrough and holds its own reference to the
    /// backing file: close the daemon's descriptor (a request using it right now keeps
    /// it until it is done) and give the handle's count back to its uid's budget.
    pub fn drop_descriptor(&self, fh: u64) {
        let Some(h) = self.file(fh) else { return };
        if h.fd.lock().take().is_some() {
            self.budget.give_back(fh);
        }
    }

    /// `(st_dev, st_ino)` of every file open through the mount (whether or not the
    /// daemon holds its descriptor).
    pub fn open_objects(&self) -> HashSet<(u64, u64)> {
        self.files.iter().map(|h| h.object).collect()
    }

    /// Number of handles open for writing on `ino`.
    pub fn writers_of(&self, ino: u64) -> u32 {
        self.writers.get(&ino).map(|n| *n).unwrap_or(0)
    }

    pub fn open_files(&self) -> usize {
        self.files.len()
    }

    /// Record `v` as the version of `ino` at this open; true when the previous open
    /// saw the same version (the kernel's cached pages are still Atlas's content).
    pub fn same_version(&self, ino: u64, v: Version) -> bool {
        self.versions.insert(ino, v) == Some(v)
    }

    pub fn has_version(&self, ino: u64) -> bool {
        self.versions.contains_key(&ino) || self.dir_versions.contains_key(&ino)
    }

    /// The kernel forgot the inode, and its page cache with it.
    pub fn forget_version(&self, ino: u64) {
        self.versions.remove(&ino);
        self.dir_versions.remove(&ino);
    }

    /// Record the versions of the parts of directory `ino`, listed under the rules
    /// `live`; true when the previous opendir saw the same. A part that cannot be
    /// stat'ed counts as changed.
    fn same_dir_version(
        &self,
        ino: u64,
        live: &Arc<super::Live>,
        versions: Vec<Option<Version>>,
    ) -> bool {
        let Some(vs) = versions.into_iter().collect::<Option<Vec<Version>>>() else {
            self.dir_versions.remove(&ino);
            return false;
        };
        // The rules decide what a listing shows: a reload makes a new `Live`.
        let prev = self
            .dir_versions
            .insert(ino, (Arc::downgrade(live), vs.clone()));
        prev.is_some_and(|(w, p)| std::ptr::eq(w.as_ptr(), Arc::as_ptr(live)) && p == vs)
    }
}

/// What `open`/`create` hand back to the adapter.
pub struct Opened {
    pub fh: u64,
    /// The kernel may serve this open by passthrough: the adapter registers the
    /// handle's descriptor as the backing file ([`FileHandle::held`]).
    pub passthrough: bool,
    pub backend: BackendKind,
    /// close(2) of the file can report nothing a FLUSH would add (a local
    /// filesystem): the kernel may skip FLUSH (FOPEN_NOFLUSH).
    pub noflush: bool,
    /// The kernel may keep the file's cached pages: labfs is the only writer (local),
    /// or Atlas shows the same version as at the previous open (close-to-open).
    pub keep_cache: bool,
    /// `create` made a new file (it did not open one that existed already).
    pub created: bool,
}

/// A directory entry for readdir(plus).
pub struct DirEntryOut {
    pub name: OsString,
    pub offset: u64,
    pub kind: Kind,
    pub ino: u64,
    /// With readdirplus: the entry handed to the kernel (counted as a lookup).
    pub entry: Option<EntryOut>,
}

fn io(e: rustix::io::Errno) -> Error {
    Error::Io(e.into())
}

/// close(2) with its result, which std and rustix drop (NFS reports deferred write
/// errors there).
fn check_close(fd: OwnedFd) -> Result<()> {
    Ok(crate::sys::close(fd)?)
}

impl LabFs {
    fn file(&self, fh: u64) -> Result<Arc<FileHandle>> {
        self.handles.file(fh).ok_or(Error::Errno(libc::EBADF))
    }

    pub(crate) fn wants_write(flags: i32) -> bool {
        flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0
    }

    pub fn open(&self, ctx: &Ctx, ino: u64, flags: i32) -> Result<Opened> {
        let creds = self.creds(ctx);
        if Self::wants_write(flags) {
            self.check_writable_ino(ctx, ino)?;
        }
        let (kind, obj) = self.obj(ino)?;
        let permit = self.handles.budget.take(ctx.uid)?;
        let fd = {
            let _as = creds.assume()?;
            super::object::reopen(&obj, flags)?
        };
        let opened = self.new_file_handle(ino, fd, kind, flags, &creds);
        permit.bind(opened.fh);
        Ok(opened)
    }

    /// A handle for `fd`, opened with `flags` by `opener`.
    pub(crate) fn new_file_handle(
        &self,
        ino: u64,
        fd: OwnedFd,
        backend: BackendKind,
        flags: i32,
        opener: &Creds,
    ) -> Opened {
        let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
        // A descriptor that cannot be stat'ed (an NFS error) keeps the daemon path:
        // without the object's identity it could not be opened again.
        let st = fstat(fd.as_raw_fd()).ok();
        // Atlas: only where the backend bounds its own failures, or when forced
        // (src/fs/atlas_io.rs); otherwise every read and write passes the watchdog.
        let passthrough =
            st.is_some() && (backend == BackendKind::Local || self.atlas_passthrough());
        // Close-to-open: the NFS client revalidated the attributes at this open, so an
        // unchanged version means no one changed the file since the previous open.
        let keep_cache = match (backend, &st) {
            (BackendKind::Local, _) => true,
            (BackendKind::Atlas, Some(st)) => self.handles.same_version(ino, Version::of(st)),
            (BackendKind::Atlas, None) => false,
        };
        let fh = self.handles.insert_file(FileHandle {
            ino,
            backend,
            writable,
            fd: Mutex::new(Some(Arc::new(fd))),
            object: st.map_or((0, 0), |st| (st.st_dev, st.st_ino)),
            status: flags & STATUS_FLAGS,
            opener: Creds {
                umask: 0,
                ..opener.clone()
            },
        });
        Opened {
            fh,
            passthrough,
            backend,
            noflush: backend == BackendKind::Local || !self.atlas_io.close_reports_errors(),
            keep_cache,
            created: false,
        }
    }

    /// A descriptor of open file `h`'s object for one request: the handle's own while
    /// the daemon holds it; else the object opened again from the inode's identity,
    /// as `need` says, and checked to be the object the handle opened (ESTALE if not).
    ///
    /// Opened again as the opener, then, where their rights changed since the open
    /// (a chmod after open: EACCES, EPERM), as the daemon: a held descriptor would
    /// still have the access it was opened with, and the access mode asked for is
    /// never more than the handle's (Write only for requests the kernel sends on a
    /// handle open for writing: it refuses fallocate and ftruncate on others).
    pub(crate) fn handle_fd(&self, h: &FileHandle, need: Need) -> Result<HandleFd> {
        if let Some(fd) = h.held() {
            return Ok(HandleFd::Held(fd));
        }
        let (kind, obj) = self.obj(h.ino)?;
        let st = fstat(obj.as_raw_fd())?;
        if kind != h.backend || (st.st_dev, st.st_ino) != h.object {
            tracing::debug!(ino = h.ino, "open file's object is no longer the inode's");
            return Err(Error::Stale);
        }
        let access = match need {
            Need::Path => return Ok(HandleFd::Path(obj)),
            Need::Read => libc::O_RDONLY,
            Need::Write if !h.writable => return Err(Error::Errno(libc::EBADF)),
            Need::Write => libc::O_WRONLY,
        };
        let flags = access | h.status;
        let first = {
            let _as = h.opener.assume()?;
            super::object::reopen(&obj, flags)
        };
        let fd = match first {
            Err(e) if matches!(e.errno(), libc::EACCES | libc::EPERM) && !h.opener.is_root() => {
                let _root = Creds::root().assume()?;
                super::object::reopen(&obj, flags)?
            }
            r => r?,
        };
        Ok(HandleFd::Fresh(fd))
    }

    /// The kernel asks labfs to drop setuid/setgid before a write by someone without
    /// CAP_FSETID (FUSE_HANDLE_KILLPRIV_V2): labfs writes as root, whose writes would
    /// keep them, so it clears them itself.
    pub fn kill_suid_sgid(&self, fh: u64) {
        let Some(fd) = self
            .handles
            .file(fh)
            .and_then(|h| self.handle_fd(&h, Need::Path).ok())
        else {
            return;
        };
        let Ok(st) = fstat(fd.as_raw_fd()) else {
            return;
        };
        let mode = st.st_mode & 0o7777;
        let mut new = mode & !libc::S_ISUID;
        // setgid without group execute is mandatory locking, not a privilege.
        if mode & libc::S_IXGRP != 0 {
            new &= !libc::S_ISGID;
        }
        if new != mode {
            // Without root's identity the bits stay: the write itself went through
            // and the failure is logged by assume's error. The object is named through
            // `/proc/self/fd`, which works for an O_PATH descriptor too.
            if let Ok(_root) = Creds::root().assume() {
                let _ = rustix::fs::chmod(
                    proc_fd_path(fd.as_raw_fd()).as_c_str(),
                    rustix::fs::Mode::from_raw_mode(new),
                );
            }
        }
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        let h = self.file(fh)?;
        let fd = self.handle_fd(&h, Need::Read)?;
        let mut buf = vec![0u8; size as usize];
        let mut done = 0usize;
        while done < buf.len() {
            match rustix::io::pread(&fd, &mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(io(e)),
            }
        }
        buf.truncate(done);
        Ok(buf)
    }

    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32> {
        let h = self.file(fh)?;
        let fd = self.handle_fd(&h, Need::Write)?;
        let mut done = 0usize;
        while done < data.len() {
            match rustix::io::pwrite(&fd, &data[done..], offset + done as u64) {
                Ok(n) => done += n,
                Err(rustix::io::Errno::INTR) => continue,
                // A short write: the caller is told what was written.
                Err(_) if done > 0 => break,
                Err(e) => return Err(io(e)),
            }
        }
        Ok(done as u32)
    }

    /// close(2) of one of the caller's descriptors: report deferred write errors
    /// (NFS reports them at close) by closing a duplicate.
    ///
    /// Files on a local filesystem (the SSD, Atlas on ext4 and the like) ask for no
    /// FLUSH ([`Opened::noflush`]). A handle whose descriptor the daemon dropped
    /// (passthrough forced onto NFS) and that is open for writing closes a descriptor
    /// opened for writing now: its close writes the inode's dirty pages back and
    /// reports what fails (the pages belong to the inode, not to a descriptor); a file
    /// open only for reading has nothing to report.
    pub fn flush(&self, fh: u64) -> Result<()> {
        let h = self.file(fh)?;
        let fd = match h.held() {
            Some(fd) => rustix::io::dup(&*fd).map_err(io)?,
            None if !h.writable => return Ok(()),
            None => match self.handle_fd(&h, Need::Write)? {
                HandleFd::Fresh(fd) => fd,
                other => rustix::io::dup(&other).map_err(io)?,
            },
        };
        // std's close ignores close(2)'s result: that result is the point here.
        check_close(fd)
    }

    pub fn release(&self, fh: u64) {
        self.handles.remove_file(fh);
    }

    /// fsync(2)/fdatasync(2). On a descriptor opened again (the daemon dropped its
    /// own for passthrough) this flushes the same data: Linux syncs per inode, not per
    /// descriptor (the filesystem writes back the inode's dirty pages, whoever dirtied
    /// them, and commits its metadata), and a writeback error no descriptor has seen
    /// yet is reported to a descriptor opened after it (errseq_sample), so it is not
    /// lost by the reopen.
    pub fn fsync(&self, fh: u64, datasync: bool) -> Result<()> {
        let h = self.file(fh)?;
        let fd = self.handle_fd(&h, Need::Read)?;
        if datasync {
            rustix::fs::fdatasync(&fd).map_err(io)
        } else {
            rustix::fs::fsync(&fd).map_err(io)
        }
    }

    pub fn fallocate(&self, ctx: &Ctx, fh: u64, offset: u64, length: u64, mode: i32) -> Result<()> {
        let h = self.file(fh)?;
        let fd = self.handle_fd(&h, Need::Write)?;
        let creds = self.creds(ctx);
        let _as = creds.assume()?;
        let flags = rustix::fs::FallocateFlags::from_bits_retain(mode as u32);
        rustix::fs::fallocate(&fd, flags, offset, length).map_err(io)
    }

    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> Result<i64> {
        use rustix::fs::SeekFrom;
        let h = self.file(fh)?;
        let fd = self.handle_fd(&h, Need::Read)?;
        // labfs does positioned I/O, so the descriptor's offset is free to move.
        let from = match whence {
            libc::SEEK_SET => SeekFrom::Start(offset as u64),
            libc::SEEK_CUR => SeekFrom::Current(offset),
            libc::SEEK_END => SeekFrom::End(offset),
            libc::SEEK_DATA => SeekFrom::Data(offset as u64),
            libc::SEEK_HOLE => SeekFrom::Hole(offset as u64),
            _ => return Err(Error::Errno(libc::EINVAL)),
        };
        Ok(rustix::fs::seek(&fd, from).map_err(io)? as i64)
    }

    /// copy_file_range between two open files; across filesystems, a bounded copy.
    pub fn copy_file_range(
        &self,
        fh_in: u64,
        off_in: u64,
        fh_out: u64,
        off_out: u64,
        len: u64,
    ) -> Result<u32> {
        let hi = self.file(fh_in)?;
        let ho = self.file(fh_out)?;
        let (fi, fo) = (
            self.handle_fd(&hi, Need::Read)?,
            self.handle_fd(&ho, Need::Write)?,
        );
        let len = len.min(u32::MAX as u64 & !0xfff) as usize;
        let (mut oi, mut oo) = (off_in, off_out);
        match rustix::fs::copy_file_range(&fi, Some(&mut oi), &fo, Some(&mut oo), len) {
            Ok(n) => Ok(n as u32),
            Err(
                rustix::io::Errno::XDEV
                | rustix::io::Errno::OPNOTSUPP
                | rustix::io::Errno::INVAL
                | rustix::io::Errno::NOSYS,
            ) => {
                // Different filesystems underneath: copy a bounded chunk by hand.
                let chunk = len.min(1 << 20);
                let data = self.read(fh_in, off_in, chunk as u32)?;
                if data.is_empty() {
                    return Ok(0);
                }
                self.write(fh_out, off_out, &data)
            }
            Err(e) => Err(io(e)),
        }
    }

    // ---- directories ----

    /// A directory only labfs writes (local, nothing of it on Atlas) is listed at the
    /// first READDIR(PLUS) of the handle, not here: its listing is usually in the
    /// kernel's cache, which then sends no READDIR at all. Other directories are listed
    /// at once, so that while Atlas hangs their local part can still be listed by the
    /// opendir fallback.
    pub fn opendir(&self, ctx: &Ctx, ino: u64) -> Result<u64> {
        let dh = if self.dir_is_local_only(ino) {
            // Still resolved now: a directory swapped for something else behind labfs's
            // back fails here, as it did when the listing was taken here. Held while
            // open, so that a directory removed meanwhile still answers fstat, fsync
            // and readdir on the descriptor (its handle resolves while it is held).
            let creds = self.creds(ctx);
            let held = self.dir_on(&creds, ino, BackendKind::Local)?;
            DirHandle {
                ino,
                items: Vec::new(),
                // The device is taken with the listing, at the first READDIR.
                dirs: vec![(BackendKind::Local, held, 0)],
                listed: false,
                read: false,
                keep_cache: false,
            }
        } else {
            self.list_union(ctx, ino, true)?
        };
        let fh = self.handles.next();
        self.handles.dirs.insert(fh, Arc::new(Mutex::new(dh)));
        Ok(fh)
    }

    /// The union listing of directory `ino` (`.` and `..` first).
    fn list_union(&self, ctx: &Ctx, ino: u64, lazy: bool) -> Result<DirHandle> {
        let creds = self.creds(ctx);
        let path = self.npath_of(ino)?;
        let live = self.live();
        let p = live.rules.resolve(&path);
        let primary = self.backend_of(ino).unwrap_or_else(|| p.backend());
        // Open every part first; their versions are taken before anything is listed, so
        // a change made while listing shows as a change at the next opendir.
        let mut parts = Vec::new();
        let mut versions = Vec::new();
        for b in [primary, primary.other()] {
            let wanted = b == primary
                || live.rules.may_place_below(&path, b)
                || (b == BackendKind::Atlas && p.class == Class::Transitional);
            if !wanted {
                continue;
            }
            if b != primary && b == BackendKind::Atlas && self.health.is_stalled() {
                // Listing the local part must not wait for a stalled or hung Atlas,
                // but a listing known to miss promoted entries is an error, not a
                // shorter list (a sync tool would delete what it does not see).
                if self.has_known_atlas_children(&path) {
                    return Err(Error::Errno(libc::ETIMEDOUT));
                }
                continue;
            }
            self.atlas_gate(b, &path)?;
            let dfd = match self.dir_on(&creds, ino, b) {
                Ok(fd) => fd,
                Err(e)
                    if b != primary
                        && (e.errno() == libc::ENOENT || e.errno() == libc::ENOTDIR) =>
                {
                    continue
                }
                Err(e) => return Err(e),
            };
            let st = super::backend::fstat(dfd.as_raw_fd()).ok();
            versions.push(st.as_ref().map(Version::of));
            parts.push((b, dfd, st.map_or(0, |st| st.st_dev)));
        }
        let keep_cache = parts.iter().any(|(b, _, _)| *b == BackendKind::Atlas)
            && self.handles.same_dir_version(ino, &live, versions);
        if keep_cache && lazy {
            // The kernel lists it from its cache; a READDIR, if one comes, lists it then.
            // The parts stay held, as for a listed handle (a removed directory's
            // descriptor keeps answering).
            return Ok(DirHandle {
                ino,
                items: Vec::new(),
                dirs: parts,
                listed: false,
                read: false,
                keep_cache,
            });
        }
        let mut items = vec![
            DirItem {
                name: ".".into(),
                kind: Some(Kind::Dir),
                dino: 0,
                from: None,
            },
            DirItem {
                name: "..".into(),
                kind: Some(Kind::Dir),
                dino: 0,
                from: None,
            },
        ];
        let mut dirs = Vec::new();
        // Names already listed from another part (only a union of two parts needs it).
        let mut seen = std::collections::HashSet::new();
        let union = parts.len() > 1;
        for (b, dfd, dev) in parts {
            let names = {
                let _as = creds.assume()?;
                list_dir_inos(super::object::reopen(
                    &dfd,
                    libc::O_RDONLY | libc::O_DIRECTORY,
                )?)?
            };
            // When the rules put this directory and everything below it on this part's
            // backend, every name is visible: no rule lookup per entry.
            let all_visible = live.rules.uniform_backend(&path) == Some(b);
            items.reserve(names.len());
            for (name, dtype, dino) in names {
                let nb = name.as_bytes();
                if nb == b"." || nb == b".." || (union && seen.contains(&name)) {
                    continue;
                }
                if ino == ROOT_INO && nb == b".labfs" {
                    continue; // labfs's own state on a backend root
                }
                if b == BackendKind::Atlas && crate::atlas_id::is_nfs_silly_rename(nb) {
                    continue; // the NFS client's name for an unlinked file still open
                }
                let visible = all_visible || {
                    let child = join(&path, &name);
                    let cp = live.rules.resolve(&child);
                    // A tag that cannot be read fails the listing with its errno: a
                    // promoted entry is never silently left out (TagReader::is_promoted).
                    cp.backend() == b
                        || (b == BackendKind::Atlas
                            && cp.class == Class::Transitional
                            && self.tags.is_promoted(
                                &self.atlas,
                                dfd.as_raw_fd(),
                                &cstring(&name)?,
                                &child,
                            )?)
                };
                if !visible {
                    continue;
                }
                if union {
                    seen.insert(name.clone());
                }
                items.push(DirItem {
                    name,
                    kind: Kind::from_dtype(dtype),
                    dino,
                    from: Some(b),
                });
            }
            dirs.push((b, dfd, dev));
        }
        Ok(DirHandle {
            ino,
            items,
            dirs,
            listed: true,
            read: false,
            keep_cache,
        })
    }

    /// Whether the kernel may list the opened directory `fh` from its cache.
    pub fn dir_keeps_cache(&self, fh: u64) -> bool {
        self.handles
            .dirs
            .get(&fh)
            .is_some_and(|d| d.lock().keep_cache)
    }

    /// Whether the entries of a listing of directory `ino` must be noted for outages
    /// ([`LabFs::note_entry`]): not when the rules put the directory and everything
    /// below it on Atlas, where no entry is transitional or on the way to a local path.
    pub fn listing_notes_entries(&self, ino: u64) -> bool {
        self.npath_of(ino).map_or(true, |p| {
            self.live().rules.uniform_backend(&p) != Some(BackendKind::Atlas)
        })
    }

    pub fn releasedir(&self, fh: u64) {
        self.handles.dirs.remove(&fh);
    }

    /// The entries from `offset` on that fit in `budget` bytes of the kernel's buffer.
    /// With `plus`, each returned entry (but `.` and `..`) counts as a lookup: the
    /// adapter forgets the ones the buffer had no room for after all ([`LabFs::forget`]).
    pub fn readdir(
        &self,
        ctx: &Ctx,
        fh: u64,
        offset: u64,
        plus: bool,
        budget: usize,
    ) -> Result<Vec<DirEntryOut>> {
        let dh = self
            .handles
            .dirs
            .get(&fh)
            .map(|d| d.clone())
            .ok_or(Error::Errno(libc::EBADF))?;
        let mut dh = dh.lock();
        // POSIX: after a rewind the stream shows the directory as it is now, not the
        // snapshot taken at opendir. The kernel sends no READDIR at all while its own
        // cached listing is valid, so this costs nothing on the cached path.
        if !dh.listed || (offset == 0 && dh.read) {
            *dh = self.list_union(ctx, dh.ino, false)?;
        }
        dh.read = true;
        let creds = self.creds(ctx);
        let parent_ino = self
            .inodes
            .get(dh.ino)
            .map(|n| n.parent)
            .unwrap_or(ROOT_INO);
        let mut out = Vec::new();
        let mut used = 0usize;
        // One buffer for every entry's NUL-terminated name (no CString per entry).
        let mut cbuf = Vec::with_capacity(256);
        // The caller's identity for the whole batch: one switch, not two per entry.
        let _as = creds.assume()?;
        for (i, item) in dh.items.iter().enumerate().skip(offset as usize) {
            // struct fuse_dirent is 24 bytes + name, padded to 8; fuse_direntplus adds
            // a 128-byte fuse_entry_out.
            let size = (24 + item.name.len()).next_multiple_of(8) + if plus { 128 } else { 0 };
            if used + size > budget {
                break;
            }
            used += size;
            let off = i as u64 + 1;
            let Some(from) = item.from else {
                let ino = if item.name == "." { dh.ino } else { parent_ino };
                out.push(DirEntryOut {
                    name: item.name.clone(),
                    offset: off,
                    kind: Kind::Dir,
                    ino,
                    entry: None,
                });
                continue;
            };
            let Some((dir, dev)) = dh
                .dirs
                .iter()
                .find(|(b, _, _)| *b == from)
                .map(|(_, f, d)| (f, *d))
            else {
                continue;
            };
            if !plus {
                if let (Some(kind), true) = (item.kind, item.dino != 0 && dev != 0) {
                    // A plain READDIR hands out names, types and numbers only: the
                    // backend's d_ino on the part's device gives the number the entry
                    // has (or will get at its lookup), with no stat. As natively, a
                    // mount point below a backend shows the d_ino of the directory
                    // it covers.
                    out.push(self.name_only(item, off, kind, (from, dev), 0));
                    continue;
                }
            }
            cbuf.clear();
            cbuf.extend_from_slice(item.name.as_bytes());
            cbuf.push(0);
            let Ok(cname) = std::ffi::CStr::from_bytes_with_nul(&cbuf) else {
                continue; // a NUL inside a name: no backend lists one
            };
            match self.dir_entry(&creds, dh.ino, item, (from, dir, dev), cname, plus) {
                Ok((kind, ino, entry)) => out.push(DirEntryOut {
                    name: item.name.clone(),
                    offset: off,
                    kind,
                    ino,
                    entry,
                }),
                // Gone since the listing was taken: left out, as natively.
                Err(e) if e.errno() == libc::ENOENT => continue,
                // A directory the caller may read but not search: as natively, the
                // names are listed (with the backend's type and a number, no
                // attributes) and each access to one answers EACCES at its lookup.
                Err(e) if e.errno() == libc::EACCES && item.dino != 0 => {
                    let kind = item.kind.unwrap_or(Kind::File);
                    out.push(self.name_only(item, off, kind, (from, dev), item.dino));
                }
                // Any other failure (EIO or ESTALE from an NFS Atlas) ends the batch: the
                // entries before it go out, and the next request, starting at this name,
                // fails with the error. A listing never silently misses a name.
                Err(e) if out.is_empty() => return Err(e),
                Err(_) => break,
            }
        }
        Ok(out)
    }

    /// A listed name without attributes: its type and the number its backend's `d_ino`
    /// on `dev` has (or will get at its lookup), `unknown` if the inode table has none.
    fn name_only(
        &self,
        item: &DirItem,
        offset: u64,
        kind: Kind,
        (backend, dev): (BackendKind, u64),
        unknown: u64,
    ) -> DirEntryOut {
        let key = super::BackingKey {
            backend,
            dev,
            ino: item.dino,
        };
        DirEntryOut {
            name: item.name.clone(),
            offset,
            kind,
            ino: self.inodes.number(&key).unwrap_or(unknown),
            entry: None,
        }
    }

    /// The type, number and (with `plus`) entry of one listed name, looked up in the
    /// part `dir` (on device `dev`) of directory `parent`, as the caller (whose
    /// identity the batch holds).
    fn dir_entry(
        &self,
        creds: &Creds,
        parent: u64,
        item: &DirItem,
        (from, dir, dev): (BackendKind, &ObjFd, u64),
        cname: &std::ffi::CStr,
        plus: bool,
    ) -> Result<(Kind, u64, Option<EntryOut>)> {
        if plus && item.dino != 0 && dev != 0 {
            let listed = super::BackingKey {
                backend: from,
                dev,
                ino: item.dino,
            };
            if self.inodes.peek(&listed).is_none() {
                // No inode holds the object listed under this name (a cold cache): its
                // O_PATH open, needed to remember it, also gives the stat, so the name
                // is looked up once, not twice. If the name now holds another object,
                // the open finds that one.
                let (fd, st) = super::object::open_child(dir, cname)?;
                let entry =
                    self.entry_fd(parent, &item.name, from, fd.as_raw_fd(), &st, Some(fd))?;
                return Ok((Kind::from_mode(st.st_mode), entry.attr.ino, Some(entry)));
            }
        }
        let st = fstatat(dir.as_raw_fd(), cname)?;
        let kind = Kind::from_mode(st.st_mode);
        if plus {
            let entry = self.entry_in(creds, parent, &item.name, from, (dir, cname, &st))?;
            return Ok((kind, entry.attr.ino, Some(entry)));
        }
        let key = key_of(from, &st);
        let ino = self
            .inodes
            .peek(&key)
            .or_else(|| self.inodes.number(&key))
            .unwrap_or(0);
        Ok((kind, ino, None))
    }

    pub fn fsyncdir(&self, ctx: &Ctx, ino: u64) -> Result<()> {
        let creds = self.creds(ctx);
        let (_, obj) = self.obj(ino)?;
        let _as = creds.assume()?;
        let fd = super::object::reopen(&obj, libc::O_RDONLY | libc::O_DIRECTORY)?;
        rustix::fs::fsync(&fd).map_err(io)
    }
}

/// Names and d_types of a directory (consumes the descriptor).
pub fn list_dir(fd: OwnedFd) -> Result<Vec<(OsString, u8)>> {
    Ok(list_dir_inos(fd)?
        .into_iter()
        .map(|(n, t, _)| (n, t))
        .collect())
}

/// Names, d_types and d_inos of a directory (consumes the descriptor).
pub fn list_dir_inos(fd: OwnedFd) -> Result<Vec<(OsString, u8, u64)>> {
    use std::mem::MaybeUninit;
    // getdents64 into one buffer, as readdir(3) does (32 KiB: glibc's for most
    // filesystems); every name fits in it.
    let mut buf = vec![MaybeUninit::<u8>::uninit(); 32 * 1024];
    let mut dir = rustix::fs::RawDir::new(&fd, &mut buf);
    let mut out = Vec::new();
    while let Some(ent) = dir.next() {
        let ent = match ent {
            Ok(e) => e,
            // getdents64 of a removed directory fails with ENOENT; like readdir(3),
            // that is the end of an empty listing (POSIX), not an error.
            Err(rustix::io::Errno::NOENT) => break,
            Err(e) => return Err(io(e)),
        };
        out.push((
            OsStr::from_bytes(ent.file_name().to_bytes()).to_os_string(),
            dtype(ent.file_type()),
            ent.ino(),
        ));
    }
    Ok(out)
}

/// The `d_type` of a rustix file type (DT_UNKNOWN for unknown).
fn dtype(t: rustix::fs::FileType) -> u8 {
    use rustix::fs::FileType as T;
    match t {
        T::RegularFile => libc::DT_REG,
        T::Directory => libc::DT_DIR,
        T::Symlink => libc::DT_LNK,
        T::Fifo => libc::DT_FIFO,
        T::Socket => libc::DT_SOCK,
        T::CharacterDevice => libc::DT_CHR,
        T::BlockDevice => libc::DT_BLK,
        _ => libc::DT_UNKNOWN,
    }
}
