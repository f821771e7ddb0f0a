"""Configuration: dataclasses are the schema, YAML sets values, ``a.b=value`` overrides win.

Unknown keys (in YAML or on the command line) raise :class:`ConfigError` naming the key and the
valid ones, so a typo fails loudly instead of being ignored. Values are checked against the field
types (``int`` fields accept ``3``, ``float`` fields accept ``1e-3`` and ``3``, ...).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

T = TypeVar('T')


class ConfigError(ValueError):
    """A configuration file or override is invalid (unknown key, wrong type, bad value)."""


@dataclass
class LossTerm:
    """One weighted loss term of a training recipe."""

    name: str = ''            # key in affordance_core.losses.LOSSES
    weight: float = 1.0
    start_epoch: int = 0      # first (0-based) epoch in which the term is active


@dataclass
class ModelConfig:
    name: str = 'locate_imgfocus'            # see affordance_core.list_models()
    num_classes: int = 0                     # 0: the size of the data split's class list
    backbone_weights: str = ''               # local weights file; '' = backbone default
    kwargs: dict[str, Any] = field(default_factory=dict)  # forwarded to the model constructor


@dataclass
class DataConfig:
    root: str = 'data/AGD20K'         # folder holding Seen/ and Unseen/ (AGD20K layout)
    split: str = 'Seen'               # Seen | Unseen | HICO-IIF
    num_exo: int = 3                  # exocentric images per sample
    image_size: int = 224             # crop / test size
    resize: int = 256                 # training resize before the random crop
    resize_mode: str = 'short'        # short: Resize(256) of the shorter side; square: (256, 256)
    num_workers: int = 2
    max_train_samples: int = 0        # 0 = all exocentric images
    max_test_samples: int = 0         # 0 = all test images


@dataclass
class OptimConfig:
    lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    fc_lr_mult: float = 10.0          # parameters whose name contains 'fc' (official quirk)
    bias_lr_mult: float = 2.0         # biases train at 2x the lr of their weights
    scheduler: str = 'step'           # step | poly | none
    step_size: int = 5                # epochs (StepLR)
    gamma: float = 0.1
    power: float = 0.9                # scheduler 'poly' (C2AM)


@dataclass
class TrainConfig:
    epochs: int = 15
    batch_size: int = 16
    seed: int = 0
    device: str = 'auto'              # auto | cpu | cuda | cuda:N
    amp: bool = True                  # mixed precision, only used on CUDA
    output_dir: str = 'runs/locate_seen'
    cache_features: bool = False      # cache frozen-backbone features; later epochs skip it
    cache_views: int = 2              # cached augmentations per image: 1 = plain, 2 = + h-flip
    cache_dir: str = ''               # '' = <output_dir>/feature_cache; share it between runs
    cache_extra_fields: list[str] = field(default_factory=list)  # cache more BackboneOutput
    #                                   fields than the model needs (one cache for several methods)
    eval_every: int = 1               # evaluate on the test set every N epochs (0 = never)
    select_by: str = 'kld'            # best checkpoint selection metric (kld | sim | nss)
    log_every: int = 20               # steps between TensorBoard scalars
    tensorboard: bool = True
    max_steps_per_epoch: int = 0      # 0 = full epochs
    num_overlays: int = 8             # heatmap images written to TensorBoard per evaluation


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    losses: list[LossTerm] = field(default_factory=list)


def _type_name(tp: Any) -> str:
    return getattr(tp, '__name__', str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert it where that is lossless."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: {value!r} matches none of {tp}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {_type_name(tp)}, got {value!r}")
        return _from_dict(tp, value, where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f'{where}[{i}]') for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads '1e-3' as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _unknown_key(key: str, valid: Sequence[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ''
    return ConfigError(
        f"unknown key '{where}{key}'{hint}; valid keys: {', '.join(valid)}")


def _from_dict(schema: type[T], values: dict[str, Any], where: str = '') -> T:
    hints = typing.get_type_hints(schema)
    names = [f.name for f in dataclasses.fields(schema)]
    kwargs = {}
    prefix = f'{where}.' if where else ''
    for key, value in values.items():
        if key not in names:
            raise _unknown_key(str(key), names, prefix)
        kwargs[key] = _coerce(value, hints[key], f'{prefix}{key}')
    return schema(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-dict copy of a config dataclass (for YAML, JSON and checkpoints)."""
    return dataclasses.asdict(cfg)


def from_dict(schema: type[T], values: dict[str, Any]) -> T:
    """Build ``schema`` from a nested dict; unknown keys and wrong types raise ConfigError."""
    return _from_dict(schema, values or {})


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != 'kwargs':
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _apply_override(values: dict[str, Any], schema: type, item: str) -> None:
    if '=' not in item:
        raise ConfigError(f"override '{item}' is not of the form a.b=value")
    path, raw = item.split('=', 1)
    keys = path.strip().split('.')
    value = yaml.safe_load(raw) if raw.strip() else ''
    node, tp = values, schema
    for i, key in enumerate(keys):
        where = '.'.join(keys[:i])
        if dataclasses.is_dataclass(tp):
            names = [f.name for f in dataclasses.fields(tp)]
            if key not in names:
                raise _unknown_key(key, names, f'{where}.' if where else '')
            tp = typing.get_type_hints(tp)[key]
        elif typing.get_origin(tp) is dict:  # free-form mapping (model.kwargs)
            tp = Any
        else:
            raise ConfigError(f"override '{path}': '{where}' is not a section")
        if i == len(keys) - 1:
            node[key] = value
        else:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{path}': '{key}' is not a section")


def load_config(schema: type[T] = ExperimentConfig, path: str | Path | None = None,
                overrides: Sequence[str] = ()) -> T:
    """Return ``schema`` built from its defaults, then the YAML at ``path``, then overrides.

    Args:
        schema: the dataclass to build (``ExperimentConfig`` for training).
        path: YAML file; a missing file raises FileNotFoundError.
        overrides: ``a.b=value`` strings; values are parsed as YAML scalars.

    Raises:
        ConfigError: unknown key, wrong type, or malformed override.
    """
    values = to_dict(schema())
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f'config file not found: {path}')
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f'{path}: not valid YAML: {exc}') from None
        if not isinstance(loaded, dict):
            raise ConfigError(f'{path}: expected a mapping at the top level')
        try:
            _from_dict(schema, loaded)  # validate the file alone for a message naming it
        except ConfigError as exc:
            raise ConfigError(f'{path}: {exc}') from None
        values = _deep_merge(values, loaded)
    for item in overrides:
        _apply_override(values, schema, item)
    return _from_dict(schema, values)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write a config dataclass as YAML (the resolved config next to a run's checkpoints)."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
