"""``compare``: one workload on every valid (VM type x hook design) pair, side by side.

``--workload demand-paging|conversions|both`` (default both) runs ``tdpmmu.compare.compare``,
the hook-design comparison with its own phases; any registered workload
(``--workload dirty-log-perf``, ``--workload demand_paging``, ...) runs
``tdpmmu.compare.compare_workload`` with the workload's own flags given after ``--``.
"""

import argparse
import sys
from collections.abc import Callable
from typing import Any

from tdpmmu import compare as compare_mod
from tdpmmu._core import ConfigError
from tdpmmu.cli import common
from tdpmmu.cli.progress import ProgressBar
from tdpmmu.sizes import BACKING_SIZES
from tdpmmu.vtime import CLOCKS, LOCK_MODES
from tdpmmu.workloads import WORKLOADS

__all__: list[str] = []

#: Options of the built-in comparison only (their dest, and the flag to name in errors).
_BUILTIN_ONLY = {
    "vcpus": "-v/--vcpus",
    "bytes_per_vcpu": "-b/--bytes-per-vcpu",
    "backing": "--backing",
    "conversions": "--conversions",
    "chunk_pages": "--chunk-pages",
    "image_pages": "--image-pages",
    "teardown": "--no-teardown",
}


def _registered() -> list[str]:
    names: list[str] = []
    for wl in WORKLOADS.values():
        names += [wl.name] if wl.command in compare_mod.WORKLOADS else [wl.name, wl.command]
    return [n for n in dict.fromkeys(names) if n not in compare_mod.WORKLOADS]


def add_compare(sub: Any) -> None:
    pairs = ", ".join(f"{t}/{d}" for t, d in compare_mod.PAIRS)
    d = compare_mod.DEFAULTS
    registered = _registered()
    cp = sub.add_parser(
        "compare",
        help="run one workload on every valid (VM type x hook design) pair, side by side",
        description="Run one workload on every valid (VM type x hook design) pair: "
        f"{pairs}. The default (--workload both) is the hook-design comparison: demand paging, "
        "then private<->shared conversions, then teardown; it prints faults, hook calls, "
        "SEAMCALLs, RMP instructions, modeled time (cost model) next to host wall time (the "
        "simulator), page-table memory, whether each design stayed correct, and what the tables "
        "show. --workload NAME runs a registered workload instead (its own flags after --, e.g. "
        "`tdpmmu compare --workload dirty-log-perf --types tdx,snp -- -v 2 -b 4M`): one row per "
        "pair with hook calls, SEAMCALLs, RMP instructions, modeled time, memory, its checks "
        "and its metrics.",
        epilog=common.EPILOG,
    )
    cp.add_argument(
        "--workload",
        choices=(*compare_mod.WORKLOADS, *registered),
        default="both",
        metavar="NAME",
        help="demand-paging, conversions, or both in that order (default: both: the built-in "
        "phases); or a registered workload: "
        + (", ".join(registered) or "(none)")
        + " (demand_paging, with an underscore, is the registered demand_paging_test workload)",
    )
    cp.add_argument(
        "workload_args",
        nargs="*",
        metavar="-- WORKLOAD_FLAGS",
        help="after --: the registered workload's own flags (see tdpmmu COMMAND --help)",
    )
    cp.add_argument(
        "-v",
        "--vcpus",
        type=common.positive_int,
        default=None,
        help=f"built-in workload: number of vCPUs (default: {d['vcpus']})",
    )
    cp.add_argument(
        "-b",
        "--bytes-per-vcpu",
        type=common.size,
        default=None,
        metavar="SIZE",
        help="built-in workload: test memory per vCPU in bytes, with an optional K/M/G/T suffix "
        f"(powers of 1024), e.g. 256M, 1G; a multiple of 4K (default: {d['bytes_per_vcpu']})",
    )
    cp.add_argument(
        "--backing",
        choices=tuple(BACKING_SIZES),
        default=None,
        help=f"built-in workload: host page size behind guest memory: {', '.join(BACKING_SIZES)} "
        f"(default: {d['backing']})",
    )
    common.add_folio(cp, d["folio"])
    cp.add_argument(
        "--conversions",
        type=common.positive_int,
        default=None,
        metavar="N",
        help="built-in workload: private->shared->private conversion chunks (default: "
        f"{d['conversions']}, scaled down so the chunks cover at most half of a small test "
        "region; the output says when)",
    )
    cp.add_argument(
        "--chunk-pages",
        type=common.positive_int,
        default=None,
        metavar="N",
        help=f"built-in workload: 4 KiB pages per conversion chunk (default: "
        f"{d['chunk_pages']}, or the test region's page count if smaller)",
    )
    cp.add_argument(
        "--image-pages",
        type=common.non_negative_int,
        default=None,
        metavar="N",
        help="built-in workload: initial-image 4 KiB pages populated before the run; a TD adds "
        f"them with TDH.MEM.PAGE.ADD before finalize (default: {d['image_pages']})",
    )
    cp.add_argument(
        "--types",
        action="append",
        metavar="LIST",
        help="only these VM types, comma-separated (repeatable): "
        f"{', '.join(compare_mod.VM_TYPES)} (sw_protected selects both sw_protected variants)",
    )
    cp.add_argument(
        "--designs",
        action="append",
        metavar="LIST",
        help=f"only these hook designs, comma-separated (repeatable): "
        f"{', '.join(compare_mod.DESIGNS)}",
    )
    cp.add_argument(
        "--tdx",
        action="append",
        default=[],
        type=common.key_value,
        metavar="KEY=VALUE",
        help=common.tdx_help(sweep=True),
    )
    cp.add_argument(
        "--no-teardown",
        dest="teardown",
        action="store_const",
        const=False,
        default=None,
        help="built-in workload: stop after the workload (skip VM.destroy and the teardown audit)",
    )
    common.add_levels_seed_cost(cp, "psc_exit_ns=0")
    out = cp.add_mutually_exclusive_group()
    out.add_argument(
        "--json", action="store_true", help="print the result envelope as one JSON line"
    )
    out.add_argument("--csv", action="store_true", help="print CSV, one line per row")
    cp.add_argument(
        "--out", metavar="FILE", default=None, help="also write the result envelope to FILE"
    )
    cp.add_argument(
        "--clock",
        choices=CLOCKS,
        default=None,
        help="virtual (default: vCPUs simulated in modeled-time order, contention shows) or "
        "host (real threads; modeled time has no concurrency)",
    )
    cp.add_argument(
        "--mmu-lock",
        choices=LOCK_MODES,
        default="shared",
        help="virtual time: faults take mmu_lock for read (shared, default) or write (exclusive)",
    )
    cp.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a progress bar (one step per row) on stderr when it is a "
        "terminal and the run lasts more than 2 s (default: on)",
    )
    cp.set_defaults(run=run_compare)


def _split(values: list[str] | None) -> list[str] | None:
    if values is None:
        return None
    return [v for item in values for v in item.split(",")]


def run_compare(args: argparse.Namespace) -> int:
    if args.workload in compare_mod.WORKLOADS:
        return _run_builtin(args)
    return _run_registered(args)


def _run_builtin(args: argparse.Namespace) -> int:
    if args.workload_args:
        raise ConfigError(
            f"workload flags after --: {' '.join(args.workload_args)!r}; they are for a "
            "registered --workload, not the built-in comparison (use its own -v, -b, ...)"
        )
    d = compare_mod.DEFAULTS

    def given(name: str) -> Any:
        value = getattr(args, name)
        return d[name] if value is None and name in d else value

    with ProgressBar(sys.stderr, args.progress, "compare") as bar:
        result = _builtin(args, given, bar if bar.active else None)
    text = result.to_json()
    common.write_out(args.out, text)
    if args.json:
        print(text)
    elif args.csv:
        print(result.to_csv(), end="")
    else:
        print(compare_mod.format_text(result))
    return 0


def _run_registered(args: argparse.Namespace) -> int:
    given = [flag for dest, flag in _BUILTIN_ONLY.items() if getattr(args, dest) is not None]
    if given:
        raise ConfigError(
            f"{', '.join(given)}: options of the built-in comparison; give {args.workload}'s own "
            f"flags after -- (see tdpmmu {args.workload} --help)"
        )
    wl = next(w for w in WORKLOADS.values() if args.workload in (w.name, w.command))
    sub = common.Parser(prog=f"tdpmmu compare --workload {args.workload} --", add_help=False)
    wl.add_arguments(sub)
    params = wl.from_args(sub.parse_args(args.workload_args))
    with ProgressBar(sys.stderr, args.progress, f"compare {wl.name}") as bar:
        result = compare_mod.compare_workload(
            wl.name,
            params,
            types=_split(args.types),
            designs=_split(args.designs),
            tdx=dict(args.tdx) or None,
            costs=common.costs(args),
            seed=args.seed,
            levels=args.levels,
            folio=args.folio,
            clock=args.clock,
            mmu_lock=args.mmu_lock,
            progress=bar if bar.active else None,
        )
    text = result.to_json()
    common.write_out(args.out, text)
    if args.json:
        print(text)
    elif args.csv:
        print(result.to_csv(), end="")
    else:
        print(compare_mod.format_workload_text(result))
    return 0


def _builtin(
    args: argparse.Namespace, given: Callable[[str], Any], progress: Any
) -> compare_mod.CompareResult:
    """The built-in comparison with the flags' values (``progress`` after each row)."""
    return compare_mod.compare(
        workload=args.workload,
        vcpus=given("vcpus"),
        bytes_per_vcpu=given("bytes_per_vcpu"),
        conversions=args.conversions,
        chunk_pages=args.chunk_pages,
        types=_split(args.types),
        designs=_split(args.designs),
        costs=common.costs(args),
        tdx=dict(args.tdx),
        levels=args.levels,
        seed=args.seed,
        image_pages=given("image_pages"),
        teardown=args.teardown is not False,
        backing=given("backing"),
        folio=args.folio,
        clock=args.clock or "virtual",
        mmu_lock=args.mmu_lock,
        progress=progress,
    )
