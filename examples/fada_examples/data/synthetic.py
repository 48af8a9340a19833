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

import json
import os
import shutil
import uuid

import numpy as np
from PIL import Image, ImageFilter

from . import labels as L

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


def draw_scene(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """One street scene as an (H, W) uint8 map of Cityscapes label IDs."""
    W, H = width, height
    lab = np.full((H, W), SKY, dtype=np.uint8)
    horizon = int(H * rng.uniform(0.40, 0.52))

    # Skyline: buildings (sometimes a wall at their foot), trees, gaps of sky.
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

    # Ground in perspective: road in the middle, sidewalks, terrain outside.
    cx = W * rng.uniform(0.4, 0.6)
    ys = np.arange(horizon, H)
    t = (ys - horizon + 1) / max(1, H - horizon)
    road_half = W * (0.03 + 0.55 * t)
    walk = W * (0.02 + 0.18 * t)
    xs = np.arange(W)[None, :]
    dist = np.abs(xs - cx)
    ground = np.where(dist <= road_half[:, None], ROAD,
                      np.where(dist <= (road_half + walk)[:, None], SIDEWALK, TERRAIN))
    lab[horizon:] = ground.astype(np.uint8)

    def depth_row(tt: float) -> float:
        return horizon + tt * (H - horizon)

    # Poles on the sidewalks, carrying a sign or a light.
    for _ in range(int(rng.integers(1, 4))):
        tt = rng.uniform(0.2, 0.8)
        side = rng.choice([-1.0, 1.0])
        base = depth_row(tt)
        px = cx + side * (W * (0.03 + 0.55 * tt) + W * (0.02 + 0.18 * tt) * 0.5)
        pw = max(1.0, W * 0.012 * (0.5 + tt))
        ph = H * (0.25 + 0.35 * tt)
        _rect(lab, px - pw / 2, base - ph, px + pw / 2, base, POLE)
        s = pw * 3.5
        _rect(lab, px - s / 2, base - ph - s * 0.8, px + s / 2, base - ph + s * 0.2,
              SIGN if rng.random() < 0.6 else LIGHT)

    # People on the sidewalks, vehicles on the road (far to near).
    objects = []
    for _ in range(int(rng.integers(0, 3))):
        objects.append(("person", rng.uniform(0.15, 0.9)))
    for _ in range(int(rng.integers(1, 4))):
        objects.append(("bus" if rng.random() < 0.15 else "car", rng.uniform(0.1, 0.9)))
    for kind, tt in sorted(objects, key=lambda o: o[1]):
        base = depth_row(tt)
        rh, ww = W * (0.03 + 0.55 * tt), W * (0.02 + 0.18 * tt)
        if kind == "person":
            side = rng.choice([-1.0, 1.0])
            px = cx + side * (rh + ww * rng.uniform(0.2, 0.8))
            pw = max(1.0, W * 0.02 * (0.4 + tt))
            _rect(lab, px - pw / 2, base - pw * 3.2, px + pw / 2, base, PERSON)
        else:
            vx = cx + rng.uniform(-0.7, 0.7) * rh
            vw = W * (0.05 + 0.2 * tt) * (1.6 if kind == "bus" else 1.0)
            vh = vw * (0.9 if kind == "bus" else 0.55)
            _rect(lab, vx - vw / 2, base - vh, vx + vw / 2, base, BUS if kind == "bus" else CAR)
    return lab


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
    w, h = params["size"]
    seed = params["seed"]
    src = os.path.join(root, "gta5")
    os.makedirs(os.path.join(src, "images"))
    os.makedirs(os.path.join(src, "labels"))
    for i in range(params["num_source"]):
        rng = np.random.default_rng([seed, 0, i])
        lab = draw_scene(rng, w, h)
        name = f"{i + 1:05d}.png"
        Image.fromarray(render(lab, rng, "source"), mode="RGB").save(
            os.path.join(src, "images", name))
        _palette_png(lab).save(os.path.join(src, "labels", name))
    tgt = os.path.join(root, "cityscapes")
    for split, count, cities, code in (("train", params["num_target_train"], _TRAIN_CITIES, 1),
                                       ("val", params["num_target_val"], _VAL_CITIES, 2)):
        for i in range(count):
            city = cities[i % len(cities)]
            rng = np.random.default_rng([seed, code, i])
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

    from .datasets import GTA5Dataset
    from .sampling import class_lists_cache_name, compute_class_lists, save_class_lists

    save_class_lists(compute_class_lists(GTA5Dataset(src)), os.path.join(src, class_lists_cache_name(19)))
    with open(os.path.join(root, _MARKER), "w", encoding="utf-8") as f:
        json.dump(params, f, indent=1, sort_keys=True)


def _paths(root: str) -> dict:
    return {"source": os.path.join(root, "gta5"), "target": os.path.join(root, "cityscapes"),
            "class_lists": os.path.join(root, "gta5", "class_lists_19.json")}


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
    params = {"version": SYNTHETIC_VERSION, "num_source": int(num_source),
              "num_target_train": int(num_target_train), "num_target_val": int(num_target_val),
              "size": [int(size[0]), int(size[1])], "seed": int(seed)}
    if min(params["num_source"], params["num_target_train"], params["num_target_val"]) < 1:
        raise ValueError(f"every image count must be >= 1, got {params}")
    if min(params["size"]) < 16:
        raise ValueError(f"size must be at least (16, 16), got {tuple(size)}")
    root = os.path.abspath(root)

    def existing() -> dict | None:
        marker = os.path.join(root, _MARKER)
        if not os.path.isfile(marker):
            return None
        with open(marker, "r", encoding="utf-8") as f:
            found = json.load(f)
        if found != params:
            raise ValueError(f"{root} already holds synthetic data made with {found}, not "
                             f"{params}; pass another root or delete it")
        return _paths(root)

    done = existing()
    if done is not None:
        return done
    if os.path.isdir(root) and os.listdir(root):
        raise FileExistsError(f"{root} is not empty and holds no synthetic data ({_MARKER} "
                              "missing); pass an empty or new folder")
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(root)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.makedirs(tmp)
        _write(tmp, params)
        if os.path.isdir(root):
            try:
                os.rmdir(root)  # empty: make room for the rename
            except OSError:
                pass
        try:
            os.rename(tmp, root)
        except OSError:
            # Another process finished first: use its data if it matches.
            done = existing()
            if done is None:
                raise
            return done
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return _paths(root)
