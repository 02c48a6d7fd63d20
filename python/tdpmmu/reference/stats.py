"""Counters under KVM's names, the trace, and the accounting context every layer writes to."""

from __future__ import annotations

from typing import NamedTuple

from .cost import CostLedger
from .spte import PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K

#: SEAMCALL (and guest TDCALL) leaves, counted under these names.
SEAMCALL_LEAVES: tuple[str, ...] = (
    "TDH.MEM.SEPT.ADD",
    "TDH.MEM.PAGE.AUG",
    "TDH.MEM.PAGE.ADD",
    "TDH.MR.EXTEND",
    "TDH.MEM.RANGE.BLOCK",
    "TDH.MEM.TRACK",
    "TDH.MEM.PAGE.REMOVE",
    "TDH.MEM.PAGE.DEMOTE",
    "TDH.PHYMEM.PAGE.WBINVD",
    "TDH.PHYMEM.PAGE.RECLAIM",
    "TDH.MEM.SEPT.REMOVE",
    "TDH.VP.FLUSH",
    "TDH.MNG.VPFLUSHDONE",
    "TDH.PHYMEM.CACHE.WB",
    "TDH.MNG.KEY.FREEID",
    "TDG.MEM.PAGE.ACCEPT",
)

#: counters kept by the reference, with the meanings of docs/model.md: the engine's names, in
#: the engine's order (``tdpmmu._core.COUNTER_NAMES``).
COUNTER_NAMES: tuple[str, ...] = (
    "pf_taken",
    "pf_fixed",
    "pf_spurious",
    "pf_emulate",
    "pf_retry",
    "pf_write_protected",
    "pf_fast",
    "pf_memory_fault",
    "pf_mmio_spte_created",
    "pages_4k",
    "pages_2m",
    "pages_1g",
    "tdp_mmu_pages",
    "huge_page_splits",
    "remote_tlb_flush",
    "remote_tlb_flush_requests",
    "roots_allocated",
    "roots_freed",
    "host_pages_allocated",
    # external page-table hooks
    "link_external_spt",
    "set_external_spte",
    "remove_external_spte",
    "free_external_spt",
    "split_external_spt",
    "external_spt_leaked",
    # the TDX module
    *SEAMCALL_LEAVES,
    "seamcall_busy",
    "vcpu_kicks",
    "page_clear",
    "tdx_local_retries",
    "sept_tables",
    # SEV-SNP and guest_memfd
    "rmpupdate",
    "psmash",
    "pvalidate",
    "pvalidate_errors",
    "rmp_failures",
    "rmp_faults",
    "gmem_prepare",
    "gmem_invalidate",
    "conversions",
    "gmem_splits",
    # dirty logging, aging, eager split and huge-page recovery
    "sptes_write_protected",
    "dirty_pages_logged",
    "sptes_aged",
    "huge_pages_recovered",
    # NX huge page mitigation: tables on the recovery list, and those the recovery zapped
    "nx_lpage_splits",
    "nx_huge_pages_recovered",
    # PML: 4K pages the CPU logged, and the exits when a vCPU's 512-entry log filled (within
    # one access_batch, as the engine counts them)
    "pml_logged",
    "pml_full_exits",
)

#: the page-count counter of each leaf level.
PAGES_STAT = {PG_LEVEL_4K: "pages_4k", PG_LEVEL_2M: "pages_2m", PG_LEVEL_1G: "pages_1g"}


class TraceEvent(NamedTuple):
    """One traced step (the shape of ``tdpmmu.Event``)."""

    op: str
    gfn: int
    level: int
    detail: int


class Ctx:
    """What the running operation accounts to: counters, modeled time, trace, KVM_BUG_ON.

    The reference runs one operation at a time, so one context per VM holds the totals;
    ``bug`` and ``op_private`` belong to the operation in progress.
    """

    def __init__(self, ledger: CostLedger, trace: bool = False) -> None:
        self.stats: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)
        self.ledger = ledger
        self.events: list[TraceEvent] | None = [] if trace else None
        #: the first KVM_BUG_ON of the running operation.
        self.bug: str | None = None
        #: the operation acts for private memory (a private fault or a PRIVATE-filtered zap).
        self.op_private = False

    def count(self, name: str, delta: int = 1) -> None:
        """Add ``delta`` (default 1) to the counter ``name`` (a name of ``COUNTER_NAMES``)."""
        self.stats[name] += delta

    def charge(self, field: str, units: int = 1) -> None:
        """Charge ``units`` (default 1) of the cost ``field`` to the ledger (the modeled clock)."""
        self.ledger.charge(field, units)

    def trace(self, op: str, gfn: int, level: int, detail: int) -> None:
        """Record one ``TraceEvent(op, gfn, level, detail)`` if the VM traces (else nothing)."""
        if self.events is not None:
            self.events.append(TraceEvent(op, gfn, level, detail))

    def kvm_bug_on(self, msg: str) -> None:
        """A KVM_BUG_ON fired: the operation goes on, the VM is bugged when it ends."""
        if self.bug is None:
            self.bug = msg

    def page_stats(self, level: int, delta: int) -> None:
        """``kvm_update_page_stats``."""
        self.count(PAGES_STAT[level], delta)
