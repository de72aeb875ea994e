//! `labfs explain PATH`: what the rules decide for one path, and why.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cli::load_config;
use crate::exit::{EXIT_FAIL, EXIT_OK, EXIT_USAGE};
use crate::rules::{Placement, Writer};

/// One path's placement, as printed by `explain` (also the control reply).
#[derive(Debug, Serialize, Deserialize)]
pub struct Explained {
    pub path: String,
    pub class: String,
    pub backend: String,
    pub rule: String,
    pub read_only: bool,
    pub writers: Vec<String>,
    /// Only known through a mount: atlas, local-only, at-risk, promoting, promoted.
    pub state: Option<String>,
}

impl Explained {
    pub fn from_placement(path: &str, p: &Placement) -> Explained {
        Explained {
            path: path.to_string(),
            class: p.class.to_string(),
            backend: p.backend().to_string(),
            rule: p.rule_label(),
            read_only: p.read_only,
            writers: p
                .rule
                .as_ref()
                .map(|r| {
                    r.writers
                        .iter()
                        .map(|w| match w {
                            Writer::User { name, .. } => format!("user:{name}"),
                            Writer::Group { name, .. } => format!("group:{name}"),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            state: None,
        }
    }

    pub fn print(&self) {
        println!("path:      {}", self.path);
        println!("class:     {}", self.class);
        println!("backend:   {}", self.backend);
        println!("rule:      {}", self.rule);
        if self.read_only {
            if self.writers.is_empty() {
                println!("read-only: yes (no writers)");
            } else {
                println!("read-only: yes (writers: {})", self.writers.join(", "));
            }
        } else {
            println!("read-only: no");
        }
        if let Some(s) = &self.state {
            println!("state:     {s}");
        }
    }
}

/// The labfs mount containing `path`, if any (longest match in mountinfo).
pub fn labfs_mount_of(path: &Path) -> Option<PathBuf> {
    let canon = std::fs::canonicalize(path).ok()?;
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut best: Option<PathBuf> = None;
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let Some(sep) = f.iter().position(|x| *x == "-") else {
            continue;
        };
        if f.get(sep + 1) != Some(&"fuse.labfs") || f.len() < 5 {
            continue;
        }
        let mp = PathBuf::from(f[4].replace("\\040", " "));
        if canon.starts_with(&mp)
            && best
                .as_ref()
                .is_none_or(|b| mp.as_os_str().len() > b.as_os_str().len())
        {
            best = Some(mp);
        }
    }
    best
}

pub fn run(config: &Path, path: &Path) -> i32 {
    if labfs_mount_of(path).is_some() {
        return match xattr::get(path, crate::control::EXPLAIN) {
            Ok(Some(v)) => match serde_json::from_slice::<Explained>(&v) {
                Ok(e) => {
                    e.print();
                    EXIT_OK
                }
                Err(e) => {
                    eprintln!(
                        "labfs: {}: unreadable answer from the mount: {e}",
                        path.display()
                    );
                    EXIT_FAIL
                }
            },
            Ok(None) => {
                eprintln!("labfs: {}: the mount did not answer", path.display());
                EXIT_FAIL
            }
            Err(e) => {
                eprintln!("labfs: {}: {e}", path.display());
                EXIT_FAIL
            }
        };
    }
    let Some(ns) = path.to_str().filter(|s| s.starts_with('/')) else {
        eprintln!(
            "labfs: {}: give a path inside a labfs mount or an absolute namespace path",
            path.display()
        );
        return EXIT_USAGE;
    };
    let cfg = match load_config(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let ns = normalize(ns);
    Explained::from_placement(&ns, &cfg.rules.resolve(&ns)).print();
    EXIT_OK
}

/// "/a//b/./" -> "/a/b".
pub fn normalize(p: &str) -> String {
    let parts: Vec<&str> = p
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    format!("/{}", parts.join("/"))
}
