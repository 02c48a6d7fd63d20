"""KVM-selftest-shaped workloads (tools/testing/selftests/kvm) run on a simulated VM.

Two clocks are reported side by side and never mixed:
- **host wall-clock**: how long the simulator took (a property of tdpmmu and this machine);
- **modeled**: the time the simulated system would take by the cost model (``CostModel``).

Every workload builds its VM through ``VmSpec.create(...).build()`` and launches it as a VMM
would for its type (a TD is finalized before its vCPUs run); the memstress-based ones place the
test region at the top of guest-physical space (``tdpmmu.workloads.memstress``). Each module
registers its workload in ``WORKLOADS`` (name, CLI subcommand, selftest, flags), which the CLI
and ``tdpmmu.sweep`` read. Every result is saved as a ``tdpmmu.results.Envelope``
(``to_json``/``from_json``).
"""

from tdpmmu.workloads import (  # noqa: F401  (each module registers its workload)
    access_tracking_perf,
    dirty_log_perf,
    kvm_page_table,
    memslot_perf,
    mmu_stress,
    pre_fault_memory,
    snp_boot,
    td_lifecycle,
)
from tdpmmu.workloads.base import WORKLOADS, SimArgs, Workload, WorkloadResult
from tdpmmu.workloads.common import (
    BACKING_SOURCES,
    OUTCOMES,
    PAGE_SIZE,
    virtual_options,
)
from tdpmmu.workloads.conversions import ConversionsResult, private_mem_conversions
from tdpmmu.workloads.demand_paging import DemandPagingResult, demand_paging


def result_from_json(text: str) -> WorkloadResult | DemandPagingResult:
    """Any workload's result from its JSON (what ``--json`` prints and ``to_json`` writes),
    as the class that wrote it: ``DemandPagingResult`` for ``demand_paging``, else
    ``WorkloadResult``.

    Args:
        text: the JSON text.

    Returns:
        WorkloadResult | DemandPagingResult: equal to the result that wrote it.

    Raises:
        ConfigError: not a tdpmmu envelope, another schema, or not a workload's result.
        json.JSONDecodeError: ``text`` is not JSON.
    """
    from tdpmmu.results import Envelope

    env = Envelope.from_json(text)
    if env.workload == "demand_paging":
        return DemandPagingResult.from_envelope(env)
    return WorkloadResult.from_envelope(env)


__all__ = [
    "BACKING_SOURCES",
    "OUTCOMES",
    "PAGE_SIZE",
    "WORKLOADS",
    "ConversionsResult",
    "DemandPagingResult",
    "SimArgs",
    "Workload",
    "WorkloadResult",
    "demand_paging",
    "private_mem_conversions",
    "result_from_json",
    "virtual_options",
]
