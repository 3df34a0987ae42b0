"""Distillation demo on the bundled synthetic dataset: teacher vs student vs student + KD.

One command takes the teacher shipped in weights/ (or trains one when the data, model or image size differ from
what it was trained on), trains the student alone and the student with distillation under identical settings and
seed, prints the three models' mAPs and the share of the teacher-student gap that distillation closed, and writes a
comparison plot of the two student runs:

    python demo.py                      # default recipe (see RECIPE below)
    python demo.py --seed 1             # another seed
    python demo.py --student-epochs 3   # a quick smoke run (numbers meaningless)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import train  # noqa: E402
import train_kd  # noqa: E402
from utils.datasets import check_dataset  # noqa: E402
from utils.general import LOGGER, colorstr, set_logging  # noqa: E402

# The default recipe, chosen on the bundled data only. The teacher is the one shipped in weights/ (yolov5s, 300
# epochs at 128 px: mAP@.5 0.848, mAP@.5:.95 0.696). `python demo.py` on an idle 2-core CPU with native bf16 (bf16
# autocast chosen automatically; a fresh clone, so the dataset was generated first) took 7 min 45 s and printed,
# for best.pt scored in float32 (mAP@.5 / mAP@.5:.95): yolov5n 60 epochs alone 0.214 / 0.144; with KD (the student
# starting from the teacher's selected weights, train_kd.py's default --inherit; output KD at alpha 0.1: l2 on
# objectness and classes, the 1 - CIoU box term with hyp.demo.yaml's giou 0.5; + attention transfer, beta 0.25)
# 0.735 / 0.530: 82% / 70% of the teacher-student gap. Seeds 1 and 2 (one thread each): alone 0.236 / 0.154 and
# 0.264 / 0.181, with KD 0.733 / 0.531 and 0.735 / 0.530 (README.md, Quick start). From a random start
# (--no-inherit) the same recipe closed 35-39% / 26-28% (bench/kd_table.py cells, seeds 0-2).
RECIPE = dict(
    data="data/shapes.yaml", hyp="data/hyps/hyp.demo.yaml", optimizer="Adam", imgsz=128, batch_size=16,
    teacher_cfg="models/yolov5s.yaml", student_cfg="models/yolov5n.yaml", teacher_epochs=300, student_epochs=60,
    kd_loss="l2", alpha=0.1, beta=0.25, feat_loss=("at",),
)


def parse_opt(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=RECIPE["data"])
    p.add_argument("--hyp", default=RECIPE["hyp"])
    p.add_argument("--optimizer", default=RECIPE["optimizer"], choices=["SGD", "Adam", "AdamW"])
    p.add_argument("--imgsz", type=int, default=RECIPE["imgsz"])
    p.add_argument("--batch-size", type=int, default=RECIPE["batch_size"])
    p.add_argument("--teacher-cfg", default=RECIPE["teacher_cfg"])
    p.add_argument("--student-cfg", default=RECIPE["student_cfg"])
    p.add_argument("--teacher-epochs", type=int, default=RECIPE["teacher_epochs"])
    p.add_argument("--student-epochs", type=int, default=RECIPE["student_epochs"])
    p.add_argument("--teacher-weight", default="", help="use this teacher instead of training one")
    p.add_argument("--kd_loss_selected", default=RECIPE["kd_loss"], choices=["l2", "kl", "bce"])
    p.add_argument("--alpha", type=float, default=RECIPE["alpha"])
    p.add_argument("--beta", type=float, default=RECIPE["beta"])
    p.add_argument("--feat_loss", nargs="+", default=list(RECIPE["feat_loss"]))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cache", default="ram", choices=["ram", "disk", "none"],
                   help="cache the training images (train.py --cache): decoded once instead of every epoch, which "
                        "frees CPU time for training on a 2-core machine (the bundled data takes ~30 MB of RAM)")
    p.add_argument("--device", default="")
    p.add_argument("--project", default="runs/demo")
    return p.parse_args(argv)


def common_args(opt, epochs: int) -> dict:
    return dict(data=opt.data, hyp=opt.hyp, optimizer=opt.optimizer, imgsz=opt.imgsz, batch_size=opt.batch_size,
                epochs=epochs, weights="", workers=opt.workers, device=opt.device, project=opt.project,
                exist_ok=True, seed=opt.seed, noval=True, linear_lr=True,
                cache=None if opt.cache == "none" else opt.cache)


def train_teacher(opt) -> tuple[Path, tuple | None]:
    """The teacher's best.pt: --teacher-weight, an earlier demo teacher, or a new run."""
    if opt.teacher_weight:
        return Path(opt.teacher_weight), None
    recipe = f"{Path(opt.teacher_cfg).stem}_{opt.imgsz}_e{opt.teacher_epochs}_{opt.optimizer}_{Path(opt.hyp).stem}"
    run = Path(opt.project) / f"teacher_{recipe}"
    best = run / "weights" / "best.pt"
    if best.exists() and (run / "results.csv").exists():
        LOGGER.info(f"{colorstr('demo: ')}reusing teacher {best}")
        return best, None
    args = train.parse_opt([])
    for k, v in {**common_args(opt, opt.teacher_epochs), "cfg": opt.teacher_cfg, "name": run.name,
                 "seed": 0}.items():
        setattr(args, k, v)
    _, results = train.main(args)
    return best, results


SHIPPED_TEACHER = ROOT / "weights" / "demo_teacher_yolov5s_shapes128.pt"  # + .yaml: how it was trained, on what


def shipped_teacher(opt) -> Path | None:
    """The teacher in weights/ when it was trained for this run: same generator settings of the data, same model
    config and image size (its .yaml records them). None otherwise (or when the files are missing)."""
    from utils.general import yaml_load

    record = SHIPPED_TEACHER.with_suffix(".yaml")
    if not SHIPPED_TEACHER.is_file() or not record.is_file():
        return None
    made = yaml_load(record)
    data = yaml_load(ROOT / opt.data if (ROOT / opt.data).exists() else opt.data)
    reasons = [what for what, ok in (
        ("data generator settings", made.get("generator") == data.get("download")),
        ("model", Path(made.get("cfg", "")).name == Path(opt.teacher_cfg).name),
        ("image size", made.get("imgsz") == opt.imgsz)) if not ok]
    if reasons:
        LOGGER.info(f"{colorstr('demo: ')}{SHIPPED_TEACHER.name} does not fit this run ({', '.join(reasons)} "
                    f"differ); training a teacher instead")
        return None
    return SHIPPED_TEACHER


def find_teacher(opt) -> Path:
    """--teacher-weight, else the shipped teacher when it fits, else an earlier or new demo teacher run."""
    if opt.teacher_weight:
        return Path(opt.teacher_weight)
    shipped = shipped_teacher(opt)
    if shipped:
        LOGGER.info(f"{colorstr('demo: ')}using the shipped teacher {shipped.relative_to(ROOT)}")
        return shipped
    return train_teacher(opt)[0]


def train_student(opt, name: str, teacher: Path | None, overrides: dict | None = None):
    """Train a student (with KD when a teacher is given); overrides: train_kd.py settings applied last."""
    args = train.parse_opt([], train_kd.build_parser())
    kd = dict(kd=teacher is not None, teacher_weight=str(teacher or ""), kd_loss_selected=opt.kd_loss_selected,
              alpha=opt.alpha, beta=opt.beta, feat_loss=opt.feat_loss)
    settings = {**common_args(opt, opt.student_epochs), "cfg": opt.student_cfg, "name": name, **kd, **(overrides or {})}
    for k, v in settings.items():
        setattr(args, k, v)
    run_opt, results = train_kd.main(args)
    return Path(run_opt.save_dir), results


def evaluate(opt, weights: Path) -> tuple[float, float]:
    """(mAP@.5, mAP@.5:.95) of a checkpoint on the val split, same settings for every model."""
    import val

    results, _, _ = val.run(data=opt.data, weights=str(weights), imgsz=opt.imgsz, batch_size=32, device=opt.device,
                            workers=opt.workers, plots=False, project=opt.project, name="val", exist_ok=True,
                            half=False)  # every model scored in float32, however it was trained
    return float(results[2]), float(results[3])


def report(scores: dict) -> str:
    """The comparison table and the share of the teacher-student gap that KD closed (per metric)."""
    lines = [f"{'model':<14}{'mAP@.5':>10}{'mAP@.5:.95':>12}"]
    lines += [f"{name:<14}{m50:>10.4f}{m:>12.4f}" for name, (m50, m) in scores.items()]
    (t50, t), (s50, s), (k50, k) = scores["teacher"], scores["student"], scores["student+KD"]
    for label, tv, sv, kv in (("mAP@.5", t50, s50, k50), ("mAP@.5:.95", t, s, k)):
        gap = tv - sv
        closed = f"{100 * (kv - sv) / gap:.0f}%" if gap > 1e-9 else "n/a (teacher not better than student)"
        lines.append(f"KD gain {label}: {kv - sv:+.4f}; teacher-student gap closed: {closed}")
    return "\n".join(lines)


def main(opt) -> dict:
    start = time.time()
    check_dataset(opt.data)  # generates the synthetic data on first use
    teacher = find_teacher(opt)
    student_run, _ = train_student(opt, f"student_seed{opt.seed}", None)
    kd_run, _ = train_student(opt, f"student_kd_seed{opt.seed}", teacher)
    scores = {"teacher": evaluate(opt, teacher), "student": evaluate(opt, student_run / "weights" / "best.pt"),
              "student+KD": evaluate(opt, kd_run / "weights" / "best.pt")}
    from plot_curves import plot_runs

    plot = plot_runs([student_run, kd_run], labels=["student", "student+KD"],
                     out=Path(opt.project) / f"compare_seed{opt.seed}.png")
    LOGGER.info("\n" + colorstr("demo: ") + f"seed {opt.seed}, {time.time() - start:.0f} s\n" + report(scores))
    LOGGER.info(f"comparison plot: {plot}")
    return scores


if __name__ == "__main__":
    set_logging()
    main(parse_opt())
