"""AGD-Synth: layout, GT, determinism, Unseen split, hands, centre-prior hardness, CLI."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from affordance_core.cli.synth import main
from affordance_core.data import synth as S
from affordance_core.labels import AFFORDANCES_SEEN, AFFORDANCES_UNSEEN, OBJECTS, classes_for

REPO = Path(__file__).resolve().parents[2]
EPS = 1e-12


@pytest.fixture(scope='module')
def tiny(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp('synth') / 'agd'
    counts = S.generate(root, 'tiny', seed=0, progress=False)
    return root, counts


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob('*')) if p.is_file() and p.name != S.META_FILE}


def _test_specs(root: Path) -> list[S.SampleSpec]:
    specs = []
    for split in S.SPLITS:
        for p in sorted((root / split / 'testset' / 'egocentric').glob('*/*/*.jpg')):
            aff, obj = p.parent.parent.name, p.parent.name
            specs.append(S.SampleSpec(split, 'test', aff, obj, int(p.stem.rsplit('_', 1)[1])))
    return specs


# ---------------------------------------------------------------------------- official metric


def _kld(pred: np.ndarray, gt: np.ndarray) -> float:
    """methods.md §1.4: P'=P/(sum P+eps), G'=G/(sum G+eps), sum G' log(G'/(P'+eps)+eps)."""
    p = pred / (pred.sum() + EPS)
    g = gt / (gt.sum() + EPS)
    return float((g * np.log(g / (p + EPS) + EPS)).sum())


def _sim(pred: np.ndarray, gt: np.ndarray) -> float:
    return float(np.minimum(pred / (pred.sum() + EPS), gt / (gt.sum() + EPS)).sum())


def test_kld_helper_matches_hand_values():
    g = np.array([[1.0, 0.0]])
    assert _kld(np.array([[1.0, 1.0]]), g) == pytest.approx(math.log(2), abs=1e-9)
    assert _kld(np.array([[3.0, 1.0]]), g) == pytest.approx(math.log(4 / 3), abs=1e-9)
    assert _kld(g, g) == pytest.approx(0.0, abs=1e-9)
    assert _sim(np.array([[1.0, 1.0]]), g) == pytest.approx(0.5)


# ------------------------------------------------------------------------------------- layout


def test_layout_uses_official_names_and_counts(tiny):
    root, counts = tiny
    assert sorted(p.name for p in root.iterdir()) == ['Seen', 'Unseen', S.META_FILE]
    n_exo, n_ego, n_test = S.resolve_size('tiny')
    for split in S.SPLITS:
        classes = classes_for(split)
        base = root / split
        assert sorted(p.name for p in base.iterdir()) == ['testset', 'trainset']
        assert sorted(p.name for p in (base / 'trainset').iterdir()) == ['egocentric',
                                                                         'exocentric']
        assert sorted(p.name for p in (base / 'testset').iterdir()) == ['GT', 'egocentric']
        for sub, n, ext in (('trainset/exocentric', n_exo, '.jpg'),
                            ('trainset/egocentric', n_ego, '.jpg'),
                            ('testset/egocentric', n_test, '.jpg'),
                            ('testset/GT', n_test, '.png')):
            folders = sorted((base / sub).glob('*/*'))
            assert folders, f'{split}/{sub} is empty'
            for f in folders:
                assert f.parent.name in classes, f
                assert f.name in OBJECTS, f
                files = sorted(f.iterdir())
                assert len(files) == n, f
                assert all(x.suffix == ext and x.name.startswith(f.name + '_') for x in files)
        n_files = {k: len(list((base / d).glob('*/*/*'))) for k, d in (
            ('exocentric', 'trainset/exocentric'), ('egocentric', 'trainset/egocentric'),
            ('test', 'testset/egocentric'), ('gt', 'testset/GT'))}
        assert counts[split] == n_files
    # Seen: 26 (affordance, object) folders in train and test, same object categories
    seen_train = sorted(p.relative_to(root / 'Seen/trainset/exocentric')
                        for p in (root / 'Seen/trainset/exocentric').glob('*/*'))
    seen_test = sorted(p.relative_to(root / 'Seen/testset/GT')
                       for p in (root / 'Seen/testset/GT').glob('*/*'))
    assert seen_train == seen_test and len(seen_train) == 26
    assert counts['total'] == 26 * (3 + 1 + 2) + 14 * (3 + 1) + 11 * 2


def test_meta_describes_dataset(tiny):
    root, counts = tiny
    meta = json.loads((root / S.META_FILE).read_text())
    assert meta['complete'] is True and meta['seed'] == 0 and meta['size'] == 'tiny'
    assert meta['version'] == S.GENERATOR_VERSION
    assert meta['counts'] == json.loads(json.dumps(counts))
    assert meta['per_folder'] == {'exocentric': 3, 'egocentric': 1, 'test': 2}
    assert meta['affordance_parts']['knife'] == {'hold': 'handle', 'cut_with': 'blade',
                                                 'stick': 'tip'}
    assert set(meta['objects']) <= set(OBJECTS) and len(meta['objects']) == 10
    assert meta['objects_detail']['cup']['parts'] == ['handle', 'body', 'rim']
    assert meta['stats']['exo_hand_fraction_min'] > 0.005


def test_shared_affordances_sit_on_different_parts():
    hold = {obj: affs['hold'] for obj, affs in S.AFFORDANCE_PARTS.items() if 'hold' in affs}
    assert len(hold) == 10 and len(set(hold.values())) >= 5     # handle, body, grip, rings, stem
    multi = [o for o, affs in S.AFFORDANCE_PARTS.items() if len(set(affs.values())) >= 3]
    assert {'knife', 'bottle'} <= set(multi)
    assert S.split_folders('Seen', 'train').__len__() == 26
    seen_affs = {a for a, _ in S.split_folders('Seen', 'train')}
    assert len(seen_affs) == 9 and seen_affs <= set(AFFORDANCES_SEEN)


def test_every_test_image_has_matching_gt(tiny):
    root, _ = tiny
    for split in S.SPLITS:
        imgs = sorted((root / split / 'testset/egocentric').glob('*/*/*.jpg'))
        gts = sorted((root / split / 'testset/GT').glob('*/*/*.png'))
        assert [p.with_suffix('').relative_to(root / split / 'testset/egocentric') for p in imgs] \
            == [p.with_suffix('').relative_to(root / split / 'testset/GT') for p in gts]
        for ip, gp in zip(imgs, gts):
            img = cv2.imread(str(ip), cv2.IMREAD_UNCHANGED)
            gt = cv2.imread(str(gp), cv2.IMREAD_UNCHANGED)
            assert img.ndim == 3 and gt.ndim == 2 and gt.dtype == np.uint8
            assert gt.shape == img.shape[:2], ip
            assert gt.max() == 255


def test_image_sizes_vary_and_are_not_square(tiny):
    root, _ = tiny
    shapes = {cv2.imread(str(p)).shape[:2] for p in sorted(root.glob('Seen/*/*/*/*/*.jpg'))[:60]}
    widths = {w for _, w in shapes}
    assert len(shapes) > 30 and min(widths) >= 240 and max(widths) <= 420
    assert all(h != w for h, w in shapes)


# ------------------------------------------------------------------------ GT vs generator masks


def test_gt_lies_on_the_affordance_part(tiny):
    root, _ = tiny
    mass_in, half_in = [], []
    for spec in _test_specs(root):
        s = S.render_sample(spec, 0)
        on_disk = cv2.imread(str(root / spec.gt_relpath()), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(on_disk, s.gt)          # PNG is lossless
        obj = cv2.dilate(s.object_mask.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
        part = cv2.dilate(s.part_mask.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
        assert s.part_mask.any() and (s.part_mask & ~s.object_mask).sum() == 0
        peak = np.unravel_index(np.argmax(s.gt), s.gt.shape)
        assert part[peak], spec                                # the peak is on the part
        g = s.gt.astype(np.float64)
        mass_in.append(g[obj].sum() / g.sum())
        half = s.gt >= 128
        half_in.append((half & obj).sum() / half.sum())
    # the Gaussian tails spill beyond thin parts, but most of the heat is on the object
    assert np.mean(mass_in) > 0.7 and min(mass_in) > 0.45, (np.mean(mass_in), min(mass_in))
    assert np.mean(half_in) > 0.93 and min(half_in) > 0.6, (np.mean(half_in), min(half_in))


def test_gt_heatmap_is_a_peak_normalised_gaussian():
    region = np.zeros((60, 80), bool)
    region[20:30, 30:50] = True
    gt = S.gt_heatmap(region)
    assert gt.dtype == np.uint8 and gt.shape == (60, 80) and gt.max() == 255
    assert gt[25, 39] == 255 and gt[0, 0] == 0
    sigma = 0.2 * math.sqrt(200)
    ref = cv2.GaussianBlur(region.astype(np.float32), (0, 0), sigma)
    np.testing.assert_allclose(gt, np.round(ref / ref.max() * 255), atol=1)
    with pytest.raises(ValueError, match='empty'):
        S.gt_heatmap(np.zeros((5, 5), bool))


def test_centre_prior_is_clearly_bad(tiny):
    """Objects sit off-centre and parts are small: a centred Gaussian scores badly."""
    root, _ = tiny
    gts, dists = [], []
    for p in sorted(root.glob('*/testset/GT/*/*/*.png')):
        gt = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE).astype(np.float64)
        h, w = gt.shape
        ys, xs = np.mgrid[0:h, 0:w]
        cx, cy = (xs * gt).sum() / gt.sum(), (ys * gt).sum() / gt.sum()
        dists.append(math.hypot(cx - (w - 1) / 2, cy - (h - 1) / 2) / math.hypot(w, h))
        gts.append(cv2.resize(gt / 255.0, (224, 224)))
    assert len(gts) == 26 * 2 + 11 * 2
    yy, xx = np.mgrid[0:224, 0:224]
    best = {}
    for frac in (0.1, 0.15, 0.2, 0.3, 0.5):                 # the best centred prior we can pick
        prior = np.exp(-((xx - 111.5) ** 2 + (yy - 111.5) ** 2) / (2 * (frac * 224) ** 2))
        best[frac] = (np.mean([_kld(prior, g) for g in gts]),
                      np.mean([_sim(prior, g) for g in gts]))
    kld_best = min(v[0] for v in best.values())
    sim_best = max(v[1] for v in best.values())
    print(f'\nGT centroid distance from centre: {np.mean(dists):.3f} of the diagonal; centre '
          f'prior KLD {kld_best:.3f} SIM {sim_best:.3f} (AGD20K centre prior: KLD ~1.8-2.0)')
    assert np.mean(dists) > 0.15, np.mean(dists)
    assert kld_best > 2.5, best          # measured ~3.2 (AGD20K: ~1.8-2.0)
    assert sim_best < 0.15, best         # measured ~0.09


def test_object_silhouette_beats_centre_prior(tiny):
    """The task is learnable: knowing where the object is already helps a lot."""
    root, _ = tiny
    specs = _test_specs(root)[::2]
    yy, xx = np.mgrid[0:224, 0:224]
    prior = np.exp(-((xx - 111.5) ** 2 + (yy - 111.5) ** 2) / (2 * (0.3 * 224) ** 2))
    k_obj, k_ctr = [], []
    for spec in specs:
        s = S.render_sample(spec, 0)
        g = cv2.resize(s.gt / 255.0, (224, 224))
        sil = cv2.resize(cv2.GaussianBlur(s.object_mask.astype(np.float32), (0, 0), 3),
                         (224, 224)).astype(np.float64)
        k_obj.append(_kld(sil, g))
        k_ctr.append(_kld(prior, g))
    assert np.mean(k_obj) < np.mean(k_ctr) - 1.0, (np.mean(k_obj), np.mean(k_ctr))


# -------------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_bytes(tiny, tmp_path):
    root, _ = tiny
    again = tmp_path / 'again'
    S.generate(again, 'tiny', seed=0, progress=False, splits=('Unseen',))
    a = {k: v for k, v in _files(root).items() if k.startswith('Unseen')}
    b = _files(again)
    assert a.keys() == b.keys() and len(a) == 42 + 14 + 22 * 2
    assert all(a[k] == b[k] for k in a)


def test_content_does_not_depend_on_order(tiny):
    root, _ = tiny
    specs = [S.SampleSpec('Seen', 'exo', 'hold', 'knife', 2),
             S.SampleSpec('Unseen', 'test', 'pour', 'cup', 1),
             S.SampleSpec('Seen', 'ego', 'brush_with', 'toothbrush', 0)]
    for spec in reversed(specs):
        img = S.render_sample(spec, 0).image
        ok, buf = cv2.imencode('.jpg', img, [cv2.IMWRITE_JPEG_QUALITY, S.JPEG_QUALITY])
        assert ok and buf.tobytes() == (root / spec.relpath()).read_bytes()


def test_different_seed_gives_different_images(tiny, tmp_path):
    root, _ = tiny
    other = tmp_path / 'seed1'
    S.generate(other, 1, seed=1, progress=False, splits=('Unseen',))
    b = _files(other)
    a = _files(root)
    common = [k for k in b if k in a]
    assert len(common) == len(b) == 14 + 14 + 11 * 2
    assert all(a[k] != b[k] for k in common)
    meta = json.loads((other / S.META_FILE).read_text())
    assert meta['seed'] == 1 and meta['size'] == 1


# ---------------------------------------------------------------------------------- splits


def test_unseen_objects_are_disjoint_and_affordances_covered(tiny):
    root, _ = tiny
    base = root / 'Unseen'
    train = {(p.parent.name, p.name) for p in (base / 'trainset/exocentric').glob('*/*')}
    ego = {(p.parent.name, p.name) for p in (base / 'trainset/egocentric').glob('*/*')}
    test = {(p.parent.name, p.name) for p in (base / 'testset/GT').glob('*/*')}
    assert train == ego
    assert not ({o for _, o in train} & {o for _, o in test})
    assert {a for a, _ in test} <= {a for a, _ in train}
    assert {a for a, _ in train | test} <= set(AFFORDANCES_UNSEEN)
    assert {o for _, o in test} == set(S.UNSEEN_TEST_OBJECTS)
    assert 'brush_with' in {p.name for p in (root / 'Seen/trainset/exocentric').iterdir()}


# ------------------------------------------------------------------------------------ content


def test_exocentric_images_show_a_hand_egocentric_do_not():
    fracs = []
    for aff, obj in S.split_folders('Seen', 'train'):
        exo = S.render_sample(S.SampleSpec('Seen', 'exo', aff, obj, 0), 0)
        ego = S.render_sample(S.SampleSpec('Seen', 'ego', aff, obj, 0), 0)
        assert not ego.hand_mask.any()
        fracs.append(exo.hand_mask.mean())
        assert exo.hand_mask.shape == exo.image.shape[:2]
    assert min(fracs) > 0.005 and np.mean(fracs) > 0.04, (min(fracs), np.mean(fracs))


def test_hand_touches_the_grasped_part():
    """hold: the fingers overlap / border the hold part of the object."""
    near = 0
    specs = [S.SampleSpec('Seen', 'exo', 'hold', o, i) for o in ('knife', 'hammer', 'cup')
             for i in range(3)]
    for spec in specs:
        s = S.render_sample(spec, 0)
        grown = cv2.dilate(s.hand_mask.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
        near += bool((grown & s.part_mask).any())
    assert near >= len(specs) - 1


def test_render_object_on_a_given_canvas():
    canvas = np.full((200, 300, 3), 90, np.uint8)
    before = canvas.copy()
    pose = S.Pose(150.0, 100.0, 120.0, angle=30.0)
    r = S.render_object(canvas, 'knife', pose, rng=3)
    assert set(r.parts) == {'blade', 'bolster', 'handle'}
    changed = (canvas != before).any(2)
    assert r.mask.any() and (r.mask & ~changed).sum() < 0.02 * r.mask.sum()
    masks = list(r.parts.values())
    assert sum(m.sum() for m in masks) == r.mask.sum()            # visible parts are disjoint
    assert (r.region('tip') & ~r.parts['blade']).sum() == 0
    assert 0 < r.region('tip').sum() < r.parts['blade'].sum()
    x0, y0, x1, y1 = S.object_extent(r.model, pose)
    ys, xs = np.nonzero(r.mask)
    assert xs.min() >= x0 - 1 and xs.max() <= x1 + 1 and ys.min() >= y0 - 1 and ys.max() <= y1 + 1
    # the centre of mass lies near the pose centre (object height 120 px)
    assert math.hypot(xs.mean() - 150, ys.mean() - 100) < 40
    with pytest.raises(ValueError, match='uint8'):
        S.render_object(np.zeros((10, 10), np.uint8), 'knife', pose)
    with pytest.raises(ValueError, match='cannot draw'):
        S.build_object('giraffe')
    with pytest.raises(ValueError, match='no region'):
        r.region('wheel')


# ------------------------------------------------------------------------------ sizes, errors


def test_sizes():
    assert S.resolve_size('tiny') == (3, 1, 2)
    assert S.resolve_size('demo') == (17, 6, 5)
    assert S.resolve_size(30) == (30, 10, 9)
    assert S.resolve_size('4') == (4, 1, 1)
    for bad in (0, -1, 'huge', True, 1.5, S.MAX_PER_FOLDER + 1):
        with pytest.raises(ValueError):
            S.resolve_size(bad)
    demo = S.plan('demo', ('Seen',))
    n = {r: sum(s.role == r for s in demo) for r in S.ROLES}
    assert n == {'exo': 442, 'ego': 156, 'test': 130}        # target ~450 / ~150 / ~120
    unseen = S.plan('demo', ('Unseen',))
    assert len(unseen) < len(demo)


def test_generate_rejects_bad_arguments(tmp_path):
    for kw in ({'seed': -1}, {'seed': 1.5}, {'size': 'huge'}, {'splits': ('Seen', 'Sen')},
               {'splits': ()}):
        with pytest.raises(ValueError):
            S.generate(tmp_path / 'x', **{'progress': False, **kw})
    assert not (tmp_path / 'x').exists()


def test_generate_refuses_foreign_folder_and_replaces_its_own(tmp_path):
    foreign = tmp_path / 'foreign'
    (foreign / 'Seen').mkdir(parents=True)
    with pytest.raises(FileExistsError, match='did not write'):
        S.generate(foreign, 1, progress=False, splits=('Unseen',))
    own = tmp_path / 'own'
    S.generate(own, 1, progress=False, splits=('Unseen',))
    stale = own / 'Unseen/trainset/exocentric/hold/bottle/stale.jpg'
    stale.write_bytes(b'x')
    S.generate(own, 1, progress=False, splits=('Unseen',))
    assert not stale.exists()


# ---------------------------------------------------------------------------------------- CLI


def test_cli_help_documents_every_option(capsys):
    assert main(['--help']) == 0
    out = capsys.readouterr().out
    for word in ('OUT_DIR', '--size', 'tiny', 'demo', '--seed', '--splits', '--preview',
                 '--no-progress', '--quiet', 'identical'):
        assert word in out, word


@pytest.mark.parametrize('args, needle', [
    (['--size', 'huge'], "'huge' is not 'tiny', 'demo' or a positive integer"),
    (['--size', '0'], 'must be a positive integer'),
    (['--seed', '-2'], 'must be a non-negative integer'),
    (['--splits', 'Seen,Sen'], 'distinct names among Seen, Unseen'),
])
def test_cli_bad_values_exit_with_one_line(tmp_path, capsys, args, needle):
    assert main([str(tmp_path / 'out'), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('affordance-synth: error:') and needle in err[0]
    assert not (tmp_path / 'out').exists()


def test_cli_unwritable_dir_exits_with_one_line(tmp_path, capsys):
    blocker = tmp_path / 'file.txt'
    blocker.write_text('not a folder')
    assert main([str(blocker / 'sub'), '--size', '1', '-q']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'Not a directory' in err[0] and 'file.txt' in err[0]


def test_cli_writes_dataset_and_preview(tmp_path, capsys):
    out, preview = tmp_path / 'ds', tmp_path / 'sheet.png'
    assert main([str(out), '--size', '1', '--splits', 'Unseen', '--no-progress',
                 '--preview', str(preview)]) == 0
    text = capsys.readouterr().out
    assert 'Unseen: 14 exocentric, 14 egocentric, 11 test images (+11 GT)' in text
    sheet = cv2.imread(str(preview))
    assert sheet is not None and sheet.shape == (3 * 160, 6 * 200, 3)
    assert not (out / 'Seen').exists() and (out / 'Unseen/testset/GT').is_dir()


def test_cli_process_bad_size_has_no_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, '-m', 'affordance_core.cli.synth',
                           str(tmp_path / 'o'), '--size', 'huge'], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in proc.stderr, proc.stderr
