//! The TDP MMU's other operations on the direct tree (spec §7): write-protection for dirty
//! logging (`kvm_tdp_mmu_wrprot_slot`, `kvm_tdp_mmu_clear_dirty_pt_masked`), aging
//! (`kvm_tdp_mmu_age_gfn_range`, `kvm_tdp_mmu_test_age_gfn`), eager huge-page splitting
//! (`kvm_tdp_mmu_try_split_huge_pages`) and huge-page recovery
//! (`kvm_tdp_mmu_recover_huge_pages`). guest_memfd slots cannot log dirty pages and the MMU
//! notifier ages shared memory only, so none of this reaches a mirror root.

use std::sync::atomic::Ordering;

use super::TdpMmu;
use crate::arena::SP_MIRROR;
use crate::error::Result;
use crate::spte::{
    self, ACCESSED, PT_WRITABLE, is_frozen, is_large, is_last, is_shadow_present, pages_per_level,
    spte_to_pfn,
};
use crate::stats::{C, Ctx};
use crate::tdp_iter::TdpIter;

impl TdpMmu {
    /// Valid direct roots (the trees dirty logging, aging and splitting act on).
    fn valid_direct_roots(&self) -> Vec<u32> {
        self.roots
            .lock()
            .iter()
            .filter(|r| !r.invalid && !r.is_mirror())
            .map(|r| r.table)
            .collect()
    }

    /// Visit every present leaf at `min_level` or above of [start, end) in each valid direct
    /// root, pre-order; `visit` returns false to stop the whole walk.
    fn for_each_direct_leaf(
        &self,
        start: u64,
        end: u64,
        min_level: u8,
        mut visit: impl FnMut(&mut TdpIter<'_>) -> bool,
    ) {
        let bits = self.root_gfn_bits(false);
        for root in self.valid_direct_roots() {
            let mut it =
                TdpIter::start(&self.arena, root, self.shape.levels, min_level, start, bits);
            while it.in_range(end) {
                let s = it.old_spte;
                if is_shadow_present(s) && is_last(s, it.level) && !visit(&mut it) {
                    return;
                }
                it.next();
            }
        }
    }

    /// `kvm_tdp_mmu_wrprot_slot` over [start, end) (mmu_lock for read): clear W on every
    /// present leaf at `min_level` or above, keeping MMU-writable so the fast path may restore
    /// it; a lost cmpxchg re-reads and retries. Returns the leaves changed (the caller
    /// flushes if any).
    pub fn wrprot_range(&self, ctx: &mut Ctx, start: u64, end: u64, min_level: u8) -> u64 {
        self.wrprot_where(ctx, start, end, min_level, |_, _| true)
    }

    /// `kvm_tdp_mmu_clear_dirty_pt_masked` (mmu_lock for write): for each set bit of `mask`,
    /// the 4K leaf at `gfn + bit` loses W (`wrprot`) or D (PML); one walk over the 64 pages.
    /// Returns the leaves changed.
    pub fn clear_dirty_pt_masked(&self, ctx: &mut Ctx, gfn: u64, mask: u64, wrprot: bool) -> u64 {
        if mask == 0 {
            return 0;
        }
        let lo = gfn + mask.trailing_zeros() as u64;
        let hi = gfn + 64 - mask.leading_zeros() as u64;
        // Only 4K leaves: a huge page over the range is KVM's caller's business.
        let pick = |g: u64, level: u8| {
            level == 1 && g >= gfn && g < gfn + 64 && mask & (1 << (g - gfn)) != 0
        };
        if wrprot {
            self.wrprot_where(ctx, lo, hi, 1, pick)
        } else {
            self.clear_d_where(ctx, lo, hi, pick)
        }
    }

    /// `kvm_tdp_mmu_clear_dirty_slot` for PML over [start, end): clear D on every present 4K
    /// leaf (atomic AND); the CPU logs the next write. Returns the leaves changed.
    pub fn clear_dirty_range(&self, ctx: &mut Ctx, start: u64, end: u64) -> u64 {
        self.clear_d_where(ctx, start, end, |_, level| level == 1)
    }

    fn clear_d_where(
        &self,
        ctx: &mut Ctx,
        start: u64,
        end: u64,
        pick: impl Fn(u64, u8) -> bool,
    ) -> u64 {
        let mut changed = 0;
        self.for_each_direct_leaf(start, end, 1, |it| {
            if it.old_spte & spte::DIRTY != 0 && pick(it.gfn, it.level) {
                it.sptep().fetch_and(!spte::DIRTY, Ordering::AcqRel);
                changed += 1;
            }
            true
        });
        ctx.charge(crate::cost::Cost::spte_update_ns, changed);
        changed
    }

    fn wrprot_where(
        &self,
        ctx: &mut Ctx,
        start: u64,
        end: u64,
        min_level: u8,
        pick: impl Fn(u64, u8) -> bool,
    ) -> u64 {
        let mut changed = 0;
        self.for_each_direct_leaf(start, end, min_level, |it| {
            // A lost cmpxchg re-reads the entry and tries again.
            loop {
                let s = it.old_spte;
                if !is_shadow_present(s)
                    || !is_last(s, it.level)
                    || s & PT_WRITABLE == 0
                    || !pick(it.gfn, it.level)
                {
                    return true;
                }
                match it.sptep().compare_exchange(
                    s,
                    s & !PT_WRITABLE,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => {
                        changed += 1;
                        return true;
                    }
                    Err(cur) => it.old_spte = cur,
                }
            }
        });
        ctx.add(C::sptes_write_protected, changed as i64);
        ctx.charge(crate::cost::Cost::spte_update_ns, changed);
        changed
    }

    /// `kvm_tdp_mmu_write_protect_gfn` (mmu_lock for write): every leaf mapping `gfn`, at any
    /// level, loses W and MMU-writable, so no fast path can make it writable again. Returns
    /// whether a leaf changed (the caller flushes).
    pub fn write_protect_gfn(&self, ctx: &mut Ctx, gfn: u64) -> bool {
        let mut changed = false;
        self.for_each_direct_leaf(gfn, gfn + 1, 1, |it| {
            let new = it.old_spte & !(PT_WRITABLE | spte::MMU_WRITABLE);
            if new != it.old_spte {
                self.set_spte(ctx, it, new);
                ctx.inc(C::sptes_write_protected);
                ctx.charge(crate::cost::Cost::spte_update_ns, 1);
                changed = true;
            }
            true
        });
        changed
    }

    /// `kvm_tdp_mmu_age_gfn_range` (lockless): every young present leaf of [start, end) is
    /// aged, one SPTE update each: with A/D on, A is cleared with an atomic AND; with A/D off
    /// (`kvm_tdp_mmu_age_spte`) one cmpxchg marks it for access tracking (RWX cleared, R and X
    /// saved; a lost cmpxchg leaves it young). A leaf already access-tracked is not young. No
    /// bookkeeping, no flush. Returns whether any leaf was young.
    pub fn age_gfn_range(&self, ctx: &mut Ctx, start: u64, end: u64) -> bool {
        let mut young = false;
        self.for_each_direct_leaf(start, end, 1, |it| {
            let s = it.old_spte;
            if spte::is_accessed_spte(s) {
                if spte::spte_ad_enabled(s) {
                    it.sptep().fetch_and(!ACCESSED, Ordering::AcqRel);
                } else {
                    let new = spte::mark_spte_for_access_track(s);
                    let _ =
                        it.sptep()
                            .compare_exchange(s, new, Ordering::AcqRel, Ordering::Acquire);
                }
                young = true;
                ctx.inc(C::sptes_aged);
                ctx.charge(crate::cost::Cost::spte_update_ns, 1);
            }
            true
        });
        young
    }

    /// `kvm_tdp_mmu_test_age_gfn` (lockless): whether a present leaf of [start, end) is young
    /// (`is_accessed_spte`: A set, or with A/D off not access-tracked).
    pub fn test_age_gfn(&self, start: u64, end: u64) -> bool {
        let mut young = false;
        self.for_each_direct_leaf(start, end, 1, |it| {
            young = spte::is_accessed_spte(it.old_spte);
            !young
        });
        young
    }

    /// `kvm_tdp_mmu_try_split_huge_pages` over [start, end) (mmu_lock for read): every present
    /// huge leaf above `target_level` becomes a table of 512 smaller leaves, in pre-order, so
    /// a 1G page is split to 2M and each 2M to 4K in one pass; no flush. Returns the splits.
    pub fn try_split_huge_pages(
        &self,
        ctx: &mut Ctx,
        start: u64,
        end: u64,
        target_level: u8,
    ) -> Result<u64> {
        let mut splits = 0;
        for root in self.valid_direct_roots() {
            let bits = self.root_gfn_bits(false);
            let min = target_level + 1;
            let mut it = TdpIter::start(&self.arena, root, self.shape.levels, min, start, bits);
            while it.in_range(end) {
                let s = it.old_spte;
                if !is_shadow_present(s) || !is_large(s) || it.level <= target_level {
                    it.next();
                    continue;
                }
                let child = self.arena.alloc(it.level - 1, it.gfn, 0)?;
                if self.split_huge_page(ctx, &mut it, child).is_err() {
                    // Lost the cmpxchg: the entry changed under us; look at it again.
                    self.arena.free_now(child);
                    it.reread();
                    continue;
                }
                splits += 1;
                // Pre-order: descend into the new table and split its children too.
                it.next();
            }
        }
        Ok(splits)
    }

    /// `kvm_tdp_mmu_recover_huge_pages` over [start, end) (mmu_lock for read): each present
    /// table at 2M or 1G lying wholly inside the range, where `allowed(gfn, level)` says the
    /// whole huge range may be mapped at that level, is replaced by one huge leaf built from
    /// its first present leaf; the old subtree is torn down. Returns the huge leaves made
    /// (the caller flushes the range if any).
    pub fn recover_huge_pages(
        &self,
        ctx: &mut Ctx,
        start: u64,
        end: u64,
        allowed: impl Fn(u64, u8) -> bool,
    ) -> u64 {
        let mut made = 0;
        for root in self.valid_direct_roots() {
            let bits = self.root_gfn_bits(false);
            let mut it = TdpIter::start(&self.arena, root, self.shape.levels, 2, start, bits);
            while it.in_range(end) {
                let s = it.old_spte;
                let span = pages_per_level(it.level);
                let whole = it.gfn >= start && it.gfn + span <= end;
                if it.level > spte::PG_LEVEL_1G
                    || !is_shadow_present(s)
                    || is_last(s, it.level)
                    || !whole
                    || !allowed(it.gfn, it.level)
                {
                    it.next();
                    continue;
                }
                let Some(first) = self.first_leaf_below(s, it.level) else {
                    it.next();
                    continue;
                };
                let (leaf, _) = first;
                let pfn = spte_to_pfn(leaf) & !(span - 1);
                let exec = !(self.shape.nx_huge_pages && it.level > 1);
                let ad = self.shape.ad_bits;
                let mut huge = spte::make_leaf_spte_ad(pfn, it.level, exec, false, ad);
                // make_huge_spte keeps the small SPTE's permissions: a read-only or tracked
                // page stays read-only (W, D, MMU- and host-writable come from the leaf).
                let keep = PT_WRITABLE | spte::DIRTY | spte::MMU_WRITABLE | spte::HOST_WRITABLE;
                huge = (huge & !keep) | (leaf & keep);
                // ... and an access-tracked one stays access-tracked (A/D off).
                if !ad && spte::is_access_track_spte(leaf) {
                    huge = spte::mark_spte_for_access_track(huge);
                }
                if self.set_spte_atomic(ctx, &mut it, huge).is_ok() {
                    made += 1;
                    ctx.inc(C::huge_pages_recovered);
                } else {
                    it.reread();
                    if is_frozen(it.old_spte) {
                        it.next();
                    }
                    continue;
                }
                it.next();
            }
        }
        made
    }

    /// The first present leaf under the table `s` points to (pre-order), with its level.
    fn first_leaf_below(&self, s: u64, level: u8) -> Option<(u64, u8)> {
        let table = self.arena.idx_of_pfn(spte_to_pfn(s))?;
        if self.arena.meta(table).flags.load(Ordering::Relaxed) & SP_MIRROR != 0 {
            return None;
        }
        let child_level = level - 1;
        for i in 0..spte::ENTRIES_PER_TABLE {
            let c = self.arena.entry(table, i).load(Ordering::Acquire);
            if !is_shadow_present(c) {
                continue;
            }
            if is_last(c, child_level) {
                return Some((c, child_level));
            }
            if let Some(found) = self.first_leaf_below(c, child_level) {
                return Some(found);
            }
        }
        None
    }
}
