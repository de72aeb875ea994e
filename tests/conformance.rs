//! Defects the public suites found (docs/conformance.md), each pinned through a real
//! mount on both backends so that it stays fixed without rerunning the suites.

use std::fs;

use crate::common::*;

/// stress-ng `filerace` (and `fanotify`): fstat, fsync, fchmod, fchown and readdir on
/// the descriptor of a directory removed meanwhile answered ESTALE; ext4 answers them
/// (nlink 0, an empty listing). The directory is listed twice before it is opened, so
/// that on Atlas the open is the cached-listing kind (close-to-open) too.
const REMOVED_DIR: &str = r#"
import os, sys
p = sys.argv[1]
os.mkdir(p)
os.listdir(p)
os.listdir(p)
fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY)
os.rmdir(p)
assert not os.path.exists(p)
st = os.fstat(fd)
assert st.st_nlink == 0, st
os.fsync(fd)
os.fchmod(fd, 0o700)
os.fchown(fd, 1000, 1000)
st = os.fstat(fd)
assert (st.st_mode & 0o777, st.st_uid) == (0o700, 1000), st
assert os.listdir(fd) == [], os.listdir(fd)
os.close(fd)
print("ok")
"#;

#[test]
fn an_open_directory_keeps_answering_after_it_is_removed() {
    let lab = MountedLab::with_dirs();
    let script = lab.scratch_path("removed_dir.py");
    fs::write(&script, REMOVED_DIR).unwrap();
    for b in BOTH {
        let d = b.dir();
        let out = lab.sh(&format!(
            r#"python3 "{}" "$LAB/{d}/gone" 2>&1 || true"#,
            script.display()
        ));
        assert_eq!(out.trim(), "ok", "{}", b.name());
    }
}
