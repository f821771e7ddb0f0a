"""ROS 2 glue for affordance_core (node, conversions, parameters).

No logic here: in a colcon install this folder's modules are copied into the rosidl-generated
``affordance_ros`` Python package, whose own ``__init__.py`` is used instead of this one.
"""
