"""affordance-train: train an affordance-grounding model from a YAML recipe.

Example::

    affordance-train --config training/configs/locate_seen.yaml data.root=data/AGD20K \\
        train.output_dir=runs/locate_seen
    affordance-train --config training/configs/locate_seen.yaml --resume
                                                   # continue after the last completed epoch
    torchrun --nproc_per_node=2 -m affordance_core.cli.train --config ...   # multi-GPU (DDP)

User errors (missing or invalid config, unknown key, missing data or weights, nothing to resume)
exit with code 2 and one line on stderr.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import logging.handlers
import os
import sys
import textwrap
import typing
from typing import Any, Sequence

from affordance_core.cli import user_error

PROG = 'affordance-train'


class _UsageError(Exception):
    """argparse found a bad command line (reported as one line, exit 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # one line instead of usage + error
        raise _UsageError(message)


def _config_reference() -> str:
    """Every config key with its default, generated from the dataclasses (for --help)."""
    from affordance_core.config import ExperimentConfig

    lines = ['config keys (set in the YAML or override as section.key=value):']
    cfg = ExperimentConfig()
    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        if dataclasses.is_dataclass(value):
            items = ', '.join(f'{f.name}={getattr(value, f.name)!r}'
                              for f in dataclasses.fields(value))
            lines.append(textwrap.fill(f'{section.name}: {items}', 79, initial_indent='  ',
                                       subsequent_indent='      '))
        else:
            lines.append(textwrap.fill(
                f'{section.name}: list of {{name, weight, start_epoch}} loss terms, e.g. '
                "losses='[{name: cross_entropy}, {name: concentration, weight: 0.07}]'", 79,
                initial_indent='  ', subsequent_indent='      '))
    return '\n'.join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``affordance-train``."""
    p = _Parser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(
            'Train an affordance-grounding model (LOCATE, ...) on AGD20K-style data. Writes '
            'config.yaml, last.pt (every epoch, with the full train state), best.pt (best test '
            'epoch by train.select_by), history.json, training_curves.png and TensorBoard logs '
            '(tb/) into train.output_dir.', 79),
        epilog=_config_reference() + '\n\nexamples:\n'
        '  affordance-train --config training/configs/locate_seen.yaml data.root=data/AGD20K\n'
        '  affordance-train --config training/configs/locate_synth_demo.yaml train.epochs=2 '
        '--no-progress\n'
        '  affordance-train --config training/configs/locate_seen.yaml --resume\n'
        '  torchrun --nproc_per_node=2 -m affordance_core.cli.train --config <yaml>  (DDP)')
    p.add_argument('--config', required=True, metavar='YAML',
                   help='experiment recipe (e.g. training/configs/locate_seen.yaml)')
    p.add_argument('overrides', nargs='*', metavar='section.key=value',
                   help='config overrides applied after the YAML (values are YAML scalars, e.g. '
                   'train.epochs=3 optim.lr=1e-3 model.kwargs.aff_cam_thd=0.5); an unknown key '
                   'is an error')
    p.add_argument('--resume', action='store_true',
                   help='continue the run in train.output_dir from last.pt (exactly where it '
                   'stopped: same data order, RNG, optimizer and scheduler state)')
    p.add_argument('--no-progress', action='store_true', help='hide the tqdm progress bars')
    p.add_argument('--log-level', default='INFO',
                   choices=('DEBUG', 'INFO', 'WARNING', 'ERROR'),
                   help='logging verbosity (default: %(default)s)')
    p.add_argument('--print-config', action='store_true',
                   help='print the resolved config as YAML and exit without training')
    return p


def _fail(message: str) -> int:
    return user_error(PROG, message)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``affordance-train``; returns the exit code (0 ok, 2 user error, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        return _fail(f'{exc} (see {PROG} --help)')
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    level = getattr(logging, args.log_level)
    if os.environ.get('RANK', '0') not in ('', '0'):  # torchrun: rank 0 reports, others warn
        level = max(level, logging.WARNING)
    root = logging.getLogger()
    old_level = root.level
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(name)s: %(message)s'))
    # Set-up logs are held back until the set-up succeeded: a user error prints one line only.
    held = logging.handlers.MemoryHandler(capacity=1 << 20, flushLevel=logging.CRITICAL + 1,
                                          target=None, flushOnClose=False)
    root.addHandler(held)
    root.setLevel(level)
    try:
        return _run(args, held, stream)
    finally:
        for handler in (held, stream):
            root.removeHandler(handler)
        held.buffer.clear()
        root.setLevel(old_level)


def _run(args: argparse.Namespace, held: logging.handlers.MemoryHandler,
         stream: logging.Handler) -> int:
    import yaml

    from affordance_core.checkpoint import CheckpointError
    from affordance_core.config import ConfigError, ExperimentConfig, load_config, to_dict
    from affordance_core.engine.distributed import cleanup
    from affordance_core.engine.trainer import Trainer

    try:
        cfg = load_config(ExperimentConfig, args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as exc:
        return _fail(exc)
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end='')
        return 0
    try:
        try:
            trainer = Trainer(cfg, progress=not args.no_progress)
            if args.resume:
                trainer.resume()
        except (ValueError, FileNotFoundError, CheckpointError) as exc:
            return _fail(exc)
        root = logging.getLogger()
        held.setTarget(stream)
        held.flush()
        root.removeHandler(held)
        root.addHandler(stream)
        try:
            summary = trainer.fit(resume=args.resume)
        except KeyboardInterrupt:
            print(f'{PROG}: interrupted; continue with --resume (last.pt holds the last '
                  'completed epoch)', file=sys.stderr)
            return 130
    finally:
        cleanup()
    if trainer.is_main:
        _report(summary)
    return 0


def _report(summary: dict[str, Any]) -> None:
    log = logging.getLogger(PROG)
    best = summary.get('best')
    if best:
        log.info('done: %d epochs; best %s %.4f at epoch %s (KLD %.4f SIM %.4f NSS %.4f) -> %s',
                 summary['epochs'], summary['select_by'], summary['best_metric'],
                 summary['best_epoch'], best['KLD'], best['SIM'], best['NSS'],
                 summary['best_checkpoint'])
    else:
        log.info('done: %d epochs (no evaluation) -> %s', summary['epochs'],
                 summary['last_checkpoint'])


if __name__ == '__main__':
    sys.exit(main())
