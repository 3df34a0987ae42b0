"""How precise are the boxes a detector finds? mAP@.5:.95 mixes finding objects with placing boxes; this splits them.

For each checkpoint, scored on the same val split as val.py scores it (same NMS, same matching):
  - AP at each IoU threshold 0.50, 0.55, ..., 0.95 (their mean is mAP@.5:.95);
  - among its confident detections (conf >= --conf) that are true positives at IoU 0.5, the share that are still
    true positives at each stricter threshold: 1.0 at 0.5 by definition, then falling. A model whose shares fall
    faster places its boxes less precisely, whatever its recall.
With two or more checkpoints, also per label: the best IoU of a confident same-class detection (NMS at YOLOv5's
deployment thresholds, --conf and IoU 0.45), compared on the labels every checkpoint finds (IoU >= 0.5). The TP
shares above mix precision with which objects a model finds (a model that finds only large objects places its
few boxes well); on the same objects, only precision differs.

Usage:
    python bench/box_quality.py runs/kd_table/baseline_s0_128px_e120/weights/best.pt \\
        runs/kd_table/output_at_s0_128px_e120_a0.1_b0.25/weights/best.pt --imgsz 128
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)


def tp_shares(tp: np.ndarray, conf: np.ndarray, conf_thres: float) -> np.ndarray:
    """Share of the confident detections matched at the first IoU threshold that stay matched at each threshold.

    Args:
        tp: (n, k) bool, detection i matched a label at threshold j (val.py's "correct" rows).
        conf: (n,) detection confidences.
        conf_thres: detections below it are left out.

    Returns:
        (k,) floats (NaN where no confident detection matched at the first threshold).
    """
    tp = np.asarray(tp, dtype=bool)
    kept = tp[(np.asarray(conf) >= conf_thres) & tp[:, 0]]
    if not len(kept):
        return np.full(tp.shape[1], np.nan)
    return kept.mean(0)


def best_label_ious(labels: np.ndarray, detections: np.ndarray) -> np.ndarray:
    """For each label, the highest IoU of a detection of its class (0 where there is none).

    Args:
        labels: (n, 5) [cls, x1, y1, x2, y2].
        detections: (m, 6) [x1, y1, x2, y2, conf, cls], as non_max_suppression returns them.
    Returns:
        (n,) floats.
    """
    import torch
    from torchvision.ops import box_iou

    labels, detections = np.asarray(labels, dtype=np.float32), np.asarray(detections, dtype=np.float32)
    out = np.zeros(len(labels), dtype=np.float32)
    if not len(labels) or not len(detections):
        return out
    iou = box_iou(torch.from_numpy(labels[:, 1:5]), torch.from_numpy(detections[:, :4])).numpy()
    iou[labels[:, :1] != detections[None, :, 5]] = 0.0  # other classes do not count
    return iou.max(1)


def common_label_stats(ious: list, thresholds=(0.75, 0.85)) -> tuple:
    """(number of labels every model finds at IoU >= 0.5, [(mean IoU, share >= each threshold) per model])."""
    found = np.all([np.asarray(v) >= 0.5 for v in ious], axis=0)
    rows = []
    for v in ious:
        v = np.asarray(v)[found]
        rows.append((float(v.mean()) if len(v) else float("nan"),
                     [float((v >= t).mean()) if len(v) else float("nan") for t in thresholds]))
    return int(found.sum()), rows


def label_ious(weights: str, data: str, imgsz: int, batch_size: int, conf_thres: float) -> np.ndarray:
    """Best same-class IoU of every val label (in val.py's order) over the checkpoint's confident detections."""
    import torch

    from models.experimental import attempt_load
    from utils.boxes import non_max_suppression, xywh2xyxy
    from utils.datasets import check_dataset, create_dataloader

    data = check_dataset(data)
    model = attempt_load(weights, map_location="cpu").float().eval()
    gs = max(int(model.stride.max()), 32)
    loader = create_dataloader(data["val"], imgsz, batch_size, gs, pad=0.5, rect=True, workers=0,
                               nc=int(data["nc"]))[0]
    out = []
    with torch.no_grad():
        for imgs, targets, _, _ in loader:
            x = imgs.float() / 255
            h, w = x.shape[2:]
            dets = non_max_suppression(model(x)[0], conf_thres, 0.45)
            for i, det in enumerate(dets):
                t = targets[targets[:, 0] == i]
                boxes = xywh2xyxy(t[:, 2:6] * torch.tensor([w, h, w, h]))
                labels = torch.cat((t[:, 1:2], boxes), 1).numpy()
                out.append(best_label_ious(labels, det.numpy()))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def measure(weights: str, data: str, imgsz: int, batch_size: int, conf_thres: float) -> dict:
    """Run val.py on one checkpoint and keep what it matched: AP per IoU threshold and the TP shares."""
    import val

    seen = {}
    scorer = val.ap_per_class

    def keep(tp, conf, pred_cls, target_cls, **kw):
        out = scorer(tp, conf, pred_cls, target_cls, **kw)
        seen.update(tp=tp, conf=conf, ap=out[2])
        return out

    val.ap_per_class = keep
    try:
        val.run(data=data, weights=weights, imgsz=imgsz, batch_size=batch_size, half=False, plots=False,
                project=str(ROOT / "runs/box_quality"), exist_ok=True)
    finally:
        val.ap_per_class = scorer
    if not seen:
        raise RuntimeError(f"{weights}: val.py made no detections to score")
    return {"ap": seen["ap"].mean(0), "shares": tp_shares(seen["tp"], seen["conf"], conf_thres),
            "confident": int((seen["conf"] >= conf_thres).sum())}


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("weights", nargs="+", help="checkpoints to compare")
    p.add_argument("--data", default=str(ROOT / "data/shapes.yaml"))
    p.add_argument("--imgsz", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--conf", type=float, default=0.25, help="confidence of the detections whose TP shares count")
    opt = p.parse_args(argv)
    rows = [(w, measure(w, opt.data, opt.imgsz, opt.batch_size, opt.conf)) for w in opt.weights]
    labels = [label(w) for w in opt.weights]
    width = max(len(x) for x in labels + ["checkpoint"])
    head = " ".join(f"{t:5.2f}" for t in IOU_THRESHOLDS)
    for title, key in (("AP at IoU", "ap"), (f"share of conf>={opt.conf} TP@.5 still TP at IoU", "shares")):
        print(f"\n{title}\n{'checkpoint':{width}s} {head}")
        for name, (_, r) in zip(labels, rows):
            print(f"{name:{width}s} " + " ".join(f"{v:5.3f}" for v in r[key]))
    if len(opt.weights) > 1:
        ious = [label_ious(w, opt.data, opt.imgsz, opt.batch_size, opt.conf) for w in opt.weights]
        n, stats = common_label_stats(ious)
        print(f"\nlabels every checkpoint finds (a conf>={opt.conf} same-class detection at IoU >= 0.5): {n} of "
              f"{len(ious[0])}\n{'checkpoint':{width}s} found  mean IoU  >=0.75  >=0.85")
        for name, v, (mean, shares) in zip(labels, ious, stats):
            print(f"{name:{width}s} {(v >= 0.5).mean():5.3f}  {mean:8.3f}  {shares[0]:6.3f}  {shares[1]:6.3f}")
        for (_, r), v, (mean, shares) in zip(rows, ious, stats):
            r.update(found=float((v >= 0.5).mean()), common=n, common_iou=mean, common_shares=shares)
    return rows


def label(weights: str) -> str:
    """The run's folder name for a run's weights/best.pt or last.pt, else the file name."""
    p = Path(weights)
    run = p.parent.parent.name if p.parent.name == "weights" and p.name in ("best.pt", "last.pt") else ""
    return run or p.name


if __name__ == "__main__":
    main()
