"""``sweep WORKLOAD``: a registered workload over the product of parameter values
(``tdpmmu.sweep.sweep``), printed as the sweep's table, or JSON, CSV and a plot.

``--grid KEY=V1,V2,...`` (repeatable) varies a key, ``--set KEY=VALUE`` (repeatable) fixes
one; keys are the workload function's parameters, ``SimArgs`` keys, ``tdx.<option>`` and
``cost.<field>``. Values are read as an int (``0x`` too), a float, ``true``/``false``,
``none``, or else text (``4M``, ``tdx``).
"""

import argparse
import os
import sys
from typing import Any

from tdpmmu._core import ConfigError
from tdpmmu.cli import common
from tdpmmu.cli.progress import ProgressBar
from tdpmmu.workloads import WORKLOADS

__all__: list[str] = []


def grid_entry(text: str) -> tuple[str, list[object]]:
    key, sep, values = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE[,VALUE...], got {text!r}")
    items = [v for v in values.split(",") if v.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"{key.strip()}: no value given")
    return key.strip(), [common.parse_value(v) for v in items]


def set_entry(text: str) -> tuple[str, object]:
    key, value = common.key_value(text)
    return key, common.parse_value(value)


def seed_list(text: str) -> list[int]:
    parse = common.non_negative_int
    return [parse(s) for s in text.split(",") if s.strip()]


def add_sweep(sub: Any) -> None:
    names = [n for wl in WORKLOADS.values() for n in dict.fromkeys((wl.command, wl.name))]
    p = sub.add_parser(
        "sweep",
        help="run a workload over a grid of parameter values; print the table, JSON, CSV, plot",
        description="Run a registered workload at every point of the product of the --grid "
        "values (each point its own simulated VM, in worker processes or on a Dask cluster) "
        "and print one line per point: the grid keys that vary and the modeled metrics. Keys: "
        "the workload's parameters by their Python names (vcpus, bytes_per_vcpu, backing, ...), "
        "the simulator's (vm_type, hooks, mirror, folio, seed, levels, clock, mmu_lock, "
        "tdx_module), tdx.<option> and cost.<CostModel field> (ns). Example: tdpmmu sweep "
        "demand-paging --grid vcpus=1,2,4 --grid vm_type=default,tdx --set bytes_per_vcpu=4M",
        epilog="Exit status: 0 every point ran, 1 a point failed (its error is in the table), 2 "
        "bad arguments, 141 when stdout is closed early.",
    )
    p.add_argument(
        "workload",
        choices=names,
        metavar="WORKLOAD",
        help="a registered workload: " + (", ".join(names) or "(none)"),
    )
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        type=grid_entry,
        metavar="KEY=V1,V2",
        help="vary KEY over these values (repeatable; the first --grid varies slowest)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        type=set_entry,
        metavar="KEY=VALUE",
        help="fix KEY for every point (repeatable), e.g. --set bytes_per_vcpu=4M",
    )
    p.add_argument(
        "--seeds",
        type=seed_list,
        default=None,
        metavar="S1,S2",
        help="run every point once per seed, integers >= 0 (default: 0; not with a seed key)",
    )
    where = p.add_argument_group("where the points run")
    where.add_argument(
        "--processes",
        type=common.non_negative_int,
        default=None,
        metavar="N",
        help="local worker processes (default: one per CPU); 0 runs the points in this process",
    )
    where.add_argument(
        "--scheduler",
        default=None,
        metavar="tcp://HOST:PORT",
        help="a Dask scheduler to run the points on (needs tdpmmu[cluster] here and tdpmmu on "
        "the workers)",
    )
    out = p.add_argument_group("output")
    out.add_argument(
        "--metrics",
        default=None,
        metavar="M1,M2",
        help="the metric columns of the table (default: every modeled metric, then modeled_ns)",
    )
    out.add_argument("--csv", default=None, metavar="FILE", help="write one CSV row per point")
    out.add_argument(
        "--plot",
        default=None,
        metavar="FILE",
        help="draw --y against --x, one line per --series, to FILE (.png, .svg, .pdf; needs "
        "tdpmmu[plot])",
    )
    out.add_argument("--x", default="vcpus", metavar="KEY", help="--plot's x axis (default: vcpus)")
    out.add_argument(
        "--y",
        default=None,
        metavar="METRIC",
        help="--plot's y axis (default: the overall modeled rate)",
    )
    out.add_argument(
        "--series",
        action="append",
        default=None,
        metavar="KEY",
        help="--plot: key(s) telling the lines apart (repeatable or comma-separated; default: "
        "the other varying keys)",
    )
    common.add_output_flags(out)
    p.set_defaults(run=run_sweep)


def _merge(pairs: list[tuple[str, Any]], what: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ConfigError(f"{what}: {k} is given twice")
        out[k] = v
    return out


def _check_plot_path(path: str) -> None:
    """``--plot``'s file: matplotlib installed, a format it writes, a directory that exists."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("--plot: needs matplotlib: pip install 'tdpmmu[plot]'") from None
    fmt = os.path.splitext(path)[1].lstrip(".").lower()
    formats = Figure().canvas.get_supported_filetypes()
    if fmt not in formats:
        raise ConfigError(
            f"--plot: {path!r} is not a format matplotlib writes; use one of "
            f"{', '.join('.' + f for f in sorted(formats))}"
        )
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ConfigError(f"--plot: the directory {folder!r} does not exist")


def run_sweep(args: argparse.Namespace) -> int:
    from tdpmmu.sweep import sweep

    grid = _merge(args.grid, "--grid")
    base = _merge(args.set, "--set")
    both = sorted(set(grid) & set(base))
    if both:
        raise ConfigError(f"--set: {', '.join(both)} is also a --grid key")
    series = None
    if args.series:
        series = [s for item in args.series for s in item.split(",") if s.strip()]
    if args.plot:
        _check_plot_path(args.plot)  # before the points run, not after
    with ProgressBar(sys.stderr, args.progress, f"sweep {args.workload}") as bar:
        result = sweep(
            args.workload,
            grid,
            base=base,
            seeds=args.seeds,
            scheduler=args.scheduler,
            processes=args.processes,
            progress=bar if bar.active else None,
        )
    text = result.to_json()
    common.write_out(args.out, text)
    if args.csv:
        try:
            result.to_csv(args.csv)
        except OSError as e:
            raise ConfigError(f"--csv: cannot write {args.csv!r}: {e.strerror or e}") from None
    if args.json:
        print(text)
    else:
        metrics = args.metrics.split(",") if args.metrics else None
        print(result.table(metrics))
    sys.stdout.flush()
    if args.plot:
        # After the table, so a plot that cannot be drawn (say, --y names no metric) loses
        # nothing the run measured.
        try:
            result.plot(args.plot, x=args.x, y=args.y, series=series)
        except (ConfigError, ValueError, KeyError) as e:
            raise ConfigError(f"--plot: {e}") from None
        print(f"tdpmmu sweep: plot written to {args.plot}", file=sys.stderr)
    failed = [p for p in result.points if not p.ok]
    if failed:
        print(
            f"tdpmmu sweep: {len(failed)} of {len(result.points)} points failed; first: "
            + " ".join(str(failed[0].error).split()),
            file=sys.stderr,
        )
    checked = result.checks_failed
    if checked:
        print(
            f"tdpmmu sweep: a check failed in {len(checked)} of {len(result.points)} points; "
            f"first (point {checked[0].index}): {'; '.join(checked[0].failed_checks())}",
            file=sys.stderr,
        )
    return 1 if failed or checked else 0
