"""Lens distortion of raw camera images (OpenCV models, as named by sensor_msgs/CameraInfo).

The pipeline works in the pixels of the image it is given. When that image is *raw* (not
rectified) and its camera has a non-zero distortion vector, straight pinhole back-projection is
wrong away from the image centre (a few centimetres at 1 m in the corners of a typical webcam).
The depth lifting then runs in a *rectified* copy of the depth grid that keeps the same K
(:func:`rectify_maps`, nearest-neighbour so that no depth is invented across edges), and every
grasp pixel is moved to where it lies in that copy (:func:`undistort_pixels`). Heatmaps, grasp
pixels and overlays stay in the raw image's pixels, aligned with what the camera published.

Models (``distortion_model`` of CameraInfo, REP-104):

* ``plumb_bob`` and ``rational_polynomial``: OpenCV's standard model, coefficients
  ``k1, k2, p1, p2[, k3[, k4, k5, k6[, s1, s2, s3, s4[, tau_x, tau_y]]]]`` (4, 5, 8, 12 or 14);
* ``equidistant``: OpenCV's fisheye model, ``k1, k2, k3, k4``.

An all-zero (or empty) vector means no distortion: :func:`check_distortion` returns None and the
pipeline does exactly what it does without one.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from affordance_core.inference.geometry import InputError

__all__ = ['DISTORTION_MODELS', 'Distortion', 'check_distortion', 'undistort_pixels',
           'rectify_maps', 'project_distorted']

DISTORTION_MODELS: tuple[str, ...] = ('plumb_bob', 'rational_polynomial', 'equidistant')
_COUNTS = {'plumb_bob': (4, 5, 8, 12, 14), 'rational_polynomial': (4, 5, 8, 12, 14),
           'equidistant': (4,)}
_CRITERIA = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 50, 1e-12)


@dataclass(frozen=True)
class Distortion:
    """A validated, non-zero distortion vector and its model."""

    model: str
    coeffs: np.ndarray   # (n,) float64

    @property
    def fisheye(self) -> bool:
        return self.model == 'equidistant'

    def key(self) -> bytes:
        """Bytes identifying the model and coefficients (cache keys)."""
        return self.model.encode() + b':' + self.coeffs.tobytes()


def check_distortion(D: object, model: str = 'plumb_bob') -> Distortion | None:
    """Validate a distortion vector.

    Args:
        D: the coefficients (CameraInfo ``d``), or None.
        model: ``plumb_bob``, ``rational_polynomial`` or ``equidistant``.

    Returns:
        the :class:`Distortion`, or None when D is None, empty or all zeros (any model name is
        accepted then: nothing to undo).

    Raises:
        InputError: non-numeric or non-finite values, an unknown model, or a coefficient count
            the model does not have.
    """
    if D is None:
        return None
    try:
        d = np.asarray(D, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise InputError(f'distortion coefficients must be numbers, got {type(D).__name__}') \
            from None
    if d.size == 0 or not np.any(d):
        return None
    if not np.all(np.isfinite(d)):
        raise InputError(f'distortion coefficients contain nan or inf: {d.tolist()}')
    name = str(model).strip().lower()
    if name not in _COUNTS:
        raise InputError(f"distortion model '{model}' is not supported (one of "
                         f"{', '.join(DISTORTION_MODELS)}); rectify the images upstream "
                         '(image_proc) and feed image_rect')
    if d.size not in _COUNTS[name]:
        raise InputError(f'{name} takes {" / ".join(map(str, _COUNTS[name]))} distortion '
                         f'coefficients, got {d.size}')
    return Distortion(name, d)


def undistort_pixels(u: np.ndarray, v: np.ndarray, K: np.ndarray,
                     dist: Distortion) -> tuple[np.ndarray, np.ndarray]:
    """Raw pixel positions -> their positions in the rectified image with the same K.

    Args:
        u, v: (n,) raw pixel coordinates (sub-pixel; pixel centres at integers).
        K: (3, 3) intrinsics of the raw image.
        dist: its distortion.

    Returns:
        (u', v') float64 arrays: where the same viewing rays meet the rectified image
        (``K^-1 [u', v', 1]`` is the ray's direction).
    """
    pts = np.stack([np.asarray(u, np.float64), np.asarray(v, np.float64)], axis=-1)
    pts = pts.reshape(-1, 1, 2)
    if pts.shape[0] == 0:
        return np.zeros(0), np.zeros(0)
    K = np.asarray(K, np.float64)
    if dist.fisheye:
        out = cv2.fisheye.undistortPoints(pts, K, dist.coeffs, R=np.eye(3), P=K,
                                          criteria=_CRITERIA)
    else:
        out = cv2.undistortPointsIter(pts, K, dist.coeffs, np.eye(3), K, _CRITERIA)
    out = out.reshape(-1, 2)
    return out[:, 0].astype(np.float64), out[:, 1].astype(np.float64)


def project_distorted(points: np.ndarray, K: np.ndarray, dist: Distortion) -> np.ndarray:
    """Camera-frame 3-D points (z > 0) -> their raw (distorted) pixel positions.

    Args:
        points: (n, 3) metres in the camera optical frame.
        K: (3, 3) intrinsics of the raw image.
        dist: its distortion.

    Returns:
        (n, 2) float64 pixel coordinates (u, v).
    """
    pts = np.asarray(points, np.float64).reshape(-1, 1, 3)
    if pts.shape[0] == 0:
        return np.zeros((0, 2))
    zero = np.zeros(3)
    K = np.asarray(K, np.float64)
    if dist.fisheye:
        uv, _ = cv2.fisheye.projectPoints(pts, zero, zero, K, dist.coeffs)
    else:
        uv, _ = cv2.projectPoints(pts, zero, zero, K, dist.coeffs)
    return uv.reshape(-1, 2).astype(np.float64)


def rectify_maps(K: np.ndarray, dist: Distortion,
                 shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``cv2.remap`` maps from the raw image to its rectified copy with the same K.

    Args:
        K: (3, 3) intrinsics of the raw image (and of the copy).
        dist: its distortion.
        shape: (H, W) of the image.

    Returns:
        (map_x, map_y): (H, W) float32, the raw position of every rectified pixel.
    """
    H, W = shape
    K = np.asarray(K, np.float64)
    if dist.fisheye:
        return cv2.fisheye.initUndistortRectifyMap(K, dist.coeffs, np.eye(3), K, (W, H),
                                                   cv2.CV_32FC1)
    return cv2.initUndistortRectifyMap(K, dist.coeffs, np.eye(3), K, (W, H), cv2.CV_32FC1)
