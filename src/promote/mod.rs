//! Promotion of transitional data to Atlas (see docs/promote.md).

/// Whether a promotion of `path` (or a tree containing it) is under way.
pub fn in_flight(_path: &str) -> bool {
    false
}

/// Complete or roll back promotions interrupted by a crash (journal replay).
pub fn recover_on_mount(_fs: &crate::fs::LabFs) {}

/// Stop or journal promotions before unmounting.
pub fn shutdown(_fs: &crate::fs::LabFs) {}
