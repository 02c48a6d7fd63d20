"""Modeled costs: the ``tdpmmu.CostModel`` fields with their defaults, and the ledger.

Every modeled nanosecond is charged to one named field (docs/model.md "Default costs").
Composite charges are spelled out where they happen: a remote TLB flush is
``tlb_flush_base_ns`` plus ``tlb_flush_per_vcpu_ns`` per vCPU, a kick is ``kick_base_ns``
plus ``kick_per_vcpu_ns`` per vCPU, the first touch of a host page of P 4K pages is
``host_page_alloc_ns`` plus ``host_zero_4k_ns`` x (P - 1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .errors import ConfigError

#: The fields of tdpmmu.CostModel, in its order, with their default nanoseconds.
DEFAULT_COSTS: dict[str, float] = {
    "exit_entry_ns": 1200.0,
    "fault_handling_ns": 300.0,
    "fault_map_ns": 200.0,
    "fast_fix_ns": 100.0,
    "host_page_alloc_ns": 620.0,
    "host_zero_4k_ns": 320.0,
    "tlb_flush_base_ns": 1000.0,
    "tlb_flush_per_vcpu_ns": 200.0,
    "spte_update_ns": 60.0,
    # TDX
    "td_exit_entry_ns": 1000.0,
    "tdh_mem_sept_add_ns": 1000.0,
    "tdh_mem_page_aug_ns": 500.0,
    "tdh_mem_page_add_ns": 1000.0,
    "tdh_mr_extend_ns": 200.0,
    "tdg_mem_page_accept_ns": 200.0,
    "tdh_mem_range_block_ns": 2000.0,
    "tdh_mem_track_ns": 2000.0,
    "kick_base_ns": 3000.0,
    "kick_per_vcpu_ns": 500.0,
    "tdh_mem_page_remove_ns": 2000.0,
    "tdh_mem_page_demote_ns": 2000.0,
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
    # Virtual-time mechanisms (never charged by the reference: it models host-clock runs).
    "line_local_ns": 2.3,
    "line_smt_ns": 8.1,
    "line_socket_ns": 51.0,
    "line_remote_ns": 108.0,
    "walk_read_ns": 2.25,
    "guest_access_ns": 150.0,
    "zone_lock_hold_ns": 1900.0,
    "userspace_exit_ns": 1500.0,
    "uffd_wake_ns": 18700.0,
    "uffd_read_ns": 1000.0,
    "uffdio_copy_ns": 1000.0,
    "uffdio_continue_ns": 500.0,
    "uffd_wq_hold_ns": 100.0,
    "uffd_wake_scan_ns": 20.0,
}


#: The engine's wait kinds, in its order: modeled time only virtual-time runs charge (the
#: reference models operations outside them, so its waits stay 0).
WAIT_FIELDS: tuple[str, ...] = (
    "wait_mmu_lock",
    "wait_lock_line",
    "wait_spte",
    "wait_host_mem",
    "wait_uffd",
    "wait_ipi",
    "wait_entry",
    "guest_ns",
)


def costs_from(costs: Any) -> dict[str, float]:
    """The defaults overridden by ``costs`` (None, a mapping or a CostModel)."""
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


class CostLedger:
    """Modeled time as integer units charged to each cost field.

    ``charge(field, n)`` adds ``n`` units to ``field``; the ledger's modeled time is the sum
    over fields, in field order, of units x the field's cost, so it equals the sum of
    :meth:`breakdown` exactly.  ``clock`` is a running total in charge order, for the time
    one fault took (as the engine measures it).
    """

    def __init__(self, rates: Mapping[str, float]) -> None:
        self.rates = dict(rates)
        self.units: dict[str, int] = dict.fromkeys(DEFAULT_COSTS, 0)
        self.clock = 0.0

    def charge(self, field: str, units: int = 1) -> None:
        """Add ``units`` units of ``field``."""
        self.units[field] += units
        self.clock += self.rates[field] * units

    def breakdown(self) -> dict[str, float]:
        """Every cost field, in CostModel order (zeros included) -> modeled ns."""
        return {field: n * self.rates[field] for field, n in self.units.items()}

    @property
    def ns(self) -> float:
        """Modeled ns: the breakdown summed in field order, from 0.0."""
        total = 0.0
        for ns in self.breakdown().values():
            total += ns
        return total

    def tlb_flush(self, vcpus: int) -> None:
        """One remote TLB flush (IPI) to ``vcpus`` vCPUs."""
        self.charge("tlb_flush_base_ns")
        self.charge("tlb_flush_per_vcpu_ns", vcpus)

    def kick(self, vcpus: int) -> None:
        """KVM_REQ_OUTSIDE_GUEST_MODE to ``vcpus`` vCPUs."""
        self.charge("kick_base_ns")
        self.charge("kick_per_vcpu_ns", vcpus)

    def host_page(self, pages_4k: int) -> None:
        """First touch of a host backing page of ``pages_4k`` 4K pages: allocate and zero it."""
        self.charge("host_page_alloc_ns")
        self.charge("host_zero_4k_ns", pages_4k - 1)
