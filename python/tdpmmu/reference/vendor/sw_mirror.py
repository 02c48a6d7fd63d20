"""The software mirror: ``sw_protected`` with ``mirror=True`` (the seed thread's "mirrored
page tables with a shared mask" for VMs without a TDX module).

Private memory lives in a mirror root reflected into an external tree, exactly as on TDX, but
the tree is kept in software: the same S-EPT model and the same KVM-side flow, runnable from
the start, with no SEAMCALL, kick or page clear counted or charged, and the exit of a normal
VM.
"""

from __future__ import annotations

from ..memslot import Memslot
from ..spte import PG_LEVEL_1G, PG_LEVEL_4K
from ..stats import Ctx
from .tdx import TdxOptions, TdxSeptHooks, TdxVendor
from .tdx_module import TdxModule


class SoftwareSept(TdxModule):
    """The external tree without a TDX module: every leaf succeeds or fails as the module's
    would, but costs nothing and counts nothing."""

    def __init__(self, ctx: Ctx, levels: int, measure: bool) -> None:
        super().__init__(ctx, levels, measure)
        self.finalized = True  # runnable from the start

    def _seamcall(self, leaf: str, cost: str, status: str) -> str:
        return status


class SwMirrorHooks(TdxSeptHooks):
    """tdx.c's hooks over the software tree: no page clears, no kicks to pay for."""

    def clear_page(self, pages: int = 1) -> None:
        """The software tree clears nothing (no MOVDIR64B to pay for)."""
        pass

    def kick_all_vcpus(self) -> None:
        """Every vCPU leaves the old TLB epoch, with no kick counted or charged."""
        self.module.vcpus_left_guest()


class SwMirrorVendor(TdxVendor):
    """A SW_PROTECTED VM with a mirror root."""

    exit_cost = "exit_entry_ns"
    forces_private_writes = False
    retries_private_faults = False

    def _new_module(self, ctx: Ctx, levels: int, opts: TdxOptions) -> TdxModule:
        return SoftwareSept(ctx, levels, measure=opts.measure)

    def _new_hooks(self, ctx: Ctx, module: TdxModule, opts: TdxOptions, vcpus: int) -> TdxSeptHooks:
        return SwMirrorHooks(ctx, module, opts, vcpus)

    #: the software tree's leaves are not audited by level (they are 4K anyway).
    private_leaf_max_level = PG_LEVEL_1G

    def private_max_mapping_level(self, slot: Memslot, gfn: int, max_level: int) -> int:
        """4K: the software tree maps private memory at 4K only, whatever the TDX options."""
        return PG_LEVEL_4K

    def terminate_vm(self) -> None:
        """No KVM_TDX_TERMINATE_VM without a TD: the teardown keeps KVM's upstream order."""
