"""Training engine: optimizer groups, StepLR, loss task, checkpoints, exact resume, feature cache.

Runs on a tiny AGD20K-layout tree written by the fixture below (3 classes, 12 exo images, 48 px)
with the random-weight ``locate_test`` model at 64 px input, so every training run takes ~1 s.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from affordance_core.checkpoint import read_checkpoint
from affordance_core.config import ExperimentConfig, LossTerm, OptimConfig, load_config
from affordance_core.engine import feature_cache as fc
from affordance_core.engine.optim import build_optimizer, build_scheduler, lr_multiplier
from affordance_core.engine.task import AffordanceTask
from affordance_core.engine.trainer import Trainer, capture_rng_state, restore_rng_state

REPO = Path(__file__).resolve().parents[2]
LOCATE_LOSSES = ('losses=[{name: cross_entropy}, {name: prototype, start_epoch: 1}, '
                 '{name: concentration, weight: 0.07}]')
from conftest import make_tiny_agd  # noqa: E402  (shared with the method tests)

pytestmark = pytest.mark.usefixtures('torch_one_thread')


@pytest.fixture(scope='module')
def tiny_root(tmp_path_factory) -> Path:
    return make_tiny_agd(tmp_path_factory.mktemp('agd'))


def tiny_cfg(root: Path, out: Path, *overrides: str) -> ExperimentConfig:
    return load_config(ExperimentConfig, None, [
        'model.name=locate_test', f'data.root={root}', 'data.image_size=64', 'data.resize=72',
        'data.num_workers=0', 'train.batch_size=4', 'train.epochs=2', 'train.device=cpu',
        'train.tensorboard=false', f'train.output_dir={out}', LOCATE_LOSSES, *overrides])


def last_state(out: Path) -> dict:
    return torch.load(out / 'last.pt', map_location='cpu', weights_only=True)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f'{k} differs: max |d| {(a[k] - b[k]).abs().max()}'


def assert_same_optimizer(a: dict, b: dict) -> None:
    assert a['state'].keys() == b['state'].keys() and a['state']
    for k in a['state']:
        assert torch.equal(a['state'][k]['momentum_buffer'], b['state'][k]['momentum_buffer'])
    assert [g['lr'] for g in a['param_groups']] == [g['lr'] for g in b['param_groups']]


# ---------------------------------------------------------------------------------------------
# optimizer and schedule


class _Named(nn.Module):
    """Parameters named like LOCATE's head, a SelectiveCL-style classifier and a frozen part."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Linear(2, 2)
        self.backbone.requires_grad_(False)
        self.aff_proj = nn.Module()
        self.aff_proj.norm = nn.LayerNorm(2)
        self.aff_proj.fc1 = nn.Linear(2, 3)
        self.aff_ego_proj = nn.Conv2d(2, 2, 1)
        self.aff_fc = nn.Conv2d(2, 4, 1)
        self.aff_classifier = nn.Linear(2, 4)


def test_optimizer_groups_follow_the_fc_substring_rule():
    model = _Named()
    opt = build_optimizer(model, OptimConfig(lr=1e-3))
    lr_of = {n: g['lr'] for g in opt.param_groups for n in g['names']}
    expected = {  # official: 'fc' in name -> 10x weights / 20x biases; else 1x / 2x
        'aff_proj.norm.weight': 1e-3, 'aff_proj.norm.bias': 2e-3,
        'aff_proj.fc1.weight': 1e-2, 'aff_proj.fc1.bias': 2e-2,
        'aff_ego_proj.weight': 1e-3, 'aff_ego_proj.bias': 2e-3,
        'aff_fc.weight': 1e-2, 'aff_fc.bias': 2e-2,
        'aff_classifier.weight': 1e-3, 'aff_classifier.bias': 2e-3,  # no 'fc' substring
    }
    assert lr_of == pytest.approx(expected, rel=1e-12)  # frozen backbone.* excluded
    assert [g['group'] for g in opt.param_groups] == ['weight', 'bias', 'fc_weight', 'fc_bias']
    for g in opt.param_groups:
        assert (g['momentum'], g['nesterov'], g['weight_decay']) == (0.9, True, 5e-4)
    assert lr_multiplier('aff_proj.fc2.bias', OptimConfig()) == 20.0
    # every optimised tensor appears once and only the trainable ones
    ids = [id(p) for g in opt.param_groups for p in g['params']]
    assert sorted(ids) == sorted(id(p) for p in model.parameters() if p.requires_grad)


def test_optimizer_step_matches_hand_computed_nesterov_update():
    model = _Named()
    opt = build_optimizer(model, OptimConfig(lr=1e-3))
    bias = model.aff_fc.bias  # fc bias: 20 x lr
    p0 = bias.detach().clone()
    grad = torch.tensor([0.5, -1.0, 2.0, 0.25])
    opt.zero_grad()
    bias.grad = grad.clone()
    opt.step()
    # first SGD step: buf = g + wd * p; Nesterov update = (g + wd * p) + momentum * buf
    g = grad + 5e-4 * p0
    expected = p0 - 20e-3 * (g + 0.9 * g)
    assert torch.allclose(bias.detach(), expected, atol=1e-7, rtol=0)


def test_optimizer_on_locate_puts_the_projection_mlp_in_the_fc_groups():
    from affordance_core.registry import create_model
    model = create_model('locate_test', num_classes=4)
    opt = build_optimizer(model, OptimConfig(lr=1e-3))
    lr_of = {n: g['lr'] for g in opt.param_groups for n in g['names']}
    assert lr_of['aff_proj.fc1.weight'] == pytest.approx(1e-2)
    assert lr_of['aff_proj.fc2.bias'] == pytest.approx(2e-2)
    assert lr_of['aff_fc.weight'] == pytest.approx(1e-2)
    assert lr_of['aff_ego_proj.0.weight'] == pytest.approx(1e-3)
    assert lr_of['aff_exo_proj.1.bias'] == pytest.approx(2e-3)
    assert not any(n.startswith('backbone.') for n in lr_of)


def test_step_lr_per_epoch():
    model = _Named()
    cfg = OptimConfig(lr=1e-3, step_size=5, gamma=0.1)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    base, fc_bias = {}, {}
    for epoch in range(11):
        base[epoch] = opt.param_groups[0]['lr']
        fc_bias[epoch] = opt.param_groups[3]['lr']
        sched.step()
    assert [base[e] for e in (0, 4, 5, 9, 10)] == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4, 1e-5])
    assert [fc_bias[e] for e in (0, 5, 10)] == pytest.approx([2e-2, 2e-3, 2e-4])
    assert build_scheduler(opt, OptimConfig(scheduler='none')) is None
    with pytest.raises(ValueError, match='unknown optim.scheduler .cosine.; expected one of '
                                         'step, poly, none'):
        build_scheduler(opt, OptimConfig(scheduler='cosine'))


def test_poly_schedule_and_lr_override():
    """C2AM's polynomial decay per epoch, and a method's lr_mult_override (0 = not optimised)."""
    class Net(_Named):
        def lr_mult_override(self, name):
            if name.startswith('aff_proj.norm'):
                return 0
            return 2.0 if name == 'aff_ego_proj.weight' else None

    net = Net()
    opt = build_optimizer(net, OptimConfig(lr=1e-3, scheduler='poly'))
    names = {n for g in opt.param_groups for n in g['names']}
    assert not any(n.startswith('aff_proj.norm') for n in names)
    special = [g for g in opt.param_groups if g['group'] == 'x2']
    assert len(special) == 1 and special[0]['names'] == ['aff_ego_proj.weight']
    assert special[0]['lr'] == pytest.approx(2e-3)
    sched = build_scheduler(opt, OptimConfig(lr=1e-3, scheduler='poly', power=0.9), epochs=4)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]['lr'])
        sched.step()
    assert lrs == pytest.approx([1e-3 * (1 - e / 4) ** 0.9 for e in range(4)])
    with pytest.raises(ValueError, match='needs the number of epochs'):
        build_scheduler(opt, OptimConfig(scheduler='poly'))


# ---------------------------------------------------------------------------------------------
# task


class _FakeModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(2.0))
        self.seen: dict = {}

    def forward(self, ego, exo, labels, **kwargs):
        self.seen = kwargs
        return {'x': self.w * labels.float()}


def test_task_weights_terms_and_gates_by_start_epoch():
    registry = {'sum': lambda out, batch: out['x'].sum(),
                'const': lambda out, batch: torch.tensor(3.0)}
    task = AffordanceTask(_FakeModel(), [LossTerm('sum', 0.5), LossTerm('const', 2.0, 1)],
                          registry=registry)
    batch = {'ego': None, 'exo': None, 'label': torch.tensor([1, 2, 3])}
    out0 = task(batch, epoch=0)  # sum = 2 * (1 + 2 + 3) = 12, weighted 6; const inactive
    assert set(out0) == {'loss', 'sum'}
    assert float(out0['loss']) == pytest.approx(6.0) and float(out0['sum']) == pytest.approx(6.0)
    out1 = task(batch, epoch=1)
    assert float(out1['const']) == pytest.approx(6.0)
    assert float(out1['loss']) == pytest.approx(12.0)
    out1['loss'].backward()
    assert float(task.model.w.grad) == pytest.approx(0.5 * 6)
    feats = object()
    task({**batch, 'ego_feats': feats, 'exo_feats': feats}, epoch=0)
    assert task.model.seen == {'ego_feats': feats, 'exo_feats': feats}


def test_task_rejects_unknown_and_duplicate_losses():
    with pytest.raises(ValueError, match="unknown loss 'cross_entropi'; registered losses: "
                                         '(.*, )?concentration, cross_entropy, .*prototype'):
        AffordanceTask(_FakeModel(), [LossTerm('cross_entropi')])
    with pytest.raises(ValueError, match='appears twice'):
        AffordanceTask(_FakeModel(), [LossTerm('prototype'), LossTerm('prototype')])
    with pytest.raises(ValueError, match='recipe is empty'):
        AffordanceTask(_FakeModel(), [])


# ---------------------------------------------------------------------------------------------
# trainer: outputs, checkpoints, resume


def test_fit_writes_every_artifact_and_checkpoints_load_weights_only(tiny_root, tmp_path):
    out = tmp_path / 'run'
    summary = Trainer(tiny_cfg(tiny_root, out, 'train.tensorboard=true', 'train.log_every=1'),
                      progress=False).fit()
    for name in ('config.yaml', 'last.pt', 'best.pt', 'history.json', 'training_curves.png'):
        assert (out / name).is_file(), name
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / 'tb'), size_guidance={'images': 0})
    events.Reload()
    tags = events.Tags()
    assert {'train/loss', 'train/lr', 'train/prototype', 'eval/KLD', 'epoch/loss'} <= set(
        tags['scalars'])
    assert len(tags['images']) == 6  # num_overlays 8, but the test set has 6 images
    assert [e.step for e in events.Images('overlay/00')] == [1, 2]  # one per evaluation
    assert [e.value for e in events.Scalars('train/lr')] == pytest.approx([1e-3] * 6)
    state = last_state(out)  # weights_only=True: plain containers and tensors only
    ts = state['train_state']
    assert (ts['epoch'], ts['global_step']) == (2, 6)  # 12 samples / batch 4 = 3 steps x 2
    assert set(ts['rng'][0]) == {'torch', 'cuda', 'numpy', 'python', 'generators'}
    assert 'kmeans_generator' in ts['rng'][0]['generators']
    history = json.loads((out / 'history.json').read_text())
    epochs = history['epochs']
    assert [e['epoch'] for e in epochs] == [1, 2]
    assert 'prototype' not in epochs[0] and 'prototype' in epochs[1]  # start_epoch 1
    assert epochs[0]['loss'] == pytest.approx(
        epochs[0]['cross_entropy'] + epochs[0]['concentration'], rel=1e-5)
    best_epoch = min(epochs, key=lambda e: e['KLD'])['epoch']
    assert summary['best_epoch'] == history['best_epoch'] == best_epoch
    assert summary['best_metric'] == pytest.approx(min(e['KLD'] for e in epochs))
    best = read_checkpoint(out / 'best.pt')
    assert best['extra']['epoch'] == best_epoch and 'train_state' not in best
    assert load_config(ExperimentConfig, out / 'config.yaml') == tiny_cfg(
        tiny_root, out, 'train.tensorboard=true', 'train.log_every=1')


def test_select_by_sim_keeps_the_highest(tiny_root, tmp_path):
    out = tmp_path / 'run'
    summary = Trainer(tiny_cfg(tiny_root, out, 'train.select_by=sim'), progress=False).fit()
    epochs = json.loads((out / 'history.json').read_text())['epochs']
    assert summary['best_metric'] == pytest.approx(max(e['SIM'] for e in epochs))


@pytest.mark.parametrize('cache', [False, True], ids=['images', 'feature_cache'])
def test_resume_after_an_epoch_equals_an_uninterrupted_run(tiny_root, tmp_path, cache):
    opts = [f'train.cache_features={str(cache).lower()}']
    whole = tmp_path / 'whole'
    Trainer(tiny_cfg(tiny_root, whole, *opts), progress=False).fit()
    split = tmp_path / 'split'
    Trainer(tiny_cfg(tiny_root, split, *opts, 'train.epochs=1'), progress=False).fit()
    assert last_state(split)['train_state']['epoch'] == 1
    summary = Trainer(tiny_cfg(tiny_root, split, *opts), progress=False).fit(resume=True)
    assert summary['resumed_from'] == 1 and summary['epochs'] == 2
    a, b = last_state(whole), last_state(split)
    assert_same_weights(a['state_dict'], b['state_dict'])
    assert_same_optimizer(a['train_state']['optimizer'], b['train_state']['optimizer'])
    assert a['train_state']['scheduler'] == b['train_state']['scheduler']
    keys = ('loss', 'cross_entropy', 'prototype', 'KLD', 'SIM', 'NSS')
    for ha, hb in zip(a['train_state']['history'], b['train_state']['history']):
        assert {k: ha.get(k) for k in keys} == {k: hb.get(k) for k in keys}


def test_kill_mid_epoch_resumes_from_the_last_completed_epoch(tiny_root, tmp_path, monkeypatch):
    whole = tmp_path / 'whole'
    Trainer(tiny_cfg(tiny_root, whole), progress=False).fit()

    killed = tmp_path / 'killed'
    trainer = Trainer(tiny_cfg(tiny_root, killed), progress=False)
    original = Trainer._train_step

    def dying_step(self, batch, epoch):
        if self.global_step == 4:  # second step of the second epoch
            raise KeyboardInterrupt('simulated kill')
        return original(self, batch, epoch)

    monkeypatch.setattr(Trainer, '_train_step', dying_step)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    monkeypatch.setattr(Trainer, '_train_step', original)
    assert last_state(killed)['train_state']['epoch'] == 1  # the half epoch is not in last.pt
    Trainer(tiny_cfg(tiny_root, killed), progress=False).fit(resume=True)
    assert_same_weights(last_state(whole)['state_dict'], last_state(killed)['state_dict'])


def test_crash_while_saving_leaves_the_previous_checkpoint(tiny_root, tmp_path, monkeypatch):
    out = tmp_path / 'run'
    trainer = Trainer(tiny_cfg(tiny_root, out, 'train.epochs=1'), progress=False)
    trainer.fit()
    before = (out / 'last.pt').read_bytes()
    import affordance_core.checkpoint as ckpt

    def broken_save(obj, f, *args, **kwargs):
        f.write(b'half a checkpoint')
        raise OSError('disk full')

    monkeypatch.setattr(ckpt.torch, 'save', broken_save)
    with pytest.raises(OSError, match='disk full'):
        trainer._save(0, None)
    monkeypatch.undo()
    assert (out / 'last.pt').read_bytes() == before
    assert read_checkpoint(out / 'last.pt')['train_state']['epoch'] == 1
    assert not [p for p in out.iterdir() if p.name.endswith('.tmp')]


def test_rng_state_round_trip():
    from affordance_core.registry import create_model
    import random
    model = create_model('locate_test', num_classes=3)
    state = capture_rng_state(model)
    draws = (torch.rand(3), np.random.rand(3), random.random(),
             torch.rand(2, generator=model.kmeans_generator))
    torch.manual_seed(123)
    np.random.seed(7)
    random.seed(9)
    model.kmeans_generator.manual_seed(5)
    path = Path(os.environ.get('TMPDIR', '/tmp')) / f'rng_{os.getpid()}.pt'
    torch.save(state, path)
    restore_rng_state(torch.load(path, weights_only=True), model)
    path.unlink()
    again = (torch.rand(3), np.random.rand(3), random.random(),
             torch.rand(2, generator=model.kmeans_generator))
    assert torch.equal(draws[0], again[0]) and np.array_equal(draws[1], again[1])
    assert draws[2] == again[2] and torch.equal(draws[3], again[3])


def test_resume_errors(tiny_root, tmp_path):
    with pytest.raises(FileNotFoundError, match='cannot resume: .*last.pt does not exist'):
        Trainer(tiny_cfg(tiny_root, tmp_path / 'none'), progress=False).fit(resume=True)
    with pytest.raises(ValueError, match="train.select_by must be one of kld, sim, nss"):
        Trainer(tiny_cfg(tiny_root, tmp_path / 'x', 'train.select_by=auc'), progress=False)
    with pytest.raises(ValueError, match=r"model.kwargs must not set \['num_classes'\]"):
        Trainer(tiny_cfg(tiny_root, tmp_path / 'x', 'model.kwargs.num_classes=3'),
                progress=False)


# ---------------------------------------------------------------------------------------------
# feature cache


def test_feature_cache_memory_and_disk(tmp_path):
    rows = {'keys': torch.randn(5, 4, 2, 2), 'cls_attn': torch.rand(5, 3, 2, 2)}
    names = [f'img{i}#v0' for i in range(5)]
    mem = fc.FeatureCache(('keys', 'cls_attn'), dtype=torch.float32)
    mem.put(names[:3], {k: v[:3] for k, v in rows.items()})
    assert mem.missing(names) == names[3:]
    got = mem.get([names[2], names[0]])
    assert torch.equal(got['keys'], rows['keys'][[2, 0]])
    with pytest.raises(KeyError, match='not in the feature cache'):
        mem.get(names[3:4])

    disk = fc.FeatureCache(('keys', 'cls_attn'), root=tmp_path / 'c', fingerprint={'a': 1})
    disk.put(names, rows)
    disk.flush()
    disk.put(['late'], {k: v[:1] for k, v in rows.items()})  # never flushed: lost on reopen
    again = fc.FeatureCache(('keys', 'cls_attn'), root=tmp_path / 'c', fingerprint={'a': 1})
    assert len(again) == 5 and 'late' not in again
    half = rows['keys'].half().float()
    assert torch.equal(again.get(names)['keys'], half)  # stored as float16
    assert again.nbytes == 5 * (16 + 12) * 2
    with pytest.raises(ValueError, match='different fingerprint'):
        fc.FeatureCache(('keys', 'cls_attn'), root=tmp_path / 'c', fingerprint={'a': 2})
    with pytest.raises(ValueError, match='another image size'):
        again.put(['big'], {'keys': torch.zeros(1, 4, 3, 3), 'cls_attn': torch.zeros(1, 3, 3, 3)})


def test_feature_cache_is_keyed_by_backbone_and_image_size(tmp_path):
    from affordance_core.models.backbone import create_backbone
    a = create_backbone('vit_test', pretrained=False)
    b = create_backbone('vit_test', pretrained=False)
    with torch.no_grad():
        next(b.parameters()).add_(1e-3)
    fp_a = fc.backbone_fingerprint(a, image_size=64)
    assert fp_a == fc.backbone_fingerprint(a, image_size=64)
    assert fp_a['weights_sha1'] != fc.backbone_fingerprint(b, image_size=64)['weights_sha1']
    fps = (fp_a, fc.backbone_fingerprint(b, image_size=64),
           fc.backbone_fingerprint(a, image_size=96))
    roots = {fc.open_feature_cache(tmp_path, ('keys',), fp).root for fp in fps}
    assert len(roots) == 3


def test_shared_cache_dir_with_extra_fields(tiny_root, tmp_path):
    """Several methods share one on-disk cache that holds the union of their fields."""
    shared = tmp_path / 'shared_cache'
    cfg = tiny_cfg(tiny_root, tmp_path / 'a', 'train.cache_features=true', 'train.epochs=1',
                   f'train.cache_dir={shared}', 'train.cache_extra_fields=[keys_prev, tokens]')
    trainer = Trainer(cfg, progress=False)
    assert trainer.fields == ('keys', 'cls_attn', 'tokens', 'keys_prev')
    trainer.fit()
    assert not (tmp_path / 'a' / 'feature_cache').exists()
    assert any(p.name.startswith('train-') for p in shared.iterdir())
    # a second run (another output folder) finds every feature: the backbone never runs
    cfg2 = tiny_cfg(tiny_root, tmp_path / 'b', 'train.cache_features=true', 'train.epochs=1',
                    f'train.cache_dir={shared}', 'train.cache_extra_fields=[keys_prev, tokens]')
    summary = Trainer(cfg2, progress=False).fit()
    history = json.loads(Path(summary['history']).read_text())['epochs']
    assert history[0]['backbone_images'] == 0
    with pytest.raises(ValueError, match='cache_extra_fields: unknown fields'):
        Trainer(tiny_cfg(tiny_root, tmp_path / 'c', 'train.cache_extra_fields=[key]'))


def test_cached_features_give_the_same_loss_as_images(tiny_root):
    from affordance_core.data.agd20k import AGD20KTrain, collate_train
    from affordance_core.labels import classes_for
    from affordance_core.models.backbone import BackboneOutput
    from affordance_core.registry import create_model
    torch.manual_seed(0)
    model = create_model('locate_test', classes=list(classes_for('Seen')))
    ds = AGD20KTrain(tiny_root, 'Seen', image_size=64, resize=72, views=2, seed=0)
    ds.set_epoch(0)
    batch = collate_train([ds[i] for i in range(8)])
    assert torch.equal(ds.load_key(batch['ego_key'][0]), batch['ego'][0])  # keys-only epochs
    task = AffordanceTask(model, [LossTerm('cross_entropy'), LossTerm('prototype'),
                                  LossTerm('concentration', 0.07)])
    gen = model.kmeans_generator.get_state()
    with torch.no_grad():
        ref = task({'ego': batch['ego'], 'exo': batch['exo'], 'label': batch['label']}, 1)
        assert float(ref['prototype']) > 0  # the part prototype path is exercised
        exo_keys = [k for ks in batch['exo_keys'] for k in ks]
        for dtype, rtol in ((torch.float32, 1e-6), (torch.float16, 1e-3)):
            cache = fc.FeatureCache(model.feature_fields, dtype=dtype)
            cpu = torch.device('cpu')
            ego = fc.lookup(cache, model.backbone, batch['ego_key'], batch['ego'], cpu)
            exo = fc.lookup(cache, model.backbone, exo_keys, batch['exo'].flatten(0, 1), cpu)
            assert len(cache) == len(set(batch['ego_key']) | set(exo_keys))
            model.kmeans_generator.set_state(gen)
            out = task({'ego': None, 'exo': None, 'label': batch['label'],
                        'ego_feats': BackboneOutput.from_dict(ego),
                        'exo_feats': BackboneOutput.from_dict(exo)}, 1)
            for k in ref:
                assert float(out[k]) == pytest.approx(float(ref[k]), rel=rtol, abs=1e-7), k


def test_cache_epochs_never_run_the_backbone_also_after_resume(tiny_root, tmp_path):
    out = tmp_path / 'run'
    calls: list[int] = []
    trainer = Trainer(tiny_cfg(tiny_root, out, 'train.cache_features=true', 'train.epochs=3'),
                      progress=False)
    trainer.model.backbone.register_forward_hook(
        lambda *a: calls.append(trainer.epoch))  # epoch = completed epochs at the call
    trainer.fit()
    assert calls and set(calls) == {0}  # epoch 1 (and its evaluation) only
    hist = [h['backbone_images'] for h in last_state(out)['train_state']['history']]
    assert hist[0] > 0 and hist[1:] == [0, 0]
    # keys: 3 folders x (4 exo + 2 ego) images x 2 views, all cached after epoch 1
    assert len(trainer.train_cache) == 36 and len(trainer.test_cache) == 6

    resumed = Trainer(tiny_cfg(tiny_root, out, 'train.cache_features=true', 'train.epochs=4'),
                      progress=False)
    more: list[int] = []
    resumed.model.backbone.register_forward_hook(lambda *a: more.append(1))
    resumed.fit(resume=True)  # the on-disk cache is reused: no backbone pass at all
    assert more == []

    # a fresh run over the same data and backbone with the complete on-disk cache: the first
    # epoch reads keys only and never decodes an image nor runs the backbone
    fresh_out = tmp_path / 'fresh'
    shutil.copytree(out / 'feature_cache', fresh_out / 'feature_cache')
    fresh = Trainer(tiny_cfg(tiny_root, fresh_out, 'train.cache_features=true',
                             'train.epochs=1'), progress=False)
    fresh_calls: list[int] = []
    fresh.model.backbone.register_forward_hook(lambda *a: fresh_calls.append(1))
    fresh.fit()
    assert fresh_calls == []
    assert last_state(fresh_out)['train_state']['history'][0]['backbone_images'] == 0


def test_cached_evaluation_matches_evaluate_model(tiny_root, tmp_path):
    from affordance_core.engine.evaluation import evaluate_model
    trainer = Trainer(tiny_cfg(tiny_root, tmp_path / 'r', 'train.cache_features=true'),
                      progress=False)
    trainer._open_caches()
    cached = trainer._evaluate_cached(trainer.model)['overall']
    direct = evaluate_model(trainer.model, trainer.test_set, progress=False,
                            classes=trainer.classes)['overall']
    assert cached['count'] == direct['count'] == 6
    for k in ('KLD', 'SIM', 'NSS'):
        assert cached[k] == pytest.approx(direct[k], rel=2e-3, abs=1e-4)


# ---------------------------------------------------------------------------------------------
# multi-process (torchrun, gloo on CPU)


def test_torchrun_two_processes_on_cpu(tiny_root, tmp_path):
    out = tmp_path / 'ddp'
    cfg = tmp_path / 'ddp.yaml'
    cfg.write_text(
        f'model: {{name: locate_test}}\n'
        f'data: {{root: {tiny_root}, image_size: 64, resize: 72, num_workers: 0}}\n'
        f'train: {{batch_size: 4, epochs: 1, device: cpu, output_dir: {out}, '
        f'tensorboard: false}}\n'
        f'{LOCATE_LOSSES.split("=", 1)[0]}: {LOCATE_LOSSES.split("=", 1)[1]}\n')
    torchrun = shutil.which('torchrun', path=str(Path(sys.executable).parent))
    assert torchrun, 'torchrun not found beside the python interpreter'
    env = {**os.environ, 'PYTHONPATH': str(REPO), 'OMP_NUM_THREADS': '1'}
    t0 = time.perf_counter()
    proc = subprocess.run([torchrun, '--standalone', '--nproc_per_node=2', '-m',
                           'affordance_core.cli.train', '--config', str(cfg), '--no-progress'],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = last_state(out)['train_state']
    # 12 samples over 2 ranks of 2 per step: 3 steps per rank, both ranks' RNG states stored
    assert (state['epoch'], state['global_step'], state['world_size']) == (1, 3, 2)
    assert len(state['rng']) == 2
    assert (out / 'best.pt').is_file()
    print(f'torchrun 2x CPU: {time.perf_counter() - t0:.1f} s')


def test_resolve_device():
    from affordance_core.engine.distributed import init_distributed, resolve_device
    assert resolve_device('cpu') == torch.device('cpu')
    expected = 'cuda' if torch.cuda.is_available() else 'cpu'
    assert resolve_device('auto').type == expected
    with pytest.raises(ValueError, match="bad train.device 'tpu'"):
        resolve_device('tpu')
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match='CUDA is not available'):
            resolve_device('cuda:0')
    info = init_distributed('cpu')  # no torchrun variables: a single process, no group
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)


def test_throughput_bench_runs(tiny_root, capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location('train_throughput',
                                                  REPO / 'bench' / 'train_throughput.py')
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(['--data', str(tiny_root), '--steps', '2', '--warmup', '0',
                       '--batch-size', '4']) == 0
    out = capsys.readouterr().out
    assert '| images (backbone every step) |' in out and '| cached features (no backbone) |' in out
    assert 'cache build: 36 image views' in out  # 3 folders x 6 images x 2 views
