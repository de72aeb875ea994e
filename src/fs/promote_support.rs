//! Core helpers for promotion (src/promote): keep an inode number when its backing
//! object moves from the local SSD to Atlas.

use super::inode::BackingKey;
use super::{Invalidate, LabFs};

impl LabFs {
    /// Point inode `ino` at `key` (its object on Atlas after promotion) so `ls -i` and
    /// open handles see no change; with `invalidate`, drop the kernel's cached
    /// attributes and pages of the inode so the next access sees the Atlas object.
    pub(crate) fn promote_rekey(&self, ino: u64, key: BackingKey, invalidate: bool) {
        self.inodes.rekey(ino, key);
        if invalidate {
            self.invalidate(Invalidate::Inode(ino));
        }
    }
}
