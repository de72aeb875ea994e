//! How labfs reaches one backing object again: a file handle or an O_PATH descriptor.
//!
//! An inode remembers its object by identity, not by path. Where the backend's
//! filesystem can encode file handles (`name_to_handle_at`: tmpfs, ext4, xfs, btrfs,
//! NFS) the inode keeps the handle, a few dozen bytes, and reopens the object with
//! `open_by_handle_at` relative to the backend's root descriptor when it is needed, so
//! a million remembered inodes cost no descriptors. Where it cannot (or the object is
//! on another mount than the backend's root), the inode keeps an O_PATH descriptor.
//!
//! Either way, what comes back is an O_PATH descriptor of the object itself; inode
//! operations act on it (`fstat`, `fchownat(fd, "", AT_EMPTY_PATH)`,
//! `/proc/self/fd/N` for a reopen or an xattr), never on a path resolved again, so they
//! work for every name of a hard-linked file and for a file that is open but no longer
//! has any name.
//!
//! `open_by_handle_at` needs CAP_DAC_READ_SEARCH, which a thread loses while it acts
//! as a non-root caller: handles are opened as root, and the caller's identity is
//! assumed only for the call made with the descriptor (so permission checks still
//! happen as the caller: a reopen through `/proc/self/fd/N` checks the file's mode).

use std::ffi::{CString, OsStr, OsString};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::sync::Arc;

use super::backend::{fstat, Creds};
use crate::error::{Error, Result};

/// Largest handle accepted (MAX_HANDLE_SZ in the kernel).
const MAX_HANDLE: usize = 128;

/// How an inode reaches its backing object again.
#[derive(Clone, Debug)]
pub enum Backing {
    /// `struct file_handle` as the kernel encoded it (header, then bytes).
    Handle(HandleBytes),
    /// An O_PATH descriptor held for the inode's life.
    Fd(Arc<OwnedFd>),
    /// Not reached yet: a directory handed out from memory while Atlas did not
    /// answer; reached by its one namespace path until a lookup gives it a backing.
    ByPath,
}

/// An encoded `struct file_handle`, inline when it is short (tmpfs, ext4, xfs and
/// btrfs handles are 16-28 bytes with the header): one remembered inode then needs no
/// allocation of its own for its handle. NFS handles are longer and go to the heap.
pub type HandleBytes = super::inline::InlineBytes<30, Arc<[u8]>>;

impl std::fmt::Debug for HandleBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HandleBytes({} bytes)", self.as_bytes().len())
    }
}

/// An O_PATH descriptor of an object, owned or borrowed from its inode.
pub enum ObjFd {
    Owned(OwnedFd),
    Held(Arc<OwnedFd>),
}

impl AsRawFd for ObjFd {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            ObjFd::Owned(f) => f.as_raw_fd(),
            ObjFd::Held(f) => f.as_raw_fd(),
        }
    }
}

impl std::os::fd::AsFd for ObjFd {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            ObjFd::Owned(f) => f.as_fd(),
            ObjFd::Held(f) => f.as_fd(),
        }
    }
}

impl ObjFd {
    /// `/proc/self/fd/N`: the object itself to calls that take a path.
    pub fn proc_path(&self) -> CString {
        proc_fd_path(self.as_raw_fd())
    }
}

pub fn proc_fd_path(fd: RawFd) -> CString {
    CString::new(format!("/proc/self/fd/{fd}")).unwrap_or_default()
}

/// `/proc/self/fd/DIR/NAME`: NAME in an already opened directory, without resolving
/// any path from `/` (the l*xattr calls do not follow a final symlink).
pub fn proc_child_path(dirfd: RawFd, name: &std::ffi::CStr) -> CString {
    let mut v = format!("/proc/self/fd/{dirfd}/").into_bytes();
    v.extend_from_slice(name.to_bytes());
    CString::new(v).unwrap_or_default()
}

/// The mount id of the filesystem behind `fd`, if it can encode handles.
pub fn handle_mount_id(fd: RawFd) -> Option<i32> {
    encode(fd).map(|(_, m)| m)
}

fn encode(fd: RawFd) -> Option<(Vec<u8>, i32)> {
    crate::sys::with_fd(fd, |fd| crate::sys::file_handle(fd, MAX_HANDLE)).ok()
}

impl Backing {
    /// The backing of the object behind `fd` (any descriptor of it): its handle when
    /// its filesystem is the one mounted at `mnt_id` (the backend root's), else an
    /// O_PATH descriptor of it.
    pub fn of_fd(fd: RawFd, mnt_id: Option<i32>) -> Result<Backing> {
        if let (Some(want), Some((h, m))) = (mnt_id, encode(fd)) {
            if m == want {
                return Ok(Backing::Handle(HandleBytes::new(&h)));
            }
        }
        // O_PATH of the object the magic link names.
        let f = crate::sys::open_path(&proc_fd_path(fd), libc::O_PATH).map_err(Error::Io)?;
        Ok(Backing::Fd(Arc::new(f)))
    }

    /// The backing of the object behind the O_PATH descriptor `fd`, which the caller
    /// keeps (handle if possible, else `fd` itself, shared).
    pub fn of_shared_fd(fd: &Arc<OwnedFd>, mnt_id: Option<i32>) -> Backing {
        if let (Some(want), Some((h, m))) = (mnt_id, encode(fd.as_raw_fd())) {
            if m == want {
                return Backing::Handle(HandleBytes::new(&h));
            }
        }
        Backing::Fd(fd.clone())
    }

    /// Take an O_PATH descriptor we already own as the backing (handle if possible).
    pub fn of_path_fd(fd: OwnedFd, mnt_id: Option<i32>) -> Backing {
        if let (Some(want), Some((h, m))) = (mnt_id, encode(fd.as_raw_fd())) {
            if m == want {
                return Backing::Handle(HandleBytes::new(&h));
            }
        }
        Backing::Fd(Arc::new(fd))
    }

    /// An O_PATH descriptor of the object (`root`: the backend root, for handles).
    pub fn open(&self, root: RawFd) -> Result<ObjFd> {
        match self {
            Backing::Fd(f) => Ok(ObjFd::Held(f.clone())),
            Backing::ByPath => Err(Error::Errno(libc::ESTALE)),
            Backing::Handle(h) => {
                let _root = Creds::root().assume()?;
                let fd = crate::sys::with_fd(root, |root| {
                    crate::sys::open_by_handle(root, h.as_bytes(), libc::O_PATH)
                })
                .map_err(Error::Io)?;
                Ok(ObjFd::Owned(fd))
            }
        }
    }

    /// Heap bytes this backing keeps (for memory accounting in tests).
    pub fn heap_size(&self) -> usize {
        match self {
            Backing::Handle(HandleBytes::Heap(h)) => h.len() + 16,
            Backing::Handle(HandleBytes::Inline { .. }) => 0,
            Backing::Fd(_) => 24,
            Backing::ByPath => 0,
        }
    }
}

/// Open the object behind an O_PATH descriptor for I/O with `flags`, as whoever the
/// thread acts as (the kernel checks the mode as for open(2)).
pub fn reopen(fd: &impl AsRawFd, flags: i32) -> Result<OwnedFd> {
    let p = proc_fd_path(fd.as_raw_fd());
    let f = flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | libc::O_NOFOLLOW);
    crate::sys::open_path(&p, f).map_err(Error::Io)
}

/// openat(dirfd, name, O_PATH | O_NOFOLLOW) and its lstat.
pub fn open_child(
    dir: &impl std::os::fd::AsFd,
    name: &std::ffi::CStr,
) -> Result<(OwnedFd, libc::stat)> {
    let fd = crate::sys::open_at(dir.as_fd(), name, libc::O_PATH | libc::O_NOFOLLOW)
        .map_err(Error::Io)?;
    let st = fstat(fd.as_raw_fd())?;
    Ok((fd, st))
}

/// Open the namespace path `path` (absolute, as bytes) beneath `root` with `flags`,
/// refusing symlinks in every component. Paths longer than what one `openat2` takes
/// (PATH_MAX) are opened a slice of components at a time, each slice beneath the
/// directory the previous one reached: no limit beyond the backend's own.
pub fn open_beneath(root: RawFd, path: &OsStr, flags: i32) -> Result<OwnedFd> {
    const SLICE: usize = 3072;
    let rel = path.as_bytes();
    let rel = {
        let mut r = rel;
        while let [b'/', rest @ ..] = r {
            r = rest;
        }
        r
    };
    if rel.is_empty() {
        return openat2(root, b".", flags);
    }
    if rel.len() < SLICE {
        return openat2(root, rel, flags);
    }
    let comps: Vec<&[u8]> = rel
        .split(|b| *b == b'/')
        .filter(|c| !c.is_empty())
        .collect();
    let mut cur: Option<OwnedFd> = None;
    let mut i = 0;
    while i < comps.len() {
        let mut slice: Vec<u8> = Vec::new();
        while i < comps.len() && (slice.is_empty() || slice.len() + 1 + comps[i].len() < SLICE) {
            if !slice.is_empty() {
                slice.push(b'/');
            }
            slice.extend_from_slice(comps[i]);
            i += 1;
        }
        let last = i == comps.len();
        let f = if last {
            flags
        } else {
            libc::O_PATH | libc::O_DIRECTORY
        };
        let dir = cur.as_ref().map(|f| f.as_raw_fd()).unwrap_or(root);
        cur = Some(openat2(dir, &slice, f)?);
    }
    cur.ok_or(Error::Errno(libc::ENOENT))
}

fn openat2(dir: RawFd, rel: &[u8], flags: i32) -> Result<OwnedFd> {
    let c = CString::new(rel).map_err(|_| Error::Errno(libc::EINVAL))?;
    crate::sys::with_fd(dir, |dir| crate::sys::open_beneath(dir, &c, flags)).map_err(Error::Io)
}

/// Split a namespace path (bytes) into its parent and final component.
pub fn split(path: &OsStr) -> (&OsStr, &OsStr) {
    let b = path.as_bytes();
    match b.iter().rposition(|c| *c == b'/') {
        Some(0) => (OsStr::new("/"), OsStr::from_bytes(&b[1..])),
        Some(i) => (OsStr::from_bytes(&b[..i]), OsStr::from_bytes(&b[i + 1..])),
        None => (OsStr::new("/"), path),
    }
}

/// Join a namespace directory path and a name (bytes).
pub fn join(dir: &OsStr, name: &OsStr) -> OsString {
    let mut v = Vec::with_capacity(dir.len() + 1 + name.len());
    v.extend_from_slice(dir.as_bytes());
    if dir.as_bytes() != b"/" {
        v.push(b'/');
    }
    v.extend_from_slice(name.as_bytes());
    OsString::from_vec(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_and_join_are_bytes() {
        let odd = OsStr::from_bytes(b"/a/\xff\xfe");
        assert_eq!(
            split(odd),
            (OsStr::new("/a"), OsStr::from_bytes(b"\xff\xfe"))
        );
        assert_eq!(split(OsStr::new("/x")), (OsStr::new("/"), OsStr::new("x")));
        assert_eq!(join(OsStr::new("/"), OsStr::new("x")), OsString::from("/x"));
        assert_eq!(
            join(OsStr::new("/a"), OsStr::from_bytes(b"\xff")),
            OsStr::from_bytes(b"/a/\xff")
        );
    }

    #[test]
    fn deep_paths_open_slice_by_slice() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::File::open(dir.path()).unwrap();
        let comp = CString::new("d".repeat(200)).unwrap();
        let mut cur: OwnedFd = root.try_clone().unwrap().into();
        let mut ns = OsString::new();
        for _ in 0..30 {
            use rustix::fs::{mkdirat, openat, Mode, OFlags};
            mkdirat(&cur, comp.as_c_str(), Mode::from_raw_mode(0o755)).unwrap();
            cur = openat(&cur, comp.as_c_str(), OFlags::PATH, Mode::empty()).unwrap();
            ns.push("/");
            ns.push(OsStr::from_bytes(comp.as_bytes()));
        }
        assert!(ns.len() > libc::PATH_MAX as usize);
        let fd = open_beneath(root.as_raw_fd(), &ns, libc::O_PATH | libc::O_DIRECTORY).unwrap();
        let (a, b) = (
            fstat(fd.as_raw_fd()).unwrap(),
            fstat(cur.as_raw_fd()).unwrap(),
        );
        assert_eq!((a.st_dev, a.st_ino), (b.st_dev, b.st_ino));
    }
}
