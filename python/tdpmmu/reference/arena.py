"""Page-table memory: the arena of 4 KiB tables, ``struct kvm_mmu_page``, and the grace period.

Table *i* lives at host pfn ``TABLE_BASE_PFN + i``; the arena only grows.  A freed table is
not reused at once: it waits for the end of the operation that freed it (the model's RCU
grace period, docs/model.md), then joins a LIFO stack of reusable tables.  A table that never
became visible (a lost cmpxchg, a failed hook) is reusable at once.
"""

from __future__ import annotations

import dataclasses

from .errors import InvariantError
from .spte import SHADOW_NONPRESENT_VALUE, SPTE_ENT_PER_PAGE, spte_to_pfn

#: host pfn of arena table 0 (host PA 4 GiB); table *i* lives at ``TABLE_BASE_PFN + i``.
TABLE_BASE_PFN = 0x10_0000

# --------------------------------------------------------------------------------------
# Role word (spec §1.6): the bits of union kvm_mmu_page_role the model uses.
# --------------------------------------------------------------------------------------

ROLE_LEVEL_MASK = 0xF
ROLE_DIRECT = 1 << 7
ROLE_ACCESS_SHIFT = 8
ROLE_INVALID = 1 << 11
ROLE_EFER_NX = 1 << 12
ROLE_CR0_WP = 1 << 13
ROLE_AD_DISABLED = 1 << 16
ROLE_IS_MIRROR = 1 << 19


@dataclasses.dataclass(eq=False)
class MmuPage:
    """``struct kvm_mmu_page``: one 4 KiB page table and what KVM records about it."""

    index: int  # arena slot; host pfn = TABLE_BASE_PFN + index
    spt: list[int]  # the 512 SPTEs
    role: int
    gfn: int  # lowest gfn mapped by this table (un-aliased)
    nx_huge_page_disallowed: bool = False
    # Roots only:
    refcount: int = 0
    scheduled_to_zap: bool = False

    @property
    def pfn(self) -> int:
        """Host pfn of this table: ``TABLE_BASE_PFN + index``."""
        return TABLE_BASE_PFN + self.index

    @property
    def level(self) -> int:
        """The table's level (from its role word): 1 for a table of 4K leaves, up to the root's."""
        return self.role & ROLE_LEVEL_MASK

    @property
    def invalid(self) -> bool:
        """The role's invalid bit (a root that was invalidated)."""
        return bool(self.role & ROLE_INVALID)

    @property
    def is_mirror(self) -> bool:
        """The role's ``is_mirror`` bit (a table of a TD's mirror root)."""
        return bool(self.role & ROLE_IS_MIRROR)


class Arena:
    """Every table ever handed out, by index; the live ones also in ``live``."""

    def __init__(self) -> None:
        self.spt: list[list[int]] = []
        self.live: dict[int, MmuPage] = {}
        self.reusable: list[int] = []  # LIFO stack of free table indices
        self.deferred: list[int] = []  # freed during the current operation
        self.peak_live = 0

    def alloc(self, role: int, gfn: int) -> MmuPage:
        """Take a table: the most recently freed reusable one, else the next new one."""
        if self.reusable:
            index = self.reusable.pop()
            spt = self.spt[index]
            spt[:] = [SHADOW_NONPRESENT_VALUE] * SPTE_ENT_PER_PAGE
        else:
            index = len(self.spt)
            spt = [SHADOW_NONPRESENT_VALUE] * SPTE_ENT_PER_PAGE
            self.spt.append(spt)
        sp = MmuPage(index=index, spt=spt, role=role, gfn=gfn)
        self.live[index] = sp
        self.peak_live = max(self.peak_live, len(self.live))
        return sp

    def free(self, sp: MmuPage) -> None:
        """Free after the grace period: reusable once the current operation ends."""
        del self.live[sp.index]
        self.deferred.append(sp.index)

    def free_unpublished(self, sp: MmuPage) -> None:
        """A table that never became visible (lost cmpxchg, failed hook) is reusable at once."""
        del self.live[sp.index]
        self.reusable.append(sp.index)

    def end_grace_period(self) -> None:
        """Quiescent point: deferred frees join the reusable stack in free order."""
        self.reusable.extend(self.deferred)
        self.deferred.clear()

    def child_sp(self, spte: int) -> MmuPage:
        """The live table a non-leaf SPTE points to (``spte_to_child_sp``)."""
        index = spte_to_pfn(spte) - TABLE_BASE_PFN
        sp = self.live.get(index)
        if sp is None:
            raise InvariantError(
                f"non-leaf SPTE {spte:#x} points to pfn {spte_to_pfn(spte):#x}, not a live table"
            )
        return sp

    def tables(self) -> list[list[int]]:
        """Copy of the arena: row *i* is the table at host pfn ``TABLE_BASE_PFN + i``."""
        return [list(t) for t in self.spt]

    def check(self) -> None:
        """Every table is exactly one of live / deferred / reusable, between operations."""
        if self.deferred:
            raise InvariantError(f"deferred frees left over after an operation: {self.deferred}")
        if len(set(self.reusable)) != len(self.reusable):
            raise InvariantError("a table is on the reusable stack twice")
        if set(self.reusable) & set(self.live):
            raise InvariantError("a live table is also on the reusable stack")
        if len(self.reusable) + len(self.live) != len(self.spt):
            raise InvariantError("arena tables lost: live + reusable != allocated")
