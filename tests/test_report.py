"""``tdpmmu.report``: each row is the engine's cost ledger over the measured operation.

The expected units per CostModel field are written out by hand for every row, and checked with a
cost model whose fields all differ, so a term charged to the wrong field, dropped, doubled or
re-derived differently from what the engine charged fails. Each row's engine terms must add up
to the modeled clock's change over the same operation."""

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from tdpmmu import VM, CostModel, cli, report
from tdpmmu._core import WAIT_FIELDS

#: Every field a distinct value (ns), so no two components can stand in for each other.
DISTINCT = CostModel().replace(
    **{name: 1000.0 + 37.0 * i for i, name in enumerate(CostModel.field_names())}
)

COSTS_MD = Path(__file__).resolve().parents[1] / "docs" / "costs.md"


def rows_by_key(r: report.Report) -> dict[str, report.Row]:
    return {row.key: row for row in (*r.rows, *r.removal_by_vcpus)}


def doc_section(number: str) -> str:
    """The text of docs/costs.md section ``number`` (e.g. '7.1') up to the next heading."""
    text = COSTS_MD.read_text(encoding="utf-8")
    m = re.search(
        rf"^#{{2,3}} {re.escape(number)}\.? .*?$(.*?)(?=^#{{2,3}} |\Z)", text, re.M | re.S
    )
    assert m, number
    return m.group(1)


def removal_units(v: int) -> dict[str, float]:
    """BLOCK, TRACK, kick, REMOVE, WBINVD, clear: one private page removed from a running TD."""
    return {
        "tdh_mem_range_block_ns": 1,
        "tdh_mem_track_ns": 1,
        "kick_base_ns": 1,
        "kick_per_vcpu_ns": v,
        "tdh_mem_page_remove_ns": 1,
        "tdh_phymem_page_wbinvd_ns": 1,
        "page_clear_ns": 1,
    }


#: One conversion request, as set_memory_attributes charges it (4K folios: no split).
REQUEST = {"psc_exit_ns": 1, "gmem_convert_ns": 1}


def expected_units(v: int) -> dict[str, dict[str, float]]:
    """Per row: CostModel field -> units charged per page (the report's own term included)."""
    n = report.TEARDOWN_PAGES
    tables = n // 512 + 2  # L1 tables, one L2, one L3
    teardown = {k: n * u for k, u in removal_units(v).items()}
    teardown["page_clear_ns"] += tables  # each reclaimed table is cleared too
    teardown |= {
        "spte_update_ns": n + tables,
        "tdh_phymem_page_reclaim_ns": tables,
        "tdh_vp_flush_ns": v,
        "tdh_mng_vpflushdone_ns": 1,
        "tdh_phymem_cache_wb_ns": 1,
        "tdh_mng_key_freeid_ns": 1,
        "tlb_flush_base_ns": 1,
        "tlb_flush_per_vcpu_ns": v,
    }
    # KVM_TDX_TERMINATE_VM: HKID released first, every data page and table RECLAIMed + cleared.
    terminate = {
        "spte_update_ns": n + tables,
        "tdh_phymem_page_reclaim_ns": n + tables,
        "page_clear_ns": n + tables,
        "tdh_vp_flush_ns": v,
        "tdh_mng_vpflushdone_ns": 1,
        "tdh_phymem_cache_wb_ns": 1,
        "tdh_mng_key_freeid_ns": 1,
        "tlb_flush_base_ns": 1,
        "tlb_flush_per_vcpu_ns": v,
    }
    snp_fault = {
        "exit_entry_ns": 1,
        "fault_handling_ns": 1,
        "fault_map_ns": 1,
        "rmpupdate_ns": 1,
        "pvalidate_ns": 1,
    }
    return {
        "tdx_private_fault": {
            "td_exit_entry_ns": 1,
            "fault_handling_ns": 1,
            "fault_map_ns": 1,
            "host_page_alloc_ns": 1,
            "tdh_mem_sept_add_ns": 1 / 512,
            "tdh_mem_page_aug_ns": 1,
            "tdg_mem_page_accept_ns": 1,
        },
        "tdx_private_fault_no_alloc": {
            "td_exit_entry_ns": 1,
            "fault_handling_ns": 1,
            "fault_map_ns": 1,
            "tdh_mem_page_aug_ns": 1,
            "tdg_mem_page_accept_ns": 1,
        },
        f"tdx_dynamic_removal@{v}": REQUEST
        | removal_units(v)
        | {"spte_update_ns": 1, "tlb_flush_base_ns": 1, "tlb_flush_per_vcpu_ns": v},
        f"tdx_teardown_per_page@{v}": {k: u / n for k, u in teardown.items()},
        f"tdx_terminate_per_page@{v}": {k: u / n for k, u in terminate.items()},
        f"tdx_reclaim_per_page@{v}": {"tdh_phymem_page_reclaim_ns": 1, "page_clear_ns": 1},
        "snp_private_fault": {"psc_exit_ns": 1, "host_page_alloc_ns": 1} | snp_fault,
        "snp_private_fault_no_alloc": REQUEST | snp_fault,
    }


def removal(c: CostModel, v: int) -> float:
    return (
        c.tdh_mem_range_block_ns
        + c.tdh_mem_track_ns
        + c.kick_base_ns
        + c.kick_per_vcpu_ns * v
        + c.tdh_mem_page_remove_ns
        + c.tdh_phymem_page_wbinvd_ns
        + c.page_clear_ns
    )


def request(c: CostModel) -> float:
    return c.psc_exit_ns + c.gmem_convert_ns


def expected_totals(c: CostModel, v: int) -> dict[str, float]:
    """The same rows as totals, written independently of ``expected_units``."""
    n = report.TEARDOWN_PAGES
    tables = n // 512 + 2
    hkid = v * c.tdh_vp_flush_ns + c.tdh_mng_vpflushdone_ns + c.tdh_phymem_cache_wb_ns
    hkid += c.tdh_mng_key_freeid_ns
    tlb = c.tlb_flush_base_ns + c.tlb_flush_per_vcpu_ns * v
    return {
        "tdx_private_fault": c.td_exit_entry_ns
        + c.fault_handling_ns
        + c.fault_map_ns
        + c.host_page_alloc_ns
        + c.tdh_mem_page_aug_ns
        + c.tdg_mem_page_accept_ns
        + c.tdh_mem_sept_add_ns / 512,
        "tdx_private_fault_no_alloc": c.td_exit_entry_ns
        + c.fault_handling_ns
        + c.fault_map_ns
        + c.tdh_mem_page_aug_ns
        + c.tdg_mem_page_accept_ns,
        f"tdx_dynamic_removal@{v}": request(c) + removal(c, v) + c.spte_update_ns + tlb,
        f"tdx_teardown_per_page@{v}": (
            n * (removal(c, v) + c.spte_update_ns)
            + tables * (c.tdh_phymem_page_reclaim_ns + c.page_clear_ns + c.spte_update_ns)
            + hkid
            + tlb
        )
        / n,
        f"tdx_terminate_per_page@{v}": (
            (n + tables) * (c.tdh_phymem_page_reclaim_ns + c.page_clear_ns + c.spte_update_ns)
            + hkid
            + tlb
        )
        / n,
        f"tdx_reclaim_per_page@{v}": c.tdh_phymem_page_reclaim_ns + c.page_clear_ns,
        "snp_private_fault": c.psc_exit_ns
        + c.exit_entry_ns
        + c.fault_handling_ns
        + c.fault_map_ns
        + c.host_page_alloc_ns
        + c.rmpupdate_ns
        + c.pvalidate_ns,
        "snp_private_fault_no_alloc": request(c)
        + c.exit_entry_ns
        + c.fault_handling_ns
        + c.fault_map_ns
        + c.rmpupdate_ns
        + c.pvalidate_ns,
    }


@pytest.mark.parametrize("vcpus", [1, 4, 32])
def test_expected_units_and_totals_agree(vcpus: int) -> None:
    # The two hand-written expectations describe the same arithmetic.
    totals = expected_totals(DISTINCT, vcpus)
    for key, units in expected_units(vcpus).items():
        ns = sum(u * getattr(DISTINCT, f) for f, u in units.items())
        assert ns == pytest.approx(totals[key], rel=1e-12), key


@pytest.mark.parametrize("vcpus", [1, 4, 32])
def test_components_are_units_times_the_field_value(vcpus: int) -> None:
    rows = rows_by_key(report.build_report(vcpus=vcpus, costs=DISTINCT))
    for key, units in expected_units(vcpus).items():
        row = rows[key]
        comps = {c.field: c for c in row.components}
        assert len(comps) == len(row.components), key  # one term per field
        assert set(comps) == set(units), key
        for field, u in units.items():
            c = comps[field]
            value = getattr(DISTINCT, field)
            assert c.ns_each == value, (key, field)
            assert c.ns == pytest.approx(u * value, rel=1e-12), (key, field)
            assert c.count == pytest.approx(u, rel=1e-12), (key, field)
        # The engine's terms add up to what the modeled clock moved by over the operation.
        engine = sum(c.ns for c in row.components if c.engine)
        assert engine == pytest.approx(row.engine_ns, rel=1e-12), key


@pytest.mark.parametrize("costs", [CostModel(), DISTINCT], ids=["default", "distinct"])
@pytest.mark.parametrize("vcpus", [1, 4, 32])
def test_totals_are_the_cost_model_arithmetic(costs: CostModel, vcpus: int) -> None:
    r = report.build_report(vcpus=vcpus, costs=costs)
    rows = rows_by_key(r)
    for key, ns in expected_totals(costs, vcpus).items():
        row = rows[key]
        assert row.modeled_ns == pytest.approx(ns, rel=1e-12), key
        # The report adds no term: the engine's clock moved by the whole total.
        assert row.engine_ns == pytest.approx(ns, rel=1e-12), key
    # The removal sweep is evaluated at the published configurations.
    for v in (4, 32, 64):
        assert rows[f"tdx_dynamic_removal@{v}"].modeled_ns == pytest.approx(
            expected_totals(costs, v)[f"tdx_dynamic_removal@{v}"]
        )


def test_the_engine_charges_every_request_even_the_snp_first_touch() -> None:
    rows = rows_by_key(report.build_report(vcpus=4))
    # No term is added by the report: the SNP first touch's PSC exit is measured too
    # (VM.map_gpa_range charges the guest's request although the page is private already).
    added = {(k, c.field) for k, row in rows.items() for c in row.components if not c.engine}
    assert added == set()
    first = {c.field: c for c in rows["snp_private_fault"].components}
    assert first["psc_exit_ns"].count == 1
    assert "gmem_convert_ns" not in first  # nothing converts
    assert "[added by report]" not in rows["snp_private_fault"].breakdown()
    # Where a conversion request is in the measurement, the engine charged it exactly once.
    for key in ("tdx_dynamic_removal@4", "snp_private_fault_no_alloc"):
        comps = {c.field: c for c in rows[key].components}
        assert comps["psc_exit_ns"].engine and comps["psc_exit_ns"].count == 1
        assert comps["gmem_convert_ns"].engine and comps["gmem_convert_ns"].count == 1


def test_rows_are_the_ledger_deltas() -> None:
    # Measured directly with the public API, the same operation gives the same terms.
    c = DISTINCT
    vm = VM("tdx", memory="1GiB", vcpus=4, costs=c)
    vm.finalize()
    vm.fault(0)
    before = vm.cost_breakdown()
    vm.set_memory_attributes(0, 1, private=False)
    after = vm.cost_breakdown()
    direct = {f: after[f] - before[f] for f in after if after[f] != before[f]}
    row = rows_by_key(report.build_report(vcpus=4, costs=c))["tdx_dynamic_removal@4"]
    assert {x.field: x.ns for x in row.components} == pytest.approx(direct)
    assert sum(direct.values()) == pytest.approx(row.engine_ns)


def test_kick_cost_grows_with_vcpus() -> None:
    c = DISTINCT
    a = rows_by_key(report.build_report(vcpus=4, costs=c))["tdx_dynamic_removal@64"]
    b = rows_by_key(report.build_report(vcpus=4, costs=c))["tdx_dynamic_removal@4"]
    assert a.modeled_ns - b.modeled_ns == pytest.approx(
        60 * (c.kick_per_vcpu_ns + c.tlb_flush_per_vcpu_ns)
    )


def test_published_bounds_and_ratios() -> None:
    r = report.build_report(vcpus=4)
    rows = rows_by_key(r)
    assert rows["tdx_private_fault"].published.low_us == 2.54
    assert rows["snp_private_fault"].published.low_us == 6.1
    assert rows["tdx_dynamic_removal@4"].published.text() == "15-16"
    assert rows["tdx_dynamic_removal@32"].published.text() == "18-20"
    assert rows["tdx_dynamic_removal@64"].published.text() == "53-57"
    assert rows["tdx_teardown_per_page@4"].published.text() == "15-16"
    assert rows["tdx_terminate_per_page@4"].published.text() == "5.1-5.5"
    figures = doc_section("7.1")
    for row in rows.values():
        lo, hi = row.ratio
        us = row.modeled_ns / 1000
        assert lo == pytest.approx(us / row.published.high_us)
        assert hi == pytest.approx(us / row.published.low_us)
        # Cited by its row of docs/costs.md §7.1, which states the same figure.
        m = re.match(r"docs/costs\.md §7\.1 (R\d+): ", row.published.source)
        assert m, row.published.source
        line = next(x for x in figures.splitlines() if x.startswith(f"| {m.group(1)} |"))
        assert f"≈{row.published.text()} µs" in line, (row.key, line)
        assert "shared/" not in row.published.source
    # Nearest published configuration for other vCPU counts (log scale).
    r8 = rows_by_key(report.build_report(vcpus=8))
    assert r8["tdx_dynamic_removal@8"].published.text() == "15-16"
    r48 = rows_by_key(report.build_report(vcpus=48))
    assert r48["tdx_teardown_per_page@48"].published.text() == "53-57"
    assert r48["tdx_terminate_per_page@48"].published.text() == "4.5-4.8"


def test_docs_state_the_default_report() -> None:
    # docs/costs.md §7.2 quotes the default report; it must not go stale.
    rows = rows_by_key(report.build_report(vcpus=4))
    quoted = {
        "TDX private 4 KiB fault, first touch": ["tdx_private_fault"],
        "TDX private 4 KiB fault, host page already allocated": ["tdx_private_fault_no_alloc"],
        "TDX dynamic removal, 4 / 32 / 64 vCPUs": [
            f"tdx_dynamic_removal@{v}" for v in report.PUBLISHED_VCPUS
        ],
        "TDX destroy() per private 4 KiB page, 4 vCPUs": ["tdx_teardown_per_page@4"],
        "TDX RECLAIM + clear per reclaimed page": ["tdx_reclaim_per_page@4"],
        "SNP private 4 KiB fault, first touch": ["snp_private_fault"],
        "SNP private 4 KiB fault, host page already allocated": ["snp_private_fault_no_alloc"],
    }
    lines = doc_section("7.2").splitlines()
    for label, keys in quoted.items():
        line = next(x for x in lines if x.startswith(f"| {label} |"))
        modeled = line.split("|")[2].strip()
        assert modeled == " / ".join(f"{rows[k].modeled_ns / 1000:.2f}" for k in keys) + " µs"


def test_conversion_requests_and_folio_splits_from_the_ledger() -> None:
    c = DISTINCT
    vm = VM("snp", memory="64MiB", backing="2M", folio="2M", costs=c)
    before = (vm.cost_breakdown(), vm.stats)
    vm.set_memory_attributes(500, 100, private=False)  # both edges inside 2M folios
    comps, engine_ns = report._measure(vm, before, "probe")
    assert {x.field: x.count for x in comps} == pytest.approx(
        {"psc_exit_ns": 1, "gmem_convert_ns": 1, "gmem_split_2m_ns": 2}
    )
    assert engine_ns == pytest.approx(c.psc_exit_ns + c.gmem_convert_ns + 2 * c.gmem_split_2m_ns)


def test_ledger_components_refuse_what_does_not_add_up() -> None:
    c = DISTINCT
    # A ledger is every CostModel field in order, then the wait kinds.
    zero = dict.fromkeys([*CostModel.field_names(), *WAIT_FIELDS], 0.0)
    after = zero | {"exit_entry_ns": c.exit_entry_ns, "fault_handling_ns": 2 * c.fault_handling_ns}
    total = c.exit_entry_ns + 2 * c.fault_handling_ns
    comps = report.ledger_components(zero, after, total, c, "probe")
    assert [(x.field, x.count, x.ns_each) for x in comps] == [
        ("exit_entry_ns", 1, c.exit_entry_ns),
        ("fault_handling_ns", 2, c.fault_handling_ns),
    ]
    per_page = report.ledger_components(zero, after, total, c, "probe", per=4)
    assert [x.ns for x in per_page] == pytest.approx([x.ns / 4 for x in comps])
    # The modeled clock moved by something the ledger does not explain.
    with pytest.raises(RuntimeError, match="cost ledger"):
        report.ledger_components(zero, after, total + 1.0, c, "probe")
    # A fractional number of units of a field.
    half = zero | {"exit_entry_ns": c.exit_entry_ns / 2}
    with pytest.raises(RuntimeError, match="whole number of units"):
        report.ledger_components(zero, half, c.exit_entry_ns / 2, c, "probe")
    # A ledger that went backwards.
    with pytest.raises(RuntimeError, match="went backwards"):
        report.ledger_components(after, zero, -total, c, "probe")
    # A ledger with fields the cost model does not have (engine and package out of step).
    with pytest.raises(RuntimeError, match="out of step"):
        report.ledger_components(zero, zero | {"new_ns": 0.0}, 0.0, c, "probe")
    # ... or without the wait kinds.
    fields_only = dict.fromkeys(CostModel.field_names(), 0.0)
    with pytest.raises(RuntimeError, match="out of step"):
        report.ledger_components(fields_only, fields_only, 0.0, c, "probe")
    # A wait charged by an operation outside a virtual-time run.
    waited = zero | {"wait_mmu_lock": 5.0}
    with pytest.raises(RuntimeError, match="wait was charged"):
        report.ledger_components(zero, waited, 5.0, c, "probe")


def test_text_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["report", "--vcpus", "8", "--cost", "psc_exit_ns=3000"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("SIMULATED by tdpmmu")
    assert "MODELED" in out
    assert "vCPUs: 8" in out and "psc_exit_ns=3000" in out
    assert "TDX private 4K fault, all-in, first touch" in out
    assert "[added by report]" not in out  # every term is the engine's
    assert "docs/costs.md §7.1 R1" in out and "docs/costs.md §7.1 R6" in out
    assert "shared/" not in out
    assert max(len(x) for x in out.splitlines()) <= 100, "text output stays within 100 columns"
    # The SNP rows reflect the override, each term read from the default costs: PSC 3 µs (the
    # engine's, on first touch too) + exit + handling + map + host page + RMPUPDATE + PVALIDATE;
    # once allocated, PSC 3 + guest_memfd conversion + the same without the host page.
    c = CostModel()
    fault = c.exit_entry_ns + c.fault_handling_ns + c.fault_map_ns + c.rmpupdate_ns
    fault += c.pvalidate_ns
    first = (3000 + fault + c.host_page_alloc_ns) / 1e3
    again = (3000 + c.gmem_convert_ns + fault) / 1e3
    line = next(x for x in out.splitlines() if x.startswith("SNP private 4K fault, all-in"))
    assert f"{first:.3f}" in line, (first, line)
    line = next(x for x in out.splitlines() if x.startswith("SNP private 4K fault, host page"))
    assert f"{again:.3f}" in line, (again, line)
    # The TDX removal row carries the request too: 3 + 0.107 + 18 + 0.06 + 2.6 µs at 8 vCPUs.
    line = next(x for x in out.splitlines() if x.startswith("TDX dynamic removal") and "(8 " in x)
    assert "23.767" in line


def test_json_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["report", "--json", "--vcpus", "2"]) == 0
    d: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert d["simulated"] is True and d["modeled"] is True and d["vcpus"] == 2
    assert d["cost_overrides"] == {}
    keys = [row["key"] for row in d["rows"]]
    assert keys == [
        "tdx_private_fault",
        "tdx_private_fault_no_alloc",
        "tdx_dynamic_removal@2",
        "tdx_teardown_per_page@2",
        "tdx_terminate_per_page@2",
        "tdx_reclaim_per_page@2",
        "snp_private_fault",
        "snp_private_fault_no_alloc",
    ]
    defaults = CostModel().to_dict()
    for row in d["rows"]:
        assert row["modeled_ns"] == pytest.approx(sum(c["ns"] for c in row["components"]))
        engine = sum(c["ns"] for c in row["components"] if c["engine"])
        assert engine == pytest.approx(row["engine_ns"])
        for c in row["components"]:
            assert c["ns_each"] == defaults[c["field"]]
            assert c["ns"] == pytest.approx(c["count"] * c["ns_each"])
            assert math.isfinite(c["count"]) and c["count"] > 0
        assert row["published"]["source"].startswith("docs/costs.md §7.1 R")
    assert [row["key"] for row in d["removal_by_vcpus"]] == [
        "tdx_dynamic_removal@4",
        "tdx_dynamic_removal@32",
        "tdx_dynamic_removal@64",
    ]


def test_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["report", "--cost", "no_such_ns=1"])
    assert e.value.code == 2
    assert "no_such_ns" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["report", "--vcpus", "0"])
    with pytest.raises(ValueError, match="vcpus"):
        report.build_report(vcpus=0)
