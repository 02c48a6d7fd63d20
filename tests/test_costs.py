"""CostModel: defaults, sources, validation, and what one fault costs on the modeled clock."""

import dataclasses
import math
import re
from pathlib import Path

import pytest

import tdpmmu
from tdpmmu import CostModel, Ret, _core, costs
from tdpmmu._core import COST_DEFAULTS, COST_FIELDS
from tdpmmu.costs import SOURCES

COSTS_MD = Path(__file__).resolve().parents[1] / "docs" / "costs.md"


def doc_sections() -> dict[str, str]:
    """docs/costs.md split at its headings: '§3.1' -> its title and text up to the next heading."""
    text = COSTS_MD.read_text(encoding="utf-8")
    out: dict[str, str] = {}
    parts = re.split(r"^#{2,3} (\d+(?:\.\d+)?)\.? (.*)$", text, flags=re.M)
    for number, title, body in zip(parts[1::3], parts[2::3], parts[3::3], strict=True):
        out[f"§{number}"] = title + "\n" + body
    return out


def summary_table() -> list[list[str]]:
    """The rows of docs/costs.md §2 ('All fields at a glance'), cells stripped."""
    rows = []
    for line in doc_sections()["§2"].splitlines():
        if line.startswith("| `"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def test_defaults_are_the_engines() -> None:
    # One definition of the numbers: the engine's, in the engine's field order.
    assert CostModel().to_dict() == COST_DEFAULTS
    assert list(CostModel().to_dict()) == list(COST_FIELDS)
    for f in dataclasses.fields(CostModel):
        assert f.default == COST_DEFAULTS[f.name], f.name


def test_default_splits_match_the_published_totals() -> None:
    # docs/costs.md §5.1: the removal sequence sums to R3's 16 µs at 4 vCPUs, RECLAIM + clear to
    # R4's 5 µs, and §4.1's flush is 1 µs + 0.2 µs x N.
    c = CostModel()
    removal = (
        c.tdh_mem_range_block_ns
        + c.tdh_mem_track_ns
        + c.kick_base_ns
        + 4 * c.kick_per_vcpu_ns
        + c.tdh_mem_page_remove_ns
        + c.tdh_phymem_page_wbinvd_ns
        + c.page_clear_ns
    )
    assert removal == 16000.0
    assert c.tdh_phymem_page_reclaim_ns + c.page_clear_ns == 5000.0
    assert (c.tlb_flush_base_ns, c.tlb_flush_per_vcpu_ns) == (1000.0, 200.0)
    # §6.3: ~320 cycles at 3 GHz, and a 2 MiB split ~100x that.
    assert c.gmem_convert_ns == pytest.approx(320 / 3.0, abs=0.5)
    assert c.gmem_split_2m_ns == pytest.approx(100 * c.gmem_convert_ns)


def test_python_defaults_are_the_engine_defaults() -> None:
    # A VM built with costs={} uses the engine's own defaults: same modeled time for the
    # same work as one built with CostModel() passed explicitly.
    a = tdpmmu._core.Vm("default", 1 << 30, 1, 4, 4096, "none", {}, 0, False, False, True)
    b = tdpmmu.VM(memory="1GiB")
    assert a.fault(3).modeled_ns == b.fault(3).modeled_ns


def test_fields_match_native_in_order() -> None:
    assert CostModel.field_names() == COST_FIELDS
    assert tuple(COST_DEFAULTS) == COST_FIELDS


def test_import_time_check_catches_a_field_mismatch(monkeypatch: pytest.MonkeyPatch) -> None:
    costs._check_against_engine()  # the real engine agrees
    monkeypatch.setattr(_core, "COST_FIELDS", (*COST_FIELDS, "new_engine_field_ns"))
    with pytest.raises(ImportError, match="out of step"):
        costs._check_against_engine()
    monkeypatch.setattr(_core, "COST_FIELDS", tuple(reversed(COST_FIELDS)))
    with pytest.raises(ImportError, match="out of step"):
        costs._check_against_engine()


def test_every_field_has_a_source_in_docs_costs_md() -> None:
    assert set(SOURCES) == set(CostModel.field_names())
    sections = doc_sections()
    for name, text in SOURCES.items():
        m = re.match(r"docs/costs\.md (§\d+\.\d+): ", text)
        assert m, (name, text)
        # The cited section exists and documents this field.
        assert m.group(1) in sections, (name, m.group(1))
        assert f"`{name}`" in sections[m.group(1)], (name, m.group(1))
        # Each source states its kind.
        assert re.search(r"\((M|D|E)\b", text), name
        assert "shared/" not in text, name


def test_docs_summary_table_lists_every_field_with_its_default() -> None:
    rows = summary_table()
    assert [r[0].strip("`") for r in rows] == list(COST_FIELDS)
    for field, default, kind, _sweep, _unit, section in rows:
        name = field.strip("`")
        assert float(default) == COST_DEFAULTS[name], name
        assert kind in ("M", "D", "E"), name
        # The table's section is the one SOURCES cites, and it states the same default.
        assert SOURCES[name].startswith(f"docs/costs.md {section}:"), name
        assert f"({kind})" in SOURCES[name], name


def test_docs_cite_nothing_outside_the_package() -> None:
    text = COSTS_MD.read_text(encoding="utf-8")
    assert "shared/" not in text
    assert "costs.md §" not in text  # the old reference file's section numbers
    src = Path(costs.__file__).read_text(encoding="utf-8")
    assert "shared/" not in src


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
    expected = c.exit_entry_ns + c.fault_handling_ns + c.fault_map_ns + c.host_page_alloc_ns
    assert r.modeled_ns == expected
    assert vm.stats["modeled_ns"] == expected
    # A spurious read fault is an exit, handling and the map step (which finds the SPTE
    # already there), no allocation.
    spurious = vm.fault(10, write=False)
    assert spurious.ret is Ret.SPURIOUS
    assert spurious.modeled_ns == c.exit_entry_ns + c.fault_handling_ns + c.fault_map_ns
    # A spurious write fault is found on the lockless fast path: the exit and fast_fix_ns
    # only (no handling, no map step).
    fast = vm.fault(10)
    assert fast.ret is Ret.SPURIOUS
    assert fast.modeled_ns == c.exit_entry_ns + c.fast_fix_ns
    assert vm.stats["pf_fast"] == 1


def test_first_touch_2m_backing_zeroes_the_rest() -> None:
    c = CostModel()
    vm = tdpmmu.VM(memory="64MiB", backing="2M")
    r = vm.fault(3)
    assert r.level == 2
    assert r.modeled_ns == (
        c.exit_entry_ns
        + c.fault_handling_ns
        + c.fault_map_ns
        + c.host_page_alloc_ns
        + 511 * c.host_zero_4k_ns
    )


def test_custom_costs_change_the_modeled_time() -> None:
    c = CostModel(
        exit_entry_ns=100.0, fault_handling_ns=20.0, fault_map_ns=4000.0, host_page_alloc_ns=3.0
    )
    vm = tdpmmu.VM(memory="64MiB", costs=c)
    assert vm.costs is c
    assert vm.fault(10).modeled_ns == 4123.0


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
