"""ONNX export of the inference head (``ExportWrapper``) with self-describing metadata.

The graph has one fixed-shape input ``images`` (1, 3, S, S) float32 (ImageNet-normalised) and two
outputs ``cams`` (1, C, h, w) and ``maps`` (1, C, S, S). ``ModelMetadata`` (class names, model
name, input size, mean / std, checkpoint and state-dict sha256) is stored in the model's
``metadata_props``, so an ONNX Runtime backend rebuilds everything from the ``.onnx`` alone.

Exporter: the TorchScript-based ``torch.onnx.export(..., dynamo=False)``. Pinned and verified with
torch 2.14.1, onnx 1.23.2 and onnxruntime 1.31.1 (opset 17; ``LayerNormalization`` is native from
opset 17 on). The dynamo exporter needs ``onnxscript``, which is not part of our requirements.
``onnx`` and ``onnxruntime`` are optional dependencies (``pip install affordance_ros[export]``)
imported inside the functions.
"""
from __future__ import annotations

import importlib
import io
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from affordance_core.export.wrapper import (ExportWrapper, ModelMetadata, file_sha256,
                                            model_metadata)

__all__ = ['export_onnx', 'export_checkpoint_onnx', 'cached_onnx_export', 'read_onnx_metadata',
           'verify_onnx', 'INPUT_NAME', 'OUTPUT_NAMES', 'DEFAULT_OPSET', 'MIN_OPSET']

logger = logging.getLogger(__name__)

INPUT_NAME = 'images'
OUTPUT_NAMES = ('cams', 'maps')
DEFAULT_OPSET = 17
MIN_OPSET = 17
EXPORT_HINT = 'pip install "onnx>=1.16" "onnxruntime>=1.18"'


def _require(module: str) -> Any:
    """Import an optional dependency or raise ImportError with the pip command."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f'{module} is needed for ONNX export / inference; install it with: '
                          f'{EXPORT_HINT}') from None


def _atomic_write_bytes(data: bytes, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def export_onnx(model: nn.Module, path: str | Path, *, image_size: int = 224,
                opset: int = DEFAULT_OPSET, checkpoint_sha256: str | None = None,
                check: bool = True) -> Path:
    """Export the inference head of ``model`` to ``path`` (written atomically).

    Args:
        model: an affordance model with ``cams`` (e.g. from ``load_checkpoint``); it is traced in
            eval mode on its current device.
        path: destination ``.onnx`` file; parent folders are created.
        image_size: fixed input side S.
        opset: ONNX opset (>= 17).
        checkpoint_sha256: sha256 of the checkpoint file ``model`` came from (stored in the
            metadata; ``export_checkpoint_onnx`` fills it).
        check: run ``onnx.checker.check_model`` on the result.

    Returns:
        ``path`` as a Path.

    Raises:
        ValueError: opset below 17 or a bad image size.
        ImportError: ``onnx`` is not installed.
    """
    onnx = _require('onnx')
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f'opset must be an int >= {MIN_OPSET}, got {opset!r}')
    path = Path(path)
    model.eval()
    wrapper = ExportWrapper(model, image_size=image_size)
    meta = model_metadata(model, image_size=image_size, checkpoint_sha256=checkpoint_sha256)
    param = next(model.parameters())
    example = torch.zeros(1, 3, image_size, image_size, device=param.device)
    buf = io.BytesIO()
    with torch.no_grad():
        wrapper(example)  # fills per-size constants (the backbone's resized position grid)
    with torch.no_grad(), warnings.catch_warnings():
        # shape checks in the model become trace constants (the input shape is fixed), and the
        # TorchScript exporter announces its deprecation: both are expected here
        warnings.simplefilter('ignore', torch.jit.TracerWarning)
        warnings.filterwarnings('ignore', message='.*TorchScript-based ONNX export.*')
        warnings.filterwarnings('ignore', message='.*will be removed.*')
        torch.onnx.export(wrapper, (example,), buf, dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                          do_constant_folding=True, export_params=True)
    proto = onnx.load_from_string(buf.getvalue())
    for key, value in meta.to_props().items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = 'affordance_ros'
    proto.doc_string = (f'{meta.model_name}: images (1,3,{image_size},{image_size}) -> '
                        f'cams (1,{len(meta.classes)},{meta.grid_size[0]},{meta.grid_size[1]}), '
                        f'maps (1,{len(meta.classes)},{image_size},{image_size})')
    if check:
        onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    _atomic_write_bytes(data, path)
    logger.info('exported %s to %s (opset %d, %.1f MB)', meta.model_name, path, opset,
                len(data) / 1e6)
    return path


INT8_PARITY_BUDGET = 0.1  # max |Δ| of the normalised maps accepted for an int8 export


def quantize_onnx(src: str | Path, dst: str | Path) -> Path:
    """Dynamic int8 quantization of an exported model's MatMul / Gemm weights (CPU speed-up).

    ``onnxruntime.quantization.quantize_dynamic`` (per-tensor int8 weights, activations quantized
    on the fly); convolutions and everything else stay float32. The affordance metadata is
    copied and ``affordance_quantization = int8-dynamic`` added. Accuracy is not bit-exact: check
    it with :func:`verify_onnx` against :data:`INT8_PARITY_BUDGET` (measured on the AGD-Synth
    demo LOCATE: max |Δmaps| 0.05, mean 0.005).

    Raises:
        FileNotFoundError: ``src`` does not exist.
        ImportError: onnxruntime (with its quantization tools) is not installed.
    """
    onnx = _require('onnx')
    _require('onnxruntime')
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f'ONNX model not found: {src}')
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + '.tmp')
    quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8,
                     op_types_to_quantize=['MatMul', 'Gemm'],
                     extra_options={'DefaultTensorType': onnx.TensorProto.FLOAT})
    proto = onnx.load(str(tmp))
    tmp.unlink()
    source = onnx.load(str(src), load_external_data=False)
    have = {p.key for p in proto.metadata_props}
    for prop in source.metadata_props:
        if prop.key not in have:
            entry = proto.metadata_props.add()
            entry.key, entry.value = prop.key, prop.value
    entry = proto.metadata_props.add()
    entry.key, entry.value = 'affordance_quantization', 'int8-dynamic'
    proto.producer_name = 'affordance_ros'
    data = proto.SerializeToString()
    _atomic_write_bytes(data, dst)
    logger.info('quantized %s -> %s (%.1f MB)', src, dst, len(data) / 1e6)
    return dst


def export_checkpoint_onnx(checkpoint: str | Path, path: str | Path, *, image_size: int = 224,
                           opset: int = DEFAULT_OPSET) -> Path:
    """Load ``checkpoint`` (CPU) and export it with its file sha256 in the metadata.

    Raises:
        FileNotFoundError: the checkpoint does not exist.
        CheckpointError: it is not a loadable affordance_ros checkpoint.
    """
    from affordance_core.checkpoint import load_checkpoint

    model = load_checkpoint(checkpoint, map_location='cpu')
    return export_onnx(model, path, image_size=image_size, opset=opset,
                       checkpoint_sha256=file_sha256(checkpoint))


def read_onnx_metadata(path: str | Path) -> ModelMetadata:
    """``ModelMetadata`` stored in an exported ``.onnx`` (read with ``onnx``, weights skipped).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file carries no affordance_ros metadata.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'ONNX model not found: {path}')
    onnx = _require('onnx')
    proto = onnx.load(str(path), load_external_data=False)
    return ModelMetadata.from_props({p.key: p.value for p in proto.metadata_props},
                                    source=str(path))


def verify_onnx(model: nn.Module, path: str | Path, *, num_inputs: int = 1,
                seed: int = 0) -> dict[str, float]:
    """Max abs difference between PyTorch and ONNX Runtime (CPU) on random normalised images.

    Returns:
        ``{'cams': max |Δcams|, 'maps': max |Δmaps|, 'cams_mean': mean |Δcams|, 'maps_mean':
        mean |Δmaps|}`` over ``num_inputs`` random images.
    """
    ort = _require('onnxruntime')
    meta = read_onnx_metadata(path)
    wrapper = ExportWrapper(model.eval(), image_size=meta.image_size)
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    gen = torch.Generator().manual_seed(seed)
    param = next(model.parameters())
    err = {'cams': 0.0, 'maps': 0.0}
    for _ in range(num_inputs):
        x = torch.randn(1, 3, meta.image_size, meta.image_size, generator=gen)
        with torch.no_grad():
            ref = [t.cpu().numpy() for t in wrapper(x.to(param.device))]
        out = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x.numpy()})
        for name, a, b in zip(OUTPUT_NAMES, ref, out):
            err[name] = max(err[name], float(np.abs(a - b).max()))
            err[f'{name}_mean'] = err.get(f'{name}_mean', 0.0) + float(
                np.abs(a - b).mean()) / num_inputs
    return err


EXPORT_FORMAT_VERSION = 1  # bump when ExportWrapper's graph changes: invalidates cached exports


def cached_onnx_export(checkpoint: str | Path, cache_dir: str | Path, *, image_size: int = 224,
                       opset: int = DEFAULT_OPSET) -> Path:
    """The ONNX export of ``checkpoint`` in ``cache_dir``, exported on first use.

    The file name is keyed by the checkpoint's sha256, the image size, the opset and the export
    format version: ``<sha256[:16]>-s<S>-op<opset>-v<version>.onnx``; a changed checkpoint gets a
    new file, a cached one is reused without loading the model.

    Raises:
        FileNotFoundError: the checkpoint does not exist.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f'checkpoint not found: {checkpoint}')
    sha = file_sha256(checkpoint)
    path = Path(cache_dir) / f'{sha[:16]}-s{image_size}-op{opset}-v{EXPORT_FORMAT_VERSION}.onnx'
    if path.is_file():
        logger.info('reusing cached ONNX export %s', path)
        return path
    from affordance_core.checkpoint import load_checkpoint

    logger.info('exporting %s to ONNX (first use): %s', checkpoint, path)
    model = load_checkpoint(checkpoint, map_location='cpu')
    return export_onnx(model, path, image_size=image_size, opset=opset, checkpoint_sha256=sha)
