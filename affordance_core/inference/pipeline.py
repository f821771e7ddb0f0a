"""Transport-free grounding pipeline: RGB(-D) frame -> heatmaps -> grasp points -> 3-D poses.

Example::

    pipe = GroundingPipeline.from_checkpoint('run/best.pt', backend='auto')
    result = pipe(rgb, depth=depth, K=K, actions=['hold', 'cut_with'])
    result.heatmaps['hold']          # (H, W) float32 in [0, 1]
    result.grasps[0].position        # (x, y, z) metres, RGB camera optical frame

Stages (``result.timings``, milliseconds): ``preprocess`` (input checks, frame hash,
:func:`~affordance_core.data.transforms.preprocess_rgb`, the training test transform),
``model`` (one backend call for all classes; two with ``flip_tta``), ``heatmap`` (per action:
patch-grid CAM min-max -> ``heatmaps_grid``; the backend's (S, S) map resized bilinearly with
half-pixel centres to (H, W) and min-maxed -> ``heatmaps``), ``grasps``
(:mod:`~affordance_core.inference.grasps`), ``lift`` (:mod:`~affordance_core.inference.geometry`),
and ``total``.

Optional background suppression (off by default): with ``PipelineConfig.object_prior`` (a C2AM
checkpoint) the class-agnostic object map of the same preprocessed image multiplies (or masks)
every heatmap before grasps are searched (:mod:`~affordance_core.inference.object_prior`); its
run is part of the ``model`` timing.

The last frame's backend output is cached under a hash of the image bytes: asking for other
actions of the same frame costs no model run (``result.cached`` is then True and the
``preprocess``/``model`` timings only cover the hash).

3-D conventions are those of :mod:`~affordance_core.inference.geometry`; in short: K is the
RGB image's intrinsic matrix, depth must be registered to the RGB camera (another resolution of
the same aspect ratio is handled by rescaling K), the output frame is the RGB camera's optical
frame, the grasp z axis points into the surface (``-normal``) and the x axis is the closing
direction. A candidate without enough valid depth has ``valid_3d = False`` and NaN in
``position``, ``normal``, ``quaternion``, ``width`` and ``depth_spread`` (``to_dict`` writes null).
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

import cv2
import numpy as np
from transforms3d.quaternions import quat2mat

from affordance_core.inference import geometry as geo
from affordance_core.inference.distortion import Distortion, check_distortion, rectify_maps, \
    undistort_pixels
from affordance_core.inference.geometry import InputError
from affordance_core.inference.grasps import GraspPoint, find_grasp_points
from affordance_core.inference.object_prior import SUPPRESS_MODES, suppress_background
from affordance_core.data.transforms import check_rgb
from affordance_core.labels import class_id

logger = logging.getLogger(__name__)

__all__ = ['PipelineConfig', 'GroundingPipeline', 'GroundingResult', 'Grasp', 'InputError']

BACKEND_KINDS: tuple[str, ...] = ('auto', 'torch', 'onnxruntime', 'tensorrt')
_NAN3 = (math.nan, math.nan, math.nan)
MAX_REGION_POINTS = 1024  # region pixels used for the closing axis and the width (stride)


class BackendLike(Protocol):
    """What the pipeline needs from ``inference.backends.create_backend(...)``."""

    classes: Sequence[str]
    input_size: int

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, 3, S, S) float32 -> (cams (B, C, h, w), maps (B, C, S, S) in [0, 1])."""


@dataclass
class PipelineConfig:
    """Settings of :class:`GroundingPipeline` (JSON-able; the ROS node maps its parameters here).

    Attributes:
        backend: 'auto' | 'torch' | 'onnxruntime' | 'tensorrt' (see ``inference.backends``).
        checkpoint: checkpoint (.pt) for the torch backend (and the class names).
        onnx_path: ONNX file for the onnxruntime backend.
        engine_path: TensorRT engine file for the tensorrt backend.
        device: backend device ('auto', 'cpu', 'cuda', 'cuda:N'); None = the backend's default
            ('auto').
        cache_dir: where the backends cache exported ONNX files / TensorRT engines; None = their
            default (``$AFFORDANCE_CACHE_DIR`` or ``~/.cache/affordance_ros``).
        input_size: network input side S; None = the backend's (224 for a new export). Must
            equal the size of an already built backend.
        top_k: maximum grasp candidates per action (0 = all local maxima).
        nms_radius: candidates closer than this (pixels at image resolution) to a better one are
            suppressed.
        min_score: candidates whose heat is below this are dropped.
        softargmax_window: half-size w (patch cells) of the (2w+1)^2 soft-argmax window; 2 = 5x5
            cells for a 16x16 grid (GeoAware's w = 7 is for a 60x60 grid).
        softargmax_beta: soft-argmax temperature relative to the peak heat.
        depth_window: side (pixels at image resolution) of the patch for the robust depth.
        min_valid_depth_fraction: minimum fraction of valid depth pixels in that patch for
            ``valid_3d``.
        min_depth: depths below this (metres) are invalid.
        max_depth: depths above this (metres) are invalid.
        depth_scale: units per metre of 16UC1 depth (1000 = millimetres; 5000 = TUM RGB-D).
        heat_threshold: a candidate's region (for the closing axis and width) is the connected
            part of ``heat >= heat_threshold * score`` holding it; the cloud uses
            ``heat >= heat_threshold``.
        normal_window: side (pixels at image resolution) of the depth patch for the plane fit.
        region_depth_tolerance: metres; depth pixels farther than this from the candidate's
            median depth (normal patch) or tangent plane (region) belong to other surfaces.
        region_radius: metres; region points farther than this from the grasp position are
            ignored for the closing axis and the width (so width <= 2 * region_radius; a
            diffuse heatmap would otherwise give widths of metres).
        flip_tta: also run the horizontally flipped image and average the un-flipped outputs.
        return_cloud: fill ``result.cloud[action]`` ((N, 4) x, y, z, heat).
        object_prior: C2AM checkpoint (.pt) whose object map suppresses background heat (run
            with torch on ``device``); None = off.
        object_prior_mode: 'multiply' (heat * object map) or 'mask' (heat * [object map >=
            object_prior_threshold]); see ``inference.object_prior.suppress_background``.
        object_prior_threshold: the 'mask' cut on the min-max normalised object map, in [0, 1].
    """

    backend: str = 'auto'
    checkpoint: str | None = None
    onnx_path: str | None = None
    engine_path: str | None = None
    device: str | None = None
    cache_dir: str | None = None
    input_size: int | None = None
    top_k: int = 5
    nms_radius: float = 32.0
    min_score: float = 0.2
    softargmax_window: int = 2
    softargmax_beta: float = 0.05
    depth_window: int = 7
    min_valid_depth_fraction: float = 0.3
    min_depth: float = 0.1
    max_depth: float = 4.0
    depth_scale: float = 1000.0
    heat_threshold: float = 0.5
    normal_window: int = 21
    region_depth_tolerance: float = 0.05
    region_radius: float = 0.15
    flip_tta: bool = False
    return_cloud: bool = False
    object_prior: str | None = None
    object_prior_mode: str = 'multiply'
    object_prior_threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.backend not in BACKEND_KINDS:
            raise ValueError(f"unknown backend '{self.backend}'; expected one of "
                             f"{', '.join(BACKEND_KINDS)}")
        if self.object_prior_mode not in SUPPRESS_MODES:
            raise ValueError(f"unknown object_prior_mode '{self.object_prior_mode}'; expected "
                             f"one of {', '.join(SUPPRESS_MODES)}")
        ints = {'top_k': 0, 'softargmax_window': 0, 'depth_window': 1, 'normal_window': 3}
        for name, low in ints.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f'{name} must be an integer >= {low}, got {value!r}')
        if self.input_size is not None and (isinstance(self.input_size, bool) or not
                                            isinstance(self.input_size, int) or
                                            self.input_size <= 0):
            raise ValueError(f'input_size must be a positive integer or None, got '
                             f'{self.input_size!r}')
        for name in ('nms_radius', 'min_depth', 'region_depth_tolerance'):
            if not float(getattr(self, name)) >= 0:
                raise ValueError(f'{name} must be >= 0, got {getattr(self, name)!r}')
        for name in ('softargmax_beta', 'depth_scale', 'max_depth', 'region_radius'):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f'{name} must be > 0, got {getattr(self, name)!r}')
        for name in ('min_score', 'min_valid_depth_fraction', 'heat_threshold',
                     'object_prior_threshold'):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise ValueError(f'{name} must lie in [0, 1], got {getattr(self, name)!r}')
        if self.min_depth >= self.max_depth:
            raise ValueError(f'min_depth ({self.min_depth}) must be < max_depth '
                             f'({self.max_depth})')

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict copy (JSON-able)."""
        return asdict(self)


@dataclass
class Grasp:
    """One grasp candidate (``docs/interfaces.md``).

    Attributes:
        action: affordance name.
        score: heatmap value at (u, v), in [0, 1].
        u: sub-pixel column in the RGB image (pixel centres at integers).
        v: sub-pixel row.
        valid_3d: True when the depth around (u, v) was valid; otherwise every 3-D field is NaN.
        position: (x, y, z) metres in the RGB camera optical frame.
        normal: unit surface normal toward the camera (``normal . position < 0``).
        quaternion: (x, y, z, w) orientation of the grasp frame: z = approach into the surface
            (-normal), x = closing direction, y = z cross x.
        width: extent of the candidate's heat region along x, metres (5th-95th percentile).
        depth_spread: 1.4826 * MAD of the valid depths around (u, v), metres.
    """

    action: str
    score: float
    u: float
    v: float
    valid_3d: bool = False
    position: tuple[float, float, float] = _NAN3
    normal: tuple[float, float, float] = _NAN3
    quaternion: tuple[float, float, float, float] = (math.nan,) * 4
    width: float = math.nan
    depth_spread: float = math.nan

    def rotation(self) -> np.ndarray:
        """(3, 3) rotation matrix (columns = grasp x, y, z axes in the camera frame); NaN if
        ``valid_3d`` is False."""
        x, y, z, w = self.quaternion
        if not self.valid_3d:
            return np.full((3, 3), np.nan)
        return quat2mat([w, x, y, z])

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict: floats rounded to 6 decimals, NaN written as None."""
        def num(x: float) -> float | None:
            x = float(x)
            return None if not math.isfinite(x) else round(x, 6)

        return {'action': self.action, 'score': num(self.score), 'u': num(self.u),
                'v': num(self.v), 'valid_3d': bool(self.valid_3d),
                'position': [num(x) for x in self.position],
                'normal': [num(x) for x in self.normal],
                'quaternion': [num(x) for x in self.quaternion],
                'width': num(self.width), 'depth_spread': num(self.depth_spread)}


@dataclass
class GroundingResult:
    """Output of :meth:`GroundingPipeline.__call__`.

    Attributes:
        heatmaps: action -> (H, W) float32 in [0, 1] at image resolution.
        heatmaps_grid: action -> (h, w) float32 in [0, 1], the min-maxed raw patch-grid CAM.
        grasps: all candidates of all actions, by decreasing score.
        grasps_by_action: action -> its candidates, by decreasing score.
        timings: stage -> milliseconds ('preprocess', 'model', 'heatmap', 'grasps', 'lift',
            'total').
        cloud: action -> (N, 4) float32 (x, y, z, heat) of the valid-depth pixels with
            ``heat >= heat_threshold``, when ``return_cloud`` and depth were given; else None.
        image_size: (H, W) of the input image.
        cached: True when the backend output of the previous call was reused.
        object_map: (h, w) float32 object map that suppressed the background (min-max
            normalised, at the prior's grid), or None without an object prior.
    """

    heatmaps: dict[str, np.ndarray]
    heatmaps_grid: dict[str, np.ndarray]
    grasps: list[Grasp]
    grasps_by_action: dict[str, list[Grasp]]
    timings: dict[str, float]
    cloud: dict[str, np.ndarray] | None = None
    image_size: tuple[int, int] = (0, 0)
    cached: bool = False
    object_map: np.ndarray | None = None


@dataclass
class _Frame:
    """Depth of one call, registered to the RGB image."""

    depth_m: np.ndarray       # (Hd, Wd) metres, NaN invalid
    K: np.ndarray             # (3, 3) RGB intrinsics
    K_depth: np.ndarray       # (3, 3) intrinsics of the depth grid
    sx: float                 # Wd / W
    sy: float                 # Hd / H
    valid: np.ndarray         # (Hd, Wd) bool, finite depth
    # raw images with lens distortion: depth_m / valid are the rectified copy (same K_depth),
    # ``maps`` the cv2.remap maps that made it (heatmaps follow the same way)
    dist: Distortion | None = None
    maps: tuple[np.ndarray, np.ndarray] | None = None


@dataclass
class _Cache:
    key: bytes
    cams: np.ndarray          # (C, h, w)
    maps: np.ndarray          # (C, S, S)
    heat: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    object_map: np.ndarray | None = None  # (h, w) with an object prior


def _minmax(x: np.ndarray) -> np.ndarray:
    """Per-map min-max to [0, 1] (float32); a constant map becomes zeros."""
    x = x.astype(np.float32, copy=False)
    lo, hi = float(x.min()), float(x.max())
    if hi - lo <= 1e-12:
        return np.zeros_like(x, dtype=np.float32)
    return ((x - lo) / (hi - lo)).astype(np.float32)


def _check_rgb(rgb: Any) -> np.ndarray:
    return check_rgb(rgb, InputError)


def _subsample_flat(flat: np.ndarray) -> np.ndarray:
    """At most MAX_REGION_POINTS of these flat pixel indices, by a regular stride
    (deterministic)."""
    if flat.size <= MAX_REGION_POINTS:
        return flat
    return flat[::-(-flat.size // MAX_REGION_POINTS)]


def _component(mask: np.ndarray, row: int, col: int) -> tuple[np.ndarray, int, int]:
    """The 8-connected component of the 0/1 ``mask`` (uint8, overwritten) holding (row, col):
    ``labels == labels[row, col]`` of ``cv2.connectedComponents``, found with a flood fill that
    visits only the component (about twice as fast), and cropped to its bounding box.

    Returns:
        (bool mask of the component in its bounding box, top row, left column of the box).
    """
    mask = np.ascontiguousarray(mask)  # filled in place
    if mask[row, col] == 0:  # the background "component" (the pipeline never asks for it)
        _, labels = cv2.connectedComponents(mask, connectivity=8)
        return labels == labels[row, col], 0, 0
    _, _, _, (x, y, w, h) = cv2.floodFill(mask, None, (col, row), 2, 0, 0, 8)
    return mask[y:y + h, x:x + w] == 2, y, x


def _window_pixels(flats: list[np.ndarray], windows: list[tuple[np.ndarray, int, int, int, int]],
                   counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Image (row, col) of flat indices: ``flats[k]`` index the box ``windows[k][0]`` (a mask)
    whose top-left pixel is ``windows[k][1:3]``; ``counts[k] = flats[k].size``."""
    rows, cols = np.divmod(np.concatenate(flats),
                           np.repeat([w[0].shape[1] for w in windows], counts))
    rows += np.repeat([w[1] for w in windows], counts)
    cols += np.repeat([w[2] for w in windows], counts)
    return rows, cols


def _odd(n: float) -> int:
    n = max(int(round(n)), 1)
    return n if n % 2 else n + 1


class GroundingPipeline:
    """Affordance grounding of RGB(-D) frames; see the module docstring.

    Args:
        config: settings; the backend is built from it unless ``backend`` is given.
        backend: an already built backend (anything with ``classes``, ``input_size`` and
            ``__call__(images) -> (cams, maps)``), e.g. shared between pipelines or a test fake.
        object_prior: an already built object prior (``images (B, 3, S, S) -> (B, h, w)``
            object maps, e.g. ``inference.object_prior.ObjectPrior``) used instead of
            ``config.object_prior``.

    Raises:
        FileNotFoundError: the checkpoint / ONNX / engine file does not exist.
        ValueError: bad settings.
    """

    def __init__(self, config: PipelineConfig | None = None, *,
                 backend: BackendLike | None = None, object_prior: Any = None) -> None:
        self.config = config if config is not None else PipelineConfig()
        self.backend = backend if backend is not None else self._create_backend(self.config)
        self.object_prior = object_prior
        if object_prior is None and self.config.object_prior is not None:
            from affordance_core.inference.object_prior import ObjectPrior

            self.object_prior = ObjectPrior.from_checkpoint(self.config.object_prior,
                                                            self.config.device)
        classes = getattr(self.backend, 'classes', None)
        if not classes:
            raise ValueError('the backend has no class names (backend.classes); rebuild the '
                             'checkpoint with classes=[...] so that actions can be named')
        self.classes: tuple[str, ...] = tuple(classes)
        backend_size = getattr(self.backend, 'input_size', None)
        size = self.config.input_size or backend_size
        if size is None:
            raise ValueError('input size unknown: set PipelineConfig.input_size')
        if backend_size is not None and int(size) != int(backend_size):
            raise ValueError(f'input_size {size} differs from the backend input size '
                             f'{backend_size}; leave input_size unset')
        self.input_size = int(size)
        self.model_runs = 0
        self._cache: _Cache | None = None
        self._rect_maps: tuple[bytes, tuple[np.ndarray, np.ndarray]] | None = None

    # ------------------------------------------------------------------ construction

    @staticmethod
    def _create_backend(config: PipelineConfig) -> BackendLike:
        for name in ('checkpoint', 'onnx_path', 'engine_path'):
            path = getattr(config, name)
            if path is not None and not Path(path).is_file():
                what = 'checkpoint' if name == 'checkpoint' else name.replace('_', ' ')
                raise FileNotFoundError(f'{what} not found: {path}')
        if config.checkpoint is None and config.onnx_path is None and config.engine_path is None:
            raise ValueError('no model given: set checkpoint (torch), onnx_path (onnxruntime) '
                             'or engine_path (tensorrt) in PipelineConfig')
        from affordance_core.inference.backends import create_backend

        kwargs: dict[str, Any] = {name: getattr(config, name) for name in
                                  ('checkpoint', 'onnx_path', 'engine_path', 'device',
                                   'cache_dir') if getattr(config, name) is not None}
        if config.input_size is not None:
            kwargs['image_size'] = config.input_size
        return create_backend(config.backend, **kwargs)

    @classmethod
    def from_checkpoint(cls, path: str | Path, backend: str | BackendLike = 'auto',
                        **overrides: Any) -> GroundingPipeline:
        """Pipeline for a checkpoint written by ``affordance-train``.

        Args:
            path: checkpoint file (.pt).
            backend: backend kind ('auto' | 'torch' | 'onnxruntime' | 'tensorrt') or a built
                backend object.
            **overrides: any other :class:`PipelineConfig` field.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ValueError: unknown override names or bad values.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f'checkpoint not found: {path}')
        names = {f.name for f in fields(PipelineConfig)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"unknown PipelineConfig field(s) {', '.join(unknown)}; valid: "
                             f"{', '.join(sorted(names))}")
        if isinstance(backend, str):
            return cls(PipelineConfig(backend=backend, checkpoint=str(path), **overrides))
        return cls(PipelineConfig(checkpoint=str(path), **overrides), backend=backend)

    # ------------------------------------------------------------------ inputs

    def _check_actions(self, actions: str | Iterable[str]) -> list[tuple[str, int]]:
        if isinstance(actions, str):
            actions = [actions]
        names = list(dict.fromkeys(actions))  # de-duplicated, order kept
        if not names:
            raise ValueError(f"no action given; known actions: {', '.join(self.classes)}")
        for name in names:
            if not isinstance(name, str):
                raise ValueError(f'actions must be strings, got {name!r}')
        return [(name, class_id(name, self.classes)) for name in names]

    def _check_depth(self, depth: Any, K: Any, rgb_shape: tuple[int, int], D: Any = None,
                     distortion_model: str = 'plumb_bob') -> _Frame | None:
        k = None if K is None else geo.check_intrinsics(K)
        dist = check_distortion(D, distortion_model)
        if depth is None:
            return None
        if k is None:
            raise InputError('depth was given without K: pass the 3x3 intrinsic matrix of the '
                             'RGB image to lift grasps to 3-D')
        cfg = self.config
        depth_m = geo.depth_to_metres(depth, cfg.depth_scale, min_depth=cfg.min_depth,
                                      max_depth=cfg.max_depth)
        k_depth, sx, sy = geo.register_depth(depth_m.shape, rgb_shape, k)
        maps = None
        if dist is not None:  # lift in a rectified copy of the depth grid (same K_depth)
            maps = self._rectify_maps(k_depth, dist, depth_m.shape)
            depth_m = cv2.remap(depth_m, *maps, cv2.INTER_NEAREST,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=float('nan'))
        return _Frame(depth_m, k, k_depth, sx, sy, np.isfinite(depth_m), dist, maps)

    def _rectify_maps(self, k_depth: np.ndarray, dist: Distortion,
                      shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """The remap maps of this camera (computed once: a few ms at 640 x 480)."""
        key = k_depth.tobytes() + dist.key() + repr(shape).encode()
        if self._rect_maps is None or self._rect_maps[0] != key:
            self._rect_maps = (key, rectify_maps(k_depth, dist, shape))
        return self._rect_maps[1]

    # ------------------------------------------------------------------ model

    def _frame_key(self, rgb: np.ndarray) -> bytes:
        # sha1 runs at twice blake2b's speed here (0.55 vs 1.15 ms on a 640 x 480 frame); the
        # key only has to tell consecutive frames apart, so any good 160-bit digest will do
        h = hashlib.sha1(usedforsecurity=False)
        h.update(repr((rgb.shape, self.input_size, bool(self.config.flip_tta))).encode())
        h.update(np.ascontiguousarray(rgb).data)
        return h.digest()

    def _run_backend(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cams, maps = self.backend(images)
        self.model_runs += 1
        cams, maps = np.asarray(cams, np.float32), np.asarray(maps, np.float32)
        c, s = len(self.classes), self.input_size
        if cams.ndim != 4 or cams.shape[:2] != (1, c):
            raise RuntimeError(f'backend returned cams of shape {cams.shape}, expected '
                               f'(1, {c}, h, w)')
        if maps.shape != (1, c, s, s):
            raise RuntimeError(f'backend returned maps of shape {maps.shape}, expected '
                               f'(1, {c}, {s}, {s})')
        if not (np.all(np.isfinite(cams)) and np.all(np.isfinite(maps))):
            raise RuntimeError('backend returned nan or inf; check the model and its input')
        return cams[0], maps[0]

    def _model(self, rgb: np.ndarray, key: bytes) -> tuple[_Cache, float, float]:
        from affordance_core.data.transforms import preprocess_rgb

        t0 = time.perf_counter()
        images = preprocess_rgb(rgb, self.input_size).numpy()[None].astype(np.float32)
        t1 = time.perf_counter()
        cams, maps = self._run_backend(images)
        if self.config.flip_tta:
            cams_f, maps_f = self._run_backend(np.ascontiguousarray(images[..., ::-1]))
            cams = 0.5 * (cams + cams_f[..., ::-1])
            maps = 0.5 * (maps + maps_f[..., ::-1])
        obj = None
        if self.object_prior is not None:
            obj, cams, maps = self._suppress(images, cams, maps)
        t2 = time.perf_counter()
        return _Cache(key, cams, maps, object_map=obj), (t1 - t0) * 1e3, (t2 - t1) * 1e3

    def _suppress(self, images: np.ndarray, cams: np.ndarray,
                  maps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Object map of ``images`` (flip-averaged with ``flip_tta``) and the suppressed cams
        and maps (``inference.object_prior.suppress_background``)."""
        obj = np.asarray(self.object_prior(images), np.float32)
        if obj.ndim != 3 or obj.shape[0] != 1:
            raise RuntimeError(f'object prior returned shape {obj.shape}, expected (1, h, w)')
        obj = obj[0]
        if self.config.flip_tta:
            flipped = np.asarray(self.object_prior(np.ascontiguousarray(images[..., ::-1])),
                                 np.float32)
            obj = 0.5 * (obj + flipped[0][..., ::-1])
        if not np.all(np.isfinite(obj)):
            raise RuntimeError('object prior returned nan or inf')
        mode, thr = self.config.object_prior_mode, self.config.object_prior_threshold
        cams = suppress_background(cams, obj, mode, thr)
        maps = suppress_background(maps, obj, mode, thr)
        lo, hi = float(obj.min()), float(obj.max())
        obj = (obj - lo) / (hi - lo) if hi - lo > 1e-12 else np.zeros_like(obj)
        return obj.astype(np.float32), cams, maps

    # ------------------------------------------------------------------ call

    def __call__(self, rgb: np.ndarray, depth: np.ndarray | None = None,
                 K: np.ndarray | None = None,
                 actions: str | Iterable[str] = ('hold',), *, D: Any = None,
                 distortion_model: str = 'plumb_bob') -> GroundingResult:
        """Ground ``actions`` in one frame.

        Args:
            rgb: (H, W, 3) uint8, RGB order, any size.
            depth: optional depth registered to ``rgb``: (Hd, Wd) uint16 (``depth_scale`` units
                per metre, 0 invalid) or float32 metres (non-finite / <= 0 invalid); (Hd, Wd) may
                be a scaled copy of (H, W) (same aspect ratio).
            K: (3, 3) intrinsics of the RGB image; required with ``depth``.
            actions: affordance name(s) among ``self.classes``.
            D: distortion coefficients of a *raw* (unrectified) RGB image, with
                ``distortion_model`` (``plumb_bob``, ``rational_polynomial`` or
                ``equidistant``; :mod:`~affordance_core.inference.distortion`): the 3-D lifting
                then undoes the distortion; 2-D results stay in the raw pixels. None or zeros for
                rectified images (and for cameras without distortion).

        Returns:
            :class:`GroundingResult`.

        Raises:
            InputError: malformed rgb / depth / K (a ``ValueError``).
            ValueError: unknown or missing actions (the message lists the known ones).
        """
        t_start = time.perf_counter()
        rgb = _check_rgb(rgb)
        acts = self._check_actions(actions)
        H, W = rgb.shape[:2]
        t_lift0 = time.perf_counter()
        frame = self._check_depth(depth, K, (H, W), D, distortion_model)
        t_lift = (time.perf_counter() - t_lift0) * 1e3

        t0 = time.perf_counter()
        key = self._frame_key(rgb)
        t_hash = (time.perf_counter() - t0) * 1e3
        cached = self._cache is not None and self._cache.key == key
        if cached:
            cache, t_pre, t_model = self._cache, 0.0, 0.0
        else:
            cache, t_pre, t_model = self._model(rgb, key)
            self._cache = cache
        timings = {'preprocess': t_hash + t_pre, 'model': t_model, 'heatmap': 0.0,
                   'grasps': 0.0, 'lift': t_lift}

        cfg = self.config
        heatmaps: dict[str, np.ndarray] = {}
        grids: dict[str, np.ndarray] = {}
        by_action: dict[str, list[Grasp]] = {}
        cloud: dict[str, np.ndarray] | None = (
            {} if cfg.return_cloud and frame is not None else None)
        for name, cid in acts:
            t0 = time.perf_counter()
            if name not in cache.heat:
                grid = _minmax(cache.cams[cid])
                heat = _minmax(cv2.resize(cache.maps[cid], (W, H),
                                          interpolation=cv2.INTER_LINEAR))
                cache.heat[name] = (grid, heat)
            grid, heat = cache.heat[name]
            grids[name], heatmaps[name] = grid, heat
            t1 = time.perf_counter()
            points = find_grasp_points(grid, heat, top_k=cfg.top_k, nms_radius=cfg.nms_radius,
                                       min_score=cfg.min_score, window=cfg.softargmax_window,
                                       beta=cfg.softargmax_beta)
            t2 = time.perf_counter()
            by_action[name] = self._lift(name, points, heat, frame, cloud)
            t3 = time.perf_counter()
            timings['heatmap'] += (t1 - t0) * 1e3
            timings['grasps'] += (t2 - t1) * 1e3
            timings['lift'] += (t3 - t2) * 1e3

        grasps = sorted((g for gs in by_action.values() for g in gs), key=lambda g: -g.score)
        timings['total'] = (time.perf_counter() - t_start) * 1e3
        return GroundingResult(heatmaps=heatmaps, heatmaps_grid=grids, grasps=grasps,
                               grasps_by_action=by_action, timings=timings, cloud=cloud,
                               image_size=(H, W), cached=cached, object_map=cache.object_map)

    # ------------------------------------------------------------------ 3-D

    def _lift(self, action: str, points: list[GraspPoint], heat: np.ndarray,
              frame: _Frame | None, cloud: dict[str, np.ndarray] | None) -> list[Grasp]:
        if frame is None:
            return [Grasp(action, p.score, p.u, p.v) for p in points]
        cfg = self.config
        Hd, Wd = frame.depth_m.shape
        heat_d = heat if heat.shape == (Hd, Wd) else cv2.resize(
            heat, (Wd, Hd), interpolation=cv2.INTER_LINEAR)
        if frame.maps is not None:  # into the rectified depth grid
            heat_d = cv2.remap(heat_d, *frame.maps, cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
        if cloud is not None:
            pts, pix = geo.backproject_depth(frame.depth_m, frame.K_depth,
                                             frame.valid & (heat_d >= cfg.heat_threshold))
            hv = heat_d[pix[:, 0], pix[:, 1]]
            cloud[action] = np.concatenate([pts, hv[:, None]], axis=1).astype(np.float32)
        return self._lift_batch(action, points, heat_d, frame)

    def _lift_batch(self, action: str, points: list[GraspPoint], heat_d: np.ndarray,
                    frame: _Frame) -> list[Grasp]:
        """3-D grasps of one action's candidates (``heat_d``: the heatmap on the depth grid).

        Vectorised over the candidates with the ``*_batch`` functions of
        :mod:`~affordance_core.inference.geometry`; only the heat region of each candidate
        (connected components in its window) and its quaternion are computed one by one. The
        result is that of lifting each candidate with the single-candidate functions
        (``test_pipeline.py`` keeps that reference)."""
        grasps = [Grasp(action, p.score, p.u, p.v) for p in points]
        if not points:
            return grasps
        cfg = self.config
        depth_m, k_d = frame.depth_m, frame.K_depth
        Hd, Wd = depth_m.shape
        scale = 0.5 * (frame.sx + frame.sy)
        u = np.array([p.u for p in points], np.float64)
        v = np.array([p.v for p in points], np.float64)
        if frame.dist is not None:  # where the candidates' rays meet the rectified image
            u, v = undistort_pixels(u, v, frame.K, frame.dist)
        ud, vd = (u + 0.5) * frame.sx - 0.5, (v + 0.5) * frame.sy - 0.5
        stats = geo.robust_depth_batch(depth_m, ud, vd, _odd(cfg.depth_window * scale))
        lift = (stats.count > 0) & (stats.valid_fraction >= cfg.min_valid_depth_fraction)
        for i in np.flatnonzero(~lift):
            logger.debug('%s grasp at (%.1f, %.1f): %.0f%% valid depth, no 3-D', action,
                         points[i].u, points[i].v, 100 * stats.valid_fraction[i])
        idx = np.flatnonzero(lift)
        n = idx.size
        if n == 0:
            return grasps
        u, v, ud, vd, med = u[idx], v[idx], ud[idx], vd[idx], stats.median[idx]

        # surface normal and position: the viewing ray meets the fitted plane
        ray = geo.backproject(u, v, 1.0, frame.K)
        normal, _, fitted = geo.surface_normals_batch(
            depth_m, k_d, ud, vd, _odd(cfg.normal_window * scale), med,
            cfg.region_depth_tolerance)
        rc = np.minimum(np.maximum(np.rint(vd).astype(np.int64), 0), Hd - 1)
        cc = np.minimum(np.maximum(np.rint(ud).astype(np.int64), 0), Wd - 1)
        position = geo.intersect_rays_planes_batch(ray, normal, geo.backproject(cc, rc, med, k_d))
        off_plane = ~np.isfinite(position[:, 0])
        position[off_plane] = med[off_plane, None] * ray[off_plane]
        if not fitted.all():  # too few points for a plane: face the camera along the ray
            p = position[~fitted]
            normal[~fitted] = -p / np.sqrt((p * p).sum(1))[:, None]
            for i in np.flatnonzero(~fitted):
                logger.debug('%s grasp at (%.1f, %.1f): no plane fit, normal = -ray', action,
                             points[idx[i]].u, points[idx[i]].v)
        toward = (normal * position).sum(1) > 0
        normal[toward] = -normal[toward]
        approach = -normal

        # heat region of each candidate (depth grid), on the candidate's surface, searched in
        # the window that can hold points within region_radius of it: a point at depth
        # z' >= z - R that is within R laterally lies within R f / (z - R) pixels
        radius = cfg.region_radius
        f_max = max(k_d[0, 0], k_d[1, 1])
        windows, flats = [], []
        for j, (r, c, z) in enumerate(zip(rc.tolist(), cc.tolist(), position[:, 2].tolist())):
            z_near = max(z - radius, cfg.min_depth)
            reach = int(math.ceil(1.25 * radius * f_max / z_near)) + 2
            r0, r1 = max(r - reach, 0), min(r + reach + 1, Hd)
            c0, c1 = max(c - reach, 0), min(c + reach + 1, Wd)
            thr = min(cfg.heat_threshold * points[idx[j]].score, float(heat_d[r, c]))
            region, top, left = _component((heat_d[r0:r1, c0:c1] >= thr).view(np.uint8),
                                           r - r0, c - c0)
            rb, cb = r0 + top, c0 + left
            windows.append((region, rb, cb, r0, c0))  # the region's box, the window
            # flat box indices, row-major like np.nonzero (and much faster)
            valid = frame.valid[rb:rb + region.shape[0], cb:cb + region.shape[1]]
            flats.append(_subsample_flat(np.flatnonzero(region & valid)))
        counts = np.array([f.size for f in flats])
        rows, cols = _window_pixels(flats, windows, counts)
        pix = rows * Wd + cols
        # the region points (backproject's arithmetic) as rows x, y, z: 3 x faster than (M, 3)
        pts = np.empty((3, len(pix)))
        pts[2] = np.take(depth_m, pix)
        fx, s, cx, fy, cy = k_d[0, 0], k_d[0, 1], k_d[0, 2], k_d[1, 1], k_d[1, 2]
        y = (rows - cy) / fy
        pts[0] = ((cols - cx) - s * y) / fx * pts[2]
        pts[1] = y * pts[2]
        d = pts - np.repeat(position.T, counts, axis=1)
        nrm = np.repeat(normal.T, counts, axis=1)
        near = ((np.abs(d[0] * nrm[0] + d[1] * nrm[1] + d[2] * nrm[2])
                 <= cfg.region_depth_tolerance)
                & (np.sqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2]) <= radius))
        pts, pix = np.compress(near, pts, axis=1).T, pix[near]  # (M, 3) view of the rows
        counts = np.bincount(np.repeat(np.arange(n), counts)[near], minlength=n)

        # closing axis: the region's principal axis in 3-D, else that of its pixel layout
        axis3d = geo.principal_axes_batch(pts, counts, approach, np.take(heat_d, pix))
        axis2d = np.full((n, 3), np.nan)
        no_axis = np.flatnonzero(~np.isfinite(axis3d[:, 0]))
        if no_axis.size:
            axis2d[no_axis] = self._axes_from_2d([windows[j] for j in no_axis], heat_d,
                                                 ud[no_axis], vd[no_axis], med[no_axis], k_d)
        R = geo.grasp_rotations_batch(approach, [axis3d, axis2d])
        width = geo.extents_along_batch(pts, counts, R[:, :, 0])
        rows3 = zip(idx.tolist(), position.tolist(), normal.tolist(),
                    geo.rotations_to_quaternions(R).tolist(), width.tolist(),
                    stats.spread[idx].tolist())
        for i, pos, nrm, quat, wid, spread in rows3:
            p = points[i]
            grasps[i] = Grasp(action, p.score, p.u, p.v, True, tuple(pos), tuple(nrm),
                              tuple(quat), wid, spread)
        return grasps

    @staticmethod
    def _axes_from_2d(windows: list[tuple[np.ndarray, int, int, int, int]], heat_d: np.ndarray,
                      ud: np.ndarray, vd: np.ndarray, z: np.ndarray,
                      k_d: np.ndarray) -> np.ndarray:
        """Principal axes of regions' pixel layouts, lifted to 3-D directions at depth z.

        Args:
            windows: per region, ``(region, rb, cb, r0, c0)``: its bool mask in a box of the
                depth grid whose top-left pixel is (rb, cb), inside the window whose top-left
                pixel is (r0, c0).
            heat_d: (Hd, Wd) heat on the depth grid (the weights).
            ud, vd, z: (n,) centre (depth-grid pixels) and depth (metres) of each region.
            k_d: (3, 3) intrinsics of the depth grid.

        Returns:
            (n, 3) directions; NaN rows where a region has fewer than 3 pixels or is round. The
            direction does not depend on where the window lies (backprojection at a fixed
            depth is affine): the pixel coordinates stay window coordinates.
        """
        flats = [_subsample_flat(np.flatnonzero(w[0])) for w in windows]
        counts = np.array([f.size for f in flats])
        rows, cols = _window_pixels(flats, windows, counts)
        heat = np.take(heat_d, rows * heat_d.shape[1] + cols)
        rows -= np.repeat([w[3] for w in windows], counts)  # window coordinates
        cols -= np.repeat([w[4] for w in windows], counts)
        axis = geo.principal_axes_2d_batch(np.stack([cols, rows]).T, counts, heat)
        a = geo.backproject(ud + axis[:, 0], vd + axis[:, 1], z, k_d)
        return a - geo.backproject(ud, vd, z, k_d)
