//! labfs: one `/lab` namespace over Atlas (NFS) and local SSD, routed by placement rules.
//!
//! Architecture map (docs/architecture.md tells the same story at more length):
//! - [`rules`]: pure placement: namespace path -> class, backend, rule.
//! - [`config`]: the rules file -> [`config::Config`], every error with its line.
//! - [`error`]: the one error type and the one errno table.
//! - [`fs`]: the filesystem core (inodes, handles, backends); never sees fuser types.
//! - [`fuse`]: the only module that imports fuser; replies and dispatch lanes.
//! - [`daemon`]: mount lifecycle: readiness, signals, clean unmount.
//! - [`cli`]: the command line.

pub mod cli;
pub mod config;
pub mod daemon;
pub mod error;
pub mod fs;
pub mod fuse;
pub mod rules;
pub mod control;
pub mod promote;
pub mod status;
pub mod tags;
pub mod atlas_id;
pub mod check;
pub mod explain;
pub mod backup_scope;
pub mod mount_helper;
pub mod stats;
