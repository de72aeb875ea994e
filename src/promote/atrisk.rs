//! The at-risk report of `labfs status`: transitional data on this node's local SSD
//! that has not been promoted, by subtree (the topmost directory a transitional rule
//! places, e.g. `/scans/s1/work`), with size, file count and age (oldest mtime),
//! oldest first. This is what an operator checks before rebuilding a node.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::util;
use crate::fs::backend::{fstatat, join};
use crate::fs::{Creds, LabFs};
use crate::rules::{Class, Rules};

/// The walk gives up after this long (the report then says it is incomplete).
const BUDGET: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AtRisk {
    /// Oldest first.
    pub subtrees: Vec<Subtree>,
    pub total_bytes: u64,
    pub total_files: u64,
    /// False when the walk was cut short (very large local trees).
    pub complete: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Subtree {
    pub path: String,
    pub rule: String,
    pub bytes: u64,
    pub files: u64,
    /// Oldest mtime of a file in it (Unix seconds) and its RFC 3339 form.
    pub oldest_mtime: i64,
    pub oldest: String,
    pub age_secs: i64,
    /// A promotion of (part of) it is running.
    pub promoting: bool,
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

fn worth_descending(rules: &Rules, path: &str) -> bool {
    rules
        .rules()
        .iter()
        .any(|r| r.class == Class::Transitional && could_match_below(&r.path, path))
}

struct Walker<'a> {
    fs: &'a LabFs,
    rules: &'a Rules,
    deadline: Instant,
    complete: bool,
}

impl Walker<'_> {
    fn out_of_time(&mut self) -> bool {
        if Instant::now() > self.deadline {
            self.complete = false;
        }
        !self.complete
    }

    /// Children of a local directory with their lstat.
    fn children(&self, dir: &str) -> Vec<(String, libc::stat)> {
        let Ok(rd) = self
            .fs
            .local
            .open_beneath(dir, libc::O_RDONLY | libc::O_DIRECTORY)
        else {
            return Vec::new();
        };
        let Ok(pfd) = self.fs.local.open_dir(dir) else {
            return Vec::new();
        };
        let Ok(names) = crate::fs::handle::list_dir(rd) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (name, _) in names {
            let Some(n) = name.to_str() else { continue };
            if n == "." || n == ".." || (dir == "/" && n == ".labfs") {
                continue;
            }
            let Ok(c) = util::cstr(n) else { continue };
            if let Ok(st) = fstatat(pfd.as_raw_fd(), &c) {
                out.push((n.to_string(), st));
            }
        }
        out
    }

    /// Sum a transitional subtree.
    fn sum(&mut self, top: &str, st: &libc::stat, acc: &mut Subtree) {
        let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
        if !is_dir {
            acc.files += 1;
            if st.st_mode & libc::S_IFMT == libc::S_IFREG {
                acc.bytes += st.st_size as u64;
            }
            acc.oldest_mtime = acc.oldest_mtime.min(st.st_mtime);
            return;
        }
        let mut stack = vec![top.to_string()];
        while let Some(dir) = stack.pop() {
            if self.out_of_time() {
                return;
            }
            for (n, cst) in self.children(&dir) {
                let child = join(&dir, &n);
                if self.rules.resolve(&child).class != Class::Transitional {
                    continue;
                }
                if cst.st_mode & libc::S_IFMT == libc::S_IFDIR {
                    stack.push(child);
                } else {
                    acc.files += 1;
                    if cst.st_mode & libc::S_IFMT == libc::S_IFREG {
                        acc.bytes += cst.st_size as u64;
                    }
                    acc.oldest_mtime = acc.oldest_mtime.min(cst.st_mtime);
                }
            }
        }
    }
}

/// Walk the local backend (as root) for unpromoted transitional data.
pub fn report(fs: &LabFs) -> AtRisk {
    let _root = match Creds::root().assume() {
        Ok(g) => g,
        Err(e) => {
            tracing::error!("at-risk report: {e}");
            return AtRisk::default();
        }
    };
    let live = fs.live();
    let mut w = Walker {
        fs,
        rules: &live.rules,
        deadline: Instant::now() + BUDGET,
        complete: true,
    };
    let mut subtrees = Vec::new();
    let mut stack = vec!["/".to_string()];
    while let Some(dir) = stack.pop() {
        if w.out_of_time() {
            break;
        }
        for (n, st) in w.children(&dir) {
            let child = join(&dir, &n);
            let p = w.rules.resolve(&child);
            if p.class == Class::Transitional {
                let mut acc = Subtree {
                    path: child.clone(),
                    rule: p.rule_label(),
                    bytes: 0,
                    files: 0,
                    oldest_mtime: i64::MAX,
                    oldest: String::new(),
                    age_secs: 0,
                    promoting: super::in_flight(&child),
                };
                w.sum(&child, &st, &mut acc);
                if acc.files > 0 {
                    subtrees.push(acc);
                }
            } else if st.st_mode & libc::S_IFMT == libc::S_IFDIR
                && worth_descending(w.rules, &child)
            {
                stack.push(child);
            }
        }
    }
    let now = util::now_secs();
    for s in &mut subtrees {
        s.oldest = util::rfc3339(s.oldest_mtime);
        s.age_secs = (now - s.oldest_mtime).max(0);
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
        complete: w.complete,
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
