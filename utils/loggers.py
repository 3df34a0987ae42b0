"""Callbacks that watch training: results.csv, plots and run files. They never change a training step."""
from __future__ import annotations

from pathlib import Path

from utils.general import LOGGER

# results.csv columns in YOLOv5's order; a task's extra loss terms (KD) are appended after them as train/<name>
YOLOV5_COLUMNS = ("train/box_loss", "train/obj_loss", "train/cls_loss", "metrics/precision", "metrics/recall",
                  "metrics/mAP_0.5", "metrics/mAP_0.5:0.95", "val/box_loss", "val/obj_loss", "val/cls_loss",
                  "x/lr0", "x/lr1", "x/lr2")


AMP_COLUMN = "x/amp"  # 1 when the epoch trained under mixed precision (fp16 CUDA / bf16 CPU autocast), else 0


def results_columns(loss_names) -> list:
    """All results.csv columns for a task whose loss items are named ``loss_names`` (first 3 = box/obj/cls):
    YOLOv5's, then the task's extra losses, then the precision flag."""
    return ["epoch", *YOLOV5_COLUMNS, *(f"train/{n}" for n in loss_names[3:]), AMP_COLUMN]


def format_row(values) -> str:
    return ",".join(f"{v:>20.5g}" for v in values)


def _row_epoch(line: str) -> float:
    """The epoch of a results.csv row; infinity for a line that is not a whole row (a write cut short)."""
    try:
        return float(line.split(",")[0]) if line.endswith("\n") else float("inf")
    except ValueError:
        return float("inf")


def results_row(trainer, epoch: int, values: dict) -> list:
    """One epoch's results.csv values, in results_columns order (see RunLogger.on_fit_epoch_end for values)."""
    train = list(values["train"])
    return [epoch, *train[:3], *values["metrics"], *values["val"], *values["lr"], *train[3:],
            int(bool(getattr(trainer, "amp", False)))]


class RunLogger:
    """Writes results.csv (appending on resume), labels.jpg, train_batch*.jpg and results.png for a run."""

    def __init__(self, save_dir, plots: bool = True):
        self.save_dir = Path(save_dir)
        self.csv = self.save_dir / "results.csv"
        self.names = []
        self.plots = plots

    def on_train_start(self, trainer) -> None:
        self.names = list(trainer.names)
        if trainer.start_epoch > 0 and self.csv.exists():
            self._drop_rows_from(trainer.start_epoch)
        if self.plots and trainer.start_epoch == 0:
            try:
                import numpy as np

                from utils.plots import plot_labels

                labels = np.concatenate(trainer.dataset.labels, 0) if len(trainer.dataset.labels) else []
                if len(labels):
                    plot_labels(labels, self.names, self.save_dir)
            except Exception as e:  # plots must never stop a run
                LOGGER.warning(f"WARNING: labels plot failed: {e}")

    def on_train_batch_end(self, trainer, ni, imgs, targets, paths) -> None:
        if self.plots and ni < 3:
            try:
                from utils.plots import plot_images

                plot_images(imgs, targets, paths, self.save_dir / f"train_batch{ni}.jpg", names=self.names)
            except Exception as e:
                LOGGER.warning(f"WARNING: train batch plot failed: {e}")

    def on_fit_epoch_end(self, trainer, epoch, values: dict, fitness: float) -> None:
        """values: {'train': [losses...], 'metrics': [P, R, mAP50, mAP], 'val': [3 losses], 'lr': [3 lrs]}."""
        row = results_row(trainer, epoch, values)
        columns = results_columns(trainer.task.loss_names)
        header = ""
        if self.csv.exists():  # a resumed run: keep the file's own columns (it may predate some of ours)
            by_name = dict(zip(columns, row))
            row = [by_name.get(c, float("nan")) for c in self._existing_columns()]
        else:
            header = ",".join(f"{c:>20s}" for c in columns) + "\n"
        with open(self.csv, "a") as f:
            f.write(header + format_row(row) + "\n")

    def _drop_rows_from(self, epoch: int) -> None:
        """A resumed run repeats the epochs after its last checkpoint: drop their rows (a run killed between
        writing an epoch's row and its last.pt left one behind), so every epoch appears once."""
        lines = self.csv.read_text().splitlines(keepends=True)
        keep = lines[:1] + [ln for ln in lines[1:] if _row_epoch(ln) < epoch]
        if len(keep) < len(lines):
            LOGGER.info(f"results.csv: dropping {len(lines) - len(keep)} row(s) of epochs >= {epoch}, which the "
                        f"resumed run trains again")
            tmp = self.csv.with_name(self.csv.name + ".tmp")
            tmp.write_text("".join(keep))
            tmp.replace(self.csv)

    def _existing_columns(self) -> list:
        with open(self.csv) as f:
            return [c.strip() for c in f.readline().split(",")]

    def on_train_end(self, trainer) -> None:
        if self.plots and self.csv.exists():
            try:
                from utils.plots import plot_results

                plot_results(file=self.csv)
            except Exception as e:
                LOGGER.warning(f"WARNING: results plot failed: {e}")


class TensorBoardLogger:
    """Writes each epoch's results.csv values as TensorBoard scalars (tags = the column names) into the run folder.

    Args:
        save_dir: the run folder (event files land there).
        writer_cls: torch.utils.tensorboard.SummaryWriter or anything with its add_scalar/close.
    """

    def __init__(self, save_dir, writer_cls):
        self.writer = writer_cls(log_dir=str(save_dir))

    def on_fit_epoch_end(self, trainer, epoch, values: dict, fitness: float) -> None:
        columns = results_columns(trainer.task.loss_names)
        for name, value in zip(columns[1:], results_row(trainer, epoch, values)[1:]):
            self.writer.add_scalar(name, float(value), epoch)
        self.writer.flush()

    def on_train_end(self, trainer) -> None:
        self.writer.close()


def optional_loggers(save_dir) -> list:
    """Callbacks of optional packages that are installed: TensorBoard event files when ``tensorboard`` is."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional: without it, no event files and no message
        return []
    except Exception as e:  # an install that does not fit this torch: say so once, train on without it
        LOGGER.info(f"TensorBoard: not used ({type(e).__name__}: {e})")
        return []
    LOGGER.info(f"TensorBoard: view this run with 'tensorboard --logdir {Path(save_dir).parent}'")
    return [TensorBoardLogger(save_dir, SummaryWriter)]
