//! Planning a job: walk the local tree (as root), refuse what cannot be promoted, and
//! decide which objects are renamed into place on their own (commit units).

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::sync::atomic::Ordering;

use super::job::{failed, Job, JobError, JobResult};
use super::journal::{ns_of, Entry, EntryKind};
use super::util::{cos, open_ns, open_ns_dir, show};
use crate::fs::backend::fstatat;
use crate::fs::object::split;
use crate::fs::LabFs;

/// What the walk found.
pub struct Plan {
    pub entries: Vec<Entry>,
    /// Paths below the top that another rule places elsewhere: left where they are.
    pub skipped: Vec<OsString>,
    /// Space the copy needs on Atlas (allocated size of every file plus 4 KiB per
    /// object), summed during the walk so no entry has to keep its allocation.
    pub need_bytes: u64,
}

pub fn entry_of(rel: &OsStr, kind: EntryKind, st: &libc::stat) -> Entry {
    Entry::new(rel, kind, st)
}

fn kind_name(mode: u32) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFIFO => "fifo",
        libc::S_IFSOCK => "socket",
        libc::S_IFCHR => "character device",
        libc::S_IFBLK => "block device",
        _ => "special file",
    }
}

fn rel_join(rel: &OsStr, name: &OsStr) -> OsString {
    if rel.is_empty() {
        name.to_os_string()
    } else {
        let mut v = Vec::with_capacity(rel.len() + 1 + name.len());
        v.extend_from_slice(rel.as_bytes());
        v.push(b'/');
        v.extend_from_slice(name.as_bytes());
        OsString::from_vec(v)
    }
}

/// What a file needs on Atlas (see [`Plan::need_bytes`]).
fn need_of(kind: EntryKind, st: &libc::stat) -> u64 {
    match kind {
        EntryKind::File => {
            let alloc = (st.st_blocks as u64).saturating_mul(512);
            alloc
                .min((st.st_size as u64).next_multiple_of(4096))
                .next_multiple_of(4096)
                + 4096
        }
        _ => 4096,
    }
}

/// Walk the local tree of `job.path` (whose lstat is `top`).
pub fn walk(fs: &LabFs, job: &Job, top: &libc::stat) -> JobResult<Plan> {
    let rules = fs.live().rules.clone();
    let mut entries = Vec::new();
    let mut skipped = Vec::new();
    let mut special = Vec::new();
    let mut need_bytes = 0u64;
    // Only files with more than one link: the first name each (dev, ino) was seen by.
    let mut first_name: HashMap<(u64, u64), Box<OsStr>> = HashMap::new();
    let mut push =
        |rel: &OsStr, st: &libc::stat, entries: &mut Vec<Entry>, special: &mut Vec<String>| {
            let kind = match st.st_mode & libc::S_IFMT {
                libc::S_IFDIR => EntryKind::Dir,
                libc::S_IFREG => EntryKind::File,
                libc::S_IFLNK => EntryKind::Symlink,
                other => {
                    special.push(format!(
                        "{} ({})",
                        show(&ns_of(&job.path, rel)),
                        kind_name(other)
                    ));
                    return;
                }
            };
            let mut e = entry_of(rel, kind, st);
            if kind == EntryKind::File && st.st_nlink > 1 {
                match first_name.get(&(st.st_dev, st.st_ino)) {
                    Some(first) => {
                        e.kind = EntryKind::Link;
                        e.set_link_to(first);
                    }
                    None => {
                        first_name.insert((st.st_dev, st.st_ino), rel.into());
                    }
                }
            }
            need_bytes += need_of(e.kind, st);
            entries.push(e);
        };
    push(OsStr::new(""), top, &mut entries, &mut special);
    let mut stack: Vec<OsString> = Vec::new();
    if top.st_mode & libc::S_IFMT == libc::S_IFDIR {
        stack.push(OsString::new());
    }
    while let Some(rel) = stack.pop() {
        if super::stopping() || job.cancel.load(Ordering::Relaxed) {
            return Err(JobError::Stopped("stopped while planning".into()));
        }
        let ns = ns_of(&job.path, &rel);
        let rd = open_ns(&fs.local, &ns, libc::O_RDONLY | libc::O_DIRECTORY)
            .map_err(failed(format!("{}: cannot read the directory", show(&ns))))?;
        let pfd = open_ns_dir(&fs.local, &ns).map_err(failed(show(&ns)))?;
        let mut names = crate::fs::handle::list_dir(rd).map_err(failed(show(&ns)))?;
        names.sort();
        for (name, _) in names {
            if name == "." || name == ".." {
                continue;
            }
            let child_rel = rel_join(&rel, &name);
            let child_ns = crate::fs::object::join(&ns, &name);
            if rules.resolve(&child_ns).class != crate::rules::Class::Transitional {
                skipped.push(child_ns);
                continue;
            }
            let cn = cos(&name).map_err(failed(show(&child_ns)))?;
            let st = match fstatat(pfd.as_raw_fd(), &cn) {
                Ok(st) => st,
                Err(e) if e.errno() == libc::ENOENT => continue, // removed meanwhile
                Err(e) => return Err(failed(show(&child_ns))(e)),
            };
            push(&child_rel, &st, &mut entries, &mut special);
            if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                stack.push(child_rel);
            }
        }
    }
    if !special.is_empty() {
        let n = special.len();
        special.truncate(5);
        return Err(JobError::Refused(format!(
            "{}: contains {n} special file(s) that promotion does not copy: {}{}. \
             Remove them (or move them out of the tree) and promote again",
            show(&job.path),
            special.join(", "),
            if n > 5 { ", ..." } else { "" }
        )));
    }
    entries.shrink_to_fit();
    let files = entries.iter().filter(|e| !e.is_dir()).count() as u64;
    let bytes: u64 = entries
        .iter()
        .filter(|e| e.kind == EntryKind::File)
        .map(|e| e.size)
        .sum();
    job.files_total.store(files, Ordering::Relaxed);
    job.bytes_total.store(bytes, Ordering::Relaxed);
    Ok(Plan {
        entries,
        skipped,
        need_bytes,
    })
}

/// Decide the commit units: without `merge` the top alone (its target must not
/// exist); with `merge`, every object whose target is missing (with its subtree) or
/// is a file to replace. Refuses type conflicts.
pub fn assign_units(fs: &LabFs, path: &OsStr, entries: &mut [Entry], merge: bool) -> JobResult<()> {
    // Only directories that exist on Atlas are recorded: everything else is inside a
    // commit unit (the top's parent counts as existing), so this stays small.
    let mut existing: std::collections::HashSet<Box<OsStr>> = std::collections::HashSet::new();
    for e in entries.iter_mut() {
        let rb = e.rel().as_bytes();
        let parent_existing = match rb.iter().rposition(|c| *c == b'/') {
            Some(i) => existing.contains(OsStr::from_bytes(&rb[..i])),
            None if rb.is_empty() => true,
            None => existing.contains(OsStr::new("")),
        };
        if !parent_existing {
            e.unit = false;
            continue;
        }
        let ns = ns_of(path, e.rel());
        let target = atlas_lstat(fs, &ns).map_err(failed(format!("{} on Atlas", show(&ns))))?;
        match target {
            None => {
                e.unit = true;
                e.target_exists = false;
            }
            Some(t) => {
                let t_dir = t.st_mode & libc::S_IFMT == libc::S_IFDIR;
                if !merge {
                    return Err(JobError::Refused(format!(
                        "{}: already exists on Atlas; refusing to overwrite it. \
                         Use `labfs promote --merge` to add and replace its files one by one",
                        show(&ns)
                    )));
                }
                if t_dir != e.is_dir() {
                    return Err(JobError::Refused(format!(
                        "{}: is a {} on Atlas but a {} locally; resolve the conflict by hand",
                        show(&ns),
                        if t_dir { "directory" } else { "file" },
                        if e.is_dir() { "directory" } else { "file" }
                    )));
                }
                e.target_exists = true;
                if e.is_dir() {
                    e.unit = false;
                    existing.insert(Box::<OsStr>::from(e.rel()));
                } else {
                    e.unit = true;
                }
            }
        }
    }
    Ok(())
}

/// lstat of a namespace path on Atlas, `None` when it (or its parent) is missing.
pub fn atlas_lstat<P: AsRef<OsStr> + ?Sized>(
    fs: &LabFs,
    ns: &P,
) -> crate::error::Result<Option<libc::stat>> {
    let (dir, name) = split(ns.as_ref());
    let pfd = match open_ns_dir(&fs.atlas, dir) {
        Ok(fd) => fd,
        Err(e) if e.errno() == libc::ENOENT || e.errno() == libc::ENOTDIR => return Ok(None),
        Err(e) => return Err(e),
    };
    let c = cos(name)?;
    match fstatat(pfd.as_raw_fd(), &c) {
        Ok(st) => Ok(Some(st)),
        Err(e) if e.errno() == libc::ENOENT => Ok(None),
        Err(e) => Err(e),
    }
}
