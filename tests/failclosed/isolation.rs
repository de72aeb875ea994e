//! Isolation by construction: while Atlas is frozen and authoritative requests are
//! stuck, every kind of request on local paths (including writes that clear setuid,
//! and control requests) still completes; an Atlas file unlinked while open is served
//! on the Atlas lane; lookup counts end exact once late replies come in; and a name
//! that is not UTF-8 fails closed on Atlas, and works locally, like any other.

use std::time::Duration;

use super::{FrozenLab, FAIL_BOUND, LOCAL_BOUND, PROBE, TIMEOUT};
use crate::common::*;

/// Every kind of request on the local directory argv[1], as the caller.
const LOCAL_OPS: &str = r#"
import os, sys, stat
d = sys.argv[1]
# rmdir in a transitional directory checks its promoted part on Atlas (and so fails
# with ETIMEDOUT during an outage): only tried where the rules place nothing on Atlas.
rmdir = sys.argv[2] == "rmdir"
p = os.path.join(d, "ops")
os.makedirs(p, exist_ok=True)
f = os.path.join(p, "f")
fd = os.open(f, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o644)
os.write(fd, b"x" * 10000)
os.fsync(fd)
os.fdatasync(fd)
os.posix_fallocate(fd, 0, 20000)
os.lseek(fd, 0, os.SEEK_DATA)
os.pread(fd, 100, 0)
g = os.open(os.path.join(p, "copy"), os.O_CREAT | os.O_RDWR, 0o644)
os.copy_file_range(fd, g, 1000, 0, 0)
os.close(g)
os.ftruncate(fd, 5000)
os.close(fd)
os.chmod(f, 0o600)
os.utime(f, (1, 2))
os.truncate(f, 10)
os.stat(f)
os.access(f, os.R_OK)
os.setxattr(f, "user.t", b"v")
assert os.getxattr(f, "user.t") == b"v"
assert "user.t" in os.listxattr(f)
os.removexattr(f, "user.t")
os.link(f, os.path.join(p, "hard"))
os.symlink("f", os.path.join(p, "sym"))
assert os.readlink(os.path.join(p, "sym")) == "f"
os.mkfifo(os.path.join(p, "fifo"))
os.rename(os.path.join(p, "hard"), os.path.join(p, "hard2"))
for n in ["hard2", "sym", "fifo", "copy"]:
    os.unlink(os.path.join(p, n))
os.mkdir(os.path.join(p, "sub"))
if rmdir:
    os.rmdir(os.path.join(p, "sub"))
assert sorted(os.listdir(p)) == (["f"] if rmdir else ["f", "sub"])
os.statvfs(p)
os.unlink(f)
if rmdir:
    os.rmdir(p)
print("ok")
"#;

/// Opens argv[1] for writing, unlinks it, creates argv[2]; when argv[3] appears,
/// writes once and reports "<errno or ok>" in argv[4].
const UNLINKED_WRITER: &str = r#"
import os, sys, time
path, ready, go, out = sys.argv[1:5]
fd = os.open(path, os.O_WRONLY)
os.unlink(path)
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.01)
try:
    os.write(fd, b"late")
    os.fsync(fd)
    r = "ok"
except OSError as e:
    r = str(e.errno)
with open(out + ".tmp", "w") as f:
    f.write(r)
os.rename(out + ".tmp", out)
"#;

fn python(lab: &FrozenLab, name: &str, code: &str, args: &[String], uid: u32) -> Sh {
    let prog = lab.root.join(format!("{name}.py"));
    std::fs::write(&prog, code).unwrap();
    let mut script = format!("exec python3 '{}'", prog.display());
    for a in args {
        script.push_str(&format!(" '{a}'"));
    }
    lab.cmd(&script).user(uid, uid)
}

fn inodes(lab: &FrozenLab) -> u64 {
    lab.status_json()["inodes"]
        .as_u64()
        .expect("inodes in status")
}

#[test]
fn local_requests_of_every_kind_run_while_atlas_requests_are_stuck() {
    let lab = FrozenLab::new(true);
    lab.cmd(
        r#"mkdir -p "$LAB/docs" "$LAB/cache/u" "$LAB/scans/s1/work"
           chmod 1777 "$LAB/cache/u"
           for i in 1 2 3 4 5 6; do echo $i > "$LAB/docs/f$i"; done
           echo gone > "$LAB/docs/unlinked"; chmod 666 "$LAB/docs/unlinked"
           echo s > "$LAB/cache/suid"; chmod 4777 "$LAB/cache/suid""#,
    )
    .ok();
    let (ready, go, result) = (
        lab.root.join("ready"),
        lab.root.join("go"),
        lab.root.join("result"),
    );
    let _writer = python(
        &lab,
        "unlinked",
        UNLINKED_WRITER,
        &[
            lab.mnt.join("docs/unlinked").to_string_lossy().into_owned(),
            ready.to_string_lossy().into_owned(),
            go.to_string_lossy().into_owned(),
            result.to_string_lossy().into_owned(),
        ],
        0,
    )
    .spawn();
    wait_until(
        "the Atlas file is open and unlinked",
        Duration::from_secs(20),
        || ready.exists(),
    );
    drop_kernel_caches();
    let baseline = inodes(&lab);

    lab.freeze();
    // Authoritative requests that get stuck in the frozen Atlas, shown blocked.
    let stuck: Vec<Bg> = [
        r#"exec cat "$LAB/docs/f1""#,
        r#"exec ls -l "$LAB/docs""#,
        r#"exec stat "$LAB/docs/f2""#,
    ]
    .iter()
    .map(|s| lab.cmd(s).spawn())
    .collect();
    wait_until(
        "the Atlas requests are blocked in a syscall",
        Duration::from_secs(5),
        || {
            stuck.iter().all(|b| {
                matches!(b.state(), Some('S' | 'D'))
                    && std::fs::read_to_string(format!("/proc/{}/syscall", b.pid())).is_ok_and(
                        |s| {
                            s.split_whitespace()
                                .next()
                                .is_some_and(|n| n.parse::<i64>().is_ok())
                        },
                    )
            })
        },
    );
    // A write by another user to a setuid local file clears the bit (kill-suid), on
    // the local lane.
    // (root without CAP_FSETID: the kernel then asks labfs to clear the bits)
    let out = lab
        .cmd(r#"setpriv --bounding-set -fsetid --inh-caps -fsetid -- sh -c 'echo more >> "$LAB/cache/suid"'"#)
        .status();
    assert!(out.ok(), "{}", out.stderr);
    assert_eq!(
        mode(&lab.local.join("cache/suid")) & 0o7000,
        0,
        "setuid kept"
    );
    // The unlinked-but-open Atlas file: its write goes to the Atlas lane.
    std::fs::write(&go, "").unwrap();

    let bound = Duration::from_secs(5);
    std::fs::write(lab.root.join("ops.py"), LOCAL_OPS).unwrap();
    for (dir, rmdir) in [("cache", "rmdir"), ("scans/s1/work", "keep")] {
        let out = lab.timed(
            &format!(
                "exec python3 '{}' \"$LAB/{dir}\" {rmdir}",
                lab.root.join("ops.py").display()
            ),
            bound,
        );
        assert!(
            out.ok() && out.stdout.trim() == "ok",
            "local ops in {dir}: {}",
            out.stderr
        );
    }
    // Control requests: status, explain of a local path, the promote job list.
    lab.timed(r#""$LABFS" status "$LAB" >/dev/null"#, bound);
    let ex = lab.timed(
        r#"getfattr --only-values -n user.labfs.ctl.explain "$LAB/cache/suid""#,
        bound,
    );
    assert!(ex.ok() && ex.stdout.contains("local"), "{ex:?}");
    lab.timed(
        r#"getfattr -n user.labfs.ctl.promote "$LAB/scans/s1/work" >/dev/null"#,
        bound,
    );

    // The Atlas requests are answered within the bound (ETIMEDOUT), never hang.
    for mut b in stuck {
        assert!(
            b.wait_timeout(Duration::from_secs(10)).is_some(),
            "an authoritative request was never answered"
        );
    }
    wait_until(
        "the unlinked-file write is answered",
        Duration::from_secs(10),
        || result.exists(),
    );
    let r = read(&result);
    assert!(
        r == libc::ETIMEDOUT.to_string() || r == libc::EIO.to_string(),
        "write to an unlinked-but-open Atlas file while Atlas is frozen: {r}"
    );

    // ---- lookup counts after late replies ----
    lab.thaw();
    lab.wait_answering(true, Duration::from_secs(20));
    // The late replies (the stuck ls -l's entries) come in after the watchdog
    // answered: their lookups must be given back.
    wait_until(
        "the inode table is back at its baseline",
        Duration::from_secs(20),
        || {
            drop_kernel_caches();
            inodes(&lab) <= baseline
        },
    );
}

/// One operation (argv[1]) on the path argv[2] (hex: any bytes); prints `ok` or the
/// errno.
const NAME_OP: &str = r#"
import os, sys, time
op, p = sys.argv[1], bytes.fromhex(sys.argv[2])
# The bound is on the operation, timed here: the interpreter's own start-up (seconds on
# a 2-core node kept busy) is not labfs's latency.
start = time.monotonic()
result = "ok"
try:
    if op == "read":
        with open(p, "rb") as f:
            f.read()
    elif op == "create":
        os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))
    elif op == "mkdir":
        os.mkdir(p)
    elif op == "list":
        os.listdir(p)
    elif op == "unlink":
        os.unlink(p)
except OSError as e:
    result = str(e.errno)
print(result, time.monotonic() - start)
"#;

#[test]
fn names_that_are_not_utf8_fail_closed_on_atlas_and_work_locally() {
    use std::os::unix::ffi::OsStrExt;
    let lab = FrozenLab::new(true);
    lab.cmd(
        r#"mkdir -p "$LAB/docs/dir" "$LAB/docs/$(printf 'd\351')" "$LAB/cache"
           echo a > "$LAB/docs/plain"; echo a > "$LAB/docs/$(printf 'caf\351')"
           echo c > "$LAB/cache/$(printf 'caf\351')""#,
    )
    .ok();
    let prog = lab.root.join("name_op.py");
    std::fs::write(&prog, NAME_OP).unwrap();
    let op = |what: &str, rel: &[u8], bound: Duration| {
        let mut p = lab.mnt.as_os_str().as_bytes().to_vec();
        p.push(b'/');
        p.extend_from_slice(rel);
        let hex: String = p.iter().map(|b| format!("{b:02x}")).collect();
        let script = format!("exec python3 '{}' {what} {hex}", prog.display());
        let out = lab
            .cmd(&script)
            .timeout(bound + Duration::from_secs(30))
            .status();
        let mut fields = out.stdout.split_whitespace();
        let answer = fields.next().unwrap_or_default().to_string();
        let took = fields.next().and_then(|s| s.parse::<f64>().ok());
        let took =
            took.unwrap_or_else(|| panic!("{script}: no answer\n{}\n{}", out.stdout, out.stderr));
        assert!(
            took < bound.as_secs_f64(),
            "{what} of {:?} took {took:.3}s (bound {bound:?})",
            String::from_utf8_lossy(rel)
        );
        answer
    };
    lab.freeze();
    lab.wait_answering(false, PROBE + TIMEOUT + Duration::from_secs(5));
    // (operation, a UTF-8 name, a name that is not UTF-8): the same documented answer
    // within the bound, ETIMEDOUT.
    let timedout = libc::ETIMEDOUT.to_string();
    for (what, utf8, other) in [
        ("read", &b"docs/plain"[..], &b"docs/caf\xe9"[..]),
        ("list", b"docs/dir", b"docs/d\xe9"),
        ("create", b"docs/new", b"docs/new\xe9"),
        ("mkdir", b"docs/newdir", b"docs/newdir\xe9"),
        ("create", b"docs/dir/new", b"docs/d\xe9/new\xe9"),
    ] {
        let a = op(what, utf8, FAIL_BOUND);
        let b = op(what, other, FAIL_BOUND);
        assert_eq!(a, timedout, "{what} of a UTF-8 Atlas name while frozen");
        assert_eq!(
            b, a,
            "{what} of a non-UTF-8 Atlas name answers as a UTF-8 one"
        );
    }
    assert!(
        !lab.local.join("docs").exists(),
        "an Atlas name reached the local SSD during the outage"
    );
    // Local names that are not UTF-8 keep working meanwhile.
    for (what, rel) in [
        ("read", &b"cache/caf\xe9"[..]),
        ("create", b"cache/new\xe9"),
        ("mkdir", b"cache/dir\xe9"),
        ("create", b"cache/dir\xe9/f\xfe"),
        ("list", b"cache/dir\xe9"),
        ("unlink", b"cache/dir\xe9/f\xfe"),
    ] {
        assert_eq!(
            op(what, rel, LOCAL_BOUND),
            "ok",
            "local {what} while frozen"
        );
    }
    assert!(lab
        .local
        .join(std::ffi::OsStr::from_bytes(b"cache/new\xe9"))
        .exists());
}
