"""GeoAware-SC correspondence ops (affordance_core.ops.correspondence) vs hand computations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from affordance_core.ops import correspondence as corr_ops
from affordance_core.ops.correspondence import (argmax_coords, choose_flip, cosine_correlation,
                                                dense_correspondence, flip_permutation,
                                                flip_points, flip_visibility,
                                                instance_matching_distance,
                                                merge_flip_predictions, mutual_nn_distance,
                                                patch_to_pixel, pixel_to_patch, soft_argmax,
                                                transfer_keypoints,
                                                transfer_keypoints_flip_aware, unflip_points,
                                                window_soft_argmax, window_soft_argmax_weights)

DT = torch.float64


# ----------------------------------------------------------------------------------------------
# window soft-argmax
# ----------------------------------------------------------------------------------------------
def _known_peak_row() -> torch.Tensor:
    """8 x 8 target grid: peak 0.9 at (y=3, x=4), right neighbour 0.88, lower neighbour 0.86, a
    0.8 cell outside the w=2 window at (3, 7) and a negative cell at (0, 0)."""
    c = torch.zeros(8, 8, dtype=DT)
    c[3, 4], c[3, 5], c[4, 4], c[3, 7], c[0, 0] = 0.9, 0.88, 0.86, 0.8, -0.5
    return c


def test_window_soft_argmax_known_peak_hand_formula():
    c = _known_peak_row()
    xy = window_soft_argmax(c, window=2, beta=0.02)
    # after the window multiplication only the peak and its two neighbours are non-zero; the 61
    # other cells (the 0.8 and the -0.5 included) are 0 and weigh e^{-0.9/0.02} = e^-45
    e1, e2, e45 = math.exp(-1.0), math.exp(-2.0), math.exp(-45.0)
    sum_x = sum_y = 8 * 28  # sum of the column (row) index over the 64 cells
    z = 1 + e1 + e2 + 61 * e45
    x = (4 + 5 * e1 + 4 * e2 + e45 * (sum_x - 4 - 5 - 4)) / z
    y = (3 + 3 * e1 + 4 * e2 + e45 * (sum_y - 3 - 3 - 4)) / z
    assert xy.tolist() == pytest.approx([x, y], abs=1e-12)
    assert xy.tolist() == pytest.approx([4.2447, 3.0901], abs=1e-4)
    # the default window (w = 7) covers the whole 8 x 8 grid around (3, 4): the 0.8 cell counts
    xy7 = window_soft_argmax(c, beta=0.02)
    e5, em = math.exp(-5.0), math.exp(-70.0)  # (0.8 - 0.9) / 0.02 and (-0.5 - 0.9) / 0.02
    z7 = 1 + e1 + e2 + e5 + em + 59 * e45
    x7 = (4 + 5 * e1 + 4 * e2 + 7 * e5 + 0 * em + e45 * (sum_x - 4 - 5 - 4 - 7 - 0)) / z7
    assert float(xy7[0]) == pytest.approx(x7, abs=1e-12)


def test_zeroed_entries_get_exp_minus_peak_over_beta():
    c = _known_peak_row()
    p = window_soft_argmax_weights(c, window=2, beta=0.02)
    assert float(p.sum()) == pytest.approx(1.0, abs=1e-12)
    peak = float(p[3, 4])
    # zeroed (multiplied, not -inf): weight e^{(0 - max) / beta} relative to the peak ...
    assert float(p[3, 7]) / peak == pytest.approx(math.exp(-0.9 / 0.02), rel=1e-9)
    # ... the same for a negative correlation outside the window (not e^{(-0.5 - 0.9) / beta})
    assert float(p[0, 0]) / peak == pytest.approx(math.exp(-0.9 / 0.02), rel=1e-9)
    assert float(p[3, 5]) / peak == pytest.approx(math.exp(-0.02 / 0.02), rel=1e-9)
    # GeoAware property: if the best correlation is negative, the zeroed cells (0) are the max
    neg = torch.full((4, 4), -0.6, dtype=DT)
    neg[1, 1] = -0.1
    q = window_soft_argmax_weights(neg, window=1, beta=0.02)
    w_peak, w_in = math.exp(-0.1 / 0.02), math.exp(-0.6 / 0.02)
    z = w_peak + 8 * w_in + 7 * 1.0  # the 7 zeroed cells outside the 3x3 window weigh e^0 = 1
    assert float(q[3, 3]) == pytest.approx(1.0 / z, rel=1e-12)
    assert float(q[1, 1]) == pytest.approx(w_peak / z, rel=1e-12)
    assert float(q[0, 1]) == pytest.approx(w_in / z, rel=1e-12)


def _reference_window(shape, peak, w):
    """GeoAware get_flow window: offsets in [-w, w]^2 added to the argmax, indices clamped."""
    h, wd = shape
    return {(min(max(peak[0] + dy, 0), h - 1), min(max(peak[1] + dx, 0), wd - 1))
            for dy in range(-w, w + 1) for dx in range(-w, w + 1)}


@pytest.mark.parametrize('shape,peak', [((6, 6), (0, 0)), ((6, 6), (5, 3)), ((5, 7), (2, 6)),
                                        ((5, 7), (4, 0))])
def test_window_clamped_at_borders(shape, peak):
    gen = torch.Generator().manual_seed(0)
    c = 0.3 + 0.4 * torch.rand(shape, generator=gen, dtype=DT)
    c[peak] = 0.95
    beta, w = 0.05, 2
    window = _reference_window(shape, peak, w)
    assert len(window) < 25  # truncated, not shifted inside the grid
    logits = torch.tensor([[(float(c[r, k]) if (r, k) in window else 0.0)
                            for k in range(shape[1])] for r in range(shape[0])], dtype=DT)
    wts = torch.exp((logits - 0.95) / beta)
    wts = wts / wts.sum()
    p = window_soft_argmax_weights(c, window=w, beta=beta)
    torch.testing.assert_close(p, wts, rtol=1e-12, atol=1e-15)
    ex = sum(float(wts[r, k]) * k for r in range(shape[0]) for k in range(shape[1]))
    ey = sum(float(wts[r, k]) * r for r in range(shape[0]) for k in range(shape[1]))
    assert window_soft_argmax(c, window=w, beta=beta).tolist() == pytest.approx([ex, ey],
                                                                                abs=1e-12)


def test_gaussian_kernel_variant():
    gen = torch.Generator().manual_seed(1)
    c = 0.5 * torch.rand(7, 9, generator=gen, dtype=DT)
    c[2, 6] = 0.9
    sigma, beta = 2.0, 0.1
    x = torch.empty_like(c)
    for r in range(7):
        for k in range(9):
            kern = math.exp(-((k - 6) ** 2 + (r - 2) ** 2) / (2 * sigma ** 2))
            x[r, k] = kern * c[r, k]
    wts = torch.exp((x - x.max()) / beta)
    wts = wts / wts.sum()
    p = window_soft_argmax_weights(c, window=-2, beta=beta)
    torch.testing.assert_close(p, wts, rtol=1e-12, atol=1e-15)
    ex = float((wts.sum(0) * torch.arange(9, dtype=DT)).sum())
    ey = float((wts.sum(1) * torch.arange(7, dtype=DT)).sum())
    assert window_soft_argmax(c, window=-2, beta=beta).tolist() == pytest.approx([ex, ey],
                                                                                 abs=1e-12)
    # the kernel differs from the 0/1 window
    assert not torch.allclose(p, window_soft_argmax_weights(c, window=2, beta=beta))


def test_plain_soft_argmax_and_nearest_neighbour():
    gen = torch.Generator().manual_seed(2)
    c = torch.rand(3, 4, 5, generator=gen, dtype=DT)
    sm = torch.softmax(c.flatten(1) / 0.3, dim=1).reshape(3, 4, 5)
    ex = (sm.sum(1) * torch.arange(5, dtype=DT)).sum(-1)
    ey = (sm.sum(2) * torch.arange(4, dtype=DT)).sum(-1)
    torch.testing.assert_close(soft_argmax(c, beta=0.3), torch.stack((ex, ey), -1))
    torch.testing.assert_close(window_soft_argmax(c, window=0, beta=0.3),
                               torch.stack((ex, ey), -1))
    nn = argmax_coords(c)
    for i in range(3):
        r, k = divmod(int(c[i].argmax()), 5)
        assert nn[i].tolist() == [k, r]


def test_batched_rows_numpy_and_validation():
    gen = torch.Generator().manual_seed(3)
    c = torch.rand(2, 3, 5, 6, generator=gen, dtype=DT)
    out = window_soft_argmax(c, window=1, beta=0.05)
    assert out.shape == (2, 3, 2)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(out[i, j], window_soft_argmax(c[i, j], 1, 0.05))
    arr = c.numpy().copy()
    out_np = window_soft_argmax(arr, window=1, beta=0.05)
    assert isinstance(out_np, np.ndarray) and out_np.dtype == np.float64
    np.testing.assert_allclose(out_np, out.numpy(), rtol=0, atol=0)
    # read-only / non-contiguous numpy input is copied, not rejected
    ro = arr[..., ::-1]
    np.testing.assert_allclose(window_soft_argmax(ro, 1, 0.05),
                               window_soft_argmax(np.ascontiguousarray(ro), 1, 0.05))
    # explicit window centre (flat index), scalar broadcast to every row
    p = window_soft_argmax_weights(c[0, 0], window=0, beta=0.05, peak=7)
    torch.testing.assert_close(p, window_soft_argmax_weights(c[0, 0], 0, 0.05))
    with pytest.raises(ValueError, match='beta'):
        window_soft_argmax(c, beta=0.0)
    with pytest.raises(ValueError, match='peak'):
        window_soft_argmax(c[0, 0], peak=30)
    with pytest.raises(ValueError, match='peak'):
        window_soft_argmax(c[0], peak=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match='float'):
        window_soft_argmax(torch.ones(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match='shape'):
        window_soft_argmax(torch.ones(3, dtype=DT))
    with pytest.raises(ValueError, match='window'):
        window_soft_argmax(c, window=1.5)


def test_grasp_options_normalize_peak_and_mask_higher():
    rr, cc = torch.meshgrid(torch.arange(10, dtype=DT), torch.arange(10, dtype=DT),
                            indexing='ij')
    g = torch.exp(-((rr - 4.4) ** 2 + (cc - 5.3) ** 2) / 2)
    # GeoAware (unscaled) depends on the height; normalize_peak does not
    a = window_soft_argmax(g, 2, 0.05, normalize_peak=True)
    b = window_soft_argmax(0.2 * g, 2, 0.05, normalize_peak=True)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(window_soft_argmax(0.2 * g, 2, 0.05), a, atol=1e-3)
    # normalize_peak divides by the peak value: weights exp((m g / g_peak - 1) / beta)
    p = window_soft_argmax_weights(0.2 * g, 2, 0.05, normalize_peak=True)
    peak = divmod(int(g.argmax()), 10)
    assert float(p[0, 0] / p[peak]) == pytest.approx(math.exp(-1 / 0.05), rel=1e-9)
    # mask_higher: centred on a lower cell, the higher cells are zeroed like outside cells
    pk = (4, 3)
    q = window_soft_argmax_weights(g, 2, 0.05, peak=pk[0] * 10 + pk[1], mask_higher=True)
    gp = float(g[pk])
    assert float(q[4, 5]) / float(q[pk]) == pytest.approx(math.exp(-gp / 0.05), rel=1e-9)
    q0 = window_soft_argmax_weights(g, 2, 0.05, peak=pk[0] * 10 + pk[1])
    assert float(q0[4, 5]) > float(q0[pk])  # without the option the higher cell dominates


def test_soft_argmax_is_differentiable():
    gen = torch.Generator().manual_seed(4)
    c = torch.rand(4, 6, 6, generator=gen, dtype=DT, requires_grad=True)
    out = window_soft_argmax(c, window=2, beta=0.1)
    out.sum().backward()
    assert c.grad is not None and torch.isfinite(c.grad).all() and c.grad.abs().sum() > 0


def test_patch_pixel_mapping():
    xy = torch.tensor([[0.0, 59.0], [2.5, 0.25]], dtype=DT)
    assert patch_to_pixel(xy, 14).tolist() == [[7.0, 833.0], [42.0, 10.5]]   # 14 p + 7
    assert patch_to_pixel(xy, 840 / 60).tolist() == [[7.0, 833.0], [42.0, 10.5]]
    assert patch_to_pixel(np.array([1.0, 3.0]), 16).tolist() == [24.0, 56.0]  # 16 p + 8
    pts = torch.tensor([[13.99, 14.0], [-3.0, 1000.0]], dtype=DT)
    assert pixel_to_patch(pts, 14, (60, 60)).tolist() == [[0, 1], [0, 59]]
    with pytest.raises(ValueError, match='stride'):
        patch_to_pixel(xy, 0)


# ----------------------------------------------------------------------------------------------
# dense correspondence and keypoint transfer
# ----------------------------------------------------------------------------------------------
def _orthonormal_target(h=8, w=9, seed=0):
    """(h*w, h, w) target map whose descriptors are orthonormal (cosine 0 between patches)."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(h * w, h * w, generator=gen, dtype=DT))
    return (3.0 * q).reshape(h * w, h, w)  # the scale must not matter (cosine)


def test_dense_correspondence_recovers_shift_exactly():
    tgt = _orthonormal_target()
    src = tgt[:, 1:7, 2:8]  # source patch (y, x) is target patch (y + 1, x + 2)
    nn = dense_correspondence(src, tgt, soft=False, mutual_check=True)
    assert nn.coords.shape == (6, 6, 2) and nn.flow.shape == (6, 6, 2)
    assert (nn.flow[..., 0] == 2).all() and (nn.flow[..., 1] == 1).all()
    assert nn.mutual is not None and bool(nn.mutual.all())
    torch.testing.assert_close(nn.score, torch.ones(6, 6, dtype=DT))
    assert nn.corr.shape == (36, 72)
    for window in (7, 2, 0, -3):
        soft = dense_correspondence(src, tgt, soft=True, window=window)
        # the other targets have cosine 0: weights e^{-1/0.02} = 2e-22, far below float64 eps
        torch.testing.assert_close(soft.flow, nn.flow, rtol=0, atol=1e-12)
        assert soft.mutual is None
    # random (non-orthogonal) features, circular shift: NN exact, soft within 1e-6
    gen = torch.Generator().manual_seed(5)
    f = torch.randn(64, 5, 5, generator=gen, dtype=DT)
    g = torch.roll(f, shifts=(2, 1), dims=(1, 2))
    d = dense_correspondence(f, g, soft=False)
    ys, xs = torch.meshgrid(torch.arange(5), torch.arange(5), indexing='ij')
    assert d.coords[..., 0].tolist() == ((xs + 1) % 5).to(DT).tolist()
    assert d.coords[..., 1].tolist() == ((ys + 2) % 5).to(DT).tolist()


def test_mutual_check_flags_many_to_one():
    tgt = _orthonormal_target(4, 4)
    src = tgt.clone()
    src[:, 2, 3] = src[:, 0, 1]  # two source patches with the same descriptor -> same target
    d = dense_correspondence(src, tgt, soft=False, mutual_check=True)
    assert d.coords[2, 3].tolist() == d.coords[0, 1].tolist() == [1.0, 0.0]
    expected = torch.ones(4, 4, dtype=torch.bool)
    expected[2, 3] = False  # the target's NN back is the first of the tied sources, (0, 1)
    assert d.mutual.tolist() == expected.tolist()


def test_cosine_correlation_batched_matches_explicit():
    gen = torch.Generator().manual_seed(6)
    a = torch.randn(2, 5, 3, 2, generator=gen, dtype=DT)
    b = torch.randn(2, 5, 2, 4, generator=gen, dtype=DT)
    c = cosine_correlation(a, b)
    assert c.shape == (2, 6, 8)
    for i in range(2):
        for s in range(6):
            for t in range(8):
                u, v = a[i, :, s // 2, s % 2], b[i, :, t // 4, t % 4]
                assert float(c[i, s, t]) == pytest.approx(float(u @ v / (u.norm() * v.norm())))
    with pytest.raises(ValueError, match='channels'):
        cosine_correlation(a, b[:, :3])


def test_transfer_keypoints_pixels():
    tgt = _orthonormal_target()
    src = tgt[:, 1:7, 2:8]
    pts = np.array([[20.5, 40.0], [0.0, 0.0], [95.9, 95.9]])  # stride 16 -> patches
    res = transfer_keypoints(pts, src, tgt, stride_src=16, soft=False, mutual_check=True)
    assert res.src_patches.tolist() == [[1, 2], [0, 0], [5, 5]]
    assert res.coords.tolist() == [[3.0, 3.0], [2.0, 1.0], [7.0, 6.0]]
    assert res.points.tolist() == [[56.0, 56.0], [40.0, 24.0], [120.0, 104.0]]  # 16 p + 8
    assert res.mutual.tolist() == [True, True, True]
    soft = transfer_keypoints(pts, src, tgt, stride_src=16, stride_tgt=8)
    torch.testing.assert_close(soft.points, res.coords * 8 + 4, rtol=0, atol=1e-10)
    assert soft.mutual is None
    # rows equal the dense result at the keypoints' patches
    dense = dense_correspondence(src, tgt, soft=True)
    torch.testing.assert_close(soft.coords, dense.coords[[2, 0, 5], [1, 0, 5]])
    with pytest.raises(ValueError, match='K, 2'):
        transfer_keypoints(pts[:, :1], src, tgt, stride_src=16)


# ----------------------------------------------------------------------------------------------
# instance matching distance, mutual-NN distance, flip decision
# ----------------------------------------------------------------------------------------------
def _bilinear_up(f: torch.Tensor, size: int) -> torch.Tensor:
    """Explicit bilinear resize with half-pixel centres (align_corners=False), clamped."""
    ch, h, w = f.shape
    out = torch.zeros(ch, size, size, dtype=f.dtype)

    def taps(i, n):
        s = max((i + 0.5) * n / size - 0.5, 0.0)
        i0 = int(math.floor(s))
        return i0, min(i0 + 1, n - 1), s - i0

    for i in range(size):
        y0, y1, ly = taps(i, h)
        for j in range(size):
            x0, x1, lx = taps(j, w)
            out[:, i, j] = ((1 - ly) * ((1 - lx) * f[:, y0, x0] + lx * f[:, y0, x1])
                            + ly * ((1 - lx) * f[:, y1, x0] + lx * f[:, y1, x1]))
    return out


def _nearest_up(m: np.ndarray, size: int) -> np.ndarray:
    h, w = m.shape
    return np.array([[m[min(int(math.floor(i * h / size)), h - 1),
                        min(int(math.floor(j * w / size)), w - 1)]
                      for j in range(size)] for i in range(size)])


def _imd_loop(fs, ft, ms, mt, size):
    ns = fs / (fs.norm(dim=0, keepdim=True) + 1e-10)
    nt = ft / (ft.norm(dim=0, keepdim=True) + 1e-10)
    us, ut = _bilinear_up(ns, size), _bilinear_up(nt, size)
    ms, mt = _nearest_up(ms, size), _nearest_up(mt, size)
    dists = []
    for i in range(size):
        for j in range(size):
            if not ms[i, j]:
                continue
            best = math.inf
            for k in range(size):
                for m in range(size):
                    if mt[k, m]:
                        best = min(best, math.sqrt(float(((us[:, i, j] - ut[:, k, m]) ** 2)
                                                         .sum())))
            dists.append(best)
    return sum(dists) / len(dists)


def test_imd_equals_explicit_loop():
    gen = torch.Generator().manual_seed(7)
    fs = torch.randn(3, 3, 4, generator=gen, dtype=DT)
    ft = torch.randn(3, 4, 3, generator=gen, dtype=DT)
    rng = np.random.default_rng(0)
    ms = rng.random((7, 9)) > 0.4
    mt = (rng.random((5, 5)) > 0.5).astype(np.float32)  # 0/1 float masks work too
    imd = instance_matching_distance(fs, ft, ms, mt, resolution=6)
    assert float(imd) == pytest.approx(_imd_loop(fs, ft, ms, mt.astype(bool), 6), rel=1e-9)
    # mask None = the whole image
    full = np.ones((2, 2), dtype=bool)
    assert float(instance_matching_distance(fs, ft, resolution=5)) == pytest.approx(
        _imd_loop(fs, ft, full, full, 5), rel=1e-9)
    # the default 64 x 64 grid runs; identical inputs give 0
    assert float(instance_matching_distance(fs, fs)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match='at least one pixel'):
        instance_matching_distance(fs, ft, np.zeros((4, 4), bool), mt)


def test_imd_ignores_target_features_outside_the_mask():
    gen = torch.Generator().manual_seed(8)
    fs = torch.randn(4, 2, 2, generator=gen, dtype=DT)
    ft = torch.randn(4, 2, 2, generator=gen, dtype=DT)
    ft[:, 1, 1] = fs[:, 0, 0]  # an exact match, but outside the target mask
    ms = np.array([[1, 0], [0, 0]], bool)
    mt = np.array([[1, 1], [1, 0]], bool)
    d_in = instance_matching_distance(fs, ft, ms, np.ones((2, 2), bool), resolution=2)
    d_out = instance_matching_distance(fs, ft, ms, mt, resolution=2)
    assert float(d_in) == pytest.approx(0.0, abs=1e-7) and float(d_out) > 0.1


def test_mutual_nn_distance_equals_loop():
    gen = torch.Generator().manual_seed(9)
    fs = torch.randn(5, 3, 3, generator=gen, dtype=DT)
    ft = torch.randn(5, 2, 4, generator=gen, dtype=DT)
    s = [fs[:, i // 3, i % 3] / (fs[:, i // 3, i % 3].norm() + 1e-10) for i in range(9)]
    t = [ft[:, j // 4, j % 4] / (ft[:, j // 4, j % 4].norm() + 1e-10) for j in range(8)]
    d = [[math.dist(a.tolist(), b.tolist()) for b in t] for a in s]
    nn12 = [min(range(8), key=lambda j: d[i][j]) for i in range(9)]
    nn21 = [min(range(9), key=lambda i: d[i][j]) for j in range(8)]
    keep = [d[i][nn12[i]] for i in range(9) if nn21[nn12[i]] == i]
    assert 0 < len(keep) < 9
    assert float(mutual_nn_distance(fs, ft)) == pytest.approx(sum(keep) / len(keep), rel=1e-9)


def _toy_features(content: torch.Tensor, pose: float, n_ids: int, noise: float = 0.0,
                  seed: int = 0) -> torch.Tensor:
    """Geometry-aware toy descriptors: one-hot part id + a pose channel that flips sign when the
    object faces the other way (like real SD/DINO features, unlike a mirrored feature map)."""
    emb = torch.eye(n_ids, dtype=DT)[content]                          # (h, w, n)
    pose_ch = torch.full((*content.shape, 1), 0.7 * pose, dtype=DT)
    f = torch.cat((emb, pose_ch), dim=-1).permute(2, 0, 1).contiguous()
    if noise:
        f = f + noise * torch.randn(f.shape, generator=torch.Generator().manual_seed(seed),
                                    dtype=DT)
    return f


def _toy_scene():
    ids = torch.arange(36).reshape(6, 6)
    src = _toy_features(ids, +1.0, 36)                 # object facing right
    src_flip = _toy_features(ids.flip(-1), -1.0, 36)   # the extractor run on the flipped image
    tgt_mirror = _toy_features(ids.flip(-1), -1.0, 36, noise=0.01, seed=1)
    tgt_same = _toy_features(ids, +1.0, 36, noise=0.01, seed=2)
    return src, src_flip, tgt_mirror, tgt_same


@pytest.mark.parametrize('metric', ['imd', 'mutual_nn'])
def test_choose_flip_decision(metric):
    src, src_flip, tgt_mirror, tgt_same = _toy_scene()
    mask = np.zeros((48, 48), bool)
    mask[8:40, 0:30] = True                            # object on the left of the source
    kw = dict(metric=metric, resolution=16)
    dec = choose_flip(src, src_flip, tgt_mirror, mask_src=mask, mask_tgt=mask[:, ::-1], **kw)
    assert dec.decision == 'flipped' and dec.flipped
    assert dec.dist_flipped < dec.dist_original
    dec = choose_flip(src, src_flip, tgt_same, mask_src=mask, mask_tgt=mask, **kw)
    assert dec.decision == 'original' and not dec.flipped
    assert dec.dist_original < dec.dist_flipped
    # distances are the ones of the single-distance functions (flipped mask derived)
    if metric == 'imd':
        d1 = instance_matching_distance(src_flip, tgt_same, mask[:, ::-1].copy(), mask,
                                        resolution=16)
        assert dec.dist_flipped == pytest.approx(float(d1))
    else:
        assert dec.dist_flipped == pytest.approx(float(mutual_nn_distance(src_flip, tgt_same)))
    with pytest.raises(ValueError, match='metric'):
        choose_flip(src, src_flip, tgt_same, metric='l1')


def test_flip_permutation_and_points():
    assert flip_permutation([1, 2, [0, 3]]) == [3, 1, 2, 0]
    assert flip_permutation([1, 2, [0, 3]], visible=[True, True, True, False]) == [0, 1, 2, 3]
    assert flip_permutation([[0, 1], [2, 3, 4, 5]], num_points=7) == [1, 0, 3, 4, 5, 2, 6]
    with pytest.raises(ValueError, match='distinct'):
        flip_permutation([[0, 1], [1, 2]])
    pts = torch.tensor([[10.0, 1.0], [20.0, 2.0], [30.0, 3.0], [0.0, 4.0]], dtype=DT)
    perm = [1, 0, 2, 3]
    f = flip_points(pts, 64, perm)
    assert f.tolist() == [[43.0, 2.0], [53.0, 1.0], [33.0, 3.0], [63.0, 4.0]]  # W - 1 - x
    assert flip_points(pts, 64, pixel_centres=False)[:, 0].tolist() == [54.0, 44.0, 34.0, 64.0]
    # extra columns (visibility) ride along, numpy works too
    arr = np.array([[5.0, 6.0, 1.0], [7.0, 8.0, 0.0]])
    assert flip_points(arr, 10, [1, 0]).tolist() == [[2.0, 8.0, 0.0], [4.0, 6.0, 1.0]]
    assert arr[0, 0] == 5.0  # input untouched
    # unflip inverts flip, also for a 4-cycle (whose inverse is not itself)
    cyc = flip_permutation([[0, 1, 2, 3]])
    assert cyc == [1, 2, 3, 0]
    torch.testing.assert_close(unflip_points(flip_points(pts, 64, cyc), 64, cyc), pts)
    assert not torch.allclose(flip_points(flip_points(pts, 64, cyc), 64, cyc), pts)
    # predictions made in the flipped image (x' = W - 1 - x) map back
    assert unflip_points(torch.tensor([[43.0, 2.0]], dtype=DT), 64).tolist() == [[20.0, 2.0]]


def test_flip_visibility_and_merge():
    vs = torch.tensor([True, True, True, False])
    vt = torch.tensor([True, True, False, True])
    perm = [1, 0, 3, 2]
    assert flip_visibility(vs, vt, perm).tolist() == [True, True, False, False]
    pred = torch.zeros(4, 2)
    pflip = torch.ones(4, 2)
    merged = merge_flip_predictions(pred, pflip, True, flip_visibility(vs, vt, perm))
    assert merged[:, 0].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert merge_flip_predictions(pred, pflip, False).sum() == 0


def test_transfer_keypoints_flip_aware_uses_the_permutation():
    src, src_flip, tgt_mirror, tgt_same = _toy_scene()
    # 48 px wide, stride 8: left eye (patch x=1), right eye (x=3), nose (x=2), pair (0, 1)
    pts = torch.tensor([[12.0, 20.0], [28.0, 20.0], [20.0, 36.0]], dtype=DT)
    groups = [[0, 1], 2]
    kw = dict(stride=8, image_width=48, permutation_groups=groups, soft=False, resolution=16)
    plain = transfer_keypoints(pts, src, tgt_mirror, stride_src=8, soft=False).points
    # the original source matches the mirrored part: the left eye lands on the target's mirrored
    # left eye, patch x = 5 - 1 = 4, which is the target's RIGHT eye
    assert plain.tolist() == [[36.0, 20.0], [20.0, 20.0], [28.0, 36.0]]
    pred, dec = transfer_keypoints_flip_aware(pts, src, src_flip, tgt_mirror, **kw)
    assert dec.decision == 'flipped'
    # flipped source: its left eye is mirror(right eye) = 47 - 28 = 19 -> patch 2 -> 2 * 8 + 4
    assert pred.tolist() == [[20.0, 20.0], [36.0, 20.0], [28.0, 36.0]]
    # the right eye invisible in the target: the pair stays unpermuted and is not replaced
    pred, _ = transfer_keypoints_flip_aware(pts, src, src_flip, tgt_mirror,
                                            visible_tgt=[True, False, True], **kw)
    assert pred.tolist() == plain.tolist()
    # same pose: the original predictions are kept
    pred, dec = transfer_keypoints_flip_aware(pts, src, src_flip, tgt_same, **kw)
    assert dec.decision == 'original'
    assert pred.tolist() == transfer_keypoints(pts, src, tgt_same, stride_src=8,
                                               soft=False).points.tolist()
    # window soft-argmax path: the same within a small fraction of a pixel
    soft, _ = transfer_keypoints_flip_aware(pts, src, src_flip, tgt_mirror, stride=8,
                                            image_width=48, permutation_groups=groups,
                                            window=2, metric='mutual_nn')
    torch.testing.assert_close(soft, torch.tensor([[20.0, 20.0], [36.0, 20.0], [28.0, 36.0]],
                                                  dtype=DT), rtol=0, atol=0.05)


def test_module_exports():
    for name in corr_ops.__all__:
        assert hasattr(corr_ops, name), name
