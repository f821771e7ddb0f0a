"""GroundingCore: input messages -> synchronised frame -> pipeline -> output messages (no rclpy).

The node (``grounding_node.py``) and ``affordance-replay`` both run this class, so the replay
tool exercises exactly the node's processing code (``docs/ros_node.md``, "Core").

Flow::

    on_image / on_compressed_image / on_depth / on_camera_info   (any thread)
        -> ApproximateSync (newest-frame slot; superseded / out-of-order / unmatched counted)
    take_frame() -> Frame                                         (the worker)
    process(frame, now_ns, wanted) -> {topic: message} | None
    note_published(now_ns, frame)                                 (latency = now - image stamp)
    diagnostics(now_ns) -> diagnostic_msgs/DiagnosticArray

Never raises for bad input: every malformed or unusable message or frame is counted under a
drop reason (:data:`DROP_REASONS`) and logged through the injected logger, at most one warning
per reason per :data:`LOG_PERIOD_S` seconds (``.warning`` / ``.info`` / ``.debug``: a
``logging.Logger`` or an rclpy logger). Reasons:

* ``bad_image``, ``bad_depth``, ``bad_camera_info``: a message that cannot be converted
  (encoding, size, step, data length, zero stamp / no header, K) or does not fit the frame
  (camera_info size differs from the image, depth of another aspect ratio); zero or NaN depth
  is *not* a drop (the grasps come out with ``valid_3d`` false);
* ``no_depth``, ``no_camera_info``: an image left the sync queue without its partners;
* ``superseded``: a synchronised frame replaced in the slot before the worker took it;
* ``out_of_order``: a message stamped at or before the last synchronised image;
* ``stale``: ``now_ns - stamp > max_input_age_ms`` when processed;
* ``pipeline_error``: the backend / pipeline failed (RuntimeError and anything unexpected);
  the diagnostics level is ERROR until a later frame succeeds;
* ``tf_unavailable``: ``target_frame`` is set and the transform is unavailable: the 3-D
  outputs (grasps, detections_3d, markers, affordance_cloud) of that frame are dropped, the
  heatmap and overlay still go out.

Outputs (only the topics in ``wanted``): ``heatmap`` (32FC1, pixel-wise maximum over the
requested actions), ``overlay`` (bgr8, the ``overlay_action``, camera frame), ``grasps``,
``detections_3d``, ``markers``, ``affordance_cloud`` (needs depth; the union of the actions'
clouds, a point's heat the maximum over actions). Every output carries the source image
stamp; the frame_id is the image's, or ``target_frame`` for the 3-D outputs when set (poses,
normals and cloud points transformed with the injected ``transform`` at the image stamp).

Diagnostics (one status, :data:`DIAGNOSTICS_NAME`): input rates and the output rate (Hz, last
:data:`RATE_WINDOW_S` s), latency p50 / p95 / max, drops per reason, backend, median model
time. Level ERROR while the last pipeline run failed; WARN when nothing was output for
:data:`NO_FRAMES_WARN_S` s while ``active``, or when drops (``superseded`` excepted: a node
slower than its camera sheds frames by design) exceed 10 % of the images received over the
last :data:`DROP_WINDOW_S` s of diagnostics calls.

Extra public API beyond the contract (used by ``grounding_node.py`` and ``replay.py``):
``classes``, ``actions``, ``sync``, ``active``, ``update_parameter(name, value)``,
``note_published(now_ns, frame)``, ``note_tf_failure(message)``, ``note_drop(reason,
message)``, ``note_received(kind)``, ``snapshot()``, ``warm_up(runs)``,
``describe()``, ``diagnostics_report(now_ns)``, ``close()``, and the :class:`Stats` fields.
"""
from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Container, Iterable, Sequence

import numpy as np

from affordance_core.inference.geometry import InputError, register_depth, \
    rotation_to_quaternion
from affordance_core.inference.pipeline import Grasp
from affordance_ros import outputs
from affordance_ros.conversions import ConversionError, camera_info_distortion, \
    camera_info_to_K, compressed_to_rgb, image_to_depth, image_to_rgb
from affordance_ros.msgtypes import MessageTypes, stamp_ns
from affordance_ros.outputs import DiagnosticsReport
from affordance_ros.params import NodeSettings, validate_update
from affordance_ros.sync import ApproximateSync, Frame

__all__ = ['GroundingCore', 'Stats', 'DROP_REASONS', 'OUTPUT_TOPICS', 'INPUTS',
           'DIAGNOSTICS_NAME', 'TransformFn']

OUTPUT_TOPICS: tuple[str, ...] = ('heatmap', 'overlay', 'grasps', 'detections_3d', 'markers',
                                  'affordance_cloud')
OUTPUTS_3D = frozenset({'grasps', 'detections_3d', 'markers', 'affordance_cloud'})
INPUTS: tuple[str, ...] = ('image', 'depth', 'camera_info', 'action')
DROP_REASONS: tuple[str, ...] = ('bad_image', 'bad_depth', 'bad_camera_info', 'no_depth',
                                 'no_camera_info', 'stale', 'superseded', 'out_of_order',
                                 'pipeline_error', 'tf_unavailable')
DIAGNOSTICS_NAME = 'affordance_ros: grounding'
LOG_PERIOD_S = 5.0            # at most one warning per drop reason in this period
SAMPLES = 200                 # latency / model time samples kept
RATE_WINDOW_S = 5.0           # sliding window of the rates
NO_FRAMES_WARN_S = 2.0        # WARN when nothing was published for this long
DROP_WARN_FRACTION = 0.10     # WARN when more drops than this fraction of the images
DROP_WINDOW_S = 10.0          # ... over this window of diagnostics calls
NS = 1_000_000_000

TransformFn = Callable[[str, str, int], 'tuple[np.ndarray, np.ndarray] | None']


@dataclass
class Stats:
    """Counters of a :class:`GroundingCore` (read them under ``core.lock`` for a consistent
    snapshot, or use :meth:`GroundingCore.snapshot`).

    Attributes:
        received: input ('image', 'depth', 'camera_info', 'action') -> messages received.
        processed: frames that produced outputs.
        published: frames reported by :meth:`GroundingCore.note_published`.
        dropped: drop reason -> count (:data:`DROP_REASONS`).
        outputs: output topic -> messages built.
        latency_ms: last :data:`SAMPLES` latencies (publish time - image stamp).
        model_ms: last model times (``result.timings['model']`` of uncached runs).
        processing_ms: last wall-clock durations of :meth:`GroundingCore.process`.
    """

    received: dict[str, int] = field(default_factory=lambda: {k: 0 for k in INPUTS})
    processed: int = 0
    published: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: {k: 0 for k in DROP_REASONS})
    outputs: dict[str, int] = field(default_factory=lambda: {k: 0 for k in OUTPUT_TOPICS})
    latency_ms: deque[float] = field(default_factory=lambda: deque(maxlen=SAMPLES))
    model_ms: deque[float] = field(default_factory=lambda: deque(maxlen=SAMPLES))
    processing_ms: deque[float] = field(default_factory=lambda: deque(maxlen=SAMPLES))

    def total_dropped(self, exclude: Iterable[str] = ()) -> int:
        skip = set(exclude)
        return sum(n for reason, n in self.dropped.items() if reason not in skip)


def _percentile(samples: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples, np.float64), q)) if len(samples) else math.nan


def _rate(times: Sequence[int], end_ns: int) -> float:
    """Messages per second among ``times`` inside (end - window, end]."""
    lo = end_ns - int(RATE_WINDOW_S * NS)
    inside = [t for t in times if lo < t <= end_ns]
    if len(inside) < 2:
        return 0.0
    span = (max(inside) - min(inside)) / NS
    return (len(inside) - 1) / span if span > 0 else 0.0


def _fmt(x: float, digits: int = 1) -> str:
    return 'nan' if not math.isfinite(x) else f'{x:.{digits}f}'


def transform_grasp(g: Grasp, R: np.ndarray, t: np.ndarray) -> Grasp:
    """The grasp with position, normal and orientation in the target frame (``p' = R p + t``);
    grasps without valid 3-D are returned unchanged."""
    if not g.valid_3d:
        return g
    p = R @ np.asarray(g.position, np.float64) + t
    n = R @ np.asarray(g.normal, np.float64)
    q = rotation_to_quaternion(R @ g.rotation())
    return Grasp(g.action, g.score, g.u, g.v, True, (float(p[0]), float(p[1]), float(p[2])),
                 (float(n[0]), float(n[1]), float(n[2])),
                 (float(q[0]), float(q[1]), float(q[2]), float(q[3])), g.width, g.depth_spread)


def merge_clouds(clouds: Sequence[np.ndarray]) -> np.ndarray:
    """Union of (N, 4) clouds of the same depth image: one point per xyz, the maximum heat."""
    parts = [np.asarray(c, np.float32).reshape(-1, 4) for c in clouds]
    if not parts:
        return np.zeros((0, 4), np.float32)
    pts = np.concatenate(parts, axis=0)
    if len(parts) == 1 or len(pts) < 2:
        return pts
    order = np.lexsort((-pts[:, 3], pts[:, 2], pts[:, 1], pts[:, 0]))
    pts = pts[order]
    keep = np.ones(len(pts), bool)
    keep[1:] = np.any(pts[1:, :3] != pts[:-1, :3], axis=1)
    return pts[keep]


_RECT_WORD = re.compile(r'(^|_)rect(_|$)')


def is_rectified_topic(topic: str) -> bool:
    """Does an image topic name say "rectified" (image_proc's ``image_rect``,
    ``image_rect_color``, realsense's ``image_rect_raw``)? Reads the last name part (the one
    before a transport suffix such as ``/compressed``)."""
    parts = [p for p in str(topic).split('/') if p]
    if parts and parts[-1] in ('compressed', 'compressedDepth', 'theora'):
        parts = parts[:-1]
    return bool(parts) and _RECT_WORD.search(parts[-1]) is not None


class _Drop(Exception):
    """Internal: the frame is dropped for ``reason``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class GroundingCore:
    """Everything the node does to messages; see the module docstring.

    Args:
        pipeline: a :class:`~affordance_core.inference.GroundingPipeline` (or anything with
            ``classes``, ``config`` and ``__call__(rgb, depth=, K=, actions=)``).
        types: where message classes come from (:mod:`affordance_ros.msgtypes`).
        settings: node settings (:class:`~affordance_ros.params.NodeSettings`).
        transform: ``(target_frame, source_frame, stamp_ns) -> (R (3, 3), t (3,)) | None``
            taking points from the camera frame to ``target_frame`` (needed only with a
            ``target_frame``).
        logger: ``.warning`` / ``.info`` / ``.debug`` (default: ``logging`` 'affordance_ros').
        clock: ``() -> ns`` timing message arrivals for the input rates; None = the message
            stamps (rates then cover the window before the newest stamp).
        expect: optional inputs known to stream ('depth', 'camera_info'), waited for from the
            first image on (:meth:`ApproximateSync.expect`); replay passes the bag's topics.
        image_topic: the image's resolved topic name, for ``input_image: auto`` (the node
            sets :attr:`image_topic` when it subscribes).

    Raises:
        ValueError: ``settings.actions`` names an action the model does not know.
    """

    def __init__(self, pipeline: Any, types: MessageTypes, settings: NodeSettings, *,
                 transform: TransformFn | None = None, logger: Any = None,
                 clock: Callable[[], int] | None = None,
                 expect: Iterable[str] = (), image_topic: str = '') -> None:
        self.pipeline: Any = pipeline
        self.image_topic = image_topic
        self.types = types
        self.settings = settings
        self.transform = transform
        self.logger: Any = logger if logger is not None else logging.getLogger('affordance_ros')
        self.clock = clock
        self.classes: tuple[str, ...] = tuple(pipeline.classes)
        self.lock = threading.RLock()
        self.stats = Stats()
        self.active = True
        self._actions: list[str] = []
        err = self.set_actions(settings.actions)
        if err:
            raise ValueError(err)
        self.sync = ApproximateSync(int(round(settings.sync_slop_s * NS)),
                                    settings.sync_queue_size, settings.require_depth,
                                    on_drop=self._count_drop)
        self.sync.expect(*expect)
        self._arrivals: dict[str, deque[int]] = {k: deque(maxlen=512) for k in INPUTS}
        self._published_at: deque[int] = deque(maxlen=512)
        self._last_output_ns: int | None = None
        self._first_diag_ns: int | None = None
        self._drop_history: deque[tuple[int, int, int]] = deque(maxlen=256)
        self._backend_error: str | None = None
        self._last_log: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    # ------------------------------------------------------------------ properties

    @property
    def actions(self) -> list[str]:
        """The actions grounded in every frame (a copy)."""
        return list(self._actions)

    @property
    def backend_name(self) -> str:
        """``pipeline.backend_name``, else the backend's ``name``, else its type name."""
        name = getattr(self.pipeline, 'backend_name', None)
        if name:
            return str(name)
        backend = getattr(self.pipeline, 'backend', None)
        if backend is None:
            return 'none' if self.pipeline is None else type(self.pipeline).__name__
        return str(getattr(backend, 'name', type(backend).__name__))

    def describe(self) -> str:
        """One line for the log: backend, device, classes, actions, mode."""
        backend = getattr(self.pipeline, 'backend', None)
        device = getattr(backend, 'device', None)
        s = self.settings
        return (f"backend {self.backend_name}{f' on {device}' if device else ''}, "
                f"{len(self.classes)} classes, input {getattr(self.pipeline, 'input_size', '?')}"
                f", actions {', '.join(self._actions)}, "
                f"{'RGB-D (depth required)' if s.require_depth else 'RGB(-D)'}, "
                f"{'rectified' if self.rectified else 'raw (lens distortion undone)'} input, "
                f"target_frame '{s.target_frame or '<camera>'}', "
                f'max_input_age {s.max_input_age_ms:g} ms, slop {s.sync_slop_s:g} s')

    @property
    def rectified(self) -> bool:
        """Is the image rectified (``input_image``; 'auto' reads :attr:`image_topic`)?"""
        mode = self.settings.input_image
        if mode != 'auto':
            return mode == 'rectified'
        return is_rectified_topic(self.image_topic)

    # ------------------------------------------------------------------ logging / counting

    def _log(self, reason: str, message: str) -> None:
        """A warning, at most one per ``reason`` per LOG_PERIOD_S (the rest counted)."""
        now = time.monotonic()
        with self.lock:
            last = self._last_log.get(reason)
            if last is not None and now - last < LOG_PERIOD_S:
                self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
                return
            self._last_log[reason] = now
            more = self._suppressed.pop(reason, 0)
        extra = f' ({more} more since the last report)' if more else ''
        try:
            self.logger.warning(f'{reason}: {message}{extra}')
        except Exception:  # a broken logger must never break the node
            pass

    def _count_drop(self, reason: str, count: int = 1, message: str = '') -> None:
        with self.lock:
            self.stats.dropped[reason] = self.stats.dropped.get(reason, 0) + count
        self._log(reason, message or _DROP_TEXT.get(reason, 'frame dropped'))

    def note_drop(self, reason: str, message: str = '') -> None:
        """Count (and log, rate-limited) a drop found outside the core, e.g. a bag message
        that does not deserialise ('bad_image' / 'bad_depth' / 'bad_camera_info')."""
        self._count_drop(reason, message=message)

    def note_received(self, kind: str) -> None:
        """Count a received message that never reached an ``on_*`` method (see
        :meth:`note_drop`)."""
        with self.lock:
            self.stats.received[kind] = self.stats.received.get(kind, 0) + 1

    def _received(self, kind: str, msg: Any) -> None:
        with self.lock:
            self.stats.received[kind] += 1
            if self.clock is not None:
                t = int(self.clock())
            else:
                try:
                    t = stamp_ns(msg.header)
                except Exception:
                    return
            self._arrivals[kind].append(t)

    def _stamp(self, msg: Any, reason: str, what: str) -> int | None:
        try:
            stamp = stamp_ns(msg.header)
        except Exception:
            self._count_drop(reason, message=f'{what} without a header (stamp) dropped')
            return None
        if stamp <= 0:
            self._count_drop(reason, message=f'{what} with a zero or negative stamp dropped')
            return None
        return stamp

    # ------------------------------------------------------------------ inputs

    def on_image(self, msg: Any) -> None:
        """sensor_msgs/Image (colour)."""
        self._received('image', msg)
        stamp = self._stamp(msg, 'bad_image', 'image')
        if stamp is not None:
            self.sync.add_image(msg, stamp)

    def on_compressed_image(self, msg: Any) -> None:
        """sensor_msgs/CompressedImage (jpeg / png colour)."""
        self._received('image', msg)
        stamp = self._stamp(msg, 'bad_image', 'compressed image')
        if stamp is not None:
            self.sync.add_image(msg, stamp)

    def on_depth(self, msg: Any) -> None:
        """sensor_msgs/Image (16UC1 / mono16 / 32FC1) registered to the colour image."""
        self._received('depth', msg)
        stamp = self._stamp(msg, 'bad_depth', 'depth')
        if stamp is not None:
            self.sync.add_depth(msg, stamp)

    def on_camera_info(self, msg: Any) -> None:
        """sensor_msgs/CameraInfo of the colour image."""
        self._received('camera_info', msg)
        stamp = self._stamp(msg, 'bad_camera_info', 'camera_info')
        if stamp is not None:
            self.sync.add_camera_info(msg, stamp)

    def on_action(self, msg: Any) -> bool:
        """std_msgs/String with one action or a comma-separated list; unknown names are
        rejected with a warning and the current actions kept. Returns True when accepted."""
        with self.lock:
            self.stats.received['action'] += 1
        text = str(getattr(msg, 'data', msg))
        names = [a.strip() for a in text.split(',') if a.strip()]
        err = self.set_actions(names)
        if err:
            self._warn_now(f"action '{text}' rejected: {err}; keeping "
                           f"{', '.join(self._actions)}")
            return False
        self._info(f"actions: {', '.join(self._actions)}")
        return True

    def set_actions(self, actions: str | Iterable[str]) -> str | None:
        """Set the actions (validated against the model classes); returns the error message,
        or None when set."""
        names = [actions] if isinstance(actions, str) else [str(a) for a in actions]
        names = list(dict.fromkeys(names))
        err = validate_update('actions', names, self.classes)
        if err:
            return err
        self._actions = names
        return None

    def update_parameter(self, name: str, value: Any) -> str | None:
        """Apply a run-time parameter change (call :func:`params.validate_update` first; it is
        checked again here). Returns the error message or None."""
        err = validate_update(name, value, self.classes)
        if err:
            return err
        if name == 'actions':
            return self.set_actions(value)
        if hasattr(self.settings, name):
            setattr(self.settings, name, float(value) if isinstance(
                getattr(self.settings, name), float) else value)
        elif self.pipeline is not None and hasattr(self.pipeline.config, name):
            current = getattr(self.pipeline.config, name)
            setattr(self.pipeline.config, name,
                    float(value) if isinstance(current, float) else value)
        return None

    def _warn_now(self, message: str) -> None:
        try:
            self.logger.warning(message)
        except Exception:
            pass

    def _info(self, message: str) -> None:
        try:
            self.logger.info(message)
        except Exception:
            pass

    # ------------------------------------------------------------------ frames

    def take_frame(self) -> Frame | None:
        """The newest synchronised frame (emptying the slot), or None."""
        return self.sync.take()

    def process(self, frame: Frame, now_ns: int,
                wanted: Container[str] = OUTPUT_TOPICS) -> dict[str, Any] | None:
        """Run the pipeline on ``frame`` and build the messages of the topics in ``wanted``.

        Returns:
            topic -> message, or None when the frame was dropped (counted and logged).
        """
        t0 = time.perf_counter()
        try:
            out = self._process(frame, int(now_ns), wanted)
        except _Drop as drop:
            self._count_drop(drop.reason, message=str(drop))
            return None
        except Exception as exc:  # never raise from process(): count and log
            self._count_drop('pipeline_error',
                             message=f'unexpected {type(exc).__name__}: {exc}')
            return None
        finally:
            with self.lock:
                self.stats.processing_ms.append((time.perf_counter() - t0) * 1e3)
        with self.lock:
            self.stats.processed += 1
            for topic in out:
                self.stats.outputs[topic] = self.stats.outputs.get(topic, 0) + 1
            self._last_output_ns = int(now_ns)
        return out

    def _decode(self, frame: Frame) -> tuple[np.ndarray, np.ndarray | None,
                                             np.ndarray | None, dict[str, Any]]:
        """rgb, depth, K and the lens distortion keywords of the pipeline (none for rectified
        images and cameras without distortion) of a frame, or _Drop."""
        msg = frame.image
        try:
            if hasattr(msg, 'format') and not hasattr(msg, 'encoding'):
                rgb = compressed_to_rgb(msg)
            else:
                rgb = image_to_rgb(msg)
        except (ConversionError, InputError) as exc:
            raise _Drop('bad_image', str(exc)) from None
        except Exception as exc:  # a message that is not an Image at all
            raise _Drop('bad_image', f'image: {type(exc).__name__}: {exc}') from None
        H, W = rgb.shape[:2]
        depth = K = None
        lens: dict[str, Any] = {}
        if frame.camera_info is not None:
            try:
                rectified = self.rectified
                K = camera_info_to_K(frame.camera_info, image_size=(H, W), rectified=rectified)
                # the lens matters only for the 3-D lifting: RGB-only frames never read d
                dist = (None if rectified or frame.depth is None else
                        camera_info_distortion(frame.camera_info))
                if dist is not None:
                    lens = {'D': dist.coeffs, 'distortion_model': dist.model}
            except (ConversionError, InputError) as exc:
                raise _Drop('bad_camera_info', str(exc)) from None
            except Exception as exc:
                raise _Drop('bad_camera_info',
                            f'camera_info: {type(exc).__name__}: {exc}') from None
        if frame.depth is not None:
            if K is None:
                raise _Drop('no_camera_info', 'depth without camera_info: no K to lift grasps')
            try:
                depth = image_to_depth(frame.depth)
                register_depth(depth.shape, (H, W), K)
            except (ConversionError, InputError) as exc:
                raise _Drop('bad_depth', str(exc)) from None
            except Exception as exc:
                raise _Drop('bad_depth', f'depth: {type(exc).__name__}: {exc}') from None
        return rgb, depth, K, lens

    def _process(self, frame: Frame, now_ns: int, wanted: Container[str]) -> dict[str, Any]:
        pipeline = self.pipeline
        if pipeline is None:
            raise _Drop('pipeline_error', 'the core is closed (no pipeline)')
        s = self.settings
        age_ms = (now_ns - frame.stamp_ns) / 1e6
        if age_ms > s.max_input_age_ms:
            raise _Drop('stale', f'frame {age_ms:.0f} ms old (max_input_age_ms '
                                 f'{s.max_input_age_ms:g})')
        rgb, depth, K, lens = self._decode(frame)
        actions = self.actions
        want_cloud = 'affordance_cloud' in wanted and depth is not None
        try:
            pipeline.config.return_cloud = want_cloud
        except AttributeError:
            pass
        try:
            result = pipeline(rgb, depth=depth, K=K, actions=actions, **lens)
        except InputError as exc:  # inputs passed the checks above; name it anyway
            raise _Drop('bad_depth' if depth is not None and 'depth' in str(exc) else
                        'bad_image', str(exc)) from None
        except Exception as exc:  # RuntimeError from the backend, and anything else
            with self.lock:
                self._backend_error = f'{type(exc).__name__}: {exc}'
            raise _Drop('pipeline_error', f'{type(exc).__name__}: {exc}') from None
        with self.lock:
            self._backend_error = None
            if not result.cached:
                self.stats.model_ms.append(float(result.timings.get('model', math.nan)))

        header = frame.image.header
        out: dict[str, Any] = {}
        if 'heatmap' in wanted:
            heat = np.maximum.reduce([result.heatmaps[a] for a in actions])
            out['heatmap'] = outputs.heatmap_msg(heat, header, self.types)
        if 'overlay' in wanted:
            name = s.overlay_action if s.overlay_action in actions else actions[0]
            out['overlay'] = outputs.overlay_msg(rgb, result.heatmaps[name],
                                                 result.grasps_by_action.get(name, []), K,
                                                 header, self.types, **lens)
        if not any(topic in wanted for topic in OUTPUTS_3D):
            return out

        grasps = list(result.grasps)
        cloud = None
        if want_cloud and result.cloud:
            cloud = merge_clouds([result.cloud[a] for a in actions if a in result.cloud])
        header3d = header
        camera_frame = str(header.frame_id)
        if s.target_frame and s.target_frame != camera_frame:
            tf = self._lookup(s.target_frame, camera_frame, frame.stamp_ns)
            if tf is None:
                self._count_drop('tf_unavailable',
                                 message=f"no transform '{camera_frame}' -> "
                                         f"'{s.target_frame}' at the image stamp: 3-D outputs "
                                         'of this frame dropped')
                return out
            R, t = tf
            grasps = [transform_grasp(g, R, t) for g in grasps]
            if cloud is not None and len(cloud):
                cloud = cloud.copy()
                cloud[:, :3] = (cloud[:, :3].astype(np.float64) @ R.T + t).astype(np.float32)
            header3d = self.types.header(frame.stamp_ns, s.target_frame)
        inference_ms = float(result.timings.get('model', 0.0))
        if 'grasps' in wanted:
            out['grasps'] = outputs.grasps_msg(grasps, actions, inference_ms, header3d,
                                               self.types)
        if 'detections_3d' in wanted:
            out['detections_3d'] = outputs.detections_3d_msg(grasps, header3d, self.types)
        if 'markers' in wanted:
            out['markers'] = outputs.markers_msg(grasps, header3d, self.types,
                                                 int(round(s.marker_lifetime_s * NS)))
        if cloud is not None and 'affordance_cloud' in wanted:
            out['affordance_cloud'] = outputs.cloud_msg(cloud, header3d, self.types)
        return out

    def _lookup(self, target: str, source: str,
                stamp: int) -> tuple[np.ndarray, np.ndarray] | None:
        if self.transform is None:
            return None
        try:
            tf = self.transform(target, source, stamp)
        except Exception as exc:
            self.note_tf_failure(f'{type(exc).__name__}: {exc}')
            return None
        if tf is None:
            return None
        R = np.asarray(tf[0], np.float64).reshape(3, 3)
        t = np.asarray(tf[1], np.float64).reshape(3)
        if not (np.all(np.isfinite(R)) and np.all(np.isfinite(t))):
            return None
        return R, t

    def note_tf_failure(self, message: str) -> None:
        """Log why a transform lookup failed (rate-limited; the drop itself is counted by
        :meth:`process`)."""
        self._log('tf_lookup', message)

    def note_published(self, now_ns: int, frame: Frame) -> None:
        """Record that the outputs of ``frame`` went out at ``now_ns`` (latency sample)."""
        with self.lock:
            self.stats.published += 1
            self.stats.latency_ms.append((int(now_ns) - frame.stamp_ns) / 1e6)
            self._published_at.append(int(now_ns))
            self._last_output_ns = int(now_ns)

    # ------------------------------------------------------------------ diagnostics

    def snapshot(self) -> dict[str, Any]:
        """A consistent, JSON-able copy of the counters and latency statistics."""
        with self.lock:
            st = self.stats
            lat, model, proc = list(st.latency_ms), list(st.model_ms), list(st.processing_ms)
            return {
                'received': dict(st.received), 'processed': st.processed,
                'published': st.published, 'dropped': dict(st.dropped),
                'outputs': dict(st.outputs),
                'latency_ms': {'p50': _percentile(lat, 50), 'p95': _percentile(lat, 95),
                               'max': max(lat) if lat else math.nan},
                'model_ms_median': _percentile(model, 50),
                'processing_ms': {'p50': _percentile(proc, 50), 'p95': _percentile(proc, 95)},
            }

    def diagnostics_report(self, now_ns: int) -> DiagnosticsReport:
        """The :class:`~affordance_ros.outputs.DiagnosticsReport` of :meth:`diagnostics`."""
        now_ns = int(now_ns)
        snap = self.snapshot()
        with self.lock:
            if self._first_diag_ns is None:
                self._first_diag_ns = now_ns
            rates = {}
            for kind in ('image', 'depth', 'camera_info'):
                times = list(self._arrivals[kind])
                end = now_ns if self.clock is not None else (max(times) if times else now_ns)
                rates[kind] = _rate(times, end)
            out_rate = _rate(list(self._published_at), now_ns)
            last_out = self._last_output_ns
            first = self._first_diag_ns
            backend_error = self._backend_error
            images = snap['received']['image']
            drops = self.stats.total_dropped(exclude=('superseded',))
            history = [h for h in self._drop_history if h[0] < now_ns]
            within = [h for h in history if now_ns - h[0] <= DROP_WINDOW_S * NS]
            base = within[0] if within else (history[-1] if history else (now_ns, 0, 0))
            self._drop_history.append((now_ns, images, drops))
        d_images, d_drops = images - base[1], drops - base[2]

        level, problems = DiagnosticsReport.OK, []
        if backend_error is not None:
            level = DiagnosticsReport.ERROR
            problems.append(f'backend failed: {backend_error}')
        since = last_out if last_out is not None else first
        if self.active and since is not None and now_ns - since > NO_FRAMES_WARN_S * NS:
            level = max(level, DiagnosticsReport.WARN)
            problems.append(f'no frames in the last {(now_ns - since) / NS:.1f} s')
        if d_images > 0 and d_drops > DROP_WARN_FRACTION * d_images:
            level = max(level, DiagnosticsReport.WARN)
            problems.append(f'{d_drops} of {d_images} frames dropped')
        lat = snap['latency_ms']
        message = '; '.join(problems) if problems else (
            f"{_fmt(out_rate)} Hz, latency p50 {_fmt(lat['p50'], 0)} ms")
        values: dict[str, str] = {
            'backend': self.backend_name,
            'actions': ', '.join(self._actions),
            'input_rate_image_hz': _fmt(rates['image'], 2),
            'input_rate_depth_hz': _fmt(rates['depth'], 2),
            'input_rate_camera_info_hz': _fmt(rates['camera_info'], 2),
            'output_rate_hz': _fmt(out_rate, 2),
            'latency_p50_ms': _fmt(lat['p50']),
            'latency_p95_ms': _fmt(lat['p95']),
            'latency_max_ms': _fmt(lat['max']),
            'model_ms_median': _fmt(snap['model_ms_median']),
            'processed': str(snap['processed']),
            'published': str(snap['published']),
        }
        for kind, n in snap['received'].items():
            values[f'received_{kind}'] = str(n)
        for reason, n in snap['dropped'].items():
            values[f'dropped_{reason}'] = str(n)
        values['dropped_total'] = str(sum(snap['dropped'].values()))
        if backend_error is not None:
            values['backend_error'] = backend_error
        device = getattr(getattr(self.pipeline, 'backend', None), 'device', '')
        return DiagnosticsReport(name=DIAGNOSTICS_NAME, hardware_id=str(device or ''),
                                 level=level, message=message, values=values)

    def diagnostics(self, now_ns: int) -> Any:
        """``diagnostic_msgs/DiagnosticArray`` with one status 'affordance_ros: grounding'."""
        return outputs.diagnostics_msg(self.diagnostics_report(now_ns), int(now_ns), self.types)

    # ------------------------------------------------------------------ lifetime

    def warm_up(self, runs: int) -> None:
        """Run the pipeline ``runs`` times on synthetic frames (different pixels, so no run is
        served from the frame cache) with depth, so every stage is warm. Not counted."""
        if runs <= 0 or self.pipeline is None:
            return
        rng = np.random.default_rng(0)
        h, w = 240, 320
        K = np.array([[300.0, 0.0, (w - 1) / 2], [0.0, 300.0, (h - 1) / 2], [0.0, 0.0, 1.0]])
        depth = np.full((h, w), 1000, np.uint16)
        for _ in range(int(runs)):
            rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            self.pipeline(rgb, depth=depth, K=K, actions=self._actions)

    def close(self) -> None:
        """Release the pipeline (and the backend's memory) and forget queued messages; later
        frames are dropped as 'pipeline_error'."""
        self.pipeline = None
        self.sync.reset()


_DROP_TEXT = {
    'superseded': 'a synchronised frame was replaced by a newer one before it was processed '
                  '(inference slower than the camera)',
    'out_of_order': 'a message stamped at or before the last synchronised image was dropped',
    'no_depth': 'an image found no depth within sync_slop_s and left the queue',
    'no_camera_info': 'an image found no camera_info within sync_slop_s and left the queue',
}
