"""Dirty logging, the fast page fault, aging, eager splitting and huge-page recovery from
Python: what each call does to the tables, the bitmap, the counters and the modeled clock, and
what it refuses (naming the argument, leaving the VM unchanged). The engine-level rules are
also tested in rust/tdpmmu-core/tests/dirty.rs; the differential test checks the reference
agrees."""

import numpy as np
import pytest

import tdpmmu
from tdpmmu import spte

PAGES = 4096  # 16 MiB


def pages_set(words: np.ndarray) -> np.ndarray:
    """The page numbers whose bit is set in a KVM-layout bitmap of uint64 words."""
    return np.flatnonzero(np.unpackbits(words.view(np.uint8), bitorder="little"))


def writes(vm: tdpmmu.VM, pages: int, vcpus: int = 1) -> None:
    """The guest writes every page once (memstress on real threads)."""
    vm.run_memstress(vcpus, pages // vcpus, 0, False, False, 100, 0)


def test_a_dirty_log_pass_write_protects_redirties_and_reports_each_page_once() -> None:
    vm = tdpmmu.VM(memory=PAGES * 4096, vcpus=2)
    writes(vm, PAGES)
    assert vm.set_dirty_logging(0, True) == PAGES
    before = dict(vm.stats)
    # The guest dirties every other page: each write exits once and is fixed without the lock.
    vm.run_memstress(1, PAGES // 2, 0, False, False, 100, 0)
    s = vm.stats
    fast = s["pf_fast"] - before["pf_fast"]
    assert fast == PAGES // 2 == s["pf_fixed"] - before["pf_fixed"]
    assert s["remote_tlb_flush"] == before["remote_tlb_flush"], "the fast path does not flush"
    c = vm.costs
    modeled = s["modeled_ns"] - before["modeled_ns"]
    assert modeled == pytest.approx(fast * (c.exit_entry_ns + c.fast_fix_ns))
    log = vm.get_dirty_log(0)
    assert log.dtype == np.uint64 and len(log) == PAGES // 64
    assert list(pages_set(log)) == list(range(PAGES // 2))
    vm.check()
    # GET took the bits and protected those pages again: the next pass faults again.
    assert not vm.get_dirty_log(0).any()
    assert spte.decode(vm.spte(7))["writable"] is False
    vm.run_memstress(1, 64, 0, False, False, 100, 0)
    assert list(pages_set(vm.get_dirty_log(0))) == list(range(64))
    vm.check()


def test_manual_protect_get_copies_and_clear_rearms() -> None:
    vm = tdpmmu.VM(memory=PAGES * 4096)
    writes(vm, PAGES)
    assert vm.set_dirty_logging(0, True, manual_protect=True, initially_set=True) == 0
    log = vm.get_dirty_log(0)
    assert len(pages_set(log)) == PAGES, "initially set"
    assert (vm.get_dirty_log(0) == log).all(), "GET does not clear with manual protection"
    assert vm.clear_dirty_log(0, 128, 256) == 256
    left = pages_set(vm.get_dirty_log(0))
    assert 128 not in left and 383 not in left and 384 in left and 0 in left
    assert spte.decode(vm.spte(200))["writable"] is False
    assert spte.decode(vm.spte(500))["writable"] is True
    vm.fault(200)
    assert 200 in pages_set(vm.get_dirty_log(0))
    vm.check()


def test_logging_maps_4k_and_stopping_recovers_huge_pages() -> None:
    vm = tdpmmu.VM(memory="64MiB", backing="2M")
    vm.populate(0, 4096)
    assert vm.stats["pages_2m"] == 8
    vm.set_dirty_logging(0, True)
    assert (vm.stats["pages_2m"], vm.stats["pages_4k"]) == (0, 4096)
    assert vm.stats["huge_page_splits"] == 8
    assert vm.fault(9000).level == 1
    vm.check()
    # The 8 split ranges and the range of the one 4K fault: recovery builds the huge leaf
    # from the first present leaf below, as KVM does when the host backing is huge.
    assert vm.set_dirty_logging(0, False) == 9
    assert vm.stats["huge_pages_recovered"] == 9
    assert (vm.stats["pages_2m"], vm.stats["pages_4k"]) == (9, 0)
    assert vm.walk(9000)[-1][0] == 2
    vm.check()


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda vm: vm.set_dirty_logging(5, True), "slot"),
        (lambda vm: vm.set_dirty_logging(0, True, initially_set=True), "initially_set"),
        (lambda vm: vm.get_dirty_log(0), "slot"),
        (lambda vm: vm.clear_dirty_log(0, 0, 64), "slot"),
        (lambda vm: vm.split_huge_pages(0, 512, 3), "target_level"),
        (lambda vm: vm.split_huge_pages(0, 0, 1), "npages"),
        (lambda vm: vm.age_gfn_range(1 << 40, 1), "gfn"),
        (lambda vm: vm.recover_huge_pages(9), "slot"),
    ],
)
def test_bad_calls_name_the_argument_and_change_nothing(call: object, needle: str) -> None:
    vm = tdpmmu.VM(memory="16MiB")
    vm.populate(0, 64)
    before = dict(vm.stats)
    with pytest.raises(tdpmmu.ConfigError, match=needle):
        call(vm)  # type: ignore[operator]
    assert dict(vm.stats) == before
    vm.check()


def test_clear_needs_manual_protect_and_kvm_alignment() -> None:
    vm = tdpmmu.VM(memory="16MiB")
    vm.set_dirty_logging(0, True)
    with pytest.raises(tdpmmu.ConfigError, match="manual_protect"):
        vm.clear_dirty_log(0, 0, 64)
    m = tdpmmu.VM(memory="16MiB")
    m.set_dirty_logging(0, True, manual_protect=True)
    with pytest.raises(tdpmmu.ConfigError, match="first_page"):
        m.clear_dirty_log(0, 1, 64)
    with pytest.raises(tdpmmu.ConfigError, match="npages"):
        m.clear_dirty_log(0, 0, 63)
    assert m.clear_dirty_log(0, PAGES - 64, 64) == 0


@pytest.mark.parametrize("vm_type", ["tdx", "snp", "sw_protected"])
def test_guest_memfd_slots_cannot_log_dirty_pages(vm_type: str) -> None:
    vm = tdpmmu.VM(vm_type, memory="16MiB")
    with pytest.raises(tdpmmu.ConfigError, match="guest_memfd"):
        vm.set_dirty_logging(0, True)


def test_aging_tracks_the_guests_accesses() -> None:
    vm = tdpmmu.VM(memory="16MiB")
    vm.populate(0, 256)  # a pre-fault maps without the Accessed bit
    assert not vm.test_age_gfn(0, 256)
    vm.run_memstress(1, 128, 0, False, False, 0, 0)  # the guest reads half
    assert vm.test_age_gfn(0, 128) and not vm.test_age_gfn(128, 128)
    assert vm.age_gfn_range(0, 256)
    assert vm.stats["sptes_aged"] == 128
    assert not vm.test_age_gfn(0, 256)
    assert spte.decode(vm.spte(3))["accessed"] is False
    vm.check()


def test_write_faults_on_private_memory_never_take_the_fast_path() -> None:
    td = tdpmmu.VM("tdx", memory="16MiB")
    td.finalize()
    td.fault(5, private=True)
    r = td.fault(5, private=True)
    assert td.stats["pf_fast"] == 0
    assert r.ret == tdpmmu.Ret.SPURIOUS


def test_nx_recovery_lets_data_faults_map_huge_again() -> None:
    vm = tdpmmu.VM(memory="1GiB", backing="2M", nx_huge_pages=True)
    for r in range(6):
        assert vm.fault(r * 512 + 7, write=False, exec=True).level == 1
    assert vm.stats["nx_lpage_splits"] == 6
    assert vm.fault(9).level == 1, "the table the exec fault needed stays"
    assert vm.nx_recover(4) == 2  # ceil(6 / 4), oldest first
    assert vm.stats["nx_lpage_splits"] == 4
    assert vm.fault(9).level == 2
    assert vm.fault(1024 + 9).level == 1
    assert vm.nx_recover(0) == 0
    with pytest.raises(tdpmmu.ConfigError, match="ratio"):
        vm.nx_recover(-1)
    vm.check()
    # Tables of a slot that logs dirty pages are only taken off the list.
    vm.set_dirty_logging(0, True)
    left = vm.stats["nx_lpage_splits"]
    assert vm.nx_recover(1) == 0
    assert vm.stats["nx_lpage_splits"] == 0 and left > 0
    vm.check()


def test_read_only_slots_map_without_write_and_emulate_writes() -> None:
    vm = tdpmmu.VM(memory="16MiB")
    ro = vm.add_memslot(1 << 20, 512, readonly=True)
    r = vm.fault((1 << 20) + 3, write=False)
    assert r.ret == tdpmmu.Ret.FIXED
    d = spte.decode(r.spte)
    assert d["writable"] is False and d["dirty"] is False
    r = vm.fault((1 << 20) + 3, write=True)
    assert r.ret == tdpmmu.Ret.EMULATE, "a write to read-only memory exits as MMIO"
    assert vm.stats["pf_emulate"] == 1 and vm.stats["pf_fast"] == 0
    with pytest.raises(tdpmmu.ConfigError, match="read-only"):
        vm.set_dirty_logging(ro, True)
    with pytest.raises(tdpmmu.ConfigError, match="readonly"):
        tdpmmu.VM("tdx", memory="16MiB").add_memslot(1 << 20, 512, readonly=True)
    vm.check()


def test_moving_a_slot_flushes_the_old_range() -> None:
    vm = tdpmmu.VM(memory="16MiB", slot_zap_all=False)
    s = vm.add_memslot(1 << 20, 512)
    vm.populate(1 << 20, 512)
    gen = vm.memslot_generation
    vm.move_memslot(s, 1 << 21)
    assert vm.memslot_generation > gen
    assert vm.stats["pages_4k"] == 0, "the old range's leaves are gone"
    assert next(m for m in vm.memslots() if m[0] == s)[1] == 1 << 21
    assert vm.fault((1 << 21) + 5).ret == tdpmmu.Ret.FIXED
    with pytest.raises(tdpmmu.ConfigError, match="new_gfn"):
        vm.move_memslot(s, 100)  # overlaps slot 0
    with pytest.raises(tdpmmu.ConfigError, match="guest_memfd"):
        td = tdpmmu.VM("snp", memory="16MiB")
        td.move_memslot(0, 1 << 21)
    vm.check()


def test_write_tracking_returns_write_protected() -> None:
    vm = tdpmmu.VM(memory="16MiB", backing="2M")
    vm.populate(0, 512)
    assert vm.write_track_gfn(7) == 1
    assert spte.decode(vm.spte(7))["writable"] is False
    assert vm.fault(7).ret == tdpmmu.Ret.WRITE_PROTECTED
    assert vm.fault(7, write=False).ret == tdpmmu.Ret.SPURIOUS
    assert vm.stats["pf_write_protected"] == 1
    assert vm.write_track_gfn(7, add=False) == 0
    assert vm.fault(7).ret == tdpmmu.Ret.FIXED
    with pytest.raises(tdpmmu.ConfigError, match="not write-tracked"):
        vm.write_track_gfn(7, add=False)
    with pytest.raises(tdpmmu.ConfigError, match="guest_memfd"):
        tdpmmu.VM("snp", memory="16MiB").write_track_gfn(3)
    vm.check()


def test_pml_logs_guest_writes_without_exits() -> None:
    vm = tdpmmu.VM(memory=PAGES * 4096)
    writes(vm, PAGES)
    assert vm.set_dirty_logging(0, True, pml=True) == PAGES
    assert spte.decode(vm.spte(9))["writable"] is True
    assert spte.decode(vm.spte(9))["dirty"] is False
    before = dict(vm.stats)
    writes(vm, 1024)
    s = vm.stats
    assert s["pf_taken"] == before["pf_taken"], "PML logs without exits"
    assert s["pml_logged"] == 1024 and s["pml_full_exits"] == 2
    assert list(pages_set(vm.get_dirty_log(0))) == list(range(1024))
    assert spte.decode(vm.spte(9))["dirty"] is False, "GET re-arms by clearing D"
    vm.check()
