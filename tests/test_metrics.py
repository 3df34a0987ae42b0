"""AP maths (envelope + 101-point interpolation), ap_per_class, fitness and the confusion matrix."""
import numpy as np
import pytest
import torch

from utils.metrics import ConfusionMatrix, ap_per_class, compute_ap, fitness


def _trapezoid_101(f):
    """Trapezoid rule over x = 0, 0.01, ..., 1 for a Python function f, written out."""
    xs = [i / 100 for i in range(101)]
    return sum((f(xs[i]) + f(xs[i + 1])) / 2 * 0.01 for i in range(100))


def test_fitness_weights():
    x = np.array([[0.9, 0.8, 0.6, 0.4], [0.0, 0.0, 1.0, 1.0]])
    assert np.allclose(fitness(x), [0.1 * 0.6 + 0.9 * 0.4, 1.0])


def test_perfect_predictions_give_the_yolov5_ceiling():
    # Sentinels put recall 1.0 twice, with precision 1 then 0; np.interp takes the right-hand value at x == 1,
    # so the last trapezoid is half height: AP = 1 - 0.01 / 2. YOLOv5 v6.0 reports 0.995 for perfect detections.
    expected = _trapezoid_101(lambda x: 0.0 if x == 1.0 else 1.0)
    assert expected == pytest.approx(0.995)
    n = 4
    tp = np.ones((n, 10), dtype=bool)
    p, r, ap, f1, classes = ap_per_class(tp, np.linspace(0.9, 0.6, n), np.zeros(n), np.zeros(n))
    assert ap.shape == (1, 10)
    assert np.allclose(ap, expected)
    assert p[0] == pytest.approx(1.0) and r[0] == pytest.approx(1.0, abs=1e-6) and f1[0] == pytest.approx(1.0)
    assert classes.tolist() == [0] and classes.dtype == np.int32


def test_compute_ap_tp_fp_tp_by_hand():
    # 2 labels; detections TP (0.9), FP (0.8), TP (0.7)
    recall = np.array([0.5, 0.5, 1.0])
    precision = np.array([1.0, 0.5, 2 / 3])

    def envelope(x):  # best precision at recall >= x, right-continuous like the interpolation
        if x < 0.5:
            return 1.0
        return 2 / 3 if x < 1.0 else 0.0

    expected = _trapezoid_101(envelope)
    ap, mpre, mrec = compute_ap(recall, precision)
    assert ap == pytest.approx(expected, abs=1e-9)
    assert ap == pytest.approx(0.49 + 0.01 * (1 + 2 / 3) / 2 + 0.49 * 2 / 3 + 0.01 * (2 / 3) / 2, abs=1e-9)
    assert np.allclose(mrec, [0, 0.5, 0.5, 1.0, 1.0])
    assert np.allclose(mpre, [1, 1, 2 / 3, 2 / 3, 0])

    tp = np.array([[True], [False], [True]])
    p, r, ap_table, f1, _ = ap_per_class(tp, np.array([0.7, 0.9, 0.8])[[1, 2, 0]], np.zeros(3), np.zeros(2))
    assert ap_table[0, 0] == pytest.approx(expected)
    # F1 is best (0.8) for confidences at or below 0.7, where all three detections count
    assert p[0] == pytest.approx(2 / 3) and r[0] == pytest.approx(1.0) and f1[0] == pytest.approx(0.8)


def test_ap_per_class_sorts_by_confidence():
    tp = np.array([[True], [False], [True]])
    conf = np.array([0.9, 0.8, 0.7])
    ap_sorted = ap_per_class(tp, conf, np.zeros(3), np.zeros(2))[2]
    perm = [2, 0, 1]
    ap_shuffled = ap_per_class(tp[perm], conf[perm], np.zeros(3), np.zeros(2))[2]
    assert np.allclose(ap_sorted, ap_shuffled)
    fp_last = ap_per_class(tp, np.array([0.9, 0.7, 0.8]), np.zeros(3), np.zeros(2))[2]  # TP, TP, FP by conf
    assert fp_last[0, 0] == pytest.approx(0.995)
    assert ap_sorted[0, 0] < 0.9


def test_ap_per_class_multiclass_and_missing_predictions():
    # class 0: one perfect detection; class 2: labelled but never predicted; class 5: predicted, never labelled
    tp = np.array([[True] * 10, [False] * 10])
    conf = np.array([0.9, 0.95])
    pred_cls = np.array([0, 5])
    target_cls = np.array([0, 2, 2])
    p, r, ap, f1, classes = ap_per_class(tp, conf, pred_cls, target_cls)
    assert classes.tolist() == [0, 2]  # only labelled classes are reported
    assert np.allclose(ap[0], 0.995) and np.allclose(ap[1], 0.0)
    assert r[1] == 0.0 and p[1] == 0.0


def test_ap_depends_on_iou_threshold_columns():
    # one detection, correct at IoU 0.5..0.7 only: AP is 0.995 on 5 columns and 0 on the other 5
    tp = np.array([[True] * 5 + [False] * 5])
    _, _, ap, _, _ = ap_per_class(tp, np.array([0.9]), np.zeros(1), np.zeros(1))
    assert np.allclose(ap[0, :5], 0.995) and np.allclose(ap[0, 5:], 0.0)
    assert ap.mean() == pytest.approx(0.995 / 2)


def test_ap_per_class_plots(tmp_path):
    tp = np.array([[True] * 10, [False] * 10, [True] * 10])
    ap_per_class(tp, np.array([0.9, 0.8, 0.7]), np.array([0, 1, 1]), np.array([0, 1, 1]), plot=True,
                 save_dir=tmp_path, names={0: "cat", 1: "dog"})
    for name in ("PR_curve.png", "F1_curve.png", "P_curve.png", "R_curve.png"):
        assert (tmp_path / name).stat().st_size > 1000


def _tiny_case():
    labels = torch.tensor([
        [0, 0.0, 0.0, 10.0, 10.0],  # A, class 0: found with the right class
        [1, 20.0, 20.0, 30.0, 30.0],  # B, class 1: found but called class 0
        [0, 50.0, 50.0, 60.0, 60.0],  # C, class 0: missed
    ])
    detections = torch.tensor([
        [0.0, 0.0, 10.0, 10.0, 0.9, 0],  # on A, class 0
        [0.5, 0.0, 10.0, 10.0, 0.8, 0],  # duplicate on A: A is already taken -> false positive
        [20.0, 20.0, 30.0, 31.0, 0.7, 0],  # on B, wrong class
        [80.0, 80.0, 90.0, 90.0, 0.6, 1],  # nothing there -> false positive
        [50.0, 50.0, 60.0, 60.0, 0.1, 0],  # on C but below the confidence threshold
    ])
    return detections, labels


def test_confusion_matrix_counts():
    cm = ConfusionMatrix(nc=2, conf=0.25, iou_thres=0.45)
    cm.process_batch(*_tiny_case())
    expected = np.zeros((3, 3))
    expected[0, 0] = 1  # A
    expected[0, 1] = 1  # B predicted as class 0
    expected[2, 0] = 1  # C missed (predicted background)
    expected[0, 2] = 1  # duplicate on A
    expected[1, 2] = 1  # detection on empty background
    assert np.array_equal(cm.matrix, expected)
    tp, fp = cm.tp_fp()
    assert tp.tolist() == [1, 0] and fp.tolist() == [2, 1]


def test_confusion_matrix_without_labels_counts_false_positives(tmp_path):
    cm = ConfusionMatrix(nc=2)
    cm.process_batch(torch.tensor([[0.0, 0.0, 5.0, 5.0, 0.9, 1]]), torch.zeros((0, 5)))
    cm.process_batch(torch.zeros((0, 6)), torch.tensor([[1, 0.0, 0.0, 5.0, 5.0]]))
    assert cm.matrix[1, 2] == 1 and cm.matrix[2, 1] == 1 and cm.matrix.sum() == 2
    cm.plot(save_dir=tmp_path, names=["a", "b"])
    assert (tmp_path / "confusion_matrix.png").stat().st_size > 1000
