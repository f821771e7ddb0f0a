"""Non-negative matrix factorisation + Hamburger block (WSMA HOI-Transfer, methods.md §4.1.3).

The "Hamburger" of Geng et al. (ICLR 2021) as used by Cross-View-AG ("AIM") and WSMA
(``AIM/modules/{burger,ham}.py``): lower bread (1x1 conv in -> D + ReLU), NMF "ham" on the tokens
of N views *jointly* (N*h*w tokens per sample), upper bread (1x1 conv D -> in without bias +
BatchNorm), residual addition and ReLU.

NMF with R bases (S = 1 group): x (D x n) ~ B coef^T with B (D x R), coef (n x R) >= 0.

* coef starts as softmax(inv_t * x^T B) over R;
* multiplicative updates, ``steps`` times without gradient:
  coef <- coef * (x^T B) / (coef B^T B + 1e-6), then B <- B * (x coef) / (B coef^T coef + 1e-6);
* one more coefficient update *with* gradient (w.r.t. x), then x_hat = B coef^T.

The bases are not learned: they start as uniform random values L2-normalised along D and, after
every training forward, become an EMA of the batch-mean bases, B <- B + eta (mean_b B_b - B)
(eta = 0.9), renormalised along D. Here they are a *buffer* (the reference keeps a plain tensor
attribute), so checkpoints keep them and ``.to(device)`` moves them.

Differences from the reference: the EMA update runs in training mode only (the reference also
updates in eval mode, but never runs the exo branch at test time); the factorisation runs in
float32 with autocast disabled (the multiplicative updates under- / overflow in float16); SyncBN
is a plain ``BatchNorm2d`` (the trainer converts it for multi-GPU runs); the EMA uses the batch of
the local process only.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ['NMF2D', 'Hamburger', 'nmf_coef_step', 'nmf_bases_step', 'nmf_inference',
           'init_nmf_bases']

NMF_EPS = 1e-6


def nmf_coef_step(x: Tensor, bases: Tensor, coef: Tensor, eps: float = NMF_EPS) -> Tensor:
    """coef <- coef * (x^T B) / (coef B^T B + eps).

    Args:
        x: (B, D, n) non-negative data; bases (B, D, R); coef (B, n, R).
    """
    numerator = x.transpose(1, 2) @ bases
    denominator = coef @ (bases.transpose(1, 2) @ bases)
    return coef * numerator / (denominator + eps)


def nmf_bases_step(x: Tensor, bases: Tensor, coef: Tensor, eps: float = NMF_EPS) -> Tensor:
    """B <- B * (x coef) / (B coef^T coef + eps); shapes as ``nmf_coef_step``."""
    numerator = x @ coef
    denominator = bases @ (coef.transpose(1, 2) @ coef)
    return bases * numerator / (denominator + eps)


@torch.no_grad()
def nmf_inference(x: Tensor, bases: Tensor, steps: int,
                  inv_t: float = 1.0) -> tuple[Tensor, Tensor]:
    """Softmax initialisation of coef and ``steps`` alternating updates, without gradient.

    Returns:
        bases (B, D, R), coef (B, n, R).
    """
    coef = F.softmax(inv_t * (x.transpose(1, 2) @ bases), dim=-1)
    for _ in range(steps):
        coef = nmf_coef_step(x, bases, coef)
        bases = nmf_bases_step(x, bases, coef)
    return bases, coef


def init_nmf_bases(dim: int, rank: int, generator: torch.Generator | None = None) -> Tensor:
    """(1, D, R) uniform [0, 1) bases, L2-normalised along D (the reference's ``_build_bases``)."""
    return F.normalize(torch.rand(1, dim, rank, generator=generator), dim=1)


class NMF2D(nn.Module):
    """NMF "ham" with EMA bases (no learnable parameters).

    Args:
        dim: D, the token width.
        rank: R, the number of bases (64).
        train_steps / eval_steps: updates without gradient in training / eval mode (6 / 7).
        inv_t: softmax temperature of the coefficient initialisation (1).
        eta: EMA factor of the bases update (0.9).

    Attributes:
        bases: (1, D, R) buffer.
    """

    def __init__(self, dim: int = 512, rank: int = 64, train_steps: int = 6, eval_steps: int = 7,
                 inv_t: float = 1.0, eta: float = 0.9) -> None:
        super().__init__()
        if dim < 1 or rank < 1 or train_steps < 0 or eval_steps < 0:
            raise ValueError(f'NMF2D needs dim, rank >= 1 and steps >= 0, got dim={dim}, '
                             f'rank={rank}, steps={train_steps}/{eval_steps}')
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f'eta must lie in [0, 1], got {eta}')
        self.dim, self.rank = int(dim), int(rank)
        self.train_steps, self.eval_steps = int(train_steps), int(eval_steps)
        self.inv_t, self.eta = float(inv_t), float(eta)
        self.register_buffer('bases', init_nmf_bases(self.dim, self.rank))

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, rank={self.rank}, steps={self.train_steps}/{self.eval_steps}, '
                f'eta={self.eta}')

    def forward(self, x: Tensor) -> Tensor:
        """Low-rank reconstruction of non-negative tokens.

        Args:
            x: (B, D, n) non-negative tokens (n = views * h * w).

        Returns:
            (B, D, n) reconstruction B coef^T (differentiable w.r.t. x through the last coef
            update). In training mode the bases buffer is then EMA-updated.
        """
        if x.dim() != 3 or x.shape[1] != self.dim:
            raise ValueError(f'NMF2D expects (B, {self.dim}, n) tokens, got {tuple(x.shape)}')
        bases = self.bases.to(x.dtype).expand(x.shape[0], -1, -1)
        steps = self.train_steps if self.training else self.eval_steps
        bases, coef = nmf_inference(x, bases, steps, self.inv_t)
        coef = nmf_coef_step(x, bases, coef)
        out = bases @ coef.transpose(1, 2)
        if self.training:
            self.online_update(bases)
        return out

    @torch.no_grad()
    def online_update(self, bases: Tensor) -> None:
        """bases <- normalize_D(bases + eta * (mean_b(new bases) - bases)).

        Args:
            bases: (B, D, R) bases after the factorisation of a batch.
        """
        update = bases.mean(dim=0, keepdim=True).to(self.bases.dtype)
        self.bases.copy_(F.normalize(self.bases + self.eta * (update - self.bases), dim=1))


class Hamburger(nn.Module):
    """HamburgerV1 with NMF on N views jointly: (B*N, C, h, w) -> (B*N, C, h, w).

    Parameter names follow the reference (``lower_bread.0``, ``ham.bases``, ``upper_bread.0`` /
    ``.1``). Convolutions start from N(0, sqrt(2 / (k*k*out))) and the BatchNorm from weight 1,
    bias 0, as the reference's ``_init_weight``.

    Args:
        in_dim: C, the feature width (384).
        dim: D, the NMF width (512).
        rank, train_steps, eval_steps, inv_t, eta: see ``NMF2D``.
    """

    def __init__(self, in_dim: int, dim: int = 512, rank: int = 64, train_steps: int = 6,
                 eval_steps: int = 7, inv_t: float = 1.0, eta: float = 0.9) -> None:
        super().__init__()
        self.lower_bread = nn.Sequential(nn.Conv2d(in_dim, dim, 1), nn.ReLU(inplace=True))
        self.ham = NMF2D(dim, rank, train_steps, eval_steps, inv_t, eta)
        self.upper_bread = nn.Sequential(nn.Conv2d(dim, in_dim, 1, bias=False),
                                         nn.BatchNorm2d(in_dim))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, num_views: int) -> Tensor:
        """Factorise the N views of every sample jointly.

        Args:
            x: (B*N, C, h, w) features, sample-major (the N views of a sample are consecutive).
            num_views: N.

        Returns:
            (B*N, C, h, w): ReLU(x + BN(conv(NMF(ReLU(conv(x)))))).
        """
        if x.dim() != 4 or num_views < 1 or x.shape[0] % num_views:
            raise ValueError(f'Hamburger expects (B*N, C, h, w) with N={num_views}, '
                             f'got {tuple(x.shape)}')
        shortcut = x
        y = self.lower_bread(x)
        bn, d, h, w = y.shape
        b = bn // num_views
        # (B, N, D, h, w) -> (B, D, N*h*w): tokens image-major, as the reference's permute
        tokens = y.view(b, num_views, d, h, w).transpose(1, 2).reshape(b, d, num_views * h * w)
        with torch.autocast(device_type=x.device.type, enabled=False):
            rec = self.ham(tokens.float()).to(y.dtype)
        y = rec.view(b, d, num_views, h, w).transpose(1, 2).reshape(bn, d, h, w)
        y = self.upper_bread(y)
        return F.relu(y + shortcut)
