"""Subcommand defaults a new user meets first: each runs with no simulator flags."""

from __future__ import annotations

import json

import pytest

from tdpmmu.cli import main


@pytest.mark.parametrize(
    ("command", "args", "vm_type"),
    [
        ("td-lifecycle", ["-b", "1M"], "tdx"),
        ("snp-boot", ["-b", "1M"], "snp"),
        ("private-mem-conversions", [], "sw_protected"),
        ("demand-paging", ["-b", "1M"], "default"),
    ],
)
def test_workload_defaults_to_a_vm_type_it_runs_on(
    command: str, args: list[str], vm_type: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A workload that does not run on the default VM defaults to its first VM type."""
    assert main([command, *args, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["config"]["vm"]["vm_type"] == vm_type


def test_sweep_plot_is_checked_before_the_run_and_a_bad_plot_keeps_the_table(
    tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unwritable --plot format is refused before any point runs; a plot that cannot be
    drawn (no --y for a workload without a rate) still prints the table first."""
    base = ["sweep", "pre-fault-memory", "--grid", "vm_type=default,snp", "--processes", "0"]
    assert main([*base, "--plot", "/tmp/x.txt"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "--plot" in err and ".png" in err
    assert main([*base, "--plot", "/tmp/tdpmmu-test-plot.png"]) == 2
    out, err = capsys.readouterr()
    assert "pre_fault_time" in out and "--plot: y:" in err


def test_demand_paging_takes_every_simulator_flag(capsys: pytest.CaptureFixture[str]) -> None:
    """demand_paging has its own keyword list (not SimArgs): it must still take each flag the
    CLI adds to every workload, e.g. --no-ad-bits."""
    assert main(["demand-paging", "-b", "1M", "--no-ad-bits", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["config"]["vm"]["ad_bits"] is False


@pytest.mark.parametrize("command", ["demand-paging", "pre-fault-memory"])
def test_json_output_reads_back_as_the_class_that_wrote_it(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``result_from_json`` gives back an equal result of the right class; ``WorkloadResult``
    refuses a demand_paging envelope (it would drop its fields) and names the right reader."""
    from tdpmmu import ConfigError
    from tdpmmu.workloads import DemandPagingResult, WorkloadResult, result_from_json

    assert main([command, *(["-b", "1M"] if command == "demand-paging" else []), "--json"]) == 0
    text = capsys.readouterr().out
    r = result_from_json(text)
    assert json.loads(r.to_json()) == json.loads(text)
    if command == "demand-paging":
        assert isinstance(r, DemandPagingResult)
        with pytest.raises(ConfigError, match="DemandPagingResult"):
            WorkloadResult.from_json(text)
    else:
        assert isinstance(r, WorkloadResult)


def test_the_mirror_label_is_a_vm_type_name(capsys: pytest.CaptureFixture[str]) -> None:
    """``sw_protected+mirror``, the label every table prints, is accepted where a VM type is
    (the CLI, sweeps) and means ``--mirror``; rows keep the label."""
    import tdpmmu

    assert main(["pre-fault-memory", "--vm-type", "sw_protected+mirror", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["config"]["vm"]["vm_type"] == "sw_protected" and doc["config"]["vm"]["mirror"]
    res = tdpmmu.sweep(
        "pre_fault_memory", {"vm_type": ["sw_protected", "sw_protected+mirror"]}, processes=0
    )
    assert [p.row["vm_type"] for p in res.points] == ["sw_protected", "sw_protected+mirror"]
    assert res.points[1].row["hooks"] == "mirror"
