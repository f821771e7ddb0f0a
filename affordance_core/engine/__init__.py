"""Training engine: optimizer groups, loss task, trainer, feature cache, DDP helpers, evaluation.

Submodules are imported on first use (``from affordance_core.engine import Trainer`` works), so
importing ``affordance_core.engine.evaluation`` alone stays light.

    optim.py          build_optimizer / build_scheduler (official 'fc' lr groups, StepLR)
    task.py           AffordanceTask(model, loss_terms)(batch, epoch) -> {'loss', <term>...}
    trainer.py        Trainer(cfg).fit(resume=False)
    feature_cache.py  FeatureCache: frozen-backbone features per image view, memory or disk
    distributed.py    torchrun detection, process group, reductions
    evaluation.py     evaluate_model / evaluate_baseline
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    'build_optimizer': 'optim', 'build_scheduler': 'optim', 'param_groups': 'optim',
    'AffordanceTask': 'task',
    'Trainer': 'trainer',
    'FeatureCache': 'feature_cache',
    'evaluate_model': 'evaluation', 'evaluate_baseline': 'evaluation',
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'affordance_core.engine' has no attribute '{name}'")
    return getattr(importlib.import_module(f'affordance_core.engine.{module}'), name)
