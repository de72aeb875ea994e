//! The control path: requests that travel through the mount itself, so they work
//! from the host and from inside a container that bind-mounts only a subpath.
//!
//! A control request is an xattr call on any path of the mount, with a name under
//! `user.labfs.ctl.` (never listed, never stored):
//! - `getfattr -n user.labfs.ctl.status PATH` -> the mount's status as JSON.
//! - `getfattr -n user.labfs.ctl.explain PATH` -> PATH's placement as JSON.
//!
//! Control names are answered before anything reaches a backend.

use crate::error::Result;
use crate::fs::{Ctx, LabFs};

pub const PREFIX: &str = "user.labfs.ctl.";
pub const STATUS: &str = "user.labfs.ctl.status";
pub const EXPLAIN: &str = "user.labfs.ctl.explain";

/// Answer a control getxattr; `None` when `name` is not a control name.
pub fn get(fs: &LabFs, ctx: &Ctx, ino: u64, name: &str) -> Result<Option<Vec<u8>>> {
    if !name.starts_with(PREFIX) {
        return Ok(None);
    }
    match name {
        STATUS => Ok(Some(crate::status::collect(fs).to_json().into_bytes())),
        EXPLAIN => {
            let loc = fs.locate_ino(&fs.creds(ctx), ino)?;
            let mut e = crate::explain::Explained::from_placement(&loc.path, &loc.placement);
            e.backend = loc.backend.to_string();
            e.state = fs.virtual_xattr(&loc, "user.labfs.state");
            if let Some(c) = fs.virtual_xattr(&loc, "user.labfs.class") {
                e.class = c;
            }
            Ok(Some(serde_json::to_vec(&e).unwrap_or_default()))
        }
        _ => Err(crate::error::Error::Errno(libc::ENODATA)),
    }
}

/// Handle a control setxattr; `false` when `name` is not a control name.
pub fn set(_fs: &LabFs, _ctx: &Ctx, _ino: u64, name: &str, _value: &[u8]) -> Result<bool> {
    if !name.starts_with(PREFIX) {
        return Ok(false);
    }
    Err(crate::error::Error::Errno(libc::EINVAL))
}
