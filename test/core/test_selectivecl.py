"""SelectiveCL (affordance_core.models.selectivecl), its CLIP prior and its two contrastive losses.

Tiny everything: the ``vit_test`` backbone (48-d, 3 heads), the tiny random CLIP and the real
``c2am_test`` prior, 64x64 inputs (4x4 grid).
"""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import affordance_core.models.c2am  # noqa: F401  (registers c2am_*)
from affordance_core.checkpoint import load_checkpoint, save_checkpoint
from affordance_core.config import ExperimentConfig, OptimConfig, load_config
from affordance_core.convert import from_official, to_official
from affordance_core.engine.optim import build_optimizer
from affordance_core.export.wrapper import ExportWrapper
from affordance_core.labels import classes_for
from affordance_core.losses import LOSSES
from affordance_core.models.clip_visual import (ClipObjectPrior, clear_clip_features, ego_prompt,
                                                exo_prompt)
from affordance_core.models.layers import ConvBranch, dino_saliency, key_channel_perm
from affordance_core.models.selectivecl import (SelectiveCL, from_official_state_dict,
                                                local_mean3, pixel_labels, selective_parts,
                                                selectivecl_test, to_official_state_dict)
from affordance_core.registry import create_model, list_models

pytestmark = pytest.mark.usefixtures('torch_one_thread')

CLASSES = ['hold', 'cut_with', 'sit_on', 'pour']
C = len(CLASSES)
RECIPE = ('cross_entropy', 'selective_prototype', 'pixel_contrast')


@pytest.fixture(scope='module')
def data():
    gen = torch.Generator().manual_seed(1)
    ego = torch.randn(3, 3, 64, 64, generator=gen)
    exo = torch.randn(3, 3, 3, 64, 64, generator=gen)
    return ego, exo, torch.tensor([0, 2, 2])


@pytest.fixture(scope='module')
def clip_model() -> SelectiveCL:
    torch.manual_seed(0)
    return create_model('selectivecl_test', classes=CLASSES)


@pytest.fixture(scope='module')
def c2am_prior():
    torch.manual_seed(3)
    prior = create_model('c2am_test')
    with torch.no_grad():  # a non-trivial object map
        prior.ac_head.activation_head.weight.normal_(0, 0.2)
    return prior.eval()


@pytest.fixture(scope='module')
def c2am_model(c2am_prior) -> SelectiveCL:
    torch.manual_seed(0)
    return create_model('selectivecl_test', classes=CLASSES, object_prior='c2am',
                        object_prior_model=c2am_prior)


def total(out: dict, labels: torch.Tensor) -> torch.Tensor:
    return sum(LOSSES[k](out, {'label': labels}) for k in RECIPE)


# ------------------------------------------------------------------------------------- CLIP
def test_prompts_are_the_reference_strings():
    assert ego_prompt('hold') == 'an item to hold with'
    assert ego_prompt('cut_with') == 'an item to cut_with'      # no second 'with'
    assert ego_prompt('drink_with') == 'an item to drink_with'
    assert exo_prompt('sit_on') == 'a person sit_on an item'    # underscores kept
    prior = ClipObjectPrior(CLASSES, config='tiny')
    assert prior.ego_prompts[1] == 'an item to cut_with'
    assert prior.text_ego.shape == (C, 32) and prior.text_exo.shape == (C, 32)
    torch.testing.assert_close(prior.text_ego.norm(dim=1), torch.ones(C))
    assert not any(p.requires_grad for p in prior.parameters())
    assert 'text_ego' not in prior.state_dict()  # cached, recomputed from the text tower


def test_clear_clip_last_block_matches_an_independent_computation():
    prior = ClipObjectPrior(CLASSES, config='tiny')
    vis = prior.model.visual
    x = torch.randn(2, 3, 64, 64)
    ours = prior.image_features(x)
    assert ours.shape == (2, 32, 4, 4)
    with torch.no_grad():
        t = vis.conv1(x).flatten(2).transpose(1, 2)
        t = torch.cat([vis.class_embedding.expand(2, 1, -1), t], 1) + vis.positional_embedding
        t = vis.transformer.resblocks[0](vis.ln_pre(t))
        last = vis.transformer.resblocks[-1]
        # q.q attention = a MultiheadAttention whose key projection is the query projection
        mha = copy.deepcopy(last.attn)
        d = mha.embed_dim
        mha.in_proj_weight[d:2 * d] = mha.in_proj_weight[:d]
        mha.in_proj_bias[d:2 * d] = mha.in_proj_bias[:d]
        y = last.ln_1(t)
        o = mha(y, y, y, need_weights=False)[0]                  # no residual, no FFN
        ref = (vis.ln_post(o)[:, 1:] @ vis.proj).transpose(1, 2).reshape(2, 32, 4, 4)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
        # the standard last block (q.k attention + residual + FFN) gives other features
        std = vis.ln_post(vis.transformer(vis.ln_pre(torch.cat([vis.class_embedding.expand(
            2, 1, -1), vis.conv1(x).flatten(2).transpose(1, 2)], 1) + vis.positional_embedding)))
        std = (std[:, 1:] @ vis.proj).transpose(1, 2).reshape(2, 32, 4, 4)
        assert not torch.allclose(std, ours, atol=1e-3)
    # a 14-px backbone grid: the image is resized so CLIP's grid matches (4x4 from 56 px)
    assert prior.image_features(x[..., :56, :56], grid=(4, 4)).shape == (2, 32, 4, 4)
    assert clear_clip_features(vis, torch.randn(1, 3, 32, 48)).shape == (1, 32, 2, 3)


def test_clip_weights_come_from_a_local_file(tmp_path):
    src = ClipObjectPrior(CLASSES, config='tiny', seed=5)
    path = tmp_path / 'clip.pt'
    torch.save(src.model.state_dict(), path)
    loaded = ClipObjectPrior(CLASSES, config='tiny', weights=str(path), seed=9)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(loaded.image_features(x), src.image_features(x))
    torch.testing.assert_close(loaded.text_ego, src.text_ego)
    # the prompt cache follows load_state_dict
    other = ClipObjectPrior(CLASSES, config='tiny', seed=9)
    assert not torch.allclose(other.text_exo, src.text_exo)
    other.load_state_dict(src.state_dict())
    torch.testing.assert_close(other.text_exo, src.text_exo)
    # the OpenAI release format: a TorchScript archive
    tokens = torch.zeros(1, 77, dtype=torch.long)
    tokens[0, :2] = torch.tensor([49406, 49407])
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        traced = torch.jit.trace(src.model, (x, tokens), check_trace=False)
        torch.jit.save(traced, str(tmp_path / 'ViT-tiny.pt'))
    jit = ClipObjectPrior(CLASSES, config='tiny', weights=str(tmp_path / 'ViT-tiny.pt'), seed=9)
    torch.testing.assert_close(jit.image_features(x), src.image_features(x))
    torch.testing.assert_close(jit.text_exo, src.text_exo)
    with pytest.raises(FileNotFoundError, match='clip_weights=<'):
        selectivecl_test(classes=CLASSES, clip_config='ViT-B-16')  # no file: fails before build
    with pytest.raises(FileNotFoundError, match='CLIP weights file not found'):
        selectivecl_test(classes=CLASSES, clip_config='ViT-B-16', clip_weights='/no/ViT-B-16.pt')
    (tmp_path / 'bad.pt').write_bytes(b'junk')
    with pytest.raises(ValueError, match='not CLIP weights'):
        ClipObjectPrior(CLASSES, config='tiny', weights=str(tmp_path / 'bad.pt'))
    with pytest.raises(ValueError, match='class names'):
        selectivecl_test(num_classes=4)


# ------------------------------------------------------------------------------- construction
def test_registry_names_and_lr_groups(clip_model):
    assert {'selectivecl_vits16', 'selectivecl_vits14', 'selectivecl_imgfocus',
            'selectivecl_test'} <= set(list_models('selectivecl_*'))
    m = clip_model
    assert isinstance(m, SelectiveCL) and m.backbone.name == 'vit_test'
    d = m.backbone.embed_dim
    assert m.aff_proj.fc1.out_features == 4 * d and m.aff_proj.fc2.out_features == d
    keys = torch.randn(5, d)
    torch.testing.assert_close(m.aff_proj(keys), m.aff_proj.fc2(F.gelu(m.aff_proj.fc1(
        F.layer_norm(keys, (d,), m.aff_proj.norm.weight, m.aff_proj.norm.bias)))))  # no residual
    assert m.aff_classifier.out_channels == C
    assert m.K_contrast_projection.kernel_size == (1, 1)
    assert m.pixel_contrast_projection.kernel_size == (1, 1)
    groups = {g['group']: set(g['names']) for g in build_optimizer(m, OptimConfig()).param_groups}
    assert {'aff_proj.fc1.weight', 'aff_proj.fc2.weight'} <= groups['fc_weight']
    assert 'aff_classifier.weight' in groups['weight']       # 1x lr, the official quirk
    assert 'aff_classifier.bias' in groups['bias']
    assert not any(n.startswith(('clip.', 'backbone.')) for g in groups.values() for n in g)
    # the clip prior needs images: no feature cache, evaluation on images
    assert m.feature_fields == () and m.predicts_from_features is False
    assert SelectiveCL.feature_fields == ('keys', 'cls_attn')
    m.train()
    assert m.aff_ego_proj.training and not m.clip.training and not m.backbone.training
    with pytest.raises(ValueError, match='object_prior must be one of'):
        selectivecl_test(classes=CLASSES, object_prior='sam')


def test_bn_momentum_reproduces_two_reference_updates():
    torch.manual_seed(0)
    ref = ConvBranch(8)
    ours = copy.deepcopy(ref)
    for m in ours.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.19
    x = torch.randn(4, 8, 5, 5)
    y1, y2 = ref(x), ref(x)                     # the reference: ego_proj and ego_proj_nocond
    torch.testing.assert_close(y1, y2)
    y = ours(x)
    torch.testing.assert_close(y, y1)
    for a, b in zip(ref.modules(), ours.modules()):
        if isinstance(a, torch.nn.BatchNorm2d):
            torch.testing.assert_close(b.running_mean, a.running_mean)
            torch.testing.assert_close(b.running_var, a.running_var)
    m = selectivecl_test(classes=CLASSES)
    assert {b.momentum for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)} == {0.19}


# ------------------------------------------------------------------------------- training forward
def test_forward_shapes_and_gradients(clip_model, data):
    ego, exo, labels = data
    m = clip_model
    m.train()
    m.zero_grad(set_to_none=True)
    out = m(ego, exo, labels)
    d = m.backbone.embed_dim
    shapes = {'ego_logits': (3, C), 'exo_logits': (3, 3, C), 'ego_cam': (3, C, 4, 4),
              'contrast_ego': (3, d, 4, 4), 'contrast_exo': (3, 3, d, 4, 4),
              'part_map_ego': (3, 4, 4), 'part_map_exo': (3, 3, 4, 4), 'bg_map_ego': (3, 4, 4),
              'bg_map_exo': (3, 3, 4, 4), 'anchor_map': (3, 4, 4), 'pixel_embed': (3, d, 4, 4),
              'pixel_fg': (3, 4, 4), 'pixel_anchor': (3, 4, 4), 'object_ego': (3, 4, 4),
              'object_exo': (3, 3, 4, 4), 'part_valid': (3,), 'part_score': (3, 3),
              'ego_sam': (3, 4, 4), 'contrast_temperature': ()}
    assert {k: tuple(v.shape) for k, v in out.items()} == shapes
    torch.testing.assert_close(out['ego_logits'], out['ego_cam'].mean((2, 3)))
    assert float(out['contrast_temperature']) == 0.5
    # the CLIP affinity maps exactly as §6.1
    with torch.no_grad():
        fe = F.normalize(m.clip.image_features(ego), dim=1)
        fx = F.normalize(m.clip.image_features(exo.flatten(0, 1)), dim=1).view(3, 3, -1, 4, 4)
        t_ego, t_exo = m.clip.text_ego[labels], m.clip.text_exo[labels]
        a_ego = (fe * t_ego[:, :, None, None]).sum(1)
        aff = (fx * t_ego[:, None, :, None, None]).sum(2)
        obj = (fx * t_exo[:, None, :, None, None]).sum(2)
    torch.testing.assert_close(out['object_ego'], a_ego)
    torch.testing.assert_close(out['object_exo'], local_mean3(obj) * aff)
    total(out, labels).backward()
    for prefix in ('aff_proj', 'aff_exo_proj', 'aff_ego_proj', 'aff_classifier',
                   'K_contrast_projection', 'pixel_contrast_projection'):
        params = [(n, p) for n, p in m.named_parameters() if n.startswith(prefix + '.')]
        assert params, prefix
        for name, p in params:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in m.clip.parameters())
    assert all(p.grad is None for p in m.backbone.parameters())


def test_clip_prior_refuses_cached_features(clip_model, data):
    ego, exo, labels = data
    f_ego, f_exo = clip_model.backbone(ego), clip_model.backbone(exo.flatten(0, 1))
    with pytest.raises(ValueError, match="object_prior='clip' runs CLIP on the ego images.*"
                                         'cache_features=false'):
        clip_model(None, None, labels, ego_feats=f_ego, exo_feats=f_exo)
    with pytest.raises(ValueError, match='cannot work from cached backbone features'):
        clip_model.predict_raw(None, labels, feats=f_ego)


def test_c2am_forward_from_features_equals_images(c2am_model, c2am_prior, data):
    ego, exo, labels = data
    m = c2am_model
    assert m.prior_shares_backbone and m.object_prior.backbone is m.backbone
    assert m.feature_fields == ('keys', 'cls_attn') and m.predicts_from_features
    assert not any(p.requires_grad for p in m.object_prior.parameters())
    m.train()
    assert not m.object_prior.training
    m.kmeans_generator.manual_seed(0)
    a = m(ego, exo, labels)
    f_ego = m.backbone(ego).keep(m.feature_fields)
    f_exo = m.backbone(exo.flatten(0, 1)).keep(m.feature_fields)
    m.kmeans_generator.manual_seed(0)
    b = m(None, None, labels, ego_feats=f_ego, exo_feats=f_exo)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    # A_ego / A_exo are the C2AM object maps; pixel labels = [minmax(A_ego) > 0.6]
    with torch.no_grad():
        torch.testing.assert_close(a['object_ego'], c2am_prior.object_map(ego))
        torch.testing.assert_close(a['object_exo'].flatten(0, 1),
                                   c2am_prior.object_map(exo.flatten(0, 1)))
    mm = a['object_ego'].flatten(1)
    lo, hi = mm.amin(1, keepdim=True), mm.amax(1, keepdim=True)
    binary = (mm - lo) / (hi - lo) > 0.6
    assert torch.equal(a['pixel_fg'].flatten(1), binary)
    assert torch.equal(a['pixel_anchor'].flatten(1), binary)
    # with cached features the evaluation uses predict_raw(None, ids, feats=...)
    m.eval()
    torch.testing.assert_close(m.predict_raw(None, labels, feats=f_ego),
                               m.predict_raw(ego, labels))


def test_c2am_prior_without_shared_backbone_needs_images(data):
    class Prior(torch.nn.Module):  # duck-typed object prior with its own "backbone"
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def object_map(self, images=None, *, feats=None):
            return torch.sigmoid(self.scale * F.avg_pool2d(images.mean(1, keepdim=True), 16))[:, 0]

    ego, exo, labels = data
    m = selectivecl_test(classes=CLASSES, object_prior='c2am', object_prior_model=Prior())
    assert m.feature_fields == () and not m.predicts_from_features
    assert not m.object_prior.scale.requires_grad
    out = m(ego, exo, labels)
    torch.testing.assert_close(out['object_ego'], Prior().object_map(ego).detach())
    with pytest.raises(ValueError, match='runs its own backbone'):
        m.cams(None, feats=m.backbone(ego))
    assert 'object_prior_model' not in m.init_kwargs
    with pytest.raises(ValueError, match='needs a trained C2AM'):
        selectivecl_test(classes=CLASSES, object_prior='c2am')


def test_c2am_checkpoints_are_self_contained(c2am_prior, data, tmp_path):
    ego, _, _ = data
    prior_path = tmp_path / 'c2am.pt'
    save_checkpoint(c2am_prior, prior_path)
    m = create_model('selectivecl_test', classes=CLASSES, object_prior='c2am',
                     object_prior_checkpoint=str(prior_path)).eval()
    assert m.init_kwargs['object_prior_spec'] == {'model': 'c2am_test', 'model_kwargs': {}}
    m.epoch_end(4)
    path = tmp_path / 'scl.pt'
    save_checkpoint(m, path)
    prior_path.unlink()                              # the SelectiveCL checkpoint holds the prior
    back = load_checkpoint(path)
    assert int(back.current_epoch) == 5 and back.object_prior.backbone is back.backbone
    torch.testing.assert_close(back.cams(ego), m.cams(ego), rtol=0, atol=0)
    other = copy.deepcopy(c2am_prior)
    with torch.no_grad():
        other.backbone.vit.cls_token.add_(1.0)
    with pytest.raises(ValueError, match='holds other weights'):
        selectivecl_test(classes=CLASSES, object_prior='c2am', object_prior_model=other)


def test_selective_switch_reliable_and_unreliable(data):
    """Reliable samples: R from the chosen centroid; unreliable ones: the raw prior maps."""
    gen = torch.Generator().manual_seed(7)
    b, n, d, h, w = 3, 3, 6, 4, 4
    ego = torch.randn(b, d, h, w, generator=gen)
    exo = torch.randn(b, n, d, h, w, generator=gen)
    obj_ego = torch.rand(b, h, w, generator=gen) - 0.2
    obj_exo = torch.rand(b, n, h, w, generator=gen)
    source = torch.rand(b, n, h, w, generator=gen)
    source[1] = 0.5                                   # constant: no descriptor above gamma1
    sam = torch.ones(b, h, w, dtype=torch.bool)       # pIoU = 0.5 (1 + 1) = 1 for sample 0
    sam[2] = False
    sam[2, 0, 0] = True                               # one salient pixel: pIoU < 0.6
    out = selective_parts(ego, exo, sam, source, obj_ego, obj_exo,
                          generator=torch.Generator().manual_seed(0))
    assert out['part_valid'].tolist() == [True, False, False]
    assert int(out['num_desc'][1]) == 0 and float(out['part_score'][0].max()) == 1.0
    assert float(out['part_score'][2].max()) < 0.6
    for i in (1, 2):                                  # object-level fallback
        assert torch.equal(out['part_ego'][i], obj_ego[i])
        assert torch.equal(out['part_exo'][i], obj_exo[i])
    c = out['part_proto'][0]
    torch.testing.assert_close(c.norm(), torch.tensor(1.0))
    # reliable: R = 0.5 [cos(c, A_ego-weighted ego key) + softmax_p(-||key - c||)], explicit loops
    dist = torch.tensor([(ego[0, :, i, j] - c).norm() for i in range(h) for j in range(w)])
    soft = torch.exp(-dist) / torch.exp(-dist).sum()
    for i in range(h):
        for j in range(w):
            wk = ego[0, :, i, j] * obj_ego[0, i, j]
            ref = 0.5 * (torch.dot(c, wk) / wk.norm() + soft[i * w + j])
            torch.testing.assert_close(out['part_ego'][0, i, j], ref)
    # exo: the softmax runs jointly over the N*h*w exo pixels
    dx = torch.stack([(exo[0, k, :, i, j] - c).norm() for k in range(n) for i in range(h)
                      for j in range(w)])
    soft_x = torch.softmax(-dx, 0).view(n, h, w)
    cos_x = torch.einsum('d,kdij->kij', c, F.normalize(exo[0], dim=1))
    torch.testing.assert_close(out['part_exo'][0], 0.5 * (cos_x + soft_x))
    torch.testing.assert_close(out['part_exo'][0].sum() - 0.5 * cos_x.sum(), torch.tensor(0.5))


def test_model_switch_fallback_and_epoch_behaviour(data):
    ego, exo, labels = data
    torch.manual_seed(0)
    m = selectivecl_test(classes=CLASSES, alpha=1.5)  # pIoU <= 1: every sample falls back
    m.train()
    out = m(ego, exo, labels)
    assert not out['part_valid'].any()
    torch.testing.assert_close(out['part_map_ego'], out['object_ego'])
    torch.testing.assert_close(out['part_map_exo'], out['object_exo'])
    assert torch.equal(out['anchor_map'], torch.ones(3, 4, 4))
    torch.testing.assert_close(out['bg_map_ego'], 1 - out['part_map_ego'])
    assert not out['bg_map_ego'].requires_grad                 # epoch 0: 1 - R
    assert int(m.current_epoch) == 0 and 'current_epoch' in m.state_dict()
    m.epoch_end(0)
    assert int(m.current_epoch) == 1
    late = m(ego, exo, labels)
    cam_y = late['ego_cam'][torch.arange(3), labels]
    torch.testing.assert_close(late['bg_map_ego'], 1 - late['part_map_ego'] * cam_y.relu())
    assert late['bg_map_ego'].requires_grad                    # through the CAM, as the code
    # from epoch 1 on the selection source is relu(A_exo) * relu(exo CAM_y): check that the
    # forward's part discovery equals selective_parts on that source
    m.eval()
    m.kmeans_generator.manual_seed(3)
    m.alpha = 0.6
    o = m(ego, exo, labels)
    fe, fx = m.backbone(ego), m.backbone(exo.flatten(0, 1))
    with torch.no_grad():
        exo_cam = m.aff_classifier(m.aff_exo_proj(m._project(fx.keys)))
        exo_y = exo_cam.view(3, 3, C, 4, 4)[torch.arange(3), :, labels]
        ref = selective_parts(fe.keys, fx.keys.view(3, 3, -1, 4, 4),
                              dino_saliency(fe.cls_attn)[1],
                              o['object_exo'].relu() * exo_y.relu(), o['object_ego'],
                              o['object_exo'], generator=torch.Generator().manual_seed(3))
    assert torch.equal(o['part_valid'], ref['part_valid'])
    torch.testing.assert_close(o['part_map_ego'], ref['part_ego'])
    torch.testing.assert_close(o['anchor_map'], torch.where(
        ref['part_valid'][:, None, None], o['object_ego'], torch.ones_like(o['object_ego'])))


def test_pixel_labels_and_local_mean():
    ego = torch.tensor([[[0.1, 0.5], [0.3, 0.9]], [[0.1, 0.2], [0.3, 0.4]]])
    exo = torch.zeros(2, 2, 2, 2)
    exo[0, 0, 0, 0], exo[0, 1, 1, 1] = 0.6, 0.4       # rho_0 = min(0.6, 0.4) = 0.4
    exo[1, :, 0, 0] = 0.8                             # rho_1 = 0.8: no foreground -> fallback
    labels, anchors = pixel_labels(ego, exo, 0.6)
    assert labels[0].tolist() == [[False, True], [False, True]]
    # fallback [minmax(A_ego) > 0.6]: (0, 1/3, 2/3, 1) -> the last two pixels
    assert labels[1].tolist() == [[False, False], [True, True]]
    assert anchors[0].tolist() == [[False, False], [False, True]]  # (0.5-.1)/.8 = .5 < .6
    only, anchors2 = pixel_labels(ego, None, 0.6)
    assert torch.equal(only, anchors) and torch.equal(anchors2, anchors)
    x = torch.arange(12.0).view(1, 3, 4)
    ref = torch.zeros_like(x)
    for i in range(3):
        for j in range(4):
            ref[0, i, j] = x[0, max(i - 1, 0):i + 2, max(j - 1, 0):j + 2].mean()
    torch.testing.assert_close(local_mean3(x), ref)


# ----------------------------------------------------------------------------------- losses
def _reference_proto_loss(out, labels, tau=0.5, base=0.07):
    """The reference ContrastiveLoss written with explicit loops."""
    z_ego, z_exo = out['contrast_ego'], out['contrast_exo']
    b, n = z_exo.shape[:2]

    def proto(z, m):
        return F.normalize((z * m).mean((-2, -1)), dim=0)

    bank, kind, cls = [], [], []
    for i in range(b):
        bank.append(proto(z_ego[i], out['part_map_ego'][i]))
        kind.append('ego_pos')
        cls.append(int(labels[i]))
    for i in range(b):
        bank.append(proto(z_ego[i], out['bg_map_ego'][i]))
        kind.append('ego_bg')
        cls.append(int(labels[i]))
    for i in range(b):
        for k in range(n):
            bank.append(proto(z_exo[i, k], out['part_map_exo'][i, k]))
            kind.append('exo_pos')
            cls.append(int(labels[i]))
    for i in range(b):
        for k in range(n):
            bank.append(proto(z_exo[i, k], out['bg_map_exo'][i, k]))
            kind.append('exo_bg')
            cls.append(int(labels[i]))
    losses = []
    for i in range(b):
        a = proto(z_ego[i], out['anchor_map'][i])
        pos, den = [], []
        for j, (q, kd, c) in enumerate(zip(bank, kind, cls)):
            if kd == 'ego_pos' and j == i:
                continue                                     # the anchor's own prototype
            s = torch.dot(a, q) / tau
            if kd.endswith('bg'):
                if c == int(labels[i]):
                    den.append(s)                            # same-class backgrounds only
                continue
            den.append(s)
            if c == int(labels[i]):
                pos.append(s)
        if pos:
            lse = torch.logsumexp(torch.stack(den), 0)
            losses.append(-(tau / base) * torch.stack([p - lse for p in pos]).mean())
    return torch.stack(losses).mean()


def _reference_pixel_loss(out, tau=0.5, base=0.07):
    """The reference PixelContrastiveLoss written with explicit loops."""
    emb = out['pixel_embed']
    b = emb.shape[0]
    total_loss = 0.0
    for i in range(b):
        z = F.normalize(emb[i].flatten(1), dim=0).T       # (P, D)
        lab = out['pixel_fg'][i].flatten()
        anc = out['pixel_anchor'][i].flatten()
        p = z.shape[0]
        terms = []
        for a in range(p):
            if not anc[a]:
                continue
            sims = [torch.dot(z[a], z[q]) / tau for q in range(p) if q != a]
            lse = torch.logsumexp(torch.stack(sims), 0)
            pos = [torch.dot(z[a], z[q]) / tau - lse for q in range(p)
                   if q != a and lab[q] == lab[a]]
            if pos:
                terms.append(-(tau / base) * torch.stack(pos).mean())
        if terms:
            total_loss = total_loss + torch.stack(terms).mean()
    return total_loss / b


def test_losses_match_explicit_loops(clip_model, data):
    ego, exo, labels = data
    clip_model.train()
    out = clip_model(ego, exo, labels)
    ours = LOSSES['selective_prototype'](out, {'label': labels})
    torch.testing.assert_close(ours, _reference_proto_loss(out, labels), atol=1e-4, rtol=1e-5)
    pix = LOSSES['pixel_contrast'](out, {'label': labels})
    torch.testing.assert_close(pix, _reference_pixel_loss(out), atol=1e-4, rtol=1e-5)
    # the 1 / 0.07 * 0.5 factor: tau = 0.07 makes it 1
    cold = dict(out, contrast_temperature=torch.tensor(0.07))
    torch.testing.assert_close(LOSSES['selective_prototype'](cold, {'label': labels}),
                               _reference_proto_loss(out, labels, tau=0.07), atol=1e-4,
                               rtol=1e-5)
    assert LOSSES['cross_entropy'](out, {'label': labels}).isfinite()


def test_prototype_loss_hand_value_and_same_class_backgrounds():
    """Two samples of different classes, N = 1, D = 2, one pixel: a value computed by hand."""
    def t(*v):
        return torch.tensor(v, dtype=torch.float32)

    ego = torch.stack([t(1.0, 0.0), t(0.0, 1.0)]).view(2, 2, 1, 1)
    exo = torch.stack([t(0.6, 0.8), t(0.8, 0.6)]).view(2, 1, 2, 1, 1)
    one = torch.ones(2, 1, 1)
    out = {'contrast_ego': ego, 'contrast_exo': exo, 'part_map_ego': one,
           'part_map_exo': one.view(2, 1, 1, 1), 'anchor_map': one,
           'bg_map_ego': -one,                       # background prototype = -feature
           'bg_map_exo': -one.view(2, 1, 1, 1),
           'contrast_temperature': torch.tensor(0.5)}
    labels = torch.tensor([0, 1])
    # anchor 0 = (1, 0): positive exo_0 (0.6, 0.8) -> s = 1.2; denominator: ego_1 (0) / 0.5,
    # exo_0 1.2, exo_1 1.6, same-class backgrounds ego_0 (-2), exo_0 (-1.2); the other class's
    # backgrounds (ego_1: 0, exo_1: -1.6) are left out
    den0 = torch.logsumexp(t(0.0, 1.2, 1.6, -2.0, -1.2), 0)
    l0 = -(0.5 / 0.07) * (1.2 - den0)
    den1 = torch.logsumexp(t(0.0, 1.6, 1.2, -2.0, -1.2), 0)   # anchor 1 = (0, 1)
    l1 = -(0.5 / 0.07) * (1.2 - den1)
    got = LOSSES['selective_prototype'](out, {'label': labels})
    torch.testing.assert_close(got, (l0 + l1) / 2)
    assert math.isclose(0.5 / 0.07, 7.142857, rel_tol=1e-6)


def test_pixel_loss_hand_value():
    """One image, 3 pixels (fg, fg, bg), orthogonal-ish unit embeddings, every pixel an anchor
    except the background one."""
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]).T.reshape(1, 2, 1, 3)
    out = {'pixel_embed': emb, 'pixel_fg': torch.tensor([[[True, True, False]]]),
           'pixel_anchor': torch.tensor([[[True, True, False]]]),
           'contrast_temperature': torch.tensor(0.5)}
    # anchor 0: s01 = 0, s02 = -2 -> log p(1) = 0 - log(e^0 + e^-2); anchor 1: s10 = 0, s12 = 0
    l0 = -(0.5 / 0.07) * (0.0 - math.log(1 + math.exp(-2)))
    l1 = -(0.5 / 0.07) * (0.0 - math.log(2))
    got = LOSSES['pixel_contrast'](out, {})
    torch.testing.assert_close(got, torch.tensor((l0 + l1) / 2))
    none = dict(out, pixel_anchor=torch.zeros(1, 1, 3, dtype=torch.bool))
    assert float(LOSSES['pixel_contrast'](none, {})) == 0.0     # the reference: NaN


def test_sgd_steps_decrease_loss(data):
    ego, exo, labels = data
    torch.manual_seed(0)
    m = selectivecl_test(classes=CLASSES)
    m.train()
    opt = build_optimizer(m, OptimConfig(lr=2e-3))
    losses = []
    for _ in range(8):
        m.kmeans_generator.manual_seed(0)
        loss = total(m(ego, exo, labels), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.8 * losses[0], losses


# ----------------------------------------------------------------------------------- inference
def test_predict_every_class_is_the_calibrated_cam(clip_model, data):
    ego, _, _ = data
    m = clip_model.eval()
    cams = m.cams(ego)
    assert cams.shape == (3, C, 4, 4)
    with torch.no_grad():
        keys = m.backbone(ego).keys
        cam = m.aff_classifier(m.aff_ego_proj(m._project(keys)))
        f = F.normalize(m.clip.image_features(ego), dim=1)
    for c in range(C):
        a = (f * m.clip.text_ego[c][None, :, None, None]).sum(1)
        lo = a.flatten(1).amin(1)[:, None, None]
        hi = a.flatten(1).amax(1)[:, None, None]
        torch.testing.assert_close(cams[:, c], cam[:, c] * (a - lo) / (hi - lo), atol=1e-5,
                                   rtol=1e-4)
        ids = torch.full((3,), c)
        torch.testing.assert_close(m.predict_raw(ego, ids), cams[:, c])
        pred = m.predict(ego, ids)
        assert pred.shape == (3, 64, 64) and (pred >= 0).all() and (pred <= 1).all()
        assert (pred.amax((1, 2)) > 0.999).all()


def test_c2am_variant_traces(c2am_model, data):
    ego, _, labels = data
    m = c2am_model.eval()
    cams = m.cams(ego)
    a = m.object_prior.object_map(ego)
    lo, hi = a.flatten(1).amin(1)[:, None, None], a.flatten(1).amax(1)[:, None, None]
    keys = m.backbone(ego).keys
    torch.testing.assert_close(cams, m.class_maps(keys) * ((a - lo) / (hi - lo))[:, None],
                               atol=1e-5, rtol=1e-4)
    wrapper = ExportWrapper(m, image_size=64)
    with warnings.catch_warnings():  # torch.jit.trace deprecation, shape-check TracerWarnings
        warnings.simplefilter('ignore')
        traced = torch.jit.trace(wrapper, ego, check_trace=False)
    other = torch.randn(2, 3, 64, 64)
    for got, want in zip(traced(other), wrapper(other)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('prior', ['clip', 'c2am'])
def test_onnx_export_parity(prior, c2am_prior, tmp_path):
    pytest.importorskip('onnx')
    pytest.importorskip('onnxruntime')
    from affordance_core.export.onnx import export_onnx, verify_onnx

    kwargs = {'object_prior': 'c2am', 'object_prior_model': c2am_prior} if prior == 'c2am' else {}
    m = selectivecl_test(classes=CLASSES[:2], **kwargs).eval()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        path = export_onnx(m, tmp_path / f'{prior}.onnx', image_size=64)
        err = verify_onnx(m, path, num_inputs=2)
    assert err['cams'] < 1e-4 and err['maps'] < 1e-3, err


# ------------------------------------------------------------------------- official checkpoints
def test_official_round_trip_and_key_permutation(data):
    ego, _, _ = data
    torch.manual_seed(4)
    ours = selectivecl_test(classes=CLASSES)
    with torch.no_grad():  # non-trivial BN statistics
        for mod in ours.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    ours.eval()
    state = {k: v for k, v in ours.state_dict().items() if not k.startswith('backbone.')}
    heads = ours.backbone.num_heads
    off = to_official_state_dict(state, heads)
    assert 'current_epoch' not in off and not any(k.startswith('clip.') for k in off)
    assert 'net.visual.conv1.weight' in off and 'net.token_embedding.weight' in off
    assert {'aff_classifier.weight', 'K_contrast_projection.weight',
            'pixel_contrast_projection.weight', 'aff_ego_proj.4.running_var'} <= set(off)
    perm = key_channel_perm(ours.backbone.embed_dim, heads)
    torch.testing.assert_close(off['aff_proj.fc1.weight'], state['aff_proj.fc1.weight'][:, perm])
    torch.testing.assert_close(off['aff_proj.fc2.weight'], state['aff_proj.fc2.weight'])
    back = from_official_state_dict(off, heads)
    assert back.keys() == state.keys()
    for k in state:
        assert torch.equal(back[k], state[k]), k
    torch.manual_seed(9)
    fresh = selectivecl_test(classes=CLASSES).eval()
    backbone = {k: v for k, v in ours.state_dict().items() if k.startswith('backbone.')}
    fresh.load_state_dict({**backbone, **back}, strict=True)
    torch.testing.assert_close(fresh.cams(ego), ours.cams(ego), rtol=0, atol=0)
    # the official head on official (d-major) keys gives our CAMs: the permutation matters
    raw = selectivecl_test(classes=CLASSES).eval()
    raw.load_state_dict({k: v for k, v in off.items() if not k.startswith('net.')},
                        strict=False)
    keys = ours.backbone(ego).keys
    torch.testing.assert_close(raw.class_maps(keys[:, perm]), ours.class_maps(keys), atol=1e-5,
                               rtol=1e-5)
    assert not torch.allclose(raw.class_maps(keys), ours.class_maps(keys), atol=1e-3)
    with pytest.raises(ValueError, match='unknown SelectiveCL keys'):
        from_official_state_dict({**off, 'vit_model.cls_token': torch.zeros(1)}, heads)
    # through the shared converter (affordance-convert): the 10 HICO-IIF classes are inferred
    hico = selectivecl_test(classes=list(classes_for('HICO-IIF'))).eval()
    conv = from_official('selectivecl', to_official('selectivecl', hico), model='selectivecl_test')
    assert conv.classes == classes_for('HICO-IIF')
    torch.testing.assert_close(conv.cams(ego), hico.cams(ego), rtol=0, atol=0)
    with pytest.raises(ValueError, match='unknown SelectiveCL keys'):
        to_official_state_dict({**state, 'backbone.vit.cls_token': torch.zeros(1)}, heads)


# ----------------------------------------------------------------------------------- trainer
def test_trainer_runs_the_selectivecl_recipe(tmp_path, tiny_agd):
    from affordance_core.engine.trainer import Trainer

    cfg = load_config(ExperimentConfig, 'training/configs/selectivecl_seen.yaml', [
        'model.name=selectivecl_test', 'model.kwargs.clip_config=tiny', f'data.root={tiny_agd}',
        'data.image_size=64', 'data.resize=72', 'data.num_workers=0', 'train.batch_size=4',
        'train.epochs=2', 'train.device=cpu', 'train.tensorboard=false',
        f'train.output_dir={tmp_path / "run"}'])
    summary = Trainer(cfg, progress=False).fit()
    assert math.isfinite(summary['best']['KLD'])
    model = load_checkpoint(tmp_path / 'run' / 'last.pt')
    assert isinstance(model, SelectiveCL) and int(model.current_epoch) == 2
    assert model.aff_classifier.out_channels == 36
    bad = load_config(ExperimentConfig, 'training/configs/selectivecl_seen.yaml', [
        'model.name=selectivecl_test', 'model.kwargs.clip_config=tiny', f'data.root={tiny_agd}',
        'data.image_size=64', 'train.device=cpu', 'train.cache_features=true',
        f'train.output_dir={tmp_path / "bad"}'])
    with pytest.raises(ValueError, match='no feature_fields'):
        Trainer(bad, progress=False)


def test_trainer_runs_the_c2am_variant_from_cached_features(tmp_path, tiny_agd, c2am_prior):
    from affordance_core.engine.trainer import Trainer

    prior = tmp_path / 'c2am.pt'
    save_checkpoint(c2am_prior, prior)
    cfg = load_config(ExperimentConfig, 'training/configs/selectivecl_c2am_seen.yaml', [
        'model.name=selectivecl_test', f'model.kwargs.object_prior_checkpoint={prior}',
        f'data.root={tiny_agd}', 'data.image_size=64', 'data.resize=72', 'data.num_workers=0',
        'train.batch_size=4', 'train.epochs=2', 'train.device=cpu', 'train.tensorboard=false',
        'train.cache_features=true', f'train.output_dir={tmp_path / "run"}'])
    summary = Trainer(cfg, progress=False).fit()
    assert math.isfinite(summary['best']['KLD'])
    model = load_checkpoint(tmp_path / 'run' / 'last.pt')
    assert model.object_prior_kind == 'c2am' and int(model.current_epoch) == 2
    assert model.init_kwargs['object_prior_spec']['model'] == 'c2am_test'
