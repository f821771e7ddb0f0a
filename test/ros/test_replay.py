"""affordance-replay end to end: synthetic RGB-D bags (.db3 and .mcap, a box on a plane, one
corrupt image, one out-of-order frame) and a bag of the real frames in ../shared/data/rgbd,
through a locate_test checkpoint; outputs read back with AnyReader; topic detection; user
errors (exit 2, one stderr line)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
from rosbags.highlevel import AnyReader
from rosbags.rosbag2 import StoragePlugin, Writer

from affordance_ros import replay
from affordance_ros.bagtools import camera_info_msg, write_rgbd_bag
from affordance_ros.conversions import numpy_to_image
from affordance_ros.msgtypes import BagMessageTypes, stamp_ns

pytestmark = pytest.mark.usefixtures('torch_one_thread')

CLASSES = ['hold', 'cut_with', 'pour', 'open', 'push']
H, W = 120, 160
K = np.array([[130.0, 0.0, 79.5], [0.0, 130.0, 59.5], [0.0, 0.0, 1.0]])
FRAME = 'camera_color_optical_frame'
MS = 1_000_000
T0 = 1_700_000_000 * 1_000_000_000
IMAGE_T, DEPTH_T, INFO_T = '/cam/color/image_raw', '/cam/depth/image_raw', '/cam/color/camera_info'
OUT_TOPICS = ['heatmap', 'overlay', 'grasps', 'detections_3d', 'markers', 'affordance_cloud']
PLANE_Z, BOX_Z = 1.0, 0.8


@pytest.fixture(scope='module')
def types():
    return BagMessageTypes()


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
    import torch

    from affordance_core.checkpoint import save_checkpoint
    from affordance_core.registry import create_model

    torch.manual_seed(0)
    model = create_model('locate_test', num_classes=5, classes=CLASSES)
    return save_checkpoint(model.eval(), tmp_path_factory.mktemp('ckpt') / 'model.pt')


def box_scene(i):
    """RGB (a red box on a textured grey plane) and 16UC1 depth (plane 1.0 m, box top 0.8 m)."""
    rng = np.random.default_rng(i)
    rgb = (110 + rng.integers(0, 40, (H, W, 1))).repeat(3, 2).astype(np.uint8)
    depth = np.full((H, W), int(PLANE_Z * 1000), np.uint16)
    r0, c0 = 40, 55 + i  # the box moves a little
    rgb[r0:r0 + 40, c0:c0 + 50] = (200, 40, 30)
    depth[r0:r0 + 40, c0:c0 + 50] = int(BOX_Z * 1000)
    depth[:4, :8] = 0  # a hole
    return rgb, depth


@dataclass
class Plan:
    stamps: list[int]          # header stamp of each frame
    logs: list[int]            # log time of each frame's first message
    corrupt: int               # index of the frame with the corrupt image
    out_of_order: int          # index of the frame stamped before its predecessor


def write_synthetic_bag(path, types, storage, *, garbage=False, n=6):
    """n frames at 10 Hz: image, depth, camera_info per frame (log times 1-3 ms after the
    stamp); frame 2's image is corrupt (truncated data, or bytes that are not CDR at all with
    ``garbage``); frame 4 is stamped 40 ms before frame 3."""
    ts = types.typestore
    plan = Plan([], [], corrupt=2, out_of_order=4)
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP if storage == 'mcap'
                else StoragePlugin.SQLITE3) as w:
        conns = {t: w.add_connection(t, m, typestore=ts) for t, m in
                 ((IMAGE_T, 'sensor_msgs/msg/Image'), (DEPTH_T, 'sensor_msgs/msg/Image'),
                  (INFO_T, 'sensor_msgs/msg/CameraInfo'))}
        for i in range(n):
            log = T0 + i * 100 * MS
            stamp = log if i != plan.out_of_order else T0 + (i - 1) * 100 * MS - 40 * MS
            plan.stamps.append(stamp)
            plan.logs.append(log)
            header = types.header(stamp, FRAME)
            rgb, depth = box_scene(i)
            img = numpy_to_image(rgb, 'rgb8', header, types)
            raw_img = ts.serialize_cdr(img, 'sensor_msgs/msg/Image')
            if i == plan.corrupt:
                if garbage:
                    raw_img = b'\x00\x01\x00\x00garbage' * 3
                else:
                    img.data = img.data[:-100]
                    raw_img = ts.serialize_cdr(img, 'sensor_msgs/msg/Image')
            dep = numpy_to_image(depth, '16UC1', header, types)
            info = camera_info_msg(K, H, W, header, types)
            w.write(conns[IMAGE_T], log + 1 * MS, raw_img)
            w.write(conns[DEPTH_T], log + 2 * MS, ts.serialize_cdr(dep, 'sensor_msgs/msg/Image'))
            w.write(conns[INFO_T], log + 3 * MS,
                    ts.serialize_cdr(info, 'sensor_msgs/msg/CameraInfo'))
    return plan


def read_bag(path):
    """topic -> [(log time, message)] of an output bag (and the connection types)."""
    out, msgtypes = {}, {}
    with AnyReader([Path(path)], default_typestore=BagMessageTypes().typestore) as r:
        for c in r.connections:
            msgtypes[c.topic] = c.msgtype
            out.setdefault(c.topic, [])
        for c, t, raw in r.messages():
            out[c.topic].append((t, r.deserialize(raw, c.msgtype)))
    return out, msgtypes


def run_replay(argv, capsys):
    rc = replay.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def project(p):
    return K[0, 0] * p[0] / p[2] + K[0, 2], K[1, 1] * p[1] / p[2] + K[1, 2]


# ------------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize('storage,garbage', [('sqlite3', True), ('mcap', False)])
def test_replay_synthetic_bag(tmp_path, types, ckpt, capsys, storage, garbage):
    in_bag = tmp_path / f'in_{storage}'
    plan = write_synthetic_bag(in_bag, types, storage, garbage=garbage)
    out_bag = tmp_path / ('out.mcap' if storage == 'mcap' else 'out')
    overlays = tmp_path / 'overlays'
    rc, out, err = run_replay([in_bag, out_bag, '--checkpoint', ckpt, '--action', 'hold',
                               '--action', 'pour', '--overlays', overlays, '--every', '2',
                               '--backend', 'torch', '--no-progress', '--params',
                               Path(__file__).resolve().parents[2] / 'config/grounding.yaml'],
                              capsys)
    assert rc == 0, err
    print(out)  # the summary, for the record (pytest -s)
    assert '6 in, 4 processed, dropped: bad_image 1, out_of_order 3' in out

    summary = json.loads((tmp_path / f'{out_bag.name}.summary.json').read_text())
    assert summary['frames_in'] == 6 and summary['processed'] == 4
    assert summary['dropped'] == {'bad_image': 1, 'out_of_order': 3}
    assert summary['topics'] == {'image': IMAGE_T, 'depth': DEPTH_T, 'camera_info': INFO_T,
                                 'compressed': False}
    assert summary['storage'] == storage
    assert summary['written'] == {**{f'/affordance/{t}': 4 for t in OUT_TOPICS},
                                  '/diagnostics': 1}
    assert summary['overlays_written'] == 2 and len(list(overlays.glob('*.png'))) == 2
    assert summary['latency_ms']['p50'] > 0 and summary['processing_ms']['p95'] > 0

    msgs, msgtypes = read_bag(out_bag)
    assert set(msgs) == {f'/affordance/{t}' for t in OUT_TOPICS} | {'/diagnostics'}
    assert msgtypes['/affordance/grasps'] == 'affordance_ros/msg/AffordanceGraspArray'
    assert msgtypes['/affordance/detections_3d'] == 'vision_msgs/msg/Detection3DArray'
    good = [i for i in range(6) if i not in (plan.corrupt, plan.out_of_order)]
    expected = [plan.stamps[i] for i in good]
    for t in OUT_TOPICS:
        got = msgs[f'/affordance/{t}']
        assert len(got) == 4, t
        headers = [m.markers[0].header if t == 'markers' else m.header for _, m in got]
        assert [stamp_ns(h) for h in headers] == expected, t
        assert all(h.frame_id == FRAME for h in headers), t
        # written when a live node would publish: after the completing message's log time
        for (log, m), i in zip(got, good):
            assert log > plan.logs[i] + 3 * MS - 1
    for _, m in msgs['/affordance/markers']:
        assert all(mk.header.frame_id == FRAME for mk in m.markers)
        assert {stamp_ns(mk.header) for mk in m.markers} == {stamp_ns(m.markers[0].header)}
    (_, diag), = msgs['/diagnostics']
    st = diag.status[0]
    values = {kv.key: kv.value for kv in st.values}
    assert st.name == 'affordance_ros: grounding'
    assert values['dropped_bad_image'] == '1' and values['dropped_out_of_order'] == '3'
    assert values['backend'] == 'torch' and values['processed'] == '4'

    # grasps on the box or the plane, consistent with the pixels they came from
    n_valid = 0
    for (_, g), i in zip(msgs['/affordance/grasps'], good):
        assert list(g.actions) == ['hold', 'pour']
        _, depth = box_scene(i)
        for x in g.grasps:
            assert 0 <= x.u <= W - 1 and 0 <= x.v <= H - 1
            if not x.valid_3d:
                continue
            n_valid += 1
            p = (x.pose.position.x, x.pose.position.y, x.pose.position.z)
            assert BOX_Z - 0.02 <= p[2] <= PLANE_Z + 0.02
            u, v = project(p)
            assert (u, v) == pytest.approx((x.u, x.v), abs=0.05)
            assert 0 <= u < W and 0 <= v < H
            z_pixel = depth[int(round(v)), int(round(u))] / 1000.0
            edge = abs(depth[max(int(v) - 4, 0):int(v) + 5, max(int(u) - 4, 0):int(u) + 5]
                       .astype(float) - z_pixel * 1000).max() > 1
            if not edge:  # away from the box border the surface is a plane
                assert p[2] == pytest.approx(z_pixel, abs=0.01)
            q = x.pose.orientation
            assert np.linalg.norm([q.x, q.y, q.z, q.w]) == pytest.approx(1.0, abs=1e-5)
    assert n_valid > 0
    for (_, c), i in zip(msgs['/affordance/affordance_cloud'], good):
        pts = np.frombuffer(c.data.tobytes(), '<f4').reshape(-1, 4)
        assert len(pts) and np.all((pts[:, 2] > BOX_Z - 1e-3) & (pts[:, 2] < PLANE_Z + 1e-3))
    for _, h in msgs['/affordance/heatmap']:
        assert (h.encoding, h.height, h.width) == ('32FC1', H, W)
    for _, o in msgs['/affordance/overlay']:
        assert (o.encoding, o.height, o.width) == ('bgr8', H, W)


def test_replay_namespace_rgb_only_and_no_overlay(tmp_path, types, ckpt, capsys):
    """Only an image topic (no depth, no camera_info): 2-D grasps, no cloud."""
    in_bag = tmp_path / 'rgb.mcap'
    ts = types.typestore
    with Writer(in_bag, version=9, storage_plugin=StoragePlugin.MCAP) as w:
        c = w.add_connection('/rgb', 'sensor_msgs/msg/Image', typestore=ts)
        for i in range(3):
            img = numpy_to_image(box_scene(i)[0], 'rgb8', types.header(T0 + i * 100 * MS, 'cam'),
                                 types)
            w.write(c, T0 + i * 100 * MS, ts.serialize_cdr(img, 'sensor_msgs/msg/Image'))
    params = tmp_path / 'p.yaml'
    params.write_text('/grounding_node:\n  ros__parameters:\n    publish_overlay: false\n')
    out_bag = tmp_path / 'out.db3'
    rc, out, err = run_replay([in_bag, out_bag, '--checkpoint', ckpt, '--action', 'open',
                               '--out-namespace', 'grounding', '--params', params,
                               '--backend', 'torch', '--no-progress'], capsys)
    assert rc == 0, err
    msgs, _ = read_bag(out_bag)
    topics = ('heatmap', 'grasps', 'detections_3d', 'markers')
    assert set(msgs) == {f'/grounding/{t}' for t in topics} | {'/diagnostics'}
    assert len(msgs['/grounding/grasps']) == 3
    assert not any(g.valid_3d for _, m in msgs['/grounding/grasps'] for g in m.grasps)
    assert (tmp_path / 'out.db3.summary.json').is_file()


# ------------------------------------------------------------------------------- real frames


def test_replay_real_rgbd_frames(tmp_path, types, ckpt, capsys, shared_data):
    rgbd = shared_data / 'rgbd'
    meta = json.loads((rgbd / 'camera_primesense.json').read_text())
    Kr = np.asarray(meta['intrinsic_matrix'], np.float64).reshape(3, 3).T  # column-major

    @dataclass
    class F:
        rgb: np.ndarray
        depth_mm: np.ndarray
        K: np.ndarray
        stamp_ns: int

    frames, depths = [], []
    for i, line in enumerate((rgbd / 'rgbd.match').read_text().split('\n')):
        if not line.strip():
            continue
        d_name, c_name = line.split()
        rgb = cv2.imread(str(rgbd / c_name))[:, :, ::-1].copy()
        depth = cv2.imread(str(rgbd / d_name), cv2.IMREAD_UNCHANGED)
        assert depth.dtype == np.uint16 and depth.shape == rgb.shape[:2]
        frames.append(F(rgb, depth, Kr, T0 + i * 33 * MS))
        depths.append(depth)
    in_bag = write_rgbd_bag(tmp_path / 'real.mcap', frames, storage='mcap', types=types)
    out_bag = tmp_path / 'grounded.mcap'
    rc, out, err = run_replay([in_bag, out_bag, '--checkpoint', ckpt, '--action', 'hold',
                               '--backend', 'torch', '--no-progress'], capsys)
    assert rc == 0, err
    print(out)
    summary = json.loads((tmp_path / 'grounded.mcap.summary.json').read_text())
    assert summary['frames_in'] == len(frames) and summary['processed'] == len(frames)
    assert summary['dropped'] == {}
    msgs, _ = read_bag(out_bag)
    grasps = msgs['/affordance/grasps']
    assert [stamp_ns(m.header) for _, m in grasps] == [f.stamp_ns for f in frames]
    checked = 0
    for (_, m), depth in zip(grasps, depths):
        assert m.header.frame_id == 'camera_color_optical_frame'
        for g in m.grasps:
            if not g.valid_3d:
                continue
            u, v = int(round(g.u)), int(round(g.v))
            patch = depth[max(v - 3, 0):v + 4, max(u - 3, 0):u + 4].astype(np.float64)
            med = np.median(patch[patch > 0]) / 1000.0
            z = g.pose.position.z
            assert z == pytest.approx(med, abs=max(0.03, 0.03 * med)), (g.u, g.v, z, med)
            x_pix = Kr[0, 0] * g.pose.position.x / z + Kr[0, 2]
            y_pix = Kr[1, 1] * g.pose.position.y / z + Kr[1, 2]
            assert (x_pix, y_pix) == pytest.approx((g.u, g.v), abs=0.05)
            checked += 1
    assert checked >= len(frames)


# ------------------------------------------------------------------------------- topics, errors


def _two_colour_topics_bag(path, types):
    ts = types.typestore
    with Writer(path, version=9, storage_plugin=StoragePlugin.SQLITE3) as w:
        for topic in ('/left/image_raw', '/right/image_raw'):
            c = w.add_connection(topic, 'sensor_msgs/msg/Image', typestore=ts)
            img = numpy_to_image(box_scene(0)[0], 'rgb8', types.header(T0, 'cam'), types)
            w.write(c, T0, ts.serialize_cdr(img, 'sensor_msgs/msg/Image'))
        c = w.add_connection('/left/camera_info', 'sensor_msgs/msg/CameraInfo', typestore=ts)
        w.write(c, T0, ts.serialize_cdr(camera_info_msg(K, H, W, types.header(T0, 'cam'), types),
                                        'sensor_msgs/msg/CameraInfo'))
    return path


def test_user_errors_exit_2_with_one_line(tmp_path, types, ckpt, capsys):
    bag = tmp_path / 'bag'
    write_synthetic_bag(bag, types, 'sqlite3', n=2)
    two = _two_colour_topics_bag(tmp_path / 'two', types)
    only_info = tmp_path / 'info'
    ts = types.typestore
    with Writer(only_info, version=9) as w:
        c = w.add_connection('/camera_info', 'sensor_msgs/msg/CameraInfo', typestore=ts)
        w.write(c, T0, ts.serialize_cdr(camera_info_msg(K, H, W, types.header(T0, 'c'), types),
                                        'sensor_msgs/msg/CameraInfo'))
    (tmp_path / 'bad.pt').write_text('not a checkpoint')
    (tmp_path / 'notabag.mcap').write_text('nope')
    exists = tmp_path / 'exists'
    exists.mkdir()
    typo = tmp_path / 'typo.yaml'
    typo.write_text('/grounding_node:\n  ros__parameters:\n    min_scor: 0.3\n')
    base = ['--checkpoint', ckpt, '--action', 'hold', '--no-progress', '--backend', 'torch']
    cases = [
        ([tmp_path / 'missing', tmp_path / 'o1'] + base, 'input bag not found'),
        ([bag, exists] + base, 'output bag already exists'),
        ([bag, tmp_path / 'o2', '--checkpoint', tmp_path / 'none.pt', '--action', 'hold'],
         'checkpoint not found'),
        ([bag, tmp_path / 'o3', '--checkpoint', tmp_path / 'bad.pt', '--action', 'hold'],
         'bad.pt'),
        ([bag, tmp_path / 'o4', '--checkpoint', ckpt, '--action', 'fly'],
         "unknown action 'fly'; known actions: hold, cut_with, pour, open, push"),
        ([only_info, tmp_path / 'o5'] + base, 'no colour image topic in the bag'),
        ([two, tmp_path / 'o6'] + base,
         'several colour Image topics: /left/image_raw, /right/image_raw'),
        ([bag, tmp_path / 'o7', '--image-topic', '/nope'] + base,
         "image topic '/nope' is not in the bag"),
        ([bag, tmp_path / 'o8', '--image-topic', DEPTH_T] + base, 'carries depth'),
        ([bag, tmp_path / 'o9', '--depth-topic', IMAGE_T] + base, "has encoding 'rgb8'"),
        ([bag, tmp_path / 'o10', '--params', typo] + base, "did you mean 'min_score'?"),
        ([bag, tmp_path / 'o11', '--params', tmp_path / 'none.yaml'] + base,
         'parameters file not found'),
        ([tmp_path / 'notabag.mcap', tmp_path / 'o12'] + base, 'cannot read'),
        ([bag, tmp_path / 'o13', '--every', '0'] + base, '--every must be >= 1'),
        ([bag, tmp_path / 'o14', '--topics', 'image=/a,dpth=/b'] + base, '--topics'),
    ]
    for argv, match in cases:
        rc, out, err = run_replay(argv, capsys)
        assert rc == 2, (match, err)
        assert err.count('\n') == 1 and err.startswith('affordance-replay: error: '), err
        assert match in err, (match, err)
        assert 'Traceback' not in err
    assert not any((tmp_path / f'o{i}').exists() for i in range(1, 15))


def test_topic_choice_options(tmp_path, types, ckpt, capsys):
    two = _two_colour_topics_bag(tmp_path / 'two', types)
    rc, out, err = run_replay([two, tmp_path / 'out', '--checkpoint', ckpt, '--action', 'hold',
                               '--topics', 'image=/right/image_raw', '--backend', 'torch',
                               '--no-progress'], capsys)
    assert rc == 0, err
    summary = json.loads((tmp_path / 'out.summary.json').read_text())
    assert summary['topics']['image'] == '/right/image_raw'
    assert summary['topics']['camera_info'] == '/left/camera_info'
    # CompressedImage input
    comp = tmp_path / 'comp.mcap'
    ts = types.typestore
    with Writer(comp, version=9, storage_plugin=StoragePlugin.MCAP) as w:
        c = w.add_connection('/cam/image/compressed', 'sensor_msgs/msg/CompressedImage',
                             typestore=ts)
        for i in range(2):
            ok, jpg = cv2.imencode('.jpg', box_scene(i)[0][:, :, ::-1])
            msg = types.make('sensor_msgs/msg/CompressedImage',
                             header=types.header(T0 + i * 100 * MS, 'cam'), format='jpeg',
                             data=types.u8_array(jpg.tobytes()))
            w.write(c, T0 + i * 100 * MS,
                    ts.serialize_cdr(msg, 'sensor_msgs/msg/CompressedImage'))
    rc, out, err = run_replay([comp, tmp_path / 'out2', '--checkpoint', ckpt, '--action',
                               'hold', '--compressed', '--backend', 'torch', '--no-progress'],
                              capsys)
    assert rc == 0, err
    summary = json.loads((tmp_path / 'out2.summary.json').read_text())
    assert summary['topics']['compressed'] is True and summary['processed'] == 2


def test_static_transforms_chain():
    from transforms3d.euler import euler2mat
    from transforms3d.quaternions import mat2quat

    class TF:
        def __init__(self, parent, child, R, t):
            w, x, y, z = mat2quat(R)
            self.header = type('H', (), {'frame_id': parent})()
            self.child_frame_id = child
            self.transform = type('T', (), {
                'rotation': type('Q', (), dict(x=x, y=y, z=z, w=w))(),
                'translation': type('V', (), dict(x=t[0], y=t[1], z=t[2]))()})()

    R1, t1 = euler2mat(0.1, 0.2, 0.3), np.array([1.0, 0.0, 0.5])
    R2, t2 = euler2mat(-0.4, 0.0, 1.2), np.array([0.0, 0.2, 0.1])
    st = replay.StaticTransforms()
    st.add(type('M', (), {'transforms': [TF('base_link', 'camera_link', R1, t1),
                                         TF('camera_link', 'camera_optical', R2, t2)]})())
    R, t = st('base_link', 'camera_optical', 0)
    p = np.array([0.1, -0.2, 1.0])
    np.testing.assert_allclose(R @ p + t, R1 @ (R2 @ p + t2) + t1, atol=1e-12)
    Ri, ti = st('camera_optical', 'base_link', 0)
    np.testing.assert_allclose(Ri @ (R @ p + t) + ti, p, atol=1e-12)
    assert st('map', 'camera_optical', 0) is None


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exc:
        replay.main(['--help'])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for action in replay.build_parser()._actions:
        for opt in action.option_strings:
            assert opt in text
        assert action.help, f'{action.dest} has no help text'
