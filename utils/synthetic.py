"""Deterministic synthetic detection dataset: coloured geometric shapes on cluttered backgrounds.

The dataset is meant for quick training and distillation demos at small image sizes (128-192 px) that still leave
room between a small and a large model: objects vary in colour, size (tiny to large), rotation and aspect ratio,
overlap and occlude each other, and sit on textured backgrounds next to look-alike distractors that are not classes.
Every label is the tight box of the object's visible pixels; objects hidden more than ``MAX_HIDDEN`` are not labelled.

Each image is drawn from its own generator seeded by (seed, split, index), so for a given seed (and OpenCV build) the
files are byte-identical whatever the thread scheduling or the other counts. Images are JPEG (quality 95) by default:
they decode about four times faster than PNG in the training loader; PNG remains available for lossless pixels.
"""
from __future__ import annotations

import math
import os
import re
import shutil
from multiprocessing.pool import ThreadPool
from pathlib import Path

import cv2
import numpy as np

from utils.general import LOGGER

SHAPE_CLASSES = ("circle", "ellipse", "square", "triangle", "star", "cross", "ring", "hexagon", "diamond", "arrow")
MAX_HIDDEN = 0.7  # objects with more than this fraction of their in-image pixels covered are left unlabelled
MIN_BOX = 2  # pixels; visible remnants thinner than this are left unlabelled
SHIFT = 4  # fixed-point bits for cv2.fillPoly, so outlines keep sub-pixel accuracy
_NAME = re.compile(r"^\d{5}\.(png|jpg|txt)$")
IMAGE_FORMATS = {  # extension -> cv2.imwrite parameters; both give the same bytes for a seed on a given OpenCV
    "jpg": [cv2.IMWRITE_JPEG_QUALITY, 95],  # default: decodes ~4x faster than PNG in the loader, 4x smaller
    "png": [cv2.IMWRITE_PNG_COMPRESSION, 1],  # lossless, for pixel-exact experiments
}


def _regular(k: int, radius: float = 0.5, phase: float = 0.0) -> np.ndarray:
    """k vertices on a circle, shape (k, 2)."""
    a = phase + np.arange(k) * 2 * np.pi / k
    return np.stack([np.cos(a), np.sin(a)], 1) * radius


def _outline(name: str, rng: np.random.Generator):
    """Polygons of one class in a unit box centred at 0 (long side ~1). Returns (filled polygons, hole polygons)."""
    if name in ("circle", "ellipse"):
        poly = _regular(48)
        if name == "ellipse":  # clearly elongated so that it is not confused with a circle
            poly[:, 1] /= rng.uniform(1.6, 2.6)
        return [poly], []
    if name == "square":
        return [np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])], []
    if name == "triangle":
        h = rng.uniform(0.8, 1.2)
        return [np.array([[0, -0.5], [0.5, 0.5], [-0.5, 0.5]]) * (1, h)], []
    if name == "star":
        outer, inner = _regular(5, 0.5, -np.pi / 2), _regular(5, 0.5 * rng.uniform(0.38, 0.5), -np.pi / 2 + np.pi / 5)
        return [np.stack([outer, inner], 1).reshape(10, 2)], []
    if name == "cross":
        t = rng.uniform(0.14, 0.2)
        return [np.array([[-t, -0.5], [t, -0.5], [t, -t], [0.5, -t], [0.5, t], [t, t], [t, 0.5], [-t, 0.5],
                          [-t, t], [-0.5, t], [-0.5, -t], [-t, -t]])], []
    if name == "ring":
        return [_regular(48)], [_regular(48, 0.5 * rng.uniform(0.45, 0.7))]
    if name == "hexagon":
        return [_regular(6)], []
    if name == "diamond":  # an elongated rhombus: a rotated square would be a square
        half_width = 0.5 / rng.uniform(1.5, 2.2)
        return [np.array([[0, -0.5], [half_width, 0], [0, 0.5], [-half_width, 0]])], []
    if name == "arrow":
        t = rng.uniform(0.08, 0.14)
        return [np.array([[-0.5, -t], [0.1, -t], [0.1, -0.3], [0.5, 0], [0.1, 0.3], [0.1, t], [-0.5, t]])], []
    raise ValueError(f"unknown shape {name!r}; choose from {SHAPE_CLASSES}")


def _place(polys, size: float, angle: float, centre) -> list[np.ndarray]:
    """Scale, rotate and move unit polygons into image pixels (float (k, 2) arrays)."""
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]]) * size
    return [p @ rot.T + centre for p in polys]


def _fixed_point(polys, origin) -> list[np.ndarray]:
    """Polygons relative to ``origin`` as int32 fixed-point (SHIFT bits) vertices for cv2.fillPoly."""
    return [np.round((p - origin) * (1 << SHIFT)).astype(np.int32) for p in polys]


def _window(polys, size: int):
    """Integer pixel window (x0, y0, x1, y1) covering the polygons, clipped to the image."""
    pts = np.concatenate(polys)
    x0, y0 = np.floor(pts.min(0)).astype(int).clip(0, size)
    x1, y1 = (np.ceil(pts.max(0)).astype(int) + 1).clip(0, size)
    return int(x0), int(y0), int(x1), int(y1)


def _random_colour(rng: np.random.Generator, avoid: np.ndarray, min_dist: float) -> np.ndarray:
    """A random BGR colour at least min_dist (euclidean) from ``avoid``, after a few tries."""
    colour = rng.integers(0, 256, 3)
    for _ in range(6):
        if np.linalg.norm(colour - avoid) >= min_dist:
            break
        colour = rng.integers(0, 256, 3)
    return colour.astype(np.float32)


def _background(rng: np.random.Generator, size: int, difficulty: float) -> np.ndarray:
    """Four-corner gradient, low-frequency texture, random lines and blurred blobs. uint8 (size, size, 3)."""
    cells = int(rng.integers(3, 9))
    corners = rng.uniform(0, 255, (2, 2, 3)).astype(np.float32)
    # one bilinear upsampling of a tiny grid draws both the gradient and the texture
    grid = cv2.resize(corners, (cells, cells), interpolation=cv2.INTER_LINEAR)
    grid += rng.uniform(-1, 1, (cells, cells, 3)).astype(np.float32) * (20 + 50 * difficulty)
    im = cv2.resize(np.clip(grid, 0, 255).astype(np.uint8), (size, size), interpolation=cv2.INTER_LINEAR)
    for _ in range(int(rng.integers(0, 4 + 12 * difficulty))):
        p1, p2 = rng.integers(-size // 4, size + size // 4, (2, 2))
        cv2.line(im, tuple(map(int, p1)), tuple(map(int, p2)), rng.integers(0, 256, 3).tolist(),
                 int(rng.integers(1, 4)), cv2.LINE_AA)
    blobs = im.copy()
    for _ in range(int(rng.integers(0, 3 + 8 * difficulty))):
        centre = tuple(map(int, rng.integers(0, size, 2)))
        axes = tuple(map(int, rng.integers(3, size // 5, 2)))
        cv2.ellipse(blobs, centre, axes, float(rng.uniform(0, 180)), 0, 360, rng.integers(0, 256, 3).tolist(), -1)
    # translucent, soft-edged blobs stay visibly different from the crisp, opaque circle and ellipse classes
    alpha = float(rng.uniform(0.3, 0.6))
    im = cv2.addWeighted(im, 1 - alpha, blobs, alpha, 0.0)
    return cv2.GaussianBlur(im, (0, 0), sigmaX=float(rng.uniform(2.0, 4.0)))


def _draw_distractor(rng, im, owner, size: int, idx: int) -> None:
    """Something that is not a class: an irregular blob, a thick arc or a stroke of text. Marks owner pixels."""
    mask = np.zeros((size, size), np.uint8)
    kind = int(rng.integers(0, 3))
    centre = rng.uniform(0, size, 2)
    extent = size * math.exp(rng.uniform(math.log(0.05), math.log(0.3)))
    if kind == 0:
        k = int(rng.integers(7, 13))
        angles = np.sort(rng.uniform(0, 2 * np.pi, k))
        radii = extent / 2 * rng.uniform(0.35, 1.0, k)
        poly = np.stack([np.cos(angles) * radii, np.sin(angles) * radii], 1) + centre
        cv2.fillPoly(mask, [np.round(poly * (1 << SHIFT)).astype(np.int32)], 255, cv2.LINE_8, SHIFT)
    elif kind == 1:
        start = float(rng.uniform(0, 360))
        cv2.ellipse(mask, tuple(map(int, centre)), (max(2, int(extent / 2)),) * 2, 0, start,
                    start + float(rng.uniform(60, 220)), 255, int(rng.integers(2, 6)))
    else:
        text = "".join(chr(int(c)) for c in rng.integers(65, 91, int(rng.integers(2, 5))))
        cv2.putText(mask, text, tuple(map(int, centre)), cv2.FONT_HERSHEY_SIMPLEX, float(extent / 40), 255,
                    int(rng.integers(1, 4)))
    sel = mask > 0
    im[sel] = rng.integers(0, 256, 3).astype(np.uint8)
    owner[sel] = idx


def _draw_object(rng, im, owner, idx: int, cls: int, difficulty: float):
    """Paint one class shape (random size, rotation, colour, shading) over ``im`` and mark it in ``owner``.

    Returns:
        (in-image pixel count, pixel window (x0, y0, x1, y1) that holds the shape).
    """
    size = im.shape[0]
    polys, holes = _outline(SHAPE_CLASSES[cls], rng)
    smallest = 0.06 - 0.02 * difficulty  # of the image side: ~13 px at 256, still ~6 px when trained at 128
    long_side = size * math.exp(rng.uniform(math.log(smallest), math.log(0.45)))
    angle, centre = rng.uniform(0, 2 * np.pi), rng.uniform(0.05, 0.95, 2) * size
    polys, holes = _place(polys, long_side, angle, centre), _place(holes, long_side, angle, centre)
    x0, y0, x1, y1 = win = _window(polys, size)
    if x1 <= x0 or y1 <= y0:
        return 0, win
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)  # drawing in the shape's own window keeps small shapes cheap
    cv2.fillPoly(mask, _fixed_point(polys, (x0, y0)), 255, cv2.LINE_8, SHIFT)
    if holes:
        cv2.fillPoly(mask, _fixed_point(holes, (x0, y0)), 0, cv2.LINE_8, SHIFT)
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return 0, win
    ys, xs = ys + y0, xs + x0
    colour = _random_colour(rng, im[ys, xs].mean(0), min_dist=90 - 50 * difficulty)
    b = rng.uniform(0, 2 * np.pi)  # a linear shading across the object so that it is not a flat colour patch
    ramp = ((xs - centre[0]) * math.cos(b) + (ys - centre[1]) * math.sin(b)) / long_side
    shade = 1 + rng.uniform(0, 0.5) * ramp.astype(np.float32)
    im[ys, xs] = np.clip(colour[None] * shade[:, None], 0, 255).astype(np.uint8)
    owner[ys, xs] = idx
    return len(xs), win


def _visible_boxes(owner: np.ndarray, drawn: dict, classes: dict):
    """Labels (n, 5) [cls, x1, y1, x2, y2] of objects visible enough, and the owner map renumbered to label rows.

    Args:
        owner: (S, S) int16 draw index of the top-most object per pixel (-1 background).
        drawn: {draw index: (pixel count when drawn, window)};  classes: {draw index: class id}.
    """
    rows, remap = [], np.full(int(owner.max(initial=0)) + 1, -1, np.int16)
    for k, (area, (x0, y0, x1, y1)) in drawn.items():
        ys, xs = np.nonzero(owner[y0:y1, x0:x1] == k)
        if not area or len(xs) < (1 - MAX_HIDDEN) * area:
            continue
        bx1, by1, bx2, by2 = xs.min() + x0, ys.min() + y0, xs.max() + x0 + 1, ys.max() + y0 + 1  # pixel edges
        if min(bx2 - bx1, by2 - by1) < MIN_BOX:
            continue
        remap[k] = len(rows)
        rows.append((classes[k], bx1, by1, bx2, by2))
    labels = np.array(rows, dtype=np.float32).reshape(-1, 5)
    return labels, np.where(owner >= 0, remap[owner.clip(0)], -1).astype(np.int16)


def render_shapes_image(rng: np.random.Generator, img_size: int = 256, difficulty: float = 0.5):
    """Draw one synthetic image.

    Args:
        rng: numpy Generator (the only source of randomness).
        img_size: side of the square image in pixels.
        difficulty: 0..1; more clutter, distractors, objects, blur and smaller, lower-contrast objects when higher.
    Returns:
        im: (S, S, 3) BGR uint8.
        labels: (n, 5) float32 [cls, x1, y1, x2, y2] in pixels (x2/y2 exclusive pixel edges).
        owner: (S, S) int16 map, k where label row k's object is visible, else -1.
    """
    size = int(img_size)
    im = _background(rng, size, difficulty)
    owner = np.full((size, size), -1, np.int16)
    n_obj = int(rng.integers(1, 5 + int(8 * difficulty)))
    n_distract = int(rng.integers(0, 2 + int(6 * difficulty)))
    drawn, classes = {}, {}
    for k in rng.permutation(n_obj + n_distract).tolist():  # painter's order mixes objects and distractors
        if k < n_obj:
            classes[k] = int(rng.integers(len(SHAPE_CLASSES)))
            drawn[k] = _draw_object(rng, im, owner, k, classes[k], difficulty)
        else:
            _draw_distractor(rng, im, owner, size, k)
    if rng.random() < 0.5 * difficulty:  # slight defocus; moves edges by well under a pixel
        im = cv2.GaussianBlur(im, (3, 3), 0)
    labels, owner = _visible_boxes(owner, drawn, classes)
    return im, labels, owner


def _write_sample(job) -> int:
    """Render and write one image + label file. Returns its number of labels."""
    im_path, lb_path, seed_key, img_size, difficulty = job
    im, labels, _ = render_shapes_image(np.random.default_rng(seed_key), img_size, difficulty)
    cv2.imwrite(str(im_path), im, IMAGE_FORMATS[im_path.suffix[1:]])
    xywh = np.concatenate([(labels[:, 1:3] + labels[:, 3:5]) / 2, labels[:, 3:5] - labels[:, 1:3]], 1) / img_size
    lines = [f"{int(c)} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, (x, y, w, h) in zip(labels[:, 0], xywh)]
    Path(lb_path).write_text("".join(lines))
    return len(lines)


def generate_shapes(out_dir, n_train: int = 600, n_val: int = 150, img_size: int = 256, difficulty: float = 0.5,
                    seed: int = 0, workers: int = 2, image_format: str = "jpg") -> Path:
    """Write the shapes dataset as out_dir/{images,labels}/{train,val}/NNNNN.{jpg,txt}.

    Files from an earlier run with the same naming are replaced, so the folder always matches the arguments.

    Args:
        out_dir: dataset root (the ``path`` of data/shapes.yaml).
        n_train, n_val: number of images per split.
        img_size: square image side in pixels.
        difficulty: 0 (clean) .. 1 (heavy clutter); see render_shapes_image.
        seed: the same seed gives byte-identical files.
        workers: threads (cv2 releases the GIL while drawing and encoding).
        image_format: 'jpg' (quality 95, fast to load) or 'png' (lossless).
    Returns:
        out_dir as a Path.
    """
    if not 0 <= difficulty <= 1:
        raise ValueError(f"difficulty={difficulty} must be within 0..1")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format={image_format!r} must be one of {sorted(IMAGE_FORMATS)}")
    out = Path(out_dir)
    if out.exists():  # refresh in place (the folder may hold other files)
        return _write_shapes(out, n_train, n_val, img_size, difficulty, seed, workers, image_format)
    # A new folder is written under a temporary name and renamed when complete, so that a second run started at the
    # same moment (two benchmark jobs, DDP processes) never finds it half written: it writes its own copy, and the
    # slower of the two keeps the folder that is already there (the same files, as generation is deterministic).
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_shapes(tmp, n_train, n_val, img_size, difficulty, seed, workers, image_format)
        try:
            os.rename(tmp, out)
        except OSError:
            if not out.is_dir():
                raise
            LOGGER.info(f"shapes: {out} was written by another process meanwhile; keeping that one")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_shapes(out: Path, n_train, n_val, img_size, difficulty, seed, workers, image_format) -> Path:
    """generate_shapes' work, into out."""
    jobs = []
    for split_id, (split, count) in enumerate((("train", n_train), ("val", n_val))):
        im_dir, lb_dir = out / "images" / split, out / "labels" / split
        for d in (im_dir, lb_dir):
            d.mkdir(parents=True, exist_ok=True)
            for old in d.iterdir():
                if _NAME.match(old.name):
                    old.unlink()
        (out / "labels" / f"{split}.cache").unlink(missing_ok=True)
        jobs += [(im_dir / f"{i:05d}.{image_format}", lb_dir / f"{i:05d}.txt", (seed, split_id, i), img_size,
                  difficulty) for i in range(count)]
    with ThreadPool(max(1, workers)) as pool:
        n_labels = sum(pool.imap(_write_sample, jobs, chunksize=8))
    LOGGER.info(f"shapes: wrote {n_train} train + {n_val} val images ({n_labels} objects) to {out}")
    return out
