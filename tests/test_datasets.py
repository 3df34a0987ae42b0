"""Loader semantics, bad-input handling, label cache, DDP sampler and check_dataset."""
import os
import random
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import DistributedSampler

from utils.datasets import LoadImagesAndLabels, check_dataset, create_dataloader, img2label_paths
from tests.test_augmentations import iou, pixel_boxes

COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255], [0, 255, 255],
                    [255, 128, 0], [128, 0, 255]], dtype=np.uint8)  # BGR, one per class
AUG_OFF = {"hsv_h": 0.0, "hsv_s": 0.0, "hsv_v": 0.0, "degrees": 0.0, "translate": 0.0, "scale": 0.0, "shear": 0.0,
           "perspective": 0.0, "flipud": 0.0, "fliplr": 0.0, "mosaic": 0.0, "mixup": 0.0, "copy_paste": 0.0}


def write_sample(root, name, h, w, objects, ext=".png", texture=False):
    """Write images/<name><ext> with solid boxes (cls, x1, y1, x2, y2) and labels/<name>.txt. Returns the image path."""
    im_path = Path(root) / "images" / f"{name}{ext}"
    lb_path = Path(root) / "labels" / f"{name}.txt"
    im_path.parent.mkdir(parents=True, exist_ok=True)
    lb_path.parent.mkdir(parents=True, exist_ok=True)
    im = np.zeros((h, w, 3), np.uint8)
    if texture:  # a non-flat image, so that JPEG truncation is visible in the pixels
        im = cv2.GaussianBlur(np.random.default_rng(len(name)).integers(0, 255, (h, w, 3), dtype=np.uint8), (5, 5), 2)
    rows = []
    for cls, x1, y1, x2, y2 in objects:
        im[y1:y2, x1:x2] = COLOURS[cls]
        rows.append(f"{cls} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}")
    cv2.imwrite(str(im_path), im)
    lb_path.write_text("\n".join(rows) + ("\n" if rows else ""))
    return im_path


def coloured_dataset(root):
    """Four images, eight objects with a unique class (and colour) each."""
    write_sample(root, "a", 96, 96, [(0, 10, 10, 40, 40), (1, 50, 55, 90, 85)])
    write_sample(root, "b", 72, 96, [(2, 5, 20, 35, 60), (3, 55, 10, 90, 40)])
    write_sample(root, "c", 96, 80, [(4, 20, 5, 60, 30), (5, 10, 50, 45, 90)])
    write_sample(root, "d", 96, 96, [(6, 30, 30, 70, 60), (7, 5, 70, 30, 92)])
    return Path(root) / "images"


def to_bgr(im_tensor):
    return np.ascontiguousarray(im_tensor.permute(1, 2, 0).numpy()[:, :, ::-1])




def check_sample_boxes(im_tensor, targets, thr=0.7, min_side=6):
    """Each target box (normalised) covers the pixels of its class colour; returns how many boxes were checked."""
    im = to_bgr(im_tensor)
    h, w = im.shape[:2]
    checked = 0
    for _, cls, xc, yc, bw, bh in targets.tolist():
        box = ((xc - bw / 2) * w, (yc - bh / 2) * h, (xc + bw / 2) * w, (yc + bh / 2) * h)
        if min(box[2] - box[0], box[3] - box[1]) < min_side:  # slivers cut by the crop blur into the border
            continue
        best = max((iou(box, r) for r in pixel_boxes(im, COLOURS[int(cls)])), default=0.0)
        assert best > thr, f"class {int(cls)}: box {np.round(box, 1)} IoU {best:.2f} with its pixels"
        checked += 1
    return checked


def test_batches_have_the_documented_format(tmp_path):
    images = coloured_dataset(tmp_path)
    loader, dataset = create_dataloader(str(images), 128, 4, 32, workers=0)
    imgs, targets, paths, shapes = next(iter(loader))
    assert imgs.dtype == torch.uint8 and imgs.shape == (4, 3, 128, 128) and imgs.is_contiguous()
    assert targets.dtype == torch.float32 and targets.shape == (8, 6)
    assert sorted(set(targets[:, 0].tolist())) == [0, 1, 2, 3]  # image index within the batch
    assert ((targets[:, 2:] >= 0) & (targets[:, 2:] <= 1)).all()
    assert len(paths) == 4 and all(isinstance(p, str) for p in paths)
    first = imgs[0, :, 128 * 25 // 96, 128 * 25 // 96]  # inside image a's class-0 box, pure blue in BGR
    assert first.tolist() == [0, 0, 255]  # RGB order
    assert shapes[1][0] == (72, 96)  # (h0, w0) of image b
    assert isinstance(dataset.labels[0], np.ndarray) and dataset.labels[0].dtype == np.float32
    assert dataset.shapes.tolist() == [[96, 96], [96, 72], [80, 96], [96, 96]]  # (w, h)
    for i in range(4):
        check_sample_boxes(imgs[i], targets[targets[:, 0] == i], thr=0.8)


def test_shapes_map_boxes_back_to_the_original(tmp_path):
    images = coloured_dataset(tmp_path)
    dataset = LoadImagesAndLabels(str(images), img_size=128, batch_size=2, rect=True, stride=32, pad=0.5)
    for i in range(dataset.n):
        im, targets, path, ((h0, w0), ((gh, gw), (padw, padh))) = dataset[i]
        h, w = im.shape[1:]
        assert h % 32 == 0 and w % 32 == 0 and (h, w) == tuple(dataset.batch_shapes[dataset.batch[i]])
        xc, yc, bw, bh = (targets[:, 2:].numpy() * np.array([w, h, w, h])).T
        letterboxed = np.stack([xc - bw / 2, yc - bh / 2, xc + bw / 2, yc + bh / 2], 1)
        original = (letterboxed - [padw, padh, padw, padh]) / [gw, gh, gw, gh]  # what val.py does with shapes
        xc0, yc0, bw0, bh0 = (dataset.labels[i][:, 1:] * np.array([w0, h0, w0, h0])).T
        expected = np.stack([xc0 - bw0 / 2, yc0 - bh0 / 2, xc0 + bw0 / 2, yc0 + bh0 / 2], 1)
        np.testing.assert_allclose(original, expected, atol=1.0)
        assert path == dataset.im_files[i] and cv2.imread(path).shape[:2] == (h0, w0)


@pytest.mark.parametrize("extra", [{}, {"degrees": 10.0, "shear": 3.0}, {"mixup": 1.0}])
def test_mosaic_samples_keep_boxes_on_objects(tmp_path, extra):
    images = coloured_dataset(tmp_path)
    hyp = {**AUG_OFF, "mosaic": 1.0, "translate": 0.1, "scale": 0.5, "fliplr": 0.5, "flipud": 0.5, **extra}
    dataset = LoadImagesAndLabels(str(images), img_size=128, augment=True, hyp=hyp)
    random.seed(0)
    np.random.seed(0)
    checked = 0
    for i in range(8):
        im, targets, _, shapes = dataset[i % dataset.n]
        assert im.shape == (3, 128, 128) and shapes is None
        if extra.get("mixup"):  # blended colours: check positions against the non-grey, non-black pixels instead
            assert len(targets) >= 2
            continue
        checked += check_sample_boxes(im, targets, thr=0.7 if not extra else 0.6)
    assert extra.get("mixup") or checked >= 8


def test_direct_mosaic_matches_the_canvas_path(tmp_path):
    images = coloured_dataset(tmp_path)
    hyp = {**AUG_OFF, "mosaic": 1.0, "translate": 0.1, "scale": 0.5}
    dataset = LoadImagesAndLabels(str(images), img_size=128, augment=True, hyp=hyp)
    compared = 0
    for seed in range(12):
        random.seed(seed)
        fast, fast_labels = dataset.load_mosaic(seed % 4, direct=True)
        random.seed(seed)
        slow, slow_labels = dataset.load_mosaic(seed % 4, direct=False)
        assert fast.shape == slow.shape == (128, 128, 3)
        assert np.abs(fast.astype(int) - slow.astype(int)).mean() < 4  # only interpolation at edges differs
        if len(fast_labels) == len(slow_labels):  # a box right at the keep/drop threshold may flip
            np.testing.assert_allclose(fast_labels, slow_labels, atol=1.0)
            compared += 1
    assert compared >= 10


def test_bad_inputs_are_skipped_and_counted(tmp_path):
    root = tmp_path / "ds"
    for k in range(3):
        write_sample(root, f"good{k}", 64, 80, [(k, 5, 5, 30, 30)], ext=".jpg")
    bad = {}
    bad["zero"] = write_sample(root, "zero", 64, 64, [(0, 5, 5, 20, 20)], ext=".jpg")
    bad["zero"].write_bytes(b"")
    bad["truncated"] = write_sample(root, "truncated", 64, 64, [(0, 5, 5, 20, 20)], ext=".jpg", texture=True)
    bad["truncated"].write_bytes(bad["truncated"].read_bytes()[: bad["truncated"].stat().st_size // 2])
    bad["text"] = write_sample(root, "text", 64, 64, [(0, 5, 5, 20, 20)], ext=".jpg")
    bad["text"].write_text("this is not an image")
    for name, text in {"columns": "0 0.5 0.5 0.2\n", "nonnumeric": "0 0.5 abc 0.2 0.2\n",
                       "range": "0 0.5 0.5 1.7 0.2\n", "classid": "7 0.5 0.5 0.2 0.2\n"}.items():
        bad[name] = write_sample(root, name, 64, 64, [], ext=".jpg")
        (root / "labels" / f"{name}.txt").write_text(text)
    dup = write_sample(root, "dup", 64, 64, [(1, 10, 10, 30, 30)], ext=".jpg")
    (root / "labels" / "dup.txt").write_text((root / "labels" / "dup.txt").read_text() * 3)
    tail = write_sample(root, "tail", 64, 64, [(2, 10, 10, 40, 40)], ext=".jpg", texture=True)
    tail.write_bytes(tail.read_bytes()[:-2])  # drop the FFD9 end marker only

    loader, dataset = create_dataloader(str(root / "images"), 64, 4, 32, workers=0, nc=3)
    s = dataset.stats
    assert s["corrupt"] == 7 and s["duplicate"] == 2
    assert sorted(Path(f).stem for f in dataset.im_files) == ["dup", "good0", "good1", "good2", "tail"]
    text = "\n".join(dataset.messages)
    for name in bad:
        assert f"{name}.jpg" in text  # every skipped file is named with its reason
    for reason in ("zero-byte", "truncated", "not a decodable image", "5 (cls", "non-numeric", "outside 0..1",
                   "class id 7 >= nc=3", "duplicate"):
        assert reason in text
    assert tail.read_bytes()[-2:] == b"\xff\xd9" and cv2.imread(str(tail)) is not None  # repaired in place
    assert len(dataset.labels[dataset.im_files.index(str(dup))]) == 1
    n_images = sum(len(batch[2]) for batch in loader)  # every kept file loads
    assert n_images == 5


def test_splits_as_folders_lists_and_txt_files(tmp_path):
    coloured_dataset(tmp_path / "one")
    write_sample(tmp_path / "two", "e", 64, 64, [(0, 5, 5, 30, 30)])
    (tmp_path / "list.txt").write_text("./one/images/a.png\none/images/b.png\n\n" f"{tmp_path}/two/images/e.png\n")
    from_txt = LoadImagesAndLabels(str(tmp_path / "list.txt"), img_size=64)
    assert [Path(f).name for f in from_txt.im_files] == ["a.png", "b.png", "e.png"]
    assert from_txt.cache_path == tmp_path / "list.cache" and sum(map(len, from_txt.labels)) == 5
    folders = LoadImagesAndLabels([str(tmp_path / "one" / "images"), str(tmp_path / "two" / "images")], img_size=64)
    assert folders.n == 5 and folders.label_files[-1] == str(tmp_path / "two" / "labels" / "e.txt")


def test_missing_and_empty_labels_are_background(tmp_path):
    root = tmp_path / "ds"
    write_sample(root, "full", 64, 64, [(0, 5, 5, 30, 30)])
    write_sample(root, "empty", 64, 64, [])
    write_sample(root, "missing", 64, 64, [(1, 5, 5, 30, 30)])
    (root / "labels" / "missing.txt").unlink()
    dataset = LoadImagesAndLabels(str(root / "images"), img_size=64)
    assert (dataset.stats["found"], dataset.stats["missing"], dataset.stats["empty"]) == (1, 1, 1)
    assert dataset.n == 3 and sum(len(lb) for lb in dataset.labels) == 1


def test_no_usable_image_names_the_path(tmp_path):
    empty = tmp_path / "nothing" / "images"
    empty.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="nothing"):
        LoadImagesAndLabels(str(empty), img_size=64)
    root = tmp_path / "broken"
    write_sample(root, "x", 64, 64, [(0, 5, 5, 20, 20)]).write_bytes(b"")
    write_sample(root, "y", 64, 64, [(0, 5, 5, 20, 20)]).write_text("nope")
    with pytest.raises(FileNotFoundError, match="broken"):
        LoadImagesAndLabels(str(root / "images"), img_size=64)


def test_label_cache_is_reused_and_rebuilt_on_change(tmp_path):
    images = coloured_dataset(tmp_path)
    first = LoadImagesAndLabels(str(images), img_size=64)
    assert not first.from_cache and first.cache_path == tmp_path / "labels.cache" and first.cache_path.is_file()
    assert LoadImagesAndLabels(str(images), img_size=64).from_cache
    label = Path(img2label_paths([str(images / "a.png")])[0])
    text = label.read_text()
    label.write_text(text.replace("0 ", "3 ", 1))  # same size, new content: the mtime must catch it
    st = label.stat()
    os.utime(label, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    second = LoadImagesAndLabels(str(images), img_size=64)
    assert not second.from_cache and second.labels[0][0, 0] == 3
    label.write_text(text + "1 0.5 0.5 0.1 0.1\n")  # a size change alone also rebuilds
    os.utime(label, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    third = LoadImagesAndLabels(str(images), img_size=64)
    assert not third.from_cache and len(third.labels[0]) == 3


@pytest.mark.parametrize("cache", ["ram", "disk"])
def test_image_caches_give_the_same_samples(tmp_path, cache):
    images = coloured_dataset(tmp_path)
    plain = LoadImagesAndLabels(str(images), img_size=64)
    cached = LoadImagesAndLabels(str(images), img_size=64, cache_images=cache)
    for i in range(plain.n):
        assert torch.equal(plain[i][0], cached[i][0]) and torch.equal(plain[i][1], cached[i][1])
    if cache == "disk":
        assert len(list(images.glob("*.npy"))) == 4
    else:
        assert all(im is not None for im in cached.ims)


def test_colour_jitter_never_touches_the_ram_cache(tmp_path):
    images = coloured_dataset(tmp_path)
    hyp = {**AUG_OFF, "hsv_h": 0.5, "hsv_s": 0.5, "hsv_v": 0.5}  # no geometry change: letterbox may pass arrays through
    dataset = LoadImagesAndLabels(str(images), img_size=96, augment=True, hyp=hyp, rect=True, cache_images="ram")
    before = [im.copy() for im in dataset.ims]
    np.random.seed(0)
    for i in range(dataset.n):
        dataset[i]
    assert all((a == b).all() for a, b in zip(before, dataset.ims))


def test_rect_batches_sort_by_aspect_ratio(tmp_path):
    root = tmp_path / "ds"
    for k, (h, w) in enumerate([(40, 96), (96, 48), (48, 96), (96, 40)]):
        write_sample(root, f"im{k}", h, w, [(0, 2, 2, 20, 20)])
    dataset = LoadImagesAndLabels(str(root / "images"), img_size=96, batch_size=2, rect=True, stride=32, pad=0.5)
    aspect = dataset.shapes[:, 1] / dataset.shapes[:, 0]
    assert (np.diff(aspect) >= 0).all()
    assert dataset.batch_shapes.tolist() == [[64, 128], [128, 64]]  # (h, w): wide batch, then tall batch
    for i in range(4):
        assert tuple(dataset[i][0].shape[1:]) == tuple(dataset.batch_shapes[dataset.batch[i]])


def test_distributed_sampler_under_ddp(tmp_path, monkeypatch):
    images = coloured_dataset(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    loader, _ = create_dataloader(str(images), 64, 2, 32, rank=1, workers=0, shuffle=True, seed=5)
    assert isinstance(loader.sampler, DistributedSampler)
    assert (loader.sampler.num_replicas, loader.sampler.rank, loader.sampler.seed) == (2, 1, 5)
    assert len(loader.sampler) == 2
    plain, _ = create_dataloader(str(images), 64, 2, 32, rank=-1, workers=0)
    assert not isinstance(plain.sampler, DistributedSampler)


def test_seeded_workers_repeat_augmentations(tmp_path):
    images = coloured_dataset(tmp_path)
    hyp = {**AUG_OFF, "mosaic": 1.0, "scale": 0.5, "translate": 0.1, "hsv_v": 0.4}

    def first_batch(seed, parent_seed):
        random.seed(parent_seed)  # the worker must not depend on the random state it inherits from its parent
        np.random.seed(parent_seed)
        loader, _ = create_dataloader(str(images), 64, 4, 32, hyp=hyp, augment=True, workers=1, seed=seed)
        return next(iter(loader))

    a, b, c = first_batch(1, 100), first_batch(1, 200), first_batch(2, 100)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_check_dataset_classes_and_paths(tmp_path, monkeypatch):
    coloured_dataset(tmp_path / "ds")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="names"):
        check_dataset({"path": "ds", "train": "images", "val": "images"})
    with pytest.raises(ValueError, match="nc=3"):
        check_dataset({"path": "ds", "train": "images", "val": "images", "nc": 3, "names": ["a", "b"]})
    out = check_dataset(write_yaml(tmp_path / "d.yaml", {"path": "ds", "train": ["images"], "val": "images",
                                                         "names": {0: "cat", 1: "dog"}}))
    assert out["nc"] == 2 and out["names"] == ["cat", "dog"] and out["test"] is None
    assert out["path"] == str(tmp_path / "ds") and out["train"] == [str(tmp_path / "ds" / "images")]
    only_nc = check_dataset({"path": str(tmp_path / "ds"), "train": "images", "val": "images", "nc": 2})
    assert only_nc["names"] == ["class0", "class1"]


def test_check_dataset_finds_bare_names_in_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no datasets/VOC here or (normally) in the repo: the val path must be named
    try:
        out = check_dataset("VOC.yaml", autodownload=False)
    except FileNotFoundError as e:
        assert "test2007" in str(e)
    else:
        assert out["nc"] == 20 and out["names"][-1] == "tvmonitor"


def test_check_dataset_runs_the_generator_hook(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = {"path": str(tmp_path / "gen"), "train": "images/train", "val": "images/val", "names": ["a"],
           "download": {"generator": "shapes", "n_train": 3, "n_val": 2, "img_size": 64}}
    out = check_dataset(write_yaml(tmp_path / "g.yaml", cfg))
    assert len(list(Path(out["val"]).glob("*.jpg"))) == 2
    with pytest.raises(ValueError, match="unknown"):
        check_dataset({**cfg, "path": str(tmp_path / "gen2"), "download": {"generator": "nope"}})
    monkeypatch.setattr("utils.datasets._dataset_generators", lambda: {"shapes": lambda root, **kw: None})
    with pytest.raises(FileNotFoundError, match="gen3"):
        check_dataset({**cfg, "path": str(tmp_path / "gen3")})
    with pytest.raises(FileNotFoundError, match="gen4"):  # scripts outside data/scripts are never run
        check_dataset({**cfg, "path": str(tmp_path / "gen4"), "download": "rm -rf /tmp/x.sh"})
