"""C2AM's contrastive losses (``methods.md`` §7.2; reference ``WSOL/models/loss.py``).

The C2AM disentangler splits every image of the batch into a foreground embedding v_f and a
background embedding v_b (``outputs['fg_embed']`` / ``outputs['bg_embed']``, (M, C)). With S the
matrix of cosine similarities clamped to [0.0005, 0.9995]:

* ``c2am_sim_min`` (reference ``SimMinLoss``): separate foreground from background over all
  M x M pairs, ``mean_ij -log(1 - S(v_b^i, v_f^j))``.
* ``c2am_sim_max`` (reference ``SimMaxLoss``, applied to the background set AND to the
  foreground set, summed): rank-weighted attraction ``mean_ij w_ij * max(0, -log S_ij)`` with
  ``w_ij = exp(-alpha * (rank_ij - 1))``, rank_ij the 0-based descending rank of S_ij in row i
  (the diagonal, rank 0, weighs e^alpha but contributes -log(0.9995) ~ 5e-4).
  ``alpha`` comes from ``outputs['c2am_alpha']`` (the model's ``alpha`` kwarg: 0.05 with a
  supervised initialisation, 0.75 with MoCo / DetCo), default :data:`DEFAULT_ALPHA`.

The C2AM total is ``c2am_sim_max + c2am_sim_min`` (all weights 1, the reference's
``loss1 + loss2 + loss3``). Both losses ignore the labels (class-agnostic).

Ties in a row are ranked by a stable sort; tied entries share the same loss value, so the loss
does not depend on how ties are broken (the reference's unstable sort gives the same value).
Computation is in float32 whatever the input dtype (AMP).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from affordance_core.losses import register_loss

__all__ = ['DEFAULT_ALPHA', 'SIM_MIN', 'SIM_MAX', 'clamped_cosine', 'sim_min_loss',
           'sim_max_loss', 'c2am_sim_min', 'c2am_sim_max']

DEFAULT_ALPHA = 0.05
SIM_MIN, SIM_MAX = 0.0005, 0.9995


def _check_embeddings(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[0] == 0:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f'{name} must be a non-empty (M, C) embedding matrix, got {got}')
    return x.float()


def clamped_cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity of every row of ``a`` with every row of ``b``, clamped.

    Args:
        a: (M, C) embeddings.
        b: (K, C) embeddings.

    Returns:
        (M, K) similarities in [0.0005, 0.9995] (a zero row gives 0.0005).
    """
    sim = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T
    return sim.clamp(min=SIM_MIN, max=SIM_MAX)


def sim_min_loss(bg: Tensor, fg: Tensor) -> Tensor:
    """Foreground / background separation: mean over all pairs of -log(1 - cos(bg_i, fg_j)).

    Args:
        bg: (M, C) background embeddings.
        fg: (M, C) foreground embeddings.

    Returns:
        Scalar loss.
    """
    bg = _check_embeddings(bg, 'bg_embed')
    fg = _check_embeddings(fg, 'fg_embed')
    return -torch.log(1.0 - clamped_cosine(bg, fg)).mean()


def sim_max_loss(emb: Tensor, alpha: float | Tensor = DEFAULT_ALPHA) -> Tensor:
    """Rank-weighted attraction within one set of embeddings.

    Args:
        emb: (M, C) embeddings (all backgrounds or all foregrounds of the batch).
        alpha: rank decay (number or scalar tensor); weights exp(-alpha * (rank - 1)) with
            0-based descending ranks.

    Returns:
        Scalar loss mean_ij w_ij * max(0, -log S_ij).
    """
    emb = _check_embeddings(emb, 'embeddings')
    sim = clamped_cosine(emb, emb)
    loss = (-torch.log(sim)).clamp_min(0.0)
    with torch.no_grad():
        order = sim.argsort(dim=1, descending=True, stable=True)
        rank = order.argsort(dim=1)  # 0-based descending rank of every entry in its row
        alpha = torch.as_tensor(alpha, dtype=sim.dtype, device=sim.device).detach()
        weights = torch.exp(-alpha * (rank.to(sim.dtype) - 1.0))
    return (loss * weights).mean()


def _alpha(outputs: dict) -> float | Tensor:
    """The model's alpha (a scalar tensor stays on its device: no host sync per step)."""
    alpha = outputs.get('c2am_alpha', DEFAULT_ALPHA)
    return alpha.reshape(()) if isinstance(alpha, Tensor) else float(alpha)


@register_loss('c2am_sim_min')
def c2am_sim_min(outputs: dict, batch: dict) -> Tensor:
    """C2AM foreground/background separation (reference ``SimMinLoss(bg, fg)``).

    Args:
        outputs: 'fg_embed' (M, C) and 'bg_embed' (M, C) of every image of the batch.
        batch: unused (class-agnostic).

    Returns:
        Scalar loss.
    """
    return sim_min_loss(outputs['bg_embed'], outputs['fg_embed'])


@register_loss('c2am_sim_max')
def c2am_sim_max(outputs: dict, batch: dict) -> Tensor:
    """C2AM rank-weighted attraction: background set plus foreground set.

    Args:
        outputs: 'fg_embed' (M, C), 'bg_embed' (M, C), optional 'c2am_alpha' (scalar).
        batch: unused (class-agnostic).

    Returns:
        Scalar ``sim_max_loss(bg) + sim_max_loss(fg)``.
    """
    alpha = _alpha(outputs)
    return sim_max_loss(outputs['bg_embed'], alpha) + sim_max_loss(outputs['fg_embed'], alpha)
