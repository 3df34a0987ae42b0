"""A train_kd.py step against the same step in the original KD scripts' style, in one process, round-robin.

  original   float32 student; float32 teacher left in train mode (BatchNorm normalises with each batch's own
             statistics, as the original scripts ran it), unfused, under no_grad
  ours       what train_kd.py runs on this machine: mixed precision chosen automatically (bf16 autocast on CPUs
             with native bf16, fp16 on CUDA), student and teacher channels_last, teacher fused, eval mode and cast
             to the reduced precision

Both distil the same way (output KD l2 + attention transfer on the automatically paired layers, the default of
train_kd.py) from the same random-init teacher into the same student weights, and both include forward, losses,
backward and the SGD step. Prints medians and ours / original; target: <= 0.50 for m->s at 320 px, batch 8.

Usage:
    python bench/kd_speedup.py                      # m->s, 320 px, batch 8, 6 rounds after 2 warm-up
    python bench/kd_speedup.py --pair s-n --imgsz 128 --iters 2 --warmup 1   # quick try
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

import torch  # noqa: E402

from bench._common import (StepRunner, build_student, build_teacher, load_line, machine_line, median,  # noqa: E402
                           round_robin, synthetic_batch, table)
from utils.general import set_logging  # noqa: E402

TARGET = 0.50


def parse_opt(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", default="m-s", help="teacher-student sizes, e.g. m-s, l-s, s-n")
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def original_style_teacher(teacher_size: str, names) -> torch.nn.Module:
    """An unfused float32 teacher whose BatchNorm layers stay in train mode; only Detect is switched to return
    the raw maps (as ``(None, maps)``) the way the KD task reads them."""
    from models.yolo import Model

    teacher = Model(str(ROOT / f"models/yolov5{teacher_size}.yaml"), nc=len(names)).requires_grad_(False)
    teacher.names = list(names)
    teacher.train()
    teacher.model[-1].eval()
    teacher.model[-1].decode = False
    return teacher


def build_task(student, teacher, teacher_in_train_mode: bool):
    from types import SimpleNamespace

    from utils.kd.distiller import KDConfig
    from utils.kd.task import DistillationTask, check_teacher, kd_pairs

    cfg = KDConfig(feat_losses=("at",))
    check_teacher(student, teacher)
    task = DistillationTask(student, teacher, cfg, kd_pairs(student, teacher, cfg, imgsz=64))
    task.setup(SimpleNamespace(hyp=student.hyp))
    task.on_epoch_start(0, 10)  # sets the teacher to eval mode ...
    if teacher_in_train_mode:  # ... which the original scripts never did
        teacher.train()
        teacher.model[-1].eval()
    return task


def main(opt) -> float:
    from utils.torch_utils import select_precision

    torch.set_num_threads(opt.threads)
    device = torch.device("cpu")
    t_size, s_size = opt.pair.replace("->", "-").split("-")
    ours_precision = select_precision(device)
    print(machine_line(opt.threads, device) + f", ours: {ours_precision.name}")
    torch.manual_seed(0)
    base = build_student(f"models/yolov5{s_size}.yaml", opt.imgsz, device)
    students = {"original": base, "ours": copy.deepcopy(base)}
    with tempfile.TemporaryDirectory() as tmp:
        ours_teacher = build_teacher(t_size, device, tmp, base.names, precision=ours_precision)
    original_teacher = original_style_teacher(t_size, base.names)
    tasks = {"original": build_task(students["original"], original_teacher, True),
             "ours": build_task(students["ours"], ours_teacher, False)}
    runners = {"original": StepRunner(tasks["original"], device, precision=select_precision(device, False)),
               "ours": StepRunner(tasks["ours"], device, precision=ours_precision)}
    imgs, targets = synthetic_batch(opt.batch_size, opt.imgsz, device)
    wall, _ = round_robin({k: (lambda r=r: r(imgs, targets)) for k, r in runners.items()}, device, opt.iters,
                          opt.warmup)
    print(load_line())
    print(f"\nKD step {t_size}->{s_size}, output KD l2 + at, {opt.imgsz} px, batch {opt.batch_size}, "
          f"{opt.iters} rounds after {opt.warmup} warm-up")
    rows = [(k, f"{median(v):.3f}", f"{min(v):.3f}", f"{max(v):.3f}") for k, v in wall.items()]
    print(table(("step", "median s", "min s", "max s"), rows))
    ratio = median(wall["ours"]) / median(wall["original"])
    verdict = "met" if ratio <= TARGET else "MISSED"
    print(f"ours / original style: {ratio:.2f} (target <= {TARGET:.2f}: {verdict})")
    return ratio


if __name__ == "__main__":
    set_logging()
    main(parse_opt())
