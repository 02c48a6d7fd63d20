"""Host mm operations on memslots (``VM.madvise_dontneed``, ``VM.mprotect``) and the
``memslot_perf`` workload (``memslot_perf_test``): tests, checks, labels, flags."""

import argparse
import re

import numpy as np
import pytest

import tdpmmu
from tdpmmu import Ret, spte
from tdpmmu.workloads import WORKLOADS

TIME = re.compile(r"\d+\.\d{9}s")


def parse(name: str, argv: list[str]) -> dict[str, object]:
    wl = WORKLOADS[name]
    p = argparse.ArgumentParser(exit_on_error=False)
    wl.add_arguments(p)
    return wl.from_args(p.parse_args(argv))


def refused(name: str, argv: list[str]) -> None:
    wl = WORKLOADS[name]
    p = argparse.ArgumentParser()
    wl.add_arguments(p)
    with pytest.raises(SystemExit) as e:
        p.parse_args(argv)
    assert e.value.code == 2


# ----- VM.madvise_dontneed ----------------------------------------------------------------------


def test_madvise_dontneed_zaps_and_the_retouch_allocates_again() -> None:
    vm = tdpmmu.VM(memory="4M")
    vm.access_batch(np.arange(8, dtype=np.uint64), write=True)
    assert vm.stats["host_pages_allocated"] == 8
    assert vm.madvise_dontneed(0, 4) == 4
    assert not spte.is_shadow_present(vm.spte(0))
    assert spte.is_shadow_present(vm.spte(4))
    alloc0 = vm.cost_breakdown()["host_page_alloc_ns"]
    r = vm.access_batch(np.arange(8, dtype=np.uint64), write=True)
    assert r["faults"] == 4
    assert vm.stats["host_pages_allocated"] == 12, "freed pages are allocated again"
    assert vm.cost_breakdown()["host_page_alloc_ns"] == alloc0 + 4 * vm.costs.host_page_alloc_ns
    # mmu_notifier_invalidate alone frees nothing: the re-touch does not allocate.
    vm.mmu_notifier_invalidate(0, 8)
    vm.access_batch(np.arange(8, dtype=np.uint64), write=True)
    assert vm.stats["host_pages_allocated"] == 12
    vm.check()


def test_madvise_dontneed_refusals_leave_the_vm_unchanged() -> None:
    vm = tdpmmu.VM(memory="4M", backing="2M")
    vm.fault(0, write=True)
    with pytest.raises(tdpmmu.ConfigError, match="backing page"):
        vm.madvise_dontneed(0, 1)
    with pytest.raises(tdpmmu.ConfigError, match="not in any memslot"):
        vm.madvise_dontneed(1024, 512)
    assert spte.is_shadow_present(vm.spte(0))
    g = tdpmmu.VM(vm_type="sw_protected", memory="4M")
    with pytest.raises(tdpmmu.ConfigError, match="guest_memfd"):
        g.madvise_dontneed(0, 1)


# ----- VM.mprotect ------------------------------------------------------------------------------


def test_mprotect_read_only_write_is_a_memory_fault_read_maps_read_only() -> None:
    vm = tdpmmu.VM(memory="4M")
    vm.access_batch(np.arange(4, dtype=np.uint64), write=True)
    assert vm.mprotect(0, 2, writable=False) == 2
    r = vm.fault(0, write=True)
    assert r.ret == Ret.MEMORY_FAULT
    assert not spte.is_shadow_present(vm.spte(0))
    assert vm.fault(1, write=False).ret == Ret.FIXED
    f = spte.decode(vm.spte(1))
    assert not f["writable"] and not f["host_writable"] and not f["mmu_writable"]
    assert vm.fault(1, write=True).ret == Ret.MEMORY_FAULT
    assert vm.stats["pf_memory_fault"] == 2
    assert vm.fault(2, write=True).ret == Ret.SPURIOUS, "outside the range: untouched"
    vm.mprotect(0, 2, writable=True)
    assert vm.fault(0, write=True).ret == Ret.FIXED
    assert spte.decode(vm.spte(0))["writable"]
    vm.check()
