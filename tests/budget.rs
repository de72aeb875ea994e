//! The descriptor budget through the mount: one user holding its cap of open files
//! gets EMFILE, while other users (and root) keep opening files.

use std::fs;
use std::time::Duration;

use crate::common::*;

const CAP: usize = 8;

#[test]
fn a_user_at_its_open_file_cap_gets_emfile_and_others_keep_working() {
    let lab = MountedLab::builder()
        .rules(&format!(
            "[limits]\nopen_files_per_uid = {CAP}\n{DEFAULT_RULES}"
        ))
        .mount();
    lab.sh(
        r#"mkdir -m 1777 "$LAB/docs" "$LAB/cache"; echo a > "$LAB/docs/f"; echo l > "$LAB/cache/f"
           chmod 0644 "$LAB/docs/f" "$LAB/cache/f"; mkfifo -m 0666 "$SCRATCH/release""#,
    );
    // User 1000 opens files (alternating backends) until refused, reports, then holds
    // them until the fifo is written.
    let holder = lab
        .cmd(
            r#"exec python3 -c '
import errno, os, sys
lab, scratch = os.environ["LAB"], os.environ["SCRATCH"]
held = []
err = "none"
for i in range(1000):
    try:
        held.append(os.open(lab + ("/docs/f" if i % 2 else "/cache/f"), os.O_RDONLY))
    except OSError as e:
        err = errno.errorcode.get(e.errno, str(e.errno))
        break
with open(scratch + "/report.tmp", "w") as r:
    r.write("%d %s" % (len(held), err))
os.rename(scratch + "/report.tmp", scratch + "/report")
open(scratch + "/release").read()
'"#,
        )
        .user(USER, USER)
        .spawn();
    let report = lab.scratch_path("report");
    wait_until("the holder reports", Duration::from_secs(60), || {
        report.exists()
    });
    assert_eq!(
        fs::read_to_string(&report).unwrap(),
        format!("{CAP} EMFILE")
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

/// The daemon raises its soft open-file limit to the hard one at start (systemd's
/// default soft limit of 1024 would otherwise cap the whole mount).
#[test]
fn the_daemon_runs_with_its_soft_open_file_limit_raised_to_the_hard_limit() {
    let hard = fs::read_to_string("/proc/self/limits")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4).map(str::to_string))
        .unwrap();
    let hard_n: u64 = hard.parse().unwrap();
    assert!(
        hard_n > 1024,
        "the test needs a hard limit above 1024 ({hard})"
    );
    let lab = MountedLab::builder()
        .daemon_wrapper(&["prlimit", &format!("--nofile=1024:{hard}"), "--"])
        .mount();
    let limits = fs::read_to_string(format!("/proc/{}/limits", lab.pid())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or_default()
        .to_string();
    let nums: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(nums, [hard.as_str(), hard.as_str()], "{line}");
    let cap = format!("{} open files per uid", (hard_n / 4).max(16));
    assert!(lab.daemon_log().contains(&cap), "{}", lab.daemon_log());
}
