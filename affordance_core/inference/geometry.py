"""Depth lifting of grasp candidates (pure numpy; ``ros2-conventions.md`` §3).

Conventions (all fixed here, tested in ``test/core/test_geometry.py``):

* **Frame**: the camera *optical* frame of the RGB image (REP-103): x right, y down, z forward,
  metres. Pixel centres are at integer (u, v); (0, 0) is the centre of the top-left pixel.
* **Back-projection** (pinhole, no distortion: feed rectified images): ``p = z * K^-1 [u, v, 1]``,
  i.e. ``X = (u - cx) Z / fx``, ``Y = (v - cy) Z / fy`` when K has no skew; z is the depth along
  the optical axis (what depth cameras publish), not the distance along the ray.
* **Depth encodings** (REP-118 / REP-117): ``uint16`` (16UC1) in ``depth_scale`` units per metre
  (1000 = millimetres), 0 = invalid; ``float32``/``float64`` (32FC1) in metres, NaN, +-Inf and
  values <= 0 invalid. Depths outside ``[min_depth, max_depth]`` are invalid too. Invalid pixels
  become NaN in the metric depth map; nothing downstream reads them.
* **Registration**: K is the intrinsic matrix of the **RGB** image. The depth image must be
  registered to the RGB camera (same viewpoint and field of view). When its resolution differs
  (e.g. half size), it is *not* resampled: K is rescaled to the depth grid with the half-pixel
  convention ``u_d = (u + 0.5) * Wd / W - 0.5`` (:func:`scale_intrinsics`), the same convention as
  the heatmap upsampling, and windows given in RGB pixels are scaled to depth pixels. Sizes whose
  aspect ratios differ by more than one pixel are refused (:class:`InputError`), never silently
  stretched.
* **Robust depth** of a candidate: the median of the valid depths in a ``window`` x ``window``
  patch (depth pixels) around it; the *spread* is ``1.4826 * MAD`` (metres), the standard
  deviation for Gaussian noise, which also grows with the slope of a tilted surface. The depth is
  valid when the fraction of valid pixels among the patch pixels inside the image is
  >= ``min_valid_fraction``.
* **Normal**: least-squares plane (SVD of the centred points) of the back-projected patch pixels
  whose depth is within ``depth_tolerance`` of the median, refitted once without the points whose
  residual exceeds ``max(3 * 1.4826 * MAD, 2 mm)``; oriented toward the camera (``n . p < 0``).
* **Position**: the viewing ray through the sub-pixel (u, v) intersected with the fitted plane
  anchored at the median depth of the patch centre pixel (exact on planar patches, where the
  median of a symmetric patch is the centre depth); when no plane can be fitted or the ray grazes
  it (angle > 80 deg), ``median * K^-1 [u, v, 1]``.
* **Pose** (:func:`grasp_rotation`): z axis = approach = ``-normal`` (into the surface); x axis =
  the gripper closing direction, the principal axis of the candidate's heat region projected on
  the plane orthogonal to z, sign chosen so that x points to the image right (``x . e_x >= 0``,
  ``x . e_y >= 0`` on a tie); y = z x x (right-handed). Quaternions are (x, y, z, w) with w >= 0
  (``transforms3d`` is w-first; :func:`rotation_to_quaternion` reorders).
* **Width**: the 5th-95th percentile spread along x (metres) of the region's 3-D points that lie
  on the candidate's surface and within ``region_radius`` of it (see ``PipelineConfig``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from transforms3d.quaternions import mat2quat

logger = logging.getLogger(__name__)

__all__ = ['InputError', 'DepthStats', 'check_intrinsics', 'scale_intrinsics', 'depth_to_metres',
           'register_depth', 'backproject', 'backproject_depth', 'robust_depth', 'fit_plane',
           'surface_normal', 'intersect_ray_plane', 'principal_axis', 'grasp_rotation',
           'rotation_to_quaternion', 'extent_along', 'project']

MAD_TO_SIGMA = 1.4826          # MAD * this = standard deviation of Gaussian noise
MIN_RESIDUAL_GATE = 0.002      # metres: plane refit keeps residuals below max(3 sigma, this)
MAX_RAY_PLANE_ANGLE = 80.0     # degrees between the viewing ray and the normal for intersection
AXIS_MIN_ANISOTROPY = 1.3      # principal axis used only when sigma_1 / sigma_2 >= this


class InputError(ValueError):
    """An input image, depth map or intrinsic matrix is malformed; the message says how to fix."""


@dataclass(frozen=True)
class DepthStats:
    """Robust depth of a patch.

    Attributes:
        median: median valid depth in metres (NaN when no pixel is valid).
        spread: ``1.4826 * MAD`` of the valid depths in metres (NaN when none is valid).
        valid_fraction: valid pixels / patch pixels inside the image.
        count: number of valid pixels.
    """

    median: float
    spread: float
    valid_fraction: float
    count: int


# --------------------------------------------------------------------------- inputs


def check_intrinsics(K: np.ndarray | list) -> np.ndarray:
    """Validate a 3 x 3 pinhole intrinsic matrix.

    Args:
        K: [[fx, s, cx], [0, fy, cy], [0, 0, 1]] (nested list or array; 9 row-major values also
            accepted).

    Returns:
        (3, 3) float64 array.

    Raises:
        InputError: not 3 x 3, non-finite, non-positive focal lengths or a last row that is not
            (0, 0, 1).
    """
    try:
        k = np.asarray(K, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f'K must be a 3x3 numeric matrix, got {type(K).__name__}') from None
    if k.shape == (9,):
        k = k.reshape(3, 3)
    if k.shape != (3, 3):
        raise InputError(f'K must be a 3x3 intrinsic matrix [[fx, 0, cx], [0, fy, cy], '
                         f'[0, 0, 1]], got shape {k.shape}')
    if not np.all(np.isfinite(k)):
        raise InputError('K contains nan or inf')
    if k[0, 0] <= 0 or k[1, 1] <= 0:
        raise InputError(f'K must have positive focal lengths, got fx={k[0, 0]:g}, '
                         f'fy={k[1, 1]:g}')
    if not np.allclose(k[2], (0.0, 0.0, 1.0)) or k[1, 0] != 0:
        raise InputError(f'K must be upper triangular with last row (0, 0, 1), got '
                         f'{k.tolist()}; pass the 3x3 K of camera_info, not P or a transposed '
                         'matrix')
    return k


def scale_intrinsics(K: np.ndarray, src_size: tuple[int, int],
                     dst_size: tuple[int, int]) -> np.ndarray:
    """Intrinsics of the same camera resampled from ``src_size`` to ``dst_size`` pixels.

    Half-pixel convention: pixel centre u in the source maps to ``(u + 0.5) * sx - 0.5``.

    Args:
        K: (3, 3) intrinsics of the source image.
        src_size: (width, height) of the source image.
        dst_size: (width, height) of the resampled image.

    Returns:
        (3, 3) float64 intrinsics of the resampled image.
    """
    k = check_intrinsics(K)
    sx = dst_size[0] / src_size[0]
    sy = dst_size[1] / src_size[1]
    S = np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5], [0.0, 0.0, 1.0]])
    return S @ k


def depth_to_metres(depth: np.ndarray, depth_scale: float = 1000.0, *, min_depth: float = 0.0,
                    max_depth: float = np.inf) -> np.ndarray:
    """Convert a depth image to metres with NaN for every invalid pixel.

    Args:
        depth: (H, W) or (H, W, 1) ``uint16`` (16UC1, ``depth_scale`` units per metre, 0 invalid)
            or ``float32``/``float64`` (32FC1, metres; non-finite or <= 0 invalid).
        depth_scale: units per metre of integer depth (1000 = millimetres, 5000 = TUM RGB-D).
        min_depth: depths below this (metres) are invalid.
        max_depth: depths above this (metres) are invalid.

    Returns:
        (H, W) float32 metres, NaN where invalid.

    Raises:
        InputError: wrong type, dtype or shape, or an empty image.
    """
    if not isinstance(depth, np.ndarray):
        raise InputError(f'depth must be a numpy array (H, W), got {type(depth).__name__}')
    d = depth[..., 0] if depth.ndim == 3 and depth.shape[2] == 1 else depth
    if d.ndim != 2:
        raise InputError(f'depth must have shape (H, W), got {tuple(depth.shape)}')
    if d.size == 0:
        raise InputError(f'depth is empty: shape {tuple(depth.shape)}')
    if d.dtype == np.uint16:
        if not depth_scale > 0:
            raise InputError(f'depth_scale must be > 0 units per metre, got {depth_scale}')
        out = d.astype(np.float32) / np.float32(depth_scale)
        out[d == 0] = np.nan
    elif d.dtype in (np.float32, np.float64):
        out = d.astype(np.float32)  # a copy
        with np.errstate(invalid='ignore'):
            out[~np.isfinite(out) | (out <= 0)] = np.nan
    else:
        raise InputError(f'depth must be uint16 (16UC1, {depth_scale:g} units per metre) or '
                         f'float32 (32FC1, metres), got dtype {d.dtype}')
    with np.errstate(invalid='ignore'):
        out[(out < min_depth) | (out > max_depth)] = np.nan
    return out


def register_depth(depth_shape: tuple[int, int], rgb_shape: tuple[int, int],
                   K: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Relate a registered depth image to the RGB image it belongs to.

    Args:
        depth_shape: (Hd, Wd) of the depth image.
        rgb_shape: (H, W) of the RGB image.
        K: (3, 3) intrinsics of the RGB image.

    Returns:
        (K_depth, sx, sy): intrinsics of the depth grid and the scale factors Wd / W, Hd / H.

    Raises:
        InputError: the aspect ratios differ (the depth is not registered to this image).
    """
    H, W = rgb_shape
    Hd, Wd = depth_shape
    if (Hd, Wd) == (H, W):
        return check_intrinsics(K), 1.0, 1.0
    sx, sy = Wd / W, Hd / H
    if abs(Wd - W * sy) > 1.0 or abs(Hd - H * sx) > 1.0:
        raise InputError(f'depth size {Wd}x{Hd} does not match the RGB size {W}x{H} or a scaled '
                         'copy of it (different aspect ratio); register the depth to the colour '
                         'camera (aligned_depth_to_color or depth_image_proc/register)')
    return scale_intrinsics(K, (W, H), (Wd, Hd)), sx, sy


# --------------------------------------------------------------------------- geometry


def backproject(u: np.ndarray | float, v: np.ndarray | float, z: np.ndarray | float,
                K: np.ndarray) -> np.ndarray:
    """Pinhole back-projection ``p = z * K^-1 [u, v, 1]``.

    Args:
        u, v: pixel coordinates (any broadcastable shape).
        z: depth along the optical axis, metres (same shape).
        K: (3, 3) intrinsics.

    Returns:
        (..., 3) float64 points in the camera optical frame.
    """
    u, v, z = np.broadcast_arrays(np.asarray(u, np.float64), np.asarray(v, np.float64),
                                  np.asarray(z, np.float64))
    kinv = np.linalg.inv(K)  # upper triangular with last row (0, 0, 1), like K
    out = np.empty(u.shape + (3,))
    out[..., 0] = (kinv[0, 0] * u + kinv[0, 1] * v + kinv[0, 2]) * z
    out[..., 1] = (kinv[1, 1] * v + kinv[1, 2]) * z
    out[..., 2] = z
    return out


def project(points: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Pinhole projection of (..., 3) points (z > 0) to (..., 2) pixel coordinates (u, v)."""
    p = np.asarray(points, dtype=np.float64) @ np.asarray(K, dtype=np.float64).T
    return p[..., :2] / p[..., 2:3]


def backproject_depth(depth_m: np.ndarray, K: np.ndarray,
                      mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Back-project the valid pixels of a metric depth image.

    Args:
        depth_m: (H, W) metres, NaN invalid.
        K: (3, 3) intrinsics of this depth grid.
        mask: optional (H, W) bool; only these pixels are used.

    Returns:
        (points (N, 3) float64, pixels (N, 2) int64 as (row, col)).
    """
    valid = np.isfinite(depth_m)
    if mask is not None:
        valid &= mask
    rows, cols = np.nonzero(valid)
    pts = backproject(cols, rows, depth_m[rows, cols], K)
    return pts, np.stack([rows, cols], axis=1)


def _patch(image: np.ndarray, u: float, v: float, window: int) -> tuple[np.ndarray, int, int]:
    """Window x window patch around the pixel nearest to (u, v), clipped to the image."""
    H, W = image.shape
    half = max(int(window), 1) // 2
    c, r = int(round(u)), int(round(v))
    r0, r1 = max(r - half, 0), min(r + half + 1, H)
    c0, c1 = max(c - half, 0), min(c + half + 1, W)
    return image[r0:r1, c0:c1], r0, c0


def robust_depth(depth_m: np.ndarray, u: float, v: float, window: int) -> DepthStats:
    """Median and spread of the valid depths around (u, v) (depth-grid pixels).

    Args:
        depth_m: (H, W) metres, NaN invalid.
        u, v: centre in depth-grid pixels (rounded to the nearest pixel).
        window: patch side in pixels (an even value uses the next odd size).

    Returns:
        :class:`DepthStats`.
    """
    patch, _, _ = _patch(depth_m, u, v, window)
    vals = patch[np.isfinite(patch)].astype(np.float64)
    frac = vals.size / patch.size if patch.size else 0.0
    if vals.size == 0:
        return DepthStats(float('nan'), float('nan'), frac, 0)
    med = float(np.median(vals))
    spread = float(MAD_TO_SIGMA * np.median(np.abs(vals - med)))
    return DepthStats(med, spread, float(frac), int(vals.size))


def fit_plane(points: np.ndarray,
              weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """Least-squares plane through 3-D points (SVD of the centred points).

    Args:
        points: (N, 3) points.
        weights: optional (N,) non-negative weights.

    Returns:
        (normal (3,) unit, centroid (3,)), or None with fewer than 3 points or collinear points.
        The normal's sign is arbitrary.
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if len(pts) < 3:
        return None
    w = np.ones(len(pts)) if weights is None else np.asarray(weights, np.float64).reshape(-1)
    if w.sum() <= 0:
        return None
    c = (pts * w[:, None]).sum(0) / w.sum()
    _, s, vt = np.linalg.svd((pts - c) * np.sqrt(w)[:, None], full_matrices=False)
    if s[1] <= 1e-9 * max(s[0], 1e-12):  # collinear (or coincident) points
        return None
    return vt[2], c


def surface_normal(depth_m: np.ndarray, K: np.ndarray, u: float, v: float, window: int,
                   z_ref: float, depth_tolerance: float) -> tuple[np.ndarray, np.ndarray] | None:
    """Surface normal and plane anchor around (u, v) from a depth patch.

    Args:
        depth_m: (H, W) metres, NaN invalid.
        K: (3, 3) intrinsics of the depth grid.
        u, v: centre in depth-grid pixels.
        window: patch side, depth pixels.
        z_ref: robust depth of the centre (metres); points deeper or closer than
            ``depth_tolerance`` are ignored (other objects).
        depth_tolerance: metres.

    Returns:
        (normal (3,) unit with ``n . centroid < 0``, centroid (3,)) or None when fewer than 3
        non-collinear points remain.
    """
    patch, r0, c0 = _patch(depth_m, u, v, window)
    rows, cols = np.nonzero(np.isfinite(patch) & (np.abs(patch - z_ref) <= depth_tolerance))
    if rows.size < 3:
        return None
    pts = backproject(cols + c0, rows + r0, patch[rows, cols], K)
    fit = fit_plane(pts)
    if fit is None:
        return None
    n, c = fit
    res = (pts - c) @ n
    mad = float(np.median(np.abs(res - np.median(res))))
    keep = np.abs(res) <= max(3.0 * MAD_TO_SIGMA * mad, MIN_RESIDUAL_GATE)
    if 3 <= keep.sum() < len(pts):
        refit = fit_plane(pts[keep])
        if refit is not None:
            n, c = refit
    if float(n @ c) > 0:
        n = -n
    return n, c


def intersect_ray_plane(ray: np.ndarray, normal: np.ndarray, anchor: np.ndarray,
                        max_angle_deg: float = MAX_RAY_PLANE_ANGLE) -> np.ndarray | None:
    """Point where the ray ``t * ray`` (t > 0) meets the plane through ``anchor`` with ``normal``.

    Returns None when the angle between the ray and the normal line exceeds ``max_angle_deg``
    (grazing view) or the intersection lies behind the camera.
    """
    ray = np.asarray(ray, np.float64)
    denom = float(ray @ normal)
    cos_max = np.cos(np.deg2rad(max_angle_deg))
    if abs(denom) < cos_max * np.linalg.norm(ray):
        return None
    t = float(anchor @ normal) / denom
    return t * ray if t > 0 else None


def principal_axis(points: np.ndarray, z_axis: np.ndarray, weights: np.ndarray | None = None,
                   min_anisotropy: float = AXIS_MIN_ANISOTROPY) -> np.ndarray | None:
    """Principal direction of points projected on the plane orthogonal to ``z_axis``.

    Args:
        points: (N, 3) points.
        z_axis: (3,) unit vector.
        weights: optional (N,) non-negative weights (e.g. heat).
        min_anisotropy: minimum ratio of the standard deviations along the first and second
            in-plane axes; rounder point sets return None (no meaningful direction).

    Returns:
        (3,) unit vector orthogonal to ``z_axis`` (sign arbitrary), or None.
    """
    pts = np.asarray(points, np.float64).reshape(-1, 3)
    if len(pts) < 3:
        return None
    w = np.ones(len(pts)) if weights is None else np.asarray(weights, np.float64).reshape(-1)
    if w.sum() <= 0:
        return None
    e1 = _orthogonal_unit(z_axis)
    e2 = np.cross(z_axis, e1)
    q = np.stack([pts @ e1, pts @ e2], axis=1)
    mean = (q * w[:, None]).sum(0) / w.sum()
    d = q - mean
    cov = (d * w[:, None]).T @ d / w.sum()
    evals, evecs = np.linalg.eigh(cov)  # ascending
    if evals[1] <= 0 or evals[1] < min_anisotropy ** 2 * max(evals[0], 0.0):
        return None
    a = evecs[:, 1]
    axis = a[0] * e1 + a[1] * e2
    return axis / np.linalg.norm(axis)


def _orthogonal_unit(z: np.ndarray) -> np.ndarray:
    """A unit vector orthogonal to ``z`` (camera x projected, or camera y)."""
    for ref in (np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])):
        x = ref - (ref @ z) * z
        if np.linalg.norm(x) > 0.1:
            return x / np.linalg.norm(x)
    raise AssertionError('unreachable: z cannot be parallel to both camera x and y')


def grasp_rotation(approach: np.ndarray, axis_candidates: list[np.ndarray | None]) -> np.ndarray:
    """Rotation matrix of a grasp: z = approach, x = the first usable axis candidate.

    Args:
        approach: (3,) approach direction (into the surface), normalised here.
        axis_candidates: preferred closing directions, tried in order (None entries skipped);
            each is projected on the plane orthogonal to z and used when it keeps > 10 % of its
            length. The camera x axis (then y) is the final fallback.

    Returns:
        (3, 3) rotation matrix whose columns are the x, y, z axes in the camera optical frame;
        x . e_x >= 0 (x . e_y >= 0 when x . e_x == 0), y = z x x.
    """
    z = np.asarray(approach, np.float64)
    z = z / np.linalg.norm(z)
    x = None
    for cand in axis_candidates:
        if cand is None:
            continue
        c = np.asarray(cand, np.float64)
        p = c - (c @ z) * z
        if np.linalg.norm(p) > 0.1 * np.linalg.norm(c):
            x = p / np.linalg.norm(p)
            break
    if x is None:
        x = _orthogonal_unit(z)
    if x[0] < -1e-12 or (abs(x[0]) <= 1e-12 and x[1] < 0):
        x = -x
    y = np.cross(z, x)
    return np.stack([x, y, z], axis=1)


def rotation_to_quaternion(R: np.ndarray) -> np.ndarray:
    """(x, y, z, w) unit quaternion of a rotation matrix, with w >= 0.

    ``transforms3d.quaternions.mat2quat`` returns (w, x, y, z); the order is changed here to the
    ROS / ``geometry_msgs`` order.
    """
    w, x, y, z = mat2quat(np.asarray(R, np.float64))
    q = np.array([x, y, z, w])
    q /= np.linalg.norm(q)
    return -q if q[3] < 0 else q


def extent_along(points: np.ndarray, axis: np.ndarray, low: float = 5.0,
                 high: float = 95.0) -> float:
    """Spread of the points along ``axis`` between two percentiles (metres); NaN when empty."""
    pts = np.asarray(points, np.float64).reshape(-1, 3)
    if len(pts) == 0:
        return float('nan')
    t = pts @ np.asarray(axis, np.float64)
    return float(np.percentile(t, high) - np.percentile(t, low))
