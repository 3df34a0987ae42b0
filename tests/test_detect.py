"""End-to-end test of detect.py on a tiny untrained model (CPU)."""
import cv2
import numpy as np
import pytest
import torch

from utils.general import ROOT, yaml_load

checkpoint = pytest.importorskip("utils.checkpoint")
experimental = pytest.importorskip("models.experimental")
if not hasattr(experimental, "attempt_load"):
    pytest.skip("models.experimental.attempt_load is not written yet", allow_module_level=True)
detect = pytest.importorskip("detect")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A 2-class yolov5n at width 1/8, saved through the project's checkpoint API."""
    from models.yolo import Model

    torch.manual_seed(0)
    cfg = yaml_load(ROOT / "models" / "yolov5n.yaml")
    cfg.update(nc=2, width_multiple=0.125)
    model = Model(cfg)
    model.names = ["circle", "square"]
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    checkpoint.save_checkpoint(checkpoint.build_checkpoint(model), path)
    return path


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, (h, w) in (("a.jpg", (48, 64)), ("b.png", (64, 40))):
        cv2.imwrite(str(folder / name), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    return folder


def test_parse_opt_defaults():
    opt = detect.parse_opt(["--weights", "w.pt", "--imgsz", "320"])
    assert opt.imgsz == [320, 320] and opt.weights == ["w.pt"]
    assert (opt.conf_thres, opt.iou_thres, opt.max_det, opt.line_thickness) == (0.25, 0.45, 1000, 3)
    assert opt.project.endswith("runs/detect") and opt.name == "exp" and not opt.save_txt
    assert detect.parse_opt(["--classes", "0", "2", "--imgsz", "64", "96"]).classes == [0, 2]


def test_detect_images_labels_and_crops(weights, images, tmp_path):
    save_dir = detect.run(weights=str(weights), source=str(images), imgsz=64, conf_thres=0.0, save_txt=True,
                          save_conf=True, save_crop=True, max_det=5, project=tmp_path / "runs", name="exp")
    assert save_dir == tmp_path / "runs" / "exp"
    for name, shape in (("a.jpg", (48, 64, 3)), ("b.png", (64, 40, 3))):
        out = cv2.imread(str(save_dir / name))
        assert out is not None and out.shape == shape
    for stem in ("a", "b"):
        rows = np.loadtxt(save_dir / "labels" / f"{stem}.txt", ndmin=2)
        assert rows.shape[1] == 6 and 1 <= len(rows) <= 5  # cls xc yc w h conf, max_det respected
        assert set(rows[:, 0]) <= {0, 1} and rows[:, 1:5].min() >= 0 and rows[:, 1:5].max() <= 1
    crops = list((save_dir / "crops").rglob("*.jpg"))
    assert crops and {c.parent.name for c in crops} <= {"circle", "square"}


def test_detect_nosave_no_conf_and_increment(weights, images, tmp_path):
    kwargs = dict(weights=weights, source=str(images / "*.jpg"), imgsz=64, conf_thres=0.0, save_txt=True,
                  nosave=True, project=tmp_path, name="exp")
    first, second = detect.run(**kwargs), detect.run(**kwargs)
    assert second == tmp_path / "exp2" and first == tmp_path / "exp"
    assert not list(second.glob("*.jpg"))  # --nosave
    rows = np.loadtxt(second / "labels" / "a.txt", ndmin=2)
    assert rows.shape[1] == 5 and not (second / "labels" / "b.txt").exists()  # glob picked only a.jpg


def test_detect_high_threshold_writes_no_labels(weights, images, tmp_path):
    save_dir = detect.run(weights=weights, source=images, imgsz=64, conf_thres=1.0, save_txt=True,
                          project=tmp_path, name="exp")
    assert not list((save_dir / "labels").glob("*.txt")) and (save_dir / "a.jpg").is_file()


def test_detect_video(weights, tmp_path):
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5, (64, 48))
    for i in range(3):
        writer.write(np.full((48, 64, 3), 60 * i, np.uint8))
    writer.release()
    save_dir = detect.run(weights=weights, source=video, imgsz=64, conf_thres=0.0, save_txt=True,
                          max_det=3, project=tmp_path, name="exp")
    cap = cv2.VideoCapture(str(save_dir / "clip.mp4"))
    assert cap.isOpened() and int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
    cap.release()
    assert sorted(p.name for p in (save_dir / "labels").glob("*.txt")) == [f"clip_{i}.txt" for i in (1, 2, 3)]


def test_detect_missing_webcam_and_missing_file(weights, tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot open stream source '99'"):  # no camera 99 here
        detect.run(weights=weights, source="99", project=tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        detect.run(weights=weights, source=tmp_path / "nowhere", project=tmp_path)


def test_cpu_model_runs_channels_last_with_the_same_outputs(weights):
    model = detect._load_model(str(weights), torch.device("cpu"), False)
    convs = [p for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] > 1]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    reference = experimental.attempt_load(str(weights), map_location="cpu").float()  # default layout
    assert reference.model[0].conv.weight.is_contiguous()
    im = np.random.default_rng(1).integers(0, 255, (3, 64, 64), dtype=np.uint8)
    x = detect._to_tensor(im, torch.device("cpu"), False, channels_last=True)
    assert x.is_contiguous(memory_format=torch.channels_last) and x.shape == (1, 3, 64, 64)
    with torch.no_grad():
        ours, theirs = model(x)[0], reference(torch.from_numpy(im)[None].float() / 255)[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-3)
