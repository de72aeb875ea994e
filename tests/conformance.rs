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

/// Runs the Python `script` on `$LAB/<backend dir>/<file>` for each backend, asserting
/// that it prints only "ok" (anything else is what it found wrong), then `after(b)`.
fn script_ok_on_both(lab: &MountedLab, script: &str, file: &str, after: impl Fn(Backend)) {
    let path = lab.scratch_path("check.py");
    fs::write(&path, script).unwrap();
    for b in BOTH {
        let d = b.dir();
        let out = lab.sh(&format!(
            r#"python3 "{}" "$LAB/{d}/{file}" 2>&1 || true"#,
            path.display()
        ));
        assert_eq!(out.trim(), "ok", "{}", b.name());
        after(b);
    }
}

#[test]
fn an_open_directory_keeps_answering_after_it_is_removed() {
    let lab = MountedLab::with_dirs();
    script_ok_on_both(&lab, REMOVED_DIR, "gone", |_| {});
}

/// pjdfstest (Rust) `open::etxtbsy`: `open(O_RDONLY|O_TRUNC)` of a program that is
/// running answers ETXTBSY, and the program keeps its contents. The kernel checks
/// "being executed" only after the filesystem's open; with FUSE_ATOMIC_O_TRUNC the
/// truncation was the daemon's open itself, so the caller got ETXTBSY while the
/// backing file was already empty (the program then died of SIGBUS at its next page
/// fault, and a later open for writing found nothing running).
const RUNNING_TRUNC: &str = r#"
import errno, os, shutil, subprocess, sys
p = sys.argv[1]
shutil.copyfile("/usr/bin/sleep", p)
os.chmod(p, 0o755)
size = os.stat(p).st_size
child = subprocess.Popen([p, "30"])
try:
    for flags in (os.O_RDONLY | os.O_TRUNC, os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC):
        try:
            os.close(os.open(p, flags))
            print("opened with flags %o" % flags)
        except OSError as e:
            if e.errno != errno.ETXTBSY:
                print("flags %o: %s" % (flags, e))
    if os.stat(p).st_size != size:
        print("size %d, was %d" % (os.stat(p).st_size, size))
    if child.poll() is not None:
        print("the program died: %s" % child.returncode)
finally:
    child.kill()
    child.wait()
print("ok")
"#;

#[test]
fn truncating_a_running_program_is_etxtbsy_and_keeps_its_contents() {
    let lab = MountedLab::with_dirs();
    script_ok_on_both(&lab, RUNNING_TRUNC, "prog", |b| {
        let backing = lab.backend_path(b, &format!("{}/prog", b.dir()));
        assert_eq!(
            fs::metadata(&backing).map(|m| m.len()).ok(),
            fs::metadata("/usr/bin/sleep").map(|m| m.len()).ok(),
            "{} on the backend",
            b.name()
        );
    });
}
