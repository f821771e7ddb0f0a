"""Model-free reference predictions: what any learned model has to beat.

:func:`center_prior` is the classic centre-bias baseline of saliency evaluation: objects in
egocentric AGD20K images are roughly centred, so a centred blob already scores well. The choice of
sigma follows the common "Gaussian with sigma a quarter of the image side" centre-bias map; it is a
parameter, and the value used is stored in the evaluation result by
:func:`affordance_core.engine.evaluation.evaluate_baseline`.
"""
from __future__ import annotations

import numpy as np

__all__ = ['CENTER_SIGMA_FRACTION', 'center_prior']

CENTER_SIGMA_FRACTION = 0.25  # sigma = 0.25 * min(h, w) by default


def center_prior(h: int, w: int, sigma: float | None = None) -> np.ndarray:
    """Centred isotropic Gaussian ``exp(-d^2 / (2 sigma^2))`` as a raw map.

    The centre is the image centre in pixel-centre coordinates, ``((h - 1) / 2, (w - 1) / 2)``, so
    the map is symmetric under flips. The peak is 1 (exactly 1 only for odd sizes). Feed it to the
    evaluator with ``postprocess='locate'`` like a raw CAM (resize + min-max).

    Args:
        h: map height in pixels (> 0).
        w: map width in pixels (> 0).
        sigma: standard deviation in pixels; ``None`` = ``0.25 * min(h, w)``.

    Returns:
        (h, w) float32 map in (0, 1].
    """
    for name, v in (('h', h), ('w', w)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
            raise ValueError(f'{name} must be a positive int, got {v!r}')
    if sigma is None:
        sigma = CENTER_SIGMA_FRACTION * min(h, w)
    if not np.isfinite(sigma) or sigma <= 0:
        raise ValueError(f'sigma must be a positive finite number of pixels, got {sigma!r}')
    ys = np.arange(h, dtype=np.float64) - (h - 1) / 2.0
    xs = np.arange(w, dtype=np.float64) - (w - 1) / 2.0
    d2 = ys[:, None] ** 2 + xs[None, :] ** 2
    return np.exp(-d2 / (2.0 * float(sigma) ** 2)).astype(np.float32)
