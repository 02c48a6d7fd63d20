"""Invariants of the model: what ``ReferenceVM.check()`` audits between operations.

A live VM: the arena's bookkeeping, root reference counts, every table reachable exactly once
with the role of its parent, every leaf inside one memslot with the pfn, level and bits it
must have (none writable in a read-only memslot, over a write-tracked gfn or over a shared
page the host mapped read-only), the page
counters, the list of possible NX huge pages against ``nx_lpage_splits``, (TDX, SW mirror)
the mirror tree equal to the S-EPT, and in a memslot that logs dirty pages every page under a
writable leaf marked dirty (with PML, a 4K leaf whose D is clear is armed instead).  After
destroy: nothing left behind.
"""

from __future__ import annotations

from collections.abc import Callable

from .arena import ROLE_INVALID, ROLE_LEVEL_MASK, TABLE_BASE_PFN, Arena, MmuPage
from .attrs import PrivateRanges
from .errors import InvariantError
from .memslot import Memslots
from .spte import (
    PG_LEVEL_1G,
    PG_LEVEL_2M,
    PG_LEVEL_4K,
    SHADOW_ACC_TRACK_SAVED_BITS_MASK,
    SHADOW_ACC_TRACK_SAVED_BITS_SHIFT,
    SHADOW_NONPRESENT_VALUE,
    SPTE_ACCESSED,
    SPTE_DIRTY,
    SPTE_EXECUTABLE,
    SPTE_HOST_WRITABLE,
    SPTE_MMU_WRITABLE,
    SPTE_WRITABLE,
    is_access_track_spte,
    is_frozen_spte,
    is_last_spte,
    is_mmio_spte,
    is_shadow_present_pte,
    make_leaf_spte,
    pages_per_hpage,
    restore_acc_track_spte,
    spte_ad_enabled,
    spte_to_pfn,
)
from .stats import PAGES_STAT, Ctx
from .tdp_mmu import TdpMmu
from .vendor.tdx_module import TdxModule


def check_live(
    *,
    arena: Arena,
    tdp_mmu: TdpMmu,
    ctx: Ctx,
    slots: Memslots,
    attrs: PrivateRanges,
    confidential: bool,
    sept: TdxModule | None,
    private_max_level: int = PG_LEVEL_1G,
) -> None:
    """Raise :class:`InvariantError` if the state of a live VM is inconsistent.

    ``private_max_level``: the largest level a leaf of a mirror root may have (a TD's: 4K,
    or 2M with ``huge_pages``)."""

    def fail(msg: str) -> None:
        raise InvariantError(msg)

    # Arena: every table is exactly one of live / deferred / reusable.
    arena.check()

    # Roots and references (a vCPU holds its direct root and, on a TD, the mirror root).
    refs: dict[int, int] = {}
    for root in [*tdp_mmu.vcpu_root, *tdp_mmu.vcpu_mirror_root]:
        if root is not None:
            if root not in tdp_mmu.roots:
                fail(f"a vCPU holds root pfn {root.pfn:#x}, which is not on the root list")
            refs[root.index] = refs.get(root.index, 0) + 1
    for root in tdp_mmu.roots:
        if arena.live.get(root.index) is not root:
            fail(f"root pfn {root.pfn:#x} is not a live table")
        if root.level != tdp_mmu.levels:
            fail(f"root pfn {root.pfn:#x} has level {root.level}")
        expected = refs.get(root.index, 0) + (0 if root.invalid else 1)
        if root.refcount != expected:
            fail(f"root pfn {root.pfn:#x} refcount {root.refcount}, expected {expected}")

    # Tables reachable from the roots.
    leaves = dict.fromkeys(PAGES_STAT.values(), 0)
    seen: set[int] = set()
    non_root_tables = 0
    mirror_tables = 0
    mirror_leaves: list[tuple[int, int]] = []
    # (gfn, level, spte) of the writable leaves of valid direct roots, while a memslot logs.
    logging = any(slot.dirty is not None for slot in slots)
    writable: list[tuple[int, int, int]] = []

    def visit(sp: MmuPage, gfn_bits: int, audit_dirty: bool) -> None:
        nonlocal non_root_tables, mirror_tables
        level = sp.level
        span = pages_per_hpage(level)
        for i, spte in enumerate(sp.spt):
            if spte == SHADOW_NONPRESENT_VALUE:
                continue
            # The (un-aliased) gfns that index i of this table maps.
            gfn = (sp.gfn + i * span) & ~gfn_bits
            if is_frozen_spte(spte):
                fail(f"FROZEN_SPTE at rest in table pfn {sp.pfn:#x}[{i}]")
            if not is_shadow_present_pte(spte):
                if spte != SHADOW_NONPRESENT_VALUE and not is_mmio_spte(spte):
                    fail(f"odd non-present SPTE {spte:#x} at level {level} gfn {gfn:#x}")
                continue
            # Every present entry is of the VM's A/D type; without A/D it has neither A nor D.
            if spte_ad_enabled(spte) != tdp_mmu.ad_bits or (
                not tdp_mmu.ad_bits and spte & (SPTE_ACCESSED | SPTE_DIRTY)
            ):
                fail(f"SPTE {spte:#x} at level {level} gfn {gfn:#x} has the wrong A/D encoding")
            if is_last_spte(spte, level):
                _check_leaf(
                    slots,
                    attrs,
                    confidential,
                    tdp_mmu.has_mirror,
                    spte,
                    level,
                    gfn,
                    sp.is_mirror,
                    fail,
                    tdp_mmu.ad_bits,
                )
                leaves[PAGES_STAT.get(level, "pages_1g")] += 1
                if sp.is_mirror:
                    mirror_leaves.append((gfn, spte_to_pfn(spte)))
                    if level > private_max_level:
                        fail(
                            f"private leaf at gfn {gfn:#x} is level {level}; the vendor allows "
                            f"level {private_max_level}"
                        )
                if audit_dirty and spte & SPTE_WRITABLE:
                    writable.append((gfn, level, spte))
                continue
            child = arena.live.get(spte_to_pfn(spte) - TABLE_BASE_PFN)
            if child is None:
                fail(f"non-leaf {spte:#x} at level {level} gfn {gfn:#x} points to a dead table")
                return
            if child.index in seen:
                fail(f"table pfn {child.pfn:#x} is linked twice")
            if child.level != level - 1 or child.gfn != gfn:
                fail(
                    f"table pfn {child.pfn:#x} has level {child.level}/gfn {child.gfn:#x}, "
                    f"linked at level {level} gfn {gfn:#x}"
                )
            if (
                child.role & ~ROLE_LEVEL_MASK & ~ROLE_INVALID
                != sp.role & ~ROLE_LEVEL_MASK & ~ROLE_INVALID
            ):
                fail(f"table pfn {child.pfn:#x} role {child.role:#x} differs from its parent's")
            seen.add(child.index)
            non_root_tables += 1
            if sp.is_mirror:
                mirror_tables += 1
            visit(child, gfn_bits, audit_dirty)

    for root in tdp_mmu.roots:
        seen.add(root.index)
        audit = logging and not root.invalid and not root.is_mirror
        visit(root, tdp_mmu.root_gfn_bits(root.is_mirror), audit)

    for name, count in leaves.items():
        if ctx.stats[name] != count:
            fail(f"{name} = {ctx.stats[name]} but {count} present leaves are mapped")
    if ctx.stats["tdp_mmu_pages"] != non_root_tables:
        fail(
            f"tdp_mmu_pages = {ctx.stats['tdp_mmu_pages']} but {non_root_tables} tables are linked"
        )
    if sept is not None:
        # The mirror tree and the TDX module's S-EPT agree entry for entry.
        sept_tables, sept_leaves = sept.snapshot()
        if sorted(sept_leaves) != sorted(mirror_leaves):
            fail(
                f"mirror and S-EPT disagree: {len(mirror_leaves)} vs {len(sept_leaves)} "
                "private leaves"
            )
        if sept_tables != mirror_tables:
            fail(f"{mirror_tables} mirror page tables but {sept_tables} S-EPT tables")
    if len(seen) != len(arena.live):
        fail(f"{len(arena.live) - len(seen)} live tables are not reachable from any root")
    if ctx.stats["roots_allocated"] - ctx.stats["roots_freed"] != len(tdp_mmu.roots):
        fail("roots_allocated - roots_freed != number of roots")
    # NX huge page recovery: the list holds live tables only, as many as the counter says.
    nx = tdp_mmu.possible_nx_huge_pages
    if len(nx) != ctx.stats["nx_lpage_splits"]:
        fail(
            f"{len(nx)} possible NX huge pages listed, "
            f"nx_lpage_splits = {ctx.stats['nx_lpage_splits']}"
        )
    for index, sp in nx.items():
        if arena.live.get(index) is not sp:
            fail(f"table pfn {sp.pfn:#x} on the possible-NX-huge-page list is not live")
    _check_dirty_logs(slots, sorted(writable), fail)


def _check_dirty_logs(
    slots: Memslots, writable: list[tuple[int, int, int]], fail: Callable[[str], None]
) -> None:
    """Dirty logging: in a slot that logs dirty pages every page under a writable leaf of a
    valid direct root (``writable``: their ``(gfn, level, spte)``, sorted) has its bit set
    (otherwise a write would escape the log).  A huge leaf is writable only while every page
    under it counts as dirty (initially-set logs protect huge pages lazily).  With PML a 4K
    leaf whose D is clear is armed instead: the CPU logs its next write."""
    for slot in slots.by_gfn():
        log = slot.dirty
        if log is None:
            continue
        for gfn, level, spte in writable:
            end = gfn + pages_per_hpage(level)
            if end <= slot.gfn or gfn >= slot.end:
                continue
            if log.pml and level == PG_LEVEL_4K and not spte & SPTE_DIRTY:
                continue  # armed
            clear = log.first_clear(max(gfn, slot.gfn) - slot.gfn, min(end, slot.end) - slot.gfn)
            if clear is not None:
                fail(
                    f"memslot {slot.id} logs dirty pages: gfn {slot.gfn + clear:#x} is "
                    f"writable (level-{level} leaf at {gfn:#x}) but not marked dirty"
                )


def _check_leaf(
    slots: Memslots,
    attrs: PrivateRanges,
    confidential: bool,
    has_mirror: bool,
    spte: int,
    level: int,
    gfn: int,
    mirror: bool,
    fail: Callable[[str], None],
    ad_bits: bool = True,
) -> None:
    """A present leaf maps the right page of one memslot, at a level its backing allows; with
    ``ad_bits=False`` an access-tracked leaf is checked as the leaf its saved bits restore."""
    if level > PG_LEVEL_1G:
        fail(f"leaf at level {level} (gfn {gfn:#x})")
    end = gfn + pages_per_hpage(level)
    slot = slots.gfn_to_memslot(gfn)
    if slot is None or end > slot.end:
        fail(f"leaf {spte:#x} at level {level} gfn {gfn:#x} is not inside one memslot")
        return
    if level > slot.max_level:
        fail(f"level-{level} leaf at gfn {gfn:#x} in a slot backed by {slot.backing} bytes")
    # Private memory comes from guest_memfd, shared memory from the host mapping.
    private = mirror or (confidential and not has_mirror and attrs.is_private(gfn))
    pfn = slot.private_pfn(gfn) if private else slot.pfn(gfn)
    if spte_to_pfn(spte) != pfn:
        fail(f"leaf at gfn {gfn:#x} maps pfn {spte_to_pfn(spte):#x}, expected {pfn:#x}")
    if confidential and attrs.uniform(gfn, end) != private:
        fail(f"leaf at gfn {gfn:#x} (level {level}) disagrees with the memory attributes")
    if private and slot.rmp is not None:
        # SNP: a private NPT leaf needs an RMP entry assigned to that gpa, of its size.
        e = slot.rmp.get(gfn - slot.gfn)
        if not e.assigned or e.gfn != gfn:
            fail(f"private NPT leaf at gfn {gfn:#x} but its RMP entry is not assigned to it")
        if level == PG_LEVEL_2M and not e.size_2m:
            fail(f"2M private NPT leaf at gfn {gfn:#x} over 4K RMP entries")
    # The leaf make_spte builds, where only these may be off: X (an NX huge page), A (a
    # prefetch, or aged), W (protected for dirty logging; MMU-writable stays set, so a write
    # can take the fast path), D (armed by PML; a huge page recovered from such a leaf keeps
    # it clear), MMU-writable with W (a write-tracked gfn), and host-writable with W, D and
    # MMU-writable (a read-only memslot, or a shared page the host mapped read-only).
    optional = (
        SPTE_EXECUTABLE
        | SPTE_ACCESSED
        | SPTE_WRITABLE
        | SPTE_DIRTY
        | SPTE_MMU_WRITABLE
        | SPTE_HOST_WRITABLE
    )
    saved_field = SHADOW_ACC_TRACK_SAVED_BITS_MASK << SHADOW_ACC_TRACK_SAVED_BITS_SHIFT
    shape = spte
    if is_access_track_spte(spte):
        shape = restore_acc_track_spte(spte)  # the saved R must come back
    elif spte & saved_field:
        fail(f"leaf {spte:#x} at level {level} gfn {gfn:#x} has saved bits but is not tracked")
    # (A/D-disabled leaves never have A or D: visit() checks that.)
    if shape | optional != make_leaf_spte(spte_to_pfn(spte), level, ad=ad_bits) | optional:
        fail(f"leaf {spte:#x} at level {level} gfn {gfn:#x} is not a valid leaf")
    host_writable = bool(spte & SPTE_HOST_WRITABLE)
    if (spte & SPTE_WRITABLE and not spte & SPTE_MMU_WRITABLE) or (
        spte & SPTE_MMU_WRITABLE and not host_writable
    ):
        fail(f"leaf {spte:#x} at level {level} gfn {gfn:#x} has inconsistent write bits")
    if slot.readonly and (host_writable or spte & SPTE_DIRTY):
        fail(f"leaf {spte:#x} at gfn {gfn:#x} of read-only memslot {slot.id} may be written")
    # A shared page the host mapped read-only (mprotect) is mapped without host-writable, and
    # only such a page may be so in a writable memslot.
    host_ro = not private and slot.host_readonly(gfn)
    if host_ro and host_writable:
        fail(f"leaf {spte:#x} at gfn {gfn:#x} is host-writable over a page the host protected")
    if not slot.readonly and not host_writable and not host_ro:
        fail(f"leaf {spte:#x} at gfn {gfn:#x} is not host-writable in a writable memslot")
    if spte & SPTE_MMU_WRITABLE and slot.any_write_tracked(gfn, end):
        fail(
            f"level-{level} leaf {spte:#x} at gfn {gfn:#x} over a write-tracked page is "
            "MMU-writable"
        )


def check_teardown(arena: Arena, tdp_mmu: TdpMmu, slots: Memslots, sept: TdxModule | None) -> None:
    """After destroy: no roots, no KVM or S-EPT tables, no private leaf, RMP all shared."""
    if tdp_mmu.roots or arena.live:
        raise InvariantError(
            f"teardown left {len(tdp_mmu.roots)} root(s) and {len(arena.live)} table(s)"
        )
    if sept is not None:
        tables, leaves = sept.snapshot()
        if tables or leaves:
            raise InvariantError(
                f"teardown left {tables} S-EPT table(s) and {len(leaves)} private leaf(s)"
            )
    for slot in slots.by_gfn():
        if slot.rmp is not None and slot.rmp.assigned_offsets():
            off = slot.rmp.assigned_offsets()[0]
            raise InvariantError(f"teardown left gfn {slot.gfn + off:#x} assigned in the RMP")
