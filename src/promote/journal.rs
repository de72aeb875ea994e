//! The promotion journal: one JSON file per job on the LOCAL backend,
//! `LOCAL/.labfs/promote/<job-id>.json`, replaced atomically (write temporary, fsync,
//! rename, fsync the directory) at every state change.
//!
//! States, in order (see docs/promote.md for what a crash in each leaves):
//! `planned` -> `staged` -> `verified` -> `committed` -> (journal removed once the
//! local copy is gone).

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};

use serde::{Deserialize, Serialize};

use super::util::{self, cstr};
use crate::error::{Error, Result};
use crate::fs::Backend;

/// Directory of the journals, relative to the local backend root.
pub const DIR: &str = "/.labfs/promote";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Tree walked; nothing on Atlas yet (or only a partial staging directory).
    Planned,
    /// Every object copied and fsynced under the staging directory.
    Staged,
    /// Staged content re-read and equal to the source digests; tags set.
    Verified,
    /// Renamed into place on Atlas (and store records written).
    Committed,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Planned => "planned",
            State::Staged => "staged",
            State::Verified => "verified",
            State::Committed => "committed",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    Dir,
    File,
    Symlink,
    /// Another name of a file earlier in the plan (`link_to`).
    Link,
}

/// One object of the promoted tree.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Entry {
    /// Path relative to the promoted top ("" for the top itself).
    pub rel: String,
    pub kind: EntryKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// Bytes allocated on the source (st_blocks * 512).
    pub alloc: u64,
    pub atime: (i64, i64),
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
    /// st_dev / st_ino of the source on the local backend.
    pub dev: u64,
    pub ino: u64,
    /// For `Link`: the `rel` of the first name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_to: Option<String>,
    /// `blake3:<hex>` of a file's content (known from `staged` on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Whether this entry is renamed into place on its own at commit.
    #[serde(default)]
    pub unit: bool,
    /// Whether the target existed on Atlas when planned (merge only).
    #[serde(default)]
    pub target_exists: bool,
    /// Inode number of the staged copy on Atlas (known from `staged` on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staged_ino: Option<u64>,
}

impl Entry {
    pub fn is_dir(&self) -> bool {
        self.kind == EntryKind::Dir
    }
}

/// The whole journal of one job.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Journal {
    pub version: u32,
    pub id: String,
    /// Namespace path of the promoted top.
    pub path: String,
    pub host: String,
    pub merge: bool,
    pub state: State,
    /// Staging directory, relative to the Atlas root (namespace style).
    pub staging: String,
    /// Tag values for every promoted object.
    pub class: String,
    pub promoted_at: String,
    pub origin: String,
    pub entries: Vec<Entry>,
}

impl Journal {
    /// Namespace path of an entry.
    pub fn ns_path(&self, rel: &str) -> String {
        if rel.is_empty() {
            self.path.clone()
        } else if self.path == "/" {
            format!("/{rel}")
        } else {
            format!("{}/{rel}", self.path)
        }
    }

    /// Path of an entry's staged copy, relative to the staging directory.
    pub fn staged_rel(rel: &str) -> String {
        if rel.is_empty() {
            "data".to_string()
        } else {
            format!("data/{rel}")
        }
    }

    fn file_name(id: &str) -> String {
        format!("{id}.json")
    }

    /// Write the journal atomically.
    pub fn save(&self, local: &Backend) -> Result<()> {
        let dfd = ensure_dir(local)?;
        let body = serde_json::to_vec(self).map_err(|_| Error::Errno(libc::EINVAL))?;
        let name = Self::file_name(&self.id);
        let tmp = format!(".{name}.tmp");
        let (cname, ctmp) = (cstr(&name)?, cstr(&tmp)?);
        let fd = util::open_at(
            dfd.as_raw_fd(),
            &ctmp,
            libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC,
            0o600,
        )?;
        write_all(&fd, &body)?;
        util::fsync_fd(fd.as_raw_fd())?;
        drop(fd);
        util::rename_at(dfd.as_raw_fd(), &ctmp, dfd.as_raw_fd(), &cname, false)?;
        util::fsync_dir(dfd.as_raw_fd())
    }

    /// Remove the journal (the job is over).
    pub fn remove(local: &Backend, id: &str) -> Result<()> {
        let dfd = ensure_dir(local)?;
        let c = cstr(&Self::file_name(id))?;
        match util::unlink_at(dfd.as_raw_fd(), &c, false) {
            Err(e) if e.errno() != libc::ENOENT => return Err(e),
            _ => {}
        }
        util::fsync_dir(dfd.as_raw_fd())
    }

    /// Every journal on the local backend: `(id, parsed journal or the parse error)`.
    pub fn list(local: &Backend) -> Result<Vec<(String, std::result::Result<Journal, String>)>> {
        let dfd = match local.open_beneath(DIR, libc::O_RDONLY | libc::O_DIRECTORY) {
            Ok(fd) => fd,
            Err(e) if e.errno() == libc::ENOENT => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let pfd = local.open_dir(DIR)?;
        let mut out = Vec::new();
        for (name, _) in crate::fs::handle::list_dir(dfd)? {
            let Some(n) = name.to_str() else { continue };
            if n.starts_with('.') {
                if n.ends_with(".json.tmp") {
                    // A journal write that never completed: the previous version stands.
                    if let Ok(c) = CString::new(n) {
                        let _ = util::unlink_at(pfd.as_raw_fd(), &c, false);
                    }
                }
                continue;
            }
            let Some(id) = n.strip_suffix(".json") else {
                continue;
            };
            let parsed = read_file(&pfd, n).and_then(|b| {
                serde_json::from_slice::<Journal>(&b)
                    .map_err(|e| format!("unreadable journal: {e}"))
            });
            out.push((id.to_string(), parsed));
        }
        Ok(out)
    }
}

fn read_file(dfd: &OwnedFd, name: &str) -> std::result::Result<Vec<u8>, String> {
    use std::io::Read;
    let c = cstr(name).map_err(|e| e.to_string())?;
    let fd = util::open_at(dfd.as_raw_fd(), &c, libc::O_RDONLY, 0).map_err(|e| e.to_string())?;
    let mut b = Vec::new();
    std::fs::File::from(fd)
        .read_to_end(&mut b)
        .map_err(|e| e.to_string())?;
    Ok(b)
}

fn write_all(fd: &OwnedFd, body: &[u8]) -> Result<()> {
    crate::fs::backend::write_all(fd.as_raw_fd(), body)
}

/// `LOCAL/.labfs/promote`, created (0700, root) when missing.
fn ensure_dir(local: &Backend) -> Result<OwnedFd> {
    match local.open_dir(DIR) {
        Ok(fd) => return Ok(fd),
        Err(e) if e.errno() != libc::ENOENT => return Err(e),
        Err(_) => {}
    }
    let root = local.open_dir("/")?;
    util::mkdir_p1(root.as_raw_fd(), &cstr(".labfs")?, 0o755)?;
    let l = local.open_dir("/.labfs")?;
    util::mkdir_p1(l.as_raw_fd(), &cstr("promote")?, 0o700)?;
    local.open_dir(DIR)
}
