//! The one module for raw system calls. A call labfs needs is written here, once,
//! and called from here; the rest of labfs does not write it against `libc` itself.
//!
//! - [`creds`]: who the calling thread acts as (fsuid, fsgid, groups, umask: each
//!   switch fallible) and the users and groups a rules file names (NSS).
//! - [`files`]: `openat2` beneath a root, stat, file space, file handles, the `*at`
//!   calls on names, data on a descriptor, extended attributes, inode flags.
//! - [`process`]: pipes, unmounting, sessions, `fork`, thread ids and names, stdio,
//!   signals, the allocator, resource limits, the host name.
//!
//! Their items are re-exported here (`crate::sys::fstat`). Most go through `rustix`
//! (safe wrappers, errno as a type). The few calls rustix lacks keep their `unsafe`
//! here, each with a `// SAFETY:` reason beside it: `setfsuid`/`setfsgid`,
//! `name_to_handle_at`/`open_by_handle_at`, `sync_file_range`, `FS_IOC_FSGETXATTR`,
//! `close` with its result, `fork` (refused unless the process has one thread),
//! `signal` (SIGINT raising a flag), `pthread_sigmask`/`sigwait`,
//! `malloc_trim`/`mallopt`, `getpwnam_r`/`getgrnam_r` (NSS lives in the C library);
//! plus [`with_fd`] (lending a descriptor number to rustix) and [`empty_stat`].
//!
//! Every function returns `io::Result` with the kernel's errno unchanged; mapping it
//! to what the caller sees is [`crate::error`]'s job. Each makes the one syscall its
//! name says (the xattr listings: the size, then the names, again if the list grew
//! in between), so swapping a hand-written `libc` call for one of these changes
//! neither the syscalls made nor their errno. Nothing here knows about namespaces,
//! rules or backends.

use std::io;
use std::os::fd::{BorrowedFd, RawFd};

fn from_rustix(e: rustix::io::Errno) -> io::Error {
    io::Error::from_raw_os_error(e.raw_os_error())
}

// ---------------------------------------------------------------------------
// Descriptor numbers
// ---------------------------------------------------------------------------

/// Lend the descriptor number `fd` to `f` for one call, for the helpers whose
/// signatures take a `RawFd` (`fs::backend`, `promote::util`: their callers pass a
/// descriptor they hold, an `OwnedFd`'s or a backend root's, for the whole call).
/// `-1`, which is never a descriptor, is refused with EBADF as the kernel would.
pub fn with_fd<R>(fd: RawFd, f: impl FnOnce(BorrowedFd<'_>) -> io::Result<R>) -> io::Result<R> {
    if fd == -1 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: `fd` is not -1 (the one value a BorrowedFd cannot hold) and the borrow
    // ends with `f`. That the number is open is the caller's promise, as it was for
    // the libc calls these helpers made before: a closed number makes the syscall
    // fail with EBADF, it cannot make anything read or write memory it should not.
    f(unsafe { BorrowedFd::borrow_raw(fd) })
}

pub mod creds;
pub mod files;
pub mod process;

pub use creds::*;
pub use files::*;
pub use process::*;

#[cfg(test)]
mod tests;
