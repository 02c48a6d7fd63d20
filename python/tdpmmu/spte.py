"""SPTE values of the EPT flavour KVM's TDP MMU uses (KVM: arch/x86/kvm/mmu/spte.h; docs/model.md).

The constructors call the engine's own (so they can never disagree with what ``vm.walk``
returns); the predicates are written here from the bit layout so that tests can check the two
against each other.
"""

from tdpmmu import _core
from tdpmmu.types import SpteFields

__all__ = [
    "ACCESSED",
    "ACC_TRACK_SAVED_SHIFT",
    "AD_DISABLED",
    "DIRTY",
    "FROZEN_SPTE",
    "HOST_WRITABLE",
    "MMU_PRESENT",
    "MMU_WRITABLE",
    "PAGE_SIZE",
    "PFN_MASK",
    "SHADOW_NONPRESENT_VALUE",
    "ad_enabled",
    "decode",
    "is_access_tracked",
    "is_frozen",
    "is_last",
    "is_shadow_present",
    "make_leaf",
    "make_mmio",
    "make_nonleaf",
    "pfn",
    "restore_access_tracked",
]

#: BIT(63): suppress-#VE; also the value of every non-present entry (fresh tables, zaps).
SHADOW_NONPRESENT_VALUE: int = _core.SHADOW_NONPRESENT_VALUE
#: 0x8000_0000_0000_05A0: an entry a lock-sharing thread is in the middle of updating.
FROZEN_SPTE: int = _core.FROZEN_SPTE

# Bit layout (§1.1, §1.2); only what the predicates below need.
PAGE_SIZE = 1 << 7  # huge leaf at level 2/3
#: Bit 8: Accessed (clear in a pre-fault's leaf).
ACCESSED = 1 << 8
#: Bit 9: Dirty.
DIRTY = 1 << 9
MMU_PRESENT = 1 << 11  # software "shadow present": backed by memory or a child table
#: Bit 57: the host page is writable (KVM's shadow_host_writable_mask).
HOST_WRITABLE = 1 << 57
#: Bit 58: KVM may make the SPTE writable (KVM's shadow_mmu_writable_mask).
MMU_WRITABLE = 1 << 58
PFN_MASK = ((1 << 52) - 1) & ~0xFFF  # bits 51:12
#: Bits 53:52 = 1: the A/D-disabled SPTE type of a VM with ``ad_bits=False`` (KVM's
#: ``SPTE_TDP_AD_DISABLED``).
AD_DISABLED = 1 << 52
_AD_MASK = 3 << 52
_RWX = 0x7
#: Where an access-tracked SPTE keeps its R and X bits (bits 54 and 56; KVM's
#: ``SHADOW_ACC_TRACK_SAVED_BITS_SHIFT``).
ACC_TRACK_SAVED_SHIFT = 54
_SAVED = 0x5  # R | X


def decode(value: int) -> SpteFields:
    """Name the fields of an SPTE (present, frozen, mmio, pfn, rwx, memtype, ...).

    Args:
        value: a 64-bit SPTE, an int in ``0..2**64`` (from ``VM.walk``, ``VM.spte``,
            ``Fault.spte`` or ``VM.tables()``).

    Returns:
        tdpmmu.types.SpteFields: a dict of the fields (see there); the level is not known, so
        ``kind`` says which of leaf and non-leaf a present entry can be.

    Raises:
        OverflowError: ``value`` is negative or >= 2**64.
        TypeError: ``value`` is not an int.
    """
    return _core.spte_decode(value)


def make_leaf(pfn: int, level: int = 1, *, exec: bool = True, prefetch: bool = False) -> int:
    """The writable write-back leaf SPTE KVM makes for host ``pfn`` at ``level``.

    ``pfn << 12 | 0x8600_0000_0000_0B77`` at 4 KiB; a huge leaf also sets bit 7.

    Args:
        pfn: host page-frame number, in ``0..2**40`` (used as given, not aligned).
        level: 1 = 4 KiB (default), 2 = 2 MiB, 3 = 1 GiB.
        exec: keep X (default True); False drops it, as for a huge leaf under NX huge pages.
        prefetch: a pre-fault's leaf, with Accessed clear (default False).

    Returns:
        int: the SPTE.

    Raises:
        ConfigError: naming ``pfn`` or ``level`` out of range.
        TypeError: an argument of the wrong type (a bool ``pfn``, an int ``exec``).
    """
    return _core.make_leaf_spte(pfn, level, exec=exec, prefetch=prefetch)


def make_nonleaf(child_pfn: int) -> int:
    """The non-leaf SPTE linking the page table at host ``child_pfn``.

    ``child_pfn << 12 | 0x8000_0000_0000_0907`` (present, RWX, Accessed, suppress-#VE).

    Args:
        child_pfn: host page-frame number of the child table, in ``0..2**40``.

    Returns:
        int: the SPTE.

    Raises:
        ConfigError: naming ``child_pfn`` out of range.
        TypeError: ``child_pfn`` is not an int (or is a bool).
    """
    return _core.make_nonleaf_spte(child_pfn)


def make_mmio(gfn: int, generation: int) -> int:
    """The MMIO SPTE (an EPT-misconfig encoding) caching ``gfn`` for memslot ``generation``.

    What KVM installs for an access to a gfn in no memslot; a later access in the same
    memslot generation is emulated without a page fault.

    Args:
        gfn: the guest page-frame number, in ``0..2**40``.
        generation: the memslot generation (``VM.memslot_generation``), in ``0..2**19``.

    Returns:
        int: the SPTE.

    Raises:
        ConfigError: naming ``gfn`` or ``generation`` out of range.
        TypeError: an argument is not an int (or is a bool).
    """
    return _core.make_mmio_spte(gfn, generation)


def is_shadow_present(value: int) -> bool:
    """Whether an SPTE is present: bit 11 only, as KVM's ``is_shadow_present_pte``.

    Args:
        value: the SPTE (an int).

    Returns:
        bool: True for leaves and non-leaves; False for non-present, MMIO and frozen
        entries. Never raises for an int.
    """
    return bool(value & MMU_PRESENT)


def is_frozen(value: int) -> bool:
    """Whether an SPTE is ``FROZEN_SPTE``: exact equality, as KVM's ``is_frozen_spte``.

    Args:
        value: the SPTE (an int).

    Returns:
        bool: True only for ``FROZEN_SPTE`` (an entry another thread is updating). Never
        raises.
    """
    return value == FROZEN_SPTE


def is_last(value: int, level: int) -> bool:
    """Whether a present entry at ``level`` is a leaf, as KVM's ``is_last_spte``.

    Args:
        value: the SPTE (an int), assumed present.
        level: its level, 1 = 4 KiB, 2 = 2 MiB, 3 = 1 GiB, ...

    Returns:
        bool: True for any 4 KiB entry, or one with bit 7 (page size) set. Never raises.
    """
    return level == 1 or bool(value & PAGE_SIZE)


def pfn(value: int) -> int:
    """The host page-frame number in bits 51:12 of an SPTE, as KVM's ``spte_to_pfn``.

    Args:
        value: the SPTE (an int).

    Returns:
        int: a data page's pfn for a leaf, the child table's for a non-leaf (an MMIO SPTE
        holds its gfn there). Never raises.
    """
    return (value & PFN_MASK) >> 12


def ad_enabled(value: int) -> bool:
    """Whether a present SPTE has EPT A/D bits, as KVM's ``spte_ad_enabled``.

    Args:
        value: the SPTE (an int), assumed present.

    Returns:
        bool: False for the A/D-disabled type (bits 53:52 = 1) that a VM built with
        ``ad_bits=False`` uses. Never raises.
    """
    return value & _AD_MASK != AD_DISABLED


def is_access_tracked(value: int) -> bool:
    """Whether a present SPTE is access-tracked, as KVM's ``is_access_track_spte``.

    Aging on a VM with ``ad_bits=False`` (``VM.age_gfn_range``) clears R, W and X of a leaf
    and keeps R and X at bits 54/56, so the next access faults and ``fast_page_fault``
    restores it.

    Args:
        value: the SPTE (an int), assumed present.

    Returns:
        bool: True for an A/D-disabled SPTE with none of R, W, X. Never raises.
    """
    return not ad_enabled(value) and not value & _RWX


def restore_access_tracked(value: int) -> int:
    """The SPTE with its saved R and X bits put back, as KVM's ``restore_acc_track_spte``.

    Args:
        value: an access-tracked SPTE (an int).

    Returns:
        int: the SPTE with R and X from bits 54/56 and those bits clear; W stays clear (the
        fast path sets it only for a write to an MMU-writable leaf). Never raises.
    """
    saved = (value >> ACC_TRACK_SAVED_SHIFT) & _SAVED
    return (value & ~(_SAVED << ACC_TRACK_SAVED_SHIFT)) | saved
