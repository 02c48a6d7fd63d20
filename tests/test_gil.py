"""No binding waits for mmu_lock while holding the GIL: a Python hook object (which needs the
GIL while its thread holds mmu_lock) and a second thread using the same VM must not freeze the
interpreter. Each scenario runs in a subprocess with a timeout, so a deadlock fails the test."""

import subprocess
import sys
import textwrap

import pytest

SCENARIO = textwrap.dedent(
    """
    import threading, numpy as np, tdpmmu

    class Slow:
        def link_external_spt(self, gfn, level, pfn): return self.work()
        def set_external_spte(self, gfn, level, spte): return self.work()
        def remove_external_spte(self, gfn, level, spte): return self.work()
        def free_external_spt(self, gfn, level, pfn): return self.work()
        def work(self):
            sum(range(200))  # Python work: needs the GIL while mmu_lock is held
            return 0

    vm = tdpmmu.VM("tdx", memory="64MiB", vcpus=2, hooks=Slow())
    {setup}
    stop = threading.Event()
    rounds = [0]

    def churn():
        # Zaps hold mmu_lock for write while every removal calls into Python.
        while not stop.is_set():
            vm.fault_batch(np.arange(0, 256, dtype=np.uint64), private=True, vcpu=1)
            vm.punch_hole(0, 256)
            rounds[0] += 1

    t = threading.Thread(target=churn)
    t.start()
    i = 0
    while rounds[0] < 20:  # keep calling while the other thread zaps
        {call}
        i += 1
    stop.set()
    t.join()
    vm.check()
    print("ok")
    """
)

CALLS = {
    "walk": ("vm.finalize()", "vm.walk(i % 256, private=True)"),
    "fault": ("vm.finalize()", "vm.fault(300 + i % 64, private=True, vcpu=0)"),
    "add_memslot": (
        "vm.finalize()",
        "s = vm.add_memslot((1 << 20) + i * 512, 512); vm.delete_memslot(s)",
    ),
    "stats_and_check": ("vm.finalize()", "vm.stats; vm.memslots(); vm.roots()"),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_hook_object_and_second_thread_do_not_deadlock(name: str) -> None:
    setup, call = CALLS[name]
    code = SCENARIO.format(setup=setup, call=call)
    try:
        p = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{name}: the interpreter froze (GIL <-> mmu_lock deadlock)")
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "ok"


def test_finalize_releases_the_gil() -> None:
    code = textwrap.dedent(
        """
        import threading, tdpmmu
        class H:
            def link_external_spt(self, *a): return 0
            def set_external_spte(self, *a): return 0
            def remove_external_spte(self, *a): return 0
            def free_external_spt(self, *a): return 0
        vm = tdpmmu.VM("tdx", memory="64MiB", hooks=H())
        done = threading.Event()
        def zap():
            while not done.is_set():
                vm.zap_gfn_range(0, 16)
        t = threading.Thread(target=zap); t.start()
        vm.populate(0, 64, private=True)
        vm.finalize()
        done.set(); t.join()
        print("ok")
        """
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
