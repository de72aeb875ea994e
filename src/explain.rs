//! `labfs explain PATH`: what the rules decide for one path, and why.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::exit::load_config;
use crate::exit::{EXIT_FAIL, EXIT_OK, EXIT_USAGE};

use crate::rules::{Placement, Unplaced, Writer};

/// One path's placement, as printed by `explain` (also the control reply).
#[derive(Debug, Serialize, Deserialize)]
pub struct Explained {
    /// The namespace path as [`crate::check::shown`] writes it.
    pub path: String,
    /// The path's bytes in hex, only when they are not UTF-8 (`path` is then for
    /// reading): the exact name, for a program reading the control reply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_hex: Option<String>,
    pub class: String,
    pub backend: String,
    pub rule: String,
    pub read_only: bool,
    pub writers: Vec<String>,
    /// Only known through a mount: atlas, local-only, at-risk, promoting, promoted.
    pub state: Option<String>,
}

impl Explained {
    /// `path` is shown as [`crate::check::shown`] writes it: a name that is not UTF-8
    /// keeps every byte visible (`\xNN`), and the JSON reply stays valid.
    pub fn from_placement(path: &OsStr, p: &Placement, unplaced: Unplaced) -> Explained {
        let denied = p.rule.is_none() && unplaced == Unplaced::Deny;
        Explained {
            path: crate::check::shown(path),
            path_hex: crate::promote::job::hex_unless_utf8(path),
            class: if denied {
                "none: refused (unplaced = \"deny\")".to_string()
            } else {
                p.class.to_string()
            },
            backend: if denied {
                "none".to_string()
            } else {
                p.backend().to_string()
            },
            rule: if denied {
                "no rule matches; unplaced = \"deny\" refuses creating anything here (EACCES)"
                    .to_string()
            } else {
                p.rule_label()
            },
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

/// The nearest existing ancestor of `path` (itself included when it exists and is a
/// regular file or directory, which can carry user xattrs) and the rest below it.
fn anchor(path: &Path) -> Option<(PathBuf, PathBuf)> {
    let mut base = path.to_path_buf();
    let mut rest: Vec<std::ffi::OsString> = Vec::new();
    loop {
        if let Ok(m) = std::fs::symlink_metadata(&base) {
            if m.is_dir() || (m.is_file() && rest.is_empty()) {
                let mut r = PathBuf::new();
                for c in rest.iter().rev() {
                    r.push(c);
                }
                return Some((base, r));
            }
        }
        let name = base.file_name()?.to_os_string();
        rest.push(name);
        if !base.pop() {
            return None;
        }
    }
}

/// What the mount holding `path` says about it: `None` when `path` is not inside a
/// labfs mount (no mount answers the control request).
fn ask_mount(path: &Path) -> Option<Result<Explained, String>> {
    let abs = std::path::absolute(path).ok()?;
    // Lexically: `a/../b` must not be resolved through a symlink `a`.
    let abs = PathBuf::from(normalize_dots(abs.as_os_str())?);
    let (base, rest) = anchor(&abs)?;
    let shown = crate::check::shown(path.as_os_str());
    // The missing part travels in the control name as it is: any bytes but NUL.
    let rest = rest.as_os_str().as_bytes();
    let name = if rest.is_empty() {
        OsString::from(crate::control::EXPLAIN)
    } else {
        let mut n = crate::control::EXPLAIN_BELOW.as_bytes().to_vec();
        n.extend_from_slice(rest);
        OsString::from_vec(n)
    };
    match xattr::get(&base, &name) {
        Ok(Some(v)) => Some(
            serde_json::from_slice::<Explained>(&v)
                .map_err(|e| format!("{shown}: unreadable answer from the mount: {e}")),
        ),
        // ENODATA (`Ok(None)`): no labfs mount answers, or one of protocol 1 did not
        // take a name that is not UTF-8 (ENOTSUP, EPERM: its backend refused it).
        Ok(None) if std::str::from_utf8(rest).is_err() => older_daemon(&base, &shown),
        Ok(None) => None,
        Err(e) => match e.raw_os_error() {
            Some(libc::ENODATA) | Some(libc::ENOTSUP) | Some(libc::EPERM)
                if std::str::from_utf8(rest).is_err() =>
            {
                older_daemon(&base, &shown)
            }
            Some(libc::ENODATA) | Some(libc::ENOTSUP) | Some(libc::EPERM) => None,
            Some(libc::ENOTCONN) | Some(libc::ECONNABORTED) => Some(Err(format!(
                "{shown}: the labfs daemon of this mount died (Transport endpoint is not connected)"
            ))),
            Some(libc::ERANGE) | Some(libc::ENAMETOOLONG) => Some(Err(format!(
                "{shown}: the part that does not exist yet is too long to ask the mount about \
                 (a control name holds {} bytes of it); create it, or explain its namespace path",
                255 - crate::control::EXPLAIN_BELOW.len()
            ))),
            _ => Some(Err(format!("{shown}: {e}"))),
        },
    }
}

/// A daemon of control protocol 1 takes control names as UTF-8 only and hands any
/// other to its backend, which answers "no such attribute": when `base` is on a labfs
/// mount, say which protocol it speaks; `None` (the rules file answers) when it is not.
fn older_daemon(base: &Path, shown: &str) -> Option<Result<Explained, String>> {
    xattr::get(base, crate::control::EXPLAIN).ok()??;
    let now = crate::control::PROTOCOL;
    Some(Err(match xattr::get(base, crate::control::PROTOCOL_NAME) {
        Ok(Some(v)) => format!(
            "{shown}: the labfs daemon of this mount (control protocol {}) did not explain it",
            String::from_utf8_lossy(&v)
        ),
        _ => format!(
            "{shown}: the labfs daemon of this mount speaks control protocol 1, which carries \
             only UTF-8 names, and the part that does not exist yet is not UTF-8; mount with \
             this labfs (control protocol {now}), create it, or explain its namespace path"
        ),
    }))
}

/// "/a/./b/../c" -> "/a/c" (bytes); `None` when `..` climbs above the root.
fn normalize_dots(p: &OsStr) -> Option<OsString> {
    let mut out: Vec<&[u8]> = Vec::new();
    for c in p.as_bytes().split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                out.pop()?;
            }
            c => out.push(c),
        }
    }
    let mut v = Vec::new();
    for c in &out {
        v.push(b'/');
        v.extend_from_slice(c);
    }
    if v.is_empty() {
        v.push(b'/');
    }
    Some(OsString::from_vec(v))
}

pub fn run(config: &Path, path: &Path) -> i32 {
    // Asked of the mount first: a path inside a labfs mount (existing or not, a
    // symlink too) is answered by the daemon with the rules in force. This needs no
    // /proc (a chroot without it still works).
    match ask_mount(path) {
        Some(Ok(e)) => {
            e.print();
            return EXIT_OK;
        }
        Some(Err(msg)) => {
            eprintln!("labfs: {msg}");
            return EXIT_FAIL;
        }
        None => {}
    }
    let ns = path.as_os_str();
    if !ns.as_bytes().starts_with(b"/") {
        eprintln!(
            "labfs: {}: not inside a labfs mount; give a path inside one, or an absolute namespace path such as /media/x",
            crate::check::shown(ns)
        );
        return EXIT_USAGE;
    }
    let cfg = match load_config(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let ns = normalize_os(ns);
    Explained::from_placement(&ns, &cfg.rules.resolve(&ns), cfg.rules.unplaced()).print();
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

/// [`normalize`] on bytes: any name a backend holds.
pub fn normalize_os(p: &OsStr) -> OsString {
    let mut v = Vec::new();
    for c in p
        .as_bytes()
        .split(|b| *b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
    {
        v.push(b'/');
        v.extend_from_slice(c);
    }
    if v.is_empty() {
        v.push(b'/');
    }
    OsString::from_vec(v)
}
