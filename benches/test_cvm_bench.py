"""Confidential-VM speed benches: TDX and SNP private 4K first-touch faults, and private<->shared
conversion throughput on a TD and on an SNP guest.

They run in the same pytest-benchmark session as ``test_fault_bench.py`` and record into the same
``results``, so the table printed at the end (``conftest.py``) shows TDX/default and SNP/default
computed from this one run: the default-VM figure is ``test_engine_first_touch`` on the very same
gfn arrays (same length, same seeded permutation). Wall-time targets are printed, never asserted;
the benches assert only that the work happened (every fault FIXED, one SEAMCALL / RMP operation
per page as the model prescribes).

Run: ``pytest benches --benchmark-only -s``; smoke: ``pytest benches --benchmark-disable``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from conftest import CONVERT_CHUNKS
from test_fault_bench import (
    FIXED,
    PATTERNS,
    U64Array,
    make_pattern,
    record_batch,
    run_rounds,
    tables_for,
)

from tdpmmu import VM

if TYPE_CHECKING:
    from conftest import BenchSizes, Results
    from pytest_benchmark.fixture import BenchmarkFixture

DIRECTIONS = ("to_shared", "to_private")


def make_cvm(vm_type: str, memory: int) -> VM:
    """A runnable confidential VM (4 levels, 4K backing, 1 vCPU, the type's default hooks):
    a TD is finalized (vCPUs may run only after TDH.MR.FINALIZE); an SNP guest needs nothing."""
    vm = VM(vm_type=vm_type, memory=memory)
    if vm_type == "tdx":
        vm.finalize()
    return vm


def counters(vm: Any, *names: str) -> dict[str, int]:
    s = vm.stats_dict()
    return {n: int(s[n]) for n in names}


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after}


# Counters each private first touch must move by exactly one per page.
FAULT_COUNTERS = {
    # mirror leaf + S-EPT leaf (TDH.MEM.PAGE.AUG) + the guest's TDG.MEM.PAGE.ACCEPT
    "tdx": ("pages_4k", "set_external_spte", "TDH.MEM.PAGE.AUG", "TDG.MEM.PAGE.ACCEPT"),
    # guest_memfd prepare (RMPUPDATE to private) + the guest's PVALIDATE
    "snp": ("pages_4k", "gmem_prepare", "rmpupdate", "pvalidate"),
}


# --------------------------------------------------------------------------------------------
# Private 4K first-touch faults (the default-VM figure is test_engine_first_touch's)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cvm_gfns(sizes: BenchSizes) -> dict[str, U64Array]:
    """Equal (same seed, same length) to test_fault_bench's batch arrays."""
    return {p: make_pattern(p, sizes.batch) for p in PATTERNS}


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("vm_type", ("tdx", "snp"))
def test_private_first_touch(
    benchmark: BenchmarkFixture,
    results: Results,
    sizes: BenchSizes,
    cvm_gfns: dict[str, U64Array],
    vm_type: str,
    pattern: str,
) -> None:
    """fault_batch(gfns, private=True) on a fresh runnable 4 GiB TD / SNP guest each round.

    TDX: mirror-root walk and install, S-EPT model (TDH.MEM.SEPT.ADD per new table, PAGE.AUG per
    leaf), the guest's ACCEPT, accounting. SNP: guest_memfd prepare, RMPUPDATE, PVALIDATE."""
    benchmark.group = f"first-touch {pattern}"
    gfns = cvm_gfns[pattern]
    last: dict[str, Any] = {}

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (make_cvm(vm_type, sizes.memory), gfns), {}

    def timed(vm: Any, g: U64Array) -> float:
        t0 = time.perf_counter()
        rets = vm.fault_batch(g, private=True)
        dt = time.perf_counter() - t0
        last["rets"], last["vm"] = rets, vm
        return dt

    samples = run_rounds(benchmark, setup, timed, sizes.rounds)
    rets = last["rets"]
    assert len(rets) == len(gfns)
    assert int(np.count_nonzero(rets == FIXED)) == len(gfns), np.unique(rets, return_counts=True)
    vm = last["vm"]
    got = counters(vm, *FAULT_COUNTERS[vm_type])
    assert got == dict.fromkeys(FAULT_COUNTERS[vm_type], len(gfns)), got
    stats = vm.stats_dict()
    # The private root's tree over these gfns: every table but the root (KVM's tdp_mmu_pages).
    below_root = tables_for(gfns) - 1
    assert stats["tdp_mmu_pages"] == below_root, (stats["tdp_mmu_pages"], below_root)
    if vm_type == "tdx":
        # One S-EPT table per mirror table below the root, each added by TDH.MEM.SEPT.ADD.
        assert stats["sept_tables"] == stats["TDH.MEM.SEPT.ADD"] == below_root, stats
        benchmark.extra_info["sept_tables"] = stats["sept_tables"]
    benchmark.extra_info["tdp_mmu_pages"] = stats["tdp_mmu_pages"]
    benchmark.extra_info["modeled_ns_per_fault"] = float(stats["modeled_ns"]) / len(gfns)
    record_batch(benchmark, results, f"{vm_type}_{pattern}", samples, len(gfns))


# --------------------------------------------------------------------------------------------
# Conversions: private->shared and shared->private, pages/s
# --------------------------------------------------------------------------------------------


def _to_shared(vm_type: str, chunk: int) -> Callable[[Any, list[tuple[int, U64Array]]], None]:
    """One conversion request per chunk, private -> shared.

    TDX: ``set_memory_attributes(private=False)`` zaps the mapped private leaves: per page
    remove_external_spte = TDH.MEM.RANGE.BLOCK, TDH.MEM.TRACK, vCPU kick, TDH.MEM.PAGE.REMOVE,
    TDH.PHYMEM.PAGE.WBINVD, page clear. SNP: the guest rescinds validation (PVALIDATE
    validate=0), userspace sets the attributes shared (NPT zap) and punches the guest_memfd hole
    (gmem invalidate: RMPUPDATE back to shared per page), as private_mem_conversions does.
    """
    if vm_type == "tdx":

        def run_tdx(vm: Any, work: list[tuple[int, U64Array]]) -> None:
            for gfn, _ in work:
                vm.set_memory_attributes(gfn, chunk, private=False)

        return run_tdx

    def run_snp(vm: Any, work: list[tuple[int, U64Array]]) -> None:
        for gfn, _ in work:
            vm.pvalidate(gfn, chunk, validate=False)
            vm.set_memory_attributes(gfn, chunk, private=False)
            vm.punch_hole(gfn, chunk)

    return run_snp


def _to_private(chunk: int) -> Callable[[Any, list[tuple[int, U64Array]]], None]:
    """One conversion request per chunk, shared -> private, then the guest touches the chunk as
    private: ``set_memory_attributes(private=True)`` + ``fault_batch(chunk, private=True)``.
    TDX: mirror install + TDH.MEM.PAGE.AUG + ACCEPT per page; SNP: gmem prepare + RMPUPDATE +
    PVALIDATE per page."""

    def run(vm: Any, work: list[tuple[int, U64Array]]) -> None:
        for gfn, g in work:
            vm.set_memory_attributes(gfn, chunk, private=True)
            vm.fault_batch(g, private=True)

    return run


# Counters a conversion must move by one per page (direction, vm_type).
CONVERT_COUNTERS = {
    ("to_shared", "tdx"): (
        "remove_external_spte",
        "TDH.MEM.RANGE.BLOCK",
        "TDH.MEM.TRACK",
        "TDH.MEM.PAGE.REMOVE",
        "TDH.PHYMEM.PAGE.WBINVD",
    ),
    ("to_shared", "snp"): ("rmpupdate", "pvalidate"),
    ("to_private", "tdx"): ("pf_fixed", "TDH.MEM.PAGE.AUG", "TDG.MEM.PAGE.ACCEPT"),
    ("to_private", "snp"): ("pf_fixed", "gmem_prepare", "rmpupdate", "pvalidate"),
}


@pytest.mark.parametrize("chunk", CONVERT_CHUNKS)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("vm_type", ("tdx", "snp"))
def test_conversion(
    benchmark: BenchmarkFixture,
    results: Results,
    sizes: BenchSizes,
    vm_type: str,
    direction: str,
    chunk: int,
) -> None:
    """Convert ``sizes.convert`` mapped pages in ``chunk``-page requests, one way per bench.

    Setup (untimed, fresh VM per round): fault every page private; for ``to_private`` also
    convert every page to shared first (same requests as ``to_shared``)."""
    benchmark.group = f"conversion {vm_type}"
    n = sizes.convert
    gfns = np.arange(n, dtype=np.uint64)
    work = [(b, gfns[b : b + chunk]) for b in range(0, n, chunk)]
    to_shared = _to_shared(vm_type, chunk)
    convert = to_shared if direction == "to_shared" else _to_private(chunk)
    names = CONVERT_COUNTERS[(direction, vm_type)]
    moved: list[dict[str, int]] = []
    last: dict[str, Any] = {}

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        vm = make_cvm(vm_type, sizes.memory)
        rets = vm.fault_batch(gfns, private=True)
        assert int(np.count_nonzero(rets == FIXED)) == n
        if direction == "to_private":
            to_shared(vm, work)
            assert int(vm.stats_dict()["pages_4k"]) == 0
        return (vm,), {}

    def timed(vm: Any) -> float:
        before = counters(vm, *names)
        t0 = time.perf_counter()
        convert(vm, work)
        dt = time.perf_counter() - t0
        moved.append(delta(counters(vm, *names), before))
        last["vm"] = vm
        return dt

    samples = run_rounds(benchmark, setup, timed, sizes.rounds)
    assert moved and all(m == dict.fromkeys(names, n) for m in moved), moved[-1]
    stats = last["vm"].stats_dict()
    assert int(stats["pages_4k"]) == (n if direction == "to_private" else 0)
    assert int(stats["pvalidate_errors"]) == 0
    benchmark.extra_info["chunk"] = chunk
    benchmark.extra_info["requests"] = len(work)
    ns = record_batch(benchmark, results, f"convert_{vm_type}_{direction}_{chunk}", samples, n)
    benchmark.extra_info["pages_per_s"] = 1e9 / ns
