"""affordance-ground: one RGB(-D) frame -> affordance heatmaps, grasp points and 3-D grasp poses.

Example::

    affordance-ground --checkpoint runs/locate_seen/best.pt --image color.png \\
        --depth depth.png --intrinsics camera.json --depth-scale 5000 \\
        --action hold --action cut_with --out ground_out/

writes ``<out>/overlay.png`` (one panel per action: the heatmap over the image, the grasp
points numbered best first, and for grasps with valid 3-D the approach arrow into the surface
(magenta, 10 cm long before projection) and the closing axis across the width (green)) and
``<out>/grasps.json`` (all grasps, best first, in the RGB camera optical frame, quaternions
x, y, z, w; see ``inference/pipeline.py``). ``--cloud`` also writes ``cloud_<action>.npy``
((N, 4) float32 x, y, z, heat). User errors (missing or unreadable files, bad intrinsics,
unknown action, bad values) exit with code 2 and one line on stderr.

Intrinsics JSON: any of ``{"K": [[fx, 0, cx], [0, fy, cy], [0, 0, 1]]}`` (or 9 row-major values,
also under ``"k"`` as in ROS camera_info), ``{"fx": .., "fy": .., "cx": .., "cy": ..}``, or
Open3D's ``{"intrinsic_matrix": [9 values, column-major]}``; optional ``"width"`` and
``"height"`` give the image size K belongs to, and K is rescaled when the image differs.
A raw (unrectified) image's lens distortion may come along as ``"d"`` (or ``"D"``, as in ROS
camera_info) with ``"distortion_model"`` (``plumb_bob`` by default, ``rational_polynomial``,
``equidistant``): the 3-D lifting then undoes it.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from affordance_core.cli import user_error

PROG = 'affordance-ground'
APPROACH_ARROW_M = 0.10  # length of the drawn approach arrow before projection (metres)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``affordance-ground``."""
    p = argparse.ArgumentParser(
        prog=PROG, description='Ground affordances in one RGB(-D) frame: heatmaps, grasp points '
        'and (with depth) 3-D grasp poses in the camera optical frame.')
    p.add_argument('--checkpoint', required=True, help='checkpoint (.pt) written by '
                   'affordance-train (class names and weights)')
    p.add_argument('--image', required=True, help='RGB image (png/jpg/...; any size)')
    p.add_argument('--depth', help='depth registered to the image: 16-bit PNG/TIFF '
                   '(--depth-scale units per metre, 0 = invalid), 32-bit float TIFF or .npy '
                   '(metres; uint16 .npy uses --depth-scale); the same size as the image or a '
                   'scaled copy (e.g. half size). Needs --intrinsics')
    p.add_argument('--intrinsics', help='JSON with the 3x3 intrinsic matrix of the RGB image '
                   '("K", "k", fx/fy/cx/cy or Open3D "intrinsic_matrix")')
    p.add_argument('--action', action='append', required=True, metavar='A',
                   help='affordance name among the checkpoint classes; repeat for several')
    p.add_argument('--out', required=True, help='output folder (created)')
    p.add_argument('--backend', default='auto',
                   choices=('auto', 'torch', 'onnxruntime', 'tensorrt'),
                   help='inference runtime (default: auto = fastest available)')
    p.add_argument('--onnx', help='exported .onnx for --backend onnxruntime (default: export '
                   'the checkpoint once into the cache)')
    p.add_argument('--engine', help='TensorRT engine for --backend tensorrt')
    p.add_argument('--device', default='auto', help='auto | cpu | cuda | cuda:N (default: auto)')
    p.add_argument('--depth-scale', type=float, default=1000.0,
                   help='units per metre of 16-bit depth (default 1000 = millimetres; TUM RGB-D '
                   'uses 5000)')
    p.add_argument('--min-depth', type=float, default=0.1, help='metres (default 0.1)')
    p.add_argument('--max-depth', type=float, default=4.0, help='metres (default 4.0)')
    p.add_argument('--top-k', type=int, default=5, help='grasps per action (default 5)')
    p.add_argument('--min-score', type=float, default=0.2,
                   help='minimum heat of a grasp point in [0, 1] (default 0.2)')
    p.add_argument('--nms-radius', type=float, default=32.0,
                   help='minimum distance between grasp points, image pixels (default 32)')
    p.add_argument('--flip-tta', action='store_true',
                   help='average with the horizontally flipped image (2 model runs)')
    p.add_argument('--cloud', action='store_true',
                   help='also write cloud_<action>.npy ((N, 4) x, y, z, heat; needs --depth)')
    return p


# ---------------------------------------------------------------------------------- inputs


def read_rgb(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB image from a file (8-bit; 16-bit images are scaled to 8 bits)."""
    import cv2

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'image not found: {path}')
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ValueError(f'{path}: not a readable image')
    if img.dtype == np.uint16:
        img = (img / 257.0).round().astype(np.uint8)
    if img.dtype != np.uint8:
        raise ValueError(f'{path}: expected an 8-bit colour image, got dtype {img.dtype}')
    if img.ndim == 2:
        return np.repeat(img[:, :, None], 3, axis=2)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_depth(path: str | Path) -> np.ndarray:
    """(H, W) uint16 or float32 depth from a PNG/TIFF (read unchanged) or a .npy file."""
    import cv2

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'depth image not found: {path}')
    if path.suffix.lower() == '.npy':
        try:
            depth = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise ValueError(f'{path}: not a readable .npy array ({exc})') from None
    else:
        depth = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if depth is None:
            raise ValueError(f'{path}: not a readable depth image')
    if depth.ndim == 3 and depth.shape[2] > 1:
        raise ValueError(f'{path}: depth must have one channel, got shape {depth.shape}; save '
                         'it as a 16-bit grey PNG (millimetres) or a float32 TIFF / .npy '
                         '(metres)')
    if depth.dtype == np.float64:
        depth = depth.astype(np.float32)
    return depth


def read_distortion(path: str | Path) -> dict[str, Any]:
    """The pipeline's lens keywords (``D``, ``distortion_model``) from an intrinsics JSON;
    empty when it has no (or an all-zero) ``"d"`` / ``"D"``.

    Raises:
        ValueError: malformed coefficients or an unsupported model.
    """
    from affordance_core.inference.distortion import check_distortion

    data = json.loads(Path(path).read_text())
    key = next((k for k in ('d', 'D') if k in data), None)
    if key is None:
        return {}
    try:
        dist = check_distortion(data[key], data.get('distortion_model', 'plumb_bob'))
    except ValueError as exc:
        raise ValueError(f'{path}: {exc}') from None
    return {} if dist is None else {'D': dist.coeffs, 'distortion_model': dist.model}


def read_intrinsics(path: str | Path, image_size: tuple[int, int] | None = None) -> np.ndarray:
    """3x3 K from a JSON file (formats in the module docstring).

    Args:
        path: JSON file.
        image_size: (width, height) of the RGB image; when the JSON names another width and
            height, K is rescaled to the image (half-pixel convention).

    Raises:
        FileNotFoundError, ValueError: missing file, bad JSON, unknown layout, bad matrix.
    """
    from affordance_core.inference import geometry as geo

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'intrinsics file not found: {path}')
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f'{path}: not valid JSON ({exc})') from None
    if not isinstance(data, dict):
        raise ValueError(f'{path}: expected a JSON object with "K", "k", "fx"/"fy"/"cx"/"cy" or '
                         '"intrinsic_matrix"')
    try:
        if 'K' in data or 'k' in data:
            K = np.asarray(data['K' if 'K' in data else 'k'], dtype=np.float64)
            K = K.reshape(3, 3) if K.size == 9 else K
        elif 'intrinsic_matrix' in data:  # Open3D PinholeCameraIntrinsic: column-major
            K = np.asarray(data['intrinsic_matrix'], dtype=np.float64).reshape(3, 3).T
        elif all(k in data for k in ('fx', 'fy', 'cx', 'cy')):
            K = np.array([[data['fx'], 0.0, data['cx']], [0.0, data['fy'], data['cy']],
                          [0.0, 0.0, 1.0]], dtype=np.float64)
        else:
            raise ValueError(f'{path}: no intrinsics found; give "K" (3x3), "k" (9 values), '
                             'fx/fy/cx/cy, or Open3D "intrinsic_matrix"')
    except (TypeError, ValueError) as exc:
        if 'no intrinsics found' in str(exc):
            raise
        raise ValueError(f'{path}: malformed intrinsics ({exc})') from None
    try:
        K = geo.check_intrinsics(K)
    except ValueError as exc:
        raise ValueError(f'{path}: {exc}') from None
    if image_size is not None and 'width' in data and 'height' in data:
        src = (int(data['width']), int(data['height']))
        if src != tuple(image_size):
            if abs(src[0] * image_size[1] - src[1] * image_size[0]) > max(src):
                raise ValueError(f'{path}: intrinsics are for {src[0]}x{src[1]} but the image '
                                 f'is {image_size[0]}x{image_size[1]} (another aspect ratio)')
            logging.getLogger(__name__).info('rescaling K from %dx%d to %dx%d', *src,
                                             *image_size)
            K = geo.scale_intrinsics(K, src, image_size)
    return K


# ---------------------------------------------------------------------------------- drawing


def draw_grasps(rgb: np.ndarray, heatmap: np.ndarray, grasps: Sequence[Any],
                K: np.ndarray | None = None, *, D: Any = None,
                distortion_model: str = 'plumb_bob') -> np.ndarray:
    """Heatmap overlay with grasp points, approach arrows and closing axes.

    Args:
        rgb: (H, W, 3) uint8 RGB image.
        heatmap: (H, W) float map in [0, 1].
        grasps: ``Grasp`` objects of one action, best first (numbered 1, 2, ...).
        K: (3, 3) intrinsics used to project the 3-D arrows (only grasps with ``valid_3d``).
        D, distortion_model: the lens distortion of a raw ``rgb`` (as the pipeline takes
            them): the arrows are projected through it, so they meet the drawn points.

    Returns:
        (H, W, 3) uint8 RGB image.
    """
    import cv2

    from affordance_core.inference.distortion import check_distortion, project_distorted
    from affordance_core.inference.geometry import project
    from affordance_core.viz import overlay

    dist = check_distortion(D, distortion_model)

    img = np.ascontiguousarray(overlay(rgb, heatmap, alpha=0.45))
    H, W = img.shape[:2]
    r = max(3, round(min(H, W) / 80))
    thick = max(1, round(min(H, W) / 240))
    font = cv2.FONT_HERSHEY_SIMPLEX
    fscale = max(0.35, min(H, W) / 900)

    def pt(x: np.ndarray) -> tuple[int, int] | None:
        if not np.all(np.isfinite(x)) or x[2] <= 1e-6:
            return None
        uv = project(x, K) if dist is None else project_distorted(x, K, dist)[0]
        return int(round(uv[0])), int(round(uv[1]))

    for rank, g in reversed(list(enumerate(grasps, 1))):  # best drawn last (on top)
        c = (int(round(g.u)), int(round(g.v)))
        if g.valid_3d and K is not None:
            p = np.array(g.position)
            R = g.rotation()
            if math.isfinite(g.width) and g.width > 0:
                a = pt(p - 0.5 * g.width * R[:, 0])
                b = pt(p + 0.5 * g.width * R[:, 0])
                if a and b:
                    cv2.line(img, a, b, (40, 220, 40), thick + 1, cv2.LINE_AA)
        cv2.circle(img, c, r + thick, (0, 0, 0), -1, cv2.LINE_AA)
        cv2.circle(img, c, r, (255, 255, 255) if g.valid_3d else (160, 160, 160), -1,
                   cv2.LINE_AA)
        if g.valid_3d and K is not None:
            start = pt(np.array(g.position) + APPROACH_ARROW_M * np.array(g.normal))
            if start:
                cv2.arrowedLine(img, start, c, (255, 0, 255), thick + 1, cv2.LINE_AA,
                                tipLength=0.3)
        cv2.putText(img, str(rank), (c[0] + r + 2, c[1] - r - 2), font, fscale, (0, 0, 0),
                    thick + 2, cv2.LINE_AA)
        cv2.putText(img, str(rank), (c[0] + r + 2, c[1] - r - 2), font, fscale,
                    (255, 255, 255), thick, cv2.LINE_AA)
    return img


# ---------------------------------------------------------------------------------- main


def _fail(msg: Any) -> int:
    return user_error(PROG, msg)


def main(argv: Sequence[str] | None = None) -> int:
    """Ground the actions in the frame; returns the process exit code (0 ok, 2 user error)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')

    from affordance_core.checkpoint import CheckpointError
    from affordance_core.export.tensorrt import EngineMismatchError
    from affordance_core.inference.pipeline import GroundingPipeline
    from affordance_core.viz import save_image, side_by_side

    user_errors = (FileNotFoundError, ValueError, CheckpointError, ImportError,
                   EngineMismatchError)
    try:
        if args.top_k < 0:
            raise ValueError(f'--top-k must be >= 0, got {args.top_k}')
        if args.depth is not None and args.intrinsics is None:
            raise ValueError('--depth needs --intrinsics (the 3x3 K of the RGB image)')
        if args.cloud and args.depth is None:
            raise ValueError('--cloud needs --depth and --intrinsics')
        if not Path(args.checkpoint).is_file():
            raise FileNotFoundError(f'checkpoint not found: {args.checkpoint}')
        rgb = read_rgb(args.image)
        H, W = rgb.shape[:2]
        K = read_intrinsics(args.intrinsics, (W, H)) if args.intrinsics else None
        lens = read_distortion(args.intrinsics) if args.intrinsics else {}
        depth = read_depth(args.depth) if args.depth else None
        pipe = GroundingPipeline.from_checkpoint(
            args.checkpoint, backend=args.backend, device=args.device, onnx_path=args.onnx,
            engine_path=args.engine, depth_scale=args.depth_scale, min_depth=args.min_depth,
            max_depth=args.max_depth, top_k=args.top_k, min_score=args.min_score,
            nms_radius=args.nms_radius, flip_tta=args.flip_tta, return_cloud=args.cloud)
        result = pipe(rgb, depth=depth, K=K, actions=args.action, **lens)
    except user_errors as exc:
        return _fail(exc)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    actions = list(result.heatmaps)
    panels = [draw_grasps(rgb, result.heatmaps[a], result.grasps_by_action[a], K, **lens)
              for a in actions]
    labels = [f'{a}: ' + (f'best {result.grasps_by_action[a][0].score:.2f}'
                          if result.grasps_by_action[a] else 'no grasp') for a in actions]
    overlay_path = save_image(out / 'overlay.png', side_by_side(panels, labels))
    doc = {
        'image': str(args.image), 'depth': args.depth, 'checkpoint': str(args.checkpoint),
        'backend': getattr(pipe.backend, 'name', type(pipe.backend).__name__),
        'image_size': [W, H], 'actions': actions,
        'K': None if K is None else K.tolist(),
        'frame': 'RGB camera optical frame: x right, y down, z forward; metres',
        'conventions': {'quaternion': 'x, y, z, w; grasp z axis = approach into the surface '
                        '(-normal), x = closing direction, y = z cross x',
                        'uv': 'sub-pixel image coordinates, pixel centres at integers',
                        'invalid_3d': 'valid_3d false: position, normal, quaternion, width, '
                        'depth_spread are null'},
        'timings_ms': {k: round(v, 3) for k, v in result.timings.items()},
        'grasps': [dict(rank=i, **g.to_dict()) for i, g in enumerate(result.grasps, 1)],
    }
    (out / 'grasps.json').write_text(json.dumps(doc, indent=2))
    if args.cloud and result.cloud is not None:
        for a, cloud in result.cloud.items():
            np.save(out / f'cloud_{a}.npy', cloud)

    for i, g in enumerate(result.grasps, 1):
        where = (f'xyz=({g.position[0]:+.3f}, {g.position[1]:+.3f}, {g.position[2]:.3f}) m '
                 f'width={g.width:.3f} m' if g.valid_3d else 'no 3-D')
        print(f'{i:2d}. {g.action:<12s} score={g.score:.3f} uv=({g.u:.1f}, {g.v:.1f}) {where}')
    if not result.grasps:
        print('no grasp above --min-score')
    print(f'wrote {overlay_path} and {out / "grasps.json"}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
