"""Analytic (unmeasured) profiles of realistic shapes for benchmarks and tests: ResNet-50-like
convolutions, transformer-like stacks of equal linear layers, large random mixes.

Costs follow the K-FAC scalings on a GPU-like device: factor construction 2 rows d^2 flops at
`matmul_flops` per second, decomposition 4 d^3 flops at `eigh_flops` per second (eigh is far
slower than a matmul), preconditioning 2 (dG^2 dA + dG dA^2) flops at `matmul_flops`; state is
two factors and their eigendecompositions in float32. Seconds and bytes; no torch.
"""
from __future__ import annotations

import random

from dpkfac.core.schemas import PROFILE_SCHEMA_ID

MATMUL_FLOPS = 1.0e13   # flop/s of the matmul-shaped work
EIGH_FLOPS = 2.0e12     # flop/s of an eigendecomposition


def layer_dict(name: str, *, kind: str, dim_a: int, dim_g: int, rows: int,
               matmul_flops: float = MATMUL_FLOPS, eigh_flops: float = EIGH_FLOPS) -> dict:
    """One profile layer (dpkfac.profile/1) with analytic costs."""
    return {
        "name": name, "kind": kind, "dim_a": dim_a, "dim_g": dim_g, "grad_numel": dim_a * dim_g,
        "factor_a_s": 2 * rows * dim_a ** 2 / matmul_flops,
        "factor_g_s": 2 * rows * dim_g ** 2 / matmul_flops,
        "decompose_a_s": 4 * dim_a ** 3 / eigh_flops,
        "decompose_g_s": 4 * dim_g ** 3 / eigh_flops,
        "precondition_s": 2 * (dim_g ** 2 * dim_a + dim_g * dim_a ** 2) / matmul_flops,
        "state_bytes": 4 * (2 * dim_a ** 2 + dim_a + 2 * dim_g ** 2 + dim_g),
    }


def profile_dict(model: str, layers: list[dict], *, batch_size: int,
                 forward_backward_s: float, world_size: int = 8) -> dict:
    """A complete analytic profile around `layers` (NCCL-like collectives measured at 8 ranks)."""
    link = {"alpha_s": 3e-5, "beta_s_per_byte": 1 / 50e9}
    return {"schema": PROFILE_SCHEMA_ID, "model": model, "batch_size": batch_size,
            "device": "synthetic GPU", "dtype": "float32", "compute_method": "eigen",
            "measured": False, "layers": layers,
            "step": {"forward_backward_s": forward_backward_s, "optimizer_s": 0.002},
            "comm": {"backend": "nccl", "world_size": world_size,
                     "allreduce": dict(link), "broadcast": dict(link)}}


def resnet50_profile(*, batch_size: int = 32) -> dict:
    """ResNet-50's 54 K-FAC layers (53 convolutions + fc) with their factor sizes."""
    layers = [layer_dict("conv1", kind="Conv2d", dim_a=3 * 49, dim_g=64,
                         rows=batch_size * 112 ** 2)]
    stages = [(3, 64, 256, 56), (4, 128, 512, 28), (6, 256, 1024, 14), (3, 512, 2048, 7)]
    channels = 64
    for s, (blocks, mid, out, side) in enumerate(stages, start=1):
        for b in range(blocks):
            rows = batch_size * side ** 2
            pre = f"layer{s}.{b}"
            layers.append(layer_dict(f"{pre}.conv1", kind="Conv2d", dim_a=channels, dim_g=mid,
                                     rows=rows))
            layers.append(layer_dict(f"{pre}.conv2", kind="Conv2d", dim_a=9 * mid, dim_g=mid,
                                     rows=rows))
            layers.append(layer_dict(f"{pre}.conv3", kind="Conv2d", dim_a=mid, dim_g=out,
                                     rows=rows))
            if b == 0:
                layers.append(layer_dict(f"{pre}.downsample.0", kind="Conv2d", dim_a=channels,
                                         dim_g=out, rows=rows))
            channels = out
    layers.append(layer_dict("fc", kind="Linear", dim_a=2049, dim_g=1000, rows=batch_size))
    return profile_dict("resnet50-synthetic", layers, batch_size=batch_size,
                        forward_backward_s=0.132)


def transformer_profile(*, blocks: int = 24, width: int = 1024, tokens: int = 4096) -> dict:
    """A transformer encoder: per block q, k, v, o (width x width) and the MLP (width x 4 width,
    4 width x width), with bias; 6 layers per block."""
    layers = []
    for b in range(blocks):
        for name in ("q", "k", "v", "o"):
            layers.append(layer_dict(f"blocks.{b}.attn.{name}", kind="Linear", dim_a=width + 1,
                                     dim_g=width, rows=tokens))
        layers.append(layer_dict(f"blocks.{b}.mlp.fc1", kind="Linear", dim_a=width + 1,
                                 dim_g=4 * width, rows=tokens))
        layers.append(layer_dict(f"blocks.{b}.mlp.fc2", kind="Linear", dim_a=4 * width + 1,
                                 dim_g=width, rows=tokens))
    return profile_dict(f"transformer-{blocks}x{width}-synthetic", layers, batch_size=8,
                        forward_backward_s=0.004 * blocks)


def mixed_profile(*, n_layers: int = 1000, seed: int = 0) -> dict:
    """`n_layers` linear layers with widths drawn from 256..4096 (reproducible)."""
    rng = random.Random(seed)
    widths = [256, 512, 768, 1024, 1536, 2048, 3072, 4096]
    layers = [layer_dict(f"layers.{i}", kind="Linear", dim_a=rng.choice(widths) + 1,
                         dim_g=rng.choice(widths), rows=2048) for i in range(n_layers)]
    return profile_dict(f"mixed-{n_layers}-synthetic", layers, batch_size=8,
                        forward_backward_s=0.5)
