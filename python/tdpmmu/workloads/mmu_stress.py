"""KVM's ``mmu_stress_test``: a big guest over many memslots that alias one memfd, written,
reset, written again, made read-only under it and writable again (``mmu_stress``).

Guest memory starts at 4 GiB: ``mem_gib`` GiB in memslots of ``slot_gib`` GiB (the last one
smaller if needed), 2 MiB hugetlb pages with ``hugepages`` (``-H``). Each vCPU owns an equal,
contiguous slice (rounded down to the backing page) and runs each stage over it as one memstress
pass (``memstress.run_pass``, the run's clock); a stage's time is the slowest vCPU's:

- ``run1``: write every page of the slice (first touch: the fault path);
- ``reset``: the guest toggles CR0.WP, which makes KVM reset the vCPU's MMU context. With TDP,
  CR0.WP is not part of the root's role, so the reload finds the same root and nothing is
  zapped; the modeled cost is one exit per vCPU (``exit_entry_ns``, the CR0 write's VM exit),
  the vCPUs in parallel;
- ``run2``: write everything again (every page already mapped writable: no fault);
- ``ro``: the guest reads everything; the host ``mprotect(PROT_READ)``s the memfd mapping,
  which every slot aliases (``VM.mprotect(writable=False)`` on every slot: the MMU notifier
  invalidates them, timed as host work); then every vCPU writes its slice again. Each write
  faults, ``hva_to_pfn`` cannot get a writable host page and the fault ends in a memory-fault
  exit (KVM_RUN returns -EFAULT; ``Ret.MEMORY_FAULT``, ``pf_memory_fault``), nothing is mapped
  (checked); the selftest's vCPU thread skips the store and re-enters. On the virtual clock the
  writes are one memstress pass in the virtual-time engine, every vCPU at once (their faults
  overlap and share ``mmu_lock``, cache lines and the vCPU entry): the engine counts each exit
  (``memory_fault``) and charges its return to userspace (``userspace_exit_ns``) in the VM's
  ledger, and the write part's time is the pass's elapsed modeled time. On the host clock each
  vCPU's slice is one ``VM.access_batch``, the vCPUs in turn; the return to userspace is not in
  the engine there, so ``userspace_exit_ns`` per write is added to each vCPU's time from the
  CostModel (not in the VM's ledger or cost breakdown), and the write part is the slowest
  vCPU's;
- ``rw``: ``mprotect(PROT_READ|PROT_WRITE)`` (``VM.mprotect(writable=True)``: an MMU-notifier
  invalidation again) and the guest writes everything (the fault path again).

Then the even slots are deleted, half of the memfd is unmapped (``munmap``: an MMU-notifier
invalidation of the first half of every remaining slot; the memfd keeps its pages, so this is
``mmu_notifier_invalidate``, not ``madvise_dontneed``) and the VM is torn down (``destroy``,
as ``mmu_notifier.release``); timed as the ``teardown`` phase. Not modeled: the host memory
behind the slots is one memfd in the selftest (the model gives each slot its own host pages,
so each pays first-touch allocation; the selftest prefaults the memfd), and the vCPU
rendezvous.

The size line prints whole GiB as the selftest does (``128gb``) and any other size as its exact
decimal (``--mem-bytes 64M``: ``0.0625gb``). Checks (``detail["checks"]``,
``tdpmmu.workloads.base.Checks`` records: every page mapped after run 1 and after mprotect RW,
the reset keeps the root, run 2 takes no fault, nothing mapped after mprotect RO and every RO
write ends in -EFAULT, on the virtual clock every such write's exit to userspace counted and
charged, and ``VM.check()`` after the stages and after the teardown's deletes) are recorded,
not raised: a failed one makes ``result.ok`` False.

Progress: the run reports 6 steps (the five stages and the teardown) up front and after each
one. The default run (192 vCPUs of the default machine, 128 GiB, 2 GiB slots: 33.5 million
4 KiB pages over 64 slots) takes about 90 s of host time on a 2-CPU machine (run1 and rw about
a third each, each one ``run_virtual`` pass over every page); ``--mem-bytes`` and ``-c`` make
quick runs.
"""

import argparse
import decimal
import time
from typing import Any, Unpack

import numpy as np

from tdpmmu import coerce
from tdpmmu._core import ConfigError, InvariantError
from tdpmmu.sizes import format_size
from tdpmmu.vmspec import VmSpec, launch
from tdpmmu.vtime import Machine
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
)
from tdpmmu.workloads.common import PAGE_SIZE
from tdpmmu.workloads.memstress import DEFAULT_GUEST_SEED, Layout, run_pass

__all__ = ["STAGES", "gib_text", "mmu_stress"]

#: The summary line's stages, in order.
STAGES = ("run1", "reset", "run2", "ro", "rw")

#: The selftest's rendezvous names of those stages.
_RENDEZVOUS = {
    "run1": "run 1",
    "reset": "reset",
    "run2": "run 2",
    "ro": "mprotect RO",
    "rw": "mprotect RW",
}

#: Guest memory starts here (4 GiB).
_START = 4 << 30
_GIB = 1 << 30
#: Progress steps of a run: the five stages and the teardown.
_STEPS = len(STAGES) + 1


def gib_text(nbytes: int) -> str:
    """A guest memory size in GiB as the ``Running with <N>gb ...`` line prints it.

    Args:
        nbytes: bytes, >= 0.

    Returns:
        str: the whole number of GiB when ``nbytes`` is a whole number of GiB (``"128"``, as
        the selftest prints it), else the exact decimal (``64 MiB`` -> ``"0.0625"``). Never
        raises.
    """
    if nbytes % _GIB == 0:
        return str(nbytes // _GIB)
    with decimal.localcontext() as ctx:
        ctx.prec = 80
        text = format(decimal.Decimal(nbytes) / decimal.Decimal(_GIB), "f")
    return text.rstrip("0").rstrip(".")


def mmu_stress(
    vcpus: int | None = None,
    mem_gib: int = 128,
    slot_gib: int = 2,
    hugepages: bool = False,
    *,
    mem_bytes: str | int | None = None,
    slot_bytes: str | int | None = None,
    **sim: Unpack[SimArgs],
) -> WorkloadResult:
    """KVM's ``mmu_stress_test`` (module docstring: stages and what each models).

    Args:
        vcpus: vCPUs, 1..4096 (``-c``); None (default): three quarters of the modeled
            machine's logical CPUs (``machine``), as the selftest takes ¾ of its CPUs.
        mem_gib: guest memory in GiB (``-m``), >= 1 (default 128).
        slot_gib: memslot size in GiB (``-s``), >= 1 (default 2).
        hugepages: back the memfd with 2 MiB hugetlb pages (``-H``, default False: 4 KiB).
        mem_bytes: simulator only: guest memory in bytes or a size string, instead of
            ``mem_gib`` (for small runs).
        slot_bytes: simulator only: memslot size in bytes, instead of ``slot_gib``.
        **sim: the simulator's arguments (``SimArgs``).

    Returns:
        WorkloadResult: ``Running with <N>gb of guest memory and <V> vCPUs``, the rendezvous
        lines and ``run1 = ...s, reset = ...s, run2 = ...s, ro = ...s, rw = ...s`` (modeled);
        metrics ``run1_s`` .. ``rw_s``, ``teardown_s`` and ``wall_`` twins; ``detail``:
        ``checks`` (``Checks`` records; ``result.ok`` is False when one failed), per stage
        per-vCPU records.

    Raises:
        ConfigError: a bad value, naming it; memory too small for one backing page per vCPU;
            a TD (``vm_type``: KVM_MEM_GUEST_MEMFD-less aliasing memslots and mprotect act on
            shared memory only; a TD's vCPUs cannot toggle CR0.WP).
        TypeError: a value of the wrong type.
    """
    run_start = time.perf_counter()
    options = sim_options(sim)
    machine = options.machine if isinstance(options.machine, Machine) else Machine()
    cpus = machine.sockets * machine.cores_per_socket * machine.threads_per_core
    nvcpus = coerce.count(max(1, cpus * 3 // 4) if vcpus is None else vcpus, "vcpus")
    if mem_bytes is None:
        mem = coerce.count(mem_gib, "mem_gib") * _GIB
    else:
        mem = coerce.size(mem_bytes, "mem_bytes")
    if slot_bytes is None:
        slot = coerce.count(slot_gib, "slot_gib") * _GIB
    else:
        slot = coerce.size(slot_bytes, "slot_bytes")
    huge = coerce.flag(hugepages, "hugepages")
    backing = (2 << 20) if huge else PAGE_SIZE
    if mem % backing or slot % backing:
        raise ConfigError(
            f"mem_bytes: guest memory and slot size must be multiples of the backing page "
            f"({format_size(backing)})"
        )
    if sim.get("vm_type", "default") == "tdx":
        raise ConfigError(
            "vm_type: mmu_stress_test runs a normal guest (CR0.WP toggles, shared memfd "
            "memory written by the host); a TD's memory and CR0 are not the host's to drive"
        )
    per_vcpu = mem // nvcpus // backing * backing
    if per_vcpu == 0:
        raise ConfigError(
            f"vcpus: {format_size(mem)} of guest memory gives {nvcpus} vCPUs less than one "
            f"backing page ({format_size(backing)}) each"
        )
    spec = VmSpec.create(**spec_args(sim), memory=2 << 20, vcpus=nvcpus, backing=backing)
    vm = spec.build()
    base = _START // PAGE_SIZE
    if base + mem // PAGE_SIZE > vm.max_gfn:
        raise ConfigError(f"mem_bytes: {format_size(mem)} from 4 GiB passes max_gfn")
    slots: list[tuple[int, int, int]] = []
    g, end = base, base + mem // PAGE_SIZE
    while g < end:
        n = min(slot // PAGE_SIZE, end - g)
        slots.append((vm.add_memslot(g, n, backing), g, n))
        g += n
    launch(vm)
    npages = per_vcpu // PAGE_SIZE * nvcpus
    layout = Layout(nvcpus, per_vcpu, False, backing, base, npages, tuple(s for s, _, _ in slots))
    progress = sim.get("progress")
    clock = Clock(vm, progress, _STEPS)
    if progress is not None:
        # The step count up front: the first stage of a big run takes a while.
        progress(0, _STEPS, "memslots added")
    costs = vm.costs
    lines = [f"Running with {gib_text(mem)}gb of guest memory and {nvcpus} vCPUs"]
    checks = Checks()
    per_stage: dict[str, Any] = {}
    times: dict[str, float] = {}
    walls: dict[str, float] = {}

    def mapped() -> int:
        s = vm.stats
        return int(s["pages_4k"] + 512 * s["pages_2m"] + 262144 * s["pages_1g"])

    def stage(name: str, modeled_s: float, wall_s: float) -> None:
        lines.append(f"Waiting for vCPUs to finish {_RENDEZVOUS[name]}...")
        lines.append(f"All vCPUs finished {_RENDEZVOUS[name]}, releasing...")
        clock.record(name, modeled_s, wall_s)
        times[name], walls[name] = modeled_s, wall_s

    def write_pass(name: str, extra_s: float = 0.0, extra_wall: float = 0.0) -> None:
        r = run_pass(vm, layout, options, write_percent=100, seed=DEFAULT_GUEST_SEED)
        per_stage[name] = list(r.per_vcpu)
        stage(name, r.modeled_s + extra_s, r.wall_s + extra_wall)

    def protect_all(writable: bool) -> tuple[float, float]:
        # mprotect() of the memfd mapping: every slot aliases it.
        ns0, w0 = clock.modeled_ns(), time.perf_counter()
        for _, g0, n in slots:
            vm.mprotect(g0, n, writable)
        return (clock.modeled_ns() - ns0) / 1e9, time.perf_counter() - w0

    write_pass("run1")
    got = mapped()
    checks.add("run 1: every page is mapped", got == npages, f"{got} of {npages} pages mapped")
    # reset: one CR0 write exit per vCPU, in parallel; the reload finds the same root.
    roots = len(vm.roots())
    stage("reset", costs.exit_entry_ns / 1e9, 0.0)
    got = len(vm.roots())
    checks.add("reset: the MMU reset keeps the root", got == roots, f"{roots} -> {got} roots")
    before = vm.stats["pf_taken"]
    write_pass("run2")
    faults = int(vm.stats["pf_taken"] - before)
    checks.add("run 2: no fault (every page already mapped)", faults == 0, f"{faults} faults")
    # ro: the reads (all hits), mprotect(PROT_READ), then every write takes -EFAULT.
    reads = run_pass(vm, layout, options, write_percent=0, seed=DEFAULT_GUEST_SEED)
    inv_s, inv_wall = protect_all(False)
    got = mapped()
    checks.add("mprotect RO: nothing is left mapped", got == 0, f"{got} pages mapped")
    per_vcpu_pages = per_vcpu // PAGE_SIZE
    efaults0 = vm.stats["pf_memory_fault"]
    exits0 = vm.cost_breakdown()["userspace_exit_ns"]
    w0 = time.perf_counter()
    ro_write_ns: list[float] = []
    if options.clock == "virtual":
        writes = run_pass(vm, layout, options, write_percent=100, private=False)
        ro_write_ns = [v["modeled_ns"] for v in writes.per_vcpu]
        ro_write_s = writes.modeled_s
        exits = writes.virtual["outcomes"]["memory_fault"]
        charged = vm.cost_breakdown()["userspace_exit_ns"] - exits0
        checks.add(
            "mprotect RO: every write exits to userspace, each exit charged userspace_exit_ns",
            exits == npages and charged == npages * costs.userspace_exit_ns,
            f"{exits} memory-fault exits of {npages} writes, {charged:g} ns charged",
        )
    else:
        for v in range(nvcpus):
            gfns = np.arange(per_vcpu_pages, dtype=np.uint64) + (base + v * per_vcpu_pages)
            r = vm.access_batch(gfns, write=True, private=False, vcpu=v)
            ro_write_ns.append(float(r["modeled_ns"]) + per_vcpu_pages * costs.userspace_exit_ns)
        ro_write_s = max(ro_write_ns) / 1e9
    ro_writes_wall = time.perf_counter() - w0
    efaults = vm.stats["pf_memory_fault"] - efaults0
    got = mapped()
    checks.add(
        "mprotect RO: every write ends in -EFAULT with nothing mapped",
        efaults == npages and got == 0,
        f"{efaults} of {npages} writes got -EFAULT, {got} pages mapped",
    )
    per_stage["ro"] = {
        "reads": list(reads.per_vcpu),
        "efault_writes_per_vcpu": per_vcpu_pages,
        "write_modeled_ns_per_vcpu": ro_write_ns,
    }
    ro_s = reads.modeled_s + inv_s + ro_write_s
    stage("ro", ro_s, reads.wall_s + inv_wall + ro_writes_wall)
    inv_s, inv_wall = protect_all(True)
    write_pass("rw", inv_s, inv_wall)
    got = mapped()
    checks.add(
        "mprotect RW: every page is mapped again", got == npages, f"{got} of {npages} pages mapped"
    )
    lines.append(
        f"run1 = {times['run1']:.9f}s, reset = {times['reset']:.9f}s, "
        f"run2 = {times['run2']:.9f}s, ro = {times['ro']:.9f}s, rw = {times['rw']:.9f}s"
    )
    try:
        vm.check()
        checks.add("VM.check() holds after the stages", True)
    except InvariantError as e:
        checks.add("VM.check() holds after the stages", False, str(e))
    stats_before_teardown = vm.stats
    with clock.phase("teardown"):
        for i, (sid, _, _) in enumerate(slots):
            if i % 2 == 0:
                vm.delete_memslot(sid)
        half = slot // PAGE_SIZE // 2
        for i, (_, g0, n) in enumerate(slots):
            if i % 2 == 1:
                vm.mmu_notifier_invalidate(g0, min(half, n))
        try:
            vm.check()
            checks.add("VM.check() holds after the even slots' deletion and the munmap", True)
        except InvariantError as e:
            checks.add(
                "VM.check() holds after the even slots' deletion and the munmap", False, str(e)
            )
        vm.destroy()
    metrics: dict[str, float] = {f"{k}_s": v for k, v in times.items()}
    metrics.update({f"wall_{k}_s": v for k, v in walls.items()})
    metrics["teardown_s"] = clock.seconds("teardown")
    metrics["wall_teardown_s"] = clock.phases[-1][2]
    params = {
        "vcpus": nvcpus,
        "mem_gib": mem_gib,
        "slot_gib": slot_gib,
        "hugepages": huge,
        "mem_bytes": mem,
        "slot_bytes": slot,
    }
    detail = {
        "checks": checks.to_list(),
        "stages": per_stage,
        "slots": len(slots),
        "pages_mapped_before_teardown": int(stats_before_teardown["pages_4k"]),
    }
    return finish(
        "mmu_stress",
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
    from tdpmmu.workloads.demand_paging import count_arg, size_arg

    parser.add_argument(
        "-c",
        "--vcpus",
        type=count_arg(1, 4096),
        metavar="N",
        help="vCPUs (default: 3/4 of the modeled machine's logical CPUs)",
    )
    parser.add_argument(
        "-m",
        "--mem-gib",
        type=count_arg(1),
        default=128,
        metavar="GB",
        help="guest GiB (128: with the default vCPUs about 90 s of host time; --mem-bytes for "
        "quick runs)",
    )
    parser.add_argument(
        "-s", "--slot-gib", type=count_arg(1), default=2, metavar="GB", help="slot GiB (2)"
    )
    parser.add_argument(
        "-H", "--hugepages", action="store_true", help="back the memfd with 2M hugepages"
    )
    parser.add_argument(
        "--mem-bytes",
        type=size_arg,
        metavar="SIZE",
        help="simulator only: guest memory in bytes (e.g. 64M), instead of -m",
    )
    parser.add_argument(
        "--slot-bytes",
        type=size_arg,
        metavar="SIZE",
        help="simulator only: memslot size in bytes (e.g. 16M), instead of -s",
    )


def _from_args(ns: argparse.Namespace) -> dict[str, Any]:
    return {
        "vcpus": ns.vcpus,
        "mem_gib": ns.mem_gib,
        "slot_gib": ns.slot_gib,
        "hugepages": ns.hugepages,
        "mem_bytes": ns.mem_bytes,
        "slot_bytes": ns.slot_bytes,
    }


register(
    Workload(
        name="mmu_stress",
        command="mmu-stress",
        selftest="mmu_stress_test",
        summary="many aliasing memslots: write, MMU reset, write, mprotect RO/RW, teardown.",
        run=mmu_stress,
        vm_types=("default", "sw_protected", "snp"),
        add_arguments=_add_arguments,
        from_args=_from_args,
    )
)
