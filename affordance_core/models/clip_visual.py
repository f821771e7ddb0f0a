"""CLIP object discovery for SelectiveCL: ClearCLIP patch features and cached prompt features.

SelectiveCL (methods.md §6.1) localises the object of an affordance with a frozen CLIP ViT-B/16
(open_clip ``ViT-B/16``, OpenAI weights): the patch features of the image are compared (cosine)
with the text feature of a prompt built from the affordance name. Only the **last** transformer
block of the image tower is changed, to ClearCLIP attention:

    y = ln_1(x);  q, k, v = in_proj(y)
    o = out_proj( softmax(q q^T / sqrt(d)) v )          (per head; q.q, not q.k)
    patch features = ln_post(o)[:, 1:] @ proj

with **no residual and no FFN** (the reference ``VisionTransformer.forward(model_type='ClearCLIP',
ignore_residual=True)``). The blocks before the last run unchanged (their attention written out
with plain tensor ops so the path exports to ONNX; ``nn.MultiheadAttention``'s fused inference
kernel does not).

Prompts (the raw class name, underscores kept, as the reference):
    ego: ``"an item to {aff} with"``, without " with" when the name already contains "with";
    exo: ``"a person {aff} an item"``, without " an item" when the name already contains it.

Weights come ONLY from a local file (``weights=``): the OpenAI TorchScript archive
``ViT-B-16.pt`` or any open_clip state dict of ``ViT-B-16`` (``open_clip_pytorch_model.bin``,
``.safetensors``). Nothing is downloaded. The OpenAI weights were trained with QuickGELU, so the
architecture is built with ``quick_gelu=True`` (open_clip's ``ViT-B-16`` config alone would use
GELU, which is what a local file path gets by default, and gives different features).

``config='tiny'`` builds a tiny CLIP with seeded random weights (patch 16, width 32, 2 blocks,
embedding 32, a one-block text tower) for CPU tests.

The text features of every class are computed once (at construction and again after every
``load_state_dict``, by a post-load hook) and kept as non-persistent buffers ``text_ego`` /
``text_exo`` (C, E), L2-normalised; the text tower's weights stay in the state dict, so a
checkpoint is self-contained and an official SelectiveCL checkpoint (``net.*``) maps onto it by
name.
"""
from __future__ import annotations

import logging
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ['ClipObjectPrior', 'CLIP_CONFIGS', 'TINY_CLIP_CONFIG', 'ego_prompt', 'exo_prompt',
           'build_clip', 'load_clip_weights', 'clear_clip_features', 'encode_prompts']

logger = logging.getLogger(__name__)

CLIP_CONFIGS = ('ViT-B-16', 'tiny')
# tiny random CLIP for tests: patch 16, width 32, 2 blocks, 2 heads, embedding 32, 1 text block
TINY_CLIP_CONFIG = {
    'embed_dim': 32,
    'vision_cfg': {'image_size': 64, 'layers': 2, 'width': 32, 'patch_size': 16,
                   'head_width': 16},
    'text_cfg': {'context_length': 77, 'vocab_size': 49408, 'width': 32, 'heads': 2,
                 'layers': 1},
}
_JIT_EXTRA_KEYS = ('input_resolution', 'context_length', 'vocab_size')


def ego_prompt(name: str) -> str:
    """The reference's ego prompt: ``"an item to {name} with"`` (no second "with")."""
    return f'an item to {name}' + ('' if 'with' in name else ' with')


def exo_prompt(name: str) -> str:
    """The reference's exo (object) prompt: ``"a person {name} an item"``."""
    return f'a person {name}' + ('' if 'an item' in name else ' an item')


def build_clip(config: str = 'ViT-B-16', *, quick_gelu: bool = True, seed: int = 0) -> nn.Module:
    """An open_clip ``CLIP`` with random weights (nothing is downloaded).

    Args:
        config: ``'ViT-B-16'`` (``open_clip.create_model('ViT-B-16')``'s architecture) or
            ``'tiny'`` (``TINY_CLIP_CONFIG``).
        quick_gelu: QuickGELU activations (True for the OpenAI weights).
        seed: seed of the random initialisation (the global RNG is left untouched).

    Raises:
        ValueError: unknown config.
    """
    import open_clip

    if config not in CLIP_CONFIGS:
        raise ValueError(f"unknown clip_config '{config}'; expected one of {CLIP_CONFIGS}")
    quiet = _DropMessage('No pretrained weights loaded')  # the weights are loaded afterwards
    root = logging.getLogger()
    root.addFilter(quiet)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if config == 'tiny':
                return open_clip.CLIP(**TINY_CLIP_CONFIG, quick_gelu=quick_gelu)
            return open_clip.create_model(config, pretrained=None, force_quick_gelu=quick_gelu)
    finally:
        root.removeFilter(quiet)


class _DropMessage(logging.Filter):
    """Drop records whose message starts with ``prefix`` (open_clip's random-init warning)."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith('constants.pkl') or '/code/' in n for n in z.namelist())


def _missing_weights(path: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f'CLIP weights file not found: {path}. SelectiveCL needs the OpenAI CLIP ViT-B/16 '
        "weights as a local file (ViT-B-16.pt of the OpenAI release, or open_clip's "
        'open_clip_pytorch_model.bin / .safetensors of ViT-B-16 openai); pass '
        'clip_weights=<file> (model.kwargs.clip_weights=<file> in a config). Nothing is '
        'downloaded.')


def load_clip_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local CLIP weights file into an open_clip ``CLIP`` (strict).

    Accepts the OpenAI TorchScript archive (``ViT-B-16.pt``) and the open_clip formats
    (state dict ``.bin`` / ``.pt`` / ``.pth``, ``.safetensors``; a ``state_dict`` wrapper and a
    ``module.`` prefix are handled by open_clip).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file does not hold weights of this architecture.
    """
    import open_clip

    path = Path(path).expanduser()
    if not path.is_file():
        raise _missing_weights(path)
    try:
        if _is_torchscript(path):
            with warnings.catch_warnings():  # torch.jit.load is deprecated upstream
                warnings.simplefilter('ignore')
                state = torch.jit.load(str(path), map_location='cpu').state_dict()
            # model attributes and non-persistent buffers a TorchScript archive may carry
            transient = set(dict(model.named_buffers())) - set(model.state_dict())
            state = {k: v for k, v in state.items()
                     if k not in _JIT_EXTRA_KEYS and k not in transient}
            model.load_state_dict(state, strict=True)
        else:
            open_clip.load_checkpoint(model, str(path), strict=True)
    except Exception as exc:  # pickle / zip / key / shape errors: not usable weights
        raise ValueError(f'{path}: not CLIP weights of this architecture ('
                         f'{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ""})'
                         ) from None
    logger.info('CLIP weights loaded from %s', path)


def _position_embedding(visual: nn.Module, h: int, w: int) -> Tensor:
    """(1 + h*w, width) position embedding, the patch part resized (bicubic) to an h x w grid."""
    pos = visual.positional_embedding
    gh, gw = visual.grid_size
    if (h, w) == (gh, gw):
        return pos
    patch = pos[1:].reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, size=(h, w), mode='bicubic', align_corners=False)
    return torch.cat([pos[:1], patch.permute(0, 2, 3, 1).reshape(h * w, -1)], dim=0)


def _plain_block(blk: nn.Module) -> bool:
    """An open_clip ``ResidualAttentionBlock`` (self-attention through nn.MultiheadAttention)."""
    attn = getattr(blk, 'attn', None)
    parts = ('ln_1', 'ls_1', 'ln_2', 'mlp', 'ls_2')
    return (isinstance(attn, nn.MultiheadAttention) and attn.in_proj_weight is not None
            and attn.batch_first and all(hasattr(blk, n) for n in parts)
            and not hasattr(blk, 'ln_1_kv'))


def _attention(attn: nn.MultiheadAttention, y: Tensor, clear: bool) -> Tensor:
    """Self-attention of ``attn``'s weights on (B, L, D) tokens, with explicit tensor ops.

    ``clear=False``: softmax(q k^T / sqrt(d)) v (what the module computes); ``clear=True``: the
    ClearCLIP q.q attention softmax(q q^T / sqrt(d)) v. Both end with the output projection.
    """
    b, length, dim = y.shape
    heads = attn.num_heads
    q, k, v = F.linear(y, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q = q.reshape(b, length, heads, dim // heads).transpose(1, 2)  # (B, heads, L, hd)
    k = q if clear else k.reshape(b, length, heads, dim // heads).transpose(1, 2)
    v = v.reshape(b, length, heads, dim // heads).transpose(1, 2)
    a = torch.softmax((q @ k.transpose(-2, -1)) * (dim // heads) ** -0.5, dim=-1)
    return attn.out_proj((a @ v).transpose(1, 2).reshape(b, length, dim))


def clear_clip_features(visual: nn.Module, images: Tensor) -> Tensor:
    """ClearCLIP patch features of an open_clip ``VisionTransformer``.

    All blocks but the last run unchanged (with open_clip's sub-modules; the attention is written
    out with plain tensor ops, the same computation as ``nn.MultiheadAttention``, so the path
    exports to ONNX); the last block is replaced by ``out_proj(softmax(q q^T / sqrt(d)) v)`` on
    ``ln_1(x)`` (no residual, no FFN), followed by ``ln_post`` and the projection. The CLS token
    is dropped. A non-square grid or a grid other than the stored one resizes the position
    embedding (bicubic).

    Args:
        visual: ``open_clip`` ``VisionTransformer`` (``clip.visual``).
        images: (B, 3, H, W) normalised images, H and W multiples of the patch size.

    Returns:
        (B, E, h, w) patch features (not L2-normalised), E the CLIP embedding width.
    """
    p = visual.patch_size[0]
    b, _, hh, ww = images.shape
    if hh % p or ww % p:
        raise ValueError(f'CLIP needs image sides that are multiples of {p}, got {hh}x{ww}')
    h, w = hh // p, ww // p
    x = visual.conv1(images.to(visual.conv1.weight.dtype))  # (B, width, h, w)
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(b, -1, -1)
    x = torch.cat([cls, x], dim=1) + _position_embedding(visual, h, w).to(x.dtype)
    x = visual.ln_pre(visual.patch_dropout(x))
    blocks = visual.transformer.resblocks
    batch_first = getattr(visual.transformer, 'batch_first', True)
    if not batch_first:
        x = x.transpose(0, 1)
    if batch_first and all(_plain_block(blk) for blk in blocks[:-1]):
        for blk in blocks[:-1]:  # explicit ops: exportable (no fused MHA kernel)
            x = x + blk.ls_1(_attention(blk.attn, blk.ln_1(x), clear=False))
            x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
    else:
        for blk in blocks[:-1]:
            x = blk(x)
    if not batch_first:
        x = x.transpose(0, 1)
    last = blocks[-1]
    o = visual.ln_post(_attention(last.attn, last.ln_1(x), clear=True))
    tokens = o[:, 1:] @ visual.proj  # (B, h*w, E)
    return tokens.transpose(1, 2).reshape(b, -1, h, w)


@torch.no_grad()
def encode_prompts(model: nn.Module, prompts: Sequence[str]) -> Tensor:
    """L2-normalised text features (P, E) of ``prompts`` (open_clip tokenizer, 77 tokens)."""
    from open_clip.tokenizer import SimpleTokenizer

    tokenizer = SimpleTokenizer(context_length=model.context_length)
    param = next(model.parameters())
    tokens = tokenizer(list(prompts)).to(param.device)
    return F.normalize(model.encode_text(tokens).float(), dim=-1)


class ClipObjectPrior(nn.Module):
    """Frozen CLIP (ClearCLIP image features) with the prompt features of every class cached.

    Args:
        classes: class names in index order (the prompts use them verbatim).
        config: ``'ViT-B-16'`` or ``'tiny'`` (seeded random weights, tests).
        weights: local CLIP weights file (required for ``'ViT-B-16'`` when ``pretrained``).
        pretrained: load ``weights`` (False: random weights, e.g. before ``load_state_dict``
            of a checkpoint that holds them).
        quick_gelu: build with QuickGELU (the OpenAI weights need it).
        seed: seed of the random initialisation.

    Attributes:
        model: the open_clip ``CLIP`` (frozen, always in eval mode).
        text_ego: (C, E) normalised features of the ego prompts (non-persistent buffer).
        text_exo: (C, E) normalised features of the exo prompts (non-persistent buffer).
        patch_size: the image tower's patch size.

    Raises:
        FileNotFoundError: ``'ViT-B-16'`` with ``pretrained`` and no (or a missing) weights file.
        ValueError: no class names, unknown config, or a weights file of another architecture.
    """

    def __init__(self, classes: Sequence[str], *, config: str = 'ViT-B-16',
                 weights: str | None = None, pretrained: bool = True, quick_gelu: bool = True,
                 seed: int = 0) -> None:
        super().__init__()
        classes = tuple(str(c) for c in classes or ())
        if not classes:
            raise ValueError('the CLIP object prior builds its prompts from the class names: '
                             'pass classes=[...] (e.g. labels.classes_for(split))')
        self.classes = classes
        self.config = config
        if pretrained and config != 'tiny' and not weights:
            raise FileNotFoundError(
                "SelectiveCL's CLIP object prior needs the OpenAI CLIP ViT-B/16 weights as a "
                'local file: pass clip_weights=<ViT-B-16.pt or open_clip_pytorch_model.bin> '
                '(model.kwargs.clip_weights=<file> in a config), or use '
                "object_prior='c2am' with a trained C2AM checkpoint. Nothing is downloaded.")
        if pretrained and weights and not Path(weights).expanduser().is_file():
            raise _missing_weights(Path(weights).expanduser())  # before building the model
        self.model = build_clip(config, quick_gelu=quick_gelu, seed=seed)
        if pretrained and weights:
            load_clip_weights(self.model, weights)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()
        self.patch_size = int(self.model.visual.patch_size[0])
        width = int(self.model.visual.proj.shape[1])
        self.register_buffer('text_ego', torch.zeros(len(classes), width), persistent=False)
        self.register_buffer('text_exo', torch.zeros(len(classes), width), persistent=False)
        self.refresh_text_features()
        self.register_load_state_dict_post_hook(_refresh_after_load)

    @property
    def ego_prompts(self) -> list[str]:
        """The ego prompt of every class, in class order."""
        return [ego_prompt(c) for c in self.classes]

    @property
    def exo_prompts(self) -> list[str]:
        """The exo prompt of every class, in class order."""
        return [exo_prompt(c) for c in self.classes]

    @torch.no_grad()
    def refresh_text_features(self) -> None:
        """Recompute ``text_ego`` / ``text_exo`` from the current text-tower weights."""
        feats = encode_prompts(self.model, self.ego_prompts + self.exo_prompts)
        c = len(self.classes)
        self.text_ego.copy_(feats[:c].to(self.text_ego))
        self.text_exo.copy_(feats[c:].to(self.text_exo))

    def train(self, mode: bool = True) -> ClipObjectPrior:
        """Stay in eval mode whatever ``mode`` is (frozen)."""
        return super().train(False)

    @torch.no_grad()
    def image_features(self, images: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        """ClearCLIP patch features (B, E, h, w), not normalised.

        Args:
            images: (B, 3, H, W) normalised images (SelectiveCL feeds the same ImageNet-normalised
                tensor as to DINO, like the reference).
            grid: the (h, w) grid wanted; when CLIP's grid at this input size differs (e.g. a
                14-px DINOv2 backbone), the images are first resized (bilinear) to
                (h * patch, w * patch) so the two grids coincide.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f'CLIP images must have shape (B, 3, H, W), '
                             f'got {tuple(images.shape)}')
        p = self.patch_size
        if grid is not None and tuple(grid) != (images.shape[-2] // p, images.shape[-1] // p):
            images = F.interpolate(images, size=(grid[0] * p, grid[1] * p), mode='bilinear',
                                   align_corners=False)
        return clear_clip_features(self.model.visual, images).float()


def _refresh_after_load(module: nn.Module, incompatible_keys: object) -> None:
    """Post-load hook: the text features follow the loaded text tower."""
    module.refresh_text_features()  # type: ignore[operator]
