"""Regression tests for multi-threaded use: each defect found by an adversarial run (hangs,
deadlocks, leaks, false invariant errors) with a test that failed before its fix. A scenario
that could hang runs in a subprocess with a timeout."""

import _thread
import pickle
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import tdpmmu
from tdpmmu import TdpmmuError, VmBugged


def run_isolated(code: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"hung for {timeout} s")


# ----- 1. run_memstress stops on a bugged VM and on a livelock -------------------------------


@pytest.mark.parametrize("vm_type", ["tdx", "snp"])
def test_memstress_stops_when_a_fault_bugs_the_vm(vm_type: str) -> None:
    p = run_isolated(
        f"""
        import tdpmmu
        vm = tdpmmu.VM("{vm_type}", memory="64MiB", hooks="private")
        if vm.vm_type == "tdx":
            vm.populate(0, 1, private=True)
            vm.finalize()
        else:
            vm.fault(0, private=True)
        vm.zap_gfn_range(0, 1)  # no private flag: the private design never hears of it
        try:
            vm.run_memstress(1, 1, 0, False, False, 100, 0)
        except tdpmmu.VmBugged as e:
            print("bugged:", e)
        """,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.startswith("bugged:")


def test_memstress_with_an_always_busy_hook_ends_in_a_livelock_error() -> None:
    p = run_isolated(
        """
        import tdpmmu
        class Busy:
            def link_external_spt(self, *a): return -16
            def set_external_spte(self, *a): return -16
            def remove_external_spte(self, *a): return 0
            def free_external_spt(self, *a): return 0
        vm = tdpmmu.VM("sw_protected", memory="64MiB", mirror=True, hooks=Busy())
        try:
            vm.run_memstress(1, 1, 0, False, False, 100, 0, private=True)
        except tdpmmu.TdpmmuError as e:
            print(type(e).__name__, e)
        vm.check()
        """,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert "livelock" in p.stdout


# ----- 5. destroy() racing faults ------------------------------------------------------------


@pytest.mark.parametrize("vm_type", ["default", "tdx"])
def test_destroy_racing_memstress_leaves_nothing_behind(vm_type: str) -> None:
    for attempt in range(5):
        vm = tdpmmu.VM(vm_type, memory="256MiB", vcpus=4)
        if vm_type == "tdx":
            vm.finalize()
        errors: list[BaseException] = []

        def work(v: tdpmmu.VM = vm, seed: int = attempt, out: list[BaseException] = errors) -> None:
            try:
                v.run_memstress(4, 1 << 14, 0, False, True, 100, seed)
            except TdpmmuError as exc:
                out.append(exc)

        t = threading.Thread(target=work)
        t.start()
        time.sleep(0.005 * (attempt + 1))
        vm.destroy()
        t.join(timeout=60)
        assert not t.is_alive()
        # Whatever the interleaving: the teardown audit passes, and a vCPU that ran after the
        # destroy stopped with the "destroyed" error, not a KVM bug.
        vm.check()
        assert not vm.bugged
        assert all("destroyed" in str(e) for e in errors), errors


# ----- 6. one vCPU index used from two threads ------------------------------------------------


def test_two_threads_on_one_vcpu_with_fast_zaps_keep_root_refcounts() -> None:
    vm = tdpmmu.VM(memory="64MiB", vcpus=2)
    stop = threading.Event()

    def faults(base: int) -> None:
        g = base
        while not stop.is_set():
            # Small batches: after each fast zap the next one reloads the vCPU's roots.
            vm.fault_batch(np.arange(g % 4096, g % 4096 + 8, dtype=np.uint64), vcpu=0)
            g += 8

    threads = [threading.Thread(target=faults, args=(k * 2048,)) for k in range(2)]
    for t in threads:
        t.start()
    deadline = time.perf_counter() + 2.0
    while time.perf_counter() < deadline:
        vm.zap_all_fast()
    stop.set()
    for t in threads:
        t.join()
    vm.check()  # "root N refcount 1 but 0 holders" before vCPUs were serialized


# ----- 7. check() while other threads work ---------------------------------------------------


@pytest.mark.parametrize("vm_type", ["default", "tdx", "snp"])
def test_check_during_memstress_sees_consistent_totals(vm_type: str) -> None:
    vm = tdpmmu.VM(vm_type, memory="512MiB", vcpus=3)
    if vm_type == "tdx":
        vm.finalize()
    t = threading.Thread(target=lambda: vm.run_memstress(3, 1 << 15, 0, False, True, 50, 1))
    t.start()
    checks = 0
    while t.is_alive():
        vm.check()  # raised "N leaves present at level 1, stats say M" before
        checks += 1
    t.join()
    vm.check()
    assert checks > 0


# ----- 8. SNP guest_memfd: vCPUs faulting the same pages -------------------------------------


@pytest.mark.parametrize("folio", ["4K", "2M"])
@pytest.mark.parametrize("random_access", [False, True])
def test_snp_gmem_overlapping_vcpus_prepare_and_validate_once(
    folio: str, random_access: bool
) -> None:
    pages = 1 << 14
    vm = tdpmmu.VM("snp", memory="256MiB", vcpus=4, folio=folio, backing="2M")
    vm.run_memstress(4, pages, 0, True, random_access, 100, 0)
    # Random order touches each page only with high probability: fault the rest.
    vm.fault_batch(np.arange(pages), private=True)
    s = vm.stats
    assert not vm.bugged
    assert s["pvalidate_errors"] == 0 and s["rmp_failures"] == 0
    # Each folio's RMP entry was made once, each page (or 2M entry) validated once.
    entries = pages if folio == "4K" else pages // 512
    assert s["gmem_prepare"] == entries
    assert s["pvalidate"] == entries
    vm.check()


def test_snp_demand_paging_overlapped_runs_clean() -> None:
    for seed in range(3):
        r = tdpmmu.demand_paging(
            vm_type="snp", vcpus=4, bytes_per_vcpu="16M", overlap=True, seed=seed
        )
        assert r.stats["pvalidate_errors"] == 0


# ----- 10. Ctrl-C during long calls ----------------------------------------------------------


def test_ctrl_c_interrupts_a_long_populate_promptly() -> None:
    vm = tdpmmu.VM(memory="64GiB")
    timer = threading.Timer(0.3, _thread.interrupt_main)
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        vm.populate(0, 1 << 24)  # 64 GiB at 4K: far longer than the timer
    timer.join()
    s = vm.stats
    assert 0 < s["pages_4k"] < 1 << 24
    vm.check()  # consistent: every page it did install is accounted


def test_ctrl_c_interrupts_memstress() -> None:
    vm = tdpmmu.VM(memory="16GiB", vcpus=2)
    timer = threading.Timer(0.3, _thread.interrupt_main)
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        vm.run_memstress(2, 1 << 21, 0, False, True, 100, 0)
    timer.join()
    # Stopped part-way (an interrupt noticed only after the call would see every page done).
    assert vm.stats["pages_4k"] < 2 << 21
    vm.check()


# ----- 12. smaller ones ----------------------------------------------------------------------


def test_stats_pickle_round_trip() -> None:
    vm = tdpmmu.VM(memory="64MiB")
    vm.fault(3)
    s = vm.stats
    assert pickle.loads(pickle.dumps(s)) == s


def test_tdx_option_on_sw_protected_names_tdx() -> None:
    with pytest.raises(tdpmmu.ConfigError, match=r"^tdx"):
        tdpmmu.VM("sw_protected", tdx={"mirror": True})


def test_folio_on_a_default_vm_is_refused() -> None:
    with pytest.raises(tdpmmu.ConfigError, match="folio"):
        tdpmmu.VM(folio="2M")


def test_bugged_vm_raises_for_everything() -> None:
    vm = tdpmmu.VM("snp", memory="64MiB", hooks="private")
    vm.fault(0, private=True)
    vm.zap_gfn_range(0, 1)
    with pytest.raises(VmBugged):
        vm.fault_batch(np.arange(4), private=True)
    with pytest.raises(VmBugged):
        vm.run_memstress(1, 4, 0, False, False, 100, 0)


# ----- 3, 4. allocation failures and the memory budget ---------------------------------------


@pytest.mark.parametrize(
    ("make", "call"),
    [
        # Slot bitmaps of 2^40 pages: aborted the interpreter in the allocator before.
        (lambda: tdpmmu.VM(levels=5), lambda vm: vm.add_memslot(1 << 18, (1 << 40) - (1 << 18))),
        # RMP entries of a 128 TiB guest_memfd slot: aborted in the RMP allocation before.
        (lambda: tdpmmu.VM("snp"), lambda vm: vm.add_memslot(1 << 35, 1 << 35, gmem=True)),
        # A slot whose page tables could grow past the machine: populate was OOM-killed before.
        (lambda: tdpmmu.VM(memory="1GiB"), lambda vm: vm.add_memslot(1 << 18, 1 << 35)),
    ],
)
def test_huge_slots_are_refused_before_allocating(make, call) -> None:  # type: ignore[no-untyped-def]
    vm = make()
    before = (vm.memslots(), vm.committed_bytes, vm.stats.to_dict())
    with pytest.raises(tdpmmu.OutOfMemory, match="budget"):
        call(vm)
    assert (vm.memslots(), vm.committed_bytes, vm.stats.to_dict()) == before
    vm.check()


def test_every_page_table_tree_counts_against_the_budget() -> None:
    # An 11 TiB TD: one tree fits the machine, the mirror tree plus the S-EPT do not.
    with pytest.raises(tdpmmu.OutOfMemory, match="2 trees"):
        tdpmmu.VM("tdx", memory="11TiB", budget="40GiB")
    tdpmmu.VM("default", memory="11TiB", budget="40GiB")


def test_budget_is_committed_and_released_with_memslots() -> None:
    vm = tdpmmu.VM(memory="64MiB", budget="1MiB")
    base = vm.committed_bytes
    assert 0 < base <= vm.budget == 1 << 20
    slot = vm.add_memslot(1 << 20, 512)
    assert vm.committed_bytes > base
    with pytest.raises(tdpmmu.OutOfMemory):
        vm.add_memslot(1 << 22, 1 << 18)  # 1 GiB more: over the 1 MiB budget
    vm.delete_memslot(slot)
    assert vm.committed_bytes == base
    with pytest.raises(tdpmmu.OutOfMemory, match="budget of 4096 bytes"):
        tdpmmu.VM(memory="64MiB", budget=4096)


def test_ctrl_c_interrupts_a_long_fault_batch() -> None:
    vm = tdpmmu.VM(memory="32GiB")
    gfns = np.arange(1 << 23, dtype=np.uint64)
    timer = threading.Timer(0.2, _thread.interrupt_main)
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        vm.fault_batch(gfns)
    timer.join()
    assert vm.stats["pages_4k"] < 1 << 23  # stopped part-way
    vm.check()
