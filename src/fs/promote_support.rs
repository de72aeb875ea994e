//! Core helpers for promotion (src/promote): what happens to an inode the kernel holds
//! when its object is promoted from the local SSD to Atlas.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use super::inode::BackingKey;
use super::object::{self, Backing};
use super::{Creds, Invalidate, LabFs};
use crate::error::Result;
use crate::rules::BackendKind;

impl LabFs {
    /// Promotion (of the tree at `top`) removed the local name `ns` of the object the
    /// kernel holds as `ino`; `atlas` is the key of its copy on Atlas at `ns`.
    ///
    /// - If the inode has a name outside `top` (a hard link from outside the promoted
    ///   tree), it stays on the local object, which that name still shows with its
    ///   local data; it only loses the name `ns`, and the kernel's entry for `ns` is
    ///   dropped so the next lookup finds the Atlas copy (an inode of its own).
    /// - otherwise the inode is rebound to the Atlas copy: it keeps its number while the
    ///   kernel holds it; its cached attributes and pages are dropped.
    pub(crate) fn promote_rebind(
        &self,
        ino: u64,
        ns: &OsStr,
        top: &OsStr,
        atlas: BackingKey,
    ) -> Result<()> {
        let path = ns;
        // Whatever follows, the local object is gone from `ns`: a recent descriptor of
        // it (a removed local directory) must not stand for the inode any more.
        self.inodes.recent_drop(ino);
        let Some(node) = self.inodes.get(ino) else {
            return Ok(());
        };
        let under_top = |p: &OsStr| {
            let (p, t) = (p.as_bytes(), top.as_bytes());
            p == t || (p.starts_with(t) && p.get(t.len()) == Some(&b'/')) || t == b"/"
        };
        let outside = !node.is_dir && self.inodes.npaths(ino).iter().any(|p| !under_top(p));
        if outside {
            let (dir, name) = object::split(path);
            for (parent, n) in node.names() {
                if n == name && self.inodes.npath(parent).as_deref() == Some(dir) {
                    self.inodes.unlinked(ino, parent, name);
                    self.invalidate(Invalidate::Entry {
                        parent,
                        name: name.to_os_string(),
                    });
                }
            }
            return Ok(());
        }
        let fd = {
            let _root = Creds::root().assume()?;
            object::open_beneath(self.atlas.root_fd(), path, libc::O_PATH)?
        };
        let st = super::backend::fstat(std::os::fd::AsRawFd::as_raw_fd(&fd))?;
        if super::key_of(BackendKind::Atlas, &st) != atlas {
            return Ok(()); // replaced on Atlas meanwhile: the kernel will look it up
        }
        let backing = Backing::of_path_fd(fd, self.handle_mount(BackendKind::Atlas));
        self.inodes.rebind(ino, atlas, backing);
        self.invalidate(Invalidate::Inode(ino));
        Ok(())
    }
}
