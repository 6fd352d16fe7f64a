"""Rendering of :class:`kfold.data.synthetic.rooms.Room` views for :mod:`kfold.data.synthetic`.

Views are rendered by vectorised ray casting (slab tests of all pixels of a box's screen rectangle at once)
and shaded into RGB, Kinect-like millimetre depth with noise and holes, and 13-class labels.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from kfold.data.layout import IGNORE_INDEX
from kfold.data.synthetic.rooms import _NOISE, PARAMS, Room


def _camera(rng: np.random.Generator, room: Room) -> tuple[np.ndarray, np.ndarray]:
    """Sample a camera origin and rotation (columns: right, down, forward) inside the free floor area."""
    W, Hc, D = room.dims
    pose = None
    for _ in range(200):
        o = np.array([rng.uniform(0.4, W - 0.4), rng.uniform(1.0, 1.75), rng.uniform(0.4, D - 0.4)])
        if np.any(np.all((room.lo[6:] - 0.35 < o) & (o < room.hi[6:] + 0.35), axis=1)):
            continue  # inside or within 35 cm of a box
        if rng.random() < 0.75:  # like a person filming a room: aim at a piece of furniture or an object
            size = np.cbrt(np.prod(room.hi[6:] - room.lo[6:], axis=1))  # favour big pieces a little
            k = 6 + rng.choice(len(size), p=size / size.sum())
            target = (room.lo[k] + room.hi[k]) / 2 + rng.normal(0, 0.3, 3)
            target[1] = np.clip(target[1], 0.1, 1.1)
        else:  # anywhere, now and then up at the ceiling
            high = rng.uniform(1.5, Hc) if rng.random() < 0.25 else rng.uniform(0.1, 1.1)
            target = np.array([rng.uniform(0.2, W - 0.2), high, rng.uniform(0.2, D - 0.2)])
        flat = np.hypot(target[0] - o[0], target[2] - o[2])
        pose = o, target, flat
        if flat > 1.6:
            break
    if pose is None:
        raise RuntimeError(f"no free camera position in a {W:.1f} x {D:.1f} m room")
    o, target, flat = pose
    yaw = np.arctan2(target[0] - o[0], target[2] - o[2]) + rng.normal(0, 0.15)
    pitch = np.clip(np.arctan2(target[1] - o[1], flat) + rng.normal(0, 0.08), -0.75, 0.3)
    fwd = np.array([np.sin(yaw) * np.cos(pitch), np.sin(pitch), np.cos(yaw) * np.cos(pitch)])
    right = np.cross(fwd, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)
    down = np.cross(fwd, right)
    roll = rng.normal(0, 0.03)
    right, down = np.cos(roll) * right + np.sin(roll) * down, np.cos(roll) * down - np.sin(roll) * right
    return o, np.stack([right, down, fwd], axis=1)


_EDGES = [(i, j) for i in range(8) for j in range(i + 1, 8) if bin(i ^ j).count("1") == 1]


def _screen_rects(lo, hi, rot, f: float, size: tuple[int, int], near: float = 0.05):
    """Pixel rectangles (r0, r1, c0, c1) bounding each box's projection, clipped at the near plane.

    Args:
        lo, hi: (K, 3) box corners relative to the camera origin.
    """
    H, W = size
    corners = np.stack([np.where(np.array(m, bool), hi, lo) for m in np.ndindex(2, 2, 2)], axis=1)
    cam = corners @ rot  # (K, 8, 3) camera frame
    a, b = cam[:, [e[0] for e in _EDGES]], cam[:, [e[1] for e in _EDGES]]
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (near - a[..., 2:]) / (b[..., 2:] - a[..., 2:])
    cross = a + np.clip(np.nan_to_num(t), 0, 1) * (b - a)  # where each edge meets the near plane
    points = np.concatenate([cam, cross], axis=1)
    ok = points[..., 2] >= near * 0.999
    z = np.maximum(points[..., 2], near * 0.999)
    u = np.where(ok, points[..., 0] / z * f + W / 2, np.nan)
    v = np.where(ok, points[..., 1] / z * f + H / 2, np.nan)
    seen = ok.any(axis=1)
    u[~seen], v[~seen] = 0.0, 0.0
    with np.errstate(invalid="ignore"):
        c0 = np.clip(np.floor(np.nanmin(u, 1)) - 1, 0, W).astype(int)
        c1 = np.where(seen, np.clip(np.ceil(np.nanmax(u, 1)) + 2, 0, W), 0).astype(int)
        r0 = np.clip(np.floor(np.nanmin(v, 1)) - 1, 0, H).astype(int)
        r1 = np.where(seen, np.clip(np.ceil(np.nanmax(v, 1)) + 2, 0, H), 0).astype(int)
    return r0, r1, c0, c1


def _cast(room: Room, o: np.ndarray, rot: np.ndarray, f: float, size: tuple[int, int]):
    """Ray-cast one view.

    Returns z-depth (H, W), index of the hit box (H, W), axis of the hit face (H, W), the world ray
    directions (3, H, W) and 1 / their length (H, W). The room shell is solved analytically; every
    other box is slab-tested on the pixels of its screen rectangle only, nearest boxes first, and
    skipped when something nearer already covers its rectangle.
    """
    H, W = size
    xs = ((np.arange(W, dtype=np.float32) + 0.5 - W / 2) / f)[None, :]
    ys = ((np.arange(H, dtype=np.float32) + 0.5 - H / 2) / f)[:, None]
    r32 = rot.astype(np.float32)[:, :, None, None]
    # camera-frame direction (x, y, 1): the ray parameter t is then the z-depth along the optical axis
    d = xs * r32[:, 0] + ys * r32[:, 1] + r32[:, 2]
    inv_len = 1 / np.sqrt(xs**2 + ys**2 + 1)  # the rotation keeps lengths
    o32 = o.astype(np.float32)[:, None, None]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv = 1 / d
        # the camera is inside the room: per axis, the larger of the two plane hits is the exit
        exits = np.maximum(inv * (room.dims.astype(np.float32)[:, None, None] - o32), inv * -o32)
        depth = exits.min(axis=0)
        x_exit, y_exit = exits[0] == depth, exits[1] == depth
        axis = np.where(x_exit, 0, np.where(y_exit, 1, 2)).astype(np.int8)
        # shell box 2 * axis + (ray goes towards +axis): x-, x+, floor, ceiling, z-, z+
        index = np.where(x_exit, d[0] > 0, np.where(y_exit, 2 + (d[1] > 0), 4 + (d[2] > 0))).astype(np.intp)

        lo, hi = room.lo[6:] - o.astype(np.float32), room.hi[6:] - o.astype(np.float32)
        r0, r1, c0, c1 = _screen_rects(lo, hi, rot, f, size)
        # distance to the box times the smallest cosine of a ray (at an image corner) bounds its z-depth
        nearest = np.linalg.norm(np.maximum(np.maximum(lo, -hi), 0), axis=1) * inv_len.min()
        visible = np.flatnonzero((c1 > c0) & (r1 > r0))
        for k in visible[np.argsort(nearest[visible], kind="stable")]:
            sl = (slice(r0[k], r1[k]), slice(c0[k], c1[k]))
            if nearest[k] > depth[sl].max():
                continue
            part = inv[:, sl[0], sl[1]]
            t1, t2 = part * lo[k][:, None, None], part * hi[k][:, None, None]
            t_in = np.minimum(t1, t2)
            near = t_in.max(axis=0)
            closer = (near < np.maximum(t1, t2).min(axis=0)) & (near < depth[sl]) & (near > 0)
            np.copyto(depth[sl], near, where=closer)
            np.copyto(index[sl], k + 6, where=closer)
            np.copyto(axis[sl], np.where(t_in[0] == near, 0, np.where(t_in[1] == near, 1, 2)), where=closer,
                      casting="unsafe")  # fmt: skip
    return depth, index, axis, d, inv_len


def _shade(rng, room: Room, o, view: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Textured, Lambert-shaded, noisy RGB (uint8), |cos| of the incidence angle and per-pixel dropout odds."""
    depth, index, axis, d, inv_len = view
    H, W = depth.shape
    p = [np.float32(o[a]) + depth * d[a] for a in range(3)]  # hit points
    on_x, on_y = axis == 0, axis == 1
    u, v = np.where(on_x, p[2], p[0]), np.where(on_y, p[2], p[1])  # in-face coordinates, u horizontal on walls
    table = room.texture
    col = {name: table[i] for i, name in enumerate(PARAMS[3:])}
    nf, n = col["noise_freq"].take(index), _NOISE  # a power of two: "& (n - 1)" wraps negative indices too
    noise = room.noise.take(((u * nf).astype(np.int32) & (n - 1)) * n + ((v * nf).astype(np.int32) & (n - 1)))
    tex = 1 + col["noise_amp"].take(index) * noise
    if col["stripe_amp"].any():  # wood grain, curtain folds, blind slats
        phase = u * col["stripe_fu"].take(index) + v * col["stripe_fv"].take(index) + 3 * noise
        tex += col["stripe_amp"].take(index) * np.sin(phase)
    if col["check_amp"].any():  # floor tiles
        size = col["check_size"].take(index)
        tex += col["check_amp"].take(index) * ((np.floor(u / size) + np.floor(v / size)) % 2 - 0.5)
    # Lambert from a ceiling light, a weak fill along the view ray and ambient light; the face normal
    # is the hit axis, pointing against the ray
    d_n = np.where(on_x, d[0], np.where(on_y, d[1], d[2]))
    cos_view = np.abs(d_n) * inv_len
    to_light = [np.float32(room.light[a]) - p[a] for a in range(3)]
    dist2 = to_light[0] ** 2 + to_light[1] ** 2 + to_light[2] ** 2 + np.float32(1e-3)
    l_n = np.where(on_x, to_light[0], np.where(on_y, to_light[1], to_light[2]))
    lambert = np.maximum(np.where(d_n < 0, l_n, -l_n), 0) / np.sqrt(dist2)
    shade = room.ambient + room.diffuse * lambert / (1 + np.float32(0.08) * dist2) + np.float32(0.15) * cos_view
    if col["emissive"].any():
        shade += (1 - shade) * col["emissive"].take(index)
    shade *= tex
    rgb = np.empty((H, W, 3), np.float32)
    for c in range(3):  # one 1-D take per channel: far faster than fancy-indexing a (K, 3) table
        np.multiply(room.colours[:, c].take(index), shade, out=rgb[..., c])
    cells = np.flatnonzero(col["cell_mix"].take(index))
    if cells.size:  # book spines and picture content: a random colour per cell
        k = index.flat[cells]
        cu = np.floor(u.flat[cells] * col["cell_fu"][k]).astype(np.int64)
        cv = np.floor(v.flat[cells] * col["cell_fv"][k]).astype(np.int64)
        cell = ((cu * 73856093) ^ (cv * 19349663) ^ k) % len(room.cell_colours)
        mix = col["cell_mix"][k][:, None]
        mixed = (1 - mix) * room.colours[k] + mix * room.cell_colours[cell]
        rgb.reshape(-1, 3)[cells] = mixed * shade.flat[cells][:, None]
    # sensor noise: uniform with standard deviation rgb_noise, shared by the channels
    rgb += ((rng.random((H, W), dtype=np.float32) - np.float32(0.5)) * np.float32(3.46 * room.rgb_noise))[..., None]
    return np.clip(rgb, 0, 255, out=rgb).astype(np.uint8), cos_view, col["hole_p"].take(index)


def _kinect_depth(rng, depth, cos_view, dropout) -> np.ndarray:
    """Millimetre uint16 depth: disparity quantisation, depth-proportional noise and holes (0)."""
    H, W = depth.shape
    jitter, chance = rng.random((2, H, W), dtype=np.float32)
    # Kinect-like: 1/8-pixel disparity steps (depth steps grow as z^2) with half a step of jitter
    disparity = 348.0 / depth + (jitter - np.float32(0.5)) * np.float32(1.7)
    z = 348.0 / np.round(np.maximum(disparity, 1.0))
    holes = (depth < 0.5) | (depth > 9.5) | (chance < dropout)
    holes |= (cos_view < 0.12) & (chance < 0.8)
    # shadow band right of depth discontinuities (the IR projector sits beside the camera)
    jump = np.zeros_like(holes)
    jump[:, 1:] = np.abs(np.diff(depth, axis=1)) > 0.03 * depth[:, 1:] + 0.05
    for shift in range(int(rng.integers(1, 4))):
        holes[:, shift:] |= jump[:, : W - shift] & (chance[:, shift:] < 0.9 - 0.2 * shift)
    for _ in range(int(rng.integers(0, 4))):  # random dropout blobs (specular or dark spots)
        cy, cx, ry, rx = rng.uniform(0, H), rng.uniform(0, W), rng.uniform(2, 14), rng.uniform(2, 20)
        y0, y1 = int(max(cy - ry, 0)), int(min(cy + ry + 1, H))
        x0, x1 = int(max(cx - rx, 0)), int(min(cx + rx + 1, W))
        yy, xx = np.ogrid[y0:y1, x0:x1]
        holes[y0:y1, x0:x1] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    return np.where(holes, 0, np.round(z * 1000).clip(0, 65535)).astype(np.uint16)


def _labels(rng, room: Room, index: np.ndarray) -> np.ndarray:
    """Class ids per pixel; unlabelled clutter and a share of class borders become ignore (255)."""
    label = room.classes.take(index)
    border = np.zeros(label.shape, bool)
    border[:, 1:] = label[:, 1:] != label[:, :-1]
    border[1:, :] |= label[1:, :] != label[:-1, :]
    label[border & (rng.random(label.shape, dtype=np.float32) < room.border_ignore)] = IGNORE_INDEX
    return label


class View(NamedTuple):
    """One rendered view: what the sensor gives, the labels, and what a depth teacher would predict."""

    rgb: np.ndarray  # uint8 (H, W, 3)
    depth: np.ndarray  # uint16 (H, W) millimetres, Kinect-like noise and holes (0)
    label: np.ndarray  # uint8 (H, W) class ids, 255 = ignore
    teacher: np.ndarray  # uint16 (H, W) millimetres, no holes


def teacher_depth(depth_m: np.ndarray) -> np.ndarray:
    """A metric-depth teacher's prediction: dense (no holes, it sees glass) but biased.

    The scale error drifts from -3 % at the left edge to +3 % at the right, as a monocular teacher's error
    varies across an image; a deterministic function of the ray-cast depth, so it draws nothing from the
    view's generator and the other arrays are unchanged by it.
    """
    W = depth_m.shape[1]
    scale = 1.0 + np.float32(0.06) * (np.arange(W, dtype=np.float32) / max(W - 1, 1) - np.float32(0.5))
    return np.round(depth_m * scale[None, :] * 1000).clip(0, 65535).astype(np.uint16)


def render_view(rng: np.random.Generator, room: Room, size: tuple[int, int]) -> View:
    """Render one random view of ``room`` (see :class:`View`)."""
    H, W = size
    for _ in range(8):  # re-draw views that stare at a surface from up close
        o, rot = _camera(rng, room)
        f = W / 2 / np.tan(np.radians(rng.uniform(55, 65)) / 2)
        view = _cast(room, o, rot, f, size)
        if np.median(view[0][::4, ::4]) > 1.2:
            break
    rgb, cos_view, dropout = _shade(rng, room, o, view)
    depth = _kinect_depth(rng, view[0], cos_view, dropout)
    return View(rgb, depth, _labels(rng, room, view[1]), teacher_depth(view[0]))
