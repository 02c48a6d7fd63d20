"""``tdpmmu.VM``: the native VM with Python-side argument normalization and conveniences.

Hot paths (``fault``, ``fault_batch``, ``run_memstress``, ...) are inherited unchanged from the
native class (``tdpmmu._core.Vm``, documented there method by method) so they stay one native
call each. ``DEFAULT_HOOKS`` is the hook design each VM type uses when ``hooks=None``.
"""

from collections.abc import Mapping
from types import TracebackType
from typing import cast

from tdpmmu import _core, coerce, config
from tdpmmu.costs import CostModel
from tdpmmu.sizes import BACKING_SIZES, format_size, parse_size
from tdpmmu.stats import Stats
from tdpmmu.trace import Event

__all__ = ["DEFAULT_HOOKS", "VM"]

#: Hook design each VM type uses when ``hooks=None`` (upstream KVM's), from ``tdpmmu.config``.
DEFAULT_HOOKS: dict[str, str] = {
    v.vm_type: v.default_design for v in config.VARIANTS if not v.mirror
}


_BACKING_NAMES = {size: name for name, size in BACKING_SIZES.items()}


TdxValue = str | bool | int | float


class VM(_core.Vm):
    """One simulated x86 VM with the TDP MMU: KVM's ``struct kvm`` as far as memory goes.

    The VM holds its memslots, memory attributes, TDP roots and page tables, vCPUs, counters
    (``stats``) and modeled clock, and by type a model of the TDX module (its S-EPT and
    SEAMCALLs) or SEV-SNP's RMP. The default memslot (slot 0) covers all of ``memory`` from
    gfn 0 with host pages of ``backing`` bytes; on a confidential VM it also has a guest_memfd
    and starts all-private, as a VMM sets such a guest up. Guest data pages are never
    allocated: a memslot gets a range of host page-frame numbers instead. Each operation is a
    method whose docstring says what it models in KVM (``fault``, ``fault_batch``,
    ``populate``, ``zap_gfn_range``, ``mmu_notifier_invalidate``, ``madvise_dontneed``,
    ``mprotect``, ``set_memory_attributes``, ``map_gpa_range``, ``punch_hole``, ``finalize``,
    ``destroy``, ...).
    ``with tdpmmu.VM(...) as vm:`` destroys the VM in KVM's order when the block ends.

    Units everywhere: a gfn is the guest page-frame number of a 4 KiB guest page
    (guest-physical address >> 12), in ``0..max_gfn``; npages counts 4 KiB pages; sizes are
    bytes; costs and ``modeled_ns`` are modeled nanoseconds.

    Args:
        vm_type: the kind of guest, KVM's VM type (``tdpmmu.config.VM_TYPES``):
            ``"default"`` (default; KVM_X86_DEFAULT_VM): a normal VM, one direct root, shared
            memory only.
            ``"tdx"`` (KVM_X86_TDX_VM): a trust domain. Private memory is mapped through a
            mirror root whose changes the hooks reflect into the TDX module's S-EPT
            (SEAMCALLs such as TDH.MEM.PAGE.AUG, at 4 KiB only); shared memory through a
            direct root at the shared bit (gfn bit 35, or 39 with 5 levels). No vCPU runs
            before ``finalize()``; ``populate(..., private=True)`` builds the initial image.
            ``"snp"`` (KVM_X86_SNP_VM): one NPT root; private memory comes from guest_memfd,
            and the RMP follows it (RMPUPDATE, PSMASH; the guest PVALIDATEs).
            ``"sw_protected"`` (KVM_X86_SW_PROTECTED_VM): private memory from guest_memfd
            and no hardware around it; with ``mirror=True`` the TDX-shaped mirror root.
        memory: guest memory behind slot 0, as bytes (int) or a size string whose suffixes
            are powers of 1024 (``"64M"``, ``"1GiB"``, ``"0x1000"``); default ``"1GiB"``.
            It must be > 0, a multiple of 4096 and of the backing page, at most ``max_gfn``
            pages, and its page tables fully mapped at 4 KiB must fit in this machine's RAM.
        vcpus: number of vCPUs, 1..4096 (default 1); vCPU indices are ``0..vcpus``.
        levels: TDP paging levels, 4 (default: gfns below 2**36) or 5 (below 2**40).
        backing: host page size behind slot 0, the largest leaf a mapping of it can use:
            ``"4K"`` (default), ``"2M"`` (THP or hugetlb) or ``"1G"`` (hugetlb), or the same
            in bytes (4096, 2097152, 1073741824).
        hooks: which SPTE changes call the external page-table hooks
            (``link_external_spt``, ``set_external_spte``, ``remove_external_spte``,
            ``free_external_spt``). None (default): the VM type's upstream design
            (``DEFAULT_HOOKS``; sw_protected with ``mirror=True``: "mirror"). A design name
            (``tdpmmu.config.DESIGNS``): ``"none"`` (nothing is hooked), ``"mirror"`` (every
            change of an entry in a mirror-role table: upstream TDX), ``"private"`` (every
            change made by a private fault or a PRIVATE-filtered zap, whatever the table) or
            ``"gmem"`` (no SPTE hooks; guest_memfd prepare and invalidate keep the RMP:
            upstream SNP). A ``tdpmmu.HookDesign``: a design with its TDX options (explicit
            ``tdx`` entries win). Or any other object with the four hook methods, each
            called as ``method(gfn, level, value)`` under the MMU lock in place of the
            TDX-module model and returning 0, -16 (-EBUSY: the install fails and the fault
            gets RETRY) or another negative errno (returning anything else or raising is a
            KVM_BUG_ON too: ``VmBugged``). ``level`` is the level of the entry written (for
            ``free_external_spt``, of the freed table) and ``value`` the new SPTE, the old
            SPTE (``remove_external_spte``) or the table's pfn. The object gets design
            "mirror", needs a VM with a mirror root, re-enters Python on every call (slow)
            and must not call back into its VM.
        costs: the modeled cost of each operation: a ``tdpmmu.CostModel``, a mapping of
            field name -> nanoseconds that overrides those defaults, or None (default) for
            the documented defaults (docs/costs.md).
        seed: seed of every seeded draw (TDX OPERAND_BUSY injection), an int in
            ``0..2**64`` (default 0).
        trace: record every hook call, SEAMCALL, RMP instruction, kick and page clear for
            ``trace_events()`` (default False; memory grows with every event).
        nx_huge_pages: KVM's NX huge pages mitigation (iTLB multihit): exec faults map
            4 KiB only, huge leaves are made without X, and an exec fault on a huge leaf
            splits it (default False).
        slot_zap_all: KVM_X86_QUIRK_SLOT_ZAP_ALL (default True): deleting a memslot of a
            default VM zaps every direct root (``zap_all_fast``); False, and every other VM
            type, zaps only the slot's leaves.
        tdx: options of the TDX side of a TD-shaped mirror (tdx, and sw_protected with
            ``mirror=True``) as a mapping; keys and values (``tdpmmu.config.
            TDX_OPTION_CHOICES``; unset keys keep the first, upstream value):
            ``"version"``: ``"6.19"`` (set_external_spte issues TDH.MEM.PAGE.ADD while the TD
            is built) or ``"6.16"`` (it only counts ``nr_premapped``; ``populate`` issues
            PAGE.ADD after the map; ``finalize`` refuses while ``nr_premapped`` is not 0).
            ``"sept_free"``: ``"teardown"`` (S-EPT tables live until the HKID is released,
            then TDH.PHYMEM.PAGE.RECLAIM) or ``"sept_remove"`` (pre-upstream: at teardown,
            before the HKID release, each S-EPT table goes by BLOCK, TRACK, kick,
            TDH.MEM.SEPT.REMOVE, WBINVD and clear).
            ``"track"``: ``"per_page"`` (BLOCK, TRACK, kick, REMOVE for each private page a
            zap removes) or ``"batched"`` (BLOCK every leaf of the zap, one TRACK and one
            kick, then REMOVE each).
            ``"interface"``: ``"four_hook"`` (the four hooks of 6.16-6.19) or ``"two_hook"``
            (the 2026 shape: links and removals arrive as set_external_spte; same
            SEAMCALLs).
            ``"teardown"``: ``"remove"`` (``destroy()`` removes each private page by BLOCK,
            TRACK, kick, REMOVE with the HKID assigned) or ``"terminate_vm"``
            (KVM_TDX_TERMINATE_VM: the HKID is released first, then each page is reclaimed).
            ``"measure"``: bool (False): 16 TDH.MR.EXTEND per initial-image page.
            ``"huge_pages"``: bool (False; tdx only): once the TD runs, private faults map 2M
            where the 2M folio and the attributes allow (TDH.MEM.PAGE.AUG at 2M); a 2M leaf a
            zap only partly covers is split by BLOCK, TRACK, kick, TDH.MEM.PAGE.DEMOTE.
            ``"max_local_retries"``: int 0..1000000 (1000): how often KVM retries a private
            fault that got RETRY before returning to the guest.
            ``"TDH.MEM.SEPT.ADD"``, ``"TDH.MEM.PAGE.AUG"``, ``"TDH.MEM.RANGE.BLOCK"``,
            ``"TDH.MEM.TRACK"``, ``"TDH.MEM.PAGE.REMOVE"``: a probability in [0, 1] (0) that
            each try of that SEAMCALL reports OPERAND_BUSY (drawn from ``seed``). On the
            fault side the fault gets RETRY; on the zap side KVM kicks every vCPU and tries
            once more, and a second OPERAND_BUSY is a KVM_BUG_ON (``VmBugged``).
            Names are str, ``measure`` a bool, the rest numbers (no text parsing here;
            ``tdpmmu.coerce.tdx_options`` parses text).
        mirror: sw_protected only (default False): add the TDX-shaped mirror root and shared
            bit, reflected into a software external tree (designs "mirror" and "private",
            TDX options apply; no SEAMCALLs and no SEAMCALL costs; runnable from the start).
        folio: guest_memfd folio size, ``"4K"`` (default) or ``"2M"`` (or bytes); only VM
            types with guest_memfd (tdx, snp, sw_protected). A private mapping is never
            larger than its folio; with ``"2M"`` SNP prepares whole 2 MiB RMP entries and a
            conversion that covers part of a 2 MiB folio splits it (``gmem_split_2m_ns``).
        budget: bytes of page tables and per-page metadata the VM may commit (int or a size
            string; default: this machine's RAM). Every memslot commits, up front, the page
            tables of every tree that can map it fully at 4K (the direct tree; on a VM with a
            mirror root the mirror tree plus the S-EPT or software external tree) and its
            first-touch bitmaps and RMP entries; a VM or ``add_memslot`` that would exceed the
            budget raises ``tdpmmu.OutOfMemory`` before allocating anything.
        ad_bits: KVM's ``enable_ept_ad_bits`` (kvm_intel ``eptad``), default True: leaves
            carry Accessed/Dirty and the CPU sets them. False models ``eptad=0`` on default
            and sw_protected VMs (without a mirror root): SPTEs are of the A/D-disabled type,
            the CPU sets no A/D, aging (``age_gfn_range``) marks each young leaf for access
            tracking (RWX cleared, R and X saved), the next access to it faults and
            ``fast_page_fault`` restores it lockless (``pf_fast``; a write gets W back only
            on an MMU-writable leaf, else the slow path), ``test_age_gfn`` is True for a leaf
            not access-tracked, a pre-fault's leaf starts access-tracked, and dirty logging
            write-protects (``pml=True`` is refused).

    Valid VM types and hook designs (``tdpmmu.config.VARIANTS``; the first is the default):
    ``default``: none; ``tdx``: mirror, private; ``snp``: gmem, private; ``sw_protected``:
    none; ``sw_protected`` with ``mirror=True``: mirror, private. Every other combination is a
    ``ConfigError``.

    Raises:
        ConfigError: a bad value, the message starting with what it names: ``vm_type``
            (unknown), ``memory`` (unparsable, zero, not a multiple of 4096 or of the backing
            page, beyond the guest-physical limit, or page tables too large for this
            machine), ``vcpus``, ``levels``, ``backing``, ``hooks`` (unknown design, a design
            the VM type does not take, or a hook object on a VM without a mirror root),
            ``costs`` (unknown field; a bad value names its field), ``seed``, ``tdx`` (unknown
            key, ``tdx[key]`` for a bad value, or options on a VM type that takes none),
            ``mirror`` (on a VM type other than sw_protected), ``folio`` (not 4K or 2M, or on
            a default VM), ``ad_bits`` (False on snp, whose NPT always has A/D, or on a VM
            with a mirror root: KVM refuses TDX without EPT A/D bits).
        TypeError: a value of the wrong type (its note names the argument): ``vm_type`` not
            a str, a bool or str where an int is expected, an int where a bool is, ``memory``
            a float, ``costs`` or ``tdx`` not a mapping, a hook object missing a method.
        OutOfMemory: the memory's page tables and metadata (fully mapped at 4 KiB) exceed
            ``budget``, or the page-table arena or the VM's metadata could not be reserved.
    """

    _costs: CostModel
    _backing: int

    def __new__(
        cls,
        vm_type: str = "default",
        memory: str | int = "1GiB",
        vcpus: int = 1,
        levels: int = 4,
        backing: str | int = "4K",
        hooks: str | object | None = None,
        costs: CostModel | Mapping[str, float] | None = None,
        seed: int = 0,
        trace: bool = False,
        nx_huge_pages: bool = False,
        slot_zap_all: bool = True,
        *,
        tdx: Mapping[str, TdxValue] | None = None,
        mirror: bool = False,
        folio: str | int | None = None,
        budget: str | int | None = None,
        ad_bits: bool = True,
    ) -> "VM":
        """Create the VM; the class docstring documents every argument and error."""
        if not isinstance(vm_type, str):
            raise TypeError(f"vm_type: expected str, got {type(vm_type).__name__}")
        memory_bytes = coerce.size(memory, "memory")
        backing_bytes = coerce.backing(backing)
        # Which (vm_type, mirror, design, TDX options) combinations are valid is the engine's
        # to say (tdpmmu.config); here the hooks= value only says what it names.
        design, options, hook_object = coerce.hook_parts(hooks, tdx)
        model = coerce.cost_model(costs)
        self = cast(
            "VM",
            super().__new__(
                cls,
                vm_type,
                memory_bytes,
                vcpus,
                levels,
                backing_bytes,
                design,
                model.to_dict(),
                seed,
                trace,
                nx_huge_pages,
                slot_zap_all,
                tdx=cast("dict[str, TdxValue]", options) or None,
                mirror=mirror,
                folio=None if folio is None else parse_size(folio, "folio"),
                budget=None if budget is None else coerce.size(budget, "budget", multiple=1),
                hook_object=hook_object,
                ad_bits=ad_bits,
            ),
        )
        self._costs = model
        self._backing = backing_bytes
        return self

    @property
    def stats(self) -> Stats:
        """A snapshot of the VM's counters (a property; taking it changes nothing).

        Returns a ``tdpmmu.Stats``, a read-only mapping: KVM's counter names (``pf_taken``,
        ``pf_fixed``, ``pages_4k``, ``tdp_mmu_pages``, ``remote_tlb_flush``, ...), the hook
        names, SEAMCALL leaves (``"TDH.MEM.PAGE.AUG"``, ...), RMP and guest_memfd counters
        (``rmpupdate``, ``conversions``, ...) as ints, ``modeled_ns`` (float: the modeled
        clock) and ``page_table_bytes``/``page_table_peak_bytes``; ``tdpmmu._core.COUNTER_NAMES``
        lists the counters. Subtract two snapshots for a delta. Never raises.
        """
        return Stats(self.stats_dict())

    @property
    def costs(self) -> CostModel:
        """The ``tdpmmu.CostModel`` this VM charges its modeled clock with (a property).

        The ``costs=`` given at creation, as a ``CostModel`` (defaults when None). Fixed for
        the VM's life. Never raises.
        """
        return self._costs

    @property
    def backing(self) -> int:
        """Host page size behind the default memslot, in bytes (a property).

        4096, 2097152 or 1073741824: ``backing=`` as given at creation. Never raises.
        """
        return self._backing

    def add_memslot(
        self,
        gfn: int,
        npages: int,
        backing: str | int = "4K",
        gmem: bool = False,
        readonly: bool = False,
    ) -> int:
        """Create a memslot (KVM_SET_USER_MEMORY_REGION2) of ``npages`` 4 KiB pages at ``gfn``.

        As ``tdpmmu._core.Vm.add_memslot``, with ``backing`` also as a name. The slot's pages
        start shared; the memslot generation grows by 2.

        Args:
            gfn: first 4 KiB guest page; a multiple of the backing page (1, 512 or 262144
                pages).
            npages: number of 4 KiB pages, >= 1, a multiple of the backing page; the slot
                must end at or below ``max_gfn`` and must not overlap another memslot.
            backing: host page size, ``"4K"`` (default), ``"2M"`` or ``"1G"``, or the same in
                bytes.
            gmem: give the slot a guest_memfd for private memory (default False); only VM
                types with private memory (tdx, snp, sw_protected).
            readonly: ``KVM_MEM_READONLY`` (default False): SPTEs are never writable and a
                guest write is emulated (``Ret.EMULATE``); not on tdx/snp nor with ``gmem``.

        Returns:
            int: the new slot's id (ids count up and are never reused; slot 0 is the default).

        Raises:
            ConfigError: naming ``gfn`` (misaligned, or overlapping a memslot), ``npages``,
                ``backing`` (not 4K, 2M or 1G), ``gmem`` (on a default VM), ``readonly``
                (where KVM has no read-only memory) or ``vm`` (after ``destroy()``); the VM is
                unchanged.
            OutOfMemory: the slot's page tables and metadata (fully mapped at 4 KiB) would
                exceed the VM's ``budget`` (nothing is allocated), or its bookkeeping could not
                be allocated.
            VmBugged: the VM was bugged.
            TypeError: an argument of the wrong type.
        """
        return super().add_memslot(
            gfn, npages, coerce.backing(backing), gmem, coerce.flag(readonly, "readonly")
        )

    def trace_events(self) -> list[Event]:  # type: ignore[override]
        """The trace: every traced event so far, in order (``VM(trace=True)``; else empty).

        Each operation's events are appended when it ends, in the order they happened within
        it; the vCPU threads of ``run_memstress`` append theirs in groups, not interleaved by
        time. Fields of ``tdpmmu.Event``: ``op``, ``gfn``, ``level`` and ``detail`` (what each
        op records: ``tdpmmu.Event``).

        Returns:
            list[tdpmmu.Event]: a new list; the VM keeps its trace. Never raises.
        """
        return [Event(*e) for e in super().trace_events()]

    def __enter__(self) -> "VM":
        """``with tdpmmu.VM(...) as vm:``: returns the VM itself."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """End of the ``with`` block: ``destroy()`` unless the VM is already destroyed or
        bugged; exceptions from the block propagate (returns None)."""
        # Tear down in KVM's order (a TD's SEAMCALLs and an SNP guest's RMP updates are part of
        # what users measure); a bugged VM refuses, and its arena goes with the object anyway.
        if not self.destroyed and not self.bugged:
            self.destroy()

    def __repr__(self) -> str:
        """``VM(vm_type=..., memory=..., vcpus=..., levels=..., backing=..., hooks=...)``."""
        return (
            f"VM(vm_type={self.vm_type!r}, memory={format_size(self.memory)!r}, "
            f"vcpus={self.vcpus}, levels={self.levels}, backing={_BACKING_NAMES[self._backing]!r}, "
            f"hooks={self.hooks_name!r}{', bugged=True' if self.bugged else ''})"
        )
