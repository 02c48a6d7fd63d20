"""EPT A/D bits off (``VM(ad_bits=False)``, KVM's ``enable_ept_ad_bits=0``): A/D-disabled
SPTEs, aging by access tracking, the fast page fault that restores access-tracked SPTEs, what
KVM refuses, the ``VmSpec``/CLI plumbing and ``access_tracking_perf`` with and without A/D.

Each test checks one KVM rule and fails if the model broke it.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

pytest.importorskip("tdpmmu._core")

import tdpmmu
from tdpmmu import spte
from tdpmmu.cli import main
from tdpmmu.reference import ReferenceVM
from tdpmmu.vmspec import VmSpec
from tdpmmu.workloads.access_tracking_perf import access_tracking_perf

MiB = 1 << 20
RWX = 0x7
R, W, X = 1, 2, 4


def vm(**kw: Any) -> tdpmmu.VM:
    return tdpmmu.VM(memory="64MiB", ad_bits=False, **kw)


def modeled(v: Any) -> float:
    return float(v.stats["modeled_ns"])


def test_leaves_and_tables_are_a_d_disabled_and_the_cpu_sets_no_a_d() -> None:
    v = vm()
    assert v.fault(5, write=True).ret == tdpmmu.Ret.FIXED
    for level, e in v.walk(5):
        assert not spte.ad_enabled(int(e)), (level, hex(int(e)))
        assert int(e) & (spte.ACCESSED | spte.DIRTY) == 0, (level, hex(int(e)))
    before = v.spte(5)
    out = v.access_batch(np.array([5, 5], dtype=np.uint64), write=True)
    assert out["faults"] == 0  # the hardware walk hits ...
    assert v.spte(5) == before  # ... and sets neither A nor D
    v.check()
    # With A/D on the same access leaves A and D set on an A/D-enabled leaf.
    on = tdpmmu.VM(memory="64MiB")
    on.fault(5, write=True)
    assert spte.ad_enabled(on.spte(5)) and on.spte(5) & spte.ACCESSED


def test_aging_marks_leaves_access_tracked_at_the_cost_of_a_bit_aging() -> None:
    costs = tdpmmu.CostModel()
    deltas = {}
    for ad in (True, False):
        v = tdpmmu.VM(memory="64MiB", ad_bits=ad)
        v.fault_batch(np.arange(32, dtype=np.uint64), write=True)
        t0 = modeled(v)
        assert v.age_gfn_range(0, 64)
        deltas[ad] = modeled(v) - t0
        assert v.stats["sptes_aged"] == 32
        assert not v.test_age_gfn(0, 64)
        assert not v.age_gfn_range(0, 64), "nothing young is left"
        assert v.stats["sptes_aged"] == 32
        assert v.stats["remote_tlb_flush"] == 0
        v.check()
        if not ad:
            s = v.spte(7)
            assert spte.is_access_tracked(s) and s & RWX == 0
            assert (s >> spte.ACC_TRACK_SAVED_SHIFT) & 0x5 == R | X  # R and X kept, not W
            assert spte.restore_access_tracked(s) & RWX == R | X
            assert spte.pfn(s) == spte.pfn(spte.restore_access_tracked(s))
    assert deltas[True] == deltas[False] == 32 * costs.spte_update_ns


def test_a_read_of_a_tracked_leaf_faults_and_the_fast_path_restores_r_and_x() -> None:
    v = vm()
    v.fault(10, write=True)
    v.fault(11, write=True)
    v.age_gfn_range(0, 16)
    costs = tdpmmu.CostModel()
    f = v.fault(10, write=False)
    assert f.ret == tdpmmu.Ret.FIXED
    assert f.modeled_ns == costs.exit_entry_ns + costs.fast_fix_ns
    assert v.stats["pf_fast"] == 1
    assert v.spte(10) & RWX == R | X  # W is not saved: a write takes another fast fault
    assert v.test_age_gfn(10) and not v.test_age_gfn(11)
    assert v.fault(10, write=True).ret == tdpmmu.Ret.FIXED
    assert v.stats["pf_fast"] == 2 and v.spte(10) & RWX == RWX
    # A write to a tracked, MMU-writable leaf gets R, W and X back in one fast fix.
    assert v.fault(11, write=True).ret == tdpmmu.Ret.FIXED
    assert v.stats["pf_fast"] == 3 and v.spte(11) & RWX == RWX
    # The guest's accesses in a batch: each tracked page faults once, on the fast path.
    v.fault_batch(np.arange(32, 40, dtype=np.uint64), write=False)
    v.age_gfn_range(32, 8)
    out = v.access_batch(np.arange(32, 40, dtype=np.uint64), write=False)
    assert out["faults"] == 8 and v.stats["pf_fast"] == 3 + 8
    v.check()


def test_a_write_the_restored_leaf_does_not_allow_takes_the_slow_path() -> None:
    v = vm()
    v.write_track_gfn(3, True)
    v.fault(3, write=False)  # read-only, not MMU-writable
    v.age_gfn_range(3, 1)
    assert spte.is_access_tracked(v.spte(3))
    f = v.fault(3, write=True)
    assert f.ret == tdpmmu.Ret.WRITE_PROTECTED  # is_access_allowed failed: emulated
    assert v.stats["pf_fast"] == 0
    # A page the host mapped read-only: the slow path's memory-fault exit.
    v.mprotect(0, 512, False)
    v.fault(8, write=False)
    v.age_gfn_range(8, 1)
    assert v.fault(8, write=True).ret == tdpmmu.Ret.MEMORY_FAULT
    assert v.stats["pf_fast"] == 0
    v.check()


def test_a_pre_fault_maps_access_tracked_leaves() -> None:
    v = vm()
    assert v.populate(0, 8) == 8
    assert not v.test_age_gfn(0, 8)
    assert all(spte.is_access_tracked(v.spte(g)) for g in range(8))
    v.check()


def test_dirty_logging_write_protects_and_pml_is_refused() -> None:
    v = vm()
    v.fault_batch(np.arange(64, dtype=np.uint64), write=True)
    stats = dict(v.stats)
    with pytest.raises(tdpmmu.ConfigError, match=r"^pml"):
        v.set_dirty_logging(0, True, pml=True)
    assert dict(v.stats) == stats  # refused: unchanged
    assert v.set_dirty_logging(0, True) == 64
    v.age_gfn_range(0, 64)
    assert v.fault(7, write=True).ret == tdpmmu.Ret.FIXED  # tracked + protected: fast
    assert v.fault(8, write=False).ret == tdpmmu.Ret.FIXED  # a read logs nothing
    log = v.get_dirty_log(0)
    assert int(log[0]) == 1 << 7
    v.check()


@pytest.mark.parametrize(
    ("kw", "why"),
    [
        ({"vm_type": "snp"}, "NPT"),
        ({"vm_type": "tdx"}, "TDX"),
        ({"vm_type": "sw_protected", "mirror": True}, "TDX"),
    ],
)
def test_vm_types_kvm_runs_only_with_a_d_refuse_ad_bits_false(kw: dict[str, Any], why: str) -> None:
    with pytest.raises(tdpmmu.ConfigError, match=rf"^ad_bits: .*{why}"):
        tdpmmu.VM(memory="64MiB", ad_bits=False, **kw)
    with pytest.raises(tdpmmu.ConfigError, match=r"^ad_bits"):
        ReferenceVM(memory="64MiB", ad_bits=False, **kw)
    with pytest.raises(tdpmmu.ConfigError, match=r"^ad_bits"):
        VmSpec.create(memory="64MiB", ad_bits=False, **kw)
    tdpmmu.VM(memory="64MiB", ad_bits=True, **kw)  # A/D on is fine everywhere


def test_sw_protected_shared_memory_is_access_tracked_too() -> None:
    v = tdpmmu.VM("sw_protected", memory="64MiB", ad_bits=False)
    slot = v.add_memslot(1 << 16, 64, "4K")
    assert slot == 1
    v.fault(1 << 16, write=True)
    assert v.age_gfn_range(1 << 16, 64)
    assert v.fault(1 << 16, write=False).ret == tdpmmu.Ret.FIXED
    assert v.stats["pf_fast"] == 1
    v.check()


def test_check_fails_on_a_malformed_access_tracked_leaf() -> None:
    r = ReferenceVM(memory="64MiB", ad_bits=False)
    r.fault(3, write=True)
    r.age_gfn_range(3, 1)
    r.check()
    _, sp, index = r.tdp_mmu.leaf_ptr(r.tdp_mmu.vcpu_root[0], 3, 0)  # type: ignore[misc]
    good = sp.spt[index]
    sp.spt[index] = good & ~(1 << spte.ACC_TRACK_SAVED_SHIFT)  # the saved R bit lost
    with pytest.raises(tdpmmu.InvariantError):
        r.check()
    sp.spt[index] = spte.restore_access_tracked(good) | spte.ACCESSED  # A on an A/D-off leaf
    with pytest.raises(tdpmmu.InvariantError):
        r.check()
    sp.spt[index] = good
    r.check()


def test_vmspec_carries_ad_bits() -> None:
    s = VmSpec.create(memory="64MiB", ad_bits=False)
    assert s.ad_bits is False and "A/D bits off" in s.describe()
    d = s.to_dict()
    assert d["ad_bits"] is False
    assert VmSpec.from_dict(json.loads(json.dumps(d))) == s
    assert VmSpec.from_dict({k: v for k, v in d.items() if k != "ad_bits"}).ad_bits is True
    assert s.replace(vcpus=2).ad_bits is False
    v = s.build()
    v.fault(1, write=True)
    assert not spte.ad_enabled(v.spte(1))
    with pytest.raises(TypeError, match="ad_bits"):
        VmSpec.create(ad_bits=0)  # type: ignore[arg-type]


def _phases(r: Any) -> dict[str, float]:
    return {k: float(v) for k, v in r.metrics.items() if k.endswith("_time_s")}


def test_access_tracking_perf_idle_writes_take_fast_path_faults_without_a_d() -> None:
    on = access_tracking_perf(vcpus=2, bytes_per_vcpu="4M")
    off = access_tracking_perf(vcpus=2, bytes_per_vcpu="4M", ad_bits=False)
    assert on.ok and off.ok
    pages = 2 * 4 * MiB // 4096
    p_on, p_off = _phases(on), _phases(off)
    # A/D on: the CPU sets A again, no exits; idle memory costs what populated memory does.
    assert p_on["writing_to_idle_memory_time_s"] == p_on["writing_to_populated_memory_time_s"]
    assert on.stats["pf_fast"] == 0
    # A/D off: every idle page takes one access-tracking fault fixed on the fast path.
    assert p_off["writing_to_idle_memory_time_s"] > p_off["writing_to_populated_memory_time_s"]
    assert p_off["reading_from_idle_memory_time_s"] > p_off["reading_from_populated_memory_time_s"]
    assert off.stats["pf_fast"] == 2 * pages
    assert off.stats["sptes_aged"] == on.stats["sptes_aged"] == 2 * pages
    assert off.metrics["still_idle_pages"] == 0
    # Aging costs the same per SPTE either way.
    assert p_off["mark_memory_idle_time_s"] == p_on["mark_memory_idle_time_s"]
    assert off.spec.ad_bits is False


def test_cli_no_ad_bits_runs_access_tracking_perf_without_a_d(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["access-tracking-perf", "-b", "2M", "--no-ad-bits", "--json", "--no-progress"]
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["config"]["vm"]["ad_bits"] is False
    assert doc["result"]["stats"]["pf_fast"] == 2 * 512  # both idle phases fault once a page
    assert main([*argv[:4], "--vm-type", "snp", "--shared-memory", "--no-progress"]) == 2
    assert "ad_bits" in capsys.readouterr().err
