"""Plots of sweeps (matplotlib, the ``plot`` extra: ``pip install 'tdpmmu[plot]'``).

Two figures a user would otherwise draw by hand from a ``tdpmmu.sweep`` result:

- ``line``: a metric against a parameter, one line per design or mode, e.g. the aggregate
  modeled demand-paging rate against vCPUs for TDX and default VMs, mmu_lock shared and
  exclusive;
- ``breakdown``: each point's modeled time as a stacked bar, split by resource
  (``tdpmmu.vtime.RESOURCES``: exits, KVM fault work, mmu_lock wait, host memory, SEAMCALLs,
  ...) or by ``CostModel`` field.

Every figure is of **modeled** time (the cost model), and says so in its title; axes name their
units. Figures are drawn on matplotlib's Agg canvas (no display, no ``pyplot`` state), returned
as a ``matplotlib.figure.Figure`` and written to ``path`` when one is given (the format follows
the suffix: ``.png``, ``.svg``, ``.pdf``).
"""

import math
import os
import statistics
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, TypeGuard

from tdpmmu._core import ConfigError
from tdpmmu.vtime import by_resource

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from tdpmmu.sweep import SweepResult

__all__ = ["SUBTITLE", "axis_label", "breakdown", "line"]

#: The line every figure's title carries: these are modeled numbers, not measurements.
SUBTITLE: Final = "simulated (modeled time): tdpmmu cost model, not a measurement"

_INSTALL = "tdpmmu.plot needs matplotlib: pip install 'tdpmmu[plot]'"

# Units of metric-name suffixes (longest first): what the axis label says.
_UNITS: Final = (
    ("_pgs_per_s", "4 KiB pages/s"),
    ("_per_s", "per s"),
    ("_ns", "ns"),
    ("_us", "µs"),
    ("_ms", "ms"),
    ("_s", "s"),
    ("_bytes", "bytes"),
)
_NAMES: Final = {
    "vcpus": "vCPUs",
    "bytes_per_vcpu": "memory per vCPU (bytes)",
    "mmu_lock": "mmu_lock mode",
    "vm_type": "VM type",
    "hooks": "hook design",
    "modeled_ns": "modeled time, all vCPUs and host work summed (ns)",
    "wall_s": "host wall time of the run (s)",
}


def _figure(ax: "Axes | None", size: tuple[float, float]) -> tuple["Figure", "Axes"]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(_INSTALL) from e
    if ax is not None:
        fig = ax.get_figure()
        if fig is None:  # pragma: no cover - an Axes always belongs to a figure
            raise ConfigError("ax: an Axes that belongs to no figure")
        return fig, ax  # type: ignore[return-value]
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def axis_label(name: str) -> str:
    """An axis label for a record column: words, and the unit its name ends with.

    ``"overall_demand_paging_rate_pgs_per_s"`` -> ``"overall demand paging rate (4 KiB
    pages/s, modeled)"``; a ``wall_`` metric says ``host wall`` instead of ``modeled``.

    Args:
        name: a column of ``SweepResult.records()`` (a parameter or a metric).

    Returns:
        str: the label. Never raises.
    """
    if name in _NAMES:
        return _NAMES[name]
    if name.startswith(("cost.", "tdx.")):
        unit = " (ns)" if name.startswith("cost.") and name.endswith("_ns") else ""
        return f"{name}{unit}"
    wall = name.startswith("wall_")
    stem = name[len("wall_") :] if wall else name
    for suffix, unit in _UNITS:
        if stem.endswith(suffix):
            words = stem[: -len(suffix)].replace("_", " ")
            return f"{words} ({unit}, {'host wall' if wall else 'modeled'})"
    return name.replace("_", " ")


def _records(data: "SweepResult | Sequence[Mapping[str, Any]] | Any") -> list[dict[str, Any]]:
    from tdpmmu.sweep import SweepResult

    if isinstance(data, SweepResult):
        return data.records()
    to_dict = getattr(data, "to_dict", None)
    if callable(to_dict) and hasattr(data, "columns"):  # a pandas.DataFrame
        return [dict(r) for r in to_dict("records")]
    return [dict(r) for r in data]


def _default_y(records: list[dict[str, Any]]) -> str:
    names = [
        k for r in records[:1] for k in r if k.endswith("_per_s") and not k.startswith("wall_")
    ]
    for n in names:
        if n.startswith("overall"):
            return n
    if names:
        return names[0]
    raise ConfigError("y: the records have no modeled rate (*_per_s); name the metric to plot")


def _is_number(v: Any) -> TypeGuard[int | float]:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _series_label(keys: Sequence[str], values: tuple[Any, ...]) -> str:
    return ", ".join(f"{k}={v}" for k, v in zip(keys, values, strict=True)) or "all points"


def line(
    data: "SweepResult | Sequence[Mapping[str, Any]] | Any",
    *,
    x: str = "vcpus",
    y: str | None = None,
    series: str | Sequence[str] | None = None,
    path: str | os.PathLike[str] | None = None,
    title: str | None = None,
    ax: "Axes | None" = None,
) -> "Figure":
    """``y`` against ``x`` with one line per combination of the ``series`` columns.

    Points with the same ``x`` on one line (several seeds) are drawn at their mean with a bar
    from the lowest to the highest. Failed points (``error``) are left out. An ``x`` of
    positive numbers spanning a factor of 8 or more (vCPU counts) gets a base-2 log axis.

    Args:
        data: a ``SweepResult``, its ``to_pandas()`` frame, or flat records (mappings).
        x: the column on the x axis, numeric (default ``"vcpus"``).
        y: the metric on the y axis (default: the ``overall...`` modeled rate, else the first
            modeled ``*_per_s`` metric).
        series: the column(s) whose values tell the lines apart (default for a sweep: its
            other varying grid keys; otherwise one line).
        path: write the figure there (format by suffix); None: only return it.
        title: the title's first line (default ``"<workload>: <y> vs <x>"``); the second line
            always says the numbers are simulated (``SUBTITLE``).
        ax: draw into this matplotlib Axes instead of a new figure.

    Returns:
        matplotlib.figure.Figure: the figure (``ax``'s when given).

    Raises:
        ImportError: matplotlib is not installed (``pip install 'tdpmmu[plot]'``).
        ConfigError: no point ran; ``x``, ``y`` or a series column is missing from the
            records (naming it); a non-numeric ``x``.
    """
    from tdpmmu.sweep import SweepResult

    recs = [r for r in _records(data) if r.get("error") is None]
    if not recs:
        raise ConfigError("data: no point ran to a result; nothing to plot")
    y = y or _default_y(recs)
    if series is None:
        keys = (
            [k for k in data.varying() if k not in (x, "seed")]
            if isinstance(data, SweepResult)
            else []
        )
    else:
        keys = [series] if isinstance(series, str) else list(series)
    for name, what in [(x, "x"), (y, "y"), *((k, "series") for k in keys)]:
        if not any(name in r for r in recs):
            raise ConfigError(f"{what}: no column {name!r} in the records")
    fig, axes = _figure(ax, (8.0, 5.0))
    groups: dict[tuple[Any, ...], dict[float, list[float]]] = {}
    for r in recs:
        xv, yv = r.get(x), r.get(y)
        if not _is_number(xv):
            raise ConfigError(f"x: column {x!r} must be numeric, got {xv!r}")
        if not _is_number(yv):
            continue
        groups.setdefault(tuple(r.get(k) for k in keys), {}).setdefault(float(xv), []).append(
            float(yv)
        )
    xs_all: set[float] = set()
    for gkey, by_x in groups.items():
        xs = sorted(by_x)
        xs_all.update(xs)
        means = [statistics.fmean(by_x[v]) for v in xs]
        spread = any(len(by_x[v]) > 1 for v in xs)
        label = _series_label(keys, gkey)
        if spread:
            lo = [m - min(by_x[v]) for m, v in zip(means, xs, strict=True)]
            hi = [max(by_x[v]) - m for m, v in zip(means, xs, strict=True)]
            axes.errorbar(xs, means, yerr=[lo, hi], marker="o", capsize=3, label=label)
        else:
            axes.plot(xs, means, marker="o", label=label)
    if xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 8:
        axes.set_xscale("log", base=2)
        axes.set_xticks(sorted(xs_all))
        axes.set_xticklabels([f"{v:g}" for v in sorted(xs_all)])
    from matplotlib.ticker import EngFormatter

    axes.yaxis.set_major_formatter(EngFormatter())
    axes.set_ylim(bottom=0)
    axes.grid(True, alpha=0.3)
    axes.set_xlabel(axis_label(x))
    axes.set_ylabel(axis_label(y))
    workload = data.workload if isinstance(data, SweepResult) else recs[0].get("workload", "")
    head = title or f"{workload}: {axis_label(y).split(' (')[0]} vs {axis_label(x)}"
    axes.set_title(f"{head}\n{SUBTITLE}", fontsize=10)
    if keys:
        axes.legend(fontsize=8)
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def _envelopes(data: Any) -> list[tuple[str, Mapping[str, Any]]]:
    """(bar label, envelope dict) of every point that ran."""
    from tdpmmu.sweep import SweepResult

    if isinstance(data, SweepResult):
        keys = data.varying()
        return [
            (", ".join(str(p.params.get(k, (p.row or {}).get(k))) for k in keys), p.result)
            for p in data.points
            if p.result is not None
        ]
    out = []
    for i, item in enumerate(data):
        env = item.envelope().to_dict() if hasattr(item, "envelope") else item
        out.append((str(i), env))
    return out


def _unit(peak_ns: float) -> tuple[str, float]:
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if peak_ns >= scale:
            return unit, scale
    return "ns", 1.0


def breakdown(
    data: "SweepResult | Sequence[Any]",
    *,
    by: str = "resource",
    per: str | None = None,
    top: int = 8,
    path: str | os.PathLike[str] | None = None,
    title: str | None = None,
    ax: "Axes | None" = None,
) -> "Figure":
    """Each point's modeled time as a stacked bar, split by resource or by cost field.

    The bar is the run's whole modeled time (its envelope's ``cost_breakdown``: setup, host
    work and every vCPU, summed, not elapsed), optionally divided by a record column.

    Args:
        data: a ``SweepResult`` (bars labeled by its varying grid values), or results /
            envelope dicts (bars labeled by position).
        by: ``"resource"`` (``tdpmmu.vtime.RESOURCES`` groups, default) or ``"cost"`` (the
            ``CostModel`` fields and wait kinds; the ``top`` largest, the rest as ``other``).
        per: a numeric record column to divide each bar by, e.g. ``"vcpus"`` (modeled time
            per vCPU; the y label says ``/ vcpus``); None: the total.
        top: with ``by="cost"``, how many fields get their own colour (>= 1, default 8).
        path: write the figure there (format by suffix); None: only return it.
        title: the title's first line (default names the workload and grouping); the second
            line says the numbers are simulated (``SUBTITLE``).
        ax: draw into this matplotlib Axes instead of a new figure.

    Returns:
        matplotlib.figure.Figure: the figure.

    Raises:
        ImportError: matplotlib is not installed (``pip install 'tdpmmu[plot]'``).
        ConfigError: ``by`` not ``"resource"``/``"cost"``, ``top`` < 1, no point ran, or a
            ``per`` column that is missing or not a positive number.
    """
    if by not in ("resource", "cost"):
        raise ConfigError(f"by: must be 'resource' or 'cost', got {by!r}")
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ConfigError(f"top: must be an int >= 1, got {top!r}")
    bars = _envelopes(data)
    if not bars:
        raise ConfigError("data: no point ran to a result; nothing to plot")
    parts: list[dict[str, float]] = []
    for _, env in bars:
        bd = {str(k): float(v) for k, v in env["cost_breakdown"].items()}
        parts.append(by_resource(bd) if by == "resource" else bd)
    if per is not None:
        from tdpmmu.results import envelope_row

        for i, (_, env) in enumerate(bars):
            d = envelope_row(env).get(per)
            if not _is_number(d) or d <= 0:
                raise ConfigError(f"per: column {per!r} must be a positive number, got {d!r}")
            parts[i] = {k: v / d for k, v in parts[i].items()}
    totals: dict[str, float] = {}
    for p in parts:
        for k, v in p.items():
            totals[k] = totals.get(k, 0.0) + v
    if by == "resource":
        names = [k for k in totals if totals[k] > 0]
    else:
        ranked = sorted((k for k in totals if totals[k] > 0), key=lambda k: -totals[k])
        names = ranked[:top]
        if len(ranked) > top:
            rest = set(ranked[top:])
            for p in parts:
                p["other"] = sum(v for k, v in p.items() if k in rest)
            names.append("other")
    peak = max(sum(p.get(k, 0.0) for k in names) for p in parts)
    unit, scale = _unit(peak)
    fig, axes = _figure(ax, (max(6.0, 0.45 * len(bars) + 3.0), 5.5))
    import matplotlib

    cmap = matplotlib.colormaps["tab20" if len(names) > 10 else "tab10"]
    xs = list(range(len(bars)))
    bottom = [0.0] * len(bars)
    for j, name in enumerate(names):
        heights = [p.get(name, 0.0) / scale for p in parts]
        axes.bar(xs, heights, bottom=bottom, label=name, color=cmap(j % cmap.N), width=0.8)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    axes.set_ylim(0, max(bottom) * 1.06 or 1.0)
    axes.set_xticks(xs)
    axes.set_xticklabels([label for label, _ in bars], rotation=60, ha="right", fontsize=8)
    from tdpmmu.sweep import SweepResult

    if isinstance(data, SweepResult):
        axes.set_xlabel("point (" + ", ".join(data.varying()) + ")")
        workload = data.workload
    else:
        axes.set_xlabel("run")
        workload = str(bars[0][1].get("workload", ""))
    what = "modeled time" + (f" / {per}" if per else "") + ", all vCPUs and host work summed"
    axes.set_ylabel(f"{what} ({unit})")
    axes.grid(True, axis="y", alpha=0.3)
    head = title or f"{workload}: modeled time by {'resource' if by == 'resource' else 'cost'}"
    axes.set_title(f"{head}\n{SUBTITLE}", fontsize=10)
    axes.legend(fontsize=7, loc="upper left")
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
