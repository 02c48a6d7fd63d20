"""Run one workload on every valid (VM type x hook design) pair and compare the results.

This is the question the hook-design argument of the seed thread is about: with the same guest
doing the same thing, what does each design cost (hook calls, SEAMCALLs, RMP instructions,
modeled time, page-table memory), and does it stay correct? ``compare`` returns one typed
``CompareRow`` per pair (and per TDX option value swept); ``python -m tdpmmu compare`` prints
them as tables, JSON or CSV.

The pairs are the engine's VM-type x design matrix (``tdpmmu.config.VARIANTS``). Rows of
variants that take TDX options (tdx, sw_protected+mirror) are run once per combination of the
swept TDX option values (default: every ``interface``, so four-hook and two-hook both show).

The workload, on every row (architecture §3 VM types, §4 hook designs):

1. **setup**: build the VM (``VmSpec``: ``vcpus x bytes_per_vcpu`` of test memory plus a small
   initial image after it, rounded up to the backing page) and launch it as a VMM would
   (``tdpmmu.vmspec.launch``): memory attributes private, the image populated
   (``KVM_PRE_FAULT_MEMORY``; on a TD ``TDH.MEM.PAGE.ADD``), a TD finalized.
2. **demand-paging** (workloads.md §A.2): every vCPU writes each page of its slice once, in
   order, as real threads (``VM.run_memstress``). The memory of a confidential VM starts
   all-private, so those are private faults; on a default VM they are ordinary faults.
3. **conversions** (§A.6, ``private_mem_conversions_test``): chunks spread over the test
   region go private -> shared -> private, with userspace setting the attributes and punching
   the guest_memfd hole, and the guest writing each page after each conversion
   (``tdpmmu.workloads.private_mem_conversions``). A default VM has no private memory: the
   phase does not apply to it.
4. **teardown** (``VM.destroy``, KVM's order): where the designs differ most, because nothing
   there is a fault.

Defaults are chosen so design differences show: 2M backing and 2M guest_memfd folios (SNP's
``gmem`` design then maps 2M leaves from 2M RMP entries where ``private`` maps 4K), and both TDX
hook interfaces. Default conversion counts are scaled down to fit a small test region (and the
result says so).

Correctness ("check"): ``VM.check()`` after the workload, and after teardown nothing may be left
behind (KVM page tables, S-EPT or software external tables, leaked external tables). A design
that breaks (``InvariantError``, ``VmBugged``, a leak, a fault that does not map its page) is a
*result*: its row says ``NO`` with the reason and keeps the counts up to the failure.

Two clocks, never mixed: **modeled** time is what the cost model charges for the simulated
system; **host wall** time is how long this simulator took on this machine.
"""

import csv
import dataclasses
import io
import itertools
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Literal, cast

from tdpmmu import __version__, coerce, config, render
from tdpmmu._core import ConfigError, InvariantError, OutOfMemory, VmBugged
from tdpmmu.costs import CostModel
from tdpmmu.results import Envelope, json_safe, rows_to_frame, sum_breakdowns
from tdpmmu.sizes import format_size
from tdpmmu.stats import Stats
from tdpmmu.vm import VM
from tdpmmu.vmspec import VmSpec, launch
from tdpmmu.vtime import VirtualOptions
from tdpmmu.workloads import PAGE_SIZE, private_mem_conversions
from tdpmmu.workloads.base import capture_vms

if TYPE_CHECKING:
    import pandas

__all__ = [
    "DEFAULTS",
    "DESIGNS",
    "HOOK_COUNTERS",
    "PAIRS",
    "SUMMARY_FIELDS",
    "VM_TYPES",
    "WORKLOADS",
    "WORKLOAD_SUMMARY_FIELDS",
    "CompareParams",
    "CompareResult",
    "CompareRow",
    "PhaseResult",
    "WorkloadComparison",
    "WorkloadRow",
    "compare",
    "compare_workload",
    "external_tables_name",
    "fit_conversions",
    "format_text",
    "format_workload_text",
    "run_pair",
    "select_pairs",
]

Workload = Literal["demand-paging", "conversions", "both"]
#: The ``workload`` values ``compare`` takes: one phase, the other, or both in turn.
WORKLOADS: Final[tuple[Workload, ...]] = ("demand-paging", "conversions", "both")

#: VM type labels of the comparison and how each is built: (engine vm_type, mirror=).
VM_TYPES: Final[Mapping[str, tuple[str, bool]]] = {
    v.label: (v.vm_type, v.mirror) for v in config.VARIANTS
}

#: Hook design names (architecture §4), as the engine defines them.
DESIGNS: Final[tuple[str, ...]] = config.DESIGNS

#: Every (VM type label, hook design) the engine accepts, in the engine's order, the upstream
#: (default) design first for each type.
PAIRS: Final[tuple[tuple[str, str], ...]] = tuple(
    (v.label, d) for v in config.VARIANTS for d in v.designs
)

#: The four external-table hooks (KVM's names); their counters sum to "hook calls".
HOOK_COUNTERS: Final[tuple[str, ...]] = (
    "link_external_spt",
    "set_external_spte",
    "remove_external_spte",
    "free_external_spt",
)

#: Bytes of one RMP entry as the model stores it (one u64 per guest_memfd 4 KiB page).
RMP_ENTRY_BYTES: Final[int] = 8

_TABLE_BYTES = 4096

#: Default workload parameters. ``conversions`` and ``chunk_pages`` are scaled down when the
#: test region is too small for them (the chunks then cover at most half of it).
DEFAULTS: Final[Mapping[str, Any]] = {
    "workload": "both",
    "vcpus": 4,
    "bytes_per_vcpu": "1G",
    "conversions": 512,
    "chunk_pages": 16,
    "image_pages": 256,
    "backing": "2M",
    "folio": "2M",
    # Every hook interface, so the table shows what two-hook changes against four-hook.
    "tdx": {"interface": config.TDX_OPTION_CHOICES["interface"]},
}

#: Columns of ``CompareRow.summary`` (and of the CSV output), in order.
SUMMARY_FIELDS: Final[tuple[str, ...]] = (
    "vm_type",
    "design",
    "options",
    "faults",
    "retries",
    "huge_leaves",
    "hook_calls",
    *HOOK_COUNTERS,
    "seamcalls",
    "rmpupdate",
    "psmash",
    "pvalidate",
    "pages_touched",
    "modeled_ns_per_fault",
    "modeled_ns_per_page",
    "fault_modeled_ns",
    "modeled_ns",
    "page_table_peak_bytes",
    "external_table_bytes",
    "rmp_bytes",
    "memory_bytes",
    "wall_s",
    "check_ok",
    "check_error",
)


def external_tables_name(vm_type: str) -> str:
    """What the mirror root's external tables are on this VM type: a TD's are the TDX
    module's S-EPT; sw_protected+mirror keeps a software tree (no TDX module).

    Args:
        vm_type: an engine VM type (``"tdx"``, ``"sw_protected"``, ...).

    Returns:
        str: ``"S-EPT tables"`` for tdx, ``"external tables"`` otherwise. Never raises.
    """
    return "S-EPT tables" if vm_type == "tdx" else "external tables"


def _seamcalls(stats: Mapping[str, int | float]) -> int:
    # Host SEAMCALLs only: TDG.* (the guest's TDCALLs, e.g. TDG.MEM.PAGE.ACCEPT) are not.
    return int(sum(v for k, v in stats.items() if k.startswith("TDH.")))


def _option_text(value: object) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CompareParams:
    """The workload every row runs (validated and normalized by ``compare``)."""

    workload: Workload
    vcpus: int
    bytes_per_vcpu: int
    #: Conversion chunks (0 when the workload has no conversion phase).
    conversions: int
    chunk_pages: int
    #: Initial-image pages populated before the run (TD: PAGE.ADD before finalize).
    image_pages: int
    levels: int
    seed: int
    teardown: bool
    costs: CostModel
    #: Host page size behind guest memory (bytes).
    backing: int
    #: guest_memfd folio size (bytes).
    folio: int
    #: TDX option -> the values swept (one value: fixed), for the rows that take TDX options.
    tdx: Mapping[str, tuple[coerce.TdxValue, ...]]
    #: Defaults that were scaled to fit the test region, said in words.
    adjusted: tuple[str, ...] = ()
    #: How the demand-paging phase runs its vCPUs: ``"virtual"`` (simulated in modeled-time
    #: order, so contention shows in the modeled time) or ``"host"`` (real threads).
    clock: str = "virtual"
    #: Virtual time only: faults take mmu_lock ``"shared"`` (read) or ``"exclusive"`` (write).
    mmu_lock: str = "shared"

    @property
    def test_pages(self) -> int:
        """The test region in 4 KiB pages: ``vcpus x bytes_per_vcpu / 4096``."""
        return self.vcpus * self.bytes_per_vcpu // PAGE_SIZE

    @property
    def memory(self) -> int:
        """Guest memory: the test region and the image, rounded up to the backing page."""
        raw = self.vcpus * self.bytes_per_vcpu + self.image_pages * PAGE_SIZE
        return -(-raw // self.backing) * self.backing

    @property
    def swept(self) -> tuple[str, ...]:
        """TDX options with more than one value (they label the rows)."""
        return tuple(k for k, v in self.tdx.items() if len(v) > 1)

    def tdx_combinations(self) -> list[dict[str, coerce.TdxValue]]:
        """Every combination of the TDX option values, in option order."""
        keys = list(self.tdx)
        return [
            dict(zip(keys, values, strict=True))
            for values in itertools.product(*(self.tdx[k] for k in keys))
        ]

    def spec(self, label: str, design: str, tdx: Mapping[str, coerce.TdxValue]) -> VmSpec:
        """The VM configuration of one row of this workload.

        Args:
            label: the VM type label, a key of ``VM_TYPES`` (``"sw_protected+mirror"`` is
                sw_protected with ``mirror=True``).
            design: the hook design, one the label's variant takes.
            tdx: the row's TDX options (empty for variants without them).

        Returns:
            VmSpec: memory = test region + image rounded to the backing page, and this
            workload's vCPUs, levels, backing, folio (none on a default VM), costs and seed.

        Raises:
            KeyError: ``label`` is not a key of ``VM_TYPES``.
            ConfigError: ``design`` or ``tdx`` is not valid for the variant.
        """
        vm_type, mirror = VM_TYPES[label]
        return VmSpec.create(
            vm_type=vm_type,
            memory=self.memory,
            vcpus=self.vcpus,
            levels=self.levels,
            backing=self.backing,
            hooks=design,
            costs=self.costs,
            seed=self.seed,
            tdx=dict(tdx) or None,
            mirror=mirror,
            # guest_memfd folios only exist on VMs with private memory.
            folio=self.folio if vm_type != "default" else None,
        )

    def to_dict(self) -> dict[str, Any]:
        """The parameters as plain JSON types (plus ``memory``); never raises."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["costs"] = self.costs.to_dict()
        out["tdx"] = {k: list(v) for k, v in self.tdx.items()}
        out["adjusted"] = list(self.adjusted)
        out["memory"] = self.memory
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CompareParams":
        """The parameters a ``to_dict()`` mapping describes.

        Args:
            data: the mapping (extra keys such as ``memory`` are ignored).

        Returns:
            CompareParams: the parameters.

        Raises:
            KeyError: ``costs`` or ``tdx`` is missing.
            TypeError: another field is missing.
            ConfigError: a bad cost value.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in data.items() if k in names}
        fields["costs"] = coerce.cost_model(data["costs"])
        fields["tdx"] = {k: tuple(v) for k, v in data["tdx"].items()}
        fields["adjusted"] = tuple(data.get("adjusted", ()))
        return cls(**fields)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PhaseResult:
    """One phase of a row: its counters (deltas) and both clocks."""

    name: str
    #: Host wall-clock seconds the simulator spent in the phase.
    wall_s: float
    #: All modeled time of the phase.
    modeled_ns: float
    #: Modeled time of the phase's faults only (the numerator of "modeled per fault").
    fault_modeled_ns: float
    #: Guest page writes the phase made (each needs a fault on a 4K mapping).
    pages_touched: int
    #: Counter deltas over the phase (gauges such as ``pages_4k`` are deltas too).
    stats: Stats

    def to_dict(self) -> dict[str, Any]:
        """The phase as plain JSON types; never raises."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["stats"] = self.stats.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PhaseResult":
        """The phase a ``to_dict()`` mapping describes.

        Args:
            data: the mapping.

        Returns:
            PhaseResult: the phase.

        Raises:
            KeyError: a field is missing.
        """
        return cls(
            name=str(data["name"]),
            wall_s=float(data["wall_s"]),
            modeled_ns=float(data["modeled_ns"]),
            fault_modeled_ns=float(data["fault_modeled_ns"]),
            pages_touched=int(data["pages_touched"]),
            stats=Stats(data["stats"]),
        )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CompareRow:
    """One (VM type, hook design, TDX options) row after the workload."""

    #: VM type label (a key of ``VM_TYPES``: "sw_protected+mirror" is VM(mirror=True)).
    vm_type: str
    design: str
    #: The VM's full configuration (TDX options included).
    spec: VmSpec
    #: Faults the guest took (KVM's ``pf_taken``), every phase.
    faults: int
    #: Calls of the four external-table hooks (link/set/remove/free).
    hook_calls: int
    #: Host SEAMCALLs (every ``TDH.*`` leaf; the guest's ``TDG.*`` calls are not counted).
    seamcalls: int
    rmpupdate: int
    psmash: int
    pvalidate: int
    #: The most 2M/1G leaves mapped at any phase end.
    huge_leaves: int
    #: Guest page writes of the workload (demand paging and conversions).
    pages_touched: int
    #: Modeled time of all faults (exit, handling, page allocation, hooks, SEAMCALLs, ...).
    fault_modeled_ns: float
    #: All modeled time: every phase, host operations and conversion requests included,
    #: summed over vCPUs.
    modeled_ns: float
    #: ``modeled_ns`` by CostModel field.
    cost_breakdown: Mapping[str, float]
    #: KVM page tables at their peak (``page_table_peak_bytes``; mirror roots included).
    page_table_peak_bytes: int
    #: S-EPT (or software external) tables, the most held at any phase end, x 4 KiB.
    external_table_bytes: int
    #: SNP: RMP entries of the guest_memfd pages (8 bytes each as modeled; the hardware RMP
    #: has 16-byte entries for all of host memory whatever the design). 0 on other types.
    rmp_bytes: int
    #: Host wall-clock seconds for the whole row (VM creation through teardown).
    wall_s: float
    #: True when ``VM.check()`` held after the workload and teardown left nothing behind.
    check_ok: bool
    #: Why not, when ``check_ok`` is False.
    check_error: str | None
    #: Phases that ran, in order; a failed phase is the last.
    phases: tuple[PhaseResult, ...]
    #: Things a reader should know about this row (e.g. a phase that does not apply).
    notes: tuple[str, ...]
    #: Final counters (after teardown when it ran).
    stats: Stats

    @property
    def tdx(self) -> Mapping[str, coerce.TdxValue]:
        """The row's TDX options (``spec.tdx``; empty on variants without them)."""
        return self.spec.tdx

    @property
    def options(self) -> str:
        """The row's TDX options as ``key=value,...`` ("" when it has none)."""
        return ",".join(f"{k}={_option_text(v)}" for k, v in self.tdx.items())

    @property
    def retries(self) -> int:
        """Faults that ended in RETRY (counted in ``faults``): racing vCPUs, busy SEAMCALLs."""
        return int(self.stats["pf_retry"])

    def hook(self, name: str) -> int:
        """Calls of one external-table hook over the whole row.

        Args:
            name: a hook name of ``HOOK_COUNTERS`` (any counter name works).

        Returns:
            int: the count from the final ``stats``.

        Raises:
            KeyError: ``name`` is not a counter.
        """
        return int(self.stats[name])

    @property
    def modeled_ns_per_fault(self) -> float | None:
        """Modeled time of the faults divided by their number (None without faults)."""
        return self.fault_modeled_ns / self.faults if self.faults else None

    @property
    def modeled_ns_per_page(self) -> float | None:
        """Modeled time of the faults per guest page written (comparable across rows whose
        faults map different page sizes)."""
        return self.fault_modeled_ns / self.pages_touched if self.pages_touched else None

    @property
    def memory_bytes(self) -> int:
        """Page-table memory counted for the design: KVM tables + external tables + RMP."""
        return self.page_table_peak_bytes + self.external_table_bytes + self.rmp_bytes

    @property
    def check(self) -> str:
        """The check column as text: "yes" or "NO (reason)"."""
        return "yes" if self.check_ok else f"NO ({self.check_error})"

    def phase(self, name: str) -> PhaseResult | None:
        """The phase called ``name`` ("setup", "demand-paging", "conversions", "teardown").

        Args:
            name: the phase name (a failed phase matches without its " (failed)" suffix).

        Returns:
            PhaseResult | None: the phase, or None when it did not run. Never raises.
        """
        for p in self.phases:
            if p.name.removesuffix(" (failed)") == name:
                return p
        return None

    def summary(self) -> dict[str, Any]:
        """The flat per-row fields (the CSV columns, ``SUMMARY_FIELDS``)."""
        out: dict[str, Any] = {}
        for name in SUMMARY_FIELDS:
            out[name] = self.hook(name) if name in HOOK_COUNTERS else getattr(self, name)
        return out

    def to_dict(self) -> dict[str, Any]:
        """The row as plain JSON types: ``summary()`` plus spec, cost breakdown, notes,
        phases and final stats; never raises."""
        out = self.summary()
        out["spec"] = self.spec.to_dict()
        out["cost_breakdown"] = dict(self.cost_breakdown)
        out["notes"] = list(self.notes)
        out["phases"] = [p.to_dict() for p in self.phases]
        out["stats"] = self.stats.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CompareRow":
        """The row a ``to_dict()`` mapping describes.

        Args:
            data: the mapping (the derived summary columns in it are ignored).

        Returns:
            CompareRow: the row.

        Raises:
            KeyError: ``spec``, ``cost_breakdown``, ``notes``, ``phases`` or ``stats`` is
                missing.
            TypeError: another field is missing.
            ConfigError: the spec is not valid.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in data.items() if k in names}
        fields["spec"] = VmSpec.from_dict(data["spec"])
        fields["cost_breakdown"] = {k: float(v) for k, v in data["cost_breakdown"].items()}
        fields["notes"] = tuple(data["notes"])
        fields["phases"] = tuple(PhaseResult.from_dict(p) for p in data["phases"])
        fields["stats"] = Stats(data["stats"])
        return cls(**fields)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CompareResult:
    """What ``compare`` returns: the workload's parameters and one ``CompareRow`` per pair
    (and per swept TDX option value), in the engine's pair order."""

    #: The workload every row ran.
    params: CompareParams
    #: One row per (VM type, hook design, TDX options).
    rows: tuple[CompareRow, ...]
    #: Host wall-clock seconds of the whole comparison.
    wall_s: float = 0.0

    def envelope(self) -> Envelope:
        """The result envelope: modeled time and its breakdown summed over the rows (each
        row keeps its own in ``result["rows"]``)."""
        return Envelope(
            workload="compare",
            config={
                "workload": self.params.to_dict(),
                "vms": [r.spec.to_dict() for r in self.rows],
            },
            seed=self.params.seed,
            modeled_ns=sum(r.modeled_ns for r in self.rows),
            cost_breakdown=sum_breakdowns([r.cost_breakdown for r in self.rows]),
            wall_s=self.wall_s,
            result={"rows": [r.to_dict() for r in self.rows]},
        )

    @classmethod
    def from_envelope(cls, env: Envelope) -> "CompareResult":
        """The result an envelope of a comparison describes.

        Args:
            env: an envelope with ``workload == "compare"``.

        Returns:
            CompareResult: the result.

        Raises:
            ConfigError: ``env`` holds another workload's result (naming ``envelope``).
            KeyError: a field is missing.
        """
        if env.workload != "compare":
            raise ConfigError(f"envelope: a {env.workload} result, not compare")
        return cls(
            params=CompareParams.from_dict(env.config["workload"]),
            rows=tuple(CompareRow.from_dict(r) for r in env.result["rows"]),
            wall_s=env.wall_s,
        )

    def to_dict(self) -> dict[str, Any]:
        """``envelope().to_dict()``: the whole comparison as plain JSON types."""
        return self.envelope().to_dict()

    def to_json(self, **kwargs: Any) -> str:
        """The whole comparison as one JSON document (its envelope).

        Args:
            **kwargs: passed to ``json.dumps`` (e.g. ``indent=2``).

        Returns:
            str: the JSON text; ``from_json`` reads it back.
        """
        return self.envelope().to_json(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> "CompareResult":
        """The result a ``to_json`` text describes.

        Args:
            text: JSON as ``to_json`` wrote it.

        Returns:
            CompareResult: the result.

        Raises:
            ConfigError: not a tdpmmu envelope, another schema, or not a compare result.
            json.JSONDecodeError: ``text`` is not JSON.
        """
        return cls.from_envelope(Envelope.from_json(text))

    def to_pandas(self) -> "pandas.DataFrame":
        """One row per (VM type, design) pair with the ``CompareRow.summary`` columns.

        Returns:
            pandas.DataFrame: the same columns as ``to_csv`` (numbers as numbers).

        Raises:
            ImportError: pandas is not installed (``pip install 'tdpmmu[pandas]'``).
        """
        return rows_to_frame([row.summary() for row in self.rows])

    def to_csv(self) -> str:
        """One line per row with the ``CompareRow.summary`` columns (raw numbers)."""
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS, lineterminator="\n")
        w.writeheader()
        for row in self.rows:
            w.writerow({k: "" if v is None else v for k, v in row.summary().items()})
        return buf.getvalue()


def _pick(names: Iterable[str] | None, allowed: Sequence[str], what: str) -> set[str] | None:
    if names is None:
        return None
    picked = {n.strip() for n in names if n.strip()}
    unknown = sorted(picked - set(allowed))
    if unknown:
        raise ConfigError(
            f"{what}: unknown {', '.join(map(repr, unknown))}; allowed: " + ", ".join(allowed)
        )
    return picked


def select_pairs(
    types: Iterable[str] | None = None, designs: Iterable[str] | None = None
) -> tuple[tuple[str, str], ...]:
    """The pairs of ``PAIRS`` that pass the filters. A type filter matches a label exactly or by
    its engine type: "sw_protected" selects both sw_protected rows, "sw_protected+mirror" one.

    Args:
        types: VM type labels or engine types to keep (names, or text with commas), or None
            for all.
        designs: design names to keep, or None for all.

    Returns:
        tuple[tuple[str, str], ...]: ``(label, design)`` pairs in ``PAIRS`` order.

    Raises:
        ConfigError: an unknown type or design (naming ``types`` or ``designs``), or filters
            that leave no pair.
    """
    type_names = sorted({*VM_TYPES, *config.VM_TYPES})
    t_sel = _pick(types, type_names, "types")
    d_sel = _pick(designs, DESIGNS, "designs")
    out = tuple(
        (label, design)
        for label, design in PAIRS
        if (t_sel is None or label in t_sel or VM_TYPES[label][0] in t_sel)
        and (d_sel is None or design in d_sel)
    )
    if not out:
        raise ConfigError(
            "types/designs: the filters leave no valid pair; valid pairs: "
            + ", ".join(f"{t}/{d}" for t, d in PAIRS)
        )
    return out


class _Run:
    """Runs the phases of one row on one VM, recording each phase's deltas."""

    def __init__(self, spec: VmSpec) -> None:
        self.start = time.perf_counter()
        self.vm = spec.build()
        self.phases: list[PhaseResult] = []
        self.external_tables = 0
        self.huge_leaves = 0
        self.name = "setup"
        self.before = self.vm.stats

    def begin(self, name: str) -> None:
        self.name = name
        self.before = self.vm.stats
        self.start = time.perf_counter()

    def end(self, fault_ns: float = 0.0, pages: int = 0, failed: bool = False) -> None:
        wall = time.perf_counter() - self.start
        after = self.vm.stats
        delta = after - self.before
        self.external_tables = max(self.external_tables, int(after["sept_tables"]))
        self.huge_leaves = max(self.huge_leaves, int(after["pages_2m"] + after["pages_1g"]))
        self.phases.append(
            PhaseResult(
                name=f"{self.name} (failed)" if failed else self.name,
                wall_s=wall,
                modeled_ns=float(delta["modeled_ns"]),
                fault_modeled_ns=fault_ns,
                pages_touched=pages,
                stats=delta,
            )
        )


def _leftovers(stats: Stats, vm_type: str) -> list[str]:
    tables = external_tables_name(vm_type)
    return [
        f"{n:,} {what}"
        for n, what in (
            (int(stats["sept_tables"]), f"{tables} never freed"),
            (int(stats["external_spt_leaked"]), f"{tables} leaked"),
            (int(stats["page_table_bytes"]) // _TABLE_BYTES, "KVM page tables left"),
        )
        if n
    ]


def _check_error(vm: VM) -> str | None:
    """``VM.check()`` after a workload: None when it holds, else ``"check: <why>"``."""
    try:
        vm.check()
    except InvariantError as e:
        return f"check: {e}"
    return None


def _teardown_error(vm: VM, vm_type: str) -> str | None:
    """The teardown audit: ``VM.destroy()`` (KVM's order; skipped when the run already
    destroyed the VM), then whatever it left behind (KVM page tables, S-EPT or software external
    tables never freed or leaked): None when nothing, else ``"teardown: <what>"``."""
    if not vm.destroyed:
        vm.destroy()
    leftovers = _leftovers(vm.stats, vm_type)
    return "teardown: " + ", ".join(leftovers) if leftovers else None


def run_pair(
    label: str,
    design: str,
    params: CompareParams,
    tdx: Mapping[str, coerce.TdxValue] | None = None,
) -> CompareRow:
    """Run the workload of ``params`` on one pair (with ``tdx`` options on variants that take
    them); the engine's verdict becomes the row's.

    A design that breaks during the workload (``InvariantError``, ``VmBugged``,
    ``OutOfMemory``, a leak, a fault that does not map its page) is the row's result
    (``check_ok`` False with the reason), not an exception.

    Args:
        label: the VM type label, a key of ``VM_TYPES``.
        design: the hook design; ``(label, design)`` must be one of ``PAIRS``.
        params: the workload (``compare`` builds it).
        tdx: the row's TDX options (None or empty for variants without them).

    Returns:
        CompareRow: the row.

    Raises:
        ConfigError: ``(label, design)`` is not a valid pair, or the VM cannot be built.
    """
    if (label, design) not in PAIRS:
        raise ConfigError(
            f"{label}/{design} is not a valid pair; valid: "
            + ", ".join(f"{t}/{d}" for t, d in PAIRS)
        )
    spec = params.spec(label, design, tdx or {})
    row_start = time.perf_counter()
    run = _Run(spec)
    vm = run.vm
    notes: list[str] = []
    error: str | None = None
    test_pages = params.test_pages
    pages_per_vcpu = params.bytes_per_vcpu // PAGE_SIZE
    dp = params.workload in ("demand-paging", "both")
    conv = params.workload in ("conversions", "both")
    try:
        # 1. setup: as a VMM would; the initial image sits after the test region.
        launch(vm, image_gfn=test_pages, image_pages=params.image_pages)
        run.end()

        # 2. demand paging: the selftest's guest, vCPUs simulated in virtual time (or real
        # threads with clock="host").
        if dp:
            run.begin("demand-paging")
            margs = (
                params.vcpus,
                pages_per_vcpu,
                0,
                False,
                False,
                100,
                params.seed,
                True if spec.confidential else None,
            )
            if params.clock == "virtual":
                rec = vm.run_virtual(*margs, mmu_lock=params.mmu_lock)
                run.end(
                    fault_ns=sum(float(v["modeled_ns"]) for v in rec["vcpus"]),
                    pages=int(sum(v["accesses"] for v in rec["vcpus"])),
                )
            else:
                per_vcpu = vm.run_memstress(*margs)
                run.end(
                    fault_ns=sum(float(d["modeled_ns"]) for d in per_vcpu),
                    pages=int(sum(d["pages"] for d in per_vcpu)),
                )

        # 3. conversions (confidential VMs only).
        if conv and not spec.confidential:
            notes.append("conversions: not applicable, a default VM has no private memory")
        elif conv:
            run.begin("conversions")
            res = private_mem_conversions(
                vm,
                params.conversions,
                params.chunk_pages,
                region_pages=test_pages,
                touch_first=not dp,
            )
            touches = 2 if dp else 3
            run.end(fault_ns=res.fault_modeled_ns, pages=touches * res.chunks * res.chunk_pages)
            if res.unexpected:
                bad = ", ".join(f"{n} x{c}" for n, c in sorted(res.unexpected.items()))
                error = f"conversions: unexpected results {bad}"

        # 4. correctness after the workload, then teardown and what it left behind.
        run.name = "check"
        error = error or _check_error(vm)
        if params.teardown:
            run.begin("teardown")
            left = _teardown_error(vm, spec.vm_type)
            run.end()
            error = error or left
    except (VmBugged, InvariantError, OutOfMemory) as e:
        # The design broke mid-run: that is the row's result, with the counts up to here.
        error = f"{run.name}: {type(e).__name__}: {e}"
        run.end(failed=True)
    wall_s = time.perf_counter() - row_start
    stats = vm.stats
    rmp_bytes = RMP_ENTRY_BYTES * (params.memory // PAGE_SIZE) if spec.vm_type == "snp" else 0
    return CompareRow(
        vm_type=label,
        design=design,
        spec=spec,
        faults=int(stats["pf_taken"]),
        hook_calls=int(sum(stats[k] for k in HOOK_COUNTERS)),
        seamcalls=_seamcalls(stats),
        rmpupdate=int(stats["rmpupdate"]),
        psmash=int(stats["psmash"]),
        pvalidate=int(stats["pvalidate"]),
        huge_leaves=run.huge_leaves,
        pages_touched=sum(p.pages_touched for p in run.phases),
        fault_modeled_ns=sum(p.fault_modeled_ns for p in run.phases),
        modeled_ns=float(stats["modeled_ns"]),
        cost_breakdown=dict(vm.cost_breakdown()),
        page_table_peak_bytes=int(stats["page_table_peak_bytes"]),
        external_table_bytes=run.external_tables * _TABLE_BYTES,
        rmp_bytes=rmp_bytes,
        wall_s=wall_s,
        check_ok=error is None,
        check_error=error,
        phases=tuple(run.phases),
        notes=tuple(notes),
        stats=stats,
    )


def _sweep(tdx: Mapping[str, object] | None) -> dict[str, tuple[coerce.TdxValue, ...]]:
    """TDX options with one or more values each: a list/tuple, or text with commas."""
    out: dict[str, tuple[coerce.TdxValue, ...]] = {}
    if tdx is None:
        return out
    if not isinstance(tdx, Mapping):
        raise TypeError(f"tdx: expected a mapping of TDX options, got {tdx!r}")
    for key, value in tdx.items():
        k = str(key).strip()
        if isinstance(value, str):
            values: list[object] = [v for v in value.split(",") if v.strip()]
        elif isinstance(value, list | tuple):
            values = list(value)
        else:
            values = [value]
        if not values:
            raise ConfigError(f"tdx[{k!r}]: no value given")
        typed = tuple(dict.fromkeys(coerce.tdx_option(k, v) for v in values))
        out[k] = typed
    return out


def fit_conversions(
    test_pages: int,
    conversions: int | None = None,
    chunk_pages: int | None = None,
    *,
    convert: bool = True,
) -> tuple[int, int, tuple[str, ...]]:
    """``(conversions, chunk_pages, adjusted)`` for a test region of ``test_pages`` pages.

    A value given is kept (and refused when the chunks do not fit the region side by side); a
    default (``None``) is ``DEFAULTS``'s, scaled down when the region is small so the chunks
    cover at most half of it. ``adjusted`` says in words what was scaled (only when ``convert``:
    without a conversion phase nothing is used).

    Args:
        test_pages: the test region in 4 KiB pages, >= 1.
        conversions: number of conversion chunks, >= 1 (>= 0 without ``convert``), or None.
        chunk_pages: 4 KiB pages per chunk, >= 1, or None.
        convert: the workload has a conversion phase (default True).

    Returns:
        tuple[int, int, tuple[str, ...]]: conversions, chunk pages, and what was scaled.

    Raises:
        ConfigError: a count out of range (naming it), or chunks that do not fit the region.
        TypeError: a count that is not an int.
    """
    coerce.count(test_pages, "test_pages")
    adjusted: list[str] = []
    default_chunk = int(DEFAULTS["chunk_pages"])
    default_conversions = int(DEFAULTS["conversions"])
    if chunk_pages is None:
        chunk_pages = min(default_chunk, test_pages)
        if convert and chunk_pages != default_chunk:
            adjusted.append(
                f"chunk pages {default_chunk} -> {chunk_pages} (the test region has "
                f"{test_pages} pages)"
            )
    coerce.count(chunk_pages, "chunk_pages")
    if conversions is None:
        conversions = min(default_conversions, max(1, test_pages // (2 * chunk_pages)))
        if convert and conversions != default_conversions:
            adjusted.append(
                f"conversions {default_conversions} -> {conversions} so that the chunks cover at "
                f"most half of the {test_pages}-page test region"
            )
    coerce.count(conversions, "conversions", 1 if convert else 0)
    if convert and test_pages // conversions < chunk_pages:
        raise ConfigError(
            f"conversions x chunk_pages = {conversions} x {chunk_pages} pages does not fit in "
            f"the {test_pages}-page test region without overlap; use fewer or smaller chunks"
        )
    return conversions, chunk_pages, tuple(adjusted)


def compare(
    workload: Workload = "both",
    vcpus: int = DEFAULTS["vcpus"],
    bytes_per_vcpu: str | int = DEFAULTS["bytes_per_vcpu"],
    conversions: int | None = None,
    chunk_pages: int | None = None,
    types: Iterable[str] | None = None,
    designs: Iterable[str] | None = None,
    costs: CostModel | Mapping[str, float] | None = None,
    tdx: Mapping[str, object] | None = None,
    levels: int = 4,
    seed: int = 0,
    image_pages: int = DEFAULTS["image_pages"],
    teardown: bool = True,
    backing: str | int = DEFAULTS["backing"],
    folio: str | int = DEFAULTS["folio"],
    clock: str = "virtual",
    mmu_lock: str = "shared",
    progress: Callable[[int, int, str], None] | None = None,
) -> CompareResult:
    """Run ``workload`` on every valid (VM type x hook design) pair that passes the filters.

    See the module docstring for the phases. ``types`` filters by VM type label or engine type,
    ``designs`` by design name. ``tdx`` options go to the rows that take them (tdx,
    sw_protected+mirror); an option given several values (a list, or ``"a,b"``) runs those rows
    once per value, and the default sweeps ``DEFAULTS["tdx"]`` (every hook interface) unless
    ``tdx`` sets that option. ``conversions``/``chunk_pages`` default to ``DEFAULTS``, scaled
    down to fit the test region (``CompareParams.adjusted`` says so); values given that do not
    fit are refused. Bad parameters raise ``ConfigError`` before any pair runs.

    Args:
        workload: ``"demand-paging"``, ``"conversions"`` or ``"both"`` (default).
        vcpus: vCPUs of every VM, >= 1 (default 4).
        bytes_per_vcpu: test memory per vCPU, bytes or a size string, a positive multiple of
            4096 (default ``"1G"``).
        conversions: conversion chunks, >= 1, or None (default: scaled ``DEFAULTS``).
        chunk_pages: 4 KiB pages per chunk, >= 1, or None (default: scaled ``DEFAULTS``).
        types: VM types to run (labels or engine types), or None for all.
        designs: hook designs to run, or None for all.
        costs: a ``CostModel``, a mapping of overrides, or None for the defaults.
        tdx: TDX options for the rows that take them; a list or ``"a,b"`` sweeps values.
        levels: TDP paging levels, 4 (default) or 5.
        seed: seed of every VM, >= 0 (default 0).
        image_pages: initial-image pages per VM, >= 0 (default 256).
        teardown: run the teardown phase (``VM.destroy``) (default True).
        backing: host page size behind guest memory (default ``"2M"``).
        folio: guest_memfd folio size on VMs with private memory (default ``"2M"``).
        clock: ``"virtual"`` (default: the demand-paging vCPUs are simulated in modeled-time
            order, so lock and host-memory contention show in the modeled time) or ``"host"``
            (real threads; modeled time without concurrency).
        mmu_lock: virtual time only: faults take mmu_lock ``"shared"`` (default) or
            ``"exclusive"``.

        progress: called as ``progress(done, total, label)`` after each row (the CLI draws a
            progress bar with it); None (default): nothing is called.
    Returns:
        CompareResult: one row per pair and TDX option combination.

    Raises:
        ConfigError: a bad parameter (naming it), filters that leave no pair, TDX options
            when no selected row takes them, or a row whose VM cannot be built; all before
            any pair runs.
        TypeError: a parameter of the wrong type.
    """
    start = time.perf_counter()
    if workload not in WORKLOADS:
        raise ConfigError(f"workload: {workload!r} is not one of {', '.join(WORKLOADS)}")
    coerce.count(vcpus, "vcpus")
    per_vcpu = coerce.size(bytes_per_vcpu, "bytes_per_vcpu")
    conv = workload in ("conversions", "both")
    coerce.count(image_pages, "image_pages", 0)
    test_pages = vcpus * per_vcpu // PAGE_SIZE
    conversions, chunk_pages, adjusted = fit_conversions(
        test_pages, conversions, chunk_pages, convert=conv
    )
    sweep = {**_sweep(DEFAULTS["tdx"]), **_sweep(tdx)}
    params = CompareParams(
        workload=workload,
        vcpus=vcpus,
        bytes_per_vcpu=per_vcpu,
        conversions=conversions if conv else 0,
        chunk_pages=chunk_pages,
        image_pages=image_pages,
        levels=coerce.levels(levels),
        seed=coerce.count(seed, "seed", 0),
        teardown=coerce.flag(teardown, "teardown"),
        costs=coerce.cost_model(costs),
        backing=coerce.backing(backing),
        folio=coerce.folio(folio),
        tdx=sweep,
        adjusted=adjusted,
        clock=VirtualOptions(clock=clock, mmu_lock=mmu_lock).clock,
        mmu_lock=mmu_lock,
    )
    pairs = select_pairs(types, designs)
    if tdx and not any(config.variant(*VM_TYPES[t]).tdx_options for t, _ in pairs):
        raise ConfigError(
            "tdx: none of the selected rows takes TDX options (only "
            + ", ".join(v.label for v in config.VARIANTS if v.tdx_options)
            + " do)"
        )
    # Every row's VM configuration is checked before any row runs.
    jobs: list[tuple[str, str, dict[str, coerce.TdxValue]]] = []
    for label, design in pairs:
        combos = params.tdx_combinations() if config.variant(*VM_TYPES[label]).tdx_options else [{}]
        for combo in combos:
            params.spec(label, design, combo)
            jobs.append((label, design, combo))
    done: list[CompareRow] = []
    for t, d, combo in jobs:
        done.append(run_pair(t, d, params, combo))
        if progress is not None:
            progress(len(done), len(jobs), f"{t}/{d}")
    rows = tuple(done)
    return CompareResult(params=params, rows=rows, wall_s=time.perf_counter() - start)


# ----- text rendering (the CLI's default output) ---------------------------------------------

_MIB = 1 << 20

#: The phases of a row, in order.
PHASES: Final[tuple[str, ...]] = ("setup", "demand-paging", "conversions", "teardown")


def _opts_label(r: CompareRow, swept: Sequence[str]) -> str:
    """The row's values of the swept TDX options (``"two_hook"``)."""
    return " ".join(_option_text(r.tdx[k]) for k in swept if k in r.tdx)


def _row_label(r: CompareRow, swept: Sequence[str]) -> str:
    return " ".join(x for x in (r.design, _opts_label(r, swept)) if x)


def describe_workload(p: CompareParams) -> str:
    """One line saying what every row ran."""
    parts = []
    if p.workload in ("demand-paging", "both"):
        parts.append(
            f"demand paging ({p.vcpus} vCPU{'s' if p.vcpus != 1 else ''} x "
            f"{format_size(p.bytes_per_vcpu)}, every vCPU writes each page of its slice once)"
        )
    if p.workload in ("conversions", "both"):
        parts.append(
            f"{p.conversions} private->shared->private conversions of {p.chunk_pages} pages "
            "each (private_mem_conversions_test)"
        )
    return (
        " then ".join(parts)
        + f"; {p.image_pages}-page initial image; teardown: {'yes' if p.teardown else 'no'}"
    )


def describe_vms(p: CompareParams) -> str:
    """One line saying how every row's VM is configured."""
    labels = ", ".join(v.label for v in config.VARIANTS if v.tdx_options)
    opts = "; ".join(
        f"{k}={'|'.join(_option_text(x) for x in v)}" + (" (one row each)" if len(v) > 1 else "")
        for k, v in p.tdx.items()
    )
    return (
        f"{p.levels}-level TDP, backing {coerce.size_name(p.backing)}, guest_memfd folio "
        f"{coerce.size_name(p.folio)}, memory {format_size(p.memory)}, seed {p.seed}"
        + (f"; TDX options on {labels} rows: {opts}" if opts else "")
    )


def _cost_overrides(costs: CostModel) -> str:
    default = CostModel()
    changed = [f"{k}={v:g}" for k, v in costs.to_dict().items() if v != getattr(default, k)]
    return ", ".join(changed) if changed else "none"


def _per_fault_us(r: CompareRow) -> str:
    x = r.modeled_ns_per_fault
    return render.fmt_float(None if x is None else x / 1e3, 2)


def _per_page_us(r: CompareRow) -> str:
    x = r.modeled_ns_per_page
    return render.fmt_float(None if x is None else x / 1e3, 2)


def _hook_shift(a: CompareRow, b: CompareRow) -> str | None:
    """How ``b``'s hook calls differ from ``a``'s, in words (None when they do not)."""
    ha = {h: a.hook(h) for h in HOOK_COUNTERS}
    hb = {h: b.hook(h) for h in HOOK_COUNTERS}
    if ha == hb:
        return None
    gone = [h for h in HOOK_COUNTERS if ha[h] and not hb[h]]
    grew = [h for h in HOOK_COUNTERS if hb[h] > ha[h]]
    if gone and len(grew) == 1 and hb[grew[0]] - ha[grew[0]] == sum(ha[h] for h in gone):
        return f"{' and '.join(gone)} calls become {grew[0]} calls"
    return ", ".join(f"{h} {ha[h]:,} -> {hb[h]:,}" for h in HOOK_COUNTERS if ha[h] != hb[h])


def _findings(result: CompareResult) -> list[str]:
    """What the tables show, derived from the rows (nothing here is fixed text about a
    particular design: each statement is printed only when the counts show it)."""
    swept = result.params.swept
    out: list[str] = []

    def label(r: CompareRow) -> str:
        return _row_label(r, swept)

    by_type: dict[str, list[CompareRow]] = {}
    for r in result.rows:
        by_type.setdefault(r.vm_type, []).append(r)

    # 1. Which design costs least per fault, for each VM type with a choice; and whether a
    #    design that maps 2M leaves changes the picture per page written.
    for vm_type, rows in by_type.items():
        timed = [r for r in rows if r.modeled_ns_per_fault is not None]
        if len(timed) < 2:
            continue
        timed.sort(key=lambda r: cast(float, r.modeled_ns_per_fault))
        best = timed[0]
        if all(r.modeled_ns_per_fault == best.modeled_ns_per_fault for r in timed):
            text = (
                f"{vm_type}: all {len(timed)} rows cost the same, {_per_fault_us(best)} µs "
                "modeled per fault"
            )
        else:
            text = (
                f"{vm_type}: {label(best)} costs least per fault ("
                + ", ".join(f"{label(r)} {_per_fault_us(r)}" for r in timed)
                + " µs modeled)"
            )
        huge = [r for r in rows if r.huge_leaves]
        small = [r for r in rows if not r.huge_leaves and r.faults]
        if huge and small:
            h, s = huge[0], small[0]
            rmp = " from 2M RMP entries" if h.spec.vm_type == "snp" else ""
            text += (
                f"; {label(h)} maps 2M leaves{rmp} where {label(s)} maps 4K only, so it takes "
                f"{h.faults:,} faults instead of {s.faults:,} and costs {_per_page_us(h)} instead "
                f"of {_per_page_us(s)} µs per page written"
            )
        out.append(text + ".")

    # 2. Across VM types: the cheapest row of each per page written.
    cheapest = []
    for rows in by_type.values():
        paged = [r for r in rows if r.modeled_ns_per_page is not None]
        if paged:
            cheapest.append(min(paged, key=lambda r: cast(float, r.modeled_ns_per_page)))
    if len(cheapest) > 1:
        cheapest.sort(key=lambda r: cast(float, r.modeled_ns_per_page))
        out.append(
            "Per page written (µs modeled, cheapest design of each VM type): "
            + ", ".join(f"{r.vm_type}/{label(r)} {_per_page_us(r)}" for r in cheapest)
            + "."
        )

    # 3. TDX options that change which hooks are called (and whether SEAMCALLs change).
    if swept:
        groups: dict[tuple[str, str], list[CompareRow]] = {}
        for r in result.rows:
            if r.tdx:
                groups.setdefault((r.vm_type, r.design), []).append(r)
        shifts: dict[tuple[str, str, str, bool], list[str]] = {}
        for (vm_type, design), rows in groups.items():
            a = rows[0]
            for b in rows[1:]:
                shift = _hook_shift(a, b)
                if shift is None:
                    continue
                key = (
                    _opts_label(a, swept),
                    _opts_label(b, swept),
                    shift,
                    a.seamcalls == b.seamcalls,
                )
                shifts.setdefault(key, []).append(f"{vm_type}/{design}")
        for (la, lb, shift, same_seamcalls), where in shifts.items():
            out.append(
                f"{lb} instead of {la} ({', '.join(where)}): {shift}; "
                + ("the SEAMCALLs are the same." if same_seamcalls else "SEAMCALLs change too.")
            )

    # 4. Failed checks, with why when the counters show the known cause.
    failures: dict[str, list[str]] = {}
    for r in result.rows:
        if r.check_ok:
            continue
        tables = external_tables_name(r.spec.vm_type)
        teardown = r.phase("teardown")
        left = int(r.stats["sept_tables"])
        if teardown is not None and left and int(teardown.stats["free_external_spt"]) == 0:
            text = f"failed the teardown audit: {left:,} {tables} were never freed"
            calls = int(sum(teardown.stats[h] for h in HOOK_COUNTERS))
            upstream = next(
                (
                    u
                    for u in result.rows
                    if u.vm_type == r.vm_type
                    and u.design == r.spec.variant.default_design
                    and u.tdx == r.tdx
                    and (ut := u.phase("teardown")) is not None
                    and ut.stats["free_external_spt"]
                ),
                None,
            )
            if upstream is not None:
                ut = cast(PhaseResult, upstream.phase("teardown"))
                text += (
                    f": at teardown its hooks were called {calls:,} times but "
                    f"free_external_spt never, where {upstream.design} called it "
                    f"{int(ut.stats['free_external_spt']):,} times"
                )
                if r.design != r.spec.variant.default_design:
                    text += (
                        f". The expected finding for the {r.design} design: hooks keyed on the "
                        "fault's private flag see guest_memfd's private zap of the leaves, never "
                        "the exclusive zap of the mirror root that frees the tables"
                    )
        else:
            kind = (
                "unexpected for the upstream design"
                if r.design == r.spec.variant.default_design
                else "a non-upstream design"
            )
            text = f"failed ({kind}): {r.check_error}"
        failures.setdefault(text, []).append(f"{r.vm_type}/{label(r)}")
    for text, where in failures.items():
        out.append(f"{', '.join(where)}: {text}.")
    passed = [r for r in result.rows if r.check_ok]
    if passed and len(passed) < len(result.rows):
        out.append(f"Every other row ({len(passed)}) passed its check and teardown audit.")
    elif passed:
        out.append("Every row passed its check and teardown audit.")
    return out


def format_text(result: CompareResult) -> str:
    """The human-readable report: tables within ``render.WIDTH`` columns, the legend, and what
    the tables show.

    Args:
        result: what ``compare`` returned.

    Returns:
        str: the report (lines of at most 100 columns), ending with a newline. Never raises
        for a ``CompareResult``.
    """
    p = result.params
    swept = p.swept
    lines: list[str] = []
    for text in (
        f"SIMULATED by tdpmmu {__version__}: one workload on every valid (VM type x hook "
        "design) pair of a user-space model of KVM's x86 TDP MMU, not on real VMs.",
        f"workload: {describe_workload(p)}",
        f"VMs: {describe_vms(p)}; cost overrides: {_cost_overrides(p.costs)}",
        *(f"scaled to fit: {a}" for a in p.adjusted),
        "Clocks: 'modeled' = time the cost model assigns to the simulated system, summed over "
        "vCPUs and host work; 'host wall' = time this simulator took on this machine.",
    ):
        lines += render.wrap(text)

    key = [
        render.Column("vm type", right=False, key=True),
        render.Column("design" + (" " + " ".join(swept) if swept else ""), right=False, key=True),
    ]

    def keys(r: CompareRow) -> list[str]:
        return [r.vm_type, _row_label(r, swept)]

    footnotes: list[str] = []

    def check_cell(r: CompareRow) -> str:
        if r.check_ok:
            return "yes"
        footnotes.append(f"[{len(footnotes) + 1}] {r.vm_type}/{_row_label(r, swept)}: ")
        footnotes[-1] += r.check_error or ""
        return f"NO [{len(footnotes)}]"

    lines += ["", "Faults and hook calls (all phases):"]
    cols = [
        *key,
        render.Column(("faults", "pf_taken")),
        render.Column(("2M", "leaves")),
        render.Column(("hooks:", "link")),
        render.Column("set"),
        render.Column("remove"),
        render.Column("free"),
    ]
    lines += render.table(
        cols,
        [
            [
                *keys(r),
                render.fmt_int(r.faults),
                render.fmt_int(r.huge_leaves),
                *(render.fmt_int(r.hook(h)) for h in HOOK_COUNTERS),
            ]
            for r in result.rows
        ],
    )

    lines += ["", "TDX module and RMP instructions (all phases):"]
    cols = [
        *key,
        render.Column(("SEAMCALLs", "TDH.*")),
        render.Column(("guest", "ACCEPT")),
        render.Column("RMPUPDATE"),
        render.Column("PSMASH"),
        render.Column("PVALIDATE"),
    ]
    lines += render.table(
        cols,
        [
            [
                *keys(r),
                render.fmt_int(r.seamcalls),
                render.fmt_int(int(r.stats["TDG.MEM.PAGE.ACCEPT"])),
                render.fmt_int(r.rmpupdate),
                render.fmt_int(r.psmash),
                render.fmt_int(r.pvalidate),
            ]
            for r in result.rows
        ],
    )

    lines += ["", "Modeled time, memory, host time and correctness:"]
    cols = [
        *key,
        render.Column(("per fault", "µs", "modeled")),
        render.Column(("per page", "µs", "modeled")),
        render.Column(("total ms", "modeled, sum", "over vCPUs")),
        render.Column(("PT", "memory", "MiB")),
        render.Column(("host", "wall", "s")),
        render.Column("check", right=False),
    ]
    lines += render.table(
        cols,
        [
            [
                *keys(r),
                _per_fault_us(r),
                _per_page_us(r),
                render.fmt_float(r.modeled_ns / 1e6, 1),
                render.fmt_float(r.memory_bytes / _MIB, 2),
                render.fmt_float(r.wall_s, 3),
                check_cell(r),
            ]
            for r in result.rows
        ],
    )

    phases = [ph for ph in PHASES if any(r.phase(ph) for r in result.rows)]
    lines += ["", "Modeled time by phase (ms, summed over vCPUs and host work):"]
    ph_cells = []
    for r in result.rows:
        cells = []
        for ph in phases:
            got = r.phase(ph)
            cells.append("-" if got is None else render.fmt_float(got.modeled_ns / 1e6, 1))
        ph_cells.append([*keys(r), *cells])
    lines += render.table([*key, *(render.Column(ph) for ph in phases)], ph_cells)

    legend = [
        "faults: KVM's pf_taken, all phases (RETRYs of racing vCPUs included). 2M leaves: the "
        "most huge leaves mapped at once. hooks: link/set/remove/free_external_spt calls.",
        "SEAMCALLs: host TDH.* calls (the guest's TDG.MEM.PAGE.ACCEPT is counted apart).",
        "per fault: modeled time of the faults / faults; per page: the same / guest page writes "
        "(comparable when faults map different sizes). total: all modeled work, summed over "
        "vCPUs and host operations, each conversion request charged psc_exit_ns + "
        "gmem_convert_ns.",
        "PT memory: KVM page tables at peak + S-EPT tables (tdx) or software external tables "
        f"(sw_protected+mirror, no TDX module) held + SNP RMP entries ({RMP_ENTRY_BYTES} B per "
        "guest_memfd page).",
        "check: VM.check() held after the workload and teardown left no table behind; a "
        "design that breaks is a result, not a crash.",
    ]
    lines.append("")
    for text in legend + footnotes:
        lines += render.wrap(text)
    for r in result.rows:
        for n in r.notes:
            lines += render.wrap(f"{r.vm_type}/{_row_label(r, swept)}: {n}")

    lines += ["", "What the tables show:"]
    for text in _findings(result):
        lines += render.wrap(f"- {text}")
    return "\n".join(lines)


# ----- any registered workload, one row per (VM type x hook design x TDX options) --------------

#: Columns of ``WorkloadRow.summary`` (and of ``WorkloadComparison.to_csv``), in order.
WORKLOAD_SUMMARY_FIELDS: Final[tuple[str, ...]] = (
    "vm_type",
    "design",
    "options",
    "faults",
    "hook_calls",
    "seamcalls",
    "rmpupdate",
    "psmash",
    "pvalidate",
    "modeled_ns",
    "page_table_peak_bytes",
    "external_table_bytes",
    "rmp_bytes",
    "memory_bytes",
    "wall_s",
    "check_ok",
    "check_error",
    "refused",
)


def _result_from(env: Envelope) -> Any:
    """The result an envelope of a registered workload describes, of the type its function
    returns when that type reads envelopes (``from_envelope``), else a ``WorkloadResult``."""
    import inspect

    from tdpmmu.workloads import WORKLOADS as REGISTRY
    from tdpmmu.workloads import WorkloadResult

    wl = REGISTRY.get(env.workload)
    kind = None if wl is None else inspect.signature(wl.run).return_annotation
    if isinstance(kind, type) and hasattr(kind, "from_envelope"):
        return kind.from_envelope(env)
    return WorkloadResult.from_envelope(env)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class WorkloadRow:
    """One (VM type, hook design, TDX options) row of ``compare_workload``: the registered
    workload's result on that VM, or why it has none."""

    #: VM type label (a key of ``VM_TYPES``: "sw_protected+mirror" is VM(mirror=True)).
    vm_type: str
    design: str
    #: The row's TDX options (empty on variants without them).
    tdx: Mapping[str, coerce.TdxValue]
    #: The workload's result (``WorkloadResult`` or ``DemandPagingResult``), whether its
    #: checks held or not; None when it refused the VM or raised mid-run.
    result: Any
    #: Host wall-clock seconds of the row.
    wall_s: float
    #: Why the row did not pass (None when it passed): the workload's first failed check, the
    #: teardown audit's finding, or the exception the run raised.
    error: str | None = None
    #: The workload refused this VM type or design (``ConfigError``): not a failed check.
    refused: bool = False
    #: The counters of the workload's VM when the run raised (None when it returned a result,
    #: whose counters are used, or raised before building a VM).
    vm_stats: Stats | None = None

    @property
    def options(self) -> str:
        """The row's TDX options as ``key=value,...`` ("" when it has none)."""
        return ",".join(f"{k}={_option_text(v)}" for k, v in self.tdx.items())

    def _stat(self, name: str) -> int:
        stats = self.stats
        return 0 if stats is None else int(stats[name])

    @property
    def stats(self) -> Stats | None:
        """The result's counters, else the VM's when the run raised (``vm_stats``), else None."""
        return self.vm_stats if self.result is None else cast(Stats, self.result.stats)

    @property
    def faults(self) -> int:
        """Faults the guest took (KVM's ``pf_taken``), the whole run."""
        return self._stat("pf_taken")

    @property
    def hook_calls(self) -> int:
        """Calls of the four external-table hooks (link/set/remove/free)."""
        return sum(self._stat(h) for h in HOOK_COUNTERS)

    @property
    def seamcalls(self) -> int:
        """Host SEAMCALLs (every ``TDH.*`` leaf)."""
        stats = self.stats
        return 0 if stats is None else _seamcalls(stats.to_dict())

    @property
    def rmpupdate(self) -> int:
        """RMPUPDATE instructions (SNP)."""
        return self._stat("rmpupdate")

    @property
    def psmash(self) -> int:
        """PSMASH instructions (SNP)."""
        return self._stat("psmash")

    @property
    def pvalidate(self) -> int:
        """The guest's PVALIDATE instructions (SNP)."""
        return self._stat("pvalidate")

    @property
    def modeled_ns(self) -> float:
        """All modeled time of the run (cost model; 0 without counters)."""
        stats = self.stats
        return 0.0 if stats is None else float(stats["modeled_ns"])

    @property
    def page_table_peak_bytes(self) -> int:
        """KVM page tables at their peak (mirror roots included)."""
        return self._stat("page_table_peak_bytes")

    @property
    def external_table_bytes(self) -> int:
        """S-EPT (or software external) tables held at the end of the run, x 4 KiB."""
        return self._stat("sept_tables") * _TABLE_BYTES

    @property
    def rmp_bytes(self) -> int:
        """SNP: RMP entries of the guest_memfd pages (8 bytes each as modeled); else 0."""
        if self.result is None or self.result.spec.vm_type != "snp":
            return 0
        return RMP_ENTRY_BYTES * (int(self.result.spec.memory) // PAGE_SIZE)

    @property
    def memory_bytes(self) -> int:
        """Page-table memory counted for the design: KVM tables + external tables + RMP."""
        return self.page_table_peak_bytes + self.external_table_bytes + self.rmp_bytes

    @property
    def check_ok(self) -> bool:
        """The workload ran, its own checks held (``detail["checks"]``) and its VM passed the
        teardown audit."""
        return self.result is not None and self.error is None

    @property
    def check_error(self) -> str | None:
        """Why the row did not pass (``error``)."""
        return self.error

    @property
    def check(self) -> str:
        """The check column: "yes", "NO (reason)" or "n/a (the workload's refusal)"."""
        if self.check_ok:
            return "yes"
        return f"n/a ({self.error})" if self.refused else f"NO ({self.error})"

    def summary(self) -> dict[str, Any]:
        """The flat per-row fields (``WORKLOAD_SUMMARY_FIELDS``). Never raises."""
        return {name: getattr(self, name) for name in WORKLOAD_SUMMARY_FIELDS}

    def to_dict(self) -> dict[str, Any]:
        """``summary()`` plus ``tdx``, the result's envelope (None without a result) and
        ``vm_stats`` (None unless the run raised with a VM).

        Returns:
            dict[str, Any]: plain JSON types. Never raises.
        """
        out = self.summary()
        out["tdx"] = dict(self.tdx)
        out["result"] = None if self.result is None else self.result.to_dict()
        out["vm_stats"] = None if self.vm_stats is None else self.vm_stats.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "WorkloadRow":
        """The row a ``to_dict()`` mapping describes.

        Args:
            data: the mapping.

        Returns:
            WorkloadRow: the row (its result of the type the workload's function returns, e.g.
            ``DemandPagingResult``, else a ``WorkloadResult``).

        Raises:
            KeyError: a field is missing.
            ConfigError: the result is not a ``WorkloadResult``'s envelope.
        """
        res = data["result"]
        return cls(
            vm_type=str(data["vm_type"]),
            design=str(data["design"]),
            tdx=dict(data["tdx"]),
            result=None if res is None else _result_from(Envelope.from_dict(res)),
            wall_s=float(data["wall_s"]),
            error=data.get("check_error"),
            refused=bool(data.get("refused", False)),
            vm_stats=None if data.get("vm_stats") is None else Stats(data["vm_stats"]),
        )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class WorkloadComparison:
    """What ``compare_workload`` returns: the workload, its parameters and one row per pair
    (and per swept TDX option value), in the engine's pair order."""

    #: The registered workload's name, e.g. ``"dirty_log_perf"``.
    workload: str
    #: The workload's own parameters every row ran with.
    params: Mapping[str, Any]
    #: The simulator options every row shared (costs, seed, levels, folio, clock, ...).
    sim: Mapping[str, Any]
    rows: tuple[WorkloadRow, ...]
    #: Host wall-clock seconds of the whole comparison.
    wall_s: float = 0.0

    @property
    def swept(self) -> tuple[str, ...]:
        """TDX options whose value differs between rows (they label the rows)."""
        keys: dict[str, set[str]] = {}
        for r in self.rows:
            for k, v in r.tdx.items():
                keys.setdefault(k, set()).add(_option_text(v))
        return tuple(k for k, vals in keys.items() if len(vals) > 1)

    def envelope(self) -> Envelope:
        """The comparison as an ``Envelope`` (workload ``"compare_workload"``): modeled time
        and its breakdown summed over the rows that ran; each row keeps its own result."""
        ran = [r.result for r in self.rows if r.result is not None]
        return Envelope(
            workload="compare_workload",
            config={
                "workload": {"name": self.workload, "params": json_safe(self.params)},
                "sim": json_safe(self.sim),
            },
            seed=int(self.sim.get("seed", 0)),
            modeled_ns=sum(float(r.modeled_ns) for r in ran),
            cost_breakdown=sum_breakdowns([r.cost_breakdown for r in ran]),
            wall_s=self.wall_s,
            result={"rows": [r.to_dict() for r in self.rows]},
        )

    @classmethod
    def from_envelope(cls, env: Envelope) -> "WorkloadComparison":
        """The comparison an envelope describes.

        Args:
            env: an envelope with ``workload == "compare_workload"``.

        Returns:
            WorkloadComparison: the comparison.

        Raises:
            ConfigError: another kind of envelope (naming ``envelope``).
            KeyError: a field is missing.
        """
        if env.workload != "compare_workload":
            raise ConfigError(f"envelope: a {env.workload} result, not compare_workload")
        wl = env.config["workload"]
        return cls(
            workload=str(wl["name"]),
            params=dict(wl["params"]),
            sim=dict(env.config["sim"]),
            rows=tuple(WorkloadRow.from_dict(r) for r in env.result["rows"]),
            wall_s=env.wall_s,
        )

    def to_dict(self) -> dict[str, Any]:
        """``envelope().to_dict()``. Never raises."""
        return self.envelope().to_dict()

    def to_json(self, **kwargs: Any) -> str:
        """The comparison as one JSON document (``**kwargs`` go to ``json.dumps``)."""
        return self.envelope().to_json(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> "WorkloadComparison":
        """The comparison a ``to_json`` text describes.

        Raises:
            ConfigError: not a tdpmmu envelope, or not a workload comparison.
            json.JSONDecodeError: ``text`` is not JSON.
        """
        return cls.from_envelope(Envelope.from_json(text))

    def to_pandas(self) -> "pandas.DataFrame":
        """One row per design/option with the ``WorkloadRow.summary`` columns and the
        workload's metrics (missing where a row has no result).

        Returns:
            pandas.DataFrame: the same columns as ``to_csv``.

        Raises:
            ImportError: pandas is not installed (``pip install 'tdpmmu[pandas]'``).
        """
        return rows_to_frame(
            [
                {**row.summary(), **(row.result.metrics if row.result is not None else {})}
                for row in self.rows
            ]
        )

    def to_csv(self) -> str:
        """One line per row with the ``WorkloadRow.summary`` columns, then the workload's
        metrics (raw numbers; empty where a row has no result). Never raises."""
        metrics: dict[str, None] = {}
        for r in self.rows:
            if r.result is not None:
                metrics.update(dict.fromkeys(r.result.metrics))
        buf = io.StringIO()
        w = csv.DictWriter(
            buf, fieldnames=[*WORKLOAD_SUMMARY_FIELDS, *metrics], lineterminator="\n"
        )
        w.writeheader()
        for row in self.rows:
            rec = {k: "" if v is None else v for k, v in row.summary().items()}
            if row.result is not None:
                rec.update(row.result.metrics)
            w.writerow(rec)
        return buf.getvalue()


def _first_failed_check(result: Any) -> str | None:
    """What a row's check column says for a result whose checks failed: the first failed
    check's name (``detail["checks"]`` records), with how many more failed; None when all held.
    """
    failed = [str(c["name"]) for c in result.detail.get("checks", ()) if not c["ok"]]
    if not failed:
        return None
    return failed[0] + (f" (+{len(failed) - 1} more)" if len(failed) > 1 else "")


def compare_workload(
    workload: str,
    params: Mapping[str, Any] | None = None,
    *,
    types: Iterable[str] | None = None,
    designs: Iterable[str] | None = None,
    tdx: Mapping[str, object] | None = None,
    costs: CostModel | Mapping[str, float] | None = None,
    seed: int = 0,
    levels: int = 4,
    folio: str | int | None = None,
    clock: str | None = None,
    mmu_lock: str = "shared",
    machine: Any = None,
    tdx_module: str = "1.5",
    progress: Any = None,
) -> WorkloadComparison:
    """Run a registered workload (``tdpmmu.workloads.WORKLOADS``) on every valid (VM type x
    hook design) pair it runs on, with the same parameters, one row per pair.

    Rows of variants that take TDX options are run once per combination of the swept values
    (``tdx``: a list or ``"a,b"`` per option; default ``DEFAULTS["tdx"]``, every hook
    interface). A pair whose VM type is not in the workload's ``vm_types`` is left out; a pair
    the workload refuses with ``ConfigError`` (e.g. a design it cannot run) is a row marked
    ``refused``. A run whose own checks failed keeps its result and figures, with ``check_ok``
    False and the first failed check as the reason. After a run that returned, each VM it built
    goes through the built-in ``compare``'s audit: ``VM.check()``, then ``VM.destroy()`` (unless
    the workload destroyed it) and what it left behind (KVM page tables, S-EPT or software
    external tables) fails the row. The VMs are found with ``workloads.base.capture_vms`` (a
    workload's ``Clock`` hands its VM over), so no workload's signature changes. A run that
    raises (``InvariantError``, ``VmBugged``, ``OutOfMemory``, ``AssertionError``) is a row
    with ``check_ok`` False, the exception as the reason and its VM's counters up to the error
    (``vm_stats``).

    Args:
        workload: the registry name (``"dirty_log_perf"``) or CLI command
            (``"dirty-log-perf"``) of a registered workload.
        params: the workload's own keyword arguments (its ``from_args`` output), or None for
            its defaults.
        types: VM types to run (labels or engine types), or None for all.
        designs: hook designs to run, or None for all.
        tdx: TDX options for the rows that take them; a list or ``"a,b"`` sweeps values.
        costs: a ``CostModel``, a mapping of overrides, or None for the defaults.
        seed: every VM's seed, >= 0 (default 0).
        levels: TDP paging levels, 4 (default) or 5.
        folio: guest_memfd folio size on VMs with private memory (``"4K"``/``"2M"``), or None.
        clock, mmu_lock, machine, tdx_module: the run options (``SimArgs``).
        progress: ``progress(done, total, label)`` after each row, or None.

    Returns:
        WorkloadComparison: one row per pair and TDX option combination.

    Raises:
        ConfigError: an unknown workload (naming ``workload``), filters that leave no pair it
            runs on, or a ``ConfigError`` on every row (then it is the first row's: a bad
            parameter rather than a refusal).
        TypeError: a parameter the workload does not take.
    """
    from tdpmmu.workloads import WORKLOADS as REGISTRY

    start = time.perf_counter()
    wl = next((w for w in REGISTRY.values() if workload in (w.name, w.command)), None)
    if wl is None:
        raise ConfigError(
            f"workload: {workload!r} is not a registered workload; allowed: " + ", ".join(REGISTRY)
        )
    kwargs = dict(params or {})
    sweep = {**_sweep(DEFAULTS["tdx"]), **_sweep(tdx)}
    pairs = [
        (label, design)
        for label, design in select_pairs(types, designs)
        if VM_TYPES[label][0] in wl.vm_types
    ]
    if not pairs:
        raise ConfigError(
            f"types/designs: no selected pair runs {wl.name} (it runs on "
            + ", ".join(wl.vm_types)
            + ")"
        )
    jobs: list[tuple[str, str, dict[str, coerce.TdxValue]]] = []
    for label, design in pairs:
        if config.variant(*VM_TYPES[label]).tdx_options:
            keys = list(sweep)
            for values in itertools.product(*(sweep[k] for k in keys)):
                jobs.append((label, design, dict(zip(keys, values, strict=True))))
        else:
            jobs.append((label, design, {}))
    sim: dict[str, Any] = {
        "costs": coerce.cost_model(costs),
        "seed": coerce.count(seed, "seed", 0),
        "levels": coerce.levels(levels),
        "clock": clock,
        "mmu_lock": mmu_lock,
        "machine": machine,
        "tdx_module": tdx_module,
    }
    rows: list[WorkloadRow] = []
    first_error: ConfigError | None = None
    for i, (label, design, combo) in enumerate(jobs):
        vm_type, mirror = VM_TYPES[label]
        row_start = time.perf_counter()
        result: Any = None
        error: str | None = None
        refused = False
        vm_stats: Stats | None = None
        # capture_vms: the workload's VMs (it returns counters, not its VM), for the counters
        # of a run that raises and for the teardown audit.
        with capture_vms() as vms:
            try:
                result = wl.run(
                    **kwargs,
                    **sim,
                    vm_type=vm_type,
                    mirror=mirror,
                    hooks=design,
                    tdx=combo or None,
                    folio=folio if vm_type != "default" else None,
                )
            except ConfigError as e:
                first_error = first_error or e
                error, refused = str(e), True
            except (VmBugged, InvariantError, OutOfMemory, AssertionError) as e:
                error = f"{type(e).__name__}: {e}"
                vm_stats = vms[-1].stats if vms else None
        if result is not None:
            error = _first_failed_check(result)
            # As the built-in compare: VM.check(), then destroy and what it left behind.
            try:
                for vm in vms:
                    error = error or _check_error(vm) or _teardown_error(vm, vm.vm_type)
            except (VmBugged, InvariantError, OutOfMemory) as e:
                error = error or f"teardown: {type(e).__name__}: {e}"
        rows.append(
            WorkloadRow(
                vm_type=label,
                design=design,
                tdx=combo,
                result=result,
                wall_s=time.perf_counter() - row_start,
                error=error,
                refused=refused,
                vm_stats=vm_stats,
            )
        )
        if progress is not None:
            opts = ",".join(f"{k}={_option_text(v)}" for k, v in combo.items())
            progress(i + 1, len(jobs), f"{label}/{design}" + (f" {opts}" if opts else ""))
    if first_error is not None and all(r.refused for r in rows):
        raise first_error
    return WorkloadComparison(
        workload=wl.name,
        params=kwargs,
        sim={
            **sim,
            "costs": sim["costs"].to_dict(),
            "folio": folio,
            "machine": None if machine is None else json_safe(machine),
        },
        rows=tuple(rows),
        wall_s=time.perf_counter() - start,
    )


def format_workload_text(result: WorkloadComparison) -> str:
    """The human-readable report of ``compare_workload``: hook calls, SEAMCALLs and RMP
    instructions, modeled time, memory, host time and the check per row, then the workload's
    metrics per row; every line within ``render.WIDTH`` columns.

    Args:
        result: what ``compare_workload`` returned.

    Returns:
        str: the report. Never raises for a ``WorkloadComparison``.
    """
    from tdpmmu.workloads import WORKLOADS as REGISTRY

    wl = REGISTRY.get(result.workload)
    selftest = wl.selftest if wl is not None and wl.selftest != "tdpmmu" else result.workload
    swept = result.swept
    given = {k: v for k, v in result.params.items() if v is not None}
    params = ", ".join(f"{k}={v}" for k, v in given.items()) or "defaults"
    lines: list[str] = []
    for text in (
        f"SIMULATED by tdpmmu {__version__}: {selftest} on every valid (VM type x hook design) "
        "pair of a user-space model of KVM's x86 TDP MMU, not on real VMs.",
        f"workload: {result.workload} ({params}); seed {result.sim.get('seed', 0)}, "
        f"{result.sim.get('levels', 4)}-level TDP"
        + (f", folio {result.sim['folio']}" if result.sim.get("folio") else ""),
        "Clocks: 'modeled' = time the cost model assigns to the simulated system, summed over "
        "vCPUs and host work; 'host wall' = time this simulator took on this machine.",
    ):
        lines += render.wrap(text)

    def label(r: WorkloadRow) -> str:
        opts = " ".join(_option_text(r.tdx[k]) for k in swept if k in r.tdx)
        return " ".join(x for x in (r.design, opts) if x)

    key = [
        render.Column("vm type", right=False, key=True),
        render.Column("design" + (" " + " ".join(swept) if swept else ""), right=False, key=True),
    ]
    footnotes: list[str] = []

    def check_cell(r: WorkloadRow) -> str:
        if r.check_ok:
            return "yes"
        footnotes.append(f"[{len(footnotes) + 1}] {r.vm_type}/{label(r)}: {r.error}")
        return f"{'n/a' if r.refused else 'NO'} [{len(footnotes)}]"

    def num(r: WorkloadRow, value: int) -> str:
        return "-" if r.stats is None else render.fmt_int(value)

    lines += ["", "Hooks, SEAMCALLs, RMP instructions, modeled time, memory and correctness:"]
    cols = [
        *key,
        render.Column(("faults", "pf_taken")),
        render.Column(("hook", "calls")),
        render.Column(("SEAMCALLs", "TDH.*")),
        render.Column("RMPUPDATE"),
        render.Column("PSMASH"),
        render.Column("PVALIDATE"),
        render.Column(("total ms", "modeled")),
        render.Column(("PT", "memory", "MiB")),
        render.Column(("host", "wall", "s")),
        render.Column("check", right=False),
    ]
    lines += render.table(
        cols,
        [
            [
                r.vm_type,
                label(r),
                num(r, r.faults),
                num(r, r.hook_calls),
                num(r, r.seamcalls),
                num(r, r.rmpupdate),
                num(r, r.psmash),
                num(r, r.pvalidate),
                "-" if r.stats is None else render.fmt_float(r.modeled_ns / 1e6, 3),
                "-" if r.stats is None else render.fmt_float(r.memory_bytes / _MIB, 2),
                render.fmt_float(r.wall_s, 3),
                check_cell(r),
            ]
            for r in result.rows
        ],
    )
    metrics: dict[str, None] = {}
    for r in result.rows:
        if r.result is not None:
            metrics.update(dict.fromkeys(m for m in r.result.metrics if not m.startswith("wall_")))
    if metrics:
        lines += ["", f"{result.workload} metrics (modeled):"]
        lines += render.table(
            [*key, *(render.Column(tuple(m.split("_", 1)) if len(m) > 18 else m) for m in metrics)],
            [
                [
                    r.vm_type,
                    label(r),
                    *(
                        "-"
                        if r.result is None or m not in r.result.metrics
                        else f"{r.result.metrics[m]:.6g}"
                        for m in metrics
                    ),
                ]
                for r in result.rows
            ],
        )
    lines.append("")
    for text in [
        "faults: KVM's pf_taken. hook calls: link/set/remove/free_external_spt. SEAMCALLs: host "
        "TDH.* calls. PT memory: KVM page tables at peak + S-EPT/external tables held at the "
        f"end + SNP RMP entries ({RMP_ENTRY_BYTES} B per guest_memfd page). check: the "
        "workload ran, its own checks held (else NO with the first failed check), VM.check() "
        "held after it and teardown (destroy) left no KVM, S-EPT or external table behind, as "
        "in the built-in compare; a row that raised keeps the counts up to the error; n/a: "
        "the workload refuses that VM or design.",
        *footnotes,
    ]:
        lines += render.wrap(text)
    return "\n".join(lines)
