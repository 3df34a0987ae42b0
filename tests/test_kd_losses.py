"""Tests for utils/kd/losses.py: formulas against explicit loops, gradients, class mapping, masks."""
import math
from types import SimpleNamespace

import pytest
import torch

from utils.kd.losses import (FEATURE_LOSSES, NEEDS_ADAPTER, NEEDS_MASK, at_loss, at_masked, class_mass_scale,
                             compute_kd_output_loss, cwd_loss, ft_loss, gt_mask, mimic_loss, output_kd_terms)


def _maps(seed, nc=3, shapes=((2, 3, 4, 4), (2, 3, 2, 2)), scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, 5 + nc, generator=g) * scale for s in shapes]


def _sig(x):
    return 1 / (1 + math.exp(-x))


def _reference_terms(s_maps, t_maps, kind, temperature=20.0):
    """Explicit per-cell loops over python floats."""
    box = obj = cls = 0.0
    for s_level, t_level in zip(s_maps, t_maps):
        s_cells = s_level.reshape(-1, s_level.shape[-1]).tolist()
        t_cells = t_level.reshape(-1, t_level.shape[-1]).tolist()
        nc = len(s_cells[0]) - 5
        lb = lo = lc = 0.0
        for s, t in zip(s_cells, t_cells):
            w = _sig(t[4])
            lb += sum((s[k] - t[k]) ** 2 for k in range(4)) * w
            if kind == "bce":
                p, q = w, _sig(s[4])
                lo += -(p * math.log(q) + (1 - p) * math.log(1 - q)) * w
            else:
                lo += (s[4] - t[4]) ** 2 * w
            lc += _reference_cls(s[5:], t[5:], kind, temperature) * w
        n = len(s_cells)
        box, obj, cls = box + lb / (4 * n), obj + lo / n, cls + lc / (nc * n)
    return box, obj, cls


def _reference_cls(s, t, kind, temperature):
    if kind == "l2":
        return sum((a - b) ** 2 for a, b in zip(s, t))
    if kind == "bce":
        return sum(-(_sig(b) * math.log(_sig(a)) + (1 - _sig(b)) * math.log(1 - _sig(a))) for a, b in zip(s, t))
    zs = sum(math.exp(a / temperature) for a in s)
    zt = sum(math.exp(b / temperature) for b in t)
    total = 0.0
    for a, b in zip(s, t):
        ps, pt = math.exp(a / temperature) / zs, math.exp(b / temperature) / zt
        total += pt * (math.log(pt) - math.log(ps))
    return total * temperature ** 2


@pytest.mark.parametrize("kind,temperature", [("l2", 20.0), ("kl", 20.0), ("kl", 2.0), ("bce", 20.0)])
def test_output_terms_match_explicit_loops(kind, temperature):
    s_maps, t_maps = _maps(0), _maps(1)
    got = output_kd_terms(s_maps, t_maps, kind=kind, temperature=temperature)
    want = _reference_terms(s_maps, t_maps, kind, temperature)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and g.dim() == 0
        assert g.item() == pytest.approx(w, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("kind", ["l2", "kl"])
def test_output_terms_zero_when_student_equals_teacher(kind):
    t_maps = _maps(2)
    box, obj, cls = output_kd_terms([t.clone() for t in t_maps], t_maps, kind=kind)
    assert box.item() == 0 and obj.item() == 0 and abs(cls.item()) < 1e-6


def test_bce_is_minimal_at_teacher():
    t_maps = _maps(3)
    s_maps = [t.clone().requires_grad_(True) for t in t_maps]
    sum(output_kd_terms(s_maps, t_maps, kind="bce")).backward()
    assert all(s.grad.abs().max() < 1e-6 for s in s_maps)


@pytest.mark.parametrize("kind", ["l2", "kl", "bce"])
def test_output_terms_gradient_to_student_only(kind):
    s_maps = [m.requires_grad_(True) for m in _maps(4)]
    t_maps = [m.requires_grad_(True) for m in _maps(5)]
    for term in output_kd_terms(s_maps, t_maps, kind=kind):
        assert term.requires_grad
    sum(output_kd_terms(s_maps, t_maps, kind=kind)).backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in s_maps)
    assert all(t.grad is None for t in t_maps)


@pytest.mark.parametrize("kind", ["l2", "kl", "bce"])
@pytest.mark.parametrize("s_dtype,t_dtype", [(torch.float16, torch.float16), (torch.float32, torch.float16),
                                             (torch.bfloat16, torch.bfloat16), (torch.float64, torch.float64)])
def test_inputs_of_any_precision_are_computed_in_float32(kind, s_dtype, t_dtype):
    # The reference loops run in python floats on the values the inputs actually hold (fp16/bf16-rounded), so a
    # float32 computation agrees to ~1e-6; one done in fp16/bf16 is off by ~1e-3 and one in float64 has that dtype.
    s_maps = [m.to(s_dtype) for m in _maps(6)]
    t_maps = [m.to(t_dtype) for m in _maps(7)]
    got = output_kd_terms(s_maps, t_maps, kind=kind, temperature=2.0)
    want = _reference_terms(s_maps, t_maps, kind, temperature=2.0)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        assert g.item() == pytest.approx(w, rel=2e-5, abs=1e-7)


def test_class_mass_stays_float32_under_autocast():
    # bf16 autocast on CPU stands in for fp16 autocast on CUDA: both run matmuls in 16 bits (~3 significant
    # digits), which would put a ~1e-3 error into the mass and through it into every weighted term
    t = _maps(21, nc=10, scale=3.0)[0]
    s = _maps(22, nc=4, shapes=((2, 3, 4, 4),))[0]
    index = torch.tensor([0, 3, 7, -1])
    sig = t[..., 5:].double().sigmoid()
    want = sig[..., [0, 3, 7]].amax(-1) / sig.amax(-1)
    plain = output_kd_terms([s], [t], t_cls_index=index)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m = class_mass_scale(t, index)
        cast = output_kd_terms([s], [t], t_cls_index=index)
    assert m.dtype == torch.float32
    assert (m.double() - want).abs().max().item() < 1e-6
    for a, b in zip(cast, plain):
        assert a.dtype == torch.float32 and a.item() == pytest.approx(b.item(), rel=1e-5)


def _logit(p):
    return math.log(p / (1 - p))


def test_single_class_student_hand_case():
    # one cell, teacher with 3 classes whose best class (logit 2.0) sets the confidence the student learns
    t = torch.tensor([0.1, -0.2, 0.3, 0.4, 1.5, -1.0, 2.0, 0.5]).view(1, 1, 1, 1, 8)
    s = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.3, 0.7]).view(1, 1, 1, 1, 6)
    p = _sig(1.5) * _sig(2.0)  # p' = 0.8176 * 0.8808 = 0.7201
    box_want = (0.1 ** 2 + 0.2 ** 2 + 0.3 ** 2 + 0.4 ** 2) * p / 4
    box, obj, cls = output_kd_terms([s], [t], kind="l2", single_class=True)
    assert box.item() == pytest.approx(box_want, rel=1e-6)
    assert obj.item() == pytest.approx((0.3 - _logit(p)) ** 2 * p, rel=1e-5)
    assert cls.item() == 0 and cls.dtype == torch.float32
    q = _sig(0.3)
    _, bce_obj, bce_cls = output_kd_terms([s], [t], kind="bce", single_class=True)
    assert bce_obj.item() == pytest.approx(-(p * math.log(q) + (1 - p) * math.log(1 - q)) * p, rel=1e-5)
    assert bce_cls.item() == 0
    kl = output_kd_terms([s], [t], kind="kl", single_class=True)
    assert kl[1].item() == pytest.approx(obj.item(), rel=1e-6) and kl[2].item() == 0


@pytest.mark.parametrize("kind", ["l2", "bce"])
def test_single_class_student_matches_loop_and_gets_no_class_gradient(kind):
    s_maps = [m.requires_grad_(True) for m in _maps(23, nc=1)]
    t_maps = _maps(24, nc=6)
    box, obj, cls = output_kd_terms(s_maps, t_maps, kind=kind, single_class=True)
    want_box = want_obj = 0.0
    for s_level, t_level in zip(s_maps, t_maps):
        cells = list(zip(s_level.detach().reshape(-1, 6).tolist(), t_level.reshape(-1, 11).tolist()))
        lb = lo = 0.0
        for sc, tc in cells:
            p = _sig(tc[4]) * max(_sig(v) for v in tc[5:])
            lb += sum((sc[k] - tc[k]) ** 2 for k in range(4)) * p / 4
            if kind == "bce":
                q = _sig(sc[4])
                lo += -(p * math.log(q) + (1 - p) * math.log(1 - q)) * p
            else:
                lo += (sc[4] - _logit(p)) ** 2 * p
        want_box, want_obj = want_box + lb / len(cells), want_obj + lo / len(cells)
    assert box.item() == pytest.approx(want_box, rel=1e-5)
    assert obj.item() == pytest.approx(want_obj, rel=1e-5)
    assert cls.item() == 0
    (box + obj + cls).backward()
    assert all(s.grad[..., 5].abs().max() == 0 and s.grad[..., 4].abs().max() > 0 for s in s_maps)


def test_single_class_mode_is_explicit():
    one, many = _maps(25, nc=1), _maps(26, nc=4)
    with pytest.raises(ValueError, match="single_class=True"):
        output_kd_terms(one, many)
    with pytest.raises(ValueError, match="1-class student"):
        output_kd_terms(_maps(27, nc=2), many, single_class=True)
    with pytest.raises(ValueError, match="no t_cls_index"):
        output_kd_terms(one, many, t_cls_index=torch.tensor([0]), single_class=True)


def test_eval_mode_teacher_output_is_accepted():
    s_maps, t_maps = _maps(8), _maps(9)
    eval_out = (torch.zeros(2, 10, 8), t_maps)
    assert all(torch.equal(a, b) for a, b in zip(output_kd_terms(s_maps, eval_out), output_kd_terms(s_maps, t_maps)))


def test_bad_kind_and_class_mismatch_raise():
    with pytest.raises(ValueError, match="l2"):
        output_kd_terms(_maps(0), _maps(1), kind="mse")
    with pytest.raises(ValueError, match="t_cls_index"):
        output_kd_terms(_maps(0, nc=3), _maps(1, nc=5))
    with pytest.raises(ValueError, match="match_classes"):
        output_kd_terms(_maps(0, nc=3), _maps(1, nc=5), t_cls_index=torch.tensor([0, 1]))


def _one_cell(xywh, obj=0.0):
    """One level, one anchor, one cell, one class: raw logits (1, 1, 1, 1, 6)."""
    m = torch.zeros(1, 1, 1, 1, 6)
    m[..., :4] = torch.tensor(xywh)
    m[..., 4] = obj
    return [m]


def _logit(p):
    return math.log(p / (1 - p))


@pytest.mark.parametrize("reduction", ["mean", "detection"])
def test_ciou_box_kd_hand_cases(reduction):
    anchors = torch.tensor([[[2.0, 1.0]]])  # (nl, na, 2) grid units
    teacher = _one_cell([0, 0, 0, 0])  # centre (0.5, 0.5), wh = (2 * 0.5)^2 * anchor = 2 x 1; w = sigmoid(0) = 0.5
    # student twice as wide and high around the same centre: (2 sigmoid)^2 = 2. Same centre and aspect ratio, so
    # CIoU = IoU = 1 / 4 and the term is (1 - 1/4) * w over one cell (detection: over max(w, 1) = 1)
    big = _logit(math.sqrt(2) / 2)
    box, obj, cls = output_kd_terms(_one_cell([0, 0, big, big]), teacher, box_kind="ciou", anchors=anchors,
                                    reduction=reduction)
    assert box.item() == pytest.approx(0.75 * 0.5, rel=1e-5)
    assert obj.item() == cls.item() == 0.0
    # student shifted right by 0.5 cell (2 sigmoid - 0.5 = 1), same 2 x 1 size: intersection 1.5 x 1, union 2.5,
    # IoU 0.6; enclosing box 2.5 x 1 (squared diagonal 7.25), squared centre distance 0.25; equal aspect ratios
    box, _, _ = output_kd_terms(_one_cell([_logit(0.75), 0, 0, 0]), teacher, box_kind="ciou", anchors=anchors,
                                reduction=reduction)
    assert box.item() == pytest.approx((1 - (0.6 - 0.25 / 7.25)) * 0.5, rel=1e-5)
    # the l2 form of the same pair: squared x logit error over four coordinates
    box, _, _ = output_kd_terms(_one_cell([_logit(0.75), 0, 0, 0]), teacher, reduction=reduction)
    assert box.item() == pytest.approx(_logit(0.75) ** 2 / 4 * 0.5, rel=1e-5)


def test_ciou_box_kd_is_zero_at_teacher_and_pulls_student_towards_it():
    anchors = torch.tensor([[[1.0, 2.0], [2.0, 1.0], [3.0, 3.0]], [[4.0, 3.0], [6.0, 7.0], [8.0, 5.0]]])
    t_maps = _maps(20)
    box, _, _ = output_kd_terms(t_maps, t_maps, box_kind="ciou", anchors=anchors)
    assert box.item() == pytest.approx(0.0, abs=1e-3)  # not exactly 0: CIoU's eps weighs on the tiniest boxes
    s_maps = [t.clone() for t in t_maps]
    s_maps[0][..., 2:4] += 0.5  # every student box larger than the teacher's
    s_maps = [s.requires_grad_(True) for s in s_maps]
    box, _, _ = output_kd_terms(s_maps, t_maps, box_kind="ciou", anchors=anchors)
    box.backward()
    assert box.item() > 0 and torch.all(s_maps[0].grad[..., 2:4] > 0), "descent shrinks the too large boxes"
    assert all(torch.all(s.grad[..., 4:] == 0) for s in s_maps), "the box term moves box outputs only"


@pytest.mark.parametrize("kind", ["l2", "bce"])
def test_obj_iou_scales_the_objectness_target_by_the_box_match(kind):
    anchors = torch.tensor([[[2.0, 1.0]]])
    teacher = _one_cell([0, 0, 0, 0], obj=0.0)  # objectness 0.5 = the weight w
    big = _logit(math.sqrt(2) / 2)
    student = _one_cell([0, 0, big, big], obj=0.0)  # CIoU 1/4 with the teacher's box (see the hand case above)
    student[0].requires_grad_(True)
    _, obj, _ = output_kd_terms(student, teacher, kind=kind, anchors=anchors, obj_iou=True)
    p = 0.5 * 0.25  # the teacher's objectness times the CIoU
    if kind == "l2":
        expected = (0.0 - _logit(p)) ** 2 * 0.5
    else:  # BCE of the student's 0.5 against the target p
        expected = -(p * math.log(0.5) + (1 - p) * math.log(0.5)) * 0.5
    assert obj.item() == pytest.approx(expected, rel=1e-5)
    obj.backward()
    assert torch.all(student[0].grad[..., :4] == 0), "the box match is a target, not a path for gradients"
    assert student[0].grad[..., 4].item() > 0, "descent lowers the objectness of a box that matches badly"
    # without obj_iou the target is the teacher's own objectness, which the student already has: no pull
    student[0].grad = None
    output_kd_terms(student, teacher, kind=kind, anchors=anchors)[1].backward()
    assert student[0].grad[..., 4].item() == pytest.approx(0.0, abs=1e-7)
    # boxes that do not overlap: the factor stops at the floor of 0.01, a finite logit target
    far = _one_cell([8.0, 8.0, -8.0, -8.0], obj=0.0)
    _, obj, _ = output_kd_terms(far, teacher, kind="l2", anchors=anchors, obj_iou=True)
    assert obj.item() == pytest.approx((0.0 - _logit(0.5 * 0.01)) ** 2 * 0.5, rel=1e-4)


def _bce_by_hand(logit, p):
    q = 1 / (1 + math.exp(-logit))
    return -(p * math.log(q) + (1 - p) * math.log(1 - q))


@pytest.mark.parametrize("nl, balance", [(3, (4.0, 1.0, 0.4)), (2, (4.0, 1.0))])
@pytest.mark.parametrize("kind", ["l2", "bce"])
def test_obj_all_is_the_detection_objectness_loss_with_the_teachers_probability(nl, balance, kind):
    shapes = ((2, 3, 4, 4), (2, 3, 2, 2), (2, 3, 1, 1))[:nl]
    s_maps, t_maps = _maps(0, shapes=shapes), _maps(1, shapes=shapes)
    box, obj, cls = output_kd_terms(s_maps, t_maps, kind=kind, obj_all=True)
    expected = 0.0
    for gain, s, t in zip(balance, s_maps, t_maps):  # every cell counts alike: no objectness weight
        s_obj, t_obj = s[..., 4].flatten().tolist(), t[..., 4].flatten().tolist()
        expected += gain * sum(_bce_by_hand(a, _sig(b)) for a, b in zip(s_obj, t_obj)) / len(s_obj)
    assert obj.item() == pytest.approx(expected, rel=1e-5)
    plain = output_kd_terms(s_maps, t_maps, kind=kind)
    assert box.item() == pytest.approx(plain[0].item()) and cls.item() == pytest.approx(plain[2].item())
    assert obj.item() != pytest.approx(plain[1].item())


def test_obj_all_teaches_the_background_that_the_weighted_term_ignores():
    teacher = _one_cell([0, 0, 0, 0], obj=-9.0)  # the teacher is sure there is nothing here
    for obj_all, pull in ((False, 0.01), (True, 0.9)):
        student = _one_cell([0, 0, 0, 0], obj=3.0)  # a confident false positive
        student[0].requires_grad_(True)
        output_kd_terms(student, teacher, obj_all=obj_all)[1].backward()
        g = student[0].grad[..., 4].item()
        if obj_all:  # BCE gradient sigmoid(s) - sigmoid(t), times the one-level balance 4.0
            assert g == pytest.approx(4.0 * (_sig(3.0) - _sig(-9.0)), rel=1e-5) and g > pull
        else:  # 2 * (3 + 9) times the teacher's objectness 1.2e-4: next to nothing
            assert 0 < g < pull


def test_ciou_box_kd_needs_anchors_and_known_kind():
    with pytest.raises(ValueError, match="anchors"):
        output_kd_terms(_maps(0), _maps(1), box_kind="ciou")
    with pytest.raises(ValueError, match="anchors"):
        output_kd_terms(_maps(0), _maps(1), box_kind="ciou", anchors=torch.ones(1, 3, 2))
    with pytest.raises(ValueError, match="ciou"):
        output_kd_terms(_maps(0), _maps(1), box_kind="iou")
    with pytest.raises(ValueError, match="anchors"):
        output_kd_terms(_maps(0), _maps(1), obj_iou=True)


def _cell_with_classes(cls_logits, obj=0.0):
    """One level, one anchor, one cell with zero box logits and the given class logits: (1, 1, 1, 1, 5 + nc)."""
    m = torch.zeros(1, 1, 1, 1, 5 + len(cls_logits))
    m[..., 4] = obj
    m[..., 5:] = torch.tensor(cls_logits)
    return [m]


@pytest.mark.parametrize("reduction", ["mean", "detection"])
def test_cls_floor_hand_case(reduction):
    # w = sigmoid(0) = 0.5; one cell and four classes, so either reduction divides the summed errors by 4
    teacher = _cell_with_classes([3.0, -8.0, -2.0, -9.0])
    student = _cell_with_classes([1.0, -5.0, -6.0, -3.0])
    student[0].requires_grad_(True)
    _, _, plain = output_kd_terms(student, teacher, reduction=reduction)
    assert plain.item() == pytest.approx((2 ** 2 + 3 ** 2 + 4 ** 2 + 6 ** 2) / 4 * 0.5, rel=1e-6)
    _, _, floored = output_kd_terms(student, teacher, reduction=reduction, cls_floor=4.6)
    # class 0: both above the floor, 2^2. Class 1: the teacher's -8 counts as -4.6 and so does the student's -5,
    # nothing to learn. Class 2: the teacher's -2 is above the floor, so the student's -6 is pulled up: 4^2.
    # Class 3: the teacher's -9 counts as -4.6; the student's -3 is above it: 1.6^2
    assert floored.item() == pytest.approx((2 ** 2 + 0 + 4 ** 2 + 1.6 ** 2) / 4 * 0.5, rel=1e-6)
    floored.backward()
    # d/ds of w * (s - t)^2 / 4 is (s - t) / 4 with w = 0.5, t the floored target; 0 where both are floored
    grad = student[0].grad[0, 0, 0, 0, 5:].tolist()
    assert grad == pytest.approx([(1 - 3) / 4, 0.0, (-6 + 2) / 4, (-3 + 4.6) / 4], abs=1e-6)


def test_cls_floor_is_l2_only_and_not_negative():
    with pytest.raises(ValueError, match="l2"):
        output_kd_terms(_maps(0), _maps(1), kind="kl", cls_floor=4.6)
    with pytest.raises(ValueError, match="floor"):
        output_kd_terms(_maps(0), _maps(1), cls_floor=-1.0)
    box0, obj0, cls0 = output_kd_terms(_maps(0), _maps(1))
    box, obj, cls = output_kd_terms(_maps(0), _maps(1), cls_floor=4.6)
    assert box == box0 and obj == obj0 and cls < cls0, "the floor changes the class term only"


@pytest.mark.parametrize("kind", ["l2", "kl", "bce"])
def test_identity_mapping_equals_plain(kind):
    s_maps, t_maps = _maps(10), _maps(11)
    plain = output_kd_terms(s_maps, t_maps, kind=kind)
    mapped = output_kd_terms(s_maps, t_maps, kind=kind, t_cls_index=torch.arange(3))
    for a, b in zip(plain, mapped):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["l2", "kl", "bce"])
def test_mapping_gathers_teacher_channels(kind):
    s_maps, t_maps = _maps(12, nc=2), _maps(13, nc=3)
    index = torch.tensor([2, 0])  # student class 0 <- teacher 2, student 1 <- teacher 0; teacher 1 unmapped
    reordered = [torch.cat((t[..., :5], t[..., 7:8], t[..., 5:6]), -1) for t in t_maps]
    mapped = output_kd_terms(s_maps, t_maps, kind=kind, t_cls_index=index, t_obj_scale=False)
    plain = output_kd_terms(s_maps, reordered, kind=kind)
    for a, b in zip(mapped, plain):
        assert torch.allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("kind", ["l2", "kl", "bce"])
def test_unmapped_student_class_gets_no_class_kd(kind):
    s_maps, t_maps = _maps(14, nc=3), _maps(15, nc=2)
    index = torch.tensor([0, -1, 1])
    mapped = output_kd_terms(s_maps, t_maps, kind=kind, t_cls_index=index, t_obj_scale=False)
    s_known = [torch.cat((s[..., :5], s[..., 5:6], s[..., 7:8]), -1) for s in s_maps]
    plain = output_kd_terms(s_known, t_maps, kind=kind)
    assert torch.allclose(mapped[2], plain[2], rtol=1e-6)
    s_grad = [s.clone().requires_grad_(True) for s in s_maps]
    sum(output_kd_terms(s_grad, t_maps, kind=kind, t_cls_index=index)).backward()
    assert all(s.grad[..., 6].abs().max() == 0 and s.grad[..., 5].abs().max() > 0 for s in s_grad)


def test_perturbing_unmapped_teacher_class_leaves_class_term():
    s_maps, t_maps = _maps(16, nc=2), _maps(17, nc=3)
    index = torch.tensor([0, 2])
    perturbed = [t.clone() for t in t_maps]
    for t in perturbed:
        t[..., 6] += 5.0  # teacher class 1: no student counterpart
    for kind in ("l2", "kl", "bce"):
        a = output_kd_terms(s_maps, t_maps, kind=kind, t_cls_index=index, t_obj_scale=False)
        b = output_kd_terms(s_maps, perturbed, kind=kind, t_cls_index=index, t_obj_scale=False)
        assert torch.equal(a[2], b[2])


def test_unmapped_class_object_lowers_objectness_weight():
    # one cell: the teacher is sure of an object and puts most class mass on its class 1, which the student lacks
    t = torch.tensor([0.1, -0.2, 0.3, 0.4, 4.0, -1.0, 3.0, -2.0]).view(1, 1, 1, 1, 8)
    s = torch.zeros(1, 1, 1, 1, 7)
    index = torch.tensor([0, 2])
    sig = [_sig(v) for v in (-1.0, 3.0, -2.0)]
    m = max(sig[0], sig[2]) / max(sig)
    assert class_mass_scale(t, index).item() == pytest.approx(m, rel=1e-6)
    plain_box = output_kd_terms([s], [t], t_cls_index=index, t_obj_scale=False)[0]
    scaled_box, scaled_obj, _ = output_kd_terms([s], [t], t_cls_index=index)
    assert scaled_box.item() == pytest.approx(plain_box.item() * m, rel=1e-5)
    p = _sig(4.0) * m  # obj target logit(p'), weighted by p'
    assert scaled_obj.item() == pytest.approx((0 - math.log(p / (1 - p))) ** 2 * p, rel=1e-5)
    _, bce_obj, _ = output_kd_terms([s], [t], kind="bce", t_cls_index=index)
    assert bce_obj.item() == pytest.approx(math.log(2) * p, rel=1e-5)  # BCE(0 logit, p') = log 2


def test_confident_mapped_object_of_an_80_class_teacher_keeps_its_objectness():
    # a COCO-like teacher: the student's class is teacher class 7 at p = 0.9, the 60 classes the student lacks sit
    # at 0.007-0.018 (and 19 more mapped classes near 0.01)
    probs = [0.01] * 80
    probs[7] = 0.9
    for k, c in enumerate(range(20, 80)):
        probs[c] = 0.007 + 0.011 * k / 59
    logits = [math.log(p / (1 - p)) for p in probs]
    t = torch.tensor([0.0, 0.0, 0.0, 0.0, 2.0, *logits]).view(1, 1, 1, 1, 85)
    index = torch.arange(20)  # student classes 0-19 <- teacher classes 0-19
    assert class_mass_scale(t, index).item() == pytest.approx(1.0, abs=1e-6)  # 0.9 / 0.9
    ratio_of_sums = sum(probs[:20]) / sum(probs)  # what a share of sigmoid mass would have given
    assert ratio_of_sums < 0.75
    # the same cell seen as an object of an unmapped class (teacher class 50 at 0.9): m = best mapped / 0.9
    probs[7], probs[50] = 0.01, 0.9
    logits = [math.log(p / (1 - p)) for p in probs]
    t = torch.tensor([0.0, 0.0, 0.0, 0.0, 2.0, *logits]).view(1, 1, 1, 1, 85)
    assert class_mass_scale(t, index).item() == pytest.approx(0.01 / 0.9, rel=1e-5)


def test_class_mass_scale_is_one_when_all_teacher_classes_mapped():
    t = _maps(18)[0]
    m = class_mass_scale(t, torch.tensor([2, 0, 1]))
    assert m.shape == t.shape[:-1] and torch.allclose(m, torch.ones_like(m))


def test_compute_kd_output_loss_wrapper():
    s_maps, t_maps = _maps(19), _maps(20)
    hyp = {"giou": 0.05, "obj": 1.0, "cls": 0.5, "kd": 2.0}
    model = SimpleNamespace(hyp=hyp, nc=3)
    for kind in ("l2", "kl"):
        loss, items = compute_kd_output_loss(s_maps, t_maps, model, kd_loss_selected=kind, temperature=5)
        box, obj, cls = output_kd_terms(s_maps, t_maps, kind=kind, temperature=5)
        want = (box * 0.05 * 2 + obj * 1.0 * 2 + cls * 0.5 * 2) * 2  # bs = 2
        assert loss.shape == (1,) and torch.allclose(loss, want.view(1))
        assert items.shape == (4,) and not items.requires_grad
        assert torch.allclose(items[3] * 2, want)
    no_giou = SimpleNamespace(hyp={"obj": 1.0, "cls": 0.5}, nc=3)
    loss, _ = compute_kd_output_loss(s_maps, t_maps, no_giou)
    box, obj, cls = output_kd_terms(s_maps, t_maps)
    assert torch.allclose(loss, ((box * 0.05 + obj + cls * 0.5) * 2).view(1))
    with pytest.raises(ValueError, match="nc"):
        compute_kd_output_loss(s_maps, t_maps, SimpleNamespace(hyp=hyp, nc=4))
    with pytest.raises(ValueError, match="hyp"):
        compute_kd_output_loss(s_maps, t_maps, SimpleNamespace(nc=3))


def _feats(seed, c=4, h=3, w=5, bs=2):
    return torch.randn(bs, c, h, w, generator=torch.Generator().manual_seed(seed))


def _at_reference(x):
    """Per sample: mean over channels of x^2 at each position, divided by its L2 norm."""
    bs, c, h, w = x.shape
    out = []
    for b in range(bs):
        v = [sum(x[b, k, i, j].item() ** 2 for k in range(c)) / c for i in range(h) for j in range(w)]
        norm = math.sqrt(sum(a * a for a in v))
        out.append([a / norm for a in v])
    return out


def test_at_loss_matches_loop_and_allows_channel_mismatch():
    s, t = _feats(0, c=4), _feats(1, c=6)
    a_s, a_t = _at_reference(s), _at_reference(t)
    n = len(a_s) * len(a_s[0])
    want = sum((x - y) ** 2 for rs, rt in zip(a_s, a_t) for x, y in zip(rs, rt)) / n
    assert at_loss(s, t).item() == pytest.approx(want, rel=1e-5)
    mask = torch.rand(2, 3, 5, generator=torch.Generator().manual_seed(2))
    flat = mask.flatten(1).tolist()
    want_masked = sum((x - y) ** 2 * m for rs, rt, rm in zip(a_s, a_t, flat) for x, y, m in zip(rs, rt, rm)) / n
    assert at_masked(s, t, mask).item() == pytest.approx(want_masked, rel=1e-5)


def test_cwd_matches_per_channel_loop():
    s, t, tau = _feats(3), _feats(4), 2.0
    bs, c = s.shape[:2]
    total = 0.0
    for b in range(bs):
        for k in range(c):
            ps = torch.softmax(s[b, k].flatten().double() / tau, 0)
            pt = torch.softmax(t[b, k].flatten().double() / tau, 0)
            total += float((pt * (pt.log() - ps.log())).sum()) * tau ** 2
    assert cwd_loss(s, t, tau=tau).item() == pytest.approx(total / (bs * c), rel=1e-5)


def test_ft_and_mimic_match_definitions():
    s, t = _feats(5), _feats(6)
    def stat(x):  # per-channel mean of x^2, normalised per sample
        v = [[float((x[b, k] ** 2).mean()) for k in range(x.shape[1])] for b in range(x.shape[0])]
        return [[a / math.sqrt(sum(q * q for q in row)) for a in row] for row in v]
    fs, fto = stat(s), stat(t)
    want = sum((a - b) ** 2 for rs, rt in zip(fs, fto) for a, b in zip(rs, rt)) / (2 * 4)
    assert ft_loss(s, t).item() == pytest.approx(want, rel=1e-5)
    assert mimic_loss(s, t).item() == pytest.approx(float(((s - t) ** 2).sum()) / s.numel(), rel=1e-6)
    # mgd's loss is the same MSE, taken of the map its generator made (the masking lives in the adapter)
    assert FEATURE_LOSSES["mgd"](s, t).item() == pytest.approx(float(((s - t) ** 2).sum()) / s.numel(), rel=1e-6)


def test_pkd_is_twice_one_minus_pearson_correlation_per_channel():
    s, t = _feats(11), _feats(12)
    s = s * torch.tensor([1.0, 10.0, 0.1, 3.0]).view(1, 4, 1, 1) + 5.0  # channel scales and offsets must not matter
    correlations = []
    for k in range(s.shape[1]):
        a = [float(v) for v in s[:, k].flatten()]
        b = [float(v) for v in t[:, k].flatten()]
        ma, mb = sum(a) / len(a), sum(b) / len(b)
        cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
        var_a, var_b = sum((x - ma) ** 2 for x in a), sum((y - mb) ** 2 for y in b)
        correlations.append(cov / math.sqrt(var_a * var_b))
    want = sum(2 * (1 - r) for r in correlations) / len(correlations)
    assert FEATURE_LOSSES["pkd"](s, t).item() == pytest.approx(want, rel=1e-4)
    # image size independence: the same maps tiled 2x2 (4x the positions) give the same loss
    big_s, big_t = s.repeat(1, 1, 2, 2), t.repeat(1, 1, 2, 2)
    assert FEATURE_LOSSES["pkd"](big_s, big_t).item() == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("name", sorted(FEATURE_LOSSES))
def test_feature_losses_zero_on_equal_and_gradient_to_student_only(name):
    fn = FEATURE_LOSSES[name]
    extra = (torch.full((2, 3, 5), 0.25),) if name in NEEDS_MASK else ()
    t = _feats(7).requires_grad_(True)
    assert abs(fn(t.detach().clone(), t, *extra).item()) < 1e-6
    s = _feats(8).requires_grad_(True)
    loss = fn(s, t, *extra)
    assert loss.dim() == 0 and loss.item() > 0
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


@pytest.mark.parametrize("name", sorted(NEEDS_ADAPTER))
def test_channel_mismatch_raises_with_adapter_hint(name):
    with pytest.raises(ValueError, match="GenerativeAdapter" if name == "mgd" else "ChannelAdapter"):
        FEATURE_LOSSES[name](_feats(0, c=4), _feats(1, c=6))


def test_spatial_mismatch_raises():
    with pytest.raises(ValueError, match="stride"):
        at_loss(_feats(0, h=3), _feats(1, h=4))


def test_feature_tables_are_read_only():
    with pytest.raises(TypeError):
        FEATURE_LOSSES["x"] = at_loss
    assert {"ft", "cwd", "mimic", "pkd", "mgd"} == set(NEEDS_ADAPTER) and not {"at", "at_masked"} & NEEDS_ADAPTER


def test_gt_mask_hand_case():
    targets = torch.tensor([[1, 0, 0.5, 0.5, 0.5, 0.5],  # image 1: cells 2..5 in x and y
                            [0, 3, 0.0, 0.0, 0.25, 0.25]])  # image 0: corner box, reaches into cell 0 only
    mask = gt_mask(targets, bs=2, h=8, w=8, ratio=0.25)
    want = torch.full((2, 8, 8), 0.25)
    want[1, 2:6, 2:6] = 0.75
    want[0, 0, 0] = 0.75
    assert mask.shape == (2, 8, 8) and torch.equal(mask, want)
    assert torch.equal(gt_mask(torch.zeros(0, 6), 3, 4, 4), torch.full((3, 4, 4), 0.25))


def test_gt_mask_vectorised_equals_loop():
    g = torch.Generator().manual_seed(9)
    n, bs, h, w, ratio = 40, 3, 6, 10, 0.3
    targets = torch.cat((torch.randint(0, bs, (n, 1), generator=g).float(), torch.zeros(n, 1),
                         torch.rand(n, 2, generator=g) * 1.2 - 0.1, torch.rand(n, 2, generator=g) * 0.5), 1)
    want = torch.full((bs, h, w), ratio)
    for box in targets:
        x0, x1 = (box[2] - box[4] / 2) * w, (box[2] + box[4] / 2) * w  # float32 arithmetic, as on the grid
        y0, y1 = (box[3] - box[5] / 2) * h, (box[3] + box[5] / 2) * h
        c0, c1 = max(math.floor(x0), 0), min(math.ceil(x1), w)
        r0, r1 = max(math.floor(y0), 0), min(math.ceil(y1), h)
        if c1 > c0 and r1 > r0:
            want[int(box[0]), r0:r1, c0:c1] = 1 - ratio
    assert torch.allclose(gt_mask(targets, bs, h, w, ratio=ratio), want)


def test_gt_mask_rejects_bad_image_index():
    with pytest.raises(ValueError, match="bs=2"):
        gt_mask(torch.tensor([[2, 0, 0.5, 0.5, 0.1, 0.1]]), bs=2, h=4, w=4)
