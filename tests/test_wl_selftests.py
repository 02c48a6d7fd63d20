"""The non-demand-paging selftest workloads (kvm_page_table, mmu_stress, memslot_perf,
pre_fault_memory, private_mem_conversions' CLI) and the engine operation they add
(``VM.access_batch``): stages, checks, labels, bad flags, JSON round trips, every VM type."""

import argparse
import re
from typing import Any

import numpy as np
import pytest

import tdpmmu
from tdpmmu import spte
from tdpmmu.vm import VM
from tdpmmu.workloads import WORKLOADS, WorkloadResult
from tdpmmu.workloads.kvm_page_table import kvm_page_table, leaf_level
from tdpmmu.workloads.pre_fault_memory import TEST_PAGES, pre_fault_ioctl, pre_fault_memory

VM_TYPES = ("default", "sw_protected", "tdx", "snp")
TIME = re.compile(r"\d+\.\d{9}s")


def parse(name: str, argv: list[str]) -> dict[str, object]:
    """The workload kwargs its CLI flags give (``add_arguments`` + ``from_args``)."""
    wl = WORKLOADS[name]
    p = argparse.ArgumentParser(exit_on_error=False)
    wl.add_arguments(p)
    return wl.from_args(p.parse_args(argv))


def refused(name: str, argv: list[str]) -> None:
    """The flags are refused by the workload's parser (argparse exits with status 2)."""
    wl = WORKLOADS[name]
    p = argparse.ArgumentParser()
    wl.add_arguments(p)
    with pytest.raises(SystemExit) as e:
        p.parse_args(argv)
    assert e.value.code == 2


def round_trip(r: WorkloadResult) -> None:
    back = WorkloadResult.from_json(r.to_json())
    assert back == r


# ----- VM.access_batch ------------------------------------------------------------------------


def test_access_batch_hits_cost_nothing_and_misses_fault() -> None:
    vm = tdpmmu.VM(memory="4M", backing="2M", vcpus=2)
    heads = np.array([0, 512], dtype=np.uint64)
    r = vm.access_batch(heads, write=False)
    # Two read faults, each mapping a 2M leaf (KVM maps a read writable when the host allows).
    assert (r["faults"], r["accesses"]) == (2, 2)
    assert r["modeled_ns"] > 0
    assert vm.stats["pages_2m"] == 2
    # Every page of both 2M leaves is now served by the walk: no fault, no modeled time.
    before = vm.stats["pf_taken"]
    r = vm.access_batch(np.arange(1024, dtype=np.uint64), write=np.ones(1024, bool))
    assert r["faults"] == 0 and r["modeled_ns"] == 0.0
    assert vm.stats["pf_taken"] == before


def test_access_batch_write_to_read_only_leaf_faults_once() -> None:
    vm = tdpmmu.VM(memory="2M")
    slot_gfns = np.arange(8, dtype=np.uint64)
    vm.access_batch(slot_gfns, write=False)
    vm.set_dirty_logging(0, True)  # write-protects every leaf
    r = vm.access_batch(slot_gfns, write=True)
    assert r["faults"] == 8
    assert vm.stats["pf_fast"] >= 8
    # Reads after it take none.
    assert vm.access_batch(slot_gfns, write=False)["faults"] == 0


def test_access_batch_bad_arguments_refused() -> None:
    vm = tdpmmu.VM(memory="2M")
    with pytest.raises(tdpmmu.ConfigError, match="write"):
        vm.access_batch(np.arange(4, dtype=np.uint64), write=np.ones(3, bool))
    with pytest.raises(tdpmmu.ConfigError, match="gfns"):
        vm.access_batch(np.array([vm.max_gfn], dtype=np.uint64))
    with pytest.raises(tdpmmu.ConfigError, match="vcpu"):
        vm.access_batch(np.arange(4, dtype=np.uint64), vcpu=1)
    with pytest.raises(TypeError, match="write"):
        vm.access_batch(np.arange(4, dtype=np.uint64), write=[True] * 4)  # type: ignore[arg-type]
    assert vm.stats["pf_taken"] == 0


# ----- kvm_page_table -------------------------------------------------------------------------


@pytest.mark.parametrize("vm_type", VM_TYPES)
@pytest.mark.parametrize("backing", ["anonymous", "anonymous_thp"])
def test_kvm_page_table_stages_and_levels(vm_type: str, backing: str) -> None:
    r = kvm_page_table(vcpus=3, test_bytes="6M", backing=backing, vm_type=vm_type)
    lines = list(r.lines)
    assert lines[0] == "Testing guest mode: PA-bits:ANY, VA-bits:48,  4K pages"
    assert lines[1] == f"Testing memory backing src type: {backing}"
    gran = 0x1000 if backing == "anonymous" else 0x200000
    assert lines[2] == f"Testing memory backing src granularity: {gran:#x}"
    assert lines[3] == "Testing memory size(aligned): 0x600000"
    assert lines[4].startswith("Guest physical test memory offset: 0x")
    assert lines[5].startswith("Host  virtual  test memory offset: 0x")
    assert lines[6:8] == ["Number of testing vCPUs: 3", "Started all vCPUs successfully"]
    for i, stage in enumerate(
        ("KVM_CREATE_MAPPINGS", "KVM_UPDATE_MAPPINGS", "KVM_ADJUST_MAPPINGS")
    ):
        line, blank = lines[8 + 2 * i], lines[9 + 2 * i]
        assert line.startswith(f"{stage}: total execution time: ") and TIME.search(line)
        assert blank == ""
        assert r.metrics[f"{stage.lower()}_total_execution_time_s"] >= 0
    assert r.ok and all(c["ok"] for c in r.detail["checks"])
    huge = 1 if backing == "anonymous" else 2
    assert [c["name"] for c in r.detail["checks"]] == [
        f"every backing page mapped at level {huge} after KVM_CREATE_MAPPINGS",
        "every page written under dirty logging mapped at 4 KiB after KVM_UPDATE_MAPPINGS",
        "every page written under dirty logging set in the slot's dirty log",
        f"every backing page mapped at level {huge} again after KVM_ADJUST_MAPPINGS "
        "(huge mappings recovered when dirty logging stopped)",
        "VM.check() holds after the run",
    ]
    stages = r.detail["stages"]
    npages = 6 * 256
    step = 1 if backing == "anonymous" else 512
    written = npages if step == 1 else npages // step
    # Virtual time (the default): the 3 vCPUs run each stage at once. Create: one fault fixes
    # each backing page; the vCPUs racing for it find it mapped (SPURIOUS) or hit.
    create = stages["KVM_CREATE_MAPPINGS"]
    assert sum(v["fixed"] for v in create) == npages // step
    for v in create:
        assert v["pages"] == npages // step
        assert v["pages"] == v["hits"] + v["fixed"] + v["spurious"]
    # Update under dirty logging: each written page is fixed once.
    assert sum(v["fixed"] for v in stages["KVM_UPDATE_MAPPINGS"]) == written
    # Adjust: huge mappings came back when logging stopped; reads fault nowhere.
    assert all(v["faults"] == 0 for v in stages["KVM_ADJUST_MAPPINGS"])
    assert r.detail["virtual"]["KVM_CREATE_MAPPINGS"]["outcomes"]["fixed"] == npages // step
    assert r.stats["pages_2m"] == (0 if step == 1 else npages // 512)
    assert r.stats["pages_4k"] == (npages if step == 1 else 0)
    round_trip(r)


def test_kvm_page_table_adjust_recovery_is_checked() -> None:
    # The adjust check must fail when KVM does not recover huge pages: pin it by making a
    # page of every 2M range write-tracked (KVM keeps such ranges small).
    vm = tdpmmu.VM(memory="4M", backing="2M")
    vm.access_batch(np.array([0], dtype=np.uint64), write=False)
    assert leaf_level(vm, 0) == 2
    vm.set_dirty_logging(0, True)
    assert leaf_level(vm, 0) == 1  # eager split
    vm.write_track_gfn(3)
    vm.set_dirty_logging(0, False)
    assert leaf_level(vm, 0) == 1  # a write-tracked page keeps its 2M range small
    assert leaf_level(vm, 600) == 0


def test_kvm_page_table_failed_check_is_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    # A dirty log that lost the guest's writes fails that check; the run still returns.
    real = VM.get_dirty_log

    def empty(self: VM, slot: int) -> Any:
        return np.zeros_like(np.asarray(real(self, slot)))

    monkeypatch.setattr(VM, "get_dirty_log", empty)
    r = kvm_page_table(test_bytes="1M")
    assert not r.ok
    failed = [c for c in r.detail["checks"] if not c["ok"]]
    assert [c["name"] for c in failed] == [
        "every page written under dirty logging set in the slot's dirty log"
    ]
    assert failed[0]["detail"] == "256 of 256 written pages not in the dirty log"
    assert r.metrics["kvm_adjust_mappings_total_execution_time_s"] > 0


def test_kvm_page_table_clock_option_counts_guest_time() -> None:
    host = kvm_page_table(vcpus=2, test_bytes="4M", backing="anonymous_thp", clock="host")
    virt = kvm_page_table(vcpus=2, test_bytes="4M", backing="anonymous_thp", clock="virtual")
    h, v = host.metrics, virt.metrics
    assert h["kvm_adjust_mappings_total_execution_time_s"] == 0.0  # all hits
    # Virtual: 1024 reads x guest_access_ns per vCPU, the two vCPUs at the same time.
    assert v["kvm_adjust_mappings_total_execution_time_s"] == pytest.approx(1024 * 150e-9)
    assert (
        v["kvm_create_mappings_total_execution_time_s"]
        > (h["kvm_create_mappings_total_execution_time_s"])
    )
    assert "virtual" not in host.detail


def test_kvm_page_table_host_clock_runs_vcpus_in_turn() -> None:
    # Host side: vCPU 0 runs its whole list first and takes every fault (one per backing
    # page); the others find the pages mapped (at most one fault each: the model loads a
    # vCPU's root on its first fault).
    r = kvm_page_table(vcpus=3, test_bytes="6M", clock="host")
    stages = r.detail["stages"]
    npages = 6 * 256
    assert stages["KVM_CREATE_MAPPINGS"][0]["faults"] == npages
    assert all(v["faults"] <= 1 for v in stages["KVM_CREATE_MAPPINGS"][1:])
    assert stages["KVM_UPDATE_MAPPINGS"][0]["faults"] == npages
    assert all(v["faults"] == 0 for v in stages["KVM_ADJUST_MAPPINGS"])
    # The stage time is the slowest vCPU's: vCPU 0's.
    t = r.metrics["kvm_create_mappings_total_execution_time_s"]
    assert t == stages["KVM_CREATE_MAPPINGS"][0]["modeled_ns"] / 1e9


def test_kvm_page_table_virtual_clock_has_the_vcpus_contend() -> None:
    # 8 vCPUs over the same 1024 pages in virtual time: the first touches race (more than one
    # vCPU fixes pages, the others get SPURIOUS), and with mmu_lock taken for write their
    # faults queue on it, so the create stage takes longer than with it taken for read.
    def run(lock: str) -> WorkloadResult:
        return kvm_page_table(vcpus=8, test_bytes="4M", mmu_lock=lock)

    shared, excl = run("shared"), run("exclusive")
    create = shared.detail["stages"]["KVM_CREATE_MAPPINGS"]
    assert sum(1 for v in create if v["fixed"] > 0) > 1
    assert sum(v["spurious"] for v in create) > 0
    key = "kvm_create_mappings_total_execution_time_s"
    assert excl.metrics[key] > shared.metrics[key]
    vx = excl.detail["virtual"]["KVM_CREATE_MAPPINGS"]
    assert vx["lock_contended"] > 0 and vx["lock_wait_ns"] > 0
    assert shared.detail["virtual"]["KVM_CREATE_MAPPINGS"]["lock_wait_ns"] == 0
    # Deterministic: the same run again gives the same modeled figures.
    again = run("shared")
    assert again.metrics[key] == shared.metrics[key]
    assert again.detail["stages"] == shared.detail["stages"]


def test_kvm_page_table_offset_and_rounding() -> None:
    r = kvm_page_table(test_bytes="3M", backing="anonymous_thp", offset="1G")
    assert "Testing memory size(aligned): 0x400000" in r.lines
    assert "Guest physical test memory offset: 0x40000000" in r.lines
    with pytest.raises(tdpmmu.ConfigError, match="offset"):
        kvm_page_table(test_bytes="4M", backing="anonymous_thp", offset=0x40001000)
    with pytest.raises(tdpmmu.ConfigError, match="test_bytes"):
        kvm_page_table(test_bytes="4M", offset=0)
    with pytest.raises(tdpmmu.ConfigError, match="vcpus"):
        kvm_page_table(vcpus=0, test_bytes="4M")


def test_kvm_page_table_flags() -> None:
    kw = parse("kvm_page_table", ["-v", "4", "-b", "8M", "-s", "anonymous_thp", "-p", "0x40000000"])
    assert kw == {"vcpus": 4, "test_bytes": 8 << 20, "backing": "anonymous_thp", "offset": 1 << 30}
    assert parse("kvm_page_table", ["-m", "0"])["test_bytes"] == 1 << 30
    refused("kvm_page_table", ["-v", "0"])
    refused("kvm_page_table", ["-b", "12x"])
    refused("kvm_page_table", ["-s", "anonymous_hugetlb_16kb"])
    refused("kvm_page_table", ["-m", "3"])
    assert WORKLOADS["kvm_page_table"].command == "kvm-page-table"


# ----- pre_fault_memory -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("vm_type", "private"),
    [("default", None)] + [(t, p) for t in VM_TYPES[1:] for p in (None, False)],
)
def test_pre_fault_memory_checks(vm_type: str, private: bool | None) -> None:
    r = pre_fault_memory(private=private, vm_type=vm_type)
    checks = {c["name"]: c for c in r.detail["checks"]}
    assert r.ok and all(c["ok"] for c in checks.values())
    for k in (
        "pre-fault the whole 2 MiB: 0 bytes left and success",
        "pre-fault past the slot's end: 4096 bytes left and ENOENT",
        "pre-fault outside the slot: 4096 bytes left and ENOENT",
        "the guest's reads of the pre-faulted slot take no fault",
        "VM.check() holds after the run",
    ):
        assert k in checks
    kind = "private" if private is None and vm_type != "default" else "shared"
    assert r.params["private"] == (kind == "private")
    assert r.lines[1].endswith(f"{kind}: 0 bytes left, ret 0 (1 calls)")
    assert r.lines[2].endswith(f"{kind}: 4096 bytes left, ret ENOENT (2 calls)")
    assert r.lines[3].endswith(f"{kind}: 4096 bytes left, ret ENOENT (1 calls)")
    assert TIME.search(r.lines[4]) and r.lines[4].startswith("Pre-fault time: ")
    assert r.lines[5].startswith("Guest read pass time: ") and r.lines[5].endswith("faults: 0")
    assert r.metrics["guest_pass_faults"] == 0
    assert r.metrics["pre_fault_time_s"] > 0
    # A pre-fault is an ioctl: it counts no pf_taken.
    assert r.stats["pf_taken"] == 0
    round_trip(r)


def test_pre_fault_ioctl_progress_and_enoent() -> None:
    vm = tdpmmu.VM(memory="2M")
    base = 0x10000
    vm.add_memslot(base, TEST_PAGES)
    assert pre_fault_ioctl(vm, base + 512, 2, None) == (0, 1)
    assert pre_fault_ioctl(vm, base + 513, 1, None) == (-2, 0)
    assert leaf_level(vm, base + 512) == 1
    # Without the pre-fault the guest's read faults: the workload's check can fail.
    r = vm.access_batch(np.array([base], dtype=np.uint64), write=False)
    assert r["faults"] == 1


def test_pre_fault_memory_refuses_private_on_default_vm() -> None:
    with pytest.raises(tdpmmu.ConfigError, match="private"):
        pre_fault_memory(private=True)
    assert parse("pre_fault_memory", []) == {}
    refused("pre_fault_memory", ["-v", "2"])


def test_spte_helpers_used_by_leaf_level() -> None:
    vm = tdpmmu.VM(memory="2M")
    assert leaf_level(vm, 5) == 0
    vm.fault(5)
    assert leaf_level(vm, 5) == 1
    assert spte.is_shadow_present(vm.spte(5))


# ----- mmu_stress -----------------------------------------------------------------------------


@pytest.mark.parametrize("vm_type", ["default", "sw_protected", "snp"])
@pytest.mark.parametrize("hugepages", [False, True])
def test_mmu_stress_stages(vm_type: str, hugepages: bool) -> None:
    from tdpmmu.workloads.mmu_stress import STAGES, mmu_stress

    r = mmu_stress(vcpus=4, mem_bytes="16M", slot_bytes="4M", hugepages=hugepages, vm_type=vm_type)
    assert r.lines[0] == "Running with 0.015625gb of guest memory and 4 vCPUs"
    for name in ("run 1", "reset", "run 2", "mprotect RO", "mprotect RW"):
        assert f"Waiting for vCPUs to finish {name}..." in r.lines
        assert f"All vCPUs finished {name}, releasing..." in r.lines
    summary = re.fullmatch(
        r"run1 = (\S+)s, reset = (\S+)s, run2 = (\S+)s, ro = (\S+)s, rw = (\S+)s", r.lines[-1]
    )
    assert summary is not None
    for stage, text in zip(STAGES, summary.groups(), strict=True):
        assert float(text) == pytest.approx(r.metrics[f"{stage}_s"], abs=1e-9)
    assert [c["name"] for c in r.detail["checks"]] == [
        "run 1: every page is mapped",
        "reset: the MMU reset keeps the root",
        "run 2: no fault (every page already mapped)",
        "mprotect RO: nothing is left mapped",
        "mprotect RO: every write exits to userspace, each exit charged userspace_exit_ns",
        "mprotect RO: every write ends in -EFAULT with nothing mapped",
        "mprotect RW: every page is mapped again",
        "VM.check() holds after the stages",
        "VM.check() holds after the even slots' deletion and the munmap",
    ]
    assert r.ok and all(c["ok"] for c in r.detail["checks"])
    # The RO writes ran through the virtual-time engine: one memory-fault exit (-EFAULT) per
    # page, each a return to userspace charged in the VM's ledger.
    assert r.stats["pf_memory_fault"] == 4096
    c = tdpmmu.CostModel()
    assert r.cost_breakdown["userspace_exit_ns"] == pytest.approx(4096 * c.userspace_exit_ns)
    assert r.metrics["reset_s"] == pytest.approx(c.exit_entry_ns / 1e9)
    # ro: 1024 EFAULT writes per vCPU, each exit + handling + userspace + guest access.
    efault = c.exit_entry_ns + c.fault_handling_ns + c.userspace_exit_ns + c.guest_access_ns
    assert r.metrics["ro_s"] >= 1024 * efault / 1e9
    assert r.detail["slots"] == 4
    assert r.spec.vm_type == vm_type
    round_trip(r)


def test_mmu_stress_host_clock_run2_is_free() -> None:
    from tdpmmu.workloads.mmu_stress import mmu_stress

    r = mmu_stress(vcpus=2, mem_bytes="4M", slot_bytes="1M", clock="host")
    assert r.metrics["run2_s"] == 0.0
    assert r.metrics["run1_s"] > 0 and r.metrics["rw_s"] > 0
    # ro on the host clock: access_batch per vCPU; the returns to userspace are added from the
    # CostModel, outside the VM's ledger.
    names = [c["name"] for c in r.detail["checks"]]
    assert r.ok and len(names) == 8
    assert not any("exits to userspace" in n for n in names)
    assert r.stats["pf_memory_fault"] == 1024
    assert r.cost_breakdown["userspace_exit_ns"] == 0.0
    c = tdpmmu.CostModel()
    assert r.metrics["ro_s"] >= 512 * (c.fault_handling_ns + c.userspace_exit_ns) / 1e9


def test_mmu_stress_ro_writes_overlap_in_virtual_time() -> None:
    from tdpmmu.workloads.mmu_stress import mmu_stress

    # The RO writes of 8 vCPUs run at once: the write part takes about one vCPU's time, not
    # the sum of all eight (and all vCPUs took their own exits).
    r = mmu_stress(vcpus=8, mem_bytes="8M", slot_bytes="2M")
    per = r.detail["stages"]["ro"]["write_modeled_ns_per_vcpu"]
    assert len(per) == 8 and all(ns > 0 for ns in per)
    assert r.metrics["ro_s"] < sum(per) / 1e9 / 2


def test_mmu_stress_size_line_and_progress() -> None:
    from tdpmmu.workloads.mmu_stress import gib_text, mmu_stress

    assert [gib_text(n) for n in (128 << 30, 1 << 30, 64 << 20, 3 << 29, 4096)] == [
        "128",
        "1",
        "0.0625",
        "1.5",
        "0.000003814697265625",
    ]
    calls: list[tuple[int, int, str]] = []
    r = mmu_stress(
        vcpus=2,
        mem_bytes="64M",
        slot_bytes="16M",
        progress=lambda done, total, label: calls.append((done, total, label)),
    )
    assert r.lines[0] == "Running with 0.0625gb of guest memory and 2 vCPUs"
    # The step count is known before the first stage runs, and every stage reports as it ends.
    assert calls == [
        (0, 6, "memslots added"),
        (1, 6, "run1"),
        (2, 6, "reset"),
        (3, 6, "run2"),
        (4, 6, "ro"),
        (5, 6, "rw"),
        (6, 6, "teardown"),
    ]
    r = mmu_stress(vcpus=1, mem_gib=1, slot_gib=1, clock="host")
    assert r.lines[0] == "Running with 1gb of guest memory and 1 vCPUs"


def test_mmu_stress_failed_check_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    from tdpmmu.workloads.mmu_stress import mmu_stress

    # A host whose mprotect() changes nothing: the pages stay mapped writable, so the RO
    # writes hit. The workload's checks catch it; the run still returns every figure.
    monkeypatch.setattr(VM, "mprotect", lambda self, gfn, npages, writable: 0)
    r = mmu_stress(vcpus=2, mem_bytes="4M", slot_bytes="1M")
    assert not r.ok
    failed = [c for c in r.detail["checks"] if not c["ok"]]
    assert [c["name"] for c in failed] == [
        "mprotect RO: nothing is left mapped",
        "mprotect RO: every write exits to userspace, each exit charged userspace_exit_ns",
        "mprotect RO: every write ends in -EFAULT with nothing mapped",
    ]
    assert failed[0]["detail"] == "1024 pages mapped"
    assert r.metrics["rw_s"] >= 0 and r.lines[-1].startswith("run1 = ")


def test_mmu_stress_refusals_and_flags() -> None:
    from tdpmmu.workloads.mmu_stress import mmu_stress

    with pytest.raises(tdpmmu.ConfigError, match="vm_type"):
        mmu_stress(vcpus=1, mem_bytes="4M", slot_bytes="4M", vm_type="tdx")
    with pytest.raises(tdpmmu.ConfigError, match="vcpus"):
        mmu_stress(vcpus=8, mem_bytes="4M", slot_bytes="4M", hugepages=True)
    with pytest.raises(tdpmmu.ConfigError, match="mem_bytes"):
        mmu_stress(vcpus=1, mem_bytes="3M", slot_bytes="2M", hugepages=True)
    kw = parse("mmu_stress", ["-c", "3", "-m", "4", "-s", "1", "-H"])
    assert kw == {
        "vcpus": 3,
        "mem_gib": 4,
        "slot_gib": 1,
        "hugepages": True,
        "mem_bytes": None,
        "slot_bytes": None,
    }
    assert parse("mmu_stress", ["--mem-bytes", "8M"])["mem_bytes"] == 8 << 20
    refused("mmu_stress", ["-c", "0"])
    refused("mmu_stress", ["-m", "1.5"])
    refused("mmu_stress", ["-s", "0"])


# ----- private_mem_conversions (the selftest as a workload) -----------------------------------


@pytest.mark.parametrize(
    "sim",
    [
        {"vm_type": "sw_protected"},
        {"vm_type": "sw_protected", "mirror": True},
        {"vm_type": "tdx"},
    ],
    ids=["sw_protected", "sw_protected-mirror", "tdx"],
)
def test_private_mem_conversions_test_stages(sim: dict[str, object]) -> None:
    from tdpmmu.workloads.conversions import private_mem_conversions_test

    r = private_mem_conversions_test(vcpus=2, memslots=2, **sim)  # type: ignore[arg-type]
    names = [
        "explicit conversion",
        "explicit conversion with fallocate",
        "punch hole imprecise",
        "punch hole precise",
    ]
    assert [line.split(":")[0] for line in r.lines] == names
    for line, name in zip(r.lines, names, strict=True):
        assert re.fullmatch(rf"{name}: pass, \d+\.\d{{9}}s", line)
        assert r.metrics[f"{name.replace(' ', '_')}_s"] > 0
    # Every check ran for each range of each vCPU and pass (2 passes per stage kind).
    checks = {c["name"]: c for c in r.detail["checks"]}
    assert r.ok and len(checks) == 10
    assert checks["writing a range converted private maps private memory"]["detail"] == (
        f"held {2 * 2 * 5} times"
    )
    assert checks["reading a punched range faults it back in as private memory"]["detail"] == (
        f"held {2 * 2 * 5} times"
    )
    assert r.stats["conversions"] > 0
    round_trip(r)


def test_private_mem_conversions_test_refusals_and_flags() -> None:
    from tdpmmu.workloads.conversions import private_mem_conversions_test

    with pytest.raises(tdpmmu.ConfigError, match="vm_type"):
        private_mem_conversions_test(vm_type="default")
    with pytest.raises(tdpmmu.ConfigError, match="vm_type"):
        private_mem_conversions_test(vm_type="snp")
    with pytest.raises(tdpmmu.ConfigError, match="memslots"):
        private_mem_conversions_test(memslots=3)
    assert parse("private_mem_conversions", ["-s", "anonymous_thp", "-n", "4", "-m", "4"]) == {
        "shared_backing": "anonymous_thp",
        "vcpus": 4,
        "memslots": 4,
    }
    refused("private_mem_conversions", ["-n", "0"])
    refused("private_mem_conversions", ["-s", "bogus"])
    assert WORKLOADS["private_mem_conversions"].selftest == "private_mem_conversions_test"


def test_conversion_check_detects_a_leftover_private_leaf() -> None:
    # What the workload's checks read: a private leaf stays until a conversion or punch zaps
    # it, so a missing zap would be seen.
    from tdpmmu.workloads.conversions import _leaf

    vm = tdpmmu.VM(vm_type="sw_protected", memory="2M")
    vm.fault(3, private=True)
    assert _leaf(vm, 3, False) is not None
    vm.set_memory_attributes(3, 1, private=False)
    assert _leaf(vm, 3, False) is None
