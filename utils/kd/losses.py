"""Pure distillation losses: output-level KD on Detect maps and feature-level KD on (bs, c, h, w) maps.

Every loss takes student tensors first and teacher tensors second, casts both to float32, detaches the teacher
(gradient only ever reaches the student) and returns a scalar. Nothing here reads hyp, a model or a logger, except
the compatibility wrapper :func:`compute_kd_output_loss`.

Output KD follows Mehta & Ozturk ("Object detection at 200 frames per second"): the student imitates the
teacher's raw logits, and every term is weighted by the teacher's objectness probability so the many background
cells do not drown the few cells where the teacher sees an object.
"""
from __future__ import annotations

from types import MappingProxyType

import torch
import torch.nn.functional as F

from utils.boxes import bbox_iou
from utils.loss import level_balance
from utils.torch_utils import de_parallel

OUTPUT_KD_KINDS = ("l2", "kl", "bce")
BOX_KD_KINDS = ("l2", "ciou")
OBJ_IOU_FLOOR = 0.01  # --kd_obj_iou: the least IoU factor, so an l2 objectness target stays a finite logit
_MASKED_LOGIT = -1e4  # stands in for -inf in a masked softmax: exp() underflows to 0 without producing NaNs
_TINY = torch.finfo(torch.float32).tiny


def _raw_maps(pred):
    """Train-mode Detect output (list of maps) from either a train-mode list or an eval-mode (decoded, maps)."""
    if isinstance(pred, tuple) and len(pred) == 2 and isinstance(pred[1], (list, tuple)):
        return pred[1]
    return pred


def _as_index(t_cls_index, nc_student, nc_teacher, device):
    """Validate and move the student->teacher class index; returns (index (nc_s,), student mask (nc_s,) bool)."""
    index = torch.as_tensor(t_cls_index, dtype=torch.long, device=device)
    if index.shape != (nc_student,):
        raise ValueError(f"t_cls_index has shape {tuple(index.shape)} but the student has {nc_student} classes; "
                         f"build it with utils.kd.classmap.match_classes(student_names, teacher_names)")
    if index.device.type == "cpu" and len(index) and not -1 <= int(index.min()) <= int(index.max()) < nc_teacher:
        raise ValueError(f"t_cls_index values must lie in [-1, {nc_teacher - 1}] (the teacher has {nc_teacher} "
                         f"classes), got min {int(index.min())} max {int(index.max())}")
    return index, index >= 0


def _teacher_class_mask(index, student_mask, nc_teacher):
    """(nc_t,) float: 1 for teacher channels some student class maps to, else 0."""
    hits = torch.zeros(nc_teacher, device=index.device)
    hits.index_add_(0, index.clamp(min=0), student_mask.float())  # unmapped students add 0 at channel 0
    return hits.clamp_(max=1.0)


def class_mass_scale(t_maps_level, t_cls_index):
    """How much the teacher's most likely class at each cell is one the student also has.

    ``m = max_{c mapped} sigmoid(t_c) / max_c sigmoid(t_c)``, with c over the teacher's classes (sigmoids, because
    YOLOv5 scores classes independently). An object the teacher calls a class the student does not know gets m near
    0, so multiplying the teacher's objectness by m stops it from teaching that object, while an object of a mapped
    class keeps m = 1 however many other classes the teacher has. (A ratio of sums instead would be biased low for a
    COCO-like teacher: a mapped class at 0.9 beside 60 unmapped classes at 0.007-0.018 would give m = 0.54-0.72.)

    Args:
        t_maps_level: teacher raw map of one level, (bs, na, ny, nx, 5 + nc_teacher).
        t_cls_index: LongTensor (nc_student,), teacher channel per student class, -1 where none.

    Returns:
        m: (bs, na, ny, nx) float32 in [0, 1].
    """
    t = t_maps_level.detach().float()
    nc_teacher = t.shape[-1] - 5
    index = torch.as_tensor(t_cls_index, dtype=torch.long, device=t.device)
    return _mass(t[..., 5:], _teacher_class_mask(index, index >= 0, nc_teacher))


def _mass(t_cls, teacher_mask):
    """(bs, na, ny, nx) float32: best sigmoid on the masked channels of t_cls (bs, na, ny, nx, nc_t) over the best
    on all channels (see :func:`class_mass_scale`).

    Elementwise operations and reductions only (no ``p @ mask``): autocast would run a matmul in fp16/bf16.
    """
    p = t_cls.float().sigmoid()  # (bs, na, ny, nx, nc_t)
    mapped = (p * teacher_mask.float()).amax(-1)  # unmapped channels count as 0; sigmoids are > 0
    return mapped / p.amax(-1).clamp(min=_TINY)


def _scaled_logit(t_obj, m):
    """logit(sigmoid(t_obj) * m) in log space: stable for large |t_obj| and exactly t_obj where m == 1."""
    m = m.clamp(1e-12, 1.0)
    log_q = F.logsigmoid(-t_obj)  # log(1 - p)
    log_rest = torch.logaddexp(log_q, F.logsigmoid(t_obj) + torch.log1p(-m))  # log(1 - p * m)
    return t_obj + m.log() + log_q - log_rest


def _class_elements(kind, s_cls, t_cls, temperature, student_mask, floor=0.0):
    """Per-element class loss (bs, na, ny, nx, nc_s) before objectness weighting. floor > 0 ('l2' only): teacher
    logits below -floor count as -floor, and so do the student's where the teacher's do, so a class both networks
    rule out costs nothing while a student logit below a teacher's above the floor is still pulled up."""
    if kind == "kl":
        s_cls, t_cls = s_cls / temperature, t_cls / temperature
        if student_mask is not None:  # softmax over the mapped classes only
            s_cls = s_cls.masked_fill(~student_mask, _MASKED_LOGIT)
            t_cls = t_cls.masked_fill(~student_mask, _MASKED_LOGIT)
        # log_target form equals KLDiv(log_softmax(s/T), softmax(t/T)) and avoids 0 * log 0
        kl = F.kl_div(F.log_softmax(s_cls, -1), F.log_softmax(t_cls, -1), reduction="none", log_target=True)
        return kl * temperature ** 2
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(s_cls, t_cls.sigmoid(), reduction="none")
    if floor > 0:  # where the teacher is below the floor, so is the target, and a student below it is done
        t_cls = t_cls.clamp(min=-floor)
        s_cls = torch.where(t_cls > -floor, s_cls, s_cls.clamp(min=-floor))
    return (s_cls - t_cls).square()


def _objectness_scale(t_cls, teacher_mask, single_class):
    """Factor m (bs, na, ny, nx) on the teacher's objectness probability, or None to leave it as it is.

    A single-class student learns the teacher's best-class confidence, so m = max_c sigmoid(t_c); with class
    mapping m is the best mapped class over the best class (:func:`class_mass_scale`).
    """
    if single_class:
        return t_cls.sigmoid().amax(-1)
    if teacher_mask is not None:
        return _mass(t_cls, teacher_mask)
    return None


def _cell_boxes(xywh, anchor_wh):
    """Boxes (bs, na, ny, nx, 4) xywh in grid units relative to their cell, decoded from raw logits as Detect does
    (xy = 2 sigmoid - 0.5, wh = (2 sigmoid)^2 * anchor); anchor_wh (na, 2) is Detect.anchors of the level."""
    xy = xywh[..., :2].sigmoid() * 2 - 0.5
    wh = (xywh[..., 2:4].sigmoid() * 2).square() * anchor_wh.to(xywh).view(1, -1, 1, 1, 2)
    return torch.cat((xy, wh), -1)


def _cell_ciou(s_xywh, t_xywh, anchor_wh):
    """CIoU (bs, na, ny, nx) between the student's and the teacher's decoded box of every cell."""
    if anchor_wh is None:
        raise ValueError("box KD 'ciou' and --kd_obj_iou decode boxes and need the Detect anchors of every level")
    return bbox_iou(_cell_boxes(s_xywh, anchor_wh), _cell_boxes(t_xywh, anchor_wh), x1y1x2y2=False, CIoU=True)


def _level_terms(s, t, kind, temperature, index, student_mask, teacher_mask, single_class=False, weighted=False,
                 box_kind="l2", anchor_wh=None, obj_iou=False, cls_floor=0.0, obj_all=False):
    """(box, obj, cls) scalars for one level; index/masks are None without class mapping.

    weighted=False averages each term over the level's cells (bs * na * ny * nx); weighted=True divides box and cls
    by each image's sum of the objectness weights w instead (see _reduce and output_kd_terms' reduction).
    obj_all: obj is the unweighted mean over all cells of BCE(s_obj, teacher probability), for every kind.
    """
    s, t = s.float(), t.detach().float()
    t_obj = t[..., 4]  # (bs, na, ny, nx)
    m = _objectness_scale(t[..., 5:], teacher_mask, single_class)
    p_obj = torch.sigmoid(t_obj)
    w = p_obj if m is None else p_obj * m
    ciou = _cell_ciou(s[..., :4], t[..., :4], anchor_wh) if box_kind == "ciou" or obj_iou else None
    q = m  # the factor on the teacher's objectness probability in the obj target
    if obj_iou:  # as YOLOv5 scales its objectness target by the IoU with the label
        quality = ciou.detach().clamp(min=OBJ_IOU_FLOOR)
        q = quality if m is None else m * quality
    prob_target = p_obj if q is None else p_obj * q  # equals w unless obj_iou scales it
    if kind == "bce" or obj_all:
        obj_target = prob_target
    else:
        obj_target = t_obj if q is None else _scaled_logit(t_obj, q)
    # box is a regression for every kind (not probabilities): MSE on raw xywh logits, or 1 - CIoU of decoded boxes
    box_el = (s[..., :4] - t[..., :4]).square() if box_kind == "l2" else (1.0 - ciou).unsqueeze(-1)
    box = _reduce(box_el * w[..., None], w, box_el.shape[-1], weighted)
    if obj_all:  # every cell, unweighted, against a probability: the form of YOLOv5's objectness loss
        obj = F.binary_cross_entropy_with_logits(s[..., 4], obj_target)
    elif kind == "bce":
        obj = (F.binary_cross_entropy_with_logits(s[..., 4], obj_target, reduction="none") * w).mean()
    else:
        obj = ((s[..., 4] - obj_target).square() * w).mean()
    if single_class:  # the student's one class has no teacher channel to learn from
        return box, obj, s.new_zeros(())
    t_cls = t[..., 5:] if index is None else t[..., 5:].index_select(-1, index.clamp(min=0))
    elements = _class_elements(kind, s[..., 5:], t_cls, temperature, student_mask, cls_floor) * w[..., None]
    if student_mask is None:
        cls = _reduce(elements, w, elements.shape[-1], weighted)
    else:  # average over mapped classes only, so the term's scale does not shrink with fewer matches
        keep = student_mask.float()
        cls = _reduce(elements * keep, w, keep.sum().clamp(min=1), weighted)
    return box, obj, cls


def _reduce(elements, w, per_cell, weighted):
    """Scalar from w-weighted errors ``elements`` (bs, na, ny, nx, k) holding ``per_cell`` terms per cell.

    Not weighted: the mean over all bs * na * ny * nx cells (the original formula). Weighted: per image, the sum
    divided by that image's objectness mass sum(w) (at least 1, one confident cell's worth, so a level where the
    teacher sees nothing is not blown up), then the mean over images. Per image, so that DDP processes holding
    different images add up to the whole batch, as YOLOv5's per-image loss convention needs.
    """
    if not weighted:
        return elements.sum() / (w.numel() * per_cell)
    mass = w.flatten(1).sum(1).clamp(min=1.0)  # (bs,)
    return (elements.flatten(1).sum(1) / (mass * per_cell)).mean()


def output_kd_terms(s_maps, t_maps, kind="l2", temperature=20.0, t_cls_index=None, t_obj_scale=None,
                    single_class=False, reduction="mean", box_kind="l2", anchors=None, obj_iou=False, cls_floor=0.0,
                    obj_all=False):
    """Objectness-weighted output distillation, summed over detection levels.

    Per level with w = sigmoid(t_obj): box = mean((s_xywh - t_xywh)^2 * w); obj = mean((s_obj - t_obj)^2 * w);
    cls = mean((s_cls - t_cls)^2 * w) for 'l2', mean(KL(softmax(t_cls/T) || softmax(s_cls/T)) * T^2 * w) per
    element for 'kl', mean(BCE(s_cls, sigmoid(t_cls)) * w) for 'bce'. 'bce' also takes obj as
    BCE(s_obj, sigmoid(t_obj)) * w; box is MSE for every kind. BCE terms bottom out at the teacher's entropy, not 0.

    Class mapping (teacher trained on other classes): student class k learns from teacher channel t_cls_index[k];
    classes with -1 get no class KD and the class mean runs over mapped classes only. Objectness scaling: with
    m = :func:`class_mass_scale`, p' = sigmoid(t_obj) * m replaces the teacher's objectness everywhere (w = p', the
    'l2' obj target is logit(p'), the 'bce' obj target is p'), so objects of teacher-only classes teach nothing.

    Single-class student (single_class=True, nc_s == 1, e.g. trained with --single-cls) and a multi-class teacher:
    cls is 0 (no teacher channel corresponds to "any object") and p' = sigmoid(t_obj) * max_c sigmoid(t_c) replaces
    the teacher's objectness as above, so the student's confidence learns the teacher's best-class confidence.

    Args:
        s_maps: student raw maps, list of (bs, na, ny, nx, 5 + nc_s) logits (train-mode Detect output).
        t_maps: teacher raw maps, same shapes except the last dim 5 + nc_t; an eval-mode (decoded, maps) works too.
        kind: 'l2', 'kl' or 'bce'.
        temperature: softmax temperature T of 'kl'.
        t_cls_index: None (same classes; exact plain formulas) or LongTensor (nc_s,) teacher channel per student
            class, -1 where none (see utils.kd.classmap.match_classes). Pass it on the maps' device.
        t_obj_scale: objectness scaling on/off; None scales whenever t_cls_index is given. Pass False when every
            teacher class is mapped (utils.kd.classmap.needs_obj_scaling) to skip work that would multiply by 1.
        single_class: the student has one class and learns from the teacher's best class (no t_cls_index).
        reduction: 'mean' (the formulas above: each level's weighted errors averaged over all its cells, as the
            original KD scripts did) or 'detection' (box and cls: per image, divided by the image's sum of w at
            that level (at least 1) instead of the cell count, then averaged over images; obj as in 'mean'). This mirrors YOLOv5's detection loss, which averages box and cls over the
            matched cells and obj over all cells: w acts as a soft "matched" mask. A 'mean' term shrinks as the image
            grows (the cells the teacher sees objects in stay about as many while all cells grow with the image
            area); a 'detection' box or cls term does not, and its obj term is made size-free the way YOLOv5 does it
            for obj, by a gain proportional to the image area. Training (utils.kd.task) uses 'detection'.
        box_kind: 'l2' (the formula above) or 'ciou': box = mean((1 - CIoU(s_box, t_box)) * w) with both boxes
            decoded at each cell as Detect decodes them, the form of YOLOv5's own box loss with the teacher's box
            in place of the label (reduced like 'l2', one element per cell instead of four).
        anchors: Detect.anchors (nl, na, 2), grid units; needed by box_kind 'ciou' and obj_iou.
        obj_iou: multiply the teacher's objectness probability in the obj target (not in the weight w) by
            max(CIoU(s_box, t_box), 0.01) (detached), as YOLOv5's detection loss scales its objectness target by the
            IoU of the predicted box with its label: the student is taught to be as confident as the teacher only
            where its box is as good as the teacher's.
        cls_floor: 'l2' class term only. > 0: a teacher class logit below -cls_floor counts as -cls_floor, and so
            does the student's there (its error is max(s, -cls_floor) + cls_floor); 0: off, the formula above. Most
            of the l2 class error at a confident cell comes from classes both networks rule out (teacher logit -8,
            student -5: sigmoids 0.0003 and 0.007); with a floor of 4.6 (sigmoid 0.01) those cost nothing. On the
            demo that lowered the distillation gain: the very negative logits are part of what class KD teaches.
        obj_all: the objectness term in the form of YOLOv5's own objectness loss, with the teacher's probability
            (times the class-mapping or obj_iou factor) as the target in place of the IoU with the label:
            BCE(s_obj, sigmoid(t_obj)) averaged over every cell of a level without the weight w, the levels summed
            with the detection loss's balance (4.0, 1.0, 0.4 for three levels). The weighted form teaches only where
            the teacher sees an object; this one also teaches the background, so a student's confident box where the
            teacher sees nothing costs as much as a missed object. Minimum: the teacher's entropy, not 0.

    Returns:
        (box, obj, cls): float32 scalars.
    """
    if reduction not in ("mean", "detection"):
        raise ValueError(f"reduction '{reduction}': choose 'mean' or 'detection'")
    t_maps = _raw_maps(t_maps)
    if kind not in OUTPUT_KD_KINDS:
        raise ValueError(f"unknown output KD kind '{kind}'; choose one of {', '.join(OUTPUT_KD_KINDS)}")
    if box_kind not in BOX_KD_KINDS:
        raise ValueError(f"unknown box KD kind '{box_kind}'; choose one of {', '.join(BOX_KD_KINDS)}")
    if len(s_maps) != len(t_maps):
        raise ValueError(f"student has {len(s_maps)} detection levels, teacher {len(t_maps)}; they must match")
    nc_s, nc_t = s_maps[0].shape[-1] - 5, t_maps[0].shape[-1] - 5
    index = student_mask = teacher_mask = None
    if single_class:
        if nc_s != 1 or t_cls_index is not None:
            raise ValueError(f"single_class=True needs a 1-class student and no t_cls_index; the student has {nc_s} "
                             f"classes{' and t_cls_index was given' if t_cls_index is not None else ''}")
    elif t_cls_index is not None:
        index, student_mask = _as_index(t_cls_index, nc_s, nc_t, s_maps[0].device)
        if t_obj_scale is None or t_obj_scale:
            teacher_mask = _teacher_class_mask(index, student_mask, nc_t)
    elif nc_s != nc_t:
        raise ValueError(f"student has {nc_s} classes, teacher {nc_t}: pass t_cls_index (match_classes) or a "
                         f"--class_map file to say which teacher class teaches which student class"
                         f"{' (or single_class=True for a 1-class student)' if nc_s == 1 else ''}")
    if cls_floor < 0 or (cls_floor > 0 and kind != "l2"):
        raise ValueError(f"cls_floor {cls_floor}: a positive floor applies to the 'l2' class term only (0: off)")
    if (box_kind == "ciou" or obj_iou) and (anchors is None or len(anchors) != len(s_maps)):
        raise ValueError(f"box KD 'ciou' and obj_iou need Detect.anchors for each of the {len(s_maps)} levels")
    balance = level_balance(len(s_maps)) if obj_all else (1.0,) * len(s_maps)
    terms = []
    for i, (s, t) in enumerate(zip(s_maps, t_maps)):
        if s.shape[:-1] != t.shape[:-1]:
            raise ValueError(f"student map {tuple(s.shape)} and teacher map {tuple(t.shape)} differ before the "
                             f"class dim; anchors per level, strides and input size must match")
        box, obj, cls = _level_terms(s, t, kind, temperature, index, student_mask, teacher_mask, single_class,
                                     weighted=reduction == "detection", box_kind=box_kind,
                                     anchor_wh=None if anchors is None else anchors[i], obj_iou=obj_iou,
                                     cls_floor=cls_floor, obj_all=obj_all)
        terms.append((box, obj * balance[i], cls))
    box, obj, cls = (sum(parts) for parts in zip(*terms))
    return box, obj, cls


def compute_kd_output_loss(pred, teacher_pred, model, kd_loss_selected="l2", temperature=20):
    """Compatibility wrapper with the gains of the original KD experiments.

    Reads ``model.hyp`` gains: 'giou' (falls back on 'box', then 0.05), 'obj', 'cls' and 'kd' (default 1.0), and
    ``model.nc`` (the student's classes; the teacher must have the same, else use output_kd_terms with t_cls_index).

    Args:
        pred: student raw maps, list of (bs, na, ny, nx, 5 + nc).
        teacher_pred: teacher raw maps (or its eval-mode (decoded, maps)).
        model: the student (DP/DDP wrappers are unwrapped).
        kd_loss_selected: 'l2' or 'kl' ('bce' is accepted too).
        temperature: 'kl' temperature.

    Returns:
        loss: (1,) tensor, (box*giou + obj*obj_gain + cls*cls_gain) * kd * bs.
        loss_items: (4,) detached tensor: the three weighted terms and their sum, per image (no bs factor).
    """
    model = de_parallel(model)
    hyp = getattr(model, "hyp", None)
    if not hyp or "obj" not in hyp or "cls" not in hyp:
        raise ValueError("model.hyp with 'obj' and 'cls' gains is required; set model.hyp = hyp before training")
    nc = model.nc
    if pred[0].shape[-1] != nc + 5:
        raise ValueError(f"student maps end in {pred[0].shape[-1]} channels but model.nc={nc} needs {nc + 5}")
    box, obj, cls = output_kd_terms(pred, teacher_pred, kind=kd_loss_selected, temperature=temperature)
    kd = hyp.get("kd", 1.0)
    box = box * hyp.get("giou", hyp.get("box", 0.05)) * kd
    obj = obj * hyp["obj"] * kd
    cls = cls * hyp["cls"] * kd
    total = box + obj + cls
    bs = pred[0].shape[0]
    return (total * bs).reshape(1), torch.stack((box, obj, cls, total)).detach()


def _check_spatial(s, t, name):
    if s.dim() != 4 or t.dim() != 4 or s.shape[0] != t.shape[0] or s.shape[2:] != t.shape[2:]:
        raise ValueError(f"{name}: student {tuple(s.shape)} and teacher {tuple(t.shape)} must both be (bs, c, h, w) "
                         f"with equal bs, h, w; pair layers of the same stride")


def _check_same(s, t, name, adapter="ChannelAdapter"):
    _check_spatial(s, t, name)
    if s.shape[1] != t.shape[1]:
        raise ValueError(f"{name}: student has {s.shape[1]} channels, teacher {t.shape[1]}; map the student through "
                         f"a {adapter}({s.shape[1]}, {t.shape[1]}) (utils.kd.adapters.build_adapters)")


def at(x):
    """Attention map: per-position mean of x^2 over channels, L2-normalised per sample.

    Args:
        x: (bs, c, h, w). Returns (bs, h * w) float32.
    """
    return F.normalize(x.float().pow(2).mean(1).flatten(1))


def at_loss(s, t):
    """Attention transfer (Zagoruyko & Komodakis): mean((at(s) - at(t))^2).

    Channel counts may differ (the map averages over channels), so AT needs no adapter; h, w must match.

    Args:
        s: student features (bs, c_s, h, w); t: teacher features (bs, c_t, h, w). Returns a scalar.
    """
    _check_spatial(s, t, "at")
    return (at(s) - at(t.detach())).square().mean()


def at_masked(s, t, mask):
    """Attention transfer with each position's squared error weighted by ``mask`` (see :func:`gt_mask`).

    Args:
        s: (bs, c_s, h, w); t: (bs, c_t, h, w); mask: (bs, h, w). Returns a scalar.
    """
    _check_spatial(s, t, "at_masked")
    if mask.shape != (s.shape[0], *s.shape[2:]):
        raise ValueError(f"at_masked: mask {tuple(mask.shape)} must be (bs, h, w) = "
                         f"{(s.shape[0], *s.shape[2:])}; build it with gt_mask(targets, bs, h, w)")
    return ((at(s) - at(t.detach())).square() * mask.flatten(1).float()).mean()


def gt_mask(targets, bs, h, w, ratio=0.25, device=None):
    """Weight map: 1 - ratio on grid cells overlapped by a ground-truth box, ratio elsewhere.

    Built without a per-box loop: each box adds +1/-1 at its four corners of a (bs, h + 1, w + 1) difference array;
    two cumulative sums give how many boxes cover each cell. Memory is O(n + bs * h * w).

    Args:
        targets: (n, 6) YOLOv5 targets [image, class, xc, yc, w, h], coordinates normalised to 0-1.
        bs, h, w: batch size and grid size of the feature map.
        ratio: weight of background cells.
        device: output device (default: that of targets).

    Returns:
        (bs, h, w) float32 mask.
    """
    device = targets.device if device is None else device
    t = targets.detach().to(device=device, dtype=torch.float32)
    counts = torch.zeros(bs, h + 1, w + 1, device=device)
    if len(t):
        img = t[:, 0].long()
        if img.device.type == "cpu" and not 0 <= int(img.min()) <= int(img.max()) < bs:
            raise ValueError(f"targets name images {int(img.min())}..{int(img.max())} but bs={bs}")
        c0, c1 = _cell_span(t[:, 2], t[:, 4], w)
        r0, r1 = _cell_span(t[:, 3], t[:, 5], h)
        one = ((c1 > c0) & (r1 > r0)).float()  # boxes covering no cell add nothing
        rows, cols = torch.cat((r0, r0, r1, r1)), torch.cat((c0, c1, c0, c1))
        counts.index_put_((img.repeat(4), rows, cols), torch.cat((one, -one, -one, one)), accumulate=True)
    covered = counts.cumsum(1).cumsum(2)[:, :h, :w] > 0.5  # (bs, h, w)
    return torch.where(covered, 1.0 - ratio, ratio).float()


def _cell_span(centre, size, cells):
    """First cell and one-past-last cell (n,) long overlapped by [centre - size/2, centre + size/2] * cells."""
    start = ((centre - size / 2) * cells).floor().long().clamp(0, cells)
    end = ((centre + size / 2) * cells).ceil().long().clamp(0, cells)
    return start, end


def ft(x):
    """Channel statistic: per-channel mean of x^2 over positions, L2-normalised per sample. (bs, c) float32."""
    return F.normalize(x.float().pow(2).mean((2, 3)))


def ft_loss(s, t):
    """MSE between :func:`ft` of student and teacher. s, t: (bs, c, h, w) with equal c (adapt first)."""
    _check_same(s, t, "ft")
    return F.mse_loss(ft(s), ft(t.detach()))


def cwd_loss(s, t, tau=1.0):
    """Channel-wise distillation (Shu et al., ICCV 2021).

    Each channel becomes a distribution over its h * w positions (softmax at temperature tau);
    loss = sum over positions of KL(teacher || student) * tau^2, averaged over bs * c.

    Args:
        s, t: (bs, c, h, w) with equal c (adapt first). Returns a scalar.
    """
    _check_same(s, t, "cwd")
    bs, c = s.shape[:2]
    log_s = F.log_softmax(s.float().flatten(2) / tau, -1)  # (bs, c, h*w)
    log_t = F.log_softmax(t.detach().float().flatten(2) / tau, -1)
    return F.kl_div(log_s, log_t, reduction="sum", log_target=True) * tau ** 2 / (bs * c)


def mimic_loss(s, t):
    """Feature imitation: mean squared error between (adapted) student and teacher features (bs, c, h, w)."""
    _check_same(s, t, "mimic")
    return F.mse_loss(s.float(), t.detach().float())


def _standardize(x, eps=1e-6):
    """x (bs, c, h, w) with each channel shifted and scaled to mean 0, variance 1 over its bs * h * w values."""
    x = x.float()
    mean = x.mean((0, 2, 3), keepdim=True)
    std = x.var((0, 2, 3), unbiased=False, keepdim=True).add(eps).sqrt()
    return (x - mean) / std


def pkd_loss(s, t):
    """Pearson-correlation distillation, PKD (Cao et al., NeurIPS 2022): MSE between per-channel standardised
    features.

    Each channel is standardised over the batch and its positions, so the loss no longer depends on the scale or
    offset of either network's activations, nor on the image size: it equals the mean over channels of
    2 * (1 - r_c), with r_c the Pearson correlation of student and teacher channel c, and lies in [0, 4].

    Args:
        s, t: (bs, c, h, w) with equal c (adapt first). Returns a scalar.
    """
    _check_same(s, t, "pkd")
    return F.mse_loss(_standardize(s), _standardize(t.detach()))


def mgd_loss(s, t):
    """Masked generative distillation, MGD (Yang et al., ECCV 2022): mean squared error between the feature map
    that the student's GenerativeAdapter generated from its masked features and the teacher's map.

    The masking and generation happen in the adapter (utils.kd.adapters.GenerativeAdapter); the loss itself is
    an MSE like mimic's. The original sums the squared error and scales it by a small constant (2e-5 for
    detection); training uses the size-free form (:func:`size_free`), mimic's relative error.

    Args:
        s: generated features (bs, c, h, w); t: teacher features (bs, c, h, w). Returns a scalar.
    """
    _check_same(s, t, "mgd", adapter="GenerativeAdapter")
    return F.mse_loss(s.float(), t.detach().float())


def size_free(name, value, t, s=None):
    """A feature loss as training weighs it: normalised so that its size does not depend on the image size.

    - at, at_masked compare attention maps L2-normalised over the h * w positions, and average the squared
      difference over the positions, so the plain loss falls like 1 / (h * w) (26-33x from 128 to 640 px). Times
      h * w it becomes the squared distance between the two unit maps per image (in [0, 2]; at_masked weighted).
    - ft, likewise normalised over channels and averaged over them: times c, the squared distance per image.
    - mimic is an MSE of raw activations, whose scale is the networks' business: per image, divided by the mean
      square of the two feature maps together (a constant for the gradient), it becomes a relative error in [0, 2]
      (0 when equal, 1 when one of them is zero), then averaged over images. It is computed from s and t alone
      (``value`` is ignored and may be None; see SIZE_FREE_FROM_MAPS). Dividing by the teacher's energy alone would
      explode for a teacher whose features are near zero at a layer (a random-init teacher in eval mode shrinks
      them ~1000x per stage).
    - mgd is normalised like mimic (the same relative error, of the generated map).
    - cwd (a KL per channel, summed over positions) and pkd (2 (1 - r) per channel, in [0, 4]) are left as they are.

    Args:
        name: a FEATURE_LOSSES key; value: the plain loss (scalar); t: the teacher features (bs, c_t, h, w);
        s: the student features the loss compared with t (adapted: (bs, c_t, h, w)); needed for mimic and mgd.

    Returns:
        The normalised scalar.
    """
    if name in ("at", "at_masked"):
        return value * (t.shape[2] * t.shape[3])
    if name == "ft":
        return value * t.shape[1]
    if name in SIZE_FREE_FROM_MAPS:  # per image, so that DDP processes holding different images add up to the batch
        s, t = s.float(), t.detach().float()
        energy = (t.square().mean((1, 2, 3)) + s.detach().square().mean((1, 2, 3))).clamp(min=_TINY)  # (bs,)
        return ((s - t).square().mean((1, 2, 3)) / energy).mean()
    return value


FEATURE_LOSSES = MappingProxyType({"at": at_loss, "at_masked": at_masked, "ft": ft_loss, "cwd": cwd_loss,
                                   "mimic": mimic_loss, "pkd": pkd_loss, "mgd": mgd_loss})
NEEDS_ADAPTER = frozenset({"ft", "cwd", "mimic", "pkd", "mgd"})  # compare channels one to one: counts must match
GENERATIVE = frozenset({"mgd"})  # compare the output of a GenerativeAdapter, built at every pair they compare
# Each feature loss's weight inside the feature-KD term, so that one --beta suits every loss. Calibrated on the
# bundled benchmark (bench/kd_table.py: yolov5s teacher, yolov5n student, 128 px, 60 epochs): at the beta that is
# best for attention transfer, pkd and mimic (which compare every channel of the whole map) pulled the student below
# output KD alone; at these fractions of it they did best among the betas tried (bench/README.md, "kd_table").
# mgd: of 0.2 and 0.04 beside attention transfer (120 epochs, seed 0), 0.2 scored higher.
LOSS_WEIGHTS = MappingProxyType({"at": 1.0, "at_masked": 1.0, "ft": 1.0, "cwd": 1.0, "pkd": 0.2, "mimic": 0.04,
                                "mgd": 0.2})
SIZE_FREE_FROM_MAPS = frozenset({"mimic", "mgd"})  # size_free recomputes these per image: no need for the plain value
NEEDS_MASK = frozenset({"at_masked"})  # called as fn(s, t, gt_mask(...)); the others as fn(s, t)
