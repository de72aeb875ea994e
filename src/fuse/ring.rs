//! Which FUSE transport serves the mount: FUSE over io_uring (the vendored fuser's
//! per-CPU queues, vendor/fuser/src/ring.rs) or the classic /dev/fuse loop.
//!
//! `[fuse] transport` (or `LABFS_FUSE_TRANSPORT`, which overrides it: a kernel can be
//! tried without editing the rules file): `auto` serves over io_uring when the kernel
//! offers it (the fuse module's `enable_uring` parameter is Y and FUSE_INIT carries
//! FUSE_OVER_IO_URING), else over /dev/fuse, and says which and why in one info line;
//! `uring` refuses to mount without it; `devfuse` never asks. `labfs status` shows the
//! transport in use and the requests answered over each.
//!
//! Fail-closed over the rings: labfs answers local requests inline on the queue's
//! thread and Atlas requests from the Atlas lane's threads later. A lane thread's reply
//! only writes the entry's buffers and wakes the queue's thread, which alone submits
//! the COMMIT_AND_FETCH (the kernel delivers the entry's next request through task
//! work on the submitting task: a lane thread stuck afterwards in an NFS call must not
//! be that task). What bounds local requests then is the queue depth: an Atlas request
//! holds its entry until it is answered, at the latest by the watchdog's ETIMEDOUT
//! (timeout + margin); see [`QUEUE_DEPTH`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use serde::Serialize;

use crate::config::Transport;

/// Entries per io_uring queue (one queue per possible CPU). The kernel serves a
/// caller's request from the queue of the CPU it runs on and, when every entry of that
/// queue is taken, makes it wait for one; it does not borrow another CPU's. Each
/// caller blocked on Atlas holds one entry (a request answered from the lane holds it
/// until the answer), so the depth is how many Atlas requests one CPU's callers may
/// have outstanding before a local request on that CPU waits for the watchdog to free
/// one (timeout + margin, not forever). The lane keeps 16 threads and grows to 256;
/// 128 per CPU covers the lane's resident threads eight times over and the tests' 40
/// stuck callers on one CPU, for 128 x (4 KiB header + the payload buffer, 1 MiB with
/// labfs's max_write) of address space per CPU, of which only the pages a request
/// touches become resident.
pub const QUEUE_DEPTH: u16 = 128;

/// The write size labfs asks for over io_uring: every entry's payload buffer must
/// hold the largest request (the kernel checks it at registration), and fuser's
/// default (16 MiB) would make each entry a 16 MiB buffer. 1 MiB is what the kernel
/// sends anyway (max_pages 256).
pub const RING_MAX_WRITE: u32 = 1 << 20;

const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";

/// `[fuse] transport` of the rules file the daemon mounts with (set before `serve`).
static CONFIGURED: OnceLock<Transport> = OnceLock::new();

pub fn configure(t: Transport) {
    let _ = CONFIGURED.set(t);
}

pub(super) fn configured_transport() -> Transport {
    CONFIGURED.get().copied().unwrap_or_default()
}

/// The transport in force: the configuration, overridden by `LABFS_FUSE_TRANSPORT`.
pub fn configured(config: Transport) -> Result<Transport, String> {
    match std::env::var("LABFS_FUSE_TRANSPORT") {
        Ok(v) if !v.is_empty() => Transport::parse(&v).ok_or_else(|| {
            format!("LABFS_FUSE_TRANSPORT must be \"auto\", \"uring\" or \"devfuse\", not {v:?}")
        }),
        _ => Ok(config),
    }
}

/// Whether the fuse module lets daemons use io_uring: `Err(why not)`.
pub fn kernel_allows() -> Result<(), String> {
    match std::fs::read_to_string(ENABLE_URING) {
        Ok(v) if matches!(v.trim(), "Y" | "y" | "1") => Ok(()),
        Ok(_) => Err(format!(
            "{ENABLE_URING} is N (options fuse enable_uring=1, or write Y there)"
        )),
        Err(e) => Err(format!(
            "this kernel has no FUSE over io_uring ({ENABLE_URING}: {e})"
        )),
    }
}

/// What the mount's transport is and how much each served, for `labfs status`.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct TransportReport {
    /// `auto`, `uring` or `devfuse`, as configured.
    pub configured: String,
    /// `io_uring` or `/dev/fuse`.
    pub in_use: String,
    pub why: String,
    /// io_uring queues (one per possible CPU) and entries per queue.
    pub queues: u64,
    pub queue_depth: u64,
    /// Requests read from /dev/fuse (with FORGET, INTERRUPT and those sent before the
    /// queues were up) and received over io_uring.
    pub requests_devfuse: u64,
    pub requests_io_uring: u64,
}

/// The daemon's transport state: set at INIT, read by status.
pub(super) struct TransportState {
    pub(super) configured: Transport,
    /// Asked for at INIT (configured and allowed by the module parameter).
    pub(super) want: bool,
    pub(super) granted: AtomicBool,
    pub(super) why: Mutex<String>,
    pub(super) stats: OnceLock<Arc<fuser::TransportStats>>,
}

impl TransportState {
    pub(super) fn new(configured: Transport) -> Result<TransportState, String> {
        let (want, why) = match (configured, kernel_allows()) {
            (Transport::Devfuse, _) => (false, "configured: [fuse] transport = \"devfuse\"".into()),
            (_, Ok(())) => (true, String::new()),
            (Transport::Uring, Err(e)) => {
                return Err(format!("[fuse] transport = \"uring\" but {e}"));
            }
            (Transport::Auto, Err(e)) => (false, e),
        };
        Ok(TransportState {
            configured,
            want,
            granted: AtomicBool::new(false),
            why: Mutex::new(why),
            stats: OnceLock::new(),
        })
    }

    /// At INIT: whether to ask for io_uring given what the kernel offers; `Err` when
    /// `uring` is required and not offered (the mount then fails).
    pub(super) fn at_init(&self, offered: bool) -> std::io::Result<bool> {
        if !self.want {
            return Ok(false);
        }
        if offered {
            self.granted.store(true, Ordering::Relaxed);
            *self.why.lock() = format!(
                "{} and FUSE_INIT offers FUSE_OVER_IO_URING",
                if self.configured == Transport::Uring {
                    "configured: [fuse] transport = \"uring\""
                } else {
                    "auto: enable_uring is Y"
                }
            );
            return Ok(true);
        }
        let why = "enable_uring is Y but FUSE_INIT does not offer FUSE_OVER_IO_URING \
                   (a kernel without CONFIG_FUSE_IO_URING?)";
        if self.configured == Transport::Uring {
            return Err(std::io::Error::other(format!(
                "[fuse] transport = \"uring\" but {why}"
            )));
        }
        *self.why.lock() = format!("auto: {why}");
        Ok(false)
    }

    pub(super) fn report(&self) -> TransportReport {
        let granted = self.granted.load(Ordering::Relaxed);
        let s = self.stats.get();
        let load = |f: fn(&fuser::TransportStats) -> u64| s.map_or(0, |s| f(s));
        TransportReport {
            configured: self.configured.as_str().into(),
            in_use: if granted { "io_uring" } else { "/dev/fuse" }.into(),
            why: self.why.lock().clone(),
            queues: load(|s| s.ring_queues.load(Ordering::Relaxed)),
            queue_depth: if granted { QUEUE_DEPTH.into() } else { 0 },
            requests_devfuse: load(|s| s.devfuse_requests.load(Ordering::Relaxed)),
            requests_io_uring: load(|s| s.ring_requests.load(Ordering::Relaxed)),
        }
    }
}

/// The one mount this daemon serves (status is asked of the daemon through its mount).
pub(super) static STATE: OnceLock<Arc<TransportState>> = OnceLock::new();

/// The transport report of this daemon's mount (empty before the mount).
pub fn report() -> TransportReport {
    STATE.get().map(|s| s.report()).unwrap_or_default()
}
