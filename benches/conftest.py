"""Shared fixtures for the benches and the end-of-session table of ns/fault and ratios.

Every bench records its per-unit cost into one session-wide ``Results`` object; the table printed
at the end of the run (``pytest_terminal_summary``) is computed only from numbers measured in that
same run, so the ratios compare engine, floor and reference on the same machine, same moment.
Targets from issue 3 are printed next to the measurements; nothing here asserts wall time.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field

import pytest

# --------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchSizes:
    """How much work each bench does; ``small`` under CI=true or --benchmark-disable."""

    small: bool
    #: gfns faulted per batch round (engine and floor); 2**20 = every 4K page of the 4 GiB guest.
    batch: int
    #: gfns faulted per round by the pure-Python reference model (and the engine on that sample).
    reference: int
    #: pages populated, then zapped, per zap round.
    zap: int
    #: rounds of the fresh-VM benches (pedantic; each round builds its own VM in setup).
    rounds: int
    #: rounds of the single vm.fault() on fresh gfns (one gfn per round).
    fresh_rounds: int
    #: pages converted per conversion round (TDX/SNP private<->shared, test_cvm_bench.py).
    convert: int

    @property
    def memory(self) -> int:
        """Guest size: 4 GiB in every mode (creating a VM is cheap; only the work shrinks)."""
        return 4 << 30


def _is_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _sizes(config: pytest.Config) -> BenchSizes:
    disabled = bool(config.getoption("benchmark_disable", default=False))
    if disabled or _is_ci():
        return BenchSizes(
            small=True,
            batch=1 << 16,
            reference=1 << 10,
            zap=1 << 16,
            rounds=3,
            fresh_rounds=1 << 10,
            convert=1 << 12,
        )
    return BenchSizes(
        small=False,
        batch=1 << 20,
        reference=1 << 14,
        zap=1 << 20,
        rounds=10,
        fresh_rounds=1 << 14,
        convert=1 << 18,
    )


#: Pages per conversion request in the conversion benches (test_cvm_bench.py): 16 is the compare
#: CLI's default chunk (private_mem_conversions_test's shape), 512 one 2M range.
CONVERT_CHUNKS = (16, 512)


@pytest.fixture(scope="session")
def sizes(pytestconfig: pytest.Config) -> BenchSizes:
    return _sizes(pytestconfig)


# --------------------------------------------------------------------------------------------
# Results collected during the run
# --------------------------------------------------------------------------------------------


@dataclass
class Measurement:
    """Per-unit cost in ns (``value``), how it was estimated, and the work size behind it."""

    value_ns: float
    estimator: str
    units: int
    rounds: int


@dataclass
class Results:
    measured: dict[str, Measurement] = field(default_factory=dict)
    sizes: BenchSizes | None = None

    def record(self, key: str, value_ns: float, estimator: str, units: int, rounds: int) -> None:
        self.measured[key] = Measurement(value_ns, estimator, units, rounds)


_RESULTS = Results()


@pytest.fixture(scope="session")
def results(sizes: BenchSizes) -> Results:
    _RESULTS.sizes = sizes
    return _RESULTS


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


def _log2(n: int) -> str:
    return f"2**{n.bit_length() - 1}" if n > 0 and n & (n - 1) == 0 else str(n)


@dataclass(frozen=True)
class Target:
    """One of issue 3's speed targets: printed beside the figures it applies to, never asserted
    (wall time on a shared machine is noisy). ``guards`` is what the target is for."""

    name: str
    bound: str
    guards: str


TARGETS = (
    Target(
        "engine/floor",
        "<= 4x seq, <= 2x random",
        "the MMU logic's overhead over a bare loop building the same tree",
    ),
    Target(
        "reference/engine", ">= 25x", "the native engine's speed-up over the pure-Python reference"
    ),
    Target("vm.fault()", "<= 1 us", "the per-call cost of one fault driven from Python"),
    Target(
        "private/default", "<= 3x", "what the TDX (mirror, S-EPT) / SNP (gmem, RMP) fault paths add"
    ),
    Target("virtual 256 vCPUs", ">= 5 M faults/s", "hundreds of simulated vCPUs on one host core"),
    Target("real threads 2/1", ">= 1.7x", "real vCPU threads scale on disjoint ranges"),
)

#: metric, measured, target (the target's bound, "" when the row has none).
Row = tuple[str, str, str]


def _missing(key: str) -> str:
    return f"n/a ({key} not run)"


def _ratio_row(res: Results, label: str, num: str, den: str, bound: str) -> Row:
    a, b = res.measured.get(num), res.measured.get(den)
    if a is None or b is None or b.value_ns <= 0:
        return (label, _missing(num if a is None else den), bound)
    return (label, f"{a.value_ns / b.value_ns:.2f}x", bound)


def _value_row(res: Results, label: str, key: str, scale: float, unit: str, bound: str = "") -> Row:
    m = res.measured.get(key)
    if m is None:
        return (label, _missing(key), bound)
    return (label, f"{m.value_ns / scale:,.3f} {unit}", bound)


def _rate_row(res: Results, label: str, key: str) -> Row:
    """pages/s from a per-page ns figure (no issue target for conversion throughput)."""
    m = res.measured.get(key)
    if m is None:
        return (label, _missing(key), "")
    return (label, f"{1e3 / m.value_ns:,.3f} Mpages/s ({m.value_ns:,.1f} ns/page)", "")


def _cvm_rows(res: Results, s: BenchSizes) -> list[Row]:
    """TDX/SNP private first touch against the default VM on the same gfns, and
    private<->shared conversion throughput (test_cvm_bench.py)."""
    rows: list[Row] = []
    for pattern in ("seq", "random"):
        for vm_type in ("tdx", "snp"):
            name = vm_type.upper()
            key = f"{vm_type}_{pattern}"
            rows.append(
                _value_row(
                    res, f"{name} private {pattern:<6} ns/fault ({_log2(s.batch)})", key, 1, "ns"
                )
            )
    for pattern in ("seq", "random"):
        for vm_type in ("tdx", "snp"):
            rows.append(
                _ratio_row(
                    res,
                    f"{vm_type.upper()} private/default {pattern} (same gfns)",
                    f"{vm_type}_{pattern}",
                    f"engine_{pattern}",
                    "<= 3x",
                )
            )
    arrows = {"to_shared": "private->shared", "to_private": "shared->private"}
    for vm_type in ("tdx", "snp"):
        for direction, arrow in arrows.items():
            for chunk in CONVERT_CHUNKS:
                rows.append(
                    _rate_row(
                        res,
                        f"{vm_type.upper()} {arrow} ({chunk}-page requests)",
                        f"convert_{vm_type}_{direction}_{chunk}",
                    )
                )
    return rows


def format_table(res: Results) -> list[str]:
    s = res.sizes
    if s is None or not res.measured:
        return []
    b, r = _log2(s.batch), _log2(s.reference)
    rows: list[Row] = [
        _value_row(res, f"engine  seq    ns/fault ({b})", "engine_seq", 1, "ns"),
        _value_row(res, f"floor   seq    ns/fault ({b})", "floor_seq", 1, "ns"),
        _value_row(res, f"engine  random ns/fault ({b})", "engine_random", 1, "ns"),
        _value_row(res, f"floor   random ns/fault ({b})", "floor_random", 1, "ns"),
        _value_row(res, f"reference seq    ns/fault ({r})", "reference_seq", 1, "ns"),
        _value_row(res, f"engine    seq    ns/fault ({r})", "sample_seq", 1, "ns"),
        _value_row(res, f"reference random ns/fault ({r})", "reference_random", 1, "ns"),
        _value_row(res, f"engine    random ns/fault ({r})", "sample_random", 1, "ns"),
        _ratio_row(res, "engine/floor seq", "engine_seq", "floor_seq", "<= 4x"),
        _ratio_row(res, "engine/floor random", "engine_random", "floor_random", "<= 2x"),
        _ratio_row(
            res, "reference/engine seq (same sample)", "reference_seq", "sample_seq", ">= 25x"
        ),
        _ratio_row(
            res,
            "reference/engine random (same sample)",
            "reference_random",
            "sample_random",
            ">= 25x",
        ),
        _ratio_row(
            res, "reference seq / engine seq (batch size)", "reference_seq", "engine_seq", ">= 25x"
        ),
        _value_row(
            res, "vm.fault() spurious (mapped gfn)", "single_spurious", 1000, "us", "<= 1 us"
        ),
        _value_row(res, "vm.fault() fresh gfn (FIXED)", "single_fresh", 1000, "us", "<= 1 us"),
        _value_row(res, f"zap_gfn_range ns/leaf ({_log2(s.zap)})", "zap", 1, "ns"),
    ]
    zap = res.measured.get("zap")
    if zap is not None:
        rows.append(
            (
                f"zap_gfn_range total ({_log2(zap.units)} leaves)",
                f"{zap.value_ns * zap.units / 1e6:,.3f} ms",
                "",
            )
        )
    rows += _cvm_rows(res, s)
    rows += [
        _value_row(res, f"dirty log: write-protect ns/SPTE ({b})", "dirty_wrprot", 1, "ns"),
        _value_row(res, f"dirty log: re-dirty fast-path ns/fault ({b})", "dirty_redirty", 1, "ns"),
        _value_row(res, f"dirty log: GET+CLEAR ns/page ({b})", "dirty_get_clear", 1, "ns"),
        _ratio_row(
            res, "re-dirty fast fault / first-touch fault", "dirty_redirty", "engine_seq", ""
        ),
        _rate_row(res, "virtual time, 256 vCPUs: simulated faults per host s", "virtual_256"),
        _rate_row(res, "virtual time, 1 vCPU: simulated faults per host s", "virtual_1"),
        _ratio_row(
            res, "virtual 256 vCPUs / engine seq (ns per fault)", "virtual_256", "engine_seq", ""
        ),
        _ratio_row(
            res,
            "real threads: 1 thread / 2 threads (ns per fault)",
            "threads_1",
            "threads_2",
            ">= 1.7x",
        ),
    ]
    heads = ("metric", "measured", "target")
    widths = [max(len(row[i]) for row in [heads, *rows]) for i in range(3)]

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()

    mode = "small (CI=true or --benchmark-disable)" if s.small else "full"
    out = [
        f"tdpmmu benches: one run on {platform.machine()} / {platform.python_implementation()} "
        f"{platform.python_version()}, sizes: {mode}",
        "batch: min over rounds of (round time / faults); single vm.fault(): median per call;",
        "floor: its own loop timer (native_floor).",
        f"TDX/SNP: runnable 4 GiB guests, private 4K; conversions: {_log2(s.convert)} pages "
        "per round, one way.",
        *(
            ["small mode: one cold call per bench when disabled; figures are indicative only."]
            if s.small
            else []
        ),
        line(heads),
        line(tuple("-" * w for w in widths)),
    ]
    out += [line(row) for row in rows]
    name_w = max(len(f"{t.name} {t.bound}") for t in TARGETS)
    out += [
        "",
        "targets (issue 3; informative, never asserted) and what each guards:",
        *(f"  {f'{t.name} {t.bound}':<{name_w}}  {t.guards}" for t in TARGETS),
    ]
    return out


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = format_table(_RESULTS)
    if not lines:
        return
    terminalreporter.write_sep("=", "tdpmmu speed (ratios from this run)")
    for text in lines:
        terminalreporter.write_line(text)
