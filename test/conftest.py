"""Shared fixtures and markers: `ros` tests skip without rclpy, `gpu` tests without CUDA."""
from __future__ import annotations

import importlib.util
from pathlib import Path

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
        if 'ros' in item.keywords and not has_rclpy:
            item.add_marker(pytest.mark.skip(reason='needs a ROS 2 installation (rclpy)'))
        if 'gpu' in item.keywords and not has_cuda:
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
