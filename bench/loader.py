"""Training data-loader throughput on the bundled shapes dataset (generated on first use).

Prints images/s of the training loader (mosaic + every default augmentation of the hyp file) for each worker
count after a warm-up, plus the validation loader (rect batches, no augmentation) for reference.

Usage:
    python bench/loader.py [--imgsz 640] [--batch 16] [--workers 0 2] [--batches 20] [--cache none ram]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # a top-level script: make `utils` importable from any working directory

import torch  # noqa: E402

from utils.datasets import check_dataset, create_dataloader  # noqa: E402
from utils.general import set_logging, yaml_load  # noqa: E402
from utils.torch_utils import tune_cpu_allocator  # noqa: E402


def throughput(loader, warmup: int, batches: int):
    """(images/s, main-process CPU ms per image) over ``batches`` batches after ``warmup`` batches."""
    def batch_stream():
        while True:  # restart the epoch when the split is shorter than warm-up + measurement
            yield from loader

    stream = batch_stream()
    for _ in range(warmup):
        next(stream)
    images, wall, cpu = 0, time.perf_counter(), time.process_time()
    for _ in range(batches):
        images += len(next(stream)[0])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return images / wall, 1000 * cpu / images


def parse_opt(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/shapes.yaml", help="dataset YAML")
    parser.add_argument("--hyp", default=str(ROOT / "data" / "hyps" / "hyp.scratch.yaml"), help="hyp YAML")
    parser.add_argument("--imgsz", type=int, default=640, help="training image size")
    parser.add_argument("--batch", type=int, default=16, help="batch size")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="worker counts to measure")
    parser.add_argument("--warmup", type=int, default=3, help="batches skipped before timing")
    parser.add_argument("--batches", type=int, default=20, help="batches timed")
    parser.add_argument("--cache", nargs="+", default=["none"], choices=["none", "ram", "disk"],
                        help="image caches to measure (train.py --cache; none: decode every image every time)")
    return parser.parse_args(argv)


def main(opt: argparse.Namespace) -> dict:
    torch.set_num_threads(1)  # the loader does its work in numpy/cv2; keep torch from competing for the cores
    tuned = tune_cpu_allocator()  # as the engine does before it builds its loaders (workers inherit it)
    data = check_dataset(opt.data)
    hyp = yaml_load(opt.hyp)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    direct = not any(hyp[k] for k in ("degrees", "shear", "perspective"))
    print(f"loader benchmark: {data['train']} at {opt.imgsz} px, batch {opt.batch}, mosaic {hyp['mosaic']} "
          f"({'direct' if direct else 'canvas + warp'} path), {os.cpu_count()} CPUs, malloc "
          f"{'tuned' if tuned else 'glibc defaults'}, load average {load:.1f}")
    results = {}
    for cache in opt.cache:
        for workers in opt.workers:
            loader, _ = create_dataloader(data["train"], opt.imgsz, opt.batch, 32, hyp=hyp, augment=True,
                                          cache=None if cache == "none" else cache, workers=workers, shuffle=True,
                                          prefix="train: ")
            speed, cpu_ms = throughput(loader, opt.warmup, opt.batches)
            key = f"train_w{workers}" + ("" if cache == "none" else f"_{cache}")
            results[key] = speed
            cpu = f", {cpu_ms:.1f} CPU ms/image in the main process" if workers == 0 else ""
            print(f"train loader, cache {cache}, workers={workers}: {speed:.1f} images/s{cpu}")
    loader, _ = create_dataloader(data["val"], opt.imgsz, opt.batch, 32, rect=True, pad=0.5, workers=0,
                                  prefix="val: ")
    results["val_w0"], _ = throughput(loader, 1, min(opt.batches, len(loader) - 1))
    print(f"val loader (rect, no augmentation), workers=0: {results['val_w0']:.1f} images/s")
    return results


if __name__ == "__main__":
    set_logging()
    main(parse_opt())
