"""Head blocks and map helpers shared by the DINO-based affordance methods (LOCATE family).

Module attribute names follow the LOCATE reference code so that its checkpoints map onto ours by
name: ``ResidualMlp`` has ``norm`` / ``fc1`` / ``act`` / ``fc2`` (and ``fc`` in the name puts the
MLP in the 10x learning-rate groups of the official optimizer, methods.md §0.4); ``ConvBranch`` is
an ``nn.Sequential`` with the reference's indices (0 conv, 1 BN, 2 ReLU, 3 conv, 4 BN, 5 ReLU).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ['ResidualMlp', 'ConvBranch', 'minmax_2d', 'dino_saliency', 'gather_class_maps',
           'SALIENCY_HEADS', 'key_channel_perm', 'permute_key_channels', 'permute_head_state']

# CLS-attention heads of the last DINO ViT-S/16 block used for LOCATE's saliency map (§3.1).
SALIENCY_HEADS = (0, 1, 3)


class ResidualMlp(nn.Module):
    """Per-token residual MLP: X = F + fc2(GELU(fc1(LayerNorm(F)))), hidden width ``ratio * dim``.

    Args:
        dim: token width D.
        ratio: hidden width factor (4 in LOCATE).
    """

    def __init__(self, dim: int, ratio: int = 4) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ratio * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(ratio * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., D) tokens -> (..., D)."""
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class ConvBranch(nn.Sequential):
    """[Conv3x3(D -> D, bias) -> BatchNorm -> ReLU] x 2 on (B, D, h, w) maps (view branch)."""

    def __init__(self, dim: int) -> None:
        super().__init__(
            nn.Conv2d(dim, dim, kernel_size=3, stride=1, padding=1),
            nn.BatchNorm2d(dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(dim, dim, kernel_size=3, stride=1, padding=1),
            nn.BatchNorm2d(dim),
            nn.ReLU(inplace=True),
        )


def minmax_2d(x: Tensor, eps: float = 1e-10) -> Tensor:
    """Min-max normalise every map over its last two dims: (x - min) / (max - min + eps).

    Differentiable (min and max included). The reference's two variants,
    ``(x - min) / (max(x - min) + eps)`` and ``(x - min) / (max - min + eps)``, are the same.

    Args:
        x: (..., h, w) maps.
        eps: added to the range; a constant map becomes all zeros.

    Returns:
        (..., h, w) maps in [0, 1).
    """
    if x.dim() < 2:
        raise ValueError(f'minmax_2d expects (..., h, w) maps, got shape {tuple(x.shape)}')
    flat = x.flatten(-2)
    lo = flat.amin(-1, keepdim=True).unsqueeze(-1)
    hi = flat.amax(-1, keepdim=True).unsqueeze(-1)
    return (x - lo) / (hi - lo + eps)


def dino_saliency(cls_attn: Tensor,
                  heads: Sequence[int] = SALIENCY_HEADS) -> tuple[Tensor, Tensor]:
    """DINO saliency map (LOCATE's ``ego_sam``) from last-block CLS -> patch attention.

    Each selected head's map is binarised at its own spatial mean (strict ``>``), the binary maps
    are averaged and min-max normalised (eps 1e-15, as the reference's ``normalize_minmax``); the
    hard map is that soft map thresholded (strict ``>``) at its spatial mean.

    Backbones with fewer heads than ``max(heads) + 1`` (the tiny ``vit_test``) use the listed heads
    that exist; if none exists, all heads are used.

    Args:
        cls_attn: (B, heads, h, w) softmax attention of the CLS token to the patches.
        heads: head indices to use; (0, 1, 3) for LOCATE.

    Returns:
        soft (B, h, w) float map in [0, 1]; hard (B, h, w) bool map.
    """
    if cls_attn.dim() != 4:
        raise ValueError(f'dino_saliency expects (B, heads, h, w), got {tuple(cls_attn.shape)}')
    idx = [h for h in heads if h < cls_attn.shape[1]] or list(range(cls_attn.shape[1]))
    attn = cls_attn[:, idx].float()
    binary = (attn > attn.mean((-2, -1), keepdim=True)).float()
    soft = minmax_2d(binary.mean(1), eps=1e-15)
    hard = soft > soft.mean((-2, -1), keepdim=True)
    return soft, hard


def gather_class_maps(maps: Tensor, class_ids: Tensor) -> Tensor:
    """Pick one class map per sample: maps (B, C, h, w), class_ids (B,) -> (B, h, w)."""
    if class_ids.shape != (maps.shape[0],):
        raise ValueError(f'class ids must have shape ({maps.shape[0]},), '
                         f'got {tuple(class_ids.shape)}')
    idx = class_ids.to(device=maps.device, dtype=torch.long)
    return maps[torch.arange(maps.shape[0], device=maps.device), idx]


def key_channel_perm(dim: int, num_heads: int) -> Tensor:
    """Index map between our head-major key channels and the reference's d-major ones.

    Ours: channel ``head * hd + d``; the official repositories: ``d * heads + head`` (methods.md
    §0.2), with ``hd = dim // num_heads``. ``perm[j]`` is our channel that the official channel
    ``j`` holds, so ``ours[..., perm]`` is in the official order and
    ``official[..., perm.argsort()]`` in ours.
    """
    if num_heads < 1 or dim % num_heads:
        raise ValueError(f'dim {dim} is not a multiple of num_heads {num_heads}')
    hd = dim // num_heads
    j = torch.arange(dim)
    return (j % num_heads) * hd + j // num_heads


def permute_key_channels(t: Tensor, axis: int, num_heads: int, to_official: bool,
                         span: int | None = None, offset: int = 0) -> Tensor:
    """Reorder the DINO-key channel axis of a weight between our order and the official one.

    Args:
        t: a weight whose ``axis`` indexes key channels (e.g. the input axis of a Linear / conv
            that reads keys, or a LayerNorm over keys).
        axis: the key-channel axis.
        num_heads: backbone heads (6 for ViT-S).
        to_official: ours -> official (True) or official -> ours (False).
        span: width of the key block on ``axis`` (default: the whole axis); ``offset`` its start,
            for weights that read a concatenation of several key maps (WSMA: 2 x 384).
    """
    size = t.shape[axis]
    span = size - offset if span is None else span
    perm = key_channel_perm(span, num_heads).to(t.device)
    if not to_official:
        perm = perm.argsort()
    index = torch.arange(size, device=t.device)
    index[offset:offset + span] = perm + offset
    return t.index_select(axis, index)


def permute_head_state(state: dict[str, Tensor], num_heads: int, to_official: bool,
                       key_inputs: Sequence[str], key_outputs: Sequence[str] = ()
                       ) -> dict[str, Tensor]:
    """Convert a head state dict between our and the official DINO key channel order.

    Args:
        state: head weights (no backbone entries).
        num_heads: backbone heads.
        to_official: direction.
        key_inputs: names whose input axis (1) reads key channels (first Linear / conv that sees
            the keys or the residual stream built on them).
        key_outputs: names whose axis 0 is in key-channel space (a residual MLP's fc2 weight and
            bias, the LayerNorm over keys).

    Returns:
        a new dict; every other tensor is unchanged (learned channel spaces keep their order).
    """
    out = {}
    for name, t in state.items():
        if name in key_inputs:
            t = permute_key_channels(t, 1, num_heads, to_official)
        elif name in key_outputs:
            t = permute_key_channels(t, 0, num_heads, to_official)
        out[name] = t.contiguous()
    return out
