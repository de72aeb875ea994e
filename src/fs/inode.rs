//! labfs-owned inode numbers and the lookup-count contract.
//!
//! An inode number is allocated the first time labfs shows the kernel a backing object
//! and is keyed by that object's identity (backend, st_dev, st_ino), so hard links share
//! a number and a rename keeps it, as on a local filesystem. Numbers are never reused
//! for the life of the mount. Promotion moves a file's backing to Atlas and re-keys the
//! same number ([`InodeTable::rekey`]): the kernel, `ls -i` and open handles never see
//! the move.
//!
//! The lookup-count contract: every reply that hands the kernel an entry (lookup,
//! create, mkdir, mknod, symlink, link, and each readdirplus entry other than `.` and
//! `..`) adds one to the inode's count; `forget(ino, n)` subtracts `n`; an inode whose
//! count reaches zero is dropped from the table (the root is never dropped). The table
//! is sharded (dashmap) and no lock is held across a backend call.

use std::ffi::OsString;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;

use crate::rules::BackendKind;

pub const ROOT_INO: u64 = 1;

/// Identity of a backing object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackingKey {
    pub backend: BackendKind,
    pub dev: u64,
    pub ino: u64,
}

/// What labfs remembers about one inode.
#[derive(Clone, Debug)]
pub struct Node {
    /// Where it was last seen in the namespace (for hard links: the latest name).
    pub parent: u64,
    pub name: OsString,
    pub key: Option<BackingKey>,
    pub nlookup: u64,
    pub is_dir: bool,
}

impl Node {
    pub fn backend(&self) -> Option<BackendKind> {
        self.key.map(|k| k.backend)
    }
}

pub struct InodeTable {
    nodes: DashMap<u64, Node>,
    by_key: DashMap<BackingKey, u64>,
    next: AtomicU64,
    /// Forgets since the table last considered giving memory back.
    forgets: AtomicU64,
}

/// How often (in dropped inodes) the table checks whether to shrink.
const SHRINK_EVERY: u64 = 1 << 16;

impl Default for InodeTable {
    fn default() -> Self {
        Self::new()
    }
}

impl InodeTable {
    pub fn new() -> InodeTable {
        let nodes = DashMap::new();
        nodes.insert(
            ROOT_INO,
            Node {
                parent: ROOT_INO,
                name: OsString::new(),
                key: None,
                nlookup: 1,
                is_dir: true,
            },
        );
        InodeTable {
            nodes,
            by_key: DashMap::new(),
            next: AtomicU64::new(ROOT_INO + 1),
            forgets: AtomicU64::new(0),
        }
    }

    pub fn get(&self, ino: u64) -> Option<Node> {
        self.nodes.get(&ino).map(|n| n.clone())
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The namespace path of `ino`, built by walking parents.
    pub fn path(&self, ino: u64) -> Option<String> {
        if ino == ROOT_INO {
            return Some("/".to_string());
        }
        let mut parts: Vec<OsString> = Vec::new();
        let mut cur = ino;
        let mut guard = 0;
        while cur != ROOT_INO {
            let n = self.nodes.get(&cur)?;
            parts.push(n.name.clone());
            cur = n.parent;
            guard += 1;
            if guard > 4096 {
                return None;
            }
        }
        let mut s = String::new();
        for p in parts.iter().rev() {
            s.push('/');
            s.push_str(&p.to_string_lossy());
        }
        Some(s)
    }

    /// Remember that the kernel now holds one more reference to the object `key`,
    /// seen at `parent/name`; returns its inode number.
    pub fn remember(&self, key: BackingKey, parent: u64, name: &OsString, is_dir: bool) -> u64 {
        loop {
            if let Some(ino) = self.by_key.get(&key).map(|r| *r) {
                if let Some(mut n) = self.nodes.get_mut(&ino) {
                    n.nlookup += 1;
                    if n.parent != parent || &n.name != name {
                        n.parent = parent;
                        n.name = name.clone();
                    }
                    n.is_dir = is_dir;
                    return ino;
                }
                // Racing with a forget that is removing it: drop the stale key and retry.
                self.by_key.remove_if(&key, |_, v| *v == ino);
                continue;
            }
            let ino = self.next.fetch_add(1, Ordering::Relaxed);
            match self.by_key.entry(key) {
                Entry::Occupied(_) => continue,
                Entry::Vacant(v) => {
                    self.nodes.insert(
                        ino,
                        Node {
                            parent,
                            name: name.clone(),
                            key: Some(key),
                            nlookup: 1,
                            is_dir,
                        },
                    );
                    v.insert(ino);
                    return ino;
                }
            }
        }
    }

    /// The inode number already given to `key`, if any (no count change).
    pub fn peek(&self, key: &BackingKey) -> Option<u64> {
        self.by_key.get(key).map(|r| *r)
    }

    /// Add to an inode's lookup count (readdirplus entries already known).
    pub fn add_lookup(&self, ino: u64) {
        if let Some(mut n) = self.nodes.get_mut(&ino) {
            n.nlookup += 1;
        }
    }

    /// The kernel forgot `n` references.
    pub fn forget(&self, ino: u64, n: u64) {
        if ino == ROOT_INO {
            return;
        }
        let removed = self.nodes.remove_if_mut(&ino, |_, node| {
            node.nlookup = node.nlookup.saturating_sub(n);
            node.nlookup == 0
        });
        if let Some((_, node)) = removed {
            if let Some(key) = node.key {
                self.by_key.remove_if(&key, |_, v| *v == ino);
            }
            if self.forgets.fetch_add(1, Ordering::Relaxed) % SHRINK_EVERY == SHRINK_EVERY - 1 {
                self.maybe_shrink();
            }
        }
    }

    /// Give memory back once the kernel has forgotten most of what it once held
    /// (hash tables never shrink by themselves, nor does malloc return freed chunks).
    fn maybe_shrink(&self) {
        if self.nodes.len() * 4 < self.nodes.capacity() {
            self.nodes.shrink_to_fit();
            self.by_key.shrink_to_fit();
            // SAFETY: malloc_trim only releases free memory back to the system.
            unsafe { libc::malloc_trim(0) };
        }
    }

    /// The object behind `ino` is gone from its backend (last link removed): a new
    /// object that reuses its backing inode number must get a new labfs number.
    pub fn unbind(&self, ino: u64) {
        if let Some(mut n) = self.nodes.get_mut(&ino) {
            if let Some(key) = n.key.take() {
                self.by_key.remove_if(&key, |_, v| *v == ino);
            }
        }
    }

    /// The name moved (rename through the mount).
    pub fn moved(&self, ino: u64, parent: u64, name: &OsString) {
        if let Some(mut n) = self.nodes.get_mut(&ino) {
            n.parent = parent;
            n.name = name.clone();
        }
    }

    /// The same inode now has a different backing (promotion to Atlas).
    pub fn rekey(&self, ino: u64, key: BackingKey) {
        if let Some(mut n) = self.nodes.get_mut(&ino) {
            if let Some(old) = n.key.replace(key) {
                self.by_key.remove_if(&old, |_, v| *v == ino);
            }
            self.by_key.insert(key, ino);
        }
    }

    /// The root's backing key, set once the backend of "/" is known.
    pub fn set_root_key(&self, key: BackingKey) {
        if let Some(mut n) = self.nodes.get_mut(&ROOT_INO) {
            n.key = Some(key);
        }
        self.by_key.insert(key, ROOT_INO);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ino: u64) -> BackingKey {
        BackingKey {
            backend: BackendKind::Local,
            dev: 7,
            ino,
        }
    }

    #[test]
    fn same_object_same_number_and_counts_add_up() {
        let t = InodeTable::new();
        let a = t.remember(key(10), ROOT_INO, &"a".into(), false);
        let b = t.remember(key(10), ROOT_INO, &"b".into(), false);
        assert_eq!(a, b, "hard links share an inode number");
        assert_eq!(t.get(a).map(|n| n.nlookup), Some(2));
        assert_eq!(t.path(a).as_deref(), Some("/b"));
        t.forget(a, 1);
        assert!(t.get(a).is_some());
        t.forget(a, 1);
        assert!(t.get(a).is_none());
        let c = t.remember(key(10), ROOT_INO, &"a".into(), false);
        assert_ne!(c, a, "numbers are never reused");
    }

    #[test]
    fn unbind_gives_reused_backing_inode_a_new_number() {
        let t = InodeTable::new();
        let a = t.remember(key(10), ROOT_INO, &"a".into(), false);
        t.unbind(a);
        let b = t.remember(key(10), ROOT_INO, &"b".into(), false);
        assert_ne!(a, b);
        t.forget(a, 1);
        assert_eq!(t.peek(&key(10)), Some(b));
    }

    #[test]
    fn rekey_keeps_the_number() {
        let t = InodeTable::new();
        let a = t.remember(key(10), ROOT_INO, &"a".into(), false);
        let atlas = BackingKey {
            backend: BackendKind::Atlas,
            dev: 9,
            ino: 99,
        };
        t.rekey(a, atlas);
        assert_eq!(t.peek(&atlas), Some(a));
        assert_eq!(t.peek(&key(10)), None);
        assert_eq!(t.remember(atlas, ROOT_INO, &"a".into(), false), a);
    }

    #[test]
    fn paths_follow_parents_and_renames() {
        let t = InodeTable::new();
        let d = t.remember(key(1), ROOT_INO, &"d".into(), true);
        let f = t.remember(key(2), d, &"f".into(), false);
        assert_eq!(t.path(f).as_deref(), Some("/d/f"));
        t.moved(f, ROOT_INO, &"g".into());
        assert_eq!(t.path(f).as_deref(), Some("/g"));
    }
}
