//! Close-to-open caching of Atlas files: the kernel keeps a file's cached pages across
//! opens while Atlas shows the same version (object, size, mtime, ctime) as at the
//! previous open, and drops them at the first open after anyone changed the file,
//! as the NFS client does. And how open Atlas files are served: kernel passthrough
//! where the Atlas backend bounds its own failures (here: tmpfs), the daemon elsewhere
//! or when `[atlas] file_io = "daemon"` says so (src/fs/atlas_io.rs).

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::*;

fn atlas_requests(mnt: &Path) -> u64 {
    let out = Sh::program(LABFS, &["status", "--json", &mnt.display().to_string()]).ok();
    let v: serde_json::Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("status --json is not JSON ({e}):\n{out}"));
    v["stats"]["atlas"]["requests"]
        .as_u64()
        .unwrap_or_else(|| panic!("no stats.atlas.requests in {v}"))
}

fn status_json(mnt: &Path) -> serde_json::Value {
    let out = Sh::program(LABFS, &["status", "--json", &mnt.display().to_string()]).ok();
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json is not JSON ({e}):\n{out}"))
}

/// A lab whose open Atlas files go through the daemon (`[atlas] file_io = "daemon"`).
fn daemon_path_lab() -> MountedLab {
    let lab = MountedLab::builder()
        .rules(&format!("[atlas]\nfile_io = \"daemon\"\n{DEFAULT_RULES}"))
        .mount();
    lab.sh(r#"mkdir "$LAB/docs" "$LAB/cache""#);
    assert_eq!(status_json(lab.mnt())["atlas_file_io"]["mode"], "daemon");
    lab
}

/// Requests the daemon's Atlas lane served while `cat` read `p` once.
fn requests_to_read(lab: &MountedLab, p: &Path, expect: &[u8]) -> u64 {
    let before = atlas_requests(lab.mnt());
    let got = fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    assert!(got == expect, "{} read back other bytes", p.display());
    atlas_requests(lab.mnt()) - before
}

#[test]
fn unchanged_atlas_file_is_read_from_the_page_cache_at_the_next_open() {
    let lab = daemon_path_lab();
    let p = lab.path("docs/big.dat");
    let data: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
    fs::write(&p, &data).expect("write through labfs");
    // The first open after the write finds a new version: the kernel drops its pages
    // and the reads go to the daemon.
    let first = requests_to_read(&lab, &p, &data);
    // Nothing changed since that open: the next ones are served from the page cache
    // (open, flush and release still reach the daemon; no READ does).
    let second = requests_to_read(&lab, &p, &data);
    let third = requests_to_read(&lab, &p, &data);
    assert!(
        second + 8 <= first && third + 8 <= first,
        "4 MiB read again from an unchanged Atlas file took {second} and {third} Atlas requests, the first read {first}: the page cache was not kept"
    );
}

#[test]
fn atlas_file_changed_behind_labfs_is_read_anew_at_the_next_open() {
    for lab in [daemon_path_lab(), MountedLab::with_dirs()] {
        changed_behind_labfs_is_read_anew(&lab);
    }
}

fn changed_behind_labfs_is_read_anew(lab: &MountedLab) {
    let p = lab.path("docs/f.txt");
    let behind = lab.atlas_path("docs/f.txt");
    let a = vec![b'a'; 64 << 10];
    let b = vec![b'b'; 64 << 10];
    fs::write(&p, &a).expect("write through labfs");
    // Read twice, so the second open keeps the cache and the pages hold "a".
    assert!(fs::read(&p).expect("read") == a);
    assert!(fs::read(&p).expect("read") == a);
    // Another node rewrites it in place: same size, and the mtime put back as rsync
    // or tar would; only the ctime tells.
    lab.sh(&format!(
        r#"touch -r "{f}" "$SCRATCH/ref"
           head -c 65536 /dev/zero | tr '\0' b | dd of="{f}" conv=notrunc status=none
           touch -m -r "$SCRATCH/ref" "{f}""#,
        f = behind.display()
    ));
    assert_eq!(fs::metadata(&behind).expect("stat").len(), 64 << 10);
    assert!(
        fs::read(&p).expect("read after the change") == b,
        "an open after another node rewrote the file served the old cached bytes"
    );
    // Grown behind labfs's back, with the same mtime.
    lab.sh(&format!(
        r#"head -c 100 /dev/zero | tr '\0' c >> "{f}"; touch -m -r "$SCRATCH/ref" "{f}""#,
        f = behind.display()
    ));
    let mut grown = b.clone();
    grown.extend_from_slice(&[b'c'; 100]);
    assert!(
        fs::read(&p).expect("read after growth") == grown,
        "an open after the file grew on Atlas did not see the new bytes"
    );
}

/// Requests the daemon's Atlas lane served while `dir` was listed once; the names.
fn requests_to_list(lab: &MountedLab, dir: &Path) -> (u64, Vec<String>) {
    let before = atlas_requests(lab.mnt());
    let got = names(dir);
    (atlas_requests(lab.mnt()) - before, got)
}

#[test]
fn unchanged_atlas_directory_is_listed_from_the_kernel_cache_and_a_change_shows() {
    let lab = MountedLab::with_dirs();
    let dir = lab.path("docs/many");
    fs::create_dir(&dir).expect("mkdir");
    for i in 0..2000 {
        fs::write(dir.join(format!("f{i:05}")), b"x").expect("create");
    }
    let (_, first) = requests_to_list(&lab, &dir);
    assert_eq!(first.len(), 2000);
    // Unchanged since the previous opendir: no READDIRPLUS (2,000 entries take ~12).
    let (r2, second) = requests_to_list(&lab, &dir);
    let (r3, third) = requests_to_list(&lab, &dir);
    assert_eq!(second, first);
    assert_eq!(third, first);
    assert!(
        r2 <= 4 && r3 <= 4,
        "listing an unchanged Atlas directory took {r2} and {r3} Atlas requests"
    );
    // Another node adds a name on Atlas: the next listing shows it.
    fs::write(lab.atlas_path("docs/many/zz-from-elsewhere"), b"y").expect("write behind");
    let (_, after) = requests_to_list(&lab, &dir);
    assert_eq!(
        after.len(),
        2001,
        "a name created on Atlas by another node is not listed"
    );
    assert!(after.iter().any(|n| n == "zz-from-elsewhere"));
    // And one removed there disappears.
    fs::remove_file(lab.atlas_path("docs/many/f00000")).expect("remove behind");
    let (_, after) = requests_to_list(&lab, &dir);
    assert_eq!(after.len(), 2000);
    assert!(!after.iter().any(|n| n == "f00000"));
}

/// Names read from an open directory stream, from its current position to the end.
fn read_stream(dir: *mut libc::DIR) -> Vec<String> {
    let mut out = Vec::new();
    loop {
        // SAFETY: `dir` is a live DIR*; errno is reset to tell the end from an error.
        unsafe { *libc::__errno_location() = 0 };
        let ent = unsafe { libc::readdir64(dir) };
        if ent.is_null() {
            let err = std::io::Error::last_os_error();
            assert_eq!(err.raw_os_error(), Some(0), "readdir failed: {err}");
            break;
        }
        // SAFETY: a valid dirent64 until the next readdir.
        let name = unsafe { std::ffi::CStr::from_ptr((*ent).d_name.as_ptr()) };
        let name = name.to_string_lossy().into_owned();
        if name != "." && name != ".." {
            out.push(name);
        }
    }
    out.sort();
    out
}

#[test]
fn rewinddir_after_reading_to_the_end_lists_the_directory_as_it_is_now() {
    let lab = MountedLab::with_dirs();
    for b in BOTH {
        let rel = format!("{}/rd", b.dir());
        let d = lab.path(&rel);
        fs::create_dir(&d).expect("mkdir");
        fs::write(d.join("a"), b"1").expect("create a");
        fs::write(d.join("b"), b"1").expect("create b");
        let c = std::ffi::CString::new(d.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: a valid path; the stream is closed below.
        let dir = unsafe { libc::opendir(c.as_ptr()) };
        assert!(!dir.is_null(), "opendir {}", d.display());
        assert_eq!(read_stream(dir), ["a", "b"], "{}: first pass", b.name());
        // Changed while the stream is open, at its end.
        fs::write(d.join("c"), b"1").expect("create c");
        fs::remove_file(d.join("a")).expect("unlink a");
        // SAFETY: live stream.
        unsafe { libc::rewinddir(dir) };
        let again = read_stream(dir);
        // And once more without a change: the same.
        unsafe { libc::rewinddir(dir) };
        let third = read_stream(dir);
        // SAFETY: closing the stream opened above.
        unsafe { libc::closedir(dir) };
        assert_eq!(
            again,
            ["b", "c"],
            "{}: after rewinddir the listing still showed the directory as it was at opendir",
            b.name()
        );
        assert_eq!(third, ["b", "c"], "{}: second rewind", b.name());
        // A fresh listing agrees (and the kernel's cached listing is not stale either).
        assert_eq!(names(&d), ["b", "c"], "{}: fresh opendir", b.name());
    }
}

#[test]
fn capability_queries_for_files_created_here_skip_atlas_and_setcap_still_shows() {
    // A long Atlas TTL, so neither entries nor the records expire while counting.
    let lab = MountedLab::builder()
        .rules(&format!("[cache]\natlas_ttl = \"60s\"\n{DEFAULT_RULES}"))
        .mount();
    lab.sh(r#"mkdir -p "$LAB/docs/here" "$LAB/docs/behind" "$LAB/cache/c""#);
    let n = 100;
    lab.sh(&format!(
        r#"for i in $(seq {n}); do : > "$LAB/docs/here/f$i"; : > "{behind}/f$i"; done
           ls -l "$LAB/docs/behind" >/dev/null; stat "$LAB/docs/behind/"* >/dev/null"#,
        behind = lab.atlas_path("docs/behind").display()
    ));
    // Before the first write and at every chown the kernel asks for
    // security.capability: for files created through this mount it is answered
    // without the Atlas lane, for the others it is an Atlas request.
    let touch = |dir: &str| {
        let before = atlas_requests(lab.mnt());
        lab.sh(&format!(
            r#"for f in "$LAB/{dir}/"*; do echo y >> "$f"; chown 1000 "$f"; done"#
        ));
        atlas_requests(lab.mnt()) - before
    };
    let here = touch("docs/here");
    let behind = touch("docs/behind");
    assert!(
        here + n <= behind,
        "writing and chowning {n} files created here took {here} Atlas requests, {behind} for files created behind labfs: the capability queries still reach Atlas"
    );
    // A capability set through the mount shows at once, and a write drops it, on both
    // backends.
    for f in ["docs/here/f1", "cache/c/f"] {
        let p = lab.path(f);
        lab.sh(&format!(
            r#"echo x > "{p}"; setcap cap_net_raw+ep "{p}""#,
            p = p.display()
        ));
        let got = lab.sh(&format!(r#"getcap "{}""#, p.display()));
        assert!(
            got.contains("cap_net_raw"),
            "{f}: getcap after setcap: {got:?}"
        );
        lab.sh(&format!(r#"echo more >> "{}""#, p.display()));
        let got = lab.sh(&format!(r#"getcap "{}""#, p.display()));
        assert!(
            !got.contains("cap_net_raw"),
            "{f}: a write kept the file capability: {got:?}"
        );
    }
}

#[test]
fn capability_set_on_atlas_by_another_node_shows_once_atlas_ttl_ends() {
    let lab = MountedLab::builder()
        .rules(&format!("[cache]\natlas_ttl = \"200ms\"\n{DEFAULT_RULES}"))
        .mount();
    lab.sh(r#"mkdir -p "$LAB/docs"; echo x > "$LAB/docs/f""#);
    // Another node sets a capability on the file this node just created.
    lab.sh(&format!(
        r#"setcap cap_net_raw+ep "{}""#,
        lab.atlas_path("docs/f").display()
    ));
    let p = lab.path("docs/f");
    let start = std::time::Instant::now();
    wait_until(
        "getcap through the mount shows the capability set on Atlas",
        std::time::Duration::from_secs(10),
        || {
            lab.sh(&format!(r#"getcap "{}""#, p.display()))
                .contains("cap_net_raw")
        },
    );
    // The documented window: atlas_ttl (plus this host's scheduling).
    assert!(
        start.elapsed() < std::time::Duration::from_secs(5),
        "the capability took {:?} to show (atlas_ttl 200 ms)",
        start.elapsed()
    );
}

#[test]
fn plain_readdir_numbers_match_stat() {
    use std::os::unix::fs::{DirEntryExt, MetadataExt};
    let lab = MountedLab::with_dirs();
    for b in BOTH {
        let d = lab.path(&format!("{}/many", b.dir()));
        fs::create_dir(&d).expect("mkdir");
        // Far more than one READDIRPLUS batch, so most entries come by plain READDIR.
        for i in 0..3000 {
            fs::write(d.join(format!("f{i:05}")), b"x").expect("create");
        }
        fs::create_dir(d.join("sub")).expect("mkdir sub");
        fs::hard_link(d.join("f00000"), d.join("zlink")).expect("link");
        // Listed whole first (no stat in between), then compared.
        let listed: Vec<(String, u64)> = fs::read_dir(&d)
            .expect("read_dir")
            .map(|e| {
                let e = e.expect("entry");
                (e.file_name().to_string_lossy().into_owned(), e.ino())
            })
            .collect();
        assert_eq!(listed.len(), 3002, "{}: entries listed", b.name());
        for (name, ino) in &listed {
            let st = fs::symlink_metadata(d.join(name)).expect("lstat");
            assert_eq!(
                *ino,
                st.ino(),
                "{}: readdir's d_ino of {name} differs from its st_ino",
                b.name()
            );
        }
    }
}

#[test]
fn atlas_files_on_a_local_filesystem_pass_through_the_kernel_by_default() {
    let lab = MountedLab::with_dirs();
    let io = &status_json(lab.mnt())["atlas_file_io"];
    assert_eq!(io["mode"], "passthrough", "{io}");
    assert!(
        io["why"].as_str().is_some_and(|w| w.contains("tmpfs")),
        "{io}"
    );
    let text = Sh::program(LABFS, &["status", &lab.mnt().display().to_string()]).ok();
    assert!(
        text.contains("open Atlas files: kernel passthrough"),
        "{text}"
    );
    // 1,024 writes of 4 KiB and a read of it all: the daemon sees the open, flush,
    // fsync and release, not one request per write.
    let p = lab.path("docs/pt.dat");
    let before = atlas_requests(lab.mnt());
    let mut f = fs::File::create(&p).expect("create");
    for i in 0..1024u32 {
        f.write_all(&[(i % 251) as u8; 4096]).expect("write");
    }
    f.sync_all().expect("fsync");
    drop(f);
    let back = fs::read(&p).expect("read");
    let used = atlas_requests(lab.mnt()) - before;
    assert_eq!(back.len(), 4 << 20);
    assert!(back
        .chunks(4096)
        .enumerate()
        .all(|(i, c)| c[0] == (i % 251) as u8));
    assert!(
        used < 64,
        "writing and reading 4 MiB of an Atlas file took {used} Atlas requests: not passed through"
    );
    assert_eq!(
        fs::read(lab.atlas_path("docs/pt.dat")).expect("read on Atlas"),
        back,
        "Atlas holds other bytes"
    );
}

#[test]
fn file_io_daemon_sends_every_atlas_write_through_the_daemon() {
    let lab = daemon_path_lab();
    let p = lab.path("docs/d.dat");
    let before = atlas_requests(lab.mnt());
    let mut f = fs::File::create(&p).expect("create");
    for _ in 0..256 {
        f.write_all(&[7u8; 4096]).expect("write");
    }
    f.sync_all().expect("fsync");
    drop(f);
    let used = atlas_requests(lab.mnt()) - before;
    assert!(
        used >= 256,
        "256 writes of an Atlas file with file_io = \"daemon\" took only {used} Atlas requests"
    );
    assert_eq!(
        fs::read(lab.atlas_path("docs/d.dat")).expect("read").len(),
        1 << 20
    );
}

/// `tail -f` of a log another node appends to: the open descriptor sees the new size
/// (fstat) and reads the new bytes, whichever way open Atlas files are served.
#[test]
fn an_open_atlas_file_grown_by_another_node_shows_its_new_size_and_bytes() {
    for lab in [daemon_path_lab(), MountedLab::with_dirs()] {
        let mode = status_json(lab.mnt())["atlas_file_io"]["mode"].clone();
        fs::write(lab.path("docs/app.log"), b"one\n").expect("write");
        let mut f = fs::File::open(lab.path("docs/app.log")).expect("open");
        let mut got = String::new();
        f.read_to_string(&mut got).expect("read");
        assert_eq!(got, "one\n");
        // Another node appends on Atlas, not through this mount.
        let mut other = fs::OpenOptions::new()
            .append(true)
            .open(lab.atlas_path("docs/app.log"))
            .expect("open on Atlas");
        other.write_all(b"two\n").expect("append on Atlas");
        drop(other);
        // tail -f polls fstat; the size shows within the attribute TTL (1 s).
        let deadline = Instant::now() + Duration::from_secs(10);
        while f.metadata().expect("fstat").len() < 8 {
            assert!(
                Instant::now() < deadline,
                "{mode}: the open file still shows size {} 10 s after another node grew it",
                f.metadata().map(|m| m.len()).unwrap_or(0)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        f.seek(SeekFrom::Start(4)).expect("seek");
        let mut more = String::new();
        f.read_to_string(&mut more).expect("read the new bytes");
        assert_eq!(more, "two\n", "{mode}: the appended bytes");
    }
}

/// Time the daemon's Atlas lane threads (`atlas-N`) have run, nanoseconds.
fn atlas_lane_cpu_ns(pid: u32) -> u64 {
    let mut total = 0;
    let tasks = fs::read_dir(format!("/proc/{pid}/task")).expect("daemon tasks");
    for t in tasks.flatten() {
        let comm = fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let comm = comm.trim();
        if !comm.starts_with("atlas-") || comm == "atlas-watchdog" {
            continue;
        }
        let s = fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
        total += s
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}

/// Where Atlas metadata requests run (src/fs/atlas_io.rs, `AtlasMetadataMode`): on an
/// Atlas that is a local filesystem (tmpfs here) inline on the event loop, like local
/// requests, with no lane thread involved; with `[atlas] metadata = "lane"` on the
/// Atlas lane's threads. Both answer the same. (An Atlas with a server behind it keeps
/// the lane: the frozen-Atlas tests in tests/failclosed.rs run over FUSE.)
#[test]
fn atlas_metadata_runs_inline_on_a_local_filesystem_and_on_the_lane_when_asked() {
    let mut spent = Vec::new();
    for (knob, mode) in [("", "inline"), ("[atlas]\nmetadata = \"lane\"\n", "lane")] {
        let lab = MountedLab::builder()
            .rules(&format!("{knob}{DEFAULT_RULES}"))
            .mount();
        let v = status_json(lab.mnt());
        assert_eq!(v["atlas_metadata"]["mode"], mode, "{}", v["atlas_metadata"]);
        lab.sh(r#"mkdir -p "$LAB/docs/m""#);
        let before_requests = atlas_requests(lab.mnt());
        let before = atlas_lane_cpu_ns(lab.pid());
        let out = lab.sh(
            r#"cd "$LAB/docs/m" && for i in $(seq 300); do : > f$i; chmod 600 f$i; done
               mv f1 g1 && rm f2 && stat -c %a f3 && ls | wc -l"#,
        );
        let lane_ns = atlas_lane_cpu_ns(lab.pid()) - before;
        assert_eq!(
            out.split_whitespace().collect::<Vec<_>>(),
            ["600", "299"],
            "{mode}"
        );
        assert!(
            atlas_requests(lab.mnt()) - before_requests >= 600,
            "{mode}: the creates and chmods were not counted as Atlas requests"
        );
        spent.push((mode, lane_ns));
    }
    let (inline, lane) = (spent[0].1, spent[1].1);
    assert!(
        inline < 5_000_000 && lane > 4 * inline.max(1_000_000),
        "Atlas lane threads ran {inline} ns inline, {lane} ns with metadata = \"lane\" for the same 900 requests"
    );
}

/// `[cache] atlas_ttl = "auto"` (the default) on an Atlas that is a local filesystem
/// (tmpfs here) is 3 s: a change made on Atlas behind labfs (by another node through
/// this host's NFS server, say) shows through the mount no earlier than 3 s after the
/// kernel cached the file, and soon after that (src/fs/atlas_io.rs, `auto_ttl`;
/// docs/semantics.md, *Caching*).
#[test]
fn atlas_ttl_auto_caches_a_local_filesystem_atlas_for_three_seconds() {
    use std::os::unix::fs::PermissionsExt;
    let lab = MountedLab::new();
    lab.sh(r#"mkdir -p "$LAB/docs""#);
    let p = lab.path("docs/auto");
    // Before the create: the create's reply starts the kernel's 3 s.
    let start = Instant::now();
    fs::write(&p, b"x").expect("create through labfs");
    let was = mode(&p) & 0o777;
    let new = if was == 0o600 { 0o640 } else { 0o600 };
    fs::set_permissions(lab.atlas_path("docs/auto"), fs::Permissions::from_mode(new))
        .expect("chmod on the Atlas backend");
    wait_until(
        "the mode changed on Atlas shows through the mount",
        Duration::from_secs(15),
        || mode(&p) & 0o777 == new,
    );
    let seen = start.elapsed();
    assert!(
        seen >= Duration::from_millis(2900),
        "a change behind labfs showed after {seen:?}: the kernel did not cache the Atlas attributes for the auto TTL (3 s)"
    );
    assert!(
        seen < Duration::from_secs(3 + 7),
        "a change behind labfs took {seen:?} to show (auto TTL 3 s)"
    );
}
