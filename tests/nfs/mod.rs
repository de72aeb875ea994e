//! The NFS group: labfs over the Linux kernel NFS client (v4.2 and v3, root_squash and
//! no_root_squash), which this machine's kernel does not have.
//!
//! The first NFS test to run boots one VM for the whole group: Debian's own kernel
//! (`linux-image-amd64`, with nfs, nfsd and fuse as modules) under qemu (TCG: nested
//! KVM hangs at boot here, so `--disable-kvm` always) through virtme-ng, over the
//! host's root filesystem read-only. Inside, `tests/nfs/guest.sh` starts an NFS server
//! on 127.0.0.1, mounts its exports with the kernel client and runs every scenario of
//! `tests/nfs/scenarios.sh` with the release labfs binary built on the host, writing
//! `<scenario>.result` and `<scenario>.log` into a shared directory. Each test below
//! then reports one scenario by name, with its log when it failed.
//!
//! Needs: `qemu-system-x86_64`, `/boot/vmlinuz-*-amd64`, busybox-static,
//! nfs-kernel-server and iptables (apt), and virtme-ng's `vng` (PyPI; found through
//! `$LABFS_VNG`, `/var/tmp/labfs-vng/bin/vng` where `.ci/run` installs it, or `PATH`).
//! Without them the tests say so loudly and pass, unless `LABFS_NFS_RIG=required`
//! (set by `.ci/run`, which installs them), where a missing rig fails every test.
//! `LABFS_NFS_KEEP=1` keeps the results directory (its path is printed).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::common::LABFS;

mod claim;

/// Scenarios that fail until another part of labfs lands, with what they wait for.
/// Such a scenario's FAIL is reported loudly and accepted; once it passes, its test
/// fails until it is removed from here (so the list never hides a regression).
const KNOWN_FAILING: &[(&str, &str)] = &[];

/// The whole group (boot included) must end within this.
const GROUP_TIMEOUT: Duration = Duration::from_secs(20 * 60);

/// What one run of the VM produced.
struct Run {
    dir: PathBuf,
    /// scenario -> first line of its .result file.
    results: BTreeMap<String, String>,
    /// Why the rig could not run at all, if it could not.
    rig_error: Option<String>,
}

enum Rig {
    Absent(String),
    Ran(Run),
}

static RIG: OnceLock<Rig> = OnceLock::new();

/// Print to the test binary's real stderr: the harness captures `eprintln!` of
/// passing tests, but a skipped rig, a known failure and the rig's timings must show.
macro_rules! loud {
    ($($t:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stderr().lock(), $($t)*);
    }};
}

fn here() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/nfs")
}

fn kernel() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir("/boot")
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-") && n.ends_with("-amd64"))
        })
        .collect();
    found.sort();
    found.pop()
}

fn vng() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("LABFS_VNG") {
        return Some(PathBuf::from(p));
    }
    let ci = PathBuf::from("/var/tmp/labfs-vng/bin/vng");
    if ci.exists() {
        return Some(ci);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("vng"))
        .find(|p| p.exists())
}

fn which(cmd: &str) -> bool {
    ["/usr/bin", "/usr/sbin", "/bin", "/sbin"]
        .iter()
        .any(|d| Path::new(d).join(cmd).exists())
}

/// What is missing for the rig, if anything.
fn missing() -> Vec<String> {
    let mut m = Vec::new();
    if kernel().is_none() {
        m.push("/boot/vmlinuz-*-amd64 (apt: linux-image-amd64)".to_string());
    }
    if vng().is_none() {
        m.push("vng (PyPI: virtme-ng)".to_string());
    }
    for (cmd, pkg) in [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("rpc.nfsd", "nfs-kernel-server"),
        ("iptables", "iptables"),
        ("busybox", "busybox-static"),
    ] {
        if !which(cmd) {
            m.push(format!("{cmd} (apt: {pkg})"));
        }
    }
    m
}

/// The scenario names, in the order scenarios.sh runs them.
fn scenario_names() -> Vec<String> {
    let text = fs::read_to_string(here().join("scenarios.sh")).unwrap_or_default();
    let Some(start) = text.find("SCENARIOS=\"") else {
        return Vec::new();
    };
    let rest = &text[start + "SCENARIOS=\"".len()..];
    let end = rest.find('"').unwrap_or(0);
    rest[..end].split_whitespace().map(String::from).collect()
}

fn boot_and_run() -> Rig {
    let missing = missing();
    if !missing.is_empty() {
        let msg = format!(
            "the NFS rig cannot run: missing {}; `bash .ci/run` installs them",
            missing.join(", ")
        );
        return Rig::Absent(msg);
    }
    let (Some(kernel), Some(vng)) = (kernel(), vng()) else {
        return Rig::Absent("no kernel or vng".into());
    };
    let dir = match tempfile::Builder::new()
        .prefix("labfs-nfs-rig.")
        .tempdir_in("/var/tmp")
    {
        Ok(d) => d.keep(),
        Err(e) => {
            return Rig::Ran(Run {
                dir: PathBuf::new(),
                results: BTreeMap::new(),
                rig_error: Some(format!("cannot create the results directory: {e}")),
            })
        }
    };
    let guest = here().join("guest.sh");
    let exec = format!(
        "bash {} {} {}",
        guest.display(),
        dir.display(),
        Path::new(LABFS).display()
    );
    let mut path = std::env::var_os("PATH").unwrap_or_default();
    if let Some(bin) = vng.parent() {
        let mut p = std::env::split_paths(&path).collect::<Vec<_>>();
        p.insert(0, bin.to_path_buf());
        path = std::env::join_paths(p).unwrap_or(path);
    }
    loud!(
        "NFS rig: booting {} under qemu (TCG), results in {}",
        kernel.display(),
        dir.display()
    );
    let t0 = Instant::now();
    let console = fs::File::create(dir.join("console.log"));
    let mut cmd = Command::new(&vng);
    cmd.arg("--run")
        .arg(&kernel)
        .args(["--disable-kvm", "--cpus", "2", "--memory", "2G", "--rwdir"])
        .arg(&dir)
        .arg("--exec")
        .arg(&exec)
        .env("PATH", path)
        .current_dir(&dir)
        .stdin(Stdio::null());
    if let Ok(c) = console {
        if let Ok(c2) = c.try_clone() {
            cmd.stdout(c).stderr(c2);
        }
    }
    let rig_error = match cmd.spawn() {
        Err(e) => Some(format!("cannot start {}: {e}", vng.display())),
        Ok(mut child) => loop {
            match child.try_wait() {
                Ok(Some(_)) => break None,
                Ok(None) if t0.elapsed() > GROUP_TIMEOUT => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break Some(format!("the VM did not finish within {GROUP_TIMEOUT:?}"));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(500)),
                Err(e) => break Some(format!("waiting for the VM: {e}")),
            }
        },
    };
    let total = t0.elapsed().as_secs_f64();
    let mut results = BTreeMap::new();
    for name in scenario_names() {
        if let Ok(r) = fs::read_to_string(dir.join(format!("{name}.result"))) {
            results.insert(name, r.lines().next().unwrap_or("").to_string());
        }
    }
    let rig_error = rig_error
        .or_else(|| fs::read_to_string(dir.join("rig.failed")).ok())
        .or_else(|| {
            (!dir.join("done").exists()).then(|| "the VM ended before the group finished".into())
        });
    let times = fs::read_to_string(dir.join("rig.times")).unwrap_or_default();
    let done = fs::read_to_string(dir.join("done")).unwrap_or_default();
    let num = |s: &str| s.trim().parse::<f64>().ok();
    let mut it = times.split_whitespace();
    if let (Some(start), Some(ready), Some(end)) = (
        it.next().and_then(num),
        it.next().and_then(num),
        num(done.as_str()),
    ) {
        loud!(
            "NFS rig: {total:.0} s in all; in the guest: NFS set up in {:.1} s, scenarios ran {:.0} s; \
             boot (qemu start to guest script) ~{:.0} s",
            ready - start,
            end - ready,
            total - (end - start)
        );
    } else {
        loud!("NFS rig: {total:.0} s in all");
    }
    for (n, r) in &results {
        loud!("NFS rig: {n}: {r}");
    }
    Rig::Ran(Run {
        dir,
        results,
        rig_error,
    })
}

fn log_of(dir: &Path, name: &str) -> String {
    let mut s = fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
    if let Ok(entries) = fs::read_dir(dir) {
        let mut logs: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                    n.starts_with(&format!("{name}-")) && n.ends_with(".daemon.log")
                })
            })
            .collect();
        logs.sort();
        for l in logs {
            let text = fs::read_to_string(&l).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(60).collect();
            s.push_str(&format!("\n--- {} (last 60 lines) ---\n", l.display()));
            for line in tail.into_iter().rev() {
                s.push_str(line);
                s.push('\n');
            }
        }
    }
    s
}

fn scenario(name: &str) {
    assert!(
        scenario_names().iter().any(|n| n == name),
        "{name} is not listed in tests/nfs/scenarios.sh"
    );
    let rig = RIG.get_or_init(boot_and_run);
    let run = match rig {
        Rig::Absent(msg) => {
            if std::env::var("LABFS_NFS_RIG").is_ok_and(|v| v == "required") {
                panic!("{msg} (LABFS_NFS_RIG=required)");
            }
            loud!("\n!!!!! SKIPPED NFS scenario {name}: {msg} !!!!!\n");
            return;
        }
        Rig::Ran(run) => run,
    };
    let result = run.results.get(name).cloned();
    let ok = result.as_deref() == Some("PASS");
    let known = KNOWN_FAILING.iter().find(|(n, _)| *n == name);
    if let Some((_, why)) = known {
        assert!(
            !ok,
            "NFS scenario {name} passes now: remove it from KNOWN_FAILING in tests/nfs/mod.rs"
        );
        if result.as_deref().is_some_and(|r| r.starts_with("FAIL")) && run.rig_error.is_none() {
            loud!(
                "\n!!!!! KNOWN FAILING NFS scenario {name}: {} ({why}); log: {} !!!!!\n",
                result.as_deref().unwrap_or(""),
                run.dir.join(format!("{name}.log")).display()
            );
            return;
        }
    }
    if !ok {
        let rig = fs::read_to_string(run.dir.join("rig.log")).unwrap_or_default();
        let console = fs::read_to_string(run.dir.join("console.log")).unwrap_or_default();
        let tail = |s: &str| {
            s.lines()
                .rev()
                .take(40)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        };
        panic!(
            "NFS scenario {name}: {}\n{}\n--- scenario log ({}) ---\n{}\n--- rig.log (tail) ---\n{}\n--- console (tail) ---\n{}",
            result.as_deref().unwrap_or("no result"),
            run.rig_error.as_deref().unwrap_or(""),
            run.dir.display(),
            log_of(&run.dir, name),
            tail(&rig),
            tail(&console),
        );
    }
}

macro_rules! scenarios {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                scenario(&stringify!($name)["nfs_".len()..]);
            }
        )*
        /// Every scenario of scenarios.sh has a test here, and the other way round.
        #[test]
        fn nfs_every_scenario_has_a_test() {
            let ours: Vec<&str> = vec![$(&stringify!($name)["nfs_".len()..]),*];
            let mut theirs = scenario_names();
            theirs.sort();
            let mut ours: Vec<String> = ours.into_iter().map(String::from).collect();
            ours.sort();
            assert_eq!(ours, theirs, "tests/nfs/mod.rs and tests/nfs/scenarios.sh disagree");
        }
    };
}

scenarios!(
    nfs_promote_tree_v42,
    nfs_promote_tree_v3,
    nfs_tags_xattr_v42_store_v3,
    nfs_root_squash_detected_and_promote_refused,
    nfs_failed_promote_leaves_nothing,
    nfs_crash_recovery_v42,
    nfs_silly_rename_hidden,
    nfs_open_unlinked_file,
    nfs_estale_passed_through,
    nfs_hung_server,
    nfs_soft_mount_hung_server_v3,
    nfs_soft_mount_hung_server_v42,
    nfs_export_not_mounted_refused,
    nfs_two_nodes_staleness,
    nfs_concurrent_promotes,
);
