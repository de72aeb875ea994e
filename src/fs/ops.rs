//! Operations that change the namespace or an object's metadata.
//!
//! Each one: resolve the placement of every path it touches, refuse by rule where the
//! rules say so (EROFS, EACCES for unplaced, EXDEV across backends), make sure the
//! parent exists on the target backend (structural directories mirror the namespace's
//! own directory), then make the call as the caller, relative to the parent's
//! descriptor.

use std::ffi::{CString, OsStr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::backend::{cstring, fstatat, split, Creds};
use super::handle::Opened;
use super::{Attr, Ctx, EntryOut, LabFs, Located, SetAttr, ROOT_INO};
use crate::error::{check, Error, Result};
use crate::rules::BackendKind;

/// What a new entry will be.
pub enum NewNode<'a> {
    Dir { mode: u32 },
    Node { mode: u32, rdev: u64 },
    Symlink { target: &'a OsStr },
}

impl LabFs {
    /// Open (creating as needed) the parent of `path` on `kind`, ready for a new entry.
    fn parent_for_create(&self, creds: &Creds, kind: BackendKind, path: &str) -> Result<OwnedFd> {
        self.atlas_gate(kind, path)?;
        let (dir, _) = split(path);
        let b = self.backend(kind);
        {
            let _as = creds.assume()?;
            match b.open_dir(dir) {
                Ok(fd) => return Ok(fd),
                Err(e) if e.errno() == libc::ENOENT => {}
                Err(e) => return Err(e),
            }
        }
        // The namespace directory exists (the kernel looked it up) but not on this
        // backend yet: create it, mirroring the namespace's own directory.
        let template =
            |d: &str| -> Option<libc::stat> { self.locate(&Creds::root(), d).ok().map(|l| l.stat) };
        b.ensure_dirs(dir, &template)
    }

    fn new_entry(
        &self,
        ctx: &Ctx,
        parent: u64,
        name: &OsStr,
        umask: u32,
        what: NewNode<'_>,
    ) -> Result<EntryOut> {
        let path = self.child_path(parent, name)?;
        let is_dir = matches!(what, NewNode::Dir { .. });
        let p = self.check_create(ctx, &path, is_dir)?;
        let kind = p.backend();
        let creds = self.creds_umask(ctx, umask);
        let pfd = self.parent_for_create(&creds, kind, &path)?;
        let cname = cstring(name)?;
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
        let st = fstatat(pfd.as_raw_fd(), &cname)?;
        drop(_as);
        let loc = Located {
            backend: kind,
            parent_fd: pfd,
            name: cname,
            stat: st,
            placement: p,
            path,
        };
        Ok(self.entry_for(parent, name, &loc))
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
        let path = self.child_path(parent, name)?;
        let p = self.check_create(ctx, &path, false)?;
        let kind = p.backend();
        let creds = self.creds_umask(ctx, umask);
        let pfd = self.parent_for_create(&creds, kind, &path)?;
        let cname = cstring(name)?;
        let permit = self.handles.budget.take(ctx.uid)?;
        let fd = {
            let _as = creds.assume()?;
            let f = (flags & !libc::O_NOCTTY) | libc::O_CREAT | libc::O_NOFOLLOW | libc::O_CLOEXEC;
            // SAFETY: valid dirfd and C string.
            let fd =
                unsafe { libc::openat(pfd.as_raw_fd(), cname.as_ptr(), f, mode as libc::c_uint) };
            check(fd)?;
            // SAFETY: new descriptor we own.
            unsafe { OwnedFd::from_raw_fd(fd) }
        };
        let st = super::backend::fstat(fd.as_raw_fd())?;
        let loc = Located {
            backend: kind,
            parent_fd: pfd,
            name: cname,
            stat: st,
            placement: p,
            path,
        };
        let entry = self.entry_for(parent, name, &loc);
        let opened = self.new_file_handle(entry.attr.ino, fd, kind, flags);
        permit.bind(opened.fh);
        Ok((entry, opened))
    }

    pub fn link(&self, ctx: &Ctx, ino: u64, newparent: u64, newname: &OsStr) -> Result<EntryOut> {
        let creds = self.creds(ctx);
        let src = self.locate_ino(&creds, ino)?;
        let dst = self.child_path(newparent, newname)?;
        let p = self.check_create(ctx, &dst, false)?;
        if p.backend() != src.backend {
            return Err(self.refused(Error::CrossBackend {
                from: src.path.clone(),
                to: dst,
                from_backend: src.backend.as_str(),
                to_backend: p.backend().as_str(),
            }));
        }
        let pfd = self.parent_for_create(&creds, src.backend, &dst)?;
        let cname = cstring(newname)?;
        let _as = creds.assume()?;
        // SAFETY: valid dirfds and C strings.
        check(unsafe {
            libc::linkat(
                src.parent_fd.as_raw_fd(),
                src.name.as_ptr(),
                pfd.as_raw_fd(),
                cname.as_ptr(),
                0,
            )
        })?;
        let st = fstatat(pfd.as_raw_fd(), &cname)?;
        drop(_as);
        let loc = Located {
            backend: src.backend,
            parent_fd: pfd,
            name: cname,
            stat: st,
            placement: p,
            path: dst,
        };
        Ok(self.entry_for(newparent, newname, &loc))
    }

    pub fn unlink(&self, ctx: &Ctx, parent: u64, name: &OsStr) -> Result<()> {
        self.remove(ctx, parent, name, false)
    }

    pub fn rmdir(&self, ctx: &Ctx, parent: u64, name: &OsStr) -> Result<()> {
        self.remove(ctx, parent, name, true)
    }

    fn remove(&self, ctx: &Ctx, parent: u64, name: &OsStr, dir: bool) -> Result<()> {
        let creds = self.creds(ctx);
        let path = self.child_path(parent, name)?;
        let loc = self.locate(&creds, &path)?;
        self.check_writable(ctx, &path, &loc.placement)?;
        let known = self.inodes.peek(&super::key_of(loc.backend, &loc.stat));
        if dir {
            // The namespace directory is empty only if every backend's part is.
            let other = loc.backend.other();
            // A transitional directory may also have a promoted part on Atlas.
            let promoted_part = other == BackendKind::Atlas
                && loc.placement.class == crate::rules::Class::Transitional;
            if (self.live().rules.may_place_below(&path, other) || promoted_part)
                && !(other == BackendKind::Atlas && self.health.is_down())
            {
                let b = self.backend(other);
                let _as = creds.assume()?;
                if let Ok(fd) = b.open_beneath(&path, libc::O_RDONLY | libc::O_DIRECTORY) {
                    let names = super::handle::list_dir(fd)?;
                    if names.iter().any(|(n, _)| n != "." && n != "..") {
                        return Err(Error::Errno(libc::ENOTEMPTY));
                    }
                    // An empty structural directory goes with the namespace one.
                    if let Ok(pfd) = b.open_dir(split(&path).0) {
                        // SAFETY: valid dirfd and C string.
                        unsafe {
                            libc::unlinkat(pfd.as_raw_fd(), loc.name.as_ptr(), libc::AT_REMOVEDIR)
                        };
                    }
                }
            }
        }
        let _as = creds.assume()?;
        let flags = if dir { libc::AT_REMOVEDIR } else { 0 };
        // SAFETY: valid dirfd and C string.
        check(unsafe { libc::unlinkat(loc.parent_fd.as_raw_fd(), loc.name.as_ptr(), flags) })?;
        if let Some(ino) = known {
            if dir || loc.stat.st_nlink <= 1 {
                self.inodes.unbind(ino);
            }
        }
        Ok(())
    }

    /// Whether a rename of `path` stays on `backend` for the whole subtree.
    fn subtree_on(&self, path: &str, is_dir: bool, backend: BackendKind) -> bool {
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
        let from = self.child_path(parent, name)?;
        let to = self.child_path(newparent, newname)?;
        let src = self.locate(&creds, &from)?;
        self.check_writable(ctx, &from, &src.placement)?;
        let dp = self.check_create(ctx, &to, src.stat.st_mode & libc::S_IFMT == libc::S_IFDIR)?;
        let is_dir = src.stat.st_mode & libc::S_IFMT == libc::S_IFDIR;
        let cross = |to_backend: BackendKind| Error::CrossBackend {
            from: from.clone(),
            to: to.clone(),
            from_backend: src.backend.as_str(),
            to_backend: to_backend.as_str(),
        };
        if dp.backend() != src.backend {
            return Err(self.refused(cross(dp.backend())));
        }
        if is_dir
            && (!self.subtree_on(&from, true, src.backend)
                || !self.subtree_on(&to, true, src.backend))
        {
            // Part of the tree would change backend: let mv copy it path by path.
            return Err(self.refused(cross(src.backend.other())));
        }
        let dst_parent = self.parent_for_create(&creds, src.backend, &to)?;
        let dname = cstring(newname)?;
        // What the target was, so its number can be retired if this removes it.
        let replaced = {
            let _as = creds.assume()?;
            fstatat(dst_parent.as_raw_fd(), &dname).ok()
        };
        let _as = creds.assume()?;
        // SAFETY: valid dirfds and C strings; flags are passed through for renameat2.
        check(unsafe {
            libc::renameat2(
                src.parent_fd.as_raw_fd(),
                src.name.as_ptr(),
                dst_parent.as_raw_fd(),
                dname.as_ptr(),
                flags,
            )
        } as i32)?;
        drop(_as);
        let src_key = super::key_of(src.backend, &src.stat);
        if flags & libc::RENAME_EXCHANGE != 0 {
            if let Some(st) = replaced {
                if let Some(other) = self.inodes.peek(&super::key_of(src.backend, &st)) {
                    self.inodes.moved(other, parent, &name.to_os_string());
                }
            }
        } else if let Some(st) = replaced {
            let k = super::key_of(src.backend, &st);
            if k != src_key && (st.st_nlink <= 1 || st.st_mode & libc::S_IFMT == libc::S_IFDIR) {
                if let Some(old) = self.inodes.peek(&k) {
                    self.inodes.unbind(old);
                }
            }
        }
        if let Some(ino) = self.inodes.peek(&src_key) {
            self.inodes.moved(ino, newparent, &newname.to_os_string());
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
        let loc = self.locate_ino(&creds, ino)?;
        if set.is_write() {
            self.check_writable(ctx, &loc.path, &loc.placement)?;
        }
        let handle = set.fh.and_then(|fh| self.handles.file(fh));
        if !set.is_write() {
            // With FUSE_HANDLE_KILLPRIV_V2 an otherwise empty setattr is the kernel's
            // "kill setuid/setgid" (FATTR_KILL_SUIDGID), sent before a write that goes
            // straight to the backing file (passthrough) by someone without
            // CAP_FSETID; the write itself runs with root's backing credentials.
            let mode = loc.stat.st_mode & 0o7777;
            let mut new = mode & !libc::S_ISUID;
            if mode & libc::S_IXGRP != 0 {
                new &= !libc::S_ISGID;
            }
            if new != mode && loc.stat.st_mode & libc::S_IFMT == libc::S_IFREG {
                let _root = Creds::root().assume()?;
                // SAFETY: valid dirfd and C string.
                check(unsafe {
                    libc::fchmodat(loc.parent_fd.as_raw_fd(), loc.name.as_ptr(), new, 0)
                })?;
            }
        }
        let _as = creds.assume()?;
        let pfd = loc.parent_fd.as_raw_fd();
        let name = loc.name.as_ptr();
        let is_link = loc.stat.st_mode & libc::S_IFMT == libc::S_IFLNK;
        if let Some(mode) = set.mode {
            if !is_link {
                let old = loc.stat.st_mode & 0o7777;
                let new = mode & 0o7777;
                // The kernel clears setuid/setgid on a write by someone who does not own
                // the file (file_remove_privs, which skips the ownership check). Under
                // default_permissions it never sends a non-owner's plain chmod, so a
                // non-owner asking exactly for "the same mode minus those bits" is that
                // path, and the backend needs root's right to do it.
                let kill_priv = ctx.uid != 0
                    && ctx.uid != loc.stat.st_uid
                    && new == old & !(libc::S_ISUID | libc::S_ISGID)
                    && new != old;
                let _root = kill_priv.then(|| Creds::root().assume()).transpose()?;
                // SAFETY: valid dirfd and C string (or the handle's descriptor).
                match &handle {
                    Some(h) => check(unsafe { libc::fchmod(h.fd.as_raw_fd(), new) })?,
                    None => check(unsafe { libc::fchmodat(pfd, name, new, 0) })?,
                };
            }
        }
        if set.uid.is_some() || set.gid.is_some() {
            let uid = set.uid.unwrap_or(u32::MAX);
            let gid = set.gid.unwrap_or(u32::MAX);
            // SAFETY: valid dirfd and C string.
            check(unsafe { libc::fchownat(pfd, name, uid, gid, libc::AT_SYMLINK_NOFOLLOW) })?;
        }
        if let Some(size) = set.size {
            match &handle {
                // SAFETY: valid descriptor.
                Some(h) => {
                    check(unsafe { libc::ftruncate(h.fd.as_raw_fd(), size as libc::off_t) })?
                }
                None => {
                    let fd = open_at(pfd, &loc.name, libc::O_WRONLY)?;
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
            // SAFETY: valid dirfd, C string and two timespecs.
            check(unsafe {
                libc::utimensat(pfd, name, times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW)
            })?;
        }
        let st = match &handle {
            Some(h) => super::backend::fstat(h.fd.as_raw_fd())?,
            None => fstatat(pfd, &loc.name)?,
        };
        Ok((
            Attr::from_stat(&st, ino),
            self.entry_ttl(loc.backend, &loc.placement),
        ))
    }

    /// access(2): the kernel checks mode bits itself (default_permissions); labfs adds
    /// its own refusal for writes under a read-only rule.
    pub fn access(&self, ctx: &Ctx, ino: u64, mask: i32) -> Result<()> {
        if ino == ROOT_INO && mask & libc::W_OK == 0 {
            return Ok(());
        }
        let creds = self.creds(ctx);
        let loc = self.locate_ino(&creds, ino)?;
        if mask & libc::W_OK != 0 {
            self.check_writable(ctx, &loc.path, &loc.placement)?;
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
