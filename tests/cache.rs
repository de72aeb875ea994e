//! Close-to-open caching of Atlas files: the kernel keeps a file's cached pages across
//! opens while Atlas shows the same version (object, size, mtime, ctime) as at the
//! previous open, and drops them at the first open after anyone changed the file,
//! as the NFS client does.

use std::fs;
use std::path::Path;

use crate::common::*;

fn atlas_requests(mnt: &Path) -> u64 {
    let out = Sh::program(LABFS, &["status", "--json", &mnt.display().to_string()]).ok();
    let v: serde_json::Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("status --json is not JSON ({e}):\n{out}"));
    v["stats"]["atlas"]["requests"]
        .as_u64()
        .unwrap_or_else(|| panic!("no stats.atlas.requests in {v}"))
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
    let lab = MountedLab::with_dirs();
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
    let lab = MountedLab::with_dirs();
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
