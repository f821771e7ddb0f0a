"""Visualisation without matplotlib: heatmap overlays, image grids and training curves (cv2).

All images are RGB ``uint8`` (H, W, 3) in and out; files are written with ``cv2.imwrite`` (which
wants BGR, converted here). Text uses cv2's Hershey font, so labels should be ASCII.
"""
from __future__ import annotations

import functools
import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import cv2
import numpy as np

logger = logging.getLogger(__name__)

__all__ = ['overlay', 'save_overlay', 'side_by_side', 'save_image', 'save_training_curves']

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_RANGE_TOL = 1e-3  # heatmaps slightly outside [0, 1] (float rounding) are clipped


def _check_rgb(rgb: Any, name: str = 'rgb') -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f'{name} must be an (H, W, 3) RGB image, got shape {rgb.shape}')
    if rgb.dtype != np.uint8:
        raise ValueError(f'{name} must be uint8 (0..255), got dtype {rgb.dtype}; convert with '
                         '(img * 255).round().astype(np.uint8) if it is float in [0, 1]')
    return rgb


def _check_heatmap(heatmap: Any) -> np.ndarray:
    if hasattr(heatmap, 'detach'):
        heatmap = heatmap.detach().cpu().numpy()
    hm = np.asarray(heatmap)
    if hm.ndim != 2 or hm.size == 0:
        raise ValueError(f'heatmap must be a 2-D (H, W) map, got shape {hm.shape}')
    if not np.issubdtype(hm.dtype, np.floating):
        raise ValueError(f'heatmap must be float in [0, 1], got dtype {hm.dtype}')
    if not np.all(np.isfinite(hm)):
        raise ValueError('heatmap contains nan or inf; normalise it first '
                         '(metrics.postprocess.normalize_map)')
    lo, hi = float(hm.min()), float(hm.max())
    if lo < -_RANGE_TOL or hi > 1 + _RANGE_TOL:
        raise ValueError(f'heatmap values must lie in [0, 1], got [{lo:.4g}, {hi:.4g}]; '
                         'min-max normalise it first')
    return np.clip(hm.astype(np.float32), 0.0, 1.0)


def overlay(rgb: Any, heatmap: Any, alpha: float = 0.5,
            colormap: int = cv2.COLORMAP_JET) -> np.ndarray:
    """Blend a colour-mapped heatmap over an image.

    Args:
        rgb: (H, W, 3) uint8 RGB image.
        heatmap: (h, w) float map in [0, 1] (numpy or torch); resized bilinearly to (H, W).
        alpha: heatmap weight in [0, 1] (0 = image only, 1 = heatmap only).
        colormap: an OpenCV colormap id (``cv2.COLORMAP_*``).

    Returns:
        (H, W, 3) uint8 RGB image ``round((1 - alpha) * rgb + alpha * colour(heatmap))``
        (OpenCV's ``addWeighted`` rounding: within one grey level of the float formula).
    """
    rgb = _check_rgb(rgb)
    hm = _check_heatmap(heatmap)
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f'alpha must lie in [0, 1], got {alpha}')
    h, w = rgb.shape[:2]
    if hm.shape != (h, w):
        hm = cv2.resize(hm, (w, h), interpolation=cv2.INTER_LINEAR)
    hm8 = np.clip(np.round(hm * 255.0), 0, 255).astype(np.uint8)
    # the colour map as a 256-entry table: cv2.applyColorMap's own colours, 40x faster than
    # calling it on the image (0.3 vs 11 ms at 640 x 480; the ROS overlay is built per frame)
    color = cv2.LUT(cv2.merge([hm8, hm8, hm8]), _colormap_rgb(int(colormap)))
    a = float(alpha)
    return cv2.addWeighted(np.ascontiguousarray(rgb), 1.0 - a, color, a, 0.0)


@functools.lru_cache(maxsize=None)
def _colormap_rgb(colormap: int) -> np.ndarray:
    """(1, 256, 3) uint8 RGB colours of the OpenCV colour map ``colormap`` (a cv2.LUT table)."""
    ramp = np.arange(256, dtype=np.uint8)[None, :]
    return np.ascontiguousarray(cv2.applyColorMap(ramp, colormap)[:, :, ::-1])


def _title_bar(img: np.ndarray, text: str, height: int = 24) -> np.ndarray:
    """Return ``img`` with a white bar holding ``text`` on top."""
    bar = np.full((height, img.shape[1], 3), 255, np.uint8)
    scale = 0.45
    (tw, _), _ = cv2.getTextSize(text, _FONT, scale, 1)
    if tw > img.shape[1] - 6 and tw > 0:  # shrink long labels to fit
        scale *= max(0.2, (img.shape[1] - 6) / tw)
    cv2.putText(bar, text, (3, height - 8), _FONT, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([bar, img], axis=0)


def save_image(path: str | Path, rgb: Any) -> Path:
    """Write an (H, W, 3) uint8 RGB image (format from the suffix); parent folders are created."""
    rgb = _check_rgb(rgb)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise ValueError(f'could not write {path}: unsupported suffix or unwritable folder')
    return path


def save_overlay(path: str | Path, rgb: Any, heatmap: Any, title: str | None = None,
                 alpha: float = 0.5) -> Path:
    """:func:`overlay` written to ``path`` (png/jpg), with an optional title bar on top."""
    img = overlay(rgb, heatmap, alpha=alpha)
    if title:
        img = _title_bar(img, title)
    return save_image(path, img)


def side_by_side(images: Sequence[Any], labels: Sequence[str] | None = None,
                 pad: int = 4) -> np.ndarray:
    """Concatenate images horizontally (resized to the first image's height) with labels on top.

    Args:
        images: (H, W, 3) uint8 RGB images or (H, W) uint8 grey images.
        labels: one label per image, or None for no title bars.
        pad: white pixels between images.

    Returns:
        (H [+ 24], sum W + pad * (n - 1), 3) uint8 RGB image.
    """
    if len(images) == 0:
        raise ValueError('side_by_side needs at least one image')
    if labels is not None and len(labels) != len(images):
        raise ValueError(f'got {len(labels)} labels for {len(images)} images')
    tiles = []
    for i, im in enumerate(images):
        arr = np.asarray(im)
        if arr.ndim == 2 and arr.dtype == np.uint8:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        arr = _check_rgb(arr, f'images[{i}]')
        tiles.append(arr)
    h = tiles[0].shape[0]
    out = []
    for i, t in enumerate(tiles):
        if t.shape[0] != h:
            w = max(1, round(t.shape[1] * h / t.shape[0]))
            t = cv2.resize(t, (w, h), interpolation=cv2.INTER_AREA)
        if labels is not None:
            t = _title_bar(t, str(labels[i]))
        if i:
            out.append(np.full((t.shape[0], pad, 3), 255, np.uint8))
        out.append(t)
    return np.concatenate(out, axis=1)


def _nice(v: float) -> str:
    return f'{v:.3g}' if abs(v) < 1e4 else f'{v:.2e}'


def _draw_panel(name: str, xs: list[float], ys: list[float], w: int, h: int) -> np.ndarray:
    """One line chart (white background, axes, min/max labels) as an (h, w, 3) RGB image."""
    img = np.full((h, w, 3), 255, np.uint8)
    left, right, top, bottom = 60, 12, 26, 30
    cv2.putText(img, name, (left, 18), _FONT, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    if y1 == y0:
        y0, y1 = y0 - 0.5 * (abs(y0) or 1.0), y1 + 0.5 * (abs(y1) or 1.0)
    pw, ph = w - left - right, h - top - bottom
    cv2.rectangle(img, (left, top), (left + pw, top + ph), (0, 0, 0), 1)
    for frac in (0.25, 0.5, 0.75):  # light grid
        yy = top + round(ph * frac)
        cv2.line(img, (left + 1, yy), (left + pw - 1, yy), (225, 225, 225), 1)
    cv2.putText(img, _nice(y1), (2, top + 10), _FONT, 0.35, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, _nice(y0), (2, top + ph), _FONT, 0.35, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, _nice(x0), (left, h - 12), _FONT, 0.35, (0, 0, 0), 1, cv2.LINE_AA)
    label = f'{_nice(x1)} (epoch)'
    (tw, _), _ = cv2.getTextSize(label, _FONT, 0.35, 1)
    cv2.putText(img, label, (left + pw - tw, h - 12), _FONT, 0.35, (0, 0, 0), 1, cv2.LINE_AA)
    pts = np.array([[left + (x - x0) / (x1 - x0) * pw, top + (y1 - y) / (y1 - y0) * ph]
                    for x, y in zip(xs, ys)])
    pts = np.round(pts).astype(np.int32)
    if len(pts) > 1:
        cv2.polylines(img, [pts.reshape(-1, 1, 2)], False, (31, 119, 180), 2, cv2.LINE_AA)
    for p in pts:
        cv2.circle(img, (int(p[0]), int(p[1])), 3, (214, 39, 40), -1, cv2.LINE_AA)
    return img


def save_training_curves(history: Sequence[Mapping[str, Any]], path: str | Path,
                         panel_size: tuple[int, int] = (360, 220), columns: int = 3) -> Path:
    """Draw one line chart per numeric key of ``history`` (x = ``'epoch'``) and save it.

    Args:
        history: one dict per epoch, e.g. ``{'epoch': 1, 'loss': 0.9, 'KLD': 1.4}``. Entries may
            miss keys (e.g. metrics evaluated every other epoch); missing or non-finite values
            are skipped. Without an ``'epoch'`` key the position (1, 2, ...) is used.
        path: destination image (png).
        panel_size: (width, height) of each panel in pixels.
        columns: panels per row.

    Returns:
        the written path.
    """
    if not isinstance(history, Sequence) or len(history) == 0:
        raise ValueError('history must be a non-empty list of per-epoch dicts')
    if not all(isinstance(e, Mapping) for e in history):
        raise ValueError('every history entry must be a dict such as {"epoch": 1, "loss": 0.5}')
    names: list[str] = []
    for entry in history:
        for k, v in entry.items():
            if k != 'epoch' and k not in names and isinstance(v, (int, float, np.number)) \
                    and not isinstance(v, bool):
                names.append(k)
    panels = []
    for name in names:
        xs, ys = [], []
        for i, entry in enumerate(history):
            v = entry.get(name)
            if isinstance(v, (int, float, np.number)) and math.isfinite(float(v)):
                xs.append(float(entry.get('epoch', i + 1)))
                ys.append(float(v))
        if xs:
            panels.append(_draw_panel(str(name), xs, ys, *panel_size))
    if not panels:
        raise ValueError('history has no finite numeric values to plot (besides "epoch")')
    columns = max(1, min(columns, len(panels)))
    rows = math.ceil(len(panels) / columns)
    pw, ph = panel_size
    canvas = np.full((rows * ph, columns * pw, 3), 255, np.uint8)
    for i, p in enumerate(panels):
        r, c = divmod(i, columns)
        canvas[r * ph:(r + 1) * ph, c * pw:(c + 1) * pw] = p
    return save_image(path, canvas)
