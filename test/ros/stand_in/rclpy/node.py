"""Stand-in for rclpy.node.Node: parameters, publishers, subscriptions, timers, logger, clock.

Signatures follow rclpy (Humble and later); behaviour is what the node relies on: declared
parameters take overrides from ``parameter_overrides`` (what a params file gives), set callbacks
can reject a change, publishers record what they publish.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional

from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy.parameter import Parameter
from rclpy.time import Time


class ParameterAlreadyDeclaredException(Exception):
    pass


class ParameterNotDeclaredException(Exception):
    pass


class InvalidParameterValueException(Exception):
    pass


class Clock:
    def __init__(self) -> None:
        self._ns = 1_700_000_000 * 10**9

    def now(self) -> Time:
        return Time(nanoseconds=self._ns)

    def test_set(self, ns: int) -> None:
        self._ns = int(ns)


class Publisher:
    def __init__(self, msg_type: Any, topic: str, qos_profile: Any) -> None:
        self.msg_type, self.topic, self.qos_profile = msg_type, topic, qos_profile
        self.published: list[Any] = []
        self.test_subscribers = 1
        self.destroyed = False

    def publish(self, msg: Any) -> None:
        if self.destroyed:
            raise RuntimeError(f'publish on destroyed publisher {self.topic}')
        if not isinstance(msg, self.msg_type):
            raise TypeError(f'{self.topic}: expected {self.msg_type.__name__}, got '
                            f'{type(msg).__name__}')
        self.published.append(msg)

    def get_subscription_count(self) -> int:
        return self.test_subscribers


class Subscription:
    def __init__(self, msg_type: Any, topic: str, callback: Callable[[Any], None],
                 qos_profile: Any, resolved: str = '') -> None:
        self.msg_type, self.topic, self.callback = msg_type, topic, callback
        self.qos_profile = qos_profile
        self.destroyed = False
        self._resolved = resolved or topic

    @property
    def topic_name(self) -> str:
        """The resolved name (namespace and remapping applied), as rclpy's property."""
        return self._resolved

    def test_deliver(self, msg: Any) -> None:
        if self.destroyed:
            raise RuntimeError(f'delivery on destroyed subscription {self.topic}')
        self.callback(msg)


class Timer:
    def __init__(self, period: float, callback: Callable[[], Any]) -> None:
        self.timer_period_ns = int(period * 1e9)
        self.callback = callback
        self.destroyed = False

    def cancel(self) -> None:
        self.destroyed = True

    def test_fire(self) -> None:
        self.callback()


class Node:
    def __init__(self, node_name: str, *, context: Any = None, cli_args: Any = None,
                 namespace: Optional[str] = None, use_global_arguments: bool = True,
                 enable_rosout: bool = True, start_parameter_services: bool = True,
                 parameter_overrides: Optional[list[Parameter]] = None,
                 allow_undeclared_parameters: bool = False,
                 automatically_declare_parameters_from_overrides: bool = False,
                 enable_logger_service: bool = False) -> None:
        self._name = node_name
        self._namespace = namespace or '/'
        # '--ros-args -r from:=to' remapping rules of cli_args (topic names only)
        args = list(cli_args or [])
        self._test_remaps = {a.split(':=')[0]: a.split(':=')[1]
                             for flag, a in zip(args, args[1:])
                             if flag in ('-r', '--remap') and ':=' in a}
        # the attribute names and types of rclpy's Node, so a subclass that reuses one of them
        # breaks here as it would on a robot
        self._parameter_overrides = {p.name: p for p in (parameter_overrides or [])}
        self._parameters: dict[str, Parameter] = {}
        self._descriptors: dict[str, ParameterDescriptor] = {}
        self._parameters_callbacks: list[Callable[[list[Parameter]], SetParametersResult]] = []
        self._publishers: list[Publisher] = []
        self._subscriptions: list[Subscription] = []
        self._timers: list[Timer] = []
        self._clock = Clock()
        self._logger = logging.getLogger(f'rclpy.{node_name}')

    # ----------------------------------------------------------------- basics
    def get_name(self) -> str:
        return self._name

    def get_namespace(self) -> str:
        return self._namespace

    def get_logger(self) -> logging.Logger:
        return self._logger

    def get_clock(self) -> Clock:
        return self._clock

    def destroy_node(self) -> None:
        for p in self._publishers:
            p.destroyed = True
        for s in self._subscriptions:
            s.destroyed = True

    # ----------------------------------------------------------------- parameters
    def declare_parameter(self, name: str, value: Any = None,
                          descriptor: Optional[ParameterDescriptor] = None,
                          ignore_override: bool = False) -> Parameter:
        if name in self._parameters:
            raise ParameterAlreadyDeclaredException(name)
        param = Parameter(name, value=value)
        if not ignore_override and name in self._parameter_overrides:
            param = self._parameter_overrides[name]
            if value is not None and param.type_ != Parameter.Type.from_parameter_value(value) \
                    and not (descriptor and descriptor.dynamic_typing):
                raise InvalidParameterValueException(
                    f"parameter '{name}' has type {param.type_.name}, expected "
                    f'{Parameter.Type.from_parameter_value(value).name}')
        result = self._call_callbacks([param])
        if not result.successful:
            raise InvalidParameterValueException(f"'{name}': {result.reason}")
        self._parameters[name] = param
        self._descriptors[name] = descriptor or ParameterDescriptor()
        return param

    def has_parameter(self, name: str) -> bool:
        return name in self._parameters

    def get_parameter(self, name: str) -> Parameter:
        if name not in self._parameters:
            raise ParameterNotDeclaredException(name)
        return self._parameters[name]

    def describe_parameter(self, name: str) -> ParameterDescriptor:
        return self._descriptors[name]

    def add_on_set_parameters_callback(
            self, callback: Callable[[list[Parameter]], SetParametersResult]) -> None:
        self._parameters_callbacks.insert(0, callback)

    def _call_callbacks(self, params: list[Parameter]) -> SetParametersResult:
        for cb in self._parameters_callbacks:
            result = cb(params)
            if not result.successful:
                return result
        return SetParametersResult(successful=True)

    def set_parameters(self, parameter_list: list[Parameter]) -> list[SetParametersResult]:
        results = []
        for p in parameter_list:
            if p.name not in self._parameters:
                results.append(SetParametersResult(successful=False,
                                                   reason='parameter not declared'))
                continue
            if self._descriptors[p.name].read_only:
                results.append(SetParametersResult(successful=False,
                                                   reason='parameter is read-only'))
                continue
            result = self._call_callbacks([p])
            if result.successful:
                self._parameters[p.name] = p
            results.append(result)
        return results

    # ----------------------------------------------------------------- entities
    def create_publisher(self, msg_type: Any, topic: str, qos_profile: Any, *,
                         callback_group: Any = None, event_callbacks: Any = None,
                         qos_overriding_options: Any = None,
                         publisher_class: Any = None) -> Publisher:
        pub = (publisher_class or Publisher)(msg_type, topic, qos_profile)
        self._publishers.append(pub)
        return pub

    def create_subscription(self, msg_type: Any, topic: str,
                            callback: Callable[[Any], None], qos_profile: Any, *,
                            callback_group: Any = None, event_callbacks: Any = None,
                            qos_overriding_options: Any = None,
                            raw: bool = False) -> Subscription:
        sub = Subscription(msg_type, topic, callback, qos_profile,
                           self.resolve_topic_name(topic))
        self._subscriptions.append(sub)
        return sub

    def resolve_topic_name(self, topic: str, *, only_expand: bool = False) -> str:
        name = topic if only_expand else self._test_remaps.get(topic, topic)
        if name.startswith('/'):
            return name
        return self._namespace.rstrip('/') + '/' + name

    def create_timer(self, timer_period_sec: float, callback: Callable[[], Any],
                     callback_group: Any = None, clock: Any = None) -> Timer:
        timer = Timer(timer_period_sec, callback)
        self._timers.append(timer)
        return timer

    def destroy_publisher(self, publisher: Publisher) -> bool:
        publisher.destroyed = True
        self._publishers.remove(publisher)
        return True

    def destroy_subscription(self, subscription: Subscription) -> bool:
        subscription.destroyed = True
        self._subscriptions.remove(subscription)
        return True

    def destroy_timer(self, timer: Timer) -> bool:
        timer.destroyed = True
        self._timers.remove(timer)
        return True

    def test_subscription(self, topic: str) -> Subscription:
        live = [s for s in self._subscriptions if s.topic == topic]
        assert len(live) == 1, f'{len(live)} subscriptions on {topic}'
        return live[0]

    def test_publisher(self, topic: str) -> Publisher:
        live = [p for p in self._publishers if p.topic == topic]
        assert len(live) == 1, f'{len(live)} publishers on {topic}'
        return live[0]
