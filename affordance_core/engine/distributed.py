"""Multi-process (``torchrun``) helpers: detect the launch, init the process group, reduce.

``torchrun --nproc_per_node=K -m affordance_core.cli.train --config ...`` sets ``WORLD_SIZE``,
``RANK`` and ``LOCAL_RANK``; :func:`init_distributed` reads them, picks the device (one GPU per
local rank on CUDA, the CPU otherwise) and starts the process group (NCCL on CUDA, gloo on CPU).
A plain ``python`` launch gives a single-process :class:`DistInfo` and touches nothing.
Only rank 0 (``DistInfo.is_main``) writes checkpoints and logs and runs the evaluation.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ['DistInfo', 'resolve_device', 'init_distributed', 'cleanup', 'barrier',
           'all_reduce_mean', 'all_gather_object', 'broadcast_object']

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device('cpu')

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """Turn a config device string into a ``torch.device``.

    Args:
        name: ``'auto'`` (CUDA when available, else CPU), ``'cpu'``, ``'cuda'`` or ``'cuda:N'``.
        local_rank: GPU index used for ``'auto'`` / ``'cuda'`` in a multi-process job.

    Raises:
        ValueError: unknown device string, or CUDA asked for but not available.
    """
    name = (name or 'auto').strip().lower()
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    if name == 'cpu':
        return torch.device('cpu')
    if name == 'cuda' or name.startswith('cuda:'):
        if not torch.cuda.is_available():
            raise ValueError(f"train.device='{name}' but CUDA is not available; use "
                             "train.device=cpu (or auto)")
        if name == 'cuda':
            return torch.device('cuda', local_rank)
        try:
            index = int(name.split(':', 1)[1])
        except ValueError:
            raise ValueError(f"bad train.device '{name}'; expected auto, cpu, cuda or cuda:N") \
                from None
        if index >= torch.cuda.device_count():
            raise ValueError(f'train.device={name} but only {torch.cuda.device_count()} '
                             'CUDA device(s) exist')
        return torch.device('cuda', index)
    raise ValueError(f"bad train.device '{name}'; expected auto, cpu, cuda or cuda:N")


def _env_int(key: str, default: int) -> int:
    value = os.environ.get(key)
    if value is None or value == '':
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f'environment variable {key}={value!r} is not an integer') from None


def init_distributed(device: str = 'auto') -> DistInfo:
    """Detect a ``torchrun`` launch and set up the process group when ``WORLD_SIZE > 1``.

    Args:
        device: the config's ``train.device``.

    Returns:
        :class:`DistInfo` with the device this rank must use.
    """
    world_size = _env_int('WORLD_SIZE', 1)
    rank = _env_int('RANK', 0)
    local_rank = _env_int('LOCAL_RANK', 0)
    dev = resolve_device(device, local_rank)
    if world_size <= 1:
        return DistInfo(0, 1, 0, dev)
    if dev.type == 'cuda':
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = 'nccl' if dev.type == 'cuda' else 'gloo'
        dist.init_process_group(backend=backend)
        logger.info('process group up: backend %s, rank %d/%d, device %s', backend, rank,
                    world_size, dev)
    return DistInfo(rank, world_size, local_rank, dev)


def cleanup() -> None:
    """Destroy the process group if one is running."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if _active():
        dist.barrier()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of ``value`` over the ranks (returns ``value`` itself in a single process)."""
    if not _active():
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` in a single process)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself in a single process)."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
