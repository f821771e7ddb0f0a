"""affordance-ground: options, user errors (exit 2, one stderr line), outputs, intrinsics files."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from affordance_core.cli import ground
from affordance_core.cli.ground import main, read_intrinsics

CLASSES = ['hold', 'cut_with', 'pour', 'open', 'push']


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
    import torch

    from affordance_core.checkpoint import save_checkpoint
    from affordance_core.registry import create_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_model('locate_test', num_classes=5, classes=CLASSES)
    return save_checkpoint(model.eval(), tmp_path_factory.mktemp('ckpt') / 'model.pt')


@pytest.fixture()
def frame(tmp_path):
    """A 160x120 RGB PNG, a 16-bit depth PNG of a fronto-parallel plane at 1.2 m, and K."""
    rgb = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / 'rgb.png'), rgb[:, :, ::-1])
    cv2.imwrite(str(tmp_path / 'depth.png'), np.full((120, 160), 1200, np.uint16))
    (tmp_path / 'K.json').write_text(json.dumps({'fx': 130.0, 'fy': 130.0, 'cx': 79.5,
                                                 'cy': 59.5}))
    return tmp_path


def run(argv, capsys):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exc:
        main(['--help'])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for action in ground.build_parser()._actions:
        for opt in action.option_strings:
            assert opt in text
        assert action.help, f'{action.dest} has no help text'


def test_user_errors_exit_2_with_one_line(ckpt, frame, capsys):
    base = ['--checkpoint', ckpt, '--image', frame / 'rgb.png', '--out', frame / 'out']
    cases = [
        (['--checkpoint', frame / 'none.pt', '--image', frame / 'rgb.png', '--action', 'hold',
          '--out', frame / 'o'], 'checkpoint not found'),
        (['--checkpoint', ckpt, '--image', frame / 'none.png', '--action', 'hold', '--out',
          frame / 'o'], 'image not found'),
        (base + ['--action', 'fly'], "unknown action 'fly'; known actions: hold"),
        (base + ['--action', 'hold', '--depth', frame / 'depth.png'], 'needs --intrinsics'),
        (base + ['--action', 'hold', '--cloud'], '--cloud needs --depth'),
        (base + ['--action', 'hold', '--top-k', '-1'], '--top-k'),
        (base + ['--action', 'hold', '--min-score', '2'], 'min_score'),
    ]
    (frame / 'bad.json').write_text(json.dumps({'fx': 0, 'fy': 130, 'cx': 1, 'cy': 1}))
    cases.append((base + ['--action', 'hold', '--depth', frame / 'depth.png', '--intrinsics',
                          frame / 'bad.json'], 'positive focal'))
    (frame / 'txt.png').write_text('not an image')
    cases.append((['--checkpoint', ckpt, '--image', frame / 'txt.png', '--action', 'hold',
                   '--out', frame / 'o'], 'not a readable image'))
    cv2.imwrite(str(frame / 'small.png'), np.full((60, 60), 1000, np.uint16))
    cases.append((base + ['--action', 'hold', '--depth', frame / 'small.png', '--intrinsics',
                          frame / 'K.json'], 'aspect'))
    for argv, match in cases:
        rc, out, err = run(argv, capsys)
        assert rc == 2, (argv, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith('affordance-ground: error: ')
        assert match in lines[0], (match, lines[0])
        assert 'Traceback' not in err


def test_outputs(ckpt, frame, capsys):
    out_dir = frame / 'out'
    rc, out, err = run(['--checkpoint', ckpt, '--image', frame / 'rgb.png', '--depth',
                        frame / 'depth.png', '--intrinsics', frame / 'K.json', '--action', 'hold',
                        '--action', 'open', '--out', out_dir, '--backend', 'torch', '--device',
                        'cpu', '--top-k', '2', '--min-score', '0', '--cloud'], capsys)
    assert rc == 0, err
    ov = cv2.imread(str(out_dir / 'overlay.png'))
    assert ov.shape == (120 + 24, 2 * 160 + 4, 3)  # two labelled panels side by side
    doc = json.loads((out_dir / 'grasps.json').read_text())
    assert doc['actions'] == ['hold', 'open'] and doc['image_size'] == [160, 120]
    assert doc['backend'] == 'torch' and set(doc['timings_ms']) >= {'model', 'lift'}
    gs = doc['grasps']
    assert 2 <= len(gs) <= 4 and [g['rank'] for g in gs] == list(range(1, len(gs) + 1))
    assert [g['score'] for g in gs] == sorted((g['score'] for g in gs), reverse=True)
    for g in gs:
        assert g['valid_3d'] and g['position'][2] == pytest.approx(1.2, abs=1e-6)
        assert g['normal'] == pytest.approx([0, 0, -1], abs=1e-6)
        assert np.linalg.norm(g['quaternion']) == pytest.approx(1.0, abs=1e-5)
    cloud = np.load(out_dir / 'cloud_hold.npy')
    assert cloud.shape[1] == 4 and np.allclose(cloud[:, 2], 1.2, atol=1e-6)
    assert 'wrote' in out
    # 2-D only: no depth -> valid_3d false, null position
    rc, _, err = run(['--checkpoint', ckpt, '--image', frame / 'rgb.png', '--action', 'hold',
                      '--out', frame / 'out2', '--backend', 'torch', '--device', 'cpu'], capsys)
    assert rc == 0, err
    g = json.loads((frame / 'out2' / 'grasps.json').read_text())['grasps'][0]
    assert g['valid_3d'] is False and g['position'] == [None, None, None]


def test_read_intrinsics_formats(tmp_path):
    K = np.array([[525.0, 0, 319.5], [0, 525.0, 239.5], [0, 0, 1]])
    docs = {'nested.json': {'K': K.tolist()},
            'ros.json': {'k': K.reshape(-1).tolist()},
            'fxy.json': {'fx': 525.0, 'fy': 525.0, 'cx': 319.5, 'cy': 239.5},
            'open3d.json': {'width': 640, 'height': 480,
                            'intrinsic_matrix': K.T.reshape(-1).tolist()}}
    for name, doc in docs.items():
        (tmp_path / name).write_text(json.dumps(doc))
        assert np.array_equal(read_intrinsics(tmp_path / name, (640, 480)), K), name
    # K for 640x480 applied to a 320x240 image: rescaled (half-pixel convention)
    half = read_intrinsics(tmp_path / 'open3d.json', (320, 240))
    assert half[0, 0] == 262.5 and half[0, 2] == 159.5
    with pytest.raises(ValueError, match='aspect'):
        read_intrinsics(tmp_path / 'open3d.json', (480, 480))
    (tmp_path / 'none.json').write_text('{"f": 1}')
    with pytest.raises(ValueError, match='no intrinsics'):
        read_intrinsics(tmp_path / 'none.json')
    (tmp_path / 'broken.json').write_text('{"K": [1, 2')
    with pytest.raises(ValueError, match='not valid JSON'):
        read_intrinsics(tmp_path / 'broken.json')
    (tmp_path / 'short.json').write_text('{"K": [1, 2, 3]}')
    with pytest.raises(ValueError, match='3x3'):
        read_intrinsics(tmp_path / 'short.json')
    with pytest.raises(FileNotFoundError):
        read_intrinsics(tmp_path / 'missing.json')


def test_read_distortion(tmp_path):
    from affordance_core.cli.ground import read_distortion

    cases = {'none.json': ({'K': np.eye(3).tolist()}, {}),
             'zeros.json': ({'d': [0.0] * 5}, {}),
             'ros.json': ({'d': [-0.2, 0.05, 0, 0, 0.01], 'distortion_model': 'plumb_bob'},
                          {'D': [-0.2, 0.05, 0, 0, 0.01], 'distortion_model': 'plumb_bob'}),
             'fisheye.json': ({'D': [0.1, 0.0, 0.0, 0.0], 'distortion_model': 'equidistant'},
                              {'D': [0.1, 0.0, 0.0, 0.0], 'distortion_model': 'equidistant'})}
    for name, (doc, want) in cases.items():
        (tmp_path / name).write_text(json.dumps(doc))
        got = read_distortion(tmp_path / name)
        assert set(got) == set(want), name
        if want:
            assert got['distortion_model'] == want['distortion_model']
            np.testing.assert_array_equal(got['D'], want['D'])
    (tmp_path / 'bad.json').write_text(json.dumps({'d': [0.1, 0.2], 'distortion_model': 'x'}))
    with pytest.raises(ValueError, match="bad.json: distortion model 'x' is not supported"):
        read_distortion(tmp_path / 'bad.json')


def test_real_tum_frame(shared_data, ckpt, tmp_path, capsys):
    root = shared_data / 'rgbd'
    rc, out, err = run(['--checkpoint', ckpt, '--image', root / 'other_formats/TUM_color.png',
                        '--depth', root / 'other_formats/TUM_depth.png', '--intrinsics',
                        root / 'camera_primesense.json', '--depth-scale', 5000, '--action',
                        'hold', '--out', tmp_path, '--backend', 'torch', '--device', 'cpu',
                        '--top-k', 3, '--min-score', 0], capsys)
    assert rc == 0, err
    gs = json.loads((tmp_path / 'grasps.json').read_text())['grasps']
    assert len(gs) == 3
    for g in gs:
        if g['valid_3d']:  # the office is 1.5-3 m away; normals face the camera
            assert 1.0 < g['position'][2] < 4.0
            assert np.dot(g['normal'], g['position']) < 0
            assert g['width'] <= 0.3 + 1e-9
    assert cv2.imread(str(tmp_path / 'overlay.png')).shape == (480 + 24, 640, 3)


def test_draw_grasps_projects_arrows_through_the_lens():
    """With D, the approach arrow of a grasp is projected through the lens: its tail lies where
    the distorted projection puts it, not where a pinhole one would (pixels apart here)."""
    from affordance_core.cli.ground import draw_grasps
    from affordance_core.inference.distortion import check_distortion, project_distorted
    from affordance_core.inference.pipeline import Grasp

    K = np.array([[300.0, 0, 159.5], [0, 300.0, 119.5], [0, 0, 1]])
    D = [-0.35, 0.12, 0.0, 0.0, 0.0]
    dist = check_distortion(D)
    p = np.array([-0.25, -0.18, 0.6])  # near the top-left corner
    u, v = project_distorted(p, K, dist)[0]
    g = Grasp('hold', 0.9, float(u), float(v), True, tuple(p), (0.0, 0.0, -1.0),
              (0.0, 0.0, 0.0, 1.0), 0.0, 0.0)
    rgb = np.zeros((240, 320, 3), np.uint8)
    heat = np.zeros((240, 320), np.float32)
    tail = p + [0.0, 0.0, -0.1]  # APPROACH_ARROW_M along the normal
    tails = {'lens': project_distorted(tail, K, dist)[0],
             'pinhole': (K @ tail)[:2] / tail[2]}
    assert np.hypot(*(tails['lens'] - tails['pinhole'])) > 8
    for name, lens in (('lens', {'D': D}), ('pinhole', {})):
        img = draw_grasps(rgb, heat, [g], K, **lens)
        rows, cols = np.nonzero((img[:, :, 0] > 200) & (img[:, :, 2] > 200)
                                & (img[:, :, 1] < 60))  # the magenta arrow
        far = np.argmax(np.hypot(cols - u, rows - v))  # its tail: farthest from the point
        assert np.hypot(cols[far] - tails[name][0], rows[far] - tails[name][1]) < 3, name
