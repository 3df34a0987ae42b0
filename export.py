"""Export a trained detector to TorchScript, ONNX or YOLOv5's own checkpoint layout, and check every file.

Usage:
    python export.py --weights runs/train/exp/weights/best.pt              # best.torchscript and best.onnx
    python export.py --weights best.pt --include onnx --dynamic --imgsz 640
    python export.py --weights best.pt --include yolov5                    # best_yolov5.pt for YOLOv5's tools

Files are written next to the weights. Each is then loaded the way val.py and detect.py load it
(models.backends.DetectMultiBackend, or the restricted checkpoint loader for the YOLOv5 layout), run on the same
input as the PyTorch model, and the largest output difference is printed. ONNX needs the optional packages of
requirements-export.txt: onnx to write the file, onnxruntime to check and run it.
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
import warnings
from copy import deepcopy
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # lets the script run from any working directory

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from models.backends import (TORCHSCRIPT_CONFIG, DetectMultiBackend, export_metadata, import_optional,  # noqa: E402
                             weights_kind)
from models.experimental import attempt_load  # noqa: E402
from utils.checkpoint import (build_yolov5_checkpoint, load_checkpoint, model_from_checkpoint,  # noqa: E402
                              save_yolov5_checkpoint)
from utils.general import LOGGER, check_img_size, colorstr, default_weights, print_args, run_cli, set_logging  # noqa
from utils.torch_utils import select_device  # noqa: E402

FORMATS = {"torchscript": ".torchscript", "onnx": ".onnx", "yolov5": "_yolov5.pt"}  # --include -> file ending
TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2}  # allowed difference / largest output magnitude


class DecodedOnly(nn.Module):
    """An eval-mode detector's decoded predictions (bs, n, 5 + nc) alone: exported files leave out the raw maps."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)[0]


def _fresh_grids(model: nn.Module) -> None:
    """Drop Detect's cached grids. Detect rebuilds stale grids from the input shape; a trace sees that branch once,
    so with fresh (stale) grids the exported graph computes them for whatever size it is given."""
    detect = model.model[-1]
    detect.grid = [torch.zeros(1, device=detect.anchors.device)] * detect.nl
    detect.anchor_grid = [torch.zeros(1, device=detect.anchors.device)] * detect.nl


def export_torchscript(model: nn.Module, im: torch.Tensor, file: Path) -> Path:
    """Trace model on im and save it with YOLOv5's config.txt metadata (shape, stride, names) plus dynamic=True."""
    _fresh_grids(model)
    meta = {**export_metadata(model, im.shape), "dynamic": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape-to-int notes: the graph stays dynamic
        warnings.simplefilter("ignore", FutureWarning)  # torch calls TorchScript deprecated; YOLOv5 tools use it
        traced = torch.jit.trace(DecodedOnly(model), im, strict=False, check_trace=False)
        torch.jit.save(traced, str(file), _extra_files={TORCHSCRIPT_CONFIG: json.dumps(meta)})
    return file


def export_onnx(model: nn.Module, im: torch.Tensor, file: Path, opset: int, dynamic: bool, simplify: bool) -> Path:
    """torch.onnx.export (the TorchScript-based exporter, which needs no onnxscript) with stride and names as
    JSON metadata_props; input 'images', output 'output', batch and image size dynamic with ``dynamic``."""
    onnx = import_optional("onnx", "--include onnx")
    _fresh_grids(model)
    axes = {"images": {0: "batch", 2: "height", 3: "width"}, "output": {0: "batch", 1: "anchors"}} if dynamic else None
    kwargs = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes and the notice that this exporter is the older one
        torch.onnx.export(DecodedOnly(model), im, str(file), opset_version=opset, input_names=["images"],
                          output_names=["output"], dynamic_axes=axes, do_constant_folding=True, **kwargs)
    proto = onnx.load(str(file))
    onnx.checker.check_model(proto)
    if simplify:
        proto = _simplify(proto)
    for key, value in export_metadata(model, im.shape).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.save(proto, str(file))
    return file


def _simplify(proto):
    """onnxsim's simplified graph when onnxsim is installed and validates it; otherwise proto, with a warning."""
    try:
        import onnxsim
    except ImportError:
        LOGGER.warning("WARNING: --simplify needs onnxsim (pip install onnxsim); writing the model unsimplified")
        return proto
    simplified, valid = onnxsim.simplify(proto)
    if not valid:
        LOGGER.warning("WARNING: onnxsim could not validate its simplified model; writing the original")
        return proto
    return simplified


def export_yolov5(weights: Path, file: Path, im: torch.Tensor) -> tuple:
    """Write weights in YOLOv5 v6.0's pickled layout, read it back through our restricted loader and compare.

    Returns:
        (file, max |output of the reloaded model - output of the pickled model|), in float32 on im.
    """
    raw = build_yolov5_checkpoint(load_checkpoint(weights))
    save_yolov5_checkpoint(raw, file)
    expected = deepcopy(raw["model"]).float().to(im.device)(im.float())[0]
    reloaded = model_from_checkpoint(load_checkpoint(file)).eval().to(im.device)
    return file, float((reloaded(im.float())[0] - expected).abs().max())


def check_export(file: Path, im: torch.Tensor, expected: torch.Tensor, device) -> float | None:
    """Run an exported file through the backend val.py/detect.py use; max |output - expected| (None: no runtime)."""
    try:
        backend = DetectMultiBackend(file, device)
    except ValueError as e:  # the runtime of an optional format is missing: the file is written, just unchecked
        LOGGER.warning(f"WARNING: {file.name} not checked: {e}")
        return None
    return float((backend(im)[0] - expected.float()).abs().max())


def _check_include(include) -> list:
    names = [str(x).lower() for x in ([include] if isinstance(include, str) else include)]
    unknown = [x for x in names if x not in FORMATS]
    if unknown or not names:
        raise ValueError(f"--include {' '.join(unknown) or '(nothing)'}: choose from {', '.join(FORMATS)}")
    return list(dict.fromkeys(names))


def _report(name: str, file: Path, diff: float | None, bound: float, what: str = "PyTorch") -> None:
    """One line per file: where, how big, and how far its outputs are from the reference (warning past bound)."""
    line = f"{colorstr(name + ':')} saved {file} ({file.stat().st_size / 1e6:.1f} MB)"
    if diff is None:
        LOGGER.info(line)
    elif diff <= bound:
        LOGGER.info(f"{line}; checked: max |output - {what}| = {diff:.2e}, matches")
    else:
        LOGGER.warning(f"WARNING: {line}; checked: max |output - {what}| = {diff:.2e}, more than the expected "
                       f"{bound:.2e}: compare detections before deploying it")


def _bound(expected: torch.Tensor) -> float:
    """Allowed max difference: TOLERANCE of the dtype, relative to the output scale (pixels reach the image size)."""
    return TOLERANCE[expected.dtype] * max(1.0, float(expected.abs().max()))


def _pair(imgsz) -> list:
    """--imgsz as [h, w] from one size or two."""
    sizes = [imgsz] if isinstance(imgsz, int) else list(imgsz)
    return sizes * 2 if len(sizes) == 1 else sizes


@torch.no_grad()
def run(weights, include=("torchscript", "onnx"), imgsz=(640, 640), batch_size=1, device="cpu", half=False,
        dynamic=False, simplify=False, opset=12) -> dict:
    """Export weights to each format in include and check each file.

    Args:
        weights: a .pt checkpoint (ours or official YOLOv5).
        include: any of 'torchscript', 'onnx', 'yolov5'.
        imgsz: (h, w) or one size of the export input; rounded up to a multiple of the largest stride.
        batch_size: batch of the export input. device: '' / 'cpu' / '0'. half: fp16 export (CUDA only).
        dynamic: ONNX with dynamic batch and image size. simplify: run onnxsim when installed. opset: ONNX opset.

    Returns:
        {format: (path, max output difference or None when unchecked)}.
    """
    start, include, weights = time.time(), _check_include(include), Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"--weights {weights} not found; pass a trained .pt checkpoint")
    if weights_kind(weights) != "pt":
        raise ValueError(f"--weights {weights} is already exported; pass the .pt checkpoint it came from")
    device = select_device(device)
    if half and device.type == "cpu":
        raise ValueError("--half exports fp16, which needs a CUDA --device (e.g. --device 0); drop --half on CPU")
    if "onnx" in include:
        import_optional("onnx", "--include onnx")  # before any work, with the install line
    model = attempt_load(weights, map_location=device)  # fused, eval mode, float32
    imgsz = check_img_size(_pair(imgsz), int(model.stride.max()))
    im = torch.rand(batch_size, 3, *imgsz, generator=torch.Generator().manual_seed(0)).to(device)
    if half:
        model, im = model.half(), im.half()
    expected = model(im)[0]
    stem, results = weights.with_suffix(""), {}
    for name in include:
        file = stem.with_name(stem.name + FORMATS[name])
        if name == "yolov5":
            results[name] = export_yolov5(weights, file, im)
            _report("YOLOv5 layout", file, results[name][1], _bound(expected.float()), "the pickled model")
            continue
        exporter = export_torchscript if name == "torchscript" else export_onnx
        args = (deepcopy(model), im, file) + ((opset, dynamic, simplify) if name == "onnx" else ())
        results[name] = (exporter(*args), check_export(file, im, expected, device))
        _report({"torchscript": "TorchScript", "onnx": "ONNX"}[name], file, results[name][1], _bound(expected))
    LOGGER.info(f"Export complete ({time.time() - start:.1f}s). Run a file with: python detect.py --weights FILE; "
                f"score it with: python val.py --weights FILE")
    return results


def parse_opt(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Export a YOLOv5 detector to TorchScript, ONNX or YOLOv5's layout")
    p.add_argument("--weights", type=str, default="", help="model.pt path; default: the newest runs/**/best.pt")
    p.add_argument("--include", nargs="+", default=["torchscript", "onnx"], help=f"formats: {', '.join(FORMATS)}")
    p.add_argument("--imgsz", "--img", "--img-size", nargs="+", type=int, default=[640], help="image size h w")
    p.add_argument("--batch-size", type=int, default=1, help="batch size of the export input")
    p.add_argument("--device", default="cpu", help="cuda device, i.e. 0 or 0,1,2,3 or cpu")
    p.add_argument("--half", action="store_true", help="FP16 half-precision export (CUDA only)")
    p.add_argument("--dynamic", action="store_true", help="ONNX: dynamic batch size and image size")
    p.add_argument("--simplify", action="store_true", help="ONNX: simplify the graph with onnxsim (if installed)")
    p.add_argument("--opset", type=int, default=12, help="ONNX: opset version")
    return p.parse_args(argv)


def main(opt: argparse.Namespace) -> dict:
    opt.weights = default_weights(opt.weights, ROOT / "runs")[0]
    if len(opt.imgsz) > 2 or any(s <= 0 for s in opt.imgsz):
        raise ValueError(f"--imgsz {' '.join(map(str, opt.imgsz))}: pass one or two positive sizes (h w), e.g. 640")
    if opt.batch_size <= 0:
        raise ValueError(f"--batch-size {opt.batch_size}: pass a positive batch size such as 1")
    print_args("export", vars(opt))
    return run(**vars(opt))


if __name__ == "__main__":
    set_logging()
    run_cli(main, parse_opt())
