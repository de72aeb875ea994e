//! How the core reads the tags promotion stores, without knowing where they are kept.
//!
//! The core needs one thing from promotion's tags: whether a transitional path found
//! on Atlas was promoted there (and, for `user.labfs.*`, a tag's value). Where the
//! tags live (xattrs on Atlas, or the record store for an Atlas without user xattrs)
//! is [`crate::tags`]'s business; it implements [`TagReader`] and the daemon hands the
//! reader to [`super::LabFs::new`]. So `fs/` never imports `tags`, which builds on
//! `fs/` (backends, credentials).
//!
//! The tag names are defined here, with the core that answers them; `tags` re-exports
//! them for promotion.

use std::ffi::{CStr, OsStr};
use std::os::fd::RawFd;

use super::Backend;
use crate::error::Result;

pub const PREFIX: &str = "user.labfs.";
pub const CLASS: &str = "user.labfs.class";
pub const PROMOTED_AT: &str = "user.labfs.promoted_at";
pub const ORIGIN: &str = "user.labfs.origin";
pub const DIGEST: &str = "user.labfs.digest";

/// Reads stored tags of `name` in the Atlas directory `dirfd` (namespace `path`).
pub trait TagReader: Send + Sync {
    /// One tag's value; `Ok(None)` when absent; the error when it cannot be read
    /// (never turned into "absent": a promoted entry must not silently vanish).
    fn try_read_tag(
        &self,
        atlas: &Backend,
        dirfd: RawFd,
        name: &CStr,
        path: &OsStr,
        tag: &str,
    ) -> Result<Option<Vec<u8>>>;

    /// As [`TagReader::try_read_tag`], an unreadable tag counting as absent.
    fn read_tag(
        &self,
        atlas: &Backend,
        dirfd: RawFd,
        name: &CStr,
        path: &OsStr,
        tag: &str,
    ) -> Option<Vec<u8>> {
        self.try_read_tag(atlas, dirfd, name, path, tag)
            .ok()
            .flatten()
    }

    /// Whether the object was promoted (it carries a stored class).
    fn is_promoted(
        &self,
        atlas: &Backend,
        dirfd: RawFd,
        name: &CStr,
        path: &OsStr,
    ) -> Result<bool> {
        Ok(self
            .try_read_tag(atlas, dirfd, name, path, CLASS)?
            .is_some())
    }
}
