//! The one error type of the filesystem core and the one errno table.
//!
//! A backend's own errno (ESTALE or EIO from NFS, ENOSPC from the SSD) reaches the
//! caller unchanged through [`Error::Io`]. labfs's own refusals are named variants,
//! decided where the refusal is decided, and carry what a person needs to act on them.
//! [`Error::errno`] and [`Error::level`] are the table: the errno the kernel gets and
//! the level at which a failure is worth logging (ENOENT is not a warning).

use std::io;

use tracing::Level;

/// Result of every core operation.
pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The backend's own answer, passed through unchanged.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// A write under a `read_only` rule by someone not listed in `writers`.
    #[error("{path}: read-only (rule {rule})")]
    ReadOnly { path: String, rule: String },
    /// A new name for an object reached under a `read_only` rule that labfs could not
    /// record on the object (src/fs/ro_marker.rs): refused, never made unprotected.
    #[error(
        "{path}: not linked: {from} is read-only and the link cannot be recorded on the \
         object as user.labfs.ro ({why})"
    )]
    ReadOnlyUnrecorded {
        path: String,
        from: String,
        why: String,
    },
    /// Rename or link between paths stored on different backends.
    #[error("{from} -> {to}: crosses backends ({from_backend} -> {to_backend})")]
    CrossBackend {
        from: String,
        to: String,
        from_backend: &'static str,
        to_backend: &'static str,
    },
    /// `unplaced = "deny"` and no rule covers the path.
    #[error("{path}: no rule places this path; placement must be documented before deployment")]
    Unplaced { path: String },
    /// Atlas did not answer within the configured bound.
    #[error("{path}: Atlas is not answering (rule {rule})")]
    AtlasUnavailable { path: String, rule: String },
    /// A write to a labfs-owned `user.labfs.*` attribute.
    #[error("{name}: labfs attributes are read-only")]
    ReservedXattr { name: String },
    /// The caller's identity could not be assumed on the dispatching thread: the
    /// request must not run at all (it would run as someone else).
    #[error("cannot act as uid {uid} gid {gid}: {source}")]
    Identity {
        uid: u32,
        gid: u32,
        source: io::Error,
    },
    /// The inode or handle the kernel named is no longer known.
    #[error("stale inode or handle")]
    Stale,
    /// A plain errno decided by labfs with no more to say.
    #[error("errno {0}")]
    Errno(i32),
}

impl Error {
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            Error::ReadOnly { .. } | Error::ReadOnlyUnrecorded { .. } => libc::EROFS,
            Error::CrossBackend { .. } => libc::EXDEV,
            Error::Unplaced { .. } => libc::EACCES,
            Error::AtlasUnavailable { .. } => libc::ETIMEDOUT,
            Error::ReservedXattr { .. } => libc::EPERM,
            Error::Identity { .. } => libc::EPERM,
            Error::Stale => libc::ESTALE,
            Error::Errno(e) => *e,
        }
    }

    /// The level at which this failure is logged.
    pub fn level(&self) -> Level {
        match self {
            // labfs's own refusals: worth a line, not an alarm.
            Error::ReadOnly { .. }
            | Error::CrossBackend { .. }
            | Error::Unplaced { .. }
            | Error::ReservedXattr { .. } => Level::INFO,
            Error::AtlasUnavailable { .. } | Error::ReadOnlyUnrecorded { .. } => Level::WARN,
            // The daemon cannot do its job safely: always worth an alarm.
            Error::Identity { .. } => Level::ERROR,
            _ => errno_level(self.errno()),
        }
    }

    pub fn errno_of(e: i32) -> Error {
        Error::Errno(e)
    }

    /// True when this is labfs refusing by rule (logged once per path).
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            Error::ReadOnly { .. } | Error::CrossBackend { .. } | Error::Unplaced { .. }
        )
    }
}

/// The level of a plain errno: expected outcomes of normal programs are debug.
pub fn errno_level(errno: i32) -> Level {
    match errno {
        libc::ENOENT
        | libc::EEXIST
        | libc::ENOTEMPTY
        | libc::ENODATA
        | libc::ENOTDIR
        | libc::EISDIR
        | libc::EAGAIN
        | libc::EINTR
        | libc::ENOSYS
        | libc::EOPNOTSUPP
        | libc::ERANGE
        | libc::ELOOP
        | libc::EXDEV
        | libc::ENOTTY
        | libc::ESPIPE
        | libc::ENXIO
        | libc::EINVAL
        | libc::EBADF
        | libc::ENAMETOOLONG => Level::DEBUG,
        libc::EACCES
        | libc::EPERM
        | libc::EROFS
        | libc::ENOSPC
        | libc::EDQUOT
        | libc::EFBIG
        | libc::EMLINK
        | libc::EBUSY
        | libc::ETXTBSY => Level::INFO,
        _ => Level::WARN,
    }
}

/// `Err` from the calling thread's errno.
pub fn last_os_error<T>() -> Result<T> {
    Err(Error::Io(io::Error::last_os_error()))
}

/// Turn a libc return value into a Result, reading errno on -1.
pub fn check(ret: libc::c_int) -> Result<libc::c_int> {
    if ret < 0 {
        last_os_error()
    } else {
        Ok(ret)
    }
}

/// As [`check`], for calls returning `ssize_t`.
pub fn check_size(ret: libc::ssize_t) -> Result<usize> {
    if ret < 0 {
        last_os_error()
    } else {
        Ok(ret as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_errno_passes_through_unchanged() {
        let e = Error::from(io::Error::from_raw_os_error(libc::ESTALE));
        assert_eq!(e.errno(), libc::ESTALE);
        assert_eq!(e.level(), Level::WARN);
    }

    #[test]
    fn enoent_is_not_a_warning() {
        assert_eq!(Error::Errno(libc::ENOENT).level(), Level::DEBUG);
    }

    #[test]
    fn refusals_have_their_errno() {
        let ro = Error::ReadOnly {
            path: "/media/x".into(),
            rule: "/media (line 3)".into(),
        };
        assert_eq!(ro.errno(), libc::EROFS);
        assert_eq!(ro.to_string(), "/media/x: read-only (rule /media (line 3))");
        assert_eq!(Error::Unplaced { path: "/x".into() }.errno(), libc::EACCES);
    }
}
