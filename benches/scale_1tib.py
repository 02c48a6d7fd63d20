#!/usr/bin/env python3
"""Scale check: populate a 1 TiB guest (2**28 4K pages) and report time, memory and table bytes.

Not collected by pytest (no ``test_`` prefix). Run from the repo's venv:

    python benches/scale_1tib.py                  # 1 TiB default VM, 4 levels, 4K backing
    python benches/scale_1tib.py --check          # ... then run vm.check() (the invariants)
    python benches/scale_1tib.py --memory 4GiB    # a quick smaller run
    python benches/scale_1tib.py --vm-type tdx    # other VM types, once the engine has them

One ``vm.populate(0, npages)`` call (KVM_PRE_FAULT_MEMORY over the whole guest) maps every page.
Peak RSS comes from ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (KiB on Linux).
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import time
from typing import Any

from tdpmmu import _core

PAGE = 4096


def parse_bytes(text: str) -> int:
    """``1TiB``, ``4GiB``, ``512MiB``, ``4K`` or a plain byte count."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    s = text.strip().lower().removesuffix("b").removesuffix("i")
    if s and s[-1] in units:
        return int(float(s[:-1]) * units[s[-1]])
    return int(s)


def make_vm(vm_type: str, memory: int, levels: int) -> Any:
    """tdpmmu.VM if it imports, else the raw native class (4K backing, 1 vCPU)."""
    try:
        from tdpmmu import VM
    except Exception:
        hooks = {"snp": "gmem", "tdx": "mirror"}.get(vm_type, "none")
        return _core.Vm(vm_type, memory, 1, levels, PAGE, hooks, {}, 0, False, False, True)
    return VM(vm_type=vm_type, memory=memory, levels=levels, backing=PAGE)


def max_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


def gib(n: float) -> str:
    return f"{n / (1 << 30):.3f} GiB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vm-type", default="default", help="VM type (default: %(default)s)")
    ap.add_argument("--memory", default="1TiB", help="guest size (default: %(default)s)")
    ap.add_argument("--levels", type=int, default=4, choices=(4, 5), help="paging levels")
    ap.add_argument(
        "--private",
        choices=("auto", "yes", "no"),
        default="auto",
        help="populate private (yes) or shared (no) memory; auto = the VM type's default",
    )
    ap.add_argument("--check", action="store_true", help="run vm.check() after populating")
    args = ap.parse_args(argv)

    memory = parse_bytes(args.memory)
    if memory <= 0 or memory % PAGE:
        ap.error(f"--memory must be a positive multiple of 4 KiB, got {args.memory!r}")
    npages = memory // PAGE
    private = {"auto": None, "yes": True, "no": False}[args.private]

    rss0 = max_rss_bytes()
    t0 = time.perf_counter()
    vm = make_vm(args.vm_type, memory, args.levels)
    t_create = time.perf_counter() - t0

    t0 = time.perf_counter()
    installed = vm.populate(0, npages, private)
    t_pop = time.perf_counter() - t0
    stats = vm.stats_dict()

    pt_bytes = int(stats["page_table_bytes"])
    pt_peak = int(stats.get("page_table_peak_bytes", pt_bytes))
    rss = max_rss_bytes()
    print(f"tdpmmu scale: {platform.machine()} / Python {platform.python_version()}")
    print(f"vm                 : {vm!r}")
    print(f"guest              : {gib(memory)}, {npages:,} 4K pages (2**{npages.bit_length() - 1})")
    print(f"create             : {t_create * 1e3:,.3f} ms")
    print(f"populate           : {t_pop:,.3f} s wall (vm.populate(0, {npages}))")
    print(f"ns/page            : {t_pop / npages * 1e9:,.2f}")
    print(f"leaves installed   : {installed:,} (pages_4k={stats.get('pages_4k')})")
    print(f"tdp_mmu_pages      : {stats.get('tdp_mmu_pages'):,}")
    print(f"page_table_bytes   : {pt_bytes:,} ({gib(pt_bytes)}); peak {gib(pt_peak)}")
    print(f"table bytes / page : {pt_bytes / npages:.4f}")
    print(f"peak RSS           : {gib(rss)} (before the VM: {gib(rss0)})")
    print(f"modeled time       : {float(stats['modeled_ns']) / 1e9:,.3f} s (cost model)")
    ok = installed == npages

    if args.check:
        t0 = time.perf_counter()
        vm.check()
        print(f"vm.check()         : ok in {time.perf_counter() - t0:,.3f} s")
    if not ok:
        print(f"WARNING: populate installed {installed} leaves for {npages} pages", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
