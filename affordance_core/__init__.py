"""affordance_core: weakly-supervised affordance grounding in pure Python + PyTorch.

Public surface (see docs/architecture.md):

    from affordance_core import create_model, list_models, load_checkpoint, save_checkpoint
    model = create_model('locate_imgfocus', num_classes=36)
    model = load_checkpoint('runs/demo/best.pt')
    maps = model.predict(images, class_ids)          # (B, H, W) in [0, 1]

This package never imports rclpy, ROS message packages, cv_bridge or affordance_ros.
"""
from affordance_core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from affordance_core.config import ConfigError, ExperimentConfig, load_config
from affordance_core.labels import classes_for
from affordance_core.registry import create_model, list_models, register_model

__version__ = '0.1.0'

__all__ = [
    'CheckpointError', 'ConfigError', 'ExperimentConfig', 'classes_for', 'create_model',
    'list_models', 'load_checkpoint', 'load_config', 'register_model', 'save_checkpoint',
]
