"""Stand-in for tf2_ros: a Buffer that answers lookups at a stamp from set transforms."""
from __future__ import annotations

from typing import Any, Optional


class LookupException(Exception):
    pass


class ExtrapolationException(Exception):
    pass


class ConnectivityException(Exception):
    pass


class TransformException(Exception):
    pass


class Buffer:
    def __init__(self, cache_time: Any = None, node: Any = None) -> None:
        self._tf: dict[tuple[str, str], list[tuple[int, Any]]] = {}

    def test_set(self, target: str, source: str, stamp_ns: int, transform: Any) -> None:
        self._tf.setdefault((target, source), []).append((stamp_ns, transform))

    def lookup_transform(self, target_frame: str, source_frame: str, time: Any,
                         timeout: Optional[Any] = None) -> Any:
        entries = self._tf.get((target_frame, source_frame))
        if not entries:
            raise LookupException(f'"{target_frame}" -> "{source_frame}" not in buffer')
        for stamp, tf in entries:
            if stamp == time.nanoseconds:
                return tf
        raise ExtrapolationException(f'no transform at {time.nanoseconds} ns')


class TransformListener:
    def __init__(self, buffer: Buffer, node: Any, *, spin_thread: bool = False,
                 qos: Any = None, static_qos: Any = None) -> None:
        self.buffer = buffer
