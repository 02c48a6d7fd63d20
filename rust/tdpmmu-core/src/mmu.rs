//! The fault entry (KVM's mmu.c for the TDP MMU): one EPT/NPT violation as the vCPU takes it —
//! the exit, `kvm_mmu_page_fault` with the `kvm_page_fault` built once up front, the MMIO
//! cache, `kvm_mmu_faultin_pfn` (host page or guest_memfd), the huge-page adjust, the map,
//! and what the guest does after a private fault. VM-type behaviour comes only from the
//! vendor: this path never asks which VM type it runs.

use crate::cost::Cost;
use crate::error::Result;
use crate::gmem;
use crate::memslot::Memslot;
use crate::op::MmuState;
use crate::page_fault::{FaultResult, KvmPageFault, Ret};
use crate::spte::{self, is_mmio, mmio_generation, pages_per_level};
use crate::stats::{C, Ctx};
use crate::tdp_mmu::TdpMmu;
use crate::vendor::Vendor;

/// See `Mmu::guest_access`.
#[derive(Clone, Copy, Debug)]
pub struct GuestAccess {
    pub mirror: bool,
    pub gfn_bits: u64,
    pub may_hit: bool,
}

pub struct Mmu {
    pub tdp: TdpMmu,
    pub vendor: Box<dyn Vendor>,
    /// `kvm_arch_has_private_mem`: memory attributes and guest_memfd exist.
    pub has_private_mem: bool,
    /// guest_memfd folio level: 1 (4K) or 2 (2M).
    pub folio_level: u8,
    // The vendor's constant answers, asked once.
    exit_cost: Cost,
    private_write: bool,
    local_retries: u32,
}

impl Mmu {
    pub fn new(
        tdp: TdpMmu,
        vendor: Box<dyn Vendor>,
        has_private_mem: bool,
        folio_level: u8,
    ) -> Self {
        Self {
            exit_cost: vendor.exit_cost(),
            private_write: vendor.private_fault_is_write(),
            local_retries: vendor.private_fault_local_retries(),
            tdp,
            vendor,
            has_private_mem,
            folio_level,
        }
    }

    /// The ledger field of one exit + re-entry on this VM type.
    pub fn exit_cost(&self) -> Cost {
        self.exit_cost
    }

    /// Whether an access to `gfn` is private when the caller leaves it to the attributes.
    #[inline(always)]
    pub fn is_private(&self, st: &MmuState, gfn: u64, private: Option<bool>) -> bool {
        match private {
            Some(p) => p,
            None => self.has_private_mem && st.attrs.is_private(gfn),
        }
    }

    /// How one guest access of kind `private` (None: by the attribute) to `gfn` meets the
    /// tables: whether it walks the mirror root, that root's gfn bits, and whether the
    /// hardware walk may complete it at all. An access of the other kind than the page's
    /// attribute never does: without a mirror root the leaf would serve it, but the CPU's
    /// own check (SNP's RMP) faults and KVM exits to userspace, so it takes the fault path.
    #[inline(always)]
    pub fn guest_access(&self, st: &MmuState, gfn: u64, private: Option<bool>) -> GuestAccess {
        let kind = self.is_private(st, gfn, private);
        let mirror = self.tdp.shape.has_mirror && kind;
        GuestAccess {
            mirror,
            gfn_bits: self.tdp.root_gfn_bits(mirror),
            may_hit: private.is_none() || kind == self.is_private(st, gfn, None),
        }
    }

    /// One fault as the vCPU takes it (mmu_lock held for read): the exit, then
    /// `kvm_mmu_page_fault`; a private fault that returns RETRY may be retried inside KVM
    /// without re-entering the guest (the vendor says how often). `prefetch` is a pre-fault
    /// (KVM_PRE_FAULT_MEMORY / populate): no exit, no fault counters.
    #[allow(clippy::too_many_arguments)]
    pub fn page_fault(
        &self,
        st: &MmuState,
        ctx: &mut Ctx,
        gfn: u64,
        private: Option<bool>,
        write: bool,
        exec: bool,
        vcpu: usize,
        prefetch: bool,
    ) -> Result<FaultResult> {
        let start_ns = ctx.modeled_ns;
        let is_private = self.is_private(st, gfn, private);
        if !prefetch {
            self.vendor.vcpu_run_allowed()?;
            ctx.charge(self.exit_cost, 1);
        }
        let write = write || (is_private && self.private_write);
        let mut retries = 0;
        loop {
            let (mut r, pfn) =
                self.kvm_mmu_page_fault(st, ctx, gfn, is_private, write, exec, vcpu, prefetch)?;
            if r.ret == Ret::Retry
                && is_private
                && !prefetch
                && ctx.bug.is_none()
                && retries < self.local_retries
            {
                retries += 1;
                ctx.inc(C::tdx_local_retries);
                continue;
            }
            if is_private && !prefetch {
                self.vendor.post_private_fault(ctx, gfn, pfn, r.ret);
            }
            r.retries = retries;
            r.modeled_ns = ctx.modeled_ns - start_ns;
            return Ok(r);
        }
    }

    /// `kvm_mmu_do_page_fault` + `kvm_tdp_mmu_page_fault`. Returns the outcome and the exact
    /// pfn faulted in (0 if none).
    #[allow(clippy::too_many_arguments)]
    fn kvm_mmu_page_fault(
        &self,
        st: &MmuState,
        ctx: &mut Ctx,
        gfn: u64,
        is_private: bool,
        write: bool,
        exec: bool,
        vcpu: usize,
        prefetch: bool,
    ) -> Result<(FaultResult, u64)> {
        let tdp = &self.tdp;
        // kvm_mmu_reload: a vCPU without a direct root loads its roots first.
        if tdp.vcpu_root(vcpu, false) == crate::arena::NO_TABLE {
            tdp.mmu_load(ctx, vcpu)?;
        }
        let mirror = tdp.shape.has_mirror && is_private;
        let root = tdp.vcpu_root(vcpu, mirror);
        let gfn_bits = tdp.root_gfn_bits(mirror);
        let slot = st.memslots.find(gfn);
        let mut f = KvmPageFault::new(gfn, is_private, write, exec, prefetch);

        // MMIO cache: a current-generation MMIO SPTE is handled without a page fault.
        if slot.is_none() && !prefetch && !is_private {
            let (level, s) = tdp.lookup(root, gfn, gfn_bits);
            if level == 1
                && is_mmio(s)
                && mmio_generation(s) == st.memslots.generation & spte::MMIO_GEN_MASK
            {
                ctx.charge(Cost::fault_handling_ns, 1);
                f.spte = s;
                return Ok((f.result(Ret::Emulate), 0));
            }
        }
        if !prefetch {
            ctx.inc(C::pf_taken);
            // fast_page_fault: a write to a present shared leaf fixed without mmu_lock; with
            // A/D off also any fault on a leaf the CPU sees as not present, which may be
            // access-tracked (page_fault_can_be_fast).
            let can_be_fast = write || !tdp.shape.ad_bits;
            if can_be_fast
                && !is_private
                && !(self.has_private_mem && st.attrs.is_private(gfn))
                && let Some(ret) = self.fast_page_fault(ctx, slot, root, gfn, gfn_bits, &mut f)
            {
                return Ok((f.result(ret), 0));
            }
            // An exit's handling is charged per slow-path fault; a pre-fault per leaf.
            ctx.charge(Cost::fault_handling_ns, 1);
        }
        // kvm_mmu_faultin_pfn: the access must match the attribute, and private memory must
        // come from guest_memfd; otherwise userspace gets KVM_EXIT_MEMORY_FAULT.
        let mismatch = self.has_private_mem && is_private != st.attrs.is_private(gfn);
        let no_gmem = is_private && slot.is_none_or(|s| !s.gmem);
        if mismatch || no_gmem {
            if !prefetch {
                ctx.inc(C::pf_memory_fault);
            }
            (f.level, f.spte) = tdp.lookup(root, gfn, gfn_bits);
            return Ok((f.result(Ret::MemoryFault), 0));
        }
        let mut pfn = 0;
        match slot {
            // A write to a read-only memslot: KVM_PFN_ERR_RO_FAULT, emulated (userspace MMIO).
            // A pre-fault (KVM_PRE_FAULT_MEMORY) is a read: it maps read-only instead.
            Some(s) if s.readonly && write && !prefetch && !is_private => {
                if !prefetch {
                    ctx.inc(C::pf_emulate);
                }
                (f.level, f.spte) = tdp.lookup(root, gfn, gfn_bits);
                return Ok((f.result(Ret::Emulate), 0));
            }
            // A write to a shared page the host mapped read-only (mprotect): hva_to_pfn
            // cannot get a writable page (KVM_PFN_ERR_FAULT), so KVM fills a memory-fault
            // exit and KVM_RUN returns -EFAULT.
            Some(s) if write && !prefetch && !is_private && s.host_readonly(gfn) => {
                if !prefetch {
                    ctx.inc(C::pf_memory_fault);
                }
                (f.level, f.spte) = tdp.lookup(root, gfn, gfn_bits);
                return Ok((f.result(Ret::MemoryFault), 0));
            }
            Some(s) => {
                // A read of a host read-only page maps it without W and host-writable, so a
                // later write faults again.
                f.map_writable = !s.readonly && (is_private || !s.host_readonly(gfn));
                f.write_tracked = !is_private && s.write_tracked(gfn);
                pfn = self.faultin_pfn(ctx, s, &mut f);
                // A write-tracked page disallows a huge mapping over it.
                while f.max_level > 1 && s.write_track.is_some() {
                    let base = spte::round_gfn(gfn, f.max_level);
                    if !s.any_write_tracked(base, base + pages_per_level(f.max_level)) {
                        break;
                    }
                    f.max_level -= 1;
                }
                if self.has_private_mem {
                    // Mixed private/shared ranges cannot be mapped huge (KVM_LPAGE_MIXED_FLAG).
                    while f.max_level > 1 {
                        let base = spte::round_gfn(gfn, f.max_level);
                        if st.attrs.uniform(base, base + pages_per_level(f.max_level))
                            == Some(is_private)
                        {
                            break;
                        }
                        f.max_level -= 1;
                    }
                }
            }
            // MMIO: 4K, but an exec fault still marks the tables it links NX-disallowed.
            None => f.mmio = true,
        }
        self.hugepage_adjust(&mut f);
        ctx.op_private = is_private;
        // In virtual time the fault takes the engine's mmu_lock here, as KVM does after
        // faultin_pfn (otherwise the caller holds the real lock).
        if !prefetch {
            crate::sim::with(|e| e.fault_lock(ctx));
            // KVM's work under mmu_lock: the walk, the new SPTE, the install.
            ctx.charge(Cost::fault_map_ns, 1);
        }
        let ret = tdp.map(ctx, &mut f, root, st.memslots.generation);
        if !prefetch {
            crate::sim::with(|e| e.fault_unlock(ctx));
        }
        ctx.op_private = false;
        let ret = ret?;
        if prefetch && ret == Ret::Fixed {
            ctx.charge(Cost::fault_handling_ns, 1);
        }
        // make_spte: a writable SPTE in a slot that logs dirty pages marks the page dirty.
        if ret == Ret::Fixed
            && f.spte & spte::PT_WRITABLE != 0
            && let Some(s) = slot
            && s.dirty.is_some()
        {
            s.mark_dirty(gfn);
            ctx.inc(C::dirty_pages_logged);
        }
        if !prefetch {
            match ret {
                Ret::Fixed => ctx.inc(C::pf_fixed),
                Ret::Spurious => ctx.inc(C::pf_spurious),
                Ret::Emulate => ctx.inc(C::pf_emulate),
                Ret::Retry => ctx.inc(C::pf_retry),
                Ret::WriteProtected => ctx.inc(C::pf_write_protected),
                Ret::MemoryFault => ctx.inc(C::pf_memory_fault),
                Ret::Continue | Ret::Invalid => {}
            }
        }
        Ok((f.result(ret), pfn))
    }

    /// `kvm_mmu_faultin_pfn`: shared pages come from the host mapping (allocated on first
    /// touch), private ones from guest_memfd, whose folio size and the vendor cap the level.
    /// Returns the exact pfn.
    #[inline]
    fn faultin_pfn(&self, ctx: &mut Ctx, slot: &Memslot, f: &mut KvmPageFault) -> u64 {
        let (pfn, first) = if f.is_private {
            let (pfn, first) = gmem::get_pfn(&*self.vendor, ctx, slot, f.gfn);
            f.max_level = slot
                .level
                .min(self.folio_level)
                .min(self.vendor.private_max_level(pfn));
            (pfn, first)
        } else {
            // Dirty logging tracks 4K pages: no huge mapping in a logged slot.
            f.max_level = if slot.dirty.is_some() { 1 } else { slot.level };
            (slot.pfn(f.gfn), slot.touch(f.gfn))
        };
        f.pfn = pfn;
        if first {
            ctx.inc(C::host_pages_allocated);
        }
        let pages = pages_per_level(slot.level);
        let host = crate::sim::with(|e| e.host_page(ctx, pfn, pages, f.is_private, first));
        if first && host.is_none() {
            ctx.charge(Cost::host_page_alloc_ns, 1);
            ctx.charge(Cost::host_zero_4k_ns, pages - 1);
        }
        pfn
    }

    /// `fast_page_fault` on the direct root: a write to a present leaf that is MMU-writable
    /// but write-protected (dirty logging) gets W and D back with one cmpxchg and marks the
    /// page dirty; a leaf that already allows the access is spurious. With A/D off an
    /// access-tracked leaf gets its saved R and X back in the same cmpxchg (and W, for a write
    /// to an MMU-writable leaf), also for a read or a fetch; if the restored leaf still does
    /// not allow the access (a write to a leaf that is not MMU-writable) the slow path
    /// decides. A read or fetch whose leaf the CPU sees as present is never fast. No lock, no
    /// pfn lookup; up to 4 lost cmpxchgs, then the slow path. None: not fixable here.
    fn fast_page_fault(
        &self,
        ctx: &mut Ctx,
        slot: Option<&Memslot>,
        root: u32,
        gfn: u64,
        gfn_bits: u64,
        f: &mut KvmPageFault,
    ) -> Option<Ret> {
        let (level, e) = self.tdp.leaf_ptr(root, gfn, gfn_bits)?;
        let mut s = e.load(std::sync::atomic::Ordering::Acquire);
        // page_fault_can_be_fast: a fault on a present translation must be a write.
        if !f.write && spte::is_hw_present(s) {
            return None;
        }
        for _ in 0..=4 {
            crate::sim::with(|env| env.spte_access(ctx, false));
            if !spte::is_shadow_present(s) || !spte::is_last(s, level) {
                return None;
            }
            f.level = level;
            if spte::access_allowed(s, f.write, f.exec) {
                // The write goes through after re-entry: with PML the CPU sets D and logs it.
                if f.write && spte::spte_ad_enabled(s) && s & spte::DIRTY == 0 && level == 1 {
                    e.fetch_or(
                        spte::DIRTY | spte::ACCESSED,
                        std::sync::atomic::Ordering::AcqRel,
                    );
                    if slot.is_some_and(|m| m.pml_log(gfn)) {
                        ctx.inc(C::pml_logged);
                    }
                }
                f.spte = s;
                ctx.charge(Cost::fast_fix_ns, 1);
                ctx.inc(C::pf_fast);
                ctx.inc(C::pf_spurious);
                return Some(Ret::Spurious);
            }
            let logged = slot.is_some_and(|m| m.dirty.is_some());
            let new = if spte::spte_ad_enabled(s) {
                // Write-protected for page tracking (MMU-writable clear), or a huge page in a
                // logged slot (it must be split): the slow path decides.
                if s & spte::MMU_WRITABLE == 0 || (level > 1 && logged) {
                    return None;
                }
                s | spte::PT_WRITABLE | spte::DIRTY | spte::ACCESSED
            } else {
                // A/D off: an access-tracked leaf gets R and X back; a write to an
                // MMU-writable leaf gets W (not on a huge page of a logged slot).
                let mut new = if spte::is_access_track_spte(s) {
                    spte::restore_acc_track_spte(s)
                } else {
                    s
                };
                if f.write && s & spte::MMU_WRITABLE != 0 {
                    if level > 1 && logged {
                        return None;
                    }
                    new |= spte::PT_WRITABLE;
                }
                if new == s {
                    return None;
                }
                new
            };
            // KVM re-checks that the fixed SPTE allows the access: an exec fault on a
            // non-executable leaf (NX huge pages), or a write the restored leaf does not
            // allow, is the slow path's business.
            if !spte::access_allowed(new, f.write, f.exec) {
                return None;
            }
            crate::sim::with(|env| env.spte_access(ctx, true));
            match e.compare_exchange(
                s,
                new,
                std::sync::atomic::Ordering::AcqRel,
                std::sync::atomic::Ordering::Acquire,
            ) {
                Ok(_) => {
                    f.spte = new;
                    // fast_pf_fix_direct_spte: a leaf made writable marks the page dirty.
                    if spte::is_writable(new)
                        && !spte::is_writable(s)
                        && let Some(m) = slot
                        && m.dirty.is_some()
                    {
                        m.mark_dirty(gfn);
                        ctx.inc(C::dirty_pages_logged);
                    }
                    ctx.charge(Cost::fast_fix_ns, 1);
                    ctx.inc(C::pf_fast);
                    ctx.inc(C::pf_fixed);
                    return Some(Ret::Fixed);
                }
                Err(cur) => s = cur,
            }
        }
        None
    }

    /// `kvm_mmu_hugepage_adjust`.
    fn hugepage_adjust(&self, f: &mut KvmPageFault) {
        f.huge_page_disallowed = f.exec && self.tdp.shape.nx_huge_pages;
        if f.max_level == 1 {
            return;
        }
        f.req_level = f.max_level;
        if f.huge_page_disallowed {
            return;
        }
        f.goal_level = f.req_level;
        f.pfn &= !(pages_per_level(f.goal_level) - 1);
    }
}
