"""KVM's ``memslot_perf_test``: memslot operations while one vCPU touches memory
(``memslot_perf``).

Geometry (4 KiB pages), as the selftest's: the area starts at GPA 256 MiB with a 64 KiB
sync/aux part, then the test part; ``map`` uses 32 MiB (+64 KiB), ``unmap``/``unmap chunked``
128 MiB (+64 KiB, 2 MiB chunks), the others 512 MiB (+64 KiB); the move area is 192 KiB. The
simulator-only ``scale`` (1, 2, 4, 8, 16 or 32) divides the 512/128/32 MiB sizes (never the
64 KiB or 192 KiB pieces, nor the 2 MiB chunk) so tests stay small. Each run builds a fresh VM
(slot 0: 2 MiB at gfn 0) and splits its area over ``cap - 1`` memslots of
``pages // (cap - 1)`` pages (the last one takes the rest), ``cap`` being ``slots`` (``-s``),
KVM's x86 ``KVM_CAP_NR_MEMSLOTS`` (32764) for ``-1``, or by default 512 (KVM's old x86 limit,
so a default run stays fast; the full count is ``-s -1``). The default cap is lowered per test
to what its area allows (one page per slot at least; for ``move active area`` a last slot of
half the move area), and a line says so; a cap given with ``-s`` is used as given, and the
selftest's "Memslot count too high" line ends a test it does not fit.

Each test's loop is iterated until the run's modeled time reaches ``seconds`` (``-l``, modeled
seconds) or ``max_iterations`` loops were done (default 50, a deterministic cap on host work;
a run it ended gets a line ``(stopped by --max-iterations N before -l SEC modeled seconds)``
after its ``Done ...`` line, and ``capped`` in ``detail["runs"]``). Every loop of a test models
the same work (the first also pays the first touches), so the per-iteration figures do not
depend on the cap; it sets how many loops the host runs. A default run (all six tests, 512
slots, 50 loops) took about 5 s of host time on this 2-CPU development machine (the ``unmap``
test's 32768 ``madvise_dontneed`` calls per loop are most of it); raise ``max_iterations`` to
let a run reach ``-l``.

- ``map``: the host ``madvise_dontneed``s the second half while the guest writes the first,
  then the reverse; each step takes the longer of the two (they overlap in the selftest);
- ``unmap`` / ``unmap chunked``: the guest writes one page of one half while the host frees the
  other half in 4 KiB (2 MiB) chunks, each chunk one ``madvise_dontneed`` call over its host
  range (the area is one host mapping; a chunk may span several memslots);
- ``move active area``: the last slot is moved past the area and back (``move_memslot``: the
  fast zap of everything with the slot-zap-all quirk, only the slot's leaves with ``-q``);
  after each move the guest writes the 192 KiB straddling the slot's start: while it is away
  the upper half has no memslot and the writes are emulated MMIO (``Ret.EMULATE``); the loop
  time is the host's moves (the guest does not synchronise with it);
- ``move inactive area``: as above with the 192 KiB just below the slot (never MMIO);
- ``RW``: the guest writes every page, then reads and writes every page again while the host
  writes and checks the same pages; the guest's time is its faults (first touch) plus
  ``guest_access_ns`` per access on the virtual clock.

Guest accesses run through ``VM.access_batch`` (a hit costs nothing, a miss takes the fault
path). Modeled time: a step's host time is what the VM's ledger grew by for the host's calls,
the guest's is ``access_batch``'s ``modeled_ns``. After each test a line in parentheses says
what its per-iteration figure includes and leaves out. Not modeled: the syscalls themselves
(madvise/memslot ioctls cost only the zaps they cause, so slot setup is 0 modeled seconds and,
as in the selftest for a zero time, the "Best slot setup time" line is not printed); an
MMU-notifier invalidation of memory with nothing mapped costs 0 ns (KVM still takes mmu_lock
and walks its roots; the CostModel has no sourced figure for that), so ``unmap`` and ``unmap
chunked``, where nearly every call finds nothing mapped, model only the guest's 2 faults and
2 zaps per loop, far below the selftest's time per loop; host memory writes, mmu_lock
contention between host and guest, SRCU synchronisation of memslot updates, and the host's
initial memset of the slots (the guest's first touch pays allocation instead).

Checks (``detail["checks"]``, ``tdpmmu.workloads.base.Checks`` records; a failed one makes
``result.ok`` False and the run still returns every figure): after each map/unmap run a page
freed by MADV_DONTNEED is allocated again on its next touch; ``move active area``'s writes to
the moved-away half are emulated and the moved-back slot is mapped again; with ``-q``
``move inactive area``'s area stays mapped across a move; with ``-d`` the map/unmap mappings
before and after each unmap (counted over the loops); ``VM.check()`` after each run.
"""

import argparse
import time
import weakref
from typing import Any, Unpack

import numpy as np

from tdpmmu import coerce, spte
from tdpmmu._core import ConfigError, InvariantError
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

__all__ = ["DEFAULT_MAX_ITERATIONS", "DEFAULT_SLOT_CAP", "KVM_NR_MEMSLOTS", "TESTS", "memslot_perf"]

#: The selftest's tests, by index.
TESTS = ("map", "unmap", "unmap chunked", "move active area", "move inactive area", "RW")
#: x86 ``KVM_CAP_NR_MEMSLOTS`` (KVM_USER_MEM_SLOTS).
KVM_NR_MEMSLOTS = 32764
#: The simulator's slot cap when none is given (lowered per test to what its area allows).
DEFAULT_SLOT_CAP = 512
#: The simulator's cap on loops per run when none is given.
DEFAULT_MAX_ITERATIONS = 50
_MIB = 256  # pages
_BASE = (256 << 20) // 4096
_AUX = 16  # 64 KiB
_MOVE = 48  # 192 KiB
_CHUNK = 512  # 2 MiB


def _f(s: float) -> str:
    return f"{s:.9f}s"


#: The guest's own access time per VM (virtual clock), which no VM ledger holds; the result
#: adds it to its breakdown as ``guest_ns``.
_GUEST_NS: "weakref.WeakKeyDictionary[VM, float]" = weakref.WeakKeyDictionary()


def _guest(vm: VM, gfns: "np.ndarray[Any, Any]", access_ns: float, write: bool = True) -> float:
    """The guest's accesses (one vCPU): modeled ns of its faults plus its own accesses."""
    r = vm.access_batch(gfns.astype(np.uint64), write=write, private=False)
    own = len(gfns) * access_ns
    _GUEST_NS[vm] = _GUEST_NS.get(vm, 0.0) + own
    return float(r["modeled_ns"]) + own


def _ns(vm: VM) -> float:
    return float(vm.stats_dict()["modeled_ns"])


def _present(vm: VM, g: int) -> bool:
    return bool(spte.decode(vm.spte(g))["present"])


def _mapped_w(vm: VM, g: int) -> bool:
    f = spte.decode(vm.spte(g))
    return bool(f["present"] and f["writable"])


class _Run:
    """One run of one test: a fresh VM with the area over the slots."""

    def __init__(self, sim: SimArgs, mempages: int, cap: int, zap_all: bool) -> None:
        self.nslots = cap - 1
        self.npages = mempages
        self.pps = mempages // self.nslots
        spec = VmSpec.create(**spec_args(sim), memory=2 << 20, vcpus=1, slot_zap_all=zap_all)
        self.spec = spec
        # Every run's VM, not only the first (which the Clock hands over), is audited by
        # compare --workload.
        self.vm: VM = track_vm(spec.build())
        self.slots: list[tuple[int, int, int]] = []
        if self.pps == 0:
            return
        w0 = time.perf_counter()
        ns0 = self.ns()
        g = _BASE
        for i in range(self.nslots):
            n = self.pps + (mempages % self.nslots if i == self.nslots - 1 else 0)
            self.slots.append((self.vm.add_memslot(g, n), g, n))
            g += n
        self.setup_s = (self.ns() - ns0) / 1e9
        self.setup_wall = time.perf_counter() - w0
        launch(self.vm)

    def ns(self) -> float:
        return float(self.vm.stats_dict()["modeled_ns"])

    def unmap(self, first: int, count: int) -> None:
        """test_memslot_do_unmap: one MADV_DONTNEED of the chunk's host range (the area is one
        host mapping, so one call covers every slot piece the chunk spans)."""
        self.vm.madvise_dontneed(_BASE + _AUX + first, count)


def _last_slot_pages(pages: int, cap: int) -> int:
    """Pages of the last slot when ``pages`` are split over ``cap - 1`` slots."""
    n = cap - 1
    return pages // n + pages % n


def _default_cap(test: int, pages: int, cap: int) -> int:
    """The default slot cap lowered to what the test's area allows: one page per slot at
    least, and for ``move active area`` a last slot of half the move area at least."""
    c = max(2, min(cap, pages + 1))
    if test == 3:
        while c > 2 and _last_slot_pages(pages, c) < _MOVE // 2:
            c -= 1
    return c


def _note(test: int, invalidations: int) -> str:
    """The line after a test saying what its modeled figures include and leave out."""
    if test == 0:
        return (
            "(modeled per iteration: the guest's faults and host page allocation, the zaps and "
            "TLB flushes of the 2 MADV_DONTNEED calls; not modeled: the syscalls themselves and "
            "mmu_lock waits between host and guest)"
        )
    if test in (1, 2):
        return (
            "(modeled per iteration: the guest's 2 faults and the zaps and TLB flushes of the 2 "
            f"pages it mapped; 0 ns for the other {invalidations - 2} of the {invalidations} "
            "MADV_DONTNEED calls, which find nothing mapped (KVM would still take mmu_lock and "
            "walk its roots for each), and 0 ns for the syscalls: not comparable with the "
            "selftest's per-iteration time)"
        )
    if test in (3, 4):
        return (
            "(modeled per iteration: the zaps and TLB flushes of the 2 slot moves; not modeled: "
            "the memslot ioctls and their SRCU synchronisation; the guest's writes, MMIO exits "
            "included, are not in the loop time)"
        )
    return (
        "(modeled per iteration: the guest's faults and accesses; not modeled: the host's "
        "writes and checks of the pages)"
    )


def memslot_perf(
    verbose: bool = False,
    verify: bool = False,
    disable_slot_zap_all: bool = False,
    slots: int | None = None,
    first_test: int = 0,
    last_test: int = 5,
    seconds: float = 5,
    runs: int = 1,
    *,
    scale: int = 1,
    max_iterations: int = DEFAULT_MAX_ITERATIONS,
    **sim: Unpack[SimArgs],
) -> WorkloadResult:
    """KVM's ``memslot_perf_test`` (module docstring: geometry, tests, what is modeled).

    Args:
        verbose: ``-v``: add the selftest's verbose lines (slot counts).
        verify: ``-d``: extra checks of map/unmap (mappings before and after each unmap).
        disable_slot_zap_all: ``-q``: KVM_X86_QUIRK_SLOT_ZAP_ALL off (default VMs; other VM
            types never apply the quirk, so it is off for them either way).
        slots: ``-s``: memslot count cap, > 1, or -1 for KVM's 32764; None: 512, lowered per
            test to what its area allows (a line says so).
        first_test: ``-f``: first test index, 0..5.
        last_test: ``-e``: last test index, first_test..5.
        seconds: ``-l``: modeled seconds per run, >= 0.
        runs: ``-r``: runs per test, >= 1.
        scale: simulator only: divide the 512/128/32 MiB areas by 1, 2, 4, 8, 16 or 32.
        max_iterations: simulator only: loops per run at most, >= 1 (default 50; a run it
            ends says so in a line after its ``Done ...`` line).
        **sim: the simulator's arguments (``SimArgs``).

    Returns:
        WorkloadResult: the selftest's lines (times modeled), a line after each test saying
        what its figures include and leave out, and a line after each run the iteration cap
        ended; metrics per test (``<test>_best_s_per_iteration``, ``<test>_iterations``) and
        ``best_slot_setup_time_s``; ``detail``: ``checks`` (``Checks`` records: a failed one
        makes ``result.ok`` False, it does not raise), ``runs``, ``capped_runs``.

    Raises:
        ConfigError: a bad value, naming it; ``vm_type`` "tdx" (the selftest runs a normal VM;
            a TD's memory is guest_memfd memory, which KVM neither moves nor MADV_DONTNEEDs).
        TypeError: a value of the wrong type.
    """
    run_start = time.perf_counter()
    options = sim_options(sim)
    verbose = coerce.flag(verbose, "verbose")
    verify = coerce.flag(verify, "verify")
    zap_all = not coerce.flag(disable_slot_zap_all, "disable_slot_zap_all")
    if slots is None:
        cap = DEFAULT_SLOT_CAP
    elif slots == -1:
        cap = KVM_NR_MEMSLOTS
    elif isinstance(slots, int) and not isinstance(slots, bool) and slots > 1:
        cap = min(slots, KVM_NR_MEMSLOTS)
    else:
        raise ConfigError(f"slots: the slot count cap must be > 1 or -1, got {slots!r}")
    for name, v, lo, hi in (("first_test", first_test, 0, 5), ("last_test", last_test, 0, 5)):
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise ConfigError(f"{name}: must be in {lo}..{hi}, got {v!r}")
    if first_test > last_test:
        raise ConfigError("first_test: must not be greater than last_test")
    secs = float(seconds)
    if not 0 <= secs < float("inf"):
        raise ConfigError(f"seconds: must be >= 0 and finite, got {seconds!r}")
    nruns = coerce.count(runs, "runs")
    if scale not in (1, 2, 4, 8, 16, 32):
        raise ConfigError(f"scale: must be 1, 2, 4, 8, 16 or 32, got {scale!r}")
    cap_loops = coerce.count(max_iterations, "max_iterations")
    if sim.get("vm_type", "default") == "tdx":
        raise ConfigError(
            "vm_type: memslot_perf_test runs a normal VM; a TD's memory is guest_memfd memory, "
            "which KVM neither moves (KVM_MR_MOVE) nor frees with MADV_DONTNEED"
        )
    full = 512 * _MIB // scale + _AUX
    map_pages = 32 * _MIB // scale
    unmap_pages = 128 * _MIB // scale
    sizes = (map_pages + _AUX, unmap_pages + _AUX, unmap_pages + _AUX, full, full, full)

    lines: list[str] = []
    metrics: dict[str, float] = {}
    checks = Checks()
    records: list[dict[str, Any]] = []
    best_slot: float | None = None
    last: _Run | None = None
    used: list[VM] = []
    clock: Clock | None = None
    total_runs = (last_test - first_test + 1) * nruns

    for t in range(first_test, last_test + 1):
        name = TESTS[t]
        key = name.replace(" ", "_").lower()
        if t > first_test:
            lines.append("")
        lines.append(f"Testing {name} performance with {nruns} runs, {secs:g} seconds each")
        tcap = cap if slots is not None else _default_cap(t, sizes[t], cap)
        best: tuple[float, int] | None = None
        invalidations = 0
        for run_i in range(nruns):
            run = _Run(sim, sizes[t], tcap, zap_all)
            last = run
            used.append(run.vm)
            vm = run.vm
            if clock is None:
                clock = Clock(vm, sim.get("progress"), total_runs)
                progress = sim.get("progress")
                if progress is not None:
                    progress(0, total_runs, f"{name} run 0")
            access_ns = vm.costs.guest_access_ns if options.clock == "virtual" else 0.0
            if verbose:
                lines.append(f"Allowed number of memory slots: {tcap}")
            if tcap != cap and run_i == 0:
                lines.append(
                    f"(default slot cap {cap} lowered to {tcap} for this test's "
                    f"{sizes[t]}-page area; -s sets the cap)"
                )
            if run.pps == 0:
                lines.append(
                    "Memslot count too high for this test, decrease the cap "
                    f"(max is {sizes[t] + 1})"
                )
                clock.record(f"{name} (not run)", 0.0, 0.0)
                break
            if verbose:
                lines.append(
                    f"Adding slots 1..{run.nslots}, each slot with {run.pps} pages + "
                    f"{run.npages % run.nslots} extra pages last"
                )
            tb = _BASE + _AUX
            _, src, last_n = run.slots[-1]
            if t == 3 and last_n < _MOVE // 2:
                lines.append("Memslot count may be too high for this test, try adjusting the cap")
                clock.record(f"{name} (not run)", 0.0, 0.0)
                break
            guest_ns = 0.0
            # -d: how often each per-iteration check held, of how many.
            held: dict[str, list[int]] = {}

            def verified(label: str, ok: bool, _held: dict[str, list[int]] = held) -> None:
                h = _held.setdefault(label, [0, 0])
                h[0] += bool(ok)
                h[1] += 1

            # The guest waits on the sync page first.
            _guest(vm, np.array([_BASE]), access_ns, write=False)
            loops, total_ns, w0 = 0, 0.0, time.perf_counter()
            emulate0 = vm.stats["pf_emulate"]
            madvise = vm.madvise_dontneed
            while total_ns / 1e9 < secs and loops < cap_loops:
                if t == 0:
                    h = map_pages // 2
                    first, second = np.arange(tb, tb + h), np.arange(tb + h, tb + 2 * h)
                    g1 = _guest(vm, first, access_ns)
                    n0 = _ns(vm)
                    run.unmap(h, h)
                    h1 = _ns(vm) - n0
                    if verify:
                        verified(
                            "map: the guest's half is mapped writable before the host frees it",
                            _mapped_w(vm, tb) and _mapped_w(vm, tb + h - 1),
                        )
                    g2 = _guest(vm, second, access_ns)
                    n0 = _ns(vm)
                    run.unmap(0, h)
                    h2 = _ns(vm) - n0
                    if verify:
                        verified(
                            "map: MADV_DONTNEED leaves the freed half unmapped",
                            not _present(vm, tb) and not _present(vm, tb + h - 1),
                        )
                    total_ns += max(g1, h1) + max(g2, h2)
                    invalidations = 2
                elif t in (1, 2):
                    chunk = 1 if t == 1 else _CHUNK
                    h = unmap_pages // 2
                    g1 = _guest(vm, np.array([tb]), access_ns)
                    if verify:
                        verified(
                            f"{name}: the page the guest touched is mapped writable",
                            _mapped_w(vm, tb),
                        )
                    n0 = _ns(vm)
                    for g in range(tb, tb + h, chunk):
                        madvise(g, chunk)
                    h1 = _ns(vm) - n0
                    if verify:
                        verified(f"{name}: the freed half is unmapped", not _present(vm, tb))
                    g2 = _guest(vm, np.array([tb + h]), access_ns)
                    n0 = _ns(vm)
                    for g in range(tb + h, tb + 2 * h, chunk):
                        madvise(g, chunk)
                    h2 = _ns(vm) - n0
                    total_ns += max(g1, h1) + max(g2, h2)
                    invalidations = 2 * (h // chunk)
                elif t in (3, 4):
                    base = src - (_MOVE // 2 if t == 3 else _MOVE)
                    area = np.arange(base, base + _MOVE)
                    sid = run.slots[-1][0]
                    dest = _BASE + full
                    n0 = _ns(vm)
                    vm.move_memslot(sid, dest)
                    h_ns = _ns(vm) - n0
                    gm = _guest(vm, area, access_ns)
                    n0 = _ns(vm)
                    vm.move_memslot(sid, src)
                    h_ns += _ns(vm) - n0
                    gb = _guest(vm, area, access_ns)
                    total_ns += h_ns
                    guest_ns += gm + gb
                else:
                    area = np.arange(tb, tb + full - _AUX)
                    g1 = _guest(vm, area, access_ns)
                    g2 = _guest(vm, area, access_ns, write=False) + _guest(vm, area, access_ns)
                    total_ns += g1 + g2
                loops += 1
            wall = time.perf_counter() - w0
            for label, (ok_n, all_n) in held.items():
                checks.add(label, ok_n == all_n, f"run {run_i}: held in {ok_n} of {all_n} loops")
            # Checks after the run, as the selftest's asserts would catch a broken rule.
            if t in (0, 1, 2) and loops:
                g0 = tb
                vm.madvise_dontneed(g0, 1)
                a0 = vm.stats["host_pages_allocated"]
                _guest(vm, np.array([g0]), access_ns)
                got = vm.stats["host_pages_allocated"] - a0
                checks.add(
                    f"{name}: a page freed by MADV_DONTNEED is allocated again on its next touch",
                    got == 1,
                    f"run {run_i}: {got} host pages allocated by the touch",
                )
            if t == 3 and loops:
                emulated = vm.stats["pf_emulate"] - emulate0
                checks.add(
                    "move active area: the guest's writes to the moved-away half are emulated "
                    "(MMIO) each loop",
                    emulated >= loops * _MOVE // 2,
                    f"run {run_i}: {emulated} emulated writes in {loops} loops "
                    f"(at least {loops * _MOVE // 2} expected)",
                )
                back = [int(g) for g in (src, src + _MOVE // 2 - 1) if not _mapped_w(vm, int(g))]
                checks.add(
                    "move active area: the moved-back slot is mapped again after the guest's "
                    "writes",
                    not back,
                    f"run {run_i}: unmapped gfns {[hex(g) for g in back]}" if back else "",
                )
            if t == 4 and loops and not zap_all:
                f0 = vm.stats["pf_taken"]
                vm.move_memslot(run.slots[-1][0], _BASE + full)
                vm.move_memslot(run.slots[-1][0], src)
                _guest(vm, np.arange(src - _MOVE, src), access_ns)
                faults = vm.stats["pf_taken"] - f0
                checks.add(
                    "move inactive area: with the quirk off, moving the slot leaves the area "
                    "below it mapped",
                    faults == 0,
                    f"run {run_i}: {faults} faults re-touching the area after a move",
                )
            try:
                vm.check()
                checks.add(f"{name}: VM.check() holds after the run", True, f"run {run_i}")
            except InvariantError as e:
                checks.add(f"{name}: VM.check() holds after the run", False, f"run {run_i}: {e}")
            modeled = total_ns / 1e9
            clock.record(f"{name} run {run_i}", modeled, wall)
            lines.append(
                f"Test took {_f(run.setup_s)} for slot setup + {_f(modeled)} all iterations"
            )
            capped = loops >= cap_loops and modeled < secs
            rec = {
                "test": name,
                "run": run_i,
                "iterations": loops,
                "modeled_s": modeled,
                "slot_setup_s": run.setup_s,
                "wall_s": wall,
                "wall_slot_setup_s": run.setup_wall,
                "capped": capped,
                "slots": run.nslots,
                "slot_cap": tcap,
            }
            if t in (3, 4):
                rec["guest_modeled_s"] = guest_ns / 1e9
            records.append(rec)
            if not loops:
                lines.append("No full loops done - too short test time or system too loaded?")
                continue
            avg = modeled / loops
            lines.append(f"Done {loops} iterations, avg {_f(avg)} each")
            if capped:
                lines.append(
                    f"(stopped by --max-iterations {cap_loops} before -l {secs:g} modeled seconds)"
                )
            if t >= 3 and run.setup_s > 0 and (best_slot is None or run.setup_s < best_slot):
                best_slot = run.setup_s
            if avg > 0 and (best is None or avg < best[0]):
                best = (avg, loops)
        if best is not None:
            lines.append(
                f"Best runtime result was {_f(best[0])} per iteration (with {best[1]} iterations)"
            )
            metrics[f"{key}_best_s_per_iteration"] = best[0]
            metrics[f"{key}_iterations"] = best[1]
        if any(r["test"] == name and r["iterations"] for r in records):
            lines.append(_note(t, invalidations))
    if best_slot is not None:
        lines.append(f"Best slot setup time for the whole test area was {_f(best_slot)}")
    metrics["best_slot_setup_time_s"] = best_slot or 0.0
    assert last is not None and clock is not None
    params = {
        "verbose": verbose,
        "verify": verify,
        "disable_slot_zap_all": not zap_all,
        "slots": slots,
        "slot_cap": cap,
        "first_test": first_test,
        "last_test": last_test,
        "seconds": secs,
        "runs": nruns,
        "scale": scale,
        "max_iterations": cap_loops,
    }
    detail = {
        "checks": checks.to_list(),
        "runs": records,
        "capped_runs": sum(1 for r in records if r["capped"]),
        "slot_zap_all": zap_all and sim.get("vm_type", "default") == "default",
    }
    own_ns = sum(_GUEST_NS.get(v, 0.0) for v in used)
    return finish(
        "memslot_perf",
        last.vm,
        last.spec,
        vms=used,
        breakdown_extra=[{"guest_ns": own_ns}] if own_ns else None,
        params=params,
        options=options,
        lines=lines,
        metrics=metrics,
        clock=clock,
        run_start=run_start,
        detail=detail,
    )


def _slots_arg(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v <= 1 and v != -1:
        raise argparse.ArgumentTypeError("Slot count cap has to be > 1 or -1 for no cap")
    return v


def _seconds_arg(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError("Test length in seconds has to be non-negative")
    return v


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    from tdpmmu.workloads.demand_paging import count_arg

    parser.add_argument("-v", "--verbose", action="store_true", help="verbose lines")
    parser.add_argument("-d", "--verify", action="store_true", help="extra map/unmap checks")
    parser.add_argument(
        "-q",
        "--disable-slot-zap-all",
        action="store_true",
        help="KVM_X86_QUIRK_SLOT_ZAP_ALL off (default VMs)",
    )
    parser.add_argument(
        "-s",
        "--slots",
        type=_slots_arg,
        metavar="N",
        help="memslot cap (-1: 32764; default 512, lowered to what a test's area allows)",
    )
    parser.add_argument(
        "-f", "--first-test", type=count_arg(0, 5), default=0, metavar="N", help="first test (0)"
    )
    parser.add_argument(
        "-e", "--last-test", type=count_arg(0, 5), default=5, metavar="N", help="last test (5)"
    )
    parser.add_argument(
        "-l",
        "--seconds",
        type=_seconds_arg,
        default=5.0,
        metavar="SEC",
        help="modeled seconds per run (5)",
    )
    parser.add_argument(
        "-r", "--runs", type=count_arg(1), default=1, metavar="N", help="runs per test (1)"
    )
    parser.add_argument(
        "--scale",
        type=int,
        choices=(1, 2, 4, 8, 16, 32),
        default=1,
        help="simulator only: divide the 512/128/32 MiB areas by this (1)",
    )
    parser.add_argument(
        "--max-iterations",
        type=count_arg(1),
        default=DEFAULT_MAX_ITERATIONS,
        metavar="N",
        help=f"simulator only: loops per run at most ({DEFAULT_MAX_ITERATIONS}; a run it ends "
        "says so)",
    )


def _from_args(ns: argparse.Namespace) -> dict[str, Any]:
    return {
        "verbose": ns.verbose,
        "verify": ns.verify,
        "disable_slot_zap_all": ns.disable_slot_zap_all,
        "slots": ns.slots,
        "first_test": ns.first_test,
        "last_test": ns.last_test,
        "seconds": ns.seconds,
        "runs": ns.runs,
        "scale": ns.scale,
        "max_iterations": ns.max_iterations,
    }


register(
    Workload(
        name="memslot_perf",
        command="memslot-perf",
        selftest="memslot_perf_test",
        summary="memslot map/unmap/move/RW loops over many slots while one vCPU touches memory.",
        run=memslot_perf,
        vm_types=("default", "sw_protected", "snp"),
        add_arguments=_add_arguments,
        from_args=_from_args,
    )
)
