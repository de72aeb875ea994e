//! The descriptor budget through the mount. Files the kernel passes through cost the
//! daemon no descriptor while open (it drops its own after the open reply), so a
//! caller meets its own open-file limit, not the daemon's; files served through the
//! daemon (`[atlas] file_io = "daemon"`) are budgeted per uid: one user holding its
//! cap of them gets EMFILE, while other users (and root, and promote) keep working.

use std::fs;
use std::time::Duration;

use crate::common::*;

const CAP: usize = 8;

/// Rules whose Atlas files are served through the daemon, with a per-uid cap.
fn daemon_io_rules(cap: usize) -> String {
    format!("[limits]\nopen_files_per_uid = {cap}\n[atlas]\nfile_io = \"daemon\"\n{DEFAULT_RULES}")
}

/// Wait (up to `limit`) for the holder process to write `$SCRATCH/report`, or to write
/// to `$SCRATCH/holder.err` first (a holder that died), and return the report. A
/// holder that never reports fails the test with its errors and the daemon's log.
fn holder_report(lab: &MountedLab, limit: Duration) -> String {
    let report = lab.scratch_path("report");
    let errs = lab.scratch_path("holder.err");
    wait_until("the holder reports", limit, || {
        report.exists() || fs::metadata(&errs).is_ok_and(|m| m.len() > 0)
    });
    fs::read_to_string(&report).unwrap_or_else(|e| {
        panic!(
            "no report from the holder ({e}): {}\n--- daemon log ---\n{}",
            fs::read_to_string(&errs).unwrap_or_default(),
            lab.daemon_log()
        )
    })
}

#[test]
fn a_user_at_its_open_file_cap_gets_emfile_and_others_keep_working() {
    let lab = MountedLab::builder().rules(&daemon_io_rules(CAP)).mount();
    lab.sh(
        r#"mkdir -m 1777 "$LAB/docs" "$LAB/cache"; echo a > "$LAB/docs/f"; echo l > "$LAB/cache/f"
           chmod 0644 "$LAB/docs/f" "$LAB/cache/f"; mkfifo -m 0666 "$SCRATCH/release"
           mkdir -p "$LAB/scans/s/work/out"; echo p > "$LAB/scans/s/work/out/f""#,
    );
    // User 1000 holds local files (passed through: they hold no daemon descriptor, so
    // they are not counted), then opens Atlas files (through the daemon) until
    // refused, reports, and holds them all until the fifo is written.
    let holder = lab
        .cmd(&format!(
            r#"exec python3 -c '
import errno, os, sys
lab, scratch = os.environ["LAB"], os.environ["SCRATCH"]
local = [os.open(lab + "/cache/f", os.O_RDONLY) for i in range({local})]
held = []
err = "none"
for i in range(1000):
    try:
        held.append(os.open(lab + "/docs/f", os.O_RDONLY))
    except OSError as e:
        err = errno.errorcode.get(e.errno, str(e.errno))
        break
with open(scratch + "/report.tmp", "w") as r:
    r.write("%d %d %s" % (len(local), len(held), err))
os.rename(scratch + "/report.tmp", scratch + "/report")
open(scratch + "/release").read()
'"#,
            local = 3 * CAP
        ))
        .user(USER, USER)
        .spawn();
    assert_eq!(
        holder_report(&lab, Duration::from_secs(60)),
        format!("{} {CAP} EMFILE", 3 * CAP)
    );

    // While user 1000 holds its cap: another user and root open, create and read.
    let out = lab.sh_as(
        1001,
        1001,
        r#"cat "$LAB/docs/f" "$LAB/cache/f"; echo n > "$LAB/docs/new-1001"; cat "$LAB/docs/new-1001""#,
    );
    assert_eq!(out, "a\nl\nn\n");
    assert_eq!(
        lab.sh(r#"cat "$LAB/docs/f"; echo r > "$LAB/cache/root""#),
        "a\n"
    );
    // And promote works.
    let (code, out, err) = lab.sh_status(r#""$LABFS" promote "$LAB/scans/s/work/out""#);
    assert_eq!(code, 0, "promote while a uid holds its cap: {out}{err}");
    assert_eq!(read(&lab.atlas_path("scans/s/work/out/f")), "p\n");
    // And user 1000 itself is refused until it closes something.
    let (code, _, err) = lab.sh_as_status(USER, USER, r#"cat "$LAB/docs/f""#);
    assert_ne!(code, 0);
    assert!(err.contains("Too many open files"), "{err}");

    lab.sh(r#"echo go > "$SCRATCH/release""#);
    let mut holder = holder;
    assert!(
        holder.wait_timeout(Duration::from_secs(30)).is_some(),
        "holder did not exit"
    );
    // Its files are closed: the kernel sends release asynchronously, so wait for the
    // count to come back rather than assume it did.
    wait_until("user 1000 can open again", Duration::from_secs(30), || {
        lab.sh_as_status(USER, USER, r#"cat "$LAB/docs/f""#).0 == 0
    });
}

/// Descriptors the process `pid` has open.
fn open_fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The daemon's own limit is 300 descriptors (soft = hard, so it cannot raise it), yet
/// a caller holds 1,000 files open at once, on the local SSD and on Atlas (passed
/// through: the daemon dropped its descriptors after the open replies), and every
/// request the kernel still sends for them works on a descriptor opened again: write,
/// read back, fallocate, ftruncate, lseek SEEK_DATA/SEEK_HOLE, FS_IOC_GETFLAGS,
/// fsync and fdatasync (success, and the data is on the backend while still open),
/// ftruncate of a file chmod'ed read-only after it was opened for writing, and all of
/// it on a file unlinked while open.
#[test]
fn a_caller_holds_far_more_passthrough_files_than_the_daemon_has_descriptors() {
    const LIMIT: usize = 300;
    const PER_BACKEND: usize = 500;
    let lab = MountedLab::builder()
        .daemon_wrapper(&["prlimit", &format!("--nofile={LIMIT}:{LIMIT}"), "--"])
        .mount();
    assert_eq!(limits_of(lab.pid()), (LIMIT as u64, LIMIT as u64));
    lab.sh(
        r#"mkdir -p -m 1777 "$LAB/cache/many" "$LAB/docs/many"; mkfifo -m 0666 "$SCRATCH/release""#,
    );
    let holder = lab
        .cmd(&format!(
            r#"exec python3 -c '
import errno, fcntl, os
lab, scratch = os.environ["LAB"], os.environ["SCRATCH"]
fds = []
for d in ("cache", "docs"):
    for i in range({PER_BACKEND}):
        fds.append(os.open("%s/%s/many/f%d" % (lab, d, i), os.O_CREAT | os.O_RDWR, 0o644))
bad = []
for n, fd in enumerate(fds):
    data = b"file %06d\n" % n
    def check(what, ok):
        if not ok:
            bad.append("%d %s" % (n, what))
    check("write", os.pwrite(fd, data, 0) == len(data))
    os.posix_fallocate(fd, 0, 8192)
    check("fallocate", os.fstat(fd).st_size == 8192)
    os.ftruncate(fd, len(data))
    check("ftruncate", os.fstat(fd).st_size == len(data))
    check("read", os.pread(fd, 100, 0) == data)
    check("seek_data", os.lseek(fd, 0, os.SEEK_DATA) == 0)
    check("seek_hole", os.lseek(fd, 0, os.SEEK_HOLE) == len(data))
    if n % 100 == 0:
        fcntl.ioctl(fd, 0x80086601, bytes(8))
    os.fdatasync(fd)
    os.fsync(fd)
# Opened for writing, then made read-only: the open descriptor keeps its right to
# truncate (as on ext4).
ro = []
for d in ("cache", "docs"):
    fd = os.open("%s/%s/many/ro" % (lab, d), os.O_CREAT | os.O_RDWR, 0o644)
    os.write(fd, b"abcdef")
    os.fchmod(fd, 0o444)
    os.ftruncate(fd, 3)
    os.fsync(fd)
    ro.append(fd)
# Unlinked while open: the requests still reach the object.
for d in ("cache", "docs"):
    p = "%s/%s/many/gone" % (lab, d)
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    os.unlink(p)
    os.write(fd, b"still here")
    os.posix_fallocate(fd, 0, 4096)
    os.ftruncate(fd, 5)
    os.fsync(fd)
    if os.pread(fd, 100, 0) != b"still" or os.fstat(fd).st_size != 5:
        bad.append("unlinked " + d)
    ro.append(fd)
with open(scratch + "/report.tmp", "w") as r:
    r.write("%d %s" % (len(fds), ";".join(bad) or "ok"))
os.rename(scratch + "/report.tmp", scratch + "/report")
open(scratch + "/release").read()
' 2>"$SCRATCH/holder.err""#
        ))
        .user(USER, USER)
        .spawn();
    assert_eq!(
        holder_report(&lab, Duration::from_secs(240)),
        format!("{} ok", 2 * PER_BACKEND)
    );
    // All 1,000 are still open, and the daemon holds far fewer descriptors than that
    // (its limit is 300).
    let held = open_fds(lab.pid());
    assert!(held < 100, "the daemon holds {held} descriptors");
    // fsync reported success, and what it flushed is on the backends.
    for (n, (b, i)) in [
        (Backend::Local, 0..PER_BACKEND),
        (Backend::Atlas, 0..PER_BACKEND),
    ]
    .into_iter()
    .flat_map(|(b, r)| r.map(move |i| (b, i)))
    .enumerate()
    {
        let p = lab.backend_path(b, &format!("{}/many/f{i}", b.dir()));
        assert_eq!(read(&p), format!("file {n:06}\n"), "{}", p.display());
    }
    for b in [Backend::Local, Backend::Atlas] {
        let p = lab.backend_path(b, &format!("{}/many/ro", b.dir()));
        assert_eq!(read(&p), "abc", "{}", p.display());
        assert_eq!(mode(&p) & 0o777, 0o444);
    }
    lab.sh(r#"echo go > "$SCRATCH/release""#);
    let mut holder = holder;
    assert!(
        holder.wait_timeout(Duration::from_secs(60)).is_some(),
        "holder did not exit"
    );
}

fn limits_of(pid: u32) -> (u64, u64) {
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or_default();
    let n: Vec<u64> = line
        .split_whitespace()
        .skip(3)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    assert_eq!(n.len(), 2, "{line}");
    (n[0], n[1])
}

fn nr_open() -> u64 {
    fs::read_to_string("/proc/sys/fs/nr_open")
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Whether this process may raise its hard open-file limit (CAP_SYS_RESOURCE: some
/// containers drop it from the bounding set even for root).
fn can_raise_hard_limit() -> bool {
    let (_, hard) = limits_of(std::process::id());
    run_status(
        "prlimit",
        &[&format!("--nofile={0}:{0}", hard + 1), "--", "true"],
    )
    .0 == 0
}

/// As root the daemon raises its hard (and soft) open-file limit to fs.nr_open, so a
/// caller's own limit is reached before the daemon's (systemd's default soft limit of
/// 1024, or a hard limit no larger than the caller's, would otherwise cap the mount).
/// Where root lacks CAP_SYS_RESOURCE, the soft limit is raised to the hard one.
#[test]
fn the_daemon_raises_its_open_file_limit_to_nr_open() {
    let (_, hard) = limits_of(std::process::id());
    let lab = MountedLab::builder()
        .daemon_wrapper(&["prlimit", &format!("--nofile=1024:{hard}"), "--"])
        .mount();
    let want = if can_raise_hard_limit() {
        nr_open()
    } else {
        hard
    };
    assert_eq!(limits_of(lab.pid()), (want, want));
    let cap = format!("{} open files per uid", (want / 4).max(16));
    assert!(lab.daemon_log().contains(&cap), "{}", lab.daemon_log());
}

/// Without CAP_SYS_RESOURCE the hard limit stays; the soft one is raised to it.
#[test]
fn without_cap_sys_resource_the_daemon_raises_its_soft_limit_to_the_hard_one() {
    let (_, hard) = limits_of(std::process::id());
    assert!(
        hard > 1024,
        "the test needs a hard limit above 1024 ({hard})"
    );
    let lab = MountedLab::builder()
        .daemon_wrapper(&[
            "prlimit",
            &format!("--nofile=1024:{hard}"),
            "--",
            "setpriv",
            "--bounding-set=-sys_resource",
            "--inh-caps=-sys_resource",
            "--",
        ])
        .mount();
    assert_eq!(limits_of(lab.pid()), (hard, hard));
    let cap = format!("{} open files per uid", (hard / 4).max(16));
    let log = lab.daemon_log();
    assert!(log.contains(&cap), "{log}");
    assert!(log.contains("not obtainable"), "{log}");
}

/// LTP creat05 / fcntl12: a caller that opens files until refused gets EMFILE from
/// its own limit, not from the daemon, and meanwhile another uid opens files and
/// `labfs promote` works, with the default per-uid budget. Where the daemon can raise
/// its limit to fs.nr_open, the caller raises its own above the hard limit the daemon
/// started with; where it cannot (root without CAP_SYS_RESOURCE), the caller has the
/// same limit as the daemon, the case the LTP tests hit here (20000/20000 for both):
/// the local files it holds are passed through and hold no daemon descriptor.
#[test]
fn a_caller_opening_files_until_refused_gets_its_own_emfile_and_others_keep_working() {
    let (_, hard) = limits_of(std::process::id());
    let raised = can_raise_hard_limit();
    let own = if raised { hard + 3000 } else { hard };
    let lab = MountedLab::new();
    let (_, daemon_hard) = limits_of(lab.pid());
    assert!(
        daemon_hard >= own,
        "daemon hard limit {daemon_hard}, caller's {own}"
    );
    lab.sh(
        r#"mkdir -p "$LAB/cache/many" "$LAB/scans/s/work/out"; chmod 1777 "$LAB/cache"
           echo p > "$LAB/scans/s/work/out/f"; mkfifo "$SCRATCH/release""#,
    );
    let holder = lab
        .cmd(&format!(
            r#"exec prlimit --nofile={own}:{own} -- python3 -c '
import errno, os
lab, scratch = os.environ["LAB"], os.environ["SCRATCH"]
held = []
err = "none"
while True:
    try:
        held.append(os.open("%s/cache/many/f%d" % (lab, len(held)), os.O_CREAT | os.O_RDWR, 0o644))
    except OSError as e:
        err = errno.errorcode.get(e.errno, str(e.errno))
        break
n, top = len(held), max(held or [-1])
if held:
    os.close(held.pop())  # room for the report itself
with open(scratch + "/report.tmp", "w") as r:
    r.write("%d %d %s" % (n, top, err))
os.rename(scratch + "/report.tmp", scratch + "/report")
open(scratch + "/release").read()
' 2>"$SCRATCH/holder.err""#
        ))
        .spawn();
    let rep = holder_report(&lab, Duration::from_secs(120));
    let f: Vec<&str> = rep.split_whitespace().collect();
    let (held, top): (u64, u64) = (f[0].parse().unwrap(), f[1].parse().unwrap());
    assert_eq!(f[2], "EMFILE", "{rep}");
    assert_eq!(top, own - 1, "refused at the caller's own limit: {rep}");
    if raised {
        assert!(held > hard, "more files than the daemon's old limit: {rep}");
    } else {
        let cap = (daemon_hard / 4).max(16);
        assert!(
            held > cap,
            "more files than the per-uid budget {cap}: {rep}"
        );
    }

    // While they are held: another uid opens and creates, and promote works.
    let out = lab.sh_as(
        USER,
        USER,
        r#"echo n > "$LAB/cache/new-1000"; cat "$LAB/cache/new-1000""#,
    );
    assert_eq!(out, "n\n");
    let (code, out, err) = lab.sh_status(r#""$LABFS" promote "$LAB/scans/s/work/out""#);
    assert_eq!(
        code, 0,
        "promote while a caller holds {held} files: {out}{err}"
    );
    assert_eq!(read(&lab.atlas_path("scans/s/work/out/f")), "p\n");

    lab.sh(r#"echo go > "$SCRATCH/release""#);
    let mut holder = holder;
    assert!(
        holder.wait_timeout(Duration::from_secs(60)).is_some(),
        "holder did not exit"
    );
}
