//! Inode flags (`chattr`/`lsattr`): FS_IOC_GETFLAGS and FS_IOC_SETFLAGS on an open
//! file, passed to the backend object as the caller. The kernel checks ownership and
//! CAP_LINUX_IMMUTABLE against the fsuid labfs assumes, so a caller can set only what
//! it could set on the backend itself; a backend without inode flags answers its own
//! errno (ENOTTY, EOPNOTSUPP), unchanged. FS_IOC_FSGETXATTR is answered too (the
//! kernel's FUSE client asks it with every GETFLAGS). Other ioctls are ENOTTY.

use super::handle::Need;
use super::{Ctx, LabFs};
use crate::error::{Error, Result};
use crate::sys;

/// `_IOR('f', 1, long)` and `_IOW('f', 2, long)`: the flags travel as an int.
pub const FS_IOC_GETFLAGS: u32 = 0x8008_6601;
pub const FS_IOC_SETFLAGS: u32 = 0x4008_6602;
/// `_IOR('X', 31, struct fsxattr)`: the kernel asks it next to GETFLAGS.
pub const FS_IOC_FSGETXATTR: u32 = 0x801c_581f;

impl LabFs {
    /// An ioctl on open file `fh` of inode `ino`: the reply's data.
    pub fn ioctl(&self, ctx: &Ctx, ino: u64, fh: u64, cmd: u32, input: &[u8]) -> Result<Vec<u8>> {
        tracing::debug!(cmd = format_args!("{cmd:#x}"), len = input.len(), "ioctl");
        if ![FS_IOC_GETFLAGS, FS_IOC_SETFLAGS, FS_IOC_FSGETXATTR].contains(&cmd) {
            return Err(Error::Errno(libc::ENOTTY));
        }
        // Directories reach here with a directory handle, which holds no readable
        // descriptor: their flags are not offered.
        let h = self.handles.file(fh).ok_or(Error::Errno(libc::EBADF))?;
        // A readable descriptor: the handle's own, or the object opened again (the
        // daemon dropped its own for passthrough). SETFLAGS checks ownership, not the
        // access mode.
        let fd = self.handle_fd(&h, Need::Read)?;
        let creds = self.creds(ctx);
        if cmd == FS_IOC_FSGETXATTR {
            let _as = creds.assume()?;
            return Ok(sys::get_fsxattr(&fd).map_err(Error::Io)?.to_vec());
        }
        if cmd == FS_IOC_GETFLAGS {
            let _as = creds.assume()?;
            let flags = sys::get_inode_flags(&fd).map_err(Error::Io)?;
            return Ok(flags.to_ne_bytes().to_vec());
        }
        let bytes: [u8; 4] = input
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .ok_or(Error::Errno(libc::EINVAL))?;
        // Through every name of the object, like any other write (`read_only` holds).
        self.check_writable_ino(ctx, ino)?;
        let _as = creds.assume()?;
        sys::set_inode_flags(&fd, u32::from_ne_bytes(bytes)).map_err(Error::Io)?;
        Ok(Vec::new())
    }
}
