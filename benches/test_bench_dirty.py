"""Dirty-logging speed beside the first-touch figures (printed, never asserted).

- ``test_write_protect``: ``set_dirty_logging(slot, True)`` over 2**20 mapped 4K pages (4 GiB;
  2**16 small): ns per SPTE write-protected.
- ``test_redirty_pass``: the guest writes every page once after that (each write exits and is
  fixed by the lockless fast path): ns per fault.
- ``test_get_clear_round``: ``get_dirty_log`` + ``clear_dirty_log`` over the whole slot with
  manual protection and every page dirty: ns per page.
Each asserts the work it did.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from tdpmmu import VM

if TYPE_CHECKING:
    from conftest import BenchSizes, Results
    from pytest_benchmark.fixture import BenchmarkFixture

from test_fault_bench import record_batch, run_rounds


def mapped_vm(pages: int) -> VM:
    vm = VM(memory=pages * 4096)
    assert vm.populate(0, pages) == pages
    return vm


def test_write_protect(benchmark: BenchmarkFixture, results: Results, sizes: BenchSizes) -> None:
    benchmark.group = "dirty logging"
    n = sizes.batch
    last: dict[str, Any] = {}

    def timed(vm: VM) -> float:
        t0 = time.perf_counter()
        last["changed"] = vm.set_dirty_logging(0, True)
        return time.perf_counter() - t0

    samples = run_rounds(benchmark, lambda: ((mapped_vm(n),), {}), timed, sizes.rounds)
    assert last["changed"] == n
    record_batch(benchmark, results, "dirty_wrprot", samples, n)


def test_redirty_pass(benchmark: BenchmarkFixture, results: Results, sizes: BenchSizes) -> None:
    benchmark.group = "dirty logging"
    n = sizes.batch
    last: dict[str, Any] = {}

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        vm = mapped_vm(n)
        vm.set_dirty_logging(0, True)
        return (vm,), {}

    def timed(vm: VM) -> float:
        t0 = time.perf_counter()
        vm.run_memstress(1, n, 0, False, False, 100, 0)
        dt = time.perf_counter() - t0
        last["vm"] = vm
        return dt

    samples = run_rounds(benchmark, setup, timed, sizes.rounds)
    assert last["vm"].stats["pf_fast"] == n
    record_batch(benchmark, results, "dirty_redirty", samples, n)


def test_get_clear_round(benchmark: BenchmarkFixture, results: Results, sizes: BenchSizes) -> None:
    benchmark.group = "dirty logging"
    n = sizes.batch
    last: dict[str, Any] = {}

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        vm = mapped_vm(n)
        vm.set_dirty_logging(0, True, manual_protect=True, initially_set=True)
        return (vm,), {}

    def timed(vm: VM) -> float:
        t0 = time.perf_counter()
        words = vm.get_dirty_log(0)
        changed = vm.clear_dirty_log(0, 0, n)
        dt = time.perf_counter() - t0
        last["words"], last["changed"] = words, changed
        return dt

    samples = run_rounds(benchmark, setup, timed, sizes.rounds)
    assert int(last["words"].sum() != 0) and last["changed"] == n
    record_batch(benchmark, results, "dirty_get_clear", samples, n)
