"""The command line: selftest-shaped text, both clocks labelled, the result envelope, every VM
type and design, one-line usage errors, help with units and allowed values, and a quiet end when
stdout is closed early."""

import argparse
import json
import re
import subprocess
import sys

import pytest

from tdpmmu import config, render
from tdpmmu.cli import EXIT_BROKEN_PIPE, build_parser, main
from tdpmmu.costs import CostModel
from tdpmmu.workloads import DemandPagingResult

RATE = r"\d+\.\d{6}"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tdpmmu", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.cli
def test_demand_paging_text_output() -> None:
    p = run_cli("demand-paging", "-v", "2", "-b", "64M")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith("SIMULATED by tdpmmu")
    assert "guest physical test memory: [0x0, 0x8000000)" in lines
    for fixed in ("Finished creating vCPUs", "Started all vCPUs", "All vCPU threads joined"):
        assert fixed in lines
    for clock in ("host wall-clock", "modeled"):
        clock_re = re.escape(clock)
        assert any(
            re.fullmatch(rf"Total guest execution time:\t\d+\.\d{{9}}s \({clock_re}\)", line)
            for line in lines
        ), clock
        assert any(
            re.fullmatch(rf"Per-vcpu demand paging rate:\t{RATE} pgs/sec/vcpu \({clock_re}\)", ln)
            for ln in lines
        ), clock
        assert any(
            re.fullmatch(rf"Overall demand paging rate:\t{RATE} pgs/sec \({clock_re}\)", ln)
            for ln in lines
        ), clock
    # Every rate line says which clock it is.
    for line in lines:
        if "rate:" in line or "execution time:" in line:
            assert line.endswith(("(host wall-clock)", "(modeled)")), line
    # The cost breakdown table, and no line beyond 100 columns.
    assert any(line.startswith("Modeled time by cost") for line in lines)
    assert any(line.split()[:1] == ["host_page_alloc_ns"] for line in lines)
    assert max(len(line.expandtabs()) for line in lines) <= render.WIDTH


@pytest.mark.cli
def test_demand_paging_json_envelope() -> None:
    p = run_cli("demand-paging", "-v", "2", "-b", "64M", "--json")
    assert p.returncode == 0, p.stderr
    (line,) = p.stdout.splitlines()
    rec = json.loads(line)
    assert rec["simulated"] is True and rec["tool"] == "tdpmmu"
    assert rec["workload"] == "demand_paging" and rec["seed"] == 0
    vm, wl, res = rec["config"]["vm"], rec["config"]["workload"], rec["result"]
    assert vm["vcpus"] == 2 and wl["bytes_per_vcpu"] == 64 << 20 and vm["backing"] == 4096
    assert wl["backing_source"] == "anonymous"
    assert res["pages_per_vcpu"] == 16384
    assert len(res["per_vcpu"]) == 2
    assert {"wall_s", "modeled_ns", "faults", "pages"} <= set(res["per_vcpu"][0])
    assert res["stats"]["pf_fixed"] == 2 * 16384
    # Host wall clock: from starting the vCPUs to joining them, never less than a thread's own.
    assert res["total_guest_execution_time_s"] >= res["slowest_vcpu_wall_s"]
    assert res["overall_demand_paging_rate_pgs_per_s"] == pytest.approx(
        2 * 16384 / res["total_guest_execution_time_s"]
    )
    slowest_ns = max(v["modeled_ns"] for v in res["per_vcpu"])
    assert res["modeled_per_vcpu_demand_paging_rate_pgs_per_s"] == pytest.approx(
        16384 / (slowest_ns / 1e9)
    )
    assert vm["costs"]["exit_entry_ns"] == CostModel().exit_entry_ns
    assert sum(rec["cost_breakdown"].values()) == pytest.approx(rec["modeled_ns"])
    assert DemandPagingResult.from_json(line).to_dict() == rec


# ----- every VM type and design -----------------------------------------------------------------

PAIRS = [(v, d) for v in config.VARIANTS for d in v.designs]


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p[0].label}/{p[1]}")
def test_demand_paging_on_every_vm_type_and_design(
    pair: tuple[config.Variant, str], capsys: pytest.CaptureFixture[str]
) -> None:
    variant, design = pair
    argv = ["demand-paging", "--vm-type", variant.vm_type, "--hooks", design]
    argv += ["--mirror"] if variant.mirror else []
    argv += ["-v", "2", "-b", "1M", "--image-pages", "4", "--json"]
    assert main(argv) == 0
    rec = json.loads(capsys.readouterr().out)
    vm, stats = rec["config"]["vm"], rec["result"]["stats"]
    assert (vm["label"], vm["hooks"]) == (variant.label, design)
    assert stats["pf_fixed"] == 512
    if variant.vm_type == "tdx":
        assert stats["TDH.MEM.PAGE.ADD"] == 4 and stats["TDH.MEM.PAGE.AUG"] == 512


@pytest.mark.cli
def test_demand_paging_tdx_subprocess() -> None:
    # The reported failure: "TD is not finalized".
    p = run_cli("demand-paging", "--vm-type", "tdx", "-b", "1M", "--tdx", "track=batched")
    assert p.returncode == 0, p.stderr
    assert "tdx/mirror" in p.stdout and "track=batched" in p.stdout


def test_demand_paging_design_options(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["demand-paging", "--vm-type", "tdx", "-b", "1M", "--json"]
    assert main([*argv, "--tdx", "interface=two_hook"]) == 0
    two = json.loads(capsys.readouterr().out)
    assert two["config"]["vm"]["tdx"] == {"interface": "two_hook"}
    assert two["result"]["stats"]["link_external_spt"] == 0
    argv = ["demand-paging", "--vm-type", "snp", "-b", "4M", "-s", "anonymous_thp", "--json"]
    assert main([*argv, "--folio", "2M"]) == 0
    huge = json.loads(capsys.readouterr().out)
    assert huge["config"]["vm"]["folio"] == 2 << 20
    assert huge["result"]["stats"]["pages_2m"] == 2


def test_backing_sources_and_cost_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(
        [
            "demand-paging",
            "-b",
            "4M",
            "-s",
            "anonymous_thp",
            "--cost",
            "exit_entry_ns=0",
            "--cost",
            "fault_handling_ns=1000",
            "--clock",
            "host",
            "--json",
        ]
    )
    assert rc == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["config"]["workload"]["options"]["clock"] == "host"
    vm = rec["config"]["vm"]
    assert (
        vm["backing"] == 2 << 20 and rec["config"]["workload"]["backing_source"] == "anonymous_thp"
    )
    assert rec["result"]["stats"]["pages_2m"] == 2
    assert vm["costs"]["exit_entry_ns"] == 0.0
    # Two 2M faults: handling + map step + allocation + zeroing the other 511 4K pages, no exit
    # cost.
    c = vm["costs"]
    per_fault = (
        c["fault_handling_ns"]
        + c["fault_map_ns"]
        + c["host_page_alloc_ns"]
        + 511 * c["host_zero_4k_ns"]
    )
    assert rec["modeled_ns"] == pytest.approx(2 * per_fault)


def test_demand_paging_defaults_to_virtual_time(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demand-paging", "-v", "2", "-b", "4M", "-s", "anonymous_thp", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["config"]["workload"]["options"]["clock"] == "virtual"
    # Each 2M page is fixed exactly once; every access is a hit or exactly one outcome.
    stats = rec["result"]["stats"]
    assert stats["pages_2m"] == 4 and stats["pf_fixed"] == 4
    o = rec["result"]["virtual"]["outcomes"]
    assert o["accesses"] == 2 * 1024
    assert o["accesses"] == (
        o["hits"] + o["fixed"] + o["spurious"] + o["emulate"] + o["write_protected"]
    )
    assert o["fixed"] == 4


def test_overlap_and_levels(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demand-paging", "-v", "2", "-b", "1M", "-o", "--levels", "5", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["config"]["workload"]["overlap"] is True and rec["config"]["vm"]["levels"] == 5
    assert rec["result"]["pages_per_vcpu"] == 512  # each vCPU walks the whole 2 x 1M region


# ----- errors: one line on stderr, exit code 2 ------------------------------------------------


def exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code or 0)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["demand-paging", "--cost", "bogus_ns=1"], "bogus_ns"),
        (["demand-paging", "--cost", "exit_entry_ns"], "NAME=VALUE"),
        (["demand-paging", "-s", "shmem_huge"], "--backing"),
        (["demand-paging", "-v", "0"], "--vcpus"),
        (["demand-paging", "--levels", "3"], "--levels"),
        (["demand-paging", "-b", "3000"], "bytes-per-vcpu"),
        (["demand-paging", "--vm-type", "bogus"], "vm-type"),
        (["demand-paging", "--cost", "exit_entry_ns=-5"], "exit_entry_ns"),
        (["demand-paging", "--vm-type", "snp", "--hooks", "mirror"], "hooks"),
        (["demand-paging", "--vm-type", "tdx", "--tdx", "track=sometimes"], "track"),
        (["demand-paging", "--vm-type", "default", "--tdx", "track=batched"], "tdx"),
        (["demand-paging", "--vm-type", "tdx", "--mirror"], "mirror"),
        (["compare", "--backing", "3M"], "--backing"),
        (["compare", "--folio", "1G"], "--folio"),
        (["compare", "--types", "sev"], "types"),
        (["compare", "--tdx", "track=sometimes"], "track"),
        (["compare", "-b", "4M", "--conversions", "100000"], "does not fit"),
        (["compare", "--bogus"], "--bogus"),
        (["report", "--vcpus", "0"], "--vcpus"),
        ([], "COMMAND"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert exit_code(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert len(err.splitlines()) == 1, err


@pytest.mark.cli
def test_bad_flags_subprocess() -> None:
    for argv in (["compare", "--bogus"], ["demand-paging", "--vm-type", "sev"]):
        p = run_cli(*argv)
        assert p.returncode == 2 and p.stdout == ""
        assert len(p.stderr.splitlines()) == 1 and "error:" in p.stderr, p.stderr


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert "tdpmmu 0.1.0" in capsys.readouterr().out


# ----- help: every option explained, with units and allowed values ---------------------------


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


@pytest.mark.parametrize("command", ["demand-paging", "compare", "report"])
def test_every_option_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    sub = subparsers()[command]
    for action in sub._actions:
        assert action.help and action.help != argparse.SUPPRESS, action.dest
        if action.choices is not None:
            for choice in action.choices:
                # Allowed values are listed in the help or shown by argparse's {a,b} metavar.
                assert str(choice) in sub.format_help(), (action.dest, choice)
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "nanoseconds" in text  # --cost's unit
    assert "Exit status" in text


def test_help_lists_what_the_engine_allows(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("demand-paging", "compare"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for key in config.TDX_OPTION_CHOICES:
            assert key in text, (command, key)
        for name in CostModel.field_names():
            assert name in text, (command, name)
        assert "powers of 1024" in text and "4 KiB pages" in text
    with pytest.raises(SystemExit):
        main(["demand-paging", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for v in config.VARIANTS:
        assert f"{v.label}: {'|'.join(v.designs)}" in text
    for vm_type in config.VM_TYPES:
        assert vm_type in text


# ----- a reader that goes away early ----------------------------------------------------------


@pytest.mark.cli
@pytest.mark.parametrize(
    "argv",
    [
        ["demand-paging", "-b", "1M"],
        ["demand-paging", "-b", "1M", "--json"],
        ["compare", "-v", "1", "-b", "1M", "--types", "snp", "--image-pages", "0"],
        ["report", "--vcpus", "1"],
    ],
    ids=lambda a: " ".join(a),
)
def test_closed_stdout_ends_quietly(argv: list[str]) -> None:
    # As `python -m tdpmmu ... | head` when head has already exited: the first write fails.
    proc = subprocess.Popen(
        [sys.executable, "-m", "tdpmmu", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == EXIT_BROKEN_PIPE, err
    assert err == ""
