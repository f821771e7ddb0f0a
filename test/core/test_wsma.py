"""WSMA (affordance_core.models.wsma) on the tiny ``vit_test`` backbone and the tiny CLIP tower.

Also its blocks (NMF / Hamburger, AttentionPool2d, refinement), the CLIP text loading, the three
WSMA losses, the lr groups and the official checkpoint conversion.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import affordance_core.models.wsma as wsma_mod
from affordance_core.config import OptimConfig
from affordance_core.engine.optim import param_groups
from affordance_core.losses import LOSSES
from affordance_core.losses import class_relation as _cr  # noqa: F401  (registers the losses)
from affordance_core.losses import clip_alignment as _ca  # noqa: F401
from affordance_core.losses import feature_distill as _fd  # noqa: F401
from affordance_core.models.clip_text import (ClipTextEncoder, PromptLearner,
                                              read_clip_state_dict, tokenize_prompts)
from affordance_core.models.layers import key_channel_perm
from affordance_core.models.wsma import (AttentionPool2d, Wsma, from_official_state_dict,
                                         pool_heads_for, refine_cams, sinkhorn_normalize,
                                         to_official_state_dict, wsma_test)
from affordance_core.ops.nmf import (NMF2D, Hamburger, nmf_bases_step, nmf_coef_step,
                                     nmf_inference)
from affordance_core.registry import create_model, list_models

pytestmark = pytest.mark.usefixtures('torch_one_thread')

C = 4
CLASSES = ['hold', 'cut', 'drink_with', 'sit_on']
WSMA_LOSSES = ('cross_entropy', 'clip_alignment', 'feature_distill', 'class_relation')


def build(seed: int = 0, **kwargs) -> Wsma:
    torch.manual_seed(seed)
    model = wsma_test(classes=CLASSES, **kwargs)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval-mode BN matters
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0.0, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
        # a randomly initialised AttentionPool attends almost uniformly on the tiny features:
        # after Sinkhorn and squaring, A vec(cam) would be a constant map plus rounding noise
        model.attnpool.q_proj.weight.mul_(30.0)
        model.attnpool.k_proj.weight.mul_(30.0)
    return model


@pytest.fixture(scope='module')
def model() -> Wsma:
    return build()


@pytest.fixture(scope='module')
def data():
    gen = torch.Generator().manual_seed(1)
    ego = torch.randn(3, 3, 64, 64, generator=gen)      # 4x4 patch grid
    exo = torch.randn(3, 3, 3, 64, 64, generator=gen)   # N = 3 exo images per sample
    labels = torch.tensor([0, 2, 3])
    return ego, exo, labels


def total_loss(out: dict, labels: torch.Tensor) -> torch.Tensor:
    batch = {'label': labels}
    return sum(LOSSES[name](out, batch) for name in WSMA_LOSSES)


# ---------------------------------------------------------------------------- construction
def test_registry_and_constructor(model):
    assert {'wsma_vits16', 'wsma_vits14', 'wsma_imgfocus', 'wsma_test'} <= set(
        list_models('wsma_*'))
    m = create_model('wsma_test', classes=CLASSES)
    assert isinstance(m, Wsma) and m.num_classes == C and m.classes == tuple(CLASSES)
    assert m.backbone.name == 'vit_test' and m.clip_config == 'tiny'
    assert Wsma.feature_fields == ('keys', 'keys_prev') and Wsma.postprocess == 'double'
    d = m.backbone.embed_dim
    assert m.aff_proj.norm.normalized_shape == (2 * d,)
    assert (m.aff_proj.fc1.in_features, m.aff_proj.fc1.out_features) == (2 * d, 2 * d)
    assert (m.aff_proj.fc2.in_features, m.aff_proj.fc2.out_features) == (2 * d, d)
    assert (m.fc.in_features, m.fc.out_features) == (d, C)
    assert m.attnpool.grid == (4, 4) and m.attnpool.num_heads == 8 == pool_heads_for(48)
    assert m.attnpool.c_proj.out_features == m.text_encoder.embed_dim == 64
    assert pool_heads_for(384) == 64 and pool_heads_for(100) == 50 and pool_heads_for(97) == 1
    assert m.hoi_transfer.ham.bases.shape == (1, 512, 64)
    assert m.prompt_learner.ctx.shape == (16, 32)
    assert m.text_features.shape == (C, 64)
    for bad, match in (({'clip_config': 'ViT-L'}, 'unknown clip_config'),
                       ({'prompt_mode': 'x'}, 'prompt_mode'),
                       ({'pool_heads': 5}, 'do not divide')):
        with pytest.raises(ValueError, match=match):
            wsma_test(classes=CLASSES, **bad)
    # no class names: the split list of the same size, or placeholders
    assert wsma_test(num_classes=10).prompt_learner.num_classes == 10


def test_rn50_text_tower_architecture():
    enc = ClipTextEncoder('RN50')
    n = sum(p.numel() for p in enc.parameters())
    assert 63.0e6 < n < 64.0e6, n  # 63.7 M in methods.md §10 (incl. the 49408 x 512 embedding)
    assert enc.token_embedding.weight.shape == (49408, 512)
    assert enc.positional_embedding.shape == (77, 512)
    assert enc.text_projection.shape == (512, 1024)
    assert len(enc.transformer.resblocks) == 12
    assert enc.transformer.resblocks[0].attn.num_heads == 8
    act = enc.transformer.resblocks[0].mlp.gelu
    x = torch.randn(5)
    torch.testing.assert_close(act(x), x * torch.sigmoid(1.702 * x))  # QuickGELU


# ---------------------------------------------------------------------------- training forward
def test_forward_shapes_and_gradients(data):
    ego, exo, labels = data
    m = build()
    m.train()
    out = m(ego, exo, labels)
    d, e = m.backbone.embed_dim, m.text_encoder.embed_dim
    shapes = {'ego_logits': (3, C), 'exo_logits': (3, 3, C), 'ego_cam': (3, C, 4, 4),
              'exo_cam': (3, C, 4, 4), 'ego_gap': (3, d), 'exo_gap': (3, d),
              'cls_weight': (C, d), 'image_embed': (3, e), 'text_embed': (C, e),
              'logit_scale': (), 'fusion_attn': (3, 4, 4)}
    assert {k: tuple(v.shape) for k, v in out.items()} == shapes
    assert m._text_dirty
    total_loss(out, labels).backward()
    for name, p in m.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in m.backbone.parameters())
    # class maps = channel mean of w_c * feature; logits = fc(GAP)
    ego_branch = {}
    m.aff_ego_proj.register_forward_hook(lambda mod, i, o: ego_branch.setdefault('x', o))
    m.hoi_transfer.ham.bases.copy_(m.hoi_transfer.ham.bases)
    out = m(ego, exo, labels)
    x = ego_branch['x']
    for c in range(C):
        torch.testing.assert_close(out['ego_cam'][:, c], (m.fc.weight[c, :, None, None] * x)
                                   .mean(1))
    torch.testing.assert_close(out['ego_logits'], m.fc(x.mean((2, 3))))
    torch.testing.assert_close(out['ego_gap'], x.mean((2, 3)))


def test_forward_with_features_equals_images(data):
    ego, exo, labels = data
    m = build()
    m.train()
    bases = m.hoi_transfer.ham.bases.clone()
    a = m(ego, exo, labels)
    assert not torch.equal(bases, m.hoi_transfer.ham.bases)  # EMA update in training
    m.hoi_transfer.ham.bases.copy_(bases)
    ego_feats = m.backbone(ego, prev_keys=True)
    exo_feats = m.backbone(exo.flatten(0, 1), prev_keys=True).keep(m.feature_fields)
    b = m(None, None, labels, ego_feats=ego_feats, exo_feats=exo_feats.to_dict())
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    with pytest.raises(ValueError, match="lack the field 'keys_prev'"):
        m(None, None, labels, ego_feats={'keys': ego_feats.keys}, exo_feats=exo_feats)
    with pytest.raises(ValueError, match='do not split into 3 samples'):
        m(None, None, labels, ego_feats=ego_feats, exo_feats=exo_feats.select([0, 1]))
    with pytest.raises(ValueError, match='labels must lie in'):
        m(ego, exo, torch.tensor([0, 1, C]))


def test_fusion_matches_reference_layout():
    m = build()
    gen = torch.Generator().manual_seed(3)
    pixels = torch.randn(3, 16, 64, generator=gen)
    text = F.normalize(torch.randn(3, 64, generator=gen), dim=-1)
    s = torch.tensor(7.5)
    # the reference: F.normalize over dim 1 of a (HW, B, E) tensor, then bmm with t_y
    ref = F.normalize(pixels.permute(1, 0, 2), dim=1).permute(1, 0, 2)
    ref = torch.sigmoid(F.normalize(s * ref @ text.unsqueeze(2), dim=1))[..., 0]
    got = m._fusion(pixels, text.unsqueeze(1), s, batch_axis=True)[:, 0]
    torch.testing.assert_close(got, ref)
    # inference: every image alone, as the reference's batch of one (no scale) = sign(f)
    inf = m._fusion(pixels, text.unsqueeze(1), None, batch_axis=False)[:, 0]
    for i in range(3):
        alone = F.normalize(pixels[i:i + 1].permute(1, 0, 2), dim=1).permute(1, 0, 2)
        alone = torch.sigmoid(F.normalize(alone @ text[i:i + 1].unsqueeze(2), dim=1))[0, :, 0]
        torch.testing.assert_close(inf[i], alone)
        sign = torch.sigmoid(F.normalize(torch.sign(pixels[i]) @ text[i], dim=0))
        torch.testing.assert_close(inf[i], sign)
    # the paper's cosine similarity without the quirk
    m.normalize_quirk = False
    cos = torch.sigmoid(F.normalize(F.normalize(pixels, dim=-1) @ text.unsqueeze(2), dim=1))
    torch.testing.assert_close(m._fusion(pixels, text.unsqueeze(1), None, False)[:, 0],
                               cos[..., 0])


# ---------------------------------------------------------------------------- losses
def test_clip_alignment_hand_computed():
    # logit scale ln 2 -> s = 2; cosines (1, 0) and (0.6, 0.8); image norms do not matter
    outputs = {'image_embed': torch.tensor([[3.0, 0.0], [0.6, 0.8]]),
               'text_embed': torch.tensor([[2.0, 0.0], [0.0, 5.0]]),
               'logit_scale': torch.tensor(math.log(2.0))}
    batch = {'label': torch.tensor([0, 1])}
    # sample 0: logits (2, 0), y = 0 -> ln(1 + e^-2); sample 1: logits (1.2, 1.6), y = 1
    expected = 0.5 * (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-0.4)))
    assert LOSSES['clip_alignment'](outputs, batch).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match='do not match'):
        LOSSES['clip_alignment']({**outputs, 'text_embed': torch.zeros(2, 3)}, batch)


def test_feature_distill_hand_computed():
    # sample 0: w_y = (1, 2); ego (1, 1) -> w*ego = (1, 2)/sqrt5; exo (2, 0) -> (1, 0)
    #   ||.||^2 = (1 - 1/sqrt5)^2 + 4/5 = 2 - 2/sqrt5
    # sample 1: w_y = (3, 0); ego (1, 5) -> (1, 0); exo (2, 7) -> (1, 0): distance 0
    outputs = {'cls_weight': torch.tensor([[1.0, 2.0], [3.0, 0.0]]),
               'ego_gap': torch.tensor([[1.0, 1.0], [1.0, 5.0]]),
               'exo_gap': torch.tensor([[2.0, 0.0], [2.0, 7.0]])}
    batch = {'label': torch.tensor([0, 1])}
    expected = 0.5 * 0.5 * ((2 - 2 / math.sqrt(5)) + 0.0)
    assert LOSSES['feature_distill'](outputs, batch).item() == pytest.approx(expected, rel=1e-6)


def test_class_relation_against_loops():
    gen = torch.Generator().manual_seed(0)
    ego = torch.randn(2, 3, 2, 2, generator=gen)
    exo = torch.randn(2, 3, 2, 2, generator=gen)
    got = LOSSES['class_relation']({'ego_cam': ego, 'exo_cam': exo}, {})
    cos = []
    for b in range(2):
        vecs = []
        for cam in (exo[b], ego[b]):
            q = cam.reshape(3, 4).tolist()
            k = [[sum(q[i][p] * q[j][p] for p in range(4)) for j in range(3)] for i in range(3)]
            k = [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in k]
            vecs.append([v for row in k for v in row])
        dot = sum(x * y for x, y in zip(*vecs))
        cos.append(dot / math.sqrt(sum(x * x for x in vecs[0]) * sum(y * y for y in vecs[1])))
    assert got.item() == pytest.approx(0.5 * (1 - sum(cos) / 2), rel=1e-5)
    # identical views -> 0; the loss is scale invariant per view
    same = LOSSES['class_relation']({'ego_cam': ego, 'exo_cam': 3.0 * ego}, {})
    assert same.item() == pytest.approx(0.0, abs=1e-6)


def test_losses_on_model_outputs(data):
    ego, exo, labels = data
    m = build()
    m.train()
    out = m(ego, exo, labels)
    batch = {'label': labels}
    # L_cls = CE(ego) + (1/3) sum_n CE(exo_n)
    ce = F.cross_entropy(out['ego_logits'], labels) + sum(
        F.cross_entropy(out['exo_logits'][:, i], labels) for i in range(3)) / 3
    torch.testing.assert_close(LOSSES['cross_entropy'](out, batch), ce)
    # L_clip with the model's logit scale (CLIP's init ln(1 / 0.07))
    logits = (1 / 0.07) * F.normalize(out['image_embed'], dim=1) @ F.normalize(
        out['text_embed'], dim=1).t()
    torch.testing.assert_close(LOSSES['clip_alignment'](out, batch),
                               F.cross_entropy(logits, labels))
    for name in WSMA_LOSSES:
        assert torch.isfinite(LOSSES[name](out, batch)), name


def test_sgd_steps_decrease_loss(data):
    ego, exo, labels = data
    m = build()
    ego_feats = m.backbone(ego, prev_keys=True)
    exo_feats = m.backbone(exo.flatten(0, 1), prev_keys=True)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    losses = []
    m.train()
    for _ in range(10):
        loss = total_loss(m(None, None, labels, ego_feats=ego_feats, exo_feats=exo_feats),
                          labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0], losses
    # the text cache follows the trained weights once the model goes to eval mode
    stale = m.text_features.clone()
    m.eval()
    assert not m._text_dirty and not torch.equal(stale, m.text_features)
    with torch.no_grad():
        torch.testing.assert_close(m.text_features, F.normalize(m.encode_text(), dim=-1))


# ---------------------------------------------------------------------------- NMF / Hamburger
def _loop_coef_step(x, bases, coef):
    d, n = x.shape
    r = bases.shape[1]
    btb = [[sum(bases[k, a] * bases[k, b] for k in range(d)) for b in range(r)] for a in range(r)]
    new = torch.zeros(n, r, dtype=torch.float64)
    for i in range(n):
        for a in range(r):
            num = sum(x[k, i] * bases[k, a] for k in range(d))
            den = sum(coef[i, b] * btb[b][a] for b in range(r))
            new[i, a] = coef[i, a] * num / (den + 1e-6)
    return new


def _loop_bases_step(x, bases, coef):
    d, n = x.shape
    r = bases.shape[1]
    ctc = [[sum(coef[i, a] * coef[i, b] for i in range(n)) for b in range(r)] for a in range(r)]
    new = torch.zeros(d, r, dtype=torch.float64)
    for k in range(d):
        for a in range(r):
            num = sum(x[k, i] * coef[i, a] for i in range(n))
            den = sum(bases[k, b] * ctc[b][a] for b in range(r))
            new[k, a] = bases[k, a] * num / (den + 1e-6)
    return new


def test_nmf_updates_against_loops():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 4, 6, generator=gen, dtype=torch.float64)
    bases = F.normalize(torch.rand(2, 4, 3, generator=gen, dtype=torch.float64), dim=1)
    coef = torch.rand(2, 6, 3, generator=gen, dtype=torch.float64)
    for s in range(2):
        torch.testing.assert_close(nmf_coef_step(x, bases, coef)[s],
                                   _loop_coef_step(x[s], bases[s], coef[s]))
        torch.testing.assert_close(nmf_bases_step(x, bases, coef)[s],
                                   _loop_bases_step(x[s], bases[s], coef[s]))
    # full decomposition: softmax init, 2 steps, one more coefficient step, reconstruction
    nmf = NMF2D(dim=4, rank=3, train_steps=2, eval_steps=3).double().eval()
    b0 = nmf.bases[0].clone()
    out = nmf(x)
    for s in range(2):
        xs = x[s]
        c = torch.softmax(torch.stack([torch.stack([sum(xs[k, i] * b0[k, a] for k in range(4))
                                                    for a in range(3)]) for i in range(6)]), -1)
        b = b0.clone()
        for _ in range(3):  # eval mode: eval_steps
            c = _loop_coef_step(xs, b, c)
            b = _loop_bases_step(xs, b, c)
        c = _loop_coef_step(xs, b, c)
        torch.testing.assert_close(out[s], b @ c.T)
    assert torch.equal(nmf.bases[0], b0)  # no EMA update in eval mode


def test_nmf_ema_buffer_and_gradient():
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(3, 8, 10, generator=gen).requires_grad_(True)
    nmf = NMF2D(dim=8, rank=4).train()
    old = nmf.bases.clone()
    out = nmf(x)
    new_bases, _ = nmf_inference(x.detach(), old.expand(3, -1, -1), 6)  # 6 training steps
    expected = F.normalize(old + 0.9 * (new_bases.mean(0, keepdim=True) - old), dim=1)
    torch.testing.assert_close(nmf.bases, expected)
    torch.testing.assert_close(nmf.bases.norm(dim=1), torch.ones(1, 4))
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert 'bases' in nmf.state_dict() and not list(nmf.parameters())
    m = build()
    assert 'hoi_transfer.ham.bases' in m.state_dict()


def test_hamburger_factorises_views_jointly():
    torch.manual_seed(0)
    ham = Hamburger(6, dim=5, rank=3, train_steps=2, eval_steps=2).eval()
    x = torch.randn(4, 6, 2, 3)  # B = 2 samples x N = 2 views
    out = ham(x, 2)
    with torch.no_grad():
        y = ham.lower_bread(x)
        rows = []
        for b in range(2):  # the two views of a sample side by side: (D, 2 * h * w)
            tokens = torch.cat([y[2 * b + i].reshape(5, 6) for i in range(2)], dim=1)
            rows.append(ham.ham(tokens[None])[0])
        rec = torch.stack([rows[b][:, 6 * i:6 * (i + 1)].reshape(5, 2, 3)
                           for b in range(2) for i in range(2)])
        ref = F.relu(ham.upper_bread(rec) + x)
    torch.testing.assert_close(out, ref)
    per_view = torch.cat([ham(x[i:i + 1], 1) for i in range(4)])
    assert not torch.allclose(out, per_view)  # joint factorisation differs from per-view


# ---------------------------------------------------------------------------- AttentionPool
def test_attention_pool_matches_multi_head_attention_forward():
    torch.manual_seed(0)
    pool = AttentionPool2d((2, 3), 12, 4, 10)
    x = torch.randn(2, 12, 2, 3)
    pooled, pixels, attn = pool(x)
    # the reference: (HW+1, B, D) tokens through F.multi_head_attention_forward
    t = x.flatten(2).permute(2, 0, 1)
    t = torch.cat([t.mean(0, keepdim=True), t]) + pool.positional_embedding[:, None]
    out, w = F.multi_head_attention_forward(
        t, t, t, 12, 4, in_proj_weight=None,
        in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
        out_proj_weight=pool.c_proj.weight, out_proj_bias=pool.c_proj.bias,
        use_separate_proj_weight=True, q_proj_weight=pool.q_proj.weight,
        k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
        training=False, need_weights=True)
    torch.testing.assert_close(pooled, out[0])
    torch.testing.assert_close(pixels, out[1:].transpose(0, 1))
    torch.testing.assert_close(attn, w[:, 1:, 1:])
    # another grid resizes the positional embedding
    assert pool(torch.randn(1, 12, 4, 4))[1].shape == (1, 16, 10)


# ---------------------------------------------------------------------------- refinement
def test_refinement_against_explicit_computation():
    gen = torch.Generator().manual_seed(0)
    attn = torch.softmax(3 * torch.randn(2, 9, 10, generator=gen), -1)[:, :, 1:]  # 3x3 grid
    cam = torch.randn(2, 2, 3, 3, generator=gen)
    got = refine_cams(cam, attn)
    for b in range(2):
        a = attn[b].double().numpy().copy()
        for _ in range(3):
            for j in range(9):
                a[:, j] /= a[:, j].sum()
            for i in range(9):
                a[i, :] /= a[i, :].sum()
        a = (a + a.T) / 2
        a = a @ a
        for k in range(2):
            c = cam[b, k].double().numpy().reshape(-1)
            c1 = a @ c
            c = (c - c.min()) / (c.max() - c.min() + 1e-10)
            c1 = (c1 - c1.min()) / (c1.max() - c1.min() + 1e-10)
            c1[c < 0.2] = 0
            final = c + c1
            final = (final - final.min()) / (final.max() - final.min() + 1e-10)
            np.testing.assert_allclose(got[b, k].numpy().reshape(-1), final, atol=1e-5)
    s = sinkhorn_normalize(attn, 3)
    torch.testing.assert_close(s.sum(2), torch.ones(2, 9))  # the last step normalises rows
    with pytest.raises(ValueError, match='attention must have shape'):
        refine_cams(cam, attn[:, :4, :4])


# ---------------------------------------------------------------------------- inference
def test_predict_every_class(data):
    ego, _, _ = data
    m = build().eval()
    hooks = [m.text_encoder.register_forward_hook(lambda *a: pytest.fail('text tower used')),
             m.aff_exo_proj.register_forward_hook(lambda *a: pytest.fail('exo branch used')),
             m.hoi_transfer.register_forward_hook(lambda *a: pytest.fail('NMF used'))]
    try:
        with torch.no_grad():
            cams = m.cams(ego)
        assert cams.shape == (3, C, 4, 4)
        assert cams.amin((2, 3)).eq(0).all() and (cams <= 1).all()
        for c in range(C):
            ids = torch.full((3,), c)
            raw = m.predict_raw(ego, ids)
            torch.testing.assert_close(raw, cams[:, c], rtol=0, atol=1e-5)  # conv batch size
            pred = m.predict(ego, ids)
            assert pred.shape == (3, 64, 64)
            assert pred.amin((1, 2)).eq(0).all() and (pred.amax((1, 2)) > 0.999).all()
            assert (pred <= 1).all()
        mixed = m.predict_raw(ego, [3, 0, 1])
        torch.testing.assert_close(mixed, cams[torch.arange(3), torch.tensor([3, 0, 1])],
                                   rtol=0, atol=1e-5)
        feats = m.backbone(ego, prev_keys=True)
        torch.testing.assert_close(m.predict_raw(None, 2, feats=feats), m.predict_raw(ego, 2),
                                   rtol=0, atol=0)
    finally:
        for h in hooks:
            h.remove()
    with pytest.raises(ValueError, match='class_ids must lie in'):
        m.predict(ego, torch.tensor([0, 1, C]))


def test_predict_raw_follows_reference_get(data):
    """predict_raw = the reference's ``Model.get`` + ``test.py`` written step by step."""
    ego, _, _ = data
    m = build().eval()
    label = torch.tensor([1, 2, 0])
    with torch.no_grad():
        f = m.backbone(ego, prev_keys=True)
        desc = torch.cat([f.keys_prev, f.keys], 1).flatten(2).transpose(1, 2)  # (B, hw, 2D)
        proj = m.aff_proj(desc).transpose(1, 2).reshape(3, 48, 4, 4)
        _, pixels, mu = m.attnpool(proj)
        text = F.normalize(m.encode_text(), dim=1)
        att = []
        for i in range(3):  # test batch size 1
            p = F.normalize(pixels[i:i + 1].permute(1, 0, 2), dim=1).permute(1, 0, 2)
            a = torch.sigmoid(F.normalize(p @ text[label[i]][None, :, None], dim=1))
            att.append(a[0, :, 0].view(4, 4))
        fused = torch.stack(att)[:, None] * proj + proj
        branch = m.aff_ego_proj(fused)
        cam = (m.fc.weight[label][:, :, None, None] * branch).mean(1)
        mu = mu / mu.sum(1, keepdim=True)
        mu = mu / mu.sum(2, keepdim=True)
        for _ in range(2):
            mu = mu / mu.sum(1, keepdim=True)
            mu = mu / mu.sum(2, keepdim=True)
        mu = (mu + mu.transpose(1, 2)) / 2
        mu = mu @ mu
        cam1 = (mu @ cam.view(3, -1, 1)).view(3, 4, 4)
        expected = []
        for i in range(3):
            c = cam[i].numpy()
            c1 = cam1[i].numpy()
            c = (c - c.min()) / (c.max() - c.min() + 1e-10)
            c1 = (c1 - c1.min()) / (c1.max() - c1.min() + 1e-10)
            c1[c < 0.2] = 0
            s = c + c1
            expected.append((s - s.min()) / (s.max() - s.min() + 1e-10))
    got = m.predict_raw(ego, label).numpy()
    np.testing.assert_allclose(got, np.stack(expected), atol=2e-4)


def test_text_cache_lifecycle(data, tmp_path):
    ego, exo, labels = data
    from affordance_core.checkpoint import load_checkpoint, save_checkpoint
    torch.manual_seed(0)
    m = create_model('wsma_test', classes=CLASSES)
    fresh = m.text_features.clone()
    with torch.no_grad():
        m.prompt_learner.ctx.add_(1.0)
    assert torch.equal(m.text_features, fresh)
    m.refresh_text_features()
    assert not torch.allclose(m.text_features, fresh)
    # a training forward marks the cache stale; state_dict() refreshes it before saving
    m.train()
    m(ego, exo, labels)
    with torch.no_grad():
        m.prompt_learner.ctx.add_(1.0)
    assert m._text_dirty
    sd = m.state_dict()
    assert not m._text_dirty
    with torch.no_grad():
        torch.testing.assert_close(sd['text_features'], F.normalize(m.encode_text(), dim=-1))
    # checkpoint round trip (pretrained=False rebuild) keeps the maps
    m.eval()
    path = save_checkpoint(m, tmp_path / 'wsma.pt')
    loaded = load_checkpoint(path)
    assert isinstance(loaded, Wsma) and not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded.cams(ego), m.cams(ego), rtol=0, atol=0)
    # pretrained=False (checkpoint rebuild) leaves the cache to the load, or to eval()
    raw = wsma_test(classes=CLASSES, pretrained=False)
    assert raw._text_dirty and not raw.text_features.any()
    raw.eval()
    assert not raw._text_dirty and raw.text_features.any()
    # a state without the cache loads strictly and recomputes it
    other = build(seed=5).eval()
    state = {k: v for k, v in m.state_dict().items() if k != 'text_features'}
    other.load_state_dict(state, strict=True)
    torch.testing.assert_close(other.text_features, m.text_features, rtol=0, atol=0)


@pytest.mark.filterwarnings('ignore::torch.jit.TracerWarning', 'ignore::FutureWarning')
def test_onnx_export(tmp_path, data):
    pytest.importorskip('onnx')
    pytest.importorskip('onnxruntime')
    from affordance_core.export.onnx import export_onnx, verify_onnx
    from affordance_core.export.wrapper import ExportWrapper
    ego, _, _ = data
    m = build().eval()
    wrapper = ExportWrapper(m, image_size=64)
    with torch.no_grad():
        cams, maps = wrapper(ego[:1])
        traced = torch.jit.trace(wrapper, ego[:1], check_trace=False)
        tc, tm = traced(ego[1:2])
        ec, em = wrapper(ego[1:2])
    assert cams.shape == (1, C, 4, 4) and maps.shape == (1, C, 64, 64)
    torch.testing.assert_close(tc, ec)
    torch.testing.assert_close(tm, em)
    path = export_onnx(m, tmp_path / 'wsma.onnx', image_size=64)
    err = verify_onnx(m, path, num_inputs=1)
    assert err['cams'] < 1e-3 and err['maps'] < 1e-3, err


# ---------------------------------------------------------------------------- optimizer groups
def test_lr_groups():
    m = build()
    groups = param_groups(m, OptimConfig(lr=1e-3))
    mult = {name: g['lr_mult'] for g in groups for name in g['names']}
    assert all(v == 2.0 for k, v in mult.items() if k.startswith('text_encoder.'))
    assert mult['text_encoder.token_embedding.weight'] == 2.0
    assert mult['text_encoder.positional_embedding'] == 2.0
    assert mult['text_encoder.transformer.resblocks.0.mlp.c_fc.weight'] == 2.0  # not 10x
    assert mult['logit_scale'] == 2.0 and mult['prompt_learner.ctx'] == 2.0
    assert mult['attnpool.positional_embedding'] == 2.0
    assert mult['fc.weight'] == 10.0 and mult['fc.bias'] == 20.0
    assert mult['aff_proj.fc1.weight'] == 10.0 and mult['aff_proj.fc2.bias'] == 20.0
    assert mult['aff_proj.norm.weight'] == 1.0 and mult['attnpool.q_proj.bias'] == 2.0
    assert mult['attnpool.c_proj.weight'] == 1.0
    assert mult['hoi_transfer.lower_bread.0.weight'] == 1.0
    assert mult['aff_ego_proj.1.bias'] == 2.0
    assert not any(k.startswith('backbone.') for k in mult)
    coop = build(prompt_mode='coop')
    names = {n for g in param_groups(coop, OptimConfig()) for n in g['names']}
    assert 'text_encoder.token_embedding.weight' not in names  # unused in CoOp mode: frozen


# ---------------------------------------------------------------------------- CLIP weights
def test_missing_clip_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match='RN50.pt'):
        wsma_test(classes=CLASSES, clip_weights=str(tmp_path / 'RN50.pt'))
    with pytest.raises(FileNotFoundError, match='clip_weights'):
        read_clip_state_dict(tmp_path / 'nope.pt')


@pytest.mark.filterwarnings('ignore::FutureWarning')
def test_clip_weights_from_state_dict_and_torchscript(tmp_path):
    torch.manual_seed(1)
    src = ClipTextEncoder('tiny')
    # an open_clip-style full-model state dict: text keys at the root, visual.* and the scale
    state = {f'module.{k}': v.half() for k, v in src.state_dict().items()}
    state['module.visual.conv1.weight'] = torch.zeros(2, 3, 1, 1)
    state['module.logit_scale'] = torch.tensor(math.log(100.0))
    torch.save({'state_dict': state}, tmp_path / 'clip.pt')
    read = read_clip_state_dict(tmp_path / 'clip.pt')
    assert 'visual.conv1.weight' not in read and read['logit_scale'].dtype == torch.float32
    torch.manual_seed(2)
    m = wsma_test(classes=CLASSES, clip_weights=str(tmp_path / 'clip.pt'))
    for k, v in src.state_dict().items():
        torch.testing.assert_close(m.text_encoder.state_dict()[k], v.half().float())
    assert m.logit_scale.item() == pytest.approx(math.log(100.0), rel=1e-3)
    # a TorchScript archive (OpenAI's RN50.pt format)

    class Holder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for name, mod in src.named_children():
                setattr(self, name, mod)
            self.positional_embedding = src.positional_embedding
            self.text_projection = src.text_projection
            self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.logit_scale

    torch.jit.save(torch.jit.script(Holder()), str(tmp_path / 'RN50.pt'))
    read = read_clip_state_dict(tmp_path / 'RN50.pt')
    assert read['logit_scale'].item() == 2.0
    torch.testing.assert_close(read['transformer.resblocks.1.mlp.c_fc.weight'],
                               src.transformer.resblocks[1].mlp.c_fc.weight)
    # wrong architecture
    rn50_like = dict(read)
    rn50_like['text_projection'] = torch.zeros(32, 1024)
    torch.save(rn50_like, tmp_path / 'bad.pt')
    with pytest.raises(ValueError, match='do not fit'):
        ClipTextEncoder('tiny').load_weights(tmp_path / 'bad.pt')


def test_prompt_learner_modes():
    torch.manual_seed(0)
    enc = ClipTextEncoder('tiny')
    tokens = tokenize_prompts(['X X drink with.'])
    assert tokens[0, :7].tolist() == [49406, 343, 343, 3979, 593, 269, 49407]
    with pytest.raises(ValueError, match='context length'):
        tokenize_prompts(['a ' * 80])
    coop = PromptLearner(['drink_with', 'hold'], enc.token_embedding, n_ctx=2, mode='coop')
    emb = enc.token_embedding(coop.tokenized_prompts)
    torch.testing.assert_close(coop.token_prefix, emb[:, :1])
    torch.testing.assert_close(coop.token_suffix, emb[:, 3:])
    prompts = coop()
    assert prompts.shape == (2, 77, 32)
    torch.testing.assert_close(prompts[:, 1:3], coop.ctx.expand(2, -1, -1))
    off = PromptLearner(['drink_with', 'hold'], enc.token_embedding, n_ctx=2)
    # official mode: N(0, 1) noise per token id (same id -> same vector), not CLIP embeddings
    assert torch.equal(off.token_prefix[0], off.token_prefix[1])  # both SOT
    assert not torch.allclose(off.token_prefix, emb[:, :1])
    assert 'tokenized_prompts' not in off.state_dict() and 'token_suffix' in off.state_dict()
    # the official encoder adds the token embedding of the tokenised prompt
    a = enc(prompts, coop.tokenized_prompts, add_token_embedding=True)
    b = enc(prompts + emb, coop.tokenized_prompts)
    torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------- official weights
def test_official_round_trip_and_key_permutation(data, monkeypatch):
    ego, exo, labels = data
    m = build()
    m.train()
    m(ego, exo, labels)  # some EMA / BN state
    m.eval()
    head = {k: v for k, v in m.state_dict().items() if not k.startswith('backbone.')}
    backbone = {k: v for k, v in m.state_dict().items() if k.startswith('backbone.')}
    off = to_official_state_dict(head, num_heads=3)
    expected_names = {'logit_scale', 'token_embedding.weight', 'positional_embedding',
                      'text_projection', 'ln_final.weight', 'prompt_learner.ctx',
                      'prompt_learner.token_prefix', 'attnpool.c_proj.weight', 'fc.weight',
                      'Hamburger.lower_bread.0.weight', 'Hamburger.upper_bread.1.running_var',
                      'transformer.resblocks.1.mlp.c_fc.weight', 'aff_proj.fc1.weight',
                      'aff_ego_proj.1.running_mean', 'aff_exo_proj.0.weight'}
    assert expected_names <= set(off)
    assert 'text_features' not in off and not any('bases' in k for k in off)
    assert not any(k.startswith('text_encoder.') or k.startswith('hoi_transfer.') for k in off)
    # d-major blocks: official channel j of block o reads our channel o + perm[j]
    perm = key_channel_perm(48, 3)
    w = head['aff_proj.fc1.weight']
    torch.testing.assert_close(off['aff_proj.fc1.weight'],
                               torch.cat([w[:, :48][:, perm], w[:, 48:][:, perm]], 1))
    back = from_official_state_dict(off, num_heads=3)
    assert set(back) == set(head) - {'text_features'}
    for k, v in back.items():
        if k != 'hoi_transfer.ham.bases':
            assert torch.equal(v, head[k]), k
    m2 = build(seed=7).eval()
    m2.load_state_dict({**backbone, **back}, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(m2.cams(ego), m.cams(ego), rtol=0, atol=0)
    with pytest.raises(ValueError, match='vit_model.x'):
        from_official_state_dict({**off, 'vit_model.x': torch.zeros(1)}, 3)
    with pytest.raises(ValueError, match='backbone.vit'):
        to_official_state_dict({**head, 'backbone.vit.x': torch.zeros(1)}, 3)
    # the permutation matters: official weights loaded by name (no permutation) reproduce our
    # maps on d-major keys, and differ on our head-major keys
    naive = dict(back)
    for key in ('aff_proj.norm.weight', 'aff_proj.norm.bias', 'aff_proj.fc1.weight'):
        naive[key] = off[key]
    m3 = build(seed=8).eval()
    m3.load_state_dict({**backbone, **naive}, strict=True)
    monkeypatch.setattr(wsma_mod, 'refine_cams', lambda cam, attn, **kw: cam)  # unrefined maps
    with torch.no_grad():
        f = m.backbone(ego, prev_keys=True)
        dmajor = {'keys': f.keys[:, perm], 'keys_prev': f.keys_prev[:, perm]}
        ours = m.cams(feats=f)
        torch.testing.assert_close(m3.cams(feats=dmajor), ours, rtol=1e-4, atol=1e-6)
        assert not torch.allclose(m3.cams(feats=f), ours, rtol=1e-2, atol=1e-4)


# ---------------------------------------------------------------------------- recipes
@pytest.mark.parametrize('name, split', [('seen', 'Seen'), ('unseen', 'Unseen'),
                                         ('hico', 'HICO-IIF')])
def test_official_recipes(repo_root, name, split):
    from affordance_core.config import load_config
    cfg = load_config(path=repo_root / 'training' / 'configs' / f'wsma_{name}.yaml',
                      overrides=['model.kwargs.clip_weights=/weights/RN50.pt'])
    assert cfg.model.name in list_models('wsma_*') and cfg.data.split == split
    assert cfg.model.kwargs == {'clip_weights': '/weights/RN50.pt'}
    assert (cfg.train.batch_size, cfg.train.epochs, cfg.train.seed) == (10, 13, 0)
    assert (cfg.optim.lr, cfg.optim.scheduler, cfg.data.num_exo) == (1e-3, 'none', 3)
    assert [(t.name, t.weight, t.start_epoch) for t in cfg.losses] == [
        (n, 1.0, 0) for n in WSMA_LOSSES]


def test_shared_converter_round_trip(data):
    from affordance_core.convert import from_official, to_official
    from affordance_core.labels import AFFORDANCES_HICO_IIF
    ego, _, _ = data
    torch.manual_seed(0)
    m = wsma_test(classes=list(AFFORDANCES_HICO_IIF)).eval()
    official = to_official('wsma', m)
    assert any(k.startswith('vit_model.') for k in official)
    assert 'Hamburger.ham.bases' not in official and 'text_features' not in official
    net = from_official('wsma', official, model='wsma_test')  # class list from the count
    assert net.classes == AFFORDANCES_HICO_IIF
    with torch.no_grad():
        torch.testing.assert_close(net.cams(ego), m.cams(ego), rtol=0, atol=0)


# ---------------------------------------------------------------------------- trainer
@pytest.mark.parametrize('cache', [False, True])
def test_trainer_fits_and_evaluates(tiny_agd, tmp_path, cache):
    from affordance_core.checkpoint import load_checkpoint
    from affordance_core.config import ExperimentConfig, load_config
    from affordance_core.engine.trainer import Trainer
    out = tmp_path / 'run'
    cfg = load_config(ExperimentConfig, None, [
        'model.name=wsma_test', f'data.root={tiny_agd}', 'data.image_size=64', 'data.resize=72',
        'data.num_workers=0', 'train.batch_size=4', 'train.epochs=2', 'train.device=cpu',
        'train.tensorboard=false', f'train.output_dir={out}', f'train.cache_features={cache}',
        'optim.scheduler=none', 'losses=[{name: cross_entropy}, {name: clip_alignment}, '
        '{name: feature_distill}, {name: class_relation}]'])
    summary = Trainer(cfg, progress=False).fit()
    assert summary is not None and (out / 'best.pt').is_file() and (out / 'last.pt').is_file()
    model = load_checkpoint(out / 'last.pt')
    assert isinstance(model, Wsma) and model.postprocess == 'double'
    with torch.no_grad():
        torch.testing.assert_close(model.text_features, F.normalize(model.encode_text(), dim=-1))
        maps = model.cams(torch.randn(1, 3, 64, 64))
    assert maps.shape == (1, 36, 4, 4) and torch.isfinite(maps).all()  # the Seen class list
