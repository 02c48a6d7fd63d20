"""Hook calls are counted where KVM dispatches them, so every backend and design that sees the
same dispatches shows the same counters; and what a Python hook object may and may not do."""

import numpy as np
import pytest

import tdpmmu
from tdpmmu import VmBugged


class Quiet:
    """A hook object that accepts every call (the mirror design's calls reach it)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def link_external_spt(self, gfn: int, level: int, pfn: int) -> int:
        self.calls.append("link_external_spt")
        return 0

    def set_external_spte(self, gfn: int, level: int, spte: int) -> int:
        self.calls.append("set_external_spte")
        return 0

    def remove_external_spte(self, gfn: int, level: int, spte: int) -> int:
        self.calls.append("remove_external_spte")
        return 0

    def free_external_spt(self, gfn: int, level: int, pfn: int) -> int:
        self.calls.append("free_external_spt")
        return 0


def _vm(vm_type: str, hooks: object, **kw: object) -> tdpmmu.VM:
    mirror = vm_type == "sw_protected"
    vm = tdpmmu.VM(vm_type, memory="64MiB", hooks=hooks, mirror=mirror, **kw)  # type: ignore[arg-type]
    if vm_type == "tdx":
        vm.finalize()
    return vm


BACKENDS = [
    ("tdx", "mirror"),  # the TDX module model
    ("tdx", "private"),
    ("sw_protected", "mirror"),  # the software external tree
    ("sw_protected", "private"),
    ("snp", "private"),  # SNP's RMP-following design
    ("tdx", "object"),  # a Python hook object
    ("sw_protected", "object"),
]


@pytest.mark.parametrize(("vm_type", "design"), BACKENDS)
def test_same_dispatches_same_counters(vm_type: str, design: str) -> None:
    hooks: object = Quiet() if design == "object" else design
    vm = _vm(vm_type, hooks)
    vm.fault(9, private=True)
    s = vm.stats
    # A private fault on an empty 4-level tree links three tables and sets one leaf, whoever
    # answers the hooks.
    assert (s["link_external_spt"], s["set_external_spte"]) == (3, 1)
    vm.punch_hole(9, 1)
    s = vm.stats
    assert (s["remove_external_spte"], s["free_external_spt"]) == (1, 0)
    if isinstance(hooks, Quiet):
        # The object saw exactly what was counted.
        assert hooks.calls.count("link_external_spt") == 3
        assert hooks.calls.count("remove_external_spte") == 1


@pytest.mark.parametrize("vm_type", ["tdx", "sw_protected"])
def test_two_hook_interface_counts_links_and_removals_as_sets(vm_type: str) -> None:
    vm = _vm(vm_type, tdpmmu.HookDesign("mirror", interface="two_hook"))
    vm.fault(9, private=True)
    vm.punch_hole(9, 1)
    s = vm.stats
    assert (s["link_external_spt"], s["remove_external_spte"]) == (0, 0)
    assert s["set_external_spte"] == 3 + 1 + 1


def test_gmem_design_dispatches_no_spte_hooks() -> None:
    vm = _vm("snp", "gmem")
    vm.fault(9, private=True)
    vm.punch_hole(9, 1)
    s = vm.stats
    hooks = ("link_external_spt", "set_external_spte", "remove_external_spte")
    assert all(s[h] == 0 for h in hooks)
    assert s["gmem_prepare"] == 1 and s["gmem_invalidate"] == 1


class Reentrant(Quiet):
    """Calls back into its own VM from inside a hook."""

    vm: tdpmmu.VM | None = None

    def set_external_spte(self, gfn: int, level: int, spte: int) -> int:
        assert self.vm is not None
        self.vm.walk(gfn, private=True)
        return 0


def test_a_hook_calling_back_into_its_vm_gets_an_error_not_a_deadlock() -> None:
    h = Reentrant()
    vm = _vm("tdx", h)
    h.vm = vm
    with pytest.raises(VmBugged, match="called back into its own VM"):
        vm.fault(9, private=True)
    assert vm.bugged


class Answers(Quiet):
    def __init__(self, answer: object) -> None:
        super().__init__()
        self.answer = answer

    def set_external_spte(self, gfn: int, level: int, spte: int) -> object:  # type: ignore[override]
        return self.answer


@pytest.mark.parametrize(
    ("answer", "match"),
    [(None, "returned None"), (2**100, "returned 1267650600228229401496703205376"), ("0", "'0'")],
)
def test_hook_answers_other_than_an_errno_bug_the_vm(answer: object, match: str) -> None:
    vm = _vm("tdx", Answers(answer))
    with pytest.raises(VmBugged, match=match):
        vm.fault(9, private=True)


class Interrupting(Quiet):
    def __init__(self, exc: type[BaseException]) -> None:
        super().__init__()
        self.exc = exc

    def set_external_spte(self, gfn: int, level: int, spte: int) -> int:
        raise self.exc


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit])
def test_interrupt_inside_a_hook_propagates_after_marking_the_vm(
    exc: type[BaseException],
) -> None:
    vm = _vm("tdx", Interrupting(exc))
    with pytest.raises(exc):
        vm.fault(9, private=True)
    assert vm.bugged
    with pytest.raises(VmBugged, match="interrupted"):
        vm.fault(10, private=True)
    # A batch call re-raises it too.
    vm2 = _vm("tdx", Interrupting(exc))
    with pytest.raises(exc):
        vm2.fault_batch(np.arange(4), private=True)
