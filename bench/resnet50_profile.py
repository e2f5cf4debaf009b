"""Build profiles/resnet50.b32.analytic-16x4-ib100.json: ResNet-50's real K-FAC layer shapes
with analytic costs calibrated to the published D-KFAC breakdown on 64 GPUs (measured: false).

Why analytic: `dpkfac profile --model resnet50` measures on this machine's 2-core CPU, which
says nothing about the seed's 64 V100-class GPUs and takes very long. What is real here: every
layer's name, kind, dim_a, dim_g, grad_numel (from the zoo's ResNet-50, executor/workload/models.py) and
the rows each factor is built from (batch x output positions, from one forward pass at 224x224),
and the whole model's parameter count. What is assumed is recorded in the file's "assumptions".

    .venv/bin/python bench/resnet50_profile.py [--out FILE]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from executor.kfac import kfac_layers, make_block  # noqa: E402
from executor.workload.models import build_model  # noqa: E402
from dpkfac.core.jsonio import write_json_atomic  # noqa: E402
from dpkfac.core.profile import profile_from_dict  # noqa: E402
from dpkfac.core.schemas import PROFILE_SCHEMA_ID  # noqa: E402

OUT = ROOT / "profiles" / "resnet50.b32.analytic-16x4-ib100.json"
BATCH = 32
# Published D-KFAC breakdown, ResNet-50 on 64 GPUs, seconds per iteration (DOMAIN.md):
FORWARD_BACKWARD_S = 0.132
GRAD_ALLREDUCE_S = 0.067
FACTOR_COMPUTATION_S = 0.205   # every worker builds every factor in D-KFAC
INVERSE_COMPUTATION_S = 0.032  # the busiest worker's inverses (the largest layer sets it)
WORKERS = 64
HOP_LATENCY_S = 5e-6           # assumed per-hop latency (InfiniBand + NCCL software)
OPTIMIZER_S = 0.002            # assumed: one SGD update of 25.6 M parameters on a GPU


def layer_rows(model: torch.nn.Module) -> dict[str, int]:
    """Rows of each K-FAC layer's factors per sample: output positions (conv) or 1 (linear)."""
    rows: dict[str, int] = {}
    hooks = [module.register_forward_hook(
        lambda mod, inp, out, name=name: rows.__setitem__(
            name, out.shape[2] * out.shape[3] if out.dim() == 4 else 1))
        for name, module in kfac_layers(model)]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, 224, 224))
    for hook in hooks:
        hook.remove()
    return rows


def build() -> dict:
    """The profile document."""
    model = build_model("resnet50")
    rows = layer_rows(model)
    shapes = [(name, module, make_block(module, name)) for name, module in kfac_layers(model)]
    factor_flops = sum(2 * BATCH * rows[n] * (b.dim_a ** 2 + b.dim_g ** 2) for n, _, b in shapes)
    matmul_rate = factor_flops / FACTOR_COMPUTATION_S
    largest = max(b.dim_a ** 3 + b.dim_g ** 3 for _, _, b in shapes)
    inverse_rate = largest / INVERSE_COMPUTATION_S
    layers = []
    for name, module, b in shapes:
        a, g, r = b.dim_a, b.dim_g, BATCH * rows[name]
        layers.append({
            "name": name, "kind": type(module).__name__, "dim_a": a, "dim_g": g,
            "grad_numel": b.grad_numel,
            "factor_a_s": 2 * r * a * a / matmul_rate, "factor_g_s": 2 * r * g * g / matmul_rate,
            "decompose_a_s": a ** 3 / inverse_rate, "decompose_g_s": g ** 3 / inverse_rate,
            "precondition_s": 2 * (g * g * a + g * a * a) / matmul_rate,
            "state_bytes": 4 * 2 * (a * a + g * g),  # factors and their inverses, float32
            "rows_a": r,
        })
    params = sum(p.numel() for p in model.parameters())
    beta_hop = GRAD_ALLREDUCE_S / (2 * (WORKERS - 1) / WORKERS * 4 * params)
    return {
        "schema": PROFILE_SCHEMA_ID, "model": "resnet50", "batch_size": BATCH,
        "device": "analytic: 64 GPUs (16 nodes x 4), 100 Gb/s InfiniBand, calibrated to the "
                  "published D-KFAC breakdown", "dtype": "float32", "compute_method": "inverse",
        "measured": False, "layers": layers,
        "step": {"forward_backward_s": FORWARD_BACKWARD_S, "optimizer_s": OPTIMIZER_S},
        "comm": {"backend": "nccl", "world_size": WORKERS,
                 "allreduce": {"alpha_s": 2 * (WORKERS - 1) * HOP_LATENCY_S,
                               "beta_s_per_byte": 2 * (WORKERS - 1) / WORKERS * beta_hop},
                 "broadcast": {"alpha_s": (WORKERS - 1) * HOP_LATENCY_S,
                               "beta_s_per_byte": beta_hop}},
        "model_grad_numel": params,
        "assumptions": {
            "source": "layer shapes, rows and parameter count from the zoo's ResNet-50 "
                      "(executor/workload/models.py, torchvision-style v1.5, 224x224, 1000 classes); costs "
                      "analytic; bench/resnet50_profile.py writes this file",
            "factor_construction": f"2 rows d^2 flops per factor at {matmul_rate:.3g} flop/s, "
                                   f"chosen so building all 54 layers' factors at batch {BATCH} "
                                   f"takes {FACTOR_COMPUTATION_S} s (published D-KFAC factor "
                                   "computation, ResNet-50, 64 GPUs)",
            "decomposition": f"Cholesky inverse, d^3 flops per factor at {inverse_rate:.3g} "
                             f"flop/s, chosen so the largest layer (A 4608) takes "
                             f"{INVERSE_COMPUTATION_S} s (published inverse computation)",
            "preconditioning": "2 (dG^2 dA + dG dA^2) flops at the factor-construction rate",
            "state_bytes": "float32 A, G and their inverses",
            "forward_backward_s": f"{FORWARD_BACKWARD_S} s published; optimizer_s "
                                  f"{OPTIMIZER_S} s assumed",
            "collectives": f"per-hop latency {HOP_LATENCY_S} s assumed; per-hop seconds per "
                           f"byte from the published gradient all-reduce ({GRAD_ALLREDUCE_S} s "
                           f"for {4 * params} bytes as a 64-rank ring); comm holds the 64-rank "
                           "ring all-reduce and pipelined broadcast in planner.model.network's forms",
            "published_breakdown_s": {"forward_backward": 0.132, "gradient_allreduce": 0.067,
                                      "factor_computation": 0.205,
                                      "factor_communication": 0.300,
                                      "inverse_computation": 0.032,
                                      "inverse_communication": 0.146},
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    doc = build()
    profile_from_dict(doc, source="generated profile")
    write_json_atomic(Path(args.out), doc)
    print(f"wrote {args.out}: {len(doc['layers'])} layers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
