"""mypy checks affordance_ros against rclpy's own sources and the ROS message stubs.

The stand-in in test/ros/stand_in lets the node run here; this test guards the other side: that
every rclpy call the node makes exists in real rclpy with these arguments and that the node does
not overwrite rclpy.Node internals (e.g. ``self._publishers``). Config: mypy.ini.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STUBS = Path(sys.prefix) / 'ros-stubs'


@pytest.mark.slow
def test_affordance_ros_type_checks_against_rclpy() -> None:
    pytest.importorskip('mypy')
    if not (STUBS / 'rclpy' / 'node.py').is_file():
        pytest.skip(f'rclpy sources for mypy not installed in {STUBS} (make venv does it)')
    env = dict(os.environ, MYPYPATH=str(STUBS))
    proc = subprocess.run([sys.executable, '-m', 'mypy', '--no-incremental',
                           '--config-file', str(ROOT / 'mypy.ini')],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert 'rclpy' not in sys.modules  # the stubs never leak onto the test run's path
