"""Concentration loss L_c of LOCATE, from SCOPS (methods.md §3.3), on ALL C ego class maps.

Each map is min-max normalised (eps 1e-10), offset by 1e-3 and normalised to a spatial
distribution q; with coordinates x = j / W * 2 - 1 (column j) and y = i / H * 2 - 1 (row i) and
centroid mu = sum q * (x, y), the per-map loss is sum q * ((x - mu_x)^2 + (y - mu_y)^2). The
per-map losses are averaged over the C maps, then over the batch.
"""
from __future__ import annotations

import torch
from torch import Tensor

from affordance_core.losses import register_loss

OFFSET = 1e-3


def concentration_maps(maps: Tensor) -> Tensor:
    """Spatial variance of every map: (..., H, W) -> (...)."""
    h, w = maps.shape[-2:]
    flat = maps.flatten(-2)
    lo = flat.amin(-1, keepdim=True).unsqueeze(-1)
    hi = flat.amax(-1, keepdim=True).unsqueeze(-1)
    q = (maps - lo) / (hi - lo + 1e-10) + OFFSET
    q = q / q.sum((-2, -1), keepdim=True)
    xs = torch.arange(w, device=maps.device, dtype=q.dtype) / w * 2 - 1  # (W,)
    ys = torch.arange(h, device=maps.device, dtype=q.dtype) / h * 2 - 1  # (H,)
    qx, qy = q.sum(-2), q.sum(-1)  # marginals over columns (..., W) and rows (..., H)
    mu_x = (qx * xs).sum(-1, keepdim=True)
    mu_y = (qy * ys).sum(-1, keepdim=True)
    return (qx * (xs - mu_x).pow(2)).sum(-1) + (qy * (ys - mu_y).pow(2)).sum(-1)


@register_loss('concentration')
def concentration(outputs: dict, batch: dict) -> Tensor:
    """Mean spatial variance of the ego class maps.

    Args:
        outputs: 'ego_cam' (B, C, H, W) raw ego CAMs.
        batch: unused.

    Returns:
        Scalar loss.
    """
    cam = outputs['ego_cam']
    if cam.dim() != 4:
        raise ValueError(f"outputs['ego_cam'] must have shape (B, C, H, W), "
                         f'got {tuple(cam.shape)}')
    return concentration_maps(cam).mean()
