"""Write RGB-D sequences into rosbag2 files (no ROS needed; ``rosbags``).

The bags look like a RealSense recording with ``align_depth.enable:=true``: colour
(``rgb8``), depth registered to it (``16UC1`` millimetres) and the colour CameraInfo, all with
the same stamp and optical ``frame_id``. ``make demo`` records the AGD-Synth scene of
``affordance_core.data.rgbd_scene`` this way and replays it through the node's code; the tests
build bags from the real frames in ``../shared/data/rgbd`` with it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Protocol

import numpy as np

from affordance_ros.conversions import numpy_to_image
from affordance_ros.msgtypes import BagMessageTypes, MessageTypes

IMAGE_TOPIC = '/camera/camera/color/image_raw'
DEPTH_TOPIC = '/camera/camera/aligned_depth_to_color/image_raw'
INFO_TOPIC = '/camera/camera/color/camera_info'
FRAME_ID = 'camera_color_optical_frame'
STORAGES = ('mcap', 'sqlite3')


class FrameLike(Protocol):
    rgb: np.ndarray        # (H, W, 3) uint8 RGB
    depth_mm: np.ndarray   # (H, W) uint16 millimetres, 0 invalid
    K: np.ndarray          # (3, 3)
    stamp_ns: int


def camera_info_msg(K: np.ndarray, height: int, width: int, header: Any,
                    types: MessageTypes) -> Any:
    """sensor_msgs/CameraInfo of an undistorted pinhole camera (D empty, R = I, P = [K | 0])."""
    K = np.asarray(K, np.float64).reshape(3, 3)
    P = np.concatenate([K, np.zeros((3, 1))], axis=1)
    roi = types.make('sensor_msgs/msg/RegionOfInterest', x_offset=0, y_offset=0, height=0,
                     width=0, do_rectify=False)
    return types.make('sensor_msgs/msg/CameraInfo', header=header, height=int(height),
                      width=int(width), distortion_model='plumb_bob',
                      d=types.f64_array(np.zeros(5)), k=types.f64_array(K),
                      r=types.f64_array(np.eye(3)), p=types.f64_array(P), binning_x=0,
                      binning_y=0, roi=roi)


def storage_plugin(storage: str) -> Any:
    """rosbags StoragePlugin for 'mcap' or 'sqlite3' (.db3)."""
    from rosbags.rosbag2 import StoragePlugin

    if storage not in STORAGES:
        raise ValueError(f"unknown storage '{storage}'; expected one of {', '.join(STORAGES)}")
    return StoragePlugin.MCAP if storage == 'mcap' else StoragePlugin.SQLITE3


def write_rgbd_bag(path: str | Path, frames: Iterable[FrameLike], *, storage: str = 'mcap',
                   frame_id: str = FRAME_ID, image_topic: str = IMAGE_TOPIC,
                   depth_topic: str = DEPTH_TOPIC, info_topic: str = INFO_TOPIC,
                   types: BagMessageTypes | None = None) -> Path:
    """Write colour, depth and camera_info of every frame into a new rosbag2 folder ``path``.

    Returns:
        ``path``. Raises FileExistsError when it exists (rosbags never overwrites a bag).
    """
    from rosbags.rosbag2 import Writer

    path = Path(path)
    if path.exists():
        raise FileExistsError(f'{path} exists already; rosbag2 output is never overwritten')
    types = types or BagMessageTypes()
    ts = types.typestore
    with Writer(path, version=9, storage_plugin=storage_plugin(storage)) as writer:
        conns = {topic: writer.add_connection(topic, msgtype, typestore=ts)
                 for topic, msgtype in ((image_topic, 'sensor_msgs/msg/Image'),
                                        (depth_topic, 'sensor_msgs/msg/Image'),
                                        (info_topic, 'sensor_msgs/msg/CameraInfo'))}
        for frame in frames:
            header = types.header(frame.stamp_ns, frame_id)
            h, w = frame.rgb.shape[:2]
            msgs = ((image_topic, numpy_to_image(frame.rgb, 'rgb8', header, types)),
                    (depth_topic, numpy_to_image(frame.depth_mm, '16UC1', header, types)),
                    (info_topic, camera_info_msg(frame.K, h, w, header, types)))
            for topic, msg in msgs:
                writer.write(conns[topic], frame.stamp_ns,
                             ts.serialize_cdr(msg, conns[topic].msgtype))
    return path
