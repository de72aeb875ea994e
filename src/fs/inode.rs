//! The inode table: what the kernel holds, keyed by labfs inode number.
//!
//! # The contract
//!
//! - **An inode stands for one backing object** (backend + the object's identity:
//!   `BackingKey` = backend, st_dev, st_ino), never for a path. It keeps a
//!   [`Backing`] (a file handle, or an O_PATH descriptor where the filesystem cannot
//!   encode handles) through which every operation on the inode reaches the object:
//!   getattr, setattr, open, readlink, xattrs, fsync, statfs. So an operation on an
//!   inode works whichever of its names the kernel used, and after all of them are
//!   gone while the file is still open.
//! - **Names are an index onto inodes, many to one.** The backend's directories are
//!   the forward index (lookup = `fstatat(parent's backing, name)`, then the key finds
//!   the inode). The inode keeps the names the kernel reached it by (`parent`/`name`,
//!   the primary one, plus `links` for further hard links) as the reverse index: they
//!   give the namespace paths the rules place it by. A directory has exactly one name.
//!   Unlinking one name of a hard-linked file drops that name; the last name is kept
//!   (as where the object was last seen) until the inode is forgotten.
//! - **Numbers** are derived from the key: `(dev_index + 1) << 46 | st_ino`, so hard
//!   links share a number, a rename keeps it, and an object gets the same number again
//!   after the kernel forgot it without labfs remembering forgotten objects. When the
//!   derived number is taken by another object the kernel still holds (an unlinked file
//!   whose st_ino the backend already reused), or st_ino is too large, the object gets
//!   a fresh number above 2^62, remembered in `fresh` until the object is removed
//!   through the mount, so its number does not change while mounted either.
//! - **Lookup counts**: every reply that hands the kernel an entry (lookup, create,
//!   mkdir, mknod, symlink, link, each readdirplus entry other than `.` and `..`) adds
//!   one ([`InodeTable::remember`]); `forget(ino, n)` subtracts `n`; an inode whose
//!   count reaches zero is dropped with its backing (the root never is). The table
//!   holds exactly what the kernel holds; a reply that does not reach the kernel gives
//!   its count back through `forget`.
//! - **When a backing changes**: only at promotion. A promoted object that the kernel
//!   holds is rebound to its Atlas copy ([`InodeTable::rebind`]) and keeps its number
//!   while the kernel holds it (a `fresh` entry for the Atlas key, dropped with the
//!   inode); after the kernel forgot it, the path gets the Atlas object's own derived
//!   number. Nothing per promoted object outlives the kernel's reference. A hard link
//!   that leaves the promoted tree is not rebound: the inode stays on the local object
//!   and only loses the promoted name. [`InodeTable::unbind`] marks an inode whose
//!   object was removed through the mount (its key no longer identifies it).
//!
//! - **Removed objects the kernel still holds**: when a removal through the mount
//!   (unlink, rmdir, rename over) takes what may be the last name of an inode the
//!   kernel holds, the core opens an O_PATH descriptor of the object first and the
//!   inode keeps it as its backing ([`InodeTable::hold`]) until the kernel forgets it:
//!   a file handle of a removed object is stale, a descriptor keeps the object alive
//!   (an `O_PATH` descriptor or a removed working directory then answer as on ext4).
//!   At most [`InodeTable::held_cap`] such descriptors exist at once (a sixteenth of
//!   the daemon's open-file limit); beyond that a removed object answers ESTALE.
//! - **Recent objects**: a small LRU of O_PATH descriptors of recently used local
//!   objects ([`InodeTable::recent_get`]), so that the requests that follow one another
//!   on the same directory or new file (lookup, create, the parent's getattr, tar's
//!   setattrs) do not reopen it by handle each time. At most [`InodeTable::recent_cap`]
//!   descriptors (128, or a sixteenth of the daemon's limit if smaller) for the whole
//!   mount, not per user. An entry is only ever the inode's own object: it is put
//!   under the table's key check, dropped when the inode is forgotten or rebound. A
//!   rename keeps the object and so its entry; a removal through the mount leaves the
//!   removed object's entry as it is (it is what a held inode answers with anyway).
//!
//! The table is sharded (dashmap); no lock is held across a backend call: the backing
//! of a new inode is captured before the table is touched, and an operation clones the
//! backing (an `Arc`) out of the table before it calls the backend.

use std::ffi::{OsStr, OsString};
use std::num::NonZeroUsize;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use lru::LruCache;
use parking_lot::Mutex;

pub use super::object::Backing;
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

/// Further names of an inode: (parent inode, name).
pub type Names = Vec<(u64, Name)>;

/// One name (a directory entry's bytes), kept inline when short: most names are, and
/// a heap allocation per remembered inode would cost more than the name itself.
pub type Name = super::inline::InlineBytes<22, Box<[u8]>>;

impl From<&OsStr> for Name {
    fn from(n: &OsStr) -> Name {
        Name::new(n.as_bytes())
    }
}

impl std::ops::Deref for Name {
    type Target = OsStr;
    fn deref(&self) -> &OsStr {
        OsStr::from_bytes(self.as_bytes())
    }
}

impl std::fmt::Debug for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&**self, f)
    }
}

/// What labfs remembers about one inode the kernel holds.
#[derive(Clone, Debug)]
pub struct Node {
    /// The primary name: where the rules place it (for a directory, its only name).
    pub parent: u64,
    pub name: Name,
    /// Further names (hard links) the kernel reached it by.
    pub links: Option<Box<Names>>,
    /// `None` once the object is gone from its backend (last link removed).
    pub key: Option<BackingKey>,
    /// The backend the object is on (kept after `unbind`, for open-unlinked files).
    pub backend: BackendKind,
    pub backing: Backing,
    /// Lookups the kernel holds (u32: the kernel forgets long before 4 billion).
    pub nlookup: u32,
    pub is_dir: bool,
    /// Rebound at promotion: its number is not the one its key derives.
    pub rebound: bool,
    /// Removed through the mount; `backing` is a descriptor held until the forget
    /// (counted in [`InodeTable::held`]).
    pub held: bool,
}

impl Node {
    pub fn backend(&self) -> Option<BackendKind> {
        Some(self.backend)
    }

    /// Every name of the inode, primary first.
    pub fn names(&self) -> Vec<(u64, &OsStr)> {
        let mut v = vec![(self.parent, &*self.name)];
        if let Some(l) = &self.links {
            v.extend(l.iter().map(|(p, n)| (*p, &**n)));
        }
        v
    }

    fn has_name(&self, parent: u64, name: &OsStr) -> bool {
        (self.parent == parent && *self.name == *name)
            || self
                .links
                .as_ref()
                .is_some_and(|l| l.iter().any(|(p, n)| *p == parent && **n == *name))
    }

    /// Note that the kernel reached it as `parent/name` (the newest name is primary).
    fn add_name(&mut self, parent: u64, name: &OsStr) {
        if self.parent == parent && *self.name == *name {
            return;
        }
        if self.is_dir {
            self.parent = parent;
            self.name = name.into();
            return;
        }
        let old = (self.parent, std::mem::replace(&mut self.name, name.into()));
        self.parent = parent;
        let links = self.links.get_or_insert_with(Default::default);
        links.retain(|(p, n)| !(*p == parent && **n == *name));
        links.push(old);
        if links.len() > 64 {
            // A file with very many links: keep the most recent names only.
            links.remove(0);
        }
    }

    /// `parent/name` is gone; the last name is kept as where it was last seen.
    fn drop_name(&mut self, parent: u64, name: &OsStr) {
        if let Some(links) = &mut self.links {
            if self.parent == parent && *self.name == *name {
                if let Some((p, n)) = links.pop() {
                    self.parent = p;
                    self.name = n;
                }
            } else {
                links.retain(|(p, n)| !(*p == parent && **n == *name));
            }
            if links.is_empty() {
                self.links = None;
            }
        }
    }
}

pub struct InodeTable {
    /// Boxed: a map entry is then 16 bytes whatever the table's load factor (a
    /// freshly doubled table is half empty), and each node costs what it holds.
    nodes: DashMap<u64, Box<Node>>,
    /// (backend, st_dev) -> index used in derived numbers.
    devs: DashMap<(BackendKind, u64), u64>,
    /// Objects whose number is not derived (see the module doc).
    fresh: DashMap<BackingKey, u64>,
    next_fresh: AtomicU64,
    /// Forgets since the table last considered giving memory back.
    forgets: AtomicU64,
    /// The table's size when free memory was last handed back (or larger, seen since).
    trim_mark: AtomicUsize,
    /// O_PATH descriptors of recently used objects (see the module doc).
    recent: Mutex<Option<LruCache<u64, Arc<OwnedFd>>>>,
    /// Removed objects held by descriptor now.
    held: AtomicUsize,
    /// The hold cap was reached once (logged once).
    held_full_logged: AtomicBool,
    /// `(recent, held)` caps, read from the open-file limit at first use (after the
    /// daemon raised it).
    caps: OnceLock<(usize, usize)>,
}

/// How often (in dropped inodes) the table checks whether to shrink: often enough
/// that what is left unreturned after a mass forget is a few hundred KiB at most.
const SHRINK_EVERY: u64 = 1 << 12;

impl InodeTable {
    /// A table holding only the root, whose object is `root`.
    pub fn new(key: BackingKey, root: Backing) -> InodeTable {
        let nodes = DashMap::new();
        nodes.insert(
            ROOT_INO,
            Box::new(Node {
                parent: ROOT_INO,
                name: Name::from(OsStr::new("")),
                links: None,
                key: Some(key),
                backend: key.backend,
                backing: root,
                nlookup: 1,
                is_dir: true,
                rebound: false,
                held: false,
            }),
        );
        let fresh = DashMap::new();
        fresh.insert(key, ROOT_INO);
        InodeTable {
            nodes,
            devs: DashMap::new(),
            fresh,
            next_fresh: AtomicU64::new(FRESH_BASE),
            forgets: AtomicU64::new(0),
            trim_mark: AtomicUsize::new(0),
            recent: Mutex::new(None),
            held: AtomicUsize::new(0),
            held_full_logged: AtomicBool::new(false),
            caps: OnceLock::new(),
        }
    }

    fn caps(&self) -> (usize, usize) {
        *self.caps.get_or_init(|| {
            let share = usize::try_from(crate::sys::nofile_limit() / 16).unwrap_or(usize::MAX);
            (share.clamp(4, 128), share.max(16))
        })
    }

    /// Most descriptors the recent-objects cache keeps (the whole mount, every user).
    pub fn recent_cap(&self) -> usize {
        self.caps().0
    }

    /// Most removed objects held by descriptor at once.
    pub fn held_cap(&self) -> usize {
        self.caps().1
    }

    /// Removed objects held by descriptor now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Whether one more removed object may be held now (logged once when not).
    pub fn may_hold(&self) -> bool {
        let cap = self.held_cap();
        if self.held() < cap {
            return true;
        }
        self.hold_refused(cap);
        false
    }

    fn hold_refused(&self, cap: usize) {
        if !self.held_full_logged.swap(true, Ordering::Relaxed) {
            tracing::info!(
                cap,
                "{cap} removed objects are held by descriptor already: further removed \
                 objects reached only by the kernel (O_PATH, a removed cwd) answer ESTALE \
                 (logged once)"
            );
        }
    }

    /// A recently used O_PATH descriptor of `ino`'s object, if the cache has one.
    pub fn recent_get(&self, ino: u64) -> Option<Arc<OwnedFd>> {
        self.recent.lock().as_mut()?.get(&ino).cloned()
    }

    /// Keep `fd` (a descriptor of the object `key`) as `ino`'s recent descriptor, if
    /// `ino` still stands for `key`. Checked under the cache's lock, which `forget`
    /// and `rebind` also take after changing the node: an entry never outlives the
    /// object's inode nor survives a change of its backing.
    pub fn recent_put(&self, ino: u64, key: BackingKey, fd: Arc<OwnedFd>) {
        let cap = self.recent_cap();
        let mut guard = self.recent.lock();
        let still = self
            .nodes
            .get(&ino)
            .is_some_and(|n| n.key == Some(key) && !n.held);
        if !still {
            return;
        }
        let cache = guard.get_or_insert_with(|| {
            LruCache::new(NonZeroUsize::new(cap).unwrap_or(NonZeroUsize::MIN))
        });
        // The evicted descriptor (if any) closes when its last user drops it.
        cache.put(ino, fd);
    }

    /// Forget `ino`'s recent descriptor (its object changed behind the inode: e.g.
    /// promotion removed the local object).
    pub fn recent_drop(&self, ino: u64) {
        if let Some(c) = self.recent.lock().as_mut() {
            c.pop(&ino);
        }
    }

    /// Descriptors the recent-objects cache holds now.
    pub fn recent_len(&self) -> usize {
        self.recent.lock().as_ref().map_or(0, |c| c.len())
    }

    /// The object of `ino` is being removed and `fd` is a descriptor of it: keep `fd`
    /// as its backing until the kernel forgets it, and unbind it (its key no longer
    /// names it). False when the cap is reached (then only unbound: it answers
    /// ESTALE once the backend frees it).
    pub fn hold(&self, ino: u64, fd: Arc<OwnedFd>) -> bool {
        if ino == ROOT_INO {
            return false;
        }
        let cap = self.held_cap();
        let held = match self.nodes.get_mut(&ino) {
            Some(mut n) if n.held => {
                n.backing = Backing::Fd(fd);
                true
            }
            Some(mut n) => {
                let won = self
                    .held
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |h| {
                        (h < cap).then_some(h + 1)
                    })
                    .is_ok();
                if won {
                    n.backing = Backing::Fd(fd);
                    n.held = true;
                }
                won
            }
            None => false,
        };
        if !held {
            self.hold_refused(cap);
        }
        self.unbind(ino);
        held
    }

    /// Whether `ino` is a directory (`None`: not in the table).
    pub fn is_dir(&self, ino: u64) -> Option<bool> {
        self.nodes.get(&ino).map(|n| n.is_dir)
    }

    pub fn get(&self, ino: u64) -> Option<Node> {
        self.nodes.get(&ino).map(|n| Node::clone(&n))
    }

    /// The inode's backend, backing and key (`None` once removed), cloned out of the
    /// table.
    pub fn backing(&self, ino: u64) -> Option<(BackendKind, Backing, Option<BackingKey>)> {
        self.nodes
            .get(&ino)
            .map(|n| (n.backend, n.backing.clone(), n.key))
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The namespace path of `ino` by its primary names, as bytes.
    pub fn npath(&self, ino: u64) -> Option<OsString> {
        if ino == ROOT_INO {
            return Some("/".into());
        }
        let mut parts: Vec<Name> = Vec::new();
        let mut cur = ino;
        while cur != ROOT_INO {
            let n = self.nodes.get(&cur)?;
            parts.push(n.name.clone());
            cur = n.parent;
            if parts.len() > 1 << 20 {
                return None; // a cycle: never built by the mount
            }
        }
        Some(join_parts(parts.iter().rev().map(|p| &**p)))
    }

    /// Every namespace path of `ino` (one per name the kernel reached it by).
    pub fn npaths(&self, ino: u64) -> Vec<OsString> {
        let Some(n) = self.get(ino) else {
            return Vec::new();
        };
        n.names()
            .into_iter()
            .filter_map(|(p, name)| {
                let dir = self.npath(p)?;
                Some(super::object::join(&dir, name))
            })
            .collect()
    }

    /// The namespace path of `ino` as UTF-8 (for callers that still take `&str`).
    pub fn path(&self, ino: u64) -> Option<String> {
        self.npath(ino).map(|p| p.to_string_lossy().into_owned())
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
        if let Some(i) = self.fresh.get(key) {
            return Some(*i);
        }
        self.derived(key)
    }

    /// One more kernel reference to an inode already in the table for `key`, reached
    /// as `parent/name`; `None` when no inode holds `key` (then capture a backing and
    /// call [`InodeTable::remember`]).
    pub fn bump(&self, key: &BackingKey, parent: u64, name: &OsStr) -> Option<u64> {
        let ino = self.number(key)?;
        let mut n = self.nodes.get_mut(&ino)?;
        if n.key.as_ref() != Some(key) {
            return None;
        }
        n.nlookup = n.nlookup.saturating_add(1);
        n.add_name(parent, name);
        Some(ino)
    }

    /// Remember that the kernel now holds one more reference to the object `key`,
    /// reached as `parent/name`, reachable again through `backing`; returns its number.
    pub fn remember(
        &self,
        key: BackingKey,
        backing: Backing,
        parent: u64,
        name: &OsStr,
        is_dir: bool,
    ) -> u64 {
        let mut want = self.number(&key);
        let mut backing = Some(backing);
        // Ends: each turn either returns or moves to a brand-new fresh number, which
        // no inode can hold unless another thread just gave it to the same key.
        loop {
            let ino = match want {
                Some(i) => i,
                None => self.assign_fresh(key),
            };
            match self.nodes.entry(ino) {
                Entry::Occupied(mut o) => {
                    let n = o.get_mut();
                    if n.key == Some(key) {
                        n.nlookup = n.nlookup.saturating_add(1);
                        n.add_name(parent, name);
                        n.is_dir = is_dir;
                        if matches!(n.backing, Backing::ByPath) {
                            if let Some(b) = backing.take() {
                                n.backing = b;
                            }
                        }
                        return ino;
                    }
                    // The number belongs to another object the kernel still holds.
                    drop(o);
                    want = Some(self.assign_fresh(key));
                }
                Entry::Vacant(v) => {
                    let Some(b) = backing.take() else {
                        want = Some(self.assign_fresh(key));
                        continue;
                    };
                    v.insert(Box::new(Node {
                        parent,
                        name: name.into(),
                        links: None,
                        key: Some(key),
                        backend: key.backend,
                        backing: b,
                        nlookup: 1,
                        is_dir,
                        rebound: false,
                        held: false,
                    }));
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
            self.recent_drop(ino);
            if node.held {
                self.held.fetch_sub(1, Ordering::Relaxed);
            }
            if let (Some(key), true) = (node.key, node.rebound) {
                // A promoted object keeps its old number only while the kernel holds it.
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
        let len = self.nodes.len();
        if len * 4 < self.nodes.capacity() {
            self.nodes.shrink_to_fit();
            self.fresh.shrink_to_fit();
        }
        // The nodes themselves were freed one by one: hand whole free pages back each
        // time the table has halved since the last time.
        let mark = self.trim_mark.load(Ordering::Relaxed);
        if len > mark {
            self.trim_mark.store(len, Ordering::Relaxed);
        } else if len * 2 < mark {
            crate::sys::release_free_memory();
            self.trim_mark.store(len, Ordering::Relaxed);
        }
    }

    /// Entries of the `fresh` table (bounded by collisions and held promoted inodes).
    pub fn fresh_len(&self) -> usize {
        self.fresh.len()
    }

    /// The object behind `ino` is gone from its backend (last link removed through the
    /// mount): a new object that reuses its backing inode number must not be taken for
    /// it while the kernel still holds this one. The backing stays, for open files.
    pub fn unbind(&self, ino: u64) {
        if ino == ROOT_INO {
            return;
        }
        if let Some(mut n) = self.nodes.get_mut(&ino) {
            if let Some(key) = n.key.take() {
                self.fresh.remove_if(&key, |_, v| *v == ino);
            }
        }
    }

    /// The name `parent/name` of `ino` was removed (one link of several).
    pub fn unlinked(&self, ino: u64, parent: u64, name: &OsStr) {
        if let Some(mut n) = self.nodes.get_mut(&ino) {
            n.drop_name(parent, name);
        }
    }

    /// The name moved (rename through the mount) from `from` to `parent/name`.
    pub fn moved(&self, ino: u64, from: (u64, &OsStr), parent: u64, name: &OsStr) {
        if let Some(mut n) = self.nodes.get_mut(&ino) {
            if n.is_dir || !n.has_name(from.0, from.1) || n.links.is_none() {
                n.parent = parent;
                n.name = name.into();
            } else {
                n.drop_name(from.0, from.1);
                n.add_name(parent, name);
            }
        }
    }

    /// Promotion: the object the kernel holds as `ino` is now `key` on Atlas, reached
    /// through `backing`. It keeps its number while the kernel holds it.
    pub fn rebind(&self, ino: u64, key: BackingKey, backing: Backing) {
        if ino == ROOT_INO {
            return;
        }
        if let Some(mut n) = self.nodes.get_mut(&ino) {
            if let Some(old) = n.key.replace(key) {
                self.fresh.remove_if(&old, |_, v| *v == ino);
            }
            n.backend = key.backend;
            n.backing = backing;
            n.rebound = true;
            self.fresh.insert(key, ino);
        }
        self.recent_drop(ino);
    }
}

fn join_parts<'a>(parts: impl Iterator<Item = &'a OsStr>) -> OsString {
    let mut v = Vec::new();
    for p in parts {
        v.push(b'/');
        v.extend_from_slice(p.as_bytes());
    }
    OsString::from_vec(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn key(ino: u64) -> BackingKey {
        BackingKey {
            backend: BackendKind::Local,
            dev: 7,
            ino,
        }
    }

    fn atlas(ino: u64) -> BackingKey {
        BackingKey {
            backend: BackendKind::Atlas,
            dev: 9,
            ino,
        }
    }

    fn b() -> Backing {
        Backing::Handle(super::super::object::HandleBytes::new(&[0u8; 20]))
    }

    fn table() -> InodeTable {
        InodeTable::new(
            BackingKey {
                backend: BackendKind::Atlas,
                dev: 9,
                ino: 2,
            },
            b(),
        )
    }

    fn rem(t: &InodeTable, k: BackingKey, name: &str) -> u64 {
        t.remember(k, b(), ROOT_INO, OsStr::new(name), false)
    }

    /// What one remembered inode costs (1,000,000 of them must fit in 200 MiB with
    /// the table's own overhead): no allocation beyond the boxed node for short names
    /// and local handles.
    #[test]
    fn a_node_is_small_and_short_names_and_handles_are_inline() {
        assert!(
            std::mem::size_of::<Node>() <= 104,
            "{}",
            std::mem::size_of::<Node>()
        );
        assert!(matches!(
            Name::from(OsStr::new("IMG_20240101_123456.jpg")),
            Name::Heap(_)
        ));
        let n = Name::from(OsStr::from_bytes(b"bad\xffname"));
        assert!(matches!(n, Name::Inline { .. }));
        assert_eq!(n.as_bytes(), b"bad\xffname");
        assert_eq!(b().heap_size(), 0);
    }

    #[test]
    fn same_object_same_number_and_counts_add_up() {
        let t = table();
        let a = rem(&t, key(10), "a");
        let b2 = rem(&t, key(10), "b");
        assert_eq!(a, b2, "hard links share an inode number");
        assert_eq!(t.get(a).map(|n| n.nlookup), Some(2));
        assert_eq!(t.path(a).as_deref(), Some("/b"));
        assert_eq!(t.npaths(a).len(), 2, "both names are known");
        t.forget(a, 1);
        assert!(t.get(a).is_some());
        t.forget(a, 1);
        assert!(t.get(a).is_none());
        let c = rem(&t, key(10), "a");
        assert_eq!(c, a, "a forgotten object gets its number back");
        let other = rem(&t, key(11), "o");
        assert_ne!(other, a);
    }

    #[test]
    fn unlinking_one_name_keeps_the_others() {
        let t = table();
        let a = rem(&t, key(10), "x");
        rem(&t, key(10), "y");
        t.unlinked(a, ROOT_INO, OsStr::new("y"));
        assert_eq!(t.path(a).as_deref(), Some("/x"));
        assert_eq!(t.npaths(a).len(), 1);
        // The last name stays as where it was last seen.
        t.unlinked(a, ROOT_INO, OsStr::new("x"));
        assert_eq!(t.path(a).as_deref(), Some("/x"));
    }

    #[test]
    fn a_collided_object_keeps_its_fresh_number_while_mounted() {
        let t = table();
        let a = rem(&t, key(10), "a");
        t.unbind(a);
        let b2 = rem(&t, key(10), "b");
        assert_ne!(a, b2, "the unlinked object still held keeps its number");
        t.forget(a, 1);
        assert_eq!(t.peek(&key(10)), Some(b2));
        t.forget(b2, 1);
        assert_eq!(
            rem(&t, key(10), "b"),
            b2,
            "the number does not change after a forget"
        );
        t.unbind(b2);
        t.forget(b2, 1);
        assert_eq!(t.fresh_len(), 1, "only the root's entry is left");
        assert_eq!(rem(&t, key(10), "c"), a, "derived again once removed");
    }

    /// The endless loop of issue 10: a promoted file kept its SSD-derived number, the
    /// SSD reused that inode number for a new file, and looking the promoted file up
    /// again went round `remember` forever.
    #[test]
    fn promoted_file_and_reused_ssd_number_never_loop() {
        let t = Arc::new(table());
        let old = rem(&t, key(10), "f");
        t.rebind(old, atlas(99), b());
        assert_eq!(t.peek(&atlas(99)), Some(old), "kept while held");
        // While the kernel holds the promoted inode, the SSD reuses st_ino 10.
        let fresh_local = rem(&t, key(10), "g");
        assert_ne!(fresh_local, old);
        t.forget(old, 1);
        // Forgotten: the path now shows the Atlas object's own number, nothing kept.
        let (tx, rx) = std::sync::mpsc::channel();
        let t2 = t.clone();
        std::thread::spawn(move || {
            let n = rem(&t2, atlas(99), "f");
            let _ = tx.send(n);
        });
        let n = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("remember of the promoted file finished");
        assert_ne!(n, fresh_local);
        assert_eq!(Some(n), t.derived(&atlas(99)));
        // And the other order: forgotten first, then the SSD reuses the number.
        let t = table();
        let old = rem(&t, key(20), "f");
        t.rebind(old, atlas(98), b());
        t.forget(old, 1);
        let newer = rem(&t, key(20), "g");
        assert_eq!(newer, old, "the SSD object gets its derived number");
        let p = rem(&t, atlas(98), "f");
        assert_ne!(p, newer);
        t.forget(p, 1);
        assert_eq!(t.fresh_len(), 1, "promotion leaves nothing behind");
    }

    #[test]
    fn huge_backend_inode_numbers_get_fresh_numbers() {
        let t = table();
        let big = BackingKey {
            backend: BackendKind::Atlas,
            dev: 1,
            ino: u64::MAX - 5,
        };
        let a = rem(&t, big, "a");
        assert!(a >= FRESH_BASE);
        assert_eq!(rem(&t, big, "a"), a);
    }

    #[test]
    fn backends_never_share_numbers() {
        let t = table();
        let l = rem(&t, key(10), "l");
        let a = rem(
            &t,
            BackingKey {
                backend: BackendKind::Atlas,
                dev: 7,
                ino: 10,
            },
            "a",
        );
        assert_ne!(l, a);
        assert_ne!(l, ROOT_INO);
    }

    #[test]
    fn paths_follow_parents_and_renames() {
        let t = table();
        let d = t.remember(key(1), b(), ROOT_INO, OsStr::new("d"), true);
        let f = t.remember(key(2), b(), d, OsStr::new("f"), false);
        assert_eq!(t.path(f).as_deref(), Some("/d/f"));
        t.moved(f, (d, OsStr::new("f")), ROOT_INO, OsStr::new("g"));
        assert_eq!(t.path(f).as_deref(), Some("/g"));
    }
}
