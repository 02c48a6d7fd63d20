"""Sweeps: one workload over the cartesian product of parameter values, each point its own run.

``tdpmmu.sweep("demand_paging", {"vcpus": [1, 2, 4], "mmu_lock": ["shared", "exclusive"]})``
runs 6 independent simulations (each builds its own VM in a worker process) and returns a
``SweepResult``: one ``SweepPoint`` per grid point, in grid order, each holding the run's
result envelope (``tdpmmu.results.Envelope`` as a dict) and flat record, or the error it raised.

Grid keys (each maps to a list of values; the product is taken in the grid's key order, the
first key varying slowest):

- any parameter of the workload function (``vcpus``, ``bytes_per_vcpu``, ``backing``,
  ``userfault``, ...) and any simulator argument (``SimArgs``: ``vm_type``, ``hooks``, ``tdx``,
  ``mirror``, ``folio``, ``costs``, ``seed``, ``levels``, ``clock``, ``mmu_lock``, ``machine``,
  ``tdx_module``);
- ``"tdx.<option>"``: one TDX option (``tdpmmu.VM``'s ``tdx``; e.g. ``"tdx.sept_free"``,
  ``"tdx.TDH.MEM.PAGE.AUG"``), merged into the run's ``tdx`` mapping;
- ``"cost.<field>"``: one ``CostModel`` field in modeled nanoseconds (e.g.
  ``"cost.exit_entry_ns"``), applied on top of the run's ``costs``.

``base`` gives fixed values with the same keys. Unknown keys are refused before anything runs;
a bad *value* fails only its own point (``SweepPoint.error``) and the rest completes.

**Seeds.** Every grid point runs once per seed in ``seeds`` (default ``(0,)``), with the
workload's ``seed`` argument set to that seed itself: all points of one seed share it (common
random numbers), so two designs are compared on the same guest access streams and differ only
by their parameters. A ``seed`` key in ``grid`` or ``base`` sets it instead (``seeds`` must
then be left out). A point's modeled results depend only on its parameters and seed: the same
sweep gives bit-identical modeled figures (``modeled_ns``, the cost breakdown, the counters,
the modeled metrics) whichever backend or worker ran it; host wall times differ.

**Backends.** By default a ``concurrent.futures.ProcessPoolExecutor`` on this host
(``processes`` workers, default ``os.cpu_count()``; ``processes=0`` runs the points one after
another in this process). Workers are started with ``spawn``, so a script that calls
``sweep`` must do it under ``if __name__ == "__main__":``. A point whose worker process dies
is run again on its own in a fresh process (``retries``). With ``client=`` (a
``dask.distributed.Client``) or ``scheduler="tcp://host:8786"`` the points are submitted to a
Dask cluster (``client.submit(..., retries=retries)``; the scheduler also moves a task whose
worker died to another worker); the workers need tdpmmu installed.
"""

import collections
import concurrent.futures
import dataclasses
import inspect
import itertools
import json
import math
import multiprocessing
import os
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, Any

from tdpmmu import coerce, config, render
from tdpmmu._core import ConfigError
from tdpmmu.costs import CostModel
from tdpmmu.results import Envelope, envelope_row, json_safe, row_of, write_csv, write_json
from tdpmmu.workloads.base import WORKLOADS, Progress, SimArgs

if TYPE_CHECKING:
    import pandas
    from matplotlib.figure import Figure

__all__ = [
    "COST_PREFIX",
    "TDX_PREFIX",
    "SweepPoint",
    "SweepResult",
    "expand",
    "point_kwargs",
    "run_point",
    "sweep",
]

#: The grid-key prefix of one TDX option (``"tdx.sept_free"``).
TDX_PREFIX = "tdx."
#: The grid-key prefix of one ``CostModel`` field (``"cost.exit_entry_ns"``).
COST_PREFIX = "cost."


# ----- the result --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SweepPoint:
    """One grid point's run: its parameters and either its result or the error it raised."""

    #: Position in the grid (0-based, grid order: first grid key slowest, seeds fastest).
    index: int
    #: This point's grid values by grid key (``"tdx.x"``/``"cost.x"`` keys as given), plus
    #: ``"seed"``; JSON-safe.
    params: Mapping[str, Any]
    #: The run's envelope (``Envelope.to_dict()``), or None when the point failed.
    result: Mapping[str, Any] | None = None
    #: The run's flat record (``WorkloadResult.row()``: workload, VM type, design, vCPUs,
    #: seed, parameters, options, metrics, ``modeled_ns``, ``wall_s``), or None.
    row: Mapping[str, Any] | None = None
    #: The run's metrics (modeled unless the name starts with ``wall_``; non-finite as None).
    metrics: Mapping[str, float | None] = dataclasses.field(default_factory=dict)
    #: ``"ExceptionType: message"`` when the point failed (its run raised, or its worker died
    #: more often than ``retries`` allowed), else None.
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the point ran to a result (``error`` is None); see ``failed_checks`` for
        whether the workload's own checks held in it."""
        return self.error is None

    def failed_checks(self) -> list[str]:
        """The names of the workload's checks that failed in this point's run (its
        ``detail["checks"]``; empty for a point without a result or without checks)."""
        if self.result is None:
            return []
        checks = self.result.get("result", {}).get("detail", {}).get("checks", [])
        return [str(c.get("name")) for c in checks if isinstance(c, dict) and not c.get("ok")]

    def envelope(self) -> Envelope:
        """The point's result as an ``Envelope`` (e.g. for ``WorkloadResult.from_envelope``).

        Returns:
            Envelope: the run's record.

        Raises:
            ConfigError: the point failed (naming ``point``, with its error).
        """
        if self.result is None:
            raise ConfigError(f"point: point {self.index} has no result ({self.error})")
        return Envelope.from_dict(self.result)

    def record(self) -> dict[str, Any]:
        """The point as one flat table row: its grid values, then its run's record (whose
        canonical values, e.g. the resolved hook design, replace a grid value of the same
        name), then ``error`` and ``checks`` (``"ok"``, ``"FAIL: <names>"`` for the workload's
        checks that failed, None for a point that did not run).

        Returns:
            dict[str, Any]: JSON scalars (nested grid values as JSON text). Never raises.
        """
        out = {k: _cell(v) for k, v in self.params.items()}
        out.update(self.row or {})
        out["error"] = self.error
        failed = self.failed_checks()
        out["checks"] = None if self.error else ("FAIL: " + "; ".join(failed) if failed else "ok")
        return out

    def to_dict(self) -> dict[str, Any]:
        """The point as plain JSON types (``from_dict`` reads it back). Never raises."""
        return {
            "index": self.index,
            "params": json_safe(self.params),
            "result": json_safe(self.result),
            "row": json_safe(self.row),
            "metrics": json_safe(self.metrics),
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SweepPoint":
        """The point a ``to_dict()`` mapping describes.

        Args:
            data: the mapping (parsed JSON).

        Returns:
            SweepPoint: equal to the point it was made from.

        Raises:
            KeyError: ``index`` or ``params`` is missing.
        """
        return cls(
            index=int(data["index"]),
            params=dict(data["params"]),
            result=None if data.get("result") is None else dict(data["result"]),
            row=None if data.get("row") is None else dict(data["row"]),
            metrics=dict(data.get("metrics") or {}),
            error=data.get("error"),
        )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SweepResult:
    """Every point of a sweep in grid order, with what ran it and for how long (host time).

    ``SweepResult.from_json(s.to_json()) == s``. Each point's modeled figures come from the
    cost model; ``wall_s`` and the points' ``wall_s`` are host time, never mixed with them.
    """

    #: The workload's registry name, e.g. ``"demand_paging"``.
    workload: str
    #: The grid: key -> its values in order (JSON-safe).
    grid: Mapping[str, tuple[Any, ...]]
    #: The fixed arguments every point shared (JSON-safe).
    base: Mapping[str, Any]
    #: The seeds each grid point ran with (empty when ``seed`` was a grid or base key).
    seeds: tuple[int, ...]
    points: tuple[SweepPoint, ...]
    #: What ran the points: ``"serial"``, ``"processes"`` or ``"dask"``.
    backend: str
    #: Host wall-clock seconds of the whole sweep.
    wall_s: float

    @property
    def ok(self) -> bool:
        """Whether every point ran to a result."""
        return all(p.ok for p in self.points)

    @property
    def errors(self) -> tuple[SweepPoint, ...]:
        """The points that failed, in grid order."""
        return tuple(p for p in self.points if not p.ok)

    @property
    def checks_failed(self) -> tuple[SweepPoint, ...]:
        """The points that ran but where a check of the workload failed, in grid order."""
        return tuple(p for p in self.points if p.ok and p.failed_checks())

    def varying(self) -> list[str]:
        """The grid keys with more than one value (plus ``"seed"`` with several seeds), in
        grid order; every grid key when none varies.

        Returns:
            list[str]: the keys that tell the points apart. Never raises.
        """
        keys = [k for k, v in self.grid.items() if len(v) > 1]
        if len(self.seeds) > 1:
            keys.append("seed")
        return keys or list(self.grid)

    def records(self) -> list[dict[str, Any]]:
        """One flat record per point (``SweepPoint.record``), in grid order. Never raises."""
        return [p.record() for p in self.points]

    def to_dict(self) -> dict[str, Any]:
        """The sweep as plain JSON types (``from_dict`` reads it back). Never raises."""
        return {
            "tool": "tdpmmu",
            "simulated": True,
            "kind": "sweep",
            "workload": self.workload,
            "grid": {k: json_safe(list(v)) for k, v in self.grid.items()},
            "base": json_safe(self.base),
            "seeds": list(self.seeds),
            "backend": self.backend,
            "wall_s": self.wall_s,
            "points": [p.to_dict() for p in self.points],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SweepResult":
        """The sweep a ``to_dict()`` mapping (or parsed JSON) describes.

        Args:
            data: the mapping.

        Returns:
            SweepResult: equal to the sweep it was made from.

        Raises:
            ConfigError: not a tdpmmu sweep (naming ``sweep``).
        """
        if data.get("tool") != "tdpmmu" or data.get("kind") != "sweep":
            raise ConfigError("sweep: not a tdpmmu sweep record")
        return cls(
            workload=str(data["workload"]),
            grid={str(k): tuple(v) for k, v in data["grid"].items()},
            base=dict(data.get("base", {})),
            seeds=tuple(int(s) for s in data.get("seeds", ())),
            points=tuple(SweepPoint.from_dict(p) for p in data["points"]),
            backend=str(data.get("backend", "")),
            wall_s=float(data.get("wall_s", 0.0)),
        )

    def to_json(self, **kwargs: Any) -> str:
        """The sweep as one JSON document (never NaN or Infinity).

        Args:
            **kwargs: passed to ``json.dumps`` (e.g. ``indent=2``).

        Returns:
            str: the text; ``from_json`` reads it back. Never raises.
        """
        return json.dumps(self.to_dict(), allow_nan=False, **kwargs)

    @classmethod
    def from_json(cls, text: str) -> "SweepResult":
        """The sweep a ``to_json`` text describes.

        Args:
            text: the JSON text.

        Returns:
            SweepResult: the sweep.

        Raises:
            ConfigError: not a tdpmmu sweep.
            json.JSONDecodeError: ``text`` is not JSON.
        """
        return cls.from_dict(json.loads(text))

    def write_json(self, path: str | os.PathLike[str]) -> None:
        """Write ``to_dict()`` to ``path`` as indented JSON (``tdpmmu.results.write_json``).

        Args:
            path: the file (replaced if it exists).

        Raises:
            OSError: the file cannot be written.
        """
        write_json(path, self.to_dict())

    @classmethod
    def read_json(cls, path: str | os.PathLike[str]) -> "SweepResult":
        """The sweep a ``write_json`` file holds.

        Args:
            path: the file.

        Returns:
            SweepResult: the sweep.

        Raises:
            ConfigError: not a tdpmmu sweep.
            OSError: the file cannot be read.
            json.JSONDecodeError: the file is not JSON.
        """
        with open(path, encoding="utf-8") as f:
            return cls.from_json(f.read())

    def to_csv(self, path: str | os.PathLike[str]) -> None:
        """Write ``records()`` as CSV, one line per point (``tdpmmu.results.write_csv``;
        ``tdpmmu.results.read_csv`` gives the records back).

        Args:
            path: the file (replaced if it exists).

        Raises:
            OSError: the file cannot be written.
        """
        write_csv(path, self.records())

    def to_pandas(self) -> "pandas.DataFrame":
        """One ``pandas.DataFrame`` row per point: its grid values, its run's record
        (parameters, options, metrics, ``modeled_ns``, ``wall_s``) and ``error``.

        Returns:
            pandas.DataFrame: the table, in grid order.

        Raises:
            ImportError: pandas is not installed (``pip install 'tdpmmu[pandas]'``).
        """
        try:
            import pandas
        except ImportError as e:  # pragma: no cover - the dev environment has pandas
            raise ImportError("to_pandas needs pandas: pip install 'tdpmmu[pandas]'") from e
        return pandas.DataFrame(self.records())

    def table(self, metrics: Sequence[str] | None = None, *, width: int = render.WIDTH) -> str:
        """A readable text table: a line per point, the grid keys that vary, then metrics
        (split over several tables, each repeating the keys, when wider than ``width``).

        Args:
            metrics: the metric names to show; default every modeled metric of the first
                point that ran (names not starting with ``wall_``), then ``modeled_ns``.
            width: the widest a line may be (default 100).

        Returns:
            str: the lines, joined with newlines (a failed point shows its error; when a
            workload check failed anywhere, a ``checks`` column says which).

        Raises:
            ValueError: ``width`` is too small for the key columns.
        """
        keys = self.varying()
        first = next((p for p in self.points if p.ok), None)
        if metrics is None:
            names = [m for m in (first.metrics if first else {}) if not m.startswith("wall_")]
            names.append("modeled_ns")
        else:
            names = list(metrics)
        cols = [render.Column(_header(k), right=False, key=True) for k in keys]
        cols += [render.Column(_header(m)) for m in names]
        failed = any(not p.ok for p in self.points)
        checked = any(p.failed_checks() for p in self.points)
        if checked:
            cols.append(render.Column("checks", right=False))
        if failed:
            cols.append(render.Column("error", right=False))
        rows = []
        for p in self.points:
            rec = p.record()
            cells = [_fmt(p.params.get(k, rec.get(k))) for k in keys]
            cells += [_fmt(rec.get(m), m) if p.ok else "-" for m in names]
            if checked:
                cells.append(_short(rec["checks"] or "-", 40))
            if failed:
                cells.append(_short(p.error or "", 60))
            rows.append(cells)
        head = (
            f"{self.workload}: {len(self.points)} points, simulated (modeled time; "
            f"host wall {self.wall_s:.1f} s on {self.backend})"
        )
        return "\n".join([head, *render.table(cols, rows, width=width)])

    def plot(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        x: str = "vcpus",
        y: str | None = None,
        series: str | Sequence[str] | None = None,
    ) -> "Figure":
        """``tdpmmu.plot.line`` of this sweep: ``y`` against ``x``, one line per ``series``.

        Args:
            path: write the figure there (PNG, SVG, PDF by suffix); None: only return it.
            x: the record column on the x axis (default ``"vcpus"``).
            y: the metric on the y axis (default: the overall modeled rate, as ``line``).
            series: record column(s) telling the lines apart (default: the other varying
                grid keys).

        Returns:
            matplotlib.figure.Figure: the figure.

        Raises:
            ImportError: matplotlib is not installed (``pip install 'tdpmmu[plot]'``).
            ConfigError: ``x``, ``y`` or a series column is not in the records.
        """
        from tdpmmu import plot

        return plot.line(self, x=x, y=y, series=series, path=path)


def _header(name: str, width: int = 14) -> tuple[str, ...]:
    """A column header wrapped at underscores into lines of at most ``width`` characters."""
    lines: list[str] = []
    for part in name.split("_"):
        if lines and len(lines[-1]) + 1 + len(part) <= width:
            lines[-1] += "_" + part
        else:
            lines.append(part)
    return tuple(lines)


def _fmt(v: Any, name: str = "") -> str:
    """A table cell: ints with separators, seconds (``*_s``) to the nanosecond, other floats
    to a precision that suits their size."""
    if v is None:
        return "-"
    if isinstance(v, bool) or not isinstance(v, int | float):
        return str(v)
    if isinstance(v, int):
        return render.fmt_int(v)
    if not math.isfinite(v):
        return str(v)
    a = abs(v)
    if a == 0:
        return "0"
    if name.endswith("_s") and a < 1000:
        return f"{v:.9f}"
    if a >= 1000:
        return render.fmt_float(v, 0)
    if a >= 1:
        return render.fmt_float(v, 3)
    return f"{v:.4g}"


def _short(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _cell(v: Any) -> Any:
    if isinstance(v, bool | int | str) or v is None:
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    return json.dumps(json_safe(v), sort_keys=True)


# ----- the grid ------------------------------------------------------------------------------


def _resolve(workload: str | Callable[..., Any]) -> tuple[str, str | Callable[..., Any]]:
    """(registry name, what a worker runs: the name or the function itself)."""
    if callable(workload):
        return str(getattr(workload, "__name__", "workload")), workload
    if not isinstance(workload, str):
        raise TypeError(f"workload: expected a workload name or function, got {workload!r}")
    name = workload.strip()
    for w in WORKLOADS.values():
        if name in (w.name, w.command):
            return w.name, w.name
    known = ", ".join(f"{w.name} ({w.command})" for w in WORKLOADS.values())
    raise ConfigError(f"workload: unknown workload {workload!r}; registered: {known}")


def _function(ref: str | Callable[..., Any]) -> Callable[..., Any]:
    """The workload function a worker runs (looked up in the worker's own tdpmmu)."""
    if callable(ref):
        return ref
    import tdpmmu.workloads  # noqa: F401  (registers every workload in this process)

    return WORKLOADS[ref].run


def _allowed(fn: Callable[..., Any], registered: bool) -> set[str] | None:
    """The keyword arguments ``fn`` takes: a registered workload's ``**sim`` are ``SimArgs``'
    keys; a user function's ``**kwargs`` take anything (None)."""
    sig = inspect.signature(fn)
    names = set()
    for p in sig.parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            if not registered:
                return None
            names |= set(SimArgs.__annotations__)
        elif p.kind is not inspect.Parameter.VAR_POSITIONAL:
            names.add(p.name)
    names.discard("progress")  # a callback in this process; the sweep has its own
    return names


def _check_key(key: str, allowed: set[str] | None, where: str) -> None:
    if not isinstance(key, str):
        raise ConfigError(f"{where}: keys must be str, got {key!r}")
    if allowed is None:
        allowed = {key, "tdx", "costs"}
    if key.startswith(TDX_PREFIX):
        option = key[len(TDX_PREFIX) :]
        if "tdx" not in allowed:
            raise ConfigError(f"{where}[{key!r}]: this workload takes no tdx options")
        if option not in config.TDX_OPTION_CHOICES:
            raise ConfigError(
                f"{where}[{key!r}]: unknown TDX option {option!r}; allowed: "
                + ", ".join(config.TDX_OPTION_CHOICES)
            )
    elif key.startswith(COST_PREFIX):
        field = key[len(COST_PREFIX) :]
        if "costs" not in allowed:
            raise ConfigError(f"{where}[{key!r}]: this workload takes no costs")
        if field not in CostModel.field_names():
            raise ConfigError(
                f"{where}[{key!r}]: {field!r} is not a CostModel field "
                "(tdpmmu.CostModel.field_names())"
            )
    elif key not in allowed:
        raise ConfigError(
            f"{where}: {key!r} is not a parameter of this workload; allowed: "
            + ", ".join(sorted(allowed))
            + ", tdx.<option>, cost.<field>"
        )


def _lists(grid: Mapping[str, Iterable[Any]]) -> dict[str, list[Any]]:
    if not isinstance(grid, Mapping):
        raise ConfigError(f"grid: expected a mapping of key -> list of values, got {grid!r}")
    out = {}
    for key, values in grid.items():
        if isinstance(values, str | bytes | Mapping) or not isinstance(values, Iterable):
            raise ConfigError(f"grid[{key!r}]: expected a list of values, got {values!r}")
        out[key] = list(values)
        if not out[key]:
            raise ConfigError(f"grid[{key!r}]: needs at least one value")
    return out


def expand(
    grid: Mapping[str, Iterable[Any]],
    seeds: Sequence[int] = (0,),
) -> list[dict[str, Any]]:
    """The points of a grid: its cartesian product in key order (first key slowest), each
    point once per seed (seeds fastest, as ``"seed"``).

    Args:
        grid: key -> the values to take (a list, tuple or range; not a str), at least one.
        seeds: the seeds of each grid point (``()``: no ``"seed"`` key is added, for a grid
            that has a ``seed`` key itself).

    Returns:
        list[dict[str, Any]]: one mapping per point, key -> value, keys in grid order.

    Raises:
        ConfigError: a key's values are not a non-empty sequence (naming ``grid[key]``).
    """
    axes = list(_lists(grid).items())
    if seeds:
        axes.append(("seed", list(seeds)))
    return [
        dict(zip([k for k, _ in axes], combo, strict=True))
        for combo in itertools.product(*(v for _, v in axes))
    ]


def point_kwargs(base: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """The workload's keyword arguments for one point: ``base`` then ``params``, with
    ``"tdx.<option>"`` keys merged into ``tdx`` and ``"cost.<field>"`` keys into ``costs``.

    Args:
        base: the fixed arguments.
        params: the point's grid values (they win over ``base``).

    Returns:
        dict[str, Any]: keyword arguments for the workload function (``costs`` as a mapping
        of every field when a ``cost.`` key is present).

    Raises:
        TypeError: ``tdx`` or ``costs`` is not a mapping, ``CostModel`` or None while a dotted
            key adds to it.
    """
    out: dict[str, Any] = {}
    tdx: dict[str, Any] = {}
    costs: dict[str, Any] = {}
    for source in (base, params):
        for k, v in source.items():
            if k.startswith(TDX_PREFIX):
                tdx[k[len(TDX_PREFIX) :]] = v
            elif k.startswith(COST_PREFIX):
                costs[k[len(COST_PREFIX) :]] = v
            else:
                out[k] = v
    if tdx:
        given = out.get("tdx")
        if given is not None and not isinstance(given, Mapping):
            raise TypeError(f"tdx: expected a mapping of TDX options, got {given!r}")
        out["tdx"] = {**(given or {}), **tdx}
    if costs:
        given = out.get("costs")
        if isinstance(given, CostModel):
            given = given.to_dict()
        if given is not None and not isinstance(given, Mapping):
            raise TypeError(f"costs: expected a CostModel, a mapping or None, got {given!r}")
        out["costs"] = {**(given or {}), **costs}
    return out


# ----- running a point ---------------------------------------------------------------------------


def _outcome(result: Any) -> dict[str, Any]:
    env = result.envelope()
    metrics = getattr(result, "metrics", None)
    if isinstance(metrics, Mapping):
        row = row_of(result)
    else:  # a result without metrics: its row and top-level numbers from its envelope
        row = envelope_row(env)
        metrics = {
            k: v
            for k, v in env.result.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
    return {
        "result": env.to_dict(),
        "row": row,
        "metrics": json_safe({str(k): float(v) for k, v in metrics.items()}),
        "error": None,
    }


def _error(e: BaseException) -> dict[str, Any]:
    text = f"{type(e).__name__}: {e}".strip()
    return {"result": None, "row": None, "metrics": {}, "error": text}


def run_point(ref: str | Callable[..., Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Run one point (what each worker executes): the workload with ``kwargs``.

    Args:
        ref: the workload's registry name, or the workload function itself.
        kwargs: its keyword arguments (``point_kwargs``).

    Returns:
        dict[str, Any]: ``result`` (envelope dict), ``row``, ``metrics`` and ``error`` (None),
        or, when the run raised an ``Exception``, ``error`` as ``"Type: message"`` and the
        rest empty. JSON-safe and small, so it travels back from any worker.
    """
    try:
        return _outcome(_function(ref)(**kwargs))
    except Exception as e:
        return _error(e)


class _Report:
    def __init__(self, total: int, labels: list[str], progress: Progress | None) -> None:
        self.done, self.total, self.labels, self.progress = 0, total, labels, progress

    def __call__(self, i: int) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total, self.labels[i])


def _serial(
    ref: str | Callable[..., Any], kwargs: list[dict[str, Any]], report: _Report
) -> dict[int, dict[str, Any]]:
    out = {}
    for i, kw in enumerate(kwargs):
        out[i] = run_point(ref, kw)
        report(i)
    return out


def _alone(
    ref: str | Callable[..., Any], kw: dict[str, Any], retries: int, ctx: Any
) -> dict[str, Any]:
    """Run a point lost to a dead worker again in a pool of its own: once, and up to
    ``retries`` more times while its own process dies (a pool of one tells exactly whose run
    killed it; the points lost next to it are not charged)."""
    for _ in range(1 + retries):
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
            try:
                return pool.submit(run_point, ref, kw).result()
            except BrokenProcessPool:
                continue
    return _error(
        BrokenProcessPool(
            f"the worker process running this point died, and each of {1 + retries} run(s) "
            f"of it alone in a fresh process died too (retries={retries}); if sweep() was "
            'called from a script, is the call under `if __name__ == "__main__":`?'
        )
    )


def _local(
    ref: str | Callable[..., Any],
    kwargs: list[dict[str, Any]],
    processes: int,
    retries: int,
    report: _Report,
) -> dict[int, dict[str, Any]]:
    ctx = multiprocessing.get_context("spawn")
    out: dict[int, dict[str, Any]] = {}
    todo = collections.deque(range(len(kwargs)))
    while todo:
        lost: list[int] = []
        workers = min(processes, len(todo))
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            # At most one point per worker in flight: when a worker dies the pool breaks and
            # fails only those, and the queued points wait for the next pool.
            running: dict[concurrent.futures.Future[dict[str, Any]], int] = {}
            while (todo and not lost) or running:
                while todo and not lost and len(running) < workers:
                    i = todo.popleft()
                    running[pool.submit(run_point, ref, kwargs[i])] = i
                done, _ = concurrent.futures.wait(
                    running, return_when=concurrent.futures.FIRST_COMPLETED
                )
                for f in done:
                    i = running.pop(f)
                    try:
                        out[i] = f.result()
                    except BrokenProcessPool:
                        lost.append(i)
                        continue
                    except Exception as e:  # e.g. arguments that cannot be pickled
                        out[i] = _error(e)
                    report(i)
        if lost:
            # Each lost point alone in a process of its own, side by side.
            with concurrent.futures.ThreadPoolExecutor(len(lost)) as threads:
                alone = {threads.submit(_alone, ref, kwargs[i], retries, ctx): i for i in lost}
                for f in concurrent.futures.as_completed(alone):
                    out[alone[f]] = f.result()
                    report(alone[f])
    return out


def _dask(
    client: Any,
    ref: str | Callable[..., Any],
    kwargs: list[dict[str, Any]],
    retries: int,
    report: _Report,
) -> dict[int, dict[str, Any]]:
    from distributed import as_completed

    token = uuid.uuid4().hex[:12]
    futures = [
        client.submit(
            run_point, ref, kw, key=f"tdpmmu-sweep-{token}-{i}", pure=False, retries=retries
        )
        for i, kw in enumerate(kwargs)
    ]
    index = {f.key: i for i, f in enumerate(futures)}
    out: dict[int, dict[str, Any]] = {}
    try:
        for f in as_completed(futures):  # type: ignore[no-untyped-call]
            i = index[f.key]
            try:
                out[i] = f.result()
            except Exception as e:  # KilledWorker after the scheduler's allowed failures, ...
                out[i] = _error(e)
            report(i)
    finally:
        for f in futures:
            f.release()
    return out


def _label(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={_cell(v)}" for k, v in params.items())


def sweep(
    workload: str | Callable[..., Any],
    grid: Mapping[str, Iterable[Any]],
    *,
    base: Mapping[str, Any] | None = None,
    seeds: int | Sequence[int] | None = None,
    client: Any = None,
    scheduler: str | None = None,
    processes: int | None = None,
    progress: Progress | None = None,
    retries: int = 2,
) -> SweepResult:
    """Run ``workload`` at every point of ``grid`` (each point an independent simulated run
    on its own VM) and collect the results in grid order. See the module docstring for the
    grid keys, how seeds are set and the backends.

    Args:
        workload: a registry name (``tdpmmu.workloads.WORKLOADS``: ``"demand_paging"``, or
            the CLI spelling ``"demand-paging"``), or a module-level workload function
            returning a result with ``envelope()`` (the workers must be able to import it;
            with ``**kwargs`` it takes any grid key).
        grid: key -> list of values: workload parameters, ``SimArgs`` keys,
            ``"tdx.<option>"`` and ``"cost.<field>"`` keys.
        base: fixed arguments for every point (same keys as ``grid``; ``grid`` wins).
        seeds: the seeds each grid point runs with (an int or a list of ints >= 0; default
            ``(0,)``); the run's ``seed`` is the seed itself. Leave it out when ``seed`` is a
            grid or base key.
        client: a ``dask.distributed.Client`` to run the points on (needs the ``cluster``
            extra).
        scheduler: a Dask scheduler address (``"tcp://host:8786"``) to connect to instead of
            ``client``; the connection is closed at the end.
        processes: local worker processes (default ``os.cpu_count()``); 0 runs the points one
            after another in this process. Ignored with ``client``/``scheduler``.
        progress: called in this process as ``progress(done, total, label)`` after each point
            finishes (``label`` names its grid values).
        retries: how often a point whose worker dies is run again (0..100, default 2).
            Locally, every point that was running when a worker process died is run again
            alone in a fresh process (the pool cannot tell which one killed it), and a point
            that kills that process too is run alone up to ``retries`` more times before it
            is recorded as an error. On Dask it is ``client.submit``'s ``retries``, next to
            the scheduler's own moving of a dead worker's tasks (``allowed-failures``).

    Returns:
        SweepResult: one ``SweepPoint`` per grid point and seed, in grid order (first grid key
        slowest, seeds fastest), whatever order they finished in. A point whose run raised
        carries the error text instead of a result; the other points are unaffected.

    Raises:
        ConfigError: an unknown workload, an unknown grid or base key (naming ``grid`` or
            ``base`` and listing the allowed ones), a key's values that are not a non-empty
            list, ``seeds`` together with a ``seed`` key, a negative seed, ``processes`` or
            ``retries`` out of range, or both ``client`` and ``scheduler``.
        ImportError: ``client``/``scheduler`` without dask installed
            (``pip install 'tdpmmu[cluster]'``).
    """
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        # A spawned worker is re-importing the caller's script, which calls sweep() at import
        # (the flag multiprocessing itself checks while a child bootstraps).
        raise RuntimeError(
            "tdpmmu.sweep was called while a worker process imported the calling script: "
            'call it under `if __name__ == "__main__":` (local sweeps start their worker '
            "processes with spawn, which re-imports the script)"
        )
    started = time.perf_counter()
    name, ref = _resolve(workload)
    fn = _function(ref)
    allowed = _allowed(fn, isinstance(ref, str))
    base = dict(base or {})
    for k in base:
        _check_key(k, allowed, "base")
    grid = _lists(grid)
    for k in grid:
        _check_key(k, allowed, "grid")
    if "seed" in grid or "seed" in base:
        if seeds is not None:
            raise ConfigError("seeds: the grid or base sets seed already; leave seeds out")
        seed_list: tuple[int, ...] = ()
    else:
        raw = (0,) if seeds is None else (seeds,) if isinstance(seeds, int) else tuple(seeds)
        seed_list = tuple(coerce.count(s, "seeds", 0) for s in raw)
        if not seed_list:
            raise ConfigError("seeds: needs at least one seed")
    retries = coerce.count(retries, "retries", 0, 100)
    if client is not None and scheduler is not None:
        raise ConfigError("scheduler: give client or scheduler, not both")
    points = expand(grid, seed_list)
    kwargs = [point_kwargs(base, p) for p in points]
    report = _Report(len(points), [_label(p) for p in points], progress)
    if client is not None or scheduler is not None:
        backend = "dask"
        try:
            import distributed
        except ImportError as e:
            raise ImportError(
                "sweeps on a Dask cluster need dask.distributed: pip install 'tdpmmu[cluster]'"
            ) from e
        if scheduler is not None:
            with distributed.Client(scheduler) as own:  # type: ignore[no-untyped-call]
                outcomes = _dask(own, ref, kwargs, retries, report)
        else:
            outcomes = _dask(client, ref, kwargs, retries, report)
    else:
        nproc = (
            (os.cpu_count() or 1)
            if processes is None
            else coerce.count(processes, "processes", 0, 4096)
        )
        if nproc == 0:
            backend = "serial"
            outcomes = _serial(ref, kwargs, report)
        else:
            backend = "processes"
            outcomes = _local(ref, kwargs, nproc, retries, report)
    grid_safe = {k: tuple(json_safe(list(v))) for k, v in grid.items()}
    return SweepResult(
        workload=name,
        grid=grid_safe,
        base=json_safe(base),
        seeds=seed_list,
        points=tuple(
            SweepPoint(
                index=i,
                params=json_safe(p),
                result=outcomes[i]["result"],
                row=outcomes[i]["row"],
                metrics=outcomes[i]["metrics"],
                error=outcomes[i]["error"],
            )
            for i, p in enumerate(points)
        ),
        backend=backend,
        wall_s=time.perf_counter() - started,
    )
