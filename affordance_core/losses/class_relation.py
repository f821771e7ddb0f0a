"""WSMA's class-relation loss L_rela, the "local" variant (methods.md §4.2), 0.5 factor inside.

For each view, Q (C x hw) holds the class maps (row c = channel mean of w_c * X; the exo view
uses the mean of its N branch outputs), K = Q Q^T (C x C) with L2-normalised rows, flattened;
L_rela = 0.5 * (1 - mean_b cos(vec K_exo, vec K_ego)). Recipe weight 1.0.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from affordance_core.losses import register_loss

FACTOR = 0.5


def relation_matrix(cam: Tensor) -> Tensor:
    """(B, C, h, w) class maps -> (B, C*C) flattened row-normalised affinity Q Q^T."""
    q = cam.flatten(2)
    k = q @ q.transpose(1, 2)
    return F.normalize(k, dim=2).flatten(1)


@register_loss('class_relation')
def class_relation(outputs: dict, batch: dict) -> Tensor:
    """One minus the cosine between the exo and ego class-affinity matrices, halved.

    Args:
        outputs: 'ego_cam' (B, C, h, w) and 'exo_cam' (B, C, h, w) class maps.
        batch: unused.

    Returns:
        Scalar loss.
    """
    ego, exo = outputs['ego_cam'], outputs['exo_cam']
    if ego.dim() != 4 or exo.dim() != 4 or ego.shape[:2] != exo.shape[:2]:
        raise ValueError(f"outputs['ego_cam'] and ['exo_cam'] must be (B, C, h, w) maps of the "
                         f'same B and C, got {tuple(ego.shape)}, {tuple(exo.shape)}')
    cos = F.cosine_similarity(relation_matrix(exo), relation_matrix(ego), dim=1)
    return FACTOR * (1.0 - cos.mean())
