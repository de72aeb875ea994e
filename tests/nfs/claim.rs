//! The commit path labfs takes on NFS (no renameat2 flags: an exclusive link(2) or
//! mkdir(2) claim, then a plain rename), forced on tmpfs with the test-only
//! `LABFS_PROMOTE_NO_RENAME_FLAGS=1` so it is covered on every run, not only in the
//! VM; and the cleanup of a failed commit.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use crate::common::*;

fn claim_lab() -> LabBuilder {
    MountedLab::builder().env("LABFS_PROMOTE_NO_RENAME_FLAGS", "1")
}

fn promote(lab: &MountedLab, path: &str) -> (i32, String, String) {
    lab.sh_status(&format!(r#""$LABFS" promote "$LAB/{path}""#))
}

#[test]
fn claim_path_promotes_a_tree_and_a_single_file() {
    let lab = claim_lab().mount();
    lab.sh(
        r#"mkdir -p "$LAB/scans/s1/work/out/sub" && echo a > "$LAB/scans/s1/work/out/a" &&
           echo b > "$LAB/scans/s1/work/out/sub/b" && ln -s a "$LAB/scans/s1/work/out/l" &&
           chmod 0750 "$LAB/scans/s1/work/out" && echo one > "$LAB/scans/s1/work/single" &&
           ln -s single "$LAB/scans/s1/work/link""#,
    );
    for p in [
        "scans/s1/work/out",
        "scans/s1/work/single",
        "scans/s1/work/link",
    ] {
        let (code, out, err) = promote(&lab, p);
        assert_eq!(code, 0, "{p}: {out}{err}\n{}", lab.daemon_log());
    }
    let out = lab.atlas_path("scans/s1/work/out");
    assert_eq!(read(&out.join("sub/b")), "b\n");
    assert_eq!(
        fs::read_link(out.join("l")).expect("symlink"),
        Path::new("a")
    );
    assert_eq!(
        mode(&out) & 0o7777,
        0o750,
        "the placeholder's mode must not survive"
    );
    let single = lab.atlas_path("scans/s1/work/single");
    assert_eq!(read(&single), "one\n");
    assert_eq!(
        fs::metadata(&single).expect("single").nlink(),
        1,
        "the staged name of a linked file is removed"
    );
    assert_eq!(
        fs::read_link(lab.atlas_path("scans/s1/work/link")).expect("link"),
        Path::new("single")
    );
    assert!(!lab.local_path("scans/s1/work/out").exists());
    assert!(lab.daemon_log().contains("promoted /scans/s1/work/out"));
}

#[test]
fn claim_path_refuses_a_target_that_appears_and_keeps_everything() {
    let lab = claim_lab().env("LABFS_PROMOTE_DELAY_MS", "300").mount();
    lab.sh(
        r#"mkdir -p "$LAB/scans/s1/work/out" && for i in 1 2 3 4 5 6 7 8; do echo $i > "$LAB/scans/s1/work/out/f$i"; done"#,
    );
    let mut job = lab
        .cmd(r#""$LABFS" promote "$LAB/scans/s1/work/out""#)
        .spawn();
    let staging = lab.atlas_path(".labfs/staging");
    wait_until("the job stages", Duration::from_secs(30), || {
        sh_status(&format!(
            "ls {}/*/*/data/f* >/dev/null 2>&1",
            staging.display()
        ))
        .0 == 0
    });
    // Another node's promotion of the same path got there first.
    let theirs = lab.atlas_path("scans/s1/work/out");
    fs::create_dir_all(&theirs).expect("mkdir on Atlas");
    fs::write(theirs.join("theirs"), "other node\n").expect("write on Atlas");
    let status = job
        .wait_timeout(Duration::from_secs(60))
        .expect("the promotion ends");
    assert!(!status.success(), "promoted over a target that appeared");
    assert_eq!(names(&theirs), vec!["theirs".to_string()]);
    assert_eq!(names(lab.local_path("scans/s1/work/out")).len(), 8);
    assert_eq!(
        lab.sh(r#"find "$ATLAS/.labfs/staging" -mindepth 2 2>/dev/null || true"#),
        ""
    );
}

#[test]
fn claim_path_recovery_takes_over_its_own_placeholder() {
    let mut lab = claim_lab()
        .env("LABFS_PROMOTE_CRASH_AT", "verified")
        .mount();
    lab.sh(r#"mkdir -p "$LAB/scans/s1/work/out" && echo x > "$LAB/scans/s1/work/out/x""#);
    let (code, _, _) = promote(&lab, "scans/s1/work/out");
    assert_ne!(code, 0, "the daemon crashed after verifying");
    assert!(lab.wait_for_log("LABFS_PROMOTE_CRASH_AT=verified", Duration::from_secs(10)));
    lab.kill9();
    // As if the crash came between the claim (mkdir of the placeholder) and the rename.
    let target = lab.atlas_path("scans/s1/work/out");
    fs::create_dir_all(target.parent().expect("parent")).expect("parents");
    fs::DirBuilder::new()
        .mode(0o000)
        .create(&target)
        .expect("placeholder");
    fs::set_permissions(&target, fs::Permissions::from_mode(0o000)).expect("mode 0");
    lab.remount();
    assert_eq!(read(&target.join("x")), "x\n", "{}", lab.daemon_log());
    assert!(!lab.local_path("scans/s1/work/out").exists());
}

#[test]
fn failed_commit_leaves_no_parent_chain_and_no_tag_record() {
    let lab = MountedLab::builder()
        .env("LABFS_PROMOTE_FAIL_AT", "placing")
        .mount();
    lab.sh(r#"mkdir -p "$LAB/scans/s7/work/out" && echo x > "$LAB/scans/s7/work/out/x""#);
    let (code, out, err) = promote(&lab, "scans/s7/work/out");
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        !lab.atlas_path("scans/s7/work").exists(),
        "parent chain left on Atlas"
    );
    assert_eq!(
        lab.sh(r#"find "$ATLAS/.labfs/tags" -type f 2>/dev/null || true"#),
        "",
        "tag record left on Atlas"
    );
    assert_eq!(read(&lab.local_path("scans/s7/work/out/x")), "x\n");
}
