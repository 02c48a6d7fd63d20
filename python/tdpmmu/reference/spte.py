"""SPTE bits, encodings and page-table geometry (KVM's spte.h / spte.c, EPT flavour).

Pure functions and constants: EPT with A/D bits (or, with ``ad_bits=False``, the A/D-disabled
SPTE type and access tracking), write-back memory type plus IPAT, the
``SHADOW_NONPRESENT_VALUE`` that fresh tables are filled with and zaps write, and the
``FROZEN_SPTE`` that marks an entry someone is updating (spec §1).
"""

from __future__ import annotations

# --------------------------------------------------------------------------------------
# Geometry (spec §1.7)
# --------------------------------------------------------------------------------------

PAGE_SHIFT = 12
SPTE_LEVEL_BITS = 9
SPTE_ENT_PER_PAGE = 512
PG_LEVEL_4K, PG_LEVEL_2M, PG_LEVEL_1G = 1, 2, 3
PT64_ROOT_MAX_LEVEL = 5


def pages_per_hpage(level: int) -> int:
    """4K pages covered by one SPTE at ``level`` (``KVM_PAGES_PER_HPAGE``)."""
    return 1 << (SPTE_LEVEL_BITS * (level - 1))


def spte_index(gfn: int, level: int) -> int:
    """Index of the entry for ``gfn`` in a table of ``level`` (``SPTE_INDEX``)."""
    return (gfn >> (SPTE_LEVEL_BITS * (level - 1))) & (SPTE_ENT_PER_PAGE - 1)


def gfn_round_for_level(gfn: int, level: int) -> int:
    """The first gfn of the ``level`` entry that maps ``gfn``."""
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
#: The TDP A/D type of a present SPTE (bits 53:52); 1 = A/D disabled (``enable_ept_ad_bits=0``).
SPTE_TDP_AD_SHIFT = 52
SPTE_TDP_AD_MASK = 3 << SPTE_TDP_AD_SHIFT
SPTE_TDP_AD_DISABLED = 1 << SPTE_TDP_AD_SHIFT
#: Access tracking keeps R and X aside at bits 54 and 56 (W is not kept).
SHADOW_ACC_TRACK_SAVED_BITS_MASK = SPTE_READABLE | SPTE_EXECUTABLE
SHADOW_ACC_TRACK_SAVED_BITS_SHIFT = 54

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
    """KVM's ``is_shadow_present_pte``: bit 11 of ``spte`` (MMIO and FROZEN entries are not
    present)."""
    return bool(spte & SPTE_MMU_PRESENT_MASK)


def is_large_pte(spte: int) -> bool:
    """Bit 7 (page size) of ``spte``: a huge leaf at level 2 or 3."""
    return bool(spte & PT_PAGE_SIZE_MASK)


def is_last_spte(spte: int, level: int) -> bool:
    """True if an entry at ``level`` maps memory rather than pointing to a table."""
    return level == PG_LEVEL_4K or is_large_pte(spte)


def is_frozen_spte(spte: int) -> bool:
    """Whether ``spte`` is exactly ``FROZEN_SPTE`` (an entry being updated)."""
    return spte == FROZEN_SPTE


def is_mmio_spte(spte: int) -> bool:
    """Whether ``spte`` is an MMIO SPTE (``SHADOW_MMIO_MASK`` bits equal ``SHADOW_MMIO_VALUE``)."""
    return (spte & SHADOW_MMIO_MASK) == SHADOW_MMIO_VALUE


def spte_to_pfn(spte: int) -> int:
    """The host pfn in bits 51:12 of ``spte``."""
    return (spte & SPTE_BASE_ADDR_MASK) >> PAGE_SHIFT


def make_leaf_spte(
    pfn: int, level: int, *, exec: bool = True, prefetch: bool = False, ad: bool = True
) -> int:
    """``make_spte`` for a writable WB leaf of a direct (default-VM) root.

    ``exec=False`` models the NX huge page rule (huge leaves lose X); ``prefetch=True``
    leaves the Accessed bit clear, as pre-faulted mappings are marked for access tracking.
    ``ad=False`` (A/D bits off): the leaf is of the A/D-disabled type, without A and D (a
    pre-fault's leaf is marked for access tracking by the caller, after W is decided).
    """
    spte = _LEAF_BITS | (pfn << PAGE_SHIFT)
    if level > PG_LEVEL_4K:
        spte |= PT_PAGE_SIZE_MASK
    if not prefetch:
        spte |= SPTE_ACCESSED
    if not exec:
        spte &= ~SPTE_EXECUTABLE
    if not ad:
        spte = (spte & ~(SPTE_ACCESSED | SPTE_DIRTY)) | SPTE_TDP_AD_DISABLED
    return spte


def make_nonleaf_spte(child_pfn: int, *, ad: bool = True) -> int:
    """Entry pointing to the table at host pfn ``child_pfn`` (``ad=False``: of the
    A/D-disabled type, without A)."""
    spte = (child_pfn << PAGE_SHIFT) | _NONLEAF_BITS
    if not ad:
        spte = (spte & ~SPTE_ACCESSED) | SPTE_TDP_AD_DISABLED
    return spte


def spte_ad_enabled(spte: int) -> bool:
    """``spte_ad_enabled``: ``spte`` is not of the A/D-disabled type."""
    return spte & SPTE_TDP_AD_MASK != SPTE_TDP_AD_DISABLED


def is_access_track_spte(spte: int) -> bool:
    """``is_access_track_spte``: an A/D-disabled SPTE without R, W and X (aged)."""
    return not spte_ad_enabled(spte) and not spte & SPTE_RWX


def is_accessed_spte(spte: int) -> bool:
    """``is_accessed_spte``: A set (A/D on), or not access-tracked (A/D off)."""
    if spte_ad_enabled(spte):
        return bool(spte & SPTE_ACCESSED)
    return not is_access_track_spte(spte)


def mark_spte_for_access_track(spte: int) -> int:
    """``mark_spte_for_access_track``: A/D on, clear A; A/D off, save R and X at bits 54/56
    and clear RWX (an SPTE already tracked is returned as it is)."""
    if spte_ad_enabled(spte):
        return spte & ~SPTE_ACCESSED
    if is_access_track_spte(spte):
        return spte
    saved = (spte & SHADOW_ACC_TRACK_SAVED_BITS_MASK) << SHADOW_ACC_TRACK_SAVED_BITS_SHIFT
    return (spte | saved) & ~SPTE_RWX


def restore_acc_track_spte(spte: int) -> int:
    """``restore_acc_track_spte``: the saved R and X back (W stays clear), the field emptied."""
    field = SHADOW_ACC_TRACK_SAVED_BITS_MASK << SHADOW_ACC_TRACK_SAVED_BITS_SHIFT
    saved = (spte >> SHADOW_ACC_TRACK_SAVED_BITS_SHIFT) & SHADOW_ACC_TRACK_SAVED_BITS_MASK
    return (spte & ~field) | saved


def is_hw_present(spte: int) -> bool:
    """Whether the CPU sees the leaf as present (any of R, W, X): what a fault's error code
    reports; an access-tracked SPTE is shadow-present but not present to hardware."""
    return is_shadow_present_pte(spte) and bool(spte & SPTE_RWX)


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
            # make_spte_executable: an access-tracked SPTE gets X in its saved bits.
            if is_access_track_spte(child):
                child |= SPTE_EXECUTABLE << SHADOW_ACC_TRACK_SAVED_BITS_SHIFT
            else:
                child |= SPTE_EXECUTABLE
    return child
