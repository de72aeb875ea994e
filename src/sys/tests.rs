use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

use super::*;

fn errno<T: std::fmt::Debug>(r: io::Result<T>) -> i32 {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.raw_os_error().unwrap_or(0),
    }
}

fn dir_fd(path: &std::path::Path) -> OwnedFd {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    open_path(&c, libc::O_PATH | libc::O_DIRECTORY).expect("open dir")
}

#[test]
fn the_kernels_errno_reaches_the_caller_unchanged() {
    let t = tempfile::tempdir().expect("tempdir");
    let d = dir_fd(t.path());
    std::fs::create_dir(t.path().join("sub")).expect("mkdir");
    std::fs::write(t.path().join("f"), b"x").expect("write");
    std::os::unix::fs::symlink("sub", t.path().join("link")).expect("symlink");

    assert_eq!(errno(lstat_at(&d, c"missing")), libc::ENOENT);
    assert_eq!(errno(mkdir_at(&d, c"sub", 0o755)), libc::EEXIST);
    assert_eq!(errno(unlink_at(&d, c"sub", false)), libc::EISDIR);
    assert_eq!(errno(unlink_at(&d, c"f", true)), libc::ENOTDIR);
    assert_eq!(
        errno(rename_at(&d, c"f", &d, c"sub", libc::RENAME_NOREPLACE)),
        libc::EEXIST
    );
    assert_eq!(errno(link_at(&d, c"missing", &d, c"new")), libc::ENOENT);
    assert_eq!(
        errno(open_beneath(d.as_fd(), c"../x", libc::O_PATH)),
        libc::EXDEV
    );
    assert_eq!(
        errno(open_beneath(d.as_fd(), c"link/x", libc::O_PATH)),
        libc::ELOOP
    );
    // A final symlink is never followed.
    assert_eq!(
        errno(open_at_mode(
            &d,
            c"link",
            libc::O_RDONLY | libc::O_NOFOLLOW,
            0
        )),
        libc::ELOOP
    );
    assert_eq!(errno(with_fd(-1, |fd| fstat(fd))), libc::EBADF);
    // -1 is refused before rustix sees it; another closed number reaches the kernel.
    assert_eq!(errno(with_fd(i32::MAX, |fd| fstat(fd))), libc::EBADF);
}

#[test]
fn stat_answers_what_std_reads() {
    let t = tempfile::tempdir().expect("tempdir");
    let d = dir_fd(t.path());
    std::fs::write(t.path().join("f"), b"hello").expect("write");
    set_times_at(&d, c"f", (1_600_000_000, 5), (1_700_000_000, 123_456_789)).expect("utimensat");
    let m = std::fs::symlink_metadata(t.path().join("f")).expect("metadata");
    for st in [lstat_at(&d, c"f").expect("lstat"), {
        let f = open_at_mode(&d, c"f", libc::O_RDONLY, 0).expect("open");
        fstat(&f).expect("fstat")
    }] {
        assert_eq!(st.st_dev, m.dev());
        assert_eq!(st.st_ino, m.ino());
        assert_eq!(st.st_mode, m.mode());
        assert_eq!(st.st_nlink, m.nlink());
        assert_eq!(st.st_uid, m.uid());
        assert_eq!(st.st_gid, m.gid());
        assert_eq!(st.st_size, 5);
        assert_eq!(st.st_blocks, m.blocks() as i64);
        assert_eq!((st.st_atime, st.st_atime_nsec), (1_600_000_000, 5));
        assert_eq!(
            (st.st_mtime, st.st_mtime_nsec),
            (1_700_000_000, 123_456_789)
        );
        assert_eq!((st.st_ctime, st.st_ctime_nsec), (m.ctime(), m.ctime_nsec()));
    }
    let sp = fs_space(&d).expect("fstatvfs");
    assert!(sp.blocks > 0 && sp.total >= sp.avail);
}

#[test]
fn names_are_bytes() {
    let t = tempfile::tempdir().expect("tempdir");
    let d = dir_fd(t.path());
    let target = <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(b"caf\xe9/x");
    std::os::unix::fs::symlink(target, t.path().join("l")).expect("symlink");
    assert_eq!(readlink_at(&d, c"l").expect("readlink"), b"caf\xe9/x");
    mkdir_at(&d, c"d\xff", 0o700).expect("mkdir");
    rename_at(&d, c"d\xff", &d, c"e\xfe", 0).expect("rename");
    assert!(lstat_at(&d, c"e\xfe").is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR));
    unlink_at(&d, c"e\xfe", true).expect("rmdir");
    assert_eq!(errno(lstat_at(&d, c"e\xfe")), libc::ENOENT);
}

#[test]
fn a_file_handle_reopens_the_object_after_its_name_is_gone() {
    let t = tempfile::tempdir().expect("tempdir");
    let d = dir_fd(t.path());
    std::fs::write(t.path().join("f"), b"x").expect("write");
    let f = open_at_mode(&d, c"f", libc::O_PATH | libc::O_NOFOLLOW, 0).expect("open");
    let (h, mnt) = match file_handle(&f, 128) {
        Ok(v) => v,
        // The filesystem under the temporary directory has no handles: only the
        // refusals can be checked.
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
            assert_eq!(errno(open_by_handle(&d, &[1, 0, 0, 0], 0)), libc::EINVAL);
            return;
        }
        Err(e) => panic!("name_to_handle_at: {e}"),
    };
    assert!(h.len() > FILE_HANDLE_HEADER);
    assert_eq!(file_handle(&d, 128).expect("dir handle").1, mnt);
    assert_eq!(errno(file_handle(&f, 0)), libc::EOVERFLOW);
    std::fs::hard_link(t.path().join("f"), t.path().join("g")).expect("link");
    std::fs::remove_file(t.path().join("f")).expect("unlink");
    assert_eq!(errno(open_by_handle(&d, &h, libc::O_PATH)), libc::EBADF);
    let rd = open_at_mode(&d, c".", libc::O_RDONLY | libc::O_DIRECTORY, 0).expect("open");
    let again = open_by_handle(&rd, &h, libc::O_PATH).expect("open_by_handle_at");
    assert_eq!(
        fstat(&again).expect("fstat").st_ino,
        fstat(&f).expect("fstat").st_ino
    );
    // A header that claims more bytes than there are never reaches the kernel.
    assert_eq!(
        errno(open_by_handle(&d, &h[..h.len() - 1], 0)),
        libc::EINVAL
    );
    assert_eq!(errno(open_by_handle(&d, &h[..3], 0)), libc::EINVAL);
}

#[test]
fn data_calls_move_the_bytes_they_say() {
    let t = tempfile::tempdir().expect("tempdir");
    let d = dir_fd(t.path());
    let f =
        open_at_mode(&d, c"f", libc::O_RDWR | libc::O_CREAT | libc::O_EXCL, 0o600).expect("create");
    assert_eq!(pwrite(&f, b"hello world", 3).expect("pwrite"), 11);
    let mut buf = [0u8; 16];
    assert_eq!(pread(&f, &mut buf, 0).expect("pread"), 14);
    assert_eq!(&buf[..14], b"\0\0\0hello world");
    assert_eq!(seek(&f, -5, libc::SEEK_END).expect("lseek"), 9);
    assert_eq!(seek(&f, 2, libc::SEEK_CUR).expect("lseek"), 11);
    assert_eq!(seek(&f, 0, libc::SEEK_DATA).expect("SEEK_DATA"), 0);
    assert_eq!(seek(&f, 0, libc::SEEK_HOLE).expect("SEEK_HOLE"), 14);
    assert_eq!(errno(seek(&f, -1, libc::SEEK_SET)), libc::EINVAL);
    assert_eq!(errno(seek(&f, 0, 99)), libc::EINVAL);
    assert_eq!(errno(seek(&f, 100, libc::SEEK_DATA)), libc::ENXIO);
    fallocate(&f, 0, 0, 8192).expect("fallocate");
    assert_eq!(fstat(&f).expect("fstat").st_size, 8192);
    fdatasync(&f).expect("fdatasync");
    sync_file_range(&f, 0, 0, libc::SYNC_FILE_RANGE_WRITE).expect("sync_file_range");
    fadvise(&f, 0, 0, libc::POSIX_FADV_DONTNEED).expect("fadvise");
    assert_eq!(errno(fadvise(&f, 0, 0, 99)), libc::EINVAL);
    let g =
        open_at_mode(&d, c"g", libc::O_RDWR | libc::O_CREAT | libc::O_EXCL, 0o600).expect("create");
    let (mut oi, mut oo) = (3u64, 1u64);
    assert_eq!(
        copy_file_range(&f, &mut oi, &g, &mut oo, 5).expect("copy"),
        5
    );
    assert_eq!((oi, oo), (8, 6));
    let mut out = [0u8; 6];
    assert_eq!(pread(&g, &mut out, 0).expect("pread"), 6);
    assert_eq!(&out, b"\0hello");
    let again = dup_cloexec(&g).expect("dup");
    assert_ne!(again.as_raw_fd(), g.as_raw_fd());
    assert_eq!(
        fstat(&again).expect("fstat").st_ino,
        fstat(&g).expect("fstat").st_ino
    );
}

#[test]
fn object_calls_act_on_what_the_descriptor_names() {
    let t = tempfile::tempdir().expect("tempdir");
    let d = dir_fd(t.path());
    symlink_at(c"target", &d, c"l").expect("symlink");
    assert_eq!(readlink_at(&d, c"l").expect("readlink"), b"target");
    mknod_at(&d, c"p", libc::S_IFIFO | 0o640, 0).expect("mkfifo");
    let st = lstat_at(&d, c"p").expect("lstat");
    assert_eq!(st.st_mode & libc::S_IFMT, libc::S_IFIFO);
    assert_eq!(
        errno(mknod_at(&d, c"p", libc::S_IFIFO | 0o640, 0)),
        libc::EEXIST
    );
    access_at(&d, c"p", libc::F_OK, 0).expect("faccessat");
    assert_eq!(
        errno(access_at(&d, c"missing", libc::F_OK, 0)),
        libc::ENOENT
    );
    // Through an O_PATH descriptor, after the name it was opened by is gone.
    std::fs::write(t.path().join("f"), b"x").expect("write");
    let o = open_at_mode(&d, c"f", libc::O_PATH | libc::O_NOFOLLOW, 0).expect("O_PATH");
    let proc = CString::new(format!("/proc/self/fd/{}", o.as_raw_fd())).expect("path");
    link_following(&proc, &d, c"back").expect("linkat");
    std::fs::remove_file(t.path().join("f")).expect("unlink");
    chmod_path(&proc, 0o604).expect("chmod");
    chown_object(&o, None, Some(1)).expect("fchownat");
    set_times_object(&o, (0, libc::UTIME_OMIT), (1_234, 5)).expect("utimensat");
    let st = lstat_at(&d, c"back").expect("lstat");
    assert_eq!(st.st_ino, fstat(&o).expect("fstat").st_ino);
    assert_eq!(st.st_mode & 0o7777, 0o604);
    assert_eq!((st.st_uid, st.st_gid), (0, 1));
    assert_eq!((st.st_mtime, st.st_mtime_nsec), (1_234, 5));
    // The symlink itself is chowned, not its (missing) target.
    chown_object(
        open_at_mode(&d, c"l", libc::O_PATH | libc::O_NOFOLLOW, 0).expect("O_PATH"),
        Some(2),
        None,
    )
    .expect("lchown");
    assert_eq!(lstat_at(&d, c"l").expect("lstat").st_uid, 2);
}

#[test]
fn users_and_groups_come_from_nss() {
    assert_eq!(user_id("root").expect("getpwnam_r"), Some(0));
    assert_eq!(group_id("root").expect("getgrnam_r"), Some(0));
    assert_eq!(user_id("labfs-no-such-user").expect("getpwnam_r"), None);
    assert_eq!(group_id("labfs-no-such-group").expect("getgrnam_r"), None);
    assert_eq!(user_id("nul\0inside").expect("name"), None);
}

#[test]
fn fork_refuses_while_another_thread_runs() {
    // A thread that is certainly alive during the call: it waits for `go`.
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let other = std::thread::spawn(move || wait.recv().is_ok());
    let r = fork();
    go.send(()).expect("the other thread waits");
    assert!(other.join().expect("the other thread"));
    let e = r.expect_err("fork with two threads");
    assert!(e.to_string().contains("threads, not one"), "{e}");
}

#[test]
fn sigint_raises_the_flag_instead_of_ending_the_process() {
    static FLAG: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    static OTHER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    raise_flag_on_sigint(&FLAG).expect("install");
    raise_flag_on_sigint(&FLAG).expect("the same flag again");
    assert!(raise_flag_on_sigint(&OTHER).is_err());
    rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::INT)
        .expect("kill");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !FLAG.load(std::sync::atomic::Ordering::Relaxed) {
        assert!(
            std::time::Instant::now() < deadline,
            "SIGINT did not raise the flag"
        );
        std::thread::yield_now();
    }
}
