"""Evaluate a model (or a model-free baseline) on an AGD20K-style test set.

The dataset yields items ``{'image': (3, S, S) normalised tensor, 'label': int,
'gt': (224, 224) float32 in [0, 1], 'key': str, 'path': str}`` (``data.agd20k.AGD20KTest``; any
map-style dataset or plain list of such dicts works). The model is duck-typed: anything with
``predict_raw(images (B, 3, S, S), class_ids (B,)) -> (B, h, w)`` raw CAMs of the asked classes.

With ``out_dir`` the functions write ``metrics.json``, ``metrics.md`` and, for the first
``num_overlays`` images, ``overlays/NNN_<key>.png``: the original image (read from ``'path'``)
with the post-processed prediction, next to the same image with the GT.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import numpy as np
import torch
from tqdm import tqdm

from affordance_core.metrics.baselines import CENTER_SIGMA_FRACTION, center_prior
from affordance_core.metrics.evaluator import AffordanceEvaluator, write_json, write_markdown
from affordance_core.viz import overlay, save_image, side_by_side

logger = logging.getLogger(__name__)

__all__ = ['evaluate_model', 'evaluate_baseline', 'BASELINES']

BASELINES: tuple[str, ...] = ('center',)
_MEAN = np.array([0.485, 0.456, 0.406], np.float32)  # ImageNet, used only to show the tensor
_STD = np.array([0.229, 0.224, 0.225], np.float32)


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch test items; GT stays numpy (B, 224, 224), keys and paths stay lists."""
    for i, it in enumerate(items):
        for k in ('image', 'label', 'gt', 'key'):
            if k not in it:
                raise ValueError(f"test item {i} has no '{k}' entry; expected keys image, label, "
                                 f'gt, key, path (see data.agd20k.AGD20KTest)')
    images = torch.stack([torch.as_tensor(it['image']) for it in items])
    labels = torch.as_tensor([int(it['label']) for it in items], dtype=torch.long)
    gts = np.stack([it['gt'].detach().cpu().numpy() if torch.is_tensor(it['gt'])
                    else np.asarray(it['gt']) for it in items])
    return {'image': images, 'label': labels, 'gt': gts, 'key': [str(it['key']) for it in items],
            'path': [str(it.get('path', '')) for it in items]}


def _resolve_classes(classes: Sequence[str] | None, *objs: Any) -> tuple[str, ...]:
    if classes is None:
        for obj in objs:
            classes = getattr(obj, 'classes', None)
            if classes:
                break
    if not classes:
        raise ValueError('class names are unknown: pass classes=labels.classes_for(split) '
                         '(neither the model nor the dataset has a .classes attribute)')
    return tuple(classes)


def _original_image(path: str, image: torch.Tensor) -> np.ndarray:
    """RGB uint8 image from ``path``; falls back to the de-normalised input tensor."""
    if path:
        bgr = cv2.imread(path, cv2.IMREAD_COLOR) if Path(path).is_file() else None
        if bgr is not None:
            return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        logger.warning('could not read %s for the overlay; showing the network input instead',
                       path)
    arr = image.detach().cpu().float().numpy().transpose(1, 2, 0)
    if arr.shape[2] == 3:
        arr = arr * _STD + _MEAN
    return np.clip(np.round(arr * 255.0), 0, 255).astype(np.uint8)


def _safe_name(key: str) -> str:
    key = re.sub(r'\.(png|jpe?g)$', '', key, flags=re.IGNORECASE)
    return re.sub(r'[^A-Za-z0-9._-]+', '_', key)[:120]


def _save_overlay_pair(path: Path, rgb: np.ndarray, pred: np.ndarray, gt: np.ndarray,
                       rec: dict[str, Any]) -> Path:
    pred = np.nan_to_num(np.asarray(pred, np.float32), nan=0.0)
    gt = np.clip(np.asarray(gt, np.float32), 0.0, 1.0)
    label = (f"pred {rec['class']}  KLD {rec['KLD']:.2f} SIM {rec['SIM']:.2f} "
             f"NSS {rec['NSS']:.2f}")
    tile = side_by_side([overlay(rgb, pred), overlay(rgb, gt)], [label, 'GT'])
    return save_image(path, tile)


def _run(predict: Callable[[dict[str, Any]], Any], dataset: Any, evaluator: AffordanceEvaluator,
         *, batch_size: int, num_workers: int, out_dir: str | Path | None, num_overlays: int,
         progress: bool, title: str, extra: dict[str, Any]) -> dict[str, Any]:
    if batch_size <= 0:
        raise ValueError(f'batch_size must be positive, got {batch_size}')
    n = len(dataset)
    if n == 0:
        raise ValueError('the test dataset is empty: check the data root and split')
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, collate_fn=_collate)
    evaluator.reset()
    out = Path(out_dir) if out_dir is not None else None
    overlays: list[str] = []
    with tqdm(total=n, desc=title, unit='img', disable=not progress, leave=False) as bar:
        for batch in loader:
            raw = predict(batch)
            recs = evaluator.process(raw, batch['gt'], batch['label'], batch['key'])
            if out is not None and len(overlays) < num_overlays:
                raw_np = raw.detach().cpu().numpy() if torch.is_tensor(raw) else np.asarray(raw)
                for i, rec in enumerate(recs):
                    if len(overlays) >= num_overlays:
                        break
                    rgb = _original_image(batch['path'][i], batch['image'][i])
                    p = out / 'overlays' / f'{len(overlays):03d}_{_safe_name(rec["key"])}.png'
                    _save_overlay_pair(p, rgb, evaluator.prepare(raw_np[i]), batch['gt'][i], rec)
                    overlays.append(str(p))
            bar.update(len(recs))
    result = evaluator.evaluate()
    result.update(extra)
    skipped = getattr(dataset, 'num_skipped', None)
    if skipped is not None:
        result['num_skipped'] = int(skipped)
    if out is not None:
        result['overlays'] = overlays
        write_json(result, out / 'metrics.json')
        write_markdown(result, out / 'metrics.md', title=title)
        logger.info('wrote %s, %s and %d overlays', out / 'metrics.json', out / 'metrics.md',
                    len(overlays))
    return result


def evaluate_model(model: Any, dataset: Any, *, device: str | torch.device = 'cpu',
                   batch_size: int = 16, num_workers: int = 0,
                   out_dir: str | Path | None = None, num_overlays: int = 8,
                   progress: bool = True, postprocess: str = 'locate',
                   classes: Sequence[str] | None = None, size: int = 224) -> dict[str, Any]:
    """Score ``model.predict_raw`` on every test image with the official metrics.

    Args:
        model: object with ``predict_raw(images (B, 3, S, S), class_ids (B,)) -> (B, h, w)``
            (torch or numpy); ``eval()`` / ``to()`` are called when present and the training
            mode is restored afterwards.
        dataset: map-style dataset (or list) of test items, see the module docstring.
        device: where images and labels are sent.
        batch_size: images per ``predict_raw`` call.
        num_workers: DataLoader workers.
        out_dir: folder for ``metrics.json``, ``metrics.md`` and ``overlays/``; None writes
            nothing.
        num_overlays: overlays written for the first images (0 = none).
        progress: show a tqdm bar.
        postprocess: ``'locate'``, ``'double'`` or ``'none'`` (see ``AffordanceEvaluator``).
        classes: class names; defaults to ``model.classes`` then ``dataset.classes``.
        size: metric resolution (224 officially).

    Returns:
        the evaluator result (``overall``, ``per_class``, ``per_image``, ``invalid``, ...) plus
        ``num_skipped`` (when the dataset counts skipped files) and ``overlays`` (with out_dir).
    """
    if not callable(getattr(model, 'predict_raw', None)):
        raise ValueError(f'{type(model).__name__} has no predict_raw(images, class_ids) method')
    evaluator = AffordanceEvaluator(_resolve_classes(classes, model, dataset),
                                    postprocess=postprocess, size=size)
    device = torch.device(device)
    name = str(getattr(model, 'registry_name', type(model).__name__))
    if callable(getattr(model, 'to', None)):
        model.to(device)
    was_training = getattr(model, 'training', False)
    if callable(getattr(model, 'eval', None)):
        model.eval()

    def predict(batch: dict[str, Any]) -> Any:
        images = batch['image'].to(device, non_blocking=True)
        labels = batch['label'].to(device, non_blocking=True)
        with torch.no_grad():
            raw = model.predict_raw(images, labels)
        if torch.is_tensor(raw):
            raw = raw.detach().float().cpu()
        return raw

    try:
        result = _run(predict, dataset, evaluator, batch_size=batch_size, num_workers=num_workers,
                      out_dir=out_dir, num_overlays=num_overlays, progress=progress,
                      title=f'{name} evaluation', extra={'method': name})
    finally:
        if was_training is True and callable(getattr(model, 'train', None)):
            model.train()
    return result


def evaluate_baseline(dataset: Any, kind: str = 'center', *, classes: Sequence[str] | None = None,
                      sigma: float | None = None, batch_size: int = 16, num_workers: int = 0,
                      out_dir: str | Path | None = None, num_overlays: int = 8,
                      progress: bool = True, size: int = 224) -> dict[str, Any]:
    """Score a model-free baseline with the same protocol and result structure as a model.

    Args:
        dataset: test items as for :func:`evaluate_model` (only ``gt``, ``label``, ``key`` and,
            for overlays, ``path`` are used).
        kind: ``'center'``: the centred Gaussian of ``baselines.center_prior`` (same map for every
            image), post-processed like a raw CAM (``postprocess='locate'``).
        classes: class names; defaults to ``dataset.classes``.
        sigma: Gaussian sigma in pixels of the ``size x size`` map; None = ``0.25 * size``.
        batch_size, num_workers, out_dir, num_overlays, progress, size: as in
            :func:`evaluate_model`.

    Returns:
        the evaluator result with ``method`` = ``'center_prior'`` and ``sigma``.
    """
    if kind not in BASELINES:
        raise ValueError(f"unknown baseline '{kind}'; expected one of {', '.join(BASELINES)}")
    evaluator = AffordanceEvaluator(_resolve_classes(classes, dataset), postprocess='locate',
                                    size=size)
    prior = center_prior(size, size, sigma)
    used_sigma = float(sigma) if sigma is not None else CENTER_SIGMA_FRACTION * size

    def predict(batch: dict[str, Any]) -> np.ndarray:
        return np.broadcast_to(prior, (len(batch['key']), size, size))

    result = _run(predict, dataset, evaluator, batch_size=batch_size, num_workers=num_workers,
                  out_dir=out_dir, num_overlays=num_overlays, progress=progress,
                  title='center prior baseline',
                  extra={'method': 'center_prior', 'sigma': used_sigma})
    return result
