"""Fixtures for the ROS-side tests (no ROS 2 on these machines).

``ros_stand_in`` makes ``import rclpy``, ``rcl_interfaces.msg``, ``tf2_ros`` and the message
packages (``sensor_msgs.msg``, ``affordance_ros.msg``, ...) importable for one test: rclpy from
test/ros/stand_in, messages from the rosbags typestore (``BagMessageTypes``). Everything is
removed again afterwards, so other tests still see a machine without ROS.
"""
from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Iterator

import pytest

STAND_IN = Path(__file__).resolve().parent / 'stand_in'
_STAND_IN_PACKAGES = ('rclpy', 'rcl_interfaces', 'tf2_ros')


@pytest.fixture
def ros_stand_in() -> Iterator[types.SimpleNamespace]:
    import affordance_ros
    from affordance_ros.msgtypes import BagMessageTypes

    for name in ('rclpy', 'sensor_msgs'):
        if name in sys.modules:
            pytest.skip(f'{name} is already imported (a real ROS 2?); stand-in not installed')
    bag_types = BagMessageTypes()
    sys.path.insert(0, str(STAND_IN))
    added: list[str] = []
    for full, cls in bag_types.typestore.types.items():
        pkg, kind, short = full.split('/')
        if pkg in _STAND_IN_PACKAGES:  # rcl_interfaces.msg: the stand-in's, with defaults
            continue
        mod_name = f'{pkg}.{kind}'
        if mod_name not in sys.modules:
            if pkg == 'affordance_ros':
                module = types.ModuleType(mod_name)
                sys.modules[mod_name] = module
                setattr(affordance_ros, kind, module)
            else:
                if pkg not in sys.modules:
                    sys.modules[pkg] = types.ModuleType(pkg)
                    added.append(pkg)
                module = types.ModuleType(mod_name)
                sys.modules[mod_name] = module
                setattr(sys.modules[pkg], kind, module)
            added.append(mod_name)
        setattr(sys.modules[mod_name], short, cls)
    try:
        yield types.SimpleNamespace(types=bag_types, typestore=bag_types.typestore)
    finally:
        sys.path.remove(str(STAND_IN))
        for name in added:
            sys.modules.pop(name, None)
        for attr in ('msg', 'grounding_node'):  # `from affordance_ros import x` reads these
            if hasattr(affordance_ros, attr):
                delattr(affordance_ros, attr)
        for name in list(sys.modules):
            if name.split('.')[0] in _STAND_IN_PACKAGES or name == 'affordance_ros.grounding_node':
                del sys.modules[name]
