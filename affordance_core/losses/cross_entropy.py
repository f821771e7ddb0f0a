"""Classification loss of the LOCATE family (methods.md §3.3, L_cls).

L_cls = CE(ego_logits, y) + (1/N) * sum_n CE(exo_logits[:, n], y), each CE averaged over the batch.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from affordance_core.losses import register_loss


@register_loss('cross_entropy')
def cross_entropy(outputs: dict, batch: dict) -> Tensor:
    """Ego CE plus the mean exo CE.

    Args:
        outputs: 'ego_logits' (B, C) and optionally 'exo_logits' (B, N, C).
        batch: 'label' (B,) int64.

    Returns:
        Scalar loss.
    """
    logits = outputs['ego_logits']
    labels = batch['label'].to(device=logits.device).long()
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"batch['label'] must have shape ({logits.shape[0]},), "
                         f'got {tuple(labels.shape)}')
    loss = F.cross_entropy(logits, labels)
    exo = outputs.get('exo_logits')
    if exo is not None:
        b, n, c = exo.shape
        # Mean over B*N equals (1/N) * sum_n mean_b: every exo slot has B rows.
        loss = loss + F.cross_entropy(exo.reshape(b * n, c), labels.repeat_interleave(n))
    return loss
