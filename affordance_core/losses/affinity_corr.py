"""LoopTrans' class-affinity consistency L_corr (methods.md §5.2; recipe weight 1.5).

K_ego = P P^T with P (C+M, h*w) all pixel-decoder maps of the ego image; K_exo = G G^T with G
(C+M, N*h*w) all exo maps of the N exo images concatenated along space. L = 1 - mean over the batch
and the C+M columns of cos(K_ego[:, :, j], K_exo[:, :, j]) (``F.cosine_similarity`` along dim 1,
as the reference).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from affordance_core.losses import register_loss


@register_loss('affinity_corr')
def affinity_corr(outputs: dict, batch: dict) -> Tensor:
    """Args: outputs 'ego_cam' (B, K, h, w) pixel-decoder maps, 'exo_cam' (B, N, K, h', w')."""
    ego, exo = outputs['ego_cam'], outputs['exo_cam']
    if exo.dim() != 5 or ego.dim() != 4 or exo.shape[2] != ego.shape[1]:
        raise ValueError(f'ego_cam (B, K, h, w) and exo_cam (B, N, K, h, w) do not match: '
                         f'{tuple(ego.shape)}, {tuple(exo.shape)}')
    p = ego.flatten(2)                                # (B, K, hw)
    g = exo.transpose(1, 2).flatten(2)               # (B, K, N*hw)
    k_ego = p @ p.transpose(1, 2)
    k_exo = g @ g.transpose(1, 2)
    return 1 - F.cosine_similarity(k_ego, k_exo, dim=1).mean()
