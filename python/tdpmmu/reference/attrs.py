"""Memory attributes (KVM_SET_MEMORY_ATTRIBUTES): which gfns are private."""

from __future__ import annotations

import bisect


class PrivateRanges:
    """Disjoint, non-touching ``[start, end)`` ranges of private gfns, sorted by start."""

    def __init__(self) -> None:
        self._ranges: list[tuple[int, int]] = []

    def ranges(self) -> list[tuple[int, int]]:
        """The private ranges as sorted, disjoint ``(start, end)`` gfn pairs (a copy)."""
        return list(self._ranges)

    def _covering(self, gfn: int) -> tuple[int, int] | None:
        i = bisect.bisect_right(self._ranges, (gfn, 1 << 64)) - 1
        if i >= 0 and self._ranges[i][0] <= gfn < self._ranges[i][1]:
            return self._ranges[i]
        return None

    def is_private(self, gfn: int) -> bool:
        """Whether ``gfn``'s memory attribute is private."""
        return self._covering(gfn) is not None

    def uniform(self, start: int, end: int) -> bool | None:
        """The attribute of every gfn in ``[start, end)``, or None if it is mixed."""
        cover = self._covering(start)
        if cover is not None:
            return True if end <= cover[1] else None
        return None if any(start <= s < end for s, _ in self._ranges) else False

    def set(self, start: int, end: int, private: bool) -> None:
        """Set the attribute of ``[start, end)`` to private (``private=True``) or shared."""
        kept: list[tuple[int, int]] = []
        for s, e in self._ranges:
            if e <= start or s >= end:
                kept.append((s, e))
                continue
            if s < start:
                kept.append((s, start))
            if e > end:
                kept.append((end, e))
        if private:
            kept.append((start, end))
        kept.sort()
        merged: list[tuple[int, int]] = []
        for s, e in kept:
            if merged and merged[-1][1] == s:
                merged[-1] = (merged[-1][0], e)
            else:
                merged.append((s, e))
        self._ranges = merged
