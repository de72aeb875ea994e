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
