//! Operations that change the namespace or an object's metadata.
//!
//! Each one: resolve the placement of every path it touches, refuse by rule where the
//! rules say so (EROFS, EACCES for unplaced, EXDEV across backends), make sure the
//! parent exists on the target backend (structural directories mirror the namespace's
//! own directory), then make the call as the caller, relative to the parent's
//! descriptor.

use std::ffi::{CString, OsStr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::backend::{cstring, fstat, fstatat, Creds};
use super::handle::{HandleFd, Need, Opened};
use super::object::{self, ObjFd};
use super::{Attr, Ctx, EntryOut, LabFs, SetAttr, ROOT_INO};
use crate::error::{check, Error, Result};
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
            // SAFETY (all three): valid dirfd and C strings.
            match what {
                NewNode::Dir { mode } => check(unsafe {
                    libc::mkdirat(pfd.as_raw_fd(), cname.as_ptr(), mode as libc::mode_t)
                })?,
                NewNode::Node { mode, rdev } => check(unsafe {
                    libc::mknodat(
                        pfd.as_raw_fd(),
                        cname.as_ptr(),
                        mode as libc::mode_t,
                        rdev as libc::dev_t,
                    )
                })?,
                NewNode::Symlink { target } => {
                    let t = cstring(target)?;
                    check(unsafe { libc::symlinkat(t.as_ptr(), pfd.as_raw_fd(), cname.as_ptr()) })?
                }
            };
            object::open_child(pfd.as_raw_fd(), &cname)?
        };
        self.entry_fd(parent, name, kind, fd.as_raw_fd(), &st)
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
            // SAFETY: valid dirfd and C string.
            let open = |f: i32| unsafe {
                libc::openat(pfd.as_raw_fd(), cname.as_ptr(), f, mode as libc::c_uint)
            };
            let mut fd = open(f | libc::O_EXCL);
            created = fd >= 0;
            if fd < 0
                && flags & libc::O_EXCL == 0
                && std::io::Error::last_os_error().raw_os_error() == Some(libc::EEXIST)
            {
                fd = open(f);
            }
            check(fd)?;
            // SAFETY: new descriptor we own.
            unsafe { OwnedFd::from_raw_fd(fd) }
        };
        let st = fstat(fd.as_raw_fd())?;
        let entry = self.entry_fd(parent, name, kind, fd.as_raw_fd(), &st)?;
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
            // SAFETY: valid C strings and dirfd.
            check(unsafe {
                libc::linkat(
                    libc::AT_FDCWD,
                    from.as_ptr(),
                    pfd.as_raw_fd(),
                    cname.as_ptr(),
                    libc::AT_SYMLINK_FOLLOW,
                )
            })?;
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
                    if let Ok(fd) = open_at(
                        odir.as_raw_fd(),
                        &f.cname,
                        libc::O_RDONLY | libc::O_DIRECTORY,
                    ) {
                        let names = super::handle::list_dir(fd)?;
                        if names.iter().any(|(n, _)| n != "." && n != "..") {
                            return Err(Error::Errno(libc::ENOTEMPTY));
                        }
                        // An empty structural directory goes with the namespace one.
                        // SAFETY: valid dirfd and C string.
                        unsafe {
                            libc::unlinkat(odir.as_raw_fd(), f.cname.as_ptr(), libc::AT_REMOVEDIR)
                        };
                    }
                }
            }
        }
        {
            let _as = creds.assume()?;
            let flags = if dir { libc::AT_REMOVEDIR } else { 0 };
            // SAFETY: valid dirfd and C string.
            check(unsafe { libc::unlinkat(f.dir.as_raw_fd(), f.cname.as_ptr(), flags) })?;
        }
        if let Some(ino) = known {
            if dir || f.stat.st_nlink <= 1 {
                self.inodes.unbind(ino);
            } else {
                self.inodes.unlinked(ino, parent, name);
            }
        }
        Ok(())
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
                ObjFd::Owned(object::open_child(src.dir.as_raw_fd(), &src.cname)?.0)
            };
            let known = self.inodes.peek(&super::key_of(kind, &src.stat));
            self.mark_read_only(known, &obj, &to, &dp)?;
        }
        let dname = cstring(newname)?;
        // What the target was, so its number can be retired if this removes it.
        let replaced = {
            let _as = creds.assume()?;
            let replaced = fstatat(dst_parent.as_raw_fd(), &dname).ok();
            // SAFETY: valid dirfds and C strings; flags are passed through for renameat2.
            check(unsafe {
                libc::renameat2(
                    src.dir.as_raw_fd(),
                    src.cname.as_ptr(),
                    dst_parent.as_raw_fd(),
                    dname.as_ptr(),
                    flags,
                )
            } as i32)?;
            replaced
        };
        let src_key = super::key_of(kind, &src.stat);
        let src_ino = self.inodes.peek(&src_key);
        if flags & libc::RENAME_EXCHANGE != 0 {
            if let Some(st) = replaced {
                if let Some(other) = self.inodes.peek(&super::key_of(kind, &st)) {
                    self.inodes.moved(other, (newparent, newname), parent, name);
                }
            }
        } else if let Some(st) = replaced {
            let k = super::key_of(kind, &st);
            if k != src_key {
                if let Some(old) = self.inodes.peek(&k) {
                    if st.st_nlink <= 1 || st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                        self.inodes.unbind(old);
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
                // SAFETY: valid C string (the object's /proc/self/fd path).
                check(unsafe { libc::chmod(proc.as_ptr(), new) })?;
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
                // SAFETY: valid descriptor or C string.
                match &handle {
                    Some(h) => check(unsafe { libc::fchmod(h.as_raw_fd(), new) })?,
                    None => check(unsafe { libc::chmod(proc.as_ptr(), new) })?,
                };
            }
        }
        if set.uid.is_some() || set.gid.is_some() {
            let uid = set.uid.unwrap_or(u32::MAX);
            let gid = set.gid.unwrap_or(u32::MAX);
            // SAFETY: valid descriptor, empty C string with AT_EMPTY_PATH.
            check(unsafe {
                libc::fchownat(
                    obj.as_raw_fd(),
                    c"".as_ptr(),
                    uid,
                    gid,
                    libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
                )
            })?;
        }
        if let Some(size) = set.size {
            match &handle {
                // SAFETY: valid descriptor.
                Some(h) => check(unsafe { libc::ftruncate(h.as_raw_fd(), size as libc::off_t) })?,
                None => {
                    let fd = object::reopen(&obj, libc::O_WRONLY)?;
                    // SAFETY: valid descriptor.
                    check(unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) })?
                }
            };
        }
        if set.atime.is_some() || set.mtime.is_some() {
            let times = [
                super::attr::timespec(set.atime),
                super::attr::timespec(set.mtime),
            ];
            // SAFETY: valid descriptor, empty C string with AT_EMPTY_PATH, two timespecs.
            check(unsafe {
                libc::utimensat(
                    obj.as_raw_fd(),
                    c"".as_ptr(),
                    times.as_ptr(),
                    libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
                )
            })?;
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

fn open_at(dirfd: i32, name: &CString, flags: i32) -> Result<OwnedFd> {
    // SAFETY: valid dirfd and C string.
    let fd = unsafe {
        libc::openat(
            dirfd,
            name.as_ptr(),
            flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    check(fd)?;
    // SAFETY: new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
