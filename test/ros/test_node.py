"""grounding_node on the rclpy stand-in (test/ros/stand_in): lifecycle, topics, QoS, parameters,
the worker, lazy outputs and bad input. Message classes come from the rosbags typestore."""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import pytest

CLASSES = ['hold', 'cut_with', 'pour', 'open', 'push']
STAMP = 1_700_000_000 * 10**9
H, W = 120, 160
K = np.array([[130.0, 0.0, 79.5], [0.0, 130.0, 59.5], [0.0, 0.0, 1.0]])


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory) -> Any:
    import torch

    from affordance_core.checkpoint import save_checkpoint
    from affordance_core.registry import create_model

    torch.manual_seed(0)
    model = create_model('locate_test', num_classes=5, classes=CLASSES)
    return save_checkpoint(model.eval(), tmp_path_factory.mktemp('ckpt') / 'model.pt')


@pytest.fixture
def make_node(ros_stand_in, ckpt) -> Any:
    from rclpy.parameter import Parameter

    from affordance_ros import grounding_node

    nodes = []

    def make(node_kwargs: dict[str, Any] | None = None, **overrides: Any) -> Any:
        values = {'checkpoint': str(ckpt), 'backend': 'torch', 'device': 'cpu',
                  'warmup_runs': 1, 'actions': ['hold'], 'max_input_age_ms': 1e12}
        values.update(overrides)
        node = grounding_node.GroundingNode(
            parameter_overrides=[Parameter(k, value=v) for k, v in values.items()],
            **(node_kwargs or {}))
        nodes.append(node)
        return node

    make.module = grounding_node
    yield make
    for node in nodes:
        if node.test_state == 'active':
            node.trigger_deactivate()


def frame_msgs(types: Any, stamp: int = STAMP, depth: np.ndarray | None = None) -> tuple:
    from affordance_ros.bagtools import camera_info_msg
    from affordance_ros.conversions import numpy_to_image

    rng = np.random.default_rng(stamp % 1000)
    header = types.header(stamp, 'camera_color_optical_frame')
    rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    if depth is None:
        depth = np.full((H, W), 900, np.uint16)
    return (numpy_to_image(rgb, 'rgb8', header, types),
            numpy_to_image(depth, '16UC1', header, types),
            camera_info_msg(K, H, W, header, types))


def deliver(node: Any, image: Any, depth: Any, info: Any) -> None:
    node.test_subscription('camera_info').test_deliver(info)
    node.test_subscription('depth').test_deliver(depth)
    node.test_subscription('image').test_deliver(image)


def wait_for(cond: Callable[[], bool], timeout: float = 30.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def test_parameters_declared_with_descriptions(make_node) -> None:
    from affordance_ros import params

    node = make_node()
    for spec in params.PARAMETERS:
        assert node.has_parameter(spec.name), spec.name
        desc = node.describe_parameter(spec.name)
        assert desc.description, spec.name
        assert desc.read_only == spec.read_only
    assert node.get_parameter('actions').value == ['hold']


def test_lifecycle_topics_qos_and_outputs(make_node, ros_stand_in) -> None:
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.qos import DurabilityPolicy, ReliabilityPolicy

    node = make_node()
    assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
    assert node.core is not None and node.core.pipeline.model_runs >= 1  # warmed up
    names = {p.topic for p in node._publishers}
    assert {'heatmap', 'overlay', 'grasps', 'detections_3d', 'markers', 'affordance_cloud',
            '/diagnostics'} <= names
    assert not node._subscriptions  # subscriptions only while active
    assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
    subs = {s.topic: s for s in node._subscriptions}
    assert set(subs) == {'image', 'depth', 'camera_info', 'action'}  # relative: remappable
    assert subs['image'].qos_profile.reliability == ReliabilityPolicy.BEST_EFFORT
    assert subs['action'].qos_profile.durability == DurabilityPolicy.TRANSIENT_LOCAL
    node.test_publisher('overlay').test_subscribers = 0  # nobody watches: never built

    image, depth, info = frame_msgs(ros_stand_in.types)
    deliver(node, image, depth, info)
    grasps = node.test_publisher('grasps')
    assert wait_for(lambda: len(grasps.published) == 1)
    out = grasps.published[0]
    assert out.header.stamp == image.header.stamp
    assert out.header.frame_id == 'camera_color_optical_frame'
    assert list(out.actions) == ['hold'] and len(out.grasps) >= 1
    assert all(g.action == 'hold' for g in out.grasps)
    assert any(g.valid_3d for g in out.grasps)
    for g in out.grasps:
        if g.valid_3d:  # a fronto-parallel plane at 0.9 m
            assert g.pose.position.z == pytest.approx(0.9, abs=0.01)
    heat = node.test_publisher('heatmap').published[0]
    assert (heat.height, heat.width, heat.encoding) == (H, W, '32FC1')
    assert heat.header.stamp == image.header.stamp
    assert node.test_publisher('detections_3d').published
    assert node.test_publisher('markers').published
    assert node.test_publisher('affordance_cloud').published
    assert not node.test_publisher('overlay').published

    # diagnostics timer
    node._diag_timer.test_fire()
    diag = node.test_publisher('/diagnostics').published[-1]
    values = {kv.key: kv.value for kv in diag.status[0].values}
    assert values['published'] == '1' and values['backend']

    # deactivate frees the model and the subscriptions; activate loads it again
    assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS
    assert node.core is None and not node._subscriptions
    assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
    node.test_publisher('overlay').test_subscribers = 1
    deliver(node, *frame_msgs(ros_stand_in.types, STAMP + 10**8))
    overlay = node.test_publisher('overlay')
    assert wait_for(lambda: len(overlay.published) == 1)
    assert overlay.published[0].encoding == 'bgr8'
    assert overlay.published[0].header.stamp.nanosec == 10**8


def test_configure_fails_cleanly_on_a_missing_checkpoint(make_node, tmp_path, caplog) -> None:
    from rclpy.lifecycle import TransitionCallbackReturn

    node = make_node(checkpoint=str(tmp_path / 'missing.pt'))
    assert node.trigger_configure() == TransitionCallbackReturn.FAILURE
    assert node.test_state == 'unconfigured' and node.core is None
    assert 'missing.pt' in caplog.text


def test_configure_rejects_an_unknown_action(make_node, caplog) -> None:
    from rclpy.lifecycle import TransitionCallbackReturn

    node = make_node(actions=['fly'])
    assert node.trigger_configure() == TransitionCallbackReturn.FAILURE
    assert 'fly' in caplog.text


def test_runtime_parameters_and_latched_action(make_node, ros_stand_in) -> None:
    from rclpy.parameter import Parameter

    node = make_node()
    node.trigger_configure()
    node.trigger_activate()
    ok, = node.set_parameters([Parameter('actions', value=['cut_with', 'pour'])])
    assert ok.successful and node.core.actions == ['cut_with', 'pour']
    bad, = node.set_parameters([Parameter('actions', value=['fly'])])
    assert not bad.successful and 'fly' in bad.reason
    assert node.core.actions == ['cut_with', 'pour']
    thr, = node.set_parameters([Parameter('min_score', value=1.5)])
    assert not thr.successful
    ro, = node.set_parameters([Parameter('checkpoint', value='/x.pt')])
    assert not ro.successful

    action = node.test_subscription('action')
    String = ros_stand_in.types['std_msgs/msg/String']
    action.test_deliver(String(data='fly'))  # unknown: warning, current actions kept
    assert node.core.actions == ['cut_with', 'pour']
    action.test_deliver(String(data='hold'))
    assert node.core.actions == ['hold']
    assert node.get_parameter('actions').value == ['hold']

    deliver(node, *frame_msgs(ros_stand_in.types))
    grasps = node.test_publisher('grasps')
    assert wait_for(lambda: len(grasps.published) == 1)
    assert list(grasps.published[0].actions) == ['hold']


def _malformed(types: Any) -> list[tuple[str, str, Callable[[tuple], tuple]]]:
    """(name, drop reason, mutate (image, depth, info) -> (image, depth, info))."""
    def image_with(**kw: Any) -> Callable[[tuple], tuple]:
        def f(msgs: tuple) -> tuple:
            image, depth, info = msgs
            fields = {n: getattr(image, n) for n in types.field_names('sensor_msgs/msg/Image')}
            fields.update(kw)
            return types.make('sensor_msgs/msg/Image', **fields), depth, info
        return f

    def depth_with(**kw: Any) -> Callable[[tuple], tuple]:
        def f(msgs: tuple) -> tuple:
            image, depth, info = msgs
            fields = {n: getattr(depth, n) for n in types.field_names('sensor_msgs/msg/Image')}
            fields.update(kw)
            return image, types.make('sensor_msgs/msg/Image', **fields), info
        return f

    def info_with(**kw: Any) -> Callable[[tuple], tuple]:
        def f(msgs: tuple) -> tuple:
            image, depth, info = msgs
            fields = {n: getattr(info, n)
                      for n in types.field_names('sensor_msgs/msg/CameraInfo')}
            fields.update(kw)
            return image, depth, types.make('sensor_msgs/msg/CameraInfo', **fields)
        return f

    return [
        ('image encoding', 'bad_image', image_with(encoding='64FC3')),
        ('image height', 'bad_image', image_with(height=H + 1)),
        ('image step', 'bad_image', image_with(step=W)),
        ('image data length', 'bad_image', image_with(data=np.zeros(10, np.uint8))),
        ('depth encoding', 'bad_depth', depth_with(encoding='rgb8')),
        ('depth data length', 'bad_depth', depth_with(data=np.zeros(7, np.uint8))),
        ('camera_info K', 'bad_camera_info', info_with(k=np.zeros(9))),
        ('camera_info size', 'bad_camera_info', info_with(width=W * 3)),
    ]


def test_bad_input_is_counted_and_never_published(make_node, ros_stand_in) -> None:
    types = ros_stand_in.types
    node = make_node()
    node.trigger_configure()
    node.trigger_activate()
    grasps = node.test_publisher('grasps')
    for i, (name, reason, mutate) in enumerate(_malformed(types)):
        before = node.core.snapshot()['dropped'].get(reason, 0)
        deliver(node, *mutate(frame_msgs(types, STAMP + i * 10**8)))
        assert wait_for(lambda: node.core.snapshot()['dropped'].get(reason, 0) > before,
                        timeout=10), name
        time.sleep(0.05)
        assert not grasps.published, name
        assert node.test_state == 'active'
    # NaN / zero depth is not a drop: 2-D results with valid_3d false
    depth = np.zeros((H, W), np.uint16)
    deliver(node, *frame_msgs(types, STAMP + 50 * 10**8, depth=depth))
    assert wait_for(lambda: len(grasps.published) == 1)
    assert not any(g.valid_3d for g in grasps.published[0].grasps)
    # out of order: older than the last synchronised image
    deliver(node, *frame_msgs(types, STAMP + 10**8))
    assert wait_for(lambda: node.core.snapshot()['dropped'].get('out_of_order', 0) > 0,
                    timeout=10)
    assert len(grasps.published) == 1
    # the node still works afterwards
    deliver(node, *frame_msgs(types, STAMP + 60 * 10**8))
    assert wait_for(lambda: len(grasps.published) == 2)


def test_stale_frames_are_dropped(make_node, ros_stand_in) -> None:
    node = make_node(max_input_age_ms=100.0)
    node.trigger_configure()
    node.trigger_activate()
    node.get_clock().test_set(STAMP + 5 * 10**9)  # 5 s after the image stamp
    deliver(node, *frame_msgs(ros_stand_in.types))
    assert wait_for(lambda: node.core.snapshot()['dropped'].get('stale', 0) == 1)
    assert not node.test_publisher('grasps').published


def test_main_autostarts(ros_stand_in, ckpt, monkeypatch) -> None:
    from affordance_ros import grounding_node

    created = []
    real = grounding_node.GroundingNode

    def factory(**kw: Any) -> Any:
        from rclpy.parameter import Parameter
        node = real(parameter_overrides=[Parameter('checkpoint', value=str(ckpt)),
                                         Parameter('backend', value='torch'),
                                         Parameter('warmup_runs', value=0)])
        created.append(node)
        return node

    monkeypatch.setattr(grounding_node, 'GroundingNode', factory)
    grounding_node.main([])
    assert created and created[0].test_state == 'active'
    created[0].trigger_deactivate()


def test_compressed_image_transport(make_node, ros_stand_in) -> None:
    import cv2

    types = ros_stand_in.types
    node = make_node(image_transport='compressed')
    node.trigger_configure()
    node.trigger_activate()
    assert {s.topic for s in node._subscriptions} == {'image/compressed', 'depth',
                                                      'camera_info', 'action'}
    image, depth, info = frame_msgs(types)
    ok, jpg = cv2.imencode('.jpg', np.zeros((H, W, 3), np.uint8))
    compressed = types.make('sensor_msgs/msg/CompressedImage', header=image.header,
                            format='jpeg', data=types.u8_array(jpg.tobytes()))
    node.test_subscription('camera_info').test_deliver(info)
    node.test_subscription('depth').test_deliver(depth)
    node.test_subscription('image/compressed').test_deliver(compressed)
    grasps = node.test_publisher('grasps')
    assert wait_for(lambda: len(grasps.published) == 1)
    assert grasps.published[0].header.stamp == image.header.stamp


def test_input_image_auto_reads_the_resolved_image_topic(make_node) -> None:
    node = make_node(node_kwargs={'namespace': '/wrist'})
    node.trigger_configure()
    node.trigger_activate()
    assert node.core.image_topic == '/wrist/image' and not node.core.rectified
    node = make_node(node_kwargs={'cli_args': ['--ros-args', '-r',
                                               'image:=/camera/color/image_rect']})
    node.trigger_configure()
    node.trigger_activate()
    assert node.core.image_topic == '/camera/color/image_rect' and node.core.rectified
    node = make_node(node_kwargs={'cli_args': ['--ros-args', '-r',
                                               'image:=/camera/color/image_rect']},
                     input_image='raw')
    node.trigger_configure()
    node.trigger_activate()
    assert not node.core.rectified


def test_target_frame_uses_tf_at_the_image_stamp(make_node, ros_stand_in) -> None:
    types = ros_stand_in.types
    node = make_node(target_frame='base_link')
    node.trigger_configure()
    node.trigger_activate()
    image, depth, info = frame_msgs(types)
    # base_link <- camera: a pure translation of 1 m along z, valid only at the image stamp
    tf = types.make('geometry_msgs/msg/TransformStamped',
                    header=types.header(STAMP, 'base_link'),
                    child_frame_id='camera_color_optical_frame',
                    transform=types.make('geometry_msgs/msg/Transform',
                                         translation=types.make('geometry_msgs/msg/Vector3',
                                                                x=0.0, y=0.0, z=1.0),
                                         rotation=types.make('geometry_msgs/msg/Quaternion',
                                                             x=0.0, y=0.0, z=0.0, w=1.0)))
    node._tf_buffer.test_set('base_link', 'camera_color_optical_frame', STAMP, tf)
    deliver(node, image, depth, info)
    grasps = node.test_publisher('grasps')
    assert wait_for(lambda: len(grasps.published) == 1)
    out = grasps.published[0]
    assert out.header.frame_id == 'base_link'
    valid = [g for g in out.grasps if g.valid_3d]
    assert valid and all(g.pose.position.z == pytest.approx(1.9, abs=0.01) for g in valid)
    assert node.test_publisher('heatmap').published[0].header.frame_id == \
        'camera_color_optical_frame'
    # no transform at the next stamp: 3-D outputs dropped, heatmap still published
    deliver(node, *frame_msgs(types, STAMP + 10**8))
    heat = node.test_publisher('heatmap')
    assert wait_for(lambda: len(heat.published) == 2)
    assert len(grasps.published) == 1
    assert node.core.snapshot()['dropped'].get('tf_unavailable', 0) == 1
