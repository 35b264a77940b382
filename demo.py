"""Synthetic demo dataset: photos of recycling waste on floors, in the competition's layout.

    python demo.py --root data/demo --seed 0 --size 512
    python demo.py --root data/demo_mixed --sizes 512x512,640x480,480x640   # portrait and landscape

`make_demo(root)` writes JPEG photos under batch folders plus COCO files train.json,
val.json, train_all.json and test.json. Each class has its own shape family, colour
range and texture; floors are wood, tiles, concrete or carpet under uneven lighting.

Labels match pixels exactly: every object is drawn through the very mask pycocotools
decodes from its stored polygon, in descending annotation area (the order the loader
paints masks in), so the decoded label map is what the photo shows.
"""
import argparse
import colorsys
import collections
import os

import cv2
import numpy as np
from pycocotools import mask as mask_utils

import utils

DEFAULT_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "demo")  # scripts' default data
CATEGORY_NAMES = [
    "General trash", "Paper", "Paper pack", "Metal", "Glass",
    "Plastic", "Styrofoam", "Plastic bag", "Battery", "Clothing",
]
GENERAL_TRASH, PAPER, PAPER_PACK, METAL, GLASS, PLASTIC, STYROFOAM, PLASTIC_BAG, BATTERY, CLOTHING = range(1, 11)

# Annotation counts of the real competition set, in id order.
REAL_ANNOTATION_COUNTS = [2782, 9311, 659, 562, 610, 3090, 1343, 7643, 63, 177]
COMMON_CLASSES = [GENERAL_TRASH, PAPER, PAPER_PACK, METAL, GLASS, PLASTIC, STYROFOAM, PLASTIC_BAG]
# Square-root tempering keeps the real frequency order while leaving every class enough
# examples to learn from in a set of about a hundred photos.
COMMON_WEIGHTS = np.sqrt([REAL_ANNOTATION_COUNTS[c - 1] for c in COMMON_CLASSES])
COMMON_WEIGHTS /= COMMON_WEIGHTS.sum()
# Rare classes follow a fixed schedule instead of chance, so every split (val included)
# holds several photos of each and their IoU can be measured.
BATTERY_EVERY, CLOTHING_EVERY = 5, 4

SPLITS = ("train", "val", "test")
TRAINVAL_BATCHES = ("batch_01_vt", "batch_02_vt", "batch_03")
TEST_BATCH = "batch_04_test"
JPEG_QUALITY = 90

Design = collections.namedtuple("Design", "parts paint alpha")  # local polygons, texture painter, opacity
Scene = collections.namedtuple("Scene", "image annotations labels")  # BGR uint8, paint-ordered objects, label map


# ---------------------------------------------------------------- texture helpers

def _hsv(hue_deg, sat, val):
    return np.array(colorsys.hsv_to_rgb((hue_deg % 360) / 360, sat, val), np.float32)


def _noise(rng, shape, cell):
    """Smooth value noise, roughly unit variance, with features about `cell` pixels wide."""
    h, w = shape
    cell = max(cell, 1.0)
    coarse = rng.standard_normal((int(h / cell) + 2, int(w / cell) + 2), dtype=np.float32)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)


def _solid(shape, colour):
    return np.broadcast_to(colour, (*shape, 3)).copy()


def _mix(base, other, weight):
    """Blend two colours or images with a per-pixel weight (or boolean mask) in [0, 1]."""
    weight = np.clip(np.asarray(weight, np.float32), 0, 1)[..., None]
    return base * (1 - weight) + other * weight


def _cylinder(u, half_width, gloss):
    """Brightness across a cylinder seen from the side: dark rims, one specular streak."""
    t = np.clip(u / half_width, -1, 1)
    return 0.45 + 0.55 * np.sqrt(1 - t * t) + gloss * np.exp(-((t + 0.45) / 0.13) ** 2)


# ---------------------------------------------------------------- shape helpers (unit-sized, local frame)

def _ring(radii, aspect=1.0):
    """Closed outline through points at evenly spaced angles and the given radii."""
    angles = np.linspace(0, 2 * np.pi, len(radii), endpoint=False)
    return np.stack([aspect * radii * np.cos(angles), radii * np.sin(angles)], 1)


def _blob(rng, n, roughness, aspect=1.0, jag=0.0):
    """Closed wobbly outline: a few random harmonics plus optional per-vertex jaggedness."""
    angles = np.linspace(0, 2 * np.pi, n, endpoint=False)
    radii = 1 + rng.uniform(-jag, jag, n)
    for k in range(2, 6):
        radii += rng.normal(0, roughness / k) * np.cos(k * angles + rng.uniform(0, 2 * np.pi))
    return _ring(radii, aspect)


def _rounded_rect(half_w, half_h, radius, corner_points=4):
    corners = [(half_w - radius, half_h - radius, 0), (-half_w + radius, half_h - radius, 0.5 * np.pi),
               (-half_w + radius, -half_h + radius, np.pi), (half_w - radius, -half_h + radius, 1.5 * np.pi)]
    arc = np.linspace(0, 0.5 * np.pi, corner_points)
    return np.concatenate([np.stack([cx + radius * np.cos(a0 + arc), cy + radius * np.sin(a0 + arc)], 1)
                           for cx, cy, a0 in corners])


def _subdivide(points, pieces):
    """Insert points along every edge so later jitter bends the edges, not only the corners."""
    nxt = np.roll(points, -1, 0)
    t = np.arange(pieces)[None, :, None] / pieces
    return (points[:, None] * (1 - t) + nxt[:, None] * t).reshape(-1, 2)


def _jitter(rng, points, amount):
    return points + rng.normal(0, amount, points.shape)


def _arc_band(centre, radius, thickness, start, stop, n=10):
    angles = np.linspace(start, stop, n)
    outer = np.stack([np.cos(angles), np.sin(angles)], 1) * (radius + thickness) + centre
    inner = np.stack([np.cos(angles), np.sin(angles)], 1) * (radius - thickness) + centre
    return np.concatenate([outer, inner[::-1]])


def _mirror(half_outline):
    """Outline symmetric about the v axis from its right half, listed top to bottom."""
    half = np.asarray(half_outline, float)
    return np.concatenate([half, half[::-1] * [-1, 1]])


# ---------------------------------------------------------------- class designs
# Each returns the object's polygons in a local frame (v along its length, about unit
# half-length) and a painter mapping local coordinates (u, v) and pixels-per-unit to RGB.

def _general_trash(rng):
    aspect = rng.uniform(0.6, 1.0)
    colours = [_hsv(rng.uniform(55, 75), rng.uniform(0.35, 0.6), rng.uniform(0.3, 0.55)) for _ in range(3)]

    def paint(rng, u, v, scale):
        tex = _solid(u.shape, colours[0])
        for colour in colours[1:]:
            tex = _mix(tex, colour, (_noise(rng, u.shape, 0.3 * scale) - 0.4) * 3)
        return tex * (1 + 0.12 * _noise(rng, u.shape, 0.2 * scale) + 0.18 * _noise(rng, u.shape, 1.5))[..., None]

    return Design([_blob(rng, int(rng.integers(12, 20)), 0.3, aspect, jag=0.15)], paint, 1.0)


def _paper(rng):
    half_w = rng.uniform(0.55, 0.85)
    outline = _jitter(rng, _subdivide(_rounded_rect(half_w, 1.0, 0.02, 2), 3), 0.035)
    cardboard = rng.random() < 0.2
    if cardboard:
        base = _hsv(rng.uniform(26, 36), rng.uniform(0.35, 0.5), rng.uniform(0.6, 0.75))
    else:
        base = _hsv(rng.uniform(35, 55), rng.uniform(0.08, 0.2), rng.uniform(0.82, 0.95))  # warmer than foam
    line_period = rng.uniform(0.1, 0.15)
    crease = rng.normal(size=2)

    def paint(rng, u, v, scale):
        tex = _solid(u.shape, base)
        if cardboard:  # corrugation ridges
            tex *= (1 + 0.07 * np.sin(2 * np.pi * v / 0.07))[..., None]
        else:  # printed text rows broken into words
            in_row = (v / line_period) % 1 < 0.38
            words = _noise(rng, u.shape, 0.12 * scale) > -0.2
            margin = (np.abs(u) < 0.8 * half_w) & (np.abs(v) < 0.85)
            tex[in_row & words & margin] *= 0.45
        fold = np.where(u * crease[0] + v * crease[1] > 0, 0.93, 1.0)
        return tex * (fold * (1 + 0.06 * _noise(rng, u.shape, 0.4 * scale)))[..., None]

    return Design([outline], paint, 1.0)


def _paper_pack(rng):
    half_w = rng.uniform(0.45, 0.65)
    if rng.random() < 0.6:  # gable-top carton with its sealing fin
        outline = _mirror([(0.9 * half_w, -1.0), (0.9 * half_w, -0.86), (half_w, -0.62), (half_w, 1.0)])
    else:  # brick-shaped drink box
        outline = _rounded_rect(half_w, 0.85, 0.05)
    body = _hsv(rng.uniform(-12, 12), rng.uniform(0.7, 0.9), rng.uniform(0.6, 0.85))
    band = _hsv(rng.uniform(-12, 12), rng.uniform(0.7, 0.95), rng.uniform(0.35, 0.5))
    logo = _hsv(0, 0, rng.uniform(0.85, 0.95))
    band_top, band_height = rng.uniform(-0.4, 0.2), rng.uniform(0.3, 0.6)
    side_face = rng.uniform(-0.2, 0.3) * half_w

    def paint(rng, u, v, scale):
        tex = _mix(_solid(u.shape, body), band, (v > band_top) & (v < band_top + band_height))
        tex = _mix(tex, logo, np.hypot(u + 0.1 * half_w, v + 0.15) < 0.22)
        shade = np.where(u > side_face, 0.8, 1.0) * np.where(v < -0.62, 0.88, 1.0)
        return tex * (shade * (1 + 0.04 * _noise(rng, u.shape, 0.3 * scale)))[..., None]

    return Design([outline], paint, 1.0)


def _metal(rng):
    silver = _hsv(rng.uniform(205, 218), rng.uniform(0.2, 0.3), rng.uniform(0.75, 0.9))
    if rng.random() < 0.3:  # can seen from the top: concentric rims
        radius = rng.uniform(0.55, 0.7)

        def paint(rng, u, v, scale):
            r = np.hypot(u, v) / radius
            shade = 0.75 + 0.3 * np.cos(2 * np.pi * r * 3.5) ** 2 * (r > 0.75) + 0.15 * np.exp(-((u + v) / 0.2) ** 2)
            return _solid(u.shape, silver) * shade[..., None]

        return Design([_ring(np.full(20, radius))], paint, 1.0)

    half_w = rng.uniform(0.4, 0.55)

    def paint(rng, u, v, scale):
        rims = (np.abs(v) > 0.88) & (np.abs(v) < 0.93)
        shade = (0.5 + 0.5 * _cylinder(u, half_w, 0.6)) * np.where(rims, 0.6, 1.0)  # polished: bright to the rims
        return _solid(u.shape, silver) * shade[..., None]

    return Design([_rounded_rect(half_w, 1.0, 0.12)], paint, 1.0)


def _bottle(half_w, neck_w, shoulder_v, neck_v):
    """Bottle side view, neck up (negative v), rounded base corners."""
    return _mirror([(neck_w, -1.0), (neck_w, neck_v), (half_w, shoulder_v),
                    (half_w, 0.92), (0.85 * half_w, 1.0)])


def _glass(rng):
    colour = _hsv(rng.uniform(130, 155), rng.uniform(0.6, 0.9), rng.uniform(0.5, 0.75))
    if rng.random() < 0.75:
        half_w = rng.uniform(0.28, 0.38)
        outline = _bottle(half_w, rng.uniform(0.09, 0.12), rng.uniform(-0.25, 0.0), rng.uniform(-0.6, -0.45))
    else:  # jar
        half_w = rng.uniform(0.45, 0.6)
        outline = _rounded_rect(half_w, 0.75, 0.12)

    def paint(rng, u, v, scale):
        shade = _cylinder(u, half_w, 1.2)
        return _solid(u.shape, colour) * shade[..., None]

    return Design([outline], paint, 0.9)


def _plastic(rng):
    cap = _hsv(rng.uniform(0, 360), rng.uniform(0.5, 0.9), rng.uniform(0.5, 0.9))
    colour = _hsv(rng.uniform(165, 180), rng.uniform(0.3, 0.5), rng.uniform(0.8, 0.95))  # clear PET tint
    half_w = rng.uniform(0.3, 0.42)
    cup = rng.random() < 0.3
    if cup:  # tapered cup, rim up
        outline = _mirror([(half_w * 1.25, -1.0), (half_w * 0.85, 1.0)])
    else:
        outline = _bottle(half_w, rng.uniform(0.12, 0.16), rng.uniform(-0.55, -0.4), -0.78)
    ridge_period = rng.uniform(0.12, 0.18)

    def paint(rng, u, v, scale):
        tex = _solid(u.shape, colour)
        if not cup:
            tex = _mix(tex, cap, v < -0.86)
        shade = _cylinder(u, 1.3 * half_w, 0.8) * (1 + 0.12 * np.sin(2 * np.pi * v / ridge_period))
        return tex * shade[..., None]

    return Design([outline], paint, 0.9)


def _styrofoam(rng):
    half_w = rng.uniform(0.5, 0.9)
    outline = _subdivide(_rounded_rect(half_w, 1.0, 0.08, 2), 4)
    chips = rng.random(len(outline)) < 0.2  # broken-off bites along the edge
    outline = outline * (1 - chips * rng.uniform(0.05, 0.25, len(outline)))[:, None]
    white = _hsv(rng.uniform(0, 360), rng.uniform(0, 0.03), rng.uniform(0.93, 1.0))
    tray = rng.random() < 0.5

    def paint(rng, u, v, scale):
        beads = np.abs(_noise(rng, u.shape, 3.0)) < 0.25  # seams between foam beads
        well = tray & (np.abs(u) < half_w - 0.15) & (np.abs(v) < 0.85)
        shade = np.where(beads, 0.9, 1.0) * np.where(well, 0.92, 1.0)
        return _solid(u.shape, white) * shade[..., None]

    return Design([outline], paint, 1.0)


def _plastic_bag(rng):
    parts = [_blob(rng, 28, 0.25, rng.uniform(0.7, 1.0))]
    if rng.random() < 0.35:  # loose handle lying apart from the bag: a second polygon
        parts.append(_arc_band((rng.uniform(-0.2, 0.2), -1.45), 0.35, 0.07, np.pi, 2 * np.pi))
    colour = _hsv(rng.uniform(275, 320), rng.uniform(0.5, 0.8), rng.uniform(0.4, 0.75))
    fold_angle, fold_period = rng.uniform(0, np.pi), rng.uniform(0.35, 0.6)

    def paint(rng, u, v, scale):
        along = u * np.cos(fold_angle) + v * np.sin(fold_angle)
        folds = np.sin(2 * np.pi * along / fold_period + 2.5 * _noise(rng, u.shape, 0.35 * scale))
        gloss = 0.45 * np.maximum(folds, 0) ** 6
        return _solid(u.shape, colour) * (1 + 0.22 * folds)[..., None] + gloss[..., None]

    return Design(parts, paint, 1.0)


def _battery(rng):
    body = _hsv(0, 0, rng.uniform(0.06, 0.14))
    band = _hsv(rng.uniform(40, 50), rng.uniform(0.75, 0.9), rng.uniform(0.75, 0.9))
    terminal = _hsv(0, 0, 0.8)
    if rng.random() < 0.75:  # AA cell: terminal nub on top, coloured top band
        half_w = rng.uniform(0.36, 0.42)
        outline = _mirror([(0.13, -1.0), (0.13, -0.92), (half_w, -0.9), (half_w, 1.0)])
        band_end = -0.4
    else:  # 9 V block: two snap terminals
        half_w = 0.6
        outline = _mirror([(0.4, -1.0), (0.4, -0.9), (half_w, -0.9), (half_w, 1.0)])
        band_end = -0.75

    def paint(rng, u, v, scale):
        tex = _mix(_solid(u.shape, body), band, (v < band_end) & (v > -0.9))
        tex = _mix(tex, terminal, v <= -0.9)
        return tex * _cylinder(u, half_w, 0.7)[..., None]

    return Design([outline], paint, 1.0)


def _clothing(rng):
    kind = rng.choice(3, p=[0.45, 0.3, 0.25])
    if kind == 0:  # T-shirt
        parts = [_mirror([(0.25, -0.9), (0.55, -0.8), (0.95, -0.45), (0.8, -0.2), (0.6, -0.35), (0.6, 1.0)])]
    elif kind == 1:  # trousers, legs apart at the crotch
        parts = [_mirror([(0.05, -1.0), (0.55, -1.0), (0.62, 1.0), (0.2, 1.0), (0.07, -0.3)])]
    else:  # a pair of socks: two separate pieces
        sock = np.array([(-0.2, -1.0), (0.2, -1.0), (0.2, 0.5), (0.55, 0.6), (0.55, 0.95), (-0.2, 0.95)])
        parts = [sock + [-0.45, 0], sock * [-1, 1] + [0.45, rng.uniform(-0.2, 0.2)]]
    parts = [_jitter(rng, _subdivide(p, 2), 0.03) for p in parts]
    hue = rng.uniform(220, 255)
    main = _hsv(hue, rng.uniform(0.5, 0.8), rng.uniform(0.35, 0.65))
    second = _hsv(hue + rng.uniform(-15, 15), rng.uniform(0.3, 0.6), rng.uniform(0.7, 0.9))
    pattern = rng.choice(["stripes", "plaid", "denim"], p=[0.4, 0.35, 0.25])
    if pattern == "denim":
        main = _hsv(hue, rng.uniform(0.45, 0.7), rng.uniform(0.35, 0.6))
    period = rng.uniform(0.12, 0.22)

    def paint(rng, u, v, scale):
        stripes_v = (v / period) % 1 < 0.45
        stripes_u = (u / period) % 1 < 0.45
        weave = np.sin(2 * np.pi * u * scale / 3.0) * np.sin(2 * np.pi * v * scale / 3.0)
        if pattern == "stripes":
            tex = _mix(_solid(u.shape, main), second, stripes_v)
        elif pattern == "plaid":
            tex = _mix(_solid(u.shape, main), second, 0.35 * stripes_v + 0.35 * stripes_u)
        else:  # plain denim with a diagonal twill
            tex = _solid(u.shape, main)
            weave = np.sin(2 * np.pi * (u + v) * scale / 4.0)
        folds = _noise(rng, u.shape, 0.3 * scale)
        return tex * (1 + 0.08 * weave + 0.15 * folds)[..., None]

    return Design(parts, paint, 1.0)


DESIGNS = {GENERAL_TRASH: _general_trash, PAPER: _paper, PAPER_PACK: _paper_pack, METAL: _metal,
           GLASS: _glass, PLASTIC: _plastic, STYROFOAM: _styrofoam, PLASTIC_BAG: _plastic_bag,
           BATTERY: _battery, CLOTHING: _clothing}
# Half-length of each class as a fraction of the photo side, before the per-photo zoom.
SCALE_RANGES = {GENERAL_TRASH: (0.1, 0.2), PAPER: (0.13, 0.26), PAPER_PACK: (0.11, 0.18), METAL: (0.12, 0.18),
                GLASS: (0.13, 0.2), PLASTIC: (0.11, 0.19), STYROFOAM: (0.1, 0.2), PLASTIC_BAG: (0.16, 0.3),
                BATTERY: (0.09, 0.13), CLOTHING: (0.22, 0.34)}


# ---------------------------------------------------------------- floors

def _seam_width(size):
    return max(1, round(size / 200))


def _wood(rng, size):
    plank = size * rng.uniform(0.08, 0.16)
    board_length = plank * rng.uniform(4, 7)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    row = (y / plank).astype(int)
    tint = 1 + 0.1 * rng.standard_normal(row.max() + 1, dtype=np.float32)[row]
    stagger = rng.uniform(0, board_length, row.max() + 1).astype(np.float32)[row]
    grain = np.sin(2 * np.pi * y / (plank / rng.uniform(5, 9)) + 4 * _noise(rng, (size, size), size / 6))
    seam = ((y % plank) < _seam_width(size)) | (((x + stagger) % board_length) < _seam_width(size))
    base = _hsv(rng.uniform(20, 40), rng.uniform(0.1, 0.25), rng.uniform(0.3, 0.5))
    shade = tint * (1 + 0.08 * grain) * np.where(seam, 0.55, 1.0)
    return _solid((size, size), base) * shade[..., None]


def _tiles(rng, size):
    tile = size * rng.uniform(0.12, 0.3)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    grout = ((x % tile) < _seam_width(size) + 1) | ((y % tile) < _seam_width(size) + 1)
    tiles_per_side = int(size / tile) + 1
    tint = 1 + 0.05 * rng.standard_normal((tiles_per_side, tiles_per_side), dtype=np.float32)
    tint = tint[(y / tile).astype(int), (x / tile).astype(int)]
    base = _hsv(rng.uniform(0, 360), rng.uniform(0, 0.12), rng.uniform(0.35, 0.55))
    shade = tint * (1 + 0.03 * _noise(rng, (size, size), size / 20)) * np.where(grout, 0.7, 1.0)
    return _solid((size, size), base) * shade[..., None]


def _concrete(rng, size):
    base = _hsv(rng.uniform(0, 360), rng.uniform(0, 0.08), rng.uniform(0.35, 0.55))
    texture = sum(amp * _noise(rng, (size, size), size / cells) for amp, cells in [(0.08, 4), (0.06, 24), (0.05, 128)])
    speckle = np.where(_noise(rng, (size, size), 1.5) > 2.0, 0.75, 1.0)
    return _solid((size, size), base) * ((1 + texture) * speckle)[..., None]


def _carpet(rng, size):
    base = _hsv(rng.uniform(0, 360), rng.uniform(0.05, 0.2), rng.uniform(0.25, 0.45))
    pile = rng.standard_normal((size, size, 3), dtype=np.float32) * 0.12
    return _solid((size, size), base) * (1 + pile + 0.06 * _noise(rng, (size, size), size / 8)[..., None])


FLOORS = (_wood, _tiles, _concrete, _carpet)


def _floor(rng, size):
    floor = FLOORS[rng.integers(len(FLOORS))](rng, size)
    if rng.random() < 0.5:  # planks and grout run either way
        floor = floor.transpose(1, 0, 2)
    return cv2.GaussianBlur(np.ascontiguousarray(floor), (0, 0), rng.uniform(0.6, 1.2))


# ---------------------------------------------------------------- scene composition

def _scene_classes(rng, split_index):
    """Common classes drawn at tempered real frequencies, rare ones added on their schedule."""
    classes = list(rng.choice(COMMON_CLASSES, size=rng.integers(4, 10), p=COMMON_WEIGHTS))
    if split_index % BATTERY_EVERY == 0:
        classes.append(BATTERY)
    if split_index % CLOTHING_EVERY == 2:
        classes.append(CLOTHING)
    return classes


def _centre(rng, placed, size):
    """A third of the objects land next to an earlier one, so that objects overlap and occlude."""
    if placed and rng.random() < 0.35:
        cx, cy, scale = placed[rng.integers(len(placed))]
        angle, dist = rng.uniform(0, 2 * np.pi), scale * rng.uniform(0.5, 1.3)
        centre = np.array([cx + dist * np.cos(angle), cy + dist * np.sin(angle)])
    else:
        centre = rng.uniform(0.08, 0.92, 2) * size
    return np.clip(centre, 0.04 * size, 0.96 * size)


def _to_image(parts, centre, scale, angle, size):
    """Local polygons -> integer image coordinates, clipped to the photo; drops parts left with no area."""
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) * scale
    polygons = []
    for part in parts:
        points = np.clip(np.rint(part @ rotation.T + centre), 0, size).astype(int)
        if cv2.contourArea(points.astype(np.float32)) > 0:  # clipping can flatten a part onto the border
            polygons.append(points.ravel().tolist())
    return polygons


def _pose_objects(rng, classes, size):
    """Design, size and place each object; returns them in paint (descending area) order."""
    zoom = rng.uniform(0.8, 1.3)
    objects, placed = [], []
    for category in classes:
        design = DESIGNS[category](rng)
        scale = rng.uniform(*SCALE_RANGES[category]) * zoom * size
        centre = _centre(rng, placed, size)
        angle = rng.uniform(0, 2 * np.pi)
        polygons = _to_image(design.parts, centre, scale, angle, size)
        if not polygons:
            continue
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, size, size))
        area = int(mask_utils.area(rle))
        if area == 0:
            continue
        placed.append((*centre, scale))
        objects.append(dict(category_id=int(category), segmentation=polygons, area=area,
                            bbox=[float(b) for b in mask_utils.toBbox(rle)],
                            design=design, rle=rle, centre=centre, scale=scale, angle=angle))
    return sorted(objects, key=lambda o: -o["area"])  # stable: equal areas keep listing order


def _local_coordinates(obj, x, y, w, h):
    """Object-frame (u, v) of the pixel centres in a bbox, in units of the object's scale."""
    ys, xs = np.mgrid[y:y + h, x:x + w].astype(np.float32) + 0.5
    dx, dy = xs - obj["centre"][0], ys - obj["centre"][1]
    cos, sin = np.cos(obj["angle"]), np.sin(obj["angle"])
    return (dx * cos + dy * sin) / obj["scale"], (dy * cos - dx * sin) / obj["scale"]


def _cast_shadow(canvas, mask, obj, light_angle, strength):
    """Darken the floor (and whatever lies below) under a blurred, shifted copy of the mask."""
    size = canvas.shape[0]
    shift = obj["scale"] * 0.12 * np.array([np.cos(light_angle), np.sin(light_angle)])
    sigma = 1 + 0.06 * obj["scale"]
    pad = int(np.abs(shift).max() + 3 * sigma) + 1
    x, y, w, h = (int(b) for b in obj["bbox"])
    x0, y0, x1, y1 = max(x - pad, 0), max(y - pad, 0), min(x + w + pad, size), min(y + h + pad, size)
    crop = mask[y0:y1, x0:x1].astype(np.float32)
    moved = cv2.warpAffine(crop, np.float32([[1, 0, shift[0]], [0, 1, shift[1]]]), (x1 - x0, y1 - y0))
    canvas[y0:y1, x0:x1] *= (1 - strength * cv2.GaussianBlur(moved, (0, 0), sigma))[..., None]


def _draw_object(rng, canvas, labels, obj, light_angle, shadow_strength):
    # Paint through the mask pycocotools decodes from the stored polygons, so the
    # annotation covers exactly the pixels this object shows.
    mask = mask_utils.decode(obj["rle"]).astype(bool)
    _cast_shadow(canvas, mask, obj, light_angle, shadow_strength)
    x, y, w, h = (int(b) for b in obj["bbox"])
    design = obj["design"]
    texture = design.paint(rng, *_local_coordinates(obj, x, y, w, h), obj["scale"])
    inside = mask[y:y + h, x:x + w]
    region = canvas[y:y + h, x:x + w]
    region[inside] = design.alpha * texture[inside] + (1 - design.alpha) * region[inside]
    labels[y:y + h, x:x + w][inside] = obj["category_id"]


def _photograph(rng, canvas):
    """Uneven lighting, colour cast, lens softness and sensor noise; returns BGR uint8.

    Works in place on `canvas` to keep the full-frame passes few.
    """
    size = canvas.shape[0]
    ramp = np.arange(size, dtype=np.float32) / size - 0.5
    angle = rng.uniform(0, 2 * np.pi)
    slope, vignette = rng.uniform(0.1, 0.35), rng.uniform(0, 0.3)
    light = (1 + slope * np.cos(angle) * ramp - vignette * ramp ** 2)[None, :] \
        + (slope * np.sin(angle) * ramp - vignette * ramp ** 2)[:, None]
    canvas *= light[..., None]
    canvas *= (rng.uniform(0.85, 1.15) * rng.uniform(0.93, 1.07, 3)).astype(np.float32)  # exposure, white balance
    photo = cv2.GaussianBlur(canvas, (0, 0), rng.uniform(0.4, 0.8))
    noise = rng.standard_normal(photo.shape, dtype=np.float32)
    noise *= rng.uniform(0.01, 0.03) * 255
    photo *= 255
    photo += noise + 0.5
    np.clip(photo, 0, 255, out=photo)
    return cv2.cvtColor(photo.astype(np.uint8), cv2.COLOR_RGB2BGR)


def render_scene(seed, split, index, size=512):
    """Render photo `index` of `split`; the same arguments always give the same Scene."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    canvas = _floor(rng, size)
    objects = _pose_objects(rng, _scene_classes(rng, index), size)
    labels = np.zeros((size, size), np.uint8)
    light_angle, shadow_strength = rng.uniform(0, 2 * np.pi), rng.uniform(0.25, 0.5)
    for obj in objects:
        _draw_object(rng, canvas, labels, obj, light_angle, shadow_strength)
    annotations = [{k: obj[k] for k in ("category_id", "segmentation", "area", "bbox")} for obj in objects]
    return Scene(_photograph(rng, canvas), annotations, labels)


def reshape_scene(scene, width, height):
    """A square Scene stretched to width x height: the photo resized, polygons scaled, areas and boxes recomputed.

    Labels still match pixels: the stored polygons are scaled exactly and the label map is the
    decoded result; annotations that vanish at the new size are dropped.
    """
    side = scene.image.shape[0]
    sx, sy = width / side, height / side
    annotations = []
    for ann in scene.annotations:
        polygons = [[round(v * (sx if i % 2 == 0 else sy), 2) for i, v in enumerate(part)] for part in ann["segmentation"]]
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
        if mask_utils.area(rle) > 0:
            annotations.append(dict(ann, segmentation=polygons, area=int(mask_utils.area(rle)),
                                    bbox=[float(b) for b in mask_utils.toBbox(rle)]))
    labels = np.zeros((height, width), np.uint8)
    for ann in annotations:  # already in paint order
        rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], height, width))
        labels[mask_utils.decode(rle) > 0] = ann["category_id"]
    return Scene(cv2.resize(scene.image, (width, height), interpolation=cv2.INTER_AREA), annotations, labels)


# ---------------------------------------------------------------- dataset files

def _file_name(split, image_id):
    batch = TEST_BATCH if split == "test" else TRAINVAL_BATCHES[(image_id - 1) % len(TRAINVAL_BATCHES)]
    return f"{batch}/{image_id:04d}.jpg"


def make_demo(root, seed=0, size=512, n_train=120, n_val=30, n_test=30, sizes=None):
    """Write the synthetic set under `root` in the competition's layout; returns `root`.

    `sizes`: (width, height) pairs the photos take in turn (portrait and landscape mixed sets);
    by default every photo is size x size.
    """
    sizes = list(sizes) if sizes else [(size, size)]
    info = {"description": "Synthetic recycling-waste photos (demo set), not real data",
            "synthetic": True, "seed": seed, "size": size}
    categories = [{"id": i, "name": name, "supercategory": name} for i, name in enumerate(CATEGORY_NAMES, 1)]
    images = {split: [] for split in SPLITS}
    annotations = {split: [] for split in SPLITS}
    image_id = annotation_id = 1  # ids are unique across all splits
    for split, count in zip(SPLITS, (n_train, n_val, n_test)):
        for index in range(count):
            width, height = sizes[(image_id - 1) % len(sizes)]
            scene = render_scene(seed, split, index, max(width, height))
            if width != height:
                scene = reshape_scene(scene, width, height)
            file_name = _file_name(split, image_id)
            jpeg = cv2.imencode(".jpg", scene.image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])[1]
            utils.atomic_write_bytes(os.path.join(root, file_name), jpeg.tobytes())
            images[split].append({"id": image_id, "file_name": file_name, "height": height, "width": width})
            if split != "test":  # test photos ship without labels
                for ann in scene.annotations:
                    annotations[split].append({"id": annotation_id, "image_id": image_id, **ann, "iscrowd": 0})
                    annotation_id += 1
            image_id += 1

    def coco(split_names):
        return {"info": info, "images": [im for s in split_names for im in images[s]],
                "annotations": [a for s in split_names for a in annotations[s]], "categories": categories}

    for name, split_names in [("train", ["train"]), ("val", ["val"]), ("train_all", ["train", "val"]),
                              ("test", ["test"])]:
        utils.atomic_write_json(os.path.join(root, f"{name}.json"), coco(split_names))
    return root


# ---------------------------------------------------------------- command line
def parse_sizes(text):
    """'512x512,640x480' -> [(512, 512), (640, 480)] (width x height)."""
    try:
        sizes = [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or any(len(s) != 2 or min(s) < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT[,WIDTHxHEIGHT...], got {text!r}")
    return sizes


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter)
    parser.add_argument("--root", default=DEFAULT_ROOT, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shapes, colours and layouts")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--sizes", type=parse_sizes, default=None, metavar="WxH,...",
                        help="photo sizes taken in turn, e.g. 512x512,640x480,480x640 (overrides --size)")
    parser.add_argument("--n-train", type=int, default=120, help="training images")
    parser.add_argument("--n-val", type=int, default=30, help="validation images")
    parser.add_argument("--n-test", type=int, default=30, help="test images")
    return parser


def main(args):
    make_demo(args.root, seed=args.seed, size=args.size, n_train=args.n_train, n_val=args.n_val,
              n_test=args.n_test, sizes=args.sizes)
    print(f"demo dataset written to {args.root}")


if __name__ == "__main__":
    utils.run_main(main, get_args_parser())
