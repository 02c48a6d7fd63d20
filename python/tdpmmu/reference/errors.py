"""Errors and fault return codes: the package's own, so that a caller catches one hierarchy
for both engines and ``fault.ret is tdpmmu.Ret.FIXED`` holds for both."""

from __future__ import annotations

from ..errors import ConfigError, InvariantError, VmBugged
from ..ret import Ret

__all__ = ["ConfigError", "InvariantError", "Ret", "VmBugged"]
