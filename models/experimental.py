"""Loading detectors for inference: attempt_load (our and official YOLOv5 checkpoints) and Ensemble."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from models.yolo import Detect
from utils.checkpoint import load_checkpoint, model_from_checkpoint


class Ensemble(nn.ModuleList):
    """Several detectors run on the same images; their detections are pooled for one NMS pass."""

    def forward(self, x, augment=False, profile=False, visualize=False):
        """Concatenate the members' eval-mode decoded outputs.

        Args:
            x: images (bs, 3, h, w).

        Returns:
            (decoded, None): decoded is (bs, sum of N_i, nc + 5); per-member raw maps are not kept.
        """
        return torch.cat([member(x)[0] for member in self], 1), None


def _load_one(path, device, inplace: bool, fuse: bool) -> nn.Module:
    model = model_from_checkpoint(load_checkpoint(path, map_location="cpu"))
    for m in model.modules():
        if isinstance(m, Detect):
            m.inplace = inplace
    if fuse:
        with torch.no_grad():  # fusing copies weights into new convs; keep them autograd leaves
            model.fuse()
    return model.float().eval().to(device)


def attempt_load(weights, map_location=None, inplace=True, fuse=True):
    """Load one checkpoint as a Model, or several as an Ensemble, ready for inference.

    Accepts this project's checkpoints and official YOLOv5 v5.0-v7.0 ``.pt`` files (read without unrestricted
    unpickling, see utils.checkpoint). EMA weights are used when present.

    Args:
        weights: a path, or a list/tuple of paths for an ensemble.
        map_location: device to put the model on (default CPU).
        inplace: value for Detect.inplace.
        fuse: fold BatchNorm into the convolutions.

    Returns:
        Model (or Ensemble) in eval mode, float32, with .names (list), .nc (int) and .stride (tensor (nl,)).
    """
    device = torch.device(map_location) if map_location is not None else torch.device("cpu")
    paths = [weights] if isinstance(weights, (str, Path)) else list(weights)
    if not paths:
        raise ValueError("attempt_load got no weights; pass a checkpoint path or a list of paths")
    models = [_load_one(p, device, inplace, fuse) for p in paths]
    if len(models) == 1:
        return models[0]
    ncs = {m.nc for m in models}
    if len(ncs) > 1:
        raise ValueError(f"ensemble members have different class counts {sorted(ncs)} ({', '.join(map(str, paths))})"
                         f"; ensemble only models trained on the same classes")
    ensemble = Ensemble(models).eval()
    ensemble.names, ensemble.nc = models[0].names, models[0].nc
    ensemble.stride = max((m.stride for m in models), key=lambda s: float(s.max()))  # coarsest grid wins
    return ensemble
