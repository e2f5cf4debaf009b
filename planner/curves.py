"""Dimension-to-time curves fitted to measured costs, so unseen layers and batch sizes can be
predicted: decomposition ~ d^3, factor construction ~ rows * d^2, preconditioning
~ d_g^2 d_a + d_g d_a^2. Pure numpy over plain numbers; seconds throughout."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np


@dataclass(frozen=True)
class LineFit:
    """seconds = intercept_s + slope * x, both >= 0, with its mean relative error on the data."""
    intercept_s: float
    slope: float
    mean_rel_error: float

    def predict(self, x: float) -> float:
        """Seconds at work size `x`."""
        return self.intercept_s + self.slope * x


def fit_line(x: Sequence[float], seconds: Sequence[float]) -> LineFit:
    """Least-squares line through (x, seconds), weighted by 1/seconds so that small and large
    points count alike in relative terms; intercept and slope are clamped to >= 0."""
    xs = np.asarray(x, dtype=float)
    ts = np.asarray(seconds, dtype=float)
    if xs.size == 0:
        return LineFit(0.0, 0.0, 0.0)
    weights = 1.0 / np.maximum(ts, 1e-12)
    design = np.stack([np.ones_like(xs), xs], axis=1) * weights[:, None]
    (intercept, slope), *_ = np.linalg.lstsq(design, ts * weights, rcond=None)
    intercept, slope = max(float(intercept), 0.0), max(float(slope), 0.0)
    if slope == 0.0 or intercept == 0.0:  # refit the free parameter alone after clamping
        intercept, slope = _refit_clamped(xs, ts, weights, intercept == 0.0)
    predicted = intercept + slope * xs
    error = float(np.mean(np.abs(predicted - ts) / np.maximum(ts, 1e-12)))
    return LineFit(intercept, slope, error)


def _refit_clamped(xs, ts, weights, through_origin: bool) -> tuple[float, float]:
    if through_origin:
        denom = float(np.sum((xs * weights) ** 2))
        return 0.0, max(float(np.sum(xs * ts * weights ** 2)) / denom, 0.0) if denom else 0.0
    return max(float(np.sum(ts * weights ** 2) / np.sum(weights ** 2)), 0.0), 0.0


@dataclass(frozen=True)
class PowerFit:
    """seconds = coef * x ** exponent, fitted in log-log space, with its mean relative error."""
    coef: float
    exponent: float
    mean_rel_error: float

    def predict(self, x: float) -> float:
        """Seconds at work size `x`."""
        return self.coef * float(x) ** self.exponent


def fit_power(x: Sequence[float], seconds: Sequence[float]) -> PowerFit:
    """Least-squares line through (log x, log seconds) over the positive points: the power law
    that small kernels (overhead-bound) and large ones (d^3-bound) both sit near."""
    xs = np.asarray(x, dtype=float)
    ts = np.asarray(seconds, dtype=float)
    keep = (xs > 0) & (ts > 0)
    if keep.sum() < 2:
        return PowerFit(0.0, 0.0, 0.0)
    exponent, log_coef = np.polyfit(np.log(xs[keep]), np.log(ts[keep]), 1)
    fit = PowerFit(float(np.exp(log_coef)), float(exponent), 0.0)
    predicted = fit.coef * xs[keep] ** fit.exponent
    error = float(np.mean(np.abs(predicted - ts[keep]) / ts[keep]))
    return PowerFit(fit.coef, fit.exponent, error)


def decomposition_work(dim: int) -> float:
    """Work units of one decomposition of a dim x dim factor: d^3."""
    return float(dim) ** 3


def factor_work(rows: int, dim: int) -> float:
    """Work units of building a dim x dim factor from `rows` rows: rows * d^2."""
    return float(rows) * float(dim) ** 2


def precondition_work(dim_a: int, dim_g: int) -> float:
    """Work units of preconditioning a dim_g x dim_a gradient: d_g^2 d_a + d_g d_a^2."""
    return float(dim_g) ** 2 * dim_a + float(dim_g) * dim_a ** 2


def fit_cost_curves(layers: Sequence[Mapping]) -> dict[str, dict]:
    """Fit the three curves to a profile's layer records (dicts with dim_a, dim_g, rows_a,
    rows_g and the measured seconds), each as a line (`<curve>`: LineFit) and as a power law of
    the work size (`<curve>_power`: PowerFit). Returns plain dicts."""
    dec_x = [decomposition_work(l[k]) for l in layers for k in ("dim_a", "dim_g")]
    dec_t = [l[k] for l in layers for k in ("decompose_a_s", "decompose_g_s")]
    fac_x = [factor_work(l[r], l[d]) for l in layers for r, d in (("rows_a", "dim_a"), ("rows_g", "dim_g"))]
    fac_t = [l[k] for l in layers for k in ("factor_a_s", "factor_g_s")]
    pre_x = [precondition_work(l["dim_a"], l["dim_g"]) for l in layers]
    pre_t = [l["precondition_s"] for l in layers]
    curves = {"decompose": (dec_x, dec_t), "factor": (fac_x, fac_t), "precondition": (pre_x, pre_t)}
    fits: dict[str, dict] = {name: asdict(fit_line(x, t)) for name, (x, t) in curves.items()}
    fits.update({f"{name}_power": asdict(fit_power(x, t)) for name, (x, t) in curves.items()})
    return fits
