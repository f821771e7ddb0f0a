"""Grasp-point candidates: local maxima, window soft-argmax, grid -> pixel mapping, NMS."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from affordance_core.inference.grasps import (find_grasp_points, grid_to_image, local_maxima,
                                              nms, sample_bilinear, window_soft_argmax)


def blob(shape, centre, sigma, height=1.0, sigma_x=None):
    """Gaussian blob on a grid; ``centre`` = (row, col), optionally anisotropic."""
    rr, cc = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
    sx = sigma if sigma_x is None else sigma_x
    return height * np.exp(-((rr - centre[0]) ** 2 / (2 * sigma ** 2)
                             + (cc - centre[1]) ** 2 / (2 * sx ** 2)))


def test_local_maxima_sorted_plateau_and_min_score():
    g = blob((16, 16), (3, 4), 1.0) + blob((16, 16), (11, 12), 1.0, height=0.6)
    peaks = local_maxima(g)
    assert peaks.tolist()[:2] == [[3, 4], [11, 12]]
    assert local_maxima(g, min_score=0.7).tolist() == [[3, 4]]
    # a 2x2 plateau yields exactly one peak, its first cell in raster order
    p = np.zeros((8, 8))
    p[2:4, 5:7] = 1.0
    assert local_maxima(p, min_score=0.5).tolist() == [[2, 5]]
    with pytest.raises(ValueError, match='2-D'):
        local_maxima(np.zeros((3, 3, 1)))
    with pytest.raises(ValueError, match='nan'):
        local_maxima(np.full((3, 3), np.nan))


def test_soft_argmax_exact_for_symmetric_blob_between_cells():
    # centred between rows 7/8 and columns 5/6: four tied maxima; the argmax (7, 5) starts the
    # window, which is asymmetric around the centre, yet the estimate is exact.
    g = blob((16, 16), (7.5, 5.5), 1.0)
    assert tuple(np.unravel_index(np.argmax(g), g.shape)) == (7, 5)
    row, col = window_soft_argmax(g, (7, 5), window=2, beta=0.05)
    # exact up to the e^-20 weight of the ~230 zeroed cells outside the window
    assert row == pytest.approx(7.5, abs=1e-5) and col == pytest.approx(5.5, abs=1e-5)
    # on a cell centre: that cell
    row, col = window_soft_argmax(blob((16, 16), (4, 9), 1.0), (4, 9))
    assert (row, col) == pytest.approx((4.0, 9.0), abs=1e-5)
    # the estimate depends on the shape only, not on the height (weak peaks are not dragged to
    # the grid centre by the zeroed cells)
    weak = window_soft_argmax(0.2 * g, (7, 5))
    assert weak == pytest.approx((7.5, 5.5), abs=1e-5)
    # an off-centre blob (true column 5.3) moves the estimate part of the way, monotonically
    cols = [window_soft_argmax(blob((16, 16), (8, c), 1.5), (8, 5))[1] for c in (5.1, 5.2, 5.3)]
    assert 5.0 < cols[0] < cols[1] < cols[2] <= 5.3
    # GeoAware definition: cells outside the window are zeroed, not ignored -> a second, higher
    # blob outside the window does not pull the estimate
    two = g + blob((16, 16), (7.5, 12), 0.7, height=2.0)
    assert window_soft_argmax(two, (7, 5)) == pytest.approx((7.5, 5.5), abs=1e-5)
    # a weaker local peak whose window holds a higher neighbouring peak keeps its own position
    # (without masking the higher cells it lands on the other blob, row ~7)
    near = (blob((16, 16), (7, 6.3), 0.4, sigma_x=1.2)
            + blob((16, 16), (4.5, 5.5), 0.6, height=0.5))
    assert local_maxima(near, 0.2).tolist() == [[7, 6], [5, 6]]
    assert window_soft_argmax(near, (5, 6)) == pytest.approx((4.5, 5.5), abs=0.01)
    with pytest.raises(ValueError, match='outside'):
        window_soft_argmax(g, (16, 0))
    with pytest.raises(ValueError, match='beta'):
        window_soft_argmax(g, (7, 5), beta=0.0)


def test_grid_to_image_matches_half_pixel_upsampling():
    u, v = grid_to_image(0.0, 0.0, (16, 16), (480, 640))
    assert (float(u), float(v)) == (19.5, 14.5)
    u, v = grid_to_image(7.5, 5.5, (16, 16), (480, 640))
    assert (float(u), float(v)) == (239.5, 239.5)
    # cv2.resize (INTER_LINEAR, half-pixel centres) of the between-cells blob: the top plateau
    # of the upsampled map is centred on the mapped sub-pixel centre
    g = blob((16, 16), (7.5, 5.5), 1.0).astype(np.float32)
    up = cv2.resize(g, (640, 480), interpolation=cv2.INTER_LINEAR)
    rows, cols = np.nonzero(up >= up.max() - 1e-6)
    assert cols.mean() == pytest.approx(239.5, abs=1e-9)
    assert rows.mean() == pytest.approx(239.5, abs=1e-9)
    # a cell-centred peak maps onto the maximum of the upsampled map (scale 2: the centre of
    # cell (row 3, col 4) lies at pixel (u, v) = (8.5, 6.5), the 2x2 maximum block rows 6-7,
    # cols 8-9)
    up2 = cv2.resize(blob((8, 8), (3, 4), 1.0).astype(np.float32), (16, 16))
    rows, cols = np.nonzero(up2 >= up2.max() - 1e-6)
    u, v = grid_to_image(3, 4, (8, 8), (16, 16))
    assert (cols.mean(), rows.mean()) == (float(u), float(v)) == (8.5, 6.5)


def test_sample_bilinear():
    img = np.arange(12, dtype=np.float64).reshape(3, 4)
    assert sample_bilinear(img, 1.5, 0.5) == pytest.approx((1 + 2 + 5 + 6) / 4)
    assert sample_bilinear(img, -3.0, 10.0) == img[2, 0]  # clamped


def test_nms_keeps_separated_and_suppresses_neighbours():
    uv = np.array([[0, 0], [10, 0], [100, 0], [100, 15]], float)
    scores = np.array([0.9, 0.8, 0.7, 0.95])
    assert nms(uv, scores, radius=20, top_k=0).tolist() == [3, 0]
    assert nms(uv, scores, radius=5, top_k=0).tolist() == [3, 0, 1, 2]
    assert nms(uv, scores, radius=20, top_k=1).tolist() == [3]
    assert nms(uv, scores, radius=10, top_k=0).tolist() == [3, 0, 2]  # inclusive: 10 <= 10
    assert nms(uv, scores, radius=9.99, top_k=0).tolist() == [3, 0, 1, 2]
    with pytest.raises(ValueError, match='scores'):
        nms(uv, scores[:2], 1.0, 0)


def test_find_grasp_points_end_to_end():
    shape = (16, 16)
    g = (blob(shape, (4, 4), 0.7) + blob(shape, (4, 7), 0.7, height=0.9)  # near neighbour
         + blob(shape, (11.5, 11.5), 1.0, height=0.7)                     # far, between cells
         + blob(shape, (13, 2), 1.0, height=0.1))                         # below min_score
    g = (g - g.min()) / (g.max() - g.min())
    heat = cv2.resize(g.astype(np.float32), (640, 480), interpolation=cv2.INTER_LINEAR)
    heat = (heat - heat.min()) / (heat.max() - heat.min())
    pts = find_grasp_points(g, heat, top_k=5, nms_radius=130, min_score=0.2)
    # the neighbour 3 cells (120 px) away is suppressed, the weak one dropped
    assert len(pts) == 2
    assert pts[0].score >= pts[1].score
    assert (pts[1].u, pts[1].v) == pytest.approx((12 * 40 - 0.5, 12 * 30 - 0.5), abs=0.05)
    assert pts[1].score == pytest.approx(sample_bilinear(heat, pts[1].u, pts[1].v))
    # a small radius keeps the neighbour
    assert len(find_grasp_points(g, heat, nms_radius=100, min_score=0.2)) == 3
    assert len(find_grasp_points(g, heat, top_k=1, nms_radius=100, min_score=0.2)) == 1


def test_peak_locator_is_the_shared_correspondence_op(monkeypatch):
    from affordance_core.inference import grasps
    from affordance_core.ops import correspondence

    calls = []

    def spy(corr, window, beta, **kw):
        calls.append((corr.shape, window, beta, kw))
        return correspondence.window_soft_argmax(corr, window, beta, **kw)

    monkeypatch.setattr(grasps, '_window_soft_argmax_op', spy)
    shape = (16, 16)
    g = blob(shape, (4, 4.3), 0.8) + blob(shape, (11.4, 11.5), 1.0, height=0.7)
    heat = cv2.resize(g.astype(np.float32), (224, 224), interpolation=cv2.INTER_LINEAR)
    heat = ((heat - heat.min()) / (heat.max() - heat.min())).astype(np.float64)
    pts = find_grasp_points(g, heat, min_score=0.2, nms_radius=10)
    # one batched call for all peaks, with the grasp options of the op
    peaks = local_maxima(g, min_score=0.2)
    assert len(calls) == 1 and len(peaks) == len(pts) == 2
    (n, h, w), window, beta, kw = calls[0]
    assert (n, h, w, window, beta) == (2, 16, 16, 2, 0.05)
    assert kw['normalize_peak'] is True and kw['mask_higher'] is True
    assert kw['peak'].tolist() == [int(r) * 16 + int(c) for r, c in peaks]
    # the numbers are the op's (x, y) = (col, row), applied to the grid with the peak as centre
    for p, (r0, c0) in zip(pts, peaks):
        x, y = correspondence.window_soft_argmax(g, 2, 0.05, peak=int(r0) * 16 + int(c0),
                                                 normalize_peak=True, mask_higher=True)
        assert (p.row, p.col) == (y, x)
    # window 0 = the peak cell itself (no refinement; the op's 0 would be the global soft-argmax)
    calls.clear()
    assert window_soft_argmax(g, (4, 4), window=0) == (4.0, 4.0)
    assert calls == []
    with pytest.raises(ValueError, match='window'):
        find_grasp_points(g, heat, window=-1)
