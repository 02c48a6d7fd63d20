"""KVM-selftest-shaped workloads (tools/testing/selftests/kvm) run on a simulated VM.

Two clocks are reported side by side and never mixed:
- **host wall-clock**: how long the simulator took (a property of tdpmmu and this machine);
- **modeled**: the time the simulated system would take by the cost model (``CostModel``).

Every workload either takes a VM or builds one through ``VmSpec.create(...).build()`` and
``vmspec.launch`` (as a VMM would for its type: a TD is finalized before its vCPUs run), and
every result is saved as a ``tdpmmu.results.Envelope`` (``to_json``/``from_json``).
"""

from tdpmmu.workloads.common import (
    BACKING_SOURCES,
    OUTCOMES,
    PAGE_SIZE,
    virtual_options,
)
from tdpmmu.workloads.conversions import ConversionsResult, private_mem_conversions
from tdpmmu.workloads.demand_paging import DemandPagingResult, demand_paging

__all__ = [
    "BACKING_SOURCES",
    "OUTCOMES",
    "PAGE_SIZE",
    "ConversionsResult",
    "DemandPagingResult",
    "demand_paging",
    "private_mem_conversions",
    "virtual_options",
]
