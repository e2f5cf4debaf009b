"""Curve fits on synthetic data with known parameters."""
from __future__ import annotations

import numpy as np
import pytest

from planner.curves import (decomposition_work, factor_work, fit_cost_curves, fit_line, fit_power,
                            precondition_work)


def test_line_fit_recovers_intercept_and_slope():
    x = np.array([1e3, 1e4, 1e5, 1e6, 1e7])
    fit = fit_line(x, 2e-5 + 3e-9 * x)
    assert fit.intercept_s == pytest.approx(2e-5, rel=1e-6)
    assert fit.slope == pytest.approx(3e-9, rel=1e-6)
    assert fit.mean_rel_error < 1e-9


def test_line_fit_clamps_negative_parameters_and_refits():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    fit = fit_line(x, 5.0 - x)  # a falling line: slope clamps to 0, intercept is refitted
    assert fit.slope == 0.0 and fit.intercept_s > 0


def test_power_fit_recovers_coefficient_and_exponent():
    d = np.array([16, 64, 256, 1024, 4096], dtype=float)
    fit = fit_power(d, 4e-11 * d ** 2.7)
    assert fit.exponent == pytest.approx(2.7, rel=1e-9)
    assert fit.coef == pytest.approx(4e-11, rel=1e-6)
    assert fit.predict(512) == pytest.approx(4e-11 * 512 ** 2.7, rel=1e-6)


def test_power_fit_with_noise_stays_close():
    rng = np.random.default_rng(0)
    d = np.geomspace(10, 5000, 30)
    t = 1e-10 * d ** 3 * np.exp(rng.normal(0, 0.05, d.size))
    fit = fit_power(d, t)
    assert fit.exponent == pytest.approx(3.0, abs=0.05)
    assert fit.mean_rel_error < 0.1


def test_cost_curves_from_layer_records():
    layers = []
    for dim_a, dim_g, rows in ((10, 16, 2048), (145, 32, 2048), (513, 64, 32), (65, 10, 32)):
        layers.append({
            "dim_a": dim_a, "dim_g": dim_g, "rows_a": rows, "rows_g": rows,
            "decompose_a_s": 1e-10 * decomposition_work(dim_a),
            "decompose_g_s": 1e-10 * decomposition_work(dim_g),
            "factor_a_s": 2e-11 * factor_work(rows, dim_a),
            "factor_g_s": 2e-11 * factor_work(rows, dim_g),
            "precondition_s": 3e-11 * precondition_work(dim_a, dim_g)})
    fits = fit_cost_curves(layers)
    assert fits["decompose"]["slope"] == pytest.approx(1e-10, rel=1e-6)
    assert fits["factor"]["slope"] == pytest.approx(2e-11, rel=1e-6)
    assert fits["precondition_power"]["exponent"] == pytest.approx(1.0, rel=1e-6)
