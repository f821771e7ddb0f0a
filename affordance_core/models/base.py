"""The contract every affordance method implements, and the plumbing they share.

A method subclasses :class:`AffordanceModel`, builds its head in ``__init__`` after calling
``super().__init__`` (which builds the frozen backbone and stores the class list), and implements

* ``forward(ego, exo, labels, *, ego_feats=None, exo_feats=None) -> dict`` (training outputs,
  shared key names across methods: ``ego_logits`` (B, C), ``exo_logits`` (B, N, C), ``ego_cam``
  (B, C, h, w) ...), and
* ``cams(images=None, *, feats=None) -> (B, C, h, w)`` raw maps of every class: the inference
  path that ``ExportWrapper`` traces and the robot runs.

Methods whose test-time map of a class is cheaper than all classes (or depends on the asked class)
override ``predict_raw``. The trainer's cached evaluation calls ``predict_raw(None, ids,
feats=...)``; a method that needs the images at test time (e.g. a second, uncached backbone) sets
``predicts_from_features = False`` and is evaluated on images.

Class attributes a method may set:
    feature_fields: ``BackboneOutput`` fields its training forward reads (the feature cache
        stores exactly these); empty when it cannot train from cached features.
    postprocess: evaluation path of ``metrics.postprocess`` (``'locate'`` or ``'double'``).
    predicts_from_features: see above.
"""
from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from affordance_core.models.backbone import FrozenViT, create_backbone
from affordance_core.models.layers import gather_class_maps, minmax_2d

__all__ = ['AffordanceModel', 'feature_field', 'resolve_classes']


def resolve_classes(num_classes: int | None, classes: Sequence[str] | None, owner: str,
                    default: int | None = None) -> tuple[int, tuple[str, ...] | None]:
    """(num_classes, classes) from either or both; ``default`` when both are None.

    Raises:
        ValueError: a count that does not match the names, or fewer than 1 class.
    """
    if classes is not None:
        classes = tuple(str(c) for c in classes)
        if num_classes is None:
            num_classes = len(classes)
        elif num_classes != len(classes):
            raise ValueError(f'num_classes={num_classes} but {len(classes)} class names '
                             f'were given; pass matching values or omit num_classes')
    if num_classes is None:
        num_classes = default
    if num_classes is None or int(num_classes) < 1:
        raise ValueError(f'{owner} needs num_classes >= 1 (or a class list), got {num_classes}')
    return int(num_classes), classes


def feature_field(feats: Any, name: str, owner: str = 'the model') -> Tensor:
    """A field of a ``BackboneOutput`` or of a mapping of precomputed features.

    Raises:
        ValueError: the field is absent (the message names the fields ``owner`` needs).
    """
    value = feats.get(name) if isinstance(feats, Mapping) else getattr(feats, name, None)
    if value is None:
        raise ValueError(f"precomputed features lack the field '{name}' needed by {owner}")
    return value


class AffordanceModel(nn.Module, metaclass=abc.ABCMeta):
    """Base of the DINO-family methods: class list, frozen backbone, feature access, prediction.

    Args:
        num_classes: C; inferred from ``classes`` when omitted.
        classes: class names in index order (stored in checkpoints).
        backbone: backbone name (``models.backbone.list_backbones()``).
        backbone_weights: optional weights file for the backbone.
        pretrained: load pretrained backbone weights (False: random, for checkpoint loading).
    """

    feature_fields: tuple[str, ...] = ('keys', 'cls_attn')
    postprocess: str = 'locate'
    predicts_from_features: bool = True

    def __init__(self, num_classes: int | None = None, classes: Sequence[str] | None = None,
                 backbone: str = 'dino_vits16', backbone_weights: str | None = None,
                 pretrained: bool = True) -> None:
        super().__init__()
        self.num_classes, self.classes = resolve_classes(num_classes, classes,
                                                         type(self).__name__)
        self.backbone: FrozenViT = create_backbone(backbone, pretrained=pretrained,
                                                   weights=backbone_weights)
        self.backbone.eval()

    # ------------------------------------------------------------------ plumbing
    def train(self, mode: bool = True) -> AffordanceModel:
        """Set the head's mode; the frozen backbone always stays in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    @property
    def head_dtype(self) -> torch.dtype:
        """dtype of the trainable head (features are cast to it)."""
        for p in self.parameters():
            if p.requires_grad:
                return p.dtype
        return torch.float32

    def features(self, images: Tensor | None, feats: Any, what: str,
                 fields: Sequence[str] = ('keys',)) -> dict[str, Tensor]:
        """Frozen features ``{field: tensor}`` from images or from precomputed features.

        Args:
            images: (B, 3, H, W) normalised images, or None when ``feats`` is given.
            feats: ``BackboneOutput`` (or mapping) of precomputed features, or None.
            what: 'ego' / 'exo' / ..., for error messages.
            fields: the fields to return; 'keys', 'tokens', 'keys_prev' are detached and cast
                to the head dtype, 'cls_attn' is detached and kept in float32.

        Raises:
            ValueError: neither images nor features, bad image shape, a missing field or keys
                whose width is not the backbone's.
        """
        if feats is None:
            if images is None:
                raise ValueError(f'{type(self).__name__} needs {what} images or precomputed '
                                 f'{what}_feats')
            if images.dim() != 4 or images.shape[1] != 3:
                raise ValueError(f'{what} images must have shape (B, 3, H, W), '
                                 f'got {tuple(images.shape)}')
            with torch.no_grad():
                feats = self.backbone(images, prev_keys='keys_prev' in fields)
        out: dict[str, Tensor] = {}
        dim = self.backbone.embed_dim
        dtype = self.head_dtype
        for name in fields:
            value = feature_field(feats, name, f'{type(self).__name__} ({tuple(fields)})')
            value = value.detach()
            if name == 'cls_attn':
                out[name] = value.float()
                continue
            if value.dim() != 4 or value.shape[1] != dim:
                raise ValueError(f'{what} {name} must have shape (B, {dim}, h, w), '
                                 f'got {tuple(value.shape)}')
            out[name] = value.to(dtype)
        return out

    def check_labels(self, labels: Any, batch: int, device: torch.device) -> Tensor:
        """(B,) int64 training labels in [0, C)."""
        labels = torch.as_tensor(labels, device=device).long()
        if labels.shape != (batch,):
            raise ValueError(f'labels must have shape ({batch},), got {tuple(labels.shape)}')
        if bool(((labels < 0) | (labels >= self.num_classes)).any()):
            raise ValueError(f'labels must lie in [0, {self.num_classes}), got {labels.tolist()}')
        return labels

    @staticmethod
    def flatten_exo(exo: Tensor | None, exo_feats: Any) -> Tensor | None:
        """(B, N, 3, H, W) exo images -> (B*N, 3, H, W) (None and precomputed features pass)."""
        if exo is not None and exo_feats is None:
            if exo.dim() != 5:
                raise ValueError(f'exo images must have shape (B, N, 3, H, W), '
                                 f'got {tuple(exo.shape)}')
            return exo.flatten(0, 1)
        return exo

    @staticmethod
    def num_exo(rows: int, batch: int) -> int:
        """N from B*N exo feature rows and B samples."""
        if rows == 0 or rows % batch != 0:
            raise ValueError(f'{rows} exo feature rows do not split into {batch} samples; exo '
                             'features must be (B*N, ...) sample-major')
        return rows // batch

    def class_ids(self, class_ids: Any, batch: int, device: torch.device) -> Tensor:
        """(B,) int64 ids in [0, C); an int (or one id) applies to the whole batch."""
        ids = torch.as_tensor(class_ids, device=device).long().reshape(-1)
        if ids.numel() == 1 and batch > 1:
            ids = ids.expand(batch)
        if ids.shape != (batch,):
            raise ValueError(f'class_ids must hold one id per image ({batch}), '
                             f'got {tuple(ids.shape)}')
        if bool(((ids < 0) | (ids >= self.num_classes)).any()):
            raise ValueError(f'class_ids must lie in [0, {self.num_classes}), got {ids.tolist()}')
        return ids

    def epoch_end(self, epoch: int) -> None:
        """Called by the trainer after every training epoch (0-based); no-op by default."""

    # ------------------------------------------------------------------ inference
    @abc.abstractmethod
    def cams(self, images: Tensor | None = None, *, feats: Any = None) -> Tensor:
        """Raw maps of every class (B, C, h, w): the deployed inference path."""

    @torch.no_grad()
    def predict_raw(self, images: Tensor | None, class_ids: Any, *,
                    feats: Any = None) -> Tensor:
        """Raw map (B, h, w) of the asked class of every image (the reference ``test_forward``).

        Args:
            images: (B, 3, H, W) normalised images (None with ``feats``).
            class_ids: (B,) class ids (an int applies to every image).
            feats: precomputed backbone features instead of images.
        """
        cam = self.cams(images, feats=feats)
        return gather_class_maps(cam, self.class_ids(class_ids, cam.shape[0], cam.device))

    @torch.no_grad()
    def predict(self, images: Tensor, class_ids: Any) -> Tensor:
        """Heatmaps (B, H, W) in [0, 1]: raw map -> bilinear to the input size -> min-max.

        Mirrors ``metrics.postprocess.normalize_map`` (denominator max - min + 1e-10). Call
        ``model.eval()`` first (the heads hold BatchNorm).

        Args:
            images: (B, 3, H, W) ImageNet-normalised images.
            class_ids: (B,) class ids (an int applies to every image).
        """
        raw = self.predict_raw(images, class_ids)
        up = F.interpolate(raw.unsqueeze(1).float(), size=images.shape[-2:], mode='bilinear',
                           align_corners=False).squeeze(1)
        return minmax_2d(up, eps=1e-10)
