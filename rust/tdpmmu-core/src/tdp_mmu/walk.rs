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
