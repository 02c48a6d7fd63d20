"""KVM's ``demand_paging_test``: first-touch fault throughput (``demand_paging``)."""

import dataclasses
import time
from collections.abc import Mapping
from typing import Any

from tdpmmu import coerce
from tdpmmu._core import ConfigError
from tdpmmu.costs import CostModel
from tdpmmu.results import Envelope
from tdpmmu.stats import Stats
from tdpmmu.types import VcpuRecord
from tdpmmu.vmspec import VmSpec, launch
from tdpmmu.vtime import Machine, VirtualOptions
from tdpmmu.workloads.common import (
    PAGE_SIZE,
    backing_source,
    finite_or_inf,
    rate,
    virtual_options,
    virtual_summary,
)

__all__ = ["DemandPagingResult", "demand_paging"]


def _vcpu_record(d: VcpuRecord) -> dict[str, float]:
    """One vCPU's native record as plain floats."""
    return {
        "wall_s": d["wall_s"],
        "modeled_ns": d["modeled_ns"],
        "faults": float(d["faults"]),
        "pages": float(d["pages"]),
    }


#: Fault outcomes a virtual-time run counts per vCPU (``VM.run_virtual``'s records).
OUTCOMES = ("hits", "fixed", "spurious", "retry", "emulate", "memory_fault", "write_protected")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DemandPagingResult:
    """One ``demand_paging`` run; rates are in guest 4 KiB pages, as in the selftest.

    Host wall-clock figures follow ``demand_paging_test``: the time from starting the vCPU
    threads to joining them (measured around the one native call that spawns and joins them),
    with the per-vCPU rate ``pages_per_vcpu / time`` and the overall rate
    ``pages_per_vcpu * vcpus / time``. Modeled figures use the slowest vCPU's modeled time (the
    simulated vCPUs run in parallel).
    """

    #: The VM's full configuration.
    spec: VmSpec
    bytes_per_vcpu: int
    overlap: bool
    #: Initial-image pages populated before the run (a TD: TDH.MEM.PAGE.ADD before finalize).
    image_pages: int
    #: The selftest's ``-s`` name when the backing was given as one, else None.
    backing_source: str | None
    #: Guest physical test region [start, end) in bytes (memstress's "guest physical test memory").
    region: tuple[int, int]
    #: Pages in vCPU 0's slice: the numerator of the selftest's rates.
    pages_per_vcpu: int
    #: Host wall time from starting the vCPU threads to joining them (the selftest's clock).
    total_guest_execution_time_s: float
    per_vcpu_demand_paging_rate_pgs_per_s: float
    overall_demand_paging_rate_pgs_per_s: float
    #: Extra detail: the longest any one vCPU thread ran by its own clock (thread start-up and
    #: join are outside it, so rates from it overstate throughput when threads outnumber cores).
    slowest_vcpu_wall_s: float
    #: Modeled time of the slowest vCPU by the cost model.
    modeled_guest_execution_time_s: float
    modeled_per_vcpu_demand_paging_rate_pgs_per_s: float
    modeled_overall_demand_paging_rate_pgs_per_s: float
    #: Native per-vCPU records: wall_s (the thread's own), modeled_ns, faults, pages.
    per_vcpu: tuple[Mapping[str, float], ...]
    #: Counters after the run (setup included).
    stats: Stats
    #: All modeled time of the run (setup and every vCPU) by CostModel field.
    cost_breakdown: Mapping[str, float]
    #: Host wall-clock seconds of the whole run (VM creation, setup, vCPUs).
    wall_s: float
    #: The clock and the shared resources' knobs the run used.
    options: VirtualOptions = dataclasses.field(default_factory=VirtualOptions)
    #: Virtual-time runs only (else empty): ``outcomes`` (every vCPU's fault outcomes summed:
    #: ``accesses`` = hits + fixed + spurious + emulate + write_protected; ``faults`` = those
    #: minus hits plus retry and memory_fault), ``vcpu_breakdown`` (the vCPUs' modeled time by
    #: CostModel field and wait kind), ``resources`` (the same by resource, ``tdpmmu.vtime``),
    #: ``host_breakdown`` (userfaultfd readers and the remover), ``lock_acquires``,
    #: ``lock_contended``, ``lock_wait_ns``, ``steps`` and ``switches`` (engine work).
    virtual: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def vm_type(self) -> str:
        """The VM type the run used (``spec.vm_type``)."""
        return self.spec.vm_type

    @property
    def vcpus(self) -> int:
        """Number of vCPUs, each a thread with its own slice (``spec.vcpus``)."""
        return self.spec.vcpus

    @property
    def backing(self) -> int:
        """Host page size behind guest memory, in bytes (``spec.backing``)."""
        return self.spec.backing

    @property
    def levels(self) -> int:
        """TDP paging levels, 4 or 5 (``spec.levels``)."""
        return self.spec.levels

    @property
    def seed(self) -> int:
        """The run's seed (``spec.seed``)."""
        return self.spec.seed

    @property
    def costs(self) -> CostModel:
        """The cost model the modeled figures use (``spec.costs``)."""
        return self.spec.costs

    @property
    def modeled_ns(self) -> float:
        """All modeled time of the run (setup and every vCPU, summed)."""
        return float(self.stats["modeled_ns"])

    def envelope(self) -> Envelope:
        """The run as a ``tdpmmu.results.Envelope`` (workload ``"demand_paging"``).

        Returns:
            Envelope: the full configuration (VM spec and workload parameters), both clocks,
            the cost breakdown and every figure of this result. Never raises.
        """
        return Envelope(
            workload="demand_paging",
            config={
                "vm": self.spec.to_dict(),
                "workload": {
                    "vcpus": self.vcpus,
                    "bytes_per_vcpu": self.bytes_per_vcpu,
                    "overlap": self.overlap,
                    "image_pages": self.image_pages,
                    "backing_source": self.backing_source,
                    "options": self.options.to_dict(),
                },
            },
            seed=self.seed,
            modeled_ns=self.modeled_ns,
            cost_breakdown=dict(self.cost_breakdown),
            wall_s=self.wall_s,
            result={
                "region": list(self.region),
                "pages_per_vcpu": self.pages_per_vcpu,
                "total_guest_execution_time_s": self.total_guest_execution_time_s,
                "per_vcpu_demand_paging_rate_pgs_per_s": self.per_vcpu_demand_paging_rate_pgs_per_s,
                "overall_demand_paging_rate_pgs_per_s": self.overall_demand_paging_rate_pgs_per_s,
                "slowest_vcpu_wall_s": self.slowest_vcpu_wall_s,
                "modeled_guest_execution_time_s": self.modeled_guest_execution_time_s,
                "modeled_per_vcpu_demand_paging_rate_pgs_per_s": (
                    self.modeled_per_vcpu_demand_paging_rate_pgs_per_s
                ),
                "modeled_overall_demand_paging_rate_pgs_per_s": (
                    self.modeled_overall_demand_paging_rate_pgs_per_s
                ),
                "per_vcpu": [dict(d) for d in self.per_vcpu],
                "stats": self.stats.to_dict(),
                "virtual": dict(self.virtual),
            },
        )

    @classmethod
    def from_envelope(cls, env: Envelope) -> "DemandPagingResult":
        """The result an envelope describes (``from_json``'s second half).

        Args:
            env: an envelope of this workload, e.g. ``Envelope.from_json(text)``.

        Returns:
            DemandPagingResult: the result, equal to the one the envelope was made from.

        Raises:
            ConfigError: ``env`` holds another workload's result (naming ``envelope``).
            KeyError: a field the result needs is missing from ``env``.
        """
        if env.workload != "demand_paging":
            raise ConfigError(f"envelope: a {env.workload} result, not demand_paging")
        wl, r = env.config["workload"], env.result
        return cls(
            spec=VmSpec.from_dict(env.config["vm"]),
            bytes_per_vcpu=int(wl["bytes_per_vcpu"]),
            overlap=bool(wl["overlap"]),
            image_pages=int(wl["image_pages"]),
            backing_source=wl.get("backing_source"),
            region=(int(r["region"][0]), int(r["region"][1])),
            pages_per_vcpu=int(r["pages_per_vcpu"]),
            total_guest_execution_time_s=float(r["total_guest_execution_time_s"]),
            per_vcpu_demand_paging_rate_pgs_per_s=finite_or_inf(
                r["per_vcpu_demand_paging_rate_pgs_per_s"]
            ),
            overall_demand_paging_rate_pgs_per_s=finite_or_inf(
                r["overall_demand_paging_rate_pgs_per_s"]
            ),
            slowest_vcpu_wall_s=float(r["slowest_vcpu_wall_s"]),
            modeled_guest_execution_time_s=float(r["modeled_guest_execution_time_s"]),
            modeled_per_vcpu_demand_paging_rate_pgs_per_s=finite_or_inf(
                r["modeled_per_vcpu_demand_paging_rate_pgs_per_s"]
            ),
            modeled_overall_demand_paging_rate_pgs_per_s=finite_or_inf(
                r["modeled_overall_demand_paging_rate_pgs_per_s"]
            ),
            per_vcpu=tuple(dict(d) for d in r["per_vcpu"]),
            stats=Stats(r["stats"]),
            cost_breakdown=dict(env.cost_breakdown),
            wall_s=env.wall_s,
            options=VirtualOptions.from_dict(wl.get("options", {"clock": "host"})),
            virtual=dict(r.get("virtual", {})),
        )

    def to_dict(self) -> dict[str, Any]:
        """The envelope as plain JSON types (non-finite rates as None).

        Returns:
            dict[str, Any]: ``envelope().to_dict()``. Never raises.
        """
        return self.envelope().to_dict()

    def to_json(self, **kwargs: Any) -> str:
        """The result as one JSON document (its envelope; non-finite rates as null).

        Args:
            **kwargs: passed to ``json.dumps`` (e.g. ``indent=2``).

        Returns:
            str: the JSON text; ``from_json`` reads it back. Never raises for a result.
        """
        return self.envelope().to_json(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> "DemandPagingResult":
        """The result a ``to_json`` text describes.

        Args:
            text: JSON as ``to_json`` wrote it.

        Returns:
            DemandPagingResult: the result.

        Raises:
            ConfigError: not a tdpmmu envelope, another schema, or another workload's result.
            json.JSONDecodeError: ``text`` is not JSON.
        """
        return cls.from_envelope(Envelope.from_json(text))


def demand_paging(
    vm_type: str = "default",
    vcpus: int = 1,
    bytes_per_vcpu: str | int = "1G",
    backing: str | int = "4K",
    overlap: bool = False,
    costs: CostModel | Mapping[str, float] | None = None,
    seed: int = 0,
    levels: int = 4,
    *,
    hooks: object = None,
    tdx: Mapping[str, object] | None = None,
    mirror: bool = False,
    folio: str | int | None = None,
    image_pages: int = 0,
    clock: str | None = None,
    mmu_lock: str = "shared",
    userfault: str | None = None,
    uffd_all: bool = False,
    uffd_readers: int = 1,
    uffd_delay_us: float = 0.0,
    machine: Machine | Mapping[str, Any] | None = None,
    tdx_module: str = "1.5",
) -> DemandPagingResult:
    """KVM's ``demand_paging_test``: every vCPU writes each page of its slice once, in order.

    The region is ``vcpus x bytes_per_vcpu`` of never-touched memory, so every page takes a
    first-touch fault. Each vCPU gets its own slice, or with ``overlap`` walks the whole region
    (memstress's ``-o``). Unlike memstress the region starts at gfn 0 and is the default memslot
    rather than sitting at the top of guest-physical space: the faults are the same, the
    page-table shape differs by at most one table per level.

    ``backing`` is a host page size (``"4K"``, ``"2M"``, ``"1G"``) or a selftest ``-s`` name
    (``BACKING_SOURCES``). ``hooks``, ``tdx``, ``mirror`` and ``folio`` are ``tdpmmu.VM``'s.
    The VM is set up as a VMM would (``vmspec.launch``): on a confidential VM the test region is
    private memory; ``image_pages`` pages after the region are populated as the initial image
    (a TD adds them with TDH.MEM.PAGE.ADD), and a TD is finalized before the vCPUs run.

    Args:
        vm_type: ``tdpmmu.VM``'s ``vm_type`` (default ``"default"``).
        vcpus: number of vCPUs, each a real thread, >= 1 (default 1; at most 4096).
        bytes_per_vcpu: memory per vCPU slice, bytes or a size string (``"64M"``, ``"1G"``;
            powers of 1024), a positive multiple of 4096 (default ``"1G"``); ``vcpus x
            bytes_per_vcpu`` must be a multiple of the backing page.
        backing: host page size (``"4K"`` default, ``"2M"``, ``"1G"``, or bytes) or a selftest
            ``-s`` name from ``BACKING_SOURCES`` (``"anonymous_thp"``, ...).
        overlap: every vCPU walks the whole region instead of its own slice (default False).
        costs: ``tdpmmu.VM``'s ``costs`` (a ``CostModel``, a mapping of overrides or None).
        seed: ``tdpmmu.VM``'s ``seed``, an int >= 0 (default 0).
        levels: TDP paging levels, 4 (default) or 5.
        hooks: ``tdpmmu.VM``'s ``hooks`` (None: the VM type's default design).
        tdx: ``tdpmmu.VM``'s ``tdx`` options (text values accepted, as the CLI gives them).
        mirror: ``tdpmmu.VM``'s ``mirror`` (sw_protected only).
        folio: ``tdpmmu.VM``'s ``folio`` (``"4K"``/``"2M"``; VM types with guest_memfd).
        image_pages: initial-image pages (4 KiB) populated after the region before the run,
            >= 0 (default 0).
        clock: ``"virtual"`` (the default, except with a ``hooks`` object): every vCPU is
            simulated on one host thread in modeled-time order, with ``mmu_lock``, the host
            memory path, userfaultfd, IPIs and the TDX module's locks as shared resources, so the
            modeled rates show how the VM scales; deterministic for a seed. ``"host"``: one real
            thread per vCPU, for host-speed measurements; its modeled time has no concurrency
            (N vCPUs model N x one). A ``hooks`` object (Python code) runs on host threads only.
        mmu_lock: ``"shared"`` (faults take mmu_lock for read, default) or ``"exclusive"`` (for
            write, KVM before parallel TDP MMU faults). Virtual time only.
        userfault: None/``"none"`` (anonymous memory), ``"MISSING"`` or ``"MINOR"`` (the
            selftest's ``-u``: userfaultfd with reader threads), or ``"memory_fault"``
            (KVM_EXIT_MEMORY_FAULT: each vCPU thread resolves its own fault). Default VMs (the
            test memory must be shared). Virtual time only.
        uffd_all: one userfaultfd for all vCPUs (``-a``) instead of one per vCPU.
        uffd_readers: reader threads per userfaultfd (``-r``), 1..64 (default 1).
        uffd_delay_us: userspace delay per fault in µs (``-d``), >= 0 (default 0).
        machine: the host (``tdpmmu.vtime.Machine`` or a mapping of its fields; default 2
            sockets x 64 cores x 2 threads, 150 GB/s per socket).
        tdx_module: TDX module lock table, ``"1.5"`` (default) or ``"1.0"`` (AUG exclusive).

    Returns:
        DemandPagingResult: both clocks' times and rates (guest 4 KiB pages per second), the
        per-vCPU records, the counters and the cost breakdown; virtual-time runs add fault
        outcomes, lock figures and the vCPUs' modeled time by resource (``virtual``).

    Raises:
        ConfigError: a bad value, naming the argument (``vcpus``, ``bytes_per_vcpu``,
            ``backing``, ``image_pages``, or any ``tdpmmu.VM`` argument).
        TypeError: a value of the wrong type.
        VmBugged: the run hit a KVM_BUG_ON (e.g. a busy SEAMCALL twice on the zap side).
        OutOfMemory: page-table memory ran out.
    """
    run_start = time.perf_counter()
    opts = virtual_options(
        clock=clock,
        hooks=hooks,
        mmu_lock=mmu_lock,
        userfault=userfault,
        uffd_all=uffd_all,
        uffd_readers=uffd_readers,
        uffd_delay_us=uffd_delay_us,
        machine=machine,
        tdx_module=tdx_module,
    )
    nvcpus = coerce.count(vcpus, "vcpus")
    per_vcpu_bytes = coerce.size(bytes_per_vcpu, "bytes_per_vcpu")
    backing_bytes, source = backing_source(backing)
    image = coerce.count(image_pages, "image_pages", 0)
    flag = coerce.flag(overlap, "overlap")
    total = nvcpus * per_vcpu_bytes
    if total % backing_bytes:
        # memstress requires the region to be aligned to the host (backing) page as well.
        raise ConfigError(
            f"bytes_per_vcpu: vcpus x bytes_per_vcpu = {total} bytes must be a multiple of the "
            f"backing page ({backing_bytes} bytes)"
        )
    image_bytes = -(-image * PAGE_SIZE // backing_bytes) * backing_bytes
    spec = VmSpec.create(
        vm_type=vm_type,
        memory=total + image_bytes,
        vcpus=nvcpus,
        levels=levels,
        backing=backing_bytes,
        hooks=hooks,
        costs=costs,
        seed=seed,
        tdx=tdx,
        mirror=mirror,
        folio=folio,
    )
    vm = spec.build()
    launch(vm, image_gfn=total // PAGE_SIZE, image_pages=image)
    # memstress's -o: the region keeps its size and each vCPU's slice becomes all of it.
    slice_pages = total // PAGE_SIZE if flag else per_vcpu_bytes // PAGE_SIZE
    if opts.userfault != "none" and spec.confidential:
        raise ConfigError(
            f"userfault: {opts.userfault} resolves shared memory; a {spec.vm_type} VM's test "
            "memory is private (use vm_type='default')"
        )
    # The selftest's clock: from starting the vCPU threads to joining them. run_memstress
    # spawns and joins them inside one native call (without the GIL); run_virtual runs them all.
    margs = (
        nvcpus,
        slice_pages,
        0,
        flag,
        False,  # in order, as demand_paging_test
        100,  # write_percent: the test only writes
        spec.seed,
        True if spec.confidential else None,
    )
    virtual: dict[str, Any] = {}
    start = time.perf_counter()
    if opts.clock == "virtual":
        rec = vm.run_virtual(*margs, **opts.run_kwargs())
        wall_s = time.perf_counter() - start
        per_vcpu: list[VcpuRecord] = [
            {
                "wall_s": rec["wall_s"],
                "modeled_ns": v["modeled_ns"],
                "faults": v["faults"],
                "pages": v["accesses"],
            }
            for v in rec["vcpus"]
        ]
        virtual = virtual_summary(rec)
    else:
        per_vcpu = vm.run_memstress(*margs)
        wall_s = time.perf_counter() - start
    if len(per_vcpu) != nvcpus:
        raise RuntimeError(f"the run returned {len(per_vcpu)} records for {nvcpus} vCPUs")
    pages0 = int(per_vcpu[0]["pages"])
    modeled_s = max(float(d["modeled_ns"]) for d in per_vcpu) / 1e9
    wall_rate = rate(pages0, wall_s)
    modeled_rate = rate(pages0, modeled_s)
    stats = vm.stats
    breakdown = dict(vm.cost_breakdown())
    return DemandPagingResult(
        spec=spec,
        bytes_per_vcpu=per_vcpu_bytes,
        overlap=flag,
        image_pages=image,
        backing_source=source,
        region=(0, total),
        pages_per_vcpu=pages0,
        total_guest_execution_time_s=wall_s,
        per_vcpu_demand_paging_rate_pgs_per_s=wall_rate,
        overall_demand_paging_rate_pgs_per_s=rate(pages0 * nvcpus, wall_s),
        slowest_vcpu_wall_s=max(float(d["wall_s"]) for d in per_vcpu),
        modeled_guest_execution_time_s=modeled_s,
        modeled_per_vcpu_demand_paging_rate_pgs_per_s=modeled_rate,
        modeled_overall_demand_paging_rate_pgs_per_s=rate(pages0 * nvcpus, modeled_s),
        per_vcpu=tuple(_vcpu_record(d) for d in per_vcpu),
        stats=stats,
        cost_breakdown=breakdown,
        wall_s=time.perf_counter() - run_start,
        options=opts,
        virtual=virtual,
    )
