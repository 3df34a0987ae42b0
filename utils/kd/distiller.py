"""Wiring of feature distillation: KD settings, the student-with-adapters module and the feature-loss sum."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from utils.kd.adapters import adapt, build_adapters
from utils.kd.losses import (BOX_KD_KINDS, FEATURE_LOSSES, GENERATIVE, LOSS_WEIGHTS, NEEDS_ADAPTER, NEEDS_MASK,
                             OUTPUT_KD_KINDS, SIZE_FREE_FROM_MAPS, gt_mask, size_free)
from utils.kd.recorder import FeatureRecorder

SCHEDULES = ("const", "cos")


@dataclass(frozen=True)
class KDConfig:
    """Distillation settings (train_kd.py flags).

    Attributes:
        output_loss: output KD kind, 'l2', 'kl' or 'bce' (--kd_loss_selected).
        box_loss: box term of output KD, 'l2' or 'ciou' (--kd_box, utils.kd.losses.BOX_KD_KINDS).
        obj_iou: scale the objectness KD target by the student-teacher box CIoU (--kd_obj_iou).
        obj_all: objectness KD on every cell in the detection loss's form (--kd_obj_all; output_kd_terms).
        cls_floor: l2 class KD takes teacher class logits below -cls_floor, and the student's there, as -cls_floor
            (--kd_cls_floor; 0: off).
        temperature: softmax temperature of 'kl'.
        alpha: weight of output KD; beta: weight of feature KD.
        feat_losses: feature losses from utils.kd.losses.FEATURE_LOSSES (empty = output KD only).
        ratio: background weight of the ground-truth mask of 'at_masked'.
        cwd_tau: temperature of channel-wise distillation.
        schedule: 'const' or 'cos' (KD weights decay to 1% by the last epoch).
        stop_epoch: KD is switched off from this epoch on (-1: never).
        s_layers, t_layers: explicit layer names (None: automatic pairing).
        class_map: YAML file mapping dataset class names to teacher class names (None: match by name).
    """

    output_loss: str = "l2"
    box_loss: str = "l2"
    obj_iou: bool = False
    obj_all: bool = False
    cls_floor: float = 0.0
    temperature: float = 20.0
    alpha: float = 1.0
    beta: float = 1.0
    feat_losses: tuple = ()
    ratio: float = 0.25
    cwd_tau: float = 1.0
    schedule: str = "const"
    stop_epoch: int = -1
    s_layers: tuple | None = None
    t_layers: tuple | None = None
    class_map: str | None = None

    def __post_init__(self):
        if self.output_loss not in OUTPUT_KD_KINDS:
            raise ValueError(f"--kd_loss_selected {self.output_loss}: choose one of {', '.join(OUTPUT_KD_KINDS)}")
        if self.box_loss not in BOX_KD_KINDS:
            raise ValueError(f"--kd_box {self.box_loss}: choose one of {', '.join(BOX_KD_KINDS)}")
        if self.cls_floor < 0 or (self.cls_floor > 0 and self.output_loss != "l2"):
            raise ValueError(f"--kd_cls_floor {self.cls_floor}: a positive floor works with --kd_loss_selected l2 only "
                             f"(0: off)")
        unknown = [f for f in self.feat_losses if f not in FEATURE_LOSSES]
        if unknown:
            raise ValueError(f"--feat_loss {' '.join(unknown)}: choose from {', '.join(FEATURE_LOSSES)} or none")
        generative = [f for f in self.feat_losses if f in GENERATIVE]
        other_adapted = [f for f in self.feat_losses if f in NEEDS_ADAPTER and f not in GENERATIVE]
        if generative and other_adapted:
            raise ValueError(f"--feat_loss {' '.join(self.feat_losses)}: {generative[0]} trains its own generator in "
                             f"place of the 1x1 adapters that {', '.join(other_adapted)} need(s); combine "
                             f"{generative[0]} with at or at_masked only")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--kd_schedule {self.schedule}: choose one of {', '.join(SCHEDULES)}")

    def weight(self, epoch: int, epochs: int) -> float:
        """Multiplier of every KD term at this epoch: 1 (const), cosine 1 -> 0.01 (cos), 0 after stop_epoch."""
        if 0 <= self.stop_epoch <= epoch:
            return 0.0
        if self.schedule == "cos":
            return 0.01 + 0.99 * (1 + math.cos(math.pi * epoch / max(epochs - 1, 1))) / 2
        return 1.0

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


class KDStudent(nn.Module):
    """What the optimizer and DDP see in a KD run: the student plus its adapters.

    forward(imgs) returns (student raw maps, [(features, adapted features) per layer pair]). Adapters run inside
    forward so that DDP treats them like any other student parameter.
    """

    def __init__(self, student: nn.Module, adapters: nn.ModuleDict, layer_names):
        super().__init__()
        self.model = student
        self.adapters = adapters
        self.layer_names = list(layer_names)

    def forward(self, imgs):
        if not self.layer_names:
            return self.model(imgs), []
        with FeatureRecorder(self.model, self.layer_names) as rec:
            preds = self.model(imgs)
        feats = rec.get(self.layer_names)
        return preds, [(f, adapt(self.adapters, i, f)) for i, f in enumerate(feats)]


class Distiller:
    """Feature losses over layer pairs.

    Args:
        pairs: utils.kd.pairing.LayerPair list (s_name, t_name, s_channels, t_channels, stride).
        cfg: KDConfig.
        channel_names: student layer names of the pairs that the channel-by-channel losses (ft, cwd, mimic, pkd,
            through adapters) compare; None: every pair (utils.kd.task.channel_pair_names). Attention transfer
            compares every pair.
    """

    def __init__(self, pairs, cfg: KDConfig, channel_names=None):
        self.pairs = list(pairs) if cfg.feat_losses else []
        self.cfg = cfg
        channelwise = [channel_names is None or p.s_name in channel_names for p in self.pairs]
        needs_adapter = any(f in NEEDS_ADAPTER for f in cfg.feat_losses)
        self.adapters = build_adapters([p.s_channels for p in self.pairs], [p.t_channels for p in self.pairs],
                                       needed=[needs_adapter and c for c in channelwise],
                                       generative=any(f in GENERATIVE for f in cfg.feat_losses))
        self.losses = [(name, FEATURE_LOSSES[name]) for name in cfg.feat_losses]
        # the pairs each loss compares (indices)
        self.loss_pairs = {name: [i for i, c in enumerate(channelwise) if c or name not in NEEDS_ADAPTER]
                           for name in cfg.feat_losses}

    @property
    def s_names(self) -> list:
        return [p.s_name for p in self.pairs]

    @property
    def t_names(self) -> list:
        return [p.t_name for p in self.pairs]

    def feature_loss(self, s_feats, t_feats, targets: torch.Tensor) -> torch.Tensor:
        """Each feature loss averaged over the layer pairs it compares (self.loss_pairs: every pair, except that
        channel-by-channel losses skip pairs not marked channelwise), in its size-free form (losses.size_free),
        times its weight (losses.LOSS_WEIGHTS); summed over the chosen losses. Adding or removing a layer pair
        therefore does not change the term's scale.

        Args:
            s_feats: [(features (bs, c_s, h, w), adapted (bs, c_t, h, w))] from KDStudent.
            t_feats: [teacher features (bs, c_t, h, w)].
            targets: (n, 6) [img_idx, cls, xc, yc, w, h] normalised, for 'at_masked'.
        """
        total = s_feats[0][0].new_zeros((), dtype=torch.float32)
        masks = {}
        for name, fn in self.losses:
            pairs = self.loss_pairs[name]
            term = total.new_zeros(())
            for i in pairs:
                (s, s_adapted), t = s_feats[i], t_feats[i]
                student = s_adapted if name in NEEDS_ADAPTER else s
                if name in NEEDS_MASK:
                    bs, _, h, w = s.shape
                    if (h, w) not in masks:
                        masks[(h, w)] = gt_mask(targets, bs, h, w, ratio=self.cfg.ratio, device=s.device)
                    value = fn(student, t, masks[(h, w)])
                elif name == "cwd":
                    value = fn(student, t, tau=self.cfg.cwd_tau)
                elif name in SIZE_FREE_FROM_MAPS:
                    value = None  # size_free computes this one from the maps; the plain loss would be thrown away
                else:
                    value = fn(student, t)
                term = term + size_free(name, value, t, student)
            total = total + LOSS_WEIGHTS[name] * term / max(len(pairs), 1)
        return total

    @staticmethod
    def keep_in_graph(s_feats) -> torch.Tensor:
        """A zero that touches every adapted feature, so DDP sees adapter gradients while KD is switched off."""
        zero = None
        for _, adapted in s_feats:
            term = adapted.sum() * 0.0
            zero = term if zero is None else zero + term
        return zero if zero is not None else 0.0
