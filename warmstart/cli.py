"""The ``warmstart`` command line.

Each subcommand lives in its own module (``warmstart.commands.<name>``) exposing ``HELP: str``,
``add_arguments(parser)`` and ``run(args) -> int``; adding a subcommand is one line in :data:`COMMANDS`.
Modules keep heavy imports (torch, transformers, jax) inside ``run`` so that ``warmstart --help`` is fast.

Exit status: 0 on success, 1 when ``verify`` finds a corrupt checkpoint, 2 for any other error (printed as
one ``error: ...`` line, never a traceback), 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback
from collections.abc import Sequence

from warmstart.errors import WarmstartError

COMMANDS: dict[str, str] = {
    "bench": "warmstart.commands.bench",
    "convert": "warmstart.commands.convert",
    "export": "warmstart.commands.export",
    "inspect": "warmstart.commands.inspect",
    "node": "warmstart.commands.node",
    "scheduler": "warmstart.commands.scheduler",
    "serve": "warmstart.commands.serve",
    "store": "warmstart.commands.store",
    "verify": "warmstart.commands.verify",
}

EXIT_OK = 0
EXIT_CORRUPT = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="warmstart", description="Fast-loading LLM checkpoints for serverless inference on Triton."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``warmstart`` command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args._run(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (WarmstartError, OSError, ValueError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:  # a failure not mapped to a warmstart error yet: still one line, never a traceback
        if args.verbose:
            traceback.print_exc()
        print(
            f"error: unexpected {type(e).__name__}: {one_line(e)} (a bug in warmstart; -v prints the traceback)",
            file=sys.stderr,
        )
        return EXIT_ERROR


def one_line(e: BaseException) -> str:
    """An exception as a single line (``str(e)``, or its type name when empty)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text


if __name__ == "__main__":
    sys.exit(main())
