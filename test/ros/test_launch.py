"""launch/grounding.launch.py: arguments and defaults (parsed, no ROS) and a launch_testing
proof of life that runs only where ROS 2 is installed."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / 'launch' / 'grounding.launch.py'


def _arguments() -> dict[str, tuple[str, str]]:
    tree = ast.parse(LAUNCH.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], 'id', '') == 'ARGUMENTS':
            return ast.literal_eval(node.value)
    raise AssertionError('ARGUMENTS not found in the launch file')


def test_launch_arguments_cover_the_documented_interface() -> None:
    args = _arguments()
    for name in ('namespace', 'params_file', 'checkpoint', 'engine_path', 'backend',
                 'image_topic', 'depth_topic', 'camera_info_topic', 'action_topic',
                 'use_sim_time', 'autostart'):
        assert name in args, name
        assert args[name][1], f'{name} has no description'
    # realsense2_camera with align_depth.enable:=true
    assert args['image_topic'][0] == '/camera/camera/color/image_raw'
    assert args['depth_topic'][0] == '/camera/camera/aligned_depth_to_color/image_raw'
    assert args['camera_info_topic'][0] == '/camera/camera/color/camera_info'
    assert args['autostart'][0] == 'true' and args['use_sim_time'][0] == 'false'


def test_launch_overrides_name_real_parameters() -> None:
    from affordance_ros import params

    tree = ast.parse(LAUNCH.read_text())
    overrides = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                     and getattr(n.targets[0], 'id', '') == 'OVERRIDES')
    known = {spec.name for spec in params.PARAMETERS}
    assert set(overrides.values()) <= known
    assert {'actions', 'autostart'} <= known


def test_launch_file_compiles() -> None:
    compile(LAUNCH.read_text(), str(LAUNCH), 'exec')


@pytest.mark.ros
def test_launch_proof_of_life(tmp_path) -> None:  # pragma: no cover - needs a ROS 2 install
    """Launch the node with a tiny checkpoint, send one RGB frame and receive its grasps."""
    pytest.importorskip('launch_testing', reason='needs ROS 2 launch_testing')
    rclpy = pytest.importorskip('rclpy', reason='needs ROS 2 rclpy')
    import threading
    import time

    import launch
    import numpy as np
    from launch.actions import IncludeLaunchDescription
    from launch.launch_description_sources import PythonLaunchDescriptionSource
    from sensor_msgs.msg import Image

    from affordance_core import create_model, save_checkpoint
    from affordance_ros.msgtypes import RosMessageTypes
    from affordance_ros.msg import AffordanceGraspArray
    from affordance_ros.conversions import numpy_to_image

    ckpt = tmp_path / 'tiny.pt'
    save_checkpoint(ckpt, create_model('locate_test', num_classes=36))
    service = launch.LaunchService()
    service.include_launch_description(launch.LaunchDescription([IncludeLaunchDescription(
        PythonLaunchDescriptionSource(str(LAUNCH)),
        launch_arguments={'checkpoint': str(ckpt), 'backend': 'torch', 'image_topic': 'image',
                          'namespace': 'pol'}.items())]))
    runner = threading.Thread(target=service.run, daemon=True)
    runner.start()
    rclpy.init()
    node = rclpy.create_node('proof_of_life')
    got: list = []
    node.create_subscription(AffordanceGraspArray, '/pol/grasps', got.append, 10)
    pub = node.create_publisher(Image, '/pol/image', 10)
    types = RosMessageTypes()
    try:
        deadline = time.monotonic() + 120.0
        while not got and time.monotonic() < deadline:
            header = types.header(node.get_clock().now().nanoseconds, 'camera')
            pub.publish(numpy_to_image(np.zeros((120, 160, 3), np.uint8), 'rgb8', header, types))
            rclpy.spin_once(node, timeout_sec=0.5)
        assert got, 'no grasps message within 120 s'
        assert got[0].header.frame_id == 'camera'
    finally:
        node.destroy_node()
        rclpy.shutdown()
        service.shutdown()
