"""affordance-convert: official checkpoints of LOCATE, LoopTrans, WSMA and SelectiveCL -> ours.

Examples::

    affordance-convert --from official --method locate best_aff_locate_seen.pth locate_seen.pt
    affordance-convert --from official --method looptrans looptrans_unseen.pth out.pt \\
        --split Unseen
    affordance-convert --from official --method wsma wsma_seen.pth out.pt

The output is a checkpoint of our format (``affordance-eval``, ``affordance-export``,
``affordance-ground`` and the ROS node read it). The DINO key channel order of the official heads
(d-major) is converted to ours (head-major); see ``affordance_core/convert.py``. User errors
(missing or foreign file, wrong method) exit with code 2 and one line on stderr.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from affordance_core.cli import user_error
from affordance_core.convert import OFFICIAL_METHODS
from affordance_core.labels import SPLITS

PROG = 'affordance-convert'


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``affordance-convert``."""
    p = argparse.ArgumentParser(prog=PROG, description='Convert an official checkpoint '
                                '(state dict of the reference repository) to our format.')
    p.add_argument('--from', dest='source', required=True, choices=('official',),
                   help='layout of the input file')
    p.add_argument('--method', required=True, choices=sorted(OFFICIAL_METHODS),
                   help='method the checkpoint belongs to')
    p.add_argument('input', help='official .pth file')
    p.add_argument('output', help='our checkpoint (.pt) to write')
    p.add_argument('--split', choices=sorted(SPLITS), default=None,
                   help='class list (default: inferred from the class count: 36 Seen, '
                   '25 Unseen, 10 HICO-IIF)')
    p.add_argument('--model', default=None, help='registry name to build (default: the '
                   "method's DINO ViT-S/16 model, e.g. locate_vits16)")
    p.add_argument('--backbone-weights', default=None, help='backbone file, only used when the '
                   'official file holds no vit_model.* weights')
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the conversion; returns the process exit code (0 ok, 2 user error)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    from affordance_core.convert import convert_official

    try:
        out = convert_official(args.method, args.input, args.output, model=args.model,
                               split=args.split, backbone_weights=args.backbone_weights)
    except (FileNotFoundError, ValueError) as exc:
        return user_error(PROG, exc)
    print(f'{PROG}: wrote {out} ({args.method}, from {args.input})')
    return 0


if __name__ == '__main__':  # pragma: no cover
    sys.exit(main())
