"""K-FAC math, with no communication: one curvature block per layer (its Kronecker factors,
their decomposition, preconditioning), the decomposition with its numerical-safety retries,
and the KL clip that scales the whole update."""
from .blocks import (Conv2dBlock, KFACBlock, LinearBlock, kfac_layers, make_block,
                     require_kfac_layers, uncovered_layers)
from .decomposition import ComputeMethod, DecomposeOutcome, decompose_safely
from .kl_clip import apply_preconditioned, kl_clip_scale

__all__ = ["ComputeMethod", "Conv2dBlock", "DecomposeOutcome", "KFACBlock", "LinearBlock",
           "apply_preconditioned", "decompose_safely", "kfac_layers", "kl_clip_scale",
           "make_block", "require_kfac_layers", "uncovered_layers"]
