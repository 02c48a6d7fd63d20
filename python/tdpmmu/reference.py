"""A readable, pure-Python reference model of tdpmmu's VMs.

This module re-implements the semantics pinned down in ``docs/model.md`` (which in turn
follows ``shared/spec/kvm-tdp-mmu.md``) with nothing but the standard library.  It is slow
on purpose: every SPTE lives in a plain Python list and every step of KVM's fault and zap
paths is a named method, so it can be read side by side with ``arch/x86/kvm/mmu/tdp_mmu.c``.
The differential test (``tests/test_differential.py``) runs it next to the native engine and
demands that both agree SPTE for SPTE, counter for counter.

All four VM types are modeled:

* ``default``: one direct root per role, shared memory only.
* ``tdx``: a mirror root for private memory next to the direct (shared) root, the external
  page-table hooks (``link_external_spt`` ...) as ``tdx.c`` implements them on top of a model of
  the TDX module (its own S-EPT tree with per-entry states, SEAMCALLs counted by leaf name),
  the TD lifecycle (initial image, ``finalize``, teardown in KVM's order) and the options of
  ``docs/model.md`` (kernel 6.16/6.19, per-page or batched TLB tracking, four- or two-hook
  interface, upstream teardown or pre-upstream ``TDH.MEM.SEPT.REMOVE``).
* ``snp``: one direct root; guest_memfd pages have Reverse Map Table entries that
  ``sev_gmem_prepare``/``sev_gmem_invalidate`` (hook design ``gmem``) or every private NPT
  change (design ``private``) update with RMPUPDATE/PSMASH; the guest PVALIDATEs what it gets.
* ``sw_protected``: private memory from guest_memfd and nothing else, or (``mirror=True``) the
  TDX-shaped mirror root with a software external tree and no SEAMCALLs.

Not modeled: contention (the ``TDH.*`` busy probabilities must be 0, so no ``-EBUSY`` and no
TDX local retries happen), user hook objects, and ``trace_events``.

Names follow KVM: a method called ``_tdp_mmu_link_sp`` does what ``tdp_mmu_link_sp`` does,
``tdx_sept_set_private_spte`` what tdx.c's function of that name does, ``tdh_mem_page_aug`` is
the SEAMCALL leaf TDH.MEM.PAGE.AUG.  The prose is ours; nothing here is copied from the kernel.
"""

from __future__ import annotations

import bisect
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
    "PrivateRanges",
    "ReferenceFault",
    "ReferenceVM",
    "Ret",
    "Rmp",
    "TdxModule",
    "TdxOptions",
    "VmBugged",
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
    from ._core import VmBugged as _VmBugged
except ImportError:  # pragma: no cover

    class _InvariantError(Exception):  # type: ignore[no-redef]
        """An invariant of the MMU model does not hold (KVM would WARN or BUG)."""

    class _ConfigError(ValueError):  # type: ignore[no-redef]
        """Bad VM configuration."""

    class _VmBugged(Exception):  # type: ignore[no-redef]
        """A KVM_BUG_ON fired: the VM refuses every further operation."""


InvariantError = _InvariantError
ConfigError = _ConfigError
VmBugged = _VmBugged


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
# Costs (docs/model.md "Default costs"; the fields of tdpmmu.CostModel)
# --------------------------------------------------------------------------------------

DEFAULT_COSTS: dict[str, float] = {
    "exit_entry_ns": 1200.0,
    "fault_handling_ns": 2000.0,
    "host_page_alloc_ns": 7500.0,
    "host_zero_4k_ns": 1000.0,
    "tlb_flush_base_ns": 1000.0,
    "tlb_flush_per_vcpu_ns": 200.0,
    "spte_update_ns": 60.0,
    # TDX
    "td_exit_entry_ns": 2000.0,
    "tdh_mem_sept_add_ns": 1000.0,
    "tdh_mem_page_aug_ns": 1000.0,
    "tdh_mem_page_add_ns": 1000.0,
    "tdh_mr_extend_ns": 200.0,
    "tdg_mem_page_accept_ns": 200.0,
    "tdh_mem_range_block_ns": 2000.0,
    "tdh_mem_track_ns": 2000.0,
    "kick_base_ns": 3000.0,
    "kick_per_vcpu_ns": 500.0,
    "tdh_mem_page_remove_ns": 2000.0,
    "tdh_phymem_page_wbinvd_ns": 4000.0,
    "page_clear_ns": 1000.0,
    "tdh_phymem_page_reclaim_ns": 4000.0,
    "tdh_mem_sept_remove_ns": 2000.0,
    "tdh_vp_flush_ns": 1000.0,
    "tdh_mng_vpflushdone_ns": 1000.0,
    "tdh_phymem_cache_wb_ns": 100000.0,
    "tdh_mng_key_freeid_ns": 1000.0,
    # SEV-SNP and guest_memfd
    "rmpupdate_ns": 1000.0,
    "psmash_ns": 1000.0,
    "pvalidate_ns": 500.0,
    "psc_exit_ns": 2000.0,
    "gmem_convert_ns": 107.0,
    "gmem_split_2m_ns": 10700.0,
}

#: SEAMCALL (and guest TDCALL) leaves, counted under these names.
SEAMCALL_LEAVES: tuple[str, ...] = (
    "TDH.MEM.SEPT.ADD",
    "TDH.MEM.PAGE.AUG",
    "TDH.MEM.PAGE.ADD",
    "TDH.MR.EXTEND",
    "TDH.MEM.RANGE.BLOCK",
    "TDH.MEM.TRACK",
    "TDH.MEM.PAGE.REMOVE",
    "TDH.PHYMEM.PAGE.WBINVD",
    "TDH.PHYMEM.PAGE.RECLAIM",
    "TDH.MEM.SEPT.REMOVE",
    "TDH.VP.FLUSH",
    "TDH.MNG.VPFLUSHDONE",
    "TDH.PHYMEM.CACHE.WB",
    "TDH.MNG.KEY.FREEID",
    "TDG.MEM.PAGE.ACCEPT",
)

#: counters kept by the reference, with the meanings of docs/model.md (the engine's names).
COUNTER_NAMES: tuple[str, ...] = (
    "pf_taken",
    "pf_fixed",
    "pf_spurious",
    "pf_emulate",
    "pf_retry",
    "pf_write_protected",
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
    elif hasattr(costs, "to_dict"):
        items = costs.to_dict()
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
# VM types, hook designs and options
# --------------------------------------------------------------------------------------

VM_TYPES = ("default", "tdx", "snp", "sw_protected")

#: the hook design a VM type uses when ``hooks=None`` (upstream behaviour).
DEFAULT_HOOKS = {"default": "none", "tdx": "mirror", "snp": "gmem", "sw_protected": "none"}

#: which external-hook design each VM type accepts (sw_protected: by its ``mirror`` option).
_ALLOWED_HOOKS = {
    ("default", False): ("none",),
    ("tdx", False): ("mirror", "private"),
    ("snp", False): ("gmem", "private"),
    ("sw_protected", False): ("none",),
    ("sw_protected", True): ("mirror", "private"),
}

_BUSY_LEAVES = (
    "TDH.MEM.SEPT.ADD",
    "TDH.MEM.PAGE.AUG",
    "TDH.MEM.RANGE.BLOCK",
    "TDH.MEM.TRACK",
    "TDH.MEM.PAGE.REMOVE",
)


@dataclasses.dataclass(frozen=True)
class TdxOptions:
    """The ``tdx={...}`` options of docs/model.md (busy injection is not modeled)."""

    version: str = "6.19"  # "6.16": set_external_spte only counts nr_premapped
    sept_free: str = "teardown"  # or "sept_remove" (pre-upstream)
    track: str = "per_page"  # or "batched"
    interface: str = "four_hook"  # or "two_hook"
    measure: bool = False  # TDH.MR.EXTEND x 16 per PAGE.ADD

    @property
    def v6_16(self) -> bool:
        return self.version == "6.16"

    @classmethod
    def parse(cls, options: Mapping[str, Any] | None) -> TdxOptions:
        allowed = {
            "version": ("6.16", "6.19"),
            "sept_free": ("teardown", "sept_remove"),
            "track": ("per_page", "batched"),
            "interface": ("four_hook", "two_hook"),
        }
        values: dict[str, Any] = {}
        for key, value in (options or {}).items():
            text = ("true" if value else "false") if isinstance(value, bool) else str(value)
            if key in allowed:
                if text not in allowed[key]:
                    raise ConfigError(f"{key}: {text!r} is not allowed; allowed: {allowed[key]}")
                values[key] = text
            elif key == "measure":
                if text not in ("true", "True", "1", "false", "False", "0"):
                    raise ConfigError(f"measure: {text!r} is not a bool")
                values[key] = text in ("true", "True", "1")
            elif key in _BUSY_LEAVES:
                if float(text) != 0.0:
                    raise ConfigError(
                        f"{key}: the reference model does not inject TDX_OPERAND_BUSY"
                    )
            else:
                raise ConfigError(f"tdx: unknown option {key!r}")
        return cls(**values)


# --------------------------------------------------------------------------------------
# Memory attributes (KVM_SET_MEMORY_ATTRIBUTES): which gfns are private
# --------------------------------------------------------------------------------------


class PrivateRanges:
    """Disjoint, non-touching ``[start, end)`` ranges of private gfns, sorted by start."""

    def __init__(self) -> None:
        self._ranges: list[tuple[int, int]] = []

    def ranges(self) -> list[tuple[int, int]]:
        return list(self._ranges)

    def _covering(self, gfn: int) -> tuple[int, int] | None:
        i = bisect.bisect_right(self._ranges, (gfn, 1 << 64)) - 1
        if i >= 0 and self._ranges[i][0] <= gfn < self._ranges[i][1]:
            return self._ranges[i]
        return None

    def is_private(self, gfn: int) -> bool:
        return self._covering(gfn) is not None

    def uniform(self, start: int, end: int) -> bool | None:
        """The attribute of every gfn in ``[start, end)``, or None if it is mixed."""
        cover = self._covering(start)
        if cover is not None:
            return True if end <= cover[1] else None
        return None if any(start <= s < end for s, _ in self._ranges) else False

    def set(self, start: int, end: int, private: bool) -> None:
        kept: list[tuple[int, int]] = []
        for s, e in self._ranges:
            if e <= start or s >= end:
                kept.append((s, e))
                continue
            if s < start:
                kept.append((s, start))
            if e > end:
                kept.append((end, e))
        if private:
            kept.append((start, end))
        kept.sort()
        merged: list[tuple[int, int]] = []
        for s, e in kept:
            if merged and merged[-1][1] == s:
                merged[-1] = (merged[-1][0], e)
            else:
                merged.append((s, e))
        self._ranges = merged


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
    gmem_pfn: int = 0  # first guest_memfd pfn (a separate host range), 0 without guest_memfd
    rmp: Rmp | None = None  # SEV-SNP: the RMP entries of the guest_memfd pages
    touched: set[int] = dataclasses.field(default_factory=set)  # backing pages allocated
    gmem_touched: set[int] = dataclasses.field(default_factory=set)  # guest_memfd pages

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
        """Host pfn of the shared (host-mapped) page behind ``gfn``."""
        return self.host_pfn + (gfn - self.gfn)

    def private_pfn(self, gfn: int) -> int:
        """Host pfn of the guest_memfd page behind ``gfn``."""
        return self.gmem_pfn + (gfn - self.gfn)

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
    """``struct kvm_page_fault``: the parts the model needs."""

    gfn: int
    write: bool
    exec: bool
    prefetch: bool
    slot: Memslot | None
    private: bool = False
    max_level: int = PG_LEVEL_1G
    req_level: int = PG_LEVEL_4K
    goal_level: int = PG_LEVEL_4K
    huge_page_disallowed: bool = False
    # Filled at the target level, for the caller's Fault result.
    level: int = PG_LEVEL_4K
    spte: int = SHADOW_NONPRESENT_VALUE


class _TdpIter:
    """``struct tdp_iter``: pre-order walk of one root over ``[start, end)``.

    Mirrors tdp_iter.c: the walk re-reads an entry before descending into it, never
    enters a non-present (or frozen) entry, steps sideways within a table until index 511,
    then climbs.  ``old_spte`` is the snapshot taken on arrival at ``sptep``.  ``gfn_bits``
    (the TDX shared bit, for the direct root of a TD) only enters the table index: ``gfn``
    stays un-aliased, and a walk that starts at an already-aliased gfn yields nothing.
    """

    def __init__(
        self,
        vm: ReferenceVM,
        root: MmuPage,
        min_level: int,
        start: int,
        end: int,
        gfn_bits: int = 0,
    ):
        self._vm = vm
        self.root_level = root.level
        self.min_level = min_level
        self.end = end
        self.gfn_bits = gfn_bits
        self.next_last_level_gfn = start
        self.pt_path: dict[int, MmuPage] = {root.level: root}
        self.level = root.level
        self.gfn = 0
        self.old_spte = SHADOW_NONPRESENT_VALUE
        self.valid = False
        if gfn_bits and start >= gfn_bits:
            return
        self._restart()

    # -- position helpers ---------------------------------------------------------------
    @property
    def sp(self) -> MmuPage:
        """The table holding the current entry."""
        return self.pt_path[self.level]

    @property
    def index(self) -> int:
        return spte_index(self.gfn | self.gfn_bits, self.level)

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
# SEV-SNP: the Reverse Map Table and the instructions that change it
# --------------------------------------------------------------------------------------

RMP_SUCCESS = "SUCCESS"
RMP_FAIL_INPUT = "FAIL_INPUT"
RMP_FAIL_PERMISSION = "FAIL_PERMISSION"
RMP_FAIL_OVERLAP = "FAIL_OVERLAP"
RMP_FAIL_SIZEMISMATCH = "FAIL_SIZEMISMATCH"
RMP_NO_UPDATE = "NO_UPDATE"  # PVALIDATE found the page already in the requested state


@dataclasses.dataclass(frozen=True)
class RmpEntry:
    """One RMP entry: owner (assigned = guest-private), page size, gpa, validated."""

    assigned: bool = False
    validated: bool = False
    size_2m: bool = False
    gfn: int = 0


_RMP_SHARED = RmpEntry()


class Rmp:
    """The RMP entries of one guest_memfd memslot, by page offset in the slot.

    The instructions take the VM to count and charge what they cost; a failed one returns
    its architectural status and changes nothing.
    """

    def __init__(self, npages: int) -> None:
        self.npages = npages
        self._entries: dict[int, RmpEntry] = {}  # only entries that are not all-zero

    def get(self, off: int) -> RmpEntry:
        return self._entries.get(off, _RMP_SHARED)

    def _put(self, off: int, entry: RmpEntry) -> None:
        if entry == _RMP_SHARED:
            self._entries.pop(off, None)
        else:
            self._entries[off] = entry

    def level(self, off: int) -> int:
        """``sev_private_max_mapping_level``: the entry's page size, 4K if unassigned."""
        e = self.get(off)
        return PG_LEVEL_2M if e.assigned and e.size_2m else PG_LEVEL_4K

    def assigned_offsets(self) -> list[int]:
        return sorted(off for off, e in self._entries.items() if e.assigned)

    def rmpupdate(self, vm: ReferenceVM, off: int, gfn: int, private: bool, size_2m: bool) -> str:
        """RMPUPDATE: make ``[off, off + 1 or 512)`` private to the guest at ``gfn``, or shared."""
        vm._count("rmpupdate")
        vm._charge(vm.costs["rmpupdate_ns"])
        status = self._rmpupdate(off, gfn, private, size_2m)
        if status != RMP_SUCCESS:
            vm._count("rmp_failures")
        return status

    def _rmpupdate(self, off: int, gfn: int, private: bool, size_2m: bool) -> str:
        n = SPTE_ENT_PER_PAGE if size_2m else 1
        if (size_2m and (off % 512 or gfn % 512)) or off + n > self.npages:
            return RMP_FAIL_INPUT
        head = self.get(off & ~511) if (off & ~511) < self.npages else _RMP_SHARED
        if not size_2m and head.assigned and head.size_2m:
            return RMP_FAIL_SIZEMISMATCH
        if private and size_2m and any(self.get(off + i).assigned for i in range(n)):
            return RMP_FAIL_OVERLAP
        if private and not size_2m and self.get(off).assigned:
            return RMP_FAIL_PERMISSION
        for i in range(n):
            self._put(off + i, RmpEntry(True, False, size_2m, gfn + i) if private else _RMP_SHARED)
        return RMP_SUCCESS

    def psmash(self, vm: ReferenceVM, off: int) -> str:
        """PSMASH: split the assigned 2M entry covering ``off`` into 512 4K entries."""
        vm._count("psmash")
        vm._charge(vm.costs["psmash_ns"])
        head = off & ~511
        e = self.get(head)
        if not (e.assigned and e.size_2m):
            vm._count("rmp_failures")
            return RMP_FAIL_PERMISSION
        for i in range(SPTE_ENT_PER_PAGE):
            self._put(head + i, dataclasses.replace(self.get(head + i), size_2m=False))
        return RMP_SUCCESS

    def pvalidate(self, vm: ReferenceVM, off: int, gfn: int, size_2m: bool, validate: bool) -> str:
        """The guest's PVALIDATE of the 4K or 2M page at ``off`` (expected at ``gfn``)."""
        vm._count("pvalidate")
        vm._charge(vm.costs["pvalidate_ns"])
        e = self.get(off)
        if not e.assigned or e.gfn != gfn:
            status = RMP_FAIL_PERMISSION
        elif e.size_2m != size_2m:
            status = RMP_FAIL_SIZEMISMATCH
        elif e.validated == validate:
            status = RMP_NO_UPDATE
        else:
            for i in range(SPTE_ENT_PER_PAGE if size_2m else 1):
                self._put(off + i, dataclasses.replace(self.get(off + i), validated=validate))
            status = RMP_SUCCESS
        if status != RMP_SUCCESS:
            vm._count("pvalidate_errors")
        return status


# --------------------------------------------------------------------------------------
# TDX: the TDX module (its S-EPT tree and SEAMCALL leaves)
# --------------------------------------------------------------------------------------

TDX_SUCCESS = "TDX_SUCCESS"
TDX_OPERAND_BUSY = "TDX_OPERAND_BUSY"
TDX_EPT_WALK_FAILED = "TDX_EPT_WALK_FAILED"
TDX_EPT_ENTRY_STATE_INCORRECT = "TDX_EPT_ENTRY_STATE_INCORRECT"
TDX_TLB_TRACKING_NOT_DONE = "TDX_TLB_TRACKING_NOT_DONE"
TDX_OP_STATE_INCORRECT = "TDX_OP_STATE_INCORRECT"

#: S-EPT entry states (FREE is ``None``); BLOCKED entries remember the TLB epoch.
SEPT_TABLE, SEPT_MAPPED, SEPT_PENDING = "TABLE", "MAPPED", "PENDING"
SEPT_BLOCKED, SEPT_BLOCKED_TABLE = "BLOCKED", "BLOCKED_TABLE"
_EPOCH_MASK = 0x7FF


@dataclasses.dataclass(frozen=True)
class SeptEntry:
    state: str
    pfn: int  # the mapped page, or the S-EPT table's host pfn
    epoch: int = 0  # TLB epoch in which the entry was blocked


class TdxModule:
    """The TDX module as far as private memory goes.

    It keeps the TD's state (finalized, HKID, TLB epoch) and its own S-EPT tree, in a page
    arena of its own (table *i* at host pfn ``TABLE_BASE_PFN + i``; index 0 is the S-EPT
    root, which belongs to the TD and is never freed).  Every SEAMCALL checks its
    preconditions and answers with a status instead of trusting KVM.  ``software=True`` is
    the SW_PROTECTED mirror backend: the same tree, runnable from the start, and no
    SEAMCALLs (nothing counted or charged).
    """

    def __init__(self, vm: ReferenceVM, software: bool) -> None:
        self._vm = vm
        self.levels = vm.levels
        self.software = software
        self._tables: list[list[SeptEntry | None]] = []
        self._reusable: list[int] = []
        self.root = self._alloc_table()
        self.finalized = software
        self.hkid_assigned = True
        self.epoch = 1
        self.kicked_epoch = 0  # epoch at which every vCPU last left the guest
        self.nr_premapped = 0  # v6.16: mapped before finalize, PAGE.ADD still to come

    # -- the module's page arena ---------------------------------------------------------
    def _alloc_table(self) -> int:
        if self._reusable:
            index = self._reusable.pop()
            self._tables[index] = [None] * SPTE_ENT_PER_PAGE
        else:
            index = len(self._tables)
            self._tables.append([None] * SPTE_ENT_PER_PAGE)
        return index

    def _free_table(self, index: int) -> None:
        self._reusable.append(index)

    def _seamcall(self, leaf: str, cost: str, status: str) -> str:
        if not self.software:
            self._vm._count(leaf)
            self._vm._charge(self._vm.costs[cost])
            if status == TDX_OPERAND_BUSY:
                self._vm._count("seamcall_busy")
        return status

    def _sept_walk(self, gfn: int, level: int) -> tuple[list[SeptEntry | None], int] | str:
        """The S-EPT table and index of ``gfn``'s entry at ``level``, or EPT_WALK_FAILED."""
        table = self._tables[self.root]
        for lv in range(self.levels, level, -1):
            e = table[spte_index(gfn, lv)]
            if e is None or e.state != SEPT_TABLE:
                return TDX_EPT_WALK_FAILED
            table = self._tables[e.pfn - TABLE_BASE_PFN]
        return table, spte_index(gfn, level)

    # -- SEAMCALL leaves -----------------------------------------------------------------
    def tdh_mem_sept_add(self, gfn: int, level: int) -> str:
        """Link a new S-EPT table under the (FREE) entry at ``level``."""
        leaf, cost = "TDH.MEM.SEPT.ADD", "tdh_mem_sept_add_ns"
        if not self.hkid_assigned:
            return self._seamcall(leaf, cost, TDX_OP_STATE_INCORRECT)
        where = self._sept_walk(gfn, level)
        if isinstance(where, str):
            return self._seamcall(leaf, cost, where)
        table, i = where
        if table[i] is not None:
            return self._seamcall(leaf, cost, TDX_EPT_ENTRY_STATE_INCORRECT)
        table[i] = SeptEntry(SEPT_TABLE, TABLE_BASE_PFN + self._alloc_table())
        self._vm._count("sept_tables")
        return self._seamcall(leaf, cost, TDX_SUCCESS)

    def tdh_mem_page_aug(self, gfn: int, pfn: int) -> str:
        """Runtime: add a 4K page PENDING (the guest accepts it)."""
        return self._leaf_install(gfn, pfn, aug=True)

    def tdh_mem_page_add(self, gfn: int, pfn: int) -> str:
        """Initial image (before finalize): add a 4K page MAPPED, measured if asked."""
        return self._leaf_install(gfn, pfn, aug=False)

    def _leaf_install(self, gfn: int, pfn: int, aug: bool) -> str:
        leaf, cost = (
            ("TDH.MEM.PAGE.AUG", "tdh_mem_page_aug_ns")
            if aug
            else ("TDH.MEM.PAGE.ADD", "tdh_mem_page_add_ns")
        )
        if not self.hkid_assigned or self.finalized != aug:
            return self._seamcall(leaf, cost, TDX_OP_STATE_INCORRECT)
        where = self._sept_walk(gfn, PG_LEVEL_4K)
        if isinstance(where, str):
            return self._seamcall(leaf, cost, where)
        table, i = where
        if table[i] is not None:
            return self._seamcall(leaf, cost, TDX_EPT_ENTRY_STATE_INCORRECT)
        table[i] = SeptEntry(SEPT_PENDING if aug else SEPT_MAPPED, pfn)
        status = self._seamcall(leaf, cost, TDX_SUCCESS)
        if not aug and self._vm.tdx_options.measure:
            for _ in range(16):  # one TDH.MR.EXTEND per 256 bytes
                self._seamcall("TDH.MR.EXTEND", "tdh_mr_extend_ns", TDX_SUCCESS)
        return status

    def tdg_mem_page_accept(self, gfn: int) -> None:
        """The guest's TDG.MEM.PAGE.ACCEPT: a PENDING page becomes MAPPED."""
        where = self._sept_walk(gfn, PG_LEVEL_4K)
        if isinstance(where, str):
            return
        table, i = where
        e = table[i]
        if e is not None and e.state == SEPT_PENDING:
            table[i] = SeptEntry(SEPT_MAPPED, e.pfn)
            self._seamcall("TDG.MEM.PAGE.ACCEPT", "tdg_mem_page_accept_ns", TDX_SUCCESS)

    def tdh_mem_range_block(self, gfn: int, level: int) -> str:
        """Block a mapped/pending leaf (4K) or a table entry, in the current TLB epoch."""
        leaf, cost = "TDH.MEM.RANGE.BLOCK", "tdh_mem_range_block_ns"
        where = self._sept_walk(gfn, level)
        if isinstance(where, str):
            return self._seamcall(leaf, cost, where)
        table, i = where
        e = table[i]
        epoch = self.epoch & _EPOCH_MASK
        if e is not None and e.state in (SEPT_MAPPED, SEPT_PENDING) and level == PG_LEVEL_4K:
            table[i] = SeptEntry(SEPT_BLOCKED, e.pfn, epoch)
        elif e is not None and e.state == SEPT_TABLE:
            table[i] = SeptEntry(SEPT_BLOCKED_TABLE, e.pfn, epoch)
        else:
            return self._seamcall(leaf, cost, TDX_EPT_ENTRY_STATE_INCORRECT)
        return self._seamcall(leaf, cost, TDX_SUCCESS)

    def tdh_mem_track(self) -> str:
        """Start a new TLB epoch (only a runnable TD has one)."""
        if not self.finalized:
            return self._seamcall("TDH.MEM.TRACK", "tdh_mem_track_ns", TDX_OP_STATE_INCORRECT)
        self.epoch += 1
        return self._seamcall("TDH.MEM.TRACK", "tdh_mem_track_ns", TDX_SUCCESS)

    def vcpus_left_guest(self) -> None:
        """Every vCPU was forced out of the guest: none still runs in an old epoch."""
        self.kicked_epoch = self.epoch

    def tracking_done(self, e: SeptEntry) -> bool:
        """Blocked in an older epoch and every vCPU left the guest since the last TRACK."""
        return not self.finalized or (
            e.epoch != self.epoch & _EPOCH_MASK and self.kicked_epoch == self.epoch
        )

    def tdh_mem_page_remove(self, gfn: int) -> tuple[str, int]:
        """Remove a BLOCKED 4K page whose TLB tracking is done; returns (status, pfn)."""
        leaf, cost = "TDH.MEM.PAGE.REMOVE", "tdh_mem_page_remove_ns"
        where = self._sept_walk(gfn, PG_LEVEL_4K)
        if isinstance(where, str):
            return self._seamcall(leaf, cost, where), 0
        table, i = where
        e = table[i]
        if e is None or e.state != SEPT_BLOCKED:
            return self._seamcall(leaf, cost, TDX_EPT_ENTRY_STATE_INCORRECT), 0
        if not self.tracking_done(e):
            return self._seamcall(leaf, cost, TDX_TLB_TRACKING_NOT_DONE), 0
        table[i] = None
        return self._seamcall(leaf, cost, TDX_SUCCESS), e.pfn

    def tdh_phymem_page_wbinvd(self) -> str:
        return self._seamcall("TDH.PHYMEM.PAGE.WBINVD", "tdh_phymem_page_wbinvd_ns", TDX_SUCCESS)

    def sept_table_entry(self, gfn: int, level: int) -> tuple[list[SeptEntry | None], int] | str:
        """Where the entry linking the S-EPT table for (gfn, level - 1) lives."""
        return self._sept_walk(gfn, level)

    def tdh_mem_sept_remove(self, gfn: int, level: int) -> str:
        """Pre-upstream: take an empty, blocked and tracked S-EPT table out of a live TD."""
        where = self._sept_walk(gfn, level)
        ok = False
        if not isinstance(where, str):
            table, i = where
            e = table[i]
            if e is not None and e.state == SEPT_BLOCKED_TABLE:
                child = e.pfn - TABLE_BASE_PFN
                ok = all(x is None for x in self._tables[child]) and self.tracking_done(e)
                if ok:
                    table[i] = None
                    self._free_table(child)
                    self._vm._count("sept_tables", -1)
        status = TDX_SUCCESS if ok else TDX_EPT_ENTRY_STATE_INCORRECT
        return self._seamcall("TDH.MEM.SEPT.REMOVE", "tdh_mem_sept_remove_ns", status)

    def tdh_phymem_page_reclaim(self, gfn: int, level: int) -> int:
        """After the HKID is gone: take the S-EPT table linked at (gfn, level) back.

        Returns the table's host pfn (the caller clears the page).
        """
        where = self._sept_walk(gfn, level)
        assert not isinstance(where, str)
        table, i = where
        e = table[i]
        assert e is not None
        self._seamcall("TDH.PHYMEM.PAGE.RECLAIM", "tdh_phymem_page_reclaim_ns", TDX_SUCCESS)
        table[i] = None
        self._free_table(e.pfn - TABLE_BASE_PFN)
        self._vm._count("sept_tables", -1)
        return e.pfn

    def finalize(self) -> None:
        """KVM_TDX_FINALIZE_VM (TDH.MR.FINALIZE): the TD becomes runnable."""
        if self.finalized:
            raise ConfigError("finalize: the TD is already finalized")
        if self.nr_premapped:
            raise ConfigError(
                f"finalize: {self.nr_premapped} premapped page(s) still lack TDH.MEM.PAGE.ADD"
            )
        self.finalized = True

    def release_hkid(self, vcpus: int) -> None:
        """``tdx_mmu_release_hkid``: flush every vCPU, write back caches, free the key."""
        if not self.hkid_assigned:
            return
        for _ in range(vcpus):
            self._seamcall("TDH.VP.FLUSH", "tdh_vp_flush_ns", TDX_SUCCESS)
        self._seamcall("TDH.MNG.VPFLUSHDONE", "tdh_mng_vpflushdone_ns", TDX_SUCCESS)
        self._seamcall("TDH.PHYMEM.CACHE.WB", "tdh_phymem_cache_wb_ns", TDX_SUCCESS)
        self._seamcall("TDH.MNG.KEY.FREEID", "tdh_mng_key_freeid_ns", TDX_SUCCESS)
        self.hkid_assigned = False

    # -- introspection -------------------------------------------------------------------
    def sept_entries(self) -> list[tuple[int, int, str, int]]:
        """Every non-FREE entry in tree order: (gfn, level, state, pfn)."""
        out: list[tuple[int, int, str, int]] = []

        def visit(index: int, level: int, base: int) -> None:
            for i, e in enumerate(self._tables[index]):
                if e is None:
                    continue
                gfn = base + i * pages_per_hpage(level)
                out.append((gfn, level, e.state, e.pfn))
                if e.state in (SEPT_TABLE, SEPT_BLOCKED_TABLE):
                    visit(e.pfn - TABLE_BASE_PFN, level - 1, gfn)

        visit(self.root, self.levels, 0)
        return out

    def snapshot(self) -> tuple[int, list[tuple[int, int]]]:
        """S-EPT tables below the root, and every leaf (gfn, pfn) that is not FREE."""
        tables = 0
        leaves: list[tuple[int, int]] = []
        for gfn, _level, state, pfn in self.sept_entries():
            if state in (SEPT_TABLE, SEPT_BLOCKED_TABLE):
                tables += 1
            else:
                leaves.append((gfn, pfn))
        return tables, leaves


# --------------------------------------------------------------------------------------
# External page-table hooks: KVM's side (kvm_x86_ops.*_external_*)
# --------------------------------------------------------------------------------------

HOOK_OK, HOOK_EBUSY, HOOK_EIO = 0, -16, -5


class TdxSeptHooks:
    """tdx.c's implementation of the four external hooks on top of the TDX module.

    ``tdx_sept_link_private_spt`` -> SEPT.ADD; ``tdx_sept_set_private_spte`` -> PAGE.AUG
    (finalized) or PAGE.ADD (initial image; v6.16 only counts ``nr_premapped``);
    ``tdx_sept_remove_private_spte`` -> BLOCK, TRACK, kick, REMOVE, WBINVD, clear (with
    ``track="batched"`` the TRACK/kick/REMOVE part waits for the end of the zap);
    ``tdx_sept_free_private_spt`` -> RECLAIM + clear once the HKID is released, KVM_BUG_ON
    while it is assigned (``sept_free="sept_remove"``: BLOCK(parent), TRACK, kick,
    SEPT.REMOVE, WBINVD, clear instead).
    """

    def __init__(self, vm: ReferenceVM, module: TdxModule) -> None:
        self._vm = vm
        self.module = module
        self.opts = vm.tdx_options
        self.pending_remove: list[int] = []  # track="batched": blocked, awaiting the TRACK

    def _hook(self, name: str) -> None:
        # The 2026 two-hook interface delivers links and removals as set_external_spte.
        if self.opts.interface == "two_hook" and name in (
            "link_external_spt",
            "remove_external_spte",
        ):
            name = "set_external_spte"
        self._vm._count(name)

    # -- kvm_x86_ops -----------------------------------------------------------------------
    def link_external_spt(self, gfn: int, level: int, child: MmuPage) -> int:
        self._hook("link_external_spt")
        return self.tdx_sept_link_private_spt(gfn, level)

    def set_external_spte(self, gfn: int, level: int, new_spte: int) -> int:
        self._hook("set_external_spte")
        return self.tdx_sept_set_private_spte(gfn, level, spte_to_pfn(new_spte))

    def remove_external_spte(self, gfn: int, level: int, old_spte: int) -> None:
        self._hook("remove_external_spte")
        self.tdx_sept_remove_private_spte(gfn, level)

    def free_external_spt(self, gfn: int, level: int, sp: MmuPage) -> int:
        self._hook("free_external_spt")
        return self.tdx_sept_free_private_spt(gfn, level)

    # -- tdx.c -----------------------------------------------------------------------------
    def tdx_sept_link_private_spt(self, gfn: int, level: int) -> int:
        status = self.module.tdh_mem_sept_add(gfn, level)
        if status == TDX_SUCCESS:
            return HOOK_OK
        self._vm._kvm_bug_on(f"TDH.MEM.SEPT.ADD failed for gfn {gfn:#x} level {level}: {status}")
        return HOOK_EIO

    def tdx_sept_set_private_spte(self, gfn: int, level: int, pfn: int) -> int:
        if level != PG_LEVEL_4K:
            self._vm._kvm_bug_on(f"private mapping at level {level}: TDX maps 4K only")
            return HOOK_EIO
        m = self.module
        if not m.finalized and self.opts.v6_16:
            m.nr_premapped += 1  # tdx_gmem_post_populate issues the PAGE.ADD
            return HOOK_OK
        if m.finalized:
            status, leaf = m.tdh_mem_page_aug(gfn, pfn), "TDH.MEM.PAGE.AUG"
        else:
            status, leaf = m.tdh_mem_page_add(gfn, pfn), "TDH.MEM.PAGE.ADD"
        if status == TDX_SUCCESS:
            return HOOK_OK
        self._vm._kvm_bug_on(f"{leaf} failed for gfn {gfn:#x}: {status}")
        return HOOK_EIO

    def tdx_sept_remove_private_spte(self, gfn: int, level: int) -> None:
        m = self.module
        if not m.hkid_assigned:
            self._vm._kvm_bug_on("remove_external_spte with the HKID released")
            return
        status = m.tdh_mem_range_block(gfn, PG_LEVEL_4K)
        if status != TDX_SUCCESS:
            if self.opts.v6_16 and not m.finalized and status == TDX_EPT_ENTRY_STATE_INCORRECT:
                m.nr_premapped -= 1  # premapped, never PAGE.ADDed: nothing in the module
                return
            self._vm._kvm_bug_on(f"TDH.MEM.RANGE.BLOCK failed for gfn {gfn:#x}: {status}")
            return
        if self.opts.track == "batched":
            self.pending_remove.append(gfn)
            return
        self.tdx_track()
        self._remove_blocked_page(gfn)

    def _remove_blocked_page(self, gfn: int) -> bool:
        status, _pfn = self.module.tdh_mem_page_remove(gfn)
        if status != TDX_SUCCESS:
            self._vm._kvm_bug_on(f"TDH.MEM.PAGE.REMOVE failed for gfn {gfn:#x}: {status}")
            return False
        self.tdx_clear_page()
        return True

    def tdx_clear_page(self) -> None:
        """PHYMEM.PAGE.WBINVD, then the MOVDIR64B clear of the page."""
        if self.module.software:
            return
        self.module.tdh_phymem_page_wbinvd()
        self._vm._count("page_clear")
        self._vm._charge(self._vm.costs["page_clear_ns"])

    def tdx_track(self) -> None:
        """TDH.MEM.TRACK then kick every vCPU out of the guest (runnable TDs only)."""
        m = self.module
        if not m.finalized:
            return
        status = m.tdh_mem_track()
        if status != TDX_SUCCESS:
            self._vm._kvm_bug_on(f"TDH.MEM.TRACK failed: {status}")
            return
        self.kick_all_vcpus()

    def kick_all_vcpus(self) -> None:
        """KVM_REQ_OUTSIDE_GUEST_MODE to every vCPU."""
        self.module.vcpus_left_guest()
        if self.module.software:
            return
        vm = self._vm
        vm._count("vcpu_kicks")
        vm._charge(vm.costs["kick_base_ns"] + vm.costs["kick_per_vcpu_ns"] * vm.vcpus)

    def flush_batched(self) -> None:
        """End of a leaf zap with ``track="batched"``: one TRACK + kick, then REMOVE each."""
        if not self.pending_remove:
            return
        self.tdx_track()
        pending, self.pending_remove = self.pending_remove, []
        for gfn in pending:
            if not self._remove_blocked_page(gfn):
                return

    def tdx_sept_free_private_spt(self, gfn: int, sp_level: int) -> int:
        m = self.module
        level = sp_level + 1  # the S-EPT entry linking this table sits one level up
        where = m.sept_table_entry(gfn, level)
        if isinstance(where, str):
            self._vm._kvm_bug_on(f"free_external_spt: no S-EPT path to gfn {gfn:#x}: {where}")
            return HOOK_EIO
        table, i = where
        e = table[i]
        if e is None or e.state != SEPT_TABLE:
            self._vm._kvm_bug_on(f"free_external_spt: gfn {gfn:#x} level {level} not a table")
            return HOOK_EIO
        if m.hkid_assigned:
            if self.opts.sept_free == "sept_remove":
                if m.tdh_mem_range_block(gfn, level) == TDX_SUCCESS:
                    self.tdx_track()
                    if m.tdh_mem_sept_remove(gfn, level) == TDX_SUCCESS:
                        self.tdx_clear_page()
                        return HOOK_OK
                self._vm._kvm_bug_on(f"TDH.MEM.SEPT.REMOVE failed for gfn {gfn:#x}")
                return HOOK_EIO
            # Upstream never frees S-EPT tables of a live TD: the page is leaked on purpose.
            self._vm._kvm_bug_on("free_external_spt while the HKID is assigned")
            self._vm._count("external_spt_leaked")
            return HOOK_EIO
        m.tdh_phymem_page_reclaim(gfn, level)
        if not m.software:
            self._vm._count("page_clear")
            self._vm._charge(self._vm.costs["page_clear_ns"])
        return HOOK_OK


class SnpPrivateHooks:
    """The ``private`` hook design on SNP: the RMP follows every private NPT change."""

    def __init__(self, vm: ReferenceVM) -> None:
        self._vm = vm

    def link_external_spt(self, gfn: int, level: int, child: MmuPage) -> int:
        return HOOK_OK

    def set_external_spte(self, gfn: int, level: int, new_spte: int) -> int:
        vm = self._vm
        vm._count("set_external_spte")
        found = vm._rmp_for_pfn(spte_to_pfn(new_spte))
        if found is None:
            vm._kvm_bug_on(f"private NPT leaf for gfn {gfn:#x} is not guest_memfd memory")
            return HOOK_EIO
        rmp, off = found
        status = rmp.rmpupdate(vm, off, gfn, True, level == PG_LEVEL_2M)
        if status != RMP_SUCCESS:
            vm._kvm_bug_on(f"RMPUPDATE to private failed for gfn {gfn:#x}: {status}")
            return HOOK_EIO
        return HOOK_OK

    def remove_external_spte(self, gfn: int, level: int, old_spte: int) -> None:
        vm = self._vm
        vm._count("remove_external_spte")
        found = vm._rmp_for_pfn(spte_to_pfn(old_spte))
        if found is not None:
            rmp, off = found
            if rmp.rmpupdate(vm, off, gfn, False, level == PG_LEVEL_2M) != RMP_SUCCESS:
                vm._kvm_bug_on(f"RMPUPDATE to shared failed for gfn {gfn:#x}")

    def free_external_spt(self, gfn: int, level: int, sp: MmuPage) -> int:
        return HOOK_OK


# --------------------------------------------------------------------------------------
# The VM
# --------------------------------------------------------------------------------------


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
    ) -> None:
        if vm_type not in VM_TYPES:
            raise ConfigError(f"vm_type: unknown VM type {vm_type!r}; allowed: {VM_TYPES}")
        if not isinstance(mirror, bool):
            raise TypeError(f"mirror: expected bool, got {mirror!r}")
        if mirror and vm_type != "sw_protected":
            raise ConfigError("mirror: only sw_protected VMs take mirror=True")
        if hooks is None:
            hooks = "mirror" if mirror else DEFAULT_HOOKS[vm_type]
        if not isinstance(hooks, str):
            raise ConfigError("hooks: the reference model takes a design name, not a hook object")
        if hooks not in _ALLOWED_HOOKS[(vm_type, mirror)]:
            raise ConfigError(
                f"hooks: {hooks!r} is not valid for a {vm_type} VM; "
                f"allowed: {_ALLOWED_HOOKS[(vm_type, mirror)]}"
            )
        if tdx and vm_type != "tdx" and not mirror:
            raise ConfigError("tdx: TDX options apply to tdx VMs (and sw_protected with mirror)")
        folio_bytes = parse_size(folio, "folio")
        if folio_bytes not in (4096, 2 << 20):
            raise ConfigError(f"folio: guest_memfd folio size must be 4K or 2M, got {folio!r}")
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
        #: which changes call the external hooks: "none", "mirror", "private" or "gmem".
        self.design = hooks
        self.tdx_options = TdxOptions.parse(tdx)
        self.folio_level = PG_LEVEL_2M if folio_bytes == 2 << 20 else PG_LEVEL_4K
        #: private memory, guest_memfd and memory attributes exist (all but "default").
        self.confidential = vm_type != "default"
        #: a mirror root for private memory (TDX, and the SW_PROTECTED mirror variant).
        self.has_mirror = vm_type == "tdx" or mirror
        shared_bit = 1 << (35 if levels == 4 else 39)
        #: ``kvm_gfn_direct_bits``: the direct root of a TD maps shared gfn g at g | bit.
        self.gfn_direct_bits = shared_bit if self.has_mirror else 0
        #: gfns are < max_gfn (48-bit GPA with 4 levels, 52-bit with 5; a TD's lower half).
        self.max_gfn = self.gfn_direct_bits or 1 << (36 if levels == 4 else 40)
        if memory_bytes >> PAGE_SHIFT > self.max_gfn:
            raise ConfigError(f"memory {memory!r} does not fit a {levels}-level guest")

        # Arena: every table ever handed out, by index; live ones also in _live.
        self._spt: list[list[int]] = []
        self._live: dict[int, MmuPage] = {}
        self._reusable: list[int] = []  # LIFO stack of free table indices
        self._deferred: list[int] = []  # freed during the current operation
        self._peak_live = 0

        self._roots: list[MmuPage] = []  # kvm->arch.tdp_mmu_roots, newest first
        self._vcpu_root: list[MmuPage | None] = [None] * vcpus  # mmu->root.hpa per vCPU
        self._vcpu_mirror_root: list[MmuPage | None] = [None] * vcpus  # mmu->mirror_root_hpa

        self._memslots: dict[int, Memslot] = {}
        self._next_slot_id = 0
        self._next_data_pfn = DATA_BASE_PFN
        self.memslot_generation = 0
        self._attrs = PrivateRanges()

        self._stats: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)
        self._modeled_ns = 0.0

        # KVM_BUG_ON of the running operation, the VM's state after one, and destruction.
        self._bug: str | None = None
        self._bug_msg: str | None = None
        self._destroyed = False
        #: the operation acts for private memory (a private fault or a PRIVATE-filtered zap).
        self._op_private = False
        #: set when a populate stopped because a KVM_BUG_ON made its pre-fault return RETRY.
        self.populate_stopped_on_bug = False

        # The TDX module (also the SW_PROTECTED mirror's software backend) and the hooks.
        self._tdx: TdxModule | None = None
        self._external: TdxSeptHooks | SnpPrivateHooks | None = None
        if self.has_mirror:
            self._tdx = TdxModule(self, software=vm_type == "sw_protected")
            self._external = TdxSeptHooks(self, self._tdx)
        elif vm_type == "snp" and hooks == "private":
            self._external = SnpPrivateHooks(self)

        # The default memslot comes with the VM: generation 0 is what a new VM reports.
        # A confidential guest's initial memory is guest_memfd, all private (as a VMM sets
        # up a TD or an SNP guest).
        self._add_memslot(0, memory_bytes >> PAGE_SHIFT, backing_bytes, gmem=self.confidential)
        self.memslot_generation = 0
        if self.confidential:
            self._attrs.set(0, memory_bytes >> PAGE_SHIFT, True)

    # ==================================================================================
    # Public API
    # ==================================================================================

    # -- properties that tdpmmu.VM also has ----------------------------------------------
    @property
    def shared_bit(self) -> int:
        return self.gfn_direct_bits

    @property
    def bugged(self) -> bool:
        return self._bug_msg is not None

    @property
    def destroyed(self) -> bool:
        return self._destroyed

    @property
    def finalized(self) -> bool:
        return self._tdx is not None and self._tdx.finalized

    @property
    def hooks_name(self) -> str:
        return self.design

    @property
    def stats(self) -> dict[str, int | float]:
        """Counters (KVM names, hook names, SEAMCALL leaves) and ``modeled_ns``."""
        return self.stats_dict()

    def stats_dict(self) -> dict[str, int | float]:
        out: dict[str, int | float] = dict(self._stats)
        out["modeled_ns"] = self._modeled_ns
        out["page_table_bytes"] = len(self._live) * 4096
        out["page_table_peak_bytes"] = self._peak_live * 4096
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
            result = self._page_fault(vcpu, gfn, private, bool(write), bool(exec), False)
        except ConfigError:
            self._deferred_to_reusable()
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
                r = self._page_fault(vcpu, g, private, bool(write), bool(exec), False)
            except ConfigError as exc:
                error = exc
                break
            rets.append(int(r.ret))
            if self._bug is not None:
                break
        self._end_of_operation()
        if error is not None:
            raise error
        return rets

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
            want = self._attrs.is_private(gfn) if private is None else private
            if self._attrs.uniform(gfn, end) != want:
                raise ConfigError(
                    f"private: the range's memory attributes are not all "
                    f"{'private' if want else 'shared'}"
                )
            cur = gfn
            while want and cur < end:
                slot = self._gfn_to_memslot(cur)
                assert slot is not None  # covered: checked above
                if not slot.gmem:
                    raise ConfigError(
                        f"private: private memory needs guest_memfd; memslot {slot.id} holding "
                        f"gfn {cur:#x} has none"
                    )
                cur = slot.gfn + slot.npages
            if self._tdx is not None and not self._tdx.finalized and not want:
                raise ConfigError(
                    "private: before finalize only the private initial image can be populated"
                )
        self._begin_operation()
        self.populate_stopped_on_bug = False
        installed = 0
        self._last_populate_faults = 0  # prefetch faults made (for tests)
        cur = gfn
        while cur < end:
            r = self._page_fault(0, cur, private, True, False, True)
            self._last_populate_faults += 1
            if r.ret == Ret.RETRY:
                if self._bug is not None:
                    # KVM's pre-fault loop stops when the VM is dead (a KVM_BUG_ON fired).
                    self.populate_stopped_on_bug = True
                    break
                continue  # pre-fault loops on RETRY
            if r.ret == Ret.FIXED:
                installed += 1
                self._tdx_gmem_post_populate(cur, r)
            if self._bug is not None:
                break
            # Continue after the page just mapped.
            cur = _round_down(cur, r.level) + pages_per_hpage(r.level)
        self._end_of_operation()
        return installed

    # -- zaps ----------------------------------------------------------------------------
    def zap_gfn_range(self, gfn: int, npages: int) -> int:
        """``kvm_zap_gfn_range``: zap leaves in all valid roots; one range flush if needed."""
        self._check_range(gfn, npages)
        self._ensure_alive()
        self._begin_operation()
        flush, zapped = self._kvm_tdp_mmu_zap_leafs(KVM_VALID_ROOTS, gfn, gfn + npages)
        if flush:
            self._kvm_flush_remote_tlbs()  # kvm_flush_remote_tlbs_range
        self._end_of_operation()
        return zapped

    def mmu_notifier_invalidate(self, gfn: int, npages: int) -> int:
        """Host mm invalidation: ``kvm_tdp_mmu_unmap_gfn_range`` with the SHARED filter."""
        self._check_range(gfn, npages)
        self._ensure_alive()
        self._begin_operation()
        flush, zapped = self._kvm_tdp_mmu_unmap_gfn_range(
            gfn, gfn + npages, private=False, shared=True
        )
        if flush:
            self._kvm_flush_remote_tlbs()
        self._end_of_operation()
        return zapped

    def zap_all_fast(self) -> None:
        """``kvm_mmu_zap_all_fast``: obsolete every direct root and tear it down."""
        self._ensure_alive()
        self._begin_operation()
        self._kvm_mmu_zap_all_fast()
        self._end_of_operation()

    # -- memslots ------------------------------------------------------------------------
    def add_memslot(
        self, gfn: int, npages: int, backing: int | str = 4096, gmem: bool = False
    ) -> int:
        backing_bytes = _backing_bytes(backing)
        if gmem and not self.confidential:
            raise ValueError("gmem: a default VM cannot have guest_memfd memslots")
        self._check_range(gfn, npages)
        self._ensure_alive()
        if npages < 1:
            raise ValueError(f"npages must be >= 1, got {npages}")
        step = backing_bytes >> PAGE_SHIFT
        if gfn % step or npages % step:
            raise ValueError(f"gfn and npages must be multiples of the backing page ({step} pages)")
        for slot in self._memslots.values():
            if gfn < slot.end and slot.gfn < gfn + npages:
                raise ValueError(f"memslot [{gfn:#x}, {gfn + npages:#x}) overlaps slot {slot.id}")
        self._begin_operation()
        slot_id = self._add_memslot(gfn, npages, backing_bytes, gmem=bool(gmem))
        self._end_of_operation()
        return slot_id

    def delete_memslot(self, slot: int) -> None:
        self._ensure_alive()
        if slot not in self._memslots:
            raise ValueError(f"slot: no memslot with id {slot!r}")
        self._begin_operation()
        self._kvm_arch_flush_shadow_memslot(self._memslots[slot])
        del self._memslots[slot]  # the host pages (and the RMP entries) go with it
        self.memslot_generation += 2
        self._end_of_operation()

    def memslots(self) -> list[tuple[int, int, int, int, bool, int]]:
        """``(id, gfn, npages, backing bytes, gmem, host_pfn)`` per slot, by gfn."""
        return [s.as_tuple() for s in sorted(self._memslots.values(), key=lambda s: s.gfn)]

    # -- private memory ------------------------------------------------------------------
    def set_memory_attributes(self, gfn: int, npages: int, private: bool = True) -> int:
        """KVM_SET_MEMORY_ATTRIBUTES: convert ``[gfn, gfn+npages)``; returns leaves zapped.

        The guest's conversion request costs an exit plus guest_memfd's bookkeeping; a 2M
        folio only partly converted is split.  Before the attribute changes, the range is
        unmapped under the *old* attribute's filter (to-shared zaps private mappings).
        """
        self._check_confidential("private")
        self._check_range(gfn, npages)
        self._ensure_alive()
        end = gfn + npages
        self._check_covered(gfn, end, gmem=False)
        private = bool(private)
        if self._attrs.uniform(gfn, end) == private:
            return 0
        self._begin_operation()
        self._count("conversions")
        self._charge(self.costs["psc_exit_ns"] + self.costs["gmem_convert_ns"])
        if self.folio_level == PG_LEVEL_2M:
            splits = self._partly_converted_2m_folios(gfn, end)
            self._count("gmem_splits", splits)
            self._charge(self.costs["gmem_split_2m_ns"] * splits)
        # kvm_arch_pre_set_memory_attributes: unmap the old alias.
        flush, zapped = self._kvm_tdp_mmu_unmap_gfn_range(
            gfn, end, private=not private, shared=private
        )
        if flush:
            self._kvm_flush_remote_tlbs()
        self._attrs.set(gfn, end, private)
        self._end_of_operation()
        return zapped

    def _partly_converted_2m_folios(self, gfn: int, end: int) -> int:
        """2M guest_memfd folios the edges of ``[gfn, end)`` cut through (one if both do)."""
        splits = 0
        for edge in (gfn, end):
            slot = self._gfn_to_memslot(min(edge, end - 1))
            if edge % 512 and slot is not None and slot.gmem:
                splits += 1
        if gfn // 512 == (end - 1) // 512 and splits == 2:
            splits = 1
        return splits

    def punch_hole(self, gfn: int, npages: int) -> int:
        """guest_memfd FALLOC_FL_PUNCH_HOLE: unmap with the PRIVATE filter, free the folios."""
        self._check_confidential("vm_type")
        self._check_range(gfn, npages)
        self._ensure_alive()
        end = gfn + npages
        self._check_covered(gfn, end, gmem=True)
        self._begin_operation()
        flush, zapped = self._kvm_tdp_mmu_unmap_gfn_range(gfn, end, private=True, shared=False)
        if flush:
            self._kvm_flush_remote_tlbs()
        self._kvm_gmem_invalidate(gfn, end)
        for slot in self._memslots.values():
            # The freed guest_memfd pages (whole backing pages only) are allocated again
            # on their next touch.
            if slot.gmem and slot.gfn < end and gfn < slot.end:
                first = -(-(max(gfn, slot.gfn) - slot.gfn) // slot.backing_pages)
                last = (min(end, slot.end) - slot.gfn) // slot.backing_pages
                slot.gmem_touched -= set(range(first, last))
        self._end_of_operation()
        return zapped

    def finalize(self) -> None:
        """KVM_TDX_FINALIZE_VM: the TD becomes runnable."""
        if self.vm_type != "tdx" or self._tdx is None:
            raise ConfigError(f"vm_type: finalize is a TDX operation, not for {self.vm_type}")
        self._ensure_alive()
        self._tdx.finalize()

    def destroy(self) -> None:
        """Tear the VM down in KVM's order; every later operation raises ``ConfigError``.

        1. guest_memfd files are released (each holds a VM reference): a PRIVATE unmap of
           every guest_memfd slot, HKID still assigned, and the folios are freed.
        2. ``tdx_mmu_release_hkid`` (with ``sept_free="sept_remove"`` the then leaf-less
           mirror tree is torn down first, while the HKID is assigned).
        3. ``kvm_mmu_destroy`` per vCPU, then ``kvm_mmu_uninit_tdp_mmu``: every root is
           invalidated and zapped exclusively (on a TD only ``free_external_spt`` runs).
        """
        self._ensure_alive()
        self._begin_operation()
        for slot in sorted(self._memslots.values(), key=lambda s: s.gfn):
            if not slot.gmem:
                continue
            flush, _ = self._kvm_tdp_mmu_unmap_gfn_range(
                slot.gfn, slot.end, private=True, shared=False
            )
            if flush:
                self._kvm_flush_remote_tlbs()
            self._kvm_gmem_invalidate(slot.gfn, slot.end)
        if self._tdx is not None:
            mirror = self._current_root(mirror=True)
            if self.tdx_options.sept_free == "sept_remove" and mirror is not None:
                self._tdp_mmu_zap_root(mirror, shared=False)
            self._tdx.release_hkid(self.vcpus)
        self._kvm_mmu_uninit_tdp_mmu()
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
            slot = self._gfn_to_memslot(g)
            if slot is None or slot.rmp is None:
                raise ConfigError(f"gfn: {g:#x} is not guest_memfd memory of an SNP guest")
            e = slot.rmp.get(g - slot.gfn)
            if not e.assigned or e.gfn != g:
                raise ConfigError(f"gfn: {g:#x} is not assigned to the guest in the RMP")
        self._begin_operation()
        out: dict[str, int] = {}
        for g in range(gfn, gfn + npages, step):
            slot = self._gfn_to_memslot(g)
            assert slot is not None and slot.rmp is not None
            status = slot.rmp.pvalidate(self, g - slot.gfn, g, bool(size_2m), bool(validate))
            out[status] = out.get(status, 0) + 1
        self._end_of_operation()
        return out

    def rmp_fault(self, gfn: int) -> None:
        """``sev_handle_rmp_fault``: PSMASH the 2M RMP entry, zap the 512-page gfn range."""
        if self.vm_type != "snp":
            raise ConfigError("vm_type: RMP faults exist only on SEV-SNP")
        self._check_gfn(gfn, "gfn")
        self._ensure_alive()
        slot = self._gfn_to_memslot(gfn)
        if slot is None or slot.rmp is None:
            raise ConfigError(f"gfn: {gfn:#x} is not guest_memfd memory")
        self._begin_operation()
        self._count("rmp_faults")
        off = gfn - slot.gfn
        e = slot.rmp.get(off)
        if e.size_2m and e.assigned:
            slot.rmp.psmash(self, off)
        base = gfn & ~511
        flush, _ = self._kvm_tdp_mmu_zap_leafs(KVM_VALID_ROOTS, base, base + 512)
        if flush:
            self._kvm_flush_remote_tlbs()
        self._end_of_operation()

    def rmp_entry(self, gfn: int) -> dict[str, Any]:
        """The RMP entry of the guest_memfd page behind ``gfn``."""
        self._check_gfn(gfn, "gfn")
        slot = self._gfn_to_memslot(gfn)
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
    def sept_entries(self) -> list[tuple[int, int, str, int]]:
        """The TDX module's S-EPT entries that are not FREE, in tree order."""
        if self._tdx is None:
            raise ConfigError("vm_type: only TDX VMs (and sw_protected with mirror) have an S-EPT")
        return self._tdx.sept_entries()

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

        Uses the newest valid root of the kind (mirror for ``private`` on VMs with one);
        ``[]`` if there is none.
        """
        self._check_gfn(gfn, "gfn")
        if private and not self.has_mirror:
            self._check_private(True)
        mirror = self.has_mirror and bool(private)
        root = self._current_root(mirror)
        if root is None:
            return []
        return self._walk_root(root, gfn, self._root_gfn_bits(mirror))

    def _walk_root(self, root: MmuPage, gfn: int, gfn_bits: int) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        sp = root
        while True:
            level = sp.level
            spte = sp.spt[spte_index(gfn | gfn_bits, level)]
            out.append((level, spte))
            if not is_shadow_present_pte(spte) or is_last_spte(spte, level):
                return out
            sp = self._spte_to_child_sp(spte)

    def _lookup(self, root: MmuPage, gfn: int, gfn_bits: int) -> tuple[int, int]:
        """The entry that maps ``gfn`` in ``root``: the leaf or the first non-present one."""
        return self._walk_root(root, gfn, gfn_bits)[-1]

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

    def _check_confidential(self, what: str) -> None:
        if not self.confidential:
            raise ConfigError(f"{what}: a {self.vm_type} VM has no private memory")

    def _check_all_in_memslots(self, gfn: int, npages: int) -> None:
        cur, end = gfn, gfn + npages
        while cur < end:
            slot = self._gfn_to_memslot(cur)
            if slot is None:
                raise ValueError(f"gfn {cur:#x} (in [gfn, gfn+npages)) is not in any memslot")
            cur = slot.end

    def _check_covered(self, gfn: int, end: int, gmem: bool) -> None:
        """Every gfn of ``[gfn, end)`` is in a memslot (with guest_memfd if ``gmem``)."""
        cur = gfn
        while cur < end:
            slot = self._gfn_to_memslot(cur)
            if slot is None:
                raise ConfigError(f"gfn: {cur:#x} of [{gfn:#x}, {end:#x}) is not in any memslot")
            if gmem and not slot.gmem:
                raise ConfigError(f"gfn: memslot {slot.id} holding {cur:#x} has no guest_memfd")
            cur = slot.end

    # ==================================================================================
    # Bookkeeping: modeled time, counters, KVM_BUG_ON, the arena and its grace period
    # ==================================================================================

    def _charge(self, ns: float) -> None:
        self._modeled_ns += ns

    _last_populate_faults = 0

    def _count(self, name: str, delta: int = 1) -> None:
        self._stats[name] += delta

    def _kvm_bug_on(self, msg: str) -> None:
        """A KVM_BUG_ON fired: the operation goes on, the VM is bugged when it ends."""
        if self._bug is None:
            self._bug = msg

    def _begin_operation(self) -> None:
        self._bug = None

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
        self._peak_live = max(self._peak_live, len(self._live))
        return sp

    def _tdp_mmu_free_sp(self, sp: MmuPage) -> None:
        """Free after the grace period: reusable once the current operation ends."""
        del self._live[sp.index]
        self._deferred.append(sp.index)

    def _tdp_mmu_free_sp_unpublished(self, sp: MmuPage) -> None:
        """A table that never became visible (lost cmpxchg, failed hook) is reusable at once."""
        del self._live[sp.index]
        self._reusable.append(sp.index)

    def _deferred_to_reusable(self) -> None:
        """Quiescent point: deferred frees join the reusable stack in free order."""
        self._reusable.extend(self._deferred)
        self._deferred.clear()

    def _end_of_operation(self) -> None:
        """End of a public operation: the grace period ends; a KVM_BUG_ON bugs the VM."""
        self._deferred_to_reusable()
        bug, self._bug = self._bug, None
        if bug is not None:
            if self._bug_msg is None:
                self._bug_msg = bug
            raise VmBugged(bug)

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
    # Memslots and guest_memfd
    # ==================================================================================

    def _add_memslot(self, gfn: int, npages: int, backing: int, gmem: bool) -> int:
        slot_id = self._next_slot_id
        self._next_slot_id += 1
        span = -(-npages // _DATA_PFN_ALIGN) * _DATA_PFN_ALIGN
        slot = Memslot(slot_id, gfn, npages, backing, gmem, self._next_data_pfn)
        self._next_data_pfn += span
        if gmem:
            # guest_memfd pages are a host allocation of their own, right after.
            slot.gmem_pfn = self._next_data_pfn
            self._next_data_pfn += span
            if self.vm_type == "snp":
                slot.rmp = Rmp(npages)
        self._memslots[slot_id] = slot
        self.memslot_generation += 2  # two address spaces on x86
        return slot_id

    def _gfn_to_memslot(self, gfn: int) -> Memslot | None:
        for slot in self._memslots.values():
            if slot.contains(gfn):
                return slot
        return None

    def _rmp_for_pfn(self, pfn: int) -> tuple[Rmp, int] | None:
        """The hardware's view: the RMP entry of a host pfn (guest_memfd pages only)."""
        for slot in self._memslots.values():
            if slot.rmp is not None and slot.gmem_pfn <= pfn < slot.gmem_pfn + slot.npages:
                return slot.rmp, pfn - slot.gmem_pfn
        return None

    def _kvm_arch_flush_shadow_memslot(self, slot: Memslot) -> None:
        """Memslot delete: fast zap (default VM + quirk) or a leaf zap of the slot."""
        if self.vm_type == "default" and self.slot_zap_all:
            self._kvm_mmu_zap_all_fast()
        else:
            # kvm_mmu_zap_memslot: PRIVATE|SHARED filter.
            flush, _ = self._kvm_tdp_mmu_unmap_gfn_range(
                slot.gfn, slot.end, private=True, shared=True
            )
            if flush:
                self._kvm_flush_remote_tlbs()  # kvm_flush_remote_tlbs_memslot

    def _kvm_gmem_invalidate(self, gfn: int, end: int) -> None:
        """guest_memfd folios of ``[gfn, end)`` are freed: ``kvm_arch_gmem_invalidate``."""
        if self.design != "gmem":
            return
        for slot in sorted(self._memslots.values(), key=lambda s: s.gfn):
            if slot.rmp is None or not (slot.gfn < end and gfn < slot.end):
                continue
            a = max(gfn, slot.gfn) - slot.gfn
            b = min(end, slot.end) - slot.gfn
            self._count("gmem_invalidate")
            self._sev_gmem_invalidate(slot.rmp, a, b)

    def _sev_gmem_prepare(self, slot: Memslot, off: int, gfn: int) -> str:
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
            return rmp.rmpupdate(self, head, gfn & ~511, True, True)
        return rmp.rmpupdate(self, off, gfn, True, False)

    def _sev_gmem_invalidate(self, rmp: Rmp, off: int, end: int) -> None:
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
                    rmp.rmpupdate(self, p, e.gfn, False, True)
                    p += 512
                    continue
                rmp.psmash(self, p)
            rmp.rmpupdate(self, p, rmp.get(p).gfn, False, False)
            p += 1

    def _snp_guest_validate(self, slot: Memslot, gfn: int) -> None:
        """The SNP guest PVALIDATEs a page it was just given, unless it already is."""
        rmp = slot.rmp
        if rmp is None:
            return
        off = gfn - slot.gfn
        e = rmp.get(off)
        if not e.assigned or e.validated:
            return
        if e.size_2m:
            status = rmp.pvalidate(self, off & ~511, gfn & ~511, True, True)
        else:
            status = rmp.pvalidate(self, off, gfn, False, True)
        if status != RMP_SUCCESS:
            self._kvm_bug_on(f"guest PVALIDATE of gfn {gfn:#x} failed: {status}")

    # ==================================================================================
    # Roots (spec §6)
    # ==================================================================================

    def _root_role(self, mirror: bool = False) -> int:
        return tdp_root_role(self.levels, is_mirror=mirror)

    def _root_gfn_bits(self, mirror: bool) -> int:
        """``kvm_gfn_root_bits``: the shared bit for the direct root of a TD, else 0."""
        return 0 if mirror else self.gfn_direct_bits

    def _valid_direct_root(self) -> MmuPage | None:
        return self._current_root(mirror=False)

    def _current_root(self, mirror: bool) -> MmuPage | None:
        """The newest valid root of the kind (what walk/spte inspect)."""
        for root in self._roots:
            if not root.invalid and root.is_mirror == mirror:
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
            self._kvm_bug_on(f"put of root pfn {root.pfn:#x} with refcount {root.refcount}")
            return
        root.refcount -= 1
        if root.refcount:
            return
        if not root.invalid:
            self._kvm_bug_on("root refcount reached zero while the root is still valid")
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

    def _kvm_mmu_load(self, vcpu: int) -> None:
        """``mmu_alloc_direct_roots``: the mirror root first (if the VM has one and this vCPU
        has none yet), then the direct root (first run, or after a fast zap)."""
        if self.has_mirror and self._vcpu_mirror_root[vcpu] is None:
            self._vcpu_mirror_root[vcpu] = self._kvm_tdp_mmu_alloc_root(mirror=True)
        if self._vcpu_root[vcpu] is None:
            self._vcpu_root[vcpu] = self._kvm_tdp_mmu_alloc_root(mirror=False)

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
        scheduled = [r for r in self._roots if r.scheduled_to_zap]
        for root in scheduled:
            root.scheduled_to_zap = False
        for root in scheduled:
            self._tdp_mmu_zap_root(root, shared)
            self._kvm_tdp_mmu_put_root(root)  # the TDP MMU's own reference

    def _kvm_mmu_zap_all_fast(self) -> None:
        # External page tables cannot be fast-zapped: only direct roots are obsoleted.
        self._kvm_tdp_mmu_invalidate_roots(KVM_DIRECT_ROOTS)
        self._kvm_mmu_free_obsolete_roots()
        self._kvm_tdp_mmu_zap_invalidated_roots(shared=True)

    def _kvm_mmu_uninit_tdp_mmu(self) -> None:
        """VM teardown: every vCPU drops its roots (``kvm_mmu_destroy``; the mirror root
        reference goes only here), then every root is invalidated and zapped exclusively."""
        for holders in (self._vcpu_root, self._vcpu_mirror_root):
            for vcpu, root in enumerate(holders):
                if root is not None:
                    holders[vcpu] = None
                    root.role |= ROLE_INVALID
                    self._kvm_tdp_mmu_put_root(root)
        for root in self._roots:
            root.role |= ROLE_INVALID
        for root in list(self._roots):
            self._tdp_mmu_zap_root(root, shared=False)
            self._kvm_tdp_mmu_put_root(root)

    # ==================================================================================
    # SPTE writers, the external hooks and change propagation (spec §4)
    # ==================================================================================

    def _hooks_fire(self, sp: MmuPage) -> bool:
        """Does a change of an entry of ``sp`` call the external hooks (the hook design)?"""
        if self.design == "mirror":
            return sp.is_mirror  # upstream TDX: every change of a mirror SPTE
        if self.design == "private":
            return self._op_private  # every change made for private memory
        return False  # "none", and "gmem" (guest_memfd prepare/invalidate only)

    def _tdp_mmu_set_spte_atomic(self, it: _TdpIter, new_spte: int) -> bool:
        """Shared-lock install: cmpxchg from ``it.old_spte``; False (= -EBUSY) if it lost."""
        if is_frozen_spte(it.old_spte):
            raise InvariantError("atomic SPTE update from a FROZEN snapshot")
        if self._hooks_fire(it.sp) and not is_frozen_spte(new_spte):
            return self._set_external_spte_present(it, new_spte)
        if it.read() != it.old_spte:
            it.old_spte = it.read()
            return False
        it.write(new_spte)
        self._handle_changed_spte(it.gfn, it.old_spte, new_spte, it.level, shared=True)
        it.old_spte = new_spte
        return True

    def _set_external_spte_present(self, it: _TdpIter, new_spte: int) -> bool:
        """The freeze protocol: FROZEN while the hook runs; present only once it succeeded."""
        old = it.old_spte
        if not is_shadow_present_pte(new_spte):
            self._kvm_bug_on("atomic zap of a mirror SPTE")
            return False
        if is_shadow_present_pte(old):
            self._kvm_bug_on("atomic install over a present mirror SPTE")
            return False
        if it.read() != old:
            it.old_spte = it.read()
            return False
        it.write(FROZEN_SPTE)
        ext = self._external
        if ext is None:
            self._kvm_bug_on("mirror SPTE change without an external backend")
            ret = HOOK_EIO
        elif is_last_spte(new_spte, it.level):
            ret = ext.set_external_spte(it.gfn, it.level, new_spte)
        else:
            ret = ext.link_external_spt(it.gfn, it.level, self._spte_to_child_sp(new_spte))
        if ret != HOOK_OK:
            it.write(old)  # restore: the entry was frozen, nobody else wrote it
            return False
        it.write(new_spte)
        self._handle_changed_spte(it.gfn, old, new_spte, it.level, shared=True)
        it.old_spte = new_spte
        return True

    def _tdp_mmu_iter_set_spte(self, it: _TdpIter, new_spte: int) -> None:
        """Exclusive-lock write (``tdp_mmu_set_spte``), then ``remove_external_spte``."""
        old = it.old_spte
        if is_frozen_spte(old) or is_frozen_spte(new_spte):
            self._kvm_bug_on("non-atomic SPTE write involving FROZEN_SPTE")
        it.write(new_spte)
        self._handle_changed_spte(it.gfn, old, new_spte, it.level, shared=False)
        if self.has_mirror and it.sp.is_mirror and is_shadow_present_pte(new_spte):
            self._kvm_bug_on("non-atomic write installed a present mirror SPTE")
        if self._hooks_fire(it.sp):
            self._remove_external_spte(it.gfn, old, it.level)
        it.old_spte = new_spte

    def _remove_external_spte(self, gfn: int, old: int, level: int) -> None:
        """Leaves only: a non-leaf's subtree was handled by ``handle_removed_pt``."""
        if not is_shadow_present_pte(old) or not is_last_spte(old, level):
            return
        if self._external is not None:
            self._external.remove_external_spte(gfn, level, old)

    def _handle_changed_spte(self, gfn: int, old: int, new: int, level: int, shared: bool) -> None:
        """Bookkeeping after an SPTE changed: page stats and subtree teardown."""
        was_present = is_shadow_present_pte(old)
        is_present = is_shadow_present_pte(new)
        was_leaf = was_present and is_last_spte(old, level)
        is_leaf = is_present and is_last_spte(new, level)
        pfn_changed = spte_to_pfn(old) != spte_to_pfn(new)

        if not 1 <= level <= PT64_ROOT_MAX_LEVEL or gfn % pages_per_hpage(level):
            self._kvm_bug_on(f"SPTE change at bad level/gfn ({level}, {gfn:#x})")
        if was_leaf and is_leaf and pfn_changed:
            self._kvm_bug_on(f"present leaf at gfn {gfn:#x} changed pfn ({old:#x} -> {new:#x})")
            return
        if old == new:
            return
        if not was_present and not is_present:
            return  # only MMIO and FROZEN transitions happen between non-present values
        if is_leaf != was_leaf:
            self._kvm_update_page_stats(level, 1 if is_leaf else -1)
        if was_present and not was_leaf and (is_leaf or not is_present or pfn_changed):
            self._handle_removed_pt(self._spte_to_child_sp(old), shared)

    def _handle_removed_pt(self, sp: MmuPage, shared: bool) -> None:
        """Tear down a table that was just unlinked; every entry ends FROZEN.

        Entries are processed in index order, recursing into child tables, so tables are
        freed in post-order (children before their parent).  With hooks, each present leaf
        is removed from the external tree and then the external table itself is freed.
        """
        level = sp.level
        hooks = self._hooks_fire(sp)
        self._tdp_unaccount_mmu_page(sp)
        if self.has_mirror and sp.is_mirror and shared:
            self._kvm_bug_on("shared (atomic) teardown of a mirror page table")
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
            if hooks:
                self._remove_external_spte(gfn, old, level)
        if hooks and self._external is not None:
            self._external.free_external_spt(sp.gfn, level, sp)
        self._tdp_mmu_free_sp(sp)

    # ==================================================================================
    # The fault path (spec §3)
    # ==================================================================================

    def _page_fault(
        self, vcpu: int, gfn: int, private: bool | None, write: bool, exec: bool, prefetch: bool
    ) -> ReferenceFault:
        """One fault as the vCPU takes it: the exit, then ``kvm_mmu_page_fault``.

        A TDX private fault that returns RETRY is retried inside KVM (without busy
        injection it never does); after a private FIXED/SPURIOUS the TD guest accepts
        the page (TDG.MEM.PAGE.ACCEPT).
        """
        start_ns = self._modeled_ns
        is_private = (
            private if private is not None else (self.confidential and self._attrs.is_private(gfn))
        )
        tdx = self._tdx
        if tdx is not None and not prefetch and not tdx.finalized:
            raise ConfigError(
                "vm: the TD is not finalized: no vCPU can run yet (use populate, then finalize)"
            )
        if not prefetch:
            exit_ns = "td_exit_entry_ns" if self.vm_type == "tdx" else "exit_entry_ns"
            self._charge(self.costs[exit_ns])
        # TDX forces private faults to writes (private pages are always RWX in S-EPT).
        write = write or (is_private and self.vm_type == "tdx")
        retries = 0
        while True:
            r = self._kvm_mmu_page_fault(vcpu, gfn, is_private, write, exec, prefetch)
            if (
                r.ret == Ret.RETRY
                and is_private
                and self.vm_type == "tdx"
                and not prefetch
                and self._bug is None
                and retries < 1000
            ):
                retries += 1  # tdx_handle_ept_violation's local retry
                self._count("tdx_local_retries")
                continue
            if r.ret in (Ret.FIXED, Ret.SPURIOUS) and is_private and not prefetch and tdx:
                tdx.tdg_mem_page_accept(gfn)
            return dataclasses.replace(r, retries=retries, modeled_ns=self._modeled_ns - start_ns)

    def _kvm_mmu_page_fault(
        self, vcpu: int, gfn: int, is_private: bool, write: bool, exec: bool, prefetch: bool
    ) -> ReferenceFault:
        """``kvm_mmu_do_page_fault`` + ``kvm_tdp_mmu_page_fault`` + ``kvm_tdp_mmu_map``."""
        if not prefetch:
            self._charge(self.costs["fault_handling_ns"])  # per exit; a prefetch per leaf
        self._kvm_mmu_load(vcpu)
        mirror = self.has_mirror and is_private
        root = self._vcpu_mirror_root[vcpu] if mirror else self._vcpu_root[vcpu]
        assert root is not None
        gfn_bits = self._root_gfn_bits(mirror)
        slot = self._gfn_to_memslot(gfn)

        def done(ret: Any, level: int, spte: int) -> ReferenceFault:
            return ReferenceFault(Ret(int(ret)), level, 0, 0.0, spte, gfn, is_private)

        # MMIO cache: a current-generation MMIO SPTE is handled without a page fault.
        if slot is None and not prefetch and not is_private:
            level, spte = self._lookup(root, gfn, gfn_bits)
            if (
                level == PG_LEVEL_4K
                and is_mmio_spte(spte)
                and mmio_spte_generation(spte) == (self.memslot_generation & MMIO_SPTE_GEN_MASK)
            ):
                return done(Ret.EMULATE, PG_LEVEL_4K, spte)
        if not prefetch:
            self._count("pf_taken")
        # kvm_mmu_faultin_pfn: the access must match the attribute, and private memory must
        # come from guest_memfd; otherwise userspace gets KVM_EXIT_MEMORY_FAULT.
        mismatch = self.confidential and is_private != self._attrs.is_private(gfn)
        no_gmem = is_private and (slot is None or not slot.gmem)
        if mismatch or no_gmem:
            if not prefetch:
                self._count("pf_memory_fault")
            level, spte = self._lookup(root, gfn, gfn_bits)
            return done(Ret.MEMORY_FAULT, level, spte)

        fault = _PageFault(
            gfn=gfn, write=write, exec=exec, prefetch=prefetch, slot=slot, private=is_private
        )
        if slot is not None:
            self._kvm_mmu_faultin_pfn(fault)
            if self.confidential:
                # KVM_LPAGE_MIXED_FLAG: a huge mapping needs one attribute over its range.
                while fault.max_level > PG_LEVEL_4K:
                    base = _round_down(gfn, fault.max_level)
                    span = pages_per_hpage(fault.max_level)
                    if self._attrs.uniform(base, base + span) == is_private:
                        break
                    fault.max_level -= 1
        else:
            fault.max_level = PG_LEVEL_4K  # MMIO faults map at 4K
        self._kvm_mmu_hugepage_adjust(fault)
        self._op_private = is_private
        try:
            ret = self._kvm_tdp_mmu_map(root, fault, gfn_bits)
        finally:
            self._op_private = False
        if prefetch and ret == Ret.FIXED:
            self._charge(self.costs["fault_handling_ns"])
        if not prefetch:
            counter = {
                Ret.FIXED: "pf_fixed",
                Ret.SPURIOUS: "pf_spurious",
                Ret.EMULATE: "pf_emulate",
                Ret.RETRY: "pf_retry",
                Ret.WRITE_PROTECTED: "pf_write_protected",
                Ret.MEMORY_FAULT: "pf_memory_fault",
            }.get(ret)
            if counter:
                self._count(counter)
        if ret == Ret.FIXED and is_private and not prefetch and self.vm_type == "snp":
            assert slot is not None
            self._snp_guest_validate(slot, gfn)
        return done(ret, fault.level, fault.spte)

    def _kvm_mmu_faultin_pfn(self, fault: _PageFault) -> None:
        """Look up the backing page (the first touch allocates and zeroes it).

        Shared pages come from the host mapping, private ones from guest_memfd, whose folio
        size (and on SNP the RMP entry, after ``sev_gmem_prepare``) caps the level.
        """
        slot = fault.slot
        assert slot is not None
        backing_page = (fault.gfn - slot.gfn) // slot.backing_pages
        touched = slot.gmem_touched if fault.private else slot.touched
        if (slot.gmem or not fault.private) and backing_page not in touched:
            touched.add(backing_page)
            self._count("host_pages_allocated")
            self._charge(
                self.costs["host_page_alloc_ns"]
                + self.costs["host_zero_4k_ns"] * (slot.backing_pages - 1)
            )
        if not fault.private:
            fault.max_level = slot.max_level
            return
        # private_max_mapping_level: TDX (and the mirrored SW_PROTECTED) map 4K only.
        fault.max_level = PG_LEVEL_4K if self.has_mirror else min(slot.max_level, self.folio_level)
        if slot.rmp is not None:
            off = fault.gfn - slot.gfn
            if self.design == "gmem" and not slot.rmp.get(off).assigned:
                # kvm_gmem_get_pfn -> kvm_arch_gmem_prepare (sev_gmem_prepare).
                self._count("gmem_prepare")
                status = self._sev_gmem_prepare(slot, off, fault.gfn)
                if status != RMP_SUCCESS:
                    self._kvm_bug_on(f"gmem prepare RMPUPDATE failed for {fault.gfn:#x}: {status}")
            fault.max_level = min(fault.max_level, slot.rmp.level(off))

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

    def _kvm_tdp_mmu_map(self, root: MmuPage, fault: _PageFault, gfn_bits: int) -> Any:
        """Walk towards ``fault.gfn``, linking or splitting tables down to the goal level."""
        for it in _TdpIter(self, root, PG_LEVEL_4K, fault.gfn, fault.gfn + 1, gfn_bits):
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
                if sp.is_mirror:
                    self._kvm_bug_on("fault would split a huge mirror SPTE")
                    self._tdp_mmu_free_sp_unpublished(sp)
                    return Ret.RETRY
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
        pfn = slot.private_pfn(gfn) if fault.private else slot.pfn(gfn)
        exec_ok = not (self.nx_huge_pages and level > PG_LEVEL_4K)
        return make_leaf_spte(pfn, level, exec=exec_ok, prefetch=fault.prefetch)

    def _tdp_mmu_map_handle_target_level(self, fault: _PageFault, it: _TdpIter) -> Any:
        old = it.old_spte
        fault.level, fault.spte = it.level, old
        if (
            is_shadow_present_pte(old)
            and (fault.prefetch or self._is_access_allowed(fault, old))
            and is_last_spte(old, it.level)
        ):
            return Ret.SPURIOUS

        if fault.slot is None:
            new = make_mmio_spte(it.gfn, self.memslot_generation)
        else:
            new = self._make_spte(fault, it.gfn, it.level)
        if new == old:
            return Ret.SPURIOUS
        if not self._tdp_mmu_set_spte_atomic(it, new):
            return Ret.RETRY
        fault.spte = new
        if is_shadow_present_pte(old) and not is_last_spte(old, it.level):
            self._kvm_flush_remote_tlbs()  # kvm_flush_remote_tlbs_gfn(gfn, level)
        if is_mmio_spte(new):
            self._count("pf_mmio_spte_created")
            return Ret.EMULATE
        return Ret.FIXED

    def _tdx_gmem_post_populate(self, gfn: int, r: ReferenceFault) -> None:
        """v6.16: the initial-image populate issues TDH.MEM.PAGE.ADD after the map."""
        tdx = self._tdx
        if tdx is None or not r.private or not self.tdx_options.v6_16 or tdx.finalized:
            return
        status = tdx.tdh_mem_page_add(gfn, spte_to_pfn(r.spte))
        if status == TDX_SUCCESS:
            tdx.nr_premapped -= 1
        else:
            self._kvm_bug_on(f"TDH.MEM.PAGE.ADD failed for gfn {gfn:#x}: {status}")

    # ==================================================================================
    # Zapping (spec §5)
    # ==================================================================================

    def _roots_matching(self, types: int) -> list[MmuPage]:
        return [r for r in self._roots if self._tdp_mmu_root_match(r, types)]

    def _tdp_mmu_zap_leafs(self, root: MmuPage, start: int, end: int) -> tuple[bool, int]:
        """Zap present leaves intersecting ``[start, end)``; tables stay in place."""
        end = min(end, self.max_gfn)
        gfn_bits = self._root_gfn_bits(root.is_mirror)
        flush, zapped = False, 0
        for it in _TdpIter(self, root, PG_LEVEL_4K, start, end, gfn_bits):
            if not is_shadow_present_pte(it.old_spte) or not is_last_spte(it.old_spte, it.level):
                continue
            self._tdp_mmu_iter_set_spte(it, SHADOW_NONPRESENT_VALUE)
            self._charge(self.costs["spte_update_ns"])
            zapped += 1
            if not root.invalid:  # stale translations in an invalid root are harmless
                flush = True
        return flush, zapped

    def _kvm_tdp_mmu_zap_leafs(self, types: int, start: int, end: int) -> tuple[bool, int]:
        """Leaf zap of ``[start, end)`` in every root of ``types``; a batched TDX zap then
        tracks once and removes the pages it blocked."""
        flush, zapped = False, 0
        for root in self._roots_matching(types):
            f, n = self._tdp_mmu_zap_leafs(root, start, end)
            flush, zapped = flush or f, zapped + n
        if isinstance(self._external, TdxSeptHooks):
            self._external.flush_batched()
        return flush, zapped

    def _kvm_tdp_mmu_unmap_gfn_range(
        self, start: int, end: int, *, private: bool, shared: bool
    ) -> tuple[bool, int]:
        """The attribute filter picks the roots (TD: PRIVATE -> mirror, SHARED -> direct;
        other VMs: the direct root), invalid roots always included."""
        if self.has_mirror:
            types = KVM_INVALID_ROOTS
            if private:
                types |= KVM_MIRROR_ROOTS
            if shared:
                types |= KVM_DIRECT_ROOTS
        else:
            types = KVM_DIRECT_ROOTS | KVM_INVALID_ROOTS
        self._op_private = private
        try:
            return self._kvm_tdp_mmu_zap_leafs(types, start, end)
        finally:
            self._op_private = False

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
                if not self._tdp_mmu_set_spte_atomic(it, SHADOW_NONPRESENT_VALUE):
                    continue  # refused for good (a KVM_BUG_ON fired); do not spin
            else:
                self._tdp_mmu_iter_set_spte(it, SHADOW_NONPRESENT_VALUE)
            self._charge(self.costs["spte_update_ns"])

    # ==================================================================================
    # Invariants
    # ==================================================================================

    def check(self) -> None:
        """Raise :class:`InvariantError` if the model's state is inconsistent.

        After :meth:`destroy` this audits the teardown instead: nothing may be left behind.
        A bugged VM raises ``VmBugged``.
        """
        if self._destroyed:
            self._check_teardown()
            return
        self._ensure_alive()

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

        # Roots and references (a vCPU holds its direct root and, on a TD, the mirror root).
        refs: dict[int, int] = {}
        for root in [*self._vcpu_root, *self._vcpu_mirror_root]:
            if root is not None:
                if root not in self._roots:
                    fail(f"a vCPU holds root pfn {root.pfn:#x}, which is not on the root list")
                refs[root.index] = refs.get(root.index, 0) + 1
        for root in self._roots:
            if self._live.get(root.index) is not root:
                fail(f"root pfn {root.pfn:#x} is not a live table")
            if root.level != self.levels:
                fail(f"root pfn {root.pfn:#x} has level {root.level}")
            expected = refs.get(root.index, 0) + (0 if root.invalid else 1)
            if root.refcount != expected:
                fail(f"root pfn {root.pfn:#x} refcount {root.refcount}, expected {expected}")

        # Tables reachable from the roots.
        leaves = dict.fromkeys(_PAGES_STAT.values(), 0)
        seen: set[int] = set()
        non_root_tables = 0
        mirror_tables = 0
        mirror_leaves: list[tuple[int, int]] = []

        def visit(sp: MmuPage, gfn_bits: int) -> None:
            nonlocal non_root_tables, mirror_tables
            level = sp.level
            for i, spte in enumerate(sp.spt):
                # The (un-aliased) gfns that index i of this table maps.
                gfn = (sp.gfn + i * pages_per_hpage(level)) & ~gfn_bits
                if is_frozen_spte(spte):
                    fail(f"FROZEN_SPTE at rest in table pfn {sp.pfn:#x}[{i}]")
                if not is_shadow_present_pte(spte):
                    if spte != SHADOW_NONPRESENT_VALUE and not is_mmio_spte(spte):
                        fail(f"odd non-present SPTE {spte:#x} at level {level} gfn {gfn:#x}")
                    continue
                if is_last_spte(spte, level):
                    self._check_leaf(spte, level, gfn, sp.is_mirror, fail)
                    leaves[_PAGES_STAT.get(level, "pages_1g")] += 1
                    if sp.is_mirror:
                        mirror_leaves.append((gfn, spte_to_pfn(spte)))
                    continue
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
                if sp.is_mirror:
                    mirror_tables += 1
                visit(child, gfn_bits)

        for root in self._roots:
            seen.add(root.index)
            visit(root, self._root_gfn_bits(root.is_mirror))

        for name, count in leaves.items():
            if self._stats[name] != count:
                fail(f"{name} = {self._stats[name]} but {count} present leaves are mapped")
        if self._stats["tdp_mmu_pages"] != non_root_tables:
            fail(
                f"tdp_mmu_pages = {self._stats['tdp_mmu_pages']}"
                f" but {non_root_tables} tables are linked"
            )
        if self._tdx is not None:
            # The mirror tree and the TDX module's S-EPT agree entry for entry.
            sept_tables, sept_leaves = self._tdx.snapshot()
            if sorted(sept_leaves) != sorted(mirror_leaves):
                fail(
                    f"mirror and S-EPT disagree: {len(mirror_leaves)} vs {len(sept_leaves)} "
                    "private leaves"
                )
            if sept_tables != mirror_tables:
                fail(f"{mirror_tables} mirror page tables but {sept_tables} S-EPT tables")
        if len(seen) != len(self._live):
            fail(f"{len(self._live) - len(seen)} live tables are not reachable from any root")
        if self._stats["roots_allocated"] - self._stats["roots_freed"] != len(self._roots):
            fail("roots_allocated - roots_freed != number of roots")

    def _check_leaf(self, spte: int, level: int, gfn: int, mirror: bool, fail: Any) -> None:
        if level > PG_LEVEL_1G:
            fail(f"leaf at level {level} (gfn {gfn:#x})")
        end = gfn + pages_per_hpage(level)
        slot = self._gfn_to_memslot(gfn)
        if slot is None or end > slot.end:
            fail(f"leaf {spte:#x} at level {level} gfn {gfn:#x} is not inside one memslot")
            return
        if level > slot.max_level:
            fail(f"level-{level} leaf at gfn {gfn:#x} in a slot backed by {slot.backing} bytes")
        # Private memory comes from guest_memfd, shared memory from the host mapping.
        private = mirror or (
            self.confidential and not self.has_mirror and self._attrs.is_private(gfn)
        )
        pfn = slot.private_pfn(gfn) if private else slot.pfn(gfn)
        if spte_to_pfn(spte) != pfn:
            fail(f"leaf at gfn {gfn:#x} maps pfn {spte_to_pfn(spte):#x}, expected {pfn:#x}")
        if self.confidential and self._attrs.uniform(gfn, end) != private:
            fail(f"leaf at gfn {gfn:#x} (level {level}) disagrees with the memory attributes")
        if private and slot.rmp is not None:
            # SNP: a private NPT leaf needs an RMP entry assigned to that gpa, of its size.
            e = slot.rmp.get(gfn - slot.gfn)
            if not e.assigned or e.gfn != gfn:
                fail(f"private NPT leaf at gfn {gfn:#x} but its RMP entry is not assigned to it")
            if level == PG_LEVEL_2M and not e.size_2m:
                fail(f"2M private NPT leaf at gfn {gfn:#x} over 4K RMP entries")
        allowed = {
            make_leaf_spte(spte_to_pfn(spte), level, exec=x, prefetch=p)
            for x in (True, False)
            for p in (True, False)
        }
        if spte not in allowed:
            fail(f"leaf {spte:#x} at level {level} gfn {gfn:#x} is not a valid leaf")

    def _check_teardown(self) -> None:
        """After destroy: no roots, no KVM or S-EPT tables, no private leaf, RMP all shared."""
        if self._roots or self._live:
            raise InvariantError(
                f"teardown left {len(self._roots)} root(s) and {len(self._live)} table(s)"
            )
        if self._tdx is not None:
            tables, leaves = self._tdx.snapshot()
            if tables or leaves:
                raise InvariantError(
                    f"teardown left {tables} S-EPT table(s) and {len(leaves)} private leaf(s)"
                )
        for slot in sorted(self._memslots.values(), key=lambda s: s.gfn):
            if slot.rmp is not None and slot.rmp.assigned_offsets():
                off = slot.rmp.assigned_offsets()[0]
                raise InvariantError(f"teardown left gfn {slot.gfn + off:#x} assigned in the RMP")
