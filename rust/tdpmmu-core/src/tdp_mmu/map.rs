//! Installing mappings (`kvm_tdp_mmu_map` and its helpers): walk to the goal level, link
//! missing tables, split huge pages in the way, then set the leaf.

use std::sync::atomic::Ordering;

use super::TdpMmu;
use crate::arena::{SP_MIRROR, SP_NX_DISALLOWED};
use crate::cost::Cost;
use crate::error::Result;
use crate::hooks::Busy;
use crate::page_fault::{KvmPageFault, Ret};
use crate::spte::{
    self, access_allowed, is_frozen, is_large, is_last, is_shadow_present, make_leaf_spte_ad,
    make_mmio_spte, make_small_spte, pages_per_level,
};
use crate::stats::{C, Ctx};
use crate::tdp_iter::TdpIter;

impl TdpMmu {
    /// `kvm_tdp_mmu_map`: `root` is the vCPU's root for this access, `generation` the memslot
    /// generation an MMIO SPTE records.
    pub fn map(
        &self,
        ctx: &mut Ctx,
        f: &mut KvmPageFault,
        root: u32,
        generation: u64,
    ) -> Result<Ret> {
        let mirror = self.shape.has_mirror && self.is_mirror_table(root);
        let gfn_bits = self.root_gfn_bits(mirror);
        let mut it = TdpIter::start(&self.arena, root, self.shape.levels, 1, f.gfn, gfn_bits);
        let end = f.gfn + 1;
        let mut at_goal = false;
        while it.in_range(end) {
            // Virtual time: the walk's read of this level takes time, during which other
            // vCPUs may change the entry.
            crate::sim::with(|e| e.spte_access(ctx, false));
            if self.shape.nx_huge_pages {
                self.disallowed_hugepage_adjust(f, it.old_spte, it.level);
            }
            // No promotion on the mirror root: a table where the fault could map huge stays,
            // and the fault maps one level down (TDX has no PAGE.PROMOTE in KVM).
            if mirror
                && it.level == f.goal_level
                && it.level > 1
                && is_shadow_present(it.old_spte)
                && !is_large(it.old_spte)
            {
                let mask = pages_per_level(it.level) - pages_per_level(it.level - 1);
                f.pfn |= f.gfn & mask;
                f.goal_level -= 1;
            }
            if is_frozen(it.old_spte) {
                return Ok(Ret::Retry);
            }
            if it.level == f.goal_level {
                at_goal = true;
                break;
            }
            let s = it.old_spte;
            if is_shadow_present(s) && !is_large(s) {
                it.next_single();
                continue;
            }
            let flags = (if mirror { SP_MIRROR } else { 0 })
                | if f.huge_page_disallowed {
                    SP_NX_DISALLOWED
                } else {
                    0
                };
            let child = self.arena.alloc(it.level - 1, it.gfn, flags)?;
            let r = if is_shadow_present(s) {
                if mirror {
                    ctx.bug("fault would split a huge mirror SPTE");
                    self.arena.free_now(child);
                    return Ok(Ret::Retry);
                }
                self.split_huge_page(ctx, &mut it, child)
            } else {
                self.link_sp(ctx, &mut it, child)
            };
            if r.is_err() {
                self.arena.free_now(child);
                return Ok(Ret::Retry);
            }
            // The mitigation forced this table where a huge page could have been.
            if f.huge_page_disallowed && f.req_level >= it.level {
                self.track_possible_nx_huge_page(ctx, child);
            }
            it.next_single();
        }
        if !at_goal {
            return Ok(Ret::Retry);
        }
        self.map_handle_target_level(ctx, f, &mut it, generation)
    }

    /// `tdp_mmu_map_handle_target_level`.
    fn map_handle_target_level(
        &self,
        ctx: &mut Ctx,
        f: &mut KvmPageFault,
        it: &mut TdpIter<'_>,
        generation: u64,
    ) -> Result<Ret> {
        let old = it.old_spte;
        f.level = it.level;
        f.spte = old;
        if is_shadow_present(old)
            && is_last(old, it.level)
            && (f.prefetch || access_allowed(old, f.write, f.exec))
        {
            return Ok(Ret::Spurious);
        }
        let new = if f.mmio {
            make_mmio_spte(f.gfn, generation)
        } else {
            let exec = !(self.shape.nx_huge_pages && it.level > 1);
            let ad = self.shape.ad_bits;
            let leaf = make_leaf_spte_ad(f.pfn, it.level, exec, f.prefetch, ad);
            let leaf = if !f.map_writable {
                // make_spte without ACC_WRITE: no W, no D, not MMU- or host-writable.
                leaf & !(spte::PT_WRITABLE | spte::DIRTY | spte::MMU_WRITABLE | spte::HOST_WRITABLE)
            } else if f.write_tracked {
                // make_spte's write-protection for a tracked gfn: no W, no MMU-writable.
                leaf & !(spte::PT_WRITABLE | spte::DIRTY | spte::MMU_WRITABLE)
            } else {
                leaf
            };
            // make_spte marks a pre-fault's leaf for access tracking last: with A/D on that is
            // the clear A above; with A/D off the leaf starts access-tracked.
            if f.prefetch && !ad {
                spte::mark_spte_for_access_track(leaf)
            } else {
                leaf
            }
        };
        if new == old {
            // Nothing to install; a write to a tracked page still needs emulation.
            if f.write_tracked && f.write {
                return Ok(Ret::WriteProtected);
            }
            return Ok(Ret::Spurious);
        }
        if self.set_spte_atomic(ctx, it, new).is_err() {
            return Ok(Ret::Retry);
        }
        f.spte = new;
        if is_shadow_present(old) && !is_last(old, it.level) {
            self.flush_remote_tlbs(ctx);
        }
        if f.write_tracked && f.write {
            return Ok(Ret::WriteProtected);
        }
        if f.mmio {
            ctx.inc(C::pf_mmio_spte_created);
            return Ok(Ret::Emulate);
        }
        Ok(Ret::Fixed)
    }

    /// `disallowed_hugepage_adjust`: do not re-create a huge page over a table that an exec
    /// fault had to split for the NX workaround.
    #[inline(always)]
    fn disallowed_hugepage_adjust(&self, f: &mut KvmPageFault, spte: u64, level: u8) {
        if level > 1
            && level == f.goal_level
            && is_shadow_present(spte)
            && !is_large(spte)
            && self.child_nx_disallowed(spte)
        {
            let mask = pages_per_level(level) - pages_per_level(level - 1);
            f.pfn |= f.gfn & mask;
            f.goal_level -= 1;
        }
    }

    fn child_nx_disallowed(&self, spte: u64) -> bool {
        match self.arena.idx_of_pfn(spte::spte_to_pfn(spte)) {
            Some(c) => self.arena.meta(c).flags.load(Ordering::Relaxed) & SP_NX_DISALLOWED != 0,
            None => false,
        }
    }

    /// `tdp_mmu_split_huge_page` (shared): fill the child with the 512 smaller mappings of the
    /// huge SPTE, then replace the huge SPTE with a link. No TLB flush is needed: the
    /// translation does not change.
    pub(crate) fn split_huge_page(
        &self,
        ctx: &mut Ctx,
        it: &mut TdpIter<'_>,
        child: u32,
    ) -> std::result::Result<(), Busy> {
        let huge = it.old_spte;
        let child_level = it.level - 1;
        for i in 0..spte::ENTRIES_PER_TABLE {
            let s = make_small_spte(huge, child_level, i, self.shape.nx_huge_pages);
            self.arena.entry(child, i).store(s, Ordering::Relaxed);
        }
        ctx.charge(Cost::spte_update_ns, spte::ENTRIES_PER_TABLE as u64);
        self.link_sp(ctx, it, child)?;
        // The children were written behind handle_changed_spte's back.
        ctx.page_stats(child_level, spte::ENTRIES_PER_TABLE as i64);
        ctx.inc(C::huge_page_splits);
        Ok(())
    }
}
