"""The public Python API: construction, faults, walks, the tables view, stats, SPTE helpers."""

import dataclasses
import itertools

import numpy as np
import pytest

import tdpmmu
from tdpmmu import Ret, spte
from tdpmmu._core import DATA_BASE_PFN, TABLE_BASE_PFN

LEAF_4K_LOW = 0x8600_0000_0000_0B77
NONLEAF_LOW = 0x8000_0000_0000_0907


def test_exports() -> None:
    for name in tdpmmu.__all__:
        assert hasattr(tdpmmu, name), name
    assert tdpmmu.__version__ == "0.1.0"
    assert issubclass(tdpmmu.ConfigError, tdpmmu.TdpmmuError)
    assert issubclass(tdpmmu.ConfigError, ValueError)
    for exc in (tdpmmu.VmBugged, tdpmmu.InvariantError, tdpmmu.OutOfMemory):
        assert issubclass(exc, tdpmmu.TdpmmuError)


def test_construction_defaults_and_properties() -> None:
    vm = tdpmmu.VM(memory="64MiB")
    assert isinstance(vm, tdpmmu.VM)
    assert vm.vm_type == "default"
    assert vm.memory == 64 << 20
    assert vm.vcpus == 1
    assert vm.levels == 4
    assert vm.backing == 4096
    assert vm.hooks_name == "none"
    assert vm.bugged is False
    assert vm.shared_bit == 0
    assert vm.costs == tdpmmu.CostModel()
    # Slot 0 covers all of memory from gfn 0.
    slot, gfn, npages, backing, _gmem, _host_pfn = vm.memslots()[0]
    assert (slot, gfn, npages, backing) == (0, 0, (64 << 20) // 4096, 4096)
    assert "vm_type='default'" in repr(vm) and "64MiB" in repr(vm)


def test_keyword_and_size_spellings() -> None:
    a = tdpmmu.VM(memory=64 << 20, backing=2 << 20, levels=5, vcpus=3)
    b = tdpmmu.VM(memory="64M", backing="2M", levels=5, vcpus=3)
    assert (a.memory, a.backing, a.levels, a.vcpus) == (b.memory, b.backing, b.levels, b.vcpus)
    assert a.memslots()[0][3] == 2 << 20


def test_context_manager() -> None:
    with tdpmmu.VM(memory="4MiB") as vm:
        assert vm.fault(1).ret is Ret.FIXED


def test_fault_returns_fault_with_ret_member(vm: tdpmmu.VM) -> None:
    r = vm.fault(5)
    assert isinstance(r, tdpmmu.Fault)
    assert isinstance(r.ret, Ret)
    assert r.ret is Ret.FIXED
    assert r.level == 1
    assert r.retries == 0
    assert r.gfn == 5
    assert r.private is False
    assert r.spte == ((DATA_BASE_PFN + 5) << 12) | LEAF_4K_LOW
    # Touching it again finds a present leaf that allows the access.
    again = vm.fault(5)
    assert again.ret is Ret.SPURIOUS
    assert again.spte == r.spte


def test_ret_codes_are_kvms() -> None:
    assert [(m.name, int(m)) for m in Ret] == [
        ("CONTINUE", 0),
        ("RETRY", 1),
        ("EMULATE", 2),
        ("WRITE_PROTECTED", 3),
        ("INVALID", 4),
        ("FIXED", 5),
        ("SPURIOUS", 6),
        ("MEMORY_FAULT", 7),
    ]


def test_mmio_fault_outside_memslots(vm: tdpmmu.VM) -> None:
    beyond = vm.memory // 4096 + 10
    r = vm.fault(beyond)
    assert r.ret is Ret.EMULATE
    assert vm.stats["pf_mmio_spte_created"] == 1
    assert spte.decode(vm.spte(beyond))["mmio"] is True


def test_fault_batch_dtype_shape_and_codes(vm: tdpmmu.VM) -> None:
    gfns = np.arange(100, 164, dtype=np.uint64)
    rets = vm.fault_batch(gfns)
    assert isinstance(rets, np.ndarray)
    assert rets.dtype == np.uint8
    assert rets.shape == gfns.shape
    assert (rets == Ret.FIXED).all()
    assert (vm.fault_batch(gfns) == Ret.SPURIOUS).all()
    empty = vm.fault_batch(np.array([], dtype=np.uint64))
    assert empty.shape == (0,) and empty.dtype == np.uint8
    # A strided (non-contiguous) view is accepted as well.
    assert (vm.fault_batch(np.arange(200, 300, dtype=np.uint64)[::2]) == Ret.FIXED).all()


def test_stats_keys_are_kvm_names(vm: tdpmmu.VM) -> None:
    stats = vm.stats
    assert isinstance(stats, tdpmmu.Stats)
    for name in (
        "pf_taken",
        "pf_fixed",
        "pf_spurious",
        "pf_retry",
        "pf_emulate",
        "pages_4k",
        "pages_2m",
        "pages_1g",
        "remote_tlb_flush",
        "modeled_ns",
    ):
        assert name in stats, name
    assert set(tdpmmu._core.COUNTER_NAMES) <= set(stats)
    assert all(v == 0 for k, v in stats.items() if k.startswith("pf_"))
    vm.fault(0)
    vm.fault(0)
    after = vm.stats
    assert (after["pf_taken"], after["pf_fixed"], after["pf_spurious"]) == (2, 1, 1)
    assert after["pages_4k"] == 1
    assert isinstance(after["modeled_ns"], float)
    assert (after - stats)["pf_taken"] == 2
    # A snapshot does not follow the VM.
    vm.fault(1)
    assert after["pf_fixed"] == 1


def test_stats_is_an_immutable_mapping(vm: tdpmmu.VM) -> None:
    stats = vm.stats
    with pytest.raises(TypeError):
        stats["pf_taken"] = 5  # type: ignore[index]
    with pytest.raises(AttributeError):
        stats.pf_taken  # type: ignore[attr-defined]  # noqa: B018
    assert stats.to_dict() == dict(stats)
    assert len(stats) == len(list(stats))
    assert repr(stats).startswith("Stats(")


def test_spte_constants() -> None:
    assert spte.SHADOW_NONPRESENT_VALUE == 0x8000_0000_0000_0000
    assert spte.FROZEN_SPTE == 0x8000_0000_0000_05A0
    assert not spte.is_shadow_present(spte.FROZEN_SPTE)
    assert not spte.is_shadow_present(spte.SHADOW_NONPRESENT_VALUE)
    assert spte.is_frozen(spte.FROZEN_SPTE)
    assert not spte.is_frozen(spte.FROZEN_SPTE | 1)


def test_spte_constructors_and_decode() -> None:
    pfn = 0x12345
    leaf = spte.make_leaf(pfn)
    assert leaf == pfn << 12 | LEAF_4K_LOW
    assert spte.make_leaf(pfn, 2) == leaf | 1 << 7
    assert spte.make_leaf(pfn, 2, exec=False) == (leaf | 1 << 7) & ~0x4
    assert spte.make_leaf(pfn, prefetch=True) == pfn << 12 | 0x8600_0000_0000_0A77
    assert spte.make_nonleaf(pfn) == pfn << 12 | NONLEAF_LOW
    d = spte.decode(leaf)
    assert d["present"] is True and d["frozen"] is False and d["mmio"] is False
    assert d["pfn"] == pfn
    assert d["writable"] and d["readable"] and d["executable"] and d["large"] is False
    assert spte.decode(spte.FROZEN_SPTE)["frozen"] is True
    assert spte.decode(spte.FROZEN_SPTE)["present"] is False
    mmio = spte.make_mmio(0x777, generation=2)
    assert spte.decode(mmio)["mmio"] is True
    assert not spte.is_shadow_present(mmio)
    assert spte.pfn(leaf) == pfn and spte.is_last(leaf, 1)
    assert not spte.is_last(spte.make_nonleaf(pfn), 2)


def test_walk_from_root_to_leaf(vm: tdpmmu.VM) -> None:
    gfn = 0x1234
    assert vm.walk(gfn) == []  # no root until the first fault loads one (kvm_mmu_load)
    vm.fault(0)
    # gfn shares the 1G region of gfn 0 but not its 2M region: the walk stops at the empty
    # level-2 entry.
    partial = vm.walk(gfn)
    assert partial[:2] == vm.walk(0)[:2]
    assert partial[2] == (2, spte.SHADOW_NONPRESENT_VALUE)
    assert len(partial) == 3
    vm.fault(gfn)
    path = vm.walk(gfn)
    assert [level for level, _ in path] == [4, 3, 2, 1]
    for _level, value in path[:-1]:
        assert value & ~spte.PFN_MASK == NONLEAF_LOW
        assert spte.pfn(value) >= TABLE_BASE_PFN
    leaf_level, leaf = path[-1]
    assert leaf == ((DATA_BASE_PFN + gfn) << 12) | LEAF_4K_LOW
    assert spte.is_last(leaf, leaf_level)
    assert vm.spte(gfn) == leaf


def _index(gfn: int, level: int) -> int:
    return (gfn >> (9 * (level - 1))) & 511


def test_tables_view_is_readonly_and_matches_walk(vm: tdpmmu.VM) -> None:
    gfn = 0x2345
    vm.fault(gfn)
    t = vm.tables()
    assert t.dtype == np.uint64
    assert t.ndim == 2 and t.shape[1] == 512
    assert t.flags.writeable is False
    with pytest.raises(ValueError):
        t[0, 0] = 0
    # Fresh tables are all "non-present with SVE" except the entries this fault installed.
    assert t.shape[0] == vm.stats["tdp_mmu_pages"] + 1  # plus the root
    path = vm.walk(gfn)
    root_pfn = vm.roots()[0]["pfn"]
    assert t[root_pfn - TABLE_BASE_PFN, _index(gfn, 4)] == path[0][1]
    for (_, parent), (level, child) in itertools.pairwise(path):
        assert t[spte.pfn(parent) - TABLE_BASE_PFN, _index(gfn, level)] == child
    untouched = int(np.count_nonzero(t != spte.SHADOW_NONPRESENT_VALUE))
    assert untouched == len(path)


def test_tables_view_is_zero_copy(vm: tdpmmu.VM) -> None:
    vm.fault(0)
    t = vm.tables()
    pt = spte.pfn(vm.walk(0)[2][1]) - TABLE_BASE_PFN  # the 4K table under gfn 0
    assert t[pt, 1] == spte.SHADOW_NONPRESENT_VALUE
    vm.fault(1)  # lands in the same, already visible table
    assert t[pt, 1] == vm.spte(1)


def test_populate_prefetch_leaves(vm: tdpmmu.VM) -> None:
    assert vm.populate(0x40, 8) == 8
    assert vm.spte(0x41) == ((DATA_BASE_PFN + 0x41) << 12) | 0x8600_0000_0000_0A77
    assert vm.stats["pf_taken"] == 0


def test_zaps_return_counts(vm: tdpmmu.VM) -> None:
    vm.fault_batch(np.arange(0, 16, dtype=np.uint64))
    assert vm.zap_gfn_range(0, 8) == 8
    assert vm.spte(3) == spte.SHADOW_NONPRESENT_VALUE
    assert vm.mmu_notifier_invalidate(0, 16) == 8
    assert vm.stats["pages_4k"] == 0
    vm.check()


def test_memslots_add_delete(vm: tdpmmu.VM) -> None:
    top = vm.memory // 4096
    gen = vm.memslot_generation
    slot = vm.add_memslot(top, 512, backing="2M")
    assert slot == 1
    assert vm.memslot_generation == gen + 2
    assert vm.fault(top).level == 2
    vm.delete_memslot(slot)
    assert vm.memslot_generation == gen + 4
    assert [s[0] for s in vm.memslots()] == [0]


def test_costs_property_and_mapping_costs() -> None:
    vm = tdpmmu.VM(memory="4MiB", costs={"exit_entry_ns": 10.0})
    assert vm.costs.exit_entry_ns == 10.0
    assert dataclasses.replace(vm.costs, exit_entry_ns=1200.0) == tdpmmu.CostModel()


def test_check_passes_on_fresh_and_used_vm(vm: tdpmmu.VM) -> None:
    vm.check()
    vm.fault_batch(np.arange(0, 1024, 7, dtype=np.uint64), vcpu=1)
    vm.check()


def test_injected_panic_becomes_tdpmmu_error(vm: tdpmmu.VM) -> None:
    with pytest.raises(tdpmmu.TdpmmuError):
        vm._inject_panic()


def test_demand_paging_small() -> None:
    # Host clock: one real thread per vCPU, so the modeled time is the plain per-fault ledger.
    r = tdpmmu.demand_paging(vcpus=2, bytes_per_vcpu="4M", clock="host")
    assert r.pages_per_vcpu == 1024
    assert [d["pages"] for d in r.per_vcpu] == [1024, 1024]
    assert r.stats["pf_fixed"] == 2048
    assert r.wall_overall_demand_paging_rate_pgs_per_s == pytest.approx(
        2 * r.wall_per_vcpu_demand_paging_rate_pgs_per_s
    )
    slowest = max(d["modeled_ns"] for d in r.per_vcpu) / 1e9
    assert r.total_guest_execution_time_s == slowest
    assert r.per_vcpu_demand_paging_rate_pgs_per_s == pytest.approx(1024 / slowest)
    # Every fault is one exit + handling + map step (racing vCPUs may add RETRY/SPURIOUS ones,
    # which reach the map step too), and every 4K page is allocated by the host once.
    c, s = r.costs, r.stats
    assert s["host_pages_allocated"] == 2048
    per_fault = c.exit_entry_ns + c.fault_handling_ns + c.fault_map_ns
    expected = s["pf_taken"] * per_fault + 2048 * c.host_page_alloc_ns
    assert s["modeled_ns"] == pytest.approx(expected)
    # Outside virtual time the wait kinds stay at zero.
    assert all(r.cost_breakdown[k] == 0.0 for k in tdpmmu._core.WAIT_FIELDS)


def test_demand_paging_small_virtual_default() -> None:
    r = tdpmmu.demand_paging(vcpus=2, bytes_per_vcpu="4M")
    assert r.options.clock == "virtual"
    assert r.pages_per_vcpu == 1024
    assert [d["pages"] for d in r.per_vcpu] == [1024, 1024]
    # Every page is fixed exactly once, and every access is a hit or exactly one outcome.
    assert r.stats["pf_fixed"] == 2048
    assert r.stats["host_pages_allocated"] == 2048
    o = r.virtual["outcomes"]
    assert o["accesses"] == 2048
    assert o["fixed"] == 2048
    assert o["accesses"] == (
        o["hits"] + o["fixed"] + o["spurious"] + o["emulate"] + o["write_protected"]
    )
    slowest = max(d["modeled_ns"] for d in r.per_vcpu) / 1e9
    assert r.total_guest_execution_time_s == slowest
    assert tdpmmu.DemandPagingResult.from_json(r.to_json()) == r


def test_demand_paging_overlap_walks_whole_region() -> None:
    r = tdpmmu.demand_paging(vcpus=2, bytes_per_vcpu="1M", overlap=True)
    assert r.pages_per_vcpu == 512
    # memstress's region: 2 MiB at the top of guest-physical space (48 bits), one page spare.
    top = (1 << 48) - 4096
    assert r.region == (top - (2 << 20), top)
    assert r.stats["pf_fixed"] == 512  # each page is first-touched exactly once
