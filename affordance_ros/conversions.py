"""sensor_msgs Image / CompressedImage / CameraInfo <-> numpy, without ROS (pure functions).

Conventions (REP-118, sensor_msgs/image_encodings):

* colour images come out as (H, W, 3) uint8 **RGB** (``bgr8`` is reordered, the alpha of
  ``rgba8``/``bgra8`` is dropped, ``mono8`` is repeated on three channels);
* depth comes out in the message's own unit: ``16UC1``/``mono16`` as uint16 (millimetres for
  REP-118 depth, 0 = invalid; the pipeline applies ``depth_scale``), ``32FC1`` as float32 metres
  (non-finite = invalid);
* rows may be padded (``step`` > width * bytes per pixel) and multi-byte data may be big-endian
  (``is_bigendian``); outputs are native-endian, C-contiguous copies that do not share memory with
  the message;
* ``uint8[]`` data may be bytes, a numpy array, ``array.array('B')`` (rclpy) or a list of ints.

Every malformed input raises :class:`ConversionError` whose one-line message names the field and
the expected value.

cv_bridge, where it is installed, converts the colour encodings this module does not decode
itself (:data:`BRIDGE_COLOR_ENCODINGS`: 16-bit colour, YUV 4:2:2, NV21/NV24, Bayer) to rgb8. The
listed encodings always take the pure path, with or without cv_bridge: it does everything
cv_bridge does for them (padding, byte order), is the path the tests cover, and keeps the node
and the ROS-free replay bit-identical.
"""
from __future__ import annotations

import array
import functools
from typing import Any

import cv2
import numpy as np

from affordance_core.inference.distortion import Distortion, check_distortion
from affordance_core.inference.geometry import InputError, check_intrinsics
from affordance_ros.msgtypes import MessageTypes, stamp_ns

__all__ = ['ConversionError', 'COLOR_ENCODINGS', 'DEPTH_ENCODINGS', 'BRIDGE_COLOR_ENCODINGS',
           'image_to_rgb', 'compressed_to_rgb', 'image_to_depth', 'camera_info_to_K',
           'camera_info_distortion', 'numpy_to_image']


class ConversionError(ValueError):
    """A message cannot be converted: one clear line saying what is wrong with which field."""


COLOR_ENCODINGS: tuple[str, ...] = ('rgb8', 'bgr8', 'rgba8', 'bgra8', 'mono8')
DEPTH_ENCODINGS: tuple[str, ...] = ('16UC1', 'mono16', '32FC1')
# colour encodings of sensor_msgs/image_encodings that only cv_bridge converts (when installed)
BRIDGE_COLOR_ENCODINGS: tuple[str, ...] = (
    'rgb16', 'bgr16', 'rgba16', 'bgra16', '8UC3', '8UC4', 'yuv422', 'uyvy', 'yuv422_yuy2',
    'yuyv', 'nv21', 'nv24', *(f'bayer_{p}{b}' for p in ('rggb', 'bggr', 'gbrg', 'grbg')
                              for b in (8, 16)))

# encoding -> (channels, numpy dtype of one channel, little-endian)
_LAYOUT: dict[str, tuple[int, np.dtype]] = {
    'rgb8': (3, np.dtype('u1')), 'bgr8': (3, np.dtype('u1')), 'rgba8': (4, np.dtype('u1')),
    'bgra8': (4, np.dtype('u1')), 'mono8': (1, np.dtype('u1')),
    '16UC1': (1, np.dtype('<u2')), 'mono16': (1, np.dtype('<u2')),
    '32FC1': (1, np.dtype('<f4')),
}
_CANONICAL = {name.lower(): name for name in _LAYOUT}


def _encoding(msg: Any, field: str, allowed: tuple[str, ...]) -> str:
    raw = str(getattr(msg, 'encoding', '')).strip()
    enc = _CANONICAL.get(raw.lower())
    if enc not in allowed:
        raise ConversionError(f"{field}: unsupported encoding '{raw}' (expected one of "
                              f"{', '.join(allowed)})")
    return enc


def _u8(data: Any, field: str) -> np.ndarray:
    """A flat uint8 view or copy of a ``uint8[]`` value."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return np.frombuffer(data, dtype=np.uint8)
    if isinstance(data, array.array) and data.typecode in ('B', 'b'):
        return np.frombuffer(data, dtype=np.uint8)
    try:
        arr = np.asarray(data)
    except (TypeError, ValueError):
        raise ConversionError(f'{field}: data must be a uint8 sequence, got '
                              f'{type(data).__name__}') from None
    if arr.dtype == np.uint8:
        return arr.reshape(-1)
    if arr.size == 0:
        return np.zeros(0, np.uint8)
    if arr.dtype.kind not in 'iu' or arr.min() < 0 or arr.max() > 255:
        raise ConversionError(f'{field}: data must hold uint8 values (0..255), got '
                              f'{type(data).__name__} of {arr.dtype}')
    return arr.astype(np.uint8).reshape(-1)


def _rows(msg: Any, field: str, enc: str) -> tuple[np.ndarray, int, int, int]:
    """Validated (H, W * bytes per pixel) uint8 rows without padding, H, W, channels."""
    channels, dtype = _LAYOUT[enc]
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    if h <= 0 or w <= 0:
        raise ConversionError(f'{field}: empty image (height={h}, width={w}); expected both > 0')
    row_bytes = w * channels * dtype.itemsize
    if step < row_bytes:
        per = '' if channels * dtype.itemsize == 1 else f'*{channels * dtype.itemsize}'
        raise ConversionError(f'{field}: step {step} is smaller than width{per} = {row_bytes} '
                              f'({enc})')
    data = _u8(msg.data, field)
    if data.size != h * step:
        raise ConversionError(f'{field}: data has {data.size} bytes, expected height*step = '
                              f'{h * step}')
    return data.reshape(h, step)[:, :row_bytes], h, w, channels


def _pixels(msg: Any, field: str, enc: str) -> np.ndarray:
    """(H, W, C) array in the message's byte order; may share memory with ``msg.data`` (callers
    copy)."""
    rows, h, w, channels = _rows(msg, field, enc)
    _, dtype = _LAYOUT[enc]
    if dtype.itemsize > 1:
        big = bool(getattr(msg, 'is_bigendian', 0))
        dtype = dtype.newbyteorder('>' if big else '<')
    return np.ascontiguousarray(rows).view(dtype).reshape(h, w, channels)


@functools.lru_cache(maxsize=1)
def _cv_bridge() -> Any | None:
    """A ``cv_bridge.CvBridge`` when cv_bridge is importable (a ROS install), else None."""
    try:
        from cv_bridge import CvBridge
    except ImportError:
        return None
    return CvBridge()


def _bridge_to_rgb(msg: Any, raw: str) -> np.ndarray:
    """A :data:`BRIDGE_COLOR_ENCODINGS` image -> (H, W, 3) uint8 RGB through cv_bridge."""
    bridge = _cv_bridge()
    if bridge is None:
        raise ConversionError(f"image: encoding '{raw}' needs cv_bridge, which is not installed "
                              f"(without it: {', '.join(COLOR_ENCODINGS)})")
    try:
        out = bridge.imgmsg_to_cv2(msg, desired_encoding='rgb8')
    except Exception as exc:  # cv_bridge raises CvBridgeError, cv2.error, TypeError ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConversionError(f"image: cv_bridge cannot convert '{raw}' to rgb8: {first}") \
            from None
    out = np.asarray(out)
    want = (int(msg.height), int(msg.width), 3)
    if out.dtype != np.uint8 or out.shape != want:
        raise ConversionError(f"image: cv_bridge turned '{raw}' into {out.dtype} {out.shape}, "
                              f'expected uint8 {want}')
    return np.array(out, order='C')  # a copy: never shares memory with the message


def image_to_rgb(msg: Any) -> np.ndarray:
    """sensor_msgs/Image (rgb8, bgr8, rgba8, bgra8, mono8; with cv_bridge also
    :data:`BRIDGE_COLOR_ENCODINGS`) -> (H, W, 3) uint8 RGB.

    Raises:
        ConversionError: unsupported encoding (or one that needs the missing cv_bridge), empty
            image, step or data size inconsistent.
    """
    raw = str(getattr(msg, 'encoding', '')).strip()
    if raw in BRIDGE_COLOR_ENCODINGS:
        return _bridge_to_rgb(msg, raw)
    enc = _encoding(msg, 'image', COLOR_ENCODINGS)
    px = _pixels(msg, 'image', enc)
    if enc == 'rgb8':
        return px.copy()
    code = {'bgr8': cv2.COLOR_BGR2RGB, 'bgra8': cv2.COLOR_BGRA2RGB,
            'rgba8': cv2.COLOR_RGBA2RGB, 'mono8': cv2.COLOR_GRAY2RGB}[enc]
    return np.ascontiguousarray(cv2.cvtColor(px, code))  # a new array (about 5x faster than
    # numpy's strided channel reversal on 1080p)


def image_to_depth(msg: Any) -> np.ndarray:
    """sensor_msgs/Image (16UC1, mono16, 32FC1) -> (H, W) uint16 or float32 metres.

    16UC1 / mono16 stay uint16 (raw units, millimetres by REP-118, 0 = invalid); 32FC1 is
    float32 metres. ``is_bigendian`` is honoured.

    Raises:
        ConversionError: unsupported encoding, empty image, step or data size inconsistent.
    """
    enc = _encoding(msg, 'depth', DEPTH_ENCODINGS)
    px = _pixels(msg, 'depth', enc)[:, :, 0]
    return px.astype(px.dtype.newbyteorder('='), order='C')


def _decoded_is_rgb(fmt: str) -> bool:
    """image_transport's ``'<src>; <codec> compressed <enc>'`` format: was the codec fed RGB?

    OpenCV encoders take BGR; image_transport always compresses colour as ``bgr8``. A producer
    that says ``compressed rgb8`` handed RGB bytes to the codec, so decoding gives RGB order.
    """
    if 'compressed' not in fmt:
        return False
    target = fmt.split('compressed', 1)[1].strip().lower()
    return target.startswith('rgb')


def compressed_to_rgb(msg: Any) -> np.ndarray:
    """sensor_msgs/CompressedImage (jpeg, png, ... anything cv2.imdecode reads) ->
    (H, W, 3) uint8 RGB.

    ``format`` may be a bare codec (``'jpeg'``, ``'png'``) or image_transport's
    ``'rgb8; jpeg compressed bgr8'`` form. ``compressedDepth`` payloads are rejected.

    Raises:
        ConversionError: empty or undecodable data, or a depth format.
    """
    field = 'compressed_image'
    fmt = str(getattr(msg, 'format', '')).strip()
    if 'compresseddepth' in fmt.lower().replace(' ', ''):
        raise ConversionError(f"{field}: format '{fmt}' is compressed depth; expected a colour "
                              'image (jpeg or png)')
    data = _u8(msg.data, field)
    if data.size == 0:
        raise ConversionError(f"{field}: data is empty (format '{fmt}')")
    try:
        img = cv2.imdecode(np.ascontiguousarray(data), cv2.IMREAD_COLOR)
    except cv2.error:
        img = None
    if img is None or img.size == 0:
        raise ConversionError(f"{field}: cannot decode {data.size} bytes as '{fmt or 'image'}' "
                              '(expected jpeg or png data)')
    if img.dtype != np.uint8:  # pragma: no cover - IMREAD_COLOR always gives 8-bit
        img = (img / 257).astype(np.uint8)
    if _decoded_is_rgb(fmt.lower()):
        return np.ascontiguousarray(img)
    return np.ascontiguousarray(img[:, :, ::-1])


def _numbers(msg: Any, name: str, count: int) -> np.ndarray:
    """CameraInfo field ``name`` as ``count`` finite float64 values."""
    field = 'camera_info'
    value = getattr(msg, name.lower())
    try:
        a = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise ConversionError(f'{field}: {name} must be {count} numbers, got '
                              f'{type(value).__name__}') from None
    if a.size != count:
        raise ConversionError(f'{field}: {name} has {a.size} values, expected {count} '
                              f'(row-major 3x{count // 3})')
    if not np.all(np.isfinite(a)):
        raise ConversionError(f'{field}: {name} contains NaN or inf: {a.tolist()}')
    return a


def camera_info_to_K(msg: Any, image_size: tuple[int, int] | None = None, *,
                     rectified: bool = False) -> np.ndarray:
    """sensor_msgs/CameraInfo -> validated 3x3 float64 intrinsics of the published image.

    A raw image's intrinsics are K. A rectified image's (``image_rect``, ``rectified=True``) are
    the left 3x3 of P, the projection matrix of the rectified image, as image_geometry's
    ``PinholeCameraModel`` uses them; an all-zero P falls back to K. Binning and ROI are
    applied as ``PinholeCameraModel`` does (fx, cx divided by binning_x after subtracting the
    ROI x offset; likewise y). A camera_info whose width and height are both 0 (unset) skips
    the size check.

    Args:
        msg: the CameraInfo.
        image_size: (H, W) of the image K is used with; checked against the camera_info size
            (after binning / ROI).
        rectified: the image is rectified (use P).

    Raises:
        ConversionError: K (or P) missing, all zeros (uncalibrated), non-finite or malformed,
            or the size does not match the image.
    """
    field = 'camera_info'
    k = _numbers(msg, 'K', 9)
    if rectified:
        p = _numbers(msg, 'P', 12)
        if np.any(p):
            k = p.reshape(3, 4)[:, :3].reshape(-1)
    if not np.any(k):
        raise ConversionError(f'{field}: K is all zeros (uncalibrated camera)')
    K = k.reshape(3, 3).copy()
    bx = max(1, int(getattr(msg, 'binning_x', 0) or 0))
    by = max(1, int(getattr(msg, 'binning_y', 0) or 0))
    width, height = int(msg.width), int(msg.height)
    roi = getattr(msg, 'roi', None)
    x0 = y0 = 0
    roi_w, roi_h = width, height
    if roi is not None and (roi.x_offset or roi.y_offset or roi.width or roi.height):
        x0, y0, roi_w, roi_h = int(roi.x_offset), int(roi.y_offset), int(roi.width), \
            int(roi.height)
    K[0, 0] /= bx
    K[1, 1] /= by
    K[0, 2] = (K[0, 2] - x0) / bx
    K[1, 2] = (K[1, 2] - y0) / by
    try:
        K = check_intrinsics(K)
    except InputError as exc:
        raise ConversionError(f'{field}: {exc}') from None
    if image_size is not None and (width or height):
        exp_w, exp_h = roi_w // bx, roi_h // by
        img_h, img_w = int(image_size[0]), int(image_size[1])
        if (exp_w, exp_h) != (img_w, img_h):
            extra = '' if (bx, by, x0, y0, roi_w, roi_h) == (1, 1, 0, 0, width, height) else \
                f' (camera {width}x{height}, binning {bx}x{by}, roi {roi_w}x{roi_h}+{x0}+{y0})'
            raise ConversionError(f'{field}: size {exp_w}x{exp_h}{extra} does not match the '
                                  f'image {img_w}x{img_h}')
    return K


def camera_info_distortion(msg: Any) -> Distortion | None:
    """sensor_msgs/CameraInfo ``d`` and ``distortion_model`` of a *raw* image, or None when the
    camera has no distortion (D empty or all zeros).

    Raises:
        ConversionError: non-finite coefficients, an unsupported model (supported:
            plumb_bob, rational_polynomial, equidistant) or a coefficient count the model does
            not have.
    """
    model = str(getattr(msg, 'distortion_model', '') or '').strip() or 'plumb_bob'
    d = getattr(msg, 'd', None)
    try:
        return check_distortion([] if d is None else d, model)
    except (InputError, TypeError, ValueError) as exc:
        raise ConversionError(f'camera_info: {exc}') from None


def numpy_to_image(arr: np.ndarray, encoding: str, header: Any, types: MessageTypes) -> Any:
    """numpy -> sensor_msgs/Image (little-endian, unpadded rows, ``step = width * bytes``).

    The array is in the encoding's channel order (as cv_bridge's ``cv2_to_imgmsg``):
    rgb8 / bgr8 (H, W, 3) uint8, rgba8 / bgra8 (H, W, 4) uint8, mono8 (H, W) uint8,
    16UC1 / mono16 (H, W) uint16, 32FC1 (H, W) float32 (other float dtypes are cast).

    Args:
        arr: the pixels.
        encoding: one of COLOR_ENCODINGS + DEPTH_ENCODINGS.
        header: std_msgs/Header copied into the message (stamp and frame_id).
        types: where the message classes come from.

    Raises:
        ConversionError: unknown encoding, or an array of the wrong shape / dtype / empty.
    """
    field = 'numpy_to_image'
    enc = _CANONICAL.get(str(encoding).strip().lower())
    if enc is None:
        raise ConversionError(f"{field}: unsupported encoding '{encoding}' (expected one of "
                              f"{', '.join(COLOR_ENCODINGS + DEPTH_ENCODINGS)})")
    channels, dtype = _LAYOUT[enc]
    a = np.asarray(arr)
    if channels == 1 and a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    want = '(H, W)' if channels == 1 else f'(H, W, {channels})'
    ok_shape = a.ndim == 2 if channels == 1 else (a.ndim == 3 and a.shape[2] == channels)
    if not ok_shape or a.size == 0:
        raise ConversionError(f'{field}: {enc} needs a non-empty {want} array, got shape '
                              f'{a.shape}')
    if dtype.kind == 'f':
        if a.dtype.kind != 'f':
            raise ConversionError(f'{field}: {enc} needs a float32 array, got {a.dtype}')
    elif a.dtype.newbyteorder('=') != dtype.newbyteorder('='):
        raise ConversionError(f'{field}: {enc} needs a {dtype.newbyteorder("=").name} array, '
                              f'got {a.dtype}')
    h, w = int(a.shape[0]), int(a.shape[1])
    data = np.ascontiguousarray(a, dtype=dtype).tobytes()
    return types.make('sensor_msgs/msg/Image',
                      header=types.header(stamp_ns(header), header.frame_id),
                      height=h, width=w, encoding=enc, is_bigendian=0,
                      step=w * channels * dtype.itemsize, data=types.u8_array(data))
