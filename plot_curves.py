"""Overlay the training curves of several runs (e.g. a baseline and its distilled students) in one figure.

Usage:
    python plot_curves.py runs/train/exp runs/train/exp2 --labels baseline KD --out compare.png
    python plot_curves.py runs/train/*/results.csv --metrics mAP@.5 train/kd_feat
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # lets the script run from any working directory

from utils.general import LOGGER, set_logging  # noqa: E402
from utils.plots import new_figure, cjk_font_context, colors, read_results_csv  # noqa: E402

DEFAULT_METRICS = ("metrics/mAP_0.5", "metrics/mAP_0.5:0.95")
METRIC_ALIASES = {
    "mAP@.5": "metrics/mAP_0.5", "mAP@0.5": "metrics/mAP_0.5", "mAP_0.5": "metrics/mAP_0.5",
    "mAP50": "metrics/mAP_0.5", "mAP@.5:.95": "metrics/mAP_0.5:0.95", "mAP@0.5:0.95": "metrics/mAP_0.5:0.95",
    "mAP_0.5:0.95": "metrics/mAP_0.5:0.95", "mAP": "metrics/mAP_0.5:0.95",
}


def resolve_run(run) -> tuple:
    """A run folder or csv path -> (csv path, default label). Raises FileNotFoundError naming what is missing."""
    p = Path(run)
    if p.is_dir():
        csv = p / "results.csv"
        if not csv.is_file():
            raise FileNotFoundError(f"{csv} not found; pass a run folder that contains results.csv or the csv itself")
        return csv, p.name
    if p.is_file():
        return p, p.parent.name if p.name == "results.csv" else p.stem
    raise FileNotFoundError(f"Run '{run}' does not exist; pass a run folder (runs/train/exp) or a results.csv path")


def default_labels(run_dirs) -> list:
    """Run folder names as legend labels; a name shared by several runs gets its parent folder prefixed."""
    csvs = [resolve_run(r)[0] for r in run_dirs]
    names = [resolve_run(r)[1] for r in run_dirs]
    return [f"{c.resolve().parent.parent.name}/{n}" if names.count(n) > 1 else n for c, n in zip(csvs, names)]


def is_loss_column(name: str) -> bool:
    """Detection losses ('train/*_loss', 'val/*_loss') and KD losses ('train/kd_*', 'val/kd_*', 'kd/*')."""
    split = name.split("/", 1)
    if len(split) != 2:
        return False
    group, leaf = split
    return (group in ("train", "val") and (leaf.endswith("_loss") or leaf.startswith("kd_"))) or group == "kd"


def resolve_metric(name: str, available: set) -> str:
    """Map a user metric name (exact column, alias such as 'mAP@.5', or name without 'metrics/') to a column."""
    for candidate in (name, METRIC_ALIASES.get(name), f"metrics/{name}"):
        if candidate and candidate in available:
            return candidate
    raise ValueError(f"Metric '{name}' is in none of the runs; choose from: {', '.join(sorted(available))} "
                     f"(aliases: {', '.join(METRIC_ALIASES)})")


def default_metrics(frames) -> list:
    """mAP@.5 and mAP@.5:.95, then every loss column present in any run, in first-seen order."""
    losses = [c for df in frames for c in df.columns if is_loss_column(c)]
    return list(dict.fromkeys([*DEFAULT_METRICS, *losses]))


def mask_unvalidated(df):
    """Epochs that were not validated (--noval writes zeros for every metrics/ and val/ column except on the last
    epoch) get NaN in those columns, so the curves skip them instead of dropping to 0."""
    cols = [c for c in df.columns if c.startswith(("metrics/", "val/"))]
    if cols:
        skipped = (df[cols] == 0).all(axis=1)
        df = df.copy()
        df.loc[skipped, cols] = np.nan
    return df


def gather_series(run_dirs, labels=None, metrics=None) -> dict:
    """Read the runs and collect, per metric, the (label, epochs, values) series of every run that has it.

    Args:
        run_dirs: run folders containing results.csv, or csv paths.
        labels: legend labels, one per run (default: run folder names).
        metrics: column names or aliases (default: see default_metrics).

    Returns:
        {metric: [(label, x (n,), y (n,)), ...]} in the order of ``metrics``. A run lacking a metric is left out
        of that entry and a note is logged.
    """
    runs = [resolve_run(r) for r in run_dirs]
    if not runs:
        raise ValueError("No runs given; pass at least one run folder or results.csv")
    if labels is not None and len(labels) != len(runs):
        raise ValueError(f"Got {len(labels)} labels for {len(runs)} runs; pass one --labels entry per run")
    labels = list(labels) if labels is not None else default_labels(run_dirs)
    frames = [mask_unvalidated(read_results_csv(csv)) for csv, _ in runs]
    available = {c for df in frames for c in df.columns}
    wanted = [resolve_metric(m, available) for m in metrics] if metrics else default_metrics(frames)
    series = {}
    for metric in dict.fromkeys(wanted):
        series[metric] = []
        for label, df in zip(labels, frames):
            if metric not in df.columns:
                LOGGER.info(f"note: {label} has no '{metric}' column, skipped in that plot")
                continue
            x = df["epoch"].to_numpy(dtype=float) if "epoch" in df.columns else np.arange(len(df), dtype=float)
            y = df[metric].to_numpy(dtype=float)
            keep = np.isfinite(x) & np.isfinite(y)
            series[metric].append((label, x[keep], y[keep]))
    return series


def draw_series(series: dict, labels, out) -> Path:
    """One subplot per metric, one coloured line per run (same colour for a run everywhere); save to ``out``."""
    run_colour = {label: np.array(colors(i)) / 255 for i, label in enumerate(dict.fromkeys(labels))}
    n = max(len(series), 1)
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    with cjk_font_context(labels):
        fig, axes = new_figure(nrows, ncols, (5 * ncols, 3.6 * nrows))
        for ax, (metric, runs) in zip(axes, series.items()):
            for label, x, y in runs:
                ax.plot(x, y, marker="." if len(x) < 50 else None, linewidth=1.5, label=label,
                        color=run_colour.get(label))
            ax.set_title(metric, fontsize=10)
            ax.set_xlabel("epoch")
            if runs:
                ax.legend(fontsize=8)
        for ax in axes[len(series):]:
            ax.axis("off")
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=150)
    return out


def plot_runs(run_dirs, labels=None, metrics=None, out="compare.png") -> Path:
    """Overlay the chosen results.csv columns of several runs and save the figure.

    Args:
        run_dirs: run folders containing results.csv, or csv paths; runs may differ in length and columns.
        labels: legend labels, one per run (default: run folder names). CJK text is fine.
        metrics: column names or aliases ('mAP@.5', 'mAP@.5:.95', 'mAP_0.5'); default mAPs and all loss columns.
        out: output image path.

    Returns:
        Path of the written image.
    """
    series = gather_series(run_dirs, labels, metrics)
    names = list(labels) if labels is not None else default_labels(run_dirs)
    path = draw_series(series, names, out)
    LOGGER.info(f"Saved {path} ({len(series)} metrics, {len(names)} runs)")
    return path


def parse_opt(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Overlay results.csv curves of several training runs")
    parser.add_argument("runs", nargs="+", help="run folders containing results.csv, or results.csv paths")
    parser.add_argument("--labels", nargs="+", default=None, help="legend label per run (default: folder names)")
    parser.add_argument("--metrics", nargs="+", default=None,
                        help="columns to plot (exact names or mAP@.5, mAP@.5:.95); default mAPs and losses")
    parser.add_argument("--out", default="compare.png", help="output image")
    return parser.parse_args(argv)


def main(opt: argparse.Namespace) -> Path:
    return plot_runs(opt.runs, labels=opt.labels, metrics=opt.metrics, out=opt.out)


if __name__ == "__main__":
    set_logging()
    main(parse_opt())
