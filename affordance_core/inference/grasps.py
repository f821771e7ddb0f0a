"""Grasp-point candidates from an affordance heatmap (numpy in and out).

Pipeline for one action (all done on the patch-grid map, then mapped to image pixels):

1. :func:`local_maxima`: cells that are >= their 8 neighbours (ties on a plateau are broken in
   raster order, so a plateau gives one peak), with a value >= ``min_score``.
2. :func:`window_soft_argmax`: sub-cell position of each peak by the shared GeoAware-SC window
   soft-argmax op :func:`affordance_core.ops.correspondence.window_soft_argmax`
   (``methods.md`` §8.4; the single implementation, all peaks of a map in one batched call):
   the grid is *multiplied* by a 0/1 mask of the (2w+1) x (2w+1) window around the peak
   (clamped to the grid), then a softmax with temperature ``beta`` is taken over **all** cells
   and the expected (row, col) is clamped to the grid. This module passes the op's two opt-in
   deviations from GeoAware's definition (the op's defaults are GeoAware's exact definition):

   * ``normalize_peak=True``: the masked grid is divided by the peak value first, so the
     weights are ``exp((m * g / g_peak - 1) / beta)``; the result then depends on the blob's
     shape only, not on its height, and cells outside the window get ``exp(-1 / beta)``
     relative to the peak for every peak, weak secondary peaks included (with the unscaled
     definition a peak of height 0.2 and ``beta = 0.05`` would give the ~250 zeroed cells a
     weight of e^-4 each and drag the estimate to the grid centre).
   * ``mask_higher=True`` with ``peak=`` the local maximum (GeoAware centres the window on the
     argmax): window cells *higher* than the peak belong to a higher neighbouring peak and are
     masked out as well (otherwise they would dominate the softmax and move a secondary
     candidate onto the first); for the global argmax no cell is higher, so GeoAware's
     definition is unchanged.

   ``window = 0`` here means the peak cell itself (no sub-cell refinement); in the op, 0 is
   GeoAware's plain soft-argmax over the whole grid, so it is not passed on.
3. :func:`grid_to_image`: cell coordinates -> image pixels for an ``align_corners=False``
   (half-pixel-centre) bilinear upsampling of an (h, w) grid to (H, W), the convention of both
   ``torch.nn.functional.interpolate(..., align_corners=False)`` and ``cv2.resize``::

       u = (col + 0.5) * W / w - 0.5        v = (row + 0.5) * H / h - 0.5

   so cell (0, 0) has its centre at pixel ((W / w - 1) / 2, (H / h - 1) / 2) and a symmetric blob
   centred between cells 7 and 8 of a 16-cell row maps to the exact middle of the image.
   (GeoAware's keypoint mapping ``patch * stride + stride // 2``,
   :func:`~affordance_core.ops.correspondence.patch_to_pixel`, puts the centre half a pixel
   further, at the continuous patch centre; the heatmap is upsampled with half-pixel centres,
   hence this mapping.)
4. Score = the image-resolution heatmap sampled bilinearly at (u, v); candidates below
   ``min_score`` are dropped, then :func:`nms` keeps the best ``top_k`` that are more than
   ``nms_radius`` pixels apart (greedy, best first).

Default window: half-size ``w = 2`` (a 5 x 5 window) for the 16 x 16 grid of a 224 input with
patch 14 (or 14 x 14 with patch 16). GeoAware uses w = 7 on a 60 x 60 grid, i.e. a window of ~1/4
of the grid side; on 16 cells that would be the whole map and would mix distinct peaks. w = 2 keeps
the window inside one blob of a typical CAM while covering the neighbours that decide the sub-cell
offset. ``beta = 0.05`` makes zeroed cells weigh e^-20 relative to the peak (negligible even on
a 64 x 64 grid) while a neighbour at 90 % of the peak still weighs e^-2 = 0.14.

Cost: the op runs in torch on CPU (float64, the numpy grid shared without a copy); one call per
heatmap for all its peaks, about 0.1-0.3 ms on a 16 x 16 grid.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from affordance_core.ops.correspondence import window_soft_argmax as _window_soft_argmax_op

logger = logging.getLogger(__name__)

__all__ = ['GraspPoint', 'local_maxima', 'window_soft_argmax', 'grid_to_image', 'sample_bilinear',
           'nms', 'find_grasp_points']


@dataclass(frozen=True)
class GraspPoint:
    """A 2-D grasp candidate.

    Attributes:
        u: column in image pixels (sub-pixel, pixel centres at integers).
        v: row in image pixels.
        score: heatmap value at (u, v), in [0, 1].
        row: sub-cell row on the patch grid.
        col: sub-cell column on the patch grid.
    """

    u: float
    v: float
    score: float
    row: float
    col: float


def _check_map(heat: np.ndarray, name: str) -> np.ndarray:
    heat = np.asarray(heat)
    if heat.ndim != 2 or heat.size == 0:
        raise ValueError(f'{name} must be a non-empty 2-D map, got shape {heat.shape}')
    if not np.issubdtype(heat.dtype, np.floating):
        raise ValueError(f'{name} must be a float map, got dtype {heat.dtype}')
    if not np.all(np.isfinite(heat)):
        raise ValueError(f'{name} contains nan or inf')
    return heat.astype(np.float64, copy=False)


def local_maxima(heat: np.ndarray, min_score: float = 0.0) -> np.ndarray:
    """Cells of ``heat`` that are local maxima of their 3 x 3 neighbourhood.

    A cell is a peak when it is strictly greater than its neighbours that come *before* it in
    raster order and >= those that come after; a flat plateau therefore yields one peak (its
    first cell in raster order), a constant map yields the single cell (0, 0).

    Args:
        heat: (h, w) float map.
        min_score: peaks with a value below this are dropped.

    Returns:
        (N, 2) int64 array of (row, col), sorted by decreasing value (ties in raster order).
    """
    g = _check_map(heat, 'heat')
    h, w = g.shape
    pad = np.full((h + 2, w + 2), -np.inf)
    pad[1:-1, 1:-1] = g
    is_peak = np.ones_like(g, dtype=bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy == 0 and dx == 0:
                continue
            nb = pad[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
            before = dy < 0 or (dy == 0 and dx < 0)
            is_peak &= (g > nb) if before else (g >= nb)
    is_peak &= g >= min_score
    rows, cols = np.nonzero(is_peak)
    order = np.lexsort((rows * w + cols, -g[rows, cols]))  # value desc, then raster order
    return np.stack([rows[order], cols[order]], axis=1).astype(np.int64)


def _check_soft_argmax_args(window: int, beta: float) -> None:
    if window < 0:
        raise ValueError(f'window must be >= 0, got {window}')
    if not beta > 0:
        raise ValueError(f'beta must be > 0, got {beta}')


def _subcell_peaks(g: np.ndarray, peaks: np.ndarray, window: int,
                   beta: float) -> np.ndarray:
    """Sub-cell (row, col) of every peak of ``g`` in one call of the shared op.

    Args:
        g: (h, w) float64 map (checked).
        peaks: (N, 2) int (row, col) cells inside the grid.
        window: half-size (0 = the peak cell itself).
        beta: temperature relative to the peak value.

    Returns:
        (N, 2) float64 (row, col).
    """
    peaks = np.asarray(peaks, dtype=np.int64).reshape(-1, 2)
    if window == 0 or len(peaks) == 0:
        return peaks.astype(np.float64)
    h, w = g.shape
    corr = np.repeat(g[None], len(peaks), axis=0)  # (N, h, w), one row per peak
    xy = _window_soft_argmax_op(corr, window, beta, peak=peaks[:, 0] * w + peaks[:, 1],
                                normalize_peak=True, mask_higher=True)
    return xy[:, ::-1].copy()


def window_soft_argmax(grid: np.ndarray, peak: tuple[int, int], window: int = 2,
                       beta: float = 0.05) -> tuple[float, float]:
    """Sub-cell position of a peak by the GeoAware window soft-argmax (see module docstring).

    Calls :func:`affordance_core.ops.correspondence.window_soft_argmax` with
    ``peak=peak, normalize_peak=True, mask_higher=True``.

    Args:
        grid: (h, w) float map, values >= 0 (e.g. a min-max normalised CAM).
        peak: (row, col) integer cell of the peak (the argmax or a local maximum).
        window: half-size w of the (2w+1) x (2w+1) window, in cells (0 = the peak cell itself).
        beta: softmax temperature, relative to the peak value.

    Returns:
        (row, col) float sub-cell coordinates, clamped to [0, h-1] x [0, w-1].
    """
    g = _check_map(grid, 'grid')
    _check_soft_argmax_args(window, beta)
    h, w = g.shape
    r0, c0 = int(peak[0]), int(peak[1])
    if not (0 <= r0 < h and 0 <= c0 < w):
        raise ValueError(f'peak {peak} lies outside the grid of shape {g.shape}')
    row, col = _subcell_peaks(g, np.array([[r0, c0]]), window, beta)[0]
    return float(row), float(col)


def grid_to_image(row: float | np.ndarray, col: float | np.ndarray,
                  grid_shape: tuple[int, int],
                  image_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Map grid (row, col) to image (u, v) for an ``align_corners=False`` upsampling.

    Args:
        row: grid row(s), cells.
        col: grid column(s), cells.
        grid_shape: (h, w) of the grid.
        image_shape: (H, W) of the image.

    Returns:
        (u, v): ``u = (col + 0.5) * W / w - 0.5``, ``v = (row + 0.5) * H / h - 0.5``.
    """
    h, w = grid_shape
    H, W = image_shape
    u = (np.asarray(col, dtype=np.float64) + 0.5) * (W / w) - 0.5
    v = (np.asarray(row, dtype=np.float64) + 0.5) * (H / h) - 0.5
    return u, v


def sample_bilinear(image: np.ndarray, u: float, v: float) -> float:
    """Bilinear sample of a 2-D map at sub-pixel (u, v) (pixel centres at integers, clamped)."""
    H, W = image.shape
    u = min(max(float(u), 0.0), W - 1.0)
    v = min(max(float(v), 0.0), H - 1.0)
    x0, y0 = int(np.floor(u)), int(np.floor(v))
    x1, y1 = min(x0 + 1, W - 1), min(y0 + 1, H - 1)
    fx, fy = u - x0, v - y0
    top = (1 - fx) * image[y0, x0] + fx * image[y0, x1]
    bot = (1 - fx) * image[y1, x0] + fx * image[y1, x1]
    return float((1 - fy) * top + fy * bot)


def nms(uv: np.ndarray, scores: np.ndarray, radius: float, top_k: int) -> np.ndarray:
    """Greedy non-maximum suppression of points.

    Args:
        uv: (N, 2) point coordinates (pixels).
        scores: (N,) scores; higher is better.
        radius: a point within ``radius`` (Euclidean, inclusive) of a kept better point is
            suppressed; 0 keeps coincident points too.
        top_k: maximum number of points kept (0 = no limit).

    Returns:
        (K,) int64 indices into ``uv``, by decreasing score (stable for ties).
    """
    uv = np.asarray(uv, dtype=np.float64).reshape(-1, 2)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(uv) != len(scores):
        raise ValueError(f'uv has {len(uv)} points but scores has {len(scores)}')
    order = np.argsort(-scores, kind='stable')
    kept: list[int] = []
    for i in order:
        if top_k and len(kept) >= top_k:
            break
        if kept and radius > 0:
            d = np.hypot(*(uv[kept] - uv[i]).T)
            if np.any(d <= radius):
                continue
        kept.append(int(i))
    return np.asarray(kept, dtype=np.int64)


def find_grasp_points(grid: np.ndarray, heatmap: np.ndarray, *, top_k: int = 5,
                      nms_radius: float = 32.0, min_score: float = 0.2, window: int = 2,
                      beta: float = 0.05) -> list[GraspPoint]:
    """Grasp-point candidates of one heatmap, best first.

    Args:
        grid: (h, w) patch-grid map in [0, 1] (min-max normalised CAM); peaks are found here.
        heatmap: (H, W) image-resolution map in [0, 1]; gives the image size and the scores.
        top_k: maximum number of candidates (0 = all).
        nms_radius: suppression radius in image pixels.
        min_score: candidates whose grid peak or image score is below this are dropped.
        window: soft-argmax window half-size, cells.
        beta: soft-argmax temperature (relative to the peak value).

    Returns:
        list of :class:`GraspPoint` sorted by decreasing score.
    """
    g = _check_map(grid, 'grid')
    hm = _check_map(heatmap, 'heatmap')
    _check_soft_argmax_args(window, beta)
    peaks = local_maxima(g, min_score=min_score)
    cands: list[GraspPoint] = []
    for row, col in _subcell_peaks(g, peaks, window, beta).tolist():
        u, v = grid_to_image(row, col, g.shape, hm.shape)
        score = sample_bilinear(hm, float(u), float(v))
        if score < min_score:
            continue
        cands.append(GraspPoint(float(u), float(v), score, row, col))
    if not cands:
        return []
    keep = nms(np.array([[c.u, c.v] for c in cands]), np.array([c.score for c in cands]),
               nms_radius, top_k)
    return [cands[i] for i in keep]
