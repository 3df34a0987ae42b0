"""Hyperparameter evolution (train.py / train_kd.py --evolve), following YOLOv5 v6.0's genetic scheme.

Every generation trains one short run and appends one row to ``evolve.csv``: the 7 validation results (P, R,
mAP@.5, mAP@.5:.95, 3 val losses), then the values it trained with. The next generation picks a parent among the
best rows (by fitness = 0.1 mAP@.5 + 0.9 mAP@.5:.95), mutates it and trains again; ``hyp_evolve.yaml`` always holds
the best row so far. A value is evolved when it has an entry in the meta table: (mutation scale, lower limit, upper
limit); scale 0 keeps it fixed. train.py evolves hyp keys; train_kd.py adds its KD weights.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import yaml

from utils.general import LOGGER, colorstr
from utils.metrics import fitness

RESULT_COLUMNS = ("metrics/precision", "metrics/recall", "metrics/mAP_0.5", "metrics/mAP_0.5:0.95",
                  "val/box_loss", "val/obj_loss", "val/cls_loss")
MUTATION_PROBABILITY = 0.8  # chance that an evolvable value changes in a generation
SIGMA = 0.2  # spread of the multiplicative mutation
FACTOR_RANGE = (0.3, 3.0)  # a value changes by a factor within this range per generation
TOP_PARENTS = 5  # parents are picked among this many best rows
DECIMALS = 5  # evolved values are rounded to this many decimal places (YOLOv5 v6.0 rounds so)

# YOLOv5 v6.0's table: hyp key -> (mutation scale 0..1, lower limit, upper limit)
META = {
    "lr0": (1, 1e-5, 1e-1), "lrf": (1, 0.01, 1.0), "momentum": (0.3, 0.6, 0.98), "weight_decay": (1, 0.0, 0.001),
    "warmup_epochs": (1, 0.0, 5.0), "warmup_momentum": (1, 0.0, 0.95), "warmup_bias_lr": (1, 0.0, 0.2),
    "box": (1, 0.02, 0.2), "cls": (1, 0.2, 4.0), "cls_pw": (1, 0.5, 2.0), "obj": (1, 0.2, 4.0),
    "obj_pw": (1, 0.5, 2.0), "iou_t": (0, 0.1, 0.7), "anchor_t": (1, 2.0, 8.0), "anchors": (2, 2.0, 10.0),
    "fl_gamma": (0, 0.0, 2.0), "hsv_h": (1, 0.0, 0.1), "hsv_s": (1, 0.0, 0.9), "hsv_v": (1, 0.0, 0.9),
    "degrees": (1, 0.0, 45.0), "translate": (1, 0.0, 0.9), "scale": (1, 0.0, 0.9), "shear": (1, 0.0, 10.0),
    "perspective": (0, 0.0, 0.001), "flipud": (1, 0.0, 1.0), "fliplr": (0, 0.0, 1.0), "mosaic": (1, 0.0, 1.0),
    "mixup": (1, 0.0, 1.0), "copy_paste": (1, 0.0, 1.0),
}
DEFAULT_ANCHORS = 3  # v6.0 evolves 'anchors' (a count per level) from 3 when the hyp file has none


def evolve_options(opt):
    """A copy of train.py's options for --evolve: runs/evolve unless another --project was given; --resume continues
    the folder's evolve.csv (it becomes --exist-ok); only the final epoch is validated and nothing is saved, as in
    YOLOv5 v6.0. Raises ValueError under DDP, which evolution does not support."""
    from utils.engine import distributed_env

    if distributed_env()[0] != -1:
        raise ValueError("--evolve cannot run under DDP (torchrun); run it as a single process")
    if opt.evolve < 1:
        raise ValueError(f"--evolve {opt.evolve}: the number of generations must be at least 1 (bare --evolve: 300)")
    opt = argparse.Namespace(**vars(opt))
    if opt.project == "runs/train":
        opt.project = "runs/evolve"
    opt.exist_ok, opt.resume = bool(opt.exist_ok or opt.resume), False
    opt.noval = opt.nosave = True
    return opt


def constrain(values: dict, meta: dict) -> dict:
    """A copy of values with every key of meta clipped to its limits and rounded to DECIMALS places."""
    out = dict(values)
    for k, (_, low, high) in meta.items():
        if k in out:
            out[k] = round(min(max(float(out[k]), low), high), DECIMALS)
    return out


def mutate(parent: dict, meta: dict, rng: np.random.Generator) -> dict:
    """A child of parent: each evolvable value times a random factor, then constrained to its limits.

    Each key with scale g > 0 mutates with probability MUTATION_PROBABILITY by the factor
    clip(1 + g * r * SIGMA * N(0, 1), 0.3, 3.0), where r ~ U(0, 1) is drawn once per child; draws repeat until at
    least one factor differs from 1, so a child never copies its parent. Keys without a meta entry are copied.

    Args:
        parent: name -> value.
        meta: name -> (scale, lower, upper).
        rng: numpy Generator (a seeded one makes the child reproducible).

    Returns:
        The child (name -> value), every meta key clipped and rounded.
    """
    keys = [k for k in meta if k in parent]
    scales = np.array([meta[k][0] for k in keys], dtype=np.float64)
    factors = np.ones(len(keys))
    while np.any(scales > 0) and np.all(factors == 1):
        mutated = rng.random(len(keys)) < MUTATION_PROBABILITY
        factors = (scales * mutated * rng.standard_normal(len(keys)) * rng.random() * SIGMA + 1).clip(*FACTOR_RANGE)
    child = dict(parent)
    for k, f in zip(keys, factors):
        child[k] = float(parent[k]) * f
    return constrain(child, meta)


def read_evolve_csv(path):
    """evolve.csv as a pandas DataFrame with stripped column names."""
    import pandas as pd

    frame = pd.read_csv(path, skipinitialspace=True)
    return frame.rename(columns=lambda c: c.strip())


def row_fitness(frame) -> np.ndarray:
    """Fitness of each evolve.csv row (n,)."""
    return fitness(frame[list(RESULT_COLUMNS[:4])].to_numpy(dtype=np.float64))


def select_parent(frame, rng: np.random.Generator, method: str = "single") -> dict:
    """A parent from the best TOP_PARENTS rows of evolve.csv, weighted by fitness above the worst of them.

    Args:
        frame: read_evolve_csv's table.
        rng: numpy Generator.
        method: 'single' picks one row (v6.0's default); 'weighted' averages the rows with those weights.

    Returns:
        name -> value of every non-result column.
    """
    if method not in ("single", "weighted"):
        raise ValueError(f"parent selection '{method}' is unknown; use 'single' or 'weighted'")
    names = [c for c in frame.columns if c not in RESULT_COLUMNS]
    fit = row_fitness(frame)
    order = np.argsort(-fit, kind="stable")[:TOP_PARENTS]
    fit, values = fit[order], frame[names].to_numpy(dtype=np.float64)[order]  # (n,), (n, keys)
    weights = fit - fit.min() + 1e-6  # all positive
    if method == "single" or len(order) == 1:
        chosen = values[rng.choice(len(order), p=weights / weights.sum())]
    else:
        chosen = (values * weights[:, None]).sum(0) / weights.sum()
    return dict(zip(names, chosen.tolist()))


def check_columns(path: Path, names) -> None:
    """Raise ValueError when an existing evolve.csv does not hold the 7 results followed by ``names``."""
    if not path.exists():
        return
    with open(path) as f:
        existing = [c.strip() for c in f.readline().split(",")]
    columns = [*RESULT_COLUMNS, *names]
    if existing != columns:
        extra = sorted(set(existing) ^ set(columns))
        raise ValueError(f"{path} has other columns than this evolution (differing: {', '.join(extra) or 'order'}); "
                         f"evolve into a new folder (another --name) or use the same --hyp and script as before")


def append_result(path: Path, results, values: dict) -> None:
    """Append one generation (7 results, then values in their order) to evolve.csv, writing the header first."""
    columns = [*RESULT_COLUMNS, *values]
    check_columns(path, values)
    row = [*(float(r) for r in results), *(float(v) for v in values.values())]
    header = "" if path.exists() else ",".join(f"{c:>20s}" for c in columns) + "\n"
    with open(path, "a") as f:
        f.write(header + ",".join(f"{v:>20.5g}" for v in row) + "\n")


def write_best_yaml(csv: Path, out: Path, command: str = "train.py", flags=()) -> dict:
    """Write the best evolve.csv row's values to out (hyp_evolve.yaml) with a comment on where they came from.

    ``flags`` name values that are command-line flags of ``command`` rather than hyp keys (train_kd.py's KD
    weights): they are written too, and the comment says to pass them as flags.

    Returns:
        {'generation': index of the best row, 'fitness': its fitness, 'results': its 7 results, 'values': dict}.
    """
    frame = read_evolve_csv(csv)
    fit = row_fitness(frame)
    best = int(np.argmax(fit))
    row = frame.iloc[best]
    values = {k: _plain(row[k]) for k in frame.columns if k not in RESULT_COLUMNS}
    results = [float(row[k]) for k in RESULT_COLUMNS]
    header = (f"# Hyperparameter evolution ({command} --evolve): best of {len(frame)} generations is generation "
              f"{best + 1}, fitness {fit[best]:.5g}\n"
              f"# {', '.join(RESULT_COLUMNS)}:\n# {', '.join(f'{r:.5g}' for r in results)}\n"
              f"# usage: python {command} --hyp {out}{usage_flags(values, flags)}\n\n")
    out.write_text(header + yaml.safe_dump(values, sort_keys=False))
    return {"generation": best, "fitness": float(fit[best]), "results": results, "values": values}


def usage_flags(values: dict, flags) -> str:
    """' --alpha 1.2 --beta 0.8' for the values named in flags ('' when none)."""
    return "".join(f" --{k} {values[k]:g}" for k in flags if k in values)


def _plain(value) -> float | int:
    """A csv number as a YAML-friendly int when whole, else float."""
    value = float(value)
    return int(value) if value.is_integer() else value


def evolve(save_dir, start: dict, meta: dict, train_fn, generations: int, seed: int = 0,
           parent: str = "single", command: str = "train.py", flags=()) -> dict:
    """Run ``generations`` more generations into save_dir (evolve.csv, hyp_evolve.yaml, evolve.png).

    A folder that already holds evolve.csv continues from it; otherwise the first generation trains ``start``
    (constrained to the limits) unchanged. Generation k mutates with a Generator seeded by (seed, k), so an
    evolution is reproducible and a continued one does not repeat earlier draws.

    Args:
        save_dir: the evolution's folder.
        start: name -> starting value (hyp keys, and any extra values such as KD weights).
        meta: name -> (scale, lower, upper) for the values to evolve.
        train_fn: ``train_fn(values) -> 7 results`` trains one generation with those values.
        generations: number of generations to run now.
        seed: base seed of the mutations.
        parent: 'single' or 'weighted' parent selection.
        command: script name for the YAML comment and the usage line.
        flags: names in start that are command-line flags of command, not hyp keys (write_best_yaml).

    Returns:
        write_best_yaml's summary of the best generation.
    """
    from utils.plots import plot_evolve

    if generations < 1:
        raise ValueError(f"--evolve {generations}: the number of generations must be at least 1 (bare --evolve: 300)")
    save_dir = Path(save_dir)
    csv, out_yaml = save_dir / "evolve.csv", save_dir / "hyp_evolve.yaml"
    prefix = colorstr("evolve: ")
    check_columns(csv, start)  # before training anything: a folder of another evolution is refused at once
    words = [k for k, v in start.items() if isinstance(v, bool) or not isinstance(v, (int, float))]
    if words:
        raise ValueError(f"--evolve needs numeric hyperparameters; {', '.join(words)} in --hyp are not numbers")
    best = None
    for g in range(generations):
        done = len(read_evolve_csv(csv)) if csv.exists() else 0
        rng = np.random.default_rng([seed, done])
        if done:
            values = mutate({**start, **select_parent(read_evolve_csv(csv), rng, parent)}, meta, rng)
        else:
            values = constrain(start, meta)
        values = {k: _like(start[k], v) for k, v in values.items() if k in start}
        LOGGER.info(f"{prefix}generation {done + 1} ({g + 1}/{generations} of this run): "
                    + ", ".join(f"{k}={values[k]:g}" for k in meta if k in values))
        append_result(csv, train_fn(dict(values)), values)
        best = write_best_yaml(csv, out_yaml, command, flags)
        LOGGER.info(f"{prefix}best so far: generation {best['generation'] + 1}, fitness {best['fitness']:.5g}")
    plot_evolve(csv, keys=[k for k in meta if k in start and meta[k][0] > 0])
    LOGGER.info(f"{prefix}finished {generations} generations; results in {colorstr('bold', save_dir)}\n"
                f"Usage example: python {command} --hyp {out_yaml}{usage_flags(best['values'], flags)}")
    return best


def _like(reference, value):
    """value as an int when the starting value was an int and value is whole (nbs, warmup_min_iters), else as is."""
    if isinstance(reference, int) and not isinstance(reference, bool) and float(value).is_integer():
        return int(value)
    return value
