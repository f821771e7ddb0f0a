"""affordance-synth: write an AGD-Synth dataset (procedural toy world) in the AGD20K layout.

Example::

    affordance-synth data/agd_synth --size demo --seed 0 --preview data/agd_synth/preview.png

writes ``Seen/`` and ``Unseen/`` (``trainset/{exocentric,egocentric}``, ``testset/egocentric``,
``testset/GT``) and ``synth_meta.json`` under OUT_DIR. The same seed gives byte-identical files.
User errors (bad size or seed, unwritable folder, a folder holding a foreign dataset) exit with
code 2 and one line on stderr.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import NoReturn, Sequence

from affordance_core.cli import user_error

PROG = 'affordance-synth'


class _UsageError(Exception):
    """Raised instead of argparse's print-usage-and-exit, so errors stay on one line."""


class _Exit(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            sys.stderr.write(message)
        raise _Exit(status)


def _size(text: str) -> str | int:
    if text in ('tiny', 'demo'):
        return text
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"'{text}' is not 'tiny', 'demo' or a positive integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f'{n} must be a positive integer (exocentric images '
                                         'per affordance/object folder)')
    return n


def _seed(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f'{n} must be a non-negative integer')
    return n


def _splits(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(',') if s.strip())
    bad = [s for s in names if s not in ('Seen', 'Unseen')]
    if not names or bad or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"'{text}' must be a comma-separated list of distinct names among Seen, Unseen")
    return names


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``affordance-synth``."""
    p = _Parser(
        prog=PROG,
        description='Write AGD-Synth, a procedural dataset of objects, parts, hands and '
        'Gaussian GT heatmaps, in the exact AGD20K folder layout (official class and object '
        'names), for tests and the demo training run.')
    p.add_argument('out_dir', metavar='OUT_DIR',
                   help='dataset root to create; an earlier AGD-Synth folder there is replaced')
    p.add_argument('--size', type=_size, default='tiny', metavar='tiny|demo|N',
                   help="'tiny': 3 exocentric, 1 egocentric and 2 test images per folder (CI, "
                   "a few seconds); 'demo': 17 / 6 / 5 per folder (Seen: 442 exocentric, 156 "
                   "egocentric, 130 test images; Unseen: 238 / 84 / 55); N: N exocentric images "
                   'per affordance/object folder, N/3 egocentric and 5N/17 test (default: tiny)')
    p.add_argument('--seed', type=_seed, default=0,
                   help='non-negative integer; the same seed writes byte-identical files '
                   '(default: 0)')
    p.add_argument('--splits', type=_splits, default=('Seen', 'Unseen'), metavar='LIST',
                   help='comma-separated splits to write: Seen, Unseen (default: Seen,Unseen)')
    p.add_argument('--preview', metavar='PNG',
                   help='also write a contact sheet (test images, GT overlays, exocentric '
                   'images) of the first written split to this PNG')
    p.add_argument('--no-progress', action='store_true', help='hide the progress bar')
    p.add_argument('-q', '--quiet', action='store_true',
                   help='print nothing on success (implies --no-progress)')
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Generate the dataset; returns the exit code (0 ok, 2 user error, 1 unexpected failure)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as e:
        return user_error(PROG, e)
    except _Exit as e:
        return e.status
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')

    import cv2

    from affordance_core.data.synth import contact_sheet, generate

    try:
        counts = generate(args.out_dir, args.size, args.seed,
                          progress=not (args.no_progress or args.quiet), splits=args.splits)
        if args.preview:
            sheet = contact_sheet(args.out_dir, split=args.splits[0])
            try:
                ok = cv2.imwrite(args.preview, sheet)
            except cv2.error:
                ok = False
            if not ok:
                raise OSError(f"could not write the preview '{args.preview}' (is the folder "
                              'writable and the name a .png?)')
    except (ValueError, OSError) as e:
        msg = str(e) if not isinstance(e, OSError) or not e.strerror else (
            f"{e.strerror}: '{e.filename}'" if e.filename else e.strerror)
        return user_error(PROG, msg)
    if not args.quiet:
        for split in args.splits:
            c = counts[split]
            print(f"{split}: {c['exocentric']} exocentric, {c['egocentric']} egocentric, "
                  f"{c['test']} test images (+{c['gt']} GT) -> {args.out_dir}/{split}")
        if args.preview:
            print(f'preview: {args.preview}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
