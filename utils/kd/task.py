"""DistillationTask: a training step with a frozen teacher, for the shared engine (utils/engine.py)."""
from __future__ import annotations

import torch
import torch.nn as nn

from utils.engine import DetectionTask
from utils.general import LOGGER, colorstr
from utils.kd.classmap import check_overlap, format_mapping_table, load_class_map, match_classes, needs_obj_scaling
from utils.kd.distiller import Distiller, KDConfig, KDStudent
from utils.kd.losses import NEEDS_ADAPTER, output_kd_terms
from utils.kd.pairing import kd_layer_names, pair_layers
from utils.kd.recorder import FeatureRecorder
from utils.torch_utils import Precision, runs_channels_last

KD_LOSS_NAMES = ("kd_box", "kd_obj", "kd_cls", "kd_feat")


def load_teacher(weights, device: torch.device, inherit_into: nn.Module | None = None,
                 inherit_required: bool = True) -> nn.Module:
    """The teacher as a float32 inference model on device: BatchNorm folded, eval mode, no gradients, and a Detect
    head that returns its raw maps without decoding boxes (``teacher(x)`` gives ``(None, maps)``).

    Accepts our checkpoints (plain or KD runs) and official YOLOv5 checkpoints. Stays float32 so that anchors and
    strides are compared exactly (check_teacher); ``teacher_precision`` then casts it for the run.

    inherit_into: a student to start from the teacher's weights (utils.kd.inherit, --inherit), taken before the
    teacher's BatchNorm layers are folded. inherit_required False: a student of another layer graph keeps its own
    weights (logged) instead of stopping the run.
    """
    from pathlib import Path

    from utils.checkpoint import load_checkpoint, model_from_checkpoint

    if not weights or not Path(weights).is_file():
        raise FileNotFoundError(f"--teacher_weight '{weights}' not found; train a teacher first "
                                f"(python train.py --data ... --cfg models/yolov5m.yaml) and pass its best.pt")
    teacher = model_from_checkpoint(load_checkpoint(weights, map_location="cpu"))
    if inherit_into is not None:
        from utils.kd.inherit import graph_mismatch, inherit_weights

        mismatch = graph_mismatch(inherit_into, teacher)
        if mismatch and not inherit_required:
            LOGGER.info(f"{colorstr('KD inherit: ')}off, the student keeps its random initialisation: {mismatch}")
        else:  # inherit_weights raises on a mismatch
            report = inherit_weights(inherit_into, teacher)
            LOGGER.info(f"{colorstr('KD inherit: ')}student starts from {report.summary()}")
    teacher = teacher.fuse().eval().requires_grad_(False).to(device)
    teacher.model[-1].decode = False  # KD reads the raw maps only: skip building boxes every step
    return teacher


def teacher_precision(teacher: nn.Module, precision: Precision) -> nn.Module:
    """The teacher in the run's precision and memory format: fp16 on CUDA, bf16 on CPUs with native bf16 (its
    weights are cast, not autocast: it never trains), float32 when the run is float32; channels_last when the
    run's is. Call after check_teacher and layer pairing."""
    if precision.enabled:
        teacher = teacher.to(precision.dtype)
    if precision.channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    return teacher


def teacher_class_index(student_names, teacher_names, class_map_file=None, data=""):
    """Teacher class per student class, or None when there is nothing to map: identical class lists, or a 1-class
    student (--single-cls) of a multi-class teacher without --class_map, which DistillationTask distils in
    single-class mode (output_kd_terms(single_class=True)). Prints the mapping table or the mode."""
    student_names, teacher_names = list(student_names), list(teacher_names)
    if student_names == teacher_names and not class_map_file:
        return None
    if len(student_names) == 1 < len(teacher_names) and not class_map_file:
        LOGGER.info(f"{colorstr('KD classes: ')}1-class student, {len(teacher_names)}-class teacher: class KD is "
                    f"skipped and objectness learns the teacher's best-class confidence (pass --class_map to "
                    f"distil one teacher class instead)")
        return None
    class_map = load_class_map(class_map_file) if class_map_file else None
    index = match_classes(student_names, teacher_names, class_map)
    try:
        check_overlap(index)
    except ValueError as e:
        raise ValueError(f"teacher has {len(teacher_names)} classes, the data {len(student_names)}, and {e}; e.g. "
                         f"train a teacher on this dataset first: python train.py --data {data or 'DATA.yaml'} "
                         f"--cfg models/yolov5m.yaml --weights ''") from None
    LOGGER.info(colorstr("KD classes: ") + "teacher -> student class mapping\n" +
                format_mapping_table(student_names, teacher_names, index))
    return index


def check_teacher(student: nn.Module, teacher: nn.Module) -> bool:
    """Raise when the detection heads cannot be distilled; return True when the student must adopt the teacher's
    anchors (they differ), which it then does in place."""
    s_det, t_det = student.model[-1], teacher.model[-1]
    s_strides, t_strides = s_det.stride.tolist(), t_det.stride.tolist()
    if s_strides != t_strides:
        raise ValueError(f"teacher strides {t_strides} differ from the student's {s_strides} (detection levels "
                         f"{t_det.nl} vs {s_det.nl}); use a student YAML with the teacher's levels (e.g. a P5 "
                         f"student for a P5 teacher)")
    if s_det.na != t_det.na:
        raise ValueError(f"teacher has {t_det.na} anchors per level, the student {s_det.na}; copy the teacher's "
                         f"'anchors:' into the student's model YAML")
    t_anchors = t_det.anchors.detach().to(s_det.anchors.device, torch.float32)
    if torch.allclose(s_det.anchors, t_anchors, atol=1e-4):
        return False
    with torch.no_grad():
        s_det.anchors.copy_(t_anchors)
    LOGGER.info(f"{colorstr('KD anchors: ')}student adopts the teacher's anchors "
                f"{(t_anchors * t_det.stride.view(-1, 1, 1).to(t_anchors)).round().view(s_det.nl, -1).tolist()} "
                f"(AutoAnchor is skipped for the student)")
    return True


def layer_names(values):
    """--kd_layers values: '17' or 'model.17' -> 'model.17'; None stays None."""
    if not values:
        return None
    return tuple(v if not str(v).isdigit() else f"model.{v}" for v in values)


class DistillationTask(DetectionTask):
    """Detection loss + kd * (alpha * output KD + beta * feature KD), with a frozen teacher.

    The weighting story: hyp ``kd`` scales every KD term (and the --kd_schedule factor multiplies it per epoch);
    --alpha scales output KD, --beta feature KD. Output KD's box/obj/cls terms take their own hyp gains (giou,
    kd_obj, kd_cls; default: the detection gains box, obj, cls), scaled per run like the detection gains (box x 3/nl;
    obj x (imgsz/640)^2 x 3/nl; cls x nc/80 x 3/nl; see utils.loss.scale_hyp_gains) with the 'detection' reduction
    of output_kd_terms, and each feature loss is averaged over the layer pairs in its size-free form
    (losses.size_free), so the same alpha and beta mean the same at 128 and at 640 px and with any number of layer
    pairs (bench/kd_magnitudes.py measures it). The optional hyp keys kd_obj_end and kd_cls_end give the objectness
    and class gains at the last epoch: the gain then moves linearly from kd_obj (kd_cls) at the first epoch to its end
    value at the last, a schedule for those two terms alone (--kd_schedule scales every KD term).

    The teacher runs once per step under no_grad in eval mode (fused, fp16 on CUDA) and is never wrapped in DDP;
    KD losses are computed in float32 outside no_grad so their gradients reach the student (and its adapters).
    The student always keeps the teacher's anchors, so AutoAnchor is skipped.
    """

    loss_names = DetectionTask.loss_names + KD_LOSS_NAMES
    skip_autoanchor = True

    def __init__(self, model: nn.Module, teacher: nn.Module, cfg: KDConfig, pairs, t_cls_index=None):
        super().__init__(model)
        self.teacher, self.cfg = teacher, cfg
        self.distiller = Distiller(pairs, cfg, channel_pair_names(model, cfg, pairs))
        device = next(model.parameters()).device
        self.distiller.adapters.to(device)
        self.student = KDStudent(model, self.distiller.adapters, self.distiller.s_names)
        self.t_cls_index = None if t_cls_index is None else torch.tensor(t_cls_index, device=device)
        self.t_obj_scale = t_cls_index is not None and needs_obj_scaling(t_cls_index, teacher.model[-1].nc)
        self.single_class = t_cls_index is None and model.model[-1].nc == 1 < teacher.model[-1].nc
        self.factor = 1.0
        self.progress = 0.0  # epoch / (epochs - 1): where kd_obj and kd_cls stand between start and end gains
        self.hyp = {}

    @property
    def trainable(self) -> nn.Module:
        return self.student

    def setup(self, trainer) -> None:
        super().setup(trainer)
        self.hyp = trainer.hyp

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        self.factor = self.cfg.weight(epoch, epochs)
        self.progress = min(epoch / max(epochs - 1, 1), 1.0)
        self.teacher.eval()  # nothing may switch the teacher to train mode

    @torch.no_grad()
    def teacher_forward(self, imgs: torch.Tensor):
        """Teacher raw maps [(bs, na, ny, nx, 5 + nc_t)] and recorded features, without an autograd graph."""
        p = next(self.teacher.parameters())  # the first conv's weight (c2, 3, k, k)
        x = imgs.to(p.dtype)
        if runs_channels_last(self.teacher):
            x = x.contiguous(memory_format=torch.channels_last)
        names = self.distiller.t_names
        if not names:
            return self.teacher(x)[1], []
        with FeatureRecorder(self.teacher, names) as rec:
            _, maps = self.teacher(x)
        return maps, rec.get(names)

    def train_step(self, module: nn.Module, imgs: torch.Tensor, targets: torch.Tensor):
        """Returns (total loss scaled by batch size, items (7,): box, obj, cls, kd_box, kd_obj, kd_cls, kd_feat)."""
        preds, s_feats = module(imgs)
        loss, items = self.compute_loss(preds, targets)
        if self.factor == 0:
            zeros = items.new_zeros(len(KD_LOSS_NAMES))
            return loss + Distiller.keep_in_graph(s_feats), torch.cat((items, zeros))
        t_maps, t_feats = self.teacher_forward(imgs)
        box, obj, cls = output_kd_terms(preds, t_maps, kind=self.cfg.output_loss, temperature=self.cfg.temperature,
                                        t_cls_index=self.t_cls_index, t_obj_scale=self.t_obj_scale,
                                        single_class=self.single_class, reduction="detection",
                                        box_kind=self.cfg.box_loss, anchors=self.model.model[-1].anchors,
                                        obj_iou=self.cfg.obj_iou, cls_floor=self.cfg.cls_floor,
                                        obj_all=self.cfg.obj_all)
        hyp, cfg = self.hyp, self.cfg
        kd = hyp.get("kd", 1.0) * self.factor  # overall KD gain (hyp) x the epoch's schedule factor
        # kd_obj / kd_cls are optional hyp keys (scale_hyp_gains fills them in; a raw hyp file may lack them)
        gains = hyp["giou"], self.term_gain("kd_obj", "obj"), self.term_gain("kd_cls", "cls")
        out_terms = torch.stack((box * gains[0], obj * gains[1], cls * gains[2])) * (kd * cfg.alpha)
        feat = self.distiller.feature_loss(s_feats, t_feats, targets) * (kd * cfg.beta) \
            if s_feats else out_terms.new_zeros(())
        kd_items = torch.cat((out_terms, feat.reshape(1)))
        bs = imgs.shape[0]
        return loss + kd_items.sum() * bs, torch.cat((items, kd_items.detach()))

    def term_gain(self, key: str, fallback: str) -> float:
        """hyp[key] (default hyp[fallback]), moved linearly towards hyp[key + '_end'] by the epoch when that is set."""
        start = self.hyp.get(key, self.hyp[fallback])
        end = self.hyp.get(f"{key}_end")
        return start if end is None else start + (end - start) * self.progress

    def state_dict(self) -> dict:
        adapters = {k: v.detach().cpu() for k, v in self.distiller.adapters.state_dict().items()}
        return {"adapters": adapters, "kd": self.cfg.to_dict()}

    def load_state_dict(self, ckpt: dict) -> None:
        if ckpt.get("adapters"):
            self.distiller.adapters.load_state_dict(ckpt["adapters"])

    @classmethod
    def build(cls, model: nn.Module, trainer) -> "DistillationTask":
        """Load and check the teacher, match classes, pair layers, build adapters (before the optimizer).

        The engine calls this before it scans any dataset, so a bad teacher stops the run at once."""
        opt = trainer.opt
        cfg = kd_config_from_opt(opt)
        wanted = getattr(opt, "inherit", None)  # None: automatic, True: insist, False: off
        if wanted and opt.weights and not opt.resume:
            raise ValueError(f"--inherit starts the student from the teacher's weights, --weights {opt.weights} from "
                             f"a checkpoint: pass one of them")
        inherit = wanted is not False and not opt.weights and not opt.resume
        teacher = load_teacher(opt.teacher_weight, trainer.device, inherit_into=model if inherit else None,
                               inherit_required=bool(wanted))
        index = teacher_class_index(trainer.names, teacher.names, cfg.class_map, opt.data)
        check_teacher(model, teacher)  # float32 anchors: compared and copied before any fp16 cast
        pairs = kd_pairs(model, teacher, cfg, imgsz=trainer.gs * 2)
        channel = channel_pair_names(model, cfg, pairs)
        only = f" ({', '.join(f for f in cfg.feat_losses if f not in NEEDS_ADAPTER)} only)"
        for p in pairs:
            LOGGER.info(f"{colorstr('KD pair: ')}student {p.s_name} ({p.s_channels} ch) <- teacher {p.t_name} "
                        f"({p.t_channels} ch), stride {p.stride}{only if channel and p.s_name not in channel else ''}")
        return cls(model, teacher_precision(teacher, trainer.precision), cfg, pairs, index)


def kd_pairs(model: nn.Module, teacher: nn.Module, cfg: KDConfig, imgsz: int = 64) -> list:
    """The layer pairs a KD run distils: none without feature losses, cfg.s_layers/t_layers when given (every loss
    at every pair), else automatic pairing. Losses with adapters (ft, cwd, mimic, pkd) compare the 3 Detect inputs
    only, because an adapter per backbone stage as well would cost ~15% of a student forward; at and at_masked (no
    adapters) also compare the 4 backbone stages, also when they run together with an adapter loss (which then
    skips them: channel_pair_names)."""
    if not cfg.feat_losses:
        return []
    if cfg.s_layers or cfg.t_layers:
        return pair_layers(model, teacher, cfg.s_layers, cfg.t_layers, imgsz=imgsz)
    groups = ("neck",) if all(f in NEEDS_ADAPTER for f in cfg.feat_losses) else ("backbone", "neck")
    return pair_layers(model, teacher, imgsz=imgsz, groups=groups)


def channel_pair_names(model: nn.Module, cfg: KDConfig, pairs) -> set | None:
    """Student layers of the pairs that channel-by-channel losses (ft, cwd, mimic, pkd) compare when they run
    beside attention transfer with automatic pairing: the Detect inputs (kd_pairs adds the backbone stages for
    attention transfer only). None (every pair) otherwise: explicit layers, or one kind of loss only."""
    adapter_losses = [f in NEEDS_ADAPTER for f in cfg.feat_losses]
    if cfg.s_layers or cfg.t_layers or all(adapter_losses) or not any(adapter_losses):
        return None
    return {p.s_name for p in pairs} & set(kd_layer_names(model)["neck"])


def kd_config_from_opt(opt) -> KDConfig:
    feats = tuple(f for f in (opt.feat_loss or []) if f != "none")
    return KDConfig(output_loss=opt.kd_loss_selected, box_loss=opt.kd_box, obj_iou=opt.kd_obj_iou,
                    obj_all=opt.kd_obj_all,
                    cls_floor=opt.kd_cls_floor, temperature=float(opt.temperature), alpha=opt.alpha, beta=opt.beta,
                    feat_losses=feats, ratio=opt.ratio, cwd_tau=opt.cwd_tau, schedule=opt.kd_schedule,
                    stop_epoch=opt.kd_stop_epoch, s_layers=layer_names(opt.kd_layers),
                    t_layers=layer_names(opt.teacher_kd_layers), class_map=opt.class_map or None)
