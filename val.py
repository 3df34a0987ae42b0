"""Validate a YOLOv5 detector on a dataset split: P, R, mAP@.5, mAP@.5:.95, speed, plots and saved predictions.

Usage:
    python val.py --data data/shapes.yaml --weights runs/train/exp/weights/best.pt --img 640
    python val.py --data data/shapes.yaml --weights best.pt --task speed     # timing only (conf 0.25, IoU 0.45)
    python val.py --data data/shapes.yaml --weights a.pt b.pt --task study  # mAP and speed at 256..1536 px
    python val.py --data data/shapes.yaml --weights best.pt --augment       # test-time augmentation

From training, ``run(data, model=ema, dataloader=val_loader, save_dir=..., compute_loss=...)`` reuses what the
trainer built and also returns the validation losses.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # run as a script from elsewhere: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
from tqdm import tqdm

from utils.boxes import box_iou, non_max_suppression, scale_coords, xywh2xyxy, xyxy2xywh, xyxy2xywhn
from utils.general import (LOGGER, ROOT, check_img_size, colorstr, default_weights, increment_path, print_args,
                           run_cli, set_logging)
from utils.metrics import ConfusionMatrix, ap_per_class
from utils.torch_utils import runs_channels_last, select_device, select_precision, tune_cpu_allocator

HEADER = ("%20s" + "%11s" * 6) % ("Class", "Images", "Labels", "P", "R", "mAP@.5", "mAP@.5:.95")
ROW = "%20s" + "%11i" * 2 + "%11.3g" * 4
COCO_MISSING_IDS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}  # ids of the 91-id COCO list left out of the 80 used


def coco80_to_coco91_class():
    """Category ids (1..90) of the 80 COCO training classes, for COCO-format JSON output."""
    return [i for i in range(1, 91) if i not in COCO_MISSING_IDS]


def process_batch(detections, labels, iouv):
    """Mark each detection correct or not at every IoU threshold, with YOLOv5 v6.0's matching.

    Pairs are (label, detection) of the same class with IoU >= the lowest threshold. Each detection keeps its
    highest-IoU label, then each label keeps the first remaining detection (NMS output is sorted by falling
    confidence, so that is the most confident one). A matched detection is correct at every threshold its IoU
    reaches. Matching once, at the lowest threshold, is what v6.0 does and what its published mAPs use.

    Args:
        detections: (n, 6) [x1, y1, x2, y2, conf, cls], sorted by falling conf.
        labels: (m, 5) [cls, x1, y1, x2, y2] in the same pixel frame.
        iouv: (t,) IoU thresholds, e.g. 0.5:0.95.

    Returns:
        (n, t) bool tensor on iouv's device.
    """
    correct = np.zeros((detections.shape[0], iouv.shape[0]), dtype=bool)
    iou = box_iou(labels[:, 1:5], detections[:, :4])  # (m, n)
    li, di = torch.where((iou >= iouv[0]) & (labels[:, 0:1] == detections[:, 5]))
    if len(li):
        pairs = np.stack((li.cpu().numpy(), di.cpu().numpy(), iou[li, di].cpu().numpy()), 1)  # [label, det, iou]
        pairs = pairs[pairs[:, 2].argsort(kind="stable")[::-1]]
        pairs = pairs[np.unique(pairs[:, 1], return_index=True)[1]]  # one label per detection; sorted by detection
        pairs = pairs[np.unique(pairs[:, 0], return_index=True)[1]]  # one detection per label: the first one
        correct[pairs[:, 1].astype(int)] = pairs[:, 2:3] >= iouv.cpu().numpy()
    return torch.from_numpy(correct).to(iouv.device)


def output_to_target(output):
    """NMS output (list of (n, 6) xyxy) -> (N, 7) [img_idx, cls, xc, yc, w, h, conf] for plot_images."""
    rows = []
    for i, det in enumerate(output):
        det = det.detach().float().cpu()
        idx = torch.full((len(det), 1), float(i))
        rows.append(torch.cat((idx, det[:, 5:6], xyxy2xywh(det[:, :4]), det[:, 4:5]), 1))
    return torch.cat(rows, 0) if rows else torch.zeros((0, 7))


def _clock(device):
    """Wall time after the device has finished its queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.time()


def _plot_images_fn():
    """utils.plots.plot_images, or None with a warning when it cannot be imported."""
    try:
        from utils.plots import plot_images
    except ImportError as e:
        LOGGER.warning(f"WARNING: batch plots skipped, utils.plots.plot_images unavailable ({e})")
        return None
    return plot_images


def _load_model(weights, device, half, data, single_cls):
    """Standalone: the checkpoint as an eval-mode fused model (an exported .torchscript/.onnx file through
    models.backends), checked against the dataset's class count."""
    from models.backends import DetectMultiBackend, exported_weights
    from models.experimental import attempt_load

    if weights is None:
        raise ValueError("val.run needs weights=path/to/best.pt (or model=... when called from training)")
    exported = exported_weights(weights)
    model = DetectMultiBackend(exported, device) if exported else attempt_load(weights, map_location=device)
    if not single_cls and int(model.nc) != int(data["nc"]):
        raise ValueError(f"weights {weights} predict {model.nc} classes but the dataset has {data['nc']}; "
                         f"pass the matching --data, or --single-cls to score every class as one")
    return model.half() if half else model


def _prepare(data, weights, model, dataloader, device, half, imgsz, batch_size, task, single_cls, workers,
             project, name, exist_ok, save_txt, save_dir):
    """Resolve model, device, data and loader. Returns (model, device, half, data, dataloader, save_dir, training)."""
    from utils.datasets import check_dataset, create_dataloader

    training = model is not None
    if dataloader is None or not isinstance(data, dict) or "nc" not in data:
        data = check_dataset(data)
    if training:
        device = next(model.parameters()).device
        half, cpu_bf16 = _reduced_precision(half, device)
        model = model.half() if half else model.float()
    else:
        device = select_device(device, batch_size)
        half, cpu_bf16 = _reduced_precision(half, device)
        tune_cpu_allocator(device)
        save_dir = increment_path(Path(project) / name, exist_ok=exist_ok)
        model = _load_model(weights, device, half, data, single_cls)
        if device.type == "cpu":  # the layout the CPU's convolutions are fastest in (bf16 and float32), as in training
            model = model.to(memory_format=torch.channels_last)
    if dataloader is None:
        gs = max(int(model.stride.max()), 32)
        imgsz, rect = _loader_shape(model, imgsz, gs)
        split = task if task in ("train", "val", "test") else "val"
        if not data.get(split):
            raise ValueError(f"dataset has no '{split}' split; add '{split}:' to the dataset YAML or pick --task")
        nc = 1 if single_cls else int(data["nc"])
        dataloader = create_dataloader(data[split], imgsz, batch_size, gs, single_cls, pad=0.0 if task == "speed"
                                       else 0.5, rect=rect, workers=workers, prefix=colorstr(f"{split}: "),
                                       nc=nc)[0]
    save_dir = Path(save_dir)
    (save_dir / "labels" if save_txt else save_dir).mkdir(parents=True, exist_ok=True)
    return model, device, (half, cpu_bf16), data, dataloader, save_dir, training


def _loader_shape(model, imgsz: int, gs: int) -> tuple:
    """(imgsz, rect) of the val loader: rectangular batches, or for an exported file that takes one input size
    (models.backends fixed_shape) square images of that size, as YOLOv5 validates such files."""
    shape = getattr(model, "fixed_shape", None)
    if not shape:
        return check_img_size(imgsz, gs), True
    h, w = shape[2:]
    if h != w:
        raise ValueError(f"the exported model takes {h}x{w} images but val.py scores square ones: re-export it "
                         f"with --imgsz {max(h, w)}, or with --dynamic")
    if imgsz != h:
        LOGGER.info(f"the exported model takes {h}x{w} images: validating at --imgsz {h}")
    return h, False


def _reduced_precision(half: bool, device: torch.device) -> tuple:
    """(fp16 model on CUDA, bf16 autocast on CPU) for a request of reduced precision: the engine's automatic
    choice (utils.torch_utils.select_precision), applied as YOLOv5 does on CUDA (a half model, not autocast)."""
    dtype = select_precision(device, None if half else False).dtype
    return dtype == torch.float16, dtype == torch.bfloat16


def _score_image(pred, labels, im_shape, shape, ratio_pad, iouv, single_cls, confusion_matrix):
    """Rescale one image's detections and labels to the original image and match them.

    Args:
        pred: (n, 6) NMS output in input pixels. labels: (m, 5) [cls, xc, yc, w, h] input pixels.
        im_shape: (h, w) of the network input. shape: (h0, w0). ratio_pad: ((gh, gw), (padw, padh)).

    Returns:
        (stat tuple (correct (n, t), conf (n,), cls (n,), tcls (m,)) as numpy, predn (n, 6) original pixels).
    """
    if single_cls:
        pred[:, 5] = 0
    predn = pred.clone()
    scale_coords(im_shape, predn[:, :4], shape, ratio_pad)
    tbox = scale_coords(im_shape, xywh2xyxy(labels[:, 1:5]), shape, ratio_pad)
    labelsn = torch.cat((labels[:, 0:1], tbox), 1)  # (m, 5) [cls, x1, y1, x2, y2] original pixels
    if len(labels):
        correct = process_batch(predn, labelsn, iouv)
    else:
        correct = torch.zeros((len(pred), len(iouv)), dtype=torch.bool)
    if confusion_matrix is not None:
        confusion_matrix.process_batch(predn, labelsn)
    stat = (correct.cpu().numpy(), pred[:, 4].float().cpu().numpy(), pred[:, 5].float().cpu().numpy(),
            labels[:, 0].float().cpu().numpy())
    return stat, predn


def _save_txt(predn, shape, file, save_conf):
    """Append detections as 'cls xc yc w h [conf]' normalised to the original (h0, w0) image."""
    xywhn = xyxy2xywhn(predn[:, :4], w=shape[1], h=shape[0])
    with open(file, "a") as f:
        for (c, conf), box in zip(predn[:, [5, 4]].tolist(), xywhn.tolist()):
            values = [int(c), *box, conf] if save_conf else [int(c), *box]
            f.write(" ".join(f"{v:g}" for v in values) + "\n")


def _json_rows(predn, path, class_map):
    """COCO result rows {image_id, category_id, bbox [x, y, w, h] original pixels, score} of one image."""
    stem = Path(path).stem
    image_id = int(stem) if stem.isnumeric() else stem
    box = xyxy2xywh(predn[:, :4])
    box[:, :2] -= box[:, 2:] / 2  # centre -> top-left corner
    return [{"image_id": image_id, "category_id": class_map[int(p[5])], "bbox": [round(x, 3) for x in b],
             "score": round(p[4], 5)} for p, b in zip(predn.tolist(), box.tolist())]


def _plot_batch(plot_images, im, targets, out, paths, save_dir, batch_i, names):
    try:
        plot_images(im, targets, paths, save_dir / f"val_batch{batch_i}_labels.jpg", names)
        plot_images(im, output_to_target(out), paths, save_dir / f"val_batch{batch_i}_pred.jpg", names)
    except Exception as e:  # a plotting failure must never cost a validation result
        LOGGER.warning(f"WARNING: val batch plot {batch_i} failed: {e}")


def _metrics(stats, nc, plots, save_dir, names):
    """(mp, mr, map50, map, per-class rows, maps-by-class, label counts) from the accumulated stats."""
    stats = [np.concatenate(x, 0) for x in zip(*stats)] if stats else []
    nt = np.bincount(stats[3].astype(np.int64), minlength=nc) if stats else np.zeros(nc, dtype=np.int64)
    if not stats or not stats[0].any():
        return (0.0, 0.0, 0.0, 0.0), [], {}, nt
    p, r, ap, f1, ap_class = ap_per_class(*stats, plot=plots, save_dir=save_dir, names=names)
    ap50, ap = ap[:, 0], ap.mean(1)  # mAP@.5 and mAP@.5:.95 per class
    rows = [(int(c), p[i], r[i], ap50[i], ap[i]) for i, c in enumerate(ap_class)]
    return (p.mean(), r.mean(), ap50.mean(), ap.mean()), rows, {int(c): ap[i] for i, c in enumerate(ap_class)}, nt


def _report(seen, nt, means, rows, names, nc, verbose, training, dt, shape):
    LOGGER.info(ROW % ("all", seen, nt.sum(), *means))
    if (verbose or (nc < 50 and not training)) and nc > 1:
        for c, *values in rows:
            LOGGER.info(ROW % (names.get(c, str(c)), seen, nt[c], *values))
    speeds = tuple(x / max(seen, 1) * 1e3 for x in dt)  # ms per image
    if not training:
        LOGGER.info("Speed: %.1fms pre-process, %.1fms inference, %.1fms NMS per image at shape " % speeds
                    + str(shape))
    return speeds


def _loop(model, dataloader, device, half, compute_loss, nms_kwargs, single_cls, save_hybrid, plots,
          confusion_matrix, save, names, save_dir, augment=False):
    """Run the model over the loader. Returns (stats, seen, loss (3,), dt [pre, inference, nms] seconds, jdict).

    half is (fp16 model, bf16 autocast on CPU), from _reduced_precision; augment asks the model for test-time
    augmentation."""
    half, cpu_bf16 = half
    channels_last = runs_channels_last(model)  # False for an exported model, which takes its own layout
    iouv = torch.linspace(0.5, 0.95, 10, device=device)
    plot_images = _plot_images_fn() if plots else None
    stats, jdict, seen, dt = [], [], 0, [0.0, 0.0, 0.0]
    loss = torch.zeros(3, device=device)
    for batch_i, (im, targets, paths, shapes) in enumerate(tqdm(dataloader, desc=HEADER)):
        t0 = _clock(device)
        im = im.to(device, non_blocking=True)
        im = (im.half() if half else im.float()) / 255
        if channels_last:
            im = im.contiguous(memory_format=torch.channels_last)
        targets = targets.to(device)
        nb, _, height, width = im.shape
        t1 = _clock(device)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_bf16):
            out, train_out = model(im, augment=True) if augment else model(im)
        t2 = _clock(device)
        if compute_loss is not None:
            loss += compute_loss([x.float() for x in train_out], targets)[1]
        targets[:, 2:] *= torch.tensor((width, height, width, height), device=device)  # to input pixels
        per_image = [targets[targets[:, 0] == i, 1:] for i in range(nb)]
        out = non_max_suppression(out, **nms_kwargs, labels=per_image if save_hybrid else (), agnostic=single_cls)
        dt = [dt[0] + t1 - t0, dt[1] + t2 - t1, dt[2] + _clock(device) - t2]
        for si, pred in enumerate(out):
            seen += 1
            if not len(pred) and not len(per_image[si]):
                continue
            stat, predn = _score_image(pred, per_image[si], im.shape[2:], shapes[si][0], shapes[si][1], iouv,
                                       single_cls, confusion_matrix)
            stats.append(stat)
            if len(predn):
                save(predn, paths[si], shapes[si][0], jdict)
        if plot_images is not None and batch_i < 3:
            _plot_batch(plot_images, im, targets, out, paths, save_dir, batch_i, names)
    return stats, seen, loss, dt, jdict


def _saver(save_txt, save_conf, save_json, save_dir, is_coco):
    """Per-image callback writing labels/*.txt and collecting COCO JSON rows, as requested."""
    class_map = coco80_to_coco91_class() if is_coco else list(range(1000))

    def save(predn, path, shape, jdict):
        if save_txt:
            _save_txt(predn, shape, save_dir / "labels" / f"{Path(path).stem}.txt", save_conf)
        if save_json:
            jdict.extend(_json_rows(predn, path, class_map))
    return save


@torch.no_grad()
def run(data, weights=None, batch_size=32, imgsz=640, conf_thres=0.001, iou_thres=0.6, task="val", device="",
        workers=8, single_cls=False, augment=False, verbose=False, save_txt=False, save_hybrid=False,
        save_conf=False, save_json=False, project="runs/val", name="exp", exist_ok=False, half=True,
        model=None, dataloader=None, save_dir=Path(""), plots=True, compute_loss=None):
    """Validate a detector.

    Standalone (model=None): loads ``weights``, builds a rectangular val loader and writes into
    runs/val/exp{N}. From training (model given): uses the model's device, the given dataloader and save_dir,
    reloads nothing, and returns validation losses when compute_loss is given. ``augment`` (standalone only)
    runs YOLOv5 v6.0's test-time augmentation (models.yolo.Model._forward_augment).

    Returns:
        ((mp, mr, map50, map, box_loss, obj_loss, cls_loss), maps (nc,) mAP@.5:.95 per class (mean for classes
        without labels), (pre-process, inference, NMS) ms per image).
    """
    if task == "speed":  # timing only: YOLOv5's deployment thresholds, nothing written
        conf_thres, iou_thres, plots, save_json, save_txt = 0.25, 0.45, False, False, False
    model, device, half, data, dataloader, save_dir, training = _prepare(
        data, weights, model, dataloader, device, half, imgsz, batch_size, task, single_cls, workers, project,
        name, exist_ok, save_txt or save_hybrid, save_dir)
    augment = augment and not training and _check_augment(model)
    was_training = model.training
    model.eval()
    nc = 1 if single_cls else int(data["nc"])
    raw_names = getattr(model, "names", None) or data["names"]
    names = dict(raw_names) if isinstance(raw_names, dict) else dict(enumerate(raw_names))
    is_coco = isinstance(data.get("val"), str) and data["val"].replace("\\", "/").endswith("coco/val2017.txt")
    confusion_matrix = ConfusionMatrix(nc=nc) if plots else None
    save = _saver(save_txt or save_hybrid, save_conf, save_json, save_dir, is_coco)
    nms_kwargs = dict(conf_thres=conf_thres, iou_thres=iou_thres, multi_label=True, max_det=300)
    try:
        stats, seen, loss, dt, jdict = _loop(model, dataloader, device, half, compute_loss, nms_kwargs, single_cls,
                                             save_hybrid, plots, confusion_matrix, save, names, save_dir, augment)
    finally:
        model.float()  # the trainer keeps using this model (EMA) in fp32
        model.train(was_training)
    means, rows, ap_by_class, nt = _metrics(stats, nc, plots, save_dir, names)
    if not nt.sum():
        LOGGER.warning(f"WARNING: no labels found in the {task} set, metrics cannot be computed without labels")
    speeds = _report(seen, nt, means, rows, names, nc, verbose, training, dt, (batch_size, 3, imgsz, imgsz))
    if plots:
        confusion_matrix.plot(save_dir=save_dir, names=list(names.values()))
    if save_json and jdict:
        _write_json(jdict, weights, save_dir)
    if not training and (save_txt or save_hybrid):
        n = len(list((save_dir / "labels").glob("*.txt")))
        LOGGER.info(f"{n} label files saved to {save_dir / 'labels'}")
    if not training:
        LOGGER.info(f"Results saved to {colorstr('bold', save_dir)}")
    maps = np.full(nc, means[3])
    for c, v in ap_by_class.items():
        maps[c] = v
    val_losses = (loss.cpu() / max(len(dataloader), 1)).tolist()
    return (*(float(m) for m in means), *val_losses), maps, speeds


def _check_augment(model) -> bool:
    from models.yolo import check_augment

    return check_augment(model)


def _write_json(jdict, weights, save_dir):
    w = Path(weights[0] if isinstance(weights, (list, tuple)) else weights).stem if weights is not None else ""
    file = save_dir / f"{w}_predictions.json"
    with open(file, "w") as f:
        json.dump(jdict, f)
    LOGGER.info(f"Saved {len(jdict)} COCO-format predictions to {file} (score it with pycocotools if installed)")


STUDY_SIZES = tuple(range(256, 1536 + 128, 128))  # YOLOv5 v6.0's --task study image sizes


def study(data, weights, sizes=STUDY_SIZES, project="runs/val", name="study", exist_ok=False, imgsz=None,
          **kwargs) -> Path:
    """Validate each weight at every image size (mAP vs size and speed, YOLOv5 v6.0's --task study).

    Writes study_<data>_<weight>.txt per weight, one row per size with v6.0's 10 columns: P, R, mAP@.5,
    mAP@.5:.95, box/obj/cls loss (0 standalone), pre-process/inference/NMS ms per image; and study.png.

    Args:
        data: dataset YAML path. weights: checkpoint paths, each studied alone.
        sizes: image sizes (v6.0: 256..1536 step 128); imgsz is ignored, as in v6.0.
        kwargs: further run() arguments.

    Returns:
        The folder holding the txt files and the plot (project/name[N]).
    """
    from utils.plots import plot_val_study

    save_dir = increment_path(Path(project) / name, exist_ok=exist_ok, mkdir=True)
    data_stem = Path(data).stem if isinstance(data, (str, Path)) else "data"
    files = []
    for w in weights:
        rows = []
        for size in sizes:
            LOGGER.info(f"study: {Path(w).name} at {size} px")
            results, _, speeds = run(data, weights=w, imgsz=size, task="study", plots=False,
                                     project=save_dir.parent, name=save_dir.name, exist_ok=True, **kwargs)
            rows.append([*results, *speeds])
        files.append(save_dir / f"study_{data_stem}_{Path(w).stem}.txt")
        np.savetxt(files[-1], rows, fmt="%10.4g")
    plot_val_study(files, sizes, save_dir / "study.png")
    LOGGER.info(f"Study results saved to {colorstr('bold', save_dir)}")
    return save_dir


def speed(data, weights, **kwargs) -> list:
    """Time each weight on its own, not as an ensemble (--task speed: conf 0.25, IoU 0.45, nothing saved).

    Returns:
        [(weight, pre-process ms, inference ms, NMS ms)] per image, one row per weight, also logged as a table.
    """
    rows = []
    for w in weights:
        _, _, times = run(data, weights=w, task="speed", **kwargs)
        rows.append((str(w), *times))
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"{'weights':<{width}}{'pre-process':>12}{'inference':>12}{'NMS':>12}   (ms per image)"]
    lines += [f"{w:<{width}}{pre:>12.2f}{inference:>12.2f}{nms:>12.2f}" for w, pre, inference, nms in rows]
    LOGGER.info("\n".join(lines))
    return rows


def parse_opt(argv=None):
    p = argparse.ArgumentParser(description="Validate a YOLOv5 detector on a dataset split")
    p.add_argument("--data", type=str, default=str(ROOT / "data/shapes.yaml"), help="dataset.yaml path")
    p.add_argument("--weights", nargs="+", type=str, default=[],
                   help="model.pt path(s); default: the newest runs/**/weights/best.pt")
    p.add_argument("--batch-size", type=int, default=32, help="batch size")
    p.add_argument("--imgsz", "--img", "--img-size", type=int, default=640, help="inference size (pixels)")
    p.add_argument("--conf-thres", type=float, default=0.001, help="confidence threshold")
    p.add_argument("--iou-thres", type=float, default=0.6, help="NMS IoU threshold")
    p.add_argument("--task", default="val", choices=("train", "val", "test", "speed", "study"),
                   help="split to score; speed: time each weight; study: each weight at 256..1536 px")
    p.add_argument("--device", default="", help="cuda device, i.e. 0 or 0,1,2,3 or cpu")
    p.add_argument("--workers", type=int, default=8, help="max dataloader workers")
    p.add_argument("--single-cls", action="store_true", help="treat as single-class dataset")
    p.add_argument("--augment", action="store_true", help="test-time augmentation (3 scales, left-right flip)")
    p.add_argument("--verbose", action="store_true", help="report mAP by class")
    p.add_argument("--save-txt", action="store_true", help="save results to *.txt")
    p.add_argument("--save-hybrid", action="store_true", help="save label+prediction hybrid results to *.txt")
    p.add_argument("--save-conf", action="store_true", help="save confidences in --save-txt labels")
    p.add_argument("--save-json", action="store_true", help="save a COCO-JSON results file")
    p.add_argument("--project", default=str(ROOT / "runs/val"), help="save to project/name")
    p.add_argument("--name", default="exp", help="save to project/name")
    p.add_argument("--exist-ok", action="store_true", help="existing project/name ok, do not increment")
    p.add_argument("--half", action="store_true", help="reduced precision: FP16 on CUDA, bf16 autocast on CPUs "
                                                        "with native bf16 (float32 on other CPUs)")
    opt = p.parse_args(argv)
    opt.save_txt |= opt.save_hybrid
    print_args("val", vars(opt))
    return opt


def main(opt):
    if opt.task in ("train", "val", "test") and opt.conf_thres > 0.001:
        LOGGER.info(f"WARNING: confidence threshold {opt.conf_thres} > 0.001 gives invalid mAP values")
    opt.weights = default_weights(opt.weights, ROOT / "runs")
    if opt.imgsz <= 0:
        raise ValueError(f"--imgsz {opt.imgsz}: pass a positive image size such as 640")
    if opt.task in ("speed", "study"):
        kwargs = {k: v for k, v in vars(opt).items() if k != "task"}
        return speed(**kwargs) if opt.task == "speed" else study(**kwargs)
    return run(**vars(opt))


if __name__ == "__main__":
    set_logging()
    run_cli(main, parse_opt())
