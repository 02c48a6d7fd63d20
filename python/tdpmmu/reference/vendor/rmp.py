"""SEV-SNP's Reverse Map Table and the instructions that change it (the hardware side).

RMPUPDATE assigns a page to the guest (private) or gives it back (shared), PSMASH splits a
2M entry into 512 4K ones, and the guest's PVALIDATE flips the validated bit.
"""

from __future__ import annotations

import dataclasses

from ..spte import PG_LEVEL_2M, PG_LEVEL_4K, SPTE_ENT_PER_PAGE
from ..stats import Ctx

RMP_SUCCESS = "SUCCESS"
RMP_FAIL_INPUT = "FAIL_INPUT"
RMP_FAIL_PERMISSION = "FAIL_PERMISSION"
RMP_FAIL_OVERLAP = "FAIL_OVERLAP"
RMP_FAIL_SIZEMISMATCH = "FAIL_SIZEMISMATCH"
RMP_NO_UPDATE = "NO_UPDATE"  # PVALIDATE found the page already in the requested state


@dataclasses.dataclass(frozen=True)
class RmpEntry:
    """One RMP entry: owner (assigned = guest-private), page size, gpa, validated."""

    assigned: bool = False
    validated: bool = False
    size_2m: bool = False
    gfn: int = 0


_RMP_SHARED = RmpEntry()


class Rmp:
    """The RMP entries of one guest_memfd memslot, by page offset in the slot.

    The instructions take the accounting context to count and charge what they cost; a
    failed one returns its architectural status and changes nothing.
    """

    def __init__(self, npages: int) -> None:
        self.npages = npages
        self._entries: dict[int, RmpEntry] = {}  # only entries that are not all-zero

    def get(self, off: int) -> RmpEntry:
        """The RMP entry of guest_memfd page ``off`` (offset in the range; an all-shared entry when
        unset)."""
        return self._entries.get(off, _RMP_SHARED)

    def _put(self, off: int, entry: RmpEntry) -> None:
        if entry == _RMP_SHARED:
            self._entries.pop(off, None)
        else:
            self._entries[off] = entry

    def level(self, off: int) -> int:
        """``sev_private_max_mapping_level``: the entry's page size, 4K if unassigned."""
        e = self.get(off)
        return PG_LEVEL_2M if e.assigned and e.size_2m else PG_LEVEL_4K

    def assigned_offsets(self) -> list[int]:
        """Offsets of every assigned (private) page, sorted."""
        return sorted(off for off, e in self._entries.items() if e.assigned)

    def rmpupdate(self, ctx: Ctx, off: int, gfn: int, private: bool, size_2m: bool) -> str:
        """RMPUPDATE: make ``[off, off + 1 or 512)`` private to the guest at ``gfn``, or shared."""
        ctx.count("rmpupdate")
        ctx.charge("rmpupdate_ns")
        status = self._rmpupdate(off, gfn, private, size_2m)
        if status != RMP_SUCCESS:
            ctx.count("rmp_failures")
        return status

    def _rmpupdate(self, off: int, gfn: int, private: bool, size_2m: bool) -> str:
        n = SPTE_ENT_PER_PAGE if size_2m else 1
        if (size_2m and (off % 512 or gfn % 512)) or off + n > self.npages:
            return RMP_FAIL_INPUT
        head = self.get(off & ~511) if (off & ~511) < self.npages else _RMP_SHARED
        if not size_2m and head.assigned and head.size_2m:
            return RMP_FAIL_SIZEMISMATCH
        if private and size_2m and any(self.get(off + i).assigned for i in range(n)):
            return RMP_FAIL_OVERLAP
        if private and not size_2m and self.get(off).assigned:
            return RMP_FAIL_PERMISSION
        for i in range(n):
            self._put(off + i, RmpEntry(True, False, size_2m, gfn + i) if private else _RMP_SHARED)
        return RMP_SUCCESS

    def psmash(self, ctx: Ctx, off: int) -> str:
        """PSMASH: split the assigned 2M entry covering ``off`` into 512 4K entries."""
        ctx.count("psmash")
        ctx.charge("psmash_ns")
        head = off & ~511
        e = self.get(head)
        if not (e.assigned and e.size_2m):
            ctx.count("rmp_failures")
            return RMP_FAIL_PERMISSION
        for i in range(SPTE_ENT_PER_PAGE):
            self._put(head + i, dataclasses.replace(self.get(head + i), size_2m=False))
        return RMP_SUCCESS

    def pvalidate(self, ctx: Ctx, off: int, gfn: int, size_2m: bool, validate: bool) -> str:
        """The guest's PVALIDATE of the 4K or 2M page at ``off`` (expected at ``gfn``)."""
        ctx.count("pvalidate")
        ctx.charge("pvalidate_ns")
        e = self.get(off)
        if not e.assigned or e.gfn != gfn:
            status = RMP_FAIL_PERMISSION
        elif e.size_2m != size_2m:
            status = RMP_FAIL_SIZEMISMATCH
        elif e.validated == validate:
            status = RMP_NO_UPDATE
        else:
            for i in range(SPTE_ENT_PER_PAGE if size_2m else 1):
                self._put(off + i, dataclasses.replace(self.get(off + i), validated=validate))
            status = RMP_SUCCESS
        if status != RMP_SUCCESS:
            ctx.count("pvalidate_errors")
        return status
