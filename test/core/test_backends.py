"""Inference backends (torch / onnxruntime / tensorrt guard), create_backend, affordance-export."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from affordance_core.checkpoint import save_checkpoint
from affordance_core.export.tensorrt import TensorRTUnavailableError
from affordance_core.export.wrapper import file_sha256
from affordance_core.inference import create_backend
from affordance_core.inference import backends as backends_mod
from affordance_core.inference.backends import (BACKEND_KINDS, OnnxRuntimeBackend, TorchBackend,
                                                available_backends)
from affordance_core.registry import create_model

torch.set_num_threads(1)
pytest.importorskip('onnx')
pytest.importorskip('onnxruntime')

CLASSES = ('hold', 'cut_with', 'pour', 'open', 'drink_with')
SIZE = 64  # locate_test: patch 16 -> 4x4 CAMs; fast
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason='auto picks differ with a GPU')


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model('locate_test', classes=list(CLASSES))
    return save_checkpoint(model, tmp_path_factory.mktemp('ckpt') / 'tiny.pt')


@pytest.fixture()
def images():
    return np.random.default_rng(0).standard_normal((3, 3, SIZE, SIZE)).astype(np.float32)


def test_torch_and_onnxruntime_agree(ckpt, tmp_path, images):
    tb = create_backend('torch', checkpoint=ckpt, device='cpu', image_size=SIZE)
    ob = create_backend('onnxruntime', checkpoint=ckpt, device='cpu', cache_dir=tmp_path,
                        image_size=SIZE)
    assert isinstance(tb, TorchBackend) and isinstance(ob, OnnxRuntimeBackend)
    tc, tm = tb(images)
    oc, om = ob(images)  # fixed-batch-1 graph, batch of 3 runs image by image
    assert tc.shape == oc.shape == (3, 5, 4, 4) and tm.shape == om.shape == (3, 5, SIZE, SIZE)
    assert tm.dtype == om.dtype == np.float32
    assert np.abs(tm - om).max() <= 1e-4 and np.abs(tc - oc).max() <= 1e-4
    # the torch backend is model.predict for every class
    model = tb.wrapper.model
    with torch.no_grad():
        ref = model.predict(torch.from_numpy(images), 3).numpy()
    assert np.abs(tm[:, 3] - ref).max() <= 1e-6
    for attr in ('classes', 'input_size', 'mean', 'std', 'model_name', 'grid_size'):
        assert getattr(tb, attr) == getattr(ob, attr), attr
    assert tb.classes == CLASSES and tb.input_size == SIZE and tb.model_name == 'locate_test'
    assert (tb.name, ob.name, tb.device, ob.device) == ('torch', 'onnxruntime', 'cpu', 'cpu')
    assert ob.metadata.checkpoint_sha256 == file_sha256(ckpt) == tb.metadata.checkpoint_sha256
    assert tb.warmup(2) > 0 and ob.warmup(1) > 0


@cpu_only
def test_auto_picks_onnxruntime_and_caches_the_export(ckpt, tmp_path, images, monkeypatch):
    assert available_backends() == ['onnxruntime', 'torch']
    backend = create_backend('auto', checkpoint=ckpt, cache_dir=tmp_path, image_size=SIZE)
    assert backend.name == 'onnxruntime' and backend.device == 'cpu'
    exported = list((tmp_path / 'onnx').iterdir())
    assert len(exported) == 1 and exported[0].name.startswith(file_sha256(ckpt)[:16])

    import affordance_core.export.onnx as onnx_mod

    def no_export(*args, **kwargs):
        raise AssertionError('the cached export should have been reused')

    monkeypatch.setattr(onnx_mod, 'export_onnx', no_export)
    again = create_backend('auto', checkpoint=ckpt, cache_dir=tmp_path, image_size=SIZE)
    assert again.name == 'onnxruntime' and np.array_equal(again(images)[1], backend(images)[1])


@cpu_only
def test_auto_falls_back_to_torch_without_onnxruntime(ckpt, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'onnxruntime', None)
    assert available_backends() == ['torch']
    backend = create_backend('auto', checkpoint=ckpt, cache_dir=tmp_path, image_size=SIZE)
    assert backend.name == 'torch' and backend.device == 'cpu'
    assert not (tmp_path / 'onnx').exists()
    with pytest.raises(ImportError, match='pip install onnxruntime'):
        create_backend('onnxruntime', checkpoint=ckpt, cache_dir=tmp_path)


def test_onnxruntime_backend_from_the_onnx_alone(ckpt, tmp_path, images):
    from affordance_core.export.onnx import export_checkpoint_onnx

    path = export_checkpoint_onnx(ckpt, tmp_path / 'm.onnx', image_size=SIZE)
    backend = create_backend('auto' if not torch.cuda.is_available() else 'onnxruntime',
                             onnx_path=path)
    assert backend.name == 'onnxruntime'
    assert backend.classes == CLASSES and backend.input_size == SIZE
    assert backend.grid_size == (4, 4) and backend.std == (0.229, 0.224, 0.225)
    assert backend(images[:1])[1].shape == (1, 5, SIZE, SIZE)


def test_missing_files_and_unknown_kinds(ckpt, tmp_path):
    with pytest.raises(FileNotFoundError, match='checkpoint not found: .*nope.pt'):
        create_backend('torch', checkpoint=tmp_path / 'nope.pt')
    with pytest.raises(FileNotFoundError, match='ONNX model not found: .*nope.onnx'):
        create_backend('auto', onnx_path=tmp_path / 'nope.onnx')
    with pytest.raises(FileNotFoundError, match='TensorRT engine not found: .*engine.ep'):
        create_backend('tensorrt', engine_path=tmp_path / 'engine.ep')
    with pytest.raises(FileNotFoundError, match='ONNX model not found'):
        OnnxRuntimeBackend(tmp_path / 'nope.onnx')
    with pytest.raises(ValueError) as info:
        create_backend('openvino', checkpoint=ckpt)
    assert "unknown backend kind 'openvino'" in str(info.value)
    assert all(kind in str(info.value) for kind in BACKEND_KINDS)
    with pytest.raises(ValueError, match='needs checkpoint=..., onnx_path=... or engine_path'):
        create_backend('auto')
    with pytest.raises(ValueError, match='torch backend needs checkpoint'):
        create_backend('torch', onnx_path=ckpt)  # any existing file; torch needs a checkpoint
    with pytest.raises(ValueError, match="device 'gpu7'"):
        create_backend('torch', checkpoint=ckpt, device='gpu7')


def test_tensorrt_kind_without_torch_tensorrt(ckpt, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'torch_tensorrt', None)
    with pytest.raises(TensorRTUnavailableError) as info:
        create_backend('tensorrt', checkpoint=ckpt, cache_dir=tmp_path)
    assert 'pip install torch-tensorrt' in str(info.value) and 'CUDA GPU' in str(info.value)
    engine = tmp_path / 'engine.ep'
    engine.write_bytes(b'x')
    (tmp_path / 'engine.json').write_text('{"format": "affordance_ros.tensorrt_engine", '
                                          '"key": {}, "metadata": {}}')
    with pytest.raises(ImportError, match='pip install torch-tensorrt'):
        backends_mod.TensorRTBackend(engine)


def test_backend_input_validation(ckpt):
    backend = TorchBackend.from_checkpoint(ckpt, image_size=SIZE)
    with pytest.raises(ValueError, match='preprocess_rgb'):
        backend(np.zeros((1, 3, SIZE, SIZE), dtype=np.uint8))
    with pytest.raises(ValueError, match=r'\(B, 3, 64, 64\), got \(3, 64, 64\)'):
        backend(np.zeros((3, SIZE, SIZE), dtype=np.float32))
    with pytest.raises(ValueError, match='numpy array'):
        backend([[0.0]])
    x = np.random.default_rng(1).standard_normal((1, 3, SIZE, SIZE))
    cams, maps = backend(torch.from_numpy(x))  # float64 tensor: cast to float32 numpy
    assert maps.dtype == np.float32 and cams.dtype == np.float32
    assert np.array_equal(maps, backend(x.astype(np.float32))[1])


def test_compile_failure_falls_back_to_eager(ckpt, images, monkeypatch, caplog):
    def broken_compile(module, **kwargs):
        def run(*args):
            raise RuntimeError('inductor: no C++ compiler')
        return run

    monkeypatch.setattr(torch, 'compile', broken_compile)
    backend = TorchBackend.from_checkpoint(ckpt, image_size=SIZE, compile=True)
    assert backend.compiled
    with caplog.at_level('WARNING', logger='affordance_core.inference.backends'):
        _, maps = backend(images)
    assert not backend.compiled and 'falling back to eager' in caplog.text
    _, ref = TorchBackend.from_checkpoint(ckpt, image_size=SIZE)(images)
    assert np.array_equal(maps, ref)


# ------------------------------------------------------------------------------- CLI
def test_export_cli_help_lists_every_option(capsys):
    from affordance_core.cli.export import main

    with pytest.raises(SystemExit) as info:
        main(['--help'])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ('--checkpoint', '--format', '--out', '--opset', '--precision', '--device',
                 '--image-size', '--no-verify', 'onnx', 'tensorrt', 'fp16'):
        assert flag in out, flag


def test_export_cli_onnx_end_to_end(ckpt, tmp_path, capsys, images):
    from affordance_core.cli.export import main

    code = main(['--checkpoint', str(ckpt), '--format', 'onnx', '--out', str(tmp_path / 'o'),
                 '--image-size', str(SIZE)])
    out = capsys.readouterr().out
    path = tmp_path / 'o' / 'tiny.onnx'
    assert code == 0 and path.is_file() and str(path) in out
    err = float(out.split('max |dmaps| = ')[1].split()[0])
    assert err <= 1e-4
    backend = OnnxRuntimeBackend(path, device='cpu')
    assert backend.classes == CLASSES
    assert backend.metadata.checkpoint_sha256 == file_sha256(ckpt)


def test_export_cli_int8_within_its_budget(ckpt, tmp_path, capsys, images):
    """--quantize int8 writes a second model: metadata kept, maps within the int8 budget."""
    from affordance_core.cli.export import main
    from affordance_core.export.onnx import INT8_PARITY_BUDGET

    code = main(['--checkpoint', str(ckpt), '--format', 'onnx', '--out', str(tmp_path / 'o'),
                 '--image-size', str(SIZE), '--quantize', 'int8'])
    out = capsys.readouterr().out
    path = tmp_path / 'o' / 'tiny.int8.onnx'
    assert code == 0 and path.is_file() and out.strip().endswith(str(path))
    line = next(ln for ln in out.splitlines() if ln.startswith('tiny.int8.onnx'))
    err = float(line.split('max |dmaps| = ')[1].split()[0])
    assert 1e-6 < err <= INT8_PARITY_BUDGET  # quantized: not exact, but within budget
    import onnx
    proto = onnx.load(str(path))
    assert any(n.op_type in ('MatMulInteger', 'DynamicQuantizeLinear') for n in proto.graph.node)
    backend = OnnxRuntimeBackend(path, device='cpu')
    assert backend.classes == CLASSES
    fp32 = OnnxRuntimeBackend(tmp_path / 'o' / 'tiny.onnx', device='cpu')
    _, maps8 = backend(images)
    _, maps32 = fp32(images)
    assert np.abs(maps8 - maps32).max() <= INT8_PARITY_BUDGET


def test_export_cli_user_errors_exit_2_with_one_line(ckpt, tmp_path, capsys, monkeypatch):
    from affordance_core.cli.export import main

    monkeypatch.setitem(sys.modules, 'torch_tensorrt', None)
    code = main(['--checkpoint', str(ckpt), '--format', 'tensorrt', '--out', str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith('affordance-export: error:')
    assert 'pip install torch-tensorrt' in err[0]
    assert not (tmp_path / 'engine.ep').exists()

    code = main(['--checkpoint', str(tmp_path / 'missing.pt'), '--format', 'onnx',
                 '--out', str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and 'checkpoint not found' in err[0]

    code = main(['--checkpoint', str(ckpt), '--format', 'onnx', '--out', str(tmp_path),
                 '--opset', '11'])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and 'opset must be an int >= 17' in err[0]
