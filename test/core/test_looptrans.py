"""LoopTrans, its clusterer (+ modularity training) and the official-checkpoint converter."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from affordance_core.checkpoint import load_checkpoint
from affordance_core.config import ExperimentConfig, load_config
from affordance_core.convert import from_official, read_official, to_official
from affordance_core.losses import LOSSES
from affordance_core.losses.modularity import modularity
from affordance_core.models.clusterer import (Clusterer, convert_official_clusterer,
                                              load_clusterer, save_clusterer)
from affordance_core.models.layers import key_channel_perm
from affordance_core.models.looptrans import LoopTrans, looptrans_test, pseudo_mask
from affordance_core.registry import create_model

C = 4
RECIPE = {'cross_entropy': 1.0, 'pixel_mse': 10.0, 'pixel_dice': 2.0, 'affinity_corr': 1.5,
          'denoise_distill': 0.05, 'concentration': 0.07}
pytestmark = pytest.mark.usefixtures('torch_one_thread')


@pytest.fixture(scope='module')
def model() -> LoopTrans:
    torch.manual_seed(0)
    return looptrans_test(num_classes=C, classes=['hold', 'cut', 'drink', 'sit_on'])


@pytest.fixture(scope='module')
def data():
    gen = torch.Generator().manual_seed(1)
    ego = torch.randn(3, 3, 64, 64, generator=gen)
    exo = torch.randn(3, 3, 3, 64, 64, generator=gen)
    return ego, exo, torch.tensor([0, 2, 3])


def total(out: dict, labels: torch.Tensor) -> torch.Tensor:
    return sum(w * LOSSES[k](out, {'label': labels}) for k, w in RECIPE.items())


# --------------------------------------------------------------------------------- model
def test_architecture_follows_the_reference(model):
    names = {n for n, _ in model.named_parameters() if not n.startswith('backbone.')}
    assert {'aff_proj.fc1.weight', 'scam.0.weight', 'scam.3.weight', 'pixel_dec.0.weight',
            'pixel_dec.4.bias', 'aff_fc.weight'} <= names
    assert model.aff_fc.out_channels == C + 15
    assert model.cluster is None  # k-means fallback without clusterer weights
    assert 'looptrans_imgfocus' in __import__('affordance_core').list_models('looptrans_*')


def test_forward_shapes_and_features_equal_images(model, data):
    ego, exo, labels = data
    model.train()
    model.kmeans_generator.manual_seed(0)
    out = model(ego, exo, labels)
    assert out['ego_logits'].shape == (3, C + 15) and out['exo_logits'].shape == (3, 3, C + 15)
    assert out['ego_cam'].shape == (3, C + 15, 4, 4)
    assert out['exo_cam'].shape == (3, 3, C + 15, 4, 4)
    assert out['pseudo_mask'].shape == (3, 4, 4) and set(out['pseudo_mask'].unique().tolist()) \
        <= {0.0, 1.0}
    model.kmeans_generator.manual_seed(0)
    out2 = model(None, None, labels, ego_feats=model.backbone(ego),
                 exo_feats=model.backbone(exo.flatten(0, 1)))
    for k in ('ego_logits', 'exo_cam', 'ego_cam', 'pseudo_mask', 'pixel_map'):
        torch.testing.assert_close(out[k], out2[k])
    # the ego logits come from the SHARED CAM (θ_SCAM), not from the pixel decoder
    torch.testing.assert_close(out['ego_logits'], out['cross_cam'].mean((-2, -1)))
    assert not torch.allclose(out['ego_logits'], out['ego_cam'].mean((-2, -1)))
    with pytest.raises(ValueError, match='labels must lie'):
        model(ego, exo, torch.tensor([0, 1, C]))


def test_pseudo_mask_matches_a_reference_style_loop():
    gen = torch.Generator().manual_seed(3)
    b, h, w, k = 5, 4, 4, 4
    cam = torch.randn(b, h, w, generator=gen)
    parts = torch.randint(0, k, (b, h, w), generator=gen)
    parts[0] = parts[0].clamp_max(2)  # part 3 empty in sample 0
    sal = torch.rand(b, h, w, generator=gen)
    mask, chosen = pseudo_mask(cam, parts, sal, k, fg_threshold=0.6)
    for i in range(b):
        c = cam[i] - cam[i].min()
        cam_mask = (c / (c.max() + 1e-15)).flatten() > 0.6
        scores, sals = [], []
        for p in range(k):
            pm = parts[i].flatten() == p
            scores.append(float((pm & cam_mask).sum()) / (float((pm | cam_mask).sum()) + 1e-6))
            sals.append(float(sal[i].flatten()[pm].mean()) if pm.any() else -math.inf)
        scores[min(range(k), key=lambda j: sals[j])] = -1
        best = max(range(k), key=lambda j: (scores[j], -j))
        assert int(chosen[i]) == best
        assert torch.equal(mask[i], (parts[i] == best).float())
    assert int(chosen[0]) != 3  # the empty part is the "background"


def test_sgd_steps_decrease_the_loss(data):
    ego, exo, labels = data
    torch.manual_seed(0)
    m = looptrans_test(num_classes=C)
    ef, xf = m.backbone(ego), m.backbone(exo.flatten(0, 1))
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.01,
                          momentum=0.9)
    values = []
    for _ in range(12):
        loss = total(m(None, None, labels, ego_feats=ef, exo_feats=xf), labels)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        values.append(loss.item())
    assert values[-1] < 0.7 * values[0], values


def test_inference_is_the_pixel_decoder_only(model, data):
    ego, _, _ = data
    model.eval()
    hook = model.scam.register_forward_hook(lambda *a: pytest.fail('shared CAM used'))
    try:
        cams = model.cams(ego)
        assert cams.shape == (3, C, 4, 4)  # noise classes dropped
        full = model.aff_fc(model.pixel_dec(model._project(model.backbone(ego).keys)))
        torch.testing.assert_close(cams, full[:, :C])
        for c in range(C):
            pred = model.predict(ego, c)
            assert pred.shape == (3, 64, 64) and pred.min() >= 0 and pred.max() <= 1
            assert (pred.amax((1, 2)) > 0.999).all()
    finally:
        hook.remove()


# --------------------------------------------------------------------------------- losses
def test_pixel_mse_and_dice_hand_values():
    p = torch.tensor([[[1.0, 0.5], [0.0, 0.25]]])
    m = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    out = {'pixel_map': p, 'pseudo_mask': m}
    # MSE: (0 + 0.25 + 0 + 0.0625) / 4
    assert LOSSES['pixel_mse'](out, {}).item() == pytest.approx(0.078125)
    # Dice: 1 - (2 * 1.5 + 1) / (1.75 + 2 + 1)
    assert LOSSES['pixel_dice'](out, {}).item() == pytest.approx(1 - 4 / 4.75)
    two = {'pixel_map': torch.cat([p, m]), 'pseudo_mask': torch.cat([m, m])}
    assert LOSSES['pixel_dice'](two, {}).item() == pytest.approx((1 - 4 / 4.75 + 0) / 2)


def test_affinity_corr_matches_explicit_loops():
    gen = torch.Generator().manual_seed(4)
    ego = torch.randn(2, 3, 2, 2, generator=gen)
    exo = torch.randn(2, 3, 3, 2, 2, generator=gen)
    got = LOSSES['affinity_corr']({'ego_cam': ego, 'exo_cam': exo}, {})
    cos = []
    for b in range(2):
        p = ego[b].reshape(3, -1)
        g = torch.cat([exo[b, n].reshape(3, -1) for n in range(3)], 1)
        ke, kx = p @ p.T, g @ g.T
        for j in range(3):
            cos.append(float(ke[:, j] @ kx[:, j] / (ke[:, j].norm() * kx[:, j].norm())))
    assert got.item() == pytest.approx(1 - sum(cos) / len(cos), abs=1e-6)


def test_denoise_distill_matches_the_reference_loop():
    gen = torch.Generator().manual_seed(5)
    b, n, c, m, d, h = 2, 3, 2, 3, 5, 2
    ego_cam = torch.randn(b, c + m, h, h, generator=gen)
    exo_cam = torch.randn(b, n, c + m, h, h, generator=gen)
    ego_keys = torch.randn(b, d, h, h, generator=gen)
    exo_keys = torch.randn(b, n, d, h, h, generator=gen)
    labels = torch.tensor([1, 0])
    out = {'ego_cam': ego_cam, 'exo_cam': exo_cam, 'ego_keys': ego_keys, 'exo_keys': exo_keys,
           'num_noise': torch.tensor(m)}
    got = LOSSES['denoise_distill'](out, {'label': labels})
    ref = 0.0
    for i in range(b):
        y = int(labels[i])
        q = (exo_cam[i, :, y].unsqueeze(1) * exo_keys[i]).mean(0).mean(-1).mean(-1)
        q = q / q.norm()
        pos = (ego_cam[i, y].unsqueeze(0) * ego_keys[i]).mean(-1).mean(-1)
        neg = (exo_cam[i, :, c:].unsqueeze(2) * exo_keys[i].unsqueeze(1)).mean(0).mean(-1) \
            .mean(-1)
        keys = torch.cat([pos[None], neg])
        keys = keys / keys.norm(dim=-1, keepdim=True)
        s = keys @ q
        ref += float(-torch.log(torch.exp(s[0]) / torch.exp(s).sum()))
    assert got.item() == pytest.approx(ref / b, rel=1e-5)


def test_modularity_hand_value():
    # two orthogonal pairs of identical patches, hard assignment to the right pairs
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]])
    sim = torch.tensor([[[2.0, 1.0], [2.0, 1.0], [1.0, 2.0], [1.0, 2.0]]])
    # A = two disjoint edges: 2m = 4, degrees 1; Q = (1/4)(4 - (2^2 + 2^2)/4) = 0.5
    assert modularity(x, sim, tau=1e-3).item() == pytest.approx(0.5, abs=1e-6)
    wrong = torch.tensor([[[2.0, 1.0], [1.0, 2.0], [2.0, 1.0], [1.0, 2.0]]])
    assert modularity(x, wrong, tau=1e-3).item() == pytest.approx(-0.5, abs=1e-6)
    # a common component hides the structure unless the descriptors are centred: uncentred,
    # the graph is almost complete (K4: Q of two pairs = (4 - 2 * 6^2 / 12) / 12 = -1/6)
    shifted = x + torch.tensor([10.0, 10.0])
    assert modularity(shifted, sim, tau=1e-3).item() == pytest.approx(0.5, abs=1e-6)
    uncentred = modularity(shifted, sim, tau=1e-3, center=False).item()
    assert uncentred == pytest.approx(-1 / 6, abs=2e-3)


# --------------------------------------------------------------------------------- clusterer
def _official_cluster_forward(c: Clusterer, x: torch.Tensor) -> torch.Tensor:
    """The reference forward written out: queries are always the initial tokens."""
    b = x.shape[0]
    query = c.tokens.weight.unsqueeze(0).expand(b, -1, -1)
    q0 = query.permute(1, 0, 2)
    xs = x.permute(1, 0, 2)
    for ca, sa, norm, ffn in zip(c.cross_attn_layers, c.self_attn_layers, c.norm_layers,
                                 c.ffn_layers):
        query = query + ca(q0, xs, xs)[0].permute(1, 0, 2)
        query = query + sa(q0, q0, q0)[0].permute(1, 0, 2)
        query = query + ffn(query)
        query = norm(query)
    return F.normalize(x, dim=-1) @ F.normalize(query, dim=-1).transpose(1, 2) + 1


def test_clusterer_matches_reference_and_official_conversion(tmp_path):
    torch.manual_seed(0)
    heads, dim = 3, 48
    official = Clusterer(4, dim, num_layers=2, num_heads=8).eval()
    keys = torch.randn(2, 16, dim)  # our head-major order
    perm = key_channel_perm(dim, heads)
    keys_official = keys[..., perm]  # the reference's d-major order
    with torch.no_grad():
        ref = _official_cluster_forward(official, keys_official)
        torch.testing.assert_close(official(keys_official), ref)
        ours = Clusterer(4, dim, num_layers=2, num_heads=8).eval()
        ours.load_state_dict(convert_official_clusterer(official.state_dict(), heads))
        torch.testing.assert_close(ours(keys), ref, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(official(keys), ref, atol=1e-3)  # the order matters
    # an official file (raw state dict) is converted on load, ours is not
    torch.save(official.state_dict(), tmp_path / 'cluster_seen.pth')
    loaded = load_clusterer(tmp_path / 'cluster_seen.pth', Clusterer(4, dim, 2, 8), heads)
    save_clusterer(loaded, tmp_path / 'ours.pt', backbone='vit_test')
    again = load_clusterer(tmp_path / 'ours.pt', Clusterer(4, dim, 2, 8), heads)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(keys), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(FileNotFoundError, match='affordance-train-clusterer'):
        load_clusterer(tmp_path / 'missing.pth', Clusterer(4, dim, 2, 8), heads)


def test_clusterer_cli_trains_and_looptrans_uses_it(tmp_path, tiny_agd):
    from affordance_core.cli.clusterer import main
    root = tiny_agd
    out = tmp_path / 'cluster.pt'
    assert main(['--data', str(root), '--backbone', 'vit_test', '--image-size', '64',
                 '--epochs', '3', '--lr', '1e-3', '--out', str(out), '--device', 'cpu',
                 '--views', 'ego+exo', '--no-progress']) == 0
    summary = json.loads((tmp_path / 'cluster.pt.json').read_text())
    assert summary['images'] == 18 and len(summary['modularity']) == 3
    assert summary['modularity'][-1] > summary['modularity'][0]
    m = looptrans_test(num_classes=C, clusterer_weights=str(out))
    assert m.cluster is not None and not any(p.requires_grad for p in m.cluster.parameters())
    keys = m.backbone(torch.randn(2, 3, 64, 64)).keys
    parts = m.parts(keys)
    assert parts.shape == (2, 4, 4) and parts.max() < 4
    assert main(['--data', str(tmp_path / 'nope'), '--out', str(out), '--backbone',
                 'vit_test']) == 2


# --------------------------------------------------------------------------------- converter
@pytest.mark.parametrize('name', ['locate_test', 'looptrans_test'])
def test_official_round_trip_reproduces_heatmaps(name, tmp_path, data):
    ego, _, _ = data
    method = name.split('_')[0]
    torch.manual_seed(2)
    ours = create_model(name, num_classes=36)
    with torch.no_grad():  # non-trivial BN statistics
        for mod in ours.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    ours.eval()
    state = to_official(method, ours)
    assert any(k.startswith('vit_model.blocks.') for k in state)
    torch.save(state, tmp_path / 'official.pth')
    back = from_official(method, read_official(tmp_path / 'official.pth'), model=name)
    assert back.classes[0] == 'beat' and back.num_classes == 36  # the Seen list, inferred
    for c in (0, 7, 35):
        assert torch.equal(ours.predict(ego, c), back.predict(ego, c))
    # the official head on official (d-major) keys gives our maps: the permutation is needed
    raw = create_model(name, num_classes=36).eval()
    raw.load_state_dict({**{k: v for k, v in ours.state_dict().items()
                            if k.startswith('backbone.')},
                         **{k: v for k, v in state.items() if not k.startswith('vit_model.')}})
    feats = ours.backbone(ego)
    perm = key_channel_perm(feats.keys.shape[1], ours.backbone.num_heads)
    official_keys = {'keys': feats.keys[:, perm], 'cls_attn': feats.cls_attn}
    torch.testing.assert_close(raw.cams(feats=official_keys), ours.cams(feats=feats),
                               atol=1e-5, rtol=1e-5)
    assert not torch.allclose(raw.cams(feats=feats), ours.cams(feats=feats), atol=1e-3)


def test_convert_cli(tmp_path, data, capsys):
    from affordance_core.cli.convert import main

    ego, _, _ = data
    torch.manual_seed(3)
    ours = create_model('looptrans_test', num_classes=25).eval()
    state = to_official('looptrans', ours)
    torch.save({'state_dict': {f'module.{k}': v for k, v in state.items()}},
               tmp_path / 'lt.pth')
    out = tmp_path / 'lt.pt'
    assert main(['--from', 'official', '--method', 'looptrans', str(tmp_path / 'lt.pth'),
                 str(out), '--model', 'looptrans_test']) == 0
    model = load_checkpoint(out)
    assert model.classes[0] == 'carry' and len(model.classes) == 25  # Unseen
    assert torch.equal(model.predict(ego, 3), ours.predict(ego, 3))
    assert main(['--from', 'official', '--method', 'locate', str(tmp_path / 'lt.pth'),
                 str(out), '--model', 'locate_test']) == 2  # LoopTrans file as LOCATE
    assert 'unknown LOCATE keys' in capsys.readouterr().err
    assert main(['--from', 'official', '--method', 'locate', str(tmp_path / 'none.pth'),
                 str(out)]) == 2
    (tmp_path / 'bad.pth').write_bytes(b'not a torch file')
    assert main(['--from', 'official', '--method', 'locate', str(tmp_path / 'bad.pth'),
                 str(out)]) == 2


# --------------------------------------------------------------------------------- trainer
def test_trainer_runs_the_looptrans_recipe(tmp_path, tiny_agd):
    from affordance_core.engine.trainer import Trainer
    root = tiny_agd
    cfg = load_config(ExperimentConfig, 'training/configs/looptrans_seen.yaml', [
        'model.name=looptrans_test', f'data.root={root}', 'data.image_size=64',
        'data.resize=72', 'data.num_workers=0', 'train.batch_size=4', 'train.epochs=1',
        'train.device=cpu', 'train.tensorboard=false', f'train.output_dir={tmp_path / "run"}',
        'train.cache_features=true'])
    summary = Trainer(cfg, progress=False).fit()
    assert math.isfinite(summary['best']['KLD'])
    model = load_checkpoint(tmp_path / 'run' / 'best.pt')
    assert isinstance(model, LoopTrans) and model.aff_fc.out_channels == 36 + 15
