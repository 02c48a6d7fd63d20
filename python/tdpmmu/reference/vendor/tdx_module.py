"""A model of the TDX module as far as private memory goes: its S-EPT and SEAMCALL leaves.

The module keeps its own S-EPT tree (entries FREE, TABLE, MAPPED, PENDING, BLOCKED,
BLOCKED_TABLE; leaves at 4K, or at 2M with the huge-page series: AUG, BLOCK, REMOVE and
RECLAIM of a 2M leaf, DEMOTE into a table of 4K leaves), the TD's state (finalized, HKID,
TLB epoch) and answers each SEAMCALL with the status the real module would, so a hook design
that drives it wrongly shows up as an error rather than as silently wrong counts.
"""

from __future__ import annotations

import dataclasses

from ..arena import TABLE_BASE_PFN
from ..errors import ConfigError
from ..spte import (
    PG_LEVEL_2M,
    PG_LEVEL_4K,
    SPTE_ENT_PER_PAGE,
    pages_per_hpage,
    spte_index,
)
from ..stats import Ctx

TDX_SUCCESS = "TDX_SUCCESS"
TDX_OPERAND_BUSY = "TDX_OPERAND_BUSY"
TDX_EPT_WALK_FAILED = "TDX_EPT_WALK_FAILED"
TDX_EPT_ENTRY_STATE_INCORRECT = "TDX_EPT_ENTRY_STATE_INCORRECT"
TDX_TLB_TRACKING_NOT_DONE = "TDX_TLB_TRACKING_NOT_DONE"
TDX_OP_STATE_INCORRECT = "TDX_OP_STATE_INCORRECT"
TDX_OPERAND_INVALID = "TDX_OPERAND_INVALID"

#: S-EPT entry states (FREE is ``None``); BLOCKED entries remember the TLB epoch.
SEPT_TABLE, SEPT_MAPPED, SEPT_PENDING = "TABLE", "MAPPED", "PENDING"
SEPT_BLOCKED, SEPT_BLOCKED_TABLE = "BLOCKED", "BLOCKED_TABLE"
_EPOCH_MASK = 0x7FF


@dataclasses.dataclass(frozen=True)
class SeptEntry:
    """One S-EPT entry that is not FREE: its state (``SEPT_TABLE``, ``SEPT_MAPPED``,
    ``SEPT_PENDING``, ``SEPT_BLOCKED``, ``SEPT_BLOCKED_TABLE``), pfn and blocking epoch."""

    state: str
    pfn: int  # the mapped page, or the S-EPT table's host pfn
    epoch: int = 0  # TLB epoch in which the entry was blocked


class TdxModule:
    """The TDX module as far as private memory goes.

    It keeps the TD's state (finalized, HKID, TLB epoch) and its own S-EPT tree, in a page
    arena of its own (table *i* at host pfn ``TABLE_BASE_PFN + i``; index 0 is the S-EPT
    root, which belongs to the TD and is never freed).  Every SEAMCALL checks its
    preconditions and answers with a status instead of trusting KVM; each is counted under
    its leaf name and charged.  ``measure`` makes every PAGE.ADD extend the measurement.
    """

    def __init__(self, ctx: Ctx, levels: int, measure: bool) -> None:
        self.ctx = ctx
        self.levels = levels
        self.measure = measure
        self._tables: list[list[SeptEntry | None]] = []
        self._reusable: list[int] = []
        self.root = self._alloc_table()
        self.finalized = False
        self.hkid_assigned = True
        self.epoch = 1
        self.kicked_epoch = 0  # epoch at which every vCPU last left the guest
        self.nr_premapped = 0  # v6.16: mapped before finalize, PAGE.ADD still to come

    # -- the module's page arena ---------------------------------------------------------
    def _alloc_table(self) -> int:
        if self._reusable:
            index = self._reusable.pop()
            self._tables[index] = [None] * SPTE_ENT_PER_PAGE
        else:
            index = len(self._tables)
            self._tables.append([None] * SPTE_ENT_PER_PAGE)
        return index

    def _free_table(self, index: int) -> None:
        self._reusable.append(index)

    def _seamcall(self, leaf: str, cost: str, status: str) -> str:
        """Account one SEAMCALL (or TDCALL) leaf that answered ``status``."""
        self.ctx.count(leaf)
        self.ctx.charge(cost)
        if status == TDX_OPERAND_BUSY:
            self.ctx.count("seamcall_busy")
        return status

    def _sept_walk(self, gfn: int, level: int) -> tuple[list[SeptEntry | None], int] | str:
        """The S-EPT table and index of ``gfn``'s entry at ``level``, or EPT_WALK_FAILED."""
        table = self._tables[self.root]
        for lv in range(self.levels, level, -1):
            e = table[spte_index(gfn, lv)]
            if e is None or e.state != SEPT_TABLE:
                return TDX_EPT_WALK_FAILED
            table = self._tables[e.pfn - TABLE_BASE_PFN]
        return table, spte_index(gfn, level)

    # -- SEAMCALL leaves -----------------------------------------------------------------
    def tdh_mem_sept_add(self, gfn: int, level: int) -> str:
        """Link a new S-EPT table under the (FREE) entry at ``level``."""
        leaf, cost = "TDH.MEM.SEPT.ADD", "tdh_mem_sept_add_ns"
        if not self.hkid_assigned:
            return self._seamcall(leaf, cost, TDX_OP_STATE_INCORRECT)
        where = self._sept_walk(gfn, level)
        if isinstance(where, str):
            return self._seamcall(leaf, cost, where)
        table, i = where
        if table[i] is not None:
            return self._seamcall(leaf, cost, TDX_EPT_ENTRY_STATE_INCORRECT)
        table[i] = SeptEntry(SEPT_TABLE, TABLE_BASE_PFN + self._alloc_table())
        self.ctx.count("sept_tables")
        return self._seamcall(leaf, cost, TDX_SUCCESS)

    def tdh_mem_page_aug(self, gfn: int, pfn: int, level: int = PG_LEVEL_4K) -> str:
        """Runtime: add a page PENDING at ``level`` (4K, or 2M: the guest accepts it)."""
        return self._leaf_install(gfn, pfn, aug=True, level=level)

    def tdh_mem_page_add(self, gfn: int, pfn: int) -> str:
        """Initial image (before finalize): add a 4K page MAPPED, measured if asked."""
        return self._leaf_install(gfn, pfn, aug=False, level=PG_LEVEL_4K)

    def _leaf_install(self, gfn: int, pfn: int, aug: bool, level: int) -> str:
        leaf, cost = (
            ("TDH.MEM.PAGE.AUG", "tdh_mem_page_aug_ns")
            if aug
            else ("TDH.MEM.PAGE.ADD", "tdh_mem_page_add_ns")
        )
        if not self.hkid_assigned or self.finalized != aug:
            return self._seamcall(leaf, cost, TDX_OP_STATE_INCORRECT)
        if level > (PG_LEVEL_2M if aug else PG_LEVEL_4K):  # PAGE.ADD is 4K only
            return self._seamcall(leaf, cost, TDX_OPERAND_INVALID)
        where = self._sept_walk(gfn, level)
        if isinstance(where, str):
            return self._seamcall(leaf, cost, where)
        table, i = where
        if table[i] is not None:
            return self._seamcall(leaf, cost, TDX_EPT_ENTRY_STATE_INCORRECT)
        table[i] = SeptEntry(SEPT_PENDING if aug else SEPT_MAPPED, pfn)
        status = self._seamcall(leaf, cost, TDX_SUCCESS)
        if not aug and self.measure:
            for _ in range(16):  # one TDH.MR.EXTEND per 256 bytes
                self._seamcall("TDH.MR.EXTEND", "tdh_mr_extend_ns", TDX_SUCCESS)
        return status

    def tdg_mem_page_accept(self, gfn: int) -> None:
        """The guest's TDG.MEM.PAGE.ACCEPT: a PENDING page (4K or 2M) becomes MAPPED.  A 2M
        page is cleared whole: one TDCALL, charged once per 4K page."""
        found = self.leaf_entry(gfn)
        if found is None:
            return
        level, table, i = found
        e = table[i]
        assert e is not None
        if e.state == SEPT_PENDING:
            table[i] = SeptEntry(SEPT_MAPPED, e.pfn)
            self._seamcall("TDG.MEM.PAGE.ACCEPT", "tdg_mem_page_accept_ns", TDX_SUCCESS)
            self.ctx.charge("tdg_mem_page_accept_ns", pages_per_hpage(level) - 1)

    def leaf_entry(self, gfn: int) -> tuple[int, list[SeptEntry | None], int] | None:
        """The leaf (MAPPED, PENDING or BLOCKED, at 4K or 2M) mapping ``gfn``: its level,
        table and index; None if there is none."""
        for level in (PG_LEVEL_4K, PG_LEVEL_2M):
            where = self._sept_walk(gfn, level)
            if isinstance(where, str):
                continue
            table, i = where
            e = table[i]
            if e is not None and e.state in (SEPT_MAPPED, SEPT_PENDING, SEPT_BLOCKED):
                return level, table, i
            return None
        return None

    def tdh_mem_range_block(self, gfn: int, level: int) -> str:
        """Block a mapped/pending leaf (4K or 2M) or a table entry, in the current TLB epoch."""
        leaf, cost = "TDH.MEM.RANGE.BLOCK", "tdh_mem_range_block_ns"
        where = self._sept_walk(gfn, level)
        if isinstance(where, str):
            return self._seamcall(leaf, cost, where)
        table, i = where
        e = table[i]
        epoch = self.epoch & _EPOCH_MASK
        if e is not None and e.state in (SEPT_MAPPED, SEPT_PENDING) and level <= PG_LEVEL_2M:
            table[i] = SeptEntry(SEPT_BLOCKED, e.pfn, epoch)
        elif e is not None and e.state == SEPT_TABLE:
            table[i] = SeptEntry(SEPT_BLOCKED_TABLE, e.pfn, epoch)
        else:
            return self._seamcall(leaf, cost, TDX_EPT_ENTRY_STATE_INCORRECT)
        return self._seamcall(leaf, cost, TDX_SUCCESS)

    def tdh_mem_track(self) -> str:
        """Start a new TLB epoch (only a runnable TD has one)."""
        if not self.finalized:
            return self._seamcall("TDH.MEM.TRACK", "tdh_mem_track_ns", TDX_OP_STATE_INCORRECT)
        self.epoch += 1
        return self._seamcall("TDH.MEM.TRACK", "tdh_mem_track_ns", TDX_SUCCESS)

    def vcpus_left_guest(self) -> None:
        """Every vCPU was forced out of the guest: none still runs in an old epoch."""
        self.kicked_epoch = self.epoch

    def tracking_done(self, e: SeptEntry) -> bool:
        """Blocked in an older epoch and every vCPU left the guest since the last TRACK."""
        return not self.finalized or (
            e.epoch != self.epoch & _EPOCH_MASK and self.kicked_epoch == self.epoch
        )

    def tdh_mem_page_remove(self, gfn: int, level: int = PG_LEVEL_4K) -> tuple[str, int]:
        """Remove a BLOCKED page (4K or 2M) whose TLB tracking is done; returns (status,
        pfn)."""
        leaf, cost = "TDH.MEM.PAGE.REMOVE", "tdh_mem_page_remove_ns"
        where = self._sept_walk(gfn, level)
        if isinstance(where, str):
            return self._seamcall(leaf, cost, where), 0
        table, i = where
        e = table[i]
        if e is None or e.state != SEPT_BLOCKED:
            return self._seamcall(leaf, cost, TDX_EPT_ENTRY_STATE_INCORRECT), 0
        if not self.tracking_done(e):
            return self._seamcall(leaf, cost, TDX_TLB_TRACKING_NOT_DONE), 0
        table[i] = None
        return self._seamcall(leaf, cost, TDX_SUCCESS), e.pfn

    def tdh_mem_page_demote(self, gfn: int) -> str:
        """Split a BLOCKED 2M leaf whose TLB tracking is done into a new S-EPT table of 512
        MAPPED 4K leaves."""
        leaf, cost = "TDH.MEM.PAGE.DEMOTE", "tdh_mem_page_demote_ns"
        where = self._sept_walk(gfn, PG_LEVEL_2M)
        if isinstance(where, str):
            return self._seamcall(leaf, cost, where)
        table, i = where
        e = table[i]
        if e is None or e.state != SEPT_BLOCKED:
            return self._seamcall(leaf, cost, TDX_EPT_ENTRY_STATE_INCORRECT)
        if not self.tracking_done(e):
            return self._seamcall(leaf, cost, TDX_TLB_TRACKING_NOT_DONE)
        child = self._alloc_table()
        self._tables[child] = [SeptEntry(SEPT_MAPPED, e.pfn + j) for j in range(SPTE_ENT_PER_PAGE)]
        table[i] = SeptEntry(SEPT_TABLE, TABLE_BASE_PFN + child)
        self.ctx.count("sept_tables")
        return self._seamcall(leaf, cost, TDX_SUCCESS)

    def tdh_phymem_page_wbinvd(self) -> str:
        """TDH.PHYMEM.PAGE.WBINVD of a page that left the TD; returns ``TDX_SUCCESS``."""
        return self._seamcall("TDH.PHYMEM.PAGE.WBINVD", "tdh_phymem_page_wbinvd_ns", TDX_SUCCESS)

    def sept_table_entry(self, gfn: int, level: int) -> tuple[list[SeptEntry | None], int] | str:
        """Where the entry linking the S-EPT table for (gfn, level - 1) lives."""
        return self._sept_walk(gfn, level)

    def tdh_mem_sept_remove(self, gfn: int, level: int) -> str:
        """Pre-upstream: take an empty, blocked and tracked S-EPT table out of a live TD."""
        where = self._sept_walk(gfn, level)
        ok = False
        if not isinstance(where, str):
            table, i = where
            e = table[i]
            if e is not None and e.state == SEPT_BLOCKED_TABLE:
                child = e.pfn - TABLE_BASE_PFN
                ok = all(x is None for x in self._tables[child]) and self.tracking_done(e)
                if ok:
                    table[i] = None
                    self._free_table(child)
                    self.ctx.count("sept_tables", -1)
        status = TDX_SUCCESS if ok else TDX_EPT_ENTRY_STATE_INCORRECT
        return self._seamcall("TDH.MEM.SEPT.REMOVE", "tdh_mem_sept_remove_ns", status)

    def tdh_phymem_page_reclaim_leaf(self, gfn: int) -> int | None:
        """After the HKID is gone (KVM_TDX_TERMINATE_VM's order): take the private page
        mapping ``gfn`` (4K or 2M) back; returns its level (the caller clears its 4K pages),
        or None if the S-EPT maps no page there."""
        found = self.leaf_entry(gfn)
        if found is None:
            return None
        level, table, i = found
        self._seamcall("TDH.PHYMEM.PAGE.RECLAIM", "tdh_phymem_page_reclaim_ns", TDX_SUCCESS)
        table[i] = None
        return level

    def tdh_phymem_page_reclaim(self, gfn: int, level: int) -> int:
        """After the HKID is gone: take the S-EPT table linked at (gfn, level) back.

        Returns the table's host pfn (the caller clears the page).
        """
        where = self._sept_walk(gfn, level)
        assert not isinstance(where, str)
        table, i = where
        e = table[i]
        assert e is not None
        self._seamcall("TDH.PHYMEM.PAGE.RECLAIM", "tdh_phymem_page_reclaim_ns", TDX_SUCCESS)
        table[i] = None
        self._free_table(e.pfn - TABLE_BASE_PFN)
        self.ctx.count("sept_tables", -1)
        return e.pfn

    def finalize(self) -> None:
        """KVM_TDX_FINALIZE_VM (TDH.MR.FINALIZE): the TD becomes runnable."""
        if self.finalized:
            raise ConfigError("finalize: the TD is already finalized")
        if self.nr_premapped:
            raise ConfigError(
                f"finalize: {self.nr_premapped} premapped page(s) still lack TDH.MEM.PAGE.ADD"
            )
        self.finalized = True

    def release_hkid(self, vcpus: int) -> None:
        """``tdx_mmu_release_hkid``: flush every vCPU, write back caches, free the key."""
        if not self.hkid_assigned:
            return
        for _ in range(vcpus):
            self._seamcall("TDH.VP.FLUSH", "tdh_vp_flush_ns", TDX_SUCCESS)
        self._seamcall("TDH.MNG.VPFLUSHDONE", "tdh_mng_vpflushdone_ns", TDX_SUCCESS)
        self._seamcall("TDH.PHYMEM.CACHE.WB", "tdh_phymem_cache_wb_ns", TDX_SUCCESS)
        self._seamcall("TDH.MNG.KEY.FREEID", "tdh_mng_key_freeid_ns", TDX_SUCCESS)
        self.hkid_assigned = False

    # -- introspection -------------------------------------------------------------------
    def sept_entries(self) -> list[tuple[int, int, str, int]]:
        """Every non-FREE entry in tree order: (gfn, level, state, pfn)."""
        out: list[tuple[int, int, str, int]] = []

        def visit(index: int, level: int, base: int) -> None:
            for i, e in enumerate(self._tables[index]):
                if e is None:
                    continue
                gfn = base + i * pages_per_hpage(level)
                out.append((gfn, level, e.state, e.pfn))
                if e.state in (SEPT_TABLE, SEPT_BLOCKED_TABLE):
                    visit(e.pfn - TABLE_BASE_PFN, level - 1, gfn)

        visit(self.root, self.levels, 0)
        return out

    def snapshot(self) -> tuple[int, list[tuple[int, int]]]:
        """S-EPT tables below the root, and every leaf (gfn, pfn) that is not FREE."""
        tables = 0
        leaves: list[tuple[int, int]] = []
        for gfn, _level, state, pfn in self.sept_entries():
            if state in (SEPT_TABLE, SEPT_BLOCKED_TABLE):
                tables += 1
            else:
                leaves.append((gfn, pfn))
        return tables, leaves


# --------------------------------------------------------------------------------------
