"""LOCATE loss terms on tiny tensors with hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

from affordance_core.losses import LOSSES, register_loss


def test_registry():
    assert {'cross_entropy', 'prototype', 'concentration'} <= set(LOSSES)
    with pytest.raises(ValueError, match="loss 'prototype' is registered twice"):
        register_loss('prototype')(lambda outputs, batch: torch.zeros(()))


# ---------------------------------------------------------------------------- cross entropy
def test_cross_entropy_hand_computed():
    ln3 = math.log(3.0)
    outputs = {
        # ego: equal logits -> CE = ln 2
        'ego_logits': torch.tensor([[0.0, 0.0]]),
        # exo 0: p(y=0) = 3/4 -> ln(4/3); exo 1: p(y=0) = 1/4 -> ln 4
        'exo_logits': torch.tensor([[[ln3, 0.0], [0.0, ln3]]]),
    }
    batch = {'label': torch.tensor([0])}
    expected = math.log(2) + 0.5 * (math.log(4 / 3) + math.log(4))
    assert LOSSES['cross_entropy'](outputs, batch).item() == pytest.approx(expected, rel=1e-6)


def test_cross_entropy_batch_mean_and_no_exo():
    ln3 = math.log(3.0)
    # sample 0 (y=1): p = 3/4 -> ln(4/3); sample 1 (y=0): p = 1/2 -> ln 2
    outputs = {'ego_logits': torch.tensor([[0.0, ln3], [0.0, 0.0]])}
    batch = {'label': torch.tensor([1, 0])}
    expected = 0.5 * (math.log(4 / 3) + math.log(2))
    assert LOSSES['cross_entropy'](outputs, batch).item() == pytest.approx(expected, rel=1e-6)
    # exo term of a batch of 2 with N = 3: every exo slot uniform -> + ln 2
    outputs['exo_logits'] = torch.zeros(2, 3, 2)
    got = LOSSES['cross_entropy'](outputs, batch).item()
    assert got == pytest.approx(expected + math.log(2), rel=1e-6)
    with pytest.raises(ValueError, match=r"batch\['label'\] must have shape"):
        LOSSES['cross_entropy'](outputs, {'label': torch.tensor([0])})


# ---------------------------------------------------------------------------- prototype
def _proto_outputs():
    # Three samples, C = 2 classes, 2x2 maps, 2-d keys. The GT-class CAM of every sample is
    # [[2, 1], [0, 0]] -> min-max M = [[1, 0.5], [0, 0]]; the other class holds a decoy.
    gt = torch.tensor([[2.0, 1.0], [0.0, 0.0]])
    decoy = torch.tensor([[0.0, 0.0], [0.0, 5.0]])
    cam = torch.stack([torch.stack([gt, decoy]), torch.stack([decoy, gt]),
                       torch.stack([gt, decoy])]).requires_grad_(True)  # (3, 2, 2, 2)
    # keys at positions (0,0)=(1,0), (0,1)=(0,1), (1,0)=(5,5), (1,1)=(-3,2)
    k = torch.tensor([[[1.0, 0.0], [5.0, -3.0]], [[0.0, 1.0], [5.0, 2.0]]])  # (D=2, 2, 2)
    keys = k.expand(3, 2, 2, 2).clone()
    # e = (1*(1,0) + 0.5*(0,1)) / 1.5 = (2/3, 1/3) for every sample
    proto = torch.tensor([[0.0, 1.0],    # cos(e, c) = (1/3) / (sqrt(5)/3) = 1/sqrt(5)
                          [1.0, 0.0],    # cos = 2/sqrt(5) = 0.894 -> hinge gives 0
                          [0.6, 0.8]])   # sample 2 is invalid: ignored
    return {'ego_cam': cam, 'ego_keys': keys, 'part_proto': proto,
            'part_valid': torch.tensor([True, True, False])}, {'label': torch.tensor([0, 1, 0])}


def test_prototype_hand_computed_with_hinge():
    outputs, batch = _proto_outputs()
    loss = LOSSES['prototype'](outputs, batch)
    # sample 0: 1 - 1/sqrt(5) - 0.5 = 0.0528; sample 1: max(0, 1 - 0.894 - 0.5) = 0
    expected = (0.5 - 1 / math.sqrt(5) + 0.0) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    grad = outputs['ego_cam'].grad
    assert grad[0, 0].abs().sum() > 0          # active sample, GT class
    assert grad[0, 1].abs().sum() == 0         # other class
    assert grad[1].abs().sum() == 0            # hinge inactive
    assert grad[2].abs().sum() == 0            # invalid sample


def test_prototype_margin_from_outputs():
    outputs, batch = _proto_outputs()
    outputs['cel_margin'] = torch.tensor(0.2)
    # sample 0: 1 - 0.4472 - 0.2 = 0.3528; sample 1: 1 - 0.8944 - 0.2 < 0 -> 0
    expected = (0.8 - 1 / math.sqrt(5)) / 2
    assert LOSSES['prototype'](outputs, batch).item() == pytest.approx(expected, rel=1e-5)


def test_prototype_no_valid_sample_is_zero_with_graph():
    outputs, batch = _proto_outputs()
    outputs['part_valid'] = torch.zeros(3, dtype=torch.bool)
    loss = LOSSES['prototype'](outputs, batch)
    assert loss.item() == 0.0 and loss.requires_grad and loss.dim() == 0
    loss.backward()
    assert outputs['ego_cam'].grad.abs().sum() == 0


def test_prototype_constant_cam_is_finite():
    outputs, batch = _proto_outputs()
    outputs['ego_cam'] = torch.zeros(3, 2, 2, 2, requires_grad=True)
    loss = LOSSES['prototype'](outputs, batch)
    # M = 0 everywhere -> e = 0 -> cos = 0 -> 1 - 0 - 0.5 = 0.5 for both valid samples
    assert loss.item() == pytest.approx(0.5)


# ---------------------------------------------------------------------------- concentration
def test_concentration_single_peak():
    # [[1, 0], [0, 0]] -> +1e-3 -> q = [1.001, .001, .001, .001] / 1.004.
    # x, y in {-1, 0}: each coordinate is Bernoulli with p = P(x=-1) = 1.002 / 1.004,
    # variance p(1-p); loss = 2 p (1 - p) = 2 * 1.002 * 0.002 / 1.004^2.
    cam = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]], dtype=torch.float64)
    expected = 2 * 1.002 * 0.002 / 1.004 ** 2  # 0.0039761...
    got = LOSSES['concentration']({'ego_cam': cam}, {}).item()
    assert got == pytest.approx(expected, rel=1e-9)


def test_concentration_two_points_and_averaging():
    # diagonal [[1, 0], [0, 1]]: P(x=-1) = (1.001 + 0.001) / 2.004 = 1/2 -> var 1/4 per axis -> 0.5
    two = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    got = LOSSES['concentration']({'ego_cam': two.view(1, 1, 2, 2)}, {}).item()
    assert got == pytest.approx(0.5, rel=1e-12)
    # 1x4 row, peaks at both ends: x in {-1, -0.5, 0, 0.5}, q = [1.001, .001, .001, 1.001]/2.004
    # mu_x = (-1.001 - 0.0005 + 0 + 0.5005) / 2.004 = -0.501 / 2.004 = -1/4;
    # var_x = (2 * 0.75^2 * 1.001 + 2 * 0.25^2 * 0.001) / 2.004 = 1.12625 / 2.004 = 0.5620010;
    # y = -1 on the single row (variance 0)
    row = torch.tensor([[1.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    got = LOSSES['concentration']({'ego_cam': row.view(1, 1, 1, 4)}, {}).item()
    assert got == pytest.approx(1.12625 / 2.004, rel=1e-12)
    # all C maps of all samples are averaged: B = 2, C = 2 with maps {single, two} / {two, two}
    single = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    cam = torch.stack([torch.stack([single, two]), torch.stack([two, two])])
    expected = (2 * 1.002 * 0.002 / 1.004 ** 2 + 0.5 + 0.5 + 0.5) / 4
    got = LOSSES['concentration']({'ego_cam': cam}, {}).item()
    assert got == pytest.approx(expected, rel=1e-9)


def test_concentration_is_scale_invariant_and_differentiable():
    cam = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    a = LOSSES['concentration']({'ego_cam': cam}, {})
    b = LOSSES['concentration']({'ego_cam': 4.0 * cam + 2.0}, {})
    assert a.item() == pytest.approx(b.item(), rel=1e-8)
    a.backward()
    assert torch.isfinite(cam.grad).all() and cam.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r'\(B, C, H, W\)'):
        LOSSES['concentration']({'ego_cam': torch.zeros(3, 5, 5)}, {})
