"""Fault entry (KVM's mmu.c): from the exit to ``kvm_tdp_mmu_map`` and back.

:meth:`Mmu.page_fault` is one fault as a vCPU takes it: the exit, ``kvm_mmu_page_fault``
(with TDX's local retry of private faults), then what the guest does with the page (TDX
accept, SNP validate).  :meth:`Mmu.kvm_mmu_page_fault` builds the ``kvm_page_fault`` up
front, answers MMIO from the cache, turns an attribute mismatch into
KVM_EXIT_MEMORY_FAULT, emulates a write to a read-only memslot, turns a write to a shared
page the host mapped read-only (``mprotect``) into a memory-fault exit, looks up the pfn
(``faultin_pfn``), picks the level (no huge page over a write-tracked gfn) and maps.  A
write to a present shared leaf is first tried on the lockless fast path
(:meth:`Mmu.fast_page_fault`), which restores W on a leaf that dirty logging protected; with
A/D bits off any fault is, and it also restores access-tracked leaves.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .arena import MmuPage
from .attrs import PrivateRanges
from .errors import Ret
from .memslot import Memslots
from .spte import (
    MMIO_SPTE_GEN_MASK,
    PG_LEVEL_4K,
    SPTE_ACCESSED,
    SPTE_DIRTY,
    SPTE_MMU_WRITABLE,
    SPTE_WRITABLE,
    gfn_round_for_level,
    is_access_track_spte,
    is_hw_present,
    is_last_spte,
    is_mmio_spte,
    is_shadow_present_pte,
    mmio_spte_generation,
    pages_per_hpage,
    restore_acc_track_spte,
    spte_ad_enabled,
)
from .stats import Ctx
from .tdp_mmu import KvmPageFault, TdpMmu, is_access_allowed
from .vendor.base import Vendor

#: the counter of each fault result (vCPU faults only; prefetches count nothing).
_RET_COUNTER = {
    Ret.FIXED: "pf_fixed",
    Ret.SPURIOUS: "pf_spurious",
    Ret.EMULATE: "pf_emulate",
    Ret.RETRY: "pf_retry",
    Ret.WRITE_PROTECTED: "pf_write_protected",
    Ret.MEMORY_FAULT: "pf_memory_fault",
}


@dataclasses.dataclass(frozen=True)
class ReferenceFault:
    """What one fault returned (shape of ``tdpmmu.Fault``)."""

    ret: Any
    level: int
    retries: int
    modeled_ns: float
    spte: int
    gfn: int
    private: bool


class Mmu:
    """The fault path of one VM."""

    def __init__(
        self,
        *,
        ctx: Ctx,
        tdp_mmu: TdpMmu,
        slots: Memslots,
        attrs: PrivateRanges,
        vendor: Vendor,
        confidential: bool,
        folio_level: int,
    ) -> None:
        self.ctx = ctx
        self.tdp_mmu = tdp_mmu
        self.slots = slots
        self.attrs = attrs
        self.vendor = vendor
        #: private memory, guest_memfd and memory attributes exist (all but "default").
        self.confidential = confidential
        self.folio_level = folio_level

    def page_fault(
        self, vcpu: int, gfn: int, private: bool | None, write: bool, exec: bool, prefetch: bool
    ) -> ReferenceFault:
        """One fault as the vCPU takes it (or, with ``prefetch``, a KVM_PRE_FAULT_MEMORY step).

        ``private=None`` accesses the gfn as its memory attribute says.  A TDX private fault
        that returns RETRY is retried inside KVM (without busy injection it never does).
        """
        start_ns = self.ctx.ledger.clock
        vendor = self.vendor
        is_private = (
            private if private is not None else (self.confidential and self.attrs.is_private(gfn))
        )
        if not prefetch:
            vendor.check_vcpu_can_run()
            self.ctx.charge(vendor.exit_cost)
        write = write or (is_private and vendor.forces_private_writes)
        retries = 0
        while True:
            r = self.kvm_mmu_page_fault(vcpu, gfn, is_private, write, exec, prefetch)
            if (
                r.ret == Ret.RETRY
                and is_private
                and vendor.retries_private_faults
                and not prefetch
                and self.ctx.bug is None
                and retries < vendor.max_local_retries
            ):
                retries += 1  # tdx_handle_ept_violation's local retry
                self.ctx.count("tdx_local_retries")
                continue
            if is_private and not prefetch:
                vendor.after_private_fault(r.ret, gfn, self.slots.gfn_to_memslot(gfn))
            return dataclasses.replace(
                r, retries=retries, modeled_ns=self.ctx.ledger.clock - start_ns
            )

    def kvm_mmu_page_fault(
        self, vcpu: int, gfn: int, is_private: bool, write: bool, exec: bool, prefetch: bool
    ) -> ReferenceFault:
        """``kvm_mmu_do_page_fault`` + ``kvm_tdp_mmu_page_fault`` + ``kvm_tdp_mmu_map``.

        ``fault_handling_ns`` is charged once per exit that KVM handles (an MMIO-cache hit, or
        a fault the fast path could not fix), once per leaf a prefetch installs; a fault the
        fast path answered costs ``fast_fix_ns`` instead (and no ``fault_map_ns``).
        """
        tdp_mmu = self.tdp_mmu
        tdp_mmu.kvm_mmu_load(vcpu)
        mirror = tdp_mmu.has_mirror and is_private
        root = tdp_mmu.vcpu_mirror_root[vcpu] if mirror else tdp_mmu.vcpu_root[vcpu]
        assert root is not None
        gfn_bits = tdp_mmu.root_gfn_bits(mirror)
        slot = self.slots.gfn_to_memslot(gfn)
        fault = KvmPageFault(
            gfn=gfn, write=write, exec=exec, prefetch=prefetch, slot=slot, private=is_private
        )

        def done(ret: Any, level: int, spte: int) -> ReferenceFault:
            return ReferenceFault(Ret(int(ret)), level, 0, 0.0, spte, gfn, is_private)

        # MMIO cache: a current-generation MMIO SPTE is handled without a page fault.
        if slot is None and not prefetch and not is_private:
            level, spte = tdp_mmu.lookup(root, gfn, gfn_bits)
            if (
                level == PG_LEVEL_4K
                and is_mmio_spte(spte)
                and mmio_spte_generation(spte) == (self.slots.generation & MMIO_SPTE_GEN_MASK)
            ):
                self.ctx.charge("fault_handling_ns")
                return done(Ret.EMULATE, PG_LEVEL_4K, spte)
        if not prefetch:
            self.ctx.count("pf_taken")
            # fast_page_fault: a write to a present shared leaf, fixed without mmu_lock; with
            # A/D off also any fault on a leaf the CPU sees as not present, which may be
            # access-tracked (page_fault_can_be_fast).
            can_be_fast = write or not tdp_mmu.ad_bits
            if (
                can_be_fast
                and not is_private
                and not (self.confidential and self.attrs.is_private(gfn))
            ):
                ret = self.fast_page_fault(root, fault, gfn_bits)
                if ret is not None:
                    return done(ret, fault.level, fault.spte)
            self.ctx.charge("fault_handling_ns")  # per slow-path exit; a prefetch per leaf
        # kvm_mmu_faultin_pfn: the access must match the attribute, and private memory must
        # come from guest_memfd; otherwise userspace gets KVM_EXIT_MEMORY_FAULT.
        mismatch = self.confidential and is_private != self.attrs.is_private(gfn)
        no_gmem = is_private and (slot is None or not slot.gmem)
        if mismatch or no_gmem:
            if not prefetch:
                self.ctx.count("pf_memory_fault")
            level, spte = tdp_mmu.lookup(root, gfn, gfn_bits)
            return done(Ret.MEMORY_FAULT, level, spte)

        # A pre-fault (KVM_PRE_FAULT_MEMORY) is a read: it maps read-only where a write cannot.
        if slot is not None and slot.readonly and write and not prefetch and not is_private:
            # A write to a read-only memslot: KVM_PFN_ERR_RO_FAULT, emulated (userspace MMIO).
            if not prefetch:
                self.ctx.count("pf_emulate")
            level, spte = tdp_mmu.lookup(root, gfn, gfn_bits)
            return done(Ret.EMULATE, level, spte)
        if (
            slot is not None
            and write
            and not prefetch
            and not is_private
            and slot.host_readonly(gfn)
        ):
            # A write to a shared page the host mapped read-only (mprotect): the host page
            # cannot be had writable (KVM_PFN_ERR_FAULT), so KVM fills a memory-fault exit and
            # KVM_RUN returns -EFAULT; nothing is mapped.
            if not prefetch:
                self.ctx.count("pf_memory_fault")
            level, spte = tdp_mmu.lookup(root, gfn, gfn_bits)
            return done(Ret.MEMORY_FAULT, level, spte)
        if slot is not None:
            # A read of a page the host mapped read-only maps it without W and host-writable,
            # so a later write faults again (and fails above).
            fault.map_writable = not slot.readonly and (is_private or not slot.host_readonly(gfn))
            fault.write_tracked = not is_private and slot.write_tracked(gfn)
            self.kvm_mmu_faultin_pfn(fault)
            # A write-tracked page disallows a huge mapping over it (disallow_lpage).
            while fault.max_level > PG_LEVEL_4K and slot.write_track is not None:
                base = gfn_round_for_level(gfn, fault.max_level)
                if not slot.any_write_tracked(base, base + pages_per_hpage(fault.max_level)):
                    break
                fault.max_level -= 1
            if self.confidential:
                # KVM_LPAGE_MIXED_FLAG: a huge mapping needs one attribute over its range.
                while fault.max_level > PG_LEVEL_4K:
                    base = gfn_round_for_level(gfn, fault.max_level)
                    span = pages_per_hpage(fault.max_level)
                    if self.attrs.uniform(base, base + span) == is_private:
                        break
                    fault.max_level -= 1
        else:
            fault.max_level = PG_LEVEL_4K  # MMIO faults map at 4K
        self.kvm_mmu_hugepage_adjust(fault)
        self.ctx.op_private = is_private
        if not prefetch:
            self.ctx.charge("fault_map_ns")  # KVM's work under mmu_lock
        try:
            ret = tdp_mmu.kvm_tdp_mmu_map(root, fault, gfn_bits)
        finally:
            self.ctx.op_private = False
        if prefetch and ret == Ret.FIXED:
            self.ctx.charge("fault_handling_ns")
        # make_spte: a writable SPTE in a slot that logs dirty pages marks the page dirty.
        if (
            ret == Ret.FIXED
            and fault.spte & SPTE_WRITABLE
            and slot is not None
            and slot.dirty is not None
        ):
            slot.mark_dirty(gfn)
            self.ctx.count("dirty_pages_logged")
        if not prefetch:
            counter = _RET_COUNTER.get(ret)
            if counter:
                self.ctx.count(counter)
        return done(ret, fault.level, fault.spte)

    def kvm_mmu_faultin_pfn(self, fault: KvmPageFault) -> None:
        """Look up the backing page (the first touch allocates and zeroes it).

        Shared pages come from the host mapping, private ones from guest_memfd, whose folio
        size (and the vendor: TDX maps 4K only, SNP no larger than the RMP entry that
        ``sev_gmem_prepare`` made) caps the level.
        """
        slot = fault.slot
        assert slot is not None
        backing_page = (fault.gfn - slot.gfn) // slot.backing_pages
        touched = slot.gmem_touched if fault.private else slot.touched
        if (slot.gmem or not fault.private) and backing_page not in touched:
            touched.add(backing_page)
            self.ctx.count("host_pages_allocated")
            self.ctx.ledger.host_page(slot.backing_pages)
        if not fault.private:
            # Dirty logging tracks 4K pages: no huge mapping in a logged slot.
            fault.max_level = PG_LEVEL_4K if slot.dirty is not None else slot.max_level
            return
        self.vendor.gmem_prepare(slot, fault.gfn)
        fault.max_level = self.vendor.private_max_mapping_level(
            slot, fault.gfn, min(slot.max_level, self.folio_level)
        )

    def fast_page_fault(self, root: MmuPage, fault: KvmPageFault, gfn_bits: int) -> Any:
        """``fast_page_fault`` on the direct root: no ``mmu_lock``, no pfn lookup.

        The leaf mapping ``fault.gfn`` must be present.  If it already allows the access the
        fault is spurious, and the write goes through after re-entry: on a 4K leaf whose D
        is clear (PML armed it) the CPU sets D and A, and a PML log marks the page
        (``pml_logged``); the fault reports the leaf as it found it.  If it is MMU-writable
        (write-protected only for dirty logging) and not a huge page of a slot that logs
        dirty pages (which must be split), one cmpxchg restores W (with D and A) and the page
        is marked dirty in the slot's log.  Returns the ``Ret``, or None when the slow path
        must decide.  (KVM retries a lost cmpxchg up to 4
        times; the sequential model never loses one.)

        The fix must make the access allowed (KVM's re-check ``is_access_allowed(fault,
        new_spte)``): restoring W does not give X, so a write that is also an instruction fetch,
        on a leaf without X (an NX huge page), goes to the slow path, which splits it.

        With A/D bits off (``ad_bits=False``) any fault may come here (a read or fetch only if
        the CPU saw no translation: an access-tracked leaf has no RWX).  An access-tracked
        leaf gets its saved R and X back in the cmpxchg, and W too for a write to an
        MMU-writable leaf; a write the restored leaf does not allow (not MMU-writable, e.g.
        write-tracked) goes to the slow path.  A/D bits are neither set nor needed.
        """
        slot = fault.slot
        leaf = self.tdp_mmu.leaf_ptr(root, fault.gfn, gfn_bits)
        if leaf is None:
            return None
        level, sp, index = leaf
        spte = sp.spt[index]
        # page_fault_can_be_fast: a fault on a translation the CPU sees must be a write.
        if not fault.write and is_hw_present(spte):
            return None
        if not is_shadow_present_pte(spte) or not is_last_spte(spte, level):
            return None
        fault.level = level
        if is_access_allowed(spte, write=fault.write, exec=fault.exec):
            if (
                fault.write
                and spte_ad_enabled(spte)
                and not spte & SPTE_DIRTY
                and level == PG_LEVEL_4K
            ):
                sp.spt[index] = spte | SPTE_DIRTY | SPTE_ACCESSED  # the guest's write, by the CPU
                if slot is not None and slot.pml_log(fault.gfn):
                    self.ctx.count("pml_logged")
            fault.spte = spte
            self.ctx.charge("fast_fix_ns")
            self.ctx.count("pf_fast")
            self.ctx.count("pf_spurious")
            return Ret.SPURIOUS
        logged = slot is not None and slot.dirty is not None
        if spte_ad_enabled(spte):
            # Write-protected for page tracking (MMU-writable clear), or a huge page in a
            # logged slot (it must be split): the slow path decides.
            if not spte & SPTE_MMU_WRITABLE or (level > PG_LEVEL_4K and logged):
                return None
            new = spte | SPTE_WRITABLE | SPTE_DIRTY | SPTE_ACCESSED
        else:
            # A/D off: an access-tracked leaf gets R and X back; a write to an MMU-writable
            # leaf gets W (not on a huge page of a logged slot).
            new = restore_acc_track_spte(spte) if is_access_track_spte(spte) else spte
            if fault.write and spte & SPTE_MMU_WRITABLE:
                if level > PG_LEVEL_4K and logged:
                    return None
                new |= SPTE_WRITABLE
            if new == spte:
                return None
        if not is_access_allowed(new, write=fault.write, exec=fault.exec):
            return None  # could not fix the fault here
        sp.spt[index] = new  # the cmpxchg: same pfn, same presence, no bookkeeping
        fault.spte = new
        # fast_pf_fix_direct_spte: a leaf made writable marks the page dirty.
        if new & SPTE_WRITABLE and not spte & SPTE_WRITABLE and slot is not None and logged:
            slot.mark_dirty(fault.gfn)
            self.ctx.count("dirty_pages_logged")
        self.ctx.charge("fast_fix_ns")
        self.ctx.count("pf_fast")
        self.ctx.count("pf_fixed")
        return Ret.FIXED

    def kvm_mmu_hugepage_adjust(self, fault: KvmPageFault) -> None:
        """The level to map at: as large as allowed, unless NX huge pages forbid it."""
        fault.huge_page_disallowed = fault.exec and self.tdp_mmu.nx_huge_pages
        fault.req_level = fault.goal_level = PG_LEVEL_4K
        if fault.max_level == PG_LEVEL_4K or fault.slot is None:
            return
        fault.req_level = fault.max_level
        if not fault.huge_page_disallowed:
            fault.goal_level = fault.req_level
