"""KVM's ``kvm_page_table_test``: the time KVM takes to create, update and adjust TDP mappings
while several vCPUs touch the same region (``kvm_page_table``).

The test region is one memslot (the selftest's slot 1) of ``test_bytes`` rounded up to the
backing page, at the top of guest-physical space (or at ``offset``), shared memory on every VM
type (KVM refuses dirty logging on guest_memfd memory). Every vCPU walks the **whole** region in
each stage; even-numbered vCPUs write, odd ones read (in the two later stages every vCPU does
the stage's own accesses):

1. ``KVM_CREATE_MAPPINGS``: the first 8 bytes of every backing-size page: huge mappings when
   THP/hugetlb back the region.
2. ``KVM_UPDATE_MAPPINGS``, with dirty logging on the slot (``set_dirty_logging``, KVM's
   default eager page split): anonymous memory, a write to every 4 KiB page; otherwise a write
   to the first 4 KiB page of each huge page, then reads of the middle half of its pages.
3. ``KVM_ADJUST_MAPPINGS``, after dirty logging is turned off again (KVM recovers huge
   mappings where the backing allows): a read of every 4 KiB page.

**Clock.** With ``clock="virtual"`` (the default) each stage is one
``VM.run_virtual_accesses``: every vCPU's page list runs at the same time in the virtual-time
engine, with the simulated vCPU of ``VM.run_virtual`` (the "hardware" walk, and on a miss the
fault path with its exit, host page, ``mmu_lock`` and walk steps), so the vCPUs race on their
first touches of the shared region (one maps a page; the others find it mapped, SPURIOUS, or
wait for the host page it is still providing), wait for ``mmu_lock`` (``mmu_lock="exclusive"``
serializes their faults), contend for host memory and cache lines, and each access attempt
costs the guest ``guest_access_ns``. A stage's time is the run's elapsed modeled time (its start
to the last vCPU's end), as the selftest times a stage from its start until every vCPU has
finished it. The run's ``VirtualOptions`` (``mmu_lock``, ``machine``, ``cpus``, ...) apply.

With ``clock="host"`` each vCPU's list is one host-side ``VM.access_batch``, the vCPUs one after
the other in index order, and a stage's time is the **largest** modeled time of one vCPU: only
the faults' time (as ``VM.run_memstress``), no concurrency between vCPUs (no lock waits, no
shared host memory), and vCPU 0, running first, takes every first-touch fault.
"""

import argparse
import time
from typing import Any, Unpack

import numpy as np
import numpy.typing as npt

from tdpmmu import coerce, spte
from tdpmmu._core import ConfigError, InvariantError
from tdpmmu.sizes import format_size
from tdpmmu.vm import VM
from tdpmmu.vmspec import VmSpec, launch
from tdpmmu.vtime import VirtualOptions
from tdpmmu.workloads.base import (
    Checks,
    Clock,
    SimArgs,
    Workload,
    WorkloadResult,
    finish,
    register,
    sim_options,
    spec_args,
    track_vm,
)
from tdpmmu.workloads.common import PAGE_SIZE, backing_source, virtual_summary

__all__ = ["STAGES", "access_stage", "kvm_page_table", "leaf_level"]

#: The selftest's three stages, in order (their names are the output labels).
STAGES = ("KVM_CREATE_MAPPINGS", "KVM_UPDATE_MAPPINGS", "KVM_ADJUST_MAPPINGS")

#: Slot 0 (code and page tables) is this large, or one backing page if larger.
_SLOT0_BYTES = 2 << 20

#: The selftest's ``-s`` name for each host page size when the backing is given as a size.
_NAMES = {4096: "anonymous", 2 << 20: "anonymous_thp", 1 << 30: "anonymous_hugetlb_1gb"}


def leaf_level(vm: VM, gfn: int, private: bool = False) -> int:
    """The level of the leaf mapping ``gfn`` in the VM's current root (1 = 4 KiB, 2 = 2 MiB,
    3 = 1 GiB), or 0 when nothing maps it.

    Args:
        vm: the VM.
        gfn: a 4 KiB guest page, in ``0..vm.max_gfn``.
        private: walk the private (mirror) root instead of the shared one.

    Returns:
        int: 0..3.

    Raises:
        ConfigError: what ``VM.walk`` refuses (a gfn out of range, a destroyed VM).
    """
    for level, value in reversed(vm.walk(gfn, private)):
        if spte.is_shadow_present(value) and spte.is_last(value, level):
            return level
        if spte.is_shadow_present(value):
            return 0
    return 0


def access_stage(
    vm: VM,
    lists: list[tuple[npt.NDArray[np.uint64], npt.NDArray[np.bool_]]],
    options: VirtualOptions | None = None,
) -> tuple[float, list[dict[str, float]], dict[str, Any] | None]:
    """Run one stage: each vCPU's page list, and time the stage (module docstring, Clock).

    Args:
        vm: the VM.
        lists: per vCPU, in vCPU order, (gfns, writes): the pages it accesses in order and
            whether each access writes; at most ``vm.vcpus`` lists.
        options: the run's clock and shared-resource knobs; with ``clock="virtual"`` every
            vCPU runs at once in virtual time (``VM.run_virtual_accesses``); None or
            ``clock="host"``: one ``VM.access_batch`` per vCPU, vCPU 0 first.

    Returns:
        tuple: the stage's modeled seconds (virtual: the run's elapsed time; host: the largest
        of one vCPU's), per vCPU ``modeled_ns``, ``faults``, ``pages`` (accesses made) and
        (virtual) ``hits``, ``fixed``, ``spurious``, ``retry`` or (host) ``wall_s``, and for a
        virtual run its summary (outcomes, modeled time by resource, ``mmu_lock`` acquisitions,
        contention and wait), else None.

    Raises:
        ConfigError, VmBugged, OutOfMemory: what ``VM.run_virtual_accesses`` or
            ``VM.access_batch`` raises.
    """
    per: list[dict[str, float]] = []
    if options is not None and options.clock == "virtual":
        rec = vm.run_virtual_accesses(
            [g for g, _ in lists], [w for _, w in lists], **options.run_kwargs()
        )
        for x in rec["vcpus"]:
            per.append(
                {
                    "modeled_ns": float(x["modeled_ns"]),
                    "faults": float(x["faults"]),
                    "pages": float(x["accesses"]),
                    "hits": float(x["hits"]),
                    "fixed": float(x["fixed"]),
                    "spurious": float(x["spurious"]),
                    "retry": float(x["retry"]),
                }
            )
        summary = virtual_summary(rec)
        keep = ("outcomes", "resources", "lock_acquires", "lock_contended", "lock_wait_ns")
        return float(rec["elapsed_ns"]) / 1e9, per, {k: summary[k] for k in keep}
    for v, (gfns, writes) in enumerate(lists):
        start = time.perf_counter()
        r = vm.access_batch(gfns, write=writes, vcpu=v)
        per.append(
            {
                "modeled_ns": float(r["modeled_ns"]),
                "faults": float(r["faults"]),
                "pages": float(r["accesses"]),
                "wall_s": time.perf_counter() - start,
            }
        )
    return max(p["modeled_ns"] for p in per) / 1e9, per, None


def _stage_lists(
    stage: str, vcpus: int, base: int, npages: int, step: int
) -> list[tuple[npt.NDArray[np.uint64], npt.NDArray[np.bool_]]]:
    """Each vCPU's (gfns, writes) in ``stage`` (module docstring)."""
    all_pages = np.arange(base, base + npages, dtype=np.uint64)
    if stage == "KVM_CREATE_MAPPINGS":
        gfns = np.arange(base, base + npages, step, dtype=np.uint64)
        return [(gfns, np.full(gfns.size, v % 2 == 0, dtype=np.bool_)) for v in range(vcpus)]
    if stage == "KVM_UPDATE_MAPPINGS":
        if step == 1:
            gfns, writes = all_pages, np.ones(npages, dtype=np.bool_)
        else:
            # Per huge page: write its first 4 KiB page, then read [step/4, 3*step/4).
            heads = np.arange(base, base + npages, step, dtype=np.uint64)
            mid = np.arange(step // 4, 3 * step // 4, dtype=np.uint64)
            per_huge = np.concatenate(([0], mid)).astype(np.uint64)
            gfns = (heads[:, None] + per_huge[None, :]).ravel()
            w = np.zeros(per_huge.size, dtype=np.bool_)
            w[0] = True
            writes = np.tile(w, heads.size)
        return [(gfns, writes) for _ in range(vcpus)]
    return [(all_pages, np.zeros(npages, dtype=np.bool_)) for _ in range(vcpus)]


def kvm_page_table(
    vcpus: int = 1,
    test_bytes: str | int = "1G",
    backing: str | int = "anonymous",
    offset: str | int | None = None,
    **sim: Unpack[SimArgs],
) -> WorkloadResult:
    """KVM's ``kvm_page_table_test``: create, update (dirty logging) and adjust the mappings of
    one region that every vCPU touches (module docstring: stages, clock).

    Args:
        vcpus: vCPUs, 1..4096 (``-v``, default 1).
        test_bytes: **total** test memory (``-b``), bytes or a size string, a positive multiple
            of 4096, rounded up to the backing page (default ``"1G"``).
        backing: the selftest's ``-s`` name (``BACKING_SOURCES``) or a host page size
            (default ``"anonymous"``: 4 KiB pages).
        offset: guest-physical address of the test slot (``-p``), bytes or a size string, a
            multiple of the backing page; None (default): the top of guest-physical space.
        **sim: the simulator's arguments (``SimArgs``); ``clock``: the vCPUs concurrently in
            virtual time or one after the other on the host side (module docstring).

    Returns:
        WorkloadResult: the selftest's set-up lines and one ``<STAGE>: total execution time``
        line per stage (modeled seconds, each followed by a blank line); metrics
        ``kvm_create_mappings_total_execution_time_s`` (and update, adjust) and ``wall_``
        twins; ``detail``: ``checks`` (``Checks`` records: mapping levels after each stage,
        dirty pages, ``VM.check()``; a failed one is recorded, not raised: ``ok`` False),
        ``stages`` (per vCPU modeled ns, faults and accesses per stage) and, in virtual time,
        ``virtual`` (per stage: outcomes, modeled time by resource, ``mmu_lock`` contention).

    Raises:
        ConfigError: a bad value, naming it (``vcpus``, ``test_bytes``, ``backing``,
            ``offset``), or a region that does not fit.
        TypeError: a value of the wrong type.
    """
    run_start = time.perf_counter()
    options = sim_options(sim)
    nvcpus = coerce.count(vcpus, "vcpus")
    size = coerce.size(test_bytes, "test_bytes")
    backing_bytes, name = backing_source(backing)
    name = name or _NAMES[backing_bytes]
    total = -(-size // backing_bytes) * backing_bytes
    npages = total // PAGE_SIZE
    step = backing_bytes // PAGE_SIZE
    slot0 = max(_SLOT0_BYTES, backing_bytes)
    spec = VmSpec.create(**spec_args(sim), memory=slot0, vcpus=nvcpus, backing=backing_bytes)
    vm = track_vm(spec.build())
    if offset is None:
        base = (vm.max_gfn - npages) // step * step
    else:
        gpa = coerce.size(offset, "offset", positive=False, multiple=1)
        if gpa % backing_bytes:
            raise ConfigError(
                f"offset: {gpa:#x} is not aligned to the backing page "
                f"({format_size(backing_bytes)})"
            )
        base = gpa // PAGE_SIZE
    if base < slot0 // PAGE_SIZE or base + npages > vm.max_gfn:
        raise ConfigError(
            f"test_bytes: a {format_size(total)} test slot at gfn {base:#x} does not fit between "
            f"slot 0 and max_gfn {vm.max_gfn:#x}"
        )
    slot = vm.add_memslot(base, npages, backing_bytes)
    launch(vm)
    host_addr = next(s[5] for s in vm.memslots() if s[0] == slot) * PAGE_SIZE
    lines = [
        "Testing guest mode: PA-bits:ANY, VA-bits:48,  4K pages",
        f"Testing memory backing src type: {name}",
        f"Testing memory backing src granularity: {backing_bytes:#x}",
        f"Testing memory size(aligned): {total:#x}",
        f"Guest physical test memory offset: {base * PAGE_SIZE:#x}",
        f"Host  virtual  test memory offset: {host_addr:#x}",
        f"Number of testing vCPUs: {nvcpus}",
        "Started all vCPUs successfully",
    ]
    clock = Clock(vm, sim.get("progress"), 5)
    heads = range(base, base + npages, step)
    huge = {4096: 1, 2 << 20: 2, 1 << 30: 3}[backing_bytes]
    checks = Checks()
    stages: dict[str, list[dict[str, float]]] = {}
    virtual: dict[str, dict[str, Any]] = {}
    metrics: dict[str, float] = {}

    def levels(gfns: "range | npt.NDArray[np.uint64]") -> set[int]:
        return {leaf_level(vm, int(g)) for g in gfns}

    def expect_levels(what: str, gfns: "range | npt.NDArray[np.uint64]", level: int) -> None:
        seen = levels(gfns)
        checks.add(what, seen == {level}, f"leaf levels seen: {sorted(seen)}")

    def run_stage(stage: str) -> None:
        lists = _stage_lists(stage, nvcpus, base, npages, step)
        start = time.perf_counter()
        modeled_s, per, summary = access_stage(vm, lists, options)
        wall_s = time.perf_counter() - start
        clock.record(stage, modeled_s, wall_s)
        stages[stage] = per
        if summary is not None:
            virtual[stage] = summary
        lines.extend([f"{stage}: total execution time: {modeled_s:.9f}s", ""])
        key = stage.lower()
        metrics[f"{key}_total_execution_time_s"] = modeled_s
        metrics[f"wall_{key}_total_execution_time_s"] = wall_s

    run_stage("KVM_CREATE_MAPPINGS")
    expect_levels(
        f"every backing page mapped at level {huge} after KVM_CREATE_MAPPINGS", heads, huge
    )
    with clock.phase("enable dirty logging"):
        vm.set_dirty_logging(slot, True)
    run_stage("KVM_UPDATE_MAPPINGS")
    upd_gfns, upd_writes = _stage_lists("KVM_UPDATE_MAPPINGS", 1, base, npages, step)[0]
    written = upd_gfns[upd_writes]
    bitmap = np.asarray(vm.get_dirty_log(slot), dtype=np.uint64)
    bits = np.unpackbits(bitmap.view(np.uint8), bitorder="little")[:npages].astype(bool)
    expect_levels(
        "every page written under dirty logging mapped at 4 KiB after KVM_UPDATE_MAPPINGS",
        written,
        1,
    )
    missing = int((~bits[(written - base).astype(np.int64)]).sum())
    checks.add(
        "every page written under dirty logging set in the slot's dirty log",
        missing == 0,
        f"{missing:,} of {written.size:,} written pages not in the dirty log" if missing else "",
    )
    with clock.phase("disable dirty logging"):
        vm.set_dirty_logging(slot, False)
    run_stage("KVM_ADJUST_MAPPINGS")
    expect_levels(
        f"every backing page mapped at level {huge} again after KVM_ADJUST_MAPPINGS "
        "(huge mappings recovered when dirty logging stopped)",
        heads,
        huge,
    )
    try:
        vm.check()
        checks.add("VM.check() holds after the run", True)
    except InvariantError as e:
        checks.add("VM.check() holds after the run", False, str(e))
    params = {
        "vcpus": nvcpus,
        "test_bytes": size,
        "backing": backing if isinstance(backing, str) else backing_bytes,
        "offset": offset,
    }
    detail: dict[str, Any] = {
        "checks": checks.to_list(),
        "stages": stages,
        "region": [base * PAGE_SIZE, (base + npages) * PAGE_SIZE],
        "clock": (
            "virtual time: every vCPU's list at once (run_virtual_accesses); stage time = the "
            "run's elapsed modeled time"
            if options.clock == "virtual"
            else "host-side access_batch per vCPU, vCPUs in turn; stage time = the largest "
            "vCPU's (faults only)"
        ),
    }
    if virtual:
        detail["virtual"] = virtual
    return finish(
        "kvm_page_table",
        vm,
        spec,
        params=params,
        options=options,
        lines=lines,
        metrics=metrics,
        clock=clock,
        run_start=run_start,
        detail=detail,
    )


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    from tdpmmu.workloads.demand_paging import backing_arg, count_arg, mode_arg, size_arg

    parser.add_argument(
        "-p",
        "--offset",
        type=size_arg,
        metavar="OFF",
        help="guest-physical address of the test slot (default: the top of guest-physical "
        "space); a multiple of the backing page",
    )
    parser.add_argument(
        "-m", "--mode", type=mode_arg, metavar="MODE", help="guest mode; x86 has one: 0"
    )
    parser.add_argument(
        "-b",
        "--test-bytes",
        type=size_arg,
        default="1G",
        metavar="SIZE",
        help="TOTAL test memory (not per vCPU), rounded up to the backing page (default 1G)",
    )
    parser.add_argument(
        "-v", "--vcpus", type=count_arg(1, 4096), default=1, metavar="N", help="vCPUs (default 1)"
    )
    parser.add_argument(
        "-s",
        "--backing",
        type=backing_arg,
        default="anonymous",
        metavar="TYPE",
        help="backing source (default anonymous)",
    )


def _from_args(ns: argparse.Namespace) -> dict[str, Any]:
    return {
        "vcpus": ns.vcpus,
        "test_bytes": ns.test_bytes,
        "backing": ns.backing,
        "offset": ns.offset,
    }


register(
    Workload(
        name="kvm_page_table",
        command="kvm-page-table",
        selftest="kvm_page_table_test",
        summary="create, update (dirty logging) and adjust the mappings of one shared region.",
        run=kvm_page_table,
        vm_types=("default", "sw_protected", "tdx", "snp"),
        add_arguments=_add_arguments,
        from_args=_from_args,
    )
)
