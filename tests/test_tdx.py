"""TDX behaviours of spec §10 (items 1-17 and 19-25 as they apply to a TD), through the public API.

Each test pins the exact hook/SEAMCALL sequence (``vm.trace_events()``), the counters, SPTE values
(``vm.walk``/``vm.spte``/``vm.tables()``) or roots (``vm.roots()``) the rule implies, so that it
fails if the engine broke the rule. ``vm.check()`` runs after every step where the VM must be
consistent. Item 18 (iterator semantics) and the KVM_BUG_ON paths that no public operation can
reach (atomic zap of a mirror entry, freeing an S-EPT table with the HKID assigned under the
upstream ``sept_free="teardown"``) are covered by the engine's own Rust tests.
"""

import threading
from collections import Counter
from typing import Any

import numpy as np
import pytest

import tdpmmu
from tdpmmu import Event, InvariantError, Ret, VmBugged, _core, spte

SVE = spte.SHADOW_NONPRESENT_VALUE
FROZEN = spte.FROZEN_SPTE
HOOKS = ("link_external_spt", "set_external_spte", "remove_external_spte", "free_external_spt")
#: One private 4K page removed while the TD runs (spec §5.5, behaviour 9).
REMOVE_SEQ = [
    "remove_external_spte",
    "TDH.MEM.RANGE.BLOCK",
    "TDH.MEM.TRACK",
    "kick",
    "TDH.MEM.PAGE.REMOVE",
    "TDH.PHYMEM.PAGE.WBINVD",
    "clear",
]
SEAMCALLS = tuple(n for n in _core.COUNTER_NAMES if n.startswith(("TDH.", "TDG.")))
LEAF_BITS = 0x8600_0000_0000_0B77  # 4K writable WB leaf, A/D, IPAT (behaviour 3)
NONLEAF_BITS = 0x8000_0000_0000_0907


def td(vcpus: int = 4, finalize: bool = True, **kw: Any) -> tdpmmu.VM:
    """A 1 GiB TD with tracing; runnable unless ``finalize=False``."""
    vm = tdpmmu.VM("tdx", memory="1GiB", vcpus=vcpus, trace=True, **kw)
    if finalize:
        vm.finalize()
    return vm


def mark(vm: tdpmmu.VM) -> int:
    return len(vm.trace_events())


def since(vm: tdpmmu.VM, n: int) -> list[Event]:
    return vm.trace_events()[n:]


def ops(events: list[Event]) -> list[str]:
    return [e.op for e in events]


def shape(events: list[Event]) -> list[tuple[str, int, int]]:
    return [(e.op, e.gfn, e.level) for e in events]


def hooks_of(events: list[Event]) -> list[tuple[str, int, int]]:
    return [(e.op, e.gfn, e.level) for e in events if e.op in HOOKS]


def root(vm: tdpmmu.VM, mirror: bool) -> dict[str, Any]:
    (r,) = [r for r in vm.roots() if r["mirror"] == mirror and not r["invalid"]]
    return r


def row(pfn: int) -> int:
    """Row of ``vm.tables()`` holding the table at host pfn ``pfn``."""
    return pfn - _core.TABLE_BASE_PFN


def child_pfn(value: int) -> int:
    return (value & spte.PFN_MASK) >> 12


def seamcall_total(vm: tdpmmu.VM) -> int:
    s = vm.stats
    return sum(int(s[n]) for n in SEAMCALLS)


def remove_seq(gfn: int, vcpus: int) -> list[tuple[str, int, int, int]]:
    """(op, gfn, level, detail) of one per-page removal; the kick's detail is the vCPU count."""
    return [
        ("remove_external_spte", gfn, 1, -1),
        ("TDH.MEM.RANGE.BLOCK", gfn, 1, 0),
        ("TDH.MEM.TRACK", 0, 0, 0),
        ("kick", 0, 0, vcpus),
        ("TDH.MEM.PAGE.REMOVE", gfn, 1, 0),
        ("TDH.PHYMEM.PAGE.WBINVD", gfn, 1, 0),
        ("clear", gfn, 1, -1),
    ]


def hkid_release(vcpus: int) -> list[tuple[str, int, int, int]]:
    """(op, gfn, level, detail) of the HKID release at destroy."""
    return [
        *[("TDH.VP.FLUSH", 0, 0, 0)] * vcpus,
        ("TDH.MNG.VPFLUSHDONE", 0, 0, 0),
        ("TDH.PHYMEM.CACHE.WB", 0, 0, 0),
        ("TDH.MNG.KEY.FREEID", 0, 0, 0),
    ]


def sept_remove_seq(gfn: int, level: int, vcpus: int) -> list[tuple[str, int, int, int]]:
    """One S-EPT table (``level`` = its own level) leaving a TD whose HKID is still assigned
    (``sept_free="sept_remove"``): BLOCK and SEPT.REMOVE act on the parent entry, one level up;
    WBINVD and the clear act on the 4K table page."""
    return [
        ("free_external_spt", gfn, level, 0),
        ("TDH.MEM.RANGE.BLOCK", gfn, level + 1, 0),
        ("TDH.MEM.TRACK", 0, 0, 0),
        ("kick", 0, 0, vcpus),
        ("TDH.MEM.SEPT.REMOVE", gfn, level + 1, 0),
        ("TDH.PHYMEM.PAGE.WBINVD", gfn, 1, 0),
        ("clear", gfn, 1, -1),
    ]


def reclaim_seq(gfn: int, level: int) -> list[tuple[str, int, int, int]]:
    """One S-EPT table freed after the HKID release (upstream): RECLAIM at the parent entry."""
    return [("free_external_spt", gfn, level, 0), ("TDH.PHYMEM.PAGE.RECLAIM", gfn, level + 1, 0)]


def leaf_states(vm: tdpmmu.VM) -> dict[int, str]:
    """S-EPT leaf state (MAPPED, PENDING, ...) by gfn, from the TDX module's own tree."""
    return {gfn: state for gfn, level, state, _ in vm.sept_entries() if level == 1}


def full(events: list[Event]) -> list[tuple[str, int, int, int]]:
    """Events with the details that are not fixed (SPTE values, pfns) masked as -1."""
    out = []
    for e in events:
        detail = -1 if e.op in ("remove_external_spte", "clear") else e.detail
        out.append((e.op, e.gfn, e.level, detail))
    return out


# ----- 1-3: table contents and encodings ----------------------------------------------------


def test_b01_fresh_and_zapped_entries_are_shadow_nonpresent() -> None:
    vm = td()
    vm.set_memory_attributes(0x400, 1, private=False)
    vm.fault(0x1234)
    vm.fault(0x400)
    t = vm.tables()
    # Every table (two roots + 3 mirror + 3 direct children) holds only present entries and
    # SHADOW_NONPRESENT_VALUE, never 0.
    assert t.shape[0] == 8
    present = (t & np.uint64(spte.MMU_PRESENT)) != 0
    assert np.all(present | (t == np.uint64(SVE)))
    assert int(present.sum()) == 4 + 4  # a path of 4 entries in each root
    vm.punch_hole(0x1234, 1)
    assert vm.spte(0x1234, private=True) == SVE
    assert vm.walk(0x1234, private=True)[-1] == (1, SVE)
    vm.check()


def test_b02_frozen_constant() -> None:
    assert FROZEN == 0x8000_0000_0000_05A0 == _core.FROZEN_SPTE
    assert not spte.is_shadow_present(FROZEN)
    assert spte.is_frozen(FROZEN)
    # Exact equality: a value one bit away is not frozen.
    assert not spte.is_frozen(FROZEN | 1)
    assert not spte.is_frozen(SVE)


def test_b03_mirror_and_direct_spte_encodings() -> None:
    vm = td()
    r = vm.fault(0x1234)
    assert r.ret == Ret.FIXED and r.private
    walk = vm.walk(0x1234, private=True)
    assert [lvl for lvl, _ in walk] == [4, 3, 2, 1]
    leaf = walk[-1][1]
    assert leaf == r.spte == (spte.pfn(leaf) << 12) | LEAF_BITS
    assert leaf == spte.make_leaf(spte.pfn(leaf), 1)
    for _, v in walk[:-1]:
        assert v == (child_pfn(v) << 12) | NONLEAF_BITS == spte.make_nonleaf(child_pfn(v))
        assert 0 <= row(child_pfn(v)) < vm.tables().shape[0]
    # A shared leaf maps the host page of the default memslot.
    vm.set_memory_attributes(0x600, 1, private=False)
    (_, _, _, _, _, host_pfn) = vm.memslots()[0]
    assert vm.fault(0x600).spte == ((host_pfn + 0x600) << 12) | LEAF_BITS
    vm.check()


# ----- 4-7: the install path ------------------------------------------------------------------


def test_b04_empty_tree_private_fault_links_then_sets() -> None:
    vm = td()
    r = vm.fault(0x1234, private=True)
    assert r.ret == Ret.FIXED and r.level == 1
    ev = vm.trace_events()
    assert shape(ev) == [
        ("link_external_spt", 0, 4),
        ("TDH.MEM.SEPT.ADD", 0, 4),
        ("link_external_spt", 0, 3),
        ("TDH.MEM.SEPT.ADD", 0, 3),
        ("link_external_spt", 0x1200, 2),
        ("TDH.MEM.SEPT.ADD", 0x1200, 2),
        ("set_external_spte", 0x1234, 1),
        ("TDH.MEM.PAGE.AUG", 0x1234, 1),
        ("TDG.MEM.PAGE.ACCEPT", 0x1234, 1),
    ]
    # Each link hands over the child's external page; the set hands over the new SPTE.
    walk = vm.walk(0x1234, private=True)
    links = [e for e in ev if e.op == "link_external_spt"]
    assert [e.detail for e in links] == [row(child_pfn(v)) for _, v in walk[:-1]]
    assert [e.detail for e in ev if e.op == "set_external_spte"] == [r.spte]
    assert all(e.detail == 0 for e in ev if e.op.startswith("TD"))  # TDX_SUCCESS
    # Same 2M: one set; a new 2M in the same 1G: one level-2 link and one set.
    n = mark(vm)
    vm.fault(0x1235)
    vm.fault(0x1234 + 512)
    assert hooks_of(since(vm, n)) == [
        ("set_external_spte", 0x1235, 1),
        ("link_external_spt", 0x1400, 2),
        ("set_external_spte", 0x1434, 1),
    ]
    s = vm.stats
    assert (s["link_external_spt"], s["set_external_spte"]) == (4, 3)
    assert (s["TDH.MEM.SEPT.ADD"], s["TDH.MEM.PAGE.AUG"], s["TDG.MEM.PAGE.ACCEPT"]) == (4, 3, 3)
    assert (s["sept_tables"], s["tdp_mmu_pages"], s["pages_4k"]) == (4, 4, 3)
    vm.check()


def test_b04_five_level_td_links_four_times() -> None:
    vm = td(levels=5)
    assert vm.shared_bit == 1 << 39
    vm.fault(7)
    assert [(op, lvl) for op, _, lvl in hooks_of(vm.trace_events())] == [
        ("link_external_spt", 5),
        ("link_external_spt", 4),
        ("link_external_spt", 3),
        ("link_external_spt", 2),
        ("set_external_spte", 1),
    ]
    vm.check()


def test_b05_shared_fault_uses_only_the_direct_root_and_no_hook() -> None:
    vm = td()
    vm.set_memory_attributes(0x100, 1, private=False)
    tables_before = vm.stats["tdp_mmu_pages"]
    r = vm.fault(0x100)
    assert r.ret == Ret.FIXED and not r.private
    assert vm.trace_events() == []  # no hook, no SEAMCALL
    assert seamcall_total(vm) == 0
    assert vm.stats["tdp_mmu_pages"] == tables_before + 3
    t = vm.tables()
    # The mirror root stays empty; the direct root holds the path.
    assert np.all(t[row(root(vm, True)["pfn"])] == np.uint64(SVE))
    assert vm.spte(0x100, private=True) == SVE
    assert spte.is_shadow_present(vm.spte(0x100))
    vm.check()


class FreezeProbe:
    """Hook object recording the mirror SPTE while each install hook runs."""

    def __init__(self, busy_sets: int = 0, nested: bool = False) -> None:
        self.vm: tdpmmu.VM | None = None
        self.during: list[tuple[str, int, int]] = []
        self.busy_sets = busy_sets
        self.nested = nested
        self.nested_results: list[tdpmmu.Fault] = []
        self.peak_before_nested = 0

    def _probe(self, name: str, gfn: int, level: int) -> None:
        # A hook must not call back into its own VM (its thread holds mmu_lock); another
        # thread walks the mirror root while this hook runs, as a second vCPU would.
        vm = self.vm
        assert vm is not None
        seen: list[tuple[int, int]] = []
        walker = threading.Thread(target=lambda: seen.append(vm.walk(gfn, private=True)[-1]))
        walker.start()
        walker.join(timeout=30)
        assert seen, "the walk from another thread did not finish"
        lvl, value = seen[0]
        assert lvl == level
        self.during.append((name, level, value))

    def link_external_spt(self, gfn: int, level: int, pfn: int) -> int:
        self._probe("link", gfn, level)
        return 0

    def set_external_spte(self, gfn: int, level: int, value: int) -> int:
        self._probe("set", gfn, level)
        assert self.vm is not None
        if self.nested and not self.nested_results:
            # Another vCPU (another thread) faults on the same gfn while this entry is frozen.
            vm = self.vm
            self.peak_before_nested = int(vm.stats["page_table_peak_bytes"])
            other = threading.Thread(
                target=lambda: self.nested_results.append(vm.fault(gfn, private=True, vcpu=1))
            )
            other.start()
            other.join(timeout=30)
            assert self.nested_results, "the other vCPU's fault did not finish"
        if self.busy_sets > 0:
            self.busy_sets -= 1
            return -16  # -EBUSY
        return 0

    def remove_external_spte(self, gfn: int, level: int, value: int) -> int:
        return 0

    def free_external_spt(self, gfn: int, level: int, pfn: int) -> int:
        return 0


def test_b06_mirror_spte_is_frozen_during_the_hook_and_restored_on_busy() -> None:
    probe = FreezeProbe(busy_sets=1)
    vm = tdpmmu.VM("tdx", memory="64MiB", vcpus=2, hooks=probe, trace=True)
    probe.vm = vm
    vm.finalize()
    r = vm.fault(9, private=True)
    # Every install hook saw FROZEN_SPTE in the entry it was installing.
    assert probe.during == [
        ("link", 4, FROZEN),
        ("link", 3, FROZEN),
        ("link", 2, FROZEN),
        ("set", 1, FROZEN),  # answered -EBUSY: the entry goes back to its old value ...
        ("set", 1, FROZEN),  # ... and TDX retries locally, without re-entering the guest
    ]
    assert (r.ret, r.retries) == (Ret.FIXED, 1)
    assert vm.spte(9, private=True) == r.spte == (spte.pfn(r.spte) << 12) | LEAF_BITS
    s = vm.stats
    assert (s["pf_retry"], s["tdx_local_retries"], s["pf_fixed"]) == (1, 1, 1)
    assert (s["pages_4k"], s["set_external_spte"]) == (1, 2)
    vm.check()


def test_b06_busy_link_restores_the_entry_and_frees_the_child() -> None:
    # Every SEPT.ADD busy: each attempt allocates a child, fails, restores SVE and frees it.
    vm = td(vcpus=1, tdx={"TDH.MEM.SEPT.ADD": 1.0})
    r = vm.fault(3)
    assert r.ret == Ret.RETRY and r.retries == 1000  # KVM's loop, capped in the model
    assert vm.walk(3, private=True) == [(4, SVE)]
    s = vm.stats
    assert s["seamcall_busy"] == s["TDH.MEM.SEPT.ADD"] == s["link_external_spt"] == 1001
    assert s["tdp_mmu_pages"] == 0 and s["sept_tables"] == 0
    assert s["vcpu_kicks"] == 0  # install-side busy never kicks
    assert s["page_table_bytes"] == 2 * 4096  # only the two roots remain
    vm.check()


def test_b07_fault_meeting_a_frozen_entry_retries_without_allocating() -> None:
    # SW_PROTECTED with mirror=True has the same mirror path and no TDX local retry loop, so the
    # nested fault's RETRY is visible directly.
    probe = FreezeProbe(nested=True)
    vm = tdpmmu.VM("sw_protected", memory="64MiB", vcpus=2, mirror=True, hooks=probe)
    probe.vm = vm
    r = vm.fault(5, private=True)
    assert r.ret == Ret.FIXED
    (nested,) = probe.nested_results
    assert nested.ret == Ret.RETRY
    # No hook call and no table allocation by the nested fault.
    assert [name for name, _, _ in probe.during] == ["link", "link", "link", "set"]
    assert vm.stats["page_table_peak_bytes"] == probe.peak_before_nested
    s = vm.stats
    assert (s["pf_retry"], s["pf_fixed"], s["link_external_spt"]) == (1, 1, 3)
    vm.check()


# ----- 8-10: attributes, removal and busy on the zap side ------------------------------------


def test_b08_private_shared_mismatch_is_a_memory_fault_without_spte_change() -> None:
    vm = td()
    vm.fault(0x10)
    vm.set_memory_attributes(0x200, 1, private=False)
    before = (vm.tables().copy(), vm.stats, mark(vm))
    for gfn, private in ((0x11, False), (0x200, True), (0x10, False)):
        r = vm.fault(gfn, private=private)
        assert (r.ret, r.private) == (Ret.MEMORY_FAULT, private)
    assert np.array_equal(vm.tables(), before[0])
    d = vm.stats - before[1]
    assert d["pf_memory_fault"] == 3 and d["pf_fixed"] == 0 and d["pages_4k"] == 0
    assert since(vm, before[2]) == []
    # A private fault on a memslot without guest_memfd, likewise.
    slot_gfn = 1 << 20
    vm.add_memslot(slot_gfn, 512, gmem=False)
    vm.set_memory_attributes(slot_gfn, 512, private=True)
    t = vm.tables().copy()
    assert vm.fault(slot_gfn, private=True).ret == Ret.MEMORY_FAULT
    assert np.array_equal(vm.tables(), t)
    vm.check()


def test_b09_private_leaf_zap_sequence_and_conversions() -> None:
    vm = td(vcpus=4)
    vm.fault(9)
    tables = (vm.stats["tdp_mmu_pages"], vm.stats["sept_tables"])
    n = mark(vm)
    assert vm.set_memory_attributes(9, 1, private=False) == 1
    assert full(since(vm, n)) == remove_seq(9, 4)
    assert vm.spte(9, private=True) == SVE
    assert (vm.stats["tdp_mmu_pages"], vm.stats["sept_tables"]) == tables  # tables stay
    assert vm.stats["free_external_spt"] == 0
    assert vm.stats["remote_tlb_flush"] == 1
    vm.check()
    # Shared now: the shared fault goes to the direct root; no hook.
    n = mark(vm)
    assert vm.fault(9).ret == Ret.FIXED
    assert since(vm, n) == []
    # Back to private: the shared alias is zapped in the direct root (no hook), the private
    # re-fault AUGs again and the guest accepts again.
    n = mark(vm)
    assert vm.set_memory_attributes(9, 1, private=True) == 1
    assert since(vm, n) == []
    assert vm.spte(9) == SVE
    vm.fault(9)
    assert shape(since(vm, n)) == [
        ("set_external_spte", 9, 1),
        ("TDH.MEM.PAGE.AUG", 9, 1),
        ("TDG.MEM.PAGE.ACCEPT", 9, 1),
    ]
    vm.check()
    # guest_memfd punch hole removes with the same sequence.
    n = mark(vm)
    assert vm.punch_hole(0, 16) == 1
    assert full(since(vm, n)) == remove_seq(9, 4)
    vm.check()


BUSY_ON_ZAP = [
    (
        "TDH.MEM.RANGE.BLOCK",
        ["TDH.MEM.RANGE.BLOCK", "kick", "TDH.MEM.RANGE.BLOCK", "TDH.MEM.TRACK", "kick"],
    ),
    (
        "TDH.MEM.TRACK",
        ["TDH.MEM.RANGE.BLOCK", "TDH.MEM.TRACK", "kick", "TDH.MEM.TRACK", "kick"],
    ),
    (
        "TDH.MEM.PAGE.REMOVE",
        ["TDH.MEM.RANGE.BLOCK", "TDH.MEM.TRACK", "kick", "TDH.MEM.PAGE.REMOVE", "kick"],
    ),
]


@pytest.mark.parametrize(("leaf", "expected"), BUSY_ON_ZAP)
def test_b10_busy_on_zap_kicks_and_retries_once(leaf: str, expected: list[str]) -> None:
    # Busy injection applies to every try, the retry after the kick included; the seeded draw
    # decides. Take the first seed whose removal saw exactly one OPERAND_BUSY.
    for seed in range(64):
        vm = td(vcpus=2, tdx={leaf: 0.5}, seed=seed)
        vm.fault(3)
        n = mark(vm)
        try:
            vm.punch_hole(3, 1)
        except VmBugged:
            continue  # busy twice: the KVM_BUG_ON case, tested below
        ev = since(vm, n)
        if [e for e in ev if e.op == leaf and e.detail != 0] == []:
            continue  # no busy this time
        tail = ["TDH.MEM.PAGE.REMOVE", "TDH.PHYMEM.PAGE.WBINVD", "clear"]
        assert ops(ev) == ["remove_external_spte", *expected, *tail]
        busy = [e for e in ev if e.op == leaf]
        assert len(busy) == 2  # exactly one retry
        assert busy[0].detail != 0 and busy[1].detail == 0  # OPERAND_BUSY, then TDX_SUCCESS
        s = vm.stats
        assert (s["seamcall_busy"], s["vcpu_kicks"]) == (1, 2)
        assert not vm.bugged
        assert vm.spte(3, private=True) == SVE
        vm.check()
        return
    pytest.fail("no seed gave exactly one busy")


@pytest.mark.parametrize(("leaf", "expected"), BUSY_ON_ZAP)
def test_b10_second_busy_after_the_kick_is_a_kvm_bug(leaf: str, expected: list[str]) -> None:
    # With every try busy, the retry after kicking all vCPUs is busy too: KVM_BUG_ON.
    vm = td(vcpus=2, tdx={leaf: 1.0})
    vm.fault(3)
    n = mark(vm)
    with pytest.raises(VmBugged, match=f"{leaf}.*OPERAND_BUSY"):
        vm.punch_hole(3, 1)
    ev = since(vm, n)
    # The same sequence as a successful retry up to the second (busy) try of the leaf; the
    # page is never freed (no WBINVD, no clear) whatever KVM tries after its KVM_BUG_ON.
    full = [*expected, "TDH.MEM.PAGE.REMOVE", "TDH.PHYMEM.PAGE.WBINVD", "clear"]
    second = [i for i, op in enumerate(full) if op == leaf][1]
    assert ops(ev)[: second + 2] == ["remove_external_spte", *full[: second + 1]]
    assert "TDH.PHYMEM.PAGE.WBINVD" not in ops(ev) and "clear" not in ops(ev)
    assert [e.detail != 0 for e in ev if e.op == leaf] == [True, True]
    assert vm.bugged
    with pytest.raises(VmBugged):
        vm.fault(4)


def test_b10_busy_on_install_is_ebusy_without_kick() -> None:
    vm = td(vcpus=2, tdx={"TDH.MEM.PAGE.AUG": 1.0}, seed=1)
    r = vm.fault(3)
    # The first AUG of every attempt is busy (probability 1): no kick ever, only local retries.
    assert r.ret == Ret.RETRY
    s = vm.stats
    assert s["vcpu_kicks"] == 0 and s["seamcall_busy"] == s["TDH.MEM.PAGE.AUG"]
    assert vm.spte(3, private=True) == SVE
    vm.check()


# ----- 11-13: lock discipline, no S-EPT removal while alive, teardown order ------------------


def test_b11_installs_only_in_faults_removes_only_in_exclusive_operations() -> None:
    vm = td()
    vm.set_memory_attributes(0x800, 16, private=False)
    by_op: dict[str, Counter[str]] = {}

    def run(name: str, f: Any) -> None:
        n = mark(vm)
        f()
        by_op.setdefault(name, Counter()).update(e.op for e in since(vm, n) if e.op in HOOKS)
        if not vm.destroyed:
            vm.check()

    run("fault", lambda: [vm.fault(g) for g in (*range(8), 0x800, 0x2000)])
    run("zap", lambda: vm.set_memory_attributes(0, 4, private=False))
    run("zap", lambda: vm.punch_hole(4, 2))
    run("zap", lambda: vm.mmu_notifier_invalidate(0, 1 << 14))
    run("zap", lambda: vm.zap_all_fast())
    run("zap", lambda: vm.zap_gfn_range(6, 1))
    run("fault", lambda: vm.populate(0x3000, 2, private=True))
    assert set(by_op["fault"]) == {"link_external_spt", "set_external_spte"}
    assert set(by_op["zap"]) == {"remove_external_spte"}
    assert by_op["zap"]["remove_external_spte"] == 4 + 2 + 1
    run("destroy", vm.destroy)
    assert set(by_op["destroy"]) == {"remove_external_spte", "free_external_spt"}


def test_b12_no_sept_table_removal_while_the_hkid_is_assigned() -> None:
    vm = td()
    for g in (*range(4), 512, 1 << 17):
        vm.fault(g)
    vm.set_memory_attributes(0, 4, private=False)
    vm.punch_hole(0, 1 << 18)
    vm.zap_all_fast()
    vm.delete_memslot(0)
    s = vm.stats
    assert s["pages_4k"] == 0
    # Every leaf is gone, but no S-EPT table was freed: free_external_spt with the HKID
    # assigned is a KVM bug, and upstream never issues SEPT.REMOVE.
    assert s["free_external_spt"] == 0 and s["TDH.MEM.SEPT.REMOVE"] == 0
    assert s["external_spt_leaked"] == 0
    assert s["sept_tables"] == s["tdp_mmu_pages"] == 5
    vm.check()
    vm.destroy()
    assert vm.stats["TDH.MEM.SEPT.REMOVE"] == 0
    assert vm.stats["free_external_spt"] == vm.stats["TDH.PHYMEM.PAGE.RECLAIM"] == 5


def test_b13_subtree_teardown_children_first_in_index_order() -> None:
    vm = td(vcpus=2)
    for g in (0, 511, 512, 1024 + 3):
        vm.fault(g)
    n = mark(vm)
    vm.destroy()
    frees = [(e.gfn, e.level) for e in since(vm, n) if e.op == "free_external_spt"]
    # The three L1 tables in index order, then their L2 table, then the L3 table.
    assert frees == [(0, 1), (512, 1), (1024, 1), (0, 2), (0, 3)]
    # Each free hook reclaims the S-EPT page at the entry that referenced it.
    pairs = [
        (a.op, b.op, a.gfn == b.gfn, b.level - a.level)
        for a, b in zip(since(vm, n), since(vm, n)[1:], strict=False)
        if a.op == "free_external_spt"
    ]
    assert pairs == [("free_external_spt", "TDH.PHYMEM.PAGE.RECLAIM", True, 1)] * 5


def test_b13_dead_tables_end_frozen_after_a_shared_root_zap() -> None:
    vm = td(vcpus=2)
    vm.set_memory_attributes(0, 1024, private=False)
    vm.fault(0)
    vm.fault(600)
    direct = root(vm, False)["pfn"]
    chains = {child_pfn(v) for g in (0, 600) for _, v in vm.walk(g)[:-1]}
    assert len(chains) == 4
    vm.zap_all_fast()
    t = vm.tables()
    for pfn in chains:
        assert np.all(t[row(pfn)] == np.uint64(FROZEN))
    # The root's own entries are zapped to SVE (the root is not a removed table).
    assert np.all(t[row(direct)] == np.uint64(SVE))
    vm.check()


# ----- 14-17: filters, fast zap, roots, alias ---------------------------------------------------


def test_b14_filters_choose_roots() -> None:
    vm = td()
    vm.set_memory_attributes(0x200, 512, private=False)
    vm.fault(0x10)
    vm.fault(0x200)
    # Host mm notifier: shared filter only (direct root), no hook.
    n = mark(vm)
    assert vm.mmu_notifier_invalidate(0, 1 << 18) == 1
    assert since(vm, n) == []
    assert spte.is_shadow_present(vm.spte(0x10, private=True))
    assert vm.spte(0x200) == SVE
    vm.check()
    vm.fault(0x200)
    # Punch hole: private filter only (mirror root).
    n = mark(vm)
    assert vm.punch_hole(0, 1 << 18) == 1
    assert ops(since(vm, n)) == REMOVE_SEQ
    assert spte.is_shadow_present(vm.spte(0x200))
    vm.check()
    # Attribute conversions zap the old alias only.
    vm.fault(0x10)
    assert vm.set_memory_attributes(0x201, 1, private=True) == 0  # 0x201 was never mapped
    assert spte.is_shadow_present(vm.spte(0x200)) and spte.is_shadow_present(
        vm.spte(0x10, private=True)
    )
    assert vm.set_memory_attributes(0x200, 1, private=True) == 1
    assert vm.spte(0x200) == SVE and spte.is_shadow_present(vm.spte(0x10, private=True))
    vm.check()
    # Memslot delete: leaves of both roots, neither root invalidated or replaced.
    vm.set_memory_attributes(0x300, 1, private=False)
    vm.fault(0x300)
    roots = vm.roots()
    n = mark(vm)
    vm.delete_memslot(0)
    assert ops(since(vm, n)) == REMOVE_SEQ
    assert vm.stats["pages_4k"] == 0
    assert vm.roots() == roots
    vm.check()


def test_b15_fast_zap_spares_the_mirror_root() -> None:
    vm = td()
    vm.fault(1)
    vm.set_memory_attributes(0x400, 1, private=False)
    vm.fault(0x400)
    mirror = root(vm, True)
    mirror_row = vm.tables()[row(mirror["pfn"])].copy()
    n = mark(vm)
    vm.zap_all_fast()
    assert since(vm, n) == []  # no remove hook, no SEAMCALL
    assert vm.roots() == [mirror]
    assert np.array_equal(vm.tables()[row(mirror["pfn"])], mirror_row)
    assert spte.is_shadow_present(vm.spte(1, private=True))
    assert vm.spte(0x400) == SVE
    vm.check()
    # The next fault loads a new direct root; the mirror root is still the same one.
    vm.fault(0x400)
    assert root(vm, True) == mirror
    assert vm.stats["roots_allocated"] == 3 and vm.stats["roots_freed"] == 1
    vm.check()


def test_b16_two_roots_with_refcounts() -> None:
    vm = td(vcpus=3)
    assert vm.roots() == []
    vm.fault(1, vcpu=0)
    roots = vm.roots()
    assert [(r["mirror"], r["refcount"], r["invalid"]) for r in roots] == [
        (False, 2, False),
        (True, 2, False),
    ]  # newest first: the mirror root is allocated first, then the direct root
    assert roots[1]["role"] == roots[0]["role"] | (1 << 19)  # role.is_mirror
    vm.fault(2, vcpu=1)
    vm.fault(3, vcpu=2)
    assert [r["refcount"] for r in vm.roots()] == [4, 4]
    assert vm.stats["roots_allocated"] == 2
    vm.check()
    # Fast zap: every vCPU drops its obsolete direct root, the TDP MMU its own reference; the
    # root is freed only once invalid. The mirror root keeps every vCPU's reference.
    vm.zap_all_fast()
    assert [(r["mirror"], r["refcount"]) for r in vm.roots()] == [(True, 4)]
    assert vm.stats["roots_freed"] == 1
    vm.set_memory_attributes(8, 1, private=False)
    vm.fault(8, vcpu=1)
    assert [(r["mirror"], r["refcount"]) for r in vm.roots()] == [(False, 2), (True, 4)]
    vm.check()


def test_b17_direct_root_indexes_the_shared_alias() -> None:
    vm = td()
    assert vm.shared_bit == 1 << 35 and vm.max_gfn == 1 << 35
    vm.set_memory_attributes(0x100, 1, private=False)
    vm.fault(0x100)
    t = vm.tables()
    direct_row = t[row(root(vm, False)["pfn"])]
    # (0x100 | 1<<35) >> 27 & 511 == 256: the entry at 256 is used, index 0 is not.
    assert spte.is_shadow_present(int(direct_row[256]))
    assert int(direct_row[0]) == SVE
    assert int((direct_row != np.uint64(SVE)).sum()) == 1
    # Below the root the walk uses un-aliased indices and the leaf maps the un-aliased gfn.
    walk = vm.walk(0x100)
    assert walk[0] == (4, int(direct_row[256]))
    l3 = t[row(child_pfn(walk[0][1]))]
    assert spte.is_shadow_present(int(l3[0]))  # (0x100 >> 18) & 511 == 0
    (_, _, _, _, _, host_pfn) = vm.memslots()[0]
    assert spte.pfn(walk[-1][1]) == host_pfn + 0x100
    # The mirror root uses the natural index 0 for private gfns.
    vm.fault(0x101)
    mirror_row = vm.tables()[row(root(vm, True)["pfn"])]
    assert spte.is_shadow_present(int(mirror_row[0])) and int(mirror_row[256]) == SVE
    # An already-aliased gfn is not a guest gfn at all.
    with pytest.raises(ValueError, match="gfn"):
        vm.walk(0x100 | vm.shared_bit)
    with pytest.raises(ValueError, match="gfn"):
        vm.fault(0x100 | vm.shared_bit)
    vm.check()


def test_b17_five_level_alias_index() -> None:
    vm = td(levels=5)
    vm.set_memory_attributes(0x100, 1, private=False)
    vm.fault(0x100)
    direct_row = vm.tables()[row(root(vm, False)["pfn"])]
    assert spte.is_shadow_present(int(direct_row[8]))  # (1 << 39) >> 36 == 8
    assert int((direct_row != np.uint64(SVE)).sum()) == 1
    vm.check()


# ----- 19-21: flushes and huge pages ------------------------------------------------------------


def test_b19_b20_flush_accounting_on_a_td() -> None:
    vm = td(vcpus=4)
    for g in range(8):
        vm.fault(g)
    vm.set_memory_attributes(0x400, 512, private=False)
    vm.fault(0x400)
    assert vm.stats["remote_tlb_flush"] == 0  # installs over non-present entries never flush
    # Zaps flush once per operation iff a present leaf was zapped.
    s0 = vm.stats
    assert vm.punch_hole(0x100, 4) == 0
    assert vm.mmu_notifier_invalidate(0x500, 4) == 0
    assert (vm.stats - s0)["remote_tlb_flush"] == 0
    s0 = vm.stats
    assert vm.punch_hole(0, 8) == 8
    d = vm.stats - s0
    assert d["remote_tlb_flush"] == 1
    assert d["TDH.MEM.TRACK"] == 8  # private TLB invalidation is the remove hook's own job
    vm.check()


def test_b21_private_mappings_are_4k_only() -> None:
    vm = tdpmmu.VM("tdx", memory="1GiB", backing="2M", trace=True)
    vm.finalize()
    r = vm.fault(0x400, private=True)
    assert r.level == 1
    assert vm.stats["pages_2m"] == 0
    # Shared memory of a uniformly shared 2M range maps at 2M in the direct root ...
    vm.set_memory_attributes(0x600, 512, private=False)
    assert vm.fault(0x600).level == 2
    # ... but not when the 2M range is mixed.
    vm.set_memory_attributes(0x800, 511, private=False)
    assert vm.fault(0x800).level == 1
    s = vm.stats
    assert (s["pages_2m"], s["pages_4k"]) == (1, 2)
    assert all(e.level == 1 for e in vm.trace_events() if e.op == "set_external_spte")
    vm.check()


# ----- 22-23: initial image and teardown ---------------------------------------------------------


def test_b22_initial_image_v619_page_add_from_the_hook() -> None:
    vm = td(vcpus=1, finalize=False, tdx={"measure": True})
    assert not vm.finalized
    with pytest.raises(tdpmmu.ConfigError, match="finalize"):
        vm.fault(9)  # no vCPU runs before finalize
    assert vm.populate(0, 2, private=True) == 2
    assert shape(vm.trace_events()) == [
        ("link_external_spt", 0, 4),
        ("TDH.MEM.SEPT.ADD", 0, 4),
        ("link_external_spt", 0, 3),
        ("TDH.MEM.SEPT.ADD", 0, 3),
        ("link_external_spt", 0, 2),
        ("TDH.MEM.SEPT.ADD", 0, 2),
        ("set_external_spte", 0, 1),
        ("TDH.MEM.PAGE.ADD", 0, 1),
        *[("TDH.MR.EXTEND", 0, 1)] * 16,
        ("set_external_spte", 1, 1),
        ("TDH.MEM.PAGE.ADD", 1, 1),
        *[("TDH.MR.EXTEND", 1, 1)] * 16,
    ]
    s = vm.stats
    assert (s["TDH.MEM.PAGE.AUG"], s["TDG.MEM.PAGE.ACCEPT"], s["pf_taken"]) == (0, 0, 0)
    vm.check()
    vm.finalize()
    assert vm.finalized
    # After finalize a pre-fault AUGs (the guest accepts later); a guest fault AUGs + accepts.
    n = mark(vm)
    vm.populate(2, 1, private=True)
    vm.fault(3)
    assert ops(since(vm, n)) == [
        "set_external_spte",
        "TDH.MEM.PAGE.AUG",
        "set_external_spte",
        "TDH.MEM.PAGE.AUG",
        "TDG.MEM.PAGE.ACCEPT",
    ]
    vm.check()
    # "Later" is the guest's next touch of the pre-faulted page: nothing left to map (SPURIOUS),
    # but its S-EPT entry is PENDING, so the guest accepts it. The pages added before finalize
    # are MAPPED (PAGE.ADD) and need no accept.
    assert leaf_states(vm) == {0: "MAPPED", 1: "MAPPED", 2: "PENDING", 3: "MAPPED"}
    n = mark(vm)
    assert vm.fault(2).ret == Ret.SPURIOUS
    assert vm.fault(0).ret == Ret.SPURIOUS
    assert shape(since(vm, n)) == [("TDG.MEM.PAGE.ACCEPT", 2, 1)]
    assert set(leaf_states(vm).values()) == {"MAPPED"}
    assert vm.stats["TDG.MEM.PAGE.ACCEPT"] == 2
    vm.check()


def test_b22_initial_image_v616_populate_issues_page_add() -> None:
    vm = td(vcpus=1, finalize=False, tdx={"version": "6.16"})
    assert vm.populate(0, 3, private=True) == 3
    # set_external_spte only counts nr_premapped; the populate path adds each page itself.
    assert [op for op in ops(vm.trace_events()) if op != "TDH.MEM.SEPT.ADD"] == [
        "link_external_spt",
        "link_external_spt",
        "link_external_spt",
        *["set_external_spte", "TDH.MEM.PAGE.ADD"] * 3,
    ]
    assert vm.stats["TDH.MR.EXTEND"] == 0  # measure defaults to off
    vm.finalize()  # nr_premapped is back to 0
    vm.check()


def test_b22_only_the_private_image_before_finalize() -> None:
    vm = td(vcpus=1, finalize=False)
    vm.set_memory_attributes(0x10, 1, private=False)
    with pytest.raises(tdpmmu.ConfigError, match="private"):
        vm.populate(0x10, 1, private=False)
    assert vm.trace_events() == []
    vm.check()


def test_prefaulted_pages_are_accepted_on_the_guests_next_touch() -> None:
    vm = td(vcpus=1)
    c = vm.costs
    vm.fault(0)  # tables exist: the pre-faults below are a leaf each
    n = mark(vm)
    assert vm.populate(1, 4, private=True) == 4
    # KVM_PRE_FAULT_MEMORY on a runnable TD: AUG only, the entries stay PENDING.
    assert ops(since(vm, n)) == ["set_external_spte", "TDH.MEM.PAGE.AUG"] * 4
    assert leaf_states(vm) == {0: "MAPPED", 1: "PENDING", 2: "PENDING", 3: "PENDING", 4: "PENDING"}
    vm.check()
    # The guest's first touch finds the leaf present (SPURIOUS) and accepts the page: one TD
    # exit, the fault handling, the map step (which finds the leaf), the ACCEPT; nothing else.
    n, s0 = mark(vm), vm.stats
    r = vm.fault(1)
    assert (r.ret, r.private, r.level) == (Ret.SPURIOUS, True, 1)
    assert shape(since(vm, n)) == [("TDG.MEM.PAGE.ACCEPT", 1, 1)]
    assert all(e.detail == 0 for e in since(vm, n))  # TDX_SUCCESS
    expected = c.td_exit_entry_ns + c.fault_handling_ns + c.fault_map_ns + c.tdg_mem_page_accept_ns
    assert r.modeled_ns == pytest.approx(expected)
    d = vm.stats - s0
    assert d["modeled_ns"] == pytest.approx(expected)
    assert (d["pf_spurious"], d["TDG.MEM.PAGE.ACCEPT"], d["TDH.MEM.PAGE.AUG"]) == (1, 1, 0)
    assert leaf_states(vm)[1] == "MAPPED"
    # Accepted once: the next touch is a plain spurious fault.
    n = mark(vm)
    r = vm.fault(1)
    assert r.ret == Ret.SPURIOUS and since(vm, n) == []
    assert r.modeled_ns == pytest.approx(c.td_exit_entry_ns + c.fault_handling_ns + c.fault_map_ns)
    # A read touch accepts too (private faults are writes), and so does a batch.
    n = mark(vm)
    assert vm.fault(2, write=False).ret == Ret.SPURIOUS
    vm.fault_batch(np.arange(1, 5, dtype=np.uint64))
    assert shape(since(vm, n)) == [("TDG.MEM.PAGE.ACCEPT", g, 1) for g in (2, 3, 4)]
    assert vm.stats["TDG.MEM.PAGE.ACCEPT"] == 1 + 4  # gfn 0's fault, then gfns 1-4 once each
    assert set(leaf_states(vm).values()) == {"MAPPED"}
    vm.check()


def test_prefaulted_page_converted_before_the_touch_is_not_accepted_twice() -> None:
    # A PENDING page removed (punch hole) before the guest touched it: the re-fault AUGs a new
    # PENDING page and the guest accepts that one, once.
    vm = td(vcpus=2)
    vm.populate(7, 1, private=True)
    n = mark(vm)
    assert vm.punch_hole(7, 1) == 1
    assert full(since(vm, n)) == remove_seq(7, 2)
    n = mark(vm)
    assert vm.fault(7).ret == Ret.FIXED
    assert vm.fault(7).ret == Ret.SPURIOUS
    assert shape(since(vm, n)) == [
        ("set_external_spte", 7, 1),
        ("TDH.MEM.PAGE.AUG", 7, 1),
        ("TDG.MEM.PAGE.ACCEPT", 7, 1),
    ]
    vm.check()


def test_conversion_requests_are_charged_once_per_call() -> None:
    # Each set_memory_attributes that changes an attribute is one guest request (TDX MapGPA):
    # psc_exit_ns + gmem_convert_ns once per call, whatever the page count, on top of the zap.
    vm = td(vcpus=4)
    c = vm.costs
    request = c.psc_exit_ns + c.gmem_convert_ns
    removal = (
        c.tdh_mem_range_block_ns
        + c.tdh_mem_track_ns
        + c.kick_base_ns
        + 4 * c.kick_per_vcpu_ns
        + c.tdh_mem_page_remove_ns
        + c.tdh_phymem_page_wbinvd_ns
        + c.page_clear_ns
    )
    flush = c.tlb_flush_base_ns + 4 * c.tlb_flush_per_vcpu_ns
    for g in range(4):
        vm.fault(g)
    s0 = vm.stats
    assert vm.set_memory_attributes(0, 4, private=False) == 4
    d = vm.stats - s0
    assert (d["conversions"], d["gmem_splits"], d["remote_tlb_flush"]) == (1, 0, 1)
    assert d["modeled_ns"] == pytest.approx(request + 4 * (removal + c.spte_update_ns) + flush)
    # Nothing mapped to zap: the request alone.
    s0 = vm.stats
    assert vm.set_memory_attributes(0x100, 8, private=False) == 0
    d = vm.stats - s0
    assert (d["conversions"], d["modeled_ns"]) == (1, request)
    # Partly converted already (0-3 shared, 4-7 private): still one request.
    s0 = vm.stats
    assert vm.set_memory_attributes(0, 8, private=False) == 0
    assert (vm.stats - s0)["conversions"] == 1
    # Nothing to change: no request is charged.
    s0 = vm.stats
    assert vm.set_memory_attributes(0, 8, private=False) == 0
    d = vm.stats - s0
    assert (d["conversions"], d["modeled_ns"]) == (0, 0)
    # Back to private: no shared alias was mapped, so the request is all it costs.
    s0 = vm.stats
    assert vm.set_memory_attributes(0, 8, private=True) == 0
    d = vm.stats - s0
    assert (d["conversions"], d["modeled_ns"]) == (1, request)
    assert vm.stats["conversions"] == 4
    vm.check()


def test_b23_teardown_order() -> None:
    vm = td(vcpus=2)
    for g in range(600):
        vm.fault(g)
    vm.set_memory_attributes(0x2000, 1, private=False)
    vm.fault(0x2000)
    sept_tables = vm.stats["sept_tables"]
    assert sept_tables == 4  # L3, L2 and two L1 tables
    n = mark(vm)
    vm.destroy()
    ev = since(vm, n)
    o = ops(ev)
    # 1. guest_memfd release zaps every private leaf with the HKID still assigned.
    assert o[: 7 * 600] == REMOVE_SEQ * 600
    assert [e.gfn for e in ev if e.op == "remove_external_spte"] == list(range(600))
    # 2. HKID release.
    assert o[7 * 600 : 7 * 600 + 5] == [
        "TDH.VP.FLUSH",
        "TDH.VP.FLUSH",
        "TDH.MNG.VPFLUSHDONE",
        "TDH.PHYMEM.CACHE.WB",
        "TDH.MNG.KEY.FREEID",
    ]
    # 3. Root zap: only free_external_spt -> RECLAIM, once per S-EPT table; no remove.
    assert o[7 * 600 + 5 :] == ["free_external_spt", "TDH.PHYMEM.PAGE.RECLAIM"] * sept_tables
    s = vm.stats
    assert s["TDH.MEM.SEPT.REMOVE"] == 0 and s["external_spt_leaked"] == 0
    assert (s["sept_tables"], s["tdp_mmu_pages"], s["pages_4k"]) == (0, 0, 0)
    assert s["page_clear"] == 600 + sept_tables
    assert s["roots_freed"] == 2
    assert vm.roots() == [] and vm.destroyed
    vm.check()  # audits the teardown: no roots, no tables, no S-EPT left
    with pytest.raises(tdpmmu.ConfigError, match="destroyed"):
        vm.fault(1)


def test_b23_context_manager_destroys_in_order() -> None:
    with td(vcpus=1) as vm:
        vm.fault(1)
    assert vm.destroyed
    assert vm.stats["TDH.MNG.KEY.FREEID"] == 1
    assert vm.stats["free_external_spt"] == 3


# ----- 25: local retry ----------------------------------------------------------------------


def test_b06_b25_busy_aug_restores_and_retries_locally() -> None:
    vm = td(vcpus=1, tdx={"TDH.MEM.PAGE.AUG": 0.5})
    c = vm.costs
    vm.fault(0)  # build the tables first so the faults below cost the same apart from retries
    retries = 0
    for g in range(1, 64):
        s0 = vm.stats
        r = vm.fault(g)
        assert r.ret == Ret.FIXED
        retries += r.retries
        # One TD exit/entry however often KVM retried inside; every attempt handles the fault,
        # goes through the map step and issues an AUG; one accept.
        expected = (
            c.td_exit_entry_ns
            + (r.retries + 1) * (c.fault_handling_ns + c.fault_map_ns + c.tdh_mem_page_aug_ns)
            + c.host_page_alloc_ns
            + c.tdg_mem_page_accept_ns
        )
        assert r.modeled_ns == pytest.approx(expected)
        assert (vm.stats - s0)["modeled_ns"] == pytest.approx(expected)
    assert retries > 0
    s = vm.stats
    assert s["tdx_local_retries"] == s["pf_retry"] >= retries
    assert s["TDH.MEM.PAGE.AUG"] - s["seamcall_busy"] == 64  # one successful AUG per page
    assert s["TDG.MEM.PAGE.ACCEPT"] == 64 and s["vcpu_kicks"] == 0
    vm.check()


# ----- hook designs -----------------------------------------------------------------------------


def _design_workload(vm: tdpmmu.VM) -> None:
    vm.finalize()
    for g in (4, 5, 600):
        vm.fault(g)
    vm.punch_hole(4, 1)
    vm.set_memory_attributes(5, 1, private=False)
    vm.fault(5)
    vm.set_memory_attributes(5, 1, private=True)
    vm.fault(5)
    vm.delete_memslot(0)


@pytest.mark.parametrize("design", ["mirror", "private"])
def test_designs_agree_on_faults_punch_hole_and_conversions(design: str) -> None:
    ref = tdpmmu.VM("tdx", memory="1GiB", vcpus=2, trace=True, hooks="mirror")
    vm = tdpmmu.VM("tdx", memory="1GiB", vcpus=2, trace=True, hooks=design)
    assert vm.hooks_name == design
    _design_workload(ref)
    _design_workload(vm)
    assert vm.trace_events() == ref.trace_events()
    assert vm.stats == ref.stats
    assert np.array_equal(vm.tables(), ref.tables())
    vm.check()


def test_designs_diverge_at_teardown() -> None:
    # The root zap at teardown carries no private flag: under "private" no free_external_spt
    # fires, so the S-EPT tables are never reclaimed (the model leaves them counted).
    runs = {}
    for design in ("mirror", "private"):
        vm = tdpmmu.VM("tdx", memory="1GiB", vcpus=2, trace=True, hooks=design)
        vm.finalize()
        for g in (4, 5, 600):
            vm.fault(g)
        n = mark(vm)
        vm.destroy()
        runs[design] = (Counter(ops(since(vm, n))), vm.stats, vm)
    (m_ops, m, m_vm), (p_ops, p, p_vm) = runs["mirror"], runs["private"]
    assert m_ops - p_ops == Counter({"free_external_spt": 4, "TDH.PHYMEM.PAGE.RECLAIM": 4})
    assert p_ops - m_ops == Counter()
    assert (m["sept_tables"], p["sept_tables"]) == (0, 4)
    assert m["remove_external_spte"] == p["remove_external_spte"] == 3
    # check() after destroy audits the teardown: the unreclaimed S-EPT tables show.
    m_vm.check()
    with pytest.raises(InvariantError, match="teardown left 4 S-EPT/external table"):
        p_vm.check()


def test_designs_diverge_on_unflagged_zap_gfn_range() -> None:
    # kvm_zap_gfn_range carries no private flag. Under "mirror" the hooks key off the table's
    # role and the S-EPT follows; under "private" they key off the operation, so the TDX
    # module keeps the page mapped while the mirror entry is gone.
    mirror = td(vcpus=2, hooks="mirror")
    private = td(vcpus=2, hooks="private")
    for vm in (mirror, private):
        vm.fault(4)
    n = mark(mirror)
    assert mirror.zap_gfn_range(0, 16) == 1
    assert ops(since(mirror, n)) == REMOVE_SEQ
    mirror.check()
    assert mirror.fault(4).ret == Ret.FIXED
    mirror.check()

    n = mark(private)
    assert private.zap_gfn_range(0, 16) == 1
    assert since(private, n) == []  # no hook: the S-EPT still maps gfn 4
    assert private.spte(4, private=True) == SVE
    with pytest.raises(InvariantError, match="mirror and S-EPT disagree"):
        private.check()
    # The re-fault's AUG finds the S-EPT entry still mapped: the VM is bugged.
    with pytest.raises(VmBugged, match=r"TDH\.MEM\.PAGE\.AUG"):
        private.fault(4)
    assert private.bugged
    with pytest.raises(VmBugged):
        private.fault(5)


def test_private_design_unflagged_zap_is_an_invariant_violation() -> None:
    # check() compares the mirror tree with the S-EPT under every hook design: after an
    # unflagged zap under "private" the TDX module still maps gfn 4, the mirror does not.
    vm = td(vcpus=2, hooks="private")
    vm.fault(4)
    vm.fault(5)
    vm.check()
    assert vm.zap_gfn_range(4, 1) == 1
    with pytest.raises(
        InvariantError,
        match=r"mirror and S-EPT disagree: 1 vs 2 private leaves; only in S-EPT \[\(4,",
    ):
        vm.check()
    assert not vm.bugged  # check() reports; it does not bug the VM
    # A flagged removal walks the mirror tree, so it cannot remove what only the S-EPT maps:
    # gfn 5 goes, gfn 4 stays stranded in the S-EPT.
    vm.punch_hole(0, 16)
    assert vm.stats["TDH.MEM.PAGE.REMOVE"] == 1
    with pytest.raises(InvariantError, match=r"0 vs 1 private leaves; only in S-EPT \[\(4,"):
        vm.check()


# ----- TDX options ------------------------------------------------------------------------------


def test_option_track_batched_one_track_per_zap() -> None:
    vm = td(vcpus=2, tdx={"track": "batched"})
    for g in range(3):
        vm.fault(g)
    n = mark(vm)
    assert vm.punch_hole(0, 8) == 3
    assert shape(since(vm, n)) == [
        ("remove_external_spte", 0, 1),
        ("TDH.MEM.RANGE.BLOCK", 0, 1),
        ("remove_external_spte", 1, 1),
        ("TDH.MEM.RANGE.BLOCK", 1, 1),
        ("remove_external_spte", 2, 1),
        ("TDH.MEM.RANGE.BLOCK", 2, 1),
        ("TDH.MEM.TRACK", 0, 0),
        ("kick", 0, 0),
        *[
            x
            for g in range(3)
            for x in (
                ("TDH.MEM.PAGE.REMOVE", g, 1),
                ("TDH.PHYMEM.PAGE.WBINVD", g, 1),
                ("clear", g, 1),
            )
        ],
    ]
    s = vm.stats
    assert (s["TDH.MEM.TRACK"], s["vcpu_kicks"], s["TDH.MEM.PAGE.REMOVE"]) == (1, 1, 3)
    vm.check()
    # One page per zap: same calls as per_page, in a different order.
    vm.fault(7)
    n = mark(vm)
    vm.set_memory_attributes(7, 1, private=False)
    assert ops(since(vm, n)) == REMOVE_SEQ
    vm.check()


def test_option_track_batched_saves_modeled_time() -> None:
    costs = {}
    for track in ("per_page", "batched"):
        vm = td(vcpus=8, tdx={"track": track})
        for g in range(16):
            vm.fault(g)
        s0 = vm.stats
        vm.punch_hole(0, 16)
        costs[track] = (vm.stats - s0)["modeled_ns"]
    c = tdpmmu.CostModel()
    saved = 15 * (c.tdh_mem_track_ns + c.kick_base_ns + 8 * c.kick_per_vcpu_ns)
    assert costs["per_page"] - costs["batched"] == pytest.approx(saved)


def test_option_two_hook_interface() -> None:
    vm = td(vcpus=2, tdx={"interface": "two_hook"})
    vm.fault(0)
    assert shape(vm.trace_events()) == [
        ("set_external_spte", 0, 4),
        ("TDH.MEM.SEPT.ADD", 0, 4),
        ("set_external_spte", 0, 3),
        ("TDH.MEM.SEPT.ADD", 0, 3),
        ("set_external_spte", 0, 2),
        ("TDH.MEM.SEPT.ADD", 0, 2),
        ("set_external_spte", 0, 1),
        ("TDH.MEM.PAGE.AUG", 0, 1),
        ("TDG.MEM.PAGE.ACCEPT", 0, 1),
    ]
    n = mark(vm)
    vm.punch_hole(0, 1)
    assert ops(since(vm, n)) == ["set_external_spte", *REMOVE_SEQ[1:]]
    s = vm.stats
    assert (s["link_external_spt"], s["remove_external_spte"], s["set_external_spte"]) == (0, 0, 5)
    vm.check()
    n = mark(vm)
    vm.destroy()
    assert [e.op for e in since(vm, n) if e.op in HOOKS] == ["free_external_spt"] * 3


def test_option_sept_free_sept_remove() -> None:
    # No public operation frees a mirror table of a live TD (leaf zaps keep tables, fast zap
    # skips the mirror root), so the tables leave at destroy. Upstream ("teardown") releases the
    # HKID first and RECLAIMs each S-EPT table. The pre-upstream design ("sept_remove") tears the
    # leaf-less mirror tree down while the HKID is still assigned: each table goes by
    # BLOCK(parent) -> TRACK -> kick -> SEPT.REMOVE -> WBINVD + clear, and nothing is RECLAIMed.
    runs = {}
    for free in ("teardown", "sept_remove"):
        vm = td(vcpus=2, tdx={"sept_free": free})
        for g in (0, 512):
            vm.fault(g)
        vm.punch_hole(0, 1024)
        vm.delete_memslot(0)
        vm.check()
        n, s0 = mark(vm), vm.stats
        vm.destroy()
        vm.check()  # the teardown audit: nothing left behind either way
        runs[free] = (full(since(vm, n)), vm.stats - s0, vm.stats, vm.bugged)
    # Children first, in index order: the two L1 tables, the L2, the L3.
    tables = [(0, 1), (512, 1), (0, 2), (0, 3)]
    ev, d, s, bugged = runs["teardown"]
    assert ev == hkid_release(2) + [x for g, lvl in tables for x in reclaim_seq(g, lvl)]
    assert (d["TDH.PHYMEM.PAGE.RECLAIM"], d["TDH.MEM.SEPT.REMOVE"], d["vcpu_kicks"]) == (4, 0, 0)
    ev, d, s, bugged = runs["sept_remove"]
    assert ev == [x for g, lvl in tables for x in sept_remove_seq(g, lvl, 2)] + hkid_release(2)
    assert (d["TDH.MEM.RANGE.BLOCK"], d["TDH.MEM.TRACK"], d["vcpu_kicks"]) == (4, 4, 4)
    assert (d["TDH.MEM.SEPT.REMOVE"], d["TDH.PHYMEM.PAGE.WBINVD"], d["page_clear"]) == (4, 4, 4)
    assert (d["free_external_spt"], d["TDH.PHYMEM.PAGE.RECLAIM"]) == (4, 0)
    assert (s["sept_tables"], s["tdp_mmu_pages"], s["external_spt_leaked"]) == (0, 0, 0)
    assert s["roots_freed"] == 2 and not bugged
    # Same work on the KVM side; only the per-table SEAMCALLs differ.
    c = tdpmmu.CostModel()
    per_table = (
        c.tdh_mem_range_block_ns
        + c.tdh_mem_track_ns
        + c.kick_base_ns
        + 2 * c.kick_per_vcpu_ns
        + c.tdh_mem_sept_remove_ns
        + c.tdh_phymem_page_wbinvd_ns
        - c.tdh_phymem_page_reclaim_ns
    )
    assert d["modeled_ns"] - runs["teardown"][1]["modeled_ns"] == pytest.approx(4 * per_table)
    other = ("modeled_ns", *SEAMCALLS, "vcpu_kicks")
    assert {k: v for k, v in d.to_dict().items() if k not in other} == {
        k: v for k, v in runs["teardown"][1].to_dict().items() if k not in other
    }


def test_option_sept_free_sept_remove_with_private_leaves_at_destroy() -> None:
    # guest_memfd release removes the leaves first (HKID assigned either way); then the tables
    # go by SEPT.REMOVE, then the HKID is released.
    vm = td(vcpus=3, tdx={"sept_free": "sept_remove"})
    vm.fault(0)
    vm.fault(1)
    n = mark(vm)
    vm.destroy()
    assert full(since(vm, n)) == [
        *remove_seq(0, 3),
        *remove_seq(1, 3),
        *sept_remove_seq(0, 1, 3),
        *sept_remove_seq(0, 2, 3),
        *sept_remove_seq(0, 3, 3),
        *hkid_release(3),
    ]
    s = vm.stats
    assert (s["TDH.MEM.SEPT.REMOVE"], s["TDH.PHYMEM.PAGE.RECLAIM"], s["sept_tables"]) == (3, 0, 0)
    assert s["page_clear"] == 2 + 3 and not vm.bugged
    vm.check()


def test_options_are_validated() -> None:
    with pytest.raises(tdpmmu.ConfigError, match="track"):
        td(tdx={"track": "sometimes"})
    with pytest.raises(tdpmmu.ConfigError, match="tdx"):
        td(tdx={"tracking": "batched"})


# ----- SW_PROTECTED with a mirror root (the seed's software variant) ------------------------------


def test_sw_protected_mirror_basics() -> None:
    vm = tdpmmu.VM("sw_protected", memory="1GiB", vcpus=2, mirror=True, trace=True)
    assert vm.hooks_name == "mirror" and vm.shared_bit == 1 << 35
    assert vm.finalized  # no TD build phase: the software backend runs from the start
    r = vm.fault(4)
    assert r.ret == Ret.FIXED and r.private and r.level == 1
    assert hooks_of(vm.trace_events()) == [
        ("link_external_spt", 0, 4),
        ("link_external_spt", 0, 3),
        ("link_external_spt", 0, 2),
        ("set_external_spte", 4, 1),
    ]
    assert ops(vm.trace_events()) == [h[0] for h in hooks_of(vm.trace_events())]
    assert seamcall_total(vm) == 0
    c = vm.costs
    assert r.modeled_ns == (
        c.exit_entry_ns + c.fault_handling_ns + c.fault_map_ns + c.host_page_alloc_ns
    )
    # Shared alias indexing as on a TD.
    vm.set_memory_attributes(0x100, 1, private=False)
    vm.fault(0x100)
    assert spte.is_shadow_present(int(vm.tables()[row(root(vm, False)["pfn"])][256]))
    vm.check()
    # Conversion to shared: one remove hook, no SEAMCALL, no kick, no page clear; the request
    # itself (exit + guest_memfd bookkeeping), the SPTE write and the flush are all it costs.
    n, s0 = mark(vm), vm.stats
    assert vm.set_memory_attributes(4, 1, private=False) == 1
    assert ops(since(vm, n)) == ["remove_external_spte"]
    assert vm.stats["vcpu_kicks"] == 0
    d = vm.stats - s0
    assert (d["conversions"], d["page_clear"]) == (1, 0)
    assert d["modeled_ns"] == pytest.approx(
        c.psc_exit_ns
        + c.gmem_convert_ns
        + c.spte_update_ns
        + c.tlb_flush_base_ns
        + 2 * c.tlb_flush_per_vcpu_ns
    )
    vm.check()
    n = mark(vm)
    vm.destroy()
    assert [e.op for e in since(vm, n)] == ["free_external_spt"] * 3
    assert seamcall_total(vm) == 0 and vm.stats["page_clear"] == 0


def test_sw_protected_mirror_teardown_costs_nothing_modeled() -> None:
    vm = tdpmmu.VM("sw_protected", memory="1GiB", vcpus=2, mirror=True)
    vm.fault(4)
    s0 = vm.stats
    vm.destroy()
    d = vm.stats - s0
    c = vm.costs
    # guest_memfd release zaps the leaf (one SPTE write + one remote flush); the root zap writes
    # 3 non-leaf entries. The software backend has no SEAMCALLs and clears no pages.
    expected = 4 * c.spte_update_ns + c.tlb_flush_base_ns + 2 * c.tlb_flush_per_vcpu_ns
    assert d["modeled_ns"] == pytest.approx(expected)
    assert (d["free_external_spt"], d["remove_external_spte"], d["page_clear"]) == (3, 1, 0)


@pytest.mark.parametrize(("vm_type", "mirror"), [("tdx", False), ("sw_protected", True)])
def test_private_design_memslot_delete_hooks_only_the_private_root(
    vm_type: str, mirror: bool
) -> None:
    # A memslot delete unmaps under both filters; a design keyed on the private flag must see
    # the flag on the mirror root only, not on the direct root's shared leaves (which it
    # used to hand to the hooks: TDH.MEM.RANGE.BLOCK on a gfn the S-EPT never had).
    vm = tdpmmu.VM(vm_type, memory="64MiB", hooks="private", mirror=mirror, trace=True)
    if vm_type == "tdx":
        vm.finalize()
    slot = vm.add_memslot(0x8000, 1)  # a shared slot beyond the default one
    vm.fault(0x8000, private=False)
    vm.fault(5, private=True)
    n = len(vm.trace_events())
    vm.delete_memslot(slot)
    assert not vm.bugged
    assert [e.op for e in vm.trace_events()[n:] if e.op.endswith("_spte")] == []
    assert vm.spte(0x8000) == SVE
    vm.check()
