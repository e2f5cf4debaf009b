"""Synthetic profiles (schema dpkfac.profile/1) for the planner tests; no torch needed."""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from planner import cli as commands
from dpkfac.core.errors import InputError


def synthetic_layer(name: str, *, dim_a: int, dim_g: int, rows: int = 256,
                    flops_s: float = 1e-10, dtype_bytes: int = 4) -> dict:
    """One layer with costs following the K-FAC scalings: rows*d^2, d^3, dG^2 dA + dG dA^2."""
    return {
        "name": name, "kind": "Linear", "dim_a": dim_a, "dim_g": dim_g,
        "grad_numel": dim_a * dim_g,
        "factor_a_s": rows * dim_a ** 2 * flops_s, "factor_g_s": rows * dim_g ** 2 * flops_s,
        "decompose_a_s": 4 * dim_a ** 3 * flops_s, "decompose_g_s": 4 * dim_g ** 3 * flops_s,
        "precondition_s": (dim_g ** 2 * dim_a + dim_g * dim_a ** 2) * flops_s,
        "state_bytes": dtype_bytes * (2 * dim_a ** 2 + dim_a + 2 * dim_g ** 2 + dim_g),
    }


def synthetic_profile_dict(n_layers: int = 8, seed: int = 0, *, world_size: int = 4,
                           compute_method: str = "eigen", alpha_s: float = 2e-5,
                           beta_s_per_byte: float = 1e-10, forward_backward_s: float = 0.05,
                           optimizer_s: float = 0.002, model: str = "synthetic") -> dict:
    """A valid profile document with `n_layers` random layers (dims 16..512), reproducible."""
    rng = random.Random(seed)
    layers = [synthetic_layer(f"layers.{i}", dim_a=rng.randint(16, 512), dim_g=rng.randint(16, 512))
              for i in range(n_layers)]
    return {
        "schema": "dpkfac.profile/1", "model": model, "batch_size": 32, "device": "cpu",
        "dtype": "float32", "compute_method": compute_method, "measured": False,
        "layers": layers,
        "step": {"forward_backward_s": forward_backward_s, "optimizer_s": optimizer_s},
        "comm": {"backend": "gloo", "world_size": world_size,
                 "allreduce": {"alpha_s": alpha_s, "beta_s_per_byte": beta_s_per_byte},
                 "broadcast": {"alpha_s": alpha_s, "beta_s_per_byte": beta_s_per_byte}},
    }


def write_profile(folder: Path, name: str = "profile.json", **kwargs) -> Path:
    """Write synthetic_profile_dict(**kwargs) to folder/name and return the path."""
    path = Path(folder) / name
    path.write_text(json.dumps(synthetic_profile_dict(**kwargs), indent=2), encoding="utf-8")
    return path


def run_planner_cli(argv: list[str]) -> int:
    """Like dpkfac.cli.main, with only the planner's subcommands registered (no torch)."""
    parser = argparse.ArgumentParser(prog="dpkfac")
    commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
