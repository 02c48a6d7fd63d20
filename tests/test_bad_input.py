"""Bad input at every public entry point: a clear error naming the argument, VM unchanged."""

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import tdpmmu

PROBES = (0, 5, 63, 5000, 16383, 16384)


@pytest.fixture
def used_vm() -> tdpmmu.VM:
    """A 64 MiB, 2-vCPU VM with some state: gfns 0..63 and 5000 mapped, one extra memslot."""
    vm = tdpmmu.VM(memory="64MiB", vcpus=2)
    vm.fault_batch(np.arange(64, dtype=np.uint64))
    vm.fault(5000, vcpu=1)
    vm.add_memslot(1 << 20, 512, backing="2M")
    return vm


def snapshot(vm: tdpmmu.VM) -> dict[str, Any]:
    return {
        "stats": vm.stats.to_dict(),
        "walks": [vm.walk(g) for g in PROBES],
        "tables": vm.tables().copy(),
        "memslots": vm.memslots(),
        "generation": vm.memslot_generation,
        "roots": vm.roots(),
        "bugged": vm.bugged,
    }


def assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert np.array_equal(a.pop("tables"), b.pop("tables"))
    assert a == b


U64 = np.uint64
TOP = 16384  # first gfn past the default memslot of a 64 MiB VM


def case(name: str, *values: Any) -> Any:
    """One parametrized case: (call or kwargs, exception types, regex naming the argument).

    The regex is matched against the message and its notes: PyO3's own conversion errors
    (float for int, 1 << 200) name the argument in a note ("while processing 'gfn'").
    """
    return pytest.param(*values, id=name)


VM_CASES: list[Any] = [
    case("fault-gfn-beyond-guest", lambda vm: vm.fault(vm.max_gfn), ValueError, "gfn"),
    case("fault-gfn-2**64", lambda vm: vm.fault(1 << 64), ValueError, "gfn"),
    case(
        "fault-gfn-huge",
        lambda vm: vm.fault(1 << 200),
        (ValueError, OverflowError),
        "gfn",
    ),
    case("fault-gfn-negative", lambda vm: vm.fault(-1), ValueError, "gfn"),
    case("fault-gfn-float", lambda vm: vm.fault(1.5), TypeError, "gfn"),
    case("fault-vcpu-too-big", lambda vm: vm.fault(0, vcpu=2), ValueError, "vcpu"),
    case("fault-vcpu-negative", lambda vm: vm.fault(0, vcpu=-1), ValueError, "vcpu"),
    case("fault-private-on-default", lambda vm: vm.fault(7, private=True), ValueError, "private"),
    case(
        "fault-private-not-bool",
        lambda vm: vm.fault(7, private=1),
        TypeError,
        "private",
    ),
    case("batch-float64", lambda vm: vm.fault_batch(np.zeros(4)), TypeError, "gfns"),
    case(
        "batch-int64-negative",
        lambda vm: vm.fault_batch(np.array([100, -3, 101])),
        tdpmmu.ConfigError,
        r"gfns\[1\] = -3",
    ),
    case("batch-2d", lambda vm: vm.fault_batch(np.zeros((2, 2), dtype=U64)), TypeError, "gfns"),
    case("batch-list", lambda vm: vm.fault_batch([100, 101]), TypeError, "gfns"),
    case(
        # The good gfns before the bad one must not be faulted either.
        "batch-one-gfn-beyond",
        lambda vm: vm.fault_batch(np.array([100, 101, 1 << 40], dtype=U64)),
        ValueError,
        "gfns",
    ),
    case(
        "batch-vcpu",
        lambda vm: vm.fault_batch(np.arange(100, 104, dtype=U64), vcpu=9),
        ValueError,
        "vcpu",
    ),
    case(
        "batch-private-on-default",
        lambda vm: vm.fault_batch(np.arange(100, 104, dtype=U64), private=True),
        ValueError,
        "private",
    ),
    case("populate-npages-zero", lambda vm: vm.populate(100, 0), ValueError, "npages"),
    case("populate-npages-negative", lambda vm: vm.populate(100, -3), ValueError, "npages"),
    case("populate-npages-huge", lambda vm: vm.populate(100, 1 << 62), ValueError, "npages"),
    case("populate-gfn-beyond", lambda vm: vm.populate(vm.max_gfn, 1), ValueError, "gfn"),
    case(
        "populate-past-limit", lambda vm: vm.populate(vm.max_gfn - 1, 2), ValueError, "gfn|npages"
    ),
    case("populate-not-in-memslot", lambda vm: vm.populate(TOP - 2, 4), ValueError, "gfn"),
    case("populate-private", lambda vm: vm.populate(100, 4, private=True), ValueError, "private"),
    case("zap-npages-zero", lambda vm: vm.zap_gfn_range(0, 0), ValueError, "npages"),
    case("zap-npages-negative", lambda vm: vm.zap_gfn_range(0, -1), ValueError, "npages"),
    case("zap-npages-huge", lambda vm: vm.zap_gfn_range(0, 1 << 62), ValueError, "npages"),
    case("zap-gfn-beyond", lambda vm: vm.zap_gfn_range(vm.max_gfn, 1), ValueError, "gfn"),
    case("zap-gfn-negative", lambda vm: vm.zap_gfn_range(-1, 1), ValueError, "gfn"),
    case("notifier-npages-zero", lambda vm: vm.mmu_notifier_invalidate(0, 0), ValueError, "npages"),
    case(
        "notifier-gfn-beyond",
        lambda vm: vm.mmu_notifier_invalidate(vm.max_gfn, 1),
        ValueError,
        "gfn",
    ),
    case("memslot-overlap", lambda vm: vm.add_memslot(32, 64), ValueError, "gfn|npages"),
    case("memslot-npages-zero", lambda vm: vm.add_memslot(TOP, 0), ValueError, "npages"),
    case("memslot-gfn-beyond", lambda vm: vm.add_memslot(vm.max_gfn, 1), ValueError, "gfn"),
    case("memslot-unaligned", lambda vm: vm.add_memslot(TOP + 1, 512, "2M"), ValueError, "gfn"),
    case(
        "memslot-npages-unaligned",
        lambda vm: vm.add_memslot(TOP, 100, "2M"),
        ValueError,
        "npages",
    ),
    case("memslot-bad-backing", lambda vm: vm.add_memslot(TOP, 8, "8K"), ValueError, "backing"),
    case(
        "memslot-bad-backing-int", lambda vm: vm.add_memslot(TOP, 8, 12345), ValueError, "backing"
    ),
    case(
        "memslot-backing-garbage", lambda vm: vm.add_memslot(TOP, 8, "big"), ValueError, "backing"
    ),
    case("delete-unknown-slot", lambda vm: vm.delete_memslot(9), ValueError, "slot"),
    case("delete-negative-slot", lambda vm: vm.delete_memslot(-1), ValueError, "slot"),
    case("walk-gfn-beyond", lambda vm: vm.walk(vm.max_gfn), ValueError, "gfn"),
    case("walk-gfn-negative", lambda vm: vm.walk(-5), ValueError, "gfn"),
    case("spte-gfn-beyond", lambda vm: vm.spte(vm.max_gfn), ValueError, "gfn"),
    case(
        "memstress-vcpus-zero",
        lambda vm: vm.run_memstress(0, 8, 0, False, False, 100, 0),
        ValueError,
        "vcpus",
    ),
    case(
        "memstress-vcpus-too-many",
        lambda vm: vm.run_memstress(3, 8, 0, False, False, 100, 0),
        ValueError,
        "vcpus",
    ),
    case(
        "memstress-pages-zero",
        lambda vm: vm.run_memstress(1, 0, 0, False, False, 100, 0),
        ValueError,
        "pages_per_vcpu",
    ),
    case(
        "memstress-write-percent",
        lambda vm: vm.run_memstress(1, 8, 100, False, False, 101, 0),
        ValueError,
        "write_percent",
    ),
    case(
        "memstress-not-in-memslot",
        lambda vm: vm.run_memstress(2, 8, TOP - 8, False, False, 100, 0),
        ValueError,
        "base_gfn|gfn",
    ),
]


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    VM_CASES,
)
def test_bad_input_leaves_vm_unchanged(
    used_vm: tdpmmu.VM,
    call: Callable[[tdpmmu.VM], object],
    exc: type[BaseException] | tuple[type[BaseException], ...],
    match: str,
) -> None:
    before = snapshot(used_vm)
    with pytest.raises(exc, match=match):
        call(used_vm)
    assert_same(snapshot(used_vm), before)
    used_vm.check()
    # Still usable afterwards.
    assert used_vm.fault(200).ret is tdpmmu.Ret.FIXED


CTOR_CASES: list[Any] = [
    case("unknown-vm-type", {"vm_type": "bogus"}, ValueError, "vm_type"),
    case("vm-type-not-str", {"vm_type": 3}, TypeError, "vm_type"),
    case("levels-3", {"levels": 3}, ValueError, "levels"),
    case("levels-6", {"levels": 6}, ValueError, "levels"),
    case("memory-unaligned", {"memory": 1000}, ValueError, "memory"),
    case("memory-zero", {"memory": 0}, ValueError, "memory"),
    case("memory-negative", {"memory": -4096}, ValueError, "memory"),
    case("memory-garbage", {"memory": "lots"}, ValueError, "memory"),
    case("memory-bool", {"memory": True}, TypeError, "memory"),
    case("memory-beyond-gpa", {"memory": "64PiB"}, tdpmmu.ConfigError, "memory"),
    case("memory-beyond-ram", {"memory": "256TiB", "levels": 5}, tdpmmu.OutOfMemory, "memory"),
    case(
        "memory-not-backing-multiple",
        {"memory": "3MiB", "backing": "2M"},
        ValueError,
        "memory|backing",
    ),
    case("backing-8K", {"backing": "8K"}, ValueError, "backing"),
    case("backing-int", {"backing": 12345}, ValueError, "backing"),
    case("vcpus-zero", {"vcpus": 0}, ValueError, "vcpus"),
    case("vcpus-negative", {"vcpus": -1}, ValueError, "vcpus"),
    case("hooks-unknown", {"hooks": "bogus"}, ValueError, "hooks"),
    # Anything but a design name is taken as a hook object; 5 has none of the four methods.
    case(
        "hooks-not-str",
        {"hooks": 5},
        TypeError,
        r"^hooks: a hook object needs a method link_external_spt\(gfn, level, value\); got int$",
    ),
    case(
        "hooks-object-without-methods",
        {"hooks": object()},
        TypeError,
        r"^hooks: a hook object needs a method link_external_spt.*; got object$",
    ),
    case("costs-unknown-field", {"costs": {"bogus_ns": 1.0}}, ValueError, "bogus_ns"),
    case("costs-negative", {"costs": {"exit_entry_ns": -1.0}}, ValueError, "exit_entry_ns"),
    case("costs-wrong-type", {"costs": 5}, TypeError, "costs"),
    case("seed-negative", {"seed": -1}, ValueError, "seed"),
]


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    CTOR_CASES,
)
def test_bad_constructor_arguments(
    kwargs: dict[str, Any], exc: type[BaseException], match: str
) -> None:
    kwargs = {"memory": "4MiB", **kwargs}
    with pytest.raises(exc, match=match):
        tdpmmu.VM(**kwargs)


def test_config_errors_are_tdpmmu_errors() -> None:
    with pytest.raises(tdpmmu.TdpmmuError):
        tdpmmu.VM(memory="4MiB", levels=3)


def test_bugged_flag_unset_after_bad_input(used_vm: tdpmmu.VM) -> None:
    with pytest.raises(ValueError):
        used_vm.fault(used_vm.max_gfn)
    assert used_vm.bugged is False


def test_demand_paging_bad_arguments() -> None:
    with pytest.raises(ValueError, match="bytes_per_vcpu"):
        tdpmmu.demand_paging(bytes_per_vcpu="1000")
    with pytest.raises(ValueError, match="bytes_per_vcpu"):
        tdpmmu.demand_paging(bytes_per_vcpu="1M", backing="2M")
    with pytest.raises(ValueError, match="vcpus"):
        tdpmmu.demand_paging(vcpus=0)
    with pytest.raises(ValueError, match="backing"):
        tdpmmu.demand_paging(bytes_per_vcpu="4M", backing="3M")


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint32, np.int8, np.uint16])
def test_fault_batch_takes_any_integer_dtype(dtype: type) -> None:
    """`np.arange(n)` (int64) and every other integer dtype work like uint64 gfns."""
    vm = tdpmmu.VM(memory="64MiB")
    rets = vm.fault_batch(np.arange(100, 110, dtype=dtype))
    assert list(rets) == [tdpmmu.Ret.FIXED] * 10
    assert vm.stats["pf_fixed"] == 10
    # Same gfns again: already mapped.
    assert list(vm.fault_batch(np.arange(100, 110))) == [tdpmmu.Ret.SPURIOUS] * 10
    vm.check()


@pytest.mark.parametrize(
    "call",
    [
        lambda: tdpmmu.VM(vcpus=True),
        lambda: tdpmmu.VM(levels=True),
        lambda: tdpmmu.VM().delete_memslot(True),
        lambda: tdpmmu.VM().fault(True),
        lambda: tdpmmu.VM(vcpus=2).fault(0, vcpu=True),
    ],
)
def test_bool_is_not_an_int(call: Callable[[], object]) -> None:
    """`True` where an integer is meant is refused (it used to mean 1)."""
    with pytest.raises(TypeError, match="bool"):
        call()


def test_range_errors_are_config_errors_in_decimal() -> None:
    vm = tdpmmu.VM(memory="64MiB", vcpus=2)
    with pytest.raises(tdpmmu.ConfigError, match=r"write_percent: must be in 0\.\.101 .*got 101"):
        vm.run_memstress(1, 8, 0, False, False, 101, 0)
    with pytest.raises(tdpmmu.ConfigError, match=r"vcpu: must be in 0\.\.2 .*got 5"):
        vm.fault(0, vcpu=5)
    with pytest.raises(tdpmmu.ConfigError, match=r"gfn: gfn must be in 0\.\.0x1000000000"):
        vm.fault(1 << 40)
    with pytest.raises(ValueError, match="npages"):
        vm.zap_gfn_range(0, 0)
