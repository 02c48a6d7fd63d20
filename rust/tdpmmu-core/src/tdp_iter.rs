//! The pre-order page-table walker (spec §2, KVM's `struct tdp_iter`).
//!
//! Visits every entry whose range intersects [start, end) at levels >= `min_level`, parents
//! before children; re-reads an entry before descending and never enters a non-present or
//! frozen one (frozen is not shadow-present). Yielding restarts from the root at
//! `next_last_level_gfn`, and is only allowed after forward progress.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::arena::{Arena, TABLE_BASE_PFN};
use crate::spte::{self, index, is_last, is_shadow_present, pages_per_level, round_gfn};

pub const MAX_LEVELS: usize = 5;

pub struct TdpIter<'a> {
    arena: &'a Arena,
    pt_path: [u32; MAX_LEVELS],
    pub root_level: u8,
    pub min_level: u8,
    pub level: u8,
    pub next_last_level_gfn: u64,
    pub yielded_gfn: u64,
    /// Lowest gfn mapped by the current entry, without alias bits.
    pub gfn: u64,
    /// Alias bits used only to compute table indices (the TDX shared bit on the direct root).
    pub gfn_bits: u64,
    pub old_spte: u64,
    pub valid: bool,
    pub yielded: bool,
    /// The current entry (KVM's `iter->sptep`), recomputed only when the position moves.
    cur: Option<&'a AtomicU64>,
}

impl<'a> TdpIter<'a> {
    /// `tdp_iter_start`: an already-aliased start gfn (>= gfn_bits) leaves the iterator invalid.
    pub fn start(
        arena: &'a Arena,
        root: u32,
        root_level: u8,
        min_level: u8,
        start_gfn: u64,
        gfn_bits: u64,
    ) -> Self {
        let mut it = TdpIter {
            arena,
            pt_path: [u32::MAX; MAX_LEVELS],
            root_level,
            min_level,
            level: root_level,
            next_last_level_gfn: start_gfn,
            yielded_gfn: start_gfn,
            gfn: 0,
            gfn_bits,
            old_spte: spte::SHADOW_NONPRESENT_VALUE,
            valid: false,
            yielded: false,
            cur: None,
        };
        if !(1..=MAX_LEVELS as u8).contains(&root_level)
            || min_level == 0
            || min_level > root_level
            || (gfn_bits != 0 && start_gfn >= gfn_bits)
        {
            return it;
        }
        it.pt_path[root_level as usize - 1] = root;
        it.restart();
        it
    }

    #[inline(always)]
    fn restart(&mut self) {
        self.yielded = false;
        self.yielded_gfn = self.next_last_level_gfn;
        self.level = self.root_level;
        self.gfn = round_gfn(self.next_last_level_gfn, self.level);
        self.moved();
        self.valid = true;
    }

    /// The position changed: point at the new entry and read it.
    #[inline(always)]
    fn moved(&mut self) {
        crate::sync::yield_point();
        let p = self.arena.entry(self.table(), self.index());
        self.cur = Some(p);
        self.old_spte = p.load(Ordering::Acquire);
    }

    #[inline(always)]
    pub fn table(&self) -> u32 {
        debug_assert!((1..=MAX_LEVELS as u8).contains(&self.level));
        // SAFETY: level stays in 1..=root_level <= MAX_LEVELS (checked in `start`).
        unsafe { *self.pt_path.get_unchecked(self.level as usize - 1) }
    }

    #[inline(always)]
    pub fn index(&self) -> usize {
        index(self.gfn | self.gfn_bits, self.level)
    }

    #[inline(always)]
    pub fn sptep(&self) -> &'a AtomicU64 {
        match self.cur {
            Some(p) => p,
            None => self.arena.entry(self.table(), self.index()),
        }
    }

    #[inline(always)]
    fn read(&mut self) {
        crate::sync::yield_point();
        self.old_spte = self.sptep().load(Ordering::Acquire);
    }

    /// Re-read the current entry (after a failed cmpxchg or a yield elsewhere).
    pub fn reread(&mut self) {
        self.read();
    }

    #[inline(always)]
    fn try_step_down(&mut self) -> bool {
        if self.level == self.min_level {
            return false;
        }
        // Re-read so a table that was just unlinked is not entered.
        self.read();
        let s = self.old_spte;
        if !is_shadow_present(s) || is_last(s, self.level) {
            return false;
        }
        let child = (spte::spte_to_pfn(s) - TABLE_BASE_PFN) as u32;
        self.level -= 1;
        // SAFETY: level > min_level >= 1 before the decrement, so it is in 1..=MAX_LEVELS.
        unsafe { *self.pt_path.get_unchecked_mut(self.level as usize - 1) = child };
        self.gfn = round_gfn(self.next_last_level_gfn, self.level);
        self.moved();
        true
    }

    #[inline(always)]
    fn try_step_side(&mut self) -> bool {
        if self.index() == 511 {
            return false;
        }
        self.gfn += pages_per_level(self.level);
        self.next_last_level_gfn = self.gfn;
        self.moved();
        true
    }

    #[inline(always)]
    fn try_step_up(&mut self) -> bool {
        if self.level == self.root_level {
            return false;
        }
        self.level += 1;
        self.gfn = round_gfn(self.gfn, self.level);
        self.moved();
        true
    }

    /// `tdp_iter_next`.
    #[inline(always)]
    pub fn next(&mut self) {
        if self.yielded {
            self.restart();
            return;
        }
        if self.try_step_down() {
            return;
        }
        loop {
            if self.try_step_side() {
                return;
            }
            if !self.try_step_up() {
                break;
            }
        }
        self.valid = false;
    }

    /// `tdp_iter_next` for a walk over a single gfn (the fault path): after the current entry
    /// only a step down can stay inside [gfn, gfn + 1) — a side step or a step up leaves the
    /// range — so when the re-read entry cannot be entered the walk is over.
    #[inline(always)]
    pub fn next_single(&mut self) {
        if self.yielded {
            self.restart();
            return;
        }
        if !self.try_step_down() {
            self.valid = false;
        }
    }

    /// `tdp_mmu_iter_cond_resched` minus the lock dance: returns true (and arranges a restart
    /// from the root) only if the walk made progress since it last (re)started.
    pub fn try_yield(&mut self) -> bool {
        if self.next_last_level_gfn == self.yielded_gfn {
            return false;
        }
        self.yielded = true;
        true
    }

    /// Skip the rest of the subtree below the current entry (used after zapping a non-leaf:
    /// the next step re-reads the now non-present entry and moves sideways).
    #[inline(always)]
    pub fn in_range(&self, end: u64) -> bool {
        self.valid && self.gfn < end
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spte::{make_leaf_spte, make_nonleaf_spte};

    fn build(a: &Arena) -> u32 {
        // root(L4) -> [0] L3 -> [0] L2 -> [0] L1 with leaves at 0 and 5; L2[1] is a 2M leaf.
        let root = a.alloc(4, 0, 0).unwrap();
        let l3 = a.alloc(3, 0, 0).unwrap();
        let l2 = a.alloc(2, 0, 0).unwrap();
        let l1 = a.alloc(1, 0, 0).unwrap();
        a.entry(root, 0)
            .store(make_nonleaf_spte(Arena::pfn(l3)), Ordering::Relaxed);
        a.entry(l3, 0)
            .store(make_nonleaf_spte(Arena::pfn(l2)), Ordering::Relaxed);
        a.entry(l2, 0)
            .store(make_nonleaf_spte(Arena::pfn(l1)), Ordering::Relaxed);
        a.entry(l2, 1)
            .store(make_leaf_spte(0x200, 2, true, false), Ordering::Relaxed);
        a.entry(l1, 0)
            .store(make_leaf_spte(0x1000, 1, true, false), Ordering::Relaxed);
        a.entry(l1, 5)
            .store(make_leaf_spte(0x1005, 1, true, false), Ordering::Relaxed);
        root
    }

    fn collect(a: &Arena, root: u32, min: u8, start: u64, end: u64) -> Vec<(u8, u64)> {
        let mut it = TdpIter::start(a, root, 4, min, start, 0);
        let mut v = vec![];
        while it.in_range(end) {
            v.push((it.level, it.gfn));
            it.next();
        }
        v
    }

    #[test]
    fn preorder_and_ranges() {
        let a = Arena::new(64).unwrap();
        let root = build(&a);
        let v = collect(&a, root, 1, 0, 3);
        assert_eq!(v, vec![(4, 0), (3, 0), (2, 0), (1, 0), (1, 1), (1, 2)]);
        // The 2M leaf is visited as a leaf; its range is never descended.
        let v = collect(&a, root, 1, 510, 514);
        assert_eq!(
            v,
            vec![(4, 0), (3, 0), (2, 0), (1, 510), (1, 511), (2, 512)]
        );
        // min_level stops descent.
        let v = collect(&a, root, 2, 0, 1024);
        assert_eq!(v, vec![(4, 0), (3, 0), (2, 0), (2, 512)]);
    }

    #[test]
    fn never_descends_into_frozen() {
        let a = Arena::new(64).unwrap();
        let root = build(&a);
        a.entry(root, 0).store(spte::FROZEN_SPTE, Ordering::Relaxed);
        let v = collect(&a, root, 1, 0, 2);
        assert_eq!(v, vec![(4, 0)]);
    }

    #[test]
    fn aliased_start_is_invalid_and_alias_bits_index() {
        let a = Arena::new(64).unwrap();
        let root = a.alloc(4, 0, 0).unwrap();
        let bits = 1u64 << 35;
        let it = TdpIter::start(&a, root, 4, 1, bits | 5, bits);
        assert!(!it.valid);
        let it = TdpIter::start(&a, root, 4, 1, 5, bits);
        assert!(it.valid);
        assert_eq!(it.index(), 256);
        assert_eq!(it.gfn, 0);
    }

    #[test]
    fn yield_needs_progress_and_restarts_from_root() {
        let a = Arena::new(64).unwrap();
        let root = build(&a);
        let mut it = TdpIter::start(&a, root, 4, 1, 0, 0);
        assert!(!it.try_yield());
        while it.level != 1 {
            it.next();
        }
        it.next(); // (1, 1): progress made
        assert!(it.try_yield());
        it.next();
        assert_eq!((it.level, it.gfn), (4, 0));
        assert_eq!(it.next_last_level_gfn, 1);
        it.next();
        it.next();
        it.next();
        assert_eq!((it.level, it.gfn), (1, 1));
    }
}
