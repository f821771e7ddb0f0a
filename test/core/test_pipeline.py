"""GroundingPipeline: heatmaps, caching, flip TTA, input errors, 3-D lifting on synthetic planes
and on the real RGB-D frames of ../shared/data/rgbd, and an end-to-end run on a locate_test
checkpoint with the torch backend."""
from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
from transforms3d.quaternions import quat2mat

from affordance_core.inference import geometry as geo
from affordance_core.inference.geometry import InputError
from affordance_core.inference.pipeline import (MAX_REGION_POINTS, Grasp, GroundingPipeline,
                                                GroundingResult, PipelineConfig)

CLASSES = ('hold', 'cut_with', 'pour', 'open', 'push')
K = np.array([[525.0, 0.0, 319.5], [0.0, 525.0, 239.5], [0.0, 0.0, 1.0]])
TIMING_KEYS = {'preprocess', 'model', 'heatmap', 'grasps', 'lift', 'total'}


def minmax(x):
    x = np.asarray(x, np.float32)
    lo, hi = x.min(), x.max()
    return np.zeros_like(x) if hi - lo < 1e-12 else (x - lo) / (hi - lo)


class FakeBackend:
    """Backend stand-in: fixed CAMs per class (or CAMs computed from the image), counts calls."""

    name = 'fake'

    def __init__(self, cams=None, classes=CLASSES, input_size=224, from_image=False):
        self.cams = None if cams is None else np.asarray(cams, np.float32)
        self.classes, self.input_size, self.from_image = classes, input_size, from_image
        self.calls, self.inputs = 0, []

    def __call__(self, images):
        self.calls += 1
        self.inputs.append(images.copy())
        b, s = images.shape[0], self.input_size
        if self.from_image:  # 14x14 average pooling of the channel mean: flip-equivariant
            g = images.mean(1).reshape(b, 16, s // 16, 16, s // 16).mean((2, 4))
            cams = np.stack([g * (i + 1) for i in range(len(self.classes))], 1)
        else:
            cams = np.repeat(self.cams[None], b, 0)
        maps = np.stack([[minmax(cv2.resize(c, (s, s), interpolation=cv2.INTER_LINEAR))
                          for c in cs] for cs in cams])
        return cams.astype(np.float32), maps.astype(np.float32)


def blob(centre, sigma, height=1.0, sigma_c=None, angle=0.0, shape=(16, 16)):
    """Gaussian on the grid; sigma along the axis at ``angle`` (rad, from +col toward +row)."""
    rr, cc = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
    dr, dc = rr - centre[0], cc - centre[1]
    a = dc * np.cos(angle) + dr * np.sin(angle)
    b = -dc * np.sin(angle) + dr * np.cos(angle)
    sa = sigma if sigma_c is None else sigma_c
    return height * np.exp(-(a ** 2 / (2 * sa ** 2) + b ** 2 / (2 * sigma ** 2)))


def cams_with(hold, pour=None):
    cams = np.zeros((len(CLASSES), 16, 16), np.float32)
    cams[0] = hold
    if pour is not None:
        cams[2] = pour
    return cams


def make_pipe(cams, **cfg):
    backend = FakeBackend(cams)
    return GroundingPipeline(PipelineConfig(**cfg), backend=backend), backend


def rgb_image(h=480, w=640, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def render_plane(normal, point, k, shape):
    n = np.asarray(normal, float) / np.linalg.norm(normal)
    vv, uu = np.mgrid[0:shape[0], 0:shape[1]].astype(float)
    rays = np.stack([uu, vv, np.ones_like(uu)], -1) @ np.linalg.inv(k).T
    return (n @ np.asarray(point, float)) / (rays @ n)


def ray_plane(u, v, normal, point, k):
    n = np.asarray(normal, float) / np.linalg.norm(normal)
    r = np.linalg.inv(k) @ [u, v, 1.0]
    return r * (n @ np.asarray(point, float)) / (n @ r)


def angle_deg(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    c = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))


def check_pose(g: Grasp):
    """Frame invariants of a valid grasp: unit normal toward the camera, z = -normal,
    unit quaternion consistent with ``rotation()``, right-handed."""
    p, n, q = np.array(g.position), np.array(g.normal), np.array(g.quaternion)
    assert np.linalg.norm(n) == pytest.approx(1.0) and n @ p < 0
    assert np.linalg.norm(q) == pytest.approx(1.0) and q[3] >= 0
    R = quat2mat([q[3], q[0], q[1], q[2]])
    assert np.allclose(R, g.rotation(), atol=1e-12)
    assert np.allclose(R[:, 2], -n, atol=1e-9)
    assert np.allclose(R.T @ R, np.eye(3), atol=1e-9) and np.linalg.det(R) == pytest.approx(1.0)
    return R


# ------------------------------------------------------------------------------ 2-D behaviour


def test_heatmaps_grasps_timings_without_depth():
    hold = blob((7.5, 5.5), 1.0) + blob((3, 12), 1.0, height=0.6)
    pipe, backend = make_pipe(cams_with(hold, pour=blob((12, 3), 1.5)))
    rgb = rgb_image()
    r = pipe(rgb, actions=['hold', 'pour'])
    assert isinstance(r, GroundingResult) and r.image_size == (480, 640) and not r.cached
    for a in ('hold', 'pour'):
        hm = r.heatmaps[a]
        assert hm.shape == (480, 640) and hm.dtype == np.float32
        assert hm.min() == 0.0 and hm.max() == pytest.approx(1.0)
        assert r.heatmaps_grid[a].shape == (16, 16)
    assert np.allclose(r.heatmaps_grid['hold'], minmax(hold), atol=1e-6)
    assert set(r.timings) == TIMING_KEYS and all(v >= 0 for v in r.timings.values())
    assert [g.action for g in r.grasps_by_action['hold']] == ['hold', 'hold']
    assert len(r.grasps_by_action['pour']) == 1
    scores = [g.score for g in r.grasps]
    assert scores == sorted(scores, reverse=True) and len(r.grasps) == 3
    best = r.grasps_by_action['hold'][0]
    # between-cells blob -> exact centre: u = (5.5 + 0.5) * 40 - 0.5, v = (7.5 + 0.5) * 30 - 0.5
    assert (best.u, best.v) == pytest.approx((239.5, 239.5), abs=1e-3)
    assert not best.valid_3d and all(math.isnan(x) for x in best.position + best.quaternion)
    d = best.to_dict()
    assert d['position'] == [None] * 3 and d['width'] is None and d['valid_3d'] is False
    json.dumps(d)  # JSON-able
    assert r.cloud is None
    # the backend saw preprocess_rgb's output
    from affordance_core.data.transforms import preprocess_rgb
    assert np.array_equal(backend.inputs[0][0], preprocess_rgb(rgb, 224).numpy())


def test_one_model_run_per_frame():
    pipe, backend = make_pipe(cams_with(blob((8, 8), 1.0), pour=blob((3, 3), 1.0)))
    rgb = rgb_image()
    r1 = pipe(rgb, actions='hold')
    r2 = pipe(rgb.copy(), actions=['pour', 'hold'])  # same content, another array
    assert backend.calls == 1 and r2.cached and not r1.cached
    assert r2.timings['model'] == 0.0
    assert np.array_equal(r1.heatmaps['hold'], r2.heatmaps['hold'])
    rgb2 = rgb.copy()
    rgb2[0, 0, 0] ^= 1  # one bit differs: a new frame
    pipe(rgb2, actions='hold')
    assert backend.calls == 2 and pipe.model_runs == 2
    pipe(rgb2, actions=['open'])
    assert backend.calls == 2


def test_flip_tta_runs_twice_and_averages():
    rgb = rgb_image(240, 320)
    # an image-driven fake is flip-equivariant: TTA reproduces the plain result exactly
    plain = GroundingPipeline(PipelineConfig(), backend=FakeBackend(from_image=True))
    b2 = FakeBackend(from_image=True)
    tta = GroundingPipeline(PipelineConfig(flip_tta=True), backend=b2)
    r0, r1 = plain(rgb, actions='hold'), tta(rgb, actions='hold')
    assert b2.calls == 2
    assert np.array_equal(b2.inputs[1], b2.inputs[0][..., ::-1])  # second run = flipped input
    assert np.allclose(r0.heatmaps_grid['hold'], r1.heatmaps_grid['hold'], atol=1e-6)
    assert np.allclose(r0.heatmaps['hold'], r1.heatmaps['hold'], atol=1e-5)
    # fixed (non-equivariant) CAMs: the result is the average with the mirrored CAM
    hold = blob((5, 3), 1.0)
    b3 = FakeBackend(cams_with(hold))
    r = GroundingPipeline(PipelineConfig(flip_tta=True), backend=b3)(rgb, actions='hold')
    assert np.allclose(r.heatmaps_grid['hold'], minmax(0.5 * (hold + hold[:, ::-1])), atol=1e-6)
    assert np.allclose(r.heatmaps['hold'], r.heatmaps['hold'][:, ::-1], atol=1e-5)
    us = sorted(g.u for g in r.grasps)
    assert len(us) == 2 and us[0] + us[1] == pytest.approx(320 - 1, abs=1e-3)  # mirrored pair


def test_input_errors(tmp_path):
    pipe, backend = make_pipe(cams_with(blob((8, 8), 1.0)))
    rgb = rgb_image(60, 80)
    depth = np.full((60, 80), 1000, np.uint16)
    cases = [
        (dict(rgb=rgb.astype(np.float32)), InputError, 'uint8'),
        (dict(rgb=np.zeros((60, 80, 4), np.uint8)), InputError, r'\(H, W, 3\)'),
        (dict(rgb=np.zeros((60, 80), np.uint8)), InputError, r'\(H, W, 3\)'),
        (dict(rgb=np.zeros((0, 80, 3), np.uint8)), InputError, 'empty'),
        (dict(rgb=[[1, 2, 3]]), InputError, 'numpy'),
        (dict(rgb=rgb, depth=depth), InputError, 'without K'),
        (dict(rgb=rgb, depth=depth, K=np.eye(4)), InputError, '3x3'),
        (dict(rgb=rgb, depth=depth, K=[[0, 0, 40], [0, 525, 30], [0, 0, 1]]), InputError,
         'positive focal'),
        (dict(rgb=rgb, K=np.eye(2)), InputError, '3x3'),  # K checked even without depth
        (dict(rgb=rgb, depth=depth.astype(np.int32), K=K), InputError, 'uint16'),
        (dict(rgb=rgb, depth=np.zeros((60, 60), np.uint16), K=K), InputError, 'aspect'),
        (dict(rgb=rgb, actions=['fly']), ValueError, 'known actions: hold, cut_with, pour'),
        (dict(rgb=rgb, actions=[]), ValueError, 'no action'),
    ]
    for kwargs, exc, match in cases:
        kwargs.setdefault('actions', ['hold'])
        with pytest.raises(exc, match=match):
            pipe(**kwargs)
    assert backend.calls == 0  # every error is raised before the model runs
    with pytest.raises(FileNotFoundError, match='checkpoint not found'):
        GroundingPipeline.from_checkpoint(tmp_path / 'missing.pt')
    with pytest.raises(FileNotFoundError, match='checkpoint not found'):
        GroundingPipeline(PipelineConfig(checkpoint=str(tmp_path / 'missing.pt')))
    (tmp_path / 'x.pt').write_bytes(b'')
    with pytest.raises(ValueError, match='unknown PipelineConfig field.*topk'):
        GroundingPipeline.from_checkpoint(tmp_path / 'x.pt', backend=FakeBackend(), topk=3)
    for bad in (dict(backend='tflite'), dict(top_k=-1), dict(min_score=1.5),
                dict(min_depth=5.0), dict(depth_scale=0), dict(depth_window=0)):
        with pytest.raises(ValueError):
            PipelineConfig(**bad)
    with pytest.raises(ValueError, match='input size'):
        GroundingPipeline(PipelineConfig(input_size=112), backend=FakeBackend())


# ------------------------------------------------------------------------------ 3-D, synthetic


def test_fronto_parallel_plane_16uc1():
    pipe, _ = make_pipe(cams_with(blob((7.5, 5.5), 1.0)), top_k=1)
    depth = np.full((480, 640), 1000, np.uint16)  # 1 m, millimetres
    g = pipe(rgb_image(), depth, K, actions='hold').grasps[0]
    assert g.valid_3d and g.depth_spread == 0.0
    # (u, v) = (239.5, 239.5) at z = 1: x = (239.5 - 319.5) / 525, y = 0
    assert g.position == pytest.approx((-80 / 525, 0.0, 1.0), abs=1e-6)
    assert g.normal == pytest.approx((0.0, 0.0, -1.0), abs=1e-9)
    R = check_pose(g)
    assert R[:, 2] == pytest.approx([0, 0, 1], abs=1e-9)  # approach = optical axis


TILTED = [((0.0, -0.5, -0.866), (0.0, 0.1, 1.2)),       # floor-like, seen from above
          ((0.35, -0.3, -0.89), (0.05, -0.02, 0.9)),
          ((-0.55, 0.25, -0.8), (-0.1, 0.05, 1.5))]


@pytest.mark.parametrize('normal, point', TILTED)
def test_tilted_plane_position_and_normal(normal, point):
    n_true = np.array(normal) / np.linalg.norm(normal)
    depth = render_plane(n_true, point, K, (480, 640)).astype(np.float32)
    pipe, _ = make_pipe(cams_with(blob((6.3, 9.6), 1.0) + blob((12, 3), 1.0, 0.8)))
    r = pipe(rgb_image(), depth, K, actions='hold')
    assert len(r.grasps) == 2
    for g in r.grasps:
        assert g.valid_3d
        p = np.array(g.position)
        assert abs((p - point) @ n_true) < 1e-3                              # on the plane
        assert p == pytest.approx(ray_plane(g.u, g.v, n_true, point, K), abs=1e-3)
        assert geo.project(p, K) == pytest.approx([g.u, g.v], abs=1e-6)     # on its ray
        assert angle_deg(g.normal, n_true) < 1.0
        R = check_pose(g)
        assert abs(R[:, 0] @ np.array(g.normal)) < 1e-9                      # x in the plane
        assert g.width > 0


DISTORTIONS = [('plumb_bob', [-0.30, 0.12, 0.001, -0.002, -0.02]),       # barrel (webcam)
               ('rational_polynomial', [0.4, -0.1, 0.0005, 0.001, 0.02, 0.7, -0.05, 0.05]),
               ('equidistant', [0.08, -0.02, 0.004, -0.001])]


def _rays(u, v, k, model, d):
    """Unit-z viewing rays of raw pixels (OpenCV's own inverse of the distortion)."""
    pts = np.stack([np.ravel(u), np.ravel(v)], -1).astype(np.float64)[:, None, :]
    crit = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 100, 1e-14)
    if model == 'equidistant':
        xy = cv2.fisheye.undistortPoints(pts, k, np.array(d), criteria=crit)
    else:
        xy = cv2.undistortPointsIter(pts, k, np.array(d), None, None, crit)
    xy = xy.reshape(-1, 2)
    return np.concatenate([xy, np.ones((len(xy), 1))], 1)


def _project_raw(p, k, model, d):
    if model == 'equidistant':
        uv, _ = cv2.fisheye.projectPoints(np.array(p, float).reshape(1, 1, 3), np.zeros(3),
                                          np.zeros(3), k, np.array(d))
    else:
        uv, _ = cv2.projectPoints(np.array(p, float).reshape(1, 3), np.zeros(3), np.zeros(3),
                                  k, np.array(d))
    return uv.reshape(2)


@pytest.mark.parametrize('model, d', DISTORTIONS)
def test_raw_distorted_image_lifts_through_the_undistorted_ray(model, d):
    """A tilted plane seen by a camera with lens distortion: every raw pixel's depth is where its
    true (undistorted) ray meets the plane. Grasps near the corner must land on the plane, on
    their true ray; ignoring D puts them centimetres off."""
    n_true = np.array((0.2, -0.45, -0.87)) / np.linalg.norm((0.2, -0.45, -0.87))
    point = np.array((0.0, 0.05, 1.0))
    vv, uu = np.mgrid[0:480, 0:640].astype(np.float64)
    rays = _rays(uu, vv, K, model, d)
    depth = ((n_true @ point) / (rays @ n_true)).reshape(480, 640).astype(np.float32)
    cams = cams_with(blob((2.5, 2.5), 0.9) + blob((12.5, 13.0), 0.9, 0.9))
    pipe, _ = make_pipe(cams, top_k=2)
    rgb = rgb_image()
    plain = pipe(rgb, depth, K, actions='hold')
    r = pipe(rgb, depth, K, actions='hold', D=d, distortion_model=model)
    assert len(r.grasps) == 2
    np.testing.assert_array_equal(r.heatmaps['hold'], plain.heatmaps['hold'])  # 2-D: raw pixels
    worst_plain = 0.0
    for g, g0 in zip(r.grasps, plain.grasps):
        assert (g.u, g.v) == (g0.u, g0.v) and g.valid_3d
        p = np.array(g.position)
        ray = _rays(g.u, g.v, K, model, d)[0]
        assert abs((p - point) @ n_true) < 1e-3                               # on the plane
        assert p == pytest.approx(ray * (n_true @ point) / (n_true @ ray), abs=1.5e-3)
        assert _project_raw(p, K, model, d) == pytest.approx([g.u, g.v], abs=0.05)
        assert angle_deg(g.normal, n_true) < 1.5
        check_pose(g)
        worst_plain = max(worst_plain, float(np.linalg.norm(np.array(g0.position) - p)))
    assert worst_plain > 0.01  # without D the corner grasp is off by more than a centimetre


def test_zero_distortion_changes_nothing_and_bad_distortion_is_refused():
    depth = render_plane(TILTED[1][0], TILTED[1][1], K, (480, 640)).astype(np.float32)
    pipe, _ = make_pipe(cams_with(blob((6.3, 9.6), 1.0) + blob((12, 3), 1.0, 0.8)))
    a = pipe(rgb_image(), depth, K, actions='hold')
    b = pipe(rgb_image(), depth, K, actions='hold', D=[0.0] * 5, distortion_model='plumb_bob')
    assert a.grasps == b.grasps
    for D, model, text in [([0.1, np.nan, 0, 0, 0], 'plumb_bob', 'nan or inf'),
                           ([0.1, 0.0, 0.0], 'plumb_bob', 'plumb_bob takes 4 / 5 / 8 / 12 / 14'),
                           ([0.1, 0.0, 0.0, 0.0, 0.0], 'equidistant', 'equidistant takes 4'),
                           ([0.1, 0.0, 0.0, 0.0], 'kannala', "model 'kannala' is not supported"),
                           ('abc', 'plumb_bob', 'must be numbers')]:
        with pytest.raises(InputError, match=text):
            pipe(rgb_image(), depth, K, actions='hold', D=D, distortion_model=model)


def test_x_axis_follows_an_elongated_blob():
    # floor-like plane, blob centred on the image centre column (u = 319.5): by symmetry the
    # closing axis is exactly the camera x axis for a horizontal blob
    n_true = np.array([0.0, -0.5, -0.866]) / np.linalg.norm([0.0, -0.5, -0.866])
    point = (0.0, 0.2, 1.0)
    depth = render_plane(n_true, point, K, (480, 640)).astype(np.float32)
    pipe, _ = make_pipe(cams_with(blob((10, 7.5), 0.6, sigma_c=2.5)), top_k=1)
    g = pipe(rgb_image(), depth, K, actions='hold').grasps[0]
    R = check_pose(g)
    assert angle_deg(R[:, 0], [1, 0, 0]) < 0.1
    assert R[:, 1] == pytest.approx(np.cross(R[:, 2], R[:, 0]))
    # vertical blob: x along the in-plane direction of the image column
    pipe, _ = make_pipe(cams_with(blob((8, 7.5), 2.5, sigma_c=0.4)), top_k=1)
    g = pipe(rgb_image(), depth, K, actions='hold').grasps[0]
    R = check_pose(g)
    down_plane = np.cross(n_true, [1.0, 0, 0])  # (0, 0.866, -0.5) up to sign
    assert angle_deg(R[:, 0], down_plane) < 1.0 or angle_deg(R[:, 0], -down_plane) < 1.0
    # diagonal blob on a square image and a fronto-parallel plane: x = (1, 1, 0) / sqrt(2);
    # width = the 5-95 % extent of the half-maximum region along x, in metres
    k = np.array([[500.0, 0, 223.5], [0, 500.0, 223.5], [0, 0, 1]])
    diag = cams_with(blob((7.5, 7.5), 0.5, sigma_c=3.0, angle=np.pi / 4))
    pipe, _ = make_pipe(diag, top_k=1, nms_radius=1000, region_radius=1.0)
    r = pipe(rgb_image(448, 448), np.full((448, 448), 0.8, np.float32), k, actions='hold')
    g = r.grasps[0]
    R = check_pose(g)
    assert angle_deg(R[:, 0], [1, 1, 0]) < 1.0
    heat = r.heatmaps['hold']
    rows, cols = np.nonzero(heat >= 0.5 * g.score)
    t = ((cols - 223.5) + (rows - 223.5)) / np.sqrt(2) * 0.8 / 500  # metres along x
    # the width is measured on at most MAX_REGION_POINTS region pixels (regular stride): within
    # 1 % of the full region's extent (this region has ~3x more pixels)
    assert rows.size > 2 * MAX_REGION_POINTS
    assert g.width == pytest.approx(np.percentile(t, 95) - np.percentile(t, 5), rel=0.01)
    assert 0.2 < g.width < 0.6
    # the default region_radius (0.15 m) keeps only region points near the grasp
    pipe, _ = make_pipe(diag, top_k=1, nms_radius=1000)
    g2 = pipe(rgb_image(448, 448), np.full((448, 448), 0.8, np.float32), k,
              actions='hold').grasps[0]
    assert 0.2 < g2.width <= 0.3 and angle_deg(g2.rotation()[:, 0], [1, 1, 0]) < 1.0


def test_holes_16uc1_vs_32fc1_and_invalid_depth():
    n_true = np.array(TILTED[1][0]) / np.linalg.norm(TILTED[1][0])
    z = render_plane(n_true, TILTED[1][1], K, (480, 640))
    mm = np.round(z * 1000).astype(np.uint16)
    f32 = (mm / 1000.0).astype(np.float32)
    pipe, _ = make_pipe(cams_with(blob((6.3, 9.6), 1.0) + blob((12, 3), 1.0, 0.8)))
    rgb = rgb_image()
    a = pipe(rgb, mm, K, actions='hold').grasps
    b = pipe(rgb, f32, K, actions='hold').grasps
    for ga, gb in zip(a, b, strict=True):
        assert ga.position == pytest.approx(gb.position, abs=1e-6)
        assert ga.normal == pytest.approx(gb.normal, abs=1e-6)
        assert ga.quaternion == pytest.approx(gb.quaternion, abs=1e-6)
    # 40 % holes: zeros in 16UC1, NaN / inf / negative in 32FC1 -> the same result within 1 mm
    rng = np.random.default_rng(0)
    holes = rng.random(mm.shape) < 0.4
    mm_h = mm.copy()
    mm_h[holes] = 0
    f_h = f32.copy()
    f_h[holes] = rng.choice(np.array([np.nan, np.inf, -1.0, 0.0], np.float32), holes.sum())
    for d in (mm_h, f_h):
        for g0, g in zip(a, pipe(rgb, d, K, actions='hold').grasps, strict=True):
            assert g.valid_3d
            assert np.array(g.position) == pytest.approx(g0.position, abs=1e-3)
            assert angle_deg(g.normal, n_true) < 2.0
    # all invalid: no crash, every candidate without 3-D (NaN), the cloud empty
    pipe_c, _ = make_pipe(cams_with(blob((6.3, 9.6), 1.0)), return_cloud=True)
    for d in (np.zeros_like(mm), np.full_like(f32, np.nan)):
        r = pipe_c(rgb, d, K, actions='hold')
        assert r.grasps and all(not g.valid_3d for g in r.grasps)
        assert all(math.isnan(x) for x in r.grasps[0].position + r.grasps[0].normal)
        assert math.isnan(r.grasps[0].width) and math.isnan(r.grasps[0].depth_spread)
        assert r.cloud['hold'].shape == (0, 4)
    # 90 % holes: below min_valid_depth_fraction (0.3) -> no 3-D rather than a guess
    sparse = mm.copy()
    sparse[rng.random(mm.shape) < 0.9] = 0
    assert not any(g.valid_3d for g in pipe(rgb, sparse, K, actions='hold').grasps)
    # out-of-range depth (> max_depth) is invalid too
    assert not pipe(rgb, np.full_like(f32, 9.0), K, actions='hold').grasps[0].valid_3d


def test_half_size_depth_rescales_K():
    n_true = np.array(TILTED[2][0]) / np.linalg.norm(TILTED[2][0])
    point = TILTED[2][1]
    full = render_plane(n_true, point, K, (480, 640)).astype(np.float32)
    # the half-size image of the same camera: its pixel (ud, vd) covers full-res pixels
    # 2ud..2ud+1, i.e. it looks along the full-res ray through (2ud + 0.5, 2vd + 0.5)
    vv, uu = np.mgrid[0:240, 0:320].astype(float)
    rays = np.stack([2 * uu + 0.5, 2 * vv + 0.5, np.ones_like(uu)], -1) @ np.linalg.inv(K).T
    half = ((n_true @ point) / (rays @ n_true)).astype(np.float32)
    pipe, _ = make_pipe(cams_with(blob((6.3, 9.6), 1.0) + blob((12, 3), 1.0, 0.8)),
                        return_cloud=True)
    rgb = rgb_image()
    rf, rh = pipe(rgb, full, K, actions='hold'), pipe(rgb, half, K, actions='hold')
    assert len(rf.grasps) == len(rh.grasps) == 2
    for gf, gh in zip(rf.grasps, rh.grasps, strict=True):
        assert (gh.u, gh.v) == (gf.u, gf.v)  # (u, v) stay in RGB pixels
        p = np.array(gh.position)
        assert abs((p - point) @ n_true) < 1e-3
        assert p == pytest.approx(gf.position, abs=1e-3)
        assert angle_deg(gh.normal, gf.normal) < 1.0
        check_pose(gh)
    cloud = rh.cloud['hold']
    assert cloud.shape[1] == 4 and len(cloud) > 100
    assert np.abs((cloud[:, :3] - point) @ n_true).max() < 1e-3
    assert cloud[:, 3].min() >= 0.5
    # a depth image with another aspect ratio is refused, not stretched
    with pytest.raises(InputError, match='aspect'):
        pipe(rgb, full[:, :600], K, actions='hold')


# ------------------------------------------------------------------------------ real frames


def _load_frame(root, color, depth):
    rgb = cv2.cvtColor(cv2.imread(str(root / color)), cv2.COLOR_BGR2RGB)
    d = cv2.imread(str(root / depth), cv2.IMREAD_UNCHANGED)
    meta = json.loads((root / 'camera_primesense.json').read_text())
    k = np.array(meta['intrinsic_matrix'], float).reshape(3, 3).T  # column-major
    assert d.dtype == np.uint16 and rgb.shape[:2] == d.shape
    return rgb, d, k


def _reference_plane(depth_m, k, u, v, half):
    """Plane fitted to a (2 half + 1)^2 patch, with one 3-sigma refit."""
    r0, c0 = int(round(v)) - half, int(round(u)) - half
    patch = depth_m[r0:r0 + 2 * half + 1, c0:c0 + 2 * half + 1]
    rows, cols = np.nonzero(np.isfinite(patch))
    pts = geo.backproject(cols + c0, rows + r0, patch[rows, cols], k)
    n, c = geo.fit_plane(pts)
    res = (pts - c) @ n
    n, c = geo.fit_plane(pts[np.abs(res) < 3 * res.std()])
    return n, c


# (grid cell of the hand-made heat blob, normal tolerance in degrees); cells were picked on the
# images: living room 00000 = the wooden floor (bottom) and the wall right of the curtain;
# TUM = the office floor between the chairs (Kinect depth quantisation of ~1.5 cm at 2.2 m)
REAL = [('color/00000.jpg', 'depth/00000.png', 1000.0, (14, 7), 1.0),
        ('color/00000.jpg', 'depth/00000.png', 1000.0, (2, 11), 3.0),
        ('other_formats/TUM_color.png', 'other_formats/TUM_depth.png', 5000.0, (14, 8), 5.0)]


@pytest.mark.parametrize('color, depth, scale, cell, tol_deg', REAL)
def test_real_frames_lift_onto_the_depth_surface(shared_data, color, depth, scale, cell,
                                                 tol_deg):
    rgb, d16, k = _load_frame(shared_data / 'rgbd', color, depth)
    pipe, _ = make_pipe(cams_with(blob(cell, 0.8)), top_k=1, depth_scale=scale,
                        return_cloud=True)
    r = pipe(rgb, d16, k, actions='hold')
    g = r.grasps[0]
    u_exp, v_exp = (cell[1] + 0.5) * 40 - 0.5, (cell[0] + 0.5) * 30 - 0.5
    assert (g.u, g.v) == pytest.approx((u_exp, v_exp), abs=0.01)
    assert g.valid_3d
    depth_m = geo.depth_to_metres(d16, scale)
    med = geo.robust_depth(depth_m, g.u, g.v, 7).median
    assert abs(g.position[2] - med) < 0.005  # z = the median depth there, within 5 mm
    n_ref, c_ref = _reference_plane(depth_m, k, g.u, g.v, 30)
    assert abs((np.array(g.position) - c_ref) @ n_ref) < 0.01  # on the surface
    ang = angle_deg(g.normal, n_ref)
    assert min(ang, 180 - ang) < tol_deg
    check_pose(g)
    # the cloud: back-projected valid pixels of the heat region, z = their depth
    cloud = r.cloud['hold']
    assert len(cloud) > 500 and cloud[:, 3].min() >= pipe.config.heat_threshold
    uv = geo.project(cloud[:, :3].astype(np.float64), k)
    ui, vi = np.round(uv[:, 0]).astype(int), np.round(uv[:, 1]).astype(int)
    assert np.allclose(cloud[:, 2], depth_m[vi, ui], atol=1e-5)


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope='module')
def locate_ckpt(tmp_path_factory):
    import torch

    from affordance_core.checkpoint import save_checkpoint
    from affordance_core.registry import create_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_model('locate_test', num_classes=5, classes=list(CLASSES))
    return save_checkpoint(model.eval(), tmp_path_factory.mktemp('ckpt') / 'locate_test.pt')


def test_end_to_end_torch_backend(locate_ckpt):
    import torch

    from affordance_core.checkpoint import load_checkpoint
    from affordance_core.data.transforms import preprocess_rgb

    torch.set_num_threads(1)
    pipe = GroundingPipeline.from_checkpoint(locate_ckpt, backend='torch', device='cpu',
                                             top_k=3, min_score=0.0)
    assert pipe.classes == CLASSES and pipe.input_size == 224
    rgb = rgb_image(120, 160, seed=3)
    depth = np.full((120, 160), 1.5, np.float32)
    k = np.array([[130.0, 0, 79.5], [0, 130.0, 59.5], [0, 0, 1]])
    r = pipe(rgb, depth, k, actions=['hold', 'open'])
    for a in ('hold', 'open'):
        hm = r.heatmaps[a]
        assert hm.shape == (120, 160) and hm.dtype == np.float32
        assert hm.min() >= 0.0 and hm.max() <= 1.0 and hm.max() == pytest.approx(1.0)
    scores = [g.score for g in r.grasps]
    assert scores == sorted(scores, reverse=True) and 1 <= len(r.grasps_by_action['hold']) <= 3
    assert set(r.timings) == TIMING_KEYS
    assert all(g.valid_3d and g.position[2] == pytest.approx(1.5, abs=1e-6) for g in r.grasps)
    # the grid heatmap is the model's own raw CAM, min-maxed
    model = load_checkpoint(locate_ckpt)
    with torch.no_grad():
        cam = model.cams(preprocess_rgb(rgb, 224)[None])[0, CLASSES.index('open')].numpy()
    assert np.allclose(r.heatmaps_grid['open'], minmax(cam), atol=1e-4)
    assert pipe.model_runs == 1
    pipe(rgb, actions=['push'])
    assert pipe.model_runs == 1


# ------------------------------------------------------------------------------ object prior


class FakePrior:
    """Object prior stand-in: a fixed (h, w) object map for every image, counts calls."""

    def __init__(self, obj):
        self.obj, self.calls = np.asarray(obj, np.float32), 0

    def __call__(self, images):
        self.calls += 1
        return np.repeat(self.obj[None], images.shape[0], 0)


def test_object_prior_removes_background_heat():
    hold = blob((4, 4), 1.2) + blob((12, 12), 1.2, height=0.95)  # object + background blob
    obj = np.zeros((8, 8), np.float32)
    obj[:4, :4] = 1.0                                              # object: top-left quarter
    cfg = dict(min_score=0.3, nms_radius=10.0, top_k=0)
    plain, _ = make_pipe(cams_with(hold))
    r0 = plain(rgb_image(), actions='hold')
    assert r0.object_map is None and len(r0.grasps) == 2  # both blobs give a grasp
    prior = FakePrior(obj)
    pipe = GroundingPipeline(PipelineConfig(**cfg), backend=FakeBackend(cams_with(hold)),
                             object_prior=prior)
    r = pipe(rgb_image(), actions=['hold', 'pour'])
    grid = r.heatmaps_grid['hold']
    assert grid[4, 4] == pytest.approx(1.0, abs=1e-3) and grid[12, 12] < 1e-6
    assert r0.heatmaps['hold'][300:, 400:].max() > 0.9  # the background blob before ...
    assert r.heatmaps['hold'][300:, 400:].max() < 1e-6   # ... and with the object prior
    assert [(round(g.u), round(g.v)) for g in r.grasps_by_action['hold']] == [(180, 135)]
    assert r.object_map.shape == (8, 8) and r.object_map.max() == 1.0
    from affordance_core.inference.object_prior import suppress_background
    np.testing.assert_allclose(grid, suppress_background(minmax(hold), obj), atol=1e-6)
    pipe(rgb_image(), actions='hold')  # same frame: cached, the prior does not run again
    assert prior.calls == 1
    masked = GroundingPipeline(PipelineConfig(object_prior_mode='mask', **cfg),
                               backend=FakeBackend(cams_with(hold)), object_prior=FakePrior(obj))
    assert masked(rgb_image(), actions='hold').heatmaps_grid['hold'][12, 12] == 0.0
    with pytest.raises(ValueError, match='object_prior_mode'):
        PipelineConfig(object_prior_mode='gate')
    with pytest.raises(ValueError, match='object_prior_threshold'):
        PipelineConfig(object_prior_threshold=2.0)


def test_object_prior_from_c2am_checkpoint(locate_ckpt, tmp_path):
    import torch

    from affordance_core.checkpoint import load_checkpoint, save_checkpoint
    from affordance_core.data.transforms import preprocess_rgb
    from affordance_core.inference.object_prior import suppress_background
    from affordance_core.models import c2am  # noqa: F401  (registers c2am_test)
    from affordance_core.registry import create_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    prior_path = save_checkpoint(create_model('c2am_test').eval(), tmp_path / 'c2am_test.pt')
    pipe = GroundingPipeline.from_checkpoint(locate_ckpt, backend='torch', device='cpu',
                                             object_prior=str(prior_path), min_score=0.0)
    rgb = rgb_image(120, 160, seed=4)
    r = pipe(rgb, actions=['hold'])
    x = preprocess_rgb(rgb, 224)[None]
    with torch.no_grad():
        cam = load_checkpoint(locate_ckpt).cams(x)[0, CLASSES.index('hold')].numpy()
        obj = load_checkpoint(prior_path).object_map(x)[0].numpy()
    assert obj.shape == (14, 14)
    np.testing.assert_allclose(r.heatmaps_grid['hold'], suppress_background(cam, obj), atol=1e-4)
    np.testing.assert_allclose(r.object_map, minmax(obj), atol=1e-5)
    assert r.heatmaps['hold'].shape == (120, 160) and r.heatmaps['hold'].max() == 1.0
    with pytest.raises(FileNotFoundError, match='object prior checkpoint not found'):
        GroundingPipeline.from_checkpoint(locate_ckpt, backend='torch', device='cpu',
                                          object_prior=str(tmp_path / 'missing.pt'))
    with pytest.raises(ValueError, match='no object_map'):
        GroundingPipeline.from_checkpoint(locate_ckpt, backend='torch', device='cpu',
                                          object_prior=str(locate_ckpt))


# ------------------------------------------------------------------------------ batched lift


def _subsample(rows, cols):
    if rows.size <= MAX_REGION_POINTS:
        return rows, cols
    step = -(-rows.size // MAX_REGION_POINTS)
    return rows[::step], cols[::step]


def _axis_from_2d(region, heat_w, ud, vd, z, k_d):
    rows, cols = _subsample(*np.nonzero(region))
    if rows.size < 3:
        return None
    pix = np.stack([cols, rows, np.zeros_like(cols)], axis=1).astype(np.float64)
    axis = geo.principal_axis(pix, np.array([0.0, 0.0, 1.0]), heat_w[rows, cols])
    if axis is None:
        return None
    return geo.backproject(ud + axis[0], vd + axis[1], z, k_d) - geo.backproject(ud, vd, z, k_d)


def reference_lift_one(cfg, action, p, heat_d, frame):
    """The lift of one candidate with the single-candidate geometry functions (the pipeline's
    implementation before it was vectorised over the candidates)."""
    depth_m, k_d = frame.depth_m, frame.K_depth
    Hd, Wd = depth_m.shape
    scale = 0.5 * (frame.sx + frame.sy)
    odd = (lambda n: (lambda m: m if m % 2 else m + 1)(max(int(round(n)), 1)))
    ud, vd = (p.u + 0.5) * frame.sx - 0.5, (p.v + 0.5) * frame.sy - 0.5
    stats = geo.robust_depth(depth_m, ud, vd, odd(cfg.depth_window * scale))
    if stats.count == 0 or stats.valid_fraction < cfg.min_valid_depth_fraction:
        return Grasp(action, p.score, p.u, p.v)
    ray = geo.backproject(p.u, p.v, 1.0, frame.K)
    fit = geo.surface_normal(depth_m, k_d, ud, vd, odd(cfg.normal_window * scale),
                             stats.median, cfg.region_depth_tolerance)
    rc = min(max(int(round(vd)), 0), Hd - 1)
    cc = min(max(int(round(ud)), 0), Wd - 1)
    position = None
    if fit is not None:
        normal = fit[0]
        position = geo.intersect_ray_plane(ray, normal,
                                           geo.backproject(cc, rc, stats.median, k_d))
    if position is None:
        position = stats.median * ray
    if fit is None:
        normal = -position / np.linalg.norm(position)
    if float(normal @ position) > 0:
        normal = -normal
    approach = -normal
    z_near = max(float(position[2]) - cfg.region_radius, cfg.min_depth)
    reach = int(math.ceil(1.25 * cfg.region_radius * max(k_d[0, 0], k_d[1, 1]) / z_near)) + 2
    r0, r1 = max(rc - reach, 0), min(rc + reach + 1, Hd)
    c0, c1 = max(cc - reach, 0), min(cc + reach + 1, Wd)
    heat_w = heat_d[r0:r1, c0:c1]
    thr = min(cfg.heat_threshold * p.score, float(heat_d[rc, cc]))
    _, labels = cv2.connectedComponents((heat_w >= thr).astype(np.uint8), connectivity=8)
    region = labels == labels[rc - r0, cc - c0]
    rows, cols = _subsample(*np.nonzero(region & frame.valid[r0:r1, c0:c1]))
    rows, cols = rows + r0, cols + c0
    pts = geo.backproject(cols, rows, depth_m[rows, cols], k_d)
    near = ((np.abs((pts - position) @ normal) <= cfg.region_depth_tolerance)
            & (np.linalg.norm(pts - position, axis=1) <= cfg.region_radius))
    pts, rows, cols = pts[near], rows[near], cols[near]
    axis3d = geo.principal_axis(pts, approach, heat_d[rows, cols])
    axis2d = None
    if axis3d is None:
        axis2d = _axis_from_2d(region, heat_w, ud, vd, stats.median, k_d)
    R = geo.grasp_rotation(approach, [axis3d, axis2d])
    width = geo.extent_along(pts, R[:, 0]) if len(pts) else math.nan
    quat = geo.rotation_to_quaternion(R)
    return Grasp(action, p.score, p.u, p.v, True, tuple(position), tuple(normal), tuple(quat),
                 float(width), float(stats.spread))


def assert_same_lift(pipe, rgb, depth, k, actions):
    """The pipeline's (vectorised) lift of every candidate equals the reference lift."""
    from affordance_core.inference.grasps import GraspPoint

    r = pipe(rgb, depth, k, actions=actions)
    frame = pipe._check_depth(depth, k, rgb.shape[:2])
    Hd, Wd = frame.depth_m.shape
    counts = [0, 0]
    for a in actions:
        heat = r.heatmaps[a]
        if heat.shape != (Hd, Wd):
            heat = cv2.resize(heat, (Wd, Hd), interpolation=cv2.INTER_LINEAR)
        for g in r.grasps_by_action[a]:
            ref = reference_lift_one(pipe.config, a, GraspPoint(g.u, g.v, g.score, 0.0, 0.0),
                                     heat, frame)
            assert g.valid_3d == ref.valid_3d
            counts[g.valid_3d] += 1
            for name in ('position', 'normal', 'quaternion', 'width', 'depth_spread'):
                got, want = np.atleast_1d(getattr(g, name)), np.atleast_1d(getattr(ref, name))
                assert np.array_equal(np.isnan(got), np.isnan(want)), name
                tol = 1e-9 * np.abs(want) if name == 'width' else 1e-9
                assert np.all(np.abs(got - want)[~np.isnan(want)] <= tol), (name, got, want)
    return counts


def random_cams(seed, n=6):
    rng = np.random.default_rng(seed)
    cams = np.zeros((len(CLASSES), 16, 16), np.float32)
    for c in range(3):
        for _ in range(n):
            sc = rng.uniform(0.4, 3.0) if rng.random() < 0.7 else None
            cams[c] += blob(rng.uniform(-0.5, 15.5, 2), rng.uniform(0.4, 2.5),
                            rng.uniform(0.3, 1.0), sigma_c=sc, angle=rng.uniform(0, np.pi))
    return cams


def test_vectorised_lift_equals_per_candidate_lift():
    rgb = rgb_image()
    acts = ['hold', 'cut_with', 'pour']
    n_true, point = TILTED[1]
    z = render_plane(n_true, point, K, (480, 640))
    z[150:330, 200:420] = 0.7                                     # a box on the plane
    rng = np.random.default_rng(5)
    mm = np.round(z * 1000).astype(np.uint16)
    mm[rng.random(mm.shape) < 0.4] = 0                            # 40 % holes
    mm[:, :60] = 0                                                # no depth at the left border
    mm[rng.random(mm.shape) < 0.5 * (np.arange(640) > 560)] = 0   # sparse at the right border
    cfg = dict(top_k=10, min_score=0.05, nms_radius=15.0)
    total = np.zeros(2, int)
    for seed in range(3):
        pipe, _ = make_pipe(random_cams(seed), **cfg)
        total += assert_same_lift(pipe, rgb, mm, K, acts)
    # border blobs and round blobs (the closing axis from the pixel layout, or none)
    cams = cams_with(blob((0, 0), 0.7) + blob((15, 15), 0.8, sigma_c=2.0) + blob((0, 15), 1.0)
                     + blob((7, 7.5), 1.4), pour=blob((4, 11), 1.0, sigma_c=1.1))
    flat = np.full((480, 640), 0.8, np.float32)
    flat[rng.random(flat.shape) < 0.2] = np.nan
    pipe, _ = make_pipe(cams, **cfg)
    total += assert_same_lift(pipe, rgb, flat, K, ['hold', 'pour'])
    # half-size float depth (rescaled K), other settings
    half = render_plane(n_true, point, geo.scale_intrinsics(K, (640, 480), (320, 240)),
                        (240, 320)).astype(np.float32)
    half[rng.random(half.shape) < 0.3] = np.nan
    pipe, _ = make_pipe(random_cams(7), depth_window=4, normal_window=14, region_radius=0.4,
                        heat_threshold=0.3, region_depth_tolerance=0.02, **cfg)
    total += assert_same_lift(pipe, rgb, half, K, acts)
    # single rows of depth: collinear patches, no plane fit (normal = -ray)
    rows = np.full((480, 640), np.nan, np.float32)
    rows[::25] = 1.2
    pipe, _ = make_pipe(random_cams(8), min_valid_depth_fraction=0.1, **cfg)
    total += assert_same_lift(pipe, rgb, rows, K, acts)
    # a tolerance below the depth noise: few or no region points (NaN widths)
    noisy = (z + 0.003 * rng.standard_normal(z.shape)).astype(np.float32)
    pipe, _ = make_pipe(random_cams(9), region_depth_tolerance=0.0001, **cfg)
    total += assert_same_lift(pipe, rgb, noisy, K, acts)
    assert total[1] > 60 and total[0] > 3  # lifted and not lifted candidates


def test_vectorised_lift_on_real_frames(shared_data):
    rgb, d16, k = _load_frame(shared_data / 'rgbd', 'other_formats/TUM_color.png',
                              'other_formats/TUM_depth.png')
    pipe = GroundingPipeline(PipelineConfig(top_k=10, min_score=0.0, nms_radius=12.0,
                                            depth_scale=5000.0),
                             backend=FakeBackend(from_image=True))
    assert sum(assert_same_lift(pipe, rgb, d16, k, ['hold', 'pour'])) >= 10
    rgb, d16, k = _load_frame(shared_data / 'rgbd', 'color/00003.jpg', 'depth/00003.png')
    pipe, _ = make_pipe(random_cams(11), top_k=10, min_score=0.05, nms_radius=20.0)
    assert sum(assert_same_lift(pipe, rgb, d16, k, ['hold', 'cut_with', 'pour'])) >= 10


def test_component_is_the_connected_component():
    from affordance_core.inference.pipeline import _component

    rng = np.random.default_rng(6)
    for density in (0.3, 0.55, 0.8):
        mask = (rng.random((60, 80)) < density).astype(np.uint8)
        _, labels = cv2.connectedComponents(mask, connectivity=8)
        for row, col in rng.integers(0, [60, 80], (30, 2)):
            region, top, left = _component(mask.copy(), int(row), int(col))
            full = np.zeros(mask.shape, bool)
            full[top:top + region.shape[0], left:left + region.shape[1]] = region
            assert np.array_equal(full, labels == labels[row, col])  # seed on 0: background
