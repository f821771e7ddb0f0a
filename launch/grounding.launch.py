"""Launch the affordance grounding lifecycle node.

    ros2 launch affordance_ros grounding.launch.py checkpoint:=/path/best.pt
    ros2 launch affordance_ros grounding.launch.py engine_path:=/path/engine.ep backend:=tensorrt \
        namespace:=wrist_camera image_topic:=/wrist/color/image_raw

Every argument is optional; empty strings leave the value of ``params_file`` in force. Input
defaults match realsense2_camera with ``align_depth.enable:=true``.
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode
from launch_ros.substitutions import FindPackageShare

ARGUMENTS = {
    'namespace': ('', 'namespace of the node and its topics (one per camera)'),
    'params_file': ('', 'parameter YAML (default: share/affordance_ros/config/grounding.yaml)'),
    'checkpoint': ('', 'affordance_ros checkpoint (.pt) for the torch backend'),
    'onnx_path': ('', 'exported ONNX model for the onnxruntime backend'),
    'engine_path': ('', 'TensorRT engine (affordance-export --format tensorrt) for tensorrt'),
    'backend': ('', 'auto | torch | onnxruntime | tensorrt (empty: from params_file)'),
    'actions': ('', 'comma-separated actions to ground, e.g. hold,cut_with'),
    'image_topic': ('/camera/camera/color/image_raw', 'RGB image (sensor_msgs/Image)'),
    'depth_topic': ('/camera/camera/aligned_depth_to_color/image_raw',
                    'depth registered to the RGB image (16UC1 mm or 32FC1 m)'),
    'camera_info_topic': ('/camera/camera/color/camera_info', 'CameraInfo of the RGB image'),
    'action_topic': ('action', 'std_msgs/String with the action(s) to ground (latched)'),
    'qos_reliability': ('', 'input reliability: best_effort | reliable | system_default'),
    'use_sim_time': ('false', 'use /clock (rosbag replay with --clock)'),
    'autostart': ('true', 'configure and activate the lifecycle node at start'),
    'log_level': ('info', 'node log level'),
}
# launch arguments that override node parameters when not empty (name -> parameter)
OVERRIDES = {'checkpoint': 'checkpoint', 'onnx_path': 'onnx_path', 'engine_path': 'engine_path',
             'backend': 'backend', 'qos_reliability': 'qos_reliability'}


def _node(context, *args, **kwargs):
    value = {name: LaunchConfiguration(name).perform(context) for name in ARGUMENTS}
    params_file = value['params_file'] or str(
        FindPackageShare('affordance_ros').perform(context) + '/config/grounding.yaml')
    overrides = {param: value[arg] for arg, param in OVERRIDES.items() if value[arg]}
    if value['actions']:
        overrides['actions'] = [a.strip() for a in value['actions'].split(',') if a.strip()]
    overrides['use_sim_time'] = value['use_sim_time'].lower() == 'true'
    overrides['autostart'] = value['autostart'].lower() == 'true'
    return [LifecycleNode(
        package='affordance_ros',
        executable='grounding_node',
        name='grounding_node',
        namespace=value['namespace'],
        parameters=[params_file, overrides],
        remappings=[('image', value['image_topic']), ('depth', value['depth_topic']),
                    ('camera_info', value['camera_info_topic']),
                    ('action', value['action_topic'])],
        arguments=['--ros-args', '--log-level', value['log_level']],
        output='screen',
    )]


def generate_launch_description():
    return LaunchDescription(
        [DeclareLaunchArgument(name, default_value=default, description=doc)
         for name, (default, doc) in ARGUMENTS.items()] + [OpaqueFunction(function=_node)])
