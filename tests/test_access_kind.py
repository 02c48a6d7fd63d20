"""One rule at every guest-access site (``access_batch``, ``run_memstress``, ``run_virtual``):
an access of the other kind than the page's attribute never completes in the hardware walk,
even where a leaf maps the gfn (SNP has one root; the RMP check faults), so it takes the fault
path and exits to userspace."""

from __future__ import annotations

import numpy as np
import pytest

import tdpmmu


def snp_with_private_pages() -> tdpmmu.VM:
    vm = tdpmmu.VM("snp", memory="4MiB")
    vm.set_memory_attributes(0, 1024, True)
    assert vm.populate(0, 16, private=True) == 16  # private leaves on the one root
    return vm


def test_access_batch_shared_access_to_private_page_faults() -> None:
    vm = snp_with_private_pages()
    before = vm.stats["pf_memory_fault"]
    assert vm.access_batch(np.arange(16, dtype=np.uint64), private=False)["faults"] == 16
    assert vm.stats["pf_memory_fault"] == before + 16


def test_run_memstress_shared_access_to_private_page_faults() -> None:
    vm = snp_with_private_pages()
    rec = vm.run_memstress(1, 16, 0, False, False, 100, 0, False)
    assert rec[0]["faults"] == 16  # every access exited; none was served as a hit
    assert vm.stats["pf_memory_fault"] >= 16


def test_run_virtual_refuses_accesses_of_the_wrong_kind() -> None:
    vm = snp_with_private_pages()
    with pytest.raises(tdpmmu.ConfigError, match="does not match the page's attribute"):
        vm.run_virtual(1, 16, 0, False, False, 100, 0, False)


def test_matching_accesses_still_hit() -> None:
    vm = snp_with_private_pages()
    assert vm.access_batch(np.arange(16, dtype=np.uint64), private=True)["faults"] == 0
    assert vm.run_memstress(1, 16, 0, False, False, 100, 0, True)[0]["faults"] == 0
