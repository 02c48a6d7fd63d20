"""What each MMU operation beyond the first-touch fault costs: modeled time and host time.

    python benches/mmu_ops.py [--memory 1GiB]

For each operation (dirty logging, GET/CLEAR_DIRTY_LOG, the fast page fault, aging, eager
split, huge-page and NX recovery, write tracking, memslot moves, TDX huge pages and both TD
teardown orders) it builds a fresh VM in the state the operation needs, runs it once and prints
the modeled time the VM's ledger grew by and the host wall time, in total and per unit (SPTE,
page or fault). Modeled figures are deterministic; host figures are one run on this machine.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

import tdpmmu
from tdpmmu.sizes import parse_size

Row = tuple[str, str, int, float, float]


def measure(name: str, unit: str, vm: tdpmmu.VM, op: Callable[[], int]) -> Row:
    """Run ``op`` on ``vm``; (name, unit, units, modeled ns, host ns)."""
    before = float(vm.stats["modeled_ns"])
    t0 = time.perf_counter()
    units = op()
    wall = time.perf_counter() - t0
    return name, unit, units, float(vm.stats["modeled_ns"]) - before, wall * 1e9


def rows(memory: int) -> list[Row]:
    pages = memory // 4096
    gfns = np.arange(pages, dtype=np.uint64)
    heads = gfns[::512]  # one gfn per 2M page
    out: list[Row] = []

    def mapped(backing: str = "4K") -> tdpmmu.VM:
        vm = tdpmmu.VM(memory=memory, backing=backing)
        vm.populate(0, pages)
        return vm

    def fixed(vm: tdpmmu.VM, which: np.ndarray, **kw: bool) -> int:
        return int((vm.fault_batch(which, **kw) == tdpmmu.Ret.FIXED).sum())

    def dirty_bits(vm: tdpmmu.VM) -> int:
        return int(sum(bin(int(w)).count("1") for w in vm.get_dirty_log(0)))

    vm = mapped()
    out.append(
        measure(
            "set_dirty_logging (write-protect)", "SPTE", vm, lambda: vm.set_dirty_logging(0, True)
        )
    )
    out.append(measure("re-dirty pass (fast page fault)", "fault", vm, lambda: fixed(vm, gfns)))
    out.append(
        measure("GET_DIRTY_LOG (takes bits, re-protects)", "page", vm, lambda: dirty_bits(vm))
    )
    vm = mapped()
    vm.set_dirty_logging(0, True, manual_protect=True, initially_set=True)
    fixed(vm, gfns)
    out.append(measure("GET_DIRTY_LOG (manual protect)", "page", vm, lambda: dirty_bits(vm)))
    out.append(
        measure(
            "CLEAR_DIRTY_LOG (D-bit clear)", "page", vm, lambda: vm.clear_dirty_log(0, 0, pages)
        )
    )
    vm = mapped()
    vm.run_memstress(1, pages, 0, False, False, 0, 0)  # the guest reads every page: Accessed
    out.append(
        measure(
            "age_gfn_range (clear_young)",
            "SPTE",
            vm,
            lambda: int(vm.age_gfn_range(0, pages)) * int(vm.stats["sptes_aged"]),
        )
    )
    out.append(
        measure(
            "test_age_gfn (nothing young)", "call", vm, lambda: 1 - int(vm.test_age_gfn(0, pages))
        )
    )
    vm = mapped("2M")
    out.append(
        measure(
            "split_huge_pages 2M -> 4K", "2M page", vm, lambda: vm.split_huge_pages(0, pages, 1)
        )
    )
    out.append(measure("recover_huge_pages", "2M page", vm, lambda: vm.recover_huge_pages(0)))
    vm = tdpmmu.VM(memory=memory, backing="2M", nx_huge_pages=True)
    fixed(vm, heads, exec=True)  # an exec fault maps 4K under the mitigation
    out.append(measure("nx_recover (ratio 1)", "table", vm, lambda: vm.nx_recover(1)))
    vm = mapped("2M")
    out.append(measure("write_track_gfn on a 2M leaf", "call", vm, lambda: vm.write_track_gfn(5)))
    vm = mapped()
    vm.add_memslot(pages, 512)
    vm.populate(pages, 512)

    def move() -> int:
        vm.move_memslot(1, 2 * pages)
        return 1

    out.append(measure("move_memslot (512 mapped pages)", "call", vm, move))
    for teardown in ("remove", "terminate_vm"):
        td = tdpmmu.VM("tdx", memory=memory, tdx={"teardown": teardown})
        td.finalize()
        fixed(td, gfns, private=True)

        def destroy(td: tdpmmu.VM = td) -> int:
            td.destroy()
            return pages

        out.append(measure(f"TD destroy, teardown={teardown}", "page", td, destroy))
    td = tdpmmu.VM("tdx", memory=memory, backing="2M", folio="2M", tdx={"huge_pages": True})
    td.finalize()
    out.append(
        measure(
            "TD private fault, AUG at 2M", "2M page", td, lambda: fixed(td, heads, private=True)
        )
    )

    def split_td() -> int:
        for g in heads:
            td.set_memory_attributes(int(g) + 1, 1, False)
        return int(td.stats["TDH.MEM.PAGE.DEMOTE"])

    out.append(measure("TD 2M split (+ 4K to shared)", "2M page", td, split_td))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--memory", default="1GiB", help="guest memory per VM (default 1GiB)")
    memory = parse_size(ap.parse_args().memory)
    print(
        f"MMU operations on {memory >> 20} MiB (modeled: cost model; host: this machine, one run)"
    )
    print(f"{'operation':38} {'units':>9} {'unit':8} {'modeled ns/unit':>16} {'host ns/unit':>13}")
    for name, unit, n, modeled, host in rows(memory):
        per = max(n, 1)
        print(f"{name:38} {n:9,} {unit:8} {modeled / per:16,.1f} {host / per:13,.1f}")


if __name__ == "__main__":
    main()
