"""Structural checks of the single ament_cmake package and the pip installation."""
from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOP_LEVEL = ['affordance_ros', 'affordance_core', 'launch', 'config', 'msg', 'training', 'test',
             'package.xml', 'setup.py', 'CMakeLists.txt', 'README.md', 'Makefile', '.ci/run',
             'bench']


def test_top_level_layout():
    missing = [p for p in TOP_LEVEL if not (REPO / p).exists()]
    assert not missing, f'missing top-level entries: {missing}'


def test_package_xml_valid_ament_cmake_interface_package():
    from catkin_pkg.package import parse_package
    pkg = parse_package(str(REPO / 'package.xml'))
    pkg.validate()  # raises InvalidPackage
    assert pkg.name == 'affordance_ros'
    assert pkg.package_format == 3
    assert pkg.get_build_type() == 'ament_cmake'
    buildtool = {d.name for d in pkg.buildtool_depends}
    assert {'ament_cmake', 'ament_cmake_python', 'rosidl_default_generators'} <= buildtool
    assert 'rosidl_default_runtime' in {d.name for d in pkg.exec_depends}
    assert 'rosidl_interface_packages' in {g.name for g in pkg.member_of_groups}
    # everything the node needs at run time is declared
    runtime = {d.name for d in pkg.exec_depends} | {d.name for d in pkg.build_depends}
    for dep in ('rclpy', 'sensor_msgs', 'geometry_msgs', 'std_msgs', 'vision_msgs',
                'visualization_msgs', 'diagnostic_msgs', 'message_filters', 'tf2_ros',
                'cv_bridge', 'sensor_msgs_py', 'launch_ros', 'python3-numpy', 'python3-torch'):
        assert dep in runtime, f'package.xml does not declare {dep}'


def _cmake_msg_files() -> list[str]:
    text = (REPO / 'CMakeLists.txt').read_text()
    return re.findall(r'"(msg/[A-Za-z0-9_]+\.msg)"', text)


def test_every_msg_is_generated_by_cmake():
    on_disk = sorted(p.relative_to(REPO).as_posix() for p in (REPO / 'msg').glob('*.msg'))
    assert on_disk, 'no messages in msg/'
    assert sorted(_cmake_msg_files()) == on_disk
    text = (REPO / 'CMakeLists.txt').read_text()
    assert 'rosidl_generate_interfaces(${PROJECT_NAME}' in text
    assert 'ament_python_install_package(affordance_core)' in text
    assert 'install(DIRECTORY launch config DESTINATION share/${PROJECT_NAME})' in text
    # node modules go into the generated package, never replacing its __init__.py
    assert 'EXCLUDE REGEX "__init__\\\\.py$"' in text


def test_messages_parse_and_serialise_with_rosbags():
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore
    store = get_typestore(Stores.ROS2_HUMBLE)
    types = {}
    for path in sorted((REPO / 'msg').glob('*.msg')):
        types.update(get_types_from_msg(path.read_text(), f'affordance_ros/msg/{path.stem}'))
    store.register(types)
    Grasp = store.types['affordance_ros/msg/AffordanceGrasp']
    Array = store.types['affordance_ros/msg/AffordanceGraspArray']
    Header = store.types['std_msgs/msg/Header']
    Time = store.types['builtin_interfaces/msg/Time']
    Pose = store.types['geometry_msgs/msg/Pose']
    Point = store.types['geometry_msgs/msg/Point']
    Quat = store.types['geometry_msgs/msg/Quaternion']
    grasp = Grasp(action='hold', score=0.9, u=10.5, v=20.25, valid_3d=True,
                  pose=Pose(position=Point(x=0.1, y=0.2, z=0.5),
                            orientation=Quat(x=0.0, y=0.0, z=0.0, w=1.0)),
                  width=0.04, depth_spread=0.002)
    msg = Array(header=Header(stamp=Time(sec=3, nanosec=7), frame_id='camera_optical'),
                actions=['hold'], grasps=[grasp], inference_ms=4.5)
    raw = store.serialize_cdr(msg, 'affordance_ros/msg/AffordanceGraspArray')
    back = store.deserialize_cdr(raw, 'affordance_ros/msg/AffordanceGraspArray')
    assert back.header.frame_id == 'camera_optical' and back.header.stamp.nanosec == 7
    assert back.grasps[0].action == 'hold' and back.grasps[0].u == pytest.approx(10.5)
    assert back.grasps[0].pose.position.z == pytest.approx(0.5)


def _console_scripts() -> list[tuple[str, str, str]]:
    tree = ast.parse((REPO / 'setup.py').read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], 'id', '') == \
                'CONSOLE_SCRIPTS':
            entries = ast.literal_eval(node.value)
            out = []
            for entry in entries:
                name, target = (s.strip() for s in entry.split('='))
                module, func = target.split(':')
                out.append((name, module, func))
            return out
    raise AssertionError('CONSOLE_SCRIPTS not found in setup.py')


@pytest.mark.parametrize('name,module,func', _console_scripts())
def test_console_scripts_import(name, module, func):
    mod = importlib.import_module(module)
    assert callable(getattr(mod, func)), f'{name}: {module}:{func} is not callable'


@pytest.mark.parametrize('name,module,func', _console_scripts())
def test_console_scripts_help(name, module, func):
    proc = subprocess.run([sys.executable, '-c', f'import sys; from {module} import {func}; '
                           f'sys.exit({func}(["--help"]))'],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert 'usage' in proc.stdout.lower()


def test_ros_init_has_no_logic():
    # the colcon install uses the rosidl-generated __init__.py; ours must not carry code
    tree = ast.parse((REPO / 'affordance_ros' / '__init__.py').read_text())
    assert all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in tree.body)


def test_ci_runs_the_readme_test_command():
    readme = (REPO / 'README.md').read_text()
    ci = (REPO / '.ci' / 'run').read_text()
    assert 'make test' in readme and 'make demo' in readme
    assert re.search(r'^make test$', ci, flags=re.M)
