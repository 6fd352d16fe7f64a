"""Procedural indoor rooms for :mod:`kfold.data.synthetic`: scene building and furniture.

Each room is a box (floor, ceiling, four walls) furnished with axis-aligned boxes: beds, sofas, tables,
chairs, cabinets and shelves with books, a tv, pictures, windows, doors and small objects.
"""

from __future__ import annotations

import bisect
import colorsys
from dataclasses import dataclass

import numpy as np

from kfold.data.layout import DEFAULT_CLASSES, IGNORE_INDEX

_NOISE = 128  # side of the noise texture tile


# ------------------------------------------------------------------------------------------------ scenes
_ID = {name: i for i, name in enumerate(DEFAULT_CLASSES)}
_CLUTTER = IGNORE_INDEX  # unlabelled clutter, like NYU's unlabelled pixels
# per-box parameters after the colour: texture (noise, grain, tiles, cells), emission, depth dropout
PARAMS = ("r", "g", "b", "noise_amp", "noise_freq", "stripe_amp", "stripe_fu", "stripe_fv", "check_amp",
          "check_size", "cell_mix", "cell_fu", "cell_fv", "emissive", "hole_p")  # fmt: skip
_DEFAULTS = dict(noise_amp=0.03, noise_freq=30.0, stripe_amp=0.0, stripe_fu=0.0, stripe_fv=0.0, check_amp=0.0,
                 check_size=1.0, cell_mix=0.0, cell_fu=1.0, cell_fv=1.0, emissive=0.0, hole_p=0.0)  # fmt: skip
# Materials each class draws from: they overlap, so colour alone never tells the class.
_MIX = {
    "wall": {"pastel": 5, "white": 4, "grey": 1, "wood": 0.5},
    "floor": {"wood": 5, "grey": 2, "tile": 1.5, "carpet": 1.5},
    "ceiling": {"white": 8, "pastel": 1.5},
    "furniture": {"wood": 4.5, "white": 2.5, "dark": 1.5, "grey": 1.5},
    "bed": {"fabric": 5, "white": 3, "pastel": 2},
    "sofa": {"fabric": 5, "dark": 2, "leather": 2.5},
    "chair": {"wood": 4, "dark": 2.5, "fabric": 2, "grey": 1.5},
    "table": {"wood": 5.5, "white": 2, "dark": 1.5, "grey": 1},
    "objects": {"bright": 3, "fabric": 2, "white": 2, "dark": 1.5, "wood": 1.5},
    "frame": {"wood": 4, "dark": 3, "white": 3},
    "curtain": {"fabric": 6, "white": 2.5, "pastel": 1.5},
}

_MIX_CDF = {k: (tuple(m), tuple(np.cumsum(list(m.values())) / sum(m.values()))) for k, m in _MIX.items()}


@dataclass
class Room:
    """One furnished room: boxes (the first six are the shell: x-, x+, floor, ceiling, z-, z+) and lighting."""

    dims: np.ndarray  # (W, Hc, D) metres: x width, y height, z depth
    lo: np.ndarray  # (K, 3)
    hi: np.ndarray  # (K, 3)
    classes: np.ndarray  # (K,) uint8 class ids, 255 = unlabelled clutter
    colours: np.ndarray  # (K, 3) float32 base RGB in 0..255 after exposure and white balance
    texture: np.ndarray  # (len(PARAMS) - 3, K) float32: texture parameters PARAMS[3:], one row each
    noise: np.ndarray  # (128 * 128,) flattened periodic smooth noise tile
    cell_colours: np.ndarray  # (64, 3) colours of book spines and picture cells
    light: np.ndarray
    ambient: float
    diffuse: float
    rgb_noise: float
    border_ignore: float


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v))


class _Builder:
    """Collects boxes; places furniture against walls (local frame: a along the wall, b into the room)."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = r = rng
        self.dims = np.array([r.uniform(2.8, 5.2), r.uniform(2.4, 3.0), r.uniform(3.0, 5.6)])
        self.boxes: list[tuple[np.ndarray, np.ndarray, int, np.ndarray]] = []
        self.floor: list[tuple[float, float, float, float]] = []  # x0, z0, x1, z1 taken on the floor
        self.walls: list[list[tuple[float, float, float, float]]] = [[], [], [], []]  # a0, a1, y0, y1
        self.tops: list[tuple[float, float, float, float, float]] = []  # x0, z0, x1, z1, y for small items
        fabric = [_hsv(r.random(), r.uniform(0.15, 0.7), r.uniform(0.25, 0.85)) for _ in range(2)]
        self.mats = {
            "wood": _hsv(r.uniform(0.04, 0.11), r.uniform(0.35, 0.75), r.uniform(0.25, 0.75)),
            "white": _hsv(r.random(), r.uniform(0, 0.06), r.uniform(0.75, 0.95)),
            "grey": _hsv(r.random(), r.uniform(0, 0.1), r.uniform(0.35, 0.7)),
            "dark": _hsv(r.random(), r.uniform(0, 0.25), r.uniform(0.05, 0.25)),
            "pastel": _hsv(r.random(), r.uniform(0.05, 0.3), r.uniform(0.65, 0.95)),
            "leather": _hsv(r.uniform(0.02, 0.1), r.uniform(0.3, 0.7), r.uniform(0.1, 0.5)),
            "carpet": _hsv(r.random(), r.uniform(0.05, 0.5), r.uniform(0.3, 0.8)),
            "tile": _hsv(r.random(), r.uniform(0, 0.2), r.uniform(0.5, 0.9)),
            "fabric": fabric,
        }

    def material(self, kind: str) -> dict:
        """Colour and texture of a new box of material ``kind`` or of a class (a name in ``_MIX``)."""
        r = self.rng
        if kind in _MIX:
            names, cumulative = _MIX_CDF[kind]
            kind = names[bisect.bisect(cumulative, r.random())]
        if kind == "bright" or (kind == "fabric" and r.random() < 0.4):
            base = _hsv(r.random(), r.uniform(0.3, 0.9), r.uniform(0.3, 0.95))
        elif kind == "fabric":
            base = self.mats["fabric"][int(r.integers(2))]
        else:
            base = self.mats[kind]
        tex = dict(rgb=(base * r.normal(1, 0.06, 3)).clip(0, 1), noise_amp=r.uniform(0.02, 0.06),
                   noise_freq=r.uniform(15, 60))  # fmt: skip
        if kind == "wood":
            tex.update(stripe_amp=r.uniform(0.04, 0.14), stripe_fu=r.uniform(20, 80), noise_amp=0.08)
        elif kind in ("fabric", "carpet", "leather"):
            tex.update(noise_amp=r.uniform(0.05, 0.12), noise_freq=r.uniform(90, 240))
        elif kind == "tile":
            tex.update(check_amp=r.uniform(0.06, 0.16), check_size=r.uniform(0.25, 0.6))
        return tex

    def add(self, lo, hi, cls: int, tex: dict) -> None:
        row = np.array([*tex["rgb"], *[tex.get(k, _DEFAULTS[k]) for k in PARAMS[3:]]], np.float32)
        self.boxes.append((np.asarray(lo, float), np.asarray(hi, float), cls, row))

    def wall_len(self, w: int) -> float:
        return float(self.dims[2] if w < 2 else self.dims[0])

    def rect(self, w: int, a0: float, a1: float, b0: float, b1: float) -> tuple[float, float, float, float]:
        """Floor rectangle (x0, z0, x1, z1) of the wall-local span [a0, a1] x [b0, b1]."""
        W, _, D = self.dims
        return [(b0, a0, b1, a1), (W - b1, a0, W - b0, a1), (a0, b0, a1, b1), (a0, D - b1, a1, D - b0)][w]

    def wall_box(self, w: int, a0, a1, y0, y1, b0, b1, cls: int, tex: dict) -> None:
        x0, z0, x1, z1 = self.rect(w, a0, a1, b0, b1)
        self.add((x0, y0, z0), (x1, y1, z1), cls, tex)

    def floor_free(self, rect, margin: float = 0.05) -> bool:
        x0, z0, x1, z1 = rect
        if x0 < 0 or z0 < 0 or x1 > self.dims[0] or z1 > self.dims[2]:
            return False
        return all(x0 >= f[2] + margin or x1 <= f[0] - margin or z0 >= f[3] + margin or z1 <= f[1] - margin
                   for f in self.floor)  # fmt: skip

    def wall_free(self, w: int, a0: float, a1: float, y0: float, y1: float) -> bool:
        if a0 < 0.05 or a1 > self.wall_len(w) - 0.05:
            return False
        return all(a0 >= s[1] or a1 <= s[0] or y0 >= s[3] or y1 <= s[2] for s in self.walls[w])

    def wall_spot(self, width: float, depth: float, height: float, y0: float = 0.0, tries: int = 30):
        """A free (wall, a0) for a piece against a wall (claimed on success), or None."""
        for _ in range(tries):
            w = int(self.rng.integers(4))
            free = self.wall_len(w) - width - 0.1
            if free <= 0:
                continue
            a0 = self.rng.uniform(0.05, 0.05 + free)
            rect = self.rect(w, a0, a0 + width, 0, depth)
            if self.wall_free(w, a0, a0 + width, y0, y0 + height) and (depth == 0 or self.floor_free(rect)):
                self.walls[w].append((a0, a0 + width, y0, y0 + height))
                if depth > 0:
                    self.floor.append(rect)
                return w, a0
        return None


def _window(b: _Builder) -> None:
    r, Hc = b.rng, b.dims[1]
    width, sill, top = r.uniform(0.6, 1.4), r.uniform(0.5, 1.0), min(r.uniform(1.9, 2.3), Hc - 0.12)
    curtain = r.uniform(0.2, 0.4) if r.random() < 0.4 else 0.0
    spot = b.wall_spot(width + 2 * curtain + 0.1, 0, top - sill + 0.1, sill - 0.05)
    if spot is None:
        return
    w, a0 = spot
    a0, a1, fw = a0 + curtain + 0.05, a0 + curtain + 0.05 + width, r.uniform(0.04, 0.08)
    sky = dict(rgb=_hsv(r.uniform(0.5, 0.65), r.uniform(0, 0.35), r.uniform(0.8, 1.0)), emissive=1.0,
               noise_amp=0.08, noise_freq=10.0, cell_mix=r.uniform(0, 0.3), cell_fu=2.0, cell_fv=2.0,
               hole_p=r.uniform(0.6, 1.0))  # fmt: skip
    b.wall_box(w, a0, a1, sill, top, 0, 0.01, _ID["window"], sky)
    frame = b.material(r.choice(["white", "white", "wood", "grey"]))
    for a_lo, a_hi, y_lo, y_hi, depth in (
        (a0 - fw, a0, sill - fw, top + fw, 0.04), (a1, a1 + fw, sill - fw, top + fw, 0.04),
        (a0 - fw, a1 + fw, top, top + fw, 0.04), (a0 - fw - 0.05, a1 + fw + 0.05, sill - fw, sill, 0.12),
    ) + (((a0 + a1 - fw) / 2, (a0 + a1 + fw) / 2, sill, top, 0.03),) * (width > 1.0):  # fmt: skip
        b.wall_box(w, a_lo, a_hi, y_lo, y_hi, 0, depth, _ID["window"], frame)
    if r.random() < 0.3:  # a half-lowered blind
        blind = b.material(r.choice(["white", "pastel", "grey"])) | dict(stripe_amp=0.1, stripe_fv=120.0)
        b.wall_box(w, a0, a1, top - r.uniform(0.2, 0.7) * (top - sill), top, 0.04, 0.05, _ID["window"], blind)
    if curtain:
        cloth = b.material("curtain") | dict(stripe_amp=r.uniform(0.1, 0.25), stripe_fu=r.uniform(25, 60))
        low = 0.0 if r.random() < 0.6 else sill - 0.15
        for c0 in (a0 - curtain - 0.05, a1 - 0.05):
            b.wall_box(w, c0, c0 + curtain + 0.1, low, top + 0.15, 0.05, r.uniform(0.1, 0.16), _ID["window"], cloth)
        b.walls[w].append((a0 - curtain - 0.05, a1 + curtain + 0.05, low, sill))


def _door(b: _Builder) -> None:
    r = b.rng
    width, height = r.uniform(0.75, 0.95), r.uniform(1.95, 2.1)
    spot = b.wall_spot(width + 0.2, 0, height + 0.1)
    if spot is None:
        return
    w, a0 = spot
    a0 += 0.1
    a1 = a0 + width
    b.floor.append(b.rect(w, a0 - 0.1, a1 + 0.1, 0, 0.9))  # keep the door swing free
    b.wall_box(w, a0, a1, 0, height, 0, 0.035, _ID["wall"], b.material(r.choice(["wood", "white", "grey"])))
    casing = b.material(r.choice(["white", "wood"]))
    for lo_a, hi_a, y0 in ((a0 - 0.07, a0, 0), (a1, a1 + 0.07, 0), (a0 - 0.07, a1 + 0.07, height)):
        b.wall_box(w, lo_a, hi_a, y0, height + 0.07 if y0 else height, 0, 0.02, _ID["wall"], casing)
    b.wall_box(w, a1 - 0.13, a1 - 0.06, 0.95, 1.0, 0.035, 0.09, _ID["objects"], b.material("grey"))


def _cabinet(b: _Builder, width, depth, height, cls=_ID["furniture"], tex=None):
    """A box against a wall with a few handles; its top takes small objects. Returns (wall, a0) or None."""
    spot = b.wall_spot(width, depth, height)
    if spot is None:
        return None
    w, a0 = spot
    tex = tex or b.material("furniture")
    b.wall_box(w, a0, a0 + width, 0, height, 0, depth, cls, tex)
    n_doors = max(1, int(width / 0.5))
    for i in range(n_doors):  # handles or door gaps break the flat front
        a = a0 + (i + 0.5) * width / n_doors
        b.wall_box(w, a - 0.04, a + 0.04, height * 0.75, height * 0.75 + 0.03, depth, depth + 0.025, cls,
                   b.material("grey"))  # fmt: skip
    if height < 1.6:
        b.tops.append((*b.rect(w, a0, a0 + width, 0, depth), height))
    return w, a0


def _bookshelf(b: _Builder) -> None:
    r = b.rng
    width, depth, height = r.uniform(0.6, 1.6), r.uniform(0.25, 0.4), r.uniform(1.0, 2.2)
    spot = b.wall_spot(width, depth, height)
    if spot is None:
        return
    w, a0 = spot
    a1, t, wood = a0 + width, 0.02, b.material("furniture")
    b.wall_box(w, a0, a1, 0, height, 0, 0.015, _ID["furniture"], wood)
    for lo_a in (a0, a1 - t):
        b.wall_box(w, lo_a, lo_a + t, 0, height, 0, depth, _ID["furniture"], wood)
    levels = [0.0, *np.arange(0.08, height - 0.2, r.uniform(0.28, 0.4)), height - t]
    for y, y_next in zip(levels[:-1], levels[1:], strict=True):
        b.wall_box(w, a0, a1, y, y + (0.08 if y == 0 else t), 0, depth, _ID["furniture"], wood)
        gap, a = y_next - y - t, a0 + t + 0.01
        while a < a1 - t - 0.08 and gap > 0.12:
            span = min(r.uniform(0.08, 0.5), a1 - t - a)
            if r.random() < 0.5:
                books = dict(rgb=b.material("objects")["rgb"], cell_mix=0.85, cell_fu=r.uniform(25, 45), cell_fv=0.0)
                bh = gap * r.uniform(0.55, 0.9)
                b.wall_box(w, a, a + span, y + t, y + t + bh, 0.02, depth * r.uniform(0.7, 0.95), _ID["books"], books)
            elif r.random() < 0.5:
                b.wall_box(w, a, a + span * 0.6, y + t, y + t + gap * r.uniform(0.3, 0.8), 0.03, depth * 0.8,
                           _ID["objects"] if r.random() < 0.8 else _CLUTTER, b.material("objects"))  # fmt: skip
            a += span + r.uniform(0.0, 0.12)


def _bed(b: _Builder) -> None:
    r = b.rng
    width, length, head = r.uniform(1.0, 1.9), r.uniform(1.9, 2.15), r.uniform(0.8, 1.3)
    spot = b.wall_spot(width + 0.1, length + 0.1, head)
    if spot is None:
        return
    w, a0 = spot
    a0, a1 = a0 + 0.05, a0 + 0.05 + width
    base, mattress = r.uniform(0.2, 0.35), r.uniform(0.18, 0.3)
    b.wall_box(w, a0, a1, 0, base, 0, length, _ID["bed"], b.material("bed"))
    b.wall_box(w, a0 + 0.02, a1 - 0.02, base, base + mattress, 0.03, length - 0.02, _ID["bed"], b.material("bed"))
    b.wall_box(w, a0 - 0.03, a1 + 0.03, 0, head, 0, r.uniform(0.05, 0.1), _ID["bed"], b.material("frame"))
    top = base + mattress
    if r.random() < 0.7:
        b.wall_box(w, a0 - 0.02, a1 + 0.02, base + 0.08, top + 0.04, length * r.uniform(0.3, 0.45), length + 0.03,
                   _ID["bed"], b.material("bed"))  # fmt: skip
    n = 1 if width < 1.2 else 2
    for i in range(n):
        p0 = a0 + 0.06 + i * (width - 0.12) / n
        b.wall_box(w, p0, p0 + (width - 0.12) / n - 0.04, top, top + 0.13, 0.1, 0.45, _ID["objects"],
                   b.material("bed"))  # fmt: skip
    for side in (-1, 1):
        if r.random() < 0.7:
            a = a0 - 0.55 if side < 0 else a1 + 0.05
            size = r.uniform(0.4, 0.5)
            if b.wall_free(w, a, a + size, 0, 0.6) and b.floor_free(b.rect(w, a, a + size, 0, 0.42)):
                h = r.uniform(0.45, 0.6)
                b.walls[w].append((a, a + size, 0, h))
                b.floor.append(b.rect(w, a, a + size, 0, 0.42))
                b.wall_box(w, a, a + size, 0, h, 0, 0.42, _ID["furniture"], b.material("furniture"))
                _lamp(b, *b.rect(w, a + 0.1, a + size - 0.1, 0.1, 0.32), h)


def _lamp(b: _Builder, x0, z0, x1, z1, y) -> None:
    cx, cz, s = (x0 + x1) / 2, (z0 + z1) / 2, b.rng.uniform(0.1, 0.16)
    b.add((cx - 0.03, y, cz - 0.03), (cx + 0.03, y + 0.3, cz + 0.03), _ID["objects"], b.material("objects"))
    shade = b.material("white") | dict(emissive=b.rng.uniform(0.0, 0.6))
    b.add((cx - s, y + 0.25, cz - s), (cx + s, y + 0.45, cz + s), _ID["objects"], shade)


def _sofa(b: _Builder) -> None:
    r = b.rng
    width, depth, back = r.uniform(1.4, 2.4), r.uniform(0.8, 0.95), r.uniform(0.75, 0.95)
    spot = b.wall_spot(width, depth, back)
    if spot is None:
        return
    w, a0 = spot
    a1, cover = a0 + width, b.material("sofa")
    b.wall_box(w, a0, a1, 0.05, 0.42, 0, depth, _ID["sofa"], cover)
    b.wall_box(w, a0, a1, 0.42, back, 0, 0.22, _ID["sofa"], cover)
    for lo_a in (a0, a1 - 0.18):
        b.wall_box(w, lo_a, lo_a + 0.18, 0.05, 0.62, 0, depth, _ID["sofa"], cover)
    n = int(r.integers(1, 4))
    for i in range(n):  # seat cushions
        c0 = a0 + 0.18 + i * (width - 0.36) / n
        b.wall_box(w, c0 + 0.01, c0 + (width - 0.36) / n - 0.01, 0.42, 0.5, 0.22, depth, _ID["sofa"], cover)
    for _ in range(int(r.integers(0, 3))):
        p = r.uniform(a0 + 0.2, a1 - 0.6)
        b.wall_box(w, p, p + 0.4, 0.5, 0.85, 0.22, 0.38, _ID["objects"], b.material("objects"))
    if r.random() < 0.7:
        _table(b, b.rect(w, a0 + 0.2, a1 - 0.2, depth + 0.35, depth + r.uniform(0.8, 1.1)), r.uniform(0.35, 0.5), 0)


def _table(b: _Builder, rect, height: float, chairs: int) -> None:
    """A table top on four legs over ``rect`` (x0, z0, x1, z1) with up to ``chairs`` chairs around it."""
    if not b.floor_free(rect):
        return
    b.floor.append(rect)
    x0, z0, x1, z1 = rect
    tex, leg, t = b.material("table"), b.rng.uniform(0.03, 0.06), b.rng.uniform(0.025, 0.05)
    b.add((x0, height - t, z0), (x1, height, z1), _ID["table"], tex)
    apron = leg + 0.02
    b.add((x0 + apron, height - t - 0.09, z0 + apron), (x1 - apron, height - t, z1 - apron), _ID["table"], tex)
    for lx, lz in ((x0, z0), (x1 - leg, z0), (x0, z1 - leg), (x1 - leg, z1 - leg)):
        b.add((lx + 0.02, 0, lz + 0.02), (lx + leg, height - t, lz + leg), _ID["table"], tex)
    b.tops.append((x0, z0, x1, z1, height))
    cx, cz, chair = (x0 + x1) / 2, (z0 + z1) / 2, b.material("chair")
    spots = [(cx, z0 - 0.3, 2), (cx, z1 + 0.3, 3), (x0 - 0.3, cz, 0), (x1 + 0.3, cz, 1)]
    for i in b.rng.permutation(4)[:chairs]:
        _chair(b, *spots[i], chair)


def _chair(b: _Builder, cx: float, cz: float, facing: int, tex: dict) -> None:
    """A chair centred at (cx, cz) whose sitter faces +x, -x, +z or -z (facing 0..3)."""
    s, seat, back = b.rng.uniform(0.22, 0.28), b.rng.uniform(0.42, 0.48), b.rng.uniform(0.8, 1.0)
    rect = (cx - s, cz - s, cx + s, cz + s)
    if not b.floor_free(rect, 0.02):
        return
    b.floor.append(rect)
    b.add((cx - s, seat - 0.05, cz - s), (cx + s, seat, cz + s), _ID["chair"], tex)
    for lx, lz in ((cx - s, cz - s), (cx + s - 0.04, cz - s), (cx - s, cz + s - 0.04), (cx + s - 0.04, cz + s - 0.04)):
        b.add((lx, 0, lz), (lx + 0.04, seat - 0.05, lz + 0.04), _ID["chair"], tex)
    sign = -1 if facing % 2 == 0 else 1  # the back sits behind the sitter
    if facing < 2:
        bx = cx + sign * (s - 0.02)
        b.add((bx - 0.02, seat, cz - s), (bx + 0.02, back, cz + s), _ID["chair"], tex)
    else:
        bz = cz + sign * (s - 0.02)
        b.add((cx - s, seat, bz - 0.02), (cx + s, back, bz + 0.02), _ID["chair"], tex)


def _desk(b: _Builder) -> None:
    r = b.rng
    width, depth, height = r.uniform(1.0, 1.8), r.uniform(0.55, 0.8), r.uniform(0.72, 0.77)
    spot = b.wall_spot(width, depth, height)
    if spot is None:
        return
    w, a0 = spot
    a1, tex = a0 + width, b.material("table")
    b.wall_box(w, a0, a1, height - 0.03, height, 0, depth, _ID["table"], tex)
    b.wall_box(w, a0 + 0.04, a1 - 0.04, height - r.uniform(0.1, 0.45), height - 0.03, 0.05, 0.08, _ID["table"], tex)
    for lo_a in (a0, a1 - 0.04):
        b.wall_box(w, lo_a, lo_a + 0.04, 0, height - 0.03, 0.02, depth - 0.02, _ID["table"], tex)
    if r.random() < 0.4:  # a monitor (tv class) on a foot
        m = r.uniform(0.45, 0.65)
        c = r.uniform(a0 + m / 2 + 0.05, a1 - m / 2 - 0.05)
        b.wall_box(w, c - 0.04, c + 0.04, height, height + 0.12, 0.12, 0.2, _ID["tv"], b.material("dark"))
        b.wall_box(w, c - m / 2, c + m / 2, height + 0.1, height + 0.1 + 0.6 * m, 0.15, 0.18, _ID["tv"], _screen(b))
    b.tops.append((*b.rect(w, a0, a1, 0.25, depth), height))
    xs = b.rect(w, (a0 + a1) / 2, (a0 + a1) / 2, depth + 0.2, depth + 0.2)
    _chair(b, xs[0], xs[1], [1, 0, 3, 2][w], b.material("chair"))


def _screen(b: _Builder) -> dict:
    r = b.rng
    if r.random() < 0.25:  # switched on
        return dict(rgb=b.material("bright")["rgb"], emissive=0.8, cell_mix=0.6, cell_fu=8.0, cell_fv=8.0)
    return b.material("dark") | dict(noise_amp=0.15, noise_freq=6.0, hole_p=r.uniform(0, 1) ** 2)


def _tv(b: _Builder) -> None:
    r = b.rng
    width = r.uniform(0.7, 1.2)
    height = 0.58 * width
    if r.random() < 0.6:
        spot = _cabinet(b, width + r.uniform(0.2, 0.6), 0.45, r.uniform(0.4, 0.6))
        if spot is None:
            return
        w, a0 = spot
        b.tops.pop()
        y0, b0 = b.walls[w][-1][3] + 0.06, 0.15
        b.wall_box(w, a0 + 0.1, a0 + 0.3, y0 - 0.06, y0, 0.1, 0.3, _ID["tv"], b.material("dark"))
    else:
        y0, b0 = r.uniform(0.9, 1.3), 0.0
        spot = b.wall_spot(width, 0, height, y0)
        if spot is None:
            return
        w, a0 = spot
    bezel = b.material("dark")
    b.walls[w].append((a0 + 0.1, a0 + 0.1 + width, y0, y0 + height))
    b.wall_box(w, a0 + 0.1, a0 + 0.1 + width, y0, y0 + height, b0, b0 + 0.06, _ID["tv"], bezel)
    b.wall_box(w, a0 + 0.13, a0 + 0.07 + width, y0 + 0.03, y0 + height - 0.03, b0 + 0.06, b0 + 0.065, _ID["tv"],
               _screen(b))  # fmt: skip


def _kitchen(b: _Builder) -> None:
    r = b.rng
    for _ in range(int(r.integers(1, 3))):
        run = r.uniform(1.2, 3.0)
        spot = _cabinet(b, run, 0.6, 0.86)
        if spot is None:
            continue
        w, a0 = spot
        b.wall_box(
            w,
            a0,
            a0 + run,
            0.86,
            0.9,
            0,
            0.63,
            _ID["furniture"],
            b.material(r.choice(["grey", "white", "dark", "wood"])),
        )
        if r.random() < 0.7 and b.wall_free(w, a0, a0 + run, 1.4, 2.1):
            b.walls[w].append((a0, a0 + run, 1.4, 2.1))
            b.wall_box(w, a0, a0 + run, 1.45, 2.1, 0, 0.35, _ID["furniture"], b.material("furniture"))
    _cabinet(b, r.uniform(0.6, 0.8), 0.7, r.uniform(1.6, 1.9), tex=b.material(r.choice(["white", "grey"])))


def _wall_things(b: _Builder, n: int) -> None:
    """Pictures (framed canvases) and wall-hung objects (clocks, boards, mirrors, switches)."""
    r = b.rng
    for _ in range(n):
        width = r.uniform(0.25, 1.2)
        height = width * r.uniform(0.6, 1.3)
        y0 = r.uniform(1.3, 1.8) - height / 2
        spot = b.wall_spot(width, 0, height, y0)
        if spot is None:
            continue
        w, a0 = spot
        a1, fw = a0 + width, r.uniform(0.015, 0.06)
        if r.random() < 0.7:
            b.wall_box(w, a0, a1, y0, y0 + height, 0, 0.025, _ID["picture"], b.material("frame"))
            canvas = dict(rgb=b.material("objects")["rgb"], noise_amp=0.2, noise_freq=r.uniform(10, 36),
                          cell_mix=r.uniform(0.3, 0.9), cell_fu=r.uniform(3, 15), cell_fv=r.uniform(3, 15))  # fmt: skip
            b.wall_box(w, a0 + fw, a1 - fw, y0 + fw, y0 + height - fw, 0.025, 0.03, _ID["picture"], canvas)
        else:
            b.wall_box(w, a0, a1, y0, y0 + height, 0, r.uniform(0.01, 0.05), _ID["objects"], b.material("objects"))
    for _ in range(int(r.integers(0, 4))):  # switches, sockets, vents
        s = r.uniform(0.06, 0.3)
        spot = b.wall_spot(s, 0, s, r.uniform(0.2, 2.0))
        if spot:
            b.wall_box(spot[0], spot[1], spot[1] + s, b.walls[spot[0]][-1][2], b.walls[spot[0]][-1][3], 0, 0.015,
                       _CLUTTER if r.random() < 0.5 else _ID["objects"], b.material("white"))  # fmt: skip


def _small_things(b: _Builder) -> None:
    """Objects (and some unlabelled clutter) on every top surface and on the floor."""
    r = b.rng
    for x0, z0, x1, z1, y in b.tops:
        for _ in range(r.poisson(1 + 14 * (x1 - x0) * (z1 - z0))):
            sx, sz, sy = r.uniform(0.05, 0.4), r.uniform(0.05, 0.4), r.uniform(0.03, 0.4)
            if sx > x1 - x0 or sz > z1 - z0:
                continue
            px, pz = r.uniform(x0, x1 - sx), r.uniform(z0, z1 - sz)
            if r.random() < 0.08:  # a stack of books lying flat
                books = dict(rgb=b.material("objects")["rgb"], cell_mix=0.8, cell_fu=0.0, cell_fv=r.uniform(20, 40))
                b.add((px, y, pz), (px + max(sx, 0.15), y + min(sy, 0.15), pz + max(sz, 0.2)), _ID["books"], books)
                continue
            cls = _CLUTTER if r.random() < 0.2 else _ID["objects"]
            b.add((px, y, pz), (px + sx, y + sy, pz + sz), cls, b.material("objects"))
    for _ in range(int(r.integers(4, 12))):  # bags, boxes, bins and plants on the floor
        sx, sz, sy = r.uniform(0.15, 0.5), r.uniform(0.15, 0.5), r.uniform(0.1, 0.6)
        px, pz = r.uniform(0, b.dims[0] - sx), r.uniform(0, b.dims[2] - sz)
        if b.floor_free((px, pz, px + sx, pz + sz)):
            b.floor.append((px, pz, px + sx, pz + sz))
            cls = _CLUTTER if r.random() < 0.15 else _ID["objects"]
            b.add((px, 0, pz), (px + sx, sy, pz + sz), cls, b.material("objects"))
            if r.random() < 0.3:  # foliage
                leaves = b.material("fabric") | dict(
                    rgb=_hsv(r.uniform(0.2, 0.4), r.uniform(0.4, 0.8), r.uniform(0.2, 0.6))
                )
                g = r.uniform(0.05, 0.25)
                b.add((px - g, sy, pz - g), (px + sx + g, sy + r.uniform(0.3, 0.9), pz + sz + g), cls, leaves)


_ROOM_TYPES = ("bedroom", "living", "kitchen", "office", "dining")


def build_room(rng: np.random.Generator) -> Room:
    """Draw a furnished room of a random type (bedroom, living room, kitchen, office, dining room)."""
    b, r = _Builder(rng), rng
    W, Hc, D = b.dims
    kind = _ROOM_TYPES[r.choice(5, p=[0.38, 0.25, 0.12, 0.15, 0.1])]
    wall, ceiling, floor = b.material("wall"), b.material("ceiling"), b.material("floor")
    shell = [((-1, -1, -1), (0, Hc + 1, D + 1)), ((W, -1, -1), (W + 1, Hc + 1, D + 1)),
             ((-1, -1, -1), (W + 1, 0, D + 1)), ((-1, Hc, -1), (W + 1, Hc + 1, D + 1)),
             ((-1, -1, -1), (W + 1, Hc + 1, 0)), ((-1, -1, D), (W + 1, Hc + 1, D + 1))]  # fmt: skip
    for i, (lo, hi) in enumerate(shell):
        tex = ceiling if i == 3 else floor if i == 2 else wall | dict(rgb=wall["rgb"] * r.normal(1, 0.03, 3))
        b.add(lo, hi, _ID[["wall", "wall", "floor", "ceiling", "wall", "wall"][i]], tex)
    if r.random() < 0.7:
        _door(b)
    for _ in range(1 + (r.random() < 0.2)):
        _window(b)
    if kind == "bedroom":
        _bed(b)
    if kind == "kitchen":
        _kitchen(b)
    if kind == "living" or r.random() < 0.25:
        for _ in range(int(r.integers(1, 3))):
            _sofa(b)
    if r.random() < (0.85 if kind == "living" else 0.15):
        _tv(b)
    if kind == "office" or r.random() < (0.5 if kind == "bedroom" else 0.2):
        for _ in range(int(r.integers(1, 4 if kind == "office" else 2))):
            _desk(b)
    if kind in ("dining", "kitchen") or r.random() < 0.6:
        tw, td = r.uniform(0.8, 1.8), r.uniform(0.7, 1.0)
        x0, z0 = r.uniform(0.7, max(W - tw - 0.7, 0.8)), r.uniform(0.7, max(D - td - 0.7, 0.8))
        _table(b, (x0, z0, x0 + tw, z0 + td), r.uniform(0.72, 0.78), int(r.integers(2, 5)))
    for _ in range((kind == "office") + (r.random() < 0.35)):
        _bookshelf(b)
    for _ in range(int(r.integers(2, 6))):  # wardrobes, dressers, sideboards, shelves
        _cabinet(b, r.uniform(0.5, 2.0), r.uniform(0.4, 0.65), r.uniform(0.5, 2.2))
    for _ in range(int(r.integers(1, 4))):  # chairs standing about
        _chair(b, r.uniform(0.4, W - 0.4), r.uniform(0.4, D - 0.4), int(r.integers(4)), b.material("chair"))
    if r.random() < 0.4:  # a rug: floor class, under whatever stands there
        x0, z0 = r.uniform(0.3, W / 2), r.uniform(0.3, D / 2)
        b.add(
            (x0, 0, z0), (x0 + r.uniform(1, W / 2), 0.012, z0 + r.uniform(1, D / 2)), _ID["floor"], b.material("carpet")
        )
    _wall_things(b, int(r.integers(2, 7)))
    _small_things(b)
    if r.random() < 0.7:  # a ceiling light
        cx, cz, s = r.uniform(1, W - 1), r.uniform(1, D - 1), r.uniform(0.15, 0.4)
        b.add((cx - s, Hc - r.uniform(0.08, 0.3), cz - s), (cx + s, Hc, cz + s), _ID["objects"],
              b.material("white") | dict(emissive=r.uniform(0.3, 1.0)))  # fmt: skip
    lo, hi, cls, params = zip(*b.boxes, strict=True)
    gain = 255 * r.uniform(0.8, 1.15) * r.normal(1, 0.05, 3)  # exposure and white balance
    noise = np.fft.irfft2(np.fft.rfft2(r.standard_normal((_NOISE, _NOISE))) * _LOWPASS, s=(_NOISE, _NOISE))
    return Room(
        dims=b.dims, lo=np.array(lo, np.float32), hi=np.array(hi, np.float32), classes=np.array(cls, np.uint8),
        colours=(np.array(params)[:, :3] * gain).astype(np.float32),
        texture=np.array(params, np.float32)[:, 3:].T.copy(), noise=(noise / noise.std()).astype(np.float32).ravel(),
        cell_colours=(r.uniform(0.05, 0.95, (64, 3)) * gain).astype(np.float32),
        light=np.array([r.uniform(0.3, 0.7) * W, Hc - 0.2, r.uniform(0.3, 0.7) * D]),
        ambient=r.uniform(0.3, 0.5), diffuse=r.uniform(0.5, 1.0), rgb_noise=r.uniform(1.0, 3.0),
        border_ignore=r.uniform(0.1, 0.5),
    )  # fmt: skip


# correlated over ~6 cells, so nearest-cell lookups show no blocks
_LOWPASS = np.exp(-(np.fft.fftfreq(_NOISE)[:, None] ** 2 + np.fft.rfftfreq(_NOISE)[None, :] ** 2) / (2 * 0.025**2))
