"""``ReferenceVM``: the public operations of ``tdpmmu.VM`` over the reference's layers.

A constructor checks the arguments and builds the layers bottom up (the accounting context,
the arena, memslots and attributes, the vendor backend, the hook dispatch, the TDP MMU, the
fault path).  Every public method is one *operation*: tables freed during it become reusable
only when it returns (the model's RCU grace period, docs/model.md), and a KVM_BUG_ON that
fired during it marks the VM bugged when it returns (``VmBugged``; the counters of the
operation are kept).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .. import config
from ..errors import TdpmmuError
from .arena import Arena
from .attrs import PrivateRanges
from .check import check_live, check_teardown
from .cost import WAIT_FIELDS, CostLedger, costs_from
from .errors import ConfigError, Ret, VmBugged
from .gmem import free_folios, partly_converted_2m_folios
from .hooks import ExternalHooks
from .memslot import DirtyLog, Memslot, Memslots, backing_bytes, parse_size
from .mmu import Mmu, ReferenceFault
from .spte import (
    PAGE_SHIFT,
    PG_LEVEL_2M,
    PG_LEVEL_4K,
    SHADOW_NONPRESENT_VALUE,
    SPTE_ACCESSED,
    SPTE_DIRTY,
    gfn_round_for_level,
    pages_per_hpage,
    spte_ad_enabled,
    spte_to_pfn,
)
from .stats import Ctx, TraceEvent
from .tdp_mmu import KVM_VALID_ROOTS, TdpMmu, is_access_allowed
from .vendor.base import Vendor
from .vendor.sev import SevVendor
from .vendor.sw_mirror import SwMirrorVendor
from .vendor.tdx import TdxOptions, TdxVendor
from .vendor.tdx_module import TdxModule

#: every VM type, and the hook design each uses when ``hooks=None`` (upstream behaviour):
#: read from ``tdpmmu.config``, the engine's one definition of the VM-type x design matrix.
VM_TYPES: tuple[str, ...] = config.VM_TYPES
DEFAULT_HOOKS: dict[str, str] = {t: config.default_design(t) for t in config.VM_TYPES}
#: fault attempts of one ``access_batch`` access after which it is a livelock (the engine's).
MAX_ATTEMPTS_PER_ACCESS = 1 << 20


class ReferenceVM:
    """Pure-Python model of one VM, API-compatible with ``tdpmmu.VM``.

    Every public method is one "operation": tables freed during it become reusable only
    when it returns (the model's RCU grace period, docs/model.md), and a KVM_BUG_ON that
    fired during it marks the VM bugged when it returns (``VmBugged``; the counters of the
    operation are kept).
    """

    def __init__(
        self,
        vm_type: str = "default",
        memory: int | str = "1GiB",
        vcpus: int = 1,
        levels: int = 4,
        backing: int | str = "4K",
        hooks: Any = None,
        costs: Any = None,
        seed: int = 0,
        trace: bool = False,
        nx_huge_pages: bool = False,
        slot_zap_all: bool = True,
        *,
        tdx: Mapping[str, Any] | None = None,
        mirror: bool = False,
        folio: int | str = "4K",
        ad_bits: bool = True,
    ) -> None:
        if not isinstance(mirror, bool):
            raise TypeError(f"mirror: expected bool, got {mirror!r}")
        # The VM-type x hook-design matrix is the engine's (tdpmmu.config): which designs a
        # VM type takes, its default, whether it has a mirror root and takes TDX options.
        variant = config.variant(vm_type, mirror)
        if hooks is None:
            hooks = variant.default_design
        if not isinstance(hooks, str):
            raise ConfigError("hooks: the reference model takes a design name, not a hook object")
        if hooks not in variant.designs:
            raise ConfigError(
                f"hooks: {hooks!r} is not valid for a {variant.label} VM; "
                f"allowed: {', '.join(variant.designs)}"
            )
        if tdx and not variant.tdx_options:
            raise ConfigError(
                f"tdx: TDX options apply to tdx VMs (and sw_protected with mirror=True), "
                f"not {variant.label}"
            )
        if not isinstance(ad_bits, bool):
            raise TypeError(f"ad_bits: expected bool, got {ad_bits!r}")
        if not ad_bits and (vm_type == "snp" or variant.mirror_root):
            why = "NPT always has A/D" if vm_type == "snp" else "KVM refuses TDX without them"
            raise ConfigError(
                f"ad_bits: EPT A/D bits cannot be off on a {variant.label} VM ({why}); "
                "ad_bits=False applies to default and sw_protected VMs"
            )
        #: KVM's ``enable_ept_ad_bits`` (False: A/D-disabled SPTEs, aging by access tracking).
        self.ad_bits = ad_bits
        folio_bytes = parse_size(folio, "folio")
        if folio_bytes not in (4096, 2 << 20):
            raise ConfigError(f"folio: guest_memfd folio size must be 4K or 2M, got {folio!r}")
        if isinstance(vcpus, bool) or not isinstance(vcpus, int) or vcpus < 1:
            raise ConfigError(f"vcpus must be an int >= 1, got {vcpus!r}")
        if levels not in (4, 5):
            raise ConfigError(f"levels must be 4 or 5, got {levels!r}")
        backing_size = backing_bytes(backing)
        memory_bytes = parse_size(memory, "memory")
        if memory_bytes <= 0 or memory_bytes % backing_size:
            raise ConfigError(
                f"memory must be a positive multiple of the backing page size ({backing_size}),"
                f" got {memory!r}"
            )

        self.vm_type = vm_type
        self.memory = memory_bytes
        self.vcpus = vcpus
        self.levels = levels
        self.backing = backing_size
        self.seed = seed
        self.trace = trace
        self.nx_huge_pages = bool(nx_huge_pages)
        self.slot_zap_all = bool(slot_zap_all)
        #: which changes call the external hooks: "none", "mirror", "private" or "gmem".
        self.design = hooks
        self.tdx_options = TdxOptions.parse(tdx)
        self.folio_level = PG_LEVEL_2M if folio_bytes == 2 << 20 else PG_LEVEL_4K
        #: private memory, guest_memfd and memory attributes exist (all but "default").
        self.confidential = vm_type != "default"
        #: a mirror root for private memory (TDX, and the SW_PROTECTED mirror variant).
        self.has_mirror = variant.mirror_root
        shared_bit = 1 << (35 if levels == 4 else 39)
        #: ``kvm_gfn_direct_bits``: the direct root of a TD maps shared gfn g at g | bit.
        self.gfn_direct_bits = shared_bit if self.has_mirror else 0
        #: gfns are < max_gfn (48-bit GPA with 4 levels, 52-bit with 5; a TD's lower half).
        self.max_gfn = self.gfn_direct_bits or 1 << (36 if levels == 4 else 40)
        if memory_bytes >> PAGE_SHIFT > self.max_gfn:
            raise ConfigError(f"memory {memory!r} does not fit a {levels}-level guest")

        # The layers, bottom up.
        self.ctx = Ctx(CostLedger(costs_from(costs)), trace=bool(trace))
        #: CostModel field -> ns.
        self.costs = self.ctx.ledger.rates
        self.arena = Arena()
        self.slots = Memslots()
        self.attrs = PrivateRanges()
        self.vendor = self._new_vendor()
        self.hooks = ExternalHooks(
            self.ctx,
            hooks,
            self.vendor.external,
            two_hook=self.tdx_options.interface == "two_hook",
        )
        self.tdp_mmu = TdpMmu(
            arena=self.arena,
            ctx=self.ctx,
            hooks=self.hooks,
            slots=self.slots,
            levels=levels,
            vcpus=vcpus,
            has_mirror=self.has_mirror,
            gfn_direct_bits=self.gfn_direct_bits,
            max_gfn=self.max_gfn,
            nx_huge_pages=self.nx_huge_pages,
            ad_bits=self.ad_bits,
        )
        self.mmu = Mmu(
            ctx=self.ctx,
            tdp_mmu=self.tdp_mmu,
            slots=self.slots,
            attrs=self.attrs,
            vendor=self.vendor,
            confidential=self.confidential,
            folio_level=self.folio_level,
        )

        # The VM's state after a KVM_BUG_ON, and destruction.
        self._bug_msg: str | None = None
        self._destroyed = False
        #: set when a populate stopped because a KVM_BUG_ON made its pre-fault return RETRY.
        self.populate_stopped_on_bug = False
        #: prefetch faults the last populate made (for tests).
        self.last_populate_faults = 0

        # The default memslot comes with the VM: generation 0 is what a new VM reports.
        # A confidential guest's initial memory is guest_memfd, all private (as a VMM sets
        # up a TD or an SNP guest).
        self._add_memslot(0, memory_bytes >> PAGE_SHIFT, backing_size, gmem=self.confidential)
        self.slots.generation = 0
        if self.confidential:
            self.attrs.set(0, memory_bytes >> PAGE_SHIFT, True)

    def _new_vendor(self) -> Vendor:
        if self.vm_type == "tdx":
            return TdxVendor(self.ctx, self.levels, self.vcpus, self.tdx_options)
        if self.has_mirror:
            return SwMirrorVendor(self.ctx, self.levels, self.vcpus, self.tdx_options)
        if self.vm_type == "snp":
            return SevVendor(self.ctx, self.design, self.folio_level, self.slots)
        return Vendor(self.ctx)

    # ==================================================================================
    # Public API
    # ==================================================================================

    # -- properties that tdpmmu.VM also has ----------------------------------------------
    @property
    def shared_bit(self) -> int:
        """The shared bit as a gfn value on a VM with a mirror root, else 0 (``VM.shared_bit``)."""
        return self.gfn_direct_bits

    @property
    def bugged(self) -> bool:
        """True once a KVM_BUG_ON fired (``VM.bugged``)."""
        return self._bug_msg is not None

    @property
    def destroyed(self) -> bool:
        """True after ``destroy()`` (``VM.destroyed``)."""
        return self._destroyed

    @property
    def finalized(self) -> bool:
        """True once the TD is runnable (``VM.finalized``)."""
        return self.vendor.finalized

    @property
    def hooks_name(self) -> str:
        """The hook design in effect (``VM.hooks_name``)."""
        return self.design

    @property
    def memslot_generation(self) -> int:
        """KVM's memslot generation, +2 per memslot change (``VM.memslot_generation``)."""
        return self.slots.generation

    @property
    def stats(self) -> dict[str, int | float]:
        """Counters (KVM names, hook names, SEAMCALL leaves) and ``modeled_ns``."""
        return self.stats_dict()

    def cost_breakdown(self) -> dict[str, float]:
        """Modeled ns charged to each CostModel field (field order, zeros included), then each
        wait kind (always 0 here: waits come only from virtual-time runs); the values add up,
        in that order from 0.0, to exactly ``stats["modeled_ns"]``."""
        out = self.ctx.ledger.breakdown()
        out.update(dict.fromkeys(WAIT_FIELDS, 0.0))
        return out

    def stats_dict(self) -> dict[str, int | float]:
        """Counters, ``modeled_ns`` and page-table bytes as a new dict (``VM.stats_dict``)."""
        out: dict[str, int | float] = dict(self.ctx.stats)
        out["modeled_ns"] = self.ctx.ledger.ns
        out["page_table_bytes"] = len(self.arena.live) * 4096
        out["page_table_peak_bytes"] = self.arena.peak_live * 4096
        return out

    # -- faults --------------------------------------------------------------------------
    def fault(
        self,
        gfn: int,
        private: bool | None = None,
        write: bool = True,
        exec: bool = False,
        vcpu: int = 0,
    ) -> ReferenceFault:
        """One EPT violation (or misconfig) taken by ``vcpu`` on ``gfn``.

        ``private=None`` accesses the gfn as its memory attribute says.
        """
        self._ensure_alive()
        self._check_gfn(gfn, "gfn")
        self._check_vcpu(vcpu)
        self._check_private(private)
        self._begin_operation()
        try:
            result = self.mmu.page_fault(vcpu, gfn, private, bool(write), bool(exec), False)
        except ConfigError:
            self.arena.end_grace_period()
            raise
        self._end_of_operation()
        return result

    def fault_batch(
        self,
        gfns: Iterable[int],
        private: bool | None = None,
        write: bool = True,
        exec: bool = False,
        vcpu: int = 0,
    ) -> list[int]:
        """Fault every gfn in order on one vCPU; one operation.  Returns the Ret codes."""
        self._ensure_alive()
        self._check_vcpu(vcpu)
        self._check_private(private)
        gfn_list = [int(g) for g in gfns]
        for g in gfn_list:
            self._check_gfn(g, "gfns")
        self._begin_operation()
        rets: list[int] = []
        error: ConfigError | None = None
        for g in gfn_list:
            try:
                r = self.mmu.page_fault(vcpu, g, private, bool(write), bool(exec), False)
            except ConfigError as exc:
                error = exc
                break
            rets.append(int(r.ret))
            if self.ctx.bug is not None:
                break
        self._end_of_operation()
        if error is not None:
            raise error
        return rets

    def access_batch(
        self,
        gfns: Iterable[int],
        write: bool | Iterable[bool] | None = None,
        private: bool | None = None,
        vcpu: int = 0,
    ) -> dict[str, int | float]:
        """Guest accesses to ``gfns``, in order, on one vCPU (``VM.access_batch``); one
        operation.

        An access whose current mapping allows it is served by the hardware walk: no exit, no
        modeled time; the CPU sets the leaf's Accessed bit (and Dirty for a write), and with
        PML a write that sets a clear Dirty bit of a 4K leaf is logged (a full 512-entry log
        is an exit).  Any other access takes the fault path (``fault``) and faults again on
        RETRY.  ``write``: True (default, also for None), False, or one bool per gfn.
        Returns ``faults`` (RETRYs included), ``accesses`` and ``modeled_ns``.

        Refused before any access (``ConfigError``): ``vcpu`` out of range, the VM destroyed
        (``vm``), ``private`` True on a default VM, ``write`` of another length, a gfn of
        ``gfns`` beyond ``max_gfn``, and a TD that is not finalized (``vm``: KVM_RUN is refused
        before KVM_TDX_FINALIZE_VM, so no guest access happens at all)."""
        self._check_vcpu(vcpu)
        gfn_list = [int(g) for g in gfns]
        if write is None or isinstance(write, bool):
            writes = [True if write is None else write]
        else:
            writes = [bool(w) for w in write]
        self._ensure_alive()
        self._check_private(private)
        if len(writes) != 1 and len(writes) != len(gfn_list):
            raise ConfigError(
                f"write: has {len(writes)} entries for {len(gfn_list)} gfns; give one or one "
                "per gfn"
            )
        for i, g in enumerate(gfn_list):
            if not 0 <= g < self.max_gfn:
                raise ConfigError(
                    f"gfns: gfns[{i}] = {g:#x} is beyond the guest-physical limit; allowed "
                    f"0..{self.max_gfn:#x}"
                )
        self.vendor.check_vcpu_can_run()
        self._begin_operation()
        start = self.ctx.ledger.clock
        tdp = self.tdp_mmu
        faults = 0
        pml_entries = 0  # this vCPU's PML log: a full one (512 entries) is an exit
        for i, gfn in enumerate(gfn_list):
            is_write = writes[0 if len(writes) == 1 else i]
            is_private = (
                private
                if private is not None
                else (self.confidential and self.attrs.is_private(gfn))
            )
            mirror = self.has_mirror and is_private
            # An access of the other kind than the page's attribute never completes in
            # hardware (SNP's RMP check faults; KVM exits to userspace).
            may_hit = private is None or is_private == (
                self.confidential and self.attrs.is_private(gfn)
            )
            gfn_bits = tdp.root_gfn_bits(mirror)
            attempts = 0
            while True:
                root = tdp.vcpu_mirror_root[vcpu] if mirror else tdp.vcpu_root[vcpu]
                if may_hit and root is not None:
                    logged = self._hw_access(root, gfn, gfn_bits, is_write)
                    if logged is not None:
                        slot = self.slots.gfn_to_memslot(gfn)
                        if logged and slot is not None and slot.pml_log(gfn):
                            self.ctx.count("pml_logged")
                            pml_entries += 1
                            if pml_entries == 512:
                                pml_entries = 0
                                self.ctx.count("pml_full_exits")
                                self.ctx.charge(self.vendor.exit_cost)
                        break
                faults += 1
                r = self.mmu.page_fault(vcpu, gfn, private, is_write, False, False)
                if self.ctx.bug is not None or r.ret != Ret.RETRY:
                    break
                attempts += 1 + r.retries
                if attempts >= MAX_ATTEMPTS_PER_ACCESS:
                    self._end_of_operation()
                    raise TdpmmuError(
                        f"vCPU {vcpu}: the fault at gfn {gfn:#x} was retried {attempts} times "
                        "without progress"
                    )
            if self.ctx.bug is not None:
                break
        modeled_ns = self.ctx.ledger.clock - start
        self._end_of_operation()
        return {"faults": faults, "accesses": len(gfn_list), "modeled_ns": modeled_ns}

    def populate(self, gfn: int, npages: int, private: bool | None = None) -> int:
        """KVM_PRE_FAULT_MEMORY on vCPU 0 (a TD's initial image before finalize).

        Prefetch faults over ``[gfn, gfn+npages)``; each maps one leaf and the next one
        starts at the end of that leaf.  Returns the number of leaves installed.
        """
        self._ensure_alive()
        self._check_range(gfn, npages)
        self._check_private(private)
        if npages < 1:
            raise ValueError(f"npages must be >= 1, got {npages}")
        self._check_all_in_memslots(gfn, npages)
        end = gfn + npages
        if self.confidential:
            want = self.attrs.is_private(gfn) if private is None else private
            if self.attrs.uniform(gfn, end) != want:
                raise ConfigError(
                    f"private: the range's memory attributes are not all "
                    f"{'private' if want else 'shared'}"
                )
            cur = gfn
            while want and cur < end:
                slot = self.slots.gfn_to_memslot(cur)
                assert slot is not None  # covered: checked above
                if not slot.gmem:
                    raise ConfigError(
                        f"private: private memory needs guest_memfd; memslot {slot.id} holding "
                        f"gfn {cur:#x} has none"
                    )
                cur = slot.gfn + slot.npages
            self.vendor.check_populate(want)
        self._begin_operation()
        self.populate_stopped_on_bug = False
        installed = 0
        self.last_populate_faults = 0
        cur = gfn
        while cur < end:
            r = self.mmu.page_fault(0, cur, private, True, False, True)
            self.last_populate_faults += 1
            if r.ret == Ret.RETRY:
                if self.ctx.bug is not None:
                    # KVM's pre-fault loop stops when the VM is dead (a KVM_BUG_ON fired).
                    self.populate_stopped_on_bug = True
                    break
                continue  # pre-fault loops on RETRY
            if r.ret == Ret.FIXED:
                installed += 1
                self.vendor.post_populate(cur, r.private, spte_to_pfn(r.spte))
            if self.ctx.bug is not None:
                break
            # Continue after the page just mapped.
            cur = gfn_round_for_level(cur, r.level) + pages_per_hpage(r.level)
        self._end_of_operation()
        return installed

    # -- zaps ----------------------------------------------------------------------------
    def zap_gfn_range(self, gfn: int, npages: int) -> int:
        """``kvm_zap_gfn_range``: zap leaves in all valid roots; one range flush if needed."""
        self._check_range(gfn, npages)
        self._ensure_alive()
        self._begin_operation()
        zapped = self._zap_leafs(KVM_VALID_ROOTS, gfn, gfn + npages)  # + range flush
        self._end_of_operation()
        return zapped

    def mmu_notifier_invalidate(self, gfn: int, npages: int) -> int:
        """Host mm invalidation: ``kvm_tdp_mmu_unmap_gfn_range`` with the SHARED filter."""
        self._check_range(gfn, npages)
        self._ensure_alive()
        self._begin_operation()
        zapped = self._unmap_gfn_range(gfn, gfn + npages, private=False, shared=True)
        self._end_of_operation()
        return zapped

    # -- host mm operations on the memslots' shared mappings --------------------------------
    def madvise_dontneed(self, gfn: int, npages: int) -> int:
        """``madvise(MADV_DONTNEED)`` of the host memory behind ``[gfn, gfn+npages)``
        (``VM.madvise_dontneed``): the MMU notifier unmaps the range's shared SPTEs (as
        ``mmu_notifier_invalidate``) and the host frees the pages, so the next touch of each
        backing page wholly inside the range allocates and zeroes it again.  ``ConfigError``
        naming ``gfn``/``npages`` for a range outside the memslots, in a guest_memfd slot (its
        private pages go with ``punch_hole``) or not on each slot's backing-page boundary;
        the VM is unchanged.  Returns the leaves zapped."""
        self._check_count_range(gfn, npages)
        self._ensure_alive()
        end = gfn + npages
        self._check_host_range(gfn, end, shared_only=True)
        self._begin_operation()
        zapped = self._unmap_gfn_range(gfn, end, private=False, shared=True)
        for slot in self.slots.by_gfn():
            if slot.gfn < end and gfn < slot.end:
                slot.untouch(gfn, end)
        self._end_of_operation()
        return zapped

    def mprotect(self, gfn: int, npages: int, writable: bool) -> int:
        """``mprotect`` of the host mapping behind ``[gfn, gfn+npages)`` (``VM.mprotect``):
        the slots' backing pages there become read-only on the host (``writable`` False) or
        writable again, then the MMU notifier unmaps the range's shared SPTEs.  While
        read-only a shared write fault ends in KVM_EXIT_MEMORY_FAULT (``Ret.MEMORY_FAULT``,
        ``pf_memory_fault``) and a read maps the page without W, MMU- and host-writable;
        private accesses are not affected.  ``ConfigError`` naming ``gfn``/``npages`` for a
        range outside the memslots or not on each slot's backing-page boundary; the VM is
        unchanged.  Returns the leaves zapped."""
        self._check_count_range(gfn, npages)
        self._ensure_alive()
        end = gfn + npages
        self._check_host_range(gfn, end, shared_only=False)
        self._begin_operation()
        for slot in self.slots.by_gfn():
            if slot.gfn < end and gfn < slot.end:
                slot.set_host_writable(gfn, end, bool(writable))
        zapped = self._unmap_gfn_range(gfn, end, private=False, shared=True)
        self._end_of_operation()
        return zapped

    def zap_all_fast(self) -> None:
        """``kvm_mmu_zap_all_fast``: obsolete every direct root and tear it down."""
        self._ensure_alive()
        self._begin_operation()
        self.tdp_mmu.kvm_mmu_zap_all_fast()
        self._end_of_operation()

    # -- memslots ------------------------------------------------------------------------
    def add_memslot(
        self,
        gfn: int,
        npages: int,
        backing: int | str = 4096,
        gmem: bool = False,
        readonly: bool = False,
    ) -> int:
        """Create a memslot of ``npages`` 4 KiB pages at ``gfn`` with host pages of ``backing``
        (bytes or "4K"/"2M"/"1G") and, with ``gmem``, a guest_memfd; returns the slot id.
        ``readonly`` (KVM_MEM_READONLY): SPTEs of the slot are never writable and a guest
        write is emulated; KVM has none on VMs with protected state (tdx, snp) nor with
        ``gmem`` (``ConfigError`` naming ``readonly``).  Raises ``ValueError`` where
        ``VM.add_memslot`` raises ``ConfigError`` (a bad range, misalignment, overlap, ``gmem``
        on a default VM), ``TypeError`` for a non-int count."""
        if readonly and (gmem or self.vm_type in ("tdx", "snp")):
            raise ConfigError(
                "readonly: KVM_MEM_READONLY is not available on a VM with protected state "
                "(TDX, SNP) or with guest_memfd"
            )
        backing_size = backing_bytes(backing)
        if gmem and not self.confidential:
            raise ValueError("gmem: a default VM cannot have guest_memfd memslots")
        self._check_range(gfn, npages)
        self._ensure_alive()
        if npages < 1:
            raise ValueError(f"npages must be >= 1, got {npages}")
        step = backing_size >> PAGE_SHIFT
        if gfn % step or npages % step:
            raise ValueError(f"gfn and npages must be multiples of the backing page ({step} pages)")
        for slot in self.slots:
            if gfn < slot.end and slot.gfn < gfn + npages:
                raise ValueError(f"memslot [{gfn:#x}, {gfn + npages:#x}) overlaps slot {slot.id}")
        self._begin_operation()
        slot_id = self._add_memslot(gfn, npages, backing_size, gmem=bool(gmem))
        self.slots[slot_id].readonly = bool(readonly)
        self._end_of_operation()
        return slot_id

    def move_memslot(self, slot: int, new_gfn: int) -> None:
        """KVM_MR_MOVE: memslot ``slot`` now starts at ``new_gfn`` (the same host memory, flags,
        dirty log and write trackers).  The old range is flushed first as for a deletion (the
        fast zap on a default VM with ``slot_zap_all``, else the slot's leaves in every root,
        with one flush); the generation grows by 2.  ``ConfigError`` naming ``slot`` (unknown,
        or with guest_memfd: KVM refuses to move it) or ``new_gfn`` (not a multiple of the
        backing page, past ``max_gfn``, overlapping another slot); the VM is unchanged."""
        slot_id = self._check_slot_id(slot)
        if not 0 <= slot_id < 1 << 32:
            raise ConfigError(f"slot: must be in 0..{1 << 32} (exclusive), got {slot_id}")
        self._check_gfn(new_gfn, "new_gfn")
        self._ensure_alive()
        memslot = self._memslot(slot_id)
        if memslot.gmem:
            raise ConfigError(
                f"slot: memslot {slot_id} has guest_memfd: KVM refuses KVM_MR_MOVE for it"
            )
        if new_gfn % memslot.backing_pages:
            raise ConfigError(
                f"new_gfn: must be a multiple of the backing page ({memslot.backing_pages} "
                f"pages), got {new_gfn:#x}"
            )
        if new_gfn + memslot.npages > self.max_gfn:
            raise ConfigError(
                f"new_gfn: the moved slot would end past the guest's gfn limit {self.max_gfn:#x}"
            )
        for other in self.slots:
            if other.id != slot_id and new_gfn < other.end and other.gfn < new_gfn + memslot.npages:
                raise ConfigError(f"new_gfn: the moved slot would overlap memslot {other.id}")
        self._begin_operation()
        self._kvm_arch_flush_shadow_memslot(memslot)
        self.slots.move(slot_id, new_gfn)
        self._end_of_operation()

    def delete_memslot(self, slot: int) -> None:
        """Delete memslot ``slot`` with KVM's zap (``VM.delete_memslot``); ``ValueError`` for an
        unknown id."""
        self._ensure_alive()
        if slot not in self.slots:
            raise ValueError(f"slot: no memslot with id {slot!r}")
        self._begin_operation()
        self._kvm_arch_flush_shadow_memslot(self.slots[slot])
        self.slots.delete(slot)  # the host pages (and the RMP entries) go with it
        self._end_of_operation()

    def memslots(self) -> list[tuple[int, int, int, int, bool, int]]:
        """``(id, gfn, npages, backing bytes, gmem, host_pfn)`` per slot, by gfn."""
        return [s.as_tuple() for s in self.slots.by_gfn()]

    # -- dirty logging, aging, splitting (spec §7) ---------------------------------------
    def set_dirty_logging(
        self,
        slot: int,
        enabled: bool,
        manual_protect: bool = False,
        initially_set: bool = False,
        eager_split: bool = True,
        pml: bool = False,
    ) -> int:
        """Toggle ``KVM_MEM_LOG_DIRTY_PAGES`` on memslot ``slot`` (``kvm_mmu_slot_apply_flags``).

        Enabling allocates the dirty bitmap (all set with ``initially_set``) and, unless
        ``manual_protect`` and ``initially_set`` are both given, splits the slot's huge pages
        to 4K (``eager_split``) and write-protects every leaf of the slot (with ``pml``, the
        host logs with PML: 4K leaves are armed by clearing D instead, huge ones still lose
        W); disabling frees the bitmap and recovers huge mappings
        (:meth:`recover_huge_pages`' walk).  Either way the memslot generation moves on by 2
        and one remote TLB flush follows if an SPTE changed.  Doing what is already the state
        returns 0.  Returns the SPTEs changed (write-protected or D-cleared, or made huge
        again).  ``ConfigError`` for ``initially_set`` without ``manual_protect``, an unknown
        slot, a guest_memfd slot (KVM refuses dirty logging of private memory), ``pml`` on a
        VM with ``ad_bits=False`` (PML needs EPT A/D) or, when enabling, a read-only slot.
        The bitmap's bytes count against the engine's budget while logging; the reference
        keeps no budget.
        """
        slot_id = self._check_slot_id(slot)
        self._ensure_alive()
        if initially_set and not manual_protect:
            raise ConfigError(
                "initially_set: KVM_DIRTY_LOG_INITIALLY_SET needs manual_protect=True "
                "(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)"
            )
        if enabled and pml and not self.ad_bits:
            raise ConfigError(
                "pml: PML needs EPT A/D bits (KVM turns enable_pml off when enable_ept_ad_bits "
                "is off); this VM has ad_bits=False, so dirty logging write-protects"
            )
        memslot = self._memslot(slot_id)
        if memslot.gmem:
            raise ConfigError(
                f"slot: memslot {slot_id} has guest_memfd: KVM refuses KVM_MEM_LOG_DIRTY_PAGES "
                "on guest_memfd slots (private memory cannot be dirty-logged)"
            )
        if enabled and memslot.readonly:
            raise ConfigError(f"slot: memslot {slot_id} is read-only: KVM refuses dirty logging")
        enabled = bool(enabled)
        if (memslot.dirty is not None) == enabled:
            return 0
        self._begin_operation()
        tdp_mmu = self.tdp_mmu
        start, end = memslot.gfn, memslot.end
        changed = 0
        if enabled:
            memslot.dirty = DirtyLog.new(
                memslot.npages,
                bool(manual_protect),
                bool(initially_set),
                bool(eager_split),
                bool(pml),
            )
            self.slots.generation += 2
            if not (manual_protect and initially_set):
                if eager_split:
                    tdp_mmu.kvm_tdp_mmu_try_split_huge_pages(start, end, PG_LEVEL_4K)
                if pml:
                    # PML: 4K leaves are armed by clearing D; huge ones still lose W.
                    changed = tdp_mmu.kvm_tdp_mmu_clear_dirty_slot(start, end)
                    changed += tdp_mmu.wrprot_gfn_range(start, end, PG_LEVEL_2M)
                else:
                    changed = tdp_mmu.wrprot_gfn_range(start, end, PG_LEVEL_4K)
        else:
            memslot.dirty = None
            self.slots.generation += 2
            changed = tdp_mmu.kvm_tdp_mmu_recover_huge_pages(
                start, end, lambda g, level: self._may_map_huge(g, level, memslot)
            )
        if changed:
            tdp_mmu.kvm_flush_remote_tlbs()
        self._end_of_operation()
        return changed

    def get_dirty_log(self, slot: int) -> list[int]:
        """``KVM_GET_DIRTY_LOG`` for memslot ``slot`` (``kvm_get_dirty_log_protect``).

        Returns the bitmap as 64-bit words in KVM's layout (bit ``i`` of word ``w`` is page
        ``64 * w + i`` of the slot), as a list of ints where ``VM.get_dirty_log`` returns a
        numpy ``uint64`` array.  Without manual protection each word's bits are taken (the
        word cleared) and those pages write-protected again, or with PML their D cleared
        (:meth:`TdpMmu.kvm_tdp_mmu_clear_dirty_pt_masked`), with one flush if any SPTE
        changed; with it the bitmap is only copied.  ``ConfigError`` for an unknown slot or
        one that does not log dirty pages.
        """
        slot_id = self._check_slot_id(slot)
        self._ensure_alive()
        memslot = self._logging_memslot(slot_id)
        log = memslot.dirty
        assert log is not None
        self._begin_operation()
        out: list[int] = []
        changed = 0
        for w, word in enumerate(log.bits):
            if log.manual_protect:
                out.append(word)
                continue
            log.bits[w] = 0
            out.append(word)
            if word:
                changed += self.tdp_mmu.kvm_tdp_mmu_clear_dirty_pt_masked(
                    memslot.gfn + 64 * w, word, wrprot=not log.pml
                )
        if changed:
            self.tdp_mmu.kvm_flush_remote_tlbs()
        self._end_of_operation()
        return out

    def clear_dirty_log(self, slot: int, first_page: int, npages: int) -> int:
        """``KVM_CLEAR_DIRTY_LOG`` for memslot ``slot`` (``kvm_clear_dirty_log_protect``).

        Needs ``manual_protect``.  Clears the bits of pages ``[first_page, first_page +
        npages)`` of the slot, 64 at a time, and write-protects the pages that were set (with
        PML: clears their D); with ``initially_set``, the huge pages over each word's cleared
        pages are first split (``eager_split``, from its first to its last cleared page) or,
        those over its first and its last cleared page, write-protected at 2M and above
        (``kvm_arch_mmu_enable_log_dirty_pt_masked``).  ``first_page`` must
        be a multiple of 64 below the slot's size, ``npages`` >= 1 within the slot and a
        multiple of 64 unless the range reaches the slot's end (KVM's rule; ``ConfigError``
        otherwise, the VM unchanged).  Returns the SPTEs write-protected; one flush if any.
        """
        slot_id = self._check_slot_id(slot)
        for name, value in (("first_page", first_page), ("npages", npages)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 0:
                raise ConfigError(f"{name}: must be >= 0, got {value}")
        self._ensure_alive()
        memslot = self._logging_memslot(slot_id)
        log = memslot.dirty
        assert log is not None
        if not log.manual_protect:
            raise ConfigError(
                "slot: KVM_CLEAR_DIRTY_LOG needs manual_protect=True "
                "(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)"
            )
        size = memslot.npages
        if first_page % 64 or first_page >= size:
            raise ConfigError(
                f"first_page: must be a multiple of 64 below {size}, got {first_page}"
            )
        reaches_end = first_page + npages == size
        if npages == 0 or first_page + npages > size or (npages % 64 and not reaches_end):
            raise ConfigError(
                "npages: must be > 0, a multiple of 64 unless the range reaches the slot's end "
                f"({size} pages), and within the slot; got {npages}"
            )
        self._begin_operation()
        tdp_mmu = self.tdp_mmu
        changed = 0
        last = first_page + npages
        p = first_page
        while p < last:
            n = min(last - p, 64)
            window = (1 << n) - 1
            mask = log.bits[p // 64] & window
            log.bits[p // 64] &= ~window
            if mask:
                g = memslot.gfn + p
                if log.initially_set:
                    # The huge pages over the first and the last cleared page: split (all
                    # from the first to the last), or write-protect at 2M and above.
                    lo = g + (mask & -mask).bit_length() - 1
                    hi = g + mask.bit_length()
                    if log.eager_split:
                        tdp_mmu.kvm_tdp_mmu_try_split_huge_pages(lo, hi, PG_LEVEL_4K)
                    else:
                        changed += tdp_mmu.wrprot_gfn_range(lo, lo + 1, PG_LEVEL_2M)
                        changed += tdp_mmu.wrprot_gfn_range(hi - 1, hi, PG_LEVEL_2M)
                changed += tdp_mmu.kvm_tdp_mmu_clear_dirty_pt_masked(g, mask, wrprot=not log.pml)
            p += n
        if changed:
            tdp_mmu.kvm_flush_remote_tlbs()
        self._end_of_operation()
        return changed

    def age_gfn_range(self, gfn: int, npages: int) -> bool:
        """The MMU notifier's clear_young (``kvm_tdp_mmu_age_gfn_range``): age every young leaf
        of the direct roots in ``[gfn, gfn + npages)`` (clear A; with ``ad_bits=False`` mark it
        for access tracking); whether any was young.  No bookkeeping, no flush (lockless in
        KVM).  ``npages`` >= 1."""
        self._check_count_range(gfn, npages)
        self._ensure_alive()
        self._begin_operation()
        young = self.tdp_mmu.kvm_tdp_mmu_age_gfn_range(gfn, gfn + npages)
        self._end_of_operation()
        return young

    def test_age_gfn(self, gfn: int, npages: int | None = None) -> bool:
        """The MMU notifier's test_young (``kvm_tdp_mmu_test_age_gfn``): whether a leaf of the
        direct roots in ``[gfn, gfn + npages)`` (default 1 page) is young (A set; with
        ``ad_bits=False``, not access-tracked).
        Changes nothing."""
        npages = 1 if npages is None else npages
        self._check_count_range(gfn, npages)
        self._ensure_alive()
        return self.tdp_mmu.kvm_tdp_mmu_test_age_gfn(gfn, gfn + npages)

    def split_huge_pages(self, gfn: int, npages: int, target_level: int) -> int:
        """Eager huge-page splitting (``kvm_tdp_mmu_try_split_huge_pages``) of ``[gfn, gfn +
        npages)`` in the direct roots down to ``target_level`` (1 = 4K, 2 = 2M; else
        ``ConfigError``), under ``mmu_lock`` for read; no flush.  Returns the huge pages
        split."""
        self._check_count_range(gfn, npages)
        if isinstance(target_level, bool) or not isinstance(target_level, int):
            raise TypeError(f"target_level must be an int, got {type(target_level).__name__}")
        self._ensure_alive()
        if target_level not in (PG_LEVEL_4K, PG_LEVEL_2M):
            raise ConfigError(f"target_level: must be 1 (4K) or 2 (2M), got {target_level}")
        self._begin_operation()
        splits = self.tdp_mmu.kvm_tdp_mmu_try_split_huge_pages(gfn, gfn + npages, target_level)
        self._end_of_operation()
        return splits

    def recover_huge_pages(self, slot: int) -> int:
        """``kvm_mmu_recover_huge_pages`` for memslot ``slot`` (mmu_lock for read).

        Each table at 2M or 1G wholly inside the slot whose range may be mapped at that size
        (:meth:`_may_map_huge`: the backing allows it, no page of it is write-tracked and, on
        a confidential VM, it is all shared) becomes one huge leaf again
        (:meth:`TdpMmu.kvm_tdp_mmu_recover_huge_pages`); one flush if any did.
        ``ConfigError`` for an unknown slot or one that logs dirty pages (recovery happens
        when logging stops).  Returns the huge leaves made.
        """
        slot_id = self._check_slot_id(slot)
        self._ensure_alive()
        memslot = self._memslot(slot_id)
        if memslot.dirty is not None:
            raise ConfigError(
                f"slot: memslot {memslot.id} logs dirty pages: huge pages are recovered when "
                "logging stops"
            )
        self._begin_operation()
        made = self.tdp_mmu.kvm_tdp_mmu_recover_huge_pages(
            memslot.gfn, memslot.end, lambda g, level: self._may_map_huge(g, level, memslot)
        )
        if made:
            self.tdp_mmu.kvm_flush_remote_tlbs()
        self._end_of_operation()
        return made

    def write_track_gfn(self, gfn: int, add: bool = True) -> int:
        """Page write tracking (``kvm_write_track_add_gfn`` / ``kvm_write_track_remove_gfn``).

        The first tracker of ``gfn`` disallows huge pages over it and write-protects every
        leaf mapping it (:meth:`TdpMmu.kvm_tdp_mmu_write_protect_gfn`: W and MMU-writable
        cleared, one flush if any changed); a guest write then returns ``WRITE_PROTECTED``
        (KVM emulates it).  Removing the last tracker lets the next write fault map the page
        writable again.  Returns the page's tracker count.  ``ConfigError`` naming ``gfn``
        (in no memslot, in a guest_memfd slot, or not tracked when removing); the VM is
        unchanged.  The counts (4 bytes per page of the slot) count against the engine's
        budget; the reference keeps no budget.
        """
        self._check_gfn(gfn, "gfn")
        self._ensure_alive()
        memslot = self.slots.gfn_to_memslot(gfn)
        if memslot is None:
            raise ConfigError(f"gfn: {gfn:#x} is in no memslot")
        if memslot.gmem:
            raise ConfigError(
                f"gfn: {gfn:#x} is in a guest_memfd slot: KVM tracks shared memory only"
            )
        counts = memslot.write_track
        index = gfn - memslot.gfn
        if not add and (counts is None or index not in counts):
            raise ConfigError(f"gfn: {gfn:#x} is not write-tracked")
        self._begin_operation()
        if counts is None:
            counts = memslot.write_track = {}
        n = counts.get(index, 0) + (1 if add else -1)
        if n:
            counts[index] = n
        else:
            del counts[index]
        if add and n == 1 and self.tdp_mmu.kvm_tdp_mmu_write_protect_gfn(gfn):
            self.tdp_mmu.kvm_flush_remote_tlbs()
        self._end_of_operation()
        return n

    def nx_recover(self, ratio: int | None = None) -> int:
        """One run of the NX huge page recovery worker (``kvm_recover_nx_huge_pages``, the
        TDP MMU's v6.17+ form under mmu_lock for read).

        With ``nx_huge_pages`` an exec fault maps 4K where a huge page could have been and
        puts the table it had to create on a list (``nx_lpage_splits``); this zaps the oldest
        ⌈``nx_lpage_splits`` / ``ratio``⌉ of them that are still linked
        (:meth:`TdpMmu.kvm_recover_nx_huge_pages`), taking those of slots that log dirty
        pages off the list only; one flush if any was zapped.  ``ratio`` (default 60, KVM's
        ``nx_huge_pages_recovery_ratio``) 0 recovers nothing; ``ConfigError`` outside
        ``0..2**32``.  Returns the tables zapped.
        """
        ratio = 60 if ratio is None else ratio
        if isinstance(ratio, bool) or not isinstance(ratio, int):
            raise TypeError(f"ratio must be an int, got {type(ratio).__name__}")
        if not 0 <= ratio < 1 << 32:
            raise ConfigError(f"ratio: must be in 0..{1 << 32} (exclusive), got {ratio}")
        self._ensure_alive()
        self._begin_operation()

        def logs_dirty_pages(gfn: int) -> bool:
            slot = self.slots.gfn_to_memslot(gfn)
            return slot is not None and slot.dirty is not None

        zapped = self.tdp_mmu.kvm_recover_nx_huge_pages(ratio, logs_dirty_pages)
        if zapped:
            self.tdp_mmu.kvm_flush_remote_tlbs()
        self._end_of_operation()
        return zapped

    # -- private memory ------------------------------------------------------------------
    def set_memory_attributes(self, gfn: int, npages: int, private: bool = True) -> int:
        """KVM_SET_MEMORY_ATTRIBUTES: convert ``[gfn, gfn+npages)``; returns leaves zapped.

        The guest's conversion request costs an exit plus guest_memfd's bookkeeping; a 2M
        folio only partly converted is split.  Before the attribute changes, the range is
        unmapped under the *old* attribute's filter (to-shared zaps private mappings).
        A range already of the requested kind costs nothing.
        """
        self._check_confidential("private")
        self._check_range(gfn, npages)
        self._ensure_alive()
        end = gfn + npages
        self._check_covered(gfn, end, gmem=False)
        private = bool(private)
        if self.attrs.uniform(gfn, end) == private:
            return 0
        self._begin_operation()
        self.ctx.count("conversions")
        self.ctx.charge("psc_exit_ns")
        zapped = self._change_attributes(gfn, end, private)
        self._end_of_operation()
        return zapped

    def map_gpa_range(self, gfn: int, npages: int, private: bool = True) -> int:
        """The guest's KVM_HC_MAP_GPA_RANGE request and the VMM's attribute ioctl.

        Every exit to the VMM is charged (``psc_exit_ns``) and counted (``conversions``),
        even when nothing changes: one per call (an SNP page-state-change run, a sw_protected
        hypercall), or one per 2 MiB on a TD (KVM splits a MapGPA so).  A change, if any, is
        ``set_memory_attributes``' without its exit.  Returns leaves zapped.
        """
        self._check_confidential("private")
        self._check_range(gfn, npages)
        if npages < 1:  # an empty request would still exit (the binding refuses it)
            raise ValueError(f"npages must be >= 1, got {npages}")
        self._ensure_alive()
        end = gfn + npages
        self._check_covered(gfn, end, gmem=False)
        private = bool(private)
        exits = -(-npages // 512) if self.vm_type == "tdx" else 1
        self._begin_operation()
        self.ctx.count("conversions", exits)
        self.ctx.charge("psc_exit_ns", exits)
        zapped = 0
        if self.attrs.uniform(gfn, end) != private:
            zapped = self._change_attributes(gfn, end, private)
        self._end_of_operation()
        return zapped

    def _change_attributes(self, gfn: int, end: int, private: bool) -> int:
        """guest_memfd's bookkeeping and split, the unmap of the old alias, the new attribute."""
        self.ctx.charge("gmem_convert_ns")
        if self.folio_level == PG_LEVEL_2M:
            splits = partly_converted_2m_folios(self.slots, gfn, end)
            self.ctx.count("gmem_splits", splits)
            self.ctx.charge("gmem_split_2m_ns", splits)
        # kvm_arch_pre_set_memory_attributes: unmap the old alias.
        zapped = self._unmap_gfn_range(gfn, end, private=not private, shared=private)
        self.attrs.set(gfn, end, private)
        return zapped

    def punch_hole(self, gfn: int, npages: int) -> int:
        """guest_memfd FALLOC_FL_PUNCH_HOLE: unmap with the PRIVATE filter, free the folios."""
        self._check_confidential("vm_type")
        self._check_range(gfn, npages)
        self._ensure_alive()
        end = gfn + npages
        self._check_covered(gfn, end, gmem=True)
        self._begin_operation()
        zapped = self._unmap_gfn_range(gfn, end, private=True, shared=False)
        self.vendor.gmem_invalidate(self.slots, gfn, end)
        free_folios(self.slots, gfn, end)
        self._end_of_operation()
        return zapped

    def finalize(self) -> None:
        """KVM_TDX_FINALIZE_VM: the TD becomes runnable."""
        if self.vm_type != "tdx":
            raise ConfigError(f"vm_type: finalize is a TDX operation, not for {self.vm_type}")
        self._ensure_alive()
        self.vendor.finalize()

    def destroy(self) -> None:
        """Tear the VM down in KVM's order; every later operation raises ``ConfigError``.

        0. TDX ``teardown="terminate_vm"`` (KVM_TDX_TERMINATE_VM): the HKID is released
           first, so step 1 reclaims each private page instead of removing it.
        1. guest_memfd files are released (each holds a VM reference): a PRIVATE unmap of
           every guest_memfd slot, HKID still assigned, and the folios are freed.
        2. ``tdx_mmu_release_hkid`` (with ``sept_free="sept_remove"`` the then leaf-less
           mirror tree is torn down first, while the HKID is assigned).
        3. ``kvm_mmu_destroy`` per vCPU, then ``kvm_mmu_uninit_tdp_mmu``: every root is
           invalidated and zapped exclusively (on a TD only ``free_external_spt`` runs).
        """
        self._ensure_alive()
        self._begin_operation()
        self.vendor.terminate_vm()
        for slot in self.slots.by_gfn():
            if not slot.gmem:
                continue
            self._unmap_gfn_range(slot.gfn, slot.end, private=True, shared=False)
            self.vendor.gmem_invalidate(self.slots, slot.gfn, slot.end)
        self.vendor.vm_destroy(self.tdp_mmu)
        self.tdp_mmu.kvm_mmu_uninit_tdp_mmu()
        self._end_of_operation()
        self._destroyed = True

    # -- SEV-SNP -------------------------------------------------------------------------
    def pvalidate(
        self, gfn: int, npages: int = 1, size_2m: bool = False, validate: bool = True
    ) -> dict[str, int]:
        """The guest's PVALIDATE over ``[gfn, gfn+npages)``; returns {status: pages}."""
        if self.vm_type != "snp":
            raise ConfigError("vm_type: PVALIDATE is an SEV-SNP guest instruction")
        self._check_range(gfn, npages)
        step = 512 if size_2m else 1
        if size_2m and (gfn % 512 or npages % 512):
            raise ConfigError("gfn: 2M PVALIDATE needs a 2M-aligned gfn and 512-page multiples")
        self._ensure_alive()
        for g in range(gfn, gfn + npages, step):
            slot = self.slots.gfn_to_memslot(g)
            if slot is None or slot.rmp is None:
                raise ConfigError(f"gfn: {g:#x} is not guest_memfd memory of an SNP guest")
            e = slot.rmp.get(g - slot.gfn)
            if not e.assigned or e.gfn != g:
                raise ConfigError(f"gfn: {g:#x} is not assigned to the guest in the RMP")
        self._begin_operation()
        out: dict[str, int] = {}
        for g in range(gfn, gfn + npages, step):
            slot = self.slots.gfn_to_memslot(g)
            assert slot is not None and slot.rmp is not None
            status = slot.rmp.pvalidate(self.ctx, g - slot.gfn, g, bool(size_2m), bool(validate))
            out[status] = out.get(status, 0) + 1
        self._end_of_operation()
        return out

    def rmp_fault(self, gfn: int) -> None:
        """``sev_handle_rmp_fault``: PSMASH the 2M RMP entry, zap the 512-page gfn range."""
        if self.vm_type != "snp":
            raise ConfigError("vm_type: RMP faults exist only on SEV-SNP")
        self._check_gfn(gfn, "gfn")
        self._ensure_alive()
        slot = self.slots.gfn_to_memslot(gfn)
        if slot is None or slot.rmp is None:
            raise ConfigError(f"gfn: {gfn:#x} is not guest_memfd memory")
        assert isinstance(self.vendor, SevVendor)
        self._begin_operation()
        self.vendor.handle_rmp_fault(slot, gfn)
        base = gfn & ~511
        self._zap_leafs(KVM_VALID_ROOTS, base, base + 512)
        self._end_of_operation()

    def rmp_entry(self, gfn: int) -> dict[str, Any]:
        """The RMP entry of the guest_memfd page behind ``gfn``."""
        self._check_gfn(gfn, "gfn")
        slot = self.slots.gfn_to_memslot(gfn)
        if slot is None or slot.rmp is None:
            raise ConfigError(f"gfn: {gfn:#x} has no RMP entry (not SNP guest_memfd memory)")
        e = slot.rmp.get(gfn - slot.gfn)
        return {
            "assigned": e.assigned,
            "validated": e.validated,
            "size": "2M" if e.size_2m else "4K",
            "gpa": e.gfn << PAGE_SHIFT,
        }

    # -- TDX -----------------------------------------------------------------------------
    @property
    def sept(self) -> TdxModule | None:
        """The TDX module (or the SW mirror's software tree), if the VM has one."""
        return self.vendor.module if isinstance(self.vendor, TdxVendor) else None

    def sept_entries(self) -> list[tuple[int, int, str, int]]:
        """The TDX module's S-EPT entries that are not FREE, in tree order."""
        if self.sept is None:
            raise ConfigError("vm_type: only TDX VMs (and sw_protected with mirror) have an S-EPT")
        return self.sept.sept_entries()

    # -- inspection ----------------------------------------------------------------------
    def roots(self) -> list[dict[str, Any]]:
        """The TDP MMU root list, newest first."""
        return [
            {
                "pfn": r.pfn,
                "role": r.role,
                "level": r.level,
                "mirror": r.is_mirror,
                "refcount": r.refcount,
                "invalid": r.invalid,
                "scheduled_to_zap": r.scheduled_to_zap,
            }
            for r in self.tdp_mmu.roots
        ]

    def walk(self, gfn: int, private: bool = False) -> list[tuple[int, int]]:
        """``(level, spte)`` from the root entry down to the first leaf or non-present entry.

        Uses the newest valid root of the kind (mirror for ``private`` on VMs with one);
        ``[]`` if there is none.
        """
        self._check_gfn(gfn, "gfn")
        if private and not self.has_mirror:
            self._check_private(True)
        mirror = self.has_mirror and bool(private)
        root = self.tdp_mmu.current_root(mirror)
        if root is None:
            return []
        return self.tdp_mmu.walk_root(root, gfn, self.tdp_mmu.root_gfn_bits(mirror))

    def spte(self, gfn: int, private: bool = False) -> int:
        """The last entry of :meth:`walk`, or ``SHADOW_NONPRESENT_VALUE``."""
        path = self.walk(gfn, private)
        return path[-1][1] if path else SHADOW_NONPRESENT_VALUE

    def tables(self) -> list[list[int]]:
        """Copy of the arena: row *i* is the table at host pfn ``TABLE_BASE_PFN + i``."""
        return self.arena.tables()

    def trace_events(self) -> list[TraceEvent]:
        """With ``trace=True``: the external-hook calls, in order, as ``(op, gfn, level,
        detail)``.  The reference traces the hook dispatch site only (not the SEAMCALLs or
        RMP instructions the backends issue)."""
        return list(self.ctx.events or [])

    def check(self) -> None:
        """Raise :class:`InvariantError` if the model's state is inconsistent.

        After :meth:`destroy` this audits the teardown instead: nothing may be left behind.
        A bugged VM raises ``VmBugged``.
        """
        if self._destroyed:
            check_teardown(self.arena, self.tdp_mmu, self.slots, self.sept)
            return
        self._ensure_alive()
        check_live(
            arena=self.arena,
            tdp_mmu=self.tdp_mmu,
            ctx=self.ctx,
            slots=self.slots,
            attrs=self.attrs,
            confidential=self.confidential,
            sept=self.sept,
            private_max_level=self.vendor.private_leaf_max_level,
        )

    # ==================================================================================
    # Argument checks (bad input leaves the VM unchanged)
    # ==================================================================================

    def _ensure_alive(self) -> None:
        if self._destroyed:
            raise ConfigError("vm: the VM was destroyed; create a new one")
        if self._bug_msg is not None:
            raise VmBugged(self._bug_msg)

    def _check_gfn(self, gfn: int, what: str) -> None:
        if isinstance(gfn, bool) or not isinstance(gfn, int):
            raise TypeError(f"{what} must be an int, got {type(gfn).__name__}")
        if not 0 <= gfn < self.max_gfn:
            raise ValueError(f"{what} {gfn:#x} is outside the guest (0 <= gfn < {self.max_gfn:#x})")

    def _check_range(self, gfn: int, npages: int) -> None:
        self._check_gfn(gfn, "gfn")
        if isinstance(npages, bool) or not isinstance(npages, int):
            raise TypeError(f"npages must be an int, got {type(npages).__name__}")
        if npages < 0 or gfn + npages > self.max_gfn:
            raise ValueError(
                f"npages {npages} is out of range (0 <= gfn + npages <= {self.max_gfn:#x})"
            )

    def _check_vcpu(self, vcpu: int) -> None:
        if isinstance(vcpu, bool) or not isinstance(vcpu, int) or not 0 <= vcpu < self.vcpus:
            raise ValueError(f"vcpu must be in 0..{self.vcpus - 1}, got {vcpu!r}")

    def _check_private(self, private: bool | None) -> None:
        if private and not self.confidential:
            raise ValueError(
                "private: a default VM has no private memory (use private=None or False)"
            )

    def _check_count_range(self, gfn: int, npages: int) -> None:
        """A range of at least one page inside the guest (the engine's ``check_range``)."""
        self._check_range(gfn, npages)
        if npages < 1:
            raise ConfigError(f"npages: must be >= 1, got {npages}")

    def _check_slot_id(self, slot: int) -> int:
        if isinstance(slot, bool) or not isinstance(slot, int):
            raise TypeError(f"slot must be an int, got {type(slot).__name__}")
        return slot

    def _memslot(self, slot_id: int) -> Memslot:
        """The memslot with id ``slot_id`` (``ConfigError`` naming ``slot`` if none)."""
        if slot_id not in self.slots:
            raise ConfigError(f"slot: no memslot with id {slot_id}")
        return self.slots[slot_id]

    def _logging_memslot(self, slot_id: int) -> Memslot:
        """The memslot ``slot_id``, which must log dirty pages."""
        memslot = self._memslot(slot_id)
        if memslot.dirty is None:
            raise ConfigError(
                f"slot: memslot {slot_id} does not log dirty pages (set_dirty_logging first)"
            )
        return memslot

    def _may_map_huge(self, gfn: int, level: int, memslot: Memslot) -> bool:
        """``kvm_mmu_max_mapping_level`` >= ``level`` for huge-page recovery: whether the huge
        page of ``level`` at ``gfn`` of ``memslot`` may be mapped on the direct root.  The
        backing must allow it, no page of it may be write-tracked (KVM's ``disallow_lpage``
        count, as the fault path) and, on a confidential VM, the whole range must be shared
        (``KVM_LPAGE_MIXED_FLAG``)."""
        end = gfn + pages_per_hpage(level)
        if level > memslot.max_level or memslot.any_write_tracked(gfn, end):
            return False
        return not self.confidential or self.attrs.uniform(gfn, end) is False

    def _check_confidential(self, what: str) -> None:
        if not self.confidential:
            raise ConfigError(f"{what}: a {self.vm_type} VM has no private memory")

    def _check_all_in_memslots(self, gfn: int, npages: int) -> None:
        cur, end = gfn, gfn + npages
        while cur < end:
            slot = self.slots.gfn_to_memslot(cur)
            if slot is None:
                raise ValueError(f"gfn {cur:#x} (in [gfn, gfn+npages)) is not in any memslot")
            cur = slot.end

    def _check_covered(self, gfn: int, end: int, gmem: bool) -> None:
        """Every gfn of ``[gfn, end)`` is in a memslot (with guest_memfd if ``gmem``)."""
        cur = gfn
        while cur < end:
            slot = self.slots.gfn_to_memslot(cur)
            if slot is None:
                raise ConfigError(f"gfn: {cur:#x} of [{gfn:#x}, {end:#x}) is not in any memslot")
            if gmem and not slot.gmem:
                raise ConfigError(f"gfn: memslot {slot.id} holding {cur:#x} has no guest_memfd")
            cur = slot.end

    def _check_host_range(self, gfn: int, end: int, shared_only: bool) -> None:
        """The host range ``[gfn, end)`` lies in memslots (none with guest_memfd if
        ``shared_only``) and starts and ends on each slot's backing-page boundary (hugetlb
        mappings change in whole huge pages)."""
        self._check_covered(gfn, end, gmem=False)
        for slot in self.slots.by_gfn():
            if not (slot.gfn < end and gfn < slot.end):
                continue
            if shared_only and slot.gmem:
                raise ConfigError(
                    f"gfn: memslot {slot.id} holding [{gfn:#x}, {end:#x}) has guest_memfd: its "
                    "private pages are freed with punch_hole, not MADV_DONTNEED"
                )
            align = slot.backing_pages
            for arg, g in (("gfn", gfn), ("npages", end)):
                if slot.gfn < g < slot.end and (g - slot.gfn) % align:
                    raise ConfigError(
                        f"{arg}: the range [{gfn:#x}, {end:#x}) must start and end on a backing "
                        f"page boundary of memslot {slot.id} ({align} pages)"
                    )

    # ==================================================================================
    # The operation bracket, and what several operations share
    # ==================================================================================

    def _begin_operation(self) -> None:
        self.ctx.bug = None

    def _end_of_operation(self) -> None:
        """End of a public operation: the grace period ends; a KVM_BUG_ON bugs the VM."""
        self.arena.end_grace_period()
        bug, self.ctx.bug = self.ctx.bug, None
        if bug is not None:
            if self._bug_msg is None:
                self._bug_msg = bug
            raise VmBugged(bug)

    def _add_memslot(self, gfn: int, npages: int, backing: int, gmem: bool) -> int:
        return self.slots.add(gfn, npages, backing, gmem, rmp=self.vendor.has_rmp)

    def _zap_leafs(self, types: int, start: int, end: int) -> int:
        """Leaf zap of ``[start, end)`` in the roots of ``types``, the vendor's end of the zap
        (TDX ``track="batched"``: one TRACK, then the removals), then one TLB flush if a
        valid root lost a translation.  Returns the leaves zapped."""
        flush, zapped = self.tdp_mmu.kvm_tdp_mmu_zap_leafs(types, start, end)
        self.vendor.zap_end()
        if flush:
            self.tdp_mmu.kvm_flush_remote_tlbs()
        return zapped

    def _unmap_gfn_range(self, start: int, end: int, *, private: bool, shared: bool) -> int:
        """``kvm_unmap_gfn_range`` with an attribute filter (``kvm_tdp_mmu_unmap_gfn_range``),
        the vendor's end of the zap, then one TLB flush if needed.  Returns leaves zapped."""
        flush, zapped = self.tdp_mmu.kvm_tdp_mmu_unmap_gfn_range(
            start, end, private=private, shared=shared
        )
        self.vendor.zap_end()
        if flush:
            self.tdp_mmu.kvm_flush_remote_tlbs()
        return zapped

    def _hw_access(self, root: Any, gfn: int, gfn_bits: int, write: bool) -> bool | None:
        """The hardware's translation of one guest access in ``root``: None if the mapping does
        not allow it (an access-tracked leaf allows nothing); else the CPU sets the leaf's
        Accessed bit (and Dirty for a write), as EPT A/D does, and the answer says whether this
        write set a clear Dirty bit of a 4K leaf (what PML logs).  A leaf of the A/D-disabled
        type gets no bits."""
        leaf = self.tdp_mmu.leaf_ptr(root, gfn, gfn_bits)
        if leaf is None:
            return None
        level, sp, index = leaf
        spte = sp.spt[index]
        if not is_access_allowed(spte, write=write, exec=False):
            return None
        if not spte_ad_enabled(spte):
            return False
        want = SPTE_ACCESSED | (SPTE_DIRTY if write else 0)
        if spte & want != want:
            sp.spt[index] = spte | want
            return write and level == PG_LEVEL_4K and not spte & SPTE_DIRTY
        return False

    def _kvm_arch_flush_shadow_memslot(self, slot: Memslot) -> None:
        """Memslot delete: fast zap (default VM + quirk) or a leaf zap of the slot."""
        if self.vm_type == "default" and self.slot_zap_all:
            self.tdp_mmu.kvm_mmu_zap_all_fast()
        else:
            # kvm_mmu_zap_memslot: PRIVATE|SHARED filter.
            self._unmap_gfn_range(slot.gfn, slot.end, private=True, shared=True)
