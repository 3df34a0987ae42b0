"""demo.py's teacher choice, the ship script's record and bench/kd_table.py's bookkeeping (no training here)."""
import statistics
import sys
from pathlib import Path

import pytest
import yaml

import demo

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "data" / "scripts"))


def _ship(tmp_path, monkeypatch, **changes):
    """A fake shipped teacher (an empty .pt and its record) matching data/shapes.yaml unless changed."""
    shipped = tmp_path / "demo_teacher.pt"
    shipped.write_bytes(b"")
    data = yaml.safe_load((ROOT / "data/shapes.yaml").read_text())
    record = {"generator": dict(data["download"]), "cfg": "yolov5s.yaml", "imgsz": 128, **changes}
    shipped.with_suffix(".yaml").write_text(yaml.safe_dump(record))
    monkeypatch.setattr(demo, "SHIPPED_TEACHER", shipped)
    return shipped


def test_shipped_teacher_used_when_data_model_and_size_match(tmp_path, monkeypatch):
    shipped = _ship(tmp_path, monkeypatch)
    assert demo.shipped_teacher(demo.parse_opt([])) == shipped


@pytest.mark.parametrize("change,args", [
    ({"generator": {"generator": "shapes", "n_train": 600, "n_val": 150, "img_size": 256, "difficulty": 0.8,
                    "seed": 0, "image_format": "jpg"}}, []),
    ({}, ["--imgsz", "160"]),
    ({}, ["--teacher-cfg", "models/yolov5m.yaml"]),
])
def test_shipped_teacher_refused_when_anything_differs(tmp_path, monkeypatch, change, args):
    _ship(tmp_path, monkeypatch, **change)
    assert demo.shipped_teacher(demo.parse_opt(args)) is None


def test_no_shipped_teacher_without_its_record(tmp_path, monkeypatch):
    shipped = _ship(tmp_path, monkeypatch)
    shipped.with_suffix(".yaml").unlink()
    assert demo.shipped_teacher(demo.parse_opt([])) is None


def test_teacher_weight_flag_wins(tmp_path, monkeypatch):
    _ship(tmp_path, monkeypatch)
    assert demo.find_teacher(demo.parse_opt(["--teacher-weight", "x.pt"])) == Path("x.pt")


def test_demo_caches_training_images_unless_told_not_to():
    assert demo.common_args(demo.parse_opt([]), 60)["cache"] == "ram"
    assert demo.common_args(demo.parse_opt(["--cache", "none"]), 60)["cache"] is None
    assert demo.common_args(demo.parse_opt(["--cache", "disk"]), 60)["cache"] == "disk"


def test_ship_record_command_reproduces_the_run():
    import ship_demo_teacher

    cmd = ship_demo_teacher.command_line({"cfg": "models/yolov5s.yaml", "data": "data/shapes.yaml", "imgsz": 128,
                                          "epochs": 300, "batch_size": 16, "linear_lr": True, "hyp": "",
                                          "optimizer": "Adam", "seed": 0})
    assert cmd == ("python train.py --weights '' --cfg models/yolov5s.yaml --data data/shapes.yaml --optimizer Adam "
                   "--imgsz 128 --batch-size 16 --epochs 300 --seed 0 --linear-lr")


def _kd_table():
    sys.path.insert(0, str(ROOT / "bench"))
    import kd_table

    return kd_table


def test_kd_table_runs_the_variants_on_request_only(tmp_path):
    kd_table = _kd_table()
    assert kd_table.parse_opt([]).methods == ["baseline", "output", "output+at", "output+cwd", "output+pkd",
                                              "output+mimic", "output+at+cwd"]
    opt = kd_table.parse_opt(["--methods", "output+at+pkd", "output+at_masked"])
    assert [kd_table.METHODS[m] for m in opt.methods] == [("at", "pkd"), ("at_masked",)]


def test_kd_table_summary_by_hand(tmp_path):
    kd_table = _kd_table()
    cells = [dict(method="baseline", map50="0.20", map="0.10"), dict(method="baseline", map50="0.24", map="0.12"),
             dict(method="output+at", map50="0.30", map="0.16"), dict(method="output+at", map50="0.34", map="0.18")]
    text = kd_table.summary(cells, (0.42, 0.21))
    base50, kd50 = 0.22, 0.32
    assert f"{kd50:.3f} +- {statistics.stdev([0.30, 0.34]):.3f}" in text
    assert f"{100 * (kd50 - base50) / (0.42 - base50):.0f}%" in text  # 50% of the gap at mAP@.5
    assert f"{100 * (0.17 - 0.11) / (0.21 - 0.11):.0f}%" in text  # 60% at mAP@.5:.95


def test_kd_table_skips_finished_cells(tmp_path, monkeypatch):
    kd_table = _kd_table()
    opt = kd_table.parse_opt(["--methods", "baseline", "output", "--seeds", "0", "--csv", str(tmp_path / "t.csv"),
                              "--alpha", "1", "--beta", "0.25"])
    assert kd_table.cell_key(opt, "baseline", 0)[4:] == ("", "", ""), "the baseline does not depend on KD settings"
    for row in ({"method": "teacher", "map50": "0.5", "map": "0.3", "teacher": "t.pt"},
                dict(zip(kd_table.KEY, kd_table.cell_key(opt, "baseline", 0)), map50="0.2", map="0.1"),
                dict(zip(kd_table.KEY, kd_table.cell_key(opt, "output", 0)), map50="0.3", map="0.15")):
        kd_table.append_cell(opt.csv, {f: row.get(f, "") for f in kd_table.FIELDS})

    def no_training(*args, **kwargs):
        raise AssertionError("a finished cell was trained again")

    monkeypatch.setattr(kd_table, "train_cell", no_training)
    text = kd_table.main(opt)
    # (0.3 - 0.2) / (0.5 - 0.2) = 33% at mAP@.5, (0.15 - 0.1) / (0.3 - 0.1) = 25% at mAP@.5:.95
    assert "baseline" in text and "33%" in text and "25%" in text


def test_kd_table_lists_cells_at_other_weights_apart(tmp_path):
    """A cell run at another beta must not mix into the main table's mean; it is listed on its own."""
    kd_table = _kd_table()
    opt = kd_table.parse_opt(["--methods", "baseline", "output+pkd", "--seeds", "0", "1", "--csv",
                              str(tmp_path / "t.csv"), "--alpha", "0.1", "--beta", "0.25", "--table-only"])
    keys = [kd_table.cell_key(opt, "output+pkd", 0), kd_table.cell_key(opt, "output+pkd", 1)]
    other = (*keys[0][:5], "0.05", "")  # seed 0 again, at beta 0.05; its seed 1 is written first
    for key, m50 in ((keys[0], "0.30"), (keys[1], "0.34"), (other[:1] + ("1",) + other[2:], "0.70"), (other, "0.50")):
        kd_table.append_cell(opt.csv, {**dict.fromkeys(kd_table.FIELDS, ""), **dict(zip(kd_table.KEY, key)),
                                       "map50": m50, "map": "0.1"})
    main, _, rest = kd_table.main(opt).partition("other KD weights")
    assert f"0.320 +- {statistics.stdev([0.30, 0.34]):.3f}" in main and "0.600" not in main
    row = next(line for line in rest.splitlines() if line.startswith("output+pkd"))
    assert row.split()[3:] == ["0.05", "0,1", "0.600", "0.100", "-"], "seeds listed in order"


def test_kd_table_refuses_a_run_folder_of_another_recipe(tmp_path, monkeypatch):
    """A folder named for a cell but trained with another per-loss weight must not be taken as that cell."""
    kd_table = _kd_table()
    opt = kd_table.parse_opt(["--methods", "output+pkd", "--seeds", "0", "--csv", str(tmp_path / "t.csv"),
                              "--project", str(tmp_path / "runs"), "--alpha", "0.1", "--beta", "0.25"])
    trained = []
    monkeypatch.setattr("demo.train_student", lambda *a, **k: trained.append(a[1]))
    teacher = tmp_path / "teacher.pt"
    kd_table.train_cell(opt, teacher, "output+pkd", 0)
    run = tmp_path / "runs" / kd_table.cell_name(opt, "output+pkd", 0)
    assert trained == [run.name] and (run / kd_table.RECIPE_FILE).exists()

    kd_table.train_cell(opt, teacher, "output+pkd", 0)  # same recipe: the folder is its own, training goes on
    assert len(trained) == 2
    from utils.kd import losses

    weights = dict(losses.LOSS_WEIGHTS)
    monkeypatch.setattr(losses, "LOSS_WEIGHTS", {**weights, "pkd": weights["pkd"] * 5})
    with pytest.raises(SystemExit, match="loss_weights"):
        kd_table.train_cell(opt, teacher, "output+pkd", 0)
    monkeypatch.setattr(losses, "LOSS_WEIGHTS", weights)
    with pytest.raises(SystemExit, match="teacher"):
        kd_table.train_cell(opt, tmp_path / "other.pt", "output+pkd", 0)
    assert len(trained) == 2


def test_kd_table_train_args_make_their_own_cells(tmp_path, monkeypatch):
    """--train-args reach train_kd.py, key their cells apart from the plain ones, and may not override the table."""
    kd_table = _kd_table()
    argv = ["--methods", "baseline", "output+at", "--seeds", "0", "--csv", str(tmp_path / "t.csv"),
            "--project", str(tmp_path / "runs")]
    opt = kd_table.parse_opt(argv + ["--train-args", "--kd_loss_selected  bce --kd_schedule cos"])
    plain = kd_table.parse_opt(argv)
    assert kd_table.cell_key(opt, "output+at", 0) != kd_table.cell_key(plain, "output+at", 0)
    assert kd_table.cell_key(opt, "output+at", 0)[-1] == "--kd_loss_selected bce --kd_schedule cos"
    assert kd_table.cell_key(opt, "baseline", 0) == kd_table.cell_key(plain, "baseline", 0)
    assert kd_table.cell_name(opt, "output+at", 0) != kd_table.cell_name(plain, "output+at", 0)
    calls = {}
    monkeypatch.setattr("demo.train_student",
                        lambda opt_, name, teacher, overrides=None: calls.update({name: overrides}))
    kd_table.train_cell(opt, tmp_path / "t.pt", "output+at", 0)
    kd_table.train_cell(opt, tmp_path / "t.pt", "baseline", 0)
    assert calls[kd_table.cell_name(opt, "output+at", 0)] == {"kd_loss_selected": "bce", "kd_schedule": "cos"}
    assert calls[kd_table.cell_name(opt, "baseline", 0)] is None
    with pytest.raises(SystemExit, match="beta"):
        kd_table.train_overrides(kd_table.parse_opt(argv + ["--train-args", "--beta 2"]))


def test_kd_table_baseline_args_make_their_own_baseline_cells(tmp_path, monkeypatch):
    """--baseline-args reach the baseline's training (train.py flags only), key its cells and run folders apart, and
    the main table compares the KD cells against the baseline cells of the same --baseline-args."""
    kd_table = _kd_table()
    argv = ["--methods", "baseline", "output+at", "--seeds", "0", "--csv", str(tmp_path / "t.csv"),
            "--project", str(tmp_path / "runs")]
    opt = kd_table.parse_opt(argv + ["--baseline-args", "--hyp  my_hyp.yaml", "--train-args", "--kd_schedule cos"])
    plain = kd_table.parse_opt(argv)
    assert kd_table.cell_key(opt, "baseline", 0)[4:] == ("", "", "--hyp my_hyp.yaml")
    assert kd_table.cell_key(plain, "baseline", 0)[4:] == ("", "", "")
    assert kd_table.cell_key(opt, "output+at", 0)[-1] == "--kd_schedule cos"  # KD cells keep their own flags
    for spelling in ("--hyp=my_hyp.yaml", " --hyp   'my_hyp.yaml' "):  # what argparse reads alike keys alike
        same = kd_table.parse_opt(argv + [f"--baseline-args={spelling}"])
        assert kd_table.cell_key(same, "baseline", 0) == kd_table.cell_key(opt, "baseline", 0)
        assert kd_table.cell_name(same, "baseline", 0) == kd_table.cell_name(opt, "baseline", 0)
    assert kd_table.cell_name(opt, "baseline", 0) != kd_table.cell_name(plain, "baseline", 0)
    calls = {}
    monkeypatch.setattr("demo.train_student",
                        lambda opt_, name, teacher, overrides=None: calls.update({name: (teacher, overrides)}))
    kd_table.train_cell(opt, tmp_path / "t.pt", "baseline", 0)
    assert calls[kd_table.cell_name(opt, "baseline", 0)] == (None, {"hyp": "my_hyp.yaml"})
    for bad in ("--kd_schedule cos", "--seed 3"):  # a KD flag (train.py has none) and one the table sets
        with pytest.raises(SystemExit, match="--baseline-args"):
            kd_table.train_overrides(kd_table.parse_opt(argv + ["--baseline-args", bad]), "baseline")
    cells = [("baseline", "", "0.20", "0.10"), ("baseline", "--hyp my_hyp.yaml", "0.30", "0.20"),
             ("output+at", "--kd_schedule cos", "0.55", "0.38")]
    for method, flags, m50, m in cells:
        key = kd_table.cell_key(opt, method, 0)[:6] + (flags,)
        kd_table.append_cell(opt.csv, {**dict.fromkeys(kd_table.FIELDS, ""), **dict(zip(kd_table.KEY, key)),
                                       "map50": m50, "map": m})
    kd_table.append_cell(opt.csv, {**dict.fromkeys(kd_table.FIELDS, ""), "method": "teacher", "map50": "0.80",
                                   "map": "0.60", "teacher": "t.pt"})
    main = kd_table.main(kd_table.parse_opt([*argv, "--table-only", "--baseline-args", "--hyp my_hyp.yaml",
                                             "--train-args", "--kd_schedule cos"])).split("other KD weights")[0]
    baseline_row = next(line for line in main.splitlines() if line.startswith("baseline"))
    assert "0.300" in baseline_row and "0.200" in baseline_row  # the --baseline-args cell, not the plain one
    # gap closed by hand: (0.55 - 0.30) / (0.80 - 0.30) = 50%, (0.38 - 0.20) / (0.60 - 0.20) = 45%
    at_row = next(line for line in main.splitlines() if line.startswith("output+at"))
    assert at_row.split()[-2:] == ["50%", "45%"]


def test_kd_table_names_a_cell_with_a_long_layer_list_within_the_file_name_limit(tmp_path):
    """A layer list in --train-args used to give a run folder name past 255 bytes (OSError: File name too long)."""
    kd_table = _kd_table()
    argv = ["--methods", "output+at", "--seeds", "0", "--epochs", "120", "--csv", str(tmp_path / "t.csv"),
            "--project", str(tmp_path / "runs")]
    layers = " ".join(f"model.{i}" for i in range(1, 24))
    names = []
    for teacher_layers in (layers, layers.replace("model.23", "model.22")):
        opt = kd_table.parse_opt(argv + ["--train-args", f"--kd_layers {layers} --teacher_kd_layers {teacher_layers}"])
        name = kd_table.cell_name(opt, "output+at", 0)
        assert len(name.encode()) < 255
        (tmp_path / "runs" / name).mkdir(parents=True)  # the file system takes it
        names.append(name)
    assert names[0] != names[1]  # lists that differ only at the end still get their own folders
    short = kd_table.parse_opt(argv + ["--train-args", "--kd_schedule cos"])
    assert kd_table.cell_name(short, "output+at", 0).endswith("_kd-schedule-cos")  # short ones keep the plain form


def test_kd_table_reads_and_extends_a_csv_from_before_train_args(tmp_path):
    kd_table = _kd_table()
    path = tmp_path / "old.csv"
    path.write_text("method,seed,imgsz,epochs,alpha,beta,map50,map,train_s,teacher\n"
                    "baseline,0,128,60,,,0.24516,0.16396,1306,\n"
                    "output+at,0,128,60,0.1,0.25,0.48977,0.28670,700,t.pt\n")
    assert [c["train_args"] for c in kd_table.read_cells(path)] == ["", ""]
    kd_table.append_cell(path, dict(zip(kd_table.FIELDS, ("output+at", "1", "128", "60", "0.1", "0.25", "--x 1",
                                                          "0.5", "0.3", "600", "t.pt"))))
    lines = path.read_text().splitlines()
    assert lines[0] == ",".join(kd_table.FIELDS)
    cells = kd_table.read_cells(path)
    assert [(c["method"], c["seed"], c["map50"], c["train_args"]) for c in cells] == [
        ("baseline", "0", "0.24516", ""), ("output+at", "0", "0.48977", ""), ("output+at", "1", "0.5", "--x 1")]
