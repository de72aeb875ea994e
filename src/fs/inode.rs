//! labfs-owned inode numbers and the lookup-count contract.
//!
//! An inode number is derived from the backing object's identity (backend, st_dev,
//! st_ino): `(dev_index + 1) << 46 | st_ino`, where `dev_index` numbers the backend
//! filesystems labfs has met. So hard links share a number, a rename keeps it, and a
//! file gets the same number again after the kernel forgot it: numbers are stable for
//! the life of the mount without remembering forgotten inodes. Two cases need a number
//! that is not derived, kept in small side tables:
//! - a promoted file keeps the number it had on the local SSD although its backing is
//!   now on Atlas ([`InodeTable::rekey`], an alias kept for the life of the mount);
//! - a collision: a backend reused the st_ino of an object that the kernel still holds
//!   (an unlinked file still open, see [`InodeTable::unbind`]), or an st_ino too large
//!   to derive from; such an object gets a fresh number above 2^62 while the kernel
//!   holds it.
//!
//! The lookup-count contract: every reply that hands the kernel an entry (lookup,
//! create, mkdir, mknod, symlink, link, and each readdirplus entry other than `.` and
//! `..`) adds one to the inode's count; `forget(ino, n)` subtracts `n`; an inode whose
//! count reaches zero is dropped from the table (the root is never dropped), so the
//! table holds exactly what the kernel holds. The table is sharded (dashmap) and no
//! lock is held across a backend call.

use std::ffi::{OsStr, OsString};
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;

use crate::rules::BackendKind;

pub const ROOT_INO: u64 = 1;

/// Bits of st_ino kept in a derived number.
const INO_BITS: u32 = 46;
/// Backend filesystems that can be told apart in derived numbers.
const MAX_DEVS: u64 = (1 << 15) - 1;
/// Numbers that are not derived start here.
const FRESH_BASE: u64 = 1 << 62;

/// Identity of a backing object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackingKey {
    pub backend: BackendKind,
    pub dev: u64,
    pub ino: u64,
}

/// What labfs remembers about one inode the kernel holds.
#[derive(Clone, Debug)]
pub struct Node {
    /// Where it was last seen in the namespace (for hard links: the latest name).
    pub parent: u64,
    pub name: Box<OsStr>,
    /// `None` once the object is gone from its backend (last link removed).
    pub key: Option<BackingKey>,
    /// Lookups the kernel holds (u32: the kernel forgets long before 4 billion).
    pub nlookup: u32,
    pub is_dir: bool,
}

impl Node {
    pub fn backend(&self) -> Option<BackendKind> {
        self.key.map(|k| k.backend)
    }
}

pub struct InodeTable {
    nodes: DashMap<u64, Node>,
    /// (backend, st_dev) -> index used in derived numbers.
    devs: DashMap<(BackendKind, u64), u64>,
    /// Promoted objects keep their earlier number (for the life of the mount).
    aliases: DashMap<BackingKey, u64>,
    /// Objects whose derived number was taken, while the kernel holds them.
    fresh: DashMap<BackingKey, u64>,
    next_fresh: AtomicU64,
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
                name: OsString::new().into_boxed_os_str(),
                key: None,
                nlookup: 1,
                is_dir: true,
            },
        );
        InodeTable {
            nodes,
            devs: DashMap::new(),
            aliases: DashMap::new(),
            fresh: DashMap::new(),
            next_fresh: AtomicU64::new(FRESH_BASE),
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
        let mut parts: Vec<Box<OsStr>> = Vec::new();
        let mut cur = ino;
        while cur != ROOT_INO {
            let n = self.nodes.get(&cur)?;
            parts.push(n.name.clone());
            cur = n.parent;
            if parts.len() > 4096 {
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

    fn derived(&self, key: &BackingKey) -> Option<u64> {
        if key.ino >= 1 << INO_BITS {
            return None;
        }
        let idx = match self.devs.get(&(key.backend, key.dev)) {
            Some(i) => *i,
            None => {
                let n = self.devs.len() as u64;
                if n >= MAX_DEVS {
                    return None;
                }
                *self.devs.entry((key.backend, key.dev)).or_insert(n)
            }
        };
        Some((idx + 1) << INO_BITS | key.ino)
    }

    /// The number `key` has (or would get), without touching counts.
    pub fn number(&self, key: &BackingKey) -> Option<u64> {
        if let Some(i) = self.aliases.get(key) {
            return Some(*i);
        }
        if let Some(i) = self.fresh.get(key) {
            return Some(*i);
        }
        self.derived(key)
    }

    /// Remember that the kernel now holds one more reference to the object `key`,
    /// seen at `parent/name`; returns its inode number.
    pub fn remember(&self, key: BackingKey, parent: u64, name: &OsString, is_dir: bool) -> u64 {
        loop {
            let ino = match self.number(&key) {
                Some(i) => i,
                None => self.assign_fresh(key),
            };
            match self.nodes.entry(ino) {
                Entry::Occupied(mut o) => {
                    let n = o.get_mut();
                    if n.key == Some(key) {
                        n.nlookup = n.nlookup.saturating_add(1);
                        if n.parent != parent || *n.name != **name {
                            n.parent = parent;
                            n.name = name.clone().into_boxed_os_str();
                        }
                        n.is_dir = is_dir;
                        return ino;
                    }
                    // The number belongs to another object the kernel still holds.
                    drop(o);
                    self.assign_fresh(key);
                }
                Entry::Vacant(v) => {
                    v.insert(Node {
                        parent,
                        name: name.clone().into_boxed_os_str(),
                        key: Some(key),
                        nlookup: 1,
                        is_dir,
                    });
                    return ino;
                }
            }
        }
    }

    fn assign_fresh(&self, key: BackingKey) -> u64 {
        let ino = self.next_fresh.fetch_add(1, Ordering::Relaxed);
        self.fresh.insert(key, ino);
        ino
    }

    /// The inode number the kernel holds for `key`, if it holds one (no count change).
    pub fn peek(&self, key: &BackingKey) -> Option<u64> {
        let ino = self.number(key)?;
        self.nodes
            .get(&ino)
            .filter(|n| n.key.as_ref() == Some(key))
            .map(|_| ino)
    }

    /// The kernel forgot `n` references.
    pub fn forget(&self, ino: u64, n: u64) {
        if ino == ROOT_INO {
            return;
        }
        let removed = self.nodes.remove_if_mut(&ino, |_, node| {
            node.nlookup = node.nlookup.saturating_sub(n.min(u32::MAX as u64) as u32);
            node.nlookup == 0
        });
        if let Some((_, node)) = removed {
            if let Some(key) = node.key {
                self.fresh.remove_if(&key, |_, v| *v == ino);
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
            self.fresh.shrink_to_fit();
            // SAFETY: malloc_trim only releases free memory back to the system.
            unsafe { libc::malloc_trim(0) };
        }
    }

    /// The object behind `ino` is gone from its backend (last link removed): a new
    /// object that reuses its backing inode number must not be taken for it while the
    /// kernel still holds this one.
    pub fn unbind(&self, ino: u64) {
        if let Some(mut n) = self.nodes.get_mut(&ino) {
            if let Some(key) = n.key.take() {
                self.fresh.remove_if(&key, |_, v| *v == ino);
                self.aliases.remove_if(&key, |_, v| *v == ino);
            }
        }
    }

    /// The name moved (rename through the mount).
    pub fn moved(&self, ino: u64, parent: u64, name: &OsString) {
        if let Some(mut n) = self.nodes.get_mut(&ino) {
            n.parent = parent;
            n.name = name.clone().into_boxed_os_str();
        }
    }

    /// The same inode now has a different backing (promotion to Atlas): it keeps its
    /// number for the life of the mount.
    pub fn rekey(&self, ino: u64, key: BackingKey) {
        if let Some(mut n) = self.nodes.get_mut(&ino) {
            if let Some(old) = n.key.replace(key) {
                self.fresh.remove_if(&old, |_, v| *v == ino);
            }
        }
        self.aliases.insert(key, ino);
    }

    /// The root's backing key, set once the backend of "/" is known.
    pub fn set_root_key(&self, key: BackingKey) {
        if let Some(mut n) = self.nodes.get_mut(&ROOT_INO) {
            n.key = Some(key);
        }
        self.aliases.insert(key, ROOT_INO);
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
        assert_eq!(c, a, "a forgotten object gets its number back");
        let other = t.remember(key(11), ROOT_INO, &"o".into(), false);
        assert_ne!(other, a);
    }

    #[test]
    fn unbind_gives_reused_backing_inode_a_new_number() {
        let t = InodeTable::new();
        let a = t.remember(key(10), ROOT_INO, &"a".into(), false);
        t.unbind(a);
        let b = t.remember(key(10), ROOT_INO, &"b".into(), false);
        assert_ne!(
            a, b,
            "the unlinked object still held by the kernel keeps its number"
        );
        t.forget(a, 1);
        assert_eq!(t.peek(&key(10)), Some(b));
        t.forget(b, 1);
        assert_eq!(
            t.remember(key(10), ROOT_INO, &"b".into(), false),
            a,
            "derived again once free"
        );
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
        t.forget(a, 2);
        assert_eq!(
            t.remember(atlas, ROOT_INO, &"a".into(), false),
            a,
            "kept after forget"
        );
    }

    #[test]
    fn huge_backend_inode_numbers_get_fresh_numbers() {
        let t = InodeTable::new();
        let big = BackingKey {
            backend: BackendKind::Atlas,
            dev: 1,
            ino: u64::MAX - 5,
        };
        let a = t.remember(big, ROOT_INO, &"a".into(), false);
        assert!(a >= FRESH_BASE);
        assert_eq!(t.remember(big, ROOT_INO, &"a".into(), false), a);
    }

    #[test]
    fn backends_never_share_numbers() {
        let t = InodeTable::new();
        let l = t.remember(key(10), ROOT_INO, &"l".into(), false);
        let a = t.remember(
            BackingKey {
                backend: BackendKind::Atlas,
                dev: 7,
                ino: 10,
            },
            ROOT_INO,
            &"a".into(),
            false,
        );
        assert_ne!(l, a);
        assert_ne!(l, ROOT_INO);
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
