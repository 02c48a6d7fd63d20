"""The VM-type x hook-design matrix and the TDX option choices, as the engine defines them.

Everything here is read from the Rust core (``tdpmmu._core``), which is the single definition;
the API, the CLI, ``compare`` and the reference model all ask this module instead of keeping a
copy.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from tdpmmu import _core

__all__ = [
    "DESIGNS",
    "TDX_OPTION_CHOICES",
    "VARIANTS",
    "VM_TYPES",
    "Variant",
    "default_design",
    "designs",
    "variant",
]

#: Every VM type, in the engine's order.
VM_TYPES: tuple[str, ...] = tuple(_core.VM_TYPES)

#: Every hook design name (which VM types take which: ``designs``).
DESIGNS: tuple[str, ...] = tuple(_core.DESIGNS)

#: TDX option -> allowed values: names, or ``("bool",)``, ``("int",)``, ``("probability",)``.
TDX_OPTION_CHOICES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {k: tuple(v) for k, v in _core.TDX_OPTION_CHOICES.items()}
)


@dataclass(frozen=True, slots=True)
class Variant:
    """One valid VM shape: a VM type, with or without the software mirror, and its designs.

    ``designs[0]`` is the default design (upstream KVM's behaviour for that VM type).
    ``mirror_root``: the VM has a mirror root beside its direct root (TDX, and sw_protected with
    ``mirror=True``). ``tdx_options``: ``VM(tdx={...})`` applies.
    """

    vm_type: str
    mirror: bool
    designs: tuple[str, ...]
    mirror_root: bool
    tdx_options: bool

    @property
    def default_design(self) -> str:
        """The design ``VM(hooks=None)`` uses on this variant: upstream KVM's, ``designs[0]``."""
        return self.designs[0]

    @property
    def label(self) -> str:
        """``vm_type``, or ``vm_type+mirror`` for the mirrored variant."""
        return f"{self.vm_type}+mirror" if self.mirror else self.vm_type


#: Every valid (vm_type, mirror) combination, in the engine's order.
VARIANTS: tuple[Variant, ...] = tuple(
    Variant(
        vm_type=str(row["vm_type"]),
        mirror=bool(row["mirror"]),
        designs=tuple(row["designs"]),
        mirror_root=bool(row["mirror_root"]),
        tdx_options=bool(row["tdx_options"]),
    )
    for row in _core.MATRIX
)


def variant(vm_type: str, mirror: bool = False) -> Variant:
    """The matrix row of ``(vm_type, mirror)``.

    Args:
        vm_type: a VM type name, one of ``VM_TYPES``.
        mirror: True for sw_protected's mirrored variant (default False).

    Returns:
        Variant: the row, with its designs (the default first) and whether TDX options apply.

    Raises:
        ConfigError: naming ``vm_type`` (unknown) or ``mirror`` (True on a type other than
            sw_protected).
    """
    if vm_type not in VM_TYPES:
        raise _core.ConfigError(
            f"vm_type: {vm_type!r} is not allowed; allowed: {', '.join(VM_TYPES)}"
        )
    for v in VARIANTS:
        if v.vm_type == vm_type and v.mirror == mirror:
            return v
    raise _core.ConfigError(f"mirror: only sw_protected VMs take mirror=True, not {vm_type}")


def designs(vm_type: str, mirror: bool = False) -> tuple[str, ...]:
    """Hook designs a VM of this type accepts; the first is the default.

    Args:
        vm_type: a VM type name, one of ``VM_TYPES``.
        mirror: True for sw_protected's mirrored variant (default False).

    Returns:
        tuple[str, ...]: design names, e.g. ``("mirror", "private")`` for tdx.

    Raises:
        ConfigError: as ``variant``.
    """
    return variant(vm_type, mirror).designs


def default_design(vm_type: str, mirror: bool = False) -> str:
    """The design ``VM(vm_type, hooks=None)`` uses: upstream KVM's for that VM type.

    Args:
        vm_type: a VM type name, one of ``VM_TYPES``.
        mirror: True for sw_protected's mirrored variant (default False).

    Returns:
        str: "none" (default, sw_protected), "mirror" (tdx, sw_protected with mirror) or
        "gmem" (snp).

    Raises:
        ConfigError: as ``variant``.
    """
    return variant(vm_type, mirror).default_design
