//! `user.labfs.*` tags: the persistent ones promotion writes on Atlas, and where they
//! live when Atlas has no user xattrs (NFSv3).
//!
//! Namespace (through the mount every `user.labfs.*` name is labfs's and read-only):
//! - stored on Atlas by promote: `user.labfs.class`, `user.labfs.promoted_at`,
//!   `user.labfs.origin`, `user.labfs.digest`;
//! - computed by the mount (never stored): `user.labfs.backend`, `user.labfs.rule`,
//!   `user.labfs.state`; `user.labfs.class` shows the stored class when there is one,
//!   else the rule's class;
//! - stored by the mount on a file linked under a `read_only` rule: `user.labfs.ro`
//!   (src/fs/ro_marker.rs).
//!
//! Where stored tags live ([`Mode`], probed once at mount by [`probe`]):
//! - `xattr`: as real `user.labfs.*` xattrs on the Atlas object itself. Symlinks cannot
//!   carry `user.*` xattrs on Linux, so a promoted symlink's tags go to the store even
//!   in this mode.
//! - `store`: Atlas refuses user xattrs (NFSv3, ramfs): one small JSON record per
//!   promoted object under `ATLAS/.labfs/tags/`, mirroring the namespace:
//!   the tags of `/scans/s1/work/out/a.txt` are in
//!   `ATLAS/.labfs/tags/scans/s1/work/out/a.txt.labfs-tags` (names longer than the
//!   filesystem allows with the suffix use `~<blake3 of the name>.labfs-tags`).
//!   A record holds the namespace path, the Atlas inode number of the object it
//!   describes, and the tags; it only counts while the object at that path still has
//!   that inode number, so a record left behind by a deleted object never tags a new
//!   one. Records are written with write-temporary + rename (made durable by fsync, or
//!   by one syncfs for a whole promotion) and live on Atlas, so they survive
//!   rebuilding the compute node.
//!
//! Reading ([`read_tag`]) always tries the xattr first and the store second, so a fleet
//! that mixes both modes on one Atlas still sees every node's tags.

use std::collections::BTreeMap;
use std::ffi::{CStr, CString, OsStr, OsString};
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::sync::atomic::{AtomicU8, Ordering};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::fs::backend::fstatat;
use crate::fs::{Backend, Creds};
use crate::sys;

pub use crate::fs::tag_reader::{CLASS, DIGEST, ORIGIN, PREFIX, PROMOTED_AT};
/// Tags promote stores on Atlas.
pub const STORED: [&str; 4] = [CLASS, PROMOTED_AT, ORIGIN, DIGEST];

/// Root of the tag store, relative to the Atlas root.
pub const STORE_DIR: &str = ".labfs/tags";
/// Suffix of one record file in the store.
pub const RECORD_SUFFIX: &str = ".labfs-tags";

/// Where this mount keeps stored tags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Not probed (a process that is not a mount daemon).
    Unknown,
    /// Real `user.labfs.*` xattrs on the Atlas objects.
    Xattr,
    /// JSON records under `ATLAS/.labfs/tags/`.
    Store,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Unknown => "unknown",
            Mode::Xattr => "xattr",
            Mode::Store => "store",
        }
    }
}

static MODE: AtomicU8 = AtomicU8::new(0);

/// The mode probed at mount.
pub fn mode() -> Mode {
    match MODE.load(Ordering::Relaxed) {
        1 => Mode::Xattr,
        2 => Mode::Store,
        _ => Mode::Unknown,
    }
}

pub fn set_mode(m: Mode) {
    let v = match m {
        Mode::Unknown => 0,
        Mode::Xattr => 1,
        Mode::Store => 2,
    };
    MODE.store(v, Ordering::Relaxed);
}

/// `/proc/self/fd/DIR/NAME`: reaches NAME in an already opened directory without
/// resolving any path from `/` (the l*xattr calls do not follow a final symlink).
pub fn proc_path(dirfd: RawFd, name: &CStr) -> CString {
    let mut v = format!("/proc/self/fd/{dirfd}/").into_bytes();
    v.extend_from_slice(name.to_bytes());
    CString::new(v).unwrap_or_default()
}

/// Read one xattr of `name` in `dirfd`; `None` when absent or unreadable.
pub fn get_xattr(dirfd: RawFd, name: &CStr, attr: &str) -> Option<Vec<u8>> {
    try_get_xattr(dirfd, name, attr).ok().flatten()
}

/// Read one xattr of `name` in `dirfd`: `Ok(None)` when absent (ENODATA) or when
/// the filesystem has no such xattrs (EOPNOTSUPP); any other error (EIO, ETIMEDOUT,
/// EACCES, ESTALE...) is returned as it is.
pub fn try_get_xattr(dirfd: RawFd, name: &CStr, attr: &str) -> Result<Option<Vec<u8>>> {
    let p = proc_path(dirfd, name);
    let a = CString::new(attr).map_err(|_| Error::Errno(libc::EINVAL))?;
    let mut buf = vec![0u8; 256];
    loop {
        let e = match sys::lgetxattr(&p, &a, &mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(Some(buf));
            }
            Err(e) => e,
        };
        match e.raw_os_error() {
            Some(libc::ERANGE) if buf.len() < 65536 => buf.resize(buf.len() * 4, 0),
            Some(libc::ENODATA) | Some(libc::EOPNOTSUPP) => return Ok(None),
            #[allow(unreachable_patterns)]
            Some(libc::ENOTSUP) => return Ok(None),
            _ => return Err(Error::Io(e)),
        }
    }
}

/// A stored tag of an Atlas object: its xattr, else its record in the store.
pub fn read_tag<P: AsRef<OsStr> + ?Sized>(
    atlas: &Backend,
    dirfd: RawFd,
    name: &CStr,
    path: &P,
    tag: &str,
) -> Option<Vec<u8>> {
    try_read_tag(atlas, dirfd, name, path, tag).ok().flatten()
}

/// As [`read_tag`], with the error that kept it from being read.
pub fn try_read_tag<P: AsRef<OsStr> + ?Sized>(
    atlas: &Backend,
    dirfd: RawFd,
    name: &CStr,
    path: &P,
    tag: &str,
) -> Result<Option<Vec<u8>>> {
    if let Some(v) = try_get_xattr(dirfd, name, tag)? {
        return Ok(Some(v));
    }
    let rec = try_read_record(atlas, dirfd, name, path)?;
    Ok(rec.and_then(|r| r.tags.get(tag).map(|v| v.clone().into_bytes())))
}

/// Whether the Atlas object `name` in `dirfd` (namespace path `path`) was promoted.
/// An error while reading its tags (EIO, ETIMEDOUT, EACCES...) is the caller's to
/// see: it never reads as "not promoted", which would hide the object (ENOENT).
pub fn is_promoted<P: AsRef<OsStr> + ?Sized>(
    atlas: &Backend,
    dirfd: RawFd,
    name: &CStr,
    path: &P,
) -> Result<bool> {
    Ok(try_read_tag(atlas, dirfd, name, path, CLASS)?.is_some())
}

/// One record of the tag store.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// The namespace path the record describes: a JSON string when it is UTF-8, else
    /// `{"hex": "<its bytes>"}` (the journal's form, docs/promote.md).
    #[serde(with = "crate::promote::journal::bytes")]
    pub path: OsString,
    /// Atlas inode number of the object it describes.
    pub ino: u64,
    pub tags: BTreeMap<String, String>,
}

/// `(directory, file name)` of the record for namespace path `path`, both relative to
/// the Atlas root (as namespace-style paths for [`Backend::open_beneath`]); any bytes.
pub fn record_location<P: AsRef<OsStr> + ?Sized>(path: &P) -> Option<(OsString, OsString)> {
    let mut trimmed = path.as_ref().as_bytes();
    while let [b'/', rest @ ..] = trimmed {
        trimmed = rest;
    }
    if trimmed.is_empty() {
        return None;
    }
    let (dir, name) = match trimmed.iter().rposition(|c| *c == b'/') {
        Some(i) => (&trimmed[..i], &trimmed[i + 1..]),
        None => (&b""[..], trimmed),
    };
    let mut d = format!("/{STORE_DIR}").into_bytes();
    if !dir.is_empty() {
        d.push(b'/');
        d.extend_from_slice(dir);
    }
    let file = if name.len() + RECORD_SUFFIX.len() <= 255 {
        let mut f = name.to_vec();
        f.extend_from_slice(RECORD_SUFFIX.as_bytes());
        f
    } else {
        let h = blake3::hash(name).to_hex();
        format!("~{}{RECORD_SUFFIX}", &h[..64]).into_bytes()
    };
    Some((OsString::from_vec(d), OsString::from_vec(file)))
}

fn record_path(dir: &OsStr, file: &OsStr) -> OsString {
    crate::fs::object::join(dir, file)
}

/// The store record of `path`, if it describes the object `name` in `dirfd` now.
pub fn read_record<P: AsRef<OsStr> + ?Sized>(
    atlas: &Backend,
    dirfd: RawFd,
    name: &CStr,
    path: &P,
) -> Option<Record> {
    try_read_record(atlas, dirfd, name, path).ok().flatten()
}

/// As [`read_record`]: `Ok(None)` when there is no record (or it describes another
/// object, or cannot be parsed); an error reading it is returned as it is.
pub fn try_read_record<P: AsRef<OsStr> + ?Sized>(
    atlas: &Backend,
    dirfd: RawFd,
    name: &CStr,
    path: &P,
) -> Result<Option<Record>> {
    let path = path.as_ref();
    let Some((dir, file)) = record_location(path) else {
        return Ok(None);
    };
    let _root = Creds::root().assume()?;
    let at = record_path(&dir, &file);
    let fd = match crate::fs::object::open_beneath(atlas.root_fd(), &at, libc::O_RDONLY) {
        Ok(fd) => fd,
        Err(e) if matches!(e.errno(), libc::ENOENT | libc::ENOTDIR) => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut text = Vec::new();
    std::fs::File::from(fd).read_to_end(&mut text)?;
    let Ok(rec) = serde_json::from_slice::<Record>(&text) else {
        warn!(
            "{}: unreadable tag record {} on Atlas; ignored",
            path.to_string_lossy(),
            at.to_string_lossy()
        );
        return Ok(None);
    };
    if rec.path.as_os_str() != path {
        return Ok(None);
    }
    let st = match fstatat(dirfd, name) {
        Ok(st) => st,
        Err(e) if e.errno() == libc::ENOENT => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok((st.st_ino == rec.ino).then_some(rec))
}

fn open_dir_of(atlas: &Backend, dir: &OsStr) -> Result<OwnedFd> {
    crate::fs::object::open_beneath(atlas.root_fd(), dir, libc::O_PATH | libc::O_DIRECTORY)
}

fn mkdir_chain(atlas: &Backend, dir: &OsStr) -> Result<OwnedFd> {
    match open_dir_of(atlas, dir) {
        Ok(fd) => return Ok(fd),
        Err(e) if e.errno() == libc::ENOENT => {}
        Err(e) => return Err(e),
    }
    let (parent, name) = crate::fs::object::split(dir);
    let pfd = mkdir_chain(atlas, parent)?;
    let c = CString::new(name.as_bytes()).map_err(|_| Error::Errno(libc::EINVAL))?;
    match sys::mkdir_at(&pfd, &c, 0o700) {
        Err(e) if e.raw_os_error() != Some(libc::EEXIST) => return Err(Error::Io(e)),
        _ => {}
    }
    open_dir_of(atlas, dir)
}

/// Write (or replace) the store record of `path`: temporary file, rename; with
/// `durable`, fsync of the file before the rename and of the directory after (else
/// the caller makes a batch of records durable with one syncfs). Runs as root.
pub fn write_record<P: AsRef<OsStr> + ?Sized>(
    atlas: &Backend,
    path: &P,
    ino: u64,
    tags: &BTreeMap<String, String>,
    durable: bool,
) -> Result<()> {
    let path = path.as_ref();
    let (dir, file) = record_location(path).ok_or(Error::Errno(libc::EINVAL))?;
    let rec = Record {
        path: path.to_os_string(),
        ino,
        tags: tags.clone(),
    };
    let body = serde_json::to_vec(&rec).map_err(|_| Error::Errno(libc::EINVAL))?;
    let _root = Creds::root().assume()?;
    let dfd = mkdir_chain(atlas, &dir)?;
    // The O_PATH descriptor cannot be fsynced: open the directory for reading.
    let dir_rd =
        crate::fs::object::open_beneath(atlas.root_fd(), &dir, libc::O_RDONLY | libc::O_DIRECTORY)?;
    let mut tmp = b".".to_vec();
    tmp.extend_from_slice(file.as_bytes());
    tmp.extend_from_slice(format!(".tmp.{}", std::process::id()).as_bytes());
    let ctmp = CString::new(tmp).map_err(|_| Error::Errno(libc::EINVAL))?;
    let cfile = CString::new(file.as_bytes()).map_err(|_| Error::Errno(libc::EINVAL))?;
    let fd = sys::open_at_mode(
        &dfd,
        &ctmp,
        libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_NOFOLLOW,
        0o600,
    )?;
    let res = (|| -> Result<()> {
        crate::fs::backend::write_all(fd.as_raw_fd(), &body)?;
        if durable {
            sys::fsync(&fd)?;
        }
        sys::rename_at(&dfd, &ctmp, &dfd, &cfile, 0)?;
        if durable {
            sys::fsync(&dir_rd)?;
        }
        Ok(())
    })();
    if res.is_err() {
        let _ = sys::unlink_at(&dfd, &ctmp, false);
    }
    res
}

/// Remove the store record of `path`, if there is one (a promotion that failed after
/// tagging a directory it then removed). Runs as root.
pub fn remove_record<P: AsRef<OsStr> + ?Sized>(atlas: &Backend, path: &P) {
    let Some((dir, file)) = record_location(path) else {
        return;
    };
    let Ok(_root) = Creds::root().assume() else {
        return;
    };
    let (Ok(dfd), Ok(c)) = (open_dir_of(atlas, &dir), CString::new(file.as_bytes())) else {
        return;
    };
    let _ = sys::unlink_at(&dfd, &c, false);
}

/// Whether Atlas accepts `user.*` xattrs: set and remove one on a probe file under
/// `ATLAS/.labfs/`. Sets the process-wide [`mode`] and returns it.
pub fn probe(atlas: &Backend) -> Mode {
    let m = match probe_inner(atlas) {
        Ok(true) => Mode::Xattr,
        Ok(false) => Mode::Store,
        Err(e) => {
            warn!("cannot probe Atlas for user xattrs ({e}); keeping tags in the store");
            Mode::Store
        }
    };
    set_mode(m);
    match m {
        Mode::Xattr => info!("Atlas accepts user xattrs: tags are stored as user.labfs.* xattrs"),
        _ => info!(
            "Atlas refuses user xattrs: tags are kept in {}/{STORE_DIR}",
            atlas.root_path.display()
        ),
    }
    m
}

fn probe_inner(atlas: &Backend) -> Result<bool> {
    let _root = Creds::root().assume()?;
    let dfd = mkdir_chain(atlas, OsStr::new("/.labfs"))?;
    let name = format!(
        "xattr-probe.{}.{}",
        crate::sys::hostname().replace('/', "_"),
        std::process::id()
    );
    let cname = CString::new(name).map_err(|_| Error::Errno(libc::EINVAL))?;
    let fd = sys::open_at_mode(
        &dfd,
        &cname,
        libc::O_RDWR | libc::O_CREAT | libc::O_NOFOLLOW,
        0o600,
    )?;
    let attr = c"user.labfs.probe";
    let ok = match sys::fsetxattr(&fd, attr, b"1", 0) {
        Ok(()) => {
            let _ = sys::fremovexattr(&fd, attr);
            true
        }
        Err(err) => match err.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::EPERM) | Some(libc::EACCES) => false,
            #[allow(unreachable_patterns)]
            Some(libc::ENOTSUP) => false,
            _ => {
                let _ = sys::unlink_at(&dfd, &cname, false);
                return Err(Error::Io(err));
            }
        },
    };
    drop(fd);
    let _ = sys::unlink_at(&dfd, &cname, false);
    Ok(ok)
}

/// Whether a real filesystem path (outside any mount, e.g. for `labfs check`) is a
/// promoted Atlas object: its `user.labfs.class` xattr, else a valid store record.
/// `atlas_root` is the Atlas backend root, `ns_path` the object's namespace path.
pub fn is_promoted_file<P: AsRef<OsStr> + ?Sized>(
    atlas_root: &std::path::Path,
    ns_path: &P,
    file: &std::path::Path,
) -> bool {
    let ns_path = ns_path.as_ref();
    if matches!(xattr::get(file, CLASS), Ok(Some(_))) {
        return true;
    }
    let Some((dir, name)) = record_location(ns_path) else {
        return false;
    };
    let rel = std::path::Path::new(&dir);
    let rec_path = atlas_root
        .join(rel.strip_prefix("/").unwrap_or(rel))
        .join(name);
    let Ok(text) = std::fs::read(&rec_path) else {
        return false;
    };
    let Ok(rec) = serde_json::from_slice::<Record>(&text) else {
        return false;
    };
    use std::os::unix::fs::MetadataExt;
    rec.path.as_os_str() == ns_path
        && std::fs::symlink_metadata(file)
            .map(|m| m.ino() == rec.ino)
            .unwrap_or(false)
}

/// The core's view of the tags ([`crate::fs::tag_reader`]): xattr first, then the store.
pub struct StoredTags;

impl crate::fs::tag_reader::TagReader for StoredTags {
    fn try_read_tag(
        &self,
        atlas: &Backend,
        dirfd: RawFd,
        name: &CStr,
        path: &OsStr,
        tag: &str,
    ) -> Result<Option<Vec<u8>>> {
        try_read_tag(atlas, dirfd, name, path, tag)
    }
}
