"""Size of every KD term next to the detection loss, at several image sizes: does a KD weight mean the same at 128
and at 640 px?

For each teacher->student pair and image size it runs one DistillationTask step (no optimizer step) per feature
loss on the same batch of real shapes val images, and prints each weighted term divided by the detection loss
(box + obj + cls) of that batch: output KD box (both forms, --kd_box l2 and ciou), obj and cls at alpha 1 with
the engine's scaled gains, and each feature loss at beta 1 averaged over the layer pairs train_kd.py uses, in the
size-free form and with the weight (utils.kd.losses.LOSS_WEIGHTS) that training uses. A term whose ratio falls
10x between 128 and 640 px is one whose --beta chosen at one size does little at the other.

Usage:
    python bench/kd_magnitudes.py                                  # s->n and m->s, 128/320/640 px, random init
    python bench/kd_magnitudes.py --pairs s-n --sizes 128 256 \\
        --teacher runs/demo/teacher/weights/best.pt --student runs/demo/student_seed0/weights/best.pt
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

import torch  # noqa: E402

from bench._common import build_student, build_teacher, load_hyp, machine_line, table  # noqa: E402
from utils.general import set_logging  # noqa: E402

FEATURES = ("at", "at_masked", "ft", "cwd", "mimic", "pkd", "mgd")


def parse_opt(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", nargs="+", default=["s-n", "m-s"])
    p.add_argument("--sizes", nargs="+", type=int, default=[128, 320, 640])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--data", default="data/shapes.yaml")
    p.add_argument("--teacher", default="", help="teacher checkpoint (one pair only); default: random init")
    p.add_argument("--student", default="", help="student checkpoint (one pair only); default: random init")
    return p.parse_args(argv)


def real_batch(data: str, imgsz: int, batch_size: int) -> tuple:
    """The first val batch, letterboxed to imgsz without augmentation: (imgs 0..1, targets (n, 6))."""
    from utils.datasets import check_dataset, create_dataloader

    split = check_dataset(data)["val"]
    loader = create_dataloader(split, imgsz, batch_size, 32, rect=False, workers=0, shuffle=False)[0]
    imgs, targets, _, _ = next(iter(loader))
    return imgs.float() / 255, targets


def models(opt, t_size: str, s_size: str, imgsz: int, names) -> tuple:
    from utils.checkpoint import load_checkpoint, model_from_checkpoint
    from utils.kd.task import load_teacher

    cpu = torch.device("cpu")
    if opt.student:
        student = model_from_checkpoint(load_checkpoint(opt.student)).train()
        student.hyp, student.gr = load_hyp(student.model[-1].nl, student.nc, imgsz), 1.0
    else:
        torch.manual_seed(0)
        student = build_student(f"models/yolov5{s_size}.yaml", imgsz, cpu, nc=len(names))
        student.names = list(names)
    if opt.teacher:
        teacher = load_teacher(opt.teacher, cpu)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            teacher = build_teacher(t_size, cpu, tmp, student.names)
    return student, teacher


def _step(student, teacher, cfg, imgs, targets) -> tuple:
    """One DistillationTask step without gradients: (loss items (7,), number of layer pairs)."""
    from utils.kd.task import DistillationTask, kd_pairs

    task = DistillationTask(student, teacher, cfg, kd_pairs(student, teacher, cfg, imgsz=64))
    task.setup(SimpleNamespace(hyp=student.hyp))
    task.on_epoch_start(0, 10)
    with torch.no_grad():
        _, items = task.train_step(task.trainable, imgs, targets)
    return items, len(task.distiller.pairs)


def ratios(student, teacher, imgs, targets) -> dict:
    """{term: weighted term / detection loss} for one batch."""
    from utils.kd.distiller import KDConfig
    from utils.kd.task import check_teacher

    check_teacher(student, teacher)
    items, _ = _step(student, teacher, KDConfig(box_loss="ciou"), imgs, targets)  # the decoded-box form
    ciou = float(items[3]) / float(items[:3].sum())
    out = {}
    for feature in FEATURES:
        items, pairs = _step(student, teacher, KDConfig(feat_losses=(feature,)), imgs, targets)
        detection = float(items[:3].sum())
        out.update({"kd_box (l2)": float(items[3]) / detection, "kd_box (ciou)": ciou,
                    "kd_obj": float(items[4]) / detection, "kd_cls": float(items[5]) / detection,
                    "detection": detection})
        out[f"{feature} (mean of {pairs} pairs)"] = float(items[6]) / detection
    return out


def main(opt) -> dict:
    from utils.general import yaml_load

    torch.set_num_threads(2)
    print(machine_line(2, torch.device("cpu")))
    names = yaml_load(ROOT / opt.data)["names"]
    names = [names[k] for k in sorted(names)] if isinstance(names, dict) else list(names)
    results = {}
    for pair in opt.pairs:
        t_size, s_size = pair.replace("->", "-").split("-")
        columns = {}
        for imgsz in opt.sizes:
            imgs, targets = real_batch(str(ROOT / opt.data), imgsz, opt.batch_size)
            student, teacher = models(opt, t_size, s_size, imgsz, names)
            columns[imgsz] = ratios(student, teacher, imgs, targets)
        results[pair] = columns
        source = "checkpoints" if opt.teacher or opt.student else "random init"
        print(f"\n{t_size}->{s_size} ({source}), batch {opt.batch_size} of {opt.data} val images: each weighted "
              f"KD term / detection loss (alpha = beta = 1, hyp.scratch gains)")
        terms = [k for k in next(iter(columns.values())) if k != "detection"]
        rows = [(term, *(f"{columns[s][term]:.4g}" for s in opt.sizes)) for term in terms]
        rows.append(("detection loss", *(f"{columns[s]['detection']:.4g}" for s in opt.sizes)))
        print(table(("term", *(f"{s} px" for s in opt.sizes)), rows))
    return results


if __name__ == "__main__":
    set_logging()
    main(parse_opt())
