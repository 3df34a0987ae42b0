"""Run a detector from any file export.py writes: ``.pt`` checkpoints, TorchScript and ONNX.

``DetectMultiBackend`` hides the format: every backend takes images (bs, 3, h, w) in 0..1 and returns, like an
eval-mode ``Model``, ``(decoded, None)`` with decoded (bs, n, 5 + nc) = xywh in input pixels, objectness and
class scores. ``stride``, ``names`` and ``nc`` come from the checkpoint or from the metadata export.py stores
(TorchScript: the JSON file ``config.txt`` inside the archive, as YOLOv5 writes it; ONNX: ``metadata_props``).

onnx and onnxruntime are optional (``requirements-export.txt``) and imported only when an ONNX file is used.
"""
from __future__ import annotations

import importlib
import json
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from utils.augmentations import PAD_COLOR
from utils.general import LOGGER

EXPORTED_SUFFIXES = {".torchscript": "torchscript", ".onnx": "onnx"}
TORCHSCRIPT_CONFIG = "config.txt"  # YOLOv5's extra file: {"shape": [bs, 3, h, w], "stride": int, "names": [...]}
EXPORT_EXTRAS = "requirements-export.txt"
PAD_VALUE = PAD_COLOR[0] / 255  # letterbox's grey, on 0..1 images


def weights_kind(path) -> str:
    """'torchscript' or 'onnx' for exported files (YOLOv5 v6.0 named TorchScript files '*.torchscript.pt'), else
    'pt': any other file is a checkpoint for utils.checkpoint, which says what is wrong with it."""
    name = Path(path).name.lower()
    if name.endswith(".torchscript.pt"):
        return "torchscript"
    return EXPORTED_SUFFIXES.get(Path(name).suffix, "pt")


def exported_weights(weights) -> Path | None:
    """The exported (.torchscript/.onnx) file among --weights, or None when they are all .pt checkpoints.

    Raises:
        ValueError: an exported file is given together with other weights (ensembles need .pt checkpoints).
    """
    paths = [weights] if isinstance(weights, (str, Path)) else list(weights or [])
    exported = [Path(p) for p in paths if weights_kind(p) != "pt"]
    if not exported:
        return None
    if len(paths) > 1:
        raise ValueError(f"--weights {' '.join(map(str, paths))}: an ensemble needs .pt checkpoints; pass one "
                         f".torchscript or .onnx file alone")
    return exported[0]


def import_optional(name: str, purpose: str):
    """Import an optional dependency, or raise a ValueError that says how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ValueError(f"{purpose} needs the optional package '{name}': pip install -r {EXPORT_EXTRAS}") from None


def export_metadata(model: nn.Module, shape) -> dict:
    """What exported files record about a model: input shape, largest stride, class names (a list)."""
    return {"shape": [int(s) for s in shape], "stride": int(model.stride.max()), "names": list(model.names)}


def _names_from(meta: dict, nc: int | None) -> list:
    """Class names from metadata (a list, or a dict keyed by index as later YOLOv5 writes), else numbered."""
    names = meta.get("names")
    if isinstance(names, dict):
        names = [names[k] for k in sorted(names, key=int)]
    if names:
        return [str(n) for n in names]
    if nc is None:
        raise ValueError("the exported model has no class names or class count in its metadata; re-export it "
                         "with this project's export.py")
    return [str(i) for i in range(nc)]


class _TorchScriptRunner:
    """A traced model from torch.jit.load; outputs the decoded tensor (or a tuple whose first item it is)."""

    def __init__(self, path: Path, device: torch.device):
        files = {TORCHSCRIPT_CONFIG: ""}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch calls TorchScript deprecated; still supported
            self.module = torch.jit.load(str(path), map_location=device, _extra_files=files)
        if not files[TORCHSCRIPT_CONFIG]:
            raise ValueError(f"'{path}' has no {TORCHSCRIPT_CONFIG} (stride, names); re-export it with export.py")
        self.meta = json.loads(files[TORCHSCRIPT_CONFIG])
        first = next(self.module.parameters(), None)
        self.dtype = first.dtype if first is not None else torch.float32
        # Our traces compute the grids from the input shape; YOLOv5's own traces froze them at the export size.
        self.fixed_shape = None if self.meta.get("dynamic") else tuple(self.meta.get("shape") or ()) or None
        self.nc = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):  # the graph is in its own dtype already
            y = self.module(x.to(self.dtype))
        return y[0] if isinstance(y, (list, tuple)) else y


class _OnnxRunner:
    """An onnxruntime session on the first input and first output of an ONNX file."""

    def __init__(self, path: Path, device: torch.device):
        ort = import_optional("onnxruntime", "running .onnx models")
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # respect OMP_NUM_THREADS like torch does
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.input = self.session.get_inputs()[0]
        self.output = self.session.get_outputs()[0].name
        meta = self.session.get_modelmeta().custom_metadata_map
        self.meta = {k: json.loads(v) for k, v in meta.items() if k in ("stride", "names", "shape")}
        self.dtype = torch.float16 if "float16" in self.input.type else torch.float32
        shape = self.input.shape  # ints for fixed dimensions, names (str) for dynamic ones
        self.fixed_shape = tuple(shape) if all(isinstance(s, int) for s in shape) else None
        last = self.session.get_outputs()[0].shape[-1]
        self.nc = last - 5 if isinstance(last, int) else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        feed = {self.input.name: x.detach().to("cpu", self.dtype).numpy()}
        return torch.from_numpy(self.session.run([self.output], feed)[0]).to(x.device)


class DetectMultiBackend(nn.Module):
    """One detector interface over .pt checkpoints, TorchScript (.torchscript) and ONNX (.onnx) files.

    Attributes:
        kind: 'pt', 'torchscript' or 'onnx'.
        stride: tensor (nl,) of the checkpoint's strides, or (1,) with the largest stride for exported files.
        names: list of class names; nc: class count.
        fixed_shape: (bs, 3, h, w) when the file only takes that input size (a non-dynamic ONNX export), else
            None. Other batch sizes are split and padded to bs; smaller images are padded right and bottom
            (predictions unchanged), larger ones scaled down to fit (predictions mapped back, not exact).
    """

    def __init__(self, weights, device=None, fuse: bool = True):
        """Args:
            weights: path of a .pt, .torchscript (or YOLOv5 v6.0's .torchscript.pt) or .onnx file.
            device: torch.device or device string for the model and the returned predictions (default CPU).
            fuse: fold BatchNorm into the convolutions of a .pt model.
        """
        super().__init__()
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"weights '{path}' not found; pass the path of a local model file")
        self.kind = weights_kind(path)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.fixed_shape, self.runner, self._warned = None, None, False
        if self.kind == "pt":
            from models.experimental import attempt_load

            self.model = attempt_load(path, map_location=self.device, fuse=fuse)
            self.names, self.stride = list(self.model.names), self.model.stride
        else:
            runner = (_TorchScriptRunner if self.kind == "torchscript" else _OnnxRunner)(path, self.device)
            self.runner, self.fixed_shape = runner, runner.fixed_shape
            self.names = _names_from(runner.meta, runner.nc)
            if "stride" not in runner.meta:
                LOGGER.warning(f"WARNING: '{path}' records no stride; assuming 32")
            self.stride = torch.tensor([float(runner.meta.get("stride", 32))])
        self.nc = len(self.names)

    def forward(self, im: torch.Tensor, augment: bool = False, profile: bool = False, visualize: bool = False):
        """Detect on a batch.

        Args:
            im: (bs, 3, h, w) images in 0..1 (any float dtype; cast to what the model was exported in).
            augment: test-time augmentation, .pt models only.

        Returns:
            (decoded (bs, n, 5 + nc) float32 on the backend's device, None); a .pt model returns its own
            eval-mode output (decoded, raw maps).
        """
        if self.kind == "pt":
            return self.model(im, augment=augment) if augment else self.model(im)
        if augment or visualize:
            raise ValueError("--augment and --visualize need the PyTorch model: pass the .pt checkpoint instead of "
                             f"the {self.kind} file")
        return (self._run_fixed(im) if self.fixed_shape else self.runner(im).float()), None

    def _run_fixed(self, im: torch.Tensor) -> torch.Tensor:
        """Run a fixed-shape file on any batch: images fitted into its (h, w) by _fit, chunks of its batch size
        (the last one padded with blank images and trimmed), boxes mapped back to im's pixels."""
        bs = self.fixed_shape[0]
        im, scale = self._fit(im)
        outputs = []
        for chunk in im.split(bs):
            n = len(chunk)
            if n < bs:
                chunk = torch.cat((chunk, chunk.new_zeros((bs - n, *chunk.shape[1:]))))
            outputs.append(self.runner(chunk)[:n].float())
        out = torch.cat(outputs)
        out[..., :4] /= scale  # xywh of the scaled image -> im's pixels (padding is right/bottom: no offset)
        return out

    def _fit(self, im: torch.Tensor) -> tuple:
        """im (bs, 3, h0, w0) shrunk (keeping its aspect ratio) when larger than the file's (h, w), then padded
        right and bottom with letterbox grey. Returns (im, scale); scale 1 keeps the predictions exact."""
        h, w = self.fixed_shape[2:]
        h0, w0 = im.shape[2:]
        scale = min(h / h0, w / w0, 1.0)
        if scale < 1:
            if not self._warned:
                LOGGER.warning(f"WARNING: this {self.kind} file takes {h}x{w} images; larger inputs are scaled "
                               f"down to fit (re-export with --dynamic, or at --imgsz {h0} {w0}, to run them as is)")
                self._warned = True
            size = (max(1, round(h0 * scale)), max(1, round(w0 * scale)))
            im = nn.functional.interpolate(im.float(), size=size, mode="bilinear", align_corners=False)
        pad = (0, w - im.shape[3], 0, h - im.shape[2])
        return nn.functional.pad(im, pad, value=PAD_VALUE) if any(pad) else im, scale
