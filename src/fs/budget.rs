//! The descriptor budget: how many daemon descriptors one uid's open files may hold.
//!
//! An open file the kernel does not pass through (an Atlas file on NFS or under
//! `[atlas] file_io = "daemon"`, any file when the kernel offers no passthrough) is a
//! descriptor of the one daemon for as long as it is open, so without a per-user
//! bound one user holding many such files open would exhaust the daemon's
//! RLIMIT_NOFILE and every other user (and `labfs promote`) would get EMFILE too.
//! The cap applies per caller uid, root included; a capped caller gets EMFILE for
//! its next open while everyone else keeps working.
//!
//! What is counted is what uses the daemon's descriptor table: every open counts
//! while it holds a descriptor, and an open served by kernel passthrough gives its
//! count back as soon as the daemon drops its descriptor, before the open reply
//! ([`super::handle::Handles::drop_descriptor`]; so the caller's next open never
//! finds it still counted): the kernel then holds the backing
//! file itself, so local files (and Atlas files on a local filesystem) cost the budget
//! nothing while they stay open, and a caller meets its own RLIMIT_NOFILE first.
//! Directory handles are not counted (a readdir snapshot holds at most one descriptor
//! per backend briefly).
//!
//! The cap is `[limits] open_files_per_uid` (docs/rules.md); 0 means a quarter of the
//! daemon's descriptor limit, read when the mount starts.

use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;

use crate::error::{Error, Result};

#[derive(Default)]
pub struct OpenBudget {
    /// Open files allowed per uid; 0 = no cap (a core used without a mount).
    cap: AtomicUsize,
    held: DashMap<u32, usize>,
    /// Which uid each open file handle counts against.
    owners: DashMap<u64, u32>,
}

/// One open file counted against a uid until it is bound to its handle (then the
/// handle's release gives it back) or dropped (the open failed).
#[must_use]
pub struct Permit<'a> {
    budget: &'a OpenBudget,
    uid: u32,
    bound: bool,
}

impl Permit<'_> {
    /// The open succeeded as handle `fh`: its release gives the count back.
    pub fn bind(mut self, fh: u64) {
        self.budget.owners.insert(fh, self.uid);
        self.bound = true;
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.bound {
            self.budget.give_back_uid(self.uid);
        }
    }
}

impl OpenBudget {
    pub fn set_cap(&self, cap: usize) {
        self.cap.store(cap, Ordering::Relaxed);
    }

    pub fn cap(&self) -> usize {
        self.cap.load(Ordering::Relaxed)
    }

    /// Count one more open file against `uid`, or EMFILE when it holds its cap.
    pub fn take(&self, uid: u32) -> Result<Permit<'_>> {
        let cap = self.cap();
        let mut n = self.held.entry(uid).or_insert(0);
        if cap != 0 && *n >= cap {
            tracing::info!(uid, cap, "open refused: uid holds its cap of open files");
            return Err(Error::Errno(libc::EMFILE));
        }
        *n += 1;
        Ok(Permit {
            budget: self,
            uid,
            bound: false,
        })
    }

    /// Handle `fh` was released or no longer holds a daemon descriptor (at most once
    /// per handle: its record is removed).
    pub fn give_back(&self, fh: u64) {
        if let Some((_, uid)) = self.owners.remove(&fh) {
            self.give_back_uid(uid);
        }
    }

    fn give_back_uid(&self, uid: u32) {
        self.held.remove_if_mut(&uid, |_, n| {
            *n = n.saturating_sub(1);
            *n == 0
        });
    }

    /// Daemon descriptors `uid`'s open files hold now.
    pub fn held_by(&self, uid: u32) -> usize {
        self.held.get(&uid).map(|n| *n).unwrap_or(0)
    }
}

/// The cap in force for a configured value: the value, or a quarter of `limit`.
pub fn effective_cap(configured: usize, limit: u64) -> usize {
    if configured != 0 {
        configured
    } else {
        usize::try_from(limit / 4).unwrap_or(usize::MAX).max(16)
    }
}

/// At mount: raise the daemon's RLIMIT_NOFILE (to `fs.nr_open` as root, else the
/// soft limit to the hard one) and set the per-uid cap from the rules file's `[limits]`.
pub fn apply_at_mount(fs: &super::LabFs, limits: &crate::config::Limits) {
    let limit = match crate::sys::raise_nofile_limit() {
        Ok(l) => {
            if l.raised_hard {
                tracing::info!(
                    soft = l.soft,
                    hard = l.hard,
                    "open-file limit raised to fs.nr_open ({})",
                    l.hard
                );
            } else {
                tracing::info!(
                    soft = l.soft,
                    hard = l.hard,
                    "open-file limit: soft raised to the hard limit {} (fs.nr_open not \
                     obtainable without CAP_SYS_RESOURCE)",
                    l.hard
                );
            }
            l.soft
        }
        Err(e) => {
            tracing::warn!("cannot raise the open-file limit: {e}");
            crate::sys::nofile_limit()
        }
    };
    let cap = effective_cap(limits.open_files_per_uid, limit);
    fs.handles.budget.set_cap(cap);
    tracing::info!(
        limit,
        per_uid = cap,
        "descriptor budget: open-file limit {limit}, {cap} open files per uid"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uid_at_its_cap_gets_emfile_and_others_do_not() {
        let b = OpenBudget::default();
        b.set_cap(2);
        b.take(7).unwrap().bind(1);
        b.take(7).unwrap().bind(2);
        assert_eq!(b.take(7).err().map(|e| e.errno()), Some(libc::EMFILE));
        b.take(8).unwrap().bind(3);
        b.give_back(1);
        b.take(7).unwrap().bind(4);
        // A failed open gives its count back.
        drop(b.take(8).unwrap());
        assert_eq!(b.held_by(8), 1);
    }
}
