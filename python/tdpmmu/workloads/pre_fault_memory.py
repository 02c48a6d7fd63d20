"""KVM's ``pre_fault_memory_test``: ``KVM_PRE_FAULT_MEMORY`` maps guest memory ahead of the
guest, reports its progress, and fails with ENOENT where no memslot is (``pre_fault_memory``).

The test memslot is 2 MiB + 4 KiB of anonymous memory at the top of guest-physical space
(aligned down to 2 MiB; the selftest's slot 10), private guest_memfd memory on a confidential VM
(the selftest's SW_PROTECTED variant; ``private=False`` for shared memory there). After the VM
is launched (a TD finalized: KVM allows pre-faults on a TD only then), three requests, each
issued as the selftest does — again while it returns success with bytes left — and checked:

1. ``[base, base + 2 MiB)``: succeeds with 0 bytes left;
2. ``[base + 2 MiB, +8 KiB)``: the first page is the slot's last, the second is in no memslot:
   the first call maps one page and returns success with 4 KiB left, the next fails with
   ENOENT (KVM: RET_PF_EMULATE, no memslot) — 4 KiB left;
3. ``[base + 2 MiB + 4 KiB, +4 KiB)``: no memslot: ENOENT at once, 4 KiB left.

Every call must change the remaining size exactly when it succeeds (each check is recorded in
``detail["checks"]``; a failed one does not raise: the result's ``ok`` is False). Then the guest
reads every page of the slot once (``memstress.run_pass``, the run's clock): since everything is
mapped, it must take no fault (``pf_taken`` and ``pf_fixed`` do not grow). One
``KVM_PRE_FAULT_MEMORY`` call is modeled as ``VM.populate`` over the part of the range that memslots
cover, from its start (an ioctl: no exit, ``fault_handling_ns`` per leaf), and ENOENT where the
range leaves every memslot. The selftest's variant that deletes the memslot concurrently is not
modeled.
"""

import argparse
import errno
import time
from typing import Any, Unpack

from tdpmmu import coerce
from tdpmmu.vm import VM
from tdpmmu.vmspec import VmSpec, launch
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
from tdpmmu.workloads.common import PAGE_SIZE
from tdpmmu.workloads.memstress import DEFAULT_GUEST_SEED, Layout, run_pass

__all__ = ["TEST_PAGES", "pre_fault_ioctl", "pre_fault_memory"]

#: The selftest's TEST_SIZE (2 MiB + 4 KiB) in 4 KiB pages.
TEST_PAGES = 513

_PAGES_2M = 512


def _covered(vm: VM, gfn: int, npages: int) -> int:
    """Pages from ``gfn`` on (at most ``npages``) that memslots cover without a gap."""
    slots = sorted((s[1], s[1] + s[2]) for s in vm.memslots())
    g, end = gfn, gfn + npages
    for start, stop in slots:
        if start <= g < stop:
            g = min(stop, end)
            if g == end:
                break
    return g - gfn


def pre_fault_ioctl(vm: VM, gfn: int, npages: int, private: bool | None) -> tuple[int, int]:
    """One ``KVM_PRE_FAULT_MEMORY`` call on vCPU 0 over ``[gfn, gfn + npages)``.

    KVM maps the range from its start and stops at the first page in no memslot
    (RET_PF_EMULATE becomes ENOENT); a call that made progress returns success with the rest
    of the range left, one that made none fails.

    Args:
        vm: the VM.
        gfn: first 4 KiB guest page.
        npages: 4 KiB pages in the request, >= 1.
        private: as ``VM.populate``.

    Returns:
        tuple[int, int]: (0 on success or ``-errno.ENOENT``, pages done).

    Raises:
        ConfigError: what ``VM.populate`` refuses other than a missing memslot (attributes of
            the wrong kind, private memory without guest_memfd, a TD not finalized).
        VmBugged: a hook or SEAMCALL failed.
    """
    done = _covered(vm, gfn, npages)
    if done == 0:
        return -errno.ENOENT, 0
    vm.populate(gfn, done, private)
    return 0, done


def pre_fault_memory(private: bool | None = None, **sim: Unpack[SimArgs]) -> WorkloadResult:
    """KVM's ``pre_fault_memory_test`` (module docstring: the requests and checks).

    Args:
        private: pre-fault private memory (a guest_memfd slot with private attributes); None
            (default): private on a confidential VM, shared on a default VM. True on a default
            VM is refused.
        **sim: the simulator's arguments (``SimArgs``); ``clock`` drives the guest's pass.

    Returns:
        WorkloadResult: lines per request (bytes left and the outcome) and the modeled time of
        the pre-faults and of the guest's pass; metrics ``pre_fault_time_s``,
        ``guest_pass_time_s``, ``guest_pass_faults`` (and ``wall_`` twins); ``detail["checks"]``
        (``Checks`` records: each request's bytes left, outcome and progress, no fault in the
        guest's pass, ``VM.check()``; a failed one is recorded, not raised: ``ok`` False).

    Raises:
        ConfigError: ``private`` True on a default VM, or another bad simulator argument.
        TypeError: a value of the wrong type.
    """
    from tdpmmu._core import ConfigError, InvariantError

    run_start = time.perf_counter()
    options = sim_options(sim)
    spec = VmSpec.create(**spec_args(sim), memory=2 << 20, vcpus=1, backing=4096)
    want_private = spec.confidential if private is None else coerce.flag(private, "private")
    if want_private and not spec.confidential:
        raise ConfigError("private: a default VM has no private memory (vm_type)")
    vm = track_vm(spec.build())
    base = (vm.max_gfn - TEST_PAGES) // _PAGES_2M * _PAGES_2M
    slot = vm.add_memslot(base, TEST_PAGES, 4096, gmem=want_private)
    if spec.confidential:
        vm.set_memory_attributes(base, TEST_PAGES, private=want_private)
    launch(vm)
    clock = Clock(vm, sim.get("progress"), 2)
    checks = Checks()
    lines = ["Testing guest mode: PA-bits:ANY, VA-bits:48,  4K pages"]
    kind = "private" if want_private else "shared"

    requests = [
        ("the whole 2 MiB", 0, _PAGES_2M, 0),
        ("past the slot's end", _PAGES_2M, 2, 1),
        ("outside the slot", TEST_PAGES, 1, 1),
    ]
    with clock.phase("KVM_PRE_FAULT_MEMORY"):
        for label, off, n, left_expected in requests:
            gfn, left, calls, ret = base + off, n, 0, 0
            bad_calls: list[int] = []
            while True:
                prev = left
                ret, done = pre_fault_ioctl(vm, gfn, left, want_private)
                calls += 1
                gfn, left = gfn + done, left - done
                if (left < prev) == (ret < 0):
                    bad_calls.append(calls)
                if ret < 0 or left == 0:
                    break
            outcome = "0" if ret == 0 else "ENOENT"
            checks.add(
                f"pre-fault {label}: the remaining size changes exactly when a call succeeds",
                not bad_calls,
                f"call(s) {bad_calls} disagree with their return" if bad_calls else "",
            )
            want = "success" if left_expected == 0 else "ENOENT"
            checks.add(
                f"pre-fault {label}: {left_expected * PAGE_SIZE} bytes left and {want}",
                left == left_expected and (ret == 0) == (left_expected == 0),
                f"{left * PAGE_SIZE} bytes left, ret {outcome}",
            )
            lines.append(
                f"KVM_PRE_FAULT_MEMORY [{(base + off) * PAGE_SIZE:#x}, +{n * PAGE_SIZE:#x}) "
                f"{kind}: {left * PAGE_SIZE} bytes left, ret {outcome} ({calls} calls)"
            )
    pre_s = clock.seconds("KVM_PRE_FAULT_MEMORY")
    before = vm.stats
    layout = Layout(1, TEST_PAGES * PAGE_SIZE, False, 4096, base, TEST_PAGES, (slot,))
    res = run_pass(
        vm, layout, options, write_percent=0, seed=DEFAULT_GUEST_SEED, private=want_private
    )
    clock.record("guest pass", res.modeled_s, res.wall_s)
    after = vm.stats
    faults = int(sum(p["faults"] for p in res.per_vcpu))
    taken = int(after["pf_taken"] - before["pf_taken"])
    fixed = int(after["pf_fixed"] - before["pf_fixed"])
    checks.add(
        "the guest's reads of the pre-faulted slot take no fault",
        faults == 0 and taken == 0 and fixed == 0,
        f"{faults} faults in the pass; pf_taken +{taken}, pf_fixed +{fixed}",
    )
    try:
        vm.check()
        checks.add("VM.check() holds after the run", True)
    except InvariantError as e:
        checks.add("VM.check() holds after the run", False, str(e))
    lines += [
        f"Pre-fault time: {pre_s:.9f}s",
        f"Guest read pass time: {res.modeled_s:.9f}s, faults: {faults}",
    ]
    metrics = {
        "pre_fault_time_s": pre_s,
        "guest_pass_time_s": res.modeled_s,
        "guest_pass_faults": float(faults),
        "wall_pre_fault_time_s": clock.phases[0][2],
        "wall_guest_pass_time_s": res.wall_s,
    }
    return finish(
        "pre_fault_memory",
        vm,
        spec,
        params={"private": want_private},
        options=options,
        lines=lines,
        metrics=metrics,
        clock=clock,
        run_start=run_start,
        detail={
            "checks": checks.to_list(),
            "region": [base * PAGE_SIZE, (base + TEST_PAGES) * PAGE_SIZE],
            "virtual": res.virtual,
        },
    )


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    # The selftest has no flags of its own (it runs the shared and, where the VM type has
    # private memory, the private variant); the simulator's --vm-type picks the VM.
    del parser


def _from_args(ns: argparse.Namespace) -> dict[str, Any]:
    del ns
    return {}


register(
    Workload(
        name="pre_fault_memory",
        command="pre-fault-memory",
        selftest="pre_fault_memory_test",
        summary="KVM_PRE_FAULT_MEMORY: progress, ENOENT outside memslots, no faults after.",
        run=pre_fault_memory,
        vm_types=("default", "sw_protected", "tdx", "snp"),
        add_arguments=_add_arguments,
        from_args=_from_args,
    )
)
