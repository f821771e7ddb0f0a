"""LoopTrans' Dice term (methods.md §5.2, second half of L_pixel; recipe weight 2).

Per sample: Dice = 1 - (2 sum(P M) + 1) / (sum(P) + sum(M) + 1) with P the min-max pixel-decoder
map of the GT class and M the pseudo mask (smooth 1, as the reference ``DiceLoss``); averaged over
the batch.
"""
from __future__ import annotations

from torch import Tensor

from affordance_core.losses import register_loss

SMOOTH = 1.0


@register_loss('pixel_dice')
def pixel_dice(outputs: dict, batch: dict) -> Tensor:
    """Args: outputs 'pixel_map' (B, h, w) (differentiable), 'pseudo_mask' (B, h, w)."""
    pred, target = outputs['pixel_map'], outputs['pseudo_mask'].detach().to(
        outputs['pixel_map'].dtype)
    if pred.shape != target.shape:
        raise ValueError(f"pixel_map {tuple(pred.shape)} and pseudo_mask {tuple(target.shape)} "
                         'must have the same shape')
    p, m = pred.flatten(1), target.flatten(1)
    dice = (2 * (p * m).sum(1) + SMOOTH) / (p.sum(1) + m.sum(1) + SMOOTH)
    return (1 - dice).mean()
