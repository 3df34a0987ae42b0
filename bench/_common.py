"""Helpers shared by the bench scripts: synthetic batches, a training step like the engine's, timing, tables.

Import it from a bench script after putting the repository root on sys.path (the scripts do that themselves).
"""
from __future__ import annotations

import csv
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
HYP_FILE = ROOT / "data" / "hyps" / "hyp.scratch.yaml"
NC = 10  # class count of the bundled shapes data (data/shapes.yaml)
FEATURES = ("at", "at_masked", "ft", "cwd", "mimic")  # feature losses of utils.kd.losses, in bench order


def machine_line(threads: int, device: torch.device, tuned_allocator: bool | None = None) -> str:
    """One line naming what the figures were measured on: CPUs, threads, torch, device, allocator, load average."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    wait = os.environ.get("OMP_WAIT_POLICY", "unset")  # spinning OpenMP threads suffer badly on a shared machine
    alloc = "" if tuned_allocator is None else f", malloc {'tuned' if tuned_allocator else 'glibc defaults'}"
    return (f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {threads} torch threads "
            f"(OMP_WAIT_POLICY {wait}){alloc}, device {device} ({where}), load average {load:.1f} at start")


def load_line() -> str:
    """The 1-minute load average now (other processes share the cores: a load above the core count means
    every figure printed was slowed by them; the ratios less so, since variants alternate)."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return f"load average at end: {load[0]:.1f} (1 min), {load[1]:.1f} (5 min) on {os.cpu_count()} CPUs"


def load_hyp(nl: int, nc: int, imgsz: int) -> dict:
    """hyp.scratch.yaml with the engine's gain scaling (levels, classes, image size) and no label smoothing."""
    from utils.general import yaml_load
    from utils.loss import scale_hyp_gains

    return scale_hyp_gains({**yaml_load(HYP_FILE), "label_smoothing": 0.0}, nl, nc, imgsz)


def build_student(cfg: str, imgsz: int, device: torch.device, nc: int = NC) -> nn.Module:
    """A randomly initialised training model with the attributes the trainer attaches (hyp, gr, nc, names)."""
    from models.yolo import Model

    model = Model(str(ROOT / cfg), ch=3, nc=nc).to(device).train()
    model.hyp = load_hyp(model.model[-1].nl, nc, imgsz)
    model.gr = 1.0
    model.nc = nc
    model.names = [f"class{i}" for i in range(nc)]
    return model


def build_teacher(size: str, device: torch.device, tmp, names, precision=None) -> nn.Module:
    """A random-init yolov5{size} teacher saved as a checkpoint into folder tmp and loaded back through
    load_teacher, as train_kd.py does (fused, eval, no grad), cast for precision (a utils.torch_utils.Precision;
    default fp16 + channels_last on CUDA, float32 on the CPU, like StepRunner's default)."""
    from models.yolo import Model
    from utils.checkpoint import build_checkpoint, save_checkpoint
    from utils.kd.task import load_teacher, teacher_precision
    from utils.torch_utils import select_precision

    source = Model(str(ROOT / f"models/yolov5{size}.yaml"), ch=3, nc=NC)
    source.names = list(names)
    path = save_checkpoint(build_checkpoint(source), Path(tmp) / f"yolov5{size}_teacher.pt")
    precision = precision or select_precision(device, device.type == "cuda")
    return teacher_precision(load_teacher(str(path), device), precision)


def build_tasks(teacher_size: str, student_size: str, imgsz: int, device: torch.device, variants) -> tuple:
    """The student, a plain task and one DistillationTask per KD variant, all sharing the student and teacher.

    Args:
        teacher_size, student_size: 'n', 's', 'm', 'l' or 'x' (models/yolov5{size}.yaml, nc=NC).
        variants: KD variant names: 'kd' (output KD only), 'kd+<feature loss>', or 'kd+all' (every feature loss).

    Returns:
        (student, teacher or None when variants is empty, DetectionTask, {variant: DistillationTask}).
    """
    from utils.engine import DetectionTask
    from utils.kd.distiller import KDConfig
    from utils.kd.task import DistillationTask, check_teacher, kd_pairs

    torch.manual_seed(0)
    student = build_student(f"models/yolov5{student_size}.yaml", imgsz, device)
    plain = DetectionTask(student)
    plain.setup(None)
    if not variants:
        return student, None, plain, {}
    with tempfile.TemporaryDirectory() as tmp:
        teacher = build_teacher(teacher_size, device, tmp, student.names)
    check_teacher(student, teacher)
    tasks = {}
    for name in variants:
        feats = tuple(FEATURES) if name == "kd+all" else tuple(name.split("+")[1:])
        cfg = KDConfig(feat_losses=feats)
        # the layers train_kd.py pairs for these losses, probed at the trainer's size (2 x largest stride)
        task = DistillationTask(student, teacher, cfg, kd_pairs(student, teacher, cfg, imgsz=64))
        task.setup(SimpleNamespace(hyp=student.hyp))
        task.on_epoch_start(0, 10)
        tasks[name] = task
    return student, teacher, plain, tasks


def synthetic_batch(batch_size: int, imgsz: int, device: torch.device, nc: int = NC, boxes_per_image: int = 4,
                    seed: int = 0):
    """Random images and a fixed set of random targets.

    Returns:
        imgs (batch_size, 3, imgsz, imgsz) float 0..1 on device;
        targets (batch_size * boxes_per_image, 6) [img_idx, cls, xc, yc, w, h] normalised, on device.
    """
    g = torch.Generator().manual_seed(seed)
    imgs = torch.rand(batch_size, 3, imgsz, imgsz, generator=g)
    n = batch_size * boxes_per_image
    img_idx = torch.arange(batch_size).repeat_interleave(boxes_per_image).float()
    cls = torch.randint(0, nc, (n,), generator=g).float()
    wh = 0.05 + 0.35 * torch.rand(n, 2, generator=g)
    xy = wh / 2 + (1 - wh) * torch.rand(n, 2, generator=g)  # boxes lie inside the image
    targets = torch.cat((img_idx[:, None], cls[:, None], xy, wh), 1)
    return imgs.to(device), targets.to(device)


class StepRunner:
    """One training step as the engine runs it: task.train_step under autocast, scaled backward, optimizer step.

    Gradient clipping, EMA and accumulation are left out: they are the same for every task and happen once per
    accumulated batch group, not per step.

    Args:
        precision: a utils.torch_utils.Precision; default fp16 autocast on CUDA and float32 on the CPU (the
            figures in bench/README.md before the bf16 change were taken that way). With channels_last the
            trainable module is converted and every batch is reordered, as the engine does.
    """

    def __init__(self, task, device: torch.device, lr: float = 0.01, precision=None):
        from utils.engine import smart_optimizer
        from utils.torch_utils import select_precision

        self.task, self.device = task, device
        self.precision = precision or select_precision(device, device.type == "cuda")
        if self.precision.channels_last:
            task.trainable.to(memory_format=torch.channels_last)
        hyp = task.model.hyp
        self.optimizer = smart_optimizer(task.trainable, "SGD", lr, hyp["momentum"], hyp["weight_decay"])
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision.dtype == torch.float16)

    def __call__(self, imgs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Runs one step; returns the detached loss items."""
        self.task.trainable.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self.precision.autocast():
            loss, items = self.task.train_step(self.task.trainable, self.precision.to_input(imgs), targets)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return items.detach()


def clock(device: torch.device) -> float:
    """perf_counter after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def timed(fn, device: torch.device) -> tuple:
    """(wall seconds, process CPU seconds) of one call of fn().

    CPU time (all threads of this process) barely moves when other processes take the cores, so on a shared
    machine it is the steadier basis for ratios; wall time is what a user waits.
    """
    c0, t0 = time.process_time(), clock(device)
    fn()
    t1 = clock(device)
    return t1 - t0, time.process_time() - c0


def round_robin(variants: dict, device: torch.device, iters: int, warmup: int, on_round=None) -> tuple:
    """Time every variant once per round, rotating the starting variant each round.

    Args:
        variants: {name: zero-argument callable}.
        iters: timed rounds; warmup: untimed rounds before them.
        on_round: optional callable(round_index) run after each round (progress output).

    Returns:
        (wall, cpu): {name: [seconds per timed round]} each; list index = round, so one round's values pair up.
    """
    names = list(variants)
    wall = {n: [0.0] * iters for n in names}
    cpu = {n: [0.0] * iters for n in names}
    for r in range(warmup + iters):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            dt, dc = timed(variants[name], device)
            if r >= warmup:
                wall[name][r - warmup], cpu[name][r - warmup] = dt, dc
        if on_round is not None:
            on_round(r)
    return wall, cpu


def median(values) -> float:
    return float(statistics.median(values))


def table(header, rows, left=(0,)) -> str:
    """A plain-text table: columns right-aligned (those in ``left`` left-aligned) to the widest cell."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for k, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i in left else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths))).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA max allocated, else the RSS high-water mark (ru_maxrss)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2 ** 20 if platform.system() == "Darwin" else rss / 2 ** 10  # bytes on macOS, KiB on Linux


def read_rows(path: Path) -> list:
    """The rows of a results CSV as dicts ([] when it does not exist yet)."""
    if not Path(path).exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def append_row(path: Path, row: dict, fields) -> None:
    """Append one finished cell to a results CSV (header first when the file is new), so a later call can skip it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerow(row)
