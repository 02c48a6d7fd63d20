"""tdpmmu.plot: the line and breakdown figures of a sweep, written as real PNGs, and the
package without its optional extras."""

import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import tdpmmu
from tdpmmu import ConfigError, plot
from tdpmmu.sweep import SweepResult
from tdpmmu.vtime import RESOURCES, by_resource

pytest.importorskip("matplotlib", reason="matplotlib is not installed (tdpmmu[plot])")

RATE = "overall_demand_paging_rate_pgs_per_s"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sweep() -> SweepResult:
    return tdpmmu.sweep(
        "demand_paging",
        {"vcpus": [1, 2, 4, 8], "vm_type": ["default", "tdx"], "mmu_lock": ["shared", "exclusive"]},
        base={"bytes_per_vcpu": "1M"},
        processes=0,
    )


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (after checking the signature)."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_line_draws_one_line_per_design_with_the_metric_values(
    sweep: SweepResult, tmp_path: Path
) -> None:
    path = tmp_path / "line.png"
    fig = sweep.plot(path)
    (ax,) = fig.axes
    assert ax.get_xlabel() == "vCPUs"
    assert ax.get_ylabel() == "overall demand paging rate (4 KiB pages/s, modeled)"
    assert "simulated (modeled time)" in ax.get_title()
    assert ax.get_xscale() == "log"  # 1..8 vCPUs: a factor of 8
    lines = ax.get_lines()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(lines) == 4 and sorted(labels) == sorted(
        f"vm_type={t}, mmu_lock={m}" for t in ("default", "tdx") for m in ("shared", "exclusive")
    )
    for line, label in zip(lines, labels, strict=True):
        want = [
            (p.params["vcpus"], p.metrics[RATE])
            for p in sweep.points
            if label == f"vm_type={p.params['vm_type']}, mmu_lock={p.params['mmu_lock']}"
        ]
        assert list(line.get_xdata()) == [float(v) for v, _ in want]
        assert list(line.get_ydata()) == [r for _, r in want]
    w, h = png_size(path)
    assert (w, h) == (8 * 120, 5 * 120)
    assert path.stat().st_size > 10_000


def test_line_with_seeds_draws_the_mean_and_the_spread(tmp_path: Path) -> None:
    res = tdpmmu.sweep(
        "demand_paging",
        {"vcpus": [1, 4]},
        base={"bytes_per_vcpu": "1M"},
        seeds=[0, 1],
        processes=0,
    )
    fig = plot.line(res, y="total_guest_execution_time_s", path=tmp_path / "s.svg")
    (ax,) = fig.axes
    assert ax.get_ylabel() == "total guest execution time (s, modeled)"
    assert ax.get_xscale() == "linear"  # 1..4 spans less than 8
    (bars,) = ax.containers  # an errorbar: the mean line, min..max bars
    line = bars.lines[0]
    assert len(line.get_xdata()) == 2
    for x, y in zip(line.get_xdata(), line.get_ydata(), strict=True):
        vals = [
            p.metrics["total_guest_execution_time_s"] for p in res.points if p.params["vcpus"] == x
        ]
        assert y == pytest.approx(sum(vals) / len(vals))
    assert (tmp_path / "s.svg").read_text().lstrip().startswith("<?xml")


def test_line_from_records_and_a_frame_with_explicit_series(sweep: SweepResult) -> None:
    fig = plot.line(sweep.records(), x="vcpus", y=RATE, series="vm_type")
    (ax,) = fig.axes
    # shared and exclusive points of one type on one line (their mean, with their spread)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["vm_type=default", "vm_type=tdx"]
    assert len(ax.containers) == 2
    pd = pytest.importorskip("pandas")
    frame = sweep.to_pandas()
    assert isinstance(frame, pd.DataFrame)
    fig = plot.line(frame, series=["vm_type", "mmu_lock"], title="custom")
    assert fig.axes[0].get_title().startswith("custom\nsimulated (modeled time)")


def test_breakdown_stacks_each_points_modeled_time_by_resource(
    sweep: SweepResult, tmp_path: Path
) -> None:
    path = tmp_path / "bd.png"
    fig = plot.breakdown(sweep, path=path)
    (ax,) = fig.axes
    assert ax.get_ylabel() == "modeled time, all vCPUs and host work summed (ms)"
    assert ax.get_xlabel() == "point (vcpus, vm_type, mmu_lock)"
    assert "simulated (modeled time)" in ax.get_title()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert set(labels) <= set(RESOURCES) and "exits" in labels and "SEAMCALLs" in labels
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks[0] == "1, default, shared" and len(ticks) == len(sweep.points)
    # each bar's segments add up to the run's modeled time, segment by segment
    heights: dict[int, float] = {}
    for container, label in zip(ax.containers, labels, strict=True):
        for i, bar in enumerate(container):
            want = by_resource(sweep.points[i].result["cost_breakdown"])[label] / 1e6
            assert bar.get_height() == pytest.approx(want)
            heights[i] = heights.get(i, 0.0) + bar.get_height()
    for i, p in enumerate(sweep.points):
        assert heights[i] == pytest.approx(p.result["modeled_ns"] / 1e6)
    assert png_size(path)[0] > 0 and path.stat().st_size > 10_000


def test_breakdown_by_cost_field_per_vcpu(sweep: SweepResult) -> None:
    fig = plot.breakdown(sweep, by="cost", top=3, per="vcpus")
    (ax,) = fig.axes
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(labels) == 4 and labels[-1] == "other"
    assert ax.get_ylabel().startswith("modeled time / vcpus, all vCPUs and host work summed (")
    totals = [0.0] * len(sweep.points)
    for container in ax.containers:
        for i, bar in enumerate(container):
            totals[i] += bar.get_height()
    unit = {"(ms)": 1e6, "(µs)": 1e3, "(s)": 1e9, "(ns)": 1.0}[ax.get_ylabel().split()[-1]]
    for total, p in zip(totals, sweep.points, strict=True):
        assert total * unit == pytest.approx(p.result["modeled_ns"] / p.params["vcpus"])


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda s: plot.line(s, x="nope"), "x: no column 'nope'"),
        (lambda s: plot.line(s, y="nope"), "y: no column 'nope'"),
        (lambda s: plot.line(s, series="nope"), "series: no column 'nope'"),
        (lambda s: plot.line(s, x="vm_type"), "x: column 'vm_type' must be numeric"),
        (lambda s: plot.breakdown(s, by="bogus"), "by: must be"),
        (lambda s: plot.breakdown(s, top=0), "top: must be"),
        (lambda s: plot.breakdown(s, per="vm_type"), "per: column 'vm_type'"),
    ],
)
def test_bad_plot_arguments(sweep: SweepResult, call: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        call(sweep)


def test_nothing_to_plot_when_every_point_failed() -> None:
    res = tdpmmu.sweep("demand_paging", {"vcpus": [0]}, processes=0)
    with pytest.raises(ConfigError, match="no point ran"):
        plot.line(res)
    with pytest.raises(ConfigError, match="no point ran"):
        plot.breakdown(res)


def test_axis_labels_name_units() -> None:
    assert plot.axis_label("wall_overall_demand_paging_rate_pgs_per_s") == (
        "overall demand paging rate (4 KiB pages/s, host wall)"
    )
    assert plot.axis_label("populate_memory_time_s") == "populate memory time (s, modeled)"
    assert plot.axis_label("cost.exit_entry_ns") == "cost.exit_entry_ns (ns)"
    assert plot.axis_label("vcpus") == "vCPUs"


def test_missing_matplotlib_names_the_extra(
    sweep: SweepResult, monkeypatch: pytest.MonkeyPatch
) -> None:
    for mod in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, mod, None)
    with pytest.raises(ImportError, match=r"pip install 'tdpmmu\[plot\]'"):
        sweep.plot()


def test_package_works_without_the_optional_extras() -> None:
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("matplotlib", "pandas", "dask", "distributed"):
            raise ImportError(f"blocked {name}")
sys.meta_path.insert(0, Block())
import tdpmmu, tdpmmu.plot, tdpmmu.results
from tdpmmu.sweep import SweepResult
res = tdpmmu.sweep("demand_paging", {"vcpus": [1, 2]}, base={"bytes_per_vcpu": "1M"},
                   processes=0)
assert res.ok and SweepResult.from_json(res.to_json()) == res
print(res.table().splitlines()[0])
for call in (res.plot, res.to_pandas,
             lambda: tdpmmu.sweep("demand_paging", {"vcpus": [1]}, scheduler="tcp://x:1")):
    try:
        call()
    except ImportError as e:
        print(e)
assert not any(m.split(".")[0] in ("matplotlib", "pandas", "dask") for m in sys.modules)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout.splitlines()
    assert out[0].startswith("demand_paging: 2 points")
    assert out[1] == "tdpmmu.plot needs matplotlib: pip install 'tdpmmu[plot]'"
    assert out[2] == "to_pandas needs pandas: pip install 'tdpmmu[pandas]'"
    assert out[3].endswith("pip install 'tdpmmu[cluster]'")
