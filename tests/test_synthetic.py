"""The bundled shapes generator: deterministic, tight labels, usable sizes, and consistent with shapes.yaml."""
import hashlib
from pathlib import Path

import numpy as np
import yaml

from utils.datasets import verify_label
from utils.general import ROOT
from utils.synthetic import MAX_HIDDEN, SHAPE_CLASSES, _visible_boxes, generate_shapes, render_shapes_image


def digests(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    kwargs = {"n_train": 4, "n_val": 2, "img_size": 96}
    a = digests(generate_shapes(tmp_path / "a", seed=3, **kwargs))
    b = digests(generate_shapes(tmp_path / "b", seed=3, workers=1, **kwargs))
    c = digests(generate_shapes(tmp_path / "c", seed=4, **kwargs))
    assert len(a) == 12 and a == b
    assert sum(a[k] != c[k] for k in a) >= 6  # every image differs


def test_regenerating_replaces_old_files(tmp_path):
    generate_shapes(tmp_path, n_train=5, n_val=2, img_size=64)
    generate_shapes(tmp_path, n_train=2, n_val=1, img_size=64)
    assert len(list((tmp_path / "images" / "train").iterdir())) == 2
    assert len(list((tmp_path / "labels" / "val").iterdir())) == 1


def test_a_new_folder_appears_only_when_complete(tmp_path, monkeypatch):
    """Two runs generating the same dataset at once (e.g. two benchmark jobs) must never see it half written."""
    import utils.synthetic as synthetic

    out, seen = tmp_path / "shapes", []
    write = synthetic._write_sample

    def watching(job):
        seen.append(out.exists())
        return write(job)

    monkeypatch.setattr(synthetic, "_write_sample", watching)
    generate_shapes(out, n_train=3, n_val=2, img_size=64, workers=1)
    assert seen == [False] * 5, "the target folder existed while its files were being written"
    assert len(list((out / "images" / "val").iterdir())) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["shapes"], "no temporary folder left behind"


def test_the_folder_another_run_finished_first_is_kept(tmp_path, monkeypatch):
    import utils.synthetic as synthetic

    out = tmp_path / "shapes"
    write = synthetic._write_sample

    def racing(job):
        if not out.exists():  # the other run finishes its copy while this one is still writing
            (out / "images").mkdir(parents=True)
            (out / "theirs.txt").write_text("done")
        return write(job)

    monkeypatch.setattr(synthetic, "_write_sample", racing)
    assert generate_shapes(out, n_train=2, n_val=1, img_size=64, workers=1) == out
    assert (out / "theirs.txt").read_text() == "done", "the finished folder was replaced or mixed"
    assert [p.name for p in tmp_path.iterdir()] == ["shapes"], "no temporary folder left behind"


def test_labels_are_tight_around_visible_pixels():
    for seed in range(6):
        im, labels, owner = render_shapes_image(np.random.default_rng(seed), 128, 0.5)
        assert im.shape == (128, 128, 3) and im.dtype == np.uint8
        for k, (cls, x1, y1, x2, y2) in enumerate(labels):
            ys, xs = np.nonzero(owner == k)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x1, y1, x2, y2)
            assert 0 <= cls < len(SHAPE_CLASSES)


def test_heavily_occluded_objects_are_not_labelled():
    owner = np.full((20, 20), -1, np.int16)
    owner[0:10, 0:10] = 0  # object 0: 100 px visible of 100 drawn
    owner[12:14, 0:10] = 1  # object 1: 20 px visible of 100 drawn (80% hidden)
    owner[15:19, 0:10] = 2  # object 2: 40 px visible of 100 drawn (60% hidden)
    labels, renumbered = _visible_boxes(owner, {k: (100, (0, 0, 20, 20)) for k in range(3)}, {0: 4, 1: 5, 2: 6})
    assert MAX_HIDDEN == 0.7
    assert labels[:, 0].tolist() == [4, 6]
    assert labels[1, 1:].tolist() == [0, 15, 10, 19]
    assert set(np.unique(renumbered).tolist()) == {-1, 0, 1}


def test_objects_stay_detectable_at_128px_and_cover_all_classes(tmp_path):
    sides, classes = [], []
    for seed in range(40):
        _, labels, _ = render_shapes_image(np.random.default_rng(seed), 256, 0.5)
        sides += np.minimum(labels[:, 3] - labels[:, 1], labels[:, 4] - labels[:, 2]).tolist()
        classes += labels[:, 0].astype(int).tolist()
    sides = np.array(sides) * 128 / 256  # box sides once the images are trained at 128 px
    assert set(classes) == set(range(len(SHAPE_CLASSES)))
    assert (sides < 4).mean() < 0.15  # most objects remain well above a few pixels
    assert (sides < 10).mean() > 0.1 and (sides > 30).mean() > 0.1  # but sizes do range from tiny to large
    assert 2 <= len(classes) / 40 <= 10


def test_written_labels_pass_the_loader_checks(tmp_path):
    generate_shapes(tmp_path, n_train=6, n_val=2, img_size=128, difficulty=1.0)
    files = sorted((tmp_path / "labels").rglob("*.txt"))
    assert len(files) == 8
    for f in files:
        labels, status, _, dupes = verify_label(str(f))
        assert status in ("found", "empty") and dupes == 0 and labels[:, 0].max(initial=0) < len(SHAPE_CLASSES)


def test_shapes_yaml_matches_the_generator():
    data = yaml.safe_load((ROOT / "data" / "shapes.yaml").read_text())
    assert data["names"] == list(SHAPE_CLASSES) and data["nc"] == len(SHAPE_CLASSES)
    assert data["download"]["generator"] == "shapes" and data["path"] == "datasets/shapes"
    assert (data["download"]["img_size"], data["download"]["n_train"], data["download"]["n_val"]) == (256, 600, 150)
