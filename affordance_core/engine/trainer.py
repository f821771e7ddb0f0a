"""Training loop: ``Trainer(cfg).fit(resume=False)`` (methods.md §0.4-0.5, §3.4).

One epoch = one pass over the exocentric images (``data.agd20k.AGD20KTrain``), SGD with the
official parameter groups (``engine.optim``), the weighted loss recipe (``engine.task``), then
``StepLR.step()``, an evaluation on the test set every ``train.eval_every`` epochs and the
checkpoints. Everything goes to ``train.output_dir``:

* ``config.yaml``: the resolved config;
* ``last.pt``: model + train state (optimizer, scheduler, AMP scaler, epoch, global step, best
  metric, history and the RNG states of torch / numpy / python / CUDA / the model's own
  generators), written atomically after every epoch; it loads with ``weights_only=True``;
* ``best.pt``: the model of the best evaluated epoch by ``train.select_by`` (KLD: lower is
  better; SIM, NSS: higher), as in the official scripts that keep the best test epoch;
* ``history.json`` and ``training_curves.png``; ``tb/`` TensorBoard scalars and overlays;
* ``feature_cache/`` with ``train.cache_features`` (see ``engine.feature_cache``).

Resuming (``fit(resume=True)``) restarts after the last *completed* epoch of ``last.pt`` and
replays exactly what an uninterrupted run would do: the data order depends only on
``(seed, epoch)`` (seeded sampler + ``dataset.set_epoch``), and every RNG is restored.

Multi-GPU: launched by ``torchrun`` (``WORLD_SIZE`` > 1), every rank trains on its
``DistributedSampler`` shard of ``batch_size / world_size`` samples per step with a DDP-wrapped
model; rank 0 alone evaluates and writes files.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from affordance_core.checkpoint import (CheckpointError, atomic_write_text, read_checkpoint,
                                        save_checkpoint)
from affordance_core.config import ExperimentConfig, save_config, to_dict
from affordance_core.engine import distributed as dist_utils
from affordance_core.engine import feature_cache as fc
from affordance_core.engine.optim import build_optimizer, build_scheduler
from affordance_core.engine.task import AffordanceTask
from affordance_core.labels import classes_for
from affordance_core.metrics.evaluator import json_safe

__all__ = ['Trainer', 'SELECT_BY', 'capture_rng_state', 'restore_rng_state']

logger = logging.getLogger(__name__)

# select_by -> (metric key of the evaluator, True when lower is better)
SELECT_BY: dict[str, tuple[str, bool]] = {'kld': ('KLD', True), 'sim': ('SIM', False),
                                          'nss': ('NSS', False)}
_CURVE_SKIP = ('time_s', 'samples_per_s', 'skipped', 'backbone_images')


# ---------------------------------------------------------------------------------------------
# RNG state (plain tensors / lists / numbers only, so checkpoints load with weights_only=True)


def _model_generators(model: nn.Module) -> dict[str, torch.Generator]:
    """``torch.Generator`` attributes of the model's modules (e.g. LOCATE's k-means seed)."""
    found = {}
    for mod_name, module in model.named_modules():
        for attr, value in vars(module).items():
            if isinstance(value, torch.Generator):
                found[f'{mod_name}.{attr}' if mod_name else attr] = value
    return found


def capture_rng_state(model: nn.Module | None = None) -> dict[str, Any]:
    """Every RNG a training step may draw from, as weights-only-loadable data.

    Returns:
        ``{'torch': ByteTensor, 'cuda': [ByteTensor] | None, 'numpy': {...}, 'python': [...],
        'generators': {name: ByteTensor}}``.
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        'torch': torch.get_rng_state(),
        'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        'numpy': {'kind': str(kind), 'keys': torch.from_numpy(keys.astype(np.int64)),
                  'pos': int(pos), 'has_gauss': int(has_gauss), 'cached_gaussian': float(gauss)},
        'python': [int(version), list(internal), gauss_next],
        'generators': {k: g.get_state() for k, g in _model_generators(model).items()}
        if model is not None else {},
    }


def restore_rng_state(state: dict[str, Any], model: nn.Module | None = None) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state['torch'])
    if state.get('cuda') is not None and torch.cuda.is_available():
        cuda_states = state['cuda']
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            logger.warning('checkpoint holds %d CUDA RNG states for %d devices; not restored',
                           len(cuda_states), torch.cuda.device_count())
    npst = state['numpy']
    np.random.set_state((npst['kind'], npst['keys'].numpy().astype(np.uint32), npst['pos'],
                         npst['has_gauss'], npst['cached_gaussian']))
    version, internal, gauss_next = state['python']
    random.setstate((version, tuple(internal), gauss_next))
    if model is not None:
        gens = _model_generators(model)
        for name, gstate in state.get('generators', {}).items():
            if name in gens:
                gens[name].set_state(gstate)
            else:
                logger.warning("RNG state of model generator '%s' has no matching generator",
                               name)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _generator(*entropy: int) -> torch.Generator:
    seed = int(np.random.SeedSequence(list(entropy)).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(seed % 2**63)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# ---------------------------------------------------------------------------------------------


class Trainer:
    """Train a registered model with an :class:`ExperimentConfig`.

    Building the trainer validates the config, scans the datasets and builds the model, the loss
    recipe and the optimizer; nothing is written before :meth:`fit`.

    Args:
        cfg: the resolved experiment config.
        progress: show tqdm bars (rank 0 only).

    Raises:
        ValueError: invalid settings, unknown model or loss, unusable dataset.
        FileNotFoundError: missing dataset folders or backbone weights.
    """

    def __init__(self, cfg: ExperimentConfig, *, progress: bool = True) -> None:
        self.cfg = cfg
        self._validate(cfg)
        self.dist = dist_utils.init_distributed(cfg.train.device)
        self.device = self.dist.device
        self.is_main = self.dist.is_main
        self.progress = bool(progress) and self.is_main
        self.output_dir = Path(cfg.train.output_dir)
        self.classes = classes_for(cfg.data.split)
        if cfg.train.batch_size % self.dist.world_size:
            raise ValueError(f'train.batch_size={cfg.train.batch_size} must be divisible by the '
                             f'number of processes ({self.dist.world_size})')
        self.local_batch = cfg.train.batch_size // self.dist.world_size
        seed_everything(cfg.train.seed)

        self._build_datasets()
        self.model = self._build_model()
        self.fields = tuple(getattr(self.model, 'feature_fields', ()) or ())
        if cfg.train.cache_features and not self.fields:
            raise ValueError(f"train.cache_features=true but model '{cfg.model.name}' declares "
                             'no feature_fields (it needs the images, e.g. a second backbone '
                             'or a trained one); set train.cache_features=false')
        from affordance_core.models.backbone import BackboneOutput
        unknown = set(cfg.train.cache_extra_fields) - set(BackboneOutput.FIELDS)
        if unknown:
            raise ValueError(f'train.cache_extra_fields: unknown fields {sorted(unknown)}; '
                             f'expected a subset of {BackboneOutput.FIELDS}')
        if self.fields:
            self.fields += tuple(f for f in BackboneOutput.FIELDS
                                 if f in cfg.train.cache_extra_fields and f not in self.fields)
        self.task = AffordanceTask(self.model, cfg.losses)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.epochs)
        self.use_amp = bool(cfg.train.amp) and self.device.type == 'cuda'
        self.scaler = torch.amp.GradScaler('cuda', enabled=self.use_amp)
        self.train_module: nn.Module = self.task
        if self.dist.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [self.device.index] if self.device.type == 'cuda' else None
            # a method whose training forward leaves parameters unused sets this attribute
            unused = bool(getattr(self.model, 'ddp_find_unused_parameters', False))
            self.train_module = DDP(self.task, device_ids=ids, find_unused_parameters=unused)

        self.postprocess = str(getattr(self.model, 'postprocess', 'locate'))
        self.epoch = 0                       # completed epochs
        self.global_step = 0
        self.best_value: float | None = None
        self.best_epoch: int | None = None
        self.best_metrics: dict[str, Any] | None = None
        self.history: list[dict[str, Any]] = []
        self.writer: Any = None
        self.train_cache: fc.FeatureCache | None = None
        self.test_cache: fc.FeatureCache | None = None
        self.gt_cache: fc.FeatureCache | None = None
        self._test_keys: list[str] = []
        self._test_labels: list[int] = []
        self._backbone_images = 0            # images run through the backbone this epoch
        self._best_improved = False
        self._resumed_from: int | None = None

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _validate(cfg: ExperimentConfig) -> None:
        t = cfg.train
        checks = [
            (t.epochs >= 1, f'train.epochs must be >= 1, got {t.epochs}'),
            (t.batch_size >= 1, f'train.batch_size must be >= 1, got {t.batch_size}'),
            (t.select_by in SELECT_BY, f"train.select_by must be one of "
             f"{', '.join(SELECT_BY)}, got '{t.select_by}'"),
            (t.eval_every >= 0, f'train.eval_every must be >= 0 (0 = never), got {t.eval_every}'),
            (t.log_every >= 1, f'train.log_every must be >= 1, got {t.log_every}'),
            (t.max_steps_per_epoch >= 0, 'train.max_steps_per_epoch must be >= 0 (0 = full '
             f'epochs), got {t.max_steps_per_epoch}'),
            (t.num_overlays >= 0, f'train.num_overlays must be >= 0, got {t.num_overlays}'),
            (not t.cache_features or 1 <= t.cache_views <= 2,
             f'train.cache_views must be 1 (plain) or 2 (+ flip), got {t.cache_views}'),
            (cfg.data.num_workers >= 0, f'data.num_workers must be >= 0, '
             f'got {cfg.data.num_workers}'),
            (bool(t.output_dir), 'train.output_dir must not be empty'),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def _build_datasets(self) -> None:
        from affordance_core.data.agd20k import AGD20KTest, AGD20KTrain

        d, t = self.cfg.data, self.cfg.train
        views = t.cache_views if t.cache_features else 0
        self.train_set = AGD20KTrain(d.root, d.split, num_exo=d.num_exo, image_size=d.image_size,
                                     resize=d.resize, resize_mode=d.resize_mode, views=views,
                                     load_images=True, max_samples=d.max_train_samples,
                                     seed=t.seed)
        self.keys_set = None
        if t.cache_features:  # the same samples, keys only (epochs that read the cache)
            self.keys_set = copy.copy(self.train_set)  # shares the scan and the skip record
            self.keys_set.load_images = False
        self.test_set = None
        if t.eval_every > 0 and self.is_main:
            self.test_set = AGD20KTest(d.root, d.split, image_size=d.image_size,
                                       max_samples=d.max_test_samples)
        if self.is_main:
            s = self.train_set.summary()
            logger.info('train set: %d samples (%d exo images), %d unreadable, %d unpaired, '
                        '%d of %d classes present; views=%d', s['samples'], s['exo_images'],
                        s['skipped'], s['unpaired'],
                        sum(v['exo'] > 0 for v in s['per_class'].values()), len(self.classes),
                        views)
            if self.test_set is not None:
                st = self.test_set.summary()
                logger.info('test set: %d samples, %d unreadable, %d without GT', st['samples'],
                            st['skipped'], st['without_gt'])

    def _build_model(self) -> nn.Module:
        from affordance_core.registry import create_model

        m = self.cfg.model
        kwargs = dict(m.kwargs)
        clash = {'num_classes', 'classes', 'backbone_weights'} & set(kwargs)
        if clash:
            raise ValueError(f'model.kwargs must not set {sorted(clash)}; use model.num_classes '
                             '/ model.backbone_weights (the classes come from data.split)')
        num_classes = m.num_classes or len(self.classes)
        try:
            model = create_model(m.name, num_classes=num_classes, classes=list(self.classes),
                                 backbone_weights=m.backbone_weights or None, **kwargs)
        except TypeError as exc:  # unknown constructor keyword in model.kwargs
            raise ValueError(f"model '{m.name}' rejected its arguments ({exc}); check "
                             'model.kwargs') from None
        model.to(self.device)
        if self.dist.distributed and self.device.type == 'cuda':
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in model.parameters())
        if self.is_main:
            logger.info('model %s: %d classes, %.2fM trainable of %.2fM parameters, device %s',
                        m.name, num_classes, n_train / 1e6, n_all / 1e6, self.device)
        return model

    # ------------------------------------------------------------------ paths
    @property
    def last_path(self) -> Path:
        return self.output_dir / 'last.pt'

    @property
    def best_path(self) -> Path:
        return self.output_dir / 'best.pt'

    def _autocast(self) -> Any:
        if self.use_amp:
            return torch.autocast(device_type='cuda', dtype=torch.float16)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ public API
    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train until ``train.epochs`` epochs are completed.

        Args:
            resume: continue from ``<output_dir>/last.pt`` (after its last completed epoch).

        Returns:
            summary: ``{'output_dir', 'epochs', 'global_step', 'select_by', 'best_metric',
            'best_epoch', 'best' (metrics of the best epoch or None), 'last_metrics',
            'last_checkpoint', 'best_checkpoint' (None without an evaluation), 'config',
            'history', 'curves', 'resumed_from'}``.

        Raises:
            FileNotFoundError: ``resume`` without ``last.pt``.
            CheckpointError: ``last.pt`` is unreadable or belongs to another model.
        """
        resumed_from = None
        if resume:
            resumed_from = self._resumed_from if self._resumed_from is not None \
                else self.resume()
        elif self.last_path.exists() and self.is_main:
            logger.warning('%s exists; starting from scratch and overwriting it (pass --resume '
                           'to continue that run)', self.last_path)
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.output_dir / 'config.yaml')
            self._open_writer()
        self._open_caches()
        try:
            if self.epoch >= self.cfg.train.epochs:
                logger.info('all %d epochs are already done', self.cfg.train.epochs)
            for epoch in range(self.epoch, self.cfg.train.epochs):
                self._run_epoch(epoch)
        finally:
            if self.writer is not None:
                self.writer.close()
                self.writer = None
        dist_utils.barrier()
        return self.summary(resumed_from)

    def summary(self, resumed_from: int | None = None) -> dict[str, Any]:
        """Where the run stands (see :meth:`fit`)."""
        last = next((h for h in reversed(self.history) if 'KLD' in h), None)
        return {
            'output_dir': str(self.output_dir),
            'epochs': self.epoch,
            'global_step': self.global_step,
            'select_by': self.cfg.train.select_by,
            'best_metric': self.best_value,
            'best_epoch': self.best_epoch,
            'best': self.best_metrics,
            'last_metrics': {k: last[k] for k in ('KLD', 'SIM', 'NSS')} if last else None,
            'last_checkpoint': str(self.last_path),
            'best_checkpoint': str(self.best_path) if self.best_epoch is not None else None,
            'config': str(self.output_dir / 'config.yaml'),
            'history': str(self.output_dir / 'history.json'),
            'curves': str(self.output_dir / 'training_curves.png'),
            'resumed_from': resumed_from,
        }

    # ------------------------------------------------------------------ set-up helpers
    def _open_writer(self) -> None:
        if not self.cfg.train.tensorboard:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            logger.info('TensorBoard logging skipped (%s); pip install tensorboard', exc)
            return
        self.writer = SummaryWriter(log_dir=str(self.output_dir / 'tb'),
                                    purge_step=self.global_step if self.global_step else None)

    def _open_caches(self) -> None:
        if not self.cfg.train.cache_features:
            return
        d = self.cfg.data
        fp = fc.backbone_fingerprint(self.model.backbone, image_size=d.image_size,
                                     root=str(Path(d.root).resolve()), split=d.split)
        base = Path(self.cfg.train.cache_dir) if self.cfg.train.cache_dir else \
            self.output_dir / 'feature_cache'
        suffix = f'-rank{self.dist.rank}' if self.dist.distributed else ''
        self.train_cache = fc.open_feature_cache(base, self.fields,
                                                 {**fp, 'views': self.cfg.train.cache_views},
                                                 name='train' + suffix)
        if self.test_set is not None:
            self.test_cache = fc.open_feature_cache(base, self.fields, fp, name='test')
            self.gt_cache = fc.open_feature_cache(base, ('gt',), fp, name='test_gt',
                                                  dtype=torch.float32)

    def resume(self) -> int:
        """Load ``<output_dir>/last.pt`` (model, optimizer, scheduler, counters, RNG states).

        :meth:`fit` with ``resume=True`` calls it unless it was called already.

        Returns:
            the number of completed epochs in the checkpoint.

        Raises:
            FileNotFoundError: no ``last.pt``.
            CheckpointError: unreadable, or written for another model or parameter layout.
        """
        path = self.last_path
        if not path.is_file():
            raise FileNotFoundError(f'cannot resume: {path} does not exist (train.output_dir='
                                    f'{self.output_dir}); run without --resume to start')
        payload = read_checkpoint(path)
        if payload['model'] != self.cfg.model.name:
            raise CheckpointError(f"{path} holds model '{payload['model']}', the config asks for "
                                  f"'{self.cfg.model.name}'")
        state = payload.get('train_state')
        if not state:
            raise CheckpointError(f'{path} has no train state (not a last.pt of a training run)')
        model = getattr(self.model, 'module', self.model)
        try:
            model.load_state_dict(payload['state_dict'], strict=True)
            self.optimizer.load_state_dict(state['optimizer'])
        except (RuntimeError, ValueError) as exc:
            raise CheckpointError(f'{path} does not fit this config: '
                                  f'{str(exc).splitlines()[0]}') from None
        if self.scheduler is not None and state.get('scheduler') is not None:
            self.scheduler.load_state_dict(state['scheduler'])
        if self.use_amp and state.get('scaler'):
            self.scaler.load_state_dict(state['scaler'])
        self.epoch = int(state['epoch'])
        self.global_step = int(state['global_step'])
        best = state.get('best') or {}
        self.best_value = best.get('value')
        self.best_epoch = best.get('epoch')
        self.best_metrics = best.get('metrics')
        self.history = list(state.get('history', []))
        rng = state['rng']
        if len(rng) != self.dist.world_size:
            logger.warning('%s was written by %d process(es), this run has %d; RNG states are '
                           'reused cyclically, so the run is not an exact continuation', path,
                           len(rng), self.dist.world_size)
        restore_rng_state(rng[self.dist.rank % len(rng)], model)
        if self.is_main:
            logger.info('resumed from %s: %d epoch(s) done, step %d, best %s=%s', path,
                        self.epoch, self.global_step, self.cfg.train.select_by, self.best_value)
        self._resumed_from = self.epoch
        return self.epoch

    # ------------------------------------------------------------------ one epoch
    def _loader(self, dataset: Any, epoch: int) -> torch.utils.data.DataLoader:
        from affordance_core.data.agd20k import collate_train

        dataset.set_epoch(epoch)
        seed = self.cfg.train.seed
        if self.dist.distributed:
            sampler: Any = torch.utils.data.DistributedSampler(
                dataset, num_replicas=self.dist.world_size, rank=self.dist.rank, shuffle=True,
                seed=seed)
            sampler.set_epoch(epoch)
        else:
            sampler = torch.utils.data.RandomSampler(dataset, generator=_generator(seed, epoch, 0))
        return torch.utils.data.DataLoader(
            dataset, batch_size=self.local_batch, sampler=sampler,
            num_workers=self.cfg.data.num_workers, collate_fn=collate_train,
            pin_memory=self.device.type == 'cuda', drop_last=False,
            generator=_generator(seed, epoch, 1))

    def _run_epoch(self, epoch: int) -> None:
        cfg = self.cfg
        t0 = time.perf_counter()
        lr = self._base_lr()
        stats = self._train_epoch(epoch)
        hook = getattr(getattr(self.model, 'module', self.model), 'epoch_end', None)
        if callable(hook):  # per-method end-of-epoch step (e.g. C2AM's polarity check)
            hook(epoch)
        if self.scheduler is not None:
            self.scheduler.step()
        self._complete_train_cache(epoch)
        entry: dict[str, Any] = {'epoch': epoch + 1, 'lr': lr, **stats,
                                 'time_s': time.perf_counter() - t0}
        metrics = None
        last_epoch = epoch + 1 == cfg.train.epochs
        if cfg.train.eval_every and ((epoch + 1) % cfg.train.eval_every == 0 or last_epoch):
            metrics = self._evaluate(epoch)
        if metrics is not None:
            entry.update({k: metrics[k] for k in ('KLD', 'SIM', 'NSS')})
            self._update_best(epoch, metrics)
        skipped = self.train_set.num_skipped
        entry['skipped'] = skipped
        if skipped:
            logger.warning('%d unreadable training image(s) so far (replaced by others of their '
                           'folder); see the log for their paths', skipped)
        self.history.append(entry)
        self.epoch = epoch + 1
        self._log_epoch(entry)
        self._save(epoch, metrics)

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        cfg = self.cfg
        self.task.train()
        use_cache = self.train_cache is not None
        # keys only (no decoding, no backbone) once every view is cached: after the first epoch,
        # or from the start when an on-disk cache of the same backbone and data is complete
        keys_only = use_cache and (epoch > 0 or not self.train_cache.missing(
            self.train_set.image_keys()))
        dataset = self.keys_set if keys_only else self.train_set
        loader = self._loader(dataset, epoch)
        steps = len(loader)
        if cfg.train.max_steps_per_epoch:
            steps = min(steps, cfg.train.max_steps_per_epoch)
        self._backbone_images = 0
        sums: dict[str, Tensor] = {}
        n_steps, n_samples = 0, 0
        t0 = time.perf_counter()
        bar = tqdm(total=steps, desc=f'epoch {epoch + 1}/{cfg.train.epochs}', unit='it',
                   disable=not self.progress, leave=False, dynamic_ncols=True)
        try:
            for step, batch in enumerate(loader):
                if step >= steps:
                    break
                values = self._train_step(batch, epoch)
                if values is None:
                    continue
                for k, v in values.items():
                    sums[k] = sums[k] + v if k in sums else v
                n_steps += 1
                n_samples += int(batch['label'].shape[0])
                self.global_step += 1
                if self.global_step % cfg.train.log_every == 0 and self.is_main:
                    if self.writer is not None:
                        for k, v in values.items():
                            self.writer.add_scalar(f'train/{k}', float(v), self.global_step)
                        self.writer.add_scalar('train/lr', self._base_lr(), self.global_step)
                    if not self.progress:  # a log line stands in for the progress bar
                        logger.info('epoch %d step %d/%d: loss %.4f (%.1f samples/s)',
                                    epoch + 1, step + 1, steps, float(values['loss']),
                                    n_samples / max(time.perf_counter() - t0, 1e-9))
                if self.progress:
                    bar.set_postfix(loss=f"{float(values['loss']):.4f}")
                bar.update(1)
        finally:
            bar.close()
        elapsed = time.perf_counter() - t0
        stats = {k: float(dist_utils.all_reduce_mean(v / max(n_steps, 1)))
                 for k, v in sorted(sums.items(), key=lambda kv: kv[0] != 'loss')}
        stats['samples_per_s'] = n_samples * self.dist.world_size / max(elapsed, 1e-9)
        if use_cache:
            stats['backbone_images'] = self._backbone_images
            logger.info('epoch %d: %d image(s) through the backbone, %d features cached',
                        epoch + 1, self._backbone_images, len(self.train_cache))
        return stats

    def _base_lr(self) -> float:
        g = self.optimizer.param_groups[0]
        return float(g['lr'] / g.get('lr_mult', 1.0))

    def _train_step(self, batch: dict[str, Any], epoch: int) -> dict[str, Tensor] | None:
        """One optimisation step; returns the detached loss values (None: batch skipped)."""
        inputs = self._prepare_batch(batch)
        if inputs is None:
            return None
        with self._autocast():
            out = self.train_module(inputs, epoch)
        loss = out['loss']
        if not torch.isfinite(loss):
            raise FloatingPointError(f'loss is {float(loss)} at epoch {epoch + 1}, step '
                                     f'{self.global_step + 1}; lower optim.lr or check the data')
        self.optimizer.zero_grad(set_to_none=True)
        if loss.requires_grad:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return {k: v.detach().float() for k, v in out.items()}

    def _prepare_batch(self, batch: dict[str, Any]) -> dict[str, Any] | None:
        """Move a collated batch to the device; with the feature cache, attach features."""
        dev = self.device
        if self.train_cache is None:
            return {'ego': batch['ego'].to(dev, non_blocking=True),
                    'exo': batch['exo'].to(dev, non_blocking=True),
                    'label': batch['label'].to(dev, non_blocking=True),
                    'ego_key': batch['ego_key'], 'exo_keys': batch['exo_keys']}
        from affordance_core.models.backbone import BackboneOutput

        ego_keys, exo_lists, labels = list(batch['ego_key']), batch['exo_keys'], batch['label']
        exo_keys = [k for ks in exo_lists for k in ks]
        backbone = getattr(self.model, 'module', self.model).backbone
        cache = self.train_cache
        n_before = len(cache)
        if 'ego' in batch:  # image epoch: compute what is missing from the decoded batch
            ego_f = fc.lookup(cache, backbone, ego_keys, batch['ego'], dev, self._autocast)
            exo_f = fc.lookup(cache, backbone, exo_keys, batch['exo'].flatten(0, 1), dev,
                              self._autocast)
        else:  # cache epoch: decode only what is missing (normally nothing)
            images = {}
            missing = cache.missing(ego_keys + exo_keys)
            if missing:
                assert self.keys_set is not None, 'Trainer: cache epoch without keys dataset'
                images = {k: self.keys_set.load_key(k) for k in missing}
                bad = {k for k, v in images.items() if v is None}
                if bad:
                    keep = [i for i, (e, xs) in enumerate(zip(ego_keys, exo_lists))
                            if e not in bad and not bad & set(xs)]
                    logger.warning('dropping %d sample(s) with unreadable images %s',
                                   len(ego_keys) - len(keep), sorted(bad)[:3])
                    if not keep:
                        return None
                    ego_keys = [ego_keys[i] for i in keep]
                    exo_lists = [exo_lists[i] for i in keep]
                    exo_keys = [k for ks in exo_lists for k in ks]
                    labels = labels[keep]
            ego_f = fc.lookup(cache, backbone, ego_keys, images, dev, self._autocast)
            exo_f = fc.lookup(cache, backbone, exo_keys, images, dev, self._autocast)
        self._backbone_images += len(cache) - n_before
        return {'ego': None, 'exo': None, 'label': labels.to(dev, non_blocking=True),
                'ego_feats': BackboneOutput.from_dict(ego_f),
                'exo_feats': BackboneOutput.from_dict(exo_f),
                'ego_key': ego_keys, 'exo_keys': exo_lists}

    def _complete_train_cache(self, epoch: int) -> None:
        """After a full image epoch, cache every remaining view so later epochs skip the
        backbone entirely (not with ``max_steps_per_epoch``, where misses are filled lazily)."""
        cache = self.train_cache
        if cache is None:
            return
        if not self.cfg.train.max_steps_per_epoch and epoch + 1 < self.cfg.train.epochs:
            backbone = getattr(self.model, 'module', self.model).backbone
            stats = fc.fill(cache, backbone, self.train_set.load_key,
                            self.train_set.image_keys(), device=self.device,
                            batch_size=max(self.local_batch, 16),
                            num_workers=self.cfg.data.num_workers, progress=self.progress,
                            desc='caching remaining views', autocast=self._autocast)
            if stats['computed'] or stats['unreadable']:
                logger.info('feature cache completed: %d computed, %d unreadable, %d total',
                            stats['computed'], stats['unreadable'], len(cache))
        cache.flush()

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, epoch: int) -> dict[str, Any] | None:
        if not self.is_main or self.test_set is None:
            return None
        model = getattr(self.model, 'module', self.model)
        t0 = time.perf_counter()
        if self.test_cache is not None and getattr(model, 'predicts_from_features', True):
            result = self._evaluate_cached(model)
        else:
            from affordance_core.engine.evaluation import evaluate_model
            result = evaluate_model(model, self.test_set, device=self.device,
                                    batch_size=self.cfg.train.batch_size,
                                    num_workers=self.cfg.data.num_workers, out_dir=None,
                                    num_overlays=0, progress=self.progress,
                                    postprocess=self.postprocess, classes=self.classes)
        overall = result['overall']
        logger.info('epoch %d test: KLD %.4f  SIM %.4f  NSS %.4f  (%d images, %.1f s)',
                    epoch + 1, overall['KLD'], overall['SIM'], overall['NSS'], overall['count'],
                    time.perf_counter() - t0)
        if self.writer is not None:
            for k in ('KLD', 'SIM', 'NSS'):
                self.writer.add_scalar(f'eval/{k}', overall[k], epoch + 1)
            self._write_overlays(model, result, epoch)
        return overall

    def _fill_test_cache(self, model: nn.Module) -> None:
        """Decode the test set once; store its features and GT maps."""
        from affordance_core.data.agd20k import collate_test

        assert self.test_cache is not None and self.gt_cache is not None, 'Trainer: no cache'
        wanted = self.test_set.keys
        if self.test_cache.missing(wanted) or self.gt_cache.missing(wanted):
            loader = torch.utils.data.DataLoader(
                self.test_set, batch_size=max(self.cfg.train.batch_size, 16), shuffle=False,
                num_workers=self.cfg.data.num_workers, collate_fn=collate_test)
            for batch in tqdm(loader, desc='caching test features', unit='batch',
                              disable=not self.progress, leave=False):
                keys = batch['key']
                if not self.test_cache.missing(keys) and not self.gt_cache.missing(keys):
                    continue
                with self._autocast():
                    feats = fc.compute_features(model.backbone, batch['image'].to(self.device),
                                                self.fields)
                self.test_cache.put(keys, feats)
                self.gt_cache.put(keys, {'gt': batch['gt']})
            self.test_cache.flush()
            self.gt_cache.flush()
        labels = self.test_set.labels
        self._test_keys = [k for k in wanted if k in self.test_cache and k in self.gt_cache]
        lab = dict(zip(wanted, labels))
        self._test_labels = [lab[k] for k in self._test_keys]
        if len(self._test_keys) < len(wanted):
            logger.warning('%d test image(s) are unreadable and left out of the evaluation',
                           len(wanted) - len(self._test_keys))

    @torch.no_grad()
    def _evaluate_cached(self, model: nn.Module) -> dict[str, Any]:
        """Official metrics from cached test features (same numbers as ``evaluate_model`` up to
        the cache's float16 rounding)."""
        from affordance_core.metrics.evaluator import AffordanceEvaluator

        if not self._test_keys:
            self._fill_test_cache(model)
        evaluator = AffordanceEvaluator(self.classes, postprocess=self.postprocess)
        from affordance_core.models.backbone import BackboneOutput

        was_training = model.training
        model.eval()
        bs = max(self.cfg.train.batch_size, 16)
        try:
            for i in range(0, len(self._test_keys), bs):
                keys = self._test_keys[i:i + bs]
                labels = torch.tensor(self._test_labels[i:i + bs], dtype=torch.long,
                                      device=self.device)
                feats = BackboneOutput.from_dict(self.test_cache.get(keys, self.device))
                raw = model.predict_raw(None, labels, feats=feats)
                gts = self.gt_cache.get(keys)['gt'].numpy()
                evaluator.process(raw.float().cpu(), gts, labels.cpu(), keys)
        finally:
            model.train(was_training)
        return evaluator.evaluate()

    def _write_overlays(self, model: nn.Module, result: dict[str, Any], epoch: int) -> None:
        """A few predicted heatmaps (beside the GT) as TensorBoard images."""
        k = min(self.cfg.train.num_overlays, len(self.test_set))
        if k == 0:
            return
        from affordance_core.metrics.postprocess import normalize_map
        from affordance_core.models.backbone import BackboneOutput
        from affordance_core.viz import overlay, side_by_side

        mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
        was_training = model.training
        model.eval()
        try:
            for i in range(k):
                item = self.test_set[i]
                image = item['image']
                label = torch.tensor([item['label']], device=self.device)
                with torch.no_grad():
                    if self.test_cache is not None and item['key'] in self.test_cache \
                            and getattr(model, 'predicts_from_features', True):
                        feats = BackboneOutput.from_dict(
                            self.test_cache.get([item['key']], self.device))
                        raw = model.predict_raw(None, label, feats=feats)
                    else:
                        raw = model.predict_raw(image[None].to(self.device), label)
                pred = normalize_map(raw[0].float().cpu().numpy(), 224)
                rgb = ((image * std + mean).clamp(0, 1) * 255).round().byte()
                rgb = rgb.permute(1, 2, 0).numpy()
                gt = np.clip(item['gt'].numpy(), 0, 1)
                rec = result.get('per_image', {}).get(item['key'], {})
                title = f"{self.classes[item['label']]}"
                if rec:
                    title += f"  KLD {rec['KLD']:.2f} SIM {rec['SIM']:.2f}"
                tile = side_by_side([overlay(rgb, pred), overlay(rgb, gt)], [title, 'GT'])
                self.writer.add_image(f'overlay/{i:02d}', tile, epoch + 1, dataformats='HWC')
        except Exception as exc:  # overlays are a convenience: never stop training for them
            logger.warning('could not write overlays to TensorBoard: %s', exc)
        finally:
            model.train(was_training)

    def _update_best(self, epoch: int, metrics: dict[str, Any]) -> None:
        key, lower = SELECT_BY[self.cfg.train.select_by]
        value = metrics.get(key)
        if not _finite(value):
            logger.warning('epoch %d: %s is %s; not a best-checkpoint candidate', epoch + 1, key,
                           value)
            return
        better = self.best_value is None or (value < self.best_value if lower
                                             else value > self.best_value)
        if better:
            self.best_value = float(value)
            self.best_epoch = epoch + 1
            self.best_metrics = {k: float(metrics[k]) for k in ('KLD', 'SIM', 'NSS')}
            self.best_metrics['count'] = int(metrics.get('count', 0))
            self._best_improved = True

    # ------------------------------------------------------------------ logging and saving
    def _log_epoch(self, entry: dict[str, Any]) -> None:
        if not self.is_main:
            return
        parts = [f"{k} {v:.4g}" for k, v in entry.items()
                 if k not in ('epoch', 'time_s') and isinstance(v, float)]
        logger.info('epoch %d/%d done in %.1f s: %s', entry['epoch'], self.cfg.train.epochs,
                    entry['time_s'], ', '.join(parts))
        if self.writer is not None:
            for k, v in entry.items():
                if k != 'epoch' and _finite(v):
                    self.writer.add_scalar(f'epoch/{k}', v, entry['epoch'])
            self.writer.flush()

    def _train_state(self) -> dict[str, Any]:
        model = getattr(self.model, 'module', self.model)
        rng = dist_utils.all_gather_object(capture_rng_state(model))
        return {
            'epoch': self.epoch,
            'global_step': self.global_step,
            'optimizer': self.optimizer.state_dict(),
            'scheduler': self.scheduler.state_dict() if self.scheduler is not None else None,
            'scaler': self.scaler.state_dict() if self.use_amp else None,
            'best': {'value': self.best_value, 'epoch': self.best_epoch,
                     'metrics': self.best_metrics, 'select_by': self.cfg.train.select_by},
            'history': self.history,
            'rng': rng,
            'world_size': self.dist.world_size,
        }

    def _save(self, epoch: int, metrics: dict[str, Any] | None) -> None:
        state = self._train_state()  # collective in DDP: every rank takes part
        if self.is_main:
            config = to_dict(self.cfg)
            extra = {'epoch': epoch + 1, 'metrics': dict(metrics) if metrics else None}
            if self._best_improved:
                save_checkpoint(self.model, self.best_path, config=config,
                                classes=list(self.classes), extra=extra)
                logger.info('new best %s %.4f at epoch %d -> %s', self.cfg.train.select_by,
                            self.best_value, epoch + 1, self.best_path)
                self._best_improved = False
            save_checkpoint(self.model, self.last_path, config=config, classes=list(self.classes),
                            train_state=state, extra=extra)
            self._write_history()
        dist_utils.barrier()

    def _write_history(self) -> None:
        data = {'select_by': self.cfg.train.select_by, 'best_epoch': self.best_epoch,
                'best_metric': self.best_value, 'best': self.best_metrics,
                'epochs': self.history}
        path = self.output_dir / 'history.json'
        atomic_write_text(path, json.dumps(json_safe(data), indent=2, allow_nan=False) + '\n')
        curves = [{k: v for k, v in h.items() if k not in _CURVE_SKIP} for h in self.history]
        try:
            from affordance_core.viz import save_training_curves
            save_training_curves(curves, self.output_dir / 'training_curves.png')
        except Exception as exc:  # a plotting problem must not stop training
            logger.warning('could not draw the training curves: %s', exc)
