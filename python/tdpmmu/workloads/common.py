"""Helpers every workload shares: the guest page, the selftests' backing names, rates, and the
virtual-time options and summary (``tdpmmu.vtime``)."""

import math
from collections.abc import Mapping
from typing import Any

from tdpmmu import coerce
from tdpmmu._core import ConfigError
from tdpmmu.vtime import Machine, VirtualOptions, by_resource

__all__ = ["BACKING_SOURCES", "OUTCOMES", "PAGE_SIZE", "backing_source", "virtual_options"]

#: The guest page (4096 bytes): the unit of every rate and page count here.
PAGE_SIZE = coerce.PAGE_SIZE

#: The selftests' ``-s`` backing sources that exist on this model, with their host page size.
#: Shared (``shmem``, ``shared_hugetlb``) and private memory differ only in the host page size
#: here: the model has no page cache, so a shared mapping's first touch costs what an anonymous
#: one does (userfaultfd MINOR, which the selftest allows only on shared memory, is modeled by
#: its own costs either way).
BACKING_SOURCES: Mapping[str, str] = {
    "anonymous": "4K",
    "anonymous_thp": "2M",
    "anonymous_hugetlb": "2M",  # x86's default hugetlb size
    "anonymous_hugetlb_2mb": "2M",
    "anonymous_hugetlb_1gb": "1G",
    "shmem": "4K",
    "shared_hugetlb": "2M",
}


#: Fault outcomes a virtual-time run counts per vCPU (``VM.run_virtual``'s records).
OUTCOMES = ("hits", "fixed", "spurious", "retry", "emulate", "memory_fault", "write_protected")


def rate(pages: int, seconds: float) -> float:
    # Zero modeled time happens with an all-zero cost model; the rate is then unbounded.
    return pages / seconds if seconds > 0 else math.inf


def finite_or_inf(x: Any) -> float:
    # Envelopes write non-finite rates as null; the only non-finite rate is +inf.
    return math.inf if x is None else float(x)


def backing_source(backing: str | int) -> tuple[int, str | None]:
    """A backing given as a size or a selftest ``-s`` name: (bytes, the name or None).

    Raises:
        ConfigError: neither a known size nor a name in ``BACKING_SOURCES``.
    """
    if isinstance(backing, str) and backing.strip() in BACKING_SOURCES:
        name = backing.strip()
        return coerce.backing(BACKING_SOURCES[name]), name
    return coerce.backing(backing), None


def virtual_options(
    *,
    clock: str | None,
    hooks: object,
    mmu_lock: str = "shared",
    userfault: str | None = None,
    uffd_all: bool = False,
    uffd_readers: int = 1,
    uffd_delay_us: float = 0.0,
    machine: Machine | Mapping[str, Any] | None = None,
    tdx_module: str = "1.5",
) -> VirtualOptions:
    """The run's ``VirtualOptions`` from a workload's keyword arguments.

    Args:
        clock: ``"virtual"``, ``"host"`` or None (virtual unless ``hooks`` is an object that is
            not a design name: Python hooks run on host threads only).
        hooks: the workload's ``hooks`` argument.
        mmu_lock, userfault, uffd_all, uffd_readers, uffd_delay_us, machine, tdx_module: as
            ``demand_paging``.

    Returns:
        VirtualOptions: the checked options.

    Raises:
        ConfigError: a value out of range, naming it; ``clock="virtual"`` with a hooks object.
        TypeError: a value of the wrong type.
    """
    hooks_object = hooks is not None and not isinstance(hooks, str)
    if clock is None:
        clock = "host" if hooks_object else "virtual"
    elif clock == "virtual" and hooks_object:
        raise ConfigError(
            'clock: "virtual" runs the built-in hook designs; a hooks object (Python code) '
            'runs on host threads: use clock="host"'
        )
    if machine is None:
        m = Machine()
    elif isinstance(machine, Machine):
        m = machine
    elif isinstance(machine, Mapping):
        m = Machine(**machine)
    else:
        raise TypeError(f"machine: expected tdpmmu.vtime.Machine or a mapping, got {machine!r}")
    return VirtualOptions(
        clock=clock,
        mmu_lock=mmu_lock,
        userfault="none" if userfault is None else userfault,
        uffd_all=uffd_all,
        uffd_readers=uffd_readers,
        uffd_delay_us=uffd_delay_us,
        machine=m,
        tdx_module=tdx_module,
    )


def virtual_summary(rec: Mapping[str, Any]) -> dict[str, Any]:
    """What a virtual-time run adds to a workload result (``DemandPagingResult.virtual``)."""
    outcomes = {k: 0 for k in ("accesses", "faults", *OUTCOMES, "local_retries")}
    for v in rec["vcpus"]:
        for k in outcomes:
            outcomes[k] += int(v[k])
    vb = dict(rec["breakdown"])
    return {
        "outcomes": outcomes,
        "vcpu_breakdown": vb,
        "resources": by_resource(vb),
        "host_breakdown": dict(rec["host_breakdown"]),
        "lock_acquires": int(rec["lock_acquires"]),
        "lock_contended": int(rec["lock_contended"]),
        "lock_wait_ns": float(vb.get("wait_mmu_lock", 0.0)),
        "steps": int(rec["steps"]),
        "switches": int(rec["switches"]),
        "engine_wall_s": float(rec["wall_s"]),
    }
