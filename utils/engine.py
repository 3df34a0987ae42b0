"""The training engine shared by train.py and train_kd.py.

The engine owns the loop: data, optimizer, warmup and LR schedule, gradient accumulation, AMP, EMA, validation,
checkpoints, resume and DDP. What a training *step* computes comes from a task object:

- ``DetectionTask`` (this module): forward the model, YOLOv5 detection loss.
- ``utils.kd.task.DistillationTask``: student forward + frozen-teacher forward + detection and KD losses.

A task provides ``model`` (the detector that is validated, averaged by EMA and saved), ``trainable`` (the module
the optimizer and DDP see: the model, or the model plus KD adapters), ``loss_names``, ``skip_autoanchor``,
``setup(trainer)``, ``on_epoch_start(epoch, epochs)``, ``train_step(module, imgs, targets) -> (loss, items)``,
``state_dict()`` (extra checkpoint keys) and ``load_state_dict(ckpt)``.
"""
from __future__ import annotations

import math
import os
import random
from contextlib import contextmanager
from copy import deepcopy
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from utils.general import LOGGER, check_img_size, colorstr
from utils.torch_utils import ModelEMA, init_seeds, select_precision, tune_cpu_allocator

MAX_BAD_STEPS = 5  # consecutive non-finite losses before a run is stopped
# Later-YOLOv5 behaviours as hyp keys; these defaults are YOLOv5 v6.0's (hyp.demo.yaml sets other values).
WARMUP_MIN_ITERS = 1000  # hyp 'warmup_min_iters': warm-up lasts at least this many iterations
GRAD_CLIP_NORM = 0.0  # hyp 'grad_clip_norm': clip the gradient norm of the trainable module to this (0: off)
EMA_DECAY = 0.9999  # hyp 'ema_decay': the weight average's decay once ramped up (window ~ 1 / (1 - decay) updates)
EMA_TAU = 2000  # hyp 'ema_tau': updates over which the decay ramps up, as decay * (1 - exp(-updates / tau))
HYP_DEFAULTS = {"nbs": 64, "warmup_min_iters": WARMUP_MIN_ITERS, "grad_clip_norm": GRAD_CLIP_NORM,
                "ema_decay": EMA_DECAY, "ema_tau": EMA_TAU}


class DetectionTask:
    """Plain YOLOv5 training: one forward, one detection loss."""

    loss_names = ("box_loss", "obj_loss", "cls_loss")
    skip_autoanchor = False

    def __init__(self, model: nn.Module):
        self.model = model
        self.compute_loss = None

    @property
    def trainable(self) -> nn.Module:
        return self.model

    def setup(self, trainer: "Trainer") -> None:
        from utils.loss import ComputeLoss

        self.compute_loss = ComputeLoss(self.model)

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        pass

    def train_step(self, module: nn.Module, imgs: torch.Tensor, targets: torch.Tensor):
        """Returns (loss scaled by batch size, detached loss items (3,))."""
        return self.compute_loss(module(imgs), targets)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, ckpt: dict) -> None:
        pass

    @classmethod
    def build(cls, model: nn.Module, trainer: "Trainer") -> "DetectionTask":
        return cls(model)


def distributed_env() -> tuple[int, int, int]:
    """(LOCAL_RANK, RANK, WORLD_SIZE) as set by torchrun; (-1, -1, 1) for a single process."""
    return int(os.getenv("LOCAL_RANK", -1)), int(os.getenv("RANK", -1)), int(os.getenv("WORLD_SIZE", 1))


@contextmanager
def rank_zero_first(rank: int):
    """Let rank 0 do something first (build caches, generate data) while the other ranks wait."""
    if rank not in (-1, 0):
        dist.barrier()
    yield
    if rank == 0:
        dist.barrier()


def smart_optimizer(model: nn.Module, name: str = "SGD", lr: float = 0.01, momentum: float = 0.937,
                    weight_decay: float = 1e-5) -> torch.optim.Optimizer:
    """YOLOv5's three parameter groups: 0 = BatchNorm weights (no decay), 1 = other weights (decay), 2 = biases.

    The group order matters: results.csv logs their learning rates as x/lr0..x/lr2 and warmup treats group 2
    (biases) differently.
    """
    bn_weights, weights, biases = [], [], []
    norm_types = tuple(v for k, v in vars(nn).items() if "Norm" in k and isinstance(v, type))
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if pname == "bias":
                biases.append(p)
            elif isinstance(module, norm_types):
                bn_weights.append(p)
            else:
                weights.append(p)
    # the fused (single-kernel) update is the same arithmetic, about 3x faster on a CPU than the per-tensor loop
    fused = {"fused": True} if _fused_optimizers_work(bn_weights + weights + biases) else {}
    if name == "Adam":
        optimizer = torch.optim.Adam(bn_weights, lr=lr, betas=(momentum, 0.999), **fused)
    elif name == "AdamW":
        optimizer = torch.optim.AdamW(bn_weights, lr=lr, betas=(momentum, 0.999), weight_decay=0.0, **fused)
    elif name == "SGD":
        optimizer = torch.optim.SGD(bn_weights, lr=lr, momentum=momentum, nesterov=True, **fused)
    else:
        raise ValueError(f"--optimizer {name} is not supported; use SGD, Adam or AdamW")
    optimizer.add_param_group({"params": weights, "weight_decay": weight_decay})
    optimizer.add_param_group({"params": biases})
    LOGGER.info(f"{colorstr('optimizer:')} {name} with parameter groups {len(bn_weights)} weight (no decay), "
                f"{len(weights)} weight, {len(biases)} bias")
    return optimizer


def _fused_optimizers_work(params) -> bool:
    """Whether this torch has fused SGD/Adam kernels for these parameters' device (CPU ones since torch 2.4)."""
    if not params or not all(p.is_floating_point() for p in params):
        return False
    probe = torch.zeros(1, device=params[0].device, requires_grad=True)
    try:
        torch.optim.SGD([probe], lr=0.1, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


def lr_lambda(epochs: int, lrf: float, cosine: bool = True):
    """Learning-rate multiplier per epoch, as YOLOv5 v6.0 schedules it.

    cosine (v6.0's default, 'one cycle'): 1 at epoch 0 falling along half a cosine to lrf at epoch ``epochs`` (one
    past the last epoch, so the last epoch still trains slightly above lrf). linear (--linear-lr): 1 at epoch 0
    down to exactly lrf at the last epoch, ``epochs - 1``.
    """
    if cosine:
        span = max(epochs, 1)
        return lambda e: ((1 - math.cos(e * math.pi / span)) / 2) * (lrf - 1) + 1
    span = max(epochs - 1, 1)
    return lambda e: (1 - e / span) * (1.0 - lrf) + lrf


class EarlyStopping:
    """Stop when fitness has not improved for ``patience`` epochs."""

    def __init__(self, patience: int = 30):
        self.best_fitness = 0.0
        self.best_epoch = 0
        self.patience = patience or float("inf")

    def __call__(self, epoch: int, fitness: float) -> bool:
        if fitness >= self.best_fitness:
            self.best_epoch, self.best_fitness = epoch, fitness
        stop = (epoch - self.best_epoch) >= self.patience
        if stop:
            LOGGER.info(f"Stopping training early as no improvement observed in the last {self.patience} epochs. "
                        f"Best results at epoch {self.best_epoch}; pass --patience 0 to disable early stopping.")
        return stop


class Trainer:
    """Trains ``task.model`` with YOLOv5 v6.0's recipe; see the module docstring for the task protocol.

    Args:
        opt: parsed train.py options (argparse.Namespace); never modified.
        hyp: hyperparameter dict (hyp.*.yaml); never modified.
        save_dir: the run folder (runs/train/expN).
        device: torch.device for this process.
        task_factory: ``factory(model, trainer) -> task``; called once the model and data are ready.
        callbacks: objects with any of on_train_start / on_train_batch_end / on_fit_epoch_end / on_train_end.
    """

    def __init__(self, opt, hyp: dict, save_dir: Path, device: torch.device, task_factory=DetectionTask.build,
                 callbacks=()):
        from utils.datasets import check_dataset

        self.opt, self.device, self.save_dir = opt, device, Path(save_dir)
        self.local_rank, self.rank, self.world_size = distributed_env()
        self.main = self.rank in (-1, 0)
        self.cuda = device.type == "cuda"
        self.precision = select_precision(device, getattr(opt, "amp", None))  # train.prepare_run logged it
        self.amp = self.precision.enabled
        self.callbacks = list(callbacks)
        self.wdir = self.save_dir / "weights"
        self.last, self.best = self.wdir / "last.pt", self.wdir / "best.pt"
        init_seeds(opt.seed + 1 + max(self.rank, 0), deterministic=not self.cuda)  # cuDNN: speed over bits
        tune_cpu_allocator(device)  # CPU: activations are reallocated every step, keep their pages mapped
        with rank_zero_first(self.rank):
            self.data = check_dataset(opt.data)
        self.nc = 1 if opt.single_cls else int(self.data["nc"])
        self.names = ["item"] if opt.single_cls and len(self.data["names"]) != 1 else list(self.data["names"])
        self.ckpt = self._load_start_checkpoint()
        self.model = self._build_model(hyp.get("anchors")).to(device)
        self._freeze_layers()
        self.gs = max(int(self.model.stride.max()), 32)
        self.imgsz = check_img_size(opt.imgsz, self.gs, floor=self.gs * 2)
        self.batch_size = opt.batch_size // self.world_size
        self.nbs = int(hyp.get("nbs", 64))  # nominal batch size: gradients accumulate up to it
        self.accumulate = max(round(self.nbs / opt.batch_size), 1)
        self.hyp = self._scaled_hyp(hyp)
        # The task comes before the data: a KD teacher that is missing or does not fit the student stops the run
        # before any dataset is scanned or cached.
        self.task = task_factory(self.model, self)
        self._sync_batchnorm(self.task.trainable)
        if self.precision.channels_last:  # student and KD adapters; the task has set the teacher's format
            self.task.trainable.to(memory_format=torch.channels_last)
        self._build_loaders()
        self._check_anchors()
        self._attach_model_attributes()
        self.task.setup(self)
        self._build_optimization()
        self.start_epoch, self.best_fitness = 0, 0.0
        self.bad_steps, self.last_opt_step = 0, -1  # consecutive non-finite batches; iteration of the last step
        self.best_saved_epoch = -1  # epoch whose EMA weights best.pt holds (-1: none saved by this process)
        self.maps = np.zeros(self.nc)  # per-class mAP@.5:.95 of the last validation (--image-weights draws by it)
        # --evolve trains many short runs into one folder: no checkpoints and no plots, as in YOLOv5 v6.0
        self.evolving = bool(getattr(opt, "evolve", None))
        if self.ckpt is not None and opt.resume:
            self._restore(self.ckpt)
        self.ckpt = None  # free the memory of the start checkpoint
        self.module = self._wrap_ddp(self.task.trainable)

    def _load_start_checkpoint(self):
        from utils.checkpoint import load_checkpoint

        weights = str(self.opt.weights or "")
        if weights.endswith(".pt"):
            if not Path(weights).exists():
                raise FileNotFoundError(f"--weights {weights} does not exist; pass a checkpoint path or "
                                        f"--weights '' to train from scratch")
            return load_checkpoint(weights, map_location="cpu")
        return None

    def _build_model(self, hyp_anchors=None) -> nn.Module:
        """The model to train: from --cfg or the checkpoint's YAML, with --weights transferred where shapes fit.

        hyp_anchors: hyp 'anchors' (a count per level, as in hyp.finetune_objects365.yaml) replaces the YAML's
        anchor sizes by placeholders that AutoAnchor then computes from the labels."""
        from models.yolo import Model
        from utils.checkpoint import checkpoint_batchnorm
        from utils.torch_utils import initialize_weights

        opt, ckpt = self.opt, self.ckpt
        anchors = hyp_anchors  # None: the YAML's anchors; AutoAnchor or a KD teacher may replace them later
        if ckpt is None:
            if not opt.cfg:
                LOGGER.info("no --cfg or --weights given: training models/yolov5s.yaml from scratch")
            return Model(opt.cfg or "yolov5s.yaml", ch=3, nc=self.nc, anchors=anchors)
        cfg = opt.cfg or ckpt["model"]["yaml"]
        model = Model(cfg, ch=3, nc=self.nc, anchors=anchors)
        if opt.resume:  # a run saved before v6.0's BatchNorm settings were adopted continues with its own
            settings = checkpoint_batchnorm(ckpt)
            if settings:
                initialize_weights(model, **settings)
        source = ckpt["model"]["state_dict"]
        exclude = ("anchor",) if (opt.cfg or anchors) and not opt.resume else ()
        own = model.state_dict()
        state = {k: v for k, v in source.items()
                 if k in own and own[k].shape == v.shape and not any(x in k for x in exclude)}
        model.load_state_dict(state, strict=False)
        LOGGER.info(f"Transferred {len(state)}/{len(own)} items from {opt.weights}")
        return model

    def _sync_batchnorm(self, trainable: nn.Module) -> None:
        """--sync-bn: BatchNorm statistics over all GPUs (DDP on CUDA only), for the model and any KD adapters."""
        if not self.opt.sync_bn:
            return
        if not self.cuda or self.rank == -1:
            LOGGER.warning("WARNING: --sync-bn needs DDP on CUDA (torchrun with several GPUs); ignoring it")
            return
        LOGGER.info("Using SyncBatchNorm()")
        # converts the children in place: the student and KD adapters inside a KDStudent, same objects kept
        nn.SyncBatchNorm.convert_sync_batchnorm(trainable)

    def _freeze_layers(self) -> None:
        freeze = list(self.opt.freeze or [0])
        layers = list(range(freeze[0])) if len(freeze) == 1 else freeze
        prefixes = tuple(f"model.{x}." for x in layers)
        for name, p in self.model.named_parameters():
            p.requires_grad_(True)
            if prefixes and name.startswith(prefixes):
                LOGGER.info(f"freezing {name}")
                p.requires_grad_(False)

    def _scaled_hyp(self, hyp: dict) -> dict:
        """A copy of hyp with YOLOv5's gain scaling for levels, classes and image size, and scaled decay."""
        from utils.loss import scale_hyp_gains

        nl = self.model.model[-1].nl
        scaled = scale_hyp_gains(hyp, nl, self.nc, self.imgsz)
        scaled["weight_decay"] = hyp["weight_decay"] * self.opt.batch_size * self.accumulate / self.nbs
        scaled["label_smoothing"] = self.opt.label_smoothing
        return scaled

    def _build_loaders(self) -> None:
        from utils.datasets import create_dataloader

        opt = self.opt
        with rank_zero_first(self.rank):
            self.train_loader, self.dataset = create_dataloader(
                self.data["train"], self.imgsz, self.batch_size, self.gs, opt.single_cls, hyp=self.hyp,
                augment=True, cache=opt.cache or None, rect=opt.rect, rank=self.local_rank,
                workers=opt.workers, prefix=colorstr("train: "), shuffle=not opt.rect, seed=opt.seed, nc=self.nc,
                image_weights=getattr(opt, "image_weights", False), quad=getattr(opt, "quad", False))
        self.val_loader = None
        if self.main:
            self.val_loader = create_dataloader(
                self.data["val"], self.imgsz, self.batch_size * 2, self.gs, opt.single_cls, hyp=self.hyp,
                cache=None if opt.noval else (opt.cache or None), rect=True, rank=-1, workers=opt.workers * 2,
                pad=0.5, prefix=colorstr("val: "), seed=opt.seed, nc=self.nc)[0]
        self.nb = len(self.train_loader)


    def _check_anchors(self) -> None:
        from utils.autoanchor import check_anchors

        if self.opt.resume or self.opt.noautoanchor or self.task.skip_autoanchor:
            return
        if self.main:
            check_anchors(self.dataset, self.model, thr=self.hyp["anchor_t"], imgsz=self.imgsz, seed=self.opt.seed)
        if self.world_size > 1:  # every rank trains with rank 0's anchors
            dist.broadcast(self.model.model[-1].anchors, src=0)

    def _attach_model_attributes(self) -> None:
        self.model.nc = self.nc
        self.model.hyp = self.hyp
        self.model.gr = 1.0  # objectness target = IoU
        self.model.names = self.names

    def _build_optimization(self) -> None:
        opt, hyp = self.opt, self.hyp
        self.optimizer = smart_optimizer(self.task.trainable, opt.optimizer, hyp["lr0"], hyp["momentum"],
                                         hyp["weight_decay"])
        if opt.linear_lr and getattr(opt, "cos_lr", False):
            LOGGER.warning("WARNING: --cos-lr and --linear-lr both given; --linear-lr wins (cosine is the default)")
        self.lf = lr_lambda(opt.epochs, hyp["lrf"], cosine=not opt.linear_lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda=self.lf)
        ema_decay, ema_tau = float(hyp.get("ema_decay", EMA_DECAY)), float(hyp.get("ema_tau", EMA_TAU))
        if not (0 <= ema_decay < 1 and ema_tau > 0):
            raise ValueError(f"hyp ema_decay must lie in [0, 1) and ema_tau be > 0 (got {ema_decay}, {ema_tau}); "
                             f"YOLOv5's values are {EMA_DECAY} and {EMA_TAU}")
        self.ema = ModelEMA(self.model, decay=ema_decay, tau=ema_tau) if self.main else None
        # loss scaling guards fp16 gradients against underflow; bf16 has float32's exponent range and needs none
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision.dtype == torch.float16)
        self.stopper = EarlyStopping(patience=opt.patience)

    def _restore(self, ckpt: dict) -> None:
        """Resume: optimizer, scheduler, EMA, epoch, best fitness and the task's own state (KD adapters)."""
        if ckpt.get("optimizer") is not None:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.ema is not None and ckpt.get("ema") is not None:
            self.ema.ema.load_state_dict(ckpt["ema"])
            self.ema.updates = int(ckpt.get("updates") or 0)
        self.best_fitness = float(ckpt.get("best_fitness") or 0.0)
        self.start_epoch = int(ckpt["epoch"]) + 1
        if self.start_epoch >= self.opt.epochs:
            raise ValueError(f"{self.opt.weights} already finished {self.opt.epochs} epochs; nothing to resume. "
                             f"Start a new run with --weights {self.opt.weights} to fine-tune further")
        if ckpt.get("scheduler") is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        else:
            self.scheduler.last_epoch = self.start_epoch - 1
        self.task.load_state_dict(ckpt)
        LOGGER.info(f"Resuming training from {self.opt.weights} at epoch {self.start_epoch}/{self.opt.epochs}")

    def _wrap_ddp(self, module: nn.Module) -> nn.Module:
        if self.world_size <= 1 or self.rank == -1:
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.local_rank] if self.cuda else None
        return DDP(module, device_ids=ids, output_device=ids[0] if ids else None)

    def fit(self) -> tuple:
        """Train for the remaining epochs; returns the final validation results (P, R, mAP50, mAP, losses)."""
        self._emit("on_train_start", self)
        results = (0.0,) * 7
        self.scheduler.last_epoch = self.start_epoch - 1
        for epoch in range(self.start_epoch, self.opt.epochs):
            self.epoch = epoch
            mean_loss = self.train_one_epoch(epoch)
            lrs = [g["lr"] for g in self.optimizer.param_groups]
            self.scheduler.step()
            stop = False
            if self.main:
                results, stop = self._end_epoch(epoch, mean_loss, lrs)
            if self.world_size > 1:
                flag = torch.tensor([float(stop)], device=self.device)
                dist.broadcast(flag, src=0)
                stop = bool(flag.item())
            if stop:
                break
        if self.main:
            results = self.finish(results)
        return results

    def finish(self, results: tuple) -> tuple:
        """Shrink the checkpoints (drop optimizer, fp16 weights) and report best.pt per class.

        When best.pt holds the last epoch's weights, the last epoch's validation (with plots and per-class lines)
        already is that report, so best.pt is not validated a second time."""
        from models.experimental import attempt_load
        from utils.checkpoint import strip_optimizer

        for f in (self.last, self.best):
            if f.exists():
                strip_optimizer(f)
        last_epoch = getattr(self, "epoch", -1)
        if self.best.exists() and not self.opt.noval and self.best_saved_epoch != last_epoch:
            LOGGER.info(f"\nValidating {self.best}...")
            best = attempt_load(self.best, map_location=self.device)
            results, _ = self.validate(plots=True, model=best, verbose=True)
        elif self.best.exists() and not self.opt.noval:
            LOGGER.info(f"{self.best} holds the last epoch's weights, validated above")
        self._emit("on_train_end", self)
        LOGGER.info(f"Results saved to {colorstr('bold', self.save_dir)}")
        return results

    def warmup(self, ni: int, epoch: int) -> None:
        """Ramp learning rates (biases down from warmup_bias_lr, others up from 0), momentum and accumulation."""
        hyp = self.hyp
        nw = max(round(hyp["warmup_epochs"] * self.nb), int(hyp.get("warmup_min_iters", WARMUP_MIN_ITERS)))
        if ni > nw:
            return
        xi = [0, nw]
        self.accumulate = max(1, int(np.interp(ni, xi, [1, self.nbs / self.opt.batch_size]).round()))
        for j, group in enumerate(self.optimizer.param_groups):
            start = hyp["warmup_bias_lr"] if j == 2 else 0.0
            group["lr"] = float(np.interp(ni, xi, [start, group["initial_lr"] * self.lf(epoch)]))
            if "momentum" in group:
                group["momentum"] = float(np.interp(ni, xi, [hyp["warmup_momentum"], hyp["momentum"]]))

    def preprocess(self, imgs: torch.Tensor) -> torch.Tensor:
        """uint8 (B,3,H,W) -> float 0..1 on the device in the run's memory format, resized when --multi-scale is on."""
        # reorder while still uint8 (a quarter of the bytes); float() and the division keep the memory format
        imgs = self.precision.to_input(imgs.to(self.device, non_blocking=True)).float().div_(255)
        if self.opt.multi_scale:
            size = random.randrange(int(self.imgsz * 0.5), int(self.imgsz * 1.5) + self.gs) // self.gs * self.gs
            factor = size / max(imgs.shape[2:])
            if factor != 1:
                shape = [math.ceil(x * factor / self.gs) * self.gs for x in imgs.shape[2:]]
                imgs = nn.functional.interpolate(imgs, size=shape, mode="bilinear", align_corners=False)
        return self.precision.to_input(imgs)

    def train_one_epoch(self, epoch: int) -> torch.Tensor:
        """One pass over the training data; returns the running mean of the task's loss items."""
        self.task.trainable.train()
        self.task.on_epoch_start(epoch, self.opt.epochs)
        if getattr(self.opt, "image_weights", False):  # single process only (train.prepare_run checks)
            from utils.datasets import image_weighted_indices

            self.dataset.indices = image_weighted_indices(self.dataset.labels, self.nc, self.maps)
        self._close_mosaic(epoch)
        if hasattr(self.train_loader.sampler, "set_epoch"):
            self.train_loader.sampler.set_epoch(epoch)
        names = self.task.loss_names
        mean_loss = torch.zeros(len(names), device=self.device)
        batches = enumerate(self.train_loader)
        if self.main:
            LOGGER.info(("\n" + "%10s" * (4 + len(names))) % ("Epoch", "gpu_mem", *names, "labels", "img_size"))
            batches = tqdm(batches, total=self.nb, bar_format="{l_bar}{bar:10}{r_bar}{bar:-10b}")
        self.optimizer.zero_grad()
        finite_steps = 0
        for i, (imgs, targets, paths, _) in batches:
            ni = i + self.nb * epoch
            self.warmup(ni, epoch)
            imgs = self.preprocess(imgs)
            items = self.forward_backward(imgs, targets.to(self.device))
            if items is None:
                self._skip_bad_step(epoch)
                continue
            if ni - self.last_opt_step >= self.accumulate:
                self.optimizer_step()
                self.last_opt_step = ni
            mean_loss = (mean_loss * finite_steps + items.detach()) / (finite_steps + 1)
            finite_steps, self.bad_steps = finite_steps + 1, 0
            if self.main:
                mem = f"{torch.cuda.memory_reserved() / 1e9 if self.cuda else 0:.3g}G"
                batches.set_description(("%10s" * 2 + "%10.4g" * (2 + len(names))) % (
                    f"{epoch}/{self.opt.epochs - 1}", mem, *mean_loss.tolist(), targets.shape[0], imgs.shape[-1]))
                self._emit("on_train_batch_end", self, ni, imgs, targets, paths)
        return mean_loss

    def _close_mosaic(self, epoch: int) -> None:
        """--close_mosaic N: the last N epochs train on single letterboxed images (no mosaic, hence no mixup), the
        way the model sees images at validation. Also right after a resume that starts inside those epochs."""
        from utils.datasets import restart_loader

        n = getattr(self.opt, "close_mosaic", 0) or 0
        if n <= 0 or epoch < self.opt.epochs - n or not self.dataset.mosaic:
            return
        self.dataset.mosaic = False
        self.train_loader = restart_loader(self.train_loader)  # persistent workers hold the old dataset copy
        if self.main:
            LOGGER.info(f"Closing mosaic for the last {self.opt.epochs - epoch} epochs (--close_mosaic {n})")

    def forward_backward(self, imgs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        """One batch: the task's loss, backpropagated into the accumulated gradients.

        Args:
            imgs: (bs, 3, h, w) float 0..1 on the device; targets: (n, 6) [image, class, xc, yc, w, h].

        Returns:
            The detached loss items, or None when the loss is not finite on any rank: then nothing is
            backpropagated and the gradients accumulated from earlier batches are kept.
        """
        with self.precision.autocast():
            loss, items = self.task.train_step(self.module, imgs, targets)
        if not self._loss_is_finite(loss):
            return None
        if self.world_size > 1:
            # The loss sums over this rank's images while DDP averages gradients over ranks: scale by the world
            # size so N processes take the same step as one process with the whole batch (as YOLOv5 does).
            loss = loss * self.world_size
        if getattr(self.opt, "quad", False):
            # the loss sums over the B // 4 collated images; x4 gives the step the scale of the B images it holds
            loss = loss * 4
        self.scaler.scale(loss).backward()
        return items.detach()

    def optimizer_step(self) -> None:
        """Step (clipping the gradient norm first when hyp grad_clip_norm > 0), then update the EMA."""
        clip = float(self.hyp.get("grad_clip_norm", GRAD_CLIP_NORM))
        if clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.task.trainable.parameters(), max_norm=clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad()
        if self.ema is not None:
            self.ema.update(self.model)

    def _loss_is_finite(self, loss: torch.Tensor) -> bool:
        finite = torch.isfinite(loss).all().float().reshape(1)
        if self.world_size > 1:  # all ranks must agree, or DDP's gradient all-reduce would hang
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite.item())

    def _skip_bad_step(self, epoch: int) -> None:
        """Count a skipped batch; the bad loss was never backpropagated, so the gradients stay as they were."""
        self.bad_steps += 1
        LOGGER.warning(f"WARNING: non-finite loss in epoch {epoch}, step skipped ({self.bad_steps} in a row)")
        if self.bad_steps >= MAX_BAD_STEPS:
            if self.main:
                self.save(epoch - 1, final=False)
            raise RuntimeError(f"loss was NaN/Inf for {MAX_BAD_STEPS} steps in a row; stopped and saved "
                               f"{self.last}. Lower lr0 in --hyp, check the labels, or resume with --resume")

    def _end_epoch(self, epoch: int, mean_loss: torch.Tensor, lrs: list) -> tuple:
        """Validate, log and save on rank 0. Returns (results, stop)."""
        self.ema.update_attr(self.model)
        final = epoch + 1 == self.opt.epochs or epoch - self.stopper.best_epoch + 1 >= self.stopper.patience
        results, maps = (0.0,) * 7, np.zeros(self.nc)
        if not self.opt.noval or final:
            results, maps = self.validate(plots=final and not self.evolving, verbose=final)
            self.maps = maps
        from utils.metrics import fitness

        fi = float(fitness(np.array(results).reshape(1, -1))[0])
        if fi > self.best_fitness:
            self.best_fitness = fi
        values = {"train": mean_loss.tolist(), "metrics": list(results[:4]), "val": list(results[4:7]),
                  "lr": lrs}
        self._emit("on_fit_epoch_end", self, epoch, values, fi)
        if (not self.opt.nosave or final) and not self.evolving:
            self.save(epoch, is_best=fi == self.best_fitness)
        return results, self.stopper(epoch=epoch, fitness=fi)

    def validate(self, plots: bool = False, model=None, verbose: bool = False) -> tuple:
        """Validate model (default: the EMA, as a fused copy: folding BatchNorm changes no output and saves its cost
        on every image). Returns ((P, R, mAP@.5, mAP@.5:.95, 3 val losses), per-class mAP)."""
        import val as validator

        if model is None:
            with torch.no_grad():
                model = deepcopy(self.ema.ema).fuse()
            if self.precision.channels_last:  # fused convs are new tensors in the default layout
                model.to(memory_format=torch.channels_last)
        results, maps, _ = validator.run(
            self.data, batch_size=self.batch_size * 2, imgsz=self.imgsz, model=model,
            single_cls=self.opt.single_cls, dataloader=self.val_loader, save_dir=self.save_dir,
            plots=plots, verbose=verbose, compute_loss=self.task.compute_loss, half=self.amp)
        return tuple(float(x) for x in results), maps

    def checkpoint(self, epoch: int) -> dict:
        from utils.checkpoint import build_checkpoint

        extra = {"scheduler": self.scheduler.state_dict(), **self.task.state_dict()}
        return build_checkpoint(self.model, ema=self.ema, optimizer=self.optimizer, epoch=epoch,
                                best_fitness=self.best_fitness, opt=vars(self.opt), hyp=self.hyp, extra=extra)

    def save(self, epoch: int, is_best: bool = False, final: bool = True) -> None:
        """Write last.pt (and best.pt / epoch{N}.pt) atomically, so a killed run can always resume."""
        from utils.checkpoint import copy_checkpoint, save_checkpoint

        self.wdir.mkdir(parents=True, exist_ok=True)
        save_checkpoint(self.checkpoint(epoch), self.last)
        if is_best:
            copy_checkpoint(self.last, self.best)
            self.best_saved_epoch = epoch
        period = self.opt.save_period
        if period > 0 and epoch > 0 and epoch % period == 0:  # YOLOv5 v6.0's rule: epoch2.pt, epoch4.pt, ...
            copy_checkpoint(self.last, self.wdir / f"epoch{epoch}.pt")

    def _emit(self, event: str, *args) -> None:
        """Call the callbacks' handlers for event; only on rank 0, since callbacks write the run's files."""
        if not self.main:
            return
        for cb in self.callbacks:
            fn = getattr(cb, event, None)
            if fn is not None:
                fn(*args)
