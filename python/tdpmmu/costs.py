"""The cost model: nanoseconds charged to the modeled clock for work tdpmmu does not execute.

The default of every field is defined once, in the engine, and read here from
``tdpmmu._core.COST_DEFAULTS``. ``docs/costs.md`` documents each field: what it models, the
published figure it rests on with its source and conditions, whether the default is measured (M),
derived (D) or an estimate (E), and the range to sweep it over; ``SOURCES`` summarizes that per
field. Modeled time is a property of the simulated system, not of this simulator.
"""

import dataclasses
import math
from typing import Any, Final, Self

from tdpmmu import _core
from tdpmmu._core import ConfigError

__all__ = ["SOURCES", "CostModel"]

#: The engine's defaults (field -> ns), the only definition of the numbers.
_D: Final = _core.COST_DEFAULTS

#: For each field: where docs/costs.md documents it, the figure and its basis in brief.
SOURCES: dict[str, str] = {
    "exit_entry_ns": (
        "docs/costs.md §3.1: 1.2 µs (D), the lockless fast-path fault round trip measured with 64 "
        "vCPUs x 1 GiB on Cascade Lake (0.315 s / 262,144 faults, Matlack 2021); sweep 0.5-1.5 µs"
    ),
    "fault_handling_ns": (
        "docs/costs.md §3.2: 0.3 µs (E), KVM's handling of an exit outside mmu_lock; a share of "
        "the single-vCPU all-ins R1 (TDX, 2.54 µs) and R6 (SNP, 6.1 µs) after their per-operation "
        "parts; sweep 0.2-2 µs"
    ),
    "fault_map_ns": (
        "docs/costs.md §3.2: 0.2 µs (E), KVM's work under mmu_lock per fault (walk, new SPTE, "
        "install); a share of R1/R6; what an exclusive mmu_lock serializes; sweep 0.1-1 µs"
    ),
    "fast_fix_ns": (
        "docs/costs.md §3.5: 0.1 µs (E), fast_page_fault's lockless walk and cmpxchg after the "
        "exit; with the 1.2 µs exit it is the ≈1.2-1.3 µs fast-path round trip (Matlack 2021); "
        "sweep 0.05-0.5 µs"
    ),
    "host_page_alloc_ns": (
        "docs/costs.md §3.3: 0.62 µs (E), allocating a host page (≈0.3 µs, E) plus clearing its "
        "first 4 KiB (≈0.32 µs, D from 12.7-12.9 GB/s single-thread clearing, Arora 2025); sweep "
        "0.4-2 µs"
    ),
    "host_zero_4k_ns": (
        "docs/costs.md §3.4: 0.32 µs (D) per further 4 KiB, single-thread page clearing at "
        "12.7-12.9 GB/s (Arora 2025, Raghavendra 2025); sweep 0.1-1 µs"
    ),
    "tlb_flush_base_ns": (
        "docs/costs.md §4.1: 1 µs (E), fixed part of a remote flush modeled as 1 µs + 0.2 µs x "
        "vCPUs (rule of thumb; no KVM measurement published); sweep the total 2-15 µs"
    ),
    "tlb_flush_per_vcpu_ns": (
        "docs/costs.md §4.1: 0.2 µs (E) per vCPU of a remote flush (rule of thumb); a measured "
        "4-vCPU PV flush took 9.9-11.1 µs; sweep 0.1-1.5 µs"
    ),
    "spte_update_ns": (
        "docs/costs.md §4.2: 60 ns (D), ≈61 ns per SPTE created by eager splitting of 96 x 1 GiB "
        "on one thread (1.547 s / 25.17 M SPTEs, Matlack 2022); sweep 50-150 ns"
    ),
    "td_exit_entry_ns": (
        "docs/costs.md §5.2: 1 µs (E), TD exit + TDH.VP.ENTER; a share of R1's 2.54 µs single-vCPU "
        "all-in (exit, fault, AUG, ACCEPT and clearing in one); the module-handled CPUID round "
        "trip is 0.65 µs (M); sweep 0.7-4 µs"
    ),
    "tdh_mem_sept_add_ns": (
        "docs/costs.md §5.3: 1 µs (E), not published; taken as comparable to AUG; sweep 0.3-2 µs"
    ),
    "tdh_mem_page_aug_ns": (
        "docs/costs.md §5.3: 0.5 µs (E), not published; a share of R1's 2.54 µs single-vCPU "
        "all-in; sweep 0.3-2 µs"
    ),
    "tdh_mem_page_add_ns": (
        "docs/costs.md §5.3: 1 µs (E), not published; taken equal to AUG, its build-time "
        "counterpart; sweep 0.3-2 µs"
    ),
    "tdh_mr_extend_ns": (
        "docs/costs.md §5.3: 0.2 µs (E) per 256-byte chunk (16 per measured 4 KiB page), not "
        "published; sweep 0.1-1 µs"
    ),
    "tdg_mem_page_accept_ns": (
        "docs/costs.md §5.3: 0.2 µs (E), the guest's accept, not published; a small share of R1; "
        "sweep 0.1-1 µs"
    ),
    "tdh_mem_range_block_ns": (
        "docs/costs.md §5.4: 2 µs (E), share of the 15-16 µs dynamic removal at 4 vCPUs (R3, "
        "KVM_TDX_TERMINATE_VM v5, 2025); not published alone; sweep 1-4 µs"
    ),
    "tdh_mem_track_ns": (
        "docs/costs.md §5.4: 2 µs (E), share of the 15-16 µs dynamic removal at 4 vCPUs (R3); "
        "sweep 1-4 µs"
    ),
    "kick_base_ns": (
        "docs/costs.md §5.4: 3 µs (E), fixed part of kicking all vCPUs, share of R3's 15-16 µs at "
        "4 vCPUs; removal grows to 18-20 µs at 32 and 53-57 µs at 64 vCPUs; sweep 1-10 µs"
    ),
    "kick_per_vcpu_ns": (
        "docs/costs.md §5.4: 0.5 µs (E) per vCPU kicked, a linear fit through R3 at 4 vCPUs (it "
        "overshoots 32 and undershoots 64 vCPUs); sweep 0.1-1 µs"
    ),
    "tdh_mem_page_remove_ns": (
        "docs/costs.md §5.4: 2 µs (E), share of R3's 15-16 µs at 4 vCPUs; sweep 1-4 µs"
    ),
    "tdh_mem_page_demote_ns": (
        "docs/costs.md §5.4: 2 µs (E), TDH.MEM.PAGE.DEMOTE of a blocked 2M private leaf into a "
        "new S-EPT table (tdx huge_pages only); not published, taken as comparable to REMOVE; "
        "sweep 1-4 µs"
    ),
    "tdh_phymem_page_wbinvd_ns": (
        "docs/costs.md §5.4: 4 µs (E), share of R3's 15-16 µs at 4 vCPUs; sweep 1-8 µs"
    ),
    "page_clear_ns": (
        "docs/costs.md §5.4: 1 µs (E) to clear a 4 KiB page leaving the TD, share of both R3 "
        "(removal) and R4 (reclaim); clear_page alone is ≈0.32 µs; sweep 0.2-2 µs"
    ),
    "tdh_phymem_page_reclaim_ns": (
        "docs/costs.md §5.5: 4 µs (E), R4's 4.5-5.5 µs teardown reclaim per page (KVM_TDX_"
        "TERMINATE_VM v5, 2025, D) minus the 1 µs clear; sweep 3.5-4.5 µs"
    ),
    "tdh_mem_sept_remove_ns": (
        "docs/costs.md §5.5: 2 µs (E), not published; taken equal to PAGE.REMOVE (pre-upstream "
        "sept_remove design only); sweep 1-4 µs"
    ),
    "tdh_vp_flush_ns": (
        "docs/costs.md §5.6: 1 µs (E) per vCPU at HKID release, not published; sweep 0.5-5 µs"
    ),
    "tdh_mng_vpflushdone_ns": (
        "docs/costs.md §5.6: 1 µs (E) once at HKID release, not published; sweep 0.5-5 µs"
    ),
    "tdh_phymem_cache_wb_ns": (
        "docs/costs.md §5.6: 100 µs (E) once at HKID release, a whole-cache write-back, not "
        "published; sweep 10 µs-1 ms"
    ),
    "tdh_mng_key_freeid_ns": (
        "docs/costs.md §5.6: 1 µs (E) once at HKID release, not published; sweep 0.5-5 µs"
    ),
    "rmpupdate_ns": (
        "docs/costs.md §6.1: 1 µs (E), not published; a share of the ≈6.1 µs all-in SNP private "
        "page (R6, 128 GB guest eager vs lazy boot, Kalra 2025); sweep 0.3-2 µs"
    ),
    "psmash_ns": "docs/costs.md §6.1: 1 µs (E), not published; taken as RMPUPDATE; sweep 0.3-2 µs",
    "pvalidate_ns": (
        "docs/costs.md §6.1: 0.5 µs (E), not published; a share of R6; sweep 0.1-1 µs"
    ),
    "psc_exit_ns": (
        "docs/costs.md §6.2: 2 µs (E), one conversion request (SNP PSC VMGEXIT / TDX MapGPA) with "
        "its exit to the VMM, not published; a share of R6; sweep 1-4 µs"
    ),
    "gmem_convert_ns": (
        "docs/costs.md §6.3: 107 ns (D), ~320 cycles per guest_memfd conversion (M, Roth 2025) at "
        "an assumed 3 GHz; sweep 50-200 ns"
    ),
    "gmem_split_2m_ns": (
        "docs/costs.md §6.3: 10.7 µs (D), a 2 MiB folio split/merge costs ~100x a conversion (M, "
        "Roth 2025); sweep 5-20 µs"
    ),
    "line_local_ns": (
        "docs/costs.md §12.1: 2.3 ns (M) on the development machine, an uncontended LOCK "
        "CMPXCHG on a line the CPU owns"
    ),
    "line_smt_ns": (
        "docs/costs.md §12.1: 8.1 ns (M), CAS ping-pong between SMT siblings (Ice Lake 8375C, "
        "core-to-core-latency)"
    ),
    "line_socket_ns": (
        "docs/costs.md §12.1: 51 ns (M), CAS ping-pong between cores of one socket (Ice Lake "
        "8375C; 47-48 ns on Cascade Lake)"
    ),
    "line_remote_ns": (
        "docs/costs.md §12.1: 108 ns (M), CAS ping-pong across sockets (2x Ice Lake 8375C; "
        "134-136 ns on Cascade Lake)"
    ),
    "walk_read_ns": (
        "docs/costs.md §12.1: 2.25 ns (M) on the development machine, one level of a "
        "serialized 4-level walk over cache-resident tables (9 ns per walk)"
    ),
    "guest_access_ns": (
        "docs/costs.md §12.1: 150 ns (M) on the development machine, a guest access that "
        "misses the TLB: a serialized walk with a 32 MiB leaf level (149 ns)"
    ),
    "zone_lock_hold_ns": (
        "docs/costs.md §12.2: 1.9 µs (E), refilling a per-CPU page list (63 pages) under the "
        "zone lock, ≈30 ns per page; sweep 0.5-5 µs"
    ),
    "userspace_exit_ns": (
        "docs/costs.md §12.3: 1.5 µs (E), a KVM_EXIT_MEMORY_FAULT round trip: return from "
        "KVM_RUN, re-enter, fault again; sweep 0.5-5 µs"
    ),
    "uffd_wake_ns": (
        "docs/costs.md §12.3: wake-up latency of a thread asleep on userfaultfd (D), the "
        "remainder of the 1-vCPU MINOR figure (23,876 pages/s, Kalyazin 2025) after its other "
        "parts, split over its two wake-ups"
    ),
    "uffd_read_ns": (
        "docs/costs.md §12.3: 1 µs (E), poll() return and read() of one userfaultfd message"
    ),
    "uffdio_copy_ns": (
        "docs/costs.md §12.3: 1 µs (E), UFFDIO_COPY's ioctl and 4 KiB copy beyond allocation"
    ),
    "uffdio_continue_ns": (
        "docs/costs.md §12.3: 0.5 µs (E), UFFDIO_CONTINUE mapping a page-cache page"
    ),
    "uffd_wq_hold_ns": (
        "docs/costs.md §12.3: 100 ns (E), one hold of a userfaultfd wait-queue spinlock"
    ),
    "uffd_wake_scan_ns": (
        "docs/costs.md §12.3: 20 ns (E), matching one waiter while waking a userfaultfd range "
        "(__wake_userfault scans every waiter)"
    ),
}


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CostModel:
    """Nanosecond costs of the operations tdpmmu models but does not execute (docs/costs.md).

    Each field is the modeled time of one unit of work: a VM exit, a host page allocation, a
    remote TLB flush, a SEAMCALL, an RMP instruction, ... (the comment on each field says which;
    ``SOURCES`` cites the published figure behind its default). Whenever the engine does that
    work it charges the field, and a VM's modeled clock (``VM.stats["modeled_ns"]``) is the sum
    over fields of units x nanoseconds (``VM.cost_breakdown()``). Pass one to
    ``tdpmmu.VM(costs=...)``; a frozen value, so ``replace`` makes variants for a sweep.

    Args:
        **fields: keyword-only, each a field name (``field_names()``) and its cost in modeled
            nanoseconds, a finite int or float >= 0. Unset fields keep the engine's defaults
            (``tdpmmu._core.COST_DEFAULTS``; the fields are declared here in the engine's
            order).

    Raises:
        ConfigError: a value that is not a finite number >= 0 (a bool included), naming the
            field.
        TypeError: an unknown field name (the dataclass's own check).
    """

    #: A VM exit plus the re-entry, charged to every fault that exits (§3.1).
    exit_entry_ns: float = _D["exit_entry_ns"]
    #: KVM's handling of one fault (or one pre-faulted leaf), without host allocation (§3.2).
    fault_handling_ns: float = _D["fault_handling_ns"]
    #: KVM's work under mmu_lock per fault: the walk, the new SPTE, the install (§3.2).
    fault_map_ns: float = _D["fault_map_ns"]
    #: fast_page_fault's lockless fix of a write-protected leaf, or its spurious finding (§3.5).
    fast_fix_ns: float = _D["fast_fix_ns"]
    #: First touch of a host backing page: allocation plus zeroing its first 4 KiB (§3.3).
    host_page_alloc_ns: float = _D["host_page_alloc_ns"]
    #: Zeroing each further 4 KiB of a huge backing page on first touch (§3.4).
    host_zero_4k_ns: float = _D["host_zero_4k_ns"]
    #: Fixed part of one remote TLB flush (§4.1).
    tlb_flush_base_ns: float = _D["tlb_flush_base_ns"]
    #: Per-vCPU part of one remote TLB flush (§4.1).
    tlb_flush_per_vcpu_ns: float = _D["tlb_flush_per_vcpu_ns"]
    #: One SPTE written in bulk by a zap or a huge-page split (§4.2).
    spte_update_ns: float = _D["spte_update_ns"]
    # --- TDX (§5)
    #: TD exit plus TDH.VP.ENTER, charged to every TD exit instead of ``exit_entry_ns`` (§5.2).
    td_exit_entry_ns: float = _D["td_exit_entry_ns"]
    #: TDH.MEM.SEPT.ADD: link one S-EPT table (§5.3).
    tdh_mem_sept_add_ns: float = _D["tdh_mem_sept_add_ns"]
    #: TDH.MEM.PAGE.AUG: add a 4 KiB private page to a finalized TD (§5.3).
    tdh_mem_page_aug_ns: float = _D["tdh_mem_page_aug_ns"]
    #: TDH.MEM.PAGE.ADD: add an initial-image page before ``finalize()`` (§5.3).
    tdh_mem_page_add_ns: float = _D["tdh_mem_page_add_ns"]
    #: TDH.MR.EXTEND of one 256-byte chunk, 16 per ADDed page with ``tdx["measure"]`` (§5.3).
    tdh_mr_extend_ns: float = _D["tdh_mr_extend_ns"]
    #: The guest's TDG.MEM.PAGE.ACCEPT of one PENDING page after its fault (§5.3).
    tdg_mem_page_accept_ns: float = _D["tdg_mem_page_accept_ns"]
    #: TDH.MEM.RANGE.BLOCK of one S-EPT entry (§5.4).
    tdh_mem_range_block_ns: float = _D["tdh_mem_range_block_ns"]
    #: TDH.MEM.TRACK: advance the TD's TLB epoch (§5.4).
    tdh_mem_track_ns: float = _D["tdh_mem_track_ns"]
    #: Kicking every vCPU out of the TD: ``kick_base_ns + kick_per_vcpu_ns * vcpus`` (§5.4).
    kick_base_ns: float = _D["kick_base_ns"]
    #: Per-vCPU part of that kick (§5.4).
    kick_per_vcpu_ns: float = _D["kick_per_vcpu_ns"]
    #: TDH.MEM.PAGE.REMOVE of one blocked private page (§5.4).
    tdh_mem_page_remove_ns: float = _D["tdh_mem_page_remove_ns"]
    #: TDH.MEM.PAGE.DEMOTE: split a blocked 2M private leaf (huge_pages) (§5.4).
    tdh_mem_page_demote_ns: float = _D["tdh_mem_page_demote_ns"]
    #: TDH.PHYMEM.PAGE.WBINVD: write back and invalidate one page that left the TD (§5.4).
    tdh_phymem_page_wbinvd_ns: float = _D["tdh_phymem_page_wbinvd_ns"]
    #: Clearing one 4 KiB page that left the TD (§5.4).
    page_clear_ns: float = _D["page_clear_ns"]
    #: TDH.PHYMEM.PAGE.RECLAIM of one page after the HKID release (§5.5).
    tdh_phymem_page_reclaim_ns: float = _D["tdh_phymem_page_reclaim_ns"]
    #: TDH.MEM.SEPT.REMOVE of one S-EPT table (``tdx["sept_free"] == "sept_remove"``) (§5.5).
    tdh_mem_sept_remove_ns: float = _D["tdh_mem_sept_remove_ns"]
    #: TDH.VP.FLUSH, once per vCPU at the HKID release (§5.6).
    tdh_vp_flush_ns: float = _D["tdh_vp_flush_ns"]
    #: TDH.MNG.VPFLUSHDONE, once at the HKID release (§5.6).
    tdh_mng_vpflushdone_ns: float = _D["tdh_mng_vpflushdone_ns"]
    #: TDH.PHYMEM.CACHE.WB, once at the HKID release (§5.6).
    tdh_phymem_cache_wb_ns: float = _D["tdh_phymem_cache_wb_ns"]
    #: TDH.MNG.KEY.FREEID, once at the HKID release (§5.6).
    tdh_mng_key_freeid_ns: float = _D["tdh_mng_key_freeid_ns"]
    # --- SEV-SNP and guest_memfd (§6)
    #: One RMPUPDATE of a 4 KiB or 2 MiB RMP entry (§6.1).
    rmpupdate_ns: float = _D["rmpupdate_ns"]
    #: One PSMASH: split a 2 MiB RMP entry into 512 4 KiB ones (§6.1).
    psmash_ns: float = _D["psmash_ns"]
    #: The guest's PVALIDATE of one page (4 KiB or 2 MiB) (§6.1).
    pvalidate_ns: float = _D["pvalidate_ns"]
    #: One conversion request from the guest (SNP page-state change, TDX MapGPA) (§6.2).
    psc_exit_ns: float = _D["psc_exit_ns"]
    #: guest_memfd's bookkeeping for one conversion request (§6.3).
    gmem_convert_ns: float = _D["gmem_convert_ns"]
    #: Splitting one 2 MiB guest_memfd folio a conversion only partly covers (§6.3).
    gmem_split_2m_ns: float = _D["gmem_split_2m_ns"]
    # Virtual-time mechanisms (docs/costs.md §12; charged only by clock="virtual" runs).
    #: An atomic on a cache line this CPU already owns.
    line_local_ns: float = _D["line_local_ns"]
    #: Moving a contended cache line between SMT siblings.
    line_smt_ns: float = _D["line_smt_ns"]
    #: Moving it between cores of one socket.
    line_socket_ns: float = _D["line_socket_ns"]
    #: Moving it between sockets.
    line_remote_ns: float = _D["line_remote_ns"]
    #: One level of KVM's walk (a shared SPTE read).
    walk_read_ns: float = _D["walk_read_ns"]
    #: The guest's own time for one access of the workload.
    guest_access_ns: float = _D["guest_access_ns"]
    #: One refill of a CPU's page list under the zone lock (every 63 pages).
    zone_lock_hold_ns: float = _D["zone_lock_hold_ns"]
    #: A KVM_EXIT_MEMORY_FAULT round trip to userspace and back.
    userspace_exit_ns: float = _D["userspace_exit_ns"]
    #: Wake-up latency of a thread asleep on userfaultfd.
    uffd_wake_ns: float = _D["uffd_wake_ns"]
    #: A userfaultfd reader's poll() return and read().
    uffd_read_ns: float = _D["uffd_read_ns"]
    #: UFFDIO_COPY beyond the page allocation.
    uffdio_copy_ns: float = _D["uffdio_copy_ns"]
    #: UFFDIO_CONTINUE.
    uffdio_continue_ns: float = _D["uffdio_continue_ns"]
    #: One hold of a userfaultfd wait-queue lock.
    uffd_wq_hold_ns: float = _D["uffd_wq_hold_ns"]
    #: Matching one waiter while waking a userfaultfd range.
    uffd_wake_scan_ns: float = _D["uffd_wake_scan_ns"]

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
        """Every cost field's name, in the engine's order (``tdpmmu._core.COST_FIELDS``).

        Returns:
            tuple[str, ...]: the names, e.g. ``("exit_entry_ns", "fault_handling_ns", ...)``.
        """
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **changes: Any) -> Self:
        """A copy with some costs changed (the model itself is frozen).

        Args:
            **changes: field name -> new cost in modeled nanoseconds (a finite number >= 0).

        Returns:
            CostModel: the new model; fields not named keep this model's values.

        Raises:
            ConfigError: an unknown field name ("costs: unknown field(s) ..."), or a value that
                is not a finite number >= 0 (naming the field).
        """
        unknown = set(changes) - set(self.field_names())
        if unknown:
            raise ConfigError(
                f"costs: unknown field(s) {', '.join(sorted(unknown))}; "
                f"allowed: {', '.join(self.field_names())}"
            )
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, float]:
        """Every field as a plain dict, the form the native module takes.

        Returns:
            dict[str, float]: field name -> modeled nanoseconds, in field order. Never raises.
        """
        return {f.name: float(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _check_against_engine() -> None:
    """The fields declared above must be the engine's, in the engine's order."""
    declared = CostModel.field_names()
    if declared != tuple(_core.COST_FIELDS) or tuple(_D) != tuple(_core.COST_FIELDS):
        raise ImportError(
            "tdpmmu.costs.CostModel is out of step with the native engine: declared fields "
            f"{declared}, engine COST_FIELDS {tuple(_core.COST_FIELDS)}, engine COST_DEFAULTS "
            f"{tuple(_D)}; rebuild the extension or update python/tdpmmu/costs.py"
        )
    if set(SOURCES) != set(declared):
        raise ImportError(f"tdpmmu.costs.SOURCES does not cover exactly the fields {declared}")


_check_against_engine()
