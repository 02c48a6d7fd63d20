"""``tdpmmu.VM``: the native VM with Python-side argument normalization and conveniences.

Hot paths (``fault``, ``fault_batch``, ``run_memstress``, ...) are inherited unchanged from the
native class so they stay one native call each.
"""

from collections.abc import Mapping
from types import TracebackType
from typing import cast

from tdpmmu import _core, coerce, config
from tdpmmu.costs import CostModel
from tdpmmu.hooks import HookDesign
from tdpmmu.sizes import BACKING_SIZES, format_size, parse_size
from tdpmmu.stats import Stats
from tdpmmu.trace import Event

__all__ = ["DEFAULT_HOOKS", "VM"]

#: Hook design each VM type uses when ``hooks=None`` (upstream KVM's), from ``tdpmmu.config``.
DEFAULT_HOOKS: dict[str, str] = {
    v.vm_type: v.default_design for v in config.VARIANTS if not v.mirror
}


_BACKING_NAMES = {size: name for name, size in BACKING_SIZES.items()}


TdxValue = str | bool | int | float


def _resolve_hooks(
    hooks: object, tdx: Mapping[str, TdxValue] | None
) -> tuple[str | None, dict[str, TdxValue], object | None]:
    """``(design name or None for the default, TDX options, hook object)`` for ``hooks=``."""
    if tdx is not None and not isinstance(tdx, Mapping):
        raise TypeError(f"tdx: expected a mapping of TDX options, got {tdx!r}")
    options: dict[str, TdxValue] = {str(k): v for k, v in (tdx or {}).items()}
    if hooks is None or isinstance(hooks, str):
        return hooks, options, None
    if isinstance(hooks, HookDesign):
        return hooks.name, {**hooks.tdx_options(), **options}, None
    # Any other object answers the hooks of the mirror design (slow: re-enters Python per
    # call); the engine checks it has the four hook methods.
    return "mirror", options, hooks


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
        tdx: Mapping[str, TdxValue] | None = None,
        mirror: bool = False,
        folio: str | int | None = None,
    ) -> "VM":
        if not isinstance(vm_type, str):
            raise TypeError(f"vm_type: expected str, got {type(vm_type).__name__}")
        memory_bytes = coerce.size(memory, "memory")
        backing_bytes = coerce.backing(backing)
        # Which (vm_type, mirror, design, TDX options) combinations are valid is the engine's
        # to say (tdpmmu.config); here the hooks= value only says what it names.
        design, options, hook_object = _resolve_hooks(hooks, tdx)
        model = coerce.cost_model(costs)
        self = cast(
            "VM",
            super().__new__(
                cls,
                vm_type,
                memory_bytes,
                vcpus,
                levels,
                backing_bytes,
                design,
                model.to_dict(),
                seed,
                trace,
                nx_huge_pages,
                slot_zap_all,
                tdx=options or None,
                mirror=mirror,
                folio=None if folio is None else parse_size(folio, "folio"),
                hook_object=hook_object,
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
        return super().add_memslot(gfn, npages, coerce.backing(backing), gmem)

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
