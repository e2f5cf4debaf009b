"""The solvers' names and settings that the command line needs without loading a solver."""
from __future__ import annotations

METHODS = ("round-robin", "greedy", "block", "local-search", "ilp", "best")
HEURISTICS = ("round-robin", "greedy", "block")
DEFAULT_ILP_MAX_BINARIES = 20_000  # "best" skips larger programs (local search covers them)
OWNER_MODES = ("auto", "all")      # the owner search: also try fewer owners, or keep all


def auto_time_limit_s(*, layers: int, workers: int) -> float:
    """The default solver time limit, seconds: 0.5 s plus 0.1 ms per (layer, worker) pair, at
    most 3 s, so plans of ResNet-50 on 64 workers stay under a second and 144 x 64 under 5 s."""
    return min(3.0, 0.5 + 1e-4 * layers * workers)
