"""Background suppression of affordance heatmaps with a class-agnostic object map (C2AM).

Any method's heatmaps can be multiplied by (``mode='multiply'``, continuous, as SelectiveCL's
test-time CLIP map) or masked with (``mode='mask'``, binary at ``threshold``) an object map, so
affordance heat on the background (people, table, clutter) is removed while heat on the object
stays. :class:`ObjectPrior` runs a C2AM checkpoint (``models.c2am``) with torch on the same
preprocessed image batch the pipeline feeds its backend; ``GroundingPipeline`` uses both when
``PipelineConfig.object_prior`` is set (off by default).

:func:`suppress_background` is pure numpy + cv2 (no torch); ``ObjectPrior`` imports torch when
built.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np

logger = logging.getLogger(__name__)

__all__ = ['SUPPRESS_MODES', 'suppress_background', 'ObjectPrior']

SUPPRESS_MODES: tuple[str, ...] = ('multiply', 'mask')
_FLAT = 1e-12


def _array(x: Any, name: str) -> np.ndarray:
    if hasattr(x, 'detach'):
        x = x.detach().cpu().float().numpy()
    a = np.asarray(x)
    if not np.issubdtype(a.dtype, np.number) or a.size == 0:
        raise ValueError(f'{name} must be a non-empty numeric array, got dtype {a.dtype}, '
                         f'shape {a.shape}')
    a = a.astype(np.float32)
    if not np.all(np.isfinite(a)):
        raise ValueError(f'{name} contains nan or inf')
    return a


def _minmax_maps(x: np.ndarray) -> np.ndarray:
    """Per-map min-max over the last two axes to [0, 1]; a constant map becomes zeros."""
    lo = x.min(axis=(-2, -1), keepdims=True)
    rng = x.max(axis=(-2, -1), keepdims=True) - lo
    return np.where(rng > _FLAT, (x - lo) / np.where(rng > _FLAT, rng, 1.0), 0.0).astype(
        np.float32)


def suppress_background(heatmaps: Any, object_map: Any, mode: str = 'multiply',
                        threshold: float = 0.5) -> np.ndarray:
    """Suppress the heat outside the object.

    1. Every heatmap is min-max normalised to [0, 1] (raw CAMs may be negative; a heatmap
       already in [0, 1] with min 0 and max 1 is unchanged).
    2. The object map is resized bilinearly (``cv2.resize``, half-pixel centres) to the heatmap
       size and min-max renormalised to [0, 1]. A constant object map carries no information and
       suppresses nothing.
    3. ``'multiply'``: heat * object; ``'mask'``: heat * [object >= threshold].
    4. Every result is min-max renormalised to [0, 1] (all zeros if nothing is left).

    Args:
        heatmaps: (C, H, W) or (H, W) maps (numpy or torch).
        object_map: (h, w) class-agnostic object map (any range; e.g. ``C2AM.object_map``).
        mode: ``'multiply'`` or ``'mask'``.
        threshold: cut of ``'mask'`` on the renormalised object map, in [0, 1].

    Returns:
        float32 array with the shape of ``heatmaps``, values in [0, 1].

    Raises:
        ValueError: bad shapes, non-finite values, unknown mode or a threshold outside [0, 1].
    """
    if mode not in SUPPRESS_MODES:
        raise ValueError(f"unknown mode '{mode}'; expected one of {', '.join(SUPPRESS_MODES)}")
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f'threshold must lie in [0, 1], got {threshold!r}')
    heat = _array(heatmaps, 'heatmaps')
    if heat.ndim not in (2, 3):
        raise ValueError(f'heatmaps must have shape (C, H, W) or (H, W), got {heat.shape}')
    obj = _array(object_map, 'object_map')
    if obj.ndim == 3 and obj.shape[0] == 1:
        obj = obj[0]
    if obj.ndim != 2:
        raise ValueError(f'object_map must have shape (h, w), got {obj.shape}')
    h, w = heat.shape[-2:]
    if obj.shape != (h, w):
        obj = cv2.resize(obj, (w, h), interpolation=cv2.INTER_LINEAR)
    if float(obj.max() - obj.min()) <= _FLAT:
        logger.debug('constant object map: no background suppression')
        weight = np.ones((h, w), np.float32)
    else:
        weight = _minmax_maps(obj)
        if mode == 'mask':
            weight = (weight >= float(threshold)).astype(np.float32)
    return _minmax_maps(_minmax_maps(heat) * weight)


class ObjectPrior:
    """A C2AM model run on preprocessed image batches: ``prior(images) -> object maps``.

    Args:
        model: a model with ``object_map(images) -> (B, h, w)`` (``models.c2am``).
        device: torch device string (None / 'auto': CUDA when available, else CPU).
    """

    def __init__(self, model: Any, device: str | None = None) -> None:
        import torch

        if not callable(getattr(model, 'object_map', None)):
            raise ValueError(f'{type(model).__name__} has no object_map(images) method; the '
                             'object prior must be a C2AM model (c2am_* in the registry)')
        if device in (None, '', 'auto'):
            device = 'cuda' if torch.cuda.is_available() else 'cpu'
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | None = None) -> ObjectPrior:
        """Load a C2AM checkpoint written by ``affordance-train`` / ``affordance-c2am train``.

        Raises:
            FileNotFoundError: no such file.
            ValueError: the checkpoint holds a model without ``object_map``.
        """
        import affordance_core.models.c2am  # noqa: F401  (registers the c2am_* models)
        from affordance_core.checkpoint import load_checkpoint

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f'object prior checkpoint not found: {path}')
        return cls(load_checkpoint(path), device)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Object maps of a batch.

        Args:
            images: (B, 3, S, S) float32 ImageNet-normalised images (the backend's input).

        Returns:
            (B, h, w) float32 object maps in [0, 1].
        """
        import torch

        batch = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        with torch.no_grad():
            maps = self.model.object_map(batch.to(self.device))
        return maps.float().cpu().numpy()
