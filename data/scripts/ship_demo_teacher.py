"""Put a trained demo teacher into weights/ for demo.py and bench/kd_table.py to reuse.

Writes weights/demo_teacher_yolov5s_shapes128.pt (EMA weights in fp16, no optimizer: our weights-only checkpoint
format, see utils.checkpoint.strip_optimizer) and a .yaml beside it recording what it was trained on and how:
the dataset generator settings (the `download:` entry of the dataset YAML), model config, image size, epochs, the
training command and the float32 val.py scores. demo.py uses the teacher only when the generator settings, model
and image size it is run with match that record, and trains its own otherwise.

How the shipped teacher was made (about 300 epochs of yolov5s at 128 px; roughly 75 minutes on an idle 2-core CPU
with bf16 autocast):
    python train.py --cfg models/yolov5s.yaml --weights '' --data data/shapes.yaml --hyp data/hyps/hyp.demo.yaml \\
        --optimizer Adam --imgsz 128 --batch-size 16 --epochs 300 --linear-lr --seed 0 --cache ram \\
        --project runs/teacher --name demo_s128_e300
    python data/scripts/ship_demo_teacher.py runs/teacher/demo_s128_e300/weights/best.pt
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # a top-level script: make `utils` importable from any working directory

MAX_MB = 15.0  # what a repository can carry without LFS, and the limit


def parse_opt(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("weights", help="the teacher run's best.pt")
    p.add_argument("--data", default="data/shapes.yaml")
    p.add_argument("--out", default="", help="default: demo.SHIPPED_TEACHER")
    return p.parse_args(argv)


def command_line(opt: dict) -> str:
    """The train.py command that reproduces the run, from its recorded options."""
    keys = ("cfg", "data", "hyp", "optimizer", "imgsz", "batch_size", "epochs", "seed")
    args = " ".join(f"--{k.replace('_', '-')} {opt[k]}" for k in keys if opt.get(k) not in (None, ""))
    flags = " ".join(f"--{k.replace('_', '-')}" for k in ("linear_lr",) if opt.get(k))
    return f"python train.py --weights '' {args} {flags}".strip()


def main(opt) -> Path:
    import yaml

    import demo
    from utils.checkpoint import load_checkpoint, strip_optimizer
    from utils.general import yaml_load

    out = Path(opt.out) if opt.out else demo.SHIPPED_TEACHER
    out.parent.mkdir(parents=True, exist_ok=True)
    run_opt = load_checkpoint(opt.weights).get("opt") or {}
    strip_optimizer(opt.weights, out)
    size_mb = out.stat().st_size / 1e6
    if size_mb > MAX_MB:
        raise SystemExit(f"ERROR: {out} is {size_mb:.1f} MB, above {MAX_MB} MB; ship a smaller model")
    imgsz = int(run_opt.get("imgsz", 128))
    demo_args = demo.parse_opt(["--imgsz", str(imgsz), "--data", opt.data])
    m50, m = demo.evaluate(demo_args, out)
    data = yaml_load(ROOT / opt.data if (ROOT / opt.data).exists() else opt.data)
    record = {
        "generator": data.get("download"),
        "cfg": Path(run_opt.get("cfg") or "models/yolov5s.yaml").name,
        "imgsz": imgsz,
        "epochs": run_opt.get("epochs"),
        "command": command_line(run_opt),
        "val_mAP50": round(m50, 4),
        "val_mAP50_95": round(m, 4),
        "size_MB": round(size_mb, 2),
    }
    out.with_suffix(".yaml").write_text(
        "# The demo teacher beside this file: what it was trained on and how (data/scripts/ship_demo_teacher.py).\n"
        "# demo.py uses it only when the data's generator settings, the model and the image size match.\n"
        + yaml.safe_dump(record, sort_keys=False))
    print(f"{out} ({size_mb:.1f} MB): mAP@.5 {m50:.4f}, mAP@.5:.95 {m:.4f}")
    return out


if __name__ == "__main__":
    from utils.general import set_logging

    set_logging()
    main(parse_opt())
