//! `labfs check`: validate the rules file and find data stored on the wrong backend.
//!
//! Misplaced data (written behind labfs's back) is hidden by the mount and reported
//! here; it is never deleted. Structural directories (the parents a backend needs to
//! hold what the rules place on it) and promoted data on Atlas are not misplaced.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::exit::load_config;
use crate::exit::{EXIT_FAIL, EXIT_OK};
use crate::rules::{BackendKind, Class};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Misplaced {
    pub backend: BackendKind,
    /// Namespace path (bytes: any name a backend holds).
    pub path: OsString,
    /// Where it is on disk.
    pub file: PathBuf,
    /// Where the rules place it.
    pub belongs_on: BackendKind,
    /// Transitional data on Atlas whose promotion record could not be read (the tag
    /// store is root's): it may be promoted, i.e. not misplaced at all.
    pub uncertain: bool,
}

/// Whether this process can read Atlas's tag store (`.labfs/tags`, root's).
fn tag_store_readable(atlas: &Path) -> bool {
    let dir = atlas.join(crate::tags::STORE_DIR);
    match std::fs::read_dir(&dir) {
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    }
}

/// Promoted data on Atlas is tagged (xattrs, or the tag store on an Atlas without them).
fn promoted(cfg: &Config, ns_path: &OsStr, file: &Path) -> bool {
    crate::tags::is_promoted_file(&cfg.storage.atlas, ns_path, file)
}

/// Every misplaced entry on both backends.
pub fn find_misplaced(cfg: &Config) -> std::io::Result<Vec<Misplaced>> {
    let mut out = Vec::new();
    for (kind, root) in [
        (BackendKind::Atlas, &cfg.storage.atlas),
        (BackendKind::Local, &cfg.storage.local),
    ] {
        walk(cfg, kind, root, OsStr::new("/"), &mut out)?;
    }
    Ok(out)
}

fn walk(
    cfg: &Config,
    kind: BackendKind,
    root: &Path,
    dir: &OsStr,
    out: &mut Vec<Misplaced>,
) -> std::io::Result<()> {
    let rel = OsStr::from_bytes(dir.as_bytes().strip_prefix(b"/").unwrap_or(dir.as_bytes()));
    let disk = root.join(rel);
    let mut entries: Vec<_> = std::fs::read_dir(&disk)?.filter_map(|e| e.ok()).collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name();
        if dir.as_bytes() == b"/" && name.as_bytes() == b".labfs" {
            continue;
        }
        if kind == BackendKind::Atlas && crate::atlas_id::is_nfs_silly_rename(name.as_bytes()) {
            continue; // an unlinked file still open on an NFS client: not data
        }
        let path = crate::fs::object::join(dir, &name);
        let p = cfg.rules.resolve(&path);
        let ft = e.file_type()?;
        let is_dir = ft.is_dir();
        let promotable = kind == BackendKind::Atlas && p.class == Class::Transitional;
        let ok = p.backend() == kind || (promotable && promoted(cfg, &path, &e.path()));
        if ok {
            if is_dir {
                walk(cfg, kind, root, &path, out)?;
            }
        } else if is_dir && cfg.rules.may_place_below(&path, kind) {
            walk(cfg, kind, root, &path, out)?; // structural
        } else {
            out.push(Misplaced {
                backend: kind,
                path,
                file: e.path(),
                belongs_on: p.backend(),
                uncertain: promotable && !tag_store_readable(&cfg.storage.atlas),
            });
        }
    }
    Ok(())
}

pub fn run(config: &Path, rules_only: bool) -> i32 {
    let cfg = match load_config(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    println!(
        "{}: rules file is valid ({} rules)",
        config.display(),
        cfg.rules.rules().len()
    );
    if rules_only {
        return EXIT_OK;
    }
    match find_misplaced(&cfg) {
        Ok(m) if m.is_empty() => {
            println!("no misplaced data");
            EXIT_OK
        }
        Ok(m) => {
            let uncertain = m.iter().filter(|x| x.uncertain).count();
            if uncertain > 0 {
                eprintln!(
                    "labfs: warning: cannot read the tag store {} as uid {}: {uncertain} transitional \
                     entr{} on Atlas below may be promoted (promoted symlinks, and every promoted file \
                     on an Atlas without user xattrs, are recorded there); run `labfs check` as root to tell",
                    cfg.storage.atlas.join(crate::tags::STORE_DIR).display(),
                    crate::sys::effective_ids().0,
                    if uncertain == 1 { "y" } else { "ies" }
                );
            }
            println!("misplaced data (hidden by the mount, never deleted by labfs):");
            for x in &m {
                println!(
                    "  {} on {} ({}): the rules place it on {}{}",
                    shown(&x.path),
                    x.backend,
                    shown(x.file.as_os_str()),
                    x.belongs_on,
                    if x.uncertain {
                        " (unless promoted: the tag store is unreadable)"
                    } else {
                        ""
                    }
                );
            }
            EXIT_FAIL
        }
        Err(e) => {
            eprintln!("labfs: walking the backends: {e}");
            EXIT_FAIL
        }
    }
}

/// A path for people and JSON: UTF-8 as is, any other byte as `\xNN` and a backslash
/// as `\\` (so a name that is not UTF-8 is reported exactly, not replaced by `?` or
/// U+FFFD, the escaped form cannot be mistaken for a name that spells it, and JSON
/// output stays valid UTF-8). docs/operations.md describes the form.
pub fn shown(p: &OsStr) -> String {
    let mut out = String::new();
    for chunk in p.as_bytes().utf8_chunks() {
        out.push_str(&chunk.valid().replace('\\', "\\\\"));
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}
