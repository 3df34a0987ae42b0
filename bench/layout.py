"""Float32 on the CPU: default (NCHW) memory layout against channels_last, for the steps a run spends its time in.

The engine runs every CPU run channels_last (utils.torch_utils.select_precision), in float32 as in bf16. This
script is the measurement behind that choice. For each case it builds the same networks twice (same seed), one
set in each layout, and times them round-robin in one process (each variant once per round, after warm-up):
  plain   student training step (forward + ComputeLoss + backward + SGD step), as bench/kd_step.py's
  kd      the same with a frozen teacher and output KD + attention transfer (train_kd.py's defaults)
  infer   the fused student in eval mode under no_grad (what val.py and detect.py run)
It prints medians and the ratio channels_last / default per case, from wall time and from process CPU time.

Usage:
    python bench/layout.py                        # s->n at 128 px (the demo), s->n and m->s at 320 px
    python bench/layout.py --cases n:s:128:16 --iters 3 --warmup 1 --threads 1   # quick try
"""
from __future__ import annotations

import argparse
import sys
from copy import deepcopy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # a top-level script: make `utils` and `bench` importable from anywhere

import torch  # noqa: E402

from bench._common import (StepRunner, build_tasks, load_line, machine_line, median, round_robin,  # noqa: E402
                           synthetic_batch, table)
from utils.general import set_logging  # noqa: E402
from utils.torch_utils import Precision  # noqa: E402

LAYOUTS = {"default": False, "channels_last": True}
HEADER = ("case", "px", "batch", "default s", "channels_last s", "ratio wall", "ratio CPU")


def parse_case(text: str) -> tuple:
    """'student:teacher:imgsz:batch', e.g. 'n:s:128:16'."""
    student, teacher, imgsz, batch = text.split(":")
    return student, teacher, int(imgsz), int(batch)


def variants_for(student_size: str, teacher_size: str, imgsz: int, batch: int, device: torch.device) -> dict:
    """{(step, layout): zero-argument callable} for one case; each layout gets its own copy of the networks."""
    imgs, targets = synthetic_batch(batch, imgsz, device)
    out = {}
    for layout, channels_last in LAYOUTS.items():
        precision = Precision(device.type, None, channels_last=channels_last)
        student, teacher, plain, tasks = build_tasks(teacher_size, student_size, imgsz, device, ["kd+at"])
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        teacher.to(memory_format=memory_format)  # build_teacher leaves it in the engine's layout
        runners = {"plain": StepRunner(plain, device, precision=precision),
                   "kd": StepRunner(tasks["kd+at"], device, precision=precision)}
        with torch.no_grad():
            fused = deepcopy(student).eval().fuse()
        fused.to(memory_format=memory_format)
        for step, runner in runners.items():
            out[(step, layout)] = lambda runner=runner: runner(imgs, targets)

        def infer(fused=fused, precision=precision):
            with torch.no_grad():
                fused(precision.to_input(imgs))

        out[("infer", layout)] = infer
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=parse_case, nargs="+",
                   default=[("n", "s", 128, 16), ("n", "s", 320, 8), ("s", "m", 320, 8)],
                   help="student:teacher:imgsz:batch (model sizes n s m l x)")
    p.add_argument("--iters", type=int, default=6, help="timed rounds")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    opt = p.parse_args(argv)
    set_logging(verbose=False)
    torch.set_num_threads(opt.threads)
    device = torch.device("cpu")
    print(machine_line(opt.threads, device))
    rows = []
    for student, teacher, imgsz, batch in opt.cases:
        variants = variants_for(student, teacher, imgsz, batch, device)
        wall, cpu = round_robin(variants, device, opt.iters, opt.warmup)
        for step in ("plain", "kd", "infer"):
            w0, w1 = median(wall[(step, "default")]), median(wall[(step, "channels_last")])
            c0, c1 = median(cpu[(step, "default")]), median(cpu[(step, "channels_last")])
            name = f"yolov5{student}" + (f" <- yolov5{teacher}" if step == "kd" else "")
            rows.append((f"{name} {step}", imgsz, batch, f"{w0:.3f}", f"{w1:.3f}", f"{w1 / w0:.2f}", f"{c1 / c0:.2f}"))
        print(table(HEADER, rows[-3:]), flush=True)
    print("\nfloat32, medians of", opt.iters, "rounds; ratio = channels_last / default (below 1: channels_last faster)")
    print(table(HEADER, rows))
    print(load_line())


if __name__ == "__main__":
    main()
