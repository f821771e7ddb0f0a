"""RGB-D scene rendering (exact plane depth) and write_rgbd_bag round trips (.mcap / .db3)."""
from __future__ import annotations

import numpy as np
import pytest

from affordance_core.data.rgbd_scene import plane_depth, render_scene, table_plane
from affordance_ros.bagtools import (DEPTH_TOPIC, IMAGE_TOPIC, INFO_TOPIC,
                                     write_rgbd_bag)
from affordance_ros.conversions import camera_info_to_K, image_to_depth, image_to_rgb


def test_scene_depth_lies_on_the_table_or_the_object_plane() -> None:
    frames = render_scene(2, size=(96, 128), holes=0.0)
    f = frames[0]
    n, d = table_plane()
    u, v = np.meshgrid(np.arange(128.0), np.arange(96.0))
    z = f.depth_mm / 1000.0
    x = (u - f.K[0, 2]) / f.K[0, 0] * z
    y = (v - f.K[1, 2]) / f.K[1, 1] * z
    signed = n[0] * x + n[1] * y + n[2] * z - d  # 0 on the table, thickness on the objects
    valid = f.depth_mm > 0
    table = valid & ~f.object_mask
    assert np.abs(signed[table]).max() < 0.003  # mm rounding
    assert np.abs(signed[valid & f.object_mask] - 0.02).max() < 0.003
    assert f.object_mask.mean() > 0.05
    assert frames[1].stamp_ns - f.stamp_ns == 100_000_000  # 10 fps
    assert not np.array_equal(frames[1].rgb, f.rgb)  # objects move


def test_plane_depth_hand_value() -> None:
    K = np.array([[100.0, 0, 1.0], [0, 100.0, 1.0], [0, 0, 1]])
    z = plane_depth(np.array([0.0, 0.0, -1.0]), -2.0, K, (3, 3))  # z = 2 everywhere
    assert np.allclose(z, 2.0)
    z = plane_depth(np.array([0.0, 0.0, 1.0]), -2.0, K, (3, 3))  # behind the camera
    assert np.all(np.isinf(z))


@pytest.mark.parametrize('storage', ['mcap', 'sqlite3'])
def test_write_rgbd_bag_round_trip(tmp_path, storage) -> None:
    from rosbags.highlevel import AnyReader

    frames = render_scene(3, size=(48, 64))
    path = write_rgbd_bag(tmp_path / 'bag', frames, storage=storage)
    with AnyReader([path]) as reader:
        got: dict[str, list] = {}
        for conn, t, raw in reader.messages():
            got.setdefault(conn.topic, []).append((t, reader.deserialize(raw, conn.msgtype)))
    assert {len(v) for v in got.values()} == {3} and len(got) == 3
    topics = (IMAGE_TOPIC, DEPTH_TOPIC, INFO_TOPIC)
    (t0, image), (_, depth), (_, info) = (got[k][0] for k in topics)
    assert t0 == frames[0].stamp_ns
    assert image.header.frame_id == 'camera_color_optical_frame'
    assert np.array_equal(image_to_rgb(image), frames[0].rgb)
    assert np.array_equal(image_to_depth(depth), frames[0].depth_mm)
    assert np.allclose(camera_info_to_K(info, (48, 64)), frames[0].K)
    with pytest.raises(FileExistsError):
        write_rgbd_bag(path, frames, storage=storage)
