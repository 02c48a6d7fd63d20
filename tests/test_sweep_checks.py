"""A sweep point whose workload check failed ran (``ok``) but says which check failed."""

from __future__ import annotations

import pytest

import tdpmmu
from tdpmmu.cli import main


def test_a_failed_check_is_reported_per_point(capsys: pytest.CaptureFixture[str]) -> None:
    """The ``private`` design leaves S-EPT tables at a TD's teardown: td_lifecycle's destroy
    check fails for it, not for ``mirror``; the CLI prints the table and exits 1 naming it."""
    grid = {"hooks": ["mirror", "private"]}
    base = {"bytes_per_vcpu": "1M", "vm_type": "tdx"}
    res = tdpmmu.sweep("td_lifecycle", grid, base=base, processes=0)
    mirror, private = res.points
    assert mirror.ok and private.ok  # both ran to a result
    assert mirror.failed_checks() == []
    assert private.failed_checks() and res.checks_failed == (private,)
    argv = ["sweep", "td-lifecycle", "--grid", "hooks=mirror,private", "--processes", "0"]
    assert main([*argv, "--set", "bytes_per_vcpu=1M", "--set", "vm_type=tdx"]) == 1
    out, err = capsys.readouterr()
    assert "private" in out and "a check failed in 1 of 2 points" in err


def test_checks_column_in_records_and_table() -> None:
    """The table, CSV and frame carry a ``checks`` column naming what failed."""
    pytest.importorskip("pandas")
    grid = {"hooks": ["mirror", "private"]}
    base = {"bytes_per_vcpu": "1M", "vm_type": "tdx"}
    res = tdpmmu.sweep("td_lifecycle", grid, base=base, processes=0)
    df = res.to_pandas()
    assert df["checks"][0] == "ok" and str(df["checks"][1]).startswith("FAIL: ")
    assert "FAIL: " in res.table()
