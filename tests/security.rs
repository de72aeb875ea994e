//! Security as a user sees it: labfs never operates on anything outside its backend
//! roots (even when backend entries are swapped for symlinks behind its back),
//! permissions are enforced for non-root callers, and what a user creates is theirs.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use crate::common::*;

const SECRET: &str = "TOP-SECRET-OUTSIDE-THE-BACKEND";

/// `$SCRATCH/<name>`, a directory outside both backends holding `secret` (0600) at
/// `<name>/<inner>/secret`.
fn outside_tree(lab: &MountedLab, name: &str, inner: &str) -> std::path::PathBuf {
    let root = lab.scratch_path(name);
    let dir = root.join(inner);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("secret"), SECRET).unwrap();
    fs::set_permissions(dir.join("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    root
}

fn assert_outside_untouched(root: &Path, inner: &str) {
    let dir = root.join(inner);
    assert_eq!(
        names(&dir),
        vec!["secret"],
        "labfs changed {}",
        dir.display()
    );
    let secret = dir.join("secret");
    assert_eq!(
        fs::read_to_string(&secret).unwrap(),
        SECRET,
        "labfs changed {}",
        secret.display()
    );
    assert_eq!(fs::metadata(&secret).unwrap().mode() & 0o7777, 0o600);
}

#[test]
fn backend_symlink_to_etc_is_shown_as_a_symlink() {
    let lab = MountedLab::new();
    for b in BOTH {
        let d = b.dir();
        lab.sh(&format!(r#"mkdir "$LAB/{d}""#));
        std::os::unix::fs::symlink("/etc", lab.backend_path(b, &format!("{d}/etc-link"))).unwrap();
        let out = lab.sh(&format!(
            r#"ls "$LAB/{d}"; readlink "$LAB/{d}/etc-link"; stat -c %F "$LAB/{d}/etc-link""#
        ));
        assert_eq!(out, "etc-link\n/etc\nsymbolic link\n");
    }
}

/// Holds a directory fd (and an O_PATH fd) on `mnt_dir`, replaces `backend_swap` with
/// a symlink to `outside`, then tries every kind of access relative to the held inode.
const SWAP_PROBE: &str = r#"
import errno, json, os, shutil, sys
mnt_dir, backend_swap, outside = sys.argv[1:4]
dfd = os.open(mnt_dir, os.O_RDONLY | os.O_DIRECTORY)
pfd = os.open(mnt_dir, os.O_PATH)
os.listdir(dfd)
shutil.rmtree(backend_swap)
os.symlink(outside, backend_swap)
results = {}
def attempt(name, f):
    try:
        results[name] = repr(f())
    except OSError as e:
        results[name] = "errno:" + errno.errorcode.get(e.errno, str(e.errno))
def read_secret():
    fd = os.open("secret", os.O_RDONLY, dir_fd=dfd)
    return os.read(fd, 200)
def reopen_list():
    fd = os.open(f"/proc/self/fd/{pfd}", os.O_RDONLY | os.O_DIRECTORY)
    return sorted(os.listdir(fd))
attempt("read", read_secret)
attempt("stat", lambda: os.stat("secret", dir_fd=dfd, follow_symlinks=False).st_size)
attempt("list", lambda: sorted(os.listdir(dfd)))
attempt("reopen_list", reopen_list)
attempt("create", lambda: os.close(os.open("planted", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=dfd)))
attempt("mkdir", lambda: os.mkdir("planted-dir", dir_fd=dfd))
attempt("symlink", lambda: os.symlink("x", "planted-link", dir_fd=dfd))
attempt("chmod", lambda: os.chmod("secret", 0o666, dir_fd=dfd))
attempt("truncate", lambda: os.close(os.open("secret", os.O_WRONLY | os.O_TRUNC, dir_fd=dfd)))
attempt("rename", lambda: os.rename("secret", "renamed", src_dir_fd=dfd, dst_dir_fd=dfd))
attempt("unlink", lambda: os.unlink("secret", dir_fd=dfd))
print(json.dumps(results))
"#;

fn swap_probe(mnt_dir: &Path, backend_swap: &Path, outside: &Path) -> String {
    let out = run(
        "python3",
        &[
            "-c",
            SWAP_PROBE,
            &mnt_dir.to_string_lossy(),
            &backend_swap.to_string_lossy(),
            &outside.to_string_lossy(),
        ],
    );
    assert!(
        !out.contains(SECRET),
        "labfs served a file outside its backend: {out}"
    );
    assert!(
        !out.contains("'secret'"),
        "labfs listed a directory outside its backend: {out}"
    );
    out
}

#[test]
fn held_directory_swapped_for_a_symlink_does_not_reach_outside() {
    let lab = MountedLab::new();
    for b in BOTH {
        let d = b.dir();
        lab.sh(&format!(
            r#"mkdir -p "$LAB/{d}/victim"; echo inside > "$LAB/{d}/victim/inside.txt""#
        ));
        let outside = outside_tree(&lab, &format!("outside-{d}"), "");
        let out = swap_probe(
            &lab.path(&format!("{d}/victim")),
            &lab.backend_path(b, &format!("{d}/victim")),
            &outside,
        );
        eprintln!("{} direct swap: {out}", b.name());
        assert_outside_untouched(&outside, "");
    }
}

#[test]
fn held_directory_whose_ancestor_is_swapped_for_a_symlink_does_not_reach_outside() {
    let lab = MountedLab::new();
    for b in BOTH {
        let d = b.dir();
        lab.sh(&format!(
            r#"mkdir -p "$LAB/{d}/a/b/c"; echo inside > "$LAB/{d}/a/b/c/inside.txt""#
        ));
        let outside = outside_tree(&lab, &format!("outside-anc-{d}"), "b/c");
        let out = swap_probe(
            &lab.path(&format!("{d}/a/b/c")),
            &lab.backend_path(b, &format!("{d}/a")),
            &outside,
        );
        eprintln!("{} ancestor swap: {out}", b.name());
        assert_outside_untouched(&outside, "b/c");
    }
}

#[test]
fn cached_directory_swapped_for_symlink_to_etc_does_not_list_or_read_etc() {
    // The brief's scenario, by path: the kernel holds /cache/d as a directory (local
    // entries are cached long), so it asks labfs to resolve `passwd` inside it.
    let lab = MountedLab::new();
    lab.sh(r#"mkdir -p "$LAB/cache/d"; echo mine > "$LAB/cache/d/mine.txt"; ls "$LAB/cache/d" >/dev/null"#);
    lab.sh(r#"rm -r "$LOCAL/cache/d"; ln -s /etc "$LOCAL/cache/d""#);
    let passwd = fs::read_to_string("/etc/passwd").unwrap();
    let (code, out, err) = lab.sh_status(r#"cat "$LAB/cache/d/passwd""#);
    assert!(
        code != 0 && !out.contains("root:") && out != passwd,
        "cat /lab/cache/d/passwd must fail, got exit {code}: {out}{err}"
    );
    let (_, out, _) = lab.sh_status(r#"ls "$LAB/cache/d/""#);
    assert!(
        !out.contains("passwd"),
        "ls /lab/cache/d/ listed /etc:\n{out}"
    );
    let (code, out, _) = lab.sh_status(r#"ls -d "$LAB/cache/d/passwd" "$LAB/cache/d/hostname""#);
    assert_ne!(code, 0, "/etc entries visible under /lab/cache/d:\n{out}");
}

const FILE_SWAP_PROBE: &str = r#"
import errno, json, os, sys
mnt_file, backend_file, outside_secret = sys.argv[1:4]
pfd = os.open(mnt_file, os.O_PATH)
os.stat(mnt_file)
os.unlink(backend_file)
os.symlink(outside_secret, backend_file)
results = {}
def attempt(name, f):
    try:
        results[name] = repr(f())
    except OSError as e:
        results[name] = "errno:" + errno.errorcode.get(e.errno, str(e.errno))
def read():
    fd = os.open(f"/proc/self/fd/{pfd}", os.O_RDONLY)
    return os.read(fd, 200)
attempt("read", read)
attempt("chmod", lambda: os.chmod(f"/proc/self/fd/{pfd}", 0o666))
attempt("truncate", lambda: os.close(os.open(f"/proc/self/fd/{pfd}", os.O_WRONLY | os.O_TRUNC)))
print(json.dumps(results))
"#;

#[test]
fn held_file_swapped_for_a_symlink_does_not_reach_outside() {
    let lab = MountedLab::new();
    for b in BOTH {
        let d = b.dir();
        lab.sh(&format!(
            r#"mkdir -p "$LAB/{d}"; echo inside > "$LAB/{d}/f""#
        ));
        let outside = outside_tree(&lab, &format!("outside-file-{d}"), "");
        let out = run(
            "python3",
            &[
                "-c",
                FILE_SWAP_PROBE,
                &lab.path(&format!("{d}/f")).to_string_lossy(),
                &lab.backend_path(b, &format!("{d}/f")).to_string_lossy(),
                &outside.join("secret").to_string_lossy(),
            ],
        );
        eprintln!("{} file swap: {out}", b.name());
        assert!(
            !out.contains(SECRET),
            "labfs read a file outside its backend: {out}"
        );
        assert_outside_untouched(&outside, "");
    }
}

#[test]
fn user_cannot_read_a_root_only_file() {
    let lab = MountedLab::new();
    for b in BOTH {
        let d = b.dir();
        lab.sh(&format!(
            r#"mkdir -p "$LAB/{d}"; echo secret > "$LAB/{d}/secret"; chmod 600 "$LAB/{d}/secret"; echo pub > "$LAB/{d}/pub""#
        ));
        let (code, out, err) = lab.sh_as_status(USER, USER, &format!(r#"cat "$LAB/{d}/secret""#));
        assert!(code != 0 && err.contains("Permission denied"), "{out}{err}");
        let (code, _, err) = lab.sh_as_status(USER, USER, &format!(r#"echo x >> "$LAB/{d}/pub""#));
        assert!(
            code != 0 && err.contains("Permission denied"),
            "append to root 0644: {err}"
        );
        assert_eq!(
            lab.sh_as(USER, USER, &format!(r#"cat "$LAB/{d}/pub""#)),
            "pub\n"
        );
        assert_eq!(
            fs::read_to_string(lab.backend_path(b, &format!("{d}/pub"))).unwrap(),
            "pub\n"
        );
    }
}

#[test]
fn user_cannot_chown_or_chgrp_to_foreign_ids() {
    let lab = MountedLab::new();
    for b in BOTH {
        let d = b.dir();
        lab.sh(&format!(
            r#"mkdir -p "$LAB/{d}"; echo x > "$LAB/{d}/mine"; chown 1000:1000 "$LAB/{d}/mine"; echo y > "$LAB/{d}/roots""#
        ));
        for script in [
            format!(r#"chown 0 "$LAB/{d}/mine""#),
            format!(r#"chown 1001 "$LAB/{d}/mine""#),
            format!(r#"chgrp 1234 "$LAB/{d}/mine""#),
            format!(r#"chown 1000 "$LAB/{d}/roots""#),
        ] {
            let (code, _, err) = lab.sh_as_status(USER, USER, &script);
            assert!(
                code != 0 && err.contains("Operation not permitted"),
                "{script} as uid 1000 should fail with EPERM: {err}"
            );
        }
        assert_eq!(
            owner(lab.backend_path(b, &format!("{d}/mine"))),
            "1000:1000"
        );
        assert_eq!(owner(lab.backend_path(b, &format!("{d}/roots"))), "0:0");
        // Changing to a group the user is in is allowed.
        lab.sh_as_groups(
            USER,
            USER,
            &[1234],
            &format!(r#"chgrp 1234 "$LAB/{d}/mine""#),
        );
        assert_eq!(
            owner(lab.backend_path(b, &format!("{d}/mine"))),
            "1000:1234"
        );
    }
}

#[test]
fn user_cannot_write_into_a_root_owned_0755_directory() {
    let lab = MountedLab::new();
    for b in BOTH {
        let d = b.dir();
        lab.sh(&format!(
            r#"mkdir -p "$LAB/{d}/rootdir"; chmod 755 "$LAB/{d}/rootdir"; echo x > "$LAB/{d}/rootdir/existing""#
        ));
        for script in [
            format!(r#"touch "$LAB/{d}/rootdir/new""#),
            format!(r#"mkdir "$LAB/{d}/rootdir/newdir""#),
            format!(r#"ln -s x "$LAB/{d}/rootdir/link""#),
            format!(r#"mkfifo "$LAB/{d}/rootdir/fifo""#),
            format!(r#"rm -f "$LAB/{d}/rootdir/existing""#),
            format!(r#"mv "$LAB/{d}/rootdir/existing" "$LAB/{d}/rootdir/moved""#),
        ] {
            let (code, _, err) = lab.sh_as_status(USER, USER, &script);
            assert!(
                code != 0 && err.contains("Permission denied"),
                "{script} as uid 1000 should fail with EACCES: {err}"
            );
        }
        assert_eq!(
            names(lab.backend_path(b, &format!("{d}/rootdir"))),
            vec!["existing"]
        );
    }
}

#[test]
fn nothing_a_user_creates_is_root_owned_on_the_backend() {
    let lab = MountedLab::new();
    lab.sh(
        r#"mkdir -p "$LAB/docs/pub" "$LAB/cache/pub"; chmod 1777 "$LAB/docs/pub" "$LAB/cache/pub""#,
    );
    lab.sh_as(
        USER,
        USER,
        r#"
        for d in docs cache; do
            cd "$LAB/$d/pub"
            echo data > file; mkdir dir; mkdir -p deep/er/est; ln -s file link; ln file hard
            mkfifo fifo; cp file copy; echo t > tmp; mv tmp renamed
            python3 -c 'import socket; socket.socket(socket.AF_UNIX).bind("sock")'
        done
        mv "$LAB/docs/pub/renamed" "$LAB/cache/pub/moved-across"
        mv "$LAB/cache/pub/deep" "$LAB/docs/pub/deep-across"
        "#,
    );
    assert!(lab.local_path("cache/pub/moved-across").is_file());
    assert!(lab.atlas_path("docs/pub/deep-across/er/est").is_dir());
    for root in [lab.atlas_path("docs/pub"), lab.local_path("cache/pub")] {
        let found = sh(&format!(
            r#"find "{}" -mindepth 1 \( -uid 0 -o -gid 0 \) -printf '%p %U:%G\n'"#,
            root.display()
        ));
        assert_eq!(
            found, "",
            "entries created by uid 1000 but owned by root/gid 0"
        );
        let all = sh(&format!(r#"find "{}" -mindepth 1 | wc -l"#, root.display()));
        assert!(
            all.trim().parse::<u32>().unwrap() >= 8,
            "too few entries: {all}"
        );
    }
}

#[test]
fn implicit_parent_directories_made_for_a_user_are_not_root_owned() {
    // /scans/s9 lives on atlas; its `work` child on local needs a local parent dir,
    // which labfs makes on the user's behalf.
    let lab = MountedLab::new();
    lab.sh(r#"mkdir "$LAB/scans"; chmod 1777 "$LAB/scans""#);
    lab.sh_as(
        USER,
        USER,
        r#"mkdir -p "$LAB/scans/s9/work/x"; echo w > "$LAB/scans/s9/work/x/f""#,
    );
    assert_eq!(owner(lab.atlas_path("scans/s9")), "1000:1000");
    for rel in [
        "scans/s9",
        "scans/s9/work",
        "scans/s9/work/x",
        "scans/s9/work/x/f",
    ] {
        assert_eq!(owner(lab.local_path(rel)), "1000:1000", "local {rel}");
    }
}

#[test]
fn writing_a_setuid_file_as_another_user_clears_the_setuid_bit() {
    let lab = MountedLab::new();
    for b in BOTH {
        let d = b.dir();
        lab.sh(&format!(
            r#"mkdir -p "$LAB/{d}"; printf '#!/bin/sh\n' > "$LAB/{d}/suid"; chmod 6777 "$LAB/{d}/suid""#
        ));
        lab.sh_as(USER, USER, &format!(r#"echo 'id' >> "$LAB/{d}/suid""#));
        for p in [
            lab.path(&format!("{d}/suid")),
            lab.backend_path(b, &format!("{d}/suid")),
        ] {
            let m = fs::metadata(&p).unwrap().mode() & 0o7777;
            assert_eq!(
                m & 0o6000,
                0,
                "{} kept set-id bits after a write by uid 1000: {m:o}",
                p.display()
            );
        }
        assert_eq!(
            fs::read_to_string(lab.backend_path(b, &format!("{d}/suid"))).unwrap(),
            "#!/bin/sh\nid\n"
        );
    }
}

#[test]
fn files_created_by_a_user_are_owned_by_that_user_on_the_backend() {
    let lab = MountedLab::with_dirs();
    for b in BOTH {
        let d = b.dir();
        lab.sh(&format!(
            r#"mkdir "$LAB/{d}/pub" "$LAB/{d}/mine"; chmod 1777 "$LAB/{d}/pub"; chown 1000:1000 "$LAB/{d}/mine""#
        ));
        lab.sh_as(
            USER,
            USER,
            &format!(
                r#"
                cd "$LAB/{d}"
                echo x > pub/f; mkdir pub/d; ln -s f pub/l; mkfifo pub/p; ln pub/f pub/hl
                cp pub/f pub/copy
                echo y > mine/f; mkdir -p mine/a/b
                "#
            ),
        );
        for n in [
            "pub/f", "pub/d", "pub/l", "pub/p", "pub/hl", "pub/copy", "mine/f", "mine/a",
            "mine/a/b",
        ] {
            let rel = format!("{d}/{n}");
            assert_eq!(
                owner(lab.backend_path(b, &rel)),
                "1000:1000",
                "backend owner of /{rel}"
            );
            assert_eq!(
                owner(lab.path(&rel)),
                "1000:1000",
                "owner of /{rel} through the mount"
            );
        }
    }
}

#[test]
fn acl_entries_grant_and_revoke_access() {
    let lab = MountedLab::with_dirs();
    for b in BOTH {
        let d = b.dir();
        lab.sh(&format!(
            r#"echo secret > "$LAB/{d}/f"; chmod 600 "$LAB/{d}/f"; setfacl -m u:1000:r "$LAB/{d}/f""#
        ));
        assert_eq!(
            lab.sh_as(USER, USER, &format!(r#"cat "$LAB/{d}/f""#)),
            "secret\n"
        );
        let (code, _, err) = lab.sh_as_status(1001, 1001, &format!(r#"cat "$LAB/{d}/f""#));
        assert!(
            code != 0 && err.contains("Permission denied"),
            "uid 1001: {err}"
        );
        lab.sh(&format!(r#"setfacl -x u:1000 "$LAB/{d}/f""#));
        let (code, _, err) = lab.sh_as_status(USER, USER, &format!(r#"cat "$LAB/{d}/f""#));
        assert!(
            code != 0 && err.contains("Permission denied"),
            "after revoke: {err}"
        );
    }
}
