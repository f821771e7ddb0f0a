"""Synthetic RGB-D tabletop scenes of AGD-Synth objects (for the ROS replay demo and tests).

A pinhole camera looks down at a table plane; AGD-Synth objects (:func:`synth.render_object`)
lie flat on it, each raised by a thickness above the table, and drift slowly across the frames
(the camera is static). Depth is exact for this geometry: the table is a plane in the camera
frame and an object's top is the parallel plane ``thickness`` closer to the camera, so a grasp
lifted from it must land on one of these two planes.

Conventions: camera optical frame (x right, y down, z forward), metres; depth as 16UC1
millimetres with 0 where invalid (a few holes are punched like a structured-light sensor).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from affordance_core.data.synth import Pose, build_object, render_object

DEFAULT_OBJECTS = ('knife', 'cup', 'scissors')


@dataclass
class RGBDFrame:
    """One rendered frame.

    Attributes:
        rgb: (H, W, 3) uint8, RGB order.
        depth_mm: (H, W) uint16 millimetres, 0 = invalid.
        K: (3, 3) intrinsics.
        stamp_ns: capture time, nanoseconds.
        object_mask: (H, W) bool pixels covered by an object (their depth is the raised plane).
    """

    rgb: np.ndarray
    depth_mm: np.ndarray
    K: np.ndarray
    stamp_ns: int
    object_mask: np.ndarray


def table_plane(tilt_deg: float = 35.0, distance: float = 0.8) -> tuple[np.ndarray, float]:
    """Table plane ``n . p = d`` (n unit, toward the camera so d < 0) for a camera tilted down
    by ``tilt_deg`` whose optical axis meets the table ``distance`` metres away."""
    t = np.deg2rad(tilt_deg)
    n = np.array([0.0, -np.cos(t), -np.sin(t)])  # table normal seen from the camera: up, back
    point = np.array([0.0, 0.0, distance])
    return n, float(n @ point)


def plane_depth(n: np.ndarray, d: float, K: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) float64 depth z of the plane ``n . p = d`` along every pixel ray (inf if none)."""
    H, W = shape
    u, v = np.meshgrid(np.arange(W, dtype=np.float64), np.arange(H, dtype=np.float64))
    x = (u - K[0, 2]) / K[0, 0]
    y = (v - K[1, 2]) / K[1, 1]
    denom = n[0] * x + n[1] * y + n[2]
    with np.errstate(divide='ignore', invalid='ignore'):
        z = d / denom
    z[~(z > 0)] = np.inf
    return z


def render_scene(num_frames: int = 8, *, size: tuple[int, int] = (480, 640),
                 objects: tuple[str, ...] = DEFAULT_OBJECTS, thickness: float = 0.02,
                 fps: float = 10.0, start_ns: int = 1_700_000_000 * 10**9, seed: int = 0,
                 holes: float = 0.01) -> list[RGBDFrame]:
    """Render ``num_frames`` frames of AGD-Synth objects lying on a table.

    Args:
        num_frames: frames to render (>= 1).
        size: (H, W) of the RGB and depth images.
        objects: AGD-Synth object names placed left to right.
        thickness: metres between the table and the objects' top plane.
        fps: frame rate for the stamps.
        start_ns: stamp of the first frame.
        seed: object instances, colours and depth holes.
        holes: fraction of depth pixels set invalid (0) at random.

    Returns:
        list of :class:`RGBDFrame`.
    """
    if num_frames < 1:
        raise ValueError(f'num_frames must be >= 1, got {num_frames}')
    H, W = size
    f = 525.0 * W / 640.0
    K = np.array([[f, 0.0, (W - 1) / 2], [0.0, f, (H - 1) / 2], [0.0, 0.0, 1.0]])
    n, d = table_plane()
    z_table = plane_depth(n, d, K, size)
    z_top = plane_depth(n, d + thickness, K, size)  # the parallel plane closer to the camera
    rng = np.random.default_rng(seed)
    models = [build_object(name, rng) for name in objects]
    # a table-top gradient with wood-like stripes, fixed over the sequence
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    base = 150 + 40 * (yy / H) + 8 * np.sin(xx / 9.0 + 3 * np.sin(yy / 40.0))
    table = np.stack([base * 0.95, base * 0.8, base * 0.6], axis=2)
    frames = []
    for i in range(num_frames):
        canvas = np.clip(table, 0, 255).astype(np.uint8)[..., ::-1].copy()  # BGR canvas
        mask = np.zeros(size, bool)
        for j, model in enumerate(models):
            x = W * (j + 1) / (len(models) + 1) + 6.0 * i
            y = H * (0.55 + 0.05 * np.sin(i / 3.0 + j))
            pose = Pose(x=x, y=y, scale=0.42 * H, angle=20.0 * (j - 1) + 2.0 * i)
            mask |= render_object(canvas, model, pose).mask
        depth = np.where(mask, z_top, z_table)
        depth_mm = np.where(np.isfinite(depth), np.round(depth * 1000.0), 0)
        depth_mm[rng.random(size) < holes] = 0
        frames.append(RGBDFrame(rgb=canvas[..., ::-1].copy(),
                                depth_mm=np.clip(depth_mm, 0, 65535).astype(np.uint16),
                                K=K.copy(), stamp_ns=int(start_ns + i * 1e9 / fps),
                                object_mask=mask))
    return frames
