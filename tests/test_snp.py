"""SEV-SNP and SW_PROTECTED_VM through the public API: spec §8 and §10 item 24 (plus the SNP parts
of items 5, 8, 14 and 21), PVALIDATE, and the "gmem" vs "private" hook designs on SNP.

Each test pins the RMP instructions issued (``vm.trace_events()``: ``rmpupdate`` with the gfn of
the page(s) it updates and detail 1 for to-private, 0 for to-shared, ``psmash``, ``pvalidate``), the
hook calls of the "private" design, the RMP entries (``vm.rmp_entry``) and the NPT (``vm.walk``),
so it fails if the rule were broken.
"""

from collections import Counter
from typing import Any

import numpy as np
import pytest

import tdpmmu
from tdpmmu import Event, Ret, VmBugged, spte

SVE = spte.SHADOW_NONPRESENT_VALUE
RMP_OPS = ("rmpupdate", "psmash", "pvalidate")
HOOKS = ("link_external_spt", "set_external_spte", "remove_external_spte", "free_external_spt")


def snp(hooks: str | None = None, **kw: Any) -> tdpmmu.VM:
    kw.setdefault("memory", "1GiB")
    return tdpmmu.VM("snp", hooks=hooks, trace=True, **kw)


def mark(vm: tdpmmu.VM) -> int:
    return len(vm.trace_events())


def since(vm: tdpmmu.VM, n: int) -> list[Event]:
    return vm.trace_events()[n:]


def rmp_ops(events: list[Event]) -> list[tuple[str, int, int, int]]:
    """(op, gfn, level, detail) of the RMP instructions among ``events``."""
    return [(e.op, e.gfn, e.level, e.detail) for e in events if e.op in RMP_OPS]


def entry(assigned: bool, validated: bool, size: str, gfn: int) -> dict[str, Any]:
    return {"assigned": assigned, "validated": validated, "size": size, "gpa": gfn << 12}


PRIVATE_4K = {"assigned": True, "validated": True, "size": "4K"}
SHARED = entry(False, False, "4K", 0)


def private_4k(gfn: int) -> dict[str, Any]:
    return entry(True, True, "4K", gfn)


# ----- item 24: the RMP follows guest_memfd ------------------------------------------------------


def test_b24_first_private_fault_makes_the_page_private_once() -> None:
    vm = snp()
    assert vm.hooks_name == "gmem" and vm.shared_bit == 0
    assert vm.rmp_entry(7) == SHARED
    r = vm.fault(7)
    assert (r.ret, r.level, r.private) == (Ret.FIXED, 1, True)
    # One RMPUPDATE to private (gmem prepare), then the guest's PVALIDATE.
    assert rmp_ops(vm.trace_events()) == [("rmpupdate", 7, 1, 1), ("pvalidate", 7, 1, 1)]
    assert vm.rmp_entry(7) == private_4k(7)
    assert vm.rmp_entry(8) == SHARED  # 4K folio: only this page
    s = vm.stats
    assert (s["rmpupdate"], s["pvalidate"], s["gmem_prepare"], s["psmash"]) == (1, 1, 1, 0)
    # A spurious re-fault and a neighbour fault: no second RMPUPDATE for gfn 7.
    n = mark(vm)
    assert vm.fault(7).ret == Ret.SPURIOUS
    vm.fault(8)
    assert rmp_ops(since(vm, n)) == [("rmpupdate", 8, 1, 1), ("pvalidate", 8, 1, 1)]
    vm.check()


def test_b24_fault_cost_is_exit_handling_alloc_rmpupdate_pvalidate() -> None:
    vm = snp()
    c = vm.costs
    r = vm.fault(7)
    # The exit, KVM's handling and its map step, the host allocation, the RMPUPDATE of gmem
    # prepare and the guest's PVALIDATE.
    assert r.modeled_ns == pytest.approx(
        c.exit_entry_ns
        + c.fault_handling_ns
        + c.fault_map_ns
        + c.host_page_alloc_ns
        + c.rmpupdate_ns
        + c.pvalidate_ns
    )


def test_b24_2m_rmp_entry_only_with_a_2m_folio_and_a_wholly_shared_range() -> None:
    # 2M folio, 2M backing, nothing assigned yet: one 2M RMPUPDATE, a 2M NPT leaf.
    vm = snp(backing="2M", folio="2M")
    r = vm.fault(512 + 3)
    assert r.level == 2
    assert rmp_ops(vm.trace_events()) == [("rmpupdate", 512, 2, 1), ("pvalidate", 512, 2, 1)]
    assert vm.rmp_entry(512 + 100) == entry(True, True, "2M", 512 + 100)
    assert vm.stats["pages_2m"] == 1
    vm.check()
    # Part of the range back to shared: the next prepare in that range is 4K.
    vm.punch_hole(512, 16)
    n = mark(vm)
    assert vm.fault(512).level == 1
    assert rmp_ops(since(vm, n)) == [("rmpupdate", 512, 1, 1), ("pvalidate", 512, 1, 1)]
    assert vm.rmp_entry(512) == private_4k(512)
    vm.check()

    # 4K folio on 2M backing: 4K RMP entries and 4K NPT leaves.
    vm = snp(backing="2M", folio="4K")
    assert vm.fault(515).level == 1
    assert rmp_ops(vm.trace_events()) == [("rmpupdate", 515, 1, 1), ("pvalidate", 515, 1, 1)]
    assert vm.rmp_entry(516) == SHARED
    vm.check()


@pytest.mark.parametrize(
    "zap",
    [
        pytest.param(lambda vm: vm.zap_gfn_range(0, 1024), id="zap_gfn_range"),
        pytest.param(lambda vm: vm.mmu_notifier_invalidate(0, 1024), id="mmu_notifier"),
        pytest.param(lambda vm: vm.zap_all_fast(), id="zap_all_fast"),
        pytest.param(lambda vm: vm.set_memory_attributes(7, 1, private=False), id="to_shared"),
    ],
)
def test_b24_npt_zaps_never_change_the_rmp(zap: Any) -> None:
    vm = snp()
    vm.fault(7)
    vm.fault(9)
    rmp_before = [vm.rmp_entry(g) for g in range(16)]
    n = mark(vm)
    zap(vm)
    assert rmp_ops(since(vm, n)) == []
    assert [vm.rmp_entry(g) for g in range(16)] == rmp_before
    assert vm.spte(7) == SVE  # the NPT entry is gone
    vm.check()
    # Back to private if needed; the re-fault needs neither RMPUPDATE nor PVALIDATE.
    vm.set_memory_attributes(7, 1, private=True)
    n = mark(vm)
    assert vm.fault(7).ret == Ret.FIXED
    assert rmp_ops(since(vm, n)) == []
    assert vm.rmp_entry(7) == private_4k(7)
    vm.check()


def test_b24_punch_hole_frees_to_shared_psmashing_a_partly_freed_2m_entry() -> None:
    vm = snp(backing="2M", folio="2M")
    vm.fault(512 + 3)
    n = mark(vm)
    assert vm.punch_hole(512, 16) == 1  # the 2M NPT leaf
    # PSMASH first, then one RMPUPDATE to shared per freed 4K page.
    ops = rmp_ops(since(vm, n))
    assert ops == [("psmash", 512, 2, 0)] + [("rmpupdate", g, 1, 0) for g in range(512, 528)]
    assert [vm.rmp_entry(g) for g in range(512, 528)] == [SHARED] * 16
    # The rest of the former 2M entry stays private, validated, now 4K.
    assert vm.rmp_entry(512 + 16) == private_4k(512 + 16)
    assert vm.rmp_entry(1023) == private_4k(1023)
    s = vm.stats
    assert (s["psmash"], s["rmpupdate"], s["gmem_invalidate"], s["rmp_failures"]) == (1, 17, 1, 0)
    vm.check()
    # Freeing a whole 2M entry converts it at once, without PSMASH.
    vm.fault(2048)
    n = mark(vm)
    vm.punch_hole(2048, 512)
    assert rmp_ops(since(vm, n)) == [("rmpupdate", 2048, 2, 0)]
    assert vm.rmp_entry(2048 + 7) == SHARED
    vm.check()


def test_b24_rmp_size_mismatch_fault_psmashes_and_zaps_512() -> None:
    vm = snp(backing="2M", folio="2M")
    vm.fault(0)
    vm.fault(600)  # another 2M, must survive
    assert vm.walk(5)[-1][0] == 2
    n = mark(vm)
    vm.rmp_fault(5)
    assert rmp_ops(since(vm, n)) == [("psmash", 0, 2, 0)]
    assert vm.rmp_entry(5) == private_4k(5)
    assert vm.walk(5)[-1] == (2, SVE)  # the whole 2M gfn range was zapped
    assert spte.is_shadow_present(vm.spte(600))
    s = vm.stats
    assert (s["psmash"], s["rmp_faults"], s["pages_2m"], s["remote_tlb_flush"]) == (1, 1, 1, 1)
    vm.check()
    # An entry that is already 4K is tolerated (no second PSMASH); the range is zapped again.
    vm.fault(6)
    n = mark(vm)
    vm.rmp_fault(5)
    assert rmp_ops(since(vm, n)) == []
    assert vm.spte(6) == SVE and vm.stats["psmash"] == 1
    # The NPT is rebuilt at the RMP's size, with no RMP work.
    n = mark(vm)
    assert vm.fault(5).level == 1
    assert rmp_ops(since(vm, n)) == []
    vm.check()


# ----- PVALIDATE ---------------------------------------------------------------------------------


def test_pvalidate_double_validation_and_rescind() -> None:
    vm = snp()
    vm.fault(3)
    assert vm.pvalidate(3) == {"NO_UPDATE": 1}
    assert vm.stats["pvalidate_errors"] == 1
    assert vm.pvalidate(3, validate=False) == {"SUCCESS": 1}
    assert vm.rmp_entry(3) == entry(True, False, "4K", 3)
    assert vm.pvalidate(3, validate=False) == {"NO_UPDATE": 1}
    assert vm.pvalidate(3) == {"SUCCESS": 1}
    assert vm.rmp_entry(3) == private_4k(3)
    s = vm.stats
    assert (s["pvalidate"], s["pvalidate_errors"]) == (5, 2)
    vm.check()


def test_pvalidate_size_must_match_the_rmp_entry() -> None:
    vm = snp(backing="2M", folio="2M")
    vm.fault(0)
    assert vm.pvalidate(0, 512, size_2m=True) == {"NO_UPDATE": 1}
    assert vm.pvalidate(7) == {"FAIL_SIZEMISMATCH": 1}
    vm.rmp_fault(7)  # PSMASH: now 4K entries, still validated
    assert vm.pvalidate(7) == {"NO_UPDATE": 1}
    assert vm.pvalidate(0, 512, size_2m=True) == {"FAIL_SIZEMISMATCH": 1}
    assert vm.pvalidate(8, 4, validate=False) == {"SUCCESS": 4}
    vm.check()


def test_converted_pages_must_be_validated_again() -> None:
    vm = snp()
    vm.fault(3)
    # private -> shared: zap + free the guest_memfd page (RMP back to shared) ...
    vm.set_memory_attributes(3, 1, private=False)
    n = mark(vm)
    vm.punch_hole(3, 1)
    assert rmp_ops(since(vm, n)) == [("rmpupdate", 3, 1, 0)]
    assert vm.rmp_entry(3) == SHARED
    with pytest.raises(tdpmmu.ConfigError, match="gfn"):
        vm.pvalidate(3)  # not assigned any more
    # ... -> private: prepare again, and the guest validates again.
    vm.set_memory_attributes(3, 1, private=True)
    n = mark(vm)
    vm.fault(3)
    assert rmp_ops(since(vm, n)) == [("rmpupdate", 3, 1, 1), ("pvalidate", 3, 1, 1)]
    assert vm.rmp_entry(3) == private_4k(3)
    s = vm.stats
    assert (s["rmpupdate"], s["pvalidate"], s["pvalidate_errors"]) == (3, 2, 0)
    vm.check()


# ----- hook designs on SNP -----------------------------------------------------------------------


def test_designs_differ_on_a_private_zap_and_refault() -> None:
    # A private NPT zap (attribute conversion to shared), back to private, re-fault.
    deltas = {}
    traces = {}
    for design in ("gmem", "private"):
        vm = snp(hooks=design)
        assert vm.hooks_name == design
        vm.fault(9)
        n = mark(vm)
        assert vm.set_memory_attributes(9, 1, private=False) == 1
        vm.set_memory_attributes(9, 1, private=True)
        assert vm.fault(9).ret == Ret.FIXED
        deltas[design] = Counter(e.op for e in since(vm, n) if e.op in RMP_OPS)
        traces[design] = [(e.op, e.gfn, e.level) for e in since(vm, n)]
        assert vm.rmp_entry(9) == private_4k(9)
        vm.check()
    assert deltas["gmem"] == Counter()  # the NPT zap leaves the RMP alone
    assert traces["gmem"] == []  # no hook either
    # "private": RMPUPDATE to shared with the zap, to private with the install, and the guest
    # validates again; each RMPUPDATE runs inside the hook that is traced just before it.
    assert deltas["private"] == Counter({"rmpupdate": 2, "pvalidate": 1})
    assert traces["private"] == [
        ("remove_external_spte", 9, 1),
        ("rmpupdate", 9, 1),
        ("set_external_spte", 9, 1),
        ("rmpupdate", 9, 1),
        ("pvalidate", 9, 1),
    ]


def test_private_design_drives_the_rmp_from_npt_installs() -> None:
    vm = snp(hooks="private")
    vm.fault(9)
    s = vm.stats
    # No guest_memfd prepare: the NPT install's set_external_spte does the RMPUPDATE.
    assert (s["gmem_prepare"], s["set_external_spte"], s["rmpupdate"]) == (0, 1, 1)
    # Hook calls are counted where KVM dispatches them, whatever the backend does with them:
    # the three private NPT tables linked on the way down are link_external_spt calls too.
    assert s["link_external_spt"] == 3
    ev = vm.trace_events()
    assert rmp_ops(ev) == [("rmpupdate", 9, 1, 1), ("pvalidate", 9, 1, 1)]
    # The hook calls are traced, with the NPT leaf the last one installs.
    assert [(e.op, e.gfn, e.level) for e in ev] == [
        ("link_external_spt", 0, 4),
        ("link_external_spt", 0, 3),
        ("link_external_spt", 0, 2),
        ("set_external_spte", 9, 1),
        ("rmpupdate", 9, 1),
        ("pvalidate", 9, 1),
    ]
    assert ev[3].detail == vm.spte(9)
    # Both designs agree on faults: same RMP entry, same NPT.
    ref = snp()
    ref.fault(9)
    assert vm.rmp_entry(9) == ref.rmp_entry(9)
    assert vm.walk(9) == ref.walk(9)
    vm.check()


def test_private_design_bugs_the_vm_on_an_unflagged_zap() -> None:
    # kvm_zap_gfn_range carries no private flag: under "private" the RMP is not told, so the
    # re-fault's RMPUPDATE finds the page still assigned and the VM is bugged.
    vm = snp(hooks="private")
    vm.fault(9)
    n = mark(vm)
    vm.zap_gfn_range(9, 1)
    assert since(vm, n) == []  # no hook, no RMPUPDATE
    assert vm.rmp_entry(9) == private_4k(9)
    with pytest.raises(VmBugged):
        vm.fault(9)
    assert vm.bugged
    with pytest.raises(VmBugged):
        vm.fault(10)
    with pytest.raises(VmBugged):
        vm.check()
    # Under "gmem" the same sequence is fine.
    g = snp()
    g.fault(9)
    g.zap_gfn_range(9, 1)
    assert g.fault(9).ret == Ret.FIXED
    g.check()


def test_private_design_traces_its_hooks_on_every_flagged_removal() -> None:
    vm = snp(hooks="private")
    for g in (9, 10):
        vm.fault(g)
    leaf = {g: vm.spte(g) for g in (9, 10)}
    # guest_memfd punch hole (PRIVATE filter): the remove hook with the old leaf, then the
    # RMPUPDATE to shared of that gfn.
    n = mark(vm)
    assert vm.punch_hole(9, 1) == 1
    ev = since(vm, n)
    assert [(e.op, e.gfn, e.level, e.detail) for e in ev] == [
        ("remove_external_spte", 9, 1, leaf[9]),
        ("rmpupdate", 9, 1, 0),
    ]
    assert vm.rmp_entry(9) == SHARED
    vm.check()
    # destroy: guest_memfd release removes the rest the same way.
    n = mark(vm)
    vm.destroy()
    assert [(e.op, e.gfn, e.level, e.detail) for e in since(vm, n)] == [
        ("remove_external_spte", 10, 1, leaf[10]),
        ("rmpupdate", 10, 1, 0),
    ]
    s = vm.stats
    assert (s["set_external_spte"], s["remove_external_spte"], s["rmpupdate"]) == (2, 2, 4)
    vm.check()  # the teardown audit: the RMP is all shared again


def test_rmpupdates_to_shared_at_destroy_carry_their_gfns() -> None:
    vm = snp(backing="2M", folio="2M")
    vm.fault(3)  # a 2M RMP entry at gfn 0
    vm.fault(1024 + 7)  # a 2M RMP entry at gfn 1024 ...
    vm.punch_hole(1024, 4)  # ... PSMASHed; 1024-1027 go back to shared now
    n = mark(vm)
    vm.destroy()
    # guest_memfd release: the whole 2M entry at once, then each remaining 4K entry.
    assert rmp_ops(since(vm, n)) == [
        ("rmpupdate", 0, 2, 0),
        *[("rmpupdate", g, 1, 0) for g in range(1028, 1536)],
    ]
    vm.check()  # the teardown audit: the RMP is all shared again


# ----- conversion requests -----------------------------------------------------------------------


@pytest.mark.parametrize("vm_type", ["snp", "sw_protected"])
@pytest.mark.parametrize(
    ("gfn", "npages", "splits"),
    [
        pytest.param(3, 1, 1, id="inside-one-folio"),
        pytest.param(512, 512, 0, id="one-whole-folio"),
        pytest.param(4096, 1024, 0, id="two-whole-folios"),
        pytest.param(1024 + 5, 10, 1, id="both-edges-in-one-folio"),
        pytest.param(2048 + 500, 100, 2, id="edges-in-two-folios"),
        pytest.param(8192 + 1, 511, 1, id="start-edge-only"),
        pytest.param(8704, 600, 1, id="end-edge-only"),
    ],
)
def test_conversion_request_charges_with_2m_folios(
    vm_type: str, gfn: int, npages: int, splits: int
) -> None:
    # One request (psc_exit_ns + gmem_convert_ns) per call; with 2M folios, one split
    # (gmem_split_2m_ns) per folio the call converts only partly. Nothing is mapped: no zap cost.
    vm = tdpmmu.VM(vm_type, memory="1GiB", backing="2M", folio="2M")
    c = vm.costs
    s0 = vm.stats
    assert vm.set_memory_attributes(gfn, npages, private=False) == 0
    d = vm.stats - s0
    assert (d["conversions"], d["gmem_splits"]) == (1, splits)
    assert d["modeled_ns"] == pytest.approx(
        c.psc_exit_ns + c.gmem_convert_ns + splits * c.gmem_split_2m_ns
    )
    # The way back is a request too, splitting at the same edges.
    s0 = vm.stats
    assert vm.set_memory_attributes(gfn, npages, private=True) == 0
    d = vm.stats - s0
    assert (d["conversions"], d["gmem_splits"]) == (1, splits)


def test_conversion_requests_on_snp_are_charged_by_the_engine() -> None:
    vm = snp()
    c = vm.costs
    request = c.psc_exit_ns + c.gmem_convert_ns
    vm.fault(7)
    # Private -> shared: the request, the NPT leaf zap (one SPTE write, one flush); the RMP is
    # left to guest_memfd. No split with 4K folios, however the range is cut.
    s0 = vm.stats
    assert vm.set_memory_attributes(7, 1, private=False) == 1
    d = vm.stats - s0
    assert (d["conversions"], d["gmem_splits"], d["rmpupdate"]) == (1, 0, 0)
    assert d["modeled_ns"] == pytest.approx(
        request + c.spte_update_ns + c.tlb_flush_base_ns + c.tlb_flush_per_vcpu_ns
    )
    # Nothing to change: no request.
    s0 = vm.stats
    assert vm.set_memory_attributes(7, 1, private=False) == 0
    d = vm.stats - s0
    assert (d["conversions"], d["modeled_ns"]) == (0, 0)
    assert vm.set_memory_attributes(0, 16, private=True) == 0
    s0 = vm.stats
    assert vm.set_memory_attributes(0, 16, private=True) == 0
    assert (vm.stats - s0)["conversions"] == 0
    # Memory outside guest_memfd: still a request, never a folio split.
    big = snp(backing="2M", folio="2M")
    big.add_memslot(1 << 20, 1024, gmem=False)
    s0 = big.stats
    assert big.set_memory_attributes((1 << 20) + 3, 1, private=True) == 0
    d = big.stats - s0
    assert (d["conversions"], d["gmem_splits"], d["modeled_ns"]) == (1, 0, request)
    assert vm.stats["conversions"] == 2


# ----- SNP parts of items 5, 8, 14 -------------------------------------------------------------


@pytest.mark.parametrize("vm_type", ["snp", "sw_protected"])
def test_b05_private_and_shared_faults_share_one_direct_root_without_hooks(vm_type: str) -> None:
    vm = tdpmmu.VM(vm_type, memory="1GiB", trace=True)
    vm.set_memory_attributes(0x101, 1, private=False)
    rp = vm.fault(0x100)
    rs = vm.fault(0x101)
    assert (rp.private, rs.private) == (True, False)
    (root,) = vm.roots()
    assert not root["mirror"] and vm.shared_bit == 0
    assert not any(e.op in HOOKS for e in vm.trace_events())
    assert all(vm.stats[h] == 0 for h in HOOKS)
    # Both leaves hang off the same root: same upper tables, different (private vs host) pfns.
    wp, ws = vm.walk(0x100), vm.walk(0x101)
    assert wp[:3] == ws[:3]
    assert spte.pfn(wp[-1][1]) != spte.pfn(ws[-1][1])
    (_, _, _, _, _, host_pfn) = vm.memslots()[0]
    assert spte.pfn(ws[-1][1]) == host_pfn + 0x101
    assert spte.pfn(wp[-1][1]) != host_pfn + 0x100  # guest_memfd, not the host mapping
    vm.check()


@pytest.mark.parametrize("vm_type", ["snp", "sw_protected"])
def test_b08_mismatch_is_a_memory_fault_and_changes_nothing(vm_type: str) -> None:
    vm = tdpmmu.VM(vm_type, memory="1GiB", trace=True)
    vm.fault(1)
    vm.set_memory_attributes(0x200, 1, private=False)
    tables, stats, n = vm.tables().copy(), vm.stats, mark(vm)
    assert vm.fault(2, private=False).ret == Ret.MEMORY_FAULT
    assert vm.fault(0x200, private=True).ret == Ret.MEMORY_FAULT
    assert np.array_equal(vm.tables(), tables)
    assert since(vm, n) == []
    d = vm.stats - stats
    assert d["pf_memory_fault"] == 2 and d["pf_fixed"] == 0 and d["rmpupdate"] == 0
    vm.check()


def test_b14_every_filter_maps_to_the_single_direct_root_on_snp() -> None:
    vm = snp()
    vm.fault(3)
    # Even the host mm notifier (SHARED filter) zaps the private NPT leaf: non-TDX VMs have
    # only the direct root. The RMP is untouched.
    assert vm.mmu_notifier_invalidate(0, 16) == 1
    assert vm.spte(3) == SVE
    assert vm.rmp_entry(3) == private_4k(3)
    vm.check()


# ----- SW_PROTECTED_VM (no mirror) ---------------------------------------------------------------


def test_sw_protected_conversion_zaps_and_refaults() -> None:
    vm = tdpmmu.VM("sw_protected", memory="1GiB", backing="2M", folio="2M", trace=True)
    assert vm.hooks_name == "none"
    r = vm.fault(1)
    assert (r.ret, r.level, r.private) == (Ret.FIXED, 2, True)
    assert vm.fault(1, private=False).ret == Ret.MEMORY_FAULT
    # Conversion to shared zaps the private 2M leaf; the shared re-fault maps the host page.
    assert vm.set_memory_attributes(0, 512, private=False) == 1
    assert vm.spte(1) == SVE
    rs = vm.fault(1)
    assert (rs.ret, rs.level, rs.private) == (Ret.FIXED, 2, False)
    assert spte.pfn(rs.spte) != spte.pfn(r.spte)
    # And back: the shared leaf is zapped, the private re-fault maps guest_memfd again.
    assert vm.set_memory_attributes(0, 512, private=True) == 1
    assert vm.fault(1).spte == r.spte
    # No hooks, no RMP, no SEAMCALL.
    assert vm.trace_events() == []
    s = vm.stats
    assert (s["rmpupdate"], s["pvalidate"], s["gmem_prepare"]) == (0, 0, 0)
    with pytest.raises(tdpmmu.ConfigError):
        vm.rmp_entry(1)
    vm.check()


@pytest.mark.parametrize("vm_type", ["snp", "sw_protected"])
def test_b21_mixed_attribute_2m_ranges_map_at_4k(vm_type: str) -> None:
    vm = tdpmmu.VM(vm_type, memory="1GiB", backing="2M", folio="2M")
    vm.set_memory_attributes(512, 1, private=False)
    assert vm.fault(513).level == 1  # private, but the 2M range is mixed
    assert vm.fault(512).level == 1  # shared, likewise
    assert vm.fault(1024 + 1).level == 2  # a uniform private 2M range maps huge
    vm.set_memory_attributes(2048, 512, private=False)
    assert vm.fault(2048 + 9).level == 2  # a uniform shared 2M range maps huge
    # Re-uniting the range lets it map huge again (on SNP the 2M folio got a 2M RMP entry at
    # its first prepare, so the RMP does not cap it either).
    vm.set_memory_attributes(512, 1, private=True)
    vm.zap_gfn_range(512, 512)
    assert vm.fault(514).level == 2
    vm.check()


def test_sw_protected_teardown_has_no_confidential_work() -> None:
    vm = tdpmmu.VM("sw_protected", memory="64MiB", vcpus=2, trace=True)
    for g in range(4):
        vm.fault(g)
    vm.destroy()
    assert vm.trace_events() == []
    assert vm.stats["pages_4k"] == 0 and vm.stats["tdp_mmu_pages"] == 0
