"""ACSeg-style modularity objective for training LoopTrans' part clusterer without labels.

ACSeg (Li et al., CVPR 2023, arXiv 2210.05944) trains its concept tokens by maximising the
modularity of the soft partition they induce on the graph of an image's patches. With patch
descriptors x_i, centred per image (DINO keys share a large common component: uncentred, every
pair has a cosine near 1 and the graph has no structure to find), the affinity
A_ij = relu(cos(x_i - x_mean, x_j - x_mean)) (i != j, the diagonal zeroed), degrees
k_i = sum_j A_ij, 2m = sum_ij A_ij, and the soft assignment S = softmax((cos(x_i, t_k)) / tau) of
every patch to the K tokens,

    Q = 1/(2m) * sum_ij (A_ij - k_i k_j / (2m)) (S S^T)_ij
      = 1/(2m) * ( tr(S^T A S) - ||S^T k||^2 / (2m) ),

and the loss is -Q averaged over the images. Q is in [-1/2, 1]; a partition into parts that are
internally similar and mutually dissimilar scores high. Not part of any affordance recipe: used
by ``affordance-train-clusterer``. Registered as ``modularity`` with outputs
'part_similarity' (B, N, K) = the clusterer output (cos + 1) and 'ego_keys' (B, D, h, w).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from affordance_core.losses import register_loss

DEFAULT_TAU = 0.05


def modularity(x: Tensor, similarity: Tensor, tau: float = DEFAULT_TAU,
               center: bool = True) -> Tensor:
    """Mean soft modularity Q of a batch (higher is better).

    Args:
        x: (B, N, D) patch descriptors (the graph; no gradient needed).
        similarity: (B, N, K) patch-token cosine similarity + 1 (the clusterer's output).
        tau: softmax temperature of the assignment.
        center: subtract each image's mean descriptor before the affinity.

    Returns:
        scalar Q.
    """
    if x.dim() != 3 or similarity.shape[:2] != x.shape[:2]:
        raise ValueError(f'modularity: x (B, N, D) and similarity (B, N, K) do not match: '
                         f'{tuple(x.shape)}, {tuple(similarity.shape)}')
    x = x.float()
    if center:
        x = x - x.mean(1, keepdim=True)
    xn = F.normalize(x, dim=-1)
    a = (xn @ xn.transpose(1, 2)).clamp_min(0)
    a = a * (1 - torch.eye(a.shape[-1], device=a.device, dtype=a.dtype))
    deg = a.sum(-1)                                     # (B, N)
    two_m = deg.sum(-1).clamp_min(1e-12)                # (B,)
    s = ((similarity.float() - 1.0) / tau).softmax(-1)  # (B, N, K)
    within = (s * (a @ s)).sum((-2, -1))                # tr(S^T A S)
    null = (s.transpose(1, 2) @ deg.unsqueeze(-1)).pow(2).sum((-2, -1)) / two_m
    return ((within - null) / two_m).mean()


@register_loss('modularity')
def modularity_loss(outputs: dict, batch: dict) -> Tensor:
    """-Q of the clusterer's soft partition (see the module docstring)."""
    keys = outputs['ego_keys'].detach()
    x = keys.flatten(2).transpose(1, 2)
    return -modularity(x, outputs['part_similarity'], float(outputs.get('tau', DEFAULT_TAU)))
