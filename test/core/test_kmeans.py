"""Batched k-means (affordance_core.ops.kmeans) against a per-sample reference."""
from __future__ import annotations

import pytest
import torch

from affordance_core.ops import kmeans


def reference_kmeans(points: torch.Tensor, init: torch.Tensor, iters: int = 300,
                     tol: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain Lloyd on one point set (P, D) from init (k, D); empty clusters keep their centroid."""
    cent = init.clone()
    for _ in range(iters):
        labels = torch.cdist(points, cent).argmin(1)
        new = cent.clone()
        for j in range(cent.shape[0]):
            if (labels == j).any():
                new[j] = points[labels == j].mean(0)
        shift = (new - cent).pow(2).sum()
        cent = new
        if shift <= tol:
            break
    return cent, torch.cdist(points, cent).argmin(1)


def _padded_batch(counts: list[int], n: int, d: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    points = torch.randn(len(counts), n, d, generator=gen, dtype=torch.float64)
    mask = torch.zeros(len(counts), n, dtype=torch.bool)
    for b, c in enumerate(counts):
        # real points at random positions; padding holds huge values that must never matter
        idx = torch.randperm(n, generator=gen)[:c]
        mask[b, idx] = True
    points[~mask] = 1e6
    return points, mask


def test_matches_per_sample_reference_with_padding():
    counts = [40, 17, 2, 33, 3]  # sample 2 has fewer than k=3 points
    points, mask = _padded_batch(counts, n=40, d=5)
    # Initial centroids: the first three real points of every sample (zeros when invalid).
    init = torch.zeros(len(counts), 3, 5, dtype=torch.float64)
    for b in range(len(counts)):
        real = points[b][mask[b]]
        init[b, :min(3, len(real))] = real[:3]
    cent, assign, valid = kmeans(points, mask, k=3, iters=300, tol=1e-10, init=init)
    assert valid.tolist() == [True, True, False, True, True]
    for b in range(len(counts)):
        if not valid[b]:
            assert torch.equal(cent[b], torch.zeros(3, 5, dtype=torch.float64))
            assert (assign[b] == -1).all()
            continue
        ref_cent, ref_assign = reference_kmeans(points[b][mask[b]], init[b], tol=1e-10)
        torch.testing.assert_close(cent[b], ref_cent, rtol=0, atol=1e-9)
        assert torch.equal(assign[b][mask[b]], ref_assign)
        assert (assign[b][~mask[b]] == -1).all()


def test_iteration_limit_matches_reference():
    points, mask = _padded_batch([30, 25], n=30, d=4, seed=3)
    init = torch.stack([points[b][mask[b]][:3] for b in range(2)])
    cent, _, _ = kmeans(points, mask, k=3, iters=2, tol=0.0, init=init)
    for b in range(2):
        ref, _ = reference_kmeans(points[b][mask[b]], init[b], iters=2, tol=0.0)
        torch.testing.assert_close(cent[b], ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize('init', ['kmeans++', 'random'])
def test_well_separated_clusters(init):
    gen = torch.Generator().manual_seed(1)
    b, per, d = 6, 20, 8
    centres = 100.0 * torch.randn(b, 3, d, generator=gen)
    pts = centres.repeat_interleave(per, dim=1) + torch.randn(b, 3 * per, d, generator=gen)
    truth = torch.arange(3).repeat_interleave(per)
    perm = torch.randperm(3 * per, generator=gen)
    pts, truth = pts[:, perm], truth[perm]
    # pad to 70 points per sample with junk that the mask hides
    pts = torch.cat([pts, torch.full((b, 10, d), -1e4)], 1)
    mask = torch.cat([torch.ones(b, 3 * per, dtype=torch.bool),
                      torch.zeros(b, 10, dtype=torch.bool)], 1)
    cent, assign, valid = kmeans(pts, mask, k=3, generator=torch.Generator().manual_seed(0),
                                 init=init)
    assert valid.all()
    assert cent.dtype == torch.float32 and cent.shape == (b, 3, d)
    for s in range(b):
        true_means = torch.stack([pts[s, :3 * per][truth == j].mean(0) for j in range(3)])
        # one centroid per true cluster (any order), equal to that cluster's mean
        dist = torch.cdist(true_means, cent[s])
        match = dist.argmin(1)
        if init == 'kmeans++':
            assert sorted(match.tolist()) == [0, 1, 2]
            torch.testing.assert_close(cent[s][match], true_means, rtol=0, atol=1e-3)
            # the partition is the true one up to relabelling
            assert torch.equal(assign[s, :3 * per], match[truth])
        assert (assign[s, 3 * per:] == -1).all()


@pytest.mark.parametrize('init', ['kmeans++', 'random'])
def test_init_picks_distinct_real_points(init):
    # exactly k real points per sample: any valid init converges to the points themselves
    points = torch.full((4, 9, 2), 1e5)
    mask = torch.zeros(4, 9, dtype=torch.bool)
    for b in range(4):
        idx = torch.tensor([b, b + 2, b + 5])
        points[b, idx] = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]) + b
        mask[b, idx] = True
    cent, assign, valid = kmeans(points, mask, k=3, generator=torch.Generator().manual_seed(5),
                                 init=init)
    assert valid.all()
    for b in range(4):
        got = sorted(map(tuple, (cent[b] - b).tolist()))
        assert got == [(0.0, 0.0), (0.0, 1.0), (1.0, 0.0)]
        assert sorted(assign[b][mask[b]].tolist()) == [0, 1, 2]


def test_deterministic_given_generator():
    points, mask = _padded_batch([50, 41, 50], n=50, d=6, seed=7)
    runs = [kmeans(points, mask, k=3, generator=torch.Generator().manual_seed(11), init=i)
            for i in ('random', 'random', 'kmeans++', 'kmeans++')]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert torch.equal(runs[2][0], runs[3][0])


def test_all_invalid_and_no_mask():
    points = torch.randn(2, 2, 3)
    cent, assign, valid = kmeans(points, None, k=3)
    assert not valid.any() and (assign == -1).all() and torch.equal(cent, torch.zeros(2, 3, 3))
    cent, assign, valid = kmeans(torch.randn(2, 10, 3), None, k=2)
    assert valid.all() and (assign >= 0).all() and cent.shape == (2, 2, 3)


def test_bad_input():
    with pytest.raises(ValueError, match=r'\(B, N, D\)'):
        kmeans(torch.randn(10, 3))
    with pytest.raises(ValueError, match='bool mask'):
        kmeans(torch.randn(2, 10, 3), torch.ones(2, 10))
    with pytest.raises(ValueError, match='unknown kmeans init'):
        kmeans(torch.randn(2, 10, 3), init='forgy')
    with pytest.raises(ValueError, match='init centroids must have shape'):
        kmeans(torch.randn(2, 10, 3), k=3, init=torch.zeros(2, 2, 3))
