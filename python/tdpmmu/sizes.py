"""Size arguments: ``4096``, ``"4K"``, ``"2M"``, ``"16GiB"``, ``"0x1000"``.

Every suffix is a power of 1024, as in the KVM selftests' ``parse_size`` (``10M``, ``3G``); the
``B``/``iB`` spellings are accepted for readability and mean the same thing.
"""

import re

from tdpmmu._core import ConfigError

__all__ = ["BACKING_SIZES", "format_size", "parse_backing", "parse_size"]

_UNITS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}
_SIZE_RE = re.compile(r"(?P<num>\d+)\s*(?P<unit>[kmgtpe]?)(?:i?b)?", re.IGNORECASE)

#: Host page sizes a memslot can be backed by, as in KVM: 4 KiB, 2 MiB (THP/hugetlb), 1 GiB.
BACKING_SIZES = {"4K": 4096, "2M": 2 << 20, "1G": 1 << 30}


def parse_size(value: str | int, name: str = "size") -> int:
    """Bytes from an int or a size string: ``4096``, ``"4K"``, ``"2M"``, ``"16GiB"``, ``"0x1000"``.

    Suffixes K, M, G, T, P, E are powers of 1024 (case-insensitive; ``B``/``iB`` may follow).

    Args:
        value: a non-negative int (bytes) or a string as above.
        name: the argument named in error messages (default ``"size"``).

    Returns:
        int: the size in bytes.

    Raises:
        ConfigError: a negative int or an unparsable string, naming ``name``.
        TypeError: ``value`` is neither int nor str (or is a bool).
    """
    # bool is an int subclass; True as a size is certainly a mistake.
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(f"{name}: expected a size as int or str, got {type(value).__name__}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{name}: must be >= 0, got {value}")
        return value
    text = value.strip()
    if text.lower().startswith("0x"):
        try:
            return int(text, 16)
        except ValueError:
            pass
    else:
        m = _SIZE_RE.fullmatch(text)
        if m:
            return int(m["num"]) << (10 * _UNITS[m["unit"].lower()])
    raise ConfigError(
        f"{name}: cannot parse {value!r} as a size; use bytes or a number with a K/M/G/T/P "
        "suffix (powers of 1024), e.g. '4K', '512MiB', '16GiB', '0x1000'"
    )


def parse_backing(value: str | int, name: str = "backing") -> int:
    """A host backing page size in bytes; only 4 KiB, 2 MiB and 1 GiB pages exist on x86.

    Args:
        value: ``"4K"``, ``"2M"``, ``"1G"`` or any ``parse_size`` spelling of 4096, 2097152 or
            1073741824 bytes.
        name: the argument named in error messages (default ``"backing"``).

    Returns:
        int: 4096, 2097152 or 1073741824.

    Raises:
        ConfigError: not one of those sizes (or unparsable), naming ``name``.
        TypeError: ``value`` is neither int nor str (or is a bool).
    """
    size = parse_size(value, name)
    if size not in BACKING_SIZES.values():
        raise ConfigError(
            f"{name}: {value!r} is not a host page size; allowed: "
            + ", ".join(f"{k!r} ({v} bytes)" for k, v in BACKING_SIZES.items())
        )
    return size


def format_size(nbytes: int) -> str:
    """Shortest exact binary spelling of a size: 67108864 -> '64MiB', 4097 -> '4097'.

    Args:
        nbytes: a size in bytes (an int; anything that is not a whole number of KiB is
            written as its plain number).

    Returns:
        str: the spelling, which ``parse_size`` reads back to ``nbytes``. Never raises.
    """
    for exp, unit in ((6, "EiB"), (5, "PiB"), (4, "TiB"), (3, "GiB"), (2, "MiB"), (1, "KiB")):
        step = 1 << (10 * exp)
        if nbytes >= step and nbytes % step == 0:
            return f"{nbytes // step}{unit}"
    return str(nbytes)
