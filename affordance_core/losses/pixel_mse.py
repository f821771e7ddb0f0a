"""LoopTrans' pixel regression term (methods.md §5.2, first half of L_pixel; recipe weight 10).

MSE between the min-max-normalised pixel-decoder map of the GT class P~_y and the binary pseudo
mask M^ego, both (B, h, w): the mean over all pixels of all samples (the reference averages the
per-sample means over the batch, which is the same for equal-sized maps).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from affordance_core.losses import register_loss


@register_loss('pixel_mse')
def pixel_mse(outputs: dict, batch: dict) -> Tensor:
    """Args: outputs 'pixel_map' (B, h, w) (differentiable), 'pseudo_mask' (B, h, w)."""
    pred, target = outputs['pixel_map'], outputs['pseudo_mask'].detach()
    if pred.shape != target.shape:
        raise ValueError(f"pixel_map {tuple(pred.shape)} and pseudo_mask {tuple(target.shape)} "
                         'must have the same shape')
    return F.mse_loss(pred, target.to(pred.dtype))
