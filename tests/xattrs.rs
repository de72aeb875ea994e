//! labfs's `user.labfs.*` names as copying tools see them: answered when asked for by
//! name, on regular files and directories only, and never listed, so `rsync -aX`,
//! `cp -a` and `mv` copy a tree's own attributes and nothing of labfs's.

use std::fs;
use std::time::Duration;

use crate::common::*;

/// A tree with every kind of object: a file with a user xattr, a directory, a
/// symlink, a fifo, a socket-free special (fifo is the one a user creates).
fn make_tree(lab: &MountedLab, rel: &str) {
    lab.sh(&format!(
        r#"T="$LAB/{rel}"
           mkdir -p "$T/dir"
           echo data > "$T/file"
           setfattr -n user.mine -v kept "$T/file"
           ln -s file "$T/link"
           ln -s /nowhere "$T/dangling"
           mkfifo "$T/fifo"
           echo inner > "$T/dir/inner""#
    ));
}

#[test]
fn labfs_names_are_answered_by_name_on_files_and_dirs_and_never_listed() {
    let lab = MountedLab::with_dirs();
    for b in BOTH {
        let rel = format!("{}/t", b.dir());
        make_tree(&lab, &rel);
        for obj in ["file", "dir"] {
            let out = lab.sh(&format!(
                r#"getfattr --only-values -n user.labfs.backend "$LAB/{rel}/{obj}""#
            ));
            assert_eq!(out, b.name(), "{rel}/{obj}");
            let listed = lab.sh(&format!(r#"getfattr -d -m - "$LAB/{rel}/{obj}""#));
            assert!(
                !listed.contains("user.labfs"),
                "{rel}/{obj}: labfs names listed:\n{listed}"
            );
        }
        let listed = lab.sh(&format!(r#"getfattr -d -m - "$LAB/{rel}/file""#));
        assert!(listed.contains("user.mine=\"kept\""), "{listed}");
        for obj in ["link", "fifo"] {
            let (code, out, err) = lab.sh_status(&format!(
                r#"getfattr -h -d -m - "$LAB/{rel}/{obj}"; getfattr -h -n user.labfs.class "$LAB/{rel}/{obj}""#
            ));
            assert_ne!(code, 0, "{rel}/{obj}: user.labfs.class read on a {obj}");
            assert!(
                err.contains("No such attribute"),
                "{rel}/{obj}: expected ENODATA: {err}"
            );
            assert!(!out.contains("user.labfs"), "{rel}/{obj} lists:\n{out}");
        }
    }
}

/// rsync -aX asks for every listed name; with labfs's names listed on symlinks and
/// fifos (where they cannot be read) it exited 23.
#[test]
fn rsync_ax_of_a_tree_with_symlinks_and_fifos_exits_0() {
    let lab = MountedLab::with_dirs();
    for b in BOTH {
        let rel = format!("{}/t", b.dir());
        make_tree(&lab, &rel);
        let d = b.dir();
        let other = b.other().dir();
        // Out of the mount, within it across backends, and back into it.
        let out = lab.sh(&format!(
            r#"rsync -aX "$LAB/{rel}/" "$SCRATCH/out-{d}/" 2>&1
               rsync -aX "$LAB/{rel}/" "$LAB/{other}/from-{d}/" 2>&1
               rsync -aX "$SCRATCH/out-{d}/" "$LAB/{d}/back/" 2>&1
               getfattr --only-values -n user.mine "$SCRATCH/out-{d}/file"; echo
               getfattr --only-values -n user.mine "$LAB/{other}/from-{d}/file"; echo
               getfattr --only-values -n user.mine "$LAB/{d}/back/file"; echo
               test -p "$LAB/{other}/from-{d}/fifo"
               test "$(readlink "$LAB/{d}/back/link")" = file"#
        ));
        assert_eq!(out, "kept\nkept\nkept\n", "{}", b.name());
        let stored = lab.sh(&format!(
            r#"getfattr -d -m - "$SCRATCH/out-{d}/file" "$SCRATCH/out-{d}/dir""#
        ));
        assert!(
            !stored.contains("user.labfs"),
            "labfs's names were copied out:\n{stored}"
        );
    }
}

/// cp -a and mv between backends copy xattrs; with labfs's (read-only) names listed
/// they printed "setting attribute ... Operation not permitted" unless /etc/xattr.conf
/// said to skip them. Run with an /etc/xattr.conf that says nothing about labfs.
#[test]
fn cp_a_and_mv_across_backends_print_no_xattr_errors_without_an_xattr_conf_line() {
    let lab = MountedLab::with_dirs();
    make_tree(&lab, "docs/t");
    make_tree(&lab, "cache/t");
    let conf = lab.scratch_path("xattr.conf");
    fs::write(&conf, "system.posix_acl_access permissions\n").unwrap();
    let out = lab.cmd(&format!(
        r#"exec unshare -m sh -euc '
             mount --bind "{conf}" /etc/xattr.conf
             cp -a "$LAB/docs/t" "$LAB/cache/cp-from-docs"
             cp -a "$LAB/cache/t" "$LAB/docs/cp-from-cache"
             mv "$LAB/docs/t" "$LAB/cache/mv-from-docs"
             mv "$LAB/cache/t" "$LAB/docs/mv-from-cache"
             getfattr --absolute-names --only-values -n user.mine "$LAB/cache/cp-from-docs/file"; echo
             getfattr --absolute-names --only-values -n user.mine "$LAB/docs/mv-from-cache/file"; echo
           ' 2>&1"#,
        conf = conf.display()
    ))
    .ok();
    assert_eq!(out, "kept\nkept\n", "cp/mv said more than the values");
    assert!(!lab.path("docs/t").exists() && !lab.path("cache/t").exists());
}

/// A promoted file carries stored tags on Atlas (real xattrs in xattr mode): they are
/// answered by name, and copying the file elsewhere copies none of them.
#[test]
fn stored_tags_of_a_promoted_file_are_answered_by_name_and_not_copied() {
    let lab = MountedLab::with_dirs();
    lab.sh(r#"mkdir -p "$LAB/scans/s1/work/out"; echo v > "$LAB/scans/s1/work/out/f""#);
    let (code, out, err) = lab.sh_status(r#""$LABFS" promote "$LAB/scans/s1/work/out""#);
    assert_eq!(code, 0, "promote: {out}{err}\n{}", lab.daemon_log());
    let f = r#""$LAB/scans/s1/work/out/f""#;
    let digest = lab.sh(&format!("getfattr --only-values -n user.labfs.digest {f}"));
    assert!(digest.starts_with("blake3:"), "{digest}");
    let listed = lab.sh(&format!("getfattr -d -m - {f}"));
    assert!(!listed.contains("user.labfs"), "{listed}");
    let out = lab.sh(&format!(
        r#"cp -a {f} "$LAB/cache/copy" 2>&1; rsync -aX {f} "$SCRATCH/copy" 2>&1
           getfattr -d -m - "$SCRATCH/copy" "$LAB/cache/copy""#
    ));
    assert!(!out.contains("user.labfs"), "{out}");
    assert!(!out.contains("not permitted"), "{out}");
}

/// A promoted file written again: its stored digest no longer describes it, so its
/// state reads `modified` (it read `promoted`, with the stale digest), on Atlas with
/// xattrs and on Atlas without (tags in the store).
#[test]
fn a_promoted_file_written_again_reads_as_modified() {
    for xattr_less in [false, true] {
        let b = MountedLab::builder();
        let lab = if xattr_less { b.xattr_less_atlas() } else { b }.mount();
        lab.sh(
            r#"mkdir -p "$LAB/scans/s1/work/out"; echo v > "$LAB/scans/s1/work/out/f"
               echo w > "$LAB/scans/s1/work/out/g""#,
        );
        let (code, out, err) = lab.sh_status(r#""$LABFS" promote "$LAB/scans/s1/work/out""#);
        assert_eq!(code, 0, "promote: {out}{err}\n{}", lab.daemon_log());
        let state = |f: &str| {
            lab.sh(&format!(
                r#"getfattr --only-values -n user.labfs.state "$LAB/scans/s1/work/out/{f}""#
            ))
        };
        assert_eq!(state("f"), "promoted");
        let at = lab
            .sh(r#"getfattr --only-values -n user.labfs.promoted_at "$LAB/scans/s1/work/out/f""#);
        // promoted_at has whole seconds: write once the clock is past it.
        wait_until(
            "the clock passes promoted_at",
            Duration::from_secs(5),
            || {
                lab.sh(&format!(
                    // One second of slack: file times come from the kernel's coarse
                    // clock, which may still show the previous second.
                    r#"[ "$(date -u +%s)" -gt "$(( $(date -u -d {at} +%s) + 1 ))" ] && echo y || true"#
                )) == "y\n"
            },
        );
        lab.sh(r#"echo more >> "$LAB/scans/s1/work/out/f""#);
        assert_eq!(state("f"), "modified", "xattr_less={xattr_less}");
        assert_eq!(
            state("g"),
            "promoted",
            "an untouched sibling stays promoted"
        );
        assert_eq!(
            lab.sh(r#"getfattr --only-values -n user.labfs.state "$LAB/scans/s1/work/out""#),
            "promoted",
            "the directory"
        );
    }
}

/// labfs's reserved prefix is matched on the name's bytes: a `user.labfs.` name that
/// is not UTF-8 is refused like any other (it reached the backend before).
#[test]
fn a_reserved_name_that_is_not_utf8_is_refused_and_never_stored() {
    let lab = MountedLab::with_dirs();
    for b in BOTH {
        let rel = format!("{}/f", b.dir());
        lab.sh(&format!(r#"echo x > "$LAB/{rel}""#));
        let out = lab.sh(&format!(
            r#"python3 - "$LAB/{rel}" <<'PY'
import errno, os, sys
name = b"user.labfs.class\xff"
for call in (lambda: os.setxattr(sys.argv[1], name, b"v"),
             lambda: os.removexattr(sys.argv[1], name)):
    try:
        call()
        print("allowed")
    except OSError as e:
        print(errno.errorcode[e.errno])
try:
    os.getxattr(sys.argv[1], name)
    print("read")
except OSError as e:
    print(errno.errorcode[e.errno])
PY"#
        ));
        assert_eq!(out.trim(), "EPERM\nEPERM\nENODATA", "{}", b.name());
        let raw = lab.backend_path(b, &rel);
        let stored = lab.sh(&format!("getfattr -d -m - {} 2>&1", raw.display()));
        assert!(
            !stored.contains("user.labfs.class"),
            "{}: {stored}",
            b.name()
        );
    }
}
