"""KVM's ``demand_paging_test``: first-touch fault throughput (``demand_paging``).

Also the flag parsing the memstress-based workloads share (``-b`` sizes, ``-s`` backing names,
``-m`` modes, ``-c`` pinning): ``size_arg``, ``count_arg``, ``backing_arg``, ``mode_arg``,
``pinning_arg`` and ``split_pinning``.
"""

import argparse
import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from tdpmmu import coerce
from tdpmmu._core import ConfigError
from tdpmmu.costs import CostModel
from tdpmmu.results import Envelope, json_safe
from tdpmmu.stats import Stats
from tdpmmu.vmspec import VmSpec
from tdpmmu.vtime import Machine, VirtualOptions, pin_list
from tdpmmu.workloads import memstress
from tdpmmu.workloads.base import Checks, Clock, Progress, SimArgs, Tabular, Workload, register
from tdpmmu.workloads.common import (
    BACKING_SOURCES,
    backing_source,
    finite_or_inf,
    rate,
    virtual_options,
)

if TYPE_CHECKING:
    pass

__all__ = [
    "GUEST_MODES",
    "DemandPagingResult",
    "backing_arg",
    "count_arg",
    "demand_paging",
    "mode_arg",
    "pinning_arg",
    "size_arg",
    "split_pinning",
]

#: The selftests' ``-m`` guest modes on x86: the one mode, id 0.
GUEST_MODES: Mapping[int, str] = {0: "PA-bits:ANY, VA-bits:48,  4K pages"}


# ----- flag types the memstress-based workloads share -------------------------------------------


def size_arg(text: str) -> int:
    """``-b SIZE``: digits with an optional k/m/g/t suffix (powers of 1024) or ``0x...``, a
    positive multiple of 4096, in bytes.

    Args:
        text: the flag's value as typed.

    Raises:
        argparse.ArgumentTypeError: not such a size.
    """
    t = text.strip()
    try:
        if t.lower().startswith("0x"):
            return coerce.size(int(t, 16), "size")
        return coerce.size(t, "size")
    except (ConfigError, ValueError, TypeError) as e:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: {e}") from None


def count_arg(lo: int, hi: int | None = None) -> "Any":
    """An argparse type: an integer in ``lo..hi`` (``hi`` None: no upper bound).

    Args:
        lo: the smallest value allowed.
        hi: the largest, or None.

    Returns:
        a function ``str -> int`` raising ``argparse.ArgumentTypeError`` outside the range.
    """

    def parse(text: str) -> int:
        try:
            v = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            allowed = f">= {lo}" if hi is None else f"in {lo}..{hi}"
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {v}")
        return v

    return parse


def backing_arg(text: str) -> str:
    """``-s TYPE``: a selftest backing source name this model has (``BACKING_SOURCES``).

    Args:
        text: the flag's value as typed.

    Raises:
        argparse.ArgumentTypeError: another name (shmem and the other sizes are not modeled).
    """
    if text not in BACKING_SOURCES:
        raise argparse.ArgumentTypeError(
            f"unknown or unmodeled backing source {text!r}; allowed: {', '.join(BACKING_SOURCES)}"
        )
    return text


def mode_arg(text: str) -> int:
    """``-m MODE``: a guest mode id; x86 has one, 0 ("PA-bits:ANY, VA-bits:48,  4K pages").

    Args:
        text: the flag's value as typed.

    Raises:
        argparse.ArgumentTypeError: any other id.
    """
    try:
        v = int(text, 0)
    except ValueError:
        v = -1
    if v not in GUEST_MODES:
        raise argparse.ArgumentTypeError(
            f"guest mode {text!r} is not supported on x86; allowed: 0 ({GUEST_MODES[0]})"
        )
    return v


def pinning_arg(text: str) -> list[int]:
    """``-c a,b,c[,main]``: pCPU numbers, comma-separated (vCPU ``i`` on ``a_i``, an optional
    last entry for the main thread).

    Args:
        text: the flag's value as typed.

    Raises:
        argparse.ArgumentTypeError: an empty entry or one that is not a non-negative integer.
    """
    out = []
    for part in text.split(","):
        p = part.strip()
        if not p.isdigit():
            raise argparse.ArgumentTypeError(
                f"pCPU list {text!r}: {p!r} is not a non-negative integer"
            )
        out.append(int(p))
    return out


def split_pinning(
    cpus: Sequence[int] | None, vcpus: int, machine: Machine
) -> tuple[tuple[int, ...] | None, int | None]:
    """A ``-c`` list as (vCPU CPUs, main thread's CPU), checked as the selftests check it.

    Pinning is all or nothing: ``cpus`` has one entry per vCPU, optionally one more for the
    main thread; every CPU is in ``0..machine.cpus``; the vCPUs' CPUs are distinct (the
    virtual-time engine runs each vCPU on its own CPU; time-sharing one is not modeled).

    Args:
        cpus: the list, or None (no pinning: vCPU ``i`` on CPU ``i``).
        vcpus: the run's vCPUs.
        machine: the modeled host.

    Returns:
        tuple: the vCPUs' CPUs (None without pinning) and the main entry (None if absent).

    Raises:
        ConfigError: naming ``cpus``: a wrong count, a CPU outside the machine, a CPU twice.
    """
    if cpus is None:
        return None, None
    if isinstance(cpus, str | bytes) or not isinstance(cpus, Sequence):
        raise ConfigError(f"cpus: must be a list of CPU numbers, got {cpus!r}")
    if len(cpus) not in (vcpus, vcpus + 1):
        raise ConfigError(
            f"cpus: pinning is all or nothing: {len(cpus)} CPUs given for {vcpus} vCPUs "
            f"(expected {vcpus}, or {vcpus + 1} with the main thread's last)"
        )
    pinned = pin_list(cpus[:vcpus], machine)
    main = None
    if len(cpus) == vcpus + 1:
        main = cpus[vcpus]
        if isinstance(main, bool) or not isinstance(main, int) or not 0 <= main < machine.cpus:
            raise ConfigError(
                f"cpus: the main thread's CPU {main!r} is not in the machine's "
                f"0..{machine.cpus - 1}"
            )
    return pinned, main


#: ``DemandPagingResult``'s figures that are also its ``metrics``: modeled, then host wall.
_RATE_FIELDS = (
    "total_guest_execution_time_s",
    "per_vcpu_demand_paging_rate_pgs_per_s",
    "overall_demand_paging_rate_pgs_per_s",
    "wall_total_guest_execution_time_s",
    "wall_per_vcpu_demand_paging_rate_pgs_per_s",
    "wall_overall_demand_paging_rate_pgs_per_s",
)


def _rates_of(r: Mapping[str, Any]) -> dict[str, Any]:
    """The ``_RATE_FIELDS`` of an envelope's result; one written before the host wall figures
    took the ``wall_`` prefix (unprefixed = host wall, ``modeled_*`` = modeled) is renamed."""
    if "modeled_guest_execution_time_s" in r:
        return {
            "total_guest_execution_time_s": r["modeled_guest_execution_time_s"],
            "per_vcpu_demand_paging_rate_pgs_per_s": (
                r["modeled_per_vcpu_demand_paging_rate_pgs_per_s"]
            ),
            "overall_demand_paging_rate_pgs_per_s": r[
                "modeled_overall_demand_paging_rate_pgs_per_s"
            ],
            "wall_total_guest_execution_time_s": r["total_guest_execution_time_s"],
            "wall_per_vcpu_demand_paging_rate_pgs_per_s": r[
                "per_vcpu_demand_paging_rate_pgs_per_s"
            ],
            "wall_overall_demand_paging_rate_pgs_per_s": r["overall_demand_paging_rate_pgs_per_s"],
        }
    return {name: r[name] for name in _RATE_FIELDS}


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DemandPagingResult(Tabular):
    """One ``demand_paging`` run; rates are in guest 4 KiB pages, as in the selftest.

    ``lines`` are the selftest's output with **modeled** times, and ``metrics`` the same
    figures as numbers (the protocol of ``WorkloadResult``). Attributes and metrics share their
    names and clocks: ``total_guest_execution_time_s`` and the two unprefixed rates are
    **modeled** (the slowest vCPU's modeled time: the simulated vCPUs run in parallel; per-vCPU
    rate = ``pages_per_vcpu / time``, overall = ``pages_per_vcpu * vcpus / time``); the same
    three prefixed ``wall_`` are **host wall-clock** figures measured as ``demand_paging_test``
    measures them (from starting the vCPU threads to joining them, around the one native call
    that spawns and joins them).
    """

    #: The VM's full configuration.
    spec: VmSpec
    bytes_per_vcpu: int
    overlap: bool
    #: Initial-image pages populated in slot 0 before the run (a TD: TDH.MEM.PAGE.ADD before
    #: finalize).
    image_pages: int
    #: The selftest's ``-s`` name when the backing was given as one, else None.
    backing_source: str | None
    #: Guest-physical test region [start, end) in bytes ("guest physical test memory"): at the
    #: top of guest-physical space, as memstress places it.
    region: tuple[int, int]
    #: Pages in vCPU 0's slice: the numerator of the selftest's rates.
    pages_per_vcpu: int
    #: Host wall time from starting the vCPU threads to joining them (the selftest's clock).
    wall_total_guest_execution_time_s: float
    #: ``pages_per_vcpu / wall_total_guest_execution_time_s`` (host wall clock).
    wall_per_vcpu_demand_paging_rate_pgs_per_s: float
    #: ``pages_per_vcpu * vcpus / wall_total_guest_execution_time_s`` (host wall clock).
    wall_overall_demand_paging_rate_pgs_per_s: float
    #: Extra detail: the longest any one vCPU thread ran by its own clock (thread start-up and
    #: join are outside it, so rates from it overstate throughput when threads outnumber cores).
    slowest_vcpu_wall_s: float
    #: Modeled time of the slowest vCPU by the cost model (``metrics`` of the same name).
    total_guest_execution_time_s: float
    #: ``pages_per_vcpu / total_guest_execution_time_s`` (modeled).
    per_vcpu_demand_paging_rate_pgs_per_s: float
    #: ``pages_per_vcpu * vcpus / total_guest_execution_time_s`` (modeled).
    overall_demand_paging_rate_pgs_per_s: float
    #: Native per-vCPU records: wall_s (the thread's own), modeled_ns, faults, pages.
    per_vcpu: tuple[Mapping[str, float], ...]
    #: Counters after the run (setup included).
    stats: Stats
    #: All modeled time of the run (setup and every vCPU) by CostModel field.
    cost_breakdown: Mapping[str, float]
    #: Host wall-clock seconds of the whole run (VM creation, setup, vCPUs).
    wall_s: float
    #: The clock and the shared resources' knobs the run used (``options.cpus``: ``-c``).
    options: VirtualOptions = dataclasses.field(default_factory=VirtualOptions)
    #: Virtual-time runs only (else empty): ``outcomes`` (every vCPU's fault outcomes summed:
    #: ``accesses`` = hits + fixed + spurious + emulate + write_protected; ``faults`` = those
    #: minus hits plus retry and memory_fault), ``vcpu_breakdown`` (the vCPUs' modeled time by
    #: CostModel field and wait kind), ``resources`` (the same by resource, ``tdpmmu.vtime``),
    #: ``host_breakdown`` (userfaultfd readers and the remover), ``lock_acquires``,
    #: ``lock_contended``, ``lock_wait_ns``, ``steps`` and ``switches`` (engine work).
    virtual: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    #: The selftest's output lines, modeled times (empty for results made before they were).
    lines: tuple[str, ...] = ()
    #: (label, modeled seconds, host wall seconds) of each phase.
    phases: tuple[tuple[str, float, float], ...] = ()
    #: ``checks`` (``Checks`` records: each vCPU made its accesses; the whole region is mapped;
    #: a failed one is recorded, not raised: see ``ok``), ``main_cpu`` (the
    #: ``-c`` list's main-thread entry, recorded, not modeled), ``virtual`` (as ``virtual``).
    detail: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def workload(self) -> str:
        """The registry name, ``"demand_paging"``."""
        return "demand_paging"

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

    @property
    def params(self) -> dict[str, Any]:
        """The workload's parameters (JSON-safe), as ``WorkloadResult.params``."""
        return {
            "vcpus": self.vcpus,
            "bytes_per_vcpu": self.bytes_per_vcpu,
            "overlap": self.overlap,
            "image_pages": self.image_pages,
            "backing_source": self.backing_source,
        }

    @property
    def metrics(self) -> dict[str, float]:
        """The selftest's figures as numbers: ``total_guest_execution_time_s``,
        ``per_vcpu_demand_paging_rate_pgs_per_s``, ``overall_demand_paging_rate_pgs_per_s``
        (modeled), the same three prefixed ``wall_`` (host wall clock), and ``pages_per_vcpu``.
        """
        return {
            **{name: float(getattr(self, name)) for name in _RATE_FIELDS},
            "pages_per_vcpu": float(self.pages_per_vcpu),
        }

    @property
    def ok(self) -> bool:
        """Whether every check of the run held (``detail["checks"]``, ``Checks`` records)."""
        return all(bool(c.get("ok")) for c in self.detail.get("checks", ()))

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
                "workload": {**self.params, "options": self.options.to_dict()},
            },
            seed=self.seed,
            modeled_ns=self.modeled_ns,
            cost_breakdown=dict(self.cost_breakdown),
            wall_s=self.wall_s,
            result={
                "region": list(self.region),
                "pages_per_vcpu": self.pages_per_vcpu,
                **{name: getattr(self, name) for name in _RATE_FIELDS},
                "slowest_vcpu_wall_s": self.slowest_vcpu_wall_s,
                "per_vcpu": [dict(d) for d in self.per_vcpu],
                "stats": self.stats.to_dict(),
                "virtual": json_safe(self.virtual),
                "lines": list(self.lines),
                "metrics": json_safe(self.metrics),
                "phases": [list(p) for p in self.phases],
                "detail": json_safe(self.detail),
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
            **{name: finite_or_inf(v) for name, v in _rates_of(r).items()},
            slowest_vcpu_wall_s=float(r["slowest_vcpu_wall_s"]),
            per_vcpu=tuple(dict(d) for d in r["per_vcpu"]),
            stats=Stats(r["stats"]),
            cost_breakdown=dict(env.cost_breakdown),
            wall_s=env.wall_s,
            options=VirtualOptions.from_dict(wl.get("options", {"clock": "host"})),
            virtual=dict(r.get("virtual", {})),
            lines=tuple(str(x) for x in r.get("lines", ())),
            phases=tuple((str(a), float(b), float(c)) for a, b, c in r.get("phases", ())),
            detail=dict(r.get("detail", {})),
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


def _line_rate(x: float) -> str:
    return f"{x:f}"


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
    cpus: Sequence[int] | None = None,
    ad_bits: bool = True,
    progress: Progress | None = None,
) -> DemandPagingResult:
    """KVM's ``demand_paging_test``: every vCPU writes each page of its slice once, in order.

    The region is ``vcpus x bytes_per_vcpu`` of never-touched memory placed as memstress
    places it (``workloads.memstress``): at the top of guest-physical space (below the shared
    bit on a TD), aligned to the backing page, one memslot after slot 0. Every page takes a
    first-touch fault. Each vCPU gets its own slice, or with ``overlap`` walks the whole region
    (memstress's ``-o``, which also makes the selftest use one userfaultfd for all vCPUs).

    ``backing`` is a host page size (``"4K"``, ``"2M"``, ``"1G"``) or a selftest ``-s`` name
    (``BACKING_SOURCES``). ``hooks``, ``tdx``, ``mirror`` and ``folio`` are ``tdpmmu.VM``'s.
    The VM is set up as a VMM would (``vmspec.launch``): on a confidential VM the test region is
    private memory (guest_memfd); ``image_pages`` pages of slot 0 are populated as the initial
    image (a TD adds them with TDH.MEM.PAGE.ADD), and a TD is finalized before the vCPUs run.

    Args:
        vm_type: ``tdpmmu.VM``'s ``vm_type`` (default ``"default"``).
        vcpus: number of vCPUs (``-v``), >= 1 (default 1; at most 4096).
        bytes_per_vcpu: memory per vCPU slice (``-b``), bytes or a size string (``"64M"``,
            ``"1G"``; powers of 1024), a positive multiple of 4096 (default ``"1G"``);
            ``vcpus x bytes_per_vcpu`` must be a multiple of the backing page.
        backing: host page size (``"4K"`` default, ``"2M"``, ``"1G"``, or bytes) or a selftest
            ``-s`` name from ``BACKING_SOURCES`` (``"anonymous_thp"``, ...).
        overlap: every vCPU walks the whole region instead of its own slice (``-o``).
        costs: ``tdpmmu.VM``'s ``costs`` (a ``CostModel``, a mapping of overrides or None).
        seed: ``tdpmmu.VM``'s ``seed``, an int >= 0 (default 0).
        levels: TDP paging levels, 4 (default) or 5.
        hooks: ``tdpmmu.VM``'s ``hooks`` (None: the VM type's default design).
        tdx: ``tdpmmu.VM``'s ``tdx`` options (text values accepted, as the CLI gives them).
        mirror: ``tdpmmu.VM``'s ``mirror`` (sw_protected only).
        folio: ``tdpmmu.VM``'s ``folio`` (``"4K"``/``"2M"``; VM types with guest_memfd).
        image_pages: initial-image pages (4 KiB) populated in slot 0 before the run, >= 0
            (default 0).
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
        uffd_all: one userfaultfd for all vCPUs (``-a``) instead of one per vCPU (implied by
            ``overlap``, as in the selftest).
        uffd_readers: reader threads per userfaultfd (``-r``), 1..64 (default 1).
        uffd_delay_us: userspace delay per fault in µs (``-d``), >= 0 (default 0).
        machine: the host (``tdpmmu.vtime.Machine`` or a mapping of its fields; default 2
            sockets x 64 cores x 2 threads, 150 GB/s per socket).
        tdx_module: TDX module lock table, ``"1.5"`` (default) or ``"1.0"`` (AUG exclusive).
        cpus: the selftest's ``-c`` pinning: vCPU ``i`` runs on CPU ``cpus[i]`` of ``machine``
            (cache-line transfers and IPIs cost by those CPUs' distance), one distinct CPU per
            vCPU, all or nothing; an optional last entry is the main thread's CPU, checked and
            recorded (``detail["main_cpu"]``) but not modeled: the main thread only waits during
            the measured window, and the userfaultfd readers (which inherit its affinity in the
            selftest) keep CPUs of their own because the engine does not model CPU time-sharing.
            None (default): vCPU ``i`` on CPU ``i``. Virtual time only.
        progress: called after each phase (``done, total, label``).
        ad_bits: ``tdpmmu.VM``'s ``ad_bits`` (False: EPT A/D bits off, KVM's
            ``enable_ept_ad_bits=0``; default True).

    Returns:
        DemandPagingResult: the selftest's lines (modeled), both clocks' times and rates (guest
        4 KiB pages per second), the per-vCPU records, the counters and the cost breakdown;
        virtual-time runs add fault outcomes, lock figures and the vCPUs' modeled time by
        resource (``virtual``). The run's checks are in ``detail["checks"]``; a failed one
        does not raise: the result comes back with ``ok`` False.

    Raises:
        ConfigError: a bad value, naming the argument (``vcpus``, ``bytes_per_vcpu``,
            ``backing``, ``image_pages``, ``cpus``, ``userfault`` on a confidential VM, or any
            ``tdpmmu.VM`` argument).
        TypeError: a value of the wrong type.
        VmBugged: the run hit a KVM_BUG_ON (e.g. a busy SEAMCALL twice on the zap side).
        OutOfMemory: page-table memory ran out.
    """
    run_start = time.perf_counter()
    flag = coerce.flag(overlap, "overlap")
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
    pinned, main_cpu = split_pinning(cpus, nvcpus, opts.machine)
    if pinned is not None or (flag and opts.userfault in ("MISSING", "MINOR")):
        # -o forces one userfaultfd for all vCPUs in the selftest.
        uffd = opts.uffd_all or (flag and opts.userfault in ("MISSING", "MINOR"))
        opts = dataclasses.replace(opts, cpus=pinned, uffd_all=uffd)
    image = coerce.count(image_pages, "image_pages", 0)
    _, source = backing_source(backing)
    sim: SimArgs = {
        "vm_type": vm_type,
        "hooks": hooks,
        "tdx": tdx,
        "mirror": mirror,
        "folio": folio,
        "costs": costs,
        "seed": seed,
        "levels": levels,
        "ad_bits": ad_bits,
    }
    vm, spec, layout = memstress.build(
        sim,
        vcpus=nvcpus,
        bytes_per_vcpu=bytes_per_vcpu,
        backing=backing,
        overlap=flag,
        image_pages=image,
    )
    if opts.userfault != "none" and spec.confidential:
        raise ConfigError(
            f"userfault: {opts.userfault} resolves shared memory; a {spec.vm_type} VM's test "
            "memory is private (use vm_type='default')"
        )
    clock_ = Clock(vm, progress, 1)
    lines = [
        f"Random seed: {memstress.DEFAULT_GUEST_SEED:#x}",
        *layout.harness_lines(),
        "Finished creating vCPUs and starting uffd threads",
        "Started all vCPUs",
    ]
    # The selftest's clock: from starting the vCPU threads to joining them. run_memstress
    # spawns and joins them inside one native call (without the GIL); run_virtual runs them all.
    res = memstress.run_pass(
        vm,
        layout,
        opts,
        write_percent=100,  # the test only writes, in order
        random_access=False,
        seed=memstress.DEFAULT_GUEST_SEED,
        private=True if spec.confidential else None,
    )
    clock_.record("Guest execution", res.modeled_s, res.wall_s)
    per_vcpu = res.per_vcpu
    if len(per_vcpu) != nvcpus:
        raise RuntimeError(f"the run returned {len(per_vcpu)} records for {nvcpus} vCPUs")
    pages0 = int(per_vcpu[0]["pages"])
    modeled_s = res.modeled_s
    wall_s = res.wall_s
    stats = vm.stats
    mapped = stats["pages_4k"] + 512 * stats["pages_2m"] + 512 * 512 * stats["pages_1g"]
    checks = Checks()
    short = [i for i, d in enumerate(per_vcpu) if int(d["pages"]) != layout.pages_per_vcpu]
    checks.add(
        "every vCPU made one access per page of its slice",
        not short,
        f"vCPUs {short[:8]} made other counts than {layout.pages_per_vcpu}" if short else "",
    )
    checks.add(
        "the whole region is mapped",
        mapped >= layout.npages,
        f"{mapped:,} of {layout.npages:,} pages mapped",
    )
    lines += [
        "All vCPU threads joined",
        f"Total guest execution time:\t{modeled_s:.9f}s",
        f"Per-vcpu demand paging rate:\t{_line_rate(rate(pages0, modeled_s))} pgs/sec/vcpu",
        f"Overall demand paging rate:\t{_line_rate(rate(pages0 * nvcpus, modeled_s))} pgs/sec",
    ]
    detail: dict[str, Any] = {"checks": checks.to_list(), "main_cpu": main_cpu}
    if res.virtual:
        detail["virtual"] = res.virtual
    return DemandPagingResult(
        spec=spec,
        bytes_per_vcpu=layout.bytes_per_vcpu,
        overlap=flag,
        image_pages=image,
        backing_source=source,
        region=layout.region,
        pages_per_vcpu=pages0,
        wall_total_guest_execution_time_s=wall_s,
        wall_per_vcpu_demand_paging_rate_pgs_per_s=rate(pages0, wall_s),
        wall_overall_demand_paging_rate_pgs_per_s=rate(pages0 * nvcpus, wall_s),
        slowest_vcpu_wall_s=max(float(d["wall_s"]) for d in per_vcpu),
        total_guest_execution_time_s=modeled_s,
        per_vcpu_demand_paging_rate_pgs_per_s=rate(pages0, modeled_s),
        overall_demand_paging_rate_pgs_per_s=rate(pages0 * nvcpus, modeled_s),
        per_vcpu=tuple(dict(d) for d in per_vcpu),
        stats=stats,
        cost_breakdown=dict(vm.cost_breakdown()),
        wall_s=time.perf_counter() - run_start,
        options=opts,
        virtual=res.virtual,
        lines=tuple(lines),
        phases=tuple(clock_.phases),
        detail=detail,
    )


# ----- the CLI's flags ----------------------------------------------------------------------------


def add_pinning_flag(parser: argparse.ArgumentParser) -> None:
    """Add ``-c/--cpus LIST`` (the selftests' pCPU pinning) to ``parser``.

    Args:
        parser: the subcommand's parser.

    Returns:
        None. Never raises.
    """
    parser.add_argument(
        "-c",
        "--cpus",
        type=pinning_arg,
        metavar="LIST",
        help="pin vCPU i to pCPU a_i of the modeled machine: a,b,c[,main] (all or nothing; the "
        "main thread's entry is checked, not modeled). Virtual time only.",
    )


def add_memstress_flags(parser: argparse.ArgumentParser, *, mode: bool = True) -> None:
    """Add memstress's shared flags ``-b -s -v -o`` (and ``-m``) to ``parser``.

    Args:
        parser: the subcommand's parser.
        mode: also add ``-m/--mode``.

    Returns:
        None. Never raises.
    """
    if mode:
        parser.add_argument(
            "-m",
            "--mode",
            type=mode_arg,
            metavar="MODE",
            help=f"guest mode; x86 has one: 0 ({GUEST_MODES[0]})",
        )
    parser.add_argument(
        "-b",
        "--bytes-per-vcpu",
        type=size_arg,
        default="1G",
        metavar="SIZE",
        help="memory per vCPU, e.g. 10M, 3G, 0x100000 (default 1G)",
    )
    parser.add_argument(
        "-s",
        "--backing",
        type=backing_arg,
        default="anonymous",
        metavar="TYPE",
        help=f"backing source: {', '.join(BACKING_SOURCES)} (default anonymous)",
    )
    parser.add_argument(
        "-v", "--vcpus", type=count_arg(1, 4096), default=1, metavar="N", help="vCPUs (default 1)"
    )
    parser.add_argument(
        "-o",
        "--overlap",
        action="store_true",
        help="every vCPU walks the whole region instead of its own slice",
    )


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-u",
        "--userfault",
        choices=("MISSING", "MINOR", "memory_fault"),
        metavar="MODE",
        help="resolve faults in userspace: userfaultfd MISSING or MINOR, or memory_fault "
        "(KVM_EXIT_MEMORY_FAULT, each vCPU resolves its own; tdpmmu's addition) (default VMs "
        "only)",
    )
    parser.add_argument(
        "-a", "--uffd-all", action="store_true", help="one userfaultfd for all vCPUs"
    )
    parser.add_argument(
        "-d",
        "--uffd-delay",
        type=count_arg(0),
        default=0,
        metavar="USEC",
        help="delay per userfaultfd fault, microseconds (default 0)",
    )
    parser.add_argument(
        "-r",
        "--uffd-readers",
        type=count_arg(1, 64),
        default=1,
        metavar="N",
        help="reader threads per userfaultfd, 1..64 (default 1)",
    )
    add_memstress_flags(parser)
    add_pinning_flag(parser)


def _from_args(ns: argparse.Namespace) -> dict[str, Any]:
    return {
        "vcpus": ns.vcpus,
        "bytes_per_vcpu": ns.bytes_per_vcpu,
        "backing": ns.backing,
        "overlap": ns.overlap,
        "userfault": ns.userfault,
        "uffd_all": ns.uffd_all,
        "uffd_delay_us": float(ns.uffd_delay),
        "uffd_readers": ns.uffd_readers,
        "cpus": ns.cpus,
    }


register(
    Workload(
        name="demand_paging",
        command="demand-paging",
        selftest="demand_paging_test",
        summary="first-touch fault throughput: every vCPU writes each page of its slice once.",
        run=demand_paging,
        vm_types=("default", "sw_protected", "tdx", "snp"),
        add_arguments=_add_arguments,
        from_args=_from_args,
    )
)
