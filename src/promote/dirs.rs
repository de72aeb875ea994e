//! Directory descriptors that one phase of a job opens once and shares between its
//! workers, so that each file costs an `openat` of its own name in its parent instead
//! of resolving its whole path again (`openat2` beneath the backend root) and closing
//! the parent afterwards (docs/benchmarks.md, "Promote at copy speed").
//!
//! A cache lives for one phase (staging, verification, cleaning), never across
//! phases: what a later phase sees is resolved again from the backend root, as
//! before. Descriptors are opened the way [`super::util::open_ns_dir`] opens them
//! (beneath the root, no symlinks), so a cached one names the same directory a fresh
//! resolution would have named when it was opened. Errors are not cached.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::OwnedFd;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::error::Result;

/// Directories kept open per cache: a phase has at most two caches and at most two
/// jobs run at once, so promotion holds at most 1,024 such descriptors. A tree whose
/// files are spread over more directories than this, in the order the workers take
/// them, starts over (opening each parent again, as without a cache).
const CAPACITY: usize = 256;

/// Open descriptors of directories by their path (namespace path, or a path relative
/// to the staging directory: whatever `open` takes).
pub struct DirFds<F> {
    open: F,
    open_dirs: Mutex<HashMap<OsString, Arc<OwnedFd>>>,
}

impl<F: Fn(&OsStr) -> Result<OwnedFd> + Sync> DirFds<F> {
    /// `open` opens one directory (O_PATH) the first time it is asked for.
    pub fn new(open: F) -> DirFds<F> {
        DirFds {
            open,
            open_dirs: Mutex::new(HashMap::new()),
        }
    }

    /// The directory `dir`, opened now or earlier in this phase.
    pub fn get(&self, dir: &OsStr) -> Result<Arc<OwnedFd>> {
        if let Some(fd) = self.open_dirs.lock().get(dir) {
            return Ok(fd.clone());
        }
        // Opened without the lock held: another worker may open it too, the first
        // one stored wins and the other descriptor is closed.
        let fd = Arc::new((self.open)(dir)?);
        let mut dirs = self.open_dirs.lock();
        if dirs.len() >= CAPACITY {
            dirs.clear();
        }
        Ok(dirs.entry(dir.to_owned()).or_insert(fd).clone())
    }

    /// Drop `dir`'s descriptor (ESTALE: the next [`DirFds::get`] resolves it again).
    pub fn forget(&self, dir: &OsStr) {
        self.open_dirs.lock().remove(dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn each_directory_is_opened_once_until_the_cache_is_full() {
        let dir = tempfile::tempdir().expect("tempdir");
        let opened = AtomicUsize::new(0);
        let cache = DirFds::new(|_: &OsStr| {
            opened.fetch_add(1, Ordering::Relaxed);
            Ok(OwnedFd::from(std::fs::File::open(dir.path())?))
        });
        for _ in 0..3 {
            for i in 0..10 {
                cache.get(OsStr::new(&format!("d{i}"))).expect("open");
            }
        }
        assert_eq!(opened.load(Ordering::Relaxed), 10);
        for i in 0..CAPACITY + 1 {
            cache.get(OsStr::new(&format!("e{i}"))).expect("open");
        }
        assert!(cache.open_dirs.lock().len() <= CAPACITY);
    }

    #[test]
    fn a_failed_open_is_not_remembered() {
        let calls = AtomicUsize::new(0);
        let cache = DirFds::new(|_: &OsStr| {
            if calls.fetch_add(1, Ordering::Relaxed) == 0 {
                Err(crate::error::Error::Errno(libc::ENOENT))
            } else {
                Ok(OwnedFd::from(std::fs::File::open("/")?))
            }
        });
        let d = OsStr::new("d");
        assert!(cache.get(d).is_err());
        let first = cache.get(d).expect("the second attempt opens it");
        cache.forget(d);
        let again = cache.get(d).expect("opened again after forget");
        assert!(!Arc::ptr_eq(&first, &again), "forget drops the descriptor");
    }
}
