"""Batched k-means (Lloyd) over a batch of padded point sets, Euclidean distance.

LOCATE clusters the exocentric part descriptors of every training sample separately (the reference
code runs ``fast_pytorch_kmeans.KMeans`` in a Python loop over the batch). Here every sample of
the batch is clustered at once: the point sets are padded to a common length ``N`` and a boolean
mask marks the real points. The loop runs over iterations only and stops as soon as every sample
has converged; a converged sample is frozen, so its result is the one a per-sample run would give.

Differences from ``fast_pytorch_kmeans`` (the LOCATE reference):
    * an empty cluster keeps its previous centroid (the reference sets it to the zero vector);
    * the random generator is an explicit ``torch.Generator`` (reproducible, device-agnostic).
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor

__all__ = ['kmeans', 'INIT_METHODS']

_LOGGER = logging.getLogger(__name__)

INIT_METHODS = ('kmeans++', 'random')


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
    """Uniform [0, 1) numbers drawn on the generator's device, returned on ``like``'s device."""
    gen_device = generator.device if generator is not None else like.device
    u = torch.rand(shape, generator=generator, device=gen_device, dtype=torch.float64)
    return u.to(device=like.device)


def _sq_dists(points: Tensor, centroids: Tensor) -> Tensor:
    """Squared Euclidean distances (B, N, k) between points (B, N, D) and centroids (B, k, D)."""
    d = (points.pow(2).sum(-1, keepdim=True) - 2.0 * points @ centroids.transpose(1, 2)
         + centroids.pow(2).sum(-1).unsqueeze(1))
    return d.clamp_min_(0.0)


def _gather_points(points: Tensor, idx: Tensor) -> Tensor:
    """points (B, N, D), idx (B, m) -> (B, m, D)."""
    return torch.gather(points, 1, idx.unsqueeze(-1).expand(-1, -1, points.shape[-1]))


def _init_random(points: Tensor, mask: Tensor, k: int,
                 generator: torch.Generator | None) -> Tensor:
    """k distinct valid points per sample, uniformly at random (fast_pytorch_kmeans 'random')."""
    scores = _uniform(tuple(mask.shape), generator, points)
    scores = scores.masked_fill(~mask, -1.0)  # valid points always rank above padding
    idx = scores.topk(k, dim=1).indices  # (B, k), distinct indices
    return _gather_points(points, idx)


def _init_kmeanspp(points: Tensor, mask: Tensor, k: int,
                   generator: torch.Generator | None) -> Tensor:
    """k-means++ seeding, vectorised over the batch (inverse-CDF sampling with one draw per step).

    A sample whose remaining valid points all coincide with chosen centroids (zero D^2 mass) falls
    back to a uniform draw among its valid points.
    """
    b, n, _ = points.shape
    valid = mask.to(points.dtype)
    weights = valid.to(torch.float64)
    chosen = []
    min_d = None
    for step in range(k):
        if step > 0:
            d = _sq_dists(points, chosen[-1].unsqueeze(1)).squeeze(-1).to(torch.float64)
            min_d = d if min_d is None else torch.minimum(min_d, d)
            weights = min_d * valid
            empty = weights.sum(1, keepdim=True) <= 0
            weights = torch.where(empty, valid.to(torch.float64), weights)
        cdf = weights.cumsum(1)  # (B, N)
        u = _uniform((b, 1), generator, points) * cdf[:, -1:]
        idx = torch.searchsorted(cdf, u, right=True).clamp_(max=n - 1)  # (B, 1)
        chosen.append(_gather_points(points, idx).squeeze(1))  # (B, D)
    return torch.stack(chosen, dim=1)


@torch.no_grad()
def kmeans(points: Tensor, mask: Tensor | None = None, k: int = 3, iters: int = 300,
           tol: float = 1e-4, generator: torch.Generator | None = None,
           init: str | Tensor = 'kmeans++') -> tuple[Tensor, Tensor, Tensor]:
    """Cluster each point set of a batch into ``k`` clusters (Lloyd's algorithm, no gradient).

    Args:
        points: (B, N, D) point sets, padded to a common N.
        mask: (B, N) bool, True for real points; None means all points are real.
        k: number of clusters.
        iters: maximum number of Lloyd iterations (``max_iter`` of the reference, 300).
        tol: a sample has converged when the summed squared centroid shift of one iteration is
            ``<= tol`` (the ``fast_pytorch_kmeans`` criterion, default 1e-4).
        generator: random generator for the initialisation (CPU or on the points' device);
            the same generator state gives the same result.
        init: ``'kmeans++'``, ``'random'`` (k distinct valid points, as ``fast_pytorch_kmeans``)
            or a (B, k, D) tensor of initial centroids.

    Returns:
        centroids (B, k, D) in the dtype of ``points``; assignments (B, N) int64 cluster index
        of every point (-1 for padding and for invalid samples); valid (B,) bool, False for
        samples with fewer than ``k`` real points (their centroids are zeros).

    Raises:
        ValueError: bad shapes, ``k < 1``, ``iters < 1`` or an unknown ``init``.
    """
    if points.dim() != 3:
        raise ValueError(f'kmeans expects points of shape (B, N, D), got {tuple(points.shape)}')
    b, n, dim = points.shape
    if mask is None:
        mask = torch.ones(b, n, dtype=torch.bool, device=points.device)
    if mask.shape != (b, n) or mask.dtype != torch.bool:
        raise ValueError(f'kmeans expects a bool mask of shape {(b, n)}, '
                         f'got {mask.dtype} {tuple(mask.shape)}')
    if k < 1 or iters < 1:
        raise ValueError(f'kmeans needs k >= 1 and iters >= 1, got k={k}, iters={iters}')
    pts = points.float() if points.dtype in (torch.float16, torch.bfloat16) else points
    valid = mask.sum(1) >= k
    assign = torch.full((b, n), -1, dtype=torch.long, device=points.device)
    if n < k or not bool(valid.any()):
        return points.new_zeros(b, k, dim), assign, valid
    # Invalid samples take part in the vectorised arithmetic on dummy points but are masked out.
    mask = mask & valid.unsqueeze(1)

    if isinstance(init, Tensor):
        if init.shape != (b, k, dim):
            raise ValueError(f'kmeans init centroids must have shape {(b, k, dim)}, '
                             f'got {tuple(init.shape)}')
        cent = init.to(device=pts.device, dtype=pts.dtype).clone()
    elif init == 'random':
        cent = _init_random(pts, mask | ~valid.unsqueeze(1), k, generator)
    elif init == 'kmeans++':
        cent = _init_kmeanspp(pts, mask | ~valid.unsqueeze(1), k, generator)
    else:
        raise ValueError(f"unknown kmeans init '{init}'; use one of {INIT_METHODS} or a tensor")

    maskf = mask.to(pts.dtype)
    arange_k = torch.arange(k, device=pts.device)
    active = valid.clone()  # samples still iterating
    it = 0
    for it in range(iters):
        labels = _sq_dists(pts, cent).argmin(-1)  # (B, N); ties go to the lowest index
        onehot = (labels.unsqueeze(1) == arange_k.view(1, k, 1)).to(pts.dtype) * maskf.unsqueeze(1)
        counts = onehot.sum(-1, keepdim=True)  # (B, k, 1)
        means = (onehot @ pts) / counts.clamp_min(1.0)
        new = torch.where(counts > 0, means, cent)  # empty cluster: keep its centroid
        shift = (new - cent).pow(2).sum((1, 2))
        cent = torch.where(active.view(b, 1, 1), new, cent)
        active = active & (shift > tol)
        if not bool(active.any()):
            break
    _LOGGER.debug('kmeans: %d iterations for %d samples', it + 1, b)
    # Final assignment to the final centroids.
    labels = _sq_dists(pts, cent).argmin(-1)
    assign = torch.where(mask, labels, assign)
    cent = torch.where(valid.view(b, 1, 1), cent, torch.zeros_like(cent))
    return cent.to(points.dtype), assign, valid
