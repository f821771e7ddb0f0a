"""affordance_ros.conversions: Image / CompressedImage / CameraInfo <-> numpy, with rosbags
message classes (no ROS)."""
from __future__ import annotations

import array
from typing import Any

import cv2
import numpy as np
import pytest
from msg_assertions import assert_msg_equal

from affordance_ros.conversions import (COLOR_ENCODINGS, DEPTH_ENCODINGS, ConversionError,
                                        camera_info_to_K, compressed_to_rgb, image_to_depth,
                                        image_to_rgb, numpy_to_image)
from affordance_ros.msgtypes import BagMessageTypes, stamp_ns

STAMP = 1_700_000_000_250_000_000
FRAME = 'camera_color_optical_frame'
K_LIST = [500.0, 0.0, 320.0, 0.0, 505.0, 240.0, 0.0, 0.0, 1.0]


@pytest.fixture(scope='module')
def t() -> BagMessageTypes:
    return BagMessageTypes()


@pytest.fixture(scope='module')
def header(t: BagMessageTypes) -> Any:
    return t.header(STAMP, FRAME)


def image(t: BagMessageTypes, h: int, w: int, encoding: str, step: int, data: Any,
          bigendian: int = 0) -> Any:
    return t.make('sensor_msgs/msg/Image', header=t.header(STAMP, FRAME), height=h, width=w,
                  encoding=encoding, is_bigendian=bigendian, step=step, data=data)


def sample(encoding: str, h: int = 5, w: int = 7, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if encoding in ('rgb8', 'bgr8'):
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    if encoding in ('rgba8', 'bgra8'):
        return rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    if encoding == 'mono8':
        return rng.integers(0, 256, (h, w), dtype=np.uint8)
    if encoding in ('16UC1', 'mono16'):
        return rng.integers(0, 65536, (h, w), dtype=np.uint16)
    d = rng.uniform(0.1, 4.0, (h, w)).astype(np.float32)
    d[0, 0], d[1, 1], d[2, 2] = np.nan, np.inf, -np.inf  # REP-117 values survive
    return d


def expected_rgb(arr: np.ndarray, encoding: str) -> np.ndarray:
    if encoding == 'mono8':
        return np.repeat(arr[:, :, None], 3, axis=2)
    if encoding in ('bgr8', 'bgra8'):
        return arr[:, :, 2::-1]
    return arr[:, :, :3]


def to_rgb_or_depth(msg: Any) -> np.ndarray:
    return image_to_rgb(msg) if msg.encoding in COLOR_ENCODINGS else image_to_depth(msg)


def expected(arr: np.ndarray, encoding: str) -> np.ndarray:
    return expected_rgb(arr, encoding) if encoding in COLOR_ENCODINGS else arr


# ----------------------------------------------------------------------- round trips


@pytest.mark.parametrize('encoding', COLOR_ENCODINGS + DEPTH_ENCODINGS)
def test_numpy_image_numpy_round_trip(t: BagMessageTypes, header: Any, encoding: str) -> None:
    arr = sample(encoding)
    msg = numpy_to_image(arr, encoding, header, t)
    assert msg.encoding == encoding and (msg.height, msg.width) == arr.shape[:2]
    bpp = arr.dtype.itemsize * (arr.shape[2] if arr.ndim == 3 else 1)
    assert msg.step == arr.shape[1] * bpp and msg.is_bigendian == 0
    assert msg.data.size == msg.height * msg.step
    assert stamp_ns(msg.header) == STAMP and msg.header.frame_id == FRAME
    assert msg.header is not header  # a copy, not the source object
    out = to_rgb_or_depth(msg)
    np.testing.assert_array_equal(out, expected(arr, encoding))
    assert out.flags.c_contiguous and out.dtype.isnative
    if encoding in DEPTH_ENCODINGS:
        assert out.dtype == arr.dtype
    else:
        assert out.dtype == np.uint8 and out.shape == arr.shape[:2] + (3,)
    # ... and the message serialises and deserialises unchanged
    ts = t.typestore
    back = ts.deserialize_cdr(ts.serialize_cdr(msg, msg.__msgtype__), msg.__msgtype__)
    assert_msg_equal(back, msg)
    np.testing.assert_array_equal(to_rgb_or_depth(back), expected(arr, encoding))


@pytest.mark.parametrize('encoding', COLOR_ENCODINGS + DEPTH_ENCODINGS)
@pytest.mark.parametrize('pad', [1, 3, 64])
def test_step_padding(t: BagMessageTypes, encoding: str, pad: int) -> None:
    arr = sample(encoding, 4, 6, seed=pad)
    h = arr.shape[0]
    row = np.ascontiguousarray(arr).view(np.uint8).reshape(h, -1)
    if arr.dtype.itemsize > 1:
        row = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder('<'))).view(
            np.uint8).reshape(h, -1)
    padded = np.full((h, row.shape[1] + pad), 0xAB, np.uint8)  # garbage in the padding
    padded[:, :row.shape[1]] = row
    msg = image(t, h, arr.shape[1], encoding, padded.shape[1], padded.reshape(-1))
    out = to_rgb_or_depth(msg)
    np.testing.assert_array_equal(out, expected(arr, encoding))


@pytest.mark.parametrize('encoding, dtype', [('16UC1', '>u2'), ('mono16', '>u2'),
                                             ('32FC1', '>f4')])
@pytest.mark.parametrize('pad', [0, 5])
def test_big_endian_depth(t: BagMessageTypes, encoding: str, dtype: str, pad: int) -> None:
    arr = sample(encoding, 3, 4)
    raw = np.ascontiguousarray(arr.astype(dtype)).view(np.uint8).reshape(3, -1)
    padded = np.zeros((3, raw.shape[1] + pad), np.uint8)
    padded[:, :raw.shape[1]] = raw
    msg = image(t, 3, 4, encoding, padded.shape[1], padded.reshape(-1), bigendian=1)
    out = image_to_depth(msg)
    assert out.dtype.isnative
    np.testing.assert_array_equal(out, arr)
    # the same bytes read as little-endian are different numbers
    msg.is_bigendian = 0
    assert not np.array_equal(image_to_depth(msg), arr, equal_nan=True)


def test_known_pixel_values(t: BagMessageTypes) -> None:
    rgba = np.array([[[10, 20, 30, 255], [40, 50, 60, 0]]], np.uint8)
    msg = image(t, 1, 2, 'rgba8', 8, rgba.reshape(-1))
    np.testing.assert_array_equal(image_to_rgb(msg), [[[10, 20, 30], [40, 50, 60]]])
    msg = image(t, 1, 2, 'bgra8', 8, rgba.reshape(-1))
    np.testing.assert_array_equal(image_to_rgb(msg), [[[30, 20, 10], [60, 50, 40]]])
    msg = image(t, 1, 2, 'bgr8', 6, rgba[:, :, :3].reshape(-1))
    np.testing.assert_array_equal(image_to_rgb(msg), [[[30, 20, 10], [60, 50, 40]]])
    msg = image(t, 1, 2, 'mono8', 2, np.array([7, 9], np.uint8))
    np.testing.assert_array_equal(image_to_rgb(msg), [[[7, 7, 7], [9, 9, 9]]])
    msg = image(t, 1, 2, '16UC1', 4, np.array([0xE8, 0x03, 0, 0], np.uint8))  # 1000 mm, 0
    np.testing.assert_array_equal(image_to_depth(msg), [[1000, 0]])


@pytest.mark.parametrize('kind', ['bytes', 'bytearray', 'numpy', 'array', 'list', 'int64'])
def test_data_container_kinds(t: BagMessageTypes, kind: str) -> None:
    arr = sample('rgb8', 2, 3)
    flat = arr.reshape(-1)
    data: Any = {'bytes': flat.tobytes(), 'bytearray': bytearray(flat.tobytes()),
                 'numpy': flat, 'array': array.array('B', flat.tobytes()),
                 'list': flat.tolist(), 'int64': flat.astype(np.int64)}[kind]
    msg = image(t, 2, 3, 'rgb8', 9, data)
    out = image_to_rgb(msg)
    np.testing.assert_array_equal(out, arr)
    assert out.flags.writeable  # a copy even when the data was immutable bytes
    out[...] = 0
    np.testing.assert_array_equal(image_to_rgb(msg), arr)


def test_encoding_names_are_case_insensitive(t: BagMessageTypes) -> None:
    arr = sample('16UC1', 2, 2)
    msg = image(t, 2, 2, '16uc1', 4, arr.view(np.uint8).reshape(-1))
    np.testing.assert_array_equal(image_to_depth(msg), arr)


# ------------------------------------------------------------------------- bad inputs


def bad_image(t: BagMessageTypes, **change: Any) -> Any:
    fields = dict(h=480, w=640, encoding='rgb8', step=1920, data=np.zeros(921600, np.uint8))
    fields.update(change)
    return image(t, fields['h'], fields['w'], fields['encoding'], fields['step'],
                 fields['data'])


@pytest.mark.parametrize('change, text', [
    (dict(step=1919), 'image: step 1919 is smaller than width*3 = 1920'),
    (dict(data=np.zeros(100, np.uint8)), 'image: data has 100 bytes, expected height*step = '
     '921600'),
    (dict(data=np.zeros(921601, np.uint8)), 'image: data has 921601 bytes'),
    (dict(h=0, step=1920, data=np.zeros(0, np.uint8)), 'image: empty image (height=0'),
    (dict(w=0, step=0, data=np.zeros(0, np.uint8)), 'width=0'),
    (dict(encoding='16UC1'), "image: unsupported encoding '16UC1' (expected one of rgb8, bgr8, "
     'rgba8, bgra8, mono8)'),
    (dict(encoding=''), "image: unsupported encoding ''"),
    (dict(data=[300] * 921600), 'image: data must hold uint8 values'),
    (dict(data=np.zeros(921600, np.float32)), 'image: data must hold uint8 values'),
])
def test_bad_color_images(t: BagMessageTypes, change: dict[str, Any], text: str) -> None:
    with pytest.raises(ConversionError) as err:
        image_to_rgb(bad_image(t, **change))
    assert text in str(err.value)
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize('change, text', [
    (dict(encoding='rgb8'), "depth: unsupported encoding 'rgb8' (expected one of 16UC1, mono16, "
     '32FC1)'),
    (dict(encoding='16UC1', step=1279), 'depth: step 1279 is smaller than width*2 = 1280'),
    (dict(encoding='32FC1', step=1280, data=np.zeros(480 * 1280, np.uint8)),
     'depth: step 1280 is smaller than width*4 = 2560'),
    (dict(encoding='32FC1', step=2560, data=np.zeros(10, np.uint8)),
     'depth: data has 10 bytes, expected height*step = 1228800'),
    (dict(encoding='16UC1', h=0, step=1280, data=b''), 'depth: empty image'),
])
def test_bad_depth_images(t: BagMessageTypes, change: dict[str, Any], text: str) -> None:
    with pytest.raises(ConversionError) as err:
        image_to_depth(bad_image(t, **change))
    assert text in str(err.value)


# ---------------------------------------------------------------------- compressed


def compressed(t: BagMessageTypes, fmt: str, data: Any) -> Any:
    return t.make('sensor_msgs/msg/CompressedImage', header=t.header(STAMP, FRAME), format=fmt,
                  data=data)


def smooth_rgb(h: int = 32, w: int = 48) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 5, y * 7, 255 - x * 3], axis=2).clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize('fmt', ['png', 'bgr8; png compressed bgr8', 'rgb8; png compressed bgr8',
                                 'PNG'])
def test_compressed_png_is_exact(t: BagMessageTypes, fmt: str) -> None:
    rgb = smooth_rgb()
    ok, buf = cv2.imencode('.png', rgb[:, :, ::-1])  # OpenCV encoders take BGR
    assert ok
    out = compressed_to_rgb(compressed(t, fmt, buf.reshape(-1)))
    np.testing.assert_array_equal(out, rgb)


@pytest.mark.parametrize('fmt', ['jpeg', 'rgb8; jpeg compressed bgr8', 'jpg'])
def test_compressed_jpeg(t: BagMessageTypes, fmt: str) -> None:
    rgb = smooth_rgb()
    ok, buf = cv2.imencode('.jpg', rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    out = compressed_to_rgb(compressed(t, fmt, buf.tobytes()))
    assert out.shape == rgb.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - rgb).mean() < 3  # colour order right, lossy codec


def test_compressed_rgb_payload(t: BagMessageTypes) -> None:
    """A producer that says 'compressed rgb8' handed RGB bytes to the codec."""
    rgb = smooth_rgb()
    ok, buf = cv2.imencode('.png', rgb)
    out = compressed_to_rgb(compressed(t, 'rgb8; png compressed rgb8', buf.reshape(-1)))
    np.testing.assert_array_equal(out, rgb)


def test_compressed_mono(t: BagMessageTypes) -> None:
    gray = smooth_rgb()[:, :, 0]
    ok, buf = cv2.imencode('.png', gray)
    out = compressed_to_rgb(compressed(t, 'mono8; png compressed mono8', buf.reshape(-1)))
    np.testing.assert_array_equal(out, np.repeat(gray[:, :, None], 3, axis=2))


@pytest.mark.parametrize('fmt, data, text', [
    ('jpeg', np.frombuffer(b'\xff\xd8 this is not a jpeg' * 10, np.uint8),
     "compressed_image: cannot decode 210 bytes as 'jpeg'"),
    ('png', b'', "compressed_image: data is empty (format 'png')"),
    ('16UC1; compressedDepth png', b'\x00' * 20, 'compressed_image: format '
     "'16UC1; compressedDepth png' is compressed depth"),
])
def test_bad_compressed(t: BagMessageTypes, fmt: str, data: Any, text: str) -> None:
    with pytest.raises(ConversionError) as err:
        compressed_to_rgb(compressed(t, fmt, data))
    assert text in str(err.value)


# ---------------------------------------------------------------------- camera_info


def camera_info(t: BagMessageTypes, k: Any = K_LIST, w: int = 640, h: int = 480,
                binning: tuple[int, int] = (0, 0),
                roi: tuple[int, int, int, int] = (0, 0, 0, 0)) -> Any:
    return t.make(
        'sensor_msgs/msg/CameraInfo', header=t.header(STAMP, FRAME), height=h, width=w,
        distortion_model='plumb_bob', d=t.f64_array(np.zeros(5)), k=t.f64_array(k),
        r=t.f64_array(np.eye(3)), p=t.f64_array(np.zeros(12)), binning_x=binning[0],
        binning_y=binning[1],
        roi=t.make('sensor_msgs/msg/RegionOfInterest', x_offset=roi[0], y_offset=roi[1],
                   width=roi[2], height=roi[3], do_rectify=False))


def test_camera_info_k(t: BagMessageTypes) -> None:
    K = camera_info_to_K(camera_info(t), image_size=(480, 640))
    assert K.shape == (3, 3) and K.dtype == np.float64
    np.testing.assert_array_equal(K, np.reshape(K_LIST, (3, 3)))
    np.testing.assert_array_equal(camera_info_to_K(camera_info(t, k=list(K_LIST))), K)
    # the camera_info serialised and back gives the same K
    ts = t.typestore
    msg = camera_info(t)
    back = ts.deserialize_cdr(ts.serialize_cdr(msg, msg.__msgtype__), msg.__msgtype__)
    np.testing.assert_array_equal(camera_info_to_K(back), K)


def test_camera_info_rectified_uses_P_and_distortion(t: BagMessageTypes) -> None:
    from affordance_ros.conversions import camera_info_distortion

    msg = camera_info(t)
    # an all-zero P (uncalibrated rectification) falls back to K
    np.testing.assert_array_equal(camera_info_to_K(msg, rectified=True),
                                  np.reshape(K_LIST, (3, 3)))
    msg.p = t.f64_array([480.0, 0.0, 330.0, 0.0, 0.0, 490.0, 245.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    np.testing.assert_array_equal(camera_info_to_K(msg, image_size=(480, 640), rectified=True),
                                  [[480, 0, 330], [0, 490, 245], [0, 0, 1]])
    np.testing.assert_array_equal(camera_info_to_K(msg), np.reshape(K_LIST, (3, 3)))
    msg.p = t.f64_array([1.0] * 11)
    with pytest.raises(ConversionError, match='P has 11 values, expected 12'):
        camera_info_to_K(msg, rectified=True)

    assert camera_info_distortion(msg) is None  # d = zeros
    msg.d = t.f64_array([-0.2, 0.05, 0.001, 0.0, 0.0])
    dist = camera_info_distortion(msg)
    assert dist is not None and dist.model == 'plumb_bob'
    np.testing.assert_array_equal(dist.coeffs, [-0.2, 0.05, 0.001, 0.0, 0.0])
    msg.distortion_model = 'fov'
    with pytest.raises(ConversionError, match="camera_info: distortion model 'fov' is not "
                                              'supported'):
        camera_info_distortion(msg)
    msg.distortion_model, msg.d = 'equidistant', t.f64_array([0.1, 0.0, np.inf, 0.0])
    with pytest.raises(ConversionError, match='nan or inf'):
        camera_info_distortion(msg)


def test_camera_info_unset_size_skips_the_check(t: BagMessageTypes) -> None:
    K = camera_info_to_K(camera_info(t, w=0, h=0), image_size=(240, 320))
    assert K[0, 0] == 500.0


def test_camera_info_binning_and_roi(t: BagMessageTypes) -> None:
    K = camera_info_to_K(camera_info(t, binning=(2, 2)), image_size=(240, 320))
    np.testing.assert_allclose(K, [[250, 0, 160], [0, 252.5, 120], [0, 0, 1]])
    K = camera_info_to_K(camera_info(t, roi=(100, 40, 200, 100)), image_size=(100, 200))
    np.testing.assert_allclose(K, [[500, 0, 220], [0, 505, 200], [0, 0, 1]])
    with pytest.raises(ConversionError, match='binning 2x2'):
        camera_info_to_K(camera_info(t, binning=(2, 2)), image_size=(480, 640))


@pytest.mark.parametrize('kwargs, size, text', [
    (dict(k=np.zeros(9)), None, 'camera_info: K is all zeros (uncalibrated camera)'),
    (dict(k=[500, 0, 320, 0, np.nan, 240, 0, 0, 1]), None, 'camera_info: K contains NaN or inf'),
    (dict(k=[500, 0, 320, 0, 505, np.inf, 0, 0, 1]), None, 'camera_info: K contains NaN or inf'),
    (dict(k=[500, 0, 320, 0]), None, 'camera_info: K has 4 values, expected 9'),
    (dict(k=[-500, 0, 320, 0, 505, 240, 0, 0, 1]), None, 'camera_info: K must have positive '
     'focal lengths'),
    (dict(k=[500, 0, 0, 0, 505, 0, 320, 240, 1]), None, 'camera_info: K must be upper '
     'triangular'),
    (dict(), (240, 320), 'camera_info: size 640x480 does not match the image 320x240'),
])
def test_bad_camera_info(t: BagMessageTypes, kwargs: dict[str, Any],
                         size: tuple[int, int] | None, text: str) -> None:
    with pytest.raises(ConversionError) as err:
        camera_info_to_K(camera_info(t, **kwargs), image_size=size)
    assert text in str(err.value)


# ---------------------------------------------------------------------- numpy_to_image


@pytest.mark.parametrize('arr, encoding, text', [
    (np.zeros((4, 5, 3), np.uint8), '8UC3', "unsupported encoding '8UC3'"),
    (np.zeros((4, 5), np.uint8), 'rgb8', 'rgb8 needs a non-empty (H, W, 3) array, got shape '
     '(4, 5)'),
    (np.zeros((0, 5, 3), np.uint8), 'rgb8', 'non-empty'),
    (np.zeros((4, 5, 3), np.float32), 'rgb8', 'rgb8 needs a uint8 array, got float32'),
    (np.zeros((4, 5), np.uint8), '32FC1', '32FC1 needs a float32 array, got uint8'),
    (np.zeros((4, 5), np.int32), '16UC1', '16UC1 needs a uint16 array, got int32'),
    (np.zeros((4, 5, 2), np.uint16), '16UC1', '16UC1 needs a non-empty (H, W) array'),
])
def test_numpy_to_image_rejects(t: BagMessageTypes, header: Any, arr: np.ndarray,
                                encoding: str, text: str) -> None:
    with pytest.raises(ConversionError) as err:
        numpy_to_image(arr, encoding, header, t)
    assert text in str(err.value)


def test_numpy_to_image_casts_float64_depth(t: BagMessageTypes, header: Any) -> None:
    d = np.array([[0.5, 1.25]], np.float64)
    out = image_to_depth(numpy_to_image(d, '32FC1', header, t))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, d.astype(np.float32))
    # (H, W, 1) is accepted for single-channel encodings
    m = np.arange(6, dtype=np.uint8).reshape(2, 3, 1)
    msg = numpy_to_image(m, 'mono8', header, t)
    assert (msg.height, msg.width, msg.step) == (2, 3, 3)


# ----------------------------------------------------------------------- cv_bridge fallback


class _StandInCvBridge:
    """cv_bridge.CvBridge's imgmsg_to_cv2 for yuv422 (UYVY, as cv_bridge decodes it) only;
    records its calls."""

    calls: list[tuple[str, str]] = []

    def imgmsg_to_cv2(self, msg: Any, desired_encoding: str = 'passthrough') -> np.ndarray:
        self.calls.append((msg.encoding, desired_encoding))
        if msg.encoding != 'yuv422':
            raise TypeError(f'[{msg.encoding}] is not a supported encoding here')
        uyvy = np.asarray(msg.data, np.uint8).reshape(msg.height, msg.step)[:, :msg.width * 2]
        out = cv2.cvtColor(uyvy.reshape(msg.height, msg.width, 2), cv2.COLOR_YUV2RGB_UYVY)
        return out if msg.width > 2 else out[:, :, :2]  # a broken result for width <= 2


@pytest.fixture()
def bridge(monkeypatch: pytest.MonkeyPatch) -> type[_StandInCvBridge]:
    import sys
    import types as pytypes

    from affordance_ros import conversions

    mod = pytypes.ModuleType('cv_bridge')
    mod.CvBridge = _StandInCvBridge  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, 'cv_bridge', mod)
    conversions._cv_bridge.cache_clear()
    _StandInCvBridge.calls = []
    yield _StandInCvBridge
    conversions._cv_bridge.cache_clear()


def _uyvy(t: BagMessageTypes, h: int, w: int, pad: int = 0,
          seed: int = 0) -> tuple[Any, np.ndarray]:
    """A yuv422 (UYVY) message with rows padded by ``pad`` bytes, and its unpadded pixels."""
    uyvy = np.random.default_rng(seed).integers(0, 256, (h, w, 2), dtype=np.uint8)
    rows = np.full((h, w * 2 + pad), 7, np.uint8)
    rows[:, :w * 2] = uyvy.reshape(h, w * 2)
    return image(t, h, w, 'yuv422', w * 2 + pad, rows.reshape(-1)), uyvy


def test_bridge_encodings_go_through_cv_bridge(t: BagMessageTypes, bridge: Any) -> None:
    msg, uyvy = _uyvy(t, 4, 6, pad=4)
    out = image_to_rgb(msg)
    assert bridge.calls == [('yuv422', 'rgb8')]
    assert out.shape == (4, 6, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, cv2.cvtColor(uyvy, cv2.COLOR_YUV2RGB_UYVY))
    assert not np.shares_memory(out, msg.data)


def test_listed_encodings_never_use_cv_bridge(t: BagMessageTypes, bridge: Any) -> None:
    arr = sample('bgr8')
    msg = image(t, 5, 7, 'bgr8', 21, arr.reshape(-1))
    np.testing.assert_array_equal(image_to_rgb(msg), expected_rgb(arr, 'bgr8'))
    with pytest.raises(ConversionError, match="unsupported encoding '16UC1'"):
        image_to_rgb(bad_image(t, encoding='16UC1'))  # depth as colour: rejected, not bridged
    assert bridge.calls == []


def test_cv_bridge_failures_are_conversion_errors(t: BagMessageTypes, bridge: Any) -> None:
    msg = bad_image(t, encoding='bayer_rggb8', step=640, data=np.zeros(480 * 640, np.uint8))
    with pytest.raises(ConversionError, match="cv_bridge cannot convert 'bayer_rggb8' to rgb8: "
                                              r'\[bayer_rggb8\] is not a supported'):
        image_to_rgb(msg)
    narrow, _ = _uyvy(t, 2, 2)
    with pytest.raises(ConversionError, match=r"cv_bridge turned 'yuv422' into uint8 \(2, 2, 2\)"):
        image_to_rgb(narrow)


def test_bridge_encoding_without_cv_bridge(t: BagMessageTypes,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from affordance_ros import conversions

    monkeypatch.setitem(sys.modules, 'cv_bridge', None)  # import cv_bridge -> ImportError
    conversions._cv_bridge.cache_clear()
    try:
        with pytest.raises(ConversionError, match="image: encoding 'yuv422' needs cv_bridge, "
                                                  'which is not installed'):
            image_to_rgb(_uyvy(t, 2, 4)[0])
    finally:
        conversions._cv_bridge.cache_clear()
