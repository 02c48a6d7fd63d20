"""A script that calls tdpmmu.sweep without the ``__main__`` guard is told why its points die."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


@pytest.mark.cli
def test_sweep_without_main_guard_names_the_guard(tmp_path: Path) -> None:
    """Spawned workers re-import the script; its sweep() call there raises a RuntimeError that
    names the guard, and every point's error in the parent says so too."""
    script = tmp_path / "noguard.py"
    script.write_text(
        textwrap.dedent(
            """
            import tdpmmu
            res = tdpmmu.sweep("demand_paging", {"vcpus": [1]}, base={"bytes_per_vcpu": "1M"},
                               processes=1, retries=0)
            print("ERRORS", [p.error for p in res.points])
            """
        )
    )
    p = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert p.returncode == 0, p.stderr
    assert 'if __name__ == "__main__":' in p.stderr  # the worker's own error
    errors = next(line for line in p.stdout.splitlines() if line.startswith("ERRORS"))
    assert "BrokenProcessPool" in errors and "__main__" in errors
