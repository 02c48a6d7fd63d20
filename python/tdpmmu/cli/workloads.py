"""One subcommand per registered workload (``tdpmmu.workloads.WORKLOADS``), built from the
registry: the workload's own selftest flags (``Workload.add_arguments``) plus the simulator's
long flags (``common.add_sim_flags``), run with a progress bar, printed as the selftest's lines
under a "simulated" header, or as the result's JSON envelope.
"""

import argparse
import functools
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from tdpmmu import render
from tdpmmu.cli import common
from tdpmmu.cli.progress import ProgressBar
from tdpmmu.workloads import WORKLOADS, Workload, WorkloadResult

__all__ = ["add_workload_commands", "check_lines", "failed_checks", "result_lines"]


def add_workload_commands(sub: Any) -> None:
    """Add a subparser for each workload in ``WORKLOADS``, in registry order.

    Args:
        sub: the ``tdpmmu`` parser's subparsers action (``add_subparsers()``'s return).

    Returns:
        None.

    Raises:
        argparse.ArgumentError: a workload's ``add_arguments`` defines a simulator flag
            (``common.SIM_FLAGS``) or one of its flags twice.
    """
    for wl in WORKLOADS.values():
        _add(sub, wl)


def _add(sub: Any, wl: Workload) -> None:
    types = ", ".join(wl.vm_types)
    summary = wl.summary.rstrip(". ")
    p = sub.add_parser(
        wl.command,
        help=f"{summary} ({wl.selftest})",
        description=f"{title(wl)}: {summary}. Runs on VM types: {types}. Times in the "
        "output are modeled by the cost model; the header gives the simulator's host wall time.",
        epilog=common.EPILOG,
    )
    wl.add_arguments(p)
    # A workload that cannot run on the default VM (td-lifecycle, snp-boot, the conversions
    # test) defaults to the first VM type it runs on.
    vm_type = "default" if "default" in wl.vm_types else wl.vm_types[0]
    common.add_sim_flags(p, default_vm_type=vm_type)
    p.set_defaults(run=functools.partial(run_workload, wl))


def title(wl: Workload) -> str:
    """What the header calls the run: the selftest (``dirty_log_perf_test``), or for a
    workload of tdpmmu's own (``selftest == "tdpmmu"``) its name (``td_lifecycle``)."""
    return wl.name if wl.selftest == "tdpmmu" else wl.selftest


def run_workload(wl: Workload, args: argparse.Namespace) -> int:
    """Run ``wl`` with the parsed flags and print its result (text or ``--json``).

    Returns:
        int: 0, or 1 when one of the workload's checks failed: the whole result is printed (and
        written to ``--out``) first, then one line on stderr names the failed checks.
    """
    params = wl.from_args(args)
    sim = common.sim_kwargs(args)
    with ProgressBar(sys.stderr, args.progress, title(wl)) as bar:
        extra = {"progress": bar} if bar.active else {}
        result = wl.run(**params, **sim, **extra)
    text = result.to_json()
    common.write_out(args.out, text)
    if args.json:
        print(text)
    else:
        print("\n".join(result_lines(title(wl), result)))
    failed = failed_checks(result.detail.get("checks", ()))
    if failed:
        sys.stdout.flush()
        print(
            f"tdpmmu {wl.command}: {len(failed)} check(s) failed: " + "; ".join(failed),
            file=sys.stderr,
        )
        return 1
    return 0


# ----- text rendering -------------------------------------------------------------------------


def result_lines(selftest: str, r: WorkloadResult) -> list[str]:
    """A workload result as text: the "simulated" header, the selftest's lines, then what the
    result adds (phases with both clocks, checks, virtual-time outcomes, the cost breakdown).

    Args:
        selftest: the selftest's name for the header, e.g. ``"dirty_log_perf_test"``.
        r: the result.

    Returns:
        list[str]: the lines (the extra tables within ``render.WIDTH`` columns). Never raises
        for a ``WorkloadResult``.
    """
    out = [common.header(selftest, f"{r.spec.label}/{r.spec.hooks}", r.wall_s)]
    out += list(r.lines)
    # The spec's memory is slot 0 (code and page tables); the test region is in the lines.
    vm_line = r.spec.describe().replace(", memory ", ", slot 0 ", 1)
    # Which clock the modeled times come from (host: real threads, no concurrency modeled).
    vm_line += f"; {r.options.clock} clock"
    out += ["", *render.wrap(f"# VM: {vm_line}")]
    if r.phases:
        out += ["", "Phases (simulated):"]
        out += render.table(
            [
                render.Column("phase", right=False, key=True),
                render.Column(("modeled", "s")),
                render.Column(("host wall", "s")),
            ],
            [[label, f"{m:.9f}", f"{w:.6f}"] for label, m, w in r.phases],
        )
    checks = r.detail.get("checks")
    if checks:
        out += ["", *check_lines(checks)]
    for where, summary in virtual_summaries(r.detail):
        out += ["", *virtual_lines(summary, where, r)]
    out += ["", *breakdown_lines(r.cost_breakdown, r.modeled_ns)]
    return out


def failed_checks(checks: Sequence[Mapping[str, Any]]) -> list[str]:
    """The names of the failed checks in a workload's ``detail["checks"]``
    (``workloads.base.Checks`` records), in order. Never raises for such records."""
    return [str(c["name"]) for c in checks if not c["ok"]]


def check_lines(checks: Sequence[Mapping[str, Any]]) -> list[str]:
    """The workload's ``detail["checks"]`` (``workloads.base.Checks`` records) as text:
    ``Checks (N, M failed):`` then ``  ok    <name>`` or ``  FAIL  <name>: <detail>`` per
    check, each wrapped within ``render.WIDTH`` columns.

    Args:
        checks: the records (``{"name", "ok", "detail"}``).

    Returns:
        list[str]: the lines. Never raises for such records.
    """
    out = [f"Checks ({len(checks)}, {len(failed_checks(checks))} failed):"]
    for c in checks:
        if c["ok"]:
            text = f"  ok    {c['name']}"
        else:
            text = f"  FAIL  {c['name']}" + (f": {c['detail']}" if c.get("detail") else "")
        out += render.wrap(text, subsequent=" " * 8)
    return out


_VIRTUAL_KEYS = frozenset({"outcomes", "resources", "lock_acquires"})


def virtual_summaries(detail: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Every virtual-time summary (``workloads.common.virtual_summary``) in ``detail``, with
    where it is (``"virtual"``, ``"passes[1]"``, ...), at most two levels down."""

    def walk(value: Any, where: str, depth: int) -> Iterator[tuple[str, Mapping[str, Any]]]:
        if isinstance(value, Mapping):
            if set(value) >= _VIRTUAL_KEYS:
                yield where, value
                return
            if depth < 2:
                for k, v in value.items():
                    yield from walk(v, f"{where}.{k}" if where else str(k), depth + 1)
        elif isinstance(value, list | tuple) and depth < 2:
            for i, v in enumerate(value):
                yield from walk(v, f"{where}[{i}]", depth + 1)

    yield from walk(detail, "", 0)


def _userfault(o: Any) -> str:
    """The userfault mode with its knobs (``"userfault MINOR (one uffd for all, ...); "``)."""
    if o.userfault == "none":
        return ""
    if o.userfault == "memory_fault":
        return "userfault memory_fault (each vCPU resolves its own); "
    where = "one uffd for all" if o.uffd_all else "one uffd per vCPU"
    return (
        f"userfault {o.userfault} ({where}, {o.uffd_readers} reader(s), "
        f"{o.uffd_delay_us:g} µs delay); "
    )


def _pinning(o: Any) -> str:
    """``", vCPUs pinned to CPUs 0,2,..."`` when the run pinned its vCPUs (``-c``)."""
    cpus = getattr(o, "cpus", None)
    return f", vCPUs pinned to CPUs {','.join(str(c) for c in cpus)}" if cpus else ""


def virtual_lines(v: Mapping[str, Any], where: str, r: WorkloadResult) -> list[str]:
    """A virtual-time run's outcomes, lock figures and vCPU time by resource."""
    o, m = r.options, r.options.machine
    oc = v["outcomes"]
    title = "Virtual time (simulated)" + (f", {where}" if where and where != "virtual" else "")
    out = render.wrap(
        f"{title}: mmu_lock {o.mmu_lock}; {_userfault(o)}machine {m.sockets}x"
        f"{m.cores_per_socket}x{m.threads_per_core} CPUs, {m.mem_bw_gbps:g} GB/s per socket"
        f"{_pinning(o)}; TDX module {o.tdx_module}; {int(v.get('steps', 0)):,} engine steps in "
        f"{float(v.get('engine_wall_s', 0.0)):.3f} s host time"
    )
    out += render.wrap(
        f"Accesses {oc['accesses']:,}: {oc['hits']:,} hits; faults {oc['faults']:,}: fixed "
        f"{oc['fixed']:,}, spurious {oc['spurious']:,}, retry {oc['retry']:,}, emulate "
        f"{oc['emulate']:,}, memory fault {oc['memory_fault']:,}"
        + (f", write-protected {oc['write_protected']:,}" if oc.get("write_protected") else "")
    )
    acq, cont = int(v["lock_acquires"]), int(v.get("lock_contended", 0))
    out.append(
        f"mmu_lock: {acq:,} acquisitions, {cont:,} queued, "
        f"{float(v.get('lock_wait_ns', 0.0)) / max(1, acq):,.1f} ns waited per acquisition"
    )
    res = v["resources"]
    total = sum(float(x) for x in res.values())
    out += ["", "vCPU modeled time by resource (simulated):"]
    out += render.table(
        [
            render.Column("resource", right=False, key=True),
            render.Column("ms modeled"),
            render.Column("share"),
        ],
        [
            [k, f"{float(ns) / 1e6:,.3f}", f"{100 * float(ns) / total:.1f}%" if total else "-"]
            for k, ns in res.items()
            if ns
        ],
    )
    return out


def breakdown_lines(breakdown: Mapping[str, float], total: float) -> list[str]:
    """Modeled time by ``CostModel`` field, largest first."""
    parts = sorted(((k, v) for k, v in breakdown.items() if v), key=lambda kv: -kv[1])
    out = [f"Modeled time by cost, all vCPUs and setup ({total / 1e6:,.3f} ms in total):"]
    out += render.table(
        [
            render.Column("CostModel field", right=False, key=True),
            render.Column("ms modeled"),
            render.Column("share"),
        ],
        [[k, f"{v / 1e6:,.3f}", f"{100 * v / total:.1f}%" if total else "-"] for k, v in parts],
    )
    return out


def command_of(name: str, names: Sequence[str] | None = None) -> Workload | None:
    """The registered workload called ``name`` (registry name or CLI command), else None."""
    for wl in WORKLOADS.values():
        if names is not None and wl.name not in names:
            continue
        if name in (wl.name, wl.command):
            return wl
    return None
