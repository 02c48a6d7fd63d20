"""``tdpmmu`` / ``python -m tdpmmu``: KVM-selftest-shaped workloads on the simulator.

Each workload is a subcommand with the selftest's own short flags (they collide between tests,
so they are per subcommand) plus long, simulator-only options.
"""

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from tdpmmu import __version__
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


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--vm-type",
        default="default",
        help="simulated VM type (default: %(default)s)",
    )
    p.add_argument("--levels", type=int, choices=(4, 5), default=4, help="TDP levels (default: 4)")
    p.add_argument("--seed", type=int, default=0, help="simulator seed (default: 0)")
    p.add_argument(
        "--cost",
        action="append",
        default=[],
        type=_cost_override,
        metavar="NAME=VALUE",
        help="override one modeled cost in ns, e.g. --cost exit_entry_ns=800 (repeatable)",
    )
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
    return parser


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
