//! The promotion journal: one JSON file per job on the LOCAL backend,
//! `LOCAL/.labfs/promote/<job-id>.json`, replaced atomically (write temporary, fsync,
//! rename, fsync the directory) at every state change.
//!
//! States, in order (see docs/promote.md for what a crash in each leaves):
//! `planned` -> `staged` -> `verified` -> `committed` -> (journal removed once the
//! local copy is gone).

use std::ffi::{CString, OsStr, OsString};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

use serde::{Deserialize, Serialize};

use super::util::{self, cstr};
use crate::error::{Error, Result};
use crate::fs::Backend;

/// Directory of the journals, relative to the local backend root.
pub const DIR: &str = "/.labfs/promote";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Tree walked; nothing on Atlas yet (or only a partial staging directory).
    Planned,
    /// Every object copied, read back and compared, and made durable (syncfs) under
    /// the staging directory.
    Staged,
    /// Staged objects' size, owner and mode checked; sources unchanged; tags set.
    Verified,
    /// Renamed into place on Atlas (and store records written).
    Committed,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Planned => "planned",
            State::Staged => "staged",
            State::Verified => "verified",
            State::Committed => "committed",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    Dir,
    File,
    Symlink,
    /// Another name of a file earlier in the plan (`link_to`).
    Link,
}

/// A timestamp as the journal keeps it: seconds and nanoseconds (12 bytes in memory;
/// written as the `[secs, nsecs]` pair of journal version 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[repr(C, packed(4))]
pub struct Ts {
    secs: i64,
    nsecs: u32,
}

impl Ts {
    pub fn new(secs: i64, nsecs: i64) -> Ts {
        Ts {
            secs,
            nsecs: nsecs.clamp(0, 999_999_999) as u32,
        }
    }
    pub fn pair(self) -> (i64, i64) {
        let (s, n) = (self.secs, self.nsecs);
        (s, n as i64)
    }
}

impl Serialize for Ts {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.pair().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Ts {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Ts, D::Error> {
        let (s, n) = <(i64, i64)>::deserialize(d)?;
        Ok(Ts::new(s, n))
    }
}

/// One object of the promoted tree. Kept small (136 bytes plus its relative path): a
/// job holds one per object for its whole life (docs/promote.md, Memory). In the
/// journal it is written with the fields of [`EntryOut`].
#[derive(Clone, Debug)]
pub struct Entry {
    /// The path relative to the promoted top ("" for the top itself, any bytes), then,
    /// for a `Link`, a NUL and the `rel` of the first name (no path holds a NUL).
    names: Box<OsStr>,
    pub kind: EntryKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub atime: Ts,
    pub mtime: Ts,
    pub ctime: Ts,
    /// st_dev / st_ino of the source on the local backend.
    pub dev: u64,
    pub ino: u64,
    /// The blake3 digest of a file's content (known from `staged` on).
    pub digest: Option<[u8; 32]>,
    /// Whether this entry is renamed into place on its own at commit.
    pub unit: bool,
    /// Whether the target existed on Atlas when planned (merge only).
    pub target_exists: bool,
    /// Inode number of the staged copy on Atlas (known from `staged` on; 0: unknown).
    staged: u64,
}

/// An entry as the journal writes it (version 1's fields; paths per [`bytes`]).
#[derive(Serialize)]
struct EntryOut<'a> {
    #[serde(with = "bytes")]
    rel: &'a OsStr,
    kind: EntryKind,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    atime: Ts,
    mtime: Ts,
    ctime: Ts,
    dev: u64,
    ino: u64,
    #[serde(with = "bytes_opt", skip_serializing_if = "Option::is_none")]
    link_to: Option<&'a OsStr>,
    #[serde(with = "digest_text", skip_serializing_if = "Option::is_none")]
    digest: Option<[u8; 32]>,
    unit: bool,
    target_exists: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    staged_ino: Option<u64>,
}

/// An entry as the journal holds it (unknown fields, like version 1's `alloc`, are
/// ignored).
#[derive(Deserialize)]
struct EntryIn {
    #[serde(with = "bytes")]
    rel: OsString,
    kind: EntryKind,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    atime: Ts,
    mtime: Ts,
    ctime: Ts,
    dev: u64,
    ino: u64,
    #[serde(default, with = "bytes_opt")]
    link_to: Option<OsString>,
    #[serde(default, with = "digest_text")]
    digest: Option<[u8; 32]>,
    #[serde(default)]
    unit: bool,
    #[serde(default)]
    target_exists: bool,
    #[serde(default)]
    staged_ino: Option<u64>,
}

impl Serialize for Entry {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        EntryOut {
            rel: self.rel(),
            kind: self.kind,
            mode: self.mode,
            uid: self.uid,
            gid: self.gid,
            size: self.size,
            atime: self.atime,
            mtime: self.mtime,
            ctime: self.ctime,
            dev: self.dev,
            ino: self.ino,
            link_to: self.link_to(),
            digest: self.digest,
            unit: self.unit,
            target_exists: self.target_exists,
            staged_ino: self.staged_ino(),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Entry {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Entry, D::Error> {
        let e = EntryIn::deserialize(d)?;
        if e.rel.as_bytes().contains(&0) {
            return Err(serde::de::Error::custom("a path with a NUL"));
        }
        let mut out = Entry {
            names: e.rel.into_boxed_os_str(),
            kind: e.kind,
            mode: e.mode,
            uid: e.uid,
            gid: e.gid,
            size: e.size,
            atime: e.atime,
            mtime: e.mtime,
            ctime: e.ctime,
            dev: e.dev,
            ino: e.ino,
            digest: e.digest,
            unit: e.unit,
            target_exists: e.target_exists,
            staged: e.staged_ino.unwrap_or(0),
        };
        if let Some(l) = e.link_to {
            out.set_link_to(&l);
        }
        Ok(out)
    }
}

impl Entry {
    /// An entry for `rel` from the source's lstat.
    pub fn new(rel: &OsStr, kind: EntryKind, st: &libc::stat) -> Entry {
        Entry {
            names: rel.into(),
            kind,
            mode: st.st_mode,
            uid: st.st_uid,
            gid: st.st_gid,
            size: st.st_size as u64,
            atime: Ts::new(st.st_atime, st.st_atime_nsec),
            mtime: Ts::new(st.st_mtime, st.st_mtime_nsec),
            ctime: Ts::new(st.st_ctime, st.st_ctime_nsec),
            dev: st.st_dev,
            ino: st.st_ino,
            digest: None,
            unit: false,
            target_exists: false,
            staged: 0,
        }
    }

    pub fn is_dir(&self) -> bool {
        self.kind == EntryKind::Dir
    }

    /// Path relative to the promoted top ("" for the top itself).
    pub fn rel(&self) -> &OsStr {
        let b = self.names.as_bytes();
        OsStr::from_bytes(b.split(|c| *c == 0).next().unwrap_or(b))
    }

    /// For `Link`: the `rel` of the first name.
    pub fn link_to(&self) -> Option<&OsStr> {
        let b = self.names.as_bytes();
        let i = b.iter().position(|c| *c == 0)?;
        Some(OsStr::from_bytes(&b[i + 1..]))
    }

    pub fn set_link_to(&mut self, first: &OsStr) {
        let mut v = self.rel().as_bytes().to_vec();
        v.push(0);
        v.extend_from_slice(first.as_bytes());
        self.names = OsString::from_vec(v).into_boxed_os_str();
    }

    /// Inode number of the staged copy on Atlas, once staged.
    pub fn staged_ino(&self) -> Option<u64> {
        (self.staged != 0).then_some(self.staged)
    }

    pub fn set_staged_ino(&mut self, ino: Option<u64>) {
        self.staged = ino.unwrap_or(0);
    }

    /// `blake3:<hex>`, the `user.labfs.digest` tag of a file.
    pub fn digest_tag(&self) -> Option<String> {
        self.digest.map(|d| digest_tag(&d))
    }
}

/// `blake3:<hex>` of a digest.
pub fn digest_tag(d: &[u8; 32]) -> String {
    format!("blake3:{}", blake3::Hash::from_bytes(*d).to_hex())
}

/// Paths in the journal: a JSON string when the bytes are UTF-8 (every journal of
/// version 1 reads the same), else `{"hex": "<the bytes in hex>"}`, so any name a
/// backend can hold round-trips exactly.
pub mod bytes {
    use std::ffi::{OsStr, OsString};
    use std::os::unix::ffi::{OsStrExt, OsStringExt};

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize)]
    #[serde(untagged)]
    enum ReprOut<'a> {
        Text(&'a str),
        Raw { hex: String },
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Text(String),
        Raw { hex: String },
    }

    pub fn to_repr(b: &[u8]) -> impl Serialize + '_ {
        match std::str::from_utf8(b) {
            Ok(s) => ReprOut::Text(s),
            Err(_) => ReprOut::Raw {
                hex: b.iter().map(|x| format!("{x:02x}")).collect(),
            },
        }
    }

    pub fn from_hex(h: &str) -> Option<Vec<u8>> {
        if h.len() % 2 != 0 {
            return None;
        }
        (0..h.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(h.get(i..i + 2)?, 16).ok())
            .collect()
    }

    pub fn serialize<S: Serializer, P: AsRef<OsStr> + ?Sized>(
        p: &P,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        to_repr(p.as_ref().as_bytes()).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>, T: From<OsString>>(d: D) -> Result<T, D::Error> {
        let v = match Repr::deserialize(d)? {
            Repr::Text(t) => t.into_bytes(),
            Repr::Raw { hex } => {
                from_hex(&hex).ok_or_else(|| serde::de::Error::custom("bad hex in a path"))?
            }
        };
        Ok(T::from(OsString::from_vec(v)))
    }
}

/// [`bytes`] for optional paths.
pub mod bytes_opt {
    use std::ffi::{OsStr, OsString};

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer, P: AsRef<OsStr>>(
        p: &Option<P>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match p {
            Some(p) => super::bytes::serialize(p.as_ref(), s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>, T: From<OsString>>(
        d: D,
    ) -> Result<Option<T>, D::Error> {
        #[derive(Deserialize)]
        struct W(#[serde(with = "super::bytes")] OsString);
        Ok(Option::<W>::deserialize(d)?.map(|w| T::from(w.0)))
    }
}

mod digest_text {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<[u8; 32]>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&super::digest_tag(d)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<[u8; 32]>, D::Error> {
        let Some(t) = Option::<String>::deserialize(d)? else {
            return Ok(None);
        };
        let hex = t.strip_prefix("blake3:").unwrap_or(&t);
        blake3::Hash::from_hex(hex)
            .map(|h| Some(*h.as_bytes()))
            .map_err(|_| serde::de::Error::custom("bad digest"))
    }
}

/// The journal versions this labfs reads: 1 (paths always UTF-8) and 2 (paths may be
/// `{"hex": ...}`). It writes 2.
pub const VERSION: u32 = 2;

/// The whole journal of one job.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Journal {
    pub version: u32,
    pub id: String,
    /// Namespace path of the promoted top.
    #[serde(with = "bytes")]
    pub path: OsString,
    pub host: String,
    pub merge: bool,
    pub state: State,
    /// Staging directory, relative to the Atlas root (namespace style).
    pub staging: String,
    /// Tag values for every promoted object.
    pub class: String,
    pub promoted_at: String,
    pub origin: String,
    pub entries: Vec<Entry>,
}

impl Journal {
    /// Namespace path of an entry.
    pub fn ns_path(&self, rel: &OsStr) -> OsString {
        ns_of(&self.path, rel)
    }

    /// Path of an entry's staged copy, relative to the staging directory.
    pub fn staged_rel(rel: &OsStr) -> OsString {
        if rel.is_empty() {
            OsString::from("data")
        } else {
            let mut v = b"data/".to_vec();
            v.extend_from_slice(rel.as_bytes());
            OsString::from_vec(v)
        }
    }

    fn file_name(id: &str) -> String {
        format!("{id}.json")
    }

    /// Write the journal atomically.
    pub fn save(&self, local: &Backend) -> Result<()> {
        let dfd = ensure_dir(local)?;
        let name = Self::file_name(&self.id);
        let tmp = format!(".{name}.tmp");
        let (cname, ctmp) = (cstr(&name)?, cstr(&tmp)?);
        let fd = util::open_at(
            dfd.as_raw_fd(),
            &ctmp,
            libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC,
            0o600,
        )?;
        {
            // Streamed: a journal of a million objects is never one buffer in memory.
            let mut w =
                std::io::BufWriter::with_capacity(256 << 10, std::fs::File::from(fd.try_clone()?));
            serde_json::to_writer(&mut w, self).map_err(|_| Error::Errno(libc::EINVAL))?;
            std::io::Write::flush(&mut w)?;
        }
        util::fsync_fd(fd.as_raw_fd())?;
        drop(fd);
        util::rename_at(dfd.as_raw_fd(), &ctmp, dfd.as_raw_fd(), &cname, false)?;
        util::fsync_dir(dfd.as_raw_fd())
    }

    /// Remove the journal (the job is over).
    pub fn remove(local: &Backend, id: &str) -> Result<()> {
        let dfd = ensure_dir(local)?;
        let c = cstr(&Self::file_name(id))?;
        match util::unlink_at(dfd.as_raw_fd(), &c, false) {
            Err(e) if e.errno() != libc::ENOENT => return Err(e),
            _ => {}
        }
        util::fsync_dir(dfd.as_raw_fd())
    }

    /// Every journal on the local backend: `(id, parsed journal or the parse error)`.
    pub fn list(local: &Backend) -> Result<Vec<(String, std::result::Result<Journal, String>)>> {
        let dfd = match local.open_beneath(DIR, libc::O_RDONLY | libc::O_DIRECTORY) {
            Ok(fd) => fd,
            Err(e) if e.errno() == libc::ENOENT => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let pfd = local.open_dir(DIR)?;
        let mut out = Vec::new();
        for (name, _) in crate::fs::handle::list_dir(dfd)? {
            let Some(n) = name.to_str() else { continue };
            if n.starts_with('.') {
                if n.ends_with(".json.tmp") {
                    // A journal write that never completed: the previous version stands.
                    if let Ok(c) = CString::new(n) {
                        let _ = util::unlink_at(pfd.as_raw_fd(), &c, false);
                    }
                }
                continue;
            }
            let Some(id) = n.strip_suffix(".json") else {
                continue;
            };
            let parsed = read_journal(&pfd, n);
            out.push((id.to_string(), parsed));
        }
        Ok(out)
    }
}

fn read_journal(dfd: &OwnedFd, name: &str) -> std::result::Result<Journal, String> {
    let c = cstr(name).map_err(|e| e.to_string())?;
    let fd = util::open_at(dfd.as_raw_fd(), &c, libc::O_RDONLY, 0).map_err(|e| e.to_string())?;
    let r = std::io::BufReader::with_capacity(256 << 10, std::fs::File::from(fd));
    serde_json::from_reader::<_, Journal>(r).map_err(|e| format!("unreadable journal: {e}"))
}

/// Namespace path of `rel` under `top`.
pub fn ns_of(top: &OsStr, rel: &OsStr) -> OsString {
    if rel.is_empty() {
        top.to_os_string()
    } else {
        crate::fs::object::join(top, rel)
    }
}

/// `LOCAL/.labfs/promote`, created (0700, root) when missing.
fn ensure_dir(local: &Backend) -> Result<OwnedFd> {
    match local.open_dir(DIR) {
        Ok(fd) => return Ok(fd),
        Err(e) if e.errno() != libc::ENOENT => return Err(e),
        Err(_) => {}
    }
    let root = local.open_dir("/")?;
    util::mkdir_p1(root.as_raw_fd(), &cstr(".labfs")?, 0o755)?;
    let l = local.open_dir("/.labfs")?;
    util::mkdir_p1(l.as_raw_fd(), &cstr("promote")?, 0o700)?;
    local.open_dir(DIR)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Entry {
        let mut st = crate::sys::empty_stat();
        st.st_mode = libc::S_IFREG | 0o640;
        st.st_size = 5;
        st.st_ino = 42;
        st.st_mtime = 1_700_000_000;
        st.st_mtime_nsec = 123;
        let mut e = Entry::new(
            OsStr::from_bytes(b"d\xff\xfe/caf\xe9"),
            EntryKind::Link,
            &st,
        );
        e.set_link_to(OsStr::from_bytes(b"first\xe9"));
        e.digest = Some([9u8; 32]);
        e.set_staged_ino(Some(77));
        e
    }

    #[test]
    fn entries_stay_small() {
        assert!(
            std::mem::size_of::<Entry>() <= 136,
            "{}",
            std::mem::size_of::<Entry>()
        );
    }

    #[test]
    fn any_bytes_round_trip_through_the_journal_format() {
        let e = sample();
        let text = serde_json::to_string(&e).expect("serialize");
        assert!(
            text.contains(r#""rel":{"hex":"64fffe2f636166e9"}"#),
            "{text}"
        );
        assert!(
            text.contains(r#""link_to":{"hex":"6669727374e9"}"#),
            "{text}"
        );
        let back: Entry = serde_json::from_str(&text).expect("parse");
        assert_eq!(back.rel().as_bytes(), b"d\xff\xfe/caf\xe9");
        assert_eq!(back.link_to().map(OsStr::as_bytes), Some(&b"first\xe9"[..]));
        assert_eq!(back.digest, Some([9u8; 32]));
        assert_eq!(back.staged_ino(), Some(77));
        assert_eq!(back.mtime.pair(), (1_700_000_000, 123));
    }

    #[test]
    fn a_version_1_entry_reads_as_before() {
        let v1 = r#"{"rel":"sub/a.txt","kind":"file","mode":33188,"uid":0,"gid":0,"size":6,
            "alloc":4096,"atime":[1,2],"mtime":[3,4],"ctime":[5,6],"dev":7,"ino":8,
            "digest":"blake3:0909090909090909090909090909090909090909090909090909090909090909",
            "unit":false,"target_exists":false,"staged_ino":99}"#;
        let e: Entry = serde_json::from_str(v1).expect("parse v1");
        assert_eq!(e.rel(), OsStr::new("sub/a.txt"));
        assert_eq!(e.link_to(), None);
        assert_eq!(e.digest, Some([9u8; 32]));
        assert_eq!(e.staged_ino(), Some(99));
        assert_eq!(e.ctime.pair(), (5, 6));
    }
}
