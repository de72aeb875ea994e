//! Atlas identity: never mistake an empty mountpoint for Atlas.
//!
//! `labfs init-atlas` writes `ATLAS/.labfs/atlas-id` (a random id and its creation
//! time). `labfs mount` refuses to start when the marker is missing, when its id
//! differs from `storage.atlas_id` in the rules file or from the id this node saw last
//! (kept in `LOCAL/.labfs/atlas-id`), or when the Atlas path is on the same filesystem
//! as the local backend or as `/`: all of which mean the NFS export is not mounted
//! where labfs expects it. `--allow-unmarked` skips these checks, loudly. The checks
//! themselves are bounded ([`verify_within`]): a hung NFS server refuses the mount
//! instead of hanging it.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub const MARKER_DIR: &str = ".labfs";
pub const MARKER: &str = ".labfs/atlas-id";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{atlas}: no Atlas identity marker ({MARKER}). Is the NFS export mounted there? Is storage.atlas the right path? For a new Atlas run `labfs init-atlas`; for a demo use --allow-unmarked.")]
    Missing { atlas: PathBuf },
    #[error("{atlas}: Atlas identity is {found}, but {expected_from} expects {expected}. Another export is mounted there, or the path is wrong. {fix}")]
    Mismatch {
        atlas: PathBuf,
        found: String,
        expected: String,
        expected_from: String,
        /// What to do if this Atlas replaced the old one on purpose.
        fix: String,
    },
    #[error("{atlas}: Atlas is on the same filesystem as {other}. The NFS export is probably not mounted (the path is a plain directory on this node): check `findmnt {atlas}`, mount the export or fix storage.atlas, and mount again.")]
    SameFilesystem { atlas: PathBuf, other: String },
    #[error("{atlas}: {source}. Is the NFS export mounted? Is storage.atlas the right path?")]
    Unreachable { atlas: PathBuf, source: io::Error },
    #[error("{atlas}: Atlas did not answer within {secs:.1} s ([atlas] timeout). Is the NFS server up and reachable? (`stat {atlas}` hangs too, then.)")]
    NotAnswering { atlas: PathBuf, secs: f64 },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{atlas}: {source}: root on this node may not write there. {SQUASH_HELP} (Or create {MARKER_DIR}/ on the server, owned by the anonymous user.)")]
    Squashed { atlas: PathBuf, source: io::Error },
    #[error("{atlas}: already initialised (id {id}); refusing to overwrite the identity marker")]
    Exists { atlas: PathBuf, id: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Read the id in a marker file (first line).
pub fn read_id(path: &Path) -> io::Result<String> {
    let text = fs::read_to_string(path)?;
    Ok(text.lines().next().unwrap_or("").trim().to_string())
}

fn random_id() -> io::Result<String> {
    let mut b = [0u8; 16];
    fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Write a new marker on Atlas; refuses if one exists.
pub fn init(atlas: &Path) -> Result<String, IdentityError> {
    let marker = atlas.join(MARKER);
    if let Ok(id) = read_id(&marker) {
        return Err(IdentityError::Exists {
            atlas: atlas.to_path_buf(),
            id,
        });
    }
    let dir = atlas.join(MARKER_DIR);
    fs::create_dir_all(&dir).map_err(|source| {
        if matches!(
            source.raw_os_error(),
            Some(libc::EACCES) | Some(libc::EPERM)
        ) {
            set_root_squash(Squash::Yes(u32::MAX));
            IdentityError::Squashed {
                atlas: atlas.to_path_buf(),
                source,
            }
        } else {
            io_err(&dir)(source)
        }
    })?;
    probe_root_squash(atlas);
    let id = random_id().map_err(io_err(&marker))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let tmp = dir.join(".atlas-id.tmp");
    let mut f = fs::File::create(&tmp).map_err(io_err(&tmp))?;
    writeln!(f, "{id}\ncreated {now}").map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, &marker).map_err(io_err(&marker))?;
    Ok(id)
}

/// [`verify`], giving up after `timeout`: a hung NFS server must refuse the mount, not
/// hang it. The checks run on a helper thread that is joined when they answer (the
/// daemon forks afterwards and must be single-threaded then).
pub fn verify_within(
    atlas: &Path,
    local: &Path,
    configured: Option<&str>,
    timeout: Duration,
) -> Result<String, IdentityError> {
    let (tx, rx) = mpsc::channel();
    let (a, l, c) = (
        atlas.to_path_buf(),
        local.to_path_buf(),
        configured.map(str::to_string),
    );
    let helper = thread::Builder::new()
        .name("atlas-id".into())
        .spawn(move || {
            let _ = tx.send(verify(&a, &l, c.as_deref()));
        })
        .map_err(io_err(atlas))?;
    match rx.recv_timeout(timeout) {
        Ok(r) => {
            let _ = helper.join();
            r
        }
        Err(_) => Err(IdentityError::NotAnswering {
            atlas: atlas.to_path_buf(),
            secs: timeout.as_secs_f64(),
        }),
    }
}

/// All the checks `labfs mount` makes before mounting.
pub fn verify(
    atlas: &Path,
    local: &Path,
    configured: Option<&str>,
) -> Result<String, IdentityError> {
    let am = fs::metadata(atlas).map_err(|source| IdentityError::Unreachable {
        atlas: atlas.to_path_buf(),
        source,
    })?;
    if !am.is_dir() {
        return Err(IdentityError::Unreachable {
            atlas: atlas.to_path_buf(),
            source: io::Error::from_raw_os_error(libc::ENOTDIR),
        });
    }
    let lm = fs::metadata(local).map_err(io_err(local))?;
    if am.dev() == lm.dev() {
        return Err(IdentityError::SameFilesystem {
            atlas: atlas.to_path_buf(),
            other: format!("the local backend {}", local.display()),
        });
    }
    if let Ok(rm) = fs::metadata("/") {
        if rm.dev() == am.dev() {
            return Err(IdentityError::SameFilesystem {
                atlas: atlas.to_path_buf(),
                other: "the root filesystem".into(),
            });
        }
    }
    let marker = atlas.join(MARKER);
    let found = match read_id(&marker) {
        Ok(id) if !id.is_empty() => id,
        Ok(_) => {
            return Err(IdentityError::Missing {
                atlas: atlas.to_path_buf(),
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(IdentityError::Missing {
                atlas: atlas.to_path_buf(),
            })
        }
        Err(e) => return Err(io_err(&marker)(e)),
    };
    if let Some(want) = configured {
        if want != found {
            let fix =
                format!("If Atlas was replaced on purpose, set storage.atlas_id = \"{found}\".");
            return Err(IdentityError::Mismatch {
                atlas: atlas.to_path_buf(),
                found,
                expected: want.to_string(),
                expected_from: "storage.atlas_id in the rules file".into(),
                fix,
            });
        }
    }
    let seen = local.join(MARKER);
    match read_id(&seen) {
        Ok(prev) if !prev.is_empty() && prev != found => {
            return Err(IdentityError::Mismatch {
                atlas: atlas.to_path_buf(),
                found,
                expected: prev,
                expected_from: format!("this node's record ({})", seen.display()),
                fix: format!(
                    "If Atlas was replaced on purpose, delete {} and mount again.",
                    seen.display()
                ),
            })
        }
        Ok(_) => {}
        Err(_) => {
            // First mount on this node: remember which Atlas it is.
            let _ = fs::create_dir_all(local.join(MARKER_DIR));
            let _ = fs::write(&seen, format!("{found}\n"));
        }
    }
    probe_root_squash(atlas);
    Ok(found)
}

// ---------------------------------------------------------------------------
// root_squash

/// What one message says about an Atlas that squashes root (mount, `init-atlas`,
/// `labfs status`, a refused promotion).
pub const SQUASH_HELP: &str = "Atlas squashes root (root_squash on the NFS export): \
whatever root on this node does on Atlas is done as the anonymous user (nobody). \
Promotions are refused (owners could not be kept), and labfs's own files and root's \
writes to Atlas paths belong to nobody or are refused; other users' requests work as \
themselves. Fix: export Atlas to this node with no_root_squash, e.g. \
`/export/lab node1(rw,sync,no_subtree_check,no_root_squash)` in the server's \
/etc/exports, then `exportfs -ra` (see docs/operations.md, NFS export settings).";

/// Whether Atlas maps root to another user, as probed at mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Squash {
    /// Not probed (yet), or the probe could not decide.
    Unknown,
    /// Root is root on Atlas.
    No,
    /// Root is mapped to this uid (or may not create files at all: `u32::MAX`).
    Yes(u32),
}

static SQUASH: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The result of the last [`probe_root_squash`] of this process.
pub fn root_squash() -> Squash {
    match SQUASH.load(std::sync::atomic::Ordering::Relaxed) {
        0 => Squash::Unknown,
        1 => Squash::No,
        v => Squash::Yes((v - 2) as u32),
    }
}

fn set_root_squash(s: Squash) {
    let v = match s {
        Squash::Unknown => 0,
        Squash::No => 1,
        Squash::Yes(uid) => u64::from(uid) + 2,
    };
    SQUASH.store(v, std::sync::atomic::Ordering::Relaxed);
}

/// Probe (as the caller, root) whether Atlas squashes root: create a probe file in
/// `ATLAS/.labfs/` and look at its owner. EACCES/EPERM there (root may not write a
/// directory it owns) counts as squashed too. Sets [`root_squash`]; logs and prints
/// [`SQUASH_HELP`] when squashed.
pub fn probe_root_squash(atlas: &Path) -> Squash {
    let s = probe_squash_inner(atlas);
    set_root_squash(s);
    if let Squash::Yes(uid) = s {
        let who = if uid == u32::MAX {
            "root may not create files there".to_string()
        } else {
            format!("a file root created there belongs to uid {uid}")
        };
        tracing::warn!("{}: {who}. {SQUASH_HELP}", atlas.display());
        eprintln!("labfs: WARNING: {}: {who}. {SQUASH_HELP}", atlas.display());
    }
    s
}

fn probe_squash_inner(atlas: &Path) -> Squash {
    if crate::sys::effective_ids().0 != 0 {
        return Squash::Unknown;
    }
    let dir = atlas.join(MARKER_DIR);
    let probe = dir.join(format!(".root-squash-probe.{}", std::process::id()));
    let _ = fs::remove_file(&probe);
    let made = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe);
    match made {
        Ok(f) => {
            let uid = f.metadata().map(|m| m.uid()).ok();
            drop(f);
            let _ = fs::remove_file(&probe);
            match uid {
                Some(0) => Squash::No,
                Some(u) => Squash::Yes(u),
                None => Squash::Unknown,
            }
        }
        Err(e) if matches!(e.raw_os_error(), Some(libc::EACCES) | Some(libc::EPERM)) => {
            Squash::Yes(u32::MAX)
        }
        Err(_) => Squash::Unknown,
    }
}

/// The `.nfsXXXX` names the Linux NFS client gives files that are unlinked while
/// still open on it (silly renames: `.nfs` and 24 hex digits). They are not data:
/// listings through the mount and `labfs check` skip them on Atlas.
pub fn is_nfs_silly_rename(name: &[u8]) -> bool {
    name.len() >= 4 + 16
        && name.starts_with(b".nfs")
        && name[4..].iter().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod nfs_tests {
    use super::*;

    #[test]
    fn silly_rename_names() {
        assert!(is_nfs_silly_rename(b".nfs000000000000012300000001"));
        assert!(!is_nfs_silly_rename(b".nfsrc"));
        assert!(!is_nfs_silly_rename(b".nfs0000000000000123000000zz"));
        assert!(!is_nfs_silly_rename(b"nfs000000000000012300000001"));
    }
}
