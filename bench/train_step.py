"""Plain training-step time and validation throughput of a YOLOv5 model on this machine.

1. Training step: forward + ComputeLoss + backward + SGD step (DetectionTask + smart_optimizer, as the engine runs
   them) on a synthetic batch with fixed random targets; median of --iters steps after --warmup steps.
   Reference: YOLOv5 v6.0 takes about 1.9 s per step for yolov5s at 320 px, batch 8, 2 threads on a 2-core CPU.
2. val.py throughput: images/s of a whole val.run (loading, inference, NMS at conf 0.001, metrics) on the val
   split of the synthetic shapes data, for a random-init model (whose many low-confidence boxes make NMS
   expensive) and, with --weights, for a trained checkpoint.

Usage:
    python bench/train_step.py
    python bench/train_step.py --weights runs/train/exp/weights/best.pt
    python bench/train_step.py --imgsz 64 --iters 2 --threads 1 --skip-val   # quick try
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # a top-level script: make `utils`, `val` and `bench` importable from anywhere

import torch  # noqa: E402

from bench._common import (NC, StepRunner, build_student, load_line, machine_line, median,  # noqa: E402
                           round_robin, synthetic_batch, table)
from utils.general import set_logging  # noqa: E402

V60_STEP_S = 1.9  # YOLOv5 v6.0, yolov5s, 320 px, batch 8, 2 threads, measured on this machine class


def bench_step(opt, device) -> float:
    """Prints the step-time table; returns the median seconds per step."""
    from utils.engine import DetectionTask

    torch.manual_seed(0)
    model = build_student(opt.cfg, opt.imgsz, device)
    task = DetectionTask(model)
    task.setup(None)
    runner = StepRunner(task, device)
    imgs, targets = synthetic_batch(opt.batch_size, opt.imgsz, device)
    wall, cpu = round_robin({"step": lambda: runner(imgs, targets)}, device, opt.iters, opt.warmup)
    times = wall["step"]
    t = median(times)
    print(f"\ntraining step: {Path(opt.cfg).stem}, nc={NC}, {opt.imgsz} px, batch {opt.batch_size}, "
          f"{opt.iters} steps after {opt.warmup} warm-up")
    rows = [("median", f"{t:.2f}"), ("min", f"{min(times):.2f}"), ("max", f"{max(times):.2f}"),
            ("images/s (median)", f"{opt.batch_size / t:.1f}"),
            ("process CPU time (median)", f"{median(cpu['step']):.2f}")]
    print(table(("step", "seconds"), rows))
    settings = (device.type, Path(opt.cfg).name, opt.imgsz, opt.batch_size, opt.threads)
    comparable = settings == ("cpu", "yolov5s.yaml", 320, 8, 2)
    verdict = ("met" if t <= V60_STEP_S else "MISSED") if comparable else "not comparable with these settings"
    print(f"target: median <= YOLOv5 v6.0's ~{V60_STEP_S} s for yolov5s at 320 px, batch 8, 2 CPU threads: "
          f"{verdict}")
    return t


def random_checkpoint(cfg: str, names, path: Path) -> Path:
    """Save a random-init model as a checkpoint so val.run loads (and fuses) it like any trained one."""
    from models.yolo import Model
    from utils.checkpoint import build_checkpoint, save_checkpoint

    torch.manual_seed(0)
    model = Model(str(ROOT / cfg), ch=3, nc=len(names))
    model.names = list(names)
    return save_checkpoint(build_checkpoint(model), path)


def time_val(data: dict, weights: str, opt, tmp: str) -> tuple:
    """(wall seconds, images seen, mAP@.5, per-image (pre, inference, NMS) ms) of one standalone val.run."""
    import val
    from utils.datasets import list_image_files

    n_images = len(list_image_files(data["val"]))
    t0 = time.perf_counter()
    results, _, speeds = val.run(data, weights=weights, batch_size=opt.val_batch_size, imgsz=opt.imgsz,
                                 conf_thres=0.001, iou_thres=0.6, device=opt.device, workers=opt.workers,
                                 project=tmp, name="val", exist_ok=True, plots=False, half=True)
    return time.perf_counter() - t0, n_images, results[2], speeds


def bench_val(opt) -> None:
    from utils.datasets import check_dataset

    data = check_dataset(opt.data)  # generates datasets/shapes on first use
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = [("random init", str(random_checkpoint(opt.cfg, data["names"], Path(tmp) / "random.pt")))]
        if opt.weights:
            models.append((Path(opt.weights).name, opt.weights))
        for label, weights in models:
            wall, n, map50, (pre, inf, nms) = time_val(data, weights, opt, tmp)
            rows.append((label, f"{n / wall:.1f}", f"{wall:.1f}", f"{pre:.1f}", f"{inf:.1f}", f"{nms:.1f}",
                         f"{map50:.3f}"))
    print(f"\nval.run on {data['val']}: {opt.imgsz} px, batch {opt.val_batch_size}, {opt.workers} loader workers, "
          f"conf 0.001, IoU 0.6, whole run timed (loading, inference, NMS, metrics)")
    print(table(("model", "images/s", "wall s", "pre ms/img", "infer ms/img", "NMS ms/img", "mAP@.5"), rows))


def parse_opt(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", default="models/yolov5s.yaml", help="model YAML (random init)")
    p.add_argument("--data", default="data/shapes.yaml", help="dataset YAML for the val.py measurement")
    p.add_argument("--weights", default="", help="a trained checkpoint to validate as well")
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--batch-size", type=int, default=8, help="training batch size")
    p.add_argument("--val-batch-size", type=int, default=None, help="val batch size (default 2 x --batch-size)")
    p.add_argument("--iters", type=int, default=5, help="timed training steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed training steps first")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--workers", type=int, default=2, help="val loader workers")
    p.add_argument("--device", default="", help="'' (CUDA when available), cpu, 0, ...")
    p.add_argument("--skip-val", action="store_true", help="time the training step only")
    opt = p.parse_args(argv)
    if opt.iters < 1:
        p.error("--iters must be at least 1")
    if opt.weights and not Path(opt.weights).is_file():
        p.error(f"--weights {opt.weights} does not exist; pass a checkpoint path or leave it out")
    opt.val_batch_size = opt.val_batch_size or 2 * opt.batch_size
    return opt


def main(opt) -> None:
    from utils.torch_utils import select_device, tune_cpu_allocator

    set_logging(verbose=False)  # keep val.py's per-class table and the optimizer lines out of the figures
    torch.set_num_threads(opt.threads)
    device = select_device(opt.device)
    tuned = tune_cpu_allocator(device)  # as the engine does
    print(machine_line(opt.threads, device, tuned))
    bench_step(opt, device)
    if not opt.skip_val:
        bench_val(opt)
    print(load_line())


if __name__ == "__main__":
    main(parse_opt())
