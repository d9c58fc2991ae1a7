//! One byte budget for everything the runtime places in its device budget: the expert
//! pool's slots and the KV cache's pages.
//!
//! Both pools reserve through the same [`DeviceBudget`] before they hand a slot or a page
//! out, and give the bytes back when it is freed, so one place knows every byte and
//! `expert_bytes + kv_bytes <= limit` holds after every call, whatever the interleaving
//! (one mutex; each call checks and updates under it).
//!
//! Three bounds shape the split: `kv_floor` bytes are kept for KV pages even while the
//! pages are not in use (experts cannot take them), `kv_ceiling` caps the KV pages, and
//! `expert_floor` bytes are kept for experts (every expert's lowest-tier block and the
//! staging slots of transitions in flight: KV pages cannot take them, so a demotion that
//! frees bytes for pages can always reserve its new block).
//!
//! The tracker also counts the bytes that changed use: when experts give bytes back and
//! KV pages then take bytes beyond their floor, the overlap counts as moved to KV (and the
//! other way round), so telemetry can show how much of the budget followed the load.
//! Bytes within the KV floor were never the experts' to give or take, so they never count
//! (the expert floor is a protection the runtime moves with its tiers, not a share).
//!
//! The mutex is `std`'s even under loom: it is only ever taken inside the pool's own lock
//! (never the other way round), so it adds no interleaving loom would need to explore.

use std::sync::Mutex;

use crate::errors::{Error, Result};

/// What a reservation is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BudgetUse {
    /// Expert slots (any tier, published or staging).
    Experts,
    /// KV-cache pages.
    KvPages,
}

impl BudgetUse {
    pub fn name(self) -> &'static str {
        match self {
            BudgetUse::Experts => "experts",
            BudgetUse::KvPages => "kv pages",
        }
    }
}

/// A consistent view of the tracker (taken under its lock).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BudgetSnapshot {
    pub limit: u64,
    pub expert_bytes: u64,
    pub kv_bytes: u64,
    /// Bytes kept for KV pages even while unused.
    pub kv_floor: u64,
    /// Most bytes KV pages may hold.
    pub kv_ceiling: u64,
    /// Bytes kept for experts even while unused.
    pub expert_floor: u64,
    /// Highest `expert_bytes + kv_bytes` seen.
    pub high_water: u64,
    /// Bytes experts gave back that KV pages took next.
    pub moved_to_kv: u64,
    /// Bytes KV pages gave back that experts took next.
    pub moved_to_experts: u64,
}

impl BudgetSnapshot {
    /// Bytes in use by both.
    pub fn used(&self) -> u64 {
        self.expert_bytes + self.kv_bytes
    }
    /// Bytes that count against the limit: each use counts at least its floor.
    pub fn charged(&self) -> u64 {
        self.expert_bytes.max(self.expert_floor) + self.kv_bytes.max(self.kv_floor)
    }
    /// Bytes experts could still take.
    pub fn expert_headroom(&self) -> u64 {
        self.limit
            .saturating_sub(self.expert_bytes + self.kv_bytes.max(self.kv_floor))
    }
    /// Bytes KV pages could still take.
    pub fn kv_headroom(&self) -> u64 {
        let experts = self.expert_bytes.max(self.expert_floor);
        let by_limit = self.limit.saturating_sub(experts + self.kv_bytes);
        by_limit.min(self.kv_ceiling.saturating_sub(self.kv_bytes))
    }
}

#[derive(Debug)]
struct State {
    snap: BudgetSnapshot,
    /// Bytes experts gave back that nobody has taken since.
    freed_by_experts: u64,
    /// Bytes KV pages gave back that nobody has taken since.
    freed_by_kv: u64,
}

/// The shared tracker. Pools hold it in an `Arc`.
#[derive(Debug)]
pub struct DeviceBudget {
    state: Mutex<State>,
}

impl DeviceBudget {
    /// A budget of `limit` bytes with no KV bounds (floor 0, ceiling = limit).
    pub fn new(limit: u64) -> Result<Self> {
        Self::with_kv_bounds(limit, 0, limit)
    }

    /// A budget of `limit` bytes, keeping `kv_floor` for KV pages and letting them hold at
    /// most `kv_ceiling`.
    pub fn with_kv_bounds(limit: u64, kv_floor: u64, kv_ceiling: u64) -> Result<Self> {
        if limit == 0 {
            return Err(Error::InvalidConfig("budget must be > 0".into()));
        }
        if kv_floor > kv_ceiling {
            return Err(Error::InvalidConfig(format!(
                "the KV floor ({kv_floor} B) is above the KV ceiling ({kv_ceiling} B)"
            )));
        }
        if kv_floor > limit {
            return Err(Error::InvalidConfig(format!(
                "the KV floor ({kv_floor} B) is above the budget ({limit} B)"
            )));
        }
        Ok(Self {
            state: Mutex::new(State {
                snap: BudgetSnapshot {
                    limit,
                    kv_floor,
                    kv_ceiling: kv_ceiling.min(limit),
                    ..BudgetSnapshot::default()
                },
                freed_by_experts: 0,
                freed_by_kv: 0,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every critical section below leaves the state consistent before anything that
        // could panic, so a poisoned lock still holds valid numbers.
        match self.state.lock() {
            Ok(g) => g,
            Err(e) => e.into_inner(),
        }
    }

    pub fn snapshot(&self) -> BudgetSnapshot {
        self.lock().snap
    }
    pub fn limit(&self) -> u64 {
        self.lock().snap.limit
    }

    /// Whether `nbytes` more for `what` would fit now.
    pub fn fits(&self, what: BudgetUse, nbytes: u64) -> bool {
        let s = self.lock().snap;
        match what {
            BudgetUse::Experts => nbytes <= s.expert_headroom(),
            BudgetUse::KvPages => nbytes <= s.kv_headroom(),
        }
    }

    /// Reserve `nbytes` for `what`, or return the snapshot that refused it.
    pub fn try_take(
        &self,
        what: BudgetUse,
        nbytes: u64,
    ) -> std::result::Result<(), BudgetSnapshot> {
        let mut st = self.lock();
        let s = st.snap;
        let fits = match what {
            BudgetUse::Experts => nbytes <= s.expert_headroom(),
            BudgetUse::KvPages => nbytes <= s.kv_headroom(),
        };
        if !fits {
            return Err(s);
        }
        // Bytes a use takes come first from its floor and from what it gave back itself,
        // then from what the other use gave back (those moved).
        let (own, other, beyond_floor) = match what {
            BudgetUse::Experts => (st.freed_by_experts, st.freed_by_kv, nbytes),
            BudgetUse::KvPages => (
                st.freed_by_kv,
                st.freed_by_experts,
                (s.kv_bytes + nbytes).saturating_sub(s.kv_bytes.max(s.kv_floor)),
            ),
        };
        let from_own = beyond_floor.min(own);
        let moved = (beyond_floor - from_own).min(other);
        match what {
            BudgetUse::Experts => {
                st.freed_by_experts -= from_own;
                st.freed_by_kv -= moved;
                st.snap.expert_bytes += nbytes;
                st.snap.moved_to_experts += moved;
            }
            BudgetUse::KvPages => {
                st.freed_by_kv -= from_own;
                st.freed_by_experts -= moved;
                st.snap.kv_bytes += nbytes;
                st.snap.moved_to_kv += moved;
            }
        }
        st.snap.high_water = st.snap.high_water.max(st.snap.used());
        Ok(())
    }

    /// Give back `nbytes` that `what` reserved. Giving back more than is held is a bug in
    /// the caller; it is clamped (and asserted in debug builds) so the books stay sane.
    pub fn give(&self, what: BudgetUse, nbytes: u64) {
        let mut st = self.lock();
        let held = match what {
            BudgetUse::Experts => &mut st.snap.expert_bytes,
            BudgetUse::KvPages => &mut st.snap.kv_bytes,
        };
        debug_assert!(
            *held >= nbytes,
            "{} gives back more than it holds",
            what.name()
        );
        let n = nbytes.min(*held);
        let before = *held;
        *held -= n;
        match what {
            BudgetUse::Experts => st.freed_by_experts += n,
            // Only what was above the floor is free for experts to take.
            BudgetUse::KvPages => {
                st.freed_by_kv += before.saturating_sub((before - n).max(st.snap.kv_floor))
            }
        }
    }

    /// Keep `floor` bytes for experts (KV pages cannot take them). Refused when it would
    /// not fit beside the KV pages' current bytes (or their floor).
    pub fn set_expert_floor(&self, floor: u64) -> Result<()> {
        let mut st = self.lock();
        let s = st.snap;
        if floor + s.kv_bytes.max(s.kv_floor) > s.limit {
            return Err(Error::BudgetExceeded {
                class: "expert floor".into(),
                need: floor,
                reserved: s.used(),
                budget: s.limit,
            });
        }
        st.snap.expert_floor = floor;
        Ok(())
    }

    /// Move the KV bounds (e.g. the operator's `--min-kv-tokens` / `--max-kv-tokens`).
    /// Refused when the new floor would not fit beside the experts' current bytes; a
    /// ceiling below the pages in use only stops further growth.
    pub fn set_kv_bounds(&self, kv_floor: u64, kv_ceiling: u64) -> Result<()> {
        let mut st = self.lock();
        if kv_floor > kv_ceiling {
            return Err(Error::InvalidConfig(format!(
                "the KV floor ({kv_floor} B) is above the KV ceiling ({kv_ceiling} B)"
            )));
        }
        let s = st.snap;
        if s.expert_bytes.max(s.expert_floor) + s.kv_bytes.max(kv_floor) > s.limit {
            return Err(Error::BudgetExceeded {
                class: "kv floor".into(),
                need: kv_floor,
                reserved: s.used(),
                budget: s.limit,
            });
        }
        st.snap.kv_floor = kv_floor;
        st.snap.kv_ceiling = kv_ceiling.min(s.limit);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_uses_share_the_limit() {
        let b = DeviceBudget::new(1000).unwrap();
        b.try_take(BudgetUse::Experts, 600).unwrap();
        assert!(b.try_take(BudgetUse::KvPages, 401).is_err());
        b.try_take(BudgetUse::KvPages, 400).unwrap();
        assert!(b.try_take(BudgetUse::Experts, 1).is_err());
        let s = b.snapshot();
        assert_eq!((s.expert_bytes, s.kv_bytes, s.high_water), (600, 400, 1000));
    }

    #[test]
    fn floor_and_ceiling_bound_the_kv_share() {
        let b = DeviceBudget::with_kv_bounds(1000, 300, 500).unwrap();
        // Experts cannot take the KV floor even while no page is used.
        assert!(b.try_take(BudgetUse::Experts, 701).is_err());
        b.try_take(BudgetUse::Experts, 400).unwrap();
        // KV may not pass its ceiling although the limit has room.
        assert!(b.try_take(BudgetUse::KvPages, 501).is_err());
        b.try_take(BudgetUse::KvPages, 500).unwrap();
        assert!(b.try_take(BudgetUse::Experts, 101).is_err());
        b.try_take(BudgetUse::Experts, 100).unwrap();
        assert!(b.set_kv_bounds(600, 400).is_err());
        b.give(BudgetUse::KvPages, 500);
        // Raising the floor past what the experts leave is refused.
        assert!(b.set_kv_bounds(600, 900).is_err());
        b.set_kv_bounds(500, 900).unwrap();
        assert!(DeviceBudget::with_kv_bounds(100, 200, 300).is_err());
        assert!(DeviceBudget::with_kv_bounds(100, 50, 20).is_err());
        assert!(DeviceBudget::new(0).is_err());
    }

    #[test]
    fn bytes_within_the_kv_floor_never_move() {
        let b = DeviceBudget::with_kv_bounds(1000, 300, 1000).unwrap();
        b.try_take(BudgetUse::Experts, 700).unwrap();
        b.give(BudgetUse::Experts, 500);
        // 300 of the 400 are the pages' own floor; 100 came from what experts gave back.
        b.try_take(BudgetUse::KvPages, 400).unwrap();
        assert_eq!(b.snapshot().moved_to_kv, 100);
        // Of the 400 given back only the 100 above the floor were ever the experts' to take.
        b.give(BudgetUse::KvPages, 400);
        b.try_take(BudgetUse::Experts, 500).unwrap();
        assert_eq!(b.snapshot().moved_to_experts, 100);
    }

    #[test]
    fn expert_floor_is_kept_from_the_pages() {
        let b = DeviceBudget::new(1000).unwrap();
        b.set_expert_floor(400).unwrap();
        b.try_take(BudgetUse::Experts, 100).unwrap();
        assert!(b.try_take(BudgetUse::KvPages, 601).is_err());
        b.try_take(BudgetUse::KvPages, 600).unwrap();
        // Experts still reach their floor beside the pages.
        b.try_take(BudgetUse::Experts, 300).unwrap();
        assert!(b.try_take(BudgetUse::Experts, 1).is_err());
        assert!(b.set_expert_floor(500).is_err());
        assert_eq!(b.snapshot().charged(), 1000);
    }

    #[test]
    fn bytes_that_change_use_are_counted_as_moved() {
        let b = DeviceBudget::new(1000).unwrap();
        b.try_take(BudgetUse::Experts, 800).unwrap();
        b.give(BudgetUse::Experts, 300);
        // Experts re-take 100 of their own bytes: nothing moved.
        b.try_take(BudgetUse::Experts, 100).unwrap();
        assert_eq!(b.snapshot().moved_to_experts, 0);
        // KV takes 250: 200 of it were given back by experts, 50 were never used.
        b.try_take(BudgetUse::KvPages, 250).unwrap();
        assert_eq!(b.snapshot().moved_to_kv, 200);
        b.give(BudgetUse::KvPages, 250);
        b.try_take(BudgetUse::Experts, 300).unwrap();
        let s = b.snapshot();
        assert_eq!((s.moved_to_kv, s.moved_to_experts), (200, 250));
    }
}
