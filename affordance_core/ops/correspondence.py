"""Dense correspondence ops of GeoAware-SC (``methods.md`` §8.4), reusable and parameter-free.

Reference: ``Junyi42/GeoAware-SC`` (``utils/utils_correspondence.py``: ``get_flow``,
``soft_argmax``, ``apply_gaussian_kernel``, ``calculate_keypoint_transformation``,
``get_distance``, ``get_distance_mutual_nn``; ``utils/utils_geoware.py``: ``permute_indices``,
``flip_keypoints``, ``optimized_kps_1_to_2``). Only the matching ops are implemented here; the
SD + DINOv2 feature extractor and the AggregationNetwork are not (``docs/methods/geoaware.md``).

Conventions: a correlation ``corr`` has shape (..., h, w), the last two axes indexing the
*target* patch grid, every leading entry being one source patch (or one grasp peak). Coordinates
are ``(x, y)`` = (column, row) in target patch units, as in GeoAware's flow. Pixels follow
GeoAware: ``pixel = patch * stride + stride // 2`` and ``patch = floor(pixel / stride)``.

Faithful points:
    * :func:`window_soft_argmax` with the default options is ``get_flow`` exactly: argmax target
      patch, (2w+1)^2 window with indices clamped to the grid (so it is truncated at borders),
      correlation MULTIPLIED by the 0/1 window mask (entries outside become 0, not -inf), then
      ``softmax((x - max over ALL targets) / beta)``, expected x and y, clamped to the grid.
      ``window = 0`` is the plain soft-argmax, ``window < 0`` the Gaussian-kernel variant
      (``apply_gaussian_kernel``: the correlation is multiplied by
      ``exp(-d^2 / (2 sigma^2))`` around the argmax, sigma = -w).
    * Instance Matching Distance: bilinear upsampling of the descriptors to 64 x 64, nearest
      upsampling of the masks, mean over source-mask pixels of the L2 distance to the nearest
      target-mask descriptor; the mask-free mutual-NN variant; flip decision
      ``IMD(flipped) < IMD(original)``; replacement of the predictions of keypoints that stay
      mutually visible after the flip, through the left/right permutation.

Differences (all documented in ``docs/methods/geoaware.md``):
    * Non-square and unequal source/target grids are supported (the reference assumes 60 x 60 for
      both); the expected coordinate is computed on the target index grid directly (the
      reference uses ``linspace(-1, 1, n)`` then maps back to [0, n-1], the same number).
    * Two opt-in options used by the grasp-point peak locator (defaults off = GeoAware):
      ``normalize_peak`` (divide the masked correlation by the peak value, so ``beta`` is relative
      to the peak) and ``mask_higher`` (cells higher than the given peak are masked as well);
      ``peak`` lets the window be centred on a given cell instead of the argmax.
    * IMD excludes pixels outside the target mask explicitly; the reference sets masked features
      to -1e5, which also hits any feature component that is exactly 0 inside the mask.
    * :func:`flip_points` mirrors with ``x -> W - 1 - x`` (pixel centres at integers, the
      project's convention); ``pixel_centres=False`` gives the reference's ``x -> W - x``.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = ['window_soft_argmax', 'window_soft_argmax_weights', 'soft_argmax', 'argmax_coords',
           'patch_to_pixel', 'pixel_to_patch', 'cosine_correlation', 'mutual_nearest_neighbours',
           'DenseCorrespondence', 'dense_correspondence', 'KeypointTransfer',
           'transfer_keypoints', 'instance_matching_distance', 'mutual_nn_distance',
           'FlipDecision', 'choose_flip', 'flip_permutation', 'flip_points', 'unflip_points',
           'flip_visibility', 'merge_flip_predictions', 'transfer_keypoints_flip_aware']

ArrayT = TypeVar('ArrayT', Tensor, np.ndarray)

DEFAULT_WINDOW = 7        # SOFT_EVAL_WINDOW (15 x 15 patches on the 60 x 60 grid)
DEFAULT_BETA = 0.02       # soft-argmax temperature
IMD_RESOLUTION = 64       # get_distance upsamples descriptors and masks to 64 x 64
_EPS_NORM = 1e-10         # normalize_feats: f / (||f|| + 1e-10)
_TIE_TOL = 1e-6           # mask_higher: cells within 1e-6 * |peak| of the peak count as ties


# ----------------------------------------------------------------------------------------------
# soft-argmax family
# ----------------------------------------------------------------------------------------------
def _to_tensor(x: Tensor | np.ndarray, name: str) -> tuple[Tensor, bool]:
    """Tensor view of ``x`` (numpy arrays share memory when writable) and whether it was numpy."""
    if isinstance(x, Tensor):
        return x, False
    if isinstance(x, np.ndarray):
        arr = x if x.flags.writeable and x.flags.c_contiguous else np.array(x, order='C')
        return torch.from_numpy(arr), True
    raise ValueError(f'{name} must be a torch.Tensor or a numpy array, got {type(x).__name__}')


def _as_tensor(x, device: torch.device | None = None) -> Tensor:
    """``torch.as_tensor`` that also accepts numpy views with negative strides (copied)."""
    if isinstance(x, np.ndarray) and not x.flags.c_contiguous:
        x = np.ascontiguousarray(x)
    return torch.as_tensor(x, device=device)


def _check_corr(corr: Tensor) -> None:
    if corr.ndim < 2 or corr.shape[-1] == 0 or corr.shape[-2] == 0:
        raise ValueError(f'corr must have shape (..., h, w) with h, w >= 1, got '
                         f'{tuple(corr.shape)}')
    if not corr.is_floating_point():
        raise ValueError(f'corr must be a float tensor/array, got dtype {corr.dtype}')


def _peak_index(corr: Tensor, peak: Tensor | np.ndarray | int | None) -> Tensor:
    """Flat target index (N,) of the window centre of every row of corr (N, h*w)."""
    n, hw = corr.shape
    if peak is None:
        return corr.argmax(dim=-1)
    idx = _as_tensor(peak if isinstance(peak, (Tensor, np.ndarray)) else np.asarray(peak),
                     corr.device)
    if idx.is_floating_point() or idx.dtype == torch.bool:
        raise ValueError(f'peak must hold integer flat indices, got dtype {idx.dtype}')
    idx = idx.to(torch.long).reshape(-1)
    if idx.numel() == 1 and n != 1:
        idx = idx.expand(n)
    if idx.numel() != n:
        raise ValueError(f'peak must have one flat index per correlation row ({n}), got '
                         f'{idx.numel()}')
    if bool(((idx < 0) | (idx >= hw)).any()):
        raise ValueError(f'peak indices must lie in [0, {hw}), got min {int(idx.min())} max '
                         f'{int(idx.max())}')
    return idx


def window_soft_argmax_weights(corr: Tensor | np.ndarray, window: int = DEFAULT_WINDOW,
                               beta: float = DEFAULT_BETA, *,
                               peak: Tensor | np.ndarray | int | None = None,
                               normalize_peak: bool = False,
                               mask_higher: bool = False) -> Tensor:
    """Soft-argmax probabilities of GeoAware's window soft-argmax (``get_flow``), per row.

    For every row (one source patch), with (y*, x*) the argmax target patch (or ``peak``):

    * ``window > 0``: ``m`` = 0/1 mask of the (2w+1) x (2w+1) window around (y*, x*), indices
      clamped to the grid (the window is truncated at the borders, not shifted);
    * ``window < 0``: ``m = exp(-((x - x*)^2 + (y - y*)^2) / (2 sigma^2))``, sigma = -w;
    * ``window = 0``: ``m = 1`` (plain soft-argmax over all targets);

    then ``x = m * corr`` (multiplied: cells outside the window become 0, not -inf) and
    ``p = exp((x - max_all(x)) / beta) / sum(...)`` over ALL h*w targets.

    Options (off by default; GeoAware has neither), used by the grasp-point locator:

    * ``mask_higher``: cells with ``corr > peak + 1e-6 |peak|`` get ``m = 0`` too (they belong to
      a higher neighbouring peak; never happens for the argmax);
    * ``normalize_peak``: ``x`` is divided by the peak value when it is > 0, so ``beta`` is
      relative to the peak and the result depends on the blob's shape, not its height.

    Args:
        corr: (..., h, w) float correlation (target grid last), Tensor or numpy array.
        window: half-size w (int); see above.
        beta: softmax temperature, > 0.
        peak: optional (...,) integer flat target indices ``row * w + col`` of the window centre
            (a scalar applies to every row); default the argmax of each row.
        normalize_peak: divide by the peak value (see above).
        mask_higher: mask cells higher than the peak (see above).

    Returns:
        (..., h, w) probabilities (a Tensor, float dtype of ``corr``), each row summing to 1.
    """
    c, _ = _to_tensor(corr, 'corr')
    _check_corr(c)
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)):
        raise ValueError(f'window must be an int, got {window!r}')
    if not beta > 0:
        raise ValueError(f'beta must be > 0, got {beta}')
    lead, (h, w) = c.shape[:-2], c.shape[-2:]
    flat = c.reshape(-1, h * w)
    need_peak = window != 0 or mask_higher or normalize_peak or peak is not None
    weight: Tensor | None = None
    if need_peak:
        idx = _peak_index(flat, peak)
        py = torch.div(idx, w, rounding_mode='floor').to(c.dtype)[:, None, None]
        px = (idx % w).to(c.dtype)[:, None, None]
        ys = torch.arange(h, device=c.device, dtype=c.dtype)[None, :, None]
        xs = torch.arange(w, device=c.device, dtype=c.dtype)[None, None, :]
        if window > 0:
            weight = (((ys - py).abs() <= window) & ((xs - px).abs() <= window)).to(c.dtype)
        elif window < 0:
            sigma = float(-window)
            weight = torch.exp(-((xs - px) ** 2 + (ys - py) ** 2) / (2.0 * sigma ** 2))
        if weight is not None:
            weight = weight.reshape(-1, h * w)
        peak_val = flat.gather(1, idx[:, None])  # (N, 1)
        if mask_higher:
            keep = (flat <= peak_val + _TIE_TOL * peak_val.abs()).to(c.dtype)
            weight = keep if weight is None else weight * keep
    x = flat if weight is None else flat * weight
    if normalize_peak:
        x = x / torch.where(peak_val > 0, peak_val, torch.ones_like(peak_val))
    logits = (x - x.amax(dim=-1, keepdim=True)) / beta
    prob = logits.exp()
    prob = prob / prob.sum(dim=-1, keepdim=True)
    return prob.reshape(*lead, h, w)


def window_soft_argmax(corr: ArrayT, window: int = DEFAULT_WINDOW, beta: float = DEFAULT_BETA,
                       *, peak: Tensor | np.ndarray | int | None = None,
                       normalize_peak: bool = False, mask_higher: bool = False,
                       clamp: bool = True) -> ArrayT:
    """Sub-patch target coordinates by GeoAware's window soft-argmax, batched over rows.

    The expectation of the column and row indices under :func:`window_soft_argmax_weights`,
    clamped to [0, w-1] x [0, h-1] (``calculate_keypoint_transformation``). Differentiable in
    ``corr`` (the window itself is not).

    Args:
        corr: (..., h, w) float correlation of every source patch with the target grid; a Tensor
            or a numpy array (the result then is a numpy array too).
        window: half-size w: > 0 window, 0 plain soft-argmax, < 0 Gaussian kernel (sigma = -w).
        beta: softmax temperature (GeoAware: 0.02).
        peak: optional (...,) flat window-centre indices (default: argmax of each row).
        normalize_peak: grasp option, see :func:`window_soft_argmax_weights`.
        mask_higher: grasp option, see :func:`window_soft_argmax_weights`.
        clamp: clamp to the grid (GeoAware does).

    Returns:
        (..., 2) (x, y) coordinates in target patch units, same type and dtype as ``corr``.
    """
    c, was_numpy = _to_tensor(corr, 'corr')
    prob = window_soft_argmax_weights(c, window, beta, peak=peak, normalize_peak=normalize_peak,
                                      mask_higher=mask_higher)
    h, w = prob.shape[-2:]
    xs = torch.arange(w, device=prob.device, dtype=prob.dtype)
    ys = torch.arange(h, device=prob.device, dtype=prob.dtype)
    ex = (prob.sum(dim=-2) * xs).sum(dim=-1)
    ey = (prob.sum(dim=-1) * ys).sum(dim=-1)
    if clamp:
        ex, ey = ex.clamp(0, w - 1), ey.clamp(0, h - 1)
    out = torch.stack((ex, ey), dim=-1)
    return out.numpy() if was_numpy else out


def soft_argmax(corr: ArrayT, beta: float = DEFAULT_BETA) -> ArrayT:
    """Plain soft-argmax over all targets (GeoAware ``soft_argmax``; ``window = 0``).

    Args:
        corr: (..., h, w) float correlation.
        beta: temperature.

    Returns:
        (..., 2) (x, y) expected target coordinates, same type as ``corr``.
    """
    return window_soft_argmax(corr, window=0, beta=beta)


def argmax_coords(corr: ArrayT) -> ArrayT:
    """Nearest neighbour (``SOFT_EVAL`` off): (x, y) of the argmax target of every row.

    Args:
        corr: (..., h, w) float correlation.

    Returns:
        (..., 2) integer-valued (x, y), float dtype of ``corr``, same type as ``corr``.
    """
    c, was_numpy = _to_tensor(corr, 'corr')
    _check_corr(c)
    w = c.shape[-1]
    idx = c.flatten(-2).argmax(dim=-1)
    out = torch.stack((idx % w, torch.div(idx, w, rounding_mode='floor')), dim=-1).to(c.dtype)
    return out.numpy() if was_numpy else out


def patch_to_pixel(coords: ArrayT, stride: float) -> ArrayT:
    """Patch -> pixel, GeoAware's ``x = patch * stride + stride // 2`` (on both axes).

    Args:
        coords: (..., 2) patch coordinates (any real values).
        stride: pixels per patch (e.g. 14 = 840 / 60, or 16).

    Returns:
        (..., 2) pixel coordinates, same type as ``coords``.
    """
    if not stride > 0:
        raise ValueError(f'stride must be > 0, got {stride}')
    return coords * stride + stride // 2


def pixel_to_patch(points: Tensor | np.ndarray, stride: float,
                   grid_shape: tuple[int, int]) -> Tensor:
    """Pixel -> integer patch (``kpts_to_patch_idx``): ``floor(p / stride)``, clamped to the grid.

    Args:
        points: (..., 2) pixel (x, y).
        stride: pixels per patch.
        grid_shape: (h, w) of the patch grid.

    Returns:
        (..., 2) int64 (x, y) patch indices.
    """
    if not stride > 0:
        raise ValueError(f'stride must be > 0, got {stride}')
    p = _as_tensor(points)
    if p.shape[-1:] != (2,):
        raise ValueError(f'points must have shape (..., 2), got {tuple(p.shape)}')
    h, w = grid_shape
    q = torch.floor(p.to(torch.float64) / stride).to(torch.long)
    return torch.stack((q[..., 0].clamp(0, w - 1), q[..., 1].clamp(0, h - 1)), dim=-1)


# ----------------------------------------------------------------------------------------------
# dense and keypoint correspondence
# ----------------------------------------------------------------------------------------------
def _check_feat(f: Tensor, name: str, batched_ok: bool = False) -> None:
    if not isinstance(f, Tensor):
        raise ValueError(f'{name} must be a torch.Tensor, got {type(f).__name__}')
    ok = f.ndim == 3 or (batched_ok and f.ndim == 4)
    if not ok or not f.is_floating_point():
        want = '(C, h, w) or (B, C, h, w)' if batched_ok else '(C, h, w)'
        raise ValueError(f'{name} must be a float tensor of shape {want}, got '
                         f'{tuple(f.shape)} {f.dtype}')


def _normalize(f: Tensor, dim: int) -> Tensor:
    """GeoAware ``normalize_feats``: f / (||f|| + 1e-10)."""
    return f / (f.norm(dim=dim, keepdim=True) + _EPS_NORM)


def cosine_correlation(feat_src: Tensor, feat_tgt: Tensor) -> Tensor:
    """Cosine similarity of every source patch with every target patch.

    Args:
        feat_src: (C, h, w) or (B, C, h, w) source descriptors.
        feat_tgt: (C, h', w') or (B, C, h', w') target descriptors (same C, same batching).

    Returns:
        (h*w, h'*w') or (B, h*w, h'*w') correlation, rows in raster order of the source.
    """
    _check_feat(feat_src, 'feat_src', batched_ok=True)
    _check_feat(feat_tgt, 'feat_tgt', batched_ok=True)
    if feat_src.ndim != feat_tgt.ndim or feat_src.shape[-3] != feat_tgt.shape[-3]:
        raise ValueError(f'feat_src {tuple(feat_src.shape)} and feat_tgt '
                         f'{tuple(feat_tgt.shape)} must have the same layout and channels')
    s = _normalize(feat_src.flatten(-2), dim=-2)  # (..., C, hw)
    t = _normalize(feat_tgt.flatten(-2), dim=-2)
    return s.transpose(-1, -2) @ t


def mutual_nearest_neighbours(corr: Tensor) -> Tensor:
    """Mutual nearest-neighbour check on a similarity matrix.

    Args:
        corr: (..., Ns, Nt) similarity (higher = closer).

    Returns:
        (..., Ns) bool: source s is kept when ``argmax_s' corr[:, t] == s`` for its
        ``t = argmax_t corr[s]`` (ties: the first index, as torch's argmax).
    """
    if corr.ndim < 2:
        raise ValueError(f'corr must have shape (..., Ns, Nt), got {tuple(corr.shape)}')
    nn_st = corr.argmax(dim=-1)            # (..., Ns)
    nn_ts = corr.argmax(dim=-2)            # (..., Nt)
    back = torch.gather(nn_ts, -1, nn_st)  # (..., Ns)
    return back == torch.arange(corr.shape[-2], device=corr.device)


def _match_rows(rows: Tensor, grid: tuple[int, int], soft: bool, window: int,
                beta: float) -> Tensor:
    """(N, h'*w') correlation rows -> (N, 2) target (x, y) patch coordinates."""
    r = rows.reshape(-1, *grid)
    return window_soft_argmax(r, window, beta) if soft else argmax_coords(r)


@dataclass
class DenseCorrespondence:
    """Result of :func:`dense_correspondence` for a (h, w) source and (h', w') target grid.

    Attributes:
        coords: (h, w, 2) target (x, y) patch coordinates of every source patch.
        flow: (h, w, 2) ``coords`` minus the source (x, y) patch grid.
        score: (h, w) cosine similarity of the nearest neighbour.
        mutual: (h, w) bool mutual-NN flags, or None when not requested.
        corr: (h*w, h'*w') cosine correlation.
    """

    coords: Tensor
    flow: Tensor
    score: Tensor
    mutual: Tensor | None
    corr: Tensor


def dense_correspondence(feat_src: Tensor, feat_tgt: Tensor, *, soft: bool = True,
                         window: int = DEFAULT_WINDOW, beta: float = DEFAULT_BETA,
                         mutual_check: bool = False) -> DenseCorrespondence:
    """Dense source -> target correspondence of two descriptor maps (GeoAware ``get_flow``).

    Args:
        feat_src: (C, h, w) source descriptors (L2-normalised here).
        feat_tgt: (C, h', w') target descriptors.
        soft: ``SOFT_EVAL``: window soft-argmax (True) or nearest neighbour (False).
        window: ``SOFT_EVAL_WINDOW`` (> 0 window, 0 plain soft-argmax, < 0 Gaussian).
        beta: soft-argmax temperature.
        mutual_check: also return the mutual nearest-neighbour flags.

    Returns:
        :class:`DenseCorrespondence`.
    """
    _check_feat(feat_src, 'feat_src')
    _check_feat(feat_tgt, 'feat_tgt')
    corr = cosine_correlation(feat_src, feat_tgt)
    h, w = feat_src.shape[-2:]
    grid_t = tuple(feat_tgt.shape[-2:])
    coords = _match_rows(corr, grid_t, soft, window, beta).reshape(h, w, 2)
    ys, xs = torch.meshgrid(torch.arange(h, device=corr.device, dtype=coords.dtype),
                            torch.arange(w, device=corr.device, dtype=coords.dtype),
                            indexing='ij')
    flow = coords - torch.stack((xs, ys), dim=-1)
    score = corr.amax(dim=-1).reshape(h, w)
    mutual = mutual_nearest_neighbours(corr).reshape(h, w) if mutual_check else None
    return DenseCorrespondence(coords=coords, flow=flow, score=score, mutual=mutual, corr=corr)


@dataclass
class KeypointTransfer:
    """Result of :func:`transfer_keypoints` for K source keypoints.

    Attributes:
        points: (K, 2) predicted target pixels (x, y), ``patch * stride + stride // 2``.
        coords: (K, 2) predicted target (x, y) patch coordinates (sub-patch when soft).
        src_patches: (K, 2) int64 source (x, y) patches of the keypoints.
        score: (K,) cosine similarity of the nearest neighbour.
        mutual: (K,) bool mutual-NN flags of the source patches, or None.
    """

    points: Tensor
    coords: Tensor
    src_patches: Tensor
    score: Tensor
    mutual: Tensor | None


def transfer_keypoints(points_src_px: Tensor | np.ndarray, feat_src: Tensor, feat_tgt: Tensor,
                       *, stride_src: float, stride_tgt: float | None = None, soft: bool = True,
                       window: int = DEFAULT_WINDOW, beta: float = DEFAULT_BETA,
                       mutual_check: bool = False) -> KeypointTransfer:
    """Transfer source keypoints to the target (``calculate_keypoint_transformation``).

    Keypoint pixel -> source patch ``floor(p / stride_src)``; that patch's row of the cosine
    matrix -> target patch by NN or window soft-argmax -> pixel ``patch * stride + stride // 2``.

    Args:
        points_src_px: (K, 2) source pixel (x, y).
        feat_src: (C, h, w) source descriptors.
        feat_tgt: (C, h', w') target descriptors.
        stride_src: source pixels per patch.
        stride_tgt: target pixels per patch (default ``stride_src``).
        soft: window soft-argmax (True) or nearest neighbour (False).
        window: soft-argmax window half-size (> 0 window, 0 plain, < 0 Gaussian).
        beta: soft-argmax temperature.
        mutual_check: also return mutual-NN flags (needs the full correlation).

    Returns:
        :class:`KeypointTransfer`.
    """
    _check_feat(feat_src, 'feat_src')
    _check_feat(feat_tgt, 'feat_tgt')
    pts = _as_tensor(points_src_px, feat_src.device)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f'points_src_px must have shape (K, 2), got {tuple(pts.shape)}')
    stride_tgt = stride_src if stride_tgt is None else stride_tgt
    h, w = feat_src.shape[-2:]
    src_patch = pixel_to_patch(pts, stride_src, (h, w))
    flat = src_patch[:, 1] * w + src_patch[:, 0]
    if mutual_check:
        corr = cosine_correlation(feat_src, feat_tgt)
        rows = corr[flat]
        mutual = mutual_nearest_neighbours(corr)[flat]
    else:
        s = _normalize(feat_src.flatten(1)[:, flat], dim=0)  # (C, K)
        t = _normalize(feat_tgt.flatten(1), dim=0)            # (C, h'w')
        rows, mutual = s.transpose(0, 1) @ t, None
    coords = _match_rows(rows, tuple(feat_tgt.shape[-2:]), soft, window, beta)
    return KeypointTransfer(points=patch_to_pixel(coords, stride_tgt), coords=coords,
                            src_patches=src_patch, score=rows.amax(dim=-1), mutual=mutual)


# ----------------------------------------------------------------------------------------------
# flip-based pose alignment
# ----------------------------------------------------------------------------------------------
def _prep_mask(mask: Tensor | np.ndarray | None, resolution: int, name: str,
               device: torch.device) -> Tensor:
    """Binary (H, W) mask -> (R, R) bool by nearest interpolation (None = all ones)."""
    if mask is None:
        return torch.ones(resolution, resolution, dtype=torch.bool, device=device)
    m = _as_tensor(mask, device)
    if m.ndim != 2 or m.numel() == 0:
        raise ValueError(f'{name} must be a non-empty (H, W) mask, got {tuple(m.shape)}')
    m = (m > 0.5).to(torch.float32) if m.dtype != torch.bool else m.to(torch.float32)
    up = F.interpolate(m[None, None], size=(resolution, resolution), mode='nearest')[0, 0]
    return up > 0.5


def _upsample(feat: Tensor, resolution: int, normalize: bool) -> Tensor:
    """(C, h, w) -> (R*R, C) bilinear (align_corners=False) descriptors, optionally normalised
    per patch BEFORE the upsampling (GeoAware's descriptors are normalised, the upsampled ones
    are not renormalised)."""
    f = _normalize(feat, dim=0) if normalize else feat
    up = F.interpolate(f[None], size=(resolution, resolution), mode='bilinear',
                       align_corners=False)[0]
    return up.flatten(1).transpose(0, 1)


def instance_matching_distance(feat_src: Tensor, feat_tgt: Tensor,
                               mask_src: Tensor | np.ndarray | None = None,
                               mask_tgt: Tensor | np.ndarray | None = None, *,
                               resolution: int = IMD_RESOLUTION,
                               normalize: bool = True) -> Tensor:
    """Instance Matching Distance (GeoAware ``get_distance``).

    Both descriptor maps are upsampled to ``resolution``^2 (bilinear, align_corners=False), the
    masks with ``nearest``; for every source-mask pixel the L2 distance to the nearest target-mask
    descriptor is taken; IMD is the mean over the source-mask pixels.

    Args:
        feat_src: (C, h, w) source descriptors.
        feat_tgt: (C, h', w') target descriptors.
        mask_src: (H, W) binary instance mask of the source (bool or 0/1; > 0.5 is foreground),
            any resolution; None = the whole image.
        mask_tgt: (H', W') binary mask of the target; None = the whole image.
        resolution: side of the common grid (GeoAware: 64).
        normalize: L2-normalise the descriptors per patch first (GeoAware's are).

    Returns:
        scalar tensor.

    Raises:
        ValueError: for bad shapes or an empty (resized) mask.
    """
    _check_feat(feat_src, 'feat_src')
    _check_feat(feat_tgt, 'feat_tgt')
    if feat_src.shape[0] != feat_tgt.shape[0]:
        raise ValueError(f'channel mismatch: {feat_src.shape[0]} vs {feat_tgt.shape[0]}')
    if resolution < 1:
        raise ValueError(f'resolution must be >= 1, got {resolution}')
    dev = feat_src.device
    ms = _prep_mask(mask_src, resolution, 'mask_src', dev).reshape(-1)
    mt = _prep_mask(mask_tgt, resolution, 'mask_tgt', dev).reshape(-1)
    if not bool(ms.any()) or not bool(mt.any()):
        raise ValueError('mask_src and mask_tgt must keep at least one pixel at '
                         f'{resolution}x{resolution}')
    src = _upsample(feat_src, resolution, normalize)[ms]
    tgt = _upsample(feat_tgt, resolution, normalize)[mt]
    return torch.cdist(src, tgt).amin(dim=1).mean()


def mutual_nn_distance(feat_src: Tensor, feat_tgt: Tensor, *, normalize: bool = True) -> Tensor:
    """Mask-free pose distance (GeoAware ``get_distance_mutual_nn``, ``MUTUAL_NN``).

    Mean, over the source patches whose L2 nearest neighbour in the target is mutual, of that
    nearest-neighbour distance (patch grids, no upsampling).

    Args:
        feat_src: (C, h, w) source descriptors.
        feat_tgt: (C, h', w') target descriptors.
        normalize: L2-normalise the descriptors per patch first.

    Returns:
        scalar tensor.
    """
    _check_feat(feat_src, 'feat_src')
    _check_feat(feat_tgt, 'feat_tgt')
    s, t = feat_src.flatten(1).transpose(0, 1), feat_tgt.flatten(1).transpose(0, 1)
    if normalize:
        s, t = _normalize(s, dim=1), _normalize(t, dim=1)
    d = torch.cdist(s, t)
    mutual = mutual_nearest_neighbours(-d)
    return d.amin(dim=1)[mutual].mean()


@dataclass(frozen=True)
class FlipDecision:
    """Result of :func:`choose_flip`.

    Attributes:
        flipped: True when the flipped source matches the target better.
        decision: ``'flipped'`` or ``'original'``.
        dist_original: distance of the original source to the target.
        dist_flipped: distance of the horizontally flipped source to the target.
    """

    flipped: bool
    decision: str
    dist_original: float
    dist_flipped: float


def choose_flip(feat_src: Tensor, feat_src_flipped: Tensor, feat_tgt: Tensor, *,
                mask_src: Tensor | np.ndarray | None = None,
                mask_src_flipped: Tensor | np.ndarray | None = None,
                mask_tgt: Tensor | np.ndarray | None = None, metric: str = 'imd',
                resolution: int = IMD_RESOLUTION, normalize: bool = True) -> FlipDecision:
    """Adaptive pose alignment (``ADAPT_FLIP``): use the flipped source when it is closer.

    Args:
        feat_src: (C, h, w) descriptors of the source image.
        feat_src_flipped: (C, h, w) descriptors of the horizontally flipped source image (computed
            by the extractor on the flipped image, NOT the flipped map of ``feat_src``).
        feat_tgt: (C, h', w') target descriptors.
        mask_src: optional source instance mask (H, W) (``imd`` only).
        mask_src_flipped: mask of the flipped source; default ``mask_src`` flipped left-right.
        mask_tgt: optional target instance mask.
        metric: ``'imd'`` (:func:`instance_matching_distance`) or ``'mutual_nn'``
            (:func:`mutual_nn_distance`, masks ignored).
        resolution: IMD grid side.
        normalize: L2-normalise the descriptors first.

    Returns:
        :class:`FlipDecision`; flipped iff ``dist_flipped < dist_original`` (ties: original).
    """
    if metric == 'imd':
        if mask_src_flipped is None and mask_src is not None:
            mask_src_flipped = _as_tensor(mask_src).flip(-1)
        d0 = instance_matching_distance(feat_src, feat_tgt, mask_src, mask_tgt,
                                        resolution=resolution, normalize=normalize)
        d1 = instance_matching_distance(feat_src_flipped, feat_tgt, mask_src_flipped, mask_tgt,
                                        resolution=resolution, normalize=normalize)
    elif metric == 'mutual_nn':
        d0 = mutual_nn_distance(feat_src, feat_tgt, normalize=normalize)
        d1 = mutual_nn_distance(feat_src_flipped, feat_tgt, normalize=normalize)
    else:
        raise ValueError(f"metric must be 'imd' or 'mutual_nn', got {metric!r}")
    flipped = bool(d1 < d0)
    logger.debug('choose_flip(%s): original %.6f flipped %.6f -> %s', metric, float(d0),
                 float(d1), 'flipped' if flipped else 'original')
    return FlipDecision(flipped=flipped, decision='flipped' if flipped else 'original',
                        dist_original=float(d0), dist_flipped=float(d1))


def flip_permutation(groups: Sequence[int | Sequence[int]], num_points: int | None = None,
                     visible: Sequence[bool] | Tensor | np.ndarray | None = None) -> list[int]:
    """Left/right keypoint permutation of a horizontal flip (GeoAware ``permute_indices``).

    Each group lists the keypoints that swap under a flip; inside a group of length L, slot
    ``g[i]`` of the flipped keypoints receives the mirrored keypoint ``g[(i + 1) % L]`` (a swap
    for pairs, a cycle for the 4-corner groups of e.g. SPair's tvmonitor). With ``visible``, a
    group is permuted only when all its keypoints are visible.

    Args:
        groups: ints (self-symmetric keypoints) or sequences of ints.
        num_points: length of the result (default: largest index + 1).
        visible: optional (num_points,) visibility flags.

    Returns:
        list ``perm`` with ``flipped[i] = mirror(points[perm[i]])`` (see :func:`flip_points`).
    """
    flat = [int(i) for g in groups for i in (g if isinstance(g, Sequence) else [g])]
    if not flat:
        raise ValueError('groups must name at least one keypoint')
    if len(set(flat)) != len(flat) or min(flat) < 0:
        raise ValueError(f'groups must hold distinct non-negative indices, got {list(groups)}')
    n = max(flat) + 1 if num_points is None else int(num_points)
    if max(flat) >= n:
        raise ValueError(f'groups index {max(flat)} but num_points is {n}')
    vis = None if visible is None else [bool(v) for v in np.asarray(visible).reshape(-1)]
    if vis is not None and len(vis) < n:
        raise ValueError(f'visible has {len(vis)} entries, need {n}')
    perm = list(range(n))
    for g in groups:
        if isinstance(g, Sequence) and len(g) > 1:
            if vis is None or all(vis[i] for i in g):
                for i, k in enumerate(g):
                    perm[k] = int(g[(i + 1) % len(g)])
    return perm


def _mirror_x(points: ArrayT, width: float, pixel_centres: bool) -> ArrayT:
    if points.shape[-1] < 2:
        raise ValueError(f'points must have shape (..., K, >=2), got {tuple(points.shape)}')
    out = points.clone() if isinstance(points, Tensor) else np.array(points, copy=True)
    out[..., 0] = (width - 1 - points[..., 0]) if pixel_centres else (width - points[..., 0])
    return out


def _index(points: ArrayT, perm: Sequence[int]) -> ArrayT:
    if len(perm) != points.shape[-2]:
        raise ValueError(f'permutation has {len(perm)} entries for {points.shape[-2]} points')
    return points[..., list(perm), :]


def flip_points(points: ArrayT, width: float, permutation: Sequence[int] | None = None, *,
                pixel_centres: bool = True) -> ArrayT:
    """Keypoints of the horizontally flipped image (GeoAware ``flip_keypoints``).

    ``x -> W - 1 - x`` (pixel centres at integers; ``pixel_centres=False``: ``x -> W - x`` as
    the reference), then rows reordered: ``out[i] = mirror(points[perm[i]])``. Extra columns
    (e.g. visibility) are carried along.

    Args:
        points: (..., K, D >= 2) with x in column 0, Tensor or numpy array.
        width: image width W (or grid width for patch coordinates).
        permutation: optional left/right permutation from :func:`flip_permutation`.
        pixel_centres: mirror convention, see above.

    Returns:
        same type and shape as ``points``.
    """
    out = _mirror_x(points, width, pixel_centres)
    return out if permutation is None else _index(out, permutation)


def unflip_points(points: ArrayT, width: float, permutation: Sequence[int] | None = None, *,
                  pixel_centres: bool = True) -> ArrayT:
    """Map predictions made in the flipped image back: the inverse of :func:`flip_points`.

    ``out[perm[i]] = mirror(points[i])`` (the inverse permutation, which differs from ``perm``
    for cyclic groups of more than two keypoints).

    Args:
        points: (..., K, D >= 2) flipped-image points, x in column 0.
        width: image width W.
        permutation: the permutation that was used by :func:`flip_points`.
        pixel_centres: mirror convention.

    Returns:
        same type and shape as ``points``.
    """
    out = _mirror_x(points, width, pixel_centres)
    if permutation is None:
        return out
    perm = [int(k) for k in permutation]
    if sorted(perm) != list(range(len(perm))):
        raise ValueError(f'permutation is not a permutation of 0..K-1: {perm}')
    inv = [0] * len(perm)
    for i, k in enumerate(perm):
        inv[k] = i
    return _index(out, inv)


def flip_visibility(visible_src: Tensor | np.ndarray, visible_tgt: Tensor | np.ndarray,
                    permutation: Sequence[int] | None = None) -> Tensor:
    """Keypoints that stay mutually visible after the flip (``optimized_kps_1_to_2``).

    Args:
        visible_src: (K,) source visibility.
        visible_tgt: (K,) target visibility.
        permutation: the full (visibility-independent) flip permutation.

    Returns:
        (K,) bool ``vis & vis[perm]`` with ``vis = visible_src & visible_tgt``.
    """
    vis = _as_tensor(visible_src).bool() & _as_tensor(visible_tgt).bool()
    return vis if permutation is None else vis & vis[list(permutation)]


def merge_flip_predictions(pred: Tensor, pred_flipped: Tensor, use_flipped: bool | FlipDecision,
                           valid: Tensor | None = None) -> Tensor:
    """Replace predictions by the flipped-source ones when the flip wins (``ADAPT_FLIP``).

    Args:
        pred: (K, D) predictions from the original source.
        pred_flipped: (K, D) predictions from the flipped source, same keypoint order.
        use_flipped: the decision (bool or :class:`FlipDecision`).
        valid: (K,) bool keypoints allowed to change (see :func:`flip_visibility`); None = all.

    Returns:
        (K, D) merged predictions.
    """
    if pred.shape != pred_flipped.shape:
        raise ValueError(f'pred {tuple(pred.shape)} and pred_flipped '
                         f'{tuple(pred_flipped.shape)} differ')
    flip = use_flipped.flipped if isinstance(use_flipped, FlipDecision) else bool(use_flipped)
    if not flip:
        return pred.clone()
    sel = (torch.ones(pred.shape[0], dtype=torch.bool, device=pred.device) if valid is None
           else _as_tensor(valid, pred.device).bool())
    return torch.where(sel[:, None], pred_flipped, pred)


def transfer_keypoints_flip_aware(points_src_px: Tensor | np.ndarray, feat_src: Tensor,
                                  feat_src_flipped: Tensor, feat_tgt: Tensor, *,
                                  stride: float, image_width: float,
                                  permutation_groups: Sequence[int | Sequence[int]] | None = None,
                                  visible_src: Tensor | np.ndarray | None = None,
                                  visible_tgt: Tensor | np.ndarray | None = None,
                                  mask_src: Tensor | np.ndarray | None = None,
                                  mask_src_flipped: Tensor | np.ndarray | None = None,
                                  mask_tgt: Tensor | np.ndarray | None = None,
                                  metric: str = 'imd', resolution: int = IMD_RESOLUTION,
                                  soft: bool = True,
                                  window: int = DEFAULT_WINDOW, beta: float = DEFAULT_BETA,
                                  pixel_centres: bool = True,
                                  ) -> tuple[Tensor, FlipDecision]:
    """Keypoint transfer with adaptive pose alignment (GeoAware ``compute_pck`` + ADAPT_FLIP).

    1. Transfer from the original source.
    2. Flip the source keypoints (mirror + left/right permutation restricted to visible groups)
       and transfer them from the flipped-source descriptors.
    3. If :func:`choose_flip` prefers the flipped source, the predictions of the keypoints that
       stay mutually visible after the flip (:func:`flip_visibility`) are replaced.

    Args:
        points_src_px: (K, 2) source pixel (x, y).
        feat_src: (C, h, w) source descriptors.
        feat_src_flipped: (C, h, w) descriptors of the flipped source image.
        feat_tgt: (C, h', w') target descriptors.
        stride: pixels per patch (both images).
        image_width: source image width in pixels (for the mirror).
        permutation_groups: left/right groups (see :func:`flip_permutation`); None = no swap.
        visible_src: (K,) source visibility (default all visible).
        visible_tgt: (K,) target visibility (default all visible).
        mask_src: optional source mask for IMD.
        mask_src_flipped: optional flipped-source mask (default ``mask_src`` flipped).
        mask_tgt: optional target mask.
        metric: ``'imd'`` or ``'mutual_nn'``.
        resolution: IMD grid side (GeoAware: 64).
        soft: window soft-argmax (True) or nearest neighbour.
        window: soft-argmax window half-size.
        beta: soft-argmax temperature.
        pixel_centres: mirror convention of :func:`flip_points`.

    Returns:
        ((K, 2) predicted target pixels, :class:`FlipDecision`).
    """
    pts = _as_tensor(points_src_px, feat_src.device)
    k = pts.shape[0]
    ones = torch.ones(k, dtype=torch.bool)
    vs = ones if visible_src is None else _as_tensor(visible_src).bool().cpu()
    vt = ones if visible_tgt is None else _as_tensor(visible_tgt).bool().cpu()
    kw = dict(stride_src=stride, soft=soft, window=window, beta=beta)
    pred = transfer_keypoints(pts, feat_src, feat_tgt, **kw).points
    perm_vis = perm_all = None
    if permutation_groups is not None:
        perm_vis = flip_permutation(permutation_groups, k, visible=(vs & vt))
        perm_all = flip_permutation(permutation_groups, k)
    pts_flip = flip_points(pts, image_width, perm_vis, pixel_centres=pixel_centres)
    pred_flip = transfer_keypoints(pts_flip, feat_src_flipped, feat_tgt, **kw).points
    decision = choose_flip(feat_src, feat_src_flipped, feat_tgt, mask_src=mask_src,
                           mask_src_flipped=mask_src_flipped, mask_tgt=mask_tgt, metric=metric,
                           resolution=resolution)
    valid = flip_visibility(vs, vt, perm_all).to(pred.device)
    return merge_flip_predictions(pred, pred_flip, decision, valid), decision
