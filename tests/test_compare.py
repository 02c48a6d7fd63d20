"""``compare``: one workload on every valid (VM type x hook design) pair, read side by side."""

import csv
import io
import json
from collections.abc import Iterator
from typing import Any

import pytest

import tdpmmu
from tdpmmu import compare as cmp
from tdpmmu.cli import main
from tdpmmu.workloads import private_mem_conversions

# A tiny workload: 2 vCPUs x 4 MiB (2048 test pages), 8 chunks of 4 pages, a 16-page image.
TINY: dict[str, Any] = {
    "vcpus": 2,
    "bytes_per_vcpu": "4M",
    "conversions": 8,
    "chunk_pages": 4,
    "image_pages": 16,
}
TINY_ARGS = ["-v", "2", "-b", "4M", "--conversions", "8", "--chunk-pages", "4"]
TINY_ARGS += ["--image-pages", "16"]
TEST_PAGES = 2 * 4 * 1024 * 1024 // 4096
CONVERTED = 8 * 4

#: The designs KVM ships (architecture §3/§4), which must come out correct.
UPSTREAM = {
    ("default", "none"),
    ("tdx", "mirror"),
    ("snp", "gmem"),
    ("sw_protected", "none"),
    ("sw_protected+mirror", "mirror"),
}


def tiny(**kwargs: Any) -> cmp.CompareResult:
    return cmp.compare(**{**TINY, **kwargs})


@pytest.fixture(scope="module")
def result() -> cmp.CompareResult:
    return tiny()


@pytest.fixture(scope="module")
def rows(result: cmp.CompareResult) -> dict[tuple[str, str], cmp.CompareRow]:
    return {(r.vm_type, r.design): r for r in result.rows}


def settled(r: cmp.CompareRow) -> int:
    """Faults that ended in a result: vCPU threads racing for the same new table may take a
    RETRY (counted in pf_taken and pf_retry) before their fault settles."""
    return r.faults - int(r.stats["pf_retry"])


def vm_for(label: str, design: str) -> tdpmmu.VM:
    vm_type, mirror = cmp.VM_TYPES[label]
    return tdpmmu.VM(vm_type, memory="8MiB", hooks=design, mirror=mirror)


# ----- the list of pairs --------------------------------------------------------------------


@pytest.mark.parametrize("pair", cmp.PAIRS, ids="/".join)
def test_every_listed_pair_constructs(pair: tuple[str, str]) -> None:
    vm = vm_for(*pair)
    assert vm.hooks_name == pair[1]


def unlisted_pairs() -> Iterator[tuple[str, str]]:
    for label in cmp.VM_TYPES:
        for design in cmp.DESIGNS:
            if (label, design) not in cmp.PAIRS:
                yield label, design


@pytest.mark.parametrize("pair", list(unlisted_pairs()), ids="/".join)
def test_every_unlisted_pair_is_refused_by_the_engine(pair: tuple[str, str]) -> None:
    with pytest.raises(tdpmmu.ConfigError, match="hooks"):
        vm_for(*pair)


def test_every_valid_pair_appears_once_in_order(result: cmp.CompareResult) -> None:
    assert [(r.vm_type, r.design) for r in result.rows] == list(cmp.PAIRS)


# ----- counts against each design -----------------------------------------------------------


def test_default_vm_has_no_hooks_seamcalls_or_rmp(
    rows: dict[tuple[str, str], cmp.CompareRow],
) -> None:
    r = rows["default", "none"]
    assert (r.hook_calls, r.seamcalls, r.rmpupdate, r.psmash, r.pvalidate) == (0, 0, 0, 0, 0)
    assert settled(r) == TEST_PAGES  # no conversions on a VM without private memory
    assert r.external_table_bytes == 0 and r.rmp_bytes == 0
    assert [p.name for p in r.phases] == ["setup", "demand-paging", "teardown"]
    assert any("not applicable" in n for n in r.notes)


def test_confidential_rows_take_the_same_faults(
    rows: dict[tuple[str, str], cmp.CompareRow],
) -> None:
    # Demand paging faults every test page once; each converted page faults once as shared and
    # once as private again. The design changes what a fault costs, not how many there are.
    for (label, design), r in rows.items():
        if label != "default":
            assert settled(r) == TEST_PAGES + 2 * CONVERTED, (label, design)
            names = [p.name for p in r.phases]
            assert names == ["setup", "demand-paging", "conversions", "teardown"]


def test_tdx_rows_issue_seamcalls(rows: dict[tuple[str, str], cmp.CompareRow]) -> None:
    for design in ("mirror", "private"):
        r = rows["tdx", design]
        assert r.seamcalls > 0 and r.hook_calls > 0
        assert r.stats["TDH.MEM.PAGE.ADD"] == TINY["image_pages"]  # the initial image
        assert r.stats["TDH.MEM.PAGE.AUG"] >= TEST_PAGES
        assert r.rmpupdate == r.psmash == r.pvalidate == 0
        assert r.external_table_bytes > 0  # S-EPT tables


def test_snp_designs(rows: dict[tuple[str, str], cmp.CompareRow]) -> None:
    gmem, private = rows["snp", "gmem"], rows["snp", "private"]
    # Upstream SNP: guest_memfd keeps the RMP; the NPT calls no hook.
    assert gmem.rmpupdate > 0 and gmem.hook_calls == 0 and gmem.seamcalls == 0
    assert gmem.stats["gmem_prepare"] > 0 and gmem.stats["gmem_invalidate"] > 0
    # fault->is_private: the RMP follows every private NPT change through the hooks.
    assert private.rmpupdate > 0 and private.hook_calls > 0 and private.seamcalls == 0
    assert private.stats["gmem_prepare"] == 0
    for r in (gmem, private):
        # The guest validates every private page it faults in, and rescinds before converting.
        assert r.pvalidate == TEST_PAGES + 2 * CONVERTED
        assert r.rmp_bytes == cmp.RMP_ENTRY_BYTES * (TEST_PAGES + TINY["image_pages"])


def test_sw_protected_rows(rows: dict[tuple[str, str], cmp.CompareRow]) -> None:
    plain = rows["sw_protected", "none"]
    assert plain.hook_calls == plain.seamcalls == plain.rmpupdate == 0
    for design in ("mirror", "private"):
        r = rows["sw_protected+mirror", design]
        # A software external tree: hooks fire, but nothing reaches a TDX module.
        assert r.hook_calls > 0 and r.seamcalls == 0 and r.rmpupdate == 0
        assert r.memory_bytes > plain.memory_bytes  # mirror root + external tree


def test_designs_that_must_differ_do(rows: dict[tuple[str, str], cmp.CompareRow]) -> None:
    def key(r: cmp.CompareRow) -> tuple[object, ...]:
        return (r.hook_calls, r.seamcalls, r.rmpupdate, r.memory_bytes, r.check_ok)

    for a, b in (
        (("tdx", "mirror"), ("tdx", "private")),
        (("snp", "gmem"), ("snp", "private")),
        (("sw_protected", "none"), ("sw_protected+mirror", "mirror")),
        (("sw_protected+mirror", "mirror"), ("sw_protected+mirror", "private")),
        (("default", "none"), ("tdx", "mirror")),
    ):
        assert key(rows[a]) != key(rows[b]), (a, b)


def test_upstream_designs_hold_their_invariants(
    rows: dict[tuple[str, str], cmp.CompareRow],
) -> None:
    for pair in UPSTREAM:
        r = rows[pair]
        assert r.check_ok, (pair, r.check_error)
        assert r.check == "yes" and r.check_error is None


def test_a_failed_check_is_a_result_with_a_reason(
    rows: dict[tuple[str, str], cmp.CompareRow],
) -> None:
    for r in rows.values():
        if not r.check_ok:
            assert r.check_error
            assert r.check.startswith("NO (") and r.check_error in r.check


def test_modeled_time_and_memory(rows: dict[tuple[str, str], cmp.CompareRow]) -> None:
    default, td = rows["default", "none"], rows["tdx", "mirror"]
    for r in rows.values():
        assert r.modeled_ns > 0 and r.fault_modeled_ns > 0 and r.wall_s > 0
        per_fault = r.modeled_ns_per_fault
        assert per_fault is not None and per_fault == r.fault_modeled_ns / r.faults
        # The row's modeled total is the sum of its phases.
        assert sum(p.modeled_ns for p in r.phases) == pytest.approx(r.modeled_ns)
        assert sum(p.stats["pf_taken"] for p in r.phases) == r.faults
        assert r.memory_bytes == r.page_table_peak_bytes + r.external_table_bytes + r.rmp_bytes
    # A TD fault pays for SEAMCALLs and the guest's ACCEPT on top of a normal fault.
    td_pf, default_pf = td.modeled_ns_per_fault, default.modeled_ns_per_fault
    assert td_pf is not None and default_pf is not None and td_pf > default_pf
    assert td.memory_bytes > default.memory_bytes


def test_conversion_requests_are_charged_from_the_cost_model(
    rows: dict[tuple[str, str], cmp.CompareRow],
) -> None:
    costs = tdpmmu.CostModel()
    per_request = costs.psc_exit_ns + costs.gmem_convert_ns
    requests = 2 * TINY["conversions"]
    (conv,) = [p for p in rows["snp", "gmem"].phases if p.name == "conversions"]
    assert conv.stats["conversions"] == requests
    free = tiny(types=["snp"], designs=["gmem"], costs={"psc_exit_ns": 0.0, "gmem_convert_ns": 0.0})
    (conv0,) = [p for p in free.rows[0].phases if p.name == "conversions"]
    assert conv.modeled_ns - conv0.modeled_ns == pytest.approx(requests * per_request)


# ----- workloads and options ----------------------------------------------------------------


def test_demand_paging_only() -> None:
    res = tiny(workload="demand-paging")
    assert res.params.conversions == 0
    for r in res.rows:
        assert settled(r) == TEST_PAGES
        assert "conversions" not in [p.name for p in r.phases]


def test_conversions_only() -> None:
    res = tiny(workload="conversions")
    for r in res.rows:
        # Without demand paging the guest first writes each chunk as private memory.
        assert settled(r) == (0 if r.vm_type == "default" else 3 * CONVERTED), r.vm_type
        if (r.vm_type, r.design) in UPSTREAM:
            assert r.check_ok, (r.vm_type, r.design, r.check_error)


def test_without_teardown() -> None:
    res = tiny(teardown=False)
    for r in res.rows:
        assert "teardown" not in [p.name for p in r.phases]
        assert r.stats["page_table_bytes"] > 0  # the VM was left alive
        if (r.vm_type, r.design) in UPSTREAM:
            assert r.check_ok


def test_tdx_options_reach_the_td() -> None:
    base = tiny(types=["tdx"], designs=["mirror"])
    batched = tiny(
        types=["tdx"],
        designs=["mirror"],
        tdx={"track": "batched", "sept_free": "sept_remove"},
    )
    assert base.rows[0].seamcalls != batched.rows[0].seamcalls
    assert batched.params.tdx == {"track": "batched", "sept_free": "sept_remove"}
    with pytest.raises(tdpmmu.ConfigError, match="track"):
        tiny(types=["tdx"], tdx={"track": "sometimes"})


@pytest.mark.parametrize(
    ("types", "designs", "expected"),
    [
        (["tdx"], None, [("tdx", "mirror"), ("tdx", "private")]),
        (
            ["sw_protected"],
            None,
            [
                ("sw_protected", "none"),
                ("sw_protected+mirror", "mirror"),
                ("sw_protected+mirror", "private"),
            ],
        ),
        (
            ["sw_protected+mirror"],
            None,
            [("sw_protected+mirror", "mirror"), ("sw_protected+mirror", "private")],
        ),
        (
            None,
            ["private"],
            [("tdx", "private"), ("snp", "private"), ("sw_protected+mirror", "private")],
        ),
        (["snp", "default"], ["gmem", "none"], [("default", "none"), ("snp", "gmem")]),
    ],
)
def test_filters(
    types: list[str] | None, designs: list[str] | None, expected: list[tuple[str, str]]
) -> None:
    assert list(cmp.select_pairs(types, designs)) == expected


def test_filters_that_select_nothing_or_unknown_names() -> None:
    with pytest.raises(tdpmmu.ConfigError, match="no valid pair"):
        cmp.select_pairs(["tdx"], ["gmem"])
    with pytest.raises(tdpmmu.ConfigError, match="types: unknown 'sev'"):
        cmp.select_pairs(["sev"], None)
    with pytest.raises(tdpmmu.ConfigError, match="designs: unknown"):
        cmp.select_pairs(None, ["shared"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"workload": "dirty-log"}, "workload"),
        ({"vcpus": 0}, "vcpus"),
        ({"bytes_per_vcpu": "6000"}, "bytes_per_vcpu"),
        ({"conversions": 1000, "chunk_pages": 4}, "does not fit"),
        ({"chunk_pages": 0}, "chunk_pages"),
        ({"levels": 3}, "levels"),
    ],
)
def test_bad_parameters_are_refused_before_any_pair_runs(
    kwargs: dict[str, object], match: str
) -> None:
    with pytest.raises(tdpmmu.ConfigError, match=match):
        tiny(**kwargs)


def test_a_design_that_breaks_mid_run_is_a_row(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise tdpmmu.VmBugged("VM is bugged: injected")

    monkeypatch.setattr(cmp, "private_mem_conversions", broken)
    res = tiny(types=["snp"], designs=["gmem"])
    (r,) = res.rows
    assert not r.check_ok
    assert r.check_error == "conversions: VmBugged: VM is bugged: injected"
    assert [p.name for p in r.phases] == ["setup", "demand-paging", "conversions (failed)"]
    assert settled(r) == TEST_PAGES  # the counts up to the failure are kept


# ----- output formats -----------------------------------------------------------------------


def test_json_record(result: cmp.CompareResult) -> None:
    doc = json.loads(result.to_json())
    assert doc["simulated"] is True and doc["command"] == "compare"
    params = doc["parameters"]
    assert params["vcpus"] == 2 and params["bytes_per_vcpu"] == 4 << 20
    assert params["workload"] == "both" and "psc_exit_ns" in params["costs"]
    assert [(r["vm_type"], r["design"]) for r in doc["rows"]] == list(cmp.PAIRS)
    for rec in doc["rows"]:
        assert set(cmp.SUMMARY_FIELDS) <= set(rec)
        assert rec["phases"][0]["name"] == "setup"


def test_text_table_labels_both_clocks(result: cmp.CompareResult) -> None:
    text = cmp.format_text(result)
    lines = text.splitlines()
    assert lines[0].startswith("SIMULATED by tdpmmu")
    assert "modeled" in text and "host wall" in text
    for label, design in cmp.PAIRS:
        assert any(line.split()[:2] == [label, design] for line in lines), (label, design)


@pytest.mark.cli
def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", *TINY_ARGS, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["rows"]) == len(cmp.PAIRS)
    assert doc["parameters"]["conversions"] == 8


@pytest.mark.cli
def test_cli_csv_and_filters(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["compare", *TINY_ARGS, "--csv", "--types", "tdx,snp", "--designs", "private"]
    assert main(args) == 0
    reader = csv.DictReader(io.StringIO(capsys.readouterr().out))
    assert reader.fieldnames == list(cmp.SUMMARY_FIELDS)
    got = [(r["vm_type"], r["design"]) for r in reader]
    assert got == [("tdx", "private"), ("snp", "private")]


@pytest.mark.cli
def test_cli_text_and_options(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["compare", *TINY_ARGS, "--workload", "demand-paging", "--types", "tdx"]
    args += ["--tdx", "track=batched", "--cost", "td_exit_entry_ns=0", "--no-teardown"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "teardown: no" in out and "modeled" in out and "host wall" in out
    assert "tdx      mirror" in out and "tdx      private" in out


@pytest.mark.cli
@pytest.mark.parametrize(
    "bad",
    [
        ["--tdx", "track=sometimes"],
        ["--types", "sev"],
        ["--conversions", "100000"],
    ],
)
def test_cli_bad_input_exits_2(bad: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", *TINY_ARGS, *bad]) == 2
    assert "tdpmmu compare: error:" in capsys.readouterr().err


# ----- the conversion workload on its own ----------------------------------------------------


@pytest.mark.parametrize("vm_type", ["tdx", "snp", "sw_protected"])
def test_private_mem_conversions_workload(vm_type: str) -> None:
    vm = tdpmmu.VM(vm_type, memory="8MiB", vcpus=2)
    if vm_type == "tdx":
        vm.finalize()
    res = private_mem_conversions(vm, 4, 8, touch_first=True)
    assert res.requests == 8 and res.unexpected == {}
    assert res.faults == 3 * 4 * 8  # private write, shared write, private write again
    assert res.fault_modeled_ns > 0 and res.wall_s > 0
    assert vm.stats["pf_fixed"] == res.faults
    vm.check()


def test_private_mem_conversions_refuses_what_cannot_run() -> None:
    with pytest.raises(tdpmmu.ConfigError, match="default VM"):
        private_mem_conversions(tdpmmu.VM(memory="8MiB"), 4, 8)
    vm = tdpmmu.VM("sw_protected", memory="8MiB")
    with pytest.raises(tdpmmu.ConfigError, match="without overlap"):
        private_mem_conversions(vm, 1024, 4)
    with pytest.raises(tdpmmu.ConfigError, match="vcpus"):
        private_mem_conversions(vm, 4, 4, vcpus=2)
