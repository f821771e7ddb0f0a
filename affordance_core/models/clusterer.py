"""LoopTrans' part clusterer: 4 learnable tokens that split an image's DINO keys into parts.

Architecture of the reference ``models/cluster.py`` (LoopTrans, ``SooLab/LoopTrans``), so that the
released ``cluster_seen.pth`` / ``cluster_unseen.pth`` load by name (methods.md §5.1):

* ``tokens``: ``nn.Embedding(K, D)`` (K = 4 parts, D = 384);
* 8 layers of ``cross_attn_layers[i]`` (``nn.MultiheadAttention(D, 8)``, queries = tokens, keys /
  values = patch descriptors), ``self_attn_layers[i]``, ``ffn_layers[i].net`` (Linear D->4D, GELU,
  Dropout, Linear 4D->D, Dropout) and ``norm_layers[i]`` (LayerNorm), each added residually;
* reference quirk kept: every layer's attention *queries* are the initial token embeddings (the
  updated tokens only flow through the residual sum), exactly as the reference computes them;
* output: ``cos(patch, token) + 1`` (B, N, K); a patch's part is the argmax over the K tokens.

The reference trained it without supervision with ACSeg (arXiv 2210.05944) and releases only the
weights. :func:`modularity_loss` (``losses/modularity.py``) is the ACSeg-style objective our
``affordance-train-clusterer`` command optimises to train one on any dataset.

Channel order: the reference feeds d-major DINO keys (channel d * heads + head); ours are
head-major. The token space *is* the key space (the output compares tokens with patch keys), so
:func:`convert_official_clusterer` permutes every weight that reads or writes that space (token
embedding, the input columns of the attention projections, the output rows of ``out_proj`` and of
the FFN's second Linear, the LayerNorms) and leaves the per-head q / k / v spaces alone. The
result on our keys equals the official module on the same keys in the official order exactly.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from affordance_core.models.layers import permute_key_channels

__all__ = ['Clusterer', 'convert_official_clusterer', 'load_clusterer', 'save_clusterer',
           'CLUSTERER_FORMAT']

logger = logging.getLogger(__name__)

CLUSTERER_FORMAT = 'affordance_ros.clusterer'


class _FFN(nn.Module):
    """Linear D->hidden, GELU, Dropout, Linear hidden->D, Dropout (reference names ``net.*``)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Clusterer(nn.Module):
    """K part tokens attending to patch descriptors (see the module docstring).

    Args:
        num_tokens: K parts (4 in LoopTrans).
        dim: descriptor width D (384 for ViT-S keys).
        num_layers: layers (8).
        num_heads: attention heads (8); must divide ``dim``.
    """

    def __init__(self, num_tokens: int = 4, dim: int = 384, num_layers: int = 8,
                 num_heads: int = 8) -> None:
        super().__init__()
        if num_tokens < 2 or num_layers < 1 or dim % num_heads:
            raise ValueError(f'Clusterer needs >= 2 tokens, >= 1 layer and heads dividing dim; '
                             f'got {num_tokens}, {num_layers}, dim {dim} / heads {num_heads}')
        self.num_tokens = int(num_tokens)
        self.dim = int(dim)
        self.tokens = nn.Embedding(num_tokens, dim)
        self.cross_attn_layers = nn.ModuleList(
            nn.MultiheadAttention(dim, num_heads) for _ in range(num_layers))
        self.self_attn_layers = nn.ModuleList(
            nn.MultiheadAttention(dim, num_heads) for _ in range(num_layers))
        self.norm_layers = nn.ModuleList(nn.LayerNorm(dim) for _ in range(num_layers))
        self.ffn_layers = nn.ModuleList(_FFN(dim, dim * 4) for _ in range(num_layers))

    def forward(self, x: Tensor) -> Tensor:
        """Patch-to-token similarity.

        Args:
            x: (B, N, D) patch descriptors (raw DINO keys, tokens last).

        Returns:
            (B, N, K) cosine similarity + 1, in [0, 2].
        """
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f'Clusterer expects (B, N, {self.dim}) descriptors, '
                             f'got {tuple(x.shape)}')
        b = x.shape[0]
        init = self.tokens.weight.to(x.dtype).unsqueeze(1).expand(-1, b, -1)  # (K, B, D)
        seq = x.transpose(0, 1)  # (N, B, D)
        query = init.transpose(0, 1)  # (B, K, D)
        for cross, self_attn, norm, ffn in zip(self.cross_attn_layers, self.self_attn_layers,
                                               self.norm_layers, self.ffn_layers):
            query = query + cross(init, seq, seq, need_weights=False)[0].transpose(0, 1)
            query = query + self_attn(init, init, init, need_weights=False)[0].transpose(0, 1)
            query = query + ffn(query)
            query = norm(query)
        q = F.normalize(query, p=2, dim=-1)
        xn = F.normalize(x, p=2, dim=-1)
        return xn @ q.transpose(1, 2) + 1.0

    @torch.no_grad()
    def assign(self, keys: Tensor) -> Tensor:
        """Part label of every patch: keys (B, D, h, w) -> (B, h, w) int64 in [0, K)."""
        b, d, h, w = keys.shape
        sim = self(keys.flatten(2).transpose(1, 2))
        return sim.argmax(-1).view(b, h, w)


def convert_official_clusterer(state: dict[str, Tensor], num_heads: int,
                               to_official: bool = False) -> dict[str, Tensor]:
    """Permute a clusterer state dict between the official d-major and our head-major keys.

    Args:
        state: ``Clusterer`` state dict (reference key names, which are also ours).
        num_heads: heads of the DINO backbone whose keys are clustered (6 for ViT-S), NOT the
            clusterer's own attention heads.
        to_official: ours -> official (True) or official -> ours (False).
    """
    out: dict[str, Tensor] = {}
    for name, t in state.items():
        dim = t.shape[-1]

        def perm(x: Tensor, axis: int) -> Tensor:
            return permute_key_channels(x, axis, num_heads, to_official)

        if name == 'tokens.weight' or name.endswith('in_proj_weight'):
            t = perm(t, 1)  # input columns (the projections' output spaces are per head)
        elif name.endswith('out_proj.weight') or name.endswith('net.3.weight'):
            t = perm(t, 0)
        elif name.endswith('out_proj.bias') or name.endswith('net.3.bias') \
                or name.startswith('norm_layers.'):
            t = perm(t, 0)
        elif name.endswith('net.0.weight'):
            t = perm(t, 1)
        elif name.endswith('in_proj_bias') or name.endswith('net.0.bias'):
            pass  # per-head / hidden spaces
        else:
            raise ValueError(f"unexpected clusterer key '{name}' (shape {tuple(t.shape)}, "
                             f'dim {dim})')
        out[name] = t.contiguous()
    return out


def save_clusterer(clusterer: Clusterer, path: str | Path, *, backbone: str,
                   extra: dict[str, Any] | None = None) -> Path:
    """Write our clusterer file: weights (head-major key order) and how it was trained."""
    from affordance_core.checkpoint import atomic_torch_save

    payload = {'format': CLUSTERER_FORMAT, 'version': 1, 'backbone': backbone,
               'num_tokens': clusterer.num_tokens, 'dim': clusterer.dim,
               'num_layers': len(clusterer.norm_layers),
               'num_heads': clusterer.cross_attn_layers[0].num_heads,
               'state_dict': {k: v.detach().cpu() for k, v in clusterer.state_dict().items()},
               'extra': extra or {}}
    atomic_torch_save(payload, path)
    return Path(path)


def load_clusterer(path: str | Path, clusterer: Clusterer, backbone_heads: int) -> Clusterer:
    """Load our clusterer file, or an official ``cluster_*.pth`` (converted to head-major).

    Raises:
        FileNotFoundError: no such file (the message says how to get or train one).
        ValueError: the weights do not fit ``clusterer``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f'clusterer weights not found: {path}. Train one with `affordance-train-clusterer`, '
            'download the official cluster_seen.pth / cluster_unseen.pth (LoopTrans README), or '
            'leave model.kwargs.clusterer_weights empty for the k-means fallback')
    obj = torch.load(path, map_location='cpu', weights_only=True)
    if isinstance(obj, dict) and obj.get('format') == CLUSTERER_FORMAT:
        state = obj['state_dict']
        source = 'ours'
    else:
        if isinstance(obj, dict) and isinstance(obj.get('state_dict'), dict):
            obj = obj['state_dict']
        if not isinstance(obj, dict) or 'tokens.weight' not in obj:
            raise ValueError(f'{path}: neither an affordance_ros clusterer nor an official '
                             "LoopTrans cluster state dict (no 'tokens.weight')")
        state = convert_official_clusterer(obj, backbone_heads, to_official=False)
        source = 'official (d-major keys -> head-major)'
    try:
        clusterer.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f'{path}: clusterer weights do not fit: '
                         f'{str(exc).splitlines()[0]}') from None
    logger.info('clusterer weights loaded from %s (%s)', path, source)
    return clusterer
