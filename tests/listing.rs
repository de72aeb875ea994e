//! Listings through the mount: what the first listing of a fresh directory, a
//! listing on a cold cache and a listing by a non-root caller hand the kernel
//! (READDIRPLUS entries: names with their attributes and lookups), checked by what
//! stat, `ls -l` and `rm -rf` see right after.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{DirEntryExt, MetadataExt};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::*;

/// Files `f0000..` of distinct sizes, a hard link to the first, a symlink and a
/// subdirectory, all made through the mount; returns name -> (size, nlink).
fn fill(dir: &Path, n: usize) -> BTreeMap<String, (u64, u64)> {
    fs::create_dir(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    let mut want = BTreeMap::new();
    for i in 0..n {
        let name = format!("f{i:04}");
        fs::write(dir.join(&name), vec![b'x'; i % 300]).expect("create through labfs");
        want.insert(name, ((i % 300) as u64, 1));
    }
    fs::hard_link(dir.join("f0001"), dir.join("link-to-f0001")).expect("link");
    want.insert("f0001".into(), (1, 2));
    want.insert("link-to-f0001".into(), (1, 2));
    std::os::unix::fs::symlink("f0002", dir.join("sym")).expect("symlink");
    want.insert("sym".into(), (5, 1));
    fs::create_dir(dir.join("sub")).expect("mkdir sub");
    want.insert("sub".into(), (0, 2));
    want
}

/// One listing of `dir` with no stat in between: name -> d_ino.
fn list_inos(dir: &Path) -> BTreeMap<String, u64> {
    fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|e| {
            let e = e.expect("entry");
            (e.file_name().to_string_lossy().into_owned(), e.ino())
        })
        .collect()
}

/// What stat (lstat) says of every name after a listing matches what was written,
/// and the number the listing gave; a hard link's two names are one inode.
fn check_after_listing(what: &str, dir: &Path, want: &BTreeMap<String, (u64, u64)>) {
    let listed = list_inos(dir);
    assert_eq!(
        listed.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "{what}: names listed"
    );
    for (name, (size, nlink)) in want {
        let st = fs::symlink_metadata(dir.join(name)).expect("lstat after the listing");
        if name != "sub" {
            assert_eq!(st.len(), *size, "{what}: size of {name}");
        }
        assert_eq!(st.nlink(), *nlink, "{what}: nlink of {name}");
        assert_eq!(
            st.ino(),
            listed[name],
            "{what}: st_ino of {name} != its d_ino"
        );
    }
    assert_eq!(
        listed["f0001"], listed["link-to-f0001"],
        "{what}: hard link"
    );
    assert!(
        fs::symlink_metadata(dir.join("sym"))
            .expect("lstat sym")
            .file_type()
            .is_symlink(),
        "{what}: sym is not a symlink"
    );
    assert_eq!(
        fs::read(dir.join("sym"))
            .expect("read through the symlink")
            .len(),
        2,
        "{what}: the symlink's target"
    );
}

#[test]
fn first_listing_of_fresh_files_gives_stat_ls_and_rm_what_was_written() {
    let lab = MountedLab::with_dirs();
    for b in BOTH {
        let dir = lab.path(&format!("{}/fresh", b.dir()));
        // 700 entries: several READDIRPLUS batches (about 190 entries each).
        let want = fill(&dir, 700);
        check_after_listing(b.name(), &dir, &want);
        // ls -l prints one line per name (and the total).
        let out = lab.sh(&format!(r#"ls -l "$LAB/{}/fresh" | wc -l"#, b.dir()));
        assert_eq!(
            out.trim(),
            (want.len() + 1).to_string(),
            "{}: ls -l",
            b.name()
        );
        lab.sh(&format!(r#"rm -rf "$LAB/{}/fresh""#, b.dir()));
        assert!(!dir.exists(), "{}: rm -rf left the directory", b.name());
        let backend = match b {
            Backend::Atlas => lab.atlas_path("docs/fresh"),
            Backend::Local => lab.local_path("cache/fresh"),
        };
        assert!(
            !backend.exists(),
            "{}: rm -rf left the backend copy",
            b.name()
        );
    }
}

#[test]
fn cold_listing_hands_out_every_name_once_and_the_kernel_forgets_them_all() {
    let lab = MountedLab::with_dirs();
    let mut wants = Vec::new();
    for b in BOTH {
        let dir = lab.path(&format!("{}/cold", b.dir()));
        wants.push((b, dir.clone(), fill(&dir, 500)));
    }
    if !drop_kernel_caches() {
        return;
    }
    // With nothing held, each entry is remembered from its O_PATH open.
    for (b, dir, want) in &wants {
        check_after_listing(&format!("{} (cold)", b.name()), dir, want);
    }
    // And again after the kernel forgot them: the lookups the listings added are
    // all given back (the table keeps the root and a few directories at most).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if !drop_kernel_caches() {
            return;
        }
        let held = inodes_in_table(&lab);
        if held <= 4 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the daemon still holds {held} inodes after the kernel forgot the listings"
        );
    }
    for (b, dir, want) in &wants {
        check_after_listing(&format!("{} (cold, again)", b.name()), dir, want);
    }
}

#[test]
fn a_non_root_caller_lists_with_its_own_identity_and_never_gets_a_silent_subset() {
    let lab = MountedLab::with_dirs();
    for b in BOTH {
        let rel = format!("{}/u1000", b.dir());
        lab.sh(&format!(
            r#"mkdir "$LAB/{rel}"; chown 1000:1000 "$LAB/{rel}""#
        ));
        Sh::script(&format!(
            r#"cd "{}" && i=0; while [ $i -lt 400 ]; do echo $i > "n$i"; i=$((i+1)); done; mkdir priv; chmod 700 priv; : > priv/inside"#,
            lab.path(&rel).display()
        ))
        .user(1000, 1000)
        .ok();
        let count = Sh::script(&format!(r#"ls -A "{}" | wc -l"#, lab.path(&rel).display()))
            .user(1000, 1000)
            .ok();
        assert_eq!(
            count.trim(),
            "401",
            "{}: names listed by uid 1000",
            b.name()
        );
        // uid 1001 may not search priv (0700, uid 1000's): listing it fails, as
        // natively, rather than showing an empty directory.
        let out = Sh::script(&format!(r#"ls -A "{}/priv""#, lab.path(&rel).display()))
            .user(1001, 1001)
            .fails();
        assert!(
            out.tuple().2.contains("Permission denied"),
            "{}: ls of another user's 0700 directory",
            b.name()
        );
        // A directory its owner may read but not search (0444): as natively, `ls`
        // shows every name (listed without attributes: the caller cannot get them),
        // and a stat of one answers EACCES (before: an empty listing, exit 0; then
        // EACCES for the whole listing).
        lab.sh(&format!(r#"chmod 0444 "$LAB/{rel}""#));
        let (code, out, err) = Sh::script(&format!(r#"ls -A "{}""#, lab.path(&rel).display()))
            .user(1000, 1000)
            .status()
            .tuple();
        let listed = out.lines().count();
        assert!(
            code == 0 && listed == 401 && out.lines().any(|l| l == "n399"),
            "{}: ls of a 0444 directory by its owner: exit {code}, {listed} names, {err}",
            b.name()
        );
        let stat = Sh::script(&format!(r#"stat "{}/n1""#, lab.path(&rel).display()))
            .user(1000, 1000)
            .fails();
        assert!(
            stat.tuple().2.contains("Permission denied"),
            "{}: stat of a name in a 0444 directory",
            b.name()
        );
        lab.sh(&format!(r#"chmod 0755 "$LAB/{rel}""#));
    }
}

#[test]
fn a_file_replaced_on_atlas_behind_labfs_is_seen_after_the_next_listing() {
    let lab = MountedLab::with_dirs();
    let dir = lab.path("docs/swap");
    fs::create_dir(&dir).expect("mkdir");
    for i in 0..300 {
        fs::write(dir.join(format!("f{i:03}")), b"old").expect("create");
    }
    let before = list_inos(&dir);
    let old = fs::metadata(dir.join("f150")).expect("stat");
    // Another node replaces f150 (a new object under the old name) and adds a name.
    let back = lab.atlas_path("docs/swap");
    fs::write(back.join(".tmp-new"), b"the new version").expect("write behind");
    fs::rename(back.join(".tmp-new"), back.join("f150")).expect("rename behind");
    fs::write(back.join("zz-new"), b"z").expect("add behind");
    // The next listing shows the change and hands the kernel the new object.
    wait_until("the new name is listed", Duration::from_secs(10), || {
        list_inos(&dir).contains_key("zz-new")
    });
    let after = list_inos(&dir);
    assert_eq!(after.len(), before.len() + 1);
    let new = fs::metadata(dir.join("f150")).expect("stat after the listing");
    assert_ne!(new.ino(), old.ino(), "f150 still shows the replaced object");
    assert_eq!(new.ino(), after["f150"], "st_ino of f150 != its d_ino");
    assert_eq!(new.len(), 15, "f150's size after the listing");
    assert_eq!(
        fs::read(dir.join("f150")).expect("read"),
        b"the new version"
    );
    assert_eq!(fs::read(dir.join("f149")).expect("read"), b"old");
}

fn inodes_in_table(lab: &MountedLab) -> u64 {
    let mnt = lab.mnt().to_string_lossy().into_owned();
    let out = Sh::program(LABFS, &["status", "--json", &mnt]).ok();
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("status --json");
    v["inodes"].as_u64().expect("inodes in status")
}
