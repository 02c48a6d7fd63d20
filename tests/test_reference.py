"""Unit tests of the pure-Python reference model (``tdpmmu.reference``) on its own.

Each test pins one KVM behaviour from shared/spec/kvm-tdp-mmu.md §10 (numbers in the test
names) or one choice of docs/model.md, and would fail if the model broke that rule.  They run
the reference alone (the native module is needed only for ``tdpmmu.config``, the VM-type x
hook-design matrix the reference reads).
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("tdpmmu._core")  # the reference reads the VM-type matrix from tdpmmu.config

from tdpmmu import reference as ref

ReferenceVM = ref.ReferenceVM
Ret = ref.Ret
SVE = ref.SHADOW_NONPRESENT_VALUE
FROZEN = ref.FROZEN_SPTE
TABLE_BASE_PFN: int = ref.TABLE_BASE_PFN
DATA_BASE_PFN = ref.DATA_BASE_PFN
GiB = 1 << 18  # in 4 KiB pages
MiB2 = 512


def leaf4k(pfn: int) -> int:
    return (pfn << 12) | 0x8600_0000_0000_0B77


def nonleaf(table_index: int) -> int:
    return ((TABLE_BASE_PFN + table_index) << 12) | 0x8000_0000_0000_0907


def flushes(vm: object) -> int:
    stats: dict[str, int] = vm.stats  # type: ignore[attr-defined]
    return int(stats["remote_tlb_flush"])


# ------------------------------------------------------------------------------------------
# §10.1 fresh tables are non-present with SVE; zapped entries are SVE, never 0
# ------------------------------------------------------------------------------------------


def test_01_fresh_tables_are_all_sve() -> None:
    vm = ReferenceVM(memory="64MiB", levels=4)
    vm.fault(0x1234)
    tables = vm.tables()
    assert len(tables) == 4  # root + L3 + L2 + L1
    for index, table in enumerate(tables):
        # Exactly one entry is in use in each table (the path to gfn 0x1234).
        used = [i for i, e in enumerate(table) if e != SVE]
        assert len(used) == 1, (index, used)
    assert all(e == SVE for e in tables[0][1:])
    vm.check()


def test_01_zapped_entries_are_sve_not_zero() -> None:
    vm = ReferenceVM(memory="64MiB")
    for gfn in range(8):
        vm.fault(gfn)
    assert vm.zap_gfn_range(0, 8) == 8
    for gfn in range(8):
        assert vm.spte(gfn) == SVE
        assert vm.walk(gfn)[-1] == (1, SVE)
    assert all(e != 0 for t in vm.tables() for e in t)
    vm.check()


def test_01_reused_tables_are_refilled_with_sve() -> None:
    vm = ReferenceVM(memory="64MiB")
    vm.fault(5)
    vm.zap_all_fast()  # old tables end FROZEN (shared teardown) and become reusable
    assert any(e == FROZEN for t in vm.tables() for e in t)
    vm.fault(700)
    for table in vm.tables():
        assert FROZEN not in table
    vm.check()


# ------------------------------------------------------------------------------------------
# §10.2 constants, §10.3 encodings
# ------------------------------------------------------------------------------------------


def test_02_frozen_constant_and_predicates() -> None:
    assert FROZEN == 0x8000_0000_0000_05A0
    assert SVE == 1 << 63
    assert not ref.is_shadow_present_pte(FROZEN)
    assert not ref.is_mmio_spte(FROZEN)  # EPT MMIO: mask RWX|SVE, value W|X
    assert FROZEN & 0x7 == 0  # no RWX: not present to the CPU
    assert FROZEN & (0x7 | 1 << 63) not in (0x6, 0)  # neither EPT's nor TDX's MMIO value
    assert ref.is_frozen_spte(FROZEN)
    for other in (FROZEN | 1, FROZEN & ~(1 << 63), SVE, FROZEN | 1 << 11):
        assert not ref.is_frozen_spte(other)


def test_03_leaf_encodings() -> None:
    assert ref.make_leaf_spte(0x12345, 1) == leaf4k(0x12345)
    assert ref.make_leaf_spte(0x200, 2) == leaf4k(0x200) | 1 << 7
    assert ref.make_leaf_spte(0x40000, 3) == leaf4k(0x40000) | 1 << 7
    assert ref.make_leaf_spte(0x200, 2, exec=False) == (leaf4k(0x200) | 1 << 7) & ~4
    assert ref.make_leaf_spte(7, 1, prefetch=True) == (7 << 12) | 0x8600_0000_0000_0A77
    assert ref.make_nonleaf_spte(0x100001) == (0x100001 << 12) | 0x8000_0000_0000_0907


def test_03_mmio_encoding() -> None:
    gen = 0x5_1234  # low byte 0x34, high bits 0x512
    spte = ref.make_mmio_spte(0xABCDE, gen)
    assert spte == (0x34 << 3) | 0x6 | (0xABCDE << 12) | (0x512 << 52)
    assert ref.is_mmio_spte(spte)
    assert not ref.is_shadow_present_pte(spte)
    assert spte >> 63 == 0
    assert ref.mmio_spte_generation(spte) == gen


def test_03_fault_installs_the_documented_sptes() -> None:
    vm = ReferenceVM(memory="64MiB", levels=4)
    r = vm.fault(0x1234)
    assert r.ret == Ret.FIXED and r.level == 1
    assert r.spte == leaf4k(DATA_BASE_PFN + 0x1234)
    # Tables in allocation order: root (0), then L3 (1), L2 (2), L1 (3).
    assert vm.walk(0x1234) == [
        (4, nonleaf(1)),
        (3, nonleaf(2)),
        (2, nonleaf(3)),
        (1, leaf4k(DATA_BASE_PFN + 0x1234)),
    ]


def test_03_huge_leaves_and_slot_host_pfns() -> None:
    vm = ReferenceVM(memory="2GiB", backing="1G", levels=5)
    r = vm.fault(GiB + 77)
    assert r.level == 3
    assert r.spte == leaf4k(DATA_BASE_PFN + GiB) | 1 << 7
    assert [lvl for lvl, _ in vm.walk(GiB + 77)] == [5, 4, 3]
    # A second slot starts at the next 1 GiB-aligned host pfn after slot 0's pages.
    slot = vm.add_memslot(4 * GiB, 512, backing="2M")
    assert slot == 1
    assert vm.memslots()[1] == (1, 4 * GiB, 512, 2 << 20, False, DATA_BASE_PFN + 2 * GiB)
    third = vm.add_memslot(8 * GiB, 4, backing=4096)
    assert vm.memslots()[2][5] == DATA_BASE_PFN + 3 * GiB
    assert third == 2
    r = vm.fault(4 * GiB + 3)
    assert r.level == 2 and r.spte == leaf4k(DATA_BASE_PFN + 2 * GiB) | 1 << 7
    vm.check()


def test_memslot_ids_never_reused_and_generation_grows_by_two() -> None:
    vm = ReferenceVM(memory="64MiB", slot_zap_all=False)
    assert vm.memslot_generation == 0  # slot 0 comes with the VM
    a = vm.add_memslot(GiB, 8)
    vm.delete_memslot(a)
    b = vm.add_memslot(GiB, 8)
    assert (a, b) == (1, 2)
    assert vm.memslot_generation == 6
    with pytest.raises(ValueError):
        vm.add_memslot(GiB + 4, 8)  # overlaps slot 2
    with pytest.raises(ValueError):
        vm.add_memslot(4 * GiB + 1, 512, backing="2M")  # not aligned to its backing
    with pytest.raises(ValueError):
        vm.delete_memslot(a)


# ------------------------------------------------------------------------------------------
# §10.18 iterator: pre-order, never descends into non-present entries, re-reads
# ------------------------------------------------------------------------------------------


def _expected_preorder(vm: object, sp: object, start: int, end: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    level = sp.level  # type: ignore[attr-defined]
    size = ref.pages_per_hpage(level)
    for i, spte in enumerate(sp.spt):  # type: ignore[attr-defined]
        gfn = sp.gfn + i * size  # type: ignore[attr-defined]
        if gfn + size <= start or gfn >= end:
            continue
        out.append((level, gfn))
        if level > 1 and ref.is_shadow_present_pte(spte) and not ref.is_last_spte(spte, level):
            out += _expected_preorder(vm, vm.arena.child_sp(spte), start, end)  # type: ignore[attr-defined]
    return out


def test_18_iterator_is_preorder_and_skips_non_present() -> None:
    vm = ReferenceVM(memory="1GiB", backing="2M", nx_huge_pages=True)
    vm.fault(5, exec=True)  # 4K table under the first 2M entry
    vm.fault(3 * MiB2)  # a 2M leaf
    vm.fault(5 * MiB2 + 9, exec=True)
    vm.zap_gfn_range(5 * MiB2, MiB2)  # leaves an empty 4K table
    root = vm.tdp_mmu.valid_direct_root()
    start, end = 2, 6 * MiB2 + 1
    seen = [(it.level, it.gfn) for it in ref.TdpIter(vm.arena, root, 1, start, end)]
    assert seen == _expected_preorder(vm, root, start, end)
    # Parents come before children, and the 2M leaf's range is not descended into.
    assert seen.index((2, 0)) < seen.index((1, 2))
    assert (1, 3 * MiB2) not in seen and (2, 3 * MiB2) in seen
    # Non-present 2M entries are visited but nothing below them is.
    assert (2, 4 * MiB2) in seen and (1, 4 * MiB2) not in seen


def test_18_iterator_rereads_before_descending() -> None:
    vm = ReferenceVM(memory="1GiB", backing="4K")
    vm.fault(5)
    vm.fault(MiB2 + 5)
    root = vm.tdp_mmu.valid_direct_root()
    it = ref.TdpIter(vm.arena, root, 1, 0, 2 * MiB2)
    visited = []
    for step in it:
        visited.append((step.level, step.gfn))
        if (step.level, step.gfn) == (2, 0):
            step.write(SVE)  # unlinked after we arrived: the walk must not enter it
    assert (1, 5) not in visited
    assert (2, MiB2) in visited and (1, MiB2 + 5) in visited


def test_18_walk_stops_at_first_non_present_entry() -> None:
    vm = ReferenceVM(memory="1GiB")
    assert vm.walk(5) == []  # no root yet
    vm.fault(5)
    path = vm.walk(MiB2 + 1)
    assert [lvl for lvl, _ in path] == [4, 3, 2]
    assert path[-1] == (2, SVE)
    assert vm.spte(MiB2 + 1) == SVE


# ------------------------------------------------------------------------------------------
# §10.19 zap flush accounting
# ------------------------------------------------------------------------------------------


def test_19_zap_of_nothing_does_not_flush() -> None:
    vm = ReferenceVM(memory="64MiB", vcpus=2)
    vm.fault(1)
    assert vm.zap_gfn_range(100, 50) == 0
    assert vm.mmu_notifier_invalidate(100, 50) == 0
    assert flushes(vm) == 0


def test_19_one_flush_per_zap_operation() -> None:
    vm = ReferenceVM(memory="64MiB", vcpus=3)
    for gfn in range(20):
        vm.fault(gfn)
    before = vm.stats["modeled_ns"]
    assert vm.zap_gfn_range(0, 10) == 10
    assert flushes(vm) == 1
    assert vm.stats["remote_tlb_flush_requests"] == 1
    # 10 SPTE writes + one flush with 3 vCPUs
    assert vm.stats["modeled_ns"] - before == pytest.approx(10 * 60 + 1000 + 3 * 200)
    assert vm.mmu_notifier_invalidate(0, 20) == 10
    assert flushes(vm) == 2
    assert vm.stats["pages_4k"] == 0
    vm.check()


def test_19_zap_of_a_huge_leaf_counts_it_once_even_if_partly_covered() -> None:
    vm = ReferenceVM(memory="1GiB", backing="2M")
    vm.fault(MiB2 + 7)
    assert vm.zap_gfn_range(MiB2 + 100, 1) == 1
    assert vm.spte(MiB2 + 7) == SVE
    assert vm.stats["pages_2m"] == 0


def test_19_zaps_in_invalid_roots_do_not_request_a_flush() -> None:
    vm = ReferenceVM(memory="64MiB")
    vm.fault(1)
    vm.fault(2)
    root = vm.tdp_mmu.valid_direct_root()
    vm.tdp_mmu.kvm_tdp_mmu_invalidate_roots(ref.KVM_DIRECT_ROOTS)
    flush, zapped = vm.tdp_mmu.tdp_mmu_zap_leafs(root, 0, 10)
    assert (flush, zapped) == (False, 2)
    # The notifier path reaches invalid roots too, and still does not flush for them.
    vm2 = ReferenceVM(memory="64MiB")
    vm2.fault(1)
    vm2.tdp_mmu.kvm_tdp_mmu_invalidate_roots(ref.KVM_DIRECT_ROOTS)
    assert vm2.mmu_notifier_invalidate(0, 10) == 1
    assert flushes(vm2) == 0
    # ... while kvm_zap_gfn_range ignores invalid roots altogether.
    vm3 = ReferenceVM(memory="64MiB")
    vm3.fault(1)
    vm3.tdp_mmu.kvm_tdp_mmu_invalidate_roots(ref.KVM_DIRECT_ROOTS)
    assert vm3.zap_gfn_range(0, 10) == 0


def test_19_fast_zap_does_not_flush_and_frees_everything() -> None:
    vm = ReferenceVM(memory="2GiB", backing="2M", vcpus=2)
    vm.fault(3, vcpu=0)
    vm.fault(GiB + 3, vcpu=1)
    assert vm.stats["roots_allocated"] == 1 and vm.roots()[0]["refcount"] == 3
    vm.zap_all_fast()
    s = vm.stats
    assert flushes(vm) == 0
    assert (s["roots_freed"], s["tdp_mmu_pages"], s["pages_2m"]) == (1, 0, 0)
    assert vm.roots() == []
    # Each vCPU re-loads on its next fault: one new root, shared.
    vm.fault(3, vcpu=1)
    vm.fault(4, vcpu=0)
    assert vm.stats["roots_allocated"] == 2
    assert vm.roots()[0]["refcount"] == 3
    vm.check()


# ------------------------------------------------------------------------------------------
# §10.20 fault-path flushes
# ------------------------------------------------------------------------------------------


def test_20_installs_over_non_present_never_flush() -> None:
    vm = ReferenceVM(memory="2GiB", backing="2M", nx_huge_pages=True)
    for gfn in (0, 1, MiB2, GiB + 5, 3 * MiB2 + 1):
        vm.fault(gfn)
        vm.fault(gfn + 2, exec=True)
    vm.fault(4 * GiB)  # MMIO
    assert flushes(vm) == 0
    vm.check()


def test_20_huge_leaf_over_present_table_flushes_once_and_frees_subtree() -> None:
    vm = ReferenceVM(memory="64MiB", slot_zap_all=False)
    slot = vm.add_memslot(GiB, GiB, backing="4K")
    vm.fault(GiB + 1)
    vm.fault(GiB + MiB2 + 1)
    assert vm.stats["tdp_mmu_pages"] == 4  # L3, L2 and two L1 tables
    vm.delete_memslot(slot)  # leaf zap only: tables stay
    assert flushes(vm) == 1
    vm.add_memslot(GiB, GiB, backing="1G")
    pages_before = vm.stats["tdp_mmu_pages"]
    r = vm.fault(GiB + 9)
    assert r.ret == Ret.FIXED and r.level == 3
    assert flushes(vm) == 2  # exactly one for the replacement
    # The L2 table and its two L1 tables were torn down.
    assert vm.stats["tdp_mmu_pages"] == pages_before - 3
    vm.check()


def test_20_huge_leaf_over_mmio_tables_flushes() -> None:
    vm = ReferenceVM(memory="64MiB")
    r = vm.fault(GiB + 3)  # no memslot there: MMIO SPTE at 4K
    assert r.ret == Ret.EMULATE and r.level == 1
    vm.add_memslot(GiB, MiB2, backing="2M")
    r = vm.fault(GiB + 3)
    assert (r.ret, r.level) == (Ret.FIXED, 2)
    assert flushes(vm) == 1
    vm.check()


def test_20_split_never_flushes() -> None:
    vm = ReferenceVM(memory="2GiB", backing="1G", nx_huge_pages=True)
    r = vm.fault(7)
    assert r.level == 3 and not r.spte & 4  # huge leaf without X
    r = vm.fault(7, exec=True)  # 1G -> 2M -> 4K, both splits on the fault path
    assert r.level == 1 and r.spte & 4
    assert r.ret == Ret.SPURIOUS  # the split child already allows exec
    s = vm.stats
    assert s["huge_page_splits"] == 2
    assert (s["pages_1g"], s["pages_2m"], s["pages_4k"]) == (0, 511, 512)
    assert flushes(vm) == 0
    vm.check()


def test_20_populate_over_a_present_table_replaces_it() -> None:
    vm = ReferenceVM(memory="1GiB", backing="2M")
    vm.add_memslot(GiB, 512, backing="4K")  # slot 1: 4K pages right after slot 0
    vm.fault(GiB)  # tables down to 4K at gfn 1 GiB
    r = vm.fault(5)
    assert r.level == 2
    vm.zap_gfn_range(0, 512)
    assert vm.populate(0, 1024) == 2  # two 2M leaves, prefetch: A clear
    assert vm.spte(0) == (ref.make_leaf_spte(DATA_BASE_PFN, 2, prefetch=True))
    assert flushes(vm) == 1  # only the zap's
    assert vm.stats["pf_taken"] == 2 and vm.stats["pf_fixed"] == 2  # populate counts neither
    vm.check()


# ------------------------------------------------------------------------------------------
# §10.21 NX huge pages / disallowed_hugepage_adjust
# ------------------------------------------------------------------------------------------


def test_21_exec_faults_map_4k_only_with_nx_huge_pages() -> None:
    on = ReferenceVM(memory="1GiB", backing="2M", nx_huge_pages=True)
    off = ReferenceVM(memory="1GiB", backing="2M", nx_huge_pages=False)
    r_on = on.fault(9, exec=True)
    r_off = off.fault(9, exec=True)
    assert (r_on.level, r_off.level) == (1, 2)
    assert r_on.spte == leaf4k(DATA_BASE_PFN + 9)
    assert r_off.spte == leaf4k(DATA_BASE_PFN) | 1 << 7
    # Non-exec faults still map huge, but without X on an NX-huge-pages VM.
    r = on.fault(MiB2 + 1)
    assert r.level == 2 and r.spte == (leaf4k(DATA_BASE_PFN + MiB2) | 1 << 7) & ~4


def test_21_disallowed_hugepage_adjust_keeps_nx_split_tables() -> None:
    vm = ReferenceVM(memory="1GiB", backing="2M", nx_huge_pages=True)
    vm.fault(9, exec=True)  # 4K table marked nx_huge_page_disallowed
    r = vm.fault(100)  # read in the same 2M: goal drops to 4K
    assert (r.ret, r.level) == (Ret.FIXED, 1)
    assert r.spte == leaf4k(DATA_BASE_PFN + 100)
    assert flushes(vm) == 0
    # Populate (prefetch, not exec) obeys the same rule.
    assert vm.populate(0, 512) == 510
    assert vm.stats["pages_4k"] == 512 and vm.stats["pages_2m"] == 0
    vm.check()


def test_21_adjust_needs_the_nx_flag_on_the_child_table() -> None:
    # Tables linked by a non-exec MMIO fault are not NX-disallowed: a later huge mapping
    # replaces them.  The same after an exec MMIO fault keeps them and maps 4K.
    for exec_first, level in ((False, 2), (True, 1)):
        vm = ReferenceVM(memory="64MiB", nx_huge_pages=True)
        assert vm.fault(GiB + 3, exec=exec_first).ret == Ret.EMULATE
        vm.add_memslot(GiB, MiB2, backing="2M")
        r = vm.fault(GiB + 3)
        assert r.level == level, exec_first
        vm.check()


def test_21_split_children_get_x_back_only_at_4k() -> None:
    huge = ref.make_leaf_spte(0x40000, 3, exec=False)
    c2 = ref.make_small_spte(huge, 2, 3, nx_huge_pages=True)
    assert c2 == ref.make_leaf_spte(0x40000 + 3 * 512, 2, exec=False)
    c1 = ref.make_small_spte(ref.make_leaf_spte(0x200, 2, exec=False), 1, 7, nx_huge_pages=True)
    assert c1 == leaf4k(0x207)
    c1_off = ref.make_small_spte(ref.make_leaf_spte(0x200, 2), 1, 7, nx_huge_pages=False)
    assert c1_off == leaf4k(0x207)


# ------------------------------------------------------------------------------------------
# docs/model.md choices: arena order, grace period, MMIO cache, results, costs
# ------------------------------------------------------------------------------------------


def test_free_order_is_post_order_and_reuse_is_lifo() -> None:
    vm = ReferenceVM(memory="64MiB", slot_zap_all=False)
    slot = vm.add_memslot(GiB, GiB, backing="4K")
    vm.fault(GiB)  # root (0), L3 (1), L2 (2), L1 (3)
    vm.fault(GiB + MiB2)  # L1 (4)
    assert len(vm.tables()) == 5
    vm.delete_memslot(slot)  # leaf zap: tables stay
    vm.add_memslot(GiB, GiB, backing="1G")
    vm.fault(GiB)  # 1G leaf replaces L2 (2): frees L1 (3), L1 (4), then L2 (2)
    assert vm.arena.reusable == [3, 4, 2]
    assert all(e == FROZEN for i in (2, 3, 4) for e in vm.tables()[i])
    vm.fault(0x100)  # needs an L2 and an L1: pops 2, then 4
    assert vm.walk(0x100) == [
        (4, nonleaf(1)),
        (3, nonleaf(2)),
        (2, nonleaf(4)),
        (1, leaf4k(DATA_BASE_PFN + 0x100)),
    ]
    assert vm.arena.reusable == [3]
    vm.check()


def test_tables_freed_by_an_operation_are_reused_only_after_it() -> None:
    vm = ReferenceVM(memory="64MiB", slot_zap_all=False)
    vm.add_memslot(GiB, GiB, backing="4K")
    vm.fault(GiB + 1)
    slot2 = vm.add_memslot(2 * GiB, GiB, backing="4K")
    del slot2
    vm.delete_memslot(1)
    vm.add_memslot(GiB, GiB, backing="1G")
    n_tables = len(vm.tables())
    # One batch: the first fault frees the old L2+L1; the second needs two new tables.
    rets = vm.fault_batch([GiB + 1, 2 * GiB + 1])
    assert rets == [Ret.FIXED, Ret.FIXED]
    assert len(vm.tables()) == n_tables + 2  # not served from the tables freed in the batch
    assert len(vm.arena.reusable) == 2
    vm.check()


def test_mmio_cache_hit_rules() -> None:
    vm = ReferenceVM(memory="64MiB", slot_zap_all=False)
    c = vm.costs
    r = vm.fault(GiB + 5)
    spte = ref.make_mmio_spte(GiB + 5, vm.memslot_generation)
    assert (r.ret, r.level, r.spte) == (Ret.EMULATE, 1, spte)
    # Creating the MMIO SPTE goes through the map step.
    assert r.modeled_ns == c["exit_entry_ns"] + c["fault_handling_ns"] + c["fault_map_ns"]
    s = vm.stats
    assert (s["pf_taken"], s["pf_emulate"], s["pf_mmio_spte_created"]) == (1, 1, 1)
    r = vm.fault(GiB + 5)  # cache hit: no pf_taken, no pf_emulate, no map step
    assert (r.ret, r.spte, r.modeled_ns) == (
        Ret.EMULATE,
        spte,
        c["exit_entry_ns"] + c["fault_handling_ns"],
    )
    s = vm.stats
    assert (s["pf_taken"], s["pf_emulate"], s["pf_mmio_spte_created"]) == (1, 1, 1)
    # A memslot change bumps the generation: the stale SPTE is replaced on the next fault.
    vm.delete_memslot(vm.add_memslot(8 * GiB, 1))
    r = vm.fault(GiB + 5)
    assert r.spte == ref.make_mmio_spte(GiB + 5, vm.memslot_generation) != spte
    assert vm.stats["pf_mmio_spte_created"] == 2 and vm.stats["pf_taken"] == 2
    # A memslot added over it simply overwrites the MMIO SPTE.
    vm.add_memslot(GiB, 16)
    r = vm.fault(GiB + 5)
    assert r.ret == Ret.FIXED and r.spte == leaf4k(vm.memslots()[-1][5] + 5)
    assert flushes(vm) == 0
    vm.check()


def test_fault_results_and_counters() -> None:
    vm = ReferenceVM(memory="64MiB", vcpus=2)
    r = vm.fault(3, write=False)
    assert (r.ret, r.level, r.retries, r.gfn, r.private) == (Ret.FIXED, 1, 0, 3, False)
    assert r.spte == vm.fault(4, write=True).spte - (1 << 12)  # reads map writable too
    r = vm.fault(3, vcpu=1)
    assert (r.ret, r.level) == (Ret.SPURIOUS, 1)
    s = vm.stats
    assert (s["pf_taken"], s["pf_fixed"], s["pf_spurious"]) == (3, 2, 1)
    assert s["roots_allocated"] == 1 and vm.roots()[0]["refcount"] == 3
    with pytest.raises(ValueError, match="private"):
        vm.fault(3, private=True)
    with pytest.raises(ValueError):
        vm.fault(1 << 36)
    with pytest.raises(ValueError):
        vm.fault(3, vcpu=2)
    assert vm.stats == s  # bad input changed nothing


def test_costs_first_touch_and_overrides() -> None:
    vm = ReferenceVM(memory="2GiB", backing="2M", costs={"exit_entry_ns": 100})
    c = vm.costs
    assert c["exit_entry_ns"] == 100  # the override; the rest are the defaults
    assert {k: v for k, v in c.items() if k != "exit_entry_ns"} == {
        k: v for k, v in ref.DEFAULT_COSTS.items() if k != "exit_entry_ns"
    }
    first_touch = c["host_page_alloc_ns"] + 511 * c["host_zero_4k_ns"]
    fault = 100 + c["fault_handling_ns"] + c["fault_map_ns"]  # exit, handling, map step
    r = vm.fault(0)
    assert r.modeled_ns == fault + first_touch
    assert vm.stats["host_pages_allocated"] == 1
    r = vm.fault(1)
    # A write exit on a leaf that already allows it: fast_page_fault finds it spurious, for
    # the exit and fast_fix_ns only (no fault handling, no map step).
    fast = 100 + c["fast_fix_ns"]
    assert r.modeled_ns == fast and r.ret == Ret.SPURIOUS
    assert (vm.stats["pf_fast"], vm.stats["pf_spurious"]) == (1, 1)
    assert vm.populate(MiB2, 3 * MiB2) == 3
    assert vm.stats["host_pages_allocated"] == 4
    # populate is a prefetch: no exit and no map-step cost, handling only for what it fixes.
    expected = (fault + first_touch) + fast + 3 * (c["fault_handling_ns"] + first_touch)
    assert vm.stats["modeled_ns"] == pytest.approx(expected)
    # A split charges 512 SPTE updates.
    nx = ReferenceVM(memory="1GiB", backing="2M", nx_huge_pages=True)
    nx.fault(0)
    d = nx.costs
    split_fault = d["exit_entry_ns"] + d["fault_handling_ns"] + d["fault_map_ns"]
    assert nx.fault(0, exec=True).modeled_ns == split_fault + 512 * d["spte_update_ns"]


def test_first_touch_is_forgotten_with_the_memslot() -> None:
    vm = ReferenceVM(memory="64MiB", slot_zap_all=True)
    slot = vm.add_memslot(GiB, MiB2, backing="2M")
    vm.fault(GiB)
    vm.zap_gfn_range(GiB, MiB2)
    vm.fault(GiB)  # zaps do not free host pages
    assert vm.stats["host_pages_allocated"] == 1
    vm.delete_memslot(slot)
    vm.add_memslot(GiB, MiB2, backing="2M")
    vm.fault(GiB)
    assert vm.stats["host_pages_allocated"] == 2
    vm.check()


def test_populate_requires_memslots_and_skips_mapped_pages() -> None:
    vm = ReferenceVM(memory="64MiB")
    with pytest.raises(ValueError):
        vm.populate(16383, 2)  # crosses the end of slot 0
    assert vm.stats["roots_allocated"] == 0
    vm.fault(5)
    assert vm.populate(0, 10) == 9
    assert vm.spte(5) == leaf4k(DATA_BASE_PFN + 5)  # untouched: prefetch is spurious
    assert vm.spte(6) == (leaf4k(DATA_BASE_PFN + 6) & ~(1 << 8))
    vm.check()


def test_check_detects_corruption() -> None:
    vm = ReferenceVM(memory="64MiB")
    vm.fault(5)
    vm.check()
    root = vm.tdp_mmu.valid_direct_root()
    leaf_table = vm.arena.child_sp(vm.walk(5)[2][1])
    leaf_table.spt[5] = FROZEN
    with pytest.raises(ref.InvariantError):
        vm.check()
    leaf_table.spt[5] = leaf4k(DATA_BASE_PFN + 6)  # wrong pfn
    with pytest.raises(ref.InvariantError):
        vm.check()
    leaf_table.spt[5] = leaf4k(DATA_BASE_PFN + 5)
    vm.check()
    vm.ctx.stats["pages_4k"] += 1
    with pytest.raises(ref.InvariantError):
        vm.check()
    vm.ctx.stats["pages_4k"] -= 1
    root.refcount += 1
    with pytest.raises(ref.InvariantError):
        vm.check()


def test_vm_types_hook_designs_and_options() -> None:
    with pytest.raises(ValueError):
        ReferenceVM(vm_type="nope")
    with pytest.raises(ValueError):
        ReferenceVM(memory="3MiB", backing="2M")
    for vm_type, hooks in [("tdx", "gmem"), ("snp", "mirror"), ("sw_protected", "mirror")]:
        with pytest.raises(ValueError):
            ReferenceVM(vm_type=vm_type, hooks=hooks)
    with pytest.raises(ValueError):
        ReferenceVM(vm_type="snp", tdx={"track": "batched"})  # TDX options on a non-TD
    with pytest.raises(ValueError):
        ReferenceVM(vm_type="tdx", tdx={"TDH.MEM.PAGE.AUG": 0.5})  # busy is not modeled
    with pytest.raises(ValueError):
        ReferenceVM(vm_type="tdx", tdx={"version": "6.1"})
    with pytest.raises(ValueError):
        ReferenceVM(vm_type="snp", folio="1G")
    assert ReferenceVM(vm_type="tdx").hooks_name == "mirror"
    assert ReferenceVM(vm_type="snp").hooks_name == "gmem"
    assert ReferenceVM(vm_type="sw_protected", mirror=True).hooks_name == "mirror"
    assert ReferenceVM(vm_type="tdx", levels=5).shared_bit == 1 << 39
    assert ref.tdp_root_role(4) & ref.ROLE_IS_MIRROR == 0
    assert ref.tdp_root_role(4, is_mirror=True) & ref.ROLE_IS_MIRROR


# ------------------------------------------------------------------------------------------
# Confidential VMs: memory attributes, MEMORY_FAULT, guest_memfd
# ------------------------------------------------------------------------------------------


def test_private_ranges_set_split_merge_uniform() -> None:
    p = ref.PrivateRanges()
    p.set(0, 100, True)
    p.set(10, 20, False)
    assert p.ranges() == [(0, 10), (20, 100)]
    assert p.uniform(0, 10) is True and p.uniform(5, 15) is None and p.uniform(10, 20) is False
    assert p.uniform(100, 200) is False and not p.is_private(100) and p.is_private(99)
    p.set(10, 20, True)
    p.set(100, 110, True)
    assert p.ranges() == [(0, 110)]


def test_08_mismatch_and_private_without_gmem_are_memory_faults() -> None:
    vm = ReferenceVM(vm_type="sw_protected", memory="64MiB")
    r = vm.fault(5, private=False)  # slot 0 starts all-private
    assert r.ret == Ret.MEMORY_FAULT and vm.stats["pf_memory_fault"] == 1
    assert vm.tables()[0] == [SVE] * 512  # only the root: nothing mapped
    slot = vm.add_memslot(1 << 20, 512, gmem=False)
    vm.set_memory_attributes(1 << 20, 512, True)
    assert vm.fault((1 << 20) + 1, private=True).ret == Ret.MEMORY_FAULT
    assert vm.fault(5).ret == Ret.FIXED  # private=None follows the attribute
    assert ref.spte_to_pfn(vm.spte(5)) == vm.slots[0].gmem_pfn + 5  # from guest_memfd
    vm.delete_memslot(slot)
    vm.check()


def test_21_mixed_attribute_ranges_are_not_mapped_huge() -> None:
    vm = ReferenceVM(vm_type="sw_protected", memory="64MiB", backing="2M", folio="2M")
    assert vm.fault(5).level == 2
    vm.set_memory_attributes(MiB2 + 7, 1, False)
    assert vm.fault(MiB2 + 8).level == 1
    assert vm.fault(MiB2 + 7).level == 1 and not vm.fault(MiB2 + 7).private
    vm.check()


def test_conversion_charges_and_2m_folio_splits() -> None:
    vm = ReferenceVM(vm_type="snp", memory="64MiB", folio="2M")
    costs = ref.DEFAULT_COSTS
    before = vm.stats["modeled_ns"]
    assert vm.set_memory_attributes(0, 512, True) == 0  # no change: nothing charged
    assert vm.stats["conversions"] == 0
    vm.set_memory_attributes(10, 20, False)  # both edges inside one 2M folio: one split
    assert vm.stats["conversions"] == 1 and vm.stats["gmem_splits"] == 1
    vm.set_memory_attributes(500, 600, False)  # two folios cut
    assert vm.stats["gmem_splits"] == 3
    want = 2 * (costs["psc_exit_ns"] + costs["gmem_convert_ns"]) + 3 * costs["gmem_split_2m_ns"]
    assert vm.stats["modeled_ns"] - before == pytest.approx(want)


def test_punch_hole_frees_guest_memfd_pages() -> None:
    vm = ReferenceVM(vm_type="sw_protected", memory="64MiB")
    vm.fault(3)
    assert vm.stats["host_pages_allocated"] == 1
    assert vm.punch_hole(0, 8) == 1
    vm.fault(3)
    assert vm.stats["host_pages_allocated"] == 2  # allocated again
    with pytest.raises(ValueError):
        ReferenceVM().punch_hole(0, 1)


# ------------------------------------------------------------------------------------------
# TDX: hooks, SEAMCALLs, the S-EPT, roots (§10.4-§10.17, §10.22, §10.23)
# ------------------------------------------------------------------------------------------


def running_td(**kwargs: Any) -> Any:
    vm = ReferenceVM(vm_type="tdx", memory="64MiB", **kwargs)
    vm.finalize()
    return vm


def test_04_empty_tree_private_fault_links_then_sets() -> None:
    for levels, links in ((4, 3), (5, 4)):
        vm = running_td(levels=levels)
        r = vm.fault(0x1234, private=True)
        assert r.ret == Ret.FIXED and r.level == 1 and r.private
        s = vm.stats
        assert (s["link_external_spt"], s["set_external_spte"]) == (links, 1)
        assert (s["TDH.MEM.SEPT.ADD"], s["TDH.MEM.PAGE.AUG"], s["sept_tables"]) == (links, 1, links)
        assert s["TDG.MEM.PAGE.ACCEPT"] == 1  # the guest accepted the PENDING page
        sept = vm.sept_entries()
        assert [e[2] for e in sept] == ["TABLE"] * links + ["MAPPED"]
        assert sept[-1][0] == 0x1234
    vm = running_td()
    vm.fault(0x1234, private=True)
    vm.fault(0x1235, private=True)
    vm.fault(0x1234 + MiB2, private=True)
    s = vm.stats
    assert (s["link_external_spt"], s["set_external_spte"]) == (4, 3)


def test_05_17_shared_fault_uses_the_aliased_direct_root_without_hooks() -> None:
    vm = running_td()
    vm.set_memory_attributes(0x40, 1, False)
    r = vm.fault(0x40)
    assert r.ret == Ret.FIXED and not r.private
    assert vm.stats["link_external_spt"] == 0
    direct = vm.tdp_mmu.current_root(mirror=False)
    assert all(e == SVE for e in direct.spt[:256]) and direct.spt[256] != SVE  # index of g|2^35
    child = vm.arena.child_sp(direct.spt[256])
    assert child.gfn == 0  # sp->gfn stays un-aliased
    assert vm.walk(0x40, private=True)[-1][1] == SVE
    it = ref.TdpIter(vm.arena, direct, 1, 1 << 35, (1 << 35) + 1, gfn_bits=1 << 35)
    assert not list(it)  # a walk from an already-aliased gfn yields nothing


def test_09_private_leaf_zap_sequence() -> None:
    vm = running_td(vcpus=2)
    vm.fault(7, private=True)
    before = dict(vm.stats)
    assert vm.set_memory_attributes(7, 1, False) == 1
    s = vm.stats
    for key in (
        "remove_external_spte",
        "TDH.MEM.RANGE.BLOCK",
        "TDH.MEM.TRACK",
        "vcpu_kicks",
        "TDH.MEM.PAGE.REMOVE",
        "TDH.PHYMEM.PAGE.WBINVD",
        "page_clear",
    ):
        assert s[key] - before[key] == 1, key
    assert s["free_external_spt"] == 0 and s["sept_tables"] == 3  # tables stay
    assert vm.walk(7, private=True)[-1] == (1, SVE)
    vm.check()


def test_batched_tracking_and_two_hook_counting() -> None:
    vm = running_td(tdx={"track": "batched", "interface": "two_hook"})
    for gfn in range(4):
        vm.fault(gfn, private=True)
    s0 = dict(vm.stats)
    assert (s0["link_external_spt"], s0["set_external_spte"]) == (0, 3 + 4)
    vm.punch_hole(0, 4)
    s = vm.stats
    assert s["TDH.MEM.RANGE.BLOCK"] == 4 and s["TDH.MEM.TRACK"] == 1 and s["vcpu_kicks"] == 1
    assert s["TDH.MEM.PAGE.REMOVE"] == 4 and s["remove_external_spte"] == 0
    assert s["set_external_spte"] - s0["set_external_spte"] == 4
    vm.check()


def test_11_12_kvm_bug_rules_mark_the_vm_bugged() -> None:
    vm = running_td()
    vm.fault(1, private=True)
    mirror = vm.tdp_mmu.current_root(mirror=True)
    vm._begin_operation()
    vm.tdp_mmu.tdp_mmu_zap_root(mirror, shared=True)
    with pytest.raises(ref.VmBugged, match="mirror"):
        vm._end_of_operation()
    assert vm.bugged
    with pytest.raises(ref.VmBugged):
        vm.fault(2, private=True)
    with pytest.raises(ref.VmBugged):
        vm.check()

    vm = running_td()
    vm.fault(1, private=True)
    mirror = vm.tdp_mmu.current_root(mirror=True)
    vm._begin_operation()
    vm.tdp_mmu.tdp_mmu_zap_root(mirror, shared=False)
    with pytest.raises(ref.VmBugged, match="HKID"):
        vm._end_of_operation()
    s = vm.stats
    assert s["external_spt_leaked"] == 3 and s["TDH.MEM.SEPT.REMOVE"] == 0


def test_14_15_16_filters_fast_zap_and_root_refcounts() -> None:
    vm = running_td(vcpus=2)
    vm.set_memory_attributes(MiB2, MiB2, False)
    vm.fault(1, private=True, vcpu=0)
    vm.fault(MiB2 + 1, vcpu=1)
    roots = vm.roots()
    assert [(r["mirror"], r["refcount"]) for r in roots] == [(False, 3), (True, 3)]
    assert vm.mmu_notifier_invalidate(0, 2 * MiB2) == 1
    assert vm.walk(1, private=True)[-1][1] != SVE
    vm.zap_all_fast()
    roots = vm.roots()
    assert [(r["mirror"], r["refcount"]) for r in roots] == [(True, 3)]
    assert vm.walk(1, private=True)[-1][1] != SVE
    assert vm.punch_hole(0, MiB2) == 1
    vm.check()


def test_22_initial_image_and_v6_16_premapping() -> None:
    vm = ReferenceVM(vm_type="tdx", memory="64MiB", tdx={"measure": True})
    with pytest.raises(ValueError):
        vm.fault(0, private=True)  # no vCPU runs before finalize
    with pytest.raises(ValueError):
        vm.populate(0, 1, private=False)  # only the private image before finalize
    assert vm.populate(0, 2, private=True) == 2
    s = vm.stats
    assert s["TDH.MEM.PAGE.ADD"] == 2 and s["TDH.MR.EXTEND"] == 32 and s["pf_taken"] == 0
    assert [e[2] for e in vm.sept_entries()][-2:] == ["MAPPED", "MAPPED"]
    vm.finalize()
    with pytest.raises(ValueError):
        vm.finalize()
    vm.populate(8, 1)  # after finalize: PAGE.AUG, PENDING until the guest touches it
    assert vm.sept_entries()[-1][2] == "PENDING"
    assert vm.fault(8).ret == Ret.SPURIOUS and vm.sept_entries()[-1][2] == "MAPPED"

    vm = ReferenceVM(vm_type="tdx", memory="64MiB", tdx={"version": "6.16"})
    vm.populate(0, 1, private=True)
    assert vm.stats["TDH.MEM.PAGE.ADD"] == 1 and vm.sept.nr_premapped == 0
    assert vm.vendor.external is not None
    vm.vendor.external.set_external_spte(5, 1, ref.make_leaf_spte(0x99, 1))  # premapped only
    with pytest.raises(ValueError, match="premapped"):
        vm.finalize()


def test_23_teardown_reclaims_each_sept_table_once() -> None:
    vm = running_td(vcpus=2)
    vm.fault(1, private=True)
    vm.fault(MiB2 + 1, private=True)  # one more 4K table
    vm.destroy()
    s = vm.stats
    assert s["free_external_spt"] == s["TDH.PHYMEM.PAGE.RECLAIM"] == 4
    assert s["TDH.MEM.PAGE.REMOVE"] == 2 and s["sept_tables"] == 0
    assert s["TDH.VP.FLUSH"] == 2 and s["TDH.MNG.KEY.FREEID"] == 1
    vm.check()  # the teardown audit passes
    with pytest.raises(ValueError, match="vm"):
        vm.fault(1, private=True)

    vm = running_td(tdx={"sept_free": "sept_remove"})
    vm.fault(1, private=True)
    vm.destroy()
    s = vm.stats
    assert s["TDH.MEM.SEPT.REMOVE"] == 3 and s["TDH.PHYMEM.PAGE.RECLAIM"] == 0
    vm.check()


def test_private_design_breaks_the_mirror_s_ept_agreement() -> None:
    vm = running_td(hooks="private")
    vm.fault(1, private=True)
    vm.zap_gfn_range(0, 8)  # no PRIVATE filter: no hook
    with pytest.raises(ref.InvariantError):
        vm.check()
    with pytest.raises(ref.VmBugged, match=r"PAGE\.AUG"):
        vm.fault(1, private=True)


def test_sw_protected_mirror_counts_hooks_but_no_seamcalls() -> None:
    vm = ReferenceVM(vm_type="sw_protected", mirror=True, memory="64MiB")
    vm.fault(1)
    vm.punch_hole(0, 2)
    s = vm.stats
    assert s["link_external_spt"] == 3 and s["remove_external_spte"] == 1
    assert all(s[leaf] == 0 for leaf in ref.SEAMCALL_LEAVES) and s["vcpu_kicks"] == 0
    vm.destroy()
    assert vm.stats["free_external_spt"] == 3
    vm.check()


# ------------------------------------------------------------------------------------------
# SEV-SNP: the RMP (§10.24), PVALIDATE, rmp_fault
# ------------------------------------------------------------------------------------------


def rmp(vm: Any, gfn: int) -> tuple[bool, bool, str, int]:
    e = vm.rmp_entry(gfn)
    return (e["assigned"], e["validated"], e["size"], e["gpa"] >> 12)


def test_24_first_private_fault_prepares_and_the_guest_validates() -> None:
    vm = ReferenceVM(vm_type="snp", memory="64MiB")
    vm.fault(5)
    assert vm.stats["rmpupdate"] == 1 and vm.stats["gmem_prepare"] == 1
    assert rmp(vm, 5) == (True, True, "4K", 5) and vm.stats["pvalidate"] == 1
    vm.zap_gfn_range(0, 16)  # NPT zaps never touch the RMP
    vm.mmu_notifier_invalidate(0, 16)
    assert rmp(vm, 5) == (True, True, "4K", 5)
    vm.fault(5)  # already assigned and validated
    assert vm.stats["rmpupdate"] == 1 and vm.stats["pvalidate"] == 1
    assert vm.pvalidate(5) == {"NO_UPDATE": 1} and vm.stats["pvalidate_errors"] == 1
    assert vm.pvalidate(5, validate=False) == {"SUCCESS": 1}
    with pytest.raises(ValueError):
        vm.pvalidate(6)  # not assigned
    vm.punch_hole(0, 16)
    assert rmp(vm, 5) == (False, False, "4K", 0)
    vm.check()


def test_24_2m_folio_entries_psmash_and_rmp_fault() -> None:
    vm = ReferenceVM(vm_type="snp", memory="64MiB", backing="2M", folio="2M")
    r = vm.fault(MiB2 + 3)
    assert r.level == 2 and rmp(vm, MiB2 + 3) == (True, True, "2M", MiB2 + 3)
    assert vm.stats["rmpupdate"] == 1
    vm.rmp_fault(MiB2 + 3)  # PSMASH and zap the 2M range
    assert vm.stats["psmash"] == 1 and rmp(vm, MiB2 + 3)[2] == "4K"
    assert vm.walk(MiB2 + 3)[-1][1] == SVE
    assert vm.fault(MiB2 + 3).level == 1  # the RMP entry is 4K now
    vm.fault(2 * MiB2)
    vm.punch_hole(2 * MiB2 + 10, 5)  # only part of a 2M entry: PSMASH first
    assert vm.stats["psmash"] == 2
    assert rmp(vm, 2 * MiB2 + 10)[0] is False and rmp(vm, 2 * MiB2 + 9)[0] is True
    vm.punch_hole(MiB2, MiB2)
    vm.destroy()
    vm.check()  # teardown audit: the RMP is all shared


def test_snp_private_design_follows_the_npt() -> None:
    vm = ReferenceVM(vm_type="snp", memory="64MiB", hooks="private")
    vm.fault(5)
    assert vm.stats["set_external_spte"] == 1 and rmp(vm, 5)[0]
    vm.punch_hole(0, 8)
    assert vm.stats["remove_external_spte"] == 1 and not rmp(vm, 5)[0]
    vm.fault(6)
    vm.mmu_notifier_invalidate(6, 1)  # no PRIVATE filter: the RMP stays assigned
    assert rmp(vm, 6)[0]
    with pytest.raises(ref.VmBugged):
        vm.populate(6, 1)  # RMPUPDATE to private fails: KVM_BUG_ON
    assert vm.populate_stopped_on_bug  # KVM's pre-fault loop stops on a dead VM
    with pytest.raises(ref.VmBugged):
        vm.check()


# ------------------------------------------------------------------------------------------
# One hook dispatch site: every call counted and traced, whatever the backend
# ------------------------------------------------------------------------------------------


def hook_events(vm: Any) -> list[tuple[str, int, int, int]]:
    return [tuple(e) for e in vm.trace_events()]


def test_snp_private_design_counts_and_traces_every_hook_call() -> None:
    vm = ReferenceVM(vm_type="snp", memory="64MiB", hooks="private", trace=True)
    vm.fault(5)  # empty tree: three tables linked, then the leaf
    s = vm.stats
    assert (s["link_external_spt"], s["set_external_spte"]) == (3, 1)
    events = hook_events(vm)
    assert [e[0] for e in events] == ["link_external_spt"] * 3 + ["set_external_spte"]
    assert [e[2] for e in events] == [4, 3, 2, 1]  # the level of each entry written
    assert [e[3] for e in events[:3]] == [1, 2, 3]  # the arena index of each linked table
    assert events[3][3] == vm.spte(5)  # the new leaf
    # A fault on a gfn whose tables exist calls only set_external_spte.
    vm.fault(6)
    assert vm.stats["link_external_spt"] == 3 and vm.stats["set_external_spte"] == 2
    # The guest_memfd release at teardown is a PRIVATE unmap: both leaves are removed.  The
    # root teardown after it acts for no private memory, so this design frees no table
    # through the hooks (free_external_spt is counted like the others where it is called:
    # see the TDX and SW-mirror teardown tests).
    vm.destroy()
    s = vm.stats
    assert s["remove_external_spte"] == 2 and s["free_external_spt"] == 0
    assert [e[0] for e in hook_events(vm)][-2:] == ["remove_external_spte"] * 2


def test_hook_counts_are_the_same_for_every_backend() -> None:
    """One private fault and its removal call the same hooks on a TD, on the software mirror
    and on SNP with the private design; only the backend's own work differs."""
    counts = []
    for cfg in (
        {"vm_type": "tdx"},
        {"vm_type": "sw_protected", "mirror": True},
        {"vm_type": "snp", "hooks": "private"},
    ):
        vm = ReferenceVM(memory="64MiB", trace=True, **cfg)  # type: ignore[arg-type]
        if cfg["vm_type"] == "tdx":
            vm.finalize()
        vm.fault(5, private=True)
        vm.punch_hole(5, 1)
        s = vm.stats
        names = ("link_external_spt", "set_external_spte", "remove_external_spte")
        counts.append(tuple(s[n] for n in names))
        assert [e[0] for e in hook_events(vm)] == [
            "link_external_spt",
            "link_external_spt",
            "link_external_spt",
            "set_external_spte",
            "remove_external_spte",
        ]
    assert counts == [(3, 1, 1)] * 3


def test_two_hook_interface_traces_links_and_removals_as_set() -> None:
    vm = ReferenceVM(vm_type="tdx", memory="64MiB", tdx={"interface": "two_hook"}, trace=True)
    vm.finalize()
    vm.fault(5, private=True)
    vm.punch_hole(5, 1)
    assert [e[0] for e in hook_events(vm)] == ["set_external_spte"] * 5
    assert [e[2] for e in hook_events(vm)] == [4, 3, 2, 1, 1]
    s = vm.stats
    assert (s["link_external_spt"], s["set_external_spte"], s["remove_external_spte"]) == (0, 5, 0)


def test_no_trace_unless_asked() -> None:
    vm = ReferenceVM(vm_type="tdx", memory="64MiB")
    vm.finalize()
    vm.fault(5, private=True)
    assert vm.trace_events() == []


# ------------------------------------------------------------------------------------------
# The cost ledger: integer units per CostModel field, an exact total
# ------------------------------------------------------------------------------------------


def test_default_costs_are_the_cost_model_in_its_field_order() -> None:
    from tdpmmu.costs import CostModel

    assert list(ref.DEFAULT_COSTS) == list(CostModel.field_names())
    assert CostModel().to_dict() == ref.DEFAULT_COSTS


def exact_sum(breakdown: dict[str, float]) -> float:
    total = 0.0
    for ns in breakdown.values():
        total += ns
    return total


def test_cost_breakdown_has_every_field_and_sums_exactly() -> None:
    from tdpmmu._core import WAIT_FIELDS
    from tdpmmu.costs import CostModel

    vm = ReferenceVM(memory="64MiB", vcpus=3)
    c = vm.costs
    b = vm.cost_breakdown()
    # Every CostModel field in order, then the wait kinds (zero outside virtual time).
    assert list(b) == [*CostModel.field_names(), *WAIT_FIELDS] and set(b.values()) == {0.0}
    assert vm.stats["modeled_ns"] == 0.0
    vm.fault(1)
    vm.zap_gfn_range(0, 8)
    b = vm.cost_breakdown()
    assert list(b) == [*CostModel.field_names(), *WAIT_FIELDS]
    assert b["exit_entry_ns"] == c["exit_entry_ns"]
    assert b["fault_handling_ns"] == c["fault_handling_ns"]
    assert b["fault_map_ns"] == c["fault_map_ns"]
    assert b["host_page_alloc_ns"] == c["host_page_alloc_ns"]
    assert b["host_zero_4k_ns"] == 0  # 4K page: no more
    # One remote TLB flush: the base once, the per-vCPU part once per vCPU.
    assert b["tlb_flush_base_ns"] == c["tlb_flush_base_ns"]
    assert b["tlb_flush_per_vcpu_ns"] == 3 * c["tlb_flush_per_vcpu_ns"]
    assert b["spte_update_ns"] == c["spte_update_ns"]
    assert all(b[w] == 0.0 for w in WAIT_FIELDS)
    assert vm.stats["modeled_ns"] == exact_sum(b)  # equal, not approximately


def test_cost_ledger_composite_charges_in_units() -> None:
    # Non-integer costs: the total is still exactly the field-order sum of the breakdown.
    costs = {"host_zero_4k_ns": 0.1, "spte_update_ns": 0.3, "kick_per_vcpu_ns": 0.7}
    vm = ReferenceVM(memory="1GiB", backing="2M", nx_huge_pages=True, costs=costs)
    vm.fault(0)  # a first touch of a 2M host page: alloc once, zero 511 more 4K pages
    assert vm.ctx.ledger.units["host_page_alloc_ns"] == 1
    assert vm.ctx.ledger.units["host_zero_4k_ns"] == 511
    vm.fault(0, exec=True)  # NX split: 512 SPTE updates
    assert vm.ctx.ledger.units["spte_update_ns"] == 512
    assert vm.cost_breakdown()["spte_update_ns"] == 512 * 0.3
    assert vm.stats["modeled_ns"] == exact_sum(vm.cost_breakdown())

    td = ReferenceVM(vm_type="tdx", memory="64MiB", vcpus=4, costs=costs)
    td.finalize()
    td.fault(5, private=True)
    td.punch_hole(5, 1)  # BLOCK, TRACK, kick, REMOVE, WBINVD, clear
    units = td.ctx.ledger.units
    assert (units["kick_base_ns"], units["kick_per_vcpu_ns"]) == (1, 4)
    assert td.cost_breakdown()["kick_per_vcpu_ns"] == 4 * 0.7
    assert td.stats["modeled_ns"] == exact_sum(td.cost_breakdown())
