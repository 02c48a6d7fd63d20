"""KVM's ``private_mem_conversions_test`` on a running VM (``private_mem_conversions``)."""

import dataclasses
import time
from collections.abc import Mapping
from typing import Any

from tdpmmu import coerce
from tdpmmu._core import ConfigError
from tdpmmu.results import Envelope, sum_breakdowns
from tdpmmu.vm import VM
from tdpmmu.vmspec import vm_config
from tdpmmu.workloads.common import PAGE_SIZE

__all__ = ["ConversionsResult", "private_mem_conversions"]


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
