"""``tdpmmu`` / ``python -m tdpmmu``: KVM-selftest-shaped workloads on the simulator.

One subcommand per registered workload (``tdpmmu.workloads.WORKLOADS``: ``demand-paging``,
``dirty-log-perf``, ...), each with its selftest's own short flags (they collide between tests,
so they are per subcommand) plus the simulator's long flags (``--vm-type``, ``--hooks``,
``--tdx``, ``--cost``, ``--clock``, ..., ``--json``, ``--out``, ``--progress``); and
``compare`` (every VM type x hook design on one workload), ``sweep`` (a workload over a grid of
parameters), ``inspect`` (one gfn's walk, S-EPT/RMP entry and trace) and ``report`` (modeled
confidential-VM costs beside published figures). VM types, hook designs and TDX options are read
from ``tdpmmu.config``; values are coerced by ``tdpmmu.coerce``, the same code the Python API
uses.

Exit status: 0 on success; 2 for bad arguments (one line on stderr, as every usage error);
1 when the simulator reports an error (``TdpmmuError``); 130 on Ctrl-C; 141 (128 + SIGPIPE,
what a shell reports for a C tool such as ``cat`` in the same spot) when the reader of stdout
went away early, e.g. ``python -m tdpmmu compare | head``: the output stops quietly, with no
traceback.
"""

import argparse
import sys
from collections.abc import Callable, Sequence

from tdpmmu import __version__
from tdpmmu._core import ConfigError, TdpmmuError
from tdpmmu.cli import common
from tdpmmu.cli.common import EXIT_BROKEN_PIPE
from tdpmmu.workloads import BACKING_SOURCES

__all__ = ["BACKING_SOURCES", "EXIT_BROKEN_PIPE", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``tdpmmu`` argument parser: one subcommand per registered workload (in registry
    order), then ``compare``, ``sweep``, ``inspect`` and ``report``.

    Returns:
        argparse.ArgumentParser: the parser; ``parse_args`` sets ``command`` and ``run`` (the
        subcommand's function). Usage errors print one line and exit with status 2.

    Raises:
        argparse.ArgumentError: a registered workload defines a flag the CLI adds itself.
    """
    from tdpmmu.cli.compare import add_compare
    from tdpmmu.cli.inspect import add_inspect
    from tdpmmu.cli.report import add_report
    from tdpmmu.cli.sweep import add_sweep
    from tdpmmu.cli.workloads import add_workload_commands

    parser = common.Parser(
        prog="tdpmmu",
        description="Run KVM selftest workloads on tdpmmu's simulated TDP MMU.",
        epilog=common.EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"tdpmmu {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_workload_commands(sub)
    add_compare(sub)
    add_sweep(sub)
    add_inspect(sub)
    add_report(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``tdpmmu`` command line (the ``tdpmmu`` script and ``python -m tdpmmu``).

    Args:
        argv: the arguments after the program name, or None (default) for ``sys.argv[1:]``.

    Returns:
        int: the exit status: 0 on success, 1 when the simulator reports a ``TdpmmuError``,
        2 for a ``ConfigError`` (one line on stderr), 130 on Ctrl-C, 141 when stdout's reader
        went away.

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
        common.silence_stdout()
        return EXIT_BROKEN_PIPE
    except ConfigError as e:
        # Bad arguments: usage-style exit code and one line, like argparse's own errors.
        msg = " ".join(str(e).split())
        print(f"tdpmmu {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except TdpmmuError as e:
        msg = " ".join(str(e).split())
        print(f"tdpmmu {args.command}: {type(e).__name__}: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"tdpmmu {args.command}: interrupted", file=sys.stderr)
        return 130
