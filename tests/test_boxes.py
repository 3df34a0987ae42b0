"""Box conversions, letterbox inverse, IoU variants and NMS against a brute-force reference."""
import math

import numpy as np
import pytest
import torch

from utils.boxes import (bbox_iou, box_iou, clip_coords, non_max_suppression, scale_coords, xywh2xyxy,
                         xywhn2xyxy, xyxy2xywh, xyxy2xywhn)


def test_conversions_hand_values_and_round_trips():
    xyxy = torch.tensor([[10.0, 20.0, 50.0, 100.0], [0.0, 0.0, 4.0, 2.0]])
    xywh = torch.tensor([[30.0, 60.0, 40.0, 80.0], [2.0, 1.0, 4.0, 2.0]])
    assert torch.allclose(xyxy2xywh(xyxy), xywh)
    assert torch.allclose(xywh2xyxy(xywh), xyxy)
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 100, (20, 4))
    a[:, 2:] += a[:, :2]  # valid corners
    assert np.allclose(xywh2xyxy(xyxy2xywh(a)), a)
    assert isinstance(xyxy2xywh(a), np.ndarray)


def test_normalised_conversions():
    w, h, padw, padh = 200, 100, 7, 3
    xywhn = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    expected = torch.tensor([[0.4 * w + padw, 0.3 * h + padh, 0.6 * w + padw, 0.7 * h + padh]])
    got = xywhn2xyxy(xywhn, w, h, padw, padh)
    assert torch.allclose(got, expected)
    back = xyxy2xywhn(xywhn2xyxy(xywhn, w, h), w, h)
    assert torch.allclose(back, xywhn)


def test_converters_leave_input_untouched_and_promote_ints():
    x = torch.tensor([[1, 2, 4, 7]])
    y = xyxy2xywh(x)
    assert y.dtype.is_floating_point and torch.equal(x, torch.tensor([[1, 2, 4, 7]]))
    assert torch.allclose(y, torch.tensor([[2.5, 4.5, 3.0, 5.0]]))
    outside = torch.tensor([[-10.0, -5.0, 300.0, 120.0]])
    n = xyxy2xywhn(outside, w=200, h=100, clip=True)
    assert torch.equal(outside, torch.tensor([[-10.0, -5.0, 300.0, 120.0]]))  # clip works on a copy
    assert torch.allclose(n, torch.tensor([[0.5, 0.5, 1.0, 1.0]]))


def test_clip_coords_tensor_and_numpy():
    t = torch.tensor([[-3.0, 5.0, 70.0, 90.0]])
    clip_coords(t, (60, 64))
    assert torch.equal(t, torch.tensor([[0.0, 5.0, 64.0, 60.0]]))
    a = np.array([[-3.0, 5.0, 70.0, 90.0]])
    clip_coords(a, (60, 64))
    assert np.array_equal(a, [[0.0, 5.0, 64.0, 60.0]])


def _letterbox_forward(boxes, img0_shape, new_shape):
    """Letterbox maths written out: one gain, centred padding."""
    h0, w0 = img0_shape
    gain = min(new_shape[0] / h0, new_shape[1] / w0)
    padw = (new_shape[1] - round(w0 * gain)) / 2
    padh = (new_shape[0] - round(h0 * gain)) / 2
    out = boxes.clone()
    out[:, [0, 2]] = boxes[:, [0, 2]] * gain + padw
    out[:, [1, 3]] = boxes[:, [1, 3]] * gain + padh
    return out, gain, (padw, padh)


def test_scale_coords_inverts_letterbox():
    img0 = (300, 500)
    boxes0 = torch.tensor([[10.0, 20.0, 200.0, 290.0], [0.0, 0.0, 500.0, 300.0]])
    boxes1, gain, pad = _letterbox_forward(boxes0, img0, (640, 640))
    assert gain == pytest.approx(1.28) and pad == (0.0, 128.0)
    assert torch.allclose(scale_coords((640, 640), boxes1.clone(), img0), boxes0, atol=1e-4)
    # rectangular batch: shape chosen by the loader, gain and pad passed explicitly
    boxes1, gain, pad = _letterbox_forward(boxes0, img0, (416, 640))
    got = scale_coords((416, 640), boxes1.clone(), img0, ratio_pad=((gain, gain), pad))
    assert torch.allclose(got, boxes0, atol=1e-4)


def test_scale_coords_clips_and_works_in_place():
    coords = torch.tensor([[-20.0, 100.0, 700.0, 200.0, 0.9, 1.0]])
    out = scale_coords((640, 640), coords, (640, 640))
    assert out is coords
    assert torch.equal(coords, torch.tensor([[0.0, 100.0, 640.0, 200.0, 0.9, 1.0]]))


def test_box_iou_pairwise():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    assert torch.allclose(box_iou(a, b), torch.tensor([[1.0, 50 / 150, 0.0]]))


def test_bbox_iou_variants_by_hand():
    b1 = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b2 = torch.tensor([[1.0, 0.0, 4.0, 1.0]])
    inter, union = 1.0 * 1.0, 4.0 + 3.0 - 1.0
    iou = inter / union
    enclosing_w, enclosing_h = 4.0, 2.0
    giou = iou - (enclosing_w * enclosing_h - union) / (enclosing_w * enclosing_h)
    rho2 = (2.5 - 1.0) ** 2 + (0.5 - 1.0) ** 2  # centres (1, 1) and (2.5, 0.5)
    c2 = enclosing_w ** 2 + enclosing_h ** 2
    diou = iou - rho2 / c2
    v = 4 / math.pi ** 2 * (math.atan(3.0 / 1.0) - math.atan(2.0 / 2.0)) ** 2
    alpha = v / (v - iou + 1)
    ciou = diou - alpha * v
    assert bbox_iou(b1, b2).item() == pytest.approx(iou, abs=1e-5)
    assert bbox_iou(b1, b2, GIoU=True).item() == pytest.approx(giou, abs=1e-5)
    assert bbox_iou(b1, b2, DIoU=True).item() == pytest.approx(diou, abs=1e-5)
    assert bbox_iou(b1, b2, CIoU=True).item() == pytest.approx(ciou, abs=1e-5)
    # xywh input gives the same numbers
    assert bbox_iou(xyxy2xywh(b1), xyxy2xywh(b2), x1y1x2y2=False, CIoU=True).item() == pytest.approx(ciou, abs=1e-5)


def test_bbox_iou_shapes_and_identity():
    boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 5.0, 3.0], [3.0, 3.0, 4.0, 6.0]])
    out = bbox_iou(boxes, boxes, CIoU=True)
    assert out.shape == (3,) and torch.allclose(out, torch.ones(3), atol=1e-5)
    one_vs_many = bbox_iou(boxes[0], boxes)
    assert one_vs_many.shape == (3,)
    assert torch.allclose(one_vs_many, box_iou(boxes[:1], boxes)[0], atol=1e-5)


def test_ciou_gradient_flows_to_first_box():
    pred = torch.tensor([[0.4, 0.3, 1.5, 2.0]], requires_grad=True)
    target = torch.tensor([[0.5, 0.5, 2.0, 2.0]])
    (1 - bbox_iou(pred, target, x1y1x2y2=False, CIoU=True)).sum().backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0


def _iou_one(a, b):
    """Plain-Python IoU of two xyxy boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _reference_nms(pred, conf_thres, iou_thres, multi_label, agnostic, classes=None):
    """Brute force: enumerate (box, class) candidates, then greedy suppression per class by falling score."""
    cands = []
    for k, row in enumerate(pred.tolist()):
        xc, yc, w, h, obj = row[:5]
        box = (xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2)
        scores = [obj * s for s in row[5:]]
        if obj <= conf_thres:
            continue
        chosen = [c for c, s in enumerate(scores) if s > conf_thres] if multi_label else \
            [c for c in [int(np.argmax(scores))] if scores[c] > conf_thres]
        cands += [(scores[c], k, c, box) for c in chosen if classes is None or c in classes]
    cands.sort(key=lambda x: -x[0])
    kept = []
    for score, k, c, box in cands:
        if all(_iou_one(box, kb) <= iou_thres for _, _, kc, kb in kept if agnostic or kc == c):
            kept.append((score, k, c, box))
    return kept


def _random_prediction(n=300, nc=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 200
    wh = torch.rand(n, 2, generator=g) * 60 + 5
    obj = torch.rand(n, 1, generator=g)
    cls = torch.rand(n, nc, generator=g)
    return torch.cat((xy, wh, obj, cls), 1)


@pytest.mark.parametrize("multi_label,agnostic,n", [(False, False, 300), (True, False, 300), (False, True, 300),
                                                    (True, True, 300), (False, False, 1500)])
def test_nms_matches_brute_force(multi_label, agnostic, n):
    pred = _random_prediction(n)  # 1500: over 1000 candidates torchvision's batched_nms switches to a class loop
    conf_thres, iou_thres = 0.2, 0.45
    out = non_max_suppression(pred[None], conf_thres, iou_thres, multi_label=multi_label, agnostic=agnostic,
                              max_det=10000)[0]
    ref = _reference_nms(pred, conf_thres, iou_thres, multi_label, agnostic)
    assert out.shape == (len(ref), 6)
    got = sorted((int(r[5]), r[4]) for r in out.tolist())  # by class, then score: float32 vs float64 scores
    want = sorted((c, s) for s, _, c, _ in ref)
    assert [c for c, _ in got] == [c for c, _ in want]
    assert torch.allclose(torch.tensor([s for _, s in got]), torch.tensor([s for _, s in want]), atol=1e-5)
    ref_boxes = torch.tensor([b for *_, b in ref])
    order = out[:, 4].argsort(descending=True)
    assert torch.allclose(out[order, :4], ref_boxes[torch.tensor([s for s, *_ in ref]).argsort(descending=True)],
                          atol=1e-4)


def test_nms_classes_filter_max_det_and_batch():
    pred = torch.stack((_random_prediction(seed=1), _random_prediction(seed=2)))
    out = non_max_suppression(pred, 0.1, 0.5, classes=[1, 3], multi_label=True, max_det=10000)
    assert len(out) == 2
    for i, det in enumerate(out):
        ref = _reference_nms(pred[i], 0.1, 0.5, True, False, classes=[1, 3])
        assert len(det) == len(ref) > 0
        assert set(det[:, 5].long().tolist()) <= {1, 3}
    capped = non_max_suppression(pred, 0.1, 0.5, multi_label=True, max_det=5)
    assert all(len(d) == 5 for d in capped)
    assert torch.allclose(capped[0][:, 4], capped[0][:, 4].sort(descending=True).values)


def test_nms_empty_and_threshold_errors():
    pred = torch.zeros(2, 10, 7)
    out = non_max_suppression(pred)
    assert len(out) == 2 and all(o.shape == (0, 6) for o in out)
    with pytest.raises(ValueError, match="conf_thres"):
        non_max_suppression(pred, conf_thres=1.5)
    with pytest.raises(ValueError, match="iou_thres"):
        non_max_suppression(pred, iou_thres=-0.1)


def test_nms_conf_is_obj_times_cls_single_class():
    pred = torch.tensor([[[50.0, 50.0, 20.0, 20.0, 0.8, 0.5]]])  # nc = 1
    det = non_max_suppression(pred, conf_thres=0.3)[0]
    assert det.shape == (1, 6)
    assert det[0, 4].item() == pytest.approx(0.4)
    assert torch.allclose(det[0, :4], torch.tensor([40.0, 40.0, 60.0, 60.0]))
    assert len(non_max_suppression(pred, conf_thres=0.45)[0]) == 0  # obj passes, obj * cls does not


def test_nms_apriori_labels_are_added():
    pred = torch.zeros(1, 5, 7)
    labels = [torch.tensor([[1.0, 30.0, 40.0, 10.0, 20.0]])]  # cls, xywh pixels
    det = non_max_suppression(pred, 0.25, 0.45, labels=labels)[0]
    assert det.shape == (1, 6)
    assert torch.allclose(det[0], torch.tensor([25.0, 30.0, 35.0, 50.0, 1.0, 1.0]))
