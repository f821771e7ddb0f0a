"""AGD20K datasets and transforms on tiny AGD20K-layout folders built with PIL."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T
from torchvision.transforms import functional as F

from affordance_core.data.agd20k import (AGD20KTest, AGD20KTrain, collate_test, collate_train,
                                         load_gt, load_rgb)
from affordance_core.data.transforms import IMAGENET_MEAN, IMAGENET_STD, preprocess_rgb
from affordance_core.data.transforms import test_transform as eval_transform  # not a test
from affordance_core.data.transforms import train_transform, view_transform

# ------------------------------------------------------------------------------------------------
# builders


def _image(path: Path, seed: int, size: tuple[int, int] = (40, 30)) -> None:
    """Random RGB jpg (width, height) = size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


def _train_folder(root: Path, split: str, aff: str, obj: str, n_exo: int, n_ego: int) -> None:
    base = root / split / 'trainset'
    for i in range(n_exo):
        _image(base / 'exocentric' / aff / obj / f'{obj}_{i:03d}.jpg', len(aff) * 100 + i)
    for i in range(n_ego):
        _image(base / 'egocentric' / aff / obj / f'ego_{i:03d}.jpg', 1000 + i)


def _truncated_jpg(path: Path) -> None:
    _image(path, 77, size=(64, 64))
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])  # header intact, scan data cut


@pytest.fixture
def seen_root(tmp_path: Path) -> Path:
    _train_folder(tmp_path, 'Seen', 'hold', 'cup', 5, 2)
    _train_folder(tmp_path, 'Seen', 'hold', 'knife', 2, 1)
    _train_folder(tmp_path, 'Seen', 'cut_with', 'knife', 4, 3)
    return tmp_path


def _keys_folder(key: str) -> tuple[str, str, str]:
    """('exocentric', aff, obj) of a key 'Seen/trainset/exocentric/aff/obj/name[#vV]'."""
    parts = key.split('#')[0].split('/')
    return parts[2], parts[3], parts[4]


def _normalised(rgb: tuple[int, int, int]) -> torch.Tensor:
    return torch.tensor([(c / 255 - m) / s for c, m, s in zip(rgb, IMAGENET_MEAN, IMAGENET_STD)],
                        dtype=torch.float32)


# ------------------------------------------------------------------------------------------------
# transforms


def test_constant_image_normalised_value():
    img = Image.new('RGB', (37, 23), (200, 100, 50))
    expected = _normalised((200, 100, 50))
    assert expected[0].item() == pytest.approx(1.307049, abs=1e-5)   # (200/255 - .485) / .229
    assert expected[2].item() == pytest.approx(-0.932985, abs=1e-5)  # (50/255 - .406) / .225
    for out in (eval_transform(224)(img), train_transform()(img, np.random.default_rng(0))):
        assert out.shape == (3, 224, 224) and out.dtype == torch.float32
        assert torch.allclose(out, expected[:, None, None].expand_as(out), atol=1e-6)


def test_train_transform_matches_torchvision_ops():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 50, 3), np.uint8))
    for mode, size in (('short', 256), ('square', (256, 256))):
        out = train_transform(224, 256, mode)(img, np.random.default_rng(5))
        rng = np.random.default_rng(5)
        big = T.Resize(size)(img)
        assert big.size == ((426, 256) if mode == 'short' else (256, 256))  # int(256 * 50 / 30)
        top = int(rng.integers(0, big.size[1] - 224 + 1))
        left = int(rng.integers(0, big.size[0] - 224 + 1))
        ref = F.crop(big, top, left, 224, 224)
        if rng.random() < 0.5:
            ref = F.hflip(ref)
        ref = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(T.ToTensor()(ref))
        assert torch.equal(out, ref)
    with pytest.raises(ValueError, match='resize_mode'):
        train_transform(resize_mode='long')
    with pytest.raises(ValueError, match='must be >= image_size'):
        train_transform(image_size=224, resize=200)


def test_view_transform_flip_is_exact():
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (31, 45, 3), np.uint8))
    v0 = view_transform(0, 224)(img)
    v1 = view_transform(1, 224)(img)
    assert torch.equal(v0, eval_transform(224)(img))
    assert torch.equal(v1, v0.flip(-1)) and not torch.equal(v1, v0)
    with pytest.raises(ValueError, match='view must be 0'):
        view_transform(2)


def test_preprocess_rgb_matches_eval_transform():
    rgb = np.random.default_rng(3).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    out = preprocess_rgb(rgb, 224)
    assert torch.equal(out, eval_transform(224)(Image.fromarray(rgb)))
    # a non-contiguous view gives the same result as its copy
    assert torch.equal(preprocess_rgb(rgb[:, ::-1], 112),
                       eval_transform(112)(Image.fromarray(rgb[:, ::-1].copy())))
    with pytest.raises(ValueError, match='dtype uint8'):
        preprocess_rgb(rgb.astype(np.float32) / 255)
    with pytest.raises(ValueError, match=r'shape \(H, W, 3\)'):
        preprocess_rgb(np.zeros((8, 8, 4), np.uint8))
    with pytest.raises(ValueError, match=r'shape \(H, W, 3\)'):
        preprocess_rgb(np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match='empty'):
        preprocess_rgb(np.zeros((0, 8, 3), np.uint8))
    with pytest.raises(ValueError, match='numpy array'):
        preprocess_rgb([[1, 2, 3]])


# ------------------------------------------------------------------------------------------------
# training set


def test_class_ids_follow_official_order(tmp_path: Path):
    for split, expected in (('Seen', 11), ('Unseen', 7), ('HICO-IIF', 2)):
        _train_folder(tmp_path, split, 'hold', 'cup', 1, 1)
        ds = AGD20KTrain(tmp_path, split, load_images=False)
        assert ds[0]['label'] == expected
    _train_folder(tmp_path, 'Seen', 'beat', 'drum', 1, 1)
    ds = AGD20KTrain(tmp_path, 'Seen', load_images=False)
    assert [ds[i]['label'] for i in (0, 1)] == [0, 11]  # samples in class-index order


def test_len_unpaired_and_unknown_class(seen_root: Path, caplog):
    _train_folder(seen_root, 'Seen', 'hold', 'bottle', 3, 0)     # exo without ego folder
    _train_folder(seen_root, 'Seen', 'juggle', 'ball', 2, 2)     # not a Seen affordance
    with caplog.at_level(logging.WARNING):
        ds = AGD20KTrain(seen_root, 'Seen', load_images=False)
    assert len(ds) == 5 + 2 + 4
    assert ds.num_unpaired == 3
    assert 'juggle' in caplog.text and 'bottle' in caplog.text
    s = ds.summary()
    assert s['samples'] == 11 and s['unpaired'] == 3 and s['skipped'] == 0
    assert s['per_class']['hold'] == {'exo': 7, 'ego': 3, 'objects': 2}
    assert s['per_class']['cut_with'] == {'exo': 4, 'ego': 3, 'objects': 1}
    assert s['per_class']['beat'] == {'exo': 0, 'ego': 0, 'objects': 0}


def test_exo_sampling_same_folder_without_replacement(seen_root: Path):
    ds = AGD20KTrain(seen_root, 'Seen', load_images=False)
    exo_all = {
        f'Seen/trainset/exocentric/{a}/{o}/{n}'
        for a in ('hold', 'cut_with') for o in ('cup', 'knife')
        if (seen_root / 'Seen/trainset/exocentric' / a / o).is_dir()
        for n in os.listdir(seen_root / 'Seen/trainset/exocentric' / a / o)}
    for epoch in range(3):
        ds.set_epoch(epoch)
        anchors = []
        for i in range(len(ds)):
            item = ds[i]
            keys = item['exo_keys']
            assert len(keys) == 3
            anchors.append(keys[0])
            folders = {_keys_folder(k) for k in keys}
            assert len(folders) == 1
            kind, aff, obj = folders.pop()
            assert kind == 'exocentric'
            assert _keys_folder(item['ego_key']) == ('egocentric', aff, obj)
            if obj == 'knife' and aff == 'hold':  # 2 images: the other one twice
                assert keys[1] == keys[2] != keys[0]
            else:                                # >= 3 images: without replacement
                assert len(set(keys)) == 3
        assert sorted(anchors) == sorted(exo_all)  # the epoch iterates over exo images


def test_item_tensors_and_collate(seen_root: Path):
    ds = AGD20KTrain(seen_root, 'Seen', image_size=224)
    item = ds[0]
    assert item['ego'].shape == (3, 224, 224) and item['exo'].shape == (3, 3, 224, 224)
    loader = DataLoader(ds, batch_size=4, collate_fn=collate_train)
    batch = next(iter(loader))
    assert batch['ego'].shape == (4, 3, 224, 224)
    assert batch['exo'].shape == (4, 3, 3, 224, 224)
    assert batch['label'].dtype == torch.int64 and batch['label'].tolist() == [6] * 4
    assert len(batch['exo_keys']) == 4 and all(len(k) == 3 for k in batch['exo_keys'])
    assert batch['exo_keys'][1] == ds[1]['exo_keys']
    assert len(batch['ego_key']) == 4


def test_constant_colour_through_dataset(tmp_path: Path):
    for sub, name in (('exocentric', 'a.png'), ('egocentric', 'b.png')):  # png: lossless
        path = tmp_path / 'Seen/trainset' / sub / 'hold/cup' / name
        path.parent.mkdir(parents=True)
        Image.new('RGB', (50, 30), (10, 128, 250)).save(path)
    ds = AGD20KTrain(tmp_path, 'Seen', num_exo=1)
    item = ds[0]
    expected = _normalised((10, 128, 250))[:, None, None]
    assert torch.allclose(item['ego'], expected.expand(3, 224, 224), atol=1e-6)
    assert item['exo'].shape == (1, 3, 224, 224)
    assert torch.allclose(item['exo'][0], expected.expand(3, 224, 224), atol=1e-6)


def test_views_keys_and_exact_flip(seen_root: Path):
    ds = AGD20KTrain(seen_root, 'Seen', views=2)
    seen_views = set()
    for i in range(len(ds)):
        item = ds[i]
        keys = item['exo_keys'] + [item['ego_key']]
        tensors = list(item['exo']) + [item['ego']]
        for key, tensor in zip(keys, tensors):
            base, v = key.rsplit('#v', 1)
            seen_views.add(v)
            plain = eval_transform(224)(load_rgb(str(seen_root / base)))
            assert torch.equal(tensor, plain if v == '0' else plain.flip(-1))
            assert torch.equal(ds.load_key(key), tensor)
    assert seen_views == {'0', '1'}
    assert all(k.endswith('#v0') for k in AGD20KTrain(seen_root, 'Seen', views=1,
                                                      load_images=False)[0]['exo_keys'])
    keys = ds.image_keys()
    assert len(keys) == 2 * (5 + 2 + 2 + 1 + 4 + 3)


def test_load_images_false_same_keys_no_tensors(seen_root: Path):
    full = AGD20KTrain(seen_root, 'Seen', views=2, seed=3)
    keys_only = AGD20KTrain(seen_root, 'Seen', views=2, seed=3, load_images=False)
    for ds in (full, keys_only):
        ds.set_epoch(4)
    for i in range(len(full)):
        a, b = full[i], keys_only[i]
        assert set(b) == {'label', 'ego_key', 'exo_keys'}
        assert a['ego_key'] == b['ego_key'] and a['exo_keys'] == b['exo_keys']
        assert a['label'] == b['label']


def test_set_epoch_determinism(seen_root: Path):
    a = AGD20KTrain(seen_root, 'Seen', seed=7)
    b = AGD20KTrain(seen_root, 'Seen', seed=7)
    a.set_epoch(2)
    b.set_epoch(2)
    for i in (0, 3, 9):
        x, y = a[i], b[i]
        assert x['exo_keys'] == y['exo_keys'] and x['ego_key'] == y['ego_key']
        assert torch.equal(x['exo'], y['exo']) and torch.equal(x['ego'], y['ego'])
    keys_only = AGD20KTrain(seen_root, 'Seen', seed=7, load_images=False)

    def draws(epoch: int) -> list:
        keys_only.set_epoch(epoch)
        return [(keys_only[i]['exo_keys'], keys_only[i]['ego_key'])
                for i in range(len(keys_only))]

    first = draws(2)
    assert first[9] == (a[9]['exo_keys'], a[9]['ego_key'])
    assert draws(3) != first
    assert draws(2) == first
    other_seed = AGD20KTrain(seen_root, 'Seen', seed=8, load_images=False)
    other_seed.set_epoch(2)
    assert [(other_seed[i]['exo_keys'], other_seed[i]['ego_key']) for i in range(11)] != first
    # the random crop / flip of the same anchor changes with the epoch
    crops = set()
    for epoch in range(6):
        a.set_epoch(epoch)
        crops.add(a[0]['exo'][0].sum().item())
    assert len(crops) > 1
    with pytest.raises(ValueError, match='epoch'):
        a.set_epoch(-1)


def test_workers_give_the_same_items(seen_root: Path):
    ds = AGD20KTrain(seen_root, 'Seen', seed=1)
    ds.set_epoch(1)
    ref = collate_train([ds[i] for i in range(len(ds))])
    loader = DataLoader(ds, batch_size=len(ds), num_workers=2, collate_fn=collate_train)
    got = next(iter(loader))
    assert got['exo_keys'] == ref['exo_keys']
    assert torch.equal(got['exo'], ref['exo']) and torch.equal(got['ego'], ref['ego'])


def test_max_samples_stratified(seen_root: Path):
    full = AGD20KTrain(seen_root, 'Seen', load_images=False)
    assert len(full) == 11
    ds = AGD20KTrain(seen_root, 'Seen', load_images=False, max_samples=6, seed=2)
    assert len(ds) == 6
    labels = ds.labels
    assert labels.count(11) == 4 and labels.count(6) == 2  # 7 hold : 4 cut_with
    again = AGD20KTrain(seen_root, 'Seen', load_images=False, max_samples=6, seed=2)
    assert [again[i]['exo_keys'][0] for i in range(6)] == [ds[i]['exo_keys'][0] for i in range(6)]
    assert ds.summary()['per_class']['hold']['exo'] == 4


def _corrupt_root(root: Path) -> list[Path]:
    _train_folder(root, 'Seen', 'hold', 'cup', 4, 2)
    folder = root / 'Seen/trainset/exocentric/hold/cup'
    bad = [folder / 'cup_001.jpg', folder / 'zero.jpg', folder / 'text.jpg']
    _truncated_jpg(bad[0])                          # replaces a good image: header fine, data cut
    bad[1].write_bytes(b'')
    bad[2].write_text('this is not an image\n')
    return bad


def test_corrupt_images_logged_counted_replaced(tmp_path: Path, caplog):
    bad = _corrupt_root(tmp_path)
    with caplog.at_level(logging.WARNING):
        ds = AGD20KTrain(tmp_path, 'Seen', num_exo=3)
    assert len(ds) == 4                              # zero-byte and text file dropped at scan
    assert ds.num_skipped == 2
    assert str(bad[1]) in caplog.text and str(bad[2]) in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        items = [ds[i] for i in range(len(ds))]
    assert ds.num_skipped == 3 and ds.skipped == sorted(str(p) for p in bad)
    assert str(bad[0]) in caplog.text
    trunc_key = 'Seen/trainset/exocentric/hold/cup/cup_001.jpg'
    for item in items:
        assert trunc_key not in item['exo_keys']
        assert item['exo'].shape == (3, 3, 224, 224) and torch.isfinite(item['exo']).all()
    # the anchor of sample 1 (the truncated file) is replaced by the next image of the folder
    assert items[1]['exo_keys'][0] == 'Seen/trainset/exocentric/hold/cup/cup_002.jpg'
    # keys-only epochs then skip the known-bad file the same way
    ds.load_images = False
    assert ds[1]['exo_keys'][0] == items[1]['exo_keys'][0]
    assert ds.summary()['skipped'] == 3


def test_corrupt_images_counted_through_workers(tmp_path: Path):
    bad = _corrupt_root(tmp_path)
    ds = AGD20KTrain(tmp_path, 'Seen', num_exo=3)
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_train)
    batches = list(loader)
    assert sum(len(b['label']) for b in batches) == 4
    assert ds.num_skipped == 3 and str(bad[0]) in ds.skipped
    record = ds._recorder.path                 # the shared file outlives the workers ...
    assert os.path.isfile(record)
    del ds, loader
    import gc
    gc.collect()
    assert not os.path.exists(record)          # ... and is removed with the dataset


def test_load_key_records_unreadable(tmp_path: Path):
    bad = _corrupt_root(tmp_path)
    ds = AGD20KTrain(tmp_path, 'Seen', views=2, load_images=False)
    key = 'Seen/trainset/exocentric/hold/cup/cup_001.jpg#v1'
    assert key in ds.image_keys()
    assert ds.load_key(key) is None
    assert str(bad[0]) in ds.skipped
    assert all('cup_001' not in k for i in range(len(ds)) for k in ds[i]['exo_keys'])


def test_missing_and_empty_roots(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r'trainset/\{exocentric,egocentric\}'):
        AGD20KTrain(tmp_path / 'nope', 'Seen')
    (tmp_path / 'Unseen').mkdir()
    with pytest.raises(FileNotFoundError, match=r"root holds: Unseen"):
        AGD20KTrain(tmp_path, 'Seen')
    with pytest.raises(FileNotFoundError, match='testset/GT'):
        AGD20KTest(tmp_path / 'nope', 'Seen')
    (tmp_path / 'Seen/trainset/exocentric/hold/cup').mkdir(parents=True)
    (tmp_path / 'Seen/trainset/egocentric/hold/cup').mkdir(parents=True)
    with pytest.raises(ValueError, match='no usable training sample'):
        AGD20KTrain(tmp_path, 'Seen')
    with pytest.raises(ValueError, match='unknown split'):
        AGD20KTrain(tmp_path, 'Unseen2')
    with pytest.raises(ValueError, match='views'):
        AGD20KTrain(tmp_path, 'Seen', views=3)


# ------------------------------------------------------------------------------------------------
# test set


def _gt(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8), mode='L').save(path)


def _bilinear_reference(mask: np.ndarray, size: int) -> np.ndarray:
    """Hand-written bilinear resize with half-pixel centres and border clamping (cv2 rule)."""
    def coords(n_in):
        src = (np.arange(size) + 0.5) * n_in / size - 0.5
        src = np.clip(src, 0, n_in - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo
    y0, y1, wy = coords(mask.shape[0])
    x0, x1, wx = coords(mask.shape[1])
    top = mask[y0][:, x0] * (1 - wx) + mask[y0][:, x1] * wx
    bot = mask[y1][:, x0] * (1 - wx) + mask[y1][:, x1] * wx
    return top * (1 - wy)[:, None] + bot * wy[:, None]


@pytest.fixture
def test_root(tmp_path: Path) -> Path:
    ego = tmp_path / 'Seen/testset/egocentric'
    gt = tmp_path / 'Seen/testset/GT'
    _image(ego / 'hold/cup/cup_01.jpg', 1)
    _image(ego / 'hold/cup/cup_02.jpg', 2)          # no GT: not a sample
    _image(ego / 'drink_with/cup/cup_01.jpg', 1)    # same image, second affordance
    _image(ego / 'cut_with/knife/knife_7.jpg', 3)
    _gt(gt / 'hold/cup/cup_01.png', np.array([[0, 255, 128], [64, 0, 255]]))
    _gt(gt / 'drink_with/cup/cup_01.png', np.full((5, 5), 51))
    _gt(gt / 'cut_with/knife/knife_7.png', np.eye(4) * 255)
    return tmp_path


def test_test_set_pairs_and_keys(test_root: Path):
    ds = AGD20KTest(test_root, 'Seen')
    assert len(ds) == 3 and ds.num_without_gt == 1
    assert ds.keys == ['cut_with_knife_knife_7.png', 'drink_with_cup_cup_01.png',
                       'hold_cup_cup_01.png']
    assert ds.labels == [6, 8, 11]
    item = ds[2]
    assert item['image'].shape == (3, 224, 224)
    assert item['path'] == str(test_root / 'Seen/testset/egocentric/hold/cup/cup_01.jpg')
    assert torch.equal(item['image'], eval_transform(224)(Image.open(item['path'])))
    assert torch.equal(ds[1]['image'], item['image'])  # same image under two affordances
    # GT: mask / 255 then bilinear resize to 224 x 224
    mask = np.array([[0, 255, 128], [64, 0, 255]]) / 255.0
    ref = _bilinear_reference(mask, 224)
    assert item['gt'].dtype == torch.float32 and item['gt'].shape == (224, 224)
    np.testing.assert_allclose(item['gt'].numpy(), ref, atol=1e-6)
    assert item['gt'][0, 0].item() == 0.0 and item['gt'][-1, -1].item() == 1.0
    # row 0, column 112: x = 112.5 * 3 / 224 - 0.5 = 1.00670 -> 255 + 0.0067 * (128 - 255)
    assert item['gt'][0, 112].item() == pytest.approx((255 - 0.0066964 * 127) / 255, abs=1e-6)
    np.testing.assert_allclose(ds[1]['gt'].numpy(), np.full((224, 224), 0.2), atol=1e-6)
    batch = collate_test([ds[i] for i in range(3)])
    assert batch['image'].shape == (3, 3, 224, 224) and batch['gt'].shape == (3, 224, 224)
    assert batch['label'].tolist() == [6, 8, 11] and batch['key'] == ds.keys
    s = ds.summary()
    assert s['per_class']['hold'] == 1 and s['without_gt'] == 1 and s['samples'] == 3


def test_test_set_image_size_and_subset(test_root: Path):
    ds = AGD20KTest(test_root, 'Seen', image_size=112, max_samples=2)
    assert len(ds) == 2
    item = ds[0]
    assert item['image'].shape == (3, 112, 112) and item['gt'].shape == (224, 224)
    assert load_gt(str(test_root / 'Seen/testset/GT/drink_with/cup/cup_01.png'), 7).shape == (7, 7)


def test_test_set_corrupt_image(test_root: Path, caplog):
    bad = test_root / 'Seen/testset/egocentric/hold/cup/cup_01.jpg'
    _truncated_jpg(bad)
    zero = test_root / 'Seen/testset/egocentric/hold/cup/cup_03.jpg'
    zero.write_bytes(b'')
    _gt(test_root / 'Seen/testset/GT/hold/cup/cup_03.png', np.zeros((2, 2)))
    ds = AGD20KTest(test_root, 'Seen')
    assert len(ds) == 3 and ds.num_skipped == 1
    with caplog.at_level(logging.WARNING):
        item = ds[2]                           # hold_cup_cup_01 is unreadable -> next sample
    assert str(bad) in caplog.text
    assert item['key'] == 'cut_with_knife_knife_7.png' and item['label'] == 6
    assert ds.num_skipped == 2 and ds.skipped == sorted([str(bad), str(zero)])
