"""One optimizer step of the training engine on a fixed batch, for the DDP gradient test (tests/test_ddp.py).

Run as one process, or under torchrun with N processes: every process builds the engine's Trainer exactly as
train.py / train_kd.py would, takes its share of one fixed batch (rank r of N gets images r*bs/N .. (r+1)*bs/N-1),
runs ``Trainer.forward_backward`` and ``Trainer.optimizer_step`` once, and rank 0 saves the gradients and the
updated parameters of the trainable module (student, plus KD adapters) to OUT.

    python tests/ddp_step.py OUT.pt --data d.yaml --cfg s.yaml [train_kd.py flags ...]
    torchrun --nproc_per_node 2 tests/ddp_step.py OUT.pt ...

The batch is built so that one process on the whole batch and N processes on equal shares compute the same
gradient, which is what a correct DDP step must give:
- every image carries the same boxes, so the number of anchor-matched targets is the same on every rank and the
  detection loss's means over targets split evenly;
- BatchNorm layers run in eval mode (running statistics), because train-mode BatchNorm normalises each process's
  share with its own statistics, and that difference is real in DDP without --sync-bn, not an engine error.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import train  # noqa: E402
import train_kd  # noqa: E402
from utils.engine import DetectionTask, Trainer, distributed_env  # noqa: E402
from utils.kd.task import DistillationTask  # noqa: E402

BATCH = 8
IMGSZ = 64
BOXES = ((1, 0.30, 0.30, 0.25, 0.30), (3, 0.65, 0.60, 0.35, 0.30), (0, 0.50, 0.75, 0.20, 0.15))  # cls, xc, yc, w, h


def fixed_batch(rank: int, world: int) -> tuple:
    """This process's share of the batch: images (bs/N, 3, IMGSZ, IMGSZ) in 0..1 and targets (n, 6)."""
    gen = torch.Generator().manual_seed(1234)
    imgs = torch.rand(BATCH, 3, IMGSZ, IMGSZ, generator=gen)
    share = BATCH // world
    first = max(rank, 0) * share
    imgs = imgs[first:first + share]
    targets = torch.tensor([[i, *box] for i in range(share) for box in BOXES], dtype=torch.float32)
    return imgs, targets


def main(argv) -> None:
    out = Path(argv[0])
    parser = train_kd.build_parser()
    opt = train.parse_opt(argv[1:], parser)
    opt, hyp, device = train.prepare_run(opt, parser)
    _, rank, world = distributed_env()
    factory = DistillationTask.build if opt.kd else DetectionTask.build
    trainer = Trainer(opt, hyp, Path(opt.save_dir), device, task_factory=factory)
    trainable = trainer.task.trainable
    trainable.train()
    for m in trainable.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    trainer.task.on_epoch_start(0, opt.epochs)
    for group in trainer.optimizer.param_groups:  # no warm-up ramp: a plain step at the initial rates
        group["lr"] = group["initial_lr"]
    imgs, targets = fixed_batch(rank, world)
    items = trainer.forward_backward(imgs.to(device), targets.to(device))
    assert items is not None, "loss was not finite"
    grads = {n: p.grad.detach().clone() for n, p in trainable.named_parameters() if p.grad is not None}
    trainer.optimizer_step()
    params = {n: p.detach().clone() for n, p in trainable.named_parameters()}
    if rank in (-1, 0):
        torch.save({"grads": grads, "params": params, "world": world}, out)
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
