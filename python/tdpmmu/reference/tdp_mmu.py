"""The TDP MMU (KVM's tdp_mmu.c): roots, SPTE writers, map, zaps, splits, and the walks
behind dirty logging (write-protection, or clearing D for PML), page write tracking, aging,
eager splitting, huge-page recovery and the NX huge page recovery worker.

:class:`TdpMmu` owns the roots and writes every SPTE.  Installs made under the shared
``mmu_lock`` go through :meth:`TdpMmu.tdp_mmu_set_spte_atomic` (a cmpxchg against the
iterator's snapshot; on a table whose changes call the external hooks the entry is FROZEN
while the hook runs and becomes present only if it succeeded); writes under the exclusive
lock through :meth:`TdpMmu.tdp_mmu_iter_set_spte`.  Both end in
:meth:`TdpMmu.handle_changed_spte`, which keeps the page counters and tears down unlinked
tables (:meth:`TdpMmu.handle_removed_pt`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from .arena import (
    ROLE_ACCESS_SHIFT,
    ROLE_CR0_WP,
    ROLE_DIRECT,
    ROLE_EFER_NX,
    ROLE_INVALID,
    ROLE_IS_MIRROR,
    ROLE_LEVEL_MASK,
    Arena,
    MmuPage,
)
from .errors import InvariantError, Ret
from .hooks import HOOK_OK, ExternalHooks
from .memslot import Memslot, Memslots
from .spte import (
    ACC_ALL,
    FROZEN_SPTE,
    PG_LEVEL_1G,
    PG_LEVEL_2M,
    PG_LEVEL_4K,
    PT64_ROOT_MAX_LEVEL,
    SHADOW_NONPRESENT_VALUE,
    SPTE_DIRTY,
    SPTE_ENT_PER_PAGE,
    SPTE_EXECUTABLE,
    SPTE_HOST_WRITABLE,
    SPTE_LEVEL_BITS,
    SPTE_MMU_WRITABLE,
    SPTE_READABLE,
    SPTE_WRITABLE,
    is_access_track_spte,
    is_accessed_spte,
    is_frozen_spte,
    is_large_pte,
    is_last_spte,
    is_mmio_spte,
    is_shadow_present_pte,
    make_leaf_spte,
    make_mmio_spte,
    make_nonleaf_spte,
    make_small_spte,
    mark_spte_for_access_track,
    pages_per_hpage,
    spte_index,
    spte_to_pfn,
)
from .stats import Ctx
from .tdp_iter import TdpIter

# Root-type filters (KVM_*_ROOTS).
KVM_INVALID_ROOTS = 1 << 0
KVM_DIRECT_ROOTS = 1 << 1
KVM_MIRROR_ROOTS = 1 << 2
KVM_VALID_ROOTS = KVM_DIRECT_ROOTS | KVM_MIRROR_ROOTS
KVM_ALL_ROOTS = KVM_VALID_ROOTS | KVM_INVALID_ROOTS


def is_access_allowed(spte: int, write: bool, exec: bool) -> bool:
    """Whether the present leaf ``spte`` allows an access: R (which every leaf but an
    access-tracked one has), and for a write W, for an instruction fetch X, for a write that
    is also a fetch both (the engine's ``access_allowed``; KVM's ``is_access_allowed`` looks
    at X alone for a fetch, as its faults are never both)."""
    return (
        bool(spte & SPTE_READABLE)
        and (not write or bool(spte & SPTE_WRITABLE))
        and (not exec or bool(spte & SPTE_EXECUTABLE))
    )


def tdp_root_role(levels: int, *, is_mirror: bool = False) -> int:
    """``kvm_calc_tdp_mmu_root_page_role`` for a direct (or mirror) TDP root with A/D."""
    role = levels | ROLE_DIRECT | (ACC_ALL << ROLE_ACCESS_SHIFT) | ROLE_EFER_NX | ROLE_CR0_WP
    if is_mirror:
        role |= ROLE_IS_MIRROR
    return role


@dataclasses.dataclass
class KvmPageFault:
    """``struct kvm_page_fault``: the parts the model needs."""

    gfn: int
    write: bool
    exec: bool
    prefetch: bool
    slot: Memslot | None
    private: bool = False
    max_level: int = PG_LEVEL_1G
    req_level: int = PG_LEVEL_4K
    goal_level: int = PG_LEVEL_4K
    huge_page_disallowed: bool = False
    #: the host mapping may be written (False in a KVM_MEM_READONLY slot): the SPTE gets W.
    map_writable: bool = True
    #: the gfn is write-tracked (``kvm_gfn_is_write_tracked``): the SPTE is made read-only
    #: and a write returns RET_PF_WRITE_PROTECTED.
    write_tracked: bool = False
    # Filled at the target level, for the caller's Fault result.
    level: int = PG_LEVEL_4K
    spte: int = SHADOW_NONPRESENT_VALUE


class TdpMmu:
    """The roots of one VM and everything that writes their SPTEs.

    ``hooks`` is where external-hook calls go; ``slots`` only gives the host pfns of new
    leaves and the MMIO generation.
    """

    def __init__(
        self,
        *,
        arena: Arena,
        ctx: Ctx,
        hooks: ExternalHooks,
        slots: Memslots,
        levels: int,
        vcpus: int,
        has_mirror: bool,
        gfn_direct_bits: int,
        max_gfn: int,
        nx_huge_pages: bool,
        ad_bits: bool = True,
    ) -> None:
        self.arena = arena
        self.ctx = ctx
        self.hooks = hooks
        self.slots = slots
        self.levels = levels
        self.vcpus = vcpus
        #: a mirror root for private memory (TDX, and the SW_PROTECTED mirror variant).
        self.has_mirror = has_mirror
        #: ``kvm_gfn_direct_bits``: the direct root of a TD maps shared gfn g at g | bit.
        self.gfn_direct_bits = gfn_direct_bits
        self.max_gfn = max_gfn
        self.nx_huge_pages = nx_huge_pages
        #: KVM's ``enable_ept_ad_bits``; False: A/D-disabled SPTEs, aging by access tracking.
        self.ad_bits = ad_bits
        self.roots: list[MmuPage] = []  # kvm->arch.tdp_mmu_roots, newest first
        self.vcpu_root: list[MmuPage | None] = [None] * vcpus  # mmu->root.hpa per vCPU
        self.vcpu_mirror_root: list[MmuPage | None] = [None] * vcpus  # mmu->mirror_root_hpa
        #: ``possible_nx_huge_pages``: the tables exec faults had to create under the NX huge
        #: page mitigation, by arena index, oldest first (``nx_lpage_splits`` counts them).
        self.possible_nx_huge_pages: dict[int, MmuPage] = {}

    # ==================================================================================
    # Roots (spec §6)
    # ==================================================================================

    def root_role(self, mirror: bool = False) -> int:
        """The role word of a root (``mirror=True``: with ``is_mirror``)."""
        return tdp_root_role(self.levels, is_mirror=mirror)

    def root_gfn_bits(self, mirror: bool) -> int:
        """``kvm_gfn_root_bits``: the shared bit for the direct root of a TD, else 0."""
        return 0 if mirror else self.gfn_direct_bits

    def valid_direct_root(self) -> MmuPage | None:
        """The newest valid direct root, or None."""
        return self.current_root(mirror=False)

    def current_root(self, mirror: bool) -> MmuPage | None:
        """The newest valid root of the kind (what walk/spte inspect)."""
        for root in self.roots:
            if not root.invalid and root.is_mirror == mirror:
                return root
        return None

    def tdp_mmu_root_match(self, root: MmuPage, types: int) -> bool:
        """Whether ``root`` is one of the ``types`` (``KVM_*_ROOTS`` bits)."""
        if root.invalid:
            return bool(types & KVM_INVALID_ROOTS)
        return bool(types & (KVM_MIRROR_ROOTS if root.is_mirror else KVM_DIRECT_ROOTS))

    def kvm_tdp_mmu_get_root(self, root: MmuPage) -> bool:
        """Take a reference to ``root`` unless its refcount is 0; returns whether it did."""
        if root.refcount == 0:
            return False
        root.refcount += 1
        return True

    def kvm_tdp_mmu_put_root(self, root: MmuPage) -> None:
        """Drop one reference to ``root``; at 0 the (invalid) root is freed (KVM_BUG_ON if still
        valid)."""
        if root.refcount <= 0:
            self.ctx.kvm_bug_on(f"put of root pfn {root.pfn:#x} with refcount {root.refcount}")
            return
        root.refcount -= 1
        if root.refcount:
            return
        if not root.invalid:
            self.ctx.kvm_bug_on("root refcount reached zero while the root is still valid")
        self.roots.remove(root)
        self.ctx.count("roots_freed")
        self.arena.free(root)

    def kvm_tdp_mmu_alloc_root(self, mirror: bool = False) -> MmuPage:
        """Reuse a valid root with the identical role, else create one (refcount 2)."""
        role = self.root_role(mirror)
        for root in self.roots:
            if not root.invalid and root.role == role and self.kvm_tdp_mmu_get_root(root):
                return root
        root = self.arena.alloc(role, 0)
        root.refcount = 2  # this vCPU's reference + the TDP MMU's own
        self.roots.insert(0, root)
        self.ctx.count("roots_allocated")
        return root

    def kvm_mmu_load(self, vcpu: int) -> None:
        """``mmu_alloc_direct_roots``: the mirror root first (if the VM has one and this vCPU
        has none yet), then the direct root (first run, or after a fast zap)."""
        if self.has_mirror and self.vcpu_mirror_root[vcpu] is None:
            self.vcpu_mirror_root[vcpu] = self.kvm_tdp_mmu_alloc_root(mirror=True)
        if self.vcpu_root[vcpu] is None:
            self.vcpu_root[vcpu] = self.kvm_tdp_mmu_alloc_root(mirror=False)

    def kvm_mmu_free_obsolete_roots(self) -> None:
        """KVM_REQ_MMU_FREE_OBSOLETE_ROOTS, handled right away for every vCPU."""
        for vcpu, root in enumerate(self.vcpu_root):
            if root is not None and root.invalid:
                self.vcpu_root[vcpu] = None
                self.kvm_tdp_mmu_put_root(root)

    def kvm_tdp_mmu_invalidate_roots(self, types: int) -> None:
        """Mark every valid root of ``types`` invalid and scheduled to zap."""
        for root in self.roots:
            if not root.invalid and self.tdp_mmu_root_match(root, types):
                root.role |= ROLE_INVALID
                root.scheduled_to_zap = True

    def kvm_tdp_mmu_zap_invalidated_roots(self, shared: bool) -> None:
        """Zap every root scheduled to zap (``shared``: with the atomic setter), then drop the TDP
        MMU's reference."""
        scheduled = [r for r in self.roots if r.scheduled_to_zap]
        for root in scheduled:
            root.scheduled_to_zap = False
        for root in scheduled:
            self.tdp_mmu_zap_root(root, shared)
            self.kvm_tdp_mmu_put_root(root)  # the TDP MMU's own reference

    def kvm_mmu_zap_all_fast(self) -> None:
        # External page tables cannot be fast-zapped: only direct roots are obsoleted.
        """``kvm_mmu_zap_all_fast``: invalidate the direct roots, vCPUs drop them, zap them
        (shared)."""
        self.kvm_tdp_mmu_invalidate_roots(KVM_DIRECT_ROOTS)
        self.kvm_mmu_free_obsolete_roots()
        self.kvm_tdp_mmu_zap_invalidated_roots(shared=True)

    def kvm_mmu_uninit_tdp_mmu(self) -> None:
        """VM teardown: every vCPU drops its roots (``kvm_mmu_destroy``; the mirror root
        reference goes only here), then every root is invalidated and zapped exclusively."""
        for holders in (self.vcpu_root, self.vcpu_mirror_root):
            for vcpu, root in enumerate(holders):
                if root is not None:
                    holders[vcpu] = None
                    root.role |= ROLE_INVALID
                    self.kvm_tdp_mmu_put_root(root)
        for root in self.roots:
            root.role |= ROLE_INVALID
        for root in list(self.roots):
            self.tdp_mmu_zap_root(root, shared=False)
            self.kvm_tdp_mmu_put_root(root)

    def tdp_account_mmu_page(self, sp: MmuPage) -> None:
        """Count a new child table ``sp`` in ``tdp_mmu_pages``."""
        self.ctx.count("tdp_mmu_pages")

    def tdp_unaccount_mmu_page(self, sp: MmuPage) -> None:
        """Uncount a freed child table ``sp`` from ``tdp_mmu_pages``."""
        self.ctx.count("tdp_mmu_pages", -1)

    # ==================================================================================
    # SPTE writers, the FROZEN protocol and change propagation (spec §4)
    # ==================================================================================

    def tdp_mmu_set_spte_atomic(self, it: TdpIter, new_spte: int) -> bool:
        """Shared-lock install: cmpxchg from ``it.old_spte``; False (= -EBUSY) if it lost."""
        if is_frozen_spte(it.old_spte):
            raise InvariantError("atomic SPTE update from a FROZEN snapshot")
        if self.hooks.fires(it.sp) and not is_frozen_spte(new_spte):
            return self.set_external_spte_present(it, new_spte)
        if it.read() != it.old_spte:
            it.old_spte = it.read()
            return False
        it.write(new_spte)
        self.handle_changed_spte(it.gfn, it.old_spte, new_spte, it.level, shared=True)
        it.old_spte = new_spte
        return True

    def set_external_spte_present(self, it: TdpIter, new_spte: int) -> bool:
        """The freeze protocol: FROZEN while the hook runs; present only once it succeeded."""
        old = it.old_spte
        if not is_shadow_present_pte(new_spte):
            self.ctx.kvm_bug_on("atomic zap of a mirror SPTE")
            return False
        if is_shadow_present_pte(old):
            self.ctx.kvm_bug_on("atomic install over a present mirror SPTE")
            return False
        if it.read() != old:
            it.old_spte = it.read()
            return False
        it.write(FROZEN_SPTE)
        if is_last_spte(new_spte, it.level):
            ret = self.hooks.set_external_spte(it.gfn, it.level, new_spte)
        else:
            ret = self.hooks.link_external_spt(it.gfn, it.level, self.arena.child_sp(new_spte))
        if ret != HOOK_OK:
            it.write(old)  # restore: the entry was frozen, nobody else wrote it
            return False
        it.write(new_spte)
        self.handle_changed_spte(it.gfn, old, new_spte, it.level, shared=True)
        it.old_spte = new_spte
        return True

    def tdp_mmu_iter_set_spte(self, it: TdpIter, new_spte: int) -> None:
        """Exclusive-lock write (``tdp_mmu_set_spte``), then ``remove_external_spte``."""
        old = it.old_spte
        if is_frozen_spte(old) or is_frozen_spte(new_spte):
            self.ctx.kvm_bug_on("non-atomic SPTE write involving FROZEN_SPTE")
        it.write(new_spte)
        self.handle_changed_spte(it.gfn, old, new_spte, it.level, shared=False)
        if self.has_mirror and it.sp.is_mirror and is_shadow_present_pte(new_spte):
            self.ctx.kvm_bug_on("non-atomic write installed a present mirror SPTE")
        if self.hooks.fires(it.sp):
            self.remove_external_spte(it.gfn, old, it.level)
        it.old_spte = new_spte

    def remove_external_spte(self, gfn: int, old: int, level: int) -> None:
        """Leaves only: a non-leaf's subtree was handled by ``handle_removed_pt``."""
        if not is_shadow_present_pte(old) or not is_last_spte(old, level):
            return
        self.hooks.remove_external_spte(gfn, level, old)

    def handle_changed_spte(self, gfn: int, old: int, new: int, level: int, shared: bool) -> None:
        """Bookkeeping after an SPTE changed: page stats and subtree teardown."""
        was_present = is_shadow_present_pte(old)
        is_present = is_shadow_present_pte(new)
        was_leaf = was_present and is_last_spte(old, level)
        is_leaf = is_present and is_last_spte(new, level)
        pfn_changed = spte_to_pfn(old) != spte_to_pfn(new)

        if not 1 <= level <= PT64_ROOT_MAX_LEVEL or gfn % pages_per_hpage(level):
            self.ctx.kvm_bug_on(f"SPTE change at bad level/gfn ({level}, {gfn:#x})")
        if was_leaf and is_leaf and pfn_changed:
            self.ctx.kvm_bug_on(f"present leaf at gfn {gfn:#x} changed pfn ({old:#x} -> {new:#x})")
            return
        if old == new:
            return
        if not was_present and not is_present:
            return  # only MMIO and FROZEN transitions happen between non-present values
        if is_leaf != was_leaf:
            self.ctx.page_stats(level, 1 if is_leaf else -1)
        if was_present and not was_leaf and (is_leaf or not is_present or pfn_changed):
            self.handle_removed_pt(self.arena.child_sp(old), shared)

    def handle_removed_pt(self, sp: MmuPage, shared: bool) -> None:
        """Tear down a table that was just unlinked; every entry ends FROZEN.

        Entries are processed in index order, recursing into child tables, so tables are
        freed in post-order (children before their parent).  With hooks, each present leaf
        is removed from the external tree and then the external table itself is freed.
        """
        level = sp.level
        hooks = self.hooks.fires(sp)
        self.tdp_unaccount_mmu_page(sp)
        if self.has_mirror and sp.is_mirror and shared:
            self.ctx.kvm_bug_on("shared (atomic) teardown of a mirror page table")
        for i in range(SPTE_ENT_PER_PAGE):
            gfn = sp.gfn + i * pages_per_hpage(level)
            old = sp.spt[i]
            if shared:
                # Exchange unconditionally; a FROZEN value would mean a concurrent
                # installer in this dying table, which the sequential model never has.
                if is_frozen_spte(old):
                    raise InvariantError(f"FROZEN entry in removed table pfn {sp.pfn:#x}")
                sp.spt[i] = FROZEN_SPTE
            else:
                if not is_shadow_present_pte(old):
                    continue
                sp.spt[i] = FROZEN_SPTE
            if is_shadow_present_pte(old):
                self.ctx.charge("spte_update_ns")  # one SPTE update per present entry
            self.handle_changed_spte(gfn, old, FROZEN_SPTE, level, shared)
            if hooks:
                self.remove_external_spte(gfn, old, level)
        if hooks:
            self.hooks.free_external_spt(sp.gfn, level, sp)
        self.untrack_possible_nx_huge_page(sp)
        self.arena.free(sp)

    def kvm_flush_remote_tlbs(self) -> None:
        """Every request flushes; cost grows with the number of vCPUs."""
        self.ctx.count("remote_tlb_flush_requests")
        self.ctx.count("remote_tlb_flush")
        self.ctx.ledger.tlb_flush(self.vcpus)

    # ==================================================================================
    # Map: the walk to the fault's goal level (spec §3)
    # ==================================================================================

    def kvm_tdp_mmu_map(self, root: MmuPage, fault: KvmPageFault, gfn_bits: int) -> Any:
        """Walk towards ``fault.gfn``, linking or splitting tables down to the goal level."""
        for it in TdpIter(self.arena, root, PG_LEVEL_4K, fault.gfn, fault.gfn + 1, gfn_bits):
            if self.nx_huge_pages:
                self.disallowed_hugepage_adjust(fault, it.old_spte, it.level)
            if (
                root.is_mirror
                and it.level == fault.goal_level
                and it.level > PG_LEVEL_4K
                and is_shadow_present_pte(it.old_spte)
                and not is_large_pte(it.old_spte)
            ):
                # No promotion on the mirror root: a table where the fault could map huge
                # stays, and the fault maps one level down (KVM has no TDH.MEM.PAGE.PROMOTE).
                fault.goal_level -= 1
            if is_frozen_spte(it.old_spte):
                return Ret.RETRY  # another thread is mid-update
            if it.level == fault.goal_level:
                return self.tdp_mmu_map_handle_target_level(fault, it)
            if is_shadow_present_pte(it.old_spte) and not is_large_pte(it.old_spte):
                continue  # existing table: step down into it

            sp = self.arena.alloc(self.child_role(it), it.gfn)  # tdp_mmu_init_child_sp
            sp.nx_huge_page_disallowed = fault.huge_page_disallowed
            if is_shadow_present_pte(it.old_spte):
                if sp.is_mirror:
                    self.ctx.kvm_bug_on("fault would split a huge mirror SPTE")
                    self.arena.free_unpublished(sp)
                    return Ret.RETRY
                linked = self.tdp_mmu_split_huge_page(it, sp, shared=True)
            else:
                linked = self.tdp_mmu_link_sp(it, sp, shared=True)
            if not linked:
                self.arena.free_unpublished(sp)
                return Ret.RETRY
            if fault.huge_page_disallowed and fault.req_level >= it.level:
                # The mitigation forced this table where a huge page could have been.
                self.track_possible_nx_huge_page(sp)
        return Ret.RETRY

    def disallowed_hugepage_adjust(self, fault: KvmPageFault, spte: int, cur_level: int) -> None:
        """Do not replace a table that exists because of an NX split with a huge leaf."""
        if (
            cur_level > PG_LEVEL_4K
            and cur_level == fault.goal_level
            and is_shadow_present_pte(spte)
            and not is_large_pte(spte)
            and self.arena.child_sp(spte).nx_huge_page_disallowed
        ):
            fault.goal_level -= 1

    def child_role(self, it: TdpIter) -> int:
        """The role word of a table linked under iterator ``it``: the parent's, one level down."""
        parent = it.sp
        return (parent.role & ~ROLE_LEVEL_MASK) | (it.level - 1)

    def tdp_mmu_link_sp(self, it: TdpIter, sp: MmuPage, shared: bool) -> bool:
        """Publish ``sp`` in the entry under the iterator."""
        spte = make_nonleaf_spte(sp.pfn, ad=self.ad_bits)
        if shared:
            if not self.tdp_mmu_set_spte_atomic(it, spte):
                return False
        else:
            self.tdp_mmu_iter_set_spte(it, spte)
        self.tdp_account_mmu_page(sp)
        return True

    def tdp_mmu_split_huge_page(self, it: TdpIter, sp: MmuPage, shared: bool) -> bool:
        """Replace the huge leaf under the iterator by a table of 512 equivalent SPTEs."""
        huge_spte = it.old_spte
        child_level = it.level - 1
        for i in range(SPTE_ENT_PER_PAGE):
            sp.spt[i] = make_small_spte(huge_spte, child_level, i, nx_huge_pages=self.nx_huge_pages)
        self.ctx.charge("spte_update_ns", SPTE_ENT_PER_PAGE)
        if not self.tdp_mmu_link_sp(it, sp, shared):
            return False
        self.ctx.page_stats(child_level, SPTE_ENT_PER_PAGE)
        self.ctx.count("huge_page_splits")
        return True  # no TLB flush: the translation did not change

    def is_access_allowed(self, fault: KvmPageFault, spte: int) -> bool:
        """Whether the present leaf ``spte`` allows ``fault``'s access (exec needs X, write needs
        W, both for a write that is also a fetch)."""
        return is_access_allowed(spte, fault.write, fault.exec)

    def make_spte(self, fault: KvmPageFault, gfn: int, level: int) -> int:
        """The leaf SPTE for ``fault`` at (``gfn``, ``level``): guest_memfd pfn if private, else the
        host page.  Without ``map_writable`` (a read-only memslot: no ACC_WRITE) it has no W,
        no D and is neither MMU- nor host-writable; for a write-tracked gfn it has no W, no D
        and is not MMU-writable (so the fast path cannot make it writable).  With A/D bits off
        the leaf is A/D-disabled, and a pre-fault's leaf is then marked for access tracking
        last (``mark_spte_for_access_track``), as ``make_spte`` does."""
        slot = fault.slot
        assert slot is not None
        pfn = slot.private_pfn(gfn) if fault.private else slot.pfn(gfn)
        exec_ok = not (self.nx_huge_pages and level > PG_LEVEL_4K)
        spte = make_leaf_spte(pfn, level, exec=exec_ok, prefetch=fault.prefetch, ad=self.ad_bits)
        if not fault.map_writable:
            spte &= ~(SPTE_WRITABLE | SPTE_DIRTY | SPTE_MMU_WRITABLE | SPTE_HOST_WRITABLE)
        elif fault.write_tracked:
            spte &= ~(SPTE_WRITABLE | SPTE_DIRTY | SPTE_MMU_WRITABLE)
        if fault.prefetch and not self.ad_bits:
            spte = mark_spte_for_access_track(spte)
        return spte

    def tdp_mmu_map_handle_target_level(self, fault: KvmPageFault, it: TdpIter) -> Any:
        """``tdp_mmu_map_handle_target_level``: install the leaf for ``fault`` at ``it``; returns a
        ``Ret``.  A write to a write-tracked gfn returns ``WRITE_PROTECTED`` (KVM emulates it)
        once the read-only leaf is in place, also when it already was."""
        old = it.old_spte
        fault.level, fault.spte = it.level, old
        if (
            is_shadow_present_pte(old)
            and (fault.prefetch or self.is_access_allowed(fault, old))
            and is_last_spte(old, it.level)
        ):
            return Ret.SPURIOUS

        if fault.slot is None:
            new = make_mmio_spte(it.gfn, self.slots.generation)
        else:
            new = self.make_spte(fault, it.gfn, it.level)
        if new == old:
            if fault.write_tracked and fault.write:
                return Ret.WRITE_PROTECTED
            return Ret.SPURIOUS
        if not self.tdp_mmu_set_spte_atomic(it, new):
            return Ret.RETRY
        fault.spte = new
        if is_shadow_present_pte(old) and not is_last_spte(old, it.level):
            self.kvm_flush_remote_tlbs()  # kvm_flush_remote_tlbs_gfn(gfn, level)
        if fault.write_tracked and fault.write:
            return Ret.WRITE_PROTECTED
        if is_mmio_spte(new):
            self.ctx.count("pf_mmio_spte_created")
            return Ret.EMULATE
        return Ret.FIXED

    # ==================================================================================
    # Zapping (spec §5)
    # ==================================================================================

    def roots_matching(self, types: int) -> list[MmuPage]:
        """Every root of ``types`` (``KVM_*_ROOTS`` bits), newest first."""
        return [r for r in self.roots if self.tdp_mmu_root_match(r, types)]

    def tdp_mmu_zap_leafs(self, root: MmuPage, start: int, end: int) -> tuple[bool, int]:
        """Zap present leaves intersecting ``[start, end)``; tables stay in place."""
        end = min(end, self.max_gfn)
        gfn_bits = self.root_gfn_bits(root.is_mirror)
        flush, zapped = False, 0
        for it in TdpIter(self.arena, root, PG_LEVEL_4K, start, end, gfn_bits):
            if not is_shadow_present_pte(it.old_spte) or not is_last_spte(it.old_spte, it.level):
                continue
            self.tdp_mmu_iter_set_spte(it, SHADOW_NONPRESENT_VALUE)
            self.ctx.charge("spte_update_ns")
            zapped += 1
            if not root.invalid:  # stale translations in an invalid root are harmless
                flush = True
        return flush, zapped

    def kvm_tdp_mmu_zap_leafs(self, types: int, start: int, end: int) -> tuple[bool, int]:
        """Leaf zap of ``[start, end)`` in every root of ``types``.  Returns (flush needed,
        leaves zapped); the caller flushes, after the vendor finished the zap (``zap_end``)."""
        flush, zapped = False, 0
        for root in self.roots_matching(types):
            f, n = self.tdp_mmu_zap_leafs(root, start, end)
            flush, zapped = flush or f, zapped + n
        return flush, zapped

    def kvm_tdp_mmu_unmap_gfn_range(
        self, start: int, end: int, *, private: bool, shared: bool
    ) -> tuple[bool, int]:
        """The attribute filter picks the roots (TD: PRIVATE -> mirror, SHARED -> direct;
        other VMs: the direct root), invalid roots always included.  The zap acts for private
        memory on the roots the PRIVATE filter picked: on a VM with a mirror root, a zap under
        both filters is private on the mirror root and shared on the direct root (what a hook
        design keyed on the private flag sees); without one, the single root is zapped once
        with the PRIVATE filter's flag.  Before the mirror pass, a huge mirror leaf the range
        covers only in part is split (:meth:`tdp_mmu_split_mirror_cross_boundary`)."""
        if not self.has_mirror:
            self.ctx.op_private = private
            try:
                return self.kvm_tdp_mmu_zap_leafs(KVM_DIRECT_ROOTS | KVM_INVALID_ROOTS, start, end)
            finally:
                self.ctx.op_private = False
        flush, zapped = False, 0
        for wanted, is_private in ((private, True), (shared, False)):
            if not wanted:
                continue
            self.ctx.op_private = is_private
            try:
                if is_private:
                    self.tdp_mmu_split_mirror_cross_boundary(start, end)
                for root in self.roots:
                    if root.is_mirror != is_private:
                        continue
                    f, n = self.tdp_mmu_zap_leafs(root, start, end)
                    flush, zapped = flush or f, zapped + n
            finally:
                self.ctx.op_private = False
        return flush, zapped

    def tdp_mmu_split_mirror_cross_boundary(self, start: int, end: int) -> None:
        """The TDX huge-page series' split of cross-boundary leaves (mmu_lock for write): a
        huge leaf of the current mirror root over ``start`` or ``end - 1`` that ``[start,
        end)`` does not cover whole becomes a table of 512 smaller leaves
        (:meth:`tdp_mmu_split_mirror_spte`), so the zap that follows removes only what the
        range covers.  Never on the fault path."""
        root = self.current_root(mirror=True)
        if root is None:
            return
        for edge in (start, end - 1):
            it = TdpIter(self.arena, root, PG_LEVEL_2M, edge, edge + 1)
            while it.valid and it.gfn < edge + 1:
                spte = it.old_spte
                inside = it.gfn >= start and it.gfn + pages_per_hpage(it.level) <= end
                if is_shadow_present_pte(spte) and is_large_pte(spte) and not inside:
                    self.tdp_mmu_split_mirror_spte(it)
                    break
                it.next()

    def tdp_mmu_split_mirror_spte(self, it: TdpIter) -> None:
        """``tdp_mmu_split_huge_page`` on the mirror root, under the write lock: the external
        tree is split first (``split_external_spt``: TDX BLOCKs the 2M leaf, TRACKs, kicks and
        DEMOTEs it), then the 512 smaller SPTEs are written and the huge leaf becomes the
        link (plain stores: no ``handle_changed_spte``, the page counters move by hand).  A
        failed hook is a KVM_BUG_ON and leaves the leaf as it was."""
        huge = it.old_spte
        child_level = it.level - 1
        sp = self.arena.alloc(self.child_role(it), it.gfn)
        if self.hooks.split_external_spt(it.gfn, it.level, sp) != HOOK_OK:
            self.arena.free_unpublished(sp)
            self.ctx.kvm_bug_on("split_external_spt failed")
            return
        for i in range(SPTE_ENT_PER_PAGE):
            sp.spt[i] = make_small_spte(huge, child_level, i, nx_huge_pages=self.nx_huge_pages)
        self.ctx.charge("spte_update_ns", SPTE_ENT_PER_PAGE)
        link = make_nonleaf_spte(sp.pfn, ad=self.ad_bits)
        it.write(link)
        it.old_spte = link
        self.tdp_account_mmu_page(sp)
        self.ctx.page_stats(it.level, -1)
        self.ctx.page_stats(child_level, SPTE_ENT_PER_PAGE)
        self.ctx.count("huge_page_splits")

    def tdp_mmu_zap_root(self, root: MmuPage, shared: bool) -> None:
        """Zap a whole root, finest level first so each pass frees little at a time."""
        for zap_level in (PG_LEVEL_4K, PG_LEVEL_2M, PG_LEVEL_1G, root.level):
            self.tdp_mmu_zap_root_level(root, shared, zap_level)

    def tdp_mmu_zap_root_level(self, root: MmuPage, shared: bool, zap_level: int) -> None:
        """One pass of KVM's ``__tdp_mmu_zap_root``: zap present entries at ``zap_level``."""
        end = 1 << (SPTE_LEVEL_BITS * root.level)
        for it in TdpIter(self.arena, root, zap_level, 0, end):
            if not is_shadow_present_pte(it.old_spte) or it.level > zap_level:
                continue
            if shared:
                if not self.tdp_mmu_set_spte_atomic(it, SHADOW_NONPRESENT_VALUE):
                    continue  # refused for good (a KVM_BUG_ON fired); do not spin
            else:
                self.tdp_mmu_iter_set_spte(it, SHADOW_NONPRESENT_VALUE)
            self.ctx.charge("spte_update_ns")

    # ==================================================================================
    # Dirty logging, aging, eager splitting, huge-page recovery (spec §7)
    # ==================================================================================
    #
    # guest_memfd slots cannot log dirty pages and the MMU notifier ages shared memory only,
    # so all of these act on the valid direct roots, never on a mirror root.

    def valid_direct_roots(self) -> list[MmuPage]:
        """The valid direct roots, in root-list order (newest first)."""
        return [r for r in self.roots if not r.invalid and not r.is_mirror]

    def wrprot_gfn_range(
        self,
        start: int,
        end: int,
        min_level: int,
        pick: Callable[[int, int], bool] | None = None,
    ) -> int:
        """``kvm_tdp_mmu_wrprot_slot`` over ``[start, end)`` (mmu_lock for read).

        Clears W on every present leaf at ``min_level`` or above (for which ``pick(gfn,
        level)`` holds, if given), keeping MMU-writable so the fast path may restore it; no
        ``handle_changed_spte`` (the pfn and presence do not change).  Counts
        ``sptes_write_protected`` and charges ``spte_update_ns`` per leaf changed.  Returns
        the leaves changed (the caller flushes if any).
        """
        changed = 0
        gfn_bits = self.root_gfn_bits(False)
        for root in self.valid_direct_roots():
            for it in TdpIter(self.arena, root, min_level, start, end, gfn_bits):
                spte = it.old_spte
                if (
                    not is_shadow_present_pte(spte)
                    or not is_last_spte(spte, it.level)
                    or not spte & SPTE_WRITABLE
                    or (pick is not None and not pick(it.gfn, it.level))
                ):
                    continue
                it.write(spte & ~SPTE_WRITABLE)  # the cmpxchg; never lost here
                it.old_spte = spte & ~SPTE_WRITABLE
                changed += 1
        self.ctx.count("sptes_write_protected", changed)
        self.ctx.charge("spte_update_ns", changed)
        return changed

    def kvm_tdp_mmu_clear_dirty_pt_masked(self, gfn: int, mask: int, wrprot: bool = True) -> int:
        """mmu_lock for write: for each set bit ``b`` of ``mask``, the 4K leaf at ``gfn + b``
        loses W (``wrprot``) or, for a PML log, D (:meth:`clear_dirty_gfn_range`), in one walk
        from the lowest to the highest set bit.  Huge leaves over the range are left alone
        (the caller protects or splits them).  Returns the leaves changed."""
        if not mask:
            return 0
        lo = gfn + (mask & -mask).bit_length() - 1
        hi = gfn + mask.bit_length()

        def pick(g: int, level: int) -> bool:
            return level == PG_LEVEL_4K and gfn <= g < gfn + 64 and bool(mask >> (g - gfn) & 1)

        if wrprot:
            return self.wrprot_gfn_range(lo, hi, PG_LEVEL_4K, pick)
        return self.clear_dirty_gfn_range(lo, hi, pick)

    def kvm_tdp_mmu_clear_dirty_slot(self, start: int, end: int) -> int:
        """PML's arming of ``[start, end)`` (``kvm_tdp_mmu_clear_dirty_slot``): clear D on every
        present 4K leaf, so the CPU logs the next write to it.  Returns the leaves changed."""
        return self.clear_dirty_gfn_range(start, end, lambda g, level: level == PG_LEVEL_4K)

    def clear_dirty_gfn_range(self, start: int, end: int, pick: Callable[[int, int], bool]) -> int:
        """``clear_dirty_gfn_range``: clear D (an atomic AND) on every present leaf of
        ``[start, end)`` in the valid direct roots that has it and for which ``pick(gfn,
        level)`` holds; no ``handle_changed_spte``.  Charges ``spte_update_ns`` per leaf
        changed (no counter: PML arms pages without write-protecting them).  Returns the
        leaves changed."""
        changed = 0
        gfn_bits = self.root_gfn_bits(False)
        for root in self.valid_direct_roots():
            for it in TdpIter(self.arena, root, PG_LEVEL_4K, start, end, gfn_bits):
                spte = it.old_spte
                if (
                    is_shadow_present_pte(spte)
                    and is_last_spte(spte, it.level)
                    and spte & SPTE_DIRTY
                    and pick(it.gfn, it.level)
                ):
                    it.write(spte & ~SPTE_DIRTY)
                    it.old_spte = spte & ~SPTE_DIRTY
                    changed += 1
        self.ctx.charge("spte_update_ns", changed)
        return changed

    def kvm_tdp_mmu_write_protect_gfn(self, gfn: int) -> bool:
        """Page write tracking's protection of ``gfn`` (mmu_lock for write): every leaf of the
        valid direct roots that maps ``gfn``, at any level, loses W and MMU-writable (so no
        fast path can make it writable again), through the exclusive-lock setter; counts
        ``sptes_write_protected`` and charges ``spte_update_ns`` per leaf.  Returns whether
        a leaf changed (the caller flushes)."""
        changed = False
        gfn_bits = self.root_gfn_bits(False)
        for root in self.valid_direct_roots():
            for it in TdpIter(self.arena, root, PG_LEVEL_4K, gfn, gfn + 1, gfn_bits):
                spte = it.old_spte
                new = spte & ~(SPTE_WRITABLE | SPTE_MMU_WRITABLE)
                if is_shadow_present_pte(spte) and is_last_spte(spte, it.level) and new != spte:
                    self.tdp_mmu_iter_set_spte(it, new)
                    self.ctx.count("sptes_write_protected")
                    self.ctx.charge("spte_update_ns")
                    changed = True
        return changed

    def kvm_tdp_mmu_age_gfn_range(self, start: int, end: int) -> bool:
        """The MMU notifier's clear_young (lockless): age every young present leaf of
        ``[start, end)`` (``is_accessed_spte``), counting ``sptes_aged`` and charging
        ``spte_update_ns`` for each: with A/D on clear A with an atomic AND; with A/D off
        (``kvm_tdp_mmu_age_spte``) mark it for access tracking with one cmpxchg (RWX
        cleared, R and X saved).  A leaf already access-tracked is not young.  No
        bookkeeping, no flush.  Returns whether any leaf was young."""
        young = False
        gfn_bits = self.root_gfn_bits(False)
        for root in self.valid_direct_roots():
            for it in TdpIter(self.arena, root, PG_LEVEL_4K, start, end, gfn_bits):
                spte = it.old_spte
                if (
                    is_shadow_present_pte(spte)
                    and is_last_spte(spte, it.level)
                    and is_accessed_spte(spte)
                ):
                    it.write(mark_spte_for_access_track(it.read()))
                    it.old_spte = it.read()
                    young = True
                    self.ctx.count("sptes_aged")
                    self.ctx.charge("spte_update_ns")
        return young

    def kvm_tdp_mmu_test_age_gfn(self, start: int, end: int) -> bool:
        """The MMU notifier's test_young (lockless): whether a present leaf of ``[start, end)``
        is young (``is_accessed_spte``: A set; with A/D off, not access-tracked).  Changes
        nothing."""
        gfn_bits = self.root_gfn_bits(False)
        for root in self.valid_direct_roots():
            for it in TdpIter(self.arena, root, PG_LEVEL_4K, start, end, gfn_bits):
                spte = it.old_spte
                if (
                    is_shadow_present_pte(spte)
                    and is_last_spte(spte, it.level)
                    and is_accessed_spte(spte)
                ):
                    return True
        return False

    def kvm_tdp_mmu_try_split_huge_pages(self, start: int, end: int, target_level: int) -> int:
        """Eager page splitting of ``[start, end)`` (mmu_lock for read).

        Every present huge leaf above ``target_level`` becomes a table of 512 smaller leaves
        (:meth:`tdp_mmu_split_huge_page`, as the fault path splits: ``spte_update_ns`` x 512,
        ``huge_page_splits``, the page counters), in pre-order, so a 1G page is split to 2M
        and each 2M to 4K in one pass; no flush (the translation does not change).  Returns
        the splits.
        """
        splits = 0
        gfn_bits = self.root_gfn_bits(False)
        for root in self.valid_direct_roots():
            it = TdpIter(self.arena, root, target_level + 1, start, end, gfn_bits)
            while it.valid and it.gfn < end:
                spte = it.old_spte
                if (
                    not is_shadow_present_pte(spte)
                    or not is_large_pte(spte)
                    or it.level <= target_level
                ):
                    it.next()
                    continue
                sp = self.arena.alloc(self.child_role(it), it.gfn)
                if not self.tdp_mmu_split_huge_page(it, sp, shared=True):
                    # Lost the cmpxchg: the entry changed under us; look at it again.
                    self.arena.free_unpublished(sp)
                    it.old_spte = it.read()
                    continue
                splits += 1
                it.next()  # pre-order: descend into the new table and split its children
        return splits

    def kvm_tdp_mmu_recover_huge_pages(
        self, start: int, end: int, allowed: Callable[[int, int], bool]
    ) -> int:
        """Huge-page recovery over ``[start, end)`` (mmu_lock for read).

        Each present table at 2M or 1G lying wholly inside the range, where ``allowed(gfn,
        level)`` says its whole range may be mapped at that size, is replaced by one huge
        leaf built from the first present leaf below it (``make_huge_spte``: the pfn rounded
        down to the huge page, X unless NX huge pages forbid it, Accessed set, and W, D, MMU-
        and host-writable as that leaf has them, so a read-only page stays read-only).  The
        install goes through :meth:`tdp_mmu_set_spte_atomic`, so ``handle_changed_spte`` and
        ``handle_removed_pt`` account for the subtree torn down.  Counts
        ``huge_pages_recovered``.  Returns the huge leaves made (the caller flushes if any).
        """
        made = 0
        gfn_bits = self.root_gfn_bits(False)
        for root in self.valid_direct_roots():
            it = TdpIter(self.arena, root, PG_LEVEL_2M, start, end, gfn_bits)
            while it.valid and it.gfn < end:
                spte = it.old_spte
                span = pages_per_hpage(it.level)
                whole = it.gfn >= start and it.gfn + span <= end
                if (
                    it.level > PG_LEVEL_1G
                    or not is_shadow_present_pte(spte)
                    or is_last_spte(spte, it.level)
                    or not whole
                    or not allowed(it.gfn, it.level)
                ):
                    it.next()
                    continue
                leaf = self.first_leaf_below(spte, it.level)
                if leaf is None:
                    it.next()
                    continue
                pfn = spte_to_pfn(leaf) & ~(span - 1)
                exec_ok = not (self.nx_huge_pages and it.level > PG_LEVEL_4K)
                huge = make_leaf_spte(pfn, it.level, exec=exec_ok, prefetch=False, ad=self.ad_bits)
                # make_huge_spte keeps the small SPTE's permissions: W, D, MMU- and
                # host-writable come from the leaf (a read-only page stays read-only), and an
                # access-tracked leaf (A/D off) makes an access-tracked huge one.
                keep = SPTE_WRITABLE | SPTE_DIRTY | SPTE_MMU_WRITABLE | SPTE_HOST_WRITABLE
                huge = (huge & ~keep) | (leaf & keep)
                if not self.ad_bits and is_access_track_spte(leaf):
                    huge = mark_spte_for_access_track(huge)
                if self.tdp_mmu_set_spte_atomic(it, huge):
                    made += 1
                    self.ctx.count("huge_pages_recovered")
                else:
                    it.old_spte = it.read()
                    if is_frozen_spte(it.old_spte):
                        it.next()
                    continue
                it.next()
        return made

    # ==================================================================================
    # NX huge page recovery (spec §7.5)
    # ==================================================================================

    def track_possible_nx_huge_page(self, sp: MmuPage) -> None:
        """``track_possible_nx_huge_page``: put ``sp`` at the end of the list (once)."""
        if sp.index in self.possible_nx_huge_pages:
            return
        self.possible_nx_huge_pages[sp.index] = sp
        self.ctx.count("nx_lpage_splits")

    def untrack_possible_nx_huge_page(self, sp: MmuPage) -> None:
        """``untrack_possible_nx_huge_page``: take ``sp`` off the list (if it is on it), when
        it is freed or the recovery worker skips it."""
        if self.possible_nx_huge_pages.get(sp.index) is not sp:
            return
        del self.possible_nx_huge_pages[sp.index]
        self.ctx.count("nx_lpage_splits", -1)

    def kvm_recover_nx_huge_pages(self, ratio: int, skip: Callable[[int], bool]) -> int:
        """One run of the recovery worker (``kvm_recover_nx_huge_pages``): take the oldest
        ⌈``nx_lpage_splits`` / ``ratio``⌉ tables of the list (none for ratio 0); a table for
        which ``skip(gfn)`` holds (its memslot logs dirty pages) is only taken off the list,
        the others are zapped (:meth:`kvm_tdp_mmu_zap_possible_nx_huge_page`, counting
        ``nx_huge_pages_recovered``) or, if no longer linked, taken off the list.  Returns the
        tables zapped (the caller flushes if any)."""
        if ratio == 0:
            return 0
        n = -(-len(self.possible_nx_huge_pages) // ratio)
        zapped = 0
        for sp in list(self.possible_nx_huge_pages.values())[:n]:
            if skip(sp.gfn):
                self.untrack_possible_nx_huge_page(sp)
                continue
            if self.kvm_tdp_mmu_zap_possible_nx_huge_page(sp):
                zapped += 1
                self.ctx.count("nx_huge_pages_recovered")
            else:
                self.untrack_possible_nx_huge_page(sp)
        return zapped

    def kvm_tdp_mmu_zap_possible_nx_huge_page(self, sp: MmuPage) -> bool:
        """The TDP MMU's zap of one listed table (v6.17+, mmu_lock for read): in the first
        valid direct root whose parent entry still points at ``sp``, set that entry
        non-present with the atomic setter (``handle_removed_pt`` tears the subtree down and
        takes ``sp`` off the list).  Returns whether it did."""
        parent_level = sp.level + 1
        gfn_bits = self.root_gfn_bits(False)
        for root in self.valid_direct_roots():
            it = TdpIter(self.arena, root, parent_level, sp.gfn, sp.gfn + 1, gfn_bits)
            while it.valid and it.gfn < sp.gfn + 1:
                if it.level == parent_level:
                    spte = it.old_spte
                    if (
                        is_shadow_present_pte(spte)
                        and not is_last_spte(spte, it.level)
                        and spte_to_pfn(spte) == sp.pfn
                        and self.tdp_mmu_set_spte_atomic(it, SHADOW_NONPRESENT_VALUE)
                    ):
                        return True
                    break
                it.next()
        return False

    def first_leaf_below(self, spte: int, level: int) -> int | None:
        """The first present leaf (pre-order) under the table the non-leaf ``spte`` at
        ``level`` points to, or None (also for a mirror table)."""
        sp = self.arena.child_sp(spte)
        if sp.is_mirror:
            return None
        child_level = level - 1
        for child in sp.spt:
            if not is_shadow_present_pte(child):
                continue
            if is_last_spte(child, child_level):
                return child
            found = self.first_leaf_below(child, child_level)
            if found is not None:
                return found
        return None

    # ==================================================================================
    # Lookups
    # ==================================================================================

    def walk_root(self, root: MmuPage, gfn: int, gfn_bits: int) -> list[tuple[int, int]]:
        """``(level, spte)`` from ``root`` down to ``gfn`` (with ``gfn_bits``), ending at a leaf or
        a non-present entry."""
        out: list[tuple[int, int]] = []
        sp = root
        while True:
            level = sp.level
            spte = sp.spt[spte_index(gfn | gfn_bits, level)]
            out.append((level, spte))
            if not is_shadow_present_pte(spte) or is_last_spte(spte, level):
                return out
            sp = self.arena.child_sp(spte)

    def leaf_ptr(self, root: MmuPage, gfn: int, gfn_bits: int) -> tuple[int, MmuPage, int] | None:
        """Where the leaf that maps ``gfn`` in ``root`` lives: ``(level, table, index)``, or
        None if the path ends at a non-present entry (the lockless walk of the fast path)."""
        if gfn_bits and gfn >= gfn_bits:
            return None
        sp = root
        while True:
            level = sp.level
            index = spte_index(gfn | gfn_bits, level)
            spte = sp.spt[index]
            if not is_shadow_present_pte(spte):
                return None
            if is_last_spte(spte, level):
                return level, sp, index
            sp = self.arena.child_sp(spte)

    def lookup(self, root: MmuPage, gfn: int, gfn_bits: int) -> tuple[int, int]:
        """The entry that maps ``gfn`` in ``root``: the leaf or the first non-present one."""
        return self.walk_root(root, gfn, gfn_bits)[-1]
