"""TensorRT engines through Torch-TensorRT (dynamo / ahead-of-time path) and their disk cache.

``build_engine`` compiles ``ExportWrapper(model)`` for a fixed (1, 3, S, S) float32 input with
``torch_tensorrt.compile(ir='dynamo', ...)`` and saves it with ``torch_tensorrt.save(...,
output_format='exported_program')``: the TensorRT engine is serialised inside the ExportedProgram
as a ``tensorrt::execute_engine`` node, so a robot loads it with
``torch.export.load(...).module()`` (after ``import torch_tensorrt``, which registers the C++
runtime) without recompiling.

Precision (``ros2-conventions.md`` §4.5: ship FP16): FP16 casts a copy of the model to float16
and the wrapper casts the input to float16 and the CAMs back to float32 (upsampling and min-max
stay in float32). This explicit typing gives an FP16 engine with every Torch-TensorRT version:
recent ones type the network strictly from the graph (``use_explicit_typing``, where
``enabled_precisions`` is deprecated or gone), older ones take ``enabled_precisions``;
``precision_settings`` picks the arguments the installed ``compile`` accepts.

Engine cache (§4.3): Torch-TensorRT's own cache hashes neither the GPU nor the TensorRT version,
and an engine is only valid for the TensorRT version and GPU architecture it was built with. Ours
keys a directory by the model hash (sha256 of the checkpoint file, or of the state dict), the
input shape, the precision, the GPU name and compute capability and the TensorRT, torch-tensorrt
and torch versions; a JSON sidecar beside the engine repeats the key and the ``ModelMetadata``.
``load_or_build_engine`` reuses a matching engine and otherwise (re)builds it, logging why.

TensorRT is not installable on our development machines (``resources.md`` §8): everything that
needs it imports ``torch_tensorrt`` inside the function and raises ``TensorRTUnavailableError``
with the install command; the key logic is pure and tested without it.
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import torch
from torch import nn

from affordance_core.export.wrapper import (ExportWrapper, ModelMetadata, file_sha256,
                                            model_metadata, state_dict_sha256)

__all__ = ['TensorRTUnavailableError', 'EngineMismatchError', 'require_torch_tensorrt',
           'tensorrt_available', 'runtime_environment', 'engine_key', 'key_digest',
           'key_mismatches', 'engine_dir', 'sidecar_path', 'read_sidecar', 'write_sidecar',
           'check_engine', 'precision_settings', 'build_engine', 'load_or_build_engine',
           'load_engine', 'default_engine_cache_dir', 'ENGINE_FILE', 'PRECISIONS', 'KEY_FIELDS',
           'ENV_FIELDS', 'INSTALL_HINT']

logger = logging.getLogger(__name__)

ENGINE_FILE = 'engine.ep'
SIDECAR_FORMAT = 'affordance_ros.tensorrt_engine'
SIDECAR_VERSION = 1
PRECISIONS = ('fp16', 'fp32')
ENV_FIELDS = ('gpu_name', 'compute_capability', 'tensorrt_version', 'torch_tensorrt_version',
              'torch_version')
KEY_FIELDS = ('model_sha256', 'input_shape', 'precision') + ENV_FIELDS
INSTALL_HINT = ('pip install torch-tensorrt (the release built for your torch version) together '
                'with the TensorRT libraries (libnvinfer, e.g. pip install tensorrt, or JetPack '
                'on Jetson), on a machine with an NVIDIA CUDA GPU')

Builder = Callable[..., Path]


class TensorRTUnavailableError(ImportError, RuntimeError):
    """torch_tensorrt / TensorRT / a CUDA GPU is missing (both an ImportError and RuntimeError)."""


class EngineMismatchError(RuntimeError):
    """A saved engine was built for another GPU, TensorRT or torch version."""


# ----------------------------------------------------------------------------------------------
# Availability
# ----------------------------------------------------------------------------------------------
def require_torch_tensorrt(need_cuda: bool = True) -> Any:
    """Import ``torch_tensorrt`` (registers its runtime ops) or raise a clear error.

    Raises:
        TensorRTUnavailableError: torch_tensorrt (or libnvinfer) cannot be imported, or
            ``need_cuda`` and no CUDA GPU is visible. The message names the install command.
    """
    try:
        import torch_tensorrt
    except Exception as exc:  # ImportError, or OSError from a missing libnvinfer
        detail = str(exc).splitlines()[0] if str(exc) else 'no detail'
        raise TensorRTUnavailableError(
            f'the TensorRT backend needs torch_tensorrt, which cannot be imported '
            f'({type(exc).__name__}: {detail}); install it with: {INSTALL_HINT}') from None
    if need_cuda and not torch.cuda.is_available():
        raise TensorRTUnavailableError(
            'the TensorRT backend needs an NVIDIA CUDA GPU, and none is visible '
            '(torch.cuda.is_available() is False); use the onnxruntime or torch backend')
    return torch_tensorrt


def tensorrt_available() -> bool:
    """True when torch_tensorrt imports and a CUDA GPU is visible."""
    try:
        require_torch_tensorrt()
    except TensorRTUnavailableError as exc:
        logger.debug('TensorRT unavailable: %s', exc)
        return False
    return True


def runtime_environment(device: str | torch.device | None = None) -> dict[str, str]:
    """The engine-relevant facts of this machine: GPU, compute capability, library versions.

    Args:
        device: CUDA device (default: the current one).

    Returns:
        ``{field: str}`` for every name in ``ENV_FIELDS``.
    """
    trt_torch = require_torch_tensorrt()
    dev = torch.device(device if device is not None else 'cuda')
    if dev.type != 'cuda':
        raise ValueError(f'TensorRT engines run on CUDA devices, got {dev}')
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    try:
        import tensorrt
        trt_version = str(tensorrt.__version__)
    except Exception:  # the bindings may be importable only through torch_tensorrt
        trt_version = 'unknown'
    return {
        'gpu_name': str(props.name),
        'compute_capability': f'{props.major}.{props.minor}',
        'tensorrt_version': trt_version,
        'torch_tensorrt_version': str(getattr(trt_torch, '__version__', 'unknown')),
        'torch_version': str(torch.__version__),
    }


# ----------------------------------------------------------------------------------------------
# Cache keys (pure functions)
# ----------------------------------------------------------------------------------------------
def _check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of "
                         f"{', '.join(PRECISIONS)}")
    return precision


def engine_key(model_sha256: str, *, image_size: int, precision: str,
               env: dict[str, str]) -> dict[str, Any]:
    """The cache key of an engine: model hash, input shape, precision and ``env`` fields.

    Raises:
        ValueError: unknown precision, or ``env`` lacks one of ``ENV_FIELDS``.
    """
    _check_precision(precision)
    missing = [f for f in ENV_FIELDS if f not in env]
    if missing:
        raise ValueError(f'environment lacks {missing}; build it with runtime_environment()')
    key: dict[str, Any] = {'model_sha256': str(model_sha256),
                           'input_shape': [1, 3, int(image_size), int(image_size)],
                           'precision': precision}
    key.update({f: str(env[f]) for f in ENV_FIELDS})
    return key


def key_digest(key: dict[str, Any]) -> str:
    """Short stable hash (20 hex digits) of a key: the cache directory name."""
    blob = json.dumps({f: key.get(f) for f in KEY_FIELDS}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def key_mismatches(stored: dict[str, Any], wanted: dict[str, Any],
                   fields: Collection[str] = KEY_FIELDS) -> list[str]:
    """Human-readable differences ``'<field>: engine <a>, now <b>'`` (empty list: match)."""
    return [f'{f}: engine {stored.get(f)!r}, now {wanted.get(f)!r}'
            for f in fields if stored.get(f) != wanted.get(f)]


def engine_dir(cache_dir: str | Path, key: dict[str, Any]) -> Path:
    """``<cache_dir>/<key_digest(key)>``: one directory per key."""
    return Path(cache_dir) / key_digest(key)


def default_engine_cache_dir() -> Path:
    """``$AFFORDANCE_CACHE_DIR/tensorrt`` (default ``~/.cache/affordance_ros/tensorrt``)."""
    env = os.environ.get('AFFORDANCE_CACHE_DIR')
    root = Path(env).expanduser() if env else Path.home() / '.cache' / 'affordance_ros'
    return root / 'tensorrt'


def sidecar_path(engine_path: str | Path) -> Path:
    """The JSON sidecar beside an engine: ``engine.ep`` -> ``engine.json``."""
    return Path(engine_path).with_suffix('.json')


def write_sidecar(engine_path: str | Path, key: dict[str, Any], metadata: ModelMetadata,
                  **info: Any) -> Path:
    """Write the sidecar (key, metadata, extra ``info``) atomically; returns its path."""
    path = sidecar_path(engine_path)
    payload = {'format': SIDECAR_FORMAT, 'version': SIDECAR_VERSION,
               'engine_file': Path(engine_path).name, 'key': key,
               'metadata': metadata.to_json(), **info}
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    with os.fdopen(fd, 'w') as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)
    return path


def read_sidecar(engine_path: str | Path) -> dict[str, Any]:
    """The sidecar of ``engine_path``.

    Raises:
        FileNotFoundError: the engine or its sidecar is missing.
        ValueError: the sidecar is not ours or is corrupt.
    """
    engine_path = Path(engine_path)
    if not engine_path.is_file():
        raise FileNotFoundError(f'TensorRT engine not found: {engine_path}; build one with '
                                f'affordance-export --format tensorrt')
    path = sidecar_path(engine_path)
    if not path.is_file():
        raise FileNotFoundError(f'engine sidecar not found: {path} (written by build_engine '
                                f'beside {engine_path.name}); rebuild the engine')
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f'{path}: corrupt engine sidecar ({exc})') from None
    if not isinstance(payload, dict) or payload.get('format') != SIDECAR_FORMAT:
        raise ValueError(f'{path}: not an affordance_ros engine sidecar')
    if not isinstance(payload.get('key'), dict) or not isinstance(payload.get('metadata'), dict):
        raise ValueError(f'{path}: engine sidecar lacks its key or metadata')
    return payload


def check_engine(engine_path: str | Path, env: dict[str, str]) -> list[str]:
    """Why the engine at ``engine_path`` cannot run in ``env`` (empty list: it can)."""
    stored = read_sidecar(engine_path)['key']
    return key_mismatches(stored, env, fields=ENV_FIELDS)


def precision_settings(compile_params: Collection[str], precision: str) -> dict[str, Any]:
    """``torch_tensorrt.compile`` precision arguments for an explicitly typed model.

    Args:
        compile_params: parameter names of the installed ``torch_tensorrt.dynamo.compile``.
        precision: 'fp16' (model cast to float16 by ``build_engine``) or 'fp32'.

    Returns:
        ``use_explicit_typing=True`` (and ``enabled_precisions={float32}`` where still accepted,
        as strongly typed builds require) when the installed version has explicit typing; else
        ``enabled_precisions`` with the wanted precision (older, weakly typed releases).
    """
    _check_precision(precision)
    params = set(compile_params)
    settings: dict[str, Any] = {}
    if 'use_explicit_typing' in params:
        settings['use_explicit_typing'] = True
        if 'enabled_precisions' in params:
            settings['enabled_precisions'] = {torch.float32}
    elif 'enabled_precisions' in params:
        settings['enabled_precisions'] = ({torch.float16} if precision == 'fp16'
                                          else {torch.float32})
    return settings


# ----------------------------------------------------------------------------------------------
# Build / load (need torch_tensorrt and a GPU)
# ----------------------------------------------------------------------------------------------
def build_engine(model: nn.Module, out_dir: str | Path, *, precision: str = 'fp16',
                 image_size: int = 224, device: str | torch.device | None = None,
                 checkpoint_sha256: str | None = None, env: dict[str, str] | None = None,
                 verify: bool = True) -> Path:
    """Compile ``ExportWrapper(model)`` into a TensorRT engine saved as an ExportedProgram.

    Args:
        model: an affordance model with ``cams`` (not modified: a copy is compiled).
        out_dir: folder for ``engine.ep`` and its sidecar ``engine.json``.
        precision: 'fp16' (default) or 'fp32'.
        image_size: fixed input side S (input (1, 3, S, S) float32).
        device: CUDA device (default: the current one).
        checkpoint_sha256: model hash for the key (default: ``state_dict_sha256(model)``).
        env: ``runtime_environment()`` (computed when None).
        verify: compare the engine with the float32 PyTorch wrapper on a random input and store
            the max abs difference of the maps in the sidecar.

    Returns:
        Path of ``engine.ep``.

    Raises:
        TensorRTUnavailableError: torch_tensorrt, TensorRT or a CUDA GPU is missing.
    """
    trt = require_torch_tensorrt()
    _check_precision(precision)
    dev = torch.device(device if device is not None else 'cuda')
    env = env or runtime_environment(dev)
    meta = model_metadata(model, image_size=image_size, checkpoint_sha256=checkpoint_sha256)
    key = engine_key(checkpoint_sha256 or meta.model_sha256, image_size=image_size,
                     precision=precision, env=env)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    engine_path = out_dir / ENGINE_FILE

    half = precision == 'fp16'
    work = copy.deepcopy(model).to(dev).eval()
    if half:
        work = work.half()
    wrapper = ExportWrapper(work, image_size=image_size,
                            compute_dtype=torch.float16 if half else None).eval()
    shape = (1, 3, image_size, image_size)
    example = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dev)
    compile_params = inspect.signature(trt.dynamo.compile).parameters
    settings = precision_settings(compile_params, precision)
    if 'device' in compile_params:
        settings['device'] = dev
    logger.info('building a %s TensorRT engine for %s on %s (%s); this takes minutes',
                precision, meta.model_name, env['gpu_name'], settings)
    start = time.perf_counter()
    with torch.no_grad():
        trt_gm = trt.compile(wrapper, ir='dynamo',
                             inputs=[trt.Input(shape, dtype=torch.float32)], **settings)
    build_s = time.perf_counter() - start
    save_params = inspect.signature(trt.save).parameters
    inputs_kw = 'arg_inputs' if 'arg_inputs' in save_params else 'inputs'
    trt.save(trt_gm, str(engine_path), output_format='exported_program',
             **{inputs_kw: [example]})
    info: dict[str, Any] = {'build_seconds': round(build_s, 1),
                            'created': time.strftime('%Y-%m-%dT%H:%M:%S%z')}
    if verify:
        with torch.no_grad():
            ref = ExportWrapper(copy.deepcopy(model).to(dev).eval(), image_size=image_size)
            want = ref(example)[1]
            got = trt_gm(example)[1]
        info['max_abs_error_maps'] = float((want - got.float()).abs().max())
        logger.info('engine vs float32 PyTorch: max |Δmaps| = %.2e', info['max_abs_error_maps'])
    write_sidecar(engine_path, key, meta, **info)
    logger.info('saved TensorRT engine %s (built in %.0f s)', engine_path, build_s)
    return engine_path


def load_engine(engine_path: str | Path) -> nn.Module:
    """Load a saved engine without recompiling: ``torch.export.load(path).module()``.

    Raises:
        FileNotFoundError: no such engine.
        TensorRTUnavailableError: torch_tensorrt (its runtime) or a CUDA GPU is missing.
    """
    engine_path = Path(engine_path)
    if not engine_path.is_file():
        raise FileNotFoundError(f'TensorRT engine not found: {engine_path}')
    require_torch_tensorrt()  # registers torch.ops.tensorrt.execute_engine
    return torch.export.load(str(engine_path)).module()


def _explain_miss(cache_dir: Path, key: dict[str, Any]) -> str:
    """Why no engine matched: the differences to cached engines of the same model, if any."""
    reasons = []
    for side in sorted(cache_dir.glob(f'*/{Path(ENGINE_FILE).stem}.json')):
        try:
            stored = json.loads(side.read_text()).get('key', {})
        except (OSError, json.JSONDecodeError, AttributeError):
            continue
        if stored.get('model_sha256') == key['model_sha256']:
            reasons.append(f'{side.parent.name}: ' + '; '.join(key_mismatches(stored, key)))
    if not reasons:
        return 'no engine cached for this model yet'
    return 'cached engines of this model do not fit: ' + ' | '.join(reasons)


def load_or_build_engine(model: nn.Module | None = None, *, checkpoint: str | Path | None = None,
                         cache_dir: str | Path | None = None, precision: str = 'fp16',
                         image_size: int = 224, device: str | torch.device | None = None,
                         env: dict[str, str] | None = None,
                         builder: Builder | None = None) -> Path:
    """The cached engine for (model, shape, precision, GPU, versions); (re)built when needed.

    A cached engine is reused only when its sidecar key equals the wanted key; a missing, corrupt
    or mismatching sidecar (other GPU, TensorRT or torch version) triggers a rebuild into the
    key's directory, logging the reason, instead of failing at load time.

    Args:
        model: the model (or give ``checkpoint``; the model is then loaded only to build).
        checkpoint: checkpoint file; its sha256 is the model hash.
        cache_dir: cache root (default ``default_engine_cache_dir()``).
        precision, image_size, device: see ``build_engine``.
        env: ``runtime_environment()`` (computed when None; tests pass a fake one).
        builder: ``build_engine``-compatible function (tests inject a fake one).

    Returns:
        Path of the engine file.
    """
    if model is None and checkpoint is None:
        raise ValueError('load_or_build_engine needs a model or a checkpoint')
    _check_precision(precision)
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise FileNotFoundError(f'checkpoint not found: {checkpoint}')
    env = env or runtime_environment(device)
    builder = builder or build_engine
    model_hash = file_sha256(checkpoint) if checkpoint is not None else state_dict_sha256(model)
    key = engine_key(model_hash, image_size=image_size, precision=precision, env=env)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_engine_cache_dir()
    out_dir = engine_dir(cache_dir, key)
    engine_path = out_dir / ENGINE_FILE
    if engine_path.is_file():
        try:
            stored = read_sidecar(engine_path)['key']
            reasons = key_mismatches(stored, key)
        except (FileNotFoundError, ValueError) as exc:
            reasons = [str(exc)]
        if not reasons:
            logger.info('reusing cached TensorRT engine %s', engine_path)
            return engine_path
        logger.warning('rebuilding TensorRT engine %s: %s', engine_path, '; '.join(reasons))
    else:
        logger.info('building TensorRT engine into %s: %s', out_dir, _explain_miss(cache_dir, key))
    if model is None:
        from affordance_core.checkpoint import load_checkpoint
        model = load_checkpoint(checkpoint, map_location='cpu')
    ckpt_hash = model_hash if checkpoint is not None else None
    sidecar_path(engine_path).unlink(missing_ok=True)  # never keep a stale or corrupt sidecar
    built = Path(builder(model, out_dir, precision=precision, image_size=image_size,
                         device=device, checkpoint_sha256=ckpt_hash, env=env))
    if not built.is_file():
        raise RuntimeError(f'the engine builder reported {built}, which does not exist')
    sidecar = read_sidecar(built) if sidecar_path(built).is_file() else {}
    extra = {k: v for k, v in sidecar.items()
             if k not in ('format', 'version', 'engine_file', 'key', 'metadata')}
    meta = (ModelMetadata.from_json(sidecar['metadata']) if 'metadata' in sidecar
            else model_metadata(model, image_size=image_size, checkpoint_sha256=ckpt_hash))
    write_sidecar(built, key, meta, **extra)  # the key this lookup will compare against
    return built
