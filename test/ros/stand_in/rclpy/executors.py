"""Stand-in for rclpy.executors (nothing spins: tests call the callbacks)."""
from __future__ import annotations

from typing import Any, Optional


class Executor:
    def __init__(self, *, context: Any = None) -> None:
        self.nodes: list[Any] = []

    def add_node(self, node: Any) -> bool:
        self.nodes.append(node)
        return True

    def spin(self) -> None:
        """Returns at once."""

    def shutdown(self, timeout_sec: Optional[float] = None) -> bool:
        return True


class SingleThreadedExecutor(Executor):
    pass


class MultiThreadedExecutor(Executor):
    def __init__(self, num_threads: Optional[int] = None, *, context: Any = None) -> None:
        super().__init__(context=context)
