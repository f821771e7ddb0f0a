"""LoopTrans' ego -> exo denoising distillation L_dill, reference ``loss_noise`` (methods.md §5.2;
recipe weight 0.05).

Per sample, with the raw CAMs and the raw frozen keys:
    query f_exo   = normalize(mean_n spatial-mean(G^exo_n,y * F^exo_n))
    positive f_px = normalize(spatial-mean(P_y * F^ego))
    negatives f_m = normalize(mean_n spatial-mean(G^exo_n,C+m * F^exo_n)),  m = 1..M
    L = -log(exp(s+) / (exp(s+) + sum_m exp(s_m))),  s = <f, f_exo>, temperature 1 (the code).
Averaged over the batch. Gradients reach the exo CAM (query, negatives) and the pixel decoder
(positive); the keys are frozen.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from affordance_core.losses import register_loss


@register_loss('denoise_distill')
def denoise_distill(outputs: dict, batch: dict) -> Tensor:
    """Args: outputs 'ego_cam' (B, C+M, h, w) pixel-decoder maps, 'exo_cam' (B, N, C+M, h, w),
    'ego_keys' (B, D, h, w), 'exo_keys' (B, N, D, h, w), 'num_noise' () M; batch 'label'."""
    ego_cam, exo_cam = outputs['ego_cam'], outputs['exo_cam']
    ego_keys, exo_keys = outputs['ego_keys'].detach(), outputs['exo_keys'].detach()
    m = int(outputs['num_noise'])
    b, n, k = exo_cam.shape[:3]
    c = k - m
    labels = batch['label'].to(ego_cam.device).long()
    if labels.shape != (b,) or m < 1 or c < 1:
        raise ValueError(f'denoise_distill: labels {tuple(labels.shape)} for batch {b}, '
                         f'{m} noise classes of {k} outputs')
    idx = torch.arange(b, device=labels.device)
    hw = exo_cam.shape[-2] * exo_cam.shape[-1]
    exo_f = exo_keys.flatten(3)                                       # (B, N, D, hw)
    # spatial mean of (map * keys) = (map . keys) / hw, for every exo image and class
    exo_cls = exo_cam.flatten(3) @ exo_f.transpose(2, 3) / hw         # (B, N, K, D)
    exo_cls = exo_cls.mean(1)                                          # mean over exo images
    query = F.normalize(exo_cls[idx, labels], dim=-1)                 # (B, D)
    negatives = exo_cls[:, c:]                                         # (B, M, D)
    pos = (ego_cam[idx, labels].flatten(1).unsqueeze(1)
           * ego_keys.flatten(2)).mean(-1)                             # (B, D)
    keys = F.normalize(torch.cat([pos.unsqueeze(1), negatives], 1), dim=-1)  # (B, 1+M, D)
    sim = (keys @ query.unsqueeze(-1)).squeeze(-1)                     # (B, 1+M)
    return -(sim.log_softmax(-1)[:, 0]).mean()
