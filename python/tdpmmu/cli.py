"""``tdpmmu`` / ``python -m tdpmmu``: KVM-selftest-shaped workloads on the simulator.

Each workload is a subcommand with the selftest's own short flags (they collide between tests,
so they are per subcommand) plus long, simulator-only options. VM types, hook designs and TDX
options are read from ``tdpmmu.config`` (the engine's definition); values are coerced by
``tdpmmu.coerce``, the same code the Python API uses.

Exit status: 0 on success; 2 for bad arguments (one line on stderr, as every usage error);
1 when the simulator reports an error (``TdpmmuError``); 141 (128 + SIGPIPE, what a shell
reports for a C tool such as ``cat`` in the same spot) when the reader of stdout went away
early, e.g. ``python -m tdpmmu compare | head``: the output stops quietly, with no traceback.
"""

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from tdpmmu import __version__, coerce, config, render
from tdpmmu import compare as compare_mod
from tdpmmu._core import ConfigError, TdpmmuError
from tdpmmu.costs import CostModel
from tdpmmu.sizes import BACKING_SIZES, format_size
from tdpmmu.vtime import CLOCKS, LOCK_MODES, USERFAULT_MODES, Machine
from tdpmmu.workloads import BACKING_SOURCES, DemandPagingResult, demand_paging

__all__ = ["BACKING_SOURCES", "EXIT_BROKEN_PIPE", "build_parser", "main"]

#: Exit status when stdout's reader closed the pipe early (128 + SIGPIPE, as a shell reports).
EXIT_BROKEN_PIPE = 141

HEADER = (
    "SIMULATED by tdpmmu {version}: KVM's {test} workload on a user-space model of the x86 "
    "TDP MMU, not on a real VM. (host wall-clock) = time the simulator took; (modeled) = time "
    "the cost model assigns to the simulated system."
)

_EPILOG = (
    "Exit status: 0 ok, 1 simulator error, 2 bad arguments, 141 when stdout is closed early "
    "(e.g. piped to head)."
)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (``tdpmmu compare: error: ...``) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ----- argument types -------------------------------------------------------------------------


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


def _int(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


_positive_int = _int(1)
_non_negative_int = _int(0)


def _size(text: str) -> str:
    try:
        coerce.size(text, "size")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("size: ")) from None
    return text


def _float_min(minimum: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value >= minimum or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be a finite number >= {minimum}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


def _topology(text: str) -> tuple[int, int, int]:
    parts = text.lower().split("x")
    try:
        s, c, t = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected SOCKETSxCORESxTHREADS (e.g. 2x64x2), got {text!r}"
        ) from None
    try:
        Machine(sockets=s, cores_per_socket=c, threads_per_core=t)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return s, c, t


def _add_virtual(p: argparse.ArgumentParser) -> None:
    """The clock and shared-resource flags (demand_paging_test's -u -a -r -d, plus long ones)."""
    g = p.add_argument_group(
        "modeled time at scale",
        "virtual time (the default) simulates every vCPU on one host thread in modeled-time "
        "order, with mmu_lock, host memory, userfaultfd, IPIs and the TDX module's locks as "
        "shared resources; deterministic for a seed",
    )
    g.add_argument(
        "--clock",
        choices=CLOCKS,
        default=None,
        help="virtual (default) or host: one real thread per vCPU, for host-speed runs; its "
        "modeled time has no concurrency (N vCPUs model N x one)",
    )
    g.add_argument(
        "--mmu-lock",
        choices=LOCK_MODES,
        default="shared",
        help="faults take mmu_lock for read (shared, default) or write (exclusive: KVM before "
        "parallel TDP MMU faults)",
    )
    g.add_argument(
        "-u",
        "--userfault",
        choices=USERFAULT_MODES,
        default="none",
        metavar="MODE",
        help="first-touch resolution: none (anonymous, default), MISSING or MINOR (userfaultfd "
        "with reader threads), memory_fault (KVM_EXIT_MEMORY_FAULT, the vCPU resolves it)",
    )
    g.add_argument(
        "-a",
        "--uffd-all",
        action="store_true",
        help="one userfaultfd for all vCPUs instead of one per vCPU",
    )
    g.add_argument(
        "-r",
        "--uffd-readers",
        type=_int(1),
        default=1,
        metavar="N",
        help="reader threads per userfaultfd, 1..64 (default: 1)",
    )
    g.add_argument(
        "-d",
        "--uffd-delay",
        type=_float_min(0.0),
        default=0.0,
        metavar="USEC",
        help="userspace delay per fault, µs (default: 0)",
    )
    g.add_argument(
        "--machine",
        type=_topology,
        default=None,
        metavar="SxCxT",
        help="host topology: sockets x cores per socket x threads per core (default: 2x64x2); "
        "vCPU i runs on CPU i",
    )
    g.add_argument(
        "--mem-bw",
        type=_float_min(0.001),
        default=None,
        metavar="GBPS",
        help="memory bandwidth per socket for zeroing, GB/s (default: 150)",
    )
    g.add_argument(
        "--tdx-module",
        choices=("1.5", "1.0"),
        default="1.5",
        help="TDX module lock table: 1.5 (AUG takes the S-EPT lock shared, default) or 1.0 "
        "(exclusive)",
    )


def _machine(args: argparse.Namespace) -> Machine:
    m = Machine()
    if args.machine is not None:
        s, c, t = args.machine
        m = dataclasses.replace(m, sockets=s, cores_per_socket=c, threads_per_core=t)
    if args.mem_bw is not None:
        m = dataclasses.replace(m, mem_bw_gbps=args.mem_bw)
    return m


def _virtual_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "clock": args.clock,
        "mmu_lock": args.mmu_lock,
        "userfault": args.userfault,
        "uffd_all": args.uffd_all,
        "uffd_readers": args.uffd_readers,
        "uffd_delay_us": args.uffd_delay,
        "machine": _machine(args),
        "tdx_module": args.tdx_module,
    }


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def _tdx_help(sweep: bool) -> str:
    kinds = {
        "bool": "true|false",
        "int": "an integer >= 0",
        "probability": "a probability 0..1 of OPERAND_BUSY",
    }
    # Keys that take the same kind of value are listed together ("A, B=P").
    groups: dict[str, list[str]] = {}
    for key, choices in config.TDX_OPTION_CHOICES.items():
        kind = choices[0] if len(choices) == 1 else None
        groups.setdefault(kinds[kind] if kind in kinds else "|".join(choices), []).append(key)
    parts = [f"{', '.join(keys)}={value}" for value, keys in groups.items()]
    where = ", ".join(v.label for v in config.VARIANTS if v.tdx_options)
    text = f"TDX module option for {where} VMs (repeatable): " + "; ".join(parts)
    if sweep:
        text += (
            ". VALUE may list several values (VALUE,VALUE,...): those rows then run once per "
            "value. Default: "
            + "; ".join(
                f"{k}={','.join(map(str, v))}" for k, v in compare_mod.DEFAULTS["tdx"].items()
            )
        )
    return text


def _designs_help() -> str:
    return "; ".join(f"{v.label}: {'|'.join(v.designs)}" for v in config.VARIANTS)


# ----- shared options -------------------------------------------------------------------------


def _add_levels_seed_cost(p: argparse.ArgumentParser, cost_example: str) -> None:
    p.add_argument(
        "--levels",
        type=int,
        choices=coerce.LEVELS,
        default=4,
        help="TDP page-table levels: 4 or 5 (default: 4)",
    )
    p.add_argument(
        "--seed",
        type=_non_negative_int,
        default=0,
        help="simulator seed, an integer >= 0 (default: 0)",
    )
    _add_cost(p, cost_example)


def _add_cost(p: argparse.ArgumentParser, example: str) -> None:
    p.add_argument(
        "--cost",
        action="append",
        default=[],
        type=_cost_override,
        metavar="NAME=NS",
        help=f"override one modeled cost, in nanoseconds (repeatable), e.g. --cost {example}. "
        f"NAME: {', '.join(CostModel.field_names())}",
    )


def _add_folio(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument(
        "--folio",
        choices=tuple(coerce.FOLIO_SIZES),
        default=default,
        help="guest_memfd folio size of confidential VMs: 4K or 2M (2M lets SNP map 2M from 2M "
        f"RMP entries; default: {default or '4K'})",
    )


def _costs(args: argparse.Namespace) -> CostModel:
    return coerce.cost_model(dict(args.cost), "--cost")


# ----- demand-paging --------------------------------------------------------------------------


def _add_demand_paging(sub: "argparse._SubParsersAction[_Parser]") -> None:
    dp = sub.add_parser(
        "demand-paging",
        help="first-touch fault throughput (demand_paging_test)",
        description="demand_paging_test: each vCPU writes every page of its slice once, on any "
        "VM type, set up as a VMM would (a TD is finalized before its vCPUs run; a confidential "
        "VM's test memory is private).",
        epilog=_EPILOG,
    )
    dp.add_argument(
        "-v", "--vcpus", type=_positive_int, default=1, help="number of vCPUs (default: 1)"
    )
    dp.add_argument(
        "-b",
        "--bytes-per-vcpu",
        type=_size,
        default="1G",
        metavar="SIZE",
        help="guest memory per vCPU in bytes, with an optional K/M/G/T suffix (powers of "
        "1024), e.g. 64M, 1G; a multiple of 4K (default: 1G)",
    )
    dp.add_argument(
        "-s",
        "--backing",
        choices=tuple(BACKING_SOURCES),
        default="anonymous",
        metavar="SOURCE",
        help="backing source: "
        + ", ".join(f"{k}={v}" for k, v in BACKING_SOURCES.items())
        + " host pages (default: anonymous)",
    )
    dp.add_argument(
        "-o", "--overlap", action="store_true", help="every vCPU walks the whole region"
    )
    dp.add_argument(
        "--vm-type",
        choices=config.VM_TYPES,
        default="default",
        help=f"simulated VM type: {', '.join(config.VM_TYPES)} (default: default)",
    )
    dp.add_argument(
        "--mirror",
        action="store_true",
        help="sw_protected only: add the TDX-shaped mirror root with a software external tree",
    )
    dp.add_argument(
        "--hooks",
        choices=config.DESIGNS,
        default=None,
        help="hook design (first = the VM type's default): " + _designs_help(),
    )
    dp.add_argument(
        "--tdx",
        action="append",
        default=[],
        type=_key_value,
        metavar="KEY=VALUE",
        help=_tdx_help(sweep=False),
    )
    _add_folio(dp, None)
    dp.add_argument(
        "--image-pages",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="initial-image 4 KiB pages populated after the test region before the vCPUs run "
        "(a TD adds them with TDH.MEM.PAGE.ADD before finalize; default: 0)",
    )
    _add_levels_seed_cost(dp, "exit_entry_ns=800")
    _add_virtual(dp)
    dp.add_argument(
        "--json", action="store_true", help="print the result envelope as one JSON line"
    )
    dp.set_defaults(run=_run_demand_paging)


def _print_demand_paging(r: DemandPagingResult) -> None:
    start, end = r.region
    out = render.wrap(HEADER.format(version=__version__, test="demand_paging_test"))
    out += render.wrap(
        f"VM: {r.spec.describe()}; bytes per vCPU: {format_size(r.bytes_per_vcpu)}"
        + (f" ({r.backing_source})" if r.backing_source else "")
        + f"; overlap: {'yes' if r.overlap else 'no'}; initial image: {r.image_pages} pages"
    )
    out += [
        f"guest physical test memory: [{start:#x}, {end:#x})",
        "Finished creating vCPUs",
        "Started all vCPUs",
        "All vCPU threads joined",
        f"Total guest execution time:\t{r.total_guest_execution_time_s:.9f}s (host wall-clock)",
        f"Total guest execution time:\t{r.modeled_guest_execution_time_s:.9f}s (modeled)",
    ]
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
        out.append(f"Per-vcpu demand paging rate:\t{per_vcpu:f} pgs/sec/vcpu ({label})")
        out.append(f"Overall demand paging rate:\t{overall:f} pgs/sec ({label})")
    out += [
        "",
        *render.wrap(
            "host wall-clock = from starting the vCPU threads to joining them, as the selftest "
            f"measures it; the slowest thread's own run took {r.slowest_vcpu_wall_s:.9f}s. modeled "
            "= the slowest vCPU's modeled time (vCPUs run in parallel)."
        ),
    ]
    if r.virtual:
        out += ["", *_virtual_lines(r)]
    total = r.modeled_ns
    parts = sorted(
        ((k, v) for k, v in r.cost_breakdown.items() if v), key=lambda kv: kv[1], reverse=True
    )
    out += ["", f"Modeled time by cost, all vCPUs and setup ({total / 1e6:,.3f} ms in total):"]
    out += render.table(
        [
            render.Column("CostModel field", right=False, key=True),
            render.Column("ms modeled"),
            render.Column("share"),
        ],
        [[k, f"{v / 1e6:,.3f}", f"{100 * v / total:.1f}%"] for k, v in parts],
    )
    print("\n".join(out))


def _virtual_lines(r: DemandPagingResult) -> list[str]:
    """A virtual-time run's outcomes, lock figures and vCPU time by resource."""
    v, o = r.virtual, r.options
    oc = v["outcomes"]
    m = o.machine
    out = render.wrap(
        f"Virtual time (simulated): mmu_lock {o.mmu_lock}; userfault {o.userfault}"
        + (
            f" ({'one uffd for all' if o.uffd_all else 'one uffd per vCPU'}, "
            f"{o.uffd_readers} reader(s), {o.uffd_delay_us:g} µs delay)"
            if o.userfault in ("MISSING", "MINOR")
            else ""
        )
        + f"; machine {m.sockets}x{m.cores_per_socket}x{m.threads_per_core} CPUs, "
        f"{m.mem_bw_gbps:g} GB/s per socket; {v['steps']:,} engine steps in "
        f"{v['engine_wall_s']:.3f} s host time"
    )
    out.append(
        f"Accesses {oc['accesses']:,}: {oc['hits']:,} hits; faults {oc['faults']:,}: fixed "
        f"{oc['fixed']:,}, spurious {oc['spurious']:,}, retry {oc['retry']:,}, emulate "
        f"{oc['emulate']:,}, memory fault {oc['memory_fault']:,}"
    )
    acq, cont = v["lock_acquires"], v["lock_contended"]
    out.append(
        f"mmu_lock: {acq:,} acquisitions, {cont:,} queued, "
        f"{v['lock_wait_ns'] / max(1, acq):,.1f} ns waited per acquisition"
    )
    res = v["resources"]
    total = sum(res.values())
    out += ["", "vCPU modeled time by resource (simulated):"]
    out += render.table(
        [
            render.Column("resource", right=False, key=True),
            render.Column("ms modeled"),
            render.Column("share"),
        ],
        [
            [k, f"{ns / 1e6:,.3f}", f"{100 * ns / total:.1f}%" if total else "-"]
            for k, ns in res.items()
            if ns
        ],
    )
    return out


def _run_demand_paging(args: argparse.Namespace) -> int:
    result = demand_paging(
        vm_type=args.vm_type,
        vcpus=args.vcpus,
        bytes_per_vcpu=args.bytes_per_vcpu,
        backing=args.backing,
        overlap=args.overlap,
        costs=_costs(args),
        seed=args.seed,
        levels=args.levels,
        hooks=args.hooks,
        tdx=dict(args.tdx) or None,
        mirror=args.mirror,
        folio=args.folio,
        image_pages=args.image_pages,
        **_virtual_kwargs(args),
    )
    if args.json:
        print(result.to_json())
    else:
        _print_demand_paging(result)
    return 0


# ----- compare: one workload on every valid (VM type x hook design) pair ----------------------


def _add_compare(sub: "argparse._SubParsersAction[_Parser]") -> None:
    pairs = ", ".join(f"{t}/{d}" for t, d in compare_mod.PAIRS)
    d = compare_mod.DEFAULTS
    cp = sub.add_parser(
        "compare",
        help="run one workload on every valid (VM type x hook design) pair, side by side",
        description="Run one workload (demand paging, then private<->shared conversions, then "
        f"teardown) on every valid (VM type x hook design) pair: {pairs}. Prints faults, hook "
        "calls, SEAMCALLs, RMP instructions, modeled time (cost model) next to host wall time "
        "(the simulator), page-table memory, whether each design stayed correct, and what the "
        "tables show.",
        epilog=_EPILOG,
    )
    cp.add_argument(
        "--workload",
        choices=compare_mod.WORKLOADS,
        default="both",
        help="demand-paging, conversions, or both in that order (default: both)",
    )
    cp.add_argument(
        "-v",
        "--vcpus",
        type=_positive_int,
        default=d["vcpus"],
        help=f"number of vCPUs (default: {d['vcpus']})",
    )
    cp.add_argument(
        "-b",
        "--bytes-per-vcpu",
        type=_size,
        default=d["bytes_per_vcpu"],
        metavar="SIZE",
        help="test memory per vCPU in bytes, with an optional K/M/G/T suffix (powers of 1024), "
        f"e.g. 256M, 1G; a multiple of 4K (default: {d['bytes_per_vcpu']})",
    )
    cp.add_argument(
        "--backing",
        choices=tuple(BACKING_SIZES),
        default=d["backing"],
        help=f"host page size behind guest memory: {', '.join(BACKING_SIZES)} "
        f"(default: {d['backing']})",
    )
    _add_folio(cp, d["folio"])
    cp.add_argument(
        "--conversions",
        type=_positive_int,
        default=None,
        metavar="N",
        help="private->shared->private conversion chunks (default: "
        f"{d['conversions']}, scaled down so the chunks cover at most half of a small test "
        "region; the output says when)",
    )
    cp.add_argument(
        "--chunk-pages",
        type=_positive_int,
        default=None,
        metavar="N",
        help=f"4 KiB pages per conversion chunk (default: {d['chunk_pages']}, or the test "
        "region's page count if smaller)",
    )
    cp.add_argument(
        "--image-pages",
        type=_non_negative_int,
        default=d["image_pages"],
        metavar="N",
        help="initial-image 4 KiB pages populated before the run; a TD adds them with "
        f"TDH.MEM.PAGE.ADD before finalize (default: {d['image_pages']})",
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
        type=_key_value,
        metavar="KEY=VALUE",
        help=_tdx_help(sweep=True),
    )
    cp.add_argument(
        "--no-teardown",
        dest="teardown",
        action="store_false",
        help="stop after the workload (skip VM.destroy and the teardown audit)",
    )
    _add_levels_seed_cost(cp, "psc_exit_ns=0")
    out = cp.add_mutually_exclusive_group()
    out.add_argument(
        "--json", action="store_true", help="print the result envelope as one JSON line"
    )
    out.add_argument("--csv", action="store_true", help="print CSV, one line per row")
    cp.add_argument(
        "--clock",
        choices=CLOCKS,
        default="virtual",
        help="virtual (default: vCPUs simulated in modeled-time order, contention shows) or "
        "host (real threads; modeled time has no concurrency)",
    )
    cp.add_argument(
        "--mmu-lock",
        choices=LOCK_MODES,
        default="shared",
        help="virtual time: faults take mmu_lock for read (shared, default) or write (exclusive)",
    )
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
        costs=_costs(args),
        tdx=dict(args.tdx),
        levels=args.levels,
        seed=args.seed,
        image_pages=args.image_pages,
        teardown=args.teardown,
        backing=args.backing,
        folio=args.folio,
        clock=args.clock,
        mmu_lock=args.mmu_lock,
    )
    if args.json:
        print(result.to_json())
    elif args.csv:
        print(result.to_csv(), end="")
    else:
        print(compare_mod.format_text(result))
    return 0


# ----- report: modeled confidential-VM costs beside the published bounds ---------------------


def _add_report(sub: "argparse._SubParsersAction[_Parser]") -> None:
    rp = sub.add_parser(
        "report",
        help="modeled TDX/SNP fault, removal and teardown costs beside published figures",
        description="Run small simulated TDX and SEV-SNP VMs and print the MODELED all-in cost "
        "(µs) of a private 4K fault, dynamic removal of one private page, teardown reclaim per "
        "page and an SNP private fault, each with its CostModel breakdown and the published "
        "bound (ratio modeled/published).",
        epilog=_EPILOG,
    )
    rp.add_argument(
        "-v",
        "--vcpus",
        type=_positive_int,
        default=4,
        help="number of vCPUs of the simulated VMs; the kick of a removal grows with it "
        "(default: 4)",
    )
    _add_cost(rp, "td_exit_entry_ns=1000")
    rp.add_argument("--json", action="store_true", help="print one JSON record instead of text")
    rp.set_defaults(run=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from tdpmmu import report

    result = report.build_report(vcpus=args.vcpus, costs=_costs(args))
    print(report.to_json(result) if args.json else report.format_text(result))
    return 0


# ----- entry point ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``tdpmmu`` argument parser with its subcommands (``demand-paging``, ``compare``,
    ``report``).

    Returns:
        argparse.ArgumentParser: the parser; ``parse_args`` sets ``command`` and ``run`` (the
        subcommand's function). Usage errors print one line and exit with status 2.
    """
    parser = _Parser(
        prog="tdpmmu",
        description="Run KVM selftest workloads on tdpmmu's simulated TDP MMU.",
        epilog=_EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"tdpmmu {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demand_paging(sub)
    _add_compare(sub)
    _add_report(sub)
    return parser


def _silence_stdout() -> None:
    # The reader is gone: later writes (and the interpreter's final flush) go to /dev/null
    # instead of raising again.
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``tdpmmu`` command line (the ``tdpmmu`` script and ``python -m tdpmmu``).

    Args:
        argv: the arguments after the program name, or None (default) for ``sys.argv[1:]``.

    Returns:
        int: the exit status: 0 on success, 1 when the simulator reports a ``TdpmmuError``,
        2 for a ``ConfigError`` (one line on stderr), 141 when stdout's reader went away.

    Raises:
        SystemExit: from argparse for ``--help``, ``--version`` and usage errors (status 2).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        status = run(args)
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except ConfigError as e:
        # Bad arguments: usage-style exit code and one line, like argparse's own errors.
        print(f"tdpmmu {args.command}: error: {e}", file=sys.stderr)
        return 2
    except TdpmmuError as e:
        print(f"tdpmmu {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
