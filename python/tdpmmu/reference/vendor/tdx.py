"""KVM's TDX side (vmx/tdx.c, as far as the MMU goes): the external hooks over the TDX
module, TLB tracking, the TD lifecycle, and the TDX options of docs/model.md.

Options: ``version`` 6.19 or 6.16 (6.16: before finalize ``set_external_spte`` only counts
``nr_premapped`` and populate issues TDH.MEM.PAGE.ADD itself), ``sept_free`` ``teardown``
(upstream) or ``sept_remove`` (pre-upstream), ``track`` ``per_page`` or ``batched``,
``interface`` ``four_hook`` or ``two_hook``, ``teardown`` ``remove`` (upstream) or
``terminate_vm`` (KVM_TDX_TERMINATE_VM: the HKID goes first, then each private page is
reclaimed), ``measure`` (TDH.MR.EXTEND x 16 per PAGE.ADD), ``huge_pages`` (the TDX huge-page
series: once the TD runs, private memory maps 2M where the folio and the attributes allow,
and a 2M leaf a zap covers only in part is split by BLOCK, TRACK, kick, TDH.MEM.PAGE.DEMOTE).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ... import config
from ..arena import MmuPage
from ..errors import ConfigError, Ret
from ..hooks import HOOK_EIO, HOOK_OK, ExternalOps
from ..memslot import Memslot
from ..spte import PG_LEVEL_2M, PG_LEVEL_4K, pages_per_hpage, spte_to_pfn
from ..stats import Ctx
from ..tdp_mmu import TdpMmu
from .base import Vendor
from .tdx_module import (
    SEPT_TABLE,
    TDX_EPT_ENTRY_STATE_INCORRECT,
    TDX_SUCCESS,
    TdxModule,
)


@dataclasses.dataclass(frozen=True)
class TdxOptions:
    """The ``tdx={...}`` options of docs/model.md; the keys and the values each one allows
    come from ``tdpmmu.config.TDX_OPTION_CHOICES`` (the engine's definition).  Busy injection
    (the ``TDH.*`` probabilities) is not modeled: only 0 is accepted."""

    version: str = "6.19"  # "6.16": set_external_spte only counts nr_premapped
    sept_free: str = "teardown"  # or "sept_remove" (pre-upstream)
    track: str = "per_page"  # or "batched"
    interface: str = "four_hook"  # or "two_hook"
    teardown: str = "remove"  # or "terminate_vm" (KVM_TDX_TERMINATE_VM)
    measure: bool = False  # TDH.MR.EXTEND x 16 per PAGE.ADD
    huge_pages: bool = False  # 2M private pages once the TD runs
    max_local_retries: int = 1000  # tdx_handle_ept_violation's retries of a private fault

    @property
    def v6_16(self) -> bool:
        """True when the KVM side follows the 6.16 populate flow (``version == "6.16"``)."""
        return self.version == "6.16"

    @classmethod
    def parse(cls, options: Mapping[str, Any] | None) -> TdxOptions:
        """Options from a ``tdx={...}`` mapping (``tdpmmu.config.TDX_OPTION_CHOICES``);
        ``ConfigError`` for an unknown key, a bad value, or a non-zero busy probability (not
        modeled here)."""
        choices = config.TDX_OPTION_CHOICES
        values: dict[str, Any] = {}
        for key, value in (options or {}).items():
            allowed = choices.get(key)
            if allowed is None:
                raise ConfigError(f"tdx: unknown option {key!r}; allowed: {', '.join(choices)}")
            text = ("true" if value else "false") if isinstance(value, bool) else str(value)
            if allowed == ("bool",):
                if text not in ("true", "True", "1", "false", "False", "0"):
                    raise ConfigError(f"tdx[{key!r}]: {text!r} is not a bool")
                values[key] = text in ("true", "True", "1")
            elif allowed == ("int",):
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ConfigError(f"tdx[{key!r}]: expected an integer, got {value!r}")
                if value != int(value) or not 0 <= value <= 1_000_000:
                    raise ConfigError(f"tdx[{key!r}]: expected an integer in 0..=1000000")
                values[key] = int(value)
            elif allowed == ("probability",):
                if float(text) != 0.0:
                    raise ConfigError(
                        f"tdx[{key!r}]: the reference model does not inject TDX_OPERAND_BUSY"
                    )
            elif text in allowed:
                values[key] = text
            else:
                raise ConfigError(
                    f"tdx[{key!r}]: {text!r} is not allowed; allowed: {', '.join(allowed)}"
                )
        return cls(**values)


class TdxSeptHooks:
    """tdx.c's implementation of the four external hooks on top of the TDX module.

    ``tdx_sept_link_private_spt`` -> SEPT.ADD; ``tdx_sept_set_private_spte`` -> PAGE.AUG
    (finalized; 2M with ``huge_pages``) or PAGE.ADD (initial image; v6.16 only counts
    ``nr_premapped``); ``tdx_sept_remove_private_spte`` -> BLOCK, TRACK, kick, REMOVE, then
    WBINVD and clear per 4K page (with ``track="batched"`` the TRACK/kick/REMOVE part waits for
    the end of the zap; once the HKID is released by ``teardown="terminate_vm"``, RECLAIM and
    clear instead); ``tdx_sept_free_private_spt`` -> RECLAIM + clear once the HKID is released,
    KVM_BUG_ON while it is assigned (``sept_free="sept_remove"``: BLOCK(parent), TRACK, kick,
    SEPT.REMOVE, WBINVD, clear instead); the huge-page series' ``tdx_sept_split_private_spt``
    -> BLOCK (2M), TRACK, kick, DEMOTE.
    """

    def __init__(self, ctx: Ctx, module: TdxModule, opts: TdxOptions, vcpus: int) -> None:
        self.ctx = ctx
        self.module = module
        self.opts = opts
        self.vcpus = vcpus
        #: track="batched": (gfn, level) of the pages blocked, awaiting the TRACK.
        self.pending_remove: list[tuple[int, int]] = []

    # -- kvm_x86_ops -----------------------------------------------------------------------
    def link_external_spt(self, gfn: int, level: int, child: MmuPage) -> int:
        """``link_external_spt`` -> ``tdx_sept_link_private_spt(gfn, level)`` (``child`` unused)."""
        return self.tdx_sept_link_private_spt(gfn, level)

    def set_external_spte(self, gfn: int, level: int, new_spte: int) -> int:
        """``set_external_spte`` -> ``tdx_sept_set_private_spte`` with the pfn of ``new_spte`` at
        (``gfn``, ``level``)."""
        return self.tdx_sept_set_private_spte(gfn, level, spte_to_pfn(new_spte))

    def remove_external_spte(self, gfn: int, level: int, old_spte: int) -> None:
        """``remove_external_spte`` -> ``tdx_sept_remove_private_spte(gfn, level)`` (``old_spte``
        unused)."""
        self.tdx_sept_remove_private_spte(gfn, level)

    def free_external_spt(self, gfn: int, level: int, sp: MmuPage) -> int:
        """``free_external_spt`` -> ``tdx_sept_free_private_spt(gfn, level)`` (``sp`` unused)."""
        return self.tdx_sept_free_private_spt(gfn, level)

    def split_external_spt(self, gfn: int, level: int, child: MmuPage) -> int:
        """``split_external_spt`` -> ``tdx_sept_split_private_spt(gfn, level)`` (``child``
        unused)."""
        return self.tdx_sept_split_private_spt(gfn, level)

    # -- tdx.c -----------------------------------------------------------------------------
    def tdx_sept_link_private_spt(self, gfn: int, level: int) -> int:
        """TDH.MEM.SEPT.ADD for (``gfn``, ``level``); ``HOOK_EIO`` and a KVM_BUG_ON on failure."""
        status = self.module.tdh_mem_sept_add(gfn, level)
        if status == TDX_SUCCESS:
            return HOOK_OK
        self.ctx.kvm_bug_on(f"TDH.MEM.SEPT.ADD failed for gfn {gfn:#x} level {level}: {status}")
        return HOOK_EIO

    def tdx_sept_set_private_spte(self, gfn: int, level: int, pfn: int) -> int:
        """Map ``pfn`` at ``gfn``: PAGE.AUG (finalized) or PAGE.ADD (initial image; v6.16 counts
        ``nr_premapped``); a ``level`` above 4K (2M with ``huge_pages``) is a KVM_BUG_ON."""
        if level > (PG_LEVEL_2M if self.opts.huge_pages else PG_LEVEL_4K):
            self.ctx.kvm_bug_on(f"private mapping at level {level}: beyond what TDX maps")
            return HOOK_EIO
        m = self.module
        if not m.finalized and self.opts.v6_16:
            m.nr_premapped += 1  # tdx_gmem_post_populate issues the PAGE.ADD
            return HOOK_OK
        if m.finalized:
            status, leaf = m.tdh_mem_page_aug(gfn, pfn, level), "TDH.MEM.PAGE.AUG"
        else:
            status, leaf = m.tdh_mem_page_add(gfn, pfn), "TDH.MEM.PAGE.ADD"
        if status == TDX_SUCCESS:
            return HOOK_OK
        self.ctx.kvm_bug_on(f"{leaf} failed for gfn {gfn:#x}: {status}")
        return HOOK_EIO

    def tdx_sept_remove_private_spte(self, gfn: int, level: int) -> None:
        """Remove the private page at (``gfn``, ``level``): BLOCK, TRACK, kick, REMOVE, then
        WBINVD and clear per 4K page (``track="batched"``: BLOCK now, the rest at the zap's
        end).  With the HKID released (``teardown="terminate_vm"``) the page is reclaimed
        instead (:meth:`tdx_reclaim_page`); otherwise that is a KVM_BUG_ON."""
        m = self.module
        if not m.hkid_assigned:
            if self.opts.teardown == "terminate_vm":
                self.tdx_reclaim_page(gfn)
            else:
                self.ctx.kvm_bug_on("remove_external_spte with the HKID released")
            return
        status = m.tdh_mem_range_block(gfn, level)
        if status != TDX_SUCCESS:
            if self.opts.v6_16 and not m.finalized and status == TDX_EPT_ENTRY_STATE_INCORRECT:
                m.nr_premapped -= 1  # premapped, never PAGE.ADDed: nothing in the module
                return
            self.ctx.kvm_bug_on(f"TDH.MEM.RANGE.BLOCK failed for gfn {gfn:#x}: {status}")
            return
        if self.opts.track == "batched":
            self.pending_remove.append((gfn, level))
            return
        self.tdx_track()
        self._remove_blocked_page(gfn, level)

    def _remove_blocked_page(self, gfn: int, level: int) -> bool:
        status, _pfn = self.module.tdh_mem_page_remove(gfn, level)
        if status != TDX_SUCCESS:
            self.ctx.kvm_bug_on(f"TDH.MEM.PAGE.REMOVE failed for gfn {gfn:#x}: {status}")
            return False
        self.tdx_clear_page(pages_per_hpage(level))
        return True

    def tdx_reclaim_page(self, gfn: int) -> None:
        """KVM_TDX_TERMINATE_VM's order: with the HKID released, TDH.PHYMEM.PAGE.RECLAIM of
        the private page (4K or 2M) mapping ``gfn``, then the clear of each 4K page (no
        BLOCK, TRACK or kick); a KVM_BUG_ON if the S-EPT maps no page there."""
        level = self.module.tdh_phymem_page_reclaim_leaf(gfn)
        if level is None:
            self.ctx.kvm_bug_on(f"reclaim: gfn {gfn:#x} has no private page in the S-EPT")
            return
        self.clear_page(pages_per_hpage(level))

    def tdx_clear_page(self, pages: int = 1) -> None:
        """PHYMEM.PAGE.WBINVD of each of ``pages`` 4K pages, then their MOVDIR64B clear."""
        for _ in range(pages):
            self.module.tdh_phymem_page_wbinvd()
        self.clear_page(pages)

    def clear_page(self, pages: int = 1) -> None:
        """The MOVDIR64B clear of ``pages`` 4K pages the TD gave back."""
        self.ctx.count("page_clear", pages)
        self.ctx.charge("page_clear_ns", pages)

    def tdx_track(self) -> None:
        """TDH.MEM.TRACK then kick every vCPU out of the guest (runnable TDs only)."""
        m = self.module
        if not m.finalized:
            return
        status = m.tdh_mem_track()
        if status != TDX_SUCCESS:
            self.ctx.kvm_bug_on(f"TDH.MEM.TRACK failed: {status}")
            return
        self.kick_all_vcpus()

    def kick_all_vcpus(self) -> None:
        """KVM_REQ_OUTSIDE_GUEST_MODE to every vCPU."""
        self.module.vcpus_left_guest()
        self.ctx.count("vcpu_kicks")
        self.ctx.ledger.kick(self.vcpus)

    def flush_batched(self) -> None:
        """End of a leaf zap with ``track="batched"``: one TRACK + kick, then REMOVE each."""
        if not self.pending_remove:
            return
        self.tdx_track()
        pending, self.pending_remove = self.pending_remove, []
        for gfn, level in pending:
            if not self._remove_blocked_page(gfn, level):
                return

    def tdx_sept_split_private_spt(self, gfn: int, level: int) -> int:
        """The huge-page series' split of the private 2M leaf at ``gfn`` (mmu_lock for write):
        BLOCK it, TRACK + kick, then TDH.MEM.PAGE.DEMOTE it into a new S-EPT table of 512
        MAPPED 4K leaves.  Any failure (or a ``level`` other than 2M, or ``huge_pages`` off)
        is a KVM_BUG_ON and ``HOOK_EIO``."""
        m = self.module
        if level != PG_LEVEL_2M or not self.opts.huge_pages:
            self.ctx.kvm_bug_on(f"split_external_spt at level {level} without a 2M private leaf")
            return HOOK_EIO
        status = m.tdh_mem_range_block(gfn, PG_LEVEL_2M)
        if status != TDX_SUCCESS:
            self.ctx.kvm_bug_on(f"TDH.MEM.RANGE.BLOCK (2M) failed for gfn {gfn:#x}: {status}")
            return HOOK_EIO
        self.tdx_track()
        status = m.tdh_mem_page_demote(gfn)
        if status != TDX_SUCCESS:
            self.ctx.kvm_bug_on(f"TDH.MEM.PAGE.DEMOTE failed for gfn {gfn:#x}: {status}")
            return HOOK_EIO
        return HOOK_OK

    def tdx_sept_free_private_spt(self, gfn: int, sp_level: int) -> int:
        """Free the S-EPT table of level ``sp_level`` covering ``gfn``: RECLAIM + clear after the
        HKID release; SEPT.REMOVE path or a KVM_BUG_ON before it."""
        m = self.module
        level = sp_level + 1  # the S-EPT entry linking this table sits one level up
        where = m.sept_table_entry(gfn, level)
        if isinstance(where, str):
            self.ctx.kvm_bug_on(f"free_external_spt: no S-EPT path to gfn {gfn:#x}: {where}")
            return HOOK_EIO
        table, i = where
        e = table[i]
        if e is None or e.state != SEPT_TABLE:
            self.ctx.kvm_bug_on(f"free_external_spt: gfn {gfn:#x} level {level} not a table")
            return HOOK_EIO
        if m.hkid_assigned:
            if self.opts.sept_free == "sept_remove":
                if m.tdh_mem_range_block(gfn, level) == TDX_SUCCESS:
                    self.tdx_track()
                    if m.tdh_mem_sept_remove(gfn, level) == TDX_SUCCESS:
                        self.tdx_clear_page()
                        return HOOK_OK
                self.ctx.kvm_bug_on(f"TDH.MEM.SEPT.REMOVE failed for gfn {gfn:#x}")
                return HOOK_EIO
            # Upstream never frees S-EPT tables of a live TD: the page is leaked on purpose.
            self.ctx.kvm_bug_on("free_external_spt while the HKID is assigned")
            self.ctx.count("external_spt_leaked")
            return HOOK_EIO
        m.tdh_phymem_page_reclaim(gfn, level)
        self.clear_page()
        return HOOK_OK


class TdxVendor(Vendor):
    """A TD: private memory in the mirror root, reflected into the TDX module's S-EPT."""

    exit_cost = "td_exit_entry_ns"
    forces_private_writes = True
    retries_private_faults = True

    def __init__(self, ctx: Ctx, levels: int, vcpus: int, opts: TdxOptions) -> None:
        super().__init__(ctx)
        self.opts = opts
        self.vcpus = vcpus
        self.max_local_retries = opts.max_local_retries
        self.module = self._new_module(ctx, levels, opts)
        self.hooks = self._new_hooks(ctx, self.module, opts, vcpus)

    def _new_module(self, ctx: Ctx, levels: int, opts: TdxOptions) -> TdxModule:
        return TdxModule(ctx, levels, measure=opts.measure)

    def _new_hooks(self, ctx: Ctx, module: TdxModule, opts: TdxOptions, vcpus: int) -> TdxSeptHooks:
        return TdxSeptHooks(ctx, module, opts, vcpus)

    @property
    def private_leaf_max_level(self) -> int:  # type: ignore[override]
        """A TD's private leaves are 4K, or with ``huge_pages`` up to 2M."""
        return PG_LEVEL_2M if self.opts.huge_pages else PG_LEVEL_4K

    @property
    def external(self) -> ExternalOps:
        """The backend of the external hooks: the ``TdxSeptHooks``."""
        return self.hooks

    @property
    def finalized(self) -> bool:
        """Whether KVM_TDX_FINALIZE_VM ran."""
        return self.module.finalized

    def check_vcpu_can_run(self) -> None:
        """``ConfigError`` naming ``vm`` while the TD is not finalized."""
        if not self.module.finalized:
            raise ConfigError(
                "vm: the TD is not finalized: no vCPU can run yet (use populate, then finalize)"
            )

    def check_populate(self, private: bool) -> None:
        """Before finalize only private pre-faults: ``ConfigError`` naming ``private`` when
        ``private`` is False."""
        if not self.module.finalized and not private:
            raise ConfigError(
                "private: before finalize only the private initial image can be populated"
            )

    def private_max_mapping_level(self, slot: Memslot, gfn: int, max_level: int) -> int:
        """4K; with ``huge_pages`` once the TD runs, up to 2M (``max_level``: the slot's
        backing and the guest_memfd folio); TDH.MEM.PAGE.ADD of the initial image is 4K
        only.  ``slot`` and ``gfn`` do not matter."""
        if self.opts.huge_pages and self.module.finalized:
            return min(max_level, PG_LEVEL_2M)
        return PG_LEVEL_4K

    def terminate_vm(self) -> None:
        """KVM_TDX_TERMINATE_VM (``teardown="terminate_vm"``): at the start of the teardown
        the HKID is released (``tdx_mmu_release_hkid``), so each private page is reclaimed
        rather than removed."""
        if self.opts.teardown == "terminate_vm":
            self.module.release_hkid(self.vcpus)

    def after_private_fault(self, ret: Any, gfn: int, slot: Memslot | None) -> None:
        """The TD guest accepts the page it faulted on (TDG.MEM.PAGE.ACCEPT)."""
        if ret in (Ret.FIXED, Ret.SPURIOUS):
            self.module.tdg_mem_page_accept(gfn)

    def post_populate(self, gfn: int, private: bool, pfn: int) -> None:
        """v6.16: the initial-image populate issues TDH.MEM.PAGE.ADD after the map
        (``tdx_gmem_post_populate``)."""
        m = self.module
        if not private or not self.opts.v6_16 or m.finalized:
            return
        status = m.tdh_mem_page_add(gfn, pfn)
        if status == TDX_SUCCESS:
            m.nr_premapped -= 1
        else:
            self.ctx.kvm_bug_on(f"TDH.MEM.PAGE.ADD failed for gfn {gfn:#x}: {status}")

    def zap_end(self) -> None:
        """End of a leaf zap: with ``track="batched"``, one TRACK + kick, then REMOVE each blocked
        page."""
        self.hooks.flush_batched()

    def finalize(self) -> None:
        """KVM_TDX_FINALIZE_VM (``ConfigError`` if already finalized or, v6.16, pages still
        premapped)."""
        self.module.finalize()

    def vm_destroy(self, tdp_mmu: TdpMmu) -> None:
        """``tdx_mmu_release_hkid``; with ``sept_free="sept_remove"`` the (then leaf-less)
        mirror tree is torn down first, while the HKID is assigned."""
        mirror = tdp_mmu.current_root(mirror=True)
        if self.opts.sept_free == "sept_remove" and mirror is not None:
            tdp_mmu.tdp_mmu_zap_root(mirror, shared=False)
        self.module.release_hkid(self.vcpus)
