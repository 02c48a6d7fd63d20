"""Modeled time at scale from Python: ``VM.run_virtual``, ``demand_paging``'s clock and shared
resource knobs, the result envelope, ``compare --clock``, and the CLI flags of
``demand_paging_test`` (``-u -a -r -d``) with their long forms. The engine's own behaviour tests
(determinism, outcomes adding up, scaling that must emerge) are ``rust/tdpmmu-core/tests/
vtime.rs``; these check the Python surface does what it says and refuses what it should."""

import json
import subprocess
import sys

import numpy as np
import numpy.typing as npt
import pytest

import tdpmmu
from tdpmmu import _core
from tdpmmu.compare import compare
from tdpmmu.types import VirtualRecord
from tdpmmu.vtime import RESOURCES, Machine, VirtualOptions, by_resource
from tdpmmu.workloads import DemandPagingResult, demand_paging


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tdpmmu", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_run_virtual_record_adds_up() -> None:
    vm = tdpmmu.VM(memory="256MiB", vcpus=16)
    r = vm.run_virtual(16, 256, 0, True, True, 60, 3, passes=2)
    assert len(r["vcpus"]) == 16
    for v in r["vcpus"]:
        assert v["accesses"] == 2 * 256
        assert v["accesses"] == (
            v["hits"] + v["fixed"] + v["spurious"] + v["emulate"] + v["write_protected"]
        )
        assert v["faults"] == (
            v["fixed"]
            + v["spurious"]
            + v["retry"]
            + v["emulate"]
            + v["memory_fault"]
            + v["write_protected"]
        )
    # The breakdown is every CostModel field then every wait kind, and it is the vCPUs' time.
    assert list(r["breakdown"]) == [*_core.COST_FIELDS, *_core.WAIT_FIELDS]
    clocks = sum(v["modeled_ns"] for v in r["vcpus"])
    assert sum(r["breakdown"].values()) == pytest.approx(clocks, rel=1e-9)
    assert r["elapsed_ns"] == max(v["modeled_ns"] for v in r["vcpus"])
    assert r["breakdown"]["guest_ns"] == 2 * 256 * 16 * tdpmmu.CostModel().guest_access_ns
    # The counters went to the VM, and its tables are consistent.
    s = vm.stats
    assert s["pf_fixed"] == sum(v["fixed"] for v in r["vcpus"])
    assert s["pf_taken"] == sum(v["faults"] for v in r["vcpus"])
    vm.check()
    # by_resource groups it without losing a nanosecond.
    grouped = by_resource(r["breakdown"])
    assert list(grouped) == list(RESOURCES)
    assert sum(grouped.values()) == pytest.approx(sum(r["breakdown"].values()), rel=1e-12)


def test_run_virtual_is_deterministic_and_seeded() -> None:
    def run(seed: int) -> dict[str, object]:
        vm = tdpmmu.VM(memory="64MiB", vcpus=32)
        rec = dict(vm.run_virtual(32, 128, 0, True, True, 50, seed))
        del rec["wall_s"]  # host seconds: the only part that is not modeled
        return {"rec": rec, "stats": dict(vm.stats)}

    a, b, c = run(5), run(5), run(6)
    assert a == b
    assert a != c


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"mmu_lock": "rw"}, "mmu_lock"),
        ({"userfault": "missing"}, "userfault"),
        ({"tdx_module": "2.0"}, "tdx_module"),
        ({"uffd_readers": 0, "userfault": "MISSING"}, "uffd_readers"),
        ({"uffd_delay_ns": -1.0}, "uffd_delay"),
        ({"machine": {"sockets": 0}}, "machine.sockets"),
        ({"machine": {"numa": 2}}, "machine"),
        ({"passes": 0}, "passes"),
        ({"remove": (1 << 30, 4)}, "remove"),
        ({"remove": (0, 4), "passes": 0}, "remove"),
    ],
)
def test_run_virtual_refuses_bad_knobs_and_leaves_the_vm_unchanged(
    kwargs: dict[str, object], needle: str
) -> None:
    vm = tdpmmu.VM(memory="64MiB", vcpus=4)
    before = dict(vm.stats)
    with pytest.raises(tdpmmu.ConfigError, match=needle):
        vm.run_virtual(4, 16, 0, False, False, 100, 0, **kwargs)  # type: ignore[arg-type]
    assert dict(vm.stats) == before


def test_run_virtual_refuses_python_hooks_and_private_userfault() -> None:
    class Hooks:
        def link_external_spt(self, gfn: int, level: int, value: int) -> int:
            return 0

        def set_external_spte(self, gfn: int, level: int, value: int) -> int:
            return 0

        def remove_external_spte(self, gfn: int, level: int, value: int) -> int:
            return 0

        def free_external_spt(self, gfn: int, level: int, value: int) -> int:
            return 0

    vm = tdpmmu.VM("tdx", memory="64MiB", vcpus=2, hooks=Hooks())
    vm.finalize()
    with pytest.raises(tdpmmu.ConfigError, match="clock"):
        vm.run_virtual(2, 16, 0, False, False, 100, 0, True)
    td = tdpmmu.VM("tdx", memory="64MiB", vcpus=2)
    td.finalize()
    with pytest.raises(tdpmmu.ConfigError, match="userfault"):
        td.run_virtual(2, 16, 0, False, False, 100, 0, True, userfault="MISSING")
    # demand_paging: a hooks object defaults to host threads; asking for virtual is refused.
    with pytest.raises(tdpmmu.ConfigError, match="clock"):
        demand_paging("tdx", vcpus=1, bytes_per_vcpu="4M", hooks=Hooks(), clock="virtual")
    r = demand_paging("tdx", vcpus=1, bytes_per_vcpu="4M", hooks=Hooks())
    assert r.options.clock == "host" and r.virtual == {}


def test_demand_paging_virtual_result_round_trips_and_labels_its_clock() -> None:
    r = demand_paging(vcpus=8, bytes_per_vcpu="4M", mmu_lock="exclusive", seed=2)
    assert r.options == VirtualOptions(mmu_lock="exclusive")
    oc = r.virtual["outcomes"]
    assert oc["accesses"] == 8 * 1024 and oc["fixed"] == 8 * 1024
    assert r.stats["pf_fixed"] == 8 * 1024
    assert r.virtual["lock_acquires"] >= 8 * 1024
    back = DemandPagingResult.from_json(r.to_json())
    assert back == r
    doc = json.loads(r.to_json())
    assert doc["config"]["workload"]["options"]["mmu_lock"] == "exclusive"
    # The modeled rate comes from the slowest simulated vCPU.
    slowest = max(d["modeled_ns"] for d in r.per_vcpu) / 1e9
    assert r.total_guest_execution_time_s == slowest


def test_host_clock_refuses_virtual_only_knobs() -> None:
    with pytest.raises(tdpmmu.ConfigError, match="clock"):
        demand_paging(vcpus=2, bytes_per_vcpu="4M", clock="host", mmu_lock="exclusive")
    with pytest.raises(tdpmmu.ConfigError, match="userfault"):
        demand_paging("snp", vcpus=2, bytes_per_vcpu="4M", userfault="MINOR")
    with pytest.raises(tdpmmu.ConfigError, match=r"machine\.cores_per_socket"):
        Machine(cores_per_socket=0)
    with pytest.raises(tdpmmu.ConfigError, match="uffd_delay_us"):
        VirtualOptions(uffd_delay_us=float("nan"))


def test_the_virtual_clock_shows_contention_the_host_clock_cannot() -> None:
    kw = {"vcpus": 64, "bytes_per_vcpu": "1M"}
    host = demand_paging(clock="host", **kw)  # type: ignore[arg-type]
    shared = demand_paging(**kw)  # type: ignore[arg-type]
    excl = demand_paging(mmu_lock="exclusive", **kw)  # type: ignore[arg-type]
    one = demand_paging(vcpus=1, bytes_per_vcpu="1M")
    per_one = one.per_vcpu_demand_paging_rate_pgs_per_s
    # Host threads: every vCPU models what one does (no concurrency in modeled time).
    host_one = demand_paging(vcpus=1, bytes_per_vcpu="1M", clock="host")
    assert host.per_vcpu_demand_paging_rate_pgs_per_s == pytest.approx(
        host_one.per_vcpu_demand_paging_rate_pgs_per_s, rel=1e-2
    )
    # Virtual time: 64 vCPUs contend, exclusive more than shared.
    assert shared.per_vcpu_demand_paging_rate_pgs_per_s < per_one
    assert excl.overall_demand_paging_rate_pgs_per_s < shared.overall_demand_paging_rate_pgs_per_s
    assert excl.virtual["resources"]["mmu_lock wait"] > 0
    assert shared.virtual["resources"]["mmu_lock wait"] == 0


def test_compare_runs_demand_paging_in_virtual_time() -> None:
    kw = {"workload": "demand-paging", "vcpus": 8, "bytes_per_vcpu": "2M", "types": ["default"]}
    v = compare(**kw)  # type: ignore[arg-type]
    h = compare(clock="host", **kw)  # type: ignore[arg-type]
    assert v.params.clock == "virtual" and h.params.clock == "host"
    (rv,), (rh,) = v.rows, h.rows
    assert rv.check_ok and rh.check_ok
    # Same faults either way; the virtual clock adds the guest's time and the waits.
    assert rv.stats["pf_fixed"] == rh.stats["pf_fixed"]
    assert rv.stats["modeled_ns"] > rh.stats["modeled_ns"]
    with pytest.raises(tdpmmu.ConfigError, match="clock"):
        compare(clock="host", mmu_lock="exclusive", **kw)  # type: ignore[arg-type]


@pytest.mark.cli
def test_cli_selftest_flags_and_long_options() -> None:
    p = run_cli(
        "demand-paging",
        "-v",
        "8",
        "-b",
        "1M",
        "-u",
        "MINOR",
        "-a",
        "-r",
        "2",
        "-d",
        "5",
        "--machine",
        "1x8x2",
        "--mem-bw",
        "50",
    )
    assert p.returncode == 0, p.stderr
    out = " ".join(p.stdout.split())
    assert "userfault MINOR (one uffd for all, 2 reader(s), 5 µs delay)" in out
    assert "machine 1x8x2 CPUs, 50 GB/s per socket" in out
    assert "vCPU modeled time by resource (simulated):" in out
    assert any(line.startswith("userfaultfd ") for line in p.stdout.splitlines())
    p = run_cli("demand-paging", "-v", "4", "-b", "1M", "--mmu-lock", "exclusive", "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["config"]["workload"]["options"]["mmu_lock"] == "exclusive"
    assert doc["result"]["virtual"]["outcomes"]["fixed"] == 4 * 256


@pytest.mark.cli
@pytest.mark.parametrize(
    "args",
    [
        ("-u", "missing"),
        ("-r", "0"),
        ("-d", "-1"),
        ("--machine", "2x0x2"),
        ("--machine", "two"),
        ("--clock", "wall"),
        ("--mmu-lock", "rw"),
    ],
)
def test_cli_bad_flags_are_one_line_and_exit_2(args: tuple[str, ...]) -> None:
    p = run_cli("demand-paging", "-v", "2", "-b", "1M", *args)
    assert p.returncode == 2
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


@pytest.mark.cli
def test_cli_host_clock_with_virtual_knob_is_a_config_error() -> None:
    p = run_cli("demand-paging", "-v", "2", "-b", "1M", "--clock", "host", "-u", "MISSING")
    assert p.returncode == 2
    assert "clock" in p.stderr


# ----- VM.run_virtual_accesses: explicit per-vCPU access lists -------------------------------


def _pages(start: int, n: int) -> npt.NDArray[np.uint64]:
    return np.arange(start, start + n, dtype=np.uint64)


def test_access_lists_contend_when_the_vcpus_run_at_once() -> None:
    # 32 vCPUs writing disjoint lists: with mmu_lock taken for write their faults queue on it,
    # so the run takes longer than with it taken for read.
    lists = [_pages(i * 64, 64) for i in range(32)]

    def run(lock: str) -> VirtualRecord:
        return tdpmmu.VM(memory="64MiB", vcpus=32).run_virtual_accesses(lists, mmu_lock=lock)

    shared, excl = run("shared"), run("exclusive")
    assert excl["elapsed_ns"] > 1.5 * shared["elapsed_ns"]
    assert excl["breakdown"]["wait_mmu_lock"] > 0 and excl["lock_contended"] > 0
    assert shared["breakdown"]["wait_mmu_lock"] == 0
    for r in (shared, excl):
        assert [v["fixed"] for v in r["vcpus"]] == [64] * 32
    # Racing first touches of the same pages: one vCPU fixes each page, others find it mapped.
    vm = tdpmmu.VM(memory="64MiB", vcpus=8)
    same = vm.run_virtual_accesses([_pages(0, 128)] * 8)
    assert sum(v["fixed"] for v in same["vcpus"]) == 128
    assert sum(v["spurious"] for v in same["vcpus"]) > 0
    assert sum(1 for v in same["vcpus"] if v["fixed"] > 0) > 1
    vm.check()


def test_access_lists_are_deterministic() -> None:
    rng = np.random.default_rng(3)
    lists = [rng.integers(0, 512, 300).astype(np.uint64) for _ in range(12)]
    writes = [rng.random(300) < 0.4 for _ in range(12)]

    def run() -> dict[str, object]:
        vm = tdpmmu.VM(memory="64MiB", vcpus=12)
        rec = dict(vm.run_virtual_accesses(lists, writes))
        del rec["wall_s"]
        return {"rec": rec, "stats": dict(vm.stats)}

    assert run() == run()


def test_a_one_vcpu_access_list_charges_access_batch_plus_guest_time() -> None:
    gfns = (np.arange(600, dtype=np.uint64) * 7) % 400
    writes = np.arange(600) % 3 == 0
    v = tdpmmu.VM(memory="64MiB", vcpus=1)
    r = v.run_virtual_accesses([gfns], [writes])
    h = tdpmmu.VM(memory="64MiB", vcpus=1)
    hb = h.access_batch(gfns, write=writes)
    x = r["vcpus"][0]
    assert x["faults"] == hb["faults"] and x["accesses"] == 600 and x["retry"] == 0
    host = h.cost_breakdown()
    for field in _core.COST_FIELDS:
        if field != "zone_lock_hold_ns":  # a virtual-time mechanism only
            assert r["breakdown"][field] == host[field], field
    c = tdpmmu.CostModel()
    assert r["breakdown"]["guest_ns"] == (x["accesses"] + x["retry"]) * c.guest_access_ns


def test_access_list_writes_to_mprotected_memory_are_memory_fault_exits() -> None:
    vm = tdpmmu.VM(memory="64MiB", vcpus=4)
    lists = [_pages(i * 64, 64) for i in range(4)]
    vm.run_virtual_accesses(lists)
    vm.mprotect(0, 256, False)
    r = vm.run_virtual_accesses(lists, [True, True, False, True])
    c = tdpmmu.CostModel()
    assert [v["memory_fault"] for v in r["vcpus"]] == [64, 64, 0, 64]
    assert r["vcpus"][2]["fixed"] == 64  # reads map the pages read-only
    assert r["breakdown"]["userspace_exit_ns"] == 3 * 64 * c.userspace_exit_ns
    for v in r["vcpus"]:
        assert v["accesses"] == v["hits"] + v["fixed"] + v["spurious"] + v["memory_fault"]
    vm.check()
    # An access that does not match its page's attribute stays an error.
    sw = tdpmmu.VM("sw_protected", memory="64MiB", vcpus=2)
    sw.set_memory_attributes(0, 64, True)
    with pytest.raises(tdpmmu.ConfigError, match="KVM_EXIT_MEMORY_FAULT"):
        sw.run_virtual_accesses([_pages(0, 64)], private=False)


@pytest.mark.parametrize(
    ("args", "kwargs", "needle"),
    [
        (([],), {}, "gfns_per_vcpu"),
        (([_pages(0, 4)] * 5,), {}, "gfns_per_vcpu"),
        (
            ([_pages(0, 4), np.array([1, 1 << 20], dtype=np.uint64)],),
            {},
            r"gfns_per_vcpu\[1\]\[1\]",
        ),
        (([_pages(0, 4)], [True, False]), {}, "writes_per_vcpu"),
        (([_pages(0, 4)], [np.ones(3, dtype=np.bool_)]), {}, "writes_per_vcpu"),
        (([_pages(0, 4)], True, True), {}, "private"),
        (([_pages(0, 4)] * 2,), {"cpus": [0]}, "cpus"),
        (([_pages(0, 4)],), {"mmu_lock": "rw"}, "mmu_lock"),
    ],
)
def test_run_virtual_accesses_refuses_bad_input_and_leaves_the_vm_unchanged(
    args: tuple[object, ...], kwargs: dict[str, object], needle: str
) -> None:
    vm = tdpmmu.VM(memory="64MiB", vcpus=4)
    before = dict(vm.stats)
    with pytest.raises(tdpmmu.ConfigError, match=needle):
        vm.run_virtual_accesses(*args, **kwargs)  # type: ignore[arg-type]
    assert dict(vm.stats) == before
    with pytest.raises(TypeError, match="gfns_per_vcpu"):
        vm.run_virtual_accesses([np.zeros(3)])  # type: ignore[list-item]
