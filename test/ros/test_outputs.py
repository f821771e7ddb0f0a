"""affordance_ros.outputs: every builder's message serialises with the rosbags typestore, carries
the source header, and holds the documented values."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from msg_assertions import assert_msg_equal

from affordance_core.cli.ground import draw_grasps
from affordance_core.inference.pipeline import Grasp
from affordance_ros import outputs
from affordance_ros.conversions import image_to_depth
from affordance_ros.msgtypes import BagMessageTypes, stamp_ns
from affordance_ros.outputs import (ORIENTATION_VARIANCE, DiagnosticsReport, cloud_msg,
                                    detections_3d_msg, diagnostics_msg, grasps_msg, heatmap_msg,
                                    markers_msg, overlay_msg)

STAMP = 1_700_000_123_000_000_042
FRAME = 'camera_color_optical_frame'
S = math.sqrt(0.5)
K = np.array([[60.0, 0.0, 32.0], [0.0, 60.0, 24.0], [0.0, 0.0, 1.0]])


@pytest.fixture(scope='module')
def t() -> BagMessageTypes:
    return BagMessageTypes()


@pytest.fixture(scope='module')
def header(t: BagMessageTypes) -> Any:
    return t.header(STAMP, FRAME)


def grasp_list() -> list[Grasp]:
    """Best first: a valid grasp rotated 90 deg about x, an invalid one, a valid one with NaN
    width, and a 'valid' one whose position is NaN (published as invalid)."""
    return [
        # rotation of +90 deg about x: grasp z axis = camera (0, -1, 0)
        Grasp('hold', 0.9, 10.25, 20.5, True, (0.1, -0.05, 0.6), (0.0, 1.0, 0.0),
              (S, 0.0, 0.0, S), 0.04, 0.008),
        Grasp('hold', 0.7, 30.0, 12.0),
        Grasp('cut_with', 0.6, 40.0, 30.0, True, (0.0, 0.1, 0.8), (0.0, 0.0, -1.0),
              (0.0, 0.0, 0.0, 2.0), math.nan, 0.0),  # non-unit quaternion: renormalised
        Grasp('cut_with', 0.3, 5.0, 5.0, True, (math.nan, 0.0, 1.0), (0.0, 0.0, -1.0),
              (0.0, 0.0, 0.0, 1.0), 0.02, 0.01),
    ]


def round_trip(t: BagMessageTypes, msg: Any, msgtype: str) -> Any:
    """serialize_cdr -> deserialize_cdr (fails on any wrong field type) and compare."""
    assert msg.__msgtype__ == msgtype
    ts = t.typestore
    back = ts.deserialize_cdr(ts.serialize_cdr(msg, msgtype), msgtype)
    assert_msg_equal(back, msg)
    return back


def assert_header(h: Any) -> None:
    assert stamp_ns(h) == STAMP and h.frame_id == FRAME


# ------------------------------------------------------------------------- heatmap


def test_heatmap(t: BagMessageTypes, header: Any) -> None:
    heat = np.random.default_rng(0).random((6, 9)).astype(np.float32)
    msg = round_trip(t, heatmap_msg(heat, header, t), 'sensor_msgs/msg/Image')
    assert_header(msg.header)
    assert msg.encoding == '32FC1' and msg.is_bigendian == 0
    assert (msg.height, msg.width, msg.step) == (6, 9, 36)
    assert msg.data.size == 6 * 36
    np.testing.assert_array_equal(np.frombuffer(msg.data.tobytes(), '<f4').reshape(6, 9), heat)
    np.testing.assert_array_equal(image_to_depth(msg), heat)


def test_heatmap_clips_and_casts(t: BagMessageTypes, header: Any) -> None:
    heat = np.array([[-0.25, 0.5], [1.5, 1.0]])
    np.testing.assert_array_equal(image_to_depth(heatmap_msg(heat, header, t)),
                                  [[0.0, 0.5], [1.0, 1.0]])


@pytest.mark.parametrize('heat, text', [
    (np.zeros((2, 3, 1), np.float32), 'non-empty (H, W)'),
    (np.zeros((0, 3), np.float32), 'non-empty (H, W)'),
    (np.array([[0.1, np.nan]], np.float32), '1 non-finite'),
    (np.array([['a']]), 'float array'),
])
def test_heatmap_rejects(t: BagMessageTypes, header: Any, heat: np.ndarray, text: str) -> None:
    with pytest.raises(ValueError, match=text.replace('(', r'\(').replace(')', r'\)')):
        heatmap_msg(heat, header, t)


# ------------------------------------------------------------------------- overlay


def test_overlay(t: BagMessageTypes, header: Any) -> None:
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    heat = rng.random((48, 64)).astype(np.float32)
    grasps = grasp_list()[:3]
    msg = round_trip(t, overlay_msg(rgb, heat, grasps, K, header, t), 'sensor_msgs/msg/Image')
    assert_header(msg.header)
    assert msg.encoding == 'bgr8' and (msg.height, msg.width, msg.step) == (48, 64, 192)
    bgr = msg.data.reshape(48, 64, 3)
    np.testing.assert_array_equal(bgr[:, :, ::-1], draw_grasps(rgb, heat, grasps, K))
    # without K (no 3-D arrows) it still works
    msg = overlay_msg(rgb, heat, grasps, None, header, t)
    np.testing.assert_array_equal(msg.data.reshape(48, 64, 3)[:, :, ::-1],
                                  draw_grasps(rgb, heat, grasps, None))


# -------------------------------------------------------------------------- grasps


def test_grasps(t: BagMessageTypes, header: Any) -> None:
    grasps = grasp_list()
    msg = round_trip(t, grasps_msg(grasps, ['hold', 'cut_with'], 12.5, header, t),
                     'affordance_ros/msg/AffordanceGraspArray')
    assert_header(msg.header)
    assert msg.actions == ['hold', 'cut_with']
    assert msg.inference_ms == pytest.approx(12.5)
    assert [g.action for g in msg.grasps] == [g.action for g in grasps]
    for out, g in zip(msg.grasps, grasps):
        assert out.score == pytest.approx(g.score, abs=1e-6)
        assert (out.u, out.v) == pytest.approx((g.u, g.v), abs=1e-5)
    assert [g.valid_3d for g in msg.grasps] == [True, False, True, False]

    # hand check of grasp 0: 90 deg about x -> quaternion (sin 45, 0, 0, cos 45)
    g0 = msg.grasps[0]
    p, q = g0.pose.position, g0.pose.orientation
    assert (p.x, p.y, p.z) == pytest.approx((0.1, -0.05, 0.6))
    assert (q.x, q.y, q.z, q.w) == pytest.approx((S, 0.0, 0.0, S))
    assert g0.width == pytest.approx(0.04) and g0.depth_spread == pytest.approx(0.008)
    assert g0.width == float(np.float32(0.04))  # float32 fields carry float32 values
    np.testing.assert_allclose(grasps[0].rotation()[:, 2], [0.0, -1.0, 0.0], atol=1e-12)

    # no valid 3-D: zeros, identity orientation, width and spread 0 (never NaN)
    for i in (1, 3):
        out = msg.grasps[i]
        p, q = out.pose.position, out.pose.orientation
        assert (p.x, p.y, p.z, q.x, q.y, q.z, q.w) == (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0)
        assert out.width == 0.0 and out.depth_spread == 0.0

    # valid with a NaN width: width 0; non-unit quaternion renormalised
    g2 = msg.grasps[2]
    assert g2.width == 0.0 and g2.depth_spread == 0.0
    q = g2.pose.orientation
    assert (q.x, q.y, q.z, q.w) == pytest.approx((0.0, 0.0, 0.0, 1.0))


def test_grasps_empty(t: BagMessageTypes, header: Any) -> None:
    msg = round_trip(t, grasps_msg([], ['hold'], 0.0, header, t),
                     'affordance_ros/msg/AffordanceGraspArray')
    assert msg.grasps == [] and msg.actions == ['hold']


# ---------------------------------------------------------------------- detections


def test_detections_3d(t: BagMessageTypes, header: Any) -> None:
    grasps = grasp_list()
    msg = round_trip(t, detections_3d_msg(grasps, header, t),
                     'vision_msgs/msg/Detection3DArray')
    assert_header(msg.header)
    assert len(msg.detections) == 2  # the valid_3d grasps only (0 and 2)
    for det, g in zip(msg.detections, (grasps[0], grasps[2])):
        assert_header(det.header)
        assert det.id == ''
        assert len(det.results) == 1
        hyp = det.results[0]
        assert hyp.hypothesis.class_id == g.action
        assert hyp.hypothesis.score == pytest.approx(g.score)
        pose = hyp.pose.pose
        assert (pose.position.x, pose.position.y, pose.position.z) == pytest.approx(g.position)
        assert_msg_equal(det.bbox.center, pose)
        cov = np.asarray(hyp.pose.covariance).reshape(6, 6)
        std = max(g.depth_spread, 0.005)
        np.testing.assert_allclose(np.diag(cov), [std ** 2] * 3 + [(math.pi / 4) ** 2] * 3)
        assert np.count_nonzero(cov - np.diag(np.diag(cov))) == 0
    d0, d1 = msg.detections
    assert np.asarray(d0.results[0].pose.covariance)[0] == pytest.approx(0.008 ** 2)
    assert ORIENTATION_VARIANCE == pytest.approx((math.pi / 4) ** 2)
    assert (d0.bbox.size.x, d0.bbox.size.y, d0.bbox.size.z) == pytest.approx((0.04, 0.04, 0.008))
    # NaN width and zero spread: the 5 mm floor
    assert (d1.bbox.size.x, d1.bbox.size.y, d1.bbox.size.z) == pytest.approx((0.005,) * 3)
    assert np.asarray(d1.results[0].pose.covariance)[0] == pytest.approx(0.005 ** 2)


def test_detections_none_valid(t: BagMessageTypes, header: Any) -> None:
    msg = round_trip(t, detections_3d_msg([grasp_list()[1]], header, t),
                     'vision_msgs/msg/Detection3DArray')
    assert msg.detections == []
    assert_header(msg.header)


# ------------------------------------------------------------------------- markers


def test_markers(t: BagMessageTypes, header: Any) -> None:
    grasps = grasp_list()
    valid = [grasps[0], grasps[2]]
    msg = round_trip(t, markers_msg(grasps, header, t, lifetime_ns=1_500_000_000),
                     'visualization_msgs/msg/MarkerArray')
    markers = msg.markers
    assert len(markers) == 1 + 2 * len(valid)
    assert markers[0].action == 3  # DELETEALL
    for m in markers:
        assert_header(m.header)
        assert m.frame_locked is False
    ids = [(m.ns, m.id) for m in markers[1:]]
    assert len(set(ids)) == len(ids)
    assert len({m.id for m in markers[1:]}) == len(ids)  # unique across namespaces too
    for i, g in enumerate(valid):
        sphere, arrow = markers[1 + 2 * i], markers[2 + 2 * i]
        assert sphere.type == 2 and arrow.type == 0
        assert sphere.action == 0 and arrow.action == 0
        assert sphere.ns == arrow.ns == g.action
        assert (sphere.lifetime.sec, sphere.lifetime.nanosec) == (1, 500_000_000)
        assert (arrow.lifetime.sec, arrow.lifetime.nanosec) == (1, 500_000_000)
        pos = sphere.pose.position
        assert (pos.x, pos.y, pos.z) == pytest.approx(g.position)
        assert (sphere.scale.x, sphere.scale.y, sphere.scale.z) == pytest.approx((0.02,) * 3)
        assert len(arrow.points) == 2
        o = arrow.pose.orientation
        assert (arrow.pose.position.x, o.w) == (0.0, 1.0)
        start = np.array([arrow.points[0].x, arrow.points[0].y, arrow.points[0].z])
        end = np.array([arrow.points[1].x, arrow.points[1].y, arrow.points[1].z])
        np.testing.assert_allclose(end, g.position)
        approach = g.rotation()[:, 2]  # grasp z axis from transforms3d (unit quaternion)
        if i == 1:
            approach = np.array([0.0, 0.0, 1.0])  # (0, 0, 0, 2) renormalised -> identity
        np.testing.assert_allclose(start, np.array(g.position) - 0.1 * approach, atol=1e-12)
        assert sphere.color.a == 1.0
    # grasp 0: approach (0, -1, 0) -> the arrow starts 10 cm "below" in y
    np.testing.assert_allclose([markers[2].points[0].x, markers[2].points[0].y,
                                markers[2].points[0].z], [0.1, 0.05, 0.6], atol=1e-12)
    # colour by rank: the best is green, the worst red
    best, worst = markers[1].color, markers[3].color
    assert (best.r, best.g) == (0.0, 1.0) and (worst.r, worst.g) == (1.0, 0.0)


def test_markers_without_valid_grasps(t: BagMessageTypes, header: Any) -> None:
    msg = round_trip(t, markers_msg([grasp_list()[1]], header, t, lifetime_ns=0),
                     'visualization_msgs/msg/MarkerArray')
    assert len(msg.markers) == 1 and msg.markers[0].action == 3
    assert_header(msg.markers[0].header)


# --------------------------------------------------------------------------- cloud


def test_cloud(t: BagMessageTypes, header: Any) -> None:
    pts = np.random.default_rng(2).random((7, 4)).astype(np.float32)
    msg = round_trip(t, cloud_msg(pts, header, t), 'sensor_msgs/msg/PointCloud2')
    assert_header(msg.header)
    assert (msg.height, msg.width, msg.point_step, msg.row_step) == (1, 7, 16, 112)
    assert msg.is_bigendian is False and msg.is_dense is True
    assert [(f.name, f.offset, f.datatype, f.count) for f in msg.fields] == [
        ('x', 0, 7, 1), ('y', 4, 7, 1), ('z', 8, 7, 1), ('heat', 12, 7, 1)]
    decoded = np.frombuffer(msg.data.tobytes(), '<f4').reshape(msg.width, 4)
    np.testing.assert_array_equal(decoded, pts)
    structured = np.frombuffer(msg.data.tobytes(), dtype=np.dtype(
        {'names': ['x', 'y', 'z', 'heat'], 'formats': ['<f4'] * 4,
         'offsets': [0, 4, 8, 12], 'itemsize': 16}))
    np.testing.assert_array_equal(structured['heat'], pts[:, 3])


def test_cloud_nan_and_empty(t: BagMessageTypes, header: Any) -> None:
    pts = np.array([[0.0, 0.0, np.nan, 0.5], [1.0, 2.0, 3.0, 0.9]], np.float64)
    msg = round_trip(t, cloud_msg(pts, header, t), 'sensor_msgs/msg/PointCloud2')
    assert msg.is_dense is False
    np.testing.assert_array_equal(np.frombuffer(msg.data.tobytes(), '<f4').reshape(2, 4),
                                  pts.astype(np.float32))
    msg = round_trip(t, cloud_msg(np.zeros((0, 4), np.float32), header, t),
                     'sensor_msgs/msg/PointCloud2')
    assert (msg.width, msg.row_step, msg.data.size, msg.is_dense) == (0, 0, 0, True)
    with pytest.raises(ValueError, match=r'cloud: expected an \(N, 4\)'):
        cloud_msg(np.zeros((3, 3), np.float32), header, t)


# ---------------------------------------------------------------------- diagnostics


def test_diagnostics(t: BagMessageTypes) -> None:
    reports = [DiagnosticsReport('grounding_node: inference', 'NVIDIA H100', DiagnosticsReport.OK,
                                 'running', {'fps': '9.5', 'latency_ms_p50': '31'}),
               DiagnosticsReport('grounding_node: inputs', level=2, message='no depth',
                                 values={'dropped': 3})]  # type: ignore[dict-item]
    msg = round_trip(t, diagnostics_msg(reports, 42, t), 'diagnostic_msgs/msg/DiagnosticArray')
    assert stamp_ns(msg.header) == 42 and msg.header.frame_id == ''
    assert [s.level for s in msg.status] == [0, 2]
    assert [s.name for s in msg.status] == ['grounding_node: inference',
                                            'grounding_node: inputs']
    assert msg.status[0].hardware_id == 'NVIDIA H100' and msg.status[1].hardware_id == ''
    assert [(kv.key, kv.value) for kv in msg.status[0].values] == [('fps', '9.5'),
                                                                   ('latency_ms_p50', '31')]
    assert [(kv.key, kv.value) for kv in msg.status[1].values] == [('dropped', '3')]
    single = round_trip(t, diagnostics_msg(DiagnosticsReport('x', level=3), 7, t),
                        'diagnostic_msgs/msg/DiagnosticArray')
    assert len(single.status) == 1 and single.status[0].level == 3


@pytest.mark.parametrize('level', [4, -1, True])
def test_diagnostics_report_level(level: Any) -> None:
    with pytest.raises(ValueError, match='level must be 0'):
        DiagnosticsReport('x', level=level)


def test_position_std_floor() -> None:
    g = Grasp('a', 1.0, 0.0, 0.0, True, (0, 0, 1), (0, 0, -1), (0, 0, 0, 1), 0.1, 0.001)
    assert outputs.position_std(g) == pytest.approx(0.005)
    g = Grasp('a', 1.0, 0.0, 0.0, True, (0, 0, 1), (0, 0, -1), (0, 0, 0, 1), 0.1, 0.02)
    assert outputs.position_std(g) == pytest.approx(0.02)
