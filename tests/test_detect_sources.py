"""detect.py live sources (a local video read through the stream loader), --view-img and --visualize."""
import threading
import time

import cv2
import numpy as np
import pytest
import torch

import detect
from models.yolo import Model
from tests.conftest import ROOT, tiny_model_cfg
from utils import streams
from utils.checkpoint import build_checkpoint, save_checkpoint
from utils.general import yaml_load
from utils.plots import feature_visualization

LEVELS = (0, 50, 100, 150, 200)  # grey level of each test video frame, so a frame is recognisable after MJPG


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = Model(tiny_model_cfg(nc=2))
    model.names = ["circle", "square"]
    return str(save_checkpoint(build_checkpoint(model), tmp_path_factory.mktemp("sources") / "tiny.pt"))


@pytest.fixture
def video(tmp_path):
    """A 5-frame 64x48 MJPG clip at 25 FPS whose frames are flat grey at LEVELS."""
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (64, 48))
    for level in LEVELS:
        writer.write(np.full((48, 64, 3), level, np.uint8))
    writer.release()
    return path


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "a.jpg"
    cv2.imwrite(str(path), np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    return path


def test_is_stream_and_source_lists(tmp_path):
    assert all(streams.is_stream(s) for s in ("0", "12", "rtsp://cam/live", "RTMP://x", "https://x/a.mp4",
                                                "cams.streams"))
    assert not any(streams.is_stream(s) for s in ("a.mp4", "images/", "*.jpg", "0.jpg"))
    listing = tmp_path / "cams.streams"
    listing.write_text("# my cameras\n0\n\nrtsp://host/live\n")
    assert streams.read_sources(listing) == ["0", "rtsp://host/live"]
    assert streams.read_sources("rtsp://host/live") == ["rtsp://host/live"]
    assert [streams.stream_name(s) for s in ("0", "rtsp://host:554/live.sdp", "http://h/x?a=1", "d/clip.avi")] == \
        ["webcam0", "live", "x", "clip"]
    (tmp_path / "empty.streams").write_text("\n# nothing\n")
    with pytest.raises(ValueError, match="one webcam index, URL or video path per line"):
        streams.read_sources(tmp_path / "empty.streams")


def test_stream_loader_reads_new_frames_in_order_and_stops(video):
    loader = streams.LoadStreams(str(video), img_size=64, stride=32)
    levels, shapes = [], set()
    for sources, im, im0s, cap, s in loader:
        assert sources == [str(video)] and cap is None and len(im0s) == 1
        shapes.add(im.shape)
        levels.append(int(round(im0s[0].mean())))
    # each yielded frame is one of the clip's frames, none twice, in order; the loader ended by itself
    assert 1 <= len(levels) <= 5 and all(any(abs(v - g) <= 3 for g in LEVELS) for v in levels)
    assert levels == sorted(set(levels)) and shapes == {(1, 3, 64, 64)}  # 48 rows padded to 64
    assert not any(t.is_alive() for t in loader.threads) and loader.frame == len(levels)


def test_two_sources_stack_into_one_batch(video, tmp_path):
    listing = tmp_path / "two.streams"
    listing.write_text(f"{video}\n{video}\n")
    loader = streams.LoadStreams(str(listing), img_size=64, stride=32)
    batches = [im.shape for _, im, _, _, _ in loader]
    assert batches and set(batches) == {(2, 3, 64, 64)} and len(loader) == 2


class _StalledCapture:
    """A live source that sends one frame and then nothing (read blocks, then fails)."""

    def __init__(self, _source):
        self.calls = 0

    def isOpened(self):
        return True

    def read(self):
        self.calls += 1
        if self.calls == 1:
            return True, np.zeros((48, 64, 3), np.uint8)
        time.sleep(1.0)
        return False, None

    def get(self, _prop):
        return 0

    def release(self):
        pass


def test_stalled_stream_times_out_instead_of_hanging(monkeypatch, caplog):
    monkeypatch.setattr(streams.cv2, "VideoCapture", _StalledCapture)
    start = time.monotonic()
    frames = list(streams.LoadStreams("rtsp://stalled/live", img_size=64, timeout=0.2))
    assert len(frames) == 1 and time.monotonic() - start < 3.0
    assert "no new frame from rtsp://stalled/live in 0.2s" in caplog.text


def test_detect_on_a_stream_source_saves_labels_and_video(weights, video, tmp_path):
    listing = tmp_path / "clip.streams"
    listing.write_text(f"{video}\n")
    threads_before = threading.active_count()
    save_dir = detect.run(weights=weights, source=str(listing), imgsz=64, conf_thres=0.0, max_det=3,
                          save_txt=True, project=tmp_path / "runs", name="exp")
    labels = sorted(p.name for p in (save_dir / "labels").glob("*.txt"))
    assert 1 <= len(labels) <= 5 and set(labels) <= {f"clip_{i}.txt" for i in range(1, 6)}
    cap = cv2.VideoCapture(str(save_dir / "clip.mp4"))
    assert cap.isOpened() and int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == len(labels)
    assert (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))) == (64, 48)
    cap.release()
    assert threading.active_count() == threads_before  # reader threads finished


def test_view_img_without_a_display_warns_once_and_finishes(weights, video, tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    save_dir = detect.run(weights=weights, source=str(video), imgsz=64, view_img=True, project=tmp_path, name="e")
    assert caplog.text.count("--view-img ignored") == 1 and (save_dir / "clip.mp4").is_file()


def test_view_img_with_headless_opencv_warns(monkeypatch, caplog):
    def headless(*args):
        raise cv2.error("The function is not implemented")  # what opencv-python-headless raises

    monkeypatch.setenv("DISPLAY", ":0")
    monkeypatch.setattr(cv2, "namedWindow", headless)
    viewer = streams.Viewer(True)
    assert not viewer.enabled and not viewer.show("x", np.zeros((8, 8, 3), np.uint8))
    assert caplog.text.count("no GUI support") == 1


def test_view_img_shows_each_image_and_q_stops(weights, image, tmp_path, monkeypatch):
    """A display that works (OpenCV's GUI calls replaced): every image is shown; pressing 'q' stops the run."""
    shown = []
    monkeypatch.setenv("DISPLAY", ":0")
    for name in ("namedWindow", "destroyWindow", "destroyAllWindows"):
        monkeypatch.setattr(cv2, name, lambda *args: None)
    monkeypatch.setattr(cv2, "imshow", lambda title, im: shown.append((title, im.shape)))
    monkeypatch.setattr(cv2, "waitKey", lambda delay: -1)
    cv2.imwrite(str(image.parent / "b.jpg"), cv2.imread(str(image)))
    detect.run(weights=weights, source=str(image.parent / "*.jpg"), imgsz=64, view_img=True, project=tmp_path)
    assert shown == [(str(image), (64, 64, 3)), (str(image.parent / "b.jpg"), (64, 64, 3))]
    shown.clear()
    monkeypatch.setattr(cv2, "waitKey", lambda delay: ord("q"))
    detect.run(weights=weights, source=str(image.parent / "*.jpg"), imgsz=64, view_img=True, project=tmp_path)
    assert len(shown) == 1


def test_visualize_writes_a_feature_image_per_layer(weights, image, tmp_path):
    save_dir = detect.run(weights=weights, source=str(image), imgsz=64, visualize=True, project=tmp_path)
    rows = yaml_load(ROOT / "models" / "yolov5n.yaml")
    layers = [name.split(".")[-1] for _, _, name, _ in rows["backbone"] + rows["head"]]
    expected = {f"stage{i}_{t}_features.png" for i, t in enumerate(layers) if t != "Detect"}
    assert len(expected) == 24  # yolov5n: 24 layers before Detect; at 64 px even P5 maps are 2x2
    assert {p.name for p in (save_dir / "a").glob("*.png")} == expected


def test_feature_visualization_mosaic_layout(tmp_path):
    x = torch.arange(10 * 16 * 32, dtype=torch.float32).view(1, 10, 16, 32)  # 10 channels of 16x32
    file = feature_visualization(x, "models.common.C3", 4, save_dir=tmp_path, n=32, min_tile=64)
    assert file == tmp_path / "stage4_C3_features.png"
    im = cv2.imread(str(file))
    # by hand: tiles enlarged 2x to 32x64 (longest side >= 64), 8 per row, 2 px gaps -> 2 rows: 32 + 2 + 32 = 66
    # high, 8 * 64 + 7 * 2 = 526 wide; the gap after the first tile is white, and so is the empty end of row 2
    assert im.shape == (66, 526, 3) and (im[:, 64:66] == 255).all() and (im[34:, 2 * 66:] == 255).all()
    assert feature_visualization(x, "models.yolo.Detect", 24, save_dir=tmp_path) is None
    assert feature_visualization(x[:, :, :1], "models.common.Conv", 5, save_dir=tmp_path) is None  # 1-pixel rows


def test_cli_bad_stream_sources_print_one_error_line(weights, tmp_path, caplog):
    from utils.general import run_cli

    (tmp_path / "empty.streams").write_text("# nothing here\n")
    for source, message in ((tmp_path / "missing.streams", "does not exist"),
                            (tmp_path / "empty.streams", "is empty"), ("98", "cannot open stream source '98'")):
        caplog.clear()
        opt = detect.parse_opt(["--weights", weights, "--source", str(source), "--project", str(tmp_path)])
        with pytest.raises(SystemExit) as exit_info:
            run_cli(detect.main, opt)
        errors = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ERROR:")]
        assert exit_info.value.code == 1 and len(errors) == 1 and message in errors[0]
