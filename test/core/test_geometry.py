"""Depth lifting primitives: intrinsics, depth encodings, back-projection, robust depth, normals,
grasp frames and quaternions, on analytic planes."""
from __future__ import annotations

import numpy as np
import pytest
from transforms3d.quaternions import quat2mat

from affordance_core.inference import geometry as geo
from affordance_core.inference.geometry import InputError

K = np.array([[525.0, 0.0, 319.5], [0.0, 525.0, 239.5], [0.0, 0.0, 1.0]])


def render_plane(normal, point, K, shape):
    """Depth (metres, float64) of the plane through ``point`` with ``normal`` seen by K.

    Pixel (u, v) looks along r = K^-1 [u, v, 1] (r_z = 1), so z = (n . point) / (n . r).
    """
    n = np.asarray(normal, float) / np.linalg.norm(normal)
    vv, uu = np.mgrid[0:shape[0], 0:shape[1]].astype(float)
    rays = np.stack([uu, vv, np.ones_like(uu)], -1) @ np.linalg.inv(K).T
    return (n @ np.asarray(point, float)) / (rays @ n)


def angle_deg(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    c = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))


def test_check_intrinsics():
    assert np.array_equal(geo.check_intrinsics(K.tolist()), K)
    assert np.array_equal(geo.check_intrinsics(K.reshape(-1)), K)  # 9 row-major values
    with pytest.raises(InputError, match='3x3'):
        geo.check_intrinsics(np.eye(3)[:2])
    with pytest.raises(InputError, match='positive focal'):
        geo.check_intrinsics([[0, 0, 1], [0, 525, 2], [0, 0, 1]])
    with pytest.raises(InputError, match='positive focal'):
        geo.check_intrinsics([[525, 0, 1], [0, -525, 2], [0, 0, 1]])
    with pytest.raises(InputError, match='nan'):
        geo.check_intrinsics(np.where(np.eye(3) > 0, np.nan, 0))
    with pytest.raises(InputError, match='last row'):
        geo.check_intrinsics(K.T)  # transposed (column-major read as row-major)
    with pytest.raises(InputError, match='numeric'):
        geo.check_intrinsics('K')
    assert issubclass(InputError, ValueError)


def test_depth_encodings():
    d16 = np.array([[0, 1000, 65535], [250, 4000, 4001]], np.uint16)
    m = geo.depth_to_metres(d16, 1000.0, min_depth=0.3, max_depth=4.0)
    assert m.dtype == np.float32
    assert np.isnan(m[0, 0]) and m[0, 1] == 1.0 and np.isnan(m[0, 2])
    assert np.isnan(m[1, 0]) and m[1, 1] == 4.0 and np.isnan(m[1, 2])  # range [0.3, 4.0]
    assert geo.depth_to_metres(np.array([[5000]], np.uint16), 5000.0)[0, 0] == 1.0  # TUM
    f = np.array([[np.nan, np.inf, -np.inf, -1.0, 0.0, 2.0]], np.float32)
    mf = geo.depth_to_metres(f)
    assert np.isnan(mf[0, :5]).all() and mf[0, 5] == 2.0
    assert geo.depth_to_metres(f[..., None]).shape == (1, 6)  # (H, W, 1) accepted
    assert np.array_equal(geo.depth_to_metres(f.astype(np.float64)), mf, equal_nan=True)
    with pytest.raises(InputError, match='uint16'):
        geo.depth_to_metres(d16.astype(np.int32))
    with pytest.raises(InputError, match='empty'):
        geo.depth_to_metres(np.zeros((0, 4), np.uint16))
    with pytest.raises(InputError, match=r'\(H, W\)'):
        geo.depth_to_metres(np.zeros((4, 4, 2), np.float32))
    with pytest.raises(InputError, match='numpy'):
        geo.depth_to_metres([[1.0]])
    with pytest.raises(InputError, match='depth_scale'):
        geo.depth_to_metres(d16, 0.0)


def test_backproject_project_round_trip():
    k = np.array([[500.0, 0.0, 320.0], [0.0, 400.0, 240.0], [0.0, 0.0, 1.0]])
    p = geo.backproject(420.0, 340.0, 2.0, k)
    assert p == pytest.approx([0.4, 0.5, 2.0])  # X = (u - cx) Z / fx, Y = (v - cy) Z / fy
    uv = np.array([[10.25, 470.5], [639.0, 0.0]])
    pts = geo.backproject(uv[:, 0], uv[:, 1], np.array([0.7, 3.1]), k)
    assert np.allclose(geo.project(pts, k), uv, atol=1e-9)
    assert pts[:, 2] == pytest.approx([0.7, 3.1])  # z = depth along the optical axis


def test_scale_intrinsics_half_pixel_convention():
    kh = geo.scale_intrinsics(K, (640, 480), (320, 240))
    assert kh[0, 0] == 262.5 and kh[1, 1] == 262.5
    assert kh[0, 2] == (319.5 + 0.5) / 2 - 0.5 and kh[1, 2] == (239.5 + 0.5) / 2 - 0.5
    # half-res pixel (ud, vd) covers full-res pixels 2ud..2ud+1: same ray as full-res 2ud + 0.5
    ud, vd = np.array([0.0, 17.0, 319.0]), np.array([0.0, 100.0, 239.0])
    assert np.allclose(geo.backproject(ud, vd, 1.0, kh),
                       geo.backproject(2 * ud + 0.5, 2 * vd + 0.5, 1.0, K), atol=1e-12)
    k_d, sx, sy = geo.register_depth((240, 320), (480, 640), K)
    assert np.array_equal(k_d, kh) and (sx, sy) == (0.5, 0.5)
    assert geo.register_depth((480, 640), (480, 640), K)[1:] == (1.0, 1.0)
    with pytest.raises(InputError, match='aspect'):
        geo.register_depth((480, 480), (480, 640), K)


def test_robust_depth_ignores_holes_and_outliers():
    rng = np.random.default_rng(0)
    z = np.full((60, 80), 1000, np.uint16)
    z[rng.random(z.shape) < 0.4] = 0                                    # 40 % holes (16UC1)
    d = geo.depth_to_metres(z)
    s = geo.robust_depth(d, 40.2, 29.7, 9)
    assert (s.median, s.spread) == (1.0, 0.0)
    assert s.valid_fraction == pytest.approx(s.count / 81)
    assert 0.45 < s.valid_fraction < 0.75
    # NaN holes, Gaussian noise (1 mm) and 15 % outliers at 3 m (another surface)
    f = (1.0 + 0.001 * rng.standard_normal((60, 80))).astype(np.float32)
    f[rng.random(f.shape) < 0.3] = np.nan
    f[rng.random(f.shape) < 0.15] = 3.0
    s = geo.robust_depth(geo.depth_to_metres(f), 40, 30, 15)
    assert abs(s.median - 1.0) < 0.001
    assert 0.0008 < s.spread < 0.005
    # border: the fraction counts only the pixels inside the image
    s = geo.robust_depth(np.ones((5, 5), np.float32), 0, 0, 5)
    assert (s.valid_fraction, s.count) == (1.0, 9)
    s = geo.robust_depth(np.full((5, 5), np.nan, np.float32), 2, 2, 3)
    assert np.isnan(s.median) and s.count == 0 and s.valid_fraction == 0.0


@pytest.mark.parametrize('normal, point', [((0, 0, -1), (0, 0, 1.0)),
                                           ((0.3, -0.5, -0.8), (0.1, -0.05, 1.2)),
                                           ((-0.6, 0.2, -0.5), (0.0, 0.2, 0.9))])
def test_surface_normal_on_analytic_planes(normal, point):
    n_true = np.asarray(normal, float) / np.linalg.norm(normal)  # already toward the camera
    depth = render_plane(n_true, point, K, (480, 640)).astype(np.float32)
    u, v = geo.project(np.asarray(point), K)
    z = float(depth[int(round(v)), int(round(u))])
    n, c = geo.surface_normal(depth, K, u, v, 21, z, 0.05)
    assert angle_deg(n, n_true) < 0.05
    assert n @ c < 0  # oriented toward the camera
    # noise of 1 mm and 20 % holes: still within 2 degrees
    rng = np.random.default_rng(1)
    noisy = depth + 0.001 * rng.standard_normal(depth.shape).astype(np.float32)
    noisy[rng.random(depth.shape) < 0.2] = np.nan
    n2, _ = geo.surface_normal(noisy, K, u, v, 21, z, 0.05)
    assert angle_deg(n2, n_true) < 2.0


def test_backprojected_plane_points_lie_on_the_plane():
    n_true = np.array([0.3, -0.5, -0.8]) / np.linalg.norm([0.3, -0.5, -0.8])
    point = np.array([0.1, -0.05, 1.2])
    depth = render_plane(n_true, point, K, (480, 640)).astype(np.float32)
    pts, pix = geo.backproject_depth(depth, K)
    assert len(pts) == 480 * 640 and pix.shape == (480 * 640, 2)
    dist = np.abs((pts - point) @ n_true)
    assert dist.max() < 1e-4  # float32 depth rounding only (< 0.1 mm)


def test_surface_normal_ignores_other_surfaces():
    depth = np.full((100, 100), 1.0, np.float32)
    depth[:, 55:] = 0.6  # a closer object in the right part of the patch
    n, _ = geo.surface_normal(depth, K, 45, 50, 21, 1.0, 0.05)
    assert angle_deg(n, (0, 0, -1)) < 1e-6
    assert geo.surface_normal(np.full((9, 9), np.nan, np.float32), K, 4, 4, 5, 1.0, 0.1) is None


def test_fit_plane_degenerate_and_ray_intersection():
    assert geo.fit_plane(np.zeros((2, 3))) is None
    assert geo.fit_plane(np.outer(np.arange(5.0), [1, 2, 3])) is None  # collinear
    n, c = geo.fit_plane(np.array([[0, 0, 1], [1, 0, 1], [0, 1, 1], [1, 1, 1.0]]))
    assert abs(n[2]) == pytest.approx(1.0) and c == pytest.approx([0.5, 0.5, 1.0])
    p = geo.intersect_ray_plane(np.array([0.1, 0.0, 1.0]), np.array([0, 0, -1.0]),
                                np.array([0.0, 0.0, 2.0]))
    assert p == pytest.approx([0.2, 0.0, 2.0])
    # grazing ray (85 degrees from the normal) -> None
    ray = np.array([np.tan(np.radians(85)), 0.0, 1.0])
    assert geo.intersect_ray_plane(ray, np.array([0, 0, -1.0]), np.array([0, 0, 1.0])) is None


def test_grasp_rotation_axes_and_quaternion():
    z = np.array([0.0, 0.0, 1.0])
    R = geo.grasp_rotation(z, [np.array([-1.0, -1.0, 0.3])])  # sign flipped to x . e_x >= 0
    s = 1 / np.sqrt(2)
    assert np.allclose(R[:, 0], [s, s, 0]) and np.allclose(R[:, 1], [-s, s, 0])
    assert np.allclose(R[:, 2], z)
    assert np.allclose(R.T @ R, np.eye(3)) and np.linalg.det(R) == pytest.approx(1.0)
    q = geo.rotation_to_quaternion(R)  # 45 degrees about z: (0, 0, sin 22.5, cos 22.5)
    assert q == pytest.approx([0, 0, np.sin(np.pi / 8), np.cos(np.pi / 8)])
    # None and axes parallel to z are skipped; camera x is the final fallback
    R = geo.grasp_rotation(np.array([0, 0, 2.0]), [None, np.array([0, 0, 1.0])])
    assert np.allclose(R, np.eye(3))
    # a general approach: right-handed, z = approach, x orthogonal to it, unit (x, y, z, w)
    rng = np.random.default_rng(2)
    for _ in range(20):
        a, ax = rng.standard_normal(3), rng.standard_normal(3)
        R = geo.grasp_rotation(a, [ax])
        assert np.allclose(R[:, 2], a / np.linalg.norm(a))
        assert np.allclose(R.T @ R, np.eye(3), atol=1e-12) and np.linalg.det(R) > 0.999
        assert np.allclose(np.cross(R[:, 2], R[:, 0]), R[:, 1])
        q = geo.rotation_to_quaternion(R)
        assert np.linalg.norm(q) == pytest.approx(1.0) and q[3] >= 0
        assert np.allclose(quat2mat([q[3], q[0], q[1], q[2]]), R, atol=1e-9)


def test_principal_axis_and_extent():
    rng = np.random.default_rng(3)
    z = np.array([0.0, 0.0, 1.0])
    d = np.array([np.cos(0.4), np.sin(0.4), 0.0])
    t = rng.uniform(-0.05, 0.05, 500)
    pts = np.outer(t, d) + 0.005 * rng.standard_normal((500, 3)) * [1, 1, 0] + [0, 0, 1]
    ax = geo.principal_axis(pts, z)
    assert angle_deg(ax, d) < 1.0 or angle_deg(ax, -d) < 1.0
    assert abs(ax @ z) < 1e-12
    assert geo.extent_along(pts, d) == pytest.approx(0.09, rel=0.05)  # 5-95 % of U(-5, 5) cm
    disc = rng.standard_normal((500, 3)) * [1, 1, 0]
    assert geo.principal_axis(disc, z) is None  # round: no direction
    assert geo.principal_axis(pts[:2], z) is None
    assert np.isnan(geo.extent_along(np.zeros((0, 3)), d))
