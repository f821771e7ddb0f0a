"""Inference backends: one interface over PyTorch, ONNX Runtime and TensorRT.

Every backend maps a batch of ImageNet-normalised images to the heatmaps of all classes::

    cams, maps = backend(images)   # images (B, 3, S, S) float32 numpy
                                   # cams (B, C, h, w) raw CAMs, maps (B, C, S, S) in [0, 1)

and carries what the caller needs for pre- and post-processing: ``name``, ``device``,
``classes``, ``input_size``, ``mean``, ``std``, ``model_name`` (plus ``metadata``, the full
``ModelMetadata``). All of them run ``export.wrapper.ExportWrapper``, so their outputs agree
(ONNX Runtime vs PyTorch: max abs error on the maps below 1e-4).

``create_backend(kind='auto', ...)`` picks the fastest available runtime:

1. ``tensorrt``: a CUDA GPU, ``torch_tensorrt`` and an engine (given, cached or buildable from
   the checkpoint) are present;
2. ``onnxruntime``: importable; a checkpoint is exported once to a cached ``.onnx`` keyed by its
   sha256. On a CUDA machine it is chosen only with ONNX Runtime's CUDA provider, otherwise
   PyTorch on the GPU is faster;
3. ``torch``: PyTorch eager (``compile=True``: ``torch.compile``, CUDA graphs on CUDA).

A failing choice is logged and the next one is tried.
"""
from __future__ import annotations

import abc
import importlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from affordance_core.export.wrapper import (ExportWrapper, ModelMetadata, file_sha256,
                                            model_metadata)

__all__ = ['Backend', 'TorchBackend', 'OnnxRuntimeBackend', 'TensorRTBackend', 'create_backend',
           'available_backends', 'default_cache_dir', 'resolve_device', 'BACKEND_KINDS']

logger = logging.getLogger(__name__)

BACKEND_KINDS = ('auto', 'torch', 'onnxruntime', 'tensorrt')
ORT_HINT = 'pip install onnxruntime (or onnxruntime-gpu for CUDA)'


def default_cache_dir() -> Path:
    """``$AFFORDANCE_CACHE_DIR`` if set, else ``~/.cache/affordance_ros``."""
    env = os.environ.get('AFFORDANCE_CACHE_DIR')
    return Path(env).expanduser() if env else Path.home() / '.cache' / 'affordance_ros'


def resolve_device(device: str | torch.device) -> str:
    """'auto' -> 'cuda' when a GPU is visible else 'cpu'; validates explicit devices.

    Raises:
        ValueError: not a torch device, or a CUDA device without CUDA.
    """
    if str(device) == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a torch device (auto, cpu, cuda, cuda:N)"
                         ) from None
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available on this machine; use 'cpu' "
                         "or 'auto'")
    if dev.type not in ('cpu', 'cuda'):
        raise ValueError(f"device {device!r}: only cpu and cuda devices are supported")
    return str(dev)


def _import_onnxruntime() -> Any:
    try:
        return importlib.import_module('onnxruntime')
    except ImportError:
        raise ImportError(f'the onnxruntime backend needs onnxruntime; install it with: '
                          f'{ORT_HINT}') from None


def _onnxruntime_available() -> bool:
    try:
        _import_onnxruntime()
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------------------------
# Interface
# ----------------------------------------------------------------------------------------------
class Backend(abc.ABC):
    """Common interface: ``backend(images) -> (cams, maps)`` as numpy arrays.

    Attributes:
        name: 'torch', 'onnxruntime' or 'tensorrt'.
        device: where it runs ('cpu', 'cuda:0', ...).
        metadata: ``ModelMetadata`` (classes, input size, normalisation, hashes).
        classes, input_size, mean, std, model_name, num_classes, grid_size: from ``metadata``.
    """

    name = 'backend'

    def __init__(self, metadata: ModelMetadata, device: str) -> None:
        self.metadata = metadata
        self.device = device

    # ------------------------------------------------------------------ metadata
    @property
    def classes(self) -> tuple[str, ...]:
        return self.metadata.classes

    @property
    def num_classes(self) -> int:
        return len(self.metadata.classes)

    @property
    def input_size(self) -> int:
        return self.metadata.image_size

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.metadata.grid_size

    @property
    def mean(self) -> tuple[float, float, float]:
        return self.metadata.mean

    @property
    def std(self) -> tuple[float, float, float]:
        return self.metadata.std

    @property
    def model_name(self) -> str:
        return self.metadata.model_name

    # ------------------------------------------------------------------ running
    def _check(self, images: Any) -> np.ndarray:
        """(B, 3, S, S) float32 C-contiguous numpy array, or ValueError saying what is wrong."""
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu().numpy()
        if not isinstance(images, np.ndarray):
            raise ValueError(f'{self.name} backend expects a numpy array (B, 3, S, S), got '
                             f'{type(images).__name__}')
        s = self.input_size
        if images.ndim != 4 or images.shape[1:] != (3, s, s) or images.shape[0] < 1:
            raise ValueError(f'{self.name} backend expects images of shape (B, 3, {s}, {s}), '
                             f'got {images.shape}')
        if not np.issubdtype(images.dtype, np.floating):
            raise ValueError(f'{self.name} backend expects ImageNet-normalised float images, got '
                             f'dtype {images.dtype}; preprocess uint8 frames with '
                             f'data.transforms.preprocess_rgb')
        return np.ascontiguousarray(images, dtype=np.float32)

    @abc.abstractmethod
    def _run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Backend-specific inference on validated (B, 3, S, S) float32 images."""

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Heatmaps of every class.

        Args:
            images: (B, 3, S, S) float32 ImageNet-normalised images (S = ``input_size``).

        Returns:
            cams (B, C, h, w) float32 raw CAMs; maps (B, C, S, S) float32 in [0, 1).
        """
        return self._run(self._check(images))

    def warmup(self, n: int = 3) -> float:
        """Run ``n`` batch-1 inferences on a dummy image (compilation, allocations, CUDA graphs).

        Returns:
            Seconds spent.
        """
        start = time.perf_counter()
        dummy = np.zeros((1, 3, self.input_size, self.input_size), dtype=np.float32)
        for _ in range(max(0, int(n))):
            self(dummy)
        return time.perf_counter() - start

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(model={self.model_name!r}, device={self.device!r}, '
                f'classes={len(self.classes)}, input_size={self.input_size})')


# ----------------------------------------------------------------------------------------------
# PyTorch
# ----------------------------------------------------------------------------------------------
class TorchBackend(Backend):
    """PyTorch eager (or ``torch.compile``) execution of ``ExportWrapper(model)``.

    Args:
        model: an affordance model with ``cams``; moved to ``device`` and put in eval mode.
        device: 'cpu', 'cuda', 'cuda:N' or 'auto'.
        compile: wrap in ``torch.compile`` (mode 'reduce-overhead', i.e. CUDA graphs, on CUDA;
            the default mode on CPU). If compilation fails at the first call the backend logs a
            warning and stays eager.
        image_size: input side S.
        checkpoint_sha256: stored in the metadata.
    """

    name = 'torch'

    def __init__(self, model: nn.Module, *, device: str = 'cpu', compile: bool = False,
                 image_size: int = 224, checkpoint_sha256: str | None = None) -> None:
        dev = resolve_device(device)
        model = model.to(dev).eval()
        super().__init__(model_metadata(model, image_size=image_size,
                                        checkpoint_sha256=checkpoint_sha256), dev)
        self.wrapper = ExportWrapper(model, image_size=image_size)
        self.compiled = False
        self._fn: Any = self.wrapper
        if compile:
            mode = 'reduce-overhead' if torch.device(dev).type == 'cuda' else None
            try:
                self._fn = torch.compile(self.wrapper, mode=mode)
                self.compiled = True
            except Exception as exc:  # torch.compile unsupported on this platform
                logger.warning('torch.compile unavailable (%s); running eager', exc)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, *, device: str = 'cpu',
                        compile: bool = False, image_size: int = 224) -> TorchBackend:
        """Load ``checkpoint`` and wrap it (raises FileNotFoundError / CheckpointError)."""
        from affordance_core.checkpoint import load_checkpoint

        model = load_checkpoint(checkpoint, map_location='cpu')
        return cls(model, device=device, compile=compile, image_size=image_size,
                   checkpoint_sha256=file_sha256(checkpoint))

    def _run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = torch.from_numpy(images).to(self.device)
        with torch.no_grad():
            try:
                cams, maps = self._fn(x)
            except Exception as exc:
                if not self.compiled:
                    raise
                logger.warning('torch.compile failed at run time (%s: %s); falling back to '
                               'eager', type(exc).__name__, str(exc).splitlines()[0][:200])
                self._fn, self.compiled = self.wrapper, False
                cams, maps = self._fn(x)
            # copy out at once: CUDA-graph outputs are overwritten by the next replay
            return cams.cpu().numpy(), maps.cpu().numpy()


# ----------------------------------------------------------------------------------------------
# ONNX Runtime
# ----------------------------------------------------------------------------------------------
class OnnxRuntimeBackend(Backend):
    """ONNX Runtime session on an ``.onnx`` from ``export.onnx.export_onnx``.

    Metadata (classes, input size, mean / std, model name) is read from the ONNX file alone.

    Args:
        onnx_path: exported model.
        device: 'cpu' (CPUExecutionProvider), 'cuda' / 'cuda:N' (CUDAExecutionProvider, needs
            onnxruntime-gpu) or 'auto' (CUDA provider when available, else CPU).
        threads: intra-op threads (None: ONNX Runtime's default, all cores).

    Raises:
        FileNotFoundError: no such file.
        ImportError: onnxruntime is not installed.
        ValueError: the file has no affordance_ros metadata, or 'cuda' was asked for without
            the CUDA provider.
    """

    name = 'onnxruntime'

    def __init__(self, onnx_path: str | Path, *, device: str = 'auto',
                 threads: int | None = None) -> None:
        path = Path(onnx_path)
        if not path.is_file():
            raise FileNotFoundError(f'ONNX model not found: {path}; export one with '
                                    f'affordance-export --format onnx')
        ort = _import_onnxruntime()
        available = ort.get_available_providers()
        want = str(device)
        if want.startswith('cuda') and 'CUDAExecutionProvider' not in available:
            raise ValueError(f'device {device!r}: this onnxruntime has no CUDAExecutionProvider '
                             f'(available: {available}); install onnxruntime-gpu or use cpu')
        providers: list[Any] = ['CPUExecutionProvider']
        if want.startswith('cuda') or (want == 'auto' and 'CUDAExecutionProvider' in available):
            index = torch.device(want).index if want.startswith('cuda') else None
            cuda_opts = {'device_id': index or 0}
            providers = [('CUDAExecutionProvider', cuda_opts), 'CPUExecutionProvider']
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = int(threads)
        # worker threads spin while a run is in progress (between its operators: 8-16 % faster
        # than sleeping on 2 cores, see bench/latency.py) and stop as soon as it returns, so the
        # heatmap / grasp / 3-D stages that follow (and the rest of the robot) get the CPU back
        options.add_session_config_entry('session.intra_op.allow_spinning', '1')
        options.add_session_config_entry('session.force_spinning_stop', '1')
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        props = dict(self.session.get_modelmeta().custom_metadata_map)
        metadata = ModelMetadata.from_props(props, source=str(path))
        used = self.session.get_providers()
        dev = 'cpu'
        if used and used[0] == 'CUDAExecutionProvider':
            dev = f"cuda:{providers[0][1]['device_id']}"
        super().__init__(metadata, dev)
        self.path = path
        self.providers = used
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None

    def _run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.fixed_batch in (None, images.shape[0]):
            cams, maps = self.session.run(self.output_names, {self.input_name: images})
            return cams, maps
        outs = [self.session.run(self.output_names, {self.input_name: images[i:i + 1]})
                for i in range(images.shape[0])]
        return (np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs]))


# ----------------------------------------------------------------------------------------------
# TensorRT
# ----------------------------------------------------------------------------------------------
class TensorRTBackend(Backend):
    """A saved Torch-TensorRT engine (``export.tensorrt.build_engine``), loaded without rebuild.

    Args:
        engine_path: ``engine.ep`` with its ``engine.json`` sidecar beside it.
        device: CUDA device.

    Raises:
        FileNotFoundError: engine or sidecar missing.
        TensorRTUnavailableError: torch_tensorrt / TensorRT / CUDA missing (names the install).
        EngineMismatchError: the engine was built for another GPU or library versions.
    """

    name = 'tensorrt'

    def __init__(self, engine_path: str | Path, *, device: str = 'cuda') -> None:
        from affordance_core.export import tensorrt as trt_export

        path = Path(engine_path)
        sidecar = trt_export.read_sidecar(path)  # FileNotFoundError before the import guard
        trt_export.require_torch_tensorrt()
        dev = resolve_device(device if device != 'auto' else 'cuda')
        reasons = trt_export.key_mismatches(sidecar['key'], trt_export.runtime_environment(dev),
                                            fields=trt_export.ENV_FIELDS)
        if reasons:
            raise trt_export.EngineMismatchError(
                f'{path} was built for another setup ({"; ".join(reasons)}); rebuild it with '
                f'affordance-export --format tensorrt, or pass the checkpoint to create_backend '
                f'so that it is rebuilt automatically')
        super().__init__(ModelMetadata.from_json(sidecar['metadata']), dev)
        self.path = path
        self.precision = sidecar['key'].get('precision', '')
        self.module = trt_export.load_engine(path)

    def _run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cams, maps = [], []
        with torch.no_grad():
            for i in range(images.shape[0]):  # the engine has a fixed batch of 1
                c, m = self.module(torch.from_numpy(images[i:i + 1]).to(self.device))
                cams.append(c.float().cpu().numpy())
                maps.append(m.float().cpu().numpy())
        return np.concatenate(cams), np.concatenate(maps)


# ----------------------------------------------------------------------------------------------
# Factory
# ----------------------------------------------------------------------------------------------
def available_backends(device: str = 'auto') -> list[str]:
    """Backend kinds whose runtime is importable here for ``device`` (fastest first)."""
    from affordance_core.export.tensorrt import tensorrt_available

    dev = resolve_device(device)
    kinds = []
    if dev.startswith('cuda') and tensorrt_available():
        kinds.append('tensorrt')
    if _onnxruntime_available():
        kinds.append('onnxruntime')
    kinds.append('torch')
    return kinds


def _tensorrt_backend(checkpoint: Path | None, engine_path: Path | None, cache_dir: Path,
                      precision: str, image_size: int, device: str) -> TensorRTBackend:
    from affordance_core.export import tensorrt as trt_export

    trt_export.require_torch_tensorrt()  # the install hint comes first
    if device == 'cpu':
        raise ValueError("the tensorrt backend runs on CUDA devices only; use device='cuda'")
    dev = resolve_device(device if device != 'auto' else 'cuda')
    if engine_path is not None:
        reasons = trt_export.check_engine(engine_path, trt_export.runtime_environment(dev))
        if not reasons:
            return TensorRTBackend(engine_path, device=dev)
        if checkpoint is None:
            raise trt_export.EngineMismatchError(
                f'{engine_path} was built for another setup ({"; ".join(reasons)}); pass the '
                f'checkpoint too so that it is rebuilt, or rebuild it with affordance-export')
        logger.warning('engine %s does not fit this machine (%s); rebuilding from %s',
                       engine_path, '; '.join(reasons), checkpoint)
    if checkpoint is None:
        raise ValueError('the tensorrt backend needs engine_path=... or checkpoint=...')
    path = trt_export.load_or_build_engine(checkpoint=checkpoint, cache_dir=cache_dir / 'tensorrt',
                                           precision=precision, image_size=image_size,
                                           device=dev)
    return TensorRTBackend(path, device=dev)


def _onnxruntime_backend(checkpoint: Path | None, onnx_path: Path | None, cache_dir: Path,
                         image_size: int, opset: int, device: str,
                         threads: int | None) -> OnnxRuntimeBackend:
    if onnx_path is None:
        if checkpoint is None:
            raise ValueError('the onnxruntime backend needs onnx_path=... or checkpoint=...')
        _import_onnxruntime()  # fail before a pointless export
        from affordance_core.export.onnx import cached_onnx_export

        onnx_path = cached_onnx_export(checkpoint, cache_dir / 'onnx', image_size=image_size,
                                       opset=opset)
    return OnnxRuntimeBackend(onnx_path, device=device, threads=threads)


def create_backend(kind: str = 'auto', *, checkpoint: str | Path | None = None,
                   onnx_path: str | Path | None = None, engine_path: str | Path | None = None,
                   device: str = 'auto', cache_dir: str | Path | None = None,
                   image_size: int = 224, precision: str = 'fp16', opset: int = 17,
                   compile: bool = False, threads: int | None = None) -> Backend:
    """Build an inference backend.

    Args:
        kind: 'auto' (fastest available, see the module docstring), 'torch', 'onnxruntime' or
            'tensorrt'.
        checkpoint: affordance_ros checkpoint (needed by 'torch'; 'onnxruntime' / 'tensorrt'
            export or build from it when no ``onnx_path`` / ``engine_path`` is given).
        onnx_path: an exported ``.onnx`` (onnxruntime).
        engine_path: a saved engine ``engine.ep`` (tensorrt).
        device: 'auto', 'cpu', 'cuda' or 'cuda:N'.
        cache_dir: where exported ONNX files (``onnx/``) and engines (``tensorrt/``) are cached
            (default ``$AFFORDANCE_CACHE_DIR`` or ``~/.cache/affordance_ros``).
        image_size: input side S for exports / builds.
        precision: TensorRT precision, 'fp16' (default) or 'fp32'.
        opset: ONNX opset for exports.
        compile: torch backend only: ``torch.compile`` (CUDA graphs on CUDA).
        threads: onnxruntime intra-op threads (None: its default).

    Raises:
        ValueError: unknown ``kind`` (the message lists the kinds), bad device, or no input.
        FileNotFoundError: a given checkpoint / ONNX / engine file does not exist.
        TensorRTUnavailableError: kind='tensorrt' without torch_tensorrt / TensorRT / CUDA.
        ImportError: kind='onnxruntime' without onnxruntime.
    """
    if kind not in BACKEND_KINDS:
        raise ValueError(f"unknown backend kind {kind!r}; expected one of "
                         f"{', '.join(BACKEND_KINDS)}")
    paths: dict[str, Path | None] = {}
    for arg, value, what in (('checkpoint', checkpoint, 'checkpoint'),
                             ('onnx_path', onnx_path, 'ONNX model'),
                             ('engine_path', engine_path, 'TensorRT engine')):
        paths[arg] = Path(value) if value is not None else None
        if value is not None and not Path(value).is_file():
            raise FileNotFoundError(f'{what} not found: {value}')
    ckpt, onnx_file, engine = paths['checkpoint'], paths['onnx_path'], paths['engine_path']
    if ckpt is None and onnx_file is None and engine is None:
        raise ValueError('create_backend needs checkpoint=..., onnx_path=... or engine_path=...')
    dev = resolve_device(device)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()

    if kind == 'torch':
        if ckpt is None:
            raise ValueError('the torch backend needs checkpoint=...')
        return TorchBackend.from_checkpoint(ckpt, device=dev, compile=compile,
                                            image_size=image_size)
    if kind == 'onnxruntime':
        return _onnxruntime_backend(ckpt, onnx_file, cache, image_size, opset,
                                    device if device == 'auto' else dev, threads)
    if kind == 'tensorrt':
        return _tensorrt_backend(ckpt, engine, cache, precision, image_size,
                                 'cuda' if device == 'auto' else dev)

    # auto: fastest first, each failure logged
    from affordance_core.export.tensorrt import tensorrt_available

    cuda = dev.startswith('cuda')
    if cuda and (engine is not None or ckpt is not None) and tensorrt_available():
        try:
            return _tensorrt_backend(ckpt, engine, cache, precision, image_size, dev)
        except Exception as exc:
            logger.warning('auto: TensorRT backend failed (%s: %s); trying the next one',
                           type(exc).__name__, exc)
    if (onnx_file is not None or ckpt is not None) and _onnxruntime_available():
        ort = _import_onnxruntime()
        ort_cuda = 'CUDAExecutionProvider' in ort.get_available_providers()
        if cuda and not ort_cuda and ckpt is not None:
            logger.info('auto: onnxruntime has no CUDA provider; PyTorch on %s is faster', dev)
        else:
            try:
                return _onnxruntime_backend(ckpt, onnx_file, cache, image_size, opset,
                                            dev if cuda else 'cpu', threads)
            except Exception as exc:
                if ckpt is None:
                    raise
                logger.warning('auto: onnxruntime backend failed (%s: %s); using torch',
                               type(exc).__name__, exc)
    if ckpt is None:
        raise ValueError('auto: no available runtime can use the given file (TensorRT needs a '
                         'CUDA GPU and torch_tensorrt, ONNX Runtime an .onnx and onnxruntime); '
                         'pass checkpoint=... to fall back to the torch backend')
    return TorchBackend.from_checkpoint(ckpt, device=dev, compile=compile, image_size=image_size)
