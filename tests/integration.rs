//! The one integration test binary: every test mounts its own labfs over two private
//! tmpfs backends (see `common::MountedLab`) and checks what a user sees through it.
//! Must run as root with /dev/fuse present (`.ci/run` sets that up).

mod common;
mod failclosed;
mod identity;
mod namespace;
mod nfs;
mod operations;
mod posix;
mod promote;
mod security;
mod tools;
mod xattrs;
