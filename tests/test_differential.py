"""Differential test: the native engine against the pure-Python reference model.

A Hypothesis rule-based state machine builds one small default VM twice — ``tdpmmu.VM``
(Rust) and ``tdpmmu.reference.ReferenceVM`` — with the same parameters, applies the same
random operations to both and after every step demands the same results, the same walks for
every gfn the run has touched (bounded), the same page-table arena (host pfns included, so
allocation order and teardown values must match too), the same roots, memslots and counters,
and a passing ``check()`` on both.

The run is sized to stay well under a minute on two cores; with CI=true it is shorter and
derandomized.
"""

from __future__ import annotations

import math
import os
from typing import Any

import pytest

pytest.importorskip("tdpmmu._core")

import numpy as np
from hypothesis import HealthCheck, Phase, event, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import tdpmmu
from tdpmmu.reference import ReferenceVM

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

PAGES = {"4K": 1, "2M": 512, "1G": 262144}
BACKING_BYTES = {"4K": 4096, "2M": 2 << 20, "1G": 1 << 30}
MEMORY_FOR_BACKING = {
    "4K": ["64MiB", "1GiB", "2GiB"],
    "2M": ["64MiB", "1GiB", "2GiB"],
    "1G": ["1GiB", "2GiB", "4GiB"],
}
MAX_SLOTS = 6
MAX_WALK_SAMPLE = 48  # gfns whose walks are compared after each step
MAX_ARENA_COMPARE = 400  # compare the whole arena while it has at most this many tables


@st.composite
def vm_configs(draw: st.DrawFn) -> dict[str, Any]:
    backing = draw(st.sampled_from(["4K", "2M", "1G"]))
    return {
        "memory": draw(st.sampled_from(MEMORY_FOR_BACKING[backing])),
        "backing": backing,
        "levels": draw(st.sampled_from([4, 5])),
        "vcpus": draw(st.integers(1, 3)),
        "nx_huge_pages": draw(st.booleans()),
        "slot_zap_all": draw(st.booleans()),
    }


def _same_exception(native_call: Any, ref_call: Any) -> None:
    """Both sides must reject bad input with a ValueError (or subclass)."""
    with pytest.raises(ValueError):
        native_call()
    with pytest.raises(ValueError):
        ref_call()


class EngineMatchesReference(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.native: Any = None
        self.ref: ReferenceVM | None = None
        self.cfg: dict[str, Any] = {}
        self.touched: dict[int, None] = {}  # insertion-ordered set of gfns seen so far
        self.mapped: list[int] = []  # gfns that faulted inside a memslot, most recent last
        self.log: list[str] = []

    # -- helpers -------------------------------------------------------------------------
    def record(self, call: str) -> None:
        """Remember the operation; the failing example's operations are printed as notes."""
        self.log.append(call)
        note(f"vm.{call}" if not call.startswith("VM(") else f"vm = tdpmmu.{call}")

    @property
    def r(self) -> ReferenceVM:
        assert self.ref is not None
        return self.ref

    def touch(self, *gfns: int) -> None:
        for g in gfns:
            if 0 <= g < self.r.max_gfn:
                self.touched.pop(g, None)
                self.touched[g] = None

    def slots(self) -> list[tuple[int, int, int, int, bool, int]]:
        return self.r.memslots()

    def draw_gfn(self, data: st.DataObject) -> int:
        """A gfn inside a memslot, near one already used, or outside every memslot."""
        max_gfn = self.r.max_gfn
        kind = data.draw(st.sampled_from(["slot", "slot", "near", "near", "near", "outside"]))
        slots = self.slots()
        if kind == "near" and self.touched:
            base = data.draw(st.sampled_from(list(self.touched)[-32:]))
            delta = data.draw(
                st.sampled_from([0, 1, -1, 511, 512, -512, 262143, 262144, -262144])
                | st.integers(-600, 600)
            )
            return min(max(base + delta, 0), max_gfn - 1)
        if kind in ("slot", "near") and slots:
            _, gfn, npages, _, _, _ = data.draw(st.sampled_from(slots))
            off = data.draw(
                st.sampled_from([0, 1, 511, 512, 513, npages - 1]) | st.integers(0, npages - 1)
            )
            return gfn + min(max(off, 0), npages - 1)
        # Outside every memslot (MMIO), or anywhere in the guest-physical space.
        anywhere = st.integers(0, max_gfn - 1)
        ends = [s[1] + s[2] for s in slots if s[1] + s[2] < max_gfn]
        return data.draw(st.sampled_from(ends) | anywhere if ends else anywhere)

    def draw_range(self, data: st.DataObject) -> tuple[int, int]:
        gfn = self.draw_gfn(data)
        npages = data.draw(
            st.sampled_from([1, 2, 512, 1024, 262144, 1 << 20]) | st.integers(1, 4096)
        )
        if data.draw(st.booleans()):  # align the start down to a boundary sometimes
            gfn &= ~(data.draw(st.sampled_from([512, 262144])) - 1)
        npages = min(npages, self.r.max_gfn - gfn)
        return gfn, max(npages, 1)

    # -- setup ---------------------------------------------------------------------------
    @initialize(cfg=vm_configs())
    def create(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.native = tdpmmu.VM(**cfg)
        self.ref = ReferenceVM(**cfg)
        self.record(f"VM(**{cfg})")
        self.touch(0)

    # -- rules ---------------------------------------------------------------------------
    @rule(data=st.data())
    def fault(self, data: st.DataObject) -> None:
        gfn = self.draw_gfn(data)
        write = data.draw(st.booleans(), label="write")
        exec_ = data.draw(st.booleans(), label="exec")
        vcpu = data.draw(st.integers(0, self.cfg["vcpus"] - 1), label="vcpu")
        self.touch(gfn)
        call = f"fault({gfn:#x}, write={write}, exec={exec_}, vcpu={vcpu})"
        self.record(call)
        n = self.native.fault(gfn, write=write, exec=exec_, vcpu=vcpu)
        r = self.r.fault(gfn, write=write, exec=exec_, vcpu=vcpu)
        got = (int(n.ret), n.level, hex(n.spte), n.retries, n.gfn, n.private)
        want = (int(r.ret), r.level, hex(r.spte), r.retries, r.gfn, r.private)
        assert got == want, f"{call}: engine {got} != reference {want}"
        event(f"fault -> {r.ret.name} at level {r.level}")
        if r.ret != tdpmmu.Ret.EMULATE:
            self.mapped.append(gfn)
        assert math.isclose(n.modeled_ns, r.modeled_ns, rel_tol=1e-9, abs_tol=1e-6), (
            f"{call}: modeled_ns engine {n.modeled_ns} != reference {r.modeled_ns}"
        )

    @precondition(lambda self: bool(self.mapped))
    @rule(data=st.data())
    def refault(self, data: st.DataObject) -> None:
        """Fault again where the run has mapped: spurious faults, NX splits, replacements."""
        gfn = data.draw(st.sampled_from(self.mapped[-8:]), label="gfn")
        gfn += data.draw(st.sampled_from([0, 0, 1, 7, 512]), label="delta")
        if gfn >= self.r.max_gfn:
            return
        exec_ = data.draw(st.booleans(), label="exec")
        vcpu = data.draw(st.integers(0, self.cfg["vcpus"] - 1), label="vcpu")
        self.touch(gfn)
        call = f"fault({gfn:#x}, exec={exec_}, vcpu={vcpu})"
        self.record(call)
        n = self.native.fault(gfn, exec=exec_, vcpu=vcpu)
        r = self.r.fault(gfn, exec=exec_, vcpu=vcpu)
        got = (int(n.ret), n.level, hex(n.spte), n.retries)
        want = (int(r.ret), r.level, hex(r.spte), r.retries)
        assert got == want, f"{call}: engine {got} != reference {want}"
        assert math.isclose(n.modeled_ns, r.modeled_ns, rel_tol=1e-9, abs_tol=1e-6), call
        event(f"refault -> {r.ret.name} at level {r.level}")

    @rule(data=st.data())
    def fault_batch(self, data: st.DataObject) -> None:
        gfns = [self.draw_gfn(data) for _ in range(data.draw(st.integers(1, 4)))]
        write = data.draw(st.booleans(), label="write")
        exec_ = data.draw(st.booleans(), label="exec")
        vcpu = data.draw(st.integers(0, self.cfg["vcpus"] - 1), label="vcpu")
        self.touch(*gfns)
        call = f"fault_batch({[hex(g) for g in gfns]}, write={write}, exec={exec_}, vcpu={vcpu})"
        self.record(call)
        n = self.native.fault_batch(
            np.array(gfns, dtype=np.uint64), write=write, exec=exec_, vcpu=vcpu
        )
        r = self.r.fault_batch(gfns, write=write, exec=exec_, vcpu=vcpu)
        assert [int(x) for x in n] == r, f"{call}: engine {list(n)} != reference {r}"

    @precondition(lambda self: self.ref is not None and len(self.r.memslots()) > 0)
    @rule(data=st.data())
    def populate(self, data: st.DataObject) -> None:
        _, sgfn, snpages, backing, _, _ = data.draw(st.sampled_from(self.slots()))
        step = backing // 4096
        # Keep 4K-backed populates short: the reference faults one page at a time.
        limit = snpages if step > 1 else min(snpages, 64)
        off = data.draw(st.integers(0, snpages - 1))
        npages = data.draw(st.integers(1, max(1, min(limit, snpages - off))))
        if step == 1:
            npages = min(npages, 64)
        gfn = sgfn + off
        self.touch(gfn, gfn + npages - 1)
        call = f"populate({gfn:#x}, {npages})"
        self.record(call)
        n = self.native.populate(gfn, npages)
        r = self.r.populate(gfn, npages)
        assert n == r, f"{call}: engine {n} != reference {r}"
        event(f"populate installed {'0' if r == 0 else '1' if r == 1 else 'many'}")

    @rule(data=st.data())
    def populate_outside_memslots(self, data: st.DataObject) -> None:
        slots = self.slots()
        # A slot end that no other slot continues: [end - 1, end + 1) leaves the memslots.
        starts = [
            s[1] + s[2]
            for s in slots
            if s[1] + s[2] < self.r.max_gfn
            and not any(t[1] <= s[1] + s[2] < t[1] + t[2] for t in slots)
        ]
        if not starts:
            return
        gfn = data.draw(st.sampled_from(starts)) - 1
        self.record(f"populate({gfn:#x}, 2)  # crosses out of a memslot")
        before = dict(self.native.stats)
        _same_exception(lambda: self.native.populate(gfn, 2), lambda: self.r.populate(gfn, 2))
        assert dict(self.native.stats) == before

    @rule(data=st.data())
    def zap_gfn_range(self, data: st.DataObject) -> None:
        gfn, npages = self.draw_range(data)
        self.touch(gfn, gfn + npages - 1)
        call = f"zap_gfn_range({gfn:#x}, {npages:#x})"
        self.record(call)
        n = self.native.zap_gfn_range(gfn, npages)
        r = self.r.zap_gfn_range(gfn, npages)
        assert n == r, f"{call}: engine {n} != reference {r}"

    @rule(data=st.data())
    def mmu_notifier_invalidate(self, data: st.DataObject) -> None:
        gfn, npages = self.draw_range(data)
        self.touch(gfn, gfn + npages - 1)
        call = f"mmu_notifier_invalidate({gfn:#x}, {npages:#x})"
        self.record(call)
        n = self.native.mmu_notifier_invalidate(gfn, npages)
        r = self.r.mmu_notifier_invalidate(gfn, npages)
        assert n == r, f"{call}: engine {n} != reference {r}"

    @precondition(lambda self: self.ref is not None and len(self.r.memslots()) < MAX_SLOTS)
    @rule(data=st.data())
    def add_memslot(self, data: st.DataObject) -> None:
        backing = data.draw(st.sampled_from(["4K", "2M", "1G"]), label="backing")
        step = PAGES[backing]
        npages = step * data.draw(
            st.integers(1, 1024) if step == 1 else st.integers(1, 3), label="units"
        )
        max_gfn = self.r.max_gfn
        slots = self.slots()
        # Just after an existing slot (aligned up), or anywhere aligned.
        ends = [s[1] + s[2] for s in slots]
        where = data.draw(st.sampled_from(["after", "after", "anywhere"]), label="where")
        if where == "after" and ends:
            start = data.draw(st.sampled_from(ends))
            gfn = -(-start // step) * step
            gfn += step * data.draw(st.integers(0, 2))
        else:
            gfn = step * data.draw(st.integers(0, (max_gfn - npages) // step))
        if gfn + npages > max_gfn:
            return
        if any(gfn < s[1] + s[2] and s[1] < gfn + npages for s in slots):
            call = f"add_memslot({gfn:#x}, {npages:#x}, {backing!r})  # overlaps"
            self.record(call)
            _same_exception(
                lambda: self.native.add_memslot(gfn, npages, backing),
                lambda: self.r.add_memslot(gfn, npages, backing),
            )
            return
        self.touch(gfn, gfn + npages - 1, gfn + npages)
        call = f"add_memslot({gfn:#x}, {npages:#x}, {backing!r})"
        self.record(call)
        n = self.native.add_memslot(gfn, npages, backing)
        r = self.r.add_memslot(gfn, npages, backing)
        assert n == r, f"{call}: engine slot {n} != reference slot {r}"

    @precondition(lambda self: self.ref is not None and len(self.r.memslots()) > 0)
    @rule(data=st.data())
    def delete_memslot(self, data: st.DataObject) -> None:
        slot = data.draw(st.sampled_from([s[0] for s in self.slots()]), label="slot")
        call = f"delete_memslot({slot})"
        self.record(call)
        self.native.delete_memslot(slot)
        self.r.delete_memslot(slot)

    @rule()
    def zap_all_fast(self) -> None:
        self.record("zap_all_fast()")
        self.native.zap_all_fast()
        self.r.zap_all_fast()

    @rule(data=st.data())
    def bad_fault(self, data: st.DataObject) -> None:
        gfn = data.draw(st.integers(self.r.max_gfn, self.r.max_gfn + 5), label="gfn")
        before = dict(self.native.stats)
        _same_exception(lambda: self.native.fault(gfn), lambda: self.r.fault(gfn))
        _same_exception(
            lambda: self.native.fault(1, private=True), lambda: self.r.fault(1, private=True)
        )
        assert dict(self.native.stats) == before

    # -- comparisons after every step ----------------------------------------------------
    @invariant()
    def same_state(self) -> None:
        if self.ref is None:
            return
        where = f"after {self.log[-1]}"
        ref_stats = self.r.stats
        nat_stats = dict(self.native.stats)
        for key, want in ref_stats.items():
            assert key in nat_stats, f"{where}: engine has no counter {key!r}"
            got = nat_stats[key]
            if key == "modeled_ns":
                assert math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-6), (
                    f"{where}: modeled_ns engine {got} != reference {want}"
                )
            else:
                assert got == want, f"{where}: {key} engine {got} != reference {want}"

        assert self.native.memslots() == self.r.memslots(), where
        assert self.native.memslot_generation == self.r.memslot_generation, where
        assert self.native.roots() == self.r.roots(), where

        sample = list(self.touched)[-MAX_WALK_SAMPLE:]
        for s in self.slots():
            sample += [s[1], s[1] + s[2] - 1]
        for gfn in sample:
            if gfn >= self.r.max_gfn:
                continue
            got = [(int(lv), int(sp)) for lv, sp in self.native.walk(gfn)]
            want = self.r.walk(gfn)
            assert got == want, f"{where}: walk({gfn:#x}) engine {_fmt(got)} != {_fmt(want)}"

        ref_tables = self.r.tables()
        nat_tables = self.native.tables()
        assert nat_tables.shape[0] == len(ref_tables), (
            f"{where}: engine arena has {nat_tables.shape[0]} tables, reference {len(ref_tables)}"
        )
        if len(ref_tables) <= MAX_ARENA_COMPARE:
            want_arr = np.array(ref_tables, dtype=np.uint64).reshape(-1, 512)
            if not np.array_equal(nat_tables, want_arr):
                row, col = (int(x) for x in np.argwhere(nat_tables != want_arr)[0])
                raise AssertionError(
                    f"{where}: table {row} (pfn {0x10_0000 + row:#x}) entry {col}: engine "
                    f"{int(nat_tables[row, col]):#x} != reference {int(want_arr[row, col]):#x}"
                )

        self.native.check()
        self.r.check()

    def teardown(self) -> None:
        if self.ref is None:
            return
        stats = self.r.stats
        for key in ("huge_page_splits", "remote_tlb_flush", "roots_freed", "pf_mmio_spte_created"):
            event(f"run reached {key} > 0: {stats[key] > 0}")


def _fmt(path: list[tuple[int, int]]) -> str:
    return "[" + ", ".join(f"({lv}, {sp:#x})" for lv, sp in path) + "]"


EngineMatchesReference.TestCase.settings = settings(
    max_examples=int(os.environ.get("TDPMMU_DIFF_EXAMPLES", 60 if CI else 150)),
    stateful_step_count=30 if CI else 40,
    deadline=None,
    derandomize=CI,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target]
    if os.environ.get("TDPMMU_DIFF_NO_SHRINK")
    else list(Phase),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

TestEngineMatchesReference = EngineMatchesReference.TestCase
