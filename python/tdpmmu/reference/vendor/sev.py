"""KVM's SEV-SNP side (svm/sev.c, as far as the MMU goes) over the RMP.

Two hook designs: ``gmem`` (upstream) keeps the RMP in step with guest_memfd — a page is made
private when guest_memfd prepares it and shared again when its folio is freed — and NPT
changes call nothing; ``private`` makes the RMP follow every private NPT change through the
external hooks (:class:`SnpPrivateHooks`).  After a private fault the guest PVALIDATEs the
page it was given.
"""

from __future__ import annotations

from typing import Any

from ..arena import MmuPage
from ..errors import Ret
from ..hooks import HOOK_EIO, HOOK_OK, ExternalOps
from ..memslot import Memslot, Memslots
from ..spte import PG_LEVEL_2M, SPTE_ENT_PER_PAGE, spte_to_pfn
from ..stats import Ctx
from .base import Vendor
from .rmp import RMP_SUCCESS, Rmp


class SnpPrivateHooks:
    """The ``private`` hook design on SNP: the RMP follows every private NPT change."""

    def __init__(self, ctx: Ctx, slots: Memslots) -> None:
        self.ctx = ctx
        self.slots = slots

    def link_external_spt(self, gfn: int, level: int, child: MmuPage) -> int:
        """Nothing to do on SNP: tables have no RMP state; returns ``HOOK_OK``."""
        return HOOK_OK

    def set_external_spte(self, gfn: int, level: int, new_spte: int) -> int:
        """RMPUPDATE the page of ``new_spte`` to private at ``gfn`` (2M when ``level`` is 2);
        ``HOOK_EIO`` and a KVM_BUG_ON on failure."""
        ctx = self.ctx
        found = self.slots.rmp_for_pfn(spte_to_pfn(new_spte))
        if found is None:
            ctx.kvm_bug_on(f"private NPT leaf for gfn {gfn:#x} is not guest_memfd memory")
            return HOOK_EIO
        rmp, off = found
        status = rmp.rmpupdate(ctx, off, gfn, True, level == PG_LEVEL_2M)
        if status != RMP_SUCCESS:
            ctx.kvm_bug_on(f"RMPUPDATE to private failed for gfn {gfn:#x}: {status}")
            return HOOK_EIO
        return HOOK_OK

    def remove_external_spte(self, gfn: int, level: int, old_spte: int) -> None:
        """RMPUPDATE the page of ``old_spte`` back to shared (2M when ``level`` is 2); a KVM_BUG_ON
        on failure."""
        ctx = self.ctx
        found = self.slots.rmp_for_pfn(spte_to_pfn(old_spte))
        if found is not None:
            rmp, off = found
            if rmp.rmpupdate(ctx, off, gfn, False, level == PG_LEVEL_2M) != RMP_SUCCESS:
                ctx.kvm_bug_on(f"RMPUPDATE to shared failed for gfn {gfn:#x}")

    def free_external_spt(self, gfn: int, level: int, sp: MmuPage) -> int:
        """Nothing to do on SNP; returns ``HOOK_OK``."""
        return HOOK_OK

    def split_external_spt(self, gfn: int, level: int, child: MmuPage) -> int:
        """SNP has no huge mirror leaves to split: a KVM_BUG_ON, ``HOOK_EIO``."""
        self.ctx.kvm_bug_on("split_external_spt: this backend has no huge private pages")
        return HOOK_EIO


class SevVendor(Vendor):
    """An SEV-SNP guest: guest_memfd pages have RMP entries; the hook design decides who
    keeps them."""

    has_rmp = True

    def __init__(self, ctx: Ctx, design: str, folio_level: int, slots: Memslots) -> None:
        super().__init__(ctx)
        self.design = design
        self.folio_level = folio_level
        self.hooks = SnpPrivateHooks(ctx, slots) if design == "private" else None

    @property
    def external(self) -> ExternalOps | None:
        """The external hooks' backend: ``SnpPrivateHooks`` under design "private", else None."""
        return self.hooks

    def gmem_prepare(self, slot: Memslot, gfn: int) -> None:
        """``kvm_gmem_get_pfn`` -> ``kvm_arch_gmem_prepare`` (``sev_gmem_prepare``)."""
        if slot.rmp is None or self.design != "gmem":
            return
        off = gfn - slot.gfn
        if not slot.rmp.get(off).assigned:
            self.ctx.count("gmem_prepare")
            status = self.sev_gmem_prepare(slot, off, gfn)
            if status != RMP_SUCCESS:
                self.ctx.kvm_bug_on(f"gmem prepare RMPUPDATE failed for {gfn:#x}: {status}")

    def private_max_mapping_level(self, slot: Memslot, gfn: int, max_level: int) -> int:
        """``sev_private_max_mapping_level``: no larger than the page's RMP entry."""
        if slot.rmp is None:
            return max_level
        return min(max_level, slot.rmp.level(gfn - slot.gfn))

    def after_private_fault(self, ret: Any, gfn: int, slot: Memslot | None) -> None:
        """After a private fault returned ``ret`` for ``gfn`` in ``slot``: the guest PVALIDATEs a
        page it was just given (FIXED only)."""
        if ret == Ret.FIXED and slot is not None:
            self.snp_guest_validate(slot, gfn)

    def gmem_invalidate(self, slots: Memslots, gfn: int, end: int) -> None:
        """``sev_gmem_invalidate`` (design ``gmem``): the freed folios become shared."""
        if self.design != "gmem":
            return
        for slot in slots.by_gfn():
            if slot.rmp is None or not (slot.gfn < end and gfn < slot.end):
                continue
            a = max(gfn, slot.gfn) - slot.gfn
            b = min(end, slot.end) - slot.gfn
            self.ctx.count("gmem_invalidate")
            self.sev_gmem_invalidate(slot.rmp, a, b)

    def sev_gmem_prepare(self, slot: Memslot, off: int, gfn: int) -> str:
        """Make a guest_memfd page private in the RMP: one 2M entry when the folio is 2M,
        lies wholly inside the slot with pfn and gpa both 2M aligned, and its whole 2M range is
        shared; else 4K."""
        rmp = slot.rmp
        assert rmp is not None
        if rmp.get(off).assigned:
            return RMP_SUCCESS
        head = off & ~511
        whole_2m_shared = (
            self.folio_level >= PG_LEVEL_2M
            and (gfn & 511) == (off & 511)
            and head + SPTE_ENT_PER_PAGE <= rmp.npages
            and not any(rmp.get(head + i).assigned for i in range(SPTE_ENT_PER_PAGE))
        )
        if whole_2m_shared:
            return rmp.rmpupdate(self.ctx, head, gfn & ~511, True, True)
        return rmp.rmpupdate(self.ctx, off, gfn, True, False)

    def sev_gmem_invalidate(self, rmp: Rmp, off: int, end: int) -> None:
        """Give ``[off, end)`` back to the host: 2M entries fully inside at once, partly
        covered ones PSMASHed first, then RMPUPDATE to shared page by page."""
        p = off
        while p < end:
            e = rmp.get(p)
            if not e.assigned:
                p += 1
                continue
            if e.size_2m:
                if p % 512 == 0 and p + 512 <= end:
                    rmp.rmpupdate(self.ctx, p, e.gfn, False, True)
                    p += 512
                    continue
                rmp.psmash(self.ctx, p)
            rmp.rmpupdate(self.ctx, p, rmp.get(p).gfn, False, False)
            p += 1

    def snp_guest_validate(self, slot: Memslot, gfn: int) -> None:
        """The SNP guest PVALIDATEs a page it was just given, unless it already is."""
        rmp = slot.rmp
        if rmp is None:
            return
        off = gfn - slot.gfn
        e = rmp.get(off)
        if not e.assigned or e.validated:
            return
        if e.size_2m:
            status = rmp.pvalidate(self.ctx, off & ~511, gfn & ~511, True, True)
        else:
            status = rmp.pvalidate(self.ctx, off, gfn, False, True)
        if status != RMP_SUCCESS:
            self.ctx.kvm_bug_on(f"guest PVALIDATE of gfn {gfn:#x} failed: {status}")

    def handle_rmp_fault(self, slot: Memslot, gfn: int) -> None:
        """``sev_handle_rmp_fault``: PSMASH the 2M RMP entry covering ``gfn`` (the caller
        then zaps the 512-page gfn range)."""
        self.ctx.count("rmp_faults")
        assert slot.rmp is not None
        off = gfn - slot.gfn
        e = slot.rmp.get(off)
        if e.size_2m and e.assigned:
            slot.rmp.psmash(self.ctx, off)
