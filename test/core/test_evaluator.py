"""AffordanceEvaluator, writers, overlays / curves, evaluate_model / evaluate_baseline and the CLI.

Everything runs on fakes (a list of dicts as the dataset, a tiny object with predict_raw as the
model), so nothing here depends on the data or model modules.
"""
from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from affordance_core.engine.evaluation import evaluate_baseline, evaluate_model
from affordance_core.metrics import kld, normalize_map, nss, sim
from affordance_core.metrics.baselines import center_prior
from affordance_core.metrics.evaluator import (AffordanceEvaluator, format_comparison,
                                               format_table, write_json, write_markdown)
from affordance_core.viz import overlay, save_overlay, save_training_curves, side_by_side

CLASSES = ('cut', 'hold', 'open')
S = 224


def _blob(cy: int, cx: int, size: int = S, r: int = 20) -> np.ndarray:
    m = np.zeros((size, size), np.float64)
    m[max(cy - r, 0):cy + r, max(cx - r, 0):cx + r] = 1.0
    return m


# ---------------------------------------------------------------------------------------------
# evaluator
# ---------------------------------------------------------------------------------------------


def test_overall_is_mean_over_images_not_over_classes():
    # two 'cut' images predicted perfectly (SIM 1), one 'hold' image predicted on a disjoint blob
    # (SIM 0): per-image mean = 2/3, a per-class mean would give (1 + 0) / 2 = 0.5
    ev = AffordanceEvaluator(CLASSES, postprocess='none')
    g1, g2, g3 = _blob(50, 50), _blob(120, 80), _blob(170, 170)
    ev.process(np.stack([g1, g2]), np.stack([g1, g2]), [0, 0], ['a', 'b'])
    ev.process(torch.from_numpy(_blob(40, 40)[None]), g3[None], torch.tensor([1]), ['c'])
    res = ev.evaluate()
    assert res['overall']['count'] == 3
    assert res['overall']['SIM'] == pytest.approx(2 / 3, abs=1e-9)
    assert res['per_class']['cut']['SIM'] == pytest.approx(1.0, abs=1e-9)
    assert res['per_class']['cut']['count'] == 2
    assert res['per_class']['hold']['SIM'] == pytest.approx(0.0, abs=1e-12)
    assert 'open' not in res['per_class']  # only classes that occur
    expected_kld = (kld(g1, g1) + kld(g2, g2) + kld(_blob(40, 40), g3)) / 3
    assert res['overall']['KLD'] == pytest.approx(expected_kld, rel=1e-12)
    assert res['per_image']['c']['class'] == 'hold'
    assert res['per_image']['c']['SIM'] == pytest.approx(0.0, abs=1e-12)
    assert res['invalid'] == 0
    ev.reset()
    assert len(ev) == 0


def test_locate_postprocess_is_applied_to_raw_maps():
    rng = np.random.default_rng(3)
    raw = rng.random((2, 14, 14)).astype(np.float32) * 10 - 4
    gts = rng.random((2, S, S))
    ev = AffordanceEvaluator(CLASSES)
    recs = ev.process(raw, gts, np.array([2, 1]), ['x', 'y'])
    for i in range(2):
        pred = normalize_map(raw[i])
        assert recs[i]['KLD'] == kld(pred, gts[i])
        assert recs[i]['SIM'] == sim(pred, gts[i])
        assert recs[i]['NSS'] == nss(pred, gts[i])


def test_nonfinite_metrics_are_counted_not_averaged():
    ev = AffordanceEvaluator(CLASSES, postprocess='none')
    g = _blob(100, 100)
    ev.process(np.stack([g, np.full((S, S), 0.5)]), np.stack([g, g]), [0, 1], ['good', 'flat'])
    res = ev.evaluate()
    assert res['invalid'] == 1 and res['invalid_keys'] == ['flat']
    assert res['nonfinite'] == {'KLD': 0, 'SIM': 0, 'NSS': 1}
    assert math.isnan(res['per_image']['flat']['NSS'])
    # NSS averaged over the finite image only; SIM over both
    assert res['overall']['NSS'] == pytest.approx(res['per_image']['good']['NSS'], rel=1e-12)
    assert res['overall']['SIM'] == pytest.approx(
        (1.0 + res['per_image']['flat']['SIM']) / 2, abs=1e-9)
    assert math.isnan(res['per_class']['hold']['NSS'])


def test_double_postprocess_on_constant_map_is_all_nan_locate_is_finite():
    g = _blob(60, 60)[None]
    raw = np.full((1, 14, 14), 3.0, np.float32)
    loc = AffordanceEvaluator(CLASSES, postprocess='locate')
    rec = loc.process(raw, g, [0], ['k'])[0]
    # all-zero prediction against a uniform 40x40 blob (G' = 1/1600 on 1600 pixels):
    # KLD = log((1/1600) / 1e-12) = log(1e12) - log(1600) = 27.6310211 - 7.3777589 = 20.2532622;
    # SIM = 0; NSS = nan (std 0)
    assert rec['KLD'] == pytest.approx(20.2532622, abs=1e-6)
    assert rec['SIM'] == 0.0 and math.isnan(rec['NSS'])
    dbl = AffordanceEvaluator(CLASSES, postprocess='double')
    rec = dbl.process(raw, g, [0], ['k'])[0]
    assert all(math.isnan(rec[m]) for m in ('KLD', 'SIM', 'NSS'))


def test_evaluator_input_errors():
    ev = AffordanceEvaluator(CLASSES)
    raw, gts = np.zeros((2, 14, 14)), np.zeros((2, S, S))
    with pytest.raises(ValueError, match=r'gts must be \(B, 224, 224\)'):
        ev.process(raw, np.zeros((2, 100, 100)), [0, 1], ['a', 'b'])
    with pytest.raises(ValueError, match=r'labels must lie in \[0, 3\)'):
        ev.process(raw, gts, [0, 3], ['a', 'b'])
    with pytest.raises(ValueError, match='integer'):
        ev.process(raw, gts, [0.0, 1.0], ['a', 'b'])
    with pytest.raises(ValueError, match='B=2'):
        ev.process(raw, gts, [0, 1], ['a'])
    with pytest.raises(ValueError, match='processed twice'):
        ev.process(raw, gts, [0, 1], ['a', 'a'])
    ev.process(raw + np.arange(196).reshape(14, 14), gts, [0, 1], ['a', 'b'])
    with pytest.raises(ValueError, match='processed twice'):
        ev.process(raw, gts, [0, 1], ['b', 'c'])
    with pytest.raises(ValueError, match='postprocess'):
        AffordanceEvaluator(CLASSES, postprocess='blur')
    with pytest.raises(ValueError, match=r"postprocess='none' needs \(224, 224\)"):
        AffordanceEvaluator(CLASSES, postprocess='none').process(raw, gts, [0, 1], None)


def test_writers(tmp_path):
    ev = AffordanceEvaluator(CLASSES, postprocess='none')
    g = _blob(100, 100)
    ev.process(np.stack([g, np.full((S, S), 0.5), _blob(30, 30)]), np.stack([g, g, g]),
               [2, 0, 2], ['k1', 'k2', 'k3'])
    res = ev.evaluate()
    js = json.loads(write_json(res, tmp_path / 'm.json').read_text())  # strict JSON
    assert js['per_image']['k2']['NSS'] is None  # nan -> null
    assert js['overall']['count'] == 3 and js['invalid'] == 1
    assert js['overall']['SIM'] == pytest.approx(res['overall']['SIM'])
    md = write_markdown(res, tmp_path / 'sub' / 'm.md', title='Test run').read_text()
    lines = md.splitlines()
    assert lines[0] == '# Test run'
    rows = [ln for ln in lines if ln.startswith('| ') and not ln.startswith('| class')]
    ov = res['overall']
    assert rows[0] == (f"| **overall** | 3 | {ov['KLD']:.3f} | {ov['SIM']:.3f} | "
                       f"{ov['NSS']:.3f} |")
    assert rows[1].startswith('| cut | 1 |') and rows[1].endswith('| nan |')
    assert rows[2].startswith('| open | 2 |')
    assert 'k2' in md
    table = format_table(res)
    assert table.splitlines()[2].split()[:2] == ['overall', '3']
    assert f"{ov['SIM']:.3f}" in table
    comp = format_comparison({'model': res, 'center prior': res}).splitlines()
    assert comp[2].startswith('model') and comp[3].startswith('center prior')


# ---------------------------------------------------------------------------------------------
# viz
# ---------------------------------------------------------------------------------------------


def test_overlay_blends_and_resizes():
    rgb = np.full((5, 7, 3), 200, np.uint8)
    hm = np.zeros((2, 2), np.float32)
    out = overlay(rgb, hm, alpha=0.5)
    assert out.shape == (5, 7, 3) and out.dtype == np.uint8
    jet0 = cv2.applyColorMap(np.zeros((1, 1), np.uint8), cv2.COLORMAP_JET)[0, 0][::-1]  # RGB
    np.testing.assert_array_equal(out[0, 0], np.round(0.5 * 200 + 0.5 * jet0.astype(float)))
    np.testing.assert_array_equal(overlay(rgb, hm, alpha=0.0), rgb)
    full = overlay(rgb, np.ones((5, 7)), alpha=1.0)
    jet1 = cv2.applyColorMap(np.full((1, 1), 255, np.uint8), cv2.COLORMAP_JET)[0, 0][::-1]
    np.testing.assert_array_equal(full[2, 3], jet1)
    assert overlay(rgb, torch.rand(3, 3)).shape == (5, 7, 3)


def test_overlay_matches_applycolormap_and_the_float_blend():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    hm = rng.random((48, 64)).astype(np.float32)
    hm8 = np.clip(np.round(hm * 255.0), 0, 255).astype(np.uint8)
    jet = cv2.cvtColor(cv2.applyColorMap(hm8, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(overlay(rgb, hm, alpha=1.0), jet)  # the table is exact
    viridis = cv2.cvtColor(cv2.applyColorMap(hm8, cv2.COLORMAP_VIRIDIS), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(overlay(rgb, hm, 1.0, cv2.COLORMAP_VIRIDIS), viridis)
    ref = np.round(0.55 * rgb.astype(np.float64) + 0.45 * jet.astype(np.float64))
    diff = np.abs(overlay(rgb, hm, alpha=0.45).astype(np.float64) - ref)
    assert diff.max() <= 1 and diff.mean() < 0.01


def test_overlay_errors():
    rgb = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match='uint8'):
        overlay(rgb.astype(np.float32), np.zeros((4, 4)))
    with pytest.raises(ValueError, match=r'\(H, W, 3\)'):
        overlay(np.zeros((4, 4), np.uint8), np.zeros((4, 4)))
    with pytest.raises(ValueError, match='2-D'):
        overlay(rgb, np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match=r'\[0, 1\]'):
        overlay(rgb, np.full((4, 4), 3.0))
    with pytest.raises(ValueError, match='nan'):
        overlay(rgb, np.full((4, 4), np.nan))
    with pytest.raises(ValueError, match='float'):
        overlay(rgb, np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match='alpha'):
        overlay(rgb, np.zeros((4, 4)), alpha=1.5)


def test_side_by_side_save_overlay_and_curves(tmp_path):
    a = np.zeros((10, 20, 3), np.uint8)
    b = np.zeros((20, 20), np.uint8)  # grey, taller: resized to height 10 -> width 10
    out = side_by_side([a, b], ['a', 'b'], pad=4)
    assert out.shape == (10 + 24, 20 + 4 + 10, 3)
    assert side_by_side([a]).shape == (10, 20, 3)
    with pytest.raises(ValueError, match='labels'):
        side_by_side([a, a], ['x'])
    p = save_overlay(tmp_path / 'o' / 'x.png', a, np.ones((2, 2)), title='hello')
    assert cv2.imread(str(p)).shape == (10 + 24, 20, 3)
    hist = [{'epoch': 1, 'loss': 2.0, 'KLD': 1.5}, {'epoch': 2, 'loss': 1.0},
            {'epoch': 3, 'loss': 0.5, 'KLD': 1.3, 'note': 'text is ignored'}]
    img = cv2.imread(str(save_training_curves(hist, tmp_path / 'curves.png',
                                              panel_size=(300, 200), columns=3)))
    assert img.shape == (200, 600, 3)  # two panels (loss, KLD) side by side
    assert (img < 250).any()           # something was drawn
    with pytest.raises(ValueError, match='non-empty'):
        save_training_curves([], tmp_path / 'c.png')
    with pytest.raises(ValueError, match='no finite numeric'):
        save_training_curves([{'epoch': 1}], tmp_path / 'c.png')


# ---------------------------------------------------------------------------------------------
# evaluate_model / evaluate_baseline with fakes
# ---------------------------------------------------------------------------------------------


class FakeModel:
    """predict_raw: a 14x14 map with a bright cell whose position depends on the class id."""

    classes = CLASSES
    registry_name = 'fake_model'

    def __init__(self) -> None:
        self.training = True
        self.calls = 0
        self.devices: list[torch.device] = []

    def eval(self) -> FakeModel:
        self.training = False
        return self

    def train(self, mode: bool = True) -> FakeModel:
        self.training = mode
        return self

    @staticmethod
    def raw_map(label: int) -> torch.Tensor:
        m = torch.zeros(14, 14)
        m[3 + 3 * label, 4 + 2 * label] = 1.0
        m[7, 7] = 0.25
        return m

    def predict_raw(self, images: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        assert not self.training and images.shape[1:] == (3, 32, 32)
        self.calls += 1
        self.devices.append(images.device)
        return torch.stack([self.raw_map(int(c)) for c in class_ids])


def _fake_dataset(tmp_path: Path, n: int = 5) -> list[dict]:
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        path = tmp_path / f'img{i}.jpg'
        if i != 1:  # item 1 has no file on disk: the overlay falls back to the input tensor
            cv2.imwrite(str(path), rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
        items.append({'image': torch.randn(3, 32, 32), 'label': i % 3,
                      'gt': _blob(40 + 30 * i, 60 + 20 * i).astype(np.float32),
                      'key': f'{CLASSES[i % 3]}_obj_img{i}.png', 'path': str(path)})
    return items


def test_evaluate_model_matches_manual_metrics_and_writes_files(tmp_path):
    data = _fake_dataset(tmp_path)
    model = FakeModel()
    res = evaluate_model(model, data, batch_size=2, out_dir=tmp_path / 'out', num_overlays=3,
                         progress=False)
    assert model.calls == 3 and model.training is True  # 5 images / batch 2; mode restored
    assert model.devices[0] == torch.device('cpu')
    per = []
    for it in data:
        pred = normalize_map(FakeModel.raw_map(it['label']).numpy())
        gt = it['gt'].astype(np.float64)
        per.append((kld(pred, gt), sim(pred, gt), nss(pred, gt)))
    for j, m in enumerate(('KLD', 'SIM', 'NSS')):
        assert res['overall'][m] == pytest.approx(np.mean([p[j] for p in per]), rel=1e-12)
    assert res['overall']['count'] == 5 and res['method'] == 'fake_model'
    assert list(res['per_class']) == list(CLASSES)
    assert res['per_class']['cut']['count'] == 2
    out = tmp_path / 'out'
    js = json.loads((out / 'metrics.json').read_text())
    assert js['overall']['count'] == 5 and len(js['per_image']) == 5
    assert '| **overall** | 5 |' in (out / 'metrics.md').read_text()
    pngs = sorted((out / 'overlays').glob('*.png'))
    assert [p.name for p in pngs] == ['000_cut_obj_img0.png', '001_hold_obj_img1.png',
                                      '002_open_obj_img2.png']
    assert cv2.imread(str(pngs[0])).shape == (40 + 24, 2 * 60 + 4, 3)  # original image size
    assert cv2.imread(str(pngs[1])).shape == (32 + 24, 2 * 32 + 4, 3)  # tensor fallback
    assert res['overlays'] == [str(p) for p in pngs]


def test_evaluate_model_without_out_dir_and_errors(tmp_path):
    data = _fake_dataset(tmp_path, n=2)
    res = evaluate_model(FakeModel(), data, progress=False, num_overlays=8)
    assert 'overlays' not in res and res['overall']['count'] == 2
    assert not any(tmp_path.glob('**/*.json'))

    class NoClasses:
        def predict_raw(self, images, class_ids):
            return torch.zeros(len(class_ids), 14, 14)

    with pytest.raises(ValueError, match='class names are unknown'):
        evaluate_model(NoClasses(), data, progress=False)
    res = evaluate_model(NoClasses(), data, classes=CLASSES, progress=False)
    assert res['nonfinite']['NSS'] == 2  # constant maps: counted, not hidden
    with pytest.raises(ValueError, match='predict_raw'):
        evaluate_model(object(), data, classes=CLASSES, progress=False)
    with pytest.raises(ValueError, match='empty'):
        evaluate_model(FakeModel(), [], progress=False)
    with pytest.raises(ValueError, match="no 'gt' entry"):
        evaluate_model(FakeModel(), [{'image': torch.zeros(3, 32, 32), 'label': 0, 'key': 'k'}],
                       progress=False)


def test_evaluate_baseline_center_prior(tmp_path):
    data = _fake_dataset(tmp_path, n=3)
    res = evaluate_baseline(data, 'center', classes=CLASSES, out_dir=tmp_path / 'base',
                            num_overlays=1, progress=False)
    prior = normalize_map(center_prior(S, S))
    expected = np.mean([sim(prior, it['gt'].astype(np.float64)) for it in data])
    assert res['overall']['SIM'] == pytest.approx(expected, rel=1e-12)
    assert res['method'] == 'center_prior' and res['sigma'] == 56.0
    assert json.loads((tmp_path / 'base' / 'metrics.json').read_text())['sigma'] == 56.0
    assert len(list((tmp_path / 'base' / 'overlays').glob('*.png'))) == 1
    with pytest.raises(ValueError, match='unknown baseline'):
        evaluate_baseline(data, 'uniform', classes=CLASSES)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def test_cli_help(capsys):
    from affordance_core.cli.evaluate import main

    with pytest.raises(SystemExit) as exc:
        main(['--help'])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert 'affordance-eval' in out and '--checkpoint' in out and '--baseline' in out


@pytest.mark.parametrize('args, message', [
    (['--checkpoint', 'MISSING', '--split', 'Seen'], 'checkpoint not found'),
    (['--checkpoint', 'x.pt', '--split', 'Sen'], "unknown split 'Sen'"),
    (['--split', 'Seen'], 'nothing to evaluate'),
    (['--checkpoint', 'x.pt', '--batch-size', '0'], '--batch-size must be positive'),
])
def test_cli_user_errors_exit_2_with_one_line(tmp_path, capsys, args, message):
    from affordance_core.cli.evaluate import main

    args = [a.replace('MISSING', str(tmp_path / 'nope.pt')) for a in args]
    assert main(['--data', str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith('affordance-eval: error: ') and message in err


def test_cli_missing_data_folder(tmp_path, capsys):
    from affordance_core.cli.evaluate import main

    assert main(['--checkpoint', 'x.pt', '--data', str(tmp_path / 'nodata')]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'data folder not found' in err


def test_cli_end_to_end_with_fakes(tmp_path, capsys, monkeypatch):
    import affordance_core.checkpoint as ckpt_mod
    from affordance_core.cli.evaluate import main
    from affordance_core.labels import classes_for

    seen = classes_for('Seen')
    items = _fake_dataset(tmp_path, n=3)
    calls = {}

    class FakeTest(list):
        num_skipped = 1

        def __init__(self, root, split, *, image_size=224, max_samples=0):
            calls['dataset'] = (Path(root), split, image_size, max_samples)
            super().__init__(items[:max_samples or None])

    model = FakeModel()
    model.classes = seen

    def fake_load(path, map_location='cpu'):
        calls['ckpt'] = (str(path), map_location)
        return model

    monkeypatch.setattr(ckpt_mod, 'load_checkpoint', fake_load)
    monkeypatch.setitem(sys.modules, 'affordance_core.data.agd20k',
                        types.SimpleNamespace(AGD20KTest=FakeTest))
    ckpt = tmp_path / 'run' / 'best.pt'
    rc = main(['--checkpoint', str(ckpt), '--data', str(tmp_path), '--split', 'Seen',
               '--device', 'cpu', '--batch-size', '2', '--max-images', '2', '--num-workers', '0',
               '--baseline', 'center', '--no-progress'])
    assert rc == 0
    assert calls['ckpt'] == (str(ckpt), 'cpu')
    assert calls['dataset'] == (tmp_path, 'Seen', 224, 2)
    out = capsys.readouterr().out
    assert 'overall' in out and 'center prior' in out and 'fake_model' in out
    out_dir = tmp_path / 'run' / 'eval_best_Seen'
    res = json.loads((out_dir / 'metrics.json').read_text())
    assert res['overall']['count'] == 2 and res['num_skipped'] == 1
    base = json.loads((out_dir / 'center_prior' / 'metrics.json').read_text())
    assert base['method'] == 'center_prior' and base['overall']['count'] == 2
    # a checkpoint trained on another split is refused as a user error
    model.classes = classes_for('Unseen')
    assert main(['--checkpoint', str(ckpt), '--data', str(tmp_path), '--split', 'Seen',
                 '--device', 'cpu']) == 2
    assert 'do not match split Seen' in capsys.readouterr().err
