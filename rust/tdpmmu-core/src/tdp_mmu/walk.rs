//! Read-only walks: the "hardware" translation of one gfn (no allocation: memstress runs it
//! for every access) and the path dump behind `vm.walk`.

use std::sync::atomic::Ordering;

use super::TdpMmu;
use crate::spte::{self, SHADOW_NONPRESENT_VALUE, is_last, is_shadow_present};

impl TdpMmu {
    /// The entry that maps `gfn` in `root` (a leaf, or the first non-present entry): (level, spte).
    #[inline]
    pub fn lookup(&self, root: u32, gfn: u64, gfn_bits: u64) -> (u8, u64) {
        let mut last = (self.shape.levels, SHADOW_NONPRESENT_VALUE);
        self.walk_path(root, gfn, gfn_bits, |level, s| last = (level, s));
        last
    }

    /// The leaf entry that maps `gfn` in `root`, if the path reaches one: (level, entry).
    #[inline]
    pub fn leaf_ptr(
        &self,
        root: u32,
        gfn: u64,
        gfn_bits: u64,
    ) -> Option<(u8, &std::sync::atomic::AtomicU64)> {
        if gfn_bits != 0 && gfn >= gfn_bits {
            return None;
        }
        let mut table = root;
        let mut level = self.shape.levels;
        loop {
            let e = self.arena.entry(table, spte::index(gfn | gfn_bits, level));
            let s = e.load(Ordering::Acquire);
            if !is_shadow_present(s) {
                return None;
            }
            if is_last(s, level) {
                return Some((level, e));
            }
            table = self.arena.idx_of_pfn(spte::spte_to_pfn(s))?;
            level -= 1;
        }
    }

    /// The "hardware" translation of one guest access: None if the mapping does not allow it
    /// (no leaf, no W for a write, or an access-tracked leaf, which has no RWX); otherwise the
    /// CPU sets the leaf's Accessed bit (and Dirty for a write) as EPT A/D does, and the answer
    /// says whether this write set a clear Dirty bit of a 4K leaf (what PML logs). A leaf of
    /// the A/D-disabled type gets no bits (the VM runs without EPT A/D).
    #[inline]
    pub fn hw_access(&self, root: u32, gfn: u64, gfn_bits: u64, write: bool) -> Option<bool> {
        let (level, e) = self.leaf_ptr(root, gfn, gfn_bits)?;
        let s = e.load(Ordering::Acquire);
        if !spte::access_allowed(s, write, false) {
            return None;
        }
        if !spte::spte_ad_enabled(s) {
            return Some(false);
        }
        let want = spte::ACCESSED | if write { spte::DIRTY } else { 0 };
        if s & want != want {
            let old = e.fetch_or(want, Ordering::AcqRel);
            return Some(write && level == 1 && old & spte::DIRTY == 0);
        }
        Some(false)
    }

    /// Entries on the path from `root` to `gfn`, stopping after a leaf or a non-present entry.
    pub fn walk_root(&self, root: u32, gfn: u64, gfn_bits: u64) -> Vec<(u8, u64)> {
        let mut out = Vec::with_capacity(self.shape.levels as usize);
        self.walk_path(root, gfn, gfn_bits, |level, s| out.push((level, s)));
        out
    }

    /// Visit the path from `root` to `gfn`; an already-aliased gfn visits nothing (as
    /// `tdp_iter_start` refuses it).
    #[inline]
    fn walk_path(&self, root: u32, gfn: u64, gfn_bits: u64, mut visit: impl FnMut(u8, u64)) {
        if gfn_bits != 0 && gfn >= gfn_bits {
            return;
        }
        let mut table = root;
        let mut level = self.shape.levels;
        loop {
            let s = self
                .arena
                .entry(table, spte::index(gfn | gfn_bits, level))
                .load(Ordering::Acquire);
            visit(level, s);
            if !is_shadow_present(s) || is_last(s, level) {
                return;
            }
            match self.arena.idx_of_pfn(spte::spte_to_pfn(s)) {
                Some(c) => table = c,
                None => return,
            }
            level -= 1;
        }
    }
}
