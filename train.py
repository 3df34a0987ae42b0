"""Train a YOLOv5 detector on a dataset YAML.

Usage:
    python train.py --data data/shapes.yaml --cfg models/yolov5n.yaml --weights '' --epochs 10 --imgsz 160
    python train.py --data data/VOC.yaml --weights weights/yolov5m.pt --batch-size 32 --device 0
    torchrun --nproc_per_node 4 train.py --data data/VOC.yaml --cfg models/yolov5l.yaml --batch-size 64
    python train.py --resume                      # newest runs/**/last.pt
    python train.py --resume runs/train/exp3/weights/last.pt
    python train.py --evolve 100 --epochs 10      # hyperparameter evolution into runs/evolve/exp
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch.distributed as dist  # noqa: E402

from utils.engine import HYP_DEFAULTS, DetectionTask, Trainer, distributed_env  # noqa: E402
from utils.general import (LOGGER, colorstr, find_file, get_latest_run, increment_path, print_args,  # noqa: E402
                           run_cli, set_logging, yaml_load, yaml_save)
from utils.loggers import RunLogger, optional_loggers  # noqa: E402
from utils.torch_utils import cpu_has_native_bf16, select_device, select_precision  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """train.py's flags (YOLOv5 v6.0 names); train_kd.py extends this parser."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=str, default="", help="initial weights path ('' trains from scratch)")
    p.add_argument("--cfg", type=str, default="", help="model.yaml path ('' with no --weights: yolov5s.yaml)")
    p.add_argument("--data", type=str, default="data/shapes.yaml", help="dataset.yaml path")
    p.add_argument("--hyp", type=str, default="data/hyps/hyp.scratch.yaml", help="hyperparameters path")
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16, help="total batch size for all GPUs")
    p.add_argument("--imgsz", "--img", "--img-size", type=int, default=640, help="train, val image size (pixels)")
    p.add_argument("--rect", action="store_true", help="rectangular training")
    p.add_argument("--resume", nargs="?", const=True, default=False, help="resume the newest or a given last.pt")
    p.add_argument("--nosave", action="store_true", help="only save the final checkpoint")
    p.add_argument("--noval", action="store_true", help="only validate the final epoch")
    p.add_argument("--noautoanchor", action="store_true", help="disable AutoAnchor")
    p.add_argument("--cache", type=str, nargs="?", const="ram", help="--cache images in 'ram' (default) or 'disk'")
    p.add_argument("--evolve", type=int, nargs="?", const=300,
                   help="evolve hyperparameters for N generations (300 when bare) into runs/evolve/exp")
    p.add_argument("--image-weights", action="store_true",
                   help="draw each epoch's images weighted by their classes' rarity and low mAP (single process)")
    p.add_argument("--device", default="", help="cuda device, i.e. 0 or 0,1,2,3 or cpu")
    p.add_argument("--multi-scale", action="store_true", help="vary img-size +/- 50%%")
    p.add_argument("--single-cls", action="store_true", help="train multi-class data as single-class")
    p.add_argument("--optimizer", type=str, choices=["SGD", "Adam", "AdamW"], default="SGD", help="optimizer")
    p.add_argument("--adam", action="store_true", help="same as --optimizer Adam (YOLOv5 v6.0 flag)")
    p.add_argument("--sync-bn", action="store_true", help="use SyncBatchNorm, only available in DDP mode on CUDA")
    p.add_argument("--workers", type=int, default=8, help="max dataloader workers (per process in DDP mode)")
    p.add_argument("--project", default="runs/train", help="save to project/name")
    p.add_argument("--name", default="exp", help="save to project/name")
    p.add_argument("--exist-ok", action="store_true", help="existing project/name ok, do not increment")
    p.add_argument("--quad", action="store_true",
                   help="quad dataloader: every 4 images form one of twice the size (2x2 tiles or one upsampled)")
    p.add_argument("--cos-lr", action="store_true", help="cosine LR scheduler (already the default, as in v6.0)")
    p.add_argument("--linear-lr", action="store_true", help="linear LR instead of the default cosine")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing epsilon")
    p.add_argument("--patience", type=int, default=100, help="EarlyStopping patience (epochs without improvement)")
    p.add_argument("--freeze", nargs="+", type=int, default=[0], help="freeze first N layers, or layer indices")
    p.add_argument("--save-period", type=int, default=-1, help="save a checkpoint every N epochs (-1 disabled)")
    p.add_argument("--seed", type=int, default=0, help="global training seed")
    p.add_argument("--close_mosaic", "--close-mosaic", type=int, default=0, metavar="N",
                   help="train the last N epochs without mosaic (and mixup); 0 (default, as v6.0): mosaic throughout")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision: fp16 on CUDA, bf16 on CPUs with native bf16 (chosen automatically when "
                        "neither --amp nor --no-amp is given; the run's opt.yaml records the choice)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help="set by torch.distributed.launch")
    return p


def parse_opt(argv=None, parser=None) -> argparse.Namespace:
    opt = (parser or build_parser()).parse_args(argv)
    if opt.adam:
        opt.optimizer = "Adam"
    return opt


def resolve_resume(opt: argparse.Namespace, parser=None) -> argparse.Namespace:
    """Options of the run being resumed: its opt.yaml, pointed at its last.pt and its own run folder."""
    last = opt.resume if isinstance(opt.resume, str) else get_latest_run(str(ROOT / "runs"))
    if not last or not Path(last).is_file():
        raise FileNotFoundError(f"--resume: checkpoint '{last or 'runs/**/last.pt'}' not found; pass an existing "
                                f"last.pt (python train.py --resume runs/train/exp/weights/last.pt)")
    run_dir = Path(last).resolve().parent.parent
    saved = yaml_load(run_dir / "opt.yaml") if (run_dir / "opt.yaml").exists() else {}
    resumed = vars(parse_opt([], parser))
    resumed.update(saved)
    # resume holds the checkpoint path, so resolving the same options again gives the same run
    resumed.update(weights=str(last), resume=str(last), save_dir=str(run_dir), cfg="")
    if (run_dir / "hyp.yaml").exists():
        resumed["hyp"] = str(run_dir / "hyp.yaml")
    return argparse.Namespace(**resumed)


def _log_precision(precision, device, requested) -> None:
    """Say once what the run computes in, and warn when --amp forces bf16 on a CPU that only emulates it."""
    native = cpu_has_native_bf16() if device.type == "cpu" else None
    where = f", native bf16: {'yes' if native else 'no'}" if native is not None else ""
    layout = ", channels_last" if precision.channels_last else ""
    LOGGER.info(f"{colorstr('precision:')} {precision.name}{' autocast' if precision.enabled else ''}{layout} "
                f"on {device.type} ({'--amp/--no-amp' if requested is not None else 'automatic'}{where})")
    if requested and native is False:
        LOGGER.warning("WARNING: --amp on a CPU without native bfloat16 (AVX512-BF16/AMX): bf16 is emulated there "
                       "and usually slower than float32; drop --amp to train in float32")


def prepare_run(opt: argparse.Namespace, parser=None):
    """Validate options, create the run folder, init DDP. Returns (opt, hyp, device)."""
    local_rank, rank, world_size = distributed_env()
    set_logging(rank=rank)
    opt = argparse.Namespace(**vars(opt))  # the caller's namespace stays as it was
    requested = getattr(opt, "amp", None)
    if opt.resume:
        opt = resolve_resume(opt, parser)
    else:
        for flag in ("data", "hyp"):
            value = getattr(opt, flag)
            if isinstance(value, str) and not value:
                raise ValueError(f"--{flag} must not be empty")
        opt.save_dir = str(increment_path(Path(opt.project) / opt.name, exist_ok=opt.exist_ok or opt.resume))
    _check_loader_options(opt, local_rank, world_size)
    device = select_device(opt.device, batch_size=opt.batch_size)
    precision = select_precision(device, opt.amp)
    opt.amp = precision.enabled  # resolved here, so opt.yaml records it and --resume keeps it
    if rank in (-1, 0):
        _log_precision(precision, device, requested)
    if local_rank != -1:
        if opt.batch_size % world_size:
            raise ValueError(f"--batch-size {opt.batch_size} must be a multiple of WORLD_SIZE {world_size}")
        if device.type == "cuda":
            import torch

            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if isinstance(opt.hyp, (str, Path)):
        hyp_file = find_file(opt.hyp)
        if not hyp_file.is_file():
            raise FileNotFoundError(f"--hyp {opt.hyp} not found; pass a file like data/hyps/hyp.scratch.yaml")
        hyp = yaml_load(hyp_file)
    else:
        hyp = dict(opt.hyp)
    hyp.update({k: v for k, v in HYP_DEFAULTS.items() if k not in hyp})  # hyp.yaml records what the run used
    if rank in (-1, 0):
        save_dir = Path(opt.save_dir)
        (save_dir / "weights").mkdir(parents=True, exist_ok=True)
        yaml_save(save_dir / "hyp.yaml", hyp)
        yaml_save(save_dir / "opt.yaml", vars(opt))
        print_args(Path(sys.argv[0]).stem or "train", vars(opt))
    return opt, hyp, device


def _check_loader_options(opt, local_rank: int, world_size: int) -> None:
    """--image-weights, --quad and --close_mosaic limits, before any process group or dataset."""
    if getattr(opt, "image_weights", False) and local_rank != -1:
        raise ValueError("--image-weights works in a single process only (as in YOLOv5 v6.0); drop it or train "
                         "without torchrun")
    if getattr(opt, "close_mosaic", 0) < 0:
        raise ValueError(f"--close_mosaic {opt.close_mosaic}: give a number of final epochs >= 0 (0 keeps mosaic)")
    if getattr(opt, "quad", False) and opt.batch_size // world_size < 4:
        raise ValueError(f"--quad collates 4 images into one: --batch-size {opt.batch_size} gives "
                         f"{opt.batch_size // world_size} per process; use at least {4 * world_size}")


def evolve(opt: argparse.Namespace, task_factory=DetectionTask.build, parser=None, meta=None, flags=(),
           command: str = "train.py"):
    """--evolve: train opt.evolve generations of mutated hyperparameters (utils/evolve.py).

    Args:
        meta: name -> (scale, lower, upper) of the values to evolve (default: YOLOv5 v6.0's hyp table).
        flags: names in meta that are options of opt rather than hyp keys (train_kd.py's KD weights).
        command: the script, for the usage line.

    Returns:
        (resolved options with save_dir, the best generation's 7 results).
    """
    from utils.evolve import DEFAULT_ANCHORS, META, evolve_options
    from utils.evolve import evolve as run_generations

    meta = META if meta is None else meta
    opt, hyp, device = prepare_run(evolve_options(opt), parser)
    if "anchors" in meta:  # v6.0 evolves the anchor count too, from 3 per level
        hyp.setdefault("anchors", DEFAULT_ANCHORS)
    start = {**hyp, **{k: getattr(opt, k) for k in flags}}

    def train_generation(values: dict) -> tuple:
        generation_opt = argparse.Namespace(**{**vars(opt), **{k: values[k] for k in flags}})
        generation_hyp = {k: v for k, v in values.items() if k not in flags}
        return Trainer(generation_opt, generation_hyp, Path(opt.save_dir), device, task_factory=task_factory).fit()

    best = run_generations(opt.save_dir, start, meta, train_generation, opt.evolve, seed=opt.seed, command=command,
                           flags=flags)
    return opt, tuple(best["results"])


def main(opt: argparse.Namespace, task_factory=DetectionTask.build, parser=None):
    """Train (or evolve with --evolve). Returns (resolved options with save_dir, final (P, R, mAP@.5, mAP@.5:.95,
    val losses))."""
    if getattr(opt, "evolve", None):
        return evolve(opt, task_factory, parser)
    opt, hyp, device = prepare_run(opt, parser)
    try:
        trainer = Trainer(opt, hyp, Path(opt.save_dir), device, task_factory=task_factory,
                          callbacks=[RunLogger(opt.save_dir), *optional_loggers(opt.save_dir)])
        results = trainer.fit()
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return opt, results


def run(**kwargs):
    """Programmatic entry: train.run(data='data/shapes.yaml', cfg='models/yolov5n.yaml', imgsz=64, epochs=1).

    Returns the resolved options; ``opt.save_dir`` is the run folder.
    """
    opt = parse_opt([])
    for k, v in kwargs.items():
        setattr(opt, k, v)
    return main(opt)[0]


def cli(main_fn=main, parser_fn=build_parser) -> None:
    """Command-line entry: expected problems print one line that says the fix instead of a traceback."""
    parser = parser_fn()
    opt = parse_opt(None, parser)
    run_cli(lambda: main_fn(opt, parser=parser))


if __name__ == "__main__":
    cli()
