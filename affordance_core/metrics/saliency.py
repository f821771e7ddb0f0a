"""KLD, SIM and NSS exactly as the official AGD20K evaluation code computes them.

``utils/evaluation.py`` is byte-identical in Cross-View-AG, LOCATE, WSMA, SelectiveCL and LoopTrans
(``methods.md`` §1.4). These functions are re-implemented from that description and keep every
numerical detail, so a map scored here gets the published protocol's number:

* ``eps = 1e-12``; both maps become distributions by ``X / (sum X + eps)``.
* KLD = ``sum G' * log(G' / (P' + eps) + eps)``: the eps sits *inside* the log, after the ratio.
  Pixels with ``G' = 0`` therefore give ``0 * log(eps) = 0`` instead of ``0 * log(0) = nan``.
* SIM = ``sum min(P', G')``.
* NSS: both maps are divided by 255 first (as the official code does; it changes the result only
  at the level of float rounding), the prediction is standardised with numpy's *population* std
  (``ddof=0``), the GT is min-max normalised with ``+1e-12`` in the denominator and binarised
  with a *strict* ``> 0.1``, and NSS = ``sum(S * F) / sum(F + 1e-12)`` (1e-12 added per pixel).

The inputs are used as given (no dtype change, no resizing): hand over the maps exactly as the
official functions would receive them, i.e. the post-processed 224x224 prediction
(:mod:`affordance_core.metrics.postprocess`) and the GT as ``cv2.resize(mask / 255, (224, 224))``.

Degenerate inputs follow numpy semantics, as the official code would, but silently (numpy's
RuntimeWarnings are suppressed here; the evaluator counts such images instead):

* constant prediction (std 0): NSS = ``0 / 0`` = **nan**. After ``normalize_map`` a constant raw
  map becomes all zeros, which also gives SIM = 0 and a large finite KLD
  (``-log(eps) - H(G') = 27.63 - entropy of G'``).
* identical maps give KLD = ``-H*W*eps + eps`` (about -5.0e-8 at 224x224), not exactly 0, because
  ``log(G'/(G' + eps) + eps) ~ -eps/G' + eps`` per pixel; SIM = 1.
* all-zero or constant GT: no pixel passes the threshold, NSS = ``0 / (H*W*1e-12)`` = 0; an
  all-zero GT gives KLD = 0 and SIM = 0.
* negative prediction values (not a valid saliency map) can make ``P' + eps <= 0`` and give nan
  KLD; maps are expected to be non-negative, as after min-max normalisation.

:class:`affordance_core.metrics.evaluator.AffordanceEvaluator` reports non-finite values as
``invalid`` and averages each metric over the images where it is finite.
"""
from __future__ import annotations

from typing import Any

import numpy as np

EPS = 1e-12          # official eps of cal_kl / cal_sim
NSS_THRESHOLD = 0.1  # strict '>' on the min-max normalised GT (official image_binary)

__all__ = ['EPS', 'NSS_THRESHOLD', 'kld', 'sim', 'nss', 'fixation_map']


def _check_pair(pred: Any, gt: Any) -> tuple[np.ndarray, np.ndarray]:
    """Return ``pred`` and ``gt`` as 2-D numeric numpy arrays of the same shape (no copy)."""
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    for name, arr in (('pred', pred), ('gt', gt)):
        if arr.ndim != 2:
            raise ValueError(f'{name} must be a 2-D (H, W) map, got shape {arr.shape}; '
                             'score one image at a time (the evaluator loops over a batch)')
        if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            raise ValueError(f'{name} must be numeric, got dtype {arr.dtype}')
        if np.iscomplexobj(arr):
            raise ValueError(f'{name} must be real-valued, got dtype {arr.dtype}')
    if pred.shape != gt.shape:
        raise ValueError(f'pred and gt shapes differ: {pred.shape} vs {gt.shape}; resize the '
                         'prediction with metrics.postprocess (both are 224x224 officially)')
    return pred, gt


def kld(pred: Any, gt: Any) -> float:
    """Kullback-Leibler divergence KL(G' || P') with the official eps placement (lower is better).

    Args:
        pred: (H, W) non-negative predicted map (e.g. min-max normalised to [0, 1]).
        gt: (H, W) ground-truth map (``mask / 255`` resized to the same size).

    Returns:
        ``sum G' * log(G' / (P' + 1e-12) + 1e-12)`` with ``X' = X / (sum X + 1e-12)``.
    """
    pred, gt = _check_pair(pred, gt)
    with np.errstate(divide='ignore', invalid='ignore', over='ignore'):
        p = pred / (pred.sum() + EPS)
        g = gt / (gt.sum() + EPS)
        return float(np.sum(g * np.log(g / (p + EPS) + EPS)))


def sim(pred: Any, gt: Any) -> float:
    """Similarity (histogram intersection) of the sum-normalised maps (higher is better, max 1).

    Args:
        pred: (H, W) non-negative predicted map.
        gt: (H, W) ground-truth map.

    Returns:
        ``sum min(P', G')`` with ``X' = X / (sum X + 1e-12)``.
    """
    pred, gt = _check_pair(pred, gt)
    with np.errstate(divide='ignore', invalid='ignore', over='ignore'):
        p = pred / (pred.sum() + EPS)
        g = gt / (gt.sum() + EPS)
        return float(np.sum(np.minimum(p, g)))


def fixation_map(gt: Any) -> np.ndarray:
    """Binary fixation map of the official NSS: ``(G - min) / (max - min + 1e-12) > 0.1``.

    Args:
        gt: (H, W) ground-truth map, already divided by 255 as in the official ``cal_nss``.

    Returns:
        (H, W) float64 array of 0.0 / 1.0 (strict ``>``: a pixel at exactly 0.1 is 0).
    """
    gt = np.asarray(gt)
    norm = (gt - np.min(gt)) / (np.max(gt) - np.min(gt) + 1e-12)
    return (norm > NSS_THRESHOLD).astype(np.float64)


def nss(pred: Any, gt: Any) -> float:
    """Normalised scanpath saliency of ``pred`` on the binarised GT (higher is better).

    Args:
        pred: (H, W) predicted map.
        gt: (H, W) ground-truth map.

    Returns:
        ``sum(S * F) / sum(F + 1e-12)`` with ``S = (P - mean P) / std P`` (population std) and
        ``F = fixation_map(G)``; nan when the prediction is constant (std 0), see the module doc.
    """
    pred, gt = _check_pair(pred, gt)
    with np.errstate(divide='ignore', invalid='ignore', over='ignore'):
        pred = pred / 255.0
        gt = gt / 255.0
        smap = (pred - np.mean(pred)) / np.std(pred)
        fix = fixation_map(gt)
        return float(np.sum(smap * fix) / np.sum(fix + 1e-12))
