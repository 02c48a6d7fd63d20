//! SPTE bit layout of the EPT flavour KVM's TDP MMU uses (spec §1): constants, constructors and
//! predicates. Pure functions; every constant is pinned by a unit test.

/// Suppress-#VE bit; also the value of every non-present SPTE KVM writes.
pub const SHADOW_NONPRESENT_VALUE: u64 = 1 << 63;
/// Marks an entry that a lock-sharing thread is in the middle of updating.
pub const FROZEN_SPTE: u64 = SHADOW_NONPRESENT_VALUE | 0x5a0;

pub const PT_READABLE: u64 = 1 << 0;
pub const PT_WRITABLE: u64 = 1 << 1;
pub const PT_EXEC: u64 = 1 << 2;
pub const RWX_MASK: u64 = 0x7;
pub const MT_SHIFT: u32 = 3;
pub const MT_WB: u64 = 6 << MT_SHIFT;
pub const IPAT: u64 = 1 << 6;
pub const PAGE_SIZE: u64 = 1 << 7;
pub const ACCESSED: u64 = 1 << 8;
pub const DIRTY: u64 = 1 << 9;
pub const MMU_PRESENT: u64 = 1 << 11;
pub const HOST_WRITABLE: u64 = 1 << 57;
pub const MMU_WRITABLE: u64 = 1 << 58;
pub const SUPPRESS_VE: u64 = 1 << 63;
/// The TDP A/D type of a present SPTE (bits 53:52): 0 = A/D enabled, 1 = A/D disabled (KVM
/// runs with `enable_ept_ad_bits=0`: the CPU sets neither bit and aging uses access tracking).
pub const SPTE_TDP_AD_SHIFT: u32 = 52;
pub const SPTE_TDP_AD_MASK: u64 = 3 << SPTE_TDP_AD_SHIFT;
pub const SPTE_TDP_AD_DISABLED: u64 = 1 << SPTE_TDP_AD_SHIFT;
/// Access tracking (A/D disabled): the R and X bits an access-tracked SPTE keeps aside, and
/// where (bits 54 and 56); W is not kept, the fast path gives it back to an MMU-writable SPTE.
pub const ACC_TRACK_SAVED_BITS_MASK: u64 = PT_READABLE | PT_EXEC;
pub const ACC_TRACK_SAVED_BITS_SHIFT: u32 = 54;
/// Bits 51:12.
pub const PFN_MASK: u64 = ((1u64 << 52) - 1) & !0xfff;

/// EPT MMIO SPTEs: W|X without R is an illegal encoding, so the access takes a misconfig exit.
pub const MMIO_VALUE_EPT: u64 = 0x6;
pub const MMIO_MASK_EPT: u64 = RWX_MASK | SUPPRESS_VE;
/// TDX VMs use MMIO value 0 (and no SVE) so the access becomes a #VE in the TD.
pub const MMIO_VALUE_TDX: u64 = 0;

pub const MMIO_GEN_LOW_SHIFT: u32 = 3;
pub const MMIO_GEN_LOW_BITS: u32 = 8;
pub const MMIO_GEN_HIGH_SHIFT: u32 = 52;
pub const MMIO_GEN_HIGH_BITS: u32 = 11;
pub const MMIO_GEN_MASK: u64 = (1 << (MMIO_GEN_LOW_BITS + MMIO_GEN_HIGH_BITS)) - 1;

/// 4K writable write-back leaf with A/D and IPAT, without the PFN.
pub const LEAF_4K_BASE: u64 = SUPPRESS_VE
    | MMU_WRITABLE
    | HOST_WRITABLE
    | MMU_PRESENT
    | DIRTY
    | ACCESSED
    | IPAT
    | MT_WB
    | PT_EXEC
    | PT_WRITABLE
    | PT_READABLE;
/// Non-leaf without the child address.
pub const NONLEAF_BASE: u64 =
    SUPPRESS_VE | MMU_PRESENT | ACCESSED | PT_EXEC | PT_WRITABLE | PT_READABLE;

pub const PG_LEVEL_4K: u8 = 1;
pub const PG_LEVEL_2M: u8 = 2;
pub const PG_LEVEL_1G: u8 = 3;
pub const ENTRIES_PER_TABLE: usize = 512;

/// 4K pages mapped by one entry at `level` (1, 512, 262144, ...).
#[inline(always)]
pub const fn pages_per_level(level: u8) -> u64 {
    1u64 << (9 * (level as u32 - 1))
}

/// Index of `gfn` in a table at `level`.
#[inline(always)]
pub const fn index(gfn: u64, level: u8) -> usize {
    ((gfn >> (9 * (level as u32 - 1))) & 511) as usize
}

#[inline(always)]
pub const fn round_gfn(gfn: u64, level: u8) -> u64 {
    gfn & !(pages_per_level(level) - 1)
}

/// Leaf SPTE for `pfn` at `level` (`make_spte` with ACC_ALL and a writable host page).
/// `exec` false drops X (NX huge pages); `prefetch` leaves A clear (access tracking).
#[inline(always)]
pub const fn make_leaf_spte(pfn: u64, level: u8, exec: bool, prefetch: bool) -> u64 {
    let mut spte = LEAF_4K_BASE | ((pfn << 12) & PFN_MASK);
    if level > PG_LEVEL_4K {
        spte |= PAGE_SIZE;
    }
    if !exec {
        spte &= !PT_EXEC;
    }
    if prefetch {
        spte &= !ACCESSED;
    }
    spte
}

#[inline(always)]
pub const fn make_nonleaf_spte(child_pfn: u64) -> u64 {
    NONLEAF_BASE | ((child_pfn << 12) & PFN_MASK)
}

/// `make_spte`'s leaf of a VM with A/D bits on (`ad`, as `make_leaf_spte`) or off: without A/D
/// the leaf carries the A/D-disabled type and neither A nor D. A pre-fault's leaf (`prefetch`)
/// is then not yet access-tracked: the caller marks it after deciding W
/// (`mark_spte_for_access_track`).
#[inline(always)]
pub const fn make_leaf_spte_ad(pfn: u64, level: u8, exec: bool, prefetch: bool, ad: bool) -> u64 {
    let spte = make_leaf_spte(pfn, level, exec, prefetch);
    if ad {
        spte
    } else {
        (spte & !(ACCESSED | DIRTY)) | SPTE_TDP_AD_DISABLED
    }
}

/// `make_nonleaf_spte` of a VM with A/D bits on (`ad`) or off (A/D-disabled type, no A).
#[inline(always)]
pub const fn make_nonleaf_spte_ad(child_pfn: u64, ad: bool) -> u64 {
    let spte = make_nonleaf_spte(child_pfn);
    if ad {
        spte
    } else {
        (spte & !ACCESSED) | SPTE_TDP_AD_DISABLED
    }
}

/// `spte_ad_enabled`: the SPTE is not of the A/D-disabled type.
#[inline(always)]
pub const fn spte_ad_enabled(spte: u64) -> bool {
    spte & SPTE_TDP_AD_MASK != SPTE_TDP_AD_DISABLED
}

/// `is_access_track_spte`: an A/D-disabled SPTE whose RWX bits aging took away.
#[inline(always)]
pub const fn is_access_track_spte(spte: u64) -> bool {
    !spte_ad_enabled(spte) && spte & RWX_MASK == 0
}

/// `is_accessed_spte`: A set (A/D on), or not access-tracked (A/D off).
#[inline(always)]
pub const fn is_accessed_spte(spte: u64) -> bool {
    if spte_ad_enabled(spte) {
        spte & ACCESSED != 0
    } else {
        !is_access_track_spte(spte)
    }
}

/// `mark_spte_for_access_track`: with A/D on, clear A; with A/D off, keep R and X in the
/// saved-bits field and clear RWX, so the next access faults (an SPTE already tracked is
/// returned unchanged).
#[inline(always)]
pub const fn mark_spte_for_access_track(spte: u64) -> u64 {
    if spte_ad_enabled(spte) {
        return spte & !ACCESSED;
    }
    if is_access_track_spte(spte) {
        return spte;
    }
    let saved = (spte & ACC_TRACK_SAVED_BITS_MASK) << ACC_TRACK_SAVED_BITS_SHIFT;
    (spte | saved) & !RWX_MASK
}

/// `restore_acc_track_spte`: put the saved R and X bits back (W stays clear) and empty the
/// saved-bits field.
#[inline(always)]
pub const fn restore_acc_track_spte(spte: u64) -> u64 {
    let field = ACC_TRACK_SAVED_BITS_MASK << ACC_TRACK_SAVED_BITS_SHIFT;
    let saved = (spte >> ACC_TRACK_SAVED_BITS_SHIFT) & ACC_TRACK_SAVED_BITS_MASK;
    (spte & !field) | saved
}

/// Whether the CPU sees the leaf as present (EPT: any of R, W, X), which is what a fault's
/// error code reports; an access-tracked SPTE is shadow-present but not present to hardware.
#[inline(always)]
pub const fn is_hw_present(spte: u64) -> bool {
    is_shadow_present(spte) && spte & RWX_MASK != 0
}

/// MMIO SPTE (EPT flavour): generation split over bits 3–10 and 52–62, GPA in 51:12.
#[inline(always)]
pub const fn make_mmio_spte(gfn: u64, generation: u64) -> u64 {
    let generation = generation & MMIO_GEN_MASK;
    let low = generation & ((1 << MMIO_GEN_LOW_BITS) - 1);
    let high = generation >> MMIO_GEN_LOW_BITS;
    MMIO_VALUE_EPT
        | (low << MMIO_GEN_LOW_SHIFT)
        | (high << MMIO_GEN_HIGH_SHIFT)
        | ((gfn << 12) & PFN_MASK)
}

/// Child of a huge SPTE being split (`make_small_spte`).
#[inline(always)]
pub const fn make_small_spte(huge: u64, child_level: u8, index: usize, nx_huge_pages: bool) -> u64 {
    let mut spte = huge + ((index as u64 * pages_per_level(child_level)) << 12);
    if child_level == PG_LEVEL_4K {
        spte &= !PAGE_SIZE;
        if nx_huge_pages {
            // make_spte_executable: an access-tracked SPTE gets X in its saved bits.
            if is_access_track_spte(spte) {
                spte |= PT_EXEC << ACC_TRACK_SAVED_BITS_SHIFT;
            } else {
                spte |= PT_EXEC;
            }
        }
    }
    spte
}

#[inline(always)]
pub const fn is_shadow_present(spte: u64) -> bool {
    spte & MMU_PRESENT != 0
}

#[inline(always)]
pub const fn is_frozen(spte: u64) -> bool {
    spte == FROZEN_SPTE
}

#[inline(always)]
pub const fn is_large(spte: u64) -> bool {
    spte & PAGE_SIZE != 0
}

#[inline(always)]
pub const fn is_last(spte: u64, level: u8) -> bool {
    level == PG_LEVEL_4K || is_large(spte)
}

#[inline(always)]
pub const fn is_mmio(spte: u64) -> bool {
    spte & MMIO_MASK_EPT == MMIO_VALUE_EPT
}

#[inline(always)]
pub const fn is_writable(spte: u64) -> bool {
    spte & PT_WRITABLE != 0
}

#[inline(always)]
pub const fn is_executable(spte: u64) -> bool {
    spte & PT_EXEC != 0
}

#[inline(always)]
pub const fn spte_to_pfn(spte: u64) -> u64 {
    (spte & PFN_MASK) >> 12
}

#[inline(always)]
pub const fn mmio_generation(spte: u64) -> u64 {
    let low = (spte >> MMIO_GEN_LOW_SHIFT) & ((1 << MMIO_GEN_LOW_BITS) - 1);
    let high = (spte >> MMIO_GEN_HIGH_SHIFT) & ((1 << MMIO_GEN_HIGH_BITS) - 1);
    low | (high << MMIO_GEN_LOW_BITS)
}

#[inline(always)]
pub const fn mmio_gfn(spte: u64) -> u64 {
    spte_to_pfn(spte)
}

/// Does a present leaf already allow this access? A read needs R (set on every leaf but an
/// access-tracked one), a write W, a fetch X.
#[inline(always)]
pub const fn access_allowed(spte: u64, write: bool, exec: bool) -> bool {
    spte & PT_READABLE != 0 && (!write || is_writable(spte)) && (!exec || is_executable(spte))
}

/// A human-oriented breakdown, used by `tdpmmu.spte.decode`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    pub value: u64,
    pub kind: &'static str,
    pub present: bool,
    pub frozen: bool,
    pub mmio: bool,
    pub readable: bool,
    pub writable: bool,
    pub executable: bool,
    pub memtype: u8,
    pub ipat: bool,
    pub large: bool,
    pub accessed: bool,
    pub dirty: bool,
    pub host_writable: bool,
    pub mmu_writable: bool,
    pub suppress_ve: bool,
    pub pfn: u64,
    pub mmio_generation: Option<u64>,
}

pub fn decode(value: u64) -> Decoded {
    let frozen = is_frozen(value);
    let mmio = !frozen && is_mmio(value);
    let present = is_shadow_present(value);
    let kind = if frozen {
        "frozen"
    } else if mmio {
        "mmio"
    } else if !present {
        "nonpresent"
    } else if is_large(value) {
        "huge-leaf-or-4k-nonleaf"
    } else {
        "leaf-or-nonleaf"
    };
    Decoded {
        value,
        kind,
        present,
        frozen,
        mmio,
        readable: value & PT_READABLE != 0,
        writable: is_writable(value),
        executable: is_executable(value),
        memtype: ((value >> MT_SHIFT) & 7) as u8,
        ipat: value & IPAT != 0,
        large: is_large(value),
        accessed: value & ACCESSED != 0,
        dirty: value & DIRTY != 0,
        host_writable: value & HOST_WRITABLE != 0,
        mmu_writable: value & MMU_WRITABLE != 0,
        suppress_ve: value & SUPPRESS_VE != 0,
        pfn: spte_to_pfn(value),
        mmio_generation: if mmio {
            Some(mmio_generation(value))
        } else {
            None
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_match_kvm() {
        assert_eq!(SHADOW_NONPRESENT_VALUE, 0x8000_0000_0000_0000);
        assert_eq!(FROZEN_SPTE, 0x8000_0000_0000_05a0);
        assert_eq!(LEAF_4K_BASE, 0x8600_0000_0000_0b77);
        assert_eq!(NONLEAF_BASE, 0x8000_0000_0000_0907);
        assert_eq!(LEAF_4K_BASE & !IPAT & 0xfff, 0xb37);
    }

    #[test]
    fn frozen_is_neither_present_nor_mmio() {
        assert!(!is_shadow_present(FROZEN_SPTE));
        assert!(!is_mmio(FROZEN_SPTE));
        // TDX MMIO value is 0 under mask RWX|SVE: FROZEN has SVE so it is not TDX MMIO either.
        assert_ne!(FROZEN_SPTE & MMIO_MASK_EPT, MMIO_VALUE_TDX);
        assert_eq!(FROZEN_SPTE & RWX_MASK, 0);
        assert_eq!(spte_to_pfn(FROZEN_SPTE), 0);
        assert!(is_frozen(FROZEN_SPTE));
        assert!(!is_frozen(FROZEN_SPTE | 1));
        assert!(!is_shadow_present(SHADOW_NONPRESENT_VALUE));
    }

    #[test]
    fn leaf_and_nonleaf_encodings() {
        let pfn = 0x1234_5678;
        assert_eq!(
            make_leaf_spte(pfn, 1, true, false),
            pfn << 12 | 0x8600_0000_0000_0b77
        );
        assert_eq!(
            make_leaf_spte(pfn, 2, true, false),
            pfn << 12 | 0x8600_0000_0000_0bf7
        );
        assert_eq!(
            make_leaf_spte(pfn, 1, true, true),
            pfn << 12 | 0x8600_0000_0000_0a77
        );
        assert_eq!(make_leaf_spte(pfn, 2, false, false) & PT_EXEC, 0);
        assert_eq!(
            make_nonleaf_spte(0x100000),
            0x1_0000_0000 | 0x8000_0000_0000_0907
        );
        assert!(is_last(make_leaf_spte(pfn, 3, true, false), 3));
        assert!(!is_last(make_nonleaf_spte(pfn), 3));
        assert!(is_last(make_nonleaf_spte(pfn), 1));
    }

    #[test]
    fn mmio_round_trip() {
        for generation in [0u64, 2, 254, 256, 0x7fffe] {
            let s = make_mmio_spte(0xabcde, generation);
            assert!(is_mmio(s));
            assert!(!is_shadow_present(s));
            assert_eq!(mmio_generation(s), generation);
            assert_eq!(mmio_gfn(s), 0xabcde);
            assert_eq!(s & SUPPRESS_VE, 0);
            assert_eq!(s & MMU_PRESENT, 0);
        }
    }

    #[test]
    fn split_children() {
        let huge = make_leaf_spte(0x200, 2, true, false);
        let c0 = make_small_spte(huge, 1, 0, false);
        let c5 = make_small_spte(huge, 1, 5, false);
        assert_eq!(c0, make_leaf_spte(0x200, 1, true, false));
        assert_eq!(c5, make_leaf_spte(0x205, 1, true, false));
        let nx = make_leaf_spte(0x40000, 3, false, false);
        let mid = make_small_spte(nx, 2, 3, true);
        assert_eq!(mid, make_leaf_spte(0x40000 + 3 * 512, 2, false, false));
        let small = make_small_spte(make_leaf_spte(0x200, 2, false, false), 1, 1, true);
        assert_eq!(small, make_leaf_spte(0x201, 1, true, false));
    }

    #[test]
    fn geometry() {
        assert_eq!(pages_per_level(1), 1);
        assert_eq!(pages_per_level(2), 512);
        assert_eq!(pages_per_level(3), 262_144);
        assert_eq!(index(0x1ff, 1), 511);
        assert_eq!(index(1 << 35, 4), 256);
        assert_eq!(round_gfn(0x3ff, 2), 0x200);
    }

    #[test]
    fn access_tracking_round_trip() {
        // A/D-disabled leaf: no A, no D, type bits 53:52 = 1.
        let leaf = make_leaf_spte_ad(0x1234, 1, true, false, false);
        assert_eq!(leaf, (0x1234 << 12) | 0x8610_0000_0000_0877);
        assert!(!spte_ad_enabled(leaf));
        assert!(is_accessed_spte(leaf) && !is_access_track_spte(leaf));
        let tracked = mark_spte_for_access_track(leaf);
        // R and X saved at bits 54 and 56, RWX gone, everything else kept.
        assert_eq!(tracked, (leaf & !RWX_MASK) | (1 << 54) | (1 << 56));
        assert!(is_access_track_spte(tracked) && !is_accessed_spte(tracked));
        assert!(is_shadow_present(tracked) && !is_hw_present(tracked) && !is_mmio(tracked));
        assert!(!access_allowed(tracked, false, false));
        assert_eq!(mark_spte_for_access_track(tracked), tracked);
        // Restoring gives R and X back, not W.
        let back = restore_acc_track_spte(tracked);
        assert_eq!(back, leaf & !PT_WRITABLE);
        assert!(access_allowed(back, false, true) && !access_allowed(back, true, false));
        // A non-executable leaf saves no X.
        let nx = mark_spte_for_access_track(make_leaf_spte_ad(0x200, 2, false, false, false));
        assert_eq!(restore_acc_track_spte(nx) & RWX_MASK, PT_READABLE);
        // Splitting an NX-huge access-tracked leaf to 4K gives X to the saved bits.
        let child = make_small_spte(nx, 1, 3, true);
        assert!(is_access_track_spte(child));
        assert_eq!(
            restore_acc_track_spte(child) & RWX_MASK,
            PT_READABLE | PT_EXEC
        );
        // With A/D on, marking only clears A.
        let on = make_leaf_spte(0x1234, 1, true, false);
        assert_eq!(mark_spte_for_access_track(on), on & !ACCESSED);
        assert!(spte_ad_enabled(on) && !is_access_track_spte(on & !ACCESSED));
        assert_eq!(
            make_leaf_spte_ad(7, 2, true, true, true),
            make_leaf_spte(7, 2, true, true)
        );
        assert_eq!(
            make_nonleaf_spte_ad(0x100, false),
            (make_nonleaf_spte(0x100) & !ACCESSED) | SPTE_TDP_AD_DISABLED
        );
    }
}
