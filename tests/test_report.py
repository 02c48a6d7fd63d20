"""``tdpmmu.report``: each modeled total is the CostModel arithmetic it claims to be.

The expected totals are written out by hand from the CostModel fields, with a cost model whose
fields all differ, so a dropped, doubled or swapped component changes the total and fails."""

import json
from typing import Any

import pytest

from tdpmmu import VM, CostModel, _core, cli, report
from tdpmmu.stats import Stats

#: Every field a distinct value (ns), so no two components can stand in for each other.
DISTINCT = CostModel().replace(
    **{name: 1000.0 + 37.0 * i for i, name in enumerate(CostModel.field_names())}
)


def rows_by_key(r: report.Report) -> dict[str, report.Row]:
    return {row.key: row for row in (*r.rows, *r.removal_by_vcpus)}


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
    """One conversion request, as set_memory_attributes charges it (4K folios: no split)."""
    return c.psc_exit_ns + c.gmem_convert_ns


def expected_totals(c: CostModel, v: int) -> dict[str, float]:
    n = report.TEARDOWN_PAGES
    tables = n // 512 + 2  # L1 tables, one L2, one L3
    hkid = v * c.tdh_vp_flush_ns + c.tdh_mng_vpflushdone_ns + c.tdh_phymem_cache_wb_ns
    hkid += c.tdh_mng_key_freeid_ns
    tlb = c.tlb_flush_base_ns + c.tlb_flush_per_vcpu_ns * v
    return {
        "tdx_private_fault": c.td_exit_entry_ns
        + c.fault_handling_ns
        + c.host_page_alloc_ns
        + c.tdh_mem_page_aug_ns
        + c.tdg_mem_page_accept_ns
        + c.tdh_mem_sept_add_ns / 512,
        "tdx_private_fault_no_alloc": c.td_exit_entry_ns
        + c.fault_handling_ns
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
        f"tdx_reclaim_per_page@{v}": c.tdh_phymem_page_reclaim_ns + c.page_clear_ns,
        "snp_private_fault": c.psc_exit_ns
        + c.exit_entry_ns
        + c.fault_handling_ns
        + c.host_page_alloc_ns
        + c.rmpupdate_ns
        + c.pvalidate_ns,
        "snp_private_fault_no_alloc": request(c)
        + c.exit_entry_ns
        + c.fault_handling_ns
        + c.rmpupdate_ns
        + c.pvalidate_ns,
    }


@pytest.mark.parametrize("costs", [CostModel(), DISTINCT], ids=["default", "distinct"])
@pytest.mark.parametrize("vcpus", [1, 4, 32])
def test_totals_are_the_cost_model_arithmetic(costs: CostModel, vcpus: int) -> None:
    r = report.build_report(vcpus=vcpus, costs=costs)
    rows = rows_by_key(r)
    for key, ns in expected_totals(costs, vcpus).items():
        row = rows[key]
        assert row.modeled_ns == pytest.approx(ns, rel=1e-12), key
        assert sum(c.ns for c in row.components) == pytest.approx(ns, rel=1e-12), key
        # What the engine's clock moved by is the total minus the terms the report adds.
        added = sum(c.ns for c in row.components if not c.engine)
        assert row.engine_ns == pytest.approx(ns - added, rel=1e-12), key
    # The removal sweep is evaluated at the published configurations.
    for v in (4, 32, 64):
        assert rows[f"tdx_dynamic_removal@{v}"].modeled_ns == pytest.approx(
            expected_totals(costs, v)[f"tdx_dynamic_removal@{v}"]
        )


def test_components_name_the_fields() -> None:
    rows = rows_by_key(report.build_report(vcpus=4))
    fields = {k: {c.field for c in row.components} for k, row in rows.items()}
    assert fields["tdx_private_fault"] == {
        "td_exit_entry_ns",
        "fault_handling_ns",
        "host_page_alloc_ns",
        "tdh_mem_sept_add_ns",
        "tdh_mem_page_aug_ns",
        "tdg_mem_page_accept_ns",
    }
    assert fields["tdx_dynamic_removal@4"] == {
        "psc_exit_ns",
        "gmem_convert_ns",
        "tdh_mem_range_block_ns",
        "tdh_mem_track_ns",
        "kick_base_ns",
        "kick_per_vcpu_ns",
        "tdh_mem_page_remove_ns",
        "tdh_phymem_page_wbinvd_ns",
        "page_clear_ns",
        "spte_update_ns",
        "tlb_flush_base_ns",
        "tlb_flush_per_vcpu_ns",
    }
    assert fields["snp_private_fault"] == {
        "psc_exit_ns",
        "exit_entry_ns",
        "fault_handling_ns",
        "host_page_alloc_ns",
        "rmpupdate_ns",
        "pvalidate_ns",
    }
    assert fields["snp_private_fault_no_alloc"] == {
        "psc_exit_ns",
        "gmem_convert_ns",
        "exit_entry_ns",
        "fault_handling_ns",
        "rmpupdate_ns",
        "pvalidate_ns",
    }
    # The PSC exit of the first touch (the page is private already, so no attribute changes and
    # the engine charges no request) is the only term the engine does not charge itself.
    added = {(k, c.field) for k, row in rows.items() for c in row.components if not c.engine}
    assert added == {("snp_private_fault", "psc_exit_ns")}
    # Where a conversion request is in the measurement, the engine charged it exactly once.
    for key in ("tdx_dynamic_removal@4", "snp_private_fault_no_alloc"):
        comps = {c.field: c for c in rows[key].components}
        assert comps["psc_exit_ns"].engine and comps["psc_exit_ns"].count == 1
        assert comps["gmem_convert_ns"].engine and comps["gmem_convert_ns"].count == 1
    every = {f for fs in fields.values() for f in fs}
    assert every <= set(CostModel.field_names())


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
    assert rows["tdx_teardown_per_page@4"].published.text() == "5.1-5.5"
    for row in rows.values():
        lo, hi = row.ratio
        us = row.modeled_ns / 1000
        assert lo == pytest.approx(us / row.published.high_us)
        assert hi == pytest.approx(us / row.published.low_us)
        assert "costs.md" in row.published.source and "line" in row.published.source
    # Nearest published configuration for other vCPU counts (log scale).
    r8 = rows_by_key(report.build_report(vcpus=8))
    assert r8["tdx_dynamic_removal@8"].published.text() == "15-16"
    r48 = rows_by_key(report.build_report(vcpus=48))
    assert r48["tdx_teardown_per_page@48"].published.text() == "4.5-4.8"


def test_attribution_of_conversion_requests_and_folio_splits() -> None:
    counters: dict[str, int | float] = {name: 0 for name in _core.COUNTER_NAMES}
    counters.update({"conversions": 3, "gmem_splits": 2})
    c = DISTINCT
    comps = {x.field: x for x in report.attribute(Stats(counters), c, "snp", 1)}
    assert set(comps) == {"psc_exit_ns", "gmem_convert_ns", "gmem_split_2m_ns"}
    assert (comps["psc_exit_ns"].count, comps["gmem_convert_ns"].count) == (3, 3)
    assert comps["gmem_split_2m_ns"].count == 2
    total = 3 * (c.psc_exit_ns + c.gmem_convert_ns) + 2 * c.gmem_split_2m_ns
    report._check_sum(list(comps.values()), total, "probe")
    # And against the engine: one 2M-folio conversion splitting two folios adds up.
    vm = VM("snp", memory="64MiB", backing="2M", folio="2M", costs=c)
    before = vm.stats
    vm.set_memory_attributes(500, 100, private=False)
    comps2, engine_ns = report._measure(vm, before, "probe")
    assert {x.field: x.count for x in comps2} == {
        "psc_exit_ns": 1,
        "gmem_convert_ns": 1,
        "gmem_split_2m_ns": 2,
    }
    assert engine_ns == pytest.approx(c.psc_exit_ns + c.gmem_convert_ns + 2 * c.gmem_split_2m_ns)


def test_attribution_refuses_unexplained_modeled_time() -> None:
    counters: dict[str, int | float] = {name: 0 for name in _core.COUNTER_NAMES}
    counters.update({"pf_taken": 1, "host_pages_allocated": 1, "modeled_ns": 1.0})
    c = CostModel()
    comps = report.attribute(Stats(counters), c, "default", 1)
    assert {x.field for x in comps} == {"exit_entry_ns", "fault_handling_ns", "host_page_alloc_ns"}
    with pytest.raises(RuntimeError, match="out of date"):
        report._check_sum(comps, 1.0, "probe")
    report._check_sum(comps, c.exit_entry_ns + c.fault_handling_ns + c.host_page_alloc_ns, "probe")


def test_text_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["report", "--vcpus", "8", "--cost", "psc_exit_ns=3000"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("SIMULATED by tdpmmu")
    assert "MODELED" in out
    assert "vCPUs: 8" in out and "psc_exit_ns=3000" in out
    assert "TDX private 4K fault, all-in, first touch" in out
    assert "[added by report]" in out
    assert "costs.md §1.2 line 83" in out and "costs.md §2 line 132" in out
    # The SNP rows reflect the override: 3 + 1.2 + 2 + 7.5 + 1 + 0.5 µs on first touch (PSC
    # added by the report); 3 + 0.107 + 1.2 + 2 + 1 + 0.5 µs once allocated (request charged
    # by the engine).
    line = next(x for x in out.splitlines() if x.startswith("SNP private 4K fault, all-in"))
    assert "15.200" in line
    line = next(x for x in out.splitlines() if x.startswith("SNP private 4K fault, host page"))
    assert "7.807" in line
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
        "tdx_reclaim_per_page@2",
        "snp_private_fault",
        "snp_private_fault_no_alloc",
    ]
    for row in d["rows"]:
        assert row["modeled_ns"] == pytest.approx(sum(c["ns"] for c in row["components"]))
        assert row["published"]["source"]
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
