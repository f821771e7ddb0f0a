"""Where ROS message classes come from: a ROS 2 install (rclpy) or a rosbags typestore.

The message builders and converters never import message packages; they ask a
:class:`MessageTypes` for classes by their full name (``'sensor_msgs/msg/Image'``; the short form
``'sensor_msgs/Image'`` is accepted too) and construct them with :meth:`MessageTypes.make`, which
takes every field by keyword (rosbags classes have no defaults).

* :class:`RosMessageTypes` imports ``<pkg>.msg`` lazily (needs a sourced ROS 2 install).
* :class:`BagMessageTypes` is a rosbags typestore (ROS 2 Humble store) plus our ``msg/*.msg`` and
  the vision_msgs 4.x types we publish, for tests and ``affordance-replay`` without ROS.

Conventions: stamps are integer nanoseconds since the epoch (``builtin_interfaces/Time``);
``uint8[]`` values come from :meth:`MessageTypes.u8_array`, float64 arrays from
:meth:`MessageTypes.f64_array`.
"""
from __future__ import annotations

import abc
import array
import dataclasses
import importlib
import sys
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ['MessageTypes', 'RosMessageTypes', 'BagMessageTypes', 'RosUnavailableError',
           'OUR_MESSAGES', 'VISION_MSGS_DEFINITIONS', 'find_msg_dir', 'normalize_name',
           'stamp_ns']

PACKAGE = 'affordance_ros'
OUR_MESSAGES: tuple[str, ...] = ('AffordanceGrasp', 'AffordanceGraspArray')  # dependency order

# vision_msgs 4.x (ros-perception/vision_msgs, Apache-2.0): field lists of the types we publish,
# in dependency order (comments left out; they do not change the definition hashes).
VISION_MSGS_DEFINITIONS: dict[str, str] = {
    'vision_msgs/msg/ObjectHypothesis': 'string class_id\nfloat64 score\n',
    'vision_msgs/msg/ObjectHypothesisWithPose': (
        'vision_msgs/ObjectHypothesis hypothesis\ngeometry_msgs/PoseWithCovariance pose\n'),
    'vision_msgs/msg/BoundingBox3D': 'geometry_msgs/Pose center\ngeometry_msgs/Vector3 size\n',
    'vision_msgs/msg/Detection3D': (
        'std_msgs/Header header\nvision_msgs/ObjectHypothesisWithPose[] results\n'
        'vision_msgs/BoundingBox3D bbox\nstring id\n'),
    'vision_msgs/msg/Detection3DArray': (
        'std_msgs/Header header\nvision_msgs/Detection3D[] detections\n'),
}

NS_PER_S = 1_000_000_000
REPO_MSG_DIR = Path(__file__).resolve().parent.parent / 'msg'  # source checkout


class RosUnavailableError(ImportError):
    """A ROS 2 message package cannot be imported (no sourced ROS 2 installation)."""


def normalize_name(name: str) -> str:
    """``'pkg/Name'`` or ``'pkg/msg/Name'`` -> ``'pkg/msg/Name'``.

    Raises:
        KeyError: not a message type name.
    """
    parts = str(name).strip().split('/')
    if len(parts) == 2 and all(parts):
        return f'{parts[0]}/msg/{parts[1]}'
    if len(parts) == 3 and parts[1] == 'msg' and parts[0] and parts[2]:
        return '/'.join(parts)
    raise KeyError(f"'{name}' is not a message type name (expected 'package/msg/Name')")


def stamp_ns(header: Any) -> int:
    """``header.stamp`` in integer nanoseconds (a ``builtin_interfaces/Time`` is accepted too)."""
    stamp = getattr(header, 'stamp', header)
    return int(stamp.sec) * NS_PER_S + int(stamp.nanosec)


def find_msg_dir() -> Path:
    """The folder with our ``.msg`` files: the repository's ``msg/`` beside this package, else
    ``<sys.prefix>/share/affordance_ros/msg`` (a pip install), else ``share/affordance_ros/msg``
    of a ROS install (via ``ament_index_python`` when importable).

    Raises:
        FileNotFoundError: neither exists (the message says where it looked).
    """
    repo = REPO_MSG_DIR
    tried = [str(repo)]
    if (repo / f'{OUR_MESSAGES[0]}.msg').is_file():
        return repo
    pip_share = Path(sys.prefix) / 'share' / PACKAGE / 'msg'  # setup.py's data_files
    tried.append(str(pip_share))
    if (pip_share / f'{OUR_MESSAGES[0]}.msg').is_file():
        return pip_share
    try:
        from ament_index_python.packages import get_package_share_directory
    except ImportError:
        tried.append('ament_index_python (not importable)')
    else:
        try:
            share = Path(get_package_share_directory(PACKAGE)) / 'msg'
        except Exception as exc:  # PackageNotFoundError and friends
            tried.append(f'ament index: {exc}')
        else:
            tried.append(str(share))
            if (share / f'{OUR_MESSAGES[0]}.msg').is_file():
                return share
    raise FileNotFoundError(f'{PACKAGE} message definitions ({OUR_MESSAGES[0]}.msg) not found; '
                            f"looked in: {'; '.join(tried)}")


class MessageTypes(abc.ABC):
    """Message classes by name, plus the few value helpers the builders need."""

    @abc.abstractmethod
    def __getitem__(self, name: str) -> type:
        """``'sensor_msgs/msg/Image'`` -> its class."""

    @abc.abstractmethod
    def field_names(self, name: str) -> tuple[str, ...]:
        """The field names of a message type, in definition order."""

    @abc.abstractmethod
    def u8_array(self, data: np.ndarray | bytes) -> Any:
        """Value for a ``uint8[]`` field from bytes or a uint8 array (flattened)."""

    @abc.abstractmethod
    def f64_array(self, data: Any) -> Any:
        """Value for a ``float64[N]`` / ``float64[]`` field."""

    def make(self, name: str, /, **fields: Any) -> Any:
        """Construct a message; every field must be given by keyword (``name`` is
        positional-only, since some messages have a field called ``name``).

        Raises:
            TypeError: missing or unknown fields (all of them are named).
            KeyError: unknown message type.
        """
        cls = self[name]
        names = self.field_names(name)
        missing = [n for n in names if n not in fields]
        unknown = [n for n in fields if n not in names]
        if missing or unknown:
            parts = []
            if missing:
                parts.append(f"missing field(s) {', '.join(map(repr, missing))}")
            if unknown:
                parts.append(f"unknown field(s) {', '.join(map(repr, unknown))}")
            raise TypeError(f"{normalize_name(name)}: {'; '.join(parts)} "
                            f"(fields: {', '.join(names)})")
        return cls(**fields)

    def time(self, stamp_ns: int) -> Any:
        """``builtin_interfaces/msg/Time`` from nanoseconds (>= 0)."""
        ns = int(stamp_ns)
        if ns < 0:
            raise ValueError(f'a stamp must be >= 0 ns, got {ns}')
        return self.make('builtin_interfaces/msg/Time', sec=ns // NS_PER_S,
                         nanosec=ns % NS_PER_S)

    def duration(self, ns: int) -> Any:
        """``builtin_interfaces/msg/Duration`` from nanoseconds (nanosec is always in
        [0, 1e9), as ROS normalises negative durations)."""
        ns = int(ns)
        return self.make('builtin_interfaces/msg/Duration', sec=ns // NS_PER_S,
                         nanosec=ns % NS_PER_S)

    def header(self, stamp_ns: int, frame_id: str) -> Any:
        """``std_msgs/msg/Header``."""
        return self.make('std_msgs/msg/Header', stamp=self.time(stamp_ns),
                         frame_id=str(frame_id))


class RosMessageTypes(MessageTypes):
    """Message classes of a ROS 2 installation, imported on first use (``<pkg>.msg``)."""

    def __init__(self) -> None:
        self._classes: dict[str, type] = {}

    def __getitem__(self, name: str) -> type:
        full = normalize_name(name)
        cls = self._classes.get(full)
        if cls is None:
            pkg, _, short = full.split('/')
            try:
                module = importlib.import_module(f'{pkg}.msg')
            except ImportError as exc:
                raise RosUnavailableError(
                    f"cannot import '{pkg}.msg' ({exc}): RosMessageTypes needs a sourced ROS 2 "
                    'installation with that package (source /opt/ros/<distro>/setup.bash and '
                    'the workspace install/setup.bash); without ROS 2 use BagMessageTypes'
                ) from exc
            try:
                cls = getattr(module, short)
            except AttributeError:
                raise KeyError(f"message type '{full}' not found in '{pkg}.msg'") from None
            self._classes[full] = cls
        return cls

    def field_names(self, name: str) -> tuple[str, ...]:
        cls = self[name]
        getter = getattr(cls, 'get_fields_and_field_types', None)
        if getter is not None:  # rclpy
            return tuple(getter())
        if dataclasses.is_dataclass(cls):  # rosbags classes standing in for a ROS install
            return tuple(f.name for f in dataclasses.fields(cls)
                         if not str(f.type).startswith(('ClassVar', 'typing.ClassVar')))
        return tuple(s.lstrip('_') for s in getattr(cls, '__slots__', ())
                     if s != '_check_fields')

    def u8_array(self, data: np.ndarray | bytes) -> Any:
        """``array.array('B')``: what rclpy's ``uint8[]`` setters store (no per-element check)."""
        if isinstance(data, np.ndarray):
            data = np.ascontiguousarray(data, dtype=np.uint8).tobytes()
        return array.array('B', bytes(data))

    def f64_array(self, data: Any) -> Any:
        """A flat numpy float64 array (what rclpy stores for fixed ``float64[N]`` fields such as
        ``PoseWithCovariance.covariance``)."""
        return np.ascontiguousarray(data, dtype=np.float64).reshape(-1)


class BagMessageTypes(MessageTypes):
    """A rosbags typestore (ROS 2 Humble) with our messages and vision_msgs 4.x registered.

    Args:
        msg_dir: folder with ``AffordanceGrasp.msg`` and ``AffordanceGraspArray.msg``; None =
            :func:`find_msg_dir`.

    Attributes:
        typestore: the ``rosbags.typesys`` store, for ``serialize_cdr`` / ``deserialize_cdr``
            and ``rosbags.rosbag2.Writer.add_connection(..., typestore=...)``.
    """

    def __init__(self, msg_dir: str | Path | None = None) -> None:
        from rosbags.typesys import Stores, get_types_from_msg, get_typestore

        self.typestore = get_typestore(Stores.ROS2_HUMBLE)
        for name, text in VISION_MSGS_DEFINITIONS.items():
            if name not in self.typestore.types:
                self.typestore.register(get_types_from_msg(text, name))
        folder = Path(msg_dir) if msg_dir is not None else find_msg_dir()
        for short in OUR_MESSAGES:
            path = folder / f'{short}.msg'
            try:
                text = path.read_text(encoding='utf-8')
            except OSError as exc:
                raise FileNotFoundError(f'cannot read message definition {path}: {exc}') from exc
            self.typestore.register(get_types_from_msg(text, f'{PACKAGE}/msg/{short}'))

    def __getitem__(self, name: str) -> type:
        full = normalize_name(name)
        try:
            return self.typestore.types[full]
        except KeyError:
            raise KeyError(f"message type '{full}' is not in the typestore (ROS 2 Humble + "
                           f"{PACKAGE} + vision_msgs 4.x)") from None

    def field_names(self, name: str) -> tuple[str, ...]:
        # the typestore's field definitions (its dataclasses also list constants and
        # __msgtype__ as fields)
        self[name]
        _, fields = self.typestore.fielddefs[normalize_name(name)]
        return tuple(f[0] for f in fields)

    def u8_array(self, data: np.ndarray | bytes) -> Any:
        """A flat numpy uint8 array."""
        if isinstance(data, np.ndarray):
            return np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
        return np.frombuffer(bytes(data), dtype=np.uint8)

    def f64_array(self, data: Any) -> Any:
        """A flat numpy float64 array."""
        return np.ascontiguousarray(data, dtype=np.float64).reshape(-1)

    def msgdef(self, name: str) -> str:
        """Full ROS 2 message definition text (with its ``MSG:`` dependencies), as rosbag2 and
        MCAP store it for a connection (``Writer.add_connection(topic, name, msgdef=...,
        rihs01=self.rihs01(name))``; passing ``typestore=self.typestore`` writes the same)."""
        text, _ = self.typestore.generate_msgdef(normalize_name(name), ros_version=2)
        return text

    def rihs01(self, name: str) -> str:
        """The ROS 2 type hash (``RIHS01_...``) of a message type."""
        return self.typestore.hash_rihs01(normalize_name(name))
