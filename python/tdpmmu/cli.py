"""``tdpmmu`` / ``python -m tdpmmu``: KVM-selftest-shaped workloads on the simulator.

Each workload is a subcommand with the selftest's own short flags (they collide between tests,
so they are per subcommand) plus long, simulator-only options.
"""

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from tdpmmu import __version__
from tdpmmu import compare as compare_mod
from tdpmmu._core import ConfigError, TdpmmuError
from tdpmmu.costs import CostModel
from tdpmmu.sizes import format_size
from tdpmmu.workloads import DemandPagingResult, demand_paging

__all__ = ["BACKING_SOURCES", "build_parser", "main"]

#: The selftests' ``-s`` backing sources that exist on this model, with their host page size.
BACKING_SOURCES: dict[str, str] = {
    "anonymous": "4K",
    "anonymous_thp": "2M",
    "anonymous_hugetlb": "2M",  # x86's default hugetlb size
    "anonymous_hugetlb_2mb": "2M",
    "anonymous_hugetlb_1gb": "1G",
}

HEADER = (
    "SIMULATED by tdpmmu {version}: KVM's {test} workload on a user-space model of the x86 "
    "TDP MMU, not on a real VM. (host wall-clock) = time the simulator took; (modeled) = time "
    "the cost model assigns to the simulated system."
)


def _cost_override(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    name = name.strip()
    if name not in CostModel.field_names():
        raise argparse.ArgumentTypeError(
            f"unknown cost {name!r}; allowed: {', '.join(CostModel.field_names())}"
        )
    try:
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name}: {value!r} is not a number") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_cost(p: argparse.ArgumentParser, example: str) -> None:
    p.add_argument(
        "--cost",
        action="append",
        default=[],
        type=_cost_override,
        metavar="NAME=VALUE",
        help=f"override one modeled cost in ns, e.g. --cost {example} (repeatable)",
    )


def _add_levels_seed_cost(p: argparse.ArgumentParser, cost_example: str) -> None:
    p.add_argument("--levels", type=int, choices=(4, 5), default=4, help="TDP levels (default: 4)")
    p.add_argument("--seed", type=int, default=0, help="simulator seed (default: 0)")
    _add_cost(p, cost_example)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--vm-type",
        default="default",
        help="simulated VM type (default: %(default)s)",
    )
    _add_levels_seed_cost(p, "exit_entry_ns=800")
    p.add_argument("--json", action="store_true", help="print one JSON record instead of text")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tdpmmu",
        description="Run KVM selftest workloads on tdpmmu's simulated TDP MMU.",
    )
    parser.add_argument("--version", action="version", version=f"tdpmmu {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    dp = sub.add_parser(
        "demand-paging",
        help="first-touch fault throughput (demand_paging_test)",
        description="demand_paging_test: each vCPU writes every page of its slice once.",
    )
    dp.add_argument("-v", "--vcpus", type=_positive_int, default=1, help="vCPUs (default: 1)")
    dp.add_argument(
        "-b",
        "--bytes-per-vcpu",
        default="1G",
        help="memory per vCPU, e.g. 64M, 1G (powers of 1024; default: 1G)",
    )
    dp.add_argument(
        "-s",
        "--backing",
        choices=tuple(BACKING_SOURCES),
        default="anonymous",
        help="backing source: anonymous=4K, anonymous_thp/anonymous_hugetlb[_2mb]=2M, "
        "anonymous_hugetlb_1gb=1G (default: anonymous)",
    )
    dp.add_argument(
        "-o", "--overlap", action="store_true", help="every vCPU walks the whole region"
    )
    _add_common(dp)
    dp.set_defaults(run=_run_demand_paging)
    _add_compare(sub)
    _add_report(sub)
    return parser


# ----- compare: one workload on every valid (VM type x hook design) pair ----------------------


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def _non_negative_int(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _add_compare(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    pairs = ", ".join(f"{t}/{d}" for t, d in compare_mod.PAIRS)
    cp = sub.add_parser(
        "compare",
        help="run one workload on every valid (VM type x hook design) pair, side by side",
        description="Run one workload (demand paging, then private<->shared conversions, then "
        f"teardown) on every valid (VM type x hook design) pair: {pairs}. Prints faults, hook "
        "calls, SEAMCALLs, RMP instructions, modeled time (cost model) next to host wall time "
        "(the simulator), page-table memory, and whether the design stayed correct.",
    )
    cp.add_argument(
        "--workload",
        choices=compare_mod.WORKLOADS,
        default="both",
        help="demand-paging, conversions, or both in that order (default: both)",
    )
    cp.add_argument("-v", "--vcpus", type=_positive_int, default=4, help="vCPUs (default: 4)")
    cp.add_argument(
        "-b",
        "--bytes-per-vcpu",
        default="1G",
        help="test memory per vCPU, e.g. 256M, 1G (powers of 1024; default: 1G)",
    )
    cp.add_argument(
        "--conversions",
        type=_positive_int,
        default=512,
        metavar="N",
        help="private->shared->private conversion chunks (default: 512)",
    )
    cp.add_argument(
        "--chunk-pages",
        type=_positive_int,
        default=16,
        metavar="N",
        help="4 KiB pages per conversion chunk (default: 16)",
    )
    cp.add_argument(
        "--image-pages",
        type=_non_negative_int,
        default=256,
        metavar="N",
        help="initial-image pages populated before the run; a TD adds them with "
        "TDH.MEM.PAGE.ADD before finalize (default: 256)",
    )
    cp.add_argument(
        "--types",
        action="append",
        metavar="LIST",
        help="only these VM types, comma-separated: "
        f"{', '.join(compare_mod.VM_TYPES)} (sw_protected selects both sw_protected rows)",
    )
    cp.add_argument(
        "--designs",
        action="append",
        metavar="LIST",
        help=f"only these hook designs, comma-separated: {', '.join(compare_mod.DESIGNS)}",
    )
    cp.add_argument(
        "--tdx",
        action="append",
        default=[],
        type=_key_value,
        metavar="KEY=VALUE",
        help="TDX module option for the tdx and sw_protected+mirror rows (repeatable): "
        "sept_free=teardown|sept_remove, track=per_page|batched, "
        "interface=four_hook|two_hook, version=6.16|6.19",
    )
    cp.add_argument(
        "--no-teardown",
        dest="teardown",
        action="store_false",
        help="stop after the workload (skip VM.destroy and the leak check)",
    )
    _add_levels_seed_cost(cp, "psc_exit_ns=0")
    out = cp.add_mutually_exclusive_group()
    out.add_argument(
        "--json", action="store_true", help="print one JSON document: parameters and rows"
    )
    out.add_argument("--csv", action="store_true", help="print CSV, one line per row")
    cp.set_defaults(run=_run_compare)


def _split(values: list[str] | None) -> list[str] | None:
    if values is None:
        return None
    return [v for item in values for v in item.split(",")]


def _run_compare(args: argparse.Namespace) -> int:
    result = compare_mod.compare(
        workload=args.workload,
        vcpus=args.vcpus,
        bytes_per_vcpu=args.bytes_per_vcpu,
        conversions=args.conversions,
        chunk_pages=args.chunk_pages,
        types=_split(args.types),
        designs=_split(args.designs),
        costs=CostModel().replace(**dict(args.cost)),
        tdx=dict(args.tdx),
        levels=args.levels,
        seed=args.seed,
        image_pages=args.image_pages,
        teardown=args.teardown,
    )
    if args.json:
        print(result.to_json())
    elif args.csv:
        print(result.to_csv(), end="")
    else:
        print(compare_mod.format_text(result))
    return 0


def _print_demand_paging(r: DemandPagingResult) -> None:
    start, end = r.region
    print(HEADER.format(version=__version__, test="demand_paging_test"))
    print(
        f"vm_type: {r.vm_type}, levels: {r.levels}, vCPUs: {r.vcpus}, "
        f"bytes per vCPU: {format_size(r.bytes_per_vcpu)}, "
        f"backing: {format_size(r.backing)}, overlap: {'yes' if r.overlap else 'no'}"
    )
    print(f"guest physical test memory: [{start:#x}, {end:#x})")
    print("Finished creating vCPUs")
    print("Started all vCPUs")
    print("All vCPU threads joined")
    print(f"Total guest execution time:\t{r.total_guest_execution_time_s:.9f}s (host wall-clock)")
    print(f"Total guest execution time:\t{r.modeled_guest_execution_time_s:.9f}s (modeled)")
    for label, per_vcpu, overall in (
        (
            "host wall-clock",
            r.per_vcpu_demand_paging_rate_pgs_per_s,
            r.overall_demand_paging_rate_pgs_per_s,
        ),
        (
            "modeled",
            r.modeled_per_vcpu_demand_paging_rate_pgs_per_s,
            r.modeled_overall_demand_paging_rate_pgs_per_s,
        ),
    ):
        print(f"Per-vcpu demand paging rate:\t{per_vcpu:f} pgs/sec/vcpu ({label})")
        print(f"Overall demand paging rate:\t{overall:f} pgs/sec ({label})")


def _run_demand_paging(args: argparse.Namespace) -> int:
    costs = CostModel().replace(**dict(args.cost))
    result = demand_paging(
        vm_type=args.vm_type,
        vcpus=args.vcpus,
        bytes_per_vcpu=args.bytes_per_vcpu,
        backing=BACKING_SOURCES[args.backing],
        overlap=args.overlap,
        costs=costs,
        seed=args.seed,
        levels=args.levels,
    )
    if args.json:
        record = {
            "tool": "tdpmmu",
            "version": __version__,
            "simulated": True,
            "workload": "demand_paging",
            "backing_source": args.backing,
            **result.to_dict(),
        }
        print(json.dumps(record))
    else:
        _print_demand_paging(result)
    return 0


# ----- report: modeled confidential-VM costs beside the published bounds ---------------------


def _add_report(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    rp = sub.add_parser(
        "report",
        help="modeled TDX/SNP fault, removal and teardown costs beside published figures",
        description="Run small simulated TDX and SEV-SNP VMs and print the MODELED all-in cost of "
        "a private 4K fault, dynamic removal of one private page, teardown reclaim per page and "
        "an SNP private fault, each with its CostModel breakdown and the published bound from "
        "shared/spec/costs.md (ratio modeled/published).",
    )
    rp.add_argument(
        "-v",
        "--vcpus",
        type=_positive_int,
        default=4,
        help="vCPUs of the simulated VMs; the kick of a removal grows with it (default: 4)",
    )
    _add_cost(rp, "td_exit_entry_ns=1000")
    rp.add_argument("--json", action="store_true", help="print one JSON record instead of text")
    rp.set_defaults(run=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from tdpmmu import report

    result = report.build_report(vcpus=args.vcpus, costs=CostModel().replace(**dict(args.cost)))
    print(report.to_json(result) if args.json else report.format_text(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except ConfigError as e:
        # Bad arguments: usage-style exit code, like argparse's own errors.
        print(f"tdpmmu {args.command}: error: {e}", file=sys.stderr)
        return 2
    except TdpmmuError as e:
        print(f"tdpmmu {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
