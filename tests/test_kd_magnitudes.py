"""bench/kd_magnitudes.py: one step per loss on real shapes images, every term reported next to the detection loss."""
import math
from types import SimpleNamespace

import torch

from bench import kd_magnitudes


def test_ratios_cover_every_term_and_both_box_forms(shapes_data):
    names = [f"c{i}" for i in range(10)]
    opt = SimpleNamespace(teacher="", student="")
    imgs, targets = kd_magnitudes.real_batch(str(shapes_data), 64, 2)
    student, teacher = kd_magnitudes.models(opt, "n", "n", 64, names)
    out = kd_magnitudes.ratios(student, teacher, imgs, targets)
    features = [k for k in out if k.split(" ")[0] in kd_magnitudes.FEATURES]
    assert sorted(k.split(" ")[0] for k in features) == sorted(kd_magnitudes.FEATURES)
    assert list(out)[:2] == ["kd_box (l2)", "kd_box (ciou)"]
    assert all(math.isfinite(v) and v >= 0 for v in out.values())
    assert out["detection"] > 0 and out["kd_box (ciou)"] > 0 and out["kd_cls"] > 0
    # the ciou element is 1 - CIoU <= 2 per cell, weighted and divided by the objectness mass: the term times the
    # detection loss is at most 2 x the scaled giou gain per level (three levels)
    assert out["kd_box (ciou)"] * out["detection"] <= 2 * student.hyp["giou"] * 3 + 1e-6
    assert torch.is_grad_enabled(), "the measurement leaves autograd as it found it"
