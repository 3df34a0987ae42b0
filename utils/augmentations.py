"""Detection augmentations with YOLOv5 v6.0 semantics, written for speed with cv2 and vectorised numpy.

Conventions used throughout this module:
- images are BGR uint8 arrays (H, W, 3), as returned by cv2.imread;
- "pixel labels" are float arrays (n, 5) of [cls, x1, y1, x2, y2] in pixels of the image they travel with;
- "normalised labels" are float arrays (n, 5) of [cls, xc, yc, w, h] divided by the image width/height.

Geometric randomness comes from python's ``random`` and colour/mixup randomness from numpy's global generator, the
same split YOLOv5 uses; the data loader seeds both in every worker so a seeded run is reproducible.
"""
from __future__ import annotations

import math
import random

import cv2
import numpy as np

from utils.boxes import xywhn2xyxy

PAD_COLOR = (114, 114, 114)  # grey used for letterbox borders, empty mosaic space and warp borders


def letterbox(im: np.ndarray, new_shape=640, color=PAD_COLOR, auto: bool = True, scaleFill: bool = False,
              scaleup: bool = True, stride: int = 32):
    """Resize an image keeping its aspect ratio, then pad it to ``new_shape``.

    Args:
        im: (h0, w0, 3) image.
        new_shape: int or (h, w) target size.
        color: border colour.
        auto: pad only up to the next multiple of ``stride`` (minimum rectangle) instead of the full target.
        scaleFill: stretch to exactly new_shape without padding (used only when auto is False).
        scaleup: allow enlarging; validation passes False so small images are not upsampled.
        stride: multiple used by auto.
    Returns:
        im: the padded image.
        ratio: (rw, rh) scale applied to width and height.
        pad: (dw, dh) float padding on each side (left = right = dw, top = bottom = dh up to rounding).
    """
    h0, w0 = im.shape[:2]
    th, tw = (new_shape, new_shape) if isinstance(new_shape, int) else (int(new_shape[0]), int(new_shape[1]))
    r = min(th / h0, tw / w0)
    if not scaleup:
        r = min(r, 1.0)
    ratio = (r, r)
    new_w, new_h = int(round(w0 * r)), int(round(h0 * r))
    dw, dh = tw - new_w, th - new_h
    if auto:
        dw, dh = dw % stride, dh % stride
    elif scaleFill:
        dw, dh = 0, 0
        new_w, new_h = tw, th
        ratio = (tw / w0, th / h0)
    dw, dh = dw / 2, dh / 2
    if (new_w, new_h) != (w0, h0):
        im = cv2.resize(im, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    # the +-0.1 splits an odd pixel of padding between the two sides deterministically
    top, bottom = int(round(dh - 0.1)), int(round(dh + 0.1))
    left, right = int(round(dw - 0.1)), int(round(dw + 0.1))
    if top or bottom or left or right:
        im = cv2.copyMakeBorder(im, top, bottom, left, right, cv2.BORDER_CONSTANT, value=color)
    return im, ratio, (dw, dh)


def augment_hsv(im: np.ndarray, hgain: float = 0.5, sgain: float = 0.5, vgain: float = 0.5) -> None:
    """Random hue/saturation/value jitter, in place, through three 256-entry lookup tables.

    Args:
        im: (H, W, 3) BGR uint8 image, modified in place.
        hgain, sgain, vgain: maximum relative change of each channel (hyp hsv_h, hsv_s, hsv_v).
    """
    if not (hgain or sgain or vgain):
        return
    gains = np.random.uniform(-1, 1, 3) * (hgain, sgain, vgain) + 1
    x = np.arange(256, dtype=np.float32)
    lut = np.empty((1, 256, 3), dtype=np.uint8)  # one 3-channel table: no split/merge of the image
    lut[0, :, 0] = (x * gains[0]) % 180  # OpenCV hue lives in 0..179 and wraps around
    lut[0, :, 1] = np.clip(x * gains[1], 0, 255)
    lut[0, :, 2] = np.clip(x * gains[2], 0, 255)
    hsv = cv2.cvtColor(im, cv2.COLOR_BGR2HSV)
    cv2.LUT(hsv, lut, dst=hsv)
    cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR, dst=im)


def box_candidates(box1: np.ndarray, box2: np.ndarray, wh_thr: float = 2, ar_thr: float = 100,
                   area_thr: float = 0.1, eps: float = 1e-16) -> np.ndarray:
    """Which transformed boxes are still worth training on.

    A box survives when it is wider and taller than wh_thr pixels, keeps more than area_thr of its (scaled)
    area after clipping, and its aspect ratio stays below ar_thr.

    Args:
        box1: (n, 4) xyxy boxes before the transform, already multiplied by the transform's scale.
        box2: (n, 4) xyxy boxes after the transform and clipping.
    Returns:
        (n,) bool mask.
    """
    w1, h1 = box1[:, 2] - box1[:, 0], box1[:, 3] - box1[:, 1]
    w2, h2 = box2[:, 2] - box2[:, 0], box2[:, 3] - box2[:, 1]
    aspect = np.maximum(w2 / (h2 + eps), h2 / (w2 + eps))
    return (w2 > wh_thr) & (h2 > wh_thr) & (w2 * h2 / (w1 * h1 + eps) > area_thr) & (aspect < ar_thr)


def random_perspective_matrix(in_hw, out_hw, degrees: float = 0.0, translate: float = 0.0, scale: float = 0.0,
                              shear: float = 0.0, perspective: float = 0.0):
    """Draw the random 3x3 homography used by random_perspective.

    Order: move the input centre to the origin, perspective, rotate + scale, shear, then translate to a random
    point around the output centre.

    Args:
        in_hw: (h, w) of the input image.  out_hw: (h, w) of the output image.
        degrees, translate, scale, shear, perspective: ranges, as in the hyp file.
    Returns:
        (matrix (3, 3) float64, scale factor drawn).
    """
    centre = np.eye(3)
    centre[0, 2], centre[1, 2] = -in_hw[1] / 2, -in_hw[0] / 2
    persp = np.eye(3)
    persp[2, 0], persp[2, 1] = random.uniform(-perspective, perspective), random.uniform(-perspective, perspective)
    rot = np.eye(3)
    s = random.uniform(1 - scale, 1 + scale)
    rot[:2] = cv2.getRotationMatrix2D(center=(0, 0), angle=random.uniform(-degrees, degrees), scale=s)
    shr = np.eye(3)
    shr[0, 1] = math.tan(math.radians(random.uniform(-shear, shear)))
    shr[1, 0] = math.tan(math.radians(random.uniform(-shear, shear)))
    move = np.eye(3)
    move[0, 2] = random.uniform(0.5 - translate, 0.5 + translate) * out_hw[1]
    move[1, 2] = random.uniform(0.5 - translate, 0.5 + translate) * out_hw[0]
    return move @ shr @ rot @ persp @ centre, s


def is_axis_aligned(matrix: np.ndarray) -> bool:
    """True for a pure scale + translation (no rotation, shear or perspective): the default hyp files."""
    return not (matrix[0, 1] or matrix[1, 0] or matrix[2, 0] or matrix[2, 1])


def transform_boxes(boxes: np.ndarray, matrix: np.ndarray, width: int, height: int) -> np.ndarray:
    """Map xyxy boxes through a 3x3 homography, taking the extent of the 4 moved corners, clipped to the image.

    Args:
        boxes: (n, 4) xyxy pixels.  matrix: (3, 3).  width, height: output image size.
    Returns:
        (n, 4) xyxy pixels.
    """
    n = len(boxes)
    corners = np.ones((n * 4, 3))
    corners[:, :2] = boxes[:, [0, 1, 2, 3, 0, 3, 2, 1]].reshape(n * 4, 2)  # (x1y1, x2y2, x1y2, x2y1) per box
    moved = corners @ matrix.T
    xy = moved[:, :2] / moved[:, 2:3] if matrix[2, 0] or matrix[2, 1] else moved[:, :2]
    xy = xy.reshape(n, 8)
    xs, ys = xy[:, 0::2], xy[:, 1::2]
    out = np.stack([xs.min(1), ys.min(1), xs.max(1), ys.max(1)], axis=1)
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, width)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, height)
    return out


def apply_perspective(im: np.ndarray, targets: np.ndarray, matrix: np.ndarray, s: float, out_hw):
    """Warp an image and its pixel labels with a 3x3 matrix, dropping boxes that degenerate.

    Args:
        im: (H, W, 3) image.  targets: (n, 5) pixel labels [cls, x1, y1, x2, y2].
        matrix: (3, 3) homography.  s: its scale factor (box_candidates compares areas at that scale).
        out_hw: (h, w) of the output.
    Returns:
        (warped image (h, w, 3), surviving pixel labels (m, 5)).
    """
    height, width = out_hw
    if (height, width) != im.shape[:2] or (matrix != np.eye(3)).any():
        if matrix[2, 0] or matrix[2, 1]:
            im = cv2.warpPerspective(im, matrix, dsize=(width, height), borderValue=PAD_COLOR)
        else:  # affine is cheaper, and exact when the last matrix row is (0, 0, 1)
            im = cv2.warpAffine(im, matrix[:2], dsize=(width, height), borderValue=PAD_COLOR)
    if len(targets):
        new = transform_boxes(targets[:, 1:5], matrix, width, height)
        keep = box_candidates(targets[:, 1:5] * s, new, area_thr=0.10)
        targets = targets[keep]
        targets[:, 1:5] = new[keep]
    return im, targets


def random_perspective(im: np.ndarray, targets: np.ndarray | None = None, degrees: float = 10, translate: float = 0.1,
                       scale: float = 0.1, shear: float = 10, perspective: float = 0.0, border=(0, 0)):
    """Random rotation, scale, shear, translation and (optionally) perspective, applied to image and boxes.

    Args:
        im: (H, W, 3) image.
        targets: (n, 5) pixel labels [cls, x1, y1, x2, y2] or None.
        degrees, translate, scale, shear, perspective: ranges, as in the hyp file.
        border: (bh, bw) added to each side of the output; the mosaic passes (-s/2, -s/2) to crop its 2s canvas to s.
    Returns:
        im: (H + 2*bh, W + 2*bw, 3) warped image.
        targets: (m, 5) surviving pixel labels (degenerate or mostly-cropped boxes removed).
    """
    targets = np.zeros((0, 5), dtype=np.float32) if targets is None else targets
    out_hw = (im.shape[0] + 2 * border[0], im.shape[1] + 2 * border[1])
    matrix, s = random_perspective_matrix(im.shape[:2], out_hw, degrees, translate, scale, shear, perspective)
    return apply_perspective(im, targets, matrix, s, out_hw)


def _fill_around(canvas: np.ndarray, quadrant, placed) -> None:
    """Paint the part of a canvas quadrant (x1, y1, x2, y2) outside the placed image rectangle grey.

    Filling only the uncovered strips, instead of the whole 2s x 2s canvas first, saves a large memset per mosaic.
    """
    qx1, qy1, qx2, qy2 = quadrant
    px1, py1, px2, py2 = placed
    canvas[qy1:qy2, qx1:px1] = PAD_COLOR[0]
    canvas[qy1:qy2, px2:qx2] = PAD_COLOR[0]
    canvas[qy1:py1, px1:px2] = PAD_COLOR[0]
    canvas[py2:qy2, px1:px2] = PAD_COLOR[0]


def _quadrant_origin(k: int, centre, hw):
    """Top-left canvas corner of mosaic image k of size hw = (h, w): images 0..3 meet at the centre."""
    return (centre[0] - hw[1] if k in (0, 2) else centre[0]), (centre[1] - hw[0] if k in (0, 1) else centre[1])


def mosaic4(images, labels, size: int, centre):
    """Tile four images around a centre point on a (2*size, 2*size) grey canvas.

    Image 0 ends at the centre from the top-left, image 1 from the top-right, 2 bottom-left, 3 bottom-right;
    parts that fall outside the canvas are cut off, along with the matching part of each box.

    Args:
        images: 4 images, each already resized so its long side is about ``size``.
        labels: 4 pixel-label arrays (n_i, 5) in each image's own coordinates.
        size: output image size s; the canvas is 2s x 2s.
        centre: (xc, yc) canvas point where the four images meet.
    Returns:
        canvas: (2s, 2s, 3) image.  labels: (n, 5) pixel labels in canvas coordinates, clipped to the canvas.
    """
    xc, yc = int(centre[0]), int(centre[1])
    canvas = np.empty((2 * size, 2 * size, images[0].shape[2]), dtype=np.uint8)
    out = []
    for k, (im, lb) in enumerate(zip(images, labels)):
        h, w = im.shape[:2]
        x1, y1 = _quadrant_origin(k, (xc, yc), (h, w))  # before clipping at the canvas edge
        cx1, cy1 = max(x1, 0), max(y1, 0)
        cx2, cy2 = min(x1 + w, 2 * size), min(y1 + h, 2 * size)
        canvas[cy1:cy2, cx1:cx2] = im[cy1 - y1:cy2 - y1, cx1 - x1:cx2 - x1]
        _fill_around(canvas, (0, 0, xc, yc) if k == 0 else (xc, 0, 2 * size, yc) if k == 1 else
                     (0, yc, xc, 2 * size) if k == 2 else (xc, yc, 2 * size, 2 * size), (cx1, cy1, cx2, cy2))
        if len(lb):
            lb = lb.copy()
            lb[:, [1, 3]] += x1
            lb[:, [2, 4]] += y1
            out.append(lb)
    merged = np.concatenate(out, 0) if out else np.zeros((0, 5), dtype=np.float32)
    merged[:, 1:] = merged[:, 1:].clip(0, 2 * size)
    return canvas, merged


def _direct_labels(labels: np.ndarray, src_hw, src_box, dst_box, inside, s_canvas, size: int):
    """Boxes of one mosaic image for mosaic4_direct, moved exactly as its pixels were.

    Args:
        labels: (n, 5) normalised labels of the source image.  src_hw: (h, w) of the source image.
        src_box / dst_box: (x1, y1, x2, y2) source crop and the output rectangle it was resized to.
        inside: (x1, y1, x2, y2) part of the source image that lies on the mosaic canvas, in source pixels.
        s_canvas: (sx, sy) output pixels per source pixel in the canvas path (matrix scale / source-per-canvas).
    Returns:
        (m, 5) pixel labels in the output, degenerate boxes removed as in apply_perspective.
    """
    out = labels.copy()
    src = xywhn2xyxy(labels[:, 1:], src_hw[1], src_hw[0])
    src = np.clip(src, np.tile(inside[:2], 2), np.tile(inside[2:], 2))  # the canvas path cuts boxes at its edge
    gain = np.array([(dst_box[2] - dst_box[0]) / (src_box[2] - src_box[0]),
                     (dst_box[3] - dst_box[1]) / (src_box[3] - src_box[1])])
    new = (src - np.tile(src_box[:2], 2)) * np.tile(gain, 2) + np.tile(dst_box[:2], 2)
    new = new.clip(0, size)
    keep = box_candidates(src * np.tile(s_canvas, 2), new, area_thr=0.10)
    out[:, 1:] = new
    return out[keep]


def mosaic4_direct(images, placed, labels, size: int, centre, matrix: np.ndarray, s: float):
    """mosaic4 followed by an axis-aligned apply_perspective to size x size, without building the canvas.

    Each visible part of a source image is resized straight to its place in the output, which skips the 2s x 2s
    canvas, four full-size resizes and the warp. The geometry equals the canvas path up to pixel rounding, and the
    boxes of every image move with exactly the scale and offset used for its pixels.

    Args:
        images: 4 source images at any resolution.
        placed: 4 (h, w) sizes the images take on the canvas (long side ~size, as load_image resizes them).
        labels: 4 normalised label arrays (n_i, 5) [cls, xc, yc, w, h].
        size: output size s; the virtual canvas is 2s x 2s.
        centre: (xc, yc) canvas point where the images meet.
        matrix: (3, 3) axis-aligned canvas-to-output transform (see is_axis_aligned).  s: its scale factor.
    Returns:
        (image (s, s, 3), pixel labels (n, 5) [cls, x1, y1, x2, y2] in the output).
    """
    out = np.full((size, size, images[0].shape[2]), PAD_COLOR[0], dtype=np.uint8)
    kx, ky, tx, ty = matrix[0, 0], matrix[1, 1], matrix[0, 2], matrix[1, 2]
    window = (-tx / kx, -ty / ky, (size - tx) / kx, (size - ty) / ky)  # canvas region that reaches the output
    kept = []
    for k, (im, hw, lb) in enumerate(zip(images, placed, labels)):
        x0, y0 = _quadrant_origin(k, centre, hw)
        sh, sw = im.shape[:2]
        fx, fy = sw / hw[1], sh / hw[0]  # source pixels per canvas pixel
        inside = ((max(x0, 0) - x0) * fx, (max(y0, 0) - y0) * fy,
                  (min(x0 + hw[1], 2 * size) - x0) * fx, (min(y0 + hw[0], 2 * size) - y0) * fy)
        sx1 = max(math.floor((max(x0, 0, window[0]) - x0) * fx), 0)
        sy1 = max(math.floor((max(y0, 0, window[1]) - y0) * fy), 0)
        sx2 = min(math.ceil((min(x0 + hw[1], 2 * size, window[2]) - x0) * fx), sw)
        sy2 = min(math.ceil((min(y0 + hw[0], 2 * size, window[3]) - y0) * fy), sh)
        dx1, dx2 = (round(kx * (x0 + v / fx) + tx) for v in (sx1, sx2))
        dy1, dy2 = (round(ky * (y0 + v / fy) + ty) for v in (sy1, sy2))
        if sx2 <= sx1 or sy2 <= sy1 or dx2 <= dx1 or dy2 <= dy1:
            continue  # nothing of this image reaches the output
        patch = cv2.resize(im[sy1:sy2, sx1:sx2], (dx2 - dx1, dy2 - dy1), interpolation=cv2.INTER_LINEAR)
        ox1, oy1, ox2, oy2 = max(dx1, 0), max(dy1, 0), min(dx2, size), min(dy2, size)
        out[oy1:oy2, ox1:ox2] = patch[oy1 - dy1:oy2 - dy1, ox1 - dx1:ox2 - dx1]
        if len(lb):
            kept.append(_direct_labels(lb, (sh, sw), (sx1, sy1, sx2, sy2), (dx1, dy1, dx2, dy2), inside,
                                       (s / fx, s / fy), size))
    return out, (np.concatenate(kept, 0) if kept else np.zeros((0, 5), dtype=np.float32))


def mixup(im: np.ndarray, labels: np.ndarray, im2: np.ndarray, labels2: np.ndarray):
    """Blend two same-size images with a Beta(32, 32) weight (close to 0.5) and keep the labels of both.

    Returns:
        (blended image, concatenated labels).
    """
    r = float(np.random.beta(32.0, 32.0))
    blended = cv2.addWeighted(im, r, im2, 1.0 - r, 0.0)
    return blended, np.concatenate((labels, labels2), 0)


def random_flips(im: np.ndarray, labels: np.ndarray, flipud: float = 0.0, fliplr: float = 0.5):
    """Random vertical / horizontal flips.

    Args:
        im: (H, W, 3) image.
        labels: (n, 5) normalised labels [cls, xc, yc, w, h]; changed in place.
        flipud, fliplr: probabilities.
    Returns:
        (image, labels); the image may be a flipped view (make it contiguous before handing it to torch).
    """
    if flipud and random.random() < flipud:
        im = im[::-1]
        labels[:, 2] = 1 - labels[:, 2]
    if fliplr and random.random() < fliplr:
        im = im[:, ::-1]
        labels[:, 1] = 1 - labels[:, 1]
    return im, labels
