"""The vendor interface: what the MMU and the VM ask of the VM type's vendor code.

Shaped like ``kvm_x86_ops`` and ``kvm_arch_gmem_*``: the exit cost, the private mapping
level, guest_memfd prepare/invalidate, what the guest does after a private fault (TDX
accept, SNP validate), the end of a leaf zap, populate, finalize and destroy.  The base class
is the plain VM (``default``, and ``sw_protected`` without a mirror): nothing to do.
"""

from __future__ import annotations

from typing import Any

from ..hooks import ExternalOps
from ..memslot import Memslot, Memslots
from ..spte import PG_LEVEL_1G
from ..stats import Ctx
from ..tdp_mmu import TdpMmu


class Vendor:
    """A VM without vendor-specific private memory handling."""

    #: the CostModel field of one exit and re-entry.
    exit_cost = "exit_entry_ns"
    #: TDX forces private faults to writes (private pages are always RWX in the S-EPT).
    forces_private_writes = False
    #: a private fault that returns RETRY is retried inside KVM (tdx_handle_ept_violation).
    retries_private_faults = False
    #: at most this many of them.
    max_local_retries = 0
    #: guest_memfd pages have RMP entries (SEV-SNP).
    has_rmp = False
    #: the largest level a private leaf of a mirror root may have (what check() audits).
    private_leaf_max_level = PG_LEVEL_1G

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx

    @property
    def external(self) -> ExternalOps | None:
        """The backend of the external page-table hooks, if the VM type has one."""
        return None

    @property
    def finalized(self) -> bool:
        """A TD was finalized (the SW mirror counts as finalized from the start)."""
        return False

    # -- checks before an operation (bad input leaves the VM unchanged) ---------------------
    def check_vcpu_can_run(self) -> None:
        """Before a vCPU faults: raises ConfigError if no vCPU can run yet."""

    def check_populate(self, private: bool) -> None:
        """Before a populate of memory that is ``private`` (or shared)."""

    # -- the fault path ----------------------------------------------------------------------
    def gmem_prepare(self, slot: Memslot, gfn: int) -> None:
        """``kvm_arch_gmem_prepare`` for the guest_memfd page behind ``gfn``."""

    def private_max_mapping_level(self, slot: Memslot, gfn: int, max_level: int) -> int:
        """The largest level a private mapping of ``gfn`` may have (at most ``max_level``)."""
        return max_level

    def after_private_fault(self, ret: Any, gfn: int, slot: Memslot | None) -> None:
        """What the guest does with a private page a vCPU fault just resolved."""

    def post_populate(self, gfn: int, private: bool, pfn: int) -> None:
        """After a populate installed the leaf for ``gfn``."""

    # -- zaps and guest_memfd ------------------------------------------------------------------
    def zap_end(self) -> None:
        """End of a leaf zap over all roots, before the TLB flush."""

    def gmem_invalidate(self, slots: Memslots, gfn: int, end: int) -> None:
        """``kvm_arch_gmem_invalidate``: the guest_memfd folios of ``[gfn, end)`` are freed."""

    # -- lifecycle -----------------------------------------------------------------------------
    def finalize(self) -> None:
        """KVM_TDX_FINALIZE_VM (TDX only; the VM checks the type)."""

    def terminate_vm(self) -> None:
        """The first step of teardown, before guest_memfd is released (TDX's
        KVM_TDX_TERMINATE_VM releases the HKID here); nothing on other VM types."""

    def vm_destroy(self, tdp_mmu: TdpMmu) -> None:
        """Teardown, after guest_memfd was released and before the roots are torn down."""
