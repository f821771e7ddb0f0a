"""AGD20K (and HICO-IIF) training and test datasets (``methods.md`` §0.3, §1.1-1.3).

Layout (``root`` holds one folder per split: ``Seen``, ``Unseen`` or ``HICO-IIF``)::

    <root>/<split>/trainset/exocentric/<affordance>/<object>/*.jpg
    <root>/<split>/trainset/egocentric/<affordance>/<object>/*.jpg
    <root>/<split>/testset/egocentric/<affordance>/<object>/*.jpg
    <root>/<split>/testset/GT/<affordance>/<object>/<same-stem>.png   (8-bit grey heatmap)

Class ids follow the official index order of ``affordance_core.labels.classes_for(split)``.

Training sampling (LOCATE's rule, reproducible): the epoch iterates over exocentric images; item
``i`` is its exo image, ``num_exo - 1`` further exo images of the same ``<aff>/<obj>`` folder and
one egocentric image of ``egocentric/<aff>/<obj>``. Every draw comes from a generator seeded with
``(seed, epoch, i)``, so results do not depend on DataLoader workers and a resumed run sees the
same samples (call :meth:`AGD20KTrain.set_epoch` before each epoch; with ``persistent_workers``
the workers keep the epoch they were started with, so do not combine the two).

Unreadable images (zero bytes, not an image, truncated JPEG) never crash a run and never leave a
silent hole: headers are checked at scan time (cheap) and such files are dropped there; files that
fail to decode later are replaced by the next readable image of the same folder (cyclic order of
the sorted file names, so the replacement does not depend on which worker saw the failure first).
Both are logged with their path and counted in ``dataset.num_skipped`` / ``dataset.skipped``;
decode failures in DataLoader workers reach the main process through a shared append-only file.
"""
from __future__ import annotations

import logging
import os
import tempfile
import weakref
from dataclasses import dataclass, field
from typing import Any, Sequence

import cv2
import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from affordance_core.data.transforms import (MAX_VIEWS, TrainTransform, test_transform,
                                             view_transform)
from affordance_core.labels import classes_for

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')
GT_SIZE = 224  # the metrics compare maps at 224 x 224 (methods.md §1.4)

TRAIN_LAYOUT = ('<root>/<split>/trainset/{exocentric,egocentric}/<affordance>/<object>/*.jpg '
                "(split = 'Seen', 'Unseen' or 'HICO-IIF')")
TEST_LAYOUT = ('<root>/<split>/testset/egocentric/<affordance>/<object>/*.jpg with '
               '<root>/<split>/testset/GT/<affordance>/<object>/<same-stem>.png '
               "(split = 'Seen', 'Unseen' or 'HICO-IIF')")


# ----------------------------------------------------------------------------------------------
# file helpers


def _list_dirs(path: str) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith('.'))


def _list_images(path: str) -> list[str]:
    return sorted(e.name for e in os.scandir(path)
                  if e.is_file() and not e.name.startswith('.')
                  and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS)


def check_image_header(path: str) -> str | None:
    """Cheap readability check (file size and image header, no decoding).

    Returns:
        ``None`` when the header is valid, else the reason it is not.
    """
    try:
        if os.path.getsize(path) == 0:
            return 'empty file (0 bytes)'
        with Image.open(path) as img:
            width, height = img.size
        if width <= 0 or height <= 0:
            return f'invalid size {width}x{height}'
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        return f'{type(exc).__name__}: {exc}'
    return None


def load_rgb(path: str) -> Image.Image:
    """Decode ``path`` fully into an RGB PIL image (raises on unreadable or truncated files)."""
    with Image.open(path) as img:
        img.load()
        return img.convert('RGB')


def _remove_if_owner(path: str, pid: int) -> None:
    if os.getpid() == pid:  # forked DataLoader workers must not delete the main process's file
        try:
            os.remove(path)
        except OSError:
            pass


class SkipRecorder:
    """Process-safe record of unreadable image paths.

    Scan-time failures live in the owning process; decode failures (possibly in DataLoader worker
    processes) are appended, one absolute path per line, to a temporary file that every copy of
    the dataset shares, and that the owning process removes when the recorder is collected.
    """

    def __init__(self) -> None:
        fd, self.path = tempfile.mkstemp(prefix='affordance-skipped-', suffix='.txt')
        os.close(fd)
        self._finalizer = weakref.finalize(self, _remove_if_owner, self.path, os.getpid())
        self.scan_failures: dict[str, str] = {}
        self._logged: set[str] = set()
        self._cache_size = 0
        self._cache: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state['_finalizer'] = None  # a pickled copy (spawned worker) never owns the file
        return state

    def add_scan_failure(self, path: str, reason: str) -> None:
        """Record a file rejected at scan time (logged once)."""
        if path not in self.scan_failures:
            self.scan_failures[path] = reason
            logger.warning('skipping unreadable image %s (%s)', path, reason)

    def record(self, path: str, reason: str) -> None:
        """Record a decode failure seen by this process (logged and appended once per process)."""
        if path in self._logged:
            return
        self._logged.add(path)
        logger.warning('unreadable image %s (%s); replaced by the next image of its folder',
                       path, reason)
        try:
            with open(self.path, 'a', encoding='utf-8') as fh:  # O_APPEND: atomic short writes
                fh.write(path.replace('\n', ' ') + '\n')
        except OSError as exc:  # the count is then only known to this process
            logger.error('cannot record skipped image in %s: %s', self.path, exc)
        self._cache.add(path)

    def runtime_failures(self) -> set[str]:
        """Decode failures recorded by any process so far."""
        try:
            size = os.path.getsize(self.path)
        except OSError:
            return set(self._cache)
        if size != self._cache_size:
            with open(self.path, encoding='utf-8') as fh:
                self._cache |= {line.rstrip('\n') for line in fh if line.strip()}
            self._cache_size = size
        return self._cache

    def all(self) -> list[str]:
        """Every unreadable path (scan time and decode time), sorted, each once."""
        return sorted(set(self.scan_failures) | self.runtime_failures())


def _stratified_subset(labels: Sequence[int], n: int, seed: int) -> list[int]:
    """Deterministic subset of ``n`` indices, proportionally stratified by label.

    Every class is shuffled (seeded), item k of a class of size m gets the score (k + 0.5) / m and
    the ``n`` lowest scores are kept: each class keeps about ``n * m / total`` items.
    """
    if n <= 0 or n >= len(labels):
        return list(range(len(labels)))
    rng = np.random.default_rng([seed, 0x5EB5E7])
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    scored = []
    for label in sorted(by_class):
        idxs = by_class[label]
        for rank, p in enumerate(rng.permutation(len(idxs))):
            scored.append(((rank + 0.5) / len(idxs), label, idxs[p]))
    scored.sort()
    return sorted(i for _, _, i in scored[:n])


class _Base(Dataset):
    """Shared root/split/class handling and skip accounting."""

    def __init__(self, root: str | os.PathLike, split: str, classes: Sequence[str] | None,
                 subset: str, layout: str) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self.split = split
        self.classes: tuple[str, ...] = tuple(classes) if classes is not None \
            else classes_for(split)
        if not self.classes:
            raise ValueError('classes must name at least one affordance')
        self._class_index = {name: i for i, name in enumerate(self.classes)}
        if not os.path.isdir(self.root):
            raise FileNotFoundError(
                f"dataset root '{self.root}' does not exist; expected the layout {layout}")
        split_dir = os.path.join(self.root, split)
        if not os.path.isdir(split_dir):
            found = ', '.join(_list_dirs(self.root)) or 'nothing'
            raise FileNotFoundError(
                f"split folder '{split_dir}' not found (root holds: {found}); expected the "
                f'layout {layout}')
        self.subset_dir = os.path.join(split_dir, subset)
        self._recorder = SkipRecorder()

    def _require_dir(self, path: str, layout: str) -> None:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"folder '{path}' not found; expected the layout {layout}")

    def _affordance_dirs(self, base: str) -> list[str]:
        """Affordance folders of ``base`` in class-index order (unknown ones are logged)."""
        names = []
        for aff in _list_dirs(base):
            if aff in self._class_index:
                names.append(aff)
            else:
                logger.warning("skipping folder '%s': '%s' is not one of the %d '%s' classes",
                               os.path.join(base, aff), aff, len(self.classes), self.split)
        return sorted(names, key=self._class_index.__getitem__)

    def _key(self, *parts: str) -> str:
        return '/'.join((self.split,) + parts)

    def _abs(self, key: str) -> str:
        return os.path.join(self.root, *key.split('/'))

    def _scan_images(self, folder: str, check_images: bool) -> list[str]:
        """Image names of ``folder``, without those whose header is unreadable."""
        names = []
        for name in _list_images(folder):
            path = os.path.join(folder, name)
            reason = check_image_header(path) if check_images else None
            if reason is None:
                names.append(name)
            else:
                self._recorder.add_scan_failure(path, reason)
        return names

    @property
    def skipped(self) -> list[str]:
        """Absolute paths of the unreadable images met so far (scan and decode time)."""
        return self._recorder.all()

    @property
    def num_skipped(self) -> int:
        """Number of unreadable images met so far, over all DataLoader workers."""
        return len(self.skipped)


# ----------------------------------------------------------------------------------------------
# training set


@dataclass
class _Pair:
    """One <affordance>/<object> folder pair; image lists hold keys relative to ``root``."""

    affordance: str
    obj: str
    label: int
    exo: list[str] = field(default_factory=list)
    ego: list[str] = field(default_factory=list)


class AGD20KTrain(_Base):
    """Training set: one sample per exocentric image.

    Args:
        root: folder holding the split folders (``Seen/``, ``Unseen/``, ``HICO-IIF/``).
        split: split folder name; also selects the class list (``labels.classes_for``).
        num_exo: exocentric images per sample (the anchor plus ``num_exo - 1`` from its folder).
            They are drawn without replacement when the folder holds enough other images, else
            with replacement among the others (the anchor is repeated only if it is alone).
        image_size: side S of the output images.
        resize: resize before the random crop (random-augmentation mode, ``views == 0``).
        resize_mode: 'short' (Resize(256) of the shorter side) or 'square' (LoopTrans).
        views: 0 = random official augmentation; 1 or 2 = deterministic view v drawn uniformly in
            [0, views) per image (0 = Resize((S, S)), 1 = + horizontal flip), keys get '#v<v>'.
        load_images: False returns keys and label only (no decoding); for feature-cache epochs.
        max_samples: >0 keeps a deterministic, class-stratified subset of the exo images.
        seed: base seed of every draw.
        classes: class names in index order (default: the official list of ``split``).
        check_images: check every image header at scan time (drops zero-byte / non-image files).

    Items: ``{'ego': (3, S, S), 'exo': (num_exo, 3, S, S), 'label': int, 'ego_key': str,
    'exo_keys': list[str]}`` with keys relative to ``root`` ('Seen/trainset/exocentric/...');
    without 'ego'/'exo' when ``load_images`` is False. Batch them with :func:`collate_train`.

    Raises:
        FileNotFoundError: root, split or trainset folders missing (the message shows the layout).
        ValueError: bad arguments, or no usable sample in the split.
    """

    def __init__(self, root: str | os.PathLike, split: str = 'Seen', *, num_exo: int = 3,
                 image_size: int = 224, resize: int = 256, resize_mode: str = 'short',
                 views: int = 0, load_images: bool = True, max_samples: int = 0, seed: int = 0,
                 classes: Sequence[str] | None = None, check_images: bool = True) -> None:
        if isinstance(num_exo, bool) or not isinstance(num_exo, int) or num_exo < 1:
            raise ValueError(f'num_exo must be an integer >= 1, got {num_exo!r}')
        if not isinstance(views, int) or not 0 <= views <= MAX_VIEWS:
            raise ValueError(f'views must be 0 (random augmentation) or 1..{MAX_VIEWS} '
                             f'(deterministic views), got {views!r}')
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f'seed must be a non-negative integer, got {seed!r}')
        if not isinstance(max_samples, int) or max_samples < 0:
            raise ValueError(f'max_samples must be >= 0 (0 = all), got {max_samples!r}')
        self._train_tf = TrainTransform(image_size, resize, resize_mode)  # validates sizes
        super().__init__(root, split, classes, 'trainset', TRAIN_LAYOUT)
        self.num_exo = num_exo
        self.image_size = image_size
        self.views = views
        self.load_images = load_images
        self.seed = seed
        self.epoch = 0
        self.num_unpaired = 0  # exo images whose folder pair has no readable egocentric image

        exo_dir = os.path.join(self.subset_dir, 'exocentric')
        ego_dir = os.path.join(self.subset_dir, 'egocentric')
        self._require_dir(exo_dir, TRAIN_LAYOUT)
        self._require_dir(ego_dir, TRAIN_LAYOUT)
        self._pairs: list[_Pair] = []
        for aff in self._affordance_dirs(exo_dir):
            for obj in _list_dirs(os.path.join(exo_dir, aff)):
                exo = self._scan_images(os.path.join(exo_dir, aff, obj), check_images)
                if not exo:
                    continue
                ego_folder = os.path.join(ego_dir, aff, obj)
                ego = self._scan_images(ego_folder, check_images) \
                    if os.path.isdir(ego_folder) else []
                if not ego:
                    self.num_unpaired += len(exo)
                    logger.warning('%d exocentric images of %s/%s have no readable egocentric '
                                   "image in '%s'; they are not used", len(exo), aff, obj,
                                   ego_folder)
                    continue
                self._pairs.append(_Pair(
                    aff, obj, self._class_index[aff],
                    exo=[self._key('trainset', 'exocentric', aff, obj, n) for n in exo],
                    ego=[self._key('trainset', 'egocentric', aff, obj, n) for n in ego]))
        samples = [(p, k) for p, pair in enumerate(self._pairs) for k in range(len(pair.exo))]
        if not samples:
            raise ValueError(f"no usable training sample in '{self.subset_dir}': no readable "
                             'exocentric image with a matching egocentric folder; expected the '
                             f'layout {TRAIN_LAYOUT}')
        self.num_total = len(samples)
        keep = _stratified_subset([self._pairs[p].label for p, _ in samples], max_samples, seed)
        self._samples: list[tuple[int, int]] = [samples[i] for i in keep]
        logger.info("AGD20K %s train: %d samples (of %d exo images) in %d folders, %d classes; "
                    '%d unreadable, %d unpaired', split, len(self._samples), self.num_total,
                    len(self._pairs), len({p.label for p in self._pairs}), self.num_skipped,
                    self.num_unpaired)

    def __len__(self) -> int:
        return len(self._samples)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose draws ``__getitem__`` makes (call before each epoch)."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f'epoch must be a non-negative integer, got {epoch!r}')
        self.epoch = epoch

    @property
    def labels(self) -> list[int]:
        """Class id of every sample, in index order (e.g. for samplers)."""
        return [self._pairs[p].label for p, _ in self._samples]

    def _resolve(self, files: list[str], idx: int) -> tuple[str, Image.Image | None]:
        """First readable image of ``files`` from ``idx`` on (cyclic); decodes if loading."""
        bad = self._recorder.runtime_failures()
        for step in range(len(files)):
            key = files[(idx + step) % len(files)]
            path = self._abs(key)
            if path in bad:
                continue
            if not self.load_images:
                return key, None
            try:
                return key, load_rgb(path)
            except Exception as exc:  # PIL raises many types for broken files
                self._recorder.record(path, f'{type(exc).__name__}: {exc}')
        folder = self._abs(files[0].rsplit('/', 1)[0])
        raise RuntimeError(f"all {len(files)} images of '{folder}' are unreadable; remove the "
                           'folder or restore its images')

    def _draw_exo(self, rng: np.random.Generator, n_files: int, anchor: int) -> list[int]:
        others = [k for k in range(n_files) if k != anchor]
        n_more = self.num_exo - 1
        if n_more == 0:
            return [anchor]
        if len(others) >= n_more:
            picks = rng.choice(len(others), size=n_more, replace=False)
        elif others:
            picks = rng.integers(0, len(others), size=n_more)
        else:
            return [anchor] * self.num_exo
        return [anchor] + [others[int(p)] for p in picks]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self._samples):
            raise IndexError(f'index {index} out of range for {len(self._samples)} samples')
        p, anchor = self._samples[index]
        pair = self._pairs[p]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        exo_idx = self._draw_exo(rng, len(pair.exo), anchor)
        ego_idx = int(rng.integers(0, len(pair.ego)))
        view_ids = [int(v) for v in rng.integers(0, self.views, size=self.num_exo + 1)] \
            if self.views else None

        resolved = [self._resolve(pair.exo, k) for k in exo_idx]
        resolved.append(self._resolve(pair.ego, ego_idx))
        keys = [key for key, _ in resolved]
        if view_ids is not None:
            keys = [f'{key}#v{v}' for key, v in zip(keys, view_ids)]
        item: dict[str, Any] = {'label': pair.label, 'ego_key': keys[-1],
                                'exo_keys': keys[:-1]}
        if self.load_images:
            if view_ids is None:
                tensors = [self._train_tf(img, rng) for _, img in resolved]
            else:
                tensors = [view_transform(v, self.image_size)(img)
                           for (_, img), v in zip(resolved, view_ids)]
            item['ego'] = tensors[-1]
            item['exo'] = torch.stack(tensors[:-1])
        return item

    # -- feature-cache helpers ------------------------------------------------------------------

    def image_keys(self) -> list[str]:
        """Every key an epoch can emit (exo and ego images of the used folders, all views).

        Returns:
            sorted keys relative to ``root``, with '#v<v>' for v in [0, views) when views > 0.
        """
        keys = set()
        used = {p for p, _ in self._samples}
        for p in used:
            keys.update(self._pairs[p].exo)
            keys.update(self._pairs[p].ego)
        if self.views:
            keys = {f'{k}#v{v}' for k in keys for v in range(self.views)}
        return sorted(keys)

    def load_key(self, key: str) -> Tensor | None:
        """Decode the image of ``key`` (deterministic view from its '#v<v>' suffix, else view 0).

        Returns:
            (3, S, S) tensor, or ``None`` when the image is unreadable; it is then recorded, so
            later epochs (also with ``load_images=False``) replace it like any other failure.
        """
        base, _, suffix = key.partition('#v')
        view = int(suffix) if suffix else 0
        path = self._abs(base)
        try:
            img = load_rgb(path)
        except Exception as exc:  # PIL raises many types for broken files
            self._recorder.record(path, f'{type(exc).__name__}: {exc}')
            return None
        return view_transform(view, self.image_size)(img)

    def summary(self) -> dict[str, Any]:
        """Counts for logs: samples, unreadable and unpaired images, and per class
        ``{'exo': samples, 'ego': ego images, 'objects': folders}`` (all classes, in order)."""
        per_class = {name: {'exo': 0, 'ego': 0, 'objects': 0} for name in self.classes}
        used = set()
        for p, _ in self._samples:
            per_class[self.classes[self._pairs[p].label]]['exo'] += 1
            used.add(p)
        for p in used:
            entry = per_class[self.classes[self._pairs[p].label]]
            entry['ego'] += len(self._pairs[p].ego)
            entry['objects'] += 1
        return {'split': self.split, 'samples': len(self), 'exo_images': self.num_total,
                'skipped': self.num_skipped, 'unpaired': self.num_unpaired,
                'per_class': per_class}


def collate_train(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch training items.

    Returns:
        ``{'label': (B,) int64, 'ego_key': list[str] (B), 'exo_keys': list[list[str]] (B x N)}``
        plus ``'ego'`` (B, 3, S, S) and ``'exo'`` (B, N, 3, S, S) when the items hold images.
    """
    if not batch:
        raise ValueError('cannot collate an empty batch')
    out: dict[str, Any] = {
        'label': torch.tensor([b['label'] for b in batch], dtype=torch.int64),
        'ego_key': [b['ego_key'] for b in batch],
        'exo_keys': [list(b['exo_keys']) for b in batch],
    }
    if 'ego' in batch[0]:
        out['ego'] = torch.stack([b['ego'] for b in batch])
        out['exo'] = torch.stack([b['exo'] for b in batch])
    return out


# ----------------------------------------------------------------------------------------------
# test set


@dataclass(frozen=True)
class _TestSample:
    image: str   # absolute image path
    gt: str      # absolute GT png path
    label: int
    key: str     # '<aff>_<obj>_<stem>.png'


def load_gt(path: str, size: int = GT_SIZE) -> np.ndarray:
    """Official GT preprocessing: grey png / 255, then bilinear ``cv2.resize`` to (size, size).

    Returns:
        (size, size) float32 array in [0, 1].

    Raises:
        OSError: the png cannot be read.
    """
    mask = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise OSError(f'cv2 cannot read {path}')
    return cv2.resize(mask / 255.0, (size, size)).astype(np.float32)


class AGD20KTest(_Base):
    """Test set: every egocentric test image that has a GT png with the same stem.

    An image under several affordance folders is one sample per affordance.

    Args:
        root: folder holding the split folders.
        split: 'Seen', 'Unseen' or 'HICO-IIF' (selects the class list).
        image_size: side S of the test transform (the GT is always 224 x 224).
        max_samples: >0 keeps a deterministic, class-stratified subset.
        classes: class names in index order (default: the official list of ``split``).
        check_images: check image and GT headers at scan time.

    Items: ``{'image': (3, S, S), 'label': int, 'gt': (224, 224) float32 tensor,
    'key': '<aff>_<obj>_<stem>.png', 'path': str}``. Batch them with :func:`collate_test`.
    """

    def __init__(self, root: str | os.PathLike, split: str = 'Seen', *, image_size: int = 224,
                 max_samples: int = 0, classes: Sequence[str] | None = None,
                 check_images: bool = True) -> None:
        if not isinstance(max_samples, int) or max_samples < 0:
            raise ValueError(f'max_samples must be >= 0 (0 = all), got {max_samples!r}')
        self._transform = test_transform(image_size)  # validates image_size
        super().__init__(root, split, classes, 'testset', TEST_LAYOUT)
        self.image_size = image_size
        self.num_without_gt = 0
        ego_dir = os.path.join(self.subset_dir, 'egocentric')
        gt_dir = os.path.join(self.subset_dir, 'GT')
        self._require_dir(ego_dir, TEST_LAYOUT)
        self._require_dir(gt_dir, TEST_LAYOUT)
        samples: list[_TestSample] = []
        for aff in self._affordance_dirs(ego_dir):
            for obj in _list_dirs(os.path.join(ego_dir, aff)):
                folder = os.path.join(ego_dir, aff, obj)
                for name in _list_images(folder):
                    stem = os.path.splitext(name)[0]
                    gt = os.path.join(gt_dir, aff, obj, stem + '.png')
                    if not os.path.isfile(gt):
                        self.num_without_gt += 1
                        continue
                    image = os.path.join(folder, name)
                    if check_images:
                        bad = [(p, r) for p in (image, gt)
                               if (r := check_image_header(p)) is not None]
                        if bad:
                            for p, r in bad:
                                self._recorder.add_scan_failure(p, r)
                            continue
                    samples.append(_TestSample(image, gt, self._class_index[aff],
                                               f'{aff}_{obj}_{stem}.png'))
        if not samples:
            raise ValueError(f"no test sample in '{self.subset_dir}': no readable egocentric "
                             f'image with a matching GT png; expected the layout {TEST_LAYOUT}')
        self.num_total = len(samples)
        keep = _stratified_subset([s.label for s in samples], max_samples, 0)
        self._samples = [samples[i] for i in keep]
        if self.num_without_gt:
            logger.info('%d test images without a GT png are not test samples',
                        self.num_without_gt)
        logger.info('AGD20K %s test: %d samples (of %d), %d unreadable', split,
                    len(self._samples), self.num_total, self.num_skipped)

    def __len__(self) -> int:
        return len(self._samples)

    @property
    def labels(self) -> list[int]:
        """Class id of every sample, in index order."""
        return [s.label for s in self._samples]

    @property
    def keys(self) -> list[str]:
        """Evaluation key of every sample, in index order."""
        return [s.key for s in self._samples]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self._samples):
            raise IndexError(f'index {index} out of range for {len(self._samples)} samples')
        bad = self._recorder.runtime_failures()
        n = len(self._samples)
        for step in range(n):
            sample = self._samples[(index + step) % n]
            if sample.image in bad or sample.gt in bad:
                continue
            try:
                img = load_rgb(sample.image)
            except Exception as exc:  # PIL raises many types for broken files
                self._recorder.record(sample.image, f'{type(exc).__name__}: {exc}')
                continue
            try:
                gt = load_gt(sample.gt)
            except Exception as exc:
                self._recorder.record(sample.gt, f'{type(exc).__name__}: {exc}')
                continue
            return {'image': self._transform(img), 'label': sample.label,
                    'gt': torch.from_numpy(gt), 'key': sample.key, 'path': sample.image}
        raise RuntimeError(f"every test image or GT under '{self.subset_dir}' is unreadable")

    def summary(self) -> dict[str, Any]:
        """Counts for logs: samples, unreadable images, images without GT, samples per class."""
        per_class = {name: 0 for name in self.classes}
        for s in self._samples:
            per_class[self.classes[s.label]] += 1
        return {'split': self.split, 'samples': len(self), 'skipped': self.num_skipped,
                'without_gt': self.num_without_gt, 'per_class': per_class}


def collate_test(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch test items.

    Returns:
        ``{'image': (B, 3, S, S), 'label': (B,) int64, 'gt': (B, 224, 224) float32,
        'key': list[str], 'path': list[str]}``.
    """
    if not batch:
        raise ValueError('cannot collate an empty batch')
    return {
        'image': torch.stack([b['image'] for b in batch]),
        'label': torch.tensor([b['label'] for b in batch], dtype=torch.int64),
        'gt': torch.stack([b['gt'] for b in batch]),
        'key': [b['key'] for b in batch],
        'path': [b['path'] for b in batch],
    }
