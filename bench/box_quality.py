"""How precise are the boxes a detector finds? mAP@.5:.95 mixes finding objects with placing boxes; this splits them.

For each checkpoint, scored on the same val split as val.py scores it (same NMS, same matching):
  - AP at each IoU threshold 0.50, 0.55, ..., 0.95 (their mean is mAP@.5:.95);
  - among its confident detections (conf >= --conf) that are true positives at IoU 0.5, the share that are still
    true positives at each stricter threshold: 1.0 at 0.5 by definition, then falling. A model whose shares fall
    faster places its boxes less precisely, whatever its recall.

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
    return rows


def label(weights: str) -> str:
    """The run's folder name for a run's weights/best.pt or last.pt, else the file name."""
    p = Path(weights)
    run = p.parent.parent.name if p.parent.name == "weights" and p.name in ("best.pt", "last.pt") else ""
    return run or p.name


if __name__ == "__main__":
    main()
