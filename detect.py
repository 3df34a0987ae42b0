"""Run a trained detector on images, folders, globs or video files and save the annotated results.

Usage:
    python detect.py --weights runs/train/exp/weights/best.pt --source data/images --save-txt
    python detect.py --weights yolov5s.pt --source 'clips/*.mp4' --conf-thres 0.4 --classes 0 2
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # lets the script run from any working directory

from models.experimental import attempt_load  # noqa: E402
from utils.boxes import non_max_suppression, scale_coords, xyxy2xywh  # noqa: E402
from utils.general import (LOGGER, check_img_size, colorstr, default_weights, increment_path, print_args,  # noqa: E402
                           run_cli, set_logging)
from utils.plots import Annotator, colors, save_one_box  # noqa: E402
from utils.sources import LoadImages  # noqa: E402
from utils.torch_utils import select_device  # noqa: E402


def _clock(device: torch.device) -> float:
    """Wall time after pending CUDA work has finished, so stage timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.time()


def _to_tensor(im: np.ndarray, device: torch.device, half: bool) -> torch.Tensor:
    """(3, h, w) uint8 -> (1, 3, h, w) float in 0..1 on the device."""
    x = torch.from_numpy(im).to(device)
    x = x.half() if half else x.float()
    return (x / 255.0).unsqueeze(0)


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


class VideoSaver:
    """Keeps one cv2.VideoWriter per output video, opening a new one when the source video changes."""

    def __init__(self):
        self.path, self.writer = None, None

    def write(self, save_path: str, frame: np.ndarray, cap) -> None:
        if save_path != self.path:
            self.close()
            fps = cap.get(cv2.CAP_PROP_FPS) if cap is not None else 0
            h, w = frame.shape[:2]
            self.path = save_path
            self.writer = cv2.VideoWriter(str(Path(save_path).with_suffix(".mp4")), cv2.VideoWriter_fourcc(*"mp4v"),
                                          fps if fps and fps > 0 else 30, (w, h))
        self.writer.write(frame)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()
        self.path, self.writer = None, None


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


def _check_source(source) -> None:
    """Streams and webcams need a display-less reader we do not ship; say so instead of failing obscurely."""
    text = str(source).lower()
    if text.isnumeric() or text.startswith(("rtsp://", "rtmp://", "http://", "https://")) or text.endswith(".streams"):
        raise ValueError(f"--source {source}: webcams, URLs and streams are not supported; "
                         f"pass an image, a video file, a folder or a glob")


@torch.no_grad()
def run(weights="yolov5s.pt", source="data/images", data=None, imgsz=(640, 640), conf_thres=0.25, iou_thres=0.45,
        max_det=1000, device="", view_img=False, save_txt=False, save_conf=False, save_crop=False, nosave=False,
        classes=None, agnostic_nms=False, augment=False, project="runs/detect", name="exp", exist_ok=False,
        line_thickness=3, hide_labels=False, hide_conf=False, half=False) -> Path:
    """Detect objects in every image / video frame of ``source`` and save the results.

    Returns:
        The run folder (project/name[N]) holding annotated images/videos, labels/ and crops/.
    """
    _check_source(source)
    if augment or view_img:
        LOGGER.warning("WARNING: --augment and --view-img are not supported here and are ignored")
    save_dir = increment_path(Path(project) / name, exist_ok=exist_ok)
    (save_dir / "labels" if save_txt else save_dir).mkdir(parents=True, exist_ok=True)

    device = select_device(device)
    half = half and device.type != "cpu"  # fp16 is only a speed-up on CUDA
    if isinstance(weights, (list, tuple)) and len(weights) == 1:
        weights = weights[0]  # argparse nargs='+' always gives a list; one checkpoint is not an ensemble
    model = attempt_load(weights, map_location=device)
    model = model.half() if half else model.float()
    stride, names = int(model.stride.max()), model.names
    imgsz = [imgsz, imgsz] if isinstance(imgsz, int) else list(imgsz) * (2 // len(imgsz))  # (h, w)
    imgsz = check_img_size(imgsz, stride=stride)
    dataset = LoadImages(source, img_size=imgsz, stride=stride, auto=True)
    opt = dict(save_txt=save_txt, save_conf=save_conf, save_crop=save_crop, line_thickness=line_thickness,
               hide_labels=hide_labels, hide_conf=hide_conf)

    times, seen, saver, shape = np.zeros(3), 0, VideoSaver(), None
    for path, im, im0, cap, s in dataset:
        t0 = _clock(device)
        x = _to_tensor(im, device, half)
        t1 = _clock(device)
        pred = model(x)[0]
        t2 = _clock(device)
        det = non_max_suppression(pred, conf_thres, iou_thres, classes, agnostic_nms, max_det=max_det)[0]
        t3 = _clock(device)
        times += (t1 - t0, t2 - t1, t3 - t2)
        seen, shape = seen + 1, tuple(x.shape)
        det[:, :4] = scale_coords(x.shape[2:], det[:, :4], im0.shape).round()
        annotated = _save_outputs(det, im0, path, dataset.frame, dataset.mode, save_dir, names, opt)
        LOGGER.info(f"{s}{x.shape[2]}x{x.shape[3]} {_summary(det, names)}Done. ({t3 - t1:.3f}s)")
        if not nosave:
            save_path = str(save_dir / Path(path).name)
            if dataset.mode == "image":
                cv2.imwrite(save_path, annotated)
            else:
                saver.write(save_path, annotated, cap)
    saver.close()
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
    parser = argparse.ArgumentParser(description="YOLOv5 inference on images, folders, globs and videos")
    parser.add_argument("--weights", nargs="+", type=str, default=[],
                        help="model checkpoint(s); default: the newest runs/**/weights/best.pt")
    parser.add_argument("--source", type=str, default="",
                        help="file, folder or glob; default: the bundled shapes val images")
    parser.add_argument("--data", type=str, default=None, help="dataset.yaml (accepted for CLI parity, unused)")
    parser.add_argument("--imgsz", "--img", "--img-size", nargs="+", type=int, default=[640], help="inference h w")
    parser.add_argument("--conf-thres", type=float, default=0.25, help="confidence threshold")
    parser.add_argument("--iou-thres", type=float, default=0.45, help="NMS IoU threshold")
    parser.add_argument("--max-det", type=int, default=1000, help="maximum detections per image")
    parser.add_argument("--device", default="", help="cuda device, i.e. 0 or 0,1,2,3 or cpu")
    parser.add_argument("--view-img", action="store_true", help="show results (no-op without a display)")
    parser.add_argument("--save-txt", action="store_true", help="save results to labels/*.txt")
    parser.add_argument("--save-conf", action="store_true", help="append confidences to --save-txt labels")
    parser.add_argument("--save-crop", action="store_true", help="save cropped boxes under crops/<class>/")
    parser.add_argument("--nosave", action="store_true", help="do not save annotated images/videos")
    parser.add_argument("--classes", nargs="+", type=int, help="keep only these class ids: --classes 0 2")
    parser.add_argument("--agnostic-nms", action="store_true", help="class-agnostic NMS")
    parser.add_argument("--augment", action="store_true", help="test-time augmentation (not supported, ignored)")
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
