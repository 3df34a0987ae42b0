"""Checkpoints: our weights-only format, safe loading of official YOLOv5 files, and model rebuilding.

Our format (``FORMAT``) holds only tensors and plain data, so ``torch.load(path, weights_only=True)`` reads it
without any allowlist::

    {'format': 'yolov5-kd/2', 'epoch': int, 'best_fitness': float,
     'model': {'yaml': dict, 'state_dict': {name: fp32 tensor}, 'names': [str], 'nc': int, 'stride': [float],
               'batchnorm': {'eps': float, 'momentum': float} | None},
     'ema': state_dict | None, 'updates': int | None, 'optimizer': state_dict | None,
     'opt': dict | None, 'hyp': dict | None, 'date': str, ...extra keys ('adapters', 'kd', 'scheduler')}

Official YOLOv5 checkpoints (v5.0 to v7.0) pickle whole ``models.yolo.Model`` objects. They are read with the
restricted ``weights_only`` unpickler and an explicit allowlist: our model classes and the torch.nn layers they hold
(each mapped to a data-only ``PickledModule`` stand-in, so not even their constructors run), plus the numpy pieces
of ``best_fitness``. Anything else is refused, naming the offending globals, before it can run. The pickled
modules are then read only as data: a fresh model is built from their YAML and receives their weights, so
attributes that old torch or YOLOv5 versions did or did not pickle (``recompute_scale_factor``, list or buffer
``anchor_grid``, ``inplace``, ...) never matter.

BatchNorm settings are not weights, so a rebuilt model takes them from the file: format 2 records them under
``model['batchnorm']``, official files carry them on their pickled BatchNorm2d layers (eps 1e-3, momentum 0.03 in
YOLOv5), and format 1 files, written when this project still used PyTorch's defaults, get eps 1e-5 and momentum
0.1 back so that their predictions do not change.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import pathlib
import pickle
import shutil
import uuid
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from models import attention, common
from models.yolo import Detect, Model
from utils.general import LOGGER
from utils.torch_utils import (BN_EPS, BN_MOMENTUM, LEGACY_BN_EPS, LEGACY_BN_MOMENTUM, batchnorm_settings, de_parallel,
                               initialize_weights, most_common_batchnorm)

FORMAT = "yolov5-kd/2"  # 2: model['batchnorm'] records the BatchNorm eps/momentum
FORMAT_VERSION = 2
RESERVED_KEYS = ("format", "epoch", "best_fitness", "model", "ema", "updates", "optimizer", "opt", "hyp", "date")
PLAIN_SCALARS = (type(None), bool, int, float, complex, str, bytes, torch.device, torch.dtype)

# Parameter-free activations that a rebuilt model may need to adopt from a pickled one (the YAML does not record
# which activation a Conv used), with the constructor arguments to carry over.
ACTIVATIONS = {
    nn.Identity: (), nn.SiLU: (), nn.ReLU: (), nn.ReLU6: (), nn.LeakyReLU: ("negative_slope",),
    nn.Hardswish: (), nn.Hardsigmoid: (), nn.Sigmoid: (), nn.Tanh: (), nn.Mish: (), nn.GELU: ("approximate",),
}
TORCH_LAYERS = (
    nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.Linear, nn.Upsample, nn.MaxPool2d, nn.AvgPool2d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Sequential, nn.ModuleList, nn.Dropout, nn.Flatten, nn.Softmax,
)


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint needs globals outside the allowlist; nothing from it was executed."""


def _plain(value, where="checkpoint"):
    """A copy of value made of tensors and plain Python data (what weights_only=True can read).

    Paths become str, argparse namespaces and dataclasses become dicts, numpy scalars/arrays become Python
    numbers/lists. Anything else raises a TypeError naming where it sits.
    """
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (np.generic, np.ndarray)):  # before the scalars: np.float64 subclasses float
        return value.tolist()
    if type(value) in PLAIN_SCALARS:  # exact types: subclasses (IntEnum, ...) would pickle as their own class
        return value
    if isinstance(value, pathlib.PurePath):
        return str(value)
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {_plain(k, where): _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, (set, frozenset)):
            return set(items)
        return items if isinstance(value, list) else tuple(items)
    raise TypeError(f"{where} holds a {type(value).__module__}.{type(value).__qualname__}, which a weights-only "
                    f"checkpoint cannot store; convert it to tensors or plain data (dict/list/str/number) first")


def _to_float(value) -> float:
    """best_fitness as a float: YOLOv5 stores a numpy array of shape (1,), we store a float."""
    if value is None:
        return 0.0
    array = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value, dtype=float).reshape(-1)
    return float(array[0]) if array.size else 0.0


def _fp32_state(module: nn.Module) -> dict:
    """A detached CPU copy of module's state_dict with floating tensors in float32."""
    return {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype, copy=True)
            for k, v in module.state_dict().items()}


def _names_list(names, nc=None) -> list | None:
    """Class names as a list; YOLOv5 v7 stores a dict {index: name}."""
    if names is None:
        return None
    if isinstance(names, Mapping):
        names = [names[k] for k in sorted(names)]
    names = [str(n) for n in names]
    if nc is not None and len(names) != nc:
        LOGGER.warning(f"checkpoint has {len(names)} class names for {nc} classes; using numbered names instead")
        return [str(i) for i in range(nc)]
    return names


def _model_entry(model: nn.Module) -> dict:
    if any(isinstance(m, common.Conv) and not hasattr(m, "bn") for m in model.modules()):
        raise ValueError("cannot checkpoint a fused model (BatchNorm folded into convs): save before model.fuse()")
    stride = getattr(model, "stride", None)
    return {
        "yaml": _plain(model.yaml, "model.yaml"),
        "state_dict": _fp32_state(model),
        "names": _names_list(getattr(model, "names", None)),
        "nc": int(model.nc),
        "stride": [float(s) for s in stride] if stride is not None else None,
        "batchnorm": batchnorm_settings(model),
    }


def build_checkpoint(model, ema=None, optimizer=None, epoch=-1, best_fitness=0.0, opt=None, hyp=None,
                     extra=None) -> dict:
    """Everything a run needs to resume or deploy, as tensors and plain data.

    Args:
        model: the trained ``Model`` (may be DP/DDP wrapped).
        ema: a ``utils.torch_utils.ModelEMA`` or None.
        optimizer: a torch optimizer or None; its state_dict is stored as is (save right away).
        epoch: last finished epoch (-1 = training finished).
        best_fitness: float (a numpy array of shape (1,) is accepted).
        opt, hyp: run options (dict or argparse.Namespace) and hyperparameters; turned into plain data.
        extra: more top-level keys ('adapters', 'kd', 'scheduler', ...); must not reuse the reserved keys.

    Returns:
        The checkpoint dict described in this module's docstring (model/EMA weights copied to CPU fp32).
    """
    model = de_parallel(model)
    ckpt = {
        "format": FORMAT,
        "epoch": int(epoch),
        "best_fitness": _to_float(best_fitness),
        "model": _model_entry(model),
        "ema": _fp32_state(ema.ema) if ema is not None else None,
        "updates": int(ema.updates) if ema is not None else None,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "opt": _plain(opt, "opt") if opt is not None else None,
        "hyp": _plain(hyp, "hyp") if hyp is not None else None,
        "date": datetime.now().isoformat(timespec="seconds"),
    }
    for key, value in (extra or {}).items():
        if key in RESERVED_KEYS:
            raise ValueError(f"extra key '{key}' would overwrite a reserved checkpoint key; "
                             f"rename it (reserved: {', '.join(RESERVED_KEYS)})")
        ckpt[key] = _plain(value, key)
    return ckpt


def save_checkpoint(ckpt: dict, path) -> Path:
    """Write ckpt to path atomically: a temp file in the same directory, flushed and fsynced, then os.replace.

    A crash or error mid-write leaves any previous file at path intact and no temp file behind.

    Returns:
        path as a Path.
    """
    data = _plain(ckpt, "ckpt")  # refuse modules/objects now rather than write a file that will not load
    return _write_atomically(path, lambda f: torch.save(data, f))


def copy_checkpoint(source, path) -> Path:
    """Copy a checkpoint file to path atomically (as save_checkpoint writes), e.g. last.pt to best.pt: the same
    bytes as saving the dict again, without serialising it twice."""
    with open(source, "rb") as src:
        return _write_atomically(path, lambda f: shutil.copyfileobj(src, f, 16 * 2 ** 20))


def _write_atomically(path, write) -> Path:
    """Call write(file) on a temp file beside path, fsync it and rename it onto path; on any error remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable; not every platform can open a directory, which is fine."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class PickledModule(nn.Module):
    """Data-only stand-in for a module class named in a checkpoint.

    The allowlist maps each allowed module name (``models.common.Conv``, ``torch.nn.modules.conv.Conv2d``, ...) to
    a subclass of this, so unpickling restores the pickled attributes (``_modules``, ``_parameters``, ``yaml``,
    ...) as data while none of the real class's code runs: a crafted file that calls a constructor directly is
    refused. ``original`` is the class the name stands for.
    """

    original = nn.Module

    def __init__(self, *args, **kwargs):
        raise pickle.UnpicklingError(f"the file calls {self.original.__module__}.{self.original.__qualname__}(...) "
                                     f"directly, which YOLOv5 checkpoints never do")


def _own_modules(module) -> list:
    """nn.Module classes defined in one of our model modules (what official pickles reference there)."""
    return [obj for obj in vars(module).values()
            if isinstance(obj, type) and issubclass(obj, nn.Module) and obj.__module__ == module.__name__]


def _stand_in(cls: type, name: str | None = None) -> tuple:
    """A (PickledModule subclass, pickled name) allowlist entry for module class cls."""
    name = name or f"{cls.__module__}.{cls.__qualname__}"
    return type(f"Pickled{cls.__name__}", (PickledModule,), {"original": cls, "__module__": __name__}), name


def _numpy_entries() -> list:
    """What a pickled numpy array or scalar (YOLOv5's best_fitness) references, for numpy 1.x and 2.x files."""
    np_core = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    entries = [np.ndarray, np.dtype]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        entries += [(np_core._reconstruct, f"{module}._reconstruct"), (np_core.scalar, f"{module}.scalar")]
    numeric = ("bool", "float16", "float32", "float64", "int8", "int16", "int32", "int64",
               "uint8", "uint16", "uint32", "uint64")
    return entries + sorted({type(np.dtype(t)) for t in numeric} - {np.dtype}, key=str)  # BUILD needs dtype types


@functools.lru_cache(maxsize=1)
def safe_globals_allowlist() -> tuple:
    """Globals that official YOLOv5 checkpoints may reference, as torch.serialization.safe_globals entries.

    Module classes (ours, the torch.nn layers they hold, v7.0's ``models.yolo.DetectionModel`` name) map to
    data-only ``PickledModule`` stand-ins; numpy arrays/scalars and pathlib paths map to the real classes.
    """
    modules = [Model, Detect, *_own_modules(common), *_own_modules(attention), *TORCH_LAYERS, *ACTIVATIONS]
    entries = [_stand_in(cls) for cls in modules]
    entries.append((entries[0][0], "models.yolo.DetectionModel"))  # v7.0 name of Model
    paths = [(pathlib.PosixPath, "pathlib.PosixPath"), (pathlib.PurePosixPath, "pathlib.PurePosixPath"),
             (pathlib.PureWindowsPath, "pathlib.PureWindowsPath")]
    return tuple(entries + _numpy_entries() + paths)


def _allowlisted_names() -> set:
    return {e[1] if isinstance(e, tuple) else f"{e.__module__}.{e.__qualname__}" for e in safe_globals_allowlist()}


def safe_torch_load(path, map_location="cpu"):
    """torch.load with weights_only=True plus our allowlist; never falls back to unrestricted unpickling.

    Raises:
        UnsafeCheckpointError: the file references globals outside the allowlist (named in the message).
        RuntimeError: the file is not a readable torch checkpoint.
    """
    with torch.serialization.safe_globals(list(safe_globals_allowlist())):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            offending = _unsafe_globals(path)
            detail = f"globals outside the YOLOv5 allowlist: {', '.join(offending)}" if offending else str(e)
            raise UnsafeCheckpointError(
                f"refused to load '{path}': it needs {detail}. Nothing from the file was executed. Only this "
                f"project's checkpoints, official YOLOv5 v5.0-v7.0 detection checkpoints and plain state_dicts "
                f"load; for any other file, load it where you trust it, save model.state_dict() and pass that "
                f"file with --cfg <model.yaml>") from None
        except (RuntimeError, EOFError, OSError) as e:
            raise RuntimeError(f"cannot read checkpoint '{path}' ({e}); the file may be truncated or not a torch "
                               f"checkpoint: re-download or re-save it") from e


def _unsafe_globals(path) -> list:
    """Names of the disallowed globals in path, found by a static scan that executes nothing."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (ValueError, RuntimeError, OSError):  # legacy (non-zip) files cannot be scanned
        return []
    return sorted(set(found) - _allowlisted_names())


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read our checkpoints, official YOLOv5 checkpoints and bare state_dicts, all returned in our format.

    Official files: 'model' and 'ema' become fp32 state_dicts (plus yaml, names, nc, stride and the activation
    types, see ``model_from_checkpoint``); 'optimizer' is dropped. Bare state_dicts get ``model.yaml = None``
    (pass ``cfg`` to ``model_from_checkpoint``).

    Args:
        path: checkpoint file.
        map_location: as for torch.load.

    Returns:
        A dict in our format (see the module docstring).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' not found; pass the path of a local .pt file "
                                f"(weights are never downloaded)")
    raw = safe_torch_load(path, map_location)
    if isinstance(raw, nn.Module):
        raw = {"model": raw}
    if isinstance(raw, Mapping) and str(raw.get("format", "")).startswith("yolov5-kd/"):
        return _check_own(raw, path)
    if isinstance(raw, Mapping) and any(isinstance(raw.get(k), nn.Module) for k in ("model", "ema")):
        return _convert_official(raw)
    state = _bare_state_dict(raw)
    if state is not None:
        return _wrap_state_dict(state)
    keys = list(raw)[:10] if isinstance(raw, Mapping) else type(raw).__name__
    raise ValueError(f"'{path}' is not a YOLOv5 checkpoint (found {keys}); expected a file saved by this project, "
                     f"an official YOLOv5 .pt or a model state_dict")


def _check_own(ckpt: Mapping, path) -> dict:
    version = str(ckpt["format"]).split("/", 1)[1]
    if not version.isdigit() or int(version) > FORMAT_VERSION:
        raise ValueError(f"'{path}' has checkpoint format {ckpt['format']}, newer than this code reads "
                         f"({FORMAT}); update the project")
    if not isinstance(ckpt.get("model"), Mapping) or "state_dict" not in ckpt["model"]:
        raise ValueError(f"'{path}' claims format {ckpt['format']} but has no model state_dict; re-save it")
    return dict(ckpt)


def _bare_state_dict(raw) -> dict | None:
    """raw itself, or raw['state_dict'] / raw['model'], when that is a non-empty dict of tensors."""
    for candidate in (raw, *(raw.get(k) for k in ("state_dict", "model") if isinstance(raw, Mapping))):
        if isinstance(candidate, Mapping) and candidate and all(
                isinstance(v, torch.Tensor) for v in candidate.values()):
            return {str(k).removeprefix("module."): v for k, v in candidate.items()}
    return None


def _wrap_state_dict(state: dict) -> dict:
    model = {"yaml": None, "state_dict": state, "names": None, "nc": _infer_nc(state), "stride": None}
    return {"format": FORMAT, "epoch": -1, "best_fitness": 0.0, "model": model, "ema": None, "updates": None,
            "optimizer": None, "opt": None, "hyp": None, "date": None}


def _infer_nc(state: Mapping) -> int | None:
    """Class count implied by the Detect weights: out_channels of m.0 = na * (nc + 5), na from 'anchors'."""
    for key, anchors in state.items():
        if key.endswith("anchors") and anchors.ndim == 3:
            weight = state.get(key[: -len("anchors")] + "m.0.weight")
            if weight is not None:
                return int(weight.shape[0] // anchors.shape[1] - 5)
    return None


def _pickled_tensors(module: nn.Module, prefix: str = ""):
    """(name, tensor) pairs of an unpickled module's parameters and persistent buffers.

    Walks the module's dicts directly instead of calling state_dict(), so no method or hook stored in the file
    ever runs.
    """
    d = vars(module)
    skip = d.get("_non_persistent_buffers_set") or set()
    for name, t in list(d.get("_parameters", {}).items()) + list(d.get("_buffers", {}).items()):
        if isinstance(t, torch.Tensor) and name not in skip:
            yield prefix + name, t
    for name, child in d.get("_modules", {}).items():
        if isinstance(child, nn.Module):
            yield from _pickled_tensors(child, f"{prefix}{name}.")


def _pickled_activations(module: nn.Module, prefix: str = "") -> dict:
    """{module name: [class name, {constructor kwargs}]} for every activation module inside module."""
    found = {}
    for name, child in vars(module).get("_modules", {}).items():
        cls = getattr(type(child), "original", type(child))
        if cls in ACTIVATIONS:
            kwargs = {a: vars(child)[a] for a in ACTIVATIONS[cls] if a in vars(child)}
            found[prefix + name] = [cls.__name__, kwargs]
        elif isinstance(child, nn.Module):
            found.update(_pickled_activations(child, f"{prefix}{name}."))
    return found


def _pickled_batchnorm(module: nn.Module) -> dict:
    """{'eps', 'momentum'} most common among the BatchNorm2d layers of an unpickled model (YOLOv5's values when the
    pickle has none)."""
    pairs = []
    stack = [module]
    while stack:  # the pickled dicts only: no method of an unpickled module runs
        d = vars(stack.pop())
        for child in d.get("_modules", {}).values():
            if getattr(type(child), "original", type(child)) is nn.BatchNorm2d:
                pairs.append((vars(child).get("eps", BN_EPS), vars(child).get("momentum", BN_MOMENTUM)))
            elif isinstance(child, nn.Module):
                stack.append(child)
    return most_common_batchnorm(pairs) or {"eps": BN_EPS, "momentum": BN_MOMENTUM}


def _pickled_state(module: nn.Module) -> dict:
    """fp32 state_dict of an unpickled model; v5.0's 'anchor_grid' buffer is dropped (rebuilt from anchors)."""
    return {k: v.float() if v.is_floating_point() else v
            for k, v in _pickled_tensors(module) if not k.endswith("anchor_grid")}


def _convert_official(raw: Mapping) -> dict:
    """An official YOLOv5 checkpoint dict (pickled Model objects) in our format."""
    model_obj = raw.get("model") if isinstance(raw.get("model"), nn.Module) else None
    ema_obj = raw.get("ema") if isinstance(raw.get("ema"), nn.Module) else None
    main = ema_obj if ema_obj is not None else model_obj  # YOLOv5 deploys the EMA when there is one
    attrs = vars(main)
    yaml = attrs.get("yaml") if isinstance(attrs.get("yaml"), Mapping) else None
    state = _pickled_state(model_obj if model_obj is not None else ema_obj)
    nc = _infer_nc(state) or (yaml or {}).get("nc")
    stride = attrs.get("stride")
    entry = {
        "yaml": _lenient_plain(yaml, "model.yaml"),
        "state_dict": state,
        "names": _names_list(attrs.get("names"), nc),
        "nc": nc,
        "stride": [float(s) for s in stride] if isinstance(stride, torch.Tensor) else None,
        "activations": _pickled_activations(main),
        "batchnorm": _pickled_batchnorm(main),
    }
    both = model_obj is not None and ema_obj is not None
    epoch, updates = raw.get("epoch"), raw.get("updates")
    return {
        "format": FORMAT, "origin": "yolov5",
        "epoch": int(epoch) if isinstance(epoch, (int, np.integer)) else -1,
        "best_fitness": _to_float(raw.get("best_fitness")),
        "model": entry,
        "ema": _pickled_state(ema_obj) if both else None,
        "updates": int(updates) if both and isinstance(updates, (int, np.integer)) else None,
        "optimizer": None,  # its parameter order belongs to YOLOv5's optimizer groups, not ours
        "opt": _lenient_plain(raw.get("opt"), "opt"),
        "hyp": _lenient_plain(attrs.get("hyp"), "model.hyp"),
        "date": raw.get("date") if isinstance(raw.get("date"), str) else None,
    }


def _lenient_plain(value, where):
    """Metadata of official files is informative only: keep what is plain, drop (with a note) what is not."""
    try:
        return _plain(value, where) if value is not None else None
    except TypeError as e:
        LOGGER.debug(f"dropping official checkpoint metadata: {e}")
        return None


def model_from_checkpoint(ckpt: dict, use_ema=True, nc=None, cfg=None) -> Model:
    """A float32 ``Model`` with the checkpoint's weights, names, class count and strides.

    Args:
        ckpt: a dict from ``load_checkpoint`` / ``build_checkpoint``, or a bare state_dict.
        use_ema: take the EMA weights when the checkpoint has them.
        nc: class count the caller expects (from --nc or the data YAML); must match the weights.
        cfg: model YAML (path or dict) to build instead of the checkpoint's own; required for bare state_dicts.

    Returns:
        models.yolo.Model in train mode, float32, on CPU.
    """
    if "format" not in ckpt:
        state = _bare_state_dict(ckpt)
        if state is None:
            raise ValueError("model_from_checkpoint needs a dict from load_checkpoint/build_checkpoint or a "
                             "state_dict of tensors")
        ckpt = _wrap_state_dict(state)
    entry = ckpt["model"]
    use = ckpt.get("ema") if use_ema and ckpt.get("ema") is not None else entry["state_dict"]
    state = {k: v.float() if v.is_floating_point() else v for k, v in use.items()}
    weights_nc = entry.get("nc") or _infer_nc(state)
    if nc is not None and weights_nc is not None and int(nc) != int(weights_nc):
        raise ValueError(f"checkpoint has {weights_nc} classes but --nc/data says {nc}: use the data YAML the "
                         f"weights were trained on (or --nc {weights_nc}), or train on your {nc} classes from "
                         f"these weights as pretrained so the Detect head is rebuilt")
    source = cfg if cfg is not None else entry.get("yaml")
    if source is None:
        raise ValueError("this checkpoint is a bare state_dict with no model YAML; pass --cfg with the model "
                         "YAML the weights were trained with (e.g. --cfg models/yolov5s.yaml)")
    model = Model(source, nc=weights_nc or nc)
    _load_weights(model, state, source)
    _adopt_activations(model, entry.get("activations") or {})
    settings = checkpoint_batchnorm(ckpt)
    if settings is not None:
        initialize_weights(model, **settings)  # also makes adopted activations in-place
    _restore_attributes(model, entry, cfg is None)
    return model.float()


def checkpoint_batchnorm(ckpt: Mapping, log: bool = True) -> dict | None:
    """BatchNorm settings {'eps', 'momentum'} that a model rebuilt from ckpt needs to reproduce its outputs.

    The recorded ones when the file has them; PyTorch's defaults (eps 1e-5, momentum 0.1) for files written in
    format yolov5-kd/1, before this project adopted YOLOv5 v6.0's values (logged once per call when log is True);
    v6.0's values (eps 1e-3, momentum 0.03) for anything else, e.g. bare state_dicts. None: the model has no
    BatchNorm to set.

    Args:
        ckpt: a dict from ``load_checkpoint`` / ``build_checkpoint``.
        log: say so in one info line when old defaults are restored.
    """
    entry = ckpt.get("model") if isinstance(ckpt.get("model"), Mapping) else {}
    if "batchnorm" in entry:
        return dict(entry["batchnorm"]) if entry["batchnorm"] is not None else None
    if str(ckpt.get("format")) == "yolov5-kd/1":
        if log:
            LOGGER.info(f"checkpoint format yolov5-kd/1 predates YOLOv5 v6.0's BatchNorm settings: rebuilding it "
                        f"with the eps {LEGACY_BN_EPS:g} and momentum {LEGACY_BN_MOMENTUM:g} it was trained with, so "
                        f"its predictions are unchanged (a checkpoint saved from it records them)")
        return {"eps": LEGACY_BN_EPS, "momentum": LEGACY_BN_MOMENTUM}
    return {"eps": BN_EPS, "momentum": BN_MOMENTUM}


def _load_weights(model: nn.Module, state: Mapping, source) -> None:
    """Strict load with an error that lists what does not line up."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        where = source if isinstance(source, (str, Path)) else "the checkpoint's model YAML"
        raise ValueError(f"weights do not fit the model built from {where}: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, shape mismatches {shapes[:5]}; pass the --cfg the weights were "
                         f"trained with")
    model.load_state_dict(state, strict=False)  # num_batches_tracked may be absent in very old files


def _adopt_activations(model: nn.Module, activations: Mapping) -> None:
    """Swap in the activation types an official model was pickled with where the YAML rebuild differs.

    Activations have no weights, so a strict state_dict load cannot tell SiLU from LeakyReLU; without this a
    model trained with another activation would load silently wrong.
    """
    by_name = {cls.__name__: cls for cls in ACTIVATIONS}
    modules = dict(model.named_modules())
    for name, (cls_name, kwargs) in activations.items():
        if name not in modules or cls_name not in by_name:
            raise ValueError(f"the model rebuilt from the checkpoint YAML has no activation '{name}' "
                             f"({cls_name}); the file was written by an incompatible model, pass its --cfg")
        if type(modules[name]).__name__ != cls_name:
            parent_name, _, attr = name.rpartition(".")
            setattr(modules[parent_name] if parent_name else model, attr, by_name[cls_name](**kwargs))


def _restore_attributes(model: Model, entry: Mapping, same_arch: bool) -> None:
    """names, and the saved strides when the architecture is the checkpoint's own."""
    names = _names_list(entry.get("names"), model.nc)
    if names is not None:
        model.names = names
    detect = model.model[-1]
    stride = entry.get("stride")
    if same_arch and stride and isinstance(detect, Detect) and len(stride) == detect.nl:
        detect.stride = torch.tensor(stride, dtype=torch.float32, device=detect.anchors.device)
        model.stride = detect.stride


def strip_optimizer(path, out=None) -> Path:
    """Shrink a finished checkpoint: EMA weights (when present) become the model, in fp16; optimizer, EMA,
    scheduler and update count are dropped and epoch set to -1 (finished). Written atomically.

    Args:
        path: checkpoint to strip (ours or official).
        out: where to write; defaults to overwriting path.

    Returns:
        The written path.
    """
    ckpt = load_checkpoint(path)
    model = dict(ckpt["model"])
    state = ckpt["ema"] if ckpt.get("ema") is not None else model["state_dict"]
    # Anchors stay fp32: they are tiny and fp16 would round AutoAnchor's values.
    model["state_dict"] = {k: v.half() if v.is_floating_point() and not k.endswith("anchors") else v
                           for k, v in state.items()}
    model["batchnorm"] = checkpoint_batchnorm(ckpt, log=False)  # written in the current format from here on
    ckpt.update(format=FORMAT, model=model, ema=None, updates=None, optimizer=None, epoch=-1)
    ckpt.pop("scheduler", None)
    target = save_checkpoint(ckpt, out or path)
    LOGGER.info(f"Optimizer stripped from {path}{f', saved as {target}' if out else ''}, "
                f"{target.stat().st_size / 1e6:.1f}MB")
    return target


# A finished YOLOv5 v6.0 checkpoint (its train.py's last save after strip_optimizer) has these keys, in this order.
YOLOV5_KEYS = ("epoch", "best_fitness", "model", "ema", "updates", "optimizer", "wandb_id", "training_results")
# Our module classes that YOLOv5 v6.0 defines at the same import paths; a pickle naming any other cannot load there.
YOLOV5_CLASSES = frozenset([*(f"models.common.{name}" for name in (
    "Conv", "DWConv", "TransformerLayer", "TransformerBlock", "Bottleneck", "BottleneckCSP", "C3", "C3TR", "C3SPP",
    "C3Ghost", "SPP", "SPPF", "Focus", "GhostConv", "GhostBottleneck", "Contract", "Expand", "Concat")),
    "models.yolo.Model", "models.yolo.Detect"])


def _class_path(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def build_yolov5_checkpoint(ckpt: Mapping) -> dict:
    """ckpt in YOLOv5 v6.0's own pickled layout, for YOLOv5's tools (torch.hub 'custom', its export.py/detect.py,
    train.py --weights).

    As v6.0 leaves a finished run: 'model' is a pickled ``models.yolo.Model`` (the EMA weights when ckpt has them,
    unfused, fp16, eval mode, no gradients) carrying v6.0's attributes (yaml, save, nc, names as a list, stride,
    inplace, and hyp when ckpt records it), epoch -1 and the other keys None. best_fitness is a float instead of
    v6.0's numpy array: the file then needs no numpy globals (numpy 2 pickles them under numpy._core, a module
    numpy 1 installs lack), and v6.0 only compares it with floats.

    Args:
        ckpt: a dict from ``load_checkpoint`` / ``build_checkpoint``.

    Returns:
        The dict to write with ``save_yolov5_checkpoint``; its model's classes are YOLOV5_CLASSES and torch.nn
        layers (other blocks, e.g. models.attention, are warned about: v6.0 does not have them).
    """
    model = model_from_checkpoint(ckpt, use_ema=True)
    foreign = sorted({_class_path(m) for m in model.modules()
                      if _class_path(m).startswith("models.") and _class_path(m) not in YOLOV5_CLASSES})
    if foreign:
        LOGGER.warning(f"WARNING: the model uses {', '.join(foreign)}, which YOLOv5 v6.0 does not define: copy "
                       f"those modules into the YOLOv5 tree (same import paths) before loading the file there")
    if isinstance(ckpt.get("hyp"), Mapping):
        model.hyp = dict(ckpt["hyp"])
    model = model.half().eval().requires_grad_(False)
    detect = model.model[-1]
    if isinstance(detect, Detect):  # v6.0 casts Detect's stride with the model but keeps Model's in float32
        model.stride = detect.stride.float().clone()
    raw = dict.fromkeys(YOLOV5_KEYS)
    raw.update(epoch=-1, best_fitness=_to_float(ckpt.get("best_fitness")), model=model)
    return raw


def save_yolov5_checkpoint(raw: Mapping, path) -> Path:
    """Write a dict from ``build_yolov5_checkpoint`` to path atomically (pickled modules: YOLOv5's own format).

    Our loader reads the file back through its restricted unpickler like any official checkpoint.
    """
    if not isinstance(raw.get("model"), Model):
        raise ValueError("save_yolov5_checkpoint takes the dict build_yolov5_checkpoint returns")
    return _write_atomically(path, lambda f: torch.save(dict(raw), f))
