//! Who the calling thread acts as: fsuid, fsgid, supplementary groups, umask; and
//! the users and groups a rules file names.

use std::ffi::CString;
use std::io;

use rustix::fs::Mode;
use rustix::process::Gid;

use super::from_rustix;

// ---------------------------------------------------------------------------
// Per-thread credentials
// ---------------------------------------------------------------------------

/// Give the calling thread a private fs_struct, so its umask is its own.
pub fn unshare_fs() -> io::Result<()> {
    // SAFETY: CLONE_FS only detaches this thread's cwd/root/umask from the other
    // threads; labfs resolves nothing against the cwd, so no thread relies on sharing it.
    unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::FS) }.map_err(from_rustix)
}

/// Set the calling thread's supplementary groups (the raw syscall: glibc's
/// `setgroups` would change every thread of the process).
pub fn set_thread_groups(groups: &[u32]) -> io::Result<()> {
    let gids: Vec<Gid> = groups.iter().map(|g| Gid::from_raw(*g)).collect();
    rustix::thread::set_thread_groups(&gids).map_err(from_rustix)
}

/// The calling thread's supplementary groups.
pub fn thread_groups() -> io::Result<Vec<u32>> {
    rustix::process::getgroups()
        .map(|v| v.into_iter().map(Gid::as_raw).collect())
        .map_err(from_rustix)
}

/// `setfsuid(id)`: the fsuid the thread had before the call (the syscall reports
/// nothing else, not even failure).
fn setfsuid_raw(id: u32) -> u32 {
    // SAFETY: setfsuid takes a plain integer and changes only the calling thread's
    // fsuid (rustix has no wrapper); an id it refuses changes nothing.
    unsafe { libc::syscall(libc::SYS_setfsuid, id) as u32 }
}

/// `setfsgid(id)`, as [`setfsuid_raw`].
fn setfsgid_raw(id: u32) -> u32 {
    // SAFETY: as in [`setfsuid_raw`], for the fsgid.
    unsafe { libc::syscall(libc::SYS_setfsgid, id) as u32 }
}

/// The calling thread's fsuid (`setfsuid(-1)` changes nothing and answers it).
pub fn fsuid() -> u32 {
    setfsuid_raw(u32::MAX)
}

/// The calling thread's fsgid.
pub fn fsgid() -> u32 {
    setfsgid_raw(u32::MAX)
}

/// Set the calling thread's fsuid. The syscall never reports failure itself, so the
/// result is read back: EPERM when the thread still has another fsuid.
pub fn set_fsuid(uid: u32) -> io::Result<()> {
    setfsuid_raw(uid);
    if fsuid() == uid {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(libc::EPERM))
    }
}

/// Set the calling thread's fsgid, checked as [`set_fsuid`] is.
pub fn set_fsgid(gid: u32) -> io::Result<()> {
    setfsgid_raw(gid);
    if fsgid() == gid {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(libc::EPERM))
    }
}

/// Set the umask of the calling thread's fs_struct; returns the previous one.
pub fn set_umask(mask: u32) -> u32 {
    rustix::process::umask(Mode::from_raw_mode(mask)).as_raw_mode()
}

/// The effective uid and gid of the process.
pub fn effective_ids() -> (u32, u32) {
    (
        rustix::process::geteuid().as_raw(),
        rustix::process::getegid().as_raw(),
    )
}

// ---------------------------------------------------------------------------
// Users and groups (NSS: the C library's, as `id` and `ls -l` see them)
// ---------------------------------------------------------------------------

/// The uid of user `name` (`getpwnam_r`), `None` when there is none.
pub fn user_id(name: &str) -> io::Result<Option<u32>> {
    // SAFETY: the arguments are those `nss_lookup` documents for a `get*nam_r` call.
    nss_lookup(name, |n, e, b, l, r| unsafe {
        libc::getpwnam_r(n, e, b, l, r)
    })
    .map(|found| found.map(|e: libc::passwd| e.pw_uid))
}

/// The gid of group `name` (`getgrnam_r`), `None` when there is none.
pub fn group_id(name: &str) -> io::Result<Option<u32>> {
    // SAFETY: as in [`user_id`].
    nss_lookup(name, |n, e, b, l, r| unsafe {
        libc::getgrnam_r(n, e, b, l, r)
    })
    .map(|found| found.map(|e: libc::group| e.gr_gid))
}

/// One `get*nam_r` lookup of `name`, growing the buffer on ERANGE. `call` gets the
/// name, the entry to fill, the buffer and its size and the result pointer, all valid
/// for the call. The entry's string fields point into the buffer, which is dropped on
/// return: callers read only its integer fields.
fn nss_lookup<T: NssEntry>(
    name: &str,
    call: impl Fn(*const libc::c_char, *mut T, *mut libc::c_char, usize, *mut *mut T) -> libc::c_int,
) -> io::Result<Option<T>> {
    let Ok(cname) = CString::new(name) else {
        return Ok(None);
    };
    let mut buf: Vec<libc::c_char> = vec![0; 1024];
    loop {
        // SAFETY: `T` is an `NssEntry`: integers and pointers, all-zero is valid.
        let mut entry: T = unsafe { std::mem::zeroed() };
        let mut result: *mut T = std::ptr::null_mut();
        let rc = call(
            cname.as_ptr(),
            &raw mut entry,
            buf.as_mut_ptr(),
            buf.len(),
            &raw mut result,
        );
        match nss_answer(rc, result.is_null(), &mut buf) {
            Some(Ok(true)) => return Ok(Some(entry)),
            Some(Ok(false)) => return Ok(None),
            Some(Err(e)) => return Err(e),
            None => continue,
        }
    }
}

/// The C structs a `get*nam_r` call fills: integers and pointers only, so all-zero is
/// a valid value of each.
trait NssEntry {}
impl NssEntry for libc::passwd {}
impl NssEntry for libc::group {}

/// What a `get*nam_r` result means: found (true), no such entry (false), an error,
/// or `None` after growing `buf` for another try (ERANGE, up to 1 MiB).
fn nss_answer(rc: i32, null: bool, buf: &mut Vec<libc::c_char>) -> Option<io::Result<bool>> {
    match rc {
        0 => Some(Ok(!null)),
        libc::ERANGE if buf.len() < 1 << 20 => {
            let len = buf.len() * 2;
            buf.resize(len, 0);
            None
        }
        // Some libcs report "no such entry" as an errno.
        libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => Some(Ok(false)),
        rc => Some(Err(io::Error::from_raw_os_error(rc))),
    }
}
