"""The cost ledger: every modeled nanosecond is charged to a named CostModel field, and the
breakdown adds up exactly to the modeled clock."""

import math

import pytest

import tdpmmu
from tdpmmu import config
from tdpmmu._core import WAIT_FIELDS


def _odd_costs() -> tdpmmu.CostModel:
    # Distinct, non-integer values: a charge to the wrong field or a lost unit shows.
    fields = tdpmmu.CostModel.field_names()
    return tdpmmu.CostModel().replace(**{f: 1.1 + 0.37 * i for i, f in enumerate(fields)})


def _exercise(vm: tdpmmu.VM) -> None:
    private = vm.vm_type != "default"
    if vm.vm_type == "tdx":
        vm.populate(0, 8, private=True)
        vm.finalize()
    for g in range(16, 600, 7):
        vm.fault(g, private=private or None)
    if private:
        vm.set_memory_attributes(16, 64, private=False)
        vm.fault(17, private=False)
        vm.set_memory_attributes(16, 64, private=True)
    vm.zap_gfn_range(0, 1024)
    vm.populate(2048, 64)
    vm.destroy()


@pytest.mark.parametrize("variant", config.VARIANTS, ids=lambda v: v.label)
def test_breakdown_sums_exactly_to_modeled_ns(variant: config.Variant) -> None:
    costs = _odd_costs()
    for design in variant.designs:
        vm = tdpmmu.VM(
            variant.vm_type,
            memory="16MiB",
            vcpus=2,
            mirror=variant.mirror,
            hooks=design,
            costs=costs,
        )
        _exercise(vm)
        b = vm.cost_breakdown()
        # Every CostModel field in order, then the wait kinds.
        assert list(b) == [*tdpmmu.CostModel.field_names(), *WAIT_FIELDS]
        # Outside virtual-time runs nothing waits.
        assert all(b[w] == 0.0 for w in WAIT_FIELDS), (variant.label, design)
        total = 0.0
        for v in b.values():
            total += v
        assert total == vm.stats["modeled_ns"], (variant.label, design)
        # Each field's share is a whole number of units of that field.
        for field in tdpmmu.CostModel.field_names():
            ns = b[field]
            units = ns / getattr(costs, field)
            assert math.isclose(units, round(units), abs_tol=1e-6), (field, units)
        assert sum(1 for v in b.values() if v) >= 4


def test_first_touch_fault_is_charged_to_its_fields() -> None:
    vm = tdpmmu.VM(memory="16MiB")
    r = vm.fault(5)
    b = {k: v for k, v in vm.cost_breakdown().items() if v}
    c = vm.costs
    assert b == {
        "exit_entry_ns": c.exit_entry_ns,
        "fault_handling_ns": c.fault_handling_ns,
        "fault_map_ns": c.fault_map_ns,
        "host_page_alloc_ns": c.host_page_alloc_ns,
    }
    assert r.modeled_ns == sum(b.values())


def test_tlb_flush_and_2m_zeroing_are_split_into_their_fields() -> None:
    vm = tdpmmu.VM(memory="16MiB", vcpus=3, backing="2M")
    vm.fault(0)
    b = vm.cost_breakdown()
    assert b["host_zero_4k_ns"] == 511 * vm.costs.host_zero_4k_ns
    vm.zap_gfn_range(0, 512)
    b = vm.cost_breakdown()
    assert b["tlb_flush_base_ns"] == vm.costs.tlb_flush_base_ns
    assert b["tlb_flush_per_vcpu_ns"] == 3 * vm.costs.tlb_flush_per_vcpu_ns
