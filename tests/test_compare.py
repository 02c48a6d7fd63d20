"""``compare``: one workload on every valid (VM type x hook design) pair, read side by side."""

import csv
import io
import json
from collections.abc import Iterator
from typing import Any

import pytest

import tdpmmu
from tdpmmu import compare as cmp
from tdpmmu import config, render
from tdpmmu.cli import main
from tdpmmu.vmspec import VmSpec, launch
from tdpmmu.workloads import private_mem_conversions

# A tiny workload: 2 vCPUs x 4 MiB (2048 test pages), 8 chunks of 4 pages, a 16-page image, on
# 4K pages so that every page write is one fault (the 2M defaults are tested on their own).
TINY: dict[str, Any] = {
    "vcpus": 2,
    "bytes_per_vcpu": "4M",
    "conversions": 8,
    "chunk_pages": 4,
    "image_pages": 16,
    "backing": "4K",
    "folio": "4K",
}
TINY_ARGS = ["-v", "2", "-b", "4M", "--conversions", "8", "--chunk-pages", "4"]
TINY_ARGS += ["--image-pages", "16", "--backing", "4K", "--folio", "4K"]
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


#: The TDX options of the rows the per-pair tests look at: the engine's default interface.
DEFAULT_INTERFACE = config.TDX_OPTION_CHOICES["interface"][0]


@pytest.fixture(scope="module")
def rows(result: cmp.CompareResult) -> dict[tuple[str, str], cmp.CompareRow]:
    return {
        (r.vm_type, r.design): r
        for r in result.rows
        if r.tdx.get("interface", DEFAULT_INTERFACE) == DEFAULT_INTERFACE
    }


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


def test_pairs_are_the_engines_matrix() -> None:
    expected_pairs = tuple((v.label, d) for v in config.VARIANTS for d in v.designs)
    assert expected_pairs == cmp.PAIRS
    assert config.DESIGNS == cmp.DESIGNS
    expected = {v.label: (v.vm_type, v.mirror) for v in config.VARIANTS}
    assert dict(cmp.VM_TYPES) == expected


def test_every_valid_pair_appears_in_order_once_per_swept_option(
    result: cmp.CompareResult,
) -> None:
    seen = [(r.vm_type, r.design) for r in result.rows]
    assert list(dict.fromkeys(seen)) == list(cmp.PAIRS)
    interfaces = config.TDX_OPTION_CHOICES["interface"]
    for label, design in cmp.PAIRS:
        got = [r for r in result.rows if (r.vm_type, r.design) == (label, design)]
        if config.variant(*cmp.VM_TYPES[label]).tdx_options:
            assert [r.tdx["interface"] for r in got] == list(interfaces)
        else:
            assert [r.tdx for r in got] == [{}]


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
    one = {"interface": DEFAULT_INTERFACE}
    base = tiny(types=["tdx"], designs=["mirror"], tdx=one)
    batched = tiny(
        types=["tdx"],
        designs=["mirror"],
        tdx={**one, "track": "batched", "sept_free": "sept_remove"},
    )
    assert len(base.rows) == len(batched.rows) == 1
    assert base.rows[0].seamcalls != batched.rows[0].seamcalls
    assert batched.rows[0].tdx == {**one, "track": "batched", "sept_free": "sept_remove"}
    assert batched.params.tdx["track"] == ("batched",)
    with pytest.raises(tdpmmu.ConfigError, match="track"):
        tiny(types=["tdx"], tdx={"track": "sometimes"})
    with pytest.raises(tdpmmu.ConfigError, match="none of the selected rows"):
        tiny(types=["snp"], tdx={"track": "batched"})


def test_tdx_option_values_are_swept() -> None:
    res = tiny(types=["tdx"], designs=["mirror"], tdx={"track": "per_page,batched"})
    got = [(r.tdx["interface"], r.tdx["track"]) for r in res.rows]
    interfaces = config.TDX_OPTION_CHOICES["interface"]
    assert got == [(i, t) for i in interfaces for t in ("per_page", "batched")]
    assert res.params.swept == ("interface", "track")


@pytest.mark.parametrize(
    ("types", "designs", "expected"),
    [
        (["tdx"], None, {("tdx", "mirror"), ("tdx", "private")}),
        (
            ["sw_protected"],
            None,
            {
                ("sw_protected", "none"),
                ("sw_protected+mirror", "mirror"),
                ("sw_protected+mirror", "private"),
            },
        ),
        (
            ["sw_protected+mirror"],
            None,
            {("sw_protected+mirror", "mirror"), ("sw_protected+mirror", "private")},
        ),
        (
            None,
            ["private"],
            {("tdx", "private"), ("snp", "private"), ("sw_protected+mirror", "private")},
        ),
        (["snp", "default"], ["gmem", "none"], {("default", "none"), ("snp", "gmem")}),
    ],
)
def test_filters(
    types: list[str] | None, designs: list[str] | None, expected: set[tuple[str, str]]
) -> None:
    # The selected pairs, in the matrix's order.
    assert list(cmp.select_pairs(types, designs)) == [p for p in cmp.PAIRS if p in expected]


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


def test_json_envelope(result: cmp.CompareResult) -> None:
    doc = json.loads(result.to_json())
    assert doc["simulated"] is True and doc["workload"] == "compare"
    assert doc["version"] == tdpmmu.__version__ and doc["seed"] == 0
    params = doc["config"]["workload"]
    assert params["vcpus"] == 2 and params["bytes_per_vcpu"] == 4 << 20
    assert params["workload"] == "both" and "psc_exit_ns" in params["costs"]
    rows = doc["result"]["rows"]
    assert [(r["vm_type"], r["design"]) for r in rows] == [
        (r.vm_type, r.design) for r in result.rows
    ]
    assert len(doc["config"]["vms"]) == len(rows)
    for rec in rows:
        assert set(cmp.SUMMARY_FIELDS) <= set(rec)
        assert rec["phases"][0]["name"] == "setup"
        # Each row: its full VM configuration and its modeled time by cost field.
        assert rec["spec"]["costs"] == params["costs"]
        assert sum(rec["cost_breakdown"].values()) == pytest.approx(rec["modeled_ns"])
    assert doc["modeled_ns"] == pytest.approx(sum(r["modeled_ns"] for r in rows))
    assert sum(doc["cost_breakdown"].values()) == pytest.approx(doc["modeled_ns"])
    assert doc["wall_s"] >= sum(r["wall_s"] for r in rows)
    assert cmp.CompareResult.from_json(result.to_json()) == result


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
    pairs = {(r["vm_type"], r["design"]) for r in doc["result"]["rows"]}
    assert pairs == set(cmp.PAIRS)
    assert doc["config"]["workload"]["conversions"] == 8


@pytest.mark.cli
def test_cli_csv_and_filters(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["compare", *TINY_ARGS, "--csv", "--types", "tdx,snp", "--designs", "private"]
    assert main(args) == 0
    reader = csv.DictReader(io.StringIO(capsys.readouterr().out))
    assert reader.fieldnames == list(cmp.SUMMARY_FIELDS)
    got = [(r["vm_type"], r["design"], r["options"]) for r in reader]
    interfaces = config.TDX_OPTION_CHOICES["interface"]
    expected = [("snp", "private", "")]
    expected += [("tdx", "private", f"interface={i}") for i in interfaces]
    assert [g for g in got if g[0] == "snp"] + [g for g in got if g[0] == "tdx"] == expected
    assert len(got) == len(expected)


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
    vm = VmSpec.create(vm_type, memory="8MiB", vcpus=2).build()
    launch(vm)
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
    with pytest.raises(tdpmmu.ConfigError, match="chunks"):
        private_mem_conversions(vm, 0, 4)
    with pytest.raises(tdpmmu.ConfigError, match="finalized"):
        private_mem_conversions(tdpmmu.VM("tdx", memory="8MiB"), 4, 4)


# ----- defaults that fit any size -------------------------------------------------------------


def test_default_conversions_are_scaled_to_a_small_region() -> None:
    default_n, default_chunk = cmp.DEFAULTS["conversions"], cmp.DEFAULTS["chunk_pages"]
    # Large enough: the defaults as they are, nothing said.
    assert cmp.fit_conversions(4 * default_n * default_chunk) == (default_n, default_chunk, ())
    # 4 MiB (1024 pages): scaled so that the chunks cover at most half of the region, and said.
    n, chunk, adjusted = cmp.fit_conversions(1024)
    assert chunk == default_chunk and n * chunk * 2 <= 1024 and n < default_n
    assert len(adjusted) == 1 and f"{default_n} -> {n}" in adjusted[0]
    # A region smaller than one chunk: both scale down.
    n, chunk, adjusted = cmp.fit_conversions(3)
    assert (n, chunk) == (1, 3) and len(adjusted) == 2
    # A value given is kept, and refused when it does not fit; nothing is scaled without a
    # conversion phase.
    assert cmp.fit_conversions(1024, 8, 4)[:2] == (8, 4)
    with pytest.raises(tdpmmu.ConfigError, match="does not fit"):
        cmp.fit_conversions(1024, default_n, default_chunk)
    assert cmp.fit_conversions(1024, convert=False)[2] == ()


def test_compare_runs_on_4m_with_default_conversions(capsys: pytest.CaptureFixture[str]) -> None:
    # Used to fail: 512 x 16 pages do not fit in 4 MiB.
    assert main(["compare", "-b", "4M", "-v", "1", "--types", "snp"]) == 0
    out = capsys.readouterr().out
    assert "scaled to fit: conversions 512 ->" in out
    (conv,) = [p for p in tiny_snp_conversions().phases if p.name == "conversions"]
    assert conv.stats["conversions"] > 0


def tiny_snp_conversions() -> cmp.CompareRow:
    (row,) = cmp.compare(
        vcpus=1, bytes_per_vcpu="4M", types=["snp"], designs=["gmem"], image_pages=0
    ).rows
    return row


# ----- defaults that show what the designs change ----------------------------------------------


@pytest.fixture(scope="module")
def defaults() -> cmp.CompareResult:
    # The default backing, folio and TDX sweep, on a tiny region.
    return cmp.compare(vcpus=2, bytes_per_vcpu="4M", image_pages=16)


def test_default_snp_designs_differ(defaults: cmp.CompareResult) -> None:
    assert defaults.params.backing == defaults.params.folio == 2 << 20
    by = {(r.vm_type, r.design): r for r in defaults.rows}
    gmem, private = by["snp", "gmem"], by["snp", "private"]
    # 2M folios let gmem prepare 2M RMP entries and map 2M leaves; the private design's hooks
    # install 4K NPT leaves one RMPUPDATE each.
    assert gmem.huge_leaves > 0 == private.huge_leaves
    assert gmem.faults < private.faults and gmem.rmpupdate < private.rmpupdate
    assert gmem.check_ok and private.check_ok, (gmem.check_error, private.check_error)
    # Same rows on 4K pages: the designs' fault counts no longer differ.
    small = tiny(types=["snp"])
    assert len({r.faults - r.retries for r in small.rows}) == 1


def test_default_hook_interfaces_differ(defaults: cmp.CompareResult) -> None:
    for label, design in cmp.PAIRS:
        if not config.variant(*cmp.VM_TYPES[label]).tdx_options:
            continue
        got = [r for r in defaults.rows if (r.vm_type, r.design) == (label, design)]
        assert len(got) == len(config.TDX_OPTION_CHOICES["interface"]) >= 2
        four, two = got[0], got[1]
        hooks = [tuple(r.hook(h) for h in cmp.HOOK_COUNTERS) for r in (four, two)]
        assert hooks[0] != hooks[1], (label, design)
        assert four.hook_calls == two.hook_calls  # the same calls under other names
        assert four.seamcalls == two.seamcalls
        assert four.check_ok == two.check_ok


def test_text_output_fits_and_says_what_it_shows(defaults: cmp.CompareResult) -> None:
    text = cmp.format_text(defaults)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= render.WIDTH
    # The "total" column says it is summed over vCPUs.
    (rule,) = [i for i, line in enumerate(lines) if line.startswith("Modeled time, memory")]
    assert "over vCPUs" in "\n".join(lines[rule : rule + 5])
    # External tables are S-EPT only on a TD.
    for line in lines:
        if "sw_protected+mirror/" in line and "never freed" in line:
            assert "external tables" in line and "S-EPT" not in line
    footnotes = [line for line in lines if line.startswith("[")]
    assert footnotes and all("S-EPT" not in f for f in footnotes if "sw_protected+mirror" in f)
    assert any("tdx/" in f and "S-EPT tables never freed" in f for f in footnotes)
    assert "What the tables show:" in lines


def test_findings_are_derived_from_the_rows(defaults: cmp.CompareResult) -> None:
    text = " ".join(cmp.format_text(defaults).split())
    findings = text[text.index("What the tables show:") :]
    # Which design costs least per fault, per VM type with a choice.
    for label in ("snp",):
        rows = [r for r in defaults.rows if r.vm_type == label]
        best = min(rows, key=lambda r: r.modeled_ns_per_fault or 0.0)
        assert f"{label}: {best.design} costs least per fault" in findings
    # Every failed row is explained with its own counts; a design that held is not mentioned.
    for r in defaults.rows:
        if not r.check_ok:
            left = int(r.stats["sept_tables"])
            assert f"{left:,} {cmp.external_tables_name(r.spec.vm_type)} were never freed" in (
                findings
            )
    failed_designs = {r.design for r in defaults.rows if not r.check_ok}
    assert failed_designs, "the private design on a mirror root is expected to fail teardown"
    assert failed_designs <= {"private"}
    assert "The expected finding for the private design" in findings
    upstream_ok = [r for r in defaults.rows if r.check_ok]
    assert f"Every other row ({len(upstream_ok)}) passed" in findings
    # Without a failing row, no failure is reported.
    clean = cmp.format_text(tiny(types=["tdx"], designs=["mirror"]))
    assert "Every row passed its check and teardown audit." in clean
    assert "never freed" not in clean


@pytest.mark.cli
def test_cli_backing_and_folio(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["compare", "-v", "1", "-b", "4M", "--types", "snp", "--designs", "gmem", "--json"]
    rows = {}
    for size in ("4K", "2M"):
        assert main([*base, "--backing", size, "--folio", size]) == 0
        (rows[size],) = json.loads(capsys.readouterr().out)["result"]["rows"]
    assert rows["2M"]["huge_leaves"] > 0 == rows["4K"]["huge_leaves"]
    assert rows["2M"]["faults"] < rows["4K"]["faults"]
    assert rows["2M"]["spec"]["folio"] == 2 << 20


def test_compare_results_as_frames() -> None:
    """Both comparisons give one DataFrame row per row, with the summary columns."""
    pytest.importorskip("pandas")
    from tdpmmu.compare import compare, compare_workload

    r = compare(vcpus=1, bytes_per_vcpu="1M", types=["default", "snp"], conversions=2)
    df = r.to_pandas()
    assert len(df) == len(r.rows)
    assert list(df["vm_type"]) == [row.vm_type for row in r.rows]
    assert list(df["faults"]) == [row.summary()["faults"] for row in r.rows]
    w = compare_workload("pre_fault_memory", types=["default", "sw_protected"])
    wf = w.to_pandas()
    assert len(wf) == len(w.rows) and "vm_type" in wf.columns


def test_compare_workload_gives_demand_paging_the_built_in_verdicts() -> None:
    # compare --workload demand_paging runs the built-in comparison's teardown audit after the
    # workload, so each design gets the same verdict as in the built-in demand-paging phase:
    # the private design leaves S-EPT tables behind at teardown.
    small = {"vcpus": 2, "bytes_per_vcpu": "1M"}
    built_in = cmp.compare(
        "demand-paging", **small, types=["tdx"], tdx={"interface": "four_hook"}, image_pages=0
    )
    res = cmp.compare_workload(
        "demand_paging", small, types=["tdx"], tdx={"interface": "four_hook"}
    )
    want = {r.design: r.check_ok for r in built_in.rows}
    assert want == {"mirror": True, "private": False}
    assert {r.design: r.check_ok for r in res.rows} == want
    private = next(r for r in res.rows if r.design == "private")
    assert (
        private.check.startswith("NO (teardown: ") and "S-EPT tables never freed" in private.check
    )
    # The workload's own figures are kept beside the verdict.
    assert private.result is not None and private.result.ok and private.faults > 0
    back = cmp.WorkloadComparison.from_json(res.to_json())
    assert [r.check for r in back.rows] == [r.check for r in res.rows]


def test_builtin_compare_reports_progress_per_row() -> None:
    """``compare(progress=...)`` is called once per row, counting up to the number of rows."""
    from tdpmmu.compare import compare

    seen: list[tuple[int, int, str]] = []
    r = compare(
        vcpus=1,
        bytes_per_vcpu="1M",
        types=["default", "snp"],
        progress=lambda done, total, label: seen.append((done, total, label)),
    )
    assert [s[0] for s in seen] == list(range(1, len(r.rows) + 1))
    assert all(s[1] == len(r.rows) for s in seen)
    assert seen[0][2] == f"{r.rows[0].vm_type}/{r.rows[0].design}"
