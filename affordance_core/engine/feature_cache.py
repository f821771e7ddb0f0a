"""Cache of frozen-backbone features, so that training epochs after the first skip the backbone.

The backbone is frozen and the cached views are deterministic (``data.transforms.view_transform``:
view 0 = Resize((S, S)), view 1 = + horizontal flip), so the features of an image view never
change. :class:`FeatureCache` stores the fields a model needs (``model.feature_fields``) per key
(``'<image key>#v<view>'``; the test set has its own cache keyed by the test key) the first
time they are computed, in ``float16`` by default: half the memory, and the model output stays
close. Measured on one LOCATE batch (8 samples, ``test_engine.py``): the weighted total loss from
float16 features differs from the loss on images by 3e-6 (relative) with ``locate_test`` and
1e-6 with ``locate_imgfocus`` at 224 px, the prototype term by 2e-4; the AGD-Synth demo's test
metrics from cached float16 features (KLD 3.0555, SIM 0.1081, NSS 1.0022) match
``evaluate_model`` on the images (3.056, 0.108, 1.002).

Storage is a list of fixed-size chunks per field: torch tensors in memory, or ``.npy`` memory maps
under a folder (``<output_dir>/feature_cache/<fingerprint id>/``) so that a resumed run reuses
them. The folder name is a hash of a fingerprint (backbone name and a hash of its weights, image
size, fields, dtype, data root and split), and ``meta.json`` repeats the fingerprint: a cache built
for another backbone, weights file or image size is never reused. ``index.json`` (written
atomically by :meth:`FeatureCache.flush`) lists the keys of the rows that are complete; rows
written after the last flush are simply computed again after a crash.

Helpers: :func:`compute_features` (one backbone pass, selected fields), :func:`lookup` (features
of a batch of keys, computing the missing ones from images at hand), :func:`fill` (complete the
cache for a list of keys with a DataLoader of decoded images).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from affordance_core.checkpoint import atomic_write_text

__all__ = ['FeatureCache', 'DTYPES', 'backbone_fingerprint', 'compute_features', 'lookup',
           'fill', 'open_feature_cache']

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {'float16': torch.float16, 'float32': torch.float32}
_NP_DTYPES = {torch.float16: np.float16, torch.float32: np.float32}
_CHUNK_BYTES = 64 * 2**20  # target size of one chunk of one field
_FORMAT_VERSION = 1


def _dtype_name(dtype: torch.dtype) -> str:
    for name, dt in DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f'feature cache dtype must be one of {", ".join(DTYPES)}, got {dtype}')


class FeatureCache:
    """Key -> per-field feature rows, in memory or memory-mapped on disk.

    Args:
        fields: names of the stored fields (e.g. ``('keys', 'cls_attn')``).
        dtype: storage dtype, ``torch.float16`` (default) or ``torch.float32``.
        root: folder of the on-disk store; ``None`` keeps everything in memory.
        fingerprint: JSON-able description of what produced the features; an existing store
            under ``root`` with a different fingerprint raises ValueError.

    Rows are added with :meth:`put` and read with :meth:`get`; each field keeps a fixed
    per-row shape, set by the first :meth:`put`.
    """

    def __init__(self, fields: Sequence[str], *, dtype: torch.dtype = torch.float16,
                 root: str | os.PathLike | None = None,
                 fingerprint: Mapping[str, Any] | None = None) -> None:
        if not fields or isinstance(fields, str):
            raise ValueError(f'fields must be a non-empty sequence of names, got {fields!r}')
        self.fields = tuple(fields)
        self.dtype = dtype
        self._dtype_name = _dtype_name(dtype)
        self.fingerprint = dict(fingerprint or {})
        self.root = Path(root) if root is not None else None
        self._index: dict[str, int] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._chunk_rows = 0
        self._chunks: dict[str, list[Any]] = {f: [] for f in self.fields}
        self._flushed = 0
        if self.root is not None:
            self._open_disk()

    # ------------------------------------------------------------------ disk store
    def _meta(self) -> dict[str, Any]:
        return {'format': 'affordance_ros.feature_cache', 'version': _FORMAT_VERSION,
                'fields': list(self.fields), 'dtype': self._dtype_name,
                'fingerprint': self.fingerprint,
                'shapes': {k: list(v) for k, v in self._shapes.items()},
                'chunk_rows': self._chunk_rows}

    def _open_disk(self) -> None:
        assert self.root is not None, 'FeatureCache: no root'
        self.root.mkdir(parents=True, exist_ok=True)
        meta_path = self.root / 'meta.json'
        if not meta_path.is_file():
            return
        meta = json.loads(meta_path.read_text(encoding='utf-8'))
        expected = json.loads(json.dumps(self._meta()))  # normalised (tuples -> lists)
        for key in ('format', 'version', 'fields', 'dtype', 'fingerprint'):
            if meta.get(key) != expected[key]:
                raise ValueError(f'feature cache {self.root} was built with a different {key} '
                                 f'({meta.get(key)!r} != {expected[key]!r}); delete the folder '
                                 'or use another output_dir')
        if not meta.get('shapes'):
            return
        self._shapes = {k: tuple(v) for k, v in meta['shapes'].items()}
        self._chunk_rows = int(meta['chunk_rows'])
        index_path = self.root / 'index.json'
        keys = json.loads(index_path.read_text(encoding='utf-8'))['keys'] \
            if index_path.is_file() else []
        self._index = {k: i for i, k in enumerate(keys)}
        self._flushed = len(keys)
        n_chunks = math.ceil(len(keys) / self._chunk_rows) if keys else 0
        for field in self.fields:
            for c in range(n_chunks):
                path = self._chunk_path(field, c)
                if not path.is_file():
                    raise ValueError(f'feature cache {self.root} is incomplete ({path.name} '
                                     'missing); delete the folder to rebuild it')
                self._chunks[field].append(np.load(path, mmap_mode='r+'))
        logger.info('feature cache %s: reusing %d entries', self.root, len(keys))

    def _chunk_path(self, field: str, chunk: int) -> Path:
        assert self.root is not None, 'FeatureCache: no root'
        return self.root / f'{field}_{chunk:05d}.npy'

    def flush(self) -> None:
        """Make every row written so far durable (memory maps flushed, index and meta written)."""
        if self.root is None or not self._shapes:
            return
        for chunks in self._chunks.values():
            for chunk in chunks:
                chunk.flush()
        atomic_write_text(self.root / 'meta.json', json.dumps(self._meta(), indent=1))
        keys = sorted(self._index, key=self._index.__getitem__)
        atomic_write_text(self.root / 'index.json', json.dumps({'keys': keys}))
        self._flushed = len(keys)

    # ------------------------------------------------------------------ rows
    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def keys(self) -> list[str]:
        """Stored keys in insertion order."""
        return sorted(self._index, key=self._index.__getitem__)

    def missing(self, keys: Iterable[str]) -> list[str]:
        """Keys of ``keys`` not stored yet, each once, in first-seen order."""
        out: dict[str, None] = {}
        for k in keys:
            if k not in self._index:
                out[k] = None
        return list(out)

    @property
    def nbytes(self) -> int:
        """Bytes used by the stored rows (all fields)."""
        item = torch.empty((), dtype=self.dtype).element_size()
        return len(self) * sum(math.prod(s) for s in self._shapes.values()) * item

    def _new_chunk(self, field: str) -> Any:
        shape = (self._chunk_rows, *self._shapes[field])
        if self.root is None:
            return torch.empty(shape, dtype=self.dtype)
        return np.lib.format.open_memmap(self._chunk_path(field, len(self._chunks[field])),
                                         mode='w+', dtype=_NP_DTYPES[self.dtype], shape=shape)

    def put(self, keys: Sequence[str], values: Mapping[str, Tensor] | Any) -> None:
        """Store rows; keys already present are left unchanged.

        Args:
            keys: K keys.
            values: mapping (or ``BackboneOutput``) with every cached field as a (K, ...) tensor.

        Raises:
            ValueError: a field is missing, has the wrong batch size or a per-row shape that
                differs from the stored one.
        """
        if not isinstance(values, Mapping):
            values = {f: getattr(values, f, None) for f in self.fields}
        tensors = {}
        for f in self.fields:
            t = values.get(f)
            if t is None:
                raise ValueError(f"feature cache: field '{f}' missing from the values to store")
            if t.shape[0] != len(keys):
                raise ValueError(f"feature cache: field '{f}' has {t.shape[0]} rows for "
                                 f'{len(keys)} keys')
            tensors[f] = t.detach().to('cpu', self.dtype)
        if not self._shapes:
            self._shapes = {f: tuple(tensors[f].shape[1:]) for f in self.fields}
            row_bytes = sum(math.prod(s) for s in self._shapes.values()) \
                * torch.empty((), dtype=self.dtype).element_size()
            self._chunk_rows = max(16, min(1024, _CHUNK_BYTES // max(row_bytes, 1)))
        for f in self.fields:
            if tuple(tensors[f].shape[1:]) != self._shapes[f]:
                raise ValueError(f"feature cache: field '{f}' rows have shape "
                                 f'{tuple(tensors[f].shape[1:])}, the cache holds '
                                 f'{self._shapes[f]} (another image size?)')
        for i, key in enumerate(keys):
            if key in self._index:
                continue
            row = len(self._index)
            chunk, offset = divmod(row, self._chunk_rows)
            for f in self.fields:
                while len(self._chunks[f]) <= chunk:
                    self._chunks[f].append(self._new_chunk(f))
                target = self._chunks[f][chunk]
                if self.root is None:
                    target[offset] = tensors[f][i]
                else:
                    target[offset] = tensors[f][i].numpy()
            self._index[key] = row

    def get(self, keys: Sequence[str], device: torch.device | str | None = None,
            dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """Stacked rows of ``keys``.

        Args:
            keys: K stored keys (repeats allowed).
            device: where the returned tensors go (default CPU).
            dtype: returned dtype (float32 by default, whatever the storage dtype).

        Returns:
            ``{field: (K, ...) tensor}``.

        Raises:
            KeyError: a key is not stored (the message names the first missing ones).
        """
        absent = [k for k in keys if k not in self._index]
        if absent:
            raise KeyError(f'{len(absent)} key(s) not in the feature cache, e.g. {absent[:3]}')
        out = {}
        rows = [divmod(self._index[k], self._chunk_rows) for k in keys]
        for f in self.fields:
            chunks = self._chunks[f]
            if self.root is None:
                t = torch.stack([chunks[c][o] for c, o in rows]) if rows \
                    else torch.empty((0, *self._shapes.get(f, ())), dtype=self.dtype)
            else:
                t = torch.from_numpy(np.stack([np.asarray(chunks[c][o]) for c, o in rows]))
            out[f] = t.to(device=device or 'cpu', dtype=dtype)
        return out


# ---------------------------------------------------------------------------------------------
# fingerprint and construction


def backbone_fingerprint(backbone: nn.Module, **extra: Any) -> dict[str, Any]:
    """What determines cached features: backbone name, class and a SHA-1 of all its tensors.

    Args:
        backbone: the frozen backbone (``model.backbone``).
        **extra: further JSON-able facts (image size, fields, dtype, data root, split, ...).

    Returns:
        JSON-able dict.
    """
    digest = hashlib.sha1()
    for name, tensor in sorted(backbone.state_dict().items()):
        digest.update(name.encode())
        t = tensor.detach().cpu().contiguous()
        digest.update(str((t.dtype, tuple(t.shape))).encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b'')
    return {'backbone': str(getattr(backbone, 'name', type(backbone).__name__)),
            'class': type(backbone).__name__, 'weights_sha1': digest.hexdigest(), **extra}


def open_feature_cache(base: str | os.PathLike | None, fields: Sequence[str],
                       fingerprint: Mapping[str, Any], *, name: str = '',
                       dtype: torch.dtype = torch.float16) -> FeatureCache:
    """A cache whose on-disk folder is ``base/<name>-<hash of fingerprint>`` (or in memory).

    Args:
        base: parent folder (e.g. ``<output_dir>/feature_cache``); None = in memory.
        fields: cached fields.
        fingerprint: see :func:`backbone_fingerprint`.
        name: readable prefix of the folder name (e.g. ``'train'``, ``'test'``).
        dtype: storage dtype.
    """
    fp = {**fingerprint, 'fields': list(fields), 'dtype': _dtype_name(dtype)}
    if base is None:
        return FeatureCache(fields, dtype=dtype, fingerprint=fp)
    ident = hashlib.sha1(json.dumps(fp, sort_keys=True, default=str).encode()).hexdigest()[:16]
    folder = Path(base) / (f'{name}-{ident}' if name else ident)
    return FeatureCache(fields, dtype=dtype, root=folder, fingerprint=fp)


# ---------------------------------------------------------------------------------------------
# computing and looking up features


@torch.no_grad()
def compute_features(backbone: nn.Module, images: Tensor,
                     fields: Sequence[str]) -> dict[str, Tensor]:
    """One frozen-backbone pass, keeping ``fields``.

    Args:
        backbone: ``FrozenViT``.
        images: (K, 3, S, S) normalised images on the backbone's device.
        fields: ``BackboneOutput`` field names.

    Returns:
        ``{field: (K, ...) tensor}``.
    """
    out = backbone(images, prev_keys='keys_prev' in fields)
    result = {}
    for f in fields:
        t = getattr(out, f, None)
        if t is None:
            raise ValueError(f"the backbone output has no '{f}' field")
        result[f] = t
    return result


def lookup(cache: FeatureCache, backbone: nn.Module, keys: Sequence[str],
           images: Tensor | Mapping[str, Tensor] | None, device: torch.device,
           autocast: Callable[[], Any] | None = None) -> dict[str, Tensor]:
    """Features of ``keys``, computing (and storing) the missing ones first.

    The returned values always come from the cache, i.e. they are rounded to its dtype whether
    they were just computed or stored long ago, so a run does not depend on when a feature was
    computed.

    Args:
        cache: the feature cache.
        backbone: frozen backbone (used only for missing keys).
        keys: K keys.
        images: (K, 3, S, S) images aligned with ``keys``; or a mapping key -> (3, S, S)
            image that holds at least the missing keys; or None when every key must already be
            cached.
        device: where images and the returned features go.
        autocast: optional context-manager factory for the backbone pass (AMP).

    Returns:
        ``{field: (K, ...) float32 tensor on device}``.

    Raises:
        KeyError: keys missing and no images to compute them from.
    """
    positions: dict[str, int] = {}
    for i, k in enumerate(keys):
        if k not in cache and k not in positions:
            positions[k] = i
    if positions:
        if images is None:
            raise KeyError(f'{len(positions)} feature(s) not cached, e.g. {list(positions)[:3]}')
        if isinstance(images, Mapping):
            absent = [k for k in positions if k not in images]
            if absent:
                raise KeyError(f'no image given for uncached key(s) {absent[:3]}')
            batch = torch.stack([images[k] for k in positions])
        else:
            batch = images[list(positions.values())]
        batch = batch.to(device, non_blocking=True)
        with (autocast() if autocast is not None else _null()):
            feats = compute_features(backbone, batch, cache.fields)
        cache.put(list(positions), feats)
    return cache.get(keys, device=device)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


class _KeyImages(torch.utils.data.Dataset):
    """(key, image or None) for a list of keys, decoded by ``load(key)`` (DataLoader-friendly)."""

    def __init__(self, load: Callable[[str], Tensor | None], keys: Sequence[str]) -> None:
        self.load = load
        self.keys = list(keys)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> tuple[str, Tensor | None]:
        return self.keys[i], self.load(self.keys[i])


def _collate_key_images(
        items: list[tuple[str, Tensor | None]]) -> tuple[list[str], Tensor | None, list[str]]:
    ok = [(k, t) for k, t in items if t is not None]
    bad = [k for k, t in items if t is None]
    if not ok:
        return [], None, bad
    return [k for k, _ in ok], torch.stack([t for _, t in ok]), bad


def fill(cache: FeatureCache, backbone: nn.Module, load: Callable[[str], Tensor | None],
         keys: Sequence[str], *, device: torch.device, batch_size: int = 32,
         num_workers: int = 0, progress: bool = False, desc: str = 'caching features',
         autocast: Callable[[], Any] | None = None) -> dict[str, int]:
    """Compute and store the features of every key of ``keys`` that is not cached yet.

    Args:
        cache: the feature cache.
        backbone: frozen backbone on ``device``.
        load: ``key -> (3, S, S) image or None`` (unreadable), e.g. ``AGD20KTrain.load_key``.
        keys: keys to have cached.
        device: backbone device.
        batch_size: images per backbone pass.
        num_workers: DataLoader workers decoding the images.
        progress: show a tqdm bar.
        desc: bar title.
        autocast: optional context-manager factory for the backbone pass.

    Returns:
        ``{'computed': n, 'unreadable': n, 'cached': n}``.
    """
    todo = cache.missing(keys)
    stats = {'computed': 0, 'unreadable': 0, 'cached': len(set(keys)) - len(todo)}
    if not todo:
        return stats
    loader = torch.utils.data.DataLoader(_KeyImages(load, todo), batch_size=batch_size,
                                         shuffle=False, num_workers=num_workers,
                                         collate_fn=_collate_key_images)
    with tqdm(total=len(todo), desc=desc, unit='img', disable=not progress, leave=False) as bar:
        for names, images, bad in loader:
            if names:
                with (autocast() if autocast is not None else _null()):
                    feats = compute_features(backbone, images.to(device, non_blocking=True),
                                             cache.fields)
                cache.put(names, feats)
            stats['computed'] += len(names)
            stats['unreadable'] += len(bad)
            bar.update(len(names) + len(bad))
    cache.flush()
    return stats
