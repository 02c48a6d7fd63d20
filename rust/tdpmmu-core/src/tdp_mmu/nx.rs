//! NX huge page mitigation and its recovery (spec §7.5): an exec fault under the mitigation
//! maps 4K where a huge page could have been and puts the table it had to create on the list
//! of possible NX huge pages (`nx_lpage_splits`); the recovery worker zaps a share of that list
//! so later non-exec faults can map huge again (`kvm_recover_nx_huge_pages`, with the TDP
//! MMU's `kvm_tdp_mmu_zap_possible_nx_huge_page`, v6.17+: under `mmu_lock` for read, only if
//! the parent entry still points at the table).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;

use super::TdpMmu;
use crate::arena::{Arena, SP_NX_TRACKED};
use crate::spte::{self, SHADOW_NONPRESENT_VALUE, is_last, is_shadow_present};
use crate::stats::{C, Ctx};
use crate::tdp_iter::TdpIter;

/// The list, in tracking order (a table can be found and removed in O(log n)).
#[derive(Debug, Default)]
pub struct NxList {
    next: u64,
    by_seq: BTreeMap<u64, u32>,
    by_table: HashMap<u32, u64>,
}

impl NxList {
    pub fn len(&self) -> usize {
        self.by_seq.len()
    }
    pub fn is_empty(&self) -> bool {
        self.by_seq.is_empty()
    }
    /// The oldest `n` tables.
    pub fn oldest(&self, n: usize) -> Vec<u32> {
        self.by_seq.values().take(n).copied().collect()
    }
}

impl TdpMmu {
    /// `track_possible_nx_huge_page`.
    pub(crate) fn track_possible_nx_huge_page(&self, ctx: &mut Ctx, table: u32) {
        let meta = self.arena.meta(table);
        if meta.flags.fetch_or(SP_NX_TRACKED, Ordering::AcqRel) & SP_NX_TRACKED != 0 {
            return;
        }
        let mut l = self.nx.lock();
        let seq = l.next;
        l.next += 1;
        l.by_seq.insert(seq, table);
        l.by_table.insert(table, seq);
        ctx.inc(C::nx_lpage_splits);
    }

    /// `untrack_possible_nx_huge_page`: when the table is freed (or recovery skips it).
    pub(crate) fn untrack_possible_nx_huge_page(&self, ctx: &mut Ctx, table: u32) {
        let meta = self.arena.meta(table);
        if meta.flags.fetch_and(!SP_NX_TRACKED, Ordering::AcqRel) & SP_NX_TRACKED == 0 {
            return;
        }
        let mut l = self.nx.lock();
        if let Some(seq) = l.by_table.remove(&table) {
            l.by_seq.remove(&seq);
        }
        ctx.add(C::nx_lpage_splits, -1);
    }

    /// One run of the recovery worker: zap ⌈list / ratio⌉ of the oldest tables on the list
    /// (ratio 0: none). A table of a slot that logs dirty pages is only taken off the list
    /// (`skip(gfn)` says which). Returns the tables zapped; the caller flushes if any.
    pub fn recover_nx_huge_pages(
        &self,
        ctx: &mut Ctx,
        ratio: u32,
        skip: impl Fn(u64) -> bool,
    ) -> u64 {
        if ratio == 0 {
            return 0;
        }
        let n = {
            let l = self.nx.lock();
            l.len().div_ceil(ratio as usize)
        };
        let victims = self.nx.lock().oldest(n);
        let mut zapped = 0;
        for table in victims {
            let meta = self.arena.meta(table);
            let (level, gfn) = (
                meta.level.load(Ordering::Relaxed),
                meta.gfn.load(Ordering::Relaxed),
            );
            if skip(gfn) {
                self.untrack_possible_nx_huge_page(ctx, table);
                continue;
            }
            if self.zap_possible_nx_huge_page(ctx, table, level, gfn) {
                zapped += 1;
                ctx.inc(C::nx_huge_pages_recovered);
            } else {
                // No longer linked where it was: nothing to recover, just forget it.
                self.untrack_possible_nx_huge_page(ctx, table);
            }
        }
        zapped
    }

    /// `kvm_tdp_mmu_zap_possible_nx_huge_page`: set the parent entry non-present with the
    /// atomic setter if it still points at `table` (the subtree goes by handle_removed_pt).
    fn zap_possible_nx_huge_page(&self, ctx: &mut Ctx, table: u32, level: u8, gfn: u64) -> bool {
        let want = Arena::pfn(table);
        let roots: Vec<u32> = self
            .roots
            .lock()
            .iter()
            .filter(|r| !r.invalid && !r.is_mirror())
            .map(|r| r.table)
            .collect();
        for root in roots {
            let bits = self.root_gfn_bits(false);
            let parent_level = level + 1;
            let mut it = TdpIter::start(
                &self.arena,
                root,
                self.shape.levels,
                parent_level,
                gfn,
                bits,
            );
            while it.in_range(gfn + 1) {
                if it.level == parent_level {
                    let s = it.old_spte;
                    if is_shadow_present(s)
                        && !is_last(s, it.level)
                        && spte::spte_to_pfn(s) == want
                        && self
                            .set_spte_atomic(ctx, &mut it, SHADOW_NONPRESENT_VALUE)
                            .is_ok()
                    {
                        return true;
                    }
                    break;
                }
                it.next();
            }
        }
        false
    }
}
