"""bench/box_quality.py: TP shares by hand, and a run on the shipped demo teacher."""
import math

import numpy as np
import pytest

from bench import box_quality

ROOT = box_quality.ROOT


def test_tp_shares_hand_case():
    tp = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0], [1, 1, 1]], dtype=bool)
    conf = np.array([0.9, 0.8, 0.7, 0.95, 0.1])
    # confident (>= 0.5) and matched at the first threshold: rows 0, 1, 2 (row 3 unmatched, row 4 not confident)
    assert box_quality.tp_shares(tp, conf, 0.5).tolist() == pytest.approx([1.0, 2 / 3, 1 / 3])
    assert all(math.isnan(v) for v in box_quality.tp_shares(tp, conf, 0.99))


def test_best_label_ious_hand_case():
    labels = np.array([[0, 0, 0, 10, 10], [1, 20, 20, 30, 30], [2, 0, 0, 5, 5]])
    dets = np.array([[0, 0, 10, 5, 0.9, 0],  # half of label 0: IoU 0.5
                     [0, 0, 10, 10, 0.8, 1],  # label 0's box exactly, but class 1: does not count for label 0
                     [22, 20, 30, 30, 0.7, 1],  # label 1 shifted in: 80 / 100
                     [20, 20, 30, 30, 0.6, 0]])  # label 1's box exactly, wrong class
    assert box_quality.best_label_ious(labels, dets).tolist() == pytest.approx([0.5, 0.8, 0.0])
    assert box_quality.best_label_ious(labels, np.zeros((0, 6))).tolist() == [0.0, 0.0, 0.0]


def test_common_label_stats_hand_case():
    a = np.array([0.9, 0.6, 0.8, 0.2])
    b = np.array([0.7, 0.95, 0.4, 0.9])
    # labels 0 and 1 are found (>= 0.5) by both
    n, rows = box_quality.common_label_stats([a, b], thresholds=(0.75, 0.85))
    assert n == 2
    assert rows[0][0] == pytest.approx(0.75) and rows[0][1] == pytest.approx([0.5, 0.5])
    assert rows[1][0] == pytest.approx(0.825) and rows[1][1] == pytest.approx([0.5, 0.5])


def test_labels_name_the_run():
    assert box_quality.label("runs/kd_table/baseline_s0_128px_e60/weights/best.pt") == "baseline_s0_128px_e60"
    assert box_quality.label("weights/demo_teacher_yolov5s_shapes128.pt") == "demo_teacher_yolov5s_shapes128.pt"
    assert box_quality.label("/repo/weights/teacher.pt") == "teacher.pt"


def test_box_quality_on_the_demo_teacher(shapes_data):
    teacher = ROOT / "weights/demo_teacher_yolov5s_shapes128.pt"
    (_, r), (_, same) = box_quality.main([str(teacher), str(teacher), "--data", str(shapes_data), "--imgsz", "96",
                                          "--conf", "0.1"])
    ap, shares = r["ap"], r["shares"]
    assert len(ap) == len(shares) == 10 and r["confident"] > 0
    assert ap[0] > 0.1, "the demo teacher finds the shapes"
    # stricter thresholds keep a subset of the matches: AP and shares can only fall
    assert np.all(np.diff(ap) <= 1e-9) and shares[0] == 1.0 and np.all(np.diff(shares) <= 0)
    # the same checkpoint twice: every label it finds is common to both, with the same IoUs
    assert r["common"] > 0 and r["common"] == same["common"]
    assert r["common_iou"] == same["common_iou"] >= 0.5 and r["found"] == same["found"] > 0
