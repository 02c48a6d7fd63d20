//! Zaps (spec §5): leaf zaps of a range over the roots a filter picks, root zaps in four
//! passes, the fast zap of all direct roots, and the final teardown of every root.

use std::sync::atomic::Ordering;

use super::{RootTypes, TdpMmu};
use crate::arena::Arena;
use crate::arena::NO_TABLE;
use crate::hooks::HookRet;
use crate::spte::{self, is_large, is_last, is_shadow_present, pages_per_level};
use crate::stats::C;
use crate::stats::Ctx;
use crate::tdp_iter::TdpIter;

/// Outcome of a zap over several roots.
#[derive(Debug, Default, Clone, Copy)]
pub struct ZapOutcome {
    /// A valid root lost a leaf: the caller flushes remote TLBs once.
    pub flush: bool,
    pub zapped: u64,
}

impl TdpMmu {
    /// `tdp_mmu_zap_leafs` on one root (write lock held). Requests a flush only for valid roots.
    fn zap_leafs_root(
        &self,
        ctx: &mut Ctx,
        root: u32,
        root_invalid: bool,
        start: u64,
        end: u64,
        out: &mut ZapOutcome,
    ) {
        let mirror = self.shape.has_mirror && self.is_mirror_table(root);
        let end = end.min(self.shape.max_gfn);
        let mut it = TdpIter::start(
            &self.arena,
            root,
            self.shape.levels,
            1,
            start,
            self.root_gfn_bits(mirror),
        );
        while it.in_range(end) {
            let s = it.old_spte;
            if !is_shadow_present(s) || !is_last(s, it.level) {
                it.next();
                continue;
            }
            self.zap_entry(ctx, &mut it, false);
            out.zapped += 1;
            if !root_invalid {
                out.flush = true;
            }
            it.next();
        }
    }

    /// Leaf zap of [start, end) in every root matching `types` (write lock held).
    pub fn zap_leafs(&self, ctx: &mut Ctx, types: RootTypes, start: u64, end: u64) -> ZapOutcome {
        self.zap_leafs_where(ctx, start, end, |r| types.matches(r))
    }

    /// Leaf zap of [start, end) in every root `pick` selects (write lock held).
    fn zap_leafs_where(
        &self,
        ctx: &mut Ctx,
        start: u64,
        end: u64,
        pick: impl Fn(&super::Root) -> bool,
    ) -> ZapOutcome {
        let targets: Vec<(u32, bool)> = self
            .roots
            .lock()
            .iter()
            .filter(|r| pick(r))
            .map(|r| (r.table, r.invalid))
            .collect();
        let mut out = ZapOutcome::default();
        for (root, invalid) in targets {
            self.zap_leafs_root(ctx, root, invalid, start, end, &mut out);
        }
        self.hooks.zap_end(ctx);
        out
    }

    /// Leaf zap of [start, end) in every valid root, then one flush if anything was zapped
    /// (`kvm_zap_gfn_range`'s TDP MMU part).
    pub fn zap_gfn_range(&self, ctx: &mut Ctx, start: u64, end: u64) -> u64 {
        let out = self.zap_leafs(ctx, RootTypes::VALID, start, end);
        if out.flush {
            self.flush_remote_tlbs(ctx);
        }
        out.zapped
    }

    /// `kvm_tdp_mmu_unmap_gfn_range` + flush: the attribute filter picks the roots (with a
    /// mirror root: PRIVATE -> mirror, SHARED -> direct; otherwise the direct root), invalid
    /// roots always included. The operation acts for private memory on the roots the PRIVATE
    /// filter selected: with a mirror root, a zap under both filters is private on the mirror
    /// root and shared on the direct root (what a design keyed on the private flag sees);
    /// without one, the single root is zapped once with the PRIVATE filter's flag.
    pub fn unmap_gfn_range(
        &self,
        ctx: &mut Ctx,
        private: bool,
        shared: bool,
        start: u64,
        end: u64,
    ) -> u64 {
        let mut out = ZapOutcome::default();
        if self.shape.has_mirror {
            let passes = [
                (private, true, RootTypes::MIRROR),
                (shared, false, RootTypes::DIRECT),
            ];
            for (wanted, is_private, kind) in passes {
                if !wanted {
                    continue;
                }
                ctx.op_private = is_private;
                if is_private {
                    // A private 2M leaf only partly in the range is split first (write lock).
                    self.split_mirror_cross_boundary(ctx, start, end);
                }
                let o = self.zap_leafs_where(ctx, start, end, |r| {
                    (r.is_mirror() == is_private) && (r.invalid || kind.matches(r))
                });
                ctx.op_private = false;
                out.flush |= o.flush;
                out.zapped += o.zapped;
            }
        } else {
            ctx.op_private = private;
            out = self.zap_leafs(ctx, RootTypes::DIRECT.or(RootTypes::INVALID), start, end);
            ctx.op_private = false;
        }
        if out.flush {
            self.flush_remote_tlbs(ctx);
        }
        out.zapped
    }

    /// The huge-page RFC's split of cross-boundary leaves on the mirror root (mmu_lock held for
    /// write): a huge mirror leaf that covers `start` or `end - 1` but not all of [start, end)
    /// becomes a table of 512 smaller leaves, with the external tree split by the
    /// `split_external_spt` hook (TDX: BLOCK, TRACK, kick, DEMOTE). Never on a fault.
    fn split_mirror_cross_boundary(&self, ctx: &mut Ctx, start: u64, end: u64) {
        let Some(root) = self.current_root(true) else {
            return;
        };
        let bits = self.root_gfn_bits(true);
        for edge in [start, end - 1] {
            let mut it = TdpIter::start(&self.arena, root, self.shape.levels, 2, edge, bits);
            while it.in_range(edge + 1) {
                let s = it.old_spte;
                let span = pages_per_level(it.level);
                let inside = it.gfn >= start && it.gfn + span <= end;
                if is_shadow_present(s) && is_large(s) && it.level > 1 && !inside {
                    self.split_mirror_leaf(ctx, &mut it);
                    break;
                }
                it.next();
            }
        }
    }

    /// `tdp_mmu_split_huge_page` under the write lock on the mirror root.
    fn split_mirror_leaf(&self, ctx: &mut Ctx, it: &mut TdpIter<'_>) {
        let huge = it.old_spte;
        let child_level = it.level - 1;
        let Ok(child) = self
            .arena
            .alloc(child_level, it.gfn, crate::arena::SP_MIRROR)
        else {
            ctx.bug("no page-table memory to split a private huge page");
            return;
        };
        if self.hooks.split_external_spt(ctx, it.gfn, it.level, child) != HookRet::Ok {
            self.arena.free_now(child);
            ctx.bug("split_external_spt failed");
            return;
        }
        for i in 0..spte::ENTRIES_PER_TABLE {
            let s = spte::make_small_spte(huge, child_level, i, self.shape.nx_huge_pages);
            self.arena.entry(child, i).store(s, Ordering::Relaxed);
        }
        ctx.charge(
            crate::cost::Cost::spte_update_ns,
            spte::ENTRIES_PER_TABLE as u64,
        );
        it.sptep().store(
            spte::make_nonleaf_spte_ad(Arena::pfn(child), self.shape.ad_bits),
            Ordering::Release,
        );
        ctx.inc(C::tdp_mmu_pages);
        ctx.page_stats(it.level, -1);
        ctx.page_stats(child_level, spte::ENTRIES_PER_TABLE as i64);
        ctx.inc(C::huge_page_splits);
        it.old_spte = spte::make_nonleaf_spte_ad(Arena::pfn(child), self.shape.ad_bits);
    }

    /// `tdp_mmu_zap_root`: four passes (4K, 2M, 1G, root level), finest first.
    pub fn zap_root(&self, ctx: &mut Ctx, root: u32, shared: bool) {
        let root_level = self.shape.levels;
        let end = 1u64 << (9 * root_level as u32);
        for zap_level in [1u8, 2, 3, root_level] {
            let mut it = TdpIter::start(&self.arena, root, root_level, zap_level, 0, 0);
            while it.in_range(end) {
                if !is_shadow_present(it.old_spte) || it.level > zap_level {
                    it.next();
                    continue;
                }
                self.zap_entry(ctx, &mut it, shared);
                it.next();
            }
        }
    }

    /// `kvm_mmu_zap_all_fast` for the TDP MMU: invalidate direct roots, move every vCPU off
    /// them, zap them (shared), drop the TDP MMU's reference. No TLB flush.
    pub fn zap_all_fast(&self, ctx: &mut Ctx) {
        let mut scheduled = Vec::new();
        {
            let mut roots = self.roots.lock();
            for r in roots.iter_mut().filter(|r| !r.invalid && !r.is_mirror()) {
                r.invalid = true;
                r.scheduled_to_zap = true;
            }
            // KVM_REQ_MMU_FREE_OBSOLETE_ROOTS: each vCPU drops its obsolete direct root.
            for v in self.vcpu_root.iter() {
                let t = v.load(Ordering::Acquire);
                if t != NO_TABLE && roots.iter().any(|r| r.table == t && r.invalid) {
                    v.store(NO_TABLE, Ordering::Release);
                    self.put_root_locked(ctx, &mut roots, t);
                }
            }
            for r in roots.iter_mut().filter(|r| r.scheduled_to_zap) {
                r.scheduled_to_zap = false;
                scheduled.push(r.table);
            }
        }
        for t in scheduled {
            self.zap_root(ctx, t, true);
            let mut roots = self.roots.lock();
            self.put_root_locked(ctx, &mut roots, t);
        }
    }

    /// `kvm_mmu_uninit_tdp_mmu` after every vCPU dropped its roots (`kvm_mmu_destroy`): every
    /// root is invalidated and zapped exclusively, then freed.
    pub fn uninit(&self, ctx: &mut Ctx) {
        let tables: Vec<u32> = {
            let mut roots = self.roots.lock();
            for v in self.vcpu_root.iter().chain(self.vcpu_mirror_root.iter()) {
                let t = v.swap(NO_TABLE, Ordering::AcqRel);
                if t != NO_TABLE {
                    if let Some(r) = roots.iter_mut().find(|r| r.table == t) {
                        r.invalid = true;
                    }
                    self.put_root_locked(ctx, &mut roots, t);
                }
            }
            for r in roots.iter_mut() {
                r.invalid = true;
            }
            roots.iter().map(|r| r.table).collect()
        };
        for t in tables {
            self.zap_root(ctx, t, false);
            let mut roots = self.roots.lock();
            self.put_root_locked(ctx, &mut roots, t);
        }
    }
}
