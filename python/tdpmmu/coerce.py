"""Configuration coercion: the one place user input becomes the values a VM is built from.

Every entry point — ``VmSpec`` (and through it every workload and ``compare``) and the CLI —
turns sizes, backing and folio sizes, hook designs, TDX options and cost models into canonical
values here, so a value means the same thing and fails with the same message wherever it is
given. Errors are ``tdpmmu.ConfigError`` (a ``ValueError``) naming the argument; a value of the
wrong Python type is a ``TypeError`` naming it.

The VM-type x design matrix and the TDX option choices come from ``tdpmmu.config`` (the
engine's own definition); nothing here keeps a copy of them.
"""

import math
from collections.abc import Mapping
from typing import Final

from tdpmmu import config
from tdpmmu._core import ConfigError
from tdpmmu.costs import CostModel
from tdpmmu.hooks import HookDesign
from tdpmmu.sizes import BACKING_SIZES, parse_backing, parse_size

__all__ = [
    "FOLIO_SIZES",
    "LEVELS",
    "PAGE_SIZE",
    "TdxValue",
    "ad_bits",
    "backing",
    "cost_model",
    "count",
    "flag",
    "folio",
    "hook_parts",
    "hooks",
    "levels",
    "size",
    "tdx_option",
    "tdx_options",
    "vm_type",
]

#: The guest page: every size of guest memory is a multiple of it.
PAGE_SIZE: Final[int] = 4096

#: guest_memfd folio sizes the model has (4 KiB pages or 2 MiB huge folios).
FOLIO_SIZES: Final[Mapping[str, int]] = {"4K": 4096, "2M": 2 << 20}

#: TDP page-table levels on x86: 4-level or 5-level paging.
LEVELS: Final[tuple[int, ...]] = (4, 5)

#: A TDX option value as the engine takes it: a name, a bool, an int or a probability.
TdxValue = str | bool | int | float

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def count(value: object, name: str, minimum: int = 1, maximum: int | None = None) -> int:
    """An integer count ``>= minimum`` (bool is refused: ``True`` as a count is a mistake).

    Args:
        value: the value to check (an int).
        name: the argument named in error messages.
        minimum: the smallest allowed value (default 1).
        maximum: the largest allowed value (default: no limit).

    Returns:
        int: ``value`` unchanged.

    Raises:
        ConfigError: ``value`` outside ``minimum..maximum``, naming ``name``.
        TypeError: ``value`` is not an int, or is a bool.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected int, got {type(value).__name__}")
    if value < minimum or (maximum is not None and value > maximum):
        allowed = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
        raise ConfigError(f"{name}: must be {allowed}, got {value}")
    return value


def flag(value: object, name: str) -> bool:
    """A real bool (an int such as 1 is refused: it is probably a misplaced argument).

    Args:
        value: the value to check.
        name: the argument named in error messages.

    Returns:
        bool: ``value`` unchanged.

    Raises:
        TypeError: ``value`` is not a bool, naming ``name``.
    """
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected bool, got {value!r}")
    return value


def size(value: object, name: str, *, multiple: int = PAGE_SIZE, positive: bool = True) -> int:
    """Bytes from an int or a size string (``"64M"``, ``"1GiB"``, powers of 1024), checked to
    be a multiple of ``multiple`` (the 4 KiB guest page unless told) and, unless
    ``positive=False``, non-zero.

    Args:
        value: an int (bytes) or a size string (``tdpmmu.sizes.parse_size``).
        name: the argument named in error messages.
        multiple: the size must be a multiple of this many bytes (default 4096).
        positive: refuse 0 (default True).

    Returns:
        int: the size in bytes.

    Raises:
        ConfigError: negative, unparsable, zero (when ``positive``) or not a multiple of
            ``multiple``, naming ``name``.
        TypeError: ``value`` is neither int nor str (or is a bool).
    """
    nbytes = parse_size(value, name)  # type: ignore[arg-type]  # parse_size checks the type
    if positive and nbytes == 0:
        raise ConfigError(f"{name}: must be > 0, got {value!r}")
    if nbytes % multiple:
        raise ConfigError(f"{name}: must be a multiple of {multiple} bytes, got {value!r}")
    return nbytes


def backing(value: object, name: str = "backing") -> int:
    """Host page size behind a memslot, in bytes: one of ``sizes.BACKING_SIZES``.

    Args:
        value: ``"4K"``, ``"2M"``, ``"1G"`` or the same in bytes.
        name: the argument named in error messages (default ``"backing"``).

    Returns:
        int: 4096, 2097152 or 1073741824.

    Raises:
        ConfigError: not a host page size, naming ``name``.
        TypeError: ``value`` is neither int nor str (or is a bool).
    """
    return parse_backing(value, name)  # type: ignore[arg-type]  # parse_backing checks it


def folio(value: object, name: str = "folio") -> int:
    """guest_memfd folio size in bytes: 4 KiB or 2 MiB (``FOLIO_SIZES``).

    Args:
        value: ``"4K"``, ``"2M"`` or the same in bytes.
        name: the argument named in error messages (default ``"folio"``).

    Returns:
        int: 4096 or 2097152.

    Raises:
        ConfigError: any other size, naming ``name``.
        TypeError: ``value`` is neither int nor str (or is a bool).
    """
    nbytes = parse_size(value, name)  # type: ignore[arg-type]
    if nbytes not in FOLIO_SIZES.values():
        raise ConfigError(
            f"{name}: guest_memfd folio size must be one of {', '.join(FOLIO_SIZES)}, got {value!r}"
        )
    return nbytes


def size_name(nbytes: int) -> str:
    """``4096 -> "4K"``: the name of a backing or folio size.

    Args:
        nbytes: a size in bytes.

    Returns:
        str: ``"4K"``, ``"2M"`` or ``"1G"``, or the number as text for any other size.
        Never raises.
    """
    for table in (BACKING_SIZES, FOLIO_SIZES):
        for key, val in table.items():
            if val == nbytes:
                return key
    return str(nbytes)


def levels(value: object, name: str = "levels") -> int:
    """TDP paging levels: 4 or 5 (``LEVELS``).

    Args:
        value: the level count (an int).
        name: the argument named in error messages (default ``"levels"``).

    Returns:
        int: 4 or 5.

    Raises:
        ConfigError: any other int, naming ``name``.
        TypeError: ``value`` is not an int (or is a bool).
    """
    n = count(value, name)
    if n not in LEVELS:
        raise ConfigError(f"{name}: must be one of {', '.join(map(str, LEVELS))}, got {n}")
    return n


def ad_bits(value: object, variant: config.Variant) -> bool:
    """KVM's ``enable_ept_ad_bits`` for a VM of ``variant``, checked as the engine checks it.

    Args:
        value: True (EPT A/D bits on, the default) or False (kvm_intel ``eptad=0``).
        variant: the VM's row of the VM-type x design matrix.

    Returns:
        bool: ``value`` unchanged.

    Raises:
        ConfigError: naming ``ad_bits``: False on snp (AMD NPT always has A/D) or on a variant
            with a mirror root (KVM refuses TDX without EPT A/D bits).
        TypeError: ``value`` is not a bool.
    """
    on = flag(value, "ad_bits")
    if not on and variant.vm_type == "snp":
        raise ConfigError(
            "ad_bits: an snp VM runs on AMD NPT, whose A/D bits are always on; ad_bits=False "
            "(kvm_intel eptad=0) applies to default and sw_protected VMs"
        )
    if not on and variant.mirror_root:
        raise ConfigError(
            "ad_bits: KVM refuses TDX without EPT A/D bits (tdx_bringup needs "
            "enable_ept_ad_bits: the mirror/external page tables assume them), so a "
            f"{variant.vm_type} VM with a mirror root takes ad_bits=True only; ad_bits=False "
            "applies to default and sw_protected VMs"
        )
    return on


#: The label of sw_protected's mirrored variant, accepted as a ``vm_type`` name.
MIRROR_LABEL = "sw_protected+mirror"


def vm_type(value: object, mirror: object = False) -> config.Variant:
    """The matrix row of ``(vm_type, mirror)`` (``tdpmmu.config.variant`` with type checks).

    Args:
        value: the VM type name, one of ``tdpmmu.config.VM_TYPES``, or
            ``"sw_protected+mirror"`` (the label of sw_protected's mirrored variant, as
            ``mirror=True``).
        mirror: True for sw_protected's mirrored variant (default False).

    Returns:
        tdpmmu.config.Variant: the row.

    Raises:
        ConfigError: naming ``vm_type`` (unknown) or ``mirror`` (on a type other than
            sw_protected).
        TypeError: ``value`` is not a str, or ``mirror`` not a bool.
    """
    if not isinstance(value, str):
        raise TypeError(f"vm_type: expected str, got {type(value).__name__}")
    with_mirror = flag(mirror, "mirror")
    if value == MIRROR_LABEL:
        # The label the tables print (``VmSpec.label``) is accepted as a name too.
        value, with_mirror = "sw_protected", True
    return config.variant(value, with_mirror)


def cost_model(costs: object, name: str = "costs") -> CostModel:
    """A ``CostModel`` from ``None`` (the documented defaults), a ``CostModel`` or a mapping of
    field name -> ns (unknown names and negative or non-finite values are refused).

    Args:
        costs: None, a ``tdpmmu.CostModel`` (returned as is) or a mapping of field name ->
            modeled nanoseconds overriding the defaults.
        name: the argument named in a ``TypeError`` (default ``"costs"``).

    Returns:
        CostModel: the model.

    Raises:
        ConfigError: an unknown field (naming ``costs``) or a bad value (naming the field).
        TypeError: ``costs`` is none of the above.
    """
    if costs is None:
        return CostModel()
    if isinstance(costs, CostModel):
        return costs
    if isinstance(costs, Mapping):
        return CostModel().replace(**{str(k): v for k, v in costs.items()})
    raise TypeError(f"{name}: expected a tdpmmu.CostModel, a mapping or None, got {costs!r}")


def tdx_option(key: str, value: object) -> TdxValue:
    """One TDX option, checked against ``config.TDX_OPTION_CHOICES`` and typed as the engine
    takes it: a name (str), ``bool``, ``int`` or a probability (``float`` in [0, 1]). Text is
    accepted for every kind (``"batched"``, ``"true"``, ``"3"``, ``"0.1"``), as the CLI gives.

    Args:
        key: the option, a key of ``TDX_OPTION_CHOICES`` (``"version"``, ``"sept_free"``,
            ``"track"``, ``"interface"``, ``"measure"``, ``"max_local_retries"`` or a
            SEAMCALL leaf such as ``"TDH.MEM.PAGE.AUG"``; ``tdpmmu.VM`` documents each).
        value: its value: one of the option's names; a bool or true/false/yes/no/on/off/1/0
            for ``measure``; an int >= 0 (or its text, any base prefix) for
            ``max_local_retries``; a probability in [0, 1] for a leaf.

    Returns:
        str | bool | int | float: the typed value. (The engine refuses a
        ``max_local_retries`` above 1000000 when the VM is built.)

    Raises:
        ConfigError: an unknown key (naming ``tdx``) or a bad value (naming ``tdx[key]``).
    """
    choices = config.TDX_OPTION_CHOICES.get(key)
    arg = f"tdx[{key!r}]"
    if choices is None:
        raise ConfigError(
            f"tdx: unknown option {key!r}; allowed: {', '.join(config.TDX_OPTION_CHOICES)}"
        )
    kind = choices[0] if len(choices) == 1 else None
    if kind == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise ConfigError(f"{arg}: expected a bool (true/false), got {value!r}")
    if kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            n = value
        else:
            try:
                n = int(str(value).strip(), 0)
            except ValueError:
                raise ConfigError(f"{arg}: expected an integer, got {value!r}") from None
        if n < 0:
            raise ConfigError(f"{arg}: must be >= 0, got {n}")
        return n
    if kind == "probability":
        if isinstance(value, bool):
            raise ConfigError(f"{arg}: expected a probability in [0, 1], got {value!r}")
        try:
            p = float(value)  # type: ignore[arg-type]  # refused below when not a number
        except (TypeError, ValueError):
            raise ConfigError(f"{arg}: expected a probability in [0, 1], got {value!r}") from None
        if not (math.isfinite(p) and 0.0 <= p <= 1.0):
            raise ConfigError(f"{arg}: expected a probability in [0, 1], got {value!r}")
        return p
    name = str(value).strip()
    if name not in choices:
        raise ConfigError(f"{arg}: {value!r} is not allowed; allowed: {', '.join(choices)}")
    return name


def tdx_options(tdx: object, name: str = "tdx") -> dict[str, TdxValue]:
    """Every option of a ``tdx={...}`` mapping through ``tdx_option`` (``None`` -> ``{}``).

    Args:
        tdx: None or a mapping of option -> value (``tdx_option``).
        name: the argument named in a ``TypeError`` (default ``"tdx"``).

    Returns:
        dict[str, TdxValue]: option -> typed value, keys stripped.

    Raises:
        ConfigError: as ``tdx_option``.
        TypeError: ``tdx`` is not a mapping.
    """
    if tdx is None:
        return {}
    if not isinstance(tdx, Mapping):
        raise TypeError(f"{name}: expected a mapping of TDX options, got {tdx!r}")
    return {str(k).strip(): tdx_option(str(k).strip(), v) for k, v in tdx.items()}


def hook_parts(
    value: object, tdx: object = None
) -> tuple[str | None, dict[str, object], object | None]:
    """What a ``hooks=`` value names, before any check against a VM type: ``(design name or
    None for the VM type's default, TDX options, hook object)``.

    A ``HookDesign`` contributes its name and its TDX options (the explicit ``tdx`` ones win);
    any other object than None, a str or a ``HookDesign`` is a hook object answering the
    ``mirror`` design's calls (its methods are checked here).

    Args:
        value: the ``hooks=`` value (``tdpmmu.VM`` documents the forms).
        tdx: the ``tdx=`` mapping, or None.

    Returns:
        tuple[str | None, dict[str, object], object | None]: design name (None = default),
        TDX options as given (values unconverted), hook object (None unless ``value`` is one).

    Raises:
        TypeError: ``tdx`` is not a mapping, or a hook object lacks one of the four methods.
    """
    if tdx is not None and not isinstance(tdx, Mapping):
        raise TypeError(f"tdx: expected a mapping of TDX options, got {tdx!r}")
    options: dict[str, object] = {str(k).strip(): v for k, v in (tdx or {}).items()}
    if value is None or isinstance(value, str):
        return value, options, None
    if isinstance(value, HookDesign):
        return value.name, {**value.tdx_options(), **options}, None
    for method in (
        "link_external_spt",
        "set_external_spte",
        "remove_external_spte",
        "free_external_spt",
    ):
        if not callable(getattr(value, method, None)):
            # The binding's own wording (a design name is a str; anything else is taken as a
            # hook object).
            raise TypeError(
                f"hooks: a hook object needs a method {method}(gfn, level, value); "
                f"got {type(value).__name__}"
            )
    return "mirror", options, value


def hooks(
    value: object, variant: config.Variant, tdx: object = None
) -> tuple[str, dict[str, TdxValue], object | None]:
    """``(design name, TDX options, hook object)`` for ``VM(hooks=value, tdx=tdx)``.

    ``value`` is ``None`` (the variant's default design), a design name, a ``HookDesign``
    (its TDX options are merged under the explicit ``tdx`` ones) or an object with the four
    hook methods (design ``mirror``, the object answering the hooks). The design must be one
    the variant accepts (``config.VARIANTS``); TDX options only apply to variants that take
    them.

    Args:
        value: the ``hooks=`` value, as above (``tdpmmu.VM`` documents the forms).
        variant: the VM's matrix row (``vm_type``).
        tdx: the ``tdx=`` mapping, or None (default).

    Returns:
        tuple[str, dict[str, TdxValue], object | None]: the design name, the merged TDX
        options and the hook object (None unless ``value`` is one).

    Raises:
        ConfigError: naming ``hooks`` (unknown design, or one the variant does not take) or
            ``tdx`` (options on a variant that takes none, or a bad option).
        TypeError: ``value`` is not None, a str or a ``HookDesign`` and lacks a hook method,
            or ``tdx`` is not a mapping.
    """
    name, raw, hook_object = hook_parts(value, tdx)
    design = variant.default_design if name is None else name
    options = tdx_options(raw)
    if design not in variant.designs:
        known = design in config.DESIGNS
        raise ConfigError(
            f"hooks: {design!r} is "
            + (f"not a design of {variant.label} VMs" if known else "not a hook design")
            + f"; allowed: {', '.join(variant.designs)}"
        )
    if options and not variant.tdx_options:
        raise ConfigError(
            f"tdx: {variant.label} VMs take no TDX options (only "
            + ", ".join(v.label for v in config.VARIANTS if v.tdx_options)
            + f" do), got {', '.join(options)}"
        )
    return design, options, hook_object
