"""What every ``tdpmmu`` subcommand shares: the one-line-error parser, argument types, the
simulator's long flags (``SimArgs``), the "simulated" header, JSON output (``--json``,
``--out``) and the quiet end when stdout's reader goes away.

Exit status: 0 on success; 2 for bad arguments (one line on stderr, as every usage error);
1 when the simulator reports an error (``TdpmmuError``); 141 (128 + SIGPIPE, what a shell
reports for a C tool such as ``cat`` in the same spot) when the reader of stdout went away
early, e.g. ``python -m tdpmmu compare | head``: the output stops quietly, with no traceback.
"""

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from tdpmmu import __version__, coerce, config
from tdpmmu._core import ConfigError
from tdpmmu.costs import CostModel
from tdpmmu.vtime import CLOCKS, LOCK_MODES, Machine

__all__ = ["EXIT_BROKEN_PIPE"]

#: Exit status when stdout's reader closed the pipe early (128 + SIGPIPE, as a shell reports).
EXIT_BROKEN_PIPE = 141

EPILOG = (
    "Exit status: 0 ok, 1 simulator error, 2 bad arguments, 141 when stdout is closed early "
    "(e.g. piped to head)."
)

#: The simulator flags every workload subcommand gets; a workload's ``add_arguments`` must not
#: define them (its selftest flags are short, each with a long name of its own).
SIM_FLAGS = (
    "--vm-type",
    "--hooks",
    "--tdx",
    "--mirror",
    "--folio",
    "--cost",
    "--seed",
    "--levels",
    "--no-ad-bits",
    "--clock",
    "--mmu-lock",
    "--machine",
    "--mem-bw",
    "--tdx-module",
    "--json",
    "--out",
    "--progress",
    "--no-progress",
)


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (``tdpmmu compare: error: ...``) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        """Print ``message`` as one line on stderr and exit with status 2."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


SubParsers = "argparse._SubParsersAction[Parser]"

# ----- argument types -------------------------------------------------------------------------


def cost_override(text: str) -> tuple[str, float]:
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


def int_min(minimum: int) -> Callable[[str], int]:
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


positive_int = int_min(1)
non_negative_int = int_min(0)


def size(text: str) -> str:
    try:
        coerce.size(text, "size")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("size: ")) from None
    return text


def float_min(minimum: float) -> Callable[[str], float]:
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


def topology(text: str) -> tuple[int, int, int]:
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


def key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def tdx_help(sweep: bool) -> str:
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
        from tdpmmu import compare as compare_mod

        text += (
            ". VALUE may list several values (VALUE,VALUE,...): those rows then run once per "
            "value. Default: "
            + "; ".join(
                f"{k}={','.join(map(str, v))}" for k, v in compare_mod.DEFAULTS["tdx"].items()
            )
        )
    return text


def designs_help() -> str:
    return "; ".join(f"{v.label}: {'|'.join(v.designs)}" for v in config.VARIANTS)


# ----- shared options -------------------------------------------------------------------------


def add_levels_seed_cost(p: "argparse._ActionsContainer", cost_example: str) -> None:
    p.add_argument(
        "--levels",
        type=int,
        choices=coerce.LEVELS,
        default=4,
        help="TDP page-table levels: 4 or 5 (default: 4)",
    )
    p.add_argument(
        "--seed",
        type=non_negative_int,
        default=0,
        help="simulator seed, an integer >= 0 (default: 0)",
    )
    add_cost(p, cost_example)


def add_cost(p: "argparse._ActionsContainer", example: str) -> None:
    p.add_argument(
        "--cost",
        action="append",
        default=[],
        type=cost_override,
        metavar="NAME=NS",
        help=f"override one modeled cost, in nanoseconds (repeatable), e.g. --cost {example}. "
        f"NAME: {', '.join(CostModel.field_names())}",
    )


def add_folio(p: "argparse._ActionsContainer", default: str | None) -> None:
    p.add_argument(
        "--folio",
        choices=tuple(coerce.FOLIO_SIZES),
        default=default,
        help="guest_memfd folio size of confidential VMs: 4K or 2M (2M lets SNP map 2M from 2M "
        f"RMP entries; default: {default or '4K'})",
    )


def add_vm_flags(p: "argparse._ActionsContainer", default_vm_type: str = "default") -> None:
    """--vm-type (default ``default_vm_type``), --mirror, --hooks, --tdx (one value each),
    --folio."""
    p.add_argument(
        "--vm-type",
        choices=(*config.VM_TYPES, coerce.MIRROR_LABEL),
        default=default_vm_type,
        help=f"simulated VM type: {', '.join(config.VM_TYPES)}, or {coerce.MIRROR_LABEL} (the "
        f"same as --mirror) (default: {default_vm_type})",
    )
    p.add_argument(
        "--mirror",
        action="store_true",
        help="sw_protected only: add the TDX-shaped mirror root with a software external tree",
    )
    p.add_argument(
        "--hooks",
        choices=config.DESIGNS,
        default=None,
        help="hook design (first = the VM type's default): " + designs_help(),
    )
    p.add_argument(
        "--tdx",
        action="append",
        default=[],
        type=key_value,
        metavar="KEY=VALUE",
        help=tdx_help(sweep=False),
    )
    add_folio(p, None)


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """The clock and shared-resource flags: --clock --mmu-lock --machine --mem-bw
    --tdx-module."""
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
        "--machine",
        type=topology,
        default=None,
        metavar="SxCxT",
        help="host topology: sockets x cores per socket x threads per core (default: 2x64x2); "
        "vCPU i runs on CPU i",
    )
    g.add_argument(
        "--mem-bw",
        type=float_min(0.001),
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


def add_output_flags(p: "argparse._ActionsContainer", *, progress: bool = True) -> None:
    """--json, --out FILE and --progress/--no-progress."""
    p.add_argument("--json", action="store_true", help="print the result envelope as one JSON line")
    p.add_argument(
        "--out",
        metavar="FILE",
        default=None,
        help="also write the result envelope as JSON to FILE",
    )
    if progress:
        p.add_argument(
            "--progress",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="a progress bar on stderr when it is a terminal and the run lasts more than "
            "2 s (default: on; --no-progress: never)",
        )


def add_sim_flags(
    p: argparse.ArgumentParser,
    cost_example: str = "exit_entry_ns=800",
    default_vm_type: str = "default",
) -> None:
    """Every simulator long flag of a workload subcommand (``SimArgs``) and the output flags;
    ``--vm-type`` defaults to ``default_vm_type`` (a workload's first VM type when it does not
    run on the default VM)."""
    g = p.add_argument_group("simulated VM")
    add_vm_flags(g, default_vm_type)
    add_levels_seed_cost(g, cost_example)
    g.add_argument(
        "--no-ad-bits",
        action="store_true",
        help="run without EPT A/D bits (KVM's enable_ept_ad_bits=0, kvm_intel eptad=0; "
        "default and sw_protected only): aging marks SPTEs for access tracking and the next "
        "access takes a fast-path fault; PML is off",
    )
    add_run_flags(p)
    add_output_flags(p.add_argument_group("output"))


def machine(args: argparse.Namespace) -> Machine:
    m = Machine()
    if args.machine is not None:
        s, c, t = args.machine
        m = dataclasses.replace(m, sockets=s, cores_per_socket=c, threads_per_core=t)
    if args.mem_bw is not None:
        m = dataclasses.replace(m, mem_bw_gbps=args.mem_bw)
    return m


def costs(args: argparse.Namespace) -> CostModel:
    return coerce.cost_model(dict(args.cost), "--cost")


def sim_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The ``SimArgs`` a workload subcommand's flags give (progress excluded; ``ad_bits``
    only with ``--no-ad-bits``, so a workload with its own keyword list is not handed it)."""
    out: dict[str, Any] = {
        "vm_type": args.vm_type,
        "hooks": args.hooks,
        "tdx": dict(args.tdx) or None,
        "mirror": args.mirror,
        "folio": args.folio,
        "costs": costs(args),
        "seed": args.seed,
        "levels": args.levels,
        "clock": args.clock,
        "mmu_lock": args.mmu_lock,
        "machine": machine(args),
        "tdx_module": args.tdx_module,
    }
    if args.no_ad_bits:
        out["ad_bits"] = False
    return out


# ----- output ---------------------------------------------------------------------------------


def header(selftest: str, vm: str, wall_s: float) -> str:
    """The first line of every workload's text output: it says the run is simulated."""
    return (
        f"# tdpmmu {__version__}: simulated {selftest} on {vm}; times are modeled "
        f"(host wall {wall_s:.3f}s)"
    )


def write_out(path: str | None, text: str) -> None:
    """Write ``text`` (a JSON document) to ``path`` when given; a bad path is a ConfigError."""
    if path is None:
        return
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    except OSError as e:
        raise ConfigError(f"--out: cannot write {path!r}: {e.strerror or e}") from None


def parse_value(text: str) -> object:
    """A CLI value as Python: int (``0x`` too), float, true/false, none, else the text."""
    t = text.strip()
    low = t.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    try:
        return int(t, 0)
    except ValueError:
        pass
    try:
        return float(t)
    except ValueError:
        return t


def print_json(doc: Mapping[str, Any] | str) -> None:
    import json

    print(doc if isinstance(doc, str) else json.dumps(doc))


def silence_stdout() -> None:
    # The reader is gone: later writes (and the interpreter's final flush) go to /dev/null
    # instead of raising again.
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)
