"""SelectiveCL's prototypical contrast L_proto, reference ``ContrastiveLoss`` (methods.md §6.3).

Prototypes are spatial means of the prototype-space features Z (``K_contrast_projection``)
weighted by a map, L2-normalised:

* anchor a_i = n(mean_p Z_ego,i(p) w_i(p)), w = A_ego for a reliable part, 1 otherwise;
* positive prototypes p+ = n(mean_p Z R) of the ego view (B) and of every exo image (B*N);
* background prototypes p- = n(mean_p Z bg) of the same views (bg = 1 - R, or 1 - R relu(CAM_y)
  from the second epoch on).

For anchor i (SupCon form, temperature tau, base temperature tau_base = 0.07):

    positives P(i)   = {ego p+_j : y_j = y_i, j != i} U {exo p+_m : y_m = y_i}
    denominator A(i) = {ego p+_j : j != i} U {exo p+_m} U {ego p-_j, exo p-_m of class y_i}
    l_i = -(tau / tau_base) * mean_{q in P(i)} [ s_iq - log sum_{r in A(i)} exp(s_ir) ],
    s_iq = a_i . q / tau,

i.e. backgrounds of other classes are left out of the denominator. L_proto is the mean of l_i
over the anchors with at least one positive (always all of them: every sample has its own exo
images). With tau = 0.5 (``--cont_temperature``) the factor tau / tau_base is 0.5 / 0.07 ~ 7.14.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from affordance_core.losses import register_loss

DEFAULT_TEMPERATURE = 0.5   # --cont_temperature of the reference
BASE_TEMPERATURE = 0.07     # base_temperature of the reference ContrastiveLoss


def _proto(feats: Tensor, weights: Tensor) -> Tensor:
    """n(mean over (h, w) of feats (..., D, h, w) * weights (..., h, w)) -> (..., D)."""
    return F.normalize((feats * weights.unsqueeze(-3)).mean((-2, -1)), dim=-1)


@register_loss('selective_prototype')
def selective_prototype(outputs: dict, batch: dict) -> Tensor:
    """Prototypical contrast between the ego anchor and ego / exo part and background prototypes.

    Args:
        outputs: 'contrast_ego' (B, D, h, w), 'contrast_exo' (B, N, D, h, w),
            'part_map_ego' (B, h, w), 'part_map_exo' (B, N, h, w), 'bg_map_ego' (B, h, w),
            'bg_map_exo' (B, N, h, w), 'anchor_map' (B, h, w), optional
            'contrast_temperature' (scalar, default 0.5).
        batch: 'label' (B,) int64.

    Returns:
        Scalar loss.
    """
    z_ego = outputs['contrast_ego']
    z_exo = outputs['contrast_exo']
    b, n = z_exo.shape[:2]
    labels = batch['label'].to(z_ego.device).long()
    if labels.shape != (b,):
        raise ValueError(f"batch['label'] must have shape ({b},), got {tuple(labels.shape)}")
    tau = float(outputs.get('contrast_temperature', DEFAULT_TEMPERATURE))
    anchor = _proto(z_ego, outputs['anchor_map'])                         # (B, D)
    bank = torch.cat([
        _proto(z_ego, outputs['part_map_ego']),                           # ego positives  (B)
        _proto(z_ego, outputs['bg_map_ego']),                             # ego background (B)
        _proto(z_exo, outputs['part_map_exo']).flatten(0, 1),             # exo positives  (BN)
        _proto(z_exo, outputs['bg_map_exo']).flatten(0, 1),               # exo background (BN)
    ])
    logits = anchor @ bank.T / tau                                        # (B, 2B + 2BN)
    same = labels[:, None] == labels[None, :]                             # (B, B)
    same_x = labels[:, None] == labels.repeat_interleave(n)[None, :]      # (B, BN)
    eye = torch.eye(b, dtype=torch.bool, device=labels.device)
    pos = torch.cat([same & ~eye, torch.zeros_like(same), same_x, torch.zeros_like(same_x)], 1)
    den = torch.cat([~eye, same, torch.ones_like(same_x), same_x], 1)
    log_prob = logits - torch.logsumexp(logits.masked_fill(~den, float('-inf')), 1, keepdim=True)
    num_pos = pos.sum(1)
    has = num_pos > 0
    if not bool(has.any()):
        return logits.sum() * 0.0
    mean_pos = (log_prob * pos).sum(1)[has] / num_pos[has]
    return -(tau / BASE_TEMPERATURE) * mean_pos.mean()
