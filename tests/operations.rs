//! Operating labfs (issue 4): lifecycle (SIGTERM, umount, already mounted, stale mounts,
//! reload), the mount(8) helper and fstab, the systemd unit, `labfs status`, the backup
//! scope checked with the real backup tools, logs, and the node rebuild drill.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::{
    mount_fstype, wait_dead_mount, wait_until, MountedLab, Sh, DEFAULT_RULES, LABFS, USER,
};

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
    wait_dead_mount(lab.mnt());
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
        lab.wait_for_log("reloaded from", WAIT),
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
    assert!(out.contains("reloaded from"), "{out}");
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
    // ps shows the daemon as labfs, not the helper's truncated `mount.fuse.labf`.
    let comms: Vec<String> = fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| e.ok())
        .filter(|e| {
            fs::read(e.path().join("cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&*mnt))
                .unwrap_or(false)
        })
        .filter_map(|e| fs::read_to_string(e.path().join("comm")).ok())
        .map(|c| c.trim().to_string())
        .collect();
    assert!(
        !comms.is_empty() && comms.iter().all(|c| c == "labfs"),
        "{comms:?}"
    );

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
    let root = dest.path();
    // The paths printed are the ones written, below DESTDIR.
    assert!(
        out.contains(&format!("installed {}/usr/local/bin/labfs", root.display())),
        "{out}"
    );
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
    // Neither /etc/xattr.conf (libattr1's file) nor /etc/labfs is touched.
    assert!(!root.join("etc/xattr.conf").exists());
    assert!(!root.join("etc/labfs").exists());
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
    wait_dead_mount(&bind);
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

// ---------------------------------------------------------------------------
// Issue 13: the operator's day
// ---------------------------------------------------------------------------

fn status_out(mnt: &Path, args: &[&str]) -> crate::common::Out {
    let mut a = vec!["status"];
    a.extend_from_slice(args);
    let m = s(mnt);
    a.push(&m);
    Sh::program(LABFS, &a)
        .timeout(Duration::from_secs(120))
        .status()
}

#[test]
fn status_works_with_1000_rules_and_1000_at_risk_subtrees_and_names_their_files() {
    let mut rules = String::from(DEFAULT_RULES);
    for i in 0..1000 {
        rules.push_str(&format!(
            "\n[[rule]]\npath = \"/area{i}/cache\"\nclass = \"ephemeral\"\n"
        ));
    }
    let lab = MountedLab::builder().rules(&rules).mount();
    lab.sh(
        r#"for i in $(seq 1 1000); do mkdir -p "$LAB/scans/s$i/work" && echo x > "$LAB/scans/s$i/work/f$i.ply"; done"#,
    );
    // The report is far larger than one xattr value may be (64 KiB).
    let a = status_out(lab.mnt(), &["--json"]);
    assert_eq!(a.code, 0, "{a:?}");
    assert!(a.stdout.len() > 64 * 1024, "{} bytes", a.stdout.len());
    let v: serde_json::Value = serde_json::from_str(&a.stdout).expect("status JSON");
    let r = &v["at_risk"];
    assert_eq!(r["subtrees"].as_array().map(Vec::len), Some(1000));
    assert_eq!(r["total_files"], 1000);
    assert_eq!(r["total_bytes"], 2000);
    assert_eq!(r["complete"], true);
    assert_eq!(v["stats"]["rule_hits"].as_array().map(Vec::len), Some(1006));
    let s17 = r["subtrees"]
        .as_array()
        .and_then(|s| s.iter().find(|t| t["path"] == "/scans/s17/work"))
        .expect("subtree s17");
    assert_eq!(s17["named"], serde_json::json!(["/scans/s17/work/f17.ply"]));
    // Same data, same counts.
    let b = status_out(lab.mnt(), &["--json"]);
    let w: serde_json::Value = serde_json::from_str(&b.stdout).expect("status JSON");
    let counts = |v: &serde_json::Value| -> Vec<(String, u64, u64, String)> {
        v.as_array()
            .into_iter()
            .flatten()
            .map(|t| {
                (
                    t["path"].to_string(),
                    t["files"].as_u64().unwrap_or(0),
                    t["bytes"].as_u64().unwrap_or(0),
                    t["named"].to_string(),
                )
            })
            .collect()
    };
    assert_eq!(counts(&r["subtrees"]), counts(&w["at_risk"]["subtrees"]));
    // The table, and the metrics.
    let t = status_out(lab.mnt(), &[]);
    assert_eq!(t.code, 0, "{t:?}");
    assert!(
        t.stdout
            .contains("2.0 KiB in 1000 file(s), 1000 subtree(s)"),
        "{}",
        t.stdout
    );
    assert!(t.stdout.contains("      /scans/s999/work/f999.ply"));
    let p = status_out(lab.mnt(), &["--format", "prometheus"]);
    assert_eq!(p.code, 0, "{p:?}");
    let mp = s(lab.mnt());
    assert!(
        p.stdout.contains(&format!(
            "labfs_at_risk_files{{mountpoint=\"{mp}\",rule=\"/scans/*/work\"}} 1000\n"
        )),
        "{}",
        p.stdout
    );
}

#[test]
fn a_budgeted_at_risk_walk_names_what_it_did_not_reach_and_full_walks_everything() {
    let lab = MountedLab::new();
    // 300,000 entries would take minutes to create through the mount: they are made
    // on the local backend directly (the walk reads the backend).
    let local = s(&lab.local_path("/"));
    lab.sh(&format!(
        r#"cd "{local}" && mkdir -p scans/s1/work scans/s2/work scans/s3/work/d1 scans/s3/work/d2 scans/s4/work && cd scans &&
        (cd s1/work && seq 1 100000 | xargs touch) && (cd s2/work && seq 1 100000 | xargs touch) &&
        (cd s3/work/d1 && seq 1 60000 | xargs touch) && (cd s3/work/d2 && seq 1 60000 | xargs touch) && touch s4/work/last"#
    ));
    let q = status_out(lab.mnt(), &["--json"]);
    let v: serde_json::Value = serde_json::from_str(&q.stdout).expect("status JSON");
    let r = &v["at_risk"];
    assert_eq!(r["complete"], false, "{r}");
    let subtrees = r["subtrees"].as_array().expect("subtrees");
    let incomplete: Vec<&str> = subtrees
        .iter()
        .filter(|t| t["complete"] == false)
        .filter_map(|t| t["path"].as_str())
        .collect();
    assert_eq!(incomplete, vec!["/scans/s3/work"], "{r}");
    assert_eq!(r["not_reached"], serde_json::json!(["/scans/s4"]), "{r}");
    // Deterministic: a second quick walk gives the same counts.
    let q2 = status_out(lab.mnt(), &["--json"]);
    let v2: serde_json::Value = serde_json::from_str(&q2.stdout).expect("status JSON");
    assert_eq!(r["total_files"], v2["at_risk"]["total_files"]);
    let t = status_out(lab.mnt(), &[]);
    assert!(t.stdout.contains("labfs status --full"), "{}", t.stdout);
    let f = status_out(lab.mnt(), &["--json", "--full"]);
    let vf: serde_json::Value = serde_json::from_str(&f.stdout).expect("status JSON");
    assert_eq!(vf["at_risk"]["complete"], true);
    assert_eq!(vf["at_risk"]["total_files"], 320_001);
    assert_eq!(vf["at_risk"]["not_reached"], serde_json::json!([]));
}

#[test]
fn status_exits_4_when_at_risk_data_is_older_than_max_unpromoted() {
    let rules = DEFAULT_RULES.replace(
        "path = \"/scans/*/work\"\nclass = \"transitional\"\n",
        "path = \"/scans/*/work\"\nclass = \"transitional\"\nmax_unpromoted = \"1h\"\n",
    );
    let lab = MountedLab::builder().rules(&rules).mount();
    lab.sh(r#"mkdir -p "$LAB/scans/a/work" "$LAB/scans/b/work" && echo x > "$LAB/scans/a/work/new" && echo y > "$LAB/scans/b/work/old""#);
    assert_eq!(status_out(lab.mnt(), &[]).code, 0);
    lab.sh(r#"touch -d '2 hours ago' "$LAB/scans/b/work/old""#);
    let t = status_out(lab.mnt(), &[]);
    assert_eq!(t.code, 4, "{t:?}");
    assert!(
        t.stdout.contains("OVERDUE (max_unpromoted 1h 0m)"),
        "{}",
        t.stdout
    );
    let p = status_out(lab.mnt(), &["--format", "prometheus"]);
    assert_eq!(p.code, 4);
    let mp = s(lab.mnt());
    assert!(p.stdout.contains(&format!(
        "labfs_at_risk_overdue_subtrees{{mountpoint=\"{mp}\",rule=\"/scans/*/work\"}} 1\n"
    )));
    assert!(p.stdout.contains(&format!(
        "labfs_at_risk_max_unpromoted_seconds{{mountpoint=\"{mp}\",rule=\"/scans/*/work\"}} 3600\n"
    )));
    assert!(p
        .stdout
        .contains(&format!("labfs_atlas_up{{mountpoint=\"{mp}\"}} 1\n")));
    // Promoting the old data ends the alert.
    Sh::program(LABFS, &["promote", &s(&lab.path("/scans/b/work/old"))]).ok();
    assert_eq!(status_out(lab.mnt(), &[]).code, 0);
}

#[test]
fn status_of_a_missing_path_says_enoent_and_of_a_plain_directory_not_labfs() {
    let t = Sh::program(LABFS, &["status", "/nonexistent-labfs-path"]).status();
    assert_eq!(t.code, 1);
    assert!(t.stderr.contains("No such file or directory"), "{t:?}");
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Sh::program(LABFS, &["status", &s(dir.path())]).status();
    assert_eq!(t.code, 1);
    assert!(t.stderr.contains("not a labfs mount"), "{t:?}");
    let p = Sh::program(LABFS, &["status", "--format", "prometheus", &s(dir.path())]).status();
    assert_eq!(p.code, 1);
    assert!(p.stdout.contains("labfs_up{mountpoint="), "{p:?}");
    assert!(p.stdout.contains("} 0\n"), "{p:?}");
}

#[test]
fn commands_that_do_not_mount_do_not_say_nothing_mounted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = dir.path().join("bad.toml");
    fs::write(
        &f,
        "[storage]\natlas = \"/x\"\nlocal = \"/y\"\n[[rule]]\npath = \"/c\"\nclass = \"nope\"\n",
    )
    .expect("write");
    let f = s(&f);
    for args in [
        vec!["check", "--config", &f],
        vec!["explain", "--config", &f, "/c"],
        vec!["init-atlas", "--config", &f],
        vec!["backup-scope", "--config", &f],
    ] {
        let o = Sh::program(LABFS, &args).status();
        assert_eq!(o.code, 2, "{args:?}: {o:?}");
        assert!(o.stderr.contains("invalid rules file"), "{args:?}: {o:?}");
        assert!(!o.stderr.contains("nothing mounted"), "{args:?}: {o:?}");
    }
}

#[test]
fn explain_answers_for_new_paths_symlinks_and_denied_paths_through_the_mount() {
    let lab = MountedLab::builder().unplaced_deny().mount();
    lab.sh(r#"mkdir -p "$LAB/scans/s9/work" && ln -s nowhere "$LAB/scans/s9/work/ln""#);
    let explain = |p: &str, extra: &[&str]| {
        let mut a = vec!["explain"];
        a.extend_from_slice(extra);
        a.push(p);
        Sh::program(LABFS, &a).status()
    };
    // Does not exist yet; no --config needed, and --config does not change the answer.
    let new = s(&lab.path("/scans/s9/work/new.ply"));
    for extra in [&[][..], &["--config", "/nonexistent.toml"][..]] {
        let o = explain(&new, extra);
        assert_eq!(o.code, 0, "{o:?}");
        assert!(
            o.stdout.contains("path:      /scans/s9/work/new.ply"),
            "{}",
            o.stdout
        );
        assert!(o.stdout.contains("class:     transitional"), "{}", o.stdout);
        assert!(
            o.stdout.contains("state:     does not exist yet"),
            "{}",
            o.stdout
        );
    }
    let o = explain(&s(&lab.path("/scans/s9/work/ln")), &[]);
    assert_eq!(o.code, 0, "{o:?}");
    assert!(o.stdout.contains("backend:   local"), "{}", o.stdout);
    let o = explain(&s(&lab.path("/unmatched/x")), &[]);
    assert_eq!(o.code, 0, "{o:?}");
    assert!(o.stdout.contains("unplaced = \"deny\""), "{}", o.stdout);
    assert!(!o.stdout.contains("authoritative"), "{}", o.stdout);
}

#[test]
fn declared_directories_are_ensured_at_mount_with_owner_and_mode() {
    let rules = format!(
        "{DEFAULT_RULES}\n[[rule]]\npath = \"/models\"\nclass = \"ephemeral\"\n\n\
         [[dir]]\npath = \"/models\"\nowner = {USER}\ngroup = {USER}\nmode = \"2775\"\n\n\
         [[dir]]\npath = \"/media\"\nowner = \"root\"\ngroup = 4242\nmode = \"2775\"\n\n\
         [[dir]]\npath = \"/cache/deep/er\"\n"
    );
    let lab = MountedLab::builder().rules(&rules).mount();
    let meta = |p: &Path| {
        use std::os::unix::fs::MetadataExt;
        let m = fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        (m.uid(), m.gid(), m.mode() & 0o7777)
    };
    assert_eq!(meta(&lab.local_path("/models")), (USER, USER, 0o2775));
    assert!(!lab.atlas_path("/models").exists());
    assert_eq!(meta(&lab.atlas_path("/media")), (0, 4242, 0o2775));
    assert_eq!(meta(&lab.local_path("/cache/deep/er")), (0, 0, 0o755));
    // Through the mount: the read_only tree's writers can now create in it.
    lab.sh_as(USER, USER, r#"echo m > "$LAB/models/w""#);
    crate::common::sh_as_groups(
        USER,
        USER,
        &[4242],
        &format!(r#"echo a > "{}""#, s(&lab.path("/media/album"))),
    );
    assert!(lab.atlas_path("/media/album").is_file());
    // A rebuilt node: the SSD is empty again; the next mount brings the dirs back.
    let mut lab = lab;
    lab.unmount();
    fs::remove_dir_all(lab.local_path("/models")).expect("wipe");
    lab.remount();
    assert_eq!(meta(&lab.local_path("/models")), (USER, USER, 0o2775));
}

#[test]
fn the_demo_lives_in_a_chosen_directory_whose_rules_check_and_explain_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let demo = dir.path().join("demo");
    let mnt = dir.path().join("lab");
    let o = Sh::program(
        LABFS,
        &["mount", "--demo", "--demo-dir", &s(&demo), &s(&mnt)],
    )
    .status();
    assert_eq!(o.code, 0, "{o:?}");
    let m = s(&mnt);
    let _unmount = scopeguard(&m);
    assert!(o.stdout.contains("rm -rf"), "{}", o.stdout);
    assert!(demo.join("atlas").is_dir() && demo.join("local").is_dir());
    let rules = s(&demo.join("labfs.toml"));
    let c = Sh::program(LABFS, &["check", "--config", &rules, "--rules-only"]).status();
    assert_eq!(c.code, 0, "{c:?}");
    let e = Sh::program(LABFS, &["explain", "--config", &rules, "/cache/x"]).ok();
    assert!(e.contains("class:     ephemeral"), "{e}");
    fs::write(mnt.join("hello"), "hi").expect("write through the demo");
    assert!(demo.join("atlas/hello").is_file());
    let d = Sh::program(LABFS, &["demo-rules"]).ok();
    assert!(d.contains("/scans/*/work"), "{d}");
    Sh::program("umount", &[&m]).ok();
    // Reused by the next demo there, data included.
    let o = Sh::program(LABFS, &["mount", "--demo", "--demo-dir", &s(&demo), &m]).status();
    assert!(o.code == 0 && o.stdout.contains("reused"), "{o:?}");
    assert_eq!(mount_fstype(&mnt).as_deref(), Some("fuse.labfs"));
    assert_eq!(
        fs::read_to_string(mnt.join("hello")).unwrap_or_default(),
        "hi"
    );
}

/// Unmounts `mnt` when dropped (a failing assertion must not leave a mount behind).
fn scopeguard(mnt: &str) -> impl Drop + '_ {
    struct G<'a>(&'a str);
    impl Drop for G<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    G(mnt)
}

#[test]
fn backup_scope_grows_linearly_with_the_rules() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, l) = (dir.path().join("a"), dir.path().join("l"));
    fs::create_dir(&a).expect("mkdir");
    fs::create_dir(&l).expect("mkdir");
    let file = |n: usize| {
        let mut t = format!(
            "[storage]\natlas = \"{}\"\nlocal = \"{}\"\n",
            a.display(),
            l.display()
        );
        for i in 0..n {
            let c = ["ephemeral", "authoritative", "runtime", "transitional"][i % 4];
            t.push_str(&format!(
                "[[rule]]\npath = \"/t{i}/x{}\"\nclass = \"{c}\"\n",
                i % 7
            ));
        }
        let f = dir.path().join(format!("r{n}.toml"));
        fs::write(&f, t).expect("write");
        s(&f)
    };
    let (small, large) = (file(1000), file(10_000));
    // CPU time of the child, not wall time: the machine may be busy.
    let cpu = |f: &str| {
        let out = Sh::script(&format!(
            r#"/usr/bin/time -f '%U %S' "{LABFS}" backup-scope --config "{f}" --format rsync 2>&1 >/dev/null | tail -1"#
        ))
        .ok();
        out.split_whitespace()
            .filter_map(|x| x.parse::<f64>().ok())
            .sum::<f64>()
    };
    let (ts, tl) = (cpu(&small), cpu(&large));
    // Quadratic work would be 100 times the 1,000-rule run; linear is about 10.
    assert!(tl < 2.0, "10,000 rules took {tl} s of CPU");
    assert!(
        tl < (ts.max(0.02)) * 40.0,
        "1,000 rules {ts} s, 10,000 rules {tl} s"
    );
}

#[test]
fn man_page_and_completions_come_from_the_command_line_definitions() {
    let man = Sh::program(LABFS, &["man"]).ok();
    assert!(
        man.contains(".TH labfs 1") || man.contains(".TH labfs"),
        "{man}"
    );
    assert!(
        man.contains("backup\\-scope") && man.contains("reload"),
        "{man}"
    );
    let bash = Sh::program(LABFS, &["completions", "bash"]).ok();
    assert!(
        bash.contains("backup-scope") && bash.contains("--full"),
        "{bash}"
    );
}

#[test]
fn check_prints_plain_backend_paths_and_warns_when_it_cannot_read_the_tag_store() {
    let lab = MountedLab::new();
    // Behind labfs's back: an ephemeral path on Atlas, transitional data on Atlas.
    fs::create_dir_all(lab.atlas_path("/cache")).expect("mkdir");
    fs::write(lab.atlas_path("/cache/stray"), "x").expect("write");
    fs::create_dir_all(lab.atlas_path("/scans/s1/work")).expect("mkdir");
    symlink("target", lab.atlas_path("/scans/s1/work/ln")).expect("symlink");
    let store = lab.atlas_path("/.labfs/tags");
    fs::create_dir_all(&store).expect("tag store");
    let cfg = s(lab.config_path());
    let root = Sh::program(LABFS, &["check", "--config", &cfg]).status();
    assert_eq!(root.code, 1, "{root:?}");
    let atlas = s(&lab.atlas_path("/"));
    let atlas = atlas.trim_end_matches('/');
    assert!(
        root.stdout.contains(&format!("({atlas}/cache)")),
        "{}",
        root.stdout
    );
    assert!(!root.stdout.contains("/./"), "{}", root.stdout);
    assert!(
        !root.stderr.contains("cannot read the tag store"),
        "{root:?}"
    );
    // As a user who cannot read the tag store (root's, 0700).
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&store, fs::Permissions::from_mode(0o700)).expect("chmod");
    fs::set_permissions(lab.config_path(), fs::Permissions::from_mode(0o644)).expect("chmod");
    let user = Sh::program(LABFS, &["check", "--config", &cfg])
        .user(USER, USER)
        .status();
    assert!(
        user.stderr.contains("cannot read the tag store"),
        "{user:?}"
    );
    assert!(
        user.stdout.contains("/scans/s1/work on atlas") && user.stdout.contains("unless promoted"),
        "{}",
        user.stdout
    );
}

/// `labfs status | head` and the like: a printing command whose reader has gone ends
/// like `ls` (SIGPIPE), with no panic message (Rust ignores SIGPIPE, so `println!`
/// panicked on EPIPE before).
#[test]
fn printing_commands_end_quietly_when_their_reader_has_gone() {
    let lab = MountedLab::new();
    let mnt = lab.mnt().display().to_string();
    for args in [
        vec!["status", mnt.as_str()],
        vec!["explain", mnt.as_str()],
        vec!["demo-rules"],
    ] {
        // The pipe's read end is closed before the command starts: its first write
        // meets a broken pipe, whatever the timing.
        let script = r#"import os, subprocess, sys
r, w = os.pipe()
os.close(r)
p = subprocess.run(sys.argv[1:], stdout=w, stderr=subprocess.PIPE)
print(p.returncode, "panicked" in p.stderr.decode(errors="replace"))"#;
        let mut argv = vec!["-c", script, LABFS];
        argv.extend(args.iter().copied());
        let out = Sh::program("python3", &argv).ok();
        assert_eq!(
            out.trim(),
            format!("-{} False", libc::SIGPIPE),
            "labfs {args:?} into a closed pipe"
        );
    }
}
