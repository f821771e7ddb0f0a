"""Model plus its weighted loss terms: ``AffordanceTask(model, terms)(batch, epoch)``.

The training recipe lives in the config (``losses: [{name, weight, start_epoch}]``), the loss
functions in :mod:`affordance_core.losses` (``LOSSES[name](outputs, batch) -> scalar``). Epoch
gating that the official code writes inside ``train.py`` (LOCATE's prototype loss starts in the
second epoch) becomes ``start_epoch``: a term is active when ``epoch >= start_epoch``.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from affordance_core.config import LossTerm

__all__ = ['AffordanceTask']

LossFn = Callable[[dict, dict], Tensor]


class AffordanceTask(nn.Module):
    """Wrap a model and its loss recipe; ``forward`` returns the weighted total and each term.

    Args:
        model: a method network with ``forward(ego, exo, labels, *, ego_feats, exo_feats)``.
        loss_terms: the recipe; names must be keys of ``registry``.
        registry: name -> loss function; defaults to :data:`affordance_core.losses.LOSSES`.

    Raises:
        ValueError: empty recipe, an unknown loss name (the message lists the registered ones),
            a duplicated name, or a negative start epoch.
    """

    def __init__(self, model: nn.Module, loss_terms: Sequence[LossTerm],
                 registry: Mapping[str, LossFn] | None = None) -> None:
        super().__init__()
        if registry is None:
            from affordance_core.losses import LOSSES
            registry = LOSSES
        terms = [t if isinstance(t, LossTerm) else LossTerm(**t) for t in loss_terms]
        if not terms:
            raise ValueError('the loss recipe is empty; add e.g. `losses: [{name: cross_entropy, '
                             f'weight: 1.0}}]` to the config (registered: {_names(registry)})')
        seen: set[str] = set()
        for t in terms:
            if t.name not in registry:
                raise ValueError(f"unknown loss '{t.name}'; registered losses: "
                                 f'{_names(registry)}')
            if t.name in seen or t.name == 'loss':
                raise ValueError(f"loss '{t.name}' appears twice in the recipe (or is named "
                                 "'loss', the key of the total)")
            if t.start_epoch < 0:
                raise ValueError(f"loss '{t.name}': start_epoch must be >= 0, "
                                 f'got {t.start_epoch}')
            seen.add(t.name)
        self.model = model
        self.terms = terms
        self._fns = {t.name: registry[t.name] for t in terms}

    def active_terms(self, epoch: int) -> list[LossTerm]:
        """Terms whose ``start_epoch <= epoch`` (0-based epochs)."""
        return [t for t in self.terms if epoch >= t.start_epoch]

    def forward(self, batch: dict[str, Any], epoch: int) -> dict[str, Tensor]:
        """Run the model on ``batch`` and weigh the active losses.

        Args:
            batch: collated training batch: ``'ego'`` (B, 3, S, S) or None, ``'exo'``
                (B, N, 3, S, S) or None, ``'label'`` (B,) int64, and optionally ``'ego_feats'``
                / ``'exo_feats'`` (``BackboneOutput`` with fields (B, ...) / (B*N, ...)) from the
                feature cache.
            epoch: 0-based epoch, for ``start_epoch`` gating.

        Returns:
            ``{'loss': weighted total (scalar), <name>: weighted term (scalar), ...}`` for the
            active terms; ``'loss'`` is a zero scalar without grad when no term is active yet.
        """
        kwargs = {}
        if batch.get('ego_feats') is not None:
            kwargs['ego_feats'] = batch['ego_feats']
        if batch.get('exo_feats') is not None:
            kwargs['exo_feats'] = batch['exo_feats']
        outputs = self.model(batch.get('ego'), batch.get('exo'), batch['label'], **kwargs)
        values: dict[str, Tensor] = {}
        for t in self.active_terms(epoch):
            values[t.name] = t.weight * self._fns[t.name](outputs, batch)
        if values:
            total = torch.stack([v.reshape(()) for v in values.values()]).sum()
        else:
            total = torch.zeros((), device=batch['label'].device)
        return {'loss': total, **values}

    def extra_repr(self) -> str:
        return ', '.join(f'{t.name}*{t.weight:g}@{t.start_epoch}' for t in self.terms)


def _names(registry: Mapping[str, Any]) -> str:
    return ', '.join(sorted(registry)) or '(none)'
