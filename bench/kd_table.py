"""Which distillation method helps, and by how much? One teacher, one student recipe, every method x 3 seeds.

Trains (or reuses) a teacher, then the student alone ("baseline") and with each KD method under identical settings
and seeds, scores every best.pt with the same float32 val.py run, and prints mean +- sd of mAP@.5 and mAP@.5:.95
per method with the share of the teacher-student gap each method closes.

Methods: baseline (no teacher), output (output KD only), output+at, output+cwd, output+pkd, output+mimic and
output+at+cwd (both feature losses summed under one --beta; at on its 7 pairs, cwd on the 3 Detect inputs), and
on request output+at_masked, output+at+pkd, output+mgd and output+at+mgd; every KD method uses the same --alpha/--beta
(train_kd.py's defaults unless given), so the table also shows whether one pair of weights suits every feature
loss after the losses' size normalisation.

Resumable: each finished cell (method, seed) is appended to --csv as soon as it is scored, and a later call skips
it; a cell interrupted mid-training resumes from its last.pt. Each run folder records the recipe it was trained
for (kd_cell.json: method, seed, size, epochs, weights, teacher, train args, per-loss weights); a folder recorded
for another recipe stops the call instead of being reused. Cells run seed by seed (every method of seed 0 first),
so a partial table already compares all methods.

Usage:
    python bench/kd_table.py                               # 128 px, 60 epochs, seeds 0 1 2, all methods
    python bench/kd_table.py --imgsz 256 --methods baseline output+at output+pkd --csv bench/results/kd_table_256.csv
    python bench/kd_table.py --methods output+at --seeds 0 --train-args "--kd_schedule cos"   # a variant, kept apart
    python bench/kd_table.py --methods baseline --seeds 0 --baseline-args "--hyp my_hyp.yaml"   # baseline variant
    python bench/kd_table.py --table-only                  # print the table of the cells done so far
    python bench/kd_table.py --epochs 1 --seeds 0 --csv /tmp/t.csv --project /tmp/kdt    # smoke run
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from bench._common import append_row, read_rows, table  # noqa: E402
from utils.general import LOGGER, set_logging  # noqa: E402

# method -> feature losses (None: no teacher at all)
METHODS = {"baseline": None, "output": (), "output+at": ("at",), "output+cwd": ("cwd",), "output+pkd": ("pkd",),
           "output+mimic": ("mimic",), "output+at+cwd": ("at", "cwd"), "output+at_masked": ("at_masked",),
           "output+at+pkd": ("at", "pkd"), "output+mgd": ("mgd",), "output+at+mgd": ("at", "mgd")}
DEFAULT_METHODS = ("baseline", "output", "output+at", "output+cwd", "output+pkd", "output+mimic", "output+at+cwd")
FIELDS = ("method", "seed", "imgsz", "epochs", "alpha", "beta", "train_args", "map50", "map", "train_s", "teacher")
KEY = FIELDS[:7]  # what makes a cell; the rest is its result


def parse_opt(argv=None) -> argparse.Namespace:
    import train_kd

    defaults = train_kd.build_parser().parse_args([])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="", help="teacher checkpoint (default: the demo's teacher, see demo.py)")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(METHODS),
                   help="default: every method but the variants run on request (output+at_masked, output+at+pkd, "
                        "output+mgd, output+at+mgd)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--imgsz", type=int, default=128)
    p.add_argument("--cfg", default="models/yolov5n.yaml", help="student model")
    p.add_argument("--alpha", type=float, default=defaults.alpha)
    p.add_argument("--beta", type=float, default=defaults.beta)
    p.add_argument("--train-args", default="", help="extra train_kd.py flags for every KD cell (quoted), e.g. "
                   "\"--kd_loss_selected bce\" (a single flag: --train-args=--rect); part of each cell's key, so such "
                   "cells are listed apart")
    p.add_argument("--baseline-args", default="", help="extra train.py flags for every baseline cell (quoted), e.g. "
                   "\"--hyp bench/hyps/hyp.demo.lr0.002.yaml\" to give the student alone the same change as a KD "
                   "variant; part of the baseline cells' key, and the main table then compares against them")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--csv", default="", help="default: bench/results/kd_table_<imgsz>.csv")
    p.add_argument("--project", default=str(ROOT / "runs/kd_table"))
    p.add_argument("--table-only", action="store_true", help="print the table of the finished cells and exit")
    opt = p.parse_args(argv)
    opt.csv = Path(opt.csv or ROOT / f"bench/results/kd_table_{opt.imgsz}.csv")
    return opt


def demo_opt(opt, feat_losses=(), seed=0):
    """The demo's recipe (demo.RECIPE) with this bench's student, size, epochs, KD weights and seed."""
    import demo

    args = demo.parse_opt([])
    for k, v in dict(student_cfg=opt.cfg, imgsz=opt.imgsz, student_epochs=opt.epochs, alpha=opt.alpha,
                     beta=opt.beta, feat_loss=list(feat_losses) or ["none"], seed=seed,
                     project=str(opt.project)).items():
        setattr(args, k, v)
    return args


def read_cells(path: Path) -> list:
    """The CSV's rows, with every field of FIELDS (a CSV written before a field existed has it blank)."""
    return [{f: row.get(f) or "" for f in FIELDS} for row in read_rows(path)]


def append_cell(path: Path, row: dict) -> None:
    """Append a row; a CSV with an older header is first rewritten under FIELDS, its rows kept."""
    path = Path(path)
    if path.exists():
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if tuple(header) != FIELDS:
            rows = read_cells(path)
            tmp = path.with_suffix(".tmp")
            tmp.unlink(missing_ok=True)
            for old in rows:
                append_row(tmp, old, FIELDS)
            tmp.replace(path)
    append_row(path, row, FIELDS)


def cell_key(opt, method: str, seed: int) -> tuple:
    """(method, seed, imgsz, epochs, alpha, beta, train_args) as the CSV stores them; the baseline has no KD
    weights, and its train_args are --baseline-args."""
    weights = ("", "") if METHODS[method] is None else (f"{opt.alpha:g}", f"{opt.beta:g}")
    return (method, str(seed), str(opt.imgsz), str(opt.epochs), *weights, _flags(opt, method))


# flags the table sets per cell itself: --train-args may not change them
OWN_FLAGS = ("kd", "teacher_weight", "alpha", "beta", "feat_loss", "seed", "imgsz", "epochs", "cfg", "weights",
             "project", "name", "resume")


def _raw_flags(opt, method: str = "output") -> str:
    """The extra flags a cell of this method gets: --baseline-args for the baseline, --train-args for KD cells (the
    default method stands for any KD method)."""
    return opt.baseline_args if METHODS[method] is None else opt.train_args


def _flags(opt, method: str = "output") -> str:
    """A cell's extra flags in one normal form (the CSV key and the run folder name depend on it): shell words joined
    by single spaces, and `--flag=value` written `--flag value` (argparse reads both the same)."""
    words = []
    for word in shlex.split(_raw_flags(opt, method)):
        if word.startswith("--") and "=" in word:
            words.extend(word.split("=", 1))
        else:
            words.append(word)
    return " ".join(words)


def train_overrides(opt, method: str = "output") -> dict:
    """Settings that a cell's extra flags change from their defaults (refusing the ones the table sets): train_kd.py
    flags for KD cells, train.py flags for the baseline (a KD flag there would change nothing and is refused)."""
    import train
    import train_kd

    kd = METHODS[method] is not None
    option = "--train-args" if kd else "--baseline-args"
    parser = train_kd.build_parser() if kd else train.build_parser()
    defaults = vars(train.parse_opt([], parser))
    try:
        given = vars(train.parse_opt(shlex.split(_raw_flags(opt, method)), parser))
    except SystemExit:
        raise SystemExit(f"{option} {_raw_flags(opt, method)!r}: not {'train_kd.py' if kd else 'train.py'} flags")
    changed = {k: v for k, v in given.items() if v != defaults[k]}
    clash = sorted(set(changed) & set(OWN_FLAGS))
    if clash:
        raise SystemExit(f"{option} may not set {', '.join(clash)}: kd_table sets them per cell (use its own "
                         f"--alpha, --beta, --methods, --seeds, --imgsz, --epochs, --cfg, --teacher)")
    return changed


MAX_FLAGS_IN_NAME = 120  # characters of --train-args kept in a run folder's name; longer ones end in a hash


def cell_name(opt, method: str, seed: int) -> str:
    kd = "" if METHODS[method] is None else f"_a{opt.alpha:g}_b{opt.beta:g}"
    if _flags(opt, method):  # --train-args (--baseline-args), made file-name safe
        flags = re.sub(r"[^A-Za-z0-9.]+", "-", _flags(opt, method)).strip("-")
        if len(flags) > MAX_FLAGS_IN_NAME:  # a long layer list would pass the file system's 255-byte name limit
            digest = hashlib.sha1(flags.encode()).hexdigest()[:10]
            flags = f"{flags[:MAX_FLAGS_IN_NAME - 11]}-{digest}"
        kd += "_" + flags
    return f"{method.replace('+', '_')}_s{seed}_{opt.imgsz}px_e{opt.epochs}{kd}"


def cell_recipe(opt, method: str, seed: int, teacher) -> dict:
    """Everything a cell's training depends on beyond the code: stored in its run folder as RECIPE_FILE, so that a
    later call resumes or reuses a folder only when it was trained for this very cell (the folder name alone does
    not say which per-loss weights or teacher it had)."""
    from utils.kd.losses import LOSS_WEIGHTS

    feats = METHODS[method]
    kd = feats is not None
    return dict(method=method, seed=seed, imgsz=opt.imgsz, epochs=opt.epochs, student=Path(opt.cfg).name,
                alpha=opt.alpha if kd else None, beta=opt.beta if kd and feats else None,
                teacher=str(Path(teacher).resolve()) if kd else None, train_args=_flags(opt, method),
                loss_weights={f: LOSS_WEIGHTS[f] for f in feats or ()})


RECIPE_FILE = "kd_cell.json"


def check_recipe(run: Path, recipe: dict) -> None:
    """Refuse a run folder recorded for another recipe; warn about one from before the record existed."""
    record = run / RECIPE_FILE
    if record.exists():
        old = json.loads(record.read_text())
        if old != recipe:
            diff = ", ".join(f"{k}: {old.get(k)!r} there, {v!r} here" for k, v in recipe.items() if old.get(k) != v)
            raise SystemExit(f"{run} was trained for another recipe ({diff}); move or delete it to train this cell")
    elif run.exists() and any(run.iterdir()):
        LOGGER.warning(f"{run} has no {RECIPE_FILE} (made before kd_table recorded recipes); reusing it by its name")
    else:
        run.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(recipe, indent=1) + "\n")


def train_cell(opt, teacher: Path, method: str, seed: int) -> tuple[Path, float]:
    """Train one cell (resuming its own last.pt when an earlier call was interrupted); returns (best.pt, seconds)."""
    import demo
    import train_kd

    name = cell_name(opt, method, seed)
    run = Path(opt.project) / name
    check_recipe(run, cell_recipe(opt, method, seed, teacher))
    best, last = run / "weights" / "best.pt", run / "weights" / "last.pt"
    start = time.perf_counter()
    if _epochs_done(run) >= opt.epochs and best.exists():
        return best, float("nan")  # trained by an earlier call that stopped before scoring it
    if last.exists():
        args = train_kd.build_parser().parse_args([])
        args.resume = str(last)
        train_kd.main(args)
    else:
        feats = METHODS[method]
        kd = feats is not None
        demo.train_student(demo_opt(opt, feats or (), seed), name, teacher if kd else None,
                           overrides=train_overrides(opt, method) or None)
    return best, time.perf_counter() - start


def _epochs_done(run: Path) -> int:
    """Rows of run/results.csv (0 without one)."""
    results = run / "results.csv"
    return max(len(results.read_text().strip().splitlines()) - 1, 0) if results.exists() else 0


def summary(cells: list, teacher_scores) -> str:
    """mean +- sd per method and the share of the teacher-student gap closed (by the method means)."""
    by_method = {}
    for c in cells:
        by_method.setdefault(c["method"], []).append((float(c["map50"]), float(c["map"])))
    base = by_method.get("baseline")
    base_mean = [statistics.mean(v[i] for v in base) for i in (0, 1)] if base else None
    rows = []
    for method in [m for m in METHODS if m in by_method]:
        vals = by_method[method]
        stats = []
        for i in (0, 1):
            xs = [v[i] for v in vals]
            sd = statistics.stdev(xs) if len(xs) > 1 else float("nan")
            stats.append(f"{statistics.mean(xs):.3f} +- {sd:.3f}")
        gap = ["-", "-"]
        if base_mean and teacher_scores and method != "baseline":
            gap = [f"{100 * (statistics.mean(v[i] for v in vals) - base_mean[i]) / (teacher_scores[i] - base_mean[i]):.0f}%"
                   if teacher_scores[i] > base_mean[i] else "n/a" for i in (0, 1)]
        rows.append((method, len(vals), *stats, *gap))
    header = ("method", "seeds", "mAP@.5", "mAP@.5:.95", "gap closed @.5", "gap closed @.5:.95")
    teacher_line = (f"teacher: mAP@.5 {teacher_scores[0]:.3f}, mAP@.5:.95 {teacher_scores[1]:.3f}\n"
                    if teacher_scores else "")
    return teacher_line + table(header, rows)


def other_weights(cells: list) -> str:
    """Cells the main table leaves out (another alpha, beta, epoch count or --train-args): mean per (method, epochs,
    alpha, beta, train args)."""
    groups = {}
    for c in cells:
        groups.setdefault((c["method"], c["epochs"], c["alpha"], c["beta"], c["train_args"]), []).append(c)
    rows = []
    for (method, epochs, alpha, beta, flags), group in sorted(groups.items()):
        means = [statistics.mean(float(c[k]) for c in group) for k in ("map50", "map")]
        rows.append((method, epochs, alpha or "-", beta or "-", ",".join(sorted((c["seed"] for c in group), key=int)),
                     f"{means[0]:.3f}", f"{means[1]:.3f}", flags or "-"))
    header = ("method", "epochs", "alpha", "beta", "seeds", "mAP@.5", "mAP@.5:.95", "train args")
    return table(header, rows, left=(0, len(header) - 1)) if rows else ""


def score_teacher(opt, args, teacher: Path) -> None:
    """Append the teacher's val scores to the CSV once per teacher file."""
    import demo

    if any(c["method"] == "teacher" and c["teacher"] == str(teacher) for c in read_cells(opt.csv)):
        return
    m50, m = demo.evaluate(args, teacher)
    append_cell(opt.csv, dict(method="teacher", seed="", imgsz=opt.imgsz, epochs="", alpha="", beta="",
                              train_args="", map50=f"{m50:.5f}", map=f"{m:.5f}", train_s="", teacher=str(teacher)))


def main(opt) -> str:
    import demo
    import torch

    if opt.threads:
        torch.set_num_threads(opt.threads)
    args = demo_opt(opt)
    teacher = None
    if not opt.table_only:
        for method in opt.methods:
            train_overrides(opt, method)  # bad extra flags stop here, not after the first cells
        for seed in opt.seeds:
            for method in opt.methods:
                key = cell_key(opt, method, seed)
                if key in {tuple(c[f] for f in KEY) for c in read_cells(opt.csv)}:
                    continue
                if teacher is None and METHODS[method] is not None:
                    teacher = Path(opt.teacher) if opt.teacher else demo.find_teacher(args)
                    score_teacher(opt, args, teacher)
                best, seconds = train_cell(opt, teacher, method, seed)
                m50, m = demo.evaluate(args, best)
                used = "" if METHODS[method] is None else str(teacher)  # the baseline learns from no teacher
                append_cell(opt.csv, dict(zip(FIELDS, (*key, f"{m50:.5f}", f"{m:.5f}", f"{seconds:.0f}", used))))
    cells = read_cells(opt.csv)
    teacher_row = [c for c in cells if c["method"] == "teacher"]
    teacher_scores = (float(teacher_row[-1]["map50"]), float(teacher_row[-1]["map"])) if teacher_row else None
    wanted = {cell_key(opt, m, s) for m in METHODS for s in {c["seed"] for c in cells}}
    chosen = [c for c in cells if tuple(c[f] for f in KEY) in wanted]
    flags = f", train args '{_flags(opt)}'" if _flags(opt) else ""
    flags += f", baseline args '{_flags(opt, 'baseline')}'" if _flags(opt, "baseline") else ""
    text = (f"student {Path(opt.cfg).stem}, {opt.imgsz} px, {opt.epochs} epochs, alpha {opt.alpha:g}, "
            f"beta {opt.beta:g}{flags} ({opt.csv.name})\n" + summary(chosen, teacher_scores))
    others = other_weights([c for c in cells if c["method"] != "teacher" and c not in chosen])
    if others:
        text += "\ncells at other KD weights or schedules (not in the table above):\n" + others
    print(text)
    return text


if __name__ == "__main__":
    set_logging()
    main(parse_opt())
