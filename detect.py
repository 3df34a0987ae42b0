"""Run a trained detector on images, folders, globs, video files, webcams or streams and save the results.

Usage:
    python detect.py --weights runs/train/exp/weights/best.pt --source data/images --save-txt
    python detect.py --weights yolov5s.pt --source 'clips/*.mp4' --conf-thres 0.4 --classes 0 2
    python detect.py --weights best.pt --source 0 --view-img        # webcam 0 (also rtsp://, http://, *.streams)
    python detect.py --weights best.pt --source im.jpg --augment --visualize
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # lets the script run from any working directory

from models.backends import DetectMultiBackend, exported_weights  # noqa: E402
from models.experimental import attempt_load  # noqa: E402
from utils.boxes import non_max_suppression, scale_coords, xyxy2xywh  # noqa: E402
from utils.general import (LOGGER, check_img_size, colorstr, default_weights, increment_path, print_args,  # noqa: E402
                           run_cli, set_logging)
from models.yolo import check_augment  # noqa: E402
from utils.plots import Annotator, colors, feature_visualization, save_one_box  # noqa: E402
from utils.sources import LoadImages  # noqa: E402
from utils.streams import LoadStreams, VideoSaver, Viewer, is_stream, stream_name  # noqa: E402
from utils.torch_utils import runs_channels_last, select_device  # noqa: E402


def _clock(device: torch.device) -> float:
    """Wall time after pending CUDA work has finished, so stage timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.time()


def _to_tensor(im: np.ndarray, device: torch.device, half: bool, channels_last: bool = False) -> torch.Tensor:
    """(3, h, w) or (n, 3, h, w) uint8 -> (n, 3, h, w) float in 0..1 on the device (channels_last if asked)."""
    x = torch.from_numpy(im).to(device)
    x = x.half() if half else x.float()
    x = x[None] / 255.0 if x.dim() == 3 else x / 255.0
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _summary(det: torch.Tensor, names) -> str:
    """'2 circles, 1 square, ' style counts per class ('(no detections), ' when empty)."""
    if not len(det):
        return "(no detections), "
    parts = []
    for c in det[:, 5].unique():
        n = int((det[:, 5] == c).sum())
        parts.append(f"{n} {names[int(c)]}{'s' * (n > 1)}, ")
    return "".join(parts)


def _label_lines(det: torch.Tensor, im0_shape, save_conf: bool) -> list:
    """Detections -> 'cls xc yc w h [conf]' lines normalised by the original image size."""
    gain = torch.tensor(im0_shape)[[1, 0, 1, 0]].float()  # w, h, w, h
    lines = []
    for *xyxy, conf, cls in det.tolist():
        xywh = (xyxy2xywh(torch.tensor(xyxy).view(1, 4)) / gain).view(-1).tolist()
        values = (int(cls), *xywh, conf) if save_conf else (int(cls), *xywh)
        lines.append(("%g " * len(values)).rstrip() % values)
    return lines


def _save_outputs(det, im0, path, frame, mode, save_dir, names, opt) -> np.ndarray:
    """Write label txt and crops for one image and return it annotated (BGR)."""
    p = Path(path)
    stem = p.stem if mode == "image" else f"{p.stem}_{frame}"
    if opt["save_txt"] and len(det):
        (save_dir / "labels" / f"{stem}.txt").write_text("\n".join(_label_lines(det, im0.shape[:2],
                                                                                opt["save_conf"])) + "\n")
    annotator = Annotator(im0.copy() if opt["save_crop"] else im0, line_width=opt["line_thickness"])
    for *xyxy, conf, cls in det.tolist():
        c = int(cls)
        label = None if opt["hide_labels"] else (names[c] if opt["hide_conf"] else f"{names[c]} {conf:.2f}")
        annotator.box_label(xyxy, label or "", color=colors(c, bgr=True))
        if opt["save_crop"]:
            crop_file = increment_path(save_dir / "crops" / str(names[c]) / f"{stem}.jpg")
            save_one_box(xyxy, im0, file=crop_file)
    return annotator.result()


@contextlib.contextmanager
def _record_features(model, folder):
    """While active, save each layer's output (except Detect's) once as a feature-map PNG in folder (--visualize).

    Forward hooks are attached on entry and removed on exit; only a layer's first call is kept, so under
    --augment the images are those of the unscaled, unflipped pass."""
    if folder is None:
        yield
        return
    done = set()

    def hook(module, _inputs, output):
        if module.i not in done:
            done.add(module.i)
            feature_visualization(output, module.type, module.i, save_dir=folder)

    handles = [m.register_forward_hook(hook) for m in model.model if "Detect" not in m.type]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _can_visualize(model) -> bool:
    """--visualize needs a single YAML-built model whose layers carry .i and .type; warns otherwise."""
    layers = getattr(model, "model", None)
    if isinstance(layers, torch.nn.Sequential) and all(hasattr(m, "type") for m in layers):
        return True
    LOGGER.warning(f"WARNING: --visualize needs a single PyTorch checkpoint, not a {type(model).__name__}; "
                   f"no feature maps saved")
    return False


def _items(path, im0s, webcam: bool) -> list:
    """(slot, name path, original image, description) for each image of one loader item."""
    if not webcam:
        return [(0, path, im0s, "")]
    return [(i, stream_name(src), im0.copy(), f"{i}: ") for i, (src, im0) in enumerate(zip(path, im0s))]


class _Sink:
    """Where each detected image goes: label txt and crops, the annotated image or video, the display."""

    def __init__(self, save_dir: Path, names, opt: dict, nosave: bool, view_img: bool):
        self.save_dir, self.names, self.opt, self.nosave = save_dir, names, opt, nosave
        self.viewer, self.saver = Viewer(view_img), VideoSaver()

    def emit(self, det, im0, path, slot: int, frame: int, mode: str, fps: float) -> bool:
        """Save and show one image's detections (det in im0's pixels). Returns True when the user asked to stop."""
        annotated = _save_outputs(det, im0, path, frame, mode, self.save_dir, self.names, self.opt)
        stop = self.viewer.show(str(path), annotated)
        if not self.nosave:
            save_path = str(self.save_dir / Path(path).name)
            if mode == "image":
                cv2.imwrite(save_path, annotated)
            else:
                self.saver.write(slot, save_path, annotated, fps)
        return stop

    def close(self) -> None:
        self.saver.close()
        self.viewer.close()


def _load_model(weights, device, half: bool):
    """A .pt checkpoint (or several, as an ensemble) as a fused eval model; an exported .torchscript/.onnx file
    through models.backends, which keeps the precision it was exported in."""
    if isinstance(weights, (list, tuple)) and len(weights) == 1:
        weights = weights[0]  # argparse nargs='+' always gives a list; one checkpoint is not an ensemble
    exported = exported_weights(weights)
    if exported is not None:
        return DetectMultiBackend(exported, device)
    model = attempt_load(weights, map_location=device)
    model = model.half() if half else model.float()
    if device.type == "cpu":  # the layout the CPU's convolutions are fastest in, as in training (bench/layout.py)
        model = model.to(memory_format=torch.channels_last)
    return model


@torch.no_grad()
def run(weights="yolov5s.pt", source="data/images", data=None, imgsz=(640, 640), conf_thres=0.25, iou_thres=0.45,
        max_det=1000, device="", view_img=False, save_txt=False, save_conf=False, save_crop=False, nosave=False,
        classes=None, agnostic_nms=False, augment=False, visualize=False, project="runs/detect", name="exp",
        exist_ok=False, line_thickness=3, hide_labels=False, hide_conf=False, half=False) -> Path:
    """Detect objects in every image / video frame / stream frame of ``source`` and save the results.

    A webcam index ('0'), a stream URL or a .streams file is read live (utils.streams.LoadStreams) until it
    ends or 'q' is pressed in a --view-img window. --visualize saves feature maps of every layer per image
    under <save_dir>/<image stem>/.

    Returns:
        The run folder (project/name[N]) holding annotated images/videos, labels/ and crops/.
    """
    save_dir = increment_path(Path(project) / name, exist_ok=exist_ok)
    (save_dir / "labels" if save_txt else save_dir).mkdir(parents=True, exist_ok=True)
    device = select_device(device)
    half = half and device.type != "cpu"  # fp16 is only a speed-up on CUDA
    model = _load_model(weights, device, half)
    channels_last = runs_channels_last(model)  # False for exported backends
    stride, names = int(model.stride.max()), model.names
    imgsz = [imgsz, imgsz] if isinstance(imgsz, int) else list(imgsz) * (2 // len(imgsz))  # (h, w)
    imgsz = check_img_size(imgsz, stride=stride)
    webcam = is_stream(source)
    dataset = (LoadStreams if webcam else LoadImages)(source, img_size=imgsz, stride=stride, auto=True)
    augment = augment and check_augment(model)
    visualize = visualize and _can_visualize(model)
    sink = _Sink(save_dir, names, dict(save_txt=save_txt, save_conf=save_conf, save_crop=save_crop,
                                       line_thickness=line_thickness, hide_labels=hide_labels,
                                       hide_conf=hide_conf), nosave, view_img)
    times, seen, shape = np.zeros(3), 0, None
    try:
        for path, im, im0s, cap, s in dataset:
            t0 = _clock(device)
            x = _to_tensor(im, device, half, channels_last)
            t1 = _clock(device)
            stem = stream_name(path[0]) if webcam else Path(path).stem
            with _record_features(model, increment_path(save_dir / stem, mkdir=True) if visualize else None):
                pred = (model(x, augment=True) if augment else model(x))[0]
            t2 = _clock(device)
            dets = non_max_suppression(pred, conf_thres, iou_thres, classes, agnostic_nms, max_det=max_det)
            t3 = _clock(device)
            times, seen, shape = times + (t1 - t0, t2 - t1, t3 - t2), seen + len(dets), tuple(x.shape)
            stop = False
            for (slot, p, im0, prefix), det in zip(_items(path, im0s, webcam), dets):
                det[:, :4] = scale_coords(x.shape[2:], det[:, :4], im0.shape).round()
                LOGGER.info(f"{s}{prefix}{x.shape[2]}x{x.shape[3]} {_summary(det, names)}Done. ({t3 - t1:.3f}s)")
                fps = dataset.fps[slot] if webcam else (cap.get(cv2.CAP_PROP_FPS) if cap is not None else 0)
                stop |= sink.emit(det, im0, p, slot, dataset.frame, dataset.mode, fps)
            if stop:
                break
    finally:
        sink.close()
        if webcam:
            dataset.close()
    _report(times, seen, shape, save_dir, save_txt, nosave)
    return save_dir


def _report(times, seen: int, shape, save_dir: Path, save_txt: bool, nosave: bool) -> None:
    """Final speed line and where the results went."""
    if seen:
        pre, inf, nms = (times / seen * 1e3).tolist()
        LOGGER.info(f"Speed: {pre:.1f}ms pre-process, {inf:.1f}ms inference, {nms:.1f}ms NMS per image "
                    f"at shape {shape}")
    if save_txt or not nosave:
        n = len(list((save_dir / "labels").glob("*.txt"))) if save_txt else 0
        extra = f"\n{n} labels saved to {save_dir / 'labels'}" if save_txt else ""
        LOGGER.info(f"Results saved to {colorstr('bold', save_dir)}{extra}")


def parse_opt(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="YOLOv5 inference on images, folders, globs, videos and streams")
    parser.add_argument("--weights", nargs="+", type=str, default=[],
                        help="model checkpoint(s); default: the newest runs/**/weights/best.pt")
    parser.add_argument("--source", type=str, default="",
                        help="file, folder, glob, webcam index (0), URL or .streams list; default: the bundled "
                             "shapes val images")
    parser.add_argument("--data", type=str, default=None, help="dataset.yaml (accepted for CLI parity, unused)")
    parser.add_argument("--imgsz", "--img", "--img-size", nargs="+", type=int, default=[640], help="inference h w")
    parser.add_argument("--conf-thres", type=float, default=0.25, help="confidence threshold")
    parser.add_argument("--iou-thres", type=float, default=0.45, help="NMS IoU threshold")
    parser.add_argument("--max-det", type=int, default=1000, help="maximum detections per image")
    parser.add_argument("--device", default="", help="cuda device, i.e. 0 or 0,1,2,3 or cpu")
    parser.add_argument("--view-img", action="store_true", help="show results (warns once without a display)")
    parser.add_argument("--save-txt", action="store_true", help="save results to labels/*.txt")
    parser.add_argument("--save-conf", action="store_true", help="append confidences to --save-txt labels")
    parser.add_argument("--save-crop", action="store_true", help="save cropped boxes under crops/<class>/")
    parser.add_argument("--nosave", action="store_true", help="do not save annotated images/videos")
    parser.add_argument("--classes", nargs="+", type=int, help="keep only these class ids: --classes 0 2")
    parser.add_argument("--agnostic-nms", action="store_true", help="class-agnostic NMS")
    parser.add_argument("--augment", action="store_true", help="test-time augmentation (3 scales, left-right flip)")
    parser.add_argument("--visualize", action="store_true", help="save feature maps of every layer per image")
    parser.add_argument("--project", default=str(ROOT / "runs/detect"), help="save results to project/name")
    parser.add_argument("--name", default="exp", help="save results to project/name")
    parser.add_argument("--exist-ok", action="store_true", help="reuse an existing project/name")
    parser.add_argument("--line-thickness", default=3, type=int, help="bounding box thickness (pixels)")
    parser.add_argument("--hide-labels", action="store_true", help="draw boxes without labels")
    parser.add_argument("--hide-conf", action="store_true", help="draw labels without confidences")
    parser.add_argument("--half", action="store_true", help="FP16 inference (CUDA only)")
    opt = parser.parse_args(argv)
    opt.imgsz = opt.imgsz * 2 if len(opt.imgsz) == 1 else opt.imgsz
    return opt


def main(opt: argparse.Namespace) -> Path:
    opt.weights = default_weights(opt.weights, ROOT / "runs")
    if not opt.source:
        from utils.datasets import check_dataset

        opt.source = str(Path(check_dataset(str(ROOT / "data/shapes.yaml"))["val"]))  # generated on first use
        LOGGER.info(f"no --source given: detecting on the bundled shapes val images {opt.source}")
    if any(s <= 0 for s in opt.imgsz):
        raise ValueError(f"--imgsz {' '.join(map(str, opt.imgsz))}: pass positive sizes such as 640")
    print_args("detect", vars(opt))
    return run(**vars(opt))


if __name__ == "__main__":
    set_logging()
    run_cli(main, parse_opt())
