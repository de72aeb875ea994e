//! Operations that change the namespace or an object's metadata.
//!
//! Each one: resolve the placement of every path it touches, refuse by rule where the
//! rules say so (EROFS, EACCES for unplaced, EXDEV across backends), make sure the
//! parent exists on the target backend (structural directories mirror the namespace's
//! own directory), then make the call as the caller, relative to the parent's
//! descriptor.

use std::ffi::{CString, OsStr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;

use rustix::fs::{self, AtFlags, Mode, OFlags};
use rustix::io::Errno;
use rustix::process::{Gid, Uid};

use super::backend::{cstring, fstat, fstatat, Creds};
use super::handle::{HandleFd, Need, Opened};
use super::object::{self, ObjFd};
use super::{Attr, Ctx, EntryOut, LabFs, SetAttr, ROOT_INO};
use crate::error::{Error, Result};
use crate::rules::BackendKind;

/// What a new entry will be.
pub enum NewNode<'a> {
    Dir { mode: u32 },
    Node { mode: u32, rdev: u64 },
    Symlink { target: &'a OsStr },
}

impl LabFs {
    /// Directory `parent` on `kind`, ready for a new entry at `path` (its child):
    /// created on that backend if the namespace directory so far existed only on the
    /// other one.
    fn parent_for_create(
        &self,
        creds: &Creds,
        parent: u64,
        kind: BackendKind,
        path: &OsStr,
    ) -> Result<ObjFd> {
        self.atlas_gate(kind, path)?;
        match self.dir_on(creds, parent, kind) {
            Ok(fd) => return Ok(fd),
            Err(e) if e.errno() == libc::ENOENT => {}
            Err(e) => return Err(e),
        }
        let (dir, _) = object::split(path);
        Ok(ObjFd::Owned(self.ensure_dirs(kind, dir)?))
    }

    /// Create every missing directory of namespace directory `dir` on `kind`, copying
    /// mode and ownership from the namespace's own directory of that name (wherever it
    /// lives). Runs with the daemon's identity: these are structural directories.
    fn ensure_dirs(&self, kind: BackendKind, dir: &OsStr) -> Result<OwnedFd> {
        let _root = Creds::root().assume()?;
        match self.open_dir_path(kind, dir) {
            Ok(fd) => return Ok(fd),
            Err(e) if e.errno() == libc::ENOENT => {}
            Err(e) => return Err(e),
        }
        let (parent, name) = object::split(dir);
        let pfd = self.ensure_dirs(kind, parent)?;
        let tmpl = self.locate(&Creds::root(), dir).ok().map(|l| l.stat);
        let mode = tmpl.map(|s| s.st_mode & 0o7777).unwrap_or(0o755);
        let cname = cstring(name)?;
        super::backend::mkdir_like(pfd.as_raw_fd(), &cname, mode, tmpl)?;
        self.open_dir_path(kind, dir)
    }

    fn new_entry(
        &self,
        ctx: &Ctx,
        parent: u64,
        name: &OsStr,
        umask: u32,
        what: NewNode<'_>,
    ) -> Result<EntryOut> {
        let path = self.child_npath(parent, name)?;
        let is_dir = matches!(what, NewNode::Dir { .. });
        let p = self.check_create(ctx, &path, is_dir)?;
        let kind = p.backend();
        let creds = self.creds_umask(ctx, umask);
        let pfd = self.parent_for_create(&creds, parent, kind, &path)?;
        let cname = cstring(name)?;
        let (fd, st) = {
            let _as = creds.assume()?;
            match what {
                NewNode::Dir { mode } => rx(fs::mkdirat(&pfd, &cname, Mode::from_raw_mode(mode)))?,
                NewNode::Node { mode, rdev } => rx(fs::mknodat(
                    &pfd,
                    &cname,
                    match mode & libc::S_IFMT {
                        0 => fs::FileType::RegularFile,
                        t => fs::FileType::from_raw_mode(t),
                    },
                    Mode::from_raw_mode(mode),
                    rdev,
                ))?,
                NewNode::Symlink { target } => {
                    rx(fs::symlinkat(cstring(target)?.as_c_str(), &pfd, &cname))?
                }
            };
            object::open_child(&pfd, &cname)?
        };
        let raw = fd.as_raw_fd();
        self.entry_fd(parent, name, kind, raw, &st, Some(fd))
    }

    pub fn mkdir(
        &self,
        ctx: &Ctx,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
    ) -> Result<EntryOut> {
        self.new_entry(ctx, parent, name, umask, NewNode::Dir { mode })
    }

    pub fn mknod(
        &self,
        ctx: &Ctx,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
    ) -> Result<EntryOut> {
        self.new_entry(
            ctx,
            parent,
            name,
            umask,
            NewNode::Node {
                mode,
                rdev: rdev as u64,
            },
        )
    }

    pub fn symlink(
        &self,
        ctx: &Ctx,
        parent: u64,
        name: &OsStr,
        target: &OsStr,
    ) -> Result<EntryOut> {
        self.new_entry(ctx, parent, name, 0, NewNode::Symlink { target })
    }

    pub fn create(
        &self,
        ctx: &Ctx,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
    ) -> Result<(EntryOut, Opened)> {
        let path = self.child_npath(parent, name)?;
        let p = self.check_create(ctx, &path, false)?;
        let kind = p.backend();
        let creds = self.creds_umask(ctx, umask);
        let pfd = self.parent_for_create(&creds, parent, kind, &path)?;
        let cname = cstring(name)?;
        let permit = self.handles.budget.take(ctx.uid)?;
        let created;
        let fd = {
            let _as = creds.assume()?;
            let f = (flags & !libc::O_NOCTTY) | libc::O_CREAT | libc::O_NOFOLLOW | libc::O_CLOEXEC;
            // Exclusive first, so labfs knows whether the file is new (the kernel may
            // send CREATE for a name another node created meanwhile); the caller's own
            // O_EXCL keeps its EEXIST.
            let open = |f: i32| {
                fs::openat(
                    &pfd,
                    &cname,
                    OFlags::from_bits_retain(f as u32),
                    Mode::from_raw_mode(mode),
                )
            };
            let mut fd = open(f | libc::O_EXCL);
            created = fd.is_ok();
            if flags & libc::O_EXCL == 0 && fd.as_ref().is_err_and(|e| *e == Errno::EXIST) {
                fd = open(f);
            }
            rx(fd)?
        };
        let st = fstat(fd.as_raw_fd())?;
        // On the local SSD (and a local-fs Atlas), an O_PATH descriptor of the new file for the requests that
        // follow (tar's setattrs, the first getattr) instead of a reopen by handle each.
        let path_fd = if self.caches_recent(kind) {
            let _as = creds.assume()?;
            object::open_child(&pfd, &cname)
                .ok()
                .filter(|(_, s)| (s.st_dev, s.st_ino) == (st.st_dev, st.st_ino))
                .map(|(f, _)| f)
        } else {
            None
        };
        let entry = self.entry_fd(parent, name, kind, fd.as_raw_fd(), &st, path_fd)?;
        let mut opened = self.new_file_handle(entry.attr.ino, fd, kind, flags, &creds);
        opened.created = created;
        permit.bind(opened.fh);
        Ok((entry, opened))
    }

    pub fn link(&self, ctx: &Ctx, ino: u64, newparent: u64, newname: &OsStr) -> Result<EntryOut> {
        let creds = self.creds(ctx);
        let dst = self.child_npath(newparent, newname)?;
        let p = self.check_create(ctx, &dst, false)?;
        // A new name is a new way to write the object: a read-only rule on any of its
        // names holds for it (else `ln /lab/media/song /lab/docs/song` would bypass it).
        self.check_writable_ino(ctx, ino)?;
        let (kind, src) = self.obj(ino)?;
        if p.backend() != kind {
            return Err(self.refused(Error::CrossBackend {
                from: self.npath_of(ino)?.to_string_lossy().into_owned(),
                to: dst.to_string_lossy().into_owned(),
                from_backend: kind.as_str(),
                to_backend: p.backend().as_str(),
            }));
        }
        let pfd = self.parent_for_create(&creds, newparent, kind, &dst)?;
        // Before the name exists: a read-only path among the object's names, or the new
        // one, is recorded on the object, so the rule holds however it is reached later.
        self.mark_read_only(Some(ino), &src, &dst, &p)?;
        let cname = cstring(newname)?;
        let st = {
            let _as = creds.assume()?;
            // linkat through /proc/self/fd/N links the object itself (AT_EMPTY_PATH would
            // need CAP_DAC_READ_SEARCH, which a thread acting as a user does not have).
            let from = src.proc_path();
            rx(fs::linkat(
                fs::CWD,
                &from,
                &pfd,
                &cname,
                AtFlags::SYMLINK_FOLLOW,
            ))?;
            fstatat(pfd.as_raw_fd(), &cname)?
        };
        self.entry_in(&creds, newparent, newname, kind, (&pfd, &cname, &st))
    }

    pub fn unlink(&self, ctx: &Ctx, parent: u64, name: &OsStr) -> Result<()> {
        self.remove(ctx, parent, name, false)
    }

    pub fn rmdir(&self, ctx: &Ctx, parent: u64, name: &OsStr) -> Result<()> {
        self.remove(ctx, parent, name, true)
    }

    fn remove(&self, ctx: &Ctx, parent: u64, name: &OsStr, dir: bool) -> Result<()> {
        let creds = self.creds(ctx);
        let (kind, f, placement, path) = self.find_child(&creds, parent, name)?;
        self.check_writable(ctx, &path, &placement)?;
        let known = self.inodes.peek(&super::key_of(kind, &f.stat));
        if dir {
            // The namespace directory is empty only if every backend's part is.
            let other = kind.other();
            // A transitional directory may also have a promoted part on Atlas.
            let promoted_part =
                other == BackendKind::Atlas && placement.class == crate::rules::Class::Transitional;
            if (self.live().rules.may_place_below(&path, other) || promoted_part)
                && !(other == BackendKind::Atlas && self.health.is_down())
            {
                if let Ok(odir) = self.dir_on(&creds, parent, other) {
                    let _as = creds.assume()?;
                    if let Ok(fd) = open_at(&odir, &f.cname, libc::O_RDONLY | libc::O_DIRECTORY) {
                        let names = super::handle::list_dir(fd)?;
                        if names.iter().any(|(n, _)| n != "." && n != "..") {
                            return Err(Error::Errno(libc::ENOTEMPTY));
                        }
                        // An empty structural directory goes with the namespace one (if
                        // this fails, the namespace directory's own removal says why).
                        let _ = fs::unlinkat(&odir, &f.cname, AtFlags::REMOVEDIR);
                    }
                }
            }
        }
        let last = dir || f.stat.st_nlink <= 1;
        let keep = match known {
            Some(ino) if last => {
                self.before_removal(&creds, (kind, ino), &f.dir, &f.cname, &f.stat)
            }
            _ => None,
        };
        {
            let _as = creds.assume()?;
            let flags = if dir {
                AtFlags::REMOVEDIR
            } else {
                AtFlags::empty()
            };
            rx(fs::unlinkat(&f.dir, &f.cname, flags))?;
        }
        if let Some(ino) = known {
            if last {
                self.removed(ino, keep);
            } else {
                self.inodes.unlinked(ino, parent, name);
            }
        }
        Ok(())
    }

    /// Before removing what may be the last name (`dir/name`, stat `st`) of the object
    /// the kernel holds as `ino`: a descriptor of it to keep it alive as the inode's
    /// backing until the kernel forgets it (a file handle of a removed object is
    /// stale). Its recent descriptor if it has one, else an O_PATH open of the name,
    /// taken only if it is the same object. `None` where nothing is to
    /// be held: the backend does not hold removed objects (NFS), the bound is reached,
    /// or the inode holds a descriptor for its life already (no file handles there).
    fn before_removal(
        &self,
        creds: &Creds,
        (kind, ino): (BackendKind, u64),
        dir: &impl AsFd,
        name: &CString,
        st: &libc::stat,
    ) -> Option<Arc<OwnedFd>> {
        if !self.holds_removed(kind) {
            return None;
        }
        let (_, backing, _) = self.inodes.backing(ino)?;
        if !matches!(backing, super::object::Backing::Handle(_)) || !self.inodes.may_hold() {
            return None;
        }
        if self.caches_recent(kind) {
            if let Some(fd) = self.inodes.recent_get(ino) {
                return Some(fd);
            }
        }
        let _as = creds.assume().ok()?;
        let (fd, now) = object::open_child(dir, name).ok()?;
        ((now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)).then(|| Arc::new(fd))
    }

    /// The object the kernel holds as `ino` lost its last name: it is kept alive by
    /// `keep` if there is one (else it answers ESTALE once the backend frees it).
    fn removed(&self, ino: u64, keep: Option<Arc<OwnedFd>>) {
        match keep {
            Some(fd) => {
                self.inodes.hold(ino, fd);
            }
            None => self.inodes.unbind(ino),
        }
    }

    /// Whether a rename of `path` stays on `backend` for the whole subtree.
    fn subtree_on(&self, path: &OsStr, is_dir: bool, backend: BackendKind) -> bool {
        let rules = self.live().rules.clone();
        if is_dir {
            rules.uniform_backend(path) == Some(backend)
        } else {
            rules.resolve(path).backend() == backend
        }
    }

    pub fn rename(
        &self,
        ctx: &Ctx,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> Result<()> {
        let creds = self.creds(ctx);
        let (kind, src, sp, from) = self.find_child(&creds, parent, name)?;
        self.check_writable(ctx, &from, &sp)?;
        let to = self.child_npath(newparent, newname)?;
        let is_dir = src.stat.st_mode & libc::S_IFMT == libc::S_IFDIR;
        let dp = self.check_create(ctx, &to, is_dir)?;
        let cross = |to_backend: BackendKind| Error::CrossBackend {
            from: from.to_string_lossy().into_owned(),
            to: to.to_string_lossy().into_owned(),
            from_backend: kind.as_str(),
            to_backend: to_backend.as_str(),
        };
        if dp.backend() != kind {
            return Err(self.refused(cross(dp.backend())));
        }
        if is_dir && (!self.subtree_on(&from, true, kind) || !self.subtree_on(&to, true, kind)) {
            // Part of the tree would change backend: let mv copy it path by path.
            return Err(self.refused(cross(kind.other())));
        }
        let dst_parent = self.parent_for_create(&creds, newparent, kind, &to)?;
        if dp.read_only && !is_dir && src.stat.st_nlink > 1 {
            // A file with further names moves under a read-only rule: record it on the
            // object, as link(2) does ([`super::ro_marker`]).
            let obj = {
                let _as = creds.assume()?;
                ObjFd::Owned(object::open_child(&src.dir, &src.cname)?.0)
            };
            let known = self.inodes.peek(&super::key_of(kind, &src.stat));
            self.mark_read_only(known, &obj, &to, &dp)?;
        }
        let dname = cstring(newname)?;
        let src_key = super::key_of(kind, &src.stat);
        // What the target was, so its number can be retired if this removes it, and
        // a descriptor to keep it alive if the kernel holds it (see `remove`).
        let replaced = {
            let replaced = {
                let _as = creds.assume()?;
                fstatat(dst_parent.as_raw_fd(), &dname).ok()
            };
            let keep = match replaced {
                Some(st) if flags & libc::RENAME_EXCHANGE == 0 => {
                    let k = super::key_of(kind, &st);
                    let last = st.st_nlink <= 1 || st.st_mode & libc::S_IFMT == libc::S_IFDIR;
                    match self.inodes.peek(&k) {
                        Some(old) if k != src_key && last => {
                            self.before_removal(&creds, (kind, old), &dst_parent, &dname, &st)
                        }
                        _ => None,
                    }
                }
                _ => None,
            };
            let _as = creds.assume()?;
            // The caller's flags are passed through (the backend refuses what it lacks).
            rx(fs::renameat_with(
                &src.dir,
                &src.cname,
                &dst_parent,
                &dname,
                fs::RenameFlags::from_bits_retain(flags),
            ))?;
            replaced.map(|st| (st, keep))
        };
        let src_ino = self.inodes.peek(&src_key);
        if flags & libc::RENAME_EXCHANGE != 0 {
            if let Some((st, _)) = replaced {
                if let Some(other) = self.inodes.peek(&super::key_of(kind, &st)) {
                    self.inodes.moved(other, (newparent, newname), parent, name);
                }
            }
        } else if let Some((st, keep)) = replaced {
            let k = super::key_of(kind, &st);
            if k != src_key {
                if let Some(old) = self.inodes.peek(&k) {
                    if st.st_nlink <= 1 || st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                        self.removed(old, keep);
                    } else {
                        self.inodes.unlinked(old, newparent, newname);
                    }
                }
            }
        }
        if let Some(ino) = src_ino {
            self.inodes.moved(ino, (parent, name), newparent, newname);
        }
        Ok(())
    }

    pub fn setattr(
        &self,
        ctx: &Ctx,
        ino: u64,
        set: &SetAttr,
    ) -> Result<(Attr, std::time::Duration)> {
        let creds = self.creds(ctx);
        if set.is_write() {
            self.check_writable_ino(ctx, ino)?;
        }
        // The kernel names a handle for ftruncate(2): truncate through it (an open for
        // writing keeps that right after a chmod), opened again if the daemon dropped
        // its descriptor (passthrough). Anything else is done on the object itself.
        let handle = match set.fh.and_then(|fh| self.handles.file(fh)) {
            Some(h) if set.size.is_some() => Some(self.handle_fd(&h, Need::Write)?),
            Some(h) => h.held().map(HandleFd::Held),
            None => None,
        };
        let (kind, obj) = self.obj(ino)?;
        let st0 = fstat(obj.as_raw_fd())?;
        let proc = obj.proc_path();
        let is_link = st0.st_mode & libc::S_IFMT == libc::S_IFLNK;
        if !set.is_write() {
            // With FUSE_HANDLE_KILLPRIV_V2 an otherwise empty setattr is the kernel's
            // "kill setuid/setgid" (FATTR_KILL_SUIDGID), sent before a write that goes
            // straight to the backing file (passthrough) by someone without
            // CAP_FSETID; the write itself runs with root's backing credentials.
            let mode = st0.st_mode & 0o7777;
            let mut new = mode & !libc::S_ISUID;
            if mode & libc::S_IXGRP != 0 {
                new &= !libc::S_ISGID;
            }
            if new != mode && st0.st_mode & libc::S_IFMT == libc::S_IFREG {
                let _root = Creds::root().assume()?;
                rx(fs::chmod(&proc, Mode::from_raw_mode(new)))?;
            }
        }
        let _as = creds.assume()?;
        if let Some(mode) = set.mode {
            if !is_link {
                let old = st0.st_mode & 0o7777;
                let new = mode & 0o7777;
                // The kernel clears setuid/setgid on a write by someone who does not own
                // the file (file_remove_privs, which skips the ownership check). Under
                // default_permissions it never sends a non-owner's plain chmod, so a
                // non-owner asking exactly for "the same mode minus those bits" is that
                // path, and the backend needs root's right to do it.
                let kill_priv = ctx.uid != 0
                    && ctx.uid != st0.st_uid
                    && new == old & !(libc::S_ISUID | libc::S_ISGID)
                    && new != old;
                let _root = kill_priv.then(|| Creds::root().assume()).transpose()?;
                match &handle {
                    Some(h) => rx(fs::fchmod(h, Mode::from_raw_mode(new)))?,
                    None => rx(fs::chmod(&proc, Mode::from_raw_mode(new)))?,
                };
            }
        }
        if set.uid.is_some() || set.gid.is_some() {
            rx(fs::chownat(
                &obj,
                c"",
                set.uid.map(Uid::from_raw),
                set.gid.map(Gid::from_raw),
                AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
            ))?;
        }
        if let Some(size) = set.size {
            match &handle {
                Some(h) => rx(fs::ftruncate(h, size))?,
                None => rx(fs::ftruncate(object::reopen(&obj, libc::O_WRONLY)?, size))?,
            };
        }
        if set.atime.is_some() || set.mtime.is_some() {
            let ts = |t| {
                let t = super::attr::timespec(t);
                fs::Timespec {
                    tv_sec: t.tv_sec,
                    tv_nsec: t.tv_nsec as _,
                }
            };
            let times = fs::Timestamps {
                last_access: ts(set.atime),
                last_modification: ts(set.mtime),
            };
            rx(fs::utimensat(
                &obj,
                c"",
                &times,
                AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
            ))?;
        }
        let st = match &handle {
            Some(h) => fstat(h.as_raw_fd())?,
            None => fstat(obj.as_raw_fd())?,
        };
        Ok((Attr::from_stat(&st, ino), self.ttl(kind)))
    }

    /// access(2): the kernel checks mode bits itself (default_permissions); labfs adds
    /// its own refusal for writes under a read-only rule.
    pub fn access(&self, ctx: &Ctx, ino: u64, mask: i32) -> Result<()> {
        if ino == ROOT_INO && mask & libc::W_OK == 0 {
            return Ok(());
        }
        self.obj(ino)?;
        if mask & libc::W_OK != 0 {
            self.check_writable_ino(ctx, ino)?;
        }
        Ok(())
    }
}

fn open_at(dirfd: &impl AsFd, name: &CString, flags: i32) -> Result<OwnedFd> {
    let f = OFlags::from_bits_retain(flags as u32) | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    rx(fs::openat(dirfd, name, f, Mode::empty()))
}

/// A rustix result as the core's (the kernel's errno unchanged).
fn rx<T>(r: rustix::io::Result<T>) -> Result<T> {
    r.map_err(|e| Error::Errno(e.raw_os_error()))
}
