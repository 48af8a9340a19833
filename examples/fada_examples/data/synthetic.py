"""A small synthetic GTA5 -> Cityscapes pair, so the whole pipeline runs with no data set.

Both domains draw street scenes from one grammar (sky, a skyline of buildings and trees, a road
in perspective with sidewalks and terrain, poles carrying signs and lights, cars, buses and
people), stored as Cityscapes label IDs. They differ in appearance only:

* source ("game"): saturated class colours, sharp regular stripe textures, little noise;
* target ("city"): colours mixed across channels and darkened, a vertical illumination
  gradient, blotchy low-frequency texture, strong pixel noise and a slight blur, plus an
  ego-vehicle band (label ID 1, ignored) at the bottom as in Cityscapes.

A model trained on the source alone therefore loses accuracy on the target, and aligning the
two feature distributions can win it back. Generation is deterministic (same arguments, same
bytes) and happens once: a completed root holds ``synthetic.json``; the data are written to a
temporary sibling folder and renamed into place, so concurrent callers (DDP ranks) are safe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import uuid

import numpy as np
from PIL import Image, ImageFilter

from . import labels as L
from .io import read_marker, write_marker

__all__ = ["make_synthetic_data", "draw_scene", "render", "SYNTHETIC_VERSION"]

SYNTHETIC_VERSION = 1
_MARKER = "synthetic.json"

# Cityscapes label IDs used by the scene grammar.
UNLABELED, EGO, ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE = 0, 1, 7, 8, 11, 12, 13, 17
LIGHT, SIGN, VEGETATION, TERRAIN, SKY, PERSON, CAR, BUS = 19, 20, 21, 22, 23, 24, 26, 28

_TRAIN_CITIES = ("aachen", "bochum")
_VAL_CITIES = ("frankfurt",)


def _rect(lab: np.ndarray, x0: float, y0: float, x1: float, y1: float, value: int) -> None:
    h, w = lab.shape
    xa, xb = int(np.clip(round(x0), 0, w)), int(np.clip(round(x1), 0, w))
    ya, yb = int(np.clip(round(y0), 0, h)), int(np.clip(round(y1), 0, h))
    if xb > xa and yb > ya:
        lab[ya:yb, xa:xb] = value


@dataclasses.dataclass
class _Street:
    """A scene's perspective: depth ``t`` runs from 0 at the horizon to 1 at the bottom row, and the
    road (centred at ``cx``) and its sidewalks widen with it."""

    width: int
    height: int
    horizon: int
    cx: float

    def row(self, t):
        return self.horizon + t * (self.height - self.horizon)

    def road_half(self, t):
        return self.width * (0.03 + 0.55 * t)

    def sidewalk(self, t):
        return self.width * (0.02 + 0.18 * t)


def draw_scene(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """One street scene as an (H, W) uint8 map of Cityscapes label IDs: sky, skyline, ground, poles,
    then people and vehicles (the random draws in that order: the data's bytes depend on it)."""
    lab = np.full((height, width), SKY, dtype=np.uint8)
    horizon = int(height * rng.uniform(0.40, 0.52))
    _draw_skyline(lab, rng, horizon)
    street = _Street(width, height, horizon, cx=width * rng.uniform(0.4, 0.6))
    _draw_ground(lab, street)
    _draw_poles(lab, rng, street)
    _draw_traffic(lab, rng, street)
    return lab


def _draw_skyline(lab: np.ndarray, rng: np.random.Generator, horizon: int) -> None:
    """Buildings (sometimes a wall at their foot), trees, gaps of sky; sometimes a fence."""
    H, W = lab.shape
    x = 0
    while x < W:
        bw = int(W * rng.uniform(0.08, 0.22)) + 1
        kind = rng.choice([BUILDING, BUILDING, BUILDING, VEGETATION, SKY])
        if kind == BUILDING:
            _rect(lab, x, horizon * rng.uniform(0.05, 0.7), x + bw, horizon, BUILDING)
            if rng.random() < 0.3:
                _rect(lab, x, horizon - H * 0.06, x + bw, horizon, WALL)
        elif kind == VEGETATION:
            _rect(lab, x, horizon * rng.uniform(0.45, 0.85), x + bw, horizon, VEGETATION)
        x += bw
    if rng.random() < 0.5:
        fx = W * rng.uniform(0.0, 0.6)
        _rect(lab, fx, horizon - H * 0.05, fx + W * rng.uniform(0.15, 0.4), horizon, FENCE)


def _draw_ground(lab: np.ndarray, street: _Street) -> None:
    """Below the horizon: road in the middle, sidewalks, terrain outside."""
    H, W = lab.shape
    t = (np.arange(street.horizon, H) - street.horizon + 1) / max(1, H - street.horizon)
    road_half = street.road_half(t)
    dist = np.abs(np.arange(W)[None, :] - street.cx)
    ground = np.where(dist <= road_half[:, None], ROAD,
                      np.where(dist <= (road_half + street.sidewalk(t))[:, None], SIDEWALK, TERRAIN))
    lab[street.horizon:] = ground.astype(np.uint8)


def _draw_poles(lab: np.ndarray, rng: np.random.Generator, street: _Street) -> None:
    """Poles in the middle of the sidewalks, each carrying a sign or a light."""
    H, W = lab.shape
    for _ in range(int(rng.integers(1, 4))):
        t = rng.uniform(0.2, 0.8)
        side = rng.choice([-1.0, 1.0])
        base = street.row(t)
        px = street.cx + side * (street.road_half(t) + street.sidewalk(t) * 0.5)
        pw = max(1.0, W * 0.012 * (0.5 + t))
        ph = H * (0.25 + 0.35 * t)
        _rect(lab, px - pw / 2, base - ph, px + pw / 2, base, POLE)
        s = pw * 3.5
        _rect(lab, px - s / 2, base - ph - s * 0.8, px + s / 2, base - ph + s * 0.2,
              SIGN if rng.random() < 0.6 else LIGHT)


def _draw_traffic(lab: np.ndarray, rng: np.random.Generator, street: _Street) -> None:
    """People on the sidewalks, cars and buses on the road, drawn far to near (near ones in front)."""
    W = lab.shape[1]
    objects = [("person", rng.uniform(0.15, 0.9)) for _ in range(int(rng.integers(0, 3)))]
    for _ in range(int(rng.integers(1, 4))):
        objects.append(("bus" if rng.random() < 0.15 else "car", rng.uniform(0.1, 0.9)))
    for kind, t in sorted(objects, key=lambda o: o[1]):
        base, road_half = street.row(t), street.road_half(t)
        if kind == "person":
            side = rng.choice([-1.0, 1.0])
            px = street.cx + side * (road_half + street.sidewalk(t) * rng.uniform(0.2, 0.8))
            pw = max(1.0, W * 0.02 * (0.4 + t))
            _rect(lab, px - pw / 2, base - pw * 3.2, px + pw / 2, base, PERSON)
        else:
            vx = street.cx + rng.uniform(-0.7, 0.7) * road_half
            vw = W * (0.05 + 0.2 * t) * (1.6 if kind == "bus" else 1.0)
            vh = vw * (0.9 if kind == "bus" else 0.55)
            _rect(lab, vx - vw / 2, base - vh, vx + vw / 2, base, BUS if kind == "bus" else CAR)


_CS_COLORS = np.zeros((256, 3), dtype=np.float64)
for _lab in L._CITYSCAPES_LABELS:
    if 0 <= _lab.id < 256:
        _CS_COLORS[_lab.id] = _lab.color
_CS_COLORS[UNLABELED] = (30, 30, 30)
_CS_COLORS[EGO] = (25, 25, 25)
# Stripe frequencies per label ID (source texture): windows, lane-like bands, foliage.
_FREQ = np.zeros((256, 2))
for _id, _f in {BUILDING: (0.0, 0.25), ROAD: (0.08, 0.0), SIDEWALK: (0.2, 0.2),
                VEGETATION: (0.3, 0.15), TERRAIN: (0.12, 0.12), CAR: (0.0, 0.4),
                WALL: (0.15, 0.0), FENCE: (0.5, 0.0), BUS: (0.25, 0.0)}.items():
    _FREQ[_id] = _f
_MIX = np.array([[0.55, 0.35, 0.10], [0.15, 0.55, 0.30], [0.30, 0.10, 0.60]])


def render(label_ids: np.ndarray, rng: np.random.Generator, domain: str) -> np.ndarray:
    """(H, W, 3) uint8 image of a label-ID map in the ``source`` or ``target`` style."""
    h, w = label_ids.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    if domain == "source":
        table = np.clip(_CS_COLORS * 1.1 + 10, 0, 255)
        img = table[label_ids] + rng.uniform(-12, 12, size=3)
        f = _FREQ[label_ids]
        img += (14.0 * np.sin(2 * np.pi * (f[..., 0] * xx + f[..., 1] * yy)))[..., None]
        img += rng.normal(0, 3, size=img.shape)
        return np.clip(img, 0, 255).astype(np.uint8)
    if domain != "target":
        raise ValueError(f"domain must be 'source' or 'target', got {domain!r}")
    table = _CS_COLORS @ _MIX.T * 0.8 + np.array([25.0, 18.0, 5.0])
    img = table[label_ids] + rng.uniform(-12, 12, size=3)
    light = 0.8 + 0.35 * (yy / max(1, h - 1))
    img *= light[..., None]
    blotch = rng.normal(0, 1, size=(max(2, h // 8), max(2, w // 8)))
    blotch = np.asarray(Image.fromarray(blotch.astype(np.float32), mode="F")
                        .resize((w, h), Image.BILINEAR))
    img += (8.0 * blotch)[..., None]
    img += rng.normal(0, 10, size=img.shape)
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="RGB")
    return np.asarray(out.filter(ImageFilter.GaussianBlur(0.7)))


def _palette_png(label_ids: np.ndarray) -> Image.Image:
    """GTA5 stores labels as palette PNGs whose index is the label ID."""
    img = Image.fromarray(label_ids, mode="P")
    pal = np.zeros((256, 3), dtype=np.uint8)
    pal[:] = _CS_COLORS.astype(np.uint8)
    img.putpalette(pal.reshape(-1).tolist())
    return img


def _write(root: str, params: dict) -> None:
    """The source set, the target set and the source's class lists under ``root``; the marker last."""
    from .datasets import GTA5Dataset
    from .sampling import class_lists_cache_name, compute_class_lists, save_class_lists

    src = os.path.join(root, "gta5")
    _write_source(src, params)
    _write_target(os.path.join(root, "cityscapes"), params)
    save_class_lists(compute_class_lists(GTA5Dataset(src)), os.path.join(src, class_lists_cache_name(19)))
    write_marker(os.path.join(root, _MARKER), params)


def _write_source(src: str, params: dict) -> None:
    """GTA5 layout: ``images/00001.png`` and palette-PNG ``labels/00001.png``."""
    w, h = params["size"]
    os.makedirs(os.path.join(src, "images"))
    os.makedirs(os.path.join(src, "labels"))
    for i in range(params["num_source"]):
        rng = np.random.default_rng([params["seed"], 0, i])
        lab = draw_scene(rng, w, h)
        name = f"{i + 1:05d}.png"
        Image.fromarray(render(lab, rng, "source"), mode="RGB").save(os.path.join(src, "images", name))
        _palette_png(lab).save(os.path.join(src, "labels", name))


def _write_target(tgt: str, params: dict) -> None:
    """Cityscapes layout, train and val splits, with the ego-vehicle band at the bottom."""
    w, h = params["size"]
    for split, count, cities, code in (("train", params["num_target_train"], _TRAIN_CITIES, 1),
                                       ("val", params["num_target_val"], _VAL_CITIES, 2)):
        for i in range(count):
            city = cities[i % len(cities)]
            rng = np.random.default_rng([params["seed"], code, i])
            lab = draw_scene(rng, w, h)
            lab[int(h * 0.93):] = EGO
            stem = f"{city}_{i:06d}_000019"
            img_dir = os.path.join(tgt, "leftImg8bit", split, city)
            gt_dir = os.path.join(tgt, "gtFine", split, city)
            os.makedirs(img_dir, exist_ok=True)
            os.makedirs(gt_dir, exist_ok=True)
            Image.fromarray(render(lab, rng, "target"), mode="RGB").save(
                os.path.join(img_dir, f"{stem}_leftImg8bit.png"))
            Image.fromarray(lab, mode="L").save(os.path.join(gt_dir, f"{stem}_gtFine_labelIds.png"))


def _paths(root: str) -> dict:
    return {"source": os.path.join(root, "gta5"), "target": os.path.join(root, "cityscapes"),
            "class_lists": os.path.join(root, "gta5", "class_lists_19.json")}


def _checked_params(num_source, num_target_train, num_target_val, size, seed) -> dict:
    """The arguments as the marker file records them; ValueError on a count < 1 or a side < 16."""
    params = {"version": SYNTHETIC_VERSION, "num_source": int(num_source),
              "num_target_train": int(num_target_train), "num_target_val": int(num_target_val),
              "size": [int(size[0]), int(size[1])], "seed": int(seed)}
    if min(params["num_source"], params["num_target_train"], params["num_target_val"]) < 1:
        raise ValueError(f"every image count must be >= 1, got {params}")
    if min(params["size"]) < 16:
        raise ValueError(f"size must be at least (16, 16), got {tuple(size)}")
    return params


def _finished(root: str, params: dict) -> bool:
    """Whether ``root`` holds finished synthetic data made with ``params`` (ValueError: other params)."""
    found = read_marker(os.path.join(root, _MARKER))
    if found is None:
        return False
    if found != params:
        raise ValueError(f"{root} already holds synthetic data made with {found}, not "
                         f"{params}; pass another root or delete it")
    return True


def _write_then_rename(root: str, params: dict) -> None:
    """Write into a temporary sibling of ``root`` and rename it into place, so that a reader never sees
    half the data; when another process renamed its copy first, that copy is used if it matches."""
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(root)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.makedirs(tmp)
        _write(tmp, params)
        if os.path.isdir(root):
            with contextlib.suppress(OSError):
                os.rmdir(root)  # empty: make room for the rename
        try:
            os.rename(tmp, root)
        except OSError:
            if not _finished(root, params):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def make_synthetic_data(root: str, *, num_source: int = 24, num_target_train: int = 16,
                        num_target_val: int = 8, size=(160, 96), seed: int = 0) -> dict:
    """Write the synthetic source/target sets under ``root`` once; return their roots.

    Args:
        root: output folder (created; must be empty or a previous synthetic root).
        num_source: GTA5-layout source images (``gta5/images/00001.png``, ``gta5/labels/...``).
        num_target_train, num_target_val: Cityscapes-layout target images per split.
        size: (W, H) of every image.
        seed: generation seed (same arguments -> same bytes).

    Returns:
        ``dict(source=<gta5 root>, target=<cityscapes root>, class_lists=<JSON for
        class-balanced sampling of the source>)``.

    Raises:
        ValueError: ``root`` holds synthetic data made with other arguments.
        FileExistsError: ``root`` is a non-empty folder without synthetic data.
    """
    params = _checked_params(num_source, num_target_train, num_target_val, size, seed)
    root = os.path.abspath(root)
    if not _finished(root, params):
        if os.path.isdir(root) and os.listdir(root):
            raise FileExistsError(f"{root} is not empty and holds no synthetic data ({_MARKER} "
                                  "missing); pass an empty or new folder")
        _write_then_rename(root, params)
    return _paths(root)
