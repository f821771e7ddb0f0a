"""Stand-in for rclpy.duration.Duration."""
from __future__ import annotations


class Duration:
    def __init__(self, *, seconds: float = 0, nanoseconds: int = 0) -> None:
        self._ns = int(seconds * 1e9) + int(nanoseconds)

    @property
    def nanoseconds(self) -> int:
        return self._ns
