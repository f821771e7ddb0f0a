"""GroundingCore with a fake backend and rosbags message classes: outputs and their headers,
3-D on a synthetic plane, every malformed input field (counted, never raised, no output),
sync drops, stale frames, backend failures, target_frame transforms, diagnostics, logging."""
from __future__ import annotations

import logging
import math

import cv2
import numpy as np
import pytest
from transforms3d.euler import euler2mat

from affordance_core.inference.pipeline import GroundingPipeline, PipelineConfig
from affordance_ros.bagtools import camera_info_msg
from affordance_ros.conversions import image_to_depth, image_to_rgb, numpy_to_image
from affordance_ros.core import DIAGNOSTICS_NAME, DROP_REASONS, OUTPUT_TOPICS, GroundingCore, \
    merge_clouds
from affordance_ros.msgtypes import BagMessageTypes, stamp_ns
from affordance_ros.params import NodeSettings

CLASSES = ('hold', 'cut_with', 'pour')
H, W = 120, 160
K = np.array([[130.0, 0.0, 79.5], [0.0, 130.0, 59.5], [0.0, 0.0, 1.0]])
FRAME = 'camera_color_optical_frame'
MS = 1_000_000
T0 = 1_700_000_000 * 1_000_000_000  # a realistic epoch stamp


@pytest.fixture(scope='module')
def types():
    return BagMessageTypes()


def minmax(x):
    lo, hi = float(x.min()), float(x.max())
    return np.zeros_like(x) if hi - lo < 1e-12 else (x - lo) / (hi - lo)


def blob(centre, sigma=1.2):
    rr, cc = np.mgrid[0:16, 0:16].astype(np.float64)
    return np.exp(-((rr - centre[0]) ** 2 + (cc - centre[1]) ** 2) / (2 * sigma ** 2))


class FakeBackend:
    """Fixed CAMs: 'hold' peaks at grid (8, 6), 'pour' at (4, 11); can be told to fail."""

    name = 'fake'
    device = 'cpu'

    def __init__(self):
        self.classes, self.input_size = CLASSES, 224
        self.cams = np.zeros((3, 16, 16), np.float32)
        self.cams[0] = blob((8, 6))
        self.cams[2] = blob((4, 11))
        self.calls = 0
        self.fail = False

    def __call__(self, images):
        self.calls += 1
        if self.fail:
            raise RuntimeError('CUDA error: an illegal memory access was encountered')
        s = self.input_size
        maps = np.stack([minmax(cv2.resize(c, (s, s), interpolation=cv2.INTER_LINEAR))
                         for c in self.cams])
        return self.cams[None].copy(), maps[None].astype(np.float32)


def make_core(types, *, logger=None, transform=None, clock=None, expect=(), **settings):
    backend = FakeBackend()
    pipe = GroundingPipeline(PipelineConfig(top_k=3), backend=backend)
    cfg = dict(actions=['hold'], require_depth=True)
    cfg.update(settings)
    core = GroundingCore(pipe, types, NodeSettings(**cfg), transform=transform,
                         logger=logger or logging.getLogger('test_core'), clock=clock,
                         expect=expect)
    return core, backend


def rgb_image(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def plane_depth(z_mm=1000, shape=(H, W)):
    return np.full(shape, z_mm, np.uint16)


def messages(types, stamp, *, rgb=None, depth=None, frame_id=FRAME, k=K, info_size=(H, W),
             encoding='rgb8'):
    header = types.header(stamp, frame_id)
    rgb = rgb_image() if rgb is None else rgb
    img = numpy_to_image(rgb if encoding == 'rgb8' else rgb[:, :, ::-1].copy(), encoding,
                         header, types)
    dep = numpy_to_image(plane_depth() if depth is None else depth,
                         '16UC1' if (depth is None or depth.dtype == np.uint16) else '32FC1',
                         header, types)
    info = camera_info_msg(k, info_size[0], info_size[1], header, types)
    return img, dep, info


def feed(core, img=None, dep=None, info=None):
    if dep is not None:
        core.on_depth(dep)
    if info is not None:
        core.on_camera_info(info)
    if img is not None:
        core.on_image(img)
    return core.take_frame()


def run_frame(core, types, stamp=T0, now=None, wanted=OUTPUT_TOPICS, **kw):
    frame = feed(core, *messages(types, stamp, **kw))
    assert frame is not None
    return frame, core.process(frame, stamp + 20 * MS if now is None else now, wanted)


def heatmap_array(msg):
    assert msg.encoding == '32FC1'
    return np.frombuffer(msg.data.tobytes(), '<f4').reshape(msg.height, msg.width)


# ------------------------------------------------------------------------------- outputs


def test_rgbd_frame_gives_every_output_with_the_source_header(types):
    core, backend = make_core(types, actions=['hold', 'pour'])
    frame, out = run_frame(core, types)
    assert set(out) == set(OUTPUT_TOPICS)
    for topic, msg in out.items():
        if topic == 'markers':
            headers = [m.header for m in msg.markers]
        else:
            headers = [msg.header]
            headers += [d.header for d in getattr(msg, 'detections', [])]
        for h in headers:
            assert stamp_ns(h) == T0 and h.frame_id == FRAME, topic
    # heatmap = pixel-wise max over the actions
    heat = heatmap_array(out['heatmap'])
    res = core.pipeline(rgb_image(), depth=plane_depth(), K=K, actions=['hold', 'pour'])
    np.testing.assert_allclose(heat, np.maximum(res.heatmaps['hold'], res.heatmaps['pour']),
                               atol=1e-6)
    # grasps of both actions, 3-D on the 1 m plane
    g = out['grasps']
    assert list(g.actions) == ['hold', 'pour']
    assert {x.action for x in g.grasps} == {'hold', 'pour'}
    for x in g.grasps:
        assert x.valid_3d and x.pose.position.z == pytest.approx(1.0, abs=1e-3)
        u = K[0, 0] * x.pose.position.x / x.pose.position.z + K[0, 2]
        v = K[1, 1] * x.pose.position.y / x.pose.position.z + K[1, 2]
        assert (u, v) == pytest.approx((x.u, x.v), abs=0.5)
    assert len(out['detections_3d'].detections) == len(g.grasps)
    assert len(out['markers'].markers) == 1 + 2 * len(g.grasps)
    cloud = out['affordance_cloud']
    pts = np.frombuffer(cloud.data.tobytes(), '<f4').reshape(-1, 4)
    assert cloud.width == len(pts) > 0 and np.allclose(pts[:, 2], 1.0, atol=1e-3)
    assert pts[:, 3].min() >= core.pipeline.config.heat_threshold - 1e-6
    overlay = out['overlay']
    assert overlay.encoding == 'bgr8' and (overlay.height, overlay.width) == (H, W)
    # counters and latency
    core.note_published(T0 + 35 * MS, frame)
    snap = core.snapshot()
    assert snap['received'] == {'image': 1, 'depth': 1, 'camera_info': 1, 'action': 0}
    assert snap['processed'] == 1 and snap['published'] == 1
    assert snap['latency_ms']['p50'] == pytest.approx(35.0)
    assert sum(snap['dropped'].values()) == 0
    assert snap['outputs'] == {t: 1 for t in OUTPUT_TOPICS}
    assert backend.calls == 1  # the reference call above reused the cached frame


def test_only_wanted_topics_are_built(types):
    core, _ = make_core(types)
    _, out = run_frame(core, types, wanted={'heatmap', 'grasps'})
    assert set(out) == {'heatmap', 'grasps'}
    assert core.pipeline.config.return_cloud is False
    _, out = run_frame(core, types, stamp=T0 + 100 * MS, wanted={'affordance_cloud'})
    assert set(out) == {'affordance_cloud'} and core.pipeline.config.return_cloud is True


def test_rgb_only_mode_2d_grasps_no_cloud(types):
    core, _ = make_core(types, require_depth=False)
    img, _, _ = messages(types, T0)
    core.on_image(img)
    frame = core.take_frame()
    assert frame.depth is None and frame.camera_info is None
    out = core.process(frame, T0 + 10 * MS, OUTPUT_TOPICS)
    assert 'affordance_cloud' not in out
    assert out['grasps'].grasps and not any(g.valid_3d for g in out['grasps'].grasps)
    assert len(out['detections_3d'].detections) == 0
    assert len(out['markers'].markers) == 1  # DELETEALL only


def test_zero_and_nan_depth_is_not_a_drop(types):
    core, _ = make_core(types)
    _, out = run_frame(core, types, depth=np.zeros((H, W), np.uint16))
    assert out is not None and not any(g.valid_3d for g in out['grasps'].grasps)
    _, out = run_frame(core, types, stamp=T0 + 100 * MS,
                       depth=np.full((H, W), np.nan, np.float32))
    assert out is not None and not any(g.valid_3d for g in out['grasps'].grasps)
    assert sum(core.snapshot()['dropped'].values()) == 0


def test_32fc1_half_size_depth_and_bgr8_and_compressed(types):
    core, _ = make_core(types)
    depth = np.full((H // 2, W // 2), 0.75, np.float32)
    _, out = run_frame(core, types, depth=depth, encoding='bgr8')
    assert out['grasps'].grasps[0].pose.position.z == pytest.approx(0.75, abs=1e-3)
    # CompressedImage (png) through on_compressed_image
    img, dep, info = messages(types, T0 + 100 * MS)
    ok, png = cv2.imencode('.png', rgb_image()[:, :, ::-1])
    comp = types.make('sensor_msgs/msg/CompressedImage', header=img.header, format='png',
                      data=types.u8_array(png.tobytes()))
    core.on_depth(dep)
    core.on_camera_info(info)
    core.on_compressed_image(comp)
    frame = core.take_frame()
    out = core.process(frame, T0 + 110 * MS, {'heatmap'})
    assert set(out) == {'heatmap'}


def test_overlay_action_and_merge_clouds(types):
    core, _ = make_core(types, actions=['hold', 'pour'], overlay_action='pour')
    _, out = run_frame(core, types, wanted={'overlay'})
    assert set(out) == {'overlay'}
    a = np.array([[0, 0, 1, 0.5], [1, 0, 1, 0.9]], np.float32)
    b = np.array([[0, 0, 1, 0.7], [2, 0, 1, 0.6]], np.float32)
    m = merge_clouds([a, b])
    np.testing.assert_allclose(m[np.lexsort(m[:, :3].T[::-1])],
                               [[0, 0, 1, 0.7], [1, 0, 1, 0.9], [2, 0, 1, 0.6]])


# ------------------------------------------------------------------------------- bad input


def _mutations(types):
    """(name, which message, mutate(msg) -> msg, expected drop reason)."""
    def setf(**kw):
        def f(msg):
            for k, v in kw.items():
                setattr(msg, k, v)
            return msg
        return f

    def truncate(msg):
        msg.data = msg.data[:-7]
        return msg

    def no_header(msg):
        object.__setattr__(msg, 'header', None)
        return msg

    def zero_stamp(msg):
        msg.header = types.header(0, FRAME)
        return msg

    def k(values):
        return setf(k=types.f64_array(np.asarray(values, np.float64)))

    return [
        ('image encoding', 'img', setf(encoding='64FC3'), 'bad_image'),
        ('image encoding 16UC1', 'img', setf(encoding='16UC1'), 'bad_image'),
        ('image height 0', 'img', setf(height=0), 'bad_image'),
        ('image height', 'img', setf(height=H + 1), 'bad_image'),
        ('image width', 'img', setf(width=W + 3), 'bad_image'),
        ('image step small', 'img', setf(step=W * 3 - 1), 'bad_image'),
        ('image step large', 'img', setf(step=W * 3 + 4), 'bad_image'),
        ('image data length', 'img', truncate, 'bad_image'),
        ('image no header', 'img', no_header, 'bad_image'),
        ('image zero stamp', 'img', zero_stamp, 'bad_image'),
        ('depth encoding', 'dep', setf(encoding='rgb8'), 'bad_depth'),
        ('depth height', 'dep', setf(height=H - 1), 'bad_depth'),
        ('depth width 0', 'dep', setf(width=0), 'bad_depth'),
        ('depth step', 'dep', setf(step=W), 'bad_depth'),
        ('depth data length', 'dep', truncate, 'bad_depth'),
        ('depth zero stamp', 'dep', zero_stamp, 'bad_depth'),
        ('camera_info K zeros', 'info', k(np.zeros(9)), 'bad_camera_info'),
        ('camera_info K nan', 'info', k([np.nan] * 9), 'bad_camera_info'),
        ('camera_info K length', 'info', k(np.ones(4)), 'bad_camera_info'),
        ('camera_info K negative f', 'info', k([-130, 0, 79.5, 0, 130, 59.5, 0, 0, 1]),
         'bad_camera_info'),
        ('camera_info width', 'info', setf(width=W * 2), 'bad_camera_info'),
        ('camera_info height', 'info', setf(height=H + 10), 'bad_camera_info'),
        ('camera_info no header', 'info', no_header, 'bad_camera_info'),
    ]


def test_every_malformed_field_is_counted_never_raised_and_gives_no_output(types):
    for name, which, mutate, reason in _mutations(types):
        core, backend = make_core(types)
        img, dep, info = messages(types, T0)
        msgs = {'img': img, 'dep': dep, 'info': info}
        msgs[which] = mutate(msgs[which])
        frame = feed(core, msgs['img'], msgs['dep'], msgs['info'])
        out = core.process(frame, T0 + 10 * MS, OUTPUT_TOPICS) if frame else None
        assert out is None, name
        dropped = core.snapshot()['dropped']
        assert dropped[reason] == 1, (name, dropped)
        assert sum(dropped.values()) == 1, (name, dropped)
        assert backend.calls == 0, name  # never reached the model
        # the core keeps working: the next good frame goes through
        _, out = run_frame(core, types, stamp=T0 + 100 * MS)
        assert out is not None and set(out) == set(OUTPUT_TOPICS), name


def test_depth_of_another_aspect_ratio_is_bad_depth(types):
    core, _ = make_core(types)
    frame = feed(core, *messages(types, T0, depth=plane_depth(shape=(H, H))))
    assert core.process(frame, T0 + 10 * MS, OUTPUT_TOPICS) is None
    assert core.snapshot()['dropped']['bad_depth'] == 1


def test_missing_camera_info_is_counted_when_the_image_leaves_the_queue(types):
    core, backend = make_core(types, sync_queue_size=2)
    for i in range(4):
        img, dep, _ = messages(types, T0 + i * 100 * MS)
        assert feed(core, img, dep) is None
    assert core.snapshot()['dropped']['no_camera_info'] == 2  # two fell off the queue
    assert backend.calls == 0


def test_missing_depth_when_required(types):
    core, _ = make_core(types, sync_queue_size=1)
    for i in range(3):
        img, _, info = messages(types, T0 + i * 100 * MS)
        assert feed(core, img, None, info) is None
    assert core.snapshot()['dropped']['no_depth'] == 2


def test_out_of_order_stamps(types):
    core, _ = make_core(types)
    run_frame(core, types, stamp=T0 + 200 * MS)
    img, dep, info = messages(types, T0 + 100 * MS)
    assert feed(core, img, dep, info) is None
    assert core.snapshot()['dropped']['out_of_order'] == 3


def test_stale_and_superseded_frames(types):
    core, backend = make_core(types, max_input_age_ms=100.0)
    frame = feed(core, *messages(types, T0))
    assert core.process(frame, T0 + 101 * MS, OUTPUT_TOPICS) is None
    assert core.snapshot()['dropped']['stale'] == 1 and backend.calls == 0
    for i in (1, 2, 3):
        img, dep, info = messages(types, T0 + i * 100 * MS)
        core.on_depth(dep)
        core.on_camera_info(info)
        core.on_image(img)
    assert core.snapshot()['dropped']['superseded'] == 2
    assert core.take_frame().stamp_ns == T0 + 300 * MS


def test_unknown_action(types):
    core, _ = make_core(types)
    with pytest.raises(ValueError, match="unknown action 'fly'; known actions: hold, cut_with"):
        make_core(types, actions=['fly'])
    msg = types.make('std_msgs/msg/String', data='fly')
    assert core.on_action(msg) is False and core.actions == ['hold']
    assert 'known actions: hold, cut_with, pour' in core.set_actions(['hold', 'swim'])
    assert core.on_action(types.make('std_msgs/msg/String', data='pour, hold')) is True
    assert core.actions == ['pour', 'hold']
    assert core.snapshot()['received']['action'] == 2
    _, out = run_frame(core, types)
    assert list(out['grasps'].actions) == ['pour', 'hold']


def test_backend_failure_is_pipeline_error_and_diagnostics_error(types):
    core, backend = make_core(types)
    backend.fail = True
    _, out = run_frame(core, types)
    assert out is None and core.snapshot()['dropped']['pipeline_error'] == 1
    report = core.diagnostics_report(T0 + 50 * MS)
    assert report.level == report.ERROR and 'backend failed' in report.message
    assert 'illegal memory access' in report.values['backend_error']
    backend.fail = False
    frame, out = run_frame(core, types, stamp=T0 + 100 * MS, rgb=rgb_image(1))
    core.note_published(T0 + 130 * MS, frame)
    assert out is not None
    assert core.diagnostics_report(T0 + 150 * MS).level != report.ERROR


def test_drops_found_outside_the_core_and_expected_inputs(types):
    core, _ = make_core(types, require_depth=False, expect=['depth', 'camera_info'])
    core.note_received('image')
    core.note_drop('bad_image', 'does not deserialise')
    snap = core.snapshot()
    assert snap['received']['image'] == 1 and snap['dropped']['bad_image'] == 1
    img, dep, info = messages(types, T0)
    assert feed(core, img) is None  # depth and camera_info are expected: wait for them
    frame = feed(core, None, dep, info)
    assert frame.depth is not None and frame.camera_info is not None


def test_closed_core_drops_frames(types):
    core, _ = make_core(types)
    frame = feed(core, *messages(types, T0))
    core.close()
    assert core.process(frame, T0 + 10 * MS, OUTPUT_TOPICS) is None
    assert core.snapshot()['dropped']['pipeline_error'] == 1


# ------------------------------------------------------------------------------- frames


def test_target_frame_transforms_3d_outputs_only(types):
    R = euler2mat(0.3, -0.2, 1.1)
    t = np.array([0.5, -0.25, 0.8])
    calls = []

    def transform(target, source, stamp):
        calls.append((target, source, stamp))
        return R, t

    core, _ = make_core(types, target_frame='base_link', transform=transform)
    ref, _ = make_core(types)
    _, out = run_frame(core, types)
    _, cam = run_frame(ref, types)
    assert calls == [('base_link', FRAME, T0)]
    for topic in ('heatmap', 'overlay'):
        assert out[topic].header.frame_id == FRAME
    for topic in ('grasps', 'detections_3d', 'affordance_cloud'):
        assert out[topic].header.frame_id == 'base_link'
        assert stamp_ns(out[topic].header) == T0
    assert all(m.header.frame_id == 'base_link' for m in out['markers'].markers)
    for g, c in zip(out['grasps'].grasps, cam['grasps'].grasps):
        p = np.array([c.pose.position.x, c.pose.position.y, c.pose.position.z])
        q = np.array([g.pose.position.x, g.pose.position.y, g.pose.position.z])
        np.testing.assert_allclose(q, R @ p + t, atol=1e-5)
        from transforms3d.quaternions import quat2mat
        o, oc = g.pose.orientation, c.pose.orientation
        np.testing.assert_allclose(quat2mat([o.w, o.x, o.y, o.z]),
                                   R @ quat2mat([oc.w, oc.x, oc.y, oc.z]), atol=1e-5)
        assert (g.u, g.v) == (c.u, c.v)
    pc = np.frombuffer(out['affordance_cloud'].data.tobytes(), '<f4').reshape(-1, 4)
    pr = np.frombuffer(cam['affordance_cloud'].data.tobytes(), '<f4').reshape(-1, 4)
    np.testing.assert_allclose(pc[:, :3], pr[:, :3] @ R.T + t, atol=1e-4)


def test_target_frame_unavailable_drops_3d_keeps_heatmap_and_overlay(types):
    core, _ = make_core(types, target_frame='base_link', transform=lambda *a: None)
    _, out = run_frame(core, types)
    assert set(out) == {'heatmap', 'overlay'}
    assert core.snapshot()['dropped']['tf_unavailable'] == 1

    def boom(*a):
        raise LookupError('"base_link" passed to lookupTransform does not exist')

    core, _ = make_core(types, target_frame='base_link', transform=boom)
    _, out = run_frame(core, types)
    assert set(out) == {'heatmap', 'overlay'}
    core, _ = make_core(types, target_frame='base_link')  # no transform at all
    _, out = run_frame(core, types)
    assert set(out) == {'heatmap', 'overlay'}
    # target_frame equal to the camera frame: nothing to transform
    core, _ = make_core(types, target_frame=FRAME)
    _, out = run_frame(core, types)
    assert set(out) == set(OUTPUT_TOPICS)


# ------------------------------------------------------------------------------- diagnostics


def test_diagnostics_values_rates_and_levels(types):
    core, _ = make_core(types)
    for i in range(10):  # 10 Hz for 1 s
        stamp = T0 + i * 100 * MS
        frame, out = run_frame(core, types, stamp=stamp, rgb=rgb_image(i),
                               wanted={'heatmap'})
        core.note_published(stamp + 40 * MS, frame)
    now = T0 + 950 * MS
    msg = core.diagnostics(now)
    assert stamp_ns(msg.header) == now and len(msg.status) == 1
    st = msg.status[0]
    assert st.name == DIAGNOSTICS_NAME and st.level == 0, st.message
    values = {kv.key: kv.value for kv in st.values}
    assert float(values['input_rate_image_hz']) == pytest.approx(10.0, rel=1e-3)
    assert float(values['input_rate_depth_hz']) == pytest.approx(10.0, rel=1e-3)
    assert float(values['output_rate_hz']) == pytest.approx(10.0, rel=1e-3)
    assert float(values['latency_p50_ms']) == pytest.approx(40.0)
    assert float(values['latency_p95_ms']) == pytest.approx(40.0)
    assert float(values['latency_max_ms']) == pytest.approx(40.0)
    assert values['backend'] == 'fake' and float(values['model_ms_median']) >= 0
    for reason in DROP_REASONS:
        assert values[f'dropped_{reason}'] == '0'
    assert values['received_image'] == '10' and values['processed'] == '10'
    # nothing published for more than 2 s while active -> WARN
    report = core.diagnostics_report(now + 2500 * MS)
    assert report.level == report.WARN and 'no frames in the last' in report.message
    core.active = False
    assert core.diagnostics_report(now + 2600 * MS).level == report.OK


def test_diagnostics_warn_on_drops_and_at_start(types):
    core, _ = make_core(types, max_input_age_ms=50.0)
    assert core.diagnostics_report(T0).level == 0  # just started
    assert core.diagnostics_report(T0 + 2100 * MS).level == 1  # nothing for 2 s
    core, _ = make_core(types, max_input_age_ms=50.0)
    core.diagnostics_report(T0)
    for i in range(10):
        stamp = T0 + i * 100 * MS
        frame = feed(core, *messages(types, stamp, rgb=rgb_image(i)))
        now = stamp + (80 if i < 2 else 10) * MS  # 2 of 10 stale
        out = core.process(frame, now, {'heatmap'})
        if out:
            core.note_published(now, frame)
    report = core.diagnostics_report(T0 + 1000 * MS)
    assert report.level == report.WARN and '2 of 10 frames dropped' in report.message
    assert report.values['dropped_stale'] == '2'


def test_input_rates_with_an_injected_clock(types):
    clock = [T0]
    core, _ = make_core(types, clock=lambda: clock[0])
    for i in range(6):
        clock[0] = T0 + i * 200 * MS  # arrivals 5 Hz, whatever the stamps say
        img, dep, info = messages(types, T0 + i * MS)
        feed(core, img, dep, info)
    values = core.diagnostics_report(T0 + 1000 * MS).values
    assert float(values['input_rate_image_hz']) == pytest.approx(5.0)
    assert float(core.diagnostics_report(T0 + 9000 * MS).values['input_rate_image_hz']) == 0


def test_warnings_are_rate_limited_per_reason(types, caplog):
    core, _ = make_core(types, logger=logging.getLogger('ratelimit'))
    with caplog.at_level(logging.WARNING, logger='ratelimit'):
        for i in range(5):
            img, dep, info = messages(types, T0 + i * 100 * MS)
            img.encoding = '64FC3'
            frame = feed(core, img, dep, info)
            assert core.process(frame, T0 + i * 100 * MS + MS, OUTPUT_TOPICS) is None
        img, dep, info = messages(types, T0 + 900 * MS)
        dep.encoding = 'bgr8'
        core.process(feed(core, img, dep, info), T0 + 901 * MS, OUTPUT_TOPICS)
    texts = [r.getMessage() for r in caplog.records]
    assert len([t for t in texts if t.startswith('bad_image')]) == 1
    assert len([t for t in texts if t.startswith('bad_depth')]) == 1
    assert "unsupported encoding '64FC3'" in texts[0]
    assert core.snapshot()['dropped']['bad_image'] == 5


def test_update_parameter_and_warm_up(types):
    core, backend = make_core(types)
    assert core.update_parameter('min_score', 0.9) is None
    assert core.pipeline.config.min_score == 0.9
    assert core.update_parameter('top_k', 1) is None and core.pipeline.config.top_k == 1
    assert core.update_parameter('max_input_age_ms', 250) is None
    assert core.settings.max_input_age_ms == 250.0
    assert 'read-only' in core.update_parameter('sync_slop_s', 0.1)
    assert 'known actions' in core.update_parameter('actions', ['swim'])
    assert core.update_parameter('actions', ['cut_with']) is None
    assert core.actions == ['cut_with']
    _, out = run_frame(core, types, wanted={'grasps'})
    assert len(out['grasps'].grasps) <= 1
    calls = backend.calls
    core.warm_up(3)
    assert backend.calls == calls + 3
    assert core.snapshot()['processed'] == 1
    assert 'fake' in core.describe() and 'cut_with' in core.describe()


def test_conversions_round_trip_sanity(types):
    # the helpers above build what the real conversions read back
    img, dep, info = messages(types, T0)
    assert image_to_rgb(img).shape == (H, W, 3)
    assert image_to_depth(dep).dtype == np.uint16
    assert math.isclose(float(info.k[0]), 130.0)


# ----------------------------------------------------------------------- lens distortion


@pytest.mark.parametrize('topic, rectified', [
    ('/camera/camera/color/image_raw', False), ('/camera/color/image_rect_raw', True),
    ('/cam/image_rect', True), ('/cam/image_rect_color/compressed', True),
    ('/cam/image_raw/compressed', False), ('/direct_cam/image', False),
    ('/cam/image_correct', False), ('image', False), ('', False)])
def test_is_rectified_topic(topic, rectified):
    from affordance_ros.core import is_rectified_topic

    assert is_rectified_topic(topic) is rectified


def _distorted_info(types, stamp, D, model='plumb_bob', P=None):
    info = messages(types, stamp)[2]
    info.distortion_model = model
    info.d = np.asarray(D, np.float64)
    if P is not None:
        info.p = np.asarray(P, np.float64).reshape(-1)
    return info


def _grasp_positions(core, types, info, stamp):
    img, dep, _ = messages(types, stamp)
    frame = feed(core, img, dep, info)
    out = core.process(frame, stamp + 20 * MS, {'grasps'})
    assert out is not None, core.snapshot()['dropped']
    return [(g.pose.position.x, g.pose.position.y, g.pose.position.z)
            for g in out['grasps'].grasps if g.valid_3d]


def test_raw_images_undo_camera_info_distortion_rectified_ones_use_P(types):
    """The same frame and camera_info (k1 = -0.3): on a raw topic the 3-D points follow the
    undistorted rays; on a rectified topic (or input_image: rectified) the distortion is
    ignored and P gives the intrinsics."""
    D = [-0.3, 0.1, 0.0, 0.0, 0.0]
    P = np.c_[K, np.zeros(3)]
    P[0, 0] = P[1, 1] = 140.0  # the rectified image's own focal length
    found = {}
    for name, topic, mode in [('raw', '/cam/image_raw', 'auto'),
                              ('rect', '/cam/image_rect', 'auto'),
                              ('forced_rect', '/cam/image_raw', 'rectified'),
                              ('forced_raw', '/cam/image_rect', 'raw')]:
        core, _ = make_core(types, input_image=mode, actions=['pour'])  # peak off-centre
        core.image_topic = topic
        found[name] = _grasp_positions(core, types, _distorted_info(types, T0, D, P=P), T0)
    assert found['raw'] == found['forced_raw'] and found['rect'] == found['forced_rect']
    # the reference: a grasp at pixel (u, v) on the z = 1 m plane
    core, _ = make_core(types, actions=['pour'])
    img, dep, info = messages(types, T0)
    u, v = [(float(g.u), float(g.v)) for g in core.process(
        feed(core, img, dep, info), T0 + 20 * MS, {'grasps'})['grasps'].grasps][0]
    pts = np.array([[[u, v]]], np.float64)
    x, y = cv2.undistortPointsIter(pts, K, np.array(D), None, None,
                                   (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 100,
                                    1e-14)).reshape(2)
    assert found['raw'][0] == pytest.approx((x, y, 1.0), abs=1e-3)
    assert found['rect'][0] == pytest.approx(((u - 79.5) / 140, (v - 59.5) / 140, 1.0),
                                             abs=1e-3)
    pinhole = ((u - 79.5) / 130, (v - 59.5) / 130, 1.0)
    assert np.linalg.norm(np.subtract(found['raw'][0], pinhole)) > 0.005  # it matters here


@pytest.mark.parametrize('change, text', [
    (dict(model='kannala_brandt', D=[0.1, 0, 0, 0]), "distortion model 'kannala_brandt'"),
    (dict(D=[0.1, math.nan, 0, 0, 0]), 'nan or inf'),
    (dict(model='equidistant', D=[0.1, 0, 0, 0, 0]), 'equidistant takes 4')])
def test_bad_distortion_drops_the_frame_as_bad_camera_info(types, change, text, caplog):
    core, _ = make_core(types)
    core.image_topic = '/cam/image_raw'
    info = _distorted_info(types, T0, change['D'], change.get('model', 'plumb_bob'))
    img, dep, _ = messages(types, T0)
    with caplog.at_level(logging.WARNING, logger='test_core'):
        assert core.process(feed(core, img, dep, info), T0 + 20 * MS, OUTPUT_TOPICS) is None
    assert core.snapshot()['dropped']['bad_camera_info'] == 1
    assert any(text in r.getMessage() for r in caplog.records)
    core.image_topic = '/cam/image_rect'  # rectified: d is not read
    info = _distorted_info(types, T0 + 100 * MS, change['D'], change.get('model', 'plumb_bob'))
    img, dep, _ = messages(types, T0 + 100 * MS)
    assert core.process(feed(core, img, dep, info), T0 + 120 * MS, {'grasps'}) is not None


def test_rgb_only_frames_do_not_read_the_distortion(types):
    core, _ = make_core(types, require_depth=False)
    core.image_topic = '/cam/image_raw'
    img, _, _ = messages(types, T0)
    info = _distorted_info(types, T0, [0.1, 0, 0, 0], 'kannala_brandt')
    out = core.process(feed(core, img, None, info), T0 + 20 * MS, {'grasps'})
    assert out is not None and core.snapshot()['dropped'].get('bad_camera_info', 0) == 0
    assert not any(g.valid_3d for g in out['grasps'].grasps)
