"""Trace events (``VM(trace=True)``); names follow KVM's mmutrace.h tracepoints."""

from typing import NamedTuple

__all__ = ["Event"]


class Event(NamedTuple):
    """One traced MMU operation, in the order it happened."""

    op: str  # hook, SEAMCALL or KVM step name, e.g. "TDH.MEM.PAGE.AUG"
    gfn: int
    level: int
    detail: int  # detail word: a SEAMCALL status, a hook's SPTE, ...
