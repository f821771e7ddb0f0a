"""CLIP text tower (built with open_clip) and the CoOp prompt learner used by WSMA (methods.md §4).

Only the *text* half of CLIP is built: ``open_clip.model._build_text_tower`` with the RN50 text
configuration (width 512, 12 layers, 8 heads, context 77, projection 1024, QuickGELU as OpenAI's
weights need), or the ``'tiny'`` configuration for tests (width 32, 2 layers, 2 heads, context 77,
projection 64; random weights). The image tower is never built.

Weights come from a local file only (nothing downloads): OpenAI's ``RN50.pt`` (a TorchScript
archive; its fp16 weights are cast to float32), a plain state dict of it, or an open_clip
``RN50`` state dict (optionally wrapped in ``state_dict`` with ``module.`` prefixes). Only the
text-tower keys and ``logit_scale`` are read; everything else (``visual.*``) is ignored.

``ClipTextEncoder`` keeps open_clip's parameter names (``token_embedding``,
``positional_embedding``, ``transformer.resblocks.*``, ``ln_final``, ``text_projection``), which
are also OpenAI's and WSMA's root-level names, so checkpoints convert by stripping a prefix.

``PromptLearner`` is CoOp's generic-context learner with the class token at the end: prompts
"X X ... X <class name with spaces>." with ``n_ctx`` learnable context vectors ~ N(0, 0.02).
Two modes:

* ``'official'`` (WSMA's code, the default of ``Wsma``): the prefix / suffix buffers hold the
  embeddings of a *randomly initialised* ``nn.Embedding`` (N(0, 1) per token id), because the
  reference builds the prompt learner before the CLIP weights are loaded, and the text encoder
  adds the CLIP token embedding of the tokenised prompt on top of the prompt
  (``x = prompts + token_embedding(tokens)``), so the token embedding is trained too.
* ``'coop'`` (the CoOp paper): the buffers hold the CLIP embeddings of SOT and of the class-name /
  EOT tokens and nothing is added; the token embedding is then unused and frozen.
"""
from __future__ import annotations

import logging
import os
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ['ClipTextConfig', 'CLIP_TEXT_CONFIGS', 'ClipTextEncoder', 'PromptLearner',
           'PROMPT_MODES', 'read_clip_state_dict', 'tokenize_prompts', 'TEXT_KEY_PREFIXES']

logger = logging.getLogger(__name__)

PROMPT_MODES = ('official', 'coop')
# state-dict keys of the CLIP text tower (OpenAI / open_clip root level) and the logit scale
TEXT_KEY_PREFIXES = ('token_embedding.', 'positional_embedding', 'transformer.', 'ln_final.',
                     'text_projection')
LOGIT_SCALE_KEY = 'logit_scale'


@dataclass(frozen=True)
class ClipTextConfig:
    """Architecture of a CLIP text tower (open_clip ``CLIPTextCfg`` subset + output dim)."""

    embed_dim: int          # text projection output (1024 for RN50)
    context_length: int
    vocab_size: int
    width: int
    heads: int
    layers: int


CLIP_TEXT_CONFIGS: dict[str, ClipTextConfig] = {
    # open_clip model_configs/RN50.json text_cfg, embed_dim 1024
    'RN50': ClipTextConfig(embed_dim=1024, context_length=77, vocab_size=49408, width=512,
                           heads=8, layers=12),
    # tiny random tower for CPU tests (same tokenizer / vocabulary)
    'tiny': ClipTextConfig(embed_dim=64, context_length=77, vocab_size=49408, width=32,
                           heads=2, layers=2),
}


def _config(name: str) -> ClipTextConfig:
    if name not in CLIP_TEXT_CONFIGS:
        raise ValueError(f"unknown clip_config '{name}'; expected one of "
                         f"{', '.join(CLIP_TEXT_CONFIGS)}")
    return CLIP_TEXT_CONFIGS[name]


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------
def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive is a zip with a ``code/`` folder (OpenAI's RN50.pt)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.split('/', 2)[1:2] == ['code'] for n in zf.namelist())


def read_clip_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """CLIP text-tower tensors and ``logit_scale`` from a local weights file, as float32.

    Args:
        path: OpenAI ``RN50.pt`` (TorchScript archive or its state dict) or an open_clip state
            dict (possibly under ``state_dict`` / ``model`` with ``module.`` prefixes; a
            ``text.`` prefix of open_clip's CustomTextCLIP is stripped too).

    Returns:
        ``{key: tensor}`` restricted to ``TEXT_KEY_PREFIXES`` and ``logit_scale``.

    Raises:
        FileNotFoundError: no such file (the message says what to provide).
        ValueError: the file is not loadable or holds no CLIP text tower.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f'CLIP weights file not found: {path}. WSMA needs OpenAI\'s CLIP RN50 weights '
            "'RN50.pt' (the TorchScript file of the openai/CLIP package, also open_clip's "
            "'RN50' / 'openai' weights) or an open_clip RN50 state dict; put it there or pass "
            'model.kwargs.clip_weights=/path/RN50.pt (nothing is downloaded)')
    try:
        if _is_torchscript(path):
            with warnings.catch_warnings():  # torch announces the deprecation of TorchScript
                warnings.simplefilter('ignore', FutureWarning)
                obj: Any = torch.jit.load(str(path), map_location='cpu').state_dict()
        else:
            obj = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as exc:  # corrupt file, pickled code, ...: say which file
        raise ValueError(f'{path}: not a loadable CLIP weights file ({type(exc).__name__}: '
                         f'{str(exc).splitlines()[0] if str(exc) else "no detail"})') from None
    for _ in range(3):
        if isinstance(obj, dict) and 'token_embedding.weight' not in obj:
            inner = next((obj[k] for k in ('state_dict', 'model') if isinstance(obj.get(k), dict)),
                         None)
            if inner is not None:
                obj = inner
                continue
        break
    if not isinstance(obj, dict):
        raise ValueError(f'{path}: no state dict found')
    out: dict[str, Tensor] = {}
    for key, value in obj.items():
        if not isinstance(value, Tensor):
            continue
        key = key.removeprefix('module.').removeprefix('text.')
        if key == LOGIT_SCALE_KEY or key.startswith(TEXT_KEY_PREFIXES):
            out[key] = value.detach().float().clone()
    if 'token_embedding.weight' not in out:
        raise ValueError(f'{path}: no CLIP text tower found (no token_embedding.weight key)')
    return out


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------
_TOKENIZER: Any = None


def _tokenizer() -> Any:
    global _TOKENIZER
    if _TOKENIZER is None:
        from open_clip.tokenizer import SimpleTokenizer  # lazy: open_clip imports are slow
        _TOKENIZER = SimpleTokenizer()
    return _TOKENIZER


def tokenize_prompts(texts: Sequence[str], context_length: int = 77) -> Tensor:
    """CLIP BPE token ids ``[SOT, tokens..., EOT, 0, ...]`` of every text: (T, context_length).

    Raises:
        ValueError: a text does not fit the context (CLIP would truncate it silently).
    """
    tok = _tokenizer()
    out = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [tok.sot_token_id, *tok.encode(text), tok.eot_token_id]
        if len(ids) > context_length:
            raise ValueError(f'prompt {text!r} needs {len(ids)} tokens, more than the context '
                             f'length {context_length}; use fewer context tokens')
        out[i, :len(ids)] = torch.tensor(ids)
    return out


# ----------------------------------------------------------------------------------------------
# Text encoder
# ----------------------------------------------------------------------------------------------
class ClipTextEncoder(nn.Module):
    """CLIP text transformer on prompt *embeddings* (CoOp style), built with open_clip.

    Args:
        config: ``'RN50'`` or ``'tiny'`` (``CLIP_TEXT_CONFIGS``).

    Attributes:
        config: the ``ClipTextConfig``.
        token_embedding, positional_embedding, transformer, ln_final, text_projection: open_clip
            ``TextTransformer`` modules (OpenAI names); ``attn_mask`` the causal mask (buffer,
            not saved).
    """

    def __init__(self, config: str = 'RN50') -> None:
        super().__init__()
        from open_clip.model import _build_text_tower  # lazy: open_clip imports are slow

        cfg = _config(config)
        self.config_name = config
        self.config = cfg
        tower = _build_text_tower(
            cfg.embed_dim, dict(context_length=cfg.context_length, vocab_size=cfg.vocab_size,
                                width=cfg.width, heads=cfg.heads, layers=cfg.layers),
            quick_gelu=True)  # OpenAI CLIP (and WSMA's copy of it) use QuickGELU
        self.token_embedding = tower.token_embedding
        self.positional_embedding = tower.positional_embedding
        self.transformer = tower.transformer
        self.ln_final = tower.ln_final
        self.text_projection = tower.text_projection
        self.register_buffer('attn_mask', tower.attn_mask, persistent=False)

    @property
    def width(self) -> int:
        return self.config.width

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    def load_weights(self, path: str | os.PathLike) -> Tensor | None:
        """Copy the text tower of a CLIP weights file into this encoder (strict).

        Returns:
            The file's ``logit_scale`` (a 0-d tensor) or None when it has none.

        Raises:
            FileNotFoundError / ValueError: see ``read_clip_state_dict``; also missing keys or
                shapes that do not fit the configuration.
        """
        state = read_clip_state_dict(path)
        scale = state.pop(LOGIT_SCALE_KEY, None)
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        extra = sorted(set(state) - set(own))
        wrong = [f'{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}' for k in own
                 if k in state and state[k].shape != own[k].shape]
        if missing or extra or wrong:
            raise ValueError(f"{path}: CLIP text weights do not fit the '{self.config_name}' "
                             f'text tower ({len(missing)} missing, {len(extra)} unexpected, '
                             f'{len(wrong)} wrong shapes; first: {(missing + extra + wrong)[0]})')
        with torch.no_grad():
            for key, tensor in own.items():
                tensor.copy_(state[key])
        logger.info('CLIP %s text tower loaded from %s', self.config_name, path)
        return None if scale is None else scale.reshape(())

    def forward(self, prompts: Tensor, tokens: Tensor,
                add_token_embedding: bool = False) -> Tensor:
        """Text features of prompt embeddings.

        Args:
            prompts: (T, L, width) prompt embeddings (SOT, context, class tokens, EOT, padding).
            tokens: (T, L) token ids of the prompts; the EOT position is ``argmax`` (EOT has the
                largest id), as in CLIP.
            add_token_embedding: add ``token_embedding(tokens)`` to ``prompts`` (WSMA's code).

        Returns:
            (T, embed_dim) unnormalised text features.
        """
        if prompts.dim() != 3 or tokens.shape != prompts.shape[:2]:
            raise ValueError(f'prompts (T, L, width) and tokens (T, L) do not match: '
                             f'{tuple(prompts.shape)}, {tuple(tokens.shape)}')
        x = prompts
        if add_token_embedding:
            x = x + self.token_embedding(tokens).to(x.dtype)
        x = x + self.positional_embedding[:x.shape[1]].to(x.dtype)
        mask = self.attn_mask[:x.shape[1], :x.shape[1]].to(x.dtype)
        x = self.transformer(x, attn_mask=mask)
        x = self.ln_final(x)
        eot = tokens.argmax(dim=-1)
        return x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection


# ----------------------------------------------------------------------------------------------
# Prompt learner
# ----------------------------------------------------------------------------------------------
class PromptLearner(nn.Module):
    """CoOp generic context (class token at the end): "X X ... X <class name>.".

    Args:
        classnames: class names in index order (underscores become spaces).
        token_embedding: the CLIP token embedding (read for the ``'coop'`` buffers).
        n_ctx: number of learnable context vectors (16 in WSMA).
        context_length: CLIP context length.
        mode: ``'official'`` or ``'coop'`` (see the module docstring).

    Attributes:
        ctx: (n_ctx, width) learnable context, initialised N(0, 0.02).
        token_prefix: (C, 1, width) buffer of the SOT position.
        token_suffix: (C, L - 1 - n_ctx, width) buffer of the class-name / EOT / padding positions.
        tokenized_prompts: (C, L) token ids (not saved: rebuilt from the class names).
    """

    def __init__(self, classnames: Sequence[str], token_embedding: nn.Embedding, *,
                 n_ctx: int = 16, context_length: int = 77, mode: str = 'official') -> None:
        super().__init__()
        if mode not in PROMPT_MODES:
            raise ValueError(f"prompt mode must be one of {PROMPT_MODES}, got {mode!r}")
        if n_ctx < 1:
            raise ValueError(f'n_ctx must be >= 1, got {n_ctx}')
        names = [str(c).replace('_', ' ') for c in classnames]
        if not names:
            raise ValueError('PromptLearner needs at least one class name')
        width = token_embedding.weight.shape[1]
        self.n_ctx = int(n_ctx)
        self.mode = mode
        prefix = ' '.join(['X'] * n_ctx)
        tokens = tokenize_prompts([f'{prefix} {name}.' for name in names], context_length)
        self.register_buffer('tokenized_prompts', tokens, persistent=False)
        self.ctx = nn.Parameter(torch.empty(n_ctx, width).normal_(std=0.02))
        if mode == 'coop':
            with torch.no_grad():
                emb = token_embedding(tokens).float()
        else:  # a freshly initialised nn.Embedding: N(0, 1) per token id
            ids, inverse = tokens.unique(return_inverse=True)
            emb = torch.randn(len(ids), width)[inverse]
        self.register_buffer('token_prefix', emb[:, :1].clone())
        self.register_buffer('token_suffix', emb[:, 1 + n_ctx:].clone())

    @property
    def num_classes(self) -> int:
        return int(self.tokenized_prompts.shape[0])

    def forward(self) -> Tensor:
        """(C, L, width) prompt embeddings: [prefix, ctx, suffix]."""
        c = self.token_prefix.shape[0]
        ctx = self.ctx.unsqueeze(0).expand(c, -1, -1)
        return torch.cat([self.token_prefix.to(ctx.dtype), ctx,
                          self.token_suffix.to(ctx.dtype)], dim=1)
