//! `labfs check`: validate the rules file and find data stored on the wrong backend.
//!
//! Misplaced data (written behind labfs's back) is hidden by the mount and reported
//! here; it is never deleted. Structural directories (the parents a backend needs to
//! hold what the rules place on it) and promoted data on Atlas are not misplaced.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::cli::{load_config, EXIT_FAIL, EXIT_OK};
use crate::config::Config;
use crate::rules::{BackendKind, Class};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Misplaced {
    pub backend: BackendKind,
    /// Namespace path.
    pub path: String,
    /// Where it is on disk.
    pub file: PathBuf,
    /// Where the rules place it.
    pub belongs_on: BackendKind,
}

/// Promoted data on Atlas is tagged (xattrs, or the tag store on an Atlas without them).
fn promoted(cfg: &Config, ns_path: &str, file: &Path) -> bool {
    crate::tags::is_promoted_file(&cfg.storage.atlas, ns_path, file)
}

/// Every misplaced entry on both backends.
pub fn find_misplaced(cfg: &Config) -> std::io::Result<Vec<Misplaced>> {
    let mut out = Vec::new();
    for (kind, root) in [
        (BackendKind::Atlas, &cfg.storage.atlas),
        (BackendKind::Local, &cfg.storage.local),
    ] {
        walk(cfg, kind, root, "/", &mut out)?;
    }
    Ok(out)
}

fn walk(
    cfg: &Config,
    kind: BackendKind,
    root: &Path,
    dir: &str,
    out: &mut Vec<Misplaced>,
) -> std::io::Result<()> {
    let disk = root.join(crate::fs::backend::relative(dir));
    let mut entries: Vec<_> = std::fs::read_dir(&disk)?.filter_map(|e| e.ok()).collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name();
        let Some(n) = name.to_str() else { continue };
        if dir == "/" && n == ".labfs" {
            continue;
        }
        if kind == BackendKind::Atlas && crate::atlas_id::is_nfs_silly_rename(n.as_bytes()) {
            continue; // an unlinked file still open on an NFS client: not data
        }
        let path = crate::fs::backend::join(dir, n);
        let p = cfg.rules.resolve(&path);
        let ft = e.file_type()?;
        let is_dir = ft.is_dir();
        let ok = p.backend() == kind
            || (kind == BackendKind::Atlas
                && p.class == Class::Transitional
                && promoted(cfg, &path, &e.path()));
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
            println!("misplaced data (hidden by the mount, never deleted by labfs):");
            for x in &m {
                println!(
                    "  {} on {} ({}): the rules place it on {}",
                    x.path,
                    x.backend,
                    String::from_utf8_lossy(x.file.as_os_str().as_bytes()),
                    x.belongs_on
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
