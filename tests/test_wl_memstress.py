"""The memstress-based workloads: demand_paging, dirty_log_perf and access_tracking_perf: their
flows, the selftests' output lines, their own checks, flags, pinning and JSON round trips."""

import argparse
import dataclasses
import re
from typing import Any

import numpy as np
import pytest

import tdpmmu
from tdpmmu.vm import VM
from tdpmmu.vmspec import VmSpec
from tdpmmu.workloads import WORKLOADS, DemandPagingResult, WorkloadResult, demand_paging, memstress
from tdpmmu.workloads import dirty_log_perf as dlp
from tdpmmu.workloads.access_tracking_perf import PHASES, access_tracking_perf
from tdpmmu.workloads.base import sim_options
from tdpmmu.workloads.dirty_log_perf import dirty_log_perf, guest_writes

TIME = r"\d+\.\d{9}s"
CONFIDENTIAL = ("tdx", "snp")
IDLE_CHECK = "pages young again after the accesses (<= 10% of each slice still idle)"


def check(r: Any, name: str) -> dict[str, Any]:
    """The ``detail["checks"]`` record called ``name`` (exactly one)."""
    (rec,) = [c for c in r.detail["checks"] if c["name"] == name]
    return dict(rec)


def parse(command: str, argv: list[str]) -> dict[str, Any]:
    wl = next(w for w in WORKLOADS.values() if w.command == command)
    p = argparse.ArgumentParser(exit_on_error=False)
    wl.add_arguments(p)
    return wl.from_args(p.parse_args(argv))


def max_gfn(vm_type: str) -> int:
    return VmSpec.create(vm_type=vm_type, memory=2 << 20).build().max_gfn


# ----- demand_paging --------------------------------------------------------------------------


def test_demand_paging_prints_the_selftest_lines_with_modeled_times() -> None:
    r = demand_paging(vcpus=2, bytes_per_vcpu="1M")
    assert r.workload == "demand_paging"
    assert r.lines[0] == "Random seed: 0x6b8b4567"
    assert r.lines[1] == "Testing guest mode: PA-bits:ANY, VA-bits:48,  4K pages"
    assert r.lines[2] == f"guest physical test memory: [{r.region[0]:#x}, {r.region[1]:#x})"
    assert r.lines[3:6] == (
        "Finished creating vCPUs and starting uffd threads",
        "Started all vCPUs",
        "All vCPU threads joined",
    )
    assert r.lines[6] == f"Total guest execution time:\t{r.total_guest_execution_time_s:.9f}s"
    assert re.fullmatch(r"Per-vcpu demand paging rate:\t\d+\.\d{6} pgs/sec/vcpu", r.lines[7])
    assert re.fullmatch(r"Overall demand paging rate:\t\d+\.\d{6} pgs/sec", r.lines[8])
    m = r.metrics
    # Attribute and metric of the same name are the same (modeled) figure; wall_ = host wall.
    assert m["total_guest_execution_time_s"] == r.total_guest_execution_time_s > 0
    assert m["overall_demand_paging_rate_pgs_per_s"] == r.overall_demand_paging_rate_pgs_per_s
    assert m["per_vcpu_demand_paging_rate_pgs_per_s"] == r.per_vcpu_demand_paging_rate_pgs_per_s
    assert m["wall_overall_demand_paging_rate_pgs_per_s"] == (
        r.wall_overall_demand_paging_rate_pgs_per_s
    )
    assert m["overall_demand_paging_rate_pgs_per_s"] == pytest.approx(
        2 * m["per_vcpu_demand_paging_rate_pgs_per_s"]
    )
    assert m["per_vcpu_demand_paging_rate_pgs_per_s"] == pytest.approx(
        256 / m["total_guest_execution_time_s"]
    )
    assert m["wall_total_guest_execution_time_s"] == r.wall_total_guest_execution_time_s
    assert r.ok and len(r.detail["checks"]) == 2
    assert all(c["ok"] for c in r.detail["checks"])
    row = r.row()
    assert row["workload"] == "demand_paging" and row["vcpus"] == 2
    assert row["overall_demand_paging_rate_pgs_per_s"] == m["overall_demand_paging_rate_pgs_per_s"]
    assert len(r.to_pandas()) == 1
    assert DemandPagingResult.from_json(r.to_json()) == r


def test_demand_paging_failed_check_is_recorded_not_raised(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = memstress.run_pass

    def short(*args: Any, **kwargs: Any) -> memstress.PassResult:
        res = real(*args, **kwargs)
        per = [dict(d) for d in res.per_vcpu]
        per[1]["pages"] = 7  # vCPU 1 claims fewer accesses than its slice has pages
        return memstress.PassResult(res.modeled_s, res.wall_s, tuple(per), res.virtual)

    monkeypatch.setattr(memstress, "run_pass", short)
    r = demand_paging(vcpus=2, bytes_per_vcpu="1M")
    assert not r.ok
    failed = [c for c in r.detail["checks"] if not c["ok"]]
    assert [c["name"] for c in failed] == ["every vCPU made one access per page of its slice"]
    assert "vCPUs [1]" in failed[0]["detail"]
    assert r.total_guest_execution_time_s > 0 and r.metrics["pages_per_vcpu"] == 256
    back = DemandPagingResult.from_json(r.to_json())
    assert back == r and not back.ok


def test_demand_paging_reads_json_written_before_the_wall_prefix() -> None:
    r = demand_paging(bytes_per_vcpu="256K")
    doc = r.to_dict()
    res = doc["result"]
    # Before: unprefixed = host wall, modeled_* = modeled.
    for stem in (
        "guest_execution_time_s",
        "per_vcpu_demand_paging_rate_pgs_per_s",
        "overall_demand_paging_rate_pgs_per_s",
    ):
        modeled = "total_" + stem if stem.startswith("guest") else stem
        res["modeled_" + stem] = res.pop(modeled)
        res[modeled] = res.pop("wall_" + modeled)
    from tdpmmu.results import Envelope

    assert DemandPagingResult.from_envelope(Envelope.from_dict(doc)) == r


@pytest.mark.parametrize("vm_type", ["default", "sw_protected", "tdx", "snp"])
def test_demand_paging_region_sits_at_the_top_of_guest_physical_space(vm_type: str) -> None:
    r = demand_paging(vm_type=vm_type, vcpus=2, bytes_per_vcpu="1M", backing="2M")
    top = max_gfn(vm_type) * 4096
    start, end = r.region
    assert end - start == 2 << 20 and start % (2 << 20) == 0
    # memstress: one page spare below the top, then aligned down to the backing page.
    assert top - (4 << 20) < end <= top - 4096
    if vm_type == "default":
        assert r.stats["pf_fixed"] == 1  # one 2M page, first touched by one vCPU


def test_demand_paging_pinning_moves_contention_costs_with_cpu_distance() -> None:
    def lines_wait(cpus: list[int]) -> float:
        r = demand_paging(vcpus=2, bytes_per_vcpu="1M", overlap=True, cpus=cpus)
        assert r.options.cpus == tuple(cpus[:2])
        return float(r.virtual["vcpu_breakdown"]["wait_lock_line"])

    smt, socket, remote = lines_wait([0, 128]), lines_wait([0, 1]), lines_wait([0, 64])
    # SMT siblings share a core's caches: moving the contended lines is cheapest there.
    assert 0 < smt < socket < remote
    # The default placement is vCPU i on CPU i.
    base = demand_paging(vcpus=2, bytes_per_vcpu="1M", overlap=True)
    assert base.virtual["vcpu_breakdown"]["wait_lock_line"] == socket
    main = demand_paging(vcpus=2, bytes_per_vcpu="1M", cpus=[4, 5, 6])
    assert main.detail["main_cpu"] == 6 and main.options.cpus == (4, 5)
    assert DemandPagingResult.from_json(main.to_json()) == main


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cpus": [0]}, "all or nothing"),
        ({"cpus": [0, 1, 2, 3]}, "all or nothing"),
        ({"cpus": [0, 256]}, "not in the machine"),
        ({"cpus": [0, 1, 999]}, "main thread"),
        ({"cpus": [3, 3]}, "already runs"),
        ({"cpus": [0, 1], "clock": "host"}, "clock"),
        ({"cpus": "0,1"}, "cpus"),
    ],
)
def test_demand_paging_refuses_bad_pinning(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(tdpmmu.ConfigError, match=match):
        demand_paging(vcpus=2, bytes_per_vcpu="1M", **kwargs)


def test_demand_paging_flags_letter_for_letter() -> None:
    kw = parse(
        "demand-paging",
        [
            "-u",
            "MINOR",
            "-a",
            "-d",
            "5",
            "-r",
            "2",
            "-b",
            "1M",
            "-s",
            "anonymous_thp",
            "-v",
            "2",
            "-c",
            "0,1,7",
            "-o",
            "-m",
            "0",
        ],
    )
    assert kw == {
        "vcpus": 2,
        "bytes_per_vcpu": 1 << 20,
        "backing": "anonymous_thp",
        "overlap": True,
        "userfault": "MINOR",
        "uffd_all": True,
        "uffd_delay_us": 5.0,
        "uffd_readers": 2,
        "cpus": [0, 1, 7],
    }
    long = parse("demand-paging", ["--vcpus", "3", "--bytes-per-vcpu", "0x100000"])
    assert long["vcpus"] == 3 and long["bytes_per_vcpu"] == 1 << 20
    r = demand_paging(**{**kw, "backing": "anonymous", "bytes_per_vcpu": "64K"})
    assert r.options.uffd_all and r.options.userfault == "MINOR"
    bad_flags = (["-m", "1"], ["-b", "12x"], ["-s", "anonymous_hugetlb_16kb"], ["-v", "0"])
    for bad in (*bad_flags, ["-c", "0,,1"]):
        with pytest.raises(argparse.ArgumentError):
            parse("demand-paging", bad)


# ----- dirty_log_perf -------------------------------------------------------------------------


def dirty_lines(iters: int, manual: bool) -> list[str]:
    out = [
        f"Test iterations: {iters}",
        "Testing guest mode: PA-bits:ANY, VA-bits:48,  4K pages",
        r"guest physical test memory: \[0x[0-9a-f]+, 0x[0-9a-f]+\)",
        r"Random seed: \d+",
        f"Populate memory time: {TIME}",
        f"Enabling dirty logging time: {TIME}",
        "",
    ]
    for k in range(1, iters + 1):
        out += [
            f"Iteration {k} dirty memory time: {TIME}",
            f"Iteration {k} get dirty log time: {TIME}",
        ]
        if manual:
            out.append(f"Iteration {k} clear dirty log time: {TIME}")
    out += [
        f"Disabling dirty logging time: {TIME}",
        rf"Get dirty log over {iters} iterations took {TIME}\. \(Avg {TIME}/iteration\)",
    ]
    if manual:
        out.append(
            rf"Clear dirty log over {iters} iterations took {TIME}\. \(Avg {TIME}/iteration\)"
        )
    return out


@pytest.mark.parametrize("manual", [True, False])
def test_dirty_log_perf_flow_and_lines(manual: bool) -> None:
    r = dirty_log_perf(
        vcpus=2,
        bytes_per_vcpu="1M",
        iterations=3,
        write_percent=40,
        random_access=True,
        slots=2,
        no_manual_protect=not manual,
    )
    pats = dirty_lines(3, manual)
    assert len(r.lines) == len(pats)
    for line, pat in zip(r.lines, pats, strict=True):
        assert re.fullmatch(pat, line), (line, pat)
    assert r.lines[3] == "Random seed: 1"
    bitmap = check(r, "each iteration's dirty bitmap holds the pages the guest wrote")
    assert bitmap["ok"] and r.ok
    assert bitmap["detail"] == "checked against every vCPU's writes, exactly"
    m = r.metrics
    labels = [p[0] for p in r.phases]
    assert labels[:2] == ["Populate memory", "Enabling dirty logging"]
    assert labels[-1] == "Disabling dirty logging"
    get = [m[f"iteration_{k}_get_dirty_log_time_s"] for k in (1, 2, 3)]
    assert m["get_dirty_log_total_s"] == pytest.approx(sum(get))
    if manual:
        # INITIALLY_SET: the first bitmap holds every page; CLEAR re-protects what was dirty.
        assert r.detail["dirty_pages"][0] == 512
        assert m["clear_dirty_log_total_s"] > 0 and m["enabling_dirty_logging_time_s"] == 0
    else:
        # Without manual protect, enabling write-protects everything and GET re-protects.
        assert m["enabling_dirty_logging_time_s"] > 0 and get[0] > 0
        assert "clear_dirty_log_total_s" not in m
    later = r.detail["dirty_pages"][1:] if manual else r.detail["dirty_pages"]
    assert all(0 < d < 512 for d in later)  # 40% random writes dirty some pages, not all
    assert WorkloadResult.from_json(r.to_json()) == r


def test_dirty_log_perf_slot_split_and_written_pages() -> None:
    r = dirty_log_perf(vcpus=2, bytes_per_vcpu="1M", slots=4, write_percent=100)
    slots = r.detail["slots"]
    start, end = (x // 4096 for x in r.detail["region"])
    assert [s[0] for s in slots] == [1, 2, 3, 4]
    assert [s[1] for s in slots] == [start + i * 128 for i in range(4)]
    assert all(s[2] == 128 for s in slots) and end == start + 512
    assert end <= max_gfn("default") - 1
    # 100% sequential writes: each iteration dirties every page.
    assert r.detail["dirty_pages"] == [512, 512]


def test_guest_writes_replays_the_generator() -> None:
    _, _, layout = memstress.build({}, vcpus=1, bytes_per_vcpu="1M")
    assert list(guest_writes(layout, 0, 1, 100, False)) == list(range(256))
    half = guest_writes(layout, 0, 7, 50, False)
    assert 90 < len(half) < 166
    rnd = guest_writes(layout, 0, 7, 100, True)
    assert len(rnd) < 256  # random order revisits pages
    # rng_skip advances the generator: in order, page i's coin is draw i, so one draw on
    # shifts the written pages down by one.
    on = guest_writes(layout, 0, 7, 50, False, rng_skip=1)
    assert [p + 1 for p in on if p + 1 < 256] == [p for p in half if p >= 1]
    assert list(guest_writes(layout, 0, 7, 50, False, rng_skip=0)) == list(half)


def _logged() -> tuple[VM, memstress.Layout, Any]:
    """A populated 2-vCPU VM with logging on (every page write-protected, so exactly the pages
    the guest writes get logged; GET_DIRTY_LOG re-protects), its layout and options."""
    vm, _, layout = memstress.build({}, vcpus=2, bytes_per_vcpu="1M", slots=2)
    opts = sim_options({})
    memstress.run_pass(vm, layout, opts)
    for slot in layout.slot_ids:
        vm.set_dirty_logging(slot, True)
    return vm, layout, opts


def _bitmap(vm: VM, layout: memstress.Layout) -> np.ndarray:
    parts = []
    for slot, _, n in layout.slots():
        words = vm.get_dirty_log(slot)
        parts.append(np.unpackbits(words.view(np.uint8), bitorder="little")[:n].astype(bool))
    return np.concatenate(parts)


@pytest.mark.parametrize(
    ("random_access", "write_percent", "per_access"),
    [(True, 50, 2), (False, 50, 1), (True, 100, 1), (False, 100, 0), (True, 0, 2)],
)
def test_two_passes_in_one_call_equal_two_calls_with_rng_skip(
    random_access: bool, write_percent: int, per_access: int
) -> None:
    # The guest's generator runs on across passes: a second call given the draws of the first
    # (memstress.draws_per_pass) writes what the second pass of one two-pass call writes.
    kw: dict[str, Any] = {"random_access": random_access, "write_percent": write_percent}
    draws = memstress.draws_per_pass(256, **kw)
    assert draws == 256 * per_access
    one, layout, opts = _logged()
    rec = memstress.run_pass(one, layout, opts, passes=2, seed=5, **kw)
    assert [v["pages"] for v in rec.per_vcpu] == [512.0, 512.0]
    together = _bitmap(one, layout)
    for clock in ("virtual", "host"):
        two, _, _ = _logged()
        o = dataclasses.replace(opts, clock=clock)
        memstress.run_pass(two, layout, o, seed=5, **kw)
        first = _bitmap(two, layout)
        memstress.run_pass(two, layout, o, seed=5, rng_skip=draws, **kw)
        second = _bitmap(two, layout)
        assert np.array_equal(first | second, together), clock
        for k, (bits, skip) in enumerate([(first, 0), (second, draws)]):
            want = np.zeros(layout.npages, dtype=bool)
            for v in range(2):
                want[guest_writes(layout, v, 5, write_percent, random_access, skip)] = True
            assert np.array_equal(bits, want), (clock, k)
        if draws and write_percent:
            assert not np.array_equal(first, second), "pass 2 repeated pass 1"
    # The host clock's passes continue the stream as virtual time's do.
    host, _, _ = _logged()
    memstress.run_pass(
        host, layout, dataclasses.replace(opts, clock="host"), passes=2, seed=5, **kw
    )
    assert np.array_equal(_bitmap(host, layout), together)


@pytest.mark.parametrize("clock", ["virtual", "host"])
def test_dirty_log_perf_iterations_continue_the_guest_stream(
    monkeypatch: pytest.MonkeyPatch, clock: str
) -> None:
    # Each iteration's bitmap, as GET_DIRTY_LOG returned it (-g: each holds exactly the pages
    # written since the previous GET).
    seen: list[np.ndarray] = []
    real = dlp._region_bitmap

    def spy(vm: Any, layout: memstress.Layout) -> np.ndarray:
        seen.append(real(vm, layout))
        return seen[-1]

    monkeypatch.setattr(dlp, "_region_bitmap", spy)
    kw: dict[str, Any] = {"random_access": True, "write_percent": 50}
    r = dirty_log_perf(
        vcpus=2, bytes_per_vcpu="1M", slots=2, no_manual_protect=True, clock=clock, **kw
    )
    assert r.ok
    it1, it2 = seen
    assert not np.array_equal(it1, it2), "iteration 2 repeated iteration 1's pages"
    assert [p["rng_skip"] for p in r.detail["passes"]] == [0, 0, 512]
    # The same guest as one memstress call of two passes after the populate pass: its first
    # pass writes iteration 1's pages, and both write iterations 1 and 2's.
    for passes, want in ((1, it1), (2, it1 | it2)):
        vm, layout, opts = _logged()
        memstress.run_pass(vm, layout, opts, passes=passes, seed=1, **kw)
        assert np.array_equal(_bitmap(vm, layout), want), passes


def test_dirty_log_perf_check_fails_on_a_wrong_bitmap(monkeypatch: pytest.MonkeyPatch) -> None:
    def empty(self: VM, slot: int) -> np.ndarray:
        return np.zeros(4, dtype=np.uint64)

    monkeypatch.setattr(VM, "get_dirty_log", empty)
    r = dirty_log_perf(bytes_per_vcpu="1M", no_manual_protect=True)
    # A failed check is recorded, not raised: the run keeps every figure.
    assert not r.ok
    bitmap = check(r, "each iteration's dirty bitmap holds the pages the guest wrote")
    assert not bitmap["ok"] and "iteration(s) [1, 2]" in bitmap["detail"]
    assert r.metrics["get_dirty_log_total_s"] >= 0 and len(r.lines) > 5


def test_dirty_log_perf_huge_pages_come_back_and_e_runs_a_pass_after() -> None:
    r = dirty_log_perf(
        bytes_per_vcpu="4M", backing="anonymous_hugetlb_2mb", run_while_disabling=True
    )
    assert check(r, "huge mappings recovered after disabling")["ok"]
    assert r.stats["pages_2m"] == 2 and r.stats["pages_4k"] == 0
    assert r.metrics["disabling_dirty_logging_time_s"] > 0
    assert [p[0] for p in r.phases][-3:] == [
        "vCPU pass before disabling (-e)",
        "Disabling dirty logging",
        "vCPU pass after disabling (-e)",
    ]
    # Before: logging on, the guest's writes fault on re-protected 4K pages; after: the huge
    # mappings are back and the pass is all hits.
    before, after = r.phases[-3][1], r.phases[-1][1]
    assert after < before
    plain = dirty_log_perf(bytes_per_vcpu="4M", backing="anonymous_hugetlb_2mb")
    # The -e passes print nothing: the same lines, label for label.
    strip = re.compile(TIME)
    assert [strip.sub("T", x) for x in r.lines] == [strip.sub("T", x) for x in plain.lines]


@pytest.mark.parametrize("vm_type", ["default", "sw_protected", "tdx", "snp"])
def test_dirty_log_perf_on_every_vm_type(vm_type: str) -> None:
    kw: dict[str, Any] = {"private": False} if vm_type in CONFIDENTIAL else {}
    r = dirty_log_perf(vm_type=vm_type, vcpus=2, bytes_per_vcpu="256K", write_percent=50, **kw)
    assert r.spec.vm_type == vm_type and r.ok and r.detail["checks"]
    if vm_type in CONFIDENTIAL:
        with pytest.raises(tdpmmu.ConfigError, match=r"vm_type.*private=False"):
            dirty_log_perf(vm_type=vm_type, bytes_per_vcpu="256K")
    with pytest.raises(tdpmmu.ConfigError, match="private"):
        dirty_log_perf(vm_type=vm_type, bytes_per_vcpu="256K", private=True)


def test_dirty_log_perf_host_clock() -> None:
    r = dirty_log_perf(vcpus=2, bytes_per_vcpu="256K", clock="host")
    assert r.options.clock == "host" and r.metrics["populate_memory_time_s"] > 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"iterations": 1}, "iterations"),
        ({"write_percent": 101}, "write_percent"),
        ({"nested": True}, "nested"),
        ({"slots": 3}, "slots"),
        ({"random_seed": 0}, "random_seed"),
        ({"cpus": [0, 1, 2]}, "all or nothing"),
        ({"offset": 4096}, "does not fit"),
    ],
)
def test_dirty_log_perf_refuses_bad_values(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(tdpmmu.ConfigError, match=match):
        dirty_log_perf(bytes_per_vcpu="1M", **kwargs)


def test_dirty_log_perf_flags() -> None:
    kw = parse(
        "dirty-log-perf",
        [
            "-a",
            "-b",
            "2M",
            "-c",
            "0,1",
            "-e",
            "-g",
            "-i",
            "3",
            "-m",
            "0",
            "-o",
            "-p",
            "0x40000000",
            "-r",
            "9",
            "-s",
            "anonymous",
            "-v",
            "2",
            "-w",
            "30",
            "-x",
            "2",
        ],
    )
    assert kw == {
        "vcpus": 2,
        "bytes_per_vcpu": 2 << 20,
        "backing": "anonymous",
        "iterations": 3,
        "write_percent": 30,
        "random_access": True,
        "no_manual_protect": True,
        "run_while_disabling": True,
        "overlap": True,
        "offset": 1 << 30,
        "slots": 2,
        "random_seed": 9,
        "cpus": [0, 1],
        "nested": False,
        "private": None,
        "pml": False,
    }
    r = dirty_log_perf(**{**kw, "bytes_per_vcpu": "256K"})
    assert r.detail["region"][0] == 1 << 30 and r.options.cpus == (0, 1)
    with pytest.raises(tdpmmu.ConfigError, match="nested"):
        dirty_log_perf(**parse("dirty-log-perf", ["-n", "-b", "1M"]))
    for bad in (["-i", "1"], ["-w", "101"], ["-x", "0"], ["-r", "0"], ["-m", "2"]):
        with pytest.raises(argparse.ArgumentError):
            parse("dirty-log-perf", bad)


# ----- access_tracking_perf -------------------------------------------------------------------


def test_access_tracking_perf_phases_and_labels() -> None:
    r = access_tracking_perf(vcpus=2, bytes_per_vcpu="1M")
    assert r.lines[:2] == ("Random seed: 0x6b8b4567", "Using page_idle for aging")
    body = r.lines[4:]
    assert [line[:30] for line in body] == [f"{p:<30}" for p in PHASES]
    for line, (label, modeled, _) in zip(body, r.phases, strict=True):
        assert line == f"{label:<30}: {modeled:.9f}s"
    m = r.metrics
    # Marking idle clears the Accessed bit of every page of a slice: one SPTE update each, and
    # the vCPUs mark their slices in parallel (the slowest one's time).
    per_page = tdpmmu.CostModel().spte_update_ns
    assert m["mark_memory_idle_time_s"] == pytest.approx(256 * per_page / 1e9)
    assert m["mark_memory_idle_2_time_s"] == m["mark_memory_idle_time_s"]
    assert r.stats["sptes_aged"] == 2 * 512
    assert m["still_idle_pages"] == 0
    assert check(r, IDLE_CHECK) == {"name": IDLE_CHECK, "ok": True, "detail": ""}
    assert WorkloadResult.from_json(r.to_json()) == r
    # -o: only vCPU 0 marks, the whole region.
    o = access_tracking_perf(vcpus=2, bytes_per_vcpu="1M", overlap=True)
    assert o.metrics["mark_memory_idle_time_s"] == pytest.approx(512 * per_page / 1e9)


def test_access_tracking_perf_still_idle_check(monkeypatch: pytest.MonkeyPatch) -> None:
    # Skip the guest's "Writing to idle memory" pass: its pages stay idle.
    real = memstress.run_pass
    calls = {"n": 0}

    def run_pass(*args: Any, **kwargs: Any) -> memstress.PassResult:
        calls["n"] += 1
        if calls["n"] == 4:
            return memstress.PassResult(0.0, 0.0, (), {})
        return real(*args, **kwargs)

    monkeypatch.setattr(memstress, "run_pass", run_pass)
    r = access_tracking_perf(bytes_per_vcpu="256K")
    assert not r.ok and [c["name"] for c in r.detail["checks"] if not c["ok"]] == [IDLE_CHECK]
    assert "Too many pages still idle (64 out of 64)" in check(r, IDLE_CHECK)["detail"]
    assert r.metrics["still_idle_pages"] == 64  # the figures are kept
    # -w: the selftest only warns, so the check holds and notes the warning.
    calls["n"] = 0
    r = access_tracking_perf(bytes_per_vcpu="256K", warn_only=1)
    assert "WARNING: vCPU0: Too many pages still idle (64 out of 64)" in "\n".join(r.lines)
    assert r.metrics["still_idle_pages"] == 64
    assert r.ok and check(r, IDLE_CHECK)["detail"].startswith("warn only (-w): ")


@pytest.mark.parametrize("vm_type", ["default", "sw_protected", "tdx", "snp"])
def test_access_tracking_perf_on_every_vm_type(vm_type: str) -> None:
    kw: dict[str, Any] = {"private": False} if vm_type in CONFIDENTIAL else {}
    r = access_tracking_perf(vm_type=vm_type, bytes_per_vcpu="256K", **kw)
    assert r.metrics["still_idle_pages"] == 0 and r.stats["sptes_aged"] == 128
    if vm_type in CONFIDENTIAL:
        with pytest.raises(tdpmmu.ConfigError, match="private"):
            access_tracking_perf(vm_type=vm_type, bytes_per_vcpu="256K")


def test_access_tracking_perf_host_clock_and_flags() -> None:
    r = access_tracking_perf(vcpus=2, bytes_per_vcpu="256K", clock="host")
    assert r.options.clock == "host" and len(r.phases) == len(PHASES)
    kw = parse(
        "access-tracking-perf",
        ["-b", "1M", "-v", "2", "-o", "-s", "anonymous_thp", "-w", "1", "-m", "0"],
    )
    assert kw == {
        "vcpus": 2,
        "bytes_per_vcpu": 1 << 20,
        "backing": "anonymous_thp",
        "overlap": True,
        "warn_only": 1,
        "private": None,
    }
    for bad in (["-w", "-1"], ["-v", "x"], ["-c", "0"]):
        with pytest.raises((argparse.ArgumentError, SystemExit)):
            parse("access-tracking-perf", bad)


@pytest.mark.parametrize("name", ["dirty_log_perf", "access_tracking_perf"])
def test_shared_memory_flag_runs_a_confidential_vm_on_shared_memory(name: str) -> None:
    """``--shared-memory`` is ``private=False``: tdx/snp are refused without it, run with it."""
    wl = WORKLOADS[name]
    p = argparse.ArgumentParser()
    wl.add_arguments(p)
    assert wl.from_args(p.parse_args(["-b", "1M"]))["private"] is None
    kwargs = wl.from_args(p.parse_args(["-b", "1M", "--shared-memory"]))
    assert kwargs["private"] is False
    with pytest.raises(tdpmmu.ConfigError, match="--shared-memory"):
        wl.run(**{**kwargs, "private": None}, vm_type="snp")
    r = wl.run(**kwargs, vm_type="snp")
    assert r.spec.vm_type == "snp"


def test_dirty_log_perf_with_pml_logs_without_exits() -> None:
    """With PML the guest's writes to armed pages are logged by the CPU (``pml_logged``), so a
    dirtying pass is cheaper than under write-protection, and the bitmaps still hold exactly
    the pages written (the workload's check)."""
    kw = {"vcpus": 2, "bytes_per_vcpu": "4M", "iterations": 3}
    wp = dirty_log_perf(**kw)
    pml = dirty_log_perf(**kw, pml=True)
    assert wp.ok and pml.ok
    assert pml.stats["pml_logged"] > 0 and wp.stats["pml_logged"] == 0
    key = "iteration_2_dirty_memory_time_s"
    assert pml.metrics[key] < wp.metrics[key]
    with pytest.raises(tdpmmu.ConfigError, match="pml"):
        dirty_log_perf(**kw, pml=True, ad_bits=False)
