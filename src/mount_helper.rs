//! `mount.labfs` / `mount.fuse.labfs`: the labfs binary called by mount(8).
//!
//! For an fstab line such as
//!
//! ```text
//! /etc/labfs/labfs.toml  /lab  fuse.labfs  allow_other,_netdev,x-systemd.requires-mounts-for=/mnt/atlas  0 0
//! ```
//!
//! `mount /lab` (and systemd at boot) runs `/sbin/mount.fuse.labfs SRC DIR -o OPTS`
//! (util-linux looks for `mount.<type>` first, so fuse3's generic `mount.fuse3` is not
//! involved; `-t labfs` finds `mount.labfs`). Both names are symlinks to the labfs
//! binary, which recognises them by argv[0]. The interface is mount(8)'s EXTERNAL
//! HELPERS one: `SRC DIR [-sfnv] [-N NS] [-o OPTIONS] [-t TYPE]`.
//!
//! SRC is the rules file (`labfs#FILE` and a bare `labfs`, for the default file, are
//! accepted too). Options are sorted into three kinds by [`split_options`]:
//! - kernel mount flags and FUSE options, passed to the mount (`ro`, `noexec`,
//!   `noatime`, `max_read=N`, ...);
//! - labfs's own options (`allow_unmarked`, `recover`, `atlas_passthrough`,
//!   `log_file=FILE`, `log_level=LEVEL`);
//! - options meant for mount(8), systemd or fstab only, dropped (`_netdev`, `x-*`,
//!   `nofail`, `noauto`, `defaults`, `user`, ...), and options labfs always sets
//!   (`allow_other`, `default_permissions`).
//!
//! Anything else is refused (exit 1) so a typo in fstab is noticed, unless mount(8)
//! passes `-s` (sloppy), in which case it is dropped with a warning.
//!
//! Exit status follows mount(8): 0 mounted, 1 bad invocation or rules file, 32 the
//! mount failed (the reason is printed).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::cli::{ConfigArg, MountArgs};
use crate::exit::{EXIT_OK, EXIT_USAGE};

/// mount(8)'s "incorrect invocation or permissions".
pub const MOUNT_EX_USAGE: i32 = 1;
/// mount(8)'s "mount failure".
pub const MOUNT_EX_FAIL: i32 = 32;

const USAGE: &str = "usage: mount.labfs RULES_FILE MOUNTPOINT [-sfnv] [-o OPTIONS]\n\
(normally run by mount(8) for type fuse.labfs; see docs/operations.md)";

/// Whether argv[0] names the mount helper (`mount.labfs`, `mount.fuse.labfs`, or one
/// of those with a `-SUFFIX`, for side-by-side installs).
pub fn is_helper_name(argv0: &Path) -> bool {
    let Some(name) = argv0.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    ["mount.labfs", "mount.fuse.labfs"]
        .iter()
        .any(|base| name == *base || name.strip_prefix(base).is_some_and(|r| r.starts_with('-')))
}

/// Mount options, sorted.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Options {
    /// For the kernel (mount flags and FUSE options), in order.
    pub kernel: Vec<String>,
    pub allow_unmarked: bool,
    pub recover: bool,
    pub atlas_passthrough: bool,
    pub log_file: Option<PathBuf>,
    pub log_level: Option<String>,
    /// Dropped: for mount(8)/systemd only, or always set by labfs.
    pub dropped: Vec<String>,
    /// Unknown, dropped because of `-s` (sloppy).
    pub ignored: Vec<String>,
}

/// Options for mount(8), fstab and systemd only, never for the filesystem.
fn userspace_only(o: &str) -> bool {
    matches!(
        o,
        "_netdev"
            | "_rnetdev"
            | "auto"
            | "noauto"
            | "nofail"
            | "user"
            | "users"
            | "nouser"
            | "owner"
            | "group"
            | "defaults"
            | "rw"
            | "relatime"
            | "allow_other"
            | "default_permissions"
            | "allow_root"
            | "auto_unmount"
    ) || o.starts_with("x-")
        || o.starts_with("comment=")
        || o.starts_with("fsname=")
        || o.starts_with("subtype=")
        || o.starts_with("helper=")
}

/// Mount flags and FUSE options labfs hands to the kernel.
fn kernel_option(o: &str) -> bool {
    matches!(
        o,
        "ro" | "noexec"
            | "exec"
            | "nosuid"
            | "suid"
            | "nodev"
            | "dev"
            | "noatime"
            | "atime"
            | "sync"
            | "async"
            | "dirsync"
            | "lazytime"
            | "nolazytime"
    ) || o
        .strip_prefix("max_read=")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Sort a comma-separated option list (as in fstab). `sloppy` drops unknown options
/// instead of refusing them.
pub fn split_options(list: &str, sloppy: bool) -> Result<Options, String> {
    let mut out = Options::default();
    let mut unknown = Vec::new();
    for o in list.split(',').map(str::trim).filter(|o| !o.is_empty()) {
        if let Some(v) = o.strip_prefix("log_file=") {
            if v.is_empty() {
                return Err("log_file= needs a file name".into());
            }
            out.log_file = Some(PathBuf::from(v));
        } else if let Some(v) = o.strip_prefix("log_level=") {
            out.log_level = Some(v.to_string());
        } else if matches!(o, "allow_unmarked" | "allow-unmarked") {
            out.allow_unmarked = true;
        } else if o == "recover" {
            out.recover = true;
        } else if matches!(o, "atlas_passthrough" | "atlas-passthrough") {
            out.atlas_passthrough = true;
        } else if userspace_only(o) {
            out.dropped.push(o.to_string());
        } else if kernel_option(o) {
            out.kernel.push(o.to_string());
        } else {
            unknown.push(o.to_string());
        }
    }
    if !unknown.is_empty() {
        if sloppy {
            out.ignored = unknown;
        } else {
            return Err(format!(
                "unknown mount option{} {}: labfs takes kernel flags (ro, noexec, noatime, ...), \
                 max_read=N, and its own allow_unmarked, recover, atlas_passthrough, log_file=FILE, \
                 log_level=LEVEL",
                if unknown.len() > 1 { "s" } else { "" },
                unknown.join(", ")
            ));
        }
    }
    Ok(out)
}

/// What mount(8) asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelperArgs {
    pub config: PathBuf,
    pub mountpoint: PathBuf,
    /// `-f`: do everything but mount.
    pub fake: bool,
    /// `-s`: tolerate unknown options.
    pub sloppy: bool,
    pub verbose: bool,
    /// `-t TYPE`, when mount(8) went through a generic helper.
    pub fstype: Option<String>,
    pub options: Options,
}

/// The rules file named by mount's SRC field.
fn config_of(src: &str) -> PathBuf {
    let s = src.strip_prefix("labfs#").unwrap_or(src);
    if s.is_empty() || s == "labfs" {
        crate::config::Config::default_path()
    } else {
        PathBuf::from(s)
    }
}

/// Parse the helper's arguments (without argv[0]).
pub fn parse_args(args: &[OsString]) -> Result<HelperArgs, String> {
    let mut positional: Vec<PathBuf> = Vec::new();
    let mut opts: Vec<String> = Vec::new();
    let (mut fake, mut sloppy, mut verbose) = (false, false, false);
    let mut fstype = None;
    let mut i = 0;
    let text = |a: &OsString| -> Result<String, String> {
        a.to_str()
            .map(str::to_string)
            .ok_or_else(|| format!("argument {a:?} is not valid UTF-8"))
    };
    while i < args.len() {
        let a = &args[i];
        let bytes = a.as_encoded_bytes();
        if bytes.len() > 1 && bytes[0] == b'-' {
            let s = text(a)?;
            for (at, c) in s[1..].char_indices() {
                match c {
                    's' => sloppy = true,
                    'f' => fake = true,
                    'v' => verbose = true,
                    'n' => {} // no mtab: labfs never writes one
                    'o' | 't' | 'N' => {
                        let rest = &s[1 + at + 1..];
                        let value = if !rest.is_empty() {
                            rest.to_string()
                        } else {
                            i += 1;
                            match args.get(i) {
                                Some(v) => text(v)?,
                                None => return Err(format!("-{c} needs a value")),
                            }
                        };
                        match c {
                            'o' => opts.push(value),
                            't' => fstype = Some(value),
                            _ => {
                                return Err(
                                    "-N (mount in another namespace) is not supported by labfs"
                                        .into(),
                                )
                            }
                        }
                        break;
                    }
                    other => return Err(format!("unknown flag -{other}")),
                }
            }
        } else {
            positional.push(PathBuf::from(a));
        }
        i += 1;
    }
    if positional.len() != 2 {
        return Err(format!(
            "expected a rules file and a mountpoint, got {} argument{}",
            positional.len(),
            if positional.len() == 1 { "" } else { "s" }
        ));
    }
    if let Some(t) = &fstype {
        if t != "labfs" && t != "fuse.labfs" && !t.starts_with("fuse.labfs") {
            return Err(format!("-t {t}: this helper mounts labfs only"));
        }
    }
    let options = split_options(&opts.join(","), sloppy)?;
    let src = positional[0].to_string_lossy().into_owned();
    Ok(HelperArgs {
        config: config_of(&src),
        mountpoint: positional[1].clone(),
        fake,
        sloppy,
        verbose,
        fstype,
        options,
    })
}

/// Run as the mount helper when argv[0] says so; `None` otherwise.
pub fn dispatch() -> Option<i32> {
    let mut args = std::env::args_os();
    let argv0 = PathBuf::from(args.next()?);
    if !is_helper_name(&argv0) {
        return None;
    }
    let rest: Vec<OsString> = args.collect();
    // The kernel keeps 15 bytes of the program name, so a daemon started from fstab
    // would show as `mount.fuse.labf` in ps and top: name it labfs, like every other.
    let _ = crate::sys::set_thread_name(c"labfs");
    Some(run(&rest))
}

fn run(args: &[OsString]) -> i32 {
    let h = match parse_args(args) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("mount.labfs: {e}\n{USAGE}");
            return MOUNT_EX_USAGE;
        }
    };
    let level = h
        .options
        .log_level
        .clone()
        .or_else(|| h.verbose.then(|| "debug".to_string()));
    if let Err(e) = crate::cli::init_logging_to(level.as_deref(), h.options.log_file.as_deref()) {
        eprintln!("mount.labfs: {e}");
        return MOUNT_EX_USAGE;
    }
    if !h.options.dropped.is_empty() {
        tracing::debug!(
            "options for mount(8)/systemd, not passed on: {}",
            h.options.dropped.join(",")
        );
    }
    if !h.options.ignored.is_empty() {
        tracing::warn!(
            "unknown options ignored (-s): {}",
            h.options.ignored.join(",")
        );
    }
    if h.verbose {
        eprintln!(
            "mount.labfs: rules {} on {} with kernel options [{}]",
            h.config.display(),
            h.mountpoint.display(),
            h.options.kernel.join(",")
        );
    }
    if h.fake {
        // -f: check everything that can be checked without mounting.
        return match crate::cli::load_config(&h.config) {
            Ok(_) => EXIT_OK,
            Err(_) => MOUNT_EX_USAGE,
        };
    }
    let m = MountArgs {
        config: ConfigArg {
            config: h.config.clone(),
        },
        foreground: false,
        demo: false,
        demo_dir: None,
        allow_unmarked: h.options.allow_unmarked,
        recover: h.options.recover,
        options: Some(h.options.kernel.join(",")),
        atlas_passthrough: h.options.atlas_passthrough,
        log_file: h.options.log_file.clone(),
        mountpoint: h.mountpoint.clone(),
    };
    match crate::cli::mount(m) {
        EXIT_OK => EXIT_OK,
        EXIT_USAGE => MOUNT_EX_USAGE,
        _ => MOUNT_EX_FAIL,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<OsString> {
        s.iter().map(OsString::from).collect()
    }

    #[test]
    fn helper_names() {
        assert!(is_helper_name(Path::new("/sbin/mount.fuse.labfs")));
        assert!(is_helper_name(Path::new("mount.labfs")));
        assert!(is_helper_name(Path::new(
            "/usr/sbin/mount.fuse.labfs-test1"
        )));
        assert!(!is_helper_name(Path::new("/usr/bin/labfs")));
        assert!(!is_helper_name(Path::new("mount.labfsx")));
        assert!(!is_helper_name(Path::new("mount.fuse")));
    }

    #[test]
    fn the_fstab_line_of_the_issue() {
        // What mount(8) passes for
        // /etc/labfs/labfs.toml /lab fuse.labfs allow_other,_netdev,x-systemd.requires-mounts-for=/mnt/atlas 0 0
        // (it drops x-* itself, but older versions did not).
        let h = parse_args(&args(&[
            "/etc/labfs/labfs.toml",
            "/lab",
            "-o",
            "rw,allow_other,_netdev,x-systemd.requires-mounts-for=/mnt/atlas",
        ]))
        .expect("parses");
        assert_eq!(h.config, PathBuf::from("/etc/labfs/labfs.toml"));
        assert_eq!(h.mountpoint, PathBuf::from("/lab"));
        assert!(h.options.kernel.is_empty(), "{:?}", h.options);
        assert_eq!(
            h.options.dropped,
            vec![
                "rw",
                "allow_other",
                "_netdev",
                "x-systemd.requires-mounts-for=/mnt/atlas"
            ]
        );
        assert!(!h.fake && !h.sloppy && !h.verbose);
    }

    #[test]
    fn user_mounts_bring_flags_that_reach_the_kernel() {
        // `user` in fstab makes mount(8) add noexec,nosuid,nodev.
        let h = parse_args(&args(&[
            "labfs#/etc/labfs/x.toml",
            "/lab",
            "-v",
            "-o",
            "rw,noexec,nosuid,nodev,allow_other,_netdev,nofail,user",
            "-t",
            "fuse.labfs",
        ]))
        .expect("parses");
        assert_eq!(h.config, PathBuf::from("/etc/labfs/x.toml"));
        assert_eq!(h.options.kernel, vec!["noexec", "nosuid", "nodev"]);
        assert!(h.verbose);
        assert_eq!(h.fstype.as_deref(), Some("fuse.labfs"));
    }

    #[test]
    fn labfs_options_and_combined_flags() {
        let h = parse_args(&args(&[
            "labfs",
            "/lab",
            "-sfv",
            "-oro,allow_unmarked,recover,log_file=/var/log/labfs.log,log_level=debug,max_read=131072",
        ]))
        .expect("parses");
        assert_eq!(h.config, crate::config::Config::default_path());
        assert!(h.fake && h.sloppy && h.verbose);
        assert_eq!(h.options.kernel, vec!["ro", "max_read=131072"]);
        assert!(h.options.allow_unmarked && h.options.recover && !h.options.atlas_passthrough);
        assert_eq!(
            h.options.log_file,
            Some(PathBuf::from("/var/log/labfs.log"))
        );
        assert_eq!(h.options.log_level.as_deref(), Some("debug"));
    }

    #[test]
    fn several_o_flags_are_joined() {
        let h = parse_args(&args(&["c.toml", "/lab", "-o", "noatime", "-o", "recover"]))
            .expect("parses");
        assert_eq!(h.options.kernel, vec!["noatime"]);
        assert!(h.options.recover);
    }

    #[test]
    fn unknown_options_are_refused_unless_sloppy() {
        let e = parse_args(&args(&["c.toml", "/lab", "-o", "allow_unmarkd,noatime"])).unwrap_err();
        assert!(e.contains("allow_unmarkd"), "{e}");
        let h = parse_args(&args(&[
            "c.toml",
            "/lab",
            "-s",
            "-o",
            "allow_unmarkd,noatime",
        ]))
        .expect("sloppy");
        assert_eq!(h.options.ignored, vec!["allow_unmarkd"]);
        assert_eq!(h.options.kernel, vec!["noatime"]);
    }

    #[test]
    fn bad_invocations() {
        assert!(parse_args(&args(&["c.toml"]))
            .unwrap_err()
            .contains("got 1 argument"));
        assert!(parse_args(&args(&["c.toml", "/lab", "-o"]))
            .unwrap_err()
            .contains("-o needs a value"));
        assert!(parse_args(&args(&["c.toml", "/lab", "-x"]))
            .unwrap_err()
            .contains("-x"));
        assert!(parse_args(&args(&["c.toml", "/lab", "-t", "nfs"]))
            .unwrap_err()
            .contains("labfs only"));
        assert!(parse_args(&args(&["c.toml", "/lab", "-N", "/proc/1/ns/mnt"])).is_err());
        assert!(split_options("log_file=", false).is_err());
        assert!(split_options("max_read=abc", false).is_err());
    }
}
