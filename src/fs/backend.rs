//! A backend root (Atlas or local) and the calls made beneath it.
//!
//! Every call is relative to the backend's root descriptor, opened once at mount:
//! a later unmount of the NFS export underneath cannot redirect labfs to the bare
//! directory, and no path string is ever resolved from `/`. Parent directories are
//! opened with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`: the kernel resolves
//! symlinks in the namespace itself and sends labfs one component at a time, so a
//! symlink inside a backend path can only be something planted behind labfs's back,
//! and it is refused (ELOOP) rather than followed out of the root.
//!
//! [`Creds`] is who a request acts as: the calling process's fsuid, fsgid,
//! supplementary groups and umask are assumed on the dispatching thread for the
//! duration of the backend calls, so ownership, setgid inheritance, default ACLs and
//! NFS root-squash behave as if the caller had made the call itself.

use std::cell::RefCell;
use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use crate::error::{Error, Result};
use crate::rules::BackendKind;
use crate::sys;

/// One store behind the namespace.
#[derive(Debug)]
pub struct Backend {
    pub kind: BackendKind,
    pub root_path: PathBuf,
    root: OwnedFd,
    /// st_dev of the root, to tell this filesystem from others.
    pub dev: u64,
}

impl Backend {
    pub fn open(kind: BackendKind, path: &Path) -> io::Result<Backend> {
        let c = cstring(path.as_os_str())?;
        let root = sys::open_path(&c, libc::O_PATH | libc::O_DIRECTORY)?;
        let st = sys::fstat(&root)?;
        Ok(Backend {
            kind,
            root_path: path.to_path_buf(),
            root,
            dev: st.st_dev,
        })
    }

    pub fn root_fd(&self) -> RawFd {
        self.root.as_raw_fd()
    }

    /// Open the directory at namespace path `dir` (absolute, "/" for the root) as O_PATH.
    pub fn open_dir(&self, dir: &str) -> Result<OwnedFd> {
        self.open_beneath(dir, libc::O_PATH | libc::O_DIRECTORY)
    }

    /// Open `path` beneath the root with `flags`; no component may be a symlink.
    pub fn open_beneath(&self, path: &str, flags: i32) -> Result<OwnedFd> {
        let rel = relative(path);
        let c = CString::new(rel).map_err(|_| Error::Errno(libc::EINVAL))?;
        Ok(sys::open_beneath(self.root.as_fd(), &c, flags)?)
    }

    /// Create every missing directory of `dir` (a namespace path) on this backend,
    /// copying mode and ownership from `template` for each level (the namespace's own
    /// directory of that name, wherever it lives). Runs with the daemon's identity.
    pub fn ensure_dirs(
        &self,
        dir: &str,
        template: &dyn Fn(&str) -> Option<libc::stat>,
    ) -> Result<OwnedFd> {
        match self.open_dir(dir) {
            Ok(fd) => return Ok(fd),
            Err(e) if e.errno() == libc::ENOENT => {}
            Err(e) => return Err(e),
        }
        let (parent, name) = split(dir);
        let pfd = self.ensure_dirs(parent, template)?;
        let tmpl = template(dir);
        let mode = tmpl.map(|s| s.st_mode & 0o7777).unwrap_or(0o755);
        let cname = cstring(OsStr::new(name)).map_err(Error::Io)?;
        let _root = Creds::root().assume()?;
        mkdir_like(pfd.as_raw_fd(), &cname, mode, tmpl)?;
        self.open_dir(dir)
    }
}

/// `mkdirat(dir, name, mode)`; a directory that already exists is fine. A new one
/// takes the owner of `template` (the namespace's own directory of that name), and
/// its mode again afterwards (chown clears setuid/setgid).
pub(crate) fn mkdir_like(
    dir: RawFd,
    name: &CStr,
    mode: u32,
    template: Option<libc::stat>,
) -> Result<()> {
    sys::with_fd(dir, |dir| {
        match sys::mkdir_at(dir, name, mode) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(e),
            // Best effort, as before: the directory exists, which is what was asked.
            Ok(()) => {
                if let Some(s) = template {
                    let _ = sys::chown_at(dir, name, s.st_uid, s.st_gid);
                    let _ = sys::chmod_at(dir, name, mode);
                }
            }
        }
        Ok(())
    })?;
    Ok(())
}

/// `"/a/b"` -> `"a/b"`, `"/"` -> `"."`.
pub fn relative(path: &str) -> &str {
    let r = path.trim_start_matches('/');
    if r.is_empty() {
        "."
    } else {
        r
    }
}

/// Split a namespace path into its parent and final component: "/a/b" -> ("/a", "b").
pub fn split(path: &str) -> (&str, &str) {
    match path.rfind('/') {
        Some(0) => ("/", &path[1..]),
        Some(i) => (&path[..i], &path[i + 1..]),
        None => ("/", path),
    }
}

/// Join a namespace directory path and a name.
pub fn join(dir: &str, name: &str) -> String {
    if dir == "/" {
        format!("/{name}")
    } else {
        format!("{dir}/{name}")
    }
}

pub fn cstring(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

pub fn to_io(e: Error) -> io::Error {
    match e {
        Error::Io(e) => e,
        other => io::Error::from_raw_os_error(other.errno()),
    }
}

/// write(2) all of `body` to `fd`, retrying short writes and EINTR.
pub fn write_all(fd: RawFd, body: &[u8]) -> Result<()> {
    let mut off = 0usize;
    while off < body.len() {
        match sys::with_fd(fd, |fd| sys::write(fd, &body[off..])) {
            Ok(n) => off += n,
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(Error::Io(e)),
        }
    }
    Ok(())
}

pub fn fstat(fd: RawFd) -> Result<libc::stat> {
    Ok(sys::with_fd(fd, |fd| sys::fstat(fd))?)
}

/// lstat of `name` in the directory `dirfd`.
pub fn fstatat(dirfd: RawFd, name: &CStr) -> Result<libc::stat> {
    Ok(sys::with_fd(dirfd, |d| sys::lstat_at(d, name))?)
}

/// Who a request acts as on the backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Creds {
    pub uid: u32,
    pub gid: u32,
    pub groups: Arc<[u32]>,
    pub umask: u32,
}

/// What the current thread actually holds. Read from the kernel on a thread's first
/// switch, then kept exact: a field changes only after its syscall succeeded, so a
/// failed switch never leaves labfs believing it acts as someone it does not.
struct ThreadCreds {
    uid: u32,
    gid: u32,
    groups: Arc<[u32]>,
    /// Unknown until first set (reading it would mean setting it).
    umask: Option<u32>,
    /// Whether this thread has its own fs_struct (per-thread umask).
    unshared: bool,
}

thread_local! {
    static THREAD: RefCell<Option<ThreadCreds>> = const { RefCell::new(None) };
}

/// The daemon's own identity, read once: uid, gid and supplementary groups it started with.
fn daemon_identity() -> &'static Creds {
    static ID: OnceLock<Creds> = OnceLock::new();
    ID.get_or_init(|| {
        let (uid, gid) = sys::effective_ids();
        Creds {
            uid,
            gid,
            groups: Arc::from(sys::thread_groups().unwrap_or_default()),
            umask: 0,
        }
    })
}

impl ThreadCreds {
    fn read() -> ThreadCreds {
        let groups = match sys::thread_groups() {
            Ok(g) => Arc::from(g),
            // Unknown groups: an empty list never matches a wanted one that has
            // groups, so the first switch sets them.
            Err(_) => Arc::from(Vec::new()),
        };
        ThreadCreds {
            uid: sys::fsuid(),
            gid: sys::fsgid(),
            groups,
            umask: None,
            unshared: false,
        }
    }

    fn snapshot(&self, umask: u32) -> Creds {
        Creds {
            uid: self.uid,
            gid: self.gid,
            groups: self.groups.clone(),
            umask: self.umask.unwrap_or(umask),
        }
    }

    /// Make only the syscalls for what differs from `c`: a request from the same
    /// caller as the last one costs nothing. Stops at the first failure.
    fn switch_to(&mut self, c: &Creds) -> io::Result<()> {
        if !self.unshared {
            sys::unshare_fs()?;
            self.unshared = true;
        }
        // CAP_SETUID/CAP_SETGID stay effective whatever the fsuid, so the order of
        // the calls does not matter for permission.
        if self.groups != c.groups {
            sys::set_thread_groups(&c.groups)?;
            self.groups = c.groups.clone();
        }
        if self.gid != c.gid {
            let r = sys::set_fsgid(c.gid);
            self.gid = sys::fsgid();
            r?;
        }
        if self.uid != c.uid {
            let r = sys::set_fsuid(c.uid);
            self.uid = sys::fsuid();
            r?;
        }
        if self.umask != Some(c.umask) {
            sys::set_umask(c.umask);
            self.umask = Some(c.umask);
        }
        Ok(())
    }
}

impl Creds {
    /// The daemon's own identity (root, with the groups it started with): for work
    /// labfs does for itself, such as creating a backend's parent directories.
    pub fn root() -> Creds {
        daemon_identity().clone()
    }

    pub fn is_root(&self) -> bool {
        self.uid == 0
    }

    /// Take on this identity on the current thread until the guard drops.
    ///
    /// Fails (EPERM, see [`Error::Identity`]) when the kernel refuses any part of it;
    /// the thread then goes back to what it had, so the request must not run.
    pub fn assume(&self) -> Result<CredGuard> {
        THREAD.with(|t| {
            let mut t = t.borrow_mut();
            let cur = t.get_or_insert_with(ThreadCreds::read);
            let prev = cur.snapshot(self.umask);
            match cur.switch_to(self) {
                Ok(()) => Ok(CredGuard { prev: Some(prev) }),
                Err(e) => {
                    if let Err(back) = cur.switch_to(&prev) {
                        tracing::error!(
                            "cannot restore uid {} gid {} after a failed switch: {back}",
                            prev.uid,
                            prev.gid
                        );
                    }
                    Err(Error::Identity {
                        uid: self.uid,
                        gid: self.gid,
                        source: e,
                    })
                }
            }
        })
    }
}

/// Restores the thread's previous identity on drop.
#[must_use = "the identity is held only while the guard lives"]
pub struct CredGuard {
    prev: Option<Creds>,
}

impl Drop for CredGuard {
    fn drop(&mut self) {
        let Some(want) = self.prev.take() else { return };
        THREAD.with(|t| {
            let mut t = t.borrow_mut();
            let cur = t.get_or_insert_with(ThreadCreds::read);
            // The thread's state stays exact, so the next assume() retries whatever
            // failed here; nothing acts on it in between without its own guard.
            if let Err(e) = cur.switch_to(&want) {
                tracing::error!("cannot go back to uid {} gid {}: {e}", want.uid, want.gid);
            }
        });
    }
}
