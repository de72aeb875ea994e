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
//! the promoted tag ([`crate::tags`]). Anything else is misplaced: hidden, reported by
//! `labfs check`, never deleted.

pub mod attr;
pub mod backend;
pub mod handle;
pub mod health;
pub mod identity;
pub mod inode;
mod ops;
mod promote_support;
pub mod xattr;

use std::ffi::{CString, OsStr, OsString};
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
use backend::{cstring, fstatat, join, split};
use handle::Handles;
use health::Health;
use identity::GroupCache;
use inode::{BackingKey, InodeTable};

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
    /// Paths already logged for a refusal by rule (logged once per path).
    refusals_logged: DashMap<String, ()>,
    invalidator: OnceLock<Box<dyn Fn(Invalidate) + Send + Sync>>,
    pub options: MountOptions,
}

/// Where a namespace path is stored right now, with the handles to reach it.
pub struct Located {
    pub backend: BackendKind,
    pub parent_fd: OwnedFd,
    pub name: CString,
    pub stat: libc::stat,
    pub placement: Placement,
    pub path: String,
}

impl LabFs {
    pub fn new(config: &Config, options: MountOptions) -> std::io::Result<LabFs> {
        let atlas = Backend::open(BackendKind::Atlas, &config.storage.atlas)?;
        let local = Backend::open(BackendKind::Local, &config.storage.local)?;
        let fs = LabFs {
            atlas,
            local,
            live: RwLock::new(Arc::new(Live::from_config(config))),
            inodes: InodeTable::new(),
            handles: Handles::default(),
            health: Arc::new(Health::new(config.atlas_health.timeout)),
            groups: GroupCache::new(),
            refusals_logged: DashMap::new(),
            invalidator: OnceLock::new(),
            options,
        };
        let root_backend = fs.live().rules.resolve("/").backend();
        let b = fs.backend(root_backend);
        let st = backend::fstat(b.root_fd()).map_err(backend::to_io)?;
        fs.inodes.set_root_key(BackingKey {
            backend: root_backend,
            dev: st.st_dev,
            ino: st.st_ino,
        });
        Ok(fs)
    }

    pub fn live(&self) -> Arc<Live> {
        self.live.read().clone()
    }

    /// Swap in new rules (SIGHUP / `labfs reload`); in-flight requests finish with the old.
    pub fn reload(&self, config: &Config) {
        *self.live.write() = Arc::new(Live::from_config(config));
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

    pub fn placement(&self, path: &str) -> Placement {
        let p = self.live().rules.resolve(path);
        crate::stats::rule_hit(&p);
        p
    }

    /// The namespace path of an inode.
    pub fn path_of(&self, ino: u64) -> Result<String> {
        self.inodes.path(ino).ok_or(Error::Stale)
    }

    pub fn child_path(&self, parent: u64, name: &OsStr) -> Result<String> {
        let name = name_str(name)?;
        Ok(join(&self.path_of(parent)?, name))
    }

    /// The backend a request about `parent/name` will touch first (for dispatch).
    pub fn backend_of_child(&self, parent: u64, name: &OsStr) -> Option<BackendKind> {
        let path = self.child_path(parent, name).ok()?;
        Some(self.placement(&path).backend())
    }

    /// The backend that holds `ino`, as last seen.
    pub fn backend_of(&self, ino: u64) -> Option<BackendKind> {
        self.inodes.get(ino).and_then(|n| n.backend())
    }

    /// Fail fast while Atlas is known not to answer.
    pub fn atlas_gate(&self, backend: BackendKind, path: &str) -> Result<()> {
        if backend == BackendKind::Atlas && self.health.is_down() {
            let p = self.placement(path);
            self.health.log_outage_once(path, &p.rule_label());
            return Err(Error::AtlasUnavailable {
                path: path.to_string(),
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
    pub fn check_writable(&self, ctx: &Ctx, path: &str, p: &Placement) -> Result<()> {
        if p.read_only {
            let groups = if ctx.uid == 0 {
                Arc::from(Vec::new())
            } else {
                self.groups.groups(ctx)
            };
            if !p.may_write(ctx.uid, ctx.gid, &groups) {
                return Err(self.refused(Error::ReadOnly {
                    path: path.to_string(),
                    rule: p.rule_label(),
                }));
            }
        }
        Ok(())
    }

    /// Check that something may be created at `path` (rules, read-only, unplaced).
    pub fn check_create(&self, ctx: &Ctx, path: &str, is_dir: bool) -> Result<Placement> {
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
                path: path.to_string(),
            }));
        }
        self.check_writable(ctx, path, &p)?;
        Ok(p)
    }

    /// Find where `path` is stored and stat it (as the caller).
    pub fn locate(&self, creds: &Creds, path: &str) -> Result<Located> {
        if is_reserved(path) {
            return Err(Error::Errno(libc::ENOENT));
        }
        let placement = self.placement(path);
        let primary = placement.backend();
        let (dir, name) = split(path);
        let cname = cstring(OsStr::new(name))?;
        match self.stat_on(creds, primary, path, dir, &cname) {
            Ok((parent_fd, stat)) => {
                return Ok(Located {
                    backend: primary,
                    parent_fd,
                    name: cname,
                    stat,
                    placement,
                    path: path.to_string(),
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
        // A tag that cannot be read is that error, never "absent" (tags::is_promoted).
        if !crate::tags::is_promoted(&self.atlas, parent_fd.as_raw_fd(), &cname, path)? {
            return Err(Error::Errno(libc::ENOENT));
        }
        Ok(Located {
            backend: BackendKind::Atlas,
            parent_fd,
            name: cname,
            stat,
            placement,
            path: path.to_string(),
        })
    }

    fn stat_on(
        &self,
        creds: &Creds,
        kind: BackendKind,
        path: &str,
        dir: &str,
        name: &CString,
    ) -> Result<(OwnedFd, libc::stat)> {
        self.atlas_gate(kind, path)?;
        let b = self.backend(kind);
        let _as = creds.assume()?;
        let pfd = b.open_dir(dir)?;
        let st = if path == "/" {
            backend::fstat(b.root_fd())?
        } else {
            fstatat(pfd.as_raw_fd(), name)?
        };
        Ok((pfd, st))
    }

    /// Locate an inode already known to the kernel.
    pub fn locate_ino(&self, creds: &Creds, ino: u64) -> Result<Located> {
        let path = self.path_of(ino)?;
        self.locate(creds, &path)
    }

    /// Turn a located object into an entry the kernel will hold (one more lookup).
    pub fn entry_for(&self, parent: u64, name: &OsStr, loc: &Located) -> EntryOut {
        let is_dir = loc.stat.st_mode & libc::S_IFMT == libc::S_IFDIR;
        let ino = if loc.path == "/" {
            ROOT_INO
        } else {
            self.inodes.remember(
                key_of(loc.backend, &loc.stat),
                parent,
                &name.to_os_string(),
                is_dir,
            )
        };
        EntryOut {
            attr: Attr::from_stat(&loc.stat, ino),
            ttl: self.entry_ttl(loc.backend, &loc.placement),
        }
    }

    /// How long the kernel may trust an entry: long for data only labfs writes
    /// (the local SSD), bounded for Atlas, which other nodes write too.
    pub fn entry_ttl(&self, backend: BackendKind, _p: &Placement) -> Duration {
        self.ttl(backend)
    }

    pub fn lookup(&self, ctx: &Ctx, parent: u64, name: &OsStr) -> Result<EntryOut> {
        let path = self.child_path(parent, name)?;
        let loc = self.locate(&self.creds(ctx), &path)?;
        Ok(self.entry_for(parent, name, &loc))
    }

    /// How long the kernel may cache "no such entry" for `parent/name`, if at all.
    pub fn negative_ttl(&self, parent: u64, name: &OsStr) -> Option<Duration> {
        let path = self.child_path(parent, name).ok()?;
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
    }

    pub fn getattr(&self, ctx: &Ctx, ino: u64, fh: Option<u64>) -> Result<(Attr, Duration)> {
        if let Some(h) = fh.and_then(|fh| self.handles.file(fh)) {
            let st = backend::fstat(h.fd.as_raw_fd())?;
            return Ok((Attr::from_stat(&st, ino), self.ttl(h.backend)));
        }
        let loc = self.locate_ino(&self.creds(ctx), ino)?;
        let ttl = self.entry_ttl(loc.backend, &loc.placement);
        Ok((Attr::from_stat(&loc.stat, ino), ttl))
    }

    pub fn readlink(&self, ctx: &Ctx, ino: u64) -> Result<Vec<u8>> {
        let creds = self.creds(ctx);
        let loc = self.locate_ino(&creds, ino)?;
        let _as = creds.assume()?;
        let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
        // SAFETY: valid dirfd, C string and buffer of the given length.
        let n = unsafe {
            libc::readlinkat(
                loc.parent_fd.as_raw_fd(),
                loc.name.as_ptr(),
                buf.as_mut_ptr() as *mut libc::c_char,
                buf.len(),
            )
        };
        let n = crate::error::check_size(n)?;
        buf.truncate(n);
        Ok(buf)
    }

    pub fn statfs(&self, ctx: &Ctx, ino: u64) -> Result<libc::statvfs> {
        let path = self.path_of(ino)?;
        let kind = self
            .backend_of(ino)
            .unwrap_or_else(|| self.placement(&path).backend());
        self.atlas_gate(kind, &path)?;
        let b = self.backend(kind);
        let creds = self.creds(ctx);
        let _as = creds.assume()?;
        // SAFETY: zeroed statvfs is a valid out-parameter.
        let mut sv: libc::statvfs = unsafe { std::mem::zeroed() };
        crate::error::check(unsafe { libc::fstatvfs(b.root_fd(), &mut sv) })?;
        Ok(sv)
    }
}

impl Live {
    fn from_config(config: &Config) -> Live {
        Live {
            rules: Arc::new(config.rules.clone()),
            atlas_ttl: config.cache.atlas_ttl,
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
pub fn is_reserved(path: &str) -> bool {
    path == "/.labfs" || path.starts_with("/.labfs/")
}

/// A name from the kernel as UTF-8 (rules are written in UTF-8; other names are refused).
pub fn name_str(name: &OsStr) -> Result<&str> {
    let s = std::str::from_utf8(name.as_bytes()).map_err(|_| Error::Errno(libc::EINVAL))?;
    if s.is_empty() || s.contains('/') || s == "." || s == ".." {
        return Err(Error::Errno(libc::EINVAL));
    }
    Ok(s)
}

impl LabFs {
    /// Whether listing directory `ino` touches only the local SSD.
    pub fn dir_is_local_only(&self, ino: u64) -> bool {
        let Some(path) = self.inodes.path(ino) else {
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
        let Ok(path) = self.child_path(parent, name) else {
            return false;
        };
        let live = self.live();
        live.rules.resolve(&path).class == Class::Transitional
            || live.rules.may_place_below(&path, BackendKind::Atlas)
    }
}
