"""Augmentations move boxes together with the pixels they describe.

Scenes are solid, colour-coded rectangles on black, so the true box of every object after a transform is the
bounding box of the pixels of its colour, found with connected components.
"""
import random

import cv2
import numpy as np
import pytest

from utils.augmentations import (apply_perspective, augment_hsv, box_candidates, is_axis_aligned, letterbox, mixup,
                                 mosaic4, mosaic4_direct, random_flips, random_perspective, random_perspective_matrix,
                                 transform_boxes)
from utils.boxes import xywhn2xyxy, xyxy2xywhn

COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255], [0, 255, 255],
                    [255, 128, 0], [128, 0, 255]], dtype=np.uint8)


def scene(h, w, boxes):
    """Black image with rectangle k (x1, y1, x2, y2 exclusive) filled in COLOURS[k]; labels (n, 5) [k, box]."""
    im = np.zeros((h, w, 3), np.uint8)
    for k, (x1, y1, x2, y2) in enumerate(boxes):
        im[y1:y2, x1:x2] = COLOURS[k]
    labels = np.array([[k, *b] for k, b in enumerate(boxes)], dtype=np.float32)
    return im, labels


def pixel_boxes(im, colour, tol=60, min_area=6):
    """xyxy boxes of the connected regions whose colour is within tol of ``colour`` (per channel)."""
    mask = (np.abs(im.astype(int) - colour.astype(int)) <= tol).all(-1).astype(np.uint8)
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask)
    return [(x, y, x + w, y + h) for x, y, w, h, a in stats[1:n] if a >= min_area]


def iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def assert_boxes_cover_objects(im, labels, thr=0.7):
    """Every label box matches a region of its class colour with IoU > thr."""
    assert len(labels), "all labels were lost"
    for cls, *box in labels:
        regions = pixel_boxes(im, COLOURS[int(cls)])
        best = max((iou(box, r) for r in regions), default=0.0)
        assert best > thr, f"class {int(cls)} box {np.round(box, 1)} vs pixel regions {regions}: IoU {best:.2f}"


BOXES = [(20, 30, 60, 50), (70, 20, 90, 80), (30, 70, 55, 95), (62, 85, 100, 100)]


@pytest.mark.parametrize("shape,auto,scale_fill", [((128, 128), False, False), ((128, 128), True, False),
                                                    ((96, 160), False, False), ((128, 128), False, True)])
def test_letterbox_round_trip(shape, auto, scale_fill):
    im, labels = scene(110, 130, BOXES)
    out, (rw, rh), (dw, dh) = letterbox(im, shape, auto=auto, scaleFill=scale_fill, stride=32)
    if auto:
        assert out.shape[0] % 32 == 0 and out.shape[1] % 32 == 0 and max(out.shape[:2]) == 128
    else:
        assert out.shape[:2] == shape
    moved = labels.copy()
    moved[:, [1, 3]] = labels[:, [1, 3]] * rw + dw
    moved[:, [2, 4]] = labels[:, [2, 4]] * rh + dh
    assert_boxes_cover_objects(out, moved, thr=0.8)
    back = moved.copy()  # our own inverse of the letterbox mapping
    back[:, [1, 3]] = (moved[:, [1, 3]] - dw) / rw
    back[:, [2, 4]] = (moved[:, [2, 4]] - dh) / rh
    np.testing.assert_allclose(back, labels, atol=1e-3)


def test_letterbox_no_upscale_and_padding_split():
    im = np.zeros((40, 51, 3), np.uint8)
    out, ratio, (dw, dh) = letterbox(im, 64, auto=False, scaleup=False)
    assert ratio == (1.0, 1.0) and out.shape == (64, 64, 3)
    assert (dw, dh) == (6.5, 12.0)
    # an odd pixel of padding goes to the right/bottom side
    assert (out[:12] == 114).all() and (out[:, :6] == 114).all() and (out[:, 57:] == 114).all()
    assert (out[12:52, 6:57] == 0).all()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("perspective", [0.0, 0.0004])
def test_random_perspective_moves_boxes_with_pixels(seed, perspective):
    random.seed(seed)
    im, labels = scene(128, 128, [(44, 40, 70, 60), (60, 66, 76, 90), (36, 64, 56, 76)])
    out, new = random_perspective(im, labels.copy(), degrees=30, translate=0.08, scale=0.2, shear=8,
                                  perspective=perspective)
    assert out.shape == im.shape
    assert len(new) == 3  # all objects stay inside the image, so none may be dropped
    assert_boxes_cover_objects(out, new, thr=0.75)


def test_transform_boxes_divides_by_depth():
    matrix = np.eye(3)
    matrix[2, 0] = 0.01  # pure perspective: (x, y) -> (x, y) / (1 + 0.01 x)
    out = transform_boxes(np.array([[10.0, 10.0, 20.0, 20.0]]), matrix, 100, 100)
    np.testing.assert_allclose(out[0], [10 / 1.1, 10 / 1.2, 20 / 1.2, 20 / 1.1], rtol=1e-6)
    out = transform_boxes(np.array([[-5.0, 10.0, 120.0, 20.0]]), np.eye(3), 100, 100)
    np.testing.assert_allclose(out[0], [0, 10, 100, 20])  # clipped to the image


def test_random_perspective_border_crops_to_size():
    random.seed(0)
    im, labels = scene(128, 128, [(10, 10, 50, 40), (70, 70, 120, 110)])
    out, new = random_perspective(im, labels.copy(), degrees=0, translate=0.1, scale=0.3, shear=0,
                                  border=(-32, -32))
    assert out.shape == (64, 64, 3)
    assert ((new[:, 1:] >= 0) & (new[:, 1:] <= 64)).all()
    if len(new):
        assert_boxes_cover_objects(out, new, thr=0.7)


def test_box_candidates_rules():
    before = np.array([[0, 0, 10, 10]] * 4, dtype=np.float32)
    after = np.array([[0, 0, 10, 10],  # unchanged: kept
                      [0, 0, 1.5, 10],  # narrower than 2 px: dropped
                      [0, 0, 3, 3],  # 9% of its area left: dropped
                      [0, 0, 300, 2.5]], dtype=np.float32)  # aspect ratio 120: dropped
    before[3] = [0, 0, 300, 300]
    assert box_candidates(before, after).tolist() == [True, False, False, False]


def test_flips_mirror_normalised_labels():
    im, labels = scene(64, 96, [(10, 5, 30, 25), (50, 30, 90, 60)])
    norm = labels.copy()
    norm[:, 1:] = xyxy2xywhn(labels[:, 1:], 96, 64)
    random.seed(0)
    out, flipped = random_flips(im, norm.copy(), flipud=1.0, fliplr=1.0)
    out = np.ascontiguousarray(out)
    pix = flipped.copy()
    pix[:, 1:] = xywhn2xyxy(flipped[:, 1:], 96, 64)
    assert_boxes_cover_objects(out, pix, thr=0.95)
    np.testing.assert_allclose(flipped[:, 1:3], 1 - norm[:, 1:3], atol=1e-6)


def test_mixup_keeps_both_label_sets():
    im1, lb1 = scene(64, 64, [(5, 5, 25, 25)])
    im2, lb2 = scene(64, 64, [(0, 0, 1, 1), (35, 30, 60, 55)])
    lb2 = lb2[1:]
    np.random.seed(0)
    out, labels = mixup(im1, lb1, im2, lb2)
    assert len(labels) == 2
    mask = (out.max(-1) > 40).astype(np.uint8)  # both objects are faded by the blend but stay far from black
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask)
    regions = [(x, y, x + w, y + h) for x, y, w, h, _ in stats[1:n]]
    for _, *box in labels:
        assert max(iou(box, r) for r in regions) > 0.9
    weight = out[10, 10, 0] / 255  # object 1 is pure red, blended with black
    assert 0.3 < weight < 0.7 and out[40, 40, 1] / 255 == pytest.approx(1 - weight, abs=0.01)


def test_mosaic4_places_and_clips_boxes():
    images, labels = [], []
    for k in range(4):
        im, lb = scene(64, 64, [(8, 8, 40, 30), (30, 36, 60, 62)])
        im[im.any(-1)] = 0
        for j, (x1, y1, x2, y2) in enumerate([(8, 8, 40, 30), (30, 36, 60, 62)]):
            im[y1:y2, x1:x2] = COLOURS[2 * k + j]
        lb[:, 0] = [2 * k, 2 * k + 1]
        images.append(im)
        labels.append(lb)
    canvas, merged = mosaic4(images, labels, 64, (50, 70))
    assert canvas.shape == (128, 128, 3)
    assert (canvas[0:6, 0:50] == 114).all()  # above image 0 (which ends at the centre) is empty space
    visible = merged[(merged[:, 3] - merged[:, 1] > 2) & (merged[:, 4] - merged[:, 2] > 2)]
    assert len(visible) >= 6
    assert_boxes_cover_objects(canvas, visible, thr=0.95)


def test_augment_hsv_changes_colour_not_geometry():
    im, _ = scene(48, 48, [(5, 5, 20, 20), (25, 25, 40, 45)])
    im[im.any(-1)] //= 2
    same = im.copy()
    augment_hsv(same, 0, 0, 0)
    assert (same == im).all()
    np.random.seed(3)
    out = im.copy()
    augment_hsv(out, 0.5, 0.5, 0.5)
    assert not (out == im).all()
    assert ((out.max(-1) > 0) == (im.max(-1) > 0)).all()  # black stays black: objects do not move


def test_axis_aligned_detection():
    random.seed(0)
    plain, _ = random_perspective_matrix((128, 128), (64, 64), translate=0.1, scale=0.5)
    rotated, _ = random_perspective_matrix((128, 128), (64, 64), degrees=10, translate=0.1, scale=0.5)
    sheared, _ = random_perspective_matrix((128, 128), (64, 64), shear=5)
    tilted, _ = random_perspective_matrix((128, 128), (64, 64), perspective=0.001)
    assert is_axis_aligned(plain) and not any(map(is_axis_aligned, (rotated, sheared, tilted)))


def test_direct_mosaic_equals_canvas_mosaic_at_the_canvas_edge():
    """A box mostly outside the 2s canvas is judged on its part inside the canvas, by both paths alike."""
    size, centre = 64, (40, 40)
    images, norm, pixel = [], [], []
    for k in range(4):
        im, lb = scene(64, 64, [(0, 0, 30, 30)] if k == 0 else [(20, 20, 44, 44)])
        images.append(im)
        pixel.append(lb.copy())
        lb[:, 1:] = xyxy2xywhn(lb[:, 1:], 64, 64)
        norm.append(lb)
    matrix = np.array([[0.5, 0, 0], [0, 0.5, 0], [0, 0, 1.0]])  # the whole 128 px canvas shrunk into 64 px
    canvas, merged = mosaic4(images, pixel, size, centre)
    slow_im, slow = apply_perspective(canvas, merged, matrix, 0.5, (size, size))
    fast_im, fast = mosaic4_direct(images, [(64, 64)] * 4, norm, size, centre, matrix, 0.5)
    assert len(slow) == len(fast) == 4  # image 0's box is 96% off the canvas, yet its visible 6x6 px are kept
    np.testing.assert_allclose(fast, slow, atol=0.5)
    assert np.abs(fast_im.astype(int) - slow_im.astype(int)).mean() < 3
