"""Stand-in for rclpy.qos: the policies and the profile the node uses."""
from __future__ import annotations

from enum import IntEnum
from typing import Any


class HistoryPolicy(IntEnum):
    SYSTEM_DEFAULT = 0
    KEEP_LAST = 1
    KEEP_ALL = 2


class ReliabilityPolicy(IntEnum):
    SYSTEM_DEFAULT = 0
    RELIABLE = 1
    BEST_EFFORT = 2


class DurabilityPolicy(IntEnum):
    SYSTEM_DEFAULT = 0
    TRANSIENT_LOCAL = 1
    VOLATILE = 2


class QoSProfile:
    _FIELDS = ('history', 'depth', 'reliability', 'durability', 'lifespan', 'deadline',
               'liveliness', 'liveliness_lease_duration', 'avoid_ros_namespace_conventions')

    def __init__(self, **kwargs: Any) -> None:
        assert all(k in self._FIELDS for k in kwargs), \
            'Invalid arguments passed to constructor: %r' % kwargs.keys()
        if 'history' not in kwargs and 'depth' not in kwargs:
            raise TypeError('QoSProfile needs history or depth')
        self.history = kwargs.get('history', HistoryPolicy.KEEP_LAST)
        self.depth = kwargs.get('depth', 10)
        self.reliability = kwargs.get('reliability', ReliabilityPolicy.RELIABLE)
        self.durability = kwargs.get('durability', DurabilityPolicy.VOLATILE)


qos_profile_sensor_data = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=5,
                                     reliability=ReliabilityPolicy.BEST_EFFORT,
                                     durability=DurabilityPolicy.VOLATILE)
