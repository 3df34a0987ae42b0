"""Cost of a distillation training step compared with a plain one, per teacher->student pair and KD method.

For each pair it times, in one process and round-robin (every variant once per round, after warm-up):
  plain      student step: forward + ComputeLoss + backward + SGD step (DetectionTask, smart_optimizer)
  teacher    DistillationTask.teacher_forward alone (fused, no_grad; fp16 + channels_last on CUDA)
  kd         full KD step, output KD only; kd+<feat>: output KD + one feature loss
and prints medians, T_kd / T_plain beside the FLOP floor 1 + F_teacher / (3 F_student), and the KD overhead
beyond the teacher forward, (T_kd - T_plain - T_teacher) / T_plain, as the median of per-round values, from wall
time ('overhead') and from process CPU time ('overhead CPU', steadier when other processes share the cores).
Target: <= 10% ('met' when both agree, 'MISSED' when both exceed it, 'unclear' otherwise).
Before timing, one step of every KD variant checks the teacher discipline: no gradients on teacher parameters,
teacher outputs without autograd graph, freed as soon as the step returns, no hooks left behind.

Usage:
    python bench/kd_step.py                                   # m->s l->s s->n at 320 px (and 640 on CUDA)
    python bench/kd_step.py --pairs m-s --imgsz 64 --iters 2  # quick try
    python bench/kd_step.py --memory                          # peak memory, plain vs KD, one child per variant
"""
from __future__ import annotations

import argparse
import gc
import re
import subprocess
import sys
import weakref
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # a top-level script: make `utils` and `bench` importable from anywhere

import torch  # noqa: E402

from bench._common import (FEATURES, StepRunner, build_tasks, load_line, machine_line, median,  # noqa: E402
                           peak_memory_mb, round_robin, synthetic_batch, table)
from utils.general import set_logging  # noqa: E402

TARGET = 0.10  # allowed KD overhead beyond the teacher forward, as a fraction of T_plain


def parse_pair(text: str) -> tuple:
    m = re.fullmatch(r"\s*([nsmlx])\s*(?:->|-|:|,)\s*([nsmlx])\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"pair '{text}' must look like m->s or m-s (sizes n, s, m, l, x)")
    return m.group(1), m.group(2)


def variant_names(methods) -> list:
    return ["kd"] + [f"kd+{f}" for f in methods]


def watch_teacher(task):
    """Wrap task.teacher_forward (instance attribute) to record weak references and graph flags of its outputs."""
    seen = {"refs": [], "graph": False}
    original = task.teacher_forward

    def watched(imgs):
        maps, feats = original(imgs)
        for t in [*maps, *feats]:
            seen["refs"].append(weakref.ref(t))
            seen["graph"] |= t.grad_fn is not None or t.requires_grad
        return maps, feats

    task.teacher_forward = watched
    return seen


def check_discipline(tasks, runners, imgs, targets) -> list:
    """One step of each KD variant with the teacher watched. Returns failure messages (empty when all is well)."""
    failures = []
    for name, task in tasks.items():
        seen = watch_teacher(task)
        try:
            runners[name](imgs, targets)
        finally:
            del task.teacher_forward  # back to the class method
        teacher = task.teacher
        if any(p.grad is not None for p in teacher.parameters()):
            failures.append(f"{name}: teacher parameters received .grad")
        if any(p.requires_grad for p in teacher.parameters()):
            failures.append(f"{name}: teacher parameters require grad")
        if teacher.training:
            failures.append(f"{name}: teacher is in train mode")
        if seen["graph"]:
            failures.append(f"{name}: teacher outputs carry an autograd graph")
        if not seen["refs"]:
            failures.append(f"{name}: teacher_forward was not called")
        if any(r() is not None for r in seen["refs"]):
            gc.collect()
            alive = sum(r() is not None for r in seen["refs"])
            failures.append(f"{name}: teacher outputs outlive the step ({alive} still alive after gc)"
                            if alive else f"{name}: teacher outputs are freed only by the garbage collector")
        if any(m._forward_hooks or m._forward_pre_hooks for m in [*teacher.modules(), *task.model.modules()]):
            failures.append(f"{name}: forward hooks left on the teacher or student")
    return failures


def overheads(times, name) -> float:
    """Median over rounds of (T_kd - T_plain - T_teacher) / T_plain, each round's three values paired."""
    return median([(k - p - t) / p for k, p, t in zip(times[name], times["plain"], times["teacher"])])


def verdict(wall: float, cpu: float) -> str:
    if wall <= TARGET and cpu <= TARGET:
        return "met"
    return "MISSED" if wall > TARGET and cpu > TARGET else "unclear"


def report(wall, cpu, methods, flops_t, flops_s) -> str:
    """Table of median wall times, ratios, FLOP floor and the KD overhead in wall and in process CPU time."""
    t_plain, t_teach = median(wall["plain"]), median(wall["teacher"])
    floor = 1 + flops_t / (3 * flops_s)
    rows = [("plain", f"{t_plain * 1e3:.0f}", f"{min(wall['plain']) * 1e3:.0f}", "1.00", "-", "-", "-", "-"),
            ("teacher fwd", f"{t_teach * 1e3:.0f}", f"{min(wall['teacher']) * 1e3:.0f}", f"{t_teach / t_plain:.2f}",
             f"({floor - 1:.2f})", "-", "-", "-")]
    for name in variant_names(methods):
        t_kd, o_wall, o_cpu = median(wall[name]), overheads(wall, name), overheads(cpu, name)
        rows.append((name, f"{t_kd * 1e3:.0f}", f"{min(wall[name]) * 1e3:.0f}", f"{t_kd / t_plain:.2f}",
                     f"{floor:.2f}", f"{o_wall:+.1%}", f"{o_cpu:+.1%}", verdict(o_wall, o_cpu)))
    header = ("variant", "median ms", "min ms", "x T_plain", "FLOP floor", "overhead", "overhead CPU",
              f"<= {TARGET:.0%}")
    return table(header, rows)


def bench_pair(opt, pair, imgsz, device) -> list:
    """Time one pair at one size; prints the table and returns discipline failures."""
    from utils.torch_utils import count_flops

    t_size, s_size = pair
    names = variant_names(opt.methods)
    student, teacher, plain, tasks = build_tasks(t_size, s_size, imgsz, device, names)
    imgs, targets = synthetic_batch(opt.batch_size, imgsz, device)
    flops_t, flops_s = count_flops(teacher, imgsz), count_flops(student, imgsz)
    runners = {"plain": StepRunner(plain, device), **{n: StepRunner(t, device) for n, t in tasks.items()}}
    runners["plain"](imgs, targets)
    failures = check_discipline(tasks, runners, imgs, targets)  # also the first warm-up round
    variants = {n: (lambda r=r: r(imgs, targets)) for n, r in runners.items()}
    variants["teacher"] = lambda: tasks["kd"].teacher_forward(imgs)
    rounds = max(opt.warmup - 1, 0) + opt.iters
    progress = lambda r: print(f"  round {r + 1}/{rounds}", file=sys.stderr, flush=True)  # noqa: E731
    wall, cpu = round_robin(variants, device, opt.iters, max(opt.warmup - 1, 0), on_round=progress)
    print(f"\npair {t_size}->{s_size}: teacher yolov5{t_size} {flops_t:.2f} GFLOPs (fused), student "
          f"yolov5{s_size} {flops_s:.2f} GFLOPs, {imgsz} px, batch {opt.batch_size}, {opt.iters} timed rounds "
          f"after {opt.warmup} warm-up")
    for label, layer_pairs in pairs_by_kind(tasks):
        print(f"{label}: {len(layer_pairs)} layer pairs (student <- teacher channels: "
              f"{', '.join(f'{p.s_channels}<-{p.t_channels}' for p in layer_pairs)})")
    adapters = adapter_gflops(tasks, imgsz)
    if adapters:
        print(f"adapters of ft/cwd/mimic: {adapters:.2f} GFLOPs = {adapters / flops_s:.0%} of the student forward")
    print(report(wall, cpu, opt.methods, flops_t, flops_s))
    print("teacher discipline: " + ("ok (no grads, no graph, outputs freed after each step, no hooks)"
                                    if not failures else "FAILED\n  " + "\n  ".join(failures)))
    return failures


def pairs_by_kind(tasks) -> list:
    """[(label, pairs)] once per distinct pairing: adapter-free losses (at, at_masked) and adapter losses differ."""
    seen = {}
    for name, task in tasks.items():
        pairs = task.distiller.pairs
        if pairs:
            key = tuple((p.s_name, p.t_name) for p in pairs)
            seen.setdefault(key, (pairs, []))[1].append(name.split("+", 1)[1])
    return [(", ".join(names), pairs) for pairs, names in seen.values()]


def adapter_gflops(tasks, imgsz: int) -> float:
    """Forward GFLOPs per image of the 1x1 conv + BatchNorm adapters (ft, cwd, mimic), counted like count_flops."""
    for task in tasks.values():
        adapters = task.distiller.adapters
        if len(adapters):
            return sum((2 * p.s_channels * p.t_channels + 4 * p.t_channels) * (imgsz // p.stride) ** 2
                       for i, p in enumerate(task.distiller.pairs) if str(i) in adapters) / 1e9
    return 0.0


def run_only(opt, device) -> None:
    """Child of --memory: steps of one variant, then a 'PEAK_MB <value>' line."""
    (t_size, s_size), imgsz = opt.pairs[0], opt.imgsz[0]
    kd_names = [] if opt.only == "plain" else [opt.only]
    student, teacher, plain, tasks = build_tasks(t_size, s_size, imgsz, device, kd_names)
    task = plain if opt.only == "plain" else tasks[opt.only]
    runner = StepRunner(task, device)
    imgs, targets = synthetic_batch(opt.batch_size, imgsz, device)
    gc.collect()
    cuda = device.type == "cuda"
    setup = torch.cuda.memory_allocated(device) / 2 ** 20 if cuda else peak_memory_mb(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(opt.warmup + opt.iters):
        runner(imgs, targets)
    print(f"PEAK_MB {peak_memory_mb(device):.1f} SETUP_MB {setup:.1f}")


def run_memory(opt, device) -> None:
    """Peak memory per variant, each measured in its own child process (RSS peaks cannot be reset)."""
    cuda = device.type == "cuda"
    kind = "CUDA max_memory_allocated during the steps" if cuda else "peak RSS (ru_maxrss) of the whole process"
    before = "allocated before steps" if cuda else "peak RSS before steps"
    for pair in opt.pairs:
        for imgsz in opt.imgsz:
            rows, base = [], None
            for variant in ("plain", "kd", "kd+all"):
                peak, setup = memory_child(opt, pair, imgsz, variant)
                base = peak if base is None else base
                rows.append((variant, f"{peak:.0f}", f"{peak - base:+.0f}", f"{setup:.0f}"))
            print(f"\nmemory {pair[0]}->{pair[1]}, {imgsz} px, batch {opt.batch_size}: {kind}, MB, after "
                  f"{opt.warmup} + {opt.iters} steps (kd+all = output KD + {', '.join(FEATURES)})")
            print(table(("variant", "peak MB", "vs plain", before), rows))


def memory_child(opt, pair, imgsz, variant) -> tuple:
    """(peak MB, MB before the steps) of `kd_step.py --only variant` run in a fresh interpreter."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--only", variant, "--pairs", f"{pair[0]}-{pair[1]}",
           "--imgsz", str(imgsz), "--batch-size", str(opt.batch_size), "--threads", str(opt.threads),
           "--device", opt.device, "--iters", str(opt.iters), "--warmup", str(opt.warmup)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    found = re.findall(r"PEAK_MB ([\d.]+) SETUP_MB ([\d.]+)", out.stdout)
    if out.returncode or not found:
        raise RuntimeError(f"memory child {' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return float(found[-1][0]), float(found[-1][1])


def parse_opt(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=parse_pair, nargs="+", default=[("m", "s"), ("l", "s"), ("s", "n")],
                   help="teacher->student pairs, e.g. m->s l-s s:n")
    p.add_argument("--imgsz", type=int, nargs="+", default=None, help="image sizes (default 320, +640 on CUDA)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--iters", type=int, default=5, help="timed rounds")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (the first also checks the teacher)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--device", default="", help="'' (CUDA when available), cpu, 0, ...")
    p.add_argument("--methods", nargs="+", choices=FEATURES, default=list(FEATURES), help="feature losses")
    p.add_argument("--memory", action="store_true", help="measure peak memory (child processes) instead of time")
    p.add_argument("--only", choices=("plain", "kd", "kd+all"), default=None, help=argparse.SUPPRESS)
    opt = p.parse_args(argv)
    if opt.iters < 1:
        p.error("--iters must be at least 1")
    return opt


def main(opt) -> int:
    from utils.torch_utils import select_device, tune_cpu_allocator

    set_logging(verbose=False)  # the table is the output; per-task optimizer lines would bury it
    torch.set_num_threads(opt.threads)
    device = select_device(opt.device)
    tuned = tune_cpu_allocator(device)  # as the engine does
    opt.imgsz = opt.imgsz or ([320, 640] if device.type == "cuda" else [320])
    if opt.only:
        run_only(opt, device)
        return 0
    print(machine_line(opt.threads, device, tuned))
    if opt.memory:
        run_memory(opt, device)
        print(load_line())
        return 0
    failures = []
    for pair in opt.pairs:
        for imgsz in opt.imgsz:
            failures += bench_pair(opt, pair, imgsz, device)
    print(load_line())
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(parse_opt()))
