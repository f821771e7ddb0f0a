"""affordance_ros.msgtypes: the rosbags typestore (our messages, vision_msgs 4.x), make(),
value helpers, message definitions for bags, and RosMessageTypes without ROS."""
from __future__ import annotations

import array
import ast
import sys
import types as pytypes
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from affordance_ros import msgtypes
from affordance_ros.msgtypes import (BagMessageTypes, MessageTypes, RosMessageTypes,
                                     RosUnavailableError, normalize_name, stamp_ns)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope='module')
def bag_types() -> BagMessageTypes:
    return BagMessageTypes()


def test_is_a_message_types(bag_types: BagMessageTypes) -> None:
    assert isinstance(bag_types, MessageTypes)
    assert isinstance(RosMessageTypes(), MessageTypes)


@pytest.mark.parametrize('name, fields', [
    ('affordance_ros/msg/AffordanceGrasp',
     ('action', 'score', 'u', 'v', 'valid_3d', 'pose', 'width', 'depth_spread')),
    ('affordance_ros/msg/AffordanceGraspArray', ('header', 'actions', 'grasps', 'inference_ms')),
    ('vision_msgs/msg/Detection3DArray', ('header', 'detections')),
    ('vision_msgs/msg/Detection3D', ('header', 'results', 'bbox', 'id')),
    ('vision_msgs/msg/ObjectHypothesisWithPose', ('hypothesis', 'pose')),
    ('vision_msgs/msg/ObjectHypothesis', ('class_id', 'score')),
    ('vision_msgs/msg/BoundingBox3D', ('center', 'size')),
    ('sensor_msgs/msg/Image',
     ('header', 'height', 'width', 'encoding', 'is_bigendian', 'step', 'data')),
])
def test_registered_field_lists(bag_types: BagMessageTypes, name: str,
                                fields: tuple[str, ...]) -> None:
    assert bag_types.field_names(name) == fields
    assert bag_types[name].__msgtype__ == name


def test_registered_field_types(bag_types: BagMessageTypes) -> None:
    defs = bag_types.typestore.fielddefs
    grasp = dict(defs['affordance_ros/msg/AffordanceGrasp'][1])
    assert grasp['score'][1] == ('float32', 0)
    assert grasp['valid_3d'][1] == ('bool', 0)
    assert grasp['pose'][1] == 'geometry_msgs/msg/Pose'
    arr = dict(defs['affordance_ros/msg/AffordanceGraspArray'][1])
    assert arr['grasps'][1][0][1] == 'affordance_ros/msg/AffordanceGrasp'
    hyp = dict(defs['vision_msgs/msg/ObjectHypothesis'][1])
    assert hyp['score'][1] == ('float64', 0) and hyp['class_id'][1] == ('string', 0)
    det = dict(defs['vision_msgs/msg/ObjectHypothesisWithPose'][1])
    assert det['pose'][1] == 'geometry_msgs/msg/PoseWithCovariance'


def test_short_names_and_unknown_type(bag_types: BagMessageTypes) -> None:
    assert bag_types['sensor_msgs/Image'] is bag_types['sensor_msgs/msg/Image']
    assert normalize_name('a/B') == 'a/msg/B'
    with pytest.raises(KeyError, match='not in the typestore'):
        bag_types['nope_msgs/msg/Nope']
    with pytest.raises(KeyError, match='not a message type name'):
        normalize_name('Image')


def test_make_names_missing_and_unknown_fields(bag_types: BagMessageTypes) -> None:
    with pytest.raises(TypeError) as err:
        bag_types.make('std_msgs/msg/Header', stamp=bag_types.time(0), frameid='x')
    text = str(err.value)
    assert "std_msgs/msg/Header" in text
    assert "missing field(s) 'frame_id'" in text
    assert "unknown field(s) 'frameid'" in text


def test_make_accepts_a_field_called_name(bag_types: BagMessageTypes) -> None:
    f = bag_types.make('sensor_msgs/msg/PointField', name='x', offset=0, datatype=7, count=1)
    assert f.name == 'x'


def test_time_header_duration_and_stamp_ns(bag_types: BagMessageTypes) -> None:
    ns = 1_700_000_000_123_456_789
    h = bag_types.header(ns, 'camera_color_optical_frame')
    assert (h.stamp.sec, h.stamp.nanosec) == (1_700_000_000, 123_456_789)
    assert h.frame_id == 'camera_color_optical_frame'
    assert stamp_ns(h) == ns
    assert stamp_ns(h.stamp) == ns
    d = bag_types.duration(1_500_000_000)
    assert (d.sec, d.nanosec) == (1, 500_000_000)
    d = bag_types.duration(-1)
    assert (d.sec, d.nanosec) == (-1, 999_999_999)
    with pytest.raises(ValueError, match='>= 0'):
        bag_types.time(-5)
    # serialises
    ts = bag_types.typestore
    back = ts.deserialize_cdr(ts.serialize_cdr(h, 'std_msgs/msg/Header'), 'std_msgs/msg/Header')
    assert stamp_ns(back) == ns and back.frame_id == h.frame_id


def test_array_helpers(bag_types: BagMessageTypes) -> None:
    u = bag_types.u8_array(b'\x01\x02\x03')
    assert isinstance(u, np.ndarray) and u.dtype == np.uint8 and u.tolist() == [1, 2, 3]
    u = bag_types.u8_array(np.arange(6, dtype=np.uint8).reshape(2, 3))
    assert u.shape == (6,)
    f = bag_types.f64_array([[1, 2], [3, 4]])
    assert f.dtype == np.float64 and f.shape == (4,)


@pytest.mark.parametrize('name', ['affordance_ros/msg/AffordanceGraspArray',
                                  'vision_msgs/msg/Detection3DArray'])
def test_msgdef_is_the_full_ros2_definition(bag_types: BagMessageTypes, name: str) -> None:
    text = bag_types.msgdef(name)
    assert text == bag_types.typestore.generate_msgdef(name, ros_version=2)[0]
    assert 'MSG: std_msgs/Header' in text
    assert 'builtin_interfaces/Time stamp' in text  # ROS 2 form, not ROS 1 'time stamp'
    if 'affordance' in name:
        assert 'MSG: affordance_ros/AffordanceGrasp' in text
        assert 'bool valid_3d' in text
    else:
        assert 'MSG: vision_msgs/ObjectHypothesisWithPose' in text
        assert 'MSG: geometry_msgs/PoseWithCovariance' in text
        assert 'float64[36] covariance' in text
    assert bag_types.rihs01(name).startswith('RIHS01_')


@pytest.mark.parametrize('suffix', ['mcap', 'db3'])
def test_custom_types_round_trip_through_a_bag(bag_types: BagMessageTypes, tmp_path: Path,
                                               suffix: str) -> None:
    """A bag written with our definitions is readable by a reader that knows nothing else."""
    from rosbags.highlevel import AnyReader
    from rosbags.rosbag2 import StoragePlugin, Writer

    t = bag_types
    grasp = t.make('affordance_ros/msg/AffordanceGrasp', action='hold', score=0.5, u=1.0, v=2.0,
                   valid_3d=False,
                   pose=t.make('geometry_msgs/msg/Pose',
                               position=t.make('geometry_msgs/msg/Point', x=0.0, y=0.0, z=0.0),
                               orientation=t.make('geometry_msgs/msg/Quaternion', x=0.0,
                                                  y=0.0, z=0.0, w=1.0)),
                   width=0.0, depth_spread=0.0)
    msg = t.make('affordance_ros/msg/AffordanceGraspArray', header=t.header(5, 'cam'),
                 actions=['hold'], grasps=[grasp], inference_ms=1.5)
    name = 'affordance_ros/msg/AffordanceGraspArray'
    path = tmp_path / 'bag'
    plugin = StoragePlugin.MCAP if suffix == 'mcap' else StoragePlugin.SQLITE3
    with Writer(path, version=9, storage_plugin=plugin) as writer:
        conn = writer.add_connection('/grasps', name, msgdef=t.msgdef(name),
                                     rihs01=t.rihs01(name))
        writer.write(conn, 5, t.typestore.serialize_cdr(msg, name))
    with AnyReader([path]) as reader:  # builds its types from the definitions in the bag
        (conn, _, raw), = list(reader.messages())
        back = reader.deserialize(raw, conn.msgtype)
    assert conn.msgtype == name
    assert back.actions == ['hold'] and back.grasps[0].action == 'hold'
    assert back.grasps[0].pose.orientation.w == 1.0 and back.header.frame_id == 'cam'


def test_explicit_and_missing_msg_dir(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match='AffordanceGrasp.msg'):
        BagMessageTypes(tmp_path)
    for f in (REPO / 'msg').glob('*.msg'):
        (tmp_path / f.name).write_text(f.read_text())
    assert 'affordance_ros/msg/AffordanceGrasp' in BagMessageTypes(tmp_path).typestore.types


def test_msg_dir_from_the_ament_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    share = tmp_path / 'share' / 'affordance_ros'
    (share / 'msg').mkdir(parents=True)
    for f in (REPO / 'msg').glob('*.msg'):
        (share / 'msg' / f.name).write_text(f.read_text())
    fake = pytypes.ModuleType('ament_index_python.packages')

    def get_package_share_directory(pkg: str) -> str:
        assert pkg == 'affordance_ros'
        return str(share)

    fake.get_package_share_directory = get_package_share_directory  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, 'ament_index_python',
                        pytypes.ModuleType('ament_index_python'))
    monkeypatch.setitem(sys.modules, 'ament_index_python.packages', fake)
    monkeypatch.setattr(msgtypes, 'REPO_MSG_DIR', tmp_path / 'nowhere')
    assert msgtypes.find_msg_dir() == share / 'msg'
    monkeypatch.setitem(sys.modules, 'ament_index_python.packages', None)
    with pytest.raises(FileNotFoundError, match='nowhere.*ament_index_python'):
        msgtypes.find_msg_dir()


def test_ros_message_types_without_ros(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, 'sensor_msgs', None)  # import fails even where ROS exists
    types = RosMessageTypes()  # constructing imports nothing
    with pytest.raises(ImportError) as err:
        types['sensor_msgs/msg/Image']
    assert isinstance(err.value, RosUnavailableError)
    assert 'ROS 2' in str(err.value) and 'sensor_msgs' in str(err.value)
    with pytest.raises(RosUnavailableError, match='ROS 2'):
        types.make('sensor_msgs/msg/Image', height=1)


class _FakeRosMsg:
    """Shaped like an rclpy message class (keyword constructor, field listing)."""

    _fields = {'name': 'string', 'data': 'sequence<uint8>'}

    def __init__(self, **kwargs: Any) -> None:
        for key, value in kwargs.items():
            setattr(self, key, value)

    @classmethod
    def get_fields_and_field_types(cls) -> dict[str, str]:
        return dict(cls._fields)


def test_ros_message_types_with_a_fake_package(monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = pytypes.ModuleType('fake_msgs')
    mod = pytypes.ModuleType('fake_msgs.msg')
    mod.Thing = _FakeRosMsg  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, 'fake_msgs', pkg)
    monkeypatch.setitem(sys.modules, 'fake_msgs.msg', mod)
    types = RosMessageTypes()
    assert types['fake_msgs/Thing'] is _FakeRosMsg
    assert types.field_names('fake_msgs/msg/Thing') == ('name', 'data')
    msg = types.make('fake_msgs/msg/Thing', name='a', data=types.u8_array(b'\x07'))
    assert msg.name == 'a'
    assert isinstance(msg.data, array.array) and msg.data.typecode == 'B'
    assert list(types.u8_array(np.array([1, 2], np.uint8))) == [1, 2]
    with pytest.raises(TypeError, match="missing field.*'data'"):
        types.make('fake_msgs/msg/Thing', name='a')
    with pytest.raises(KeyError, match='not found'):
        types['fake_msgs/msg/Other']
    cov = types.f64_array(np.eye(6))
    assert isinstance(cov, np.ndarray) and cov.dtype == np.float64 and cov.shape == (36,)


def test_ros_message_types_over_rosbags_classes(bag_types: BagMessageTypes,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The test stand-in for a ROS install serves rosbags classes as ``<pkg>.msg``."""
    mod = pytypes.ModuleType('visualization_msgs.msg')
    mod.Marker = bag_types['visualization_msgs/msg/Marker']  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, 'visualization_msgs', pytypes.ModuleType('x'))
    monkeypatch.setitem(sys.modules, 'visualization_msgs.msg', mod)
    names = RosMessageTypes().field_names('visualization_msgs/msg/Marker')
    assert names == bag_types.field_names('visualization_msgs/msg/Marker')
    assert 'DELETEALL' not in names and '__msgtype__' not in names


@pytest.mark.parametrize('module', ['msgtypes', 'conversions', 'outputs'])
def test_no_ros_imports_at_module_level(module: str) -> None:
    tree = ast.parse((REPO / 'affordance_ros' / f'{module}.py').read_text())
    ros = ('rclpy', 'sensor_msgs', 'std_msgs', 'geometry_msgs', 'vision_msgs',
           'visualization_msgs', 'diagnostic_msgs', 'builtin_interfaces', 'cv_bridge',
           'affordance_ros.msg')
    for node in tree.body:  # top level only: imports inside functions are lazy
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or '']
        for name in names:
            top = name if name == 'affordance_ros.msg' else name.split('.')[0]
            assert top not in ros, f'{module}.py imports {name} at module level'
