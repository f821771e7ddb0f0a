"""Loss terms, one per file, registered by name in ``LOSSES``.

Each loss is ``fn(outputs, batch) -> scalar Tensor``, unweighted: ``outputs`` is the model's
training-forward dict, ``batch`` the data batch (``batch['label']`` is (B,) int64). The trainer
applies the recipe weights and start epochs (e.g. LOCATE: cross_entropy 1.0, prototype 1.0 from
the 2nd epoch, concentration 0.07).
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor

LossFn = Callable[[dict, dict], Tensor]

LOSSES: dict[str, LossFn] = {}


def register_loss(name: str) -> Callable[[LossFn], LossFn]:
    """Decorator registering ``fn`` in ``LOSSES`` under ``name``; a second use of a name fails."""
    def deco(fn: LossFn) -> LossFn:
        if name in LOSSES:
            raise ValueError(f"loss '{name}' is registered twice ({fn.__module__})")
        LOSSES[name] = fn
        return fn
    return deco


# Imported after LOSSES exists: the modules register themselves.
from affordance_core.losses import (  # noqa: E402,F401
    affinity_corr, c2am_contrast, class_relation, clip_alignment, concentration, cross_entropy,
    denoise_distill, feature_distill, modularity, pixel_contrast, pixel_dice, pixel_mse, prototype,
    selective_prototype)

__all__ = ['LOSSES', 'LossFn', 'register_loss']
