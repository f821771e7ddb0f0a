"""Approximate time synchronisation of image + depth + camera_info into a newest-frame slot.

Pure Python (no ROS), thread-safe (one lock), used by the node's subscription callbacks and by
``affordance-replay`` through :class:`~affordance_ros.core.GroundingCore`.

Policy (``docs/ros_node.md``, "Synchronisation"):

* Each input keeps the newest ``queue_size`` messages, keyed by stamp (an equal stamp replaces
  the queued message, as in ``message_filters``). An image that falls off its full queue
  unmatched is counted as a drop (``no_depth`` or ``no_camera_info``: what it was waiting for).
* On every message the newest queued image whose nearest depth and nearest camera_info lie
  within ``slop_ns`` is matched. The match goes into the single newest-frame slot (a frame
  still waiting there is replaced and counted ``superseded``: frames are never queued), the
  depth and camera_info used and everything stamped at or before the image are removed from
  the queues, and older queued images are counted as drops like the overflow above.
* A message stamped at or before the last matched image can never form a newer frame: it is
  dropped and counted ``out_of_order``.
* Depth: with ``require_depth`` every image needs a depth within the slop. Without it (RGB-only
  mode) depth is waited for only while the depth stream is alive (a depth message stamped within
  ``optional_timeout_ns`` of the image has been seen); otherwise the image goes out alone for
  2-D results.
* camera_info: needed whenever depth is (no 3-D without K); otherwise waited for only while
  alive, exactly like optional depth, so an image goes out alone when none has been seen.
* :meth:`ApproximateSync.expect` declares optional inputs known to exist (a bag's topics):
  they are waited for from the first image on (for ``optional_timeout_ns``) even before their
  first message, so a stream whose first image precedes its first depth does not start with
  a 2-D-only frame.

Headerless or zero-stamp messages are the caller's to reject (``stamp_ns`` must be > 0).
Cost per message: O(queue_size log queue_size).

Extra public API beyond the contract: :meth:`ApproximateSync.add` (one entry point by kind),
:meth:`ApproximateSync.expect`,
:meth:`ApproximateSync.take` (empty the slot), :meth:`ApproximateSync.peek`,
:meth:`ApproximateSync.counts` and :meth:`ApproximateSync.reset`; ``on_drop`` (a callback
``(reason, count)``, called outside the lock) lets the caller log drops as they happen.
"""
from __future__ import annotations

import bisect
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ['ApproximateSync', 'Frame', 'KINDS', 'SYNC_DROP_REASONS']

KINDS: tuple[str, ...] = ('image', 'depth', 'camera_info')
SYNC_DROP_REASONS: tuple[str, ...] = ('superseded', 'out_of_order', 'no_depth',
                                      'no_camera_info')


@dataclass(frozen=True)
class Frame:
    """One synchronised input frame.

    Attributes:
        image: the image message (sensor_msgs/Image or CompressedImage).
        depth: the depth image message, or None (RGB-only).
        camera_info: the camera_info message, or None (no camera_info seen: 2-D results only).
        stamp_ns: the image stamp in nanoseconds (every output carries it).
    """

    image: Any
    depth: Any
    camera_info: Any
    stamp_ns: int


class _Queue:
    """The newest ``size`` (stamp, message) pairs of one input, sorted by stamp."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.stamps: list[int] = []
        self.msgs: list[Any] = []
        self.last_seen_ns = 0  # newest stamp ever accepted (liveness of optional inputs)
        self.history: deque[int] = deque(maxlen=4 * size + 8)  # recent stamps (drop reasons)

    def insert(self, stamp: int, msg: Any) -> list[tuple[int, Any]]:
        """Insert (replacing an equal stamp); returns the evicted oldest entries."""
        self.last_seen_ns = max(self.last_seen_ns, stamp)
        self.history.append(stamp)
        i = bisect.bisect_left(self.stamps, stamp)
        if i < len(self.stamps) and self.stamps[i] == stamp:
            self.msgs[i] = msg
            return []
        self.stamps.insert(i, stamp)
        self.msgs.insert(i, msg)
        evicted = []
        while len(self.stamps) > self.size:
            evicted.append((self.stamps.pop(0), self.msgs.pop(0)))
        return evicted

    def nearest(self, stamp: int, slop: int) -> int | None:
        """Index of the entry nearest to ``stamp`` within ``slop`` (earlier one on a tie)."""
        i = bisect.bisect_left(self.stamps, stamp)
        best, best_d = None, slop + 1
        for j in (i - 1, i):
            if 0 <= j < len(self.stamps):
                d = abs(self.stamps[j] - stamp)
                if d < best_d:
                    best, best_d = j, d
        return best

    def pop(self, index: int) -> None:
        del self.stamps[index]
        del self.msgs[index]

    def drop_through(self, stamp: int) -> list[tuple[int, Any]]:
        """Remove (and return) every entry stamped at or before ``stamp``."""
        i = bisect.bisect_right(self.stamps, stamp)
        out = list(zip(self.stamps[:i], self.msgs[:i]))
        del self.stamps[:i]
        del self.msgs[:i]
        return out

    def seen_near(self, stamp: int, slop: int) -> bool:
        """A message within ``slop`` of ``stamp`` was received recently (queued or not)."""
        return any(abs(s - stamp) <= slop for s in self.history)

    def clear(self) -> None:
        self.stamps.clear()
        self.msgs.clear()
        self.history.clear()
        self.last_seen_ns = 0


class ApproximateSync:
    """image + depth + camera_info -> newest synchronised :class:`Frame` (see the module doc).

    Args:
        slop_ns: largest stamp difference between the image and its depth / camera_info.
        queue_size: messages kept per input (>= 1).
        require_depth: every frame needs depth (and camera_info); False = RGB-only mode.
        optional_timeout_ns: an optional input (depth without ``require_depth``, camera_info
            without depth) is waited for while one was seen stamped less than this before the
            image.
        on_drop: called as ``on_drop(reason, count)`` after a message or frame was dropped
            (outside the lock).

    Cost: O(queue_size log queue_size) per message (sorted queues, nearest stamps by
    bisection).
    """

    def __init__(self, slop_ns: int, queue_size: int, require_depth: bool, *,
                 optional_timeout_ns: int = 1_000_000_000,
                 on_drop: Callable[[str, int], None] | None = None) -> None:
        if int(slop_ns) < 0:
            raise ValueError(f'slop_ns must be >= 0, got {slop_ns}')
        if int(queue_size) < 1:
            raise ValueError(f'queue_size must be >= 1, got {queue_size}')
        self.slop_ns = int(slop_ns)
        self.queue_size = int(queue_size)
        self.require_depth = bool(require_depth)
        self.optional_timeout_ns = int(optional_timeout_ns)
        self.on_drop = on_drop
        self._lock = threading.Lock()
        self._queues = {kind: _Queue(self.queue_size) for kind in KINDS}
        self._slot: Frame | None = None
        self._last_matched_ns = 0
        self._counts: dict[str, int] = {reason: 0 for reason in SYNC_DROP_REASONS}
        self._matched = 0
        self._expected: set[str] = set()
        self._first_image_ns = 0

    def expect(self, *kinds: str) -> None:
        """Declare optional inputs known to stream (e.g. the topics of a bag): until the first
        one arrives they are waited for during ``optional_timeout_ns`` after the first image,
        so the first frames are not matched without them."""
        unknown = [k for k in kinds if k not in self._queues]
        if unknown:
            raise ValueError(f"unknown input kind '{unknown[0]}'; expected one of "
                             f"{', '.join(KINDS)}")
        with self._lock:
            self._expected.update(kinds)

    # ------------------------------------------------------------------ inputs

    def add_image(self, msg: Any, stamp_ns: int) -> Frame | None:
        """Queue an image; returns the frame this message completed (also put in the slot)."""
        return self.add('image', msg, stamp_ns)

    def add_depth(self, msg: Any, stamp_ns: int) -> Frame | None:
        """Queue a depth image; returns the frame this message completed, if any."""
        return self.add('depth', msg, stamp_ns)

    def add_camera_info(self, msg: Any, stamp_ns: int) -> Frame | None:
        """Queue a camera_info; returns the frame this message completed, if any."""
        return self.add('camera_info', msg, stamp_ns)

    def add(self, kind: str, msg: Any, stamp_ns: int) -> Frame | None:
        """Queue a message of input ``kind`` ('image' | 'depth' | 'camera_info') stamped
        ``stamp_ns`` (> 0); returns the frame it completed (now in the slot) or None."""
        if kind not in self._queues:
            raise ValueError(f"unknown input kind '{kind}'; expected one of {', '.join(KINDS)}")
        stamp = int(stamp_ns)
        if stamp <= 0:
            raise ValueError(f'stamp_ns must be > 0 (reject headerless messages), got {stamp}')
        drops: list[str] = []
        with self._lock:
            frame = self._add_locked(kind, msg, stamp, drops)
            for reason in drops:
                self._counts[reason] += 1
        if drops and self.on_drop is not None:
            for reason in dict.fromkeys(drops):
                self.on_drop(reason, drops.count(reason))
        return frame

    def _add_locked(self, kind: str, msg: Any, stamp: int, drops: list[str]) -> Frame | None:
        if stamp <= self._last_matched_ns:
            drops.append('out_of_order')
            return None
        evicted = self._queues[kind].insert(stamp, msg)
        if kind == 'image':
            if not self._first_image_ns or stamp < self._first_image_ns:
                self._first_image_ns = stamp
            for old_stamp, _ in evicted:
                drops.append(self._missing(old_stamp))
        return self._match(drops)

    def _needs(self, image_stamp: int) -> tuple[bool, bool]:
        """(depth needed, camera_info needed) for an image stamped ``image_stamp``."""
        def alive(kind: str) -> bool:
            last = self._queues[kind].last_seen_ns
            if last > 0:
                return last >= image_stamp - self.optional_timeout_ns
            return kind in self._expected and \
                image_stamp - self._first_image_ns <= self.optional_timeout_ns

        need_depth = self.require_depth or alive('depth')
        need_info = need_depth or alive('camera_info')
        return need_depth, need_info

    def _missing(self, image_stamp: int) -> str:
        """Drop reason of an image that leaves the queue unmatched: the partner never seen
        near its stamp (depth first), else the one no longer queued."""
        need_depth, _ = self._needs(image_stamp)
        depth, info = self._queues['depth'], self._queues['camera_info']
        if need_depth and not depth.seen_near(image_stamp, self.slop_ns):
            return 'no_depth'
        if not info.seen_near(image_stamp, self.slop_ns):
            return 'no_camera_info'
        if need_depth and depth.nearest(image_stamp, self.slop_ns) is None:
            return 'no_depth'
        return 'no_camera_info'

    def _match(self, drops: list[str]) -> Frame | None:
        images, depths, infos = (self._queues[k] for k in KINDS)
        for i in range(len(images.stamps) - 1, -1, -1):  # newest image first
            stamp = images.stamps[i]
            need_depth, need_info = self._needs(stamp)
            di = depths.nearest(stamp, self.slop_ns)
            ci = infos.nearest(stamp, self.slop_ns)
            if (need_depth and di is None) or (need_info and ci is None):
                continue
            frame = Frame(images.msgs[i], depths.msgs[di] if di is not None else None,
                          infos.msgs[ci] if ci is not None else None, stamp)
            # remove what was used and everything at or before the image stamp
            if di is not None:
                depths.pop(di)
            if ci is not None:
                infos.pop(ci)
            older = images.drop_through(stamp)[:-1]
            for old_stamp, _ in older:
                drops.append(self._missing(old_stamp))
            depths.drop_through(stamp)
            infos.drop_through(stamp)
            self._last_matched_ns = stamp
            if self._slot is not None:
                drops.append('superseded')
            self._slot = frame
            self._matched += 1
            return frame
        return None

    # ------------------------------------------------------------------ slot

    def take(self) -> Frame | None:
        """The newest synchronised frame, removed from the slot; None when there is none."""
        with self._lock:
            frame, self._slot = self._slot, None
        return frame

    def peek(self) -> Frame | None:
        """The frame in the slot without removing it."""
        with self._lock:
            return self._slot

    # ------------------------------------------------------------------ state

    @property
    def last_matched_ns(self) -> int:
        """Stamp of the last matched image (0 before the first match)."""
        with self._lock:
            return self._last_matched_ns

    @property
    def matched(self) -> int:
        """Number of frames matched so far."""
        with self._lock:
            return self._matched

    def counts(self) -> dict[str, int]:
        """Copy of the drop counters (:data:`SYNC_DROP_REASONS`)."""
        with self._lock:
            return dict(self._counts)

    def queued(self) -> dict[str, list[int]]:
        """Queued stamps per input (for diagnostics and tests)."""
        with self._lock:
            return {k: list(q.stamps) for k, q in self._queues.items()}

    def reset(self) -> None:
        """Forget queues, slot, the last matched stamp and the counters (e.g. on a time jump
        backwards, a bag loop, or deactivate)."""
        with self._lock:
            for q in self._queues.values():
                q.clear()
            self._slot = None
            self._last_matched_ns = 0
            self._first_image_ns = 0
            self._counts = {reason: 0 for reason in SYNC_DROP_REASONS}
            self._matched = 0
