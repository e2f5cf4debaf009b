"""Turning a Kronecker factor into what preconditions with it (eigendecomposition or inverse),
with numerical-safety retries: a solver failure or a non-finite result is retried with more
damping on the diagonal, and a factor that still fails leaves the previous result in place."""
from __future__ import annotations

import enum

import torch

from ..runtime.finite import all_finite


class ComputeMethod(str, enum.Enum):
    """How factors are turned into a preconditioner."""
    EIGEN = "eigen"
    INVERSE = "inverse"


class DecomposeOutcome(str, enum.Enum):
    """What one decomposition attempt of one factor came to."""
    OK = "ok"              # decomposed at the requested damping
    RETRIED = "retried"    # failed or non-finite at first; succeeded with more damping
    FAILED = "failed"      # non-finite factor, or every retry failed: the old result stays


# After a failed or non-finite decomposition, retry with this many times the damping added to
# the factor's diagonal, in order, before giving up (the previous decomposition then stays).
RETRY_DAMPING_MULTIPLES = (10.0, 100.0, 1000.0)
_MIN_RETRY_SHIFT = 1e-6  # the smallest diagonal shift tried when damping is 0


def decompose_safely(factor: torch.Tensor | None, side: str, method: ComputeMethod,
                     damping: float) -> tuple[dict[str, torch.Tensor] | None, DecomposeOutcome]:
    """Decompose `factor` (side "a" or "g"), retrying with more damping when the solver fails or
    returns non-finite numbers. Returns (result or None, outcome); None leaves the caller's old
    one. Result keys: eigen q_<side>, d_<side>; inverse inv_<side>."""
    if factor is None or not all_finite(factor):
        return None, DecomposeOutcome.FAILED
    base = max(damping, _MIN_RETRY_SHIFT)
    shifts = (0.0,) + tuple(base * m for m in RETRY_DAMPING_MULTIPLES)
    for attempt, shift in enumerate(shifts):
        try:
            result = _decompose(factor, side, method, damping, shift=shift)
        except RuntimeError:  # torch.linalg.LinAlgError is a RuntimeError
            continue
        if all(all_finite(t) for t in result.values()):
            return result, DecomposeOutcome.OK if attempt == 0 else DecomposeOutcome.RETRIED
    return None, DecomposeOutcome.FAILED


def _decompose(factor: torch.Tensor, side: str, method: ComputeMethod,
               damping: float, *, shift: float = 0.0) -> dict[str, torch.Tensor]:
    """eigen: eigenvalues (negatives clamped to 0) and eigenvectors; inverse: (F + sqrt(damping) I)^-1
    through a Cholesky factorisation. `shift` adds that much more to the diagonal first."""
    def eye() -> torch.Tensor:
        return torch.eye(factor.shape[0], dtype=factor.dtype, device=factor.device)

    if method is ComputeMethod.EIGEN:
        values, vectors = torch.linalg.eigh(factor + shift * eye() if shift else factor)
        return {f"d_{side}": values.clamp_min_(0.0), f"q_{side}": vectors}
    cholesky = torch.linalg.cholesky(factor + (damping ** 0.5 + shift) * eye())
    return {f"inv_{side}": torch.cholesky_inverse(cholesky)}
