"""Drawing and plotting: box annotation with OpenCV, batch mosaics, label statistics and training curves.

Every matplotlib figure is built as a bare ``matplotlib.figure.Figure`` rendered by the Agg canvas, so nothing here
opens a window, touches pyplot's global figure list or changes the process-wide backend.
"""
from __future__ import annotations

import contextlib
import functools
import math
import unicodedata
import warnings
from pathlib import Path

import cv2
import numpy as np

from utils.general import LOGGER

# 20 hand-picked colours (RGB hex), ordered so that neighbouring class ids look different.
_PALETTE_HEX = (
    "E6194B", "3CB44B", "4363D8", "F58231", "911EB4", "42D4F4", "F032E6", "BFEF45", "469990", "9A6324",
    "800000", "808000", "000075", "C71585", "2E8B57", "FF7F50", "7B68EE", "B8860B", "A9A9A9", "FFE119",
)
_PALETTE_RGB = tuple(tuple(int(h[k:k + 2], 16) for k in (0, 2, 4)) for h in _PALETTE_HEX)

# Columns of a YOLOv5 results.csv in the order plot_results lays them out (two rows of five).
RESULT_COLUMNS = (
    "train/box_loss", "train/obj_loss", "train/cls_loss", "metrics/precision", "metrics/recall",
    "val/box_loss", "val/obj_loss", "val/cls_loss", "metrics/mAP_0.5", "metrics/mAP_0.5:0.95",
)
CJK_FONT_FAMILIES = ("Noto Sans CJK", "Noto Serif CJK", "WenQuanYi", "SimHei", "Source Han Sans",
                     "Droid Sans Fallback", "Microsoft YaHei", "PingFang", "Hiragino Sans", "AR PL")


def colors(i: int, bgr: bool = False) -> tuple:
    """Colour for class ``i`` from a fixed 20-colour palette (wraps around).

    Args:
        i: class index (any int, negative and large values wrap).
        bgr: return (b, g, r) for OpenCV images that are in BGR order.

    Returns:
        A tuple of three Python ints in 0..255.
    """
    r, g, b = _PALETTE_RGB[int(i) % len(_PALETTE_RGB)]
    return (b, g, r) if bgr else (r, g, b)


class Annotator:
    """Draw boxes and labels onto a HWC uint8 image with OpenCV (no font files needed).

    The colour channel order is whatever the image uses: pass BGR colours for BGR images. OpenCV's Hershey font only
    renders ASCII, so non-ASCII label characters appear as '?'.

    Args:
        im: (H, W, 3) uint8 array. A contiguous array is drawn on in place; otherwise a copy is made.
        line_width: box line thickness in pixels; default scales with the image size.
        font_scale: OpenCV font scale of labels; default line_width / 3.
    """

    def __init__(self, im: np.ndarray, line_width: int | None = None, font_scale: float | None = None):
        if not isinstance(im, np.ndarray) or im.ndim != 3:
            raise TypeError(f"Annotator needs an (H, W, 3) numpy image, got {type(im).__name__} "
                            f"{getattr(im, 'shape', '')}; convert tensors with .permute(1, 2, 0).cpu().numpy()")
        self.im = np.ascontiguousarray(im)
        self.lw = int(line_width or max(round(sum(im.shape[:2]) / 2 * 0.003), 2))
        self.font_scale = font_scale or self.lw / 3

    def box_label(self, box, label: str = "", color=(128, 128, 128), txt_color=(255, 255, 255)) -> None:
        """Draw one box and, when given, its label on a filled tab above the box (inside it at the top edge).

        Args:
            box: (x1, y1, x2, y2) in pixels, any sequence or tensor of 4 numbers.
            label: text for the tab; empty for no tab.
            color: box and tab colour in the image's channel order.
            txt_color: label text colour.
        """
        x1, y1, x2, y2 = (int(round(float(v))) for v in box[:4])
        color, txt_color = tuple(int(c) for c in color), tuple(int(c) for c in txt_color)
        cv2.rectangle(self.im, (x1, y1), (x2, y2), color, thickness=self.lw, lineType=cv2.LINE_AA)
        if not label:
            return
        scale, thick = self.font_scale, max(self.lw - 1, 1)
        (tw, th), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
        above = y1 - th - 3 >= 0  # room for the tab above the box?
        top, bottom = (y1 - th - 3, y1) if above else (y1, y1 + th + 3)
        cv2.rectangle(self.im, (x1, top), (x1 + tw, bottom), color, thickness=-1, lineType=cv2.LINE_AA)
        cv2.putText(self.im, label, (x1, bottom - 2), cv2.FONT_HERSHEY_SIMPLEX, scale, txt_color,
                    thickness=thick, lineType=cv2.LINE_AA)

    def text(self, xy, text: str, txt_color=(255, 255, 255), scale: float | None = None) -> None:
        """Write plain text with its baseline-left corner at ``xy``."""
        scale = self.font_scale if scale is None else scale
        cv2.putText(self.im, text, (int(xy[0]), int(xy[1])), cv2.FONT_HERSHEY_SIMPLEX, scale,
                    tuple(int(c) for c in txt_color), thickness=max(self.lw - 1, 1), lineType=cv2.LINE_AA)

    def rectangle(self, xy, fill=None, outline=(255, 255, 255), width: int = 1) -> None:
        """Draw an outlined (and optionally filled) rectangle given as (x1, y1, x2, y2)."""
        p1, p2 = (int(xy[0]), int(xy[1])), (int(xy[2]), int(xy[3]))
        if fill is not None:
            cv2.rectangle(self.im, p1, p2, tuple(int(c) for c in fill), thickness=-1)
        cv2.rectangle(self.im, p1, p2, tuple(int(c) for c in outline), thickness=width)

    def result(self) -> np.ndarray:
        """The annotated (H, W, 3) uint8 image."""
        return np.asarray(self.im)


def _to_numpy(x) -> np.ndarray:
    """Tensor or array-like -> numpy array (detached, on CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().float().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def _class_name(names, c: int) -> str:
    """names may be a list, a dict {id: name} or empty; fall back to the id."""
    if isinstance(names, dict):
        return str(names.get(c, c))
    return str(names[c]) if names is not None and 0 <= c < len(names) else str(c)


def _images_to_uint8(images) -> np.ndarray:
    """(B, 3, H, W) float 0..1 (or 0..255) or uint8 -> (B, H, W, 3) uint8."""
    images = _to_numpy(images)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"plot_images expects images shaped (B, 3, H, W), got {images.shape}")
    if images.dtype != np.uint8:
        images = images.astype(np.float32)
        if images.size and images.max() <= 1.0 + 1e-3:  # float batches are normally 0..1
            images = images * 255
        images = images.clip(0, 255).round().astype(np.uint8)
    return images.transpose(0, 2, 3, 1)


def _xywh_to_xyxy(b: np.ndarray) -> np.ndarray:
    """(n, 4) centre-size boxes -> (n, 4) corner boxes."""
    out = b.copy()
    out[:, :2] = b[:, :2] - b[:, 2:] / 2
    out[:, 2:] = b[:, :2] + b[:, 2:] / 2
    return out


def _draw_tile_targets(annotator, targets, origin, tile_wh, scale, names) -> None:
    """Draw one image's targets (n, 6|7) into its mosaic tile whose top-left corner is ``origin``."""
    is_pred = targets.shape[1] == 7
    if is_pred:
        targets = targets[targets[:, 6] > 0.25]  # low-confidence predictions only add clutter
    if not len(targets):
        return
    boxes = targets[:, 2:6].astype(np.float32)
    if boxes.max() <= 1.01:  # normalised xywh
        boxes = boxes * np.array([tile_wh[0], tile_wh[1]] * 2, dtype=np.float32)
    else:  # pixels of the network input
        boxes = boxes * scale
    boxes = _xywh_to_xyxy(boxes) + np.array([origin[0], origin[1]] * 2, dtype=np.float32)
    for row, box in zip(targets, boxes):
        c = int(row[1])
        label = _class_name(names, c)
        if is_pred:
            label = f"{label} {row[6]:.1f}"
        annotator.box_label(box, label, color=colors(c))


def plot_images(images, targets, paths=None, fname="images.jpg", names=None, max_size=1920,
                max_subplots=16) -> None:
    """Save a grid mosaic of a batch with its boxes drawn, e.g. train_batch0.jpg or val_batch0_pred.jpg.

    Args:
        images: (B, 3, H, W) RGB batch, uint8 or float (0..1; values above 1 are read as 0..255).
        targets: (n, 6) labels [img_idx, cls, xc, yc, w, h] or (n, 7) predictions with conf last. Boxes may be
            normalised (all <= 1.01 for that image) or pixels of the (H, W) input. Predictions are drawn only
            when conf > 0.25.
        paths: optional per-image file paths; their names are written on the tiles.
        fname: output image file.
        names: class names (list or dict) for the box labels; class ids are shown when None.
        max_size: longest side of the mosaic in pixels; tiles are shrunk to fit.
        max_subplots: at most this many images are shown.
    """
    imgs = _images_to_uint8(images)[:max_subplots]
    targets = _to_numpy(targets) if targets is not None else np.zeros((0, 6), np.float32)
    targets = targets.reshape(-1, targets.shape[-1]) if targets.size else np.zeros((0, 6), np.float32)
    if targets.shape[1] not in (6, 7):
        raise ValueError(f"plot_images targets must be (n, 6) labels or (n, 7) predictions, got {targets.shape}")
    bs, h, w = imgs.shape[:3]
    ncols = math.ceil(bs ** 0.5)
    nrows = math.ceil(bs / ncols)
    scale = min(1.0, max_size / max(ncols * w, nrows * h))
    tw, th = math.ceil(w * scale), math.ceil(h * scale)
    mosaic = np.full((nrows * th, ncols * tw, 3), 255, dtype=np.uint8)
    for i, im in enumerate(imgs):
        x0, y0 = (i % ncols) * tw, (i // ncols) * th
        mosaic[y0:y0 + th, x0:x0 + tw] = im if scale == 1 else cv2.resize(im, (tw, th), interpolation=cv2.INTER_AREA)
    lw = max(2, round(max(tw, th) / 160))
    annotator = Annotator(mosaic, line_width=lw, font_scale=max(0.35, lw / 5))
    for i in range(bs):
        x0, y0 = (i % ncols) * tw, (i // ncols) * th
        annotator.rectangle((x0, y0, x0 + tw - 1, y0 + th - 1), outline=(255, 255, 255), width=1)
        if paths is not None and i < len(paths):
            annotator.text((x0 + 4, y0 + 12), Path(paths[i]).name[:40], txt_color=(220, 220, 220), scale=0.35)
        _draw_tile_targets(annotator, targets[targets[:, 0] == i], (x0, y0), (tw, th), scale, names)
    Path(fname).parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(fname), cv2.cvtColor(annotator.result(), cv2.COLOR_RGB2BGR))


def save_one_box(xyxy, im: np.ndarray, file="crop.jpg", gain: float = 1.02, pad: int = 10, square: bool = False,
                 save: bool = True) -> np.ndarray:
    """Crop a (slightly enlarged) box out of an image and optionally save it.

    Args:
        xyxy: (x1, y1, x2, y2) pixel box.
        im: (H, W, 3) image (BGR when saving with OpenCV).
        file: output file; parent folders are created.
        gain, pad: the crop is the box scaled by ``gain`` plus ``pad`` pixels on each side.
        square: make the crop square (longest side).
        save: write the crop to ``file``.

    Returns:
        The crop as an (h, w, 3) array.
    """
    x1, y1, x2, y2 = (float(v) for v in xyxy[:4])
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    bw, bh = (x2 - x1) * gain + pad, (y2 - y1) * gain + pad
    if square:
        bw = bh = max(bw, bh)
    hgt, wid = im.shape[:2]
    left, right = int(np.clip(cx - bw / 2, 0, wid)), int(np.clip(cx + bw / 2, 0, wid))
    top, bottom = int(np.clip(cy - bh / 2, 0, hgt)), int(np.clip(cy + bh / 2, 0, hgt))
    crop = im[top:max(bottom, top + 1), left:max(right, left + 1)].copy()
    if save:
        Path(file).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(file), crop)
    return crop


def _is_cjk(ch: str) -> bool:
    """True for Han, Kana and Hangul characters (the ones DejaVu cannot draw)."""
    name = unicodedata.name(ch, "")
    return any(k in name for k in ("CJK", "HIRAGANA", "KATAKANA", "HANGUL")) or "\u3000" <= ch <= "\u303f"


def has_cjk(texts) -> bool:
    """Whether any string in ``texts`` holds CJK characters."""
    return any(_is_cjk(ch) for t in texts for ch in str(t) if ord(ch) > 0x2E7F)


def find_cjk_font_family() -> str | None:
    """Name of an installed font family that covers CJK (first match of CJK_FONT_FAMILIES), or None."""
    from matplotlib import font_manager

    installed = sorted({f.name for f in font_manager.fontManager.ttflist})
    for wanted in CJK_FONT_FAMILIES:
        for name in installed:
            if wanted.lower() in name.lower():
                return name
    return None


@functools.lru_cache(maxsize=None)
def _warn_missing_cjk_font() -> None:
    """Log the missing-font warning once per process (lru_cache makes later calls no-ops)."""
    LOGGER.warning("WARNING: labels contain CJK characters but no CJK font is installed, so they may show as boxes; "
                   "install one (e.g. apt-get install fonts-noto-cjk) to render them")


@contextlib.contextmanager
def cjk_font_context(texts):
    """Context in which matplotlib can draw the CJK characters in ``texts``.

    With a CJK font installed it is appended as a fallback family (Latin text keeps the default font); without one
    a single warning is logged and matplotlib's per-glyph warnings are silenced.
    """
    import matplotlib

    if not has_cjk(texts):
        yield
        return
    family = find_cjk_font_family()
    with warnings.catch_warnings():
        if family is None:
            _warn_missing_cjk_font()
            warnings.filterwarnings("ignore", message=r".*[Gg]lyph.*missing")
            yield
            return
        fallback = [f for f in matplotlib.rcParams["font.sans-serif"] if f != family]
        with matplotlib.rc_context({"font.family": "sans-serif", "font.sans-serif": [fallback[0], family, *fallback[1:]]}):
            yield


def new_figure(nrows: int, ncols: int, size):
    """A pyplot-free Agg figure and its flat axes array."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, tight_layout=True)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    return fig, axes


def _labels_box_drawing(labels: np.ndarray, size: int = 800, limit: int = 1000) -> np.ndarray:
    """RGB canvas with up to ``limit`` label boxes drawn at their normalised positions."""
    canvas = np.full((size, size, 3), 255, dtype=np.uint8)
    rng = np.random.default_rng(0)
    pick = rng.choice(len(labels), size=min(limit, len(labels)), replace=False)
    boxes = _xywh_to_xyxy(labels[pick, 1:5]) * size
    for c, box in zip(labels[pick, 0].astype(int), boxes):
        cv2.rectangle(canvas, tuple(int(v) for v in box[:2]), tuple(int(v) for v in box[2:]), colors(c), 1)
    return canvas


def plot_labels(labels, names=(), save_dir=Path("")) -> Path | None:
    """Save label statistics to save_dir/labels.jpg, and labels_correlogram.jpg beside it.

    Panels: instances per class, box-centre (x, y) histogram, box (w, h) histogram and ~1000 boxes drawn in place.

    Args:
        labels: (n, 5) [cls, xc, yc, w, h] with normalised boxes (array or tensor).
        names: class names (list or dict) for the histogram ticks.
        save_dir: output folder.

    Returns:
        The written file, or None when there are no labels.
    """
    labels = _to_numpy(labels).astype(np.float32).reshape(-1, 5)
    if not len(labels):
        LOGGER.warning("WARNING: plot_labels got no labels; labels.jpg not written (check the dataset's label files)")
        return None
    cls = labels[:, 0].astype(int)
    nc = max(int(cls.max()) + 1, len(names) if names is not None else 0)
    tick_names = [_class_name(names, i) for i in range(nc)]
    with cjk_font_context(tick_names):
        fig, ax = new_figure(2, 2, (9, 9))
        ax[0].bar(range(nc), np.bincount(cls, minlength=nc), color=[np.array(colors(i)) / 255 for i in range(nc)])
        ax[0].set_ylabel("instances")
        if names is not None and 0 < len(names) <= 30:
            ax[0].set_xticks(range(nc), tick_names, rotation=90, fontsize=8)
        else:
            ax[0].set_xlabel("class")
        for a, (i, j), (xl, yl) in zip(ax[1:3], ((1, 2), (3, 4)), (("x", "y"), ("width", "height"))):
            a.hist2d(labels[:, i], labels[:, j], bins=50, range=[[0, 1], [0, 1]], cmap="Blues")
            a.set_xlabel(xl)
            a.set_ylabel(yl)
        ax[3].imshow(_labels_box_drawing(labels), extent=(0, 1, 1, 0))
        ax[3].set_title(f"{min(len(labels), 1000)} of {len(labels)} boxes", fontsize=9)
        ax[3].axis("off")
        out = Path(save_dir) / "labels.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100)
    plot_labels_correlogram(labels, save_dir)
    return out


CORRELOGRAM_COLUMNS = ("x", "y", "width", "height")


def _correlogram_canvas(boxes: np.ndarray, cell: int) -> np.ndarray:
    """RGB float image (4 cell, 4 cell, 3) of the corner grid: 1-D histograms on the diagonal, 2-D below it.

    Cell (row i, column j) bins column j horizontally and column i vertically, both over 0..1 with ``cell`` bins,
    the vertical axis pointing up; cells above the diagonal stay white.
    """
    from matplotlib import colormaps

    edges = np.linspace(0, 1, cell + 1)
    canvas = np.ones((4 * cell, 4 * cell, 3), dtype=np.float32)
    rows = np.arange(cell)[::-1].reshape(-1, 1)  # (cell, 1) bar height reached by each pixel row, top row highest
    for i in range(4):
        for j in range(i + 1):
            tile = canvas[i * cell:(i + 1) * cell, j * cell:(j + 1) * cell]
            if i == j:
                counts, _ = np.histogram(boxes[:, i], bins=edges)
                heights = counts / max(counts.max(), 1) * (cell - 1)  # (cell,) bar height per bin
                tile[rows < heights.reshape(1, -1)] = (0.26, 0.39, 0.85)
            else:
                counts, _, _ = np.histogram2d(boxes[:, j], boxes[:, i], bins=(edges, edges))  # [x bin, y bin]
                density = np.sqrt(counts / max(counts.max(), 1))  # sqrt: sparse regions stay visible
                tile[:] = colormaps["Blues"](density.T[::-1])[..., :3]  # rows from y = 1 (top) down to y = 0
    return canvas


def plot_labels_correlogram(labels, save_dir=Path(""), cell: int = 64) -> Path | None:
    """Save save_dir/labels_correlogram.jpg: pairwise distributions of the label boxes' x, y, width and height.

    A corner grid like YOLOv5's seaborn pair plot, drawn with matplotlib alone: the histogram of each column on
    the diagonal and the 2-D histogram of each pair below it, every cell spanning 0..1 on both axes. The grid is
    rendered as one image inside a single matplotlib axes, so the cost stays near 0.1 s whatever the number of
    labels (sixteen separate axes with their ticks and layout cost about 0.7 s).

    Args:
        labels: (n, 5) [cls, xc, yc, w, h] with normalised boxes (array or tensor).
        save_dir: output folder.
        cell: pixels (and bins) per grid cell.

    Returns:
        The written file, or None when there are no labels.
    """
    boxes = _to_numpy(labels).astype(np.float32).reshape(-1, 5)[:, 1:5]  # (n, 4) x, y, w, h
    if not len(boxes):
        return None
    fig, (ax,) = new_figure(1, 1, (5, 5))
    ax.imshow(_correlogram_canvas(boxes, cell), extent=(0, 4, 4, 0), interpolation="nearest")
    ticks = np.arange(4) + 0.5
    ax.set_xticks(ticks, CORRELOGRAM_COLUMNS)
    ax.set_yticks(ticks, CORRELOGRAM_COLUMNS, rotation=90, va="center")
    ax.tick_params(length=0)
    for k in range(1, 4):  # cell borders of the lower triangle
        ax.plot([0, k], [k, k], color="0.6", lw=0.6)
        ax.plot([k, k], [k - 1, 4], color="0.6", lw=0.6)
    ax.set_title(f"{len(boxes)} labels; each cell spans 0..1, y up", fontsize=9)
    out = Path(save_dir) / "labels_correlogram.jpg"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


def plot_evolve(evolve_csv="path/to/evolve.csv", keys=None) -> Path:
    """Save evolve.png beside evolve.csv: one panel per evolved value, its value in each generation against that
    generation's fitness, coloured from the first generation (dark) to the last (light), the best one marked.

    Args:
        evolve_csv: the evolution's evolve.csv (7 result columns, then one column per value).
        keys: the columns to draw (default: every value column).

    Returns:
        The written file.
    """
    from utils.evolve import RESULT_COLUMNS, read_evolve_csv, row_fitness

    evolve_csv = Path(evolve_csv)
    frame = read_evolve_csv(evolve_csv)
    keys = [k for k in (keys or frame.columns) if k in frame.columns and k not in RESULT_COLUMNS]
    fit = row_fitness(frame)
    best = int(np.argmax(fit))
    cols = max(1, math.ceil(math.sqrt(len(keys))))
    rows = max(1, math.ceil(len(keys) / cols))
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(2.2 * cols, 2.0 * rows))  # fixed spacing: a tight layout of ~30 panels costs seconds
    ax = fig.subplots(rows, cols, squeeze=False).ravel()
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.05, top=0.95, wspace=0.35, hspace=0.55)
    order = np.arange(len(frame))
    for i, (a, k) in enumerate(zip(ax, keys)):
        values = frame[k].to_numpy(dtype=np.float64)
        if i % cols == 0:
            a.set_ylabel("fitness", fontsize=8)
        a.scatter(values, fit, c=order, cmap="viridis", s=12, edgecolors="none")
        a.plot(values[best], fit[best], "r+", markersize=14, markeredgewidth=2)
        a.set_title(f"{k} = {values[best]:.3g}", fontsize=9)
        a.tick_params(labelsize=7)
        a.xaxis.set_major_locator(MaxNLocator(3))  # small panels: more tick labels would overlap
        a.yaxis.set_major_locator(MaxNLocator(4))
    for a in ax[len(keys):]:
        a.set_visible(False)
    out = evolve_csv.with_name("evolve.png")
    fig.savefig(out, dpi=120)
    LOGGER.info(f"Saved {out}")
    return out


def read_results_csv(file):
    """Load a results.csv with header whitespace stripped and every column numeric (bad cells -> NaN)."""
    import pandas as pd

    df = pd.read_csv(file, skipinitialspace=True)
    df.columns = [str(c).strip() for c in df.columns]
    return df.apply(pd.to_numeric, errors="coerce")


def smooth_curve(y: np.ndarray, fraction: float = 0.1) -> np.ndarray:
    """Centred moving average over ~``fraction`` of the points (odd window, edge values repeated)."""
    y = np.asarray(y, dtype=np.float64)
    k = int(round(len(y) * fraction * 2)) // 2 * 2 + 1
    if k <= 1 or len(y) < 3:
        return y.copy()
    padded = np.pad(y, k // 2, mode="edge")
    return np.convolve(padded, np.ones(k) / k, mode="valid")


def extra_result_columns(df) -> list:
    """Columns beyond the standard YOLOv5 set (e.g. KD losses), learning rates and epoch excluded."""
    return [c for c in df.columns if c not in RESULT_COLUMNS and c != "epoch" and not c.startswith("x/")]


def _plot_series(ax, df, column: str, label: str, color) -> None:
    """Raw curve plus smoothed curve of one column against the epoch column."""
    x = df["epoch"].to_numpy(dtype=float) if "epoch" in df.columns else np.arange(len(df), dtype=float)
    y = df[column].to_numpy(dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    ax.plot(x, y, marker=".", color=color, linewidth=1.5, markersize=5, label=label)
    if len(y) >= 3:
        ax.plot(x, smooth_curve(y), ":", color=color, linewidth=1.5, label=f"{label} (smooth)")


def plot_results(file="path/to/results.csv", dir="") -> Path:
    """Plot training curves of one results.csv (or every results*.csv in ``dir``) into results.png.

    The 10 standard YOLOv5 columns fill two rows of five; any extra columns (KD losses such as 'train/kd_*' or
    'kd/*') get additional rows. Columns are found by name, so their order in the csv does not matter.

    Args:
        file: a results.csv; results.png is written next to it.
        dir: alternatively a folder; all results*.csv in it are overlaid and results.png is written there.

    Returns:
        Path of the written results.png.
    """
    save_dir = Path(dir) if dir else Path(file).parent
    files = sorted(save_dir.glob("results*.csv")) if dir else [Path(file)]
    if not files or not files[0].is_file():
        raise FileNotFoundError(f"No results csv found at {Path(dir).resolve() if dir else Path(file).resolve()}; "
                                f"pass file=<run>/results.csv or dir=<run folder>")
    frames = [(f.stem, read_results_csv(f)) for f in files]
    extra = list(dict.fromkeys(c for _, df in frames for c in extra_result_columns(df)))
    columns = list(RESULT_COLUMNS) + extra
    fig, axes = new_figure(2 + math.ceil(len(extra) / 5), 5, (15, 3.2 * (2 + math.ceil(len(extra) / 5))))
    for ax, column in zip(axes, columns):
        for k, (stem, df) in enumerate(frames):
            if column in df.columns:
                _plot_series(ax, df, column, stem, np.array(colors(k)) / 255)
        ax.set_title(column, fontsize=10)
    for ax in axes[len(columns):]:
        ax.axis("off")
    axes[1].legend(fontsize=7)
    out = save_dir / "results.png"
    fig.savefig(out, dpi=120)
    return out


STUDY_COLUMNS = {0: "P", 1: "R", 2: "mAP@.5", 3: "mAP@.5:.95", 7: "pre-process (ms/img)", 8: "inference (ms/img)",
                 9: "NMS (ms/img)"}  # columns of val.py's study_*.txt that are plotted


def plot_val_study(files, sizes, out="study.png") -> Path:
    """Plot val.py --task study results: each metric and time against image size, and mAP@.5:.95 against
    inference time, one line per study_*.txt.

    Args:
        files: study txt files, one row per image size in ``sizes`` (val.py's 10 columns).
        sizes: the image sizes of the rows.
        out: PNG path to write.

    Returns:
        Path of the written plot.
    """
    fig, axes = new_figure(2, 4, (16, 7))
    sizes = np.asarray(sizes)
    for k, f in enumerate(files):
        y = np.loadtxt(f, ndmin=2)  # (len(sizes), 10)
        label, color = Path(f).stem.replace("study_", ""), np.array(colors(k)) / 255
        for ax, (col, title) in zip(axes, STUDY_COLUMNS.items()):
            ax.plot(sizes, y[:, col], ".-", color=color, linewidth=1.5, markersize=6, label=label)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("image size (px)")
        axes[7].plot(y[:, 8], y[:, 3], ".-", color=color, linewidth=1.5, markersize=6, label=label)
    axes[7].set_title("mAP@.5:.95 vs inference time", fontsize=10)
    axes[7].set_xlabel("inference (ms/img)")
    axes[7].set_ylabel("mAP@.5:.95")
    axes[7].grid(alpha=0.3)
    axes[7].legend(fontsize=7)
    fig.savefig(out, dpi=120)
    return Path(out)


def feature_visualization(x, module_type: str, stage: int, save_dir=Path("runs/detect/exp"), n: int = 32,
                          min_tile: int = 64) -> Path | None:
    """Save the first image's feature maps of one layer as a PNG mosaic (YOLOv5's --visualize).

    Up to ``n`` channels, 8 per row, each min-max scaled on its own and coloured with viridis; maps smaller than
    ``min_tile`` pixels are enlarged (nearest neighbour) so a tile stays readable. One image write instead of a
    figure with n subplots keeps this cheap enough to run for every layer.

    Args:
        x: layer output (bs, c, h, w); anything else (a Detect output, a list) is skipped.
        module_type: the layer's type, e.g. 'models.common.C3'. stage: layer index.
        save_dir: folder for save_dir/stage{stage}_{type}_features.png.

    Returns:
        The written path, or None when the layer is skipped (Detect, not 4-D, maps of a single pixel row/column).
    """
    import matplotlib
    import matplotlib.image

    if "Detect" in module_type or getattr(x, "ndim", 0) != 4 or min(x.shape[2:]) <= 1:
        return None
    maps = x[0, :n].detach().float().cpu().numpy()  # (k, h, w)
    low, high = maps.min(axis=(1, 2), keepdims=True), maps.max(axis=(1, 2), keepdims=True)
    maps = (maps - low) / np.maximum(high - low, 1e-12)
    up = max(1, math.ceil(min_tile / max(maps.shape[1:])))
    maps = maps.repeat(up, axis=1).repeat(up, axis=2)
    k, h, w = maps.shape
    cols, gap = min(8, k), 2
    rows = math.ceil(k / cols)
    canvas = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap), np.nan)
    for i, tile in enumerate(maps):
        r, c = divmod(i, cols)
        canvas[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = tile
    rgba = matplotlib.colormaps["viridis"](np.nan_to_num(canvas))
    rgba[np.isnan(canvas)] = 1.0  # white gaps between tiles
    file = Path(save_dir) / f"stage{stage}_{module_type.split('.')[-1]}_features.png"
    file.parent.mkdir(parents=True, exist_ok=True)
    matplotlib.image.imsave(file, rgba)
    LOGGER.info(f"Saving {file}... ({k}/{x.shape[1]} channels)")
    return file
