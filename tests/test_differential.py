"""Differential test: the native engine against the pure-Python reference model.

Two Hypothesis rule-based state machines build one small VM twice — ``tdpmmu.VM`` (Rust)
and ``tdpmmu.reference.ReferenceVM`` — with the same parameters, apply the same random
operations to both and after every step demand the same results, the same walks for every
gfn the run has touched (bounded), the same page-table arena (host pfns included, so
allocation order and teardown values must match too), the same roots, memslots and counters
(all of them: the reference keeps the engine's list), and the same ``check()`` outcome:

* ``EngineMatchesReference``: the default VM (faults, populate, zaps, memslots, read-only
  memslots).
* ``ConfidentialMatchesReference``: TDX (both hook designs, every TDX option but busy
  injection, huge private pages and KVM_TDX_TERMINATE_VM included), SEV-SNP (gmem/private
  designs, 4K/2M folios) and SW_PROTECTED (with and without the mirror root): private/shared
  faults, memory attributes, punch_hole, populate, finalize, guest_memfd memslots, zaps,
  rmp_fault, PVALIDATE, splits of private 2M leaves and destroy; also the S-EPT entries and
  the RMP entries of touched gfns.  The ``private`` designs break invariants on purpose: both
  sides must then raise the same InvariantError (or VmBugged).

Wherever counters are compared, so is the cost ledger (``cost_breakdown()``: every CostModel
field, in order, with the same modeled ns), and on confidential VMs (built with
``trace=True``) the external-hook calls in the trace (``split_external_spt`` included),
which both sides count and trace at one dispatch site, whatever the backend.

Both machines also drive dirty logging and its neighbours (spec §7): ``set_dirty_logging``
(plain, manual protection, initially set, with and without eager splitting, with and
without PML), ``get_dirty_log`` (the bitmaps are compared word for word; those of
manual-protect logs, which can be read without side effects, after every step too),
``clear_dirty_log``, ``age_gfn_range``, ``test_age_gfn``, ``split_huge_pages``,
``recover_huge_pages``, write faults on write-protected or PML-armed leaves (the lockless
fast path), page write tracking (``write_track_gfn`` and writes to tracked pages), NX huge
page recovery (``nx_recover``, alone and after exec faults in huge-backed memory) and
KVM_MR_MOVE (``move_memslot``).  Both also drive guest accesses (``access_batch``: hardware
walk hits that set A/D and log to PML, faults, refused calls; private and shared on the
confidential VMs, whose TDs must be finalized first: see the xfail test) and host mm changes
of the shared mappings: ``madvise_dontneed`` (then a re-touch must allocate again; refused on
guest_memfd slots) and ``mprotect`` (then a read maps without write access and a write is a
memory-fault exit).  The default machine, and the SW_PROTECTED one without a mirror root,
also draw ``ad_bits=False`` now and then (KVM's ``enable_ept_ad_bits=0``: A/D-disabled SPTEs,
aging by access tracking, access-tracked leaves restored by the fast path, PML refused).

A fixed lifecycle per design/option (``test_scenario_matches_reference``) runs as well, a
fixed dirty-logging flow per backing (``test_dirty_logging_scenario_matches_reference``),
fixed flows through read-only memslots, moves, write tracking, NX recovery, PML, TDX huge
pages and KVM_TDX_TERMINATE_VM that must reach each of them
(``test_new_operations_scenario_matches_reference``), and fixed flows through guest
accesses, MADV_DONTNEED and mprotect on every VM type
(``test_host_mm_and_access_batch_scenario_matches_reference``), and a fixed access-tracking
flow with A/D bits off and on (``test_access_tracking_scenario_matches_reference``).  The
file is sized to stay under two minutes on two cores; with CI=true it is shorter (about 30 s)
and derandomized.
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
from tdpmmu.reference import ReferenceVM, TdpIter

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
#: 2M pages one operation may split to 4K (the reference audits every leaf after each step).
MAX_SPLITS_TO_4K = 2

#: the counters of the newer paths (the teardown reports whether a run reached each).
DIRTY_COUNTERS = (
    "pf_fast",
    "sptes_write_protected",
    "dirty_pages_logged",
    "sptes_aged",
    "huge_pages_recovered",
    "pml_logged",
    "nx_lpage_splits",
    "nx_huge_pages_recovered",
    "pf_write_protected",
    "pf_emulate",
)

#: the external hooks: the trace events that both sides record at their dispatch site.
HOOKS = (
    "link_external_spt",
    "set_external_spte",
    "remove_external_spte",
    "free_external_spt",
    "split_external_spt",
)

#: SPTE bits the tests look at.
_SPTE_W = 1 << 1
_SPTE_X = 1 << 2
_SPTE_D = 1 << 9
_SPTE_MMU_WRITABLE = 1 << 58
_SPTE_HOST_WRITABLE = 1 << 57


def _same_counters(native: Any, ref: ReferenceVM, where: str) -> None:
    """The same counters, all of them (the reference keeps the engine's list, in its order),
    the same ``modeled_ns`` (to rounding) and the same page-table gauges."""
    got, want = dict(native.stats), ref.stats
    assert list(got) == list(want), f"{where}: stats keys engine {list(got)} != {list(want)}"
    for key, value in want.items():
        if key == "modeled_ns":
            assert math.isclose(got[key], value, rel_tol=1e-9, abs_tol=1e-6), (
                f"{where}: modeled_ns engine {got[key]} != reference {value}"
            )
        else:
            assert got[key] == value, f"{where}: {key} engine {got[key]} != reference {value}"


def _same_costs(native: Any, ref: ReferenceVM, where: str) -> None:
    """The same cost ledger: every CostModel field in order, the same modeled ns each (the
    same units of the same cost, so equal exactly), adding up to ``modeled_ns``."""
    want = ref.cost_breakdown()
    got = dict(native.cost_breakdown())
    assert list(got) == list(want), f"{where}: cost fields engine {list(got)} != {list(want)}"
    for field, ns in want.items():
        assert got[field] == ns, f"{where}: cost {field} engine {got[field]} != reference {ns}"
    total = 0.0
    for ns in want.values():
        total += ns
    assert ref.stats["modeled_ns"] == total, f"{where}: reference modeled_ns != its breakdown"


def _same_hook_trace(native: Any, ref: ReferenceVM, where: str) -> None:
    """The same external-hook calls, in order, with the same arguments."""
    got = [tuple(e) for e in native.trace_events() if e[0] in HOOKS]
    want = [tuple(e) for e in ref.trace_events()]
    if got != want:
        i = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)
        i = min(len(got), len(want)) if i is None else i
        raise AssertionError(
            f"{where}: hook call {i} of {len(got)}/{len(want)}: engine "
            f"{got[i] if i < len(got) else None} != reference {want[i] if i < len(want) else None}"
        )


class DirtyLoggingRules:
    """Rules for dirty logging, aging, eager splitting and huge-page recovery, shared by both
    machines (which provide ``r``, ``native``, ``alive``, ``touch``, ``both`` and
    ``mapped``).  Every call goes to both sides through ``both``, which demands equal results
    or the same kind of error; the machine's invariant then compares the state."""

    native: Any
    mapped: list[int]
    peaks: dict[str, int]

    # Provided by the machine.
    @property
    def r(self) -> ReferenceVM:
        raise NotImplementedError

    def alive(self) -> bool:
        raise NotImplementedError

    def touch(self, *gfns: int) -> None:
        raise NotImplementedError

    def both(self, call: str, method: str, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        raise NotImplementedError

    def draw_gfn(self, data: st.DataObject) -> int:
        raise NotImplementedError

    # -- helpers -------------------------------------------------------------------------
    def logging_slots(self, manual: bool | None = None) -> list[int]:
        """Ids of the memslots that log dirty pages (with or without manual protection)."""
        return [
            s.id
            for s in self.r.slots.by_gfn()
            if s.dirty is not None and (manual is None or s.dirty.manual_protect == manual)
        ]

    def draw_slot_id(self, data: st.DataObject, preferred: list[int]) -> int:
        """Mostly one of ``preferred``, else any memslot, now and then an unknown id."""
        ids = [s[0] for s in self.r.memslots()]
        kind = data.draw(st.sampled_from(["preferred"] * 6 + ["any"] * 3 + ["unknown"]))
        if kind == "preferred" and preferred:
            return data.draw(st.sampled_from(preferred), label="slot")
        if kind != "unknown" and ids:
            return data.draw(st.sampled_from(ids), label="slot")
        return max(ids, default=0) + data.draw(st.integers(1, 3), label="slot")

    def splits_to_4k(self, gfn: int, end: int) -> int:
        """About how many 2M pages splitting ``[gfn, end)`` to 4K would turn into tables of 4K
        leaves (each costs the reference's per-step audit 512 more leaves)."""
        tdp_mmu = self.r.tdp_mmu
        n = 0
        for root in tdp_mmu.valid_direct_roots():
            for it in TdpIter(self.r.arena, root, 2, gfn, end, tdp_mmu.root_gfn_bits(False)):
                spte = it.old_spte
                if not spte & (1 << 11) or not spte & (1 << 7):
                    continue  # not a huge leaf
                if it.level == 2:
                    n += 1
                else:
                    overlap = min(end, it.gfn + (1 << 18)) - max(gfn, it.gfn)
                    n += -(-overlap // 512) + 1
        return n

    def maps_huge(self, gfn: int) -> bool:
        """Whether the newest direct root maps ``gfn`` with a present huge leaf."""
        path = self.r.walk(gfn) if 0 <= gfn < self.r.max_gfn else []
        return bool(path) and path[-1][0] > 1 and path[-1][1] & 0x880 == 0x880

    def draw_op_range(self, data: st.DataObject) -> tuple[int, int]:
        """A range over mapped memory: around a mapped gfn, or a slot's whole range (or part,
        or past its end)."""
        max_gfn = self.r.max_gfn
        slots = self.r.memslots()
        if self.mapped and data.draw(st.booleans(), label="near_mapped"):
            gfn = data.draw(st.sampled_from(self.mapped[-16:]), label="base")
            gfn &= ~(data.draw(st.sampled_from([1, 64, 512, 262144]), label="align") - 1)
            npages = data.draw(
                st.sampled_from([1, 2, 64, 512, 1024, 262144]) | st.integers(1, 2048),
                label="npages",
            )
        elif slots:
            _, sgfn, snpages, _, _, _ = data.draw(st.sampled_from(slots), label="range_slot")
            off = data.draw(st.sampled_from([0, 0, 1, 511, 512]) | st.integers(0, snpages - 1))
            off = min(off, snpages - 1)
            gfn = sgfn + off
            npages = snpages - off
            if data.draw(st.integers(0, 3), label="part") == 0:
                npages = data.draw(st.integers(1, 2 * snpages), label="npages")
        else:
            gfn, npages = data.draw(st.integers(0, max_gfn - 1), label="gfn"), 1
        gfn = min(gfn, max_gfn - 1)
        return gfn, max(1, min(npages, max_gfn - gfn))

    # -- rules ---------------------------------------------------------------------------
    @rule(data=st.data())
    def set_dirty_logging(self, data: st.DataObject) -> None:
        if not self.alive() or not self.r.memslots():
            return
        logging = self.logging_slots()
        not_logging = [s[0] for s in self.r.memslots() if s[0] not in logging]
        enable = data.draw(st.sampled_from([True, True, False]), label="enable")
        slot = self.draw_slot_id(data, not_logging if enable else logging)
        manual = data.draw(st.booleans(), label="manual_protect")
        # initially_set without manual_protect is refused: drawn now and then.
        initially_set = data.draw(st.sampled_from([False, manual, manual, True]), label="init")
        eager = data.draw(st.sampled_from([True, True, False]), label="eager_split")
        pml = data.draw(st.booleans(), label="pml")
        if slot in self.r.slots:
            s = self.r.slots[slot]
            self.touch(s.gfn, s.end - 1)
            if eager and enable and self.splits_to_4k(s.gfn, s.end) > MAX_SPLITS_TO_4K:
                eager = False  # keep the reference's state small: protect the huge pages
                event("set_dirty_logging: eager split left off (too many huge pages)")
        out = self.both(
            f"set_dirty_logging({slot}, {enable}, manual_protect={manual}, "
            f"initially_set={initially_set}, eager_split={eager}, pml={pml})",
            "set_dirty_logging",
            slot,
            enable,
            manual,
            initially_set,
            eager,
            pml,
        )
        if out[0] != "ok" and enable and pml and not self.r.ad_bits:
            event("set_dirty_logging refused: PML without A/D bits")
        if out[0] == "ok":
            mode = "initially set" if initially_set else "manual" if manual else "plain"
            mode += " PML" if pml and enable else ""
            event(
                f"set_dirty_logging {'on' if enable else 'off'} ({mode}) changed >0: {out[1] > 0}"
            )
        elif enable and slot in self.r.slots and self.r.slots[slot].readonly:
            event("set_dirty_logging refused on a read-only slot")

    @rule(data=st.data())
    def get_dirty_log(self, data: st.DataObject) -> None:
        if not self.alive() or not self.r.memslots():
            return
        slot = self.draw_slot_id(data, self.logging_slots())
        out = self.both(f"get_dirty_log({slot})", "get_dirty_log", slot)
        if out[0] == "ok":
            bits = sum(bin(w).count("1") for w in out[1])
            many = "0" if bits == 0 else "1-63" if bits < 64 else "64+"
            event(f"get_dirty_log: dirty bits set: {many}")

    @rule(data=st.data())
    def clear_dirty_log(self, data: st.DataObject) -> None:
        if not self.alive() or not self.r.memslots():
            return
        slot = self.draw_slot_id(data, self.logging_slots(manual=True))
        size = self.r.slots[slot].npages if slot in self.r.slots else 64
        words = -(-size // 64)
        first = 64 * data.draw(st.integers(0, words - 1), label="first_word")
        if data.draw(st.integers(0, 9), label="odd_first") == 0:
            first += data.draw(st.integers(1, 63), label="misalign")  # refused
        kind = data.draw(st.sampled_from(["words", "words", "to_end", "any"]), label="kind")
        if kind == "words":
            npages = 64 * data.draw(st.integers(1, max(1, min(words, 64))), label="nwords")
        elif kind == "to_end":
            npages = size - first
        else:
            npages = data.draw(st.integers(0, size + 64), label="npages")
        if npages < 0:
            return
        log = self.r.slots[slot].dirty if slot in self.r.slots else None
        if log is not None and log.initially_set and log.eager_split and npages > 64:
            base = self.r.slots[slot].gfn + first
            if self.splits_to_4k(base, base + npages) > MAX_SPLITS_TO_4K:
                npages = min(64, size - first)  # one word: a few huge pages at most
        if slot in self.r.slots:
            base = self.r.slots[slot].gfn
            self.touch(base + first, base + min(first + npages, size) - 1)
        out = self.both(
            f"clear_dirty_log({slot}, {first}, {npages})", "clear_dirty_log", slot, first, npages
        )
        if out[0] == "ok":
            event(f"clear_dirty_log write-protected >0: {out[1] > 0}")

    @rule(data=st.data())
    def age_gfn_range(self, data: st.DataObject) -> None:
        if not self.alive():
            return
        gfn, npages = self.draw_op_range(data)
        self.touch(gfn, gfn + npages - 1)
        out = self.both(f"age_gfn_range({gfn:#x}, {npages:#x})", "age_gfn_range", gfn, npages)
        event(f"age_gfn_range (A/D {'on' if self.r.ad_bits else 'off'}) -> {out}")

    @rule(data=st.data())
    def probe_age_gfn(self, data: st.DataObject) -> None:
        if not self.alive():
            return
        gfn, npages = self.draw_op_range(data)
        if data.draw(st.booleans(), label="default_npages"):
            self.touch(gfn)
            out = self.both(f"test_age_gfn({gfn:#x})", "test_age_gfn", gfn)
        else:
            self.touch(gfn, gfn + npages - 1)
            out = self.both(f"test_age_gfn({gfn:#x}, {npages:#x})", "test_age_gfn", gfn, npages)
        event(f"test_age_gfn -> {out}")

    @rule(data=st.data())
    def split_huge_pages(self, data: st.DataObject) -> None:
        if not self.alive():
            return
        huge = [g for g in self.mapped[-32:] if self.maps_huge(g)]
        if huge and data.draw(st.booleans(), label="at_huge"):
            gfn = data.draw(st.sampled_from(huge), label="huge_gfn")
            span = data.draw(st.sampled_from([1, 512, 262144]), label="span")
            gfn &= ~(span - 1)
            npages = min(span, self.r.max_gfn - gfn)
        else:
            gfn, npages = self.draw_op_range(data)
        level = data.draw(st.sampled_from([1, 1, 2, 2, 3]), label="target_level")
        if level == 1 and self.splits_to_4k(gfn, gfn + npages) > MAX_SPLITS_TO_4K:
            npages = min(npages, 512)  # keep the reference's state small
        self.touch(gfn, gfn + npages - 1)
        out = self.both(
            f"split_huge_pages({gfn:#x}, {npages:#x}, {level})",
            "split_huge_pages",
            gfn,
            npages,
            level,
        )
        if out[0] == "ok":
            event(f"split_huge_pages to level {level} split >0: {out[1] > 0}")

    @rule(data=st.data())
    def recover_huge_pages(self, data: st.DataObject) -> None:
        if not self.alive() or not self.r.memslots():
            return
        logging = self.logging_slots()
        slot = self.draw_slot_id(data, [s[0] for s in self.r.memslots() if s[0] not in logging])
        out = self.both(f"recover_huge_pages({slot})", "recover_huge_pages", slot)
        if out[0] == "ok":
            event(f"recover_huge_pages recovered >0: {out[1] > 0}")

    @rule(data=st.data())
    def write_to_logged_page(self, data: st.DataObject) -> None:
        """A write where a log write-protected (or a read mapped): the fast path, or the slow
        path for a huge page of a logged slot."""
        if not self.alive():
            return
        logged = [
            g
            for g in self.mapped[-64:]
            if (s := self.r.slots.gfn_to_memslot(g)) is not None and s.dirty is not None
        ]
        if logged:
            gfn = data.draw(st.sampled_from(logged), label="gfn")
        elif self.logging_slots():
            slot = self.r.slots[data.draw(st.sampled_from(self.logging_slots()), label="slot")]
            gfn = slot.gfn + data.draw(st.integers(0, min(slot.npages, 1024) - 1), label="off")
        else:
            return
        exec_ = data.draw(st.sampled_from([False, False, False, True]), label="exec")
        vcpu = data.draw(st.integers(0, self.r.vcpus - 1), label="vcpu")
        self.touch(gfn)
        self.mapped.append(gfn)
        out = self.both(
            f"fault({gfn:#x}, write=True, exec={exec_}, vcpu={vcpu})  # logged page",
            "fault",
            gfn,
            None,
            True,
            exec_,
            vcpu,
        )
        if out[0] == "ok":
            event(f"write to a logged page -> {tdpmmu.Ret(out[1]).name}")

    @rule(data=st.data())
    def dirty_log_round(self, data: st.DataObject) -> None:
        """One round of live migration's loop on a slot without guest_memfd (added if there
        is none): writes, logging on (in a drawn mode), writes again (the fast path), the log
        read and re-armed, more writes, and logging off (huge pages recovered) now and
        then.  Each call is compared as it happens."""
        if not self.alive():
            return
        slots = self.loggable_slots()
        if not slots or data.draw(st.integers(0, 5), label="new_slot") == 0:
            if len(self.r.memslots()) >= MAX_SLOTS:
                if not slots:
                    return
            else:
                backing = data.draw(st.sampled_from([4096, 2 << 20]), label="backing")
                step = backing // 4096
                end = max((m[1] + m[2] for m in self.r.memslots()), default=0)
                gfn = -(-end // step) * step
                npages = step * data.draw(st.integers(1, 2), label="units")
                if step == 1:
                    npages = data.draw(st.sampled_from([64, 100, 512, 1024]), label="npages")
                if gfn + npages > self.r.max_gfn:
                    return
                self.touch(gfn, gfn + npages - 1)
                self.both(
                    f"add_memslot({gfn:#x}, {npages:#x}, {backing})",
                    "add_memslot",
                    gfn,
                    npages,
                    backing,
                )
                slots = self.loggable_slots()
                if not slots:
                    return
        with_mapped = [m for m in slots if any(m[1] <= g < m[1] + m[2] for g in self.mapped)]
        slot_id, sgfn, snpages, _, _, _ = data.draw(
            st.sampled_from(with_mapped or slots), label="round_slot"
        )
        mapped = [g for g in self.mapped[-64:] if sgfn <= g < sgfn + snpages]
        offsets = st.sampled_from([0, 1, 63, 64, 511, 512, snpages - 1]) | st.integers(
            0, snpages - 1
        )
        gfns = [sgfn + min(data.draw(offsets, label="off"), snpages - 1) for _ in range(3)]
        if mapped:
            gfns += data.draw(st.lists(st.sampled_from(mapped), max_size=3), label="mapped")
        vcpu = data.draw(st.integers(0, self.r.vcpus - 1), label="vcpu")

        def write(gs: list[int], why: str) -> None:
            for g in gs:
                self.touch(g)
                self.mapped.append(g)
                out = self.both(f"fault({g:#x}, vcpu={vcpu})  # {why}", "fault", g, None, True)
                if out[0] == "ok":
                    event(f"dirty round: {why} -> {tdpmmu.Ret(out[1]).name}")

        write(gfns[:2], "before logging")
        log = self.r.slots[slot_id].dirty
        if log is None:
            manual = data.draw(st.booleans(), label="manual_protect")
            initially_set = manual and data.draw(st.booleans(), label="initially_set")
            eager = data.draw(st.booleans(), label="eager_split")
            # PML needs EPT A/D bits (refused without: the set_dirty_logging rule draws that).
            pml = data.draw(st.booleans(), label="pml") and self.r.ad_bits
            if eager and self.splits_to_4k(sgfn, sgfn + snpages) > MAX_SPLITS_TO_4K:
                eager = False
            self.touch(sgfn, sgfn + snpages - 1)
            self.both(
                f"set_dirty_logging({slot_id}, True, {manual}, {initially_set}, {eager}, {pml})",
                "set_dirty_logging",
                slot_id,
                True,
                manual,
                initially_set,
                eager,
                pml,
            )
            log = self.r.slots[slot_id].dirty
        if log is None:
            return  # refused: a read-only slot
        pml_before = self.r.stats["pml_logged"]
        write(gfns, "logging")
        out = self.both(f"get_dirty_log({slot_id})", "get_dirty_log", slot_id)
        bits = sum(bin(w).count("1") for w in out[1]) if out[0] == "ok" else 0
        event(f"dirty round: bits read {'0' if bits == 0 else '>0'}")
        if log.manual_protect:
            page = data.draw(st.sampled_from(gfns), label="clear_at") - sgfn
            first = page & ~63
            npages = min(64 * data.draw(st.integers(1, 3), label="words"), snpages - first)
            self.both(
                f"clear_dirty_log({slot_id}, {first}, {npages})",
                "clear_dirty_log",
                slot_id,
                first,
                npages,
            )
        write(gfns[-2:], "re-armed")
        if log.pml:
            logged = self.r.stats["pml_logged"] > pml_before
            event(f"dirty round (PML): pages logged by the CPU >0: {logged}")
        if data.draw(st.booleans(), label="stop"):
            out = self.both(
                f"set_dirty_logging({slot_id}, False)", "set_dirty_logging", slot_id, False
            )
            event(f"dirty round: stop recovered >0: {out[0] == 'ok' and out[1] > 0}")

    def loggable_slots(self) -> list[tuple[int, int, int, int, bool, int]]:
        """The memslots that may log dirty pages: no guest_memfd, not read-only."""
        return [m for m in self.r.memslots() if not m[4] and not self.r.slots[m[0]].readonly]

    #: counters that go down again (tables on the NX list, 2M leaves): their peak so far.
    PEAKED = ("nx_lpage_splits", "pages_2m")

    def note_peaks(self) -> None:
        """Remember the peak of each ``PEAKED`` counter (called after every step)."""
        for key in self.PEAKED:
            self.peaks[key] = max(self.peaks.get(key, 0), self.r.stats[key])

    def reached(self, key: str) -> bool:
        """Whether the run's counter ``key`` ever went above 0."""
        return max(self.peaks.get(key, 0), self.r.stats[key]) > 0

    def shared_slot_gfns(self, recent: int = 32) -> list[int]:
        """Recently mapped gfns in memslots without guest_memfd."""
        out = []
        for g in self.mapped[-recent:]:
            slot = self.r.slots.gfn_to_memslot(g)
            if slot is not None and not slot.gmem:
                out.append(g)
        return out

    def tracked_gfns(self) -> list[int]:
        """The gfns with a write tracker, by slot and page."""
        out = []
        for slot in self.r.slots.by_gfn():
            out += sorted(slot.gfn + off for off in slot.write_track or ())
        return out

    @rule(data=st.data())
    def write_track_gfn(self, data: st.DataObject) -> None:
        """Add a write tracker (mostly where the run mapped, so a huge leaf over it is
        protected), or remove one (now and then from a page without any: refused)."""
        if not self.alive():
            return
        tracked = self.tracked_gfns()
        add = not tracked or data.draw(st.sampled_from([True, True, False]), label="add")
        if add or data.draw(st.integers(0, 5), label="untracked") == 0:
            shared = self.shared_slot_gfns()
            plain = [s for s in self.r.slots.by_gfn() if not s.gmem]
            where = data.draw(st.sampled_from(["mapped", "mapped", "slot", "any"]), label="at")
            if where == "mapped" and shared:
                gfn = data.draw(st.sampled_from(shared), label="gfn")
                gfn += data.draw(st.sampled_from([0, 0, 1, 64, 511]), label="delta")
            elif where != "any" and plain:
                slot = data.draw(st.sampled_from(plain), label="slot")
                gfn = slot.gfn + data.draw(st.integers(0, slot.npages - 1), label="off")
            else:
                gfn = self.draw_gfn(data)
            gfn = min(gfn, self.r.max_gfn - 1)
        else:
            gfn = data.draw(st.sampled_from(tracked), label="tracked_gfn")
        self.touch(gfn)
        out = self.both(f"write_track_gfn({gfn:#x}, add={add})", "write_track_gfn", gfn, add)
        if out[0] != "ok":
            event(f"write_track_gfn {'add' if add else 'remove'} refused")
            return
        event(f"write_track_gfn {'add' if add else 'remove'} -> count {min(out[1], 2)}")
        if data.draw(st.booleans(), label="then_write"):
            # The guest writes the page (WRITE_PROTECTED while tracked) or a neighbour.
            g = min(gfn + data.draw(st.sampled_from([0, 0, 1]), label="delta"), self.r.max_gfn - 1)
            self.touch(g)
            self.mapped.append(g)
            out = self.both(f"fault({g:#x})  # after write_track_gfn", "fault", g)
            if out[0] == "ok":
                event(f"write after write_track_gfn -> {tdpmmu.Ret(out[1]).name}")

    @rule(data=st.data())
    def write_to_special_page(self, data: st.DataObject) -> None:
        """A guest write (or read) to a write-tracked page, a neighbour of one, or a page of
        a read-only memslot: WRITE_PROTECTED, EMULATE, or a read-only leaf."""
        if not self.alive():
            return
        tracked = self.tracked_gfns()
        readonly = [s for s in self.r.slots.by_gfn() if s.readonly]
        may_add = (
            self.r.vm_type in ("default", "sw_protected") and len(self.r.slots.by_id) < MAX_SLOTS
        )
        if not readonly and may_add and data.draw(st.booleans(), label="add_readonly"):
            # A read-only slot after the last one (KVM has none on tdx/snp).
            backing = data.draw(st.sampled_from([4096, 2 << 20]), label="backing")
            step = backing // 4096
            end = max((m[1] + m[2] for m in self.r.memslots()), default=0)
            gfn = -(-end // step) * step
            npages = step * data.draw(st.integers(1, 2), label="units")
            if gfn + npages <= self.r.max_gfn:
                self.touch(gfn, gfn + npages - 1)
                self.both(
                    f"add_memslot({gfn:#x}, {npages:#x}, {backing}, readonly=True)",
                    "add_memslot",
                    gfn,
                    npages,
                    backing,
                    False,
                    True,
                )
                readonly = [s for s in self.r.slots.by_gfn() if s.readonly]
        kinds = ["tracked"] * bool(tracked) + ["readonly"] * bool(readonly)
        if not kinds:
            return
        if data.draw(st.sampled_from(kinds), label="kind") == "tracked":
            gfn = data.draw(st.sampled_from(tracked), label="gfn")
            gfn += data.draw(st.sampled_from([0, 0, 0, 1, -1]), label="delta")
        else:
            slot = data.draw(st.sampled_from(readonly), label="slot")
            off = data.draw(st.sampled_from([0, 3, 511, 512]) | st.integers(0, slot.npages - 1))
            gfn = slot.gfn + min(off, slot.npages - 1)
        gfn = min(max(gfn, 0), self.r.max_gfn - 1)
        write = data.draw(st.sampled_from([True, True, False]), label="write")
        exec_ = data.draw(st.sampled_from([False, False, True]), label="exec")
        vcpu = data.draw(st.integers(0, self.r.vcpus - 1), label="vcpu")
        self.touch(gfn)
        self.mapped.append(gfn)
        out = self.both(
            f"fault({gfn:#x}, write={write}, exec={exec_}, vcpu={vcpu})  # tracked/read-only",
            "fault",
            gfn,
            None,
            write,
            exec_,
            vcpu,
        )
        if out[0] == "ok":
            event(f"write to a tracked/read-only page (write={write}) -> {tdpmmu.Ret(out[1]).name}")

    @rule(data=st.data())
    def nx_recover(self, data: st.DataObject) -> None:
        """One run of the NX huge page recovery worker, with a drawn ratio (None: KVM's 60)."""
        if not self.alive():
            return
        ratio = data.draw(st.sampled_from([None, 0, 1, 1, 2, 3, 60, -1]), label="ratio")
        listed = self.r.stats["nx_lpage_splits"]
        args = () if ratio is None else (ratio,)
        out = self.both(f"nx_recover({'' if ratio is None else ratio})", "nx_recover", *args)
        if out[0] == "ok":
            event(f"nx_recover: tables listed >0: {listed > 0}, zapped >0: {out[1] > 0}")

    @rule(data=st.data())
    def nx_round(self, data: st.DataObject) -> None:
        """The NX huge page mitigation's round trip in huge-backed memory: exec faults (4K
        where the backing allows huge, the tables they force listed), a recovery run, then a
        data fault there (huge again once its table is gone)."""
        if not self.alive():
            return
        huge = [s for s in self.r.slots.by_gfn() if s.max_level > 1]
        if not huge:
            return
        slot = data.draw(st.sampled_from(huge), label="slot")
        span = slot.backing_pages
        units = slot.npages // span
        gfns = [
            slot.gfn
            + span * data.draw(st.integers(0, units - 1), label="unit")
            + data.draw(st.sampled_from([0, 7, 300, 511]), label="off")
            for _ in range(data.draw(st.integers(1, 3), label="n"))
        ]
        vcpu = data.draw(st.integers(0, self.r.vcpus - 1), label="vcpu")
        for g in gfns:
            self.touch(g)
            self.mapped.append(g)
            self.both(
                f"fault({g:#x}, write=False, exec=True, vcpu={vcpu})",
                "fault",
                g,
                None,
                False,
                True,
                vcpu,
            )
        listed = self.r.stats["nx_lpage_splits"]
        ratio = data.draw(st.sampled_from([1, 1, 2, 60]), label="ratio")
        out = self.both(f"nx_recover({ratio})", "nx_recover", ratio)
        zapped = out[0] == "ok" and out[1] > 0
        event(f"nx_round: tables listed >0: {listed > 0}, zapped >0: {zapped}")
        g = data.draw(st.sampled_from(gfns), label="data_gfn")
        out = self.both(
            f"fault({g:#x}, vcpu={vcpu})  # after nx_recover", "fault", g, None, True, False, vcpu
        )
        if zapped and out[0] == "ok":
            event(f"nx_round: data fault after a recovery maps level {out[2]}")

    @rule(data=st.data())
    def move_memslot(self, data: st.DataObject) -> None:
        """KVM_MR_MOVE of a slot: past the last slot (aligned), onto another slot or
        misaligned (refused), or past the guest's end (refused)."""
        if not self.alive() or not self.r.memslots():
            return
        slots = self.r.memslots()
        plain = [m for m in slots if not m[4]]
        pick = plain if plain and data.draw(st.integers(0, 4), label="gmem_too") else slots
        slot_id, gfn, npages, backing, _, _ = data.draw(st.sampled_from(pick), label="slot")
        step = backing // 4096
        end = max(m[1] + m[2] for m in slots)
        where = data.draw(
            st.sampled_from(["after", "after", "after", "overlap", "misaligned", "past_end"]),
            label="where",
        )
        if where == "after":
            new_gfn = -(-end // step) * step + step * data.draw(st.integers(0, 2), label="gap")
        elif where == "overlap":
            new_gfn = data.draw(st.sampled_from(slots), label="onto")[1]
        elif where == "misaligned":
            new_gfn = end + 1 if step > 1 else end + data.draw(st.integers(0, 3))
        else:
            new_gfn = self.r.max_gfn - npages + step
        if new_gfn >= self.r.max_gfn:
            return
        self.touch(gfn, gfn + npages - 1, new_gfn, new_gfn + npages - 1)
        out = self.both(f"move_memslot({slot_id}, {new_gfn:#x})", "move_memslot", slot_id, new_gfn)
        event(f"move_memslot ({where}) -> {out[0]}")

    # -- comparison ----------------------------------------------------------------------
    def same_dirty_logs(self, where: str) -> None:
        """The bitmaps of manual-protect logs (reading them changes nothing) are equal."""
        for slot in self.logging_slots(manual=True):
            got = [int(w) for w in self.native.get_dirty_log(slot)]
            want = self.r.get_dirty_log(slot)
            assert got == want, f"{where}: dirty log of slot {slot}: engine {got} != {want}"


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
        # KVM's enable_ept_ad_bits: off now and then (access-tracking SPTEs).
        "ad_bits": draw(st.sampled_from([True, True, True, False])),
    }


def _same_exception(native_call: Any, ref_call: Any) -> None:
    """Both sides must reject bad input with a ValueError (or subclass)."""
    with pytest.raises(ValueError):
        native_call()
    with pytest.raises(ValueError):
        ref_call()


def draw_host_range(ref: ReferenceVM, data: st.DataObject, fallback: Any) -> tuple[int, int]:
    """A host range for ``madvise_dontneed``/``mprotect``: mostly whole backing pages of one
    memslot (a few, so the reference's zap stays short); else one running past the slot's
    end, one starting off a backing-page boundary, or ``fallback(data)``."""
    slots = ref.memslots()
    kind = data.draw(st.sampled_from(["aligned"] * 6 + ["past_end", "misaligned", "other"]))
    if not slots or kind == "other":
        gfn, npages = fallback(data)
        return gfn, npages
    _, sgfn, snpages, backing, _, _ = data.draw(st.sampled_from(slots), label="slot")
    step = backing // 4096
    units = snpages // step
    first = data.draw(st.sampled_from([0, units - 1]) | st.integers(0, units - 1))
    count = data.draw(st.integers(1, max(1, min(units - first, 64 if step == 1 else 3))))
    gfn, npages = sgfn + first * step, count * step
    if kind == "past_end":
        npages = sgfn + snpages - gfn + data.draw(st.sampled_from([1, 512]))
    elif kind == "misaligned":
        gfn += data.draw(st.sampled_from([1, 7, 256]))
    gfn = min(gfn, ref.max_gfn - 1)
    return gfn, max(1, min(npages, ref.max_gfn - gfn))


def draw_batch(machine: Any, data: st.DataObject, privates: list[bool | None]) -> None:
    """``access_batch`` on both sides: a few drawn gfns, or a run of consecutive ones after a
    recently used gfn (a PML log filled by one batch is left to the fixed flows, which are
    cheaper); one write flag or one per gfn; ``private`` from ``privates``; sometimes a
    refused call (a ``write`` array of the wrong length, or a gfn past ``max_gfn``), which
    must leave the counters alone."""
    ref: ReferenceVM = machine.r
    if data.draw(st.integers(0, 3), label="run") == 0 and machine.touched:
        base = data.draw(st.sampled_from(list(machine.touched)[-8:]), label="base")
        n = data.draw(st.sampled_from([8, 32, 128]), label="n")
        gfns = [g for g in range(base, base + n) if g < ref.max_gfn]
    else:
        gfns = [machine.draw_gfn(data) for _ in range(data.draw(st.integers(1, 6)))]
    per_gfn = data.draw(st.booleans(), label="per_gfn")
    write: Any = (
        np.array(data.draw(st.lists(st.booleans(), min_size=len(gfns), max_size=len(gfns))))
        if per_gfn
        else data.draw(st.booleans(), label="write")
    )
    private = data.draw(st.sampled_from(privates), label="private")
    vcpu = data.draw(st.integers(0, machine.cfg["vcpus"] - 1), label="vcpu")
    bad = data.draw(st.sampled_from([None] * 8 + ["write", "gfns"]), label="bad")
    if bad == "write":
        write = np.ones(len(gfns) + 1, dtype=bool)
    elif bad == "gfns":
        gfns = [*gfns, ref.max_gfn]
    machine.touch(*gfns[:8], *gfns[-2:])
    shown = [hex(g) for g in gfns] if len(gfns) <= 8 else f"range({gfns[0]:#x}, +{len(gfns)})"
    shown_write = write.tolist() if isinstance(write, np.ndarray) and len(write) <= 8 else write
    if isinstance(shown_write, np.ndarray):
        shown_write = f"<{len(write)} flags>"
    call = f"access_batch({shown}, write={shown_write}, private={private}, vcpu={vcpu})"
    before = dict(machine.native.stats)
    out = machine.both(call, "access_batch", np.array(gfns, dtype=np.uint64), write, private, vcpu)
    if bad is not None:
        assert out[0] == ("VmBugged" if ref.bugged else "ValueError"), f"{call}: {out}"
        assert dict(machine.native.stats) == before, f"{call}: a refused call counted"
    event(f"access_batch -> {out[0]}" + (f" ({bad} refused)" if bad else ""))
    if out[0] == "ok" and out[1]["faults"] < len(gfns):
        event("access_batch: a hardware-walk hit")


class EngineMatchesReference(DirtyLoggingRules, RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.native: Any = None
        self.ref: ReferenceVM | None = None
        self.cfg: dict[str, Any] = {}
        self.touched: dict[int, None] = {}  # insertion-ordered set of gfns seen so far
        self.mapped: list[int] = []  # gfns that faulted inside a memslot, most recent last
        self.log: list[str] = []
        self.peaks = {}

    # -- helpers -------------------------------------------------------------------------
    def record(self, call: str) -> None:
        """Remember the operation; the failing example's operations are printed as notes."""
        self.log.append(call)
        note(f"vm.{call}" if not call.startswith("VM(") else f"vm = tdpmmu.{call}")

    @property
    def r(self) -> ReferenceVM:
        assert self.ref is not None
        return self.ref

    def alive(self) -> bool:
        return self.ref is not None

    def touch(self, *gfns: int) -> None:
        for g in gfns:
            if 0 <= g < self.r.max_gfn:
                self.touched.pop(g, None)
                self.touched[g] = None

    def both(self, call: str, method: str, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        """Call ``method`` on both sides: equal results, or the same kind of error."""
        self.record(call)
        got = _outcome(lambda: getattr(self.native, method)(*args, **kwargs))
        want = _outcome(lambda: getattr(self.r, method)(*args, **kwargs))
        assert got == want, f"{call}: engine {got} != reference {want}"
        return want

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

    def draw_host_range(self, data: st.DataObject) -> tuple[int, int]:
        """A range for madvise/mprotect: mostly whole backing pages of one memslot; else one
        running past the slot's end, starting off a backing-page boundary, or anywhere."""
        return draw_host_range(self.r, data, self.draw_range)

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
        slot_id, sgfn, snpages, backing, _, _ = data.draw(st.sampled_from(self.slots()))
        # Keep populates that map 4K short (a 4K backing, or a slot that logs dirty pages):
        # the reference faults one page at a time.
        small = backing == 4096 or self.r.slots[slot_id].dirty is not None
        limit = min(snpages, 64) if small else snpages
        off = data.draw(st.integers(0, snpages - 1))
        npages = data.draw(st.integers(1, max(1, min(limit, snpages - off))))
        if small:
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
        readonly = data.draw(st.sampled_from([False, False, True]), label="readonly")
        if any(gfn < s[1] + s[2] and s[1] < gfn + npages for s in slots):
            call = f"add_memslot({gfn:#x}, {npages:#x}, {backing!r}, readonly={readonly})"
            self.record(call + "  # overlaps")
            _same_exception(
                lambda: self.native.add_memslot(gfn, npages, backing, readonly=readonly),
                lambda: self.r.add_memslot(gfn, npages, backing, readonly=readonly),
            )
            return
        self.touch(gfn, gfn + npages - 1, gfn + npages)
        call = f"add_memslot({gfn:#x}, {npages:#x}, {backing!r}, readonly={readonly})"
        self.record(call)
        n = self.native.add_memslot(gfn, npages, backing, readonly=readonly)
        r = self.r.add_memslot(gfn, npages, backing, readonly=readonly)
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
    def access_batch(self, data: st.DataObject) -> None:
        """Guest accesses on one vCPU: hardware-walk hits (A/D set, PML logged), faults,
        memory-fault exits on host read-only pages; now and then a refused call."""
        draw_batch(self, data, [None, False])

    @rule(data=st.data())
    def madvise_dontneed(self, data: st.DataObject) -> None:
        gfn, npages = self.draw_host_range(data)
        self.touch(gfn, gfn + npages - 1, gfn + npages)
        out = self.both(f"madvise_dontneed({gfn:#x}, {npages:#x})", "madvise_dontneed", gfn, npages)
        event(f"madvise_dontneed -> {out[0]}")
        if out[0] == "ok":
            # The pages were freed: touching one allocates its backing page again.
            g = gfn + data.draw(st.integers(0, npages - 1), label="retouch")
            before = self.r.stats["host_pages_allocated"]
            self.touch(g)
            self.both(f"fault({g:#x}, write=False)  # re-touch", "fault", g, None, False)
            assert self.r.stats["host_pages_allocated"] == before + 1, "no re-allocation"
            event("madvise_dontneed, then a re-touch allocates again")

    @rule(data=st.data())
    def mprotect(self, data: st.DataObject) -> None:
        gfn, npages = self.draw_host_range(data)
        writable = data.draw(st.booleans(), label="writable")
        self.touch(gfn, gfn + npages - 1, gfn + npages)
        out = self.both(
            f"mprotect({gfn:#x}, {npages:#x}, writable={writable})",
            "mprotect",
            gfn,
            npages,
            writable,
        )
        event(f"mprotect(writable={writable}) -> {out[0]}")
        if out[0] == "ok" and not writable:
            # Read-only on the host: a read maps without write access, a write (also the
            # fast path's, on that leaf) is a memory-fault exit (a read-only memslot's is
            # emulated first).
            g = gfn + data.draw(st.integers(0, npages - 1), label="probe")
            self.touch(g)
            read = self.both(f"fault({g:#x}, write=False)", "fault", g, None, False)
            write = self.both(f"fault({g:#x})  # host read-only", "fault", g)
            slot = self.r.slots.gfn_to_memslot(g)
            assert slot is not None and read[0] == write[0] == "ok", (read, write)
            assert int(read[3], 16) & (_SPTE_W | _SPTE_MMU_WRITABLE | _SPTE_HOST_WRITABLE) == 0
            want = tdpmmu.Ret.EMULATE if slot.readonly else tdpmmu.Ret.MEMORY_FAULT
            assert tdpmmu.Ret(write[1]) == want, f"write to host read-only {g:#x}: {write}"
            event(f"write to a host read-only page -> {want.name}")

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
        _same_counters(self.native, self.r, where)
        _same_costs(self.native, self.r, where)
        self.note_peaks()

        assert self.native.memslots() == self.r.memslots(), where
        assert self.native.memslot_generation == self.r.memslot_generation, where
        assert self.native.roots() == self.r.roots(), where

        sample = list(self.touched)[-MAX_WALK_SAMPLE:]
        for s in self.slots():
            sample += [s[1], s[1] + s[2] - 1]
        for gfn in sample:
            if gfn >= self.r.max_gfn:
                continue
            got_walk = [(int(lv), int(sp)) for lv, sp in self.native.walk(gfn)]
            want_walk = self.r.walk(gfn)
            assert got_walk == want_walk, (
                f"{where}: walk({gfn:#x}) engine {_fmt(got_walk)} != {_fmt(want_walk)}"
            )

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

        self.same_dirty_logs(where)
        self.native.check()
        self.r.check()

    def teardown(self) -> None:
        if self.ref is None:
            return
        stats = self.r.stats
        for key in (
            "huge_page_splits",
            "remote_tlb_flush",
            "roots_freed",
            "pf_mmio_spte_created",
            "pf_memory_fault",  # a default VM: only writes to pages the host protected
            "pml_full_exits",
        ):
            event(f"run reached {key} > 0: {stats[key] > 0}")
        for key in DIRTY_COUNTERS:
            event(f"run reached {key} > 0: {self.reached(key)}")


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


# ======================================================================================
# Confidential VM types: TDX, SEV-SNP, SW_PROTECTED
# ======================================================================================

CVM_MEMORY_FOR_BACKING = {"4K": ["64MiB"], "2M": ["64MiB", "1GiB"], "1G": ["1GiB", "2GiB"]}
MAX_RMP_SAMPLE = 32  # touched gfns whose RMP entries are compared after each step


@st.composite
def cvm_configs(draw: st.DrawFn) -> dict[str, Any]:
    vm_type = draw(st.sampled_from(["tdx", "tdx", "snp", "snp", "sw_protected"]))
    # TDX's 2M private pages need a huge backing: drawn more often there.
    backings = ["4K", "2M", "2M", "1G"] if vm_type == "tdx" else ["4K", "4K", "2M", "1G"]
    backing = draw(st.sampled_from(backings))
    cfg: dict[str, Any] = {
        "vm_type": vm_type,
        "memory": draw(st.sampled_from(CVM_MEMORY_FOR_BACKING[backing])),
        "backing": backing,
        "levels": draw(st.sampled_from([4, 5])),
        "vcpus": draw(st.integers(1, 3)),
        "nx_huge_pages": draw(st.booleans()),
        "trace": True,
    }
    if vm_type == "tdx":
        cfg["hooks"] = draw(st.sampled_from(["mirror", "mirror", "mirror", "private"]))
        cfg["tdx"] = {
            "version": draw(st.sampled_from(["6.19", "6.16"])),
            "track": draw(st.sampled_from(["per_page", "batched"])),
            "interface": draw(st.sampled_from(["four_hook", "two_hook"])),
            "sept_free": draw(st.sampled_from(["teardown", "sept_remove"])),
            "teardown": draw(st.sampled_from(["remove", "terminate_vm"])),
            "measure": draw(st.booleans()),
            "huge_pages": draw(st.sampled_from([True, True, False])),
        }
        if backing != "4K":
            # 2M private pages need a 2M folio (and, with huge_pages, a runnable TD).
            cfg["folio"] = draw(st.sampled_from(["2M", "2M", "4K"]))
    elif vm_type == "snp":
        cfg["hooks"] = draw(st.sampled_from(["gmem", "gmem", "private"]))
        cfg["folio"] = draw(st.sampled_from(["4K", "2M"]))
    else:
        cfg["mirror"] = draw(st.booleans())
        if cfg["mirror"]:
            cfg["hooks"] = draw(st.sampled_from(["mirror", "mirror", "private"]))
            cfg["folio"] = "4K"
        else:
            cfg["folio"] = draw(st.sampled_from(["4K", "2M"]))
            # EPT A/D bits off now and then (KVM refuses it on TDX and the mirror variant,
            # and AMD NPT has no such switch).
            cfg["ad_bits"] = draw(st.sampled_from([True, True, False]))
    return cfg


def _outcome(call: Any) -> tuple[Any, ...]:
    """What an operation did: ("ok", result) or the kind of error it raised."""
    try:
        out = call()
    except tdpmmu.VmBugged:
        return ("VmBugged",)
    except tdpmmu.InvariantError:
        return ("InvariantError",)
    except ValueError:
        return ("ValueError",)
    if hasattr(out, "ret") and hasattr(out, "spte"):
        # The default costs are whole nanoseconds, so both sums are exact.
        fields = (out.level, hex(out.spte), out.retries, out.gfn, out.private)
        return ("ok", int(out.ret), *fields, round(out.modeled_ns, 3))
    if isinstance(out, np.ndarray):
        return ("ok", [int(x) for x in out])
    if isinstance(out, dict) and "modeled_ns" in out:  # access_batch
        return ("ok", {k: round(v, 3) if k == "modeled_ns" else v for k, v in out.items()})
    return ("ok", out)


class ConfidentialMatchesReference(DirtyLoggingRules, RuleBasedStateMachine):
    """TDX, SNP and SW_PROTECTED VMs: the engine against the reference, step by step.

    After each step: equal results (or the same kind of error), equal walks of both roots,
    counters, arena, roots, memslots, S-EPT entries (TDX and the SW mirror), RMP entries of
    touched gfns (SNP), and the same check() outcome (the ``private`` hook designs break
    invariants on purpose; a bugged VM raises VmBugged on both sides; after destroy() check()
    audits the teardown).
    """

    def __init__(self) -> None:
        super().__init__()
        self.native: Any = None
        self.ref: ReferenceVM | None = None
        self.cfg: dict[str, Any] = {}
        self.touched: dict[int, None] = {}
        self.mapped: list[int] = []
        self.log: list[str] = []
        self.peaks = {}
        self.over = False  # destroyed, or the engine cannot be driven further

    # -- helpers -------------------------------------------------------------------------
    @property
    def r(self) -> ReferenceVM:
        assert self.ref is not None
        return self.ref

    def alive(self) -> bool:
        return self.ref is not None and not self.over

    def touch(self, *gfns: int) -> None:
        for g in gfns:
            if 0 <= g < self.r.max_gfn:
                self.touched.pop(g, None)
                self.touched[g] = None

    def both(self, call: str, method: str, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        self.log.append(call)
        note(f"vm.{call}")
        got = _outcome(lambda: getattr(self.native, method)(*args, **kwargs))
        want = _outcome(lambda: getattr(self.r, method)(*args, **kwargs))
        assert got == want, f"{call}: engine {got} != reference {want}"
        event(f"{method} -> {want[0]}")
        return want

    def draw_gfn(self, data: st.DataObject) -> int:
        max_gfn = self.r.max_gfn
        slots = self.r.memslots()
        kind = data.draw(st.sampled_from(["slot", "slot", "near", "near", "outside"]))
        if kind == "near" and self.touched:
            base = data.draw(st.sampled_from(list(self.touched)[-32:]))
            delta = data.draw(st.sampled_from([0, 1, -1, 511, 512, -512]) | st.integers(-600, 600))
            return min(max(base + delta, 0), max_gfn - 1)
        if kind in ("slot", "near") and slots:
            _, gfn, npages, _, _, _ = data.draw(st.sampled_from(slots))
            off = data.draw(
                st.sampled_from([0, 1, 511, 512, npages - 1]) | st.integers(0, npages - 1)
            )
            return gfn + min(max(off, 0), npages - 1)
        ends = [s[1] + s[2] for s in slots if s[1] + s[2] < max_gfn]
        anywhere = st.integers(0, max_gfn - 1)
        return data.draw(st.sampled_from(ends) | anywhere if ends else anywhere)

    def draw_slot_range(self, data: st.DataObject, gmem_only: bool = False) -> tuple[int, int]:
        """A range inside one memslot (sometimes running past its end)."""
        slots = [s for s in self.r.memslots() if s[4] or not gmem_only] or self.r.memslots()
        if not slots:
            return 0, 1
        _, sgfn, snpages, _, _, _ = data.draw(st.sampled_from(slots))
        off = data.draw(st.sampled_from([0, 1, 256, 511, 512]) | st.integers(0, snpages - 1))
        off = min(off, snpages - 1)
        npages = data.draw(st.sampled_from([1, 2, 511, 512, 513, 1024]) | st.integers(1, 2048))
        if data.draw(st.integers(0, 9)) > 0:
            npages = min(npages, snpages - off)
        npages = max(1, min(npages, self.r.max_gfn - sgfn - off))
        return sgfn + off, npages

    # -- setup ---------------------------------------------------------------------------
    @initialize(cfg=cvm_configs(), data=st.data())
    def create(self, cfg: dict[str, Any], data: st.DataObject) -> None:
        self.cfg = cfg
        self.native = tdpmmu.VM(**cfg)
        self.ref = ReferenceVM(**cfg)
        self.log.append(f"VM(**{cfg})")
        note(f"vm = tdpmmu.VM(**{cfg})")
        self.touch(0)
        if cfg["vm_type"] == "tdx" and data.draw(st.integers(0, 3), label="finalize_now") > 0:
            # Most runs build a small initial image and start the TD right away.
            npages = data.draw(st.integers(0, 16), label="image_pages")
            if npages:
                self.both(f"populate(0, {npages}, private=True)", "populate", 0, npages, True)
                self.touch(0, npages - 1)
            self.both("finalize()", "finalize")

    # -- rules ---------------------------------------------------------------------------
    @rule(data=st.data())
    def fault(self, data: st.DataObject) -> None:
        if not self.alive():
            return
        gfn = self.draw_gfn(data)
        private = data.draw(st.sampled_from([None, None, True, False]), label="private")
        write = data.draw(st.booleans(), label="write")
        exec_ = data.draw(st.booleans(), label="exec")
        vcpu = data.draw(st.integers(0, self.cfg["vcpus"] - 1), label="vcpu")
        self.touch(gfn)
        call = f"fault({gfn:#x}, private={private}, write={write}, exec={exec_}, vcpu={vcpu})"
        self.log.append(call)
        note(f"vm.{call}")
        n = _outcome(lambda: self.native.fault(gfn, private, write, exec_, vcpu))
        r = _outcome(lambda: self.r.fault(gfn, private, write, exec_, vcpu))
        assert n == r, f"{call}: engine {n} != reference {r}"
        event(f"fault -> {r[0] if r[0] != 'ok' else tdpmmu.Ret(r[1]).name}")
        if r[0] == "ok":
            self.mapped.append(gfn)

    @rule(data=st.data())
    def refault(self, data: st.DataObject) -> None:
        if not self.alive() or not self.mapped:
            return
        gfn = data.draw(st.sampled_from(self.mapped[-8:]), label="gfn")
        gfn = min(gfn + data.draw(st.sampled_from([0, 0, 1, 512]), label="d"), self.r.max_gfn - 1)
        vcpu = data.draw(st.integers(0, self.cfg["vcpus"] - 1), label="vcpu")
        exec_ = data.draw(st.booleans(), label="exec")
        self.touch(gfn)
        self.both(
            f"fault({gfn:#x}, exec={exec_}, vcpu={vcpu})", "fault", gfn, None, True, exec_, vcpu
        )

    @rule(data=st.data())
    def fault_batch(self, data: st.DataObject) -> None:
        if not self.alive():
            return
        gfns = [self.draw_gfn(data) for _ in range(data.draw(st.integers(1, 3)))]
        private = data.draw(st.sampled_from([None, True, False]), label="private")
        self.touch(*gfns)
        call = f"fault_batch({[hex(g) for g in gfns]}, private={private})"
        self.log.append(call)
        note(f"vm.{call}")
        n = _outcome(lambda: self.native.fault_batch(np.array(gfns, dtype=np.uint64), private))
        r = _outcome(lambda: self.r.fault_batch(gfns, private))
        assert n == r, f"{call}: engine {n} != reference {r}"

    @rule(data=st.data())
    def access_batch(self, data: st.DataObject) -> None:
        """Guest accesses, private and shared (on a TD before finalize both sides refuse
        them: KVM_RUN fails)."""
        if not self.alive():
            return
        draw_batch(self, data, [None, None, True, False])

    @rule(data=st.data())
    def madvise_dontneed(self, data: st.DataObject) -> None:
        """MADV_DONTNEED: refused on guest_memfd slots (slot 0 has one), allowed elsewhere."""
        if not self.alive():
            return
        gfn, npages = draw_host_range(self.r, data, self.draw_slot_range)
        self.touch(gfn, gfn + npages - 1)
        self.both(f"madvise_dontneed({gfn:#x}, {npages:#x})", "madvise_dontneed", gfn, npages)

    @rule(data=st.data())
    def mprotect(self, data: st.DataObject) -> None:
        """mprotect: shared accesses see the protection, private ones (guest_memfd) do not."""
        if not self.alive():
            return
        gfn, npages = draw_host_range(self.r, data, self.draw_slot_range)
        writable = data.draw(st.booleans(), label="writable")
        self.touch(gfn, gfn + npages - 1)
        self.both(
            f"mprotect({gfn:#x}, {npages:#x}, writable={writable})",
            "mprotect",
            gfn,
            npages,
            writable,
        )

    @rule(data=st.data())
    def set_memory_attributes(self, data: st.DataObject) -> None:
        if not self.alive():
            return
        gfn, npages = self.draw_slot_range(data)
        private = data.draw(st.booleans(), label="private")
        self.touch(gfn, gfn + npages - 1)
        self.both(
            f"set_memory_attributes({gfn:#x}, {npages:#x}, private={private})",
            "set_memory_attributes",
            gfn,
            npages,
            private,
        )

    @rule(data=st.data())
    def map_gpa_range(self, data: st.DataObject) -> None:
        """The guest's request: charged per exit even when the range is already so."""
        if not self.alive():
            return
        gfn, npages = self.draw_slot_range(data)
        private = data.draw(st.booleans(), label="private")
        self.touch(gfn, gfn + npages - 1)
        self.both(
            f"map_gpa_range({gfn:#x}, {npages:#x}, private={private})",
            "map_gpa_range",
            gfn,
            npages,
            private,
        )

    @rule(data=st.data())
    def punch_hole(self, data: st.DataObject) -> None:
        if not self.alive():
            return
        gfn, npages = self.draw_slot_range(data, gmem_only=True)
        self.touch(gfn, gfn + npages - 1)
        self.both(f"punch_hole({gfn:#x}, {npages:#x})", "punch_hole", gfn, npages)

    @rule(data=st.data())
    def populate(self, data: st.DataObject) -> None:
        if not self.alive():
            return
        gfn, npages = self.draw_slot_range(data)
        npages = min(npages, 64)
        private = data.draw(st.sampled_from([None, True, False]), label="private")
        self.touch(gfn, gfn + npages - 1)
        call = f"populate({gfn:#x}, {npages}, private={private})"
        self.log.append(call)
        note(f"vm.{call}")
        r = _outcome(lambda: self.r.populate(gfn, npages, private))
        if self.r.populate_stopped_on_bug:
            event("populate stopped by a KVM_BUG_ON")
        n = _outcome(lambda: self.native.populate(gfn, npages, private))
        assert n == r, f"{call}: engine {n} != reference {r}"
        event(f"populate -> {r[0]}")

    @rule(data=st.data())
    def split_private_huge_page(self, data: st.DataObject) -> None:
        """Convert to shared, or punch a hole in, a few pages inside a private 2M leaf of the
        mirror root (TDX huge pages): the leaf is split first (split_external_spt: BLOCK,
        TRACK, kick, DEMOTE), then only those pages go; or cover the whole leaf (no split)."""
        if not self.alive() or not self.r.has_mirror:
            return

        def huge_private() -> list[int]:
            return [
                g
                for g in self.mapped[-32:]
                if (path := self.r.walk(g, True)) and path[-1][0] == 2 and path[-1][1] & (1 << 11)
            ]

        huge = huge_private()
        slots = [s for s in self.r.slots.by_gfn() if s.gmem and s.max_level > 1]
        if not huge and slots and self.r.finalized:
            # Map one: a private fault in a 2M range of guest_memfd memory (2M where the
            # TD maps huge private pages and the range is all private).
            slot = data.draw(st.sampled_from(slots), label="slot")
            base = slot.gfn + 512 * data.draw(st.integers(0, slot.npages // 512 - 1))
            gfn = base + data.draw(st.sampled_from([0, 5, 300, 511]), label="off")
            self.touch(gfn)
            self.mapped.append(gfn)
            self.both(f"fault({gfn:#x}, private=True)", "fault", gfn, True)
            huge = huge_private()
        if not huge:
            return
        gfn = data.draw(st.sampled_from(huge), label="huge_gfn")
        base = gfn & ~511
        kind = data.draw(st.sampled_from(["inside", "inside", "edge", "whole"]), label="kind")
        if kind == "inside":
            start, npages = gfn, data.draw(st.integers(1, 3), label="npages")
        elif kind == "edge":
            start, npages = base + 256, data.draw(st.sampled_from([256, 512, 768]))
        else:
            start, npages = base, 512
        npages = min(npages, self.r.max_gfn - start)
        op = data.draw(st.sampled_from(["to_shared", "to_shared", "punch"]), label="op")
        self.touch(gfn, start, start + npages - 1)
        splits = self.r.stats["split_external_spt"]
        if op == "punch":
            out = self.both(f"punch_hole({start:#x}, {npages})", "punch_hole", start, npages)
        else:
            out = self.both(
                f"set_memory_attributes({start:#x}, {npages}, private=False)",
                "set_memory_attributes",
                start,
                npages,
                False,
            )
        split = self.r.stats["split_external_spt"] > splits
        event(f"split_private_huge_page ({kind}, {op}) -> {out[0]}, split: {split}")

    @precondition(lambda self: self.cfg.get("vm_type") == "tdx")
    @rule()
    def finalize(self) -> None:
        if not self.alive():
            return
        self.both("finalize()", "finalize")

    @rule(data=st.data())
    def add_memslot(self, data: st.DataObject) -> None:
        if not self.alive() or len(self.r.memslots()) >= MAX_SLOTS:
            return
        backing = data.draw(st.sampled_from(["4K", "4K", "2M"]), label="backing")
        gmem = data.draw(st.booleans(), label="gmem")
        # KVM_MEM_READONLY: refused on tdx/snp and with gmem, allowed on sw_protected.
        readonly = data.draw(st.sampled_from([False, False, False, True]), label="readonly")
        step = PAGES[backing]
        units = data.draw(st.integers(1, 1024) if step == 1 else st.integers(1, 3), label="units")
        npages = step * units
        slots = self.r.memslots()
        ends = [s[1] + s[2] for s in slots]
        if data.draw(st.booleans(), label="after") and ends:
            gfn = -(-data.draw(st.sampled_from(ends)) // step) * step
        else:
            gfn = step * data.draw(st.integers(0, (self.r.max_gfn - npages) // step))
        if gfn + npages > self.r.max_gfn:
            return
        self.touch(gfn, gfn + npages - 1)
        out = self.both(
            f"add_memslot({gfn:#x}, {npages:#x}, {backing!r}, gmem={gmem}, readonly={readonly})",
            "add_memslot",
            gfn,
            npages,
            backing,
            gmem,
            readonly,
        )
        if readonly:
            event(f"add_memslot readonly on {self.cfg['vm_type']} gmem={gmem} -> {out[0]}")

    @rule(data=st.data())
    def delete_memslot(self, data: st.DataObject) -> None:
        if not self.alive() or not self.r.memslots():
            return
        slot = data.draw(st.sampled_from([s[0] for s in self.r.memslots()]), label="slot")
        self.both(f"delete_memslot({slot})", "delete_memslot", slot)

    @rule(data=st.data())
    def zap_gfn_range(self, data: st.DataObject) -> None:
        if not self.alive():
            return
        gfn, npages = self.draw_slot_range(data)
        self.touch(gfn, gfn + npages - 1)
        self.both(f"zap_gfn_range({gfn:#x}, {npages:#x})", "zap_gfn_range", gfn, npages)

    @rule(data=st.data())
    def mmu_notifier_invalidate(self, data: st.DataObject) -> None:
        if not self.alive():
            return
        gfn, npages = self.draw_slot_range(data)
        self.touch(gfn, gfn + npages - 1)
        self.both(
            f"mmu_notifier_invalidate({gfn:#x}, {npages:#x})",
            "mmu_notifier_invalidate",
            gfn,
            npages,
        )

    @rule()
    def zap_all_fast(self) -> None:
        if not self.alive():
            return
        self.both("zap_all_fast()", "zap_all_fast")

    @precondition(lambda self: self.cfg.get("vm_type") == "snp")
    @rule(data=st.data())
    def rmp_fault(self, data: st.DataObject) -> None:
        if not self.alive():
            return
        gfn = self.draw_gfn(data)
        self.touch(gfn, gfn & ~511)
        self.both(f"rmp_fault({gfn:#x})", "rmp_fault", gfn)

    @precondition(lambda self: self.cfg.get("vm_type") == "snp")
    @rule(data=st.data())
    def pvalidate(self, data: st.DataObject) -> None:
        if not self.alive():
            return
        size_2m = data.draw(st.booleans(), label="size_2m")
        gfn = self.draw_gfn(data)
        if size_2m:
            gfn &= ~511
        npages = 512 if size_2m else data.draw(st.integers(1, 4), label="npages")
        validate = data.draw(st.sampled_from([True, True, False]), label="validate")
        npages = min(npages, self.r.max_gfn - gfn)
        self.touch(gfn)
        self.both(
            f"pvalidate({gfn:#x}, {npages}, size_2m={size_2m}, validate={validate})",
            "pvalidate",
            gfn,
            npages,
            size_2m,
            validate,
        )

    @rule(data=st.data())
    def destroy(self, data: st.DataObject) -> None:
        """Terminal: tear down in KVM's order; check() then audits the teardown."""
        if not self.alive() or data.draw(st.integers(0, 5), label="not_yet") > 0:
            return
        leaves = self.r.stats["pages_4k"] + self.r.stats["pages_2m"] > 0
        teardown = self.r.tdx_options.teardown if self.r.vm_type == "tdx" else "-"
        out = self.both("destroy()", "destroy")
        event(f"destroy (teardown {teardown}) with leaves mapped: {leaves} -> {out[0]}")
        if out[0] == "ok":
            self.over = True
            self.both("fault(0)  # after destroy", "fault", 0)

    @rule()
    def after_the_end(self) -> None:
        """A destroyed VM refuses everything (and keeps its counters)."""
        if self.ref is not None and self.over and self.r.destroyed:
            self.both("zap_all_fast()  # after destroy", "zap_all_fast")

    # -- comparisons after every step ----------------------------------------------------
    @invariant()
    def same_state(self) -> None:
        if self.ref is None:
            return
        if self.over and not self.r.destroyed:
            return  # the engine was left behind on purpose (see populate)
        where = f"after {self.log[-1]}"
        _same_counters(self.native, self.r, where)
        _same_costs(self.native, self.r, where)
        self.note_peaks()
        _same_hook_trace(self.native, self.r, where)
        for attr in ("bugged", "destroyed", "finalized", "memslot_generation"):
            assert getattr(self.native, attr) == getattr(self.r, attr), f"{where}: {attr}"
        assert self.native.memslots() == self.r.memslots(), where
        assert self.native.roots() == self.r.roots(), where
        if self.r.has_mirror:
            got_sept = self.native.sept_entries()
            want_sept = self.r.sept_entries()
            assert got_sept == want_sept, f"{where}: S-EPT engine {got_sept} != {want_sept}"

        sample = list(self.touched)[-MAX_WALK_SAMPLE:]
        for s in self.r.memslots():
            sample += [s[1], s[1] + s[2] - 1]
        for gfn in sample:
            if gfn >= self.r.max_gfn:
                continue
            for private in (False, True):
                got_walk = [(int(lv), int(sp)) for lv, sp in self.native.walk(gfn, private)]
                want_walk = self.r.walk(gfn, private)
                assert got_walk == want_walk, (
                    f"{where}: walk({gfn:#x}, private={private}) engine {_fmt(got_walk)} != "
                    f"{_fmt(want_walk)}"
                )
        if self.cfg["vm_type"] == "snp":
            for gfn in list(self.touched)[-MAX_RMP_SAMPLE:]:
                got_e = _outcome(lambda g=gfn: self.native.rmp_entry(g))
                want_e = _outcome(lambda g=gfn: self.r.rmp_entry(g))
                assert got_e == want_e, f"{where}: rmp_entry({gfn:#x}) {got_e} != {want_e}"

        ref_tables = self.r.tables()
        nat_tables = self.native.tables()
        assert nat_tables.shape[0] == len(ref_tables), f"{where}: arena sizes differ"
        if len(ref_tables) <= MAX_ARENA_COMPARE:
            want_arr = np.array(ref_tables, dtype=np.uint64).reshape(-1, 512)
            if not np.array_equal(nat_tables, want_arr):
                row, col = (int(x) for x in np.argwhere(nat_tables != want_arr)[0])
                raise AssertionError(
                    f"{where}: table {row} entry {col}: engine {int(nat_tables[row, col]):#x}"
                    f" != reference {int(want_arr[row, col]):#x}"
                )

        if not self.r.destroyed and not self.r.bugged:
            self.same_dirty_logs(where)

        got_check = _outcome(self.native.check)
        want_check = _outcome(self.r.check)
        assert got_check == want_check, f"{where}: check() engine {got_check} != {want_check}"
        event(f"check() -> {want_check[0]}")

    def teardown(self) -> None:
        if self.ref is None:
            return
        event(f"vm_type {self.cfg['vm_type']} hooks {self.r.design} over={self.over}")
        for key in (
            "TDH.MEM.PAGE.REMOVE",
            "TDH.MEM.SEPT.REMOVE",
            "TDH.PHYMEM.PAGE.RECLAIM",
            "TDH.MEM.PAGE.DEMOTE",
            "split_external_spt",
            "TDH.MEM.PAGE.ADD",
            "TDG.MEM.PAGE.ACCEPT",
            "psmash",
            "pvalidate",
            "gmem_splits",
            "pages_2m",
            "huge_page_splits",
            *DIRTY_COUNTERS,
        ):
            if self.reached(key):
                event(f"run reached {key} > 0")


ConfidentialMatchesReference.TestCase.settings = settings(
    max_examples=int(os.environ.get("TDPMMU_CVM_DIFF_EXAMPLES", 60 if CI else 150)),
    stateful_step_count=25 if CI else 35,
    deadline=None,
    derandomize=CI,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target]
    if os.environ.get("TDPMMU_DIFF_NO_SHRINK")
    else list(Phase),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

TestConfidentialMatchesReference = ConfidentialMatchesReference.TestCase


# --------------------------------------------------------------------------------------
# Fixed scenarios: every design and option through one lifecycle each (cheap, always run)
# --------------------------------------------------------------------------------------

SCENARIO_CONFIGS: list[dict[str, Any]] = [
    {"vm_type": "tdx"},
    {"vm_type": "tdx", "tdx": {"version": "6.16", "measure": True}},
    {"vm_type": "tdx", "tdx": {"track": "batched", "interface": "two_hook"}},
    {"vm_type": "tdx", "tdx": {"sept_free": "sept_remove"}, "vcpus": 3},
    {"vm_type": "tdx", "hooks": "private"},
    {"vm_type": "tdx", "hooks": "private", "tdx": {"version": "6.16"}},
    {"vm_type": "tdx", "tdx": {"teardown": "terminate_vm"}},
    {"vm_type": "tdx", "backing": "2M", "folio": "2M", "tdx": {"huge_pages": True}},
    {"vm_type": "sw_protected"},
    {"vm_type": "sw_protected", "folio": "2M", "backing": "2M"},
    {"vm_type": "sw_protected", "mirror": True},
    {"vm_type": "sw_protected", "mirror": True, "hooks": "private"},
    {"vm_type": "snp"},
    {"vm_type": "snp", "folio": "2M", "backing": "2M"},
    {"vm_type": "snp", "folio": "2M", "backing": "2M", "hooks": "private"},
    {"vm_type": "snp", "hooks": "private"},
]


def _scenario_steps(vm_type: str) -> list[tuple[str, tuple[Any, ...]]]:
    steps: list[tuple[str, tuple[Any, ...]]] = [("populate", (0, 8, True))]
    if vm_type == "tdx":
        steps += [("fault", (3,)), ("finalize", ()), ("finalize", ())]
    steps += [
        ("fault", (700, True)),
        ("fault", (3, True, True, False, 1)),
        ("fault", (5, False)),
        ("set_memory_attributes", (600, 1024, False)),
        ("fault", (700, False)),
        ("fault", (700, True)),
        ("fault", (1000,)),
        ("populate", (1024, 200)),
        ("populate", (512, 2, True)),
        ("punch_hole", (0, 4)),
        ("fault", (2,)),
        ("zap_gfn_range", (0, 1 << 14)),
        ("fault", (2,)),
        ("fault", (2,)),
        ("mmu_notifier_invalidate", (0, 1 << 14)),
        ("zap_all_fast", ()),
        ("fault", (2,)),
        ("add_memslot", (1 << 15, 1024, 4096, True)),
        ("add_memslot", (1 << 16, 512, 4096, False)),
        ("set_memory_attributes", ((1 << 15) + 256, 1024, True)),
        ("fault", ((1 << 15) + 3,)),
        ("fault", ((1 << 15) + 300,)),
        ("fault", ((1 << 16) + 3, True)),
        ("populate", ((1 << 15) + 512, 8)),
        ("delete_memslot", (1,)),
    ]
    if vm_type == "snp":
        steps += [
            ("rmp_fault", (2,)),
            ("fault", (2,)),
            ("pvalidate", (2, 1, False, False)),
            ("pvalidate", (2, 2, False, True)),
            ("pvalidate", (0, 512, True)),
            ("rmp_fault", (1 << 16,)),
        ]
    return [*steps, ("destroy", ()), ("fault", (0,))]


#: Short flows into corners the random runs rarely reach before something else happens.
SHORT_SCENARIOS: list[tuple[dict[str, Any], list[tuple[str, tuple[Any, ...]]]]] = [
    # Private design: a memslot delete zaps a shared leaf with the PRIVATE flag set, so the
    # remove hook BLOCKs a FREE S-EPT entry (after finalize a KVM_BUG_ON even on v6.16) ...
    (
        {"vm_type": "tdx", "hooks": "private", "tdx": {"version": "6.16"}},
        [
            ("finalize", ()),
            ("set_memory_attributes", (5, 1, False)),
            ("fault", (5,)),
            ("fault", (3,)),
            ("delete_memslot", (0,)),
        ],
    ),
    # ... and before finalize: zap_gfn_range leaves the S-EPT page MAPPED (no hook), so a
    # second populate premaps it and its TDH.MEM.PAGE.ADD fails (a KVM_BUG_ON, no loop).
    (
        {"vm_type": "tdx", "hooks": "private", "tdx": {"version": "6.16"}},
        [
            ("populate", (3, 1, True)),
            ("zap_gfn_range", (0, 8)),
            ("populate", (3, 1, True)),
            ("finalize", ()),
        ],
    ),
    # The guest's conversion requests (map_gpa_range): charged per exit when nothing changes
    # (a TD's MapGPA is one exit per 2 MiB: 3 for 1025 pages), a change zaps the old alias
    # and, with 2M folios, splits a partly converted folio.
    *(
        (
            cfg,
            [
                *([("finalize", ())] if cfg["vm_type"] == "tdx" else []),
                ("fault", (700, True)),
                ("map_gpa_range", (600, 1025, True)),
                ("map_gpa_range", (600, 1025, False)),
                ("fault", (700,)),
                ("map_gpa_range", (700, 1, False)),
                ("map_gpa_range", (0, 1, False)),
                ("map_gpa_range", (1 << 30, 1, True)),
                ("destroy", ()),
                ("map_gpa_range", (0, 1, True)),
            ],
        )
        for cfg in (
            {"vm_type": "tdx"},
            {"vm_type": "snp", "folio": "2M", "backing": "2M"},
            {"vm_type": "sw_protected", "folio": "2M", "backing": "2M"},
        )
    ),
    # Batched tracking across two roots in one zap; SEPT.REMOVE teardown of several tables.
    (
        {"vm_type": "tdx", "tdx": {"track": "batched", "sept_free": "sept_remove"}},
        [
            ("populate", (0, 4, True)),
            ("finalize", ()),
            ("set_memory_attributes", (512, 512, False)),
            ("fault", (600,)),
            ("fault", (1 << 12, True)),
            ("delete_memslot", (0,)),
            ("destroy", ()),
        ],
    ),
]


@pytest.mark.parametrize(
    ("cfg", "steps"),
    [(c, _scenario_steps(c["vm_type"])) for c in SCENARIO_CONFIGS] + SHORT_SCENARIOS,
    ids=lambda x: "-".join(f"{k}={v}" for k, v in x.items()) if isinstance(x, dict) else "",
)
def test_scenario_matches_reference(
    cfg: dict[str, Any], steps: list[tuple[str, tuple[Any, ...]]]
) -> None:
    """Fixed flows per design/option: results, counters, S-EPT, RMP and check() agree."""
    cfg = {"memory": "64MiB", "vcpus": 2, "trace": True, **cfg}
    native, ref = tdpmmu.VM(**cfg), ReferenceVM(**cfg)
    for name, args in steps:
        where = f"{cfg}: {name}{args}"
        got = _outcome(lambda n=name, a=args: getattr(native, n)(*a))
        want = _outcome(lambda n=name, a=args: getattr(ref, n)(*a))
        assert got == want, f"{where}: engine {got} != reference {want}"
        _same_counters(native, ref, where)
        _same_costs(native, ref, where)
        _same_hook_trace(native, ref, where)
        assert native.roots() == ref.roots(), where
        if ref.has_mirror:
            assert native.sept_entries() == ref.sept_entries(), where
        if cfg["vm_type"] == "snp":
            for gfn in (0, 2, 3, 511, 700, (1 << 15) + 3):
                assert _outcome(lambda g=gfn: native.rmp_entry(g)) == _outcome(
                    lambda g=gfn: ref.rmp_entry(g)
                ), f"{where}: rmp_entry({gfn:#x})"
        for gfn in (0, 2, 3, 5, 700, 1000, 1024, (1 << 15) + 3, (1 << 16) + 3):
            for private in (False, True):
                assert [(int(a), int(b)) for a, b in native.walk(gfn, private)] == ref.walk(
                    gfn, private
                ), f"{where}: walk({gfn:#x}, {private})"
        assert _outcome(native.check) == _outcome(ref.check), f"{where}: check()"


def test_map_gpa_range_refusals_match_reference() -> None:
    """A default VM has no private memory, and a range that is empty, runs past max_gfn or
    leaves every memslot is refused (ConfigError; the reference's own ValueErrors), nothing
    charged."""
    for vm_type in ("default", "snp"):
        native = tdpmmu.VM(vm_type=vm_type, memory="8MiB")
        ref = ReferenceVM(vm_type=vm_type, memory="8MiB")
        bad = [(0, 0, True), (native.max_gfn - 1, 2, True), (1 << 20, 1, True)]
        if vm_type == "default":
            for vm in (native, ref):
                with pytest.raises(tdpmmu.ConfigError, match="private"):
                    vm.map_gpa_range(0, 1, True)
        for args in bad:
            with pytest.raises(tdpmmu.ConfigError):
                native.map_gpa_range(*args)
            with pytest.raises(ValueError):  # the reference raises plain ValueErrors
                ref.map_gpa_range(*args)
        _same_counters(native, ref, f"{vm_type}: refused map_gpa_range")
        assert native.stats["conversions"] == 0 and native.stats["modeled_ns"] == 0


# --------------------------------------------------------------------------------------
# Dirty logging, aging, eager split, huge-page recovery: fixed flows (cheap, always run)
# --------------------------------------------------------------------------------------


def _dirty_steps_default(huge: int, eager: bool = True) -> list[tuple[str, tuple[Any, ...]]]:
    """A logging lifecycle on slot 0 of a default VM whose backing maps ``huge`` pages
    (``eager``: the first plain log splits them all)."""
    return [
        ("populate", (0, 4 * huge if huge > 1 else 64)),
        ("fault", (3000, None, False)),  # a read maps (huge, where the backing allows)
        # Plain logging: eager split (or not), every leaf write-protected, one flush.
        ("set_dirty_logging", (0, True, False, False, eager)),
        ("set_dirty_logging", (0, True)),  # already logging: nothing
        ("fault", (3,)),  # fast path: W restored, page marked
        ("fault", (3,)),  # fast path: spurious
        ("fault", (5, None, False)),  # a read of a protected page is allowed
        ("fault", (4000,)),  # a new mapping in a logged slot: 4K, marked
        ("fault", (3001, None, True, True)),  # write + exec on a protected 4K leaf
        ("get_dirty_log", (0,)),  # taken and re-protected
        ("get_dirty_log", (0,)),  # nothing left
        ("clear_dirty_log", (0, 0, 64)),  # needs manual protection
        ("fault", (3,)),
        ("age_gfn_range", (0, 8192)),
        ("age_gfn_range", (0, 8192)),  # nothing young any more
        ("test_age_gfn", (3,)),
        ("fault", (3,)),  # fast path on an aged, writable leaf: spurious, A stays clear
        ("test_age_gfn", (0, 8192)),
        ("fault", (9, None, False)),
        ("recover_huge_pages", (0,)),  # refused while logging
        ("set_dirty_logging", (0, False)),  # huge pages recovered, one flush
        ("split_huge_pages", (0, 1024, 1)),
        ("split_huge_pages", (0, 1, 3)),  # bad target level
        ("recover_huge_pages", (0,)),
        # Manual protection with initially-set: nothing protected, all bits set.
        ("set_dirty_logging", (0, True, True, True)),
        ("get_dirty_log", (0,)),  # only copied
        ("fault", (6,)),  # a still-writable huge page: spurious on the fast path
        ("clear_dirty_log", (0, 0, 64)),  # eager split over the window, then protect
        ("fault", (1,)),
        ("clear_dirty_log", (0, 512, 64)),
        ("fault", (520,)),
        ("clear_dirty_log", (0, 3, 64)),  # first_page not a multiple of 64
        ("clear_dirty_log", (0, 0, 0)),
        ("get_dirty_log", (0,)),
        ("set_dirty_logging", (0, False)),
        # Initially set without eager split: huge pages write-protected at 2M and above.
        ("set_dirty_logging", (0, True, True, True, False)),
        ("clear_dirty_log", (0, 0, 128)),
        ("fault", (3,)),  # a protected huge page in a logged slot: split on the slow path
        ("get_dirty_log", (0,)),
        ("set_dirty_logging", (0, False)),
        # Manual protection without initially-set, no eager split.
        ("set_dirty_logging", (0, True, True, False, False)),
        ("fault", (2,)),
        ("fault", (700,)),
        ("get_dirty_log", (0,)),
        ("clear_dirty_log", (0, 0, 64)),
        ("get_dirty_log", (0,)),
        ("zap_all_fast", ()),  # a new root: later writes map afresh, marked
        ("fault", (2,)),
        ("get_dirty_log", (0,)),
        ("set_dirty_logging", (0, True, False, True)),  # initially_set needs manual_protect
        ("set_dirty_logging", (5, True)),  # no such slot
        ("age_gfn_range", (0, 0)),
        ("set_dirty_logging", (0, False)),
        ("add_memslot", (1 << 20, 100)),  # a slot whose size is not a multiple of 64
        ("set_dirty_logging", (1, True, True)),
        ("fault", ((1 << 20) + 99,)),
        ("get_dirty_log", (1,)),
        ("clear_dirty_log", (1, 64, 36)),  # reaches the slot's end: allowed
        ("clear_dirty_log", (1, 0, 36)),  # does not: refused
        ("delete_memslot", (1,)),
        ("get_dirty_log", (1,)),
    ]


def _dirty_steps_confidential(vm_type: str) -> list[tuple[str, tuple[Any, ...]]]:
    """Shared memory of a confidential VM: a 4K and a 2M non-guest_memfd slot log; the
    guest_memfd slot 0 refuses to."""
    s4k, s2m = 1 << 16, 1 << 17
    steps: list[tuple[str, tuple[Any, ...]]] = [("populate", (0, 8, True))]
    if vm_type == "tdx":
        steps += [("finalize", ())]
    return [
        *steps,
        ("add_memslot", (s4k, 1024, 4096, False)),
        ("add_memslot", (s2m, 2048, 2 << 20, False)),
        ("set_memory_attributes", (600, 1024, False)),
        ("fault", (700,)),  # shared memory of the guest_memfd slot
        ("fault", (s4k + 3,)),
        ("fault", (s2m + 3,)),
        ("fault", (s2m + 700, None, False)),
        ("set_dirty_logging", (0, True)),  # guest_memfd: refused
        ("set_dirty_logging", (1, True)),
        ("set_dirty_logging", (2, True, True, True, False)),
        ("fault", (s4k + 3,)),  # fast path
        ("fault", (s2m + 3,)),  # writable huge page, all bits set: spurious
        ("clear_dirty_log", (2, 0, 64)),
        ("fault", (s2m + 3,)),  # protected huge page of a logged slot: split, 4K
        ("fault", (3, True)),  # private: never the fast path
        ("fault", (3, None, True)),
        ("get_dirty_log", (1,)),
        ("get_dirty_log", (2,)),
        ("age_gfn_range", (0, 1 << 18)),
        ("test_age_gfn", (s2m, 2048)),
        ("split_huge_pages", (0, 1 << 18, 1)),
        ("recover_huge_pages", (0,)),
        ("set_dirty_logging", (1, False)),
        ("set_dirty_logging", (2, False)),
        ("recover_huge_pages", (2,)),
        ("destroy", ()),
        ("get_dirty_log", (1,)),
    ]


DIRTY_SCENARIOS: list[tuple[dict[str, Any], list[tuple[str, tuple[Any, ...]]]]] = [
    ({"vm_type": "default", "memory": "64MiB"}, _dirty_steps_default(1)),
    ({"vm_type": "default", "memory": "64MiB", "backing": "2M"}, _dirty_steps_default(512)),
    (
        {"vm_type": "default", "memory": "64MiB", "backing": "2M", "nx_huge_pages": True},
        _dirty_steps_default(512),
    ),
    (  # without eager split: a 1G page split to 4K is 262144 leaves for the reference
        {"vm_type": "default", "memory": "1GiB", "backing": "1G"},
        _dirty_steps_default(1, eager=False),
    ),
    ({"vm_type": "default", "memory": "64MiB", "levels": 5, "vcpus": 3}, _dirty_steps_default(1)),
    ({"vm_type": "tdx", "memory": "64MiB"}, _dirty_steps_confidential("tdx")),
    (
        {"vm_type": "snp", "memory": "64MiB", "folio": "2M", "backing": "2M"},
        _dirty_steps_confidential("snp"),
    ),
    ({"vm_type": "sw_protected", "memory": "64MiB"}, _dirty_steps_confidential("sw_protected")),
]


@pytest.mark.parametrize(
    ("cfg", "steps"),
    DIRTY_SCENARIOS,
    ids=lambda x: "-".join(f"{k}={v}" for k, v in x.items()) if isinstance(x, dict) else "",
)
def test_dirty_logging_scenario_matches_reference(
    cfg: dict[str, Any], steps: list[tuple[str, tuple[Any, ...]]]
) -> None:
    """Fixed dirty-logging flows: results (dirty bitmaps word for word), counters, cost
    ledger, arena, walks and check() agree after every step, and the flow reaches every new
    path (the fast path fixes and finds spurious writes, splits, recovery, write-protection,
    logged pages, aging)."""
    cfg = {"vcpus": 2, "trace": True, **cfg}
    native, ref = tdpmmu.VM(**cfg), ReferenceVM(**cfg)
    bits_seen = 0
    gfns = (0, 1, 2, 3, 5, 6, 520, 700, 3000, 4000, 1 << 16, (1 << 16) + 3, (1 << 17) + 3)
    for name, args in steps:
        where = f"{cfg}: {name}{args}"
        got = _outcome(lambda n=name, a=args: getattr(native, n)(*a))
        want = _outcome(lambda n=name, a=args: getattr(ref, n)(*a))
        assert got == want, f"{where}: engine {got} != reference {want}"
        if name == "get_dirty_log" and want[0] == "ok":
            bits_seen += sum(bin(w).count("1") for w in want[1])
        _same_counters(native, ref, where)
        _same_costs(native, ref, where)
        _same_hook_trace(native, ref, where)
        assert native.roots() == ref.roots(), where
        assert native.memslots() == ref.memslots(), where
        assert native.memslot_generation == ref.memslot_generation, where
        ref_tables = np.array(ref.tables(), dtype=np.uint64).reshape(-1, 512)
        assert np.array_equal(native.tables(), ref_tables), f"{where}: arena"
        if not ref.destroyed:
            for gfn in gfns:
                if gfn < ref.max_gfn:
                    got_walk = [(int(a), int(b)) for a, b in native.walk(gfn)]
                    assert got_walk == ref.walk(gfn), f"{where}: walk({gfn:#x})"
        assert _outcome(native.check) == _outcome(ref.check), f"{where}: check()"
    stats = ref.stats
    for key in ("pf_fast", "sptes_write_protected", "dirty_pages_logged", "sptes_aged"):
        assert stats[key] > 0, f"{cfg}: the flow never reached {key}"
    assert bits_seen > 0, f"{cfg}: no dirty bit was ever read back"
    if cfg.get("backing", "4K") != "4K":
        assert stats["huge_page_splits"] > 0 and stats["huge_pages_recovered"] > 0, cfg


# --------------------------------------------------------------------------------------
# Read-only memslots, moves, write tracking, NX recovery, PML, TDX huge pages and
# KVM_TDX_TERMINATE_VM: fixed flows (cheap, always run) that must reach every one of them
# --------------------------------------------------------------------------------------

Step = tuple[str, tuple[Any, ...]]


Outcomes = list[tuple[Step, tuple[Any, ...], dict[str, Any]]]


def _run_flow(
    cfg: dict[str, Any], steps: list[Step], gfns: tuple[int, ...]
) -> tuple[ReferenceVM, dict[str, int], Outcomes]:
    """Run ``steps`` on both sides, comparing after each one: results (errors by kind),
    every counter, the cost ledger, the hook trace, roots, memslots, the arena, S-EPT
    entries, walks of ``gfns`` (both roots on a confidential VM) and check().  Returns the
    reference VM, the peak of every counter, and each step with its outcome and the
    counters after it."""
    native, ref = tdpmmu.VM(**cfg), ReferenceVM(**cfg)
    peaks: dict[str, int] = {}
    outcomes: Outcomes = []
    for name, args in steps:
        where = f"{cfg}: {name}{args}"
        got = _outcome(lambda n=name, a=args: getattr(native, n)(*a))
        want = _outcome(lambda n=name, a=args: getattr(ref, n)(*a))
        assert got == want, f"{where}: engine {got} != reference {want}"
        outcomes.append(((name, args), want, dict(ref.stats)))
        _same_counters(native, ref, where)
        _same_costs(native, ref, where)
        _same_hook_trace(native, ref, where)
        for key, value in ref.stats.items():
            peaks[key] = max(peaks.get(key, 0), int(value))
        assert native.roots() == ref.roots(), where
        assert native.memslots() == ref.memslots(), where
        assert native.memslot_generation == ref.memslot_generation, where
        assert (native.bugged, native.destroyed) == (ref.bugged, ref.destroyed), where
        ref_tables = np.array(ref.tables(), dtype=np.uint64).reshape(-1, 512)
        assert np.array_equal(native.tables(), ref_tables), f"{where}: arena"
        if ref.has_mirror:
            assert native.sept_entries() == ref.sept_entries(), f"{where}: S-EPT"
        if not ref.destroyed:
            for gfn in gfns:
                for private in (False, True) if ref.confidential else (False,):
                    got_walk = [(int(a), int(b)) for a, b in native.walk(gfn, private)]
                    assert got_walk == ref.walk(gfn, private), f"{where}: walk({gfn:#x})"
        assert _outcome(native.check) == _outcome(ref.check), f"{where}: check()"
    return ref, peaks, outcomes


def _fault_of(outcomes: Outcomes, step: Step) -> tuple[Any, int]:
    """The ``tdpmmu.Ret`` and the level of the first fault ``step``."""
    out = next(o for s, o, _ in outcomes if s == step)
    assert out[0] == "ok", f"{step}: {out}"
    return tdpmmu.Ret(out[1]), out[2]


RO, RO2 = 1 << 20, 1 << 21  # a read-only slot, and where it moves


def _memslot_flags_steps() -> list[Step]:
    """A read-only slot, page write tracking, NX huge page recovery and KVM_MR_MOVE on a
    default VM backed by 2M pages, with the NX mitigation on."""
    return [
        # KVM_MEM_READONLY: read faults map read-only (huge), writes are emulated.
        ("add_memslot", (RO, 1024, "2M", False, True)),
        ("fault", (RO + 3, None, False)),
        ("fault", (RO + 3,)),  # EMULATE, nothing mapped
        ("fault", (RO + 700, None, False, True)),  # exec: 4K (NX), read-only, listed
        ("set_dirty_logging", (1, True)),  # refused on a read-only slot
        ("split_huge_pages", (RO, 512, 1)),
        ("recover_huge_pages", (1,)),  # a read-only 2M leaf again
        ("fault", (RO + 5,)),  # still EMULATE
        ("add_memslot", (RO2 + 512, 512, "2M", True)),  # gmem on a default VM: refused
        # Page write tracking: the first tracker protects the 2M leaf over the page.
        ("fault", (3,)),
        ("write_track_gfn", (7,)),
        ("write_track_gfn", (7,)),  # count 2: nothing more to protect
        ("fault", (7,)),  # WRITE_PROTECTED, mapped 4K read-only
        ("fault", (7,)),  # again: the leaf does not change
        ("fault", (8,)),  # the neighbour maps 4K writable
        ("fault", (7, None, False)),  # a read is allowed
        ("recover_huge_pages", (0,)),  # the tracked 2M range stays small
        ("write_track_gfn", (7, False)),
        ("write_track_gfn", (7, False)),
        ("write_track_gfn", (7, False)),  # not tracked any more: refused
        ("fault", (7,)),  # FIXED on the slow path (MMU-writable was cleared)
        ("write_track_gfn", (1 << 19,)),  # in no memslot: refused
        ("write_track_gfn", (3000,)),  # nothing mapped: nothing to protect, no flush
        ("fault", (3000,)),  # WRITE_PROTECTED: mapped 4K read-only
        # NX huge pages: exec faults list the tables they force; recovery zaps the oldest.
        ("fault", (1030, None, False, True)),
        ("fault", (1600, None, False, True)),
        ("fault", (2100, None, False, True)),
        ("fault", (1031,)),  # a data fault stays 4K while its table is listed
        ("nx_recover", (0,)),  # ratio 0: nothing
        ("nx_recover", (2,)),  # ceil(n / 2) oldest
        ("fault", (1030,)),  # huge again where the table went
        ("nx_recover", ()),  # KVM's ratio 60: one more
        ("nx_recover", (-1,)),  # refused
        ("fault", (2600, None, False, True)),
        ("set_dirty_logging", (0, True, False, False, False)),
        ("nx_recover", (1,)),  # the slot logs dirty pages: only taken off the list
        ("set_dirty_logging", (0, False)),
        ("fault", (2601, None, False, True)),
        # KVM_MR_MOVE: the old range is flushed as for a deletion, the slot moves.
        ("move_memslot", (1, RO2)),
        ("fault", (RO2 + 3, None, False)),
        ("fault", (RO2 + 3,)),  # read-only where it moved too
        ("fault", (RO + 3, None, False)),  # the old range is MMIO now
        ("move_memslot", (1, 0)),  # overlaps slot 0
        ("move_memslot", (1, RO2 + 1)),  # misaligned
        ("move_memslot", (7, RO)),  # no such slot
        ("move_memslot", (0, 1 << 22)),  # slot 0 moves with its trackers
        ("fault", ((1 << 22) + 3000,)),  # WRITE_PROTECTED where it moved
        ("fault", ((1 << 22) + 2601, None, False, True)),
        ("nx_recover", (1,)),
        ("zap_all_fast", ()),  # the listed tables go with the roots
        ("fault", ((1 << 22) + 5,)),
        ("write_track_gfn", ((1 << 22) + 5,)),  # the 2M leaf over it is protected
        ("delete_memslot", (0,)),
        ("write_track_gfn", ((1 << 22) + 5, False)),  # the slot is gone: refused
    ]


def _pml_steps(huge: bool) -> list[Step]:
    """PML dirty logging on slot 0: plain, manual, initially set; with 2M backing also
    without eager split (huge leaves write-protected, 4K ones armed by clearing D)."""
    return [
        ("populate", (0, 1024 if huge else 64)),
        ("fault", (100,)),
        ("set_dirty_logging", (0, True, False, False, not huge, True)),
        ("fault", (3,)),  # 4K: the CPU sets D and logs it; 2M: the slow path splits
        ("fault", (3,)),  # D set: plain spurious
        ("fault", (5,)),
        ("fault", (700, None, False)),  # a read of an armed page
        ("get_dirty_log", (0,)),  # taken; D cleared again
        ("fault", (3,)),  # logged again by the CPU
        ("fault", (2000,)),  # a new 4K mapping: marked, not armed
        ("get_dirty_log", (0,)),
        ("set_dirty_logging", (0, False)),  # recovery keeps what the first leaf says
        ("fault", (3,)),  # after logging: D set on an armed leaf, nothing logged
        ("set_dirty_logging", (0, True, True, False, True, True)),  # manual PML
        ("fault", (4,)),
        ("get_dirty_log", (0,)),  # only copied
        ("clear_dirty_log", (0, 0, 64)),  # clears D
        ("fault", (4,)),
        ("get_dirty_log", (0,)),
        ("set_dirty_logging", (0, False)),
        ("set_dirty_logging", (0, True, True, True, False, True)),  # initially set, no split
        ("clear_dirty_log", (0, 0, 128)),  # huge pages over the first/last page protected
        ("fault", (6,)),
        ("fault", (70,)),
        ("get_dirty_log", (0,)),
        ("set_dirty_logging", (0, False)),
        ("recover_huge_pages", (0,)),
    ]


def _tdx_huge_steps() -> list[Step]:
    """A TD with 2M private pages: AUG at 2M, splits by BLOCK, TRACK, kick, DEMOTE where a
    conversion or a hole covers part of a 2M leaf, no promotion on the mirror root, zaps of
    whole leaves, then teardown."""
    return [
        ("populate", (0, 8, True)),  # the initial image is 4K (PAGE.ADD is 4K only)
        ("finalize", ()),
        ("fault", (5, True)),  # a table is there: no promotion, 4K
        ("fault", (600, True)),  # 2M AUG, ACCEPT of the whole 2M
        ("fault", (601, True)),  # spurious
        ("fault", (1030, True, True, False, 1)),
        ("set_memory_attributes", (1031, 1, False)),  # split, then the 4K page goes
        ("fault", (1031, False)),
        ("set_memory_attributes", (1031, 1, True)),
        ("fault", (1031, True)),  # no promotion: 4K
        ("fault", (1600, True)),
        ("punch_hole", (1600, 3)),  # split, the hole goes
        ("fault", (1601, True)),
        ("fault", (2055, True)),
        ("zap_gfn_range", (2051, 1)),  # the whole 2M leaf goes (no split)
        ("fault", (3000, True)),
        ("set_memory_attributes", (2560, 512, False)),  # covers the leaf: no split
        ("fault", (3000, False)),
        ("fault", (4000, True)),
        ("add_memslot", (1 << 15, 1024, "2M", True)),
        ("set_memory_attributes", (1 << 15, 1024, True)),
        ("fault", ((1 << 15) + 3, True)),
        ("mmu_notifier_invalidate", (0, 1 << 16)),  # shared only: private leaves stay
        ("delete_memslot", (1,)),  # a whole-leaf removal
        ("fault", (4600, True)),
        ("destroy", ()),
        ("fault", (0,)),
    ]


TDX_HUGE = {"vm_type": "tdx", "backing": "2M", "folio": "2M"}

NEW_OPS_SCENARIOS: list[tuple[dict[str, Any], list[Step]]] = [
    ({"memory": "64MiB", "backing": "2M", "nx_huge_pages": True}, _memslot_flags_steps()),
    (
        {"memory": "64MiB", "backing": "2M", "nx_huge_pages": True, "slot_zap_all": False},
        _memslot_flags_steps(),
    ),
    ({"memory": "64MiB"}, _pml_steps(huge=False)),
    ({"memory": "64MiB", "backing": "2M"}, _pml_steps(huge=True)),
    ({**TDX_HUGE, "tdx": {"huge_pages": True}}, _tdx_huge_steps()),
    ({**TDX_HUGE, "tdx": {"huge_pages": True, "teardown": "terminate_vm"}}, _tdx_huge_steps()),
    (
        {**TDX_HUGE, "tdx": {"huge_pages": True, "track": "batched", "interface": "two_hook"}},
        _tdx_huge_steps(),
    ),
    (
        {**TDX_HUGE, "tdx": {"huge_pages": True, "sept_free": "sept_remove", "version": "6.16"}},
        _tdx_huge_steps(),
    ),
    (
        {
            **TDX_HUGE,
            "hooks": "private",
            "tdx": {"huge_pages": True, "teardown": "terminate_vm", "sept_free": "sept_remove"},
        },
        _tdx_huge_steps(),
    ),
    ({**TDX_HUGE, "tdx": {"teardown": "terminate_vm"}}, _tdx_huge_steps()),  # 4K private
    ({"vm_type": "tdx", "tdx": {"teardown": "terminate_vm"}}, _tdx_huge_steps()),
]


@pytest.mark.parametrize(
    ("cfg", "steps"),
    NEW_OPS_SCENARIOS,
    ids=lambda x: "-".join(f"{k}={v}" for k, v in x.items()) if isinstance(x, dict) else "",
)
def test_new_operations_scenario_matches_reference(cfg: dict[str, Any], steps: list[Step]) -> None:
    """Fixed flows through read-only memslots, KVM_MR_MOVE, page write tracking, NX huge
    page recovery, PML, TDX huge pages and KVM_TDX_TERMINATE_VM: both sides agree after every
    step (see ``_run_flow``), and each flow reaches what it is for."""
    cfg = {"memory": "64MiB", "vcpus": 2, "trace": True, **cfg}
    gfns = (0, 3, 5, 7, 8, 600, 1030, 1031, 1600, 1601, 2055, 3000, RO + 3, RO2 + 3, 1 << 22)
    ref, peak, outcomes = _run_flow(cfg, steps, gfns)
    ret = tdpmmu.Ret
    if cfg.get("nx_huge_pages"):  # read-only slots, write tracking, NX recovery, moves
        for key in ("pf_emulate", "pf_write_protected", "nx_lpage_splits"):
            assert peak[key] > 0, f"{cfg}: the flow never reached {key}"
        assert peak["nx_huge_pages_recovered"] >= 2 and peak["huge_pages_recovered"] > 0, peak
        assert _fault_of(outcomes, ("fault", (RO + 3,)))[0] == ret.EMULATE
        assert _fault_of(outcomes, ("fault", (RO2 + 3,)))[0] == ret.EMULATE
        assert _fault_of(outcomes, ("fault", (7,))) == (ret.WRITE_PROTECTED, 1)
        assert _fault_of(outcomes, ("fault", ((1 << 22) + 3000,)))[0] == ret.WRITE_PROTECTED
        assert _fault_of(outcomes, ("fault", (1031,)))[1] == 1  # listed: stays 4K
        assert _fault_of(outcomes, ("fault", (1030,)))[1] == 2  # recovered: huge
        moved = [o[0] for s, o, _ in outcomes if s[0] == "move_memslot"]
        assert moved == ["ok", "ValueError", "ValueError", "ValueError", "ok"], moved
    elif cfg.get("vm_type", "default") == "default":  # PML
        assert peak["pml_logged"] > 0, f"{cfg}: the CPU never logged a page"
        assert peak["dirty_pages_logged"] > 0
        if cfg.get("backing") == "2M":
            assert peak["sptes_write_protected"] > 0, "huge leaves are write-protected"
        bits = sum(
            bin(w).count("1") for s, o, _ in outcomes if s[0] == "get_dirty_log" for w in o[1]
        )
        assert bits > 0, f"{cfg}: no dirty bit was ever read back"
    else:  # TDX
        tdx = cfg.get("tdx", {})
        huge = tdx.get("huge_pages") and cfg.get("folio") == "2M"
        assert _fault_of(outcomes, ("fault", (600, True)))[1] == (2 if huge else 1)
        splits = ref.stats["split_external_spt"]
        assert (splits >= 2) if huge else (splits == 0), f"{cfg}: {splits} splits"
        assert ref.stats["TDH.MEM.PAGE.DEMOTE"] == splits
        i = next(i for i, (s, _, _) in enumerate(outcomes) if s[0] == "destroy")
        before, after = outcomes[i - 1][2], outcomes[i][2]
        if tdx.get("teardown") == "terminate_vm":
            # The private pages left at destroy() are reclaimed, none removed.
            assert after["TDH.MEM.PAGE.REMOVE"] == before["TDH.MEM.PAGE.REMOVE"]
            reclaimed = after["TDH.PHYMEM.PAGE.RECLAIM"] - before["TDH.PHYMEM.PAGE.RECLAIM"]
            assert reclaimed > before["sept_tables"], (reclaimed, before["sept_tables"])
        else:
            assert after["TDH.MEM.PAGE.REMOVE"] > before["TDH.MEM.PAGE.REMOVE"]
        assert ref.destroyed and not ref.bugged


# --------------------------------------------------------------------------------------
# Guest accesses (access_batch) and host mm changes of the shared mappings (MADV_DONTNEED,
# mprotect): fixed flows that must reach each rule
# --------------------------------------------------------------------------------------

HOST_SLOT = 1 << 16  # a memslot without guest_memfd on a confidential VM


def _batch(*gfns: int) -> np.ndarray:
    return np.array(gfns, dtype=np.uint64)


def _host_mm_steps(step: int) -> list[Step]:
    """A default VM whose slot 0 is backed by pages of ``step`` 4K pages: MADV_DONTNEED frees
    the first four backing pages (the next touch allocates again), mprotect makes them
    read-only (a write is a memory-fault exit, a read maps without write access, the fast
    path cannot fix a write) and writable again; guest accesses hit the hardware walk or
    fault; a PML log filled by one batch of writes; refusals."""
    r = 4 * step  # the range changed on the host: [0, r)
    return [
        ("fault", (3,)),
        ("fault", (r + 3,)),  # just past the range
        ("access_batch", (_batch(3, r + 3, 5),)),  # hits (gfn 5: a fault with 4K backing)
        ("madvise_dontneed", (0, r)),  # zapped and freed
        ("fault", (3, None, False)),  # the re-touch allocates again
        ("fault", (r + 3,)),  # not freed: spurious, no allocation
        ("madvise_dontneed", (1, r)),  # with 2M backing: misaligned, refused
        ("madvise_dontneed", (1 << 22, 1)),  # in no memslot: refused
        ("mprotect", (0, r, False)),  # read-only on the host: zapped
        ("fault", (3,)),  # MEMORY_FAULT, nothing mapped
        ("access_batch", (_batch(3),)),  # a fault, MEMORY_FAULT again
        ("fault", (3, None, False)),  # a read maps read-only
        ("access_batch", (_batch(3, 4), False)),  # reads: hits (gfn 4: a fault with 4K)
        ("fault", (3,)),  # the fast path cannot fix it: MEMORY_FAULT
        ("fault", (r + 3,)),  # outside the range: still writable
        ("mprotect", (0, r + 1, True)),  # with 2M backing: misaligned, refused
        ("mprotect", (1 << 22, 1, True)),  # in no memslot: refused
        ("mprotect", (0, r, True)),  # writable again: the read-only leaves go
        ("fault", (3,)),  # FIXED, writable
        ("access_batch", (_batch(3),)),  # a hit
        ("access_batch", (_batch(3), np.ones(2, dtype=bool))),  # write array too long
        ("access_batch", (_batch(1 << 40),)),  # beyond max_gfn: refused
        # PML: one batch writes 600 armed 4K pages, so the 512-entry log fills once.
        ("populate", (1024, 1024)),
        ("set_dirty_logging", (0, True, False, False, True, True)),
        ("access_batch", (np.arange(1024, 1624, dtype=np.uint64),)),
        ("get_dirty_log", (0,)),
        ("set_dirty_logging", (0, False)),
        # Read-only, then freed: the next read allocates again and maps read-only.
        ("mprotect", (0, r, False)),
        ("madvise_dontneed", (0, r)),
        ("fault", (3, None, False)),
        ("fault", (3,)),
    ]


def _host_mm_confidential_steps(vm_type: str) -> list[Step]:
    """A confidential VM: MADV_DONTNEED is refused on guest_memfd slot 0 and allowed on a
    slot without one; mprotect of slot 0's shared half makes shared writes memory-fault exits
    while private writes (guest_memfd) go on; guest accesses private and shared."""
    s = HOST_SLOT
    steps: list[Step] = [("populate", (0, 8, True))]
    if vm_type == "tdx":
        steps += [("finalize", ())]
    return [
        *steps,
        ("madvise_dontneed", (0, 16)),  # guest_memfd: refused
        ("add_memslot", (s, 1024, 4096, False)),
        ("set_memory_attributes", (512, 512, False)),
        ("fault", (600,)),  # a shared page of the guest_memfd slot
        ("fault", (s + 3,)),
        ("access_batch", (_batch(3, 600, s + 3, s + 4, 20),)),  # by the attributes
        ("access_batch", (_batch(21, 22), True, True, 1)),  # private, on vCPU 1
        ("access_batch", (_batch(601, 602), False, False)),  # shared reads
        ("mprotect", (512, 512, False)),  # slot 0's shared half read-only: zapped
        ("fault", (600,)),  # MEMORY_FAULT
        ("fault", (600, None, False)),  # a read maps read-only
        ("access_batch", (_batch(600, 601),)),  # writes: faults, MEMORY_FAULT
        ("fault", (30, True)),  # private memory does not use the host mapping
        ("madvise_dontneed", (s, 1024)),  # no guest_memfd: freed
        ("fault", (s + 3,)),  # allocates again
        ("mprotect", (512, 512, True)),
        ("fault", (600,)),  # FIXED, writable
        ("destroy", ()),
        ("access_batch", (_batch(3),)),  # destroyed: refused
    ]


def _outcomes_of(outcomes: Outcomes, step: Step) -> list[tuple[Any, ...]]:
    """The outcome of every ``step`` (a fault or a zap, compared by name and arguments)."""
    return [o for s, o, _ in outcomes if s[0] == step[0] and s[0] != "access_batch" and s == step]


def _ret_of(out: tuple[Any, ...]) -> Any:
    assert out[0] == "ok", out
    return tdpmmu.Ret(out[1])


HOST_MM_SCENARIOS: list[tuple[dict[str, Any], list[Step]]] = [
    ({"memory": "64MiB"}, _host_mm_steps(1)),
    ({"memory": "64MiB", "backing": "2M"}, _host_mm_steps(512)),
    ({"memory": "64MiB", "backing": "2M", "levels": 5, "slot_zap_all": False}, _host_mm_steps(512)),
    ({"vm_type": "sw_protected"}, _host_mm_confidential_steps("sw_protected")),
    ({"vm_type": "sw_protected", "mirror": True}, _host_mm_confidential_steps("sw_protected")),
    ({"vm_type": "snp"}, _host_mm_confidential_steps("snp")),
    ({"vm_type": "tdx"}, _host_mm_confidential_steps("tdx")),
]


@pytest.mark.parametrize(
    ("cfg", "steps"),
    HOST_MM_SCENARIOS,
    ids=lambda x: "-".join(f"{k}={v}" for k, v in x.items()) if isinstance(x, dict) else "",
)
def test_host_mm_and_access_batch_scenario_matches_reference(
    cfg: dict[str, Any], steps: list[Step]
) -> None:
    """Fixed flows through ``access_batch``, ``madvise_dontneed`` and ``mprotect``: both
    sides agree after every step (see ``_run_flow``), and each flow reaches what it is for:
    a freed page allocated again on its next touch, a write to a host read-only page a
    memory-fault exit (also on the fast path's leaf), a read of it a leaf without W, MMU-
    and host-writable, writes fixed again after mprotect RW, hardware-walk hits, and (default
    VM) a PML log filled by one batch."""
    cfg = {"memory": "64MiB", "vcpus": 2, "trace": True, **cfg}
    gfns = (3, 4, 5, 20, 21, 30, 600, 601, 1024, 1623, 1024 + 512 + 3, HOST_SLOT + 3)
    ref, peak, outcomes = _run_flow(cfg, steps, gfns)
    ret = tdpmmu.Ret
    write_bits = _SPTE_W | _SPTE_MMU_WRITABLE | _SPTE_HOST_WRITABLE
    batches = [(s[1], o) for s, o, _ in outcomes if s[0] == "access_batch"]
    assert any(o[0] == "ok" and o[1]["faults"] < len(a[0]) for a, o in batches), "no hit"
    assert any(o[0] == "ok" and o[1]["faults"] > 0 for a, o in batches), "no fault"
    assert peak["pf_memory_fault"] >= 3, peak["pf_memory_fault"]

    def allocated_by(step: Step) -> int:
        i = next(i for i, (s, _, _) in enumerate(outcomes) if s == step)
        return outcomes[i][2]["host_pages_allocated"] - outcomes[i - 1][2]["host_pages_allocated"]

    if cfg.get("vm_type", "default") == "default":
        step = 512 if cfg.get("backing") == "2M" else 1
        r = 4 * step
        writes3 = [_ret_of(o) for o in _outcomes_of(outcomes, ("fault", (3,)))]
        assert writes3 == [
            ret.FIXED,
            ret.MEMORY_FAULT,
            ret.MEMORY_FAULT,
            ret.FIXED,
            ret.MEMORY_FAULT,
        ], writes3
        assert allocated_by(("fault", (3, None, False))) == 1  # the re-touch after madvise
        reads3 = _outcomes_of(outcomes, ("fault", (3, None, False)))
        for out in (reads3[1], reads3[2]):  # while read-only on the host
            assert _ret_of(out) == ret.FIXED and int(out[3], 16) & write_bits == 0, out
        past = [_ret_of(o) for o in _outcomes_of(outcomes, ("fault", (r + 3,)))]
        assert past == [ret.FIXED, ret.SPURIOUS, ret.SPURIOUS], past
        refused = [("madvise_dontneed", (1 << 22, 1)), ("mprotect", (1 << 22, 1, True))]
        misaligned = [("madvise_dontneed", (1, r)), ("mprotect", (0, r + 1, True))]
        for step_ in refused + misaligned:
            kind = _outcomes_of(outcomes, step_)[0][0]
            want = "ValueError" if step_ in refused or step > 1 else "ok"
            assert kind == want, (step_, kind)
        kinds = [o[0] for _, o in batches]
        assert kinds.count("ValueError") == 2 and kinds.count("ok") == len(kinds) - 2, kinds
        assert peak["pml_full_exits"] == 1 and peak["pml_logged"] >= 600, peak
    else:
        shared600 = [_ret_of(o) for o in _outcomes_of(outcomes, ("fault", (600,)))]
        assert shared600 == [ret.FIXED, ret.MEMORY_FAULT, ret.FIXED], shared600
        read600 = _outcomes_of(outcomes, ("fault", (600, None, False)))[0]
        assert _ret_of(read600) == ret.FIXED and int(read600[3], 16) & write_bits == 0
        assert _ret_of(_outcomes_of(outcomes, ("fault", (30, True)))[0]) == ret.FIXED
        assert _outcomes_of(outcomes, ("madvise_dontneed", (0, 16)))[0][0] == "ValueError"
        assert _outcomes_of(outcomes, ("madvise_dontneed", (HOST_SLOT, 1024)))[0] == ("ok", 2)
        assert [_ret_of(o) for o in _outcomes_of(outcomes, ("fault", (HOST_SLOT + 3,)))] == [
            ret.FIXED,
            ret.FIXED,
        ]
        i = [i for i, (s, _, _) in enumerate(outcomes) if s == ("fault", (HOST_SLOT + 3,))][1]
        assert outcomes[i][2]["host_pages_allocated"] > outcomes[i - 1][2]["host_pages_allocated"]
        assert batches[-1][1][0] == "ValueError" and ref.destroyed  # refused once destroyed


def test_access_batch_is_refused_before_the_td_is_finalized() -> None:
    """A TD's vCPUs cannot run before KVM_TDX_FINALIZE_VM (KVM_RUN fails), so
    ``access_batch`` must raise ``ConfigError`` naming ``vm`` before any access, also when
    every access would hit a page of the initial image; nothing changes."""
    for vm in (
        ReferenceVM(vm_type="tdx", memory="64MiB"),
        tdpmmu.VM(vm_type="tdx", memory="64MiB"),
    ):
        side = "reference" if isinstance(vm, ReferenceVM) else "engine"
        assert vm.populate(0, 4, True) == 4
        stats = dict(vm.stats)
        with pytest.raises(tdpmmu.ConfigError, match=r"^vm: "):
            vm.access_batch(_batch(0, 1), private=True)
        assert dict(vm.stats) == stats, side


@pytest.mark.parametrize("vm_type", ["snp", "sw_protected", "tdx"])
def test_access_of_the_other_kind_than_the_attribute_never_hits(vm_type: str) -> None:
    """A private access to a page whose attribute is shared (or the reverse) does not
    complete in hardware even where a leaf maps the gfn (SNP has one root: the RMP check
    faults): it takes the fault path, which exits to userspace with MEMORY_FAULT, on both
    sides, as ``fault`` does."""
    for vm in (
        ReferenceVM(vm_type=vm_type, memory="64MiB"),
        tdpmmu.VM(vm_type=vm_type, memory="64MiB"),
    ):
        side = "reference" if isinstance(vm, ReferenceVM) else "engine"
        if vm_type == "tdx":
            vm.finalize()
        vm.set_memory_attributes(0, 16, False)  # shared
        assert vm.access_batch(_batch(3), private=False)["faults"] == 1, side
        assert vm.access_batch(_batch(3), private=False)["faults"] == 0, side  # a hit
        before = vm.stats["pf_memory_fault"]
        assert vm.access_batch(_batch(3), private=True)["faults"] == 1, side
        assert vm.stats["pf_memory_fault"] == before + 1, side


def test_fast_path_leaves_an_exec_fault_to_the_slow_path() -> None:
    """A write that is also an instruction fetch, on a writable NX huge page: restoring W
    cannot give X, so KVM's fast_page_fault re-checks ``is_access_allowed(fault,
    new_spte)`` and leaves the fault to the slow path, which splits the page (the NX huge
    page rule) and finds the 4K child executable.  Both sides must do that (the engine once
    answered it FIXED on the fast path, without X: the guest's fetch would have faulted
    again for ever)."""
    cfg = {"memory": "64MiB", "backing": "2M", "nx_huge_pages": True}
    native, ref = tdpmmu.VM(**cfg), ReferenceVM(**cfg)
    for vm in (native, ref):
        assert vm.fault(5).level == 2  # a write maps the huge page, without X
    want = ref.fault(5, write=True, exec=True)
    assert (want.ret, want.level) == (tdpmmu.Ret.SPURIOUS, 1) and want.spte & _SPTE_X
    assert (ref.stats["huge_page_splits"], ref.stats["pf_fast"]) == (1, 0)
    got = native.fault(5, write=True, exec=True)
    assert (got.ret, got.level, hex(got.spte)) == (want.ret, want.level, hex(want.spte)), (
        f"engine: {got.ret.name} at level {got.level}, spte {got.spte:#x} "
        f"(pf_fast {native.stats['pf_fast']}, huge_page_splits "
        f"{native.stats['huge_page_splits']}); KVM and the reference: {want.ret.name} at "
        f"level {want.level}, spte {want.spte:#x}"
    )
    assert dict(native.stats)["huge_page_splits"] == 1


def test_recovery_leaves_mixed_attribute_ranges_small() -> None:
    """Huge-page recovery on a confidential VM asks KVM's ``kvm_mmu_max_mapping_level``,
    which refuses a huge page over shared and private gfns (``KVM_LPAGE_MIXED_FLAG``, as
    the fault path does): the 2M table over gfns 0-255 (shared, gfn 3 mapped) and 256-511
    (private, gfn 300 mapped) stays a table, and check() passes.  The engine once asked
    only the table's first gfn and made one shared 2M leaf, mapping the private gfns to
    shared host pages (found by this test, fixed in c5c5d95); a regression test now."""
    cfg = {"vm_type": "snp", "memory": "64MiB", "backing": "2M", "folio": "2M"}
    for vm in (ReferenceVM(**cfg), tdpmmu.VM(**cfg)):
        side = "reference" if isinstance(vm, ReferenceVM) else "engine"
        vm.set_memory_attributes(0, 256, False)
        assert vm.fault(3).level == 1 and vm.fault(300).level == 1
        vm.check()
        assert vm.recover_huge_pages(0) == 0, f"{side}: recovered a mixed range"
        assert vm.walk(300)[-1][0] == 1, side
        vm.check()


def test_recovery_keeps_read_only_slots_read_only() -> None:
    """Huge-page recovery in a KVM_MEM_READONLY memslot: KVM's ``make_huge_spte`` keeps the
    small SPTE's permissions, so the 2M leaf made from the read-only 4K leaves is read-only
    too (no W, D, MMU- or host-writable) and a guest write is still emulated.  The engine
    once built the huge leaf as for a writable slot with only W cleared (MMU- and
    host-writable: the write was FIXED on the fast path and the guest wrote read-only
    memory, unnoticed by check()); found by this test, fixed in 28e43f5."""
    cfg = {"memory": "64MiB", "backing": "2M"}
    gfn = (1 << 20) + 3
    for vm in (ReferenceVM(**cfg), tdpmmu.VM(**cfg)):
        side = "reference" if isinstance(vm, ReferenceVM) else "engine"
        slot = vm.add_memslot(1 << 20, 512, "2M", readonly=True)
        assert vm.fault(gfn, write=False).level == 2
        assert vm.fault(gfn).ret == tdpmmu.Ret.EMULATE
        assert vm.split_huge_pages(1 << 20, 512, 1) == 1
        assert vm.recover_huge_pages(slot) == 1, side
        spte = vm.spte(gfn)
        assert spte & (1 << 7) and not spte & (_SPTE_W | _SPTE_MMU_WRITABLE), (
            f"{side}: recovered leaf {spte:#x} of a read-only slot is MMU-writable"
        )
        r = vm.fault(gfn)
        assert (r.ret, r.spte & _SPTE_W) == (tdpmmu.Ret.EMULATE, 0), (
            f"{side}: a guest write to read-only memory returned {r.ret.name}, spte {r.spte:#x}"
        )
        vm.check()


def test_recovery_leaves_write_tracked_pages_small() -> None:
    """Huge-page recovery honours page write tracking: KVM's ``kvm_mmu_max_mapping_level``
    counts a tracker in the slot's ``disallow_lpage``, so the 2M range holding tracked gfn 7
    stays a table and a guest write to gfn 7 still returns WRITE_PROTECTED.  The engine once
    recovered the range into one MMU-writable 2M leaf and the write to the tracked page was
    FIXED on the fast path (unnoticed by check()); found by this test, fixed in 28e43f5."""
    cfg = {"memory": "64MiB", "backing": "2M"}
    for vm in (ReferenceVM(**cfg), tdpmmu.VM(**cfg)):
        side = "reference" if isinstance(vm, ReferenceVM) else "engine"
        assert vm.fault(3).level == 2
        assert vm.write_track_gfn(7) == 1
        assert vm.split_huge_pages(0, 512, 1) == 1
        assert vm.recover_huge_pages(0) == 0, f"{side}: recovered a range over a tracked page"
        assert vm.walk(7)[-1][0] == 1, side
        r = vm.fault(7)
        assert r.ret == tdpmmu.Ret.WRITE_PROTECTED, f"{side}: a tracked write returned {r.ret.name}"
        vm.check()


def test_reference_keeps_the_engines_counters_and_cost_fields() -> None:
    """The reference counts what the engine counts, under the same names in the same order,
    and charges the same cost fields with the same defaults (so every comparison above can
    compare all of them)."""
    from tdpmmu import _core
    from tdpmmu.reference import COUNTER_NAMES, DEFAULT_COSTS

    assert tuple(_core.COUNTER_NAMES) == COUNTER_NAMES
    assert list(DEFAULT_COSTS) == list(_core.COST_FIELDS)
    assert dict(_core.COST_DEFAULTS) == DEFAULT_COSTS
    native, ref = tdpmmu.VM(memory="64MiB"), ReferenceVM(memory="64MiB")
    assert list(dict(native.stats)) == list(ref.stats)
    assert list(dict(native.cost_breakdown())) == list(ref.cost_breakdown())


def test_pre_fault_of_read_only_memory_maps_read_only() -> None:
    """KVM_PRE_FAULT_MEMORY is a read-type fault: over memory the host mprotect()ed read-only,
    or a KVM_MEM_READONLY slot, it maps read-only leaves (and succeeds) where a guest write
    would exit (MEMORY_FAULT, EMULATE); both sides agree."""
    for vm in (ReferenceVM(memory="64MiB"), tdpmmu.VM(memory="64MiB")):
        side = "reference" if isinstance(vm, ReferenceVM) else "engine"
        vm.mprotect(0, 16, False)
        ro = vm.add_memslot(1 << 20, 16, readonly=True)
        for gfn, ret in ((0, tdpmmu.Ret.MEMORY_FAULT), (1 << 20, tdpmmu.Ret.EMULATE)):
            assert vm.populate(gfn, 16) == 16, side
            assert vm.spte(gfn + 3) & _SPTE_W == 0 and vm.spte(gfn + 3) & 1, side
            assert vm.fault(gfn + 3).ret == ret, side
        assert ro == 1


AT = HOST_SLOT  # a memslot without guest_memfd for the access-tracking flow


def _access_tracking_steps() -> list[Step]:
    """Map (write, read, a read of a write-tracked page), age, probe, access again (reads,
    writes, the write-tracked page), pre-fault and access in a batch, dirty logging."""
    return [
        ("add_memslot", (AT, 1024, 4096)),
        ("fault", (AT + 3, None, True)),
        ("fault", (AT + 4, None, False)),
        ("write_track_gfn", (AT + 5, True)),
        ("fault", (AT + 5, None, False)),
        ("test_age_gfn", (AT, 16)),
        ("age_gfn_range", (AT, 16)),
        ("test_age_gfn", (AT, 16)),
        ("age_gfn_range", (AT, 16)),
        ("fault", (AT + 4, None, False)),
        ("test_age_gfn", (AT + 4, 1)),
        ("test_age_gfn", (AT + 3, 1)),
        ("fault", (AT + 3, None, True)),
        ("fault", (AT + 5, None, True)),
        ("populate", (AT + 64, 8)),
        ("test_age_gfn", (AT + 64, 8)),
        ("access_batch", (np.arange(AT + 64, AT + 72, dtype=np.uint64), False, None, 0)),
        ("access_batch", (np.arange(AT + 64, AT + 72, dtype=np.uint64), False, None, 0)),
        ("set_dirty_logging", (1, True, False, False, True, True)),
        ("set_dirty_logging", (1, True, False, False, True, False)),
        ("age_gfn_range", (AT, 1024)),
        ("fault", (AT + 66, None, True)),
        ("fault", (AT + 67, None, False)),
        ("get_dirty_log", (1,)),
    ]


@pytest.mark.parametrize("vm_type", ["default", "sw_protected"])
@pytest.mark.parametrize("ad_bits", [False, True])
def test_access_tracking_scenario_matches_reference(vm_type: str, ad_bits: bool) -> None:
    """A fixed aging flow on both sides, compared after every step (``_run_flow``).  With A/D
    off: aging makes every leaf access-tracked (test_young False, a second aging finds
    nothing young), a read of a tracked leaf faults and the fast path restores it
    (``pf_fast``) and only that page is young again, a write to a tracked MMU-writable leaf
    is restored on the fast path, a write to the write-tracked (not MMU-writable) one goes to
    the slow path, pre-faulted leaves start tracked and their first accesses all fault,
    PML is refused and a write under dirty logging is logged.  With A/D on the same reads
    are answered by the mapping (spurious), as before."""
    cfg: dict[str, Any] = {"vm_type": vm_type, "memory": "64MiB", "ad_bits": ad_bits}
    steps = _access_tracking_steps()
    _, peak, outcomes = _run_flow(cfg, steps, (AT + 3, AT + 4, AT + 5, AT + 66, AT + 67))
    ret = tdpmmu.Ret

    def outs(step: Step) -> list[tuple[Any, ...]]:
        return [o for s, o, _ in outcomes if s[0] == step[0] and s[1][:2] == step[1][:2]]

    assert outs(("test_age_gfn", (AT, 16))) == [("ok", True), ("ok", False)]
    assert outs(("age_gfn_range", (AT, 16))) == [("ok", True), ("ok", False)]
    reads4 = [_ret_of(o) for o in outs(("fault", (AT + 4, None)))]
    writes3 = [_ret_of(o) for o in outs(("fault", (AT + 3, None)))]
    write5 = _ret_of(outs(("fault", (AT + 5, None)))[1])
    batches = [o[1]["faults"] for s, o, _ in outcomes if s[0] == "access_batch"]
    pml = [o[0] for s, o, _ in outcomes if s[0] == "set_dirty_logging"]
    log = next(o for s, o, _ in outcomes if s[0] == "get_dirty_log")
    assert write5 == ret.WRITE_PROTECTED  # never fixed on the fast path
    if not ad_bits:
        assert reads4 == [ret.FIXED, ret.FIXED], reads4
        assert writes3 == [ret.FIXED, ret.FIXED], writes3
        assert outs(("test_age_gfn", (AT + 4, 1))) == [("ok", True)]
        assert outs(("test_age_gfn", (AT + 3, 1))) == [("ok", False)]
        assert outs(("test_age_gfn", (AT + 64, 8))) == [("ok", False)]
        assert batches == [8, 0], batches  # tracked pre-faults fault once, then hit
        assert pml == ["ValueError", "ok"], pml
        assert peak["pf_fast"] == 2 + 8 + 2, peak["pf_fast"]
        # The first aging takes 3 leaves; the slot-wide one the 3 accessed since (gfn 5 was
        # remapped by the slow path) and the 8 the batch restored.
        assert peak["sptes_aged"] == 3 + 3 + 8, peak["sptes_aged"]
    else:
        assert reads4 == [ret.FIXED, ret.SPURIOUS], reads4
        assert writes3 == [ret.FIXED, ret.SPURIOUS], writes3
        assert outs(("test_age_gfn", (AT + 64, 8))) == [("ok", False)]
        assert batches == [0, 0], batches  # the CPU sets A on the pre-faulted leaves
        assert pml == ["ok", "ok"], pml
    dirty = log[1][1]  # word 1 of the slot's bitmap: pages 64..127
    assert dirty >> 2 & 1 == 1 and dirty >> 3 & 1 == 0, hex(dirty)
