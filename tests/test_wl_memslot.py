"""Host mm operations on memslots (``VM.madvise_dontneed``, ``VM.mprotect``) and the
``memslot_perf`` workload (``memslot_perf_test``): tests, checks, labels, flags."""

import argparse
import re

import numpy as np
import pytest

import tdpmmu
from tdpmmu import Ret, spte
from tdpmmu.workloads import WORKLOADS, WorkloadResult

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


# ----- memslot_perf -----------------------------------------------------------------------------


@pytest.mark.parametrize("vm_type", ["default", "sw_protected", "snp"])
def test_memslot_perf_all_tests_lines_and_checks(vm_type: str) -> None:
    from tdpmmu.workloads.memslot_perf import TESTS, memslot_perf

    r = memslot_perf(
        slots=16, seconds=0.002, scale=32, verify=True, max_iterations=20, vm_type=vm_type
    )
    for name in TESTS:
        assert f"Testing {name} performance with 1 runs, 0.002 seconds each" in r.lines
    took = [ln for ln in r.lines if ln.startswith("Test took ")]
    assert len(took) == 6 and all(len(TIME.findall(ln)) == 2 for ln in took)
    # Without the quirk (never applied off default VMs) moving the slot away from the inactive
    # area zaps nothing mapped: 0 modeled s per loop, and like the selftest no "Best" line.
    best = sum(ln.startswith("Best runtime result was ") for ln in r.lines)
    assert best == (6 if vm_type == "default" else 5)
    checks = r.detail["checks"]
    for label in ("map_retouch_allocates", "move_active_mmio", "move_back_rebuilt"):
        assert checks[label]["ok"]
    assert r.metrics["map_best_s_per_iteration"] > 0
    assert r.detail["runs"][1]["capped"], "unmap's loops are cheap: the cap ends the run"
    assert WorkloadResult.from_json(r.to_json()) == r


def test_memslot_perf_quirk_off_keeps_the_inactive_area_mapped() -> None:
    from tdpmmu.workloads.memslot_perf import memslot_perf

    on = memslot_perf(first_test=4, last_test=4, slots=8, seconds=1, scale=32, max_iterations=5)
    off = memslot_perf(
        first_test=4,
        last_test=4,
        slots=8,
        seconds=1,
        scale=32,
        max_iterations=5,
        disable_slot_zap_all=True,
    )
    assert off.detail["checks"]["move_inactive_kept"]["ok"]
    # With the quirk the fast zap drops the inactive area too: the guest faults it back.
    assert on.stats["pf_taken"] > off.stats["pf_taken"]


def test_memslot_perf_zero_seconds_and_too_many_slots() -> None:
    from tdpmmu.workloads.memslot_perf import memslot_perf

    r = memslot_perf(first_test=0, last_test=0, seconds=0, scale=32, slots=8)
    assert "No full loops done - too short test time or system too loaded?" in r.lines
    r = memslot_perf(first_test=0, last_test=0, seconds=1, scale=32, slots=1000)
    assert any(ln.startswith("Memslot count too high for this test") for ln in r.lines)


def test_memslot_perf_flags_and_refusals() -> None:
    from tdpmmu.workloads.memslot_perf import memslot_perf

    kw = parse("memslot_perf", ["-v", "-d", "-q", "-s", "10", "-f", "1", "-e", "2", "-l", "3"])
    assert kw["verbose"] and kw["verify"] and kw["disable_slot_zap_all"]
    assert (kw["slots"], kw["first_test"], kw["last_test"], kw["seconds"]) == (10, 1, 2, 3.0)
    assert parse("memslot_perf", ["-s", "-1", "-r", "2", "--scale", "8"])["slots"] == -1
    refused("memslot_perf", ["-s", "0"])
    refused("memslot_perf", ["-e", "6"])
    refused("memslot_perf", ["-l", "-1"])
    refused("memslot_perf", ["-r", "0"])
    with pytest.raises(tdpmmu.ConfigError, match="vm_type"):
        memslot_perf(vm_type="tdx", scale=32)
    with pytest.raises(tdpmmu.ConfigError, match="first_test"):
        memslot_perf(first_test=3, last_test=2)
    with pytest.raises(tdpmmu.ConfigError, match="scale"):
        memslot_perf(scale=3)
