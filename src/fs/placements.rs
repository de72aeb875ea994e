//! How often each rule decided a placement since the mount started (`labfs status`).
//!
//! Counted by the core on every resolve ([`super::LabFs::placement`]) and read by
//! [`crate::stats`]; kept here, in the core that decides placements, so the core does
//! not call up into the reporting code. A hit takes a shard read lock and one relaxed
//! add.

use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;

use crate::rules::Placement;

#[derive(Default)]
pub struct PlacementCounts {
    by_rule: DashMap<String, AtomicU64>,
    unplaced: AtomicU64,
}

impl PlacementCounts {
    /// Count one placement decision by its rule.
    pub fn count(&self, p: &Placement) {
        let Some(rule) = &p.rule else {
            self.unplaced.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if let Some(c) = self.by_rule.get(rule.path.as_str()) {
            c.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.by_rule
            .entry(rule.path.clone())
            .or_insert_with(|| AtomicU64::new(0))
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Decisions made by the rule with pattern `rule`.
    pub fn hits(&self, rule: &str) -> u64 {
        self.by_rule
            .get(rule)
            .map(|c| c.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// Decisions for paths no rule matched.
    pub fn unplaced(&self) -> u64 {
        self.unplaced.load(Ordering::Relaxed)
    }
}
