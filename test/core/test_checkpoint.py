"""Checkpoints rebuild their model alone, load weights-only, and fail clearly on bad files."""
from __future__ import annotations

import torch

import pytest

from affordance_core import create_model, load_checkpoint, save_checkpoint
from affordance_core.checkpoint import CheckpointError, atomic_torch_save, read_checkpoint


def _model():
    torch.manual_seed(0)
    return create_model('locate_test', num_classes=5, classes=['a', 'b', 'c', 'd', 'e'])


def test_round_trip_rebuilds_identical_predictions(tmp_path):
    model = _model().eval()
    path = save_checkpoint(model, tmp_path / 'm.pt', config={'train': {'epochs': 1}})
    payload = torch.load(path, weights_only=True)  # plain containers and tensors only
    assert payload['model'] == 'locate_test' and payload['classes'] == ['a', 'b', 'c', 'd', 'e']
    loaded = load_checkpoint(path)
    x = torch.randn(2, 3, 64, 64)
    ids = torch.tensor([0, 3])
    torch.testing.assert_close(loaded.predict(x, ids), model.predict(x, ids), rtol=0, atol=0)
    assert loaded.checkpoint_config == {'train': {'epochs': 1}}
    assert loaded.classes == ('a', 'b', 'c', 'd', 'e') or list(loaded.classes) == list('abcde')


def test_missing_corrupt_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match='nothere.pt'):
        load_checkpoint(tmp_path / 'nothere.pt')
    bad = tmp_path / 'corrupt.pt'
    bad.write_bytes(b'\x00garbage' * 10)
    with pytest.raises(CheckpointError, match='corrupt.pt'):
        load_checkpoint(bad)
    foreign = tmp_path / 'foreign.pt'
    torch.save({'state_dict': {}}, foreign)  # e.g. an official checkpoint
    with pytest.raises(CheckpointError, match='not an affordance_ros checkpoint'):
        read_checkpoint(foreign)
    pickled = tmp_path / 'pickled.pt'
    torch.save({'obj': object}, pickled)  # arbitrary objects are refused by weights_only
    with pytest.raises(CheckpointError, match='pickled.pt'):
        load_checkpoint(pickled)


def test_weights_that_do_not_fit(tmp_path):
    path = save_checkpoint(_model(), tmp_path / 'm.pt')
    payload = torch.load(path, weights_only=True)
    payload['model_kwargs']['num_classes'] = 7
    payload['model_kwargs']['classes'] = None
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match='do not fit'):
        load_checkpoint(path)


def test_atomic_save_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / 'last.pt'
    atomic_torch_save({'v': 1}, path)

    def boom(*args, **kwargs):
        raise OSError('disk full')
    monkeypatch.setattr(torch, 'save', boom)
    with pytest.raises(OSError):
        atomic_torch_save({'v': 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {'v': 1}
    assert [p.name for p in tmp_path.iterdir()] == ['last.pt']  # no temporary left behind
