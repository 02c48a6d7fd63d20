"""KVM-selftest-shaped workloads (shared/spec/workloads.md Part A) run on a simulated VM.

Two clocks are reported side by side and never mixed:
- **host wall-clock**: how long the simulator took (a property of tdpmmu and this machine);
- **modeled**: the time the simulated system would take by the cost model (``CostModel``).
"""

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

from tdpmmu._core import ConfigError
from tdpmmu.costs import CostModel
from tdpmmu.sizes import parse_backing, parse_size
from tdpmmu.stats import Stats
from tdpmmu.vm import VM

__all__ = ["DemandPagingResult", "demand_paging"]

PAGE_SIZE = 4096


def _rate(pages: int, seconds: float) -> float:
    # Zero modeled time happens with an all-zero cost model; the rate is then unbounded.
    return pages / seconds if seconds > 0 else math.inf


def _json_float(x: float) -> float | None:
    # JSON has no Infinity/NaN; None says "no finite value".
    return x if math.isfinite(x) else None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DemandPagingResult:
    """One ``demand_paging`` run; rates are in guest 4 KiB pages, as in the selftest."""

    vm_type: str
    vcpus: int
    bytes_per_vcpu: int
    backing: int
    levels: int
    overlap: bool
    seed: int
    #: Guest physical test region [start, end) in bytes (memstress's "guest physical test memory").
    region: tuple[int, int]
    #: Pages in vCPU 0's slice: the numerator of the selftest's rates.
    pages_per_vcpu: int
    #: Wall time of the slowest vCPU thread (host wall-clock, the selftest's definition).
    total_guest_execution_time_s: float
    per_vcpu_demand_paging_rate_pgs_per_s: float
    overall_demand_paging_rate_pgs_per_s: float
    #: Modeled time of the slowest vCPU by the cost model.
    modeled_guest_execution_time_s: float
    modeled_per_vcpu_demand_paging_rate_pgs_per_s: float
    modeled_overall_demand_paging_rate_pgs_per_s: float
    #: Native per-vCPU records: wall_s, modeled_ns, faults, pages.
    per_vcpu: tuple[Mapping[str, float], ...]
    stats: Stats
    costs: CostModel

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: plain types, non-finite rates as None."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, float):
                value = _json_float(value)
            elif isinstance(value, Stats | CostModel):
                value = value.to_dict()
            elif field.name == "per_vcpu":
                value = [dict(d) for d in value]
            elif field.name == "region":
                value = list(value)
            out[field.name] = value
        return out

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)


def demand_paging(
    vm_type: str = "default",
    vcpus: int = 1,
    bytes_per_vcpu: str | int = "1G",
    backing: str | int = "4K",
    overlap: bool = False,
    costs: CostModel | Mapping[str, float] | None = None,
    seed: int = 0,
    levels: int = 4,
) -> DemandPagingResult:
    """KVM's ``demand_paging_test``: every vCPU writes each page of its slice once, in order.

    The region is ``vcpus x bytes_per_vcpu`` of never-touched memory, so every page takes a
    first-touch fault. Each vCPU gets its own slice, or with ``overlap`` walks the whole region
    (memstress's ``-o``). Unlike memstress the region starts at gfn 0 and is the default memslot
    rather than sitting at the top of guest-physical space: the faults are the same, the
    page-table shape differs by at most one table per level.
    """
    if isinstance(vcpus, bool) or not isinstance(vcpus, int):
        raise TypeError(f"vcpus: expected int, got {type(vcpus).__name__}")
    if vcpus < 1:
        raise ConfigError(f"vcpus: must be >= 1, got {vcpus}")
    per_vcpu_bytes = parse_size(bytes_per_vcpu, "bytes_per_vcpu")
    if per_vcpu_bytes == 0 or per_vcpu_bytes % PAGE_SIZE:
        raise ConfigError(
            f"bytes_per_vcpu: must be a positive multiple of the 4 KiB guest page, "
            f"got {bytes_per_vcpu!r}"
        )
    backing_bytes = parse_backing(backing, "backing")
    total = vcpus * per_vcpu_bytes
    if total % backing_bytes:
        # memstress requires the region to be aligned to the host (backing) page as well.
        raise ConfigError(
            f"bytes_per_vcpu: vcpus x bytes_per_vcpu = {total} bytes must be a multiple of the "
            f"backing page ({backing_bytes} bytes)"
        )
    vm = VM(
        vm_type=vm_type,
        memory=total,
        vcpus=vcpus,
        levels=levels,
        backing=backing_bytes,
        costs=costs,
        seed=seed,
    )
    # memstress's -o: the region keeps its size and each vCPU's slice becomes all of it.
    slice_pages = total // PAGE_SIZE if overlap else per_vcpu_bytes // PAGE_SIZE
    per_vcpu = vm.run_memstress(
        vcpus,
        slice_pages,
        0,
        overlap,
        False,  # in order, as demand_paging_test
        100,  # write_percent: the test only writes
        seed,
    )
    if len(per_vcpu) != vcpus:
        raise RuntimeError(f"run_memstress returned {len(per_vcpu)} records for {vcpus} vCPUs")
    pages0 = int(per_vcpu[0]["pages"])
    wall_s = max(float(d["wall_s"]) for d in per_vcpu)
    modeled_s = max(float(d["modeled_ns"]) for d in per_vcpu) / 1e9
    wall_rate = _rate(pages0, wall_s)
    modeled_rate = _rate(pages0, modeled_s)
    return DemandPagingResult(
        vm_type=vm.vm_type,
        vcpus=vcpus,
        bytes_per_vcpu=per_vcpu_bytes,
        backing=backing_bytes,
        levels=vm.levels,
        overlap=overlap,
        seed=seed,
        region=(0, total),
        pages_per_vcpu=pages0,
        total_guest_execution_time_s=wall_s,
        per_vcpu_demand_paging_rate_pgs_per_s=wall_rate,
        overall_demand_paging_rate_pgs_per_s=wall_rate * vcpus,
        modeled_guest_execution_time_s=modeled_s,
        modeled_per_vcpu_demand_paging_rate_pgs_per_s=modeled_rate,
        modeled_overall_demand_paging_rate_pgs_per_s=modeled_rate * vcpus,
        per_vcpu=tuple(dict(d) for d in per_vcpu),
        stats=vm.stats,
        costs=vm.costs,
    )
