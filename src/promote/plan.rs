//! Planning a job: walk the local tree (as root), refuse what cannot be promoted, and
//! decide which objects are renamed into place on their own (commit units).

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

use super::job::{failed, Job, JobError, JobResult};
use super::journal::{Entry, EntryKind};
use super::util::cstr;
use crate::fs::backend::{fstatat, join, split};
use crate::fs::LabFs;
use crate::rules::Class;

/// What the walk found.
pub struct Plan {
    pub entries: Vec<Entry>,
    /// Paths below the top that another rule places elsewhere: left where they are.
    pub skipped: Vec<String>,
}

pub fn entry_of(rel: &str, kind: EntryKind, st: &libc::stat) -> Entry {
    Entry {
        rel: rel.to_string(),
        kind,
        mode: st.st_mode,
        uid: st.st_uid,
        gid: st.st_gid,
        size: st.st_size as u64,
        alloc: (st.st_blocks as u64).saturating_mul(512),
        atime: (st.st_atime, st.st_atime_nsec),
        mtime: (st.st_mtime, st.st_mtime_nsec),
        ctime: (st.st_ctime, st.st_ctime_nsec),
        dev: st.st_dev,
        ino: st.st_ino,
        link_to: None,
        digest: None,
        unit: false,
        target_exists: false,
        staged_ino: None,
    }
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

fn rel_join(rel: &str, name: &str) -> String {
    if rel.is_empty() {
        name.to_string()
    } else {
        format!("{rel}/{name}")
    }
}

/// Walk the local tree of `job.path` (whose lstat is `top`).
pub fn walk(fs: &LabFs, job: &Job, top: &libc::stat) -> JobResult<Plan> {
    let rules = fs.live().rules.clone();
    let mut entries = Vec::new();
    let mut skipped = Vec::new();
    let mut special = Vec::new();
    let mut first_name: HashMap<(u64, u64), String> = HashMap::new();
    let mut push =
        |rel: &str, st: &libc::stat, entries: &mut Vec<Entry>, special: &mut Vec<String>| {
            let kind = match st.st_mode & libc::S_IFMT {
                libc::S_IFDIR => EntryKind::Dir,
                libc::S_IFREG => EntryKind::File,
                libc::S_IFLNK => EntryKind::Symlink,
                other => {
                    let p = if rel.is_empty() {
                        job.path.clone()
                    } else {
                        join(&job.path, rel)
                    };
                    special.push(format!("{p} ({})", kind_name(other)));
                    return;
                }
            };
            let mut e = entry_of(rel, kind, st);
            if kind == EntryKind::File && st.st_nlink > 1 {
                match first_name.get(&(st.st_dev, st.st_ino)) {
                    Some(first) => {
                        e.kind = EntryKind::Link;
                        e.link_to = Some(first.clone());
                    }
                    None => {
                        first_name.insert((st.st_dev, st.st_ino), rel.to_string());
                    }
                }
            }
            entries.push(e);
        };
    push("", top, &mut entries, &mut special);
    let mut stack: Vec<String> = Vec::new();
    if top.st_mode & libc::S_IFMT == libc::S_IFDIR {
        stack.push(String::new());
    }
    while let Some(rel) = stack.pop() {
        if super::stopping() || job.cancel.load(Ordering::Relaxed) {
            return Err(JobError::Stopped("stopped while planning".into()));
        }
        let ns = if rel.is_empty() {
            job.path.clone()
        } else {
            join(&job.path, &rel)
        };
        let rd = fs
            .local
            .open_beneath(&ns, libc::O_RDONLY | libc::O_DIRECTORY)
            .map_err(failed(format!("{ns}: cannot read the directory")))?;
        let pfd = fs.local.open_dir(&ns).map_err(failed(&ns))?;
        let mut names = crate::fs::handle::list_dir(rd).map_err(failed(&ns))?;
        names.sort();
        for (name, _) in names {
            let Some(n) = name.to_str() else {
                return Err(JobError::Refused(format!(
                    "{ns}: contains a name that is not UTF-8 ({}); rename it first",
                    name.to_string_lossy()
                )));
            };
            if n == "." || n == ".." {
                continue;
            }
            let child_rel = rel_join(&rel, n);
            let child_ns = join(&ns, n);
            if rules.resolve(&child_ns).class != Class::Transitional {
                skipped.push(child_ns);
                continue;
            }
            let cn = cstr(n).map_err(failed(&child_ns))?;
            let st = match fstatat(pfd.as_raw_fd(), &cn) {
                Ok(st) => st,
                Err(e) if e.errno() == libc::ENOENT => continue, // removed meanwhile
                Err(e) => return Err(failed(&child_ns)(e)),
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
            job.path,
            special.join(", "),
            if n > 5 { ", ..." } else { "" }
        )));
    }
    let files = entries.iter().filter(|e| !e.is_dir()).count() as u64;
    let bytes: u64 = entries
        .iter()
        .filter(|e| e.kind == EntryKind::File)
        .map(|e| e.size)
        .sum();
    job.files_total.store(files, Ordering::Relaxed);
    job.bytes_total.store(bytes, Ordering::Relaxed);
    Ok(Plan { entries, skipped })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Where {
    /// The target directory exists on Atlas: its children are decided one by one.
    Existing,
    /// Inside a commit unit: moves with it.
    Inside,
}

/// Decide the commit units: without `merge` the top alone (its target must not
/// exist); with `merge`, every object whose target is missing (with its subtree) or
/// is a file to replace. Refuses type conflicts.
pub fn assign_units(fs: &LabFs, path: &str, entries: &mut [Entry], merge: bool) -> JobResult<()> {
    let mut status: HashMap<String, Where> = HashMap::new();
    for e in entries.iter_mut() {
        let parent_rel = match e.rel.rfind('/') {
            Some(i) => Some(e.rel[..i].to_string()),
            None if e.rel.is_empty() => None,
            None => Some(String::new()),
        };
        let parent = match &parent_rel {
            None => Where::Existing,
            Some(p) => status.get(p).copied().unwrap_or(Where::Inside),
        };
        if parent == Where::Inside {
            e.unit = false;
            status.insert(e.rel.clone(), Where::Inside);
            continue;
        }
        let ns = if e.rel.is_empty() {
            path.to_string()
        } else {
            join(path, &e.rel)
        };
        let target = atlas_lstat(fs, &ns).map_err(failed(format!("{ns} on Atlas")))?;
        match target {
            None => {
                e.unit = true;
                e.target_exists = false;
                status.insert(e.rel.clone(), Where::Inside);
            }
            Some(t) => {
                let t_dir = t.st_mode & libc::S_IFMT == libc::S_IFDIR;
                if !merge {
                    return Err(JobError::Refused(format!(
                        "{ns}: already exists on Atlas; refusing to overwrite it. \
                         Use `labfs promote --merge` to add and replace its files one by one"
                    )));
                }
                if t_dir != e.is_dir() {
                    return Err(JobError::Refused(format!(
                        "{ns}: is a {} on Atlas but a {} locally; resolve the conflict by hand",
                        if t_dir { "directory" } else { "file" },
                        if e.is_dir() { "directory" } else { "file" }
                    )));
                }
                e.target_exists = true;
                if e.is_dir() {
                    e.unit = false;
                    status.insert(e.rel.clone(), Where::Existing);
                } else {
                    e.unit = true;
                    status.insert(e.rel.clone(), Where::Inside);
                }
            }
        }
    }
    Ok(())
}

/// lstat of a namespace path on Atlas, `None` when it (or its parent) is missing.
pub fn atlas_lstat(fs: &LabFs, ns: &str) -> crate::error::Result<Option<libc::stat>> {
    let (dir, name) = split(ns);
    let pfd = match fs.atlas.open_dir(dir) {
        Ok(fd) => fd,
        Err(e) if e.errno() == libc::ENOENT || e.errno() == libc::ENOTDIR => return Ok(None),
        Err(e) => return Err(e),
    };
    let c = cstr(name)?;
    match fstatat(pfd.as_raw_fd(), &c) {
        Ok(st) => Ok(Some(st)),
        Err(e) if e.errno() == libc::ENOENT => Ok(None),
        Err(e) => Err(e),
    }
}
