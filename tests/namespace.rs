//! Placement as a user sees it: which backend data lands on, the union view, EXDEV
//! across backends, stable inode numbers, read-only rules, `unplaced = "deny"`, the
//! `explain` / `check` / mount lifecycle commands, and an xattr-less Atlas.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use crate::common::*;

#[test]
fn files_land_on_the_backend_of_their_class() {
    let lab = MountedLab::new();
    lab.sh(r#"
        mkdir -p "$LAB/docs" "$LAB/state" "$LAB/cache" "$LAB/scans/s1/work"
        echo authoritative > "$LAB/docs/a.txt"
        echo runtime > "$LAB/state/s.db"
        echo ephemeral > "$LAB/cache/c.bin"
        echo transitional > "$LAB/scans/s1/work/w.dat"
        echo unmatched > "$LAB/scans/s1/raw.dat"
        "#);
    let cases = [
        ("docs/a.txt", Backend::Atlas, "authoritative"),
        ("state/s.db", Backend::Atlas, "runtime"),
        ("cache/c.bin", Backend::Local, "ephemeral"),
        ("scans/s1/work/w.dat", Backend::Local, "transitional"),
        ("scans/s1/raw.dat", Backend::Atlas, "unmatched"),
    ];
    for (rel, backend, content) in cases {
        let here = lab.backend_path(backend, rel);
        let there = lab.backend_path(backend.other(), rel);
        assert_eq!(
            fs::read_to_string(&here).ok().as_deref(),
            Some(&*format!("{content}\n")),
            "/{rel} should be stored on {} at {}",
            backend.name(),
            here.display()
        );
        assert!(
            !there.exists(),
            "/{rel} must not also be stored on {} ({})",
            backend.other().name(),
            there.display()
        );
        assert_eq!(read(&lab.path(rel)), format!("{content}\n"));
    }
}

#[test]
fn root_listing_is_the_union_of_both_backends() {
    let lab = MountedLab::new();
    lab.sh(r#"mkdir -p "$LAB/docs" "$LAB/cache" "$LAB/scans/s1/work" "$LAB/state""#);
    assert!(lab.atlas_path("docs").is_dir());
    assert!(lab.local_path("cache").is_dir());
    let ls = lab.sh(r#"ls -1 -A "$LAB""#);
    // Each name once (`scans` exists on both backends), and not labfs's own /.labfs.
    assert_eq!(ls, "cache\ndocs\nscans\nstate\n");
}

#[test]
fn mixed_directory_lists_entries_from_both_backends() {
    let lab = MountedLab::new();
    lab.sh(r#"
        mkdir -p "$LAB/scans/s1/work"
        echo raw > "$LAB/scans/s1/raw.dat"
        echo out > "$LAB/scans/s1/work/out.dat"
        "#);
    assert!(lab.atlas_path("scans/s1/raw.dat").is_file());
    assert!(lab.local_path("scans/s1/work/out.dat").is_file());
    assert!(
        !lab.atlas_path("scans/s1/work").exists(),
        "work must not be on atlas"
    );
    assert_eq!(lab.sh(r#"ls "$LAB/scans/s1""#), "raw.dat\nwork\n");
    assert_eq!(lab.sh(r#"ls "$LAB/scans/s1/work""#), "out.dat\n");
    // ls -l stats every entry through its own backend.
    let long = lab.sh(r#"ls -l "$LAB/scans/s1""#);
    assert!(
        long.lines()
            .any(|l| l.starts_with('d') && l.ends_with(" work")),
        "{long}"
    );
    assert!(
        long.lines()
            .any(|l| l.starts_with('-') && l.ends_with(" raw.dat")),
        "{long}"
    );
    assert_eq!(lab.sh(r#"cat "$LAB/scans/s1/work/out.dat""#), "out\n");
}

#[test]
fn data_on_the_wrong_backend_is_hidden() {
    let lab = MountedLab::new();
    lab.sh(
        r#"mkdir -p "$LAB/cache" "$LAB/docs" "$LAB/scans/s1/work"; echo ok > "$LAB/cache/right""#,
    );
    // Written behind labfs's back, each on the backend its rule does not place it on.
    lab.sh(r#"
        mkdir -p "$ATLAS/cache" "$LOCAL/docs"
        echo stray-atlas > "$ATLAS/cache/x"
        echo stray-local > "$LOCAL/docs/y"
        echo stray-local > "$LOCAL/scans/s1/stray.dat"
        "#);
    assert_eq!(names(lab.path("cache")), vec!["right"]);
    assert!(
        names(lab.path("docs")).is_empty(),
        "{:?}",
        names(lab.path("docs"))
    );
    assert_eq!(names(lab.path("scans/s1")), vec!["work"]);
    let (code, _, err) = lab.sh_status(r#"cat "$LAB/cache/x""#);
    assert_ne!(code, 0);
    assert!(
        err.contains("No such file"),
        "cat of a misplaced file: {err}"
    );
    let (code, _, _) = lab.sh_status(r#"stat "$LAB/docs/y""#);
    assert_ne!(code, 0, "misplaced /docs/y must not be visible");

    // Creating the path through the mount puts it on the right backend, untouched stray.
    lab.sh(r#"echo fresh > "$LAB/cache/x""#);
    assert_eq!(read(&lab.path("cache/x")), "fresh\n");
    assert_eq!(read(&lab.local_path("cache/x")), "fresh\n");
    assert_eq!(read(&lab.atlas_path("cache/x")), "stray-atlas\n");
}

#[test]
fn check_reports_misplaced_data_and_deletes_nothing() {
    let lab = MountedLab::new();
    lab.sh(r#"
        mkdir -p "$LAB/cache" "$LAB/docs" "$LAB/scans/s1/work"
        echo a > "$LAB/cache/ok"; echo b > "$LAB/docs/ok"; echo c > "$LAB/scans/s1/work/ok"
        "#);
    let (code, out, err) = lab.labfs("check", &[]);
    assert_eq!(code, 0, "labfs check on a clean tree:\n{out}{err}");

    lab.sh(r#"
        mkdir -p "$ATLAS/cache"
        echo stray > "$ATLAS/cache/x"
        echo stray > "$LOCAL/scans/s1/stray.dat"
        "#);
    let (code, out, err) = lab.labfs("check", &[]);
    let all = format!("{out}{err}");
    assert_ne!(
        code, 0,
        "labfs check must fail when data is misplaced:\n{all}"
    );
    // ATLAS/cache is misplaced as a whole: naming the directory or the file will do.
    assert!(
        all.contains("cache/x")
            || all
                .lines()
                .any(|l| l.contains("/cache ") && l.contains("atlas")),
        "check output should name /cache/x (or its misplaced directory /cache on atlas):\n{all}"
    );
    // LOCAL/scans/s1 legitimately holds `work`; the stray file itself is misplaced.
    assert!(
        all.contains("scans/s1/stray.dat"),
        "check output should name /scans/s1/stray.dat:\n{all}"
    );
    assert!(
        !all.contains("/ok"),
        "check must not report correctly placed data:\n{all}"
    );
    for p in [
        lab.atlas_path("cache/x"),
        lab.local_path("scans/s1/stray.dat"),
        lab.local_path("cache/ok"),
        lab.atlas_path("docs/ok"),
        lab.local_path("scans/s1/work/ok"),
    ] {
        assert!(p.is_file(), "check must not delete {}", p.display());
    }
}

#[test]
fn mkdir_p_creates_parents_on_the_right_backend() {
    let lab = MountedLab::new();
    lab.sh(r#"
        mkdir -p "$LAB/scans/s2/work/a/b"
        mkdir -p "$LAB/docs/x/y/z"
        mkdir -p "$LAB/cache/p/q"
        "#);
    assert!(lab.local_path("scans/s2/work/a/b").is_dir());
    assert!(lab.atlas_path("scans/s2").is_dir());
    assert!(!lab.atlas_path("scans/s2/work").exists());
    assert!(lab.atlas_path("docs/x/y/z").is_dir());
    assert!(!lab.local_path("docs/x").exists());
    assert!(lab.local_path("cache/p/q").is_dir());
    assert!(!lab.atlas_path("cache/p").exists());
    for d in ["scans/s2/work/a/b", "docs/x/y/z", "cache/p/q"] {
        assert!(
            lab.path(d).is_dir(),
            "/{d} should be a directory through the mount"
        );
    }
}

#[test]
fn mv_file_across_backends_copies_and_deletes() {
    let lab = MountedLab::new();
    lab.sh(r#"
        mkdir -p "$LAB/docs" "$LAB/cache"
        printf 'payload\n' > "$LAB/docs/f"
        chmod 640 "$LAB/docs/f"
        touch -d '2020-01-02 03:04:05' "$LAB/docs/f"
        mv "$LAB/docs/f" "$LAB/cache/f"
        "#);
    assert!(!lab.path("docs/f").exists());
    assert!(!lab.atlas_path("docs/f").exists());
    assert_eq!(read(&lab.local_path("cache/f")), "payload\n");
    assert_eq!(read(&lab.path("cache/f")), "payload\n");
    assert_eq!(
        lab.sh(r#"stat -c '%a %y' "$LAB/cache/f""#)
            .split('.')
            .next()
            .unwrap(),
        "640 2020-01-02 03:04:05"
    );
    // And back.
    lab.sh(r#"mv "$LAB/cache/f" "$LAB/docs/g""#);
    assert!(!lab.local_path("cache/f").exists());
    assert_eq!(read(&lab.atlas_path("docs/g")), "payload\n");
}

#[test]
fn mv_directory_across_backends_copies_and_deletes() {
    let lab = MountedLab::new();
    lab.sh(r#"
        mkdir -p "$LAB/docs/d/sub" "$LAB/cache"
        echo a > "$LAB/docs/d/a"
        echo b > "$LAB/docs/d/sub/b"
        ln -s a "$LAB/docs/d/link"
        mv "$LAB/docs/d" "$LAB/cache/d"
        "#);
    assert!(!lab.path("docs/d").exists());
    assert!(!lab.atlas_path("docs/d").exists());
    assert_eq!(read(&lab.path("cache/d/a")), "a\n");
    assert_eq!(read(&lab.path("cache/d/sub/b")), "b\n");
    assert_eq!(read(&lab.local_path("cache/d/sub/b")), "b\n");
    assert_eq!(
        fs::read_link(lab.path("cache/d/link")).unwrap().to_str(),
        Some("a")
    );
    assert_eq!(names(lab.path("cache/d")), vec!["a", "link", "sub"]);
}

#[test]
fn rename_and_link_across_backends_fail_with_exdev() {
    let lab = MountedLab::new();
    lab.sh(r#"
        mkdir -p "$LAB/docs/dir" "$LAB/cache" "$LAB/scans/s1/work"
        echo f > "$LAB/docs/f"
        echo r > "$LAB/scans/s1/raw"
        "#);
    let cases = [
        ("docs/f", "cache/f"),
        ("docs/dir", "cache/dir"),
        ("scans/s1/raw", "scans/s1/work/raw"),
    ];
    for (from, to) in cases {
        let err = fs::rename(lab.path(from), lab.path(to))
            .expect_err(&format!("rename /{from} -> /{to} must fail"));
        assert_eq!(
            err.raw_os_error(),
            Some(libc::EXDEV),
            "rename /{from} -> /{to}: {err}"
        );
        assert!(
            lab.path(from).exists(),
            "/{from} must survive the failed rename"
        );
        assert!(!lab.path(to).exists());
    }
    let err = fs::hard_link(lab.path("docs/f"), lab.path("cache/f")).expect_err("cross link");
    assert_eq!(
        err.raw_os_error(),
        Some(libc::EXDEV),
        "link across backends: {err}"
    );
    // The same through python's os.rename, as a script would see it.
    let out = lab.sh(r#"python3 -c '
import errno, os, sys
try:
    os.rename(sys.argv[1], sys.argv[2])
    print("renamed")
except OSError as e:
    print(errno.errorcode[e.errno])
' "$LAB/docs/f" "$LAB/cache/f""#);
    assert_eq!(out.trim(), "EXDEV");
}

#[test]
fn rename_within_a_backend_keeps_the_inode_number() {
    let _no_cache_drop = inode_numbers_compared();
    let lab = MountedLab::new();
    for b in BOTH {
        let d = b.dir();
        lab.sh(&format!(
            r#"mkdir -p "$LAB/{d}/sub" "$LAB/{d}/tree/in"; echo x > "$LAB/{d}/f"; echo y > "$LAB/{d}/tree/in/g""#
        ));
        let f = ino(&lab.path(&format!("{d}/f")));
        let tree = ino(&lab.path(&format!("{d}/tree")));
        let g = ino(&lab.path(&format!("{d}/tree/in/g")));
        lab.sh(&format!(
            r#"mv "$LAB/{d}/f" "$LAB/{d}/sub/f2"; mv "$LAB/{d}/tree" "$LAB/{d}/sub/tree2""#
        ));
        assert_eq!(
            ino(&lab.path(&format!("{d}/sub/f2"))),
            f,
            "{} file rename",
            b.name()
        );
        assert_eq!(
            ino(&lab.path(&format!("{d}/sub/tree2"))),
            tree,
            "{} dir rename",
            b.name()
        );
        assert_eq!(
            ino(&lab.path(&format!("{d}/sub/tree2/in/g"))),
            g,
            "{}: a file inside a renamed directory keeps its inode",
            b.name()
        );
        let via_stat = lab.sh(&format!(r#"stat -c %i "$LAB/{d}/sub/f2""#));
        assert_eq!(via_stat.trim(), f.to_string());
    }
}

#[test]
fn inode_numbers_are_stable_across_repeated_lookups() {
    let lab = MountedLab::new();
    lab.sh(r#"
        mkdir -p "$LAB/docs/d" "$LAB/cache/d" "$LAB/scans/s1/work"
        for i in 1 2 3 4 5; do echo $i > "$LAB/docs/d/f$i"; echo $i > "$LAB/cache/d/f$i"; done
        "#);
    let listing = r#"ls -i "$LAB/docs/d" "$LAB/cache/d" "$LAB/scans/s1"; stat -c '%i %n' "$LAB/docs" "$LAB/cache" "$LAB/scans/s1/work""#;
    let first = lab.sh(listing);
    for _ in 0..3 {
        assert_eq!(
            lab.sh(listing),
            first,
            "inode numbers changed between lookups"
        );
        drop_kernel_caches();
        assert_eq!(
            lab.sh(listing),
            first,
            "inode numbers changed after the kernel forgot them"
        );
    }
}

#[test]
fn inode_numbers_are_unique_across_backends() {
    let _no_cache_drop = inode_numbers_compared();
    let lab = MountedLab::new();
    // Two fresh tmpfs hand out the same small inode numbers: labfs must not pass them through.
    lab.sh(r#"
        mkdir -p "$LAB/docs" "$LAB/cache"
        for i in 1 2 3 4 5 6 7 8; do echo $i > "$LAB/docs/f$i"; echo $i > "$LAB/cache/f$i"; done
        "#);
    let out = lab.sh(r#"find "$LAB" -mindepth 1 -exec stat -c '%i %n' {} +"#);
    let mut seen: HashMap<&str, &str> = HashMap::new();
    for line in out.lines() {
        let (i, name) = line.split_once(' ').unwrap();
        if let Some(prev) = seen.insert(i, name) {
            panic!("inode {i} shared by {prev} and {name} (not hard links):\n{out}");
        }
    }
}

/// Rules with a read-only `/media` whose only writer is `gid:MEDIA_WRITER_GID`,
/// populated behind labfs's back with files a non-root user may touch permission-wise.
fn media_lab() -> MountedLab {
    let lab = MountedLab::new();
    lab.sh(r#"
        mkdir -p "$ATLAS/media/album"
        echo song > "$ATLAS/media/song.flac"
        chmod 0777 "$ATLAS/media" "$ATLAS/media/album"
        chmod 0666 "$ATLAS/media/song.flac"
        chown 1000:1000 "$ATLAS/media/song.flac"
        "#);
    lab
}

const MEDIA_WRITES: [(&str, &str); 10] = [
    ("create", r#"touch "$LAB/media/new""#),
    ("write", r#"echo more >> "$LAB/media/song.flac""#),
    ("truncate", r#"truncate -s 0 "$LAB/media/song.flac""#),
    ("unlink", r#"rm -f "$LAB/media/song.flac""#),
    (
        "rename",
        r#"mv "$LAB/media/song.flac" "$LAB/media/renamed.flac""#,
    ),
    ("chmod", r#"chmod 600 "$LAB/media/song.flac""#),
    ("utimens", r#"touch -d 2001-01-01 "$LAB/media/song.flac""#),
    ("mkdir", r#"mkdir "$LAB/media/newdir""#),
    ("rmdir", r#"rmdir "$LAB/media/album""#),
    ("symlink", r#"ln -s song.flac "$LAB/media/link""#),
];

fn assert_media_untouched(lab: &MountedLab) {
    assert_eq!(names(lab.atlas_path("media")), vec!["album", "song.flac"]);
    assert_eq!(read(&lab.atlas_path("media/song.flac")), "song\n");
    let mode = fs::metadata(lab.atlas_path("media/song.flac"))
        .unwrap()
        .mode()
        & 0o7777;
    assert_eq!(mode, 0o666);
}

#[test]
fn read_only_rule_rejects_writes_from_non_writers_with_erofs() {
    let lab = media_lab();
    assert_eq!(
        lab.sh_as(USER, USER, r#"cat "$LAB/media/song.flac""#),
        "song\n"
    );
    assert_eq!(
        lab.sh_as(USER, USER, r#"ls "$LAB/media""#),
        "album\nsong.flac\n"
    );
    for (op, script) in MEDIA_WRITES {
        let (code, out, err) = lab.sh_as_status(USER, USER, script);
        assert_ne!(
            code, 0,
            "{op} under read-only /media succeeded for a non-writer: {out}"
        );
        assert!(
            err.contains("Read-only file system"),
            "{op} under read-only /media should fail with EROFS, got: {err}"
        );
    }
    assert_media_untouched(&lab);
}

#[test]
fn read_only_rule_applies_to_root_unless_listed() {
    let lab = media_lab();
    for (op, script) in MEDIA_WRITES {
        let (code, _, err) = lab.sh_status(script);
        assert_ne!(code, 0, "{op} under read-only /media succeeded for root");
        assert!(err.contains("Read-only file system"), "{op} as root: {err}");
    }
    assert_media_untouched(&lab);
}

#[test]
fn read_only_rule_lets_listed_writer_group_write() {
    let lab = media_lab();
    let writer = [MEDIA_WRITER_GID];
    for (op, script) in [
        ("create", r#"echo new > "$LAB/media/new""#),
        ("write", r#"echo more >> "$LAB/media/song.flac""#),
        ("mkdir", r#"mkdir "$LAB/media/newdir""#),
        ("symlink", r#"ln -s song.flac "$LAB/media/link""#),
        ("rename", r#"mv "$LAB/media/new" "$LAB/media/renamed""#),
        ("chmod", r#"chmod 640 "$LAB/media/song.flac""#),
        ("rmdir", r#"rmdir "$LAB/media/album""#),
        ("unlink", r#"rm "$LAB/media/renamed""#),
    ] {
        let (code, _, err) = lab.sh_as_groups_status(USER, USER, &writer, script);
        assert_eq!(
            code, 0,
            "{op} by a member of the writers group failed: {err}"
        );
    }
    assert_eq!(read(&lab.atlas_path("media/song.flac")), "song\nmore\n");
    assert_eq!(
        names(lab.atlas_path("media")),
        vec!["link", "newdir", "song.flac"]
    );
    let mode = fs::metadata(lab.atlas_path("media/song.flac"))
        .unwrap()
        .mode()
        & 0o7777;
    assert_eq!(mode, 0o640);
}

const DENY_RULES: &str = r#"
[[rule]]
path = "/cache"
class = "ephemeral"

[[rule]]
path = "/scans/*/work"
class = "transitional"

[[rule]]
path = "/docs"
class = "authoritative"
"#;

#[test]
fn unplaced_deny_refuses_creation_at_unruled_paths() {
    let lab = MountedLab::builder()
        .rules(DENY_RULES)
        .unplaced_deny()
        .mount();
    let (code, _, err) = lab.sh_status(r#"touch "$LAB/unruled""#);
    assert_ne!(code, 0, "touch /unruled must fail under unplaced = deny");
    assert!(
        err.contains("Permission denied"),
        "expected EACCES, got: {err}"
    );
    assert!(!lab.atlas_path("unruled").exists() && !lab.local_path("unruled").exists());
    assert!(
        lab.wait_for_log("unruled", Duration::from_secs(5)),
        "the daemon log should name the refused path /unruled"
    );

    // Ancestors of a rule pattern may be created; anything else beside them may not.
    lab.sh(r#"mkdir -p "$LAB/scans/s1/work" "$LAB/cache" "$LAB/docs""#);
    lab.sh(r#"echo w > "$LAB/scans/s1/work/f"; echo c > "$LAB/cache/f"; echo d > "$LAB/docs/f""#);
    assert!(lab.local_path("scans/s1/work/f").is_file());
    assert!(lab.local_path("cache/f").is_file());
    assert!(lab.atlas_path("docs/f").is_file());
    for script in [
        r#"touch "$LAB/scans/s1/f""#,
        r#"mkdir "$LAB/scans/s1/other""#,
        r#"mkdir "$LAB/other""#,
        r#"ln -s x "$LAB/unruled-link""#,
        r#"mkfifo "$LAB/unruled-fifo""#,
    ] {
        let (code, _, err) = lab.sh_status(script);
        assert_ne!(code, 0, "{script} must fail under unplaced = deny");
        assert!(err.contains("Permission denied"), "{script}: {err}");
    }
}

#[test]
fn explain_names_class_backend_rule_and_line() {
    let lab = MountedLab::new();
    for (path, class, backend, rule) in [
        (
            "/scans/s7/work/out.dat",
            "transitional",
            "local",
            "/scans/*/work",
        ),
        ("/docs/readme.txt", "authoritative", "atlas", "/docs"),
        ("/cache/x/y", "ephemeral", "local", "/cache"),
        ("/state/db", "runtime", "atlas", "/state"),
    ] {
        let (code, out, err) = lab.labfs("explain", &[path]);
        assert_eq!(code, 0, "labfs explain {path}: {err}");
        let line = lab.rule_line(rule);
        for want in [class, backend, rule] {
            assert!(
                out.contains(want),
                "explain {path} should mention {want:?}:\n{out}"
            );
        }
        let numbers: Vec<&str> = out.split(|c: char| !c.is_ascii_digit()).collect();
        assert!(
            numbers.contains(&line.to_string().as_str()),
            "explain {path} should name line {line} of the rules file:\n{out}"
        );
    }
}

/// Asks the mount over the control protocol with exact bytes: `getxattr(argv[1],
/// argv[2])`, both given in hex; prints the value, or `errno N`.
const RAW_CTL_GET: &str = r#"
import os, sys
path, name = (bytes.fromhex(a) for a in sys.argv[1:3])
try:
    sys.stdout.write(os.getxattr(path, name).decode())
except OSError as e:
    sys.stdout.write("errno %d" % e.errno)
"#;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `labfs explain` of paths inside the mount whose names are not UTF-8: an existing
/// file, a path that does not exist yet below a directory that does (asked of the
/// mount with the bytes in the control name), a symlink; the output escapes as
/// `check` does (`\xNN`, a backslash as `\\`), the reply carries the exact bytes, and a
/// control name that is not UTF-8 never reaches a backend.
#[test]
fn explain_through_the_mount_takes_any_bytes_existing_or_not() {
    use std::os::unix::ffi::OsStrExt;
    let lab = MountedLab::new();
    lab.sh(r#"mkdir -p "$LAB/docs" "$LAB/cache/$(printf 'd\377')"
           echo a > "$LAB/docs/$(printf 'caf\351')"
           ln -s nowhere "$LAB/docs/$(printf 'ln\376')""#);
    let explain = |rel: &str| {
        let (code, out, err) = lab.sh_status(&format!(r#""$LABFS" explain "$LAB/{rel}""#));
        assert_eq!(code, 0, "explain {rel}: {out}{err}");
        out
    };
    let out = explain(r"docs/$(printf 'caf\351')");
    assert!(out.contains("path:      /docs/caf\\xe9\n"), "{out}");
    assert!(out.contains("backend:   atlas"), "{out}");
    assert!(out.contains("state:     atlas"), "{out}");
    // Not there yet, two levels below an existing directory, on Atlas and on local.
    let out = explain(r"docs/$(printf 'new\351')/deeper");
    assert!(out.contains("path:      /docs/new\\xe9/deeper\n"), "{out}");
    assert!(out.contains("class:     authoritative"), "{out}");
    assert!(out.contains("state:     does not exist yet"), "{out}");
    let out = explain(r#"cache/$(printf 'd\377')/$(printf 'x\376')\\"#);
    assert!(
        out.contains("path:      /cache/d\\xff/x\\xfe\\\\\n"),
        "{out}"
    );
    assert!(out.contains("backend:   local"), "{out}");
    assert!(out.contains("state:     does not exist yet"), "{out}");
    // A symlink cannot carry user xattrs: its parent explains it by name.
    let out = explain(r"docs/$(printf 'ln\376')");
    assert!(out.contains("path:      /docs/ln\\xfe\n"), "{out}");
    assert!(!out.contains("does not exist"), "{out}");

    // The protocol itself: version 2, the missing part as raw bytes in the control
    // name, the exact bytes in the reply.
    let raw = |path: &std::path::Path, name: &[u8]| {
        Sh::program(
            "python3",
            &[
                "-c",
                RAW_CTL_GET,
                &hex(path.as_os_str().as_bytes()),
                &hex(name),
            ],
        )
        .ok()
    };
    assert_eq!(raw(lab.mnt(), b"user.labfs.ctl.protocol"), "2");
    let reply = raw(&lab.path("docs"), b"user.labfs.ctl.explain:new\xe9/x");
    let v: serde_json::Value = serde_json::from_str(&reply).expect("explain reply is JSON");
    assert_eq!(v["path"], "/docs/new\\xe9/x", "{v}");
    assert_eq!(v["path_hex"], hex(b"/docs/new\xe9/x"), "{v}");
    assert_eq!(v["backend"], "atlas", "{v}");
    let v: serde_json::Value =
        serde_json::from_str(&raw(&lab.path("docs"), b"user.labfs.ctl.explain:plain"))
            .expect("JSON");
    assert!(v.get("path_hex").is_none(), "UTF-8: no path_hex: {v}");
    // A control name that is not UTF-8 and names no request: "no such attribute", even
    // where the backend holds an xattr of that very name.
    let stored = b"user.labfs.ctl.x\xff";
    Sh::program(
        "python3",
        &[
            "-c",
            "import os,sys; os.setxattr(bytes.fromhex(sys.argv[1]), bytes.fromhex(sys.argv[2]), b'backend')",
            &hex(lab.atlas_path("docs").as_os_str().as_encoded_bytes()),
            &hex(stored),
        ],
    )
    .ok();
    assert_eq!(
        raw(&lab.path("docs"), stored),
        format!("errno {}", libc::ENODATA)
    );
    // Nor does setting one reach the backend: EINVAL, nothing stored.
    let set = Sh::program(
        "python3",
        &[
            "-c",
            "import os,sys\ntry:\n os.setxattr(bytes.fromhex(sys.argv[1]), bytes.fromhex(sys.argv[2]), b'v'); print('set')\nexcept OSError as e: print(e.errno)",
            &hex(lab.path("docs").as_os_str().as_encoded_bytes()),
            &hex(b"user.labfs.ctl.y\xff"),
        ],
    )
    .ok();
    assert_eq!(set.trim(), libc::EINVAL.to_string());
    assert!(
        xattr::get(
            lab.atlas_path("docs"),
            std::ffi::OsStr::from_bytes(b"user.labfs.ctl.y\xff")
        )
        .expect("getxattr on Atlas")
        .is_none(),
        "a control name was stored on Atlas"
    );

    // status of a path whose name is not UTF-8 answers too.
    let (code, out, err) =
        lab.sh_status(r#""$LABFS" status --json "$LAB/cache/$(printf 'd\377')""#);
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("status JSON");
    assert!(v["inodes"].as_u64().is_some(), "{v}");
}

/// `labfs promote` of a directory whose own name is not UTF-8 (the request names it
/// `{"hex": ...}`) below a parent whose name is not UTF-8 either; `explain` then says
/// promoted.
#[test]
fn promote_and_explain_a_directory_whose_own_name_is_not_utf8() {
    let lab = MountedLab::new();
    lab.sh(r#"d="$LAB/scans/$(printf 's\351')/work/$(printf 'out\377')"
           mkdir -p "$d/$(printf 'sub\376')"
           echo x > "$d/$(printf 'f\351')"; echo y > "$d/$(printf 'sub\376')/g""#);
    let (code, out, err) = lab.sh_status(
        r#""$LABFS" promote --json "$LAB/scans/$(printf 's\351')/work/$(printf 'out\377')""#,
    );
    assert_eq!(code, 0, "{out}{err}\n{}", lab.daemon_log());
    let p: serde_json::Value = serde_json::from_str(out.trim()).expect("--json result");
    assert_eq!(p["state"], "done", "{p}");
    assert_eq!(p["path"], "/scans/s\\xe9/work/out\\xff", "{p}");
    assert_eq!(p["path_hex"], hex(b"/scans/s\xe9/work/out\xff"), "{p}");
    let on_atlas = |rel: &[u8]| {
        use std::os::unix::ffi::OsStrExt;
        let mut b = b"scans/s\xe9/work/out\xff/".to_vec();
        b.extend_from_slice(rel);
        fs::read(lab.atlas_path("").join(std::ffi::OsStr::from_bytes(&b)))
            .unwrap_or_else(|e| panic!("{}: {e}", String::from_utf8_lossy(rel)))
    };
    assert_eq!(on_atlas(b"f\xe9"), b"x\n");
    assert_eq!(on_atlas(b"sub\xfe/g"), b"y\n");
    let (code, out, err) = lab.sh_status(
        r#""$LABFS" explain "$LAB/scans/$(printf 's\351')/work/$(printf 'out\377')/$(printf 'f\351')""#,
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("path:      /scans/s\\xe9/work/out\\xff/f\\xe9\n"),
        "{out}"
    );
    assert!(out.contains("state:     promoted"), "{out}");
}

#[test]
fn killed_daemon_can_be_remounted_and_serves_the_same_data() {
    let mut lab = MountedLab::new();
    lab.sh(r#"mkdir -p "$LAB/docs" "$LAB/cache"; echo a > "$LAB/docs/a"; echo c > "$LAB/cache/c""#);
    lab.kill9();
    assert!(!lab.is_mounted());
    assert!(lab.atlas_path("docs/a").is_file() && lab.local_path("cache/c").is_file());
    lab.remount();
    assert_eq!(read(&lab.path("docs/a")), "a\n");
    assert_eq!(read(&lab.path("cache/c")), "c\n");
    lab.sh(r#"echo more >> "$LAB/cache/c""#);
    assert_eq!(read(&lab.local_path("cache/c")), "c\nmore\n");
}

#[test]
fn umount_makes_the_daemon_exit_zero() {
    let mut lab = MountedLab::new();
    lab.sh(r#"mkdir -p "$LAB/docs"; echo a > "$LAB/docs/a""#);
    lab.unmount();
    assert!(!lab.is_mounted());
    assert!(
        names(lab.mnt()).is_empty(),
        "mountpoint should be empty after umount"
    );
    assert!(lab.atlas_path("docs/a").is_file());
}

#[test]
fn mount_refuses_an_unmarked_atlas_unless_allowed() {
    let failure = match MountedLab::builder().skip_init_atlas().try_mount() {
        Ok(_) => panic!("labfs mounted an Atlas without the init-atlas marker"),
        Err(f) => f,
    };
    assert!(
        matches!(failure.code, Some(c) if c != 0),
        "expected a non-zero exit: {failure:?}"
    );
    let log = failure.log.to_lowercase();
    assert!(
        log.contains("init-atlas") || log.contains("atlas-id") || log.contains("marker"),
        "the refusal should say why (init-atlas / marker):\n{}",
        failure.log
    );
    let lab = MountedLab::builder()
        .skip_init_atlas()
        .allow_unmarked()
        .mount();
    lab.sh(r#"mkdir "$LAB/docs"; echo x > "$LAB/docs/x""#);
    assert!(lab.atlas_path("docs/x").is_file());
}

#[test]
fn renaming_a_directory_that_spans_both_backends_moves_all_of_it() {
    let lab = MountedLab::new();
    lab.sh(r#"
        mkdir -p "$LAB/scans/s1/work"
        echo raw > "$LAB/scans/s1/raw.dat"
        echo out > "$LAB/scans/s1/work/out.dat"
        mv "$LAB/scans/s1" "$LAB/scans/s2"
        "#);
    assert!(
        !lab.path("scans/s1").exists(),
        "/scans/s1 still there after mv"
    );
    assert_eq!(read(&lab.path("scans/s2/raw.dat")), "raw\n");
    assert_eq!(read(&lab.path("scans/s2/work/out.dat")), "out\n");
    assert_eq!(read(&lab.atlas_path("scans/s2/raw.dat")), "raw\n");
    assert_eq!(read(&lab.local_path("scans/s2/work/out.dat")), "out\n");
    assert!(!lab.atlas_path("scans/s1").exists() && !lab.local_path("scans/s1").exists());
    let (code, out, err) = lab.labfs("check", &[]);
    assert_eq!(code, 0, "nothing may be left misplaced:\n{out}{err}");
}

#[test]
fn moving_a_directory_under_another_rule_keeps_all_its_data_visible() {
    let lab = MountedLab::new();
    // /docs/proj/work is authoritative; moved to /scans/p1 its `work` becomes transitional.
    lab.sh(r#"
        mkdir -p "$LAB/docs/proj/work" "$LAB/scans/s1/work"
        echo notes > "$LAB/docs/proj/notes.txt"
        echo result > "$LAB/docs/proj/work/result.txt"
        echo out > "$LAB/scans/s1/work/out.dat"
        mv "$LAB/docs/proj" "$LAB/scans/p1"
        mv "$LAB/scans/s1" "$LAB/docs/s1"
        "#);
    assert_eq!(read(&lab.path("scans/p1/notes.txt")), "notes\n");
    assert_eq!(read(&lab.path("scans/p1/work/result.txt")), "result\n");
    assert_eq!(read(&lab.path("docs/s1/work/out.dat")), "out\n");
    assert_eq!(
        read(&lab.local_path("scans/p1/work/result.txt")),
        "result\n"
    );
    assert_eq!(read(&lab.atlas_path("docs/s1/work/out.dat")), "out\n");
    let (code, out, err) = lab.labfs("check", &[]);
    assert_eq!(
        code, 0,
        "moved data must not end up misplaced (hidden):\n{out}{err}"
    );
}

#[test]
fn rm_rf_of_a_mixed_directory_removes_it_from_both_backends() {
    let lab = MountedLab::new();
    lab.sh(r#"
        mkdir -p "$LAB/scans/s1/work/deep"
        echo raw > "$LAB/scans/s1/raw.dat"
        echo out > "$LAB/scans/s1/work/deep/out.dat"
        rm -rf "$LAB/scans/s1"
        "#);
    assert!(!lab.path("scans/s1").exists());
    assert!(
        !lab.atlas_path("scans/s1").exists(),
        "atlas part left behind"
    );
    assert!(
        !lab.local_path("scans/s1").exists(),
        "local part left behind"
    );
    assert!(names(lab.path("scans")).is_empty());
    // An empty mixed directory goes with plain rmdir too.
    lab.sh(r#"mkdir -p "$LAB/scans/s2/work"; rmdir "$LAB/scans/s2/work" "$LAB/scans/s2""#);
    assert!(!lab.atlas_path("scans/s2").exists() && !lab.local_path("scans/s2").exists());
}

#[test]
fn large_directories_list_every_entry_exactly_once() {
    let lab = MountedLab::new();
    lab.sh(
        r#"
        mkdir -p "$LAB/docs/big" "$LAB/cache/big" "$LAB/scans"
        cd "$LAB/docs/big"; i=0; while [ $i -lt 3000 ]; do : > "file-with-a-longish-name-$i"; i=$((i+1)); done
        cd "$LAB/cache/big"; i=0; while [ $i -lt 3000 ]; do : > "f$i"; i=$((i+1)); done
        cd "$LAB/scans"; i=0; while [ $i -lt 500 ]; do mkdir -p "s$i/work"; i=$((i+1)); done
        "#,
    );
    for (dir, n) in [("docs/big", 3000), ("cache/big", 3000), ("scans", 500)] {
        let out = lab.sh(&format!(
            r#"ls -f -A "$LAB/{dir}" | sort | uniq -d | wc -l; ls -A "$LAB/{dir}" | wc -l"#
        ));
        assert_eq!(out, format!("0\n{n}\n"), "/{dir}: duplicates / count");
    }
    // A root with many entries on both backends.
    let out = lab.sh(r#"ls -f -A "$LAB" | sort | uniq -d"#);
    assert_eq!(out, "");
}

#[test]
fn changes_made_on_atlas_by_another_node_become_visible() {
    let lab = MountedLab::new();
    lab.sh(r#"mkdir -p "$LAB/docs"; echo v1 > "$LAB/docs/shared"; cat "$LAB/docs/shared" >/dev/null; ls "$LAB/docs" >/dev/null"#);
    // Another node writes through NFS: here, straight into the atlas directory.
    fs::write(lab.atlas_path("docs/shared"), "version two\n").unwrap();
    fs::write(lab.atlas_path("docs/new-from-elsewhere"), "hi\n").unwrap();
    wait_until(
        "the new content is visible",
        Duration::from_secs(10),
        || lab.sh(r#"cat "$LAB/docs/shared""#) == "version two\n",
    );
    wait_until("the new file is listed", Duration::from_secs(10), || {
        lab.sh(r#"ls "$LAB/docs""#) == "new-from-elsewhere\nshared\n"
    });
    fs::remove_file(lab.atlas_path("docs/shared")).unwrap();
    wait_until(
        "the deleted file disappears",
        Duration::from_secs(10),
        || {
            lab.sh_status(r#"cat "$LAB/docs/shared""#).0 != 0
                && lab.sh(r#"ls "$LAB/docs""#) == "new-from-elsewhere\n"
        },
    );
}

#[test]
fn xattr_less_atlas_still_serves_files_and_refuses_xattrs_cleanly() {
    let lab = MountedLab::builder().xattr_less_atlas().mount();
    lab.sh(r#"
        mkdir -p "$LAB/docs/d" "$LAB/cache"
        echo a > "$LAB/docs/d/a"
        chmod 600 "$LAB/docs/d/a"
        mv "$LAB/docs/d/a" "$LAB/docs/d/b"
        ln -s b "$LAB/docs/d/l"
        mv "$LAB/docs/d" "$LAB/cache/d"
        mv "$LAB/cache/d" "$LAB/docs/d2"
        "#);
    assert_eq!(read(&lab.atlas_path("docs/d2/b")), "a\n");
    assert_eq!(read(&lab.path("docs/d2/l")), "a\n");
    assert_eq!(mode(&lab.path("docs/d2/b")) & 0o777, 0o600);
    let (code, _, err) = lab.sh_status(r#"setfattr -n user.foo -v bar "$LAB/docs/d2/b""#);
    assert_ne!(
        code, 0,
        "user xattr on an xattr-less Atlas cannot be stored"
    );
    assert!(
        err.contains("Operation not supported"),
        "expected EOPNOTSUPP: {err}"
    );
    // The local backend (tmpfs) still has them.
    lab.sh(r#"echo c > "$LAB/cache/c""#);
    if backend_takes_user_xattrs(&lab, &lab.local_path("cache/c")) {
        lab.sh(r#"setfattr -n user.foo -v bar "$LAB/cache/c""#);
    }
}

#[test]
fn mount_without_foreground_returns_once_the_mount_is_ready() {
    let mut lab = MountedLab::new();
    lab.unmount();
    // Output to a file, so only the exit of `labfs mount` itself is waited for.
    let out = lab
        .cmd(r#""$LABFS" mount --config "$CFG" "$LAB" >"$SCRATCH/bg.log" 2>&1 || echo "exit $?""#)
        .timeout(Duration::from_secs(30))
        .ok();
    let log = read(&lab.scratch_path("bg.log"));
    assert_eq!(out, "", "labfs mount failed:\n{log}");
    // Ready on return: no polling here.
    assert_eq!(
        mount_fstype(lab.mnt()).as_deref(),
        Some("fuse.labfs"),
        "{log}"
    );
    lab.sh(r#"mkdir -p "$LAB/docs"; echo bg > "$LAB/docs/bg""#);
    assert_eq!(read(&lab.atlas_path("docs/bg")), "bg\n");
    run("umount", &[&lab.mnt().to_string_lossy()]);
    assert!(!lab.is_mounted());
}

#[test]
fn daemonized_mount_does_not_hold_the_callers_output_open() {
    // `out=$(labfs mount ...)`, `ssh node labfs mount ...` and anything else reading the
    // command's output to EOF hang if the detached daemon keeps stdout/stderr.
    let mut lab = MountedLab::new();
    lab.unmount();
    let out = lab
        .cmd(r#"out=$("$LABFS" mount --config "$CFG" "$LAB" 2>&1) && echo ok || echo "failed: $out""#)
        .timeout(Duration::from_secs(15))
        .ok();
    assert_eq!(out, "ok\n");
    assert!(lab.is_mounted());
}
