"""Effect of utils.torch_utils.tune_cpu_allocator on CPU training steps: glibc defaults vs the tuned allocator.

The allocator setting is process-wide and cannot be undone, so each measurement runs in a fresh child process;
children alternate (default, tuned, tuned, default, ...) so that drifting machine load hits both alike. Every
child times a plain student step, the teacher forward and an output-KD step (round-robin after warm-up) and counts
the minor page faults per step; the parent prints the medians over children and the tuned/default ratios.

Usage:
    python bench/allocator.py                        # m->s, 320 px, batch 8, 4 children per setting
    python bench/allocator.py --pair s-n --children 2 --iters 3
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

VARIANTS = ("plain", "teacher", "kd")


def child(opt) -> None:
    """Times the variants in this process and prints one JSON line: {variant: [median s, faults per step]}."""
    import torch

    from bench._common import StepRunner, build_tasks, median, round_robin, synthetic_batch
    from utils.general import set_logging
    from utils.torch_utils import KEEP_MALLOC_ENV, tune_cpu_allocator

    set_logging(verbose=False)
    torch.set_num_threads(opt.threads)
    if opt.setting == "tuned" and not tune_cpu_allocator():
        raise SystemExit(f"tune_cpu_allocator() did not apply here (non-glibc, or {KEEP_MALLOC_ENV} is set)")
    device = torch.device("cpu")
    t_size, s_size = opt.pair.split("-")
    _, _, plain, tasks = build_tasks(t_size, s_size, opt.imgsz, device, ["kd"])
    imgs, targets = synthetic_batch(opt.batch_size, opt.imgsz, device)
    plain_step, kd_step = StepRunner(plain, device), StepRunner(tasks["kd"], device)
    calls = {"plain": lambda: plain_step(imgs, targets), "teacher": lambda: tasks["kd"].teacher_forward(imgs),
             "kd": lambda: kd_step(imgs, targets)}
    faults = {v: [] for v in VARIANTS}  # minor page faults of every call, warm-up rounds included

    def counting(v):
        def call():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            calls[v]()
            faults[v].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return call

    wall, _ = round_robin({v: counting(v) for v in VARIANTS}, device, opt.iters, opt.warmup)
    print("RESULT " + json.dumps({v: [median(wall[v]), median(faults[v][opt.warmup:])] for v in VARIANTS}))


def parent(opt) -> None:
    import torch

    from bench._common import load_line, machine_line, median, table
    from utils.torch_utils import KEEP_MALLOC_ENV

    print(machine_line(opt.threads, torch.device("cpu")))
    order = ["default", "tuned", "tuned", "default"] * ((opt.children + 1) // 2)
    results = {"default": [], "tuned": []}
    env = {k: v for k, v in os.environ.items() if k != KEEP_MALLOC_ENV}
    for i, setting in enumerate(order[:2 * opt.children]):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", setting, "--pair", opt.pair,
               "--imgsz", str(opt.imgsz), "--batch-size", str(opt.batch_size), "--iters", str(opt.iters),
               "--warmup", str(opt.warmup), "--threads", str(opt.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode or not lines:
            raise SystemExit(f"child {' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
        results[setting].append(json.loads(lines[-1][7:]))
        print(f"  child {i + 1}/{2 * opt.children} ({setting}) done", file=sys.stderr, flush=True)
    rows = []
    for v in VARIANTS:
        d = median([r[v][0] for r in results["default"]])
        t = median([r[v][0] for r in results["tuned"]])
        fd = median([r[v][1] for r in results["default"]])
        ft = median([r[v][1] for r in results["tuned"]])
        rows.append((v, f"{d * 1e3:.0f}", f"{t * 1e3:.0f}", f"{t / d:.2f}", f"{fd:.0f}", f"{ft:.0f}"))
    t_size, s_size = opt.pair.split("-")
    print(f"\nallocator, yolov5{t_size} -> yolov5{s_size}, {opt.imgsz} px, batch {opt.batch_size}: medians over "
          f"{opt.children} children per setting, each the median of {opt.iters} rounds after {opt.warmup} warm-up")
    print(table(("variant", "default ms", "tuned ms", "tuned/default", "faults/step default",
                 "faults/step tuned"), rows))
    print(load_line())


def parse_opt(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", default="m-s", help="teacher-student sizes, e.g. m-s or s-n")
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--children", type=int, default=4, help="child processes per setting")
    p.add_argument("--iters", type=int, default=4, help="timed rounds per child")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", dest="setting", choices=("default", "tuned"), default=None, help=argparse.SUPPRESS)
    opt = p.parse_args(argv)
    if opt.pair.count("-") != 1 or any(s not in "nsmlx" or len(s) != 1 for s in opt.pair.split("-")):
        p.error(f"--pair {opt.pair}: use two sizes from n s m l x joined by '-', e.g. m-s")
    return opt


if __name__ == "__main__":
    o = parse_opt()
    child(o) if o.setting else parent(o)
