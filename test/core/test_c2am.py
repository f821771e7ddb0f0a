"""C2AM (affordance_core.models.c2am): disentangler, losses vs explicit loops, polarity check,
object map, official conversion, optimiser groups, box extraction / CorLoc on hand-made maps,
background suppression, the shared Trainer and the ``affordance-c2am`` CLI.

The ViT variant runs on the tiny ``vit_test`` backbone at 64 x 64 (4 x 4 grid); the ResNet
variant on ResNet-18 (same code path as ResNet-50, whose shapes get one forward test)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from affordance_core.config import ExperimentConfig, OptimConfig, load_config
from affordance_core.engine.optim import build_optimizer
from affordance_core.inference.object_prior import suppress_background
from affordance_core.losses import LOSSES
from affordance_core.losses.c2am_contrast import sim_max_loss, sim_min_loss
from affordance_core.models.c2am import (C2AM, C2AMResNet, Disentangler, c2am_resnet50,
                                         c2am_test, from_official_state_dict,
                                         load_resnet_weights, polarity_is_inverted,
                                         to_official_state_dict)
from affordance_core.models.layers import key_channel_perm
from affordance_core.ops.boxes import (best_threshold, box_iou, boxes_from_scoremap, corloc,
                                       default_thresholds)
from affordance_core.registry import create_model, list_models

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / 'training' / 'configs'
CLASSES = ['hold', 'cut', 'drink_with']
C = len(CLASSES)

pytestmark = pytest.mark.usefixtures('torch_one_thread')


@pytest.fixture(scope='module')
def model() -> C2AM:
    torch.manual_seed(0)
    return c2am_test(classes=CLASSES)


@pytest.fixture(scope='module')
def data():
    gen = torch.Generator().manual_seed(1)
    ego = torch.randn(3, 3, 64, 64, generator=gen)      # 4x4 patch grid
    exo = torch.randn(3, 3, 3, 64, 64, generator=gen)   # N = 3 exo images per sample
    return ego, exo


def c2am_loss(out: dict) -> torch.Tensor:
    return LOSSES['c2am_sim_max'](out, {}) + LOSSES['c2am_sim_min'](out, {})


# ------------------------------------------------------------------------- losses (reference)
def cosine_loop(a, b):
    """Explicit-loop clamped cosine matrix (list of lists of floats)."""
    out = []
    for x in a.tolist():
        row = []
        for y in b.tolist():
            dot = sum(p * q for p, q in zip(x, y))
            nx, ny = math.sqrt(sum(p * p for p in x)), math.sqrt(sum(q * q for q in y))
            c = dot / (nx * ny) if nx > 0 and ny > 0 else 0.0
            row.append(min(max(c, 0.0005), 0.9995))
        out.append(row)
    return out


def sim_max_loop(emb, alpha):
    s = cosine_loop(emb, emb)
    m = len(s)
    total = 0.0
    for i in range(m):
        for j in range(m):
            # 0-based descending position in the sorted row; tied entries (clamped values)
            # take consecutive positions, as the reference's sort does (they share one loss
            # value, so which tie gets which position does not change the sum)
            rank = sum(1 for k in range(m) if s[i][k] > s[i][j] or (s[i][k] == s[i][j] and k < j))
            total += math.exp(-alpha * (rank - 1)) * max(0.0, -math.log(s[i][j]))
    return total / (m * m)


def sim_min_loop(bg, fg):
    s = cosine_loop(bg, fg)
    return sum(-math.log(1 - v) for row in s for v in row) / (len(s) * len(s[0]))


def test_losses_registered():
    assert {'c2am_sim_min', 'c2am_sim_max'} <= set(LOSSES)


def test_losses_hand_computed():
    # sim_min: bg (1,0),(0,1) vs fg (0,1),(1,0): cosines 0 -> 0.0005 and 1 -> 0.9995 (clamped)
    bg = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    fg = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    expected = (2 * -math.log(1 - 0.0005) + 2 * -math.log(1 - 0.9995)) / 4
    assert sim_min_loss(bg, fg).item() == pytest.approx(expected, rel=1e-5)
    # sim_max on (1,0),(1,1): S = [[.9995, 1/sqrt2], [1/sqrt2, .9995]]; diagonal rank 0 weighs
    # e^alpha, the off-diagonal (rank 1) weighs 1
    alpha = 0.75
    emb = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    diag = math.exp(alpha) * -math.log(0.9995)
    off = -math.log(1 / math.sqrt(2))
    assert sim_max_loss(emb, alpha).item() == pytest.approx((2 * diag + 2 * off) / 4, rel=1e-5)
    # the registered losses read the outputs dict; sim_max sums bg and fg, alpha from outputs
    out = {'bg_embed': emb, 'fg_embed': 2 * emb, 'c2am_alpha': torch.tensor(alpha)}
    got = LOSSES['c2am_sim_max'](out, {}).item()
    assert got == pytest.approx(2 * (2 * diag + 2 * off) / 4, rel=1e-5)
    out = {'bg_embed': bg, 'fg_embed': fg}
    assert LOSSES['c2am_sim_min'](out, {}).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match='non-empty'):
        sim_min_loss(torch.zeros(0, 3), torch.zeros(0, 3))


@pytest.mark.parametrize('alpha', [0.05, 0.75])
def test_losses_match_explicit_loops(alpha):
    gen = torch.Generator().manual_seed(3)
    bg = torch.randn(7, 5, generator=gen)
    fg = torch.randn(7, 5, generator=gen)
    bg[1] = -bg[0]           # cosine -1: clamped to 0.0005
    fg[2] = 3.0 * fg[3]      # cosine 1 off the diagonal: clamped to 0.9995 (a tie)
    assert sim_min_loss(bg, fg).item() == pytest.approx(sim_min_loop(bg, fg), rel=1e-5)
    for emb in (bg, fg):
        assert sim_max_loss(emb, alpha).item() == pytest.approx(sim_max_loop(emb, alpha),
                                                                rel=1e-5)
    out = {'bg_embed': bg, 'fg_embed': fg, 'c2am_alpha': alpha}
    got = LOSSES['c2am_sim_max'](out, {}).item()
    assert got == pytest.approx(sim_max_loop(bg, alpha) + sim_max_loop(fg, alpha), rel=1e-5)


# ------------------------------------------------------------------------- model
def test_registry_and_constructor():
    assert {'c2am_resnet50', 'c2am_vits16', 'c2am_vits14', 'c2am_imgfocus', 'c2am_test'} <= set(
        list_models('c2am_*'))
    m = create_model('c2am_test', classes=CLASSES)
    assert isinstance(m, C2AM) and m.num_classes == C and m.classes == tuple(CLASSES)
    assert m.feature_fields == ('keys',) and m.backbone.name == 'vit_test'
    assert m.ac_head.activation_head.weight.shape == (1, 48, 3, 3)
    assert m.ac_head.activation_head.bias is None
    assert m.flipped.dtype == torch.bool and not bool(m.flipped)
    assert 'flipped' in m.state_dict()
    assert c2am_test().num_classes == 1  # class-agnostic prior: no class list needed
    tok = c2am_test(feature='tokens')
    assert tok.feature_fields == ('tokens',) and tok.official_num_heads == 0
    assert m.official_num_heads == 3
    with pytest.raises(ValueError, match="feature must be 'keys' or 'tokens'"):
        c2am_test(feature='cls')
    with pytest.raises(ValueError, match='num_classes=2 but 3 class names'):
        c2am_test(num_classes=2, classes=CLASSES)


def test_disentangler_matches_definition():
    torch.manual_seed(0)
    head = Disentangler(6).eval()
    with torch.no_grad():
        head.bn_head.running_mean.fill_(0.3)
        head.bn_head.running_var.fill_(2.0)
    x = torch.randn(2, 6, 3, 4)
    fg, bg, a = head(x)
    z = F.conv2d(x, head.activation_head.weight, padding=1)
    ref_a = torch.sigmoid((z - 0.3) / math.sqrt(2.0 + 1e-5))
    torch.testing.assert_close(a, ref_a)
    for b in range(2):
        for c in range(6):
            f = sum(a[b, 0, i, j] * x[b, c, i, j] for i in range(3) for j in range(4)) / 12
            g = sum((1 - a[b, 0, i, j]) * x[b, c, i, j] for i in range(3) for j in range(4)) / 12
            assert fg[b, c].item() == pytest.approx(f.item(), abs=1e-6)
            assert bg[b, c].item() == pytest.approx(g.item(), abs=1e-6)


def test_forward_uses_every_image_and_ignores_labels(model, data):
    ego, exo = data
    model.train()
    out = model(ego, exo, torch.tensor([0, 1, 2]))
    shapes = {'fg_embed': (12, 48), 'bg_embed': (12, 48), 'ego_ccam': (3, 4, 4),
              'exo_ccam': (9, 4, 4), 'c2am_alpha': ()}
    assert {k: tuple(v.shape) for k, v in out.items()} == shapes
    assert out['c2am_alpha'].item() == pytest.approx(0.05)
    model.zero_grad(set_to_none=True)
    c2am_loss(out).backward()
    assert model.ac_head.activation_head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.backbone.parameters())
    # labels are ignored; eval mode (BN running stats): image order ego first, exo sample-major
    model.eval()
    a = model(ego, exo, None)
    b = model(ego, exo, torch.tensor([2, 2, 2]))
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)
    keys = torch.cat([model.backbone(ego).keys, model.backbone(exo.flatten(0, 1)).keys])
    fg, bg, act = model.ac_head(keys)
    torch.testing.assert_close(a['fg_embed'], fg)
    torch.testing.assert_close(a['bg_embed'], bg)
    torch.testing.assert_close(a['exo_ccam'], act[3:, 0])
    ego_only = model(ego)
    assert ego_only['fg_embed'].shape == (3, 48) and 'exo_ccam' not in ego_only
    model.train()


def test_forward_with_features_equals_images(model, data):
    ego, exo = data
    model.train()
    a = model(ego, exo, None)
    ego_feats = model.backbone(ego).keep(model.feature_fields)
    exo_feats = model.backbone(exo.flatten(0, 1)).keep(model.feature_fields)
    b = model(None, None, None, ego_feats=ego_feats, exo_feats=exo_feats.to_dict())
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    torch.testing.assert_close(model.object_map(feats=ego_feats), model.object_map(ego))
    with pytest.raises(ValueError, match='do not split into 3 samples'):
        model(None, None, None, ego_feats=ego_feats, exo_feats=exo_feats.select([0, 1]))
    with pytest.raises(ValueError, match="lack the field 'keys'"):
        model(None, None, None, ego_feats={'tokens': ego_feats.keys})


def test_sgd_steps_decrease_loss(data):
    ego, exo = data
    torch.manual_seed(0)
    m = c2am_test()
    ego_f, exo_f = m.backbone(ego), m.backbone(exo.flatten(0, 1))
    opt = build_optimizer(m, OptimConfig(lr=0.05, momentum=0.9, weight_decay=0.0))
    assert [n for g in opt.param_groups for n in g['names']] == ['ac_head.activation_head.weight']
    m.train()
    losses = []
    for _ in range(15):
        loss = c2am_loss(m(None, None, None, ego_feats=ego_f, exo_feats=exo_f))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.9 * losses[0], losses


# ------------------------------------------------------------------------- polarity
def test_polarity_is_inverted_hand_maps():
    fg = torch.zeros(6, 6)
    fg[1:5, 1:5] = 0.9                 # object in the centre: border all 0
    assert not polarity_is_inverted(fg)
    assert polarity_is_inverted(1 - fg)  # border all 1
    m = torch.zeros(4, 4)
    m[0] = 0.6                          # top row 1, left / right columns 1/4, bottom 0
    m[:, 0] = 0.6
    m[:, -1] = 0.6                      # -> (1 + 1 + 0 + 1) / 4 = 0.75 > 0.5
    assert polarity_is_inverted(m)
    m[:, -1] = 0.5                      # 0.5 is not > 0.5: right column 1/4 -> (1+1+0+.25)/4
    m[0, -1] = 0.6
    assert polarity_is_inverted(m)      # 0.5625
    m[0] = 0.0
    m[0, 0] = 0.6                       # (1/4 + 1 + 0 + 1/4) / 4 = 0.375
    assert not polarity_is_inverted(m)
    assert polarity_is_inverted(torch.ones(1, 3, 3))
    with pytest.raises(ValueError, match='one'):
        polarity_is_inverted(torch.ones(2, 3, 3))


def crafted_keys(sign: float) -> dict:
    """Keys whose channel 0 is +sign on the border and -sign inside (3 images, 4x4)."""
    keys = torch.zeros(3, 48, 4, 4)
    keys[:, 0] = sign
    keys[:, 0, 1:3, 1:3] = -sign
    return {'keys': keys}


@pytest.mark.parametrize('border_is_background', [False, True])
def test_polarity_check_after_epoch_0(border_is_background):
    m = c2am_test()
    with torch.no_grad():
        w = torch.zeros(1, 48, 3, 3)
        w[0, 0, 1, 1] = 1.0             # z = channel 0 of the keys (centre tap)
        m.ac_head.activation_head.weight.copy_(w)
    feats = crafted_keys(1.0 if border_is_background else -1.0)
    m.eval()
    m(None, None, None, ego_feats=feats)
    assert m._polarity_probe is None    # eval forwards are not remembered
    m.train()
    other = crafted_keys(-1.0 if border_is_background else 1.0)
    m(None, None, None, ego_feats=other)
    out = m(None, None, None, ego_feats=feats)  # the last batch of epoch 0 decides
    torch.testing.assert_close(m._polarity_probe, out['ego_ccam'][0].detach())
    border_high = bool(out['ego_ccam'][0, 0, 0] > 0.5)
    assert border_high == border_is_background
    m.epoch_end(1)
    assert not bool(m.flipped)          # only epoch 0 checks
    m.epoch_end(0)
    assert bool(m.flipped) == border_is_background
    m.epoch_end(1)
    assert bool(m.flipped) == border_is_background
    # every later use is polarity-corrected: the object (centre) is high
    m.eval()
    raw = m.ac_head.activation(feats['keys'])[:, 0]
    obj = m.object_map(feats=feats)
    torch.testing.assert_close(obj, 1 - raw if border_is_background else raw)
    assert bool((obj[:, 1, 1] > obj[:, 0, 0]).all())
    # the decision travels with the state dict
    fresh = c2am_test()
    fresh.load_state_dict(m.state_dict())
    assert bool(fresh.flipped) == border_is_background


def test_epoch_end_without_batch_keeps_polarity(caplog):
    m = c2am_test()
    with caplog.at_level('WARNING'):
        m.epoch_end(0)
    assert not bool(m.flipped) and 'polarity check skipped' in caplog.text


# ------------------------------------------------------------------------- inference
@pytest.mark.parametrize('flipped', [False, True])
def test_object_map_cams_predict(model, data, flipped):
    ego, _ = data
    model.flipped.fill_(flipped)
    try:
        model.train()  # inference paths use running statistics in either mode
        bn = model.ac_head.bn_head
        before = bn.running_mean.clone(), bn.num_batches_tracked.clone()
        obj = model.object_map(ego)
        assert torch.equal(bn.running_mean, before[0])
        assert torch.equal(bn.num_batches_tracked, before[1])
        model.eval()
        torch.testing.assert_close(model.object_map(ego), obj)
        assert obj.shape == (3, 4, 4) and obj.min() >= 0 and obj.max() <= 1
        raw = model.ac_head.activation(model.backbone(ego).keys)[:, 0]
        torch.testing.assert_close(obj, 1 - raw if flipped else raw)
        cams = model.cams(ego)
        assert cams.shape == (3, C, 4, 4)
        for c in range(C):
            torch.testing.assert_close(cams[:, c], obj)
            torch.testing.assert_close(model.predict_raw(ego, c), obj)
            pred = model.predict(ego, torch.full((3,), c))
            assert pred.shape == (3, 64, 64) and pred.min() >= 0 and pred.max() <= 1
            assert (pred.amax((1, 2)) > 0.999).all()
        torch.testing.assert_close(model.predict_raw(None, [0, 1, 2], feats=model.backbone(ego)),
                                   obj)
        with pytest.raises(ValueError, match='class_ids must lie in'):
            model.predict_raw(ego, torch.tensor([0, 1, C]))
    finally:
        model.flipped.fill_(False)
        model.train()


def test_onnx_export_parity(tmp_path):
    pytest.importorskip('onnx')
    ort = pytest.importorskip('onnxruntime')
    from affordance_core.export.onnx import export_onnx

    torch.manual_seed(0)
    m = create_model('c2am_test', classes=CLASSES).eval()
    m.flipped.fill_(True)  # the polarity is part of the exported graph
    path = export_onnx(m, tmp_path / 'c2am.onnx', image_size=64, checkpoint_sha256='ab' * 32)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    sess = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    cams, maps = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    assert cams.shape == (1, C, 4, 4) and maps.shape == (1, C, 64, 64)
    np.testing.assert_allclose(cams, m.cams(x).detach().numpy(), atol=1e-5)


# ------------------------------------------------------------------------- conversion
def test_official_conversion_roundtrip_and_permutation(model, data):
    ego, _ = data
    model.eval()
    with torch.no_grad():
        model.ac_head.bn_head.running_mean.fill_(0.1)
        model.ac_head.bn_head.running_var.fill_(1.5)
    head = {k: v for k, v in model.state_dict().items() if not k.startswith('backbone.')}
    official = to_official_state_dict(head, model.official_num_heads)
    assert 'flipped' not in official and set(official) == {k for k in head if k != 'flipped'}
    w_ours = head['ac_head.activation_head.weight']
    w_off = official['ac_head.activation_head.weight']
    assert not torch.equal(w_ours, w_off)  # the permutation is not the identity
    back = from_official_state_dict(official, model.official_num_heads)
    for key, value in back.items():
        assert torch.equal(value, head[key]), key
    fresh = c2am_test(classes=CLASSES).eval()
    fresh.load_official(official, flag=False)
    torch.testing.assert_close(fresh.object_map(ego), model.object_map(ego), rtol=0, atol=0)
    # official weights applied to d-major keys reproduce our map; our weights do not
    keys = model.backbone(ego).keys
    official_keys = keys[:, key_channel_perm(48, 3)]
    bn = model.ac_head.bn_head

    def head_map(x, w):
        z = F.conv2d(x, w, padding=1)
        z = F.batch_norm(z, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0,
                         bn.eps)
        return torch.sigmoid(z)[:, 0]

    ours = model.object_map(ego)
    torch.testing.assert_close(head_map(official_keys, w_off), ours, atol=1e-6, rtol=1e-5)
    assert (head_map(official_keys, w_ours) - ours).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"unknown keys .*'ac_head\.fc\.weight'"):
        from_official_state_dict({'ac_head.fc.weight': w_off}, 3)
    with pytest.raises(ValueError, match='not C2AM head keys'):
        to_official_state_dict(model.state_dict(), 3)
    # ResNet features are not DINO keys: no permutation
    assert torch.equal(to_official_state_dict(head, 0)['ac_head.activation_head.weight'], w_ours)


# ------------------------------------------------------------------------- ResNet variant
@pytest.fixture(scope='module')
def resnet() -> C2AMResNet:
    torch.manual_seed(0)
    return C2AMResNet(classes=CLASSES, backbone='resnet18', pretrained=False)


def test_resnet_layer4_stride_1_without_dilation(resnet):
    for name, m in resnet.backbone.layer4.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            assert m.stride == (1, 1) and m.dilation == (1, 1), name
    assert resnet.backbone.layer3[0].conv1.stride == (2, 2)  # BasicBlock strides its conv1
    assert resnet.backbone.out_channels == 768 and resnet.feature_fields == ()
    with torch.no_grad():
        feats = resnet.backbone(torch.randn(1, 3, 64, 64))
    assert feats.shape == (1, 768, 4, 4)  # output stride 16
    m50 = c2am_resnet50(pretrained=False)
    assert m50.backbone.out_channels == 3072
    assert m50.ac_head.activation_head.weight.shape == (1, 3072, 3, 3)
    assert m50.backbone.layer4[0].conv2.stride == (1, 1)
    assert m50.backbone.layer4[0].downsample[0].stride == (1, 1)
    with torch.no_grad():
        assert m50.eval().object_map(torch.randn(1, 3, 32, 32)).shape == (1, 2, 2)
    # state dict names are the reference Network's
    names = set(m50.state_dict())
    assert {'backbone.conv1.weight', 'backbone.layer4.2.bn3.running_var',
            'ac_head.activation_head.weight', 'ac_head.bn_head.weight', 'flipped'} <= names


def test_resnet_optimizer_groups_follow_reference(resnet):
    opt = build_optimizer(resnet, OptimConfig(lr=1e-4, momentum=1e-4, nesterov=False,
                                              weight_decay=1e-4))
    lr_of = {n: g['lr'] for g in opt.param_groups for n in g['names']}
    convs = {f'{n}.weight' for n, m in resnet.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert set(lr_of) == convs  # no BatchNorm affine parameter, the head's BN included
    assert lr_of['ac_head.activation_head.weight'] == pytest.approx(1e-3)
    assert lr_of['backbone.conv1.weight'] == pytest.approx(1e-4)
    assert all(v == pytest.approx(1e-4) for k, v in lr_of.items() if k.startswith('backbone.'))
    assert opt.defaults['momentum'] == pytest.approx(1e-4)


def test_resnet_training_steps(resnet, data):
    ego, exo = data
    small_ego, small_exo = ego[:2, :, :32, :32], exo[:2, :, :, :32, :32]
    resnet.train()
    opt = build_optimizer(resnet, OptimConfig(lr=0.02, momentum=0.9, weight_decay=0.0))
    bn_before = resnet.backbone.bn1.weight.detach().clone()
    losses = []
    for _ in range(4):
        out = resnet(small_ego, small_exo, None)
        loss = c2am_loss(out)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert out['fg_embed'].shape == (8, 768) and out['ego_ccam'].shape == (2, 2, 2)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
    assert torch.equal(resnet.backbone.bn1.weight, bn_before)  # BN affine never optimised
    with pytest.raises(ValueError, match='cannot use precomputed features'):
        resnet(None, None, None, ego_feats={'keys': torch.zeros(2, 768, 2, 2)})
    # the object map uses running statistics (trunk and head) in train mode too
    running = resnet.backbone.layer4[0].bn1.running_mean.clone()
    with torch.no_grad():
        obj_train = resnet.object_map(small_ego)
    assert resnet.backbone.training
    assert torch.equal(resnet.backbone.layer4[0].bn1.running_mean, running)
    resnet.eval()
    torch.testing.assert_close(resnet.object_map(small_ego), obj_train)
    assert resnet.predict(small_ego, 1).shape == (2, 32, 32)
    assert resnet.cams(small_ego).shape == (2, C, 2, 2)


def test_resnet_weights_loading(tmp_path, monkeypatch, resnet):
    import torchvision

    torch.manual_seed(5)
    src = torchvision.models.resnet18(weights=None).state_dict()
    moco = {f'module.encoder_q.{k}': v for k, v in src.items()}
    moco.update({f'module.encoder_k.{k}': v + 1 for k, v in src.items()})
    moco['module.queue'] = torch.zeros(8, 4)
    path = tmp_path / 'moco_r18.pth'
    torch.save({'epoch': 200, 'state_dict': moco}, path)
    m = C2AMResNet(backbone='resnet18', backbone_weights=str(path))
    for k, v in m.backbone.state_dict().items():
        if not k.endswith('num_batches_tracked'):
            assert torch.equal(v, src[k]), k
    plain = tmp_path / 'plain.pth'
    torch.save(src, plain)
    load_resnet_weights(resnet.backbone, plain)  # torchvision layout (fc ignored)
    assert torch.equal(resnet.backbone.conv1.weight, src['conv1.weight'])
    bad = tmp_path / 'bad.pth'
    torch.save({f'net.{k}': v for k, v in src.items()}, bad)
    with pytest.raises(ValueError, match='weights do not fit resnet18'):
        load_resnet_weights(resnet.backbone, bad)
    monkeypatch.setenv('AFFORDANCE_WEIGHTS_DIR', str(tmp_path / 'empty'))
    with pytest.raises(FileNotFoundError, match='resnet18-f37072fd.pth'):
        C2AMResNet(backbone='resnet18')
    # reference checkpoint: same key names, Flag outside the state dict
    official = {f'module.{k}': v for k, v in resnet.state_dict().items() if k != 'flipped'}
    fresh = C2AMResNet(backbone='resnet18', pretrained=False, classes=CLASSES)
    fresh.load_official(official, flag=True)
    assert bool(fresh.flipped)
    for k, v in resnet.state_dict().items():
        if k != 'flipped':
            assert torch.equal(fresh.state_dict()[k], v), k


# ------------------------------------------------------------------------- boxes and CorLoc
def test_boxes_largest_contour_at_tau_max():
    m = np.zeros((16, 16), np.float32)
    m[2:6, 3:9] = 0.8      # 4 x 6 block: box (3, 2, 9, 6)
    m[10:12, 10:12] = 1.0  # small, brighter block: box (10, 10, 12, 12)
    # tau 0.5: cut int(0.5 * 255) = 127 -> both pass; the larger contour wins
    # tau 0.9: cut int(0.9 * 255) = 229 -> 0.8 * 255 = 204 fails, only the small block
    low, high = boxes_from_scoremap(m, [0.5, 0.9])
    np.testing.assert_array_equal(low, [[3, 2, 9, 6]])
    np.testing.assert_array_equal(high, [[10, 10, 12, 12]])
    (scaled,) = boxes_from_scoremap(m, [0.5], scale=16.0)  # 448 / 28 in the reference
    np.testing.assert_array_equal(scaled, [[48, 32, 144, 96]])
    (xy,) = boxes_from_scoremap(m, [0.5], scale=(2.0, 3.0))
    np.testing.assert_array_equal(xy, [[6, 6, 18, 18]])
    # the cut is relative to the maximum: halve the map, same boxes
    np.testing.assert_array_equal(boxes_from_scoremap(m / 2, [0.5])[0], [[3, 2, 9, 6]])
    (both,) = boxes_from_scoremap(m, [0.5], multi_contour=True)
    assert sorted(map(tuple, both.tolist())) == [(3, 2, 9, 6), (10, 10, 12, 12)]
    # a block touching the border is clipped to W - 1 / H - 1; an empty map gives zeros
    edge = np.zeros((8, 8), np.float32)
    edge[4:, 5:] = 1.0
    np.testing.assert_array_equal(boxes_from_scoremap(edge, [0.5])[0], [[5, 4, 7, 7]])
    np.testing.assert_array_equal(boxes_from_scoremap(np.zeros((8, 8), np.float32), [0.5])[0],
                                  [[0, 0, 0, 0]])
    assert default_thresholds() == pytest.approx([i / 20 for i in range(1, 20)])
    with pytest.raises(ValueError, match=r'\[0, 1\]'):
        boxes_from_scoremap(m * 2, [0.5])
    with pytest.raises(ValueError, match='thresholds must lie'):
        boxes_from_scoremap(m, [1.5])


def test_boxes_match_a_direct_contour_computation():
    rng = np.random.default_rng(0)
    m = cv2.GaussianBlur(rng.random((28, 28)).astype(np.float32), (0, 0), 2.0)
    m = (m - m.min()) / (m.max() - m.min())
    for tau in (0.3, 0.6):
        binary = ((m * 255).astype(np.uint8) > int(tau * 255)).astype(np.uint8)
        n, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
        areas = [cv2.contourArea(max(cv2.findContours((labels == i).astype(np.uint8),
                                                      cv2.RETR_EXTERNAL,
                                                      cv2.CHAIN_APPROX_SIMPLE)[0],
                                     key=cv2.contourArea)) for i in range(1, n)]
        x, y, w, h = stats[1 + int(np.argmax(areas)), :4]
        got = boxes_from_scoremap(m, [tau])[0][0]
        np.testing.assert_array_equal(got, [x, y, min(x + w, 27), min(y + h, 27)])


def test_iou_and_corloc():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]], float)
    gt = np.array([[0, 0, 10, 10],     # IoU 1
                   [0, 0, 10, 5],      # IoU 0.5: not > 0.5
                   [0, 0, 10, 6],      # IoU 0.6
                   [20, 20, 30, 30]],  # IoU 0
                  float)
    np.testing.assert_allclose(box_iou(boxes, gt), [1.0, 0.5, 0.6, 0.0])
    assert corloc(boxes, gt) == pytest.approx(50.0)
    multi = np.stack([gt, gt[::-1]], axis=1)  # the best of two GT boxes per image
    np.testing.assert_allclose(box_iou(boxes, multi), [1.0, 0.6, 0.6, 1.0])
    maps = []
    for _ in range(2):
        m = np.zeros((8, 8), np.float32)
        m[2:6, 2:6] = 0.6
        m[3:5, 3:5] = 1.0
        maps.append(m)
    # tau 0.5 -> box (2, 2, 6, 6) = GT; tau 0.7 -> (3, 3, 5, 5), IoU 4/16
    best, tau, scores = best_threshold(maps, np.array([[2, 2, 6, 6]] * 2, float), [0.5, 0.7])
    assert (best, tau, scores) == (100.0, 0.5, [100.0, 0.0])


# ------------------------------------------------------------------------- background
def minmax(x):
    x = np.asarray(x, np.float64)
    return (x - x.min()) / (x.max() - x.min())


def test_suppress_background_removes_the_background_blob():
    yy, xx = np.mgrid[0:64, 0:64]
    heat = (np.exp(-((yy - 20) ** 2 + (xx - 20) ** 2) / 50.0)          # on the object
            + 0.9 * np.exp(-((yy - 54) ** 2 + (xx - 54) ** 2) / 50.0))  # on the background
    obj = np.zeros((8, 8), np.float32)
    obj[0:5, 0:5] = 1.0  # object map (8 x 8 grid): the top-left 40 x 40 pixels
    assert heat[54, 54] / heat.max() > 0.85  # the background blob is strong before
    for mode in ('multiply', 'mask'):
        out = suppress_background(heat, obj, mode=mode)
        assert out.shape == (64, 64) and out.dtype == np.float32
        assert out.max() == pytest.approx(1.0) and out.min() == 0.0
        assert out[20, 20] == pytest.approx(1.0, abs=0.01)   # object blob stays
        assert out[46:, 46:].max() < 1e-6                     # background blob is gone
    # both modes equal a hand computation on the bilinearly resized object map
    up = cv2.resize(obj, (64, 64), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(suppress_background(heat, obj), minmax(minmax(heat) * up),
                               atol=1e-5)
    np.testing.assert_allclose(suppress_background(heat, obj, 'mask', 0.3),
                               minmax(minmax(heat) * (up >= 0.3)), atol=1e-5)
    # (C, H, W), raw CAMs with negative values, torch input; a constant map changes nothing
    stack = torch.from_numpy(np.stack([heat, heat[::-1].copy()]) * 5.0 - 2.0)
    out = suppress_background(stack, torch.from_numpy(obj))
    assert out.shape == (2, 64, 64) and out.min() >= 0 and out.max() <= 1
    np.testing.assert_allclose(suppress_background(heat, np.full((4, 4), 0.7)), minmax(heat),
                               atol=1e-6)
    with pytest.raises(ValueError, match='unknown mode'):
        suppress_background(heat, obj, mode='gate')
    with pytest.raises(ValueError, match='threshold'):
        suppress_background(heat, obj, 'mask', 1.5)
    with pytest.raises(ValueError, match=r'\(h, w\)'):
        suppress_background(heat, np.zeros((2, 4, 4)))


# ------------------------------------------------------------------------- trainer and CLI
def c2am_cfg(root: Path, out: Path, *overrides: str) -> ExperimentConfig:
    return load_config(ExperimentConfig, CONFIGS / 'c2am_synth_demo.yaml', [
        'model.name=c2am_test', f'data.root={root}', 'data.image_size=64', 'data.resize=72',
        'data.num_workers=0', 'train.batch_size=4', 'train.epochs=1', 'train.device=cpu',
        'train.tensorboard=false', 'train.num_overlays=0', f'train.output_dir={out}',
        *overrides])


@pytest.mark.parametrize('variant', ['vit_cached', 'resnet'])
def test_trainer_one_epoch(tiny_agd, tmp_path, variant):
    from affordance_core.checkpoint import load_checkpoint, read_checkpoint
    from affordance_core.engine.trainer import Trainer

    out = tmp_path / variant
    extra = ['train.cache_features=true'] if variant == 'vit_cached' else [
        'model.name=c2am_resnet50', 'train.cache_features=false',
        'model.kwargs={backbone: resnet18, pretrained: false}']
    summary = Trainer(c2am_cfg(tiny_agd, out, *extra), progress=False).fit()
    assert summary['epochs'] == 1 and summary['best_epoch'] == 1
    hist = json.loads((out / 'history.json').read_text())['epochs'][0]
    assert math.isfinite(hist['loss']) and {'c2am_sim_max', 'c2am_sim_min'} <= set(hist)
    assert all(math.isfinite(hist[k]) for k in ('KLD', 'SIM', 'NSS'))
    payload = read_checkpoint(out / 'last.pt')
    assert 'flipped' in payload['state_dict']
    model = load_checkpoint(out / 'last.pt')
    assert model.num_classes == 36 and callable(model.object_map)  # the Seen class list


def test_cli_boxes_and_train(tiny_agd, tmp_path, capsys):
    from affordance_core.checkpoint import save_checkpoint
    from affordance_core.cli.c2am import main

    torch.manual_seed(0)
    ckpt = save_checkpoint(create_model('c2am_test', classes=CLASSES).eval(),
                           tmp_path / 'c2am.pt')
    images = tmp_path / 'imgs'
    (images / 'sub').mkdir(parents=True)
    rng = np.random.default_rng(0)
    cv2.imwrite(str(images / 'a.png'), rng.integers(0, 255, (40, 60, 3), np.uint8))
    cv2.imwrite(str(images / 'sub' / 'b.jpg'), rng.integers(0, 255, (50, 30, 3), np.uint8))
    out = tmp_path / 'boxes'
    assert main(['boxes', '--checkpoint', str(ckpt), '--images', str(images), '--out', str(out),
                 '--image-size', '64', '--device', 'cpu', '--threshold', '0.3']) == 0
    result = json.loads((out / 'boxes.json').read_text())
    assert set(result['boxes']) == {'a.png', 'sub/b.jpg'} and result['threshold'] == 0.3
    for rec in result['boxes'].values():
        x0, y0, x1, y1 = rec['box']
        assert 0 <= x0 <= x1 <= rec['width'] and 0 <= y0 <= y1 <= rec['height']
        assert all(0 <= v <= 1 for v in rec['box_norm'])
    assert len(list((out / 'overlays').glob('*.png'))) == 2
    out2 = tmp_path / 'boxes_agd'
    assert main(['boxes', '--checkpoint', str(ckpt), '--data', str(tiny_agd), '--split', 'Seen',
                 '--out', str(out2), '--image-size', '64', '--device', 'cpu',
                 '--num-overlays', '1', '--max-images', '4']) == 0
    agd = json.loads((out2 / 'boxes.json').read_text())['boxes']
    assert len(agd) == 4 and all(k.startswith('Seen/testset/egocentric/') for k in agd)
    assert len(list((out2 / 'overlays').glob('*.png'))) == 1
    capsys.readouterr()
    assert main(['boxes', '--checkpoint', str(tmp_path / 'missing.pt'), '--images',
                 str(images), '--out', str(out)]) == 2
    assert 'affordance-c2am: error:' in capsys.readouterr().err
    assert main(['detect']) == 2
    run = tmp_path / 'run'
    assert main(['train', '--config', str(CONFIGS / 'c2am_synth_demo.yaml'), '--no-progress',
                 'model.name=c2am_test', f'data.root={tiny_agd}', 'data.image_size=64',
                 'data.resize=72', 'data.num_workers=0', 'train.batch_size=6',
                 'train.device=cpu', 'train.epochs=1', 'train.eval_every=0',
                 'train.cache_features=false', 'train.tensorboard=false',
                 f'train.output_dir={run}']) == 0
    assert (run / 'last.pt').is_file()


@pytest.mark.parametrize('name', ['c2am_seen', 'c2am_unseen', 'c2am_hico', 'c2am_synth_demo'])
def test_configs(name):
    path = CONFIGS / f'{name}.yaml'
    cfg = load_config(ExperimentConfig, path)
    assert cfg.model.name in list_models('c2am_*')
    assert [t.name for t in cfg.losses] == ['c2am_sim_max', 'c2am_sim_min']
    assert all(t.weight == 1.0 and t.start_epoch == 0 for t in cfg.losses)
    assert cfg.optim.scheduler == 'poly' and cfg.optim.power == 0.9
    raw = path.read_text()
    assert 'momentum' in yaml.safe_load(raw)['optim']
    if cfg.model.name == 'c2am_resnet50':  # official: lr 1e-4, momentum quirk, no cache
        assert cfg.optim.lr == 1e-4 and cfg.optim.momentum == 1e-4 and not cfg.optim.nesterov
        assert cfg.optim.weight_decay == 1e-4 and not cfg.train.cache_features
        assert cfg.train.batch_size * (1 + cfg.data.num_exo) == 16
        assert cfg.data.resize_mode == 'square' and 'momentum slot' in raw
    else:
        assert cfg.train.cache_features
