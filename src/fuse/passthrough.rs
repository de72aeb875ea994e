//! Kernel FUSE passthrough: one backing id per inode while any handle uses it.
//!
//! Registering a descriptor (FUSE_DEV_IOC_BACKING_OPEN) gives the kernel its own
//! reference to the open file; the open reply names it by id. Before the reply is sent
//! the daemon closes its own descriptor ([`crate::fs::handle::Handles::drop_descriptor`]):
//! what the kernel reads and writes through is its reference, and the few requests it
//! still sends for the file open the object again.
//!
//! The ids themselves are kept, per inode, until the last passthrough handle of the
//! inode is released. They cost the daemon no descriptor, and both are needed: the
//! kernel looks the id up when the opener processes the reply, after the daemon has
//! written it (an id closed at once can make that open fail with EIO), and it admits
//! a second passthrough open of an inode only with the same backing as the first
//! (another registration of the same file is refused: EBUSY, seen as EIO).

use super::*;

/// Kernel passthrough bookkeeping, shared with the lane threads that answer opens.
pub(super) struct Passthrough {
    pub(super) fs: Arc<LabFs>,
    pub(super) enabled: AtomicBool,
    /// One backing id per inode while any handle uses it (the kernel requires it),
    /// with the `(st_dev, st_ino)` of the object it was registered for.
    pub(super) backing: DashMap<u64, ((u64, u64), Weak<BackingId>)>,
    pub(super) fh_backing: DashMap<u64, Arc<BackingId>>,
}

impl Passthrough {
    pub(super) fn reply_open(&self, ino: u64, o: Opened, reply: ReplyOpen) {
        match self.backing_for(ino, &o, |fd| reply.open_backing(fd)) {
            Ok(id) => {
                self.fh_backing.insert(o.fh, id.clone());
                // Before the reply: the opener's next open must not find this file
                // still counted against its uid's budget.
                self.fs.handles.drop_descriptor(o.fh);
                reply.opened_passthrough(FileHandle(o.fh), pass_flags(&o), &id);
            }
            Err(direct) => reply.opened(FileHandle(o.fh), open_flags(&o, direct)),
        }
    }

    pub(super) fn reply_create(&self, e: EntryOut, o: Opened, reply: ReplyCreate) {
        let attr = file_attr(&e.attr);
        match self.backing_for(e.attr.ino, &o, |fd| reply.open_backing(fd)) {
            Ok(id) => {
                self.fh_backing.insert(o.fh, id.clone());
                self.fs.handles.drop_descriptor(o.fh);
                reply.created_passthrough(
                    &e.ttl,
                    &attr,
                    Generation(0),
                    FileHandle(o.fh),
                    pass_flags(&o),
                    &id,
                );
            }
            Err(direct) => reply.created(
                &e.ttl,
                &attr,
                Generation(0),
                FileHandle(o.fh),
                open_flags(&o, direct),
            ),
        }
    }

    /// The inode's backing id for kernel passthrough, registering it on first open.
    /// `Err(direct)`: no passthrough for this open; `direct` when another handle of the
    /// inode already passes through to a different object. The kernel (6.18) refuses any
    /// other open of an inode in passthrough mode with EIO, which is the honest answer
    /// there: promotion never replaces the backing of a file that is open (it keeps the
    /// local copy and ends `partial`), so this is not expected to happen.
    pub(super) fn backing_for(
        &self,
        ino: u64,
        o: &Opened,
        register: impl FnOnce(std::os::fd::BorrowedFd<'_>) -> std::io::Result<BackingId>,
    ) -> std::result::Result<Arc<BackingId>, bool> {
        use std::os::fd::AsFd;
        if !self.enabled.load(Ordering::Relaxed) || !o.passthrough {
            return Err(false);
        }
        let h = self.fs.handles.file(o.fh).ok_or(false)?;
        let fd = h.held().ok_or(false)?;
        let key = h.object;
        let mut slot = self.backing.entry(ino).or_insert((key, Weak::new()));
        if let Some(id) = slot.1.upgrade() {
            // Same object: share the id. Another object: see above.
            return if slot.0 == key { Ok(id) } else { Err(true) };
        }
        match register(fd.as_fd()) {
            Ok(id) => {
                let id = Arc::new(id);
                *slot = (key, Arc::downgrade(&id));
                Ok(id)
            }
            Err(e) => {
                debug!(ino, "passthrough not available for this file: {e}");
                Err(false)
            }
        }
    }

    pub(super) fn released(&self, ino: u64, fh: u64) {
        if self.fh_backing.remove(&fh).is_some() {
            self.backing
                .remove_if(&ino, |_, (_, w)| w.strong_count() == 0);
        }
    }
}

/// Flags of an open served by kernel passthrough.
pub(super) fn pass_flags(o: &Opened) -> FopenFlags {
    if o.noflush {
        // close(2) on a local filesystem (the SSD, Atlas on ext4 and the like) reports
        // nothing a FLUSH could add: skip the round trip.
        FopenFlags::FOPEN_NOFLUSH
    } else {
        // NFS reports deferred write errors at close: keep FLUSH.
        FopenFlags::empty()
    }
}

pub(super) fn open_flags(o: &Opened, direct: bool) -> FopenFlags {
    let base = if direct {
        FopenFlags::FOPEN_DIRECT_IO
    } else {
        // Local: labfs is the only writer of the SSD. Atlas: close-to-open, the file
        // is as it was at the previous open (see `Opened::keep_cache`).
        if o.keep_cache {
            FopenFlags::FOPEN_KEEP_CACHE
        } else {
            FopenFlags::empty()
        }
    };
    base | pass_flags(o)
}

/// Flags of an opened directory: the kernel may cache every listing; it keeps the
/// cache across opens for a directory only labfs writes (local, no Atlas part), or one
/// whose Atlas part is as it was at the previous opendir (close-to-open), and drops it
/// itself when an entry changes through the mount.
pub(super) fn dir_flags(keep: bool) -> FopenFlags {
    if keep {
        FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE
    } else {
        FopenFlags::FOPEN_CACHE_DIR
    }
}
