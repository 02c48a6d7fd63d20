"""Modeled scaling figures of the virtual-time engine (printed, not asserted).

Run: ``python benches/vtime_scaling.py [--pages N]``. Prints the aggregate modeled first-touch
rate at 1/8/64/128/256 vCPUs for mmu_lock shared vs exclusive and for anonymous memory,
userfaultfd MINOR (one uffd per vCPU and one for all) and memory-fault exits, and the modeled
cost of removing one TDX private page while 4/32/64 vCPUs run. Every figure is SIMULATED.
"""

import argparse
import time

import tdpmmu
from tdpmmu.workloads import demand_paging

VCPUS = (1, 8, 64, 128, 256)


def rate(**kw: object) -> float:
    r = demand_paging(**kw)  # type: ignore[arg-type]
    return r.overall_demand_paging_rate_pgs_per_s


def removal_us(vcpus: int, pages: int = 64, removed: int = 256) -> float:
    vm = tdpmmu.VM(
        vm_type="tdx", vcpus=vcpus, memory=max(1 << 30, (vcpus * pages + removed) * 4096)
    )
    vm.finalize()
    vm.run_virtual(vcpus, pages, 0, False, False, 100, 0, True)
    gfn = vcpus * pages
    vm.populate(gfn, removed, private=True)
    r = vm.run_virtual(vcpus, pages, 0, False, False, 100, 0, True, passes=0, remove=(gfn, removed))
    return r["remove_ns"] / r["removed"] / 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pages", type=int, default=1024, help="4 KiB pages per vCPU (default 1024)")
    a = ap.parse_args()
    size = a.pages * 4096
    t0 = time.perf_counter()
    print("SIMULATED (modeled time). Aggregate first-touch rate, M pages/s; default VM, 4K pages")
    cols = [
        ("shared", {}),
        ("exclusive", {"mmu_lock": "exclusive"}),
        ("MINOR", {"userfault": "MINOR"}),
        ("MINOR -a", {"userfault": "MINOR", "uffd_all": True}),
        ("memory_fault", {"userfault": "memory_fault"}),
    ]
    print(f"{'vCPUs':>6}" + "".join(f"{n:>14}" for n, _ in cols))
    for n in VCPUS:
        row = [rate(vcpus=n, bytes_per_vcpu=size, **kw) / 1e6 for _, kw in cols]
        print(f"{n:>6}" + "".join(f"{x:>14.3f}" for x in row))
    print(
        "\nTDX private page removal while the vCPUs run (BLOCK, TRACK, kick, REMOVE, WBINVD, clear)"
    )
    for n in (4, 32, 64):
        print(f"{n:>6} vCPUs: {removal_us(n):8.2f} µs per page (modeled)")
    print(f"\nhost time: {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
