//! Exit codes of every `labfs` command, in one place so commands need not import the
//! command line to say how they ended: 0 ok, 1 operational error, 2 usage or
//! configuration error.

pub const EXIT_OK: i32 = 0;
pub const EXIT_FAIL: i32 = 1;
pub const EXIT_USAGE: i32 = 2;
