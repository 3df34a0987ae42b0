"""The YOLOv5 v6.0 detection loss: target assignment, CIoU box loss, IoU-weighted objectness and class BCE."""
from __future__ import annotations

import torch
import torch.nn as nn

from utils.boxes import bbox_iou
from utils.torch_utils import de_parallel

# Per-level objectness weights: small-stride levels have more cells, mostly background, and get a larger weight.
BALANCE_3 = (4.0, 1.0, 0.4)
BALANCE_N = (4.0, 1.0, 0.25, 0.06, 0.02)
# A target is also assigned to the two neighbouring cells nearest its centre; rows: self, left, up, right, down.
NEIGHBOUR_OFFSETS = ((0, 0), (1, 0), (0, 1), (-1, 0), (0, -1))


def level_balance(nl: int) -> tuple:
    """The objectness weight of each of nl detection levels (BALANCE_3 for three, else the first nl of BALANCE_N)."""
    if nl > len(BALANCE_N):
        raise ValueError(f"Detect has {nl} levels; the loss supports at most {len(BALANCE_N)}")
    return BALANCE_3 if nl == 3 else BALANCE_N[:nl]


def smooth_BCE(eps=0.1):
    """Positive and negative BCE targets (1 - eps/2, eps/2) for label smoothing eps."""
    return 1.0 - 0.5 * eps, 0.5 * eps


def scale_hyp_gains(hyp, nl, nc, imgsz):
    """A new hyp dict with the loss gains scaled from the 3-level, 80-class, 640-px reference setting.

    box *= 3/nl; cls *= nc/80 * 3/nl; obj *= (imgsz/640)^2 * 3/nl. The input dict is not modified.
    The distillation gains ``giou`` (box, default: ``box``), ``kd_obj`` (default: ``obj``) and ``kd_cls`` (default:
    ``cls``) are scaled like box, obj and cls, so output KD (utils.kd.task) takes every gain from the scaled dict
    with the detection loss's scaling. Their optional end values ``kd_obj_end`` and ``kd_cls_end`` (the gain at the
    last epoch, see utils.kd.task.DistillationTask) are scaled like the gain they end.
    """
    factor = {"box": 3 / nl, "cls": nc / 80 * 3 / nl, "obj": (imgsz / 640) ** 2 * 3 / nl}
    # each distillation gain: (the detection gain it scales like and falls back to, its optional end value)
    kd_gains = {"giou": ("box", None), "kd_cls": ("cls", "kd_cls_end"), "kd_obj": ("obj", "kd_obj_end")}
    scaled = dict(hyp)
    for key, f in factor.items():
        scaled[key] = hyp[key] * f
    for key, (base, end) in kd_gains.items():
        scaled[key] = hyp.get(key, hyp[base]) * factor[base]
        if end and hyp.get(end) is not None:
            scaled[end] = hyp[end] * factor[base]
    return scaled


class BCEBlurWithLogitsLoss(nn.Module):
    """BCE that damps the loss of predictions far above their target (missing labels hurt less)."""

    def __init__(self, alpha=0.05):
        super().__init__()
        self.loss_fcn = nn.BCEWithLogitsLoss(reduction="none")
        self.alpha = alpha

    def forward(self, pred, true):
        loss = self.loss_fcn(pred, true)
        dx = pred.sigmoid() - true  # only false positives (dx near 1) are damped
        loss = loss * (1 - torch.exp((dx - 1) / (self.alpha + 1e-4)))
        return loss.mean()


class FocalLoss(nn.Module):
    """Focal loss wrapped around a BCEWithLogitsLoss: down-weights easy examples by (1 - p_t)^gamma."""

    def __init__(self, loss_fcn, gamma=1.5, alpha=0.25):
        super().__init__()
        self.loss_fcn = loss_fcn
        self.gamma = gamma
        self.alpha = alpha
        self.reduction = loss_fcn.reduction
        self.loss_fcn.reduction = "none"  # the focal weights apply per element, before reducing

    def forward(self, pred, true):
        loss = self.loss_fcn(pred, true)
        p = pred.sigmoid()
        p_t = true * p + (1 - true) * (1 - p)
        alpha_factor = true * self.alpha + (1 - true) * (1 - self.alpha)
        loss = loss * alpha_factor * (1.0 - p_t) ** self.gamma
        if self.reduction == "mean":
            return loss.mean()
        if self.reduction == "sum":
            return loss.sum()
        return loss


class ComputeLoss:
    """YOLOv5 v6.0 detection loss.

    Reads the loss gains from ``model.hyp`` (box, obj, cls, cls_pw, obj_pw, anchor_t, fl_gamma and optionally
    label_smoothing), the IoU ratio of the objectness target from ``model.gr`` (default 1.0) and na, nc, nl,
    anchors (grid units) and stride from the model's Detect layer.

    Usage: ``loss, loss_items = ComputeLoss(model)(preds, targets)``.
    """

    def __init__(self, model, autobalance=False):
        m = de_parallel(model)
        if not hasattr(m, "hyp"):
            raise AttributeError("model.hyp is missing; set model.hyp to the (scaled) hyperparameter dict first")
        h = m.hyp
        missing = [k for k in ("box", "obj", "cls", "cls_pw", "obj_pw", "anchor_t", "fl_gamma") if k not in h]
        if missing:
            raise KeyError(f"model.hyp lacks {missing}; use a complete hyp YAML such as data/hyps/hyp.scratch.yaml")
        det = m.model[-1]
        device = det.anchors.device
        self.bce_cls = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([h["cls_pw"]], device=device))
        self.bce_obj = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([h["obj_pw"]], device=device))
        if h["fl_gamma"] > 0:
            self.bce_cls = FocalLoss(self.bce_cls, h["fl_gamma"])
            self.bce_obj = FocalLoss(self.bce_obj, h["fl_gamma"])
        self.cp, self.cn = smooth_BCE(h.get("label_smoothing", 0.0))
        self.balance = list(level_balance(det.nl))
        self.ssi = det.stride.tolist().index(16) if autobalance else 0  # balance is renormalised to stride 16
        self.autobalance = autobalance
        self.gr = float(getattr(m, "gr", 1.0))
        self.hyp = h
        self.device = device
        self.det = det  # anchors are read at call time so they follow the model across devices
        self.na, self.nc, self.nl = det.na, det.nc, det.nl

    def __call__(self, preds, targets):
        """Loss of one batch.

        Args:
            preds: list of nl raw maps (bs, na, ny, nx, nc + 5) (train-mode Detect output); an eval-mode
                (decoded, maps) tuple is accepted too. Cast to float32 here (AMP safety).
            targets: (nt, 6) [img_idx, cls, xc, yc, w, h], xywh normalised to the input image.

        Returns:
            (loss, loss_items): loss (1,) = (lbox + lobj + lcls) * bs; loss_items (3,) detached [lbox, lobj, lcls].
        """
        if isinstance(preds, tuple) and len(preds) == 2 and isinstance(preds[1], (list, tuple)):
            preds = preds[1]
        preds = [p.float() for p in preds]
        device = preds[0].device
        if device != self.device:  # the model moved after this loss was built: move the pos_weight buffers too
            self.bce_cls.to(device)
            self.bce_obj.to(device)
            self.device = device
        targets = targets.to(device=device, dtype=torch.float32)
        lbox, lobj, lcls = (torch.zeros(1, device=device) for _ in range(3))
        tcls, tbox, indices, anchors = self.build_targets(preds, targets)
        for i, pi in enumerate(preds):
            b, a, gj, gi = indices[i]
            tobj = torch.zeros(pi.shape[:4], device=device)  # (bs, na, ny, nx)
            if b.shape[0]:
                ps = pi[b, a, gj, gi]  # (n, nc + 5) predictions at the assigned cells
                pxy = ps[:, :2].sigmoid() * 2 - 0.5
                pwh = (ps[:, 2:4].sigmoid() * 2) ** 2 * anchors[i]
                iou = bbox_iou(torch.cat((pxy, pwh), 1), tbox[i], x1y1x2y2=False, CIoU=True)  # (n,)
                lbox = lbox + (1.0 - iou).mean()
                tobj[b, a, gj, gi] = (1.0 - self.gr) + self.gr * iou.detach().clamp(0)
                if self.nc > 1:  # a single class needs no class loss: objectness already says it
                    t = torch.full_like(ps[:, 5:], self.cn)
                    t[torch.arange(b.shape[0], device=device), tcls[i]] = self.cp
                    lcls = lcls + self.bce_cls(ps[:, 5:], t)
            obji = self.bce_obj(pi[..., 4], tobj)
            lobj = lobj + obji * self.balance[i]
            if self.autobalance:
                self.balance[i] = self.balance[i] * 0.9999 + 0.0001 / obji.detach().item()
        if self.autobalance:
            self.balance = [x / self.balance[self.ssi] for x in self.balance]
        lbox = lbox * self.hyp["box"]
        lobj = lobj * self.hyp["obj"]
        lcls = lcls * self.hyp["cls"]
        bs = preds[0].shape[0]
        return (lbox + lobj + lcls) * bs, torch.cat((lbox, lobj, lcls)).detach()

    def build_targets(self, preds, targets):
        """Assign every target to anchors (wh ratio below anchor_t) and to its cell plus two neighbour cells.

        Args:
            preds: list of nl maps (bs, na, ny, nx, no); only their shapes are used.
            targets: (nt, 6) [img_idx, cls, xc, yc, w, h] normalised.

        Returns:
            Per-level lists: tcls (n,) class ids; tbox (n, 4) [x offset from cell corner, y offset, w, h] in grid
            units; indices (b, a, gj, gi) each (n,); anchors (n, 2) in grid units.
        """
        na, nt, device = self.na, targets.shape[0], targets.device
        anchor_ids = torch.arange(na, device=device, dtype=torch.float32).view(na, 1).expand(na, nt)
        targets = torch.cat((targets.unsqueeze(0).expand(na, nt, 6), anchor_ids[..., None]), 2)  # (na, nt, 7)
        offsets = torch.tensor(NEIGHBOUR_OFFSETS, device=device, dtype=torch.float32) * 0.5  # (5, 2)
        all_anchors = self.det.anchors.to(device=device, dtype=torch.float32)  # (nl, na, 2)
        tcls, tbox, indices, anch = [], [], [], []
        for i, p in enumerate(preds):
            ny, nx = p.shape[2], p.shape[3]
            gain = torch.tensor([1, 1, nx, ny, nx, ny, 1], device=device, dtype=torch.float32)
            t = targets * gain  # (na, nt, 7) with xywh in grid units
            t, off = self._select(t, all_anchors[i], offsets, gain)
            b, c = t[:, 0].long(), t[:, 1].long()
            gxy, gwh, a = t[:, 2:4], t[:, 4:6], t[:, 6].long()
            gij = (gxy - off).long()
            gij[:, 0].clamp_(0, nx - 1)
            gij[:, 1].clamp_(0, ny - 1)
            indices.append((b, a, gij[:, 1], gij[:, 0]))
            tbox.append(torch.cat((gxy - gij, gwh), 1))
            anch.append(all_anchors[i][a])
            tcls.append(c)
        return tcls, tbox, indices, anch

    def _select(self, t, anchors, offsets, gain):
        """Keep (target, anchor) pairs within anchor_t and replicate them to neighbour cells.

        Args:
            t: (na, nt, 7) targets in grid units with the anchor index last. anchors: (na, 2). offsets: (5, 2).

        Returns:
            (t (n, 7), off (n, 2)): selected rows and the cell offset to subtract from each centre.
        """
        if not t.shape[1]:
            return t[0], torch.zeros((0, 2), device=t.device)
        ratio = t[..., 4:6] / anchors[:, None]  # (na, nt, 2)
        t = t[torch.max(ratio, 1 / ratio).max(2)[0] < self.hyp["anchor_t"]]  # (m, 7)
        gxy = t[:, 2:4]
        gxy_inv = gain[[2, 3]] - gxy  # distance to the right/bottom edge
        left, up = ((gxy % 1 < 0.5) & (gxy > 1)).T
        right, down = ((gxy_inv % 1 < 0.5) & (gxy_inv > 1)).T
        keep = torch.stack((torch.ones_like(left), left, up, right, down))  # (5, m)
        t = t.unsqueeze(0).expand(5, *t.shape)[keep]
        off = offsets[:, None].expand(5, gxy.shape[0], 2)[keep]
        return t, off
