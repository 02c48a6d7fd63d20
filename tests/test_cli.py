"""The command line on the real workloads: selftest-shaped text under a "simulated" header, the
result envelope, every VM type and design, one-line usage errors, help with units and allowed
values, ``python -m tdpmmu`` in a subprocess, and a quiet end when stdout is closed early."""

import argparse
import json
import re
import subprocess
import sys
from typing import Any

import pytest

from tdpmmu import compare as cmp
from tdpmmu import config, render
from tdpmmu.cli import EXIT_BROKEN_PIPE, build_parser, main
from tdpmmu.costs import CostModel
from tdpmmu.workloads import WORKLOADS, DemandPagingResult

RATE = r"\d+\.\d{6}"
HEADER = re.compile(
    r"# tdpmmu \S+: simulated (\S+) on (\S+); times are modeled \(host wall \d+\.\d{3}s\)"
)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tdpmmu", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code or 0)


# ----- demand-paging: the selftest's lines ------------------------------------------------------


@pytest.mark.cli
def test_demand_paging_text_output() -> None:
    p = run_cli("demand-paging", "-v", "2", "-b", "16M")
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""  # no progress bar: stderr is a pipe
    lines = p.stdout.splitlines()
    m = HEADER.fullmatch(lines[0])
    assert m and m.groups() == ("demand_paging_test", "default/none"), lines[0]
    assert "Random seed: 0x6b8b4567" in lines
    (region,) = [ln for ln in lines if ln.startswith("guest physical test memory: [")]
    start, end = (int(x, 16) for x in re.findall(r"0x[0-9a-f]+", region))
    assert end - start == 2 * 16 << 20
    for fixed in ("Started all vCPUs", "All vCPU threads joined"):
        assert fixed in lines
    assert any(re.fullmatch(r"Total guest execution time:\t\d+\.\d{9}s", ln) for ln in lines)
    assert any(
        re.fullmatch(rf"Per-vcpu demand paging rate:\t{RATE} pgs/sec/vcpu", ln) for ln in lines
    )
    assert any(re.fullmatch(rf"Overall demand paging rate:\t{RATE} pgs/sec", ln) for ln in lines)
    # What the result adds: checks, virtual-time outcomes, vCPU time by resource, costs.
    i = lines.index("Checks (2, 0 failed):")
    assert lines[i + 1 : i + 3] == [
        "  ok    every vCPU made one access per page of its slice",
        "  ok    the whole region is mapped",
    ]
    assert any(ln.startswith("Accesses 8,192: ") for ln in lines)
    assert any(ln.startswith("mmu_lock: ") for ln in lines)
    assert "vCPU modeled time by resource (simulated):" in lines
    assert any(ln.startswith("Modeled time by cost") for ln in lines)
    assert any(ln.split()[:1] == ["host_page_alloc_ns"] for ln in lines)
    assert max(len(ln.expandtabs()) for ln in lines) <= render.WIDTH


@pytest.mark.cli
def test_demand_paging_json_envelope() -> None:
    p = run_cli("demand-paging", "-v", "2", "-b", "16M", "--json")
    assert p.returncode == 0, p.stderr
    (line,) = p.stdout.splitlines()
    rec = json.loads(line)
    assert rec["simulated"] is True and rec["tool"] == "tdpmmu"
    assert rec["workload"] == "demand_paging" and rec["seed"] == 0
    vm, wl, res = rec["config"]["vm"], rec["config"]["workload"], rec["result"]
    assert vm["vcpus"] == 2 and wl["bytes_per_vcpu"] == 16 << 20 and vm["backing"] == 4096
    assert res["stats"]["pf_fixed"] == 2 * 4096
    metrics = res["metrics"]
    assert metrics["overall_demand_paging_rate_pgs_per_s"] == pytest.approx(
        2 * 4096 / metrics["total_guest_execution_time_s"]
    )
    assert vm["costs"]["exit_entry_ns"] == CostModel().exit_entry_ns
    assert sum(rec["cost_breakdown"].values()) == pytest.approx(rec["modeled_ns"])
    assert DemandPagingResult.from_json(line).to_dict() == rec


# ----- every registered workload on a small size ---------------------------------------------

#: Small arguments for each registered workload's subcommand (every one must be here).
SMALL = {
    "demand-paging": ["-v", "2", "-b", "2M"],
    "dirty-log-perf": ["-v", "2", "-b", "2M"],
    "access-tracking-perf": ["-b", "2M"],
    "kvm-page-table": ["-b", "4M"],
    "mmu-stress": ["-c", "2", "--mem-bytes", "8M", "--slot-bytes", "2M"],
    "pre-fault-memory": [],
    "td-lifecycle": ["-b", "2M", "--vm-type", "tdx"],
    "snp-boot": ["-b", "2M", "--vm-type", "snp"],
    "memslot-perf": ["--scale", "32", "-l", "0.001", "-s", "64"],
    "private-mem-conversions": ["--vm-type", "tdx"],
}


@pytest.mark.parametrize("wl", list(WORKLOADS.values()), ids=lambda w: w.command)
def test_every_workload_subcommand_runs(wl: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert wl.command in SMALL, f"add small arguments for {wl.command} to SMALL"
    assert main([wl.command, *SMALL[wl.command], "--json"]) == 0
    text = capsys.readouterr().out
    doc = json.loads(text)
    assert doc["workload"] == wl.name and doc["simulated"] is True
    assert doc["config"]["vm"]["vm_type"] in wl.vm_types
    assert main([wl.command, *SMALL[wl.command]]) == 0
    lines = capsys.readouterr().out.splitlines()
    m = HEADER.fullmatch(lines[0])
    assert m, lines[0]
    assert m.group(1) == (wl.name if wl.selftest == "tdpmmu" else wl.selftest)
    assert lines[1 : 1 + len(doc["result"]["lines"])] == doc["result"]["lines"]


# ----- every VM type and design -----------------------------------------------------------------

PAIRS = [(v, d) for v in config.VARIANTS for d in v.designs]


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p[0].label}/{p[1]}")
def test_demand_paging_on_every_vm_type_and_design(
    pair: tuple[config.Variant, str], capsys: pytest.CaptureFixture[str]
) -> None:
    variant, design = pair
    argv = ["demand-paging", "--vm-type", variant.vm_type, "--hooks", design]
    argv += ["--mirror"] if variant.mirror else []
    argv += ["-v", "2", "-b", "1M", "--json"]
    assert main(argv) == 0
    rec = json.loads(capsys.readouterr().out)
    vm, stats = rec["config"]["vm"], rec["result"]["stats"]
    assert (vm["label"], vm["hooks"]) == (variant.label, design)
    assert stats["pf_fixed"] == 512
    if variant.vm_type == "tdx":
        assert stats["TDH.MEM.PAGE.AUG"] == 512


@pytest.mark.cli
def test_demand_paging_tdx_subprocess() -> None:
    p = run_cli("demand-paging", "--vm-type", "tdx", "-b", "1M", "--tdx", "track=batched")
    assert p.returncode == 0, p.stderr
    assert HEADER.fullmatch(p.stdout.splitlines()[0]).group(2) == "tdx/mirror"  # type: ignore[union-attr]
    assert "track=batched" in p.stdout  # the "# VM:" line


def test_demand_paging_design_options(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["demand-paging", "--vm-type", "tdx", "-b", "1M", "--json"]
    assert main([*argv, "--tdx", "interface=two_hook"]) == 0
    two = json.loads(capsys.readouterr().out)
    assert two["config"]["vm"]["tdx"] == {"interface": "two_hook"}
    assert two["result"]["stats"]["link_external_spt"] == 0
    assert two["result"]["stats"]["set_external_spte"] > 256
    argv = ["demand-paging", "--vm-type", "snp", "-b", "4M", "-s", "anonymous_thp", "--json"]
    assert main([*argv, "--folio", "2M"]) == 0
    huge = json.loads(capsys.readouterr().out)
    assert huge["config"]["vm"]["folio"] == 2 << 20
    assert huge["result"]["stats"]["pages_2m"] == 2


def test_backing_sources_and_cost_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["demand-paging", "-b", "4M", "-s", "anonymous_thp", "--clock", "host", "--json"]
    assert main(argv) == 0
    base = json.loads(capsys.readouterr().out)
    assert main([*argv, "--cost", "exit_entry_ns=0", "--cost", "fault_handling_ns=1000"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["config"]["workload"]["options"]["clock"] == "host"
    vm = rec["config"]["vm"]
    assert vm["backing"] == 2 << 20 and rec["config"]["workload"]["backing_source"] == (
        "anonymous_thp"
    )
    assert rec["result"]["stats"]["pages_2m"] == 2
    assert vm["costs"]["exit_entry_ns"] == 0.0 and vm["costs"]["fault_handling_ns"] == 1000
    # The overrides change exactly their own fields of the breakdown.
    assert rec["cost_breakdown"].get("exit_entry_ns", 0.0) == 0.0
    assert base["cost_breakdown"]["exit_entry_ns"] > 0
    n = base["cost_breakdown"]["fault_handling_ns"] / CostModel().fault_handling_ns
    assert rec["cost_breakdown"]["fault_handling_ns"] == pytest.approx(1000 * n)
    for k, v in base["cost_breakdown"].items():
        if k not in ("exit_entry_ns", "fault_handling_ns"):
            assert rec["cost_breakdown"].get(k, 0.0) == pytest.approx(v), k


def test_demand_paging_defaults_to_virtual_time(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demand-paging", "-v", "2", "-b", "4M", "-s", "anonymous_thp", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["config"]["workload"]["options"]["clock"] == "virtual"
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
    assert rec["result"]["metrics"]["pages_per_vcpu"] == 512  # each walks the whole 2 x 1M


# ----- errors: one line on stderr, exit code 2 ------------------------------------------------


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
        (["demand-paging", "-b", "1M", "--vm-type", "snp", "--hooks", "mirror"], "hooks"),
        (["demand-paging", "-b", "1M", "--vm-type", "tdx", "--tdx", "track=sometimes"], "track"),
        (["demand-paging", "-b", "1M", "--tdx", "track=batched"], "tdx"),
        (["demand-paging", "-b", "1M", "--vm-type", "tdx", "--mirror"], "mirror"),
        (["demand-paging", "-b", "1M", "--machine", "0x1x1"], "--machine"),
        (["demand-paging", "-b", "1M", "--mem-bw", "0"], "--mem-bw"),
        (["demand-paging", "-b", "1M", "--out", "/nonexistent/d/x.json"], "--out"),
        (["compare", "--backing", "3M"], "--backing"),
        (["compare", "--folio", "1G"], "--folio"),
        (["compare", "--types", "sev"], "types"),
        (["compare", "--tdx", "track=sometimes"], "track"),
        (["compare", "-b", "4M", "--conversions", "100000"], "does not fit"),
        (["compare", "--bogus"], "--bogus"),
        (["report", "--vcpus", "0"], "--vcpus"),
        (["inspect"], "GFN"),
        (["sweep", "bogus"], "WORKLOAD"),
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
    for argv in (
        ["compare", "--bogus"],
        ["demand-paging", "--vm-type", "sev"],
        ["demand-paging", "-b", "1M", "--vm-type", "snp", "--hooks", "mirror"],  # ConfigError
    ):
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


COMMANDS = [wl.command for wl in WORKLOADS.values()] + ["compare", "sweep", "inspect", "report"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    sub = subparsers()[command]
    # argparse wraps lines at hyphens too ("pre-fault-" / "memory"): undo the wrapping.
    shown = re.sub(r"-\s+", "-", " ".join(sub.format_help().split()))
    for action in sub._actions:
        assert action.help and action.help != argparse.SUPPRESS, action.dest
        if action.choices is not None:
            for choice in action.choices:
                # Allowed values are listed in the help or shown by argparse's {a,b} metavar.
                assert str(choice) in shown, (action.dest, choice)
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    if command != "sweep":
        assert "nanoseconds" in text or "(ns)" in text  # --cost's unit
    assert "Exit status" in text


@pytest.mark.parametrize("command", [wl.command for wl in WORKLOADS.values()] + ["compare"])
def test_help_lists_what_the_engine_allows(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for key in config.TDX_OPTION_CHOICES:
        assert key in text, (command, key)
    for name in CostModel.field_names():
        assert name in text, (command, name)
    if command == "compare":
        assert "powers of 1024" in text and "4 KiB pages" in text
    else:
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
        ["compare", "--workload", "demand_paging", "--types", "snp", "--", "-b", "1M"],
        ["inspect", "5", "--vm-type", "tdx", "--fault"],
        ["sweep", "demand-paging", "--grid", "vcpus=1,2", "--set", "bytes_per_vcpu=1M"],
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


@pytest.mark.cli
def test_piped_to_head_keeps_the_first_lines() -> None:
    # A reader that takes a few lines and goes: what it read is the start of the output.
    proc = subprocess.Popen(
        [sys.executable, "-m", "tdpmmu", "demand-paging", "-b", "1M"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()
    status = proc.wait(timeout=120)
    assert HEADER.fullmatch(first.rstrip("\n")), first
    assert status in (0, EXIT_BROKEN_PIPE)  # 0 when everything fit in the pipe's buffer
    assert proc.stderr.read() == ""


# ----- compare --workload on a real workload ----------------------------------------------------


def test_compare_demand_paging_workload_rows(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["compare", "--workload", "demand_paging", "--types", "tdx", "--designs", "mirror"]
    argv += ["--tdx", "interface=four_hook,two_hook", "--json", "--", "-v", "2", "-b", "1M"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    doc = json.loads(text)
    assert cmp.WorkloadComparison.from_json(text).to_dict() == doc
    rows = doc["result"]["rows"]
    assert [(r["vm_type"], r["options"]) for r in rows] == [
        ("tdx", "interface=four_hook"),
        ("tdx", "interface=two_hook"),
    ]
    four, two = (r["result"]["result"]["stats"] for r in rows)
    # Same faults and SEAMCALLs, different hooks: two-hook has no link_external_spt.
    assert four["pf_fixed"] == two["pf_fixed"] == 512
    assert rows[0]["seamcalls"] == rows[1]["seamcalls"] > 0
    assert four["link_external_spt"] > 0 == two["link_external_spt"]
    assert all(r["check_ok"] for r in rows)
