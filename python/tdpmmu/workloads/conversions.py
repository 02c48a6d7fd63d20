"""KVM's ``private_mem_conversions_test``: on a running VM (``private_mem_conversions``) and as
the selftest itself, a registered workload (``private_mem_conversions_test``)."""

import argparse
import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Unpack

from tdpmmu import coerce
from tdpmmu._core import ConfigError
from tdpmmu.results import Envelope, envelope_row, rows_to_frame, sum_breakdowns
from tdpmmu.vm import VM
from tdpmmu.vmspec import vm_config
from tdpmmu.workloads.base import SimArgs, Workload, WorkloadResult, register
from tdpmmu.workloads.common import PAGE_SIZE

if TYPE_CHECKING:
    import pandas

__all__ = [
    "TEST_RANGES",
    "ConversionsResult",
    "private_mem_conversions",
    "private_mem_conversions_test",
]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ConversionsResult:
    """One ``private_mem_conversions`` run on a VM (counters are in the VM's ``stats``)."""

    #: The VM's configuration (its full ``VmSpec`` when ``VmSpec.build`` made it).
    vm: Mapping[str, Any]
    chunks: int
    chunk_pages: int
    base_gfn: int
    region_pages: int
    touch_first: bool
    #: Conversion requests the guest made (two per chunk: to shared, back to private).
    requests: int
    #: Faults the guest's writes took (RETRYs included); writes the mapping allowed took none.
    faults: int
    #: SNP: 2M RMP entries split so that a chunk's pages could be rescinded at 4K.
    rmp_splits: int
    #: Outcomes that left a page unmapped (``Ret`` names) and PVALIDATE failures
    #: (``PVALIDATE_<status>``), with counts. Empty when every write found its page mapped.
    unexpected: Mapping[str, int]
    #: Modeled time of the touches' faults, as the engine charged them.
    fault_modeled_ns: float
    #: All modeled time of the workload (faults, conversion requests, zaps, RMP, SEAMCALLs).
    modeled_ns: float
    #: ``modeled_ns`` by CostModel field.
    cost_breakdown: Mapping[str, float]
    #: Host wall-clock time of the whole workload.
    wall_s: float

    def envelope(self) -> Envelope:
        """The run as a ``tdpmmu.results.Envelope`` (workload ``"private_mem_conversions"``).

        Returns:
            Envelope: the VM's configuration, the workload parameters, both clocks, the cost
            breakdown and the counts of this result. Never raises.
        """
        seed = self.vm.get("seed", 0)
        return Envelope(
            workload="private_mem_conversions",
            config={
                "vm": dict(self.vm),
                "workload": {
                    "chunks": self.chunks,
                    "chunk_pages": self.chunk_pages,
                    "base_gfn": self.base_gfn,
                    "region_pages": self.region_pages,
                    "touch_first": self.touch_first,
                },
            },
            seed=int(seed),
            modeled_ns=self.modeled_ns,
            cost_breakdown=dict(self.cost_breakdown),
            wall_s=self.wall_s,
            result={
                "requests": self.requests,
                "faults": self.faults,
                "rmp_splits": self.rmp_splits,
                "unexpected": dict(self.unexpected),
                "fault_modeled_ns": self.fault_modeled_ns,
            },
        )

    @classmethod
    def from_envelope(cls, env: Envelope) -> "ConversionsResult":
        """The result an envelope describes (``from_json``'s second half).

        Args:
            env: an envelope of this workload, e.g. ``Envelope.from_json(text)``.

        Returns:
            ConversionsResult: the result, equal to the one the envelope was made from.

        Raises:
            ConfigError: ``env`` holds another workload's result (naming ``envelope``).
            KeyError: a field the result needs is missing from ``env``.
        """
        if env.workload != "private_mem_conversions":
            raise ConfigError(f"envelope: a {env.workload} result, not private_mem_conversions")
        wl, r = env.config["workload"], env.result
        return cls(
            vm=dict(env.config["vm"]),
            chunks=int(wl["chunks"]),
            chunk_pages=int(wl["chunk_pages"]),
            base_gfn=int(wl["base_gfn"]),
            region_pages=int(wl["region_pages"]),
            touch_first=bool(wl["touch_first"]),
            requests=int(r["requests"]),
            faults=int(r["faults"]),
            rmp_splits=int(r["rmp_splits"]),
            unexpected={str(k): int(v) for k, v in r["unexpected"].items()},
            fault_modeled_ns=float(r["fault_modeled_ns"]),
            modeled_ns=env.modeled_ns,
            cost_breakdown=dict(env.cost_breakdown),
            wall_s=env.wall_s,
        )

    def to_dict(self) -> dict[str, Any]:
        """The envelope as plain JSON types (non-finite rates as None).

        Returns:
            dict[str, Any]: ``envelope().to_dict()``. Never raises.
        """
        return self.envelope().to_dict()

    def to_pandas(self) -> "pandas.DataFrame":
        """The run as a one-row ``pandas.DataFrame`` (``tdpmmu.results.envelope_row``: the
        configuration, every top-level figure, ``modeled_ns`` and ``wall_s``).

        Raises:
            ImportError: pandas is not installed (``pip install 'tdpmmu[pandas]'``).
        """
        return rows_to_frame([envelope_row(self.envelope())])

    def to_json(self, **kwargs: Any) -> str:
        """The result as one JSON document (its envelope; non-finite rates as null).

        Args:
            **kwargs: passed to ``json.dumps`` (e.g. ``indent=2``).

        Returns:
            str: the JSON text; ``from_json`` reads it back. Never raises for a result.
        """
        return self.envelope().to_json(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> "ConversionsResult":
        """The result a ``to_json`` text describes.

        Args:
            text: JSON as ``to_json`` wrote it.

        Returns:
            ConversionsResult: the result.

        Raises:
            ConfigError: not a tdpmmu envelope, another schema, or another workload's result.
            json.JSONDecodeError: ``text`` is not JSON.
        """
        return cls.from_envelope(Envelope.from_json(text))


#: Fault-path outcomes that leave a touched page unmapped, by the counter that records them.
_UNMAPPED = {
    "pf_memory_fault": "MEMORY_FAULT",
    "pf_emulate": "EMULATE",
    "pf_write_protected": "WRITE_PROTECTED",
}

_PAGES_2M = 512


def private_mem_conversions(
    vm: VM,
    chunks: int,
    chunk_pages: int,
    *,
    base_gfn: int = 0,
    region_pages: int | None = None,
    touch_first: bool = False,
) -> ConversionsResult:
    """Private<->shared conversions shaped like KVM's ``private_mem_conversions_test``.

    ``chunks`` chunks of ``chunk_pages`` guest pages are spread evenly over
    ``[base_gfn, base_gfn + region_pages)`` (default: all of the VM's memory). Each chunk goes,
    in order, through:

    1. (``touch_first`` only) the guest writes the chunk as private memory;
    2. the guest asks for it to become shared; on SNP it first rescinds validation of the
       pages (PVALIDATE with validate=0), as a guest must before handing pages back;
    3. userspace sets the memory attributes to shared (``set_memory_attributes``, which also
       charges the request's exit, ``psc_exit_ns + gmem_convert_ns``) and punches the
       guest_memfd hole (``punch_hole``), as the selftest with fallocate and QEMU do;
    4. the guest writes every page as shared;
    5. the guest asks for it to become private again; userspace sets the attributes private;
    6. the guest writes every page as private (TDX accepts, SNP validates).

    The guest's writes are vCPU 0 running through the chunk as memstress does
    (``VM.run_memstress``): a write that the current mapping allows takes no exit, so a page
    already covered by a 2M leaf costs nothing — every other write takes the fault path.

    SNP with 2M RMP entries: a 4K rescind inside a 2M entry would fail with
    FAIL_SIZEMISMATCH; the host splits the entry first (``VM.rmp_fault``: PSMASH and a zap of
    the 2M range, what KVM does on an RMP size-mismatch fault), counted in ``rmp_splits``.

    The VM must be running (``vmspec.launch``: a TD finalized). The chunks must start out
    private (a confidential VM's memory starts all-private) and, unless ``touch_first``,
    already written by the guest (on SNP they must be validated). Fault-path outcomes that
    leave a page unmapped (MEMORY_FAULT, EMULATE, WRITE_PROTECTED) and PVALIDATE failures are
    counted in ``unexpected``.

    Args:
        vm: a running confidential ``tdpmmu.VM`` (not a default VM; a TD must be finalized).
        chunks: number of chunks, >= 1.
        chunk_pages: 4 KiB pages per chunk, >= 1; ``chunks x chunk_pages`` must fit in the
            region without overlap.
        base_gfn: first gfn of the region, >= 0 (default 0).
        region_pages: the region's size in 4 KiB pages, >= 1 (default: from ``base_gfn`` to
            the end of the VM's memory).
        touch_first: the guest writes each chunk as private memory before converting it
            (default False: the chunks must already be written, and on SNP validated).

    Returns:
        ConversionsResult: the requests made (two per chunk), faults taken, RMP splits, the
        unexpected outcomes, and the modeled and host time of the workload.

    Raises:
        ConfigError: naming ``vm`` (a default VM, or a TD not finalized), ``chunks``,
            ``chunk_pages``, ``base_gfn`` or ``region_pages``, or the chunks do not fit in the
            region; an engine operation's own ``ConfigError`` (e.g. a chunk outside every
            memslot).
        TypeError: a count that is not an int, or ``touch_first`` not a bool.
        VmBugged: a conversion, fault or PVALIDATE hit a KVM_BUG_ON.
        OutOfMemory: page-table memory ran out.
    """
    if vm.vm_type == "default":
        raise ConfigError("vm: a default VM has no private memory to convert")
    if vm.vm_type == "tdx" and not vm.finalized:
        raise ConfigError("vm: the TD is not finalized; launch it first (tdpmmu.vmspec.launch)")
    coerce.count(chunks, "chunks")
    coerce.count(chunk_pages, "chunk_pages")
    coerce.count(base_gfn, "base_gfn", 0)
    if region_pages is None:
        region_pages = vm.memory // PAGE_SIZE - base_gfn
    coerce.count(region_pages, "region_pages")
    coerce.flag(touch_first, "touch_first")
    stride = region_pages // chunks
    if stride < chunk_pages:
        raise ConfigError(
            f"chunks x chunk_pages = {chunks} x {chunk_pages} pages does not fit in the "
            f"{region_pages}-page region without overlap"
        )
    unexpected: dict[str, int] = {}
    faults = 0
    fault_ns = 0.0
    rmp_splits = 0
    snp = vm.vm_type == "snp"

    def count(key: str, n: int) -> None:
        if n:
            unexpected[key] = unexpected.get(key, 0) + n

    def touch(gfn: int, private: bool) -> None:
        nonlocal faults, fault_ns
        before = vm.stats_dict()
        (rec,) = vm.run_memstress(1, chunk_pages, gfn, False, False, 100, 0, private)
        after = vm.stats_dict()
        faults += int(rec["faults"])
        fault_ns += float(rec["modeled_ns"])
        for counter, name in _UNMAPPED.items():
            count(name, int(after[counter] - before[counter]))

    def rescind(gfn: int) -> None:
        nonlocal rmp_splits
        end = gfn + chunk_pages
        while gfn < end:
            stop = min(end, (gfn // _PAGES_2M + 1) * _PAGES_2M)
            if vm.rmp_entry(gfn)["size"] == "2M":
                vm.rmp_fault(gfn)
                rmp_splits += 1
            for status, n in vm.pvalidate(gfn, stop - gfn, validate=False).items():
                if status != "SUCCESS":
                    count(f"PVALIDATE_{status}", n)
            gfn = stop

    before_ns = float(vm.stats_dict()["modeled_ns"])
    before_breakdown = dict(vm.cost_breakdown())
    start = time.perf_counter()
    for i in range(chunks):
        gfn = base_gfn + i * stride
        if touch_first:
            touch(gfn, True)
        if snp:
            rescind(gfn)
        vm.set_memory_attributes(gfn, chunk_pages, private=False)
        vm.punch_hole(gfn, chunk_pages)
        touch(gfn, False)
        vm.set_memory_attributes(gfn, chunk_pages, private=True)
        touch(gfn, True)
    wall_s = time.perf_counter() - start
    after_breakdown = dict(vm.cost_breakdown())
    breakdown = sum_breakdowns([after_breakdown, {k: -v for k, v in before_breakdown.items()}])
    return ConversionsResult(
        vm=vm_config(vm),
        chunks=chunks,
        chunk_pages=chunk_pages,
        base_gfn=base_gfn,
        region_pages=region_pages,
        touch_first=touch_first,
        requests=2 * chunks,
        faults=faults,
        rmp_splits=rmp_splits,
        unexpected=dict(unexpected),
        fault_modeled_ns=fault_ns,
        modeled_ns=float(vm.stats_dict()["modeled_ns"]) - before_ns,
        cost_breakdown=breakdown,
        wall_s=wall_s,
    )


# ----- the selftest as a registered workload ------------------------------------------------------

#: The selftest's test ranges inside each vCPU's chunk, as (offset, size) in bytes.
TEST_RANGES = ((0, 4096), (0, 2 << 20), (4096, 4096), (4096, 2 << 20), (2 << 20, 4096))

#: Each vCPU's data: 2 MiB + 4 KiB (``PER_CPU_DATA_SIZE``).
_PER_CPU_DATA = (2 << 20) + 4096


def _leaf(vm: VM, gfn: int, private: bool) -> tuple[int, int] | None:
    """(level, pfn of ``gfn``'s page) of the leaf mapping ``gfn`` in one root, or None."""
    from tdpmmu import spte

    for level, value in reversed(vm.walk(gfn, private)):
        if not spte.is_shadow_present(value):
            return None
        if spte.is_last(value, level):
            span = 512 ** (level - 1)
            return level, spte.pfn(value) + gfn % span
    return None


#: ``private_mem_conversions_test``'s checks: key -> what ``detail["checks"]`` names it.
_CHECK_NAMES = {
    "private_conversion_zaps_shared": "converting a range private zaps its shared mappings",
    "private_write_maps_private": "writing a range converted private maps private memory",
    "odd_pages_shared": "odd pages converted back shared have no private leaf",
    "even_pages_private": "even pages left private map private memory",
    "shared_write_maps_shared": "writing a range converted shared maps shared memory",
    "punch_frees_private": "converting the chunk shared with a punch leaves no private leaf",
    "punch_chunk_unmaps": "punching the chunk leaves no private leaf in it",
    "punch_range_unmaps": "punching a range leaves no private leaf in it",
    "read_after_punch_refaults": "reading a punched range faults it back in as private memory",
}


def private_mem_conversions_test(
    shared_backing: str = "anonymous",
    vcpus: int = 1,
    memslots: int = 1,
    **sim: Unpack[SimArgs],
) -> WorkloadResult:
    """KVM's ``private_mem_conversions_test``: explicit conversions and hole punches over each
    vCPU's chunk, checked against what KVM must leave mapped.

    Each vCPU owns a chunk of 2 MiB + 4 KiB (rounded up to max(2 MiB, backing page)) from
    4 GiB on, in ``memslots`` guest_memfd memslots (their shared memory from
    ``shared_backing``); the memory starts shared. The guest's accesses run through
    ``VM.access_batch`` on its vCPU (by each page's attribute); conversions are
    ``set_memory_attributes`` (the KVM_HC_MAP_GPA_RANGE exit and KVM_SET_MEMORY_ATTRIBUTES),
    fallocate(PUNCH_HOLE) is ``punch_hole`` (allocation is on fault in the model). Stages, each
    over every test range (``TEST_RANGES``):

    - ``explicit conversion`` without and with fallocate: write the range shared, convert it
      private (check: no shared leaf left over it), write it private (check: every page maps
      private memory), read the rest of the chunk, convert the odd pages back to shared and
      read them (check: odd pages no private leaf, even pages still private), convert all of
      it shared and write it (check: every page maps shared memory), then convert the whole
      chunk shared with a punch (check: no private leaf in the chunk);
    - ``punch hole`` imprecise and precise: with the chunk private, punch it all (check: no
      private leaf), write the range (precise) or the whole chunk, punch the range (check: no
      private leaf in it), read it back (check: every page faults back in as private memory).

    Data patterns are not modeled (the model holds no guest data); the checks are on mappings.
    A stage's modeled time is the slowest vCPU's (each vCPU's steps run one after the other,
    vCPU 0 first; the ledger's delta over them). ``clock`` does not change the run.

    Args:
        shared_backing: the selftest's ``-s``: backing of the shared memory (a
            ``BACKING_SOURCES`` name or a size; default ``"anonymous"``).
        vcpus: vCPUs (``-n``), 1..4096 (default 1).
        memslots: memslots over the guest_memfd (``-m``), >= 1 (default 1); the total size
            must divide evenly into them in whole backing pages.
        **sim: the simulator's arguments (``SimArgs``); ``vm_type`` sw_protected (default for
            this workload when not given; with ``mirror`` too) or tdx.

    Returns:
        WorkloadResult: one line per stage (``<stage>: pass, <modeled>s``, ``FAIL`` when one of
        its checks failed); metrics ``<stage>_s`` (snake_case) and ``wall_`` twins;
        ``detail["checks"]`` (``Checks`` records: each check with how many times it held, or
        the first failure's stage, range and page, and ``VM.check()``; a failed check is
        recorded, not raised: the result's ``ok`` is False).

    Raises:
        ConfigError: a bad value, naming it; ``vm_type`` default (no private memory) or snp
            (the guest would have to PVALIDATE: use ``private_mem_conversions`` on a launched
            SNP VM).
        TypeError: a value of the wrong type.
    """
    import numpy as np

    from tdpmmu._core import InvariantError
    from tdpmmu.vmspec import VmSpec, launch
    from tdpmmu.workloads.base import Checks, Clock, finish, sim_options, spec_args, track_vm
    from tdpmmu.workloads.common import backing_source

    run_start = time.perf_counter()
    sim = dict(sim)  # type: ignore[assignment]
    sim.setdefault("vm_type", "sw_protected")
    options = sim_options(sim)
    if sim["vm_type"] in ("default", "snp"):
        raise ConfigError(
            f"vm_type: private_mem_conversions_test needs private memory the guest can convert "
            f"without more steps; {sim['vm_type']} "
            + (
                "has none (the selftest runs on sw_protected: vm_type='sw_protected', or tdx)"
                if sim["vm_type"] == "default"
                else "needs PVALIDATE around each conversion (private_mem_conversions does it)"
            )
        )
    nvcpus = coerce.count(vcpus, "vcpus")
    nslots = coerce.count(memslots, "memslots")
    backing, _ = backing_source(shared_backing)
    align = max(2 << 20, backing)
    per_cpu = -(-_PER_CPU_DATA // align) * align
    total = per_cpu * nvcpus
    if total % nslots or (total // nslots) % backing:
        raise ConfigError(
            f"memslots: the guest_memfd's {total} bytes do not divide into {nslots} memslots "
            f"of whole backing pages"
        )
    spec = VmSpec.create(**spec_args(sim), memory=align, vcpus=nvcpus, backing=align)
    vm = track_vm(spec.build())
    base = (4 << 30) // PAGE_SIZE
    slot_pages = total // nslots // PAGE_SIZE
    slots = [
        (vm.add_memslot(base + i * slot_pages, slot_pages, backing, gmem=True))
        for i in range(nslots)
    ]
    host = {s[0]: (s[1], s[2], s[5]) for s in vm.memslots() if s[0] in slots}
    launch(vm)
    vm.set_memory_attributes(base, total // PAGE_SIZE, private=False)
    clock = Clock(vm, sim.get("progress"), 4)
    # Per check: [times it held, times it failed, the first failure]; stage_failed: this
    # stage's checks failed somewhere (its line says FAIL instead of pass).
    tally: dict[str, list[Any]] = {}
    stage_failed = [False]
    chunk = _PER_CPU_DATA // PAGE_SIZE

    def shared_pfn(gfn: int) -> int:
        for g0, n, pfn in host.values():
            if g0 <= gfn < g0 + n:
                return pfn + gfn - g0
        raise AssertionError(gfn)

    def kind(gfn: int) -> set[str]:
        out = set()
        for root in (False, True):
            leaf = _leaf(vm, gfn, root)
            if leaf is not None:
                out.add("shared" if leaf[1] == shared_pfn(gfn) else "private")
        return out

    def check(name: str, ctx: str, gfns: range, ok: Callable[[set[str]], bool]) -> None:
        t = tally.setdefault(_CHECK_NAMES[name], [0, 0, ""])
        for g in gfns:
            if not ok(kind(g)):
                t[1] += 1
                t[2] = t[2] or f"{ctx}, gfn {g:#x}: mapped {sorted(kind(g)) or 'nothing'}"
                stage_failed[0] = True
                return
        t[0] += 1

    def access(v: int, gfn: int, n: int, write: bool) -> None:
        vm.access_batch(np.arange(gfn, gfn + n, dtype=np.uint64), write=write, vcpu=v)

    def to_private(gfn: int, n: int) -> None:
        vm.set_memory_attributes(gfn, n, private=True)

    def to_shared(gfn: int, n: int, punch: bool) -> None:
        vm.set_memory_attributes(gfn, n, private=False)
        if punch:
            vm.punch_hole(gfn, n)

    def explicit(v: int, b: int, fallocate: bool) -> None:
        ctx = f"vCPU {v}, fallocate {fallocate}"
        access(v, b, chunk, True)
        access(v, b, chunk, False)
        for off, size in TEST_RANGES:
            g, n = b + off // PAGE_SIZE, size // PAGE_SIZE
            c = f"{ctx}, range ({off:#x}, {size:#x})"
            access(v, g, n, True)
            to_private(g, n)
            check("private_conversion_zaps_shared", c, range(g, g + n), lambda k: "shared" not in k)
            access(v, g, n, True)
            check("private_write_maps_private", c, range(g, g + n), lambda k: k == {"private"})
            access(v, b, g - b, False)
            access(v, g + n, b + chunk - g - n, False)
            for j in range(n):
                if j & 1:
                    to_shared(g + j, 1, fallocate)
                    access(v, g + j, 1, False)
            check("odd_pages_shared", c, range(g + 1, g + n, 2), lambda k: "private" not in k)
            check("even_pages_private", c, range(g, g + n, 2), lambda k: k == {"private"})
            to_shared(g, n, fallocate)
            access(v, g, n, True)
            check("shared_write_maps_shared", c, range(g, g + n), lambda k: k == {"shared"})
            access(v, g, n, True)
            to_shared(b, chunk, True)
            check("punch_frees_private", c, range(b, b + chunk), lambda k: "private" not in k)

    def punch_test(v: int, b: int, precise: bool) -> None:
        ctx = f"vCPU {v}, precise {precise}"
        to_private(b, chunk)
        for off, size in TEST_RANGES:
            g, n = b + off // PAGE_SIZE, size // PAGE_SIZE
            c = f"{ctx}, range ({off:#x}, {size:#x})"
            vm.punch_hole(b, chunk)
            check("punch_chunk_unmaps", c, range(b, b + chunk), lambda k: "private" not in k)
            if precise:
                access(v, g, n, True)
            else:
                access(v, b, chunk, True)
            vm.punch_hole(g, n)
            check("punch_range_unmaps", c, range(g, g + n), lambda k: "private" not in k)
            access(v, g, n, False)
            check("read_after_punch_refaults", c, range(g, g + n), lambda k: k == {"private"})
        to_shared(b, chunk, True)

    stages: list[tuple[str, Callable[[int, int], None]]] = [
        ("explicit conversion", lambda v, b: explicit(v, b, False)),
        ("explicit conversion with fallocate", lambda v, b: explicit(v, b, True)),
        ("punch hole imprecise", lambda v, b: punch_test(v, b, False)),
        ("punch hole precise", lambda v, b: punch_test(v, b, True)),
    ]
    lines: list[str] = []
    metrics: dict[str, float] = {}
    for name, body in stages:
        stage_failed[0] = False
        worst, wall0 = 0.0, time.perf_counter()
        for v in range(nvcpus):
            ns0 = clock.modeled_ns()
            body(v, base + v * per_cpu // PAGE_SIZE)
            worst = max(worst, (clock.modeled_ns() - ns0) / 1e9)
        wall = time.perf_counter() - wall0
        clock.record(name, worst, wall)
        lines.append(f"{name}: {'FAIL' if stage_failed[0] else 'pass'}, {worst:.9f}s")
        key = name.replace(" ", "_")
        metrics[f"{key}_s"], metrics[f"wall_{key}_s"] = worst, wall
    checks = Checks()
    for what, (held, failed, first) in tally.items():
        checks.add(
            what,
            failed == 0,
            f"failed {failed} of {held + failed} times; first: {first}"
            if failed
            else f"held {held} times",
        )
    try:
        vm.check()
        checks.add("VM.check() holds after the run", True)
    except InvariantError as e:
        checks.add("VM.check() holds after the run", False, str(e))
    return finish(
        "private_mem_conversions",
        vm,
        spec,
        params={"shared_backing": shared_backing, "vcpus": nvcpus, "memslots": nslots},
        options=options,
        lines=lines,
        metrics=metrics,
        clock=clock,
        run_start=run_start,
        detail={"checks": checks.to_list(), "test_ranges": [list(r) for r in TEST_RANGES]},
    )


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    from tdpmmu.workloads.demand_paging import backing_arg, count_arg

    parser.add_argument(
        "-s",
        "--shared-backing",
        type=backing_arg,
        default="anonymous",
        metavar="TYPE",
        help="backing of shared memory (default anonymous)",
    )
    parser.add_argument(
        "-n", "--vcpus", type=count_arg(1, 4096), default=1, metavar="N", help="vCPUs (1)"
    )
    parser.add_argument(
        "-m", "--memslots", type=count_arg(1), default=1, metavar="N", help="memslots (1)"
    )


def _from_args(ns: argparse.Namespace) -> dict[str, Any]:
    return {"shared_backing": ns.shared_backing, "vcpus": ns.vcpus, "memslots": ns.memslots}


register(
    Workload(
        name="private_mem_conversions",
        command="private-mem-conversions",
        selftest="private_mem_conversions_test",
        summary="shared<->private conversions and hole punches over test ranges (correctness).",
        run=private_mem_conversions_test,
        vm_types=("sw_protected", "tdx"),
        add_arguments=_add_arguments,
        from_args=_from_args,
    )
)
