//! Every SPTE write of the TDP MMU, and the FROZEN protocol, in one place (spec §4, §5.3):
//! the atomic setter used under the read lock (with `set_external_spte_present` freezing a
//! hooked entry around its hook), the plain setter used under the write lock,
//! `handle_changed_spte` and `handle_removed_pt`.

use std::sync::atomic::Ordering;

use super::TdpMmu;
use crate::arena::{Arena, TABLE_BASE_PFN};
use crate::cost::Cost;
use crate::hooks::{Busy, HookRet};
use crate::spte::{
    self, FROZEN_SPTE, SHADOW_NONPRESENT_VALUE, is_frozen, is_last, is_mmio, is_shadow_present,
    pages_per_level, spte_to_pfn,
};
use crate::stats::{C, Ctx};
use crate::tdp_iter::TdpIter;

impl TdpMmu {
    /// `tdp_mmu_set_spte_atomic` (mmu_lock held for read). On failure `it.old_spte` holds the
    /// current value (the v6.19+ behaviour; the hooked path refreshes it too).
    #[inline]
    pub(crate) fn set_spte_atomic(
        &self,
        ctx: &mut Ctx,
        it: &mut TdpIter<'_>,
        new: u64,
    ) -> Result<(), Busy> {
        debug_assert!(!is_frozen(it.old_spte));
        crate::sync::yield_point();
        crate::sim::with(|e| e.spte_access(ctx, true));
        if self.hooks.on_spte_changes() && self.hooks_fire(it.table(), ctx) && !is_frozen(new) {
            return self.set_external_spte_present(ctx, it, new);
        }
        match it
            .sptep()
            .compare_exchange(it.old_spte, new, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => {
                // The fault path's common case (a leaf over a non-present entry) only counts a
                // page; everything else goes through the full bookkeeping.
                if !is_shadow_present(it.old_spte)
                    && is_shadow_present(new)
                    && is_last(new, it.level)
                {
                    ctx.page_stats(it.level, 1);
                } else {
                    self.handle_changed_spte(ctx, it.gfn, it.old_spte, new, it.level, true);
                }
                Ok(())
            }
            Err(cur) => {
                it.old_spte = cur;
                Err(Busy)
            }
        }
    }

    /// `set_external_spte_present`: freeze the entry, run the hook, then publish the final
    /// value (or restore the old one). The entry is present only after the hook succeeded.
    fn set_external_spte_present(
        &self,
        ctx: &mut Ctx,
        it: &mut TdpIter<'_>,
        new: u64,
    ) -> Result<(), Busy> {
        let old = it.old_spte;
        if !is_shadow_present(new) {
            ctx.bug("atomic zap of a mirror SPTE");
            return Err(Busy);
        }
        if is_shadow_present(old) {
            ctx.bug("atomic install over a present mirror SPTE");
            return Err(Busy);
        }
        let sptep = it.sptep();
        if let Err(cur) =
            sptep.compare_exchange(old, FROZEN_SPTE, Ordering::AcqRel, Ordering::Acquire)
        {
            it.old_spte = cur;
            return Err(Busy);
        }
        // Frozen: another vCPU may see FROZEN_SPTE here and must retry.
        crate::sync::yield_point();
        let ret = if is_last(new, it.level) {
            self.hooks.set_external_spte(ctx, it.gfn, it.level, new)
        } else {
            match self.arena.idx_of_pfn(spte_to_pfn(new)) {
                Some(c) => self.hooks.link_external_spt(ctx, it.gfn, it.level, c),
                None => {
                    ctx.bug("link of a mirror SPTE to a table outside the arena");
                    HookRet::Io
                }
            }
        };
        crate::sync::yield_point();
        // Virtual time: the entry stays FROZEN for as long as the hook took.
        crate::sim::with(|e| e.step(ctx));
        if ret == HookRet::Ok {
            sptep.store(new, Ordering::Release);
            self.handle_changed_spte(ctx, it.gfn, old, new, it.level, true);
            Ok(())
        } else {
            sptep.store(old, Ordering::Release);
            Err(Busy)
        }
    }

    /// `tdp_mmu_iter_set_spte` / `tdp_mmu_set_spte` (mmu_lock held for write).
    pub(crate) fn set_spte(&self, ctx: &mut Ctx, it: &mut TdpIter<'_>, new: u64) {
        let old = it.old_spte;
        if is_frozen(old) || is_frozen(new) {
            ctx.bug("non-atomic SPTE write involving FROZEN_SPTE");
        }
        it.sptep().store(new, Ordering::Release);
        self.handle_changed_spte(ctx, it.gfn, old, new, it.level, false);
        let table = it.table();
        if self.shape.has_mirror && self.is_mirror_table(table) && is_shadow_present(new) {
            ctx.bug("non-atomic write installed a present mirror SPTE");
        }
        if self.hooks_fire(table, ctx) {
            self.remove_external_spte(ctx, it.gfn, old, it.level);
        }
        it.old_spte = new;
    }

    fn remove_external_spte(&self, ctx: &mut Ctx, gfn: u64, old: u64, level: u8) {
        if is_shadow_present(old) && is_last(old, level) {
            self.hooks.remove_external_spte(ctx, gfn, level, old);
        }
    }

    /// Bookkeeping for one SPTE change (`handle_changed_spte`).
    #[inline]
    pub(crate) fn handle_changed_spte(
        &self,
        ctx: &mut Ctx,
        gfn: u64,
        old: u64,
        new: u64,
        level: u8,
        shared: bool,
    ) {
        // Fast path of the fault path: a new leaf over a non-present entry only counts a page.
        if !is_shadow_present(old) && is_shadow_present(new) && is_last(new, level) {
            debug_assert!(gfn.is_multiple_of(pages_per_level(level)));
            ctx.page_stats(level, 1);
            return;
        }
        let was_present = is_shadow_present(old);
        let is_present = is_shadow_present(new);
        let was_leaf = was_present && is_last(old, level);
        let is_leaf = is_present && is_last(new, level);
        let pfn_changed = spte_to_pfn(old) != spte_to_pfn(new);
        if !gfn.is_multiple_of(pages_per_level(level)) {
            ctx.bug(format!(
                "SPTE change at unaligned gfn {gfn:#x} for level {level}"
            ));
        }
        if was_leaf && is_leaf && pfn_changed {
            // KVM calls BUG() here: a present leaf must never be re-pointed in place.
            ctx.bug(format!("present leaf at gfn {gfn:#x} changed pfn in place"));
            return;
        }
        if old == new {
            return;
        }
        if !was_present && !is_present {
            // Only MMIO and FROZEN transitions are legitimate between non-present values.
            debug_assert!(is_mmio(old) || is_mmio(new) || is_frozen(new) || is_frozen(old));
            return;
        }
        if was_leaf != is_leaf {
            ctx.page_stats(level, if is_leaf { 1 } else { -1 });
        }
        if was_present && !was_leaf && (is_leaf || !is_present || pfn_changed) {
            let child = (spte_to_pfn(old) - TABLE_BASE_PFN) as u32;
            self.handle_removed_pt(ctx, child, shared);
        }
    }

    /// Tear down a table that was just unlinked (`handle_removed_pt`): every entry is frozen
    /// and its old value accounted, children recursively, then the table is freed after the
    /// grace period.
    pub(crate) fn handle_removed_pt(&self, ctx: &mut Ctx, table: u32, shared: bool) {
        let meta = self.arena.meta(table);
        let level = meta.level.load(Ordering::Relaxed);
        let base = meta.gfn.load(Ordering::Relaxed);
        let mirror = self.shape.has_mirror && self.is_mirror_table(table);
        let hooks = self.hooks_fire(table, ctx);
        ctx.add(C::tdp_mmu_pages, -1);
        if mirror && shared {
            ctx.bug("shared (atomic) teardown of a mirror page table");
        }
        for i in 0..spte::ENTRIES_PER_TABLE {
            let gfn = base + i as u64 * pages_per_level(level);
            let e = self.arena.entry(table, i);
            crate::sync::yield_point();
            let old = if shared {
                loop {
                    let old = e.swap(FROZEN_SPTE, Ordering::AcqRel);
                    if !is_frozen(old) {
                        break old;
                    }
                    // Another thread is mid-install in this dying table; wait for it.
                    crate::sync::spin_wait();
                    crate::sim::with(|e| e.spin(ctx));
                }
            } else {
                let old = e.load(Ordering::Acquire);
                if !is_shadow_present(old) {
                    continue;
                }
                e.store(FROZEN_SPTE, Ordering::Release);
                old
            };
            if is_shadow_present(old) {
                // Each present entry of the dying table is one more SPTE update (and its
                // accounting), as a leaf zap is.
                ctx.charge(Cost::spte_update_ns, 1);
            }
            self.handle_changed_spte(ctx, gfn, old, FROZEN_SPTE, level, shared);
            if hooks {
                self.remove_external_spte(ctx, gfn, old, level);
            }
        }
        if hooks {
            let _ = self.hooks.free_external_spt(ctx, base, level, table);
        }
        self.untrack_possible_nx_huge_page(ctx, table);
        self.arena.free_deferred(table);
    }

    /// `tdp_mmu_link_sp`: make the child table visible with one atomic update.
    pub(crate) fn link_sp(
        &self,
        ctx: &mut Ctx,
        it: &mut TdpIter<'_>,
        child: u32,
    ) -> Result<(), Busy> {
        self.set_spte_atomic(
            ctx,
            it,
            spte::make_nonleaf_spte_ad(Arena::pfn(child), self.shape.ad_bits),
        )?;
        ctx.inc(C::tdp_mmu_pages);
        Ok(())
    }

    /// Zap one entry to SHADOW_NONPRESENT_VALUE under the write lock (or atomically with
    /// retry when `shared`). Returns false if the entry was no longer present.
    pub(crate) fn zap_entry(&self, ctx: &mut Ctx, it: &mut TdpIter<'_>, shared: bool) -> bool {
        if shared {
            loop {
                if !is_shadow_present(it.old_spte) {
                    return false;
                }
                if is_frozen(it.old_spte) {
                    crate::sync::spin_wait();
                    crate::sim::with(|e| e.spin(ctx));
                    it.reread();
                    continue;
                }
                if self
                    .set_spte_atomic(ctx, it, SHADOW_NONPRESENT_VALUE)
                    .is_ok()
                {
                    break;
                }
                if ctx.bug.is_some() {
                    // The update is refused for good (a KVM_BUG_ON fired); do not spin.
                    return false;
                }
            }
        } else {
            self.set_spte(ctx, it, SHADOW_NONPRESENT_VALUE);
        }
        ctx.charge(Cost::spte_update_ns, 1);
        true
    }
}
