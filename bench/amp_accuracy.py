"""Does mixed precision cost accuracy? The same recipe trained in float32 (--no-amp) and with bf16 autocast (--amp),
3 seeds each, every best.pt scored by the same float32 val.py run; prints mean +- sd per precision.

The recipe is the demo's student (yolov5n from scratch on the bundled shapes data, 128 px, batch 16, Adam,
hyp.demo.yaml, linear LR). Finished cells are appended to --csv as they finish and skipped on the next call, so
the table can be completed over several sittings; the runs live under --project.

Usage:
    python bench/amp_accuracy.py                         # 6 runs of 15 epochs (about 25 minutes on 2 cores)
    python bench/amp_accuracy.py --epochs 2 --seeds 0 --csv /tmp/a.csv --project /tmp/amp   # quick try
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from bench._common import append_row, read_rows, table  # noqa: E402
from utils.general import set_logging  # noqa: E402

FIELDS = ("precision", "seed", "epochs", "map50", "map", "train_s")
PRECISIONS = {"fp32": False, "bf16": True}  # value of --amp


def parse_opt(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--cfg", default="models/yolov5n.yaml")
    p.add_argument("--imgsz", type=int, default=128)
    p.add_argument("--csv", default=str(ROOT / "bench/results/amp_accuracy.csv"))
    p.add_argument("--project", default=str(ROOT / "runs/bench_amp"))
    return p.parse_args(argv)


def train_cell(opt, precision: str, seed: int) -> dict:
    import train
    import val

    start = time.perf_counter()
    run = train.run(data="data/shapes.yaml", cfg=opt.cfg, weights="", hyp="data/hyps/hyp.demo.yaml",
                    optimizer="Adam", linear_lr=True, imgsz=opt.imgsz, batch_size=16, epochs=opt.epochs, workers=2,
                    device="cpu", project=opt.project, name=f"{precision}_seed{seed}_e{opt.epochs}", exist_ok=True,
                    seed=seed, noval=True, amp=PRECISIONS[precision])
    seconds = time.perf_counter() - start
    results, _, _ = val.run(data="data/shapes.yaml", weights=str(Path(run.save_dir) / "weights" / "best.pt"),
                            imgsz=opt.imgsz, batch_size=32, device="cpu", workers=2, plots=False, half=False,
                            project=opt.project, name="val", exist_ok=True)
    return {"precision": precision, "seed": seed, "epochs": opt.epochs, "map50": f"{results[2]:.5f}",
            "map": f"{results[3]:.5f}", "train_s": f"{seconds:.0f}"}


def report(rows: list, epochs: int) -> str:
    lines = []
    by = {p: [r for r in rows if r["precision"] == p and int(r["epochs"]) == epochs] for p in PRECISIONS}
    cells = []
    for p, rs in by.items():
        if not rs:
            continue
        m50, m = [float(r["map50"]) for r in rs], [float(r["map"]) for r in rs]
        sd = (lambda v: statistics.stdev(v) if len(v) > 1 else float("nan"))
        cells.append((p, len(rs), f"{statistics.mean(m50):.4f} +- {sd(m50):.4f}",
                      f"{statistics.mean(m):.4f} +- {sd(m):.4f}",
                      ", ".join(f"{float(r['map']):.4f}" for r in sorted(rs, key=lambda r: int(r["seed"]))),
                      f"{statistics.mean(float(r['train_s']) for r in rs):.0f}"))
    lines.append(table(("precision", "seeds", "mAP@.5", "mAP@.5:.95", "mAP@.5:.95 per seed", "train s"), cells))
    if all(len(by[p]) > 1 for p in PRECISIONS):
        maps = {p: [float(r["map"]) for r in by[p]] for p in PRECISIONS}
        diff = statistics.mean(maps["bf16"]) - statistics.mean(maps["fp32"])
        spread = max(statistics.stdev(v) for v in maps.values())
        verdict = "within" if abs(diff) <= spread else "OUTSIDE"
        lines.append(f"bf16 - fp32 mean mAP@.5:.95: {diff:+.4f}; largest seed-to-seed sd {spread:.4f}: {verdict} "
                     f"the spread")
    return "\n".join(lines)


def main(opt) -> list:
    path = Path(opt.csv)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = read_rows(path)
    have = {(r["precision"], int(r["seed"]), int(r["epochs"])) for r in rows}
    for seed in opt.seeds:
        for precision in PRECISIONS:
            if (precision, seed, opt.epochs) in have:
                continue
            row = train_cell(opt, precision, seed)
            append_row(path, row, FIELDS)
            rows.append(row)
            print(f"done: {row}", flush=True)
    print(f"\n{Path(opt.cfg).stem}, {opt.imgsz} px, {opt.epochs} epochs, Adam, hyp.demo.yaml; best.pt scored by "
          f"val.py in float32\n" + report(rows, opt.epochs))
    return rows


if __name__ == "__main__":
    set_logging()
    main(parse_opt())
