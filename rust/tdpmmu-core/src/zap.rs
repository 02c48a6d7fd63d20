//! Zaps (spec §5): leaf zaps of a range, root zaps in four passes, fast zap of all direct
//! roots; plus the memslot and pre-fault operations that drive them.

use std::sync::atomic::Ordering;

use crate::arena::NO_TABLE;
use crate::error::{Result, bad_arg};
use crate::iter::TdpIter;
use crate::memslot::backing_level;
use crate::spte::{self, is_last, is_shadow_present, pages_per_level};
use crate::stats::Ctx;
use crate::vm::{MmuState, Ret, RootTypes, Vm, VmType};

/// Outcome of a zap over several roots.
#[derive(Debug, Default, Clone, Copy)]
pub struct ZapOutcome {
    pub flush: bool,
    pub zapped: u64,
}

impl Vm {
    /// `tdp_mmu_zap_leafs` on one root (write lock held). Requests a flush only for valid roots.
    pub(crate) fn zap_leafs_root(
        &self,
        ctx: &mut Ctx,
        root: u32,
        root_invalid: bool,
        start: u64,
        end: u64,
        out: &mut ZapOutcome,
    ) {
        let mirror = self.has_mirror && self.is_mirror_table(root);
        let end = end.min(self.max_gfn);
        let mut it = TdpIter::start(
            &self.arena,
            root,
            self.cfg.levels,
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

    /// Leaf zap of [start, end) in every root matching `types`.
    pub(crate) fn zap_leafs(
        &self,
        ctx: &mut Ctx,
        types: RootTypes,
        start: u64,
        end: u64,
    ) -> ZapOutcome {
        let targets: Vec<(u32, bool)> = self
            .roots
            .lock()
            .iter()
            .filter(|r| types.matches(r))
            .map(|r| (r.table, r.invalid))
            .collect();
        let mut out = ZapOutcome::default();
        for (root, invalid) in targets {
            self.zap_leafs_root(ctx, root, invalid, start, end, &mut out);
        }
        if let Some(t) = &self.tdx {
            t.module.flush_batched(ctx);
        }
        out
    }

    /// `kvm_tdp_mmu_unmap_gfn_range`: the attribute filter picks the roots (TDX: PRIVATE →
    /// mirror, SHARED → direct; other VMs: the direct root), invalid roots always included.
    pub(crate) fn unmap_gfn_range(
        &self,
        ctx: &mut Ctx,
        private: bool,
        shared: bool,
        start: u64,
        end: u64,
    ) -> ZapOutcome {
        let types = if self.has_mirror {
            let mut t = RootTypes::INVALID;
            if private {
                t = t.or(RootTypes::MIRROR);
            }
            if shared {
                t = t.or(RootTypes::DIRECT);
            }
            t
        } else {
            RootTypes::DIRECT.or(RootTypes::INVALID)
        };
        ctx.op_private = private;
        let out = self.zap_leafs(ctx, types, start, end);
        ctx.op_private = false;
        out
    }

    /// `tdp_mmu_zap_root`: four passes (4K, 2M, 1G, root level), finest first.
    pub(crate) fn zap_root(&self, ctx: &mut Ctx, root: u32, shared: bool) {
        let root_level = self.cfg.levels;
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
    pub(crate) fn zap_all_fast_locked(&self, ctx: &mut Ctx) {
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

    /// Run `body` under the write lock with a fresh context; end the grace period and merge.
    pub(crate) fn write_op<T>(
        &self,
        body: impl FnOnce(&mut MmuState, &mut Ctx) -> Result<T>,
    ) -> Result<T> {
        self.ensure_alive()?;
        let mut ctx = Ctx::new(&self.costs, self.cfg.trace);
        let r = {
            let mut st = self.mmu_lock.write();
            let r = body(&mut st, &mut ctx);
            self.arena.quiesce();
            r
        };
        let r = r?;
        self.finish(&ctx)?;
        Ok(r)
    }

    /// `kvm_zap_gfn_range`: leaves in all valid roots; one range flush if anything was zapped.
    pub fn zap_gfn_range(&self, gfn: u64, npages: u64) -> Result<u64> {
        self.check_range(gfn, npages)?;
        self.write_op(|_, ctx| {
            let out = self.zap_leafs(ctx, RootTypes::VALID, gfn, gfn + npages);
            if out.flush {
                self.flush_remote_tlbs(ctx);
            }
            Ok(out.zapped)
        })
    }

    /// Host mm invalidation (`kvm_tdp_mmu_unmap_gfn_range` with the SHARED filter).
    pub fn mmu_notifier_invalidate(&self, gfn: u64, npages: u64) -> Result<u64> {
        self.check_range(gfn, npages)?;
        self.write_op(|_, ctx| {
            let out = self.unmap_gfn_range(ctx, false, true, gfn, gfn + npages);
            if out.flush {
                self.flush_remote_tlbs(ctx);
            }
            Ok(out.zapped)
        })
    }

    pub fn zap_all_fast(&self) -> Result<()> {
        self.write_op(|_, ctx| {
            self.zap_all_fast_locked(ctx);
            Ok(())
        })
    }

    pub fn add_memslot(&self, gfn: u64, npages: u64, backing: u64, gmem: bool) -> Result<u32> {
        let level = backing_level(backing, "backing")?;
        if gmem && self.vm_type == VmType::Default {
            return Err(bad_arg(
                "gmem",
                "a default VM has no guest_memfd; use gmem=False",
            ));
        }
        self.ensure_alive()?;
        self.write_op(|st, _| {
            st.memslots.check_add(gfn, npages, level, self.max_gfn)?;
            let id = st.memslots.add(gfn, npages, level, gmem);
            if let Some(table) = &self.rmp
                && gmem
            {
                let slot = st
                    .memslots
                    .slots
                    .iter_mut()
                    .find(|s| s.id == id)
                    .expect("just added");
                let r = std::sync::Arc::new(crate::snp::Rmp::new(npages, self.cfg.folio_level));
                table.insert(slot.gmem_pfn, npages, r.clone());
                slot.rmp = Some(r);
            }
            Ok(id)
        })
    }

    /// Memslot deletion: a fast zap for default VMs with KVM_X86_QUIRK_SLOT_ZAP_ALL, otherwise
    /// a leaf zap of the slot in every root (`kvm_mmu_zap_memslot`).
    pub fn delete_memslot(&self, id: u32) -> Result<()> {
        self.write_op(|st, ctx| {
            let Some(slot) = st.memslots.by_id(id) else {
                let ids: Vec<String> = st.memslots.slots.iter().map(|s| s.id.to_string()).collect();
                return Err(bad_arg(
                    "slot",
                    format!("no memslot {id}; existing: [{}]", ids.join(", ")),
                ));
            };
            let (start, end) = (slot.gfn, slot.end());
            if self.vm_type == VmType::Default && self.cfg.slot_zap_all {
                self.zap_all_fast_locked(ctx);
            } else {
                let out = self.unmap_gfn_range(ctx, true, true, start, end);
                if out.flush {
                    self.flush_remote_tlbs(ctx);
                }
            }
            if let Some(slot) = st.memslots.remove(id)
                && let Some(table) = &self.rmp
            {
                table.remove(slot.gmem_pfn);
            }
            Ok(())
        })
    }

    /// KVM_PRE_FAULT_MEMORY: prefetch faults over [gfn, gfn + npages), each continuing after the
    /// page it mapped. Returns the number of leaves installed.
    pub fn populate(&self, gfn: u64, npages: u64, private: Option<bool>, vcpu: u32) -> Result<u64> {
        self.ensure_alive()?;
        self.check_range(gfn, npages)?;
        self.check_vcpu(vcpu)?;
        let is_private = self.check_private(private)?;
        let mut ctx = Ctx::new(&self.costs, self.cfg.trace);
        let end = gfn + npages;
        let r = (|| {
            let st = self.mmu_lock.read();
            // Reject the whole request before changing anything.
            let mut g = gfn;
            while g < end {
                let Some(s) = st.memslots.find(g) else {
                    return Err(bad_arg(
                        "gfn",
                        format!("gfn {g:#x} of the range is not in any memslot"),
                    ));
                };
                g = s.end();
            }
            if self.vm_type.confidential() {
                let want = is_private.unwrap_or_else(|| st.attrs.is_private(gfn));
                if st.attrs.uniform(gfn, end) != Some(want) {
                    return Err(bad_arg(
                        "private",
                        format!(
                            "the range's memory attributes are not all {}",
                            if want { "private" } else { "shared" }
                        ),
                    ));
                }
                if want {
                    let mut g = gfn;
                    while g < end {
                        let s = st.memslots.find(g).expect("covered: checked above");
                        if !s.gmem {
                            return Err(bad_arg(
                                "private",
                                format!(
                                    "private memory needs guest_memfd; memslot {} holding gfn {g:#x} has none",
                                    s.id
                                ),
                            ));
                        }
                        g = s.end();
                    }
                }
                if let Some(t) = &self.tdx
                    && !t.module.finalized()
                    && !want
                {
                    return Err(bad_arg(
                        "private",
                        "before finalize only the private initial image can be populated",
                    ));
                }
            }
            let mut installed = 0;
            let mut g = gfn;
            while g < end {
                let r = self.page_fault(
                    &st,
                    &mut ctx,
                    g,
                    is_private,
                    true,
                    false,
                    vcpu as usize,
                    true,
                )?;
                if ctx.bug.is_some() {
                    // KVM's pre-fault loop ends with -EIO once the VM is bugged.
                    break;
                }
                match r.ret {
                    Ret::Retry => continue,
                    Ret::Fixed => {
                        installed += 1;
                        if let Some(t) = &self.tdx
                            && r.private
                            && t.module.opts.v6_16
                            && !t.module.finalized()
                            && self.design != crate::vm::HookDesign::None
                            && !self.user_hooks
                        {
                            // v6.16 tdx_gmem_post_populate issues PAGE.ADD after the map.
                            let s =
                                t.module
                                    .populate_page_add(&mut ctx, g, spte::spte_to_pfn(r.spte));
                            if s != crate::tdx::Status::Success {
                                ctx.bug(format!(
                                    "TDH.MEM.PAGE.ADD failed for gfn {g:#x}: {}",
                                    s.name()
                                ));
                            }
                        }
                    }
                    _ => {}
                }
                if ctx.bug.is_some() {
                    break;
                }
                g = (g | (pages_per_level(r.level) - 1)) + 1;
            }
            Ok(installed)
        })();
        if self.arena_has_deferred() {
            self.grace_period();
        }
        let r = r?;
        self.finish(&ctx)?;
        Ok(r)
    }

    pub fn memslots(&self) -> Vec<(u32, u64, u64, u64, bool, u64)> {
        let st = self.mmu_lock.read();
        st.memslots
            .slots
            .iter()
            .map(|s| (s.id, s.gfn, s.npages, s.backing_bytes(), s.gmem, s.host_pfn))
            .collect()
    }

    pub fn memslot_generation(&self) -> u64 {
        self.mmu_lock.read().memslots.generation
    }

    /// Modeled nanoseconds charged to each `CostModel` field, in field order; the values add up
    /// (in this order) to exactly `modeled_ns` of `stats()`.
    pub fn cost_breakdown(&self) -> Vec<(&'static str, f64)> {
        let t = self.totals.snapshot();
        let rates = self.costs.rates();
        crate::cost::COST_FIELDS
            .iter()
            .zip(t.units.iter().zip(rates.iter()))
            .map(|(n, (u, r))| (*n, *u as f64 * r))
            .collect()
    }

    /// Counters by KVM name, plus memory gauges.
    pub fn stats(&self) -> Vec<(&'static str, f64)> {
        let t = self.totals.snapshot();
        let mut v: Vec<(&'static str, f64)> = crate::stats::COUNTER_NAMES
            .iter()
            .zip(t.c.iter())
            .map(|(n, c)| (*n, *c as f64))
            .collect();
        v.push(("modeled_ns", t.ledger_ns()));
        v.push(("page_table_bytes", (self.arena.live() * 4096) as f64));
        v.push(("page_table_peak_bytes", (self.arena.peak() * 4096) as f64));
        v
    }
}
