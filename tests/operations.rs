//! Operating labfs (issue 4): lifecycle (SIGTERM, umount, already mounted, stale mounts,
//! reload), the mount(8) helper and fstab, the systemd unit, `labfs status`, the backup
//! scope checked with the real backup tools, logs, and the node rebuild drill.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::{mount_fstype, wait_until, MountedLab, Sh, DEFAULT_RULES, LABFS, USER};

const WAIT: Duration = Duration::from_secs(20);

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Waits for our child `pid` (the fixture's daemon) to exit; its exit code, or
/// 128 + signal.
fn reap(pid: u32, timeout: Duration) -> i32 {
    let mut status: libc::c_int = 0;
    let mut code = None;
    wait_until(&format!("labfs daemon {pid} exits"), timeout, || {
        // SAFETY: waitpid on our own child with a valid out-pointer.
        let r = unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) };
        if r == pid as i32 {
            code = Some(if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                128 + libc::WTERMSIG(status)
            });
        }
        r != 0
    });
    code.expect("the daemon was not our child")
}

fn status_json(mnt: &Path) -> serde_json::Value {
    let out = Sh::program(LABFS, &["status", "--json", &s(mnt)]).ok();
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json is not JSON ({e}):\n{out}"))
}

fn xattr_class(p: &Path) -> String {
    let out = Sh::program(
        "getfattr",
        &["--only-values", "-n", "user.labfs.class", &s(p)],
    )
    .ok();
    out.trim().to_string()
}

/// Lines of the daemon log at `level` (INFO, WARN, ...) that contain every needle.
fn log_lines(log: &str, level: &str, needles: &[&str]) -> usize {
    log.lines()
        .filter(|l| l.split_whitespace().any(|w| w == level))
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .count()
}

// ---------------------------------------------------------------------------
// Lifecycle
// ---------------------------------------------------------------------------

#[test]
fn sigterm_unmounts_and_the_daemon_exits_zero() {
    let lab = MountedLab::new();
    lab.sh(r#"mkdir -p docs cache; echo kept > docs/a; echo local > cache/b"#);
    // A file held open across the signal: the mount leaves the namespace at once, the
    // open file keeps working, and the daemon exits 0 once it is closed.
    let mut open = fs::File::open(lab.path("docs/a")).expect("open docs/a");
    let pid = lab.pid();
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    wait_until("the mount is gone", WAIT, || {
        mount_fstype(lab.mnt()).is_none()
    });
    let mut text = String::new();
    std::io::Read::read_to_string(&mut open, &mut text).expect("read the open file");
    assert_eq!(text, "kept\n");
    drop(open);
    assert_eq!(reap(pid, WAIT), 0, "daemon log:\n{}", lab.daemon_log());
    assert_eq!(
        fs::read_to_string(lab.atlas_path("docs/a")).unwrap_or_default(),
        "kept\n"
    );
    assert_eq!(
        fs::read_to_string(lab.local_path("cache/b")).unwrap_or_default(),
        "local\n"
    );
    assert!(
        lab.daemon_log().contains("unmounted; exiting"),
        "{}",
        lab.daemon_log()
    );
}

#[test]
fn umount_stops_the_daemon_with_exit_zero() {
    let mut lab = MountedLab::new();
    lab.sh("mkdir -p docs && echo x > docs/f");
    lab.unmount();
    assert!(!lab.is_mounted());
}

#[test]
fn mounting_over_a_live_labfs_mount_says_so() {
    let lab = MountedLab::new();
    let out = Sh::program(
        LABFS,
        &["mount", "--config", &s(lab.config_path()), &s(lab.mnt())],
    )
    .fails();
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("already a labfs mount"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr
            .contains(&format!("umount {}", lab.mnt().display())),
        "{}",
        out.stderr
    );
    // The live mount is untouched.
    lab.sh("mkdir -p docs && echo still > docs/f && cat docs/f");
}

#[test]
fn a_stale_mount_is_named_and_recover_fixes_it() {
    let lab = MountedLab::new();
    lab.sh("mkdir -p docs cache && echo a > docs/a && echo c > cache/c");
    let pid = lab.pid();
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    reap(pid, WAIT);
    let mnt = s(lab.mnt());
    let (code, _, err) = Sh::program("ls", &[&mnt]).status().tuple();
    assert_ne!(code, 0);
    assert!(err.contains("Transport endpoint is not connected"), "{err}");

    let out = Sh::program(LABFS, &["status", &mnt]).fails();
    assert!(
        out.stderr.contains("daemon of this mount died"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("--recover"), "{}", out.stderr);

    let cfg = s(lab.config_path());
    let log = s(&lab.scratch_path("recover.log"));
    let out = Sh::program(
        LABFS,
        &["mount", "--config", &cfg, "--log-file", &log, &mnt],
    )
    .fails();
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("previous labfs daemon died") && out.stderr.contains("--recover"),
        "{}",
        out.stderr
    );

    let out = Sh::program(
        LABFS,
        &[
            "mount",
            "--recover",
            "--config",
            &cfg,
            "--log-file",
            &log,
            &mnt,
        ],
    )
    .ok();
    assert!(out.contains("mounted"), "{out}");
    assert_eq!(lab.sh("cat docs/a cache/c"), "a\nc\n");
    // The daemonized mount logs to its file, and `umount` ends it cleanly.
    Sh::program("umount", &[&mnt]).ok();
    wait_until("the recovered daemon logs its exit", WAIT, || {
        fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("unmounted; exiting")
    });
    let text = fs::read_to_string(&log).unwrap_or_default();
    assert!(text.contains("removing the dead mount"), "{text}");
    assert!(text.contains(&format!("mounted {mnt}")), "{text}");
    assert!(mount_fstype(lab.mnt()).is_none());
}

fn append_rule(lab: &MountedLab, text: &str) {
    let mut cfg = lab.config_text();
    cfg.push_str(text);
    fs::write(lab.config_path(), cfg).expect("write rules file");
}

#[test]
fn sighup_reloads_a_valid_rules_file_and_keeps_the_old_rules_otherwise() {
    let lab = MountedLab::new();
    lab.sh("mkdir -p projects");
    assert_eq!(xattr_class(&lab.path("projects")), "authoritative");

    append_rule(
        &lab,
        "\n[[rule]]\npath = \"/projects\"\nclass = \"runtime\"\n",
    );
    let line = lab.rule_line("/projects");
    unsafe { libc::kill(lab.pid() as i32, libc::SIGHUP) };
    assert!(
        lab.wait_for_log("rules reloaded from", WAIT),
        "{}",
        lab.daemon_log()
    );
    assert_eq!(xattr_class(&lab.path("projects")), "runtime");
    let explained = Sh::program(LABFS, &["explain", &s(&lab.path("projects"))]).ok();
    assert!(explained.contains("runtime"), "{explained}");
    assert!(
        explained.contains(&format!("/projects (line {line})")),
        "{explained}"
    );

    // An invalid file: refused, said so with the line, the old rules stay.
    append_rule(
        &lab,
        "\n[[rule]]\npath = \"/projects/x\"\nclass = \"precious\"\n",
    );
    let bad_line = lab.rule_line("/projects/x");
    unsafe { libc::kill(lab.pid() as i32, libc::SIGHUP) };
    assert!(
        lab.wait_for_log("rules NOT reloaded", WAIT),
        "{}",
        lab.daemon_log()
    );
    let log = lab.daemon_log();
    assert!(
        log.contains(&format!(":{bad_line}:")) || log.contains(&format!(":{}:", bad_line + 2)),
        "{log}"
    );
    assert_eq!(xattr_class(&lab.path("projects")), "runtime");
    lab.sh("echo still-works > projects/f && cat projects/f");
}

#[test]
fn labfs_reload_goes_through_the_mount() {
    let lab = MountedLab::new();
    lab.sh("mkdir -p projects/sub");
    let mnt = s(lab.mnt());
    append_rule(
        &lab,
        "\n[[rule]]\npath = \"/projects\"\nclass = \"runtime\"\n",
    );
    // From any path inside the mount, e.g. a container's bind mount of a subtree.
    let out = Sh::program(LABFS, &["reload", &s(&lab.path("projects/sub"))]).ok();
    assert!(out.contains("rules reloaded"), "{out}");
    assert_eq!(xattr_class(&lab.path("projects")), "runtime");

    append_rule(&lab, "\nbogus_key = 1\n");
    let out = Sh::program(LABFS, &["reload", &mnt]).fails();
    assert_eq!(out.code, 2, "{out:?}");
    assert!(
        out.stderr.contains("NOT reloaded") && out.stderr.contains("bogus_key"),
        "{}",
        out.stderr
    );
    assert!(lab.wait_for_log("rules NOT reloaded", WAIT));
    assert_eq!(xattr_class(&lab.path("projects")), "runtime");

    let out = Sh::program(LABFS, &["reload", &mnt])
        .user(USER, USER)
        .fails();
    assert!(out.stderr.contains("only root"), "{}", out.stderr);
}

// ---------------------------------------------------------------------------
// mount(8) helper and fstab
// ---------------------------------------------------------------------------

/// `/sbin/mount.fuse.labfs-itPID` -> the binary under test; removed on drop. A
/// suffixed name so a real installation's `mount.fuse.labfs` is never touched.
struct Helper {
    link: PathBuf,
    fstype: String,
}

impl Helper {
    fn install(tag: &str) -> Helper {
        let fstype = format!("fuse.labfs-it{}{tag}", std::process::id());
        let link = PathBuf::from(format!("/sbin/mount.{fstype}"));
        let _ = fs::remove_file(&link);
        symlink(LABFS, &link).unwrap_or_else(|e| panic!("cannot install {}: {e}", link.display()));
        Helper { link, fstype }
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.link);
    }
}

/// A lab whose own daemon is stopped, leaving backends, rules and mountpoint.
fn unmounted_lab() -> MountedLab {
    let mut lab = MountedLab::new();
    lab.unmount();
    lab
}

#[test]
fn an_fstab_line_mounts_with_mount_and_umount_stops_it() {
    let lab = unmounted_lab();
    let helper = Helper::install("a");
    let log = lab.scratch_path("helper.log");
    let fstab = lab.scratch_path("fstab");
    // The issue's fstab line, with this lab's files, plus noatime and a log file.
    fs::write(
        &fstab,
        format!(
            "# test fstab\n{} {} {} allow_other,_netdev,x-systemd.requires-mounts-for=/mnt/atlas,nofail,noatime,log_file={} 0 0\n",
            lab.config_path().display(),
            lab.mnt().display(),
            helper.fstype,
            log.display()
        ),
    )
    .expect("write fstab");
    let mnt = s(lab.mnt());
    // `mount /lab` with this fstab (-T: alternative fstab).
    let out = Sh::program("mount", &["-T", &s(&fstab), &mnt]).status();
    assert!(
        out.ok(),
        "mount failed: {out:?}\nlog:\n{}",
        fs::read_to_string(&log).unwrap_or_default()
    );
    assert_eq!(mount_fstype(lab.mnt()).as_deref(), Some("fuse.labfs"));
    let info = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let line = info
        .lines()
        .find(|l| l.contains(&format!(" {mnt} ")))
        .expect("mountinfo line");
    assert!(
        line.contains("noatime") && line.contains("allow_other"),
        "{line}"
    );
    // Works for a user, lands where the rules say.
    lab.sh("mkdir -p docs cache && chmod 1777 docs cache");
    lab.sh_as(
        USER,
        USER,
        "echo a > docs/u && echo b > cache/u && cat docs/u cache/u",
    );
    assert!(lab.atlas_path("docs/u").exists() && lab.local_path("cache/u").exists());
    assert!(Sh::program(LABFS, &["status", &mnt])
        .ok()
        .contains("answering"));

    Sh::program("umount", &[&mnt]).ok();
    assert!(mount_fstype(lab.mnt()).is_none());
    wait_until("the daemon logs its exit", WAIT, || {
        fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("unmounted; exiting")
    });
}

#[test]
fn mount_t_passes_options_and_refuses_unknown_ones() {
    let lab = unmounted_lab();
    let helper = Helper::install("b");
    let (cfg, mnt) = (s(lab.config_path()), s(lab.mnt()));
    let log = s(&lab.scratch_path("helper.log"));

    let out = Sh::program(
        "mount",
        &["-t", &helper.fstype, &cfg, &mnt, "-o", "allow_other,noatme"],
    )
    .fails();
    assert!(
        out.stderr.contains("unknown mount option noatme"),
        "{out:?}"
    );
    assert!(mount_fstype(lab.mnt()).is_none());

    let out = Sh::program(
        "mount",
        &["-t", &helper.fstype, "/nonexistent/labfs.toml", &mnt],
    )
    .fails();
    assert!(out.stderr.contains("/nonexistent/labfs.toml"), "{out:?}");
    assert!(mount_fstype(lab.mnt()).is_none());

    let opts = format!("allow_other,ro,_netdev,log_file={log}");
    Sh::program("mount", &["-t", &helper.fstype, &cfg, &mnt, "-o", &opts]).ok();
    let (code, _, err) = lab.sh_status("mkdir -p docs");
    assert_ne!(code, 0);
    assert!(err.contains("Read-only file system"), "{err}");
    Sh::program("umount", &[&mnt]).ok();
    assert!(mount_fstype(lab.mnt()).is_none());
}

// ---------------------------------------------------------------------------
// systemd
// ---------------------------------------------------------------------------

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    assert!(
        Sh::program("sh", &["-c", "command -v systemd-analyze"])
            .status()
            .ok(),
        "systemd-analyze is missing: apt-get install systemd"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let unit = fs::read_to_string(repo_file("mount-helpers/labfs@.service")).expect("read unit");
    // The installed binary's path does not exist here: point at the binary under test.
    let unit = unit.replace("/usr/local/bin/labfs", LABFS);
    fs::write(dir.path().join("labfs@.service"), unit).expect("write unit");
    symlink("labfs@.service", dir.path().join("labfs@lab.service")).expect("instance link");
    let out = Sh::program(
        "systemd-analyze",
        &[
            "verify",
            "--man=no",
            &s(&dir.path().join("labfs@lab.service")),
        ],
    )
    .env("SYSTEMD_LOG_LEVEL", "warning")
    .status();
    let complaints: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.contains("labfs@"))
        .collect();
    assert!(
        out.ok() && complaints.is_empty(),
        "systemd-analyze verify: {out:?}"
    );
}

// ---------------------------------------------------------------------------
// Status
// ---------------------------------------------------------------------------

#[test]
fn status_shows_backends_latency_errors_by_errno_and_rule_hits() {
    let lab = MountedLab::new();
    // /media is read-only even for root: made on Atlas, writable by mode, so only the
    // rule refuses.
    lab.sh(r#"mkdir -m 0777 "$ATLAS/media"; mkdir -p docs cache && echo x > docs/f && cat docs/f >/dev/null"#);
    for _ in 0..3 {
        let (code, _, _) = lab.sh_as_status(USER, USER, "echo no > media/x");
        assert_ne!(code, 0);
    }
    let v = status_json(lab.mnt());
    assert_eq!(
        v["atlas"]["path"].as_str(),
        Some(s(&lab.atlas_path("")).trim_end_matches('/'))
    );
    assert!(v["atlas"]["free_bytes"].as_u64().unwrap_or(0) > 0, "{v}");
    assert!(v["local"]["free_bytes"].as_u64().unwrap_or(0) > 0, "{v}");
    assert_eq!(v["atlas_health"]["answering"], true);
    let st = &v["stats"];
    assert!(st["atlas"]["requests"].as_u64().unwrap_or(0) > 0, "{st}");
    assert!(st["local"]["requests"].as_u64().unwrap_or(0) > 0, "{st}");
    assert!(st["atlas"]["max_ms"].as_f64().is_some(), "{st}");
    // Three refused creates by a user (EROFS), whatever else failed along the way.
    assert!(
        st["errors_by_errno"]["EROFS"].as_u64().unwrap_or(0) >= 3,
        "{st}"
    );
    let hits = st["rule_hits"].as_array().expect("rule_hits");
    let media = hits
        .iter()
        .find(|h| h["rule"] == "/media")
        .expect("/media hits");
    assert_eq!(media["line"].as_u64(), Some(lab.rule_line("/media") as u64));
    assert!(media["hits"].as_u64().unwrap_or(0) > 0, "{media}");

    let table = Sh::program(LABFS, &["status", &s(lab.mnt())]).ok();
    for needle in [
        "atlas",
        "local",
        "answering",
        "FAILED",
        "EROFS",
        "/media",
        "PLACEMENTS",
    ] {
        assert!(table.contains(needle), "{needle:?} missing from:\n{table}");
    }
}

// ---------------------------------------------------------------------------
// Backup scope
// ---------------------------------------------------------------------------

const BACKUP_RULES: &str = r#"
[[rule]]
path = "/cache/*/keep"
class = "authoritative"

[[rule]]
path = "/state/*/node_modules"
class = "ephemeral"
"#;

/// A sample Atlas tree (written to the Atlas backend directly) and the files a backup
/// must hold, relative to the Atlas root.
fn sample_atlas(lab: &MountedLab) -> BTreeSet<String> {
    let files_in = [
        "docs/report.pdf",
        "docs/deep/er/notes.txt",
        "state/app/db.sqlite",
        "media/film.mkv",
        "scans/s1/raw/r.bin",
        "scans/s1/work/out.ply",
        "unplaced/u.txt",
        "cache/x/keep/k.txt",
        "weird [name]?/f",
    ];
    let files_out = [
        "cache/junk.bin",
        "cache/x/other/o.bin",
        "state/app/node_modules/dep.js",
        ".labfs/staging/p1/half.bin",
    ];
    for f in files_in.iter().chain(files_out.iter()) {
        let p = lab.atlas_path(f);
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        fs::write(&p, f.as_bytes()).expect("write sample");
    }
    let mut want: BTreeSet<String> = files_in.iter().map(|f| f.to_string()).collect();
    // labfs's own state on Atlas (identity marker, tag store...), staging excepted.
    want.extend(
        files_under(&lab.atlas_path(".labfs"))
            .into_iter()
            .filter(|f| !f.starts_with("staging/"))
            .map(|f| format!(".labfs/{f}")),
    );
    assert!(want.contains(".labfs/atlas-id"), "{want:?}");
    want
}

fn files_under(root: &Path) -> BTreeSet<String> {
    let out = Sh::program("find", &[&s(root), "-type", "f"]).ok();
    out.lines()
        .filter_map(|l| {
            l.strip_prefix(&format!("{}/", root.display()))
                .map(str::to_string)
        })
        .collect()
}

fn backup_lab() -> MountedLab {
    MountedLab::builder()
        .rules(&format!("{DEFAULT_RULES}{BACKUP_RULES}"))
        .mount()
}

fn scope(lab: &MountedLab, format: &str) -> PathBuf {
    let (code, out, err) = lab.labfs("backup-scope", &["--format", format]);
    assert_eq!(code, 0, "{err}");
    let p = lab.scratch_path(&format!("scope.{format}"));
    fs::write(&p, out).expect("write scope");
    p
}

#[test]
fn backup_scope_for_rsync_copies_exactly_the_backed_up_classes() {
    let lab = backup_lab();
    let want = sample_atlas(&lab);
    let filter = scope(&lab, "rsync");
    let dest = lab.scratch_path("rsync-dest");
    Sh::program(
        "rsync",
        &[
            "-aHAX",
            &format!("--exclude-from={}", filter.display()),
            &format!(
                "{}/",
                lab.atlas_path("")
                    .display()
                    .to_string()
                    .trim_end_matches('/')
            ),
            &format!("{}/", dest.display()),
        ],
    )
    .ok();
    assert_eq!(
        files_under(&dest),
        want,
        "filter:\n{}",
        fs::read_to_string(&filter).unwrap_or_default()
    );
}

#[test]
fn backup_scope_for_borg_archives_exactly_the_backed_up_classes() {
    assert!(
        Sh::program("sh", &["-c", "command -v borg"]).status().ok(),
        "borg is missing: apt-get install borgbackup"
    );
    let lab = backup_lab();
    let want = sample_atlas(&lab);
    let patterns = scope(&lab, "borg");
    let repo = s(&lab.scratch_path("borg-repo"));
    let borg = |args: &[&str]| {
        Sh::program("borg", args)
            .env("BORG_PASSPHRASE", "")
            .env("BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK", "yes")
            .env("BORG_BASE_DIR", lab.scratch_path("borg-base"))
            .ok()
    };
    borg(&["init", "-e", "none", &repo]);
    borg(&[
        "create",
        "--patterns-from",
        &s(&patterns),
        &format!("{repo}::t"),
    ]);
    let listed = borg(&[
        "list",
        "--format",
        "{type} {path}{NL}",
        &format!("{repo}::t"),
    ]);
    let root = s(&lab.atlas_path("")).trim_matches('/').to_string();
    let got: BTreeSet<String> = listed
        .lines()
        .filter_map(|l| l.strip_prefix("- "))
        .filter_map(|p| p.strip_prefix(&format!("{root}/")).map(str::to_string))
        .collect();
    assert_eq!(
        got,
        want,
        "patterns:\n{}",
        fs::read_to_string(&patterns).unwrap_or_default()
    );
}

#[test]
fn backup_scope_for_restic_backs_up_the_classes_and_says_what_it_cannot_exclude() {
    assert!(
        Sh::program("sh", &["-c", "command -v restic"])
            .status()
            .ok(),
        "restic is missing: apt-get install restic"
    );
    let lab = backup_lab();
    let mut want = sample_atlas(&lab);
    let (code, _, err) = lab.labfs("backup-scope", &["--format", "restic"]);
    assert_eq!(code, 0);
    assert!(
        err.contains("/cache (line") && err.contains("backed up whole"),
        "{err}"
    );
    // restic cannot drop /cache yet keep /cache/*/keep: all of /cache is kept (said above).
    want.insert("cache/junk.bin".into());
    want.insert("cache/x/other/o.bin".into());
    let excludes = scope(&lab, "restic");
    let repo = s(&lab.scratch_path("restic-repo"));
    let restic = |args: &[&str]| {
        Sh::program("restic", args)
            .env("RESTIC_PASSWORD", "test")
            .env("RESTIC_CACHE_DIR", lab.scratch_path("restic-cache"))
            .ok()
    };
    restic(&["-r", &repo, "init"]);
    let atlas = s(&lab.atlas_path("")).trim_end_matches('/').to_string();
    restic(&[
        "-r",
        &repo,
        "backup",
        "--exclude-file",
        &s(&excludes),
        &atlas,
    ]);
    let listed = restic(&["-r", &repo, "ls", "--long", "latest"]);
    let got: BTreeSet<String> = listed
        .lines()
        .filter(|l| l.starts_with('-'))
        .filter_map(|l| {
            l.find(&format!(" {atlas}/"))
                .map(|i| l[i + atlas.len() + 2..].to_string())
        })
        .collect();
    assert_eq!(
        got,
        want,
        "excludes:\n{}",
        fs::read_to_string(&excludes).unwrap_or_default()
    );
}

// ---------------------------------------------------------------------------
// Logs
// ---------------------------------------------------------------------------

#[test]
fn a_refusal_by_rule_is_logged_once_per_path_at_info_with_rule_and_line() {
    let lab = MountedLab::new();
    lab.sh(r#"mkdir -m 0777 "$ATLAS/media" && echo m > "$ATLAS/media/existing""#);
    for _ in 0..3 {
        assert_ne!(lab.sh_as_status(USER, USER, "echo no > media/x").0, 0);
        assert_ne!(lab.sh_as_status(USER, USER, "rm -f media/existing").0, 0);
    }
    let rule = format!("/media (line {})", lab.rule_line("/media"));
    wait_until("the refusals are logged", WAIT, || {
        log_lines(&lab.daemon_log(), "INFO", &["refused", "/media/existing"]) > 0
    });
    // EXDEV: a rename across backends, twice on the same path.
    lab.sh("mkdir -p docs cache && echo a > docs/a");
    for _ in 0..2 {
        let (code, _, err) =
            lab.sh_status(r#"python3 -c 'import os; os.rename("docs/a", "cache/a")'"#);
        assert!(
            code != 0 && err.contains("Invalid cross-device link"),
            "{err}"
        );
    }
    wait_until("the EXDEV refusal is logged", WAIT, || {
        log_lines(
            &lab.daemon_log(),
            "INFO",
            &["refused", "/docs/a -> /cache/a"],
        ) > 0
    });
    let log = lab.daemon_log();
    assert_eq!(
        log_lines(
            &log,
            "INFO",
            &["refused", "/docs/a -> /cache/a", "crosses backends"]
        ),
        1,
        "{log}"
    );
    assert_eq!(
        log_lines(&log, "INFO", &["refused", "/media/x:", &rule]),
        1,
        "{log}"
    );
    assert_eq!(
        log_lines(&log, "INFO", &["refused", "/media/existing:", &rule]),
        1,
        "{log}"
    );
}

#[test]
fn an_unplaced_path_is_refused_and_logged_once_naming_the_missing_rule() {
    let lab = MountedLab::builder().unplaced_deny().mount();
    for _ in 0..3 {
        let (code, _, err) = lab.sh_status("mkdir nowhere");
        assert!(code != 0 && err.contains("Permission denied"), "{err}");
    }
    wait_until("the refusal is logged", WAIT, || {
        log_lines(&lab.daemon_log(), "INFO", &["refused", "/nowhere"]) > 0
    });
    let log = lab.daemon_log();
    assert_eq!(
        log_lines(
            &log,
            "INFO",
            &["refused", "/nowhere: no rule places this path"]
        ),
        1,
        "{log}"
    );
}

#[test]
fn successful_reads_and_writes_log_nothing() {
    let lab = MountedLab::new();
    lab.sh("mkdir -p docs cache && echo 1 > docs/f && echo 1 > cache/f");
    // Let the mount's own startup lines land first.
    assert!(lab.wait_for_log("mounted", WAIT));
    let before = lab.daemon_log().lines().count();
    lab.sh("for i in $(seq 50); do echo $i >> docs/f; echo $i >> cache/f; cat docs/f cache/f >/dev/null; done");
    let log = lab.daemon_log();
    // At info and above (the default level). At debug, the kernel's getxattr of
    // security.capability before each write shows up as an ENODATA line.
    let new: Vec<&str> = log
        .lines()
        .skip(before)
        .filter(|l| {
            ["INFO", "WARN", "ERROR"]
                .iter()
                .any(|lv| l.split_whitespace().any(|w| w == *lv))
        })
        .collect();
    assert!(
        new.is_empty(),
        "log lines for successful I/O:\n{}",
        new.join("\n")
    );
}

#[test]
fn under_journald_log_lines_carry_no_timestamp() {
    let lab = MountedLab::builder()
        .env("JOURNAL_STREAM", "8:12345")
        .mount();
    assert!(lab.wait_for_log("mounted", WAIT));
    let log = lab.daemon_log();
    let line = log
        .lines()
        .find(|l| l.contains("mounted"))
        .expect("mounted line");
    assert!(line.trim_start().starts_with("INFO"), "{line}");
}

// ---------------------------------------------------------------------------
// Node rebuild drill (docs/operations.md, "Rebuilding a compute node")
// ---------------------------------------------------------------------------

fn sha(p: &Path) -> String {
    Sh::program("sha256sum", &[&s(p)])
        .ok()
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

#[test]
fn node_rebuild_drill_loses_exactly_what_status_listed() {
    let mut lab = MountedLab::new();
    lab.sh(
        r#"mkdir -p docs state/app cache scans/s1/work/done scans/s1/work/pending scans/s2/work
        head -c 300000 /dev/urandom > docs/thesis.pdf
        head -c 5000 /dev/urandom > state/app/db
        head -c 7000 /dev/urandom > cache/thumb.bin
        head -c 90000 /dev/urandom > scans/s1/work/done/mesh.ply
        head -c 1000 /dev/urandom > scans/s1/work/done/meta.json
        head -c 4000 /dev/urandom > scans/s1/work/pending/partial.ply
        head -c 2000 /dev/urandom > scans/s2/work/raw.bin"#,
    );
    let kept = [
        "docs/thesis.pdf",
        "state/app/db",
        "scans/s1/work/done/mesh.ply",
        "scans/s1/work/done/meta.json",
    ];
    let sums: Vec<String> = kept.iter().map(|f| sha(&lab.path(f))).collect();
    Sh::program(LABFS, &["promote", &s(&lab.path("scans/s1/work/done"))]).ok();
    assert!(lab.atlas_path("scans/s1/work/done/mesh.ply").exists());

    // Before the rebuild: what is at risk (the operator's check).
    let v = status_json(lab.mnt());
    let at_risk: Vec<String> = v["at_risk"]["subtrees"]
        .as_array()
        .expect("at_risk.subtrees")
        .iter()
        .map(|t| t["path"].as_str().unwrap_or("").to_string())
        .collect();
    let at_risk_files = v["at_risk"]["total_files"].as_u64().expect("total_files");

    // The node dies; its SSD is replaced (empty); labfs is mounted with the same config.
    lab.kill9();
    Sh::program(
        "sh",
        &[
            "-c",
            &format!(
                "rm -rf {}/* {}/.labfs",
                s(&lab.local_path("")),
                s(&lab.local_path(""))
            ),
        ],
    )
    .ok();
    lab.remount();

    for (f, sum) in kept.iter().zip(&sums) {
        assert_eq!(&sha(&lab.path(f)), sum, "{f} changed across the rebuild");
    }
    let lost_transitional = [
        "/scans/s1/work/pending/partial.ply",
        "/scans/s2/work/raw.bin",
    ];
    for f in lost_transitional {
        assert!(!lab.path(f).exists(), "{f} should be gone with the SSD");
        assert!(
            at_risk.iter().any(|t| f.starts_with(t.as_str())),
            "{f} was lost but not listed at risk: {at_risk:?}"
        );
    }
    assert_eq!(
        at_risk_files,
        lost_transitional.len() as u64,
        "at risk: {at_risk:?}"
    );
    assert!(
        !lab.path("cache/thumb.bin").exists(),
        "ephemeral data is lost by design"
    );
    let v = status_json(lab.mnt());
    assert_eq!(
        v["at_risk"]["total_files"].as_u64(),
        Some(0),
        "{}",
        v["at_risk"]
    );
}

#[test]
fn install_sh_installs_the_binary_helpers_and_unit() {
    let dest = tempfile::tempdir().expect("tempdir");
    let out = Sh::program("sh", &[&s(&repo_file("mount-helpers/install.sh")), LABFS])
        .env("DESTDIR", dest.path())
        .ok();
    assert!(out.contains("installed"), "{out}");
    let root = dest.path();
    let bin = root.join("usr/local/bin/labfs");
    assert!(bin.is_file());
    for helper in ["sbin/mount.fuse.labfs", "sbin/mount.labfs"] {
        let target = fs::read_link(root.join(helper)).expect("helper symlink");
        assert_eq!(target, Path::new("/usr/local/bin/labfs"), "{helper}");
    }
    let unit = fs::read_to_string(root.join("etc/systemd/system/labfs@.service")).expect("unit");
    assert!(
        unit.contains("ExecStart=/usr/local/bin/labfs mount --recover"),
        "{unit}"
    );
    let xattr_conf = fs::read_to_string(root.join("etc/xattr.conf")).expect("xattr.conf");
    assert!(xattr_conf.contains("user.labfs.*\tskip"), "{xattr_conf}");
    // The installed binary answers as the helper under the helper's name.
    let link = root.join("mount.fuse.labfs");
    symlink(&bin, &link).expect("link");
    let out = Sh::program(&s(&link), &["only-one-arg"]).fails();
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("usage: mount.labfs"), "{}", out.stderr);

    Sh::program(
        "sh",
        &[&s(&repo_file("mount-helpers/install.sh")), "--uninstall"],
    )
    .env("DESTDIR", dest.path())
    .ok();
    assert!(!bin.exists() && fs::symlink_metadata(root.join("sbin/mount.labfs")).is_err());
}

// ---------------------------------------------------------------------------
// Containers: what a bind mount of a subpath sees when labfs restarts
// ---------------------------------------------------------------------------

#[test]
fn a_bind_mount_of_a_subpath_outlives_sigterm_but_not_the_daemon() {
    let lab = MountedLab::new();
    lab.sh("mkdir -p docs/svc && echo data > docs/svc/f");
    // What `docker run -v /lab/docs/svc:/data` does on the host side.
    let bind = lab.scratch_path("container-data");
    fs::create_dir(&bind).expect("mkdir bind");
    let (src, dst) = (s(&lab.path("docs/svc")), s(&bind));
    Sh::program("mount", &["--bind", &src, &dst]).ok();
    struct Unbind(String);
    impl Drop for Unbind {
        fn drop(&mut self) {
            let _ = Sh::program("umount", &["-l", &self.0]).status();
        }
    }
    let _unbind = Unbind(dst.clone());
    assert_eq!(
        fs::read_to_string(bind.join("f")).unwrap_or_default(),
        "data\n"
    );
    // The control path works from the bind too (a container sees only its subpath).
    assert!(Sh::program(LABFS, &["status", &dst])
        .ok()
        .contains("answering"));

    // SIGTERM: /lab leaves the namespace, the daemon keeps serving the bind.
    let pid = lab.pid();
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    wait_until("/lab is unmounted", WAIT, || {
        mount_fstype(lab.mnt()).is_none()
    });
    assert_eq!(
        fs::read_to_string(bind.join("f")).unwrap_or_default(),
        "data\n"
    );
    fs::write(bind.join("g"), "written after SIGTERM\n").expect("write through the bind");
    assert!(lab.atlas_path("docs/svc/g").exists());

    // The daemon is killed (systemd's stop timeout): the bind is dead for good,
    // and a new labfs mount does not revive it: the container must be restarted.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    reap(pid, WAIT);
    let err = fs::read_dir(&bind)
        .map(|_| ())
        .expect_err("the bind must be dead");
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN), "{err}");
    let cfg = s(lab.config_path());
    let log = s(&lab.scratch_path("remount.log"));
    let mnt = s(lab.mnt());
    Sh::program(
        LABFS,
        &["mount", "--config", &cfg, "--log-file", &log, &mnt],
    )
    .ok();
    let err = fs::read_dir(&bind).map(|_| ()).expect_err("still dead");
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN), "{err}");
    // A new bind (the restarted container) sees the data.
    Sh::program("umount", &["-l", &dst]).ok();
    Sh::program("mount", &["--bind", &s(&lab.path("docs/svc")), &dst]).ok();
    assert_eq!(
        fs::read_to_string(bind.join("g")).unwrap_or_default(),
        "written after SIGTERM\n"
    );
    Sh::program("umount", &[&dst]).ok();
    Sh::program("umount", &[&mnt]).ok();
}
