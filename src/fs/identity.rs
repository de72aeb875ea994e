//! The calling process's identity: uid/gid from the request, supplementary groups
//! from /proc (cached briefly per pid, since reading /proc on every request would
//! cost more than the request).

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lru::LruCache;
use parking_lot::Mutex;

use super::backend::Creds;

/// Who sent a request, as the kernel tells it.
#[derive(Clone, Copy, Debug)]
pub struct Ctx {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

impl Ctx {
    pub fn root() -> Ctx {
        Ctx {
            uid: 0,
            gid: 0,
            pid: 0,
        }
    }
}

const GROUPS_TTL: Duration = Duration::from_secs(2);

/// When a process's groups were read, for which uid, and what they were.
type Cached = (Instant, u32, Arc<[u32]>);

pub struct GroupCache {
    cache: Mutex<LruCache<u32, Cached>>,
}

impl Default for GroupCache {
    fn default() -> Self {
        Self::new()
    }
}

impl GroupCache {
    pub fn new() -> GroupCache {
        GroupCache {
            cache: Mutex::new(LruCache::new(
                NonZeroUsize::new(1024).unwrap_or(NonZeroUsize::MIN),
            )),
        }
    }

    /// The credentials a request from `ctx` acts with; `umask` for creating calls.
    ///
    /// Root callers too act with their own gid and groups: a root process running
    /// with gid 100 creates files owned by gid 100, as on any local filesystem, and a
    /// root-squashed NFS request carries the caller's groups, not the daemon's.
    pub fn creds(&self, ctx: &Ctx, umask: u32) -> Creds {
        let groups = self.groups(ctx);
        Creds {
            uid: ctx.uid,
            gid: ctx.gid,
            groups,
            umask,
        }
    }

    /// Supplementary groups of the caller (from a short-lived cache).
    pub fn groups(&self, ctx: &Ctx) -> Arc<[u32]> {
        let now = Instant::now();
        if let Some((at, uid, g)) = self.cache.lock().get(&ctx.pid) {
            if now.duration_since(*at) < GROUPS_TTL && *uid == ctx.uid {
                return g.clone();
            }
        }
        let g: Arc<[u32]> = Arc::from(read_groups(ctx.pid).unwrap_or_default());
        self.cache.lock().put(ctx.pid, (now, ctx.uid, g.clone()));
        g
    }
}

/// The `Groups:` line of /proc/PID/status. A process that has exited has no groups.
fn read_groups(pid: u32) -> Option<Vec<u32>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Groups:"))?;
    Some(
        line["Groups:".len()..]
            .split_whitespace()
            .filter_map(|g| g.parse().ok())
            .collect(),
    )
}
