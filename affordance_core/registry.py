"""Model registry: ``@register_model`` entrypoints, ``create_model(name)``, ``list_models()``.

Registry names are ``<method>_<backbone>`` (``locate_vits16``, ``locate_imgfocus``,
``locate_test``). Importing :mod:`affordance_core.models` runs every method file's decorators.
"""
from __future__ import annotations

import fnmatch
from typing import Any, Callable

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn`` under its function name; a second registration of a name is an error."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"model '{fn.__name__}' is registered twice ({fn.__module__})")
    _MODELS[fn.__name__] = fn
    return fn


def list_models(pattern: str = '*') -> list[str]:
    """Sorted registry names matching the shell-style ``pattern``."""
    _ensure_models_imported()
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name``; keyword arguments go to its constructor.

    Raises:
        ValueError: unknown name (the message lists the registered ones).
    """
    _ensure_models_imported()
    if name not in _MODELS:
        raise ValueError(f"unknown model '{name}'; available: {', '.join(list_models())}")
    model = _MODELS[name](**kwargs)
    model.registry_name = name
    model.init_kwargs = dict(kwargs)
    return model


def _ensure_models_imported() -> None:
    import affordance_core.models  # noqa: F401  (runs the @register_model decorators)
