"""Official KLD / SIM / NSS, map post-processing and the centre prior, on hand-computed cases."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from affordance_core.metrics import kld, normalize_map, normalize_map_double, nss, sim
from affordance_core.metrics.baselines import center_prior
from affordance_core.metrics.postprocess import minmax, preprocess_gt
from affordance_core.metrics.saliency import EPS, fixation_map

# ---------------------------------------------------------------------------------------------
# KLD / SIM
# ---------------------------------------------------------------------------------------------


def test_kld_sim_point_prediction_on_two_pixel_gt():
    # P = [[1, 0], [0, 0]] -> P' = [1, 0, 0, 0];  G = [[1, 1], [0, 0]] -> G' = [.5, .5, 0, 0]
    # KLD = .5 * log(.5 / 1 + eps) + .5 * log(.5 / (0 + eps) + eps) + 0 + 0
    #     = .5 * log(.5) + .5 * log(5e11) = -0.3465736 + 13.4689372 = 13.1223634
    # SIM = min(1, .5) + min(0, .5) = 0.5
    pred = np.array([[1.0, 0.0], [0.0, 0.0]])
    gt = np.array([[1.0, 1.0], [0.0, 0.0]])
    assert kld(pred, gt) == pytest.approx(13.1223634, abs=1e-6)
    assert kld(pred, gt) == pytest.approx(0.5 * math.log(0.5) + 0.5 * math.log(5e11), abs=1e-9)
    assert sim(pred, gt) == pytest.approx(0.5, abs=1e-9)


def test_kld_sim_reversed_ramps():
    # P = [1, 2, 3, 4] / 10, G = [4, 3, 2, 1] / 10
    # KLD = .4 log(4) + .3 log(1.5) + .2 log(2/3) + .1 log(1/4) = .3 log 4 + .1 log 1.5 = 0.4564348
    # SIM = .1 + .2 + .2 + .1 = 0.6
    pred = np.array([[1.0, 2.0], [3.0, 4.0]])
    gt = np.array([[4.0, 3.0], [2.0, 1.0]])
    assert kld(pred, gt) == pytest.approx(0.4564348, abs=1e-6)
    assert sim(pred, gt) == pytest.approx(0.6, abs=1e-9)
    # the maps are sum-normalised: scaling either one changes nothing
    assert kld(pred * 7, gt / 3) == pytest.approx(kld(pred, gt), abs=1e-9)
    assert sim(pred * 7, gt / 3) == pytest.approx(0.6, abs=1e-9)


def test_kld_eps_inside_log_makes_zero_gt_pixels_contribute_nothing():
    pred = np.array([[1.0, 0.0], [0.0, 0.0]])
    gt = np.array([[1.0, 1.0], [0.0, 0.0]])
    p = pred / (pred.sum() + EPS)
    g = gt / (gt.sum() + EPS)
    with np.errstate(divide='ignore', invalid='ignore'):
        # eps outside the log (log(G'/(P'+eps)) + eps): 0 * log(0) = nan on the G' = 0 pixels
        outside = np.sum(g * (np.log(g / (p + EPS)) + EPS))
    assert math.isnan(outside)
    # official: log(G'/(P'+eps) + eps) -> 0 * log(1e-12) = 0 on those pixels, finite result
    assert kld(pred, gt) == pytest.approx(13.1223634, abs=1e-6)
    # a delta GT on an all-zero prediction: 1 * log(1 / 1e-12 + 1e-12) = log(1e12) = 27.631021
    assert kld(np.zeros((2, 2)), np.array([[1.0, 0.0], [0.0, 0.0]])) == pytest.approx(
        27.6310211, abs=1e-6)


def test_identical_maps_give_kld_zero_and_sim_one():
    rng = np.random.default_rng(0)
    m = rng.random((224, 224))
    # KLD ~ 0, but not exactly: per pixel G' log(G' / (G' + eps) + eps) ~ G' (-eps / G' + eps),
    # summed: -H*W*eps + eps = -50176e-12 + 1e-12 = -5.0175e-8 (official eps placement)
    assert kld(m, m) == pytest.approx(-50175e-12, rel=1e-3)
    assert sim(m, m) == pytest.approx(1.0, abs=1e-9)
    assert nss(m, m) > 0


def test_metrics_accept_float32_and_return_python_floats():
    pred = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    gt = np.array([[4.0, 3.0], [2.0, 1.0]])
    for fn in (kld, sim, nss):
        assert isinstance(fn(pred, gt), float)
    assert kld(pred, gt) == pytest.approx(0.4564348, abs=1e-5)


# ---------------------------------------------------------------------------------------------
# NSS
# ---------------------------------------------------------------------------------------------

# P: 3x3 zeros with 9 in the centre. mean = 1, population var = (8 * 1 + 8 ** 2) / 9 = 8,
# std = 2*sqrt(2) = 2.8284271 (the sample std would be sqrt(72 / 8) = 3).
# S = (P - 1) / 2.8284271: centre 8 / 2.8284271 = 2.8284271, elsewhere -1 / 2.8284271 = -0.3535534
_P = np.zeros((3, 3))
_P[1, 1] = 9.0


def _gt(side_value: float) -> np.ndarray:
    # After the official / 255: centre 1e6, (1, 2) = side_value / 255. The range 1e6 makes the
    # + 1e-12 of the min-max denominator vanish in float64, so 1e5 / 1e6 is exactly 0.1.
    g = np.zeros((3, 3))
    g[1, 1] = 255e6
    g[1, 2] = side_value
    return g


def test_nss_strict_threshold_at_exactly_0_1():
    fix = fixation_map(_gt(255e5) / 255.0)
    assert fix[1, 2] == 0.0 and fix[1, 1] == 1.0 and fix.sum() == 1.0  # 0.1 > 0.1 is False
    # F = centre only: NSS = 2.8284271 / (1 + 9e-12)
    assert nss(_P, _gt(255e5)) == pytest.approx(2 * math.sqrt(2), abs=1e-9)
    # a '>=' threshold would include (1, 2): (2.8284271 - 0.3535534) / 2 = 1.2374369
    assert nss(_P, _gt(255e5)) != pytest.approx(1.2374369, abs=1e-3)


def test_nss_pixel_just_above_threshold_counts():
    # (1, 2) at 0.101 of the range is included: NSS = (2.8284271 - 0.3535534) / 2 = 1.2374369
    assert nss(_P, _gt(255e5 * 1.01)) == pytest.approx(1.2374369, abs=1e-6)


def test_nss_uses_population_std():
    value = nss(_P, _gt(0.0))
    assert value == pytest.approx(2.8284271, abs=1e-6)   # 8 / sqrt(8)
    assert value != pytest.approx(8.0 / 3.0, abs=1e-3)   # 8 / sample std


def test_nss_is_scale_invariant_in_pred_and_eps_per_pixel_for_flat_gt():
    assert nss(_P * 255, _gt(0.0)) == pytest.approx(nss(_P, _gt(0.0)), abs=1e-9)
    # constant GT: F = 0 everywhere, NSS = 0 / (9 * 1e-12) = 0 (the per-pixel eps avoids 0 / 0)
    assert nss(_P, np.ones((3, 3))) == 0.0


def test_constant_prediction_gives_nan_nss_without_warning():
    gt = _gt(0.0)
    with np.errstate(all='raise'):  # the metric must not leak numpy floating-point errors
        value = nss(np.full((3, 3), 0.5), gt)
    assert math.isnan(value)
    # KLD / SIM of a constant map stay finite: uniform P' = 1/9 against a delta G' = 1
    assert kld(np.full((3, 3), 0.5), gt) == pytest.approx(math.log(9), abs=1e-6)
    assert sim(np.full((3, 3), 0.5), gt) == pytest.approx(1 / 9, abs=1e-9)


@pytest.mark.parametrize('fn', [kld, sim, nss])
def test_metric_input_errors(fn):
    with pytest.raises(ValueError, match='shapes differ'):
        fn(np.zeros((3, 3)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match='2-D'):
        fn(np.zeros((1, 3, 3)), np.zeros((1, 3, 3)))
    with pytest.raises(ValueError, match='numeric'):
        fn(np.array([['a']]), np.array([['b']]))


# ---------------------------------------------------------------------------------------------
# post-processing
# ---------------------------------------------------------------------------------------------


def test_normalize_map_resizes_bilinearly_then_minmaxes():
    # raw = x + 2y on a 2x2 grid. cv2 bilinear 2 -> 4 samples the source at -0.25, 0.25, 0.75,
    # 1.25 (half-pixel centres, clamped): 1-D profile f = [0, .25, .75, 1]. Output = f(x) + 2 f(y),
    # range [0, 3], then / (3 + 1e-10).
    raw = np.array([[0.0, 1.0], [2.0, 3.0]], np.float32)
    out = normalize_map(raw, size=4)
    f = np.array([0.0, 0.25, 0.75, 1.0])
    np.testing.assert_allclose(out, (f[None, :] + 2 * f[:, None]) / 3.0, atol=1e-6)
    assert out.dtype == np.float32 and out.shape == (4, 4)


def test_normalize_map_accepts_torch_and_non_square_maps():
    raw = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    out = normalize_map(raw, size=8)
    assert out.shape == (8, 8) and out.min() == 0.0 and out.max() == pytest.approx(1.0, abs=1e-6)


def test_postprocess_paths_agree_on_normal_maps_and_differ_on_constant_maps():
    rng = np.random.default_rng(1)
    raw = (rng.standard_normal((14, 14)) * 5 + 3).astype(np.float32)
    a, b = normalize_map(raw), normalize_map_double(raw)
    assert a.shape == b.shape == (224, 224)
    # bilinear resizing commutes with a positive affine map: same map up to rounding
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert b.max() == 1.0  # the final min-max has no eps: the maximum is exactly 1
    const = np.full((14, 14), 2.0, np.float32)
    assert np.all(normalize_map(const) == 0.0)           # (x - min) / (0 + 1e-10) = 0
    assert np.all(np.isnan(normalize_map_double(const)))  # 0 / 0 as in the official test.py


def test_minmax_eps():
    x = np.array([1.0, 3.0])
    np.testing.assert_allclose(minmax(x), [0.0, 2.0 / (2.0 + 1e-10)], rtol=0, atol=0)
    np.testing.assert_array_equal(minmax(x, 0.0), [0.0, 1.0])


def test_preprocess_gt_divides_uint8_by_255_and_resizes():
    mask = np.array([[0, 255], [51, 102]], np.uint8)
    out = preprocess_gt(mask, size=2)  # same size: pure / 255
    np.testing.assert_allclose(out, [[0.0, 1.0], [0.2, 0.4]], atol=1e-12)
    assert out.dtype == np.float64
    big = preprocess_gt(np.full((30, 50), 255, np.uint8))
    assert big.shape == (224, 224) and np.allclose(big, 1.0)
    # float input is taken as already in [0, 1]
    np.testing.assert_allclose(preprocess_gt(np.full((3, 5), 0.5), size=4), 0.5)
    with pytest.raises(ValueError, match='uint8'):
        preprocess_gt(np.zeros((4, 4), np.int32))
    with pytest.raises(ValueError, match='size'):
        normalize_map(np.zeros((4, 4)), size=0)


# ---------------------------------------------------------------------------------------------
# centre prior
# ---------------------------------------------------------------------------------------------


def test_center_prior_values():
    m = center_prior(5, 5, sigma=1.0)
    assert m.shape == (5, 5) and m.dtype == np.float32
    assert m[2, 2] == 1.0
    assert m[2, 3] == pytest.approx(math.exp(-0.5), abs=1e-7)      # d = 1
    assert m[0, 0] == pytest.approx(math.exp(-8 / 2), abs=1e-7)    # d^2 = 8
    np.testing.assert_array_equal(m, m[::-1, ::-1])
    # default sigma = 0.25 * min(h, w): 224 -> 56 px; the corner of an even map sits at
    # d^2 = 2 * 111.5^2
    d = center_prior(224, 224)
    assert d[0, 0] == pytest.approx(math.exp(-2 * 111.5 ** 2 / (2 * 56.0 ** 2)), rel=1e-5)
    assert center_prior(4, 8).shape == (4, 8)
    with pytest.raises(ValueError, match='sigma'):
        center_prior(4, 4, sigma=0.0)
    with pytest.raises(ValueError, match='positive int'):
        center_prior(0, 4)
