"""--evolve: mutation (limits, fixed keys, seeds), parent selection, evolve.csv / hyp_evolve.yaml, tiny evolutions."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import train
import train_kd
from models.yolo import Model
from tests.conftest import ROOT, tiny_model_cfg
from utils.checkpoint import build_checkpoint, save_checkpoint
from utils.evolve import (META, RESULT_COLUMNS, append_result, constrain, evolve_options, mutate, read_evolve_csv,
                          select_parent, write_best_yaml)
from utils.general import yaml_load

START = {**yaml_load(ROOT / "data" / "hyps" / "hyp.scratch.yaml"), "anchors": 3, "nbs": 64}


def children(n: int, parent=None, meta=META, seed0: int = 0) -> list:
    return [mutate(parent or START, meta, np.random.default_rng(seed0 + i)) for i in range(n)]


def test_mutation_respects_limits_and_leaves_fixed_keys_alone():
    parent = constrain(START, META)
    for child in children(300, parent):
        assert child.keys() == parent.keys()
        for k, (scale, low, high) in META.items():
            assert low <= child[k] <= high, k
            assert child[k] == round(child[k], 5)
            if scale == 0:
                assert child[k] == parent[k], k  # iou_t, fl_gamma, perspective, fliplr never move
            else:  # one multiplicative step stays within [0.3, 3] x the parent, before the limits clip it
                assert min(max(0.3 * parent[k], low), high) - 1e-5 <= child[k] <= max(min(3 * parent[k], high),
                                                                                        low) + 1e-5, k
        for k in ("giou", "kd", "nbs"):  # not in the table: copied
            assert child[k] == parent[k]
        assert any(child[k] != parent[k] for k in META), "a child never copies its parent"


def test_mutation_probability_is_v6s_0_8():
    """Keys strictly inside their limits change in about 80% of children (a mutated key moves by a factor != 1)."""
    parent = constrain(START, META)
    inside = [k for k, (s, lo, hi) in META.items() if s > 0 and lo < parent[k] < hi and parent[k] != 0]
    changed = np.mean([[c[k] != parent[k] for k in inside] for c in children(400, parent)])
    assert len(inside) >= 12
    assert 0.77 < changed < 0.83


def test_mutation_is_deterministic_for_a_seed():
    a = mutate(START, META, np.random.default_rng(7))
    b = mutate(START, META, np.random.default_rng(7))
    c = mutate(START, META, np.random.default_rng(8))
    assert a == b
    assert a != c


def write_csv(path: Path, rows) -> None:
    """rows: (mAP@.5, mAP@.5:.95, lr0) per generation; the other results are filler."""
    for map50, map95, lr0 in rows:
        append_result(path, (0.5, 0.5, map50, map95, 0.1, 0.1, 0.1), {"lr0": lr0, "momentum": 0.9})


def test_parent_selection_from_a_hand_made_csv(tmp_path):
    csv = tmp_path / "evolve.csv"
    rows = [(0.10, 0.05, 1.0), (0.50, 0.30, 2.0), (0.20, 0.10, 3.0), (0.60, 0.40, 4.0), (0.0, 0.0, 5.0),
            (0.30, 0.20, 6.0), (0.40, 0.25, 7.0)]
    write_csv(csv, rows)
    frame = read_evolve_csv(csv)
    assert list(frame.columns) == [*RESULT_COLUMNS, "lr0", "momentum"]
    fit = {lr0: 0.1 * a + 0.9 * b for a, b, lr0 in rows}  # fitness by hand
    top5 = sorted(fit, key=fit.get, reverse=True)[:5]  # lr0 values 4, 2, 7, 6, 3
    low = min(fit[k] for k in top5)
    weights = {k: fit[k] - low + 1e-6 for k in top5}
    total = sum(weights.values())
    rng = np.random.default_rng(0)
    drawn = [select_parent(frame, rng)["lr0"] for _ in range(1500)]
    assert set(drawn) <= set(top5)  # lr0 1 and 5 are outside the top 5
    for k in top5:
        assert abs(drawn.count(k) / len(drawn) - weights[k] / total) < 0.04, k  # 3 sigma at p = 0.3
    mean = select_parent(frame, rng, method="weighted")
    assert mean["lr0"] == pytest.approx(sum(k * w for k, w in weights.items()) / total)
    assert mean["momentum"] == pytest.approx(0.9)
    with pytest.raises(ValueError, match="'single' or 'weighted'"):
        select_parent(frame, rng, method="best")


def test_best_yaml_holds_the_fittest_row_and_other_columns_are_refused(tmp_path):
    csv = tmp_path / "evolve.csv"
    write_csv(csv, [(0.9, 0.1, 1.0), (0.1, 0.3, 2.0), (0.5, 0.2, 3.0)])  # fitness 0.18, 0.28, 0.23
    best = write_best_yaml(csv, tmp_path / "hyp_evolve.yaml")
    assert best["generation"] == 1 and best["fitness"] == pytest.approx(0.28)
    assert yaml_load(tmp_path / "hyp_evolve.yaml") == {"lr0": 2, "momentum": 0.9}
    with pytest.raises(ValueError, match="other columns"):
        append_result(csv, (0,) * 7, {"lr0": 1.0, "momentum": 0.9, "box": 0.05})


def test_two_generation_evolve_of_a_tiny_model(shapes_data, tiny_cfgs, tmp_path):
    opt, results = train.main(train.parse_opt([
        "--data", str(shapes_data), "--cfg", str(tiny_cfgs["student"]), "--weights", "", "--imgsz", "64",
        "--batch-size", "8", "--epochs", "1", "--workers", "0", "--device", "cpu", "--project", str(tmp_path),
        "--evolve", "2"]))
    run = Path(opt.save_dir)
    assert len(results) == 7
    frame = read_evolve_csv(run / "evolve.csv")
    assert len(frame) == 2
    first, second = frame.iloc[0], frame.iloc[1]
    assert first["lr0"] == pytest.approx(0.01) and first["anchors"] == 3  # generation 1 trains the start hyps
    assert any(second[k] != pytest.approx(first[k]) for k in META)
    for k, (_, low, high) in META.items():
        assert low <= second[k] <= high
    assert set(yaml_load(run / "hyp_evolve.yaml")) == set(frame.columns) - set(RESULT_COLUMNS)
    assert (run / "evolve.png").stat().st_size > 0
    assert not list(run.rglob("*.pt")), "evolution saves no checkpoints"


def test_train_kd_evolve_mutates_the_kd_weights_within_limits(shapes_data, tiny_cfgs, tmp_path):
    nc = yaml_load(shapes_data)["nc"]
    teacher = Model(tiny_model_cfg(nc, 0.25))
    teacher.names = list(yaml_load(shapes_data)["names"])
    save_checkpoint(build_checkpoint(teacher), tmp_path / "teacher.pt")
    opt = train_kd.run(data=str(shapes_data), cfg=str(tiny_cfgs["student"]), weights="", imgsz=64, batch_size=8,
                       epochs=1, workers=0, device="cpu", project=str(tmp_path), evolve=2,
                       teacher_weight=str(tmp_path / "teacher.pt"), alpha=25.0, beta=0.5, temperature=0.2)
    frame = read_evolve_csv(Path(opt.save_dir) / "evolve.csv")
    assert len(frame) == 2 and {"alpha", "beta", "temperature"} <= set(frame.columns)
    assert "anchors" not in frame.columns  # the student keeps the teacher's anchors
    first = frame.iloc[0]
    assert (first["alpha"], first["beta"], first["temperature"]) == (10.0, 0.5, 1.0)  # clipped to the limits
    for k, (_, low, high) in train_kd.KD_EVOLVE_META.items():
        assert frame[k].between(low, high).all()
    assert "--alpha" in (Path(opt.save_dir) / "hyp_evolve.yaml").read_text()


def test_evolve_refuses_ddp_and_zero_generations(monkeypatch, shapes_data, tmp_path):
    opt = train.parse_opt(["--data", str(shapes_data), "--evolve", "0", "--project", str(tmp_path)])
    assert not opt.evolve  # --evolve 0 trains once, as in v6.0
    opt = train.parse_opt(["--data", str(shapes_data), "--evolve", "--resume"])
    assert opt.evolve == 300
    evolved = evolve_options(opt)
    assert evolved.noval and evolved.nosave
    assert evolved.project == "runs/evolve" and evolved.exist_ok and not evolved.resume  # --resume continues
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ValueError, match="DDP"):
        evolve_options(opt)
