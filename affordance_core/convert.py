"""Official checkpoints <-> our checkpoint format (``affordance-convert``).

The official repositories save ``model.state_dict()`` of their ``Net``: the frozen DINO ViT under
``vit_model.`` (DINO's key names, which are timm's) and the head under the names each method file
of ours reproduces. Two things differ from ours:

* the prefix of the backbone (``vit_model.`` there, ``backbone.vit.`` here);
* the channel order of the DINO keys the heads read: d-major there (``d * heads + head``),
  head-major here; each method file's ``from_official_state_dict`` / ``to_official_state_dict``
  permutes exactly the weights that read or write raw key channels (``models/layers.py``).

The class count comes from the classifier's shape (36 -> Seen, 25 -> Unseen, 10 -> HICO-IIF,
the official class order of ``labels.py``; LoopTrans adds its 15 noise classes). Checkpoints
without the backbone (some releases strip it) take the backbone's own weights
(``--backbone-weights`` or the default file).
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from affordance_core.labels import SPLITS, classes_for

__all__ = ['OFFICIAL_METHODS', 'read_official', 'from_official', 'to_official',
           'convert_official']

logger = logging.getLogger(__name__)

BACKBONE_PREFIX = 'vit_model.'


@dataclass(frozen=True)
class OfficialMethod:
    """How to rebuild one method from its official state dict.

    Attributes:
        module: our method module (has ``to_official_state_dict`` / ``from_official_state_dict``).
        model: registry name built for it (the paper's DINO ViT-S/16 backbone).
        classifier: official key of the classifier weight (its first axis counts the classes).
        extra_classes: outputs beyond the affordance classes (LoopTrans' noise classes).
    """

    module: str
    model: str
    classifier: str
    extra_classes: int = 0


OFFICIAL_METHODS: dict[str, OfficialMethod] = {
    'locate': OfficialMethod('affordance_core.models.locate', 'locate_vits16', 'aff_fc.weight'),
    'looptrans': OfficialMethod('affordance_core.models.looptrans', 'looptrans_vits16',
                                'aff_fc.weight', extra_classes=15),
    'wsma': OfficialMethod('affordance_core.models.wsma', 'wsma_vits16', 'fc.weight'),
    'selectivecl': OfficialMethod('affordance_core.models.selectivecl', 'selectivecl_vits16',
                                  'aff_classifier.weight'),
}


def _method(name: str) -> OfficialMethod:
    if name not in OFFICIAL_METHODS:
        raise ValueError(f"unknown method '{name}'; official checkpoints exist for "
                         f"{', '.join(OFFICIAL_METHODS)}")
    return OFFICIAL_METHODS[name]


def read_official(path: str | Path) -> dict[str, Tensor]:
    """The flat ``{key: tensor}`` state dict of an official ``.pth`` file.

    Unwraps ``state_dict`` / ``model`` containers and strips a DataParallel ``module.`` prefix.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a torch file of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'official checkpoint not found: {path}')
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as exc:
        raise ValueError(f'{path}: not a loadable torch checkpoint ({type(exc).__name__}: '
                         f'{str(exc).splitlines()[0] if str(exc) else "no detail"})') from None
    for _ in range(3):
        if isinstance(obj, dict) and not all(isinstance(v, Tensor) for v in obj.values()):
            inner = next((obj[k] for k in ('state_dict', 'model', 'net') if
                          isinstance(obj.get(k), dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict) or not obj or \
            not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f'{path}: no state dict of tensors found (looked inside '
                         "'state_dict', 'model', 'net')")
    return {k.removeprefix('module.'): v for k, v in obj.items()}


def _classes(num: int, split: str | None) -> tuple[str, ...]:
    if split is not None:
        classes = classes_for(split)
        if len(classes) != num:
            raise ValueError(f'the checkpoint has {num} classes but split {split} has '
                             f'{len(classes)}')
        return classes
    for name, classes in SPLITS.items():
        if len(classes) == num:
            logger.info('%d classes: assuming the %s class list', num, name)
            return classes
    logger.warning('%d classes match no known split; naming them class_0..class_%d', num, num - 1)
    return tuple(f'class_{i}' for i in range(num))


def from_official(method: str, state: dict[str, Tensor], *, model: str | None = None,
                  split: str | None = None, backbone_weights: str | None = None,
                  model_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Build our model from an official state dict.

    Args:
        method: ``locate``, ``looptrans``, ``wsma`` or ``selectivecl``.
        state: official state dict (``read_official``).
        model: registry name to build (default: the method's DINO ViT-S/16 entry).
        split: class list to use (default: inferred from the class count).
        backbone_weights: backbone file, used only when the state dict holds no backbone.
        model_kwargs: further constructor arguments.

    Raises:
        ValueError: unknown method, missing classifier, or weights that do not fit.
    """
    from affordance_core.models.backbone import _load_into
    from affordance_core.registry import create_model

    spec = _method(method)
    if spec.classifier not in state:
        raise ValueError(f"no '{spec.classifier}' in the state dict: is this a {method} "
                         f'checkpoint? (first keys: {list(state)[:4]})')
    num = int(state[spec.classifier].shape[0]) - spec.extra_classes
    classes = _classes(num, split)
    vit = {k[len(BACKBONE_PREFIX):]: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}
    head = {k: v for k, v in state.items() if not k.startswith(BACKBONE_PREFIX)}
    kwargs = dict(model_kwargs or {})
    if not vit:
        logger.warning('the checkpoint holds no backbone (%s*); using the backbone weights of '
                       '%s', BACKBONE_PREFIX, backbone_weights or 'the default file')
        kwargs['backbone_weights'] = backbone_weights
    net = create_model(model or spec.model, classes=list(classes), pretrained=not vit, **kwargs)
    if vit:
        _load_into(net.backbone.vit, vit, f'{method} checkpoint ({BACKBONE_PREFIX}*)')
    mod = importlib.import_module(spec.module)
    ours = mod.from_official_state_dict(head, net.backbone.num_heads)
    if getattr(net, 'cluster', None) is None and any(k.startswith('cluster.') for k in ours):
        # LoopTrans' training-only clusterer; inference (and the official test.py) never uses it
        logger.info('dropping the clusterer weights (cluster.*): pass model kwargs '
                    'clusterer_weights=<file> to keep training with a clusterer')
        ours = {k: v for k, v in ours.items() if not k.startswith('cluster.')}
    full = {f'backbone.{k}': v for k, v in net.backbone.state_dict().items()}
    full.update(ours)
    try:
        net.load_state_dict(full, strict=True)
    except RuntimeError as exc:
        raise ValueError(f'the {method} weights do not fit {model or spec.model}: '
                         f'{str(exc).splitlines()[0]}') from None
    return net.eval()


def to_official(method: str, net: nn.Module) -> dict[str, Tensor]:
    """Our model -> an official-layout state dict (backbone under ``vit_model.``)."""
    spec = _method(method)
    mod = importlib.import_module(spec.module)
    state = net.state_dict()
    head = {k: v for k, v in state.items() if not k.startswith('backbone.')}
    out = {f'{BACKBONE_PREFIX}{k[len("backbone.vit."):]}': v for k, v in state.items()
           if k.startswith('backbone.vit.')}
    out.update(mod.to_official_state_dict(head, net.backbone.num_heads))
    return out


def convert_official(method: str, src: str | Path, dst: str | Path, **kwargs: Any) -> Path:
    """``read_official`` + ``from_official`` + ``save_checkpoint``; returns ``dst``."""
    from affordance_core.checkpoint import file_sha256, save_checkpoint

    net = from_official(method, read_official(src), **kwargs)
    return save_checkpoint(net, dst, extra={'converted_from': {
        'method': method, 'file': str(src), 'sha256': file_sha256(src)}})
