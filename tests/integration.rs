//! The one integration test binary: every test mounts its own labfs over two private
//! tmpfs backends (see `common::MountedLab`) and checks what a user sees through it.
//! Must run as root with /dev/fuse present (`.ci/run` sets that up).

mod budget;
mod cache;
mod common;
mod conformance;
mod failclosed;
mod identity;
mod inode_flags;
mod inodes;
mod listing;
mod namespace;
mod nfs;
mod operations;
mod posix;
mod promote;
mod security;
mod tools;
mod transport;
mod xattrs;
