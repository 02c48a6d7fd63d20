"""``report``: modeled confidential-VM costs (TDX, SEV-SNP) beside the published bounds."""

import argparse
from typing import Any

from tdpmmu.cli import common

__all__: list[str] = []


def add_report(sub: Any) -> None:
    rp = sub.add_parser(
        "report",
        help="modeled TDX/SNP fault, removal and teardown costs beside published figures",
        description="Run small simulated TDX and SEV-SNP VMs and print the MODELED all-in cost "
        "(µs) of a private 4K fault, dynamic removal of one private page, teardown reclaim per "
        "page and an SNP private fault, each with its CostModel breakdown and the published "
        "bound (ratio modeled/published).",
        epilog=common.EPILOG,
    )
    rp.add_argument(
        "-v",
        "--vcpus",
        type=common.positive_int,
        default=4,
        help="number of vCPUs of the simulated VMs; the kick of a removal grows with it "
        "(default: 4)",
    )
    common.add_cost(rp, "td_exit_entry_ns=1000")
    rp.add_argument("--json", action="store_true", help="print one JSON record instead of text")
    rp.set_defaults(run=run_report)


def run_report(args: argparse.Namespace) -> int:
    from tdpmmu import report

    result = report.build_report(vcpus=args.vcpus, costs=common.costs(args))
    print(report.to_json(result) if args.json else report.format_text(result))
    return 0
