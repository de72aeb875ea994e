//! FUSE transports (src/fuse/ring.rs): over io_uring the requests are really answered
//! over the rings (the status counters say so), `auto` follows the fuse module's
//! `enable_uring`, `devfuse` never uses the rings, `uring` refuses to mount where the
//! kernel does not allow it, and a `tar x` round trip over io_uring compares equal.
//!
//! Which branch a test takes depends on the machine's `enable_uring`: each branch
//! asserts what that setting must give. `.ci/run` runs the suite twice, the second time
//! with `enable_uring=Y` and `LABFS_TEST_TRANSPORT=uring`, so both are exercised.

use crate::common::*;

fn transport(lab: &MountedLab) -> serde_json::Value {
    let out = Sh::program(
        LABFS,
        &["status", "--json", &lab.mnt().display().to_string()],
    )
    .ok();
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("status JSON: {e}\n{out}"));
    v["fuse_transport"].clone()
}

fn count(t: &serde_json::Value, key: &str) -> u64 {
    t[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no {key} in {t:#}"))
}

fn possible_cpus() -> u64 {
    let s = std::fs::read_to_string("/sys/devices/system/cpu/possible").expect("possible cpus");
    let last = s.trim().rsplit(['-', ',']).next().expect("a cpu list");
    last.parse::<u64>().expect("a cpu number") + 1
}

/// Creates, stats, lists and removes `n` files on each backend.
fn work(lab: &MountedLab, n: usize) {
    lab.sh(&format!(
        r#"mkdir -p "$LAB/docs/w" "$LAB/cache/w"
           for d in "$LAB/docs/w" "$LAB/cache/w"; do
             for i in $(seq 1 {n}); do echo $i > "$d/f$i"; done
             stat "$d"/f* >/dev/null
             test "$(ls "$d" | wc -l)" = {n}
             rm "$d"/f*
           done"#
    ));
}

fn lab_with(transport: &str) -> LabBuilder {
    MountedLab::builder().env("LABFS_FUSE_TRANSPORT", transport)
}

#[test]
fn uring_serves_every_request_over_the_rings_or_refuses_to_mount() {
    if !kernel_enables_uring() {
        let f = match lab_with("uring").try_mount() {
            Ok(_) => panic!("transport uring mounted although enable_uring is not Y"),
            Err(f) => f,
        };
        assert!(
            f.log.contains("enable_uring"),
            "the refusal does not say why: {f:?}"
        );
        return;
    }
    let lab = lab_with("uring").mount();
    let before = transport(&lab);
    assert_eq!(before["in_use"], "io_uring", "{before:#}");
    assert_eq!(before["configured"], "uring", "{before:#}");
    assert_eq!(count(&before, "queues"), possible_cpus(), "{before:#}");
    work(&lab, 200);
    let after = transport(&lab);
    let ring = count(&after, "requests_io_uring") - count(&before, "requests_io_uring");
    let dev = count(&after, "requests_devfuse") - count(&before, "requests_devfuse");
    // 400 creates alone are 400 requests; /dev/fuse still carries FORGETs only.
    assert!(
        ring >= 400,
        "{ring} requests over io_uring for 400 files: {after:#}"
    );
    assert!(
        dev < ring / 4,
        "{dev} over /dev/fuse, {ring} over io_uring: {after:#}"
    );
    assert!(
        lab.daemon_log().contains("FUSE transport: io_uring"),
        "{}",
        lab.daemon_log()
    );
}

/// The daemon's resident memory in KiB.
fn rss_kib(lab: &MountedLab) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{}/status", lab.pid())).expect("status");
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in {s}"))
}

#[test]
fn the_queues_buffers_become_resident_only_as_requests_use_them() {
    if !kernel_enables_uring() {
        eprintln!("skipped: enable_uring is not Y (the io_uring pass of .ci/run runs it)");
        return;
    }
    // Every possible CPU's queue has 128 entries of a 1 MiB payload buffer: address
    // space, not memory. A 4 KiB-aligned zeroed allocation once made all of it resident
    // at mount (265 MiB on 2 CPUs).
    let lab = lab_with("uring").mount();
    work(&lab, 200);
    lab.sh(r#"head -c 8388608 /dev/zero > "$LAB/docs/big" && cat "$LAB/docs/big" > /dev/null"#);
    let rss = rss_kib(&lab);
    assert!(
        rss < 64 * 1024,
        "daemon RSS {rss} KiB over io_uring after a small workload"
    );
}

#[test]
fn auto_follows_the_fuse_modules_enable_uring() {
    let lab = lab_with("auto").mount();
    work(&lab, 50);
    let t = transport(&lab);
    assert_eq!(t["configured"], "auto", "{t:#}");
    if kernel_enables_uring() {
        assert_eq!(t["in_use"], "io_uring", "{t:#}");
        assert!(count(&t, "requests_io_uring") >= 100, "{t:#}");
    } else {
        assert_eq!(t["in_use"], "/dev/fuse", "{t:#}");
        assert!(
            t["why"]
                .as_str()
                .is_some_and(|w| w.contains("enable_uring")),
            "{t:#}"
        );
        assert_eq!(count(&t, "requests_io_uring"), 0, "{t:#}");
        assert!(count(&t, "requests_devfuse") >= 100, "{t:#}");
        assert_eq!(count(&t, "queues"), 0, "{t:#}");
    }
    let log = lab.daemon_log();
    assert!(
        log.contains(&format!(
            "FUSE transport: {}",
            t["in_use"].as_str().unwrap_or("?")
        )),
        "{log}"
    );
}

#[test]
fn devfuse_never_uses_the_rings() {
    let lab = lab_with("devfuse").mount();
    work(&lab, 50);
    let t = transport(&lab);
    assert_eq!(t["in_use"], "/dev/fuse", "{t:#}");
    assert_eq!(count(&t, "requests_io_uring"), 0, "{t:#}");
    assert_eq!(count(&t, "queues"), 0, "{t:#}");
    assert!(count(&t, "requests_devfuse") >= 100, "{t:#}");
}

#[test]
fn a_bad_transport_is_refused_at_mount() {
    let f = match lab_with("carrier-pigeon").try_mount() {
        Ok(_) => panic!("an unknown transport mounted"),
        Err(f) => f,
    };
    assert!(f.log.contains("LABFS_FUSE_TRANSPORT"), "{f:?}");
}

/// A tree with small files, a file larger than one ring payload (1 MiB), a sparse file,
/// symlinks, a hard link, modes and mtimes, packed with tar and unpacked into the mount.
#[test]
fn tar_x_round_trip_over_io_uring_compares_equal() {
    if !kernel_enables_uring() {
        eprintln!("enable_uring is not Y: the io_uring pass of .ci/run runs this test");
        return;
    }
    let lab = lab_with("uring").mount();
    lab.sh(
        r#"S="$SCRATCH/src"; mkdir -p "$S/a/b" "$S/c"
           for i in $(seq 1 300); do echo "file $i" > "$S/a/f$i"; done
           head -c 3145728 /dev/urandom > "$S/b.bin"
           truncate -s 5M "$S/c/sparse"; printf x | dd of="$S/c/sparse" bs=1 seek=4000000 conv=notrunc status=none
           ln -s ../../b.bin "$S/a/b/link"; ln "$S/a/f1" "$S/c/hard"
           chmod 0750 "$S/a/b"; chmod 0604 "$S/a/f2"
           touch -h -d '2020-01-02 03:04:05' "$S/a/f3" "$S/a/b/link"
           tar -C "$S" -cf "$SCRATCH/t.tar" .
           for d in docs cache; do
             mkdir -p "$LAB/$d/x" && tar -C "$LAB/$d/x" -xpf "$SCRATCH/t.tar"
           done"#,
    );
    // Compared with the same archive unpacked natively (tar keeps whole-second
    // mtimes); directories without their size, which is the backend's own.
    lab.sh(r#"mkdir "$SCRATCH/ref" && tar -C "$SCRATCH/ref" -xpf "$SCRATCH/t.tar""#);
    let meta = |dir: &str| {
        lab.sh(&format!(
            r#"cd "{dir}" && find . -mindepth 1 \( -type d -printf '%p d %m %U:%G %T@\n' \) -o -printf '%p %y %m %U:%G %T@ %s %n %l\n' | sort"#
        ))
    };
    let reference = lab.scratch_path("ref").display().to_string();
    let expected = meta(&reference);
    assert!(expected.contains("./b.bin f 644"), "{expected}");
    for d in ["docs", "cache"] {
        let inside = lab.path(&format!("{d}/x")).display().to_string();
        lab.sh(&format!(r#"diff -r "{reference}" "{inside}""#));
        assert_eq!(meta(&inside), expected, "tree in /{d} differs");
    }
    let t = transport(&lab);
    assert_eq!(t["in_use"], "io_uring", "{t:#}");
    assert!(count(&t, "requests_io_uring") >= 600, "{t:#}");
    // Unmounting ends the queues with the connection, and the daemon exits 0.
    let mut lab = lab;
    let st = lab.unmount_status();
    assert!(st.success(), "daemon exit: {st:?}\n{}", lab.daemon_log());
    assert!(
        !lab.daemon_log().contains("did not end with the connection"),
        "{}",
        lab.daemon_log()
    );
}
