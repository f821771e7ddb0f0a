"""WSMA's image-text alignment loss L_clip (methods.md §4.2).

logits_c = exp(logit_scale) * cos(image_embed, text_embed_c) over the C class prompts and
L_clip = CE(logits, y), averaged over the batch. ``image_embed`` is the AttentionPool output of
the ego features, ``text_embed`` the text features of every class prompt; ``logit_scale`` is
CLIP's raw (log) temperature parameter, used without clamping as in the reference.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from affordance_core.losses import register_loss


@register_loss('clip_alignment')
def clip_alignment(outputs: dict, batch: dict) -> Tensor:
    """Cross-entropy of the scaled image-text cosine similarities.

    Args:
        outputs: 'image_embed' (B, E), 'text_embed' (C, E) (both unnormalised),
            'logit_scale' () log scale.
        batch: 'label' (B,) int64.

    Returns:
        Scalar loss.
    """
    image, text = outputs['image_embed'], outputs['text_embed']
    if image.dim() != 2 or text.dim() != 2 or image.shape[1] != text.shape[1]:
        raise ValueError(f"outputs['image_embed'] (B, E) and ['text_embed'] (C, E) do not "
                         f'match: {tuple(image.shape)}, {tuple(text.shape)}')
    labels = batch['label'].to(device=image.device).long()
    if labels.shape != (image.shape[0],):
        raise ValueError(f"batch['label'] must have shape ({image.shape[0]},), "
                         f'got {tuple(labels.shape)}')
    scale = outputs['logit_scale'].exp()
    logits = scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t()
    return F.cross_entropy(logits, labels)
