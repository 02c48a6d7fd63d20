"""Speed benches (issue 3 item 8): first-touch faults, the native floor, the reference model,
single ``vm.fault()`` calls from Python, and a 1M-leaf range zap.

Each bench records its per-unit cost in the session ``results``; ``conftest.py`` prints the
table of ns/fault and the ratios (engine/floor, reference/engine) computed from this one run,
with issue 3's targets beside them. Wall-time thresholds are never asserted; only the work is
(every first touch is FIXED, engine and floor build exactly the tables a 4-level tree over the
gfns needs, the zap removes every leaf).

Run: ``pytest benches --benchmark-only -s``; smoke: ``pytest benches --benchmark-disable``.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pytest

from tdpmmu import VM, _core
from tdpmmu.reference import ReferenceVM

if TYPE_CHECKING:
    from conftest import BenchSizes, Results
    from pytest_benchmark.fixture import BenchmarkFixture

U64Array = npt.NDArray[np.uint64]

FIXED = 5  # Ret.FIXED (KVM's RET_PF_FIXED)
SPURIOUS = 6  # Ret.SPURIOUS
SEED = 0x7D9  # the random pattern's permutation seed
PATTERNS = ("seq", "random")


def make_vm(memory: int) -> VM:
    """A default VM (4 levels, 4K backing, 1 vCPU) of ``memory`` bytes."""
    return VM(vm_type="default", memory=memory)


def native_floor(gfns: U64Array) -> tuple[float, int]:
    """The native floor on ``gfns`` (4 levels): (seconds of its own loop timer, tables allocated,
    root included). The one call site of the extension's floor, so a rename is one line here."""
    secs, tables = _core.native_floor(gfns, 4)
    return float(secs), int(tables)


def tables_for(gfns: U64Array, levels: int = 4) -> int:
    """Tables a ``levels``-level tree needs to map every gfn at 4K, root included, computed from
    the gfns alone: one table per distinct ``gfn >> 9*k`` at each level below the root
    (k = 1 for the leaf tables, ...), plus the root."""
    g = np.asarray(gfns, dtype=np.uint64)
    return 1 + sum(len(np.unique(g >> np.uint64(9 * k))) for k in range(1, levels))


def make_pattern(pattern: str, n: int) -> U64Array:
    """``seq``: gfns 0..n-1 in order; ``random``: a seeded permutation of the same gfns."""
    gfns = np.arange(n, dtype=np.uint64)
    if pattern == "random":
        gfns = np.random.default_rng(SEED).permutation(gfns)
    return np.ascontiguousarray(gfns, dtype=np.uint64)


@pytest.fixture(scope="module")
def batch_gfns(sizes: BenchSizes) -> dict[str, U64Array]:
    """The arrays both the engine and the floor fault (the exact same objects)."""
    return {p: make_pattern(p, sizes.batch) for p in PATTERNS}


@pytest.fixture(scope="module")
def sample_gfns(sizes: BenchSizes) -> dict[str, U64Array]:
    """The smaller arrays both the reference model and the engine fault."""
    return {p: make_pattern(p, sizes.reference) for p in PATTERNS}


def _warmup(benchmark: BenchmarkFixture) -> int:
    return 0 if benchmark.disabled else 1


def run_rounds(
    benchmark: BenchmarkFixture,
    setup: Callable[[], tuple[tuple[Any, ...], dict[str, Any]]],
    timed: Callable[..., float],
    rounds: int,
) -> list[float]:
    """pedantic() with a fresh setup per round; returns ``timed``'s own seconds per round
    (warmup dropped). ``timed`` returns the seconds it measured around the work itself."""
    samples: list[float] = []
    warmup = _warmup(benchmark)

    def target(*args: Any, **kwargs: Any) -> None:
        samples.append(timed(*args, **kwargs))

    benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=warmup)
    return samples[warmup:] or samples


def record_batch(
    benchmark: BenchmarkFixture, results: Results, key: str, samples: list[float], units: int
) -> float:
    ns = min(samples) / units * 1e9
    results.record(key, ns, "min round / units", units, len(samples))
    benchmark.extra_info["ns_per_unit"] = ns
    benchmark.extra_info["units"] = units
    return ns


# --------------------------------------------------------------------------------------------
# First-touch 4K faults: engine (fault_batch) and the native floor on the same arrays
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", PATTERNS)
def test_engine_first_touch(
    benchmark: BenchmarkFixture,
    results: Results,
    sizes: BenchSizes,
    batch_gfns: dict[str, U64Array],
    pattern: str,
) -> None:
    """fault_batch over every gfn once, on a fresh 4 GiB default VM each round."""
    benchmark.group = f"first-touch {pattern}"
    gfns = batch_gfns[pattern]
    last: dict[str, Any] = {}

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (make_vm(sizes.memory), gfns), {}

    def timed(vm: Any, g: U64Array) -> float:
        t0 = time.perf_counter()
        rets = vm.fault_batch(g)
        dt = time.perf_counter() - t0
        last["rets"], last["vm"] = rets, vm
        return dt

    samples = run_rounds(benchmark, setup, timed, sizes.rounds)
    rets = last["rets"]
    assert len(rets) == len(gfns)
    assert int(np.count_nonzero(rets == FIXED)) == len(gfns), np.unique(rets, return_counts=True)
    stats = last["vm"].stats_dict()
    assert stats["pages_4k"] == len(gfns)
    # The engine built the tree the floor builds: KVM's tdp_mmu_pages counts every table but
    # the root.
    assert stats["tdp_mmu_pages"] == tables_for(gfns) - 1, stats["tdp_mmu_pages"]
    benchmark.extra_info["tdp_mmu_pages"] = stats["tdp_mmu_pages"]
    record_batch(benchmark, results, f"engine_{pattern}", samples, len(gfns))


@pytest.mark.parametrize("pattern", PATTERNS)
def test_native_floor(
    benchmark: BenchmarkFixture,
    results: Results,
    sizes: BenchSizes,
    batch_gfns: dict[str, U64Array],
    pattern: str,
) -> None:
    """The bare walk/alloc/cmpxchg loop on the same arrays; timed by its own loop timer.

    Checks its work: every round allocates exactly the tables a 4-level tree over these gfns
    needs (counted from the gfns alone) and reports a positive loop time."""
    benchmark.group = f"first-touch {pattern}"
    gfns = batch_gfns[pattern]
    tables: list[int] = []

    def timed(g: U64Array) -> float:
        secs, n_tables = native_floor(g)
        tables.append(n_tables)
        return secs

    samples = run_rounds(benchmark, lambda: ((gfns,), {}), timed, sizes.rounds)
    want = tables_for(gfns)
    assert tables and all(t == want for t in tables), (want, tables)
    assert all(s > 0 for s in samples), samples
    benchmark.extra_info["tables"] = want
    record_batch(benchmark, results, f"floor_{pattern}", samples, len(gfns))


# --------------------------------------------------------------------------------------------
# The pure-Python reference model, and the engine on the very same (smaller) sample
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", PATTERNS)
def test_reference_first_touch(
    benchmark: BenchmarkFixture,
    results: Results,
    sizes: BenchSizes,
    sample_gfns: dict[str, U64Array],
    pattern: str,
) -> None:
    """ReferenceVM.fault_batch over the sample, fresh reference VM each round."""
    benchmark.group = f"reference-sample {pattern}"
    gfns = sample_gfns[pattern]
    last: dict[str, Any] = {}

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (ReferenceVM(vm_type="default", memory=sizes.memory), gfns), {}

    def timed(rvm: Any, g: U64Array) -> float:
        t0 = time.perf_counter()
        rets = rvm.fault_batch(g)
        dt = time.perf_counter() - t0
        last["rets"] = rets
        return dt

    # The reference model is ~1000x slower: 3 rounds are plenty (and min over them is kept).
    samples = run_rounds(benchmark, setup, timed, 3)
    rets = [int(r) for r in last["rets"]]
    assert rets == [FIXED] * len(gfns)
    record_batch(benchmark, results, f"reference_{pattern}", samples, len(gfns))


@pytest.mark.parametrize("pattern", PATTERNS)
def test_engine_sample(
    benchmark: BenchmarkFixture,
    results: Results,
    sizes: BenchSizes,
    sample_gfns: dict[str, U64Array],
    pattern: str,
) -> None:
    """The engine on the reference's sample, so reference/engine compares identical work."""
    benchmark.group = f"reference-sample {pattern}"
    gfns = sample_gfns[pattern]
    last: dict[str, Any] = {}

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (make_vm(sizes.memory), gfns), {}

    def timed(vm: Any, g: U64Array) -> float:
        t0 = time.perf_counter()
        rets = vm.fault_batch(g)
        dt = time.perf_counter() - t0
        last["rets"] = rets
        return dt

    samples = run_rounds(benchmark, setup, timed, max(sizes.rounds, 20))
    assert int(np.count_nonzero(last["rets"] == FIXED)) == len(gfns)
    record_batch(benchmark, results, f"sample_{pattern}", samples, len(gfns))


# --------------------------------------------------------------------------------------------
# One vm.fault() call from Python
# --------------------------------------------------------------------------------------------


def _median_call_ns(fn: Callable[[int], Any], gfns: list[int]) -> float:
    """Fallback timing under --benchmark-disable: median of per-call perf_counter samples."""
    times = []
    for g in gfns:
        t0 = time.perf_counter()
        fn(g)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e9


def test_single_fault_spurious(
    benchmark: BenchmarkFixture, results: Results, sizes: BenchSizes
) -> None:
    """vm.fault() on an already-mapped gfn: the SPURIOUS path (walk, find the leaf, return)."""
    benchmark.group = "vm.fault() single call"
    vm = make_vm(sizes.memory)
    gfn = 0x1234
    assert int(vm.fault(gfn).ret) == FIXED
    fault = benchmark(vm.fault, gfn)
    assert int(fault.ret) == SPURIOUS
    if benchmark.stats is not None:
        ns = float(benchmark.stats.stats.median) * 1e9
        rounds = int(benchmark.stats.stats.rounds)
    else:
        ns = _median_call_ns(vm.fault, [gfn] * 1000)
        rounds = 1000
    benchmark.extra_info["ns_per_call"] = ns
    results.record("single_spurious", ns, "median per call", 1, rounds)


def test_single_fault_fresh(
    benchmark: BenchmarkFixture, results: Results, sizes: BenchSizes
) -> None:
    """vm.fault() on a gfn never touched before (FIXED): one sequential fresh gfn per round."""
    benchmark.group = "vm.fault() single call"
    vm = make_vm(sizes.memory)
    fresh = itertools.count(0)

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (next(fresh),), {}

    warmup = 0 if benchmark.disabled else 64
    benchmark.pedantic(vm.fault, setup=setup, rounds=sizes.fresh_rounds, warmup_rounds=warmup)
    if benchmark.stats is not None:
        ns = float(benchmark.stats.stats.median) * 1e9
        rounds = int(benchmark.stats.stats.rounds)
        touched = next(fresh)
    else:
        start = next(fresh)
        ns = _median_call_ns(vm.fault, list(range(start, start + sizes.fresh_rounds)))
        rounds = sizes.fresh_rounds
        touched = start + sizes.fresh_rounds
    stats = vm.stats_dict()
    assert stats["pf_fixed"] == touched == stats["pages_4k"]
    benchmark.extra_info["ns_per_call"] = ns
    results.record("single_fresh", ns, "median per call", 1, rounds)


# --------------------------------------------------------------------------------------------
# Range zap of 1M leaves
# --------------------------------------------------------------------------------------------


def test_zap_range(benchmark: BenchmarkFixture, results: Results, sizes: BenchSizes) -> None:
    """zap_gfn_range over 2**20 populated 4K leaves (populate in setup, untimed)."""
    benchmark.group = "zap_gfn_range"
    npages = sizes.zap
    zapped: list[int] = []

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        vm = make_vm(sizes.memory)
        assert vm.populate(0, npages) == npages
        return (vm,), {}

    def timed(vm: Any) -> float:
        t0 = time.perf_counter()
        n = vm.zap_gfn_range(0, npages)
        dt = time.perf_counter() - t0
        zapped.append(int(n))
        return dt

    samples = run_rounds(benchmark, setup, timed, sizes.rounds)
    assert zapped and all(z == npages for z in zapped), zapped
    record_batch(benchmark, results, "zap", samples, npages)
