"""PyTorch helpers: devices, seeding, EMA, BatchNorm fusion and model summaries."""
from __future__ import annotations

import ctypes
import math
import os
import random
import sys
from collections import Counter
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from utils.general import LOGGER


def select_device(device: str = "", batch_size: int = 0) -> torch.device:
    """Turn a YOLOv5 device string ('', 'cpu', '0', '0,1') into a torch.device.

    Raises a ValueError that says the fix when CUDA is requested on a machine without it.
    """
    spec = str(device).strip().lower().replace("cuda:", "")
    if spec == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = "-1"
        return torch.device("cpu")
    if spec:
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device} requested but CUDA is not available on this machine; "
                             f"use --device cpu (or leave --device empty)")
        ids = [int(x) for x in spec.split(",") if x != ""]
        if any(i >= torch.cuda.device_count() for i in ids):
            raise ValueError(f"--device {device} asks for GPU ids {ids} but only "
                             f"{torch.cuda.device_count()} GPU(s) exist; pick ids below that")
        if batch_size and len(ids) > 1 and batch_size % len(ids):
            raise ValueError(f"--batch-size {batch_size} is not a multiple of the GPU count {len(ids)}")
        return torch.device(f"cuda:{ids[0]}")
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX), where bf16 autocast is a speed path.

    Elsewhere bf16 kernels are emulated and slower than float32. Asks torch's CPU feature probes, falling back on
    the /proc/cpuinfo flags where this torch build has no probe.
    """
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(callable(probe) for probe in probes):
        return any(bool(probe()) for probe in probes if callable(probe))
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass(frozen=True)
class Precision:
    """How a run computes: autocast dtype (None = float32 throughout) and memory format, for one device.

    Weights, optimizer state and losses stay float32 whatever the autocast dtype (master weights).
    """

    device_type: str
    dtype: torch.dtype | None = None
    channels_last: bool = False

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    @property
    def name(self) -> str:
        return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(self.dtype, "fp32")

    def autocast(self):
        """The autocast context for a forward pass (a disabled one for float32)."""
        return torch.autocast(self.device_type, dtype=self.dtype or torch.float32, enabled=self.enabled)

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        """Images (bs, 3, h, w) in the run's memory format."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def runs_channels_last(model: nn.Module) -> bool:
    """True when model's first parameter (a YOLOv5 model's first conv weight) is a channels_last 4-D tensor: the
    model was put in that layout, so its inputs should be too. False for an exported backend without parameters."""
    first = next(model.parameters(), None)
    return first is not None and first.dim() == 4 and first.is_contiguous(memory_format=torch.channels_last)


def select_precision(device: torch.device, amp: bool | None = None) -> Precision:
    """The mixed-precision choice for device: fp16 autocast on CUDA, bf16 autocast on CPUs with native bf16,
    float32 elsewhere. Models and inputs are channels_last on every CPU (oneDNN's convolutions are faster in that
    layout in float32 as well: bench/layout.py) and on CUDA whenever autocast is on.

    Args:
        device: the training device.
        amp: None chooses automatically; True/False (--amp/--no-amp) overrides. True on a CPU without native bf16
            still uses bf16 (emulated, usually slower; train.prepare_run warns about it).
    """
    device = torch.device(device)
    if device.type == "cuda":
        use = amp is not False
        return Precision("cuda", torch.float16 if use else None, channels_last=use)
    if device.type != "cpu":  # other backends: float32, as before
        return Precision(device.type)
    use = cpu_has_native_bf16() if amp is None else bool(amp)
    return Precision(device.type, torch.bfloat16 if use else None, channels_last=True)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt() parameter numbers from glibc's malloc.h
KEEP_MALLOC_ENV = "YOLOKD_KEEP_MALLOC"  # set to 1 to leave glibc's allocator settings alone


def tune_cpu_allocator(device: torch.device | None = None, mmap_threshold: int = 32 * 2 ** 20,
                       trim_threshold: int = 2 ** 30) -> bool:
    """Let glibc reuse freed tensor memory between training steps instead of handing it back to the kernel.

    A CPU training step frees hundreds of MB of activations at its end and allocates them again in the next step.
    With glibc's defaults, blocks above a few MB are mmap'd and freed memory at the top of the heap is trimmed, so
    every step starts by page-faulting fresh zeroed pages in; a KD step, which also runs the teacher, pays it
    twice. Serving blocks up to ``mmap_threshold`` from the heap and trimming only above ``trim_threshold`` keeps
    those pages mapped (bench/allocator.py, yolov5m->s at 320 px on 2 cores: plain step -11%, KD step -8%). The
    process keeps its peak memory mapped until exit, which a training process reaches every step anyway.

    Process-wide and idempotent; a no-op (returns False) when ``device`` is given and is not the CPU (activations
    then live in the GPU's caching allocator), off Linux, without glibc, or when the environment variable
    YOLOKD_KEEP_MALLOC is set. DataLoader workers forked afterwards inherit the settings.
    """
    if device is not None and torch.device(device).type != "cpu":
        return False
    if not sys.platform.startswith("linux") or os.environ.get(KEEP_MALLOC_ENV):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return (mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
            and mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) == 1)


def init_seeds(seed: int = 0, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    if deterministic:
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)


def is_parallel(model: nn.Module) -> bool:
    return isinstance(model, (nn.parallel.DataParallel, nn.parallel.DistributedDataParallel))


def de_parallel(model: nn.Module) -> nn.Module:
    """The bare model inside a DP/DDP wrapper (or the model itself)."""
    return model.module if is_parallel(model) else model


# YOLOv5 v6.0 builds every BatchNorm2d with these (PyTorch's defaults are eps 1e-5, momentum 0.1); official
# checkpoints only reproduce their outputs with them, because the eps enters every normalisation.
BN_EPS, BN_MOMENTUM = 1e-3, 0.03
LEGACY_BN_EPS, LEGACY_BN_MOMENTUM = 1e-5, 0.1  # what this project's models used before adopting v6.0's values
# in place, these give bit-identical values and gradients (ELU-type ones would round their gradients differently)
INPLACE_ACTIVATIONS = (nn.SiLU, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardswish, nn.Hardsigmoid, nn.Mish)
BATCHNORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)  # --sync-bn converts the first into the second


def initialize_weights(model: nn.Module, eps: float = BN_EPS, momentum: float = BN_MOMENTUM) -> nn.Module:
    """Set every BatchNorm2d's eps and momentum (YOLOv5 v6.0's by default) and make the activations work in place.

    Weights are left as they are (PyTorch's default initialisation, as in v6.0). In-place activations only save
    memory; they are safe because each one follows a BatchNorm or convolution whose output nothing else reads
    (so hook a whole block such as a Conv to record features, not the BatchNorm inside it).

    Args:
        model: any module; changed in place.
        eps, momentum: BatchNorm settings to apply (pass LEGACY_BN_EPS / LEGACY_BN_MOMENTUM to rebuild a model
            saved before v6.0's values were adopted).

    Returns:
        model itself.
    """
    for m in model.modules():
        if isinstance(m, BATCHNORMS):
            m.eps, m.momentum = float(eps), None if momentum is None else float(momentum)  # None: cumulative mean
        elif isinstance(m, INPLACE_ACTIVATIONS):
            m.inplace = True
    return model


def batchnorm_settings(model: nn.Module) -> dict | None:
    """{'eps': float, 'momentum': float} of the model's BatchNorm2d layers (the most common pair), or None if it
    has none."""
    return most_common_batchnorm((m.eps, m.momentum) for m in model.modules() if isinstance(m, BATCHNORMS))


def most_common_batchnorm(pairs) -> dict | None:
    """{'eps', 'momentum'} of the most frequent (eps, momentum) pair (ties: the first seen), None for no pairs."""
    counts = Counter((float(eps), None if momentum is None else float(momentum)) for eps, momentum in pairs)
    if not counts:
        return None
    eps, momentum = counts.most_common(1)[0][0]
    return {"eps": eps, "momentum": momentum}


@torch.no_grad()
def fuse_conv_and_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new Conv2d (with bias) computing bn(conv(x)) in eval mode."""
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, kernel_size=conv.kernel_size, stride=conv.stride,
                      padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True)
    fused = fused.requires_grad_(False).to(conv.weight.device)
    scale = bn.weight.float() / torch.sqrt(bn.running_var.float() + bn.eps)  # (c_out,)
    w = conv.weight.float() * scale.view(-1, 1, 1, 1)
    b_conv = conv.bias.float() if conv.bias is not None else torch.zeros_like(bn.running_mean, dtype=torch.float)
    b = (b_conv - bn.running_mean.float()) * scale + bn.bias.float()
    fused.weight.copy_(w.to(fused.weight.dtype))
    fused.bias.copy_(b.to(fused.bias.dtype))
    return fused.to(conv.weight.dtype)


def _batch_norm_flops(input_shape, *args, out_shape=None, **kwargs) -> int:
    """Four FLOPs per element: YOLOv5's published GFLOPs count BatchNorm as two multiply-adds per element."""
    return 4 * math.prod(input_shape)


def count_flops(model: nn.Module, imgsz: int = 640, ch: int = 3) -> float:
    """GFLOPs of one forward at imgsz x imgsz via torch.utils.flop_counter.

    Convolutions and matmuls count 2 FLOPs per multiply-add (flop_counter's own formulas); BatchNorm counts 4 per
    element, so the figures agree with YOLOv5's model summaries.
    """
    from torch.utils.flop_counter import FlopCounterMode

    p = next(model.parameters())
    x = torch.zeros(1, ch, imgsz, imgsz, device=p.device, dtype=p.dtype)
    model = deepcopy(model).eval()
    batch_norms = (torch.ops.aten.native_batch_norm, torch.ops.aten._native_batch_norm_legit_no_training)
    mapping = {op: _batch_norm_flops for op in batch_norms}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        model(x)
    return counter.get_total_flops() / 1e9


def model_info(model: nn.Module, imgsz: int = 640, name: str | None = None, verbose: bool = False) -> str:
    """One summary line: '<name> summary: L layers, P parameters, G gradients, F GFLOPs'."""
    n_p = sum(p.numel() for p in model.parameters())
    n_g = sum(p.numel() for p in model.parameters() if p.requires_grad)
    layers = len(list(model.modules()))
    try:
        flops = f", {count_flops(model, imgsz):.1f} GFLOPs"
    except Exception as e:  # flop counting is informative only
        LOGGER.debug(f"FLOP count failed: {e}")
        flops = ""
    line = f"{name or type(model).__name__} summary: {layers} layers, {n_p} parameters, {n_g} gradients{flops}"
    if verbose:
        LOGGER.info(line)
    return line


class ModelEMA:
    """Exponential moving average of a model's weights (and float buffers).

    The decay ramps up as ``decay * (1 - exp(-updates / tau))`` so the average follows the model closely at the
    start of training, like YOLOv5's EMA.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000, updates: int = 0):
        self.ema = deepcopy(de_parallel(model)).eval()
        self.updates = updates
        self.decay_at = lambda n: decay * (1 - math.exp(-n / tau))
        for p in self.ema.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay_at(self.updates)
        source = de_parallel(model).state_dict()
        ema_state = self.ema.state_dict()
        names = [k for k, v in ema_state.items() if v.dtype.is_floating_point]
        # ema += (1 - d) * (model - ema), i.e. d * ema + (1 - d) * model, in one multi-tensor kernel
        torch._foreach_lerp_([ema_state[k] for k in names], [source[k].detach() for k in names], 1 - d)

    def update_attr(self, model: nn.Module, include=("yaml", "nc", "hyp", "gr", "names", "stride")) -> None:
        """Copy plain attributes (names, hyp, ...) from the training model onto the EMA."""
        for k in include:
            if hasattr(model, k):
                setattr(self.ema, k, getattr(model, k))
