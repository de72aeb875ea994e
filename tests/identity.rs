//! Who a request acts as: labfs takes on the caller's uid, gid and groups on the
//! backend, and a request whose identity cannot be taken on fails with EPERM rather
//! than running as root (or as the previous caller).

use std::fs;
use std::os::unix::fs::MetadataExt;

use crate::common::*;

/// `setpriv --regid 100 --clear-groups touch f` as root gives a file of gid 100 on
/// ext4; through labfs it gave gid 0.
#[test]
fn a_root_caller_with_another_gid_creates_files_of_that_gid() {
    let lab = MountedLab::with_dirs();
    for b in BOTH {
        let d = b.dir();
        lab.cmd(&format!(
            r#"touch "$LAB/{d}/f"; mkdir "$LAB/{d}/sub"; ln -s f "$LAB/{d}/l"; mknod "$LAB/{d}/p" p"#
        ))
        .user(0, 100)
        .ok();
        for name in ["f", "sub", "l", "p"] {
            let through = fs::symlink_metadata(lab.path(&format!("{d}/{name}"))).unwrap();
            let stored = fs::symlink_metadata(lab.backend_path(b, &format!("{d}/{name}"))).unwrap();
            assert_eq!(
                (through.uid(), through.gid()),
                (0, 100),
                "{}: {d}/{name} through the mount",
                b.name()
            );
            assert_eq!(
                (stored.uid(), stored.gid()),
                (0, 100),
                "{}: {d}/{name} on the backend",
                b.name()
            );
        }
    }
}

/// A daemon that lacks CAP_SETUID/CAP_SETGID (a unit hardened too far) cannot act as
/// anyone but itself: every non-root request must fail with EPERM, and nothing it
/// asked for may happen as root. Before, the failed switch was ignored and user 1000's
/// files were created by root.
#[test]
fn a_request_whose_identity_cannot_be_assumed_fails_with_eperm_and_never_runs_as_root() {
    let lab = MountedLab::builder()
        .daemon_wrapper(&["setpriv", "--bounding-set", "-setuid,-setgid", "--"])
        .mount();
    // Root's own requests need no switch (same identity as the daemon): they work.
    lab.sh(r#"mkdir -m 1777 "$LAB/docs" "$LAB/cache"; echo root > "$LAB/docs/root-file""#);
    for b in BOTH {
        let d = b.dir();
        let (code, _, err) = lab.sh_as_status(USER, USER, &format!(r#"echo x > "$LAB/{d}/mine""#));
        assert_ne!(
            code,
            0,
            "{}: user {USER} wrote without its identity",
            b.name()
        );
        assert!(
            err.contains("Operation not permitted"),
            "{}: expected EPERM, got: {err}",
            b.name()
        );
        assert!(
            !lab.backend_path(b, &format!("{d}/mine")).exists(),
            "{}: the refused request still created the file (as root: {:?})",
            b.name(),
            fs::metadata(lab.backend_path(b, &format!("{d}/mine"))).map(|m| m.uid())
        );
        let (code, _, err) = lab.sh_as_status(USER, USER, &format!(r#"mkdir "$LAB/{d}/dir""#));
        assert_ne!(
            code,
            0,
            "{}: mkdir ran without the caller's identity",
            b.name()
        );
        assert!(
            err.contains("Operation not permitted"),
            "{}: {err}",
            b.name()
        );
        assert!(!lab.backend_path(b, &format!("{d}/dir")).exists());
    }
    // The failures left no thread stuck in a half-switched identity: root still works
    // and what it creates is root's.
    lab.sh(r#"echo again > "$LAB/docs/after"; echo again > "$LAB/cache/after""#);
    for b in BOTH {
        let m = fs::metadata(lab.backend_path(b, &format!("{}/after", b.dir()))).unwrap();
        assert_eq!((m.uid(), m.gid()), (0, 0), "{}", b.name());
    }
    assert!(
        lab.daemon_log().contains("cannot act as uid 1000"),
        "the refusal is logged for the operator:\n{}",
        lab.daemon_log()
    );
}

/// Supplementary groups are the caller's own, request by request: a member of a group
/// may write a group-writable directory, the next caller (same uid, without the group)
/// may not, even though the daemon thread just held the group.
#[test]
fn supplementary_groups_follow_each_request() {
    let lab = MountedLab::with_dirs();
    for b in BOTH {
        let d = b.dir();
        lab.sh(&format!(
            r#"mkdir "$LAB/{d}/team"; chgrp 4300 "$LAB/{d}/team"; chmod 0770 "$LAB/{d}/team""#
        ));
        lab.cmd(&format!(r#"echo in > "$LAB/{d}/team/by-member""#))
            .user_groups(USER, USER, &[4300])
            .ok();
        let (code, _, err) = lab.sh_as_status(
            USER,
            USER,
            &format!(r#"echo out > "$LAB/{d}/team/by-outsider""#),
        );
        assert_ne!(
            code,
            0,
            "{}: a non-member wrote into the group's dir",
            b.name()
        );
        assert!(err.contains("Permission denied"), "{}: {err}", b.name());
        let m = fs::metadata(lab.backend_path(b, &format!("{d}/team/by-member"))).unwrap();
        assert_eq!((m.uid(), m.gid()), (USER, USER), "{}", b.name());
    }
}

/// `Creds::assume` returns a `Result`; binding it without `?` (`let _as =
/// creds.assume();`) compiles and silently runs the request as whoever the thread was.
/// Every call site must look at the result.
#[test]
fn every_identity_switch_in_the_source_checks_its_result() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut stack = vec![src];
    let mut offenders = Vec::new();
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                for (i, line) in fs::read_to_string(&p).unwrap().lines().enumerate() {
                    if line.contains(".assume();") {
                        offenders.push(format!("{}:{}: {}", p.display(), i + 1, line.trim()));
                    }
                }
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "unchecked identity switches:\n{}",
        offenders.join("\n")
    );
}
