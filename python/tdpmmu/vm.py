"""``tdpmmu.VM``: the native VM with Python-side argument normalization and conveniences.

Hot paths (``fault``, ``fault_batch``, ``run_memstress``, ...) are inherited unchanged from the
native class so they stay one native call each.
"""

from collections.abc import Mapping
from types import TracebackType
from typing import cast

from tdpmmu import _core
from tdpmmu.costs import CostModel
from tdpmmu.hooks import HookDesign
from tdpmmu.sizes import BACKING_SIZES, format_size, parse_backing, parse_size
from tdpmmu.stats import Stats
from tdpmmu.trace import Event

__all__ = ["DEFAULT_HOOKS", "VM"]

#: Hook design each VM type uses when ``hooks=None`` (architecture §3: upstream behaviour).
DEFAULT_HOOKS: dict[str, str] = {
    "default": "none",
    "sw_protected": "none",
    "snp": "gmem",
    "tdx": "mirror",
}


_BACKING_NAMES = {size: name for name, size in BACKING_SIZES.items()}


def _cost_model(costs: CostModel | Mapping[str, float] | None) -> CostModel:
    if costs is None:
        return CostModel()
    if isinstance(costs, CostModel):
        return costs
    if isinstance(costs, Mapping):
        return CostModel().replace(**costs)
    raise TypeError(f"costs: expected a tdpmmu.CostModel, a mapping or None, got {costs!r}")


def _options(tdx: Mapping[str, object] | None, mirror: bool, folio: str | int) -> dict[str, str]:
    """Type-specific options as the native constructor takes them (all values as text)."""
    if not isinstance(mirror, bool):
        raise TypeError(f"mirror: expected bool, got {mirror!r}")
    options: dict[str, str] = {}
    if mirror:
        options["mirror"] = "true"
    size = parse_size(folio, "folio")
    if size not in (4096, 2 << 20):
        raise _core.ConfigError(f"folio: guest_memfd folio size must be 4K or 2M, got {folio!r}")
    if size != 4096:
        options["folio"] = "2M"
    if tdx is not None:
        if not isinstance(tdx, Mapping):
            raise TypeError(f"tdx: expected a mapping of TDX options, got {tdx!r}")
        for key, value in tdx.items():
            if isinstance(value, bool):
                value = "true" if value else "false"
            options[str(key)] = str(value)
    return options


class VM(_core.Vm):
    """One simulated VM: its memslots, roots, page tables, vCPUs and modeled clock.

    The default memslot (slot 0) covers all of ``memory`` from gfn 0 with host pages of size
    ``backing``. See the README's API tour for the operations.
    """

    _costs: CostModel
    _backing: int

    def __new__(
        cls,
        vm_type: str = "default",
        memory: str | int = "1GiB",
        vcpus: int = 1,
        levels: int = 4,
        backing: str | int = "4K",
        hooks: str | object | None = None,
        costs: CostModel | Mapping[str, float] | None = None,
        seed: int = 0,
        trace: bool = False,
        nx_huge_pages: bool = False,
        slot_zap_all: bool = True,
        *,
        tdx: Mapping[str, object] | None = None,
        mirror: bool = False,
        folio: str | int = "4K",
    ) -> "VM":
        if not isinstance(vm_type, str):
            raise TypeError(f"vm_type: expected str, got {type(vm_type).__name__}")
        memory_bytes = parse_size(memory, "memory")
        if memory_bytes == 0 or memory_bytes % 4096:
            raise _core.ConfigError(
                f"memory: must be a positive multiple of 4 KiB (4096 bytes), got {memory!r}"
            )
        backing_bytes = parse_backing(backing, "backing")
        hook_object: object | None = None
        if hooks is None:
            # An unknown vm_type is reported by the engine, which owns the list of types.
            hooks_name = "mirror" if mirror else DEFAULT_HOOKS.get(vm_type, "none")
        elif isinstance(hooks, str):
            hooks_name = hooks
        elif isinstance(hooks, HookDesign):
            hooks_name = hooks.name
            design_options = hooks.tdx_options()
            if design_options:
                tdx = {**design_options, **(tdx or {})}
        else:
            # A user object with the four hook methods (slow: every call re-enters Python).
            hook_object, hooks_name = hooks, "mirror"
        model = _cost_model(costs)
        options = _options(tdx, mirror, folio)
        self = cast(
            "VM",
            super().__new__(
                cls,
                vm_type,
                memory_bytes,
                vcpus,
                levels,
                backing_bytes,
                hooks_name,
                model.to_dict(),
                seed,
                trace,
                nx_huge_pages,
                slot_zap_all,
                options,
                hook_object,
            ),
        )
        self._costs = model
        self._backing = backing_bytes
        return self

    @property
    def stats(self) -> Stats:
        """A snapshot of the counters (KVM names) and ``modeled_ns``."""
        return Stats(self.stats_dict())

    @property
    def costs(self) -> CostModel:
        """The cost model this VM charges its modeled clock with."""
        return self._costs

    @property
    def backing(self) -> int:
        """Host page size (bytes) behind the default memslot."""
        return self._backing

    def add_memslot(
        self, gfn: int, npages: int, backing: str | int = "4K", gmem: bool = False
    ) -> int:
        """Add a memslot of ``npages`` 4 KiB pages at ``gfn``; returns its slot id."""
        return super().add_memslot(gfn, npages, parse_backing(backing, "backing"), gmem)

    def trace_events(self) -> list[Event]:  # type: ignore[override]
        """Events in the order they happened (``trace=True``): hooks by hook name, SEAMCALLs
        by leaf name, RMP instructions as ``rmpupdate``/``psmash``/``pvalidate``."""
        return [Event(*e) for e in super().trace_events()]

    def __enter__(self) -> "VM":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Tear down in KVM's order (a TD's SEAMCALLs and an SNP guest's RMP updates are part of
        # what users measure); a bugged VM refuses, and its arena goes with the object anyway.
        if not self.destroyed and not self.bugged:
            self.destroy()

    def __repr__(self) -> str:
        return (
            f"VM(vm_type={self.vm_type!r}, memory={format_size(self.memory)!r}, "
            f"vcpus={self.vcpus}, levels={self.levels}, backing={_BACKING_NAMES[self._backing]!r}, "
            f"hooks={self.hooks_name!r}{', bugged=True' if self.bugged else ''})"
        )
