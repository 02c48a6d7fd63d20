"""Shapes of the engine's introspection results, as ``TypedDict``s (for type checkers and
readers; at run time they are plain dicts).
"""

from typing import Literal, TypedDict

__all__ = [
    "MatrixRow",
    "RmpEntry",
    "RootInfo",
    "SpteFields",
    "VcpuRecord",
    "VirtualRecord",
    "VirtualVcpu",
]


class SpteFields(TypedDict):
    """``tdpmmu.spte.decode(value)``: the fields of one SPTE as KVM's EPT format defines them."""

    value: int
    #: "frozen", "mmio", "nonpresent", or for a present entry (the level is not known)
    #: "huge-leaf-or-4k-nonleaf" (bit 7 set) or "leaf-or-nonleaf".
    kind: str
    present: bool
    frozen: bool
    mmio: bool
    readable: bool
    writable: bool
    executable: bool
    #: EPT memory type (6 = write-back).
    memtype: int
    ipat: bool
    large: bool
    accessed: bool
    dirty: bool
    host_writable: bool
    mmu_writable: bool
    suppress_ve: bool
    #: Host page-frame number, bits 51:12 (a table's pfn for a non-leaf, the gfn of an MMIO
    #: SPTE).
    pfn: int
    #: Memslot generation recorded in an MMIO SPTE; None for every other entry (the engine
    #: returns None although this field is typed ``int``).
    mmio_generation: int


class RootInfo(TypedDict):
    """One root of ``vm.roots()`` (KVM's root ``kvm_mmu_page``)."""

    #: Host pfn of the root table.
    pfn: int
    #: The role word (level, direct, access, invalid, efer_nx, cr0_wp, is_mirror bits).
    role: int
    level: int
    #: The role has ``is_mirror`` (TDX private memory).
    mirror: bool
    #: References: one per vCPU that loaded it, plus the TDP MMU's while the root is valid.
    refcount: int
    invalid: bool
    scheduled_to_zap: bool


class RmpEntry(TypedDict):
    """``vm.rmp_entry(gfn)``: the SEV-SNP RMP entry of the guest_memfd page behind ``gfn``."""

    #: The page is assigned to the guest (private).
    assigned: bool
    #: The guest has PVALIDATEd it.
    validated: bool
    size: Literal["4K", "2M"]
    #: Guest-physical address the entry is assigned to, in bytes.
    gpa: int


class VcpuRecord(TypedDict):
    """One vCPU of ``vm.run_memstress(...)`` (its list is in vCPU order)."""

    #: Host wall-clock seconds of this vCPU's thread.
    wall_s: float
    #: Modeled nanoseconds charged on this vCPU.
    modeled_ns: float
    #: Faults taken (RETRYs re-fault and count again).
    faults: int
    #: Pages accessed.
    pages: int


class VirtualVcpu(TypedDict):
    """One simulated vCPU of ``vm.run_virtual(...)`` (its list is in vCPU order)."""

    #: Its modeled clock when it finished, ns.
    modeled_ns: float
    #: Guest accesses made; each is a hit or ends in one final fault outcome.
    accesses: int
    #: Accesses the mapping allowed (no exit), including after a RETRY.
    hits: int
    #: Fault attempts (every exit, RETRYs included).
    faults: int
    fixed: int
    spurious: int
    retry: int
    emulate: int
    memory_fault: int
    write_protected: int
    #: Retries KVM made inside one exit (TDX local retries).
    local_retries: int


class VirtualRecord(TypedDict):
    """What ``vm.run_virtual(...)`` returns."""

    #: Modeled time from the start to the last vCPU's end, ns.
    elapsed_ns: float
    vcpus: list[VirtualVcpu]
    #: The vCPUs' modeled ns by CostModel field, then by wait kind (``_core.WAIT_FIELDS``).
    breakdown: dict[str, float]
    #: The same for the host threads (userfaultfd readers, the remover).
    host_breakdown: dict[str, float]
    #: ``mmu_lock`` acquisitions, and those that queued.
    lock_acquires: int
    lock_contended: int
    #: Pages the remover zapped and its modeled ns doing it.
    removed: int
    remove_ns: float
    #: Engine scheduling points and thread switches.
    steps: int
    switches: int
    #: Host seconds of the engine loop.
    wall_s: float


class MatrixRow(TypedDict):
    """One row of ``tdpmmu._core.MATRIX`` (read through ``tdpmmu.config.VARIANTS``)."""

    vm_type: str
    mirror: bool
    designs: tuple[str, ...]
    mirror_root: bool
    tdx_options: bool
