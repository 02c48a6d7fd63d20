"""Trace events (``VM(trace=True)``); names follow KVM's mmutrace.h tracepoints."""

from typing import NamedTuple

__all__ = ["Event"]


class Event(NamedTuple):
    """One traced MMU operation, in the order it happened."""

    op: str  # e.g. "kvm_mmu_spte_requested", "kvm_tdp_mmu_spte_changed"
    gfn: int
    level: int
    detail: str
