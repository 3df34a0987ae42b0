"""Box formats, IoU variants and non-maximum suppression.

Box layouts used across the project:

* ``xyxy``: corners (x1, y1, x2, y2) in pixels.
* ``xywh``: centre and size (xc, yc, w, h) in pixels.
* ``xywhn``: centre and size normalised by the image width/height (the label txt format).

Every converter accepts a torch tensor or a numpy array shaped (..., 4) and returns a new object of the same kind,
so callers never see their input change. ``clip_coords`` and ``scale_coords`` work in place, as their YOLOv5
counterparts do, because callers rely on that to rescale a slice of a larger prediction tensor.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
import torchvision

from utils.general import LOGGER

MAX_NMS = 30000  # candidates per image passed to torchvision NMS at most (keeps worst-case time bounded)


def _float_copy(x):
    """A copy of x as floating point (integer pixel boxes would otherwise truncate every division)."""
    if isinstance(x, torch.Tensor):
        return x.clone() if x.is_floating_point() else x.float()
    x = np.asarray(x)
    return x.astype(x.dtype if np.issubdtype(x.dtype, np.floating) else np.float64, copy=True)


def xyxy2xywh(x):
    """Corners (..., 4) -> centre and size (..., 4)."""
    y = _float_copy(x)
    y[..., 0] = (x[..., 0] + x[..., 2]) / 2
    y[..., 1] = (x[..., 1] + x[..., 3]) / 2
    y[..., 2] = x[..., 2] - x[..., 0]
    y[..., 3] = x[..., 3] - x[..., 1]
    return y


def xywh2xyxy(x):
    """Centre and size (..., 4) -> corners (..., 4)."""
    y = _float_copy(x)
    y[..., 0] = x[..., 0] - x[..., 2] / 2
    y[..., 1] = x[..., 1] - x[..., 3] / 2
    y[..., 2] = x[..., 0] + x[..., 2] / 2
    y[..., 3] = x[..., 1] + x[..., 3] / 2
    return y


def xywhn2xyxy(x, w=640, h=640, padw=0, padh=0):
    """Normalised centre/size (..., 4) -> pixel corners (..., 4) in a w x h image shifted by (padw, padh)."""
    y = _float_copy(x)
    y[..., 0] = w * (x[..., 0] - x[..., 2] / 2) + padw
    y[..., 1] = h * (x[..., 1] - x[..., 3] / 2) + padh
    y[..., 2] = w * (x[..., 0] + x[..., 2] / 2) + padw
    y[..., 3] = h * (x[..., 1] + x[..., 3] / 2) + padh
    return y


def xyxy2xywhn(x, w=640, h=640, clip=False, eps=0.0):
    """Pixel corners (..., 4) -> centre/size (..., 4) normalised by a w x h image.

    Args:
        clip: first clip the corners to the image, shrunk by eps (the input itself is left untouched).
    """
    x = _float_copy(x)
    if clip:
        clip_coords(x, (h - eps, w - eps))
    y = _float_copy(x)
    y[..., 0] = (x[..., 0] + x[..., 2]) / 2 / w
    y[..., 1] = (x[..., 1] + x[..., 3]) / 2 / h
    y[..., 2] = (x[..., 2] - x[..., 0]) / w
    y[..., 3] = (x[..., 3] - x[..., 1]) / h
    return y


def clip_coords(boxes, shape):
    """Clip xyxy boxes (..., 4) in place to an image of shape (h, w[, ...]); returns the same object."""
    h, w = shape[0], shape[1]
    if isinstance(boxes, torch.Tensor):
        boxes[..., 0].clamp_(0, w)
        boxes[..., 1].clamp_(0, h)
        boxes[..., 2].clamp_(0, w)
        boxes[..., 3].clamp_(0, h)
    else:
        boxes[..., [0, 2]] = boxes[..., [0, 2]].clip(0, w)
        boxes[..., [1, 3]] = boxes[..., [1, 3]].clip(0, h)
    return boxes


def scale_coords(img1_shape, coords, img0_shape, ratio_pad=None):
    """Map xyxy boxes from a letterboxed image back to the original image, in place.

    Args:
        img1_shape: (h, w) of the letterboxed network input.
        coords: (n, >=4) boxes whose first 4 columns are xyxy in img1 pixels; modified in place.
        img0_shape: (h0, w0) of the original image; boxes are clipped to it.
        ratio_pad: ((gain_h, gain_w), (padw, padh)) as recorded by the loader; computed from the two shapes
            (centred letterbox with one gain) when None.

    Returns:
        coords, now in img0 pixels.
    """
    if ratio_pad is None:
        gain = min(img1_shape[0] / img0_shape[0], img1_shape[1] / img0_shape[1])
        padw = (img1_shape[1] - img0_shape[1] * gain) / 2
        padh = (img1_shape[0] - img0_shape[0] * gain) / 2
    else:
        gain = ratio_pad[0][0]  # letterbox uses one gain for both axes
        padw, padh = ratio_pad[1]
    coords[:, [0, 2]] -= padw
    coords[:, [1, 3]] -= padh
    coords[:, :4] /= gain
    clip_coords(coords[:, :4], img0_shape)
    return coords


def box_iou(box1, box2):
    """Pairwise IoU of xyxy boxes: (n, 4) x (m, 4) -> (n, m)."""
    return torchvision.ops.box_iou(box1, box2)


def bbox_iou(box1, box2, x1y1x2y2=True, GIoU=False, DIoU=False, CIoU=False, eps=1e-7):
    """Elementwise IoU (or GIoU/DIoU/CIoU) of two broadcastable box sets.

    Args:
        box1, box2: (..., 4) tensors, xyxy when x1y1x2y2 else xywh; leading dims broadcast, so (n, 4) with (n, 4)
            pairs row by row and (4,) with (n, 4) compares one box against many.
        GIoU, DIoU, CIoU: return the generalised / distance / complete IoU instead (at most one should be set;
            CIoU wins, then DIoU, then GIoU).

    Returns:
        (...) tensor of the broadcast leading shape, e.g. (n,).
    """
    if x1y1x2y2:
        b1x1, b1y1, b1x2, b1y2 = box1.unbind(-1)
        b2x1, b2y1, b2x2, b2y2 = box2.unbind(-1)
    else:
        b1x1, b1y1, b1x2, b1y2 = xywh2xyxy(box1).unbind(-1)
        b2x1, b2y1, b2x2, b2y2 = xywh2xyxy(box2).unbind(-1)
    w1, h1 = b1x2 - b1x1, b1y2 - b1y1 + eps
    w2, h2 = b2x2 - b2x1, b2y2 - b2y1 + eps
    inter = (torch.min(b1x2, b2x2) - torch.max(b1x1, b2x1)).clamp(0) * \
            (torch.min(b1y2, b2y2) - torch.max(b1y1, b2y1)).clamp(0)
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union
    if not (CIoU or DIoU or GIoU):
        return iou
    cw = torch.max(b1x2, b2x2) - torch.min(b1x1, b2x1)  # smallest enclosing box
    ch = torch.max(b1y2, b2y2) - torch.min(b1y1, b2y1)
    if GIoU and not (CIoU or DIoU):
        c_area = cw * ch + eps
        return iou - (c_area - union) / c_area
    c2 = cw ** 2 + ch ** 2 + eps  # squared diagonal of the enclosing box
    rho2 = ((b2x1 + b2x2 - b1x1 - b1x2) ** 2 + (b2y1 + b2y2 - b1y1 - b1y2) ** 2) / 4  # squared centre distance
    if DIoU and not CIoU:
        return iou - rho2 / c2
    v = (4 / math.pi ** 2) * (torch.atan(w2 / h2) - torch.atan(w1 / h1)) ** 2  # aspect-ratio consistency
    with torch.no_grad():  # alpha is a trade-off weight, not something to differentiate through
        alpha = v / (v - iou + (1 + eps))
    return iou - (rho2 / c2 + v * alpha)


def _candidates(x, conf_thres, multi_label):
    """One image's scored candidates (k, no) -> (m, 6) [x1, y1, x2, y2, conf, cls] above conf_thres."""
    scores = x[:, 5:] * x[:, 4:5]  # conf = obj * cls
    boxes = xywh2xyxy(x[:, :4])
    if multi_label:
        i, j = (scores > conf_thres).nonzero(as_tuple=True)
        return torch.cat((boxes[i], scores[i, j, None], j[:, None].float()), 1)
    conf, j = scores.max(1, keepdim=True)
    return torch.cat((boxes, conf, j.float()), 1)[conf.view(-1) > conf_thres]


def _apriori_rows(lb, no, device):
    """Labels (n, 5) [cls, xc, yc, w, h] in pixels -> candidate rows (n, no) with obj 1 and one-hot class 1."""
    lb = torch.as_tensor(lb, dtype=torch.float32, device=device).view(-1, 5)
    v = torch.zeros((len(lb), no), device=device)
    v[:, :4] = lb[:, 1:5]
    v[:, 4] = 1.0
    v[torch.arange(len(lb), device=device), lb[:, 0].long() + 5] = 1.0
    return v


def non_max_suppression(prediction, conf_thres=0.25, iou_thres=0.45, classes=None, agnostic=False,
                        multi_label=False, labels=(), max_det=300):
    """Class-aware NMS over Detect's decoded output.

    Args:
        prediction: (bs, N, 5 + nc) tensor, xywh in input pixels, sigmoid obj and class scores.
        conf_thres: keep candidates whose obj * cls exceeds this.
        iou_thres: IoU above which a lower-scored box of the same class is suppressed.
        classes: optional iterable of class ids to keep.
        agnostic: suppress across classes too.
        multi_label: one candidate per (box, class) above conf_thres instead of the best class only
            (only meaningful when nc > 1).
        labels: optional per-image (n, 5) [cls, xc, yc, w, h] pixel labels added as certain candidates
            (autolabelling).
        max_det: detections kept per image at most.

    Returns:
        list of bs tensors (n, 6) [x1, y1, x2, y2, conf, cls].
    """
    if not 0 <= conf_thres <= 1:
        raise ValueError(f"conf_thres={conf_thres} is outside [0, 1]; pass a confidence between 0 and 1")
    if not 0 <= iou_thres <= 1:
        raise ValueError(f"iou_thres={iou_thres} is outside [0, 1]; pass an IoU between 0 and 1")
    if isinstance(prediction, (list, tuple)):  # eval-mode Detect output (decoded, raw_maps)
        prediction = prediction[0]
    bs, no = prediction.shape[0], prediction.shape[2]
    multi_label = multi_label and no - 5 > 1
    keep_classes = None if classes is None else torch.tensor(list(classes), device=prediction.device).float()
    time_limit, start = 10.0, time.time()
    output = [torch.zeros((0, 6), device=prediction.device)] * bs
    for xi, x in enumerate(prediction):
        x = x[x[:, 4] > conf_thres]  # cheap objectness pre-filter
        if labels is not None and len(labels) > xi and len(labels[xi]):
            x = torch.cat((x, _apriori_rows(labels[xi], no, x.device).to(x.dtype)), 0)
        if not len(x):
            continue
        det = _candidates(x, conf_thres, multi_label)
        if keep_classes is not None:
            det = det[(det[:, 5:6] == keep_classes).any(1)]
        if not len(det):
            continue
        if len(det) > MAX_NMS:
            det = det[det[:, 4].argsort(descending=True)[:MAX_NMS]]
        if agnostic:
            keep = torchvision.ops.nms(det[:, :4], det[:, 4], iou_thres)
        else:  # per class; with many candidates torchvision loops over classes (8x faster at 30k boxes, 10 classes)
            keep = torchvision.ops.batched_nms(det[:, :4], det[:, 4], det[:, 5].long(), iou_thres)
        keep = keep[:max_det]  # both return indices by descending score
        output[xi] = det[keep]
        if time.time() - start > time_limit:
            LOGGER.warning(f"WARNING: NMS time limit {time_limit:.1f}s exceeded after {xi + 1}/{bs} images; "
                           f"raise conf_thres or lower max_det to speed it up")
            break
    return output
