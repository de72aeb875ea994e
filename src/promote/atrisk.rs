//! The at-risk report of `labfs status`: transitional data on this node's local SSD
//! that has not been promoted, by subtree (the topmost directory a transitional rule
//! places, e.g. `/scans/s1/work`), with size, file count, age (oldest mtime) and the
//! files themselves, oldest first. This is what an operator checks before
//! rebuilding a node.
//!
//! The walk visits directories in name order and stops after a fixed number of
//! entries ([`ENTRY_BUDGET`]; none with `full`), so the same data always gives the
//! same report; a report cut short names the subtrees it did not finish and the
//! directories it did not reach.

use std::ffi::{OsStr, OsString};
use std::os::fd::AsRawFd;

use serde::{Deserialize, Serialize};

use super::util::{self, show};
use crate::fs::backend::fstatat;
use crate::fs::object::join;
use crate::fs::{Creds, LabFs};
use crate::rules::{Class, Rules};

/// Entries (files and directories) a quick walk visits before it stops.
pub const ENTRY_BUDGET: u64 = 250_000;
/// Files named per subtree in a quick report (all with `full`).
pub const NAMED_FILES: usize = 20;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AtRisk {
    /// Oldest first.
    pub subtrees: Vec<Subtree>,
    pub total_bytes: u64,
    pub total_files: u64,
    /// False when the walk was cut short (see `not_reached` and each subtree's
    /// `complete`); `labfs status --full` walks everything.
    pub complete: bool,
    /// Whether this is a `--full` walk.
    #[serde(default)]
    pub full: bool,
    /// Entries visited by the walk.
    #[serde(default)]
    pub entries_visited: u64,
    /// Directories the walk did not reach (they may hold more at-risk data).
    #[serde(default)]
    pub not_reached: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Subtree {
    /// The namespace path; bytes that are not UTF-8 shown as `\xNN`.
    pub path: String,
    /// The path's bytes in hex, only when it is not UTF-8 (`path` is then for reading).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_hex: Option<String>,
    /// The deciding rule with its line, e.g. `/scans/*/work (line 13)`.
    pub rule: String,
    /// The rule's pattern alone, e.g. `/scans/*/work`.
    #[serde(default)]
    pub rule_path: String,
    pub bytes: u64,
    pub files: u64,
    /// Oldest mtime of a file in it (Unix seconds) and its RFC 3339 form.
    pub oldest_mtime: i64,
    pub oldest: String,
    pub age_secs: i64,
    /// A promotion of (part of) it is running.
    pub promoting: bool,
    /// The rule's `max_unpromoted`, in seconds.
    #[serde(default)]
    pub max_unpromoted_secs: Option<u64>,
    /// Older than `max_unpromoted`.
    #[serde(default)]
    pub overdue: bool,
    /// False when the walk stopped inside this subtree (counts are a lower bound).
    #[serde(default = "yes")]
    pub complete: bool,
    /// The at-risk files (namespace paths, in walk order, shown as `path` is): all of
    /// them with `full`, else the first [`NAMED_FILES`].
    #[serde(default)]
    pub named: Vec<String>,
}

fn yes() -> bool {
    true
}

/// Whether some path at or below `path` could match `pattern` (conservative).
fn could_match_below(pattern: &str, path: &str) -> bool {
    let pat: Vec<&str> = pattern.split('/').filter(|s| !s.is_empty()).collect();
    let comps: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    fn go(pat: &[&str], comps: &[&str]) -> bool {
        if comps.is_empty() || pat.is_empty() {
            return true;
        }
        match pat[0] {
            "**" => go(&pat[1..], comps) || go(pat, &comps[1..]),
            "*" => go(&pat[1..], &comps[1..]),
            lit => lit == comps[0] && go(&pat[1..], &comps[1..]),
        }
    }
    go(&pat, &comps)
}

fn worth_descending(transitional: &[&str], path: &str) -> bool {
    transitional.iter().any(|r| could_match_below(r, path))
}

struct Walker<'a> {
    fs: &'a LabFs,
    rules: &'a Rules,
    budget: Option<u64>,
    visited: u64,
}

impl Walker<'_> {
    fn out_of_budget(&self) -> bool {
        self.budget.is_some_and(|b| self.visited >= b)
    }

    /// Children of a local directory with their lstat, in name order.
    fn children(&mut self, dir: &OsStr) -> Vec<(OsString, libc::stat)> {
        let Ok(rd) = util::open_ns(&self.fs.local, dir, libc::O_RDONLY | libc::O_DIRECTORY) else {
            return Vec::new();
        };
        let Ok(pfd) = util::open_ns_dir(&self.fs.local, dir) else {
            return Vec::new();
        };
        let Ok(names) = crate::fs::handle::list_dir(rd) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (name, _) in names {
            if name == "." || name == ".." || (dir == "/" && name == ".labfs") {
                continue;
            }
            let Ok(c) = util::cos(&name) else { continue };
            if let Ok(st) = fstatat(pfd.as_raw_fd(), &c) {
                out.push((name, st));
            }
        }
        self.visited += out.len() as u64;
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn add_file(&self, acc: &mut Subtree, path: &OsStr, st: &libc::stat) {
        acc.files += 1;
        if st.st_mode & libc::S_IFMT == libc::S_IFREG {
            acc.bytes += st.st_size as u64;
        }
        acc.oldest_mtime = acc.oldest_mtime.min(st.st_mtime);
        if self.budget.is_none() || acc.named.len() < NAMED_FILES {
            acc.named.push(show(path));
        }
    }

    /// Sum a transitional subtree; false when the budget ran out inside it.
    fn sum(&mut self, top: &OsStr, st: &libc::stat, acc: &mut Subtree) -> bool {
        if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
            self.add_file(acc, top, st);
            return true;
        }
        // Depth first, in name order (a stack of name-sorted lists, reversed).
        let mut stack = vec![top.to_os_string()];
        while let Some(dir) = stack.pop() {
            if self.out_of_budget() {
                return false;
            }
            let mut dirs = Vec::new();
            for (n, cst) in self.children(&dir) {
                let child = join(&dir, &n);
                if self.rules.resolve(&child).class != Class::Transitional {
                    continue;
                }
                if cst.st_mode & libc::S_IFMT == libc::S_IFDIR {
                    dirs.push(child);
                } else {
                    self.add_file(acc, &child, &cst);
                }
            }
            stack.extend(dirs.into_iter().rev());
        }
        true
    }
}

/// Walk the local backend (as root) for unpromoted transitional data; `full`: with
/// no entry budget.
pub fn report(fs: &LabFs, full: bool) -> AtRisk {
    let _root = match Creds::root().assume() {
        Ok(g) => g,
        Err(e) => {
            tracing::error!("at-risk report: {e}");
            return AtRisk::default();
        }
    };
    let live = fs.live();
    let transitional: Vec<&str> = live
        .rules
        .rules()
        .iter()
        .filter(|r| r.class == Class::Transitional)
        .map(|r| r.path.as_str())
        .collect();
    let mut w = Walker {
        fs,
        rules: &live.rules,
        budget: (!full).then_some(ENTRY_BUDGET),
        visited: 0,
    };
    let mut subtrees = Vec::new();
    let mut not_reached = Vec::new();
    let mut complete = true;
    let mut stack = vec![OsString::from("/")];
    if transitional.is_empty() {
        stack.clear();
    }
    while let Some(dir) = stack.pop() {
        if w.out_of_budget() {
            complete = false;
            not_reached.push(show(&dir));
            continue;
        }
        let mut dirs = Vec::new();
        for (n, st) in w.children(&dir) {
            let child = join(&dir, &n);
            let p = w.rules.resolve(&child);
            if p.class == Class::Transitional {
                let max = p.rule.as_ref().and_then(|r| r.max_unpromoted);
                let mut acc = Subtree {
                    path: show(&child),
                    path_hex: super::job::hex_unless_utf8(&child),
                    rule: p.rule_label(),
                    rule_path: p.rule.as_ref().map(|r| r.path.clone()).unwrap_or_default(),
                    bytes: 0,
                    files: 0,
                    oldest_mtime: i64::MAX,
                    oldest: String::new(),
                    age_secs: 0,
                    promoting: super::in_flight(&child),
                    max_unpromoted_secs: max.map(|d| d.as_secs()),
                    overdue: false,
                    complete: true,
                    named: Vec::new(),
                };
                if !w.sum(&child, &st, &mut acc) {
                    acc.complete = false;
                    complete = false;
                }
                if acc.files > 0 || !acc.complete {
                    subtrees.push(acc);
                }
            } else if st.st_mode & libc::S_IFMT == libc::S_IFDIR
                && worth_descending(&transitional, &child.to_string_lossy())
            {
                dirs.push(child);
            }
        }
        stack.extend(dirs.into_iter().rev());
    }
    not_reached.sort();
    let now = util::now_secs();
    for s in &mut subtrees {
        if s.files == 0 {
            s.oldest_mtime = now;
        }
        s.oldest = util::rfc3339(s.oldest_mtime);
        s.age_secs = (now - s.oldest_mtime).max(0);
        s.overdue = s
            .max_unpromoted_secs
            .is_some_and(|m| s.files > 0 && s.age_secs as u64 > m);
    }
    subtrees.sort_by(|a, b| {
        a.oldest_mtime
            .cmp(&b.oldest_mtime)
            .then_with(|| a.path.cmp(&b.path))
    });
    AtRisk {
        total_bytes: subtrees.iter().map(|s| s.bytes).sum(),
        total_files: subtrees.iter().map(|s| s.files).sum(),
        subtrees,
        complete,
        full,
        entries_visited: w.visited,
        not_reached,
    }
}

/// `3d 4h`, `5h 2m`, `7m`, `12s`.
pub fn age(secs: i64) -> String {
    let s = secs.max(0);
    let (d, h, m) = (s / 86_400, (s % 86_400) / 3600, (s % 3600) / 60);
    if d > 0 {
        format!("{d}d {h}h")
    } else if h > 0 {
        format!("{h}h {m}m")
    } else if m > 0 {
        format!("{m}m")
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_matching_is_conservative() {
        assert!(could_match_below("/scans/*/work", "/scans"));
        assert!(could_match_below("/scans/*/work", "/scans/s1"));
        assert!(could_match_below("/scans/*/work", "/scans/s1/work/x"));
        assert!(!could_match_below("/scans/*/work", "/docs"));
        assert!(!could_match_below("/scans/*/work", "/scans/s1/other"));
        assert!(could_match_below("/a/**/w", "/a/b/c/d"));
    }
}
