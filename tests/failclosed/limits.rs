//! Nobody starves anyone: per-user limits on promotion jobs, a refusal that says what
//! happened, and repeated refusals logged once per interval.

use std::time::Duration;

use crate::common::*;

/// Sends `user.labfs.ctl.promote` requests as the caller; prints one errno (0 = taken)
/// per request. argv: DIR then `name:wait` pairs.
const SEND: &str = r#"
import json, os, sys, secrets
d = sys.argv[1]
for spec in sys.argv[2:]:
    name, wait = spec.split(":")
    req = {"id": secrets.token_hex(8), "name": name, "wait": wait == "1"}
    try:
        os.setxattr(d, "user.labfs.ctl.promote", json.dumps(req).encode())
        print(0)
    except OSError as e:
        print(e.errno)
"#;

/// Holds every file named in argv[2:] open for writing until argv[1] exists.
const HOLD: &str = r#"
import os, sys, time
stop = sys.argv[1]
fds = [os.open(p, os.O_WRONLY | os.O_APPEND) for p in sys.argv[2:]]
open(stop + ".ready", "w").close()
while not os.path.exists(stop):
    time.sleep(0.05)
"#;

/// Runs the Python program `code` as `uid` (cwd: the mount) with `args`.
fn python(lab: &MountedLab, uid: u32, code: &str, args: &[String]) -> Sh {
    let prog = lab.scratch_path(&format!("prog-{:x}.py", blake(code)));
    std::fs::write(&prog, code).unwrap();
    let mut script = format!("exec python3 '{}'", prog.display());
    for a in args {
        script.push_str(&format!(" '{a}'"));
    }
    lab.cmd(&script).user(uid, uid)
}

fn blake(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

fn send(lab: &MountedLab, uid: u32, specs: &[String]) -> Vec<i32> {
    let mut args = vec![lab.path("scans/s1/work").to_string_lossy().into_owned()];
    args.extend(specs.iter().cloned());
    let out = python(lab, uid, SEND, &args).ok();
    out.lines().map(|l| l.trim().parse().unwrap()).collect()
}

#[test]
fn one_user_cannot_fill_the_promotion_table_for_everyone() {
    let lab = MountedLab::new();
    let n = 12;
    lab.sh(&format!(
        r#"mkdir -p "$LAB/scans/s1/work" && chown {USER}:{USER} "$LAB/scans/s1/work"
           for i in $(seq 0 {n}); do mkdir "$LAB/scans/s1/work/t$i" && echo $i > "$LAB/scans/s1/work/t$i/f"; done
           chown -R {USER}:{USER} "$LAB/scans/s1/work"
           mkdir -p "$LAB/scans/root/work" && echo r > "$LAB/scans/root/work/r.txt""#
    ));

    // Many bogus requests: each becomes a job that fails at once and is kept for a
    // while; they neither block the user's later jobs nor anyone else's.
    let bogus: Vec<String> = (0..300).map(|i| format!("nope{i}:0")).collect();
    let answers = send(&lab, USER, &bogus);
    assert!(
        answers.iter().all(|e| *e == 0 || *e == libc::EBUSY),
        "{answers:?}"
    );

    // Jobs that stay in flight: every tree has a file open for writing, and --wait.
    let stop = lab.scratch_path("stop");
    let files: Vec<String> = (0..=n)
        .map(|i| {
            lab.path(&format!("scans/s1/work/t{i}/f"))
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let mut hold_args = vec![stop.to_string_lossy().into_owned()];
    hold_args.extend(files.iter().cloned());
    let mut holder = python(&lab, USER, HOLD, &hold_args).spawn();
    let ready = lab.scratch_path("stop.ready");
    wait_until("the writers are open", Duration::from_secs(20), || {
        ready.exists()
    });
    let limit = 8; // MAX_ACTIVE_PER_UID (docs/promote.md)
    let waiting: Vec<String> = (0..limit).map(|i| format!("t{i}:1")).collect();
    assert_eq!(
        send(&lab, USER, &waiting),
        vec![0; limit],
        "bogus jobs blocked real ones"
    );
    assert_eq!(
        send(&lab, USER, &[format!("t{limit}:1")]),
        vec![libc::EBUSY],
        "the user's {}th job in flight must be refused with EBUSY",
        limit + 1
    );

    // The CLI says what happened.
    let out = lab
        .cmd(&format!(
            r#""$LABFS" promote "$LAB/scans/s1/work/t{}""#,
            limit + 1
        ))
        .user(USER, USER)
        .status();
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("promotions in flight") && out.stderr.contains("EBUSY"),
        "{}",
        out.stderr
    );
    assert!(
        !out.stderr.contains("not on a labfs mount"),
        "{}",
        out.stderr
    );

    // Another user (root here) still promotes.
    let out = lab
        .cmd(r#""$LABFS" promote "$LAB/scans/root/work/r.txt""#)
        .status();
    assert!(out.ok(), "root's promotion was blocked: {out:?}");
    assert!(lab.atlas_path("scans/root/work/r.txt").exists());

    // Repeated refusals: one line per interval, not one per request.
    let again: Vec<String> = (0..50).map(|_| format!("t{limit}:1")).collect();
    assert!(send(&lab, USER, &again).iter().all(|e| *e == libc::EBUSY));
    let log = lab.daemon_log();
    let refusals = log
        .lines()
        .filter(|l| l.contains("promotions in flight (limit"))
        .count();
    assert!(
        (1..=2).contains(&refusals),
        "{refusals} refusal lines for 52 refusals:\n{log}"
    );
    let requested = log.lines().filter(|l| l.contains("requested")).count();
    assert!(
        requested < 100,
        "{requested} 'requested' lines for 300 bogus requests"
    );

    // Writers closed: the waiting jobs finish and the user may promote again.
    std::fs::write(&stop, "").unwrap();
    assert!(holder.wait_timeout(Duration::from_secs(20)).is_some());
    wait_until(
        "the waiting promotions finish",
        Duration::from_secs(60),
        || {
            lab.atlas_path(&format!("scans/s1/work/t{}/f", limit - 1))
                .exists()
                && send(&lab, USER, &[format!("t{limit}:0")]) == vec![0]
        },
    );
}
