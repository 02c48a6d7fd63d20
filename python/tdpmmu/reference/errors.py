"""Errors and fault return codes.

When the compiled package is importable the reference raises its exception classes (so a
caller catches one hierarchy for both engines) and returns its ``tdpmmu.Ret`` members (so
``fault.ret is tdpmmu.Ret.FIXED`` holds for both); stand-alone it uses local copies.
"""

from __future__ import annotations

import enum
from typing import Any

try:  # pragma: no cover - depends on whether the native module is built
    from .._core import ConfigError as _ConfigError
    from .._core import InvariantError as _InvariantError
    from .._core import VmBugged as _VmBugged
except ImportError:  # pragma: no cover

    class _InvariantError(Exception):  # type: ignore[no-redef]
        """An invariant of the MMU model does not hold (KVM would WARN or BUG)."""

    class _ConfigError(ValueError):  # type: ignore[no-redef]
        """Bad VM configuration."""

    class _VmBugged(Exception):  # type: ignore[no-redef]
        """A KVM_BUG_ON fired: the VM refuses every further operation."""


InvariantError = _InvariantError
ConfigError = _ConfigError
VmBugged = _VmBugged


class _RefRet(enum.IntEnum):
    """``RET_PF_*`` codes (mmu_internal.h) plus the KVM_EXIT_MEMORY_FAULT outcome."""

    CONTINUE = 0
    RETRY = 1
    EMULATE = 2
    WRITE_PROTECTED = 3
    INVALID = 4
    FIXED = 5
    SPURIOUS = 6
    MEMORY_FAULT = 7


def _pick_ret() -> Any:
    # Prefer the package's Ret; fall back to the local copy if it is absent or differs.
    try:  # pragma: no cover - depends on the rest of the package
        from ..ret import Ret as pkg_ret
    except ImportError:
        return _RefRet
    try:
        if all(int(getattr(pkg_ret, m.name)) == m.value for m in _RefRet):
            return pkg_ret
    except (AttributeError, TypeError, ValueError):  # pragma: no cover
        pass
    return _RefRet  # pragma: no cover


Ret = _pick_ret()
