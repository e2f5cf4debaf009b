"""Helpers the benchmarks share: run `dpkfac` as a user would, alone or under torchrun; print
tables; write the results as a markdown page under docs/results/."""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from rich.table import Table
from tabulate import tabulate

from dpkfac.core.jsonio import write_atomic


def python_command(workers: int, *args: str) -> list[str]:
    """`python ARGS` as one process (workers == 1) or under torchrun with `workers` processes
    (ARGS: a script and its arguments, or -m and a module)."""
    if workers == 1:
        return [sys.executable, *args]
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    return [torchrun, "--standalone", "--nproc_per_node", str(workers), *args]


def dpkfac_command(workers: int, *args: str) -> list[str]:
    """`dpkfac ARGS` as one process (workers == 1) or under torchrun with `workers` processes."""
    return python_command(workers, "-m", "dpkfac.cli", *args)


def run_timed(cmd: list[str], *, capture: bool = False) -> tuple[float, str]:
    """Run a command (failing loudly); its wall seconds and, if asked, its standard output."""
    start = time.perf_counter()
    result = subprocess.run(cmd, check=True, text=True,
                            stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
                            env=dict(os.environ, OMP_NUM_THREADS=os.environ.get(
                                "OMP_NUM_THREADS", "1")))
    return time.perf_counter() - start, result.stdout or ""


# ----------------------------------------------------------------------------- results as markdown

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "docs" / "results"
_STARTED = datetime.now(timezone.utc)  # the bench's start: this module is imported first


def add_docs_arguments(parser: argparse.ArgumentParser, bench: str) -> None:
    """`--docs-out PATH` (default docs/results/<bench>.md; '' skips) and `--no-docs`."""
    default = RESULTS_DIR / f"{bench}.md"
    parser.add_argument("--docs-out", metavar="PATH", default=str(default),
                        help="also write the results as markdown here (default: "
                             f"{default.relative_to(ROOT)}; '' to skip)")
    parser.add_argument("--no-docs", action="store_true",
                        help="do not write the markdown results file")


def docs_out(args: argparse.Namespace) -> Path | None:
    """Where the markdown results go, or None when the user asked for none."""
    if args.no_docs or not args.docs_out:
        return None
    return Path(args.docs_out)


def rich_table(title: str, headers: list[str], rows: list[list[str]], *,
               left: tuple[str, ...] = (), styles: list[str | None] | None = None,
               no_wrap: bool = False, section_ends: list[bool] | None = None) -> Table:
    """A rich table for the console from the same cells the markdown file gets: columns named
    in `left` left-justified, the others right; per-row styles and section ends optional."""
    table = Table(title=title)
    for header in headers:
        table.add_column(header, justify="left" if header in left else "right", no_wrap=no_wrap)
    for i, row in enumerate(rows):
        table.add_row(*row, style=styles[i] if styles else None,
                      end_section=bool(section_ends and section_ends[i]))
    return table


def machine_facts() -> dict[str, str]:
    """What the numbers depend on: CPU, cores, threads, torch and Python versions, commit."""
    facts = {"os": f"{platform.system()} {platform.release()}",
             "cpu": _cpu_model(), "cores": _cores(),
             "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS",
                                                "unset (1 in the commands run_timed starts)"),
             "python": platform.python_version(), "torch": _version("torch"),
             "commit": _git_commit()}
    return {key: value for key, value in facts.items() if value}


def markdown_table(headers: list[str], rows: list[list[str]], *,
                   left: tuple[str, ...] = ()) -> str:
    """A GitHub-flavoured markdown table (tabulate): cells kept exactly as formatted, columns
    named in `left` left-aligned, the others right-aligned (as the console table)."""
    rows = [[str(cell).replace("|", "\\|") for cell in row] for row in rows]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True,
                    colalign=["left" if h in left else "right" for h in headers])


class ResultsDoc:
    """One bench's results as a markdown page: what ran, where, the tables, the floors.

    Add tables and paragraphs in order, then `write(path)` (atomic: a temporary file in the same
    folder, then a rename)."""

    def __init__(self, bench: str, title: str, *, floors: str) -> None:
        self.bench, self.title, self.floors = bench, title, floors
        self.command = "python " + shlex.join(
            [_relative(sys.argv[0]), *sys.argv[1:]]) if sys.argv else f"python bench/{bench}.py"
        self.started = _STARTED
        self.blocks: list[str] = []

    def table(self, headers: list[str], rows: list[list[str]], *, title: str | None = None,
              left: tuple[str, ...] = (), note: str | None = None) -> None:
        block = [f"### {title}", ""] if title else []
        block.append(markdown_table(headers, rows, left=left))
        if note:
            block += ["", note]
        self.blocks.append("\n".join(block))

    def text(self, paragraph: str) -> None:
        self.blocks.append(paragraph)

    def render(self, failures: list[str]) -> str:
        facts = machine_facts()
        lines = [f"# {self.title}", "",
                 f"Written by `bench/{self.bench}.py`; re-run it to refresh this page.", "",
                 f"- command: `{self.command}`",
                 f"- date: {self.started:%Y-%m-%d %H:%M} UTC, "
                 f"{(datetime.now(timezone.utc) - self.started).total_seconds():.0f} s",
                 *(f"- {key}: {value}" for key, value in facts.items()), "",
                 "## Results", ""]
        for block in self.blocks:
            lines += [block, ""]
        lines += ["## Floors", "", self.floors, ""]
        if failures:
            lines += ["**FAIL**: below the floor:", "", *(f"- {f}" for f in failures)]
        else:
            lines.append("**PASS**: every floor met.")
        return "\n".join(lines) + "\n"

    def write(self, path: Path | None, failures: list[str]) -> None:
        """Write the page (nothing when path is None) and say where."""
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        text = self.render(failures)
        write_atomic(path, lambda fh: fh.write(text))
        print(f"results written to {_relative(str(path))}")


def _relative(path: str) -> str:
    """`path` relative to the repository root when it is inside it."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return path


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _cores() -> str:
    logical = os.cpu_count() or 0
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = logical
    return f"{usable} usable of {logical} logical"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _git_commit() -> str:
    """HEAD's short hash, '+ local changes' when the tree differs (read-only git calls)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, text=True, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return ""
    return head + (" + local changes" if dirty.strip() else "")
