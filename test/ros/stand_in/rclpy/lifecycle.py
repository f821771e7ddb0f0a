"""Stand-in for rclpy.lifecycle: LifecycleNode with the standard state machine.

Transitions run the on_* callbacks like rclpy: SUCCESS moves to the goal state, FAILURE back to
the start state, ERROR (or an exception) to 'unconfigured' after on_error. Lifecycle publishers
only publish while the node is active (like rclpy's LifecyclePublisher).
"""
from __future__ import annotations

from enum import IntEnum
from typing import Any, NamedTuple

from rclpy.node import Node, Publisher


class TransitionCallbackReturn(IntEnum):
    SUCCESS = 97
    FAILURE = 98
    ERROR = 99


class LifecycleState(NamedTuple):
    label: str
    state_id: int


State = LifecycleState

_IDS = {'unconfigured': 1, 'inactive': 2, 'active': 3, 'finalized': 4}


class LifecyclePublisher(Publisher):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.enabled = False

    def publish(self, msg: Any) -> None:
        if self.enabled:
            super().publish(msg)

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.enabled = True
        return TransitionCallbackReturn.SUCCESS

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.enabled = False
        return TransitionCallbackReturn.SUCCESS


class LifecycleNode(Node):
    def __init__(self, node_name: str, *, enable_communication_interface: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        self.test_state = 'unconfigured'
        self._managed: list[LifecyclePublisher] = []

    def _state(self) -> LifecycleState:
        return LifecycleState(self.test_state, _IDS[self.test_state])

    def _change(self, name: str, start: str, goal: str) -> TransitionCallbackReturn:
        if self.test_state != start:
            raise RuntimeError(f'transition {name} not possible from {self.test_state}')
        try:
            ret = getattr(self, f'on_{name}')(self._state())
        except Exception:
            ret = TransitionCallbackReturn.ERROR
        if not isinstance(ret, TransitionCallbackReturn):
            raise TypeError(f'on_{name}() return value should be `TransitionCallbackReturn`')
        if ret == TransitionCallbackReturn.SUCCESS:
            self.test_state = goal
        elif ret == TransitionCallbackReturn.FAILURE:
            self.test_state = start
        else:
            self.on_error(self._state())
            self.test_state = 'unconfigured'
        return ret

    def trigger_configure(self) -> TransitionCallbackReturn:
        return self._change('configure', 'unconfigured', 'inactive')

    def trigger_cleanup(self) -> TransitionCallbackReturn:
        return self._change('cleanup', 'inactive', 'unconfigured')

    def trigger_activate(self) -> TransitionCallbackReturn:
        return self._change('activate', 'inactive', 'active')

    def trigger_deactivate(self) -> TransitionCallbackReturn:
        return self._change('deactivate', 'active', 'inactive')

    def trigger_shutdown(self) -> TransitionCallbackReturn:
        return self._change('shutdown', self.test_state, 'finalized')

    def create_lifecycle_publisher(self, *args: Any, **kwargs: Any) -> LifecyclePublisher:
        pub = self.create_publisher(*args, publisher_class=LifecyclePublisher, **kwargs)
        assert isinstance(pub, LifecyclePublisher)
        self._managed.append(pub)
        if self.test_state == 'active':
            pub.enabled = True
        return pub

    def destroy_lifecycle_publisher(self, publisher: LifecyclePublisher) -> bool:
        self._managed.remove(publisher)
        return self.destroy_publisher(publisher)

    # default callbacks (rclpy's call the managed entities)
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        return TransitionCallbackReturn.SUCCESS

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        for p in self._managed:
            p.on_activate(state)
        return TransitionCallbackReturn.SUCCESS

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        for p in self._managed:
            p.on_deactivate(state)
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        return TransitionCallbackReturn.SUCCESS
