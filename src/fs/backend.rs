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
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{check, Error, Result};
use crate::rules::BackendKind;

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
        // SAFETY: plain syscall on a valid C string.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by open and is owned here.
        let root = unsafe { OwnedFd::from_raw_fd(fd) };
        let st = fstat(root.as_raw_fd()).map_err(to_io)?;
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
        // SAFETY: open_how is plain data; zero is valid for every field.
        let mut how: libc::open_how = unsafe { std::mem::zeroed() };
        how.flags = (flags | libc::O_CLOEXEC | libc::O_NOFOLLOW) as u64;
        how.resolve =
            libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
        // SAFETY: openat2 with a valid dirfd, C string and open_how of the right size.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                self.root.as_raw_fd(),
                c.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if fd < 0 {
            return Err(Error::Io(io::Error::last_os_error()));
        }
        // SAFETY: the kernel returned a new descriptor that we now own.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
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
        let _root = Creds::root().assume();
        // SAFETY: valid dirfd and C string.
        let r = unsafe { libc::mkdirat(pfd.as_raw_fd(), cname.as_ptr(), mode) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(Error::Io(e));
            }
        } else if let Some(s) = tmpl {
            // SAFETY: valid dirfd and C string.
            unsafe {
                libc::fchownat(
                    pfd.as_raw_fd(),
                    cname.as_ptr(),
                    s.st_uid,
                    s.st_gid,
                    libc::AT_SYMLINK_NOFOLLOW,
                );
                // chown clears setuid/setgid bits: put the mode back.
                libc::fchmodat(pfd.as_raw_fd(), cname.as_ptr(), mode, 0);
            }
        }
        self.open_dir(dir)
    }
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
        // SAFETY: valid descriptor and buffer.
        let n = unsafe {
            libc::write(
                fd,
                body[off..].as_ptr() as *const libc::c_void,
                body.len() - off,
            )
        };
        match crate::error::check_size(n) {
            Ok(n) => off += n,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

pub fn fstat(fd: RawFd) -> Result<libc::stat> {
    // SAFETY: zeroed stat is a valid out-parameter.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and out pointer.
    check(unsafe { libc::fstat(fd, &mut st) })?;
    Ok(st)
}

/// lstat of `name` in the directory `dirfd`.
pub fn fstatat(dirfd: RawFd, name: &CStr) -> Result<libc::stat> {
    // SAFETY: zeroed stat is a valid out-parameter.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd, C string and out pointer.
    check(unsafe { libc::fstatat(dirfd, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) })?;
    Ok(st)
}

/// Who a request acts as on the backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Creds {
    pub uid: u32,
    pub gid: u32,
    pub groups: Arc<[u32]>,
    pub umask: u32,
}

thread_local! {
    /// What this thread currently has, to skip redundant syscalls.
    static CURRENT: RefCell<Option<Creds>> = const { RefCell::new(None) };
    /// Whether this thread has its own fs_struct (per-thread umask).
    static UNSHARED: RefCell<bool> = const { RefCell::new(false) };
}

impl Creds {
    pub fn root() -> Creds {
        Creds {
            uid: 0,
            gid: 0,
            groups: Arc::from(Vec::new()),
            umask: 0,
        }
    }

    pub fn is_root(&self) -> bool {
        self.uid == 0
    }

    /// Take on this identity on the current thread until the guard drops.
    pub fn assume(&self) -> CredGuard {
        let prev = CURRENT.with(|c| c.borrow().clone());
        if prev.as_ref() != Some(self) {
            apply(prev.as_ref(), self);
            CURRENT.with(|c| *c.borrow_mut() = Some(self.clone()));
        }
        CredGuard { prev }
    }
}

/// Restores the thread's previous identity on drop.
pub struct CredGuard {
    prev: Option<Creds>,
}

impl Drop for CredGuard {
    fn drop(&mut self) {
        let want = self.prev.take().unwrap_or_else(Creds::root);
        let cur = CURRENT.with(|c| c.borrow().clone());
        if cur.as_ref() != Some(&want) {
            apply(cur.as_ref(), &want);
            CURRENT.with(|c| *c.borrow_mut() = Some(want));
        }
    }
}

/// Change the thread's credentials from `cur` (unknown: `None`) to `c`, making only
/// the syscalls for what differs: a request from the same caller as the last one, or
/// from root, costs nothing.
fn apply(cur: Option<&Creds>, c: &Creds) {
    UNSHARED.with(|u| {
        if !*u.borrow() {
            // A private fs_struct makes umask per thread.
            // SAFETY: unshare(CLONE_FS) affects only this thread.
            unsafe { libc::unshare(libc::CLONE_FS) };
            *u.borrow_mut() = true;
        }
    });
    // Raw syscalls: glibc's setgroups/setresuid broadcast to every thread, these must
    // not. CAP_SETUID/CAP_SETGID stay effective whatever the fsuid, so the order of the
    // calls does not matter for permission.
    // SAFETY: these syscalls only change the calling thread's credentials.
    unsafe {
        if cur.is_none_or(|p| p.groups != c.groups) {
            libc::syscall(libc::SYS_setgroups, c.groups.len(), c.groups.as_ptr());
        }
        if cur.is_none_or(|p| p.gid != c.gid) {
            libc::syscall(libc::SYS_setfsgid, c.gid);
        }
        if cur.is_none_or(|p| p.uid != c.uid) {
            libc::syscall(libc::SYS_setfsuid, c.uid);
        }
        if cur.is_none_or(|p| p.umask != c.umask) {
            libc::umask(c.umask as libc::mode_t);
        }
    }
}
