"""Configuration: YAML + overrides, typo detection, type checks, recipes of the shipped configs."""
from __future__ import annotations

from pathlib import Path

import pytest

from affordance_core.config import (ConfigError, ExperimentConfig, LossTerm, from_dict,
                                    load_config, save_config, to_dict)

REPO = Path(__file__).resolve().parents[2]


def test_defaults_then_yaml_then_overrides(tmp_path):
    path = tmp_path / 'c.yaml'
    path.write_text('train:\n  epochs: 3\n  batch_size: 4\noptim:\n  lr: 1e-2\n'
                    'losses:\n  - {name: cross_entropy}\n'
                    '  - {name: concentration, weight: 0.07}\n')
    cfg = load_config(ExperimentConfig, path, ['train.epochs=5', 'data.split=Unseen',
                                               'model.kwargs.aff_cam_thd=0.5'])
    assert cfg.train.epochs == 5            # override wins over YAML
    assert cfg.train.batch_size == 4        # YAML wins over default
    assert cfg.train.seed == 0              # default kept
    assert cfg.optim.lr == pytest.approx(1e-2)  # '1e-2' (a YAML 1.1 string) becomes a float
    assert cfg.data.split == 'Unseen'
    assert cfg.model.kwargs == {'aff_cam_thd': 0.5}
    assert cfg.losses == [LossTerm('cross_entropy', 1.0, 0), LossTerm('concentration', 0.07, 0)]


def test_unknown_key_in_yaml_names_file_and_suggests(tmp_path):
    path = tmp_path / 'typo.yaml'
    path.write_text('train:\n  epochz: 3\n')
    with pytest.raises(ConfigError) as err:
        load_config(ExperimentConfig, path)
    msg = str(err.value)
    assert str(path) in msg and "train.epochz" in msg and "did you mean 'epochs'" in msg


def test_unknown_override_and_bad_types():
    with pytest.raises(ConfigError, match="unknown key 'train.epoch'"):
        load_config(ExperimentConfig, None, ['train.epoch=3'])
    with pytest.raises(ConfigError, match='expected an integer'):
        load_config(ExperimentConfig, None, ['train.epochs=three'])
    with pytest.raises(ConfigError, match='expected true/false'):
        load_config(ExperimentConfig, None, ['train.amp=maybe'])
    with pytest.raises(ConfigError, match='not of the form'):
        load_config(ExperimentConfig, None, ['train.epochs'])
    with pytest.raises(ConfigError, match='unknown key'):
        from_dict(ExperimentConfig, {'losses': [{'name': 'x', 'wieght': 1}]})


def test_missing_file():
    with pytest.raises(FileNotFoundError, match='nope.yaml'):
        load_config(ExperimentConfig, 'nope.yaml')


def test_round_trip(tmp_path):
    cfg = load_config(ExperimentConfig, None, ['train.epochs=2'])
    save_config(cfg, tmp_path / 'r.yaml')
    assert load_config(ExperimentConfig, tmp_path / 'r.yaml') == cfg
    assert from_dict(ExperimentConfig, to_dict(cfg)) == cfg


@pytest.mark.parametrize('path', sorted((REPO / 'training' / 'configs').glob('*.yaml')),
                         ids=lambda p: p.name)
def test_shipped_configs_load(path):
    from affordance_core.losses import LOSSES
    from affordance_core.registry import list_models
    cfg = load_config(ExperimentConfig, path)
    assert cfg.model.name in list_models()
    assert cfg.losses and all(term.name in LOSSES for term in cfg.losses)


def test_official_locate_recipe():
    cfg = load_config(ExperimentConfig, REPO / 'training' / 'configs' / 'locate_seen.yaml')
    terms = {t.name: t for t in cfg.losses}
    assert terms['cross_entropy'].weight == 1.0
    assert terms['prototype'].weight == 1.0 and terms['prototype'].start_epoch == 1
    assert terms['concentration'].weight == pytest.approx(0.07)
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.optim.lr) == (15, 16, 1e-3)
    assert (cfg.optim.step_size, cfg.optim.gamma, cfg.data.split) == (5, 0.1, 'Seen')
