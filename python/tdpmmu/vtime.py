"""Modeled time at scale: the options of a virtual-time run and how its time is grouped.

A virtual-time run (``VM.run_virtual`` for memstress-shaped accesses, ``VM.run_virtual_accesses``
for explicit per-vCPU page lists, ``demand_paging(..., clock="virtual")``) simulates every
vCPU on one host thread with a deterministic discrete-event engine: the real fault path runs on
the real tables, interleaved with the other vCPUs' steps in modeled-time order, and shared
resources (``mmu_lock``, the host memory path, userfaultfd, IPIs, the TDX module's locks) are
mechanisms with ``CostModel`` parameters (docs/model.md "Modeled time at scale"). This module
holds the run's knobs (``VirtualOptions``, ``Machine``) and the grouping of its modeled time by
resource (``by_resource``).
"""

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Final

from tdpmmu import _core, coerce
from tdpmmu._core import ConfigError

__all__ = [
    "CLOCKS",
    "LOCK_MODES",
    "RESOURCES",
    "USERFAULT_MODES",
    "Machine",
    "VirtualOptions",
    "by_resource",
    "pin_list",
]

#: ``clock`` values: ``"virtual"`` (simulated vCPUs on one thread, modeled-time order) or
#: ``"host"`` (one real thread per vCPU, host scheduling).
CLOCKS: Final = ("virtual", "host")
#: ``mmu_lock`` values: faults take KVM's mmu_lock for read (``"shared"``, parallel TDP MMU
#: faults) or for write (``"exclusive"``, KVM before them).
LOCK_MODES: Final = ("shared", "exclusive")
#: ``userfault`` values (None means ``"none"``): see ``VirtualOptions.userfault``.
USERFAULT_MODES: Final[tuple[str, ...]] = tuple(_core.USERFAULT_MODES)

#: Modeled time by resource: each CostModel field or wait kind belongs to one group.
RESOURCES: Final[Mapping[str, tuple[str, ...]]] = {
    "guest": ("guest_ns",),
    "exits": ("exit_entry_ns", "td_exit_entry_ns", "psc_exit_ns", "userspace_exit_ns"),
    "kvm fault work": (
        "fault_handling_ns",
        "fault_map_ns",
        "fast_fix_ns",
        "spte_update_ns",
        "wait_spte",
    ),
    "mmu_lock wait": ("wait_mmu_lock",),
    "contended lock lines": ("wait_lock_line",),
    "host memory": (
        "host_page_alloc_ns",
        "host_zero_4k_ns",
        "zone_lock_hold_ns",
        "wait_host_mem",
    ),
    "userfaultfd": (
        "wait_uffd",
        "uffd_wake_ns",
        "uffd_read_ns",
        "uffdio_copy_ns",
        "uffdio_continue_ns",
        "uffd_wq_hold_ns",
        "uffd_wake_scan_ns",
    ),
    "SEAMCALLs": (
        *(f for f in _core.COST_FIELDS if f.startswith(("tdh_", "tdg_"))),
        "page_clear_ns",
    ),
    "flushes and IPIs": (
        "tlb_flush_base_ns",
        "tlb_flush_per_vcpu_ns",
        "kick_base_ns",
        "kick_per_vcpu_ns",
        "wait_ipi",
        "wait_entry",
    ),
    "SNP and guest_memfd": (
        "rmpupdate_ns",
        "psmash_ns",
        "pvalidate_ns",
        "gmem_convert_ns",
        "gmem_split_2m_ns",
    ),
}


def _check_groups() -> None:
    grouped = [f for fields in RESOURCES.values() for f in fields]
    every = set(_core.COST_FIELDS) | set(_core.WAIT_FIELDS)
    mechanisms = {"line_local_ns", "line_smt_ns", "line_socket_ns", "line_remote_ns"}
    mechanisms |= {"walk_read_ns", "guest_access_ns"}  # charged as wait kinds, not units
    missing = every - set(grouped) - mechanisms
    if missing or len(grouped) != len(set(grouped)) or set(grouped) - every:
        raise ImportError(f"tdpmmu.vtime.RESOURCES does not group every field once: {missing}")


_check_groups()


def by_resource(breakdown: Mapping[str, float]) -> dict[str, float]:
    """Group a breakdown (CostModel field or wait kind -> modeled ns) by resource.

    Args:
        breakdown: e.g. ``VM.run_virtual(...)["breakdown"]`` or ``VM.cost_breakdown()``.

    Returns:
        dict[str, float]: resource name (``RESOURCES``' keys, in order) -> modeled ns; the
        values add up to the breakdown's total. Never raises for such a breakdown.
    """
    out = dict.fromkeys(RESOURCES, 0.0)
    where = {f: group for group, fields in RESOURCES.items() for f in fields}
    for field, ns in breakdown.items():
        out[where.get(field, "kvm fault work")] += ns
    return out


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Machine:
    """The host the simulated vCPUs run on; vCPU ``i`` runs on CPU ``i`` unless
    ``VirtualOptions.cpus`` pins it elsewhere (the selftests' ``-c``).

    CPUs are numbered as Linux numbers x86 servers: one thread of every core, socket by socket,
    then the SMT siblings. A contended cache line costs ``line_smt_ns``, ``line_socket_ns`` or
    ``line_remote_ns`` to move by the distance between the two CPUs, so IPI fan-out and lock
    contention depend on where the vCPUs run; zeroing is bounded by each socket's bandwidth.

    Raises:
        ConfigError: a field out of range, naming ``machine.<field>``.
    """

    #: Sockets, 1..64.
    sockets: int = 2
    #: Physical cores per socket, 1..1024.
    cores_per_socket: int = 64
    #: SMT threads per core, 1..8.
    threads_per_core: int = 2
    #: Memory write bandwidth of one socket for page zeroing and copying, GB/s (> 0). The
    #: default is an estimate (docs/costs.md §12.2).
    mem_bw_gbps: float = 150.0

    def __post_init__(self) -> None:
        for name, hi in (("sockets", 64), ("cores_per_socket", 1024), ("threads_per_core", 8)):
            coerce.count(getattr(self, name), f"machine.{name}", 1, hi)
        bw = self.mem_bw_gbps
        if (
            isinstance(bw, bool)
            or not isinstance(bw, int | float)
            or not (math.isfinite(bw) and bw > 0)
        ):
            raise ConfigError(f"machine.mem_bw_gbps: must be a finite number > 0, got {bw!r}")

    @property
    def cpus(self) -> int:
        """Logical CPUs: sockets x cores per socket x threads per core."""
        return self.sockets * self.cores_per_socket * self.threads_per_core

    def to_dict(self) -> dict[str, Any]:
        """The machine as ``VM.run_virtual``'s ``machine`` dict.

        Returns:
            dict[str, Any]: field -> value. Never raises.
        """
        return dataclasses.asdict(self)


def pin_list(cpus: object, machine: Machine) -> tuple[int, ...]:
    """A vCPU pinning (the selftests' ``-c``), checked against ``machine``.

    Args:
        cpus: a sequence of CPU numbers, vCPU ``i`` on ``cpus[i]``; at least one.
        machine: the modeled host.

    Returns:
        tuple[int, ...]: the CPUs.

    Raises:
        ConfigError: naming ``cpus``: empty, not ints, a CPU outside ``0..machine.cpus``, or
            one CPU given to two vCPUs (time-sharing a CPU is not modeled).
    """
    if isinstance(cpus, str | bytes) or not hasattr(cpus, "__iter__"):
        raise ConfigError(f"cpus: must be a sequence of CPU numbers, got {cpus!r}")
    out = tuple(cpus)
    if not out:
        raise ConfigError("cpus: must name at least one CPU")
    seen: set[int] = set()
    for i, c in enumerate(out):
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < machine.cpus:
            raise ConfigError(
                f"cpus: vCPU {i}: CPU {c!r} is not in the machine's 0..{machine.cpus - 1}"
            )
        if c in seen:
            raise ConfigError(
                f"cpus: vCPU {i}: CPU {c} already runs another vCPU (two vCPUs time-sharing "
                "one CPU are not modeled)"
            )
        seen.add(c)
    return out


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class VirtualOptions:
    """The knobs of a run's clock and shared resources (see ``demand_paging``).

    Raises:
        ConfigError: a value outside its allowed set, naming the option.
    """

    #: ``"virtual"`` (default for workloads: deterministic, concurrency in modeled time) or
    #: ``"host"`` (real threads: host-speed runs; modeled time has no concurrency).
    clock: str = "virtual"
    #: ``"shared"`` (faults take mmu_lock for read) or ``"exclusive"`` (for write).
    mmu_lock: str = "shared"
    #: ``"none"`` (anonymous memory), ``"MISSING"``/``"MINOR"`` (userfaultfd with reader
    #: threads, the selftest's ``-u``) or ``"memory_fault"`` (KVM_EXIT_MEMORY_FAULT: each vCPU
    #: resolves its own fault).
    userfault: str = "none"
    #: One userfaultfd for all vCPUs (``-a``).
    uffd_all: bool = False
    #: Reader threads per userfaultfd (``-r``), 1..64.
    uffd_readers: int = 1
    #: Userspace delay per fault, µs (``-d``), >= 0.
    uffd_delay_us: float = 0.0
    machine: Machine = dataclasses.field(default_factory=Machine)
    #: TDX module lock table: ``"1.5"`` (AUG/SEPT.ADD shared) or ``"1.0"`` (exclusive).
    tdx_module: str = "1.5"
    #: The selftests' ``-c`` pinning: vCPU ``i`` runs on CPU ``cpus[i]`` of ``machine`` (one
    #: distinct CPU per vCPU, in ``0..machine.cpus``), so contended cache lines and IPIs cost
    #: by those CPUs' distance; None (default): vCPU ``i`` on CPU ``i``. Virtual time only.
    cpus: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name, allowed in (
            ("clock", CLOCKS),
            ("mmu_lock", LOCK_MODES),
            ("userfault", USERFAULT_MODES),
            ("tdx_module", ("1.5", "1.0")),
        ):
            v = getattr(self, name)
            if v not in allowed:
                raise ConfigError(f"{name}: must be one of {', '.join(allowed)}, got {v!r}")
        coerce.flag(self.uffd_all, "uffd_all")
        coerce.count(self.uffd_readers, "uffd_readers", 1, 64)
        d = self.uffd_delay_us
        if (
            isinstance(d, bool)
            or not isinstance(d, int | float)
            or not (math.isfinite(d) and d >= 0)
        ):
            raise ConfigError(f"uffd_delay_us: must be a finite number >= 0, got {d!r}")
        if not isinstance(self.machine, Machine):
            raise ConfigError(f"machine: must be a tdpmmu.vtime.Machine, got {self.machine!r}")
        if self.cpus is not None:
            object.__setattr__(self, "cpus", pin_list(self.cpus, self.machine))
        if self.clock == "host" and self.differs_from_host():
            raise ConfigError(
                "clock: mmu_lock, userfault, uffd_*, tdx_module and cpus (pinning) are "
                "virtual-time mechanisms; "
                'use clock="virtual" (host threads take mmu_lock for read with no modeled waits)'
            )

    def differs_from_host(self) -> bool:
        """Whether any knob other than ``clock`` asks for a virtual-time mechanism.

        Returns:
            bool: True when ``mmu_lock``, ``userfault``, ``uffd_*``, ``tdx_module`` or
            ``cpus`` is not its default. Never raises.
        """
        return (
            self.cpus is not None
            or self.mmu_lock != "shared"
            or self.userfault != "none"
            or self.uffd_all
            or self.uffd_readers != 1
            or self.uffd_delay_us != 0
            or self.tdx_module != "1.5"
        )

    def run_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``VM.run_virtual`` (and ``VM.run_virtual_accesses``) these
        options give.

        Returns:
            dict[str, Any]: ``mmu_lock``, ``userfault``, ``uffd_all``, ``uffd_readers``,
            ``uffd_delay_ns``, ``machine``, ``tdx_module`` and ``cpus``. Never raises.
        """
        return {
            "cpus": None if self.cpus is None else list(self.cpus),
            "mmu_lock": self.mmu_lock,
            "userfault": self.userfault,
            "uffd_all": self.uffd_all,
            "uffd_readers": self.uffd_readers,
            "uffd_delay_ns": float(self.uffd_delay_us) * 1e3,
            "machine": self.machine.to_dict(),
            "tdx_module": self.tdx_module,
        }

    def to_dict(self) -> dict[str, Any]:
        """The options as plain JSON types (``from_dict`` reads them back).

        Returns:
            dict[str, Any]: every field, ``machine`` as a dict. Never raises.
        """
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["machine"] = self.machine.to_dict()
        d["cpus"] = None if self.cpus is None else list(self.cpus)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "VirtualOptions":
        """Options from ``to_dict``'s output (missing keys keep their defaults).

        Args:
            d: field -> value, ``machine`` as a mapping.

        Returns:
            VirtualOptions: the options.

        Raises:
            ConfigError: a value out of range, naming it.
            TypeError: an unknown key.
        """
        kw = dict(d)
        if "machine" in kw and not isinstance(kw["machine"], Machine):
            kw["machine"] = Machine(**kw["machine"])
        return cls(**kw)
