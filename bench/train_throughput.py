"""Training throughput with and without the frozen-backbone feature cache, side by side.

Both modes run the real ``Trainer`` code path (data loading, ``_train_step``: forward, losses,
backward, SGD step) on the same data and model:

* ``images``: decoded, augmented images through backbone + head every step (official pipeline);
* ``cached``: keys-only samples, features read from the cache (built first, timed separately),
  the backbone never runs.

Reports the median seconds per step over ``--steps`` timed steps (after ``--warmup``) as
samples/s, plus the cache build rate and size. Without ``--data`` a tiny AGD-Synth dataset is
generated in a temporary folder.

Usage::

    python bench/train_throughput.py                                   # locate_test, 64 px
    python bench/train_throughput.py --model locate_imgfocus --image-size 224 --size 4
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installation
    sys.path.insert(0, str(REPO))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--model', default='locate_test',
                   help='registry name (default: %(default)s; locate_imgfocus = real backbone)')
    p.add_argument('--data', help='AGD20K-layout root; default: generate AGD-Synth in a temp dir')
    p.add_argument('--size', default='tiny', help="AGD-Synth size when generating: 'tiny', "
                   "'demo' or images per folder (default: %(default)s)")
    p.add_argument('--split', default='Seen', help='data split (default: %(default)s)')
    p.add_argument('--image-size', type=int, default=0,
                   help='input side; default 64 for *_test models, else 224')
    p.add_argument('--batch-size', type=int, default=8, help='default: %(default)s')
    p.add_argument('--steps', type=int, default=5, help='timed steps per mode (default: '
                   '%(default)s)')
    p.add_argument('--warmup', type=int, default=1, help='untimed steps first (default: '
                   '%(default)s)')
    p.add_argument('--num-workers', type=int, default=0, help='DataLoader workers (default: '
                   '%(default)s)')
    p.add_argument('--threads', type=int, default=0, help='torch CPU threads (0 = default)')
    p.add_argument('--device', default='cpu', help='cpu | cuda | auto (default: %(default)s)')
    return p


def _time_steps(trainer: Any, dataset: Any, steps: int, warmup: int) -> list[float]:
    """Seconds per step (batch fetch included) for ``steps`` steps after ``warmup``."""
    loader = trainer._loader(dataset, 0)
    trainer.task.train()
    times: list[float] = []
    it = iter(loader)
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            it = iter(trainer._loader(dataset, i))
            batch = next(it)
        trainer._train_step(batch, 1)
        if trainer.device.type == 'cuda':
            import torch
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from affordance_core.config import ExperimentConfig, load_config
    from affordance_core.engine import feature_cache as fc
    from affordance_core.engine.trainer import Trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory(prefix='train_throughput_')
    root = args.data
    if root is None:
        from affordance_core.data.synth import generate
        root = str(Path(tmp.name) / 'synth')
        size = int(args.size) if str(args.size).isdigit() else args.size
        generate(root, size=size, seed=0, progress=False, splits=(args.split,))
    image_size = args.image_size or (64 if args.model.endswith('_test') else 224)
    common = [f'model.name={args.model}', f'data.root={root}', f'data.split={args.split}',
              f'data.image_size={image_size}', f'data.resize={image_size + image_size // 7}',
              f'data.num_workers={args.num_workers}', f'train.batch_size={args.batch_size}',
              f'train.device={args.device}', 'train.tensorboard=false', 'train.eval_every=0',
              'losses=[{name: cross_entropy}, {name: prototype, start_epoch: 1}, '
              '{name: concentration, weight: 0.07}]']
    results: dict[str, Any] = {'model': args.model, 'image_size': image_size,
                               'batch_size': args.batch_size, 'threads': torch.get_num_threads()}
    plain = Trainer(load_config(ExperimentConfig, None, common + [
        f'train.output_dir={tmp.name}/plain']), progress=False)
    results['images'] = _time_steps(plain, plain.train_set, args.steps, args.warmup)
    del plain

    cached = Trainer(load_config(ExperimentConfig, None, common + [
        f'train.output_dir={tmp.name}/cached', 'train.cache_features=true']), progress=False)
    cached._open_caches()
    keys = cached.train_set.image_keys()
    t0 = time.perf_counter()
    fc.fill(cached.train_cache, cached.model.backbone, cached.train_set.load_key, keys,
            device=cached.device, batch_size=32, num_workers=args.num_workers)
    results['cache_build_s'] = time.perf_counter() - t0
    results['cache_images'] = len(keys)
    results['cache_mb'] = cached.train_cache.nbytes / 2**20
    results['cached'] = _time_steps(cached, cached.keys_set, args.steps, args.warmup)
    tmp.cleanup()
    return results


def report(res: dict[str, Any]) -> str:
    bs = res['batch_size']
    rows = []
    for mode, label in (('images', 'images (backbone every step)'),
                        ('cached', 'cached features (no backbone)')):
        med = statistics.median(res[mode])
        rows.append(f'| {label} | {bs / med:.1f} | {1000 * med:.0f} | {len(res[mode])} |')
    speedup = statistics.median(res['images']) / statistics.median(res['cached'])
    return '\n'.join([
        f"training throughput: {res['model']}, {res['image_size']} px, batch {bs}, "
        f"{res['threads']} CPU thread(s)",
        '',
        '| mode | samples/s | ms/step (median) | steps |',
        '| --- | ---: | ---: | ---: |',
        *rows,
        '',
        f'speed-up with the cache: {speedup:.1f}x; cache build: {res["cache_images"]} image '
        f'views in {res["cache_build_s"]:.1f} s '
        f'({res["cache_images"] / max(res["cache_build_s"], 1e-9):.1f} img/s), '
        f'{res["cache_mb"]:.1f} MiB (float16)',
    ])


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.steps < 1 or args.batch_size < 1 or args.warmup < 0:
        print('train_throughput: --steps and --batch-size must be >= 1, --warmup >= 0',
              file=sys.stderr)
        return 2
    print(report(run(args)))
    return 0


if __name__ == '__main__':
    sys.exit(main())
