"""What every workload shares: the simulator arguments (``SimArgs``), the result record
(``WorkloadResult``), phase timing (``Clock``) and the registry the CLI and sweeps read
(``Workload``, ``WORKLOADS``).

A workload function takes its selftest's parameters by name, then the simulator's keyword
arguments (``SimArgs``: VM type, hook design, TDX options, costs, clock, ...) and returns a
``WorkloadResult``: the selftest's output lines with modeled times, flat metrics, counters and
the cost breakdown, JSON both ways and a one-row DataFrame.
"""

import contextlib
import contextvars
import dataclasses
import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NotRequired, Protocol, TypedDict

from tdpmmu._core import ConfigError
from tdpmmu.costs import CostModel
from tdpmmu.results import Envelope, json_safe, sum_breakdowns
from tdpmmu.stats import Stats
from tdpmmu.vm import VM
from tdpmmu.vmspec import VmSpec
from tdpmmu.vtime import Machine, VirtualOptions
from tdpmmu.workloads.common import finite_or_inf, virtual_options

if TYPE_CHECKING:
    import argparse

    import pandas

__all__ = [
    "WORKLOADS",
    "Checks",
    "Clock",
    "Progress",
    "SimArgs",
    "Tabular",
    "Workload",
    "WorkloadResult",
    "capture_vms",
    "register",
    "sim_options",
    "spec_args",
    "track_vm",
]


class Progress(Protocol):
    """A progress callback: ``progress(done, total, label)`` after each step of a run."""

    def __call__(self, done: int, total: int, label: str) -> None:
        """Report that ``done`` of ``total`` steps are finished; ``label`` names the step."""
        ...


class SimArgs(TypedDict, total=False):
    """The simulator's keyword arguments, the same for every workload (all optional).

    ``vm_type``, ``hooks``, ``tdx``, ``mirror``, ``folio``, ``costs``, ``seed``, ``levels`` and
    ``ad_bits`` (KVM's ``enable_ept_ad_bits``; False only on default and sw_protected VMs)
    are ``tdpmmu.VM``'s (``VmSpec.create`` coerces them); ``clock``, ``mmu_lock``,
    ``machine`` and ``tdx_module`` are ``demand_paging``'s virtual-time options; ``progress``
    is called after each phase of the run (the CLI draws a progress bar with it).
    """

    vm_type: str
    hooks: object
    tdx: Mapping[str, object] | None
    mirror: bool
    folio: str | int | None
    costs: CostModel | Mapping[str, float] | None
    seed: int
    levels: int
    ad_bits: bool
    clock: str | None
    mmu_lock: str
    machine: Machine | Mapping[str, Any] | None
    tdx_module: str
    progress: NotRequired[Progress | None]


#: ``SimArgs`` keys that describe the VM (``VmSpec.create``'s), the rest are run options.
_SPEC_KEYS = ("vm_type", "hooks", "tdx", "mirror", "folio", "costs", "seed", "levels", "ad_bits")


def spec_args(sim: SimArgs) -> dict[str, Any]:
    """The ``VmSpec.create`` arguments in ``sim`` (absent ones left to its defaults).

    Args:
        sim: a workload's simulator keyword arguments.

    Returns:
        dict[str, Any]: the VM-describing keys present in ``sim``. Never raises.
    """
    return {k: sim[k] for k in _SPEC_KEYS if k in sim}  # type: ignore[literal-required]


def sim_options(sim: SimArgs) -> VirtualOptions:
    """The run options (clock, ``mmu_lock``, machine, TDX module) in ``sim``, checked.

    Args:
        sim: a workload's simulator keyword arguments.

    Returns:
        VirtualOptions: the options (``clock`` None: virtual unless ``hooks`` is an object).

    Raises:
        ConfigError: a value out of range, naming it.
        TypeError: a value of the wrong type, or a key ``SimArgs`` does not have.
    """
    unknown = set(sim) - set(SimArgs.__annotations__)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    return virtual_options(
        clock=sim.get("clock"),
        hooks=sim.get("hooks"),
        mmu_lock=sim.get("mmu_lock", "shared"),
        machine=sim.get("machine"),
        tdx_module=sim.get("tdx_module", "1.5"),
    )


#: The VMs the workloads in the current context built, while ``capture_vms`` is active.
_CAPTURED: contextvars.ContextVar[list[VM] | None] = contextvars.ContextVar(
    "tdpmmu_captured_vms", default=None
)


@contextlib.contextmanager
def capture_vms() -> Iterator[list[VM]]:
    """Collect the VMs the workloads run inside the ``with`` block build (in order).

    A workload's result holds counters, not its VM; ``compare_workload`` uses this to keep the
    counters of a run that raised and to audit the VM's teardown after the run, without
    changing any workload's signature. A workload's VM is collected when its ``Clock`` is made
    (every workload makes one for its VM right after building it) or by ``track_vm``.

    Returns:
        Iterator[list[VM]]: ``with capture_vms() as vms:``; ``vms`` fills as VMs are built.
        Never raises.
    """
    vms: list[VM] = []
    token = _CAPTURED.set(vms)
    try:
        yield vms
    finally:
        _CAPTURED.reset(token)


def track_vm(vm: VM) -> VM:
    """Hand ``vm`` to the active ``capture_vms`` block, if any (once per VM).

    Args:
        vm: a workload's VM, just built.

    Returns:
        VM: ``vm``. Never raises.
    """
    vms = _CAPTURED.get()
    if vms is not None and not any(v is vm for v in vms):
        vms.append(vm)
    return vm


class Clock:
    """Both clocks of one phase of a workload: the VM's modeled time and host wall time.

    ``with clock.phase("Populating memory"):`` measures a host-side phase by the VM's modeled
    ledger (what the phase charged); vCPU phases run in parallel, so they report their own
    modeled time (the slowest vCPU's) through ``record``.
    """

    def __init__(self, vm: VM, progress: Progress | None = None, total: int = 0) -> None:
        self.vm = track_vm(vm)
        #: (label, modeled seconds, host wall seconds) per phase, in order.
        self.phases: list[tuple[str, float, float]] = []
        self._progress = progress
        self._total = total

    def modeled_ns(self) -> float:
        """The VM's modeled nanoseconds so far (its ledger)."""
        return float(self.vm.stats_dict()["modeled_ns"])

    def record(self, label: str, modeled_s: float, wall_s: float) -> float:
        """Add a phase measured elsewhere (a vCPU pass: the slowest vCPU's modeled time).

        Args:
            label: the phase's name, as the selftest prints it.
            modeled_s: its modeled seconds.
            wall_s: its host wall seconds.

        Returns:
            float: ``modeled_s``. Never raises (the progress callback's errors propagate).
        """
        self.phases.append((label, modeled_s, wall_s))
        if self._progress is not None:
            self._progress(len(self.phases), max(self._total, len(self.phases)), label)
        return modeled_s

    def phase(self, label: str) -> "_Phase":
        """A context manager timing a host-side phase by the ledger and the wall clock.

        Args:
            label: the phase's name, as the selftest prints it.

        Returns:
            _Phase: ``with clock.phase(label) as p:``; ``p.modeled_s`` holds the phase's modeled
            seconds (what the VM's ledger grew by) after the block. Never raises.
        """
        return _Phase(self, label)

    def seconds(self, label: str) -> float:
        """The modeled seconds of the phase named ``label`` (the last one of that name).

        Args:
            label: the phase's name.

        Returns:
            float: its modeled seconds.

        Raises:
            KeyError: no phase has that label.
        """
        for name, modeled_s, _ in reversed(self.phases):
            if name == label:
                return modeled_s
        raise KeyError(label)


class _Phase:
    def __init__(self, clock: Clock, label: str) -> None:
        self.clock, self.label = clock, label
        self.modeled_s = 0.0

    def __enter__(self) -> "_Phase":
        self._ns = self.clock.modeled_ns()
        self._wall = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.modeled_s = (self.clock.modeled_ns() - self._ns) / 1e9
            self.clock.record(self.label, self.modeled_s, time.perf_counter() - self._wall)


class Checks:
    """A workload's own correctness checks (the selftest's asserts), recorded, not raised.

    A failed check is a result about the model or the design under test (e.g. a hook design
    that leaves S-EPT tables behind), so the run still returns every figure; the result's
    ``ok`` says whether every check held and the CLI exits with status 1 when one failed.
    ``to_list()`` is what ``detail["checks"]`` holds: ``{"name", "ok", "detail"}`` records.
    """

    def __init__(self) -> None:
        self._items: list[dict[str, Any]] = []

    def add(self, name: str, ok: bool, detail: str = "") -> bool:
        """Record one check.

        Args:
            name: what was checked, as a sentence ("every page is mapped after the run").
            ok: whether it held.
            detail: what was seen (counts, the first bad page, ...); empty when nothing to add.

        Returns:
            bool: ``ok``. Never raises.
        """
        self._items.append({"name": name, "ok": bool(ok), "detail": str(detail)})
        return bool(ok)

    @property
    def ok(self) -> bool:
        """Whether every check recorded so far held (True when none was recorded)."""
        return all(c["ok"] for c in self._items)

    def failed(self) -> list[str]:
        """The names of the checks that failed, in order."""
        return [c["name"] for c in self._items if not c["ok"]]

    def to_list(self) -> list[dict[str, Any]]:
        """The records, in order (``detail["checks"]``). Never raises."""
        return [dict(c) for c in self._items]


#: Workloads whose results have a class of their own (read them with it, or with
#: ``tdpmmu.workloads.result_from_json``, which dispatches on the envelope's workload).
_OWN_RESULT_TYPES: dict[str, str] = {"demand_paging": "DemandPagingResult.from_json"}


class Tabular:
    """``row()`` and ``to_pandas()`` for a result with ``workload``, ``spec``, ``seed``,
    ``params``, ``options``, ``metrics``, ``modeled_ns`` and ``wall_s`` (``WorkloadResult``,
    ``DemandPagingResult``)."""

    __slots__ = ()
    workload: Any
    spec: Any
    seed: Any
    params: Any
    options: Any
    metrics: Any
    modeled_ns: Any
    wall_s: Any

    def row(self) -> dict[str, Any]:
        """One flat record: workload, VM type, design, seed, the parameters, the run options,
        the metrics, ``modeled_ns`` and ``wall_s`` (what ``to_pandas`` and sweeps tabulate).

        Returns:
            dict[str, Any]: JSON-safe scalars (nested parameters as JSON text). Never raises.
        """
        out: dict[str, Any] = {
            "workload": self.workload,
            "vm_type": self.spec.label,
            "hooks": self.spec.hooks,
            "vcpus": self.spec.vcpus,
            "seed": self.seed,
        }
        for k, v in {**self.params, **self.options.to_dict()}.items():
            if k not in out:
                out[k] = (
                    v
                    if isinstance(v, str | int | float | bool | None)
                    else json.dumps(json_safe(v))
                )
        out.update(self.metrics)
        out["modeled_ns"] = self.modeled_ns
        out["wall_s"] = self.wall_s
        return out

    def to_pandas(self) -> "pandas.DataFrame":
        """The result as a one-row ``pandas.DataFrame`` (``row()``); needs the ``pandas`` extra.

        Raises:
            ImportError: pandas is not installed (``pip install 'tdpmmu[pandas]'``).
        """
        import pandas

        return pandas.DataFrame([self.row()])


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class WorkloadResult(Tabular):
    """One run of a selftest-shaped workload.

    ``lines`` are the selftest's own output lines with the same labels and units, carrying
    **modeled** times (the CLI prints them under a "simulated" header); ``metrics`` are the
    same figures as numbers under snake_case names (``*_s`` seconds, ``*_pgs_per_s`` guest
    4 KiB pages per second), modeled unless the name starts with ``wall_``.
    """

    #: The registry name, e.g. ``"dirty_log_perf"``.
    workload: str
    #: The VM's full configuration.
    spec: VmSpec
    #: The workload's own parameters, as given and defaulted (JSON-safe).
    params: Mapping[str, Any]
    #: The run options (clock, mmu_lock, machine, TDX module).
    options: VirtualOptions
    #: The selftest's output lines (modeled times), without the simulated header.
    lines: tuple[str, ...]
    #: Flat figures (numbers only), e.g. ``{"populate_memory_time_s": 0.12, ...}``.
    metrics: Mapping[str, float]
    #: (label, modeled seconds, host wall seconds) of each phase, in order.
    phases: tuple[tuple[str, float, float], ...]
    #: Counters after the run (setup included).
    stats: Stats
    #: All modeled time of the run (setup, host work and every vCPU) by CostModel field.
    cost_breakdown: Mapping[str, float]
    #: Host wall-clock seconds of the whole run (VM creation included).
    wall_s: float
    #: Anything else the workload reports (JSON-safe): checks, per-vCPU records, virtual-time
    #: summaries.
    detail: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def modeled_ns(self) -> float:
        """All modeled time of the run (setup, host work and every vCPU, summed), ns."""
        return float(self.stats["modeled_ns"])

    @property
    def ok(self) -> bool:
        """Whether every check of the run held (``detail["checks"]``, ``Checks`` records)."""
        return all(bool(c.get("ok")) for c in self.detail.get("checks", ()))

    @property
    def seed(self) -> int:
        """The VM's seed (``spec.seed``)."""
        return self.spec.seed

    def envelope(self) -> Envelope:
        """The run as a ``tdpmmu.results.Envelope`` (workload name, full configuration, seed,
        both clocks, cost breakdown, and every field of this result). Never raises."""
        return Envelope(
            workload=self.workload,
            config={
                "vm": self.spec.to_dict(),
                "workload": {**self.params, "options": self.options.to_dict()},
            },
            seed=self.seed,
            modeled_ns=self.modeled_ns,
            cost_breakdown=dict(self.cost_breakdown),
            wall_s=self.wall_s,
            result={
                "lines": list(self.lines),
                "metrics": dict(self.metrics),
                "phases": [list(p) for p in self.phases],
                "stats": self.stats.to_dict(),
                "detail": dict(self.detail),
            },
        )

    @classmethod
    def from_envelope(cls, env: Envelope) -> "WorkloadResult":
        """The result an envelope of a registered workload describes.

        Args:
            env: e.g. ``Envelope.from_json(text)``.

        Returns:
            WorkloadResult: equal to the one the envelope was made from.

        Raises:
            ConfigError: ``env`` is not a ``WorkloadResult``'s (naming ``envelope``).
        """
        r = env.result
        if "metrics" not in r or "lines" not in r or env.workload in _OWN_RESULT_TYPES:
            hint = _OWN_RESULT_TYPES.get(env.workload, "")
            raise ConfigError(
                f"envelope: a {env.workload} result is not a WorkloadResult"
                + (f"; read it with {hint} (or tdpmmu.workloads.result_from_json)" if hint else "")
            )
        params = dict(env.config["workload"])
        options = VirtualOptions.from_dict(params.pop("options", {"clock": "host"}))
        return cls(
            workload=env.workload,
            spec=VmSpec.from_dict(env.config["vm"]),
            params=params,
            options=options,
            lines=tuple(str(x) for x in r["lines"]),
            metrics={str(k): finite_or_inf(v) for k, v in r["metrics"].items()},
            phases=tuple((str(a), float(b), float(c)) for a, b, c in r["phases"]),
            stats=Stats(r["stats"]),
            cost_breakdown=dict(env.cost_breakdown),
            wall_s=env.wall_s,
            detail=dict(r.get("detail", {})),
        )

    def to_dict(self) -> dict[str, Any]:
        """``envelope().to_dict()``: the result as plain JSON types. Never raises."""
        return self.envelope().to_dict()

    def to_json(self, **kwargs: Any) -> str:
        """The result as one JSON document (``**kwargs`` go to ``json.dumps``). Never raises."""
        return self.envelope().to_json(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> "WorkloadResult":
        """The result a ``to_json`` text describes.

        Raises:
            ConfigError: not a tdpmmu envelope, or not a ``WorkloadResult``'s.
            json.JSONDecodeError: ``text`` is not JSON.
        """
        return cls.from_envelope(Envelope.from_json(text))


def finish(
    workload: str,
    vm: VM,
    spec: VmSpec,
    *,
    params: Mapping[str, Any],
    options: VirtualOptions,
    lines: list[str],
    metrics: Mapping[str, float],
    clock: Clock,
    run_start: float,
    detail: Mapping[str, Any] | None = None,
    breakdown_extra: list[Mapping[str, float]] | None = None,
    vms: Sequence[VM] | None = None,
) -> WorkloadResult:
    """Assemble a ``WorkloadResult`` from a finished run on ``vm`` (the workloads' last step).

    ``vms``: every VM the run used when it built several (``memslot_perf`` builds one per run):
    their counters and cost breakdowns are summed (``vm`` is then one of them).
    ``breakdown_extra`` adds modeled time no VM's ledger holds (e.g. the guest's own access
    time on the virtual clock, by ``CostModel`` field or wait kind): to the breakdown and to
    ``modeled_ns`` alike, so the two still agree.
    """
    used = list(vms) if vms else [vm]
    totals: dict[str, int | float] = {}
    for v in used:
        for k, x in v.stats_dict().items():
            totals[k] = totals.get(k, 0) + x
    extra = list(breakdown_extra or [])
    breakdown = sum_breakdowns([dict(v.cost_breakdown()) for v in used] + extra)
    totals["modeled_ns"] = float(totals["modeled_ns"]) + sum(sum(e.values()) for e in extra)
    return WorkloadResult(
        workload=workload,
        spec=spec,
        params=dict(json_safe(params)),
        options=options,
        lines=tuple(lines),
        metrics={k: float(v) for k, v in metrics.items()},
        phases=tuple(clock.phases),
        stats=Stats(totals),
        cost_breakdown=breakdown,
        wall_s=time.perf_counter() - run_start,
        detail=dict(json_safe(detail or {})),
    )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Workload:
    """A registered workload: how the CLI and sweeps find, parse and run it."""

    #: Registry and Python name, e.g. ``"dirty_log_perf"``.
    name: str
    #: The CLI subcommand, e.g. ``"dirty-log-perf"``.
    command: str
    #: The KVM selftest it follows, e.g. ``"dirty_log_perf_test"`` (or ``"tdpmmu"``).
    selftest: str
    #: One line for ``--help``.
    summary: str
    #: ``run(**params, **sim) -> result`` (the Python API function).
    run: Callable[..., Any]
    #: VM types it runs on.
    vm_types: tuple[str, ...]
    #: Adds the selftest's own flags (letter for letter, plus long names) to a subparser.
    add_arguments: Callable[["argparse.ArgumentParser"], None]
    #: The run's workload keyword arguments from parsed flags.
    from_args: Callable[["argparse.Namespace"], dict[str, Any]]


#: Every workload by name, in CLI order (``register`` adds to it when a module is imported).
WORKLOADS: dict[str, Workload] = {}


def register(workload: Workload) -> Workload:
    """Add ``workload`` to ``WORKLOADS`` (its name must be new); returns it.

    Raises:
        ValueError: the name is taken.
    """
    if workload.name in WORKLOADS:
        raise ValueError(f"workload {workload.name!r} is registered twice")
    WORKLOADS[workload.name] = workload
    return workload
