"""WSMA's exo -> ego feature distillation L_d (methods.md §4.2), with its 0.5 factor inside.

With w_y the classifier weight of the GT class, X_ego the ego branch output and X_exo the mean of
the N exo branch outputs: e_v = normalize(GAP(w_y * X_v)) and
L_d = 0.5 * mean_b ||e_exo - e_ego||^2. GAP(w_y * X) = w_y * GAP(X), so the model hands over the
pooled features. Recipe weight 1.0 (the appendix's 0.5 is already here).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from affordance_core.losses import register_loss

FACTOR = 0.5


@register_loss('feature_distill')
def feature_distill(outputs: dict, batch: dict) -> Tensor:
    """Squared distance of the class-weighted, normalised exo and ego pooled features.

    Args:
        outputs: 'ego_gap' (B, D) and 'exo_gap' (B, D) pooled branch features (exo: mean over
            the N views), 'cls_weight' (C, D) classifier weight.
        batch: 'label' (B,) int64.

    Returns:
        Scalar loss.
    """
    ego, exo, weight = outputs['ego_gap'], outputs['exo_gap'], outputs['cls_weight']
    if ego.dim() != 2 or exo.shape != ego.shape or weight.dim() != 2 \
            or weight.shape[1] != ego.shape[1]:
        raise ValueError(f"outputs['ego_gap'] / ['exo_gap'] (B, D) and ['cls_weight'] (C, D) do "
                         f'not match: {tuple(ego.shape)}, {tuple(exo.shape)}, '
                         f'{tuple(weight.shape)}')
    labels = batch['label'].to(device=ego.device).long()
    if labels.shape != (ego.shape[0],):
        raise ValueError(f"batch['label'] must have shape ({ego.shape[0]},), "
                         f'got {tuple(labels.shape)}')
    w = weight[labels]
    e_exo = F.normalize(w * exo, dim=1)
    e_ego = F.normalize(w * ego, dim=1)
    return FACTOR * (e_exo - e_ego).pow(2).sum(dim=1).mean()
