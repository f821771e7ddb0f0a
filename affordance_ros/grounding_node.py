"""``grounding_node``: the rclpy lifecycle node over :class:`affordance_ros.core.GroundingCore`.

This module only does ROS plumbing; every decision about a message (decoding, synchronising,
dropping, running the pipeline, building outputs, counting) is made by ``GroundingCore``, which
``affordance-replay`` runs too (``docs/ros_node.md``).

Lifecycle:
    configure   read and validate the parameters, build the pipeline (checkpoint, ONNX or a
                cached TensorRT engine, built on first use) and warm it up; create publishers.
    activate    create the subscriptions, the worker thread and the diagnostics timer.
    deactivate  remove subscriptions and the worker, release the model and free the GPU memory
                (the next activate loads it again, from the engine cache).
    cleanup / shutdown  also remove the publishers.
The ``autostart`` parameter (default true) runs configure and activate when the node starts.

Threads: subscription callbacks only hand messages to the core (it keeps the newest synchronised
frame); one worker thread processes the newest frame and publishes. Nothing queues.
"""
from __future__ import annotations

import threading
from typing import Any, Optional, Sequence

import numpy as np
import rclpy
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy.executors import MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.time import Time

from affordance_ros import params as node_params
from affordance_ros.core import GroundingCore
from affordance_ros.msgtypes import RosMessageTypes

NODE_NAME = 'grounding_node'
OUTPUT_TOPICS = ('heatmap', 'overlay', 'grasps', 'detections_3d', 'markers', 'affordance_cloud')
LAZY_TOPICS = ('overlay', 'affordance_cloud')  # built only while somebody subscribes
_RELIABILITY = {'best_effort': ReliabilityPolicy.BEST_EFFORT,
                'reliable': ReliabilityPolicy.RELIABLE,
                'system_default': ReliabilityPolicy.SYSTEM_DEFAULT}
_MSG_TYPES = {
    'heatmap': 'sensor_msgs/msg/Image',
    'overlay': 'sensor_msgs/msg/Image',
    'grasps': 'affordance_ros/msg/AffordanceGraspArray',
    'detections_3d': 'vision_msgs/msg/Detection3DArray',
    'markers': 'visualization_msgs/msg/MarkerArray',
    'affordance_cloud': 'sensor_msgs/msg/PointCloud2',
}


def _parameter_value(spec: node_params.ParamSpec) -> Any:
    """Declared default of a spec (ROS has no null: None defaults are declared as '')."""
    return '' if spec.default is None else spec.default


class GroundingNode(LifecycleNode):
    """Lifecycle node ``grounding_node`` (topics and parameters: ``config/grounding.yaml``)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        self.types = RosMessageTypes()
        for spec in node_params.PARAMETERS:
            self.declare_parameter(spec.name, _parameter_value(spec), ParameterDescriptor(
                description=spec.description, read_only=spec.read_only))
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.core: Optional[GroundingCore] = None
        self._pipeline_config: Any = None
        self._settings: Any = None
        self._outputs: dict[str, Any] = {}
        self._diag_pub: Any = None
        self._inputs: list[Any] = []
        self._diag_timer: Any = None
        self._worker: Optional[threading.Thread] = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._tf_buffer: Any = None
        self._tf_listener: Any = None

    # ------------------------------------------------------------------ parameters

    def _param_values(self) -> dict[str, Any]:
        return {spec.name: self.get_parameter(spec.name).value
                for spec in node_params.PARAMETERS}

    def _on_set_parameters(self, parameters: list[Parameter]) -> SetParametersResult:
        """Validate run-time changes (actions, thresholds, top_k, ...) before they apply."""
        classes = self.core.classes if self.core is not None else None
        for p in parameters:
            reason = node_params.validate_update(p.name, p.value, classes)
            if reason is not None and self.core is not None:
                self.get_logger().warning(f"rejected parameter '{p.name}': {reason}")
                return SetParametersResult(successful=False, reason=reason)
        if self.core is not None:
            for p in parameters:
                self.core.update_parameter(p.name, p.value)
        return SetParametersResult(successful=True)

    # ------------------------------------------------------------------ lifecycle

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self._pipeline_config, self._settings = node_params.build(self._param_values())
            self._load_core()
        except Exception as exc:  # a user-facing failure: bad parameter, missing file, ...
            self.get_logger().error(f'configure failed: {exc}')
            self.core = None
            return TransitionCallbackReturn.FAILURE
        out_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=2,
                             reliability=ReliabilityPolicy.RELIABLE)
        for topic in OUTPUT_TOPICS:
            self._outputs[topic] = self.create_lifecycle_publisher(
                self.types[_MSG_TYPES[topic]], topic, out_qos)
        self._diag_pub = self.create_publisher(
            self.types['diagnostic_msgs/msg/DiagnosticArray'], '/diagnostics', 10)
        if self._settings.target_frame:
            import tf2_ros
            self._tf_buffer = tf2_ros.Buffer()
            self._tf_listener = tf2_ros.TransformListener(self._tf_buffer, self)
        assert self.core is not None
        self.get_logger().info(f'configured: {self.core.describe()}')
        return TransitionCallbackReturn.SUCCESS

    def _load_core(self) -> None:
        from affordance_core.inference import GroundingPipeline

        pipeline = GroundingPipeline(self._pipeline_config)
        self.core = GroundingCore(pipeline, self.types, self._settings,
                                  transform=self._lookup_transform, logger=self.get_logger(),
                                  clock=lambda: self.get_clock().now().nanoseconds)
        self.core.warm_up(self._settings.warmup_runs)

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            if self.core is None:  # released by deactivate
                self._load_core()
        except Exception as exc:
            self.get_logger().error(f'activate failed: {exc}')
            return TransitionCallbackReturn.FAILURE
        assert self.core is not None
        reliability = _RELIABILITY[self._settings.qos_reliability]
        sensor_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=5,
                                reliability=reliability, durability=DurabilityPolicy.VOLATILE)
        latched = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                             reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        core = self.core
        color = (('image/compressed', 'sensor_msgs/msg/CompressedImage',
                  core.on_compressed_image, sensor_qos)
                 if self._settings.image_transport == 'compressed' else
                 ('image', 'sensor_msgs/msg/Image', core.on_image, sensor_qos))
        inputs = (color,
                  ('depth', 'sensor_msgs/msg/Image', core.on_depth, sensor_qos),
                  ('camera_info', 'sensor_msgs/msg/CameraInfo', core.on_camera_info,
                   sensor_qos),
                  ('action', 'std_msgs/msg/String', self._on_action, latched))
        for topic, msg_type, handler, qos in inputs:
            self._inputs.append(self.create_subscription(
                self.types[msg_type], topic, self._wrap(handler), qos))
        core.image_topic = self._inputs[0].topic_name  # resolved: for input_image 'auto'
        self._stop.clear()
        self._worker = threading.Thread(target=self._work, name='grounding_worker',
                                        daemon=True)
        self._worker.start()
        self._diag_timer = self.create_timer(self._settings.diagnostics_period_s,
                                             self._publish_diagnostics)
        self.get_logger().info(f"active: actions {core.actions}, image {core.image_topic} "
                               f"({'rectified' if core.rectified else 'raw'})")
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown_active()
        self._release_model()
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown_active()
        self._release_model()
        self._destroy_publishers()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        return self.on_cleanup(state)

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown_active()
        self._release_model()
        self._destroy_publishers()
        return TransitionCallbackReturn.SUCCESS

    def _teardown_active(self) -> None:
        for sub in self._inputs:
            self.destroy_subscription(sub)
        self._inputs.clear()
        if self._diag_timer is not None:
            self.destroy_timer(self._diag_timer)
            self._diag_timer = None
        self._stop.set()
        self._wake.set()
        if self._worker is not None:
            self._worker.join(timeout=10.0)
            self._worker = None

    def _release_model(self) -> None:
        """Drop the pipeline (and its GPU memory); counters are kept in the log."""
        if self.core is not None:
            self.core.close()
        self.core = None
        try:
            import torch
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover - torch is a dependency of affordance_core
            pass

    def _destroy_publishers(self) -> None:
        for pub in self._outputs.values():
            self.destroy_lifecycle_publisher(pub)
        self._outputs.clear()
        if self._diag_pub is not None:
            self.destroy_publisher(self._diag_pub)
            self._diag_pub = None
        self._tf_listener = self._tf_buffer = None

    # ------------------------------------------------------------------ callbacks

    def _wrap(self, handler: Any) -> Any:
        def callback(msg: Any) -> None:
            handler(msg)
            self._wake.set()
        return callback

    def _on_action(self, msg: Any) -> None:
        """Latched action topic: a valid action list becomes the ``actions`` parameter."""
        core = self.core
        if core is None:
            return
        if core.on_action(msg):
            # keep the parameter in sync so `ros2 param get` tells the truth
            self.set_parameters([Parameter('actions', Parameter.Type.STRING_ARRAY,
                                           list(core.actions))])

    def _lookup_transform(self, target: str, source: str,
                          stamp_ns: int) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """(R, t) taking points from ``source`` to ``target`` at the image stamp, or None."""
        if self._tf_buffer is None:
            return None
        from rclpy.duration import Duration
        from transforms3d.quaternions import quat2mat

        try:
            tf = self._tf_buffer.lookup_transform(
                target, source, Time(nanoseconds=stamp_ns),
                timeout=Duration(nanoseconds=int(self._settings.tf_timeout_s * 1e9)))
        except Exception as exc:  # tf2 lookup, extrapolation and connectivity errors
            if self.core is not None:
                self.core.note_tf_failure(str(exc))
            return None
        q, t = tf.transform.rotation, tf.transform.translation
        return quat2mat([q.w, q.x, q.y, q.z]), np.array([t.x, t.y, t.z])

    def _wanted(self) -> set[str]:
        wanted = set(OUTPUT_TOPICS)
        for topic in LAZY_TOPICS:
            pub = self._outputs.get(topic)
            if pub is None or pub.get_subscription_count() == 0:
                wanted.discard(topic)
        if not self._settings.publish_overlay:
            wanted.discard('overlay')
        if not self._settings.publish_cloud:
            wanted.discard('affordance_cloud')
        return wanted

    def process_once(self) -> bool:
        """Process the newest frame, if any, and publish its outputs (the worker's step)."""
        core = self.core
        if core is None:
            return False
        frame = core.take_frame()
        if frame is None:
            return False
        outputs = core.process(frame, self.get_clock().now().nanoseconds, self._wanted())
        for topic, msg in (outputs or {}).items():
            pub = self._outputs.get(topic)
            if pub is not None:
                pub.publish(msg)
        if outputs:
            core.note_published(self.get_clock().now().nanoseconds, frame)
        return True

    def _work(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=0.1)
            self._wake.clear()
            while not self._stop.is_set() and self.process_once():
                pass

    def _publish_diagnostics(self) -> None:
        if self.core is not None and self._diag_pub is not None:
            self._diag_pub.publish(self.core.diagnostics(self.get_clock().now().nanoseconds))


def main(args: Optional[Sequence[str]] = None) -> None:
    """Entry point of the ``grounding_node`` executable."""
    rclpy.init(args=list(args) if args is not None else None)
    node = GroundingNode()
    try:
        if node.get_parameter('autostart').value:
            if node.trigger_configure() == TransitionCallbackReturn.SUCCESS:
                node.trigger_activate()
        executor = MultiThreadedExecutor()
        executor.add_node(node)
        executor.spin()
    except KeyboardInterrupt:
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == '__main__':
    main()
