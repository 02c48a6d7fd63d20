"""A readable, pure-Python reference model of tdpmmu's default VM.

This module re-implements the semantics pinned down in ``docs/model.md`` (which in turn
follows ``shared/spec/kvm-tdp-mmu.md``) with nothing but the standard library.  It is slow
on purpose: every SPTE lives in a plain Python list and every step of KVM's fault and zap
paths is a named method, so it can be read side by side with ``arch/x86/kvm/mmu/tdp_mmu.c``.
The differential test (``tests/test_differential.py``) runs it next to the native engine and
demands that both agree SPTE for SPTE, counter for counter.

Only the ``default`` VM type is implemented.  The seams that TDX (mirror root, S-EPT model,
SEAMCALL counting) and SEV-SNP (RMP) will need are already here and marked "extension
point": the root role word carries an ``is_mirror`` bit, every kernel page records its role,
and every SPTE write goes through one of two setters (atomic / exclusive) that would call the
external-page-table hooks for mirror pages.

Names follow KVM: a method called ``_tdp_mmu_link_sp`` does what ``tdp_mmu_link_sp`` does.
The prose is ours; nothing here is copied from the kernel.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

__all__ = [
    "ACC_ALL",
    "DATA_BASE_PFN",
    "DEFAULT_COSTS",
    "FROZEN_SPTE",
    "SHADOW_NONPRESENT_VALUE",
    "TABLE_BASE_PFN",
    "InvariantError",
    "Memslot",
    "MmuPage",
    "ReferenceFault",
    "ReferenceVM",
    "Ret",
    "is_frozen_spte",
    "is_last_spte",
    "is_mmio_spte",
    "is_shadow_present_pte",
    "make_leaf_spte",
    "make_mmio_spte",
    "make_nonleaf_spte",
    "make_small_spte",
    "mmio_spte_generation",
    "pages_per_hpage",
    "parse_size",
    "spte_index",
    "spte_to_pfn",
]

# --------------------------------------------------------------------------------------
# Errors and return codes.  When the compiled package is importable we raise its classes
# so callers can catch one hierarchy; otherwise (reference used stand-alone) local ones.
# --------------------------------------------------------------------------------------

try:  # pragma: no cover - depends on whether the native module is built
    from ._core import ConfigError as _ConfigError
    from ._core import InvariantError as _InvariantError
except ImportError:  # pragma: no cover

    class _InvariantError(Exception):  # type: ignore[no-redef]
        """An invariant of the MMU model does not hold (KVM would WARN or BUG)."""

    class _ConfigError(ValueError):  # type: ignore[no-redef]
        """Bad VM configuration."""


InvariantError = _InvariantError
ConfigError = _ConfigError


class _RefRet(enum.IntEnum):
    """``RET_PF_*`` codes (mmu_internal.h) plus the KVM_EXIT_MEMORY_FAULT outcome."""

    CONTINUE = 0
    RETRY = 1
    EMULATE = 2
    WRITE_PROTECTED = 3
    INVALID = 4
    FIXED = 5
    SPURIOUS = 6
    MEMORY_FAULT = 7


def _pick_ret() -> Any:
    # Prefer the package's Ret so that `fault.ret is tdpmmu.Ret.FIXED` holds for both
    # engines; fall back to the local copy if it is absent or has other members.
    try:  # pragma: no cover - depends on the rest of the package
        from .ret import Ret as pkg_ret
    except ImportError:
        return _RefRet
    try:
        if all(int(getattr(pkg_ret, m.name)) == m.value for m in _RefRet):
            return pkg_ret
    except (AttributeError, TypeError, ValueError):  # pragma: no cover
        pass
    return _RefRet  # pragma: no cover


Ret = _pick_ret()

# --------------------------------------------------------------------------------------
# Geometry (spec §1.7)
# --------------------------------------------------------------------------------------

PAGE_SHIFT = 12
SPTE_LEVEL_BITS = 9
SPTE_ENT_PER_PAGE = 512
PG_LEVEL_4K, PG_LEVEL_2M, PG_LEVEL_1G = 1, 2, 3
PT64_ROOT_MAX_LEVEL = 5

#: host pfn of arena table 0 (host PA 4 GiB); table *i* lives at ``TABLE_BASE_PFN + i``.
TABLE_BASE_PFN = 0x10_0000
#: host pfn given to the first memslot; later slots follow, 1 GiB aligned.
DATA_BASE_PFN = 1 << 32
_DATA_PFN_ALIGN = 262144  # 1 GiB in 4 KiB pages


def pages_per_hpage(level: int) -> int:
    """4K pages covered by one SPTE at ``level`` (``KVM_PAGES_PER_HPAGE``)."""
    return 1 << (SPTE_LEVEL_BITS * (level - 1))


def spte_index(gfn: int, level: int) -> int:
    """Index of the entry for ``gfn`` in a table of ``level`` (``SPTE_INDEX``)."""
    return (gfn >> (SPTE_LEVEL_BITS * (level - 1))) & (SPTE_ENT_PER_PAGE - 1)


def _round_down(gfn: int, level: int) -> int:
    return gfn & ~(pages_per_hpage(level) - 1)


# --------------------------------------------------------------------------------------
# SPTE bits and constructors (spec §1).  EPT with A/D bits, WB memory type + IPAT.
# --------------------------------------------------------------------------------------

SPTE_READABLE = 1 << 0  # EPT R; also shadow_user_mask on EPT
SPTE_WRITABLE = 1 << 1  # PT_WRITABLE_MASK
SPTE_EXECUTABLE = 1 << 2  # shadow_x_mask
SPTE_RWX = 0x7
SPTE_MT_WB = 6 << 3  # memory type write-back
SPTE_IPAT = 1 << 6  # ignore guest PAT
PT_PAGE_SIZE_MASK = 1 << 7  # huge leaf
SPTE_ACCESSED = 1 << 8
SPTE_DIRTY = 1 << 9
SPTE_MMU_PRESENT_MASK = 1 << 11  # "shadow present" software bit
SPTE_HOST_WRITABLE = 1 << 57  # EPT_SPTE_HOST_WRITABLE
SPTE_MMU_WRITABLE = 1 << 58  # EPT_SPTE_MMU_WRITABLE
SPTE_SUPPRESS_VE = 1 << 63
SPTE_BASE_ADDR_MASK = ((1 << 52) - 1) & ~0xFFF

#: what zaps write and what fresh tables are filled with (spec §1.5).
SHADOW_NONPRESENT_VALUE = SPTE_SUPPRESS_VE
#: "someone is mid-update", exact-equality tested; bits 5, 7, 8, 10, 63.
FROZEN_SPTE = SHADOW_NONPRESENT_VALUE | 0x5A0

# The fixed bits of a leaf; "0x8600_0000_0000_0B77" for a 4K accessed leaf.
_LEAF_BITS = (
    SPTE_SUPPRESS_VE
    | SPTE_MMU_WRITABLE
    | SPTE_HOST_WRITABLE
    | SPTE_MMU_PRESENT_MASK
    | SPTE_DIRTY
    | SPTE_IPAT
    | SPTE_MT_WB
    | SPTE_RWX
)
_NONLEAF_BITS = SPTE_SUPPRESS_VE | SPTE_MMU_PRESENT_MASK | SPTE_ACCESSED | SPTE_RWX

# MMIO SPTEs on EPT: value W|X (misconfiguration), mask RWX|SVE; generation split in two.
SHADOW_MMIO_VALUE = SPTE_WRITABLE | SPTE_EXECUTABLE
SHADOW_MMIO_MASK = SPTE_RWX | SPTE_SUPPRESS_VE
MMIO_SPTE_GEN_MASK = (1 << 19) - 1
_MMIO_GEN_LOW_SHIFT, _MMIO_GEN_LOW_BITS = 3, 8
_MMIO_GEN_HIGH_SHIFT, _MMIO_GEN_HIGH_BITS = 52, 11

ACC_ALL = 7  # ACC_EXEC | ACC_WRITE | ACC_USER


def is_shadow_present_pte(spte: int) -> bool:
    return bool(spte & SPTE_MMU_PRESENT_MASK)


def is_large_pte(spte: int) -> bool:
    return bool(spte & PT_PAGE_SIZE_MASK)


def is_last_spte(spte: int, level: int) -> bool:
    """True if an entry at ``level`` maps memory rather than pointing to a table."""
    return level == PG_LEVEL_4K or is_large_pte(spte)


def is_frozen_spte(spte: int) -> bool:
    return spte == FROZEN_SPTE


def is_mmio_spte(spte: int) -> bool:
    return (spte & SHADOW_MMIO_MASK) == SHADOW_MMIO_VALUE


def spte_to_pfn(spte: int) -> int:
    return (spte & SPTE_BASE_ADDR_MASK) >> PAGE_SHIFT


def make_leaf_spte(pfn: int, level: int, *, exec: bool = True, prefetch: bool = False) -> int:
    """``make_spte`` for a writable WB leaf of a direct (default-VM) root.

    ``exec=False`` models the NX huge page rule (huge leaves lose X); ``prefetch=True``
    leaves the Accessed bit clear, as pre-faulted mappings are marked for access tracking.
    """
    spte = _LEAF_BITS | (pfn << PAGE_SHIFT)
    if level > PG_LEVEL_4K:
        spte |= PT_PAGE_SIZE_MASK
    if not prefetch:
        spte |= SPTE_ACCESSED
    if not exec:
        spte &= ~SPTE_EXECUTABLE
    return spte


def make_nonleaf_spte(child_pfn: int) -> int:
    """Entry pointing to the table at host pfn ``child_pfn``."""
    return (child_pfn << PAGE_SHIFT) | _NONLEAF_BITS


def make_mmio_spte(gfn: int, generation: int) -> int:
    """MMIO SPTE: generation low 8 bits at 3..10, high 11 bits at 52..62, W|X, the gfn."""
    gen = generation & MMIO_SPTE_GEN_MASK
    gen_low = gen & ((1 << _MMIO_GEN_LOW_BITS) - 1)
    gen_high = (gen >> _MMIO_GEN_LOW_BITS) & ((1 << _MMIO_GEN_HIGH_BITS) - 1)
    return (
        (gen_low << _MMIO_GEN_LOW_SHIFT)
        | SHADOW_MMIO_VALUE
        | (gfn << PAGE_SHIFT)
        | (gen_high << _MMIO_GEN_HIGH_SHIFT)
    )


def mmio_spte_generation(spte: int) -> int:
    """The memslot generation recorded in an MMIO SPTE."""
    low = (spte >> _MMIO_GEN_LOW_SHIFT) & ((1 << _MMIO_GEN_LOW_BITS) - 1)
    high = (spte >> _MMIO_GEN_HIGH_SHIFT) & ((1 << _MMIO_GEN_HIGH_BITS) - 1)
    return low | (high << _MMIO_GEN_LOW_BITS)


def make_small_spte(huge_spte: int, child_level: int, index: int, *, nx_huge_pages: bool) -> int:
    """Entry ``index`` of the table that replaces ``huge_spte`` when it is split.

    Same bits, pfn advanced by the child's size; a 4K child is no longer "large" and, on an
    NX-huge-pages VM, gets back the X bit that the huge mapping had to drop.
    """
    child = huge_spte + ((index * pages_per_hpage(child_level)) << PAGE_SHIFT)
    if child_level == PG_LEVEL_4K:
        child &= ~PT_PAGE_SIZE_MASK
        if nx_huge_pages:
            child |= SPTE_EXECUTABLE
    return child


# --------------------------------------------------------------------------------------
# Role word (spec §1.6): the bits of union kvm_mmu_page_role the model uses.
# --------------------------------------------------------------------------------------

ROLE_LEVEL_MASK = 0xF
ROLE_DIRECT = 1 << 7
ROLE_ACCESS_SHIFT = 8
ROLE_INVALID = 1 << 11
ROLE_EFER_NX = 1 << 12
ROLE_CR0_WP = 1 << 13
ROLE_AD_DISABLED = 1 << 16
ROLE_IS_MIRROR = 1 << 19

# Root-type filters (KVM_*_ROOTS).
KVM_INVALID_ROOTS = 1 << 0
KVM_DIRECT_ROOTS = 1 << 1
KVM_MIRROR_ROOTS = 1 << 2
KVM_VALID_ROOTS = KVM_DIRECT_ROOTS | KVM_MIRROR_ROOTS
KVM_ALL_ROOTS = KVM_VALID_ROOTS | KVM_INVALID_ROOTS


def tdp_root_role(levels: int, *, is_mirror: bool = False) -> int:
    """``kvm_calc_tdp_mmu_root_page_role`` for a direct (or mirror) TDP root with A/D."""
    role = levels | ROLE_DIRECT | (ACC_ALL << ROLE_ACCESS_SHIFT) | ROLE_EFER_NX | ROLE_CR0_WP
    if is_mirror:
        role |= ROLE_IS_MIRROR
    return role


# --------------------------------------------------------------------------------------
# Costs (docs/model.md "Default costs")
# --------------------------------------------------------------------------------------

DEFAULT_COSTS: dict[str, float] = {
    "exit_entry_ns": 1200.0,
    "fault_handling_ns": 2000.0,
    "host_page_alloc_ns": 7500.0,
    "host_zero_4k_ns": 1000.0,
    "tlb_flush_base_ns": 1000.0,
    "tlb_flush_per_vcpu_ns": 200.0,
    "spte_update_ns": 60.0,
}

#: counters kept by the reference, with the meanings of docs/model.md.
COUNTER_NAMES: tuple[str, ...] = (
    "pf_taken",
    "pf_fixed",
    "pf_spurious",
    "pf_emulate",
    "pf_retry",
    "pf_write_protected",
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
)

_PAGES_STAT = {PG_LEVEL_4K: "pages_4k", PG_LEVEL_2M: "pages_2m", PG_LEVEL_1G: "pages_1g"}


def _costs_from(costs: Any) -> dict[str, float]:
    merged = dict(DEFAULT_COSTS)
    if costs is None:
        return merged
    if dataclasses.is_dataclass(costs) and not isinstance(costs, type):
        items: Mapping[str, Any] = dataclasses.asdict(costs)
    elif isinstance(costs, Mapping):
        items = costs
    elif hasattr(costs, "as_dict"):
        items = costs.as_dict()
    else:
        raise ConfigError(
            f"costs must be None, a mapping or a CostModel, not {type(costs).__name__}"
        )
    for key, value in items.items():
        merged[str(key)] = float(value)
    return merged


# --------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------

_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(value: int | str, what: str = "size") -> int:
    """Bytes from an int or a string like ``"64MiB"``, ``"16G"``, ``"2M"``, ``"4K"``.

    Units are binary (K = 1024) whether or not written with ``i``.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be bytes or a size string, not a bool")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            return int(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]
    raise ConfigError(f"{what}: cannot parse {value!r} (bytes, or e.g. '4K', '2MiB', '16GiB')")


_BACKING_LEVEL = {4096: PG_LEVEL_4K, 2 << 20: PG_LEVEL_2M, 1 << 30: PG_LEVEL_1G}


def _backing_bytes(value: int | str, what: str = "backing") -> int:
    size = parse_size(value, what)
    if size not in _BACKING_LEVEL:
        raise ConfigError(
            f"{what} must be 4K, 2M or 1G (4096, 2097152 or 1073741824 bytes), got {value!r}"
        )
    return size


# --------------------------------------------------------------------------------------
# Data structures
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class MmuPage:
    """``struct kvm_mmu_page``: one 4 KiB page table and what KVM records about it."""

    index: int  # arena slot; host pfn = TABLE_BASE_PFN + index
    spt: list[int]  # the 512 SPTEs
    role: int
    gfn: int  # lowest gfn mapped by this table (un-aliased)
    nx_huge_page_disallowed: bool = False
    # Roots only:
    refcount: int = 0
    scheduled_to_zap: bool = False
    # Extension point (TDX): the page backing the S-EPT copy of a mirror table.
    external_spt: Any = None

    @property
    def pfn(self) -> int:
        return TABLE_BASE_PFN + self.index

    @property
    def level(self) -> int:
        return self.role & ROLE_LEVEL_MASK

    @property
    def invalid(self) -> bool:
        return bool(self.role & ROLE_INVALID)

    @property
    def is_mirror(self) -> bool:
        return bool(self.role & ROLE_IS_MIRROR)


@dataclasses.dataclass
class Memslot:
    """One KVM memslot with the model's host placement."""

    id: int
    gfn: int
    npages: int
    backing: int  # bytes: 4096, 2 MiB or 1 GiB
    gmem: bool
    host_pfn: int
    touched: set[int] = dataclasses.field(default_factory=set)  # backing pages allocated

    @property
    def backing_pages(self) -> int:
        return self.backing >> PAGE_SHIFT

    @property
    def max_level(self) -> int:
        return _BACKING_LEVEL[self.backing]

    @property
    def end(self) -> int:
        return self.gfn + self.npages

    def contains(self, gfn: int) -> bool:
        return self.gfn <= gfn < self.end

    def pfn(self, gfn: int) -> int:
        return self.host_pfn + (gfn - self.gfn)

    def as_tuple(self) -> tuple[int, int, int, int, bool, int]:
        return (self.id, self.gfn, self.npages, self.backing, self.gmem, self.host_pfn)


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


@dataclasses.dataclass
class _PageFault:
    """``struct kvm_page_fault``: the parts the default VM needs."""

    gfn: int
    write: bool
    exec: bool
    prefetch: bool
    slot: Memslot | None
    max_level: int = PG_LEVEL_1G
    req_level: int = PG_LEVEL_4K
    goal_level: int = PG_LEVEL_4K
    huge_page_disallowed: bool = False
    # Filled at the target level, for the caller's Fault result.
    level: int = 0
    spte: int = SHADOW_NONPRESENT_VALUE


class _TdpIter:
    """``struct tdp_iter``: pre-order walk of one root over ``[start, end)``.

    Mirrors tdp_iter.c: the walk re-reads an entry before descending into it, never
    enters a non-present (or frozen) entry, steps sideways within a table until index 511,
    then climbs.  ``old_spte`` is the snapshot taken on arrival at ``sptep``.
    """

    def __init__(self, vm: ReferenceVM, root: MmuPage, min_level: int, start: int, end: int):
        self._vm = vm
        self.root_level = root.level
        self.min_level = min_level
        self.end = end
        self.next_last_level_gfn = start
        self.pt_path: dict[int, MmuPage] = {root.level: root}
        self.level = root.level
        self.gfn = 0
        self.old_spte = SHADOW_NONPRESENT_VALUE
        self.valid = False
        self._restart()

    # -- position helpers ---------------------------------------------------------------
    @property
    def sp(self) -> MmuPage:
        """The table holding the current entry."""
        return self.pt_path[self.level]

    @property
    def index(self) -> int:
        return spte_index(self.gfn, self.level)

    def read(self) -> int:
        return self.sp.spt[self.index]

    def write(self, value: int) -> None:
        self.sp.spt[self.index] = value

    # -- movement -----------------------------------------------------------------------
    def _restart(self) -> None:
        self.level = self.root_level
        self.gfn = _round_down(self.next_last_level_gfn, self.level)
        self.old_spte = self.read()
        self.valid = True

    def _try_step_down(self) -> bool:
        if self.level == self.min_level:
            return False
        spte = self.read()  # re-read: the entry may have been unlinked since we arrived
        if not is_shadow_present_pte(spte) or is_last_spte(spte, self.level):
            return False
        child = self._vm._spte_to_child_sp(spte)
        self.level -= 1
        self.pt_path[self.level] = child
        self.gfn = _round_down(self.next_last_level_gfn, self.level)
        self.old_spte = self.read()
        return True

    def _try_step_side(self) -> bool:
        if self.index == SPTE_ENT_PER_PAGE - 1:
            return False
        self.gfn += pages_per_hpage(self.level)
        self.next_last_level_gfn = self.gfn
        self.old_spte = self.read()
        return True

    def _try_step_up(self) -> bool:
        if self.level == self.root_level:
            return False
        self.level += 1
        self.gfn = _round_down(self.gfn, self.level)
        self.old_spte = self.read()
        return True

    def next(self) -> None:
        """``tdp_iter_next``: down if possible, else side, climbing as needed."""
        if self._try_step_down():
            return
        while True:
            if self._try_step_side():
                return
            if not self._try_step_up():
                break
        self.valid = False

    def __iter__(self) -> Iterator[_TdpIter]:
        """``for_each_tdp_pte_min_level``: yields itself at every entry in the range."""
        while self.valid and self.gfn < self.end:
            yield self
            self.next()


# --------------------------------------------------------------------------------------
# The VM
# --------------------------------------------------------------------------------------


class ReferenceVM:
    """Pure-Python model of one default VM, API-compatible with ``tdpmmu.VM``.

    Every public method is one "operation": tables freed during it become reusable only
    when it returns (the model's RCU grace period, docs/model.md).
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
    ) -> None:
        if vm_type != "default":
            raise ConfigError(
                f"vm_type: the reference model implements only 'default', not {vm_type!r}"
            )
        if hooks not in (None, "none"):
            raise ConfigError(
                f"hooks: a default VM has no external page-table hooks, got {hooks!r}"
            )
        if isinstance(vcpus, bool) or not isinstance(vcpus, int) or vcpus < 1:
            raise ConfigError(f"vcpus must be an int >= 1, got {vcpus!r}")
        if levels not in (4, 5):
            raise ConfigError(f"levels must be 4 or 5, got {levels!r}")
        backing_bytes = _backing_bytes(backing)
        memory_bytes = parse_size(memory, "memory")
        if memory_bytes <= 0 or memory_bytes % backing_bytes:
            raise ConfigError(
                f"memory must be a positive multiple of the backing page size ({backing_bytes}),"
                f" got {memory!r}"
            )

        self.vm_type = vm_type
        self.memory = memory_bytes
        self.vcpus = vcpus
        self.levels = levels
        self.backing = backing_bytes
        self.seed = seed
        self.trace = trace
        self.nx_huge_pages = bool(nx_huge_pages)
        self.slot_zap_all = bool(slot_zap_all)
        self.costs = _costs_from(costs)
        #: gfns are < max_gfn (48-bit GPA with 4 levels, 52-bit with 5).
        self.max_gfn = 1 << (36 if levels == 4 else 40)
        if memory_bytes >> PAGE_SHIFT > self.max_gfn:
            raise ConfigError(f"memory {memory!r} does not fit a {levels}-level guest")

        # Arena: every table ever handed out, by index; live ones also in _live.
        self._spt: list[list[int]] = []
        self._live: dict[int, MmuPage] = {}
        self._reusable: list[int] = []  # LIFO stack of free table indices
        self._deferred: list[int] = []  # freed during the current operation

        self._roots: list[MmuPage] = []  # kvm->arch.tdp_mmu_roots, newest first
        self._vcpu_root: list[MmuPage | None] = [None] * vcpus  # mmu->root.hpa per vCPU

        self._memslots: dict[int, Memslot] = {}
        self._next_slot_id = 0
        self._next_data_pfn = DATA_BASE_PFN
        self.memslot_generation = 0

        self._stats: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)
        self._modeled_ns = 0.0

        # Extension point (TDX): object implementing link/set/remove/free_external_*.
        self._external_ops: Any = None

        # The default memslot comes with the VM: generation 0 is what a new VM reports.
        self._add_memslot(0, memory_bytes >> PAGE_SHIFT, backing_bytes, gmem=False)
        self.memslot_generation = 0

    # ==================================================================================
    # Public API
    # ==================================================================================

    # -- properties that tdpmmu.VM also has ----------------------------------------------
    @property
    def shared_bit(self) -> int:
        return 0

    @property
    def bugged(self) -> bool:
        return False

    @property
    def hooks_name(self) -> str:
        return "none"

    @property
    def stats(self) -> dict[str, int | float]:
        """Counters (KVM names) and ``modeled_ns``; a fresh dict each time."""
        return self.stats_dict()

    def stats_dict(self) -> dict[str, int | float]:
        out: dict[str, int | float] = dict(self._stats)
        out["modeled_ns"] = self._modeled_ns
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
        """One EPT violation (or misconfig) taken by ``vcpu`` on ``gfn``."""
        self._check_gfn(gfn, "gfn")
        self._check_vcpu(vcpu)
        self._check_private(private)
        result = self._vcpu_fault(vcpu, gfn, bool(write), bool(exec))
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
        gfn_list = [int(g) for g in gfns]
        for g in gfn_list:
            self._check_gfn(g, "gfns")
        self._check_vcpu(vcpu)
        self._check_private(private)
        rets = [int(self._vcpu_fault(vcpu, g, bool(write), bool(exec)).ret) for g in gfn_list]
        self._end_of_operation()
        return rets

    def populate(self, gfn: int, npages: int, private: bool | None = None) -> int:
        """KVM_PRE_FAULT_MEMORY on vCPU 0: prefetch faults over ``[gfn, gfn+npages)``.

        Each prefetch fault maps one leaf; the next one starts at the end of that leaf.
        Returns the number of leaves installed.
        """
        self._check_range(gfn, npages)
        self._check_private(private)
        if npages < 1:
            raise ValueError(f"npages must be >= 1, got {npages}")
        self._check_all_in_memslots(gfn, npages)
        installed = 0
        self._last_populate_faults = 0  # prefetch faults made (for tests)
        root = self._kvm_mmu_load(0)
        cur, end = gfn, gfn + npages
        while cur < end:
            fault = _PageFault(
                gfn=cur, write=False, exec=False, prefetch=True, slot=self._gfn_to_memslot(cur)
            )
            ret = self._kvm_tdp_page_fault(root, fault)
            self._last_populate_faults += 1
            while ret == Ret.RETRY:  # pre-fault loops on RETRY; cannot happen single-threaded
                ret = self._kvm_tdp_page_fault(root, fault)
            if ret == Ret.FIXED:
                installed += 1
                self._charge(self.costs["fault_handling_ns"])
            level = fault.level or PG_LEVEL_4K
            cur = _round_down(cur, level) + pages_per_hpage(level)
        self._end_of_operation()
        return installed

    # -- zaps ----------------------------------------------------------------------------
    def zap_gfn_range(self, gfn: int, npages: int) -> int:
        """``kvm_zap_gfn_range``: zap leaves in all valid roots; one range flush if needed."""
        self._check_range(gfn, npages)
        flush, zapped = self._kvm_tdp_mmu_zap_leafs(gfn, gfn + npages)
        if flush:
            self._kvm_flush_remote_tlbs()  # kvm_flush_remote_tlbs_range
        self._end_of_operation()
        return zapped

    def mmu_notifier_invalidate(self, gfn: int, npages: int) -> int:
        """Host mm invalidation: ``kvm_tdp_mmu_unmap_gfn_range`` with the SHARED filter."""
        self._check_range(gfn, npages)
        flush, zapped = self._kvm_tdp_mmu_unmap_gfn_range(gfn, gfn + npages, KVM_DIRECT_ROOTS)
        if flush:
            self._kvm_flush_remote_tlbs()
        self._end_of_operation()
        return zapped

    def zap_all_fast(self) -> None:
        """``kvm_mmu_zap_all_fast``: obsolete every direct root and tear it down."""
        self._kvm_mmu_zap_all_fast()
        self._end_of_operation()

    # -- memslots ------------------------------------------------------------------------
    def add_memslot(
        self, gfn: int, npages: int, backing: int | str = 4096, gmem: bool = False
    ) -> int:
        backing_bytes = _backing_bytes(backing)
        if gmem:
            raise ValueError("gmem: a default VM cannot have guest_memfd memslots")
        self._check_range(gfn, npages)
        if npages < 1:
            raise ValueError(f"npages must be >= 1, got {npages}")
        step = backing_bytes >> PAGE_SHIFT
        if gfn % step or npages % step:
            raise ValueError(f"gfn and npages must be multiples of the backing page ({step} pages)")
        for slot in self._memslots.values():
            if gfn < slot.end and slot.gfn < gfn + npages:
                raise ValueError(f"memslot [{gfn:#x}, {gfn + npages:#x}) overlaps slot {slot.id}")
        slot_id = self._add_memslot(gfn, npages, backing_bytes, gmem=False)
        self._end_of_operation()
        return slot_id

    def delete_memslot(self, slot: int) -> None:
        if slot not in self._memslots:
            raise ValueError(f"slot: no memslot with id {slot!r}")
        memslot = self._memslots.pop(slot)
        self.memslot_generation += 2
        self._kvm_arch_flush_shadow_memslot(memslot)
        self._end_of_operation()

    def memslots(self) -> list[tuple[int, int, int, int, bool, int]]:
        """``(id, gfn, npages, backing bytes, gmem, host_pfn)`` per slot, by gfn."""
        return [s.as_tuple() for s in sorted(self._memslots.values(), key=lambda s: s.gfn)]

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
            for r in self._roots
        ]

    def walk(self, gfn: int, private: bool = False) -> list[tuple[int, int]]:
        """``(level, spte)`` from the root entry down to the first leaf or non-present entry.

        Uses the VM's valid direct root (all vCPUs share it); ``[]`` if there is none.
        """
        self._check_gfn(gfn, "gfn")
        self._check_private(private)
        root = self._valid_direct_root()
        if root is None:
            return []
        out: list[tuple[int, int]] = []
        sp = root
        while True:
            level = sp.level
            spte = sp.spt[spte_index(gfn, level)]
            out.append((level, spte))
            if not is_shadow_present_pte(spte) or is_last_spte(spte, level):
                return out
            sp = self._spte_to_child_sp(spte)

    def spte(self, gfn: int, private: bool = False) -> int:
        """The last entry of :meth:`walk`, or ``SHADOW_NONPRESENT_VALUE``."""
        path = self.walk(gfn, private)
        return path[-1][1] if path else SHADOW_NONPRESENT_VALUE

    def tables(self) -> list[list[int]]:
        """Copy of the arena: row *i* is the table at host pfn ``TABLE_BASE_PFN + i``."""
        return [list(t) for t in self._spt]

    def trace_events(self) -> list[Any]:
        return []

    # ==================================================================================
    # Argument checks (bad input leaves the VM unchanged)
    # ==================================================================================

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
        if private:
            raise ValueError(
                "private: a default VM has no private memory (use private=None or False)"
            )

    def _check_all_in_memslots(self, gfn: int, npages: int) -> None:
        cur, end = gfn, gfn + npages
        while cur < end:
            slot = self._gfn_to_memslot(cur)
            if slot is None:
                raise ValueError(f"gfn {cur:#x} (in [gfn, gfn+npages)) is not in any memslot")
            cur = slot.end

    # ==================================================================================
    # Bookkeeping: modeled time, counters, the arena and its grace period
    # ==================================================================================

    def _charge(self, ns: float) -> None:
        self._modeled_ns += ns
        self._op_ns += ns

    _op_ns = 0.0  # cost of the fault being handled (reset per fault)
    _last_populate_faults = 0

    def _count(self, name: str, delta: int = 1) -> None:
        self._stats[name] += delta

    def _kvm_update_page_stats(self, level: int, delta: int) -> None:
        self._count(_PAGES_STAT[level], delta)

    def _tdp_mmu_alloc_sp(self, role: int, gfn: int) -> MmuPage:
        """Take a table: the most recently freed reusable one, else the next new one."""
        if self._reusable:
            index = self._reusable.pop()
            spt = self._spt[index]
            spt[:] = [SHADOW_NONPRESENT_VALUE] * SPTE_ENT_PER_PAGE
        else:
            index = len(self._spt)
            spt = [SHADOW_NONPRESENT_VALUE] * SPTE_ENT_PER_PAGE
            self._spt.append(spt)
        sp = MmuPage(index=index, spt=spt, role=role, gfn=gfn)
        self._live[index] = sp
        return sp

    def _tdp_mmu_free_sp(self, sp: MmuPage) -> None:
        """Free after the grace period: reusable once the current operation ends."""
        del self._live[sp.index]
        self._deferred.append(sp.index)

    def _tdp_mmu_free_sp_unpublished(self, sp: MmuPage) -> None:
        """A table that never became visible (lost cmpxchg) is reusable at once."""
        del self._live[sp.index]
        self._reusable.append(sp.index)

    def _end_of_operation(self) -> None:
        """Quiescent point: deferred frees join the reusable stack in free order."""
        self._reusable.extend(self._deferred)
        self._deferred.clear()

    def _tdp_account_mmu_page(self, sp: MmuPage) -> None:
        self._count("tdp_mmu_pages")

    def _tdp_unaccount_mmu_page(self, sp: MmuPage) -> None:
        self._count("tdp_mmu_pages", -1)

    def _spte_to_child_sp(self, spte: int) -> MmuPage:
        index = spte_to_pfn(spte) - TABLE_BASE_PFN
        sp = self._live.get(index)
        if sp is None:
            raise InvariantError(
                f"non-leaf SPTE {spte:#x} points to pfn {spte_to_pfn(spte):#x}, not a live table"
            )
        return sp

    def _kvm_flush_remote_tlbs(self) -> None:
        """Every request flushes; cost grows with the number of vCPUs."""
        self._count("remote_tlb_flush_requests")
        self._count("remote_tlb_flush")
        self._charge(
            self.costs["tlb_flush_base_ns"] + self.costs["tlb_flush_per_vcpu_ns"] * self.vcpus
        )

    # ==================================================================================
    # Memslots
    # ==================================================================================

    def _add_memslot(self, gfn: int, npages: int, backing: int, gmem: bool) -> int:
        slot_id = self._next_slot_id
        self._next_slot_id += 1
        self._memslots[slot_id] = Memslot(slot_id, gfn, npages, backing, gmem, self._next_data_pfn)
        self._next_data_pfn += -(-npages // _DATA_PFN_ALIGN) * _DATA_PFN_ALIGN
        self.memslot_generation += 2  # two address spaces on x86
        return slot_id

    def _gfn_to_memslot(self, gfn: int) -> Memslot | None:
        for slot in self._memslots.values():
            if slot.contains(gfn):
                return slot
        return None

    def _kvm_arch_flush_shadow_memslot(self, slot: Memslot) -> None:
        """Memslot delete: fast zap (default VM + quirk) or a leaf zap of the slot."""
        if self.vm_type == "default" and self.slot_zap_all:
            self._kvm_mmu_zap_all_fast()
        else:
            # kvm_mmu_zap_memslot: PRIVATE|SHARED filter -> the direct roots (+ invalid ones).
            flush, _ = self._kvm_tdp_mmu_unmap_gfn_range(slot.gfn, slot.end, KVM_DIRECT_ROOTS)
            if flush:
                self._kvm_flush_remote_tlbs()  # kvm_flush_remote_tlbs_memslot
        # The host pages behind the slot go away with it (slot.touched is dropped).

    # ==================================================================================
    # Roots (spec §6)
    # ==================================================================================

    def _root_role(self, mirror: bool = False) -> int:
        return tdp_root_role(self.levels, is_mirror=mirror)

    def _valid_direct_root(self) -> MmuPage | None:
        for root in self._roots:
            if not root.invalid and not root.is_mirror:
                return root
        return None

    def _tdp_mmu_root_match(self, root: MmuPage, types: int) -> bool:
        if root.invalid:
            return bool(types & KVM_INVALID_ROOTS)
        return bool(types & (KVM_MIRROR_ROOTS if root.is_mirror else KVM_DIRECT_ROOTS))

    def _kvm_tdp_mmu_get_root(self, root: MmuPage) -> bool:
        if root.refcount == 0:
            return False
        root.refcount += 1
        return True

    def _kvm_tdp_mmu_put_root(self, root: MmuPage) -> None:
        if root.refcount <= 0:
            raise InvariantError(f"put of root pfn {root.pfn:#x} with refcount {root.refcount}")
        root.refcount -= 1
        if root.refcount:
            return
        if not root.invalid:
            raise InvariantError(f"root pfn {root.pfn:#x} reached refcount 0 while still valid")
        self._roots.remove(root)
        self._count("roots_freed")
        self._tdp_mmu_free_sp(root)

    def _kvm_tdp_mmu_alloc_root(self, mirror: bool = False) -> MmuPage:
        """Reuse a valid root with the identical role, else create one (refcount 2)."""
        role = self._root_role(mirror)
        for root in self._roots:
            if not root.invalid and root.role == role and self._kvm_tdp_mmu_get_root(root):
                return root
        root = self._tdp_mmu_alloc_sp(role, 0)
        root.refcount = 2  # this vCPU's reference + the TDP MMU's own
        self._roots.insert(0, root)
        self._count("roots_allocated")
        return root

    def _kvm_mmu_load(self, vcpu: int) -> MmuPage:
        """Give ``vcpu`` a root if it has none (first run, or after a fast zap)."""
        # Extension point (TDX): a mirrored VM also loads its mirror root here, first.
        root = self._vcpu_root[vcpu]
        if root is None:
            root = self._kvm_tdp_mmu_alloc_root(mirror=False)
            self._vcpu_root[vcpu] = root
        return root

    def _kvm_mmu_free_obsolete_roots(self) -> None:
        """KVM_REQ_MMU_FREE_OBSOLETE_ROOTS, handled right away for every vCPU."""
        for vcpu, root in enumerate(self._vcpu_root):
            if root is not None and root.invalid:
                self._vcpu_root[vcpu] = None
                self._kvm_tdp_mmu_put_root(root)

    def _kvm_tdp_mmu_invalidate_roots(self, types: int) -> None:
        for root in self._roots:
            if not root.invalid and self._tdp_mmu_root_match(root, types):
                root.role |= ROLE_INVALID
                root.scheduled_to_zap = True

    def _kvm_tdp_mmu_zap_invalidated_roots(self, shared: bool) -> None:
        for root in list(self._roots):
            if not root.scheduled_to_zap:
                continue
            root.scheduled_to_zap = False
            self._tdp_mmu_zap_root(root, shared)
            self._kvm_tdp_mmu_put_root(root)  # the TDP MMU's own reference

    def _kvm_mmu_zap_all_fast(self) -> None:
        # External page tables cannot be fast-zapped: only direct roots are obsoleted.
        self._kvm_tdp_mmu_invalidate_roots(KVM_DIRECT_ROOTS)
        self._kvm_mmu_free_obsolete_roots()
        self._kvm_tdp_mmu_zap_invalidated_roots(shared=True)

    # ==================================================================================
    # SPTE writers and change propagation (spec §4)
    # ==================================================================================

    def _tdp_mmu_set_spte_atomic(self, it: _TdpIter, new_spte: int) -> bool:
        """Shared-lock install: cmpxchg from ``it.old_spte``; False (= -EBUSY) if it lost."""
        if is_frozen_spte(it.old_spte):
            raise InvariantError("atomic SPTE update from a FROZEN snapshot")
        sp = it.sp
        if sp.is_mirror:
            # Extension point (TDX): freeze, call link/set_external_spte, then publish.
            raise NotImplementedError("mirror page tables are not modeled yet")
        if it.read() != it.old_spte:
            it.old_spte = it.read()
            return False
        it.write(new_spte)
        self._handle_changed_spte(it.gfn, it.old_spte, new_spte, it.level, shared=True)
        it.old_spte = new_spte
        return True

    def _tdp_mmu_iter_set_spte(self, it: _TdpIter, new_spte: int) -> None:
        """Exclusive-lock write (``tdp_mmu_set_spte``)."""
        if is_frozen_spte(it.old_spte) or is_frozen_spte(new_spte):
            raise InvariantError("exclusive SPTE write involving FROZEN_SPTE")
        old = it.read()
        it.write(new_spte)
        self._handle_changed_spte(it.gfn, old, new_spte, it.level, shared=False)
        if it.sp.is_mirror:
            # Extension point (TDX): remove_external_spte(gfn, old, level) for a leaf.
            raise NotImplementedError("mirror page tables are not modeled yet")
        it.old_spte = new_spte

    def _handle_changed_spte(self, gfn: int, old: int, new: int, level: int, shared: bool) -> None:
        """Bookkeeping after an SPTE changed: page stats and subtree teardown."""
        was_present = is_shadow_present_pte(old)
        is_present = is_shadow_present_pte(new)
        was_leaf = was_present and is_last_spte(old, level)
        is_leaf = is_present and is_last_spte(new, level)
        pfn_changed = spte_to_pfn(old) != spte_to_pfn(new)

        if not 1 <= level <= PT64_ROOT_MAX_LEVEL or gfn % pages_per_hpage(level):
            raise InvariantError(f"SPTE change at bad level/gfn ({level}, {gfn:#x})")
        if was_leaf and is_leaf and pfn_changed:
            raise InvariantError(f"present leaf at gfn {gfn:#x} changed pfn ({old:#x} -> {new:#x})")
        if old == new:
            return
        if not was_present and not is_present:
            if not (is_mmio_spte(old) or is_mmio_spte(new) or is_frozen_spte(new)):
                raise InvariantError(
                    f"non-present to non-present change at gfn {gfn:#x}: {old:#x} -> {new:#x}"
                )
            return
        if is_leaf != was_leaf:
            self._kvm_update_page_stats(level, 1 if is_leaf else -1)
        if was_present and not was_leaf and (is_leaf or not is_present or pfn_changed):
            self._handle_removed_pt(self._spte_to_child_sp(old), shared)

    def _handle_removed_pt(self, sp: MmuPage, shared: bool) -> None:
        """Tear down a table that was just unlinked; every entry ends FROZEN.

        Entries are processed in index order, recursing into child tables, so tables are
        freed in post-order (children before their parent).
        """
        level = sp.level
        self._tdp_unaccount_mmu_page(sp)
        for i in range(SPTE_ENT_PER_PAGE):
            gfn = sp.gfn + i * pages_per_hpage(level)
            old = sp.spt[i]
            if shared:
                # Exchange unconditionally; a FROZEN value would mean a concurrent
                # installer in this dying table, which the sequential model never has.
                if is_frozen_spte(old):
                    raise InvariantError(f"FROZEN entry in removed table pfn {sp.pfn:#x}")
                sp.spt[i] = FROZEN_SPTE
            else:
                if not is_shadow_present_pte(old):
                    continue
                sp.spt[i] = FROZEN_SPTE
            self._handle_changed_spte(gfn, old, FROZEN_SPTE, level, shared)
            # Extension point (TDX): for a mirror sp, remove_external_spte(gfn, old, level).
        # Extension point (TDX): for a mirror sp, free_external_spt(sp.gfn, level, ...).
        self._tdp_mmu_free_sp(sp)

    # ==================================================================================
    # The fault path (spec §3)
    # ==================================================================================

    def _vcpu_fault(self, vcpu: int, gfn: int, write: bool, exec: bool) -> ReferenceFault:
        """From the exit to the result: MMIO cache, then ``kvm_mmu_do_page_fault``."""
        self._op_ns = 0.0
        root = self._kvm_mmu_load(vcpu)
        self._charge(self.costs["exit_entry_ns"] + self.costs["fault_handling_ns"])

        slot = self._gfn_to_memslot(gfn)
        if slot is None:
            cached = self._handle_mmio_page_fault(root, gfn)
            if cached is not None:
                return ReferenceFault(Ret.EMULATE, PG_LEVEL_4K, 0, self._op_ns, cached, gfn, False)

        self._count("pf_taken")
        fault = _PageFault(gfn=gfn, write=write, exec=exec, prefetch=False, slot=slot)
        ret = self._kvm_tdp_page_fault(root, fault)
        counter = {
            Ret.FIXED: "pf_fixed",
            Ret.SPURIOUS: "pf_spurious",
            Ret.EMULATE: "pf_emulate",
            Ret.RETRY: "pf_retry",
            Ret.WRITE_PROTECTED: "pf_write_protected",
        }.get(ret)
        if counter:
            self._count(counter)
        return ReferenceFault(Ret(int(ret)), fault.level, 0, self._op_ns, fault.spte, gfn, False)

    def _handle_mmio_page_fault(self, root: MmuPage, gfn: int) -> int | None:
        """EPT misconfig on an MMIO SPTE of the current generation: emulate right away."""
        sp = root
        while True:
            level = sp.level
            spte = sp.spt[spte_index(gfn, level)]
            if not is_shadow_present_pte(spte) or is_last_spte(spte, level):
                break
            sp = self._spte_to_child_sp(spte)
        if (
            level == PG_LEVEL_4K
            and is_mmio_spte(spte)
            and mmio_spte_generation(spte) == (self.memslot_generation & MMIO_SPTE_GEN_MASK)
        ):
            return spte
        return None

    def _kvm_tdp_page_fault(self, root: MmuPage, fault: _PageFault) -> Any:
        """``kvm_tdp_mmu_page_fault``: pfn lookup, huge-page policy, then the map walk."""
        self._kvm_mmu_faultin_pfn(fault)
        self._kvm_mmu_hugepage_adjust(fault)
        return self._kvm_tdp_mmu_map(root, fault)

    def _kvm_mmu_faultin_pfn(self, fault: _PageFault) -> None:
        """Look up the backing page; the first touch allocates and zeroes it."""
        slot = fault.slot
        if slot is None:
            fault.max_level = PG_LEVEL_4K  # no-slot (MMIO) faults map at 4K
            return
        fault.max_level = slot.max_level
        # Extension point (SNP/gmem): a private fault would prepare the folio (RMPUPDATE).
        backing_page = (fault.gfn - slot.gfn) // slot.backing_pages
        if backing_page not in slot.touched:
            slot.touched.add(backing_page)
            self._count("host_pages_allocated")
            self._charge(
                self.costs["host_page_alloc_ns"]
                + self.costs["host_zero_4k_ns"] * (slot.backing_pages - 1)
            )

    def _kvm_mmu_hugepage_adjust(self, fault: _PageFault) -> None:
        fault.huge_page_disallowed = fault.exec and self.nx_huge_pages
        fault.req_level = fault.goal_level = PG_LEVEL_4K
        if fault.max_level == PG_LEVEL_4K or fault.slot is None:
            return
        fault.req_level = fault.max_level
        if not fault.huge_page_disallowed:
            fault.goal_level = fault.req_level

    def _disallowed_hugepage_adjust(self, fault: _PageFault, spte: int, cur_level: int) -> None:
        """Do not replace a table that exists because of an NX split with a huge leaf."""
        if (
            cur_level > PG_LEVEL_4K
            and cur_level == fault.goal_level
            and is_shadow_present_pte(spte)
            and not is_large_pte(spte)
            and self._spte_to_child_sp(spte).nx_huge_page_disallowed
        ):
            fault.goal_level -= 1

    def _kvm_tdp_mmu_map(self, root: MmuPage, fault: _PageFault) -> Any:
        """Walk towards ``fault.gfn``, linking or splitting tables down to the goal level."""
        for it in _TdpIter(self, root, PG_LEVEL_4K, fault.gfn, fault.gfn + 1):
            if self.nx_huge_pages:
                self._disallowed_hugepage_adjust(fault, it.old_spte, it.level)
            if is_frozen_spte(it.old_spte):
                return Ret.RETRY  # another thread is mid-update
            if it.level == fault.goal_level:
                return self._tdp_mmu_map_handle_target_level(fault, it)
            if is_shadow_present_pte(it.old_spte) and not is_large_pte(it.old_spte):
                continue  # existing table: step down into it

            sp = self._tdp_mmu_alloc_sp(self._child_role(it), it.gfn)  # tdp_mmu_init_child_sp
            sp.nx_huge_page_disallowed = fault.huge_page_disallowed
            if is_shadow_present_pte(it.old_spte):
                linked = self._tdp_mmu_split_huge_page(it, sp, shared=True)
            else:
                linked = self._tdp_mmu_link_sp(it, sp, shared=True)
            if not linked:
                self._tdp_mmu_free_sp_unpublished(sp)
                return Ret.RETRY
            # (NX tracking of sp on possible_nx_huge_pages would happen here.)
        return Ret.RETRY

    def _child_role(self, it: _TdpIter) -> int:
        parent = it.sp
        return (parent.role & ~ROLE_LEVEL_MASK) | (it.level - 1)

    def _tdp_mmu_link_sp(self, it: _TdpIter, sp: MmuPage, shared: bool) -> bool:
        """Publish ``sp`` in the entry under the iterator."""
        spte = make_nonleaf_spte(sp.pfn)
        if shared:
            if not self._tdp_mmu_set_spte_atomic(it, spte):
                return False
        else:
            self._tdp_mmu_iter_set_spte(it, spte)
        self._tdp_account_mmu_page(sp)
        return True

    def _tdp_mmu_split_huge_page(self, it: _TdpIter, sp: MmuPage, shared: bool) -> bool:
        """Replace the huge leaf under the iterator by a table of 512 equivalent SPTEs."""
        huge_spte = it.old_spte
        child_level = it.level - 1
        for i in range(SPTE_ENT_PER_PAGE):
            sp.spt[i] = make_small_spte(huge_spte, child_level, i, nx_huge_pages=self.nx_huge_pages)
        self._charge(self.costs["spte_update_ns"] * SPTE_ENT_PER_PAGE)
        if not self._tdp_mmu_link_sp(it, sp, shared):
            return False
        self._kvm_update_page_stats(child_level, SPTE_ENT_PER_PAGE)
        self._count("huge_page_splits")
        return True  # no TLB flush: the translation did not change

    def _is_access_allowed(self, fault: _PageFault, spte: int) -> bool:
        if fault.exec:
            return bool(spte & SPTE_EXECUTABLE)
        if fault.write:
            return bool(spte & SPTE_WRITABLE)
        return True

    def _make_spte(self, fault: _PageFault, gfn: int, level: int) -> int:
        slot = fault.slot
        assert slot is not None
        exec_ok = not (self.nx_huge_pages and level > PG_LEVEL_4K)
        return make_leaf_spte(slot.pfn(gfn), level, exec=exec_ok, prefetch=fault.prefetch)

    def _tdp_mmu_map_handle_target_level(self, fault: _PageFault, it: _TdpIter) -> Any:
        old = it.old_spte
        if (
            is_shadow_present_pte(old)
            and (fault.prefetch or self._is_access_allowed(fault, old))
            and is_last_spte(old, it.level)
        ):
            fault.level, fault.spte = it.level, old
            return Ret.SPURIOUS

        if fault.slot is None:
            new = make_mmio_spte(it.gfn, self.memslot_generation)
        else:
            new = self._make_spte(fault, it.gfn, it.level)

        ret = Ret.FIXED
        if new == old:
            ret = Ret.SPURIOUS
        elif not self._tdp_mmu_set_spte_atomic(it, new):
            return Ret.RETRY
        elif is_shadow_present_pte(old) and (
            not is_last_spte(old, it.level)
            or (old & SPTE_MMU_WRITABLE and not new & SPTE_MMU_WRITABLE)
        ):
            self._kvm_flush_remote_tlbs()  # kvm_flush_remote_tlbs_gfn(gfn, level)

        fault.level, fault.spte = it.level, new
        if is_mmio_spte(new):
            if ret == Ret.FIXED:
                self._count("pf_mmio_spte_created")
            return Ret.EMULATE
        return ret

    # ==================================================================================
    # Zapping (spec §5)
    # ==================================================================================

    def _roots_matching(self, types: int) -> list[MmuPage]:
        return [r for r in self._roots if self._tdp_mmu_root_match(r, types)]

    def _tdp_mmu_zap_leafs(self, root: MmuPage, start: int, end: int) -> tuple[bool, int]:
        """Zap present leaves intersecting ``[start, end)``; tables stay in place."""
        end = min(end, self.max_gfn)
        flush, zapped = False, 0
        for it in _TdpIter(self, root, PG_LEVEL_4K, start, end):
            if not is_shadow_present_pte(it.old_spte) or not is_last_spte(it.old_spte, it.level):
                continue
            self._tdp_mmu_iter_set_spte(it, SHADOW_NONPRESENT_VALUE)
            self._charge(self.costs["spte_update_ns"])
            zapped += 1
            if not root.invalid:  # stale translations in an invalid root are harmless
                flush = True
        return flush, zapped

    def _kvm_tdp_mmu_zap_leafs(self, start: int, end: int) -> tuple[bool, int]:
        flush, zapped = False, 0
        for root in self._roots_matching(KVM_VALID_ROOTS):
            f, n = self._tdp_mmu_zap_leafs(root, start, end)
            flush, zapped = flush or f, zapped + n
        return flush, zapped

    def _kvm_tdp_mmu_unmap_gfn_range(self, start: int, end: int, types: int) -> tuple[bool, int]:
        """Leaf zap over the roots a gfn-range filter selects, always plus invalid ones."""
        flush, zapped = False, 0
        for root in self._roots_matching(types | KVM_INVALID_ROOTS):
            f, n = self._tdp_mmu_zap_leafs(root, start, end)
            flush, zapped = flush or f, zapped + n
        return flush, zapped

    def _tdp_mmu_zap_root(self, root: MmuPage, shared: bool) -> None:
        """Zap a whole root, finest level first so each pass frees little at a time."""
        for zap_level in (PG_LEVEL_4K, PG_LEVEL_2M, PG_LEVEL_1G, root.level):
            self._tdp_mmu_zap_root_level(root, shared, zap_level)

    def _tdp_mmu_zap_root_level(self, root: MmuPage, shared: bool, zap_level: int) -> None:
        """One pass of KVM's ``__tdp_mmu_zap_root``: zap present entries at ``zap_level``."""
        end = 1 << (SPTE_LEVEL_BITS * root.level)
        for it in _TdpIter(self, root, zap_level, 0, end):
            if not is_shadow_present_pte(it.old_spte) or it.level > zap_level:
                continue
            if shared:
                while not self._tdp_mmu_set_spte_atomic(it, SHADOW_NONPRESENT_VALUE):
                    pass
            else:
                self._tdp_mmu_iter_set_spte(it, SHADOW_NONPRESENT_VALUE)
            self._charge(self.costs["spte_update_ns"])

    # ==================================================================================
    # Invariants
    # ==================================================================================

    def check(self) -> None:
        """Raise :class:`InvariantError` if the model's state is inconsistent."""

        def fail(msg: str) -> None:
            raise InvariantError(msg)

        # Arena: every table is exactly one of live / deferred / reusable.
        if self._deferred:
            fail(f"deferred frees left over after an operation: {self._deferred}")
        if len(set(self._reusable)) != len(self._reusable):
            fail("a table is on the reusable stack twice")
        if set(self._reusable) & set(self._live):
            fail("a live table is also on the reusable stack")
        if len(self._reusable) + len(self._live) != len(self._spt):
            fail("arena tables lost: live + reusable != allocated")

        # Roots and references.
        refs: dict[int, int] = {}
        for root in self._vcpu_root:
            if root is not None:
                if root not in self._roots:
                    fail(f"a vCPU holds root pfn {root.pfn:#x}, which is not on the root list")
                if root.invalid:
                    fail(f"a vCPU still holds invalid root pfn {root.pfn:#x}")
                refs[root.index] = refs.get(root.index, 0) + 1
        valid_roles: set[int] = set()
        for root in self._roots:
            if self._live.get(root.index) is not root:
                fail(f"root pfn {root.pfn:#x} is not a live table")
            if root.level != self.levels:
                fail(f"root pfn {root.pfn:#x} has level {root.level}")
            expected = refs.get(root.index, 0) + (
                0 if root.invalid and not root.scheduled_to_zap else 1
            )
            if root.refcount != expected or root.refcount <= 0:
                fail(f"root pfn {root.pfn:#x} refcount {root.refcount}, expected {expected}")
            if not root.invalid:
                if root.role in valid_roles:
                    fail("two valid roots with the same role")
                valid_roles.add(root.role)

        # Tables reachable from the roots.
        leaves = dict.fromkeys(_PAGES_STAT.values(), 0)
        seen: set[int] = set()
        non_root_tables = 0
        slots = list(self._memslots.values())

        def visit(sp: MmuPage) -> None:
            nonlocal non_root_tables
            level = sp.level
            for i, spte in enumerate(sp.spt):
                gfn = sp.gfn + i * pages_per_hpage(level)
                if is_frozen_spte(spte):
                    fail(f"FROZEN_SPTE at rest in table pfn {sp.pfn:#x}[{i}]")
                if not is_shadow_present_pte(spte):
                    if spte != SHADOW_NONPRESENT_VALUE and not (
                        level == PG_LEVEL_4K and is_mmio_spte(spte)
                    ):
                        fail(f"odd non-present SPTE {spte:#x} at level {level} gfn {gfn:#x}")
                    continue
                if is_last_spte(spte, level):
                    self._check_leaf(spte, level, gfn, slots, fail)
                    leaves[_PAGES_STAT[level]] += 1
                    continue
                if spte & ~SPTE_BASE_ADDR_MASK != _NONLEAF_BITS:
                    fail(f"malformed non-leaf SPTE {spte:#x} at level {level} gfn {gfn:#x}")
                child = self._live.get(spte_to_pfn(spte) - TABLE_BASE_PFN)
                if child is None:
                    fail(f"non-leaf {spte:#x} at level {level} gfn {gfn:#x} points to a dead table")
                    return
                if child.index in seen:
                    fail(f"table pfn {child.pfn:#x} is linked twice")
                if child.level != level - 1 or child.gfn != gfn:
                    fail(
                        f"table pfn {child.pfn:#x} has level {child.level}/gfn {child.gfn:#x}, "
                        f"linked at level {level} gfn {gfn:#x}"
                    )
                if (
                    child.role & ~ROLE_LEVEL_MASK & ~ROLE_INVALID
                    != sp.role & ~ROLE_LEVEL_MASK & ~ROLE_INVALID
                ):
                    fail(f"table pfn {child.pfn:#x} role {child.role:#x} differs from its parent's")
                seen.add(child.index)
                non_root_tables += 1
                visit(child)

        for root in self._roots:
            seen.add(root.index)
            visit(root)

        if len(seen) != len(self._live):
            fail(f"{len(self._live) - len(seen)} live tables are not reachable from any root")
        for name, count in leaves.items():
            if self._stats[name] != count:
                fail(f"{name} = {self._stats[name]} but {count} present leaves are mapped")
        if self._stats["tdp_mmu_pages"] != non_root_tables:
            fail(
                f"tdp_mmu_pages = {self._stats['tdp_mmu_pages']}"
                f" but {non_root_tables} tables are linked"
            )
        if self._stats["roots_allocated"] - self._stats["roots_freed"] != len(self._roots):
            fail("roots_allocated - roots_freed != number of roots")
        if self._stats["host_pages_allocated"] < 0:
            fail("negative host_pages_allocated")

    def _check_leaf(self, spte: int, level: int, gfn: int, slots: list[Memslot], fail: Any) -> None:
        if level > PG_LEVEL_1G:
            fail(f"leaf at level {level} (gfn {gfn:#x})")
        end = gfn + pages_per_hpage(level)
        slot = next((s for s in slots if s.contains(gfn)), None)
        if slot is None or end > slot.end:
            fail(f"leaf {spte:#x} at level {level} gfn {gfn:#x} is not inside one memslot")
            return
        if level > slot.max_level:
            fail(f"level-{level} leaf at gfn {gfn:#x} in a slot backed by {slot.backing} bytes")
        pfn = slot.pfn(gfn)
        allowed = {
            make_leaf_spte(pfn, level, exec=x, prefetch=p)
            for x in (True, False)
            for p in (True, False)
        }
        if spte not in allowed:
            fail(
                f"leaf {spte:#x} at level {level} gfn {gfn:#x} is not a valid leaf for pfn {pfn:#x}"
            )
