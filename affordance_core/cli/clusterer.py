"""affordance-train-clusterer: train LoopTrans' 4-token part clusterer without labels.

Examples::

    affordance-train-clusterer --data data/AGD20K --split Seen --out ckpts/cluster_seen.pt
    affordance-train-clusterer --data outputs/demo/agd_synth --backbone dinov2_vits14_imgfocus \\
        --epochs 20 --out outputs/clusterer.pt

Extracts the frozen last-block keys of every training image of the split once (plain resize to
``--image-size``, the LoopTrans recipe clusters ego images; ``--views ego+exo`` adds the exo
images), then optimises the ACSeg-style soft modularity (``losses/modularity.py``) of the
clusterer's partition with Adam. Writes our clusterer file (``models/clusterer.py``) and a
``<out>.json`` summary with the curve; LoopTrans reads it with
``model.kwargs.clusterer_weights=<out>``. The official ``cluster_seen.pth`` works there too.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

from affordance_core.cli import user_error

PROG = 'affordance-train-clusterer'
logger = logging.getLogger(PROG)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``affordance-train-clusterer``."""
    p = argparse.ArgumentParser(prog=PROG, description='Train the LoopTrans part clusterer '
                                '(K tokens over frozen DINO keys) with a modularity objective.')
    p.add_argument('--data', required=True, help='dataset root holding <split>/trainset')
    p.add_argument('--split', default='Seen', help='Seen | Unseen | HICO-IIF')
    p.add_argument('--out', required=True, help='clusterer file to write (.pt)')
    p.add_argument('--backbone', default='dinov2_vits14_imgfocus',
                   help='frozen backbone (must match the LoopTrans model that will use it)')
    p.add_argument('--backbone-weights', default=None, help='backbone weights file')
    p.add_argument('--image-size', type=int, default=224)
    p.add_argument('--views', choices=('ego', 'ego+exo'), default='ego',
                   help='which training images to cluster (default: %(default)s)')
    p.add_argument('--max-images', type=int, default=0, help='cap on images (0 = all)')
    p.add_argument('--tokens', type=int, default=4, help='K parts (LoopTrans: 4)')
    p.add_argument('--epochs', type=int, default=20)
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--lr', type=float, default=1e-3)
    p.add_argument('--tau', type=float, default=0.05, help='assignment softmax temperature')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--device', default='auto', help='auto | cpu | cuda | cuda:N')
    p.add_argument('--no-progress', action='store_true')
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Train and save; returns the exit code (0 ok, 2 user error)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    for name in ('epochs', 'batch_size', 'tokens', 'image_size'):
        if getattr(args, name) < 1:
            return user_error(PROG, f'--{name.replace("_", "-")} must be >= 1')
    if not args.lr > 0 or not args.tau > 0:
        return user_error(PROG, '--lr and --tau must be > 0')
    import torch
    from tqdm import tqdm

    from affordance_core.data.agd20k import AGD20KTrain
    from affordance_core.engine.distributed import resolve_device
    from affordance_core.losses.modularity import modularity
    from affordance_core.models.backbone import create_backbone
    from affordance_core.models.clusterer import Clusterer, save_clusterer

    try:
        device = resolve_device(args.device)
        backbone = create_backbone(args.backbone, weights=args.backbone_weights).to(device)
        data = AGD20KTrain(args.data, args.split, image_size=args.image_size,
                           resize=args.image_size, views=1, load_images=True)
    except (FileNotFoundError, ValueError) as exc:
        return user_error(PROG, exc)
    keys = [k for k in data.image_keys()
            if args.views == 'ego+exo' or '/egocentric/' in k.replace('\\', '/')]
    if args.max_images:
        keys = keys[:args.max_images]
    if not keys:
        return user_error(PROG, f'no training images found under {args.data}/{args.split}')
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    feats = []
    for i in tqdm(range(0, len(keys), args.batch_size), desc='backbone keys', unit='batch',
                  disable=args.no_progress):
        imgs = [data.load_key(k) for k in keys[i:i + args.batch_size]]
        imgs = [im for im in imgs if im is not None]
        if imgs:
            out = backbone(torch.stack(imgs).to(device))
            feats.append(out.keys.flatten(2).transpose(1, 2).half().cpu())  # (b, hw, D)
    x_all = torch.cat(feats)
    logger.info('%d images -> keys %s in %.1f s (%d unreadable)', len(keys),
                tuple(x_all.shape), time.perf_counter() - t0, len(keys) - x_all.shape[0])

    dim = backbone.embed_dim
    model = Clusterer(args.tokens, dim, num_layers=8, num_heads=8 if dim % 8 == 0 else 1)
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    curve = []
    bar = tqdm(range(args.epochs), desc='clusterer', unit='epoch', disable=args.no_progress)
    for epoch in bar:
        order = torch.randperm(x_all.shape[0], generator=gen)
        total, count = 0.0, 0
        for i in range(0, len(order), args.batch_size):
            x = x_all[order[i:i + args.batch_size]].to(device).float()
            q = modularity(x, model(x), args.tau)
            opt.zero_grad(set_to_none=True)
            (-q).backward()
            opt.step()
            total += float(q.detach()) * x.shape[0]
            count += x.shape[0]
        curve.append(total / count)
        bar.set_postfix(modularity=f'{curve[-1]:.4f}')
    model.eval()
    with torch.no_grad():
        x = x_all[:min(256, x_all.shape[0])].to(device).float()
        used = model(x).argmax(-1).unique().numel()
    out = save_clusterer(model.cpu(), args.out, backbone=args.backbone,
                         extra={'images': int(x_all.shape[0]), 'split': args.split,
                                'curve': curve, 'tau': args.tau})
    summary = {'out': str(out), 'images': int(x_all.shape[0]), 'modularity': curve,
               'tokens_used': int(used), 'seconds': time.perf_counter() - t0}
    Path(f'{out}.json').write_text(json.dumps(summary, indent=2))
    print(f'{PROG}: wrote {out}: modularity {curve[0]:.4f} -> {curve[-1]:.4f}, '
          f'{used}/{args.tokens} parts in use')
    return 0


if __name__ == '__main__':  # pragma: no cover
    sys.exit(main())
