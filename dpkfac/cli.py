"""The `dpkfac` console command: profile, plan, train, whatif and validate.

Bad input raises dpkfac.core.errors.InputError anywhere below; it becomes one `error:` line and
exit status 2. A fault of the running job (executor.runtime.faults.RunFault: a rank died or
hung) is one
`error:` line and exit status 1. plan and whatif never import torch.
"""
from __future__ import annotations

import argparse
import os
import sys

from dpkfac.core.errors import InputError
from executor.runtime.faults import RunFault


class _Parser(argparse.ArgumentParser):
    """argparse with exit status 2 and an `error:` line (its default), kept explicit."""

    def error(self, message: str) -> None:  # noqa: D401 - argparse API
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The full command-line parser with every subcommand registered."""
    from executor import commands as executor_commands
    from planner import cli as planner_commands

    parser = _Parser(prog="dpkfac", description="Plan and run DP-KFAC distributed K-FAC training.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    executor_commands.register(sub)
    planner_commands.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunFault as exc:  # a dead or stuck rank: not bad input, and worth a restart
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def console_main() -> int:
    """The installed `dpkfac` command (and `python -m dpkfac.cli`): main(), then, in a process
    launched by torchrun that imported torch.distributed, the process ends without the
    interpreter's finalisation. torch 2.13's gloo worker thread may still be releasing the last
    collective's tensors (it needs the GIL to do so) while the interpreter finalises; the thread
    is then killed and the process aborts with SIGABRT after a complete, successful run; after
    a fault (a dead or stuck peer) the group's threads are stuck and the teardown would abort
    too, turning exit status 1 into -6. Every file is written and closed before main()
    returns, so nothing is lost."""
    status = main()
    if "torch.distributed" in sys.modules:  # plan and whatif never import torch
        from executor.runtime.distributed import launched_by_torchrun
        if launched_by_torchrun():
            _exit_without_finalizing(status)
    return status


def _exit_without_finalizing(status: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    sys.exit(console_main())
