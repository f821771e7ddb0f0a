"""Stand-in for rclpy.time.Time."""
from __future__ import annotations

from typing import Any


class Time:
    def __init__(self, *, seconds: float = 0, nanoseconds: int = 0,
                 clock_type: Any = None) -> None:
        self._ns = int(seconds * 1e9) + int(nanoseconds)

    @property
    def nanoseconds(self) -> int:
        return self._ns

    def seconds_nanoseconds(self) -> tuple[int, int]:
        return self._ns // 10**9, self._ns % 10**9

    def to_msg(self) -> Any:
        from builtin_interfaces.msg import Time as TimeMsg
        sec, nsec = self.seconds_nanoseconds()
        return TimeMsg(sec=sec, nanosec=nsec)
