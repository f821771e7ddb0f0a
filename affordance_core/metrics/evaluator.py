"""AffordanceEvaluator: reset / process / evaluate over a test set, plus JSON / Markdown writers.

The overall numbers follow the official protocol (``methods.md`` §1.4): KLD, SIM and NSS are
computed per image and averaged over **all images** (no per-class averaging). The per-class table
is an extra for inspection, and per-image results are kept so the worst and best cases can be
looked up by key.

Non-finite metric values (e.g. NSS of a constant prediction is 0 / 0 = nan, as in the official
code) would turn the official mean into nan. Here each metric is averaged over the images where it
is finite, and the images with any non-finite value are counted in ``result['invalid']`` and listed
in ``result['invalid_keys']`` (and logged), so a broken prediction is reported instead of silently
poisoning or silently leaving the mean. ``result['nonfinite']`` gives the count per metric.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from affordance_core.metrics.postprocess import normalize_map, normalize_map_double
from affordance_core.metrics.saliency import kld, nss, sim

logger = logging.getLogger(__name__)

__all__ = ['METRICS', 'POSTPROCESS', 'AffordanceEvaluator', 'write_json', 'write_markdown',
           'format_table', 'format_comparison']

METRICS: tuple[str, ...] = ('KLD', 'SIM', 'NSS')
POSTPROCESS: tuple[str, ...] = ('locate', 'double', 'none')


def _to_numpy(x: Any, name: str) -> np.ndarray:
    if hasattr(x, 'detach'):  # torch.Tensor (any device) without importing torch
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except Exception as exc:  # ragged lists and the like
        raise ValueError(f'{name} cannot be converted to an array: {exc}') from None


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else float('nan')


class AffordanceEvaluator:
    """Accumulates per-image KLD / SIM / NSS and summarises them.

    Args:
        classes: class names in index order (``labels.classes_for(split)``).
        postprocess: how ``raw_maps`` become 224x224 maps: ``'locate'`` (resize, then min-max;
            LOCATE / SelectiveCL / LoopTrans), ``'double'`` (min-max, resize, min-max;
            Cross-View-AG / WSMA) or ``'none'`` (maps are already ``size x size`` and normalised).
        size: side of the maps the metrics are computed on (224 officially).
    """

    def __init__(self, classes: Sequence[str], postprocess: str = 'locate',
                 size: int = 224) -> None:
        if isinstance(classes, str) or len(classes) == 0:
            raise ValueError('classes must be a non-empty sequence of class names '
                             '(e.g. labels.classes_for("Seen"))')
        if postprocess not in POSTPROCESS:
            raise ValueError(f"unknown postprocess '{postprocess}'; expected one of "
                             f"{', '.join(POSTPROCESS)}")
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f'size must be a positive int, got {size!r}')
        self.classes = tuple(classes)
        self.postprocess = postprocess
        self.size = size
        self.reset()

    def reset(self) -> None:
        """Forget every processed image."""
        self._records: list[dict[str, Any]] = []
        self._keys: set[str] = set()

    def __len__(self) -> int:
        return len(self._records)

    def prepare(self, raw: Any) -> np.ndarray:
        """Post-process one map exactly as :meth:`process` does.

        Args:
            raw: (h, w) raw CAM, or a (size, size) normalised map when ``postprocess='none'``.

        Returns:
            (size, size) map the metrics are computed on.
        """
        if self.postprocess == 'locate':
            return normalize_map(raw, self.size)
        if self.postprocess == 'double':
            return normalize_map_double(raw, self.size)
        arr = _to_numpy(raw, 'map')
        if arr.shape != (self.size, self.size):
            raise ValueError(f"postprocess='none' needs ({self.size}, {self.size}) maps, got "
                             f"{arr.shape}; use postprocess='locate' for raw CAMs")
        return arr

    def process(self, raw_maps: Any, gts: Any, labels: Any,
                keys: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Score a batch.

        Args:
            raw_maps: (B, h, w) raw CAMs of the GT class (numpy or torch, any device), or
                (B, size, size) normalised maps when ``postprocess='none'``.
            gts: (B, size, size) GT maps in [0, 1] (``cv2.resize(mask / 255, size)``).
            labels: (B,) int class ids into ``classes``.
            keys: B unique image keys (``'<aff>_<obj>_<img.png>'``); ``None`` numbers the images.

        Returns:
            the B per-image records ``{'key', 'label', 'class', 'KLD', 'SIM', 'NSS'}``.
        """
        maps = _to_numpy(raw_maps, 'raw_maps')
        gts = _to_numpy(gts, 'gts')
        labels = _to_numpy(labels, 'labels').reshape(-1)
        if maps.ndim != 3:
            raise ValueError(f'raw_maps must be (B, h, w), got shape {maps.shape}')
        b = maps.shape[0]
        if gts.shape != (b, self.size, self.size):
            raise ValueError(f'gts must be (B, {self.size}, {self.size}) = '
                             f'({b}, {self.size}, {self.size}), got {gts.shape}; '
                             'preprocess them with metrics.postprocess.preprocess_gt')
        if labels.shape != (b,):
            raise ValueError(f'labels must have B={b} entries, got shape {labels.shape}')
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f'labels must be integer class ids, got dtype {labels.dtype}')
        if b and (labels.min() < 0 or labels.max() >= len(self.classes)):
            raise ValueError(f'labels must lie in [0, {len(self.classes)}), got '
                             f'{labels.min()}..{labels.max()}; is the class list the right split?')
        if keys is None:
            keys = [f'#{len(self._records) + i}' for i in range(b)]
        elif isinstance(keys, str) or len(keys) != b:
            raise ValueError(f'keys must be a list of B={b} strings')
        batch_keys = [str(k) for k in keys]
        for k in batch_keys:
            if k in self._keys or batch_keys.count(k) > 1:
                raise ValueError(f"image key '{k}' was processed twice; call reset() between "
                                 'evaluations and keep keys unique')
        out = []
        for i in range(b):
            pred = self.prepare(maps[i])
            gt = gts[i].astype(np.float64)  # the official GT is float64 (mask / 255.0)
            rec = {'key': batch_keys[i], 'label': int(labels[i]),
                   'class': self.classes[int(labels[i])],
                   'KLD': kld(pred, gt), 'SIM': sim(pred, gt), 'NSS': nss(pred, gt)}
            self._records.append(rec)
            self._keys.add(rec['key'])
            out.append(rec)
        return out

    def evaluate(self) -> dict[str, Any]:
        """Summarise everything processed since the last :meth:`reset`.

        Returns:
            ``{'overall': {'KLD', 'SIM', 'NSS', 'count'}, 'per_class': {name: {...,'count'}},
            'invalid': int, 'invalid_keys': [...], 'nonfinite': {metric: int},
            'per_image': {key: {'class', 'label', 'KLD', 'SIM', 'NSS'}},
            'postprocess': str, 'size': int}``. ``overall`` is the mean over all images;
            ``per_class`` lists the classes seen, in class order.
        """
        recs = self._records
        if not recs:
            logger.warning('evaluate() called before any image was processed')
        overall = {m: _mean([r[m] for r in recs]) for m in METRICS}
        overall['count'] = len(recs)
        per_class: dict[str, dict[str, Any]] = {}
        for cid, name in enumerate(self.classes):
            sub = [r for r in recs if r['label'] == cid]
            if sub:
                per_class[name] = {m: _mean([r[m] for r in sub]) for m in METRICS}
                per_class[name]['count'] = len(sub)
        nonfinite = {m: sum(not math.isfinite(r[m]) for r in recs) for m in METRICS}
        invalid_keys = [r['key'] for r in recs if not all(math.isfinite(r[m]) for m in METRICS)]
        if invalid_keys:
            logger.warning('%d of %d images have non-finite metrics (%s); each metric is averaged '
                           'over its finite values. First: %s', len(invalid_keys), len(recs),
                           ', '.join(f'{m}: {n}' for m, n in nonfinite.items() if n),
                           invalid_keys[:5])
        return {
            'overall': overall,
            'per_class': per_class,
            'invalid': len(invalid_keys),
            'invalid_keys': invalid_keys,
            'nonfinite': nonfinite,
            'per_image': {r['key']: {k: r[k] for k in ('class', 'label', *METRICS)}
                          for r in recs},
            'postprocess': self.postprocess,
            'size': self.size,
        }


def json_safe(obj: Any) -> Any:
    """Strict-JSON copy: nan / inf -> None (strict JSON), numpy scalars -> Python scalars."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(result: Mapping[str, Any], path: str | Path) -> Path:
    """Write an evaluation result as strict JSON (non-finite numbers become ``null``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(result), indent=2, allow_nan=False) + '\n',
                    encoding='utf-8')
    return path


def _fmt(v: Any) -> str:
    return f'{v:.3f}' if isinstance(v, (int, float)) and math.isfinite(v) else 'nan'


def write_markdown(result: Mapping[str, Any], path: str | Path,
                   title: str = 'Affordance grounding evaluation') -> Path:
    """Write a Markdown table: the overall row, then one row per class with its image count.

    Args:
        result: output of :meth:`AffordanceEvaluator.evaluate`.
        path: destination ``.md`` file; parent folders are created.
        title: level-1 heading.
    """
    lines = [f'# {title}', '',
             f"Per-image metrics averaged over all images (official protocol); postprocess "
             f"`{result.get('postprocess', '?')}`, {result.get('size', '?')}x"
             f"{result.get('size', '?')} maps. KLD lower is better, SIM and NSS higher.", '',
             '| class | images | KLD | SIM | NSS |', '|---|---:|---:|---:|---:|']
    ov = result['overall']
    lines.append(f"| **overall** | {ov['count']} | " + ' | '.join(_fmt(ov[m]) for m in METRICS)
                 + ' |')
    for name, row in result.get('per_class', {}).items():
        lines.append(f"| {name} | {row['count']} | " + ' | '.join(_fmt(row[m]) for m in METRICS)
                     + ' |')
    if result.get('invalid'):
        lines += ['', f"{result['invalid']} image(s) had non-finite metrics and were left out of "
                  f"the affected means: {', '.join(result.get('invalid_keys', [])[:20])}"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
    return path


def format_table(result: Mapping[str, Any], per_class: bool = True) -> str:
    """Plain-text table (overall row, then per-class rows) for printing."""
    names = list(result.get('per_class', {})) if per_class else []
    width = max([len('overall'), *map(len, names)]) + 2
    head = f"{'class':<{width}}{'images':>7}" + ''.join(f'{m:>9}' for m in METRICS)
    lines = [head, '-' * len(head)]

    def row(name: str, r: Mapping[str, Any]) -> str:
        return f"{name:<{width}}{r['count']:>7}" + ''.join(f'{_fmt(r[m]):>9}' for m in METRICS)

    lines.append(row('overall', result['overall']))
    if names:
        lines.append('-' * len(head))
        lines += [row(n, result['per_class'][n]) for n in names]
    if result.get('invalid'):
        lines.append(f"({result['invalid']} image(s) with non-finite metrics left out of the "
                     'affected means)')
    return '\n'.join(lines)


def format_comparison(results: Mapping[str, Mapping[str, Any]]) -> str:
    """One overall row per named result (e.g. ``{'model': r1, 'center prior': r2}``)."""
    width = max(len('method'), *map(len, results)) + 2
    head = f"{'method':<{width}}{'images':>7}" + ''.join(f'{m:>9}' for m in METRICS)
    lines = [head, '-' * len(head)]
    for name, res in results.items():
        ov = res['overall']
        lines.append(f"{name:<{width}}{ov['count']:>7}"
                     + ''.join(f'{_fmt(ov[m]):>9}' for m in METRICS))
    return '\n'.join(lines)
