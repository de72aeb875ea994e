//! Fail-closed over FUSE-over-io_uring (src/fuse/ring.rs): Atlas requests answered from
//! the lane hold their queue entry until answered, and the kernel serves a caller only
//! from its own CPU's queue, so the worst case is many stuck Atlas callers and local
//! callers on one CPU. Those local requests must still be answered within their bound.

use super::*;

#[test]
fn a_frozen_atlas_does_not_stall_local_requests_on_the_same_cpus_queue() {
    if !kernel_enables_uring() {
        eprintln!("enable_uring is not Y: the io_uring pass of .ci/run runs this test");
        return;
    }
    let mut lab = FrozenLab::new(false);
    let mut cfg = fs::read_to_string(&lab.cfg).unwrap();
    cfg.push_str("\n[fuse]\ntransport = \"uring\"\n");
    fs::write(&lab.cfg, cfg).unwrap();
    lab.mount();
    // The transport, and requests seen over the rings, from `labfs status` (not timed:
    // the bound here is on the local requests below).
    let seen = |lab: &FrozenLab| {
        let out = lab.cmd(r#""$LABFS" status --json "$LAB""#).status();
        let v: serde_json::Value = serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("status JSON: {e}\n{}", out.stdout));
        let t = &v["fuse_transport"];
        assert_eq!(t["in_use"], "io_uring", "{t:#}");
        t["requests_io_uring"].as_u64().unwrap_or(0)
    };
    seen(&lab);
    lab.cmd(
        r#"mkdir -p "$LAB/docs" "$LAB/cache"
           for i in $(seq 1 40); do echo $i > "$LAB/docs/f$i"; done
           echo c > "$LAB/cache/c""#,
    )
    .ok();
    let before = seen(&lab);
    lab.freeze();
    // 40 stuck Atlas callers, all on CPU 0: 40 entries of queue 0 held by the lane.
    let mut stuck: Vec<Bg> = (1..=40)
        .map(|i| {
            lab.cmd(&format!(
                r#"exec taskset -c 0 cat "$LAB/docs/f{i}" >/dev/null"#
            ))
            .spawn()
        })
        .collect();
    // Every stuck open has reached the daemon (a status request is one more each).
    let deadline = Instant::now() + TIMEOUT;
    while seen(&lab) < before + 40 {
        assert!(Instant::now() < deadline, "the stuck opens never arrived");
        thread::sleep(Duration::from_millis(20));
    }
    // Local callers on the same CPU are still answered within their bound.
    lab.local_ok(r#"taskset -c 0 cat "$LAB/cache/c" >/dev/null"#);
    lab.local_ok(r#"taskset -c 0 sh -c 'echo d > "$LAB/cache/d" && ls "$LAB/cache" >/dev/null && rm "$LAB/cache/d"'"#);
    for b in &mut stuck {
        assert!(
            b.wait_timeout(FAIL_BOUND + TIMEOUT).is_some(),
            "a stuck cat was never answered"
        );
    }
    lab.thaw();
    lab.local_ok(
        r#"taskset -c 0 sh -c 'echo e > "$LAB/cache/e" && cat "$LAB/cache/e" >/dev/null'"#,
    );
    assert!(!lab.local.join("docs").exists());
}
