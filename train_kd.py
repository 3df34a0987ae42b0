"""Train a small YOLOv5 student with knowledge distillation from a larger, frozen teacher.

Takes every train.py flag plus the distillation flags below; `--no-kd` trains the student plainly on the same
engine. Usage:
    python train_kd.py --teacher_weight runs/train/m/weights/best.pt --cfg models/yolov5s.yaml \\
        --data data/VOC.yaml --epochs 100 --batch-size 32 --name m2s --device 0
    torchrun --nproc_per_node 2 train_kd.py --teacher_weight teacher.pt --data data/VOC.yaml ...
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import train  # noqa: E402
from utils.engine import DetectionTask  # noqa: E402
from utils.general import LOGGER  # noqa: E402
from utils.kd.losses import BOX_KD_KINDS, FEATURE_LOSSES, OUTPUT_KD_KINDS  # noqa: E402
from utils.kd.task import DistillationTask  # noqa: E402


DEFAULT_FEAT_LOSS = ("at",)  # with output KD: the best measured recipe, and what the original scripts did
# KD weights for the size-free losses (utils.kd.losses, README "KD loss weighting"). beta 0.25 gives attention
# transfer about the share of the detection loss that the demo's tuned beta 1 gave it before the normalisation
# (bench/kd_magnitudes.py at 128 px). alpha 0.1: output KD's box and cls terms are now averaged over the teacher's
# objects rather than over all cells, 10-20x larger than before at 128 px; on the demo recipe (yolov5n, 30 epochs,
# seed 0, a 0.72 mAP@.5 teacher) alpha 0.1 reached mAP@.5 / mAP@.5:.95 0.264 / 0.153 against 0.234 / 0.111 with
# alpha 1 (student alone: 0.110 / 0.060).
DEFAULT_ALPHA = 0.1
DEFAULT_BETA = 0.25
# Box term of output KD: 1 - CIoU of the decoded boxes rather than the original scripts' MSE on raw xywh logits.
# On the demo (bench/kd_table.py, 3 seeds, hyp.demo.yaml giou 0.5) it scored mAP@.5:.95 0.303 against 0.289 over
# 60 epochs and 0.472 against 0.450 over 120, for 0.459 / 0.665 against 0.486 / 0.673 at mAP@.5: YOLOv5's fitness
# (0.1 mAP@.5 + 0.9 mAP@.5:.95) prefers it at both lengths, and the distilled boxes are as precise as the student's
# alone (bench/box_quality.py) instead of less.
DEFAULT_KD_BOX = "ciou"
# --inherit is on by default (utils/kd/inherit.py): on the demo (bench/kd_table.py) output KD + attention transfer
# from the teacher's selected weights closed 81% / 69% of the mAP@.5 / mAP@.5:.95 gap over 60 epochs (3 seeds) and 80%
# / 70% over 120 (8 seeds), against 37% / 28% and 56% / 45% from a random start.
# --evolve also evolves the KD weights: flag -> (mutation scale, lower limit, upper limit), as utils/evolve.META
KD_EVOLVE_META = {"alpha": (1, 0.0, 10.0), "beta": (1, 0.0, 10.0), "temperature": (1, 1.0, 40.0)}


def _bool_word(value: str) -> bool:
    """'True'/'False' (any case, or 1/0, yes/no) as a bool, for flags the original scripts took as words."""
    words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    if str(value).lower() not in words:
        raise argparse.ArgumentTypeError(f"expected True or False, got '{value}'")
    return words[str(value).lower()]


def build_parser() -> argparse.ArgumentParser:
    """train.py's parser plus the distillation flags, so the two command lines cannot drift apart."""
    p = train.build_parser()
    p.description = __doc__
    p.set_defaults(project="runs/train", name="kd")
    g = p.add_argument_group("distillation")
    g.add_argument("--teacher_weight", "--teacher", "--teacher-weight", type=str, default="",
                   help="teacher checkpoint: ours, a KD run's, or an official YOLOv5 one")
    g.add_argument("--kd", action=argparse.BooleanOptionalAction, default=True,
                   help="distil (default); --no-kd trains the student alone on the same engine")
    g.add_argument("--kd_loss_selected", "--kd-loss", choices=OUTPUT_KD_KINDS, default="l2",
                   help="output KD loss")
    g.add_argument("--kd_box", "--kd-box", choices=BOX_KD_KINDS, default=DEFAULT_KD_BOX,
                   help="box term of output KD: ciou (1 - CIoU of the decoded boxes, default) or l2 on raw xywh logits")
    g.add_argument("--kd_obj_iou", "--kd-obj-iou", action="store_true",
                   help="objectness KD target: the teacher's objectness times the CIoU of the student's box with the "
                        "teacher's (as YOLOv5 scales its objectness target by the IoU with the label)")
    g.add_argument("--kd_obj_all", "--kd-obj-all", action="store_true",
                   help="objectness KD on every cell: BCE of the student's objectness against the teacher's "
                        "probability, averaged over all cells with the detection loss's level balance (default: "
                        "l2 on logits weighted by the teacher's objectness, the original scripts' form)")
    g.add_argument("--kd_cls_floor", "--kd-cls-floor", type=float, default=0.0,
                   help="l2 class KD: a teacher class logit below -F counts as -F, and so does the student's there, "
                        "so classes both networks rule out cost nothing (0: off; it lowered the gain on the demo)")
    g.add_argument("--temperature", type=float, default=20.0, help="softmax temperature of the kl output loss")
    g.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="weight of output KD")
    g.add_argument("--beta", type=float, default=DEFAULT_BETA,
                   help="weight of feature KD (each feature loss is averaged over the layer pairs in a size-free "
                        "form, utils.kd.losses.size_free, times its weight in utils.kd.losses.LOSS_WEIGHTS)")
    g.add_argument("--feat_loss", "--feat-loss", nargs="+", choices=[*FEATURE_LOSSES, "none"],
                   default=list(DEFAULT_FEAT_LOSS),
                   help="feature KD losses (one or more; 'none' for output KD only). Default: attention transfer, "
                        "the best recipe measured so far (output KD + at, bench/README.md)")
    g.add_argument("--ratio", type=float, default=0.25, help="background weight of the GT mask (at_masked)")
    g.add_argument("--cwd_tau", "--cwd-tau", type=float, default=1.0, help="temperature of channel-wise KD")
    g.add_argument("--kd_layers", "--kd-layers", nargs="+", default=None,
                   help="student layers to distil (names like model.17 or indices); default: automatic")
    g.add_argument("--teacher_kd_layers", "--teacher-kd-layers", nargs="+", default=None,
                   help="teacher layers paired with --kd_layers; default: automatic (with --kd_layers "
                        "alone, each student layer's automatic partner)")
    g.add_argument("--kd_schedule", "--kd-schedule", choices=["const", "cos"], default="const",
                   help="KD weight schedule: constant, or cosine decay to 1%% by the last epoch")
    g.add_argument("--kd_stop_epoch", "--kd-stop-epoch", type=int, default=-1,
                   help="switch KD off from this epoch on (-1: never)")
    g.add_argument("--inherit", action=argparse.BooleanOptionalAction, default=None,
                   help="start the student from evenly spaced channels of the teacher's weights (weight selection) "
                        "instead of a random initialisation. Default: on when the student trains from scratch "
                        "(--weights '') and has the teacher's layer graph (e.g. yolov5n from yolov5s); --inherit "
                        "insists (an error otherwise), --no-inherit starts from a random initialisation")
    g.add_argument("--class_map", "--class-map", type=str, default="",
                   help="YAML {dataset class name: teacher class name} when the teacher has other classes")
    g.add_argument("--isL", nargs="?", const=True, default=None, type=_bool_word,
                   help="accepted for the original scripts' command lines (--isL, --isL True, --isL False) and "
                        "ignored: layers and channels are paired automatically")
    return p


def main(opt: argparse.Namespace, parser=None):
    """Train with or without KD. Returns (resolved options with save_dir, final validation results)."""
    parser = parser or build_parser()
    evolving = bool(getattr(opt, "evolve", None))
    if opt.resume and not evolving:  # the resumed run's own options decide between KD and plain training
        opt = train.resolve_resume(opt, parser)
    if getattr(opt, "isL", None) is not None:
        LOGGER.info(f"note: --isL {opt.isL} is ignored; teacher/student layers and channels are paired automatically")
    if not opt.kd:
        return train.main(opt, task_factory=DetectionTask.build, parser=parser)
    if (evolving or not opt.resume) and not opt.teacher_weight:
        raise ValueError("--teacher_weight is required for distillation (or pass --no-kd for plain training)")
    if evolving:
        return train.evolve(opt, DistillationTask.build, parser, meta=kd_evolve_meta(), flags=tuple(KD_EVOLVE_META),
                            command="train_kd.py")
    return train.main(opt, task_factory=DistillationTask.build, parser=parser)


def kd_evolve_meta() -> dict:
    """What --evolve mutates in a KD run: YOLOv5 v6.0's hyp table plus the KD weights, without the anchor count
    (the student keeps the teacher's anchors, so it must keep their number too)."""
    from utils.evolve import META

    return {**{k: v for k, v in META.items() if k != "anchors"}, **KD_EVOLVE_META}


def run(**kwargs):
    """Programmatic entry, e.g. train_kd.run(teacher_weight='t.pt', cfg='models/yolov5n.yaml', epochs=1)."""
    opt = train.parse_opt([], build_parser())
    for k, v in kwargs.items():
        setattr(opt, k, v)
    return main(opt)[0]


if __name__ == "__main__":
    train.cli(main, build_parser)
