"""Whole-process train.py wall time: mixed precision (the automatic choice) against a float32 baseline, alternating.

Each round runs ``python train.py`` once per configuration in a fresh process (start-up, data loading, every
validation, plots and checkpoints included), configurations in turn so that drifts of the machine hit both alike,
and prints every time, the medians and their ratio. The default run is the one YOLOv5 v6.0 was timed with on this
machine class (yolov5s from scratch, 2 epochs of the 600 shapes images at 256 px, batch 16, 2 workers, validation
after each epoch): v6.0's own train.py took 86.6 s there, our float32 baseline (``--no-amp``) is the same recipe
as v6.0 run in float32, so the ratio printed is also the figure to hold against v6.0.

Usage:
    python bench/train_run.py                           # 3 rounds of --amp vs --no-amp (about 7 minutes)
    python bench/train_run.py --rounds 1 --epochs 1     # quicker, noisier
    python bench/train_run.py --kd-teacher runs/demo/teacher/weights/best.pt --cfg models/yolov5n.yaml
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

import torch  # noqa: E402

from bench._common import load_line, machine_line, median, table  # noqa: E402

V60_RUN_S = 86.6  # YOLOv5 v6.0's train.py on the default run, this machine class (the speed issue's measurement)
CONFIGS = {"amp": ["--amp"], "no-amp": ["--no-amp"]}


def parse_opt(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cfg", default="models/yolov5s.yaml")
    p.add_argument("--data", default="data/shapes.yaml")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--imgsz", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--kd-teacher", default="", help="time train_kd.py with this teacher instead of train.py")
    return p.parse_args(argv)


def command(opt, config: str, project: Path) -> list:
    script = "train_kd.py" if opt.kd_teacher else "train.py"
    cmd = [sys.executable, str(ROOT / script), "--data", opt.data, "--cfg", opt.cfg, "--weights", "",
           "--epochs", str(opt.epochs), "--img", str(opt.imgsz), "--batch-size", str(opt.batch_size),
           "--workers", str(opt.workers), "--device", "cpu", "--project", str(project), "--name", config,
           *CONFIGS[config]]
    return cmd + (["--teacher_weight", opt.kd_teacher] if opt.kd_teacher else [])


def run_once(cmd: list) -> float:
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return seconds


def main(opt) -> dict:
    print(machine_line(torch.get_num_threads(), torch.device("cpu")))
    from utils.datasets import check_dataset

    check_dataset(opt.data)  # generate the shapes data before the first timed run
    times = {c: [] for c in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(opt.rounds):
            for config in CONFIGS:
                times[config].append(run_once(command(opt, config, Path(tmp) / f"round{r}")))
                print(f"round {r}: {config} {times[config][-1]:.1f} s", flush=True)
    print(load_line())
    what = f"{'train_kd.py' if opt.kd_teacher else 'train.py'} {Path(opt.cfg).stem}, {opt.epochs} epochs, " \
           f"{opt.imgsz} px, batch {opt.batch_size}, {opt.workers} workers"
    print(f"\nwhole-process wall time, {what}, {opt.rounds} alternating rounds")
    rows = [(c, *(f"{t:.1f}" for t in times[c]), f"{median(times[c]):.1f}") for c in CONFIGS]
    print(table(("config", *(f"round {r}" for r in range(opt.rounds)), "median s"), rows))
    ratio = median(times["amp"]) / median(times["no-amp"])
    print(f"amp / no-amp (float32): {ratio:.2f}")
    default = (opt.cfg, opt.epochs, opt.imgsz, opt.batch_size, opt.workers, opt.kd_teacher) == (
        "models/yolov5s.yaml", 2, 256, 16, 2, "")
    if default:
        v60 = median(times["amp"]) / V60_RUN_S
        print(f"amp / YOLOv5 v6.0's {V60_RUN_S} s: {v60:.2f} (target <= 0.50: {'met' if v60 <= 0.5 else 'MISSED'})")
    return times


if __name__ == "__main__":
    main(parse_opt())
