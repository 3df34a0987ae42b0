"""Detection metrics: AP per class (YOLOv5 v6.0 rules), fitness, the confusion matrix and metric curves."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from utils.boxes import box_iou

_trapezoid = getattr(np, "trapezoid", None) or getattr(np, "trapz")  # numpy 2 renamed trapz


def fitness(x):
    """Model fitness as a weighted sum of [P, R, mAP@.5, mAP@.5:.95]; x is (n, >=4) -> (n,)."""
    w = np.array([0.0, 0.0, 0.1, 0.9])
    return (np.asarray(x)[:, :4] * w).sum(1)


def compute_ap(recall, precision):
    """Average precision of one precision/recall curve, 101-point interpolated (COCO style).

    Args:
        recall: (n,) increasing recall values, one per detection sorted by falling confidence.
        precision: (n,) matching precision values.

    Returns:
        (ap, mpre, mrec): the AP and the curve with sentinels added and precision made monotone.
    """
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([1.0], precision, [0.0]))
    mpre = np.flip(np.maximum.accumulate(np.flip(mpre)))  # best precision achievable at recall >= r
    x = np.linspace(0, 1, 101)
    ap = _trapezoid(np.interp(x, mrec, mpre), x)
    return float(ap), mpre, mrec


def _names_dict(names):
    """Class names as {id: name}, whether given as a dict, list or tuple."""
    return dict(names) if isinstance(names, dict) else dict(enumerate(names))


def ap_per_class(tp, conf, pred_cls, target_cls, plot=False, save_dir=".", names=(), eps=1e-16):
    """Per-class precision, recall, AP and F1, YOLOv5 v6.0 style.

    P, R and F1 are read at the one confidence (on a 1000-point grid) that maximises the F1 averaged over classes.
    Only classes present in target_cls are reported; predictions of other classes are ignored.

    Args:
        tp: (n, t) bool, prediction i is a true positive at IoU threshold j (t = 10 for 0.5:0.95).
        conf: (n,) confidences. pred_cls: (n,) predicted classes. target_cls: (m,) label classes.
        plot: write PR/F1/P/R curves into save_dir. names: class names (dict or sequence).

    Returns:
        (p, r, ap, f1, unique_classes): p, r, f1 (nc,), ap (nc, t), unique_classes (nc,) int32.
    """
    tp, conf, pred_cls = np.asarray(tp), np.asarray(conf), np.asarray(pred_cls)
    order = np.argsort(-conf, kind="stable")
    tp, conf, pred_cls = tp[order], conf[order], pred_cls[order]
    unique_classes, n_labels = np.unique(np.asarray(target_cls), return_counts=True)
    nc = unique_classes.shape[0]
    px, py = np.linspace(0, 1, 1000), []  # confidence grid; PR curves at mAP@.5 for plotting
    ap, p, r = np.zeros((nc, tp.shape[1])), np.zeros((nc, 1000)), np.zeros((nc, 1000))
    for ci, c in enumerate(unique_classes):
        i = pred_cls == c
        if not i.any() or n_labels[ci] == 0:
            continue
        tpc = tp[i].cumsum(0)  # (k, t)
        fpc = (1 - tp[i]).cumsum(0)
        recall = tpc / (n_labels[ci] + eps)
        precision = tpc / (tpc + fpc)
        # conf falls along the curve, so interpolate against -conf to get values on the rising grid
        r[ci] = np.interp(-px, -conf[i], recall[:, 0], left=0)
        p[ci] = np.interp(-px, -conf[i], precision[:, 0], left=1)
        for j in range(tp.shape[1]):
            ap[ci, j], mpre, mrec = compute_ap(recall[:, j], precision[:, j])
            if plot and j == 0:
                py.append(np.interp(px, mrec, mpre))
    f1 = 2 * p * r / (p + r + eps)
    if plot:
        all_names = _names_dict(names)
        shown = {k: all_names.get(int(c), str(int(c))) for k, c in enumerate(unique_classes)}
        save_dir = Path(save_dir)
        plot_pr_curve(px, py, ap, save_dir / "PR_curve.png", shown)
        plot_mc_curve(px, f1, save_dir / "F1_curve.png", shown, ylabel="F1")
        plot_mc_curve(px, p, save_dir / "P_curve.png", shown, ylabel="Precision")
        plot_mc_curve(px, r, save_dir / "R_curve.png", shown, ylabel="Recall")
    best = int(f1.mean(0).argmax()) if nc else 0
    return p[:, best], r[:, best], ap, f1[:, best], unique_classes.astype("int32")


class ConfusionMatrix:
    """Detection confusion matrix, (nc + 1, nc + 1) indexed [predicted, true]; index nc is background.

    Column nc counts detections matching no label (false positives); row nc counts labels no detection
    matched (missed objects).
    """

    def __init__(self, nc, conf=0.25, iou_thres=0.45):
        self.matrix = np.zeros((nc + 1, nc + 1))
        self.nc = nc
        self.conf = conf
        self.iou_thres = iou_thres

    def process_batch(self, detections, labels):
        """Add one image.

        Args:
            detections: (n, 6) [x1, y1, x2, y2, conf, cls]; those below self.conf are ignored.
            labels: (m, 5) [cls, x1, y1, x2, y2].
        """
        detections = detections[detections[:, 4] > self.conf]
        gt_cls = labels[:, 0].long().cpu().numpy()
        det_cls = detections[:, 5].long().cpu().numpy()
        matches = _unique_matches(box_iou(labels[:, 1:5], detections[:, :4]), self.iou_thres)  # (k, 2) [gt, det]
        np.add.at(self.matrix, (det_cls[matches[:, 1]], gt_cls[matches[:, 0]]), 1)
        missed = np.setdiff1d(np.arange(len(gt_cls)), matches[:, 0])
        np.add.at(self.matrix, (self.nc, gt_cls[missed]), 1)
        spurious = np.setdiff1d(np.arange(len(det_cls)), matches[:, 1])
        np.add.at(self.matrix, (det_cls[spurious], self.nc), 1)

    def tp_fp(self):
        """True and false positives per class, each (nc,)."""
        tp = self.matrix.diagonal()
        fp = self.matrix.sum(1) - tp
        return tp[:-1], fp[:-1]

    def plot(self, normalize=True, save_dir="", names=()):
        """Write confusion_matrix.png into save_dir (columns normalised to sum 1 when normalize)."""
        m = self.matrix / ((self.matrix.sum(0).reshape(1, -1) + 1e-9) if normalize else 1)
        m[m < 0.005] = np.nan  # leave near-empty cells blank
        names = list(_names_dict(names).values())
        labels = names + ["background"] if 0 < len(names) == self.nc else [str(i) for i in range(self.nc)] + ["bg"]
        fig, ax = _new_figure(figsize=(12, 9))
        im = ax.imshow(m, cmap="Blues", vmin=0.0)
        fig.colorbar(im, ax=ax)
        if self.nc < 30:  # cell annotations become unreadable beyond that
            for (i, j), v in np.ndenumerate(m):
                if not np.isnan(v):
                    ax.text(j, i, f"{v:.2f}" if normalize else f"{v:.0f}", ha="center", va="center", fontsize=8)
        ticks = np.arange(self.nc + 1)
        ax.set_xticks(ticks, labels, rotation=90)
        ax.set_yticks(ticks, labels)
        ax.set_xlabel("True")
        ax.set_ylabel("Predicted")
        fig.savefig(Path(save_dir) / "confusion_matrix.png", dpi=250)


def _unique_matches(iou, iou_thres):
    """Greedy one-to-one matching by falling IoU above iou_thres.

    Args:
        iou: (m, n) tensor, labels x detections.

    Returns:
        (k, 2) int array of [label_index, detection_index] pairs; each label and detection appears at most once.
    """
    gi, di = torch.where(iou > iou_thres)
    if not len(gi):
        return np.zeros((0, 2), dtype=np.int64)
    pairs = np.stack((gi.cpu().numpy(), di.cpu().numpy(), iou[gi, di].cpu().numpy()), 1)
    pairs = pairs[pairs[:, 2].argsort(kind="stable")[::-1]]
    pairs = pairs[np.unique(pairs[:, 1], return_index=True)[1]]  # best label for each detection
    pairs = pairs[pairs[:, 2].argsort(kind="stable")[::-1]]
    pairs = pairs[np.unique(pairs[:, 0], return_index=True)[1]]  # then best detection for each label
    return pairs[:, :2].astype(np.int64)


def _new_figure(figsize=(9, 6)):
    """A (figure, axes) pair drawn by the Agg canvas; no pyplot, so no GUI backend and no global figure state."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, tight_layout=True)
    return fig, fig.subplots(1, 1)


def plot_pr_curve(px, py, ap, save_dir="pr_curve.png", names=()):
    """Precision-recall curve per class (legend when < 21 classes) and the mean, at IoU 0.5.

    Args:
        px: (1000,) recall grid. py: list of (1000,) precision curves. ap: (nc, t) AP table.
    """
    fig, ax = _new_figure()
    names = _names_dict(names)
    py = np.stack(py, 1) if len(py) else np.zeros((len(px), 0))
    if 0 < len(names) < 21:
        for i, y in enumerate(py.T):
            ax.plot(px, y, linewidth=1, label=f"{names.get(i, i)} {ap[i, 0]:.3f}")
    else:
        ax.plot(px, py, linewidth=1, color="grey")
    if py.shape[1]:
        ax.plot(px, py.mean(1), linewidth=3, color="blue", label=f"all classes {ap[:, 0].mean():.3f} mAP@0.5")
    ax.set_xlabel("Recall")
    ax.set_ylabel("Precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(bbox_to_anchor=(1.04, 1), loc="upper left")
    fig.savefig(Path(save_dir), dpi=250)


def plot_mc_curve(px, py, save_dir="mc_curve.png", names=(), xlabel="Confidence", ylabel="Metric"):
    """A metric against confidence, per class (legend when < 21 classes) and averaged.

    Args:
        px: (1000,) confidence grid. py: (nc, 1000) metric values.
    """
    fig, ax = _new_figure()
    names = _names_dict(names)
    py = np.asarray(py)
    if 0 < len(names) < 21:
        for i, y in enumerate(py):
            ax.plot(px, y, linewidth=1, label=f"{names.get(i, i)}")
    else:
        ax.plot(px, py.T, linewidth=1, color="grey")
    if len(py):
        y = py.mean(0)
        ax.plot(px, y, linewidth=3, color="blue", label=f"all classes {y.max():.2f} at {px[y.argmax()]:.3f}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(bbox_to_anchor=(1.04, 1), loc="upper left")
    fig.savefig(Path(save_dir), dpi=250)
