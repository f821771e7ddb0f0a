"""affordance_core never imports ROS: it must import with rclpy and message packages absent."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_core_imports_without_ros():
    code = (
        "import sys\n"
        "for m in ('rclpy', 'sensor_msgs', 'std_msgs', 'geometry_msgs', 'cv_bridge',\n"
        "          'affordance_ros'):\n"
        "    sys.modules[m] = None\n"
        "import affordance_core, affordance_core.models, affordance_core.metrics\n"
        "import affordance_core.data, affordance_core.engine\n"
        "print(len(affordance_core.list_models()))\n"
    )
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip()) >= 4


def test_no_ros_imports_in_core_sources():
    banned = ('import rclpy', 'from rclpy', 'sensor_msgs', 'cv_bridge', 'affordance_ros')
    offenders = []
    for path in (REPO / 'affordance_core').rglob('*.py'):
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith(('import ', 'from ')) and any(b in stripped for b in banned):
                offenders.append(f'{path.relative_to(REPO)}: {stripped}')
    assert not offenders, offenders
