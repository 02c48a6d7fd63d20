"""KVM-selftest-shaped workloads (shared/spec/workloads.md Part A) run on a simulated VM.

Two clocks are reported side by side and never mixed:
- **host wall-clock**: how long the simulator took (a property of tdpmmu and this machine);
- **modeled**: the time the simulated system would take by the cost model (``CostModel``).
"""

import dataclasses
import json
import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from tdpmmu._core import ConfigError
from tdpmmu.costs import CostModel
from tdpmmu.ret import Ret
from tdpmmu.sizes import parse_backing, parse_size
from tdpmmu.stats import Stats
from tdpmmu.vm import VM

__all__ = [
    "ConversionsResult",
    "DemandPagingResult",
    "demand_paging",
    "private_mem_conversions",
]

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


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ConversionsResult:
    """One ``private_mem_conversions`` run on a VM (counters are in the VM's ``stats``)."""

    chunks: int
    chunk_pages: int
    #: Conversion requests the guest made (two per chunk: to shared, back to private).
    requests: int
    #: Guest touches that took a fault (one per page per touch; RETRY is retried, not recounted).
    faults: int
    #: Fault results other than FIXED (after retrying RETRY), by ``Ret`` name. Empty when every
    #: touch mapped its page as it should.
    unexpected: Mapping[str, int]
    #: Modeled time of the touches' faults, as the engine charged them.
    fault_modeled_ns: float
    #: Host wall-clock time of the whole workload.
    wall_s: float


def private_mem_conversions(
    vm: VM,
    chunks: int,
    chunk_pages: int,
    *,
    base_gfn: int = 0,
    region_pages: int | None = None,
    touch_first: bool = False,
    vcpus: int | None = None,
) -> ConversionsResult:
    """Private<->shared conversions shaped like KVM's ``private_mem_conversions_test``.

    ``chunks`` chunks of ``chunk_pages`` guest pages are spread evenly over
    ``[base_gfn, base_gfn + region_pages)`` (default: all of the VM's memory). Each chunk is
    owned by the vCPU whose memstress slice holds it (``vcpus`` slices, default all vCPUs) and
    goes, in order, through:

    1. (``touch_first`` only) the guest writes the chunk as private memory;
    2. the guest asks for it to become shared; on SNP it first rescinds validation of the
       pages (PVALIDATE with validate=0), as a guest must before handing pages back;
    3. userspace sets the memory attributes to shared (``set_memory_attributes``, which also
       charges the request's exit, ``psc_exit_ns + gmem_convert_ns``) and punches the
       guest_memfd hole (``punch_hole``), as the selftest with fallocate and QEMU do;
    4. the guest writes every page as shared (one fault each);
    5. the guest asks for it to become private again; userspace sets the attributes private;
    6. the guest writes every page as private (one fault each; TDX accepts, SNP validates).

    The chunks must start out private (a confidential VM's memory starts all-private) and,
    unless ``touch_first``, already written by the guest (on SNP they must be validated).
    Fault results other than FIXED and PVALIDATE failures are counted in ``unexpected``.
    """
    if vm.vm_type == "default":
        raise ConfigError("vm: a default VM has no private memory to convert")
    for name, value in (("chunks", chunks), ("chunk_pages", chunk_pages)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name}: expected int, got {type(value).__name__}")
        if value < 1:
            raise ConfigError(f"{name}: must be >= 1, got {value}")
    if region_pages is None:
        region_pages = vm.memory // PAGE_SIZE - base_gfn
    nvcpus = vm.vcpus if vcpus is None else vcpus
    if not 1 <= nvcpus <= vm.vcpus:
        raise ConfigError(f"vcpus: must be in 1..={vm.vcpus}, got {nvcpus}")
    stride = region_pages // chunks
    if stride < chunk_pages:
        raise ConfigError(
            f"chunks x chunk_pages = {chunks} x {chunk_pages} pages does not fit in the "
            f"{region_pages}-page region without overlap"
        )
    unexpected: dict[str, int] = {}
    faults = 0
    fault_ns = 0.0
    snp = vm.vm_type == "snp"

    def touch(gfn: int, private: bool, vcpu: int) -> None:
        nonlocal faults, fault_ns
        gfns = np.arange(gfn, gfn + chunk_pages, dtype=np.uint64)
        for _ in range(16):
            before = float(vm.stats_dict()["modeled_ns"])
            rets = vm.fault_batch(gfns, private=private, vcpu=vcpu)
            fault_ns += float(vm.stats_dict()["modeled_ns"]) - before
            retry = rets == Ret.RETRY
            faults += int(rets.size - np.count_nonzero(retry))
            for code in np.unique(rets[~retry & (rets != Ret.FIXED)]):
                name = Ret(int(code)).name
                unexpected[name] = unexpected.get(name, 0) + int(np.count_nonzero(rets == code))
            gfns = gfns[retry]
            if gfns.size == 0:
                return
        unexpected["RETRY"] = unexpected.get("RETRY", 0) + int(gfns.size)

    start = time.perf_counter()
    for i in range(chunks):
        offset = i * stride
        gfn = base_gfn + offset
        vcpu = min(nvcpus - 1, offset * nvcpus // region_pages)
        if touch_first:
            touch(gfn, True, vcpu)
        if snp:
            for status, count in vm.pvalidate(gfn, chunk_pages, validate=False).items():
                if status != "SUCCESS":
                    key = f"PVALIDATE_{status}"
                    unexpected[key] = unexpected.get(key, 0) + count
        vm.set_memory_attributes(gfn, chunk_pages, private=False)
        vm.punch_hole(gfn, chunk_pages)
        touch(gfn, False, vcpu)
        vm.set_memory_attributes(gfn, chunk_pages, private=True)
        touch(gfn, True, vcpu)
    wall_s = time.perf_counter() - start
    return ConversionsResult(
        chunks=chunks,
        chunk_pages=chunk_pages,
        requests=2 * chunks,
        faults=faults,
        unexpected=dict(unexpected),
        fault_modeled_ns=fault_ns,
        wall_s=wall_s,
    )
