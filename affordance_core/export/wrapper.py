"""The traceable inference head: normalised images in, heatmaps of every class out.

``ExportWrapper`` is what every runtime (PyTorch eager / ``torch.compile``, ONNX Runtime,
TensorRT) executes. It calls the model's inference path only -- ``model.cams(images)``: frozen
backbone -> head -> CAMs -- and never the training branch (exocentric views, k-means PartSelect,
DINO saliency). The low-resolution CAMs are then upsampled to the input size and min-max
normalised per map, exactly as ``model.predict`` does for a single class.

``ModelMetadata`` carries what a runtime needs to rebuild the pre- and post-processing without
the PyTorch model (class names, input size, normalisation, hashes); the ONNX exporter stores it in
the ONNX ``metadata_props`` and the TensorRT exporter in a JSON sidecar.

The frozen ViT traces as is: the last block is computed explicitly with plain tensor ops, and the
position-embedding resize (bicubic, ``antialias=False``) of a DINOv2 backbone (37x37 stored grid,
16x16 at 224) exports to an ONNX ``Resize`` (cubic, half-pixel) that ONNX Runtime evaluates to
within 1e-7 of PyTorch and constant-folds at session creation; no precomputation is needed.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from affordance_core.checkpoint import file_sha256
from affordance_core.models.layers import minmax_2d

__all__ = ['ExportWrapper', 'ModelMetadata', 'model_metadata', 'state_dict_sha256', 'file_sha256',
           'MAP_EPS', 'METADATA_PREFIX', 'METADATA_FORMAT', 'METADATA_VERSION']

logger = logging.getLogger(__name__)

MAP_EPS = 1e-10                        # min-max denominator eps (metrics.postprocess.NORM_EPS)
METADATA_PREFIX = 'affordance.'        # key prefix in ONNX metadata_props / sidecar JSON
METADATA_FORMAT = 'affordance_ros.heatmaps'
METADATA_VERSION = 1


class ExportWrapper(nn.Module):
    """Normalised image batch (B, 3, S, S) -> (raw CAMs, normalised heatmaps) of ALL classes.

    Works for any model that exposes ``cams(images) -> (B, C, h, w)`` (the inference contract
    of ``docs/architecture.md``). The wrapper stays in eval mode (the heads hold BatchNorm).

    Args:
        model: an affordance model (``Locate`` or any method with ``cams``); put in eval mode.
        image_size: the input side S the wrapper is traced / compiled for.
        compute_dtype: run the model in this dtype (e.g. ``torch.float16`` for a model cast with
            ``.half()``); the input is cast to it and the CAMs back to float32, so the upsampling
            and the min-max (eps 1e-10, which float16 cannot hold) always run in float32. None
            runs the model in the input's dtype.

    Attributes:
        image_size: S.
        grid_size: (h, w) patch grid of the CAMs at S x S.
        num_classes: C.
    """

    def __init__(self, model: nn.Module, *, image_size: int = 224,
                 compute_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if not callable(getattr(model, 'cams', None)):
            raise TypeError(f'ExportWrapper needs a model with a cams(images) method (the '
                            f'inference path), got {type(model).__name__}')
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
            raise ValueError(f'image_size must be a positive int, got {image_size!r}')
        self.model = model.eval()
        backbone = getattr(model, 'backbone', None)
        if backbone is not None and hasattr(backbone, 'grid_size'):
            self.grid_size = tuple(backbone.grid_size(image_size, image_size))  # checks S % p
        else:
            self.grid_size = None
        self.image_size = int(image_size)
        self.num_classes = int(getattr(model, 'num_classes', 0)) or None
        self.compute_dtype = compute_dtype

    def train(self, mode: bool = True) -> ExportWrapper:
        """Stay in eval mode whatever ``mode`` is (inference only)."""
        return super().train(False)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Heatmaps of every class.

        Args:
            images: (B, 3, S, S) ImageNet-normalised float images.

        Returns:
            cams: (B, C, h, w) float32 raw patch-grid CAMs.
            maps: (B, C, S, S) float32 in [0, 1): bilinear upsampling (``align_corners=False``)
            of the CAMs to S x S, then per-map (x - min) / (max - min + 1e-10).
        """
        s = self.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, s, s):
            raise ValueError(f'ExportWrapper expects images of shape (B, 3, {s}, {s}), '
                             f'got {tuple(images.shape)}')
        x = images if self.compute_dtype is None else images.to(self.compute_dtype)
        cams = self.model.cams(x).float()
        up = F.interpolate(cams, size=(s, s), mode='bilinear', align_corners=False)
        return cams, minmax_2d(up, eps=MAP_EPS)


@dataclass
class ModelMetadata:
    """What a runtime needs besides the network: classes, input geometry, normalisation, hashes.

    Attributes:
        model_name: registry name (``locate_imgfocus``).
        classes: class names in output-channel order.
        image_size: input side S (inputs are (1, 3, S, S)).
        grid_size: (h, w) of the raw CAMs.
        mean, std: ImageNet normalisation the inputs must carry.
        backbone: backbone name.
        checkpoint_sha256: sha256 of the checkpoint file it came from ('' if unknown).
        model_sha256: sha256 of the model's state dict (``state_dict_sha256``).
        extra: further string data.
    """

    model_name: str
    classes: tuple[str, ...]
    image_size: int
    grid_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    backbone: str = ''
    checkpoint_sha256: str = ''
    model_sha256: str = ''
    extra: dict[str, str] = field(default_factory=dict)

    def to_props(self) -> dict[str, str]:
        """Flat ``{key: str}`` (ONNX ``metadata_props``); lists are JSON, keys prefixed."""
        data = asdict(self)
        extra = data.pop('extra')
        props = {f'{METADATA_PREFIX}format': METADATA_FORMAT,
                 f'{METADATA_PREFIX}version': str(METADATA_VERSION)}
        for key, value in data.items():
            props[METADATA_PREFIX + key] = value if isinstance(value, str) else json.dumps(
                list(value) if isinstance(value, tuple) else value)
        for key, value in extra.items():
            props[f'{METADATA_PREFIX}extra.{key}'] = str(value)
        return props

    @classmethod
    def from_props(cls, props: dict[str, str], source: str = 'metadata') -> ModelMetadata:
        """Inverse of ``to_props``.

        Raises:
            ValueError: ``props`` were not written by ``to_props`` (names what is missing).
        """
        fmt = props.get(f'{METADATA_PREFIX}format')
        if fmt != METADATA_FORMAT:
            raise ValueError(f'{source}: no affordance_ros metadata ({METADATA_PREFIX}format is '
                             f'{fmt!r}); export the model with affordance-export')
        version = int(props.get(f'{METADATA_PREFIX}version', '0'))
        if version > METADATA_VERSION:
            raise ValueError(f'{source}: metadata version {version} is newer than this code '
                             f'understands ({METADATA_VERSION})')
        try:
            def get(key: str) -> str:
                return props[METADATA_PREFIX + key]

            return cls(
                model_name=get('model_name'),
                classes=tuple(str(c) for c in json.loads(get('classes'))),
                image_size=int(json.loads(get('image_size'))),
                grid_size=tuple(int(g) for g in json.loads(get('grid_size'))),
                mean=tuple(float(v) for v in json.loads(get('mean'))),
                std=tuple(float(v) for v in json.loads(get('std'))),
                backbone=props.get(METADATA_PREFIX + 'backbone', ''),
                checkpoint_sha256=props.get(METADATA_PREFIX + 'checkpoint_sha256', ''),
                model_sha256=props.get(METADATA_PREFIX + 'model_sha256', ''),
                extra={k[len(METADATA_PREFIX) + 6:]: v for k, v in props.items()
                       if k.startswith(METADATA_PREFIX + 'extra.')},
            )
        except KeyError as exc:
            raise ValueError(f'{source}: metadata entry {exc.args[0]!r} is missing') from None
        except (TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f'{source}: malformed metadata ({exc})') from None

    def to_json(self) -> dict[str, Any]:
        """JSON-able dict (sidecar files)."""
        data = asdict(self)
        data['classes'] = list(self.classes)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelMetadata:
        """Inverse of ``to_json``."""
        data = dict(data)
        for key in ('classes', 'grid_size', 'mean', 'std'):
            data[key] = tuple(data[key])
        return cls(**data)


def state_dict_sha256(model: nn.Module) -> str:
    """sha256 over the state dict: every key, dtype, shape and raw tensor bytes, sorted by key."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        t = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f'{key}|{t.dtype}|{tuple(value.shape)}|'.encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_metadata(model: nn.Module, *, image_size: int = 224,
                   checkpoint_sha256: str | None = None) -> ModelMetadata:
    """Metadata of ``model`` for inputs of ``image_size`` (class names default to class_<i>)."""
    wrapper = ExportWrapper(model, image_size=image_size)
    num_classes = wrapper.num_classes
    classes = getattr(model, 'classes', None)
    if classes is None:
        if num_classes is None:
            raise ValueError(f'{type(model).__name__} has neither classes nor num_classes')
        logger.warning('model has no class names; using class_0 .. class_%d', num_classes - 1)
        classes = tuple(f'class_{i}' for i in range(num_classes))
    backbone = getattr(model, 'backbone', None)
    grid = wrapper.grid_size
    if grid is None:  # not a FrozenViT-based model: ask the model
        with torch.no_grad():
            param = next(model.parameters())
            probe = torch.zeros(1, 3, image_size, image_size, device=param.device,
                                dtype=param.dtype)
            grid = tuple(model.cams(probe).shape[-2:])
    return ModelMetadata(
        model_name=str(getattr(model, 'registry_name', type(model).__name__)),
        classes=tuple(str(c) for c in classes),
        image_size=int(image_size),
        grid_size=(int(grid[0]), int(grid[1])),
        mean=tuple(float(v) for v in getattr(backbone, 'mean', (0.485, 0.456, 0.406))),
        std=tuple(float(v) for v in getattr(backbone, 'std', (0.229, 0.224, 0.225))),
        backbone=str(getattr(backbone, 'name', '')),
        checkpoint_sha256=checkpoint_sha256 or '',
        model_sha256=state_dict_sha256(model),
    )
