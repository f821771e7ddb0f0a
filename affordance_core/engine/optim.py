"""Optimizer and learning-rate schedule of the official recipes (``methods.md`` §0.4).

SGD (momentum 0.9, Nesterov, weight decay 5e-4) with four parameter groups chosen by a
*substring test on the parameter name*, exactly like the official ``get_optimizer``:

============================  ==========  ==========
name                          weights     biases
============================  ==========  ==========
does not contain ``'fc'``     1 x lr      2 x lr
contains ``'fc'``             10 x lr     20 x lr
============================  ==========  ==========

So LOCATE's ``aff_proj.fc1`` / ``aff_proj.fc2`` (the residual MLP) train at 10x / 20x just like
the classifier ``aff_fc``. A parameter is a bias when the last component of its name is ``bias``.
Frozen parameters (``requires_grad=False``, e.g. the backbone) are left out: SGD would skip them
anyway because they never receive a gradient.

A method can change the rule for some of its parameters with a method
``lr_mult_override(name) -> float | None`` (None: the rule above applies; 0: the parameter is not
optimised). WSMA uses it for its CLIP text tower (2x lr), C2AM to leave BatchNorm affine
parameters out, as their official optimizers do.

The schedule is ``StepLR(step_size, gamma)`` or the polynomial decay
``lr = base * (1 - epoch / epochs) ** power`` (C2AM's PolyOptimizer, applied per epoch instead of
per iteration), stepped once per epoch, or none.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from affordance_core.config import OptimConfig

__all__ = ['SCHEDULERS', 'build_optimizer', 'build_scheduler', 'param_groups', 'lr_multiplier']

logger = logging.getLogger(__name__)

SCHEDULERS: tuple[str, ...] = ('step', 'poly', 'none')


def lr_multiplier(name: str, cfg: OptimConfig) -> float:
    """Learning-rate multiplier of the parameter called ``name`` (official substring rule).

    Args:
        name: dotted parameter name as given by ``model.named_parameters()``.
        cfg: optimizer settings (``fc_lr_mult``, ``bias_lr_mult``).

    Returns:
        1, ``bias_lr_mult``, ``fc_lr_mult`` or ``fc_lr_mult * bias_lr_mult``.
    """
    mult = cfg.fc_lr_mult if 'fc' in name else 1.0
    if name.rsplit('.', 1)[-1] == 'bias':
        mult *= cfg.bias_lr_mult
    return float(mult)


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """Split the trainable parameters of ``model`` into the official lr groups.

    Args:
        model: the network (a ``DistributedDataParallel`` wrapper is unwrapped first, so the
            names are the model's own).
        cfg: optimizer settings.

    Returns:
        list of ``{'params', 'lr', 'lr_mult', 'group', 'names'}`` dicts, one per non-empty
        group, in the order weight, bias, fc weight, fc bias.

    Raises:
        ValueError: if the model has no trainable parameter.
    """
    model = getattr(model, 'module', model)
    order = ('weight', 'bias', 'fc_weight', 'fc_bias')
    override = getattr(model, 'lr_mult_override', None)
    groups: dict[str, dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        special = override(name) if callable(override) else None
        if special is not None:
            if special == 0:
                continue
            mult = float(special)
            key = f'x{mult:g}'
            if key not in order:
                order = (*order, key)
        else:
            is_fc = 'fc' in name
            is_bias = name.rsplit('.', 1)[-1] == 'bias'
            key = ('fc_' if is_fc else '') + ('bias' if is_bias else 'weight')
            mult = lr_multiplier(name, cfg)
        group = groups.setdefault(key, {'params': [], 'names': [], 'lr': cfg.lr * mult,
                                        'lr_mult': mult, 'group': key})
        group['params'].append(param)
        group['names'].append(name)
    if not groups:
        raise ValueError(f'{type(model).__name__} has no trainable parameter '
                         '(every requires_grad is False); nothing to optimise')
    return [groups[k] for k in order if k in groups]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.SGD:
    """Nesterov SGD over the official parameter groups (see the module docstring).

    Args:
        model: the network (or its DDP wrapper).
        cfg: ``ExperimentConfig.optim``.

    Returns:
        ``torch.optim.SGD``; each group carries ``lr_mult``, ``group`` and ``names`` entries.

    Raises:
        ValueError: for a non-positive lr, a negative weight decay or momentum, or Nesterov
            without momentum.
    """
    if not cfg.lr > 0:
        raise ValueError(f'optim.lr must be > 0, got {cfg.lr}')
    if cfg.weight_decay < 0 or cfg.momentum < 0:
        raise ValueError(f'optim.weight_decay and optim.momentum must be >= 0, got '
                         f'{cfg.weight_decay} and {cfg.momentum}')
    if cfg.nesterov and cfg.momentum == 0:
        raise ValueError('optim.nesterov=true needs optim.momentum > 0')
    groups = param_groups(model, cfg)
    for g in groups:
        logger.debug('lr group %s: %d tensors at %g x lr', g['group'], len(g['params']),
                     g['lr_mult'])
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig,
                    epochs: int = 0) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Per-epoch learning-rate schedule.

    Args:
        optimizer: from :func:`build_optimizer`.
        cfg: ``ExperimentConfig.optim`` (``scheduler``, ``step_size``, ``gamma``, ``power``).
        epochs: training length, needed by ``'poly'``.

    Returns:
        ``StepLR(step_size, gamma)`` for ``scheduler='step'``, ``PolynomialLR(epochs, power)``
        for ``'poly'`` (call ``.step()`` once at the end of each epoch), ``None`` for
        ``'none'``.

    Raises:
        ValueError: unknown scheduler name or a non-positive step size.
    """
    if cfg.scheduler == 'none':
        return None
    if cfg.scheduler == 'step':
        if cfg.step_size <= 0:
            raise ValueError(f'optim.step_size must be a positive number of epochs, '
                             f'got {cfg.step_size}')
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size,
                                               gamma=cfg.gamma)
    if cfg.scheduler == 'poly':
        if epochs <= 0:
            raise ValueError(f"optim.scheduler 'poly' needs the number of epochs, got {epochs}")
        return torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=epochs,
                                                     power=cfg.power)
    raise ValueError(f"unknown optim.scheduler '{cfg.scheduler}'; expected one of "
                     f"{', '.join(SCHEDULERS)}")
