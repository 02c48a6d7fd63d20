"""Regenerate docs/sweep-example.png: a small demand-paging sweep and its two figures.

    python benches/sweep_example.py                       # local process pool
    python benches/sweep_example.py --scheduler tcp://host:8786   # on a Dask cluster

The sweep: demand_paging with 1, 2, 4, 8, 16, 32 vCPUs x mmu_lock shared/exclusive x a default
VM and a TD (64 MiB per vCPU, virtual time, seed 0). Left: the aggregate modeled rate against
vCPUs, one line per VM type and lock mode; right: each point's modeled time per vCPU split by
resource. Every number is modeled (the cost model), not measured. Prints the sweep's table.
"""

import argparse
from pathlib import Path

import tdpmmu
from tdpmmu import plot

ROOT = Path(__file__).resolve().parent.parent

GRID = {
    "vm_type": ["default", "tdx"],
    "mmu_lock": ["shared", "exclusive"],
    "vcpus": [1, 2, 4, 8, 16, 32],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "sweep-example.png")
    parser.add_argument("--bytes-per-vcpu", default="64M")
    parser.add_argument("--processes", type=int, default=None)
    parser.add_argument("--scheduler", default=None, help="a Dask scheduler address")
    parser.add_argument("--json", type=Path, default=None, help="also write the sweep as JSON")
    args = parser.parse_args()

    res = tdpmmu.sweep(
        "demand_paging",
        GRID,
        base={"bytes_per_vcpu": args.bytes_per_vcpu},
        processes=args.processes,
        scheduler=args.scheduler,
        progress=lambda done, total, label: print(f"  [{done}/{total}] {label}", flush=True),
    )
    print(res.table(metrics=["overall_demand_paging_rate_pgs_per_s", "modeled_ns"]))
    if args.json:
        res.write_json(args.json)

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 6.5), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, width_ratios=[1, 1.5])
    plot.line(
        res,
        x="vcpus",
        series=["vm_type", "mmu_lock"],
        ax=left,
        title=f"demand_paging ({args.bytes_per_vcpu} per vCPU): aggregate rate vs vCPUs",
    )
    plot.breakdown(
        res,
        per="vcpus",
        ax=right,
        title="modeled time per vCPU by resource",
    )
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
