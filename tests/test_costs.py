"""CostModel: defaults, sources, validation, and what one fault costs on the modeled clock."""

import dataclasses
import math

import pytest

import tdpmmu
from tdpmmu import CostModel, Ret
from tdpmmu._core import COST_FIELDS
from tdpmmu.costs import SOURCES

DEFAULTS = {
    "exit_entry_ns": 1200.0,
    "fault_handling_ns": 2000.0,
    "host_page_alloc_ns": 7500.0,
    "host_zero_4k_ns": 1000.0,
    "tlb_flush_base_ns": 1000.0,
    "tlb_flush_per_vcpu_ns": 200.0,
    "spte_update_ns": 60.0,
}


def test_defaults() -> None:
    # The default-VM rows of costs.md §6; TDX/SNP fields are checked in their own tests.
    d = CostModel().to_dict()
    assert {k: d[k] for k in DEFAULTS} == DEFAULTS
    assert d["td_exit_entry_ns"] == 2000.0  # §6 'TD exit + TDH.VP.ENTER round trip'
    assert d["tdh_mem_page_aug_ns"] == 1000.0  # §6 'TDH.MEM.PAGE.AUG (4 KiB)'
    assert d["tdh_phymem_page_reclaim_ns"] + d["page_clear_ns"] == 5000.0  # §6 teardown row


def test_python_defaults_are_the_engine_defaults() -> None:
    # A VM built with costs={} uses the engine's own defaults: same modeled time for the
    # same work as one built with CostModel() passed explicitly.
    a = tdpmmu._core.Vm("default", 1 << 30, 1, 4, 4096, "none", {}, 0, False, False, True)
    b = tdpmmu.VM(memory="1GiB")
    assert a.fault(3).modeled_ns == b.fault(3).modeled_ns


def test_fields_match_native() -> None:
    assert set(CostModel.field_names()) == set(COST_FIELDS)


def test_every_field_has_a_source() -> None:
    assert set(SOURCES) == set(CostModel.field_names())
    for name, text in SOURCES.items():
        assert "costs.md" in text, name


def test_frozen_and_replace() -> None:
    c = CostModel()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.exit_entry_ns = 1.0  # type: ignore[misc]
    d = c.replace(exit_entry_ns=500, spte_update_ns=0)
    assert (d.exit_entry_ns, d.spte_update_ns) == (500, 0)
    assert c.exit_entry_ns == 1200.0
    with pytest.raises(tdpmmu.ConfigError, match="bogus_ns"):
        c.replace(bogus_ns=1.0)


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf, -math.inf])
def test_validation_rejects_non_finite_and_negative(bad: float) -> None:
    with pytest.raises(tdpmmu.ConfigError, match="fault_handling_ns"):
        CostModel(fault_handling_ns=bad)


@pytest.mark.parametrize("bad", ["1", None, True])
def test_validation_rejects_non_numbers(bad: object) -> None:
    with pytest.raises(tdpmmu.ConfigError, match="tlb_flush_base_ns"):
        CostModel(tlb_flush_base_ns=bad)  # type: ignore[arg-type]


def test_zero_costs_are_allowed() -> None:
    zero = CostModel(**dict.fromkeys(CostModel.field_names(), 0.0))
    vm = tdpmmu.VM(memory="4MiB", costs=zero)
    assert vm.fault(0).modeled_ns == 0.0


def test_first_touch_4k_fault_cost_is_exact() -> None:
    c = CostModel()
    vm = tdpmmu.VM(memory="64MiB")
    r = vm.fault(10)
    assert r.ret is Ret.FIXED
    expected = c.exit_entry_ns + c.fault_handling_ns + c.host_page_alloc_ns
    assert r.modeled_ns == expected
    assert vm.stats["modeled_ns"] == expected
    # A spurious fault is an exit and handling, no allocation.
    assert vm.fault(10).modeled_ns == c.exit_entry_ns + c.fault_handling_ns


def test_first_touch_2m_backing_zeroes_the_rest() -> None:
    c = CostModel()
    vm = tdpmmu.VM(memory="64MiB", backing="2M")
    r = vm.fault(3)
    assert r.level == 2
    assert r.modeled_ns == (
        c.exit_entry_ns + c.fault_handling_ns + c.host_page_alloc_ns + 511 * c.host_zero_4k_ns
    )


def test_custom_costs_change_the_modeled_time() -> None:
    c = CostModel(exit_entry_ns=100.0, fault_handling_ns=20.0, host_page_alloc_ns=3.0)
    vm = tdpmmu.VM(memory="64MiB", costs=c)
    assert vm.costs is c
    assert vm.fault(10).modeled_ns == 123.0


def test_zap_charges_spte_updates_and_flush() -> None:
    c = CostModel()
    vm = tdpmmu.VM(memory="64MiB", vcpus=4)
    for g in range(8):
        vm.fault(g)
    before = vm.stats["modeled_ns"]
    assert vm.zap_gfn_range(0, 8) == 8
    flush = c.tlb_flush_base_ns + 4 * c.tlb_flush_per_vcpu_ns
    assert vm.stats["remote_tlb_flush"] == 1
    assert vm.stats["modeled_ns"] - before == pytest.approx(8 * c.spte_update_ns + flush)
