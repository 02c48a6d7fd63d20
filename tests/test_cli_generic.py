"""The CLI built from the workload registry: a subcommand per workload with the simulator's long
flags, the "simulated" header, ``--json``/``--out``, one-line errors, the progress bar (TTY or
not), ``compare --workload NAME`` and ``sweep``.

The machinery is tested on ``cli_probe``, a small real workload registered by this file only
(it builds its VM from the simulator arguments, faults its pages through the engine and checks
they are mapped); every registered workload is also checked for its subcommand and flags.
"""

import argparse
import csv
import io
import json
import re
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from tdpmmu import compare as cmp
from tdpmmu import render
from tdpmmu._core import ConfigError, InvariantError
from tdpmmu.cli import build_parser, main
from tdpmmu.cli import progress as progress_mod
from tdpmmu.cli.common import SIM_FLAGS
from tdpmmu.cli.progress import ProgressBar, wants_bar
from tdpmmu.costs import CostModel
from tdpmmu.vmspec import VmSpec, launch
from tdpmmu.workloads import WORKLOADS, Workload, WorkloadResult
from tdpmmu.workloads.base import Checks, Clock, finish, sim_options, spec_args

# ----- a small real workload, registered for these tests only --------------------------------

#: (progress callback or None) of each cli_probe run, in order.
CALLS: list[Any] = []


def cli_probe(
    pages: int = 16,
    refuse: str | None = None,
    corrupt: bool = False,
    skip: int = 0,
    **sim: Any,
):
    """Fault ``pages`` 4 KiB pages once each on a VM of that size (tests only); ``skip``
    leaves the last pages unfaulted, so its check fails."""
    CALLS.append(sim.get("progress"))
    start = time.perf_counter()
    options = sim_options(sim)
    if pages < 1:
        raise ConfigError(f"pages: must be >= 1, got {pages}")
    if refuse is not None and sim.get("hooks") == refuse:
        raise ConfigError(
            f"hooks: cli_probe refuses the {refuse} design (vm_type {sim['vm_type']})"
        )
    spec = VmSpec.create(**spec_args(sim), memory=pages * 4096)
    vm = spec.build()
    clock = Clock(vm, sim.get("progress"), 2)
    with clock.phase("Launch"):
        launch(vm)
    with clock.phase("Fault every page") as ph:
        vm.fault_batch(np.arange(pages - skip, dtype=np.uint64))
    mapped = int(vm.stats["pf_fixed"])
    if corrupt:
        raise InvariantError("cli_probe: asked to fail")
    checks = Checks()
    checks.add("every page is mapped", mapped == pages, f"{mapped} of {pages} pages mapped")
    checks.add("the VM holds one memslot", len(vm.memslots()) >= 1)
    return finish(
        "cli_probe",
        vm,
        spec,
        params={"pages": pages, "refuse": refuse},
        options=options,
        lines=[f"Faulted pages:\t{mapped}", f"Fault time:\t{ph.modeled_s:.9f}s"],
        metrics={"faulted_pages": mapped, "fault_time_s": ph.modeled_s},
        clock=clock,
        run_start=start,
        detail={"checks": checks.to_list()},
    )


def _add_probe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--pages", type=int, default=16, help="pages to fault (default: 16)")
    p.add_argument("--refuse", default=None, help="a design the probe refuses")
    p.add_argument("--corrupt", action="store_true", help="fail with InvariantError")
    p.add_argument("--skip", type=int, default=0, help="pages left unfaulted (a failed check)")


PROBE = Workload(
    name="cli_probe",
    command="cli-probe",
    selftest="cli_probe_test",
    summary="fault every page once (tests only).",
    run=cli_probe,
    vm_types=("default", "tdx", "snp", "sw_protected"),
    add_arguments=_add_probe_args,
    from_args=lambda ns: {
        "pages": ns.pages,
        "refuse": ns.refuse,
        "corrupt": ns.corrupt,
        "skip": ns.skip,
    },
)


@pytest.fixture(autouse=True)
def probe() -> Iterator[Workload]:
    WORKLOADS[PROBE.name] = PROBE
    CALLS.clear()
    try:
        yield PROBE
    finally:
        del WORKLOADS[PROBE.name]


def exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code or 0)


HEADER = re.compile(
    r"# tdpmmu \S+: simulated cli_probe_test on (\S+); times are modeled \(host wall \d+\.\d{3}s\)"
)


# ----- a subcommand per workload ----------------------------------------------------------------


def subparsers() -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_every_registered_workload_has_its_subcommand_and_the_simulator_flags() -> None:
    subs = subparsers()
    assert PROBE.name in WORKLOADS
    for wl in WORKLOADS.values():
        p = subs[wl.command]
        flags = {s for a in p._actions for s in a.option_strings}
        assert set(SIM_FLAGS) <= flags, (wl.command, set(SIM_FLAGS) - flags)
        for a in p._actions:
            assert a.help and a.help != argparse.SUPPRESS, (wl.command, a.dest)
        # The selftest it follows, or for tdpmmu's own workloads their name.
        assert (wl.name if wl.selftest == "tdpmmu" else wl.selftest) in p.description


def test_text_output_is_the_workloads_lines_under_a_simulated_header(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["cli-probe", "-n", "8", "--vm-type", "tdx"]) == 0
    lines = capsys.readouterr().out.splitlines()
    m = HEADER.fullmatch(lines[0])
    assert m and m.group(1) == "tdx/mirror", lines[0]
    assert lines[1] == "Faulted pages:\t8"
    assert re.fullmatch(r"Fault time:\t\d+\.\d{9}s", lines[2])
    # What the result adds: phases with both clocks, the checks, the cost breakdown.
    assert "Phases (simulated):" in lines and "Checks (2, 0 failed):" in lines
    assert "  ok    every page is mapped" in lines
    assert any(line.startswith("Modeled time by cost") for line in lines)
    assert any(line.split()[:1] == ["tdh_mem_page_aug_ns"] for line in lines)
    assert max(len(line.expandtabs()) for line in lines) <= render.WIDTH


def test_json_round_trips_and_out_writes_the_same(
    capsys: pytest.CaptureFixture[str], tmp_path: Any
) -> None:
    out = tmp_path / "r.json"
    assert main(["cli-probe", "-n", "4", "--json", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    (line,) = text.splitlines()
    doc = json.loads(line)
    assert doc["simulated"] is True and doc["workload"] == "cli_probe"
    assert doc["result"]["metrics"]["faulted_pages"] == 4
    assert WorkloadResult.from_json(line).to_dict() == doc
    assert json.loads(out.read_text()) == doc
    # --out alone keeps the text on stdout.
    assert main(["cli-probe", "-n", "4", "--out", str(out)]) == 0
    assert HEADER.fullmatch(capsys.readouterr().out.splitlines()[0])
    assert json.loads(out.read_text())["workload"] == "cli_probe"


def test_simulator_flags_reach_the_vm(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["cli-probe", "-n", "8", "--vm-type", "tdx", "--hooks", "private"]
    argv += ["--tdx", "track=batched", "--tdx", "interface=two_hook", "--cost", "exit_entry_ns=0"]
    argv += ["--cost", "fault_handling_ns=1234", "--seed", "7", "--levels", "5"]
    argv += ["--folio", "4K", "--clock", "virtual", "--mmu-lock", "exclusive"]
    argv += ["--machine", "1x8x2", "--mem-bw", "10", "--tdx-module", "1.0", "--json"]
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    vm, opts = doc["config"]["vm"], doc["config"]["workload"]["options"]
    assert (vm["vm_type"], vm["hooks"], vm["seed"], vm["levels"]) == ("tdx", "private", 7, 5)
    assert vm["tdx"] == {"track": "batched", "interface": "two_hook"}
    assert vm["folio"] == 4096
    assert vm["costs"]["exit_entry_ns"] == 0 and vm["costs"]["fault_handling_ns"] == 1234
    assert vm["costs"]["td_exit_entry_ns"] == CostModel().td_exit_entry_ns
    assert (opts["clock"], opts["mmu_lock"], opts["tdx_module"]) == ("virtual", "exclusive", "1.0")
    assert opts["machine"]["sockets"] == 1 and opts["machine"]["cores_per_socket"] == 8
    assert opts["machine"]["mem_bw_gbps"] == 10
    # The flags changed the run, not only the record: 8 private faults, each charged the
    # overridden fault_handling_ns, with the two-hook interface (no link_external_spt).
    stats = doc["result"]["stats"]
    assert stats["TDH.MEM.PAGE.AUG"] == 8 and stats["link_external_spt"] == 0
    assert doc["cost_breakdown"]["fault_handling_ns"] >= 8 * 1234


def test_mirror_flag_builds_the_mirrored_sw_protected_vm(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["cli-probe", "--vm-type", "sw_protected", "--mirror", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["config"]["vm"]["label"] == "sw_protected+mirror"
    assert doc["result"]["stats"]["set_external_spte"] == 16


@pytest.mark.parametrize(
    ("argv", "needle", "status"),
    [
        (["cli-probe", "--vm-type", "sev"], "--vm-type", 2),
        (["cli-probe", "--cost", "bogus_ns=1"], "bogus_ns", 2),
        (["cli-probe", "--machine", "1x1"], "--machine", 2),
        (["cli-probe", "--tdx", "track"], "KEY=VALUE", 2),
        (["cli-probe", "-n", "two"], "--pages", 2),
        # ConfigError from the workload or the VM: one line, exit 2.
        (["cli-probe", "-n", "0"], "pages", 2),
        (["cli-probe", "--vm-type", "snp", "--hooks", "mirror"], "hooks", 2),
        (["cli-probe", "--vm-type", "tdx", "--tdx", "track=sometimes"], "track", 2),
        (["cli-probe", "--out", "/nonexistent/dir/r.json"], "--out", 2),
        # A simulator error (a failed check): one line, exit 1.
        (["cli-probe", "--corrupt"], "InvariantError", 1),
    ],
)
def test_bad_input_is_one_line(
    argv: list[str], needle: str, status: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert exit_code(argv) == status
    cap = capsys.readouterr()
    assert needle in cap.err and "Traceback" not in cap.err
    assert len(cap.err.splitlines()) == 1, cap.err
    assert cap.err.startswith("tdpmmu cli-probe")


@pytest.mark.parametrize("json_out", [False, True])
def test_a_failed_check_prints_everything_then_exits_1(
    json_out: bool, capsys: pytest.CaptureFixture[str], tmp_path: Any
) -> None:
    out = tmp_path / "r.json"
    argv = ["cli-probe", "-n", "8", "--skip", "3", "--out", str(out)]
    assert exit_code(argv + (["--json"] if json_out else [])) == 1
    cap = capsys.readouterr()
    # stderr: one line naming the failed check (and only it).
    assert cap.err.splitlines() == ["tdpmmu cli-probe: 1 check(s) failed: every page is mapped"]
    r = WorkloadResult.from_json(out.read_text())
    assert not r.ok and r.metrics["faulted_pages"] == 5
    if json_out:
        assert WorkloadResult.from_json(cap.out) == r
    else:
        lines = cap.out.splitlines()
        assert lines[1] == "Faulted pages:\t5"
        i = lines.index("Checks (2, 1 failed):")
        assert lines[i + 1 : i + 3] == [
            "  FAIL  every page is mapped: 5 of 8 pages mapped",
            "  ok    the VM holds one memslot",
        ]
        assert any(ln.startswith("Modeled time by cost") for ln in lines)  # printed to the end


def test_a_workload_that_defines_a_simulator_flag_is_refused() -> None:
    def bad(p: argparse.ArgumentParser) -> None:
        p.add_argument("--seed", type=int, help="clashes")

    WORKLOADS["cli_clash"] = Workload(
        name="cli_clash",
        command="cli-clash",
        selftest="x",
        summary="x",
        run=cli_probe,
        vm_types=("default",),
        add_arguments=bad,
        from_args=lambda ns: {},
    )
    try:
        with pytest.raises(argparse.ArgumentError, match="--seed"):
            build_parser()
    finally:
        del WORKLOADS["cli_clash"]


# ----- the progress bar -----------------------------------------------------------------------


class FakeTTY(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_wants_bar_only_on_a_terminal_and_when_enabled() -> None:
    assert wants_bar(FakeTTY(), True)
    assert not wants_bar(FakeTTY(), False)
    assert not wants_bar(io.StringIO(), True)
    assert not wants_bar(object(), True)  # no isatty at all
    closed = io.StringIO()
    closed.close()
    assert not wants_bar(closed, True)  # isatty() raises ValueError on a closed stream


def test_bar_draws_on_a_terminal_after_the_delay() -> None:
    tty = FakeTTY()
    with ProgressBar(tty, True, "probe_test", delay=0.0) as bar:
        assert bar.active
        bar(1, 3, "first phase")
        assert bar.shown
        bar(2, 3, "second phase")
        drawn = tty.getvalue()
    assert "probe_test" in drawn and "phase" in drawn


def test_bar_stays_away_from_short_runs_pipes_and_no_progress() -> None:
    tty = FakeTTY()
    with ProgressBar(tty, True, "probe_test", delay=60.0) as bar:
        bar(1, 2, "quick")
        assert not bar.shown
    assert tty.getvalue() == ""
    pipe = io.StringIO()
    with ProgressBar(pipe, True, "probe_test", delay=0.0) as bar:
        assert not bar.active
        bar(1, 2, "x")
    assert pipe.getvalue() == ""
    with ProgressBar(FakeTTY(), False, "probe_test", delay=0.0) as bar:
        assert not bar.active


def test_bar_appears_on_its_own_timer_for_a_silent_run() -> None:
    tty = FakeTTY()
    with ProgressBar(tty, True, "silent_test", delay=0.05) as bar:
        for _ in range(200):
            if bar.shown:
                break
            time.sleep(0.01)
        assert bar.shown
    assert "silent_test" in tty.getvalue()


def test_cli_feeds_the_bar_from_the_workload_on_a_terminal(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(progress_mod, "DELAY_S", 0.0)
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    assert main(["cli-probe", "-n", "4"]) == 0
    assert isinstance(CALLS[-1], ProgressBar)  # the workload got the callback
    assert "cli_probe_test" in tty.getvalue()
    assert HEADER.fullmatch(capsys.readouterr().out.splitlines()[0])
    # --no-progress: no callback, nothing drawn.
    tty2 = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty2)
    assert main(["cli-probe", "-n", "4", "--no-progress"]) == 0
    assert CALLS[-1] is None and tty2.getvalue() == ""


def test_cli_draws_no_bar_when_stderr_is_not_a_terminal(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(progress_mod, "DELAY_S", 0.0)
    assert main(["cli-probe", "-n", "4"]) == 0
    assert CALLS[-1] is None
    assert capsys.readouterr().err == ""


# ----- compare --workload NAME ------------------------------------------------------------------


def test_compare_a_registered_workload_one_row_per_design(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["compare", "--workload", "cli-probe", "--types", "default,tdx,snp", "--json"]
    assert main([*argv, "--", "-n", "8"]) == 0
    text = capsys.readouterr().out
    doc = json.loads(text)
    assert doc["workload"] == "compare_workload"
    assert doc["config"]["workload"] == {
        "name": "cli_probe",
        "params": {"pages": 8, "refuse": None, "corrupt": False, "skip": 0},
    }
    rows = doc["result"]["rows"]
    interfaces = cmp.DEFAULTS["tdx"]["interface"]
    expected = []
    for label, design in cmp.PAIRS:  # the engine's pair order
        if label == "tdx":
            expected += [("tdx", design, f"interface={i}") for i in interfaces]
        elif label in ("default", "snp"):
            expected.append((label, design, ""))
    assert [(r["vm_type"], r["design"], r["options"]) for r in rows] == expected
    by = {(r["vm_type"], r["design"], r["options"]): r for r in rows}
    # The built-in compare's teardown audit: the private design on a TD leaves its S-EPT
    # tables behind at destroy; every other row passes.
    for r in rows:
        if (r["vm_type"], r["design"]) == ("tdx", "private"):
            assert not r["check_ok"]
            assert re.fullmatch(r"teardown: \d+ S-EPT tables never freed", r["check_error"])
            assert r["faults"] == 8  # the figures are kept
        else:
            assert r["check_ok"], r
    default, tdx = by[("default", "none", "")], by[("tdx", "mirror", "interface=four_hook")]
    assert default["seamcalls"] == default["hook_calls"] == default["rmpupdate"] == 0
    assert tdx["seamcalls"] >= 8 and tdx["hook_calls"] >= 8
    two = by[("tdx", "mirror", "interface=two_hook")]
    assert two["result"]["result"]["stats"]["link_external_spt"] == 0
    assert by[("snp", "gmem", "")]["rmpupdate"] >= 1
    for r in rows:
        assert r["modeled_ns"] == r["result"]["modeled_ns"] > 0
        assert r["memory_bytes"] >= r["page_table_peak_bytes"] > 0
    assert cmp.WorkloadComparison.from_json(text.strip()).to_dict() == doc


def test_compare_workload_refusals_failures_text_and_csv(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["compare", "--workload", "cli_probe", "--types", "tdx", "--tdx", "interface=four_hook"]
    assert main([*argv, "--", "-n", "8", "--refuse", "private"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("SIMULATED by tdpmmu") and "cli_probe_test" in lines[0]
    assert any(line.split()[:3] == ["tdx", "mirror", "8"] for line in lines), lines
    refused = [line for line in lines if line.split()[:2] == ["tdx", "private"]]
    assert any(line.endswith("n/a [1]") for line in refused), refused
    assert any("[1] tdx/private: hooks: cli_probe refuses" in line for line in lines)
    assert any(line.split()[3:] == ["faulted_pages", "fault_time_s"] for line in lines)
    assert max(len(line) for line in lines) <= render.WIDTH
    assert main([*argv, "--csv", "--", "-n", "8", "--corrupt"]) == 0
    got = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["design"], r["check_ok"], r["refused"]) for r in got] == [
        ("mirror", "False", "False"),
        ("private", "False", "False"),
    ]
    assert got[0]["check_error"].startswith("InvariantError: cli_probe: asked to fail")
    # A run that raised keeps its VM's counters up to the error.
    assert [r["faults"] for r in got] == ["8", "8"] and float(got[0]["modeled_ns"]) > 0
    # A failed check: NO (the first failed check), with the row's figures and metrics.
    assert main([*argv, "--", "-n", "8", "--skip", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if line.split()[:2] == ["tdx", "mirror"]]
    assert rows[0].split()[2] == "6", rows  # faults: the figures are kept
    assert any(line.endswith("NO [1]") for line in rows), rows
    assert any(line.startswith("[1] tdx/mirror: every page is mapped") for line in lines), lines
    res = cmp.compare_workload(
        "cli_probe", {"pages": 8, "skip": 2}, types=["tdx"], tdx={"interface": "four_hook"}
    )
    assert [r.check for r in res.rows] == ["NO (every page is mapped)"] * 2
    assert res.rows[0].result.metrics["faulted_pages"] == 6


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--workload", "cli-probe", "-b", "4M"], "-b/--bytes-per-vcpu"),
        (["--workload", "cli-probe", "--no-teardown"], "--no-teardown"),
        (["--workload", "cli-probe", "--", "-n", "x"], "--pages"),
        (["--workload", "cli-probe", "--", "-n", "0"], "pages"),  # every row refuses
        (["--workload", "cli-probe", "--types", "snp", "--designs", "mirror"], "no valid pair"),
        (["--workload", "both", "--", "-n", "4"], "registered --workload"),
        (["--workload", "bogus"], "--workload"),
    ],
)
def test_compare_workload_bad_input(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert exit_code(["compare", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.splitlines()) == 1, err


# ----- sweep ------------------------------------------------------------------------------------


def test_sweep_prints_the_table_and_writes_json_and_csv(
    capsys: pytest.CaptureFixture[str], tmp_path: Any
) -> None:
    sweep_mod = pytest.importorskip("tdpmmu.sweep")
    out, table = tmp_path / "s.json", tmp_path / "s.csv"
    argv = ["sweep", "cli-probe", "--grid", "pages=4,8", "--grid", "vm_type=default,tdx"]
    argv += ["--set", "levels=5", "--grid", "cost.fault_handling_ns=100,300"]
    argv += ["--processes", "0", "--csv", str(table), "--out", str(out)]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("cli_probe: 8 points, simulated")
    doc = json.loads(out.read_text())
    res = sweep_mod.SweepResult.from_json(out.read_text())
    assert len(res.points) == 8 and all(p.ok for p in res.points)
    assert [p.params["pages"] for p in res.points] == [4] * 4 + [8] * 4
    faulted = [p.metrics["faulted_pages"] for p in res.points]
    assert faulted == [4] * 4 + [8] * 4  # the grid value reached each run
    first = res.points[0].result
    assert first is not None and first["config"]["vm"]["levels"] == 5  # --set
    assert doc["workload"] == "cli_probe"
    rows = list(csv.DictReader(table.open()))
    assert len(rows) == 8
    # --json prints the same document.
    assert main([*argv[:-4], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["workload"] == "cli_probe"


def test_sweep_reports_failed_points_and_bad_keys(
    capsys: pytest.CaptureFixture[str],
) -> None:
    pytest.importorskip("tdpmmu.sweep")
    argv = ["sweep", "cli-probe", "--grid", "pages=4,0", "--processes", "0"]
    assert exit_code(argv) == 1
    cap = capsys.readouterr()
    assert "1 of 2 points failed" in cap.err and len(cap.err.splitlines()) == 1
    for bad, needle in (
        (["--grid", "bogus=1,2"], "bogus"),
        (["--grid", "pages"], "KEY=VALUE"),
        (["--grid", "pages=1", "--set", "pages=2"], "--grid key"),
        (["--seeds", "x"], "--seeds"),
    ):
        assert exit_code(["sweep", "cli-probe", "--processes", "0", *bad]) == 2, bad
        err = capsys.readouterr().err
        assert needle in err and len(err.splitlines()) == 1, err


def test_sweep_plot(capsys: pytest.CaptureFixture[str], tmp_path: Any) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "s.png"
    argv = ["sweep", "cli-probe", "--grid", "pages=4,8", "--grid", "vm_type=default,snp"]
    argv += ["--processes", "0", "--plot", str(png), "--x", "pages", "--y", "fault_time_s"]
    assert main([*argv, "--series", "vm_type"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert exit_code([*argv, "--series", "bogus"]) == 2
    err = capsys.readouterr().err
    assert "bogus" in err and len(err.splitlines()) == 1, err
