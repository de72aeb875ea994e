//! Everyday tools round-tripping data through the mount, on an Atlas path and on a
//! local path: `cp -a`, `tar`, `git`, `rsync -a`, `sqlite3` (WAL), sparse files
//! through `truncate`, `dd`, `cp --sparse=always`, `du` and SEEK_DATA/SEEK_HOLE, and
//! `fallocate`.

use std::fs;
use std::os::unix::fs::MetadataExt;

use crate::common::*;

/// Builds a tree at `$SCRATCH/<name>` (outside the mount) with files of several modes,
/// owners and sizes, a symlink, an empty dir and fixed whole-second mtimes.
fn make_tree(lab: &MountedLab, name: &str, hard_link: bool) -> String {
    let src = lab.scratch_path(name).to_string_lossy().into_owned();
    lab.sh(&format!(
        r#"
        S="{src}"
        mkdir -p "$S/sub/deeper" "$S/empty"
        printf 'hello\n' > "$S/a.txt"
        head -c 300000 /dev/urandom > "$S/sub/blob.bin"
        printf '#!/bin/sh\necho hi\n' > "$S/sub/run.sh"; chmod 755 "$S/sub/run.sh"
        printf 'secret\n' > "$S/sub/deeper/private"; chmod 600 "$S/sub/deeper/private"
        : > "$S/sub/empty-file"
        ln -s ../a.txt "$S/sub/link"
        chown 1000:1000 "$S/sub/blob.bin"
        chgrp 1234 "$S/sub/deeper"
        chmod 2750 "$S/sub/deeper"
        if {hard_link}; then ln "$S/a.txt" "$S/sub/hard"; fi
        find "$S" -depth -exec touch -h -d '2020-01-02 03:04:05' {{}} +
        touch -h -d '2019-05-06 07:08:09' "$S/sub/link" "$S/sub/run.sh"
        "#
    ));
    src
}

/// Names, types, modes, owners, whole mtimes, link targets (+ sizes and link counts
/// of non-directories) of everything under `dir`, sorted.
fn tree_meta(lab: &MountedLab, dir: &str) -> String {
    lab.sh(&format!(
        r#"cd "{dir}" && find . \( -type d -printf '%p d %m %U:%G %T@\n' \) -o -printf '%p %y %m %U:%G %T@ %s %n %l\n' | sort"#
    ))
}

fn assert_same_tree(lab: &MountedLab, expected: &str, actual: &str) {
    lab.sh(&format!(r#"diff -r "{expected}" "{actual}""#));
    let (e, a) = (tree_meta(lab, expected), tree_meta(lab, actual));
    assert_eq!(e, a, "metadata of {actual} differs from {expected}");
}

fn cp_a_round_trip(b: Backend) {
    let lab = MountedLab::new();
    let d = b.dir();
    lab.sh(&format!(r#"mkdir "$LAB/{d}""#));
    let src = make_tree(&lab, "src", true);
    let inside = lab
        .path(&format!("{d}/tree"))
        .to_string_lossy()
        .into_owned();
    let out = lab.scratch_path("out").to_string_lossy().into_owned();
    lab.sh(&format!(r#"cp -a "{src}" "{inside}""#));
    assert_same_tree(&lab, &src, &inside);
    assert!(lab
        .backend_path(b, &format!("{d}/tree/sub/blob.bin"))
        .is_file());
    assert!(!lab.backend_path(b.other(), &format!("{d}/tree")).exists());
    lab.sh(&format!(r#"cp -a "{inside}" "{out}""#));
    assert_same_tree(&lab, &src, &out);
}

#[test]
fn cp_a_round_trip_on_atlas() {
    cp_a_round_trip(Backend::Atlas);
}

#[test]
fn cp_a_round_trip_on_local() {
    cp_a_round_trip(Backend::Local);
}

fn tar_round_trip(b: Backend) {
    let lab = MountedLab::new();
    let d = b.dir();
    lab.sh(&format!(r#"mkdir "$LAB/{d}""#));
    let src = make_tree(&lab, "src", true);
    let out = lab.scratch_path("out").to_string_lossy().into_owned();
    let back = lab.scratch_path("back").to_string_lossy().into_owned();
    // An archive written into the mount and extracted elsewhere.
    lab.sh(&format!(
        r#"
        tar -C "{src}" -cf "$LAB/{d}/tree.tar" .
        mkdir "{out}"
        tar -C "{out}" -xpf "$LAB/{d}/tree.tar"
        "#
    ));
    assert!(lab.backend_path(b, &format!("{d}/tree.tar")).is_file());
    assert_same_tree(&lab, &src, &out);
    // Extracted into the mount, then archived from it (tar exits 1 if a file
    // "changed as we read it", i.e. inconsistent sizes/ctimes).
    let inside = lab.path(&format!("{d}/x")).to_string_lossy().into_owned();
    lab.sh(&format!(
        r#"
        mkdir "{inside}"
        tar -C "{inside}" -xpf "$LAB/{d}/tree.tar"
        "#
    ));
    assert_same_tree(&lab, &src, &inside);
    lab.sh(&format!(
        r#"
        tar -C "{inside}" -cf "$SCRATCH/back.tar" .
        mkdir "{back}"
        tar -C "{back}" -xpf "$SCRATCH/back.tar"
        "#
    ));
    assert_same_tree(&lab, &src, &back);
}

#[test]
fn tar_round_trip_on_atlas() {
    tar_round_trip(Backend::Atlas);
}

#[test]
fn tar_round_trip_on_local() {
    tar_round_trip(Backend::Local);
}

fn git_workflow(b: Backend) {
    let lab = MountedLab::new();
    let d = b.dir();
    let git = "git -c user.name=Test -c user.email=test@example.com";
    let out = lab.sh(&format!(
        r#"
        export GIT_CONFIG_NOSYSTEM=1
        mkdir -p "$LAB/{d}/repo"; cd "$LAB/{d}/repo"
        git init -q -b main .
        echo hello > README
        mkdir src; echo 'fn main() {{}}' > src/main.rs; printf '#!/bin/sh\n' > build.sh; chmod +x build.sh
        git add -A
        {git} commit -q -m 'first commit'
        echo "status1=[$(git status --porcelain)]"
        echo change >> README
        echo "status2=[$(git status --porcelain)]"
        {git} commit -q -am 'second commit'
        git mv src lib
        {git} commit -q -m 'rename'
        git gc -q
        git fsck --no-progress
        echo "status3=[$(git status --porcelain)]"
        git log --format=%s
        git clone -q . "$SCRATCH/clone"
        cmp README "$SCRATCH/clone/README"
        test -x "$SCRATCH/clone/build.sh"
        "#
    ));
    assert!(
        out.contains("status1=[]\n"),
        "git status after commit not clean:\n{out}"
    );
    assert!(out.contains("status2=[ M README]\n"), "{out}");
    assert!(
        out.contains("status3=[]\n"),
        "git status after gc not clean:\n{out}"
    );
    assert!(
        out.ends_with("rename\nsecond commit\nfirst commit\n"),
        "git log:\n{out}"
    );
    assert!(lab
        .backend_path(b, &format!("{d}/repo/.git/HEAD"))
        .is_file());
}

#[test]
fn git_init_commit_status_log_on_atlas() {
    git_workflow(Backend::Atlas);
}

#[test]
fn git_init_commit_status_log_on_local() {
    git_workflow(Backend::Local);
}

fn rsync_round_trip(b: Backend) {
    let lab = MountedLab::new();
    let d = b.dir();
    lab.sh(&format!(r#"mkdir "$LAB/{d}""#));
    let src = make_tree(&lab, "src", false);
    let inside = lab.path(&format!("{d}/r")).to_string_lossy().into_owned();
    let out = lab.scratch_path("out").to_string_lossy().into_owned();
    lab.sh(&format!(r#"rsync -a "{src}/" "{inside}/""#));
    assert_same_tree(&lab, &src, &inside);
    assert!(lab
        .backend_path(b, &format!("{d}/r/sub/blob.bin"))
        .is_file());
    // A second run finds nothing to do: sizes, mtimes, modes and owners all match.
    let again = lab.sh(&format!(r#"rsync -a -i "{src}/" "{inside}/""#));
    assert_eq!(again, "", "rsync -a found differences on the second run");
    lab.sh(&format!(r#"rsync -a "{inside}/" "{out}/""#));
    assert_same_tree(&lab, &src, &out);
    // An update in place (rsync writes a temp file and renames it over the old one).
    lab.sh(&format!(
        r#"echo changed > "{src}/a.txt"; rsync -a "{src}/" "{inside}/"; cmp "{src}/a.txt" "{inside}/a.txt""#
    ));
}

#[test]
fn rsync_a_round_trip_on_atlas() {
    rsync_round_trip(Backend::Atlas);
}

#[test]
fn rsync_a_round_trip_on_local() {
    rsync_round_trip(Backend::Local);
}

fn sqlite_wal(b: Backend) {
    let lab = MountedLab::new();
    let d = b.dir();
    let out = lab.sh(&format!(
        r#"
        mkdir "$LAB/{d}"
        sqlite3 "$LAB/{d}/db.sqlite" <<'SQL'
PRAGMA journal_mode=WAL;
CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT NOT NULL);
BEGIN;
WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1000)
INSERT INTO t(v) SELECT 'row ' || x FROM c;
COMMIT;
SELECT count(*) FROM t;
PRAGMA integrity_check;
SQL
        "#
    ));
    assert_eq!(out, "wal\n1000\nok\n");
    // A fresh process sees the committed data; a reader and a writer share the WAL.
    let out = lab.sh(&format!(
        r#"
        sqlite3 "$LAB/{d}/db.sqlite" "PRAGMA journal_mode; SELECT count(*), sum(length(v)) FROM t;"
        sqlite3 "$LAB/{d}/db.sqlite" "INSERT INTO t(v) VALUES ('one more'); SELECT count(*) FROM t; PRAGMA integrity_check;"
        "#
    ));
    assert_eq!(out, "wal\n1000|6893\n1001\nok\n");
    assert!(lab.backend_path(b, &format!("{d}/db.sqlite")).is_file());
    assert!(!lab
        .backend_path(b.other(), &format!("{d}/db.sqlite"))
        .exists());
}

#[test]
fn sqlite_wal_transaction_on_atlas() {
    sqlite_wal(Backend::Atlas);
}

#[test]
fn sqlite_wal_transaction_on_local() {
    sqlite_wal(Backend::Local);
}

#[test]
fn sparse_files_stay_sparse_and_report_holes() {
    let lab = MountedLab::with_dirs();
    for b in BOTH {
        let d = b.dir();
        let out = lab.sh(&format!(
            r#"
            cd "$LAB/{d}"
            truncate -s 1G sparse
            dd if=/dev/urandom of=sparse bs=4096 count=1 seek=1000 conv=notrunc status=none
            cp --sparse=always sparse copy
            cmp sparse copy
            stat -c %s sparse copy
            du -k sparse copy | cut -f1
            python3 -c '
import os, sys
fd = os.open("sparse", os.O_RDONLY)
print(os.lseek(fd, 0, os.SEEK_DATA), os.lseek(fd, 0, os.SEEK_HOLE), os.lseek(fd, 4096000, os.SEEK_HOLE))
'
            "#
        ));
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(&lines[..2], ["1073741824", "1073741824"], "{out}");
        for (name, kb) in ["sparse", "copy"].iter().zip(&lines[2..4]) {
            let kb: u64 = kb.parse().unwrap();
            assert!(
                kb <= 1024,
                "{} {name} uses {kb} KiB; should stay sparse",
                b.name()
            );
        }
        assert_eq!(
            lines[4],
            "4096000 0 4100096",
            "SEEK_DATA/SEEK_HOLE on {}",
            b.name()
        );
        let backend_blocks = fs::metadata(lab.backend_path(b, &format!("{d}/copy")))
            .unwrap()
            .blocks();
        assert!(
            backend_blocks <= 2048,
            "backend copy is not sparse: {backend_blocks} blocks"
        );
    }
}

#[test]
fn fallocate_reserves_space() {
    let lab = MountedLab::with_dirs();
    for b in BOTH {
        let d = b.dir();
        let out = lab.sh(&format!(
            r#"fallocate -l 10M "$LAB/{d}/fa"; stat -c %s "$LAB/{d}/fa"; du -k "$LAB/{d}/fa" | cut -f1"#
        ));
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "10485760");
        assert!(
            lines[1].parse::<u64>().unwrap() >= 10240,
            "du after fallocate: {out}"
        );
        let m = fs::metadata(lab.backend_path(b, &format!("{d}/fa"))).unwrap();
        assert_eq!(m.len(), 10485760);
        assert!(
            m.blocks() * 512 >= 10485760,
            "backend blocks: {}",
            m.blocks()
        );
    }
}
