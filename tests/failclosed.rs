//! Fail closed: labfs never mistakes an empty mountpoint for Atlas, a frozen Atlas
//! makes authoritative operations fail within the configured bound (never falling back
//! to the local SSD) while local paths keep working, service resumes when Atlas answers
//! again, and every path shows its durability in read-only virtual xattrs.
//!
//! The frozen-Atlas tests put Atlas on a FUSE stand-in: `mergerfs` over a private
//! tmpfs, frozen with SIGSTOP (its requests then block in the kernel exactly like a hard
//! NFS mount whose server is gone) and thawed with SIGCONT. [`FrozenLab`] always thaws
//! before unmounting, also when a test panics, and a detached guardian process thaws it
//! after [`GUARDIAN`] even if the test process itself is killed.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::common::*;

mod isolation;
mod lifecycle;
mod limits;
mod load;
mod ring;

// ---------------------------------------------------------------------------
// Atlas identity
// ---------------------------------------------------------------------------

/// The daemon's log must tell the operator what to check.
fn assert_refused(f: &MountFailure, needles: &[&str]) {
    assert_eq!(
        f.code,
        Some(1),
        "labfs mount should exit 1 when refusing ({}):\n{}",
        f.reason,
        f.log
    );
    for n in needles {
        assert!(f.log.contains(n), "refusal message lacks {n:?}:\n{}", f.log);
    }
}

#[test]
fn mount_refused_on_unmarked_atlas() {
    let f = MountedLab::builder()
        .skip_init_atlas()
        .try_mount()
        .err()
        .expect("mount must be refused on an Atlas without identity marker");
    assert_refused(
        &f,
        &[
            "no Atlas identity marker",
            "Is the NFS export mounted there?",
            "labfs init-atlas",
            "--allow-unmarked",
        ],
    );
}

#[test]
fn mount_refused_on_wrong_configured_id() {
    let want = "00112233445566778899aabbccddeeff";
    // The fixture appends the rules right after `[storage]`'s keys.
    let rules = format!("atlas_id = \"{want}\"\n{DEFAULT_RULES}");
    let f = MountedLab::builder()
        .rules(&rules)
        .try_mount()
        .err()
        .expect("mount must be refused when storage.atlas_id names another Atlas");
    assert_refused(
        &f,
        &[
            &format!("expects {want}"),
            "storage.atlas_id in the rules file",
            "Another export is mounted there, or the path is wrong",
        ],
    );
}

#[test]
fn mount_refused_when_this_nodes_record_differs() {
    let mut lab = MountedLab::new();
    let seen = lab.local_path(".labfs/atlas-id");
    let marker = lab.atlas_path(".labfs/atlas-id");
    let first = read(&marker);
    assert_eq!(
        read(&seen).trim(),
        first.lines().next().unwrap().trim(),
        "the first mount records which Atlas this node uses"
    );
    lab.unmount();

    // Another Atlas (a fresh export) appears at the same path.
    fs::remove_file(&marker).unwrap();
    let cfg = lab.config_path().to_string_lossy().into_owned();
    run(LABFS, &["init-atlas", "--config", &cfg]);
    let mnt = lab.mnt().to_string_lossy().into_owned();
    let out = Sh::program(LABFS, &["mount", "--config", &cfg, &mnt])
        .timeout(Duration::from_secs(60))
        .status();
    assert_eq!(out.code, 1, "mount must be refused: {out:?}");
    assert!(
        out.stderr.contains("this node's record") && out.stderr.contains(&*seen.to_string_lossy()),
        "the message names the local record: {}",
        out.stderr
    );
    assert!(
        out.stderr.contains("delete"),
        "the message says how to accept a replaced Atlas: {}",
        out.stderr
    );
    assert!(!lab.is_mounted(), "nothing may be mounted after a refusal");

    // The documented way to accept a deliberately replaced Atlas.
    fs::remove_file(&seen).unwrap();
    lab.remount();
    lab.sh(r#"echo ok > "$LAB/docs-file""#);
}

/// A private tmpfs plus directories, for mount attempts that must be refused before any
/// FUSE mount exists. Unmounts on drop.
struct Scratch {
    _dir: tempfile::TempDir,
    root: PathBuf,
    mounted: Vec<PathBuf>,
}

impl Scratch {
    fn new(base: &Path) -> Scratch {
        let dir = tempfile::Builder::new()
            .prefix("labfs-fc-")
            .tempdir_in(base)
            .expect("tempdir");
        let root = dir.path().canonicalize().unwrap();
        Scratch {
            _dir: dir,
            root,
            mounted: Vec::new(),
        }
    }

    fn tmpfs(&mut self, rel: &str) -> PathBuf {
        let p = self.root.join(rel);
        fs::create_dir_all(&p).unwrap();
        run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                "size=16m,mode=0755",
                "tmpfs",
                &p.to_string_lossy(),
            ],
        );
        self.mounted.push(p.clone());
        p
    }

    fn dir(&self, rel: &str) -> PathBuf {
        let p = self.root.join(rel);
        fs::create_dir_all(&p).unwrap();
        p
    }

    fn config(&self, atlas: &Path, local: &Path) -> PathBuf {
        let cfg = self.root.join("labfs.toml");
        fs::write(
            &cfg,
            format!(
                "[storage]\natlas = \"{}\"\nlocal = \"{}\"\n{DEFAULT_RULES}",
                atlas.display(),
                local.display()
            ),
        )
        .unwrap();
        cfg
    }

    /// `labfs init-atlas` then `labfs mount` (daemonizing): the mount's outcome.
    fn init_and_mount(&self, cfg: &Path) -> Out {
        let cfg = cfg.to_string_lossy().into_owned();
        run(LABFS, &["init-atlas", "--config", &cfg]);
        let mnt = self.dir("mnt");
        let out = Sh::program(LABFS, &["mount", "--config", &cfg, &mnt.to_string_lossy()])
            .timeout(Duration::from_secs(60))
            .status();
        if mount_fstype(&mnt).is_some() {
            let _ = run_status("umount", &["-l", &mnt.to_string_lossy()]);
            panic!("labfs mounted although it must refuse: {out:?}");
        }
        out
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for p in self.mounted.drain(..).rev() {
            let _ = run_status("umount", &["-l", &p.to_string_lossy()]);
        }
    }
}

#[test]
fn mount_refused_when_atlas_is_a_directory_on_the_local_filesystem() {
    let mut s = Scratch::new(Path::new("/tmp"));
    let fs_root = s.tmpfs("ssd");
    let local = fs_root.join("local");
    let atlas = fs_root.join("atlas"); // "the export did not mount": a plain directory
    fs::create_dir_all(&local).unwrap();
    fs::create_dir_all(&atlas).unwrap();
    let out = s.init_and_mount(&s.config(&atlas, &local));
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("same filesystem as the local backend")
            && out.stderr.contains("NFS export is probably not mounted"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("findmnt"),
        "says what to check: {}",
        out.stderr
    );
}

/// A directory for scratch files on the same filesystem as `/`, if there is one.
fn root_fs_dir() -> Option<PathBuf> {
    let root = fs::metadata("/").ok()?.dev();
    [env!("CARGO_TARGET_TMPDIR"), "/var/tmp", "/tmp", "/root"]
        .iter()
        .map(PathBuf::from)
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_dir() && m.dev() == root))
}

#[test]
fn mount_refused_when_atlas_is_on_the_root_filesystem() {
    let Some(base) = root_fs_dir() else {
        eprintln!("SKIPPED: no writable directory on the root filesystem");
        return;
    };
    let mut s = Scratch::new(&base);
    let local = s.tmpfs("local");
    let atlas = s.dir("atlas");
    let out = s.init_and_mount(&s.config(&atlas, &local));
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr
            .contains("same filesystem as the root filesystem"),
        "{}",
        out.stderr
    );
}

#[test]
fn allow_unmarked_mounts_and_warns_loudly() {
    let lab = MountedLab::builder()
        .skip_init_atlas()
        .allow_unmarked()
        .mount();
    let log = lab.daemon_log();
    assert!(
        log.contains("WARNING") && log.contains("--allow-unmarked") && log.contains("demos"),
        "--allow-unmarked must warn loudly:\n{log}"
    );
    lab.sh(r#"mkdir -p "$LAB/docs" && echo x > "$LAB/docs/f""#);
    assert!(lab.atlas_path("docs/f").exists());
    assert!(
        !lab.local_path(".labfs/atlas-id").exists(),
        "an unchecked Atlas must not be recorded as this node's Atlas"
    );
}

#[test]
fn init_atlas_refuses_to_overwrite_a_marker() {
    let lab = MountedLab::new();
    let before = read(&lab.atlas_path(".labfs/atlas-id"));
    let (code, _, err) = lab.labfs("init-atlas", &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("already initialised"), "{err}");
    assert_eq!(read(&lab.atlas_path(".labfs/atlas-id")), before);
}

// ---------------------------------------------------------------------------
// A frozen Atlas
// ---------------------------------------------------------------------------

/// `[atlas] timeout` of the frozen-Atlas labs.
const TIMEOUT: Duration = Duration::from_secs(2);
/// `[atlas] probe_interval` of the frozen-Atlas labs.
const PROBE: Duration = Duration::from_secs(1);
/// Every operation on a local path completes within this, Atlas frozen or not: below
/// TIMEOUT, so a local request held behind a stuck Atlas one (which ends only at
/// TIMEOUT) still fails the test, with room for a busy 2-core node (a local `stat`
/// took 1.12 s once at load 26).
const LOCAL_BOUND: Duration = Duration::from_millis(1500);
/// An Atlas operation fails within this while Atlas is frozen.
const FAIL_BOUND: Duration = Duration::from_millis(3500);
/// The guardian thaws a frozen stand-in after this, whatever happened to the test.
const GUARDIAN: Duration = Duration::from_secs(600);

fn mergerfs() -> &'static str {
    assert!(
        Command::new("mergerfs").arg("-V").output().is_ok(),
        "the frozen-Atlas tests need mergerfs (apt-get install -y mergerfs; .ci/run installs it)"
    );
    "mergerfs"
}

/// Runs a command with a bound, never panicking (for Drop). True on exit 0.
fn quietly(cmd: &str, args: &[&str], bound: Duration) -> bool {
    let Ok(mut child) = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    else {
        return false;
    };
    let deadline = Instant::now() + bound;
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return s.success();
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn wait_child(child: &mut Child, bound: Duration) -> bool {
    let deadline = Instant::now() + bound;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn wait_mounted(path: &Path, fstype: &str, child: &mut Child, bound: Duration) {
    let deadline = Instant::now() + bound;
    loop {
        if mount_fstype(path).as_deref() == Some(fstype) {
            return;
        }
        if let Ok(Some(s)) = child.try_wait() {
            panic!("{fstype} at {} exited before mounting: {s}", path.display());
        }
        assert!(
            Instant::now() < deadline,
            "{fstype} not mounted at {} within {bound:?}",
            path.display()
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// labfs over a freezable Atlas stand-in (mergerfs over a private tmpfs) and a local
/// tmpfs, with `[atlas] timeout = TIMEOUT`.
struct FrozenLab {
    _dir: tempfile::TempDir,
    root: PathBuf,
    store: PathBuf,
    atlas: PathBuf,
    local: PathBuf,
    mnt: PathBuf,
    cfg: PathBuf,
    log: PathBuf,
    stand_in: Option<Child>,
    guardian: Option<Child>,
    daemon: Option<Child>,
    tmpfs: Vec<PathBuf>,
}

impl FrozenLab {
    /// Backends, stand-in, identity marker; labfs mounted if `mount`.
    fn new(mount: bool) -> FrozenLab {
        assert!(
            unsafe { libc::geteuid() } == 0,
            "must run as root (see .ci/run)"
        );
        let merger = mergerfs();
        let dir = tempfile::Builder::new()
            .prefix("labfs-frozen-")
            .tempdir()
            .unwrap();
        fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let root = dir.path().canonicalize().unwrap();
        let [store, atlas, local, mnt] = ["store", "atlas", "local", "mnt"].map(|d| {
            let p = root.join(d);
            fs::create_dir(&p).unwrap();
            p
        });
        let mut lab = FrozenLab {
            cfg: root.join("labfs.toml"),
            log: root.join("daemon.log"),
            _dir: dir,
            root,
            store,
            atlas,
            local,
            mnt,
            stand_in: None,
            guardian: None,
            daemon: None,
            tmpfs: Vec::new(),
        };
        for p in [lab.store.clone(), lab.local.clone()] {
            run(
                "mount",
                &[
                    "-t",
                    "tmpfs",
                    "-o",
                    "size=256m,mode=0755",
                    "tmpfs",
                    &p.to_string_lossy(),
                ],
            );
            lab.tmpfs.push(p);
        }
        // No attribute or entry caching in the stand-in: every request reaches it, so a
        // frozen stand-in answers nothing, like a hung NFS server.
        let mut child = Command::new(merger)
            .args([
                "-f",
                "-o",
                "cache.attr=0,cache.entry=0,cache.negative_entry=0,minfreespace=0,category.create=ff,allow_other,use_ino,fsname=frozen-atlas",
            ])
            .arg(&lab.store)
            .arg(&lab.atlas)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start mergerfs");
        wait_mounted(
            &lab.atlas,
            "fuse.mergerfs",
            &mut child,
            Duration::from_secs(20),
        );
        let pid = child.id();
        lab.stand_in = Some(child);
        // Thaws the stand-in even if this process dies without running Drop.
        lab.guardian = Command::new("sh")
            .args([
                "-c",
                &format!("sleep {}; kill -CONT {pid}", GUARDIAN.as_secs()),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .ok();

        fs::write(
            &lab.cfg,
            format!(
                "[storage]\natlas = \"{}\"\nlocal = \"{}\"\n\n[atlas]\ntimeout = \"{}s\"\nprobe_interval = \"{}s\"\n{DEFAULT_RULES}",
                lab.atlas.display(),
                lab.local.display(),
                TIMEOUT.as_secs(),
                PROBE.as_secs()
            ),
        )
        .unwrap();
        run(
            LABFS,
            &["init-atlas", "--config", &lab.cfg.to_string_lossy()],
        );
        if mount {
            lab.mount();
        }
        lab
    }

    fn mount(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut child = Command::new(LABFS)
            .arg("mount")
            .arg("--foreground")
            .arg("--config")
            .arg(&self.cfg)
            .arg(&self.mnt)
            .env("RUST_LOG", "labfs=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start labfs");
        wait_mounted(&self.mnt, "fuse.labfs", &mut child, Duration::from_secs(20));
        self.daemon = Some(child);
        // The bound on open files holds only on the daemon path: a FUSE stand-in, like
        // a hard NFS mount, is not known to bound its own failures (src/fs/atlas_io.rs).
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        assert!(
            log.contains("open Atlas files: through the daemon") && log.contains("fuse.mergerfs"),
            "open Atlas files on the frozen stand-in must go through the daemon:\n{log}"
        );
    }

    fn stand_in_pid(&self) -> i32 {
        self.stand_in.as_ref().expect("stand-in").id() as i32
    }

    fn freeze(&self) {
        unsafe { libc::kill(self.stand_in_pid(), libc::SIGSTOP) };
        // SIGSTOP is asynchronous: wait until every thread of the stand-in is stopped.
        wait_until(
            "the Atlas stand-in is stopped",
            Duration::from_secs(10),
            || {
                fs::read_to_string(format!("/proc/{}/stat", self.stand_in_pid()))
                    .ok()
                    .and_then(|s| {
                        s.rsplit(')')
                            .next()
                            .map(|r| r.trim_start().starts_with('T'))
                    })
                    .unwrap_or(false)
            },
        );
    }

    fn thaw(&self) {
        if let Some(c) = &self.stand_in {
            unsafe { libc::kill(c.id() as i32, libc::SIGCONT) };
        }
    }

    fn log_text(&self) -> String {
        fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// A script with `LAB`, `STORE` (what Atlas holds), `LOCAL`, `CFG`, `LABFS` set; its
    /// cwd is outside the mount.
    fn cmd(&self, script: &str) -> Sh {
        Sh::script(script)
            .cwd(&self.root)
            .env("LAB", &self.mnt)
            .env("STORE", &self.store)
            .env("LOCAL", &self.local)
            .env("CFG", &self.cfg)
            .env("LABFS", LABFS)
    }

    /// Runs `script`, asserting it completes within `bound`; returns its output.
    fn timed(&self, script: &str, bound: Duration) -> Out {
        let t = Instant::now();
        let out = self
            .cmd(script)
            .timeout(bound + Duration::from_secs(30))
            .status();
        let took = t.elapsed();
        assert!(
            took < bound,
            "took {took:?} (bound {bound:?}): {script}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.stdout,
            out.stderr
        );
        out
    }

    /// A local-path operation: succeeds within [`LOCAL_BOUND`].
    fn local_ok(&self, script: &str) -> String {
        let out = self.timed(script, LOCAL_BOUND);
        assert!(
            out.ok(),
            "local-path operation failed (exit {}): {script}\n{}",
            out.code,
            out.stderr
        );
        out.stdout
    }

    /// An Atlas operation while Atlas is frozen: fails within [`FAIL_BOUND`] with
    /// ETIMEDOUT (or EIO).
    fn atlas_fails(&self, script: &str) {
        let out = self.timed(script, FAIL_BOUND);
        assert!(
            !out.ok(),
            "Atlas operation succeeded while Atlas is frozen: {script}\n{}",
            out.stdout
        );
        assert!(
            out.stderr.contains("Connection timed out")
                || out.stderr.contains("Input/output error"),
            "expected ETIMEDOUT or EIO from {script}, got:\n{}",
            out.stderr
        );
    }

    fn status_json(&self) -> serde_json::Value {
        let out = self.timed(r#""$LABFS" status --json "$LAB""#, LOCAL_BOUND);
        // 3: Atlas is not answering, 4: at-risk data overdue; both still print the report.
        assert!(
            matches!(out.code, 0 | 3 | 4),
            "labfs status failed (exit {}): {}",
            out.code,
            out.stderr
        );
        serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("status JSON: {e}\n{}", out.stdout))
    }

    fn wait_answering(&self, want: bool, bound: Duration) -> serde_json::Value {
        let deadline = Instant::now() + bound;
        loop {
            let v = self.status_json();
            if v["atlas_health"]["answering"].as_bool() == Some(want) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "status never said answering={want} within {bound:?}: {v:#}"
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Local-path operations of every kind, on the ephemeral `/cache` and the
    /// transitional `/scans/s1/work`; `tag` makes the names unique.
    fn local_round(&self, tag: &str) {
        for dir in ["cache", "scans/s1/work"] {
            let d = format!("$LAB/{dir}");
            self.local_ok(&format!(r#"echo {tag} > "{d}/f-{tag}""#));
            self.local_ok(&format!(
                r#"dd if=/dev/zero of="{d}/big-{tag}" bs=64k count=16 status=none"#
            ));
            assert_eq!(self.local_ok(&format!(r#"cat "{d}/f-{tag}""#)).trim(), tag);
            self.local_ok(&format!(r#"stat "{d}/f-{tag}" >/dev/null"#));
            let ls = self.local_ok(&format!(r#"ls "{d}""#));
            assert!(ls.contains(&format!("f-{tag}")), "ls {dir}: {ls}");
            self.local_ok(&format!(r#"mv "{d}/f-{tag}" "{d}/g-{tag}""#));
            self.local_ok(&format!(
                r#"mkdir "{d}/dir-{tag}" && echo in > "{d}/dir-{tag}/in""#
            ));
            self.local_ok(&format!(
                r#"echo more >> "{d}/g-{tag}" && rm "{d}/big-{tag}""#
            ));
            assert_eq!(
                self.local_ok(&format!(r#"cat "{d}/g-{tag}""#)),
                format!("{tag}\nmore\n")
            );
            self.local_ok(&format!(r#"rm "{d}/g-{tag}""#));
        }
    }

    /// What Atlas holds, as (path, size, checksum) lines.
    fn store_manifest(&self) -> String {
        sh_in(
            &self.store,
            "find . -path ./.labfs -prune -o -type f -print | sort | while read f; do echo \"$f $(sha256sum < \"$f\")\"; done",
        )
    }
}

impl Drop for FrozenLab {
    fn drop(&mut self) {
        let panicking = thread::panicking();
        // Thaw first: unmounting over a frozen stand-in would hang.
        self.thaw();
        if mount_fstype(&self.mnt).is_some()
            && !quietly(
                "umount",
                &[&self.mnt.to_string_lossy()],
                Duration::from_secs(30),
            )
        {
            quietly(
                "umount",
                &["-l", &self.mnt.to_string_lossy()],
                Duration::from_secs(30),
            );
        }
        if let Some(mut d) = self.daemon.take() {
            if !wait_child(&mut d, Duration::from_secs(15)) {
                let _ = d.kill();
                let _ = d.wait();
            }
        }
        if mount_fstype(&self.atlas).is_some()
            && !quietly(
                "umount",
                &[&self.atlas.to_string_lossy()],
                Duration::from_secs(30),
            )
        {
            quietly(
                "umount",
                &["-l", &self.atlas.to_string_lossy()],
                Duration::from_secs(30),
            );
        }
        if let Some(mut m) = self.stand_in.take() {
            if !wait_child(&mut m, Duration::from_secs(10)) {
                let _ = m.kill();
                let _ = m.wait();
            }
        }
        if let Some(mut g) = self.guardian.take() {
            unsafe { libc::kill(-(g.id() as i32), libc::SIGKILL) };
            let _ = g.wait();
        }
        for p in self.tmpfs.drain(..).rev() {
            quietly(
                "umount",
                &["-l", &p.to_string_lossy()],
                Duration::from_secs(30),
            );
        }
        if panicking {
            let log = self.log_text();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "--- labfs daemon log (last 200 of {} lines) ---\n{}\n--- end ---",
                lines.len(),
                lines[lines.len().saturating_sub(200)..].join("\n")
            );
        }
    }
}

/// Opens argv[1], creates argv[2], waits for argv[3], reads 4 KiB and writes
/// "<errno or ok> <seconds>" to argv[4].
const OPEN_FILE_READER: &str = r#"
import os, sys, time
path, ready, go, out = sys.argv[1:5]
fd = os.open(path, os.O_RDONLY)
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.01)
t = time.time()
try:
    os.pread(fd, 4096, 0)
    r = "ok"
except OSError as e:
    r = str(e.errno)
with open(out + ".tmp", "w") as f:
    f.write("%s %.3f" % (r, time.time() - t))
os.rename(out + ".tmp", out)
"#;

fn count(haystack: &str, needle: &str) -> usize {
    haystack.lines().filter(|l| l.contains(needle)).count()
}

#[test]
fn frozen_atlas_fails_closed_while_local_paths_keep_working() {
    let lab = FrozenLab::new(true);
    // An Atlas with a process behind it (FUSE here, NFS in production) keeps its
    // requests on the Atlas lane, under the watchdog (src/fs/atlas_io.rs).
    let md = &lab.status_json()["atlas_metadata"];
    assert_eq!(md["mode"], "lane", "{md}");
    lab.cmd(
        r#"mkdir -p "$LAB/docs" "$LAB/cache" "$LAB/scans/s1/work" "$LAB/state"
           echo hello > "$LAB/docs/existing"
           head -c 1048576 /dev/urandom > "$LAB/docs/blob"
           echo c > "$LAB/cache/c1"
           echo w > "$LAB/scans/s1/work/w1"
           echo s > "$LAB/state/s"
           ls -la "$LAB" "$LAB/scans" "$LAB/scans/s1" "$LAB/scans/s1/work" >/dev/null"#,
    )
    .ok();
    let docs_line = {
        let text = fs::read_to_string(&lab.cfg).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let at = lines
            .iter()
            .position(|l| l.trim() == r#"path = "/docs""#)
            .unwrap();
        lines[..at]
            .iter()
            .rposition(|l| l.trim() == "[[rule]]")
            .unwrap()
            + 1
    };
    let before = lab.store_manifest();
    // A file on Atlas held open across the outage.
    let (ready, go, result) = (
        lab.root.join("ready"),
        lab.root.join("go"),
        lab.root.join("result"),
    );
    let _holder = Sh::program(
        "python3",
        &[
            "-c",
            OPEN_FILE_READER,
            &lab.mnt.join("docs/blob").to_string_lossy(),
            &ready.to_string_lossy(),
            &go.to_string_lossy(),
            &result.to_string_lossy(),
        ],
    )
    .spawn();
    wait_until("the Atlas file is open", Duration::from_secs(20), || {
        ready.exists()
    });
    let v = lab.status_json();
    assert_eq!(v["atlas_health"]["answering"], true, "{v:#}");

    // ---- freeze Atlas mid-run; a few Atlas requests get stuck ----
    lab.freeze();
    let frozen_at = Instant::now();
    let mut stuck: Vec<Bg> = [
        r#"cat "$LAB/docs/existing" >/dev/null"#,
        r#"cat "$LAB/docs/blob" >/dev/null"#,
        r#"ls "$LAB/docs" >/dev/null"#,
        r#"touch "$LAB/docs/bg-touch""#,
        r#"stat "$LAB/state/s" >/dev/null"#,
    ]
    .iter()
    .map(|s| lab.cmd(s).spawn())
    .collect();
    thread::sleep(Duration::from_millis(100));

    // Local paths keep working at once (before the outage is even detected), and
    // `labfs status` never hangs.
    lab.local_round("a");
    lab.status_json();

    // Every stuck Atlas request is answered within the bound.
    for b in &mut stuck {
        let left = (TIMEOUT + Duration::from_secs(3)).saturating_sub(frozen_at.elapsed());
        assert!(
            b.wait_timeout(left).is_some(),
            "an Atlas request was still stuck {:?} after the freeze",
            frozen_at.elapsed()
        );
    }

    // ---- the outage is detected and shown ----
    let v = lab.wait_answering(false, PROBE + TIMEOUT + Duration::from_secs(5));
    let h = &v["atlas_health"];
    assert!(h["down_since"].as_u64().is_some(), "{v:#}");
    assert!(
        h["down_since_utc"]
            .as_str()
            .is_some_and(|s| s.ends_with('Z')),
        "{v:#}"
    );
    assert!(!h["reason"].as_str().unwrap_or("").is_empty(), "{v:#}");
    let table = lab.timed(r#""$LABFS" status "$LAB""#, LOCAL_BOUND);
    assert!(
        table.code == 3 && table.stdout.contains("NOT ANSWERING since"),
        "{}",
        table.stdout
    );

    // Authoritative and runtime operations fail within the bound, never land on local SSD.
    for _ in 0..2 {
        lab.atlas_fails(r#"touch "$LAB/docs/new""#);
        lab.atlas_fails(r#"cat "$LAB/docs/existing""#);
        lab.atlas_fails(r#"ls "$LAB/docs""#);
        lab.atlas_fails(r#"echo x > "$LAB/docs/existing""#);
        lab.atlas_fails(r#"mkdir "$LAB/docs/newdir""#);
        lab.atlas_fails(r#"rm "$LAB/docs/existing""#);
        lab.atlas_fails(r#"echo x > "$LAB/state/new""#);
        lab.atlas_fails(r#"ls "$LAB""#);
    }
    // Reading an Atlas file that was open before the outage fails at once too.
    fs::write(&go, "").unwrap();
    wait_until("the open-file read returns", FAIL_BOUND, || result.exists());
    let r = read(&result);
    let (errno, secs) = r.split_once(' ').unwrap();
    assert_eq!(
        errno,
        libc::ETIMEDOUT.to_string(),
        "read of an open Atlas file: {r}"
    );
    assert!(
        secs.parse::<f64>().unwrap() < LOCAL_BOUND.as_secs_f64(),
        "{r}"
    );
    for p in ["docs", "state", "docs/new", "docs/bg-touch", "state/new"] {
        assert!(
            !lab.local.join(p).exists(),
            "{p} appeared on the local SSD during the outage"
        );
    }

    // Local paths still work once the outage is known, and after the kernel's cached
    // entries for the directories on the way (/, /scans, /scans/s1) have expired.
    lab.local_round("b");
    thread::sleep(Duration::from_millis(2500));
    lab.local_round("c");
    lab.status_json();

    // One log line for the outage, one per path refused.
    let log = lab.log_text();
    assert_eq!(count(&log, "Atlas paths fail with ETIMEDOUT"), 1, "{log}");
    let refused =
        format!("/docs: refused while Atlas is not answering (rule /docs (line {docs_line}))");
    assert_eq!(
        count(&log, &refused),
        1,
        "expected exactly one line {refused:?} in\n{log}"
    );
    assert_eq!(
        count(&log, "/state: refused while Atlas is not answering"),
        1,
        "{log}"
    );

    // ---- thaw: service resumes without a remount ----
    lab.thaw();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !lab
        .cmd(r#"touch "$LAB/docs/new""#)
        .timeout(FAIL_BOUND + Duration::from_secs(5))
        .status()
        .ok()
    {
        assert!(
            Instant::now() < deadline,
            "Atlas operations did not resume after the thaw"
        );
        thread::sleep(Duration::from_millis(100));
    }
    lab.wait_answering(true, PROBE + TIMEOUT + Duration::from_secs(5));
    assert_eq!(lab.cmd(r#"cat "$LAB/docs/existing""#).ok(), "hello\n");
    let ls = lab.cmd(r#"ls "$LAB/docs""#).ok();
    assert!(ls.contains("new") && ls.contains("existing"), "{ls}");
    assert!(
        lab.store.join("docs/new").exists(),
        "the new file is on Atlas"
    );
    assert!(
        !lab.local.join("docs").exists(),
        "nothing of /docs on the local SSD"
    );
    // Nothing on Atlas was corrupted (a request already executing at the freeze may
    // still complete afterwards: the background touch).
    let after = lab.store_manifest();
    let strip = |m: &str| {
        m.lines()
            .filter(|l| !l.starts_with("./docs/new ") && !l.starts_with("./docs/bg-touch "))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        strip(&before),
        strip(&after),
        "Atlas content changed during the outage"
    );
    // What was written locally during the outage is all there.
    let cache = lab.cmd(r#"ls "$LAB/cache" "$LAB/scans/s1/work""#).ok();
    for n in ["dir-a", "dir-b", "dir-c", "c1", "w1"] {
        assert!(cache.contains(n), "{n} missing after the outage:\n{cache}");
    }
    assert!(count(&lab.log_text(), "Atlas is answering again") >= 1);

    // ---- a second outage is logged again (once per outage and path) ----
    lab.freeze();
    lab.wait_answering(false, PROBE + TIMEOUT + Duration::from_secs(5));
    lab.atlas_fails(r#"cat "$LAB/docs/existing""#);
    lab.local_round("d");
    lab.thaw();
    lab.wait_answering(true, PROBE + TIMEOUT + Duration::from_secs(5));
    let log = lab.log_text();
    assert_eq!(count(&log, "Atlas paths fail with ETIMEDOUT"), 2, "{log}");
    assert_eq!(count(&log, &refused), 2, "{log}");
    assert_eq!(lab.cmd(r#"cat "$LAB/docs/existing""#).ok(), "hello\n");
}

#[test]
fn frozen_atlas_refuses_fast_even_with_many_stuck_requests() {
    let lab = FrozenLab::new(true);
    lab.cmd(
        r#"mkdir -p "$LAB/docs" "$LAB/cache"
           for i in $(seq 1 40); do echo $i > "$LAB/docs/f$i"; done
           echo c > "$LAB/cache/c""#,
    )
    .ok();
    lab.freeze();
    // More stuck Atlas requests than the lane has resident threads.
    let mut stuck: Vec<Bg> = (1..=40)
        .map(|i| {
            lab.cmd(&format!(r#"cat "$LAB/docs/f{i}" >/dev/null"#))
                .spawn()
        })
        .collect();
    lab.wait_answering(false, PROBE + TIMEOUT + Duration::from_secs(5));
    // Once Atlas is known down, Atlas requests are refused at once, not after queueing
    // behind the stuck ones for another timeout.
    let t = Instant::now();
    let out = lab
        .cmd(r#"touch "$LAB/docs/x""#)
        .timeout(Duration::from_secs(30))
        .status();
    assert!(
        !out.ok() && out.stderr.contains("Connection timed out"),
        "{out:?}"
    );
    assert!(t.elapsed() < LOCAL_BOUND, "refusal took {:?}", t.elapsed());
    lab.local_ok(r#"cat "$LAB/cache/c" && echo d > "$LAB/cache/d""#);
    for b in &mut stuck {
        assert!(
            b.wait_timeout(FAIL_BOUND).is_some(),
            "a stuck cat was never answered"
        );
    }
    lab.thaw();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !lab
        .cmd(r#"cat "$LAB/docs/f40""#)
        .timeout(Duration::from_secs(10))
        .status()
        .ok()
    {
        assert!(Instant::now() < deadline, "Atlas did not resume");
        thread::sleep(Duration::from_millis(100));
    }
    assert!(!lab.local.join("docs").exists());
}

#[test]
fn mount_refused_when_atlas_does_not_answer() {
    let lab = FrozenLab::new(false);
    lab.freeze();
    let t = Instant::now();
    let out = lab
        .cmd(r#""$LABFS" mount --config "$CFG" "$MNT""#)
        .env("MNT", &lab.mnt)
        .timeout(Duration::from_secs(60))
        .status();
    let took = t.elapsed();
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("did not answer within"),
        "{}",
        out.stderr
    );
    assert!(
        took < TIMEOUT + Duration::from_secs(3),
        "refusal took {took:?}"
    );
    assert!(mount_fstype(&lab.mnt).is_none());
}

// ---------------------------------------------------------------------------
// Durability xattrs
// ---------------------------------------------------------------------------

/// Every `user.labfs.*` name PATH answers (asked by name: they are not listed), as
/// name -> value.
fn labfs_xattrs(lab: &MountedLab, rel: &str) -> std::collections::BTreeMap<String, String> {
    let out = lab.sh(&format!(
        r#"for n in class backend rule state promoted_at origin digest; do
             getfattr --absolute-names -n "user.labfs.$n" "$LAB/{rel}" 2>/dev/null || true
           done"#
    ));
    out.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
        .collect()
}

#[test]
fn durability_xattrs_for_each_class_and_state() {
    let lab = MountedLab::new();
    lab.sh(
        r#"mkdir -p "$LAB/docs/d" "$LAB/state" "$LAB/cache" "$LAB/scans/s1/work"
           echo a > "$LAB/docs/a"; echo s > "$LAB/state/s"; echo c > "$LAB/cache/c"
           echo w > "$LAB/scans/s1/work/w""#,
    );
    let cases = [
        ("docs/a", "authoritative", "atlas", "/docs", "atlas"),
        ("docs/d", "authoritative", "atlas", "/docs", "atlas"),
        ("state/s", "runtime", "atlas", "/state", "atlas"),
        ("cache/c", "ephemeral", "local", "/cache", "local-only"),
        ("cache", "ephemeral", "local", "/cache", "local-only"),
        (
            "scans/s1/work/w",
            "transitional",
            "local",
            "/scans/*/work",
            "at-risk",
        ),
    ];
    for (rel, class, backend, rule, state) in cases {
        let x = labfs_xattrs(&lab, rel);
        let rule_label = format!("{rule} (line {})", lab.rule_line(rule));
        assert_eq!(
            x.get("user.labfs.class").map(String::as_str),
            Some(class),
            "{rel}: {x:?}"
        );
        assert_eq!(
            x.get("user.labfs.backend").map(String::as_str),
            Some(backend),
            "{rel}: {x:?}"
        );
        assert_eq!(x.get("user.labfs.rule"), Some(&rule_label), "{rel}: {x:?}");
        assert_eq!(
            x.get("user.labfs.state").map(String::as_str),
            Some(state),
            "{rel}: {x:?}"
        );
        // The same through `labfs explain` on the mount.
        let out = lab.sh(&format!(r#""$LABFS" explain "$LAB/{rel}""#));
        for want in [
            format!("class:     {class}"),
            format!("backend:   {backend}"),
            format!("rule:      {rule_label}"),
            format!("state:     {state}"),
        ] {
            assert!(
                out.contains(&want),
                "labfs explain {rel} lacks {want:?}:\n{out}"
            );
        }
        // And by the rules alone, for the namespace path (no state: that needs the mount).
        let (code, out, err) = lab.labfs("explain", &[&format!("/{rel}")]);
        assert_eq!(code, 0, "{err}");
        for want in [
            format!("class:     {class}"),
            format!("backend:   {backend}"),
            format!("rule:      {rule_label}"),
        ] {
            assert!(
                out.contains(&want),
                "labfs explain --config /{rel} lacks {want:?}:\n{out}"
            );
        }
        assert!(!out.contains("state:"), "{out}");
    }
}

#[test]
fn durability_xattrs_are_read_only() {
    let lab = MountedLab::new();
    lab.sh(
        r#"mkdir -p "$LAB/docs" "$LAB/cache" && echo a > "$LAB/docs/a" && echo c > "$LAB/cache/c""#,
    );
    for rel in ["docs/a", "cache/c", "docs", "cache"] {
        for name in ["class", "backend", "rule", "state"] {
            let (code, _, err) = lab.sh_status(&format!(
                r#"setfattr -n user.labfs.{name} -v x "$LAB/{rel}""#
            ));
            assert_ne!(code, 0, "setting user.labfs.{name} on {rel} succeeded");
            assert!(
                err.contains("Operation not permitted"),
                "{rel} {name}: {err}"
            );
            let (code, _, err) =
                lab.sh_status(&format!(r#"setfattr -x user.labfs.{name} "$LAB/{rel}""#));
            assert_ne!(code, 0, "removing user.labfs.{name} on {rel} succeeded");
            assert!(
                err.contains("Operation not permitted"),
                "{rel} {name}: {err}"
            );
        }
    }
    assert_eq!(
        labfs_xattrs(&lab, "docs/a")["user.labfs.class"],
        "authoritative"
    );
    // Ordinary user xattrs still work.
    lab.sh(r#"setfattr -n user.note -v hi "$LAB/docs/a" && getfattr -n user.note "$LAB/docs/a" >/dev/null"#);
}
