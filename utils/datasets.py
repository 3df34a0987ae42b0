"""Dataset YAMLs, label checking with a cache, and the YOLOv5-style training / validation data loader.

Layout conventions (YOLOv5's): a split is a folder of images, a list of folders, or a .txt file of image paths;
each image's label file is found by replacing the last ``/images/`` of its path with ``/labels/`` and its extension
with ``.txt``. A label file holds one ``cls xc yc w h`` row per object, normalised to 0..1 by the image size.

Bad input never stops a run: corrupt images or label files are skipped with a warning naming the file and the
reason, duplicate label rows are dropped, a JPEG that only lacks its end marker is repaired. Only a split without a
single usable image is an error. Class ids >= nc are checked when the caller passes ``nc`` (see ``create_dataloader``).
"""
from __future__ import annotations

import glob
import hashlib
import os
import random
import subprocess
import sys
from multiprocessing.pool import ThreadPool
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from utils.augmentations import (PAD_COLOR, apply_perspective, augment_hsv, is_axis_aligned, letterbox, mixup,
                                 mosaic4, mosaic4_direct, random_flips, random_perspective,
                                 random_perspective_matrix)
from utils.boxes import xywhn2xyxy, xyxy2xywhn
from utils.general import LOGGER, ROOT, yaml_load

IMG_FORMATS = ("bmp", "jpeg", "jpg", "png", "tif", "tiff", "webp")  # what cv2.imread decodes
CACHE_VERSION = 1  # bump when the label cache layout or the checks change
LABEL_EPS = 1e-3  # label coordinates this far outside 0..1 are accepted (and clipped): converter rounding noise
MIN_IMAGE_SIDE = 10  # pixels; anything smaller is almost certainly a broken file
MAX_WARNINGS = 30  # per-file warnings printed in full before they are summarised
JPEG_EOI = np.frombuffer(b"\xff\xd9", dtype=np.uint8)
JPEG_FILLER = np.random.default_rng(0).integers(0, 255, 256, dtype=np.uint8)  # fixed bytes, never 0xFF (a marker)
AUG_KEYS = {  # augmentation hyperparameters the loader reads, with the hyp.scratch.yaml value used if one is missing
    "hsv_h": 0.015, "hsv_s": 0.7, "hsv_v": 0.4, "degrees": 0.0, "translate": 0.1, "scale": 0.5, "shear": 0.0,
    "perspective": 0.0, "flipud": 0.0, "fliplr": 0.5, "mosaic": 1.0, "mixup": 0.0, "copy_paste": 0.0,
}
STAT_KEYS = ("found", "missing", "empty", "corrupt", "duplicate")


def _num_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def img2label_paths(img_paths) -> list[str]:
    """Label file of each image: the last /images/ becomes /labels/ and the extension becomes .txt."""
    images, labels = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    out = []
    for p in img_paths:
        head, sep, tail = str(p).rpartition(images)
        out.append(os.path.splitext(head + labels + tail if sep else str(p))[0] + ".txt")
    return out


def list_image_files(path) -> list[str]:
    """Image files of a split given as a folder (searched recursively), a .txt list of paths, or a list of those.

    Raises:
        FileNotFoundError naming every path searched when no image is found at all.
    """
    sources = [str(p) for p in path] if isinstance(path, (list, tuple)) else [str(path)]
    files = []
    for src in sources:
        p = Path(src)
        if p.is_dir():
            files += glob.glob(str(p / "**" / "*.*"), recursive=True)
        elif p.is_file():  # a list of image paths; relative entries are relative to the list's folder
            lines = [ln.strip() for ln in p.read_text(errors="replace").splitlines() if ln.strip()]
            files += [ln if os.path.isabs(ln) else str(p.parent / ln) for ln in lines]
        else:
            LOGGER.warning(f"WARNING: {src} does not exist, skipping it")
    images = sorted({os.path.normpath(f) for f in files if f.rsplit(".", 1)[-1].lower() in IMG_FORMATS})
    if not images:
        raise FileNotFoundError(f"No images found in {', '.join(sources)} (looked for *.{', *.'.join(IMG_FORMATS)}); "
                                f"check the train/val paths in the dataset YAML or prepare the dataset first")
    return images


def files_hash(files) -> str:
    """Hash of file names, sizes and modification times: changes whenever any file is edited, added or removed."""
    h = hashlib.sha256(f"v{CACHE_VERSION}".encode())
    for f in files:
        try:
            st = os.stat(f)
            h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{f}|absent\n".encode())
    return h.hexdigest()


def _repair_jpeg_tail(im_file: str, buf: np.ndarray):
    """A JPEG without its FFD9 end marker: decode with the marker added and, when the data was complete, append it.

    Completeness test: bytes placed between the data and the marker are ignored by the decoder when every block
    was already decoded, but are decoded as image data (changing pixels) when the file was cut short.

    Returns:
        (decoded image or None, reason when unusable, note when repaired).
    """
    im = cv2.imdecode(np.concatenate([buf, JPEG_EOI]), cv2.IMREAD_COLOR)
    if im is None:
        return None, "truncated JPEG that cannot be decoded", ""
    probe = cv2.imdecode(np.concatenate([buf, JPEG_FILLER, JPEG_EOI]), cv2.IMREAD_COLOR)
    if probe is None or probe.shape != im.shape or (probe != im).any():
        return None, "truncated JPEG (image data ends early)", ""
    try:
        with open(im_file, "ab") as f:  # appending two bytes is lossless, unlike re-encoding
            f.write(JPEG_EOI.tobytes())
    except OSError as e:
        return None, f"JPEG end marker missing and the file cannot be repaired in place ({e}); re-save it", ""
    return im, "", "JPEG end marker was missing; appended it"


def verify_image(im_file: str):
    """Decode an image fully (cv2, EXIF orientation applied as at load time).

    Returns:
        (size (w, h) or None when unusable, reason when unusable, note when the file was repaired).
    """
    try:
        buf = np.fromfile(im_file, dtype=np.uint8)
    except OSError as e:
        return None, f"unreadable image ({e})", ""
    if buf.size == 0:
        return None, "zero-byte image file", ""
    note = ""
    if buf[:2].tobytes() == b"\xff\xd8" and buf[-2:].tobytes() != b"\xff\xd9":
        im, reason, note = _repair_jpeg_tail(im_file, buf)
    else:
        im = cv2.imdecode(buf, cv2.IMREAD_COLOR)
        reason = "" if im is not None else "not a decodable image (corrupt or wrong format)"
    if im is None:
        return None, reason, ""
    h, w = im.shape[:2]
    if min(h, w) < MIN_IMAGE_SIDE:
        return None, f"image is only {w}x{h} pixels (minimum {MIN_IMAGE_SIDE})", ""
    return (w, h), "", note


def _parse_rows(lb_file: str, text: str):
    """Label text -> (float32 array (n, 5) or None, reason)."""
    rows = [(i + 1, line.split()) for i, line in enumerate(text.splitlines()) if line.strip()]
    for lineno, parts in rows:
        if len(parts) != 5:
            return None, f"label {lb_file} line {lineno} has {len(parts)} columns; expected 5 (cls xc yc w h)"
    try:
        labels = np.array([parts for _, parts in rows], dtype=np.float32).reshape(-1, 5)
    except ValueError:
        bad = next((ln, t) for ln, parts in rows for t in parts if not _is_float(t))
        return None, f"label {lb_file} line {bad[0]} has the non-numeric value {bad[1]!r}"
    if not np.isfinite(labels).all():
        return None, f"label {lb_file} contains nan/inf values"
    return labels, ""


def _is_float(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


def verify_label(lb_file: str):
    """Parse and check one label file.

    Returns:
        (labels float32 (n, 5) normalised or None when corrupt, status in {'found', 'missing', 'empty', 'corrupt'},
         reason / note string, number of duplicate rows dropped).
    """
    empty = np.zeros((0, 5), dtype=np.float32)
    if not os.path.isfile(lb_file):
        return empty, "missing", "", 0
    try:
        text = Path(lb_file).read_text()
    except (OSError, UnicodeDecodeError) as e:
        return None, "corrupt", f"label {lb_file} is not readable text ({type(e).__name__})", 0
    labels, reason = _parse_rows(lb_file, text)
    if labels is None:
        return None, "corrupt", reason, 0
    if not len(labels):
        return empty, "empty", "", 0
    cls, coords = labels[:, 0], labels[:, 1:]
    if (cls < 0).any() or (cls != np.round(cls)).any():
        return None, "corrupt", f"label {lb_file} has class ids that are not non-negative integers", 0
    if (coords < -LABEL_EPS).any() or (coords > 1 + LABEL_EPS).any():
        return None, "corrupt", (f"label {lb_file} has coordinates outside 0..1 (min {coords.min():.4g}, max "
                                 f"{coords.max():.4g}); boxes must be normalised by the image width/height"), 0
    labels[:, 1:] = coords.clip(0, 1)
    _, first = np.unique(labels, axis=0, return_index=True)
    dupes = len(labels) - len(first)
    if dupes:
        labels = labels[np.sort(first)]
        return labels, "found", f"label {lb_file}: dropped {dupes} duplicate row(s)", dupes
    return labels, "found", "", 0


def verify_image_label(pair):
    """Check one (image, label file) pair. Returns (labels or None, (w, h) or None, label status, dupes, messages)."""
    try:
        return _verify_pair(*pair)
    except Exception as e:  # an unforeseen decoder or file-system error skips this file, never the whole run
        return None, None, "corrupt", 0, [f"skipping {pair[0]}: {type(e).__name__}: {e}"]


def _verify_pair(im_file: str, lb_file: str):
    size, reason, note = verify_image(im_file)
    messages = [f"{im_file}: {note}"] if note else []
    if size is None:
        return None, None, "corrupt", 0, [f"skipping {im_file}: {reason}"]
    labels, status, text, dupes = verify_label(lb_file)
    if labels is None:
        return None, None, "corrupt", 0, messages + [f"skipping {im_file}: {text}"]
    return labels, size, status, dupes, messages + ([text] if text else [])


def scan_labels(im_files, label_files, prefix: str = "", desc: str = "") -> dict:
    """Verify every pair in a thread pool (cv2 decoding releases the GIL) and gather what is usable.

    Returns:
        dict with 'im_files' (usable images), 'labels' (list of (n, 5) float32), 'shapes' (N, 2) (w, h),
        'stats' {found, missing, empty, corrupt, duplicate} and 'messages' (warnings, one per problem file).
    """
    stats = dict.fromkeys(STAT_KEYS, 0)
    keep, labels, shapes, messages = [], [], [], []
    with ThreadPool(_num_threads()) as pool:
        results = pool.imap(verify_image_label, zip(im_files, label_files), chunksize=16)
        bar = tqdm(results, total=len(im_files), desc=f"{prefix}Scanning {desc}", leave=False, mininterval=0.5)
        for im_file, (lb, size, status, dupes, msgs) in zip(im_files, bar):
            stats[status] += 1
            stats["duplicate"] += dupes
            messages += msgs
            if lb is not None:
                keep.append(im_file)
                labels.append(lb)
                shapes.append(size)
    return {"im_files": keep, "labels": labels, "shapes": np.array(shapes, dtype=np.int64).reshape(-1, 2),
            "stats": stats, "messages": messages}


def save_label_cache(path: Path, scan: dict, digest: str, prefix: str = "") -> None:
    """Write a scan to ``path`` as a plain .npz (no pickle), atomically; warn when the folder is read-only."""
    counts = np.array([len(lb) for lb in scan["labels"]], dtype=np.int64)
    arrays = {
        "version": np.array(CACHE_VERSION), "hash": np.array(digest), "im_files": np.array(scan["im_files"], dtype=str),
        "shapes": scan["shapes"], "counts": counts,
        "labels": np.concatenate(scan["labels"], 0) if scan["labels"] else np.zeros((0, 5), np.float32),
        "stats": np.array([scan["stats"][k] for k in STAT_KEYS], dtype=np.int64),
        "messages": np.array(scan["messages"], dtype=str),
    }
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError as e:
        LOGGER.warning(f"{prefix}WARNING: cannot write label cache {path} ({e}); labels will be re-checked next time")
        tmp.unlink(missing_ok=True)


def load_label_cache(path: Path, digest: str):
    """The scan stored at ``path`` when it exists, has the current layout and matches ``digest``; else None."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if int(z["version"]) != CACHE_VERSION or str(z["hash"]) != digest:
                return None
            labels = np.split(z["labels"], np.cumsum(z["counts"])[:-1]) if len(z["counts"]) else []
            return {"im_files": [str(f) for f in z["im_files"]], "labels": labels, "shapes": z["shapes"],
                    "stats": dict(zip(STAT_KEYS, (int(v) for v in z["stats"]))),
                    "messages": [str(m) for m in z["messages"]]}
    except (OSError, ValueError, KeyError, EOFError):
        return None


def label_cache_path(path, label_files) -> Path:
    """``<labels dir>.cache`` for a folder split (``<list>.cache`` for a .txt list)."""
    first = Path(path[0] if isinstance(path, (list, tuple)) else path)
    return (first if first.is_file() else Path(label_files[0]).parent).with_suffix(".cache")


def _report_scan(scan: dict, prefix: str, where: str, cached: bool) -> None:
    s = scan["stats"]
    source = "cached labels" if cached else "scanned"
    LOGGER.info(f"{prefix}{where}: {source}: {s['found']} found, {s['missing']} missing, {s['empty']} empty, "
                f"{s['corrupt']} corrupt, {s['duplicate']} duplicate rows dropped")
    messages = scan["messages"]
    for m in messages[:MAX_WARNINGS]:
        LOGGER.warning(f"{prefix}WARNING: {m}")
    if len(messages) > MAX_WARNINGS:
        LOGGER.warning(f"{prefix}WARNING: ... and {len(messages) - MAX_WARNINGS} more problems of the same kinds")


def _complete_hyp(hyp, prefix: str) -> dict:
    """The hyp dict with every augmentation key present (missing ones take hyp.scratch.yaml values, with a warning)."""
    if hyp is None:
        raise ValueError("augment=True needs a hyp dict with augmentation settings; load data/hyps/hyp.scratch.yaml")
    missing = [k for k in AUG_KEYS if k not in hyp]
    if missing:
        LOGGER.warning(f"{prefix}WARNING: hyp lacks {missing}; using hyp.scratch.yaml defaults for them")
    return {**AUG_KEYS, **hyp}


class LoadImagesAndLabels(Dataset):
    """Images + YOLO labels with YOLOv5 v6.0 loading semantics (mosaic, perspective, HSV, flips, mixup, rect).

    Attributes used by other modules: im_files, label_files, labels (list of float32 (n, 5) [cls, xc, yc, w, h]
    normalised), shapes ((N, 2) original (w, h)), n, batch_shapes ((nb, 2) (h, w) in rect mode, else None), mosaic,
    augment, hyp, img_size, indices, stats (scan counts), messages (scan warnings), cache_path (label cache file)
    and from_cache (whether the scan came from it).
    """

    def __init__(self, path, img_size: int = 640, batch_size: int = 16, augment: bool = False, hyp=None,
                 rect: bool = False, cache_images=None, single_cls: bool = False, stride: int = 32, pad: float = 0.0,
                 prefix: str = "", nc: int | None = None):
        self.path, self.img_size, self.stride, self.prefix = path, img_size, stride, prefix
        self.augment, self.rect = augment, rect
        self.hyp = _complete_hyp(hyp, prefix) if augment else hyp
        self.mosaic = augment and not rect  # a mosaic has no fixed aspect ratio, so it cannot serve rect batches
        self.mosaic_border = (-img_size // 2, -img_size // 2)
        if augment and self.hyp.get("copy_paste", 0) > 0:
            LOGGER.info(f"{prefix}copy_paste={self.hyp['copy_paste']} ignored: it needs segment labels (boxes only)")
        scan = self._load_labels(path, prefix)
        self.im_files, self.labels, self.shapes = scan["im_files"], scan["labels"], scan["shapes"]
        self.stats, self.messages = scan["stats"], scan["messages"]
        if single_cls:
            for lb in self.labels:
                lb[:, 0] = 0
        if nc is not None:
            self._drop_bad_classes(int(nc))
        if not self.im_files:
            raise FileNotFoundError(f"{prefix}No usable images in {path}: every image or its label file is corrupt "
                                    f"(see the warnings above); fix or remove those files")
        self.label_files = img2label_paths(self.im_files)
        self.n = len(self.im_files)
        self.indices = range(self.n)
        self.batch = np.arange(self.n) // batch_size  # batch index of each image
        self.batch_shapes = self._rect_shapes(batch_size, pad) if rect else None
        self.ims, self.im_hw0, self.im_hw = [None] * self.n, [None] * self.n, [None] * self.n
        self.npy_files = [str(Path(f).with_suffix(".npy")) for f in self.im_files]
        self._unreadable = set()
        self.cache_mode = _cache_mode(cache_images)
        if self.cache_mode:
            self.cache_images(self.cache_mode)

    def _load_labels(self, path, prefix: str) -> dict:
        """Scan results from the label cache when it matches the files on disk, else from a fresh scan."""
        im_files = list_image_files(path)
        label_files = img2label_paths(im_files)
        cache_path = label_cache_path(path, label_files)
        scan = load_label_cache(cache_path, files_hash(im_files + label_files))
        self.cache_path, self.from_cache = cache_path, scan is not None
        cached = self.from_cache
        if not cached:
            scan = scan_labels(im_files, label_files, prefix, desc=str(cache_path.with_suffix("")))
            # hash after the scan: repairing a JPEG changes the file, and the cache must describe the repaired one
            save_label_cache(cache_path, scan, files_hash(im_files + label_files), prefix)
        _report_scan(scan, prefix, str(cache_path.with_suffix("")), cached)
        return scan

    def _drop_bad_classes(self, nc: int) -> None:
        """Skip images whose labels use class ids >= nc (their annotation belongs to another class list)."""
        bad = [i for i, lb in enumerate(self.labels) if len(lb) and lb[:, 0].max() >= nc]
        for k, i in enumerate(bad):
            msg = (f"skipping {self.im_files[i]}: class id {int(self.labels[i][:, 0].max())} >= nc={nc} in "
                   f"{img2label_paths([self.im_files[i]])[0]}; fix the label or the dataset's names/nc")
            self.messages.append(msg)
            if k < MAX_WARNINGS:
                LOGGER.warning(f"{self.prefix}WARNING: {msg}")
        if bad:
            LOGGER.warning(f"{self.prefix}WARNING: {len(bad)} image(s) skipped for class ids >= nc={nc}")
            keep = np.setdiff1d(np.arange(len(self.im_files)), bad)
            self.im_files = [self.im_files[i] for i in keep]
            self.labels = [self.labels[i] for i in keep]
            self.shapes = self.shapes[keep]
            self.stats["corrupt"] += len(bad)
            self.stats["found"] -= len(bad)

    def _rect_shapes(self, batch_size: int, pad: float) -> np.ndarray:
        """Sort images by aspect ratio and give each batch the smallest stride-multiple shape holding all of it."""
        aspect = self.shapes[:, 1] / self.shapes[:, 0]  # h / w
        order = aspect.argsort()
        self.im_files = [self.im_files[i] for i in order]
        self.label_files = [self.label_files[i] for i in order]
        self.labels = [self.labels[i] for i in order]
        self.shapes, aspect = self.shapes[order], aspect[order]
        starts = np.arange(0, len(aspect), batch_size)  # batches are consecutive runs of the sorted images
        lo, hi = np.minimum.reduceat(aspect, starts), np.maximum.reduceat(aspect, starts)
        shapes = np.ones((len(starts), 2))  # (h, w) relative to img_size
        shapes[hi < 1, 0] = hi[hi < 1]  # all wide: shrink the height
        shapes[lo > 1, 1] = 1 / lo[lo > 1]  # all tall: shrink the width
        return (np.ceil(shapes * self.img_size / self.stride + pad).astype(int) * self.stride).astype(int)

    def cache_images(self, mode: str) -> None:
        """'ram': keep resized images in memory; 'disk': write decoded originals as .npy beside the images."""
        work = self._cache_one_disk if mode == "disk" else self.load_image
        nbytes = 0
        with ThreadPool(_num_threads()) as pool:
            results = pool.imap(work, range(self.n))
            for i, out in enumerate(tqdm(results, total=self.n, desc=f"{self.prefix}Caching images ({mode})",
                                         leave=False, mininterval=0.5)):
                if mode == "ram":
                    self.ims[i], self.im_hw0[i], self.im_hw[i] = out
                    nbytes += out[0].nbytes
                else:
                    nbytes += out
        LOGGER.info(f"{self.prefix}Cached {self.n} images ({nbytes / 1e9:.2f} GB {mode})")

    def _cache_one_disk(self, i: int) -> int:
        """Write image i as .npy unless an up-to-date one exists. Returns the .npy size in bytes."""
        npy, src = self.npy_files[i], self.im_files[i]
        if not os.path.exists(npy) or os.path.getmtime(npy) < os.path.getmtime(src):
            im = cv2.imread(src)
            if im is None:
                return 0
            tmp = f"{npy}.{os.getpid()}.tmp.npy"
            np.save(tmp, im)
            os.replace(tmp, npy)  # atomic: DDP ranks may cache the same file at once
        return os.path.getsize(npy)

    def _read_image(self, i: int) -> np.ndarray:
        """Image i at its original size (from the .npy disk cache when present), BGR (h0, w0, 3)."""
        use_npy = self.cache_mode == "disk" and os.path.exists(self.npy_files[i])
        im = np.load(self.npy_files[i]) if use_npy else cv2.imread(self.im_files[i])
        if im is None:  # vanished or changed since the scan: keep training on a blank image without labels
            if i not in self._unreadable:
                LOGGER.warning(f"{self.prefix}WARNING: cannot read {self.im_files[i]}; using a blank image, no labels")
            self._unreadable.add(i)
            w0, h0 = self.shapes[i]
            im = np.full((int(h0), int(w0), 3), PAD_COLOR[0], dtype=np.uint8)
        return im

    def _resized_hw(self, h0: int, w0: int):
        """(h, w) of an (h0, w0) image once its long side is scaled to img_size."""
        r = self.img_size / max(h0, w0)
        return max(1, round(h0 * r)), max(1, round(w0 * r))

    def load_image(self, i: int):
        """Image i resized so its long side is img_size. Returns (im BGR (h, w, 3), (h0, w0), (h, w))."""
        if self.ims[i] is not None:
            return self.ims[i], self.im_hw0[i], self.im_hw[i]
        im = self._read_image(i)
        h0, w0 = im.shape[:2]
        h, w = self._resized_hw(h0, w0)
        if (h, w) != (h0, w0):
            # INTER_AREA shrinks without aliasing for evaluation; training uses the faster INTER_LINEAR
            interp = cv2.INTER_LINEAR if (self.augment or h > h0) else cv2.INTER_AREA
            im = cv2.resize(im, (w, h), interpolation=interp)
        return im, (h0, w0), (h, w)

    def _labels_of(self, i: int) -> np.ndarray:
        """A copy of image i's normalised labels (none when its image could not be read)."""
        return np.zeros((0, 5), dtype=np.float32) if i in self._unreadable else self.labels[i].copy()

    def _pixel_labels(self, i: int, w: float, h: float, padw: float = 0.0, padh: float = 0.0) -> np.ndarray:
        """Labels of image i as (n, 5) [cls, x1, y1, x2, y2] pixels of a (w, h) image placed at (padw, padh)."""
        lb = self._labels_of(i)
        if len(lb):
            lb[:, 1:] = xywhn2xyxy(lb[:, 1:], w, h, padw, padh)
        return lb

    def load_mosaic(self, index: int, direct: bool | None = None):
        """Four images around a random centre of a 2s canvas, cropped back to s x s by a random perspective.

        Args:
            index: the first image; three more are drawn at random.
            direct: use mosaic4_direct (no canvas; only for axis-aligned transforms), the canvas path (False), or
                pick automatically (None): the default hyps have no rotation/shear/perspective, so direct applies.
        Returns:
            (image (s, s, 3), pixel labels (n, 5)).
        """
        s, hyp = self.img_size, self.hyp
        centre = [int(random.uniform(-b, 2 * s + b)) for b in self.mosaic_border]  # in [s/2, 3s/2)
        ids = [index] + random.choices(self.indices, k=3)
        random.shuffle(ids)
        matrix, scale = random_perspective_matrix((2 * s, 2 * s), (s, s), hyp["degrees"], hyp["translate"],
                                                  hyp["scale"], hyp["shear"], hyp["perspective"])
        if direct or (direct is None and is_axis_aligned(matrix)):
            sources = [self.ims[i] if self.ims[i] is not None else self._read_image(i) for i in ids]
            placed = [self._resized_hw(*im.shape[:2]) for im in sources]
            labels = [self._labels_of(i) for i in ids]
            return mosaic4_direct(sources, placed, labels, s, centre, matrix, scale)
        images, labels = [], []
        for i in ids:
            im, _, (h, w) = self.load_image(i)
            images.append(im)
            labels.append(self._pixel_labels(i, w, h))
        canvas, lb = mosaic4(images, labels, s, centre)
        return apply_perspective(canvas, lb, matrix, scale, (s, s))

    def _load_letterboxed(self, index: int):
        """Single image letterboxed to img_size (or its rect batch shape). Returns (im, pixel labels, shapes)."""
        im, (h0, w0), (h, w) = self.load_image(index)
        shape = self.batch_shapes[self.batch[index]] if self.rect else self.img_size
        im, ratio, pad = letterbox(im, shape, auto=False, scaleup=self.augment)
        # what val.py needs to map boxes back to the original image: total scale and padding
        shapes = (h0, w0), ((h * ratio[1] / h0, w * ratio[0] / w0), pad)
        labels = self._pixel_labels(index, ratio[0] * w, ratio[1] * h, pad[0], pad[1])
        if self.augment:
            if im is self.ims[index]:  # augment_hsv works in place: never on the RAM-cached original
                im = im.copy()
            hyp = self.hyp
            im, labels = random_perspective(im, labels, degrees=hyp["degrees"], translate=hyp["translate"],
                                            scale=hyp["scale"], shear=hyp["shear"], perspective=hyp["perspective"])
        return im, labels, shapes

    def __len__(self) -> int:
        return len(self.im_files)

    def __getitem__(self, index: int):
        """Returns (image uint8 (3, H, W) RGB, targets float32 (n, 6) [0, cls, xc, yc, w, h], path, shapes or None).

        ``shapes`` is ((h0, w0), ((gain_h, gain_w), (padw, padh))) for letterboxed images (gains = final size over
        original size, as YOLOv5's h / h0 and w / w0) and None for mosaics.
        """
        index = self.indices[index]
        hyp = self.hyp
        if self.mosaic and random.random() < hyp["mosaic"]:
            im, labels = self.load_mosaic(index)
            shapes = None
            if random.random() < hyp["mixup"]:
                im, labels = mixup(im, labels, *self.load_mosaic(random.randint(0, self.n - 1)))
        else:
            im, labels, shapes = self._load_letterboxed(index)
        labels = labels.astype(np.float32)
        if len(labels):
            labels[:, 1:5] = xyxy2xywhn(labels[:, 1:5], w=im.shape[1], h=im.shape[0], clip=True, eps=1e-3)
        if self.augment:
            augment_hsv(im, hgain=hyp["hsv_h"], sgain=hyp["hsv_s"], vgain=hyp["hsv_v"])
            im, labels = random_flips(im, labels, flipud=hyp["flipud"], fliplr=hyp["fliplr"])
        targets = torch.zeros((len(labels), 6))
        if len(labels):
            targets[:, 1:] = torch.from_numpy(labels)
        im = np.ascontiguousarray(im[:, :, ::-1].transpose(2, 0, 1))  # BGR HWC -> RGB CHW
        return torch.from_numpy(im), targets, self.im_files[index], shapes

    @staticmethod
    def collate_fn(batch):
        """Stack images and concatenate targets, writing each row's image index into column 0."""
        ims, targets, paths, shapes = zip(*batch)
        for i, t in enumerate(targets):
            t[:, 0] = i
        return torch.stack(ims, 0), torch.cat(targets, 0), paths, shapes

    @staticmethod
    def collate_fn4(batch):
        """--quad (YOLOv5 v6.0): every 4 images become one image of twice the size.

        Each group of 4 becomes, with probability 1/2, its first image upsampled 2x (bilinear; normalised labels
        unchanged), else a 2x2 tiling: image 0 top left, 1 bottom left, 2 top right, 3 bottom right, with label
        centres shifted into their quarter and every coordinate halved. Images past the last whole group are
        dropped, as in v6.0; a batch of only 1-3 images (the last one of an epoch) gives its first image upsampled.

        Returns:
            (imgs uint8 (B // 4, 3, 2H, 2W), targets (N, 6) [img_idx, cls, xc, yc, w, h], the groups' first paths,
            the groups' first shapes).
        """
        ims, targets, paths, shapes = zip(*batch)
        groups = max(len(ims) // 4, 1)
        out_ims, out_targets = [], []
        for g in range(groups):
            k = 4 * g
            if len(ims) < 4 or random.random() < 0.5:
                im = torch.nn.functional.interpolate(ims[k][None].float(), scale_factor=2.0, mode="bilinear",
                                                     align_corners=False)[0].to(ims[k].dtype)
                t = targets[k].clone()
            else:
                left, right = torch.cat(ims[k:k + 2], 1), torch.cat(ims[k + 2:k + 4], 1)  # stacked along height
                im = torch.cat((left, right), 2)
                t = torch.cat([_quarter(targets[k + q], dx, dy) for q, (dx, dy) in enumerate(QUAD_OFFSETS)], 0)
            out_ims.append(im)
            out_targets.append(t)
        for i, t in enumerate(out_targets):
            t[:, 0] = i
        # each group's first path and shapes (v6.0 kept the batch's first B // 4, which name other images)
        return torch.stack(out_ims, 0), torch.cat(out_targets, 0), paths[0:4 * groups:4], shapes[0:4 * groups:4]


QUAD_OFFSETS = ((0, 0), (0, 1), (1, 0), (1, 1))  # (dx, dy) of images 0..3 in a 2x2 quad tile, in image widths


def _quarter(targets: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """Targets (n, 6) [img, cls, xc, yc, w, h] of an image placed at (dx, dy) of a 2x2 tiling, normalised to it."""
    t = targets.clone()
    t[:, 2] = (t[:, 2] + dx) / 2
    t[:, 3] = (t[:, 3] + dy) / 2
    t[:, 4:6] /= 2
    return t


def labels_to_class_weights(labels, nc: int) -> np.ndarray:
    """Class weights from label frequencies (YOLOv5's): inverse instance count, normalised to sum to 1.

    Args:
        labels: per image (n_i, 5) [cls, xc, yc, w, h] arrays.
        nc: number of classes; a class without instances counts as one.

    Returns:
        (nc,) float64 weights.
    """
    classes = np.concatenate([lb[:, 0] for lb in labels]).astype(int) if len(labels) else np.zeros(0, int)
    counts = np.bincount(classes, minlength=nc).astype(np.float64)
    counts[counts == 0] = 1
    weights = 1 / counts
    return weights / weights.sum()


def labels_to_image_weights(labels, nc: int, class_weights: np.ndarray) -> np.ndarray:
    """Weight of each image: the sum of its labels' class weights. Returns (n_images,)."""
    counts = np.stack([np.bincount(lb[:, 0].astype(int), minlength=nc) for lb in labels])  # (n_images, nc)
    return counts @ np.asarray(class_weights, dtype=np.float64)


def image_weighted_indices(labels, nc: int, maps, rng: random.Random | None = None) -> list[int]:
    """--image-weights (YOLOv5 v6.0): an epoch's image draw favouring rare classes and classes with low mAP.

    A class weighs its inverse-frequency weight (labels_to_class_weights) times (1 - its mAP)^2 (v6.0 writes this
    as class_weights * nc * (1 - maps)^2 / nc); an image weighs the sum over its labels; n images are drawn with
    replacement in proportion to that.

    Args:
        labels: per image (n_i, 5) label arrays (dataset.labels).
        nc: number of classes.
        maps: (nc,) per-class mAP@.5:.95 from the last validation (zeros before any).
        rng: random.Random to draw with (default: the module-level generator, which the trainer seeds).

    Returns:
        n dataset indices (dataset.indices for the epoch). Images without labels get weight 0 and are never
        drawn, unless no image has a positive weight, when every image is equally likely.
    """
    class_weights = labels_to_class_weights(labels, nc) * (1 - np.asarray(maps, dtype=np.float64)) ** 2
    weights = labels_to_image_weights(labels, nc, class_weights)
    if not np.any(weights > 0):
        weights = np.ones(len(labels))
    return (rng or random).choices(range(len(labels)), weights=weights.tolist(), k=len(labels))


def _cache_mode(cache):
    """None/False -> None; True/'ram' -> 'ram'; 'disk' -> 'disk'."""
    if cache in (None, False, "", "none"):
        return None
    if cache is True or cache == "ram":
        return "ram"
    if cache == "disk":
        return "disk"
    raise ValueError(f"cache={cache!r} is not one of None, 'ram', 'disk'")


def seed_worker(worker_id: int) -> None:
    """Seed python and numpy from the per-worker torch seed (derived from the loader's seeded generator).

    Recent torch versions seed both already; doing it here keeps the guarantee independent of the torch version.
    """
    seed = torch.initial_seed() % 2 ** 32
    random.seed(seed)
    np.random.seed(seed)
    cv2.setNumThreads(0)  # worker processes already run in parallel; cv2's own threads would oversubscribe


def distributed_context(rank: int):
    """(world_size, global_rank) for the sampler: from torch.distributed when initialised, else WORLD_SIZE/RANK env.

    ``rank`` is the LOCAL_RANK the trainer passes (-1 = no DDP); the sampler needs the global rank.
    """
    if rank == -1:
        return 1, 0
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    world, global_rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", rank))
    if not 0 <= global_rank < world:
        raise ValueError(f"rank {global_rank} is outside WORLD_SIZE={world}; launch with torchrun or pass rank=-1")
    return world, global_rank


def create_dataloader(path, imgsz: int, batch_size: int, stride: int, single_cls: bool = False, hyp=None,
                      augment: bool = False, cache=None, pad: float = 0.0, rect: bool = False, rank: int = -1,
                      workers: int = 8, prefix: str = "", shuffle: bool = False, seed: int = 0, nc: int | None = None,
                      image_weights: bool = False, quad: bool = False):
    """Build the dataset and its DataLoader.

    Args:
        path: split folder, .txt list or list of those.   imgsz: training / inference size (multiple of stride).
        cache: None, 'ram' (True) or 'disk'.   rank: LOCAL_RANK; != -1 selects a DistributedSampler.
        shuffle: shuffle each epoch (ignored with rect, whose batches depend on the sorted order).
        seed: base seed of the sampler and of the workers (plus the global rank).
        nc: number of classes; images whose labels use ids >= nc are skipped with a warning (None: no check).
        image_weights: the caller redraws ``dataset.indices`` each epoch (image_weighted_indices); rect is turned
            off (weighted draws cannot keep rect batches) and workers are started anew each epoch to see them.
        quad: collate with collate_fn4 (B // 4 images of twice the size per batch).
    Returns:
        (loader, dataset). Batches are (imgs uint8 (B, 3, H, W), targets float32 (N, 6) [img_idx, cls, xc, yc, w, h],
        paths tuple, shapes tuple). Workers are persistent (unless image_weights), so set dataset attributes before
        the first epoch.
    """
    if image_weights and rect:
        LOGGER.warning(f"{prefix}WARNING: --rect is ignored with --image-weights (weighted draws mix the rect batches)")
        rect = False
    if rect and shuffle:
        LOGGER.warning(f"{prefix}WARNING: --rect is incompatible with shuffle; using shuffle=False")
        shuffle = False
    dataset = LoadImagesAndLabels(path, imgsz, batch_size, augment=augment, hyp=hyp, rect=rect, cache_images=cache,
                                  single_cls=single_cls, stride=int(stride), pad=pad, prefix=prefix, nc=nc)
    batch_size = min(batch_size, len(dataset))
    world, global_rank = distributed_context(rank)
    nw = min((os.cpu_count() or 1) // world, batch_size if batch_size > 1 else 0, workers)
    sampler = None
    if rank != -1:
        sampler = DistributedSampler(dataset, num_replicas=world, rank=global_rank, shuffle=shuffle, seed=seed)
    generator = torch.Generator()
    generator.manual_seed(seed + global_rank)
    collate = LoadImagesAndLabels.collate_fn4 if quad else LoadImagesAndLabels.collate_fn
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                        num_workers=nw, pin_memory=torch.cuda.is_available(), collate_fn=collate,
                        worker_init_fn=seed_worker, generator=generator, persistent_workers=nw > 0 and not image_weights)
    return loader, dataset


def restart_loader(loader: DataLoader) -> DataLoader:
    """The same DataLoader (dataset, sampler and its RNG, batch size, collate, workers) with fresh workers.

    Persistent workers hold their own copy of the dataset, made when they started; a change to a dataset attribute
    (``dataset.mosaic = False``) reaches them only through new workers. Single-process loaders read the dataset
    directly and come back unchanged.
    """
    if loader.num_workers == 0 or not loader.persistent_workers:
        return loader
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=loader.sampler,
                      num_workers=loader.num_workers, pin_memory=loader.pin_memory, collate_fn=loader.collate_fn,
                      worker_init_fn=loader.worker_init_fn, generator=loader.generator, persistent_workers=True,
                      drop_last=loader.drop_last)


def _find_yaml(name) -> Path:
    """A dataset YAML given as a path, or as a bare name found in the repository's data/ folder."""
    p = Path(name).expanduser()
    candidates = [p, ROOT / "data" / p, ROOT / p]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(f"dataset YAML {name} not found (looked in {', '.join(str(c) for c in candidates)}); "
                            f"pass a path to an existing file, e.g. data/shapes.yaml")


def _class_names(data: dict, source: str):
    """(names list, nc) from the YAML's names (list or {id: name}) and/or nc, checked against each other."""
    names, nc = data.get("names"), data.get("nc")
    if names is None and nc is None:
        raise ValueError(f"{source} defines neither 'names' nor 'nc'; add names: [class0, class1, ...] "
                         f"(nc is derived from it) or at least nc: <number of classes>")
    if isinstance(names, dict):
        if sorted(int(k) for k in names) != list(range(len(names))):
            raise ValueError(f"{source}: names dict keys must be 0..{len(names) - 1}; got {sorted(names)}")
        names = [names[k] for k in sorted(names, key=int)]
    if names is None:
        names = [f"class{i}" for i in range(int(nc))]
    names = [str(n) for n in names]
    nc = len(names) if nc is None else int(nc)
    if nc != len(names):
        raise ValueError(f"{source}: nc={nc} but {len(names)} names are listed; make them agree")
    return names, nc


def _dataset_root(path) -> Path:
    """Absolute dataset root: relative paths resolve against the current folder first, then the repository root."""
    p = Path(path or ".").expanduser()
    if p.is_absolute():
        return p
    here = Path.cwd() / p
    return here.resolve() if here.exists() else (ROOT / p).resolve()


def _resolve_split(value, root: Path):
    """A split entry (str or list) made absolute against the dataset root; None stays None."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [str((root / str(v)).resolve()) for v in value]
    return str((root / str(value)).resolve())


def _split_exists(value) -> bool:
    return value is not None and all(Path(v).exists() for v in (value if isinstance(value, list) else [value]))


def _dataset_generators() -> dict:
    """Whitelist of generators a YAML ``download: {generator: name, ...}`` hook may call."""
    from utils.synthetic import generate_shapes
    return {"shapes": generate_shapes}


def run_download_hook(hook, root: Path, source: str) -> None:
    """Run a YAML download hook: {generator: name, **kwargs} or a .sh/.py script under data/scripts (no eval/exec).

    Scripts run from the repository root with the dataset root as their only argument.
    """
    if isinstance(hook, dict):
        kwargs = dict(hook)
        name = kwargs.pop("generator", None)
        generators = _dataset_generators()
        if name not in generators:
            raise ValueError(f"{source}: download generator {name!r} is unknown; use one of {sorted(generators)}")
        LOGGER.info(f"Dataset not found, generating it with '{name}' into {root} ...")
        generators[name](root, **kwargs)
        return
    scripts = (ROOT / "data" / "scripts").resolve()
    given = Path(str(hook))
    candidates = [given] if given.is_absolute() else [ROOT / given, scripts / given]
    script = next((c.resolve() for c in candidates if c.is_file()), None)
    if script is None or script.suffix not in (".sh", ".py") or scripts not in script.parents:
        LOGGER.warning(f"WARNING: {source}: ignoring download hook {str(hook)[:80]!r}: it must be "
                       f"{{generator: name}} or an existing .sh/.py script under {scripts}")
        return
    cmd = [sys.executable if script.suffix == ".py" else "bash", str(script), str(root)]
    LOGGER.info(f"Dataset not found, running {' '.join(cmd)} ...")
    result = subprocess.run(cmd, cwd=ROOT, check=False)
    if result.returncode:
        LOGGER.warning(f"WARNING: download script {script} exited with status {result.returncode}")


def check_dataset(data, autodownload: bool = True) -> dict:
    """Load and normalise a dataset description, preparing the dataset through its download hook when needed.

    Args:
        data: YAML path, bare YAML name in data/ ('shapes.yaml'), or an already-loaded dict.
        autodownload: run the YAML's ``download`` hook when the val images are missing.
    Returns:
        dict with the YAML's keys plus absolute 'path', 'train', 'val', 'test' (str, list of str or None),
        'nc' (int) and 'names' (list of str).
    Raises:
        ValueError when classes are undefined or inconsistent, FileNotFoundError when the val images are missing.
    """
    yaml_file = None
    if isinstance(data, (str, Path)):
        yaml_file = _find_yaml(data)
        data = yaml_load(yaml_file)
    if not isinstance(data, dict):
        raise TypeError(f"check_dataset expects a YAML path or a dict, got {type(data).__name__}")
    source = str(yaml_file) if yaml_file else "dataset dict"
    names, nc = _class_names(data, source)
    for key in ("train", "val"):
        if not data.get(key):
            raise ValueError(f"{source} has no '{key}:' entry; add the image folder, list or .txt for that split")
    root = _dataset_root(data.get("path"))
    out = {**data, "path": str(root), "nc": nc, "names": names}
    for key in ("train", "val", "test"):
        out[key] = _resolve_split(data.get(key), root)
    if not _split_exists(out["val"]):
        if autodownload and data.get("download"):
            run_download_hook(data["download"], root, source)
        if not _split_exists(out["val"]):
            hint = ("its download hook did not create it" if autodownload and data.get("download")
                    else "prepare the dataset first (see the comments in the dataset YAML)")
            raise FileNotFoundError(f"Dataset not found: val images {out['val']} do not exist; {hint}")
    return out
