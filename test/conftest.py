"""Shared fixtures and markers: `ros` tests skip without rclpy, `gpu` tests without CUDA."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / 'shared'


def pytest_collection_modifyitems(config, items):
    has_rclpy = importlib.util.find_spec('rclpy') is not None
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch is a hard dependency
        has_cuda = False
    for item in items:
        # markers, not item.keywords: keywords also hold folder names (test/ros/...)
        if item.get_closest_marker('ros') is not None and not has_rclpy:
            item.add_marker(pytest.mark.skip(reason='needs a ROS 2 installation (rclpy)'))
        if item.get_closest_marker('gpu') is not None and not has_cuda:
            item.add_marker(pytest.mark.skip(reason='needs a CUDA GPU'))


@pytest.fixture(scope='session')
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope='session')
def shared_data() -> Path:
    """../shared/data beside the checkout; tests that need it skip with a reason without it."""
    path = SHARED / 'data'
    if not path.is_dir():
        pytest.skip(f'shared test data not found at {path}')
    return path


@pytest.fixture(scope='module')
def torch_one_thread():
    """Tiny models are dominated by thread start-up on a busy 2-core machine: one thread is
    about 3x faster. Use with ``pytestmark = pytest.mark.usefixtures('torch_one_thread')``."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


PAIRS = (('hold', 'cup'), ('cut', 'knife'), ('drink_with', 'cup'))


def make_tiny_agd(root: Path, n_exo: int = 4, n_ego: int = 2, n_test: int = 2,
                  seed: int = 0) -> Path:
    """AGD20K layout with random images: Seen/{trainset,testset} for the classes of PAIRS."""
    rng = np.random.default_rng(seed)
    for aff, obj in PAIRS:
        for sub, n in (('exocentric', n_exo), ('egocentric', n_ego)):
            folder = root / 'Seen' / 'trainset' / sub / aff / obj
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 255, (48, 56, 3), dtype=np.uint8)
                cv2.imwrite(str(folder / f'{sub[:3]}_{i}.jpg'), img)
        ego = root / 'Seen' / 'testset' / 'egocentric' / aff / obj
        gt = root / 'Seen' / 'testset' / 'GT' / aff / obj
        ego.mkdir(parents=True, exist_ok=True)
        gt.mkdir(parents=True, exist_ok=True)
        for i in range(n_test):
            cv2.imwrite(str(ego / f't_{i}.jpg'), rng.integers(0, 255, (48, 48, 3), np.uint8))
            mask = np.zeros((48, 48), np.uint8)
            mask[8 + 4 * i:30, 5:25] = 200
            cv2.imwrite(str(gt / f't_{i}.png'), mask)
    return root


@pytest.fixture(scope='module')
def tiny_agd(tmp_path_factory) -> Path:
    """A tiny AGD20K tree (3 classes, random 48-56 px images) shared by a test module."""
    return make_tiny_agd(tmp_path_factory.mktemp('agd'))
