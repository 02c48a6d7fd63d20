"""tdpmmu.HookDesign: a design plus its TDX options as one ``hooks=`` value."""

import pytest

import tdpmmu
from tdpmmu import HookDesign


def _td(hooks: object, **kw: object) -> tdpmmu.VM:
    vm = tdpmmu.VM("tdx", memory="64MiB", vcpus=2, hooks=hooks, **kw)
    vm.finalize()
    for g in range(8):
        vm.fault(g, private=True)
    vm.punch_hole(0, 8)
    return vm


def test_design_is_the_same_vm_as_name_plus_options() -> None:
    a = _td(HookDesign("mirror", track="batched", interface="two_hook"))
    b = _td("mirror", tdx={"track": "batched", "interface": "two_hook"})
    assert a.hooks_name == b.hooks_name == "mirror"
    assert dict(a.stats) == dict(b.stats)
    assert a.stats["TDH.MEM.TRACK"] == 1  # batched: one TRACK for the 8-page zap
    assert a.stats["link_external_spt"] == 0  # two-hook interface
    assert str(HookDesign("mirror", track="batched")) == "mirror[track=batched]"
    assert str(HookDesign("private")) == "private"


def test_explicit_tdx_options_win_over_the_design() -> None:
    vm = _td(HookDesign("mirror", track="batched"), tdx={"track": "per_page"})
    assert vm.stats["TDH.MEM.TRACK"] == 8


def test_bad_designs_are_config_errors() -> None:
    with pytest.raises(tdpmmu.ConfigError, match="hooks: unknown design 'mirrored'"):
        HookDesign("mirrored")
    with pytest.raises(tdpmmu.ConfigError, match=r"hooks\.track: 'lazy' is not allowed"):
        HookDesign("mirror", track="lazy")
    with pytest.raises(tdpmmu.ConfigError, match="tdx"):
        tdpmmu.VM("snp", memory="64MiB", hooks=HookDesign("gmem", track="batched"))
    vm = tdpmmu.VM("snp", memory="64MiB", hooks=HookDesign("gmem"))
    assert vm.hooks_name == "gmem"
