"""YOLOv5 v6.0 loss: hand-checked target assignment and loss values, empty batches, gradients."""
import math

import pytest
import torch

from models.yolo import Model
from utils.general import yaml_load
from utils.loss import ComputeLoss, FocalLoss, scale_hyp_gains, smooth_BCE

HYP = dict(box=0.05, obj=1.0, cls=0.5, cls_pw=1.0, obj_pw=1.0, anchor_t=4.0, fl_gamma=0.0)
LOG2 = math.log(2)


def _tiny_model(nc):
    torch.manual_seed(0)
    cfg = yaml_load("models/yolov5n.yaml")
    cfg.update(nc=nc, width_multiple=0.125, depth_multiple=0.33)
    model = Model(cfg)
    model.hyp = dict(HYP)
    model.gr = 1.0
    return model


@pytest.fixture(scope="module")
def model3():
    return _tiny_model(3)


def _zero_head(model):
    """Zero Detect's convs so every raw output is 0 (sigmoid 0.5) whatever the input."""
    with torch.no_grad():
        for conv in model.model[-1].m:
            conv.weight.zero_()
            conv.bias.zero_()


def _ciou_xywh(a, b):
    """Plain-Python CIoU of two (xc, yc, w, h) boxes (eps-free)."""
    a1 = (a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2)
    b1 = (b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2)
    inter = max(0, min(a1[2], b1[2]) - max(a1[0], b1[0])) * max(0, min(a1[3], b1[3]) - max(a1[1], b1[1]))
    iou = inter / (a[2] * a[3] + b[2] * b[3] - inter)
    cw = max(a1[2], b1[2]) - min(a1[0], b1[0])
    ch = max(a1[3], b1[3]) - min(a1[1], b1[1])
    rho2 = (a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2
    v = 4 / math.pi ** 2 * (math.atan(b[2] / b[3]) - math.atan(a[2] / a[3])) ** 2
    return iou - rho2 / (cw ** 2 + ch ** 2) - v * v / (v - iou + 1)


# One 16x16-px target (image 0, class 1) centred at (19.2, 38.4) in a 64x64 input: normalised (0.3, 0.6, .25, .25).
# P3 (stride 8, 8x8 cells): centre (2.4, 4.8), size 2x2 cells. Anchors/8 = (1.25, 1.625), (2, 3.75), (4.125, 2.875):
#   worst wh ratios 1.6, 1.875, 2.06 < 4, so all three anchors. x fraction 0.4 < 0.5 -> also the cell to the left;
#   y fraction 0.8 -> the cell below (distance to the bottom edge 3.2 has fraction 0.2).
#   Cells (gi, gj): (2,4) (1,4) (2,5).
# P4 (stride 16, 4x4): centre (1.2, 2.4), size 1x1. Anchors/16 = (1.875, 3.8125), (3.875, 2.8125), (3.6875, 7.4375):
#   worst ratios 3.81, 3.875 < 4 but 7.44 > 4, so anchors 0 and 1. x fraction 0.2 -> left; y fraction 0.4 -> up.
#   Cells (1,2) (0,2) (1,1).
# P5 (stride 32, 2x2): size 0.5x0.5 cells; every anchor is over 4x larger -> nothing.
TARGET = torch.tensor([[0, 1, 0.3, 0.6, 0.25, 0.25]])
EXPECTED = {
    0: {(0, a, gj, gi) for a in range(3) for gi, gj in ((2, 4), (1, 4), (2, 5))},
    1: {(0, a, gj, gi) for a in range(2) for gi, gj in ((1, 2), (0, 2), (1, 1))},
    2: set(),
}
CENTRES = {0: (2.4, 4.8), 1: (1.2, 2.4)}
SIZES = {0: 2.0, 1: 1.0}


def _maps(model, bs=2, size=64):
    model.train()
    return model(torch.zeros(bs, 3, size, size))


def test_anchors_are_the_yolov5_defaults_in_grid_units(model3):
    det = model3.model[-1]
    assert det.stride.tolist() == [8, 16, 32]
    pixels = torch.tensor([[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]])
    assert torch.allclose(det.anchors, pixels.view(3, 3, 2).float() / det.stride.view(3, 1, 1))


def test_build_targets_hand_case(model3):
    loss_fn = ComputeLoss(model3)
    tcls, tbox, indices, anchors = loss_fn.build_targets(_maps(model3), TARGET)
    det = model3.model[-1]
    for level in range(3):
        got = {tuple(int(v[k]) for v in indices[level]) for k in range(len(indices[level][0]))}
        assert got == EXPECTED[level], f"level {level}"
        assert len(indices[level][0]) == len(EXPECTED[level])  # no duplicates
        assert (tcls[level] == 1).all()
        b, a, gj, gi = indices[level]
        assert torch.allclose(anchors[level], det.anchors[level][a])
        if EXPECTED[level]:
            cx, cy = CENTRES[level]
            assert torch.allclose(tbox[level][:, 0], cx - gi.float(), atol=1e-5)  # offset from the cell corner
            assert torch.allclose(tbox[level][:, 1], cy - gj.float(), atol=1e-5)
            assert torch.allclose(tbox[level][:, 2:], torch.full_like(tbox[level][:, 2:], SIZES[level]))


def _expected_loss(model, hyp, gr, nc, bs):
    """The loss with all-zero logits, from the formulas: sigmoid(0) = 0.5, so each prediction sits at its
    cell's centre (xy offset 0.5) with exactly its anchor's size, and BCE(0, t) = log2 * (pw * t + 1 - t)."""
    det = model.model[-1]
    balance = (4.0, 1.0, 0.4)
    cp, cn = smooth_BCE(hyp.get("label_smoothing", 0.0))
    lbox = lobj = lcls = 0.0
    for level, cells in EXPECTED.items():
        ny = nx = 64 // int(det.stride[level])
        n_cells = bs * det.na * ny * nx
        ious = []
        for _, a, gj, gi in sorted(cells):
            anchor = det.anchors[level][a].tolist()
            cx, cy = CENTRES[level]
            ious.append(_ciou_xywh((0.5, 0.5, *anchor), (cx - gi, cy - gj, SIZES[level], SIZES[level])))
        tobj = [(1 - gr) + gr * max(v, 0.0) for v in ious]
        pw = hyp["obj_pw"]
        lobj += balance[level] * LOG2 * (n_cells + (pw - 1) * sum(tobj)) / n_cells
        if ious:
            lbox += sum(1 - v for v in ious) / len(ious)
            pw = hyp["cls_pw"]
            per_row = (pw * cp + 1 - cp) + (nc - 1) * (pw * cn + 1 - cn)  # one positive class, nc-1 negatives
            lcls += LOG2 * per_row / nc
    return lbox * hyp["box"], lobj * hyp["obj"], lcls * hyp["cls"]


@pytest.mark.parametrize("gr,smoothing", [(1.0, 0.0), (0.5, 0.1)])
def test_loss_values_hand_case(gr, smoothing):
    model = _tiny_model(3)
    _zero_head(model)
    # pos weights make BCE at logit 0 depend on the target, so the objectness targets are checked too
    model.hyp = dict(HYP, obj_pw=2.0, cls_pw=3.0, label_smoothing=smoothing)
    model.gr = gr
    loss, items = ComputeLoss(model)(_maps(model), TARGET)
    lbox, lobj, lcls = _expected_loss(model, model.hyp, gr, nc=3, bs=2)
    assert items.tolist() == pytest.approx([lbox, lobj, lcls], rel=1e-4)
    assert loss.item() == pytest.approx((lbox + lobj + lcls) * 2, rel=1e-4)
    assert loss.shape == (1,) and items.shape == (3,) and not items.requires_grad


def test_single_class_has_no_class_loss():
    model = _tiny_model(1)
    _zero_head(model)
    _, items = ComputeLoss(model)(_maps(model), torch.tensor([[0, 0, 0.3, 0.6, 0.25, 0.25]]))
    assert items[2] == 0 and items[0] > 0


def test_empty_batch(model3):
    loss, items = ComputeLoss(model3)(_maps(model3), torch.zeros((0, 6)))
    assert torch.isfinite(loss).all()
    assert items[0] == 0 and items[2] == 0 and items[1] > 0
    loss.backward()
    assert all(p.grad is not None for p in model3.model[-1].parameters())
    model3.zero_grad()


def test_gradients_reach_every_detect_parameter(model3):
    model3.zero_grad()
    torch.manual_seed(1)
    maps = model3.train()(torch.rand(2, 3, 64, 64))
    targets = torch.tensor([[0, 0, 0.3, 0.6, 0.25, 0.25], [0, 2, 0.7, 0.2, 0.5, 0.6], [1, 1, 0.5, 0.5, 0.1, 0.05],
                            [1, 0, 0.4, 0.5, 0.8, 0.9]])
    loss, _ = ComputeLoss(model3)(maps, targets)
    loss.backward()
    det = model3.model[-1]
    for name, p in det.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    no = det.no
    for level in range(3):  # box and class rows see gradient too, not only objectness
        rows = det.m[level].weight.grad.view(det.na, no, -1).abs().sum(-1)  # (na, no)
        assert (rows[:, :4].sum() > 0) and (rows[:, 5:].sum() > 0), f"level {level}"
    backbone = model3.model[0].conv.weight.grad
    assert backbone is not None and backbone.abs().sum() > 0
    model3.zero_grad()


def _reference_assign(targets, shapes, anchors, anchor_t):
    """Per-target loop over the v6.0 assignment rules, for comparison with the vectorised version."""
    rows = set()
    for level, (ny, nx) in enumerate(shapes):
        for b, c, x, y, w, h in targets.tolist():
            gx, gy, gw, gh = x * nx, y * ny, w * nx, h * ny
            for a, (aw, ah) in enumerate(anchors[level].tolist()):
                if max(gw / aw, aw / gw, gh / ah, ah / gh) >= anchor_t:
                    continue
                cells = [(0.0, 0.0)]
                if gx % 1 < 0.5 and gx > 1:
                    cells.append((0.5, 0.0))
                if gy % 1 < 0.5 and gy > 1:
                    cells.append((0.0, 0.5))
                if (nx - gx) % 1 < 0.5 and nx - gx > 1:
                    cells.append((-0.5, 0.0))
                if (ny - gy) % 1 < 0.5 and ny - gy > 1:
                    cells.append((0.0, -0.5))
                for ox, oy in cells:
                    gi = min(max(int(gx - ox), 0), nx - 1)
                    gj = min(max(int(gy - oy), 0), ny - 1)
                    rows.add((level, int(b), a, gj, gi, int(c), round(gx - gi, 4), round(gy - gj, 4)))
    return rows


def test_build_targets_matches_per_target_loop(model3):
    g = torch.Generator().manual_seed(3)
    n = 40
    xy = torch.rand(n, 2, generator=g)
    wh = torch.rand(n, 2, generator=g) * 0.6 + 0.02
    targets = torch.cat((torch.randint(0, 2, (n, 1), generator=g).float(),
                         torch.randint(0, 3, (n, 1), generator=g).float(), xy, wh), 1)
    maps = [torch.zeros(2, 3, 12, 10, 8), torch.zeros(2, 3, 6, 5, 8), torch.zeros(2, 3, 3, 3, 8)]  # 96x80 input
    loss_fn = ComputeLoss(model3)
    tcls, tbox, indices, _ = loss_fn.build_targets(maps, targets)
    got = set()
    for level in range(3):
        b, a, gj, gi = indices[level]
        for k in range(len(b)):
            got.add((level, int(b[k]), int(a[k]), int(gj[k]), int(gi[k]), int(tcls[level][k]),
                     round(float(tbox[level][k, 0]), 4), round(float(tbox[level][k, 1]), 4)))
    want = _reference_assign(targets, [(12, 10), (6, 5), (3, 3)], model3.model[-1].anchors, HYP["anchor_t"])
    assert len(want) > 50
    assert got == want


def test_half_precision_maps_give_float32_loss(model3):
    maps = [m.detach().bfloat16() for m in _maps(model3)]
    loss, items = ComputeLoss(model3)(maps, TARGET)
    assert loss.dtype == torch.float32 and torch.isfinite(items).all()


def test_focal_and_autobalance_paths(model3):
    model = _tiny_model(3)
    model.hyp = dict(HYP, fl_gamma=1.5)
    maps = _maps(model)
    focal, _ = ComputeLoss(model)(maps, TARGET)
    model.hyp = dict(HYP)
    plain, _ = ComputeLoss(model)(maps, TARGET)
    assert torch.isfinite(focal) and focal.item() < plain.item()  # focal weights are all below 1
    auto = ComputeLoss(model, autobalance=True)
    auto(maps, TARGET)
    assert auto.balance[auto.ssi] == pytest.approx(1.0) and auto.ssi == 1


def test_focal_loss_single_element_by_hand():
    fl = FocalLoss(torch.nn.BCEWithLogitsLoss(), gamma=2.0, alpha=0.25)
    x, t = 0.3, 1.0
    p = 1 / (1 + math.exp(-x))
    bce = -math.log(p)
    assert fl(torch.tensor([x]), torch.tensor([t])).item() == pytest.approx(bce * 0.25 * (1 - p) ** 2, rel=1e-5)


def test_scale_hyp_gains_returns_new_dict():
    hyp = dict(HYP)
    out = scale_hyp_gains(hyp, nl=4, nc=20, imgsz=320)
    assert hyp == HYP  # untouched
    assert out["box"] == pytest.approx(0.05 * 3 / 4)
    assert out["cls"] == pytest.approx(0.5 * 20 / 80 * 3 / 4)
    assert out["obj"] == pytest.approx(1.0 * 0.25 * 3 / 4)
    assert out["anchor_t"] == HYP["anchor_t"]


def test_missing_hyp_says_the_fix():
    model = _tiny_model(2)
    del model.hyp
    with pytest.raises(AttributeError, match="model.hyp"):
        ComputeLoss(model)
    model.hyp = {"box": 0.05}
    with pytest.raises(KeyError, match="anchor_t"):
        ComputeLoss(model)
