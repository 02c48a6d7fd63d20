"""Speed of the virtual-time engine and of real vCPU threads (printed, never asserted).

- ``test_virtual_256_vcpus``: simulated first-touch faults per host second with 256 vCPUs in
  virtual time on one host thread (target >= 5 M/s), and with 1 vCPU, in the same run.
- ``test_real_threads``: ``run_memstress`` on disjoint ranges with one and with two real threads
  (target: two >= 1.7x one), timed around the native call.
Each asserts the work it did (every page fixed once), so a bench that stops doing it fails.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import pytest

from tdpmmu import VM

if TYPE_CHECKING:
    from conftest import BenchSizes, Results
    from pytest_benchmark.fixture import BenchmarkFixture

from test_fault_bench import record_batch, run_rounds


@pytest.mark.parametrize("vcpus", [1, 256])
def test_virtual_vcpus(
    benchmark: BenchmarkFixture, results: Results, sizes: BenchSizes, vcpus: int
) -> None:
    """run_virtual: `vcpus` simulated vCPUs, first touch of 2**20 pages in all (2**16 small)."""
    benchmark.group = "virtual time"
    total = sizes.batch
    per = total // vcpus
    last: dict[str, Any] = {}

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (VM(memory=sizes.memory, vcpus=vcpus),), {}

    def timed(vm: VM) -> float:
        t0 = time.perf_counter()
        r = vm.run_virtual(vcpus, per, 0, False, False, 100, 0)
        dt = time.perf_counter() - t0
        last["r"] = r
        return dt

    samples = run_rounds(benchmark, setup, timed, max(1, sizes.rounds // 3))
    r = last["r"]
    assert sum(v["fixed"] for v in r["vcpus"]) == per * vcpus
    faults = sum(v["faults"] for v in r["vcpus"])
    benchmark.extra_info["switches_per_fault"] = r["switches"] / faults
    record_batch(benchmark, results, f"virtual_{vcpus}", samples, faults)


@pytest.mark.parametrize("threads", [1, 2])
def test_real_threads(
    benchmark: BenchmarkFixture, results: Results, sizes: BenchSizes, threads: int
) -> None:
    """run_memstress: `threads` real vCPU threads, each on its own 2**19 pages (2**15 small)."""
    benchmark.group = "real threads"
    per = sizes.batch // 2
    last: dict[str, Any] = {}

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (VM(memory=sizes.memory, vcpus=2),), {}

    def timed(vm: VM) -> float:
        t0 = time.perf_counter()
        recs = vm.run_memstress(threads, per, 0, False, False, 100, 0)
        dt = time.perf_counter() - t0
        last["recs"], last["vm"] = recs, vm
        return dt

    samples = run_rounds(benchmark, setup, timed, sizes.rounds)
    assert last["vm"].stats["pf_fixed"] == per * threads
    # Per-thread-page time: one thread's pages per second is the figure the ratio compares.
    record_batch(benchmark, results, f"threads_{threads}", samples, per * threads)
