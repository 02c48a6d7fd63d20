"""SPTE values of the EPT flavour KVM's TDP MMU uses (spec: shared/spec/kvm-tdp-mmu.md §1).

The constructors call the engine's own (so they can never disagree with what ``vm.walk``
returns); the predicates are written here from the bit layout so that tests can check the two
against each other.
"""

from tdpmmu import _core
from tdpmmu.types import SpteFields

__all__ = [
    "ACCESSED",
    "DIRTY",
    "FROZEN_SPTE",
    "HOST_WRITABLE",
    "MMU_PRESENT",
    "MMU_WRITABLE",
    "PAGE_SIZE",
    "PFN_MASK",
    "SHADOW_NONPRESENT_VALUE",
    "decode",
    "is_frozen",
    "is_last",
    "is_shadow_present",
    "make_leaf",
    "make_mmio",
    "make_nonleaf",
    "pfn",
]

#: BIT(63): suppress-#VE; also the value of every non-present entry (fresh tables, zaps).
SHADOW_NONPRESENT_VALUE: int = _core.SHADOW_NONPRESENT_VALUE
#: 0x8000_0000_0000_05A0: an entry a lock-sharing thread is in the middle of updating.
FROZEN_SPTE: int = _core.FROZEN_SPTE

# Bit layout (§1.1, §1.2); only what the predicates below need.
PAGE_SIZE = 1 << 7  # huge leaf at level 2/3
ACCESSED = 1 << 8
DIRTY = 1 << 9
MMU_PRESENT = 1 << 11  # software "shadow present": backed by memory or a child table
HOST_WRITABLE = 1 << 57
MMU_WRITABLE = 1 << 58
PFN_MASK = ((1 << 52) - 1) & ~0xFFF  # bits 51:12


def decode(value: int) -> SpteFields:
    """Name the fields of an SPTE (present, frozen, mmio, pfn, rwx, memtype, ...)."""
    return _core.spte_decode(value)


def make_leaf(pfn: int, level: int = 1, *, exec: bool = True, prefetch: bool = False) -> int:
    """Writable write-back leaf for host ``pfn`` at ``level`` (1=4K, 2=2M, 3=1G).

    ``exec=False`` drops X (NX huge pages); ``prefetch=True`` leaves Accessed clear.
    """
    return _core.make_leaf_spte(pfn, level, exec=exec, prefetch=prefetch)


def make_nonleaf(child_pfn: int) -> int:
    """Entry pointing at the page table at host ``child_pfn``."""
    return _core.make_nonleaf_spte(child_pfn)


def make_mmio(gfn: int, generation: int) -> int:
    """MMIO SPTE (EPT misconfig encoding) caching ``gfn`` for memslot ``generation``."""
    return _core.make_mmio_spte(gfn, generation)


def is_shadow_present(value: int) -> bool:
    """Bit 11 only, as KVM's ``is_shadow_present_pte``: MMIO and frozen entries are not."""
    return bool(value & MMU_PRESENT)


def is_frozen(value: int) -> bool:
    """Exact equality, as KVM's ``is_frozen_spte``."""
    return value == FROZEN_SPTE


def is_last(value: int, level: int) -> bool:
    """Whether a (present) entry at ``level`` is a leaf: any 4K entry, or a huge one."""
    return level == 1 or bool(value & PAGE_SIZE)


def pfn(value: int) -> int:
    """Host page-frame number in bits 51:12 (a data page for a leaf, a table for a non-leaf)."""
    return (value & PFN_MASK) >> 12
