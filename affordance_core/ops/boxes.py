"""Boxes from class-agnostic activation maps and CorLoc (C2AM WSOL protocol, ``methods.md`` §7.5).

Box extraction follows the reference ``compute_bboxes_from_scoremaps`` (itself from
clovaai/wsolevaluation) with ``multi_contour_eval=False``:

1. the map in [0, 1] becomes ``uint8(map * 255)`` (truncation, as ``astype(np.uint8)``);
2. for a threshold tau the cut is ``int(tau * max)`` of that uint8 map and pixels strictly
   above it are foreground (``cv2.THRESH_BINARY``);
3. ``cv2.findContours(RETR_TREE, CHAIN_APPROX_SIMPLE)``; only the contour with the largest
   ``cv2.contourArea`` is kept;
4. its bounding rectangle ``(x, y, x + w, y + h)`` with ``x1 <= W - 1`` and ``y1 <= H - 1``
   (map coordinates), multiplied by the scale input size / map size. No contour gives
   ``(0, 0, 0, 0)``.

CorLoc is the percentage of images whose box has IoU > 0.5 (strict) with a ground-truth box
(the best over several GT boxes); IoU uses ``(x1 - x0) * (y1 - y0)`` areas, no +1, as the
reference. The reference picks the threshold with the best CorLoc on the test set
(:func:`best_threshold`, first maximum wins).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

__all__ = ['default_thresholds', 'boxes_from_scoremap', 'box_iou', 'corloc', 'best_threshold']


def default_thresholds(num: int = 20) -> list[float]:
    """The reference threshold list ``[1/num, 2/num, ..., (num-1)/num]`` (19 values for 20)."""
    if isinstance(num, bool) or not isinstance(num, int) or num < 2:
        raise ValueError(f'num must be an integer >= 2, got {num!r}')
    return [(i + 1) / num for i in range(num - 1)]


def _check_scoremap(scoremap: Any) -> np.ndarray:
    if hasattr(scoremap, 'detach'):
        scoremap = scoremap.detach().cpu().numpy()
    m = np.asarray(scoremap)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f'scoremap must be a 2-D (h, w) map, got shape {m.shape}')
    if not np.issubdtype(m.dtype, np.floating):
        raise ValueError(f'scoremap must be float in [0, 1], got dtype {m.dtype}')
    m = m.astype(np.float32)
    if not np.all(np.isfinite(m)):
        raise ValueError('scoremap contains nan or inf')
    if m.min() < 0 or m.max() > 1:
        raise ValueError(f'scoremap must lie in [0, 1], got [{m.min():.4g}, {m.max():.4g}]; '
                         'min-max normalise it (or use the sigmoid map) first')
    return m


def _scale_pair(scale: float | Sequence[float]) -> tuple[float, float]:
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        sx = sy = float(scale)
    else:
        try:
            sx, sy = (float(s) for s in scale)
        except (TypeError, ValueError):
            raise ValueError(f'scale must be a number or (sx, sy), got {scale!r}') from None
    if not (sx > 0 and sy > 0):
        raise ValueError(f'scale must be positive, got {scale!r}')
    return sx, sy


def boxes_from_scoremap(scoremap: Any, thresholds: Sequence[float],
                        scale: float | Sequence[float] = 1.0, *,
                        multi_contour: bool = False) -> list[np.ndarray]:
    """Boxes of an activation map at every threshold (reference protocol, see module docstring).

    Args:
        scoremap: (h, w) float map in [0, 1] (numpy or torch), e.g. the polarity-corrected
            C2AM sigmoid map.
        thresholds: values tau in [0, 1]; the cut is ``int(tau * max(uint8 map))``.
        scale: input size / map size: one factor (the reference) or (sx, sy) for x and y.
        multi_contour: keep every contour instead of the largest (the reference's
            ``multi_contour_eval=True``).

    Returns:
        one float64 array (K, 4) of boxes (x0, y0, x1, y1) per threshold, in input pixels;
        K = 1 unless ``multi_contour``; ``[[0, 0, 0, 0]]`` where no pixel passes.
    """
    m = _check_scoremap(scoremap)
    sx, sy = _scale_pair(scale)
    height, width = m.shape
    image = (m * 255).astype(np.uint8)
    peak = int(image.max())
    out = []
    for tau in thresholds:
        tau = float(tau)
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f'thresholds must lie in [0, 1], got {tau}')
        _, binary = cv2.threshold(image, int(tau * peak), 255, cv2.THRESH_BINARY)
        contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[-2]
        if len(contours) == 0:
            out.append(np.zeros((1, 4)))
            continue
        if not multi_contour:
            contours = [max(contours, key=cv2.contourArea)]
        boxes = []
        for contour in contours:
            x, y, w, h = cv2.boundingRect(contour)
            x1, y1 = min(x + w, width - 1), min(y + h, height - 1)
            boxes.append([x * sx, y * sy, x1 * sx, y1 * sy])
        out.append(np.asarray(boxes, dtype=np.float64))
    return out


def box_iou(boxes: Any, gt: Any) -> np.ndarray:
    """IoU of boxes with ground-truth boxes, reference formula (no +1 on widths).

    Args:
        boxes: (N, 4) boxes (x0, y0, x1, y1).
        gt: (N, 4) boxes, one per row of ``boxes``, or (N, G, 4) several per image (the best
            IoU is returned).

    Returns:
        (N,) float64 IoU (0 where the union is empty).
    """
    a = np.asarray(boxes, dtype=np.float64)
    b = np.asarray(gt, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != 4:
        raise ValueError(f'boxes must have shape (N, 4), got {a.shape}')
    if b.ndim == 2:
        b = b[:, None]
    if b.ndim != 3 or b.shape[0] != a.shape[0] or b.shape[2] != 4:
        raise ValueError(f'gt must have shape ({a.shape[0]}, 4) or ({a.shape[0]}, G, 4), '
                         f'got {np.asarray(gt).shape}')
    a = a[:, None]
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    union = area_a + area_b - inter
    iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
    return iou.max(axis=1)


def corloc(boxes: Any, gt: Any, iou_threshold: float = 0.5) -> float:
    """CorLoc in percent: share of images whose box has IoU > ``iou_threshold`` (strict).

    Args:
        boxes: (N, 4) predicted boxes, one per image.
        gt: (N, 4) or (N, G, 4) ground-truth boxes.
        iou_threshold: 0.5 in the reference.

    Returns:
        100 * mean(IoU > iou_threshold).
    """
    iou = box_iou(boxes, gt)
    if iou.size == 0:
        raise ValueError('corloc needs at least one box')
    return float(100.0 * np.mean(iou > iou_threshold))


def best_threshold(scoremaps: Sequence[Any], gt: Any, thresholds: Sequence[float] | None = None,
                   scale: float | Sequence[float] = 1.0,
                   iou_threshold: float = 0.5) -> tuple[float, float, list[float]]:
    """The reference's threshold search: CorLoc at every tau, the first best one wins.

    Args:
        scoremaps: N maps (h, w) in [0, 1].
        gt: (N, 4) or (N, G, 4) ground-truth boxes in input pixels.
        thresholds: taus (default :func:`default_thresholds`).
        scale: input size / map size (see :func:`boxes_from_scoremap`).
        iou_threshold: IoU cut of a correct box.

    Returns:
        (best CorLoc in percent, its tau, CorLoc of every tau).
    """
    taus = default_thresholds() if thresholds is None else [float(t) for t in thresholds]
    if not taus:
        raise ValueError('thresholds must not be empty')
    per_map = [boxes_from_scoremap(m, taus, scale) for m in scoremaps]
    if not per_map:
        raise ValueError('best_threshold needs at least one scoremap')
    scores = [corloc(np.stack([boxes[k][0] for boxes in per_map]), gt, iou_threshold)
              for k in range(len(taus))]
    best = int(np.argmax(scores))  # first maximum, as the reference's strict '>' scan
    return scores[best], taus[best], scores
