"""KVM's ``dirty_log_perf_test``: the cost of dirty logging as live migration uses it
(``dirty_log_perf``).

Flow (memstress region at the top of guest-physical space, split into ``slots`` memslots):
a populate pass (100 % writes, in order), dirty logging enabled on every slot
(``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`` with ``KVM_DIRTY_LOG_INITIALLY_SET`` unless
``no_manual_protect``), then per iteration one guest pass followed by ``KVM_GET_DIRTY_LOG``
(and ``KVM_CLEAR_DIRTY_LOG`` when manual) on each slot, and finally logging disabled, which
recovers huge mappings. Host-side steps are timed by the VM's modeled ledger, guest passes by
the slowest vCPU's modeled time.

Differences from the selftest, all documented where they apply:

- the guest's generator: as in the selftest, vCPU ``i`` seeds it once (``seed + i``) and it
  runs on across the populate pass, the iterations and the ``-e`` passes (each engine call
  starts where the previous pass left it: ``memstress.run_pass``'s ``rng_skip``). The numbers
  drawn are not the selftest's, though: the engine starts the state at ``(seed + i) mod
  (2^31 - 2) + 1`` where memstress starts it at ``seed + i``, and a 100 % write pass (the
  populate pass, ``-w 100``) draws no write coin where memstress draws one per access;
- ``run_while_disabling`` (``-e``): the engine cannot run a host ioctl concurrently with the
  vCPUs, so the disable is timed alone, with one guest pass just before it (logging still on)
  and one right after it (the vCPUs re-faulting what the disable changed), reported as phases
  and not printed (the selftest prints nothing for them); contention between the disable and
  the vCPUs is not modeled.
"""

import argparse
import dataclasses
import time
from collections.abc import Sequence
from typing import Any, Unpack

import numpy as np
import numpy.typing as npt

from tdpmmu import coerce
from tdpmmu._core import ConfigError
from tdpmmu.workloads import memstress
from tdpmmu.workloads.base import (
    Checks,
    Clock,
    SimArgs,
    Workload,
    WorkloadResult,
    finish,
    register,
    sim_options,
)
from tdpmmu.workloads.common import PAGE_SIZE
from tdpmmu.workloads.demand_paging import (
    add_memstress_flags,
    add_pinning_flag,
    count_arg,
    size_arg,
    split_pinning,
)

__all__ = ["dirty_log_perf", "guest_writes"]

#: Replay every vCPU's writes for the bitmap check up to this many accesses per pass; above
#: it only vCPU 0's are replayed (the check stays exact for them).
_EXACT_CHECK_ACCESSES = 1 << 21

_M31 = 0x7FFFFFFF


def guest_writes(
    layout: memstress.Layout,
    vcpu: int,
    seed: int,
    write_percent: int,
    random_access: bool,
    rng_skip: int = 0,
) -> npt.NDArray[np.int64]:
    """The pages (offsets from the region's start) one vCPU writes in one pass, replaying the
    guest's Park-Miller generator as the engine runs it (seeded with ``seed + vcpu`` and
    advanced by ``rng_skip`` draws; with ``random_access`` a page draw, then a write draw
    unless ``write_percent`` is 100: ``memstress.draws_per_pass``).

    Args:
        layout: the run's layout.
        vcpu: the vCPU, ``0..layout.vcpus``.
        seed: the guest seed (vCPU ``i`` uses ``seed + i``).
        write_percent: 0..100.
        random_access: random page order.
        rng_skip: draws the vCPU's generator made before this pass, >= 0 (default 0).

    Returns:
        numpy.ndarray: sorted unique page offsets written. Never raises for valid arguments.
    """
    first, pages = layout.slice(vcpu)
    off0 = first - layout.base_gfn
    state = ((seed + vcpu) % (1 << 64)) % (_M31 - 1) + 1
    # Each draw multiplies the state by 48271 modulo 2**31 - 1.
    state = state * pow(48271, rng_skip, _M31) % _M31
    out: list[int] = []
    for i in range(pages):
        if random_access:
            state = state * 48271 % _M31
            page = state % pages
        else:
            page = i
        if write_percent == 100:
            write = True
        else:
            state = state * 48271 % _M31
            write = state % 100 < write_percent
        if write:
            out.append(off0 + page)
    return np.unique(np.asarray(out, dtype=np.int64))


def _region_bitmap(vm: Any, layout: memstress.Layout) -> npt.NDArray[np.bool_]:
    """GET_DIRTY_LOG of every slot, as one bool per page of the region (slots in gfn order)."""
    parts = []
    for slot, _, n in layout.slots():
        words = vm.get_dirty_log(slot)
        bits = np.unpackbits(words.view(np.uint8), bitorder="little")[:n]
        parts.append(bits.astype(bool))
    return np.concatenate(parts)


def dirty_log_perf(
    vcpus: int = 1,
    bytes_per_vcpu: str | int = "1G",
    backing: str | int = "anonymous",
    iterations: int = 2,
    write_percent: int = 100,
    random_access: bool = False,
    no_manual_protect: bool = False,
    run_while_disabling: bool = False,
    overlap: bool = False,
    offset: str | int | None = None,
    slots: int = 1,
    random_seed: int = 1,
    cpus: Sequence[int] | None = None,
    nested: bool = False,
    private: bool | None = None,
    pml: bool = False,
    **sim: Unpack[SimArgs],
) -> WorkloadResult:
    """KVM's ``dirty_log_perf_test`` (module docstring: flow and differences).

    Args:
        vcpus: vCPUs (``-v``), 1..4096 (default 1).
        bytes_per_vcpu: memory per vCPU (``-b``), bytes or a size string, a positive multiple
            of 4096 (default ``"1G"``).
        backing: a selftest ``-s`` name or a host page size (default ``"anonymous"``).
        iterations: dirtying iterations (``-i``), >= 2 (default 2).
        write_percent: share of writes in the dirtying passes (``-w``), 0..100 (default 100).
        random_access: random page order in the dirtying passes (``-a``).
        no_manual_protect: ``-g``: no ``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2``: enabling
            write-protects every slot, GET_DIRTY_LOG takes and re-protects, no CLEAR.
        run_while_disabling: ``-e`` (see the module docstring for what is modeled).
        overlap: every vCPU walks the whole region (``-o``).
        offset: guest-physical address of the region (``-p``), bytes or a size string; None
            (default): the top of guest-physical space.
        slots: memslots the region is split into (``-x``), >= 1 (default 1).
        random_seed: the guest's seed (``-r``), >= 1 (default 1, as the selftest).
        cpus: the ``-c`` pinning (``demand_paging``'s ``cpus``).
        nested: ``-n``; refused (running the vCPUs in L2 is not modeled).
        private: the region's memory on a confidential VM. None (default): shared memory on
            default and sw_protected VMs, refused on tdx and snp (their guests' memory starts
            private); True: refused (KVM refuses dirty logging on guest_memfd memslots);
            False: shared memory on every type.
        pml: log with Intel's Page Modification Logging (``VM.set_dirty_logging``'s ``pml``:
            4K leaves armed by clearing D, the CPU logs writes without an exit, one exit per
            512 logged pages) instead of write-protection (default False; KVM on Intel uses
            PML when the CPU has it; refused with ``ad_bits=False``).
        **sim: the simulator's arguments (``SimArgs``).

    Returns:
        WorkloadResult: the selftest's lines with modeled times, ``metrics``
        (``populate_memory_time_s``, ``enabling_dirty_logging_time_s``,
        ``iteration_<k>_dirty_memory_time_s``, ``..._get_dirty_log_time_s``,
        ``..._clear_dirty_log_time_s``, ``disabling_dirty_logging_time_s``,
        ``get_dirty_log_total_s``/``_avg_s``, ``clear_dirty_log_total_s``/``_avg_s``, pages
        dirtied per iteration), and ``detail["checks"]`` (each iteration's bitmap against what
        the guest wrote; the mappings huge again after disabling where the backing allows;
        ``Checks`` records: a failed one is recorded, not raised, and ``ok`` is False).

    Raises:
        ConfigError: a bad value, naming it; ``nested``; ``vm_type`` tdx/snp with private
            memory; ``private=True``.
        TypeError: a value of the wrong type.
        VmBugged: a KVM_BUG_ON during the run.
    """
    run_start = time.perf_counter()
    if coerce.flag(nested, "nested"):
        raise ConfigError("nested: running the vCPUs in L2 (-n) is not modeled")
    opts = sim_options(sim)
    nvcpus = coerce.count(vcpus, "vcpus")
    iters = coerce.count(iterations, "iterations", 2)
    wp = coerce.count(write_percent, "write_percent", 0, 100)
    rnd = coerce.flag(random_access, "random_access")
    manual = not coerce.flag(no_manual_protect, "no_manual_protect")
    evil = coerce.flag(run_while_disabling, "run_while_disabling")
    seed = coerce.count(random_seed, "random_seed", 1, (1 << 32) - 1)
    pinned, main_cpu = split_pinning(cpus, nvcpus, opts.machine)
    if pinned is not None:
        opts = dataclasses.replace(opts, cpus=pinned)
    vm_type = str(sim.get("vm_type", "default"))
    if private is not None:
        coerce.flag(private, "private")
    if private:
        raise ConfigError(
            "private: KVM refuses dirty logging on guest_memfd (private) memslots; use "
            "private=False (--shared-memory: shared memory)"
        )
    if private is None and vm_type in ("tdx", "snp"):
        raise ConfigError(
            f"vm_type: a {vm_type} guest's memory is private (guest_memfd) and KVM refuses "
            "dirty logging on such memslots; pass private=False (--shared-memory) to run on shared "
            "memory"
        )
    vm, spec, layout = memstress.build(
        sim,
        vcpus=nvcpus,
        bytes_per_vcpu=bytes_per_vcpu,
        backing=backing,
        slots=slots,
        overlap=overlap,
        offset=offset,
        private=False,
    )
    clock = Clock(vm, sim.get("progress"), 3 + iters * (3 if manual else 2) + 2 * int(evil))
    lines = [
        f"Test iterations: {iters}",
        *layout.harness_lines(),
        f"Random seed: {seed}",
    ]
    metrics: dict[str, float] = {}
    checks = Checks()
    passes: list[dict[str, Any]] = []
    # Draws each vCPU's generator has made so far: every pass continues its stream.
    drawn = 0

    def guest_pass(label: str, w: int, r: bool) -> float:
        nonlocal drawn
        res = memstress.run_pass(
            vm, layout, opts, write_percent=w, random_access=r, seed=seed, rng_skip=drawn
        )
        clock.record(label, res.modeled_s, res.wall_s)
        passes.append({"label": label, "seed": seed, "rng_skip": drawn, "virtual": res.virtual})
        drawn += memstress.draws_per_pass(layout.pages_per_vcpu, random_access=r, write_percent=w)
        return res.modeled_s

    # Sequential 100 % writes: the populate pass draws nothing, iteration 1 starts the stream.
    t = guest_pass("Populate memory", 100, False)
    lines.append(f"Populate memory time: {t:.9f}s")
    metrics["populate_memory_time_s"] = t
    with clock.phase("Enabling dirty logging") as ph:
        for slot in layout.slot_ids:
            vm.set_dirty_logging(
                slot, True, manual_protect=manual, initially_set=manual, pml=coerce.flag(pml, "pml")
            )
    lines += [f"Enabling dirty logging time: {ph.modeled_s:.9f}s", ""]
    metrics["enabling_dirty_logging_time_s"] = ph.modeled_s
    get_total = clear_total = 0.0
    exact = layout.pages_per_vcpu * nvcpus <= _EXACT_CHECK_ACCESSES
    bitmap_ok: list[bool] = []
    dirtied: list[int] = []
    for k in range(1, iters + 1):
        skip = drawn
        t = guest_pass(f"Iteration {k} dirty memory", wp, rnd)
        lines.append(f"Iteration {k} dirty memory time: {t:.9f}s")
        metrics[f"iteration_{k}_dirty_memory_time_s"] = t
        with clock.phase(f"Iteration {k} get dirty log") as ph:
            dirty = _region_bitmap(vm, layout)
        get_total += ph.modeled_s
        lines.append(f"Iteration {k} get dirty log time: {ph.modeled_s:.9f}s")
        metrics[f"iteration_{k}_get_dirty_log_time_s"] = ph.modeled_s
        if manual:
            with clock.phase(f"Iteration {k} clear dirty log") as ph:
                for slot, _, n in layout.slots():
                    vm.clear_dirty_log(slot, 0, n)
            clear_total += ph.modeled_s
            lines.append(f"Iteration {k} clear dirty log time: {ph.modeled_s:.9f}s")
            metrics[f"iteration_{k}_clear_dirty_log_time_s"] = ph.modeled_s
        # What the guest wrote this iteration must be exactly what the bitmap holds (with
        # INITIALLY_SET the first one also holds every page).
        replay = range(nvcpus) if exact else range(1)
        written = np.zeros(layout.npages, dtype=bool)
        for v in replay:
            written[guest_writes(layout, v, seed, wp, rnd, skip)] = True
        dirtied.append(int(dirty.sum()))
        metrics[f"iteration_{k}_dirty_pages"] = float(dirty.sum())
        if manual and k == 1:
            ok = bool(dirty.all())
        elif exact:
            ok = bool(np.array_equal(dirty, written))
        else:
            ok = bool(dirty[written].all())
        bitmap_ok.append(ok)
    if evil:
        # -e: the vCPUs go on running while logging is disabled. The engine cannot overlap a
        # host ioctl with the vCPUs, so they run one pass just before it (logging still on:
        # the pages just re-protected take write-protection faults) and one right after it
        # (re-faulting what disabling changed); the disable's own time excludes contention.
        guest_pass("vCPU pass before disabling (-e)", wp, rnd)
    with clock.phase("Disabling dirty logging") as ph:
        for slot in layout.slot_ids:
            vm.set_dirty_logging(slot, False)
    disable_s = ph.modeled_s
    if evil:
        guest_pass("vCPU pass after disabling (-e)", wp, rnd)
    lines.append(f"Disabling dirty logging time: {disable_s:.9f}s")
    metrics["disabling_dirty_logging_time_s"] = disable_s
    lines.append(
        f"Get dirty log over {iters} iterations took {get_total:.9f}s. "
        f"(Avg {get_total / iters:.9f}s/iteration)"
    )
    metrics["get_dirty_log_total_s"] = get_total
    metrics["get_dirty_log_avg_s"] = get_total / iters
    if manual:
        lines.append(
            f"Clear dirty log over {iters} iterations took {clear_total:.9f}s. "
            f"(Avg {clear_total / iters:.9f}s/iteration)"
        )
        metrics["clear_dirty_log_total_s"] = clear_total
        metrics["clear_dirty_log_avg_s"] = clear_total / iters
    bad = [k for k, ok in enumerate(bitmap_ok, 1) if not ok]
    scope = "every vCPU's writes, exactly" if exact else "vCPU 0's writes (a subset)"
    checks.add(
        "each iteration's dirty bitmap holds the pages the guest wrote",
        not bad,
        f"checked against {scope}"
        + (f"; the dirty bitmap differs in iteration(s) {bad}" if bad else ""),
    )
    huge = layout.backing > PAGE_SIZE
    if huge:
        small = int(vm.stats["pages_4k"])
        checks.add(
            "huge mappings recovered after disabling",
            small == 0,
            f"{small:,} 4 KiB leaves left" if small else "",
        )
    params = {
        "vcpus": nvcpus,
        "bytes_per_vcpu": layout.bytes_per_vcpu,
        "backing": backing,
        "iterations": iters,
        "write_percent": wp,
        "random_access": rnd,
        "no_manual_protect": not manual,
        "pml": pml,
        "run_while_disabling": evil,
        "overlap": layout.overlap,
        "offset": offset,
        "slots": len(layout.slot_ids),
        "random_seed": seed,
        "cpus": None if cpus is None else list(cpus),
        "private": private,
    }
    detail = {
        "checks": checks.to_list(),
        "region": list(layout.region),
        "slots": [list(x) for x in layout.slots()],
        "dirty_pages": dirtied,
        "main_cpu": main_cpu,
        "passes": passes,
    }
    return finish(
        "dirty_log_perf",
        vm,
        spec,
        params=params,
        options=opts,
        lines=lines,
        metrics=metrics,
        clock=clock,
        run_start=run_start,
        detail=detail,
    )


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    add_memstress_flags(parser)
    parser.add_argument(
        "--pml",
        action="store_true",
        help="log with Intel PML (CPU-logged writes, an exit per 512) instead of "
        "write-protection (simulator only; KVM uses PML where the CPU has it)",
    )
    parser.add_argument(
        "--shared-memory",
        action="store_true",
        help="tdx/snp: run on shared memory (KVM refuses this on guest_memfd, private, memory)",
    )
    parser.add_argument(
        "-a", "--random-access", action="store_true", help="random page order in the passes"
    )
    parser.add_argument(
        "-e",
        "--run-while-disabling",
        action="store_true",
        help="keep the vCPUs running while logging is disabled (modeled as a pass after it)",
    )
    parser.add_argument(
        "-g",
        "--no-manual-protect",
        action="store_true",
        help="do not enable KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (GET also clears)",
    )
    parser.add_argument(
        "-i", "--iterations", type=count_arg(2), default=2, metavar="N", help=">= 2 (default 2)"
    )
    parser.add_argument(
        "-n", "--nested", action="store_true", help="run the vCPUs in L2 (not modeled: refused)"
    )
    parser.add_argument(
        "-p",
        "--offset",
        type=size_arg,
        default=None,
        metavar="OFF",
        help="guest-physical address of the test memory (default: top of guest-physical space)",
    )
    parser.add_argument(
        "-r",
        "--random-seed",
        type=count_arg(1, (1 << 32) - 1),
        default=1,
        metavar="SEED",
        help="guest random seed (default 1)",
    )
    parser.add_argument(
        "-w",
        "--write-percent",
        type=count_arg(0, 100),
        default=100,
        metavar="PCT",
        help="share of writes, 0..100 (default 100)",
    )
    parser.add_argument(
        "-x", "--slots", type=count_arg(1, 32767), default=1, metavar="N", help="memslots (1)"
    )
    add_pinning_flag(parser)


def _from_args(ns: argparse.Namespace) -> dict[str, Any]:
    return {
        "private": False if ns.shared_memory else None,
        "vcpus": ns.vcpus,
        "bytes_per_vcpu": ns.bytes_per_vcpu,
        "backing": ns.backing,
        "iterations": ns.iterations,
        "write_percent": ns.write_percent,
        "random_access": ns.random_access,
        "no_manual_protect": ns.no_manual_protect,
        "pml": ns.pml,
        "run_while_disabling": ns.run_while_disabling,
        "overlap": ns.overlap,
        "offset": ns.offset,
        "slots": ns.slots,
        "random_seed": ns.random_seed,
        "cpus": ns.cpus,
        "nested": ns.nested,
    }


register(
    Workload(
        name="dirty_log_perf",
        command="dirty-log-perf",
        selftest="dirty_log_perf_test",
        summary="dirty logging as live migration uses it: enable, dirtying passes with "
        "GET/CLEAR_DIRTY_LOG, disable.",
        run=dirty_log_perf,
        vm_types=("default", "sw_protected", "tdx", "snp"),
        add_arguments=_add_arguments,
        from_args=_from_args,
    )
)
