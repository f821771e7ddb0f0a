"""affordance-eval: score a checkpoint (and/or the centre prior) on an AGD20K / HICO-IIF test set.

Example::

    affordance-eval --checkpoint runs/locate_seen/best.pt --data data/AGD20K --split Seen \\
        --baseline center

prints the overall and per-class KLD / SIM / NSS and writes ``metrics.json``, ``metrics.md`` and
overlay PNGs into ``--out`` (default: ``eval_<checkpoint stem>_<split>/`` next to the checkpoint);
the centre prior's results go to ``<out>/center_prior/``. User errors (missing checkpoint or data
folder, bad split, class-list mismatch) exit with code 2 and one line on stderr.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from affordance_core.cli import user_error

PROG = 'affordance-eval'


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``affordance-eval``."""
    p = argparse.ArgumentParser(
        prog=PROG, description='Evaluate affordance grounding with the official AGD20K metrics '
        '(KLD, SIM, NSS; per-image mean over all test images).')
    p.add_argument('--checkpoint', help='checkpoint (.pt) written by affordance-train; may be '
                   'omitted with --baseline to score only the baseline')
    p.add_argument('--data', required=True, help='dataset root holding Seen/ and Unseen/ '
                   '(AGD20K) or the HICO-IIF folder')
    p.add_argument('--split', default='Seen', help='Seen | Unseen | HICO-IIF (default: Seen)')
    p.add_argument('--out', help='output folder (default: eval_<ckpt>_<split> next to the '
                   'checkpoint, or eval_center_<split> for a baseline-only run)')
    p.add_argument('--device', default='auto', help='auto | cpu | cuda | cuda:N (default: auto)')
    p.add_argument('--batch-size', type=int, default=16)
    p.add_argument('--num-workers', type=int, default=2)
    p.add_argument('--max-images', type=int, default=0, help='evaluate only the first N test '
                   'images (0 = all)')
    p.add_argument('--image-size', type=int, default=0, help='network input size (default: '
                   'the checkpoint config, else 224); metrics are always computed at 224')
    p.add_argument('--postprocess', default=None, choices=('locate', 'double'),
                   help="locate: resize + min-max (LOCATE family); double: min-max, resize, "
                   "min-max (Cross-View-AG / WSMA); default: the model's own path")
    p.add_argument('--num-overlays', type=int, default=8, help='overlay PNGs to write')
    p.add_argument('--baseline', choices=('center',), help='also score a model-free baseline')
    p.add_argument('--no-progress', action='store_true', help='hide the progress bar')
    return p


def _resolve_device(name: str) -> str:
    import torch

    if name == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    if name.startswith('cuda') and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use "
                         "--device cpu")
    try:
        torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a torch device (cpu, cuda, cuda:N)") from None
    return name


def main(argv: Sequence[str] | None = None) -> int:
    """Run the evaluation; returns the process exit code (0 ok, 2 user error)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')

    from affordance_core.checkpoint import CheckpointError, load_checkpoint
    from affordance_core.engine.evaluation import evaluate_baseline, evaluate_model
    from affordance_core.labels import classes_for
    from affordance_core.metrics.evaluator import format_comparison, format_table

    model = None
    try:
        for flag in ('batch_size', 'max_images', 'num_overlays', 'num_workers', 'image_size'):
            value = getattr(args, flag)
            if value < 0 or (flag == 'batch_size' and value == 0):
                raise ValueError(f"--{flag.replace('_', '-')} must be "
                                 f"{'positive' if flag == 'batch_size' else '>= 0'}, got {value}")
        classes = classes_for(args.split)
        if not args.checkpoint and not args.baseline:
            raise ValueError('nothing to evaluate: give --checkpoint, --baseline center, or both')
        root = Path(args.data)
        if not root.is_dir():
            raise FileNotFoundError(f'data folder not found: {root}')
        device = _resolve_device(args.device)
        image_size = args.image_size or 224
        if args.checkpoint:
            model = load_checkpoint(args.checkpoint, map_location=device)
            model_classes = getattr(model, 'classes', None)
            if model_classes and tuple(model_classes) != tuple(classes):
                raise ValueError(f'{args.checkpoint} was trained on {len(model_classes)} classes '
                                 f'that do not match split {args.split} ({len(classes)} classes); '
                                 'evaluate it on the split it was trained for')
            cfg = getattr(model, 'checkpoint_config', None) or {}
            if not args.image_size and isinstance(cfg.get('data'), dict):
                image_size = int(cfg['data'].get('image_size', 224) or 224)
            out = Path(args.out) if args.out else (
                Path(args.checkpoint).parent / f'eval_{Path(args.checkpoint).stem}_{args.split}')
        else:
            out = Path(args.out) if args.out else Path(f'eval_center_{args.split}')
        from affordance_core.data.agd20k import AGD20KTest

        dataset = AGD20KTest(root, args.split, image_size=image_size,
                             max_samples=args.max_images)
        if len(dataset) == 0:
            raise ValueError(f'no test images with GT found for split {args.split} under {root}')
    except (FileNotFoundError, ValueError, CheckpointError) as exc:
        return user_error(PROG, exc)

    results = {}
    common = dict(batch_size=args.batch_size, num_workers=args.num_workers,
                  num_overlays=args.num_overlays, progress=not args.no_progress)
    if model is not None:
        post = args.postprocess or str(getattr(model, 'postprocess', 'locate'))
        res = evaluate_model(model, dataset, device=device, out_dir=out, classes=classes,
                             postprocess=post, **common)
        print(f'\n{args.checkpoint} on {args.split} ({res["overall"]["count"]} images, '
              f'postprocess {post})')
        print(format_table(res))
        results[str(res.get('method', 'model'))] = res
    if args.baseline:
        base_out = out / 'center_prior' if model is not None else out
        res = evaluate_baseline(dataset, args.baseline, classes=classes, out_dir=base_out,
                                **common)
        if model is None:
            print(f'\ncenter prior on {args.split} ({res["overall"]["count"]} images)')
            print(format_table(res))
        results['center prior'] = res
    if len(results) > 1:
        print('\n' + format_comparison(results))
    print(f'\nresults written to {out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
