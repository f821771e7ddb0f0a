"""flake8 over the whole package, as ament_flake8 would lint it (width 99)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_flake8_clean():
    pytest.importorskip('flake8')
    proc = subprocess.run([sys.executable, '-m', 'flake8', 'affordance_core', 'affordance_ros',
                           'training', 'bench', 'test', 'setup.py'],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
