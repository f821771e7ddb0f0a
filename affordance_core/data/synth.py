"""AGD-Synth: a procedural toy world written in the exact AGD20K folder layout.

Used by the CI tests and by the ``make demo`` training run. Objects are drawn from parts with
numpy + OpenCV (polygons, ellipses, shading, outlines, textures); every affordance belongs to a
*part* of each object that affords it (knife: ``cut_with`` -> blade, ``hold`` -> handle,
``stick`` -> tip; cup: ``drink_with`` -> rim, ``hold`` -> handle; ...). Several objects share an
affordance on different parts and one object carries several affordances on different parts, so
a model has to localise parts, not objects.

Layout written under ``out_dir`` (``methods.md`` §1.1)::

    {Seen,Unseen}/trainset/{exocentric,egocentric}/<affordance>/<object>/*.jpg
    {Seen,Unseen}/testset/egocentric/<affordance>/<object>/*.jpg
    {Seen,Unseen}/testset/GT/<affordance>/<object>/<same-stem>.png   (8-bit grey heatmap)
    synth_meta.json

Image kinds:

* **egocentric** (train and test): the object alone at a random, off-centre position, scale,
  rotation and mirror, with per-instance colours and part proportions, on a plain 'product
  photo' gradient or a toned-down texture (stripes, tiles, wood, noise, wall/table), with a few
  distractor shapes and a drop shadow.
* **exocentric**: the same category held by a hand (skin tone, size and pose vary; palm + four
  fingers + thumb, arm and sleeve entering from an image border) plus an affordance cue at the
  affordance part, see :data:`EXO_CUES`.
* **GT** (test only): the visible affordance-part mask blurred with a Gaussian whose sigma grows
  with the part size, peak scaled to 255, like AGD20K's Gaussian-rendered heatmaps.

Every image is rendered from its own ``numpy.random.Generator`` seeded with
``(seed, split, role, affordance, object, index)``, so the content does not depend on generation
order, and the same seed gives byte-identical files (fixed JPEG quality, deterministic OpenCV
calls). Class names come from :mod:`affordance_core.labels`, so a model trained on AGD-Synth uses
the official class ids.
"""
from __future__ import annotations

import colorsys
import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import cv2
import numpy as np

from affordance_core.labels import AFFORDANCES_SEEN, AFFORDANCES_UNSEEN, OBJECTS

logger = logging.getLogger(__name__)

GENERATOR_VERSION = '1.0'
JPEG_QUALITY = 90
PNG_COMPRESSION = 3
META_FILE = 'synth_meta.json'
SPLITS: tuple[str, ...] = ('Seen', 'Unseen')
ROLES: tuple[str, ...] = ('exo', 'ego', 'test')

# size name -> images per (affordance, object) folder: (exocentric, egocentric train, test)
SIZES: dict[str, tuple[int, int, int]] = {
    'tiny': (3, 1, 2),
    'demo': (17, 6, 5),
}
MAX_PER_FOLDER = 2000

# object -> affordance -> region (a named set of parts, see each builder); official names only
AFFORDANCE_PARTS: dict[str, dict[str, str]] = {
    'knife': {'hold': 'handle', 'cut_with': 'blade', 'stick': 'tip'},
    'cup': {'hold': 'handle', 'drink_with': 'rim', 'pour': 'rim'},
    'bottle': {'hold': 'body', 'drink_with': 'mouth', 'pour': 'neck', 'open': 'cap'},
    'hammer': {'hold': 'grip', 'hit': 'head'},
    'scissors': {'hold': 'rings', 'cut_with': 'blades'},
    'wine_glass': {'hold': 'stem', 'drink_with': 'rim'},
    'tennis_racket': {'hold': 'handle', 'swing': 'handle', 'hit': 'head'},
    'axe': {'hold': 'handle', 'swing': 'handle', 'cut_with': 'blade'},
    'toothbrush': {'hold': 'handle', 'brush_with': 'bristles'},
    'fork': {'hold': 'handle', 'stick': 'tines'},
}
SYNTH_OBJECTS: tuple[str, ...] = tuple(sorted(AFFORDANCE_PARTS))
# Unseen: test objects never appear in the Unseen training set (disjoint categories)
UNSEEN_TEST_OBJECTS: tuple[str, ...] = ('cup', 'knife', 'tennis_racket', 'wine_glass')

# what an exocentric image of each affordance shows (the cue sits on / at the affordance part)
EXO_CUES: dict[str, str] = {
    'hold': 'a hand grasps the hold part (fingers across it, palm and arm behind)',
    'cut_with': 'hand on the grip; the blade(s) rest in food on a board / a paper sheet / a log',
    'stick': 'hand on the handle; the tines / tip pierce a piece of food',
    'drink_with': 'object tilted towards a face whose lips touch the rim / mouth; hand on grip',
    'pour': 'object tilted down, a liquid stream leaves the rim / neck into a receptacle',
    'hit': 'hand on the grip; the head strikes a nail in a board / a ball, with impact lines',
    'swing': 'hand on the handle; ghosted copies and motion arcs around the grip',
    'open': 'one hand holds the body, a second hand grasps the cap',
    'brush_with': 'hand on the handle; the bristles touch a row of teeth with foam',
}

# object -> region a hand holds when the affordance is not 'hold'
GRASP_REGION: dict[str, str] = {
    'knife': 'handle', 'cup': 'handle', 'bottle': 'body', 'hammer': 'grip', 'scissors': 'rings',
    'wine_glass': 'stem', 'tennis_racket': 'handle', 'axe': 'handle', 'toothbrush': 'handle',
    'fork': 'handle',
}
_UPRIGHT = frozenset({'cup', 'bottle', 'wine_glass'})

_SPLIT_ID = {'Seen': 0, 'Unseen': 1}
_ROLE_ID = {'exo': 0, 'ego': 1, 'test': 2}
_ROLE_DIRS = {'exo': ('trainset', 'exocentric'), 'ego': ('trainset', 'egocentric'),
              'test': ('testset', 'egocentric')}
_ROLE_TAGS = {'exo': 'exo', 'ego': 'ego', 'test': 'test'}


# ================================================================================================
# colours


def _hsv(h: float, s: float, v: float) -> tuple[float, float, float]:
    """HSV in [0, 1] -> BGR in [0, 255]."""
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return (b * 255.0, g * 255.0, r * 255.0)


def _rand_color(rng: np.random.Generator, s: tuple[float, float] = (0.35, 0.9),
                v: tuple[float, float] = (0.35, 0.95)) -> tuple[float, float, float]:
    return _hsv(rng.random(), rng.uniform(*s), rng.uniform(*v))


def _jitter(rng: np.random.Generator, color: Sequence[float], amount: float = 18.0
            ) -> tuple[float, float, float]:
    d = rng.uniform(-amount, amount, 3)
    b, g, r = (min(255.0, max(0.0, float(c) + float(e))) for c, e in zip(color, d))
    return (b, g, r)


def _scale_color(color: Sequence[float], f: float) -> tuple[float, float, float]:
    b, g, r = (min(255.0, max(0.0, float(c) * f)) for c in color)
    return (b, g, r)


_METALS = ((196, 198, 204), (176, 181, 188), (150, 156, 163), (206, 204, 196), (125, 128, 134))
_WOODS = ((62, 108, 160), (40, 78, 128), (84, 134, 186), (32, 58, 98), (96, 150, 200))
_SKINS = ((189, 208, 241), (156, 183, 226), (120, 156, 205), (92, 126, 176), (66, 96, 140),
          (48, 66, 102), (170, 196, 236), (105, 140, 196))
_LIQUIDS = ((205, 150, 90), (38, 68, 108), (40, 140, 235), (235, 240, 240), (60, 30, 130))


def _metal(rng: np.random.Generator) -> tuple[float, float, float]:
    return _jitter(rng, _METALS[rng.integers(len(_METALS))], 10)


def _wood(rng: np.random.Generator) -> tuple[float, float, float]:
    return _jitter(rng, _WOODS[rng.integers(len(_WOODS))], 14)


def _plastic(rng: np.random.Generator) -> tuple[float, float, float]:
    if rng.random() < 0.2:
        return _hsv(0, 0, rng.uniform(0.08, 0.25))  # black
    return _rand_color(rng, (0.5, 0.95), (0.45, 0.95))


# ================================================================================================
# geometry primitives (local object coordinates: y down, the functional end up, height ~1)


def _ellipse(cx: float, cy: float, ax: float, ay: float, a0: float = 0.0, a1: float = 360.0,
             n: int = 40) -> np.ndarray:
    """Points of an ellipse (arc from a0 to a1 degrees, y down) as (n, 2)."""
    full = abs(a1 - a0) >= 360.0
    t = np.radians(np.linspace(a0, a1, n, endpoint=not full))
    return np.stack([cx + ax * np.cos(t), cy + ay * np.sin(t)], 1)


def _rrect(x0: float, y0: float, x1: float, y1: float, r: float = 0.0, n: int = 5) -> np.ndarray:
    """Axis-aligned rounded rectangle as (N, 2)."""
    r = max(0.0, min(r, (x1 - x0) / 2, (y1 - y0) / 2))
    if r <= 0:
        return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64)
    pts = []
    for cx, cy, a in ((x1 - r, y0 + r, 270), (x1 - r, y1 - r, 0), (x0 + r, y1 - r, 90),
                      (x0 + r, y0 + r, 180)):
        pts.append(_ellipse(cx, cy, r, r, a, a + 90, n))
    return np.concatenate(pts)


def _bezier(p0: Sequence[float], p1: Sequence[float], p2: Sequence[float], n: int = 12
            ) -> np.ndarray:
    """Quadratic Bezier curve from p0 to p2 with control p1, (n, 2)."""
    t = np.linspace(0, 1, n)[:, None]
    p0, p1, p2 = (np.asarray(p, np.float64) for p in (p0, p1, p2))
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2


def _poly(*pts: Sequence[float]) -> np.ndarray:
    return np.asarray(pts, np.float64)


def _stroke(p0: Sequence[float], p1: Sequence[float], w0: float, w1: float | None = None
            ) -> np.ndarray:
    """Quad around the segment p0 -> p1 with half widths w0 (at p0) and w1 (at p1)."""
    p0, p1 = np.asarray(p0, np.float64), np.asarray(p1, np.float64)
    d = p1 - p0
    d = d / (np.linalg.norm(d) + 1e-12)
    n = np.array([-d[1], d[0]])
    w1 = w0 if w1 is None else w1
    return np.stack([p0 + n * w0, p1 + n * w1, p1 - n * w1, p0 - n * w0])


# ================================================================================================
# object models

Pattern = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
                   tuple[np.ndarray, np.ndarray]]


@dataclass
class Part:
    """One drawn piece of an object, in local coordinates.

    Attributes:
        name: part name; several pieces may share a name (their masks are merged).
        polys: filled polygons, each (N, 2) local (x, y).
        color: base BGR colour in [0, 255].
        holes: polygons cut out of the fill (rings).
        shade: 'cyl' (round across local x), 'cylv' (round across local y), 'flat' or 'dome'.
        axis: shading parameters: (centre, half width) for cyl/cylv/flat (the half width may be a
            callable of the other coordinate), (cx, cy, rx, ry) for dome.
        gloss: strength of the specular highlight.
        alpha: opacity (glass < 1).
        outline: outline darkness in [0, 1] (0: no outline).
        pattern: optional f(u, v, colour (h, w, 3), alpha (h, w)) -> (colour, alpha).
    """

    name: str
    polys: list[np.ndarray]
    color: tuple[float, float, float]
    holes: list[np.ndarray] = field(default_factory=list)
    shade: str = 'cyl'
    axis: tuple[Any, ...] = (0.0, 0.1)
    gloss: float = 0.25
    alpha: float = 1.0
    outline: float = 0.55
    pattern: Pattern | None = None


@dataclass
class Anchor:
    """A named spot of an object (local coordinates) used to place hands and cues.

    ``(x, y)`` is the centre, ``half_w`` the half thickness across local x, ``half_len`` the half
    extent along local y, ``normal`` the outward direction of the working side.
    """

    x: float
    y: float
    half_w: float
    half_len: float
    normal: tuple[float, float] = (1.0, 0.0)


# region = union of (part name, clip) terms; clip maps 'x' / 'y' to a (lo, hi) local range
Region = list[tuple[str, dict[str, tuple[float, float]] | None]]


@dataclass
class ObjectModel:
    """One random instance of an object category: parts in drawing order plus named regions."""

    name: str
    parts: list[Part]
    regions: dict[str, Region]
    anchors: dict[str, Anchor]
    size_cm: float = 20.0

    def part_names(self) -> list[str]:
        """Distinct part names in drawing order."""
        return list(dict.fromkeys(p.name for p in self.parts))

    def points(self) -> np.ndarray:
        """All polygon vertices, (N, 2) local coordinates."""
        return np.concatenate([q for p in self.parts for q in p.polys])


@dataclass(frozen=True)
class Pose:
    """Placement of an object on a canvas.

    Attributes:
        x, y: canvas position (pixels) of the local origin.
        scale: pixels per local unit (the object height in pixels).
        angle: rotation in degrees, clockwise on screen (0: functional end up).
        flip: mirror the local x axis.
    """

    x: float
    y: float
    scale: float
    angle: float = 0.0
    flip: bool = False

    def matrix(self) -> np.ndarray:
        """(2, 3) affine map local (x, y, 1) -> canvas (x, y)."""
        a = math.radians(self.angle)
        c, s = math.cos(a), math.sin(a)
        fx = -1.0 if self.flip else 1.0
        lin = self.scale * np.array([[c * fx, -s], [s * fx, c]])
        return np.concatenate([lin, [[self.x], [self.y]]], 1)

    def apply(self, pts: np.ndarray) -> np.ndarray:
        """Local (N, 2) -> canvas (N, 2)."""
        m = self.matrix()
        return np.asarray(pts, np.float64) @ m[:, :2].T + m[:, 2]

    def vector(self, v: Sequence[float]) -> np.ndarray:
        """Local direction -> canvas unit vector."""
        w = self.matrix()[:, :2] @ np.asarray(v, np.float64)
        return w / (np.linalg.norm(w) + 1e-12)

    def moved(self, **kw: Any) -> Pose:
        """Copy with some fields replaced."""
        d = dict(x=self.x, y=self.y, scale=self.scale, angle=self.angle, flip=self.flip)
        d.update(kw)
        return Pose(**d)


# ---------------------------------------------------------------------------------------- patterns


def _pat_stripes(axis: str, period: float, duty: float, color: Sequence[float],
                 phase: float = 0.0, mix: float = 1.0, slant: float = 0.0) -> Pattern:
    col = np.asarray(color, np.float32)

    def f(u: np.ndarray, v: np.ndarray, c: np.ndarray, a: np.ndarray):
        coord = (u if axis == 'u' else v) + slant * (v if axis == 'u' else u)
        m = (((coord - phase) / period) % 1.0) < duty
        c[m] = c[m] * (1 - mix) + col * mix
        return c, a
    return f


def _pat_band(axis: str, lo: float, hi: float, color: Sequence[float],
              inner: Pattern | None = None) -> Pattern:
    col = np.asarray(color, np.float32)

    def f(u: np.ndarray, v: np.ndarray, c: np.ndarray, a: np.ndarray):
        coord = u if axis == 'u' else v
        m = (coord >= lo) & (coord <= hi)
        shade = c.mean(2, keepdims=True) / (np.asarray(c.mean(), np.float32) + 1e-6)
        c = np.where(m[..., None], col * np.clip(shade, 0.6, 1.2), c)
        if inner is not None:
            c2, _ = inner(u, v, c.copy(), a)
            c = np.where(m[..., None], c2, c)
        return c, a
    return f


def _pat_dots(period: float, radius: float, color: Sequence[float]) -> Pattern:
    col = np.asarray(color, np.float32)

    def f(u: np.ndarray, v: np.ndarray, c: np.ndarray, a: np.ndarray):
        du = (u / period) % 1.0 - 0.5
        dv = (v / period + 0.5 * (np.floor(u / period) % 2)) % 1.0 - 0.5
        m = du * du + dv * dv < (radius / period) ** 2
        c[m] = col
        return c, a
    return f


def _pat_grain(freq: float, amp: float, seed_phase: float) -> Pattern:
    def f(u: np.ndarray, v: np.ndarray, c: np.ndarray, a: np.ndarray):
        g = np.sin(u * freq * 6.0 + np.sin(v * freq * 0.9 + seed_phase) * 2.5 + seed_phase)
        return c * (1.0 + amp * g[..., None].astype(np.float32)), a
    return f


def _pat_strings(c0: float, r0: float, spacing: float, color: Sequence[float]) -> Pattern:
    col = np.asarray(color, np.float32)

    def f(u: np.ndarray, v: np.ndarray, c: np.ndarray, a: np.ndarray):
        w = spacing * 0.16
        m = ((np.abs(((u - c0) / spacing) % 1.0 - 0.5) * spacing) < w) | (
            (np.abs(((v - r0) / spacing) % 1.0 - 0.5) * spacing) < w)
        c = np.where(m[..., None], col, c)
        a = np.where(m, a, a * 0.12)
        return c, a
    return f


def _pat_bevel(axis: str, start: float, direction: float, boost: float) -> Pattern:
    def f(u: np.ndarray, v: np.ndarray, c: np.ndarray, a: np.ndarray):
        coord = u if axis == 'u' else v
        m = (coord - start) * direction > 0
        c = np.where(m[..., None], c * boost + 20.0, c)
        return c, a
    return f


def _chain(*pats: Pattern | None) -> Pattern | None:
    ps = [p for p in pats if p is not None]
    if not ps:
        return None

    def f(u: np.ndarray, v: np.ndarray, c: np.ndarray, a: np.ndarray):
        for p in ps:
            c, a = p(u, v, c, a)
        return c, a
    return f


# ---------------------------------------------------------------------------------------- builders


def _build_knife(rng: np.random.Generator) -> ObjectModel:
    lh = rng.uniform(0.34, 0.44)
    hw = rng.uniform(0.032, 0.048)
    bw = rng.uniform(0.05, 0.08)
    yb = 0.5 - lh
    ybol = yb - rng.uniform(0.02, 0.04)
    ex = -hw + 2 * bw                       # edge x
    style = rng.integers(3)
    if style == 0:                          # chef: edge curves up to the tip at the spine
        tip = (-hw + 0.004, -0.5)
        curve = _bezier(tip, (ex, -0.42), (ex, -0.1), 14)
        blade = np.concatenate([[(-hw, ybol), (-hw, -0.47)], curve, [(ex, ybol)]])
    elif style == 1:                        # bread knife: rounded tip
        curve = _ellipse(-hw + bw, -0.5 + bw, bw, bw, 180, 360, 14)
        blade = np.concatenate([[(-hw, ybol)], curve, [(ex, ybol)]])
    else:                                   # utility: clipped spine
        tip = (ex - 0.01, -0.5)
        blade = np.concatenate([[(-hw, ybol), (-hw, -0.36)],
                                _bezier((-hw, -0.36), (-hw + 0.3 * bw, -0.47), tip, 8)[1:],
                                [(ex, -0.4), (ex, ybol)]])
    handle_col = _wood(rng) if rng.random() < 0.5 else _plastic(rng)
    metal = _metal(rng)
    parts = [
        Part('blade', [blade], metal, shade='cyl', axis=(-hw + bw, bw * 2.2), gloss=0.35,
             pattern=_pat_bevel('u', ex - 0.018, 1.0, 1.12)),
        Part('bolster', [_rrect(-hw * 1.15, ybol, hw * 1.15, yb + 0.01, 0.01)],
             _scale_color(metal, 0.85), axis=(0.0, hw * 1.15), gloss=0.4),
        Part('handle', [_rrect(-hw, yb, hw, 0.5, hw * 0.9)], handle_col, axis=(0.0, hw),
             pattern=_pat_grain(12.0, 0.06, rng.uniform(0, 6)) if rng.random() < 0.5 else None),
    ]
    for k in range(int(rng.integers(0, 4))):
        ry = yb + lh * (0.2 + 0.25 * k)
        parts.append(Part('handle', [_ellipse(0, ry, hw * 0.28, hw * 0.28, n=12)], metal,
                          shade='dome', axis=(0, ry, hw * 0.28, hw * 0.28), outline=0.3))
    tip_y = -0.5 + 0.3 * (ybol + 0.5)
    return ObjectModel(
        'knife', parts,
        regions={'handle': [('handle', None)], 'blade': [('blade', None)],
                 'tip': [('blade', {'y': (-1.0, tip_y)})]},
        anchors={'handle': Anchor(0.0, (yb + 0.5) / 2, hw, lh / 2, (1.0, 0.0)),
                 'blade': Anchor(-hw + bw, (ybol - 0.5) / 2, bw, (ybol + 0.5) / 2, (1.0, 0.0)),
                 'tip': Anchor(-hw + bw * 0.6, -0.46, bw * 0.6, 0.05, (0.0, -1.0))},
        size_cm=25.0)


def _build_cup(rng: np.random.Generator) -> ObjectModel:
    wt = rng.uniform(0.28, 0.38)
    wb = wt * rng.uniform(0.72, 1.0)
    ry = wt * rng.uniform(0.16, 0.28)
    ytop = -0.5 + ry
    ryb = wb * rng.uniform(0.1, 0.22)
    ybot = 0.5 - ryb
    body = np.concatenate([
        [(wt, ytop)], _ellipse(0, ybot, wb, ryb, 0, 180, 16), [(-wt, ytop)],
        _ellipse(0, ytop, wt, ry, 180, 360, 20)])
    col = _rand_color(rng, (0.0, 0.75), (0.45, 0.98))
    hx_o = rng.uniform(0.13, 0.2)
    hy_o = rng.uniform(0.17, 0.27)
    th = rng.uniform(0.045, 0.07)
    hcx = wt * 0.92 + hx_o * 0.55
    hcy = rng.uniform(-0.08, 0.05)
    deco = rng.integers(4)
    pat: Pattern | None = None
    c2 = _rand_color(rng)
    if deco == 1:
        y0 = rng.uniform(-0.2, 0.1)
        pat = _pat_band('v', y0, y0 + rng.uniform(0.08, 0.2), c2)
    elif deco == 2:
        pat = _pat_dots(rng.uniform(0.1, 0.16), rng.uniform(0.025, 0.04), c2)
    elif deco == 3:
        pat = _pat_stripes('u', rng.uniform(0.08, 0.14), 0.5, c2, mix=0.7)
    inner = _LIQUIDS[rng.integers(len(_LIQUIDS))] if rng.random() < 0.6 else _scale_color(col, 0.5)

    def width(v: np.ndarray) -> np.ndarray:
        return np.interp(v, [ytop, ybot], [wt, wb])

    parts = [
        Part('handle', [_ellipse(hcx, hcy, hx_o, hy_o, n=28)], _scale_color(col, 0.95),
             holes=[_ellipse(hcx, hcy, hx_o - th, hy_o - th, n=28)], shade='flat',
             axis=(hcy, hy_o)),
        Part('body', [body], col, axis=(0.0, width), gloss=0.35, pattern=pat),
        Part('rim', [_ellipse(0, ytop, wt, ry, n=32)], _scale_color(col, 1.08), shade='flat',
             axis=(ytop, ry), outline=0.45),
        Part('rim', [_ellipse(0, ytop + ry * 0.06, wt * 0.9, ry * 0.8, n=32)], inner,
             shade='flat', axis=(ytop, ry), gloss=0.0, outline=0.2),
    ]
    return ObjectModel(
        'cup', parts,
        regions={'handle': [('handle', None)],
                 'rim': [('rim', None), ('body', {'y': (-1.0, ytop + ry + 0.07)})],
                 'body': [('body', None)]},
        anchors={'handle': Anchor(hcx + hx_o * 0.45, hcy, hx_o * 0.45, hy_o, (1.0, 0.0)),
                 'rim': Anchor(0.0, ytop, wt, ry, (0.0, -1.0)),
                 'body': Anchor(0.0, 0.1, wt, 0.35, (-1.0, 0.0))},
        size_cm=10.0)


def _build_bottle(rng: np.random.Generator) -> ObjectModel:
    hb = rng.uniform(0.15, 0.23)
    hn = rng.uniform(0.045, 0.065)
    hc = hn * rng.uniform(1.05, 1.3)
    ch = rng.uniform(0.06, 0.09)
    ytc = -0.5 + ch
    ys = rng.uniform(-0.32, -0.2)
    ysb = ys + rng.uniform(0.1, 0.18)
    right = np.concatenate([[(hn, ytc - 0.005)], _bezier((hn, ys), (hb, ys + 0.02), (hb, ysb), 10),
                            [(hb, 0.46)], _ellipse(hb - 0.04, 0.46, 0.04, 0.04, 0, 90, 5)])
    left = right[::-1] * np.array([-1.0, 1.0])
    glass = np.concatenate([right, left])
    tint = [(60, 125, 45), (35, 70, 120), (165, 115, 60), (210, 212, 200), (70, 70, 170)]
    gcol = _jitter(rng, tint[rng.integers(len(tint))], 15)

    def width(v: np.ndarray) -> np.ndarray:
        return np.interp(v, [ytc, ys, ysb], [hn, hn, hb])

    ly0 = ysb + rng.uniform(0.06, 0.14)
    ly1 = min(0.42, ly0 + rng.uniform(0.2, 0.38))
    label_col = _rand_color(rng, (0.0, 0.9), (0.55, 1.0))
    parts = [
        Part('body', [glass], gcol, axis=(0.0, width), gloss=0.55, alpha=0.9),
        Part('label', [_rrect(-hb * 0.985, ly0, hb * 0.985, ly1)], label_col, axis=(0.0, hb),
             gloss=0.1, outline=0.2,
             pattern=_pat_stripes('v', rng.uniform(0.04, 0.08), 0.3, _rand_color(rng), mix=0.6)),
        Part('cap', [_rrect(-hc, -0.5, hc, ytc, 0.012)], _plastic(rng), axis=(0.0, hc),
             pattern=_pat_stripes('u', 0.02, 0.4, (40, 40, 40), mix=0.25)),
    ]
    return ObjectModel(
        'bottle', parts,
        regions={'body': [('body', {'y': (ysb - 0.02, 1.0)}), ('label', None)],
                 'neck': [('body', {'y': (-1.0, ysb)})],
                 'mouth': [('cap', None), ('body', {'y': (-1.0, ytc + 0.09)})],
                 'cap': [('cap', None)]},
        anchors={'body': Anchor(0.0, (ysb + 0.5) / 2, hb, (0.5 - ysb) / 2, (-1.0, 0.0)),
                 'neck': Anchor(0.0, (ytc + ysb) / 2, hn, (ysb - ytc) / 2, (0.0, -1.0)),
                 'mouth': Anchor(0.0, ytc, hn, 0.05, (0.0, -1.0)),
                 'cap': Anchor(0.0, -0.5 + ch / 2, hc, ch / 2, (0.0, -1.0))},
        size_cm=25.0)


def _build_hammer(rng: np.random.Generator) -> ObjectModel:
    hw = rng.uniform(0.03, 0.045)
    hh = rng.uniform(0.12, 0.17)
    y0, y1 = -0.5, -0.5 + hh
    fl = rng.uniform(0.2, 0.28)
    cl = rng.uniform(0.2, 0.3)
    handle = np.concatenate([[(-hw * 0.8, y1 - 0.02), (hw * 0.8, y1 - 0.02)],
                             _ellipse(0, 0.5 - hw * 1.15, hw * 1.15, hw * 1.15, 0, 180, 8)])
    gy = rng.uniform(0.05, 0.15)
    grip = np.concatenate([[(-hw * 1.12, gy), (hw * 1.12, gy)],
                           _ellipse(0, 0.5 - hw * 1.18, hw * 1.18, hw * 1.18, 0, 180, 8)])
    head_col = _metal(rng) if rng.random() < 0.7 else _plastic(rng)
    eye = _rrect(-0.07, y0, 0.07, y1, 0.01)
    face = np.concatenate([_rrect(-fl, y0 + hh * 0.12, -0.06, y1 - hh * 0.12, 0.01)])
    face_cap = _rrect(-fl - 0.012, y0 + hh * 0.05, -fl + 0.03, y1 - hh * 0.05, 0.012)
    claw = np.concatenate([[(0.06, y0 + hh * 0.1)],
                           _bezier((0.06, y0 + hh * 0.1), (cl * 0.7, y0 + hh * 0.05),
                                   (cl, y1 + 0.05), 10),
                           _bezier((cl - 0.02, y1 + 0.05), (cl * 0.6, y1 - 0.02),
                                   (0.06, y1 - hh * 0.15), 8)])
    hcol = _wood(rng) if rng.random() < 0.6 else _plastic(rng)
    parts = [
        Part('handle', [handle], hcol, axis=(0.0, hw * 1.15),
             pattern=_pat_grain(10.0, 0.07, rng.uniform(0, 6))),
        Part('grip', [grip], _plastic(rng), axis=(0.0, hw * 1.18),
             pattern=_pat_stripes('v', 0.035, 0.25, (30, 30, 30), mix=0.35)),
        Part('head', [claw, face, eye], head_col, shade='cylv', axis=((y0 + y1) / 2, hh / 1.7),
             gloss=0.45),
        Part('head', [face_cap], _scale_color(head_col, 1.08), shade='cylv',
             axis=((y0 + y1) / 2, hh / 1.7), gloss=0.5),
    ]
    return ObjectModel(
        'hammer', parts,
        regions={'grip': [('grip', None), ('handle', {'y': (gy - 0.06, 1.0)})],
                 'handle': [('handle', None), ('grip', None)], 'head': [('head', None)]},
        anchors={'grip': Anchor(0.0, (gy + 0.5) / 2, hw * 1.15, (0.5 - gy) / 2, (1.0, 0.0)),
                 'head': Anchor(-fl, (y0 + y1) / 2, hh / 2, hh / 2, (-1.0, 0.0))},
        size_cm=30.0)


def _build_scissors(rng: np.random.Generator) -> ObjectModel:
    py = rng.uniform(-0.02, 0.08)
    opening = rng.uniform(0.0, 0.14) if rng.random() < 0.6 else rng.uniform(0.0, 0.03)
    w0 = rng.uniform(0.035, 0.055)
    rx = rng.uniform(0.1, 0.15)
    ryc = rng.uniform(0.3, 0.36)
    blades = []
    for sgn in (1.0, -1.0):
        p0 = (-sgn * 0.06, py + 0.13)
        tip = (sgn * (opening + 0.01), -0.5)
        blades.append(np.concatenate([_stroke(p0, tip, w0, 0.006)[:2],
                                      [(tip[0] - sgn * 0.004, tip[1] - 0.003)],
                                      _stroke(p0, tip, w0, 0.006)[2:]]))
    ring_col = _plastic(rng)
    big = rng.uniform(1.0, 1.25)
    th = rng.uniform(0.028, 0.042)
    rings_outer, rings_inner, arms = [], [], []
    for k, sgn in enumerate((-1.0, 1.0)):
        f = big if k == 0 else 1.0
        ax, ay = rng.uniform(0.085, 0.11) * f, rng.uniform(0.1, 0.135) * f
        cx = sgn * rx
        rings_outer.append(_ellipse(cx, ryc, ax, ay, n=24))
        rings_inner.append(_ellipse(cx, ryc, ax - th, ay - th, n=24))
        arms.append(_stroke((sgn * 0.02, py + 0.08), (cx * 0.8, ryc - ay * 0.8), 0.03, 0.026))
    parts = [
        Part('rings', arms + rings_outer, ring_col, holes=rings_inner, shade='flat',
             axis=(ryc, 0.2), gloss=0.15),
        Part('blades', [blades[1]], _metal(rng), axis=(0.0, 0.1), gloss=0.4),
        Part('blades', [blades[0]], _metal(rng), axis=(0.0, 0.1), gloss=0.4),
        Part('pivot', [_ellipse(0.0, py, 0.022, 0.022, n=12)], _scale_color(_metal(rng), 0.8),
             shade='dome', axis=(0.0, py, 0.022, 0.022), outline=0.4),
    ]
    return ObjectModel(
        'scissors', parts,
        regions={'rings': [('rings', None)], 'blades': [('blades', None), ('pivot', None)]},
        anchors={'rings': Anchor(0.0, ryc, rx + 0.1, 0.14, (0.0, 1.0)),
                 'blades': Anchor(0.0, (py - 0.5) / 2, 0.06 + opening / 2, (py + 0.5) / 2,
                                  (1.0, 0.0))},
        size_cm=18.0)


def _build_wine_glass(rng: np.random.Generator) -> ObjectModel:
    hw = rng.uniform(0.19, 0.27)
    rr = hw * rng.uniform(0.12, 0.2)
    ytop = -0.5 + rr
    yb = rng.uniform(-0.12, 0.0)
    p = rng.uniform(0.7, 1.4)
    t = np.linspace(0, math.pi, 24)
    u_pts = np.stack([hw * np.cos(t), ytop + (yb - ytop) * np.sin(t) ** p], 1)
    bowl = np.concatenate([u_pts, _ellipse(0, ytop, hw, rr, 180, 360, 20)])
    bh = rng.uniform(0.05, 0.08)
    sw = rng.uniform(0.013, 0.022)
    glass_col = _jitter(rng, (228, 228, 220), 12)
    parts = [
        Part('base', [_ellipse(0, 0.5 - bh / 2, rng.uniform(0.15, 0.22), bh / 2, n=28)],
             glass_col, shade='flat', axis=(0.5 - bh / 2, bh), alpha=0.6, outline=0.5),
        Part('stem', [_rrect(-sw, yb - 0.02, sw, 0.5 - bh / 2, sw * 0.5)], glass_col,
             axis=(0.0, sw), alpha=0.7, gloss=0.5),
        Part('bowl', [bowl], glass_col, axis=(0.0, hw), alpha=0.35, gloss=0.6, outline=0.5),
    ]
    if rng.random() < 0.75:
        lev = ytop + (yb - ytop) * rng.uniform(0.25, 0.6)
        liq = u_pts[u_pts[:, 1] >= lev]
        if len(liq) >= 3:
            xl = hw * np.cos(np.arcsin(np.clip(((lev - ytop) / (yb - ytop)) ** (1 / p), 0, 1)))
            liq = np.concatenate([[(xl, lev)], liq, [(-xl, lev)]])
            wine = [(40, 20, 120), (120, 200, 225), (60, 60, 180), (200, 160, 110)]
            parts.append(Part('bowl', [liq], _jitter(rng, wine[rng.integers(len(wine))], 12),
                              axis=(0.0, hw), alpha=0.85, gloss=0.3, outline=0.2))
    parts.append(Part('rim', [_ellipse(0, ytop, hw, rr, n=32)], glass_col,
                      holes=[_ellipse(0, ytop, hw - 0.012, rr - 0.008, n=32)], shade='flat',
                      axis=(ytop, rr), alpha=0.9, outline=0.6))
    return ObjectModel(
        'wine_glass', parts,
        regions={'rim': [('rim', None), ('bowl', {'y': (-1.0, ytop + rr + 0.1)})],
                 'stem': [('stem', None)], 'bowl': [('bowl', None), ('rim', None)],
                 'base': [('base', None)]},
        anchors={'stem': Anchor(0.0, (yb + 0.5 - bh) / 2, max(sw, 0.03), (0.5 - bh - yb) / 2,
                                (1.0, 0.0)),
                 'rim': Anchor(0.0, ytop, hw, rr, (0.0, -1.0)),
                 'bowl': Anchor(0.0, (ytop + yb) / 2, hw, (yb - ytop) / 2, (-1.0, 0.0))},
        size_cm=20.0)


def _build_tennis_racket(rng: np.random.Generator) -> ObjectModel:
    hx = rng.uniform(0.19, 0.25)
    hy = rng.uniform(0.25, 0.3)
    cy = -0.5 + hy
    ft = rng.uniform(0.024, 0.034)
    hw = rng.uniform(0.028, 0.038)
    yhb = cy + hy
    yt = yhb + rng.uniform(0.1, 0.15)
    frame_col = _plastic(rng)
    string_col = _jitter(rng, (235, 240, 240) if rng.random() < 0.6 else (80, 230, 230), 15)
    throat = _poly((-hx * 0.5, yhb - 0.05), (hx * 0.5, yhb - 0.05), (hw * 1.1, yt + 0.01),
                   (-hw * 1.1, yt + 0.01))
    hole = _poly((-hx * 0.3, yhb + 0.005), (hx * 0.3, yhb + 0.005), (0.0, yt - 0.035))
    grip_col = _plastic(rng)
    parts = [
        Part('head', [_ellipse(0, cy, hx - ft * 0.5, hy - ft * 0.5, n=40)], string_col,
             shade='flat', axis=(cy, hy), gloss=0.0, outline=0.0,
             pattern=_pat_strings(0.0, cy, rng.uniform(0.028, 0.04), string_col)),
        Part('throat', [throat], frame_col, holes=[hole], shade='flat', axis=(yhb, 0.1)),
        Part('head', [_ellipse(0, cy, hx, hy, n=48)], frame_col,
             holes=[_ellipse(0, cy, hx - ft, hy - ft, n=48)], shade='dome',
             axis=(0.0, cy, hx, hy), gloss=0.3),
        Part('handle', [_rrect(-hw, yt, hw, 0.5, hw * 0.4)], grip_col, axis=(0.0, hw),
             pattern=_pat_stripes('v', 0.03, 0.18, _scale_color(grip_col, 0.6), slant=0.8)),
        Part('handle', [_rrect(-hw * 1.12, 0.47, hw * 1.12, 0.5, 0.01)], frame_col,
             axis=(0.0, hw)),
    ]
    return ObjectModel(
        'tennis_racket', parts,
        regions={'head': [('head', None)], 'handle': [('handle', None)],
                 'throat': [('throat', None)]},
        anchors={'handle': Anchor(0.0, (yt + 0.5) / 2 + 0.04, hw, (0.5 - yt) / 2, (1.0, 0.0)),
                 'head': Anchor(0.0, cy, hx, hy, (1.0, 0.0))},
        size_cm=68.0)


def _build_axe(rng: np.random.Generator) -> ObjectModel:
    hw = rng.uniform(0.024, 0.034)
    bend = rng.uniform(-0.03, 0.03)
    ys = np.linspace(-0.46, 0.47, 14)
    xs = bend * np.sin(np.pi * (ys + 0.5))
    handle = np.concatenate([np.stack([xs + hw, ys], 1),
                             _ellipse(xs[-1], 0.47, hw * 1.4, hw * 1.0, 0, 180, 8),
                             np.stack([xs - hw, ys], 1)[::-1]])
    bl = rng.uniform(0.21, 0.3)
    fl = rng.uniform(0.03, 0.08)
    ht = -0.5
    hb = ht + rng.uniform(0.12, 0.16)
    edge = _bezier((bl, ht - fl * 0.6), (bl + 0.05, (ht + hb) / 2), (bl, hb + fl), 12)
    blade = np.concatenate([[(0.03, ht + 0.01), (bl * 0.55, ht + 0.02)], edge,
                            [(bl * 0.55, hb - 0.02), (0.03, hb - 0.01)]])
    eye = _rrect(-0.05, ht, 0.05, hb, 0.012)
    poll = _rrect(-0.1, ht + 0.02, -0.04, hb - 0.02, 0.01)
    head_col = _metal(rng) if rng.random() < 0.6 else _jitter(rng, (40, 40, 170), 25)
    parts = [
        Part('handle', [handle], _wood(rng), axis=(bend * 0.5, hw * 1.2),
             pattern=_pat_grain(14.0, 0.08, rng.uniform(0, 6))),
        Part('blade', [blade, eye, poll], head_col, shade='cylv',
             axis=((ht + hb) / 2, (hb - ht) * 0.9), gloss=0.35,
             pattern=_pat_bevel('u', bl - 0.05, 1.0, 1.25)),
    ]
    return ObjectModel(
        'axe', parts,
        regions={'handle': [('handle', {'y': (hb, 1.0)})],
                 'blade': [('blade', {'x': (0.02, 1.0)})], 'head': [('blade', None)]},
        anchors={'handle': Anchor(0.0, rng.uniform(0.15, 0.35), hw, 0.15, (1.0, 0.0)),
                 'blade': Anchor(bl * 0.7, (ht + hb) / 2, bl * 0.35, (hb - ht) / 2 + fl,
                                 (1.0, 0.0))},
        size_cm=70.0)


def _build_toothbrush(rng: np.random.Generator) -> ObjectModel:
    hw = rng.uniform(0.03, 0.045)
    yn = rng.uniform(-0.3, -0.24)
    yh = -0.36
    handle = np.concatenate([
        [(-hw * 0.5, yh + 0.01), (hw * 0.5, yh + 0.01)],
        _bezier((hw * 0.5, yh + 0.01), (hw * 0.55, yn), (hw, yn + 0.08), 6),
        [(hw, 0.5 - hw)], _ellipse(0, 0.5 - hw, hw, hw, 0, 180, 8), [(-hw, yn + 0.08)],
        _bezier((-hw, yn + 0.08), (-hw * 0.55, yn), (-hw * 0.5, yh + 0.01), 6)])
    head = _rrect(-hw * 0.8, -0.5, hw * 0.8, yh + 0.02, hw * 0.6)
    bl = rng.uniform(0.05, 0.08)
    bris = _rrect(hw * 0.55, -0.49, hw * 0.55 + bl, yh - 0.005, 0.006)
    hcol = _plastic(rng)
    b1 = _jitter(rng, (245, 245, 245), 8)
    b2 = _rand_color(rng, (0.4, 0.9), (0.7, 1.0))
    parts = [
        Part('bristles', [bris], b1, shade='flat', axis=(-0.43, 0.08), gloss=0.0, outline=0.3,
             pattern=_chain(_pat_stripes('v', 0.022, 0.5, b2, mix=0.8),
                            _pat_stripes('v', 0.011, 0.35, _scale_color(b1, 0.75), mix=0.6))),
        Part('head', [head], hcol, axis=(0.0, hw * 0.8)),
        Part('handle', [handle], hcol, axis=(0.0, hw),
             pattern=_pat_band('v', rng.uniform(0.0, 0.15), rng.uniform(0.3, 0.4),
                               _rand_color(rng, (0.3, 0.8), (0.6, 0.95)))),
    ]
    return ObjectModel(
        'toothbrush', parts,
        regions={'bristles': [('bristles', None), ('head', None)],
                 'handle': [('handle', {'y': (yn, 1.0)})]},
        anchors={'handle': Anchor(0.0, rng.uniform(0.15, 0.3), hw, 0.15, (1.0, 0.0)),
                 'bristles': Anchor(hw * 0.55 + bl / 2, (yh - 0.5) / 2, bl / 2, (yh + 0.5) / 2,
                                    (1.0, 0.0))},
        size_cm=18.0)


def _build_fork(rng: np.random.Generator) -> ObjectModel:
    hw = rng.uniform(0.032, 0.048)
    tw = rng.uniform(0.055, 0.08)
    ntines = 4 if rng.random() < 0.7 else 3
    handle = np.concatenate([
        [(-hw * 0.35, -0.2), (hw * 0.35, -0.2), (hw * 0.55, 0.0), (hw, 0.5 - hw)],
        _ellipse(0, 0.5 - hw, hw, hw, 0, 180, 8), [(-hw, 0.5 - hw), (-hw * 0.55, 0.0)]])
    palm = np.concatenate([[(-hw * 0.4, -0.19), (hw * 0.4, -0.19)],
                           _bezier((hw * 0.4, -0.19), (tw, -0.22), (tw, -0.31), 6),
                           _bezier((-tw, -0.31), (-tw, -0.22), (-hw * 0.4, -0.19), 6)])
    tines = []
    gap = 2 * tw / (2 * ntines - 1)
    for i in range(ntines):
        x0 = -tw + 2 * i * gap
        tines.append(_poly((x0, -0.3), (x0 + gap, -0.3), (x0 + gap, -0.47),
                           (x0 + gap * 0.5, -0.5), (x0, -0.47)))
    metal = _metal(rng)
    hcol = metal if rng.random() < 0.7 else _plastic(rng)
    parts = [
        Part('tines', tines + [palm], metal, axis=(0.0, tw), gloss=0.4),
        Part('handle', [handle], hcol, axis=(0.0, hw), gloss=0.35),
    ]
    return ObjectModel(
        'fork', parts,
        regions={'tines': [('tines', None)], 'handle': [('handle', {'y': (-0.1, 1.0)})]},
        anchors={'handle': Anchor(0.0, rng.uniform(0.2, 0.3), hw, 0.2, (1.0, 0.0)),
                 'tines': Anchor(0.0, -0.42, tw, 0.1, (0.0, -1.0))},
        size_cm=19.0)


OBJECT_BUILDERS: dict[str, Callable[[np.random.Generator], ObjectModel]] = {
    'knife': _build_knife, 'cup': _build_cup, 'bottle': _build_bottle, 'hammer': _build_hammer,
    'scissors': _build_scissors, 'wine_glass': _build_wine_glass,
    'tennis_racket': _build_tennis_racket, 'axe': _build_axe, 'toothbrush': _build_toothbrush,
    'fork': _build_fork,
}


def build_object(name: str, rng: np.random.Generator | int | None = None) -> ObjectModel:
    """A random instance (proportions, colours, decoration) of object category ``name``.

    Args:
        name: one of :data:`SYNTH_OBJECTS` (official AGD20K object names).
        rng: generator or integer seed (None: seed 0).
    """
    if name not in OBJECT_BUILDERS:
        raise ValueError(f"AGD-Synth cannot draw '{name}'; known objects: "
                         f"{', '.join(SYNTH_OBJECTS)}")
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(0 if rng is None else rng)
    return OBJECT_BUILDERS[name](rng)


# ================================================================================================
# rendering


@dataclass
class ObjectRender:
    """Result of :func:`render_object`: the model, its pose and visible part masks.

    Attributes:
        model: the drawn instance.
        pose: its placement.
        parts: part name -> (H, W) bool mask of the visible pixels of that part.
        mask: (H, W) bool union of all parts.
    """

    model: ObjectModel
    pose: Pose
    parts: dict[str, np.ndarray]
    mask: np.ndarray

    def region(self, name: str) -> np.ndarray:
        """(H, W) bool visible mask of a named region (or part) of the object."""
        terms = self.model.regions.get(name)
        if terms is None:
            if name not in self.parts:
                raise ValueError(f"'{self.model.name}' has no region or part '{name}'; known: "
                                 f"{', '.join(sorted(set(self.model.regions) | set(self.parts)))}")
            return self.parts[name].copy()
        out = np.zeros_like(self.mask)
        inv = np.linalg.inv(np.concatenate([self.pose.matrix(), [[0, 0, 1]]]))[:2]
        for part, clip in terms:
            m = self.parts.get(part)
            if m is None:
                continue
            if not clip:
                out |= m
                continue
            ys, xs = np.nonzero(m)
            loc = np.stack([xs, ys], 1).astype(np.float64) @ inv[:, :2].T + inv[:, 2]
            keep = np.ones(len(xs), bool)
            for ax, (lo, hi) in clip.items():
                c = loc[:, 0 if ax == 'x' else 1]
                keep &= (c >= lo) & (c <= hi)
            out[ys[keep], xs[keep]] = True
        return out


def _shade(part: Part, u: np.ndarray, v: np.ndarray, side: float) -> np.ndarray:
    """Shaded colour (h, w, 3) float32 of ``part`` at local coordinates (u, v)."""
    base = np.asarray(part.color, np.float32)
    spec: np.ndarray | float = 0.0
    if part.shade in ('cyl', 'cylv'):
        coord, other = (u, v) if part.shade == 'cyl' else (v, u)
        c, hw = part.axis
        hw = hw(other) if callable(hw) else hw
        t = np.clip((coord - c) / np.maximum(hw, 1e-6), -1.0, 1.0)
        b = 0.55 + 0.45 * np.sqrt(1.0 - t * t)
        spec = np.exp(-(((t - 0.4 * side) / 0.18) ** 2)) * part.gloss
    elif part.shade == 'dome':
        cu, cv, ru, rv = part.axis
        du, dv = (u - cu) / ru, (v - cv) / rv
        b = 0.6 + 0.4 * np.sqrt(np.clip(1.0 - du * du - dv * dv, 0.0, 1.0))
        spec = np.exp(-((du - 0.35 * side) ** 2 + (dv + 0.35) ** 2) / 0.04) * part.gloss
    else:
        c, hw = part.axis
        hw = hw(u) if callable(hw) else hw
        t = np.clip((v - c) / max(float(np.mean(hw)), 1e-6), -1.0, 1.0)
        b = 1.0 - 0.12 * t * side
    col = base * b[..., None].astype(np.float32)
    if not isinstance(spec, float):
        col = col + (255.0 * 0.55) * spec[..., None].astype(np.float32)
    return col


def _fill_mask(shape: tuple[int, int], polys: Iterable[np.ndarray], holes: Iterable[np.ndarray],
               offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Anti-aliased uint8 coverage (0..255) of polygons minus holes (canvas pixel coords)."""
    m = np.zeros(shape, np.uint8)
    off = np.asarray(offset, np.float64)
    fix = [np.round((p - off) * 16).astype(np.int32) for p in polys]
    if fix:
        cv2.fillPoly(m, fix, 255, cv2.LINE_AA, 4)
    hfix = [np.round((p - off) * 16).astype(np.int32) for p in holes]
    if hfix:
        cv2.fillPoly(m, hfix, 0, cv2.LINE_AA, 4)
    return m


def render_object(canvas: np.ndarray, obj: ObjectModel | str, pose: Pose,
                  rng: np.random.Generator | int | None = None, *, opacity: float = 1.0,
                  light_side: float = 1.0, masks: bool = True) -> ObjectRender:
    """Draw an object with shading and outlines onto ``canvas`` (in place) at ``pose``.

    Usable on any canvas (e.g. to build RGB-D scenes: the returned masks give the pixels of each
    part; depth can be painted from them).

    Args:
        canvas: (H, W, 3) uint8 BGR image, modified in place.
        obj: an :class:`ObjectModel` or an object name (then built with ``rng``).
        pose: placement (centre, pixels per unit, angle, mirror).
        rng: generator or seed used when ``obj`` is a name.
        opacity: global opacity in (0, 1] (ghost copies).
        light_side: +1 or -1, side of the specular highlight.
        masks: compute the visible part masks (False: return empty dicts, faster).

    Returns:
        :class:`ObjectRender` with (H, W) bool masks per part and for the whole object.
    """
    if canvas.ndim != 3 or canvas.shape[2] != 3 or canvas.dtype != np.uint8:
        raise ValueError(f'canvas must be an (H, W, 3) uint8 image, got {canvas.shape} '
                         f'{canvas.dtype}')
    model = obj if isinstance(obj, ObjectModel) else build_object(obj, rng)
    h, w = canvas.shape[:2]
    m = pose.matrix()
    lin, t = m[:, :2], m[:, 2]
    inv = np.linalg.inv(lin)
    px = max(1.0, pose.scale / 150.0)
    layers: list[tuple[str, np.ndarray | None, tuple[int, int, int, int]]] = []
    for part in model.parts:
        polys = [pose.apply(p) for p in part.polys]
        holes = [pose.apply(p) for p in part.holes]
        allp = np.concatenate(polys)
        x0 = int(max(0, math.floor(allp[:, 0].min()) - 2))
        y0 = int(max(0, math.floor(allp[:, 1].min()) - 2))
        x1 = int(min(w, math.ceil(allp[:, 0].max()) + 3))
        y1 = int(min(h, math.ceil(allp[:, 1].max()) + 3))
        if x1 <= x0 or y1 <= y0:
            layers.append((part.name, None, (0, 0, 0, 0)))
            continue
        cov = _fill_mask((y1 - y0, x1 - x0), polys, holes, (x0, y0))
        gx = np.arange(x0, x1, dtype=np.float64)[None, :] - t[0]
        gy = np.arange(y0, y1, dtype=np.float64)[:, None] - t[1]
        loc_u = inv[0, 0] * gx + inv[0, 1] * gy
        loc_v = inv[1, 0] * gx + inv[1, 1] * gy
        col = _shade(part, loc_u, loc_v, light_side)
        a = cov.astype(np.float32) * (part.alpha * opacity / 255.0)
        if part.pattern is not None:
            col, a = part.pattern(loc_u, loc_v, col, a)
        a3 = a[..., None]
        reg = canvas[y0:y1, x0:x1].astype(np.float32)
        canvas[y0:y1, x0:x1] = np.clip(reg * (1.0 - a3) + col * a3 + 0.5, 0, 255).astype(np.uint8)
        if part.outline > 0 and opacity > 0.5:
            oc = _scale_color(part.color, 1.0 - part.outline)
            cv2.polylines(canvas, [np.round(p * 16).astype(np.int32) for p in polys + holes],
                          True, oc, int(round(px)), cv2.LINE_AA, 4)
        layers.append((part.name, cov >= 128, (x0, y0, x1, y1)))
    parts: dict[str, np.ndarray] = {}
    occupied = np.zeros((h, w), bool)
    if masks:
        for name in model.part_names():
            parts[name] = np.zeros((h, w), bool)
        for name, cov, (x0, y0, x1, y1) in reversed(layers):
            if cov is None:
                continue
            occ = occupied[y0:y1, x0:x1]
            parts[name][y0:y1, x0:x1] |= cov & ~occ
            occ |= cov
    return ObjectRender(model, pose, parts, occupied)


def object_extent(model: ObjectModel, pose: Pose) -> tuple[float, float, float, float]:
    """Canvas bounding box (x0, y0, x1, y1) of the object at ``pose``."""
    p = pose.apply(model.points())
    return float(p[:, 0].min()), float(p[:, 1].min()), float(p[:, 0].max()), float(p[:, 1].max())


def _anchor(model: ObjectModel, pose: Pose, name: str) -> dict[str, Any]:
    """Anchor of ``model`` in canvas terms: point, axis d, normal n, half width / length (px)."""
    a = model.anchors[name]
    return {'p': pose.apply(np.array([[a.x, a.y]]))[0], 'd': pose.vector((0.0, 1.0)),
            'n': pose.vector(a.normal), 'x': pose.vector((1.0, 0.0)),
            'half_w': a.half_w * pose.scale, 'half_len': a.half_len * pose.scale}


# ------------------------------------------------------------------------------------ backgrounds


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Varied background (h, w, 3) uint8: gradient, stripes, tiles, wood, noise or wall+table."""
    kind = int(rng.integers(6))
    c1 = np.asarray(_rand_color(rng, (0.0, 0.6), (0.25, 0.95)), np.float32)
    c2 = np.asarray(_rand_color(rng, (0.0, 0.6), (0.25, 0.95)), np.float32)
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    th = rng.uniform(0, 2 * math.pi)
    proj = xx * np.float32(math.cos(th)) + yy * np.float32(math.sin(th))
    if kind == 0:                                     # linear gradient
        t = (proj - proj.min()) / (np.ptp(proj) + 1e-6)
    elif kind == 1:                                   # stripes
        period = rng.uniform(10, 60)
        t = 0.5 + 0.5 * np.sin(2 * math.pi * proj / period + rng.uniform(0, 6))
        t = np.clip((t - 0.5) * rng.uniform(1, 5) + 0.5, 0, 1)
    elif kind == 2:                                   # tiles with grout
        s = rng.uniform(20, 70)
        t = ((np.floor(xx / s) + np.floor(yy / s)) % 2) * np.float32(rng.uniform(0.2, 0.7))
        grout = (np.minimum(xx % s, yy % s) < max(1.0, s * 0.05))
        t = np.where(grout, np.float32(1.0), t)
    elif kind == 3:                                   # wood planks
        ph = rng.uniform(25, 80)
        plank = np.floor(yy / ph)
        jitter = np.sin(plank * 12.9898 + rng.uniform(0, 6)) * 0.5 + 0.5
        grain = np.sin(xx * rng.uniform(0.02, 0.08) + np.sin(yy * 0.15 + plank) * 2.0)
        t = 0.35 * jitter + 0.15 * grain + 0.25
        t = np.where((yy % ph) < 1.5, np.float32(0.0), t)
        c1 = np.asarray(_wood(rng), np.float32) * 0.7
        c2 = np.asarray(_wood(rng), np.float32) * 1.15
    else:                                             # smooth noise (marble / fabric), wall+table
        k = int(rng.integers(6, 24))
        small = rng.random((max(2, h // k), max(2, w // k)), dtype=np.float32)
        t = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
        t = np.clip(t, 0, 1)
        if kind == 5:
            horizon = h * rng.uniform(0.25, 0.7)
            t = np.where(yy > horizon, 0.6 + 0.4 * t, 0.25 * yy / np.float32(horizon))
    t = np.broadcast_to(t, (h, w)).astype(np.float32)[..., None]
    img = c1 + (c2 - c1) * t
    return np.clip(img, 0, 255).astype(np.uint8)


_EGO_PLAIN_P = 0.45            # share of plain 'product photo' egocentric backdrops
_EGO_CONTRAST = (0.35, 0.9)    # contrast kept from the textured backdrops
_EGO_SCALE = (0.42, 0.78)      # object height / shorter image side (egocentric)


def _ego_background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Egocentric backdrop: often a plain 'product photo' gradient, else a toned-down texture.

    Both come with a few distractor shapes; contrast is lower than in exocentric scenes, as in
    AGD20K where egocentric images are mostly object-centric photos.
    """
    if rng.random() < _EGO_PLAIN_P:
        hue = rng.random()
        c1 = np.asarray(_hsv(hue, rng.uniform(0, 0.25), rng.uniform(0.72, 1.0)), np.float32)
        c2 = np.asarray(_hsv(hue + rng.uniform(-0.1, 0.1), rng.uniform(0, 0.3),
                             rng.uniform(0.5, 0.95)), np.float32)
        t = (np.arange(h, dtype=np.float32) / h) ** np.float32(rng.uniform(0.5, 2.0))
        img = np.broadcast_to((c1 + (c2 - c1) * t[:, None])[:, None, :], (h, w, 3))
        canvas = np.clip(img + 0.5, 0, 255).astype(np.uint8)
        _clutter(canvas, rng, int(rng.integers(0, 3)), alpha=(0.2, 0.6))
    else:
        img = _background(rng, h, w).astype(np.float32)
        mean = img.mean((0, 1))
        img = mean + (img - mean) * np.float32(rng.uniform(*_EGO_CONTRAST))
        canvas = np.clip(img + 0.5, 0, 255).astype(np.uint8)
        _clutter(canvas, rng, int(rng.integers(0, 5)), alpha=(0.3, 0.9))
    return canvas


def _clutter(canvas: np.ndarray, rng: np.random.Generator, n: int,
             alpha: tuple[float, float] = (0.35, 1.0)) -> None:
    """Draw ``n`` random distractor shapes (ellipses, boxes, polygons, strokes, soft blobs)."""
    h, w = canvas.shape[:2]
    dim = min(h, w)
    for _ in range(n):
        kind = int(rng.integers(5))
        col = _rand_color(rng, (0.0, 0.9), (0.15, 0.95))
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        size = rng.uniform(0.05, 0.25) * dim
        layer = canvas.copy()
        if kind == 0:
            cv2.ellipse(layer, (int(cx), int(cy)), (int(size), int(size * rng.uniform(0.3, 1))),
                        rng.uniform(0, 180), 0, 360, col, -1, cv2.LINE_AA)
        elif kind == 1:
            box = cv2.boxPoints(((cx, cy), (size * 1.5, size * rng.uniform(0.2, 1.0)),
                                 rng.uniform(0, 180)))
            cv2.fillPoly(layer, [np.round(box * 16).astype(np.int32)], col, cv2.LINE_AA, 4)
        elif kind == 2:
            k = int(rng.integers(3, 7))
            ang = np.sort(rng.uniform(0, 2 * math.pi, k))
            rad = size * rng.uniform(0.4, 1.0, k)
            pts = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1)
            cv2.fillPoly(layer, [np.round(pts * 16).astype(np.int32)], col, cv2.LINE_AA, 4)
        elif kind == 3:
            p2 = (cx + rng.uniform(-2, 2) * size, cy + rng.uniform(-2, 2) * size)
            cv2.line(layer, (int(cx), int(cy)), (int(p2[0]), int(p2[1])), col,
                     int(rng.integers(2, 9)), cv2.LINE_AA)
        else:                                      # soft blob, blurred in its own box
            a = rng.uniform(*alpha)
            r = int(size * 1.9) + 2
            x0, y0 = max(0, int(cx) - r), max(0, int(cy) - r)
            x1, y1 = min(w, int(cx) + r + 1), min(h, int(cy) + r + 1)
            if x1 <= x0 or y1 <= y0:
                continue
            m = np.zeros((y1 - y0, x1 - x0), np.float32)
            cv2.circle(m, (int(cx) - x0, int(cy) - y0), int(size), 1.0, -1)
            m = cv2.GaussianBlur(m, (0, 0), size * 0.3)[..., None] * np.float32(a)
            reg = canvas[y0:y1, x0:x1].astype(np.float32)
            canvas[y0:y1, x0:x1] = (reg + (np.asarray(col, np.float32) - reg) * m + 0.5).astype(
                np.uint8)
            continue
        a = rng.uniform(*alpha)
        cv2.addWeighted(layer, a, canvas, 1 - a, 0, dst=canvas)


def _shadow(canvas: np.ndarray, model: ObjectModel, pose: Pose, rng: np.random.Generator) -> None:
    """Soft drop shadow of the object silhouette, offset and blurred."""
    h, w = canvas.shape[:2]
    off = rng.uniform(-0.06, 0.06, 2) * pose.scale
    sigma = max(1.0, pose.scale * rng.uniform(0.01, 0.04))
    k = rng.uniform(0.2, 0.45)
    polys = [pose.apply(p) + off for part in model.parts for p in part.polys]
    allp = np.concatenate(polys)
    pad = int(3 * sigma) + 2
    x0, y0 = max(0, int(allp[:, 0].min()) - pad), max(0, int(allp[:, 1].min()) - pad)
    x1, y1 = min(w, int(allp[:, 0].max()) + pad + 1), min(h, int(allp[:, 1].max()) + pad + 1)
    if x1 <= x0 or y1 <= y0:
        return
    sil = _fill_mask((y1 - y0, x1 - x0), polys, [], (x0, y0)).astype(np.float32) / 255.0
    sil = cv2.GaussianBlur(sil, (0, 0), sigma)
    reg = canvas[y0:y1, x0:x1].astype(np.float32)
    canvas[y0:y1, x0:x1] = (reg * (1 - k * sil[..., None]) + 0.5).astype(np.uint8)


def _finish(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Global lighting (gradient / vignette), white balance, sensor noise, optional blur."""
    h, w = img.shape[:2]
    yy = (np.arange(h, dtype=np.float32)[:, None] - h / 2)
    xx = (np.arange(w, dtype=np.float32)[None, :] - w / 2)
    th = rng.uniform(0, 2 * math.pi)
    g = (xx * np.float32(math.cos(th)) + yy * np.float32(math.sin(th))) / np.float32(max(h, w))
    light = 1.0 + np.float32(rng.uniform(0.0, 0.35)) * g
    r2 = (xx / np.float32(w)) ** 2 + (yy / np.float32(h)) ** 2
    light = light * (1.0 - np.float32(rng.uniform(0.0, 0.5)) * r2)
    wb = rng.uniform(0.9, 1.1, 3).astype(np.float32) * np.float32(rng.uniform(0.85, 1.12))
    bias = np.float32(rng.uniform(-12, 12))
    if rng.random() < 0.25:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 1.1))
    noise = rng.standard_normal((h // 2 + 1, w // 2 + 1, 3), dtype=np.float32)
    noise *= np.float32(rng.uniform(1.0, 5.0))
    noise += bias + np.float32(0.5)
    noise = cv2.resize(noise, (w, h), interpolation=cv2.INTER_NEAREST)
    f = img.astype(np.float32)
    f *= light[..., None]
    f *= wb
    f += noise
    np.clip(f, 0, 255, out=f)
    return f.astype(np.uint8)


# ------------------------------------------------------------------------------------------ hands


@dataclass
class _Hand:
    palm: tuple[tuple[float, float], tuple[float, float], float]   # centre, axes, angle (deg)
    fingers: list[tuple[np.ndarray, np.ndarray, float]]            # p0, p1, thickness
    thumb: tuple[np.ndarray, np.ndarray, float]
    arm: np.ndarray                                                # polygon
    sleeve: np.ndarray | None
    skin: tuple[float, float, float]
    sleeve_color: tuple[float, float, float]
    body_skin: tuple[float, float, float]        # skin of the face / arm (differs under a glove)


def _rot(v: np.ndarray, deg: float) -> np.ndarray:
    a = math.radians(deg)
    c, s = math.cos(a), math.sin(a)
    return np.array([c * v[0] - s * v[1], s * v[0] + c * v[1]])


def _plan_hand(rng: np.random.Generator, anchor: dict[str, Any], k: float, diag: float,
               side: float, skin: tuple[float, float, float] | None = None) -> _Hand:
    """Geometry of a hand grasping the anchor (palm on the ``side`` of the part, fingers across).

    ``k`` is pixels per centimetre (hand width ~8 cm).
    """
    g, d = anchor['p'], anchor['d']
    n = anchor['x'] * side                      # from the part towards the palm
    half_w = anchor['half_w']
    k = k * rng.uniform(0.85, 1.15)
    palm_w, palm_len = 7.5 * k, 8.5 * k
    ft = 1.8 * k
    palm_c = g + n * (half_w + 0.18 * palm_w) + d * rng.uniform(-0.15, 0.15) * palm_len
    palm_ang = math.degrees(math.atan2(d[1], d[0]))
    fingers = []
    for i in range(4):
        off = (i - 1.5) * ft * 1.02 + rng.uniform(-0.1, 0.1) * ft
        p0 = palm_c + d * off - n * palm_w * 0.2
        # fingers cross the part and end just past its far edge (the rest curls behind it)
        reach = float(np.dot(p0 - g, n)) + half_w + ft * rng.uniform(0.2, 0.45)
        length = min(max(reach, ft), 7.5 * k * rng.uniform(0.85, 1.05))
        p1 = p0 - n * length + d * rng.uniform(-0.2, 0.2) * ft
        fingers.append((p0, p1, ft * rng.uniform(0.9, 1.05)))
    tdir = _rot(-d if rng.random() < 0.5 else d, rng.uniform(-25, 25))
    t0 = palm_c + tdir * palm_len * 0.3 - n * palm_w * 0.1
    thumb = (t0, t0 + tdir * 6.0 * k * rng.uniform(0.8, 1.0), ft * 1.15)
    adir = _rot(n, rng.uniform(-35, 35))
    wrist = palm_c + adir * palm_w * 0.45
    far = wrist + adir * diag * 1.5
    arm = _stroke(wrist, far, palm_w * 0.4, palm_w * 0.55)
    sleeve = None
    if rng.random() < 0.8:
        s0 = wrist + adir * rng.uniform(0.25, 1.2) * 25.0 * k
        sleeve = _stroke(s0, far, palm_w * 0.62, palm_w * 0.8)
    body_skin = _jitter(rng, _SKINS[rng.integers(len(_SKINS))], 12)
    if skin is None:
        skin = _rand_color(rng, (0.5, 0.9), (0.3, 0.9)) if rng.random() < 0.1 else body_skin
    return _Hand(((float(palm_c[0]), float(palm_c[1])), (palm_len * 0.5, palm_w * 0.48),
                  palm_ang), fingers, thumb, arm, sleeve, skin, _rand_color(rng), body_skin)


def _i16(pts: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(pts, np.float64) * 16).astype(np.int32)


def _draw_hand_back(canvas: np.ndarray, hand: _Hand) -> np.ndarray:
    """Arm, sleeve and palm (drawn behind the object); returns their (H, W) bool mask."""
    mask = np.zeros(canvas.shape[:2], np.uint8)
    dark = _scale_color(hand.skin, 0.6)
    for img, col, dcol in ((canvas, hand.skin, dark), (mask, 255, 255)):
        cv2.fillPoly(img, [_i16(hand.arm)], col, cv2.LINE_AA, 4)
        cv2.polylines(img, [_i16(hand.arm)], True, dcol, 2, cv2.LINE_AA, 4)
        if hand.sleeve is not None:
            sc = hand.sleeve_color if img is canvas else 255
            cv2.fillPoly(img, [_i16(hand.sleeve)], sc, cv2.LINE_AA, 4)
            cv2.polylines(img, [_i16(hand.sleeve)], True,
                          _scale_color(hand.sleeve_color, 0.6) if img is canvas else 255, 2,
                          cv2.LINE_AA, 4)
        (cx, cy), (ax, ay), ang = hand.palm
        cv2.ellipse(img, (int(cx * 16), int(cy * 16)), (int(ax * 16), int(ay * 16)), ang, 0, 360,
                    col, -1, cv2.LINE_AA, 4)
        cv2.ellipse(img, (int(cx * 16), int(cy * 16)), (int(ax * 16), int(ay * 16)), ang, 0, 360,
                    dcol, 2, cv2.LINE_AA, 4)
    return mask >= 128


def _draw_hand_front(canvas: np.ndarray, hand: _Hand) -> np.ndarray:
    """Fingers and thumb (drawn over the object); returns their (H, W) bool mask."""
    mask = np.zeros(canvas.shape[:2], np.uint8)
    dark = _scale_color(hand.skin, 0.55)
    light = _scale_color(hand.skin, 1.12)
    nail = _scale_color(np.asarray(hand.skin) * 0.6 + np.array([200, 205, 235]) * 0.4, 1.0)
    for p0, p1, th in hand.fingers + [hand.thumb]:
        a, b = (int(p0[0] * 16), int(p0[1] * 16)), (int(p1[0] * 16), int(p1[1] * 16))
        t = max(2, int(round(th)))
        cv2.line(canvas, a, b, dark, t + 2, cv2.LINE_AA, 4)
        cv2.line(mask, a, b, 255, t + 2, cv2.LINE_AA, 4)
    for p0, p1, th in hand.fingers + [hand.thumb]:
        a, b = (int(p0[0] * 16), int(p0[1] * 16)), (int(p1[0] * 16), int(p1[1] * 16))
        t = max(2, int(round(th)))
        cv2.line(canvas, a, b, hand.skin, t, cv2.LINE_AA, 4)
        dv = (p1 - p0) / (np.linalg.norm(p1 - p0) + 1e-9)
        nv = np.array([-dv[1], dv[0]])
        q0, q1 = p0 + nv * th * 0.22, p1 - dv * th * 0.5 + nv * th * 0.22
        cv2.line(canvas, (int(q0[0] * 16), int(q0[1] * 16)), (int(q1[0] * 16), int(q1[1] * 16)),
                 light, max(1, t // 4), cv2.LINE_AA, 4)
        tip = p1 - dv * th * 0.22
        cv2.ellipse(canvas, (int(tip[0] * 16), int(tip[1] * 16)),
                    (int(th * 0.28 * 16), int(th * 0.22 * 16)),
                    math.degrees(math.atan2(dv[1], dv[0])), 0, 360, nail, -1, cv2.LINE_AA, 4)
        knuck = p0 + (p1 - p0) * 0.55
        e0, e1 = knuck + nv * th * 0.3, knuck - nv * th * 0.3
        cv2.line(canvas, (int(e0[0] * 16), int(e0[1] * 16)), (int(e1[0] * 16), int(e1[1] * 16)),
                 dark, 1, cv2.LINE_AA, 4)
    return mask >= 128


# ------------------------------------------------------------------------------------------ props


def _prop_food(rng: np.random.Generator) -> ObjectModel:
    """A piece of food (bread, tomato, carrot, cheese, meatball, cucumber), unit size ~1."""
    kind = int(rng.integers(6))
    if kind == 0:
        crust = _jitter(rng, (60, 130, 200), 15)
        parts = [Part('food', [_rrect(-0.5, -0.3, 0.5, 0.3, 0.18)], crust, shade='dome',
                      axis=(0, 0, 0.5, 0.3)),
                 Part('food', [_rrect(-0.42, -0.22, 0.42, 0.24, 0.14)],
                      _jitter(rng, (170, 215, 240), 10), shade='flat', axis=(0, 0.3),
                      outline=0.15)]
    elif kind == 1:
        red = _jitter(rng, (40, 50, 210), 20)
        parts = [Part('food', [_ellipse(0, 0, 0.45, 0.4, n=28)], red, shade='dome',
                      axis=(0, 0, 0.45, 0.4), gloss=0.5),
                 Part('food', [_poly((0, -0.45), (0.1, -0.3), (0.22, -0.38), (0.05, -0.25),
                                     (-0.2, -0.37), (-0.08, -0.28))], (40, 140, 40),
                      shade='flat', outline=0.3)]
    elif kind == 2:
        parts = [Part('food', [_poly((-0.5, -0.14), (0.45, -0.05), (0.5, 0.0), (0.45, 0.05),
                                     (-0.5, 0.14))], _jitter(rng, (30, 120, 235), 15),
                      shade='cylv', axis=(0.0, 0.14),
                      pattern=_pat_stripes('u', 0.13, 0.08, (20, 80, 170), mix=0.5))]
    elif kind == 3:
        parts = [Part('food', [_poly((-0.45, 0.3), (0.45, 0.3), (0.4, -0.35))],
                      _jitter(rng, (60, 200, 240), 12), shade='flat', axis=(0, 0.3),
                      pattern=_pat_dots(0.22, 0.05, (40, 150, 200)))]
    elif kind == 4:
        parts = [Part('food', [_ellipse(0, 0, 0.4, 0.38, n=24)], _jitter(rng, (40, 70, 120), 15),
                      shade='dome', axis=(0, 0, 0.4, 0.38), gloss=0.3,
                      pattern=_pat_dots(0.12, 0.025, (30, 50, 90)))]
    else:
        parts = [Part('food', [_ellipse(0, 0, 0.42, 0.42, n=28)], _jitter(rng, (60, 130, 50), 15),
                      shade='flat', axis=(0, 0.4)),
                 Part('food', [_ellipse(0, 0, 0.36, 0.36, n=28)],
                      _jitter(rng, (150, 220, 190), 10), shade='dome', axis=(0, 0, 0.36, 0.36),
                      pattern=_pat_dots(0.14, 0.02, (190, 235, 225)))]
    return ObjectModel('food', parts, {}, {})


def _prop_box(rng: np.random.Generator, color: tuple[float, float, float], ratio: float,
              pattern: Pattern | None = None, shade: str = 'flat') -> ObjectModel:
    """A rectangle of height 1 and width ``ratio`` (board, paper, plank, log)."""
    return ObjectModel('box', [Part('box', [_rrect(-ratio / 2, -0.5, ratio / 2, 0.5, 0.03)],
                                    color, shade=shade, axis=(0.0, ratio / 2), pattern=pattern)],
                       {}, {})


def _prop_ball(rng: np.random.Generator) -> ObjectModel:
    col = _jitter(rng, (60, 230, 210), 15)
    seam = _ellipse(0.55, 0, 0.4, 0.45, 120, 240, 12)
    return ObjectModel('ball', [
        Part('ball', [_ellipse(0, 0, 0.5, 0.5, n=28)], col, shade='dome', axis=(0, 0, 0.5, 0.5)),
        Part('ball', [np.concatenate([seam, seam[::-1] + [0.03, 0]])], (235, 240, 240),
             shade='flat', outline=0.0)], {}, {})


def _prop_face(rng: np.random.Generator, skin: tuple[float, float, float]) -> ObjectModel:
    """Cartoon head in profile looking towards local -y, mouth at (0, -0.5); height ~1."""
    hair = _rand_color(rng, (0.2, 0.8), (0.05, 0.45))
    parts = [
        Part('hair', [_ellipse(0, 0.12, 0.44, 0.42, n=28)], hair, shade='flat', axis=(0, 0.4),
             pattern=_pat_stripes('u', 0.06, 0.3, _scale_color(hair, 1.4), mix=0.4)),
        Part('face', [_ellipse(0, -0.05, 0.38, 0.42, n=32)], skin, shade='dome',
             axis=(0, -0.05, 0.38, 0.42), gloss=0.1),
        Part('face', [_ellipse(0.38, 0.02, 0.06, 0.1, n=12)], _scale_color(skin, 0.9),
             shade='flat', outline=0.3),
        Part('face', [_ellipse(-0.16, -0.18, 0.05, 0.035, n=12)], (40, 30, 30), shade='flat',
             outline=0.0),
        Part('face', [_ellipse(0.16, -0.18, 0.05, 0.035, n=12)], (40, 30, 30), shade='flat',
             outline=0.0),
        Part('face', [_poly((0.0, -0.33), (0.05, -0.18), (-0.04, -0.2))],
             _scale_color(skin, 0.85), shade='flat', outline=0.2),
        Part('lips', [_ellipse(0, -0.43, 0.13, 0.055, n=16)], _jitter(rng, (80, 80, 190), 20),
             shade='flat', outline=0.3),
    ]
    return ObjectModel('face', parts, {}, {})


def _prop_teeth(rng: np.random.Generator, skin: tuple[float, float, float]) -> ObjectModel:
    """Open mouth with a row of teeth along local x, width ~1."""
    parts = [Part('mouth', [_ellipse(0, 0, 0.6, 0.45, n=28)], skin, shade='dome',
                  axis=(0, 0, 0.6, 0.45)),
             Part('mouth', [_ellipse(0, 0, 0.48, 0.3, n=28)], _jitter(rng, (70, 70, 180), 15),
                  shade='flat', axis=(0, 0.3)),
             Part('mouth', [_ellipse(0, 0.02, 0.4, 0.2, n=24)], (40, 30, 90), shade='flat')]
    teeth = [_rrect(-0.36 + 0.12 * i, -0.14, -0.26 + 0.12 * i, 0.02, 0.03) for i in range(6)]
    parts.append(Part('mouth', teeth, (235, 245, 250), shade='flat', axis=(0, 0.2), outline=0.3))
    return ObjectModel('teeth', parts, {}, {})


def _prop_receptacle(rng: np.random.Generator) -> ObjectModel:
    """A glass / bowl seen from the side, width 1, opening at local y=-0.5."""
    col = _rand_color(rng, (0.0, 0.7), (0.5, 0.95))
    t = np.linspace(0, math.pi, 16)
    deep = rng.uniform(0.6, 1.0)
    bowl = np.concatenate([np.stack([0.5 * np.cos(t), -0.5 + deep * np.sin(t)], 1),
                           _ellipse(0, -0.5, 0.5, 0.1, 180, 360, 12)])
    return ObjectModel('receptacle', [
        Part('r', [bowl], col, axis=(0.0, 0.5), gloss=0.3),
        Part('r', [_ellipse(0, -0.5, 0.46, 0.08, n=20)], _scale_color(col, 0.5), shade='flat')],
        {}, {})


def _prop_log(rng: np.random.Generator) -> ObjectModel:
    bark = _jitter(rng, (40, 70, 100), 12)
    return ObjectModel('log', [
        Part('log', [_rrect(-0.5, -0.25, 0.5, 0.25, 0.08)], bark, shade='cylv', axis=(0.0, 0.25),
             pattern=_pat_grain(6.0, 0.15, rng.uniform(0, 6))),
        Part('log', [_ellipse(0.45, 0, 0.08, 0.25, n=20)], _jitter(rng, (120, 170, 210), 10),
             shade='flat', pattern=_pat_stripes('u', 0.03, 0.3, (80, 120, 160), mix=0.5))],
        {}, {})


def _lines_burst(canvas: np.ndarray, rng: np.random.Generator, c: np.ndarray, r: float,
                 color: tuple[float, float, float]) -> None:
    for _ in range(int(rng.integers(5, 9))):
        a = rng.uniform(0, 2 * math.pi)
        v = np.array([math.cos(a), math.sin(a)])
        p0, p1 = c + v * r * 0.6, c + v * r * rng.uniform(1.1, 1.6)
        cv2.line(canvas, (int(p0[0] * 16), int(p0[1] * 16)), (int(p1[0] * 16), int(p1[1] * 16)),
                 color, 2, cv2.LINE_AA, 4)


# ------------------------------------------------------------------------------------- placement

_ANGLE_ANY = (0.0, 360.0)


def _sample_size(rng: np.random.Generator) -> tuple[int, int]:
    w = int(rng.integers(240, 421))
    h = int(np.clip(round(w * rng.uniform(0.62, 1.3)), 180, 420))
    if h == w:
        h -= 1
    return h, w


def _place(rng: np.random.Generator, model: ObjectModel, h: int, w: int, scale: float,
           angle: float, flip: bool, *, margin: float = 4.0, min_off: float = 0.12,
           tries: int = 10) -> Pose:
    """Random pose inside the canvas, preferring object centres away from the image centre."""
    for _ in range(10):
        x0, y0, x1, y1 = object_extent(model, Pose(0.0, 0.0, scale, angle, flip))
        lo_x, hi_x = margin - x0, w - margin - x1
        lo_y, hi_y = margin - y0, h - margin - y1
        if hi_x >= lo_x and hi_y >= lo_y:
            break
        scale *= 0.85
    else:
        lo_x = hi_x = w / 2
        lo_y = hi_y = h / 2
    diag = math.hypot(w, h)
    best, best_d = None, -1.0
    for _ in range(tries):
        cx, cy = rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)
        bx, by = cx + (x0 + x1) / 2, cy + (y0 + y1) / 2
        dist = math.hypot(bx - w / 2, by - h / 2) / diag
        if dist > best_d:
            best, best_d = (cx, cy), dist
        if dist >= min_off:
            break
    assert best is not None
    return Pose(best[0], best[1], scale, angle, flip)


def _ego_angle(rng: np.random.Generator, obj: str) -> float:
    if obj in _UPRIGHT:      # standing (or lying on its side), never upside down
        if rng.random() < 0.8:
            return rng.uniform(-28, 28)
        return float(rng.choice([-1.0, 1.0])) * rng.uniform(60, 110)
    return rng.uniform(0, 360)


# ================================================================================================
# samples


@dataclass(frozen=True)
class SampleSpec:
    """One image of the dataset: split, role ('exo', 'ego' or 'test'), folder and index."""

    split: str
    role: str
    affordance: str
    obj: str
    index: int

    @property
    def stem(self) -> str:
        return f'{self.obj}_{_ROLE_TAGS[self.role]}_{self.index:05d}'

    def relpath(self) -> str:
        """Path of the image relative to the dataset root."""
        a, b = _ROLE_DIRS[self.role]
        return f'{self.split}/{a}/{b}/{self.affordance}/{self.obj}/{self.stem}.jpg'

    def gt_relpath(self) -> str:
        """Path of the GT heatmap (test role) relative to the dataset root."""
        return f'{self.split}/testset/GT/{self.affordance}/{self.obj}/{self.stem}.png'

    def seed_words(self, seed: int) -> list[int]:
        return [int(seed), _SPLIT_ID[self.split], _ROLE_ID[self.role],
                AFFORDANCES_SEEN.index(self.affordance), OBJECTS.index(self.obj), int(self.index)]


@dataclass
class SynthSample:
    """A rendered image with its generator-side masks.

    Attributes:
        spec: what was rendered.
        image: (H, W, 3) uint8 BGR.
        object_mask: (H, W) bool visible object pixels.
        part_mask: (H, W) bool visible pixels of the affordance region.
        hand_mask: (H, W) bool visible hand / arm pixels (empty for egocentric images).
        gt: (H, W) uint8 heatmap (test role only, else None).
    """

    spec: SampleSpec
    image: np.ndarray
    object_mask: np.ndarray
    part_mask: np.ndarray
    hand_mask: np.ndarray
    gt: np.ndarray | None = None


def sample_rng(spec: SampleSpec, seed: int) -> np.random.Generator:
    """The generator of one image, from (seed, split, role, affordance, object, index) only."""
    return np.random.default_rng(np.random.SeedSequence(spec.seed_words(seed)))


def gt_heatmap(region: np.ndarray) -> np.ndarray:
    """Gaussian-rendered GT of a part mask: (H, W) bool -> (H, W) uint8 with peak 255.

    Sigma grows with the part size: ``clip(0.2 * sqrt(area), 2.5, 0.05 * diagonal)`` pixels.
    """
    area = float(region.sum())
    if area <= 0:
        raise ValueError('the affordance region is empty; cannot render a GT heatmap')
    h, w = region.shape
    sigma = float(np.clip(0.2 * math.sqrt(area), 2.5, 0.05 * math.hypot(h, w)))
    ys, xs = np.nonzero(region)
    pad = int(math.ceil(4 * sigma)) + 1          # OpenCV's kernel reaches ~4 sigma (float)
    x0, y0 = max(0, xs.min() - pad), max(0, ys.min() - pad)
    x1, y1 = min(w, xs.max() + pad + 1), min(h, ys.max() + pad + 1)
    heat = np.zeros((h, w), np.float32)
    sub = region[y0:y1, x0:x1].astype(np.float32)
    heat[y0:y1, x0:x1] = cv2.GaussianBlur(sub, (0, 0), sigma, borderType=cv2.BORDER_CONSTANT)
    return np.clip(np.round(heat * (255.0 / heat.max())), 0, 255).astype(np.uint8)


def _render_ego(rng: np.random.Generator, spec: SampleSpec) -> SynthSample:
    h, w = _sample_size(rng)
    canvas = _ego_background(rng, h, w)
    if rng.random() < 0.4:
        canvas = cv2.GaussianBlur(canvas, (0, 0), rng.uniform(0.6, 2.0))
    model = build_object(spec.obj, rng)
    region_name = AFFORDANCE_PARTS[spec.obj][spec.affordance]
    for _ in range(4):
        scale = rng.uniform(*_EGO_SCALE) * min(h, w)
        pose = _place(rng, model, h, w, scale, _ego_angle(rng, spec.obj), bool(rng.random() < 0.5))
        if rng.random() < 0.6:
            _shadow(canvas, model, pose, rng)
        rend = render_object(canvas, model, pose, light_side=float(rng.choice([-1.0, 1.0])))
        part = rend.region(region_name)
        if part.sum() >= 12:
            break
        canvas = _ego_background(rng, h, w)
    img = _finish(canvas, rng)
    gt = gt_heatmap(part) if spec.role == 'test' else None
    return SynthSample(spec, img, rend.mask, part, np.zeros((h, w), bool), gt)


def _render_exo(rng: np.random.Generator, spec: SampleSpec) -> SynthSample:
    aff, obj = spec.affordance, spec.obj
    h, w = _sample_size(rng)
    diag = math.hypot(w, h)
    canvas = _background(rng, h, w)
    _clutter(canvas, rng, int(rng.integers(0, 5)))
    if rng.random() < 0.4:
        canvas = cv2.GaussianBlur(canvas, (0, 0), rng.uniform(0.6, 2.0))
    model = build_object(obj, rng)
    region_name = AFFORDANCE_PARTS[obj][aff]
    grasp = GRASP_REGION[obj] if aff != 'hold' else region_name
    if grasp not in model.anchors:
        grasp = GRASP_REGION[obj]
    sgn = float(rng.choice([-1.0, 1.0]))
    if aff == 'drink_with':
        angle = sgn * rng.uniform(35, 75)
    elif aff == 'pour':
        angle = sgn * rng.uniform(85, 130)
    elif aff == 'open' or (aff == 'hold' and obj in _UPRIGHT):
        angle = rng.uniform(-25, 25)
    elif aff == 'brush_with':
        angle = sgn * rng.uniform(60, 120)
    else:
        angle = rng.uniform(*_ANGLE_ANY)
    frac = rng.uniform(0.42, 0.72) * (model.size_cm / 25.0) ** 0.3
    scale = min(0.92, frac) * min(h, w)
    pose = _place(rng, model, h, w, scale, angle, bool(rng.random() < 0.5), margin=6.0,
                  min_off=0.0, tries=1)
    k = pose.scale / model.size_cm                           # pixels per centimetre
    side = 1.0 if obj == 'cup' else float(rng.choice([-1.0, 1.0]))
    hand = _plan_hand(rng, _anchor(model, pose, grasp), k, diag, side)
    hands = [hand]
    if aff == 'open':
        hands.append(_plan_hand(rng, _anchor(model, pose, 'cap'), k, diag, -side, hand.skin))
    front_props: list[Callable[[], np.ndarray]] = []
    back = np.zeros((h, w), bool)
    # ---- props behind the object
    act = _anchor(model, pose, region_name) if region_name in model.anchors else None
    if aff in ('cut_with', 'stick') and act is not None:
        if obj == 'scissors':
            paper = _prop_box(rng, _rand_color(rng, (0.0, 0.4), (0.75, 1.0)), rng.uniform(0.6, 1))
            pp = act['p'] - act['d'] * act['half_len'] * 0.9
            render_object(canvas, paper,
                          Pose(pp[0], pp[1], act['half_len'] * 1.8, angle + rng.uniform(-30, 30)),
                          masks=False)
            q0 = act['p'] + act['d'] * act['half_len'] * 0.3
            q1 = act['p'] - act['d'] * act['half_len'] * 2.0
            cv2.line(canvas, (int(q0[0] * 16), int(q0[1] * 16)),
                     (int(q1[0] * 16), int(q1[1] * 16)), (60, 60, 60), 1, cv2.LINE_AA, 4)
        elif obj == 'axe':
            log_len = act['half_len'] * 5.0
            lp = act['p'] + act['n'] * (act['half_w'] + 0.25 * log_len * 0.6)
            render_object(canvas, _prop_log(rng),
                          Pose(lp[0], lp[1], log_len,
                               math.degrees(math.atan2(-act['n'][0], act['n'][1]))),
                          masks=False)
        else:
            food = _prop_food(rng)
            size = max(act['half_len'] * 2.2, act['half_w'] * 4.0)
            if aff == 'cut_with':
                fp = act['p'] + act['n'] * act['half_w'] * 1.3
                if rng.random() < 0.7:
                    bp = fp + act['n'] * size * 0.3
                    render_object(canvas, _prop_box(rng, _wood(rng), 1.6,
                                                    _pat_grain(5.0, 0.08, 1.0)),
                                  Pose(bp[0], bp[1], size * 1.3, rng.uniform(0, 360)),
                                  masks=False)
                render_object(canvas, food, Pose(fp[0], fp[1], size, rng.uniform(0, 360)),
                              masks=False)
            else:
                size = max(size, 3.5 * k)
                fp = act['p'] + act['n'] * size * 0.25

                def _front_food(fp=fp, size=size, food=food) -> np.ndarray:
                    return render_object(canvas, food, Pose(fp[0], fp[1], size,
                                                            rng.uniform(0, 360))).mask
                front_props.append(_front_food)
    elif aff == 'hit' and act is not None:
        if obj == 'hammer':
            c = act['p'] + act['n'] * act['half_w'] * 0.4
            nail_len = act['half_len'] * 2.5
            nd = act['n']
            thick = max(act['half_len'] * 1.5, 0.06 * diag)
            board_p = c + nd * (nail_len * 0.7 + thick / 2)
            bang = math.degrees(math.atan2(nd[1], nd[0]))
            render_object(canvas, _prop_box(rng, _wood(rng), thick / (2 * diag),
                                            _pat_grain(4.0, 0.1, 2.0)),
                          Pose(board_p[0], board_p[1], 2 * diag, bang), masks=False)
            nail = _stroke(c, c + nd * nail_len, max(1.5, act['half_w'] * 0.12))
            cv2.fillPoly(canvas, [_i16(nail)], (150, 150, 155), cv2.LINE_AA, 4)
            cv2.line(canvas, (int((c - act['x'] * act['half_w'] * 0.5)[0] * 16),
                              int((c - act['x'] * act['half_w'] * 0.5)[1] * 16)),
                     (int((c + act['x'] * act['half_w'] * 0.5)[0] * 16),
                      int((c + act['x'] * act['half_w'] * 0.5)[1] * 16)), (120, 120, 125),
                     max(2, int(act['half_w'] * 0.3)), cv2.LINE_AA, 4)
            burst_c, burst_r = c, act['half_w'] * 1.6
        else:
            r = 3.4 * k
            off = (rng.uniform(-0.4, 0.4) * act['half_w'] * act['x']
                   + rng.uniform(-0.4, 0.4) * act['half_len'] * act['d'])
            bc = act['p'] + off
            trail = _rot(act['x'], rng.uniform(-60, 60))
            burst_c, burst_r = bc, r * 1.3

            def _front_ball(bc=bc, r=r, trail=trail) -> np.ndarray:
                ball = _prop_ball(rng)
                for j, a in ((3, 0.15), (2, 0.25), (1, 0.4)):
                    q = bc + trail * r * 1.3 * j
                    render_object(canvas, ball, Pose(q[0], q[1], 2 * r), opacity=a, masks=False)
                return render_object(canvas, ball, Pose(bc[0], bc[1], 2 * r,
                                                        rng.uniform(0, 360))).mask
            front_props.append(_front_ball)
        burst_col = _jitter(rng, (60, 230, 250), 20)
    elif aff in ('drink_with', 'brush_with') and act is not None:
        face_h = 24.0 * k * rng.uniform(0.85, 1.1)
        skin = hand.body_skin
        if aff == 'drink_with':
            up = act['n']
            lateral = act['x'] * rng.choice([-1.0, 1.0]) * act['half_w'] * 0.6
            mouth = act['p'] + up * act['half_len'] * 0.5 + lateral
            fdir = _rot(up, rng.uniform(-25, 25))           # from mouth towards the face centre
            centre = mouth + fdir * face_h * 0.5
            ang = math.degrees(math.atan2(-fdir[0], fdir[1]))  # local -y points back to the mouth
            face = _prop_face(rng, skin)
            render_object(canvas, face, Pose(centre[0], centre[1], face_h, ang))
        else:
            mw = 9.0 * k
            mc = act['p'] + act['n'] * (act['half_w'] + mw * 0.15)
            ang = math.degrees(math.atan2(act['d'][1], act['d'][0]))
            fc = mc + act['n'] * mw * 0.9
            render_object(canvas, _prop_face(rng, skin),
                          Pose(fc[0], fc[1], 2.2 * mw,
                               math.degrees(math.atan2(-act['n'][0], act['n'][1]))),
                          masks=False)
            render_object(canvas, _prop_teeth(rng, skin), Pose(mc[0], mc[1], mw, ang))
    elif aff == 'pour' and act is not None:
        liquid = _jitter(rng, _LIQUIDS[rng.integers(len(_LIQUIDS))], 12)
        start = act['p'] + act['n'] * act['half_len'] * 0.6
        drop = rng.uniform(0.3, 0.55) * h
        end = start + np.array([act['n'][0] * drop * 0.25, drop])
        width = max(2.0, act['half_w'] * rng.uniform(0.25, 0.5))
        rec = _prop_receptacle(rng)
        rw = max(width * 6, 10.0 * k)
        render_object(canvas, rec, Pose(end[0], end[1] + rw * 0.45, rw), masks=False)
        curve = _bezier(start, start + act['n'] * drop * 0.25, end, 16)

        def _front_stream(curve=curve, width=width, liquid=liquid) -> np.ndarray:
            m = np.zeros((h, w), np.uint8)
            cv2.polylines(m, [_i16(curve)], False, 255, int(round(width * 2)), cv2.LINE_AA, 4)
            a = (m.astype(np.float32) / 255.0 * 0.85)[..., None]
            canvas[:] = np.clip(canvas * (1 - a) + np.asarray(liquid, np.float32) * a + 0.5, 0,
                                255).astype(np.uint8)
            return np.zeros((h, w), bool)
        front_props.append(_front_stream)
    elif aff == 'swing':
        g = _anchor(model, pose, grasp)['p']
        step = rng.uniform(12, 28) * rng.choice([-1.0, 1.0])
        far = pose.apply(np.array([[0.0, -0.45]]))[0]
        rad = float(np.linalg.norm(far - g))
        for j, op in ((2, 0.16), (1, 0.3)):
            a = math.radians(step * j)
            rel = np.array([pose.x, pose.y]) - g
            c = g + np.array([rel[0] * math.cos(a) - rel[1] * math.sin(a),
                              rel[0] * math.sin(a) + rel[1] * math.cos(a)])
            render_object(canvas, model, pose.moved(x=c[0], y=c[1], angle=pose.angle + step * j),
                          opacity=op, masks=False)
        base = math.degrees(math.atan2(far[1] - g[1], far[0] - g[0]))
        for dr in (-0.08, 0.0, 0.08):
            a0, a1 = sorted((base, base + step * 2.5))
            cv2.ellipse(canvas, (int(g[0] * 16), int(g[1] * 16)),
                        (int(rad * (1 + dr) * 16), int(rad * (1 + dr) * 16)), 0, a0, a1,
                        (235, 235, 235), 2, cv2.LINE_AA, 4)
    # ---- hands behind, object, front props, fingers
    for hd in hands:
        back |= _draw_hand_back(canvas, hd)
    rend = render_object(canvas, model, pose, light_side=float(rng.choice([-1.0, 1.0])))
    front = np.zeros((h, w), bool)
    for fn in front_props:
        front |= fn()
    fingers = np.zeros((h, w), bool)
    for hd in hands:
        fingers |= _draw_hand_front(canvas, hd)
    if aff == 'hit' and act is not None:
        _lines_burst(canvas, rng, burst_c, burst_r, burst_col)
    if aff == 'brush_with' and act is not None:
        for _ in range(int(rng.integers(6, 14))):
            q = act['p'] + rng.normal(0, 1, 2) * act['half_len'] * 0.6
            cv2.circle(canvas, (int(q[0] * 16), int(q[1] * 16)),
                       int(rng.uniform(1.5, 4.0) * 16), (250, 250, 250), -1, cv2.LINE_AA, 4)
    hand_mask = (back & ~rend.mask & ~front) | fingers
    img = _finish(canvas, rng)
    part = rend.region(region_name) & ~fingers & ~front
    return SynthSample(spec, img, rend.mask & ~fingers & ~front, part, hand_mask, None)


def render_sample(spec: SampleSpec, seed: int = 0) -> SynthSample:
    """Render one image of the dataset (deterministic in ``(seed, spec)``).

    Args:
        spec: the image to render (role 'exo', 'ego' or 'test').
        seed: dataset seed (non-negative integer).

    Returns:
        :class:`SynthSample` with the image, generator masks and (test role) the GT heatmap.
    """
    if spec.role not in _ROLE_ID:
        raise ValueError(f"unknown role '{spec.role}'; expected one of {', '.join(ROLES)}")
    if spec.split not in _SPLIT_ID:
        raise ValueError(f"unknown split '{spec.split}'; expected one of {', '.join(SPLITS)}")
    if spec.obj not in AFFORDANCE_PARTS or spec.affordance not in AFFORDANCE_PARTS[spec.obj]:
        raise ValueError(f"AGD-Synth has no folder '{spec.affordance}/{spec.obj}'")
    rng = sample_rng(spec, seed)
    if spec.role == 'exo':
        return _render_exo(rng, spec)
    return _render_ego(rng, spec)


# ================================================================================================
# dataset plan and writer


def split_folders(split: str, subset: str) -> list[tuple[str, str]]:
    """(affordance, object) folders of ``split`` ('Seen'/'Unseen'), ``subset`` 'train'/'test'.

    Seen uses every object in train and test. Unseen trains on the objects outside
    :data:`UNSEEN_TEST_OBJECTS` and tests on those, with affordances of the Unseen list only.
    Folders are sorted by official class id, then object name.
    """
    if split not in _SPLIT_ID:
        raise ValueError(f"unknown split '{split}'; expected one of {', '.join(SPLITS)}")
    if subset not in ('train', 'test'):
        raise ValueError(f"unknown subset '{subset}'; expected 'train' or 'test'")
    classes = AFFORDANCES_SEEN if split == 'Seen' else AFFORDANCES_UNSEEN
    out = []
    for obj in SYNTH_OBJECTS:
        if split == 'Unseen' and (obj in UNSEEN_TEST_OBJECTS) != (subset == 'test'):
            continue
        for aff in AFFORDANCE_PARTS[obj]:
            if aff in classes:
                out.append((aff, obj))
    return sorted(out, key=lambda t: (classes.index(t[0]), t[1]))


def resolve_size(size: str | int) -> tuple[int, int, int]:
    """Images per folder (exocentric, egocentric train, test) of a size name or integer N.

    An integer N gives N exocentric images per folder, ``max(1, round(N / 3))`` egocentric
    training images and ``max(1, round(N * 5 / 17))`` test images.
    """
    if isinstance(size, str) and not size.strip().lstrip('+').isdigit():
        if size not in SIZES:
            raise ValueError(f"unknown size '{size}'; use 'tiny', 'demo' or a positive integer")
        return SIZES[size]
    if isinstance(size, bool) or not isinstance(size, (int, str, np.integer)):
        raise ValueError(f"size must be 'tiny', 'demo' or a positive integer, got {size!r}")
    n = int(size)
    if not 1 <= n <= MAX_PER_FOLDER:
        raise ValueError(f'size must be between 1 and {MAX_PER_FOLDER} exocentric images per '
                         f'folder, got {n}')
    return n, max(1, round(n / 3)), max(1, round(n * 5 / 17))


def plan(size: str | int = 'tiny', splits: Sequence[str] = SPLITS) -> list[SampleSpec]:
    """Every image of a dataset of ``size``, in writing order."""
    n_exo, n_ego, n_test = resolve_size(size)
    specs = []
    for split in splits:
        if split not in _SPLIT_ID:
            raise ValueError(f"unknown split '{split}'; expected one of {', '.join(SPLITS)}")
        for aff, obj in split_folders(split, 'train'):
            specs += [SampleSpec(split, 'exo', aff, obj, i) for i in range(n_exo)]
            specs += [SampleSpec(split, 'ego', aff, obj, i) for i in range(n_ego)]
        for aff, obj in split_folders(split, 'test'):
            specs += [SampleSpec(split, 'test', aff, obj, i) for i in range(n_test)]
    return specs


def _write(path: Path, img: np.ndarray, params: list[int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), img, params):
        raise OSError(f"could not write '{path}' (is the folder writable?)")


def _describe(splits: Sequence[str]) -> dict[str, Any]:
    out = {}
    for split in splits:
        tr, te = split_folders(split, 'train'), split_folders(split, 'test')
        out[split] = {
            'train_objects': sorted({o for _, o in tr}),
            'test_objects': sorted({o for _, o in te}),
            'train_affordances': sorted({a for a, _ in tr}),
            'test_affordances': sorted({a for a, _ in te}),
            'train_folders': [f'{a}/{o}' for a, o in tr],
            'test_folders': [f'{a}/{o}' for a, o in te],
        }
    return out


def _parts_meta() -> dict[str, dict[str, Any]]:
    out = {}
    for obj in SYNTH_OBJECTS:
        model = build_object(obj, 0)
        out[obj] = {
            'parts': model.part_names(),
            'regions': {r: [[p, c] for p, c in terms] for r, terms in model.regions.items()},
            'grasp': GRASP_REGION[obj],
            'size_cm': model.size_cm,
        }
    return out


def _prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output path '{out}' exists and is not a directory")
    if out.is_dir():
        ours = (out / META_FILE).is_file()
        for split in SPLITS:
            if (out / split).exists():
                if not ours:
                    raise FileExistsError(
                        f"'{out}' already holds a {split}/ folder that AGD-Synth did not write "
                        f'(no {META_FILE}); choose an empty or new directory')
                shutil.rmtree(out / split)
    out.mkdir(parents=True, exist_ok=True)


def generate(out_dir: str | Path, size: str | int = 'tiny', seed: int = 0,
             progress: bool = True, *, splits: Sequence[str] = SPLITS) -> dict[str, Any]:
    """Write an AGD-Synth dataset in the AGD20K layout.

    An existing AGD-Synth folder (one holding ``synth_meta.json``) is regenerated in place: its
    ``Seen/`` and ``Unseen/`` trees are replaced. A folder that holds a ``Seen/`` or ``Unseen/``
    tree without the meta file is refused.

    Args:
        out_dir: dataset root (created).
        size: 'tiny' (CI, a handful of images per folder), 'demo' (Seen: 442 exocentric, 156
            egocentric, 130 test images) or an integer N = exocentric images per folder.
        seed: non-negative integer; the same seed writes byte-identical files.
        progress: show a tqdm progress bar on stderr.
        splits: which of 'Seen' / 'Unseen' to write.

    Returns:
        Counts: ``{split: {'exocentric': n, 'egocentric': n, 'test': n, 'gt': n}, 'total': n}``.

    Raises:
        ValueError: bad size, seed or split.
        OSError: the folder cannot be created or written.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f'seed must be a non-negative integer, got {seed!r}')
    splits = tuple(splits)
    if not splits or any(s not in _SPLIT_ID for s in splits) or len(set(splits)) != len(splits):
        raise ValueError(f'splits must be distinct names among {", ".join(SPLITS)}, got '
                         f'{list(splits)}')
    per_folder = resolve_size(size)
    specs = plan(size, splits)
    out = Path(out_dir)
    _prepare_out(out)
    counts: dict[str, Any] = {s: {'exocentric': 0, 'egocentric': 0, 'test': 0, 'gt': 0}
                              for s in splits}
    meta: dict[str, Any] = {
        'generator': 'AGD-Synth', 'version': GENERATOR_VERSION, 'complete': False,
        'seed': int(seed), 'size': size if isinstance(size, str) else int(size),
        'per_folder': dict(zip(('exocentric', 'egocentric', 'test'), per_folder)),
        'splits': _describe(splits), 'objects': list(SYNTH_OBJECTS),
        'affordance_parts': AFFORDANCE_PARTS, 'objects_detail': _parts_meta(),
        'exo_cues': EXO_CUES, 'jpeg_quality': JPEG_QUALITY, 'counts': counts,
    }
    meta_path = out / META_FILE
    meta_path.write_text(json.dumps(meta, indent=1, sort_keys=True) + '\n')
    from tqdm import tqdm
    hand_fracs = []
    jpg = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
    png = [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION]
    logger.info('writing %d AGD-Synth images (size %s, seed %d) to %s', len(specs), size, seed,
                out)
    for spec in tqdm(specs, desc='AGD-Synth', unit='img', disable=not progress,
                     dynamic_ncols=True):
        s = render_sample(spec, seed)
        _write(out / spec.relpath(), s.image, jpg)
        c = counts[spec.split]
        if spec.role == 'exo':
            c['exocentric'] += 1
            hand_fracs.append(float(s.hand_mask.mean()))
        elif spec.role == 'ego':
            c['egocentric'] += 1
        else:
            c['test'] += 1
            assert s.gt is not None
            _write(out / spec.gt_relpath(), s.gt, png)
            c['gt'] += 1
    counts['total'] = sum(c['exocentric'] + c['egocentric'] + c['test']
                          for k, c in counts.items() if k in splits)
    meta['counts'] = counts
    meta['stats'] = {'exo_hand_fraction_min': round(min(hand_fracs), 5) if hand_fracs else 0.0,
                     'exo_hand_fraction_mean': round(float(np.mean(hand_fracs)), 5)
                     if hand_fracs else 0.0}
    meta['complete'] = True
    meta_path.write_text(json.dumps(meta, indent=1, sort_keys=True) + '\n')
    return counts


# ================================================================================================
# preview


def contact_sheet(root: str | Path, *, split: str = 'Seen', n: int = 6, tile: int = 200,
                  seed: int = 0) -> np.ndarray:
    """A preview grid of a generated dataset: rows = test image, GT overlay, exocentric image.

    Args:
        root: dataset root written by :func:`generate`.
        split: 'Seen' or 'Unseen'.
        n: number of columns (folders, drawn at random with ``seed``).
        tile: tile width in pixels (height = 0.8 * tile).

    Returns:
        (3 * th, n * tile, 3) uint8 BGR image.
    """
    root = Path(root)
    gt_dir = root / split / 'testset' / 'GT'
    pairs = sorted(p.parent.relative_to(gt_dir) for p in gt_dir.glob('*/*/*.png'))
    pairs = sorted(set(pairs))
    if not pairs:
        raise FileNotFoundError(f"no GT heatmaps under '{gt_dir}'; run generate() first")
    rng = np.random.default_rng(seed)
    pick = [pairs[i] for i in rng.permutation(len(pairs))[:n]]
    th = int(tile * 0.8)
    sheet = np.full((3 * th, n * tile, 3), 255, np.uint8)
    for j, rel in enumerate(pick):
        gt_path = sorted((gt_dir / rel).glob('*.png'))[0]
        img = cv2.imread(str(root / split / 'testset' / 'egocentric' / rel /
                             (gt_path.stem + '.jpg')))
        gt = cv2.imread(str(gt_path), cv2.IMREAD_GRAYSCALE)
        heat = cv2.applyColorMap(gt, cv2.COLORMAP_JET)
        over = np.where(gt[..., None] > 8, (img * 0.45 + heat * 0.55).astype(np.uint8), img)
        exo_dir = root / split / 'trainset' / 'exocentric' / rel
        exos = sorted(exo_dir.glob('*.jpg'))
        exo = cv2.imread(str(exos[0])) if exos else np.zeros_like(img)
        for i, im in enumerate((img, over, exo)):
            t = cv2.resize(im, (tile - 4, th - 4), interpolation=cv2.INTER_AREA)
            sheet[i * th + 2:(i + 1) * th - 2, j * tile + 2:(j + 1) * tile - 2] = t
        label = str(rel).replace('\\', '/')
        cv2.putText(sheet, label, (j * tile + 5, th - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                    (255, 255, 255), 2, cv2.LINE_AA)
        cv2.putText(sheet, label, (j * tile + 5, th - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                    (0, 0, 0), 1, cv2.LINE_AA)
    return sheet


def _check_tables() -> None:
    for obj, affs in AFFORDANCE_PARTS.items():
        assert obj in OBJECTS, obj
        for aff in affs:
            assert aff in AFFORDANCES_SEEN, aff
    test_affs = {a for a, _ in split_folders('Unseen', 'test')}
    train_affs = {a for a, _ in split_folders('Unseen', 'train')}
    assert test_affs <= train_affs, test_affs - train_affs


_check_tables()


def ensure_generated(out_dir: str | Path, size: str | int = 'demo', seed: int = 0,
                     progress: bool = True) -> bool:
    """Generate AGD-Synth in ``out_dir`` unless a complete copy of the same version, size and
    seed is already there; returns True when it generated."""
    meta_path = Path(out_dir) / 'synth_meta.json'
    try:
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    except (OSError, ValueError):
        meta = {}
    if (meta.get('complete') and meta.get('version') == GENERATOR_VERSION
            and str(meta.get('size')) == str(size) and meta.get('seed') == seed):
        return False
    generate(out_dir, size=int(size) if str(size).isdigit() else size, seed=seed,
             progress=progress)
    return True
