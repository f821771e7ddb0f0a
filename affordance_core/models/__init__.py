"""Model zoo: the frozen backbones and one file per method.

Importing this package imports every method module so that its ``@register_model`` entrypoints
are registered (``affordance_core.list_models()``).
"""
from affordance_core.models import backbone, locate, looptrans, wsma  # noqa: F401  (registration)
from affordance_core.models.backbone import (BackboneOutput, FrozenViT, create_backbone,
                                             list_backbones)

__all__ = ['BackboneOutput', 'FrozenViT', 'create_backbone', 'list_backbones']
