"""Checkpoints that rebuild their model alone.

A checkpoint is a dict of plain containers and tensors (it loads with
``torch.load(..., weights_only=True)``):

    {'format': 'affordance_ros.checkpoint', 'version': 1,
     'model': <registry name>, 'model_kwargs': {...}, 'classes': [...],
     'config': <resolved ExperimentConfig as a dict or None>,
     'state_dict': {...},            # includes the frozen backbone: no weights file is needed
     'train_state': {...} or absent} # optimizer, scheduler, epoch, RNG states (resume only)

Writes are atomic (temporary file + ``os.replace``): a kill never leaves a half-written file.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT = 'affordance_ros.checkpoint'
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, corrupt, or not one of ours."""


def _atomic_write(path: str | Path, write: Any, mode: str) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 22), b''):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    _atomic_write(path, lambda f: torch.save(obj, f), 'wb')


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) atomically: readers see the old or the new file, never a part."""
    _atomic_write(path, lambda f: f.write(text.encode('utf-8')), 'wb')


def save_checkpoint(model: nn.Module, path: str | Path, *, config: dict | None = None,
                    classes: list[str] | tuple[str, ...] | None = None,
                    train_state: dict | None = None, extra: dict | None = None) -> Path:
    """Write ``model`` (built by ``create_model``) with its name, kwargs and config to ``path``.

    Args:
        model: a model from ``create_model`` (it carries ``registry_name`` and ``init_kwargs``).
        path: destination file; parent folders are created.
        config: the resolved experiment config (``to_dict(cfg)``), stored for reproducibility.
        classes: class names in index order (defaults to ``model.classes`` when present).
        train_state: optimizer / scheduler / epoch / RNG state for ``--resume``.
        extra: any further plain data (metrics, ...).
    """
    model = getattr(model, 'module', model)  # unwrap DistributedDataParallel
    name = getattr(model, 'registry_name', None)
    if name is None:
        raise ValueError('save_checkpoint needs a model built by create_model (no registry_name)')
    if classes is None:
        classes = getattr(model, 'classes', None)
    payload: dict[str, Any] = {
        'format': FORMAT,
        'version': VERSION,
        'model': name,
        'model_kwargs': dict(getattr(model, 'init_kwargs', {})),
        'classes': list(classes) if classes is not None else None,
        'config': config,
        'state_dict': {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    if train_state is not None:
        payload['train_state'] = train_state
    if extra:
        payload['extra'] = extra
    atomic_torch_save(payload, path)
    return Path(path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and validate a checkpoint dict (``weights_only=True``); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'checkpoint not found: {path}')
    try:
        payload = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as exc:  # pickle, zip and weights-only errors all mean "not loadable"
        raise CheckpointError(
            f'{path}: not a loadable checkpoint ({type(exc).__name__}: '
            f'{str(exc).splitlines()[0] if str(exc) else "no detail"})') from None
    if not isinstance(payload, dict) or payload.get('format') != FORMAT:
        raise CheckpointError(
            f'{path}: not an affordance_ros checkpoint (no "format: {FORMAT}" entry); '
            f'convert official checkpoints with affordance-convert')
    if payload.get('version', 0) > VERSION:
        raise CheckpointError(f"{path}: checkpoint version {payload['version']} is newer than "
                              f'this code understands ({VERSION})')
    for key in ('model', 'model_kwargs', 'state_dict'):
        if key not in payload:
            raise CheckpointError(f"{path}: checkpoint has no '{key}' entry")
    return payload


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = 'cpu') -> nn.Module:
    """Rebuild the model stored in ``path`` (architecture, classes and all weights) in eval mode.

    Raises:
        FileNotFoundError: the file does not exist.
        CheckpointError: the file is corrupt, foreign, or its weights do not fit the model.
    """
    from affordance_core.registry import create_model

    payload = read_checkpoint(path)
    kwargs = dict(payload['model_kwargs'])
    kwargs['pretrained'] = False  # every weight, the frozen backbone included, is in the file
    try:
        model = create_model(payload['model'], **kwargs)
    except ValueError as exc:
        raise CheckpointError(f'{path}: {exc}') from None
    model.init_kwargs = dict(payload['model_kwargs'])
    try:
        model.load_state_dict(payload['state_dict'], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f'{path}: weights do not fit model '
                              f"'{payload['model']}': {str(exc).splitlines()[0]}") from None
    model.checkpoint_config = payload.get('config')
    return model.to(map_location).eval()
