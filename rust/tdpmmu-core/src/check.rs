//! `vm.check()`: structural invariants of the page tables, statistics, roots and the
//! vendor's state (the S-EPT against the mirror tree, the RMP against private leaves), and
//! after `destroy()` the audit of what teardown left behind.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use crate::arena::{NO_TABLE, SP_MIRROR};
use crate::error::{Error, Result};
use crate::gmem;
use crate::memslot::Memslots;
use crate::mmu::Mmu;
use crate::op::MmuState;
use crate::spte::{
    self, is_frozen, is_last, is_mmio, is_shadow_present, pages_per_level, spte_to_pfn,
};
use crate::stats::{C, Ctx};

struct Walk<'a> {
    mmu: &'a Mmu,
    slots: &'a Memslots,
    free: HashSet<u32>,
    seen: HashSet<u32>,
    leaves: [i64; 4],
    tables: i64,
    mirror_tables: usize,
    mirror_leaves: Vec<(u64, u64)>,
    attrs: &'a crate::attrs::PrivateRanges,
    confidential: bool,
}

fn fail(msg: String) -> Error {
    Error::Invariant(msg)
}

impl Walk<'_> {
    /// The A/D encoding of a present entry: of the VM's A/D type; with A/D off no A or D,
    /// and a leaf either access-tracked (RWX clear, R saved) or with R and nothing saved.
    fn ad_encoding(&self, s: u64, gfn: u64, level: u8) -> Result<()> {
        let ad = self.mmu.tdp.shape.ad_bits;
        let saved = s & (spte::ACC_TRACK_SAVED_BITS_MASK << spte::ACC_TRACK_SAVED_BITS_SHIFT);
        let bad = if spte::spte_ad_enabled(s) != ad {
            Some("of the wrong A/D type for the VM")
        } else if ad {
            None
        } else if s & (spte::ACCESSED | spte::DIRTY) != 0 {
            Some("A/D-disabled but has A or D")
        } else if !is_last(s, level) {
            None
        } else if spte::is_access_track_spte(s) {
            (saved & (spte::PT_READABLE << spte::ACC_TRACK_SAVED_BITS_SHIFT) == 0)
                .then_some("access-tracked without a saved R bit")
        } else if saved != 0 || s & spte::PT_READABLE == 0 {
            Some("neither access-tracked nor a readable leaf with empty saved bits")
        } else {
            None
        };
        match bad {
            Some(why) => Err(fail(format!(
                "SPTE {s:#x} at gfn {gfn:#x} level {level} is {why}"
            ))),
            None => Ok(()),
        }
    }

    fn table(&mut self, t: u32, level: u8, base: u64, mirror: bool, gfn_bits: u64) -> Result<()> {
        if self.free.contains(&t) {
            return Err(fail(format!("table {t} is reachable but on a free list")));
        }
        if !self.seen.insert(t) {
            return Err(fail(format!("table {t} is linked from two places")));
        }
        let m = self.mmu.tdp.arena.meta(t);
        let mlevel = m.level.load(Ordering::Relaxed);
        if mlevel != level {
            return Err(fail(format!(
                "table {t} has level {mlevel}, linked at level {level}"
            )));
        }
        if (m.flags.load(Ordering::Relaxed) & SP_MIRROR != 0) != mirror {
            return Err(fail(format!(
                "table {t}: mirror flag differs from its root's"
            )));
        }
        let mgfn = m.gfn.load(Ordering::Relaxed);
        if mgfn != base {
            return Err(fail(format!(
                "table {t} records gfn {mgfn:#x}, linked for {base:#x}"
            )));
        }
        let span = pages_per_level(level);
        for i in 0..spte::ENTRIES_PER_TABLE {
            let s = self.mmu.tdp.arena.entry(t, i).load(Ordering::Acquire);
            // Index i at this level covers these (un-aliased) gfns.
            let gfn = (base + i as u64 * span) & !gfn_bits;
            let gfn_end = gfn + span;
            if is_frozen(s) {
                return Err(fail(format!(
                    "FROZEN_SPTE at rest: table {t} index {i} level {level}"
                )));
            }
            if !is_shadow_present(s) {
                if s != spte::SHADOW_NONPRESENT_VALUE && !is_mmio(s) {
                    return Err(fail(format!(
                        "bad non-present value {s:#x} at gfn {gfn:#x} level {level}"
                    )));
                }
                continue;
            }
            self.ad_encoding(s, gfn, level)?;
            if is_last(s, level) {
                if level > 3 {
                    return Err(fail(format!("huge leaf at level {level}")));
                }
                self.leaves[level as usize] += 1;
                let Some(slot) = self.slots.find(gfn) else {
                    return Err(fail(format!("leaf at gfn {gfn:#x} outside every memslot")));
                };
                if gfn + span > slot.end() || level > slot.level {
                    return Err(fail(format!(
                        "level-{level} leaf at gfn {gfn:#x} exceeds memslot {}",
                        slot.id
                    )));
                }
                // Private memory comes from guest_memfd, shared memory from the host mapping.
                let private = mirror
                    || (self.confidential
                        && !self.mmu.tdp.shape.has_mirror
                        && self.attrs.is_private(gfn));
                let want = if private {
                    slot.gmem_pfn(gfn)
                } else {
                    slot.pfn(gfn)
                };
                if spte_to_pfn(s) != want {
                    return Err(fail(format!(
                        "leaf at gfn {gfn:#x} maps pfn {:#x}, expected {want:#x}",
                        spte_to_pfn(s)
                    )));
                }
                if self.confidential && self.attrs.uniform(gfn, gfn_end) != Some(private) {
                    return Err(fail(format!(
                        "leaf at gfn {gfn:#x} (level {level}) disagrees with the memory attributes"
                    )));
                }
                if mirror {
                    self.mirror_leaves.push((gfn, spte_to_pfn(s)));
                }
                if private {
                    self.mmu
                        .vendor
                        .check_private_leaf(gfn, spte_to_pfn(s), level)
                        .map_err(fail)?;
                }
            } else {
                let Some(c) = self.mmu.tdp.arena.idx_of_pfn(spte_to_pfn(s)) else {
                    return Err(fail(format!(
                        "non-leaf at gfn {gfn:#x} points outside the arena"
                    )));
                };
                self.tables += 1;
                if mirror {
                    self.mirror_tables += 1;
                }
                self.table(c, level - 1, gfn, mirror, gfn_bits)?;
            }
        }
        Ok(())
    }
}

/// Every invariant of a live VM, with `mmu_lock` held for write by the caller (`st`) and
/// `totals` the merged counters at that moment.
pub fn check(mmu: &Mmu, st: &MmuState, totals: &Ctx) -> Result<()> {
    let tdp = &mmu.tdp;
    let (reusable, deferred) = tdp.arena.free_list_snapshot();
    let mut w = Walk {
        mmu,
        slots: &st.memslots,
        free: reusable.iter().chain(deferred.iter()).copied().collect(),
        seen: HashSet::new(),
        leaves: [0; 4],
        tables: 0,
        mirror_tables: 0,
        mirror_leaves: Vec::new(),
        attrs: &st.attrs,
        confidential: mmu.has_private_mem,
    };
    let roots = tdp.roots_snapshot();
    for r in &roots {
        let bits = tdp.root_gfn_bits(r.is_mirror());
        // Roots are walked with alias bits folded into the base so indices line up.
        w.table(r.table, tdp.levels(), 0, r.is_mirror(), bits)?;
        let vcpu_refs = tdp.vcpu_roots().filter(|t| *t == r.table).count() as i32;
        let expect = vcpu_refs + i32::from(!r.invalid);
        if r.refcount != expect {
            return Err(fail(format!(
                "root {} refcount {} but {} holders",
                r.table, r.refcount, expect
            )));
        }
    }
    for t in tdp.vcpu_roots() {
        if t != NO_TABLE && !roots.iter().any(|r| r.table == t) {
            return Err(fail(format!(
                "a vCPU holds root {t}, which is not in the root list"
            )));
        }
    }
    for (lvl, c) in [(1usize, C::pages_4k), (2, C::pages_2m), (3, C::pages_1g)] {
        if w.leaves[lvl] != totals.c[c as usize] {
            return Err(fail(format!(
                "{} leaves present at level {lvl}, stats say {}",
                w.leaves[lvl], totals.c[c as usize]
            )));
        }
    }
    if w.tables != totals.c[C::tdp_mmu_pages as usize] {
        return Err(fail(format!(
            "{} child tables reachable, tdp_mmu_pages says {}",
            w.tables,
            totals.c[C::tdp_mmu_pages as usize]
        )));
    }
    // The external tree (S-EPT or the software mirror) must agree with the mirror tree.
    let mirror_leaves = std::mem::take(&mut w.mirror_leaves);
    mmu.vendor
        .check_external(w.mirror_tables, mirror_leaves)
        .map_err(fail)?;
    if tdp.arena.live() != w.seen.len() {
        return Err(fail(format!(
            "{} tables allocated but {} reachable (leak)",
            tdp.arena.live(),
            w.seen.len()
        )));
    }
    let nx = tdp.nx.lock().len() as i64;
    if nx != totals.c[C::nx_lpage_splits as usize] {
        return Err(fail(format!(
            "{nx} tables on the possible-NX-huge-page list, nx_lpage_splits says {}",
            totals.c[C::nx_lpage_splits as usize]
        )));
    }
    check_dirty_logs(mmu, st, &roots)
}

/// Dirty logging: in a slot that logs dirty pages every page under a writable leaf of a valid
/// direct root has its bit set in the bitmap (otherwise a write would escape the log).
fn check_dirty_logs(mmu: &Mmu, st: &MmuState, roots: &[crate::tdp_mmu::Root]) -> Result<()> {
    let tdp = &mmu.tdp;
    for slot in &st.memslots.slots {
        let Some(log) = &slot.dirty else { continue };
        for r in roots.iter().filter(|r| !r.invalid && !r.is_mirror()) {
            let bits = tdp.root_gfn_bits(false);
            let mut it = crate::tdp_iter::TdpIter::start(
                &tdp.arena,
                r.table,
                tdp.levels(),
                1,
                slot.gfn,
                bits,
            );
            while it.in_range(slot.end()) {
                let s = it.old_spte;
                // With PML a 4K leaf whose D bit is clear is armed: the CPU logs its next write.
                let armed = log.pml && it.level == 1 && s & spte::DIRTY == 0;
                if is_shadow_present(s)
                    && is_last(s, it.level)
                    && s & spte::PT_WRITABLE != 0
                    && !armed
                {
                    // A huge leaf is writable only while every page under it counts as dirty
                    // (initially-set logs protect huge pages lazily).
                    let lo = it.gfn.max(slot.gfn);
                    let hi = (it.gfn + pages_per_level(it.level)).min(slot.end());
                    if let Some(g) = (lo..hi).find(|g| !log.is_set(g - slot.gfn)) {
                        return Err(fail(format!(
                            "memslot {} logs dirty pages: gfn {g:#x} is writable (level-{} leaf at {:#x}) but not marked dirty",
                            slot.id, it.level, it.gfn
                        )));
                    }
                }
                it.next();
            }
        }
    }
    Ok(())
}

/// After `destroy()`: nothing may be left behind — no roots, no KVM page tables, nothing of
/// the vendor's (external tables, assigned RMP entries).
pub fn check_teardown(mmu: &Mmu, st: &MmuState) -> Result<()> {
    let roots = mmu.tdp.roots_snapshot().len();
    let live = mmu.tdp.arena.live();
    if roots != 0 || live != 0 {
        return Err(fail(format!(
            "teardown left {roots} root(s) and {live} KVM page table(s)"
        )));
    }
    mmu.vendor
        .check_teardown(&gmem::ranges(&st.memslots))
        .map_err(fail)
}
