//! Daemons of one node never undo each other: one daemon per local backend, and a
//! daemon unmounts only its own mount (the restart-then-container-exit sequence).

use std::fs;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::common::*;

/// The topmost mount at `path`: (device `MAJ:MIN`, fstype).
fn mount_at(path: &std::path::Path) -> Option<(String, String)> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = path.to_string_lossy().replace(' ', "\\040");
    let mut found = None;
    for line in info.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() > 4 && f[4] == want {
            if let Some(sep) = f.iter().position(|x| *x == "-") {
                found = f.get(sep + 1).map(|t| (f[2].to_owned(), (*t).to_owned()));
            }
        }
    }
    found
}

/// Whether process `pid` has exited (gone, or a zombie nobody reaped yet).
fn exited(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z')),
    }
}

/// `labfs mount --foreground --config CFG MNT` with its output in `log`.
fn start_daemon(cfg: &std::path::Path, mnt: &std::path::Path, log: &std::path::Path) -> Child {
    let out = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(LABFS)
        .arg("mount")
        .arg("--foreground")
        .arg("--config")
        .arg(cfg)
        .arg(mnt)
        .env("RUST_LOG", "labfs=debug")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("start labfs")
}

#[test]
fn second_mount_over_the_same_local_backend_is_refused_naming_the_first() {
    let lab = MountedLab::with_dirs();
    lab.sh(r#"echo keep > "$LAB/cache/c""#);
    let other = tempfile::tempdir().unwrap();
    let out = Sh::program(
        LABFS,
        &[
            "mount",
            "--foreground",
            "--config",
            &lab.config_path().to_string_lossy(),
            &other.path().to_string_lossy(),
        ],
    )
    .timeout(Duration::from_secs(30))
    .status();
    assert!(!out.ok(), "a second daemon mounted the same local backend");
    let pid = lab.pid().to_string();
    assert!(
        out.stderr.contains("already served by")
            && out.stderr.contains(&format!("pid={pid}"))
            && out
                .stderr
                .contains(&lab.mnt().to_string_lossy().into_owned()),
        "the refusal must name the running daemon (pid {pid}, {}):\n{}",
        lab.mnt().display(),
        out.stderr
    );
    assert!(mount_fstype(other.path()).is_none());
    // The first daemon is untouched.
    assert_eq!(lab.sh(r#"cat "$LAB/cache/c""#), "keep\n");
}

#[test]
fn a_daemon_kept_alive_by_a_bind_mount_never_unmounts_the_next_daemons_mount() {
    let mut old = MountedLab::with_dirs();
    let mut next = MountedLab::with_dirs();
    next.sh(r#"echo new > "$LAB/cache/marker""#);
    next.unmount();
    old.sh(r#"mkdir "$LAB/cache/vol" && echo old > "$LAB/cache/vol/f""#);
    let mnt = old.mnt().to_path_buf();
    let (old_dev, _) = mount_at(&mnt).expect("old mount");
    let old_pid = old.pid();

    // A container volume: a bind mount of a path below the mount.
    let bind = old.scratch_path("volume");
    fs::create_dir(&bind).unwrap();
    run(
        "mount",
        &[
            "--bind",
            &mnt.join("cache/vol").to_string_lossy(),
            &bind.to_string_lossy(),
        ],
    );
    let bind_guard = scopeguard(bind.clone());
    assert_eq!(read(&bind.join("f")), "old\n");

    // A restart done with a plain umount: the old daemon lives on for the bind mount.
    run("umount", &[&mnt.to_string_lossy()]);
    assert!(mount_at(&mnt).is_none());
    assert!(
        !exited(old_pid),
        "the old daemon still serves the bind mount"
    );

    // A new daemon (another local backend: the old one still holds its own) mounts.
    let log = next.scratch_path("next.log");
    let mut daemon = start_daemon(next.config_path(), &mnt, &log);
    let deadline = Instant::now() + Duration::from_secs(20);
    let new_dev = loop {
        if let Some((d, t)) = mount_at(&mnt) {
            if t == "fuse.labfs" {
                break d;
            }
        }
        assert!(
            daemon.try_wait().unwrap().is_none(),
            "new daemon exited: {}",
            read(&log)
        );
        assert!(Instant::now() < deadline, "new daemon did not mount");
        thread::sleep(Duration::from_millis(20));
    };
    assert_ne!(new_dev, old_dev);
    assert_eq!(read(&mnt.join("cache/marker")), "new\n");

    // The container exits: the old daemon's last mount goes and it exits.
    run("umount", &[&bind.to_string_lossy()]);
    drop(bind_guard);
    wait_until("the old daemon exits", Duration::from_secs(20), || {
        exited(old_pid)
    });

    // The new mount is still there and still serves.
    assert_eq!(
        mount_at(&mnt),
        Some((new_dev.clone(), "fuse.labfs".to_owned())),
        "the old daemon unmounted the new daemon's mount"
    );
    assert_eq!(read(&mnt.join("cache/marker")), "new\n");
    let old_log = old.daemon_log();
    assert!(
        old_log.contains("left alone") && old_log.contains(&new_dev),
        "the old daemon must say it left the new mount alone:\n{old_log}"
    );

    run("umount", &[&mnt.to_string_lossy()]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while daemon.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "new daemon did not exit");
        thread::sleep(Duration::from_millis(10));
    }
    let _ = &mut old;
}

/// Lazily unmounts a bind mount if the test fails before releasing it.
struct BindGuard(std::path::PathBuf);
fn scopeguard(p: std::path::PathBuf) -> BindGuard {
    BindGuard(p)
}
impl Drop for BindGuard {
    fn drop(&mut self) {
        if mount_fstype(&self.0).is_some() {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}
