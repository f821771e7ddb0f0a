"""affordance-c2am: train C2AM (class-agnostic object prior) and extract object boxes with it.

Examples::

    affordance-c2am train --config training/configs/c2am_seen.yaml data.root=data/AGD20K
    affordance-c2am train --config training/configs/c2am_synth_demo.yaml --resume
    affordance-c2am boxes --checkpoint runs/c2am_seen/last.pt --images photos/ --out boxes/
    affordance-c2am boxes --checkpoint runs/c2am_seen/last.pt --data data/AGD20K --split Seen \\
        --out boxes_seen/ --threshold 0.3

``train`` is ``affordance-train`` (the shared Trainer; same options) with the C2AM models and
losses registered. ``boxes`` runs the polarity-corrected object map of every image (test
transform: Resize((S, S))) and writes ``<out>/boxes.json`` (one box per image, C2AM's WSOL rule:
largest contour of ``map > threshold * max``, ``ops.boxes``), in pixels of the original image
and normalised to [0, 1], plus ``<out>/overlays/NNN_<name>.png`` (object map over the image with
the box) for the first ``--num-overlays`` images. User errors exit with code 2 and one line on
stderr.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from affordance_core.cli import user_error

PROG = 'affordance-c2am'
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff')
BOX_COLOR = (0, 255, 0)

logger = logging.getLogger(PROG)


def build_parser() -> argparse.ArgumentParser:
    """The ``boxes`` command line (``train`` forwards its arguments to ``affordance-train``)."""
    p = argparse.ArgumentParser(
        prog=f'{PROG} boxes', description='Object boxes from a C2AM checkpoint: boxes.json and '
        'overlay PNGs.')
    p.add_argument('--checkpoint', required=True, help='C2AM checkpoint (.pt) written by '
                   'affordance-c2am train / affordance-train')
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument('--images', help='folder of images (searched recursively)')
    src.add_argument('--data', help='AGD20K-style root: the egocentric test images of --split')
    p.add_argument('--split', default='Seen', help='Seen | Unseen | HICO-IIF (with --data)')
    p.add_argument('--out', required=True, help='output folder (created)')
    p.add_argument('--threshold', type=float, default=0.5,
                   help='box threshold tau in [0, 1]: the cut is tau * max (default 0.5)')
    p.add_argument('--image-size', type=int, default=0, help='network input side S (default: '
                   'the checkpoint config, else 224)')
    p.add_argument('--device', default='auto', help='auto | cpu | cuda | cuda:N (default: auto)')
    p.add_argument('--batch-size', type=int, default=16)
    p.add_argument('--max-images', type=int, default=0, help='process only the first N images '
                   '(0 = all)')
    p.add_argument('--num-overlays', type=int, default=16, help='overlay PNGs to write '
                   '(default 16; -1 = all)')
    return p


def _usage() -> str:
    return (f'usage: {PROG} {{train,boxes}} ...\n\n'
            '  train   train C2AM with the shared trainer (options of affordance-train; '
            f'{PROG} train --help)\n'
            f'  boxes   object boxes + overlays from a checkpoint ({PROG} boxes --help)\n')


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``affordance-c2am``; returns the exit code (0 ok, 2 user error)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        return user_error(PROG, f"missing command: 'train' or 'boxes' (see {PROG} --help)")
    if args[0] in ('-h', '--help'):
        print(_usage(), end='')
        return 0
    command, rest = args[0], args[1:]
    if command == 'train':
        import affordance_core.models.c2am  # noqa: F401  (registers models and losses)
        from affordance_core.cli import train as train_cli

        return train_cli.main(rest)
    if command == 'boxes':
        return boxes_main(rest)
    return user_error(PROG, f"unknown command '{command}'; expected 'train' or 'boxes'")


# ------------------------------------------------------------------------------------ boxes


def _resolve_device(name: str) -> str:
    import torch

    if name == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    if name.startswith('cuda') and not torch.cuda.is_available():
        raise ValueError(f'--device {name}: CUDA is not available on this machine; use cpu')
    return name


def _safe_name(key: str) -> str:
    key = re.sub(r'\.(png|jpe?g|bmp|webp|tiff?)$', '', key, flags=re.IGNORECASE)
    return re.sub(r'[^A-Za-z0-9._-]+', '_', key)[:120]


def _folder_items(folder: Path, size: int, limit: int) -> Iterator[dict[str, Any]]:
    """``{'key', 'path', 'rgb', 'image'}`` for the images under ``folder`` (sorted)."""
    from affordance_core.cli.ground import read_rgb
    from affordance_core.data.transforms import preprocess_rgb

    files = sorted(p for p in folder.rglob('*') if p.is_file()
                   and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f'no image ({", ".join(IMAGE_SUFFIXES)}) under {folder}')
    if limit > 0:
        files = files[:limit]
    for path in files:
        try:
            rgb = read_rgb(path)
        except ValueError as exc:
            logger.warning('skipping %s: %s', path, exc)
            continue
        yield {'key': path.relative_to(folder).as_posix(), 'path': str(path), 'rgb': rgb,
               'image': preprocess_rgb(rgb, size)}


def _agd_items(root: str, split: str, size: int, limit: int) -> Iterator[dict[str, Any]]:
    """The egocentric test images of an AGD20K split (each file once)."""
    from affordance_core.cli.ground import read_rgb
    from affordance_core.data.agd20k import AGD20KTest

    dataset = AGD20KTest(root, split, image_size=size)
    seen: set[str] = set()
    for i in range(len(dataset)):
        item = dataset[i]
        if item['path'] in seen:
            continue
        seen.add(item['path'])
        if limit > 0 and len(seen) > limit:
            return
        key = Path(os.path.relpath(os.path.abspath(item['path']), os.path.abspath(root)))
        key = key.as_posix()
        yield {'key': key, 'path': item['path'], 'rgb': read_rgb(item['path']),
               'image': item['image']}


def _batches(items: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def draw_box(rgb: np.ndarray, box: Sequence[float], color: tuple[int, int, int] = BOX_COLOR,
             thickness: int = 2) -> np.ndarray:
    """Copy of ``rgb`` with the box (x0, y0, x1, y1) drawn (RGB colour)."""
    import cv2

    out = np.ascontiguousarray(rgb).copy()
    x0, y0, x1, y1 = (int(round(float(v))) for v in box)
    cv2.rectangle(out, (x0, y0), (x1, y1), tuple(int(c) for c in color), thickness)
    return out


def boxes_main(argv: Sequence[str]) -> int:
    """``affordance-c2am boxes``; returns the exit code."""
    try:
        args = build_parser().parse_args(list(argv))
    except SystemExit as exc:  # --help (0) or argparse's own usage error (2)
        return int(exc.code or 0)
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    if not 0.0 <= args.threshold <= 1.0:
        return user_error(PROG, f'--threshold must lie in [0, 1], got {args.threshold}')
    if args.batch_size < 1:
        return user_error(PROG, f'--batch-size must be >= 1, got {args.batch_size}')
    try:
        return _run_boxes(args)
    except (FileNotFoundError, ValueError) as exc:
        return user_error(PROG, exc)


def _run_boxes(args: argparse.Namespace) -> int:
    import torch

    import affordance_core.models.c2am  # noqa: F401  (registers the c2am_* models)
    from affordance_core.checkpoint import CheckpointError, load_checkpoint
    from affordance_core.ops.boxes import boxes_from_scoremap
    from affordance_core.viz import overlay, save_image

    device = _resolve_device(args.device)
    try:
        model = load_checkpoint(args.checkpoint, map_location=device)
    except CheckpointError as exc:
        raise ValueError(str(exc)) from None
    if not callable(getattr(model, 'object_map', None)):
        raise ValueError(f"{args.checkpoint} holds model '{getattr(model, 'registry_name', '?')}'"
                         ', which has no object map; pass a C2AM checkpoint (c2am_*)')
    size = args.image_size or int(((getattr(model, 'checkpoint_config', None) or {})
                                   .get('data', {}) or {}).get('image_size', 224))
    if args.images:
        folder = Path(args.images)
        if not folder.is_dir():
            raise FileNotFoundError(f'image folder not found: {folder}')
        items = _folder_items(folder, size, args.max_images)
    else:
        items = _agd_items(args.data, args.split, size, args.max_images)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records: dict[str, Any] = {}
    n_overlays = 0
    for batch in _batches(items, args.batch_size):
        images = torch.stack([it['image'] for it in batch]).to(device)
        with torch.no_grad():
            maps = model.object_map(images).float().cpu().numpy()
        for item, obj in zip(batch, maps):
            height, width = item['rgb'].shape[:2]
            scale = (width / obj.shape[1], height / obj.shape[0])
            box = boxes_from_scoremap(np.clip(obj, 0.0, 1.0), [args.threshold], scale)[0][0]
            records[item['key']] = {
                'path': item['path'], 'width': width, 'height': height,
                'box': [round(float(v), 3) for v in box],
                'box_norm': [round(float(box[0]) / width, 6), round(float(box[1]) / height, 6),
                             round(float(box[2]) / width, 6), round(float(box[3]) / height, 6)],
            }
            if args.num_overlays < 0 or n_overlays < args.num_overlays:
                img = draw_box(overlay(item['rgb'], np.clip(obj, 0.0, 1.0)), box)
                save_image(out / 'overlays' / f'{n_overlays:03d}_{_safe_name(item["key"])}.png',
                           img)
                n_overlays += 1
    if not records:
        raise ValueError('no readable image to process')
    result = {'checkpoint': str(args.checkpoint), 'model': getattr(model, 'registry_name', ''),
              'threshold': args.threshold, 'image_size': size,
              'flipped': bool(getattr(model, 'flipped', False)),
              'box_format': 'x0, y0, x1, y1 in original-image pixels; box_norm divided by '
                            'width / height', 'boxes': records}
    (out / 'boxes.json').write_text(json.dumps(result, indent=2) + '\n')
    logger.info('wrote %d boxes to %s and %d overlays to %s', len(records), out / 'boxes.json',
                n_overlays, out / 'overlays')
    return 0


if __name__ == '__main__':
    sys.exit(main())
