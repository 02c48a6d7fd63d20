"""Bad input to the confidential-VM API (TDX, SEV-SNP, SW_PROTECTED): a clear error that names the
argument, and a VM left exactly as it was (stats, walks, page-table memory, roots, memslots,
RMP entries, trace)."""

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import tdpmmu

PROBES = (0, 1, 5, 0x200, 16383)


def snapshot(vm: tdpmmu.VM) -> dict[str, Any]:
    snap: dict[str, Any] = {
        "stats": vm.stats.to_dict(),
        "walks": [vm.walk(g) for g in PROBES],
        "tables": vm.tables().copy(),
        "roots": vm.roots(),
        "memslots": vm.memslots(),
        "generation": vm.memslot_generation,
        "bugged": vm.bugged,
        "destroyed": vm.destroyed,
        "finalized": vm.finalized,
        "trace": vm.trace_events(),
    }
    if vm.shared_bit:
        snap["private_walks"] = [vm.walk(g, private=True) for g in PROBES]
    if vm.vm_type == "snp":
        snap["rmp"] = [vm.rmp_entry(g) for g in PROBES]
    return snap


def assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert np.array_equal(a.pop("tables"), b.pop("tables"))
    assert a == b


def used(vm_type: str, **kw: Any) -> tdpmmu.VM:
    """A 64 MiB VM of ``vm_type`` with some private and shared state."""
    vm = tdpmmu.VM(vm_type, memory="64MiB", vcpus=2, trace=True, **kw)
    if vm_type == "default":
        vm.fault(1)
        return vm
    if vm_type == "tdx":
        vm.finalize()
    vm.set_memory_attributes(0x200, 16, private=False)
    vm.fault(1)
    vm.fault(5, vcpu=1)
    vm.fault(0x200)
    return vm


def expect_error(
    vm: tdpmmu.VM, call: Callable[[tdpmmu.VM], object], exc: Any, pattern: str
) -> None:
    before = snapshot(vm)
    with pytest.raises(exc, match=pattern):
        call(vm)
    assert_same(before, snapshot(vm))


# ----- private memory on a VM without it ----------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        pytest.param(lambda vm: vm.fault(1, private=True), "private", id="fault"),
        pytest.param(
            lambda vm: vm.fault_batch(np.arange(4, dtype=np.uint64), private=True),
            "private",
            id="fault_batch",
        ),
        pytest.param(lambda vm: vm.populate(0, 4, private=True), "private", id="populate"),
        pytest.param(lambda vm: vm.walk(1, private=True), "private", id="walk"),
        pytest.param(
            lambda vm: vm.set_memory_attributes(0, 4, private=True), "private", id="attributes"
        ),
        pytest.param(
            lambda vm: vm.punch_hole(0, 4), "vm_type: a default VM has no private", id="punch_hole"
        ),
        pytest.param(lambda vm: vm.add_memslot(1 << 20, 8, gmem=True), "gmem", id="gmem_slot"),
        pytest.param(lambda vm: vm.pvalidate(1), "vm_type", id="pvalidate"),
        pytest.param(lambda vm: vm.rmp_fault(1), "vm_type", id="rmp_fault"),
        pytest.param(lambda vm: vm.rmp_entry(1), "gfn", id="rmp_entry"),
        pytest.param(
            lambda vm: vm.finalize(), "vm_type: .*a default VM is not a TD", id="finalize"
        ),
    ],
)
def test_private_operations_on_a_default_vm(call: Any, pattern: str) -> None:
    expect_error(used("default"), call, tdpmmu.ConfigError, pattern)


# ----- conversions outside every memslot ----------------------------------------------------------

OUTSIDE = 1 << 20  # beyond the 64 MiB default memslot (16384 gfns), inside the guest


@pytest.mark.parametrize("vm_type", ["tdx", "snp", "sw_protected"])
@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        pytest.param(
            lambda vm: vm.set_memory_attributes(OUTSIDE, 4, private=False),
            r"gfn.*not in any memslot",
            id="attributes-outside",
        ),
        pytest.param(
            # Straddles the end of slot 0: nothing may change, not even the part inside.
            lambda vm: vm.set_memory_attributes(16380, 8, private=False),
            r"gfn.*not in any memslot",
            id="attributes-straddling",
        ),
        pytest.param(
            lambda vm: vm.punch_hole(OUTSIDE, 4), r"gfn.*not in any memslot", id="punch-outside"
        ),
        pytest.param(
            lambda vm: vm.punch_hole(16380, 8), r"gfn.*not in any memslot", id="punch-straddling"
        ),
        pytest.param(
            lambda vm: vm.set_memory_attributes(1 << 40, 1), "gfn", id="attributes-beyond-guest"
        ),
        pytest.param(lambda vm: vm.punch_hole(0, 0), "npages", id="punch-zero-pages"),
        pytest.param(lambda vm: vm.set_memory_attributes(0, -1), "npages", id="attributes-neg"),
    ],
)
def test_conversion_outside_every_memslot(vm_type: str, call: Any, pattern: str) -> None:
    expect_error(used(vm_type), call, (tdpmmu.ConfigError, ValueError), pattern)


def test_punch_hole_of_a_slot_without_guest_memfd() -> None:
    vm = used("tdx")
    vm.add_memslot(OUTSIDE, 512, gmem=False)
    expect_error(vm, lambda v: v.punch_hole(OUTSIDE, 4), tdpmmu.ConfigError, "guest_memfd")


# ----- TD lifecycle ------------------------------------------------------------------------------


def test_finalize_twice() -> None:
    vm = used("tdx")
    expect_error(vm, lambda v: v.finalize(), tdpmmu.ConfigError, "finalize.*already finalized")


@pytest.mark.parametrize(
    ("vm_type", "kw"),
    [
        ("default", {}),
        ("snp", {}),
        ("sw_protected", {}),
        # The software mirror backend runs from the start: no TD build phase to finalize.
        ("sw_protected", {"mirror": True}),
    ],
)
def test_finalize_on_a_non_tdx_vm(vm_type: str, kw: dict[str, Any]) -> None:
    expect_error(
        used(vm_type, **kw),
        lambda v: v.finalize(),
        tdpmmu.ConfigError,
        rf"vm_type: finalize is a TDX operation; a {vm_type} VM is not a TD",
    )


def test_fault_before_finalize() -> None:
    vm = tdpmmu.VM("tdx", memory="64MiB", trace=True)
    vm.populate(0, 2, private=True)
    expect_error(vm, lambda v: v.fault(1), tdpmmu.ConfigError, "finalize")
    expect_error(
        vm,
        lambda v: v.fault_batch(np.arange(2, dtype=np.uint64)),
        tdpmmu.ConfigError,
        "finalize",
    )


def test_populate_of_a_mixed_range() -> None:
    vm = used("tdx")
    expect_error(vm, lambda v: v.populate(0x1F0, 32), tdpmmu.ConfigError, "private")


def _finalize(vm: tdpmmu.VM) -> None:
    vm.finalize()


MUTATORS: list[Any] = [
    pytest.param(lambda vm: vm.fault(1), id="fault"),
    pytest.param(lambda vm: vm.fault_batch(np.arange(4, dtype=np.uint64)), id="fault_batch"),
    pytest.param(lambda vm: vm.populate(8, 2), id="populate"),
    pytest.param(lambda vm: vm.set_memory_attributes(1, 1, private=False), id="attributes"),
    pytest.param(lambda vm: vm.punch_hole(1, 1), id="punch_hole"),
    pytest.param(_finalize, id="finalize"),
    pytest.param(lambda vm: vm.destroy(), id="destroy"),
    pytest.param(lambda vm: vm.zap_gfn_range(0, 16), id="zap_gfn_range"),
    pytest.param(lambda vm: vm.mmu_notifier_invalidate(0, 16), id="mmu_notifier"),
    pytest.param(lambda vm: vm.zap_all_fast(), id="zap_all_fast"),
    pytest.param(lambda vm: vm.add_memslot(OUTSIDE, 8), id="add_memslot"),
    pytest.param(lambda vm: vm.delete_memslot(0), id="delete_memslot"),
    pytest.param(lambda vm: vm.run_memstress(1, 4, 0, False, False, 100, 0), id="memstress"),
]


@pytest.mark.parametrize("vm_type", ["tdx", "snp"])
@pytest.mark.parametrize("call", MUTATORS)
def test_every_operation_after_destroy(vm_type: str, call: Any) -> None:
    vm = used(vm_type)
    vm.destroy()
    assert vm.destroyed
    pattern = r"vm: the VM was destroyed"
    if vm_type == "snp" and call is _finalize:
        # An SNP VM never had a TD build phase: the VM type is the error, destroyed or not.
        pattern = r"vm_type: finalize is a TDX operation; a snp VM is not a TD"
    expect_error(vm, call, tdpmmu.ConfigError, pattern)


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda vm: vm.pvalidate(1), id="pvalidate"),
        pytest.param(lambda vm: vm.rmp_fault(1), id="rmp_fault"),
    ],
)
def test_snp_operations_after_destroy(call: Any) -> None:
    vm = used("snp")
    vm.destroy()
    expect_error(vm, call, tdpmmu.ConfigError, "destroyed")


@pytest.mark.parametrize("vm_type", ["tdx", "snp"])
def test_check_after_destroy_audits_the_teardown(vm_type: str) -> None:
    # check() is not refused after destroy(): it audits what teardown left (nothing, here) and
    # changes nothing.
    vm = used(vm_type)
    vm.destroy()
    before = snapshot(vm)
    vm.check()
    assert_same(before, snapshot(vm))


def test_inspection_after_destroy_still_works() -> None:
    vm = used("tdx")
    vm.destroy()
    assert vm.roots() == [] and vm.walk(1) == [] and vm.walk(1, private=True) == []
    assert vm.stats["pages_4k"] == 0
    with pytest.raises(ValueError, match="gfn"):
        vm.walk(1 << 40)


# ----- configuration -----------------------------------------------------------------------------

CONFIG_CASES: list[Any] = [
    pytest.param(
        {"vm_type": "tdx", "hooks": "bogus"},
        r"hooks.*allowed: mirror, private",
        id="unknown-design",
    ),
    pytest.param(
        {"vm_type": "snp", "hooks": "mirror"},
        r"hooks.*allowed: gmem, private",
        id="snp-mirror-design",
    ),
    pytest.param(
        {"vm_type": "tdx", "hooks": "gmem"},
        r"hooks.*allowed: mirror, private",
        id="tdx-gmem-design",
    ),
    pytest.param({"vm_type": "tdx", "mirror": True}, "mirror.*sw_protected", id="tdx-mirror"),
    pytest.param({"vm_type": "snp", "mirror": True}, "mirror.*sw_protected", id="snp-mirror"),
    pytest.param({"vm_type": "default", "mirror": True}, "mirror", id="default-mirror"),
    pytest.param(
        {"vm_type": "sw_protected", "hooks": "mirror"}, r"hooks.*mirror=True", id="sw-no-mirror"
    ),
    pytest.param(
        {"vm_type": "sw_protected", "hooks": "private"}, r"hooks.*mirror=True", id="sw-private"
    ),
    pytest.param(
        {"vm_type": "sw_protected", "mirror": True, "hooks": "gmem"}, "hooks", id="sw-mirror-gmem"
    ),
    pytest.param({"vm_type": "default", "hooks": "private"}, "hooks", id="default-private"),
    pytest.param({"vm_type": "snp", "folio": "1G"}, "folio.*4K or 2M", id="folio-1G"),
    pytest.param({"vm_type": "snp", "folio": "8K"}, "folio.*4K or 2M", id="folio-8K"),
    pytest.param({"vm_type": "snp", "folio": 4096 * 3}, "folio.*4K or 2M", id="folio-12K"),
    pytest.param({"vm_type": "snp", "folio": "banana"}, "folio", id="folio-garbage"),
    pytest.param({"vm_type": "tdx", "tdx": {"bogus": 1}}, r"tdx.*unknown option", id="tdx-key"),
    pytest.param(
        {"vm_type": "tdx", "tdx": {"TDH.MEM.PAGE.ACCEPT": 0.5}},
        r"tdx.*unknown option",
        id="busy-not-injectable",
    ),
    pytest.param({"vm_type": "tdx", "tdx": {"version": "6.1"}}, "version.*6.16", id="version"),
    pytest.param({"vm_type": "tdx", "tdx": {"sept_free": "never"}}, "sept_free", id="sept_free"),
    pytest.param({"vm_type": "tdx", "tdx": {"track": "sometimes"}}, "track", id="track"),
    pytest.param({"vm_type": "tdx", "tdx": {"interface": "one"}}, "interface", id="interface"),
    pytest.param({"vm_type": "tdx", "tdx": {"measure": "maybe"}}, "measure", id="measure"),
    pytest.param(
        {"vm_type": "tdx", "tdx": {"TDH.MEM.PAGE.AUG": 1.5}},
        r"TDH\.MEM\.PAGE\.AUG.*\[0, 1\]",
        id="busy>1",
    ),
    pytest.param(
        {"vm_type": "tdx", "tdx": {"TDH.MEM.RANGE.BLOCK": -0.1}},
        r"TDH\.MEM\.RANGE\.BLOCK.*\[0, 1\]",
        id="busy<0",
    ),
    pytest.param(
        {"vm_type": "tdx", "tdx": {"TDH.MEM.TRACK": float("nan")}},
        r"TDH\.MEM\.TRACK.*\[0, 1\]",
        id="busy-nan",
    ),
    pytest.param(
        {"vm_type": "tdx", "tdx": {"TDH.MEM.SEPT.ADD": "often"}},
        r"TDH\.MEM\.SEPT\.ADD.*\[0, 1\]",
        id="busy-text",
    ),
    pytest.param(
        {"vm_type": "tdx", "tdx": {"TDH.MEM.PAGE.REMOVE": True}},
        r"TDH\.MEM\.PAGE\.REMOVE.*\[0, 1\]",
        id="busy-bool",
    ),
]


@pytest.mark.parametrize(("kwargs", "pattern"), CONFIG_CASES)
def test_unsupported_configurations(kwargs: dict[str, Any], pattern: str) -> None:
    with pytest.raises(tdpmmu.ConfigError, match=pattern):
        tdpmmu.VM(memory="64MiB", **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        pytest.param({"vm_type": "tdx", "tdx": [("track", "batched")]}, "tdx", id="tdx-list"),
        pytest.param({"vm_type": "sw_protected", "mirror": 1}, "mirror", id="mirror-int"),
    ],
)
def test_wrongly_typed_options(kwargs: dict[str, Any], pattern: str) -> None:
    with pytest.raises(TypeError, match=pattern):
        tdpmmu.VM(memory="64MiB", **kwargs)


@pytest.mark.parametrize("vm_type", ["default", "snp", "sw_protected"])
@pytest.mark.parametrize(
    "options",
    [
        {"track": "batched"},
        {"sept_free": "sept_remove"},
        {"TDH.MEM.PAGE.AUG": 0.5},
        pytest.param({"track": "per_page"}, id="explicit-default"),
    ],
)
def test_tdx_options_on_a_vm_without_a_td(vm_type: str, options: dict[str, Any]) -> None:
    with pytest.raises(
        tdpmmu.ConfigError,
        match=rf"^tdx: TDX options apply to tdx VMs \(and sw_protected with mirror=True\), "
        rf"not {vm_type}$",
    ):
        tdpmmu.VM(vm_type, memory="64MiB", tdx=options)


def test_tdx_options_on_a_software_mirror_vm_are_accepted() -> None:
    # sw_protected with mirror=True runs the TDX-shaped mirror path: the options apply.
    vm = tdpmmu.VM("sw_protected", mirror=True, memory="64MiB", trace=True)
    two = tdpmmu.VM(
        "sw_protected", mirror=True, memory="64MiB", trace=True, tdx={"interface": "two_hook"}
    )
    for v in (vm, two):
        v.fault(1)
    assert [e.op for e in vm.trace_events()] == ["link_external_spt"] * 3 + ["set_external_spte"]
    assert [e.op for e in two.trace_events()] == ["set_external_spte"] * 4
    # No options at all is not an error on any VM type.
    for vm_type in ("default", "snp", "sw_protected"):
        tdpmmu.VM(vm_type, memory="64MiB", tdx={})


# ----- SNP guest instructions --------------------------------------------------------------------


def test_validation_of_an_unassigned_page() -> None:
    vm = used("snp")
    expect_error(vm, lambda v: v.pvalidate(7), tdpmmu.ConfigError, r"gfn.*not assigned")
    # A range with one unassigned page is rejected as a whole: the assigned one is untouched.
    expect_error(vm, lambda v: v.pvalidate(4, 3, validate=False), tdpmmu.ConfigError, "gfn 0x4")
    assert vm.rmp_entry(5)["validated"]


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        pytest.param(
            lambda vm: vm.pvalidate(1, 512, size_2m=True), "2M-aligned", id="2m-unaligned"
        ),
        pytest.param(
            lambda vm: vm.pvalidate(0, 100, size_2m=True),
            r"npages: 2M PVALIDATE needs a multiple of 512",
            id="2m-partial",
        ),
        pytest.param(lambda vm: vm.pvalidate(OUTSIDE), "gfn.*guest_memfd", id="pvalidate-outside"),
        pytest.param(lambda vm: vm.pvalidate(1, 0), "npages", id="pvalidate-zero"),
        pytest.param(lambda vm: vm.rmp_fault(OUTSIDE), "gfn.*guest_memfd", id="rmp-fault-outside"),
        pytest.param(lambda vm: vm.rmp_entry(OUTSIDE), "gfn.*RMP", id="rmp-entry-outside"),
        pytest.param(lambda vm: vm.rmp_fault(1 << 40), "gfn", id="rmp-fault-beyond"),
    ],
)
def test_bad_snp_instruction_arguments(call: Any, pattern: str) -> None:
    expect_error(used("snp"), call, (tdpmmu.ConfigError, ValueError), pattern)


@pytest.mark.parametrize("vm_type", ["tdx", "sw_protected"])
@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda vm: vm.pvalidate(1), id="pvalidate"),
        pytest.param(lambda vm: vm.rmp_fault(1), id="rmp_fault"),
    ],
)
def test_snp_instructions_on_other_confidential_vms(vm_type: str, call: Any) -> None:
    expect_error(used(vm_type), call, tdpmmu.ConfigError, "vm_type.*SEV-SNP")
