"""LOCATE's prototype (part-level) guidance loss L_cos, reference name ``loss_proto`` (§3.3).

The ego CAM of the GT class, min-max normalised and kept differentiable, weights the frozen raw
ego keys into an embedding e = sum_p M(p) F(p) / sum_p M(p); each sample with a prototype c*
contributes max(0, 1 - cos(e, c*) - margin). The loss is the mean over those samples and a zero
(that keeps the graph) when no sample has a prototype.

The margin comes from ``outputs['cel_margin']`` (the model's ``cel_margin`` kwarg) and defaults to
``DEFAULT_MARGIN`` = 0.5. Difference from the reference: the denominator sum_p M(p) is clamped at
1e-12 (a constant CAM gives a zero map; the reference would produce NaN).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from affordance_core.losses import register_loss

DEFAULT_MARGIN = 0.5


def _minmax(maps: Tensor, eps: float) -> Tensor:
    """(x - min) / (max - min + eps) over the last two dims of (..., h, w) maps."""
    flat = maps.flatten(-2)
    lo = flat.amin(-1, keepdim=True).unsqueeze(-1)
    hi = flat.amax(-1, keepdim=True).unsqueeze(-1)
    return (maps - lo) / (hi - lo + eps)


@register_loss('prototype')
def prototype(outputs: dict, batch: dict) -> Tensor:
    """Hinge on the cosine between the CAM-weighted ego embedding and the part prototype.

    Args:
        outputs: 'ego_cam' (B, C, h, w) raw ego CAMs, 'ego_keys' (B, D, h, w) frozen keys,
            'part_proto' (B, D), 'part_valid' (B,) bool, optional 'cel_margin' (scalar).
        batch: 'label' (B,) int64.

    Returns:
        Scalar loss.
    """
    cam = outputs['ego_cam']
    keys = outputs['ego_keys'].detach()
    proto = outputs['part_proto'].detach()
    valid = outputs['part_valid'].to(device=cam.device, dtype=torch.bool)
    margin = float(outputs.get('cel_margin', DEFAULT_MARGIN))
    if not bool(valid.any()):
        return cam.sum() * 0.0
    labels = batch['label'].to(cam.device).long()
    if labels.shape != (cam.shape[0],):
        raise ValueError(f"batch['label'] must have shape ({cam.shape[0]},), "
                         f'got {tuple(labels.shape)}')
    gt_cam = cam[torch.arange(cam.shape[0], device=cam.device), labels]  # (B, h, w)
    mask = _minmax(gt_cam[valid], eps=1e-15)  # (V, h, w), differentiable
    feat = keys[valid].to(mask.dtype).flatten(2)  # (V, D, hw)
    weights = mask.flatten(1)  # (V, hw)
    emb = (feat * weights.unsqueeze(1)).sum(-1) / weights.sum(-1, keepdim=True).clamp_min(1e-12)
    cos = F.cosine_similarity(emb, proto[valid].to(emb.dtype), dim=-1)
    return (1.0 - cos - margin).clamp_min(0.0).mean()
