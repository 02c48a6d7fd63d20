"""The command line: selftest-shaped text, both clocks labelled, and a JSON record."""

import json
import re
import subprocess
import sys

import pytest

from tdpmmu.cli import main

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


@pytest.mark.cli
def test_demand_paging_json_record() -> None:
    p = run_cli("demand-paging", "-v", "2", "-b", "64M", "--json")
    assert p.returncode == 0, p.stderr
    (line,) = p.stdout.splitlines()
    rec = json.loads(line)
    assert rec["simulated"] is True and rec["tool"] == "tdpmmu"
    assert rec["vcpus"] == 2 and rec["bytes_per_vcpu"] == 64 << 20 and rec["backing"] == 4096
    assert rec["pages_per_vcpu"] == 16384
    assert len(rec["per_vcpu"]) == 2
    assert {"wall_s", "modeled_ns", "faults", "pages"} <= set(rec["per_vcpu"][0])
    assert rec["stats"]["pf_fixed"] == 2 * 16384
    assert rec["overall_demand_paging_rate_pgs_per_s"] == pytest.approx(
        2 * rec["per_vcpu_demand_paging_rate_pgs_per_s"]
    )
    slowest_ns = max(v["modeled_ns"] for v in rec["per_vcpu"])
    assert rec["modeled_per_vcpu_demand_paging_rate_pgs_per_s"] == pytest.approx(
        16384 / (slowest_ns / 1e9)
    )
    assert rec["costs"]["exit_entry_ns"] == 1200.0


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
            "--json",
        ]
    )
    assert rc == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["backing"] == 2 << 20 and rec["backing_source"] == "anonymous_thp"
    assert rec["stats"]["pages_2m"] == 2
    assert rec["costs"]["exit_entry_ns"] == 0.0
    # Two 2M faults: handling + allocation + zeroing the other 511 4K pages, no exit cost.
    c = rec["costs"]
    per_fault = c["fault_handling_ns"] + c["host_page_alloc_ns"] + 511 * c["host_zero_4k_ns"]
    assert rec["stats"]["modeled_ns"] == pytest.approx(2 * per_fault)


def test_overlap_and_levels(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demand-paging", "-v", "2", "-b", "1M", "-o", "--levels", "5", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["overlap"] is True and rec["levels"] == 5
    assert rec["pages_per_vcpu"] == 512  # each vCPU walks the whole 2 x 1M region


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["demand-paging", "--cost", "bogus_ns=1"], "bogus_ns"),
        (["demand-paging", "--cost", "exit_entry_ns"], "NAME=VALUE"),
        (["demand-paging", "-s", "shmem_huge"], "--backing"),
        (["demand-paging", "-v", "0"], "--vcpus"),
        (["demand-paging", "--levels", "3"], "--levels"),
        ([], "COMMAND"),
    ],
)
def test_usage_errors_exit_2(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["demand-paging", "-b", "3000"], "bytes_per_vcpu"),
        (["demand-paging", "--vm-type", "bogus"], "vm_type"),
        (["demand-paging", "--cost", "exit_entry_ns=-5"], "exit_entry_ns"),
    ],
)
def test_config_errors_exit_2(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert "tdpmmu 0.1.0" in capsys.readouterr().out
