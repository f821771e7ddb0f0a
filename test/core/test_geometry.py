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


# ------------------------------------------------------------------------------ batched variants
# Each batched function must reproduce its single-candidate namesake: the same decisions (None,
# valid, which axis) and the same numbers up to rounding.


def same(a, b, tol=0.0):
    a, b = np.asarray(a, float), np.asarray(b, float)
    assert a.shape == b.shape
    assert np.array_equal(np.isnan(a), np.isnan(b))
    ok = ~np.isnan(a)
    assert np.all(np.abs(a[ok] - b[ok]) <= tol), np.abs(a[ok] - b[ok]).max()


def holey_depth(rng, shape=(40, 50), holes=0.3, dtype=np.float32):
    """A noisy tilted plane with NaN / inf holes, a closer box and an empty (all-NaN) corner."""
    n = np.array([0.3, -0.4, -0.87])
    d = render_plane(n, (0.0, 0.0, 1.0), np.array([[60.0, 0, 25], [0, 60.0, 20], [0, 0, 1]]),
                     shape)
    d = d + 0.002 * rng.standard_normal(shape)
    d[10:18, 30:40] -= 0.3  # another surface
    d[rng.random(shape) < holes] = np.nan
    d[rng.random(shape) < 0.02] = np.inf
    d[:8, :8] = np.nan
    return d.astype(dtype)


def centres(rng, shape, n=60):
    """Centres everywhere, at the borders, on pixel edges (ties) and just outside."""
    H, W = shape
    u = np.concatenate([rng.uniform(-0.5, W - 0.5, n), [0, W - 1, -0.5, W - 0.5, 2.5, 3.5, 4.0]])
    v = np.concatenate([rng.uniform(-0.5, H - 0.5, n), [0, H - 1, -0.5, H - 0.5, 2.5, 0.5, 3.0]])
    return u, v


def test_window_patches_are_the_clipped_patches():
    rng = np.random.default_rng(10)
    img = rng.random((13, 17))
    u, v = centres(rng, img.shape)
    for window in (1, 2, 3, 7, 30):
        patches, inside, rows, cols = geo.window_patches(img, u, v, window)
        side = 2 * (window // 2) + 1
        assert patches.shape == inside.shape == (len(u), side, side)
        for k in range(len(u)):
            ref, r0, c0 = geo._patch(img, u[k], v[k], window)
            assert np.array_equal(patches[k][inside[k]], ref.ravel())
            assert np.isnan(patches[k][~inside[k]]).all()
            if ref.size:
                assert (rows[k][inside[k].any(1)][0], cols[k][inside[k].any(0)][0]) == (r0, c0)
    # a non-contiguous image works too
    p2 = geo.window_patches(np.asfortranarray(img), u, v, 5)[0]
    assert np.array_equal(p2, geo.window_patches(img, u, v, 5)[0], equal_nan=True)


@pytest.mark.parametrize('dtype', [np.float32, np.float64])
def test_robust_depth_batch_matches_robust_depth(dtype):
    rng = np.random.default_rng(11)
    d = holey_depth(rng, dtype=dtype)
    u, v = centres(rng, d.shape)
    for window in (1, 4, 7, 15):
        stats = geo.robust_depth_batch(d, u, v, window)
        assert isinstance(stats, geo.DepthStatsBatch) and len(stats) == len(u)
        for k in range(len(u)):
            ref, got = geo.robust_depth(d, u[k], v[k], window), stats[k]
            assert isinstance(got, geo.DepthStats)
            # bit for bit, NaN where no pixel is valid
            same([ref.median, ref.spread, ref.valid_fraction],
                 [got.median, got.spread, got.valid_fraction])
            assert ref.count == got.count
    assert np.isnan(geo.robust_depth_batch(d, [3.0], [3.0], 5).median[0])  # empty corner


def _line_with_offset(rng, ratio):
    """9 points whose 2nd singular value is ``ratio`` times the first (collinearity test)."""
    t = np.linspace(-1, 1, 9)
    off = t ** 2 - np.mean(t ** 2)  # orthogonal to t
    d = np.array([1.0, 2.0, 3.0]) / np.sqrt(14)
    e = np.cross(d, [0, 0, 1.0])
    e /= np.linalg.norm(e)
    pts = np.outer(t, d) + np.outer(off, e) * ratio * np.linalg.norm(t) / np.linalg.norm(off)
    return pts + rng.uniform(-1, 1, 3)


def counting(monkeypatch, name):
    """Count the calls of geo.<name> (the batched functions' re-checks at thresholds)."""
    calls, f = [], getattr(geo, name)
    monkeypatch.setattr(geo, name, lambda *a, **k: calls.append(1) or f(*a, **k))
    return calls


def test_fit_planes_batch_matches_fit_plane(monkeypatch):
    rng = np.random.default_rng(12)
    n_pts = 12
    sets, masks = [], []
    for kind in range(40):
        pts = rng.standard_normal((n_pts, 3)) * [0.1, 0.05, 0.002] + rng.standard_normal(3)
        m = rng.random(n_pts) < 0.7
        if kind % 8 == 1:      # fewer than 3 points
            m[:] = False
            m[:2] = True
        elif kind % 8 == 2:    # exactly collinear
            pts = np.outer(np.arange(n_pts), [1.0, 2.0, 3.0]) * 0.01 + 0.5
        elif kind % 8 == 3:    # coincident
            pts = np.ones((n_pts, 3))
        elif kind % 8 == 4:    # the collinearity threshold, either side
            pts = np.zeros((n_pts, 3))
            pts[:9] = _line_with_offset(rng, 1e-9)
            m = np.arange(n_pts) < 9
        elif kind % 8 == 5:    # NaN points outside the mask are ignored
            pts[~m] = np.nan
        sets.append(pts)
        masks.append(m)
    rechecks = counting(monkeypatch, 'fit_plane')
    normals, cents, ok = geo.fit_planes_batch(np.array(sets), np.array(masks))
    assert len(rechecks) == 5  # the sets at the collinearity threshold
    monkeypatch.undo()
    n_none = 0
    for k, (pts, m) in enumerate(zip(sets, masks)):
        ref = geo.fit_plane(pts[m])
        assert ok[k] == (ref is not None)
        if ref is None:
            n_none += 1
            assert np.isnan(normals[k]).all() and np.isnan(cents[k]).all()
            continue
        sign = np.sign(ref[0] @ normals[k])
        same(normals[k] * sign, ref[0], 1e-12)
        same(cents[k], ref[1], 1e-12)
    assert n_none >= 15
    # mask None = all points
    finite = [pts[:3] for pts in sets if np.isfinite(pts[:3]).all()]
    n2, _, ok2 = geo.fit_planes_batch(np.array(finite))
    assert ok2.sum() >= 20 and np.allclose(np.linalg.norm(n2[ok2], axis=1), 1.0)


@pytest.mark.parametrize('dtype', [np.float32, np.float64])
def test_surface_normals_batch_matches_surface_normal(dtype):
    rng = np.random.default_rng(13)
    k = np.array([[60.0, 0.5, 25], [0, 60.0, 20], [0, 0, 1]])  # with skew
    d = holey_depth(rng, dtype=dtype)
    d[30:, 0:12] = np.nan
    d[34, 0:12] = 1.0  # one row of valid, equal depths: collinear points -> None
    u, v = centres(rng, d.shape)
    u, v = np.append(u, 5.0), np.append(v, 34.0)
    z = geo.robust_depth_batch(d, u, v, 5).median
    z[3] = np.nan  # no reference depth -> no normal
    n_fit = 0
    for window, tol in ((3, 0.05), (9, 0.05), (21, 0.01)):
        normals, cents, ok = geo.surface_normals_batch(d, k, u, v, window, z, tol)
        for i in range(len(u)):
            ref = (None if np.isnan(z[i]) else
                   geo.surface_normal(d, k, u[i], v[i], window, float(z[i]), tol))
            assert ok[i] == (ref is not None)
            if ref is None:
                assert np.isnan(normals[i]).all()
                continue
            n_fit += 1
            same(normals[i], ref[0], 1e-9)  # the same orientation rule: no sign flip
            same(cents[i], ref[1], 1e-12)
            assert normals[i] @ cents[i] < 0
    assert n_fit > 100 and not ok[-1]


def test_intersect_rays_planes_batch_matches_single(monkeypatch):
    rng = np.random.default_rng(14)
    n = 200
    rays = np.column_stack([rng.uniform(-1, 1, (n, 2)), np.ones(n)])
    normals = rng.standard_normal((n, 3))
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    anchors = rng.standard_normal((n, 3)) + [0, 0, 2]
    # grazing rays at exactly 80 degrees from the normal, NaN normals (no plane)
    for i in range(10):
        a = np.radians(80 + (i - 5) * 1e-14)
        normals[i] = np.array([np.sin(a), 0, -np.cos(a)])
        rays[i] = [0, 0, 1.0]
    normals[10:15] = np.nan
    rechecks = counting(monkeypatch, 'intersect_ray_plane')
    out = geo.intersect_rays_planes_batch(rays, normals, anchors)
    assert len(rechecks) >= 10
    monkeypatch.undo()
    n_none = 0
    for i in range(n):
        ref = geo.intersect_ray_plane(rays[i], normals[i], anchors[i])
        if ref is None:
            n_none += 1
            assert np.isnan(out[i]).all()
        else:
            same(out[i], ref, 1e-12)
    assert 10 < n_none < n - 10


def random_sets(rng, sizes, dim=3):
    pts, z = [], []
    for s in sizes:
        kind = rng.integers(4)
        a = rng.standard_normal((s, dim)) * ([0.05, 0.02, 0.01][:dim] if kind else 0.03)
        pts.append(a + rng.standard_normal(dim))
        z.append(rng.standard_normal(3))
    z = np.array(z)
    return np.concatenate(pts), z / np.linalg.norm(z, axis=1, keepdims=True)


def test_principal_axes_batch_matches_principal_axis(monkeypatch):
    rng = np.random.default_rng(15)
    sizes = [0, 1, 2, 3, 4, 50, 300, 7, 0, 1000, 25] + list(rng.integers(3, 200, 30))
    pts, z = random_sets(rng, sizes)
    w = rng.random(len(pts)).astype(np.float32)
    starts = np.cumsum(sizes) - sizes
    w[starts[5]:starts[5] + sizes[5]] = 0.0  # zero weight
    # exactly at the anisotropy threshold: sigma_1 / sigma_2 = 1.3 (4 points on the axes)
    s = starts[4]
    pts[s:s + 4] = [[1.3, 0, 1], [-1.3, 0, 1], [0, 1, 1], [0, -1, 1]]
    z[4] = [0, 0, 1.0]
    w[s:s + 4] = 1.0
    # a round disc: no direction; points along z only: no in-plane spread
    pts[starts[6]:starts[6] + 7] = np.outer(np.arange(7.0), z[6]) + 1.0
    for weights in (w, None):
        rechecks = counting(monkeypatch, 'principal_axis')
        axes = geo.principal_axes_batch(pts, sizes, z, weights)
        assert len(rechecks) >= 1  # the set at the threshold
        monkeypatch.undo()
        assert axes.shape == (len(sizes), 3)
        n_none = 0
        for k, n in enumerate(sizes):
            sl = slice(starts[k], starts[k] + n)
            ref = geo.principal_axis(pts[sl], z[k], None if weights is None else weights[sl])
            if ref is None:
                n_none += 1
                assert np.isnan(axes[k]).all(), k
            else:
                same(axes[k] * np.sign(axes[k] @ ref), ref, 1e-9)
                assert abs(axes[k] @ z[k]) < 1e-12
        assert 5 <= n_none < len(sizes) - 10
    with pytest.raises(ValueError, match='counts'):
        geo.principal_axes_batch(pts, [1, 2], z[:2])


def test_principal_axes_2d_batch_matches_principal_axis():
    rng = np.random.default_rng(16)
    sizes = [0, 2, 3, 40, 4, 500] + list(rng.integers(3, 100, 20))
    xy = np.concatenate([rng.integers(0, 50, (n, 2)) * [1, rng.integers(1, 4)] for n in sizes])
    w = rng.random(len(xy))
    s = sum(sizes[:4])
    xy[s:s + 4] = [[13, 10], [-13, 10], [0, 20], [0, 0]]  # sigma ratio exactly 1.3
    axes = geo.principal_axes_2d_batch(xy, sizes, w)
    starts = np.cumsum(sizes) - sizes
    for k, n in enumerate(sizes):
        sl = slice(starts[k], starts[k] + n)
        p3 = np.column_stack([xy[sl], np.zeros(n)]).astype(float)
        ref = geo.principal_axis(p3, np.array([0, 0, 1.0]), w[sl])
        if ref is None:
            assert np.isnan(axes[k]).all()
        else:
            same(axes[k] * np.sign(axes[k] @ ref[:2]), ref[:2], 1e-9)


def test_grasp_rotations_batch_matches_grasp_rotation(monkeypatch):
    rng = np.random.default_rng(17)
    n = 300
    approach = rng.standard_normal((n, 3)) * rng.uniform(0.1, 3, (n, 1))
    c1 = rng.standard_normal((n, 3))
    c2 = rng.standard_normal((n, 3))
    c1[::3] = np.nan                              # None
    c1[1::7] = approach[1::7] * 2                 # parallel to z: skipped
    zh = approach / np.linalg.norm(approach, axis=1, keepdims=True)
    for i in range(2, n, 11):                     # keeps exactly 10 % of its length
        e = geo._orthogonal_unit(zh[i])
        c2[i] = 0.1 * e + np.sqrt(1 - 0.01) * zh[i]
    c2[4::9] = np.nan
    approach[5] = [0, 0, 1.0]                     # x along camera y: the tie rule x . e_y >= 0
    c1[5], c2[5] = [0, -1.0, 0], np.nan
    approach[6] = [1.0, 0, 0]                     # z = camera x: the fallback uses camera y
    c1[6], c2[6] = np.nan, np.nan
    rechecks = counting(monkeypatch, 'grasp_rotation')
    R = geo.grasp_rotations_batch(approach, [c1, c2])
    assert len(rechecks) >= 10  # the candidates at the 10 % rule
    monkeypatch.undo()
    for i in range(n):
        cands = [None if np.isnan(c[i]).any() else c[i] for c in (c1, c2)]
        same(R[i], geo.grasp_rotation(approach[i], cands), 1e-12)
    assert np.allclose(R[5][:, 0], [0, 1, 0]) and np.allclose(R[6][:, 0], [0, 1, 0])
    same(geo.grasp_rotations_batch(approach[:4], []),
         np.stack([geo.grasp_rotation(a, []) for a in approach[:4]]), 1e-12)


def test_extents_along_batch_matches_extent_along():
    rng = np.random.default_rng(18)
    sizes = [0, 1, 2, 3, 20, 21, 1000, 0] + list(rng.integers(1, 300, 20))
    pts, _ = random_sets(rng, sizes)
    pts[-5:] = pts[-6]  # ties
    axes = rng.standard_normal((len(sizes), 3))
    starts = np.cumsum(sizes) - sizes
    for low, high in ((5.0, 95.0), (0.0, 100.0), (12.5, 50.0)):
        ext = geo.extents_along_batch(pts, sizes, axes, low, high)
        for k, n in enumerate(sizes):
            ref = geo.extent_along(pts[starts[k]:starts[k] + n], axes[k], low, high)
            if np.isnan(ref):
                assert np.isnan(ext[k])
            else:
                assert ext[k] == pytest.approx(ref, rel=1e-12, abs=1e-15)


def test_rotations_to_quaternions_matches_single():
    rng = np.random.default_rng(19)
    R = np.stack([geo.grasp_rotation(rng.standard_normal(3), [rng.standard_normal(3)])
                  for _ in range(50)] + [np.eye(3), np.diag([1.0, -1, -1])])
    q = geo.rotations_to_quaternions(R)
    for i in range(len(R)):
        same(q[i], geo.rotation_to_quaternion(R[i]), 1e-15)
    assert geo.rotations_to_quaternions(np.zeros((0, 3, 3))).shape == (0, 4)


def test_uint16_depth_table_is_the_division():
    d = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    for scale, lo, hi in ((1000.0, 0.0, np.inf), (5000.0, 0.1, 4.0), (1000, 0.3, 2.0)):
        m = geo.depth_to_metres(d, scale, min_depth=lo, max_depth=hi)
        ref = d.astype(np.float32) / np.float32(scale)
        ref[(d == 0) | (ref < lo) | (ref > hi)] = np.nan
        assert m.dtype == np.float32 and np.array_equal(m, ref, equal_nan=True)
        m[0, 0] = 1.0  # a writable copy, not the cached table
    assert np.isnan(geo.depth_to_metres(d, 1000.0)[0, 0])
    m = geo.depth_to_metres(d, np.array(1000.0), min_depth=np.array(0.5))  # unhashable: no cache
    assert np.array_equal(m, geo.depth_to_metres(d, 1000.0, min_depth=0.5), equal_nan=True)
