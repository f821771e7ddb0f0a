"""Depth lifting of grasp candidates (pure numpy; ``ros2-conventions.md`` §3).

Conventions (all fixed here, tested in ``test/core/test_geometry.py``):

* **Frame**: the camera *optical* frame of the RGB image (REP-103): x right, y down, z forward,
  metres. Pixel centres are at integer (u, v); (0, 0) is the centre of the top-left pixel.
* **Back-projection** (pinhole, no distortion; raw images with lens distortion go through
  :mod:`~affordance_core.inference.distortion` first): ``p = z * K^-1 [u, v, 1]``,
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

Batched variants (``*_batch``, used by the pipeline's lift stage) compute the same quantities for
K candidates at once and agree with the single-candidate functions to rounding (a few ulp; the
sums run in another order). Where a yes/no decision (collinear points, anisotropy, grazing ray,
usable axis) lies within rounding of its threshold, the batched function decides that candidate
with the single-candidate function, so the decisions are always the same.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
from transforms3d.quaternions import mat2quat

logger = logging.getLogger(__name__)

__all__ = ['InputError', 'DepthStats', 'check_intrinsics', 'scale_intrinsics', 'depth_to_metres',
           'register_depth', 'backproject', 'backproject_depth', 'robust_depth', 'fit_plane',
           'surface_normal', 'intersect_ray_plane', 'principal_axis', 'grasp_rotation',
           'rotation_to_quaternion', 'extent_along', 'project', 'DepthStatsBatch',
           'window_patches', 'robust_depth_batch', 'fit_planes_batch', 'surface_normals_batch',
           'intersect_rays_planes_batch', 'principal_axes_batch', 'grasp_rotations_batch',
           'principal_axes_2d_batch', 'rotations_to_quaternions',
           'extents_along_batch']

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
        # a table of the 65536 metric values, as d.astype(float32) / float32(scale) gives them
        try:
            table = _uint16_depth_table(depth_scale, min_depth, max_depth)
        except TypeError:  # unhashable settings (0-d arrays): no cache
            table = _uint16_depth_table.__wrapped__(depth_scale, min_depth, max_depth)
        return np.take(table, d)
    if d.dtype not in (np.float32, np.float64):
        raise InputError(f'depth must be uint16 (16UC1, {depth_scale:g} units per metre) or '
                         f'float32 (32FC1, metres), got dtype {d.dtype}')
    out = d.astype(np.float32)  # a copy
    with np.errstate(invalid='ignore'):
        invalid = ~np.isfinite(out) | (out <= 0) | (out < min_depth) | (out > max_depth)
    # copyto(where=) is faster than out[invalid] = nan
    np.copyto(out, np.float32(np.nan), where=invalid)
    return out


@functools.lru_cache(maxsize=8, typed=True)  # typed: a float64 bound compares differently
def _uint16_depth_table(depth_scale: float, min_depth: float, max_depth: float) -> np.ndarray:
    """Metres of every 16UC1 value (read-only (65536,) float32, NaN where invalid)."""
    table = np.arange(65536, dtype=np.float32) / np.float32(depth_scale)
    table[0] = np.nan
    with np.errstate(invalid='ignore'):
        table[(table < min_depth) | (table > max_depth)] = np.nan
    table.flags.writeable = False
    return table


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
    # K^-1 of an upper-triangular K with last row (0, 0, 1), in closed form
    fx, s, cx, fy, cy = K[0, 0], K[0, 1], K[0, 2], K[1, 1], K[1, 2]
    y = (v - cy) / fy
    out = np.empty(u.shape + (3,))
    out[..., 0] = ((u - cx) - s * y) / fx * z
    out[..., 1] = y * z
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
    q = pts @ np.stack([e1, e2], axis=1)  # (N, 2) in-plane coordinates
    sw = w.sum()
    d = q - (w @ q) / sw
    cov = (d.T * w) @ d / sw
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
    lo, hi = np.percentile(pts @ np.asarray(axis, np.float64), (low, high))
    return float(hi - lo)


# --------------------------------------------------------------------------- batched
#
# K candidates at once (the pipeline's lift stage). Point sets are concatenated: set k is the
# ``counts[k]`` rows that follow the rows of sets 0..k-1. Each function matches its
# single-candidate namesake to rounding; a yes/no decision that lies within rounding of its
# threshold is taken by the single-candidate function, so the decisions never differ.


@dataclass(frozen=True)
class DepthStatsBatch:
    """:class:`DepthStats` of K patches: every field is a (K,) array; ``stats[i]`` is the
    :class:`DepthStats` of patch i.

    Attributes:
        median: (K,) float64 metres, NaN where no pixel is valid.
        spread: (K,) float64 ``1.4826 * MAD`` metres, NaN where no pixel is valid.
        valid_fraction: (K,) float64 valid pixels / patch pixels inside the image.
        count: (K,) int64 valid pixels.
    """

    median: np.ndarray
    spread: np.ndarray
    valid_fraction: np.ndarray
    count: np.ndarray

    def __len__(self) -> int:
        return len(self.median)

    def __getitem__(self, i: int) -> DepthStats:
        return DepthStats(float(self.median[i]), float(self.spread[i]),
                          float(self.valid_fraction[i]), int(self.count[i]))


def window_patches(image: np.ndarray, u: np.ndarray, v: np.ndarray, window: int,
                   fill: float = np.nan) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The patches of :func:`robust_depth` / :func:`surface_normal` around K pixels, unclipped.

    Patch k is the ``s x s`` window (``s = 2 * (window // 2) + 1``) centred on the pixel nearest
    to (u[k], v[k]) (ties to even, like ``round``); pixels outside the image hold ``fill``.

    Args:
        image: (H, W) array (a float dtype when ``fill`` is NaN).
        u, v: (K,) centres in pixels.
        window: patch side in pixels (an even value uses the next odd size).
        fill: value of the pixels outside the image.

    Returns:
        (patches (K, s, s) of ``image.dtype``, inside (K, s, s) bool, rows (K, s) int64,
        cols (K, s) int64): the image rows / columns of each patch (outside ones included).
    """
    H, W = image.shape
    half = max(int(window), 1) // 2
    off = np.arange(-half, half + 1)
    rows = np.rint(np.asarray(v, np.float64)).astype(np.int64).reshape(-1, 1) + off
    cols = np.rint(np.asarray(u, np.float64)).astype(np.int64).reshape(-1, 1) + off
    in_r = (rows >= 0) & (rows < H)
    in_c = (cols >= 0) & (cols < W)
    # (np.clip costs 10x np.minimum(np.maximum()) on arrays this small)
    flat = (np.minimum(np.maximum(rows, 0), H - 1)[:, :, None] * W
            + np.minimum(np.maximum(cols, 0), W - 1)[:, None, :])
    patches = np.take(image if image.flags.c_contiguous else np.ascontiguousarray(image), flat)
    inside = in_r[:, :, None] & in_c[:, None, :]
    if not inside.all():
        patches[~inside] = fill
    return patches, inside, rows, cols


def _sorted_medians(rows: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Medians of the first ``n[k]`` values of each ascending-sorted row of ``rows`` (K, N),
    computed as ``np.median`` does (the mean of the two middle values); NaN where n == 0."""
    k = np.arange(len(rows))
    return (rows[k, (n - 1) // 2] + rows[k, n // 2]) / 2  # n = 0: NaN rows give NaN


def robust_depth_batch(depth_m: np.ndarray, u: np.ndarray, v: np.ndarray,
                       window: int) -> DepthStatsBatch:
    """:func:`robust_depth` of K patches (the same values, bit for bit).

    Args:
        depth_m: (H, W) metres, NaN invalid.
        u, v: (K,) centres in depth-grid pixels.
        window: patch side in pixels.

    Returns:
        :class:`DepthStatsBatch` of (K,) arrays.
    """
    patches, inside, _, _ = window_patches(depth_m, u, v, window)
    n_patch = len(patches)
    vals = patches.reshape(n_patch, -1).astype(np.float64)
    finite = np.isfinite(vals)
    count = finite.sum(1)
    vals[~finite] = np.nan  # +-inf too: sorts last, like the NaN holes
    srt = np.sort(vals, axis=1)
    med = _sorted_medians(srt, count)
    mad = _sorted_medians(np.sort(np.abs(srt - med[:, None]), axis=1), count)
    n_in = inside.reshape(n_patch, -1).sum(1)
    frac = count / np.maximum(n_in, 1)
    return DepthStatsBatch(med, MAD_TO_SIGMA * mad, frac, count)


def fit_planes_batch(points: np.ndarray,
                     mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`fit_plane` (unweighted) of K point sets of up to N points.

    Args:
        points: (K, N, 3) points; those outside ``mask`` are ignored.
        mask: (K, N) bool, the points of each set; None = all.

    Returns:
        (normals (K, 3) unit, sign arbitrary; centroids (K, 3); ok (K,) bool). Rows for which
        :func:`fit_plane` returns None (fewer than 3 points, collinear points) have ok False
        and NaN normal and centroid.
    """
    pts = np.asarray(points, np.float64)
    m = (np.ones(pts.shape[:2], bool) if mask is None else
         np.asarray(mask, bool).reshape(pts.shape[:2]))
    P = np.ascontiguousarray(pts.transpose(0, 2, 1))
    if not np.isfinite(P).all():
        P = np.where(m[:, None, :], P, 0.0)
    normals, cents, ok, _ = _fit_planes(P, m)
    return normals, cents, ok


def _fit_planes(P: np.ndarray,
                m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`fit_planes_batch` of finite points laid out as (K, 3, N) (rows x, y, z: 5x
    faster arithmetic than (K, N, 3)); also returns the centred, masked points (K, 3, N)."""
    n_set = len(P)
    normals, cents = np.full((n_set, 3), np.nan), np.full((n_set, 3), np.nan)
    ok = np.zeros(n_set, bool)
    mf = m.astype(np.float64)
    cnt = mf.sum(1)
    with np.errstate(invalid='ignore', divide='ignore'):
        c = (P @ mf[:, :, None])[..., 0] / cnt[:, None]
    A = (P - c[:, :, None]) * mf[:, None, :]  # zero columns for the points off the mask
    idx = np.flatnonzero(cnt >= 3)
    if idx.size == 0:
        return normals, cents, ok, A
    # the zero rows change neither the singular values nor the vectors; the SVD of the 3 x 3 R
    # of a QR is how LAPACK treats a tall matrix, without forming U
    r = np.linalg.qr((A if idx.size == n_set else A[idx]).transpose(0, 2, 1), mode='r')
    _, s, vt = np.linalg.svd(r)
    s0 = np.maximum(s[:, 0], 1e-12)
    good = s[:, 1] > 1e-9 * s0
    normals[idx[good]], cents[idx[good]], ok[idx[good]] = vt[good, 2], c[idx[good]], True
    for j in np.flatnonzero(np.abs(s[:, 1] - 1e-9 * s0) <= 1e-12 * s0):  # at the threshold
        k = idx[j]
        fit = fit_plane(P[k][:, m[k]].T)
        ok[k] = fit is not None
        normals[k], cents[k] = fit if fit is not None else (np.nan, np.nan)
    return normals, cents, ok, A


def surface_normals_batch(depth_m: np.ndarray, K: np.ndarray, u: np.ndarray, v: np.ndarray,
                          window: int, z_ref: np.ndarray,
                          depth_tolerance: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`surface_normal` of K patches.

    Args:
        depth_m: (H, W) metres, NaN invalid.
        K: (3, 3) intrinsics of the depth grid.
        u, v: (K,) centres in depth-grid pixels.
        window: patch side, depth pixels.
        z_ref: (K,) robust depth of each centre, metres (NaN: no normal). The depth test
            ``|depth - z_ref| <= depth_tolerance`` runs in ``depth_m``'s dtype, as it does in
            :func:`surface_normal` with a Python float ``z_ref``.
        depth_tolerance: metres.

    Returns:
        (normals (K, 3) unit with ``n . centroid < 0``, centroids (K, 3), ok (K,) bool): ok is
        False and the rows NaN where :func:`surface_normal` returns None.
    """
    patches, _, rows, cols = window_patches(depth_m, u, v, window)
    n_set = len(patches)
    dt = patches.dtype
    z = np.asarray(z_ref, np.float64).reshape(-1).astype(dt)[:, None, None]
    with np.errstate(invalid='ignore'):
        m = np.isfinite(patches) & (np.abs(patches - z) <= dt.type(depth_tolerance))
    # back-projection (as backproject computes it) in a (K, 3, N) layout, (0, 0, 0) off the mask
    P = np.empty((n_set, 3) + patches.shape[1:])
    P[:, 2] = np.where(m, patches, 0)
    fx, s, cx, fy, cy = K[0, 0], K[0, 1], K[0, 2], K[1, 1], K[1, 2]
    y = ((rows - cy) / fy)[:, :, None]
    P[:, 0] = ((cols[:, None, :] - cx) - s * y) / fx * P[:, 2]
    P[:, 1] = y * P[:, 2]
    P = P.reshape(n_set, 3, -1)
    m = m.reshape(n_set, -1)
    normals, cents, ok, A = _fit_planes(P, m)
    idx = np.flatnonzero(ok)
    if idx.size:
        # one refit without the points whose residual exceeds max(3 sigma, 2 mm)
        mi = m[idx]
        res = (normals[idx, None, :] @ A[idx])[:, 0]  # (pts - centroid) . normal
        res[~mi] = np.nan
        cnt = mi.sum(1)
        srt = np.sort(res, axis=1)
        med = _sorted_medians(srt, cnt)
        mad = _sorted_medians(np.sort(np.abs(srt - med[:, None]), axis=1), cnt)
        gate = np.maximum(3.0 * MAD_TO_SIGMA * mad, MIN_RESIDUAL_GATE)
        with np.errstate(invalid='ignore'):
            keep = np.abs(res) <= gate[:, None]  # False off the mask (NaN)
        n_keep = keep.sum(1)
        redo = (n_keep >= 3) & (n_keep < cnt)
        if redo.any():
            n2, c2, ok2, _ = _fit_planes(P[idx[redo]], keep[redo])
            target = idx[redo][ok2]
            normals[target], cents[target] = n2[ok2], c2[ok2]
    flip = _dot(normals, cents) > 0
    normals[flip] = -normals[flip]
    return normals, cents, ok


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise dot products of small (..., 3) arrays, summed in the order of a 1-D ``a @ b``
    (a sum over 3 values is sequential)."""
    return (a * b).sum(-1)


_C1, _C2 = np.array([1, 2, 0]), np.array([2, 0, 1])


def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise ``np.cross`` of (K, 3) arrays (the same products and differences)."""
    return a[:, _C1] * b[:, _C2] - a[:, _C2] * b[:, _C1]


def intersect_rays_planes_batch(rays: np.ndarray, normals: np.ndarray, anchors: np.ndarray,
                                max_angle_deg: float = MAX_RAY_PLANE_ANGLE) -> np.ndarray:
    """:func:`intersect_ray_plane` of K rays and planes.

    Args:
        rays: (K, 3) ray directions.
        normals: (K, 3) unit plane normals (NaN rows: no plane).
        anchors: (K, 3) points on the planes.
        max_angle_deg: the grazing limit of :func:`intersect_ray_plane`.

    Returns:
        (K, 3) intersections; NaN rows where :func:`intersect_ray_plane` returns None.
    """
    ray = np.asarray(rays, np.float64).reshape(-1, 3)
    nrm = np.asarray(normals, np.float64).reshape(-1, 3)
    anc = np.asarray(anchors, np.float64).reshape(-1, 3)
    denom, num = _dot(ray, nrm), _dot(anc, nrm)
    ray_len = np.sqrt(_dot(ray, ray))
    lim = np.cos(np.deg2rad(max_angle_deg)) * ray_len
    with np.errstate(invalid='ignore', divide='ignore'):
        t = num / denom
        ok = (np.abs(denom) >= lim) & (t > 0)
        recheck = ((np.abs(np.abs(denom) - lim) <= 1e-9 * ray_len)
                   | (np.abs(num) <= 1e-9 * np.sqrt(_dot(anc, anc))))
    out = np.where(ok[:, None], t[:, None] * ray, np.nan)
    for k in np.flatnonzero(recheck):
        p = intersect_ray_plane(ray[k], nrm[k], anc[k], max_angle_deg)
        out[k] = np.nan if p is None else p
    return out


def _orthogonal_units(z: np.ndarray) -> np.ndarray:
    """:func:`_orthogonal_unit` of each row of ``z`` (K, 3)."""
    x = np.array([1.0, 0.0, 0.0]) - z[:, :1] * z
    n = np.sqrt(_dot(x, x))
    use_y = ~(n > 0.1)
    if use_y.any():
        y = np.array([0.0, 1.0, 0.0]) - z[use_y, 1:2] * z[use_y]
        x[use_y], n[use_y] = y, np.sqrt(_dot(y, y))
    return x / n[:, None]


def _segment_sums(values: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Sums along the last axis of ``values`` (..., M) over consecutive runs (run k:
    ``counts[k]`` values from ``starts[k]``); 0 for empty runs. Returns (..., S)."""
    if counts.all():
        return np.add.reduceat(values, starts, axis=-1)
    out = np.zeros(values.shape[:-1] + (len(counts),))
    full = counts > 0
    if full.any():
        out[..., full] = np.add.reduceat(values, starts[full], axis=-1)
    return out


def _segments(counts: np.ndarray, n_points: int) -> tuple[np.ndarray, np.ndarray]:
    """(counts as int64, start row of each set), checked against the number of points."""
    counts = np.asarray(counts, np.int64).reshape(-1)
    if int(counts.sum()) != n_points or (counts.size and counts.min() < 0):
        raise ValueError(f'counts must be >= 0 and sum to the number of points ({n_points}), '
                         f'got {counts.tolist()}')
    return counts, np.cumsum(counts) - counts


def _plane_axes(q: np.ndarray, w: np.ndarray, cnt: np.ndarray, starts: np.ndarray,
                min_anisotropy: float) -> tuple[np.ndarray, np.ndarray]:
    """The core of :func:`principal_axis` for S sets of in-plane coordinates ``q`` (2, M)
    with weights ``w`` (M,): (principal eigenvectors (S, 2), NaN rows where principal_axis
    returns None; recheck (S,) bool, the sets whose anisotropy decision lies within rounding of
    its threshold)."""
    n_seg = len(cnt)
    out, recheck = np.full((n_seg, 2), np.nan), np.zeros(n_seg, bool)
    sw = _segment_sums(w, starts, cnt)
    idx = np.flatnonzero((cnt >= 3) & (sw > 0))
    if idx.size == 0:
        return out, recheck
    with np.errstate(invalid='ignore', divide='ignore'):
        mean = _segment_sums(w * q, starts, cnt) / sw
        d = q - np.repeat(mean, cnt, axis=1)
        wd = d * w
        c00, c10, c11 = _segment_sums(np.stack([wd[0] * d[0], wd[1] * d[0], wd[1] * d[1]]),
                                      starts, cnt) / sw
    cov = np.stack([c00, c10, c10, c11], axis=1).reshape(-1, 2, 2)[idx]
    evals, evecs = np.linalg.eigh(cov)  # ascending
    lim = min_anisotropy ** 2 * np.maximum(evals[:, 0], 0.0)
    good = (evals[:, 1] > 0) & ~(evals[:, 1] < lim)
    out[idx[good]] = evecs[good, :, 1]
    # at the anisotropy threshold, or a spread lost in the rounding of the coordinates
    scale = (mean[:, idx] ** 2).sum(0) + c00[idx] + c11[idx]
    recheck[idx] = ((np.abs(evals[:, 1] - lim) <= 1e-8 * np.abs(evals[:, 1]))
                    | (evals[:, 1] <= 1e-12 * scale))
    return out, recheck


def principal_axes_batch(points: np.ndarray, counts: np.ndarray, z_axes: np.ndarray,
                         weights: np.ndarray | None = None,
                         min_anisotropy: float = AXIS_MIN_ANISOTROPY) -> np.ndarray:
    """:func:`principal_axis` of S point sets given as one concatenated cloud.

    Args:
        points: (M, 3) points of all sets, set after set.
        counts: (S,) number of points of each set (sum M).
        z_axes: (S, 3) unit vector of each set.
        weights: optional (M,) non-negative weights.
        min_anisotropy: as in :func:`principal_axis`.

    Returns:
        (S, 3) unit axes orthogonal to their z axis (sign arbitrary); NaN rows where
        :func:`principal_axis` returns None (fewer than 3 points, zero weight, round sets).
    """
    pts = np.asarray(points, np.float64).reshape(-1, 3)
    cnt, starts = _segments(counts, len(pts))
    z = np.asarray(z_axes, np.float64).reshape(-1, 3)
    w = np.ones(len(pts)) if weights is None else np.asarray(weights, np.float64).reshape(-1)
    e1 = _orthogonal_units(z)
    e2 = _cross(z, e1)
    g = np.repeat(np.stack([e1.T, e2.T]), cnt, axis=2)  # (2, 3, M): e1, e2 of each point
    p = np.ascontiguousarray(pts.T)  # (contiguous rows: 5x faster products)
    a, recheck = _plane_axes(p[0] * g[:, 0] + p[1] * g[:, 1] + p[2] * g[:, 2], w, cnt, starts,
                             min_anisotropy)
    axes = a[:, :1] * e1 + a[:, 1:] * e2
    axes /= np.sqrt(_dot(axes, axes))[:, None]
    for k in np.flatnonzero(recheck):
        sl = slice(starts[k], starts[k] + cnt[k])
        axis = principal_axis(pts[sl], z[k], w[sl], min_anisotropy)
        axes[k] = np.nan if axis is None else axis
    return axes


def principal_axes_2d_batch(xy: np.ndarray, counts: np.ndarray,
                            weights: np.ndarray | None = None,
                            min_anisotropy: float = AXIS_MIN_ANISOTROPY) -> np.ndarray:
    """:func:`principal_axis` of S sets of 2-D points (e.g. pixel layouts): the first two
    components of ``principal_axis([x, y, 0], z_axis=(0, 0, 1))``.

    Args:
        xy: (M, 2) coordinates of all sets, set after set.
        counts: (S,) number of points of each set (sum M).
        weights: optional (M,) non-negative weights.
        min_anisotropy: as in :func:`principal_axis`.

    Returns:
        (S, 2) unit axes (sign arbitrary); NaN rows where :func:`principal_axis` returns None.
    """
    q = np.asarray(xy, np.float64).reshape(-1, 2)
    cnt, starts = _segments(counts, len(q))
    w = np.ones(len(q)) if weights is None else np.asarray(weights, np.float64).reshape(-1)
    axes, recheck = _plane_axes(np.ascontiguousarray(q.T), w, cnt, starts, min_anisotropy)
    axes /= np.sqrt(axes[:, 0] * axes[:, 0] + axes[:, 1] * axes[:, 1])[:, None]
    for k in np.flatnonzero(recheck):
        sl = slice(starts[k], starts[k] + cnt[k])
        axis = principal_axis(np.column_stack([q[sl], np.zeros(cnt[k])]), np.array([0, 0, 1.0]),
                              w[sl], min_anisotropy)
        axes[k] = np.nan if axis is None else axis[:2]
    return axes


def grasp_rotations_batch(approach: np.ndarray, axis_candidates: list[np.ndarray]) -> np.ndarray:
    """:func:`grasp_rotation` of K grasps.

    Args:
        approach: (K, 3) approach directions (normalised here).
        axis_candidates: preferred closing directions, each (K, 3); a NaN row stands for None.

    Returns:
        (K, 3, 3) rotation matrices (columns x, y, z), as :func:`grasp_rotation` builds them.
    """
    a = np.asarray(approach, np.float64).reshape(-1, 3)
    z = a / np.sqrt(_dot(a, a))[:, None]
    c = np.asarray(axis_candidates, np.float64).reshape(-1, len(z), 3)  # (C, K, 3)
    if len(c) == 0:
        c = np.full((1, len(z), 3), np.nan)
    p = c - _dot(c, z)[..., None] * z
    with np.errstate(invalid='ignore'):
        p_len, c_len = np.sqrt(_dot(p, p)), np.sqrt(_dot(c, c))
        usable = p_len > 0.1 * c_len  # False for NaN (None) candidates
        near = np.abs(p_len - 0.1 * c_len) <= 1e-9 * c_len
    first = np.argmax(usable, axis=0)  # the first usable candidate of each grasp
    k = np.arange(len(z))
    with np.errstate(invalid='ignore', divide='ignore'):
        x = p[first, k] / p_len[first, k][:, None]
    none = ~usable.any(0)
    if none.any():
        x[none] = _orthogonal_units(z[none])
    flip = (x[:, 0] < -1e-12) | ((np.abs(x[:, 0]) <= 1e-12) & (x[:, 1] < 0))
    x[flip] = -x[flip]
    R = np.stack([x, _cross(z, x), z], axis=2)
    # decisions within rounding of a threshold (a candidate's 10 % rule, the sign of x): as
    # grasp_rotation takes them
    recheck = near.any(0) | (np.abs(np.abs(x[:, 0]) - 1e-12) <= 1e-14)
    for j in np.flatnonzero(recheck):
        R[j] = grasp_rotation(a[j], [cj[j] if np.isfinite(cj[j]).all() else None for cj in c])
    return R


def rotations_to_quaternions(R: np.ndarray) -> np.ndarray:
    """:func:`rotation_to_quaternion` of K rotation matrices ((K, 3, 3) -> (K, 4) x, y, z, w
    with w >= 0); ``transforms3d``'s ``mat2quat`` converts each matrix."""
    R = np.asarray(R, np.float64).reshape(-1, 3, 3)
    q = np.array([mat2quat(r) for r in R]).reshape(-1, 4)[:, [1, 2, 3, 0]]
    q /= np.sqrt(((q[:, 0] * q[:, 0] + q[:, 1] * q[:, 1]) + q[:, 2] * q[:, 2])
                 + q[:, 3] * q[:, 3])[:, None]
    q[q[:, 3] < 0] *= -1
    return q


def extents_along_batch(points: np.ndarray, counts: np.ndarray, axes: np.ndarray,
                        low: float = 5.0, high: float = 95.0) -> np.ndarray:
    """:func:`extent_along` of S point sets given as one concatenated cloud.

    The percentiles are those of ``np.percentile``'s default ('linear') method.

    Args:
        points: (M, 3) points of all sets, set after set.
        counts: (S,) number of points of each set (sum M).
        axes: (S, 3) direction of each set.
        low, high: percentiles.

    Returns:
        (S,) spreads in metres; NaN for empty sets.
    """
    pts = np.asarray(points, np.float64).reshape(-1, 3)
    cnt, starts = _segments(counts, len(pts))
    out = np.full(len(cnt), np.nan)
    has = cnt > 0
    if not has.any():
        return out
    g = np.repeat(np.asarray(axes, np.float64).reshape(-1, 3).T, cnt, axis=1)
    p = np.ascontiguousarray(pts.T)
    t = p[0] * g[0] + p[1] * g[1] + p[2] * g[2]
    for k in np.flatnonzero(cnt > 1):  # sorted within each set
        t[starts[k]:starts[k] + cnt[k]].sort()
    n, s0 = cnt[has][:, None], starts[has][:, None]
    virtual = (n - 1) * np.true_divide(np.array([low, high], np.float64), 100)  # (S, 2)
    prev = np.floor(virtual)
    gamma = virtual - prev
    prev_i = np.minimum(prev.astype(np.int64), n - 1)
    next_i = np.where(virtual >= n - 1, n - 1, prev_i + 1)
    lo, hi = t[s0 + prev_i], t[s0 + next_i]
    diff = hi - lo  # np.percentile's _lerp, both branches
    q = np.where(gamma >= 0.5, hi - diff * (1 - gamma), lo + diff * gamma)
    out[has] = q[:, 1] - q[:, 0]
    return out
