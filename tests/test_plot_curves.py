"""Tests for plot_curves.py: overlaying results.csv curves of several runs."""
import logging

import cv2
import numpy as np
import pytest

import plot_curves
from tests.test_plots import write_results_csv
from utils import plots
from utils.general import LOGGER

KD_COLUMNS = ("train/kd_out", "train/kd_feat")


@pytest.fixture
def two_runs(tmp_path):
    """A 5-epoch plain run and a 9-epoch KD run with extra KD loss columns."""
    base = write_results_csv(tmp_path / "runs" / "baseline" / "results.csv", 5)
    kd = write_results_csv(tmp_path / "runs" / "distilled" / "results.csv", 9, KD_COLUMNS)
    return base.parent, kd.parent


@pytest.fixture
def log_messages():
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: records.append(record.getMessage())
    LOGGER.addHandler(handler)
    yield records
    LOGGER.removeHandler(handler)


def test_default_metrics_and_series_per_run(two_runs, log_messages):
    series = plot_curves.gather_series(two_runs)
    metrics = list(series)
    assert metrics[:2] == ["metrics/mAP_0.5", "metrics/mAP_0.5:0.95"]
    losses = {"train/box_loss", "train/obj_loss", "train/cls_loss", "val/box_loss", "val/obj_loss", "val/cls_loss"}
    assert set(metrics[2:]) == losses | set(KD_COLUMNS)
    assert not any(m.startswith("x/") or m == "metrics/precision" for m in metrics)
    for metric in ("metrics/mAP_0.5", "train/box_loss"):
        (l1, x1, y1), (l2, x2, y2) = series[metric]
        assert (l1, l2) == ("baseline", "distilled") and len(x1) == 5 and len(x2) == 9
        assert x2.tolist() == list(range(9)) and y1.shape == x1.shape
    for metric in KD_COLUMNS:
        assert [label for label, *_ in series[metric]] == ["distilled"]
    assert any("baseline" in m and "train/kd_out" in m for m in log_messages)


def test_series_values_match_csv(two_runs):
    base_csv = two_runs[0] / "results.csv"
    df = plots.read_results_csv(base_csv)
    series = plot_curves.gather_series([base_csv], metrics=["metrics/recall"])
    label, x, y = series["metrics/recall"][0]
    assert label == "baseline" and np.allclose(y, df["metrics/recall"].to_numpy())


@pytest.mark.parametrize("alias", ["mAP@.5", "mAP_0.5", "metrics/mAP_0.5", "mAP@0.5"])
def test_metric_aliases(two_runs, alias):
    assert list(plot_curves.gather_series(two_runs, metrics=[alias])) == ["metrics/mAP_0.5"]


def test_metric_aliases_other_forms(two_runs):
    series = plot_curves.gather_series(two_runs, metrics=["mAP@.5:.95", "recall", "train/kd_feat"])
    assert list(series) == ["metrics/mAP_0.5:0.95", "metrics/recall", "train/kd_feat"]


def test_unknown_metric_and_bad_inputs(two_runs, tmp_path):
    with pytest.raises(ValueError, match="choose from"):
        plot_curves.gather_series(two_runs, metrics=["mAP@.75"])
    with pytest.raises(ValueError, match="one --labels entry per run"):
        plot_curves.gather_series(two_runs, labels=["only one"])
    with pytest.raises(FileNotFoundError, match="missing_run"):
        plot_curves.gather_series([tmp_path / "missing_run"])
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(FileNotFoundError, match="results.csv"):
        plot_curves.gather_series([tmp_path / "empty_run"])


def test_plot_runs_writes_png_and_cli(two_runs, tmp_path):
    out = plot_curves.plot_runs(two_runs, labels=["base", "kd"], metrics=["mAP@.5", "train/kd_out"],
                                out=tmp_path / "cmp" / "compare.png")
    im = cv2.imread(str(out))
    assert out.is_file() and im is not None and im.shape[1] > im.shape[0]  # two panels side by side
    cli_out = tmp_path / "cli.png"
    opt = plot_curves.parse_opt([str(two_runs[0] / "results.csv"), str(two_runs[1]), "--metrics", "mAP@.5:.95",
                                 "--out", str(cli_out)])
    assert plot_curves.main(opt) == cli_out and cv2.imread(str(cli_out)) is not None


def test_duplicate_folder_names_get_parent_prefix(tmp_path):
    a = write_results_csv(tmp_path / "proj_a" / "exp" / "results.csv", 3).parent
    b = write_results_csv(tmp_path / "proj_b" / "exp" / "results.csv", 4).parent
    assert plot_curves.default_labels([a, b]) == ["proj_a/exp", "proj_b/exp"]


def test_cjk_labels_without_font_warn_once(two_runs, tmp_path, monkeypatch, log_messages):
    monkeypatch.setattr(plots, "find_cjk_font_family", lambda: None)
    plots._warn_missing_cjk_font.cache_clear()
    for k in range(2):
        out = plot_curves.plot_runs(two_runs, labels=["基线", "蒸馏"], metrics=["mAP@.5"], out=tmp_path / f"{k}.png")
        assert cv2.imread(str(out)) is not None
    assert sum("CJK" in m for m in log_messages) == 1


def test_cjk_font_used_as_fallback_when_found(monkeypatch):
    import matplotlib

    monkeypatch.setattr(plots, "find_cjk_font_family", lambda: "Fake CJK Sans")
    with plots.cjk_font_context(["学生"]):
        families = list(matplotlib.rcParams["font.sans-serif"])
    assert "Fake CJK Sans" in families and families.index("Fake CJK Sans") == 1  # after the Latin default
    assert "Fake CJK Sans" not in matplotlib.rcParams["font.sans-serif"]  # restored afterwards
    assert plots.has_cjk(["蒸馏"]) and plots.has_cjk(["ラベル"]) and not plots.has_cjk(["baseline", "naïve"])


def test_noval_epochs_are_skipped_not_plotted_as_zero(tmp_path):
    """--noval leaves zeros in every metrics/ and val/ column except on the last epoch: those epochs are gaps."""
    csv = write_results_csv(tmp_path / "noval" / "results.csv", 6)
    df = plots.read_results_csv(csv)
    evaluated = [c for c in df.columns if c.startswith(("metrics/", "val/"))]
    lines = csv.read_text().splitlines()
    header = [c.strip() for c in lines[0].split(",")]
    for row in range(1, 6):  # epochs 0-3 unvalidated; 4 has a genuine mAP of 0 with nonzero val losses
        cells = lines[row].split(",")
        for c in evaluated:
            if row < 5 or c.startswith("metrics/"):
                cells[header.index(c)] = f"{0:>20d}"
        lines[row] = ",".join(cells)
    csv.write_text("\n".join(lines) + "\n")
    series = plot_curves.gather_series([csv], metrics=["mAP@.5", "val/box_loss", "train/box_loss"])
    _, x, y = series["metrics/mAP_0.5"][0]
    assert x.tolist() == [4, 5] and y[0] == 0  # epochs 0-3 skipped; epoch 4's real zero kept
    assert series["val/box_loss"][0][1].tolist() == [4, 5]
    assert series["train/box_loss"][0][1].tolist() == [0, 1, 2, 3, 4, 5]  # training columns untouched
