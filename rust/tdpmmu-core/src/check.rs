//! `vm.check()`: structural invariants of the page tables, statistics and roots.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use crate::arena::{NO_TABLE, SP_MIRROR};
use crate::error::{Error, Result};
use crate::memslot::Memslots;
use crate::spte::{
    self, is_frozen, is_last, is_mmio, is_shadow_present, pages_per_level, spte_to_pfn,
};
use crate::stats::C;
use crate::vm::Vm;

struct Walk<'a> {
    vm: &'a Vm,
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
    fn table(&mut self, t: u32, level: u8, base: u64, mirror: bool, gfn_bits: u64) -> Result<()> {
        if self.free.contains(&t) {
            return Err(fail(format!("table {t} is reachable but on a free list")));
        }
        if !self.seen.insert(t) {
            return Err(fail(format!("table {t} is linked from two places")));
        }
        let m = self.vm.arena.meta(t);
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
            let s = self.vm.arena.entry(t, i).load(Ordering::Acquire);
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
                    || (self.confidential && !self.vm.has_mirror && self.attrs.is_private(gfn));
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
                if private && let Some(rmp) = slot.rmp.as_ref() {
                    // SNP: a private NPT leaf needs an assigned RMP entry of the right gpa and size.
                    let e = rmp.get(gfn - slot.gfn);
                    if !crate::snp::Rmp::assigned(e) || crate::snp::Rmp::gfn(e) != gfn {
                        return Err(fail(format!(
                            "private NPT leaf at gfn {gfn:#x} but its RMP entry is not assigned to that gpa"
                        )));
                    }
                    if level == 2 && !crate::snp::Rmp::is_2m(e) {
                        return Err(fail(format!(
                            "2M private NPT leaf at gfn {gfn:#x} over 4K RMP entries"
                        )));
                    }
                }
            } else {
                let Some(c) = self.vm.arena.idx_of_pfn(spte_to_pfn(s)) else {
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

impl Vm {
    pub fn check(&self) -> Result<()> {
        if self.destroyed.load(Ordering::Acquire) {
            return self.check_teardown();
        }
        self.ensure_alive()?;
        let st = self.mmu_lock.write();
        let (reusable, deferred) = self.arena.free_list_snapshot();
        let mut w = Walk {
            vm: self,
            slots: &st.memslots,
            free: reusable.iter().chain(deferred.iter()).copied().collect(),
            seen: HashSet::new(),
            leaves: [0; 4],
            tables: 0,
            mirror_tables: 0,
            mirror_leaves: Vec::new(),
            attrs: &st.attrs,
            confidential: self.vm_type.confidential(),
        };
        let roots = self.roots_snapshot();
        for r in &roots {
            let bits = self.root_gfn_bits(r.is_mirror());
            // Roots are walked with alias bits folded into the base so indices line up.
            w.table(r.table, self.cfg.levels, 0, r.is_mirror(), bits)?;
            let vcpu_refs = self
                .vcpu_root
                .iter()
                .chain(self.vcpu_mirror_root.iter())
                .filter(|v| v.load(Ordering::Acquire) == r.table)
                .count() as i32;
            let expect = vcpu_refs + i32::from(!r.invalid);
            if r.refcount != expect {
                return Err(fail(format!(
                    "root {} refcount {} but {} holders",
                    r.table, r.refcount, expect
                )));
            }
        }
        for v in self.vcpu_root.iter().chain(self.vcpu_mirror_root.iter()) {
            let t = v.load(Ordering::Acquire);
            if t != NO_TABLE && !roots.iter().any(|r| r.table == t) {
                return Err(fail(format!(
                    "a vCPU holds root {t}, which is not in the root list"
                )));
            }
        }
        let t = self.totals.snapshot();
        for (lvl, c) in [(1usize, C::pages_4k), (2, C::pages_2m), (3, C::pages_1g)] {
            if w.leaves[lvl] != t.c[c as usize] {
                return Err(fail(format!(
                    "{} leaves present at level {lvl}, stats say {}",
                    w.leaves[lvl], t.c[c as usize]
                )));
            }
        }
        if w.tables != t.c[C::tdp_mmu_pages as usize] {
            return Err(fail(format!(
                "{} child tables reachable, tdp_mmu_pages says {}",
                w.tables,
                t.c[C::tdp_mmu_pages as usize]
            )));
        }
        if let Some(t) = &self.tdx
            && self.design != crate::vm::HookDesign::None
            && !self.user_hooks
        {
            // The mirror tree and the TDX module's S-EPT must agree entry for entry.
            let (sept_tables, mut sept_leaves) = t.module.snapshot();
            let mut mirror_leaves = std::mem::take(&mut w.mirror_leaves);
            sept_leaves.sort_unstable();
            mirror_leaves.sort_unstable();
            if sept_leaves != mirror_leaves {
                let only_s: Vec<_> = sept_leaves
                    .iter()
                    .filter(|x| !mirror_leaves.contains(x))
                    .take(4)
                    .collect();
                let only_m: Vec<_> = mirror_leaves
                    .iter()
                    .filter(|x| !sept_leaves.contains(x))
                    .take(4)
                    .collect();
                return Err(fail(format!(
                    "mirror and S-EPT disagree: {} vs {} private leaves; only in S-EPT {only_s:x?}, only in mirror {only_m:x?}",
                    mirror_leaves.len(),
                    sept_leaves.len()
                )));
            }
            if sept_tables != w.mirror_tables {
                return Err(fail(format!(
                    "{} mirror page tables but {} S-EPT tables",
                    w.mirror_tables, sept_tables
                )));
            }
        }
        if self.arena.live() != w.seen.len() {
            return Err(fail(format!(
                "{} tables allocated but {} reachable (leak)",
                self.arena.live(),
                w.seen.len()
            )));
        }
        Ok(())
    }

    /// After `destroy()`: nothing may be left behind — no roots, no KVM page tables, no
    /// external (S-EPT) tables, and the RMP all shared.
    fn check_teardown(&self) -> Result<()> {
        let roots = self.roots_snapshot().len();
        let live = self.arena.live();
        if roots != 0 || live != 0 {
            return Err(fail(format!(
                "teardown left {roots} root(s) and {live} KVM page table(s)"
            )));
        }
        if let Some(t) = &self.tdx {
            let (tables, leaves) = t.module.snapshot();
            if tables != 0 || !leaves.is_empty() {
                return Err(fail(format!(
                    "teardown left {tables} S-EPT/external table(s) and {} private leaf(s) never freed",
                    leaves.len()
                )));
            }
        }
        let st = self.mmu_lock.read();
        for slot in &st.memslots.slots {
            if let Some(rmp) = slot.rmp.as_ref()
                && let Some(off) = (0..slot.npages).find(|o| crate::snp::Rmp::assigned(rmp.get(*o)))
            {
                return Err(fail(format!(
                    "teardown left gfn {:#x} assigned in the RMP",
                    slot.gfn + off
                )));
            }
        }
        Ok(())
    }
}
