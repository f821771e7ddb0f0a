"""SelectiveCL's pixel contrast L_pix, reference ``PixelContrastiveLoss`` (methods.md §6.3).

On the ego view only. Pixel embeddings z_p (``pixel_contrast_projection``) are L2-normalised;
every pixel carries a binary foreground label (computed by the model without gradient: CLIP
foreground cos(ego, t_ego) > rho, or the fallback [minmax(A_ego) > gamma2]). Per image, for an
anchor pixel p (SupCon over the h*w pixels of the image, temperature tau, tau_base = 0.07):

    l_p = -(tau / tau_base) * mean_{q != p, label_q = label_p} [ s_pq - log sum_{r != p}
          exp(s_pr) ],   s_pq = z_p . z_q / tau.

Anchors are the pixels with at least one positive that lie on the binarised A_ego
(``pixel_anchor``, the reference's ``weight_map > 0.5``). The image loss is the mean over its
anchors; L_pix is the sum of the image losses divided by B. With tau = 0.5 the factor
tau / tau_base is ~ 7.14.

Difference from the reference: an image without any anchor contributes 0 (the reference's mean
over an empty set would be NaN).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from affordance_core.losses import register_loss

DEFAULT_TEMPERATURE = 0.5   # --cont_temperature of the reference
BASE_TEMPERATURE = 0.07     # base_temperature of the reference PixelContrastiveLoss


@register_loss('pixel_contrast')
def pixel_contrast(outputs: dict, batch: dict) -> Tensor:
    """Supervised contrast between the ego pixels of each image (fg vs bg).

    Args:
        outputs: 'pixel_embed' (B, D, h, w), 'pixel_fg' (B, h, w) bool labels, 'pixel_anchor'
            (B, h, w) bool, optional 'contrast_temperature' (scalar, default 0.5).
        batch: unused (the labels are per pixel).

    Returns:
        Scalar loss.
    """
    emb = outputs['pixel_embed']
    b = emb.shape[0]
    z = F.normalize(emb.flatten(2), dim=1).transpose(1, 2)                # (B, P, D)
    fg = outputs['pixel_fg'].to(emb.device).reshape(b, -1).bool()         # (B, P)
    anchor = outputs['pixel_anchor'].to(emb.device).reshape(b, -1).bool()
    if fg.shape != z.shape[:2] or anchor.shape != z.shape[:2]:
        raise ValueError(f'pixel_fg / pixel_anchor must have one entry per pixel '
                         f'{tuple(z.shape[:2])}, got {tuple(fg.shape)}, {tuple(anchor.shape)}')
    tau = float(outputs.get('contrast_temperature', DEFAULT_TEMPERATURE))
    logits = z @ z.transpose(1, 2) / tau                                  # (B, P, P)
    eye = torch.eye(z.shape[1], dtype=torch.bool, device=emb.device)
    log_prob = logits - torch.logsumexp(logits.masked_fill(eye, float('-inf')), -1,
                                        keepdim=True)
    pos = (fg.unsqueeze(2) == fg.unsqueeze(1)) & ~eye                     # (B, P, P)
    num_pos = pos.sum(-1)
    mean_pos = (log_prob * pos).sum(-1) / num_pos.clamp_min(1)           # (B, P)
    use = anchor & (num_pos > 0)
    per_image = (mean_pos * use).sum(-1) / use.sum(-1).clamp_min(1)
    return -(tau / BASE_TEMPERATURE) * per_image.sum() / b
