"""Host mm operations on memslots (``VM.madvise_dontneed``, ``VM.mprotect``) and the
``memslot_perf`` workload (``memslot_perf_test``): tests, checks, labels, flags."""

import argparse
import re

import numpy as np
import pytest

import tdpmmu
from tdpmmu import Ret, spte
from tdpmmu.workloads import WORKLOADS, WorkloadResult
from tdpmmu.workloads.memslot_perf import memslot_perf

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


def checks_by_name(r: WorkloadResult) -> dict[str, bool]:
    """``detail["checks"]`` as {name: ok} (each name once: one run per test here)."""
    out: dict[str, bool] = {}
    for c in r.detail["checks"]:
        assert set(c) == {"name", "ok", "detail"}
        assert c["name"] not in out
        out[c["name"]] = c["ok"]
    return out


def test_madvise_dontneed_one_call_spans_several_memslots() -> None:
    # The memslot_perf area is one host mapping: one MADV_DONTNEED covers every slot piece a
    # chunk spans.
    vm = tdpmmu.VM(memory="2M")
    a = vm.add_memslot(1024, 4)
    b = vm.add_memslot(1028, 4)
    assert a != b
    vm.access_batch(np.arange(1024, 1032, dtype=np.uint64), write=True)
    alloc = vm.stats["host_pages_allocated"]
    assert vm.madvise_dontneed(1026, 4) == 4
    assert [spte.is_shadow_present(vm.spte(g)) for g in range(1024, 1032)] == [
        True, True, False, False, False, False, True, True,
    ]  # fmt: skip
    vm.access_batch(np.arange(1024, 1032, dtype=np.uint64), write=True)
    assert vm.stats["host_pages_allocated"] == alloc + 4, "pages of both slots were freed"
    with pytest.raises(tdpmmu.ConfigError, match="not in any memslot"):
        vm.madvise_dontneed(1030, 4)
    vm.check()


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
    # One line per test says what its figure includes and leaves out.
    notes = [ln for ln in r.lines if ln.startswith("(modeled per iteration: ")]
    assert len(notes) == 6
    unmap_note = notes[1]
    assert "0 ns for the other 1022 of the 1024 MADV_DONTNEED calls" in unmap_note
    assert "not comparable with the selftest" in unmap_note
    assert "0 ns for the other 0 of the 2 MADV_DONTNEED calls" in notes[2]
    checks = checks_by_name(r)
    assert r.ok and all(checks.values())
    for t in ("map", "unmap", "unmap chunked"):
        assert checks[f"{t}: a page freed by MADV_DONTNEED is allocated again on its next touch"]
    assert all(checks[f"{t}: VM.check() holds after the run"] for t in TESTS)
    assert "map: MADV_DONTNEED leaves the freed half unmapped" in checks, "-d adds checks"
    assert any(n.startswith("move active area: the guest's writes") for n in checks)
    assert r.metrics["map_best_s_per_iteration"] > 0
    # unmap's loops are cheap: the cap ends the run, and a line says so after "Done".
    assert r.detail["runs"][1]["capped"] and r.detail["runs"][1]["iterations"] == 20
    i = r.lines.index("Testing unmap performance with 1 runs, 0.002 seconds each")
    assert r.lines[i + 2] == "Done 20 iterations, avg " + TIME.findall(r.lines[i + 2])[0] + " each"
    assert r.lines[i + 3] == "(stopped by --max-iterations 20 before -l 0.002 modeled seconds)"
    assert r.detail["capped_runs"] == sum(1 for x in r.detail["runs"] if x["capped"])
    assert WorkloadResult.from_json(r.to_json()) == r


def test_memslot_perf_run_that_reaches_its_time_is_not_capped() -> None:
    from tdpmmu.workloads.memslot_perf import memslot_perf

    r = memslot_perf(first_test=0, last_test=0, slots=8, seconds=0.002, scale=32)
    assert not r.detail["runs"][0]["capped"]
    assert r.detail["runs"][0]["modeled_s"] >= 0.002
    assert not any(ln.startswith("(stopped by") for ln in r.lines)


def test_memslot_perf_unmap_issues_one_madvise_per_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    from tdpmmu.workloads.memslot_perf import memslot_perf

    calls: list[tuple[int, int]] = []
    real = tdpmmu.VM.madvise_dontneed

    def spy(self: tdpmmu.VM, gfn: int, npages: int) -> int:
        calls.append((gfn, npages))
        return real(self, gfn, npages)

    monkeypatch.setattr(tdpmmu.VM, "madvise_dontneed", spy)
    # unmap chunked at scale 32: 1024 pages in 2 MiB chunks over 511 slots of 2 pages each.
    r = memslot_perf(first_test=2, last_test=2, seconds=1, scale=32, max_iterations=3)
    assert r.detail["runs"][0]["slots"] == 511
    loop_calls = calls[:-1]  # the last one is the re-touch check's
    assert len(loop_calls) == 3 * 2 and all(n == 512 for _, n in loop_calls)


def test_memslot_perf_failed_check_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    from tdpmmu.workloads.memslot_perf import memslot_perf

    # A host that zaps but never frees the pages (an MMU-notifier invalidation only): the
    # re-touch after MADV_DONTNEED allocates nothing, which the workload's check catches.
    def broken(self: tdpmmu.VM, gfn: int, npages: int) -> int:
        return self.mmu_notifier_invalidate(gfn, npages)

    monkeypatch.setattr(tdpmmu.VM, "madvise_dontneed", broken)
    r = memslot_perf(first_test=0, last_test=1, slots=8, seconds=1, scale=32, max_iterations=2)
    assert not r.ok
    failed = [c for c in r.detail["checks"] if not c["ok"]]
    assert [c["name"] for c in failed] == [
        "map: a page freed by MADV_DONTNEED is allocated again on its next touch",
        "unmap: a page freed by MADV_DONTNEED is allocated again on its next touch",
    ]
    assert "0 host pages allocated" in failed[0]["detail"]
    assert r.metrics["unmap_iterations"] == 2, "the run still returns every figure"


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
    kept = "move inactive area: with the quirk off, moving the slot leaves the area below it mapped"
    held = "move inactive area: VM.check() holds after the run"
    assert checks_by_name(off) == {kept: True, held: True}
    assert checks_by_name(on) == {held: True}, "with the quirk the area is not kept: no check"
    # With the quirk the fast zap drops the inactive area too: the guest faults it back.
    assert on.stats["pf_taken"] > off.stats["pf_taken"]


def test_memslot_perf_default_slot_cap_fits_a_scaled_area() -> None:
    from tdpmmu.workloads.memslot_perf import memslot_perf

    # scale 32: the map area is 272 pages, fewer than the default cap's 511 slots.
    r = memslot_perf(first_test=0, last_test=0, seconds=0.001, scale=32, verbose=True)
    assert not any(ln.startswith("Memslot count too high") for ln in r.lines)
    assert "Allowed number of memory slots: 273" in r.lines
    assert (
        "(default slot cap 512 lowered to 273 for this test's 272-page area; -s sets the cap)"
        in r.lines
    )
    assert r.detail["runs"][0]["slots"] == 272 and r.metrics["map_iterations"] >= 1
    # An explicit cap is the user's: the selftest's refusal line, as before.
    r = memslot_perf(first_test=0, last_test=0, seconds=0.001, scale=32, slots=512)
    assert "Memslot count too high for this test, decrease the cap (max is 273)" in r.lines
    # move active area needs a last slot of 24 pages at least: the default cap drops to fit.
    r = memslot_perf(first_test=3, last_test=3, seconds=0.001, scale=32, max_iterations=2)
    assert r.detail["runs"][0]["slot_cap"] == 512, "4112 pages: 511 slots leave 32 in the last"
    assert r.ok


def test_memslot_perf_zero_seconds_and_too_many_slots() -> None:
    from tdpmmu.workloads.memslot_perf import memslot_perf

    r = memslot_perf(first_test=0, last_test=0, seconds=0, scale=32, slots=8)
    assert "No full loops done - too short test time or system too loaded?" in r.lines
    assert not any(ln.startswith("(modeled per iteration") for ln in r.lines)
    r = memslot_perf(first_test=0, last_test=1, seconds=1, scale=32, slots=1000)
    assert any(ln.startswith("Memslot count too high for this test") for ln in r.lines)
    # unmap's 1040 pages fit 999 slots: it runs.
    assert [p[0] for p in r.phases] == ["map (not run)", "unmap run 0"]


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


def test_modeled_total_covers_every_run_and_the_guest_time() -> None:
    """Each run builds its own VM: the result's counters and cost breakdown are the sum over
    all of them plus the guest's own access time (virtual clock), so the total is at least the
    phases' sum and the breakdown adds up to it (it was the last run's VM alone)."""
    r = memslot_perf(scale=32, max_iterations=3)
    phases = sum(p[1] for p in r.phases)
    assert r.modeled_ns / 1e9 >= phases
    assert r.cost_breakdown["guest_ns"] > 0
    assert abs(sum(r.cost_breakdown.values()) - r.modeled_ns) < 1e-3
    host = memslot_perf(scale=32, max_iterations=3, clock="host")
    assert host.cost_breakdown.get("guest_ns", 0.0) == 0.0
    assert host.modeled_ns / 1e9 >= sum(p[1] for p in host.phases)
