//! The process and its threads: pipes, unmounting, sessions, fork, thread ids and
//! names, stdio, signals, the allocator, resource limits, the host name.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use rustix::fs::{Mode, OFlags};
use rustix::process::{Resource, Rlimit};

use super::from_rustix;

// ---------------------------------------------------------------------------
// Pipes, unmounting, sessions, processes and threads
// ---------------------------------------------------------------------------

/// `pipe2(O_CLOEXEC)`: (read end, write end).
pub fn pipe_cloexec() -> io::Result<(OwnedFd, OwnedFd)> {
    rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(from_rustix)
}

/// `umount2(path, flags)` with `MNT_DETACH` (lazy) and/or `UMOUNT_NOFOLLOW`.
pub fn unmount(path: &CStr, lazy: bool, nofollow: bool) -> io::Result<()> {
    use rustix::mount::UnmountFlags;
    let mut f = UnmountFlags::empty();
    if lazy {
        f |= UnmountFlags::DETACH;
    }
    if nofollow {
        f |= UnmountFlags::NOFOLLOW;
    }
    rustix::mount::unmount(path, f).map_err(from_rustix)
}

/// `setsid()`: a new session, detached from the terminal.
pub fn new_session() -> io::Result<()> {
    rustix::process::setsid().map(|_| ()).map_err(from_rustix)
}

/// What [`fork`] returned in this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forked {
    /// The new process.
    Child,
    /// The process that forked, with the child's pid.
    Parent(i32),
}

/// `fork()`, only while the process has one thread (`/proc/self/task`): the child
/// gets only the calling thread, and a lock another thread held (the allocator's, a
/// logger's) would stay locked in it for ever. A thread that was just joined leaves
/// the list a moment after its join returns, so a count above one is read again for
/// up to a second; then it forks nothing and says how many threads there are. No
/// thread can appear between the count and the fork: the one there is makes this call.
pub fn fork() -> io::Result<Forked> {
    let threads = || std::fs::read_dir("/proc/self/task").map(|d| d.count());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    let mut n = threads()?;
    while n != 1 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(1));
        n = threads()?;
    }
    if n != 1 {
        return Err(io::Error::other(format!(
            "fork refused: the process has {n} threads, not one"
        )));
    }
    // SAFETY: single-threaded (checked above); fork takes no pointers.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent(pid)),
    }
}

/// The calling thread's id (`gettid`).
pub fn thread_id() -> i32 {
    rustix::thread::gettid().as_raw_nonzero().get()
}

/// Name the calling thread (`prctl(PR_SET_NAME)`: what ps and top show; the kernel
/// keeps 15 bytes).
pub fn set_thread_name(name: &CStr) -> io::Result<()> {
    rustix::thread::set_name(name).map_err(from_rustix)
}

/// Point stdin and stdout, and stderr with `stderr_too`, at /dev/null.
pub fn stdio_to_dev_null(stderr_too: bool) -> io::Result<()> {
    let null = rustix::fs::open(c"/dev/null", OFlags::RDWR, Mode::empty()).map_err(from_rustix)?;
    let r = (|| {
        rustix::stdio::dup2_stdin(&null)?;
        rustix::stdio::dup2_stdout(&null)?;
        if stderr_too {
            rustix::stdio::dup2_stderr(&null)?;
        }
        Ok(())
    })()
    .map_err(from_rustix);
    if null.as_raw_fd() <= 2 {
        // stdio was closed and /dev/null took its number: it is stdio now, keep it.
        let _ = null.into_raw_fd();
    }
    r
}

// ---------------------------------------------------------------------------
// Signals
// ---------------------------------------------------------------------------

/// A set of signals blocked in every thread, to be taken with [`SignalSet::wait`].
pub struct SignalSet(libc::sigset_t);

/// Block `signals` in the calling thread and every thread it creates afterwards
/// (`pthread_sigmask(SIG_BLOCK)`), so they are delivered only to a [`SignalSet::wait`].
pub fn block_signals(signals: &[i32]) -> io::Result<SignalSet> {
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the set it is given a pointer to.
    unsafe { libc::sigemptyset(set.as_mut_ptr()) };
    // SAFETY: initialised just above.
    let mut set = unsafe { set.assume_init() };
    for &sig in signals {
        // SAFETY: `set` is an initialised sigset_t; an invalid signal is EINVAL.
        if unsafe { libc::sigaddset(&mut set, sig) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: `set` is valid; the old mask is not asked for (null).
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(SignalSet(set))
}

impl SignalSet {
    /// `sigwait`: the next of these signals sent to the process.
    pub fn wait(&self) -> io::Result<i32> {
        let mut sig: libc::c_int = 0;
        // SAFETY: both pointers are valid for the call.
        let rc = unsafe { libc::sigwait(&self.0, &mut sig) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(sig)
    }
}

/// The flag [`raise_flag_on_sigint`] sets (the first one it was given).
static SIGINT_FLAG: OnceLock<&'static AtomicBool> = OnceLock::new();

extern "C" fn on_sigint(_: libc::c_int) {
    // Async-signal-safe: an atomic load (the lock is set before the handler is
    // installed) and an atomic store.
    if let Some(flag) = SIGINT_FLAG.get() {
        flag.store(true, Ordering::Relaxed);
    }
}

/// From now on a write to a closed pipe ends the process quietly, as it does for
/// `cat` or `ls` (SIGPIPE's default action), instead of failing the write with EPIPE
/// (Rust ignores SIGPIPE), which `println!` turns into a panic: for the commands that
/// only print (`labfs status | head`). Never for the daemon, whose writes to a client
/// that went away must fail, not kill it.
pub fn end_quietly_on_broken_pipe() -> io::Result<()> {
    // SAFETY: restores the default disposition; no handler is installed.
    let old = unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    if old == libc::SIG_ERR {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// From now on, SIGINT sets `flag` instead of ending the process (`signal(2)`), for
/// a command that stops at its next step and says what it left behind.
pub fn raise_flag_on_sigint(flag: &'static AtomicBool) -> io::Result<()> {
    if !std::ptr::eq(*SIGINT_FLAG.get_or_init(|| flag), flag) {
        return Err(io::Error::other("SIGINT already raises another flag"));
    }
    // SAFETY: the handler only makes atomic loads and stores (async-signal-safe).
    let old = unsafe {
        libc::signal(
            libc::SIGINT,
            on_sigint as extern "C" fn(libc::c_int) as libc::sighandler_t,
        )
    };
    if old == libc::SIG_ERR {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Memory
// ---------------------------------------------------------------------------

/// Return the allocator's free memory to the system (glibc keeps freed chunks).
pub fn release_free_memory() {
    // SAFETY: malloc_trim only consolidates and releases free memory.
    unsafe { libc::malloc_trim(0) };
}

/// `mallopt(M_MMAP_THRESHOLD, bytes)`: allocations of `bytes` or more get their own
/// mapping, returned to the system when freed.
pub fn set_mmap_threshold(bytes: i32) {
    // SAFETY: mallopt only tunes the allocator; an unusable value is refused (0).
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, bytes) };
}

// ---------------------------------------------------------------------------
// Resource limits
// ---------------------------------------------------------------------------

/// The daemon's RLIMIT_NOFILE after [`raise_nofile_limit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NofileLimit {
    /// The soft limit now in force (`u64::MAX` when unlimited).
    pub soft: u64,
    /// The hard limit now in force.
    pub hard: u64,
    /// The hard limit could be raised to `fs.nr_open` (root with CAP_SYS_RESOURCE).
    pub raised_hard: bool,
}

/// `/proc/sys/fs/nr_open`: the most descriptors one process may be allowed.
pub fn nr_open() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Raise RLIMIT_NOFILE as far as the process may: soft and hard to `fs.nr_open` when
/// it can raise the hard limit (CAP_SYS_RESOURCE), else the soft limit to the hard
/// one. Every open file of every caller is one of the daemon's descriptors, so a
/// daemon whose limit is no larger than a caller's would run out before the caller.
pub fn raise_nofile_limit() -> io::Result<NofileLimit> {
    let lim = rustix::process::getrlimit(Resource::Nofile);
    let hard = lim.maximum.unwrap_or(u64::MAX);
    if let Some(n) = nr_open().filter(|n| *n > hard) {
        let want = Rlimit {
            current: Some(n),
            maximum: Some(n),
        };
        if rustix::process::setrlimit(Resource::Nofile, want).is_ok() {
            return Ok(NofileLimit {
                soft: n,
                hard: n,
                raised_hard: true,
            });
        }
    }
    if lim.current != lim.maximum {
        rustix::process::setrlimit(
            Resource::Nofile,
            Rlimit {
                current: lim.maximum,
                maximum: lim.maximum,
            },
        )
        .map_err(from_rustix)?;
    }
    Ok(NofileLimit {
        soft: hard,
        hard,
        raised_hard: false,
    })
}

/// `setrlimit(RLIMIT_CORE, 0)`: this process leaves no core dump (one would hold
/// whatever file data it had in memory).
pub fn disable_core_dumps() -> io::Result<()> {
    let none = Rlimit {
        current: Some(0),
        maximum: Some(0),
    };
    rustix::process::setrlimit(Resource::Core, none).map_err(from_rustix)
}

/// The soft RLIMIT_NOFILE in force (`u64::MAX` when unlimited).
pub fn nofile_limit() -> u64 {
    rustix::process::getrlimit(Resource::Nofile)
        .current
        .unwrap_or(u64::MAX)
}

/// This node's host name, as the kernel has it (not sanitized).
pub fn hostname() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}
