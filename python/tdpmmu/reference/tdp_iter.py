"""The TDP MMU's pre-order walker (KVM's tdp_iter.h / tdp_iter.c)."""

from __future__ import annotations

from collections.abc import Iterator

from .arena import Arena, MmuPage
from .spte import (
    SHADOW_NONPRESENT_VALUE,
    SPTE_ENT_PER_PAGE,
    gfn_round_for_level,
    is_last_spte,
    is_shadow_present_pte,
    pages_per_hpage,
    spte_index,
)


class TdpIter:
    """``struct tdp_iter``: pre-order walk of one root over ``[start, end)``.

    Mirrors tdp_iter.c: the walk re-reads an entry before descending into it, never
    enters a non-present (or frozen) entry, steps sideways within a table until index 511,
    then climbs.  ``old_spte`` is the snapshot taken on arrival at ``sptep``.  ``gfn_bits``
    (the TDX shared bit, for the direct root of a TD) only enters the table index: ``gfn``
    stays un-aliased, and a walk that starts at an already-aliased gfn yields nothing.
    """

    def __init__(
        self,
        arena: Arena,
        root: MmuPage,
        min_level: int,
        start: int,
        end: int,
        gfn_bits: int = 0,
    ):
        self._arena = arena
        self.root_level = root.level
        self.min_level = min_level
        self.end = end
        self.gfn_bits = gfn_bits
        self.next_last_level_gfn = start
        self.pt_path: dict[int, MmuPage] = {root.level: root}
        self.level = root.level
        self.gfn = 0
        self.old_spte = SHADOW_NONPRESENT_VALUE
        self.valid = False
        if gfn_bits and start >= gfn_bits:
            return
        self._restart()

    # -- position helpers ---------------------------------------------------------------
    @property
    def sp(self) -> MmuPage:
        """The table holding the current entry."""
        return self.pt_path[self.level]

    @property
    def index(self) -> int:
        """Index of the current entry in its table (``spte_index`` of the aliased gfn)."""
        return spte_index(self.gfn | self.gfn_bits, self.level)

    def read(self) -> int:
        """The current entry's value, read from the table now."""
        return self.sp.spt[self.index]

    def write(self, value: int) -> None:
        """Store ``value`` in the current entry (no FROZEN protocol: callers hold the lock)."""
        self.sp.spt[self.index] = value

    # -- movement -----------------------------------------------------------------------
    def _restart(self) -> None:
        self.level = self.root_level
        self.gfn = gfn_round_for_level(self.next_last_level_gfn, self.level)
        self.old_spte = self.read()
        self.valid = True

    def _try_step_down(self) -> bool:
        if self.level == self.min_level:
            return False
        spte = self.read()  # re-read: the entry may have been unlinked since we arrived
        if not is_shadow_present_pte(spte) or is_last_spte(spte, self.level):
            return False
        child = self._arena.child_sp(spte)
        self.level -= 1
        self.pt_path[self.level] = child
        self.gfn = gfn_round_for_level(self.next_last_level_gfn, self.level)
        self.old_spte = self.read()
        return True

    def _try_step_side(self) -> bool:
        if self.index == SPTE_ENT_PER_PAGE - 1:
            return False
        self.gfn += pages_per_hpage(self.level)
        self.next_last_level_gfn = self.gfn
        self.old_spte = self.read()
        return True

    def _try_step_up(self) -> bool:
        if self.level == self.root_level:
            return False
        self.level += 1
        self.gfn = gfn_round_for_level(self.gfn, self.level)
        self.old_spte = self.read()
        return True

    def next(self) -> None:
        """``tdp_iter_next``: down if possible, else side, climbing as needed."""
        if self._try_step_down():
            return
        while True:
            if self._try_step_side():
                return
            if not self._try_step_up():
                break
        self.valid = False

    def __iter__(self) -> Iterator[TdpIter]:
        """``for_each_tdp_pte_min_level``: yields itself at every entry in the range."""
        while self.valid and self.gfn < self.end:
            yield self
            self.next()


# --------------------------------------------------------------------------------------
# SEV-SNP: the Reverse Map Table and the instructions that change it
