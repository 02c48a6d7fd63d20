"""A user-supplied Python hook object receives the four hooks exactly where KVM calls them."""

import pytest

import tdpmmu
from tdpmmu import Ret


class Recorder:
    """Records calls; answers -EBUSY to the n-th set_external_spte if asked to."""

    def __init__(self, busy_on_set: int | None = None) -> None:
        self.calls: list[tuple[str, int, int]] = []
        self.busy_on_set = busy_on_set
        self.sets = 0

    def link_external_spt(self, gfn: int, level: int, pfn: int) -> int:
        self.calls.append(("link_external_spt", gfn, level))
        return 0

    def set_external_spte(self, gfn: int, level: int, spte: int) -> int:
        self.sets += 1
        self.calls.append(("set_external_spte", gfn, level))
        return -16 if self.sets == self.busy_on_set else 0

    def remove_external_spte(self, gfn: int, level: int, spte: int) -> int:
        self.calls.append(("remove_external_spte", gfn, level))
        return 0

    def free_external_spt(self, gfn: int, level: int, pfn: int) -> int:
        self.calls.append(("free_external_spt", gfn, level))
        return 0


def test_object_sees_kvm_order_and_busy_is_retried() -> None:
    h = Recorder(busy_on_set=1)
    vm = tdpmmu.VM("tdx", memory="64MiB", hooks=h)
    vm.finalize()
    r = vm.fault(5, private=True)
    assert r.ret == Ret.FIXED
    assert r.retries == 1  # -EBUSY restored the mirror SPTE; TDX retried locally
    assert h.calls == [
        ("link_external_spt", 0, 4),
        ("link_external_spt", 0, 3),
        ("link_external_spt", 0, 2),
        ("set_external_spte", 5, 1),
        ("set_external_spte", 5, 1),
    ]
    vm.punch_hole(5, 1)
    assert h.calls[-1] == ("remove_external_spte", 5, 1)
    vm.destroy()
    # Teardown frees each mirror table, children first, with the table's own level.
    assert [c for c in h.calls if c[0] == "free_external_spt"] == [
        ("free_external_spt", 0, 1),
        ("free_external_spt", 0, 2),
        ("free_external_spt", 0, 3),
    ]


def test_object_errors_mark_the_vm_bugged() -> None:
    class Raises(Recorder):
        def set_external_spte(self, gfn: int, level: int, spte: int) -> int:
            raise RuntimeError("boom")

    vm = tdpmmu.VM("tdx", memory="64MiB", hooks=Raises())
    vm.finalize()
    with pytest.raises(tdpmmu.VmBugged, match="boom"):
        vm.fault(1, private=True)
    assert vm.bugged


def test_object_needs_all_methods_and_a_mirror_root() -> None:
    class Partial:
        def link_external_spt(self, gfn: int, level: int, pfn: int) -> int:
            return 0

    with pytest.raises(TypeError, match="set_external_spte"):
        tdpmmu.VM("tdx", memory="64MiB", hooks=Partial())
    with pytest.raises(tdpmmu.ConfigError, match="mirror root"):
        tdpmmu.VM("snp", memory="64MiB", hooks=Recorder())
