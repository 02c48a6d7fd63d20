"""Run one workload on every valid (VM type x hook design) pair and compare the results.

This is the question the hook-design argument of the seed thread is about: with the same guest
doing the same thing, what does each design cost (hook calls, SEAMCALLs, RMP instructions,
modeled time, page-table memory), and does it stay correct? ``compare`` returns one typed
``CompareRow`` per pair; ``python -m tdpmmu compare`` prints them as a table, JSON or CSV.

The workload, on every pair (architecture §3 VM types, §4 hook designs):

1. **setup**: create the VM (``vcpus x bytes_per_vcpu`` of test memory plus a small initial
   image after it), populate the image (``KVM_PRE_FAULT_MEMORY``; on a TD it is the initial
   image, ``TDH.MEM.PAGE.ADD``), then finalize a TD.
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

Correctness ("check"): ``VM.check()`` after the workload, and after teardown nothing may be left
behind (KVM page tables, S-EPT/external tables, leaked external tables). A design that breaks
(``InvariantError``, ``VmBugged``, a leak, a fault that does not map its page) is a *result*:
its row says ``NO (reason)`` and keeps the counts up to the failure.

Two clocks, never mixed: **modeled** time is what the cost model charges for the simulated
system; **host wall** time is how long this simulator took on this machine.
"""

import csv
import dataclasses
import io
import json
import textwrap
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, Literal

from tdpmmu import __version__
from tdpmmu._core import ConfigError, InvariantError, OutOfMemory, VmBugged
from tdpmmu.costs import CostModel
from tdpmmu.sizes import format_size, parse_size
from tdpmmu.stats import Stats
from tdpmmu.vm import VM
from tdpmmu.workloads import PAGE_SIZE, private_mem_conversions

__all__ = [
    "DESIGNS",
    "PAIRS",
    "SUMMARY_FIELDS",
    "VM_TYPES",
    "WORKLOADS",
    "CompareParams",
    "CompareResult",
    "CompareRow",
    "PhaseResult",
    "compare",
    "run_pair",
    "select_pairs",
]

Workload = Literal["demand-paging", "conversions", "both"]
WORKLOADS: Final[tuple[Workload, ...]] = ("demand-paging", "conversions", "both")

#: VM type labels of the comparison and how each is built: (engine vm_type, mirror=).
VM_TYPES: Final[Mapping[str, tuple[str, bool]]] = {
    "default": ("default", False),
    "tdx": ("tdx", False),
    "snp": ("snp", False),
    "sw_protected": ("sw_protected", False),
    "sw_protected+mirror": ("sw_protected", True),
}

#: Hook design names (architecture §4).
DESIGNS: Final[tuple[str, ...]] = ("none", "mirror", "private", "gmem")

#: Every (VM type label, hook design) the engine accepts; it raises ConfigError for the others
#: (tests/test_compare.py checks both directions). Upstream designs first for each type.
PAIRS: Final[tuple[tuple[str, str], ...]] = (
    ("default", "none"),
    ("tdx", "mirror"),
    ("tdx", "private"),
    ("snp", "gmem"),
    ("snp", "private"),
    ("sw_protected", "none"),
    ("sw_protected+mirror", "mirror"),
    ("sw_protected+mirror", "private"),
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

#: Columns of ``CompareRow.summary`` (and of the CSV output), in order.
SUMMARY_FIELDS: Final[tuple[str, ...]] = (
    "vm_type",
    "design",
    "faults",
    "hook_calls",
    "seamcalls",
    "rmpupdate",
    "psmash",
    "pvalidate",
    "modeled_ns_per_fault",
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


def _seamcalls(stats: Mapping[str, int | float]) -> int:
    # Host SEAMCALLs only: TDG.* (the guest's TDCALLs, e.g. TDG.MEM.PAGE.ACCEPT) are not.
    return int(sum(v for k, v in stats.items() if k.startswith("TDH.")))


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CompareParams:
    """The workload every pair runs (validated and normalized by ``compare``)."""

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
    #: TDX module options, as VM(tdx=...) takes them; used on tdx and sw_protected+mirror.
    tdx: Mapping[str, str]

    @property
    def test_pages(self) -> int:
        return self.vcpus * self.bytes_per_vcpu // PAGE_SIZE

    @property
    def memory(self) -> int:
        return self.vcpus * self.bytes_per_vcpu + self.image_pages * PAGE_SIZE

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["costs"] = self.costs.to_dict()
        out["tdx"] = dict(self.tdx)
        out["memory"] = self.memory
        return out


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
    #: Counter deltas over the phase (gauges such as ``pages_4k`` are deltas too).
    stats: Stats

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["stats"] = {k: v for k, v in self.stats.items() if v}
        return out


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CompareRow:
    """One (VM type, hook design) pair after the workload."""

    #: VM type label (a key of ``VM_TYPES``: "sw_protected+mirror" is VM(mirror=True)).
    vm_type: str
    design: str
    #: Faults the guest took (KVM's ``pf_taken``), every phase.
    faults: int
    #: Calls of the four external-table hooks (link/set/remove/free).
    hook_calls: int
    #: Host SEAMCALLs (every ``TDH.*`` leaf; the guest's ``TDG.*`` calls are not counted).
    seamcalls: int
    rmpupdate: int
    psmash: int
    pvalidate: int
    #: Modeled time of all faults (exit, handling, page allocation, hooks, SEAMCALLs, ...).
    fault_modeled_ns: float
    #: All modeled time: every phase, host operations and conversion requests included.
    modeled_ns: float
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
    def modeled_ns_per_fault(self) -> float | None:
        """Modeled time of the faults divided by their number (None without faults)."""
        return self.fault_modeled_ns / self.faults if self.faults else None

    @property
    def memory_bytes(self) -> int:
        """Page-table memory counted for the design: KVM tables + external tables + RMP."""
        return self.page_table_peak_bytes + self.external_table_bytes + self.rmp_bytes

    @property
    def check(self) -> str:
        """The check column as text: "yes" or "NO (reason)"."""
        return "yes" if self.check_ok else f"NO ({self.check_error})"

    def summary(self) -> dict[str, Any]:
        """The flat per-row fields (the CSV columns, ``SUMMARY_FIELDS``)."""
        return {name: getattr(self, name) for name in SUMMARY_FIELDS}

    def to_dict(self) -> dict[str, Any]:
        out = self.summary()
        out["notes"] = list(self.notes)
        out["phases"] = [p.to_dict() for p in self.phases]
        out["stats"] = self.stats.to_dict()
        return out


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CompareResult:
    params: CompareParams
    rows: tuple[CompareRow, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "tool": "tdpmmu",
            "version": __version__,
            "simulated": True,
            "command": "compare",
            "parameters": self.params.to_dict(),
            "rows": [r.to_dict() for r in self.rows],
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

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
    its engine type: "sw_protected" selects both sw_protected rows, "sw_protected+mirror" one."""
    type_names = sorted({*VM_TYPES, *(t for t, _ in VM_TYPES.values())})
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


def _positive(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected int, got {type(value).__name__}")
    if value < minimum:
        raise ConfigError(f"{name}: must be >= {minimum}, got {value}")
    return value


class _Run:
    """Runs the phases of one row on one VM, recording each phase's deltas."""

    def __init__(self, vm: VM) -> None:
        self.vm = vm
        self.phases: list[PhaseResult] = []
        self.external_tables = 0
        self.name = ""
        self.before = vm.stats
        self.start = time.perf_counter()

    def begin(self, name: str, start: float | None = None) -> None:
        self.name = name
        self.before = self.vm.stats
        self.start = time.perf_counter() if start is None else start

    def end(self, fault_ns: float = 0.0, failed: bool = False) -> None:
        wall = time.perf_counter() - self.start
        after = self.vm.stats
        delta = after - self.before
        self.external_tables = max(self.external_tables, int(after["sept_tables"]))
        self.phases.append(
            PhaseResult(
                name=f"{self.name} (failed)" if failed else self.name,
                wall_s=wall,
                modeled_ns=float(delta["modeled_ns"]),
                fault_modeled_ns=fault_ns,
                stats=delta,
            )
        )


def run_pair(label: str, design: str, params: CompareParams) -> CompareRow:
    """Run the workload of ``params`` on one pair; the engine's verdict becomes the row's."""
    if (label, design) not in PAIRS:
        raise ConfigError(
            f"{label}/{design} is not a valid pair; valid: "
            + ", ".join(f"{t}/{d}" for t, d in PAIRS)
        )
    vm_type, mirror = VM_TYPES[label]
    uses_tdx_module = vm_type == "tdx" or mirror
    row_start = time.perf_counter()
    vm = VM(
        vm_type=vm_type,
        memory=params.memory,
        vcpus=params.vcpus,
        levels=params.levels,
        hooks=design,
        costs=params.costs,
        seed=params.seed,
        mirror=mirror,
        tdx=params.tdx if uses_tdx_module and params.tdx else None,
    )
    run = _Run(vm)
    notes: list[str] = []
    error: str | None = None
    test_pages = params.test_pages
    pages_per_vcpu = params.bytes_per_vcpu // PAGE_SIZE
    dp = params.workload in ("demand-paging", "both")
    conv = params.workload in ("conversions", "both")
    try:
        # 1. setup: initial image after the test region, then a TD becomes runnable.
        run.begin("setup", start=row_start)
        if params.image_pages:
            vm.populate(test_pages, params.image_pages)
        if vm_type == "tdx":
            vm.finalize()
        run.end()

        # 2. demand paging: the selftest's guest, vCPUs as real threads.
        if dp:
            run.begin("demand-paging")
            per_vcpu = vm.run_memstress(
                params.vcpus, pages_per_vcpu, 0, False, False, 100, params.seed
            )
            run.end(fault_ns=sum(float(d["modeled_ns"]) for d in per_vcpu))

        # 3. conversions (confidential VMs only).
        if conv and vm_type == "default":
            notes.append("conversions: not applicable, a default VM has no private memory")
        elif conv:
            run.begin("conversions")
            res = private_mem_conversions(
                vm,
                params.conversions,
                params.chunk_pages,
                region_pages=test_pages,
                touch_first=not dp,
                vcpus=params.vcpus,
            )
            run.end(fault_ns=res.fault_modeled_ns)
            if res.unexpected:
                bad = ", ".join(f"{n} x{c}" for n, c in sorted(res.unexpected.items()))
                error = f"conversions: unexpected results {bad}"

        # 4. correctness after the workload, then teardown and what it left behind.
        run.name = "check"
        try:
            vm.check()
        except InvariantError as e:
            error = error or f"check: {e}"
        if params.teardown:
            run.begin("teardown")
            vm.destroy()
            run.end()
            left = vm.stats
            leftovers = [
                f"{n} {what}"
                for n, what in (
                    (int(left["sept_tables"]), "S-EPT/external tables never freed"),
                    (int(left["external_spt_leaked"]), "external tables leaked"),
                    (int(left["page_table_bytes"]) // _TABLE_BYTES, "KVM page tables left"),
                )
                if n
            ]
            if leftovers:
                error = error or "teardown: " + ", ".join(leftovers)
    except (VmBugged, InvariantError, OutOfMemory) as e:
        # The design broke mid-run: that is the row's result, with the counts up to here.
        error = f"{run.name}: {type(e).__name__}: {e}"
        run.end(failed=True)
    wall_s = time.perf_counter() - row_start
    stats = vm.stats
    rmp_bytes = RMP_ENTRY_BYTES * (params.memory // PAGE_SIZE) if vm_type == "snp" else 0
    return CompareRow(
        vm_type=label,
        design=design,
        faults=int(stats["pf_taken"]),
        hook_calls=int(sum(stats[k] for k in HOOK_COUNTERS)),
        seamcalls=_seamcalls(stats),
        rmpupdate=int(stats["rmpupdate"]),
        psmash=int(stats["psmash"]),
        pvalidate=int(stats["pvalidate"]),
        fault_modeled_ns=sum(p.fault_modeled_ns for p in run.phases),
        modeled_ns=float(stats["modeled_ns"]),
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


def compare(
    workload: Workload = "both",
    vcpus: int = 4,
    bytes_per_vcpu: str | int = "1G",
    conversions: int = 512,
    chunk_pages: int = 16,
    types: Iterable[str] | None = None,
    designs: Iterable[str] | None = None,
    costs: CostModel | Mapping[str, float] | None = None,
    tdx: Mapping[str, object] | None = None,
    levels: int = 4,
    seed: int = 0,
    image_pages: int = 256,
    teardown: bool = True,
) -> CompareResult:
    """Run ``workload`` on every valid (VM type x hook design) pair that passes the filters.

    See the module docstring for the phases. ``types`` filters by VM type label or engine type,
    ``designs`` by design name; ``tdx`` options go to the TDX module model behind the tdx and
    sw_protected+mirror rows. Bad parameters raise ``ConfigError`` before any pair runs.
    """
    if workload not in WORKLOADS:
        raise ConfigError(f"workload: {workload!r} is not one of {', '.join(WORKLOADS)}")
    _positive("vcpus", vcpus)
    per_vcpu = parse_size(bytes_per_vcpu, "bytes_per_vcpu")
    if per_vcpu == 0 or per_vcpu % PAGE_SIZE:
        raise ConfigError(
            f"bytes_per_vcpu: must be a positive multiple of 4 KiB, got {bytes_per_vcpu!r}"
        )
    conv = workload in ("conversions", "both")
    _positive("conversions", conversions, 1 if conv else 0)
    _positive("chunk_pages", chunk_pages)
    _positive("image_pages", image_pages, 0)
    test_pages = vcpus * per_vcpu // PAGE_SIZE
    if conv and test_pages // conversions < chunk_pages:
        raise ConfigError(
            f"conversions x chunk_pages = {conversions} x {chunk_pages} pages does not fit in "
            f"the {test_pages}-page test region without overlap; use fewer or smaller chunks"
        )
    if costs is None:
        model = CostModel()
    elif isinstance(costs, CostModel):
        model = costs
    else:
        model = CostModel().replace(**costs)
    tdx_opts = {
        str(k): ("true" if v else "false") if isinstance(v, bool) else str(v)
        for k, v in (tdx or {}).items()
    }
    params = CompareParams(
        workload=workload,
        vcpus=vcpus,
        bytes_per_vcpu=per_vcpu,
        conversions=conversions if conv else 0,
        chunk_pages=chunk_pages,
        image_pages=image_pages,
        levels=levels,
        seed=seed,
        teardown=teardown,
        costs=model,
        tdx=tdx_opts,
    )
    pairs = select_pairs(types, designs)
    return CompareResult(params=params, rows=tuple(run_pair(t, d, params) for t, d in pairs))


# ----- text rendering (the CLI's default output) ---------------------------------------------

_MIB = 1 << 20


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def _fmt_float(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


#: (header line 1, header line 2, right-aligned, cell) of the main table.
_COLUMNS: Final[tuple[tuple[str, str, bool, Any], ...]] = (
    ("vm type", "", False, lambda r: r.vm_type),
    ("design", "", False, lambda r: r.design),
    ("faults", "pf_taken", True, lambda r: _fmt_int(r.faults)),
    ("hook", "calls", True, lambda r: _fmt_int(r.hook_calls)),
    ("SEAMCALLs", "TDH.*", True, lambda r: _fmt_int(r.seamcalls)),
    ("RMPUPDATE", "", True, lambda r: _fmt_int(r.rmpupdate)),
    ("PSMASH", "", True, lambda r: _fmt_int(r.psmash)),
    ("PVALIDATE", "", True, lambda r: _fmt_int(r.pvalidate)),
    (
        "per fault",
        "µs modeled",
        True,
        lambda r: _fmt_float(
            None if r.modeled_ns_per_fault is None else r.modeled_ns_per_fault / 1e3, 2
        ),
    ),
    ("total", "ms modeled", True, lambda r: _fmt_float(r.modeled_ns / 1e6, 1)),
    ("PT memory", "MiB", True, lambda r: _fmt_float(r.memory_bytes / _MIB, 2)),
    ("host wall", "s", True, lambda r: _fmt_float(r.wall_s, 3)),
    ("check", "", False, lambda r: r.check),
)

_PHASES: Final[tuple[str, ...]] = ("setup", "demand-paging", "conversions", "teardown")


def _table(headers: Sequence[tuple[str, str, bool]], cells: Sequence[Sequence[str]]) -> list[str]:
    widths = [
        max([len(h1), len(h2), *(len(row[i]) for row in cells)])
        for i, (h1, h2, _) in enumerate(headers)
    ]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if right else v.ljust(w)
            for v, w, (_, _, right) in zip(values, widths, headers, strict=True)
        ]
        return "  ".join(parts).rstrip()

    out = [line([h[0] for h in headers])]
    if any(h[1] for h in headers):
        out.append(line([h[1] for h in headers]))
    out.append("  ".join("-" * w for w in widths))
    out.extend(line(row) for row in cells)
    return out


def describe_workload(p: CompareParams) -> str:
    """One line saying what every pair ran."""
    parts = []
    if p.workload in ("demand-paging", "both"):
        parts.append(
            f"demand paging ({p.vcpus} vCPUs x {format_size(p.bytes_per_vcpu)}, every vCPU "
            "writes each page of its slice once)"
        )
    if p.workload in ("conversions", "both"):
        parts.append(
            f"{p.conversions} private->shared->private conversions of {p.chunk_pages} pages "
            "each (private_mem_conversions_test)"
        )
    return (
        " then ".join(parts)
        + f"; {p.image_pages}-page initial image; teardown: {'yes' if p.teardown else 'no'}; "
        f"{p.levels}-level TDP; seed {p.seed}"
    )


def format_text(result: CompareResult) -> str:
    """The human-readable report: the main table, modeled time by phase, and the legend."""
    p = result.params
    lines: list[str] = []
    for text in (
        f"SIMULATED by tdpmmu {__version__}: one workload on every valid (VM type x hook "
        "design) pair of a user-space model of KVM's x86 TDP MMU, not on real VMs.",
        f"workload: {describe_workload(p)}",
        "Clocks: 'modeled' = time the cost model assigns to the simulated system; "
        "'host wall' = time this simulator took on this machine.",
    ):
        lines += textwrap.wrap(text, width=100, subsequent_indent="  ")
    lines.append("")
    headers = [(h1, h2, right) for h1, h2, right, _ in _COLUMNS]
    cells = [[cell(r) for *_, cell in _COLUMNS] for r in result.rows]
    lines += _table(headers, cells)

    lines += ["", "Modeled time by phase (ms, modeled):"]
    phases = [
        ph for ph in _PHASES if any(x.name.startswith(ph) for r in result.rows for x in r.phases)
    ]
    ph_headers = [("vm type", "", False), ("design", "", False)] + [(ph, "", True) for ph in phases]
    ph_cells = []
    for r in result.rows:
        by_name = {x.name.removesuffix(" (failed)"): x for x in r.phases}
        ph_cells.append(
            [r.vm_type, r.design]
            + [
                _fmt_float(by_name[ph].modeled_ns / 1e6, 1) if ph in by_name else "-"
                for ph in phases
            ]
        )
    lines += _table(ph_headers, ph_cells)

    notes = [f"{r.vm_type}/{r.design}: {n}" for r in result.rows for n in r.notes]
    legend = [
        "faults: KVM's pf_taken, all phases. hook calls: link/set/remove/free_external_spt. "
        "SEAMCALLs: host TDH.* calls (not the guest's TDG.MEM.PAGE.ACCEPT).",
        "per fault: modeled time of the faults / faults. total: all modeled work summed over "
        "vCPUs and host operations, each conversion request charged psc_exit_ns + "
        "gmem_convert_ns.",
        "PT memory: KVM page tables at peak + S-EPT/external tables held + SNP RMP entries "
        f"({RMP_ENTRY_BYTES} B per guest_memfd page).",
        "check: VM.check() held after the workload and teardown left no table behind; a "
        "design that breaks is a result, not a crash.",
        *notes,
    ]
    lines.append("")
    for text in legend:
        lines += textwrap.wrap(text, width=100, subsequent_indent="  ")
    return "\n".join(lines)
