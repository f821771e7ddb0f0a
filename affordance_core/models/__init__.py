"""Model zoo: the frozen backbones and one file per method.

Importing this package imports every method module so that its ``@register_model`` entrypoints
are registered (``affordance_core.list_models()``).
"""
from affordance_core.models import (  # noqa: F401  (registration)
    backbone, c2am, locate, looptrans, selectivecl, wsma)
from affordance_core.models.backbone import (BackboneOutput, FrozenViT, create_backbone,
                                             list_backbones)

__all__ = ['BackboneOutput', 'FrozenViT', 'create_backbone', 'list_backbones']
