"""The alpha-beta (Hockney) line of a collective, fitted to measured times: seconds = alpha_s +
nbytes * beta_s_per_byte, both >= 0. Pure numpy."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def fit_alpha_beta(nbytes: Sequence[float], seconds: Sequence[float]) -> dict:
    """Least-squares line through (nbytes, seconds), weighted by 1/seconds so that small and
    large messages count alike in relative terms, alpha and beta clamped to >= 0; with its mean
    relative error on the data (`fit_mean_rel_error`)."""
    xs = np.asarray(nbytes, dtype=float)
    ts = np.asarray(seconds, dtype=float)
    if xs.size == 0:
        return {"alpha_s": 0.0, "beta_s_per_byte": 0.0, "fit_mean_rel_error": 0.0}
    weights = 1.0 / np.maximum(ts, 1e-12)
    design = np.stack([np.ones_like(xs), xs], axis=1) * weights[:, None]
    (alpha, beta), *_ = np.linalg.lstsq(design, ts * weights, rcond=None)
    alpha, beta = max(float(alpha), 0.0), max(float(beta), 0.0)
    if beta == 0.0 or alpha == 0.0:  # refit the free parameter alone after clamping
        alpha, beta = _refit_clamped(xs, ts, weights, through_origin=alpha == 0.0)
    error = float(np.mean(np.abs(alpha + beta * xs - ts) / np.maximum(ts, 1e-12)))
    return {"alpha_s": alpha, "beta_s_per_byte": beta, "fit_mean_rel_error": error}


def _refit_clamped(xs: np.ndarray, ts: np.ndarray, weights: np.ndarray, *,
                   through_origin: bool) -> tuple[float, float]:
    if through_origin:
        denom = float(np.sum((xs * weights) ** 2))
        return 0.0, max(float(np.sum(xs * ts * weights ** 2)) / denom, 0.0) if denom else 0.0
    return max(float(np.sum(ts * weights ** 2) / np.sum(weights ** 2)), 0.0), 0.0
