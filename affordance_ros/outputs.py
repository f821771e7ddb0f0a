"""Output message builders of the grounding node (pure functions, no ROS client).

Every builder takes the **source image header** and copies its stamp and frame_id into every
output message, including each ``Detection3D`` and ``Marker`` (the frame is the camera optical
frame, or ``target_frame`` when the core has transformed the grasps). Message classes come from a
:class:`~affordance_ros.msgtypes.MessageTypes`. Units: metres, radians, nanoseconds; quaternions
of :class:`~affordance_core.inference.pipeline.Grasp` are (x, y, z, w); the grasp z axis is the
approach direction into the surface, x the closing direction.

Choices for consumers (NaN in poses breaks planners and RViz, so none is ever published):

* ``AffordanceGrasp`` with ``valid_3d`` false: ``pose`` = position (0, 0, 0) and the identity
  orientation (0, 0, 0, 1), ``width`` = 0, ``depth_spread`` = 0. A grasp whose position or
  quaternion is not finite is published as ``valid_3d`` false. A valid grasp's non-finite
  ``width`` / ``depth_spread`` is published as 0. Quaternions are renormalised.
* ``Detection3D`` (valid_3d grasps only, one per grasp, best first): ``results[0]`` =
  hypothesis (class_id = action, score) + the grasp pose; covariance (6x6 row-major, x y z
  rotX rotY rotZ) diagonal only: position variance ``max(depth_spread, 0.005 m)^2`` on x, y and
  z, orientation variance ``(pi/4)^2`` (about 45 degrees standard deviation: the approach axis
  comes from a local plane fit, the closing axis from the heat blob); bbox centre = grasp pose,
  size = (width, width, depth_spread), each at least 0.005 m; ``id`` empty (no tracking).
* ``MarkerArray``: first one DELETEALL marker, then per valid grasp (rank r among valid grasps,
  best = 0) a SPHERE (id 2r, diameter 0.02 m) at the point and an ARROW (id 2r + 1, points
  form: from 0.1 m before the point along the approach axis to the point); ns = action; colour
  from green (best) to red (worst); ``lifetime`` from ``lifetime_ns`` (0 = forever);
  ``frame_locked`` false.
* ``PointCloud2``: fields x, y, z, heat as FLOAT32, point_step 16, height 1, little-endian;
  ``is_dense`` is true when every value is finite.
* heatmap: 32FC1 (float32 little-endian, step = 4 * width), values clipped to [0, 1].
* overlay: bgr8, drawn by ``affordance_core.cli.ground.draw_grasps``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import numpy as np

from affordance_ros.conversions import numpy_to_image
from affordance_ros.msgtypes import MessageTypes, stamp_ns

if TYPE_CHECKING:
    from affordance_core.inference.pipeline import Grasp

__all__ = ['DiagnosticsReport', 'heatmap_msg', 'overlay_msg', 'grasps_msg', 'detections_3d_msg',
           'markers_msg', 'cloud_msg', 'diagnostics_msg', 'position_std', 'MIN_EXTENT_M',
           'ORIENTATION_VARIANCE', 'ARROW_LENGTH_M', 'SPHERE_DIAMETER_M']

MIN_EXTENT_M = 0.005                      # floor of the position std and of the bbox sides
ORIENTATION_VARIANCE = (math.pi / 4) ** 2  # rad^2 on rotX, rotY, rotZ
ARROW_LENGTH_M = 0.10                     # approach arrow length, as in affordance-ground
SPHERE_DIAMETER_M = 0.02
ARROW_SCALE = (0.008, 0.016, 0.025)       # shaft diameter, head diameter, head length (metres)
DELETEALL = 3
SPHERE = 2
ARROW = 0
ADD = 0
FLOAT32 = 7                               # sensor_msgs/PointField.FLOAT32
CLOUD_FIELDS = ('x', 'y', 'z', 'heat')


@dataclass
class DiagnosticsReport:
    """One ``diagnostic_msgs/DiagnosticStatus``.

    Attributes:
        name: status name, e.g. ``'grounding_node: inference'``.
        hardware_id: e.g. the GPU name or the camera; may be empty.
        level: OK 0, WARN 1, ERROR 2, STALE 3.
        message: one-line summary.
        values: key -> value (strings; other values are converted with ``str``).
    """

    OK: ClassVar[int] = 0
    WARN: ClassVar[int] = 1
    ERROR: ClassVar[int] = 2
    STALE: ClassVar[int] = 3

    name: str
    hardware_id: str = ''
    level: int = 0
    message: str = ''
    values: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.level, bool) or int(self.level) not in (0, 1, 2, 3):
            raise ValueError(f'DiagnosticsReport.level must be 0 (OK), 1 (WARN), 2 (ERROR) or '
                             f'3 (STALE), got {self.level!r}')
        self.level = int(self.level)


# ------------------------------------------------------------------------------ helpers


def _header(header: Any, types: MessageTypes) -> Any:
    """A fresh copy of the source header (stamp and frame_id)."""
    return types.header(stamp_ns(header), str(header.frame_id))


def _finite(*values: float) -> bool:
    return all(math.isfinite(float(v)) for v in values)


def _valid_3d(g: Any) -> bool:
    """valid_3d with a finite position and a finite, non-zero quaternion."""
    if not g.valid_3d or not _finite(*g.position, *g.quaternion):
        return False
    return float(np.linalg.norm(np.asarray(g.quaternion, dtype=np.float64))) > 1e-9


def _unit_quat(q: Sequence[float]) -> np.ndarray:
    v = np.asarray(q, dtype=np.float64)
    return v / np.linalg.norm(v)


def _pose(types: MessageTypes, position: Sequence[float] | np.ndarray,
          quat_xyzw: Sequence[float] | np.ndarray) -> Any:
    x, y, z = (float(c) for c in position)
    qx, qy, qz, qw = (float(c) for c in quat_xyzw)
    return types.make('geometry_msgs/msg/Pose',
                      position=types.make('geometry_msgs/msg/Point', x=x, y=y, z=z),
                      orientation=types.make('geometry_msgs/msg/Quaternion',
                                             x=qx, y=qy, z=qz, w=qw))


def _grasp_pose(types: MessageTypes, g: Any) -> Any:
    """The grasp pose, or zeros + identity when it has no valid 3-D."""
    if _valid_3d(g):
        return _pose(types, g.position, _unit_quat(g.quaternion))
    return _pose(types, (0.0, 0.0, 0.0), (0.0, 0.0, 0.0, 1.0))


def _f32(x: float) -> float:
    """The value a float32 field carries (so a message equals its serialised round trip)."""
    return float(np.float32(x))


def _or_zero(x: float) -> float:
    x = float(x)
    return x if math.isfinite(x) else 0.0


def _vector3(types: MessageTypes, x: float, y: float, z: float) -> Any:
    return types.make('geometry_msgs/msg/Vector3', x=float(x), y=float(y), z=float(z))


def _color(types: MessageTypes, rgba: Sequence[float]) -> Any:
    r, g, b, a = (float(c) for c in rgba)
    return types.make('std_msgs/msg/ColorRGBA', r=r, g=g, b=b, a=a)


def _rank_color(rank: int, n: int) -> tuple[float, float, float, float]:
    """Green (best) -> yellow -> red (worst), opaque."""
    t = rank / (n - 1) if n > 1 else 0.0
    return (min(1.0, 2 * t), min(1.0, 2 * (1 - t)), 0.0, 1.0)


def _quat_z_axis(q: np.ndarray) -> np.ndarray:
    """Third column of the rotation matrix of a unit (x, y, z, w) quaternion."""
    x, y, z, w = q
    return np.array([2 * (x * z + w * y), 2 * (y * z - w * x), 1 - 2 * (x * x + y * y)])


def _marker(types: MessageTypes, header: Any, *, ns: str, mid: int, mtype: int, action: int,
            pose: Any, scale: tuple[float, float, float], rgba: Sequence[float],
            lifetime_ns: int, points: Sequence[Sequence[float] | np.ndarray] = ()) -> Any:
    empty_header = types.header(0, '')
    return types.make(
        'visualization_msgs/msg/Marker', header=header, ns=ns, id=int(mid), type=int(mtype),
        action=int(action), pose=pose, scale=_vector3(types, *scale), color=_color(types, rgba),
        lifetime=types.duration(lifetime_ns), frame_locked=False,
        points=[types.make('geometry_msgs/msg/Point', x=float(p[0]), y=float(p[1]),
                           z=float(p[2])) for p in points],
        colors=[], texture_resource='',
        texture=types.make('sensor_msgs/msg/CompressedImage', header=empty_header, format='',
                           data=types.u8_array(b'')),
        uv_coordinates=[], text='', mesh_resource='',
        mesh_file=types.make('visualization_msgs/msg/MeshFile', filename='',
                             data=types.u8_array(b'')),
        mesh_use_embedded_materials=False)


# ----------------------------------------------------------------------------- builders


def heatmap_msg(heat: np.ndarray, header: Any, types: MessageTypes) -> Any:
    """(H, W) heatmap in [0, 1] -> sensor_msgs/Image 32FC1 (values clipped to [0, 1]).

    Raises:
        ValueError: not a non-empty 2-D array, or non-finite values.
    """
    h = np.asarray(heat)
    if h.ndim != 2 or h.size == 0:
        raise ValueError(f'heatmap: expected a non-empty (H, W) array, got shape {h.shape}')
    if h.dtype.kind not in 'fiub':
        raise ValueError(f'heatmap: expected a float array, got {h.dtype}')
    h = h.astype(np.float32)
    if not np.all(np.isfinite(h)):
        raise ValueError(f'heatmap: {int(np.count_nonzero(~np.isfinite(h)))} non-finite values')
    return numpy_to_image(np.clip(h, 0.0, 1.0), '32FC1', header, types)


def overlay_msg(rgb: np.ndarray, heat: np.ndarray, grasps: Sequence[Grasp],
                K: np.ndarray | None, header: Any, types: MessageTypes, **lens: Any) -> Any:
    """Heatmap overlay with the numbered grasps (and 3-D arrows when K is given) -> bgr8 Image.

    Args:
        rgb: (H, W, 3) uint8 RGB source image.
        heat: (H, W) heatmap in [0, 1].
        grasps: grasps to draw, best first.
        K: 3x3 intrinsics of ``rgb`` (only for the arrows of valid_3d grasps), or None.
        lens: ``D`` and ``distortion_model`` of a raw ``rgb`` (arrows projected through them).
    """
    from affordance_core.cli.ground import draw_grasps

    img = draw_grasps(np.asarray(rgb), np.asarray(heat), list(grasps), K, **lens)
    return numpy_to_image(np.ascontiguousarray(img[:, :, ::-1]), 'bgr8', header, types)


def grasps_msg(grasps: Sequence[Grasp], actions: Sequence[str], inference_ms: float,
               header: Any, types: MessageTypes) -> Any:
    """``affordance_ros/msg/AffordanceGraspArray`` with every grasp, in the given order."""
    items = []
    for g in grasps:
        valid = _valid_3d(g)
        items.append(types.make(
            'affordance_ros/msg/AffordanceGrasp', action=str(g.action), score=_f32(g.score),
            u=_f32(g.u), v=_f32(g.v), valid_3d=valid, pose=_grasp_pose(types, g),
            width=_f32(_or_zero(g.width)) if valid else 0.0,
            depth_spread=_f32(_or_zero(g.depth_spread)) if valid else 0.0))
    return types.make('affordance_ros/msg/AffordanceGraspArray', header=_header(header, types),
                      actions=[str(a) for a in actions], grasps=items,
                      inference_ms=_f32(inference_ms))


def position_std(g: Any) -> float:
    """Standard deviation (metres) used for the position covariance of a detection."""
    return max(_or_zero(g.depth_spread), MIN_EXTENT_M)


def detections_3d_msg(grasps: Sequence[Grasp], header: Any, types: MessageTypes) -> Any:
    """``vision_msgs/msg/Detection3DArray``: one Detection3D per valid_3d grasp (see the module
    docstring for the covariance and bbox conventions)."""
    detections = []
    for g in grasps:
        if not _valid_3d(g):
            continue
        var_p = position_std(g) ** 2
        cov = np.diag([var_p] * 3 + [ORIENTATION_VARIANCE] * 3).reshape(-1)
        hyp = types.make('vision_msgs/msg/ObjectHypothesisWithPose',
                         hypothesis=types.make('vision_msgs/msg/ObjectHypothesis',
                                               class_id=str(g.action), score=float(g.score)),
                         pose=types.make('geometry_msgs/msg/PoseWithCovariance',
                                         pose=_grasp_pose(types, g),
                                         covariance=types.f64_array(cov)))
        width = max(_or_zero(g.width), MIN_EXTENT_M)
        bbox = types.make('vision_msgs/msg/BoundingBox3D', center=_grasp_pose(types, g),
                          size=_vector3(types, width, width,
                                        max(_or_zero(g.depth_spread), MIN_EXTENT_M)))
        detections.append(types.make('vision_msgs/msg/Detection3D',
                                     header=_header(header, types), results=[hyp], bbox=bbox,
                                     id=''))
    return types.make('vision_msgs/msg/Detection3DArray', header=_header(header, types),
                      detections=detections)


def markers_msg(grasps: Sequence[Grasp], header: Any, types: MessageTypes,
                lifetime_ns: int) -> Any:
    """``visualization_msgs/msg/MarkerArray``: DELETEALL, then a SPHERE and an approach ARROW
    per valid_3d grasp (1 + 2 * valid markers)."""
    identity = (0.0, 0.0, 0.0, 1.0)
    origin = (0.0, 0.0, 0.0)
    markers = [_marker(types, _header(header, types), ns='', mid=0, mtype=ARROW,
                       action=DELETEALL, pose=_pose(types, origin, identity),
                       scale=(0.0, 0.0, 0.0), rgba=(0.0, 0.0, 0.0, 0.0), lifetime_ns=0)]
    valid = [g for g in grasps if _valid_3d(g)]
    for rank, g in enumerate(valid):
        p = np.asarray(g.position, dtype=np.float64)
        start = p - ARROW_LENGTH_M * _quat_z_axis(_unit_quat(g.quaternion))
        rgba = _rank_color(rank, len(valid))
        markers.append(_marker(types, _header(header, types), ns=str(g.action), mid=2 * rank,
                               mtype=SPHERE, action=ADD, pose=_pose(types, p, identity),
                               scale=(SPHERE_DIAMETER_M,) * 3, rgba=rgba,
                               lifetime_ns=lifetime_ns))
        markers.append(_marker(types, _header(header, types), ns=str(g.action),
                               mid=2 * rank + 1, mtype=ARROW, action=ADD,
                               pose=_pose(types, origin, identity), scale=ARROW_SCALE,
                               rgba=rgba, lifetime_ns=lifetime_ns, points=(start, p)))
    return types.make('visualization_msgs/msg/MarkerArray', markers=markers)


def cloud_msg(points: np.ndarray, header: Any, types: MessageTypes) -> Any:
    """(N, 4) x, y, z, heat -> sensor_msgs/PointCloud2 (FLOAT32 fields, point_step 16).

    Raises:
        ValueError: not an (N, 4) numeric array.
    """
    pts = np.asarray(points)
    if pts.ndim != 2 or pts.shape[1] != 4 or pts.dtype.kind not in 'fiu':
        raise ValueError(f'cloud: expected an (N, 4) float array (x, y, z, heat), got shape '
                         f'{pts.shape} {pts.dtype}')
    data = np.ascontiguousarray(pts, dtype='<f4')
    n = int(data.shape[0])
    fields = [types.make('sensor_msgs/msg/PointField', name=name, offset=4 * i,
                         datatype=FLOAT32, count=1) for i, name in enumerate(CLOUD_FIELDS)]
    return types.make('sensor_msgs/msg/PointCloud2', header=_header(header, types), height=1,
                      width=n, fields=fields, is_bigendian=False, point_step=16,
                      row_step=16 * n, data=types.u8_array(data.tobytes()),
                      is_dense=bool(np.all(np.isfinite(data))))


def diagnostics_msg(status: DiagnosticsReport | Sequence[DiagnosticsReport], stamp_ns: int,
                    types: MessageTypes) -> Any:
    """``diagnostic_msgs/msg/DiagnosticArray`` with one DiagnosticStatus per report (header
    stamp = ``stamp_ns``, empty frame_id)."""
    reports = [status] if isinstance(status, DiagnosticsReport) else list(status)
    cls: Any = types['diagnostic_msgs/msg/DiagnosticStatus']
    levels = (cls.OK, cls.WARN, cls.ERROR, cls.STALE)  # int (rosbags) or bytes (rclpy)
    items = [types.make('diagnostic_msgs/msg/DiagnosticStatus', level=levels[r.level],
                        name=str(r.name), message=str(r.message),
                        hardware_id=str(r.hardware_id),
                        values=[types.make('diagnostic_msgs/msg/KeyValue', key=str(k),
                                           value=str(v)) for k, v in r.values.items()])
             for r in reports]
    return types.make('diagnostic_msgs/msg/DiagnosticArray', header=types.header(stamp_ns, ''),
                      status=items)
