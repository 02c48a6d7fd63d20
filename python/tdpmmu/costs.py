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
