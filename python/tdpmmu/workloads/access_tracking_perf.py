"""KVM's ``access_tracking_perf_test``: the cost of MMU-notifier aging as guest accesses see it
(``access_tracking_perf``).

The vCPUs populate their slices, write and read them (the control), then the memory is marked
idle, written, marked idle again and read. Marking idle is modeled as the selftest's page_idle
path reaches KVM: the MMU notifier's clear_young (``VM.age_gfn_range``, KVM's
``kvm_tdp_mmu_age_gfn_range``) over each vCPU's slice, done by that vCPU's thread, all in
parallel (with ``overlap`` only vCPU 0 marks, the whole region). The phase's modeled time is the
slowest slice's ledger time; the host's own page_idle work (pagemap reads, bitmap writes, the
rmap walk) has no CostModel figure and is not modeled. With EPT A/D bits the guest's later
accesses set Accessed again without exits. Without them (``ad_bits=False``, ``--no-ad-bits``:
KVM's ``enable_ept_ad_bits=0``) marking idle makes each SPTE access-tracked, so the first
access to every idle page takes an exit that ``fast_page_fault`` fixes lockless (``pf_fast``,
``fast_fix_ns``): "Writing to idle memory" costs more than "Writing to populated memory".

Sanity check (the selftest's): when memory is marked idle again, a page whose Accessed bit is
still clear was not accessed since the last marking ("still idle"); more than 10 % of a slice
still idle prints a warning and, unless ``warn_only``, fails its check (recorded: the run
still returns every figure).
"""

import argparse
import time
from typing import Any, Unpack

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
from tdpmmu.workloads.demand_paging import add_memstress_flags, count_arg

__all__ = ["PHASES", "access_tracking_perf"]

#: The selftest's phase labels, in order (page_idle aging).
PHASES = (
    "Populating memory",
    "Writing to populated memory",
    "Reading from populated memory",
    "Mark memory idle (page_idle)",
    "Writing to idle memory",
    "Mark memory idle (page_idle)",
    "Reading from idle memory",
)


def _metric(label: str) -> str:
    name = label.lower().replace("(page_idle)", "").strip().replace(" ", "_")
    return f"{name}_time_s"


def access_tracking_perf(
    vcpus: int = 1,
    bytes_per_vcpu: str | int = "1G",
    backing: str | int = "anonymous",
    overlap: bool = False,
    warn_only: int | None = None,
    private: bool | None = None,
    **sim: Unpack[SimArgs],
) -> WorkloadResult:
    """KVM's ``access_tracking_perf_test`` with page_idle aging (module docstring).

    Args:
        vcpus: vCPUs (``-v``), 1..4096 (default 1).
        bytes_per_vcpu: memory per vCPU (``-b``), bytes or a size string, a positive multiple
            of 4096 (default ``"1G"``).
        backing: a selftest ``-s`` name or a host page size (default ``"anonymous"``).
        overlap: every vCPU walks the whole region and only vCPU 0 marks it idle (``-o``).
        warn_only: ``-w``: > 0 only warn when too many pages are still idle, 0 fail; None
            (default, the selftest's auto): fail (warn-only would need a nested host or NUMA
            balancing, neither modeled).
        private: the region's memory on a confidential VM. None (default): shared on default
            and sw_protected VMs, refused on tdx and snp (their memory is private: aging walks
            only shared mappings, and guest_memfd pages are outside page_idle's reach); True:
            refused; False: shared memory on every type.
        **sim: the simulator's arguments (``SimArgs``).

    Returns:
        WorkloadResult: lines ``"%-30s: %.9fs"`` per phase (modeled), ``metrics``
        (``populating_memory_time_s``, ..., ``mark_memory_idle_time_s`` (the first),
        ``mark_memory_idle_2_time_s``, ``still_idle_pages``), ``detail``: ``checks``
        (``Checks`` records; more than 10 % of a slice still idle fails the check unless
        ``warn_only``: recorded, not raised, ``ok`` False), ``still_idle`` (per marking, per
        slice), ``warnings``.

    Raises:
        ConfigError: a bad value, naming it; private memory (``vm_type`` tdx/snp, or
            ``private=True``).
        TypeError: a value of the wrong type.
        VmBugged: a KVM_BUG_ON during the run.
    """
    run_start = time.perf_counter()
    opts = sim_options(sim)
    nvcpus = coerce.count(vcpus, "vcpus")
    flag = coerce.flag(overlap, "overlap")
    warn = None if warn_only is None else coerce.count(warn_only, "warn_only", 0)
    vm_type = str(sim.get("vm_type", "default"))
    if private is not None:
        coerce.flag(private, "private")
    if private or (private is None and vm_type in ("tdx", "snp")):
        raise ConfigError(
            f"{'private' if private else 'vm_type'}: a {vm_type} guest's private memory "
            "(guest_memfd) cannot be aged: the MMU notifier's clear_young/test_young walk only "
            "shared mappings and page_idle cannot reach guest_memfd pages; pass private=False "
            "(--shared-memory) "
            "to run on shared memory"
        )
    vm, spec, layout = memstress.build(
        sim,
        vcpus=nvcpus,
        bytes_per_vcpu=bytes_per_vcpu,
        backing=backing,
        overlap=flag,
        private=False,
    )
    clock = Clock(vm, sim.get("progress"), len(PHASES))
    lines = [
        f"Random seed: {memstress.DEFAULT_GUEST_SEED:#x}",
        "Using page_idle for aging",
        *layout.harness_lines(),
    ]
    metrics: dict[str, float] = {}
    markers = range(1) if flag else range(nvcpus)
    marked = False
    still_idle: list[list[int]] = []
    warnings: list[str] = []
    too_many = False

    def emit(label: str, t: float, n: int) -> None:
        lines.append(f"{label:<30}: {t:.9f}s")
        key = _metric(label)
        metrics[key if n == 1 else key.replace("_time_s", f"_{n}_time_s")] = t

    def guest(label: str, write_percent: int) -> None:
        res = memstress.run_pass(
            vm,
            layout,
            opts,
            write_percent=write_percent,
            seed=memstress.DEFAULT_GUEST_SEED,
        )
        clock.record(label, res.modeled_s, res.wall_s)
        emit(label, res.modeled_s, 1)

    def mark_idle(n: int) -> None:
        nonlocal marked, too_many
        label = PHASES[3]
        counts = []
        new: list[str] = []
        for v in markers:
            first, pages = layout.slice(v)
            idle = 0
            if marked:
                # Not young since the last marking: the page_idle bit is still set.
                idle = sum(1 for g in range(first, first + pages) if not vm.test_age_gfn(g))
            counts.append(idle)
            if idle * 10 > pages:
                too_many = True
                new.append(
                    f"WARNING: vCPU{v}: Too many pages still idle ({idle} out of {pages}), "
                    "this will affect performance results."
                )
        still_idle.append(counts)
        wall = time.perf_counter()
        per_slice = []
        for v in markers:
            first, pages = layout.slice(v)
            before = clock.modeled_ns()
            vm.age_gfn_range(first, pages)
            per_slice.append((clock.modeled_ns() - before) / 1e9)
        # Each vCPU thread marks its own slice, in parallel: the slowest one's time.
        t = clock.record(label, max(per_slice), time.perf_counter() - wall)
        warnings.extend(new)
        lines.extend(new)
        emit(label, t, n)
        marked = True

    guest(PHASES[0], 100)
    guest(PHASES[1], 100)
    guest(PHASES[2], 0)
    mark_idle(1)
    guest(PHASES[4], 100)
    mark_idle(2)
    guest(PHASES[6], 0)
    total_idle = sum(sum(c) for c in still_idle)
    metrics["still_idle_pages"] = float(total_idle)
    checks = Checks()
    # The selftest asserts this unless -w makes it a warning (then it holds, noting the warning).
    checks.add(
        "pages young again after the accesses (<= 10% of each slice still idle)",
        not too_many or bool(warn),
        ("warn only (-w): " if too_many and warn else "") + "; ".join(warnings),
    )
    detail = {
        "checks": checks.to_list(),
        "still_idle": still_idle,
        "warnings": warnings,
        "region": list(layout.region),
    }
    params = {
        "vcpus": nvcpus,
        "bytes_per_vcpu": layout.bytes_per_vcpu,
        "backing": backing,
        "overlap": flag,
        "warn_only": warn,
        "private": private,
    }
    return finish(
        "access_tracking_perf",
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
        "--shared-memory",
        action="store_true",
        help="tdx/snp: run on shared memory (KVM refuses this on guest_memfd, private, memory)",
    )
    parser.add_argument(
        "-w",
        "--warn-only",
        type=count_arg(0),
        default=None,
        metavar="N",
        help=">0: only warn when too many pages are still idle; 0: fail (default: fail)",
    )


def _from_args(ns: argparse.Namespace) -> dict[str, Any]:
    return {
        "private": False if ns.shared_memory else None,
        "vcpus": ns.vcpus,
        "bytes_per_vcpu": ns.bytes_per_vcpu,
        "backing": ns.backing,
        "overlap": ns.overlap,
        "warn_only": ns.warn_only,
    }


register(
    Workload(
        name="access_tracking_perf",
        command="access-tracking-perf",
        selftest="access_tracking_perf_test",
        summary="MMU-notifier aging (clear_young) and the guest accesses that make pages "
        "young again.",
        run=access_tracking_perf,
        vm_types=("default", "sw_protected", "tdx", "snp"),
        add_arguments=_add_arguments,
        from_args=_from_args,
    )
)
