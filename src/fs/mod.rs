//! The filesystem core: one namespace over two backends, decided by the rules.
//!
//! Owns the inode table, the open handles and the two backend roots. Every method
//! takes the caller's [`Ctx`], acts with the caller's identity on the backend, and
//! returns `Result<T, Error>`; nothing here knows fuser's reply types (src/fuse/
//! adapts). Placement is asked of [`crate::rules::Rules`] on every name, so the
//! mount does exactly what `labfs explain` says.
//!
//! Visibility: an entry stored on backend B at namespace path P is shown iff the rules
//! place P on B, or P is under a transitional rule, B is Atlas and the entry carries
//! the promoted tag ([`tag_reader`]). Anything else is misplaced: hidden, reported by
//! `labfs check`, never deleted.

pub mod atlas_io;
pub mod attr;
pub mod backend;
pub mod budget;
pub mod handle;
pub mod health;
pub mod identity;
pub mod inline;
pub mod inode;
pub mod inode_flags;
pub mod object;
mod ops;
pub mod placements;
mod promote_support;
pub mod ro_marker;
pub mod tag_reader;
pub mod xattr;

use std::ffi::{CStr, CString, OsStr, OsString};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::Duration;

use dashmap::DashMap;
use parking_lot::RwLock;
use tracing::info;

pub use attr::{Attr, EntryOut, Kind, SetAttr, SetTime};
pub use backend::{Backend, Creds};
pub use identity::Ctx;
pub use inode::ROOT_INO;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::rules::{BackendKind, Class, Placement, Rules, Unplaced};
use backend::{cstring, fstatat};
use handle::Handles;
use health::Health;
use identity::GroupCache;
use inode::{BackingKey, InodeTable};
use object::{Backing, ObjFd};

/// Settings that may change on reload.
pub struct Live {
    pub rules: Arc<Rules>,
    pub atlas_ttl: Duration,
    pub local_ttl: Duration,
    pub source: String,
}

/// A kernel cache invalidation the core asks the adapter to send.
#[derive(Clone, Debug)]
pub enum Invalidate {
    Inode(u64),
    Entry { parent: u64, name: OsString },
}

/// Options of the mount that are not in the rules file.
#[derive(Clone, Debug, Default)]
pub struct MountOptions {
    /// Use kernel FUSE passthrough for open files on Atlas too.
    pub atlas_passthrough: bool,
}

pub struct LabFs {
    pub atlas: Backend,
    pub local: Backend,
    live: RwLock<Arc<Live>>,
    pub inodes: InodeTable,
    pub handles: Handles,
    pub health: Arc<Health>,
    groups: GroupCache,
    /// Mount ids of the backend roots when their filesystems encode file handles
    /// (`[atlas, local]`); `None`: inodes there hold O_PATH descriptors.
    handle_mounts: [Option<i32>; 2],
    /// A readable (not O_PATH) descriptor of each backend root: `open_by_handle_at`
    /// takes its mount from it and does not accept O_PATH descriptors.
    handle_roots: [Option<OwnedFd>; 2],
    /// Paths already logged for a refusal by rule (logged once per path).
    refusals_logged: DashMap<String, ()>,
    invalidator: OnceLock<Box<dyn Fn(Invalidate) + Send + Sync>>,
    pub options: MountOptions,
    /// Reads promotion's stored tags (given at construction: see [`tag_reader`]).
    pub tags: Box<dyn tag_reader::TagReader>,
    /// Placement decisions per rule, for `labfs status`.
    pub placements: placements::PlacementCounts,
    /// Kernel passthrough or the daemon for open Atlas files, and why ([`atlas_io`]).
    atlas_io: atlas_io::AtlasIo,
    /// Where Atlas metadata requests run, and why ([`atlas_io::AtlasMetadataMode`]).
    atlas_meta: atlas_io::AtlasMetadataMode,
    /// `[cache] atlas_ttl = "auto"` resolved for this mount's Atlas ([`atlas_io::auto_ttl`]).
    auto_ttl: Duration,
    /// False once the kernel turned FUSE passthrough down at init.
    kernel_passthrough: std::sync::atomic::AtomicBool,
    /// Whether a removed object the kernel still holds is kept alive by a descriptor
    /// (`[atlas, local]`): not on NFS, where a busy removed file is renamed to
    /// `.nfsXXXX` in its directory until the descriptor closes (docs/semantics.md).
    holds_removed: [bool; 2],
}

/// Where a namespace path is stored right now, with the handles to reach it.
pub struct Located {
    pub backend: BackendKind,
    pub parent_fd: OwnedFd,
    pub name: CString,
    pub stat: libc::stat,
    pub placement: Placement,
    pub path: OsString,
}

/// A name found in a directory: the directory, the name and what it holds.
struct Found {
    dir: ObjFd,
    cname: CString,
    stat: libc::stat,
}

fn dup_fd(fd: i32) -> Result<OwnedFd> {
    // SAFETY: `fd` is a descriptor the caller holds open for this call.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    rustix::io::fcntl_dupfd_cloexec(fd, 0).map_err(|e| Error::Errno(e.raw_os_error()))
}

impl LabFs {
    pub fn new(
        config: &Config,
        options: MountOptions,
        tags: Box<dyn tag_reader::TagReader>,
    ) -> std::io::Result<LabFs> {
        let atlas = Backend::open(BackendKind::Atlas, &config.storage.atlas)?;
        let local = Backend::open(BackendKind::Local, &config.storage.local)?;
        let (auto_ttl, auto_why) = atlas_io::auto_ttl_for_backend(atlas.root_fd());
        let live = Live::from_config(config, auto_ttl);
        match config.cache.atlas_ttl {
            None => tracing::info!("Atlas entry and attribute TTL {auto_ttl:?} (auto: {auto_why})"),
            Some(t) => tracing::info!("Atlas entry and attribute TTL {t:?} ([cache] atlas_ttl)"),
        }
        let root_backend = live.rules.resolve("/").backend();
        let handle_roots = [
            object::reopen(&atlas.root_fd(), libc::O_RDONLY | libc::O_DIRECTORY).ok(),
            object::reopen(&local.root_fd(), libc::O_RDONLY | libc::O_DIRECTORY).ok(),
        ];
        let mount_of = |r: &Option<OwnedFd>, b: &Backend| {
            r.as_ref()?;
            object::handle_mount_id(b.root_fd())
        };
        let handle_mounts = [
            mount_of(&handle_roots[0], &atlas),
            mount_of(&handle_roots[1], &local),
        ];
        let root = match root_backend {
            BackendKind::Atlas => &atlas,
            BackendKind::Local => &local,
        };
        let st = backend::fstat(root.root_fd()).map_err(backend::to_io)?;
        let root_fd = dup_fd(root.root_fd()).map_err(backend::to_io)?;
        let inodes = InodeTable::new(
            BackingKey {
                backend: root_backend,
                dev: st.st_dev,
                ino: st.st_ino,
            },
            Backing::Fd(Arc::new(root_fd)),
        );
        let atlas_io = atlas_io::for_backend(options.atlas_passthrough, config, atlas.root_fd());
        let atlas_meta = atlas_io::metadata_for_backend(config, atlas.root_fd());
        tracing::info!(
            "Atlas metadata requests: {} ({})",
            atlas_meta.mode,
            atlas_meta.why
        );
        let atlas_holds =
            atlas_io::mount_of_fd(atlas.root_fd()).is_ok_and(|m| !m.fstype.starts_with("nfs"));
        tracing::info!(
            "open Atlas files: {} ({})",
            if atlas_io.passthrough() {
                "kernel passthrough"
            } else {
                "through the daemon, bounded by [atlas] timeout"
            },
            atlas_io.why
        );
        Ok(LabFs {
            atlas_io,
            atlas_meta,
            auto_ttl,
            kernel_passthrough: std::sync::atomic::AtomicBool::new(true),
            atlas,
            local,
            live: RwLock::new(Arc::new(live)),
            inodes,
            handles: Handles::default(),
            health: Arc::new(Health::new(config.atlas_health.timeout)),
            groups: GroupCache::new(),
            handle_mounts,
            handle_roots,
            refusals_logged: DashMap::new(),
            invalidator: OnceLock::new(),
            options,
            tags,
            placements: Default::default(),
            holds_removed: [atlas_holds, true],
        })
    }

    /// Whether a removed object on `kind` that the kernel still holds is kept alive by
    /// a descriptor ([`inode::InodeTable::hold`]).
    fn holds_removed(&self, kind: BackendKind) -> bool {
        match kind {
            BackendKind::Atlas => self.holds_removed[0],
            BackendKind::Local => self.holds_removed[1],
        }
    }

    /// Whether recently used objects on `kind` keep an O_PATH descriptor in the
    /// inode table's small cache: on the local SSD, and on an Atlas that is a local
    /// filesystem (the descriptor is of the object itself, as a reopen by handle
    /// would give). Not on NFS: a descriptor held by this client makes an unlink
    /// through it silly-rename the file (`.nfsXXXX`, and `rm -rf` of its directory
    /// fails), so there the object is reopened by handle each time.
    fn caches_recent(&self, kind: BackendKind) -> bool {
        kind == BackendKind::Local || self.atlas_io.local_fs()
    }

    /// The Atlas TTL `config` gives on this mount (`auto` resolved).
    pub fn atlas_ttl_under(&self, config: &Config) -> Duration {
        config.cache.atlas_ttl.unwrap_or(self.auto_ttl)
    }

    /// Where Atlas metadata requests run, and why.
    pub fn atlas_metadata(&self) -> atlas_io::AtlasMetadataMode {
        self.atlas_meta.clone()
    }

    /// Whether Atlas requests run inline, like local ones (Atlas is a local
    /// filesystem: [`atlas_io::AtlasMetadataMode`]).
    pub fn atlas_inline(&self) -> bool {
        self.atlas_meta.inline()
    }

    /// How open Atlas files are served, and why ([`atlas_io`]).
    pub fn atlas_io(&self) -> atlas_io::AtlasIo {
        self.with_kernel(self.atlas_io.clone())
    }

    /// What `config` would decide for open Atlas files (a reload applies it only at
    /// the next mount).
    pub fn atlas_io_under(&self, config: &Config) -> atlas_io::AtlasIo {
        self.with_kernel(atlas_io::for_backend(
            self.options.atlas_passthrough,
            config,
            self.atlas.root_fd(),
        ))
    }

    fn with_kernel(&self, io: atlas_io::AtlasIo) -> atlas_io::AtlasIo {
        if io.passthrough() && !self.atlas_kernel_ok() {
            return atlas_io::AtlasIo::daemon(format!(
                "the kernel does not offer FUSE passthrough (otherwise: {})",
                io.why
            ));
        }
        io
    }

    /// Whether opens of Atlas files are handed to kernel passthrough.
    pub fn atlas_passthrough(&self) -> bool {
        self.atlas_io.passthrough() && self.atlas_kernel_ok()
    }

    fn atlas_kernel_ok(&self) -> bool {
        self.kernel_passthrough
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The kernel turned FUSE passthrough down at init: every file goes through the daemon.
    pub fn no_kernel_passthrough(&self) {
        self.kernel_passthrough
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn live(&self) -> Arc<Live> {
        self.live.read().clone()
    }

    /// Swap in new rules (SIGHUP / `labfs reload`); in-flight requests finish with the old.
    pub fn reload(&self, config: &Config) {
        *self.live.write() = Arc::new(Live::from_config(config, self.auto_ttl));
    }

    pub fn set_invalidator(&self, f: Box<dyn Fn(Invalidate) + Send + Sync>) {
        let _ = self.invalidator.set(f);
    }

    pub fn invalidate(&self, what: Invalidate) {
        if let Some(f) = self.invalidator.get() {
            f(what);
        }
    }

    pub fn backend(&self, kind: BackendKind) -> &Backend {
        match kind {
            BackendKind::Atlas => &self.atlas,
            BackendKind::Local => &self.local,
        }
    }

    fn handle_mount(&self, kind: BackendKind) -> Option<i32> {
        match kind {
            BackendKind::Atlas => self.handle_mounts[0],
            BackendKind::Local => self.handle_mounts[1],
        }
    }

    pub fn creds(&self, ctx: &Ctx) -> Creds {
        self.groups.creds(ctx, 0)
    }

    pub fn creds_umask(&self, ctx: &Ctx, umask: u32) -> Creds {
        self.groups.creds(ctx, umask)
    }

    pub fn ttl(&self, backend: BackendKind) -> Duration {
        let live = self.live();
        match backend {
            BackendKind::Atlas => live.atlas_ttl,
            BackendKind::Local => live.local_ttl,
        }
    }

    pub fn placement<P: AsRef<OsStr> + ?Sized>(&self, path: &P) -> Placement {
        let p = self.live().rules.resolve(path);
        self.placements.count(&p);
        p
    }

    /// The namespace path of an inode (by its primary name), as bytes.
    pub fn npath_of(&self, ino: u64) -> Result<OsString> {
        self.inodes.npath(ino).ok_or(Error::Stale)
    }

    /// The namespace path of an inode as UTF-8, for callers that take `&str`
    /// (a non-UTF-8 path is refused with EINVAL there, never mangled).
    pub fn path_of(&self, ino: u64) -> Result<String> {
        let p = self.npath_of(ino)?;
        p.into_string().map_err(|_| Error::Errno(libc::EINVAL))
    }

    pub fn child_npath(&self, parent: u64, name: &OsStr) -> Result<OsString> {
        check_name(name)?;
        Ok(object::join(&self.npath_of(parent)?, name))
    }

    pub fn child_path(&self, parent: u64, name: &OsStr) -> Result<String> {
        self.child_npath(parent, name)?
            .into_string()
            .map_err(|_| Error::Errno(libc::EINVAL))
    }

    /// The backend a request about `parent/name` will touch first (for dispatch).
    pub fn backend_of_child(&self, parent: u64, name: &OsStr) -> Option<BackendKind> {
        let path = self.child_npath(parent, name).ok()?;
        Some(self.placement(&path).backend())
    }

    /// The backend that holds `ino`.
    pub fn backend_of(&self, ino: u64) -> Option<BackendKind> {
        self.inodes.get(ino).and_then(|n| n.backend())
    }

    /// Fail fast while Atlas is known not to answer.
    pub fn atlas_gate<P: AsRef<OsStr> + ?Sized>(
        &self,
        backend: BackendKind,
        path: &P,
    ) -> Result<()> {
        if backend == BackendKind::Atlas && self.health.is_down() {
            let path = path.as_ref().to_string_lossy();
            let p = self.placement(path.as_ref());
            self.health.log_outage_once(&path, &p.rule_label());
            return Err(Error::AtlasUnavailable {
                path: path.into_owned(),
                rule: p.rule_label(),
            });
        }
        Ok(())
    }

    /// Log a refusal by rule once per path, at info, naming the rule.
    pub fn refused(&self, e: Error) -> Error {
        if e.is_refusal() {
            let key = e.to_string();
            if self.refusals_logged.len() > 100_000 {
                self.refusals_logged.clear();
            }
            if self.refusals_logged.insert(key, ()).is_none() {
                info!(errno = e.errno(), "refused: {e}");
            }
        }
        e
    }

    /// Check that `ctx` may write at `path` under its rule (EROFS otherwise).
    pub fn check_writable<P: AsRef<OsStr> + ?Sized>(
        &self,
        ctx: &Ctx,
        path: &P,
        p: &Placement,
    ) -> Result<()> {
        if p.read_only {
            let groups = if ctx.uid == 0 {
                Arc::from(Vec::new())
            } else {
                self.groups.groups(ctx)
            };
            if !p.may_write(ctx.uid, ctx.gid, &groups) {
                return Err(self.refused(Error::ReadOnly {
                    path: path.as_ref().to_string_lossy().into_owned(),
                    rule: p.rule_label(),
                }));
            }
        }
        Ok(())
    }

    /// Check that `ctx` may write the object `ino` through every name it is known by:
    /// a read-only rule holds whichever name the write comes through, also a name the
    /// table does not know (forgotten, or made on another node), by the read-only paths
    /// a link through the mount recorded on a multi-link file ([`ro_marker`]).
    pub fn check_writable_ino(&self, ctx: &Ctx, ino: u64) -> Result<()> {
        for path in self.inodes.npaths(ino) {
            self.check_writable(ctx, &path, &self.placement(&path))?;
        }
        self.check_writable_marked(ctx, ino)
    }

    /// Check that something may be created at `path` (rules, read-only, unplaced).
    pub fn check_create<P: AsRef<OsStr> + ?Sized>(
        &self,
        ctx: &Ctx,
        path: &P,
        is_dir: bool,
    ) -> Result<Placement> {
        let path = path.as_ref();
        if is_reserved(path) {
            return Err(Error::Errno(libc::EACCES));
        }
        let live = self.live();
        let p = live.rules.resolve(path);
        if p.rule.is_none()
            && live.rules.unplaced() == Unplaced::Deny
            && !(is_dir && live.rules.is_rule_ancestor(path))
        {
            return Err(self.refused(Error::Unplaced {
                path: path.to_string_lossy().into_owned(),
            }));
        }
        self.check_writable(ctx, path, &p)?;
        Ok(p)
    }

    /// An O_PATH descriptor of inode `ino`'s object, with its backend.
    pub fn obj(&self, ino: u64) -> Result<(BackendKind, ObjFd)> {
        let (kind, backing, key) = self.inodes.backing(ino).ok_or(Error::Stale)?;
        if kind == BackendKind::Atlas && self.health.is_down() {
            self.atlas_gate(kind, &self.npath_of(ino)?)?;
        }
        if let Backing::ByPath = backing {
            let path = self.npath_of(ino)?;
            let _root = Creds::root().assume()?;
            return Ok((kind, ObjFd::Owned(self.open_dir_path(kind, &path)?)));
        }
        let root = match kind {
            BackendKind::Atlas => &self.handle_roots[0],
            BackendKind::Local => &self.handle_roots[1],
        };
        let root = root
            .as_ref()
            .map(|f| f.as_raw_fd())
            .unwrap_or_else(|| self.backend(kind).root_fd());
        let recent = match (&backing, key) {
            (Backing::Handle(_), Some(k)) if self.caches_recent(kind) => Some(k),
            _ => None,
        };
        if recent.is_some() {
            if let Some(fd) = self.inodes.recent_get(ino) {
                return Ok((kind, ObjFd::Held(fd)));
            }
        }
        match (recent, backing.open(root)?) {
            (Some(k), ObjFd::Owned(fd)) => {
                let fd = Arc::new(fd);
                self.inodes.recent_put(ino, k, fd.clone());
                Ok((kind, ObjFd::Held(fd)))
            }
            (_, fd) => Ok((kind, fd)),
        }
    }

    /// Directory `ino` on backend `kind` as an O_PATH descriptor: the inode's own
    /// object when it is stored there, else (the other part of a namespace directory
    /// stored on both backends) its path beneath that backend's root, as the caller.
    fn dir_on(&self, creds: &Creds, ino: u64, kind: BackendKind) -> Result<ObjFd> {
        let path = self.npath_of(ino)?;
        self.atlas_gate(kind, &path)?;
        if self.backend_of(ino) == Some(kind) {
            match self.obj(ino) {
                Ok((_, fd)) => return Ok(fd),
                // The directory object is gone (removed behind labfs's back, or by
                // another node on Atlas): a directory is its one namespace path, so
                // reach what is at that path now, refusing symlinks (never ESTALE, on
                // which the kernel would walk the path again and follow a symlink
                // planted there).
                Err(e) if e.errno() == libc::ESTALE || e.errno() == libc::ENOENT => {}
                Err(e) => return Err(e),
            }
        }
        let root = self.backend(kind).root_fd();
        if ino == ROOT_INO {
            return Ok(ObjFd::Owned(dup_fd(root)?));
        }
        let _as = creds.assume()?;
        Ok(ObjFd::Owned(object::open_beneath(
            root,
            &path,
            libc::O_PATH | libc::O_DIRECTORY,
        )?))
    }

    /// Open namespace directory `dir` on `kind` by path (O_PATH), as whoever the
    /// thread acts as; no length limit.
    pub fn open_dir_path(&self, kind: BackendKind, dir: &OsStr) -> Result<OwnedFd> {
        object::open_beneath(
            self.backend(kind).root_fd(),
            dir,
            libc::O_PATH | libc::O_DIRECTORY,
        )
    }

    /// Find where `path` is stored and stat it (as the caller), by path from the
    /// backend roots (for promote and the operator commands; requests go by inode).
    pub fn locate<P: AsRef<OsStr> + ?Sized>(&self, creds: &Creds, path: &P) -> Result<Located> {
        let path = path.as_ref();
        if is_reserved(path) {
            return Err(Error::Errno(libc::ENOENT));
        }
        let placement = self.placement(path);
        let primary = placement.backend();
        let (dir, name) = object::split(path);
        let cname = if path.as_bytes() == b"/" {
            cstring(OsStr::new("."))?
        } else {
            cstring(name)?
        };
        match self.stat_on(creds, primary, path, dir, &cname) {
            Ok((parent_fd, stat)) => {
                return Ok(Located {
                    backend: primary,
                    parent_fd,
                    name: cname,
                    stat,
                    placement,
                    path: path.to_os_string(),
                })
            }
            Err(e) if e.errno() == libc::ENOENT || e.errno() == libc::ENOTDIR => {
                if placement.class != Class::Transitional {
                    return Err(e);
                }
            }
            Err(e) => return Err(e),
        }
        // A transitional path may have been promoted to Atlas.
        let (parent_fd, stat) = self.stat_on(creds, BackendKind::Atlas, path, dir, &cname)?;
        // A tag that cannot be read is that error, never "absent" (TagReader::is_promoted).
        if !self
            .tags
            .is_promoted(&self.atlas, parent_fd.as_raw_fd(), &cname, path)?
        {
            return Err(Error::Errno(libc::ENOENT));
        }
        Ok(Located {
            backend: BackendKind::Atlas,
            parent_fd,
            name: cname,
            stat,
            placement,
            path: path.to_os_string(),
        })
    }

    fn stat_on(
        &self,
        creds: &Creds,
        kind: BackendKind,
        path: &OsStr,
        dir: &OsStr,
        name: &CString,
    ) -> Result<(OwnedFd, libc::stat)> {
        self.atlas_gate(kind, path)?;
        let _as = creds.assume()?;
        let pfd = self.open_dir_path(kind, dir)?;
        let st = if path.as_bytes() == b"/" {
            backend::fstat(self.backend(kind).root_fd())?
        } else {
            fstatat(pfd.as_raw_fd(), name)?
        };
        Ok((pfd, st))
    }

    /// Locate an inode already known to the kernel, by its primary name.
    pub fn locate_ino(&self, creds: &Creds, ino: u64) -> Result<Located> {
        let path = self.npath_of(ino)?;
        self.locate(creds, &path)
    }

    /// Look `name` up in directory `parent` on backend `kind` (as the caller).
    fn find(
        &self,
        creds: &Creds,
        parent: u64,
        name: &OsStr,
        kind: BackendKind,
        path: &OsStr,
    ) -> Result<Found> {
        // Refused under the name asked for (what the log and the caller see).
        self.atlas_gate(kind, path)?;
        let dir = self.dir_on(creds, parent, kind)?;
        let cname = cstring(name)?;
        let stat = {
            let _as = creds.assume()?;
            fstatat(dir.as_raw_fd(), &cname)?
        };
        Ok(Found { dir, cname, stat })
    }

    /// Where `parent/name` is stored now: its placement's backend, or for a
    /// transitional name missing there, its promoted copy on Atlas.
    fn find_child(
        &self,
        creds: &Creds,
        parent: u64,
        name: &OsStr,
    ) -> Result<(BackendKind, Found, Placement, OsString)> {
        let path = self.child_npath(parent, name)?;
        if is_reserved(&path) {
            return Err(Error::Errno(libc::ENOENT));
        }
        let placement = self.placement(&path);
        let primary = placement.backend();
        match self.find(creds, parent, name, primary, &path) {
            Ok(f) => return Ok((primary, f, placement, path)),
            Err(e) if e.errno() == libc::ENOENT || e.errno() == libc::ENOTDIR => {
                if placement.class != Class::Transitional || primary == BackendKind::Atlas {
                    return Err(e);
                }
            }
            Err(e) => return Err(e),
        }
        let f = self.find(creds, parent, name, BackendKind::Atlas, &path)?;
        // A tag that cannot be read is that error, never "absent" (TagReader::is_promoted).
        if !self
            .tags
            .is_promoted(&self.atlas, f.dir.as_raw_fd(), &f.cname, &path)?
        {
            return Err(Error::Errno(libc::ENOENT));
        }
        Ok((BackendKind::Atlas, f, placement, path))
    }

    /// Hand the kernel the object `name` found in `dir` on `kind` (one more lookup),
    /// capturing its backing when the table does not hold it yet.
    fn entry_in(
        &self,
        creds: &Creds,
        parent: u64,
        name: &OsStr,
        kind: BackendKind,
        (dir, cname, stat): (&ObjFd, &CStr, &libc::stat),
    ) -> Result<EntryOut> {
        let key = key_of(kind, stat);
        if let Some(ino) = self.inodes.bump(&key, parent, name) {
            return Ok(EntryOut {
                attr: Attr::from_stat(stat, ino),
                ttl: self.ttl(kind),
            });
        }
        // A new inode: its backing comes from the object itself (an O_PATH open),
        // so the key and the backing cannot belong to two different objects.
        let (fd, st) = {
            let _as = creds.assume()?;
            object::open_child(dir, cname)?
        };
        let key = key_of(kind, &st);
        let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
        let fd = Arc::new(fd);
        let backing = Backing::of_shared_fd(&fd, self.handle_mount(kind));
        let ino = self.inodes.remember(key, backing, parent, name, is_dir);
        if self.caches_recent(kind) {
            self.inodes.recent_put(ino, key, fd);
        }
        Ok(EntryOut {
            attr: Attr::from_stat(&st, ino),
            ttl: self.ttl(kind),
        })
    }

    /// Remember a just-created object reached through `fd` (any descriptor of it), or
    /// through `path_fd`, an O_PATH descriptor of it (then also kept as its recent
    /// descriptor: the requests that follow a create are about the new object).
    fn entry_fd(
        &self,
        parent: u64,
        name: &OsStr,
        kind: BackendKind,
        fd: i32,
        st: &libc::stat,
        path_fd: Option<OwnedFd>,
    ) -> Result<EntryOut> {
        let key = key_of(kind, st);
        let path_fd = path_fd.map(Arc::new);
        let ino = match self.inodes.bump(&key, parent, name) {
            Some(i) => i,
            None => {
                let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
                let backing = match &path_fd {
                    Some(p) => Backing::of_shared_fd(p, self.handle_mount(kind)),
                    None => Backing::of_fd(fd, self.handle_mount(kind))?,
                };
                self.inodes.remember(key, backing, parent, name, is_dir)
            }
        };
        if let (Some(p), true) = (path_fd, self.caches_recent(kind)) {
            self.inodes.recent_put(ino, key, p);
        }
        Ok(EntryOut {
            attr: Attr::from_stat(st, ino),
            ttl: self.ttl(kind),
        })
    }

    /// How long the kernel may trust an entry: long for data only labfs writes
    /// (the local SSD), bounded for Atlas, which other nodes write too.
    pub fn entry_ttl(&self, backend: BackendKind, _p: &Placement) -> Duration {
        self.ttl(backend)
    }

    pub fn lookup(&self, ctx: &Ctx, parent: u64, name: &OsStr) -> Result<EntryOut> {
        let creds = self.creds(ctx);
        let (kind, f, _, _) = self.find_child(&creds, parent, name)?;
        self.entry_in(&creds, parent, name, kind, (&f.dir, &f.cname, &f.stat))
    }

    /// How long the kernel may cache "no such entry" for `parent/name`, if at all.
    pub fn negative_ttl(&self, parent: u64, name: &OsStr) -> Option<Duration> {
        let path = self.child_npath(parent, name).ok()?;
        let p = self.placement(&path);
        match p.class {
            Class::Ephemeral => Some(self.ttl(BackendKind::Local)),
            _ => {
                let t = self.ttl(BackendKind::Atlas);
                (!t.is_zero()).then_some(t)
            }
        }
    }

    pub fn forget(&self, ino: u64, n: u64) {
        self.inodes.forget(ino, n);
        if self.handles.has_version(ino) && self.inodes.get(ino).is_none() {
            self.handles.forget_version(ino);
        }
    }

    pub fn getattr(&self, _ctx: &Ctx, ino: u64, fh: Option<u64>) -> Result<(Attr, Duration)> {
        if let Some(h) = fh.and_then(|fh| self.handles.file(fh)) {
            // The handle's object (an O_PATH one if the daemon dropped its descriptor).
            let fd = self.handle_fd(&h, handle::Need::Path)?;
            let st = backend::fstat(fd.as_raw_fd())?;
            return Ok((Attr::from_stat(&st, ino), self.ttl(h.backend)));
        }
        let (kind, fd) = self.obj(ino)?;
        let st = backend::fstat(fd.as_raw_fd())?;
        Ok((Attr::from_stat(&st, ino), self.ttl(kind)))
    }

    pub fn readlink(&self, ctx: &Ctx, ino: u64) -> Result<Vec<u8>> {
        let creds = self.creds(ctx);
        let (_, fd) = self.obj(ino)?;
        let _as = creds.assume()?;
        let target = rustix::fs::readlinkat(&fd, c"", Vec::new())
            .map_err(|e| Error::Errno(e.raw_os_error()))?;
        Ok(target.into_bytes())
    }

    pub fn statfs(&self, ctx: &Ctx, ino: u64) -> Result<libc::statvfs> {
        let (_, fd) = self.obj(ino)?;
        let creds = self.creds(ctx);
        let _as = creds.assume()?;
        // SAFETY: zeroed statvfs is a valid out-parameter.
        let mut sv: libc::statvfs = unsafe { std::mem::zeroed() };
        crate::error::check(unsafe { libc::fstatvfs(fd.as_raw_fd(), &mut sv) })?;
        Ok(sv)
    }
}

impl Live {
    fn from_config(config: &Config, auto_ttl: Duration) -> Live {
        Live {
            rules: Arc::new(config.rules.clone()),
            atlas_ttl: config.cache.atlas_ttl.unwrap_or(auto_ttl),
            local_ttl: config.cache.local_ttl,
            source: config.source.display().to_string(),
        }
    }
}

pub fn key_of(backend: BackendKind, st: &libc::stat) -> BackingKey {
    BackingKey {
        backend,
        dev: st.st_dev,
        ino: st.st_ino,
    }
}

/// `/.labfs` on either backend root holds labfs's own state (Atlas identity, journal,
/// staging, tag store): never part of the namespace.
pub fn is_reserved<P: AsRef<OsStr> + ?Sized>(path: &P) -> bool {
    let b = path.as_ref().as_bytes();
    b == b"/.labfs" || b.starts_with(b"/.labfs/")
}

/// A name from the kernel: any bytes but `/` and NUL, not `.` or `..`.
pub fn check_name(name: &OsStr) -> Result<()> {
    let b = name.as_bytes();
    if b.is_empty() || b.contains(&b'/') || b.contains(&0) || b == b"." || b == b".." {
        return Err(Error::Errno(libc::EINVAL));
    }
    Ok(())
}

/// A name from the kernel as UTF-8, for callers that take `&str` (EINVAL otherwise).
pub fn name_str(name: &OsStr) -> Result<&str> {
    check_name(name)?;
    std::str::from_utf8(name.as_bytes()).map_err(|_| Error::Errno(libc::EINVAL))
}

impl LabFs {
    /// Whether listing directory `ino` touches only the local SSD.
    pub fn dir_is_local_only(&self, ino: u64) -> bool {
        let Some(path) = self.inodes.npath(ino) else {
            return true;
        };
        let live = self.live();
        let p = live.rules.resolve(&path);
        self.backend_of(ino) == Some(BackendKind::Local)
            && p.class != Class::Transitional
            && !live.rules.may_place_below(&path, BackendKind::Atlas)
    }

    /// Whether removing `parent/name` may have to look at Atlas.
    pub fn may_touch_atlas_below(&self, parent: u64, name: &OsStr) -> bool {
        let Ok(path) = self.child_npath(parent, name) else {
            return false;
        };
        let live = self.live();
        live.rules.resolve(&path).class == Class::Transitional
            || live.rules.may_place_below(&path, BackendKind::Atlas)
    }
}
