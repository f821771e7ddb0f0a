"""Turn raw CAMs and GT masks into the 224x224 maps the official metrics are computed on.

Two prediction paths exist in the official code (``methods.md`` §1.4):

* :func:`normalize_map` (LOCATE, SelectiveCL, LoopTrans ``utils/util.py::normalize_map``): raw
  low-resolution CAM -> ``cv2.resize`` to ``size x size`` (bilinear) -> min-max with denominator
  ``max - min + 1e-10``.
* :func:`normalize_map_double` (Cross-View-AG / WSMA ``test.py``): min-max of the
  low-resolution map with ``+1e-10`` (WSMA's ``normalize_map`` of ``cam + cam1``; Cross-View-AG
  skips this first step) -> ``cv2.resize`` -> min-max again *without* eps. Because bilinear
  resizing commutes with a positive affine map, the two paths give the same map up to float
  rounding and the eps (about 1e-10 relative) for any non-constant input; they differ for
  constant maps: the LOCATE path gives zeros, the double path gives nan (0 / 0), exactly as
  the official code would.

GT: :func:`preprocess_gt` is ``mask / 255`` (uint8 input) then ``cv2.resize`` to ``size x size``
(bilinear, the cv2 default), in float64 as in the official scripts.

``cv2.resize`` takes ``(width, height)``; every function here produces square ``size x size`` maps.
"""
from __future__ import annotations

from typing import Any

import cv2
import numpy as np

__all__ = ['preprocess_gt', 'normalize_map', 'normalize_map_double', 'minmax']

NORM_EPS = 1e-10  # official normalize_map eps


def _to_numpy_2d(x: Any, name: str) -> np.ndarray:
    """(H, W) numpy view of a numpy array or (CPU or device) torch tensor."""
    if hasattr(x, 'detach'):  # torch.Tensor without importing torch here
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f'{name} must be a 2-D (H, W) map, got shape {arr.shape}')
    if arr.size == 0:
        raise ValueError(f'{name} is empty (shape {arr.shape})')
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise ValueError(f'{name} must be a real numeric array, got dtype {arr.dtype}')
    return arr


def _check_size(size: int) -> int:
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size <= 0:
        raise ValueError(f'size must be a positive int, got {size!r}')
    return int(size)


def _resize(arr: np.ndarray, size: int) -> np.ndarray:
    """Bilinear ``cv2.resize`` to (size, size); integer / float16 input is promoted to float32."""
    if arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float32)
    return cv2.resize(np.ascontiguousarray(arr), (size, size), interpolation=cv2.INTER_LINEAR)


def minmax(x: np.ndarray, eps: float = NORM_EPS) -> np.ndarray:
    """``(x - min) / (max - min + eps)``; ``eps=0`` reproduces the eps-free official variant.

    Args:
        x: array of any shape.
        eps: added to the denominator. With ``eps=0`` a constant map gives nan (0 / 0).

    Returns:
        array of the same shape and float dtype.
    """
    x = np.asarray(x)
    with np.errstate(divide='ignore', invalid='ignore'):
        return (x - np.min(x)) / (np.max(x) - np.min(x) + eps)


def preprocess_gt(mask: Any, size: int = 224) -> np.ndarray:
    """Official GT preprocessing: ``mask / 255`` (uint8 input) then bilinear resize.

    Args:
        mask: (H, W) GT heatmap, uint8 in [0, 255] (as read from the png) or float in [0, 1]
            (already divided by 255; used unchanged).
        size: output side length.

    Returns:
        (size, size) float64 map (float32 input stays float32).
    """
    size = _check_size(size)
    arr = _to_numpy_2d(mask, 'mask')
    if arr.dtype == np.uint8:
        arr = arr / 255.0
    elif np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f'mask of dtype {arr.dtype}: pass the uint8 png (0..255) or a float map '
                         'in [0, 1]')
    return _resize(arr, size)


def normalize_map(raw: Any, size: int = 224) -> np.ndarray:
    """LOCATE / SelectiveCL / LoopTrans path: resize the raw CAM, then min-max (eps 1e-10).

    Args:
        raw: (h, w) raw CAM (numpy array or torch tensor), e.g. 14x14.
        size: output side length.

    Returns:
        (size, size) map in [0, 1); a constant raw map gives all zeros.
    """
    size = _check_size(size)
    arr = _to_numpy_2d(raw, 'raw')
    return minmax(_resize(arr, size), NORM_EPS)


def normalize_map_double(raw: Any, size: int = 224) -> np.ndarray:
    """Cross-View-AG / WSMA path: min-max (eps 1e-10), resize, min-max again without eps.

    Args:
        raw: (h, w) raw (or already refined) low-resolution map.
        size: output side length.

    Returns:
        (size, size) map in [0, 1]; a constant raw map gives nan everywhere (official 0 / 0).
    """
    size = _check_size(size)
    arr = _to_numpy_2d(raw, 'raw')
    return minmax(_resize(minmax(arr, NORM_EPS), size), 0.0)
