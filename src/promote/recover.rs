//! Journal replay at mount, before the namespace is served.
//!
//! | journal state        | what recovery does                                            |
//! |----------------------|---------------------------------------------------------------|
//! | `planned`, `staged`  | roll back: delete the staging copy; the local copy is intact  |
//! | `verified`           | roll forward: put every staged unit whose local source is     |
//! |                      | unchanged in place (taking over its own NFS claim             |
//! |                      | placeholder), then as `committed`                             |
//! | `committed`          | roll forward: remove each local file only if its content, the |
//! |                      | journal's digest and the Atlas copy all agree                 |
//! | unreadable           | nothing is touched; logged as an error                        |
//!
//! Then every staging directory of this host with no journal is removed (it can only
//! hold copies: the local originals are removed after their staging is renamed away).

use std::collections::HashSet;
use std::ffi::OsStr;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;

use tracing::{error, info, warn};

use super::engine;
use super::journal::{EntryKind, Journal, State};
use super::place;
use super::plan;
use super::util::{self, cos, cstr, open_ns_dir, show};
use crate::fs::backend::fstatat;
use crate::fs::object::split;
use crate::fs::{Creds, LabFs};

pub fn run(fs: &LabFs) {
    let _root = match Creds::root().assume() {
        Ok(g) => g,
        Err(e) => {
            error!("promotion recovery: {e}; nothing recovered");
            return;
        }
    };
    let journals = match Journal::list(&fs.local) {
        Ok(v) => v,
        Err(e) => {
            error!("cannot read the promotion journals: {e}; nothing recovered");
            return;
        }
    };
    let mut known: HashSet<String> = HashSet::new();
    for (id, parsed) in journals {
        known.insert(id.clone());
        match parsed {
            Err(msg) => error!(
                "promotion journal {id}: {msg}; left in place and nothing touched (inspect {}/{id}.json)",
                super::journal::DIR
            ),
            Ok(j) if j.version == 0 || j.version > super::journal::VERSION => error!(
                "promotion journal {id}: version {} is not understood by this labfs; left in place \
                 and nothing touched",
                j.version
            ),
            Ok(mut j) => recover_one(fs, &mut j),
        }
    }
    sweep(fs, &known);
}

fn recover_one(fs: &LabFs, j: &mut Journal) {
    info!(id = %j.id, "recovering the promotion of {} (journal state {})", show(&j.path), j.state.as_str());
    match j.state {
        State::Planned | State::Staged => {
            engine::remove_staging(fs, &j.staging);
            match Journal::remove(&fs.local, &j.id) {
                Ok(()) => {
                    info!(id = %j.id, "rolled back: {} stays on local, unchanged", show(&j.path))
                }
                Err(e) => {
                    warn!(id = %j.id, "rolled back, but the journal could not be removed: {e}")
                }
            }
        }
        State::Verified => {
            if let Err(e) = roll_forward_commit(fs, j) {
                error!(id = %j.id, "cannot complete the promotion of {}: {e}; the local copy is kept and the journal stays for the next mount", show(&j.path));
                return;
            }
            clean(fs, j);
        }
        State::Committed => {
            if let Err(e) = store_records(fs, j) {
                error!(id = %j.id, "{}: {e}; the local copy is kept and the journal stays for the next mount", show(&j.path));
                return;
            }
            clean(fs, j);
        }
    }
}

/// Finish the renames of a verified job.
fn roll_forward_commit(fs: &LabFs, j: &mut Journal) -> Result<(), String> {
    engine::ensure_parent_chain(fs, j).map_err(|e| format!("parent directories on Atlas: {e}"))?;
    let sfd = fs.atlas.open_dir(&j.staging).ok();
    for e in j.entries.iter().filter(|e| e.unit) {
        let ns = j.ns_path(e.rel());
        let shown = show(&ns);
        let Some(sfd) = sfd.as_ref() else { break };
        let sr = Journal::staged_rel(e.rel());
        let (sdir, sname) = engine::split_rel(&sr);
        let Ok(spfd) = util::open_under(sfd.as_raw_fd(), sdir, libc::O_PATH | libc::O_DIRECTORY, 0)
        else {
            continue;
        };
        let cs = cos(sname).map_err(|e| e.to_string())?;
        if fstatat(spfd.as_raw_fd(), &cs).is_err() {
            continue; // renamed into place before the crash
        }
        // Only if every local source of the unit is still what was verified.
        let under = |x: &OsStr| {
            let (x, r) = (x.as_bytes(), e.rel().as_bytes());
            x == r || r.is_empty() || (x.starts_with(r) && x.get(r.len()) == Some(&b'/'))
        };
        let unchanged = j
            .entries
            .iter()
            .filter(|x| under(x.rel()))
            .filter(|x| !x.is_dir())
            .all(|x| {
                let xns = j.ns_path(x.rel());
                let (d, n) = split(&xns);
                let Ok(pfd) = open_ns_dir(&fs.local, d) else {
                    return false;
                };
                let Ok(c) = cos(n) else { return false };
                fstatat(pfd.as_raw_fd(), &c).is_ok_and(|st| !engine::changed(x, &st))
            });
        let (dir, name) = split(&ns);
        let to =
            open_ns_dir(&fs.atlas, dir).map_err(|err| format!("{} on Atlas: {err}", show(dir)))?;
        let cn = cos(name).map_err(|e| e.to_string())?;
        if !unchanged {
            warn!(id = %j.id, "{shown}: the local copy changed since it was verified; not promoting it");
            if !e.target_exists && e.is_dir() {
                // A claim this job made on NFS before the crash goes again.
                place::remove_placeholder(to.as_raw_fd(), &cn);
            }
            continue;
        }
        let placed = if e.target_exists {
            util::rename_at(spfd.as_raw_fd(), &cs, to.as_raw_fd(), &cn, false)
        } else {
            place::place_new(spfd.as_raw_fd(), &cs, to.as_raw_fd(), &cn, e.is_dir(), true)
        };
        match placed {
            Ok(()) => {
                let _ = util::fsync_dir(to.as_raw_fd());
            }
            Err(err) if err.errno() == libc::EEXIST || err.errno() == libc::ENOTEMPTY => {
                warn!(id = %j.id, "{shown}: something else is there on Atlas now; not replacing it, the local copy is kept");
            }
            Err(err) => return Err(format!("{shown}: renaming into place: {err}")),
        }
    }
    store_records(fs, j)?;
    j.state = State::Committed;
    j.save(&fs.local)
        .map_err(|e| format!("writing the journal: {e}"))?;
    Ok(())
}

/// Store records (or tags on merged-into directories) for what is in place.
fn store_records(fs: &LabFs, j: &Journal) -> Result<(), String> {
    for e in &j.entries {
        let ns = j.ns_path(e.rel());
        let Ok(Some(st)) = plan::atlas_lstat(fs, &ns) else {
            continue;
        };
        let ours = Some(st.st_ino) == e.staged_ino();
        let merged_dir = e.is_dir() && e.target_exists && !e.unit;
        if !(ours || merged_dir) {
            continue;
        }
        let (dir, name) = split(&ns);
        let pfd = open_ns_dir(&fs.atlas, dir).map_err(|err| format!("{}: {err}", show(&ns)))?;
        let c = cos(name).map_err(|err| err.to_string())?;
        if crate::tags::get_xattr(pfd.as_raw_fd(), &c, crate::tags::CLASS).is_some() {
            continue;
        }
        let t = engine::tags_for(j, e);
        let in_xattr = if e.kind == EntryKind::Symlink {
            false
        } else {
            let flags = if e.is_dir() {
                libc::O_RDONLY | libc::O_DIRECTORY
            } else {
                libc::O_RDONLY
            };
            match util::open_at(pfd.as_raw_fd(), &c, flags, 0) {
                Ok(fd) => engine::set_tag_xattrs(fd.as_raw_fd(), &t).unwrap_or(false),
                Err(_) => false,
            }
        };
        if !in_xattr {
            crate::tags::write_record(&fs.atlas, &ns, st.st_ino, &t, true)
                .map_err(|err| format!("{}: writing its tag record: {err}", show(&ns)))?;
        }
    }
    Ok(())
}

fn clean(fs: &LabFs, j: &Journal) {
    let id = j.id.clone();
    match engine::clean_entries(fs, j, true, &|m| warn!(id = %id, "{m}")) {
        Ok(kept) => {
            engine::finish(fs, j);
            info!(id = %j.id, "completed the promotion of {} ({kept} local object(s) kept)", show(&j.path));
        }
        Err(e) => {
            error!(id = %j.id, "removing the local copy of {}: {e:?}; the journal stays for the next mount", show(&j.path))
        }
    }
}

/// Remove staging directories of this host that no journal refers to.
fn sweep(fs: &LabFs, known: &HashSet<String>) {
    let dir = format!("/.labfs/staging/{}", util::hostname());
    let Ok(rd) = fs
        .atlas
        .open_beneath(&dir, libc::O_RDONLY | libc::O_DIRECTORY)
    else {
        return;
    };
    let Ok(pfd) = fs.atlas.open_dir(&dir) else {
        return;
    };
    let Ok(names) = crate::fs::handle::list_dir(rd) else {
        return;
    };
    for (name, _) in names {
        let Some(n) = name.to_str() else { continue };
        if n == "." || n == ".." || known.contains(n) {
            continue;
        }
        let Ok(c) = cstr(n) else { continue };
        match util::remove_tree(pfd.as_raw_fd(), &c) {
            Ok(()) => info!("removed the leftover staging directory {dir}/{n} on Atlas"),
            Err(e) => warn!("cannot remove the leftover staging directory {dir}/{n}: {e}"),
        }
    }
}
