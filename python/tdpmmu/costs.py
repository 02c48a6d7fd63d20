"""The cost model: nanoseconds charged to the modeled clock for work tdpmmu does not execute.

Every default comes from ``shared/spec/costs.md`` §6 ("Suggested defaults for modeled costs"),
whose rows are estimates (E) derived from published measurements (§1 to §3); each field below
names its row. Modeled time is a property of the simulated system, not of this simulator.
"""

import dataclasses
import math
from typing import Any, Self

from tdpmmu._core import ConfigError

__all__ = ["SOURCES", "CostModel"]

#: For each field: the costs.md row it comes from and how the number was derived.
SOURCES: dict[str, str] = {
    "exit_entry_ns": (
        "costs.md §6 'VM exit + entry, normal VM (EPT/NPT violation, trivial handling)': 1.2 µs "
        "(sweep 0.5-1.5 µs); basis §3.2 fast-path fault round trip ≈1.2 µs (D), SVM VMRUN "
        "round trip ~1.35 k cycles (§1.3)"
    ),
    "fault_handling_ns": (
        "costs.md §6 'KVM slow-path fault handling (mmu_lock read, SPTE install), excluding "
        "host page allocation': 2 µs (sweep 1-10 µs; the upper end is 64-96-way contention); "
        "basis §3.1/§3.2 (D)"
    ),
    "host_page_alloc_ns": (
        "costs.md §6 'Host 4 KiB page allocation + zeroing on first touch': 5-10 µs, midpoint "
        "7.5 µs; basis: populate fault ≈12-20 µs minus fast path ≈1.2 µs (§3.1, D, rough)"
    ),
    "host_zero_4k_ns": (
        "no §6 row (E, tdpmmu's own): zeroing each further 4 KiB of a 2M/1G backing page on "
        "first touch. costs.md §3.1 'Populate 96 vCPU x 1 GiB, 1 GiB HugeTLB' (4.97 s, "
        "dominated by zeroing 96 GiB at ≈19.3 GiB/s aggregate) gives ≈0.2 µs per 4 KiB "
        "machine-wide and ≈20 µs per 4 KiB per vCPU with 96 zeroing at once; 1 µs lies "
        "between the two, to be swept"
    ),
    "tlb_flush_base_ns": (
        "costs.md §6 'Remote TLB flush (IPI to N vCPUs)': 1 µs + 0.2 µs x N, this is the 1 µs "
        "(sweep 2-15 µs total); basis §3.4 (E/M mix)"
    ),
    "tlb_flush_per_vcpu_ns": (
        "costs.md §6 'Remote TLB flush (IPI to N vCPUs)': 1 µs + 0.2 µs x N, this is the "
        "0.2 µs per vCPU; basis §3.4 (E/M mix)"
    ),
    "spte_update_ns": (
        "costs.md §6 'Eager split, per 4 KiB SPTE created (one thread)': 60 ns; basis §3.3 "
        "≈61 ns per SPTE created by splitting (D); also charged per SPTE a zap writes"
    ),
    # --- TDX (costs.md §1, §6). No per-SEAMCALL latency is published (§1.1 'NF'); the
    # end-to-end figures of §1.2 bound them, and the split below is tdpmmu's estimate (E).
    "td_exit_entry_ns": (
        "costs.md §6 'TD exit + TDH.VP.ENTER round trip to KVM': 2 µs (sweep 1-4 µs); basis "
        "< 2.5 µs all-in private fault (§1.2) and ≈3.9 µs incl. guest #VE (§1.3)"
    ),
    "tdh_mem_sept_add_ns": (
        "costs.md §6 'TDH.MEM.SEPT.ADD': 1 µs (sweep 0.3-2 µs); NF, assumed comparable to AUG"
    ),
    "tdh_mem_page_aug_ns": (
        "costs.md §6 'TDH.MEM.PAGE.AUG (4 KiB)': 1 µs (sweep 0.3-2 µs); must fit the 2.54 µs "
        "all-in private fault of §1.2 with exit/entry and ACCEPT; no direct measurement"
    ),
    "tdh_mem_page_add_ns": (
        "costs.md §1.1 'TDH.MEM.PAGE.ADD': NF; E: taken equal to AUG (1 µs), the build-time twin "
        "of AUG"
    ),
    "tdh_mr_extend_ns": (
        "costs.md §1.1: NF; E: 0.2 µs per 256-byte TDH.MR.EXTEND chunk (16 per 4 KiB page when "
        "measuring)"
    ),
    "tdg_mem_page_accept_ns": (
        "costs.md §1.2 bounds it (NF alone); E: 0.2 µs for the guest's TDG.MEM.PAGE.ACCEPT, a "
        "small part of the 2.54 µs "
        "all-in private fault of §1.2"
    ),
    "tdh_mem_range_block_ns": (
        "E: 2 µs, part of costs.md §6 'Dynamic removal of one 4 KiB private page "
        "(BLOCK+TRACK+kick+REMOVE+WBINVD+clear)': 16 µs @4 vCPUs (§1.2, D), split by tdpmmu"
    ),
    "tdh_mem_track_ns": (
        "E: 2 µs, part of the costs.md §6 16 µs dynamic-removal row (split by tdpmmu)"
    ),
    "kick_base_ns": (
        "costs.md §6/§1.2, E: 3 µs fixed part of kicking all vCPUs out of the TD, part of the §6 "
        "16 µs "
        "dynamic-removal row; §1.2 shows removal cost growing with vCPUs (15-16 µs @4, "
        "18-20 µs @32, 53-57 µs @64)"
    ),
    "kick_per_vcpu_ns": (
        "costs.md §1.2, E: 0.5 µs per vCPU kicked (the §1.2 growth with vCPU count, linearised), "
        "part of "
        "the §6 16 µs dynamic-removal row at 4 vCPUs"
    ),
    "tdh_mem_page_remove_ns": "E: 2 µs, part of the costs.md §6 16 µs dynamic-removal row",
    "tdh_phymem_page_wbinvd_ns": "E: 4 µs, part of the costs.md §6 16 µs dynamic-removal row",
    "page_clear_ns": (
        "costs.md §6, E: 1 µs for MOVDIR64B-clearing a 4 KiB page; part of both the §6 16 µs "
        "dynamic "
        "removal and the §6 5 µs teardown reclaim rows"
    ),
    "tdh_phymem_page_reclaim_ns": (
        "costs.md §6 'Teardown reclaim of one 4 KiB page': 5 µs (4.5-5.5 µs, §1.2 D) "
        "minus the 1 µs page clear"
    ),
    "tdh_mem_sept_remove_ns": (
        "costs.md §1.1 'TDH.MEM.SEPT.REMOVE': NF; E: 2 µs, as TDH.MEM.PAGE.REMOVE (pre-upstream "
        "sept_remove design only)"
    ),
    "tdh_vp_flush_ns": "costs.md §1.1: NF; E: 1 µs per vCPU at HKID release",
    "tdh_mng_vpflushdone_ns": "costs.md §1.1: NF; E: 1 µs once at HKID release",
    "tdh_phymem_cache_wb_ns": (
        "costs.md §1.1: NF; E: 100 µs for the cache write-back at HKID release (a whole-cache "
        "operation)"
    ),
    "tdh_mng_key_freeid_ns": "costs.md §1.1: NF; E: 1 µs once at HKID release",
    # --- SEV-SNP and guest_memfd (costs.md §2, §6).
    "rmpupdate_ns": (
        "costs.md §2 'RMPUPDATE latency': NF; E: 1 µs, so that the modeled all-in SNP private 4 "
        "KiB "
        "fault lands near costs.md §6 'SNP private fault all-in': 6 µs (§2: ≈6.1 µs, D)"
    ),
    "psmash_ns": "costs.md §2 'PSMASH latency': NF; E: 1 µs, as RMPUPDATE",
    "pvalidate_ns": "costs.md §2 'PVALIDATE latency': NF; E: 0.5 µs",
    "psc_exit_ns": (
        "costs.md §2 'Page-state-change (PSC/VMGEXIT) cost per page'); E: 2 µs, a VMGEXIT round "
        "trip with its userspace exit; part of the §6 6 µs SNP all-in row"
    ),
    "gmem_convert_ns": (
        "costs.md §6 'guest_memfd conversion bookkeeping': ~0.1 µs (320 cycles, §2 M) at ~3 GHz"
    ),
    "gmem_split_2m_ns": (
        "costs.md §2 '2 MiB split/merge vs typical conversion': ~100x the 107 ns conversion (M)"
    ),
}


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CostModel:
    """Nanosecond costs of the operations tdpmmu models (see ``SOURCES`` for each figure)."""

    #: A VM exit plus the re-entry, charged to every fault that exits (costs.md §6 row 1).
    exit_entry_ns: float = 1200.0
    #: KVM's fault handling under mmu_lock read, without host page allocation (§6 row 2).
    fault_handling_ns: float = 2000.0
    #: First touch of a host backing page: allocation plus zeroing its first 4 KiB (§6 row 3).
    host_page_alloc_ns: float = 7500.0
    #: Zeroing each further 4 KiB of a huge backing page on first touch (derived, see SOURCES).
    host_zero_4k_ns: float = 1000.0
    #: Fixed part of one remote TLB flush (§6 'Remote TLB flush').
    tlb_flush_base_ns: float = 1000.0
    #: Per-vCPU part of one remote TLB flush (§6 'Remote TLB flush').
    tlb_flush_per_vcpu_ns: float = 200.0
    #: One SPTE written in bulk by a zap or a huge-page split (§6 'Eager split').
    spte_update_ns: float = 60.0
    # --- TDX
    #: TD exit plus TDH.VP.ENTER, charged to every TD exit instead of ``exit_entry_ns``.
    td_exit_entry_ns: float = 2000.0
    tdh_mem_sept_add_ns: float = 1000.0
    tdh_mem_page_aug_ns: float = 1000.0
    tdh_mem_page_add_ns: float = 1000.0
    tdh_mr_extend_ns: float = 200.0
    tdg_mem_page_accept_ns: float = 200.0
    tdh_mem_range_block_ns: float = 2000.0
    tdh_mem_track_ns: float = 2000.0
    #: Kicking every vCPU out of the TD: ``kick_base_ns + kick_per_vcpu_ns * vcpus``.
    kick_base_ns: float = 3000.0
    kick_per_vcpu_ns: float = 500.0
    tdh_mem_page_remove_ns: float = 2000.0
    tdh_phymem_page_wbinvd_ns: float = 4000.0
    page_clear_ns: float = 1000.0
    tdh_phymem_page_reclaim_ns: float = 4000.0
    tdh_mem_sept_remove_ns: float = 2000.0
    tdh_vp_flush_ns: float = 1000.0
    tdh_mng_vpflushdone_ns: float = 1000.0
    tdh_phymem_cache_wb_ns: float = 100000.0
    tdh_mng_key_freeid_ns: float = 1000.0
    # --- SEV-SNP and guest_memfd
    rmpupdate_ns: float = 1000.0
    psmash_ns: float = 1000.0
    pvalidate_ns: float = 500.0
    #: One page-state-change VMGEXIT (a private<->shared conversion request from the guest).
    psc_exit_ns: float = 2000.0
    gmem_convert_ns: float = 107.0
    gmem_split_2m_ns: float = 10700.0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            # bool is an int subclass; a cost of True is a mistake, not 1 ns.
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(
                    f"{field.name}: must be a number of nanoseconds, got {type(value).__name__}"
                )
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{field.name}: must be a finite number >= 0, got {value!r}")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **changes: Any) -> Self:
        """A copy with some costs changed; unknown names raise ``ConfigError``."""
        unknown = set(changes) - set(self.field_names())
        if unknown:
            raise ConfigError(
                f"costs: unknown field(s) {', '.join(sorted(unknown))}; "
                f"allowed: {', '.join(self.field_names())}"
            )
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, float]:
        """Field name -> ns as float; this is what the native module takes."""
        return {f.name: float(getattr(self, f.name)) for f in dataclasses.fields(self)}
